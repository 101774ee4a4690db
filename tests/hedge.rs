//! Hedging against real hyper servers on loopback.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use tokio::time::Instant;
use tower::util::BoxCloneSyncService;
use tower::{ServiceBuilder, ServiceExt};
use tower_lb::error::BoxError;
use tower_lb::hedge::HedgeLayer;
use tower_lb::http as lb_http;
use tower_lb::retry::{ReplayBody, ReplayLayer, RetryBudget, RetryLayer, RetryPolicy};
use tower_lb::strategy::{Candidates, PickContext, RoundRobin, Strategy};
use tower_lb::{discover, Balancer};

use support::recording::{self, addrs, received, start_all as start, Behaviour, RecordingServer};

type Body = Full<Bytes>;
type Client = BoxCloneSyncService<
    http::Request<Body>,
    http::Response<tower_lb::http::EndpointBody>,
    BoxError,
>;

/// Replay -> hedge -> round robin over `addrs`, avoiding endpoints tried.
fn client(hedge: HedgeLayer, addrs: impl IntoIterator<Item = SocketAddr>) -> Client {
    client_with(RoundRobin::new(), hedge, addrs)
}

fn client_with<P: Strategy>(
    strategy: P,
    hedge: HedgeLayer,
    addrs: impl IntoIterator<Item = SocketAddr>,
) -> Client {
    let http = lb_http::client::<ReplayBody<Body>>();
    let balancer = Balancer::builder()
        .strategy(strategy)
        .avoid_tried_endpoints()
        .build(discover::fixed(lb_http::endpoints(&http, addrs)));
    BoxCloneSyncService::new(
        ServiceBuilder::new()
            .layer(ReplayLayer::default())
            .layer(hedge)
            .service(balancer),
    )
}

/// A request with no body.
fn request(method: http::Method, id: &str) -> http::Request<Body> {
    recording::request(method, id, Bytes::new())
}

/// Sends `n` GETs one after another, so the layer learns the latency.
async fn warm_up(client: &Client, n: usize) {
    for i in 0..n {
        let response = client
            .clone()
            .oneshot(request(http::Method::GET, &format!("warm-{i}")))
            .await;
        assert!(response.is_ok(), "{response:?}");
    }
}

/// Always the first endpoint: only the balancer's avoidance of endpoints
/// already tried can send a hedge anywhere else.
#[derive(Debug, Clone, Copy)]
struct FirstEndpoint;

impl Strategy for FirstEndpoint {
    type Schedule = ();

    fn schedule<C: Candidates + ?Sized>(&self, _: &C, _: &PickContext<'_>) {}

    fn pick<C: Candidates + ?Sized>(&self, _: &(), _: &C, _: &PickContext<'_>) -> Option<usize> {
        Some(0)
    }
}

fn hedge_layer(budget: &RetryBudget) -> HedgeLayer {
    HedgeLayer::new(budget.clone())
        .min_delay(Duration::from_millis(50))
        .min_samples(10)
}

#[tokio::test]
async fn a_slow_get_is_hedged_to_another_endpoint_after_the_delay() {
    let servers = start(vec![Behaviour::Answer, Behaviour::Answer]).await;
    let budget = RetryBudget::new();
    let client = client_with(FirstEndpoint, hedge_layer(&budget), addrs(&servers));
    warm_up(&client, 20).await;
    servers[0].set(Behaviour::Stall(Duration::from_secs(2)));
    servers[1].set(Behaviour::Stall(Duration::from_secs(2)));
    // The next GET goes to one of them and stalls; switch the other back
    // once the first has it, so that only the hedge can answer quickly.
    let call = tokio::spawn(client.clone().oneshot(request(http::Method::GET, "slow")));
    support::wait_until(Duration::from_secs(1), || {
        servers.iter().any(|s| s.received("slow") == 1)
    })
    .await;
    let started = Instant::now();
    let (first, other) = if servers[0].received("slow") == 1 {
        (&servers[0], &servers[1])
    } else {
        (&servers[1], &servers[0])
    };
    other.set(Behaviour::Answer);
    let response = call
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(response.status(), 200);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "the hedge did not win"
    );
    assert_eq!(first.received("slow"), 1);
    assert_eq!(
        other.received("slow"),
        1,
        "the copy went to the other endpoint"
    );
    assert_eq!(budget.stats().hedges, 1);
}

#[tokio::test]
async fn a_fast_get_is_not_hedged() {
    let servers = start(vec![Behaviour::Answer, Behaviour::Answer]).await;
    let budget = RetryBudget::new();
    let client = client(hedge_layer(&budget), addrs(&servers));
    warm_up(&client, 50).await;
    assert_eq!(budget.stats().hedges, 0);
    let total: usize = servers.iter().map(RecordingServer::hits).sum();
    assert_eq!(total, 50);
}

#[tokio::test]
async fn a_post_is_never_hedged() {
    let servers = start(vec![Behaviour::Answer, Behaviour::Answer]).await;
    let budget = RetryBudget::new();
    let client = client(hedge_layer(&budget), addrs(&servers));
    warm_up(&client, 20).await;
    for server in &servers {
        server.set(Behaviour::Stall(Duration::from_millis(300)));
    }
    let response = client.oneshot(request(http::Method::POST, "post-1")).await;
    assert!(response.is_ok(), "{response:?}");
    assert_eq!(received(&servers, "post-1"), 1);
    assert_eq!(budget.stats().hedges, 0);
}

#[tokio::test]
async fn no_hedge_before_enough_calls_were_measured() {
    let servers = start(vec![Behaviour::Answer, Behaviour::Answer]).await;
    let budget = RetryBudget::new();
    let client = client(hedge_layer(&budget), addrs(&servers));
    // Half of the 10 calls the layer wants measured: enough for a
    // percentile, not for the layer to trust one.
    warm_up(&client, 5).await;
    // Past the layer's 10 ms recomputation of the delay.
    tokio::time::sleep(Duration::from_millis(20)).await;
    for server in &servers {
        server.set(Behaviour::Stall(Duration::from_millis(200)));
    }
    let response = client.oneshot(request(http::Method::GET, "slow")).await;
    assert!(response.is_ok(), "{response:?}");
    assert_eq!(budget.stats().hedges, 0);
}

#[tokio::test]
async fn hedges_stop_when_the_budget_is_exhausted() {
    let servers = start(vec![Behaviour::Answer, Behaviour::Answer]).await;
    let budget = RetryBudget::new()
        .ratio(0.0)
        .expect("valid setting")
        .min_per_second(0);
    let client = client(hedge_layer(&budget), addrs(&servers));
    warm_up(&client, 20).await;
    for server in &servers {
        server.set(Behaviour::Stall(Duration::from_millis(200)));
    }
    let response = client.oneshot(request(http::Method::GET, "slow")).await;
    assert!(response.is_ok(), "{response:?}");
    let stats = budget.stats();
    assert_eq!((stats.hedges, stats.refused), (0, 1));
}

#[tokio::test]
async fn hedging_cuts_the_p99_against_a_stalling_server() {
    // One server in four stalls on every 10th of its requests: without
    // hedging about 2.5 % of calls take 300 ms.
    let p99 = |hedged: bool| async move {
        let servers = start(vec![
            Behaviour::Answer,
            Behaviour::Answer,
            Behaviour::Answer,
            Behaviour::Answer,
        ])
        .await;
        let budget = RetryBudget::new();
        let layer = hedge_layer(&budget).min_delay(Duration::from_millis(20));
        let layer = if hedged {
            layer
        } else {
            layer.min_samples(u64::MAX)
        };
        let client = client(layer, addrs(&servers));
        warm_up(&client, 20).await;
        let mut latencies = Vec::new();
        for i in 0..200 {
            // Every 40th call finds the first server stalled.
            let stalled = i % 40 < 4;
            servers[0].set(if stalled {
                Behaviour::Stall(Duration::from_millis(300))
            } else {
                Behaviour::Answer
            });
            let started = Instant::now();
            let response = client
                .clone()
                .oneshot(request(http::Method::GET, &format!("get-{i}")))
                .await;
            assert!(response.is_ok(), "{response:?}");
            latencies.push(started.elapsed());
        }
        latencies.sort();
        (latencies[latencies.len() * 99 / 100], budget.stats())
    };
    let (plain, _) = p99(false).await;
    let (hedged, stats) = p99(true).await;
    println!("p99 without hedging {plain:?}, with {hedged:?}; {stats:?}");
    assert!(
        plain >= Duration::from_millis(250),
        "the stall did not show: {plain:?}"
    );
    assert!(
        hedged <= Duration::from_millis(150),
        "hedging did not cut the p99: {hedged:?}"
    );
    assert!(stats.hedges > 0 && stats.hedges < 40, "{stats:?}");
}

#[tokio::test]
async fn adaptive_throttling_refuses_hedges_as_it_refuses_calls() {
    let servers = start(vec![Behaviour::Answer, Behaviour::Answer]).await;
    // Room for every hedge in the budget itself: only throttling (k = 1,
    // sending what is accepted) holds them back.
    let budget = RetryBudget::new()
        .ratio(1.0)
        .and_then(|b| b.adaptive_throttling(1.0))
        .expect("valid settings")
        .min_per_second(10_000);
    let http = lb_http::client::<ReplayBody<Body>>();
    let balancer = Balancer::builder()
        .avoid_tried_endpoints()
        .build(discover::fixed(lb_http::endpoints(&http, addrs(&servers))));
    let client: Client = BoxCloneSyncService::new(
        ServiceBuilder::new()
            .layer(ReplayLayer::default())
            .layer(RetryLayer::new(RetryPolicy::new(), budget.clone()))
            .layer(hedge_layer(&budget))
            .service(balancer),
    );
    warm_up(&client, 20).await;
    // The servers turn every call away, quickly: the window fills with
    // calls not accepted, and throttling refuses nearly all (about 95 %).
    for server in &servers {
        server.set(Behaviour::Unavailable { retry_after: None });
    }
    for i in 0..400 {
        let _ = client
            .clone()
            .oneshot(request(http::Method::GET, &format!("refused-{i}")))
            .await;
    }
    // Now they answer, slowly, past the hedging delay (50 ms): of 400
    // calls about 20 get past throttling, and each of their hedges meets
    // the same odds.
    for server in &servers {
        server.set(Behaviour::Stall(Duration::from_millis(150)));
    }
    let before = budget.stats();
    let calls: Vec<_> = (0..400)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(client.oneshot(request(http::Method::GET, &format!("slow-{i}"))))
        })
        .collect();
    for call in calls {
        let _ = call.await;
    }
    let after = budget.stats();
    let sent = (0..400)
        .filter(|i| received(&servers, &format!("slow-{i}")) > 0)
        .count();
    let (hedges, refused) = (after.hedges - before.hedges, after.refused - before.refused);
    println!("{sent} calls sent, {hedges} hedged, {refused} hedges refused; {after:?}");
    assert!(
        sent > 0 && sent < 80,
        "{sent} of 400 calls got past throttling"
    );
    // Without the rule every sent call would be hedged.
    assert!(refused >= 1, "no hedge refused: {hedges} of {sent} hedged");
    assert!(hedges * 2 < sent as u64, "{hedges} of {sent} calls hedged");
}
