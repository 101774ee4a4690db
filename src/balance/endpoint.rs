//! One endpoint as the balancer holds it, the guard that counts a request in
//! flight on it, and the public view of its state.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::load::{EndpointLoad, RttEstimate};
use crate::strategy::PickContext;

/// State shared by a balancer and all of its endpoints (not generic, so that
/// endpoints can reach it without knowing the strategy).
#[derive(Debug)]
pub(crate) struct Shared {
    epoch: Instant,
    pub(crate) rtt: RttEstimate,
    /// Whether requests are timed (see `Strategy::uses_latency`).
    track_latency: bool,
    seed: Option<AtomicU64>,
    closed: AtomicBool,
    /// Woken on every completion once closed, for `Balancer::shutdown`.
    pub(crate) idle: Notify,
    /// Woken when a draining endpoint's last request finishes, so the driver
    /// can let go of it.
    pub(crate) drained: Notify,
}

impl Shared {
    pub(crate) fn new(rtt: RttEstimate, seed: Option<u64>, track_latency: bool) -> Self {
        Self {
            epoch: Instant::now(),
            rtt,
            track_latency,
            seed: seed.map(AtomicU64::new),
            closed: AtomicBool::new(false),
            idle: Notify::new(),
            drained: Notify::new(),
        }
    }

    /// Nanoseconds since the balancer was built, on tokio's clock (so paused
    /// time in tests and simulations applies).
    pub(crate) fn now_ns(&self) -> u64 {
        Instant::now()
            .saturating_duration_since(self.epoch)
            .as_nanos() as u64
    }

    /// The time a request starts, when requests are timed.
    pub(crate) fn request_clock(&self) -> Option<u64> {
        self.track_latency.then(|| self.now_ns())
    }

    pub(crate) fn pick_context(&self, now_ns: u64) -> PickContext<'_> {
        match &self.seed {
            Some(seed) => PickContext::seeded(now_ns, &self.rtt, seed),
            None => PickContext::new(now_ns, &self.rtt),
        }
    }

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
pub(crate) struct Endpoint<K, S> {
    key: K,
    service: S,
    load: EndpointLoad,
    draining: AtomicBool,
    shared: Arc<Shared>,
}

impl<K, S> Endpoint<K, S> {
    pub(crate) fn new(key: K, service: S, shared: Arc<Shared>) -> Self {
        let load = EndpointLoad::new(shared.now_ns(), &shared.rtt);
        Self {
            key,
            service,
            load,
            draining: AtomicBool::new(false),
            shared,
        }
    }

    pub(crate) fn key(&self) -> &K {
        &self.key
    }

    pub(crate) fn service(&self) -> &S {
        &self.service
    }

    pub(crate) fn load(&self) -> &EndpointLoad {
        &self.load
    }

    /// Marks the endpoint as removed: it is no longer in the snapshot and
    /// its in-flight requests are finishing.
    pub(crate) fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub(crate) fn stats(&self, state: EndpointState) -> EndpointStats<K>
    where
        K: Clone,
    {
        let rtt_estimate = self.shared.request_clock().map(|now| {
            let rtt = self.load.rtt_estimate_ns(now, &self.shared.rtt);
            Duration::from_nanos(rtt as u64)
        });
        EndpointStats {
            key: self.key.clone(),
            state,
            in_flight: self.load.in_flight(),
            rtt_estimate,
            requests: self.load.requests(),
            failures: self.load.failures(),
        }
    }
}

impl<K: fmt::Debug, S> fmt::Debug for Endpoint<K, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoint")
            .field("key", &self.key)
            .field("load", &self.load)
            .field("draining", &self.draining)
            .finish()
    }
}

/// Counts one request in flight on an endpoint from dispatch until it is
/// completed or dropped, so that cancellation leaves the counters right.
pub(crate) struct InFlight<K, S> {
    endpoint: Arc<Endpoint<K, S>>,
    /// When the request started, if requests are timed.
    start_ns: Option<u64>,
}

impl<K, S> InFlight<K, S> {
    /// Counts a request as started on `endpoint`, unless the balancer closed
    /// or the endpoint was removed since the snapshot was loaded.
    pub(crate) fn start(
        endpoint: Arc<Endpoint<K, S>>,
        start_ns: Option<u64>,
    ) -> Result<Self, Refused> {
        endpoint.load.start();
        // Both flags are read after the increment, and their writers read the
        // in-flight count after setting them (`shutdown` sums the counts; the
        // driver prunes drained endpoints), all `SeqCst`: so either this
        // request sees the flag, or the other side sees the request.
        let refused = if endpoint.shared.is_closed() {
            Some(Refused::Closed)
        } else if endpoint.draining.load(Ordering::SeqCst) {
            Some(Refused::Draining)
        } else {
            None
        };
        let guard = Self { endpoint, start_ns };
        if let Some(refused) = refused {
            guard.endpoint.load.uncount_start();
            // Dropping the guard releases the in-flight count and wakes
            // whoever waits for it.
            return Err(refused);
        }
        Ok(guard)
    }

    pub(crate) fn endpoint(&self) -> &Endpoint<K, S> {
        &self.endpoint
    }

    /// Records the outcome and latency, then releases the request.
    pub(crate) fn complete(self, success: bool) {
        if let Some(start) = self.start_ns {
            let shared = &self.endpoint.shared;
            let now = shared.now_ns();
            self.endpoint
                .load
                .record_rtt(now.saturating_sub(start), now, &shared.rtt);
        }
        if !success {
            self.endpoint.load.record_failure();
        }
    }
}

impl<K, S> Drop for InFlight<K, S> {
    fn drop(&mut self) {
        let before = self.endpoint.load.finish();
        let shared = &self.endpoint.shared;
        if before == 1 && self.endpoint.draining.load(Ordering::SeqCst) {
            shared.drained.notify_one();
        }
        if shared.is_closed() {
            shared.idle.notify_waiters();
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
    /// [`Builder::track_latency`](crate::Builder::track_latency) is off).
    pub rtt_estimate: Option<Duration>,
    /// Requests sent to it since it was inserted.
    pub requests: u64,
    /// Requests that ended in an error from its service.
    pub failures: u64,
}
