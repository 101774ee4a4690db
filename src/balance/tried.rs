//! The endpoints a call has already been sent to, so that a retry or a hedge
//! goes somewhere else.

use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use crate::request::HasExtensions;

/// How many endpoints a call remembers; attempts beyond it may repeat one.
/// Retries are few (the default is 3 attempts), so a fixed array keeps the
/// set free of locks and of allocations after its one `Arc`.
const CAPACITY: usize = 8;

/// The endpoints one call has been sent to.
///
/// The retry and hedge layers put one into a request's extensions; every
/// attempt shares it (its copies share the `Arc`). A balancer built with
/// [`Builder::avoid_tried_endpoints`](crate::Builder::avoid_tried_endpoints)
/// picks an endpoint not in it while one in service is left, and adds the
/// endpoint it picked.
#[derive(Clone, Default)]
pub struct TriedEndpoints {
    inner: Arc<Slots>,
}

#[derive(Default)]
struct Slots {
    /// Endpoint ids (never 0) in the order they were tried.
    ids: [AtomicU64; CAPACITY],
    /// Attempts recorded; may exceed `CAPACITY`.
    recorded: AtomicUsize,
    /// The retry budgets (by address; 0 is an empty slot) that have
    /// counted the call: kept here, in the call's one shared set, rather
    /// than in an extension of its own, which every attempt's copy of the
    /// request would clone (an allocation each).
    budgets: [AtomicUsize; BUDGETS],
}

/// Budgets a call remembers having counted it: nearly always one.
const BUDGETS: usize = 4;

impl TriedEndpoints {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many attempts have picked an endpoint.
    pub fn attempts(&self) -> usize {
        self.inner.recorded.load(Ordering::Acquire)
    }

    /// True when no attempt has picked an endpoint yet.
    pub fn is_empty(&self) -> bool {
        self.attempts() == 0
    }

    pub(crate) fn contains(&self, id: u64) -> bool {
        let recorded = self.attempts().min(CAPACITY);
        self.inner.ids[..recorded]
            .iter()
            .any(|slot| slot.load(Ordering::Acquire) == id)
    }

    /// Whether the budget `id` (its address, never 0) is counting the call
    /// for the first time, remembering that it has. A fifth budget on one
    /// call (never seen in practice) counts it each time.
    pub(crate) fn first_count_by(&self, id: usize) -> bool {
        for slot in &self.inner.budgets {
            match slot.compare_exchange(0, id, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return true,
                Err(current) if current == id => return false,
                Err(_) => {}
            }
        }
        true
    }

    pub(crate) fn record(&self, id: u64) {
        let slot = self.inner.recorded.fetch_add(1, Ordering::AcqRel);
        if let Some(slot) = self.inner.ids.get(slot) {
            slot.store(id, Ordering::Release);
        }
    }
}

impl fmt::Debug for TriedEndpoints {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TriedEndpoints")
            .field("attempts", &self.attempts())
            .finish()
    }
}

/// What a balancer reads from a request before it picks an endpoint.
///
/// A balancer is generic over its request type, and most request types
/// carry nothing for it, so reading is opt-in: [`NoHints`] (the default)
/// reads nothing; [`ExtensionHints`] reads the [`TriedEndpoints`] from a
/// request's extensions.
pub trait RequestHints<Req>: Send + Sync + 'static {
    /// The endpoints this request's call has been sent to already.
    fn tried<'r>(&self, req: &'r Req) -> Option<&'r TriedEndpoints>;
}

/// Reads nothing from requests: every pick is independent.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoHints;

impl<Req> RequestHints<Req> for NoHints {
    fn tried<'r>(&self, _: &'r Req) -> Option<&'r TriedEndpoints> {
        None
    }
}

/// Reads the [`TriedEndpoints`] the retry and hedge layers leave in a
/// request's extensions, so that a retry avoids the endpoints that already
/// had the call.
#[derive(Debug, Clone, Copy, Default)]
pub struct ExtensionHints;

impl<Req: HasExtensions> RequestHints<Req> for ExtensionHints {
    fn tried<'r>(&self, req: &'r Req) -> Option<&'r TriedEndpoints> {
        req.extensions().get::<TriedEndpoints>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_share_one_set() {
        let tried = TriedEndpoints::new();
        let copy = tried.clone();
        copy.record(7);
        assert!(tried.contains(7));
        assert_eq!(tried.attempts(), 1);
    }

    #[test]
    fn attempts_beyond_capacity_are_counted_but_not_remembered() {
        let tried = TriedEndpoints::new();
        for id in 1..=(CAPACITY as u64 + 2) {
            tried.record(id);
        }
        assert_eq!(tried.attempts(), CAPACITY + 2);
        assert!(tried.contains(1));
        assert!(!tried.contains(CAPACITY as u64 + 1));
    }
}
