//! Balancing strategies: how the balancer picks one endpoint per request.
//!
//! A strategy sees the eligible endpoints of the current snapshot through
//! [`Candidates`] and returns an index. It may precompute a
//! [`Schedule`](Strategy::Schedule) whenever the set of endpoints changes; that
//! work runs on the balancer's driver task, never on the request path.
//!
//! Writing your own:
//!
//! ```
//! use tower_lb::strategy::{Candidates, PickContext, Strategy};
//!
//! /// Always the endpoint with the fewest requests in flight (a full scan).
//! struct LeastLoaded;
//!
//! impl Strategy for LeastLoaded {
//!     type Schedule = ();
//!
//!     fn schedule<C: Candidates + ?Sized>(&self, _: &C, _: &PickContext<'_>) {}
//!
//!     fn pick<C: Candidates + ?Sized>(&self, _: &(), c: &C, _: &PickContext<'_>) -> Option<usize> {
//!         (0..c.len()).min_by_key(|&i| c.load(i).in_flight())
//!     }
//! }
//! ```

mod p2c;
mod ring_hash;
mod round_robin;
mod weighted;

pub use self::p2c::{P2c, P2cSchedule};
pub use self::ring_hash::{RingHash, RingHashSchedule};
pub use self::round_robin::{RoundRobin, RoundRobinSchedule};
pub use self::weighted::{WeightedRoundRobin, WeightedRoundRobinSchedule};

use std::sync::atomic::{AtomicU64, Ordering};

use crate::load::{EndpointLoad, RequestClock, RttEstimate};
use crate::topology::EndpointMetadata;

/// `PickContext::now_ns` before its clock is read.
const NOT_READ: u64 = u64::MAX;

/// A balancing strategy.
///
/// `pick` runs on every request, concurrently from many threads, through
/// `&self`: keep it lock-free and allocation-free.
pub trait Strategy: Send + Sync + 'static {
    /// Whatever the strategy precomputes for one set of endpoints (use `()` if
    /// nothing).
    type Schedule: Send + Sync + 'static;

    /// Builds the schedule for a new set of eligible endpoints. Called off the
    /// request path, each time the set changes (and every
    /// [`reschedule_every`](Self::reschedule_every)). Here `ctx.now_ns()` is
    /// always the current time on tokio's clock (the clock of load reports and
    /// health), whether or not requests are timed. Latency estimates are
    /// stamped on the [`LatencyClock`](crate::load::LatencyClock), so read
    /// them in `pick`, not here.
    fn schedule<C: Candidates + ?Sized>(
        &self,
        candidates: &C,
        ctx: &PickContext<'_>,
    ) -> Self::Schedule;

    /// Whether `pick` reads latency estimates or the time. When no strategy
    /// and no other part of the balancer needs them, the balancer reads no
    /// clock on the request path (even with the CPU's counter, timing a
    /// request is about a third of its cost through the balancer).
    /// Default: `false`.
    fn uses_latency(&self) -> bool {
        false
    }

    /// Whether `pick` reads the time ([`PickContext::now_ns`]) without
    /// latency estimates: the balancer then has a latency clock, read when
    /// a pick asks for the time, but times no request. P2C by requests in flight does, to
    /// weigh recent failures ([`EndpointLoad::failure_factor`](crate::load::EndpointLoad::failure_factor)).
    /// Default: [`uses_latency`](Self::uses_latency).
    fn reads_clock(&self) -> bool {
        self.uses_latency()
    }

    /// How often the balancer rebuilds the schedule even when the set of
    /// endpoints has not changed, for strategies whose schedule depends on
    /// something that moves (reported load, say). Default: `None`, only on
    /// changes.
    fn reschedule_every(&self) -> Option<std::time::Duration> {
        None
    }

    /// Picks the index of one of `candidates` (never called with an empty
    /// set). Returning `None` or an index out of range fails the request with
    /// [`Error::NoPick`](crate::Error::NoPick).
    fn pick<C: Candidates + ?Sized>(
        &self,
        schedule: &Self::Schedule,
        candidates: &C,
        ctx: &PickContext<'_>,
    ) -> Option<usize>;
}

/// The endpoints a strategy picks among, indexed from 0.
pub trait Candidates {
    /// How many endpoints there are.
    fn len(&self) -> usize;

    /// The live load of endpoint `index` (`index < len()`).
    fn load(&self, index: usize) -> &EndpointLoad;

    /// What discovery says of endpoint `index` (`index < len()`): its zone,
    /// priority, labels (see [`EndpointMetadata`]). The balancer's
    /// candidates answer with each endpoint's own (see
    /// [`Builder::metadata`](crate::balance::Builder::metadata)); the
    /// default answers the defaults.
    fn metadata(&self, index: usize) -> &EndpointMetadata {
        let _ = index;
        EndpointMetadata::default_ref()
    }

    /// A stable identity of endpoint `index`: the same for the same
    /// endpoint in every client of a fleet (built alike) and across
    /// changes of the set, so that a hashing strategy ([`RingHash`]) puts
    /// it at the same places on its ring. The balancer's candidates answer
    /// with the xxHash64 of the endpoint's discovery key (through its
    /// `Hash`); the default answers the index.
    fn identity(&self, index: usize) -> u64 {
        index as u64
    }

    /// True when there are no endpoints.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Candidates for [EndpointLoad] {
    fn len(&self) -> usize {
        <[EndpointLoad]>::len(self)
    }

    fn load(&self, index: usize) -> &EndpointLoad {
        &self[index]
    }
}

/// What a strategy knows besides the loads: the time, the latency-estimate
/// settings, and a source of randomness.
#[derive(Debug)]
pub struct PickContext<'a> {
    /// The time; [`NOT_READ`] until `clock` is read, for a context that
    /// reads it only if the pick asks. Atomic so that a context stays
    /// `Sync`.
    now_ns: AtomicU64,
    clock: Option<&'a RequestClock>,
    rtt: &'a RttEstimate,
    randomness: Randomness<'a>,
    retry: bool,
    attempt: u32,
    hash_key: Option<u64>,
}

/// Where random numbers come from. The thread-local generator is the fast
/// default; a seeded balancer (for deterministic simulation) draws from one
/// shared sequence instead.
#[derive(Debug, Clone, Copy)]
enum Randomness<'a> {
    Thread,
    Seeded(&'a AtomicU64),
}

impl<'a> PickContext<'a> {
    /// A context at `now_ns` (nanoseconds since the balancer was built, on the
    /// clock `now_ns()` describes) drawing from the thread-local random
    /// generator.
    pub fn new(now_ns: u64, rtt: &'a RttEstimate) -> Self {
        Self {
            now_ns: AtomicU64::new(now_ns),
            clock: None,
            rtt,
            randomness: Randomness::Thread,
            retry: false,
            attempt: 0,
            hash_key: None,
        }
    }

    /// A context whose random numbers are a deterministic function of the
    /// sequence `seed`: SplitMix64, whose state `seed` advances by the golden
    /// gamma (`0x9E37_79B9_7F4A_7C15`) per draw. Different states give
    /// independent streams unless they differ by a multiple of that gamma;
    /// the balancer starts from its seed mixed, so that consecutive seeds
    /// are far apart.
    pub fn seeded(now_ns: u64, rtt: &'a RttEstimate, seed: &'a AtomicU64) -> Self {
        Self {
            now_ns: AtomicU64::new(now_ns),
            clock: None,
            rtt,
            randomness: Randomness::Seeded(seed),
            retry: false,
            attempt: 0,
            hash_key: None,
        }
    }

    /// The same context, with its time read from `clock` only if the pick
    /// asks for it: a strategy that reads the time only now and then (P2C
    /// by requests in flight, for an endpoint that has failed) does not pay
    /// a clock read on every request.
    pub(crate) fn reading(mut self, clock: &'a RequestClock) -> Self {
        self.now_ns = AtomicU64::new(NOT_READ);
        self.clock = Some(clock);
        self
    }

    /// The same context for a retry or a hedge (`true`): a pick for a call
    /// that has already been sent to some endpoint (its
    /// [`TriedEndpoints`](crate::request::TriedEndpoints) is not empty).
    pub fn retry(mut self, retry: bool) -> Self {
        self.retry = retry;
        self
    }

    /// The same context for the call's attempt number `attempt` (0 for its
    /// first; see [`attempt`](Self::attempt)); a later one is a
    /// [retry](Self::is_retry).
    pub fn with_attempt(mut self, attempt: u32) -> Self {
        self.attempt = attempt;
        self.retry |= attempt > 0;
        self
    }

    /// How many attempts of this call have picked an endpoint before this
    /// pick (0 for a first attempt): a hashing strategy sends a retry to
    /// the next endpoint on its ring rather than back to the one that
    /// failed. Known, like [`is_retry`](Self::is_retry), when the balancer
    /// reads the hints.
    #[inline]
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The same context for a request with the hash key `key` (see
    /// [`HashKeyLayer`](crate::request::HashKeyLayer)).
    pub fn with_hash_key(mut self, key: Option<u64>) -> Self {
        self.hash_key = key;
        self
    }

    /// The request's hash key, if it has one: hashing strategies
    /// ([`RingHash`]) send the requests of one key to the same endpoint.
    /// The balancer reads it only with
    /// [`CallHints`](crate::balance::CallHints) (see
    /// [`Builder::avoid_tried_endpoints`](crate::balance::Builder::avoid_tried_endpoints)).
    #[inline]
    pub fn hash_key(&self) -> Option<u64> {
        self.hash_key
    }

    /// True when this pick is for a retry or a hedge, not a call's first
    /// attempt. Strategies that go in turn (round robin, weighted round
    /// robin) pick these at random instead of taking a turn: a retry that
    /// took the turn after the endpoint that failed would shift every later
    /// first attempt by one, and an endpoint that fails everything would get
    /// nearly every first attempt. The balancer knows it only when it reads
    /// the hints (see
    /// [`Builder::avoid_tried_endpoints`](crate::balance::Builder::avoid_tried_endpoints)).
    #[inline]
    pub fn is_retry(&self) -> bool {
        self.retry
    }

    /// The current time, in nanoseconds since the balancer started.
    ///
    /// In [`Strategy::pick`] it is read from the
    /// [`LatencyClock`](crate::load::LatencyClock), the clock of the latency
    /// estimates (so it is real time under tokio's paused time unless the
    /// balancer times requests with tokio's clock), and it is 0 when the
    /// strategy reads neither latency nor time (see
    /// [`Strategy::uses_latency`] and [`Strategy::reads_clock`]). In
    /// [`Strategy::schedule`] it is always tokio's time, the clock of load
    /// reports and health.
    #[inline]
    pub fn now_ns(&self) -> u64 {
        // Relaxed: a context serves one pick (a plain load and store).
        let now = self.now_ns.load(Ordering::Relaxed);
        match self.clock {
            Some(clock) if now == NOT_READ => {
                let now = clock.now_ns();
                self.now_ns.store(now, Ordering::Relaxed);
                now
            }
            _ => now,
        }
    }

    /// The latency-estimate settings.
    #[inline]
    pub fn rtt(&self) -> &RttEstimate {
        self.rtt
    }

    /// The Peak-EWMA cost of `load` now: its latency estimate x (requests in
    /// flight + 1), as [`P2c::peak_ewma`] weighs an endpoint (before its
    /// new-endpoint and probe rules). For a custom strategy's `pick`, whose
    /// context is on the latency clock (see
    /// [`EndpointLoad::rtt_estimate_ns`]).
    #[inline]
    pub fn peak_ewma_cost(&self, load: &EndpointLoad) -> f64 {
        let rtt = load.rtt_estimate_ns(self.now_ns(), self.rtt);
        // In flight fits 24 bits: a signed conversion, one instruction.
        rtt * (f64::from(load.in_flight() as u32) + 1.0)
    }

    /// An index below `n` for the balancer's level and zone draws: the
    /// same for every request of one hash key (mixed with `salt`, one per
    /// draw), so that a key stays in one priority level and one zone while
    /// their shares do not change; random for a request without a key.
    #[inline]
    pub(crate) fn index_by_key(&self, n: usize, salt: u64) -> usize {
        match self.hash_key {
            Some(key) => below(mix64(key ^ salt), n),
            None => self.random_index(n),
        }
    }

    /// A uniformly random number.
    #[inline]
    pub fn random_u64(&self) -> u64 {
        match self.randomness {
            Randomness::Thread => fastrand::u64(..),
            Randomness::Seeded(seed) => next_seeded(seed),
        }
    }

    /// A uniformly random index below `n` (0 when `n` is 0).
    #[inline]
    pub fn random_index(&self, n: usize) -> usize {
        if n < 2 {
            return 0;
        }
        match self.randomness {
            Randomness::Thread => fastrand::usize(..n),
            Randomness::Seeded(seed) => below(next_seeded(seed), n),
        }
    }

    /// Two distinct uniformly random indices below `n` (`(0, 0)` when `n < 2`).
    #[inline]
    pub fn random_pair(&self, n: usize) -> (usize, usize) {
        if n < 2 {
            return (0, 0);
        }
        let (a, b) = match self.randomness {
            Randomness::Thread => (fastrand::usize(..n), fastrand::usize(..n - 1)),
            Randomness::Seeded(seed) => {
                (below(next_seeded(seed), n), below(next_seeded(seed), n - 1))
            }
        };
        (a, if b >= a { b + 1 } else { b })
    }

    /// True with probability `p`: always when `p >= 1`, without a draw.
    pub(crate) fn chance(&self, p: f64) -> bool {
        p >= 1.0 || (self.random_u64() as f64) < p * u64::MAX as f64
    }
}

/// SplitMix64's increment: `2^64` over the golden ratio, odd.
const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's output function (Steele, Lea and Flood, 2014): a bijection
/// in which every output bit depends on every input bit, so that states one
/// apart give unrelated numbers.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The starting state of the seeded sequence for `seed`. Mixed, so that
/// seeds 1, 2, 3 ... start at unrelated points of the SplitMix64 cycle:
/// unmixed, seed `s + 1` would be the stream of `s` one draw ahead, and
/// simulated clients seeded in a row would herd.
pub(crate) fn seeded_state(seed: u64) -> AtomicU64 {
    AtomicU64::new(mix64(seed))
}

/// The next number of a seeded sequence: one atomic add (so threads sharing
/// the sequence never draw the same number) and a mix.
pub(crate) fn next_seeded(state: &AtomicU64) -> u64 {
    mix64(
        state
            .fetch_add(GAMMA, Ordering::Relaxed)
            .wrapping_add(GAMMA),
    )
}

/// `random` mapped onto `0..n` by a widening multiply (Lemire's method
/// without the rejection step: the bias is below `n / 2^64`).
fn below(random: u64, n: usize) -> usize {
    ((u128::from(random) * n as u128) >> 64) as usize
}

/// Where the candidates stand in [slow start](crate::health::SlowStart),
/// read once per schedule so that picks read no factor while nobody ramps.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ramp {
    /// The factor of the endpoint furthest along: every other endpoint keeps
    /// its turn with the probability of its factor relative to this one, so
    /// a set that ramps together is not slowed down at all.
    max_factor: f64,
}

/// Turns an endpoint in slow start may pass on before one is taken anyway:
/// picks stay O(1) even when factors are near 0.
pub(crate) const MAX_PASSES: usize = 8;

impl Ramp {
    /// `None` when no candidate is in slow start.
    pub(crate) fn of<C: Candidates + ?Sized>(candidates: &C) -> Option<Ramp> {
        let mut ramping = false;
        let mut max_factor: f64 = 0.0;
        for i in 0..candidates.len() {
            let factor = candidates.load(i).slow_start_factor();
            ramping |= factor < 1.0;
            max_factor = max_factor.max(factor);
        }
        ramping.then_some(Ramp { max_factor })
    }

    /// Whether an endpoint with `factor` keeps the turn it drew.
    pub(crate) fn keeps(&self, factor: f64, ctx: &PickContext<'_>) -> bool {
        let chance = if self.max_factor > 0.0 {
            factor / self.max_factor
        } else {
            1.0
        };
        ctx.chance(chance)
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    use super::*;

    pub(crate) fn loads(n: usize) -> Vec<EndpointLoad> {
        (0..n)
            .map(|_| EndpointLoad::new(0, &RttEstimate::DEFAULT))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn level_and_zone_draws_follow_a_requests_hash_key() {
        let rtt = RttEstimate::DEFAULT;
        let keyed = |key| PickContext::new(0, &rtt).with_hash_key(Some(key));
        // The same key draws the same, whichever context: it stays put.
        for key in [1, 42, u64::MAX] {
            let draw = keyed(key).index_by_key(100, 7);
            assert!((0..10).all(|_| keyed(key).index_by_key(100, 7) == draw));
        }
        // The level and the zone draws are independent (their salts differ).
        let apart = (0..100u64)
            .filter(|&key| keyed(key).index_by_key(100, 1) != keyed(key).index_by_key(100, 2))
            .count();
        assert!(apart > 80, "{apart} of 100 keys draw differently");
        // Keys spread over the whole range.
        let mut seen = [false; 10];
        for key in 0..1_000u64 {
            seen[keyed(key).index_by_key(10, 7)] = true;
        }
        assert!(seen.iter().all(|&s| s));
    }

    #[test]
    fn peak_ewma_cost_is_the_estimate_times_in_flight_plus_one() {
        let rtt = RttEstimate::DEFAULT;
        let load = EndpointLoad::new(0, &rtt);
        load.settle_rtt(2_000_000, 1_000, &rtt);
        load.set_in_flight(2);
        assert_eq!(PickContext::new(1_000, &rtt).peak_ewma_cost(&load), 6e6);
    }

    #[test]
    fn random_pair_is_always_two_distinct_indices_in_range() {
        let rtt = RttEstimate::DEFAULT;
        let ctx = PickContext::new(0, &rtt);
        for n in 2..20 {
            for _ in 0..500 {
                let (a, b) = ctx.random_pair(n);
                assert!(a < n && b < n && a != b, "n={n} a={a} b={b}");
            }
        }
    }

    #[test]
    fn seeded_context_repeats_its_sequence() {
        let rtt = RttEstimate::DEFAULT;
        let draw = |seed: u64| {
            let state = AtomicU64::new(seed);
            let ctx = PickContext::seeded(0, &rtt, &state);
            (0..32).map(|_| ctx.random_index(1000)).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }

    #[test]
    fn consecutive_seeds_give_streams_that_are_not_shifts_of_each_other() {
        let rtt = RttEstimate::DEFAULT;
        let draw = |seed: u64| {
            let state = seeded_state(seed);
            let ctx = PickContext::seeded(0, &rtt, &state);
            (0..200).map(|_| ctx.random_index(10)).collect::<Vec<_>>()
        };
        let streams: Vec<Vec<usize>> = (1..=20).map(draw).collect();
        for (i, a) in streams.iter().enumerate() {
            for b in &streams[i + 1..] {
                for shift in 0..=3 {
                    let agree = a.iter().zip(&b[shift..]).filter(|(x, y)| x == y).count();
                    // Independent streams agree on about a tenth.
                    assert!(
                        agree < 50,
                        "{agree} of {} agree at shift {shift}",
                        200 - shift
                    );
                }
            }
        }
    }
}
