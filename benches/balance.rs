//! Per-request overhead of the balancer over no-op endpoints, next to
//! `tower::balance::p2c::Balance` with `PeakEwma` in the same run.
//!
//! - `single/*`: one task sends requests one after another (latency of the
//!   balancing machinery itself).
//! - `tasks64/*`: 64 tasks on a 2-worker runtime share one balancer (clones of
//!   a tower-lb `Balancer`; tower's `Balance` behind a `Buffer`, the way it
//!   must be shared). Time per request = wall time / requests, so lower is
//!   higher throughput.
//!
//! - `pick/*`: a strategy's `pick` alone over plain load records, so that
//!   weighted round robin (with a weight per endpoint from load reports)
//!   compares with round robin on the same footing.
//! - `floor/*`: what no request through a shared balancer avoids, measured
//!   on the machine at hand, for reading the figures above.
//! - `start/active-checks/*`: from building a balancer over that many
//!   endpoints, each with an active check that passes at once, until every
//!   endpoint has passed: the driver taking one report per endpoint.
//!
//! Run with `cargo bench --bench balance`.

use std::convert::Infallible;
use std::future::{ready, Ready};
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tokio::runtime::Runtime;
use tower::balance::p2c::Balance;
use tower::buffer::Buffer;
use tower::discover::ServiceList;
use tower::load::{CompleteOnResponse, PeakEwmaDiscover};
use tower::{Service, ServiceExt};
use tower_lb::health::{ActiveCheck, CheckStatus, CheckTask, HealthReporter};
use tower_lb::load::{EndpointLoad, RttEstimate};
use tower_lb::strategy::{P2c, PickContext, RingHash, RoundRobin, Strategy, WeightedRoundRobin};
use tower_lb::{discover, Balancer};

const ENDPOINTS: [usize; 4] = [10, 100, 1_000, 10_000];
const TASKS: usize = 64;

/// An endpoint that answers at once.
#[derive(Clone, Copy, Debug)]
struct Noop;

impl Service<u64> for Noop {
    type Response = u64;
    type Error = Infallible;
    type Future = Ready<Result<u64, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: u64) -> Self::Future {
        ready(Ok(req))
    }
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// A tower-lb balancer over `n` no-op endpoints; `timed` times every request
/// even when the strategy does not need it (`Builder::track_latency`).
fn tower_lb<P: Strategy>(
    rt: &Runtime,
    strategy: P,
    n: usize,
    timed: bool,
) -> Balancer<usize, Noop, P> {
    rt.block_on(async {
        let balancer = Balancer::builder()
            .strategy(strategy)
            .track_latency(timed)
            .build(discover::fixed((0..n).map(|i| (i, Noop))));
        while balancer.endpoints().len() < n {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        balancer
    })
}

type TowerP2c = Balance<PeakEwmaDiscover<ServiceList<Vec<Noop>>>, u64>;

fn tower_p2c(n: usize) -> TowerP2c {
    let list = ServiceList::new(vec![Noop; n]);
    let discover = PeakEwmaDiscover::new(
        list,
        Duration::from_millis(30),
        Duration::from_secs(10),
        CompleteOnResponse::default(),
    );
    Balance::new(discover)
}

/// Sends `iters` requests one after another from one task; returns the wall
/// time.
fn one_task<S>(rt: &Runtime, service: &mut S, iters: u64) -> Duration
where
    S: Service<u64>,
    S::Error: std::fmt::Debug,
{
    rt.block_on(async {
        let start = Instant::now();
        for i in 0..iters {
            let svc = service.ready().await.expect("ready");
            svc.call(i).await.expect("response");
        }
        start.elapsed()
    })
}

/// Sends `iters` requests from `TASKS` tasks, each through its own clone of
/// `service`; returns the wall time.
fn spread_over_tasks<S>(rt: &Runtime, service: &S, iters: u64) -> Duration
where
    S: Service<u64> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: std::fmt::Debug,
{
    rt.block_on(async {
        let start = Instant::now();
        let tasks: Vec<_> = (0..TASKS as u64)
            .map(|t| {
                let mut service = service.clone();
                let share = iters / TASKS as u64 + u64::from(t < iters % TASKS as u64);
                tokio::spawn(async move {
                    for i in 0..share {
                        let svc = service.ready().await.expect("ready");
                        svc.call(i).await.expect("response");
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("task");
        }
        start.elapsed()
    })
}

fn bench_tower_lb<P: Strategy>(
    c: &mut Criterion,
    rt: &Runtime,
    name: &str,
    strategy: impl Fn() -> P,
    timed: bool,
) {
    for n in ENDPOINTS {
        let balancer = tower_lb(rt, strategy(), n, timed);
        let mut group = c.benchmark_group(format!("single/{name}"));
        group.throughput(Throughput::Elements(1));
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            let mut svc = balancer.clone();
            b.iter_custom(|iters| one_task(rt, &mut svc, iters));
        });
        group.finish();

        let mut group = c.benchmark_group(format!("tasks64/{name}"));
        group.throughput(Throughput::Elements(1));
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter_custom(|iters| spread_over_tasks(rt, &balancer, iters));
        });
        group.finish();
    }
}

fn bench_tower_p2c(c: &mut Criterion, rt: &Runtime) {
    for n in ENDPOINTS {
        let mut group = c.benchmark_group("single/tower-p2c-peak-ewma");
        group.throughput(Throughput::Elements(1));
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, &n| {
            let mut balance = tower_p2c(n);
            b.iter_custom(|iters| one_task(rt, &mut balance, iters));
        });
        group.finish();

        let mut group = c.benchmark_group("tasks64/tower-p2c-peak-ewma+buffer");
        group.throughput(Throughput::Elements(1));
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, &n| {
            let buffer = rt.block_on(async { Buffer::new(tower_p2c(n), 1024) });
            b.iter_custom(|iters| spread_over_tasks(rt, &buffer, iters));
        });
        group.finish();
    }
}

/// `pick` alone, `n` endpoints. For weighted round robin each endpoint has
/// reported a different capacity (weights 1 to n), past the blackout.
fn bench_pick<P: Strategy>(
    c: &mut Criterion,
    name: &str,
    strategy: impl Fn() -> P,
    weighted: bool,
    hash_key: Option<u64>,
) {
    let rtt = RttEstimate::DEFAULT;
    let now_ns = 60_000_000_000;
    for n in ENDPOINTS {
        // Estimates as of now, as on a busy balancer (a stale one would time
        // `exp` instead of the pick).
        let loads: Vec<EndpointLoad> = (0..n)
            .map(|i| {
                let load = EndpointLoad::new(now_ns, &rtt);
                if !weighted {
                    return load;
                }
                let qps = 100.0 * (i + 1) as f64;
                load.with_reported_load(qps, 0.0, 0.5, 0)
                    .with_reported_load(qps, 0.0, 0.5, now_ns)
            })
            .collect();
        let strategy = strategy();
        let ctx = PickContext::new(now_ns, &rtt).with_hash_key(hash_key);
        let schedule = strategy.schedule(&loads[..], &ctx);
        let mut group = c.benchmark_group(format!("pick/{name}"));
        group.throughput(Throughput::Elements(1));
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| strategy.pick(&schedule, &loads[..], &ctx));
        });
        group.finish();
    }
}

/// The parts of a request through a tower-lb balancer that no strategy can
/// save, each alone: the six atomic read-modify-writes (the snapshot loaded
/// through arc-swap, the endpoint reference the response future holds, the
/// in-flight count up and down) and, for Peak EWMA, the two clock reads that
/// time a request, with the CPU's counter and with `Instant::now()`.
fn bench_floor(c: &mut Criterion) {
    let mut group = c.benchmark_group("floor");
    let endpoint = Arc::new(AtomicU64::new(0));
    let snapshot = ArcSwap::from_pointee(vec![endpoint; 10]);
    group.bench_function("six-atomics", |b| {
        b.iter(|| {
            let endpoint = snapshot.load()[black_box(3)].clone();
            endpoint.fetch_add(1, Ordering::SeqCst);
            endpoint.fetch_sub(1, Ordering::SeqCst);
            endpoint
        })
    });
    let clock = quanta::Clock::new();
    group.bench_function("two-cpu-counter-reads", |b| {
        b.iter(|| (black_box(clock.raw()), black_box(clock.raw())))
    });
    group.bench_function("two-instant-now-reads", |b| {
        b.iter(|| (black_box(Instant::now()), black_box(Instant::now())))
    });
    group.finish();
}

/// A check that passes at once, then stays quiet.
struct PassesAtOnce;

impl ActiveCheck<usize> for PassesAtOnce {
    fn start(&self, _: &usize, mut reporter: HealthReporter) -> Option<CheckTask> {
        Some(Box::pin(async move {
            reporter.healthy();
            std::future::pending::<()>().await
        }))
    }
}

fn bench_start_with_checks(c: &mut Criterion, rt: &Runtime) {
    let mut group = c.benchmark_group("start/active-checks");
    group.sample_size(10);
    for n in [1_000, 10_000] {
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, &n| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let started = Instant::now();
                        let balancer = Balancer::builder()
                            .health_check(PassesAtOnce)
                            .build(discover::fixed((0..n).map(|i| (i, Noop))));
                        let passing = |b: &Balancer<usize, Noop, P2c>| {
                            let stats = b.endpoints();
                            stats.len() == n
                                && stats
                                    .iter()
                                    .all(|e| e.health_check == Some(CheckStatus::Passing))
                        };
                        while !passing(&balancer) {
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                        total += started.elapsed();
                    }
                    total
                })
            });
        });
    }
    group.finish();
}

fn balance(c: &mut Criterion) {
    bench_floor(c);
    bench_pick(c, "round-robin", RoundRobin::new, false, None);
    bench_pick(
        c,
        "weighted-round-robin",
        WeightedRoundRobin::new,
        true,
        None,
    );
    bench_pick(c, "p2c-least-requests", P2c::least_requests, false, None);
    bench_pick(c, "p2c-peak-ewma", P2c::peak_ewma, false, None);
    // A keyed request: the ring's search and, bounded, the sum of the
    // loads in flight the bound needs.
    let key = Some(tower_lb::request::hash_key_of(b"user-42"));
    bench_pick(c, "ring-hash-bounded", RingHash::new, false, key);
    bench_pick(
        c,
        "ring-hash-unbounded",
        || RingHash::new().unbounded(),
        false,
        key,
    );
    let rt = runtime();
    bench_tower_lb(
        c,
        &rt,
        "weighted-round-robin",
        WeightedRoundRobin::new,
        false,
    );
    bench_tower_lb(c, &rt, "round-robin", RoundRobin::new, false);
    bench_tower_lb(c, &rt, "p2c-least-requests", P2c::least_requests, false);
    // The same with every request timed: what the two clock reads that Peak
    // EWMA needs cost in place, apart from its arithmetic.
    bench_tower_lb(
        c,
        &rt,
        "p2c-least-requests+timed",
        P2c::least_requests,
        true,
    );
    bench_tower_lb(c, &rt, "p2c-peak-ewma", P2c::peak_ewma, false);
    bench_tower_p2c(c, &rt);
    bench_start_with_checks(c, &rt);
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30);
    targets = balance
}
criterion_main!(benches);
