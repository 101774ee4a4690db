//! The health rules over a balancer's endpoint set, as its driver task
//! applies them: ejection by the detectors and the ejection cap, return
//! when the ejection time is up, the slow-start ramps, and panic mode.
//!
//! The driver owns the endpoints and calls these rules on its events (a
//! trip, an interval tick, a return due, a ramp step, a publish); the rules
//! decide, and act on each endpoint through [`Monitored`]. Keeping them
//! here keeps the driver to discovery and snapshots, and every health
//! decision in one module.

use std::fmt;

use tokio::time::Instant;

use super::detect::{fails_like_its_peers, IntervalCounts};
use super::{
    failure_percentage_outliers, latency_outliers, success_rate_outliers, CheckStatus,
    EjectionReason, EjectionRecord, OutlierDetection, SlowStart, Verdict,
};
use crate::load::{EndpointLoad, RttEstimate};
use crate::topology::priority::{priority_load, LevelCounts, PriorityLoad};

/// What the health rules need from one of the balancer's endpoints.
pub(crate) trait Monitored {
    /// Its load record: counts and latency.
    fn load(&self) -> &EndpointLoad;
    /// Reached its consecutive-failure limit on the request path and waits
    /// for a decision.
    fn is_tripped(&self) -> bool;
    /// Takes it out of service until `until`.
    fn eject(&self, until: Instant);
    /// Puts it back in service.
    fn restore(&self);
    /// Shows where it stands with its active check.
    fn show_check(&self, status: CheckStatus);
}

/// The balancer's health settings.
#[derive(Debug, Clone)]
pub(crate) struct HealthSettings {
    pub(crate) outlier_detection: Option<OutlierDetection>,
    pub(crate) panic_threshold: u32,
    /// The priority levels' overprovisioning factor, in percent.
    pub(crate) overprovisioning_percent: u32,
    pub(crate) slow_start: Option<SlowStart>,
}

/// One endpoint's health, as remembered between events.
#[derive(Debug, Default)]
pub(crate) struct EndpointHealth {
    record: EjectionRecord,
    /// While in slow start: since when.
    slow_start_since: Option<Instant>,
    /// A newcomer that joined while its check had not answered: it begins
    /// its ramp when it first passes, not when it joined (a ramp begun then
    /// could be over before it ever served).
    ramp_on_first_pass: bool,
    /// With an active check: where it stands.
    check: Option<CheckStatus>,
}

impl EndpointHealth {
    pub(crate) fn is_ejected(&self) -> bool {
        self.record.is_ejected()
    }

    /// Its active check has not answered yet.
    pub(crate) fn is_pending(&self) -> bool {
        self.check == Some(CheckStatus::Pending)
    }

    /// Neither ejected nor kept out by its active check.
    pub(crate) fn is_in_service(&self) -> bool {
        !self.is_ejected() && self.check.is_none_or(CheckStatus::allows_traffic)
    }

    /// An active check has started on it: out of service until it passes.
    pub(crate) fn check_started<E: Monitored>(&mut self, endpoint: &E) {
        self.check = Some(CheckStatus::Pending);
        endpoint.show_check(CheckStatus::Pending);
    }

    /// The health a new service for the same key takes over: a stream that
    /// re-sends its set must not cancel an ejection, forget the multiplier
    /// or restart a ramp.
    pub(crate) fn for_new_service(&self) -> Self {
        Self {
            record: self.record.for_new_counters(),
            slow_start_since: self.slow_start_since,
            ramp_on_first_pass: self.ramp_on_first_pass,
            check: self.check,
        }
    }

    fn begin_slow_start(&mut self, slow_start: &SlowStart, load: &EndpointLoad) {
        self.slow_start_since = Some(Instant::now());
        load.set_slow_start_factor(slow_start.factor(std::time::Duration::ZERO));
    }
}

/// One endpoint as the rules see it: its key (for the events they log), its
/// health and the endpoint.
pub(crate) type View<'a, K, E> = (&'a K, &'a mut EndpointHealth, &'a E);

/// The health rules over the endpoint set, and what they remember of it.
#[derive(Debug)]
pub(crate) struct Health {
    detection: Option<OutlierDetection>,
    /// Below this percentage in service, publish every endpoint.
    panic_threshold: u32,
    overprovisioning_percent: u32,
    slow_start: Option<SlowStart>,
    /// How many endpoints are ejected.
    ejected: usize,
    /// Whether the last published set was in panic mode.
    panic: bool,
    /// Set once a set with endpoints was published: endpoints of the first
    /// set are not slow-started (there is nobody to spare them), as in
    /// Envoy.
    warmed: bool,
}

impl Health {
    pub(crate) fn new(settings: HealthSettings) -> Self {
        Self {
            detection: settings.outlier_detection,
            panic_threshold: settings.panic_threshold,
            overprovisioning_percent: settings.overprovisioning_percent,
            slow_start: settings.slow_start,
            ejected: 0,
            panic: false,
            warmed: false,
        }
    }

    /// How long to the next step of the slow-start ramps.
    pub(crate) fn slow_start_step(&self) -> Option<std::time::Duration> {
        self.slow_start.as_ref().map(SlowStart::step)
    }

    /// A key new to the set (its check, if any, already started): it starts
    /// its ramp, unless it belongs to the first set published; one waiting
    /// for its check's first answer starts it when it passes.
    pub(crate) fn joined(&self, health: &mut EndpointHealth, load: &EndpointLoad) {
        if let Some(slow_start) = self.slow_start.as_ref().filter(|_| self.warmed) {
            if health.is_pending() {
                health.ramp_on_first_pass = true;
            } else {
                health.begin_slow_start(slow_start, load);
            }
        }
    }

    /// A key gone from the set.
    pub(crate) fn left(&mut self, health: &EndpointHealth) {
        if health.is_ejected() {
            self.ejected -= 1;
        }
    }

    /// Ejects the endpoint at `index` if the cap allows; returns whether it
    /// did.
    fn try_eject<K: fmt::Debug, E: Monitored>(
        &mut self,
        views: &mut [View<'_, K, E>],
        index: usize,
        reason: EjectionReason,
        now: Instant,
    ) -> bool {
        let Some(detection) = &self.detection else {
            return false;
        };
        let (ejected, total) = (self.ejected, views.len());
        let Some((key, health, endpoint)) = views.get_mut(index) else {
            return false;
        };
        if health.record.is_ejected() {
            return false;
        }
        if !detection.may_eject(ejected, total) {
            tracing::info!(endpoint = ?key, %reason, ejected, endpoints = total,
                max_ejection_percent = detection.max_ejection_percent,
                "outlier not ejected: too many endpoints are out already");
            return false;
        }
        self.ejected += 1;
        let (time, returns_at, multiplier) = health.record.eject(now, detection);
        endpoint.eject(returns_at);
        tracing::warn!(endpoint = ?key, %reason, ejection_time = ?time, multiplier,
            ejected = ejected + 1, endpoints = total, "endpoint ejected");
        true
    }

    /// Ejects the endpoints that reached their consecutive-failure limit, or
    /// puts them back in service when the cap forbids.
    pub(crate) fn eject_tripped<K: fmt::Debug, E: Monitored>(
        &mut self,
        views: &mut [View<'_, K, E>],
    ) -> bool {
        let Some(limit) = self.failures_in_a_row() else {
            return false;
        };
        let volume = u64::from(limit);
        let now = Instant::now();
        let counts: Vec<IntervalCounts> = views.iter().map(recent).collect();
        let mut changed = false;
        for index in 0..views.len() {
            if !views[index].2.is_tripped() {
                continue;
            }
            if let Some((peers, own)) =
                fails_like_its_peers(counts[index], &peers_of(views, &counts, index), volume)
            {
                // `debug`: under an overload this comes with every five
                // failures in a row of any endpoint.
                tracing::debug!(endpoint = ?views[index].0, failures_in_a_row = limit,
                    failed_share = own, peers_median_failed_share = peers,
                    "not ejected: its peers fail about as often (an overload, not an outlier)");
                views[index].2.restore();
                continue;
            }
            let reason = EjectionReason::ConsecutiveFailures(limit);
            if self.try_eject(views, index, reason, now) {
                views[index]
                    .1
                    .record
                    .review_at(now + REVIEW_AFTER, counts[index]);
                changed = true;
            } else {
                views[index].2.restore();
            }
        }
        changed
    }

    /// The consecutive-failure limit, as the ejection rules read it (1 when
    /// that detector is off), or `None` without outlier detection.
    fn failures_in_a_row(&self) -> Option<u32> {
        self.detection
            .as_ref()
            .map(|d| d.consecutive_failures.unwrap_or(1))
    }

    /// When the next ejection ends or is looked at again.
    pub(crate) fn next_return<'a>(
        healths: impl Iterator<Item = &'a EndpointHealth>,
    ) -> Option<Instant> {
        healths.filter_map(|h| h.record.next_due()).min()
    }

    /// Takes back the ejections for failures in a row that turned out to be
    /// the start of an overload, then puts back in service the endpoints
    /// whose ejection time is up (each starting its ramp, with slow start
    /// on).
    ///
    /// When a fleet's load first goes beyond its capacity, one server
    /// sheds first: for a moment it is the only one failing, and five in a
    /// row eject it. [`REVIEW_AFTER`] later its peers are shedding too:
    /// judged again against them (with its recent outcomes as they were when
    /// ejected), it is put back.
    pub(crate) fn return_due<K: fmt::Debug, E: Monitored>(
        &mut self,
        views: &mut [View<'_, K, E>],
    ) -> bool {
        let now = Instant::now();
        let mut changed = false;
        let volume = self.failures_in_a_row().map_or(1, u64::from);
        // Read only when a review is due: most calls here end an ejection.
        let mut counts: Option<Vec<IntervalCounts>> = None;
        for index in 0..views.len() {
            let Some(at_ejection) = views[index].1.record.take_review_due(now) else {
                continue;
            };
            let counts = counts.get_or_insert_with(|| views.iter().map(recent).collect());
            let Some((peers, own)) =
                fails_like_its_peers(at_ejection, &peers_of(views, counts, index), volume)
            else {
                continue;
            };
            let (key, health, endpoint) = &mut views[index];
            health.record.withdraw();
            endpoint.restore();
            self.ejected -= 1;
            tracing::info!(endpoint = ?key, failed_share = own, peers_median_failed_share = peers,
                "ejection withdrawn: its peers now fail about as often (an overload, not an outlier)");
            changed = true;
        }
        for (key, health, endpoint) in views.iter_mut() {
            let load = endpoint.load();
            if health
                .record
                .try_return(now, load.successes(), load.failures())
            {
                endpoint.restore();
                if let Some(slow_start) = &self.slow_start {
                    health.begin_slow_start(slow_start, load);
                }
                self.ejected -= 1;
                tracing::info!(endpoint = ?key, multiplier = health.record.multiplier(),
                    "ejection over; endpoint back in service");
                changed = true;
            }
        }
        changed
    }

    /// What an endpoint's active check reported; returns whether the
    /// snapshot changes: it comes in or goes out of service, or it answered
    /// for the first time (it now counts toward the panic threshold, and
    /// requests waiting for a first answer learn it). An endpoint that
    /// passes after failing, or for the first time, starts its slow-start
    /// ramp then, as one back from an ejection does: a ramp begun when it
    /// joined could be over before it ever served.
    pub(crate) fn checked<K: fmt::Debug, E: Monitored>(
        &mut self,
        (key, health, endpoint): &mut View<'_, K, E>,
        verdict: Verdict,
    ) -> bool {
        let before = health.is_in_service();
        let was_pending = health.is_pending();
        let previous = health.check;
        let status = match verdict {
            Verdict::Healthy => CheckStatus::Passing,
            Verdict::Unhealthy(reason) => {
                match previous {
                    Some(CheckStatus::Passing) => tracing::warn!(endpoint = ?key, %reason,
                        "endpoint failed its health check; out of service"),
                    _ => tracing::info!(endpoint = ?key, %reason,
                        "endpoint has not passed its health check; out of service"),
                }
                CheckStatus::Failing
            }
        };
        health.check = Some(status);
        endpoint.show_check(status);
        if status == CheckStatus::Passing {
            tracing::info!(endpoint = ?key, "endpoint passed its health check; in service");
            // A newcomer ramps from its first pass (see `joined`); the first
            // set's endpoints get no ramp.
            let first_pass = std::mem::take(&mut health.ramp_on_first_pass);
            if previous == Some(CheckStatus::Failing) || first_pass {
                if let Some(slow_start) = self.slow_start.as_ref().filter(|_| self.warmed) {
                    health.begin_slow_start(slow_start, endpoint.load());
                }
            }
        }
        was_pending || before != health.is_in_service()
    }

    /// The interval detectors, then the multiplier decay. Returns whether an
    /// endpoint was ejected. `now_ns` and `rtt` read the latency estimates
    /// for the latency detector.
    pub(crate) fn evaluate_interval<K: fmt::Debug, E: Monitored>(
        &mut self,
        views: &mut [View<'_, K, E>],
        now_ns: u64,
        rtt: &RttEstimate,
    ) -> bool {
        let Some(detection) = self.detection.clone() else {
            return false;
        };
        let now = Instant::now();
        // Every endpoint's reading moves on, ejected ones included, so that
        // each interval counts only its own outcomes.
        let mut judged = Vec::new();
        let mut counts = Vec::new();
        for (index, (_, health, endpoint)) in views.iter_mut().enumerate() {
            let load = endpoint.load();
            let interval = health
                .record
                .take_interval(load.successes(), load.failures());
            if !health.record.is_ejected() {
                judged.push(index);
                counts.push(interval);
            }
        }
        let mut changed = false;
        if let Some(detector) = &detection.success_rate {
            for (j, rate, threshold) in success_rate_outliers(&counts, detector) {
                // Below the mean by more than 1.9 stdev, but failing about
                // as often as every peer: a uniform overload, whose rates
                // are close enough that the stdev is tiny.
                let peers: Vec<IntervalCounts> = (0..counts.len())
                    .filter(|&k| k != j)
                    .map(|k| counts[k])
                    .collect();
                if fails_like_its_peers(counts[j], &peers, detector.request_volume).is_some() {
                    tracing::debug!(endpoint = ?views[judged[j]].0, rate, threshold,
                        "not ejected for its success rate: its peers fail about as often (an overload, not an outlier)");
                    continue;
                }
                let reason = EjectionReason::SuccessRate { rate, threshold };
                changed |= self.try_eject(views, judged[j], reason, now);
            }
        }
        if let Some(detector) = &detection.failure_percentage {
            for (j, percent) in failure_percentage_outliers(&counts, detector) {
                let reason = EjectionReason::FailurePercentage {
                    percent,
                    threshold: detector.threshold,
                };
                changed |= self.try_eject(views, judged[j], reason, now);
            }
        }
        if let Some(detector) = &detection.latency {
            let estimates: Vec<Option<f64>> = judged
                .iter()
                .zip(&counts)
                .map(|(&index, interval)| {
                    let endpoint = views[index].2;
                    (interval.requests() > 0).then(|| endpoint.load().rtt_estimate_ns(now_ns, rtt))
                })
                .collect();
            let (slow, median) = latency_outliers(&estimates, detector);
            for (j, &is_slow) in slow.iter().enumerate() {
                let index = judged[j];
                let record = &mut views[index].1.record;
                if !is_slow {
                    record.slow_intervals = 0;
                    continue;
                }
                record.slow_intervals = record.slow_intervals.saturating_add(1);
                if record.slow_intervals >= detector.intervals {
                    let reason = EjectionReason::Latency {
                        estimate: std::time::Duration::from_nanos(
                            estimates[j].unwrap_or(0.0) as u64
                        ),
                        median: std::time::Duration::from_nanos(median as u64),
                        intervals: record.slow_intervals,
                    };
                    changed |= self.try_eject(views, index, reason, now);
                }
            }
        }
        for (_, health, _) in views.iter_mut() {
            health.record.healthy_interval();
        }
        changed
    }

    /// Moves every endpoint in slow start one step up its ramp; true if any
    /// was in slow start (the schedule may change).
    pub(crate) fn advance_slow_start<K, E: Monitored>(&self, views: &mut [View<'_, K, E>]) -> bool {
        let Some(slow_start) = &self.slow_start else {
            return false;
        };
        let mut any = false;
        for (_, health, endpoint) in views.iter_mut() {
            let Some(since) = health.slow_start_since else {
                continue;
            };
            any = true;
            let factor = slow_start.factor(since.elapsed());
            endpoint.load().set_slow_start_factor(factor);
            if factor >= 1.0 {
                health.slow_start_since = None;
            }
        }
        any
    }

    /// Whether any endpoint is on its ramp.
    pub(crate) fn in_slow_start<'a>(mut healths: impl Iterator<Item = &'a EndpointHealth>) -> bool {
        healths.any(|h| h.slow_start_since.is_some())
    }

    /// What share of the traffic each priority level (lowest number
    /// first) takes, and which levels are published in panic mode (every
    /// endpoint of theirs eligible), as Envoy does below the panic
    /// threshold (see [`crate::topology`]); logs when panic mode starts or
    /// ends. Called for every published set, it also notes that endpoints
    /// were published (from then on new ones slow-start).
    pub(crate) fn priority_load(&mut self, levels: &[LevelCounts]) -> PriorityLoad {
        let known: usize = levels.iter().map(|l| l.known).sum();
        let in_service: usize = levels.iter().map(|l| l.in_service).sum();
        self.warmed |= known > 0;
        let load = priority_load(levels, self.overprovisioning_percent, self.panic_threshold);
        let panic = load.panic.iter().any(|&p| p);
        if panic != self.panic {
            if panic {
                tracing::warn!(
                    in_service,
                    endpoints = known,
                    panic_threshold = self.panic_threshold,
                    "too few endpoints in service: panic mode, balancing over all of them"
                );
            } else {
                tracing::info!(in_service, endpoints = known, "panic mode over");
            }
            self.panic = panic;
        }
        load
    }
}

/// How long after an ejection for failures in a row it is looked at again
/// (see [`Health::return_due`]).
const REVIEW_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// One endpoint's recent outcomes: the previous interval and this one so
/// far.
fn recent<K, E: Monitored>((_, health, endpoint): &View<'_, K, E>) -> IntervalCounts {
    let load = endpoint.load();
    health.record.recent(load.successes(), load.failures())
}

/// The recent outcomes (`counts`) of the endpoints other than `index` that
/// are in service.
fn peers_of<K, E>(
    views: &[View<'_, K, E>],
    counts: &[IntervalCounts],
    index: usize,
) -> Vec<IntervalCounts> {
    views
        .iter()
        .zip(counts)
        .enumerate()
        .filter(|&(i, (view, _))| i != index && !view.1.is_ejected())
        .map(|(_, (_, &c))| c)
        .collect()
}
