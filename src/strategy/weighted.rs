use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::{Candidates, PickContext, Strategy};
use crate::load::EndpointLoad;
use crate::setting::{self, InvalidSetting};

/// No endpoint weighs more than this many times the mean weight (of the
/// weights as scheduled): it limits what one endpoint reporting an absurdly
/// low utilization can draw.
const MAX_RATIO: f64 = 10.0;
/// No endpoint weighs less than this fraction of the mean of the reported
/// weights, as in gRPC C++: an overloaded endpoint still gets a trickle, and
/// with it fresh reports.
const MIN_RATIO: f64 = 0.01;
/// The shortest weight update period (A58).
const MIN_WEIGHT_UPDATE_PERIOD: Duration = Duration::from_millis(100);
/// One column of the alias table in fixed point: `2^32`.
const COLUMN: u64 = 1 << 32;
/// `2^64` over the golden ratio, odd: the step of the Weyl sequence that
/// spreads consecutive picks over the table (see
/// `WeightedRoundRobinSchedule::pick`).
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

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
/// lets one of them take nearly all the traffic.)
///
/// Picking does not use gRPC's "static stride" scheduler, whose picks draw
/// endpoints until one accepts: on average the largest weight over the mean
/// weight draws, each an atomic add, so a pick costs more the more the
/// weights differ (up to ten draws with the cap above); with weights 1 to
/// `n` it took 17 to 20 ns against round robin's 7 ns (`pick/*` in
/// `benches/balance.rs`, 10 to 10,000 endpoints). Here each schedule holds
/// an alias table (Vose's alias method, built in O(n) off the request
/// path): one column per endpoint, each split between its own endpoint and
/// at most one other, so that every endpoint's part of the whole table is
/// its weight's share. A pick is one atomic add on a shared counter, a
/// 128-bit multiply and one table load, whatever the weights: lock-free,
/// allocation-free and O(1). In the same benchmark it takes 6.7 ns for 10
/// or 100 endpoints, 7.6 ns for 1,000 and 9.1 ns for 10,000 (an 80 KB
/// table, out of the L1 cache), against round robin's 7.1 to 7.2 ns; an
/// endpoint with a million times the others' weight costs no more.
///
/// Consecutive counter values are spread over the table by the
/// golden-ratio (Weyl) sequence, not at random, so picks stay
/// round-robin-like: over any run of picks every endpoint's count is within
/// a few picks of its weight's share (with weights 1:1:2, within ±2 in
/// every window of 40 picks), and over a long run it is exact up to the
/// table's fixed point (2^-32 of a column). Threads sharing a schedule take
/// distinct counter values, so their picks together follow the weights just
/// as closely.
///
/// ```
/// use std::time::Duration;
/// use tower_lb::strategy::WeightedRoundRobin;
///
/// let strategy = WeightedRoundRobin::new()
///     .blackout_period(Duration::from_secs(5))
///     .error_utilization_penalty(2.0)?;
/// let balancer = tower_lb::Balancer::builder().strategy(strategy);
/// # let _ = balancer;
/// # Ok::<_, tower_lb::error::InvalidSetting>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WeightedRoundRobin {
    blackout_period: Duration,
    weight_expiration_period: Duration,
    weight_update_period: Duration,
    error_utilization_penalty: f64,
}

/// The weights of one set of endpoints, as an alias table, and the counter
/// that picks walk.
#[derive(Debug)]
pub struct WeightedRoundRobinSchedule {
    /// One column per endpoint; empty for plain round robin.
    columns: Box<[Column]>,
    /// Not padded onto a cache line of its own as round robin's counter is:
    /// measured, that made the 64-task benchmark slower here (123 – 131 ->
    /// 139 – 146 ns per request).
    sequence: AtomicU64,
}

/// One column of the alias table: the fraction `threshold / 2^32` of it
/// belongs to its own endpoint, the rest to endpoint `alias`. A column that
/// belongs to its own endpoint alone has itself as alias.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Column {
    threshold: u32,
    alias: u32,
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

    /// How often weights are recomputed. Default 1 s.
    ///
    /// # Errors
    ///
    /// When `period` is shorter than 100 ms, gRPC A58's minimum.
    pub fn weight_update_period(mut self, period: Duration) -> Result<Self, InvalidSetting> {
        self.weight_update_period = setting::check(
            "WeightedRoundRobin::weight_update_period",
            period,
            period >= MIN_WEIGHT_UPDATE_PERIOD,
            "100 ms or longer (gRPC A58's minimum)",
        )?;
        Ok(self)
    }

    /// How much an error counts against an endpoint, in utilization per
    /// error-per-request: 0 ignores errors. Default 1.0.
    ///
    /// # Errors
    ///
    /// When `penalty` is negative, NaN or infinite.
    pub fn error_utilization_penalty(mut self, penalty: f64) -> Result<Self, InvalidSetting> {
        self.error_utilization_penalty = setting::finite_at_least(
            "WeightedRoundRobin::error_utilization_penalty",
            penalty,
            0.0,
            "a finite number, 0 or more",
        )?;
        Ok(self)
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
        let mut weights: Vec<f64> = (0..candidates.len())
            .map(|i| self.weight(candidates.load(i), now_ns).unwrap_or(0.0))
            .collect();
        // Until two endpoints have reported weights, the static weights
        // discovery gave (all 1 unless set: plain round robin).
        if weights.iter().filter(|&&w| w > 0.0).count() < 2 {
            weights = (0..candidates.len())
                .map(|i| candidates.load(i).static_weight())
                .collect();
        }
        // Endpoints in slow start get their share of it. An endpoint with
        // no weight yet gets the mean later, and the ramp scales that too.
        let ramp: Vec<f64> = (0..candidates.len())
            .map(|i| candidates.load(i).slow_start_factor())
            .collect();
        WeightedRoundRobinSchedule {
            columns: alias_table(&ramped(scale(&weights), &ramp)),
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
        ctx: &PickContext<'_>,
    ) -> Option<usize> {
        match candidates.len() {
            0 => None,
            // A retry takes no turn (see `PickContext::is_retry`): a random
            // spot of the table, so still in proportion to the weights.
            n if ctx.is_retry() => Some(schedule.pick_at(ctx.random_u64() >> 1, n)),
            n => Some(schedule.pick(n)),
        }
    }
}

impl WeightedRoundRobinSchedule {
    /// A pick among `n > 0` endpoints: one atomic add.
    ///
    /// Counter value `k` is mapped to `u = frac(k * GOLDEN / 2^64)`, the
    /// golden-ratio Weyl sequence: consecutive values land far apart and
    /// fill `[0, 1)` evenly (any run of them is a low-discrepancy set, and
    /// runs taken by different threads still add up to one run). Then `n u`
    /// names the column (its integer part) and where in the column the pick
    /// falls (its fraction, the coin): both come from one equidistributed
    /// number, so they are not correlated however `n` relates to the
    /// multiplier. An endpoint's picks are the `u` that fall in its parts of
    /// the columns, a few intervals of total length its share, so over any
    /// run of picks its count follows its share to within a few picks.
    fn pick(&self, n: usize) -> usize {
        self.pick_at(self.sequence.fetch_add(1, Ordering::Relaxed), n)
    }

    /// The pick of counter value `k` among `n > 0` endpoints.
    fn pick_at(&self, k: u64, n: usize) -> usize {
        if self.columns.len() != n {
            // Plain round robin (or a schedule built for another set).
            return (k % n as u64) as usize;
        }
        alias_pick(&self.columns, k.wrapping_mul(GOLDEN))
    }
}

/// The endpoint at `u / 2^64` of a (non-empty) alias table: `u` names the
/// column (the integer part of `n u / 2^64`) and where in the column it
/// falls (the top 32 bits of the fraction, the coin). A uniformly random
/// `u` picks each endpoint with the probability of its weight's share.
pub(super) fn alias_pick(columns: &[Column], u: u64) -> usize {
    let spot = u128::from(u) * columns.len() as u128;
    // Below `n`: `u` is below 2^64.
    let column = (spot >> 64) as usize;
    let coin = (spot >> 32) as u32;
    let Column { threshold, alias } = columns[column];
    if coin < threshold {
        column
    } else {
        alias as usize
    }
}

/// Scales weights (0 = none) relative to the largest: endpoints without a
/// weight get the mean, weights below `MIN_RATIO` times the mean are raised
/// to it, and weights are capped so that none is above `MAX_RATIO` times the
/// mean of the result. Empty for plain round robin: fewer than two weights.
/// `weights` (already scaled, empty for plain round robin) times each
/// endpoint's slow-start factor. With no weights but some endpoint ramping,
/// the factors alone.
fn ramped(weights: Vec<f64>, ramp: &[f64]) -> Vec<f64> {
    if ramp.iter().all(|&f| f >= 1.0) {
        return weights;
    }
    if weights.is_empty() {
        return ramp.to_vec();
    }
    weights.iter().zip(ramp).map(|(w, f)| w * f).collect()
}

fn scale(weights: &[f64]) -> Vec<f64> {
    let (count, max) = weights
        .iter()
        .filter(|&&w| w > 0.0)
        .fold((0usize, 0f64), |(count, max), &w| (count + 1, max.max(w)));
    if count < 2 {
        return Vec::new();
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
    relative.iter().map(|&w| w.min(cap)).collect()
}

/// The alias table of positive `weights` (Vose's method, in exact integer
/// arithmetic): column `i` gives `threshold / 2^32` of itself to endpoint
/// `i` and the rest to its alias, and every endpoint's parts add up to `n`
/// columns times its weight's share. Empty for plain round robin: fewer than
/// two weights, all weights equal (to the table's precision), or more
/// endpoints than a `u32` counts.
pub(super) fn alias_table(weights: &[f64]) -> Box<[Column]> {
    let n = weights.len();
    if n < 2 || u32::try_from(n).is_err() {
        return Box::default();
    }
    // Each endpoint's share in 2^-32 of a column, at least one, adding up
    // to exactly `n` columns: the rounding remainder (a few units) goes to
    // the largest, which has at least a column.
    let total = COLUMN * n as u64;
    let sum = weights.iter().sum::<f64>();
    // Weights of 0 (every endpoint at the very start of a slow start that
    // begins at 0 %) or not numbers: nothing to weigh by.
    if !(sum.is_finite() && sum > 0.0) || weights.iter().any(|w| !w.is_finite()) {
        return Box::default();
    }
    let factor = total as f64 / sum;
    let mut shares: Vec<u64> = weights
        .iter()
        .map(|&w| ((w * factor) as u64).clamp(1, total))
        .collect();
    let largest = (0..n).max_by_key(|&i| shares[i]).unwrap_or(0);
    let sum: u128 = shares.iter().map(|&s| u128::from(s)).sum();
    let rest = u128::from(total).saturating_sub(sum - u128::from(shares[largest]));
    shares[largest] = u64::try_from(rest).unwrap_or(total);
    if shares.iter().all(|&s| s == COLUMN) {
        return Box::default();
    }
    // Every endpoint with less than a column fills its own with a part of
    // one that has more; what is left of that one is then sorted again.
    // The shares left always average one column, so while one is below a
    // column another is above, and at the end all are exactly one column.
    let mut columns: Vec<Column> = (0..n as u32)
        .map(|i| Column {
            threshold: u32::MAX,
            alias: i,
        })
        .collect();
    let (mut small, mut large): (Vec<usize>, Vec<usize>) =
        (0..n).partition(|&i| shares[i] < COLUMN);
    while let (Some(&under), Some(&over)) = (small.last(), large.last()) {
        small.pop();
        columns[under] = Column {
            // Below 2^32: a share below one column.
            threshold: shares[under] as u32,
            alias: over as u32,
        };
        shares[over] -= COLUMN - shares[under];
        if shares[over] < COLUMN {
            large.pop();
            small.push(over);
        }
    }
    columns.into_boxed_slice()
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
    // To a relative 1e-9: closer than any load report is accurate.
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
                .expect("valid setting")
                .weight(&endpoints[0], LATER)
        };
        assert_eq!(weight(0.0), Some(200.0));
        assert_eq!(weight(1.0), Some(100.0));
        assert_eq!(weight(3.0), Some(50.0));
    }

    #[test]
    fn a_penalty_that_is_negative_nan_or_infinite_is_refused_by_name() {
        for bad in [f64::NAN, -3.0, f64::INFINITY] {
            let error = WeightedRoundRobin::new()
                .error_utilization_penalty(bad)
                .unwrap_err();
            assert_eq!(
                error.setting(),
                "WeightedRoundRobin::error_utilization_penalty"
            );
        }
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
        // Weights as far apart as f64 goes scale without NaN or overflow,
        // and every endpoint keeps a part of the table.
        let scaled = scale(&[f64::MAX, f64::MIN_POSITIVE, 0.0, 1.0]);
        assert_eq!(scaled.len(), 4);
        assert!(scaled.iter().all(|&w| w > 0.0 && w <= 1.0), "{scaled:?}");
        let columns = alias_table(&scaled);
        assert_eq!(columns.len(), 4);
        assert!(shares(&columns).iter().all(|&s| s > 0), "{columns:?}");
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
        // However lopsided the weights, a pick is one step of the counter.
        let draws = schedule.sequence.load(Ordering::Relaxed) - start;
        assert_eq!(draws, picks as u64);
    }

    #[test]
    fn alias_table_follows_random_weights_in_one_draw_per_pick() {
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
            assert_eq!(schedule.columns.len(), if n < 2 { 0 } else { n });
            let picks = 20_000 * n;
            let mut counts = vec![0; n];
            let start = schedule.sequence.load(Ordering::Relaxed);
            for _ in 0..picks {
                counts[wrr.pick(&schedule, &endpoints[..], &ctx).unwrap()] += 1;
            }
            let draws = schedule.sequence.load(Ordering::Relaxed) - start;
            assert_eq!(draws, picks as u64, "n={n}");
            assert_proportional(&counts, &weights, 0.01);
        }
    }

    /// Each endpoint's part of the table, in `2^-32` of a column, from the
    /// columns alone; checks that every column is well formed.
    fn shares(columns: &[Column]) -> Vec<u64> {
        let mut shares = vec![0; columns.len()];
        for (i, column) in columns.iter().enumerate() {
            let alias = column.alias as usize;
            assert!(alias < columns.len(), "column {i}: {column:?}");
            if alias == i {
                // Its own endpoint's alone, whatever the threshold.
                shares[i] += COLUMN;
            } else {
                shares[i] += u64::from(column.threshold);
                shares[alias] += COLUMN - u64::from(column.threshold);
            }
        }
        shares
    }

    #[test]
    fn alias_table_gives_every_endpoint_its_exact_share() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::SmallRng::seed_from_u64(6);
        let mut cases = vec![
            vec![1.0, 2.0, 3.0, 4.0],
            vec![1.0, 1.0, 2.0],
            // The floor and the cap: one far below, one far above.
            scale(&[1e-9, 1.0, 1.0, 1.0, 1e9]),
        ];
        for n in [2, 3, 10, 100, 1_000] {
            cases.push((0..n).map(|_| rng.random_range(0.01..10.0)).collect());
            cases.push((1..=n).map(|i| i as f64).collect());
        }
        for weights in cases {
            let n = weights.len();
            let columns = alias_table(&weights);
            assert_eq!(columns.len(), n);
            let shares = shares(&columns);
            // Exactly `n` columns in all, each endpoint within a few units
            // (of 2^-32 of a column) of its weight's share.
            assert_eq!(shares.iter().sum::<u64>(), COLUMN * n as u64);
            let sum: f64 = weights.iter().sum();
            for (i, (&share, &w)) in shares.iter().zip(&weights).enumerate() {
                let expected = w / sum * (COLUMN * n as u64) as f64;
                assert!(share > 0, "endpoint {i} has no part of the table");
                assert!(
                    (share as f64 - expected).abs() <= n as f64 + 1.0,
                    "n={n} endpoint {i}: {share} vs {expected}"
                );
            }
        }
        // Equal weights, or fewer than two: no table, plain round robin.
        assert!(alias_table(&[0.5; 7]).is_empty());
        assert!(alias_table(&[1.0]).is_empty());
        assert!(alias_table(&[]).is_empty());
    }

    #[test]
    fn picks_are_spread_evenly_not_in_bursts() {
        // Weights 1:1:2: in every window of 40 consecutive picks, each
        // endpoint gets its share (10, 10, 20) to within 3, whatever the
        // counter starts at.
        let weights = [1.0, 1.0, 2.0];
        let endpoints = weighted_loads(&weights);
        let rtt = RttEstimate::DEFAULT;
        let ctx = PickContext::new(LATER, &rtt);
        let wrr = WeightedRoundRobin::new();
        let window = 40;
        for start in [None, Some(0), Some(u64::MAX - 1_000)] {
            let schedule = wrr.schedule(&endpoints[..], &ctx);
            if let Some(start) = start {
                schedule.sequence.store(start, Ordering::Relaxed);
            }
            let picks: Vec<usize> = (0..20_000)
                .map(|_| wrr.pick(&schedule, &endpoints[..], &ctx).unwrap())
                .collect();
            let mut counts = [0i64; 3];
            for (j, &endpoint) in picks.iter().enumerate() {
                counts[endpoint] += 1;
                if j >= window {
                    counts[picks[j - window]] -= 1;
                }
                if j + 1 >= window {
                    for (i, (&c, &w)) in counts.iter().zip(&weights).enumerate() {
                        let expected = window as f64 * w / 4.0;
                        assert!(
                            (c as f64 - expected).abs() <= 3.0,
                            "start {start:?}, picks {}..={j}: endpoint {i} {c} times",
                            j + 1 - window
                        );
                    }
                }
            }
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
    fn a_retry_takes_no_turn() {
        let rtt = RttEstimate::DEFAULT;
        let ctx = PickContext::new(0, &rtt);
        let endpoints = weighted_loads(&[1.0, 2.0, 3.0]);
        let wrr = WeightedRoundRobin::new();
        let schedule = wrr.schedule(&endpoints[..], &ctx);
        let before = schedule.sequence.load(Ordering::Relaxed);
        let retry = PickContext::new(0, &rtt).retry(true);
        for _ in 0..10 {
            assert!(wrr
                .pick(&schedule, &endpoints[..], &retry)
                .is_some_and(|i| i < 3));
        }
        assert_eq!(schedule.sequence.load(Ordering::Relaxed), before);
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
        let error = wrr
            .weight_update_period(Duration::from_millis(10))
            .unwrap_err();
        assert_eq!(error.setting(), "WeightedRoundRobin::weight_update_period");
        let fast = wrr
            .weight_update_period(Duration::from_millis(100))
            .expect("valid setting");
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

    #[test]
    fn static_weights_steer_picks_until_reports_come_in() {
        let endpoints = loads(3);
        for (load, weight) in endpoints.iter().zip([1.0, 2.0, 5.0]) {
            assert!(load.set_static_weight(weight));
        }
        let wrr = WeightedRoundRobin::new();
        let picked = counts(&wrr, &endpoints, LATER, 80_000);
        assert_proportional(&picked, &[1.0, 2.0, 5.0], 0.01);
        // Reports past the blackout take over: equal capacity, even spread.
        for load in &endpoints {
            assert!(load.record_reported_load(100.0, 0.0, 0.5, 0));
            assert!(load.record_reported_load(100.0, 0.0, 0.5, LATER));
        }
        assert_eq!(counts(&wrr, &endpoints, LATER, 30_000), vec![10_000; 3]);
    }

    #[test]
    fn an_endpoint_in_slow_start_gets_its_factor_of_its_weight() {
        let endpoints = weighted_loads(&[1.0, 2.0, 2.0]);
        endpoints[1].set_slow_start_factor(0.5);
        let picked = counts(&WeightedRoundRobin::new(), &endpoints, LATER, 60_000);
        assert_proportional(&picked, &[1.0, 1.0, 2.0], 0.01);
        // Without weights, the factors alone.
        let plain = loads(3);
        plain[0].set_slow_start_factor(0.2);
        let picked = counts(&WeightedRoundRobin::new(), &plain, LATER, 60_000);
        assert_proportional(&picked, &[0.2, 1.0, 1.0], 0.01);
    }

    #[test]
    fn slow_starts_at_zero_give_round_robin_not_one_endpoint() {
        let plain = loads(4);
        for load in &plain {
            load.set_slow_start_factor(0.0);
        }
        let picked = counts(&WeightedRoundRobin::new(), &plain, LATER, 4_000);
        assert_eq!(picked, vec![1_000; 4]);
    }

    #[test]
    fn one_reported_weight_leaves_the_static_weights_in_charge() {
        let endpoints = loads(2);
        assert!(endpoints[1].set_static_weight(3.0));
        assert!(endpoints[0].record_reported_load(100.0, 0.0, 0.5, 0));
        assert!(endpoints[0].record_reported_load(100.0, 0.0, 0.5, LATER));
        let picked = counts(&WeightedRoundRobin::new(), &endpoints, LATER, 40_000);
        assert_proportional(&picked, &[1.0, 3.0], 0.01);
    }
}
