use std::time::Duration;

use super::weighted::{alias_pick, alias_table, Column};
use super::{Candidates, PickContext, Ramp, Strategy};
use crate::load::EndpointLoad;

/// How often P2C Peak-EWMA recomputes its candidates' typical estimate
/// (besides every change of the set).
const TYPICAL_EVERY: Duration = Duration::from_secs(1);

/// The median of the latency estimates of the candidates that have one,
/// each as of its last sample; `NaN` when none has. The median, not the
/// mean: one slow endpoint among fast ones must not make newcomers look
/// slow. O(n) (a selection), on the driver at each schedule.
fn typical_rtt_ns<C: Candidates + ?Sized>(candidates: &C) -> f64 {
    let mut estimates: Vec<f64> = (0..candidates.len())
        .filter_map(|i| candidates.load(i).last_rtt_estimate_ns())
        .filter(|rtt| rtt.is_finite())
        .collect();
    if estimates.is_empty() {
        return f64::NAN;
    }
    let middle = (estimates.len() - 1) / 2;
    let (_, median, _) = estimates.select_nth_unstable_by(middle, f64::total_cmp);
    *median
}

/// The mean of the candidates' requests in flight; 0 without candidates.
/// One reading, on the driver at each schedule (every second with
/// Peak-EWMA): summed over the candidates it moves far less than any one
/// endpoint's count.
fn typical_in_flight<C: Candidates + ?Sized>(candidates: &C) -> f64 {
    let n = candidates.len();
    if n == 0 {
        return 0.0;
    }
    let total: usize = (0..n).map(|i| candidates.load(i).in_flight()).sum();
    total as f64 / n as f64
}

/// The two candidates' [failure factors](crate::load::EndpointLoad::failure_factor):
/// 1 and 1, from one load each, when neither has failed (nearly every
/// pick), so the clock is read only for an endpoint that has.
// `always`: as a plain `#[inline]` helper it was left a call, which cost a
// least-requests pick 0.8 ns in `benches/balance.rs` (7.6 -> 8.4 ns).
#[inline(always)]
fn failure_factors(a: &EndpointLoad, b: &EndpointLoad, ctx: &PickContext<'_>) -> (f64, f64) {
    if a.has_failed() || b.has_failed() {
        (
            a.failure_factor(ctx.now_ns()),
            b.failure_factor(ctx.now_ns()),
        )
    } else {
        (1.0, 1.0)
    }
}

/// How far apart two Peak-EWMA estimates must be before P2C takes them
/// for a real difference; closer ones are equal, and the requests in flight
/// decide (then the draw). Identical servers measure a little differently
/// (scheduling, a GC, the connect in a first request), and an estimate is
/// a running peak, so it keeps the worst of that noise for seconds.
/// Compared strictly, every pair goes to the lower estimate, and a single
/// sequential caller's requests are shared out by rank (40, 30, 20, 10 and
/// 0 % over five equal endpoints), whoever happened to measure a few
/// percent slower getting nothing until its estimate is stale. A real
/// difference (a node 10x slower, a stall, 5 ms against 7 ms) is well
/// outside the band; under concurrency a slower endpoint inside it still
/// holds its requests longer and so loses on in-flight.
const ESTIMATE_NOISE: f64 = 1.25;

/// With unequal static weights, how far apart two latency estimates must be
/// before P2C Peak-EWMA lets them decide. An estimate is a running peak, so
/// an endpoint sampled three times as often (its weight is 3) shows a higher
/// one for the same server: compared strictly, the heavier endpoint would
/// lose nearly every pair it shares with a lighter one, and with weights 3:1
/// and one caller the shares came out near 55:45. Within the band the
/// requests in flight per unit of weight decide, which under concurrency
/// still sees a slower endpoint (its requests stay in flight longer).
const LATENCY_BAND: f64 = 2.0;

/// Power of two choices: two endpoints at random, the less loaded one wins;
/// a winner in [slow start](crate::health::SlowStart) keeps its win with the
/// probability of its factor.
///
/// Two load signals are available:
/// - [`P2c::least_requests`]: requests in flight;
/// - [`P2c::peak_ewma`]: Peak-EWMA latency x (in flight + 1), as in Finagle,
///   Linkerd and `tower::load::PeakEwma`, with the requests in flight counted
///   in units of the typical endpoint's (see below). The estimate's default RTT and decay
///   are set on the balancer's builder
///   ([`Builder::rtt_estimate`](crate::balance::Builder::rtt_estimate)),
///   because every strategy and [`Balancer::endpoints`](crate::Balancer::endpoints)
///   share it.
///
/// # Failures cost (both)
///
/// An endpoint's load counts [`failure_factor`](crate::load::EndpointLoad::failure_factor)
/// times: 1 plus its failures of the last second or so, each decaying by
/// `e` a second. With Peak-EWMA a failing endpoint's latency is also taken
/// as no lower than the typical estimate of its peers: a failure that came
/// back fast says nothing about how fast the endpoint serves. So an
/// endpoint that fails every request (a 503 in a millisecond, a refused
/// connection) is not preferred for looking fast; it is picked only while
/// its rivals have as many requests in flight as it has failed lately.
///
/// # Estimates within 25 % are equal (Peak-EWMA)
///
/// Unlike Finagle's, Linkerd's and tower's, this comparison takes two
/// latency estimates less than 25 % apart for noise: the requests in flight
/// decide between them, and on a tie the draw. Compared strictly, equal
/// servers get a single caller's requests by the rank of their last noisy
/// peak (40/30/20/10/0 % over five), and a new or re-probed endpoint that
/// measured a little slow is out again. Estimates further apart compare as
/// latency x (in flight + 1), as everywhere, with one difference below.
///
/// # Requests in flight in units of the typical endpoint's (Peak-EWMA)
///
/// `in flight + 1` weighs an endpoint as if it served one request at a
/// time. Servers serve many at once, and a cluster under load carries
/// several each: with four in flight everywhere, every endpoint costs five
/// times its latency, and an idle endpoint five times slower than the
/// rest costs no more and wins its pairs. So the latency comparison counts
/// `1 + in flight / m`, where `m` is the candidates' mean number of
/// requests in flight (at least 1; read with each schedule, every second):
/// equally fast endpoints are ordered by their requests in flight as
/// before, and below one request per endpoint nothing changes. In the
/// shootout's `cluster-slow-node` (10 backends of 8 slots at half load,
/// one 10x slower) it took the p99.9 from 1.69x the healthy cluster's to
/// 1.05x.
///
/// # New and recovered endpoints (Peak-EWMA)
///
/// An endpoint that has not answered twice yet (the first answer usually
/// paid for connecting, so the second replaces it) is weighed at the *typical*
/// estimate of the others: the median of their latency estimates, which
/// the balancer's driver recomputes whenever the set changes and every
/// second. So a new endpoint competes level with its peers from its first
/// pick and gets its share within a few requests, even from one sequential
/// caller, instead of sitting at the 30 ms default prior while its peers
/// measure 1 ms (which kept it out for about ln(30) x 10 s = 34 s). Slow
/// start, when on, still ramps its share. At start-up, until the driver
/// first sees an estimate, there is no typical value, and an endpoint
/// not yet measured is compared by requests in flight alone: the first
/// endpoints to answer do not keep a sequential caller's requests while the
/// others sit at the 30 ms default prior.
///
/// An endpoint whose estimate is *stale* (no sample for
/// [`RttEstimate::probe_after`](crate::load::RttEstimate::probe_after),
/// by default the decay, 10 s) and above the typical estimate is weighed at the typical
/// value while nothing is in flight to it: it wins its next pick or two,
/// gets one request (a probe), and that request's latency replaces the
/// stale estimate. Once the probe is in flight it no longer qualifies, and
/// its answer makes the estimate fresh again, so an endpoint that stays
/// slow gets at most one request per period per balancer, and one that
/// recovered is back in rotation after its probe, instead of after the
/// decay has brought its estimate down (ln(100) x 10 s = 46 s for one that
/// answered 100 times slower than its peers). The cost on the request path is one more load and
/// compare per candidate, on the cache line the pick already reads.
///
/// # Static weights
///
/// With equal weights (the default) the two candidates are distinct and
/// drawn uniformly. When discovery gives unequal
/// [static weights](crate::balance::Builder::static_weights), each candidate is drawn
/// in proportion to its weight instead, independently (from an alias table
/// built off the request path whenever the set changes, so a pick stays two
/// random numbers and two table loads: lock-free, allocation-free, O(1)),
/// and they are compared by load *per unit of weight*: in flight / weight,
/// or latency x (in flight / weight + 1). Both halves are needed:
/// - drawn in proportion, and compared by anything that does not favour one
///   weight over another, endpoint `i` gets `p_i^2 + sum_j p_i p_j = p_i` of
///   the picks, its weight's share; so when the comparison cannot tell them
///   apart (a single sequential caller: nothing in flight, ties) the shares
///   still follow the weights;
/// - under concurrency the comparison per unit of weight holds each
///   endpoint's in-flight count in proportion to its weight, which with
///   equal latencies is the same proportion of the requests.
///
/// Dividing the load by the weight alone, as this strategy did before,
/// is not proportional: idle, every endpoint's load is 0 (or, counting the
/// request about to be sent, 1 / weight), so the heavier endpoint won every
/// comparison and with weights 3:1 the lighter one got nothing. Envoy's
/// least-request balancer avoids that differently: when weights differ it
/// leaves P2C for an earliest-deadline-first schedule over weight /
/// (in flight + 1), which needs a shared, locked schedule per pick. The
/// alias table keeps picks as cheap as with equal weights.
///
/// ```
/// use tower_lb::strategy::P2c;
/// let by_latency = P2c::peak_ewma();
/// let by_requests = P2c::least_requests();
/// # let _ = (by_latency, by_requests);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct P2c {
    cost: Cost,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cost {
    InFlight,
    PeakEwma,
}

impl P2c {
    /// Compare candidates by requests in flight.
    pub fn least_requests() -> Self {
        Self {
            cost: Cost::InFlight,
        }
    }

    /// Compare candidates by Peak-EWMA latency x (in flight + 1).
    pub fn peak_ewma() -> Self {
        Self {
            cost: Cost::PeakEwma,
        }
    }

    /// Whether `b` is less loaded than `a`, with equal weights: in flight,
    /// or latency x (in flight + 1).
    ///
    /// The band test repeats `prefers_b_weighted`'s on purpose: sharing it
    /// through a helper (even `#[inline(always)]`) cost every pick 0.3 –
    /// 0.5 ns in `benches/balance.rs` (`pick/p2c-*`, 6.3 -> 6.8 ns for
    /// least-requests, 9.0 -> 9.3 ns for Peak-EWMA).
    fn prefers_b<C: Candidates + ?Sized>(
        &self,
        candidates: &C,
        a: usize,
        b: usize,
        schedule: &P2cSchedule,
        ctx: &PickContext<'_>,
    ) -> bool {
        let (a, b) = (candidates.load(a), candidates.load(b));
        let (in_flight_a, in_flight_b) = (a.in_flight(), b.in_flight());
        let (failing_a, failing_b) = failure_factors(a, b, ctx);
        // In flight fits 24 bits: a signed conversion, one instruction.
        let depth = |in_flight: usize| f64::from(in_flight as u32) + 1.0;
        if self.cost == Cost::PeakEwma {
            let (now, rtt, typical) = (ctx.now_ns(), ctx.rtt(), schedule.typical_rtt_ns);
            let rtt_a = a.rtt_for_pick(now, rtt, typical, in_flight_a == 0, failing_a);
            let rtt_b = b.rtt_for_pick(now, rtt, typical, in_flight_b == 0, failing_b);
            // False with a `NaN` (no latency): in flight decides.
            if rtt_a > rtt_b * ESTIMATE_NOISE || rtt_b > rtt_a * ESTIMATE_NOISE {
                // Requests in flight counted in units of the typical
                // endpoint's (see `P2cSchedule::in_flight_scale`).
                let scale = schedule.in_flight_scale;
                let depth = |in_flight: usize| f64::from(in_flight as u32) * scale + 1.0;
                return rtt_b * depth(in_flight_b) < rtt_a * depth(in_flight_a);
            }
        }
        // By requests in flight (within the band, or no latency yet), still
        // weighed by failures; without any, the counts themselves (an
        // integer compare: the float one cost least-requests picks 1 ns).
        if failing_a == 1.0 && failing_b == 1.0 {
            return in_flight_b < in_flight_a;
        }
        depth(in_flight_b) * failing_b < depth(in_flight_a) * failing_a
    }

    /// Whether `b` is less loaded than `a` per unit of weight: requests in
    /// flight per unit of weight, `(in flight + weight) / weight`, times the
    /// latency estimate for Peak-EWMA when the two estimates are more than
    /// [`LATENCY_BAND`] apart. Cross-multiplied rather than divided: a
    /// division is most of a pick's cost. Ties go to `a`, which was drawn in
    /// proportion to its weight.
    fn prefers_b_weighted<C: Candidates + ?Sized>(
        &self,
        candidates: &C,
        a: usize,
        b: usize,
        schedule: &P2cSchedule,
        ctx: &PickContext<'_>,
    ) -> bool {
        let (a, b) = (candidates.load(a), candidates.load(b));
        let (weight_a, weight_b) = (a.static_weight(), b.static_weight());
        let (failing_a, failing_b) = failure_factors(a, b, ctx);
        // Scaled by both weights: `queue_a` is `(in flight + w_a) / w_a`
        // times `w_a w_b`.
        let queue_a = (f64::from(a.in_flight() as u32) + weight_a) * weight_b;
        let queue_b = (f64::from(b.in_flight() as u32) + weight_b) * weight_a;
        if self.cost == Cost::PeakEwma {
            let (now, rtt, typical) = (ctx.now_ns(), ctx.rtt(), schedule.typical_rtt_ns);
            let rtt_a = a.rtt_for_pick(now, rtt, typical, a.in_flight() == 0, failing_a);
            let rtt_b = b.rtt_for_pick(now, rtt, typical, b.in_flight() == 0, failing_b);
            if rtt_a > rtt_b * LATENCY_BAND || rtt_b > rtt_a * LATENCY_BAND {
                // As in `prefers_b`: in flight in units of the typical
                // endpoint's.
                let scale = schedule.in_flight_scale;
                let queue_a = (f64::from(a.in_flight() as u32) * scale + weight_a) * weight_b;
                let queue_b = (f64::from(b.in_flight() as u32) * scale + weight_b) * weight_a;
                return rtt_b * queue_b < rtt_a * queue_a;
            }
        }
        queue_b * failing_b < queue_a * failing_a
    }

    /// The two candidates, and whether `b` wins.
    fn draw<C: Candidates + ?Sized>(
        &self,
        schedule: &P2cSchedule,
        candidates: &C,
        n: usize,
        ctx: &PickContext<'_>,
    ) -> (usize, usize, bool) {
        if schedule.weights.len() == n {
            let a = alias_pick(&schedule.weights, ctx.random_u64());
            let b = alias_pick(&schedule.weights, ctx.random_u64());
            let b_wins = a != b && self.prefers_b_weighted(candidates, a, b, schedule, ctx);
            return (a, b, b_wins);
        }
        let (a, b) = ctx.random_pair(n);
        (a, b, self.prefers_b(candidates, a, b, schedule, ctx))
    }
}

impl Default for P2c {
    /// [`P2c::peak_ewma`].
    fn default() -> Self {
        Self::peak_ewma()
    }
}

/// What P2C precomputes: whether any endpoint is in slow start, and with
/// unequal static weights the table candidates are drawn from.
#[derive(Debug, Clone)]
pub struct P2cSchedule {
    ramping: bool,
    /// An alias table over the static weights; empty when they are all
    /// equal (uniform draws).
    weights: Box<[Column]>,
    /// The median of the candidates' latency estimates (each as of its last
    /// sample), `NaN` when none has one or the cost is not Peak-EWMA: what
    /// a new endpoint is weighed at until it answers, and a stale one while
    /// it waits for a probe.
    typical_rtt_ns: f64,
    /// `1 / max(1, requests in flight on the typical endpoint)` (their mean
    /// over the candidates when the schedule was made): Peak-EWMA weighs a
    /// candidate's latency by `1 + in flight x this`, its queue in units of
    /// the typical endpoint's. An endpoint serves several requests at once,
    /// so its latency grows with its queue only beyond that; weighed by
    /// `in flight + 1` as if it served one at a time, every busy endpoint
    /// of a cluster loaded well beyond one request each costs several times
    /// its latency, and an idle endpoint ten times slower wins pairs
    /// against it (the shootout's `cluster-slow-node`: it kept one request
    /// in flight, 0.3 % of the traffic, and the p99.9). Below one request
    /// each, as before: `in flight + 1`.
    in_flight_scale: f64,
}

impl Strategy for P2c {
    type Schedule = P2cSchedule;

    fn schedule<C: Candidates + ?Sized>(&self, candidates: &C, _: &PickContext<'_>) -> P2cSchedule {
        let weights: Vec<f64> = (0..candidates.len())
            .map(|i| candidates.load(i).static_weight())
            .collect();
        let (typical_rtt_ns, in_flight_scale) = match self.cost {
            Cost::InFlight => (f64::NAN, 1.0),
            Cost::PeakEwma => (
                typical_rtt_ns(candidates),
                1.0 / typical_in_flight(candidates).max(1.0),
            ),
        };
        P2cSchedule {
            ramping: Ramp::of(candidates).is_some(),
            // Empty when the weights are equal (to the table's precision).
            weights: alias_table(&weights),
            typical_rtt_ns,
            in_flight_scale,
        }
    }

    fn uses_latency(&self) -> bool {
        self.cost == Cost::PeakEwma
    }

    /// Both costs weigh recent failures, which age by the clock (read only
    /// in a pick that meets an endpoint that has failed).
    fn reads_clock(&self) -> bool {
        true
    }

    /// Peak-EWMA keeps its typical estimate current: new endpoints start
    /// from it, and stale ones are probed at it.
    fn reschedule_every(&self) -> Option<Duration> {
        (self.cost == Cost::PeakEwma).then_some(TYPICAL_EVERY)
    }

    fn pick<C: Candidates + ?Sized>(
        &self,
        schedule: &P2cSchedule,
        candidates: &C,
        ctx: &PickContext<'_>,
    ) -> Option<usize> {
        match candidates.len() {
            0 => None,
            1 => Some(0),
            n => {
                let (a, b, b_wins) = self.draw(schedule, candidates, n, ctx);
                let (winner, loser) = if b_wins { (b, a) } else { (a, b) };
                if !schedule.ramping {
                    return Some(winner);
                }
                // A winner further behind in slow start than the loser keeps
                // its win only with the ratio of their factors, so its share
                // ramps whatever the load (a cost penalty alone would give it
                // nothing while every endpoint is idle), and two endpoints
                // that ramp together compare by load alone.
                let won = candidates.load(winner).slow_start_factor();
                let lost = candidates.load(loser).slow_start_factor();
                if won >= lost || ctx.chance(won / lost) {
                    Some(winner)
                } else {
                    Some(loser)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::{EndpointLoad, RttEstimate};
    use crate::strategy::test_support::loads;

    #[test]
    fn never_picks_the_more_loaded_of_two_candidates() {
        let rtt = RttEstimate::DEFAULT;
        let ctx = PickContext::new(0, &rtt);
        let endpoints = loads(2);
        endpoints[0].set_in_flight(3);
        for p2c in [P2c::least_requests(), P2c::peak_ewma()] {
            for _ in 0..1_000 {
                assert_eq!(
                    p2c.pick(&p2c.schedule(&endpoints[..], &ctx), &endpoints[..], &ctx),
                    Some(1)
                );
            }
        }
    }

    #[test]
    fn never_picks_the_most_loaded_endpoint() {
        // With n endpoints, the unique maximum loses every pair it is part of.
        let rtt = RttEstimate::DEFAULT;
        let ctx = PickContext::new(0, &rtt);
        let endpoints = loads(10);
        for (i, e) in endpoints.iter().enumerate() {
            e.set_in_flight(i % 4);
        }
        endpoints[6].set_in_flight(9);
        for p2c in [P2c::least_requests(), P2c::peak_ewma()] {
            for _ in 0..10_000 {
                assert_ne!(
                    p2c.pick(&p2c.schedule(&endpoints[..], &ctx), &endpoints[..], &ctx),
                    Some(6)
                );
            }
        }
    }

    /// Endpoints answering in 10 ms with `busy` requests in flight each,
    /// and one last endpoint answering in `slow_ms`, idle.
    fn busy_cluster_and_an_idle_slow_one(
        rtt: &RttEstimate,
        busy: usize,
        slow_ms: u64,
    ) -> Vec<EndpointLoad> {
        let endpoints = loads(5);
        for fast in &endpoints[..4] {
            fast.settle_rtt(10_000_000, 1_000, rtt);
            fast.set_in_flight(busy);
        }
        endpoints[4].settle_rtt(slow_ms * 1_000_000, 1_000, rtt);
        endpoints
    }

    #[test]
    fn in_a_cluster_busy_beyond_one_request_each_an_idle_endpoint_five_times_slower_loses() {
        let rtt = RttEstimate::DEFAULT;
        let ctx = PickContext::new(1_000, &rtt);
        let p2c = P2c::peak_ewma();
        // Five in flight each (the typical count: 4 x 5 / 5 = 4): 10 ms x
        // (1 + 5 / 4) = 22.5 against 50 ms x 1. Counted one at a time it
        // would be 10 x 6 = 60 against 50, and the slow one would win.
        let endpoints = busy_cluster_and_an_idle_slow_one(&rtt, 5, 50);
        let schedule = p2c.schedule(&endpoints[..], &ctx);
        assert!(!p2c.prefers_b(&endpoints[..], 0, 4, &schedule, &ctx));
        assert!(p2c.prefers_b(&endpoints[..], 4, 0, &schedule, &ctx));
    }

    #[test]
    fn below_one_request_each_in_flight_counts_one_at_a_time_as_before() {
        let rtt = RttEstimate::DEFAULT;
        let ctx = PickContext::new(1_000, &rtt);
        let p2c = P2c::peak_ewma();
        // One in flight on four of five: typical 0.8, counted as 1. 10 ms
        // x 2 = 20 against 15 ms x 1: the idle one wins, as it always did.
        let endpoints = busy_cluster_and_an_idle_slow_one(&rtt, 1, 15);
        let schedule = p2c.schedule(&endpoints[..], &ctx);
        assert!(p2c.prefers_b(&endpoints[..], 0, 4, &schedule, &ctx));
    }

    /// Three endpoints: the first answers in 1 ms, the others in 5 ms with
    /// two requests in flight each.
    fn a_fast_one_beside_two_busy_ones(rtt: &RttEstimate) -> Vec<EndpointLoad> {
        let endpoints = loads(3);
        endpoints[0].settle_rtt(1_000_000, 1_000, rtt);
        for busy in &endpoints[1..] {
            busy.settle_rtt(5_000_000, 1_000, rtt);
            busy.set_in_flight(2);
        }
        endpoints
    }

    #[test]
    fn an_endpoint_that_failed_lately_loses_the_pairs_its_fast_failures_would_win() {
        let rtt = RttEstimate::DEFAULT;
        // Its 503s came back in 1 ms.
        let endpoints = a_fast_one_beside_two_busy_ones(&rtt);
        for _ in 0..4 {
            endpoints[0].record_failure_cost(1_000, 1.0);
        }
        let ctx = PickContext::new(1_000, &rtt);
        for p2c in [P2c::least_requests(), P2c::peak_ewma()] {
            let schedule = p2c.schedule(&endpoints[..], &ctx);
            for _ in 0..1_000 {
                assert_ne!(
                    p2c.pick(&schedule, &endpoints[..], &ctx),
                    Some(0),
                    "{p2c:?}"
                );
            }
        }
    }

    /// How often of 10,000 picks `p2c` picks endpoint 0.
    fn picks_of_the_first(p2c: P2c, endpoints: &[EndpointLoad], rtt: &RttEstimate) -> usize {
        let ctx = PickContext::new(1_000, rtt);
        let schedule = p2c.schedule(endpoints, &ctx);
        (0..10_000)
            .filter(|_| p2c.pick(&schedule, endpoints, &ctx) == Some(0))
            .count()
    }

    #[test]
    fn a_failing_endpoint_is_weighed_no_faster_than_its_peers() {
        let rtt = RttEstimate::DEFAULT;
        let endpoints = loads(3);
        // Its failures came back in 0.5 ms: times its factor (4), 2 ms,
        // still faster than its busy peers (5 ms, two in flight) if taken
        // at its own estimate.
        endpoints[0].settle_rtt(500_000, 1_000, &rtt);
        for busy in &endpoints[1..] {
            busy.settle_rtt(5_000_000, 1_000, &rtt);
            busy.set_in_flight(2);
        }
        for _ in 0..3 {
            endpoints[0].record_failure_cost(1_000, 1.0);
        }
        assert_eq!(picks_of_the_first(P2c::peak_ewma(), &endpoints, &rtt), 0);
    }

    #[test]
    fn before_any_latency_a_failing_endpoint_still_loses_on_requests_in_flight() {
        let rtt = RttEstimate::DEFAULT;
        // Start-up: nobody measured, no typical estimate.
        let endpoints = loads(3);
        for busy in &endpoints[1..] {
            busy.set_in_flight(2);
        }
        for _ in 0..4 {
            endpoints[0].record_failure_cost(1_000, 1.0);
        }
        for p2c in [P2c::least_requests(), P2c::peak_ewma()] {
            assert_eq!(picks_of_the_first(p2c, &endpoints, &rtt), 0, "{p2c:?}");
        }
    }

    #[test]
    fn with_static_weights_a_failing_endpoint_loses_the_pairs_it_is_drawn_in() {
        let rtt = RttEstimate::DEFAULT;
        let weighted = |load: EndpointLoad| {
            load.with_static_weight(2.0)
                .unwrap_or_else(|e| panic!("{e}"))
        };
        let endpoints: Vec<EndpointLoad> = a_fast_one_beside_two_busy_ones(&rtt)
            .into_iter()
            .enumerate()
            .map(|(i, load)| if i == 0 { load } else { weighted(load) })
            .collect();
        for _ in 0..4 {
            endpoints[0].record_failure_cost(1_000, 1.0);
        }
        for p2c in [P2c::least_requests(), P2c::peak_ewma()] {
            // Drawn twice (1 in 25) it is its own rival; in every other
            // pair it loses. Without its failures it would win them: 36 %.
            let picks = picks_of_the_first(p2c, &endpoints, &rtt);
            assert!(picks < 700, "{p2c:?}: {picks}");
        }
    }

    #[test]
    fn an_idle_endpoint_that_failed_once_shares_picks_again_within_three_seconds() {
        let rtt = RttEstimate::DEFAULT;
        for p2c in [P2c::least_requests(), P2c::peak_ewma()] {
            let endpoints = loads(3);
            endpoints[0].record_failure_cost(0, 1.0);
            // Nothing in flight anywhere: every pair it is in is a tie on
            // load, which its failure decides while the failure counts.
            let picks_at = |now_ns: u64| {
                let ctx = PickContext::new(now_ns, &rtt);
                let schedule = p2c.schedule(&endpoints[..], &ctx);
                (0..3_000)
                    .filter(|_| p2c.pick(&schedule, &endpoints[..], &ctx) == Some(0))
                    .count()
            };
            assert_eq!(picks_at(2_000_000_000), 0, "{p2c:?} after 2 s");
            let picks = picks_at(2_400_000_000);
            assert!(
                (700..=1_300).contains(&picks),
                "{p2c:?} after 2.4 s: {picks}"
            );
        }
    }

    #[test]
    fn without_failures_the_same_endpoint_wins_those_pairs() {
        let rtt = RttEstimate::DEFAULT;
        let endpoints = a_fast_one_beside_two_busy_ones(&rtt);
        let ctx = PickContext::new(1_000, &rtt);
        for p2c in [P2c::least_requests(), P2c::peak_ewma()] {
            let schedule = p2c.schedule(&endpoints[..], &ctx);
            let picks = (0..3_000)
                .filter(|_| p2c.pick(&schedule, &endpoints[..], &ctx) == Some(0))
                .count();
            // Every pair it is drawn in: two thirds of the picks.
            assert!((1_800..=2_200).contains(&picks), "{p2c:?}: {picks}");
        }
    }

    /// Idle endpoints with the given latency estimates (ms); P2C Peak-EWMA
    /// picks among them 100,000 times. Returns each one's picks.
    fn idle_picks(estimates_ms: &[f64]) -> Vec<usize> {
        let rtt = RttEstimate::DEFAULT;
        let endpoints = loads(estimates_ms.len());
        for (e, ms) in endpoints.iter().zip(estimates_ms) {
            e.settle_rtt((ms * 1e6) as u64, 1_000, &rtt);
        }
        let ctx = PickContext::new(1_000, &rtt);
        let p2c = P2c::peak_ewma();
        let schedule = p2c.schedule(&endpoints[..], &ctx);
        let mut picks = vec![0; endpoints.len()];
        for _ in 0..100_000 {
            if let Some(i) = p2c.pick(&schedule, &endpoints[..], &ctx) {
                picks[i] += 1;
            }
        }
        picks
    }

    #[test]
    fn estimates_within_a_quarter_of_each_other_share_idle_picks_evenly() {
        // Compared strictly, these would get 50, 33, 17 and 0 %.
        let picks = idle_picks(&[6.3, 6.5, 6.9, 7.8]);
        for p in &picks {
            assert!((24_000..=26_000).contains(p), "{picks:?}");
        }
    }

    #[test]
    fn an_estimate_more_than_a_quarter_above_another_loses_their_idle_pairs() {
        let picks = idle_picks(&[6.0, 6.1, 7.7]);
        assert_eq!(picks[2], 0, "{picks:?}");
    }

    #[test]
    fn within_a_quarter_the_fewer_requests_in_flight_win() {
        let rtt = RttEstimate::DEFAULT;
        let endpoints = loads(2);
        endpoints[0].settle_rtt(7_000_000, 1_000, &rtt);
        endpoints[1].settle_rtt(6_000_000, 1_000, &rtt);
        // Latency x (in flight + 1) would say 77 against 72: the second.
        endpoints[0].set_in_flight(10);
        endpoints[1].set_in_flight(11);
        let ctx = PickContext::new(1_000, &rtt);
        let p2c = P2c::peak_ewma();
        let schedule = p2c.schedule(&endpoints[..], &ctx);
        for _ in 0..1_000 {
            assert_eq!(p2c.pick(&schedule, &endpoints[..], &ctx), Some(0));
        }
    }

    #[test]
    fn at_start_up_an_endpoint_without_a_sample_gets_its_share_of_idle_picks() {
        let rtt = RttEstimate::DEFAULT;
        let ctx = PickContext::new(1_000, &rtt);
        let endpoints = loads(3);
        let p2c = P2c::peak_ewma();
        // Scheduled before any answer: no typical estimate.
        let schedule = p2c.schedule(&endpoints[..], &ctx);
        endpoints[0].settle_rtt(500_000, 1_000, &rtt);
        endpoints[1].settle_rtt(500_000, 1_000, &rtt);
        let mut picks = [0; 3];
        for _ in 0..30_000 {
            if let Some(i) = p2c.pick(&schedule, &endpoints[..], &ctx) {
                picks[i] += 1;
            }
        }
        // Weighed at the 30 ms default it would get none.
        assert!((9_000..=11_000).contains(&picks[2]), "{picks:?}");
    }

    #[test]
    fn spread_is_even_under_equal_load() {
        let rtt = RttEstimate::DEFAULT;
        let ctx = PickContext::new(0, &rtt);
        let n = 10;
        let picks = 200_000;
        let endpoints = loads(n);
        let mut counts = vec![0f64; n];
        let p2c = P2c::least_requests();
        for _ in 0..picks {
            counts[p2c
                .pick(&p2c.schedule(&endpoints[..], &ctx), &endpoints[..], &ctx)
                .unwrap()] += 1.0;
        }
        // Ties go to the first candidate, which is uniform: chi-square with 9
        // degrees of freedom stays below 27.9 with probability 0.999.
        let expected = picks as f64 / n as f64;
        let chi2: f64 = counts
            .iter()
            .map(|c| (c - expected).powi(2) / expected)
            .sum();
        assert!(chi2 < 27.9, "chi2 = {chi2}, counts = {counts:?}");
    }

    #[test]
    fn single_endpoint_is_always_picked_and_empty_set_never() {
        let rtt = RttEstimate::DEFAULT;
        let ctx = PickContext::new(0, &rtt);
        assert_eq!(
            P2c::peak_ewma().pick(
                &P2cSchedule {
                    ramping: false,
                    weights: Box::default(),
                    typical_rtt_ns: f64::NAN,
                    in_flight_scale: 1.0,
                },
                &loads(1)[..],
                &ctx
            ),
            Some(0)
        );
        assert_eq!(
            P2c::peak_ewma().pick(
                &P2cSchedule {
                    ramping: false,
                    weights: Box::default(),
                    typical_rtt_ns: f64::NAN,
                    in_flight_scale: 1.0,
                },
                &loads(0)[..],
                &ctx
            ),
            None
        );
    }

    #[test]
    fn an_endpoint_of_twice_the_weight_takes_twice_the_load_before_losing() {
        let rtt = RttEstimate::DEFAULT;
        let ctx = PickContext::new(0, &rtt);
        let endpoints = loads(2);
        assert!(endpoints[1].set_static_weight(2.0));
        let p2c = P2c::least_requests();
        // 3 / 2 < 2 / 1: the heavier one wins every comparison.
        endpoints[0].set_in_flight(2);
        endpoints[1].set_in_flight(3);
        let schedule = p2c.schedule(&endpoints[..], &ctx);
        assert!(p2c.prefers_b_weighted(&endpoints[..], 0, 1, &schedule, &ctx));
        // 5 / 2 > 2 / 1: it loses.
        endpoints[1].set_in_flight(5);
        assert!(!p2c.prefers_b_weighted(&endpoints[..], 0, 1, &schedule, &ctx));
    }

    /// Shares of `picks` picks by `p2c` over idle endpoints of `weights`.
    fn idle_shares(p2c: P2c, weights: &[f64], picks: usize) -> Vec<f64> {
        let rtt = RttEstimate::DEFAULT;
        let ctx = PickContext::new(0, &rtt);
        let endpoints = loads(weights.len());
        for (load, &w) in endpoints.iter().zip(weights) {
            assert!(load.set_static_weight(w));
        }
        let schedule = p2c.schedule(&endpoints[..], &ctx);
        let mut counts = vec![0usize; weights.len()];
        for _ in 0..picks {
            counts[p2c.pick(&schedule, &endpoints[..], &ctx).unwrap()] += 1;
        }
        counts.iter().map(|&c| c as f64 / picks as f64).collect()
    }

    #[test]
    fn idle_endpoints_get_shares_in_proportion_to_their_weights() {
        for p2c in [P2c::least_requests(), P2c::peak_ewma()] {
            let shares = idle_shares(p2c, &[3.0, 1.0], 100_000);
            assert!((shares[0] - 0.75).abs() < 0.01, "{p2c:?}: {shares:?}");
            let shares = idle_shares(p2c, &[1.0, 2.0, 3.0, 4.0], 100_000);
            for (share, want) in shares.iter().zip([0.1, 0.2, 0.3, 0.4]) {
                assert!((share - want).abs() < 0.01, "{p2c:?}: {shares:?}");
            }
        }
    }

    #[test]
    fn equal_weights_other_than_one_draw_uniformly() {
        let shares = idle_shares(P2c::least_requests(), &[5.0; 4], 100_000);
        for share in shares {
            assert!((share - 0.25).abs() < 0.01, "{share}");
        }
    }

    #[test]
    fn a_weight_that_is_not_finite_and_positive_is_refused() {
        let endpoints = loads(1);
        for bad in [f64::NAN, f64::INFINITY, 0.0, -1.0] {
            assert!(!endpoints[0].set_static_weight(bad));
        }
        assert_eq!(endpoints[0].static_weight(), 1.0);
    }

    #[test]
    fn two_endpoints_ramping_together_compare_by_load_alone() {
        let rtt = RttEstimate::DEFAULT;
        let ctx = PickContext::new(0, &rtt);
        let endpoints = loads(2);
        for load in &endpoints {
            load.set_slow_start_factor(0.1);
        }
        endpoints[0].set_in_flight(3);
        let p2c = P2c::least_requests();
        let schedule = p2c.schedule(&endpoints[..], &ctx);
        for _ in 0..1_000 {
            assert_eq!(p2c.pick(&schedule, &endpoints[..], &ctx), Some(1));
        }
    }
}
