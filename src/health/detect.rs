//! The interval detectors as pure functions of one interval's numbers, so
//! that the arithmetic is tested apart from the driver that feeds it.

use super::{FailurePercentage, LatencyOutliers, SuccessRate};

/// One endpoint's outcomes in one interval.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct IntervalCounts {
    pub(crate) successes: u64,
    pub(crate) failures: u64,
}

impl IntervalCounts {
    pub(crate) fn requests(&self) -> u64 {
        self.successes + self.failures
    }

    fn success_rate(&self) -> f64 {
        self.successes as f64 / self.requests() as f64
    }
}

/// The endpoints with at least `request_volume` requests, each with
/// `measure` of its counts; empty unless at least `minimum_hosts` (and one)
/// qualify.
fn judged(
    counts: &[IntervalCounts],
    request_volume: u64,
    minimum_hosts: usize,
    measure: impl Fn(&IntervalCounts) -> f64,
) -> Vec<(usize, f64)> {
    let judged: Vec<(usize, f64)> = counts
        .iter()
        .enumerate()
        .filter(|(_, c)| c.requests() >= request_volume.max(1))
        .map(|(i, c)| (i, measure(c)))
        .collect();
    if judged.len() < minimum_hosts.max(1) {
        return Vec::new();
    }
    judged
}

/// Endpoints (indices into `counts`) whose success rate is below
/// `mean - stdev x factor`, worst first, with their rate and the threshold.
pub(crate) fn success_rate_outliers(
    counts: &[IntervalCounts],
    detector: &SuccessRate,
) -> Vec<(usize, f64, f64)> {
    let judged = judged(
        counts,
        detector.request_volume,
        detector.minimum_hosts,
        IntervalCounts::success_rate,
    );
    if judged.is_empty() {
        return Vec::new();
    }
    let n = judged.len() as f64;
    let mean = judged.iter().map(|(_, r)| r).sum::<f64>() / n;
    let variance = judged.iter().map(|(_, r)| (r - mean).powi(2)).sum::<f64>() / n;
    let threshold = mean - variance.sqrt() * detector.stdev_factor;
    let mut outliers: Vec<(usize, f64, f64)> = judged
        .into_iter()
        .filter(|&(_, rate)| rate < threshold)
        .map(|(i, rate)| (i, rate, threshold))
        .collect();
    outliers.sort_by(|a, b| a.1.total_cmp(&b.1));
    outliers
}

/// Endpoints whose failure percentage is above the threshold, worst first,
/// with their percentage.
pub(crate) fn failure_percentage_outliers(
    counts: &[IntervalCounts],
    detector: &FailurePercentage,
) -> Vec<(usize, f64)> {
    let judged = judged(
        counts,
        detector.request_volume,
        detector.minimum_hosts,
        |c| 100.0 * c.failures as f64 / c.requests() as f64,
    );
    let mut outliers: Vec<(usize, f64)> = judged
        .into_iter()
        .filter(|&(_, percent)| percent > detector.threshold as f64)
        .collect();
    outliers.sort_by(|a, b| b.1.total_cmp(&a.1));
    outliers
}

/// Below this share of failures in its interval, an endpoint that failed
/// so many times in a row may be failing only as its peers do.
const BROKEN_SHARE: f64 = 0.9;

/// Below this share of failures, a fleet is not overloaded: its
/// endpoints' failures are their own.
const FLEET_FAILING_SHARE: f64 = 0.1;

/// Whether an endpoint that failed so many times in a row is failing about
/// as often as its peers, so that its failures say the fleet is overloaded
/// (every server shedding load) rather than that it is an outlier: it
/// failed less than [`BROKEN_SHARE`] of its recent requests (`own`), the
/// median of its peers with at least `volume` recent requests failed at
/// least [`FLEET_FAILING_SHARE`] of theirs (a fleet in trouble, not its
/// background errors), and at least half as large a share as it did.
/// Returns the peers' median share and its own; `None` (an outlier)
/// otherwise.
///
/// The median, not the lowest: an endpoint just back from an ejection (or
/// one that happened to start its window before the overload did) shows a
/// low share for a while, and would make every other one an outlier.
///
/// Ejecting an overloaded server moves its load onto the others, which are
/// overloaded too; Envoy's consecutive-5xx rule does so up to its ejection
/// cap, while gRPC's detectors (success rate against the mean, failure
/// percentage above 85 %) do not eject under a uniform overload.
pub(crate) fn fails_like_its_peers(
    own: IntervalCounts,
    peers: &[IntervalCounts],
    volume: u64,
) -> Option<(f64, f64)> {
    let share = |c: &IntervalCounts| c.failures as f64 / c.requests() as f64;
    if own.requests() == 0 {
        return None;
    }
    let own = share(&own);
    if own >= BROKEN_SHARE {
        return None;
    }
    let mut shares: Vec<f64> = peers
        .iter()
        .filter(|c| c.requests() >= volume.max(1))
        .map(share)
        .collect();
    let median = median(&mut shares)?;
    (median >= FLEET_FAILING_SHARE && median * 2.0 >= own).then_some((median, own))
}

/// The median of `values` (the mean of the two middle ones for an even
/// count), sorting them; `None` when there are none.
fn median(values: &mut [f64]) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    match values.len() {
        0 => None,
        n if n % 2 == 0 => Some((values[mid - 1] + values[mid]) / 2.0),
        _ => Some(values[mid]),
    }
}

/// For each endpoint, whether its latency estimate is above `factor x` the
/// median of the estimates given. `None` marks an endpoint with no fresh
/// sample this interval: it is neither judged nor part of the median.
pub(crate) fn latency_outliers(
    estimates: &[Option<f64>],
    detector: &LatencyOutliers,
) -> (Vec<bool>, f64) {
    let mut measured: Vec<f64> = estimates
        .iter()
        .flatten()
        .copied()
        .filter(|v| v.is_finite())
        .collect();
    let enough = measured.len() >= detector.minimum_hosts;
    let Some(median) = enough.then(|| median(&mut measured)).flatten() else {
        return (vec![false; estimates.len()], f64::NAN);
    };
    let limit = median * detector.factor;
    let flags = estimates
        .iter()
        .map(|e| matches!(e, Some(v) if *v > limit))
        .collect();
    (flags, median)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(successes: u64, failures: u64) -> IntervalCounts {
        IntervalCounts {
            successes,
            failures,
        }
    }

    #[test]
    fn success_rate_flags_the_one_endpoint_at_half_errors_among_six_healthy() {
        let mut all = vec![counts(100, 0); 6];
        all.push(counts(50, 50));
        let out = success_rate_outliers(&all, &SuccessRate::new());
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].0, 6);
        assert!((out[0].1 - 0.5).abs() < 1e-9);
    }

    #[test]
    fn success_rate_flags_nobody_when_all_are_healthy() {
        let all = vec![counts(100, 0); 7];
        assert!(success_rate_outliers(&all, &SuccessRate::new()).is_empty());
    }

    #[test]
    fn success_rate_needs_minimum_hosts_with_enough_volume() {
        let mut all = vec![counts(100, 0); 4];
        all.push(counts(0, 100));
        // Two more endpoints, but below the request volume: not judged.
        all.push(counts(10, 0));
        all.push(counts(10, 0));
        assert_eq!(success_rate_outliers(&all, &SuccessRate::new())[0].0, 4);
        let strict = SuccessRate::new().minimum_hosts(6);
        assert!(success_rate_outliers(&all, &strict).is_empty());
    }

    #[test]
    fn failure_percentage_flags_endpoints_above_the_threshold_worst_first() {
        let mut all = vec![counts(50, 0); 5];
        all.push(counts(10, 90));
        all.push(counts(0, 100));
        all.push(counts(20, 80));
        let out = failure_percentage_outliers(&all, &FailurePercentage::new());
        let indices: Vec<usize> = out.iter().map(|o| o.0).collect();
        assert_eq!(indices, vec![6, 5]);
    }

    #[test]
    fn failure_percentage_ignores_endpoints_below_the_request_volume() {
        let mut all = vec![counts(50, 0); 5];
        all.push(counts(0, 49));
        assert!(failure_percentage_outliers(&all, &FailurePercentage::new()).is_empty());
    }

    #[test]
    fn failures_in_a_row_among_peers_failing_as_often_are_overload_not_an_outlier() {
        // 45 % failed; the peers 40 and 35 %.
        let peers = [counts(60, 40), counts(65, 35)];
        assert_eq!(
            fails_like_its_peers(counts(55, 45), &peers, 5),
            Some((0.375, 0.45))
        );
    }

    #[test]
    fn healthy_peers_make_an_endpoint_that_fails_in_a_row_an_outlier() {
        let peers = [counts(60, 40), counts(100, 0), counts(99, 1)];
        assert_eq!(fails_like_its_peers(counts(55, 45), &peers, 5), None);
    }

    #[test]
    fn one_peer_with_few_failures_does_not_make_an_overload_an_outlier() {
        // Back from an ejection, or calm until lately: 14 %.
        let peers = [counts(86, 14), counts(60, 40), counts(55, 45)];
        assert_eq!(
            fails_like_its_peers(counts(55, 45), &peers, 5),
            Some((0.4, 0.45))
        );
    }

    #[test]
    fn an_endpoint_failing_nearly_everything_is_an_outlier_whatever_its_peers_do() {
        let peers = [counts(0, 100), counts(10, 90)];
        assert_eq!(fails_like_its_peers(counts(1, 19), &peers, 5), None);
    }

    #[test]
    fn background_errors_are_no_overload_even_when_the_endpoints_share_is_diluted() {
        // 995 answers, then dead for 5 in a row: 0.5 %, below the peers'
        // 1 %; but a fleet failing 1 % is not overloaded.
        let peers = [counts(990, 10), counts(991, 9), counts(989, 11)];
        assert_eq!(fails_like_its_peers(counts(995, 5), &peers, 5), None);
    }

    #[test]
    fn peers_without_volume_say_nothing_about_overload() {
        let peers = [counts(1, 2), counts(0, 0)];
        assert_eq!(fails_like_its_peers(counts(10, 5), &peers, 5), None);
        assert_eq!(fails_like_its_peers(counts(10, 5), &[], 5), None);
        // With the volume, they do.
        assert!(fails_like_its_peers(counts(10, 5), &[counts(3, 2)], 5).is_some());
    }

    #[test]
    fn latency_flags_an_estimate_above_factor_times_the_median() {
        let estimates = [Some(1.0), Some(1.2), Some(0.9), Some(10.0), None];
        let (flags, median) = latency_outliers(&estimates, &LatencyOutliers::new());
        assert_eq!(flags, vec![false, false, false, true, false]);
        assert!((median - 1.1).abs() < 1e-9);
    }

    #[test]
    fn latency_judges_nobody_below_minimum_hosts_or_on_nan() {
        let estimates = [Some(1.0), Some(f64::NAN), Some(10.0), None];
        let (flags, _) = latency_outliers(&estimates, &LatencyOutliers::new());
        assert_eq!(flags, vec![false; 4]);
    }
}
