//! The balancer's background task: it consumes the discovery stream, builds
//! new snapshots off the request path, and lets go of drained endpoints. It
//! ends when the balancer is closed or the last `Balancer` handle is dropped.
//!
//! Health decisions (ejection, return, slow start, panic mode) are not made
//! here: the driver calls the rules in `health::tracker` on its events and
//! publishes what they decide.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::poll_fn;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::Poll;
use std::time::Duration;

use indexmap::IndexMap;
use tokio::sync::{oneshot, Notify};
use tokio::time::{interval_at, sleep_until, Instant, MissedTickBehavior};
use tower::discover::{Change, Discover};

use super::endpoint::{Endpoint, Shared};
use super::snapshot::{EndpointList, Group, Level, Snapshot};
use super::{Describe, Inner};
use crate::error::BoxError;
use crate::error::Empty;
use crate::health::{
    reports, ActiveCheck, CheckId, ConnectionStates, EndpointHealth, Health, HealthSettings,
    ReportSender, View,
};
use crate::strategy::Strategy;
use crate::topology::priority::LevelCounts;
use crate::topology::zone::{zone_shares, ZoneCounts, WHOLE};
use crate::topology::{Readiness, ZoneAware};

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

/// What the driver asks about each endpoint discovery inserts: its
/// metadata and static weight (from the key), its active check (from the
/// key), and its connection's status (from the service).
pub(crate) struct EndpointSources<W, A, N> {
    pub(crate) metadata: W,
    pub(crate) checks: A,
    pub(crate) connections: N,
}

/// An endpoint in the current set, with what the health rules remember of
/// it, its active check and the watch on its connection (both stopped when
/// it leaves).
struct Tracked<K, S> {
    endpoint: Arc<Endpoint<K, S>>,
    health: EndpointHealth,
    check: Option<RunningCheck>,
    _connection_watch: Option<BackgroundTask>,
}

/// A key's active check, running as a task of its own.
struct RunningCheck {
    id: CheckId,
    _task: BackgroundTask,
}

/// A task that lives as long as this handle: dropping it stops the task.
struct BackgroundTask(tokio::task::JoinHandle<()>);

impl Drop for BackgroundTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Wakes the driver (to publish again) on every change of `status`, until
/// every handle to it is gone or the task is dropped.
fn watch_connection(
    status: &crate::health::ConnectionStatus,
    wake: &Arc<Notify>,
) -> BackgroundTask {
    let mut changes = status.changes();
    let wake = Arc::clone(wake);
    BackgroundTask(tokio::spawn(async move {
        while changes.changed().await.is_ok() {
            wake.notify_one();
        }
    }))
}

/// The driver's own view of the endpoints; the published snapshot is derived
/// from it.
struct Endpoints<K, S> {
    active: IndexMap<K, Tracked<K, S>>,
    draining: Vec<Arc<Endpoint<K, S>>>,
    health: Health,
    /// Where active checks report; each check gets a reporter with its id.
    reports: ReportSender,
    next_check: CheckId,
    /// The key of each running check, so that a report finds its endpoint
    /// without a scan of the set (a start with many endpoints brings a
    /// report from each).
    checked: HashMap<CheckId, K>,
    /// Notified when an endpoint's connection changes state.
    connections_changed: Arc<Notify>,
    /// Zone-aware routing, when on.
    zone_aware: Option<ZoneAware>,
    /// Whether each active endpoint's connection took requests at the last
    /// publish: a change of state that changes none of these (idle to
    /// ready, say) publishes nothing, so strategies keep their schedule.
    published_connections: Vec<bool>,
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
    fn apply<W, A, N>(
        &mut self,
        change: Change<K, S>,
        shared: &Arc<Shared>,
        sources: &EndpointSources<W, A, N>,
    ) -> bool
    where
        W: Describe<K>,
        A: ActiveCheck<K>,
        N: ConnectionStates<S>,
    {
        match change {
            Change::Insert(key, service) => {
                let connection = sources.connections.connection_status(&service);
                let connection_watch = connection
                    .as_ref()
                    .map(|status| watch_connection(status, &self.connections_changed));
                let metadata = sources.metadata.describe(&key);
                let weight = metadata.weight().unwrap_or(1.0);
                let endpoint = Arc::new(
                    Endpoint::new(key.clone(), service, shared.clone())
                        .with_connection(connection)
                        .with_metadata(metadata)
                        .with_identity(crate::request::stable_hash(&key)),
                );
                if !endpoint.load().set_static_weight(weight) {
                    tracing::warn!(endpoint = ?key, weight, "static weight is not a finite positive number; the endpoint weighs 1");
                }
                tracing::debug!(endpoint = ?key, "endpoint inserted");
                let mut tracked = Tracked {
                    endpoint,
                    health: EndpointHealth::default(),
                    check: None,
                    _connection_watch: connection_watch,
                };
                if let Some(old) = self.active.get_mut(&key) {
                    // A new service for the same key keeps the key's health,
                    // and its check goes on.
                    tracked.health = old.health.for_new_service();
                    tracked.endpoint.inherit_health(&old.endpoint);
                    tracked.check = old.check.take();
                } else {
                    self.next_check += 1;
                    let id = self.next_check;
                    if let Some(task) = sources.checks.start(&key, self.reports.reporter(id)) {
                        tracked.health.check_started(&*tracked.endpoint);
                        self.checked.insert(id, key.clone());
                        // As text: the key need not be `Send`.
                        let checked = format!("{key:?}");
                        tracked.check = Some(RunningCheck {
                            id,
                            _task: BackgroundTask(tokio::spawn(async move {
                                task.await;
                                // A check is meant to run as long as its
                                // endpoint: one that returns leaves its last
                                // verdict (or none: out of service) for good.
                                tracing::warn!(endpoint = %checked,
                                    "the endpoint's active check ended; its last verdict stands");
                            })),
                        });
                    }
                    // After the check started: a pending newcomer ramps from
                    // its first pass.
                    self.health
                        .joined(&mut tracked.health, tracked.endpoint.load());
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
                    if let Some(check) = &old.check {
                        self.checked.remove(&check.id);
                    }
                    self.health.left(&old.health);
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

    /// Whether each active endpoint's connection takes requests now.
    fn connections(&self) -> Vec<bool> {
        self.active
            .values()
            .map(|t| t.endpoint.takes_requests())
            .collect()
    }

    /// The endpoints as the health rules see them.
    fn views(active: &mut IndexMap<K, Tracked<K, S>>) -> Vec<View<'_, K, Endpoint<K, S>>> {
        active
            .iter_mut()
            .map(|(key, tracked)| (key, &mut tracked.health, &*tracked.endpoint))
            .collect()
    }

    /// Builds and publishes a snapshot of the current state.
    fn publish<P: Strategy, C, H>(&mut self, inner: &Inner<K, S, P, C, H>) {
        self.draining.retain(|e| e.load().in_flight_seq_cst() > 0);
        self.published_connections = self.connections();
        // The endpoints by priority level, lowest number first.
        let mut by_level: BTreeMap<u32, Vec<&Tracked<K, S>>> = BTreeMap::new();
        for tracked in self.active.values() {
            let level = tracked.endpoint.metadata().priority();
            by_level.entry(level).or_default().push(tracked);
        }
        // Endpoints whose active check has not answered yet are left out of
        // the panic threshold, as Envoy leaves out hosts not yet checked: a
        // scale-up that doubles the set must not send the newcomers traffic
        // before they say they are ready (nor call a client's start a
        // panic). In panic mode they stay out too, while any endpoint has
        // answered.
        let counts: Vec<LevelCounts> = by_level
            .values()
            .map(|members| LevelCounts {
                known: members.iter().filter(|t| !t.health.is_pending()).count(),
                in_service: members.iter().filter(|t| in_service(t)).count(),
            })
            .collect();
        let load = self.health.priority_load(&counts);
        let known: usize = counts.iter().map(|c| c.known).sum();
        let ctx = inner.shared.pick_context(inner.shared.now_ns());
        let mut levels = Vec::new();
        let (mut out_of_service, mut unconnected, mut standby) =
            (Vec::new(), Vec::new(), Vec::new());
        let mut below = 0;
        for (i, members) in by_level.values().enumerate() {
            let panic = load.panic[i];
            let eligible_here = |t: &Tracked<K, S>| {
                if panic {
                    !t.health.is_pending()
                        && t.endpoint.metadata().readiness() != Readiness::NotServing
                } else {
                    in_service(t)
                }
            };
            let (eligible, out): (Vec<_>, Vec<_>) = members
                .iter()
                .copied()
                .partition(|t: &&Tracked<K, S>| eligible_here(t));
            out_of_service.extend(out.iter().map(|t| t.endpoint.clone()));
            let eligible: Vec<_> = eligible.iter().map(|t| t.endpoint.clone()).collect();
            if load.percent[i] == 0 {
                standby.extend(eligible);
                continue;
            }
            let (eligible, last_resort) = prefer_connected(eligible.into_boxed_slice());
            unconnected.extend(last_resort.iter().cloned());
            below += load.percent[i];
            let zones = self.zone_aware.as_ref().filter(|_| !panic);
            let split = match zones {
                Some(zones) => by_zone(zones, members, eligible),
                None => vec![(eligible, WHOLE, false)],
            };
            let routed = split.len() > 1;
            let latency_spill = zones.filter(|_| routed).and_then(ZoneAware::latency_spill);
            let mut groups = Vec::with_capacity(split.len());
            let mut group_below = 0;
            for (eligible, share, local) in split {
                // A zone Envoy's rule gives nothing takes no spill either:
                // a whole local zone keeps its requests (the latency of a
                // zone under load against idle ones says nothing).
                if share == 0 {
                    standby.extend(eligible.iter().cloned());
                    continue;
                }
                group_below += share;
                groups.push(Group {
                    schedule: inner.strategy.schedule(&eligible[..], &ctx),
                    eligible,
                    below: group_below,
                    local,
                });
            }
            let mut groups = groups.into_iter();
            let first = groups.next().unwrap_or_else(|| empty_group(inner, &ctx));
            levels.push(Level {
                first,
                more: groups.collect(),
                panic,
                below,
                latency_spill,
            });
        }
        let mut levels = levels.into_iter();
        let first = levels.next().unwrap_or_else(|| Level {
            first: empty_group(inner, &ctx),
            more: Box::new([]),
            panic: false,
            below: 100,
            latency_spill: None,
        });
        let more: Box<[_]> = levels.collect();
        inner.snapshot.store(Arc::new(Snapshot {
            awaiting_checks: known == 0 && !out_of_service.is_empty(),
            panic: first.panic || more.iter().any(|l| l.panic),
            first,
            more,
            out_of_service: out_of_service.into_boxed_slice(),
            unconnected: unconnected.into_boxed_slice(),
            standby: standby.into_boxed_slice(),
            draining: self.draining.clone().into_boxed_slice(),
        }));
        inner.published.send_modify(|generation| *generation += 1);
    }
}

/// A group with no endpoint: the only one of a balancer with none.
fn empty_group<K, S, P: Strategy, C, H>(
    inner: &Inner<K, S, P, C, H>,
    ctx: &crate::strategy::PickContext<'_>,
) -> Group<K, S, P::Schedule> {
    let eligible: EndpointList<K, S> = Box::new([]);
    Group {
        schedule: inner.strategy.schedule(&eligible[..], ctx),
        eligible,
        below: WHOLE,
        local: false,
    }
}

/// A level's `eligible` endpoints split by zone, each zone with its share
/// of the level's requests (see [`ZoneAware`]); the whole list with the
/// whole share when the level is not routed by zone. `members` are all of
/// the level's endpoints, for the zones' sizes.
fn by_zone<K, S>(
    zones: &ZoneAware,
    members: &[&Tracked<K, S>],
    eligible: EndpointList<K, S>,
) -> Vec<(EndpointList<K, S>, u32, bool)> {
    fn zone_of<K, S>(e: &Endpoint<K, S>) -> Option<&str> {
        e.metadata().zone()
    }
    let mut names: Vec<Option<&str>> = Vec::new();
    for tracked in members {
        let zone = zone_of(&tracked.endpoint);
        if !names.contains(&zone) {
            names.push(zone);
        }
    }
    let counts: Vec<ZoneCounts<'_>> = names
        .iter()
        .map(|&name| ZoneCounts {
            zone: name,
            known: members
                .iter()
                .filter(|t| !t.health.is_pending() && zone_of(&t.endpoint) == name)
                .count(),
            in_service: eligible.iter().filter(|e| zone_of(e) == name).count(),
        })
        .collect();
    let Some(shares) = zone_shares(zones, &counts) else {
        return vec![(eligible, WHOLE, false)];
    };
    let mut members_of: Vec<Vec<Arc<Endpoint<K, S>>>> = vec![Vec::new(); names.len()];
    for endpoint in eligible.iter() {
        let zone = zone_of(endpoint);
        if let Some(i) = names.iter().position(|name| *name == zone) {
            members_of[i].push(endpoint.clone());
        }
    }
    let local = zones.local_zone();
    let mut split: Vec<_> = members_of
        .into_iter()
        .zip(shares)
        .zip(&names)
        .map(|((endpoints, share), name)| {
            let is_local = *name == Some(local);
            (endpoints.into_boxed_slice(), share, is_local)
        })
        .collect();
    // The largest share first (the local zone, as a rule): its draw is the
    // first compared.
    split.sort_by_key(|(_, share, _)| std::cmp::Reverse(*share));
    split
}

/// Whether `tracked` is in service: not ejected, not failing (or waiting
/// for) its active check, and serving by what the platform says.
fn in_service<K, S>(tracked: &Tracked<K, S>) -> bool {
    tracked.health.is_in_service()
        && tracked.endpoint.metadata().readiness() != Readiness::NotServing
}

/// Splits `eligible` into the endpoints that take requests now and those
/// that are a last resort (their connection being made or failed, or the
/// platform terminating them), when there are both: only the first are
/// picked then. When none takes requests, all are picked, and a request
/// waits for (or fails with) a connection attempt, as it would without
/// connection states.
fn prefer_connected<K, S>(
    eligible: EndpointList<K, S>,
) -> (EndpointList<K, S>, EndpointList<K, S>) {
    let connected = eligible.iter().filter(|e| e.takes_requests()).count();
    if connected == 0 || connected == eligible.len() {
        return (eligible, Box::new([]));
    }
    let (connected, unconnected): (Vec<_>, Vec<_>) = eligible
        .into_vec()
        .into_iter()
        .partition(|e| e.takes_requests());
    (connected.into_boxed_slice(), unconnected.into_boxed_slice())
}

/// The driver's view of the balancer: it must not keep it alive.
type WeakInner<D, P, C, H> = Weak<Inner<<D as Discover>::Key, <D as Discover>::Service, P, C, H>>;

/// Runs until `stop` resolves (its sender lives in the balancer's shared
/// state, and `close` drops it, so that happens when the balancer is closed
/// or the last handle is dropped).
pub(crate) async fn run<D, P, C, H, W, A, N>(
    discover: D,
    inner: WeakInner<D, P, C, H>,
    shared: Arc<Shared>,
    health: HealthSettings,
    zone_aware: Option<ZoneAware>,
    sources: EndpointSources<W, A, N>,
    mut stop: oneshot::Receiver<()>,
) where
    D: Discover,
    D::Key: Hash + Eq + Clone + fmt::Debug,
    D::Error: Into<BoxError>,
    P: Strategy,
    W: Describe<D::Key>,
    A: ActiveCheck<D::Key>,
    N: ConnectionStates<D::Service>,
{
    tokio::pin!(discover);
    let (report_sender, mut check_reports) = reports();
    // The detectors' interval, read once: the health rules keep the rest.
    let detection_interval = health.outlier_detection.as_ref().map(|d| d.interval);
    let has_detection = detection_interval.is_some();
    let mut endpoints = Endpoints {
        active: IndexMap::new(),
        draining: Vec::new(),
        health: Health::new(health),
        reports: report_sender,
        next_check: 0,
        checked: HashMap::new(),
        connections_changed: Arc::new(Notify::new()),
        zone_aware,
        published_connections: Vec::new(),
    };
    let connections_changed = Arc::clone(&endpoints.connections_changed);
    // An interval too long for the clock never ticks.
    let mut ticker = detection_interval.and_then(|interval| {
        let first = Instant::now().checked_add(interval)?;
        let mut ticker = interval_at(first, interval);
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
        let next_return = Health::next_return(endpoints.active.values().map(|t| &t.health));
        if slow_start_step.is_none()
            && Health::in_slow_start(endpoints.active.values().map(|t| &t.health))
        {
            slow_start_step = endpoints
                .health
                .slow_start_step()
                .and_then(|step| Instant::now().checked_add(step));
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
                            if endpoints.apply(change, &shared, &sources) {
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
            Some(first) = check_reports.recv() => {
                // Every report waiting, then one snapshot: a start with many
                // endpoints brings a report from each at about once.
                let mut report = Some(first);
                while let Some((id, verdict)) = report {
                    // A report from a check that has since stopped (its key
                    // removed) finds no endpoint, and is dropped.
                    let found = endpoints
                        .checked
                        .get(&id)
                        .and_then(|key| endpoints.active.get_full_mut(key));
                    if let Some((_, key, tracked)) = found {
                        let mut view = (key, &mut tracked.health, &*tracked.endpoint);
                        changed |= endpoints.health.checked(&mut view, verdict);
                    }
                    report = check_reports.try_recv().ok();
                }
            }
            _ = connections_changed.notified() => {
                changed = endpoints.connections() != endpoints.published_connections;
            }
            _ = shared.drained.notified(), if !endpoints.draining.is_empty() => {
                changed = true;
            }
            _ = shared.tripped.notified(), if has_detection => {
                let mut views = Endpoints::views(&mut endpoints.active);
                changed = endpoints.health.eject_tripped(&mut views);
            }
            _ = sleep_until(next_return.unwrap_or_else(Instant::now)), if next_return.is_some() => {
                let mut views = Endpoints::views(&mut endpoints.active);
                changed = endpoints.health.return_due(&mut views);
            }
            _ = async {
                match &mut ticker {
                    Some(ticker) => ticker.tick().await,
                    None => std::future::pending().await,
                }
            } => {
                let mut views = Endpoints::views(&mut endpoints.active);
                changed = endpoints.health.evaluate_interval(&mut views, shared.latency_now_ns(), &shared.rtt);
            }
            _ = sleep_until(slow_start_step.unwrap_or_else(Instant::now)), if slow_start_step.is_some() => {
                slow_start_step = None;
                let mut views = Endpoints::views(&mut endpoints.active);
                changed = endpoints.health.advance_slow_start(&mut views);
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
