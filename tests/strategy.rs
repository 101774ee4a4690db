//! How strategies spread requests over real hyper servers on loopback:
//! retries under round robin, new and recovered endpoints under P2C
//! Peak-EWMA.

mod support;

use std::time::Duration;

use tower::{ServiceBuilder, ServiceExt};
use tower_lb::http::{self as lb_http};
use tower_lb::retry::{Backoff, ReplayBody, ReplayLayer, RetryBudget, RetryLayer, RetryPolicy};
use tower_lb::strategy::RoundRobin;
use tower_lb::{discover, Balancer};

use support::{get, Body, TestServer};

/// Round robin over `servers`, behind retries (1 ms backoff, a budget that
/// never refuses) and with retries sent to endpoints not yet tried;
/// outlier detection off. Sends `calls` GETs one by one and returns each
/// server's hits.
async fn round_robin_with_retries(servers: &[TestServer], calls: usize) -> Vec<usize> {
    let http = lb_http::client::<ReplayBody<Body>>();
    let balancer = Balancer::builder()
        .strategy(RoundRobin::new())
        .avoid_tried_endpoints()
        .build(discover::fixed(lb_http::endpoints(
            &http,
            servers.iter().map(|s| s.addr),
        )));
    let client = ServiceBuilder::new()
        .layer(ReplayLayer::new(tower_lb::retry::DEFAULT_REPLAY_CAP))
        .layer(RetryLayer::new(
            RetryPolicy::new().backoff(Backoff::new().initial(Duration::from_millis(1))),
            RetryBudget::new().min_per_second(1_000),
        ))
        .service(balancer);
    for _ in 0..calls {
        let response = client.clone().oneshot(get()).await;
        assert!(response.is_ok(), "{:?}", response.err());
    }
    servers.iter().map(TestServer::hits).collect()
}

/// Servers that answer 200, the first one 503 to everything. Retries
/// avoid the endpoint a call tried, so the failing server only ever sees
/// first attempts.
async fn one_failing_of(n: usize) -> Vec<TestServer> {
    let servers = support::servers(n, Duration::ZERO).await;
    servers[0].fail_every(1);
    servers
}

#[tokio::test]
async fn a_retry_takes_no_round_robin_turn_with_one_healthy_endpoint_beside() {
    let servers = one_failing_of(2).await;
    let hits = round_robin_with_retries(&servers, 30).await;
    // Every call's first attempt in turn: 15 on each; each one on the
    // failing server is retried on the healthy one.
    assert_eq!(
        hits[0], 15,
        "first attempts on the failing server: {hits:?}"
    );
    assert_eq!(hits[1], 30, "{hits:?}");
}

#[tokio::test]
async fn a_retry_takes_no_round_robin_turn_with_two_healthy_endpoints_beside() {
    let servers = one_failing_of(3).await;
    let hits = round_robin_with_retries(&servers, 30).await;
    assert_eq!(
        hits[0], 10,
        "first attempts on the failing server: {hits:?}"
    );
    assert_eq!(hits[1] + hits[2], 30, "{hits:?}");
}
