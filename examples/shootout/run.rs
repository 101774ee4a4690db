//! Running one contender on one scenario: the open-loop load generator, and
//! the two modes (real hyper servers, or simulated backends on paused time).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_core::Stream;
use hdrhistogram::Histogram;
use http_body_util::Empty;
use hyper::body::Bytes;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio::time::{sleep_until, Instant};
use tower::{service_fn, BoxError, ServiceExt};
use tower_lb::discover;
use tower_lb::error::NeverSent;
use tower_lb::http::HttpEndpoint;
use tower_lb::load::LatencyClock;
use tower_lb::request::{hash_key_of, HasCallContext};
use tower_lb::retry::{ReplayBody, DEFAULT_REPLAY_CAP};

use crate::backend::{Backend, WINDOW};
use crate::contender::{Answer, Built, Contender, Discovery, Endpoint, Probe, Request};

/// The ORCA load report header.
const LOAD_METRICS: &str = "endpoint-load-metrics";
use crate::scenario::{KeySpec, Outage, OutageKind, Scenario, CLIENT_ZONE};

/// How hard and how long to drive a run.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    /// Requests per second offered, whatever the answers (open loop).
    pub rate: f64,
    /// How long requests are offered.
    pub duration: Duration,
    pub seed: u64,
}

/// What one contender did on one scenario.
#[derive(Debug, Clone)]
pub struct RunResult {
    pub contender: Contender,
    /// Latency of successful requests in microseconds, measured from each
    /// request's intended arrival time.
    pub latency_us: Histogram<u64>,
    pub ok: u64,
    pub failed: u64,
    /// The same, for the requests that arrived in the first and in the
    /// second half of the run (the `zones` scenario loses backends at the
    /// halfway point).
    pub halves: [Half; 2],
    /// From the first arrival to the last answer.
    pub elapsed: Duration,
    /// Requests each backend received.
    pub hits: Vec<u64>,
    /// Requests each backend received while it was down.
    pub hits_while_down: Vec<u64>,
    /// Each backend's average utilization over the run, for backends with a
    /// capacity.
    pub utilization: Vec<Option<f64>>,
    /// Per backend: how many times outlier detection ejected it, and how
    /// many requests it had been sent when it was first ejected.
    pub ejections: Vec<Ejections>,
    /// Per backend: requests received in each `backend::WINDOW` of the run.
    pub timeline: Vec<Vec<u64>>,
    /// When the late backends joined, since the run started (scenarios with
    /// late backends only).
    pub joined_at: Option<Duration>,
    /// Per backend: cache hits and lookups (scenarios with caches only).
    pub cache: Vec<(u64, u64)>,
    /// Requests the backends refused for having waited too long for a slot.
    pub shed: u64,
}

/// After a scale-up: how soon each new backend got its share, and the load
/// of the old ones.
#[derive(Debug, Clone, PartialEq)]
pub struct ScaleUp {
    /// Per new backend: from the join to the end of the first window in
    /// which it got at least 0.8x the old backends' mean (`None`: never).
    pub reach: Vec<Option<Duration>>,
    /// For each of the first ten windows after the join: the lowest new
    /// backend's requests over the old backends' mean.
    pub lowest: Vec<f64>,
    /// Requests per second to each old backend (their mean) in the second
    /// before the join, and from one second after it to the end.
    pub old_before: f64,
    pub old_after: f64,
}

/// One backend's ejections during a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ejections {
    pub count: u32,
    pub sent_before_first: Option<u64>,
}

impl RunResult {
    fn new(
        contender: Contender,
        generated: Generated,
        backends: &[Arc<Backend>],
        joined_at: Option<Duration>,
    ) -> Self {
        let Generated {
            latency_us,
            ok,
            failed,
            halves,
            elapsed,
            ejections,
        } = generated;
        let mut ejections = ejections;
        ejections.resize(backends.len(), Ejections::default());
        Self {
            contender,
            latency_us,
            ok,
            failed,
            halves,
            elapsed,
            hits: backends.iter().map(|b| b.hits()).collect(),
            hits_while_down: backends.iter().map(|b| b.hits_while_down()).collect(),
            utilization: backends.iter().map(|b| b.utilization(elapsed)).collect(),
            ejections,
            timeline: backends.iter().map(|b| b.timeline()).collect(),
            joined_at,
            cache: backends.iter().map(|b| b.cache_stats()).collect(),
            shed: backends.iter().map(|b| b.shed()).sum(),
        }
    }

    /// The share of cache lookups that hit, over every backend.
    pub fn cache_hit_rate(&self) -> f64 {
        let (hits, lookups) = self
            .cache
            .iter()
            .fold((0, 0), |(h, l), &(hits, lookups)| (h + hits, l + lookups));
        hits as f64 / (lookups.max(1)) as f64
    }

    /// The most requests any backend received over the mean.
    pub fn max_over_mean_requests(&self) -> f64 {
        let max = self.hits.iter().copied().max().unwrap_or(0) as f64;
        let mean = self.hits.iter().sum::<u64>() as f64 / self.hits.len().max(1) as f64;
        max / mean.max(1.0)
    }

    /// The busiest backend's utilization over the mean (backends with a
    /// capacity): how unevenly the work, not just the requests, is spread.
    pub fn max_over_mean_load(&self) -> Option<f64> {
        let busy: Vec<f64> = self.utilization.iter().copied().collect::<Option<_>>()?;
        let max = busy.iter().copied().fold(0.0, f64::max);
        let mean = busy.iter().sum::<f64>() / busy.len().max(1) as f64;
        (mean > 0.0).then(|| max / mean)
    }

    /// The share of the requests sent to backends outside the client's
    /// zone, in the first and in the second half of the run (by the
    /// backends' 100 ms windows).
    pub fn cross_zone_shares(&self, scenario: &Scenario) -> [f64; 2] {
        let half = ((self.elapsed / 2).as_nanos() / WINDOW.as_nanos()) as usize;
        let mut sent = [[0u64; 2]; 2];
        for (timeline, spec) in self.timeline.iter().zip(&scenario.backends) {
            let cross = usize::from(spec.zone != CLIENT_ZONE);
            for (window, &n) in timeline.iter().enumerate() {
                sent[usize::from(window >= half)][cross] += n;
            }
        }
        sent.map(|[local, cross]| cross as f64 / (local + cross).max(1) as f64)
    }

    pub fn requests(&self) -> u64 {
        self.ok + self.failed
    }

    pub fn success_rate(&self) -> f64 {
        self.ok as f64 / self.requests().max(1) as f64
    }

    pub fn throughput(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Latency at quantile `q`, in milliseconds.
    pub fn latency_ms(&self, q: f64) -> f64 {
        self.latency_us.value_at_quantile(q) as f64 / 1000.0
    }

    /// Requests the backends received, retries and hedges included.
    pub fn attempts(&self) -> u64 {
        self.hits.iter().sum()
    }

    /// Attempts per request: 1.0 without retries or hedges.
    pub fn amplification(&self) -> f64 {
        self.attempts() as f64 / self.requests().max(1) as f64
    }

    /// What happened after the late backends joined, for a scenario with
    /// `late` of them.
    pub fn scale_up(&self, late: usize) -> Option<ScaleUp> {
        let joined_at = self.joined_at?;
        let n = self.timeline.len();
        if late == 0 || late >= n {
            return None;
        }
        let old = n - late;
        let window_s = WINDOW.as_secs_f64();
        // The first whole window after the join.
        let first = joined_at.as_nanos().div_ceil(WINDOW.as_nanos()) as usize;
        let windows = self.timeline.iter().map(Vec::len).max().unwrap_or(0);
        let count = |backend: usize, w: usize| self.timeline[backend].get(w).copied().unwrap_or(0);
        let old_mean = |w: usize| (0..old).map(|b| count(b, w)).sum::<u64>() as f64 / old as f64;
        let ratio = |backend: usize, w: usize| {
            let mean = old_mean(w);
            if mean > 0.0 {
                count(backend, w) as f64 / mean
            } else {
                1.0
            }
        };
        let reach = (old..n)
            .map(|b| {
                (first..windows)
                    .find(|&w| ratio(b, w) >= 0.8)
                    .map(|w| WINDOW * (w - first + 1) as u32)
            })
            .collect();
        let lowest = (first..windows.min(first + 10))
            .map(|w| (old..n).map(|b| ratio(b, w)).fold(f64::INFINITY, f64::min))
            .collect();
        // Per old backend, in the second before the join and from a second
        // after it to the end (the last window may be partial: left out).
        let rate = |from: usize, to: usize| {
            let span = to.saturating_sub(from).max(1);
            (from..to).map(old_mean).sum::<f64>() / (span as f64 * window_s)
        };
        let per_second = (1.0 / window_s).round() as usize;
        Some(ScaleUp {
            reach,
            lowest,
            old_before: rate(first.saturating_sub(per_second), first),
            old_after: rate(first + per_second, windows.saturating_sub(1)),
        })
    }

    /// Each backend's share of the requests, in percent.
    pub fn shares(&self) -> Vec<f64> {
        let total = self.hits.iter().sum::<u64>().max(1) as f64;
        self.hits
            .iter()
            .map(|&h| 100.0 * h as f64 / total)
            .collect()
    }
}

/// A `GET /` (the default method and URI), with `key` as its hash key and
/// in its `x-key` header when it has one.
pub fn request(key: Option<u64>) -> Request {
    let mut req = http::Request::new(ReplayBody::new(Empty::new(), DEFAULT_REPLAY_CAP));
    if let Some(key) = key {
        req.call_context_mut()
            .set_hash_key(hash_key_of(&key.to_le_bytes()));
        req.headers_mut()
            .insert(KEY_HEADER, http::HeaderValue::from(key));
    }
    req
}

/// The header a request's key travels in, for the backends.
const KEY_HEADER: &str = "x-key";

/// A request's key, as a backend reads it.
fn key_of<B>(req: &http::Request<B>) -> Option<u64> {
    req.headers().get(KEY_HEADER)?.to_str().ok()?.parse().ok()
}

/// Draws keys by a Zipf law: key `k` (from 0) with a weight of
/// `1 / (k + 1)^s`, by a binary search of the cumulative weights.
struct Zipf {
    cumulative: Vec<f64>,
}

impl Zipf {
    fn new(keys: KeySpec) -> Self {
        let mut total = 0.0;
        let cumulative = (0..keys.count)
            .map(|k| {
                total += 1.0 / ((k + 1) as f64).powf(keys.zipf);
                total
            })
            .collect();
        Self { cumulative }
    }

    fn draw(&self, rng: &mut SmallRng) -> u64 {
        let total = self.cumulative.last().copied().unwrap_or(0.0);
        let x = rng.random::<f64>() * total;
        self.cumulative.partition_point(|&c| c < x) as u64
    }
}

/// What the load generator saw.
struct Generated {
    latency_us: Histogram<u64>,
    ok: u64,
    failed: u64,
    halves: [Half; 2],
    elapsed: Duration,
    ejections: Vec<Ejections>,
}

/// How long the load generator waits for an answer before it counts the
/// request as failed: longer than any answer in the other scenarios (a
/// queue at an overloaded backend reaches 20 s), so that it bounds only
/// requests nothing else does (a black-holed backend's, without timeouts).
pub const GIVE_UP: Duration = Duration::from_secs(30);

/// How often the run looks at the balancer's endpoint stats. An ejected
/// endpoint gets no requests until it returns (30 s by default, longer than
/// a run), so its request count read any time during the ejection is the
/// count at the moment it was ejected.
const PROBE_EVERY: Duration = Duration::from_millis(10);

/// Watches for ejections until the run ends.
async fn watch_ejections(probe: Probe, ejections: Arc<std::sync::Mutex<Vec<Ejections>>>) {
    loop {
        tokio::time::sleep(PROBE_EVERY).await;
        let stats = probe();
        let mut seen = ejections.lock().unwrap_or_else(|e| e.into_inner());
        for endpoint in stats {
            if seen.len() <= endpoint.key {
                seen.resize(endpoint.key + 1, Ejections::default());
            }
            let entry = &mut seen[endpoint.key];
            if endpoint.ejections > 0 && entry.sent_before_first.is_none() {
                entry.sent_before_first = Some(endpoint.requests);
            }
            entry.count = endpoint.ejections;
        }
    }
}

/// Offers requests at `load.rate` as a Poisson process, never waiting for
/// answers. Timers tick in milliseconds, so each wake-up releases every
/// arrival already due, and every latency counts from the intended arrival
/// (no coordinated omission).
async fn generate(Built { client, probe }: Built, load: Load, keys: Option<KeySpec>) -> Generated {
    let ejections = Arc::new(std::sync::Mutex::new(Vec::new()));
    let watcher = probe.map(|probe| tokio::spawn(watch_ejections(probe, ejections.clone())));
    let mut rng = SmallRng::seed_from_u64(load.seed ^ 0x0a11_7e57);
    let mut gap =
        move || Duration::from_secs_f64(crate::backend::exponential(&mut rng) / load.rate);
    // Keys from a stream of their own, so that the arrivals stay the same.
    let mut key_rng = SmallRng::seed_from_u64(load.seed ^ 0x0c0f_fee0_0000_0001);
    let zipf = keys.map(Zipf::new);
    let mut key = move || zipf.as_ref().map(|zipf| zipf.draw(&mut key_rng));
    let start = Instant::now();
    let end = start + load.duration;
    let half = start + load.duration / 2;
    let mut next = start + gap();
    let mut in_flight = JoinSet::new();
    while next < end {
        let now = Instant::now();
        while next <= now && next < end {
            let intended = next;
            let call = client.clone().oneshot(request(key()));
            in_flight.spawn(async move {
                // A request nothing bounds (a contender without timeouts, a
                // backend that never answers) is given up on, and failed.
                let answer = match tokio::time::timeout(GIVE_UP, call).await {
                    Ok(answer) => answer,
                    Err(elapsed) => Err(BoxError::from(elapsed)),
                };
                (
                    intended.elapsed(),
                    matches!(answer, Ok(status) if status.is_success()),
                    usize::from(intended >= half),
                )
            });
            next += gap();
        }
        sleep_until(next.min(end)).await;
    }
    let mut latency_us = Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid bounds");
    let (mut ok, mut failed) = (0, 0);
    let mut halves = [Half::new(), Half::new()];
    while let Some(done) = in_flight.join_next().await {
        match done {
            Ok((latency, true, i)) => {
                ok += 1;
                let us = latency.as_micros().max(1) as u64;
                latency_us.saturating_record(us);
                halves[i].ok += 1;
                halves[i].latency_us.saturating_record(us);
            }
            Ok((_, false, i)) => {
                failed += 1;
                halves[i].failed += 1;
            }
            Err(_) => failed += 1,
        }
    }
    let elapsed = start.elapsed();
    if let Some(watcher) = watcher {
        watcher.abort();
    }
    let ejections = ejections.lock().unwrap_or_else(|e| e.into_inner()).clone();
    Generated {
        latency_us,
        ok,
        failed,
        halves,
        elapsed,
        ejections,
    }
}

/// What happened to the requests that arrived in one half of a run.
#[derive(Debug, Clone)]
pub struct Half {
    pub latency_us: Histogram<u64>,
    pub ok: u64,
    pub failed: u64,
}

impl Half {
    fn new() -> Self {
        Self {
            latency_us: Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid bounds"),
            ok: 0,
            failed: 0,
        }
    }

    /// The `q` quantile of the successful requests' latency, in ms.
    pub fn latency_ms(&self, q: f64) -> f64 {
        self.latency_us.value_at_quantile(q) as f64 / 1000.0
    }
}

/// The discovery stream of a run: every backend from the start, or for a
/// scenario with late backends the others first and the late ones at
/// `join_at` (a task inserts them then). Returns when they join, since the
/// backends' epoch.
fn discovery(
    scenario: &Scenario,
    endpoints: Vec<Endpoint>,
    backends: &[Arc<Backend>],
    join_at: Instant,
) -> (Discovery, Option<Duration>) {
    if scenario.late == 0 {
        return (
            Box::pin(BoxErrors(discover::fixed(
                endpoints.into_iter().enumerate(),
            ))),
            None,
        );
    }
    let (handle, stream) = discover::channel();
    let first = endpoints.len().saturating_sub(scenario.late);
    let mut endpoints = endpoints.into_iter().enumerate();
    for (i, endpoint) in endpoints.by_ref().take(first) {
        let _ = handle.insert(i, endpoint);
    }
    let late: Vec<_> = endpoints.collect();
    tokio::spawn(async move {
        sleep_until(join_at).await;
        for (i, endpoint) in late {
            let _ = handle.insert(i, endpoint);
        }
    });
    let epoch = backends.first().map_or(join_at, |b| b.epoch());
    (
        Box::pin(BoxErrors(stream)),
        Some(join_at.saturating_duration_since(epoch)),
    )
}

/// A discovery stream whose errors are boxed, so that a fixed list (which
/// never fails) and a channel (which can say it found nothing) have one type.
pub struct BoxErrors<S>(pub S);

impl<S, T, E> Stream for BoxErrors<S>
where
    S: Stream<Item = Result<T, E>> + Unpin,
    E: Into<BoxError>,
{
    type Item = Result<T, BoxError>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        std::pin::Pin::new(&mut self.0)
            .poll_next(cx)
            .map(|item| item.map(|result| result.map_err(Into::into)))
    }
}

fn backends(scenario: &Scenario, load: Load) -> Vec<Arc<Backend>> {
    scenario
        .backends
        .iter()
        .enumerate()
        .map(|(i, spec)| {
            let mut spec = spec.clone();
            if scenario.down_from_halfway.contains(&i) {
                spec.outages.push(Outage {
                    from: load.duration / 2,
                    until: Duration::MAX,
                    kind: OutageKind::Refusing,
                });
            }
            Backend::new(spec, load.seed.wrapping_mul(31).wrapping_add(i as u64))
        })
        .collect()
}

/// A fresh single-threaded runtime on paused time, for a simulated run.
pub fn paused_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a current-thread runtime")
}

/// An endpoint over a simulated backend: the backend's answer, or a
/// refused connection as an error that says the request was never sent.
pub fn simulated(backend: &Arc<Backend>) -> Endpoint {
    let backend = backend.clone();
    Endpoint::new(service_fn(move |req: Request| {
        let backend = backend.clone();
        async move {
            let (status, load) = backend
                .handle(key_of(&req))
                .await
                .map_err(|refused| BoxError::from(NeverSent::new(refused)))?;
            let load = load.and_then(|l| http::HeaderValue::from_str(&l).ok());
            Ok::<_, BoxError>(Answer::new(status, load.as_ref()))
        }
    }))
}

/// Deterministic mode: simulated backends on tokio's paused clock, in a
/// fresh single-threaded runtime, through the real balancer. Same inputs,
/// same numbers.
pub fn simulate(scenario: &Scenario, contender: Contender, load: Load) -> RunResult {
    paused_runtime().block_on(async {
        let backends = backends(scenario, load);
        let endpoints = backends.iter().map(simulated).collect();
        let (discovery, joined_at) = discovery(
            scenario,
            endpoints,
            &backends,
            Instant::now() + load.duration / 2,
        );
        // Paused time: only tokio's clock sees the simulated latencies.
        let client = contender.build(discovery, load.seed, LatencyClock::Tokio, &backends);
        RunResult::new(
            contender,
            generate(client, load, scenario.keys).await,
            &backends,
            joined_at,
        )
    })
}

/// Real mode: one hyper server per backend on `127.0.0.1`, and the contender
/// over real connections through a shared hyper-util client.
pub async fn real(
    scenario: &Scenario,
    contender: Contender,
    load: Load,
) -> std::io::Result<RunResult> {
    let backends = backends(scenario, load);
    let mut servers = JoinSet::new();
    let mut addrs = Vec::new();
    for backend in &backends {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        addrs.push(listener.local_addr()?);
        servers.spawn(serve(listener, backend.clone()));
    }
    let http = tower_lb::http::client::<ReplayBody<Empty<Bytes>>>();
    let endpoints = addrs
        .iter()
        .map(|&addr: &SocketAddr| {
            let endpoint = HttpEndpoint::new(http.clone(), addr)
                .map_response(|response| {
                    Answer::new(response.status(), response.headers().get(LOAD_METRICS))
                })
                .map_err(BoxError::from);
            Endpoint::new(endpoint)
        })
        .collect();
    let (discovery, joined_at) = discovery(
        scenario,
        endpoints,
        &backends,
        Instant::now() + load.duration / 2,
    );
    let client = contender.build(discovery, load.seed, LatencyClock::default(), &backends);
    let generated = generate(client, load, scenario.keys).await;
    servers.abort_all();
    Ok(RunResult::new(contender, generated, &backends, joined_at))
}

async fn serve(listener: TcpListener, backend: Arc<Backend>) {
    let mut connections = JoinSet::new();
    while let Ok((stream, _)) = listener.accept().await {
        let backend = backend.clone();
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let backend = backend.clone();
                let key = key_of(&req);
                async move {
                    // Restarting: the connection is dropped unanswered (a
                    // real restart refuses new ones too; this server keeps
                    // its port).
                    let (status, load) = backend.handle(key).await?;
                    let mut response = hyper::Response::new(Empty::<Bytes>::new());
                    *response.status_mut() = status;
                    if let Some(value) = load.and_then(|l| http::HeaderValue::from_str(&l).ok()) {
                        response.headers_mut().insert(LOAD_METRICS, value);
                    }
                    Ok::<_, crate::backend::Refused>(response)
                }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
