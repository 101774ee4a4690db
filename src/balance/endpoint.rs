//! One endpoint as the balancer holds it, the guard that counts a request in
//! flight on it, and the public view of its state.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::classify::{Outcome, RecordOutcome};
use crate::health::{CheckStatus, ConnectionState, ConnectionStatus, OutlierDetection};
use crate::load::{EndpointLoad, LatencyClock, RequestClock, RttEstimate};
use crate::strategy::{Candidates, PickContext};
use crate::topology::{EndpointMetadata, Readiness};

/// State shared by a balancer and all of its endpoints (not generic, so that
/// endpoints can reach it without knowing the strategy).
#[derive(Debug)]
pub(crate) struct Shared {
    /// The start of the health clock (ejections, load reports): tokio's.
    epoch: Instant,
    pub(crate) rtt: RttEstimate,
    /// The latency clock, when anything reads it: requests are timed, or
    /// the strategy reads the time (see `Strategy::uses_latency` and
    /// `Strategy::reads_clock`).
    latency_clock: Option<RequestClock>,
    /// Whether requests are timed (their latency recorded).
    times_requests: bool,
    /// Whether failures count into endpoints' cost: the strategy reads it
    /// (see `Strategy::reads_clock`).
    scores_failures: bool,
    seed: Option<AtomicU64>,
    closed: AtomicBool,
    /// Whether outcomes are counted for outlier detection (successes, and
    /// failures in a row); without it only failures are, for the stats.
    count_outcomes: bool,
    /// The failures in a row that take an endpoint out of service, when the
    /// consecutive-failures detector is on.
    trip_after: Option<u32>,
    /// Woken when an endpoint reaches `trip_after`, so the driver
    /// ejects it.
    pub(crate) tripped: Notify,
    /// Woken on every completion once closed, for `Balancer::shutdown`.
    pub(crate) idle: Notify,
    /// Woken when a draining endpoint's last request finishes, so the driver
    /// can let go of it.
    pub(crate) drained: Notify,
}

impl Shared {
    pub(crate) fn new(
        rtt: RttEstimate,
        seed: Option<u64>,
        latency_clock: Option<LatencyClock>,
        times_requests: bool,
        scores_failures: bool,
        outlier_detection: Option<&OutlierDetection>,
    ) -> Self {
        Self {
            epoch: Instant::now(),
            rtt,
            latency_clock: latency_clock.map(RequestClock::new),
            times_requests,
            scores_failures,
            seed: seed.map(crate::strategy::seeded_state),
            closed: AtomicBool::new(false),
            count_outcomes: outlier_detection.is_some(),
            trip_after: outlier_detection.and_then(|d| d.consecutive_failures),
            tripped: Notify::new(),
            idle: Notify::new(),
            drained: Notify::new(),
        }
    }

    /// Nanoseconds since the balancer was built, on tokio's clock (so paused
    /// time in tests and simulations applies).
    #[inline]
    pub(crate) fn now_ns(&self) -> u64 {
        self.ns_at(Instant::now())
    }

    /// `at` in nanoseconds since the balancer was built.
    #[inline]
    pub(crate) fn ns_at(&self, at: Instant) -> u64 {
        let nanos = at.saturating_duration_since(self.epoch).as_nanos();
        u64::try_from(nanos).unwrap_or(u64::MAX)
    }

    /// The time on the [`LatencyClock`] (the clock of every latency
    /// estimate and failure score), in nanoseconds since the balancer was
    /// built, when the balancer has one: requests are timed, or the
    /// strategy reads the time.
    #[inline]
    pub(crate) fn latency_clock_ns(&self) -> Option<u64> {
        self.latency_clock.as_ref().map(RequestClock::now_ns)
    }

    /// When a request starts, if requests are timed (the clock is read only
    /// then).
    #[inline]
    pub(crate) fn request_start(&self) -> Option<u64> {
        match self.times_requests {
            true => self.latency_clock_ns(),
            false => None,
        }
    }

    /// The latency clock's time, or 0 when the balancer has none.
    #[inline]
    pub(crate) fn latency_now_ns(&self) -> u64 {
        self.latency_clock_ns().unwrap_or(0)
    }

    #[inline]
    pub(crate) fn pick_context(&self, now_ns: u64) -> PickContext<'_> {
        match &self.seed {
            Some(seed) => PickContext::seeded(now_ns, &self.rtt, seed),
            None => PickContext::new(now_ns, &self.rtt),
        }
    }

    /// The context of a request's pick: at the request's start when it is
    /// timed (one clock read serves both), else reading the clock only if
    /// the strategy asks for the time.
    #[inline]
    pub(crate) fn request_pick_context(&self, start_ns: Option<u64>) -> PickContext<'_> {
        match (start_ns, &self.latency_clock) {
            (Some(now), _) => self.pick_context(now),
            (None, Some(clock)) => self.pick_context(0).reading(clock),
            (None, None) => self.pick_context(0),
        }
    }

    #[inline]
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.idle.notify_waiters();
    }
}

/// An endpoint: its key, its service (cloned for each request), and its live
/// load.
// `repr(C)` with the load first: its hot fields then sit right after the
// `Arc`'s reference counts (see `EndpointLoad`).
#[repr(C)]
pub(crate) struct Endpoint<K, S> {
    load: EndpointLoad,
    /// Unique in the process, so that a call can remember the endpoints it
    /// tried without knowing their key type.
    id: u64,
    key: K,
    service: S,
    /// One of the `ACTIVE`, `TRIPPED`, `EJECTED`, `DRAINING` states.
    state: AtomicU8,
    /// Where it stands with its active check: one of the `CHECK_` values.
    /// Read for the stats and the last-resort pick; the snapshot is what
    /// keeps requests away from it.
    check: AtomicU8,
    /// Times outlier detection ejected it.
    ejections: AtomicU32,
    /// While ejected: when it returns, in nanoseconds since the epoch.
    returns_at_ns: AtomicU64,
    /// Requests started on it when a lost connection last counted in its
    /// failures in a row: the requests numbered below were under way then,
    /// so their own lost connections are the same event.
    lost_connection_mark: AtomicU64,
    shared: Arc<Shared>,
    /// Its connection's state, if its service reports one: read by the
    /// driver when it publishes, and for the stats; never by requests.
    connection: Option<ConnectionStatus>,
    /// What discovery says of it. Inline: an endpoint costs one
    /// allocation, and its strings and labels are shared with the stats.
    metadata: EndpointMetadata,
    /// Its key's stable hash (see `Candidates::identity`).
    identity: u64,
}

/// In service.
const ACTIVE: u8 = 0;
/// Reached its consecutive-failure limit: requests avoid it until the driver
/// ejects it (or, if the ejection cap forbids, puts it back in service).
const TRIPPED: u8 = 1;
/// Out of service until its ejection time is up.
const EJECTED: u8 = 2;
/// Removed by discovery; its in-flight requests are finishing.
const DRAINING: u8 = 3;

/// Not actively checked.
const CHECK_NONE: u8 = 0;
const CHECK_PENDING: u8 = 1;
const CHECK_PASSING: u8 = 2;
const CHECK_FAILING: u8 = 3;

/// The next endpoint id; 0 is never used, so an empty slot can hold it.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

impl<K, S> Endpoint<K, S> {
    pub(crate) fn new(key: K, service: S, shared: Arc<Shared>) -> Self {
        let load = EndpointLoad::new(shared.latency_now_ns(), &shared.rtt);
        Self {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            key,
            service,
            load,
            state: AtomicU8::new(ACTIVE),
            check: AtomicU8::new(CHECK_NONE),
            ejections: AtomicU32::new(0),
            returns_at_ns: AtomicU64::new(0),
            lost_connection_mark: AtomicU64::new(0),
            shared,
            connection: None,
            metadata: EndpointMetadata::new(),
            identity: 0,
        }
    }

    /// The endpoint, its key's stable hash `identity`.
    pub(crate) fn with_identity(mut self, identity: u64) -> Self {
        self.identity = identity;
        self
    }

    /// The endpoint, described by `metadata`.
    pub(crate) fn with_metadata(mut self, metadata: EndpointMetadata) -> Self {
        self.metadata = metadata;
        self
    }

    /// What discovery says of it.
    pub(crate) fn metadata(&self) -> &EndpointMetadata {
        &self.metadata
    }

    /// Whether it takes requests now, rather than being a last resort:
    /// its connection takes them (see [`ConnectionState`]) and the platform
    /// is not terminating it.
    pub(crate) fn takes_requests(&self) -> bool {
        self.connection_takes_requests() && self.metadata.readiness() != Readiness::Terminating
    }

    /// The endpoint, its connection's state read from `connection`.
    pub(crate) fn with_connection(mut self, connection: Option<ConnectionStatus>) -> Self {
        self.connection = connection;
        self
    }

    /// Whether its connection takes requests now (see
    /// [`ConnectionState`]); an endpoint that reports none always does.
    pub(crate) fn connection_takes_requests(&self) -> bool {
        self.connection
            .as_ref()
            .is_none_or(|c| c.get().takes_requests())
    }

    /// Records a failure because the request's connection was lost, for
    /// request number `started` (see `EndpointLoad::start`).
    ///
    /// A server that closes its connections (a reload, a restart, an idle
    /// timeout racing a request) fails every request under way on them at
    /// once. That is one event: the first such failure counts in the
    /// failures in a row, and the failures of requests that had started
    /// before it count only in the totals (which the interval detectors
    /// and the stats read), or a healthy server would be ejected on every
    /// deploy. A request started after it that loses its connection again
    /// is a new event and counts in full, so a server that keeps dropping
    /// connections is ejected as before.
    pub(crate) fn record_connection_lost(&self, started: u64)
    where
        K: Send + Sync,
        S: Send + Sync,
    {
        let mut mark = self.lost_connection_mark.load(Ordering::Relaxed);
        loop {
            if started < mark {
                self.load.record_failure();
                return;
            }
            // Every request started so far was under way when this one
            // lost its connection.
            let now = self.load.requests();
            match self.lost_connection_mark.compare_exchange(
                mark,
                now,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    self.record_outcome(Outcome::Failure);
                    return;
                }
                // Another failure of the same event got there first.
                Err(current) => mark = current,
            }
        }
    }

    #[inline]
    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    #[inline]
    pub(crate) fn key(&self) -> &K {
        &self.key
    }

    #[inline]
    pub(crate) fn service(&self) -> &S {
        &self.service
    }

    #[inline]
    pub(crate) fn load(&self) -> &EndpointLoad {
        &self.load
    }

    /// Marks the endpoint as removed: it is no longer in the snapshot and
    /// its in-flight requests are finishing.
    pub(crate) fn start_draining(&self) {
        self.state.store(DRAINING, Ordering::SeqCst);
    }

    #[inline]
    fn is_draining(&self) -> bool {
        self.state.load(Ordering::SeqCst) == DRAINING
    }

    /// Neither ejected nor about to be, nor removed, nor kept out by its
    /// active check.
    #[inline]
    pub(crate) fn is_in_service(&self) -> bool {
        self.state.load(Ordering::Relaxed) == ACTIVE
            && self.check_status().is_none_or(CheckStatus::allows_traffic)
    }

    /// Kept out of service by its active check.
    pub(crate) fn fails_check(&self) -> bool {
        self.check_status().is_some_and(|s| !s.allows_traffic())
    }

    /// Where it stands with its active check, if it has one.
    fn check_status(&self) -> Option<CheckStatus> {
        match self.check.load(Ordering::Relaxed) {
            CHECK_PENDING => Some(CheckStatus::Pending),
            CHECK_PASSING => Some(CheckStatus::Passing),
            CHECK_FAILING => Some(CheckStatus::Failing),
            _ => None,
        }
    }

    /// Reached its consecutive-failure limit and waits for the driver.
    pub(crate) fn is_tripped(&self) -> bool {
        self.state.load(Ordering::Relaxed) == TRIPPED
    }

    /// Takes the endpoint out of service until `returns_at_ns`.
    pub(crate) fn eject(&self, returns_at_ns: u64) {
        self.returns_at_ns.store(returns_at_ns, Ordering::Relaxed);
        self.ejections.fetch_add(1, Ordering::Relaxed);
        self.load.reset_consecutive_failures();
        self.state.store(EJECTED, Ordering::SeqCst);
    }

    /// Adds `weight` to the failure score, when the strategy reads it.
    fn record_failure_cost(&self, weight: f64) {
        if !self.shared.scores_failures {
            return;
        }
        if let Some(now) = self.shared.latency_clock_ns() {
            self.load.record_failure_cost(now, weight);
        }
    }

    /// Takes over `old`'s ejection count, its load reports, its failure
    /// score, its slow-start factor and, if it is ejected, its ejection:
    /// `self` is a new service for the same key.
    pub(crate) fn inherit_health(&self, old: &Self) {
        // Its weight too: a new service for the same endpoint is the same
        // server, with the same load, no new blackout and no new slow start.
        self.load.inherit_reported_load(&old.load);
        self.load.inherit_failure_cost(&old.load);
        self.load
            .set_slow_start_factor(old.load.slow_start_factor());
        self.ejections
            .store(old.ejections.load(Ordering::Relaxed), Ordering::Relaxed);
        self.check
            .store(old.check.load(Ordering::Relaxed), Ordering::Relaxed);
        if old.state.load(Ordering::SeqCst) == EJECTED {
            self.returns_at_ns
                .store(old.returns_at_ns.load(Ordering::Relaxed), Ordering::Relaxed);
            self.state.store(EJECTED, Ordering::SeqCst);
        }
    }

    /// Puts an ejected or tripped endpoint back in service, with a clean
    /// count of failures in a row.
    pub(crate) fn restore(&self) {
        self.load.reset_consecutive_failures();
        self.state.store(ACTIVE, Ordering::SeqCst);
    }

    /// The state the public view shows.
    pub(crate) fn state(&self) -> EndpointState {
        match self.state.load(Ordering::Relaxed) {
            EJECTED => EndpointState::Ejected,
            DRAINING => EndpointState::Draining,
            _ if self.fails_check() => EndpointState::Unhealthy,
            _ => EndpointState::Active,
        }
    }

    pub(crate) fn stats(&self) -> EndpointStats<K>
    where
        K: Clone,
    {
        let now = self.shared.now_ns();
        let rtt_estimate = self.shared.request_start().map(|latency_now| {
            let rtt = self.load.rtt_estimate_ns(latency_now, &self.shared.rtt);
            Duration::from_nanos(rtt as u64)
        });
        let state = self.state();
        let returns_in = (state == EndpointState::Ejected).then(|| {
            let at = self.returns_at_ns.load(Ordering::Relaxed);
            Duration::from_nanos(at.saturating_sub(now))
        });
        EndpointStats {
            key: self.key.clone(),
            state,
            in_flight: self.load.in_flight(),
            rtt_estimate,
            requests: self.load.requests(),
            successes: self.shared.count_outcomes.then(|| self.load.successes()),
            failures: self.load.failures(),
            ejections: self.ejections.load(Ordering::Relaxed),
            returns_in,
            reported_load: self.load.reported_load(),
            malformed_load_reports: self.load.malformed_load_reports(),
            static_weight: self.load.static_weight(),
            slow_start_factor: self.load.slow_start_factor(),
            health_check: self.check_status(),
            connection: self.connection.as_ref().map(ConnectionStatus::get),
            metadata: self.metadata.clone(),
        }
    }
}

impl<K: fmt::Debug, S> fmt::Debug for Endpoint<K, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoint")
            .field("key", &self.key)
            .field("load", &self.load)
            .field("state", &self.state())
            .finish()
    }
}

impl<K: Send + Sync, S: Send + Sync> RecordOutcome for Endpoint<K, S> {
    fn record_load(&self, report: &crate::load::LoadReport) {
        let now = self.shared.now_ns();
        // A bare utilization header has no rate: it is weighed by the rate
        // this client sends. (An ORCA report without one is ignored.)
        let qps = if report.rps_fractional > 0.0 || !report.rate_from_client {
            report.rps_fractional
        } else {
            self.load.observed_qps(now)
        };
        let utilization = report.utilization_for_weight();
        self.load
            .record_reported_load(qps, report.eps, utilization, now);
    }

    fn record_overload(&self, pause: Option<std::time::Duration>) {
        self.record_failure_cost(crate::load::overload_weight(pause));
    }

    fn record_malformed_load(&self, error: &crate::load::LoadReportError) {
        self.load.count_malformed_load_report();
        tracing::debug!(%error, "ignored a malformed load report");
    }

    fn record_outcome(&self, outcome: Outcome) {
        if outcome == Outcome::Failure {
            // Into the endpoint's cost, for strategies that read it (P2C):
            // a failure that came fast must not make it look fast.
            self.record_failure_cost(1.0);
        }
        if !self.shared.count_outcomes {
            // Without outlier detection nothing reads successes or failures
            // in a row: a success costs nothing, a failure one add (the
            // failure count the stats show).
            if outcome == Outcome::Failure {
                self.load.record_failure();
            }
            return;
        }
        match outcome {
            Outcome::Success => self.load.record_success(),
            Outcome::Failure => {
                let in_a_row = self.load.record_failure_in_a_row();
                let Some(limit) = self.shared.trip_after else {
                    return;
                };
                // Only the request that trips it wakes the driver.
                if in_a_row >= limit
                    && self
                        .state
                        .compare_exchange(ACTIVE, TRIPPED, Ordering::SeqCst, Ordering::Relaxed)
                        .is_ok()
                {
                    self.shared.tripped.notify_one();
                }
            }
        }
    }
}

/// Counts one request in flight on an endpoint from dispatch until it is
/// completed or dropped, so that cancellation leaves the counters right.
pub(crate) struct InFlight<K, S> {
    /// Always `Some` until `complete` takes it.
    endpoint: Option<Arc<Endpoint<K, S>>>,
    /// When the request started, if requests are timed.
    start_ns: Option<u64>,
    /// Its number among the requests started on the endpoint.
    started: u64,
}

impl<K, S> InFlight<K, S> {
    /// Counts a request as started on `endpoint`, unless the balancer closed,
    /// the endpoint was removed since the snapshot was loaded, or (when
    /// `avoid_ejected`) it is out of service.
    pub(crate) fn start(
        endpoint: Arc<Endpoint<K, S>>,
        start_ns: Option<u64>,
        avoid_ejected: bool,
    ) -> Result<Self, Refused> {
        let started = endpoint.load.start();
        // Both flags are read after the increment, and their writers read the
        // in-flight count after setting them (`shutdown` sums the counts; the
        // driver prunes drained endpoints), all `SeqCst`: so either this
        // request sees the flag, or the other side sees the request.
        let refused = if endpoint.shared.is_closed() {
            Some(Refused::Closed)
        } else {
            match endpoint.state.load(Ordering::SeqCst) {
                DRAINING => Some(Refused::Draining),
                TRIPPED | EJECTED if avoid_ejected => Some(Refused::Ejected),
                _ => None,
            }
        };
        let mut guard = Self {
            endpoint: Some(endpoint),
            start_ns,
            started,
        };
        if let Some(refused) = refused {
            guard.endpoint().load.uncount_start();
            // Never sent: no latency to record.
            guard.start_ns = None;
            // Dropping the guard releases the in-flight count and wakes
            // whoever waits for it.
            return Err(refused);
        }
        Ok(guard)
    }

    pub(crate) fn endpoint(&self) -> &Endpoint<K, S> {
        match &self.endpoint {
            Some(endpoint) => endpoint,
            None => unreachable!("InFlight used after complete"),
        }
    }

    /// The request's number among those started on its endpoint.
    pub(crate) fn started(&self) -> u64 {
        self.started
    }

    /// Records the latency and releases the request; returns the endpoint,
    /// for the outcome report.
    pub(crate) fn complete(mut self) -> Arc<Endpoint<K, S>> {
        let endpoint = match self.endpoint.take() {
            Some(endpoint) => endpoint,
            None => unreachable!("InFlight completed twice"),
        };
        if let Some(start) = self.start_ns {
            let shared = &endpoint.shared;
            let now = shared.latency_now_ns();
            endpoint
                .load
                .record_rtt(now.saturating_sub(start), now, &shared.rtt);
        }
        release(&endpoint);
        endpoint
    }
}

/// Takes one request off the endpoint's in-flight count and wakes whoever
/// waits for it to drain.
fn release<K, S>(endpoint: &Endpoint<K, S>) {
    let before = endpoint.load.finish();
    let shared = &endpoint.shared;
    if before == 1 && endpoint.is_draining() {
        shared.drained.notify_one();
    }
    if shared.is_closed() {
        shared.idle.notify_waiters();
    }
}

impl<K, S> Drop for InFlight<K, S> {
    /// A request dropped before it completed (a hedge that lost, a timeout)
    /// ran at least this long: a lower bound, which may raise the
    /// peak-sensitive estimate but not lower it, so an endpoint that stalls
    /// is seen to stall even when nobody waits for its answers.
    fn drop(&mut self) {
        if let Some(endpoint) = self.endpoint.take() {
            if let Some(start) = self.start_ns {
                let shared = &endpoint.shared;
                let now = shared.latency_now_ns();
                endpoint
                    .load
                    .record_rtt_at_least(now.saturating_sub(start), now, &shared.rtt);
            }
            release(&endpoint);
        }
    }
}

/// Why a request could not start on the endpoint it picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// The balancer is closed.
    Closed,
    /// Discovery removed the endpoint after the request loaded its snapshot;
    /// pick again from a newer one.
    Draining,
    /// Out of service (ejected, or about to be); pick another.
    Ejected,
}

/// Whether an endpoint takes new requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum EndpointState {
    /// In the current set: gets new requests.
    Active,
    /// Removed or replaced by discovery: gets no new requests, and its
    /// in-flight requests are finishing.
    Draining,
    /// Taken out of service by [outlier detection](crate::health) until its
    /// ejection time is up; gets requests only in panic mode.
    Ejected,
    /// Kept out of service by its [active health check](crate::health::HealthCheck):
    /// failing it, or not passed yet; gets requests only in panic mode.
    Unhealthy,
}

/// A point-in-time view of one endpoint, from
/// [`Balancer::endpoints`](crate::Balancer::endpoints).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct EndpointStats<K> {
    /// The endpoint's discovery key.
    pub key: K,
    /// Whether it takes new requests.
    pub state: EndpointState,
    /// Requests in flight now.
    pub in_flight: usize,
    /// The Peak-EWMA latency estimate now; `None` when the balancer does not
    /// time requests (its strategy does not use latency and
    /// [`Builder::track_latency`](crate::balance::Builder::track_latency) is off).
    pub rtt_estimate: Option<Duration>,
    /// Requests sent to it since it was inserted.
    pub requests: u64,
    /// Requests [classified](crate::classify) as successes; counted only with
    /// [outlier detection](crate::balance::Builder::outlier_detection) (the only
    /// reader), `None` otherwise.
    pub successes: Option<u64>,
    /// Requests classified as failures.
    pub failures: u64,
    /// Times outlier detection ejected it, counting ejections later taken
    /// back as the start of an overload rather than an outlier (an `info`
    /// event says which were): each took it out of service for a while.
    pub ejections: u32,
    /// While [`Ejected`](EndpointState::Ejected): how long until it returns.
    pub returns_in: Option<Duration>,
    /// Its last usable load report, while a run of them is current (see
    /// [`WeightedRoundRobin`](crate::strategy::WeightedRoundRobin)).
    pub reported_load: Option<crate::load::ReportedLoad>,
    /// Load reports from it that could not be read, and were ignored.
    pub malformed_load_reports: u64,
    /// Its static weight (see [`Builder::static_weights`](crate::balance::Builder::static_weights)).
    pub static_weight: f64,
    /// The share of its weight it gets now: below 1 while in
    /// [slow start](crate::health::SlowStart).
    pub slow_start_factor: f64,
    /// Where it stands with its [active health check](crate::balance::Builder::health_check);
    /// `None` when it has none.
    pub health_check: Option<CheckStatus>,
    /// Its connection's state, when its service reports one (see
    /// [`Builder::connection_states`](crate::balance::Builder::connection_states)):
    /// an endpoint whose connection is being made or failed is not picked
    /// while another's is ready.
    pub connection: Option<ConnectionState>,
    /// What discovery says of it (see [`Builder::metadata`](crate::balance::Builder::metadata)).
    pub metadata: EndpointMetadata,
}

/// The balancer's snapshot is what its strategy picks from. Implemented
/// here, beside the private `Endpoint`, so that `strategy` knows nothing of
/// the balancer above it.
impl<K, S> Candidates for [Arc<Endpoint<K, S>>] {
    fn len(&self) -> usize {
        <[_]>::len(self)
    }

    fn load(&self, index: usize) -> &EndpointLoad {
        self[index].load()
    }

    fn metadata(&self, index: usize) -> &EndpointMetadata {
        self[index].metadata()
    }

    fn identity(&self, index: usize) -> u64 {
        self[index].identity
    }
}

/// The health rules act on the endpoint through its switches; the driver
/// hands them its endpoints.
impl<K, S> crate::health::Monitored for Endpoint<K, S> {
    fn load(&self) -> &crate::load::EndpointLoad {
        Endpoint::load(self)
    }

    fn is_tripped(&self) -> bool {
        Endpoint::is_tripped(self)
    }

    fn eject(&self, until: tokio::time::Instant) {
        Endpoint::eject(self, self.shared.ns_at(until));
    }

    fn restore(&self) {
        Endpoint::restore(self)
    }

    fn show_check(&self, status: CheckStatus) {
        let value = match status {
            CheckStatus::Pending => CHECK_PENDING,
            CheckStatus::Passing => CHECK_PASSING,
            CheckStatus::Failing => CHECK_FAILING,
        };
        self.check.store(value, Ordering::Relaxed);
    }
}
