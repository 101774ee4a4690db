//! Slow start against real hyper servers: a new endpoint's share ramps up.

mod support;

use std::time::Duration;

use tower::ServiceExt;
use tower_lb::health::SlowStart;
use tower_lb::http::{self as lb_http, HttpEndpoint};
use tower_lb::strategy::{P2c, RoundRobin, Strategy};
use tower_lb::{discover, Balancer};

use support::{get, servers, wait_until, TestServer};

/// The newcomer's share of requests sent one by one during `period`.
async fn share_during<S>(
    balancer: &S,
    newcomer: &TestServer,
    all: &[&TestServer],
    period: Duration,
) -> f64
where
    S: tower::Service<http::Request<support::Body>> + Clone,
    S::Error: std::fmt::Debug,
{
    let before: usize = all.iter().map(|s| s.hits()).sum();
    let newcomer_before = newcomer.hits();
    let until = tokio::time::Instant::now() + period;
    while tokio::time::Instant::now() < until {
        let response = balancer.clone().oneshot(get()).await;
        assert!(response.is_ok(), "{:?}", response.err());
    }
    let total = all.iter().map(|s| s.hits()).sum::<usize>() - before;
    (newcomer.hits() - newcomer_before) as f64 / total.max(1) as f64
}

async fn ramp<P: Strategy>(strategy: P) -> (f64, f64) {
    let servers = servers(3, Duration::ZERO).await;
    let client = lb_http::client();
    let (handle, stream) = discover::channel();
    let balancer = Balancer::builder()
        .strategy(strategy)
        .slow_start(SlowStart::new(Duration::from_secs(1)))
        .build(stream);
    for server in &servers[..2] {
        handle
            .insert(server.addr, HttpEndpoint::new(client.clone(), server.addr))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    wait_until(Duration::from_secs(1), || balancer.endpoints().len() == 2).await;
    // Past the first two endpoints' own slow start.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    handle
        .insert(
            servers[2].addr,
            HttpEndpoint::new(client.clone(), servers[2].addr),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    wait_until(Duration::from_secs(1), || balancer.endpoints().len() == 3).await;
    let all: Vec<&TestServer> = servers.iter().collect();
    let early = share_during(&balancer, &servers[2], &all, Duration::from_millis(150)).await;
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let late = share_during(&balancer, &servers[2], &all, Duration::from_millis(300)).await;
    (early, late)
}

#[tokio::test]
async fn round_robin_ramps_a_new_endpoints_share() {
    let (early, late) = ramp(RoundRobin::new()).await;
    println!("round robin: newcomer share {early:.3} early, {late:.3} after the window");
    // 10 % to 25 % of its weight in the first 150 ms: about 5 to 11 % of 3.
    assert!(early < 0.15, "early share {early:.3}");
    assert!((late - 1.0 / 3.0).abs() < 0.05, "late share {late:.3}");
}

#[tokio::test]
async fn p2c_ramps_a_new_endpoints_share() {
    let (early, late) = ramp(P2c::least_requests()).await;
    println!("p2c: newcomer share {early:.3} early, {late:.3} after the window");
    // Idle endpoints tie, so the newcomer wins a third of the draws and
    // keeps 10 % to 25 % of those early on.
    assert!(early > 0.01 && early < 0.15, "early share {early:.3}");
    assert!((late - 1.0 / 3.0).abs() < 0.05, "late share {late:.3}");
}
