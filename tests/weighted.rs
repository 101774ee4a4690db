//! Weighted round robin driven by the load real hyper servers report in
//! `endpoint-load-metrics`.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use tower::ServiceExt;
use tower_lb::classify::HttpClassify;
use tower_lb::http::{self as lb_http, HttpEndpoint};
use tower_lb::load::{OrcaLoadReports, RttEstimate};
use tower_lb::strategy::{P2c, Strategy, WeightedRoundRobin};
use tower_lb::{discover, Balancer};

use support::reporting::ReportingServer;
use support::{get, wait_until, Body};

/// Held by the tests that measure shares, and by the one that loads both
/// cores: a share measured while another test of this binary keeps the
/// machine busy measures scheduling hiccups, which Peak-EWMA rightly holds
/// against a server (a CI run had one caller's 3:1 come out 65:35).
static MEASURING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

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
                .weight_update_period(Duration::from_millis(100))
                .expect("valid setting"),
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
    let _alone = MEASURING.lock().await;
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

/// Requests that reached each server while `requests` GETs were sent one by
/// one through `balancer`.
async fn spread<S>(balancer: &S, servers: &[support::TestServer], requests: usize) -> Vec<f64>
where
    S: tower::Service<http::Request<Body>> + Clone,
    S::Error: std::fmt::Debug,
{
    let _alone = MEASURING.lock().await;
    let before: Vec<usize> = servers.iter().map(support::TestServer::hits).collect();
    for _ in 0..requests {
        let response = balancer.clone().oneshot(get()).await;
        assert!(response.is_ok(), "{:?}", response.err());
    }
    servers
        .iter()
        .zip(before)
        .map(|(s, b)| (s.hits() - b) as f64 / requests as f64)
        .collect()
}

#[tokio::test]
async fn static_weights_from_discovery_keys_steer_traffic() {
    let servers = support::servers(2, Duration::ZERO).await;
    let client = lb_http::client();
    let keyed = servers
        .iter()
        .zip([1u32, 3])
        .map(|(s, w)| ((s.addr, w), HttpEndpoint::new(client.clone(), s.addr)));
    let balancer = Balancer::builder()
        .strategy(WeightedRoundRobin::new())
        .static_weights(|&(_, weight): &(SocketAddr, u32)| f64::from(weight))
        .build(discover::fixed(keyed));
    let shares = spread(&balancer, &servers, 2_000).await;
    assert!((shares[0] - 0.25).abs() < 0.02, "{shares:?}");
    assert!((shares[1] - 0.75).abs() < 0.02, "{shares:?}");
}

#[tokio::test]
async fn a_static_weight_that_is_not_a_number_is_refused_and_the_endpoint_weighs_one() {
    let servers = support::servers(2, Duration::ZERO).await;
    let client = lb_http::client();
    let keyed = servers.iter().zip([f64::NAN, -2.0]).map(|(s, w)| {
        (
            (s.addr, w.to_bits()),
            HttpEndpoint::new(client.clone(), s.addr),
        )
    });
    let balancer = Balancer::builder()
        .strategy(WeightedRoundRobin::new())
        .static_weights(|&(_, bits): &(SocketAddr, u64)| f64::from_bits(bits))
        .build(discover::fixed(keyed));
    let shares = spread(&balancer, &servers, 1_000).await;
    assert_eq!(shares, vec![0.5, 0.5], "both weigh 1: plain round robin");
    for stats in balancer.endpoints() {
        assert_eq!(stats.static_weight, 1.0);
    }
}

#[tokio::test]
async fn an_orca_report_without_a_rate_is_ignored_as_a58_says() {
    let servers = vec![ReportingServer::start(100.0).await];
    servers[0].report_verbatim("TEXT application_utilization=0.5");
    let balancer = balancer(&servers);
    for _ in 0..10 {
        let response = balancer.clone().oneshot(get()).await;
        assert_eq!(
            response.map(|r| r.status()).ok(),
            Some(http::StatusCode::OK)
        );
    }
    let stats = &balancer.endpoints()[0];
    assert_eq!(stats.reported_load, None, "{stats:?}");
    assert_eq!(
        stats.malformed_load_reports, 0,
        "well formed, just unusable"
    );
}

/// `strategy` over two servers of static weights 3 and 1 (the weight
/// rides in the discovery key), outlier detection off. Latency estimates
/// forget in 1 s rather than 10: on a busy machine a scheduling hiccup is a
/// peak that Peak-EWMA rightly holds against a server for a while, and over
/// a test of seconds its 10 s memory would measure hiccups, not weights.
fn weighted_3_to_1<P: Strategy>(
    strategy: P,
    servers: &[support::TestServer],
) -> Balancer<(SocketAddr, u32), HttpEndpoint<Body>, P> {
    let client = lb_http::client();
    let keyed = servers
        .iter()
        .zip([3u32, 1])
        .map(|(s, w)| ((s.addr, w), HttpEndpoint::new(client.clone(), s.addr)));
    Balancer::builder()
        .strategy(strategy)
        .rtt_estimate(RttEstimate::new(
            Duration::from_millis(30),
            Duration::from_secs(1),
        ))
        .static_weights(|&(_, weight): &(SocketAddr, u32)| f64::from(weight))
        .build(discover::fixed(keyed))
}

/// Each server's share of `requests` GETs sent by `callers` tasks at once.
async fn concurrent_spread<S>(
    balancer: &S,
    servers: &[support::TestServer],
    callers: usize,
    requests: usize,
) -> Vec<f64>
where
    S: tower::Service<http::Request<Body>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: std::fmt::Debug,
{
    let _alone = MEASURING.lock().await;
    let before: Vec<usize> = servers.iter().map(support::TestServer::hits).collect();
    let mut all = tokio::task::JoinSet::new();
    for _ in 0..callers {
        let balancer = balancer.clone();
        all.spawn(async move {
            for _ in 0..requests / callers {
                let response = balancer.clone().oneshot(get()).await;
                assert!(response.is_ok(), "{:?}", response.err());
            }
        });
    }
    while let Some(done) = all.join_next().await {
        assert!(done.is_ok());
    }
    servers
        .iter()
        .zip(before)
        .map(|(s, b)| (s.hits() - b) as f64 / requests as f64)
        .collect()
}

fn assert_3_to_1(shares: &[f64]) {
    assert!((shares[0] - 0.75).abs() <= 0.05, "{shares:.3?}");
    assert!((shares[1] - 0.25).abs() <= 0.05, "{shares:.3?}");
}

#[tokio::test]
async fn p2c_least_requests_follows_static_weights_with_one_caller() {
    let servers = support::servers(2, Duration::ZERO).await;
    let balancer = weighted_3_to_1(P2c::least_requests(), &servers);
    let shares = spread(&balancer, &servers, 2_000).await;
    println!("p2c least-requests, one caller: {shares:.3?}");
    assert_3_to_1(&shares);
}

#[tokio::test]
async fn p2c_peak_ewma_follows_static_weights_with_one_caller() {
    // Answers in 2 ms: on loopback in under a millisecond a scheduling
    // hiccup is a peak several times the latency, which Peak-EWMA rightly
    // takes for a slower server.
    let servers = support::servers(2, Duration::from_millis(2)).await;
    let balancer = weighted_3_to_1(P2c::peak_ewma(), &servers);
    let shares = spread(&balancer, &servers, 2_000).await;
    println!("p2c peak-ewma, one caller: {shares:.3?}");
    assert_3_to_1(&shares);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p2c_least_requests_follows_static_weights_under_16_callers() {
    let servers = support::servers(2, Duration::from_millis(2)).await;
    let balancer = weighted_3_to_1(P2c::least_requests(), &servers);
    let shares = concurrent_spread(&balancer, &servers, 16, 2_000).await;
    println!("p2c least-requests, 16 callers: {shares:.3?}");
    assert_3_to_1(&shares);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p2c_peak_ewma_follows_static_weights_under_16_callers() {
    let servers = support::servers(2, Duration::from_millis(2)).await;
    let balancer = weighted_3_to_1(P2c::peak_ewma(), &servers);
    let shares = concurrent_spread(&balancer, &servers, 16, 2_000).await;
    println!("p2c peak-ewma, 16 callers: {shares:.3?}");
    assert_3_to_1(&shares);
}
