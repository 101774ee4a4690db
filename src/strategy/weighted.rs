use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::{Candidates, PickContext, Strategy};
use crate::load::EndpointLoad;

/// The largest scaled weight: an endpoint with it is accepted on every pass.
const MAX_WEIGHT: u64 = u16::MAX as u64;
/// Offset between neighbouring endpoints' accept patterns (`MAX_WEIGHT / 2`),
/// so that two endpoints of equal weight below the maximum do not skip the
/// same passes.
const OFFSET: u64 = MAX_WEIGHT / 2;
/// No endpoint weighs more than this many times the mean weight (of the
/// weights as scheduled): it limits what one endpoint reporting an absurdly
/// low utilization can draw, and with it the draws a pick takes on average
/// (the largest weight over the mean; see `WeightedRoundRobin`).
const MAX_RATIO: f64 = 10.0;
/// No endpoint weighs less than this fraction of the mean of the reported
/// weights, as in gRPC C++: an overloaded endpoint still gets a trickle, and
/// with it fresh reports.
const MIN_RATIO: f64 = 0.01;
/// The shortest weight update period (A58).
const MIN_WEIGHT_UPDATE_PERIOD: Duration = Duration::from_millis(100);
/// A pick gives up skipping after this many draws per endpoint and takes the
/// endpoint it last drew (see `WeightedRoundRobinSchedule::pick`).
const DRAWS_PER_ENDPOINT: usize = 64;

/// Weighted round robin from the load endpoints report about themselves,
/// following gRPC's proposal A58.
///
/// Round robin and P2C only see what this client sends; an endpoint on a
/// slower machine, or one that other clients keep busy, gets the same share
/// as the others. With WRR each endpoint says how loaded it is (ORCA load
/// reports: requests per second, errors per second and CPU or application
/// utilization, in the `endpoint-load-metrics` response header or gRPC
/// trailer) and gets a share of the requests proportional to its weight
///
/// `weight = qps / (utilization + eps / qps * error_utilization_penalty)`,
///
/// that is, to the requests it serves per unit of utilization, discounted for
/// the errors it returns. Reports are read and recorded on each endpoint's
/// load by the balancer's [classifier](crate::classify); without a classifier
/// that reads them, no endpoint has a weight and this is plain round robin.
///
/// As in A58:
/// - a weight counts only after reports have been arriving for the
///   *blackout period* (default 10 s), so that one lucky report cannot flood
///   an endpoint;
/// - an endpoint that sent no report for the *weight expiration period*
///   (default 3 min) loses its weight, and its next report starts a new
///   blackout;
/// - endpoints without a weight get the mean of the weights there are; with
///   fewer than two weights, or all weights equal, it is plain round robin
///   (an exactly even spread);
/// - weights are recomputed every *weight update period* (default 1 s, at
///   least 100 ms) on the balancer's driver, off the request path;
/// - the error penalty defaults to 1.0.
///
/// Weights are kept between 1 % of the mean reported weight (as in gRPC
/// C++: an overloaded endpoint still gets a trickle of requests, and with it
/// fresh reports) and 10 times the mean weight: no endpoint gets more than
/// ten times an even share, however low the utilization it reports. (gRPC
/// C++ caps at 10 times the mean before capping, which among many endpoints
/// lets one of them take nearly all the traffic, and makes picks slow; see
/// below.)
///
/// Picking uses gRPC's "static stride" scheduler: one shared atomic counter,
/// starting at a random value; each value names an endpoint (counter modulo
/// the endpoint count) and a pass (counter divided by it), and an endpoint is
/// taken on a share of the passes equal to its weight over the largest. It
/// is lock-free and allocation-free, and deterministic for one counter
/// value: over a run of picks every endpoint's share is its weight's share
/// to within one pass. A pick costs one atomic add per draw and takes, on
/// average, the largest weight over the mean weight draws: one for equal
/// weights, under two for machines of a few different sizes, and thanks to
/// the cap never more than ten.
///
/// ```
/// use std::time::Duration;
/// use tower_lb::strategy::WeightedRoundRobin;
///
/// let strategy = WeightedRoundRobin::new()
///     .blackout_period(Duration::from_secs(5))
///     .error_utilization_penalty(2.0);
/// let balancer = tower_lb::Balancer::builder().strategy(strategy);
/// # let _ = balancer;
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WeightedRoundRobin {
    blackout_period: Duration,
    weight_expiration_period: Duration,
    weight_update_period: Duration,
    error_utilization_penalty: f64,
}

/// The weights of one set of endpoints, scaled for the stride scheduler, and
/// the scheduler's counter.
#[derive(Debug)]
pub struct WeightedRoundRobinSchedule {
    /// One weight per endpoint, the largest `MAX_WEIGHT`; empty for plain
    /// round robin.
    weights: Box<[u16]>,
    sequence: AtomicU64,
}

impl WeightedRoundRobin {
    /// A58's defaults: 10 s blackout, weights expire after 3 min without a
    /// report, recomputed every second, error penalty 1.0.
    pub fn new() -> Self {
        Self {
            blackout_period: Duration::from_secs(10),
            weight_expiration_period: Duration::from_secs(180),
            weight_update_period: Duration::from_secs(1),
            error_utilization_penalty: 1.0,
        }
    }

    /// How long an endpoint must have been reporting before its weight
    /// counts; until then it gets the mean weight. Zero disables the
    /// blackout. Default 10 s.
    pub fn blackout_period(mut self, period: Duration) -> Self {
        self.blackout_period = period;
        self
    }

    /// How long without a report before an endpoint's weight is forgotten
    /// (its next report starts a new blackout). Zero forgets every weight at
    /// once: plain round robin. Default 3 min.
    pub fn weight_expiration_period(mut self, period: Duration) -> Self {
        self.weight_expiration_period = period;
        self
    }

    /// How often weights are recomputed. Default 1 s; raised to at least
    /// 100 ms.
    pub fn weight_update_period(mut self, period: Duration) -> Self {
        self.weight_update_period = period.max(MIN_WEIGHT_UPDATE_PERIOD);
        self
    }

    /// How much an error counts against an endpoint, in utilization per
    /// error-per-request: 0 ignores errors. Default 1.0; a negative, NaN or
    /// infinite value also gives the default.
    pub fn error_utilization_penalty(mut self, penalty: f64) -> Self {
        self.error_utilization_penalty = if penalty.is_finite() && penalty >= 0.0 {
            penalty
        } else {
            1.0
        };
        self
    }

    /// The weight of one endpoint at `now_ns`, if it has one. Forgets a run
    /// of reports that expired.
    fn weight(&self, load: &EndpointLoad, now_ns: u64) -> Option<f64> {
        let report = load.reported_load()?;
        if now_ns.saturating_sub(report.last_update_ns) >= nanos(self.weight_expiration_period) {
            // A report landing between the read above and this may be
            // forgotten with the run: its endpoint starts a new blackout a
            // report later, which is harmless.
            load.forget_reported_load();
            return None;
        }
        let blackout = nanos(self.blackout_period);
        if blackout > 0 && now_ns.saturating_sub(report.non_empty_since_ns) < blackout {
            return None;
        }
        let weight = report.qps
            / (report.utilization + report.eps / report.qps * self.error_utilization_penalty);
        (weight.is_finite() && weight > 0.0).then_some(weight)
    }
}

impl Default for WeightedRoundRobin {
    /// [`WeightedRoundRobin::new`].
    fn default() -> Self {
        Self::new()
    }
}

impl Strategy for WeightedRoundRobin {
    type Schedule = WeightedRoundRobinSchedule;

    fn schedule<C: Candidates + ?Sized>(
        &self,
        candidates: &C,
        ctx: &PickContext<'_>,
    ) -> WeightedRoundRobinSchedule {
        let now_ns = ctx.now_ns();
        let weights: Vec<f64> = (0..candidates.len())
            .map(|i| self.weight(candidates.load(i), now_ns).unwrap_or(0.0))
            .collect();
        WeightedRoundRobinSchedule {
            weights: scale(&weights),
            // Half the range: the counter never wraps (2^63 picks), so every
            // cycle of round robin is whole.
            sequence: AtomicU64::new(ctx.random_u64() >> 1),
        }
    }

    /// The weight update period: weights follow the reports as they arrive.
    fn reschedule_every(&self) -> Option<Duration> {
        Some(self.weight_update_period)
    }

    fn pick<C: Candidates + ?Sized>(
        &self,
        schedule: &WeightedRoundRobinSchedule,
        candidates: &C,
        _ctx: &PickContext<'_>,
    ) -> Option<usize> {
        match candidates.len() {
            0 => None,
            n => Some(schedule.pick(n)),
        }
    }
}

impl WeightedRoundRobinSchedule {
    /// The stride scheduler's pick among `n > 0` endpoints.
    ///
    /// Draw `idx` names endpoint `idx % n` on pass `idx / n`; an endpoint of
    /// weight `w` is taken on a pass when
    /// `(w * pass + endpoint * OFFSET) % MAX_WEIGHT >= MAX_WEIGHT - w`, which
    /// holds on `w` passes out of every `MAX_WEIGHT`, evenly spread. (The
    /// pass is reduced modulo `MAX_WEIGHT` first so that the product fits in
    /// 64 bits; the test is the same.)
    ///
    /// An endpoint of the largest weight is taken on every pass, so one
    /// thread alone draws at most `n` times. Threads that share the counter
    /// take draws from each other and could in principle keep drawing
    /// endpoints that skip; after `64 n` draws the pick takes the endpoint it
    /// drew last rather than loop on. At least one draw in `n` is taken, so
    /// with draws shared out at random the chance of that is about
    /// `(1 - 1/n)^(64 n) < e^-64`: never in practice.
    fn pick(&self, n: usize) -> usize {
        let count = n as u64;
        if self.weights.len() != n {
            // Plain round robin (or a schedule built for another set).
            return (self.sequence.fetch_add(1, Ordering::Relaxed) % count) as usize;
        }
        let mut draws_left = n.saturating_mul(DRAWS_PER_ENDPOINT);
        loop {
            let idx = self.sequence.fetch_add(1, Ordering::Relaxed);
            let endpoint = (idx % count) as usize;
            let pass = idx / count;
            let weight = u64::from(self.weights[endpoint]);
            let phase = (weight * (pass % MAX_WEIGHT) + endpoint as u64 * OFFSET) % MAX_WEIGHT;
            draws_left -= 1;
            if phase >= MAX_WEIGHT - weight || draws_left == 0 {
                return endpoint;
            }
        }
    }
}

/// Scales weights (0 = none) for the stride scheduler: endpoints without a
/// weight get the mean, weights below `MIN_RATIO` times the mean are raised
/// to it, weights are capped so that none is above `MAX_RATIO` times the mean
/// of the result, and the largest becomes `MAX_WEIGHT`. Empty for plain
/// round robin: fewer than two weights, or all scaled weights equal.
fn scale(weights: &[f64]) -> Box<[u16]> {
    let (count, max) = weights
        .iter()
        .filter(|&&w| w > 0.0)
        .fold((0usize, 0f64), |(count, max), &w| (count + 1, max.max(w)));
    if count < 2 {
        return Box::default();
    }
    // Relative to the largest weight, so that no sum overflows: the largest
    // is 1 and the mean in `[1 / count, 1]`.
    let mean = weights.iter().map(|w| w / max).sum::<f64>() / count as f64;
    let floor = mean * MIN_RATIO;
    let relative: Vec<f64> = weights
        .iter()
        .map(|&w| if w > 0.0 { (w / max).max(floor) } else { mean })
        .collect();
    let cap = cap(&relative);
    let factor = MAX_WEIGHT as f64 / cap;
    let scaled: Box<[u16]> = relative
        .iter()
        .map(|&w| (w.min(cap) * factor).round().clamp(1.0, MAX_WEIGHT as f64) as u16)
        .collect();
    if scaled.iter().all(|&w| w == scaled[0]) {
        return Box::default();
    }
    scaled
}

/// The largest `c` such that `c <= MAX_RATIO * mean(min(w, c))`: capped at
/// it, no weight is above `MAX_RATIO` times the mean weight. `weights` are
/// positive, the largest 1.
///
/// `MAX_RATIO * mean(min(w, c)) - c` is concave in `c`, zero at 0 and
/// positive just above, so the `c` that satisfy the bound form an interval
/// from 0 and a bisection finds its end.
fn cap(weights: &[f64]) -> f64 {
    let n = weights.len() as f64;
    let fits = |c: f64| c <= MAX_RATIO * weights.iter().map(|&w| w.min(c)).sum::<f64>() / n;
    let (mut fit, mut unfit) = weights
        .iter()
        .fold((f64::INFINITY, 0f64), |(lo, hi), &w| (lo.min(w), hi.max(w)));
    if fits(unfit) {
        return unfit;
    }
    // Closer than quantization to `MAX_WEIGHT` can tell.
    while unfit - fit > unfit * 1e-9 {
        let mid = 0.5 * (fit + unfit);
        if fits(mid) {
            fit = mid;
        } else {
            unfit = mid;
        }
    }
    fit
}

/// `d` in nanoseconds, saturating.
fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::RttEstimate;
    use crate::strategy::test_support::loads;

    const SEC: u64 = 1_000_000_000;
    /// Past the default blackout of every report recorded at time 0.
    const LATER: u64 = 20 * SEC;

    /// Loads whose reports (recorded at 0 and at `LATER`) give weights
    /// `qps / utilization`: `qps` is `weight`, utilization 1.
    fn weighted_loads(weights: &[f64]) -> Vec<EndpointLoad> {
        let endpoints = loads(weights.len());
        for (load, &w) in endpoints.iter().zip(weights) {
            if w > 0.0 {
                assert!(load.record_reported_load(w, 0.0, 1.0, 0));
                assert!(load.record_reported_load(w, 0.0, 1.0, LATER));
            }
        }
        endpoints
    }

    fn counts(
        wrr: &WeightedRoundRobin,
        endpoints: &[EndpointLoad],
        now_ns: u64,
        picks: usize,
    ) -> Vec<usize> {
        let rtt = RttEstimate::DEFAULT;
        let ctx = PickContext::new(now_ns, &rtt);
        let schedule = wrr.schedule(endpoints, &ctx);
        let mut counts = vec![0; endpoints.len()];
        for _ in 0..picks {
            counts[wrr.pick(&schedule, endpoints, &ctx).unwrap()] += 1;
        }
        counts
    }

    /// Asserts that `counts` follow `weights` within `tolerance` (relative to
    /// each endpoint's expected count).
    fn assert_proportional(counts: &[usize], weights: &[f64], tolerance: f64) {
        let total: usize = counts.iter().sum();
        let sum: f64 = weights.iter().sum();
        for (i, (&c, &w)) in counts.iter().zip(weights).enumerate() {
            let expected = total as f64 * w / sum;
            let error = (c as f64 - expected).abs() / expected;
            assert!(
                error <= tolerance,
                "endpoint {i}: {c} picks, expected {expected:.0} ({counts:?} vs {weights:?})"
            );
        }
    }

    #[test]
    fn picks_are_proportional_to_weights_within_one_percent() {
        let weights = [1.0, 2.0, 3.0, 4.0];
        let endpoints = weighted_loads(&weights);
        let counts = counts(&WeightedRoundRobin::new(), &endpoints, LATER, 100_000);
        assert_proportional(&counts, &weights, 0.01);
    }

    #[test]
    fn fewer_than_two_weights_is_exact_round_robin() {
        for weights in [vec![0.0; 5], vec![0.0, 7.0, 0.0, 0.0, 0.0]] {
            let endpoints = weighted_loads(&weights);
            let counts = counts(&WeightedRoundRobin::new(), &endpoints, LATER, 5 * 11);
            assert!(counts.iter().all(|&c| c == 11), "{weights:?}: {counts:?}");
        }
    }

    #[test]
    fn equal_weights_spread_exactly_evenly() {
        // Some endpoints without a weight get the mean, which is the same.
        let endpoints = weighted_loads(&[3.0, 3.0, 0.0, 3.0, 3.0, 0.0, 3.0]);
        let counts = counts(&WeightedRoundRobin::new(), &endpoints, LATER, 7 * 13);
        assert!(counts.iter().all(|&c| c == 13), "{counts:?}");
    }

    #[test]
    fn an_endpoint_in_blackout_gets_the_mean_weight_until_it_ends() {
        let endpoints = weighted_loads(&[1.0, 3.0, 0.0]);
        // Endpoint 2 starts reporting weight 8 at LATER.
        assert!(endpoints[2].record_reported_load(8.0, 0.0, 1.0, LATER));
        let wrr = WeightedRoundRobin::new();
        let during = counts(&wrr, &endpoints, LATER + 9 * SEC, 60_000);
        assert_proportional(&during, &[1.0, 3.0, 2.0], 0.01);
        assert!(endpoints[2].record_reported_load(8.0, 0.0, 1.0, LATER + 10 * SEC));
        let after = counts(&wrr, &endpoints, LATER + 10 * SEC, 60_000);
        assert_proportional(&after, &[1.0, 3.0, 8.0], 0.01);
    }

    #[test]
    fn a_weight_without_reports_for_the_expiration_period_is_forgotten() {
        let endpoints = weighted_loads(&[1.0, 2.0, 3.0]);
        let wrr = WeightedRoundRobin::new();
        let expiry = LATER + 180 * SEC;
        for load in &endpoints[..2] {
            assert!(load.record_reported_load(1.0, 0.0, 1.0, expiry - 1));
        }
        // Endpoint 2's last report was at LATER: expired, weight forgotten.
        let counts = counts(&wrr, &endpoints, expiry, 30_000);
        assert_eq!(endpoints[2].reported_load(), None);
        // Endpoints 0 and 1 weigh 1 each, so 2 gets the mean, 1: even.
        assert!(counts.iter().all(|&c| c == 10_000), "{counts:?}");
        // A new report starts a new blackout.
        assert!(endpoints[2].record_reported_load(3.0, 0.0, 1.0, expiry + SEC));
        let report = endpoints[2].reported_load().unwrap();
        assert_eq!(report.non_empty_since_ns, expiry + SEC);
        assert_eq!(wrr.weight(&endpoints[2], expiry + 10 * SEC), None);
        assert_eq!(wrr.weight(&endpoints[2], expiry + 11 * SEC), Some(3.0));
    }

    #[test]
    fn errors_lower_the_weight_by_the_penalty() {
        let endpoints = loads(1);
        assert!(endpoints[0].record_reported_load(100.0, 50.0, 0.5, 0));
        // 100 / (0.5 + 50 / 100 * penalty)
        let weight = |penalty| {
            WeightedRoundRobin::new()
                .error_utilization_penalty(penalty)
                .weight(&endpoints[0], LATER)
        };
        assert_eq!(weight(0.0), Some(200.0));
        assert_eq!(weight(1.0), Some(100.0));
        assert_eq!(weight(3.0), Some(50.0));
        assert_eq!(weight(f64::NAN), Some(100.0));
        assert_eq!(weight(-3.0), Some(100.0));
        assert_eq!(weight(f64::INFINITY), Some(100.0));
    }

    #[test]
    fn bad_reports_never_give_nan_weights_or_panic() {
        let endpoints = loads(4);
        for (qps, eps, utilization) in [
            (f64::NAN, 0.0, 0.5),
            (0.0, 0.0, 0.5),
            (-1.0, 0.0, 0.5),
            (10.0, f64::INFINITY, 0.5),
            (10.0, 0.0, 0.0),
            (10.0, 0.0, -0.5),
        ] {
            assert!(!endpoints[0].record_reported_load(qps, eps, utilization, 0));
        }
        assert_eq!(endpoints[0].reported_load(), None);
        // Valid reports whose weight is not finite: the division overflows.
        assert!(endpoints[1].record_reported_load(f64::MAX, 0.0, 1e-300, 0));
        assert!(endpoints[2].record_reported_load(1e300, 0.0, 1e-300, 0));
        assert!(endpoints[3].record_reported_load(1.0, 0.0, 1.0, 0));
        let wrr = WeightedRoundRobin::new();
        assert_eq!(wrr.weight(&endpoints[1], LATER), None);
        assert_eq!(wrr.weight(&endpoints[2], LATER), None);
        // One weight left: round robin.
        let counts = counts(&wrr, &endpoints, LATER, 4 * 100);
        assert!(counts.iter().all(|&c| c == 100), "{counts:?}");
        // Weights as far apart as f64 goes scale without NaN or overflow.
        let scaled = scale(&[f64::MAX, f64::MIN_POSITIVE, 0.0, 1.0]);
        assert_eq!(scaled.len(), 4);
        assert!(scaled.iter().all(|&w| w >= 1), "{scaled:?}");
        assert_eq!(scaled.iter().max(), Some(&u16::MAX));
    }

    #[test]
    fn no_endpoint_gets_more_than_ten_times_an_even_share() {
        // Among 20 endpoints, one reports a million times the capacity of
        // the others; endpoint 1 has no weight, so it gets the mean.
        let mut weights = vec![1e6, 0.0];
        weights.extend([1.0; 18]);
        let endpoints = weighted_loads(&weights);
        let wrr = WeightedRoundRobin::new();
        let rtt = RttEstimate::DEFAULT;
        let ctx = PickContext::new(LATER, &rtt);
        let schedule = wrr.schedule(&endpoints[..], &ctx);
        let start = schedule.sequence.load(Ordering::Relaxed);
        let picks = 200_000;
        let mut counts = vec![0; 20];
        for _ in 0..picks {
            counts[wrr.pick(&schedule, &endpoints[..], &ctx).unwrap()] += 1;
        }
        // Ten times an even share is half of them.
        let share = counts[0] as f64 / picks as f64;
        assert!((0.495..=0.505).contains(&share), "{counts:?}");
        // The small ones are raised to 1 % of the mean reported weight.
        for small in 2..20 {
            let ratio = counts[1] as f64 / counts[small] as f64;
            assert!((95.0..=105.0).contains(&ratio), "{counts:?}");
        }
        // A pick takes at most ten draws on average (the cap is exact, up
        // to rounding to integer weights).
        let draws = schedule.sequence.load(Ordering::Relaxed) - start;
        assert!(draws <= 10 * picks + picks / 1000, "{draws} draws");
    }

    #[test]
    fn stride_scheduler_spreads_random_weights_and_always_terminates() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::SmallRng::seed_from_u64(58);
        let rtt = RttEstimate::DEFAULT;
        let ctx = PickContext::new(LATER, &rtt);
        let wrr = WeightedRoundRobin::new();
        for n in 1..=50 {
            // Within a factor of ten of each other: no cap applies.
            let weights: Vec<f64> = (0..n).map(|_| rng.random_range(1.0..10.0)).collect();
            let endpoints = weighted_loads(&weights);
            let schedule = wrr.schedule(&endpoints[..], &ctx);
            let picks = 20_000 * n;
            let mut counts = vec![0; n];
            let start = schedule.sequence.load(Ordering::Relaxed);
            for _ in 0..picks {
                let before = schedule.sequence.load(Ordering::Relaxed);
                counts[wrr.pick(&schedule, &endpoints[..], &ctx).unwrap()] += 1;
                let draws = schedule.sequence.load(Ordering::Relaxed) - before;
                assert!(draws as usize <= n, "n={n}: {draws} draws");
            }
            let draws = schedule.sequence.load(Ordering::Relaxed) - start;
            assert!(draws as usize <= 10 * picks, "n={n}: {draws} draws");
            assert_proportional(&counts, &weights, 0.02);
        }
    }

    #[test]
    fn threads_sharing_a_schedule_still_follow_the_weights() {
        // Every accepted draw is taken by exactly one thread, so the picks
        // of all threads together follow the same schedule.
        let weights = [1.0, 2.0, 3.0, 4.0];
        let endpoints = weighted_loads(&weights);
        let rtt = RttEstimate::DEFAULT;
        let ctx = PickContext::new(LATER, &rtt);
        let wrr = WeightedRoundRobin::new();
        let schedule = wrr.schedule(&endpoints[..], &ctx);
        let counts = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..4)
                .map(|_| {
                    scope.spawn(|| {
                        let mut counts = [0usize; 4];
                        for _ in 0..25_000 {
                            counts[wrr.pick(&schedule, &endpoints[..], &ctx).unwrap()] += 1;
                        }
                        counts
                    })
                })
                .collect();
            let mut total = [0usize; 4];
            for worker in workers {
                for (t, c) in total.iter_mut().zip(worker.join().unwrap()) {
                    *t += c;
                }
            }
            total
        });
        assert_proportional(&counts, &weights, 0.01);
    }

    #[test]
    fn empty_set_picks_nothing() {
        let rtt = RttEstimate::DEFAULT;
        let ctx = PickContext::new(LATER, &rtt);
        let wrr = WeightedRoundRobin::new();
        let schedule = wrr.schedule(&loads(0)[..], &ctx);
        assert_eq!(wrr.pick(&schedule, &loads(0)[..], &ctx), None);
    }

    #[test]
    fn settings_default_to_a58_and_clamp() {
        let wrr = WeightedRoundRobin::default();
        assert_eq!(wrr, WeightedRoundRobin::new());
        assert_eq!(wrr.blackout_period, Duration::from_secs(10));
        assert_eq!(wrr.weight_expiration_period, Duration::from_secs(180));
        assert_eq!(wrr.error_utilization_penalty, 1.0);
        assert_eq!(wrr.reschedule_every(), Some(Duration::from_secs(1)));
        assert!(
            !wrr.uses_latency(),
            "schedules get the time anyway; requests need not be timed"
        );
        let fast = wrr.weight_update_period(Duration::from_millis(10));
        assert_eq!(fast.reschedule_every(), Some(Duration::from_millis(100)));
    }

    /// Nanoseconds per pick, on one thread and on two sharing the schedule
    /// (wall time over all picks): `cargo test --release --lib
    /// strategy::weighted::tests::pick_cost -- --ignored --nocapture`.
    #[test]
    #[ignore = "timing, not a test"]
    fn pick_cost() {
        use crate::strategy::RoundRobin;
        use std::hint::black_box;
        use std::time::Instant;

        fn time(threads: u32, f: &(dyn Fn() -> usize + Sync)) -> f64 {
            let picks = 4_000_000u32;
            let start = Instant::now();
            std::thread::scope(|scope| {
                for _ in 0..threads {
                    scope.spawn(|| {
                        for _ in 0..picks / threads {
                            black_box(f());
                        }
                    });
                }
            });
            start.elapsed().as_nanos() as f64 / f64::from(picks)
        }

        let rtt = RttEstimate::DEFAULT;
        let ctx = PickContext::new(LATER, &rtt);
        for n in [10usize, 100, 1_000, 10_000] {
            let even = loads(n);
            let sizes: Vec<f64> = (0..n).map(|i| 1.0 + (i % 4) as f64).collect();
            let sizes = weighted_loads(&sizes);
            // The worst case: one endpoint far above the rest.
            let mut skewed = vec![1.0; n];
            skewed[0] = 1e6;
            let skewed = weighted_loads(&skewed);
            let rr = RoundRobin::new();
            let rr_schedule = rr.schedule(&even[..], &ctx);
            let wrr = WeightedRoundRobin::new();
            let plain = wrr.schedule(&even[..], &ctx);
            let by_size = wrr.schedule(&sizes[..], &ctx);
            let lopsided = wrr.schedule(&skewed[..], &ctx);
            let rr_pick = || rr.pick(&rr_schedule, &even[..], &ctx).unwrap_or(0);
            let plain_pick = || wrr.pick(&plain, &even[..], &ctx).unwrap_or(0);
            let size_pick = || wrr.pick(&by_size, &sizes[..], &ctx).unwrap_or(0);
            let skew_pick = || wrr.pick(&lopsided, &skewed[..], &ctx).unwrap_or(0);
            for threads in [1, 2] {
                println!(
                    "n={n} threads={threads}: round robin {:.1} ns, wrr unweighted {:.1} ns, \
                     wrr 1:2:3:4 {:.1} ns, wrr one at 1e6 {:.1} ns",
                    time(threads, &rr_pick),
                    time(threads, &plain_pick),
                    time(threads, &size_pick),
                    time(threads, &skew_pick),
                );
            }
        }
    }
}
