//! The immutable set of endpoints that requests pick from.

use std::sync::Arc;

/// Mixed into a request's hash key for the level and the zone draws, so
/// that the two are independent.
const LEVEL_SALT: u64 = 0x6c65_7665_6c00_0001;
const GROUP_SALT: u64 = 0x7a6f_6e65_0000_0002;

use super::endpoint::Endpoint;
use crate::strategy::PickContext;
use crate::topology::zone::WHOLE;

/// A set of endpoints in a snapshot.
pub(crate) type EndpointList<K, S> = Box<[Arc<Endpoint<K, S>>]>;

/// Endpoints a request may be given as one: a priority level's, or with
/// zone-aware routing one zone's of a level. The strategy picks within it.
pub(crate) struct Group<K, S, Sch> {
    /// The endpoints requests given this group may go to: those in
    /// service, or in panic mode all of the level's (known) endpoints.
    pub(crate) eligible: EndpointList<K, S>,
    /// The strategy's precomputed schedule for `eligible`.
    pub(crate) schedule: Sch,
    /// The group takes the level's draws (0 to 9,999) below this, above
    /// the previous group's: the groups' shares of the level, added up.
    pub(crate) below: u32,
    /// The client's own zone, under zone-aware routing.
    pub(crate) local: bool,
}

/// One priority level that takes traffic.
pub(crate) struct Level<K, S, Sch> {
    /// Its first group: without zone-aware routing the only one, so that a
    /// pick reads it without a draw or another indirection.
    pub(crate) first: Group<K, S, Sch>,
    /// Its other groups (zones), in no particular order.
    pub(crate) more: Box<[Group<K, S, Sch>]>,
    /// Too few of the level's endpoints are in service (and too few of
    /// the other levels' to make up for it): its out-of-service endpoints
    /// are eligible too.
    pub(crate) panic: bool,
    /// The level takes the draws (0 to 99) below this, above the previous
    /// level's: the levels' shares of the traffic, added up.
    pub(crate) below: u32,
    /// Under zone-aware routing with load-aware spill: the factor (see
    /// [`ZoneAware::latency_spill_factor`](crate::topology::ZoneAware::latency_spill_factor)).
    pub(crate) latency_spill: Option<f64>,
}

impl<K, S, Sch> Level<K, S, Sch> {
    /// Where a request given the local zone may spill, when load-aware
    /// spill is on: another zone that takes requests, drawn by the zones'
    /// shares.
    pub(crate) fn spill_target(&self, ctx: &PickContext<'_>) -> Option<(&Group<K, S, Sch>, f64)> {
        let factor = self.latency_spill?;
        // Two walks over the groups, so that nothing is allocated.
        let shares = || {
            let mut from = 0;
            self.groups().map(move |group| {
                let share = group.below - from;
                from = group.below;
                (group, if group.local { 0 } else { share })
            })
        };
        let total: u32 = shares().map(|(_, share)| share).sum();
        if total == 0 {
            return None;
        }
        let mut draw = ctx.random_index(total as usize) as u32;
        for (group, share) in shares() {
            if draw < share {
                return Some((group, factor));
            }
            draw -= share;
        }
        None
    }

    /// The group a request given this level goes to: by a draw weighted by
    /// the groups' shares when there are several.
    #[inline]
    pub(crate) fn group(&self, ctx: &PickContext<'_>) -> &Group<K, S, Sch> {
        if self.more.is_empty() {
            return &self.first;
        }
        let draw = ctx.index_by_key(WHOLE as usize, GROUP_SALT) as u32;
        by_draw(&self.first, &self.more, draw, |group| group.below)
    }

    /// Every group, in order.
    pub(crate) fn groups(&self) -> impl Iterator<Item = &Group<K, S, Sch>> {
        std::iter::once(&self.first).chain(self.more.iter())
    }
}

/// One published state of the balancer, swapped in whole by the driver.
///
/// Every endpoint is in exactly one list: a level's
/// group's `eligible`, `unconnected`, `standby`, `out_of_service` or
/// `draining`.
pub(crate) struct Snapshot<K, S, Sch> {
    /// The first priority level that takes traffic: with one level (every
    /// endpoint at the same priority, the usual case) the only one, so
    /// that a pick reads it without a draw or another indirection.
    pub(crate) first: Level<K, S, Sch>,
    /// The other levels that take traffic, in priority order.
    pub(crate) more: Box<[Level<K, S, Sch>]>,
    /// Endpoints out of service: ejected by outlier detection, kept out by
    /// their active check, or not serving by the platform's word (those
    /// of a level in panic mode are in its `eligible` instead).
    pub(crate) out_of_service: EndpointList<K, S>,
    /// Some level is in panic mode.
    pub(crate) panic: bool,
    /// Every endpoint waits for its active check's first answer (a start):
    /// requests wait for one, as for the first endpoint, rather than fail on
    /// what is not known (gRPC's A17 queues such picks too).
    pub(crate) awaiting_checks: bool,
    /// Endpoints a level could pick but leaves for last: their connection
    /// is being made or failed, or the platform is terminating them, while
    /// another of the level's takes requests.
    pub(crate) unconnected: EndpointList<K, S>,
    /// Endpoints in service at priority levels, or in zones, that take no
    /// traffic now.
    pub(crate) standby: EndpointList<K, S>,
    /// Removed endpoints whose in-flight requests have not all finished.
    pub(crate) draining: EndpointList<K, S>,
}

impl<K, S, Sch> Snapshot<K, S, Sch> {
    /// No level has an endpoint to pick.
    pub(crate) fn is_empty(&self) -> bool {
        self.first.first.eligible.is_empty() && self.first.more.is_empty() && self.more.is_empty()
    }

    /// The level a request goes to: the first, unless levels share the
    /// traffic, and then by a draw weighted by their shares.
    #[inline]
    pub(crate) fn level(&self, ctx: &PickContext<'_>) -> &Level<K, S, Sch> {
        if self.more.is_empty() {
            return &self.first;
        }
        let draw = ctx.index_by_key(100, LEVEL_SALT) as u32;
        by_draw(&self.first, &self.more, draw, |level| level.below)
    }

    /// Every level that takes traffic, in priority order.
    pub(crate) fn levels(&self) -> impl Iterator<Item = &Level<K, S, Sch>> {
        std::iter::once(&self.first).chain(self.more.iter())
    }

    /// Every endpoint this snapshot knows, each once.
    pub(crate) fn all(&self) -> impl Iterator<Item = &Arc<Endpoint<K, S>>> {
        self.levels()
            .flat_map(|level| level.groups())
            .flat_map(|group| group.eligible.iter())
            .chain(self.unconnected.iter())
            .chain(self.standby.iter())
            .chain(self.out_of_service.iter())
            .chain(self.draining.iter())
    }

    /// Requests in flight on every endpoint this snapshot knows, those out
    /// of service and draining included.
    pub(crate) fn in_flight(&self) -> usize {
        self.all().map(|e| e.load().in_flight_seq_cst()).sum()
    }
}

/// Of `first` and `more`, whose `below`s add up their shares in order, the
/// one `draw` falls in (`first` when none: the shares are whole).
#[inline]
fn by_draw<'a, T>(first: &'a T, more: &'a [T], draw: u32, below: impl Fn(&T) -> u32) -> &'a T {
    if draw < below(first) {
        return first;
    }
    more.iter().find(|t| draw < below(t)).unwrap_or(first)
}
