//! Endpoint health: outlier detection from the balancer's own traffic,
//! active health checks ([`HealthCheck`], [`ActiveCheck`]: see
//! [`Builder::health_check`](crate::balance::Builder::health_check)), and the
//! panic threshold.
//!
//! Every response is [classified](crate::classify) as a success or a failure
//! of its endpoint. With [`OutlierDetection`] on the
//! [builder](crate::balance::Builder::outlier_detection), endpoints that fail are
//! *ejected*: they leave the set that requests pick from, and come back when
//! their ejection time is up. The semantics are gRPC's A50 and Envoy's:
//!
//! - **Consecutive failures** (default 5): the endpoint is ejected as soon as
//!   that many requests in a row fail. Counted on the request path, so a
//!   sequential caller sends exactly that many requests to a dead endpoint.
//!   One lost connection is one event: when a connection dies under several
//!   requests at once (a server reloading or restarting closes its
//!   keep-alive connections, an idle timeout races a request), the first of
//!   those failures counts in a row and the others, which had started
//!   before it, count only in the totals below. A request started after it
//!   that loses its connection too is a new event, so a server that keeps
//!   dropping connections is ejected as before.
//! - **Success rate**: every [interval](OutlierDetection::interval), among
//!   endpoints with at least `request_volume` requests in the interval (and
//!   only if at least `minimum_hosts` of them), eject those whose success
//!   rate is below `mean - stdev x stdev_factor`.
//! - **Failure percentage** (off by default): every interval, eject endpoints
//!   whose failure percentage is above a threshold.
//! - **Latency** (opt-in, beyond A50): eject an endpoint whose latency
//!   estimate stays above `factor x` the median of its peers for several
//!   intervals in a row.
//!
//! An ejection lasts `min(base x multiplier, max(base, max_ejection_time))`.
//! The multiplier grows by one with each ejection and drops by one for each
//! interval the endpoint spends in service, so a flapping endpoint stays out
//! longer and longer. At most `max_ejection_percent` of the endpoints are out
//! at once (and at least one may be, as in gRPC).
//!
//! The interval detectors read per-endpoint counters that the request path
//! only increments; the driver task keeps each endpoint's reading from the
//! previous interval and works from the difference. That is A50's pair of
//! swapped call-count buckets, with the swap taken off the request path.
//!
//! **Active checks** take an endpoint out of service while it fails its
//! check or has not passed it yet; the detectors above judge the rest.
//!
//! **Connections** being made or failing to be made
//! ([`ConnectionState`]) make an endpoint the last choice without taking it
//! out of service: it is not picked while another endpoint's connection is
//! ready.
//!
//! **Panic threshold:** when fewer than
//! [`panic_threshold`](crate::balance::Builder::panic_threshold) percent (default 50)
//! of the endpoints are in service, the balancer balances over all of them,
//! ejected ones included, rather than pile every request onto the few.

mod check;
mod connectivity;
mod detect;
mod ejection;
mod slow_start;
mod tracker;

pub use self::check::{
    ActiveCheck, CheckAddress, CheckStatus, CheckTask, HealthCheck, HealthReporter, NoActiveCheck,
};
pub use self::connectivity::{
    ConnectionState, ConnectionStates, ConnectionStatus, NoConnectionStates,
};
pub use self::slow_start::SlowStart;

pub(crate) use self::check::{reports, CheckId, ReportSender, Verdict};

pub(crate) use self::detect::{
    failure_percentage_outliers, latency_outliers, success_rate_outliers, IntervalCounts,
};
pub(crate) use self::ejection::EjectionRecord;
pub(crate) use self::tracker::{EndpointHealth, Health, HealthSettings, Monitored, View};

use std::fmt;
use std::time::Duration;

use crate::setting::{self, InvalidSetting};

/// Why an endpoint was ejected, for the tracing event.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum EjectionReason {
    ConsecutiveFailures(u32),
    SuccessRate {
        rate: f64,
        threshold: f64,
    },
    FailurePercentage {
        percent: f64,
        threshold: u32,
    },
    Latency {
        estimate: Duration,
        median: Duration,
        intervals: u32,
    },
}

impl fmt::Display for EjectionReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::ConsecutiveFailures(n) => write!(f, "{n} consecutive failures"),
            Self::SuccessRate { rate, threshold } => write!(
                f,
                "success rate {:.1} % below the threshold of {:.1} %",
                rate * 100.0,
                threshold * 100.0
            ),
            Self::FailurePercentage { percent, threshold } => write!(
                f,
                "{percent:.1} % of requests failed, above the threshold of {threshold} %"
            ),
            Self::Latency {
                estimate,
                median,
                intervals,
            } => write!(
                f,
                "latency estimate {estimate:?} against a median of {median:?} for {intervals} intervals"
            ),
        }
    }
}

/// Outlier detection settings: the detectors and how long ejections last.
///
/// `OutlierDetection::new()` has Envoy's defaults: consecutive failures and
/// success rate on, failure percentage and latency off, a 10 s interval,
/// 30 s base ejection time, 300 s maximum, 10 % at most ejected.
///
/// ```
/// use std::time::Duration;
/// use tower_lb::health::{FailurePercentage, OutlierDetection};
///
/// let detection = OutlierDetection::new()
///     .interval(Duration::from_secs(5))?
///     .base_ejection_time(Duration::from_secs(10))
///     .max_ejection_percent(50)?
///     .consecutive_failures(3)?
///     .failure_percentage(FailurePercentage::new().threshold(50)?);
/// # let _ = detection;
/// # Ok::<_, tower_lb::error::InvalidSetting>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct OutlierDetection {
    pub(crate) interval: Duration,
    pub(crate) base_ejection_time: Duration,
    pub(crate) max_ejection_time: Duration,
    pub(crate) max_ejection_percent: u32,
    pub(crate) consecutive_failures: Option<u32>,
    pub(crate) success_rate: Option<SuccessRate>,
    pub(crate) failure_percentage: Option<FailurePercentage>,
    pub(crate) latency: Option<LatencyOutliers>,
}

impl OutlierDetection {
    /// Envoy's defaults (see the type's documentation).
    pub fn new() -> Self {
        Self {
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 10,
            consecutive_failures: Some(5),
            success_rate: Some(SuccessRate::new()),
            failure_percentage: None,
            latency: None,
        }
    }

    /// How often the interval detectors run and ejection multipliers decay.
    /// Default 10 s.
    ///
    /// # Errors
    ///
    /// When `interval` is shorter than 1 ms.
    pub fn interval(mut self, interval: Duration) -> Result<Self, InvalidSetting> {
        self.interval = setting::check(
            "OutlierDetection::interval",
            interval,
            interval >= Duration::from_millis(1),
            "1 ms or longer",
        )?;
        Ok(self)
    }

    /// The ejection time of a first ejection. Default 30 s.
    pub fn base_ejection_time(mut self, time: Duration) -> Self {
        self.base_ejection_time = time;
        self
    }

    /// The cap on ejection time (never below the base). Default 300 s.
    pub fn max_ejection_time(mut self, time: Duration) -> Self {
        self.max_ejection_time = time;
        self
    }

    /// At most this percentage of the endpoints is ejected at once; an
    /// endpoint is ejected only while fewer than this share are out, so one
    /// may always be. Default 10; 0 ejects nothing.
    ///
    /// # Errors
    ///
    /// When `percent` is above 100.
    pub fn max_ejection_percent(mut self, percent: u32) -> Result<Self, InvalidSetting> {
        self.max_ejection_percent =
            setting::percent("OutlierDetection::max_ejection_percent", percent)?;
        Ok(self)
    }

    /// Ejects an endpoint after this many failures in a row. Default 5;
    /// [`no_consecutive_failures`](Self::no_consecutive_failures) turns
    /// this detector off.
    ///
    /// # Errors
    ///
    /// When `failures` is 0.
    pub fn consecutive_failures(mut self, failures: u32) -> Result<Self, InvalidSetting> {
        self.consecutive_failures = Some(setting::at_least_one(
            "OutlierDetection::consecutive_failures",
            failures,
        )?);
        Ok(self)
    }

    /// No ejection for failures in a row.
    pub fn no_consecutive_failures(mut self) -> Self {
        self.consecutive_failures = None;
        self
    }

    /// The success-rate detector. Default on, with [`SuccessRate::new`];
    /// [`no_success_rate`](Self::no_success_rate) turns it off.
    pub fn success_rate(mut self, detector: SuccessRate) -> Self {
        self.success_rate = Some(detector);
        self
    }

    /// No success-rate detector.
    pub fn no_success_rate(mut self) -> Self {
        self.success_rate = None;
        self
    }

    /// The failure-percentage detector. Default off;
    /// [`no_failure_percentage`](Self::no_failure_percentage) turns it off
    /// again.
    pub fn failure_percentage(mut self, detector: FailurePercentage) -> Self {
        self.failure_percentage = Some(detector);
        self
    }

    /// No failure-percentage detector.
    pub fn no_failure_percentage(mut self) -> Self {
        self.failure_percentage = None;
        self
    }

    /// The latency detector. Default off. Turning it on makes the balancer
    /// time requests whatever its strategy; [`no_latency`](Self::no_latency)
    /// turns it off again.
    pub fn latency(mut self, detector: LatencyOutliers) -> Self {
        self.latency = Some(detector);
        self
    }

    /// No latency detector.
    pub fn no_latency(mut self) -> Self {
        self.latency = None;
        self
    }

    /// How long the ejection that raised the multiplier to `multiplier` lasts:
    /// `min(base x multiplier, max(base, max_ejection_time))`.
    pub fn ejection_time(&self, multiplier: u32) -> Duration {
        let cap = self.base_ejection_time.max(self.max_ejection_time);
        self.base_ejection_time
            .checked_mul(multiplier)
            .map_or(cap, |t| t.min(cap))
    }

    /// Whether one more endpoint may be ejected when `ejected` of `total` are.
    pub(crate) fn may_eject(&self, ejected: usize, total: usize) -> bool {
        (ejected as u128) * 100 < (self.max_ejection_percent as u128) * (total as u128)
    }
}

impl Default for OutlierDetection {
    fn default() -> Self {
        Self::new()
    }
}

/// The success-rate detector: ejects endpoints whose success rate in an
/// interval is below `mean - stdev x stdev_factor` of their peers'.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SuccessRate {
    pub(crate) stdev_factor: f64,
    pub(crate) minimum_hosts: usize,
    pub(crate) request_volume: u64,
}

impl SuccessRate {
    /// A50's defaults: factor 1.9, at least 5 endpoints with at least 100
    /// requests each in the interval.
    pub fn new() -> Self {
        Self {
            stdev_factor: 1.9,
            minimum_hosts: 5,
            request_volume: 100,
        }
    }

    /// How many standard deviations below the mean is an outlier. Default
    /// 1.9.
    ///
    /// # Errors
    ///
    /// When `factor` is negative, NaN or infinite.
    pub fn stdev_factor(mut self, factor: f64) -> Result<Self, InvalidSetting> {
        self.stdev_factor = setting::finite_at_least(
            "SuccessRate::stdev_factor",
            factor,
            0.0,
            "a finite number, 0 or more",
        )?;
        Ok(self)
    }

    /// The detector runs only when at least this many endpoints have enough
    /// requests. Default 5.
    pub fn minimum_hosts(mut self, hosts: usize) -> Self {
        self.minimum_hosts = hosts;
        self
    }

    /// Requests an endpoint needs in the interval to be judged. Default 100.
    pub fn request_volume(mut self, requests: u64) -> Self {
        self.request_volume = requests;
        self
    }
}

impl Default for SuccessRate {
    fn default() -> Self {
        Self::new()
    }
}

/// The failure-percentage detector: ejects endpoints whose share of failed
/// requests in an interval is above a threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailurePercentage {
    pub(crate) threshold: u32,
    pub(crate) minimum_hosts: usize,
    pub(crate) request_volume: u64,
}

impl FailurePercentage {
    /// A50's defaults: above 85 % failures, at least 5 endpoints with at least
    /// 50 requests each in the interval.
    pub fn new() -> Self {
        Self {
            threshold: 85,
            minimum_hosts: 5,
            request_volume: 50,
        }
    }

    /// Failure percentage above which an endpoint is ejected. Default 85;
    /// 100 ejects nothing.
    ///
    /// # Errors
    ///
    /// When `percent` is above 100.
    pub fn threshold(mut self, percent: u32) -> Result<Self, InvalidSetting> {
        self.threshold = setting::percent("FailurePercentage::threshold", percent)?;
        Ok(self)
    }

    /// The detector runs only when at least this many endpoints have enough
    /// requests. Default 5.
    pub fn minimum_hosts(mut self, hosts: usize) -> Self {
        self.minimum_hosts = hosts;
        self
    }

    /// Requests an endpoint needs in the interval to be judged. Default 50.
    pub fn request_volume(mut self, requests: u64) -> Self {
        self.request_volume = requests;
        self
    }
}

impl Default for FailurePercentage {
    fn default() -> Self {
        Self::new()
    }
}

/// The latency detector (beyond A50): ejects an endpoint whose latency
/// estimate is above `factor x` the median of its peers' at the end of
/// `intervals` intervals in a row. It catches a node that answers, and
/// answers successfully, but far too slowly.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LatencyOutliers {
    pub(crate) factor: f64,
    pub(crate) intervals: u32,
    pub(crate) minimum_hosts: usize,
}

impl LatencyOutliers {
    /// Factor 3 over the median, for 3 intervals in a row, among at least 3
    /// endpoints.
    pub fn new() -> Self {
        Self {
            factor: 3.0,
            intervals: 3,
            minimum_hosts: 3,
        }
    }

    /// How many times the median latency is an outlier. Default 3.
    ///
    /// # Errors
    ///
    /// When `factor` is below 1, NaN or infinite.
    pub fn factor(mut self, factor: f64) -> Result<Self, InvalidSetting> {
        self.factor = setting::finite_at_least(
            "LatencyOutliers::factor",
            factor,
            1.0,
            "a finite number, 1 or more",
        )?;
        Ok(self)
    }

    /// Intervals in a row an endpoint must be an outlier. Default 3.
    ///
    /// # Errors
    ///
    /// When `intervals` is 0.
    pub fn intervals(mut self, intervals: u32) -> Result<Self, InvalidSetting> {
        self.intervals = setting::at_least_one("LatencyOutliers::intervals", intervals)?;
        Ok(self)
    }

    /// The detector runs only with at least this many endpoints in service.
    /// Default 3.
    pub fn minimum_hosts(mut self, hosts: usize) -> Self {
        self.minimum_hosts = hosts;
        self
    }
}

impl Default for LatencyOutliers {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ejection_time_grows_with_the_multiplier_up_to_the_cap() {
        let d = OutlierDetection::new()
            .base_ejection_time(Duration::from_secs(30))
            .max_ejection_time(Duration::from_secs(100));
        assert_eq!(d.ejection_time(1), Duration::from_secs(30));
        assert_eq!(d.ejection_time(2), Duration::from_secs(60));
        assert_eq!(d.ejection_time(4), Duration::from_secs(100));
        assert_eq!(d.ejection_time(u32::MAX), Duration::from_secs(100));
    }

    #[test]
    fn ejection_time_is_never_below_the_base_even_with_a_smaller_max() {
        let d = OutlierDetection::new()
            .base_ejection_time(Duration::from_secs(30))
            .max_ejection_time(Duration::from_secs(5));
        assert_eq!(d.ejection_time(3), Duration::from_secs(30));
    }

    #[test]
    fn max_ejection_percent_allows_one_ejection_even_when_it_rounds_to_zero() {
        let d = OutlierDetection::new()
            .max_ejection_percent(10)
            .expect("valid setting");
        assert!(d.may_eject(0, 3));
        assert!(!d.may_eject(1, 3));
        assert!(d.may_eject(1, 20));
        assert!(!d.may_eject(2, 20));
    }

    #[test]
    fn zero_max_ejection_percent_ejects_nothing() {
        let d = OutlierDetection::new()
            .max_ejection_percent(0)
            .expect("valid setting");
        assert!(!d.may_eject(0, 100));
    }

    #[test]
    fn factors_that_are_not_finite_or_too_small_are_refused_by_name() {
        for bad in [f64::NAN, f64::INFINITY, -1.0] {
            let error = SuccessRate::new().stdev_factor(bad).unwrap_err();
            assert_eq!(error.setting(), "SuccessRate::stdev_factor");
        }
        for bad in [f64::NAN, f64::INFINITY, 0.5] {
            let error = LatencyOutliers::new().factor(bad).unwrap_err();
            assert_eq!(error.setting(), "LatencyOutliers::factor");
        }
    }

    #[test]
    fn an_interval_shorter_than_a_millisecond_is_refused_by_name() {
        let error = OutlierDetection::new()
            .interval(Duration::from_micros(999))
            .unwrap_err();
        assert_eq!(error.setting(), "OutlierDetection::interval");
        assert!(OutlierDetection::new()
            .interval(Duration::from_millis(1))
            .is_ok());
    }

    #[test]
    fn percentages_above_100_and_counts_of_zero_are_refused_by_name() {
        let error = OutlierDetection::new()
            .max_ejection_percent(101)
            .unwrap_err();
        assert_eq!(error.setting(), "OutlierDetection::max_ejection_percent");
        assert_eq!(error.value(), "101");
        let error = OutlierDetection::new().consecutive_failures(0).unwrap_err();
        assert_eq!(error.setting(), "OutlierDetection::consecutive_failures");
        assert!(FailurePercentage::new().threshold(101).is_err());
        assert!(LatencyOutliers::new().intervals(0).is_err());
    }
}
