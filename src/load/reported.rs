//! The load an endpoint reports about itself (its last usable ORCA report),
//! kept in atomics for weighted round robin to read off the request path.

use std::sync::atomic::{AtomicU64, Ordering};

/// `non_empty_since_ns` when no usable report is current.
const UNSET: u64 = u64::MAX;

/// The last usable load report of an endpoint, as weighted round robin reads
/// it (gRPC A58's per-endpoint state).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReportedLoad {
    /// Requests per second the endpoint serves (`rps_fractional`).
    pub qps: f64,
    /// Errors per second (`eps`).
    pub eps: f64,
    /// `application_utilization`, or `cpu_utilization` when that is 0.
    pub utilization: f64,
    /// When the last usable report arrived, in nanoseconds on the balancer's
    /// health clock (tokio's, since the balancer was built).
    pub last_update_ns: u64,
    /// Since when usable reports have been arriving without a gap longer
    /// than the weight expiration (A58's `non_empty_since`).
    pub non_empty_since_ns: u64,
}

/// Atomic storage for [`ReportedLoad`]. The fields are written one by one:
/// a reader racing a writer may see a mix of two consecutive reports, which
/// for a weight recomputed every second is noise, not harm.
#[derive(Debug)]
pub(crate) struct ReportedLoadCell {
    qps: AtomicU64,
    eps: AtomicU64,
    utilization: AtomicU64,
    last_update_ns: AtomicU64,
    non_empty_since_ns: AtomicU64,
    /// Reports that could not be read.
    malformed: AtomicU64,
    /// The client's own view of the request rate, for reports that carry a
    /// utilization but no rate: requests counted at the start of the current
    /// one-second window, the window's start, and the last window's rate.
    window_requests: AtomicU64,
    window_start_ns: AtomicU64,
    observed_qps: AtomicU64,
}

/// How long the client counts requests to estimate an endpoint's rate.
const RATE_WINDOW_NS: u64 = 1_000_000_000;

impl Default for ReportedLoadCell {
    fn default() -> Self {
        Self {
            qps: AtomicU64::new(0),
            eps: AtomicU64::new(0),
            utilization: AtomicU64::new(0),
            last_update_ns: AtomicU64::new(0),
            non_empty_since_ns: AtomicU64::new(UNSET),
            malformed: AtomicU64::new(0),
            window_requests: AtomicU64::new(0),
            window_start_ns: AtomicU64::new(0),
            observed_qps: AtomicU64::new(0),
        }
    }
}

impl ReportedLoadCell {
    /// Records a report. As in A58, one with no load (`qps` or
    /// `utilization` zero) or with values that are not finite and
    /// non-negative is ignored and returns false.
    pub(crate) fn record(&self, qps: f64, eps: f64, utilization: f64, now_ns: u64) -> bool {
        let usable = |v: f64| v.is_finite() && v >= 0.0;
        if !(usable(qps) && usable(eps) && usable(utilization)) || qps == 0.0 || utilization == 0.0
        {
            return false;
        }
        self.qps.store(qps.to_bits(), Ordering::Relaxed);
        self.eps.store(eps.to_bits(), Ordering::Relaxed);
        self.utilization
            .store(utilization.to_bits(), Ordering::Relaxed);
        self.last_update_ns.store(now_ns, Ordering::Relaxed);
        // Only the first report of a run sets the start of the run.
        let _ = self.non_empty_since_ns.compare_exchange(
            UNSET,
            now_ns,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
        true
    }

    pub(crate) fn get(&self) -> Option<ReportedLoad> {
        let non_empty_since_ns = self.non_empty_since_ns.load(Ordering::Relaxed);
        if non_empty_since_ns == UNSET {
            return None;
        }
        let f = |a: &AtomicU64| f64::from_bits(a.load(Ordering::Relaxed));
        Some(ReportedLoad {
            qps: f(&self.qps),
            eps: f(&self.eps),
            utilization: f(&self.utilization),
            last_update_ns: self.last_update_ns.load(Ordering::Relaxed),
            non_empty_since_ns,
        })
    }

    /// Forgets the run of reports (the weight expired): the next report
    /// starts a new blackout period.
    pub(crate) fn forget(&self) {
        self.non_empty_since_ns.store(UNSET, Ordering::Relaxed);
    }

    /// The rate at which this client sent the endpoint requests over the
    /// last whole second (0 before one has passed), given `requests` started
    /// so far. Stands in for the rate in reports that carry none (a bare
    /// utilization header): from one client's view, capacity is what it
    /// sends divided by the utilization that causes.
    pub(crate) fn observed_qps(&self, requests: u64, now_ns: u64) -> f64 {
        let start = self.window_start_ns.load(Ordering::Relaxed);
        let elapsed = now_ns.saturating_sub(start);
        if elapsed >= RATE_WINDOW_NS
            && self
                .window_start_ns
                .compare_exchange(start, now_ns, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let before = self.window_requests.swap(requests, Ordering::Relaxed);
            // The first window starts at the epoch, before the endpoint was
            // known: it would understate the rate, so it is skipped.
            if start > 0 {
                let rate = requests.saturating_sub(before) as f64 * 1e9 / elapsed as f64;
                self.observed_qps.store(rate.to_bits(), Ordering::Relaxed);
            }
        }
        f64::from_bits(self.observed_qps.load(Ordering::Relaxed))
    }

    /// Takes over `old`'s report, run and counts (a replaced service of the
    /// same endpoint).
    pub(crate) fn copy_from(&self, old: &ReportedLoadCell) {
        let fields = [
            (&self.qps, &old.qps),
            (&self.eps, &old.eps),
            (&self.utilization, &old.utilization),
            (&self.last_update_ns, &old.last_update_ns),
            (&self.non_empty_since_ns, &old.non_empty_since_ns),
            (&self.malformed, &old.malformed),
            // Its request count starts again, so its rate window does too;
            // the last rate stands meanwhile.
            (&self.observed_qps, &old.observed_qps),
        ];
        for (new, old) in fields {
            new.store(old.load(Ordering::Relaxed), Ordering::Relaxed);
        }
    }

    pub(crate) fn count_malformed(&self) {
        self.malformed.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn malformed(&self) -> u64 {
        self.malformed.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn the_observed_rate_is_requests_per_second_over_whole_windows() {
        let cell = ReportedLoadCell::default();
        assert_eq!(
            cell.observed_qps(0, 5 * S),
            0.0,
            "the first window is skipped"
        );
        assert_eq!(cell.observed_qps(100, 5 * S + S / 2), 0.0, "mid-window");
        assert_eq!(cell.observed_qps(200, 6 * S), 200.0);
        assert_eq!(cell.observed_qps(500, 8 * S), 150.0);
    }

    #[test]
    fn nothing_is_reported_until_a_usable_report() {
        let cell = ReportedLoadCell::default();
        assert_eq!(cell.get(), None);
        assert!(!cell.record(0.0, 0.0, 0.5, 10));
        assert!(!cell.record(100.0, 0.0, 0.0, 10));
        assert!(!cell.record(f64::NAN, 0.0, 0.5, 10));
        assert!(!cell.record(100.0, -1.0, 0.5, 10));
        assert_eq!(cell.get(), None);
    }

    #[test]
    fn the_run_starts_at_the_first_report_and_restarts_after_forget() {
        let cell = ReportedLoadCell::default();
        assert!(cell.record(100.0, 1.0, 0.5, 10));
        assert!(cell.record(200.0, 2.0, 0.25, 20));
        let load = cell.get().unwrap_or_else(|| panic!("recorded"));
        assert_eq!((load.qps, load.eps, load.utilization), (200.0, 2.0, 0.25));
        assert_eq!((load.non_empty_since_ns, load.last_update_ns), (10, 20));
        cell.forget();
        assert_eq!(cell.get(), None);
        assert!(cell.record(100.0, 0.0, 0.5, 30));
        assert_eq!(cell.get().map(|l| l.non_empty_since_ns), Some(30));
    }
}
