//! The immutable set of endpoints that requests pick from.

use std::sync::Arc;

use super::endpoint::Endpoint;

/// A set of endpoints in a snapshot.
pub(crate) type EndpointList<K, S> = Box<[Arc<Endpoint<K, S>>]>;

/// One published state of the balancer, swapped in whole by the driver.
pub(crate) struct Snapshot<K, S, Sch> {
    /// The endpoints new requests may go to: those in service, or in panic
    /// mode all of them.
    pub(crate) eligible: EndpointList<K, S>,
    /// Endpoints out of service: ejected by outlier detection, or kept out
    /// by their active check (also in `eligible` in panic mode).
    pub(crate) out_of_service: EndpointList<K, S>,
    /// Too few endpoints are in service: requests go to those out of
    /// service too.
    pub(crate) panic: bool,
    /// Every endpoint waits for its active check's first answer (a start):
    /// requests wait for one, as for the first endpoint, rather than fail on
    /// what is not known (gRPC's A17 queues such picks too).
    pub(crate) awaiting_checks: bool,
    /// Endpoints in service (or, in panic mode, eligible) left out of
    /// `eligible` because their connection is being made or failed while
    /// another's takes requests.
    pub(crate) unconnected: EndpointList<K, S>,
    /// Removed endpoints whose in-flight requests have not all finished.
    pub(crate) draining: EndpointList<K, S>,
    /// The strategy's precomputed schedule for `eligible`.
    pub(crate) schedule: Sch,
}

impl<K, S, Sch> Snapshot<K, S, Sch> {
    /// Every endpoint this snapshot knows, each once: eligible, left out
    /// for their connection, out of service, draining.
    pub(crate) fn all(&self) -> impl Iterator<Item = &Arc<Endpoint<K, S>>> {
        let out: &[Arc<Endpoint<K, S>>] = if self.panic {
            &[]
        } else {
            &self.out_of_service
        };
        self.eligible
            .iter()
            .chain(self.unconnected.iter())
            .chain(out.iter())
            .chain(self.draining.iter())
    }

    /// Requests in flight on every endpoint this snapshot knows, those out
    /// of service and draining included.
    pub(crate) fn in_flight(&self) -> usize {
        self.all().map(|e| e.load().in_flight_seq_cst()).sum()
    }
}
