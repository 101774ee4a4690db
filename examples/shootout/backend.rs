//! One backend's behaviour as running code: the same `Backend::handle` answers
//! both the real hyper servers and the simulated endpoints.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::StatusCode;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::sync::Semaphore;
use tokio::time::{sleep_until, Instant};

use crate::scenario::{BackendSpec, OutageKind, Stall, CLIENT_ZONE, CROSS_ZONE, SHED_WORK};

/// A backend's state during one run.
#[derive(Debug)]
pub struct Backend {
    spec: BackendSpec,
    epoch: Instant,
    hits: AtomicU64,
    /// Requests that arrived while it was down.
    hits_while_down: AtomicU64,
    queue: Option<Semaphore>,
    /// Seeded per backend, so a simulated run repeats exactly.
    rng: Mutex<SmallRng>,
    /// Requests received in each `WINDOW` since `epoch`.
    timeline: Mutex<Vec<u64>>,
    load: Mutex<LoadWindow>,
    /// Its cache, when the scenario gives it one.
    cache: Option<Mutex<Lru>>,
    cache_hits: AtomicU64,
    cache_lookups: AtomicU64,
    /// Requests refused for having waited too long (overload shedding).
    shed: AtomicU64,
}

/// A least-recently-used set of keys.
#[derive(Debug)]
struct Lru {
    entries: usize,
    /// Key to the tick it was last used at.
    used: HashMap<u64, u64>,
    /// Tick to key, oldest first.
    order: BTreeMap<u64, u64>,
    tick: u64,
}

impl Lru {
    fn new(entries: usize) -> Self {
        Self {
            entries,
            used: HashMap::new(),
            order: BTreeMap::new(),
            tick: 0,
        }
    }

    /// Whether `key` was held; it is held (as the most recent) afterwards.
    fn touch(&mut self, key: u64) -> bool {
        self.tick += 1;
        let hit = match self.used.insert(key, self.tick) {
            Some(last) => {
                self.order.remove(&last);
                true
            }
            None => false,
        };
        self.order.insert(self.tick, key);
        if self.used.len() > self.entries {
            if let Some((_, oldest)) = self.order.pop_first() {
                self.used.remove(&oldest);
            }
        }
        hit
    }
}

/// How busy a backend with a capacity has been: the rate and utilization it
/// reports (ORCA's `rps_fractional` and `application_utilization`, over the
/// last whole second), and its busy time over the whole run.
#[derive(Debug)]
struct LoadWindow {
    start: Instant,
    served: u64,
    busy: Duration,
    last: Option<(f64, f64)>,
    total_busy: Duration,
}

/// How long a backend takes to answer a health probe.
const PROBE_WORK: Duration = Duration::from_millis(1);

/// A request refused: the backend is restarting.
#[derive(Debug, Clone, Copy)]
pub struct Refused;

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection refused: the backend is restarting")
    }
}

impl std::error::Error for Refused {}

/// How long a backend measures its rate and utilization before reporting.
const LOAD_WINDOW: Duration = Duration::from_secs(1);

/// The width of the windows a backend counts its requests in, over time.
pub const WINDOW: Duration = Duration::from_millis(100);

impl Backend {
    /// The zone it runs in.
    pub fn zone(&self) -> &'static str {
        self.spec.zone
    }

    pub fn new(spec: BackendSpec, seed: u64) -> Arc<Self> {
        let cache = spec.cache;
        Arc::new(Self {
            queue: spec.capacity.map(Semaphore::new),
            spec,
            epoch: Instant::now(),
            hits: AtomicU64::new(0),
            hits_while_down: AtomicU64::new(0),
            rng: Mutex::new(SmallRng::seed_from_u64(seed)),
            timeline: Mutex::new(Vec::new()),
            load: Mutex::new(LoadWindow {
                start: Instant::now(),
                served: 0,
                busy: Duration::ZERO,
                last: None,
                total_busy: Duration::ZERO,
            }),
            cache: cache.map(|cache| Mutex::new(Lru::new(cache.entries))),
            cache_hits: AtomicU64::new(0),
            cache_lookups: AtomicU64::new(0),
            shed: AtomicU64::new(0),
        })
    }

    /// Cache hits and lookups so far.
    pub fn cache_stats(&self) -> (u64, u64) {
        (
            self.cache_hits.load(Ordering::Relaxed),
            self.cache_lookups.load(Ordering::Relaxed),
        )
    }

    /// The service time a request with `key` takes on average: its cache's
    /// hit or miss time, when it has a cache; else `None`.
    fn cached_latency(&self, key: Option<u64>) -> Option<Duration> {
        let (spec, cache, key) = (self.spec.cache?, self.cache.as_ref()?, key?);
        let hit = cache.lock().unwrap_or_else(|e| e.into_inner()).touch(key);
        self.cache_lookups.fetch_add(1, Ordering::Relaxed);
        if hit {
            self.cache_hits.fetch_add(1, Ordering::Relaxed);
        }
        Some(if hit { spec.hit } else { spec.miss })
    }

    /// The share of its capacity the backend was busy over `elapsed`, for
    /// backends with a capacity.
    pub fn utilization(&self, elapsed: Duration) -> Option<f64> {
        let capacity = self.spec.capacity? as f64;
        let busy = self
            .load
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .total_busy;
        Some(busy.as_secs_f64() / (capacity * elapsed.as_secs_f64().max(1e-9)))
    }

    /// Counts `work` served and gives the load report to send: an
    /// `endpoint-load-metrics` value, once a whole window has been measured.
    fn report(&self, work: Duration) -> Option<String> {
        let capacity = self.spec.capacity? as f64;
        let mut load = self.load.lock().unwrap_or_else(|e| e.into_inner());
        load.served += 1;
        load.busy += work;
        load.total_busy += work;
        let elapsed = load.start.elapsed();
        if elapsed >= LOAD_WINDOW {
            let seconds = elapsed.as_secs_f64();
            load.last = Some((
                load.served as f64 / seconds,
                load.busy.as_secs_f64() / (capacity * seconds),
            ));
            load.start = Instant::now();
            load.served = 0;
            load.busy = Duration::ZERO;
        }
        let (rps, utilization) = load.last?;
        Some(format!(
            "TEXT rps_fractional={rps:.3}, application_utilization={utilization:.5}"
        ))
    }

    /// Requests it refused for having waited too long for a slot.
    pub fn shed(&self) -> u64 {
        self.shed.load(Ordering::Relaxed)
    }

    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    /// Requests that arrived while it was down (refused or never answered).
    pub fn hits_while_down(&self) -> u64 {
        self.hits_while_down.load(Ordering::Relaxed)
    }

    /// How the backend is down at `t`, if it is.
    fn outage_at(&self, t: Instant) -> Option<OutageKind> {
        let since = t.saturating_duration_since(self.epoch);
        self.spec
            .outages
            .iter()
            .find(|o| o.from <= since && since < o.until)
            .map(|o| o.kind)
    }

    /// Answers a health probe: at once when up, refused when restarting,
    /// never when black-holed, and after its stall when stalling (a probe
    /// is served by the same stalled process).
    pub async fn probe(&self) -> Result<(), &'static str> {
        match self.outage_at(Instant::now()) {
            Some(OutageKind::Refusing) => return Err("connection refused"),
            Some(OutageKind::Silent) => std::future::pending().await,
            None => {}
        }
        sleep_until(self.after_stall(Instant::now() + PROBE_WORK)).await;
        Ok(())
    }

    /// When the backend was made: the start of its first window.
    pub fn epoch(&self) -> Instant {
        self.epoch
    }

    /// Requests received in each [`WINDOW`] since [`epoch`](Self::epoch).
    pub fn timeline(&self) -> Vec<u64> {
        self.timeline
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Serves one request: waits as the spec says, then gives the status
    /// and, for a backend with a capacity, its load report. While the
    /// backend is restarting the request is refused (`Err`); while it is
    /// black-holed it is never answered.
    pub async fn handle(&self, key: Option<u64>) -> Result<(StatusCode, Option<String>), Refused> {
        self.hits.fetch_add(1, Ordering::Relaxed);
        let cross_zone = self.spec.zone != CLIENT_ZONE;
        if cross_zone {
            tokio::time::sleep(CROSS_ZONE).await;
        }
        if let Some(kind) = self.outage_at(Instant::now()) {
            self.hits_while_down.fetch_add(1, Ordering::Relaxed);
            match kind {
                OutageKind::Refusing => return Err(Refused),
                OutageKind::Silent => std::future::pending().await,
            }
        }
        {
            let window = (self.epoch.elapsed().as_nanos() / WINDOW.as_nanos()) as usize;
            let mut timeline = self.timeline.lock().unwrap_or_else(|e| e.into_inner());
            if timeline.len() <= window {
                timeline.resize(window + 1, 0);
            }
            timeline[window] += 1;
        }
        let (fails, slow, draw) = {
            let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
            (
                rng.random_bool(self.spec.error_rate.clamp(0.0, 1.0)),
                rng.random_bool(self.spec.slow_rate.clamp(0.0, 1.0)),
                // An exponential draw of mean 1, drawn only for exponential
                // service, so that the other scenarios' streams stay as
                // they were.
                self.spec.exponential.then(|| exponential(&mut rng)),
            )
        };
        let arrived = Instant::now();
        let _permit = match &self.queue {
            Some(queue) => queue.acquire().await.ok(),
            None => None,
        };
        if self
            .spec
            .shed_after
            .is_some_and(|limit| arrived.elapsed() > limit)
        {
            // Refusing takes the slot too: overload costs the backend
            // some of its capacity.
            self.shed.fetch_add(1, Ordering::Relaxed);
            sleep_until(self.after_stall(Instant::now() + SHED_WORK)).await;
            let _ = self.report(SHED_WORK);
            return Ok((StatusCode::SERVICE_UNAVAILABLE, None));
        }
        if fails {
            tokio::time::sleep(Duration::from_millis(1)).await;
            return Ok((StatusCode::SERVICE_UNAVAILABLE, None));
        }
        // Looked up once the request is served (its permit held), as a
        // server's cache is read by the work it saves.
        let latency = self.cached_latency(key).unwrap_or(self.spec.latency);
        let mean = if slow {
            latency * self.spec.slow_factor
        } else {
            latency
        };
        let work = match draw {
            Some(draw) => mean.mul_f64(draw),
            None => mean,
        };
        let now = Instant::now();
        let start = self.after_stall(now);
        let done = self.after_stall(start + work);
        sleep_until(
            done + if cross_zone {
                CROSS_ZONE
            } else {
                Duration::ZERO
            },
        )
        .await;
        Ok((StatusCode::OK, self.report(work)))
    }

    /// `t`, or the end of the stall `t` falls in.
    fn after_stall(&self, t: Instant) -> Instant {
        let Some(Stall { every, pause }) = self.spec.stall else {
            return t;
        };
        let since = t.saturating_duration_since(self.epoch);
        let every_ns = every.as_nanos().max(1);
        let phase = Duration::from_nanos((since.as_nanos() % every_ns) as u64);
        let stall_starts = every.saturating_sub(pause);
        if phase >= stall_starts {
            t + (every - phase)
        } else {
            t
        }
    }
}

/// A draw from the exponential distribution of mean 1 (service times here,
/// Poisson arrivals' gaps in `run`).
pub fn exponential(rng: &mut SmallRng) -> f64 {
    -(1.0 - rng.random::<f64>()).ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_request_that_would_finish_inside_a_stall_waits_for_its_end() {
        let spec = BackendSpec {
            stall: Some(Stall {
                every: Duration::from_secs(1),
                pause: Duration::from_millis(200),
            }),
            ..BackendSpec::answering_in(5)
        };
        let backend = Backend::new(spec, 1);
        tokio::time::advance(Duration::from_millis(797)).await;
        let start = Instant::now();
        let _ = backend.handle(None).await;
        // 797 + 5 = 802 ms lands in the stall (800..1000 ms): done at 1000 ms.
        assert_eq!(start.elapsed(), Duration::from_millis(203));
    }

    #[tokio::test(start_paused = true)]
    async fn requests_beyond_capacity_queue() {
        let spec = BackendSpec {
            capacity: Some(2),
            ..BackendSpec::answering_in(10)
        };
        let backend = Backend::new(spec, 1);
        let start = Instant::now();
        let tasks: Vec<_> = (0..4)
            .map(|_| {
                let backend = backend.clone();
                tokio::spawn(async move { backend.handle(None).await })
            })
            .collect();
        for task in tasks {
            assert_eq!(task.await.unwrap().map(|a| a.0).ok(), Some(StatusCode::OK));
        }
        assert_eq!(start.elapsed(), Duration::from_millis(20));
    }

    #[tokio::test(start_paused = true)]
    async fn a_backend_with_a_capacity_reports_its_rate_and_utilization() {
        let spec = BackendSpec {
            capacity: Some(4),
            ..BackendSpec::answering_in(10)
        };
        let backend = Backend::new(spec, 1);
        let mut last = None;
        // One request at a time for 1.2 s: 100 per second, a quarter of 4.
        for _ in 0..120 {
            last = backend.handle(None).await.ok().and_then(|answer| answer.1);
        }
        let report = last.unwrap_or_default();
        assert!(
            report.starts_with("TEXT rps_fractional=100.000, application_utilization=0.25"),
            "{report}"
        );
    }
}
