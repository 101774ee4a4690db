//! Chaos soak: the one-stop `HttpClient` against five real hyper servers on
//! loopback while a fault injector kills and restarts them, stalls them,
//! makes them answer 503 and resets their connections before or in the middle
//! of a response.
//!
//! A mixed load of GETs and POSTs, each with a unique `x-request-id` that the
//! servers record, runs for `TOWER_LB_CHAOS_SECS` seconds (30 by default; the
//! fault sequence is seeded by `TOWER_LB_CHAOS_SEED`). The last
//! [`BROWNOUT`] of it is a brownout: every server still up answers 503, so
//! that none is healthy and the retry budget runs dry. Then:
//!
//! - no POST id reached the servers twice (summed over all of them);
//! - every GET that ended before the brownout succeeded: the injector never
//!   lets more than [`MAX_UNHEALTHY`] servers misbehave within any span a
//!   call can last, so of the three endpoints a GET may try, one is always
//!   healthy;
//! - attempts per request stay within what the retry budget allows, over the
//!   whole run ([`BudgetBound`]) and within every window ([`WindowCheck`]);
//! - the balancer's in-flight count, and the servers' own, return to 0;
//! - the balancer's endpoints (draining ones aside) are exactly the servers
//!   still up, once the last discovery change is applied.
//!
//! ```text
//! cargo test --test chaos -- --nocapture
//! TOWER_LB_CHAOS_SECS=90 cargo test --test chaos -- --nocapture
//! ```

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tower::ServiceExt;
use tower_lb::client::HttpClient;
use tower_lb::discover::{self, DiscoveryHandle};
use tower_lb::retry::{BudgetExhausted, DeadlineTooClose, RetryStats};
use tower_lb::timeout::{Elapsed, Timer};
use tower_lb::EndpointState;

mod support;

use support::killable::Killable;
use support::recording::{request, reset_after_headers, text_response, ServerBody};

/// Servers under test.
const SERVERS: usize = 5;
/// Concurrent callers.
const LOAD_TASKS: usize = 16;
/// The share of GETs in the load; the rest are POSTs.
const GET_SHARE: f64 = 0.7;
/// Soak length unless `TOWER_LB_CHAOS_SECS` says otherwise.
const DEFAULT_SECS: u64 = 30;
/// The load stops by itself after this many requests per second of soak,
/// whatever the clock says.
const MAX_REQUESTS_PER_SEC: u64 = 5_000;
/// The last seconds of the soak: every server up answers 503, so no server
/// is healthy; GETs may fail then, and the retry budget runs dry.
const BROWNOUT: Duration = Duration::from_secs(3);
/// Calls a second that arrive during the brownout besides those of the load
/// tasks (see [`open_loop`]).
const BROWNOUT_RATE: u64 = 2_000;

/// The client's per-attempt timeout: a stalled server is cut off after this.
const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(300);
/// The client's deadline for a whole call.
const DEADLINE: Duration = Duration::from_secs(2);
/// `RetryPolicy::new()`'s attempts: the first and two retries.
const MAX_ATTEMPTS: usize = 3;

/// At most this many servers are unhealthy (faulted, or healed less than
/// [`COOL_DOWN`] ago) at once: one fewer than the attempts a GET gets, so
/// that among the distinct endpoints a GET tries one is always healthy.
const MAX_UNHEALTHY: usize = MAX_ATTEMPTS - 1;
/// A healed server still counts as unhealthy this long: at least a call's
/// deadline, so that no call, however long, meets more than
/// [`MAX_UNHEALTHY`] misbehaving servers over its whole life. (It also
/// covers the first moments after a restart, when the client may still pick
/// a pooled connection to the killed process.)
const COOL_DOWN: Duration = DEADLINE;
/// How long a stalled server holds each response: well past the attempt
/// timeout.
const STALL: Duration = Duration::from_millis(1_500);
/// The injector acts every 100 to 300 ms.
const TICK_MS: std::ops::RangeInclusive<u64> = 100..=300;
/// How long a fault lasts (a kill: how long the server stays down).
const FAULT_MS: std::ops::RangeInclusive<u64> = 300..=1_500;
/// The chance, at a tick with no room for another unhealthy server, that a
/// new fault hits one that already is.
const REFAULT_SHARE: f64 = 0.15;
/// How long discovery takes to notice that a server died.
const DISCOVERY_LAG_MS: std::ops::RangeInclusive<u64> = 20..=200;

// The retry budget's parameters, from `RetryBudget::new()`'s documentation
// (Finagle's): 20 % of the requests of the last 10 s, plus 10 retries a
// second of the window, in ten 1 s buckets.
const BUDGET_RATIO: f64 = 0.2;
const BUDGET_WINDOW_SECS: u64 = 10;
const BUDGET_MIN_PER_SEC: u64 = 10;

// -------------------------------------------------------------------------
// Servers
// -------------------------------------------------------------------------

/// What a live server does with the requests it receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Behaviour {
    /// 200 "ok".
    Healthy,
    /// 503.
    Unavailable,
    /// Holds the response for [`STALL`], then 200.
    Stall,
    /// Reads the request, then drops the connection (a reset: zero linger).
    ResetBeforeHeaders,
    /// Sends 503 headers and part of the body, then drops the connection.
    /// (A 503, not a 200: a 200 whose body is cut off has already been
    /// handed to the caller, and no client could save that GET.)
    ResetMidResponse,
}

/// The faults the injector deals out, in a random order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    /// Listener closed and every connection aborted; later restarted (on the
    /// same port when it can be bound again), and meanwhile removed from
    /// discovery after a short lag.
    Kill,
    Stall,
    Unavailable,
    ResetBeforeHeaders,
    ResetMidResponse,
}

const FAULTS: [Fault; 5] = [
    Fault::Kill,
    Fault::Stall,
    Fault::Unavailable,
    Fault::ResetBeforeHeaders,
    Fault::ResetMidResponse,
];

impl Fault {
    fn behaviour(self) -> Behaviour {
        match self {
            Fault::Kill => unreachable!("a kill is not a behaviour"),
            Fault::Stall => Behaviour::Stall,
            Fault::Unavailable => Behaviour::Unavailable,
            Fault::ResetBeforeHeaders => Behaviour::ResetBeforeHeaders,
            Fault::ResetMidResponse => Behaviour::ResetMidResponse,
        }
    }
}

/// Request ids received, with how many times each arrived.
#[derive(Default)]
struct Records {
    gets: HashMap<String, u32>,
    posts: HashMap<String, u32>,
}

/// What the handlers share with the server's handle; it outlives restarts.
struct ServerState {
    behaviour: Mutex<Behaviour>,
    records: Mutex<Records>,
    /// Handlers running now.
    in_flight: AtomicUsize,
}

struct ChaosServer {
    /// Where it listens now (or last listened, while killed).
    addr: SocketAddr,
    state: Arc<ServerState>,
    /// `None` while killed.
    serving: Option<Killable>,
    restarts: u32,
    /// Restarts that could not bind the old port again.
    port_changes: u32,
}

impl ChaosServer {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        let state = Arc::new(ServerState {
            behaviour: Mutex::new(Behaviour::Healthy),
            records: Mutex::new(Records::default()),
            in_flight: AtomicUsize::new(0),
        });
        let mut server = Self {
            addr,
            state,
            serving: None,
            restarts: 0,
            port_changes: 0,
        };
        server.serve(listener);
        server
    }

    fn serve(&mut self, listener: TcpListener) {
        let state = self.state.clone();
        self.serving = Some(Killable::serve(listener, move |stream| {
            let state = state.clone();
            async move {
                let service = hyper::service::service_fn(move |req| handle(req, state.clone()));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            }
        }));
    }

    fn set(&self, behaviour: Behaviour) {
        *self.state.behaviour.lock().expect("lock") = behaviour;
    }

    /// Stops accepting (the port refuses connections once this returns) and
    /// aborts every connection, so requests in flight see a reset.
    fn kill(&mut self) {
        if let Some(serving) = self.serving.take() {
            serving.kill();
        }
    }

    /// Listens again, healthy, on the old port if it can be bound (tokio
    /// sets `SO_REUSEADDR`), else on a new one. Returns the address.
    async fn restart(&mut self) -> SocketAddr {
        assert!(self.serving.is_none(), "restart of a live server");
        let listener = match TcpListener::bind(self.addr).await {
            Ok(listener) => listener,
            Err(_) => {
                self.port_changes += 1;
                TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("bind loopback")
            }
        };
        self.addr = listener.local_addr().expect("local addr");
        self.set(Behaviour::Healthy);
        self.restarts += 1;
        self.serve(listener);
        self.addr
    }

    fn is_up(&self) -> bool {
        self.serving.is_some()
    }

    fn in_flight(&self) -> usize {
        self.state.in_flight.load(Ordering::SeqCst)
    }

    /// (GET ids, POST ids) with how often each arrived.
    fn records(&self) -> (HashMap<String, u32>, HashMap<String, u32>) {
        let records = self.state.records.lock().expect("lock");
        (records.gets.clone(), records.posts.clone())
    }
}

impl Drop for ChaosServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Counts a handler in flight until dropped (answered, or aborted by a kill).
struct InFlight(Arc<ServerState>);

impl InFlight {
    fn enter(state: &Arc<ServerState>) -> Self {
        state.in_flight.fetch_add(1, Ordering::SeqCst);
        Self(state.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn handle(
    req: Request<Incoming>,
    state: Arc<ServerState>,
) -> Result<Response<ServerBody>, std::io::Error> {
    let _in_flight = InFlight::enter(&state);
    let post = req.method() == http::Method::POST;
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    // A request counts as received once its whole body is here, as a real
    // server would act on it.
    req.into_body()
        .collect()
        .await
        .map_err(std::io::Error::other)?;
    {
        let mut records = state.records.lock().expect("lock");
        let ids = if post {
            &mut records.posts
        } else {
            &mut records.gets
        };
        *ids.entry(id).or_default() += 1;
    }
    let behaviour = *state.behaviour.lock().expect("lock");
    match behaviour {
        Behaviour::Healthy => Ok(text_response(http::StatusCode::OK, "ok")),
        Behaviour::Unavailable => Ok(text_response(
            http::StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
        )),
        Behaviour::Stall => {
            tokio::time::sleep(STALL).await;
            Ok(text_response(http::StatusCode::OK, "ok, late"))
        }
        Behaviour::ResetBeforeHeaders => Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "reset before the response",
        )),
        Behaviour::ResetMidResponse => Ok(reset_after_headers()),
    }
}

// -------------------------------------------------------------------------
// Fault injector
// -------------------------------------------------------------------------

/// A server as the injector sees it.
#[derive(Debug, Clone, Copy)]
enum Slot {
    /// Healthy, and was for at least [`COOL_DOWN`].
    Clean,
    Faulted {
        fault: Fault,
        until: Instant,
    },
    /// Healed, but counted as unhealthy until then.
    Cooling {
        until: Instant,
    },
}

struct Injector {
    servers: Vec<ChaosServer>,
    discovery: DiscoveryHandle<SocketAddr, SocketAddr>,
    rng: SmallRng,
    slots: Vec<Slot>,
    /// Fault kinds still to deal (see `next_fault`).
    bag: Vec<Fault>,
    /// Faults injected, by kind.
    injected: BTreeMap<Fault, u64>,
    /// Per server, faults injected into it.
    per_server: Vec<u64>,
    /// The most servers unhealthy at once (never above `MAX_UNHEALTHY`).
    most_unhealthy: usize,
    /// Faults that hit a server already unhealthy.
    refaults: u64,
    /// A kill made after the load stopped, so that the final endpoint set
    /// always differs from the first one.
    final_kill: bool,
}

impl Injector {
    fn new(
        servers: Vec<ChaosServer>,
        discovery: DiscoveryHandle<SocketAddr, SocketAddr>,
        seed: u64,
    ) -> Self {
        let n = servers.len();
        Self {
            servers,
            discovery,
            rng: SmallRng::seed_from_u64(seed),
            slots: vec![Slot::Clean; n],
            bag: Vec::new(),
            injected: BTreeMap::new(),
            per_server: vec![0; n],
            most_unhealthy: 0,
            refaults: 0,
            final_kill: false,
        }
    }

    async fn run(mut self, mut stop: watch::Receiver<bool>) -> Self {
        loop {
            let pause = Duration::from_millis(self.rng.random_range(TICK_MS));
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = stop.changed() => break,
            }
            self.tick().await;
        }
        self
    }

    fn unhealthy(&self) -> usize {
        self.slots
            .iter()
            .filter(|slot| !matches!(slot, Slot::Clean))
            .count()
    }

    async fn tick(&mut self) {
        for i in 0..self.slots.len() {
            match self.slots[i] {
                Slot::Faulted { fault, until } if Instant::now() >= until => {
                    self.heal(i, fault).await;
                    self.slots[i] = Slot::Cooling {
                        until: Instant::now() + COOL_DOWN,
                    };
                }
                Slot::Cooling { until } if Instant::now() >= until => {
                    self.slots[i] = Slot::Clean;
                }
                _ => {}
            }
        }
        // A fault goes to a clean server while there is room; or, now and
        // then, to one already unhealthy (not a dead one), which makes no
        // more servers unhealthy: a stalled server starts answering 503, or
        // dies, a server that just came back fails again.
        let clean: Vec<usize> = (0..self.slots.len())
            .filter(|&i| matches!(self.slots[i], Slot::Clean))
            .collect();
        let unhealthy: Vec<usize> = (0..self.slots.len())
            .filter(|&i| match self.slots[i] {
                Slot::Clean => false,
                Slot::Faulted { fault, .. } => fault != Fault::Kill,
                Slot::Cooling { .. } => true,
            })
            .collect();
        let i = if self.unhealthy() < MAX_UNHEALTHY && !clean.is_empty() {
            clean[self.rng.random_range(0..clean.len())]
        } else if !unhealthy.is_empty() && self.rng.random_bool(REFAULT_SHARE) {
            self.refaults += 1;
            unhealthy[self.rng.random_range(0..unhealthy.len())]
        } else {
            return;
        };
        let fault = self.next_fault();
        let lasts = Duration::from_millis(self.rng.random_range(FAULT_MS));
        // Counted unhealthy before the fault starts.
        self.slots[i] = Slot::Faulted {
            fault,
            until: Instant::now() + lasts,
        };
        self.most_unhealthy = self.most_unhealthy.max(self.unhealthy());
        self.inject(i, fault).await;
        // The lag of a kill's discovery counts into the fault's time.
        if let Slot::Faulted { until, .. } = &mut self.slots[i] {
            *until = (*until).max(Instant::now());
        }
    }

    /// The next fault kind: dealt from a shuffled bag of all five, so that
    /// every kind comes up once in every five faults.
    fn next_fault(&mut self) -> Fault {
        if self.bag.is_empty() {
            self.bag = FAULTS.to_vec();
            self.bag.shuffle(&mut self.rng);
        }
        self.bag.pop().expect("a full bag")
    }

    async fn inject(&mut self, i: usize, fault: Fault) {
        *self.injected.entry(fault).or_default() += 1;
        self.per_server[i] += 1;
        match fault {
            Fault::Kill => self.kill(i).await,
            other => self.servers[i].set(other.behaviour()),
        }
    }

    /// Kills server `i`, and removes it from discovery a little later, as
    /// real discovery would.
    async fn kill(&mut self, i: usize) {
        self.servers[i].kill();
        let lag = Duration::from_millis(self.rng.random_range(DISCOVERY_LAG_MS));
        tokio::time::sleep(lag).await;
        self.discovery
            .remove(self.servers[i].addr)
            .expect("the balancer is alive");
    }

    async fn heal(&mut self, i: usize, fault: Fault) {
        match fault {
            Fault::Kill => {
                let addr = self.servers[i].restart().await;
                self.discovery
                    .insert(addr, addr)
                    .expect("the balancer is alive");
            }
            _ => self.servers[i].set(Behaviour::Healthy),
        }
    }

    /// After the load: every server that is up is made healthy; those that
    /// are down stay down. If none is down, one is killed, so that the
    /// final endpoint set always shows a removal.
    async fn finish(&mut self) {
        for server in self.servers.iter().filter(|s| s.is_up()) {
            server.set(Behaviour::Healthy);
        }
        if self.servers.iter().all(|s| s.is_up()) {
            let i = self.rng.random_range(0..self.servers.len());
            self.final_kill = true;
            self.kill(i).await;
        }
    }

    /// The addresses of the servers that are up.
    fn live(&self) -> BTreeSet<SocketAddr> {
        self.servers
            .iter()
            .filter(|s| s.is_up())
            .map(|s| s.addr)
            .collect()
    }
}

// -------------------------------------------------------------------------
// Load
// -------------------------------------------------------------------------

type Body = Full<Bytes>;
type Client = HttpClient<Body>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Method {
    Get,
    Post,
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Method::Get => "GET",
            Method::Post => "POST",
        })
    }
}

/// When a call ended: during the chaos (at most [`MAX_UNHEALTHY`] servers
/// misbehaving), or once the brownout had begun (every server up answers
/// 503: none is healthy).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    Chaos,
    Brownout,
}

/// A failed call, kept for the report.
struct Failure {
    id: String,
    kind: String,
    took: Duration,
}

/// What one load task saw.
struct LoadStats {
    sent: BTreeMap<(Phase, Method), u64>,
    ok: BTreeMap<(Phase, Method), u64>,
    failures: BTreeMap<(Phase, Method, String), u64>,
    /// The first few GETs that failed during the chaos, in detail.
    get_failures: Vec<Failure>,
    /// Every id sent, to check that the servers received no other.
    ids: Vec<String>,
    latency_us: BTreeMap<Method, Histogram<u64>>,
}

impl LoadStats {
    fn new() -> Self {
        let histogram =
            || Histogram::new_with_bounds(1, 60_000_000, 2).expect("valid histogram bounds");
        Self {
            sent: BTreeMap::new(),
            ok: BTreeMap::new(),
            failures: BTreeMap::new(),
            get_failures: Vec::new(),
            ids: Vec::new(),
            latency_us: [(Method::Get, histogram()), (Method::Post, histogram())].into(),
        }
    }

    fn merge(&mut self, other: LoadStats) {
        for (k, v) in other.sent {
            *self.sent.entry(k).or_default() += v;
        }
        for (k, v) in other.ok {
            *self.ok.entry(k).or_default() += v;
        }
        for (k, v) in other.failures {
            *self.failures.entry(k).or_default() += v;
        }
        self.get_failures.extend(other.get_failures);
        self.ids.extend(other.ids);
        for (k, h) in other.latency_us {
            if let Some(mine) = self.latency_us.get_mut(&k) {
                mine.add(&h).expect("same histogram bounds");
            }
        }
    }

    fn sent(&self, phase: Phase, method: Method) -> u64 {
        self.sent.get(&(phase, method)).copied().unwrap_or(0)
    }

    fn ok(&self, phase: Phase, method: Method) -> u64 {
        self.ok.get(&(phase, method)).copied().unwrap_or(0)
    }

    fn total(&self) -> u64 {
        self.sent.values().sum()
    }
}

/// What the load tasks share.
struct LoadControl {
    stop: AtomicBool,
    /// Set just before the servers start the brownout.
    brownout: AtomicBool,
    issued: AtomicU64,
    max: u64,
}

impl LoadStats {
    /// Counts one call that ended in `phase`.
    fn record(
        &mut self,
        phase: Phase,
        method: Method,
        id: String,
        outcome: Result<(), String>,
        took: Duration,
    ) {
        *self.sent.entry((phase, method)).or_default() += 1;
        if let Some(h) = self.latency_us.get_mut(&method) {
            h.saturating_record(took.as_micros().try_into().unwrap_or(u64::MAX));
        }
        match outcome {
            Ok(()) => *self.ok.entry((phase, method)).or_default() += 1,
            Err(kind) => {
                if (phase, method) == (Phase::Chaos, Method::Get) && self.get_failures.len() < 10 {
                    self.get_failures.push(Failure {
                        id: id.clone(),
                        kind: kind.clone(),
                        took,
                    });
                }
                *self.failures.entry((phase, method, kind)).or_default() += 1;
            }
        }
        self.ids.push(id);
    }
}

/// A GET or a POST (`GET_SHARE` of them GETs), with a unique id.
fn next_request(rng: &mut SmallRng, prefix: &str, n: u64) -> (Method, String, http::Request<Body>) {
    let method = if rng.random_bool(GET_SHARE) {
        Method::Get
    } else {
        Method::Post
    };
    let id = match method {
        Method::Get => format!("get-{prefix}-{n}"),
        Method::Post => format!("post-{prefix}-{n}"),
    };
    let request = match method {
        Method::Get => request(http::Method::GET, &id, Bytes::new()),
        Method::Post => request(http::Method::POST, &id, "charge 10 EUR"),
    };
    (method, id, request)
}

/// One of [`LOAD_TASKS`] callers: a call, a pause of 1 to 4 ms, the next
/// call, until told to stop (closed loop).
async fn load_task(task: usize, client: Client, seed: u64, control: Arc<LoadControl>) -> LoadStats {
    let mut rng = SmallRng::seed_from_u64(seed.wrapping_add(1 + task as u64));
    let mut stats = LoadStats::new();
    let mut n = 0u64;
    while !control.stop.load(Ordering::Relaxed)
        && control.issued.fetch_add(1, Ordering::Relaxed) < control.max
    {
        let (method, id, request) = next_request(&mut rng, &task.to_string(), n);
        n += 1;
        let started = Instant::now();
        let outcome = call(&client, request).await;
        let took = started.elapsed();
        // A call that ends after the flag was set may have met the brownout;
        // one that ended before cannot have.
        let phase = if control.brownout.load(Ordering::SeqCst) {
            Phase::Brownout
        } else {
            Phase::Chaos
        };
        stats.record(phase, method, id, outcome, took);
        tokio::time::sleep(Duration::from_millis(rng.random_range(1..=4))).await;
    }
    stats
}

/// During the brownout, more callers keep arriving at
/// [`BROWNOUT_RATE`] a second whether or not the earlier ones got an
/// answer (open loop), as they would in production: the load a retry
/// budget is there for. (The closed-loop callers alone slow down as soon as
/// every call fails and backs off, and never reach the budget's limit.)
async fn open_loop(client: Client, seed: u64, until: Instant) -> LoadStats {
    const TICK: Duration = Duration::from_millis(10);
    let per_tick = BROWNOUT_RATE * TICK.as_millis() as u64 / 1_000;
    let mut rng = SmallRng::seed_from_u64(seed.wrapping_sub(1));
    let mut calls = JoinSet::new();
    let mut n = 0u64;
    let mut next = Instant::now();
    while Instant::now() < until {
        for _ in 0..per_tick {
            let (method, id, request) = next_request(&mut rng, "open", n);
            n += 1;
            let client = client.clone();
            calls.spawn(async move {
                let started = Instant::now();
                let outcome = call(&client, request).await;
                (method, id, outcome, started.elapsed())
            });
        }
        next += TICK;
        tokio::time::sleep_until(next).await;
    }
    let mut stats = LoadStats::new();
    while let Some(done) = calls.join_next().await {
        let (method, id, outcome, took) = done.unwrap_or_else(|e| panic!("open-loop call: {e}"));
        stats.record(Phase::Brownout, method, id, outcome, took);
    }
    stats
}

/// Sends `request` and reads the whole response; a success is a 2xx with
/// its whole body.
async fn call(client: &Client, request: http::Request<Body>) -> Result<(), String> {
    let response = client
        .clone()
        .oneshot(request)
        .await
        .map_err(|e| error_kind(&*e))?;
    let status = response.status();
    let body = response.into_body().collect().await;
    match (status.is_success(), body) {
        (true, Ok(_)) => Ok(()),
        (true, Err(e)) => Err(format!("{status}, body cut off: {}", error_kind(&*e))),
        (false, Ok(_)) => Err(format!("{status}")),
        (false, Err(_)) => Err(format!("{status}, body cut off")),
    }
}

/// A short name for what went wrong, from the error's `source()` chain.
fn error_kind(err: &(dyn std::error::Error + 'static)) -> String {
    let chain = || std::iter::successors(Some(err), |e| e.source());
    let mut prefix = String::new();
    if chain().any(|e| e.is::<BudgetExhausted>()) {
        prefix.push_str("budget refused a retry: ");
    }
    if chain().any(|e| e.is::<DeadlineTooClose>()) {
        prefix.push_str("deadline too close for a retry: ");
    }
    let base = if let Some(elapsed) = chain().find_map(|e| e.downcast_ref::<Elapsed>()) {
        match elapsed.timer() {
            Timer::Attempt => "attempt timeout".to_owned(),
            Timer::Deadline => "deadline".to_owned(),
        }
    } else if let Some(e) = chain().find_map(|e| e.downcast_ref::<tower_lb::Error>()) {
        match e {
            tower_lb::Error::Endpoint { .. } => endpoint_error_kind(err),
            other => format!("balancer: {other}"),
        }
    } else {
        endpoint_error_kind(err)
    };
    format!("{prefix}{base}")
}

/// What an endpoint's (hyper's) error says.
fn endpoint_error_kind(err: &(dyn std::error::Error + 'static)) -> String {
    let chain = || std::iter::successors(Some(err), |e| e.source());
    if let Some(e) = chain().find_map(|e| e.downcast_ref::<tower_lb::http::HttpError>()) {
        if e.is_connect() {
            return "connect failed".to_owned();
        }
    }
    if let Some(e) = chain().find_map(|e| e.downcast_ref::<std::io::Error>()) {
        return format!("io: {:?}", e.kind());
    }
    if let Some(e) = chain().find_map(|e| e.downcast_ref::<hyper::Error>()) {
        if e.is_incomplete_message() {
            return "connection closed before the response".to_owned();
        }
        return format!("hyper: {e}");
    }
    let innermost = chain().last().map(|e| e.to_string()).unwrap_or_default();
    format!("other: {innermost}")
}

// -------------------------------------------------------------------------
// The budget's bounds
// -------------------------------------------------------------------------

/// The retry budget allows a retry or hedge while the spends of the current
/// window (ten 1 s buckets: the current one and the nine before) stay within
/// `floor(ratio x deposits) + floor`, where `floor = min_per_second x
/// window` (100, all of it available at once). The budget's documentation
/// adds that a caller whose clock reading is a bucket stale may overshoot
/// by one, so each window gets one more spend per concurrent caller.
const fn spends_allowed_per_window_beyond_ratio() -> u64 {
    BUDGET_MIN_PER_SEC * BUDGET_WINDOW_SECS + LOAD_TASKS as u64
}

/// The most attempts the retry budget can have allowed over a whole run.
///
/// Take the last bucket with a spend, b1: its window [b1 - 9, b1] holds at
/// most `ratio x D(window) + 100` spends. Then the last bucket with a spend
/// before b1 - 9, b2, and so on: the windows are disjoint and cover every
/// spend, so over `n` buckets
///
/// ```text
/// retries + hedges <= ratio x requests + (100 + callers) x ceil(n / 10)
/// ```
///
/// (100 x ceil(n / 10) <= 10/s x T + 100: the per-second floor over the
/// run, plus the first window's reserve.)
struct BudgetBound {
    requests: u64,
    buckets: u64,
    windows: u64,
    allowed_spends: f64,
}

impl BudgetBound {
    /// For `requests` over `elapsed` since the budget was made.
    fn new(requests: u64, elapsed: Duration) -> Self {
        let buckets = elapsed.as_secs() + 1;
        let windows = buckets.div_ceil(BUDGET_WINDOW_SECS);
        let allowed_spends = BUDGET_RATIO * requests as f64
            + (spends_allowed_per_window_beyond_ratio() * windows) as f64;
        Self {
            requests,
            buckets,
            windows,
            allowed_spends,
        }
    }

    /// The most attempts per request.
    fn amplification(&self) -> f64 {
        if self.requests == 0 {
            return 1.0;
        }
        1.0 + self.allowed_spends / self.requests as f64
    }
}

impl fmt::Display for BudgetBound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "1 + {BUDGET_RATIO} + ({} + {LOAD_TASKS} callers) x {} windows / {} requests = {:.4} \
             ({} one-second buckets)",
            BUDGET_MIN_PER_SEC * BUDGET_WINDOW_SECS,
            self.windows,
            self.requests,
            self.amplification(),
            self.buckets,
        )
    }
}

/// The budget's own rule, checked on samples of its counters (each sample
/// timed just before its counters are read). For samples a and b at most
/// [`SPAN`](WindowCheck::SPAN) apart, the spends between them span at most
/// nine bucket boundaries, so they all fall in the window of the last bucket
/// with a spend; that window began after `t_a - 10 s`, so its deposits were
/// all made after sample c, the last one taken [`MARGIN`](WindowCheck::MARGIN)
/// or more before `t_a - 10 s` (the margin covers the time it takes to read
/// c's counters). Hence
///
/// ```text
/// spends(b) - spends(a) <= ratio x (requests(b) - requests(c)) + 100 + callers
/// ```
///
/// where the callers' slack is the budget's documented overshoot for stale
/// clock readings, and also covers the counters being read one by one.
#[derive(Default)]
struct WindowCheck {
    checked: u64,
    /// The window that came closest to its allowance: (spent, allowed,
    /// from, to) in seconds since the budget was made.
    tightest: Option<(u64, f64, f64, f64)>,
    /// Windows over their allowance.
    over: Vec<(u64, f64, f64, f64)>,
}

impl WindowCheck {
    const SPAN: Duration = Duration::from_secs(BUDGET_WINDOW_SECS - 2);
    const MARGIN: Duration = Duration::from_millis(100);

    fn run(samples: &[(Duration, RetryStats)]) -> Self {
        let mut check = Self::default();
        let spends = |s: &RetryStats| s.retries + s.hedges;
        for (a, (t_a, stats_a)) in samples.iter().enumerate() {
            let before = t_a.checked_sub(Duration::from_secs(BUDGET_WINDOW_SECS) + Self::MARGIN);
            let requests_c = match before {
                // Nothing was deposited before the budget was made.
                None => 0,
                Some(limit) => samples
                    .iter()
                    .take_while(|(t, _)| *t <= limit)
                    .last()
                    .map_or(0, |(_, s)| s.requests),
            };
            for (t_b, stats_b) in samples[a + 1..]
                .iter()
                .take_while(|(t, _)| *t - *t_a <= Self::SPAN)
            {
                let spent = spends(stats_b) - spends(stats_a);
                let allowed = BUDGET_RATIO * (stats_b.requests - requests_c) as f64
                    + spends_allowed_per_window_beyond_ratio() as f64;
                let window = (spent, allowed, t_a.as_secs_f64(), t_b.as_secs_f64());
                check.checked += 1;
                if check
                    .tightest
                    .is_none_or(|(s, al, _, _)| spent as f64 / allowed > s as f64 / al)
                {
                    check.tightest = Some(window);
                }
                if spent as f64 > allowed {
                    check.over.push(window);
                }
            }
        }
        check
    }
}

// -------------------------------------------------------------------------
// The soak
// -------------------------------------------------------------------------

fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    Some(
        value
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("{name}={value:?}: {e}")),
    )
}

/// Polls `cond` every 10 ms for up to `limit`; true if it came to hold, and
/// how long it took.
async fn wait_for(limit: Duration, mut cond: impl FnMut() -> bool) -> (bool, Duration) {
    let start = Instant::now();
    loop {
        if cond() {
            return (true, start.elapsed());
        }
        if start.elapsed() >= limit {
            return (false, start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Sleeps until `until`, or until the load has issued all it may.
async fn run_load_until(until: Instant, control: &LoadControl) {
    while Instant::now() < until && control.issued.load(Ordering::Relaxed) < control.max {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_soak() {
    let secs = env_u64("TOWER_LB_CHAOS_SECS").unwrap_or(DEFAULT_SECS);
    let seed = env_u64("TOWER_LB_CHAOS_SEED").unwrap_or(0x5eed_c4a0);
    let soak = Duration::from_secs(secs);
    assert!(
        soak >= 2 * BROWNOUT,
        "TOWER_LB_CHAOS_SECS={secs} is too short"
    );

    let mut servers = Vec::with_capacity(SERVERS);
    for _ in 0..SERVERS {
        servers.push(ChaosServer::start().await);
    }
    let (discovery, stream) = discover::channel();
    for server in &servers {
        discovery
            .insert(server.addr, server.addr)
            .expect("the balancer is alive");
    }

    // The retry budget (made in `builder()`) counts time from here.
    let budget_epoch = Instant::now();
    let client: Client = HttpClient::builder()
        .attempt_timeout(ATTEMPT_TIMEOUT)
        .deadline(DEADLINE)
        .build_discover::<Body, _>(stream);

    // The budget's counters, every 100 ms.
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = tokio::spawn({
        let client = client.clone();
        let sampling = sampling.clone();
        async move {
            let mut samples = Vec::new();
            while sampling.load(Ordering::Relaxed) {
                // The time first: every counter is read at or after it.
                let at = budget_epoch.elapsed();
                samples.push((at, client.retry_stats().expect("retries are on")));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            samples
        }
    });

    let started = Instant::now();
    let control = Arc::new(LoadControl {
        stop: AtomicBool::new(false),
        brownout: AtomicBool::new(false),
        issued: AtomicU64::new(0),
        max: secs * MAX_REQUESTS_PER_SEC,
    });
    let (stop_injector, stop_rx) = watch::channel(false);
    let injector = tokio::spawn(Injector::new(servers, discovery, seed).run(stop_rx));
    let mut load = JoinSet::new();
    for task in 0..LOAD_TASKS {
        load.spawn(load_task(task, client.clone(), seed, control.clone()));
    }

    // The chaos.
    run_load_until(started + soak - BROWNOUT, &control).await;
    stop_injector.send(true).expect("the injector is running");
    let mut injector = injector
        .await
        .unwrap_or_else(|e| panic!("injector task: {e}"));
    // The brownout: every server up answers 503 (those down stay down).
    control.brownout.store(true, Ordering::SeqCst);
    let brownout_started = Instant::now();
    for server in injector.servers.iter().filter(|s| s.is_up()) {
        server.set(Behaviour::Unavailable);
    }
    let open = tokio::spawn(open_loop(client.clone(), seed, brownout_started + BROWNOUT));
    run_load_until(brownout_started + BROWNOUT, &control).await;
    // Stop the load, then make the last discovery change with no traffic.
    control.stop.store(true, Ordering::Relaxed);
    let mut stats = LoadStats::new();
    while let Some(task) = load.join_next().await {
        stats.merge(task.unwrap_or_else(|e| panic!("load task: {e}")));
    }
    stats.merge(open.await.unwrap_or_else(|e| panic!("open loop: {e}")));
    let load_time = started.elapsed();
    injector.finish().await;
    sampling.store(false, Ordering::Relaxed);
    let mut samples = sampler.await.unwrap_or_else(|e| panic!("sampler: {e}"));
    let at = budget_epoch.elapsed();
    let retry_stats: RetryStats = client.retry_stats().expect("retries are on");
    samples.push((at, retry_stats));
    let bound = BudgetBound::new(retry_stats.requests, budget_epoch.elapsed());
    let windows = WindowCheck::run(&samples);

    // Quiescence: nothing in flight in the balancer, nor in the servers.
    let (client_idle, client_idle_after) = wait_for(Duration::from_secs(5), || {
        client.balancer().in_flight() == 0
    })
    .await;
    let (servers_idle, servers_idle_after) = wait_for(STALL + Duration::from_secs(5), || {
        injector.servers.iter().all(|s| s.in_flight() == 0)
    })
    .await;
    // The final discovery change applied: the endpoints in the set are the
    // live servers, and nothing is left draining.
    let live = injector.live();
    let in_set = |client: &Client| -> BTreeSet<SocketAddr> {
        client
            .balancer()
            .endpoints()
            .into_iter()
            .filter(|e| e.state != EndpointState::Draining)
            .map(|e| e.key)
            .collect()
    };
    let (set_matches, set_after) =
        wait_for(Duration::from_secs(5), || in_set(&client) == live).await;
    let (drained, drained_after) = wait_for(Duration::from_secs(5), || {
        client
            .balancer()
            .endpoints()
            .iter()
            .all(|e| e.state != EndpointState::Draining)
    })
    .await;

    // What the servers saw.
    let mut get_received: HashMap<String, u32> = HashMap::new();
    let mut post_received: HashMap<String, u32> = HashMap::new();
    let mut per_server = Vec::new();
    for server in &injector.servers {
        let (gets, posts) = server.records();
        per_server.push((
            gets.values().map(|&n| u64::from(n)).sum::<u64>(),
            posts.values().map(|&n| u64::from(n)).sum::<u64>(),
        ));
        for (id, n) in gets {
            *get_received.entry(id).or_default() += n;
        }
        for (id, n) in posts {
            *post_received.entry(id).or_default() += n;
        }
    }
    let mut duplicate_posts: Vec<(&String, &u32)> =
        post_received.iter().filter(|(_, &n)| n > 1).collect();
    duplicate_posts.sort();
    let gets_repeated = get_received.values().filter(|&&n| n > 1).count();
    let hits: u64 = per_server.iter().map(|(g, p)| g + p).sum();
    let sent_ids: std::collections::HashSet<&str> = stats.ids.iter().map(String::as_str).collect();
    let unknown_ids = get_received
        .keys()
        .chain(post_received.keys())
        .filter(|id| !sent_ids.contains(id.as_str()))
        .count();
    let requests = stats.total();

    // The figures.
    println!(
        "chaos soak, seed {seed:#x}: {secs} s asked ({:?} of chaos, then {BROWNOUT:?} of brownout), \
         load ran {load_time:.1?}",
        soak - BROWNOUT
    );
    println!(
        "requests: {requests} ({} GET, {} POST), {:.0}/s",
        stats.sent(Phase::Chaos, Method::Get) + stats.sent(Phase::Brownout, Method::Get),
        stats.sent(Phase::Chaos, Method::Post) + stats.sent(Phase::Brownout, Method::Post),
        requests as f64 / load_time.as_secs_f64()
    );
    for phase in [Phase::Chaos, Phase::Brownout] {
        println!(
            "{phase:?}: GET {} of {} succeeded, POST {} of {} succeeded",
            stats.ok(phase, Method::Get),
            stats.sent(phase, Method::Get),
            stats.ok(phase, Method::Post),
            stats.sent(phase, Method::Post),
        );
        for ((p, method, kind), n) in &stats.failures {
            if *p == phase {
                println!("  failed: {n:>6} {method:<4} {kind}");
            }
        }
    }
    for failure in &stats.get_failures {
        println!(
            "  GET {} failed during the chaos after {:?} ({}), received {} times",
            failure.id,
            failure.took,
            failure.kind,
            get_received.get(&failure.id).copied().unwrap_or(0)
        );
    }
    for (method, h) in &stats.latency_us {
        println!(
            "latency {method:<4} p50 {:.1?} p99 {:.1?} p99.9 {:.1?} max {:.1?}",
            Duration::from_micros(h.value_at_quantile(0.5)),
            Duration::from_micros(h.value_at_quantile(0.99)),
            Duration::from_micros(h.value_at_quantile(0.999)),
            Duration::from_micros(h.max()),
        );
    }
    let faults: Vec<String> = injector
        .injected
        .iter()
        .map(|(fault, n)| format!("{fault:?} {n}"))
        .collect();
    println!(
        "faults injected: {} ({}; {} on a server already unhealthy){}; at most {} servers unhealthy at once",
        injector.injected.values().sum::<u64>(),
        faults.join(", "),
        injector.refaults,
        if injector.final_kill {
            ", plus a kill after the load"
        } else {
            ""
        },
        injector.most_unhealthy
    );
    println!(
        "retry budget: {} requests, {} retries, {} hedges, {} refused, amplification {:.4}",
        retry_stats.requests,
        retry_stats.retries,
        retry_stats.hedges,
        retry_stats.refused,
        retry_stats.amplification()
    );
    println!("budget bound, whole run: {bound}");
    if let Some((spent, allowed, from, to)) = windows.tightest {
        println!(
            "budget bound, per window: {} windows checked, {} over; tightest {spent} spent of \
             {allowed:.0} allowed ({:.1} %), {from:.1} s to {to:.1} s",
            windows.checked,
            windows.over.len(),
            100.0 * spent as f64 / allowed
        );
    }
    println!(
        "servers received {hits} requests ({} attempts sent); GET ids received more than once: \
         {gets_repeated}; duplicate POSTs: {}",
        retry_stats.attempts(),
        duplicate_posts.len()
    );
    println!(
        "in flight 0: balancer {client_idle} after {client_idle_after:?}, servers {servers_idle} \
         after {servers_idle_after:?}; endpoint set = live servers: {set_matches} after \
         {set_after:?}; drained: {drained} after {drained_after:?}"
    );
    println!("server              up    restarts port-changes faults    GETs   POSTs");
    for (i, server) in injector.servers.iter().enumerate() {
        println!(
            "{:<19} {:<5} {:>8} {:>12} {:>6} {:>7} {:>7}",
            server.addr.to_string(),
            server.is_up(),
            server.restarts,
            server.port_changes,
            injector.per_server[i],
            per_server[i].0,
            per_server[i].1
        );
    }
    println!("endpoint            state     requests failures ejections in-flight");
    for e in client.balancer().endpoints() {
        println!(
            "{:<19} {:<9} {:>8} {:>8} {:>9} {:>9}",
            e.key.to_string(),
            format!("{:?}", e.state),
            e.requests,
            e.failures,
            e.ejections,
            e.in_flight
        );
    }
    println!("wall time: {:.1?}", started.elapsed());

    // The properties.
    assert!(
        duplicate_posts.is_empty(),
        "POSTs received more than once: {:?}",
        &duplicate_posts[..duplicate_posts.len().min(20)]
    );
    assert_eq!(unknown_ids, 0, "the servers received ids nobody sent");
    let (gets, gets_ok) = (
        stats.sent(Phase::Chaos, Method::Get),
        stats.ok(Phase::Chaos, Method::Get),
    );
    assert!(
        gets_ok == gets,
        "{} of {gets} GETs failed during the chaos, though at most {MAX_UNHEALTHY} of {SERVERS} \
         servers misbehaved at once",
        gets - gets_ok
    );
    // A check of the harness, not of the library: the message above relies
    // on the injector never having more servers misbehave at once.
    assert!(injector.most_unhealthy <= MAX_UNHEALTHY);
    assert_eq!(
        retry_stats.requests, requests,
        "the budget counts each call once"
    );
    assert!(
        hits <= retry_stats.attempts(),
        "the servers received {hits} requests, more than the {} attempts sent",
        retry_stats.attempts()
    );
    assert!(
        retry_stats.amplification() <= bound.amplification(),
        "amplification {:.4} above the budget's bound {bound}",
        retry_stats.amplification()
    );
    assert!(
        windows.over.is_empty(),
        "windows over the budget (spent, allowed, from s, to s): {:?}",
        &windows.over[..windows.over.len().min(10)]
    );
    assert!(
        client_idle,
        "the balancer still has {} in flight",
        client.balancer().in_flight()
    );
    assert!(servers_idle, "the servers still have requests in flight");
    assert!(
        set_matches,
        "the balancer's endpoints {:?} are not the live servers {live:?}",
        in_set(&client)
    );
    assert!(drained, "endpoints still draining with nothing in flight");
    // Meaningful: faults of every kind happened, under real load, and the
    // brownout ran the budget dry.
    for fault in FAULTS {
        assert!(
            injector.injected.get(&fault).copied().unwrap_or(0) > 0,
            "no {fault:?} fault was injected"
        );
    }
    assert!(requests > 1_000, "too little load: {requests} requests");
    assert!(
        retry_stats.refused > 0,
        "the brownout never exhausted the retry budget"
    );
}
