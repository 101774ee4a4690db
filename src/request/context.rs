//! One call's context: what the layers of a stack know about a call, kept
//! in one place that every attempt of the call shares.

use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::Safety;

/// What the layers of a stack know about one call: its deadline, its
/// safety class, and the attempts made so far (the endpoints they went to,
/// and the retry budgets that counted the call).
///
/// It is one value in the request, made by the outermost layer that needs
/// it: the [`Deadline`](crate::timeout::Deadline) layer when it sets a
/// deadline (or gRPC's `grpc-timeout` and method-safety layers), else the
/// retry or hedge layer. The layers beneath read it
/// rather than work anything out again: the retry and hedge layers take
/// the safety class the first of them found and count the call in the budget
/// once; the per-attempt timeout and the retry layer end by its deadline;
/// a balancer built with
/// [`avoid_tried_endpoints`](crate::balance::Builder::avoid_tried_endpoints) skips
/// the endpoints in [`tried`](Self::tried).
///
/// Every copy of the request for another attempt carries a copy of the
/// context: the deadline and class are plain values, the attempts are
/// shared (one `Arc`, made only when a retry or hedge layer is in the
/// stack).
///
/// An `http::Request` keeps it in its extensions; a request type of your
/// own keeps it in a field (see [`HasCallContext`]). Give a call a deadline
/// of your own before sending it:
///
/// ```
/// use std::time::Duration;
/// use tower_lb::request::{CallContext, HasCallContext};
/// use tower_lb::timeout::CallDeadline;
///
/// let mut req = http::Request::get("/orders/7").body(()).unwrap();
/// req.call_context_mut()
///     .tighten_deadline(CallDeadline::after(Duration::from_millis(300)));
/// assert!(CallDeadline::of(&req).is_some());
/// ```
#[derive(Debug, Clone, Default)]
pub struct CallContext {
    deadline: Option<CallDeadline>,
    safety: Option<Safety>,
    tried: Option<TriedEndpoints>,
    hash_key: Option<u64>,
}

impl CallContext {
    /// An empty context: no deadline, no class, no attempts.
    pub fn new() -> Self {
        Self::default()
    }

    /// A context whose attempts are recorded in `tried`, a set the caller
    /// keeps to see where the call went.
    pub fn with_tried(mut self, tried: TriedEndpoints) -> Self {
        self.tried = Some(tried);
        self
    }

    /// The moment the call must be over, if anything set one.
    pub fn deadline(&self) -> Option<CallDeadline> {
        self.deadline
    }

    /// Bounds the call by `deadline` unless it already has an earlier one;
    /// returns the deadline now in force. A deadline only moves earlier, so
    /// that no layer can lengthen the time a caller gave.
    pub fn tighten_deadline(&mut self, deadline: CallDeadline) -> CallDeadline {
        match self.deadline {
            Some(current) if current.at() <= deadline.at() => current,
            _ => {
                self.deadline = Some(deadline);
                deadline
            }
        }
    }

    /// The call's safety class, once set: by the caller, or by the first
    /// retry or hedge layer, which works it out from the request (see
    /// [`Replayable::safety`](super::Replayable::safety)) and keeps it here
    /// for the rest.
    pub fn safety(&self) -> Option<Safety> {
        self.safety
    }

    /// Sets the call's safety class, which then wins over what the request
    /// would say of itself.
    pub fn set_safety(&mut self, safety: Safety) {
        self.safety = Some(safety);
    }

    /// The attempts made so far, when a retry or hedge layer (or the
    /// caller) is recording them.
    pub fn tried(&self) -> Option<&TriedEndpoints> {
        self.tried.as_ref()
    }

    /// How many attempts have picked an endpoint.
    pub fn attempts(&self) -> usize {
        self.tried.as_ref().map_or(0, TriedEndpoints::attempts)
    }

    /// The call's hash key, if it has one: the requests of one key go to
    /// the same endpoint under a hashing strategy
    /// ([`RingHash`](crate::strategy::RingHash)).
    pub fn hash_key(&self) -> Option<u64> {
        self.hash_key
    }

    /// Gives the call a hash key (see [`hash_key_of`](super::hash_key_of)
    /// to make one from bytes, or [`HashKeyLayer`](super::HashKeyLayer) to
    /// set it from each request).
    pub fn set_hash_key(&mut self, key: u64) {
        self.hash_key = Some(key);
    }

    /// The set the call's attempts are recorded in, made on first use.
    pub(crate) fn tried_or_insert(&mut self) -> &TriedEndpoints {
        self.tried.get_or_insert_with(TriedEndpoints::new)
    }
}

/// A request that carries a [`CallContext`].
///
/// `http::Request` (hyper and tonic alike) keeps it in its extensions. A
/// request type of your own needs no `http::Extensions`: a field will do.
///
/// ```
/// use tower_lb::request::{CallContext, HasCallContext};
///
/// struct Query {
///     sql: String,
///     call: Option<CallContext>,
/// }
///
/// impl HasCallContext for Query {
///     fn call_context(&self) -> Option<&CallContext> {
///         self.call.as_ref()
///     }
///     fn call_context_mut(&mut self) -> &mut CallContext {
///         self.call.get_or_insert_with(CallContext::new)
///     }
/// }
/// ```
pub trait HasCallContext {
    /// The request's context, `None` until a layer (or the caller) made one.
    fn call_context(&self) -> Option<&CallContext>;

    /// The request's context, made empty if it has none yet.
    fn call_context_mut(&mut self) -> &mut CallContext;

    /// A deadline the caller gave outside the context, read by
    /// [`CallDeadline::of`] while the request has no context yet. A type
    /// that has one puts it into the context when
    /// [`call_context_mut`](Self::call_context_mut) makes it. The default
    /// has none; `http::Request` reads a [`CallDeadline`] from its
    /// extensions.
    fn preset_deadline(&self) -> Option<CallDeadline> {
        None
    }
}

impl<B> HasCallContext for http::Request<B> {
    fn call_context(&self) -> Option<&CallContext> {
        self.extensions().get::<CallContext>()
    }

    /// The context, made with the [`CallDeadline`] the caller inserted into
    /// the extensions, if any, so that the caller's deadline holds whoever
    /// makes the context: a layer, or the caller through this method.
    fn call_context_mut(&mut self) -> &mut CallContext {
        // Two lookups whether the context is new or not (the preset deadline
        // is read either way: the borrow checker will not let the closure
        // read the extensions it is inserting into).
        let deadline = self.preset_deadline();
        self.extensions_mut().get_or_insert_with(|| CallContext {
            deadline,
            ..CallContext::default()
        })
    }

    /// A [`CallDeadline`] the caller inserted into the extensions.
    fn preset_deadline(&self) -> Option<CallDeadline> {
        self.extensions().get::<CallDeadline>().copied()
    }
}

/// The moment a call must be over.
///
/// [`Deadline`](crate::timeout::Deadline) sets it in the call's
/// [`CallContext`]; the retry layer reads it so as not to start an attempt
/// it cannot finish; your own layers may read it too (to pass the time left
/// to a server, say).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallDeadline {
    at: Instant,
    budget: Duration,
}

impl CallDeadline {
    /// A deadline `budget` from now.
    pub fn after(budget: Duration) -> Self {
        let now = Instant::now();
        Self {
            // A budget too long to represent is no deadline at all, in effect.
            at: now.checked_add(budget).unwrap_or_else(far_future),
            budget,
        }
    }

    /// When the call must be over.
    pub fn at(&self) -> Instant {
        self.at
    }

    /// The whole call's time budget.
    pub fn budget(&self) -> Duration {
        self.budget
    }

    /// The time left, zero once passed.
    pub fn remaining(&self) -> Duration {
        self.at.saturating_duration_since(Instant::now())
    }

    /// The deadline of a request: its context's, else one the caller preset
    /// (see [`HasCallContext::preset_deadline`]).
    pub fn of<Req: HasCallContext>(req: &Req) -> Option<CallDeadline> {
        match req.call_context() {
            Some(context) => context.deadline(),
            None => req.preset_deadline(),
        }
    }
}

/// About 30 years from now: later than any call lives.
pub(crate) fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400 * 365 * 30)
}

/// How many endpoints a call remembers; attempts beyond it may repeat one.
/// Retries are few (the default is 3 attempts), so a fixed array keeps the
/// set free of locks and of allocations after its one `Arc`.
const CAPACITY: usize = 8;

/// The attempts of one call: the endpoints they were sent to, and the retry
/// budgets that have counted the call.
///
/// Kept in the call's [`CallContext`]; every attempt shares it (its copies
/// share the `Arc`). A balancer built with
/// [`Builder::avoid_tried_endpoints`](crate::balance::Builder::avoid_tried_endpoints)
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
    /// counted the call, so that one counted by both the retry and the
    /// hedge layer is counted once.
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

    #[test]
    fn a_deadline_only_moves_earlier() {
        let mut context = CallContext::new();
        let near = CallDeadline::after(Duration::from_secs(1));
        let far = CallDeadline::after(Duration::from_secs(10));
        assert_eq!(context.tighten_deadline(far), far);
        assert_eq!(context.tighten_deadline(near), near);
        assert_eq!(context.tighten_deadline(far), near);
        assert_eq!(context.deadline(), Some(near));
    }

    #[test]
    fn a_preset_deadline_joins_the_context_when_it_is_made() {
        let preset = CallDeadline::after(Duration::from_secs(2));
        let mut req = http::Request::new(());
        req.extensions_mut().insert(preset);
        assert_eq!(CallDeadline::of(&req), Some(preset));
        assert_eq!(req.call_context_mut().deadline(), Some(preset));
        assert_eq!(CallDeadline::of(&req), Some(preset));
    }

    #[test]
    fn a_context_the_caller_makes_keeps_the_callers_preset_deadline() {
        let preset = CallDeadline::after(Duration::from_secs(2));
        let mut req = http::Request::new(());
        req.extensions_mut().insert(preset);
        req.call_context_mut().set_safety(Safety::Idempotent);
        assert_eq!(CallDeadline::of(&req), Some(preset));
    }

    #[test]
    fn copies_of_a_context_share_its_attempts_once_recorded() {
        let mut context = CallContext::new();
        context.tried_or_insert().record(3);
        let copy = context.clone();
        context.tried_or_insert().record(4);
        assert_eq!(copy.attempts(), 2);
    }
}
