//! Weighted round robin driven by the load real hyper servers report in
//! `endpoint-load-metrics`.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use tower::ServiceExt;
use tower_lb::classify::HttpClassify;
use tower_lb::http::{self as lb_http, HttpEndpoint};
use tower_lb::load::OrcaLoadReports;
use tower_lb::strategy::WeightedRoundRobin;
use tower_lb::{discover, Balancer};

use support::reporting::ReportingServer;
use support::{get, wait_until, Body};

type Classify = HttpClassify<tower_http::classify::ServerErrorsAsFailures, OrcaLoadReports>;
type WeightedBalancer = Balancer<SocketAddr, HttpEndpoint<Body>, WeightedRoundRobin, Classify>;

/// Weighted round robin with a short blackout and update period, so a test
/// sees weights within a second.
fn balancer(servers: &[ReportingServer]) -> WeightedBalancer {
    let client = lb_http::client();
    let addrs = servers.iter().map(|s| s.addr);
    Balancer::builder()
        .strategy(
            WeightedRoundRobin::new()
                .blackout_period(Duration::from_millis(200))
                .weight_update_period(Duration::from_millis(100)),
        )
        .classify(HttpClassify::server_errors().load_reports(OrcaLoadReports))
        .build(discover::fixed(lb_http::endpoints(&client, addrs)))
}

/// Sends requests from `tasks` tasks for `period`.
async fn drive(balancer: &WeightedBalancer, tasks: usize, period: Duration) {
    let until = tokio::time::Instant::now() + period;
    let mut all = tokio::task::JoinSet::new();
    for _ in 0..tasks {
        let balancer = balancer.clone();
        all.spawn(async move {
            while tokio::time::Instant::now() < until {
                let response = balancer.clone().oneshot(get()).await;
                assert!(response.is_ok(), "{response:?}");
            }
        });
    }
    while let Some(done) = all.join_next().await {
        assert!(done.is_ok());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_follows_the_capacity_the_servers_report() {
    let capacities = [100.0, 200.0, 400.0];
    let mut servers = Vec::new();
    for capacity in capacities {
        servers.push(ReportingServer::start(capacity).await);
    }
    let balancer = balancer(&servers);
    // Long enough for reports, the blackout and a few weight updates.
    drive(&balancer, 8, Duration::from_millis(1_000)).await;
    let before: Vec<u64> = servers.iter().map(ReportingServer::hits).collect();
    drive(&balancer, 8, Duration::from_millis(1_500)).await;
    let during: Vec<u64> = servers
        .iter()
        .zip(&before)
        .map(|(s, b)| s.hits() - b)
        .collect();
    let total: u64 = during.iter().sum();
    let shares: Vec<f64> = during.iter().map(|&h| h as f64 / total as f64).collect();
    let expected: Vec<f64> = capacities.iter().map(|c| c / 700.0).collect();
    println!("{total} requests, shares {shares:.3?}, capacity shares {expected:.3?}");
    for (share, want) in shares.iter().zip(&expected) {
        assert!(
            (share - want).abs() < 0.05,
            "shares {shares:.3?}, want {expected:.3?}"
        );
    }
    for stats in balancer.endpoints() {
        assert!(stats.reported_load.is_some(), "{stats:?}");
        assert_eq!(stats.malformed_load_reports, 0);
    }
}

#[tokio::test]
async fn a_malformed_report_is_counted_and_ignored() {
    let servers = vec![
        ReportingServer::start(100.0).await,
        ReportingServer::start(100.0).await,
    ];
    servers[0].report_verbatim("TEXT rps_fractional=10, cpu_utilization=NaN");
    servers[1].report_verbatim("XML <load/>");
    let balancer = balancer(&servers);
    for _ in 0..20 {
        let response = balancer.clone().oneshot(get()).await;
        assert_eq!(
            response.map(|r| r.status()).ok(),
            Some(http::StatusCode::OK)
        );
    }
    wait_until(Duration::from_secs(1), || {
        balancer
            .endpoints()
            .iter()
            .all(|e| e.malformed_load_reports > 0)
    })
    .await;
    for stats in balancer.endpoints() {
        assert_eq!(stats.reported_load, None, "{stats:?}");
        assert_eq!(stats.malformed_load_reports, 10, "{stats:?}");
    }
}
