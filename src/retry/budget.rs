//! A lock-free retry budget, shared by every clone of a client, that caps
//! retries and hedges to a fraction of recent traffic.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::request::{CallContext, CallDeadline, Replayable, Safety};
use crate::setting::{self, InvalidSetting};

/// Buckets in the ring that makes up the window: each covers a tenth of it,
/// so a deposit stops counting between 0.9 and 1.0 windows after it was
/// made.
const BUCKETS: usize = 10;

/// The longest window [`RetryBudget::window`] accepts. Longer ones say
/// nothing useful about the current state of a backend, and the bound keeps
/// the integer arithmetic far from overflow.
const MAX_WINDOW: Duration = Duration::from_secs(60 * 60);

/// `ratio` is kept in parts per million, so the check is integer arithmetic
/// and a fractional ratio is never rounded up to a whole retry per request
/// (the bug of tower's `TpsBudget`, tower-rs/tower#857).
const PPM: u128 = 1_000_000;

/// A bucket's counter packs its sequence number (the bucket's index since the
/// epoch, modulo 2^32) in the high 32 bits and its count in the low 32 bits,
/// so that rolling a bucket over to a new period and counting in it is one
/// compare-and-swap: no window in which a reset can lose a count or a count
/// can survive a reset.
const COUNT_BITS: u32 = 32;
const COUNT_MASK: u64 = (1 << COUNT_BITS) - 1;

/// The defaults, Finagle's: 20 % of the last 10 s of requests, plus 10
/// retries a second.
const DEFAULT_RATIO: f64 = 0.2;
const DEFAULT_WINDOW: Duration = Duration::from_secs(10);
const DEFAULT_MIN_PER_SECOND: u32 = 10;

/// Calls of the window below which adaptive throttling refuses none.
const THROTTLE_FLOOR: u64 = 10;

/// A call refused by adaptive throttling (see
/// [`RetryBudget::adaptive_throttling`]) before it was sent: the backends
/// have been turning most calls away. Not retried.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "throttled by the client: the backends accepted {accepts} of the last {requests} calls (adaptive throttling, k = {k})"
)]
pub struct Throttled {
    requests: u64,
    accepts: u64,
    k: f64,
}

impl Throttled {
    /// The calls of the window, this one included.
    pub fn requests(&self) -> u64 {
        self.requests
    }

    /// The calls of the window the backends accepted.
    pub fn accepts(&self) -> u64 {
        self.accepts
    }
}

/// What a withdrawal from a [`RetryBudget`] is for. Both kinds draw from the
/// same pool; they are counted apart in [`RetryStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Spend {
    /// Another attempt after a failed one.
    Retry,
    /// A speculative copy of a request that is still outstanding.
    Hedge,
}

/// Totals since a [`RetryBudget`] was built.
///
/// ```
/// use tower_lb::retry::{RetryBudget, Spend};
///
/// let budget = RetryBudget::new();
/// budget.deposit();
/// assert!(budget.try_spend(Spend::Retry));
/// let stats = budget.stats();
/// assert_eq!((stats.requests, stats.retries), (1, 1));
/// assert_eq!(stats.attempts(), 2);
/// assert_eq!(stats.amplification(), 2.0);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct RetryStats {
    /// Original requests ([`RetryBudget::deposit`] calls).
    pub requests: u64,
    /// Retries the budget allowed.
    pub retries: u64,
    /// Hedges the budget allowed.
    pub hedges: u64,
    /// Retries and hedges the budget refused.
    pub refused: u64,
    /// Requests refused by adaptive throttling (see
    /// [`RetryBudget::adaptive_throttling`]), never sent.
    pub throttled: u64,
    /// Calls whose answer the backends accepted (counted with adaptive
    /// throttling only).
    pub accepted: u64,
}

impl RetryStats {
    /// Every attempt sent: original requests, retries and hedges.
    pub fn attempts(&self) -> u64 {
        self.requests
            .saturating_add(self.retries)
            .saturating_add(self.hedges)
    }

    /// Attempts per original request: the load the backends saw relative to
    /// the load the callers asked for. 1.0 when there were no requests.
    pub fn amplification(&self) -> f64 {
        if self.requests == 0 {
            1.0
        } else {
            self.attempts() as f64 / self.requests as f64
        }
    }
}

/// A retry budget: retries and hedges are allowed up to `ratio` times the
/// requests of the last `window`, plus a floor of `min_per_second` for every
/// second of the window.
///
/// # Why
///
/// Retries amplify load exactly when a backend is least able to take it: if
/// every request may be retried three times, an overloaded service sees four
/// times its traffic. A budget bounds the amplification for the whole client
/// instead of per request: with the defaults (Finagle's and Linkerd's: ratio
/// 0.2, window 10 s, 10 a second), a healthy client retries its occasional
/// failure, and a client whose every request fails sends at most 20 % more
/// (plus the floor), not 300 %. The floor lets a client that has just
/// started, or that sends few requests, still retry.
///
/// Hedges draw from the same budget, since to the backend a hedge is one more
/// request just like a retry.
///
/// tower has `TpsBudget`, with the same idea, but it takes a `Mutex` on every
/// deposit and withdrawal, and it rounds the cost of a retry down for
/// fractional ratios, so a ratio of 0.6 allows one retry per request
/// (tower-rs/tower#857). This one is lock-free (a ring of ten atomic
/// buckets, one compare-and-swap per call) and exact in integers.
///
/// # Sharing
///
/// `RetryBudget` is a cheap handle: its clones share one budget. Configure it
/// first, then clone it into every layer that should share it; each setter
/// returns a new, empty budget that earlier clones do not see.
///
/// # Concurrency
///
/// The check and the withdrawal are one compare-and-swap on the current
/// bucket, so concurrent spends cannot both take the last unit of the same
/// bucket; the other buckets are read just before. A thread whose clock
/// reading is stale by a bucket's width may still overshoot by one, so under
/// contention the budget may allow at most one extra spend per concurrent
/// caller.
///
/// ```
/// use std::time::Duration;
/// use tower_lb::retry::{RetryBudget, Spend};
///
/// let budget = RetryBudget::new()
///     .ratio(0.1)?
///     .window(Duration::from_secs(10))?
///     .min_per_second(0);
///
/// // Each original request deposits; retries and hedges withdraw.
/// for _ in 0..20 {
///     budget.deposit();
/// }
/// assert!(budget.try_spend(Spend::Retry));
/// assert!(budget.try_spend(Spend::Hedge));
/// assert!(!budget.try_spend(Spend::Retry)); // 10 % of 20 is 2
/// assert_eq!(budget.stats().refused, 1);
/// # Ok::<_, tower_lb::error::InvalidSetting>(())
/// ```
#[derive(Clone)]
pub struct RetryBudget {
    inner: Arc<Inner>,
}

/// The shared state behind every clone of a [`RetryBudget`].
struct Inner {
    config: Config,
    /// `ratio` in parts per million.
    ratio_ppm: u128,
    /// Spends always allowed within a window: `min_per_second` times the
    /// window in seconds, rounded down.
    floor: u128,
    /// The width of one bucket.
    bucket_ns: u64,
    /// Time zero for the bucket sequence numbers, on tokio's clock so that
    /// paused time in tests applies.
    epoch: Instant,
    /// Requests deposited, per bucket.
    deposits: [AtomicU64; BUCKETS],
    /// Retries and hedges withdrawn, per bucket.
    spends: [AtomicU64; BUCKETS],
    /// Calls the backends accepted, per bucket (adaptive throttling).
    accepts: [AtomicU64; BUCKETS],
    /// Calls whose outcome is known (answered, failed or refused by
    /// throttling), per bucket (adaptive throttling).
    settled: [AtomicU64; BUCKETS],
    requests: AtomicU64,
    retries: AtomicU64,
    hedges: AtomicU64,
    refused: AtomicU64,
    throttled: AtomicU64,
    accepted: AtomicU64,
}

#[derive(Debug, Clone, Copy)]
struct Config {
    ratio: f64,
    window: Duration,
    min_per_second: u32,
    /// Adaptive throttling's K, when on.
    throttle: Option<f64>,
}

impl RetryBudget {
    /// A budget with Finagle's defaults: retries up to 20 % of the requests
    /// of the last 10 seconds, plus 10 a second.
    pub fn new() -> Self {
        Self::with_config(Config {
            ratio: DEFAULT_RATIO,
            window: DEFAULT_WINDOW,
            min_per_second: DEFAULT_MIN_PER_SECOND,
            throttle: None,
        })
    }

    /// Client-side adaptive throttling (Google's SRE book, "Handling
    /// Overload"): before a call is sent, the retry layer refuses it locally
    /// with probability `max(0, (requests - k x accepts) / (requests + 1))`
    /// (and each retry with the same probability: a retry is a request to
    /// the backends too),
    /// where `requests` are the attempts of the window whose outcome is
    /// known (this budget's own count, so retries, hedges and throttling
    /// answer to one account of the traffic: answered, failed, given up on
    /// by a caller that dropped the call, or refused by throttling; none is
    /// refused while there are fewer than 10) and `accepts` those whose
    /// answer the backends accepted (the retry policy's
    /// [`Accept`](super::ResponseVerdict::Accept)). Retries count as
    /// requests, as the book's application-level retries do. Attempts still
    /// in flight count for neither: counted when sent, a burst at start-up
    /// or after a quiet spell would be refused before any could be answered
    /// (a first version did, 0.02 % of the calls of a healthy shootout run).
    /// While
    /// the backends accept everything nothing is refused; when they turn
    /// most calls away, the client sends about `k` times what they accept,
    /// instead of its whole load plus retries. `k` = 2 is the book's
    /// default: higher lets more through (2 wastes up to half of what is
    /// sent on rejections, to find out quickly when capacity returns).
    /// A refused call fails at once with [`Throttled`], never sent. A
    /// hedge layer on the same budget sends a hedge only with the same
    /// probability (a refused hedge counts in
    /// [`refused`](RetryStats::refused); the call goes on waiting for its
    /// first copy).
    ///
    /// Returns a new, empty budget (see [Sharing](#sharing)).
    ///
    /// ```
    /// use tower_lb::retry::RetryBudget;
    ///
    /// let budget = RetryBudget::new().adaptive_throttling(2.0)?;
    /// # let _ = budget;
    /// # Ok::<_, tower_lb::error::InvalidSetting>(())
    /// ```
    ///
    /// # Errors
    ///
    /// When `k` is below 1, NaN or infinite.
    pub fn adaptive_throttling(self, k: f64) -> Result<Self, InvalidSetting> {
        let k = setting::finite_at_least(
            "RetryBudget::adaptive_throttling",
            k,
            1.0,
            "a finite number, 1 or more",
        )?;
        Ok(Self::with_config(Config {
            throttle: Some(k),
            ..self.inner.config
        }))
    }

    /// Retries and hedges allowed per request in the window: 0.2 means one
    /// for every five requests. 0 leaves only the floor.
    ///
    /// Returns a new, empty budget (see [Sharing](#sharing)).
    ///
    /// # Errors
    ///
    /// When `ratio` is negative, NaN or infinite.
    pub fn ratio(self, ratio: f64) -> Result<Self, InvalidSetting> {
        let ratio = setting::finite_at_least(
            "RetryBudget::ratio",
            ratio,
            0.0,
            "a finite number, 0 or more",
        )?;
        Ok(Self::with_config(Config {
            ratio,
            ..self.inner.config
        }))
    }

    /// How far back requests count, and the period the floor is given for.
    /// Rounded up to a multiple of a tenth of itself in nanoseconds.
    ///
    /// Returns a new, empty budget (see [Sharing](#sharing)).
    ///
    /// # Errors
    ///
    /// When `window` is zero or longer than one hour.
    pub fn window(self, window: Duration) -> Result<Self, InvalidSetting> {
        let window = setting::check(
            "RetryBudget::window",
            window,
            !window.is_zero() && window <= MAX_WINDOW,
            "more than zero and at most one hour",
        )?;
        Ok(Self::with_config(Config {
            window,
            ..self.inner.config
        }))
    }

    /// Retries and hedges allowed per second of the window whatever the
    /// traffic, so that a client that has just started, or sends few
    /// requests, may still retry. 0 makes the budget purely proportional.
    ///
    /// Returns a new, empty budget (see [Sharing](#sharing)).
    pub fn min_per_second(self, min_per_second: u32) -> Self {
        Self::with_config(Config {
            min_per_second,
            ..self.inner.config
        })
    }

    fn with_config(config: Config) -> Self {
        let window_ns = u64::try_from(config.window.as_nanos()).unwrap_or(u64::MAX);
        // `as` saturates; the setters keep `ratio` finite and non-negative.
        let ratio_ppm = (config.ratio * PPM as f64).round() as u128;
        let floor = u128::from(config.min_per_second) * config.window.as_millis() / 1000;
        Self {
            inner: Arc::new(Inner {
                config,
                ratio_ppm,
                floor,
                bucket_ns: window_ns.div_ceil(BUCKETS as u64).max(1),
                epoch: Instant::now(),
                deposits: Default::default(),
                spends: Default::default(),
                accepts: Default::default(),
                settled: Default::default(),
                requests: AtomicU64::new(0),
                retries: AtomicU64::new(0),
                hedges: AtomicU64::new(0),
                refused: AtomicU64::new(0),
                throttled: AtomicU64::new(0),
                accepted: AtomicU64::new(0),
            }),
        }
    }

    /// Readies a call for the retry and hedge layers, whichever sees it
    /// first, in the call's [`CallContext`]: its safety class, worked out
    /// once and kept; a [`TriedEndpoints`](crate::request::TriedEndpoints)
    /// set for its attempts to share; and one deposit in this budget,
    /// however many layers (and attempts) it passes through. Returns the
    /// class and the call's deadline, which the layers keep for the call.
    pub(crate) fn begin_call<Req: Replayable>(
        &self,
        req: &mut Req,
    ) -> (Safety, Option<CallDeadline>) {
        // The context's class wins (as in `Safety::of_http`): the caller's,
        // or the one an outer layer found.
        let safety = match req.call_context().and_then(CallContext::safety) {
            Some(known) => known,
            None => req.safety(),
        };
        let context = req.call_context_mut();
        context.set_safety(safety);
        let deadline = context.deadline();
        if context
            .tried_or_insert()
            .first_count_by(Arc::as_ptr(&self.inner) as usize)
        {
            self.deposit();
        }
        (safety, deadline)
    }

    /// Records an original request (not a retry or a hedge): call it once
    /// per request, so that the allowance follows the traffic.
    pub fn deposit(&self) {
        let inner = &*self.inner;
        inner.count_now(&inner.deposits);
        inner.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether a call may be sent, by adaptive throttling (always, when it
    /// is off). The rule reads the settled calls of the window, and refuses
    /// none while there are fewer than [`THROTTLE_FLOOR`] (a client that
    /// sends little is not throttled). A refused call is settled at once.
    ///
    /// The draw comes from `seeded` when given (a
    /// [seeded](super::RetryLayer::seed) layer's sequence, so that a
    /// simulation repeats), else from the thread-local generator.
    pub(crate) fn admit(&self, seeded: Option<&AtomicU64>) -> Result<(), Throttled> {
        let Some(refused) = self.throttle(seeded) else {
            return Ok(());
        };
        let inner = &*self.inner;
        inner.count_now(&inner.settled);
        inner.throttled.fetch_add(1, Ordering::Relaxed);
        Err(refused)
    }

    /// Whether a retry or a hedge may be sent, by adaptive throttling: each
    /// is one more request to the backends, refused with the same
    /// probability as a call (always sent when throttling is off or refuses
    /// nothing). A refusal counts as one the budget refused. A refused retry
    /// also settles, as a refused call does; a refused hedge settles
    /// nothing, since the retry layer counts a hedged attempt once,
    /// whichever copy answers.
    pub(crate) fn admit_extra(&self, spend: Spend, seeded: Option<&AtomicU64>) -> bool {
        if self.throttle(seeded).is_none() {
            return true;
        }
        let inner = &*self.inner;
        if spend == Spend::Retry {
            inner.count_now(&inner.settled);
        }
        inner.refused.fetch_add(1, Ordering::Relaxed);
        false
    }

    /// Adaptive throttling's draw: what refuses a request, if it is refused.
    fn throttle(&self, seeded: Option<&AtomicU64>) -> Option<Throttled> {
        let inner = &*self.inner;
        let k = inner.config.throttle?;
        let tag = tag_of(inner.now_seq());
        let settled = window_sum(&inner.settled, tag, None);
        if settled < THROTTLE_FLOOR {
            return None;
        }
        let requests = settled as f64;
        let accepts = window_sum(&inner.accepts, tag, None) as f64;
        let refuse = ((requests - k * accepts) / (requests + 1.0)).max(0.0);
        (refuse > 0.0 && draw(seeded) < refuse).then_some(Throttled {
            requests: settled,
            accepts: accepts as u64,
            k,
        })
    }

    /// Counts an attempt whose answer the backends accepted (with adaptive
    /// throttling on; nothing otherwise). Settles it too.
    pub(crate) fn accepted(&self) {
        let inner = &*self.inner;
        if inner.config.throttle.is_some() {
            inner.count_now(&inner.accepts);
            inner.count_now(&inner.settled);
            inner.accepted.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts an attempt whose outcome is known and that the backends did
    /// not accept: it failed, was answered with one to retry, or was given
    /// up on (with adaptive throttling on; nothing otherwise).
    pub(crate) fn not_accepted(&self) {
        let inner = &*self.inner;
        if inner.config.throttle.is_some() {
            inner.count_now(&inner.settled);
        }
    }

    /// Withdraws one retry or hedge if the budget has room, and counts it as
    /// `spend`; otherwise counts a refusal and returns false.
    ///
    /// Allowed while `spent + 1 <= floor(ratio * requests) + floor`, all
    /// within the window.
    pub fn try_spend(&self, spend: Spend) -> bool {
        let inner = &*self.inner;
        if inner.withdraw() {
            let counter = match spend {
                Spend::Retry => &inner.retries,
                Spend::Hedge => &inner.hedges,
            };
            counter.fetch_add(1, Ordering::Relaxed);
            true
        } else {
            inner.refused.fetch_add(1, Ordering::Relaxed);
            false
        }
    }

    /// Totals since the budget was built.
    pub fn stats(&self) -> RetryStats {
        let inner = &*self.inner;
        RetryStats {
            requests: inner.requests.load(Ordering::Relaxed),
            retries: inner.retries.load(Ordering::Relaxed),
            hedges: inner.hedges.load(Ordering::Relaxed),
            refused: inner.refused.load(Ordering::Relaxed),
            throttled: inner.throttled.load(Ordering::Relaxed),
            accepted: inner.accepted.load(Ordering::Relaxed),
        }
    }
}

impl Default for RetryBudget {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for RetryBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let config = &self.inner.config;
        f.debug_struct("RetryBudget")
            .field("ratio", &config.ratio)
            .field("window", &config.window)
            .field("min_per_second", &config.min_per_second)
            .field("adaptive_throttling", &config.throttle)
            .field("stats", &self.stats())
            .finish()
    }
}

impl Inner {
    /// Counts one in the current bucket of `slots`.
    fn count_now(&self, slots: &[AtomicU64; BUCKETS]) {
        let seq = self.now_seq();
        let slot = &slots[slot_of(seq)];
        let tag = tag_of(seq);
        let mut current = slot.load(Ordering::Relaxed);
        loop {
            let (base_tag, count) = rolled(current, tag);
            // A full bucket stays full: the count must never carry into the
            // sequence number.
            let next = pack(base_tag, count.saturating_add(1));
            match slot.compare_exchange_weak(current, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => break,
                Err(actual) => current = actual,
            }
        }
    }

    /// The current bucket's sequence number: buckets since the epoch.
    fn now_seq(&self) -> u64 {
        let elapsed = Instant::now().saturating_duration_since(self.epoch);
        let ns = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        ns / self.bucket_ns
    }

    /// Takes one unit from the budget if it has room.
    fn withdraw(&self) -> bool {
        let seq = self.now_seq();
        let tag = tag_of(seq);
        let index = slot_of(seq);
        let deposited = window_sum(&self.deposits, tag, None);
        // Saturating: an absurd ratio saturated `ratio_ppm` at `u128::MAX`.
        let allowed = self.ratio_ppm.saturating_mul(u128::from(deposited)) / PPM + self.floor;
        // Spends in the other buckets are read once; the current bucket's
        // count is checked and incremented in the same compare-and-swap.
        let spent_elsewhere = u128::from(window_sum(&self.spends, tag, Some(index)));
        let slot = &self.spends[index];
        let mut current = slot.load(Ordering::Relaxed);
        loop {
            let (base_tag, count) = rolled(current, tag);
            if count == u32::MAX || spent_elsewhere + u128::from(count) + 1 > allowed {
                return false;
            }
            let next = pack(base_tag, count + 1);
            match slot.compare_exchange_weak(current, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return true,
                Err(actual) => current = actual,
            }
        }
    }
}

/// The ring slot of bucket `seq`.
fn slot_of(seq: u64) -> usize {
    // The remainder is below `BUCKETS`, so the cast is lossless.
    (seq % BUCKETS as u64) as usize
}

/// The sequence number as stored in a slot: modulo 2^32, which is 136 years
/// of 1-second buckets before a stale bucket could be mistaken for a current
/// one.
fn tag_of(seq: u64) -> u32 {
    seq as u32
}

fn pack(tag: u32, count: u32) -> u64 {
    (u64::from(tag) << COUNT_BITS) | u64::from(count)
}

fn unpack(word: u64) -> (u32, u32) {
    ((word >> COUNT_BITS) as u32, (word & COUNT_MASK) as u32)
}

/// How far bucket `stored` is behind bucket `now` (negative when ahead).
fn age(now: u32, stored: u32) -> i64 {
    i64::from(now.wrapping_sub(stored) as i32)
}

/// The tag and count to count on from, for a slot holding `word`, in bucket
/// `tag`: the slot's own count if it is this bucket; zero if it holds an old
/// one (rolling it over); and the slot's newer bucket as it is if another
/// thread, whose clock read later, already rolled it over (counting there,
/// a little late, rather than wiping a newer count).
fn rolled(word: u64, tag: u32) -> (u32, u32) {
    let (stored, count) = unpack(word);
    if age(tag, stored) > 0 {
        (tag, 0)
    } else {
        (stored, count)
    }
}

/// The sum of the counts in the window ending at bucket `now`, skipping
/// slot `skip`.
fn window_sum(slots: &[AtomicU64; BUCKETS], now: u32, skip: Option<usize>) -> u64 {
    slots
        .iter()
        .enumerate()
        .filter(|&(index, _)| Some(index) != skip)
        .map(|(_, slot)| unpack(slot.load(Ordering::Relaxed)))
        // Buckets slightly ahead of `now` are recent (their writers read the
        // clock later than we did); buckets a full ring behind are expired.
        .filter(|&(stored, _)| age(now, stored).unsigned_abs() < BUCKETS as u64)
        .map(|(_, count)| u64::from(count))
        .sum()
}

/// A uniform draw in `[0, 1)`: the next of a seeded sequence, or the
/// thread-local generator's.
fn draw(seeded: Option<&AtomicU64>) -> f64 {
    match seeded {
        // The top 53 bits, as `rand` makes an `f64`.
        Some(sequence) => {
            (crate::strategy::next_seeded(sequence) >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
        }
        None => fastrand::f64(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spend_all(budget: &RetryBudget, spend: Spend) -> u64 {
        let mut spent = 0;
        while budget.try_spend(spend) {
            spent += 1;
        }
        spent
    }

    #[tokio::test(start_paused = true)]
    async fn with_no_requests_only_the_floor_is_available() {
        let budget = RetryBudget::new();
        for _ in 0..100 {
            assert!(budget.try_spend(Spend::Retry));
        }
        assert!(!budget.try_spend(Spend::Retry));
    }

    #[tokio::test(start_paused = true)]
    async fn twenty_percent_of_requests_adds_to_the_floor() {
        let budget = RetryBudget::new();
        for _ in 0..1_000 {
            budget.deposit();
        }
        assert_eq!(spend_all(&budget, Spend::Retry), 200 + 100);
    }

    #[tokio::test(start_paused = true)]
    async fn deposits_older_than_the_window_stop_counting() {
        let budget = RetryBudget::new().min_per_second(0);
        for _ in 0..100 {
            budget.deposit();
        }
        tokio::time::advance(Duration::from_secs(9)).await;
        assert!(budget.try_spend(Spend::Retry));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(!budget.try_spend(Spend::Retry));
    }

    #[tokio::test(start_paused = true)]
    async fn spends_older_than_the_window_are_returned() {
        let budget = RetryBudget::new();
        assert_eq!(spend_all(&budget, Spend::Retry), 100);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(spend_all(&budget, Spend::Retry), 100);
    }

    /// One second of calls through a throttled `budget` to backends that
    /// accept at most `capacity` of them; returns how many were sent.
    fn second_of_calls(budget: &RetryBudget, calls: u32, capacity: u32) -> u32 {
        let mut sent = 0;
        for _ in 0..calls {
            budget.deposit();
            if budget.admit(None).is_ok() {
                sent += 1;
                if sent <= capacity {
                    budget.accepted();
                } else {
                    budget.not_accepted();
                }
            }
        }
        sent
    }

    /// A budget with adaptive throttling at the book's k = 2.
    fn throttling() -> RetryBudget {
        RetryBudget::new()
            .adaptive_throttling(2.0)
            .expect("valid setting")
    }

    /// A call sent and answered: accepted by the backends or not.
    fn settled_call(budget: &RetryBudget, accepted: bool) {
        budget.deposit();
        if accepted {
            budget.accepted();
        } else {
            budget.not_accepted();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn throttling_draws_from_a_seeded_sequence_repeat() {
        let decisions = |seed: u64| {
            let budget = throttling();
            let sequence = crate::strategy::seeded_state(seed);
            (0..400)
                .map(|i| {
                    // A quarter accepted: about half refused.
                    settled_call(&budget, i % 4 == 0);
                    budget.admit(Some(&sequence)).is_ok()
                })
                .collect::<Vec<bool>>()
        };
        assert_eq!(decisions(7), decisions(7));
        assert_ne!(decisions(7), decisions(8), "the seed matters");
    }

    #[tokio::test(start_paused = true)]
    async fn throttling_refuses_no_call_of_a_burst_that_is_still_in_flight() {
        let budget = throttling();
        // 200 calls at once at start-up: none answered yet, none refused.
        for _ in 0..200 {
            budget.deposit();
            assert!(budget.admit(None).is_ok());
        }
        assert_eq!(budget.stats().throttled, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn retries_are_refused_as_calls_are_while_throttling_refuses() {
        let budget = throttling();
        assert!(
            budget.admit_extra(Spend::Retry, None),
            "nothing settled yet"
        );
        // 100 calls settled, none accepted: nearly everything is refused.
        for _ in 0..100 {
            settled_call(&budget, false);
        }
        let admitted = (0..100)
            .filter(|_| budget.admit_extra(Spend::Retry, None))
            .count();
        assert!(admitted < 10, "{admitted}");
        assert_eq!(budget.stats().refused, 100 - admitted as u64);
        // Refused retries count as refused by the budget, not as calls
        // throttled.
        assert_eq!(budget.stats().throttled, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn hedges_are_refused_as_calls_are_and_settle_nothing() {
        let budget = throttling();
        // 20 calls settled, 9 accepted: (20 - 2 x 9) / 21, one in ten
        // refused.
        for i in 0..20 {
            settled_call(&budget, i < 9);
        }
        let admitted = (0..1000)
            .filter(|_| budget.admit_extra(Spend::Hedge, None))
            .count();
        // Had each refused hedge settled as a call not accepted, the odds
        // would climb towards 1 and most of the 1,000 would be refused.
        assert!((850..970).contains(&admitted), "{admitted}");
        let stats = budget.stats();
        assert_eq!(stats.refused, 1000 - admitted as u64);
        assert_eq!(stats.throttled, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn throttling_refuses_nothing_while_the_backends_accept_everything() {
        let budget = throttling();
        for _ in 0..20 {
            assert_eq!(second_of_calls(&budget, 100, 100), 100);
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        assert_eq!(budget.stats().throttled, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn throttling_sends_about_k_times_what_the_backends_accept() {
        // 100 calls a second, the backends accepting 10 of them: once the
        // window has filled, about k x 10 = 20 a second are sent.
        let budget = throttling();
        let mut sent = Vec::new();
        for _ in 0..30 {
            sent.push(second_of_calls(&budget, 100, 10));
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        let settled: u32 = sent[20..].iter().sum();
        assert!((150..=260).contains(&settled), "{sent:?}");
        let stats = budget.stats();
        assert_eq!(u64::from(sent.iter().sum::<u32>()) + stats.throttled, 3000);
    }

    #[tokio::test(start_paused = true)]
    async fn throttling_lets_calls_through_again_as_the_backends_recover() {
        let budget = throttling();
        for _ in 0..20 {
            second_of_calls(&budget, 100, 0);
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        assert!(second_of_calls(&budget, 100, 0) < 10);
        // The backends take everything again: what is sent and accepted
        // lets more through each second (k = 2 sends twice the accepts),
        // until every call passes.
        let mut sent = Vec::new();
        for _ in 0..90 {
            tokio::time::advance(Duration::from_secs(1)).await;
            sent.push(second_of_calls(&budget, 100, 100));
        }
        // The draws are random: the bounds are loose (a run takes 30 - 45 s).
        let all_through = sent.iter().position(|&n| n == 100).expect("recovered");
        assert!((10..=80).contains(&all_through), "{sent:?}");
        let first: u32 = sent[..10].iter().sum();
        let later: u32 = sent[all_through - 10..all_through].iter().sum();
        assert!(later > first * 3, "{sent:?}");
        assert!(sent[all_through..].iter().all(|&n| n == 100), "{sent:?}");
    }

    #[test]
    fn a_throttling_k_below_one_is_refused_by_name() {
        for bad in [0.5, f64::NAN, f64::INFINITY] {
            let error = RetryBudget::new()
                .adaptive_throttling(bad)
                .expect_err("refused");
            assert_eq!(error.setting(), "RetryBudget::adaptive_throttling");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_refusal_is_counted_in_stats() {
        let budget = RetryBudget::new().min_per_second(0);
        assert!(!budget.try_spend(Spend::Hedge));
        assert_eq!(
            budget.stats(),
            RetryStats {
                refused: 1,
                ..RetryStats::default()
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn retries_and_hedges_count_apart_and_share_one_pool() {
        let budget = RetryBudget::new()
            .ratio(0.5)
            .expect("valid setting")
            .min_per_second(0);
        for _ in 0..4 {
            budget.deposit();
        }
        assert!(budget.try_spend(Spend::Retry));
        assert!(budget.try_spend(Spend::Hedge));
        assert!(!budget.try_spend(Spend::Retry));
        assert!(!budget.try_spend(Spend::Hedge));
        let stats = budget.stats();
        assert_eq!(
            (stats.requests, stats.retries, stats.hedges, stats.refused),
            (4, 1, 1, 2)
        );
        assert_eq!(stats.attempts(), 6);
        assert_eq!(stats.amplification(), 1.5);
    }

    #[tokio::test(start_paused = true)]
    async fn a_fractional_ratio_does_not_over_allocate() {
        // tower-rs/tower#857: tower's TpsBudget allows 10 here.
        let budget = RetryBudget::new()
            .ratio(0.6)
            .expect("valid setting")
            .min_per_second(0);
        for _ in 0..10 {
            budget.deposit();
        }
        assert_eq!(spend_all(&budget, Spend::Retry), 6);
    }

    #[tokio::test(start_paused = true)]
    async fn the_floor_scales_with_a_fractional_window() {
        let budget = RetryBudget::new()
            .window(Duration::from_millis(500))
            .expect("valid setting")
            .min_per_second(10);
        assert_eq!(spend_all(&budget, Spend::Retry), 5);
    }

    #[tokio::test(start_paused = true)]
    async fn clones_share_one_budget() {
        let budget = RetryBudget::new()
            .min_per_second(0)
            .ratio(1.0)
            .expect("valid setting");
        let clone = budget.clone();
        budget.deposit();
        assert!(clone.try_spend(Spend::Retry));
        assert!(!budget.try_spend(Spend::Retry));
        assert_eq!(budget.stats(), clone.stats());
    }

    #[tokio::test(start_paused = true)]
    async fn an_absurd_ratio_allows_everything_without_overflow() {
        let budget = RetryBudget::new()
            .ratio(f64::MAX)
            .expect("valid setting")
            .min_per_second(0);
        budget.deposit();
        for _ in 0..1_000 {
            assert!(budget.try_spend(Spend::Retry));
        }
    }

    #[test]
    fn no_requests_means_no_amplification() {
        assert_eq!(RetryStats::default().amplification(), 1.0);
    }

    #[test]
    fn a_negative_nan_or_infinite_ratio_is_refused_by_name() {
        for bad in [-0.1, f64::NAN, f64::INFINITY] {
            let error = RetryBudget::new().ratio(bad).unwrap_err();
            assert_eq!(error.setting(), "RetryBudget::ratio");
        }
    }

    #[test]
    fn a_zero_window_or_one_over_an_hour_is_refused_by_name() {
        for bad in [Duration::ZERO, Duration::from_secs(3601)] {
            let error = RetryBudget::new().window(bad).unwrap_err();
            assert_eq!(error.setting(), "RetryBudget::window");
        }
    }

    #[test]
    fn concurrent_spends_never_exceed_the_allowance_by_more_than_the_thread_count() {
        const THREADS: u64 = 8;
        let budget = RetryBudget::new()
            .ratio(0.25)
            .expect("valid setting")
            .min_per_second(0);
        for _ in 0..4_000 {
            budget.deposit();
        }
        let allowance = 1_000;
        let handles: Vec<_> = (0..THREADS)
            .map(|_| {
                let budget = budget.clone();
                std::thread::spawn(move || {
                    let mut spent = 0u64;
                    for _ in 0..1_000 {
                        if budget.try_spend(Spend::Retry) {
                            spent += 1;
                        }
                    }
                    spent
                })
            })
            .collect();
        let spent: u64 = handles
            .into_iter()
            .map(|handle| handle.join().unwrap_or_else(|_| unreachable!()))
            .sum();
        assert!(spent >= allowance, "spent only {spent}");
        assert!(spent <= allowance + THREADS, "spent {spent}");
        assert_eq!(budget.stats().refused, THREADS * 1_000 - spent);
    }

    #[test]
    fn the_debug_output_shows_the_config() {
        let debug = format!("{:?}", RetryBudget::new());
        assert!(debug.contains("ratio: 0.2"), "{debug}");
        assert!(debug.contains("window: 10s"), "{debug}");
    }

    #[test]
    fn each_budget_counts_a_call_once_however_many_layers_ask() {
        let (a, b) = (RetryBudget::new(), RetryBudget::new());
        let body = crate::retry::ReplayBody::new(http_body_util::Empty::<bytes::Bytes>::new(), 0);
        let mut req = http::Request::new(body);
        a.begin_call(&mut req);
        b.begin_call(&mut req);
        a.begin_call(&mut req);
        let mut copy = req.replay().unwrap_or_else(|e| panic!("copy: {e}"));
        b.begin_call(&mut copy);
        assert_eq!((a.stats().requests, b.stats().requests), (1, 1));
        assert!(crate::request::HasCallContext::call_context(&copy)
            .and_then(CallContext::tried)
            .is_some());
    }
}
