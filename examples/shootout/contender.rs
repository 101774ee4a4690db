//! The contenders: every tower-lb strategy, and tower's own p2c as the
//! baseline, each built over the same endpoints.

use std::pin::Pin;
use std::time::Duration;

use futures_core::Stream;
use tower::discover::Change;

use http::StatusCode;
use rand::rngs::SmallRng;
use rand::{RngCore, SeedableRng};
use std::sync::Arc;
use tower::balance::p2c::Balance;
use tower::buffer::Buffer;
use tower::load::{CompleteOnResponse, PeakEwmaDiscover};
use tower::util::{BoxCloneService, BoxCloneSyncService};

use tower::{BoxError, ServiceBuilder, ServiceExt};

use crate::backend::Backend;
use crate::scenario::CLIENT_ZONE;
use tower_lb::classify::{Classify, Outcome, OutcomeReport};
use tower_lb::health::{ActiveCheck, CheckTask, HealthReporter, OutlierDetection};
use tower_lb::hedge::HedgeLayer;
use tower_lb::load::{LatencyClock, LoadReport, LoadReportError};
use tower_lb::retry::{ReplayBody, ResponseVerdict, RetryBudget, RetryLayer, RetryOn, RetryPolicy};
use tower_lb::strategy::{P2c, RingHash, RoundRobin, Strategy, WeightedRoundRobin};
use tower_lb::timeout::{DeadlineLayer, TimeoutLayer};
use tower_lb::topology::{EndpointMetadata, ZoneAware};
use tower_lb::{Balancer, EndpointStats};

/// What the load generator sends: a GET whose (empty) body the retry and
/// hedge layers can replay.
pub type Request = http::Request<ReplayBody<http_body_util::Empty<hyper::body::Bytes>>>;
/// What an endpoint answers: the status, and the backend's load report when
/// it sent one.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: StatusCode,
    pub load: Option<Result<LoadReport, LoadReportError>>,
}

impl Answer {
    /// Reads the `endpoint-load-metrics` value a backend sent, if any.
    pub fn new(status: StatusCode, load: Option<&http::HeaderValue>) -> Self {
        Self {
            status,
            load: load.map(LoadReport::from_header),
        }
    }
}

/// One endpoint, real (hyper client) or simulated, as every contender sees it.
pub type Endpoint = BoxCloneSyncService<Request, Answer, BoxError>;
/// The endpoints as discovery gives them (keys are backend numbers): all
/// at once, or some later (see `Scenario::late`).
pub type Discovery = Pin<Box<dyn Stream<Item = Result<Change<usize, Endpoint>, BoxError>> + Send>>;
/// A contender, ready to take requests.
pub type Client = BoxCloneService<Request, StatusCode, BoxError>;
/// Reads a tower-lb contender's per-endpoint stats (keys are backend
/// numbers).
pub type Probe = Arc<dyn Fn() -> Vec<EndpointStats<usize>> + Send + Sync>;

/// A contender built over a scenario's endpoints.
pub struct Built {
    pub client: Client,
    /// `None` for tower's p2c, which shows no stats.
    pub probe: Option<Probe>,
}

/// Told apart from the balancer's seed, so that the backoff jitter is not
/// the balancer's own stream of draws.
const RETRY_SEED: u64 = 0x0b0f_f5ee_d000_0001;

/// The Peak-EWMA settings every latency-aware contender gets (Linkerd's).
const DEFAULT_RTT: Duration = Duration::from_millis(30);
const DECAY: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Contender {
    RoundRobin,
    P2cLeastRequests,
    P2cPeakEwma,
    TowerP2cPeakEwma,
    /// The tower-lb strategies again, with 5xx classified as failures and
    /// outlier detection at its defaults.
    RoundRobinOutliers,
    P2cLeastRequestsOutliers,
    P2cPeakEwmaOutliers,
    /// Peak EWMA with idempotency-gated retries (3 attempts, the default
    /// budget), a 1 s per-attempt timeout and a 5 s deadline; no outlier
    /// detection, to show what retries alone do.
    P2cPeakEwmaRetry,
    /// The same with outlier detection.
    P2cPeakEwmaOutliersRetry,
    /// And with hedging after the adaptive p95 (floor 10 ms) on top.
    P2cPeakEwmaOutliersHedge,
    /// Outlier detection and retries, and an active health check of each
    /// backend.
    P2cPeakEwmaOutliersRetryCheck,
    /// Outlier detection and retries, routing by zone (Envoy's rule) from
    /// the client's zone.
    P2cPeakEwmaOutliersRetryZone,
    /// Outlier detection and retries, with the retry budget's adaptive
    /// throttling (k = 2).
    P2cPeakEwmaOutliersRetryThrottle,
    /// Round robin with retries and hedging: what hedging does for a
    /// strategy that does not see latency.
    RoundRobinHedge,
    /// Weighted round robin from the backends' load reports (gRPC A58, with
    /// a 1 s blackout instead of 10 s, so that runs of a few seconds show
    /// it).
    WeightedRoundRobin,
    /// Consistent hashing on each request's key: plain, with bounded loads
    /// at the default 1.25, and at 1.5 (HAProxy's and Envoy's documented
    /// example); P2C least-requests for requests without a key.
    RingHash,
    RingHashBounded,
    RingHashLooseBound,
}

impl Contender {
    pub const ALL: [Contender; 18] = [
        Contender::RoundRobin,
        Contender::P2cLeastRequests,
        Contender::P2cPeakEwma,
        Contender::TowerP2cPeakEwma,
        Contender::RoundRobinOutliers,
        Contender::P2cLeastRequestsOutliers,
        Contender::P2cPeakEwmaOutliers,
        Contender::P2cPeakEwmaRetry,
        Contender::P2cPeakEwmaOutliersRetry,
        Contender::P2cPeakEwmaOutliersHedge,
        Contender::P2cPeakEwmaOutliersRetryCheck,
        Contender::P2cPeakEwmaOutliersRetryZone,
        Contender::P2cPeakEwmaOutliersRetryThrottle,
        Contender::RoundRobinHedge,
        Contender::WeightedRoundRobin,
        Contender::RingHash,
        Contender::RingHashBounded,
        Contender::RingHashLooseBound,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Contender::RoundRobin => "round-robin",
            Contender::P2cLeastRequests => "p2c-least-requests",
            Contender::P2cPeakEwma => "p2c-peak-ewma",
            Contender::TowerP2cPeakEwma => "tower-p2c-peak-ewma",
            Contender::RoundRobinOutliers => "round-robin+od",
            Contender::P2cLeastRequestsOutliers => "p2c-least-req+od",
            Contender::P2cPeakEwmaOutliers => "p2c-peak-ewma+od",
            Contender::P2cPeakEwmaRetry => "p2c-peak-ewma+retry",
            Contender::P2cPeakEwmaOutliersRetry => "ewma+od+retry",
            Contender::P2cPeakEwmaOutliersHedge => "ewma+od+retry+hedge",
            Contender::P2cPeakEwmaOutliersRetryCheck => "ewma+od+retry+check",
            Contender::P2cPeakEwmaOutliersRetryZone => "ewma+od+retry+zone",
            Contender::P2cPeakEwmaOutliersRetryThrottle => "ewma+od+retry+throttle",
            Contender::RoundRobinHedge => "round-robin+hedge",
            Contender::WeightedRoundRobin => "weighted-round-robin",
            Contender::RingHash => "ring-hash",
            Contender::RingHashBounded => "ring-hash-bounded",
            Contender::RingHashLooseBound => "ring-hash-bounded-1.5",
        }
    }

    /// What the contender is, for the report's legend.
    pub fn about(self) -> &'static str {
        match self {
            Contender::RoundRobin => "tower-lb round robin: each endpoint in turn, blind to load",
            Contender::P2cLeastRequests => {
                "tower-lb power of two choices: of two endpoints drawn at random, the one with fewer requests in flight"
            }
            Contender::P2cPeakEwma => {
                "tower-lb power of two choices by Peak-EWMA latency x (requests in flight + 1), Linkerd's settings"
            }
            Contender::TowerP2cPeakEwma => {
                "tower's own p2c::Balance with PeakEwma, the same settings: what a tower user has today"
            }
            Contender::RoundRobinOutliers => {
                "round robin with 5xx classified as failures and outlier detection (+od) at its defaults"
            }
            Contender::P2cLeastRequestsOutliers => "P2C least-requests with outlier detection (+od)",
            Contender::P2cPeakEwmaOutliers => "P2C Peak-EWMA with outlier detection (+od)",
            Contender::P2cPeakEwmaRetry => {
                "P2C Peak-EWMA with idempotency-gated retries (3 attempts, the default budget, 1 s per attempt, 5 s deadline), no outlier detection"
            }
            Contender::P2cPeakEwmaOutliersRetry => {
                "P2C Peak-EWMA (ewma) with outlier detection (od) and retries"
            }
            Contender::P2cPeakEwmaOutliersHedge => {
                "the same, and a hedged copy after the adaptive p95 of recent calls (at least 10 ms)"
            }
            Contender::P2cPeakEwmaOutliersRetryCheck => {
                "P2C Peak-EWMA with outlier detection, retries and an active health check of each backend (every 500 ms, 200 ms timeout, out after 2 failures, back after 1 pass)"
            }
            Contender::P2cPeakEwmaOutliersRetryZone => {
                "P2C Peak-EWMA with outlier detection and retries, routing by zone from the client's zone (Envoy's zone-aware rule, the fleet taken to be spread like the backends)"
            }
            Contender::P2cPeakEwmaOutliersRetryThrottle => {
                "P2C Peak-EWMA with outlier detection and retries, and adaptive throttling on the retry budget's counters (SRE book, k = 2)"
            }
            Contender::RoundRobinHedge => {
                "round robin with retries and hedging: what hedging does for a strategy blind to latency"
            }
            Contender::WeightedRoundRobin => {
                "weighted round robin from the backends' load reports (gRPC A58, 1 s blackout)"
            }
            Contender::RingHash => {
                "consistent hashing of each request's key on a ring (160 points per backend); P2C least-requests for requests without a key"
            }
            Contender::RingHashBounded => {
                "the same with bounded loads: a key's backend takes it only within 1.25 x its share of the requests in flight"
            }
            Contender::RingHashLooseBound => {
                "the same bounded at 1.5 x (the example HAProxy's and Envoy's documentation give): fewer keys spill, a busy backend takes more"
            }
        }
    }

    pub fn by_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.name() == name)
    }

    /// Builds the contender over `endpoints` (index = backend number), timing
    /// requests with `clock` (tokio's on simulated time); a contender with
    /// active checks probes `backends`. Must run inside the tokio runtime
    /// it will serve on.
    pub fn build(
        self,
        endpoints: Discovery,
        seed: u64,
        clock: LatencyClock,
        backends: &[Arc<Backend>],
    ) -> Built {
        match self {
            Contender::RoundRobin => tower_lb(RoundRobin::new(), endpoints, seed, clock, None),
            Contender::P2cLeastRequests => {
                tower_lb(P2c::least_requests(), endpoints, seed, clock, None)
            }
            Contender::P2cPeakEwma => tower_lb(P2c::peak_ewma(), endpoints, seed, clock, None),
            Contender::P2cPeakEwmaRetry => resilient(
                P2c::peak_ewma(),
                endpoints,
                seed,
                clock,
                Resilience::default(),
            ),
            Contender::P2cPeakEwmaOutliersRetry => {
                ewma_outliers(endpoints, seed, clock, Resilience::default())
            }
            Contender::P2cPeakEwmaOutliersRetryCheck => ewma_outliers(
                endpoints,
                seed,
                clock,
                Resilience {
                    checks: Some(backends.to_vec()),
                    ..Resilience::default()
                },
            ),
            Contender::P2cPeakEwmaOutliersRetryZone => ewma_outliers(
                endpoints,
                seed,
                clock,
                Resilience {
                    zones: Some(backends.iter().map(|b| b.zone()).collect()),
                    ..Resilience::default()
                },
            ),
            Contender::P2cPeakEwmaOutliersRetryThrottle => ewma_outliers(
                endpoints,
                seed,
                clock,
                Resilience {
                    throttle: Some(THROTTLE_K),
                    ..Resilience::default()
                },
            ),
            Contender::P2cPeakEwmaOutliersHedge => ewma_outliers(
                endpoints,
                seed,
                clock,
                Resilience {
                    hedge: true,
                    ..Resilience::default()
                },
            ),
            Contender::RoundRobinHedge => resilient(
                RoundRobin::new(),
                endpoints,
                seed,
                clock,
                Resilience {
                    hedge: true,
                    ..Resilience::default()
                },
            ),
            Contender::WeightedRoundRobin => tower_lb(
                WeightedRoundRobin::new().blackout_period(Duration::from_secs(1)),
                endpoints,
                seed,
                clock,
                None,
            ),
            Contender::RingHash => hashing(RingHash::new().unbounded(), endpoints, seed, clock),
            Contender::RingHashBounded => hashing(RingHash::new(), endpoints, seed, clock),
            Contender::RingHashLooseBound => hashing(
                RingHash::new()
                    .balance_factor(LOOSE_BOUND)
                    .expect("a valid balance factor"),
                endpoints,
                seed,
                clock,
            ),
            Contender::RoundRobinOutliers => tower_lb(
                RoundRobin::new(),
                endpoints,
                seed,
                clock,
                Some(OutlierDetection::new()),
            ),
            Contender::P2cLeastRequestsOutliers => tower_lb(
                P2c::least_requests(),
                endpoints,
                seed,
                clock,
                Some(OutlierDetection::new()),
            ),
            Contender::P2cPeakEwmaOutliers => tower_lb(
                P2c::peak_ewma(),
                endpoints,
                seed,
                clock,
                Some(OutlierDetection::new()),
            ),
            Contender::TowerP2cPeakEwma => {
                let discover = PeakEwmaDiscover::new(
                    endpoints,
                    DEFAULT_RTT,
                    DECAY,
                    CompleteOnResponse::default(),
                );
                let balance = Balance::from_rng(discover, SeededRng(SmallRng::seed_from_u64(seed)))
                    .map_response(|answer: Answer| answer.status);
                // `Balance` takes `&mut self`; a `Buffer` is how it is shared.
                Built {
                    client: BoxCloneService::new(Buffer::new(balance, 1024)),
                    probe: None,
                }
            }
        }
    }
}

/// What every tower-lb contender's balancer starts from: the strategy, 5xx
/// classified as failures, Linkerd's Peak-EWMA settings, the run's clock
/// and seed.
fn builder<P: Strategy>(
    strategy: P,
    seed: u64,
    clock: LatencyClock,
) -> tower_lb::balance::Builder<P, ServerErrors> {
    Balancer::builder()
        .strategy(strategy)
        .classify(ServerErrors)
        .rtt_estimate(tower_lb::load::RttEstimate::new(DEFAULT_RTT, DECAY))
        .latency_clock(clock)
        .seed(seed)
}

/// `balancer` alone as a contender, its stats read by the run.
fn bare<P, H>(balancer: Balancer<usize, Endpoint, P, ServerErrors, H>) -> Built
where
    P: Strategy,
    H: tower_lb::balance::RequestHints<Request>,
{
    let stats = balancer.clone();
    Built {
        client: BoxCloneService::new(balancer.map_err(BoxError::from)),
        probe: Some(Arc::new(move || stats.endpoints())),
    }
}

fn tower_lb<P: Strategy>(
    strategy: P,
    endpoints: Discovery,
    seed: u64,
    clock: LatencyClock,
    detection: Option<OutlierDetection>,
) -> Built {
    let builder = builder(strategy, seed, clock);
    let builder = match detection {
        Some(detection) => builder.outlier_detection(detection),
        None => builder,
    };
    bare(builder.build(endpoints))
}

/// A hashing strategy, reading each request's key (the balancer's hints).
fn hashing(strategy: RingHash, endpoints: Discovery, seed: u64, clock: LatencyClock) -> Built {
    bare(
        builder(strategy, seed, clock)
            .avoid_tried_endpoints()
            .build(endpoints),
    )
}

/// `ring-hash-bounded-1.5`'s balance factor.
const LOOSE_BOUND: f64 = 1.5;

/// What a resilient contender has beyond retries and the deadline.
#[derive(Default)]
struct Resilience {
    /// Outlier detection at its defaults.
    outliers: bool,
    /// Hedging after the adaptive p95.
    hedge: bool,
    /// An active check of each of these backends (see [`BackendChecks`]).
    checks: Option<Vec<Arc<Backend>>>,
    /// Each backend's zone, to route by zone from [`CLIENT_ZONE`]; `None`:
    /// every zone alike.
    zones: Option<Vec<&'static str>>,
    /// Adaptive throttling's `k` on the retry budget; `None`: off.
    throttle: Option<f64>,
}

/// The SRE book's default `k` for adaptive throttling.
const THROTTLE_K: f64 = 2.0;

/// `strategy` under a deadline and retries, with what `extra` adds, the
/// balancer sending retries and hedges to endpoints not yet tried.
/// P2C Peak-EWMA with outlier detection at its defaults and retries, and
/// whatever else `extra` adds: the `ewma+od+retry` family.
fn ewma_outliers(endpoints: Discovery, seed: u64, clock: LatencyClock, extra: Resilience) -> Built {
    let extra = Resilience {
        outliers: true,
        ..extra
    };
    resilient(P2c::peak_ewma(), endpoints, seed, clock, extra)
}

fn resilient<P: Strategy>(
    strategy: P,
    endpoints: Discovery,
    seed: u64,
    clock: LatencyClock,
    extra: Resilience,
) -> Built {
    let builder = builder(strategy, seed, clock)
        .avoid_tried_endpoints()
        .health_check(BackendChecks(extra.checks));
    let builder = match extra.outliers {
        true => builder.outlier_detection(OutlierDetection::new()),
        false => builder,
    };
    let builder = match &extra.zones {
        Some(_) => builder.zone_aware(ZoneAware::new(CLIENT_ZONE)),
        None => builder,
    };
    let zones = extra.zones.unwrap_or_default();
    let builder = builder.metadata(move |key: &usize| match zones.get(*key) {
        Some(&zone) => EndpointMetadata::new().with_zone(zone),
        None => EndpointMetadata::new(),
    });
    let balancer = builder.build(endpoints);
    let stats = balancer.clone();
    let budget = match extra.throttle {
        Some(k) => RetryBudget::new()
            .adaptive_throttling(k)
            .unwrap_or_else(|e| panic!("{e}")),
        None => RetryBudget::new(),
    };
    let policy = RetryPolicy::new().retry_on(GatewayErrors);
    let hedging = extra.hedge.then(|| HedgeLayer::new(budget.clone()));
    let client = ServiceBuilder::new()
        .layer(DeadlineLayer::new(Duration::from_secs(5)))
        // Seeded too (apart from the balancer's stream), so a seeded run
        // with retries repeats bit for bit.
        .layer(RetryLayer::new(policy, budget).seed(seed ^ RETRY_SEED))
        .option_layer(hedging)
        .layer(TimeoutLayer::new(Duration::from_secs(1)))
        .service(balancer);
    Built {
        client: BoxCloneService::new(client.map_err(BoxError::from)),
        probe: Some(Arc::new(move || stats.endpoints())),
    }
}

/// The active health check of the `+check` contender: each backend's own
/// health probe (answered in 1 ms when up, refused while it restarts,
/// never while it is black-holed, late while it stalls), every
/// `CHECK_INTERVAL` within `CHECK_TIMEOUT`; two failures in a row take it
/// out, one pass puts it back. `None`: no checks.
///
/// The probe asks the backend directly rather than over a connection, in
/// both modes: a health endpoint that shares the backend's fate.
struct BackendChecks(Option<Vec<Arc<Backend>>>);

const CHECK_INTERVAL: Duration = Duration::from_millis(500);
const CHECK_TIMEOUT: Duration = Duration::from_millis(200);
const CHECK_FAILURES: u32 = 2;

impl ActiveCheck<usize> for BackendChecks {
    fn start(&self, key: &usize, mut reporter: HealthReporter) -> Option<CheckTask> {
        let backend = self.0.as_ref()?.get(*key)?.clone();
        Some(Box::pin(async move {
            // Before the first answer the endpoint is out: the first probe
            // decides.
            let mut failures = CHECK_FAILURES - 1;
            loop {
                match tokio::time::timeout(CHECK_TIMEOUT, backend.probe()).await {
                    Ok(Ok(())) => {
                        failures = 0;
                        reporter.healthy();
                    }
                    Ok(Err(why)) => {
                        failures += 1;
                        if failures >= CHECK_FAILURES {
                            reporter.unhealthy(why);
                        }
                    }
                    Err(_) => {
                        failures += 1;
                        if failures >= CHECK_FAILURES {
                            reporter.unhealthy("no answer in time");
                        }
                    }
                }
                tokio::time::sleep(CHECK_INTERVAL).await;
            }
        }))
    }
}

/// Retries what `HttpRetryOn` would, for endpoints that answer a bare
/// status: 502, 503 and 504.
#[derive(Debug, Clone, Copy)]
struct GatewayErrors;

impl RetryOn<StatusCode> for GatewayErrors {
    fn response(&self, status: &StatusCode) -> ResponseVerdict {
        match status.as_u16() {
            502..=504 => ResponseVerdict::Retry { after: None },
            _ => ResponseVerdict::Accept,
        }
    }
}

/// The endpoints here answer with a status code and maybe a load report:
/// 5xx is a failure, and the report goes to the endpoint's weight.
#[derive(Debug, Clone, Copy)]
struct ServerErrors;

impl Classify<Answer> for ServerErrors {
    type Response = StatusCode;

    fn classify_response(&self, answer: Answer, report: OutcomeReport) -> StatusCode {
        match &answer.load {
            Some(Ok(load)) => report.load(load),
            Some(Err(error)) => report.malformed_load(error),
            None => {}
        }
        let status = answer.status;
        report.report(if status.is_server_error() {
            Outcome::Failure
        } else {
            Outcome::Success
        });
        status
    }
}

/// tower's p2c takes its own `Rng` trait; this feeds it a seeded generator so
/// that simulated runs repeat.
struct SeededRng(SmallRng);

impl tower::util::rng::Rng for SeededRng {
    fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }
}
