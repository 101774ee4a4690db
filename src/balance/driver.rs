//! The balancer's background task: it consumes the discovery stream, builds
//! new snapshots off the request path, and lets go of drained endpoints. It
//! ends when the balancer is closed or the last `Balancer` handle is dropped.

use std::fmt;
use std::future::poll_fn;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::Poll;
use std::time::Duration;

use indexmap::IndexMap;
use tokio::sync::oneshot;
use tokio::time::{interval_at, sleep_until, Instant, MissedTickBehavior};
use tower::discover::{Change, Discover};

use super::endpoint::{Endpoint, Shared};
use super::snapshot::{EndpointList, Snapshot};
use super::{Inner, StaticWeights};
use crate::error::BoxError;
use crate::error::Empty;
use crate::health::{
    failure_percentage_outliers, latency_outliers, success_rate_outliers, EjectionReason,
    EjectionRecord, OutlierDetection, SlowStart,
};
use crate::strategy::Strategy;

/// At most this many changes are applied per snapshot, so that a stream that
/// is always ready cannot starve the rest of the driver.
const MAX_BATCH: usize = 4096;

/// Back-off after a discovery error: first wait, and the cap.
const ERROR_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ERROR_BACKOFF_MAX: Duration = Duration::from_secs(1);

struct Batch<K, S, E> {
    changes: Vec<Result<Change<K, S>, E>>,
    ended: bool,
}

impl<K, S, E> Batch<K, S, E> {
    /// The stream may have more ready: let other tasks run before asking.
    fn is_full(&self) -> bool {
        self.changes.len() >= MAX_BATCH
    }
}

/// Everything ready on the stream, up to `MAX_BATCH` or the first error.
async fn next_batch<D: Discover>(mut discover: Pin<&mut D>) -> Batch<D::Key, D::Service, D::Error> {
    poll_fn(|cx| {
        let mut changes = Vec::new();
        loop {
            match discover.as_mut().poll_discover(cx) {
                Poll::Ready(Some(item)) => {
                    let failed = item.is_err();
                    changes.push(item);
                    if failed || changes.len() >= MAX_BATCH {
                        return Poll::Ready(Batch {
                            changes,
                            ended: false,
                        });
                    }
                }
                Poll::Ready(None) => {
                    return Poll::Ready(Batch {
                        changes,
                        ended: true,
                    })
                }
                Poll::Pending if changes.is_empty() => return Poll::Pending,
                Poll::Pending => {
                    return Poll::Ready(Batch {
                        changes,
                        ended: false,
                    })
                }
            }
        }
    })
    .await
}

/// The health settings the driver applies.
#[derive(Debug, Clone)]
pub(crate) struct HealthSettings {
    pub(crate) outlier_detection: Option<OutlierDetection>,
    pub(crate) panic_threshold: u32,
    pub(crate) slow_start: Option<SlowStart>,
}

/// An endpoint in the current set, with what the driver remembers of its
/// health (dropped with it).
struct Tracked<K, S> {
    endpoint: Arc<Endpoint<K, S>>,
    record: EjectionRecord,
    /// While in slow start: since when.
    slow_start_since: Option<Instant>,
}

impl<K, S> Tracked<K, S> {
    fn begin_slow_start(&mut self, slow_start: &SlowStart) {
        self.slow_start_since = Some(Instant::now());
        self.endpoint
            .load()
            .set_slow_start_factor(slow_start.factor(Duration::ZERO));
    }
}

/// The driver's own view of the endpoints; the published snapshot is derived
/// from it.
struct Endpoints<K, S> {
    active: IndexMap<K, Tracked<K, S>>,
    draining: Vec<Arc<Endpoint<K, S>>>,
    /// Below this percentage in service, publish every endpoint (panic mode).
    panic_threshold: u32,
    /// How many of `active` are ejected.
    ejected: usize,
    /// Whether the last published snapshot was in panic mode.
    panic: bool,
    slow_start: Option<SlowStart>,
    /// Set once a snapshot with endpoints was published: endpoints of the
    /// first set are not slow-started (there is nobody to spare them), as
    /// in Envoy.
    warmed: bool,
}

/// A set that grew to many endpoints and shrank back should not keep the
/// memory of its largest size.
fn shrink_when_mostly_empty<K: Hash + Eq, V>(map: &mut IndexMap<K, V>) {
    if let Some(capacity) = crate::capacity::shrink_target(map.len(), map.capacity()) {
        map.shrink_to(capacity);
    }
}

impl<K, S> Endpoints<K, S>
where
    K: Hash + Eq + Clone + fmt::Debug,
{
    /// Applies one change; returns whether the active set changed.
    fn apply(
        &mut self,
        change: Change<K, S>,
        shared: &Arc<Shared>,
        weights: &impl StaticWeights<K>,
    ) -> bool {
        match change {
            Change::Insert(key, service) => {
                let endpoint = Arc::new(Endpoint::new(key.clone(), service, shared.clone()));
                let weight = weights.weight(&key);
                if !endpoint.load().set_static_weight(weight) {
                    tracing::warn!(endpoint = ?key, weight, "static weight is not a finite positive number; the endpoint weighs 1");
                }
                tracing::debug!(endpoint = ?key, "endpoint inserted");
                let mut tracked = Tracked {
                    endpoint,
                    record: EjectionRecord::default(),
                    slow_start_since: None,
                };
                if let Some(old) = self.active.get(&key) {
                    // A new service for the same key keeps the key's health:
                    // a stream that re-sends its set must not cancel an
                    // ejection or forget the multiplier.
                    tracked.record = old.record.for_new_counters();
                    tracked.endpoint.inherit_health(&old.endpoint);
                    tracked.slow_start_since = old.slow_start_since;
                } else if let Some(slow_start) = self.slow_start.as_ref().filter(|_| self.warmed) {
                    tracked.begin_slow_start(slow_start);
                }
                if let Some(old) = self.active.insert(key, tracked) {
                    tracing::debug!(endpoint = ?old.endpoint.key(), "the endpoint's previous service drains");
                    old.endpoint.start_draining();
                    self.draining.push(old.endpoint);
                }
                true
            }
            Change::Remove(key) => match self.active.swap_remove(&key) {
                Some(old) => {
                    if old.record.is_ejected() {
                        self.ejected -= 1;
                    }
                    tracing::debug!(endpoint = ?key, in_flight = old.endpoint.load().in_flight(), "endpoint removed; draining");
                    old.endpoint.start_draining();
                    self.draining.push(old.endpoint);
                    shrink_when_mostly_empty(&mut self.active);
                    true
                }
                None => {
                    tracing::debug!(endpoint = ?key, "discovery removed an unknown endpoint; ignored");
                    false
                }
            },
        }
    }

    /// Ejects the endpoint at `index` if the cap allows; returns whether it
    /// did.
    fn try_eject(
        &mut self,
        index: usize,
        reason: EjectionReason,
        detection: &OutlierDetection,
        shared: &Shared,
        now: Instant,
    ) -> bool {
        let (ejected, total) = (self.ejected, self.active.len());
        let Some((key, tracked)) = self.active.get_index_mut(index) else {
            return false;
        };
        if tracked.record.is_ejected() {
            return false;
        }
        if !detection.may_eject(ejected, total) {
            tracing::info!(endpoint = ?key, %reason, ejected, endpoints = total,
                max_ejection_percent = detection.max_ejection_percent,
                "outlier not ejected: too many endpoints are out already");
            return false;
        }
        self.ejected += 1;
        let (time, returns_at, multiplier) = tracked.record.eject(now, detection);
        tracked.endpoint.eject(shared.ns_at(returns_at));
        tracing::warn!(endpoint = ?key, %reason, ejection_time = ?time, multiplier,
            ejected = ejected + 1, endpoints = total, "endpoint ejected");
        true
    }

    /// Ejects the endpoints that reached their consecutive-failure limit, or
    /// puts them back in service when the cap forbids.
    fn eject_tripped(&mut self, detection: &OutlierDetection, shared: &Shared) -> bool {
        let now = Instant::now();
        let limit = detection.consecutive_failures.unwrap_or(1);
        let mut changed = false;
        for index in 0..self.active.len() {
            let tripped = self.active[index].endpoint.is_tripped();
            if !tripped {
                continue;
            }
            let reason = EjectionReason::ConsecutiveFailures(limit);
            if self.try_eject(index, reason, detection, shared, now) {
                changed = true;
            } else {
                self.active[index].endpoint.restore();
            }
        }
        changed
    }

    /// When the next ejection ends.
    fn next_return(&self) -> Option<Instant> {
        self.active
            .values()
            .filter_map(|t| t.record.ejected_until())
            .min()
    }

    /// Puts back in service the endpoints whose ejection time is up.
    /// Moves every endpoint in slow start one step up its ramp; true if any
    /// was in slow start (the schedule may change).
    fn advance_slow_start(&mut self) -> bool {
        let Some(slow_start) = &self.slow_start else {
            return false;
        };
        let mut any = false;
        for tracked in self.active.values_mut() {
            let Some(since) = tracked.slow_start_since else {
                continue;
            };
            any = true;
            let factor = slow_start.factor(since.elapsed());
            tracked.endpoint.load().set_slow_start_factor(factor);
            if factor >= 1.0 {
                tracked.slow_start_since = None;
            }
        }
        any
    }

    fn in_slow_start(&self) -> bool {
        self.active.values().any(|t| t.slow_start_since.is_some())
    }

    fn return_due(&mut self) -> bool {
        let now = Instant::now();
        let mut changed = false;
        for (key, tracked) in self.active.iter_mut() {
            let load = tracked.endpoint.load();
            if tracked
                .record
                .try_return(now, load.successes(), load.failures())
            {
                tracked.endpoint.restore();
                if let Some(slow_start) = &self.slow_start {
                    tracked.begin_slow_start(slow_start);
                }
                self.ejected -= 1;
                tracing::info!(endpoint = ?key, multiplier = tracked.record.multiplier(),
                    "ejection over; endpoint back in service");
                changed = true;
            }
        }
        changed
    }

    /// The interval detectors, then the multiplier decay. Returns whether an
    /// endpoint was ejected.
    fn evaluate_interval(&mut self, detection: &OutlierDetection, shared: &Shared) -> bool {
        let now = Instant::now();
        // Every endpoint's reading moves on, ejected ones included, so that
        // each interval counts only its own outcomes.
        let mut judged = Vec::new();
        let mut counts = Vec::new();
        for (index, tracked) in self.active.values_mut().enumerate() {
            let load = tracked.endpoint.load();
            let interval = tracked
                .record
                .take_interval(load.successes(), load.failures());
            if !tracked.record.is_ejected() {
                judged.push(index);
                counts.push(interval);
            }
        }
        let mut changed = false;
        if let Some(detector) = &detection.success_rate {
            for (j, rate, threshold) in success_rate_outliers(&counts, detector) {
                let reason = EjectionReason::SuccessRate { rate, threshold };
                changed |= self.try_eject(judged[j], reason, detection, shared, now);
            }
        }
        if let Some(detector) = &detection.failure_percentage {
            for (j, percent) in failure_percentage_outliers(&counts, detector) {
                let reason = EjectionReason::FailurePercentage {
                    percent,
                    threshold: detector.threshold,
                };
                changed |= self.try_eject(judged[j], reason, detection, shared, now);
            }
        }
        if let Some(detector) = &detection.latency {
            let now_ns = shared.latency_now_ns();
            let estimates: Vec<Option<f64>> = judged
                .iter()
                .zip(&counts)
                .map(|(&index, interval)| {
                    let endpoint = &self.active[index].endpoint;
                    (interval.requests() > 0)
                        .then(|| endpoint.load().rtt_estimate_ns(now_ns, &shared.rtt))
                })
                .collect();
            let (slow, median) = latency_outliers(&estimates, detector);
            for (j, &is_slow) in slow.iter().enumerate() {
                let index = judged[j];
                let record = &mut self.active[index].record;
                if !is_slow {
                    record.slow_intervals = 0;
                    continue;
                }
                record.slow_intervals = record.slow_intervals.saturating_add(1);
                if record.slow_intervals >= detector.intervals {
                    let reason = EjectionReason::Latency {
                        estimate: Duration::from_nanos(estimates[j].unwrap_or(0.0) as u64),
                        median: Duration::from_nanos(median as u64),
                        intervals: record.slow_intervals,
                    };
                    changed |= self.try_eject(index, reason, detection, shared, now);
                }
            }
        }
        for tracked in self.active.values_mut() {
            tracked.record.healthy_interval();
        }
        changed
    }

    /// Builds and publishes a snapshot of the current state.
    fn publish<P: Strategy, C, H>(&mut self, inner: &Inner<K, S, P, C, H>) {
        self.warmed |= !self.active.is_empty();
        self.draining.retain(|e| e.load().in_flight_seq_cst() > 0);
        let total = self.active.len();
        let in_service: Vec<Arc<Endpoint<K, S>>> = self
            .active
            .values()
            .filter(|t| !t.record.is_ejected())
            .map(|t| t.endpoint.clone())
            .collect();
        let ejected: EndpointList<K, S> = self
            .active
            .values()
            .filter(|t| t.record.is_ejected())
            .map(|t| t.endpoint.clone())
            .collect();
        let threshold = self.panic_threshold as usize;
        let panic = !ejected.is_empty() && in_service.len() * 100 < threshold * total;
        if panic != self.panic {
            if panic {
                tracing::warn!(
                    in_service = in_service.len(),
                    endpoints = total,
                    panic_threshold = threshold,
                    "too few endpoints in service: panic mode, balancing over all of them"
                );
            } else {
                tracing::info!(
                    in_service = in_service.len(),
                    endpoints = total,
                    "panic mode over"
                );
            }
            self.panic = panic;
        }
        let eligible: EndpointList<K, S> = if panic {
            self.active.values().map(|t| t.endpoint.clone()).collect()
        } else {
            in_service.into_boxed_slice()
        };
        let ctx = inner.shared.pick_context(inner.shared.now_ns());
        let schedule = inner.strategy.schedule(&eligible[..], &ctx);
        inner.snapshot.store(Arc::new(Snapshot {
            eligible,
            ejected,
            panic,
            draining: self.draining.clone().into_boxed_slice(),
            schedule,
        }));
        inner.published.send_modify(|generation| *generation += 1);
    }
}

/// The driver's view of the balancer: it must not keep it alive.
type WeakInner<D, P, C, H> = Weak<Inner<<D as Discover>::Key, <D as Discover>::Service, P, C, H>>;

/// Runs until `stop` resolves (its sender lives in the balancer's shared
/// state, and `close` drops it, so that happens when the balancer is closed
/// or the last handle is dropped).
pub(crate) async fn run<D, P, C, H, W>(
    discover: D,
    inner: WeakInner<D, P, C, H>,
    shared: Arc<Shared>,
    health: HealthSettings,
    weights: W,
    mut stop: oneshot::Receiver<()>,
) where
    D: Discover,
    D::Key: Hash + Eq + Clone + fmt::Debug,
    D::Error: Into<BoxError>,
    P: Strategy,
    W: StaticWeights<D::Key>,
{
    tokio::pin!(discover);
    let HealthSettings {
        outlier_detection: detection,
        panic_threshold,
        slow_start,
    } = health;
    let mut endpoints = Endpoints {
        active: IndexMap::new(),
        draining: Vec::new(),
        panic_threshold,
        ejected: 0,
        panic: false,
        slow_start,
        warmed: false,
    };
    // An interval too long for the clock never ticks.
    let mut ticker = detection.as_ref().and_then(|d| {
        let first = Instant::now().checked_add(d.interval)?;
        let mut ticker = interval_at(first, d.interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Some(ticker)
    });
    // Strategies whose schedule follows something that moves (reported
    // load) are rescheduled on a timer too.
    let mut reschedule = inner
        .upgrade()
        .and_then(|inner| inner.strategy.reschedule_every())
        .and_then(|every| {
            let every = every.max(Duration::from_millis(1));
            let mut ticker = interval_at(Instant::now().checked_add(every)?, every);
            ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
            Some(ticker)
        });
    // The next step of the slow-start ramps, while any endpoint is on one.
    let mut slow_start_step: Option<Instant> = None;
    let mut discovery_open = true;
    let mut retry_at: Option<Instant> = None;
    let mut backoff = ERROR_BACKOFF_MIN;
    // Why discovery says there are no endpoints, while it does.
    let mut discovered_none: Option<Empty> = None;

    loop {
        let mut changed = false;
        let mut more_ready = false;
        // What requests that find no endpoint should do from now on.
        let mut none_update: Option<Option<Empty>> = None;
        let next_return = endpoints.next_return();
        if slow_start_step.is_none() && endpoints.in_slow_start() {
            slow_start_step = slow_start.and_then(|s| Instant::now().checked_add(s.step()));
        }
        tokio::select! {
            biased;
            _ = &mut stop => break,
            batch = async {
                if let Some(at) = retry_at {
                    sleep_until(at).await;
                }
                next_batch(discover.as_mut()).await
            }, if discovery_open => {
                retry_at = None;
                let full = batch.is_full();
                let mut answer: Option<Empty> = None;
                let (mut inserted, mut removed) = (0usize, 0usize);
                for item in batch.changes {
                    match item {
                        Ok(change) => {
                            let is_insert = matches!(change, Change::Insert(..));
                            if endpoints.apply(change, &shared, &weights) {
                                changed = true;
                                if is_insert { inserted += 1 } else { removed += 1 }
                            }
                            backoff = ERROR_BACKOFF_MIN;
                        }
                        Err(error) => {
                            let error: BoxError = error.into();
                            // An answer, not a failure: no back-off.
                            if let Some(empty) = find_empty(&*error) {
                                answer = Some(empty.clone());
                                continue;
                            }
                            let error = crate::error::report(&*error);
                            tracing::warn!(%error, endpoints = endpoints.active.len(), retry_in = ?backoff,
                                "discovery stream failed; keeping the last known endpoints");
                            retry_at = Some(Instant::now() + backoff);
                            backoff = (backoff * 2).min(ERROR_BACKOFF_MAX);
                        }
                    }
                }
                if changed {
                    tracing::info!(inserted, removed, endpoints = endpoints.active.len(), "endpoints updated");
                }
                more_ready = full;
                if batch.ended {
                    // A finite list ends: routine, whatever it held.
                    tracing::debug!(endpoints = endpoints.active.len(), "discovery stream ended; keeping the last known endpoints");
                    discovery_open = false;
                }
                none_update = discovered_none_after(
                    &discovered_none,
                    removed > 0,
                    endpoints.active.len(),
                    answer,
                    batch.ended,
                );
            }
            _ = shared.drained.notified(), if !endpoints.draining.is_empty() => {
                changed = true;
            }
            _ = shared.tripped.notified(), if detection.is_some() => {
                if let Some(detection) = &detection {
                    changed = endpoints.eject_tripped(detection, &shared);
                }
            }
            _ = sleep_until(next_return.unwrap_or_else(Instant::now)), if next_return.is_some() => {
                changed = endpoints.return_due();
            }
            _ = async {
                match &mut ticker {
                    Some(ticker) => ticker.tick().await,
                    None => std::future::pending().await,
                }
            } => {
                if let Some(detection) = &detection {
                    changed = endpoints.evaluate_interval(detection, &shared);
                }
            }
            _ = sleep_until(slow_start_step.unwrap_or_else(Instant::now)), if slow_start_step.is_some() => {
                slow_start_step = None;
                changed = endpoints.advance_slow_start();
            }
            _ = async {
                match &mut reschedule {
                    Some(ticker) => ticker.tick().await,
                    None => std::future::pending().await,
                }
            } => {
                changed = true;
            }
        }
        if changed || none_update.is_some() {
            let Some(inner) = inner.upgrade() else { break };
            // Cleared before a set with endpoints is published, set after
            // an empty one is: see `Inner::dispatch`.
            if matches!(none_update, Some(None)) {
                inner.set_discovered_none(None);
                discovered_none = None;
            }
            if changed {
                endpoints.publish(&inner);
            }
            if let Some(Some(reason)) = none_update {
                if discovered_none.is_none() {
                    tracing::warn!(%reason, "discovery found no endpoints: requests fail at once until one is inserted");
                } else {
                    tracing::debug!(%reason, "discovery still finds no endpoints");
                }
                inner.set_discovered_none(Some(reason.clone()));
                discovered_none = Some(reason);
            }
        }
        if more_ready {
            // A full batch: the stream may be always ready; let other tasks
            // on this worker run before asking it again.
            tokio::task::yield_now().await;
        }
    }
    tracing::debug!("balancer driver stopped");
}

/// Whether a batch of discovery changes tells requests that find no
/// endpoint something new: `Some(Some(reason))` to fail at once,
/// `Some(None)` to wait again, `None` for no change.
///
/// `removed` says whether the batch removed an endpoint, `answer` is an
/// [`Empty`] the stream yielded in it, `ended` whether it ended.
fn discovered_none_after(
    current: &Option<Empty>,
    removed: bool,
    endpoints: usize,
    answer: Option<Empty>,
    ended: bool,
) -> Option<Option<Empty>> {
    if endpoints > 0 {
        if let Some(answer) = answer {
            tracing::warn!(reason = %answer, endpoints,
                "discovery found no endpoints but removed none; keeping the last known endpoints");
        }
        return current.is_some().then_some(None);
    }
    if let Some(answer) = answer {
        return Some(Some(answer));
    }
    if removed {
        return Some(Some(Empty::new("discovery removed every endpoint")));
    }
    if ended && current.is_none() {
        return Some(Some(Empty::new(
            "the discovery stream ended without any endpoint",
        )));
    }
    None
}

/// The [`Empty`] answer in `error`'s `source()` chain, if there is one.
fn find_empty<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a Empty> {
    crate::error::chain(error).find_map(|err| err.downcast_ref::<Empty>())
}
