//! What each resilience layer adds per request, over in-memory endpoints
//! that answer at once: the balancer alone, then the per-attempt timeout,
//! the retry layer, the hedge layer, the whole stack under a deadline, and
//! that stack boxed as the ready-made clients hold it.
//! Requests are GETs with four headers, as a client would send; building
//! one is measured on its own (`request only`) so that it can be
//! subtracted from the rest.
//!
//! Run with `cargo bench --bench layers`.

use std::convert::Infallible;
use std::future::{ready, Ready};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use http_body_util::Empty;
use tower::{Layer, Service, ServiceExt};
use tower_lb::hedge::HedgeLayer;
use tower_lb::retry::{ReplayBody, ReplayLayer, RetryBudget, RetryLayer, RetryPolicy};
use tower_lb::strategy::RoundRobin;
use tower_lb::timeout::{DeadlineLayer, TimeoutLayer};
use tower_lb::{discover, Balancer};

type Request = http::Request<ReplayBody<Empty<Bytes>>>;

/// An endpoint that answers 200 at once.
#[derive(Clone, Copy, Debug)]
struct Noop;

impl Service<Request> for Noop {
    type Response = http::Response<()>;
    type Error = Infallible;
    type Future = Ready<Result<http::Response<()>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request) -> Self::Future {
        ready(Ok(http::Response::new(())))
    }
}

fn plain_get() -> http::Request<Empty<Bytes>> {
    http::Request::get("http://orders.internal/v1/orders/42")
        .header("accept", "application/json")
        .header("user-agent", "tower-lb-bench")
        .header("x-request-id", "5f0c6a51-7a4e-4c1b-9d2a-0c1f8f3b1e77")
        .header("authorization", "Bearer abcdefghijklmnopqrstuvwxyz")
        .body(Empty::new())
        .unwrap_or_else(|e| panic!("{e}"))
}

fn get() -> Request {
    plain_get().map(|body| ReplayBody::new(body, tower_lb::retry::DEFAULT_REPLAY_CAP))
}

fn bench_layers(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let balancer = rt.block_on(async {
        let balancer = Balancer::builder()
            .strategy(RoundRobin::new())
            .avoid_tried_endpoints()
            .build(discover::fixed((0..10).map(|i| (i, Noop))));
        while balancer.endpoints().len() < 10 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        balancer
    });
    let budget = RetryBudget::new();
    let timeout = TimeoutLayer::new(Duration::from_secs(1));
    let retry = RetryLayer::new(RetryPolicy::new(), budget.clone());
    let hedge = HedgeLayer::new(budget.clone());

    let mut group = c.benchmark_group("layers");
    // Building the request is in every other figure; subtract it.
    group.bench_function("request only", |b| b.iter(get));
    group.bench_function("balancer", |b| {
        b.to_async(&rt).iter(|| balancer.clone().oneshot(get()))
    });
    let timed = timeout.layer(balancer.clone());
    group.bench_function("timeout+balancer", |b| {
        b.to_async(&rt).iter(|| timed.clone().oneshot(get()))
    });
    let retried = retry.layer(timeout.layer(balancer.clone()));
    group.bench_function("retry+timeout+balancer", |b| {
        b.to_async(&rt).iter(|| retried.clone().oneshot(get()))
    });
    let hedged = hedge.layer(timeout.layer(balancer.clone()));
    group.bench_function("hedge+timeout+balancer", |b| {
        b.to_async(&rt).iter(|| hedged.clone().oneshot(get()))
    });
    let full = DeadlineLayer::new(Duration::from_secs(5)).layer(
        ReplayLayer::default().layer(retry.layer(hedge.layer(timeout.layer(balancer.clone())))),
    );
    group.bench_function("deadline+replay+retry+hedge+timeout+balancer", |b| {
        b.to_async(&rt).iter(|| full.clone().oneshot(plain_get()))
    });
    // `HttpClient` and `GrpcChannel` box their stack so that they have a
    // name: this is what the box costs (one allocation for the future).
    let boxed = tower::util::BoxCloneSyncService::new(full.clone());
    group.bench_function("boxed, as in HttpClient", |b| {
        b.to_async(&rt).iter(|| boxed.clone().oneshot(plain_get()))
    });
    group.finish();
}

/// Reading a load report from a response, as `HttpClassify::load_reports`
/// does for each response when weighted round robin is in use.
fn bench_load_report(c: &mut Criterion) {
    let text = http::HeaderValue::from_static(
        "TEXT cpu_utilization=0.31, rps_fractional=812.5, eps=1.5, application_utilization=0.42",
    );
    c.bench_function("load report/TEXT, 4 fields", |b| {
        b.iter(|| tower_lb::load::LoadReport::from_header(&text))
    });
}

criterion_group!(benches, bench_layers, bench_load_report);
criterion_main!(benches);
