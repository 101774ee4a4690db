//! The immutable set of endpoints that requests pick from.

use std::sync::Arc;

use super::endpoint::Endpoint;

/// A set of endpoints in a snapshot.
pub(crate) type EndpointList<K, S> = Box<[Arc<Endpoint<K, S>>]>;

/// One published state of the balancer, swapped in whole by the driver.
pub(crate) struct Snapshot<K, S, Sch> {
    /// The endpoints new requests may go to.
    pub(crate) eligible: EndpointList<K, S>,
    /// Removed endpoints whose in-flight requests have not all finished.
    pub(crate) draining: EndpointList<K, S>,
    /// The strategy's precomputed schedule for `eligible`.
    pub(crate) schedule: Sch,
}

impl<K, S, Sch> Snapshot<K, S, Sch> {
    /// Requests in flight on every endpoint this snapshot knows, draining ones
    /// included.
    pub(crate) fn in_flight(&self) -> usize {
        self.eligible
            .iter()
            .chain(self.draining.iter())
            .map(|e| e.load().in_flight_seq_cst())
            .sum()
    }
}
