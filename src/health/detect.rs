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
    if measured.is_empty() || measured.len() < detector.minimum_hosts {
        return (vec![false; estimates.len()], f64::NAN);
    }
    measured.sort_by(f64::total_cmp);
    let mid = measured.len() / 2;
    let median = if measured.len() % 2 == 0 {
        (measured[mid - 1] + measured[mid]) / 2.0
    } else {
        measured[mid]
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
