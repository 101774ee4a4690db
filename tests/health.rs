//! Outcome classification and outlier detection against real hyper servers on
//! loopback. Traffic runs in real time; where a test needs the driver's
//! timers to be exact it pauses tokio's clock afterwards and advances it.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::ServiceExt;
use tower_lb::classify::HttpClassify;
use tower_lb::discover;
use tower_lb::health::{FailurePercentage, LatencyOutliers, OutlierDetection, SuccessRate};
use tower_lb::http::{self as lb_http, HttpEndpoint};
use tower_lb::strategy::RoundRobin;
use tower_lb::{Balancer, EndpointState, EndpointStats};

use support::{get, servers, wait_until, Body, GrpcTrailersServer, TestServer};

type Endpoint = HttpEndpoint<Body>;
type HttpBalancer = Balancer<SocketAddr, Endpoint, RoundRobin, HttpClassify>;

const WAIT: Duration = Duration::from_secs(5);

/// Round robin (so that who gets what is predictable), 5xx as failures.
fn builder(detection: OutlierDetection) -> tower_lb::Builder<RoundRobin, HttpClassify> {
    Balancer::builder()
        .strategy(RoundRobin::new())
        .classify(HttpClassify::server_errors())
        .outlier_detection(detection)
}

fn balancer(
    detection: OutlierDetection,
    addrs: impl IntoIterator<Item = SocketAddr>,
) -> HttpBalancer {
    let client = lb_http::client();
    builder(detection).build(discover::fixed(lb_http::endpoints(&client, addrs)))
}

type Handle = discover::DiscoveryHandle<SocketAddr, Endpoint>;
type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Body>;

/// A balancer over a discovery channel, with `servers` inserted.
async fn channel_balancer(servers: &[TestServer], client: &HttpClient) -> (Handle, HttpBalancer) {
    let (handle, stream) = discover::channel();
    let balancer = builder(OutlierDetection::new()).build(stream);
    insert_all(&handle, servers, client);
    ready(&balancer, servers.len()).await;
    (handle, balancer)
}

fn insert_all(handle: &Handle, servers: &[TestServer], client: &HttpClient) {
    for server in servers {
        handle
            .insert(server.addr, HttpEndpoint::new(client.clone(), server.addr))
            .unwrap();
    }
}

fn addrs(servers: &[TestServer]) -> Vec<SocketAddr> {
    servers.iter().map(|s| s.addr).collect()
}

async fn ready<P: tower_lb::strategy::Strategy, C>(
    balancer: &Balancer<SocketAddr, Endpoint, P, C>,
    n: usize,
) {
    wait_until(WAIT, || balancer.endpoints().len() == n).await;
}

/// Sends `n` GETs one after another, reading each body to its end; returns
/// how many were answered 503.
async fn send(balancer: &HttpBalancer, n: usize) -> usize {
    let mut unavailable = 0;
    for _ in 0..n {
        let response = balancer.clone().oneshot(get()).await.expect("response");
        if response.status() == 503 {
            unavailable += 1;
        }
        response.into_body().collect().await.expect("body");
    }
    unavailable
}

fn stats_of<P: tower_lb::strategy::Strategy, C>(
    balancer: &Balancer<SocketAddr, Endpoint, P, C>,
    addr: SocketAddr,
) -> EndpointStats<SocketAddr> {
    balancer
        .endpoints()
        .into_iter()
        .find(|e| e.key == addr)
        .expect("endpoint known")
}

fn ejected(balancer: &HttpBalancer) -> Vec<SocketAddr> {
    balancer
        .endpoints()
        .into_iter()
        .filter(|e| e.state == EndpointState::Ejected)
        .map(|e| e.key)
        .collect()
}

/// Only the interval detectors: consecutive failures off.
fn interval_only() -> OutlierDetection {
    OutlierDetection::new()
        .interval(INTERVAL)
        .consecutive_failures(None)
        .success_rate(None)
        .max_ejection_percent(100)
}

/// The interval of the tests of interval detectors.
const INTERVAL: Duration = Duration::from_secs(10);

/// A balancer over `all` with `detection` (built on [`interval_only`]); sends
/// `requests` and lets one interval pass. The clock stays paused.
async fn after_one_interval(
    all: &[TestServer],
    detection: OutlierDetection,
    requests: usize,
) -> HttpBalancer {
    let balancer = balancer(detection, addrs(all));
    ready(&balancer, all.len()).await;
    send(&balancer, requests).await;
    run_one_interval(INTERVAL).await;
    balancer
}

/// Lets the driver's next interval run on a paused clock.
async fn run_one_interval(detection_interval: Duration) {
    tokio::time::pause();
    tokio::time::advance(detection_interval).await;
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_answering_only_503_is_ejected_after_exactly_five_consecutive_failures() {
    let all = servers(3, Duration::ZERO).await;
    all[1].fail_every(1);
    let balancer = balancer(OutlierDetection::new(), addrs(&all));
    ready(&balancer, 3).await;

    let unavailable = send(&balancer, 60).await;

    assert_eq!(all[1].hits(), 5);
    assert_eq!(unavailable, 5);
    wait_until(WAIT, || ejected(&balancer) == vec![all[1].addr]).await;
    let stats = stats_of(&balancer, all[1].addr);
    assert_eq!((stats.failures, stats.ejections), (5, 1));
    assert!(stats.returns_in.expect("ejected") <= Duration::from_secs(30));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_success_resets_the_consecutive_failure_count() {
    let all = servers(1, Duration::ZERO).await;
    // Four failures, a success, four failures: never five in a row.
    let balancer = balancer(OutlierDetection::new(), addrs(&all));
    ready(&balancer, 1).await;
    all[0].fail_every(1);
    send(&balancer, 4).await;
    all[0].fail_every(0);
    send(&balancer, 1).await;
    all[0].fail_every(1);
    send(&balancer, 4).await;

    let stats = stats_of(&balancer, all[0].addr);
    assert_eq!((stats.failures, stats.successes), (8, Some(1)));
    assert_eq!(stats.state, EndpointState::Active);
    assert_eq!(stats.ejections, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_errors_do_not_count_as_failures() {
    let all = servers(1, Duration::ZERO).await;
    let balancer = balancer(OutlierDetection::new(), addrs(&all));
    ready(&balancer, 1).await;
    for _ in 0..10 {
        let request = http::Request::get("/missing")
            .header("x-want-status", "404")
            .body(Body::new())
            .unwrap();
        balancer.clone().oneshot(request).await.expect("response");
    }
    let stats = stats_of(&balancer, all[0].addr);
    assert_eq!((stats.successes, stats.failures), (Some(10), 0));
}

#[tokio::test]
async fn success_rate_detector_ejects_the_backend_at_half_errors_among_six_healthy_ones() {
    let all = servers(7, Duration::ZERO).await;
    all[6].fail_every(2);
    let detection = interval_only().success_rate(Some(SuccessRate::new()));

    let balancer = after_one_interval(&all, detection, 7 * 120).await;

    wait_until(WAIT, || !ejected(&balancer).is_empty()).await;
    assert_eq!(ejected(&balancer), vec![all[6].addr]);
}

#[tokio::test]
async fn success_rate_detector_ejects_nobody_when_all_are_healthy() {
    let all = servers(7, Duration::ZERO).await;
    let detection = interval_only().success_rate(Some(SuccessRate::new()));

    let balancer = after_one_interval(&all, detection, 7 * 120).await;
    // Two more ticks' worth of waiting: still nobody.
    tokio::time::sleep(INTERVAL * 2).await;

    assert!(ejected(&balancer).is_empty());
}

#[tokio::test]
async fn failure_percentage_detector_ejects_a_backend_above_the_threshold() {
    let all = servers(6, Duration::ZERO).await;
    all[2].fail_every(1);
    let detection = interval_only().failure_percentage(Some(FailurePercentage::new()));

    let balancer = after_one_interval(&all, detection, 6 * 60).await;

    wait_until(WAIT, || !ejected(&balancer).is_empty()).await;
    assert_eq!(ejected(&balancer), vec![all[2].addr]);
}

/// Trips the consecutive-failure detector on `server` (which must be failing
/// every request) and waits until the driver has ejected it.
async fn eject(balancer: &HttpBalancer, server: &TestServer) {
    let before = stats_of(balancer, server.addr).ejections;
    let endpoints = balancer.endpoints().len();
    send(balancer, 5 * endpoints).await;
    wait_until(WAIT, || {
        let stats = stats_of(balancer, server.addr);
        stats.state == EndpointState::Ejected && stats.ejections == before + 1
    })
    .await;
}

#[tokio::test]
async fn ejection_expires_and_a_second_one_lasts_twice_as_long() {
    let all = servers(3, Duration::ZERO).await;
    all[0].fail_every(1);
    let base = Duration::from_secs(10);
    // Intervals far apart, so no multiplier decay happens in between.
    let detection = OutlierDetection::new()
        .base_ejection_time(base)
        .interval(Duration::from_secs(3600));
    let balancer = balancer(detection, addrs(&all));
    ready(&balancer, 3).await;

    eject(&balancer, &all[0]).await;
    tokio::time::pause();
    let first = stats_of(&balancer, all[0].addr)
        .returns_in
        .expect("ejected");
    assert!(
        first <= base && first > base - Duration::from_secs(1),
        "{first:?}"
    );
    tokio::time::advance(first - Duration::from_millis(1)).await;
    assert_eq!(
        stats_of(&balancer, all[0].addr).state,
        EndpointState::Ejected
    );
    tokio::time::advance(Duration::from_millis(1)).await;
    wait_until(WAIT, || {
        stats_of(&balancer, all[0].addr).state == EndpointState::Active
    })
    .await;
    tokio::time::resume();

    eject(&balancer, &all[0]).await;
    tokio::time::pause();
    let second = stats_of(&balancer, all[0].addr)
        .returns_in
        .expect("ejected");
    assert!(
        second <= base * 2 && second > base * 2 - Duration::from_secs(1),
        "{second:?}"
    );
    tokio::time::advance(second - Duration::from_millis(1)).await;
    assert_eq!(
        stats_of(&balancer, all[0].addr).state,
        EndpointState::Ejected
    );
    tokio::time::advance(Duration::from_millis(1)).await;
    wait_until(WAIT, || {
        stats_of(&balancer, all[0].addr).state == EndpointState::Active
    })
    .await;
    assert_eq!(stats_of(&balancer, all[0].addr).ejections, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_ejection_percent_caps_how_many_are_out_at_once() {
    let all = servers(5, Duration::ZERO).await;
    for server in &all[..3] {
        server.fail_every(1);
    }
    let balancer = balancer(
        OutlierDetection::new().max_ejection_percent(40),
        addrs(&all),
    );
    ready(&balancer, 5).await;

    send(&balancer, 200).await;
    wait_until(WAIT, || ejected(&balancer).len() == 2).await;
    let hits_before: Vec<usize> = all.iter().map(TestServer::hits).collect();
    send(&balancer, 60).await;

    assert_eq!(ejected(&balancer).len(), 2);
    assert!(!balancer.is_panicking());
    // The third failing backend stays in service and keeps getting requests.
    let still_in: Vec<&TestServer> = all[..3]
        .iter()
        .filter(|s| !ejected(&balancer).contains(&s.addr))
        .collect();
    assert_eq!(still_in.len(), 1);
    let index = all.iter().position(|s| s.addr == still_in[0].addr).unwrap();
    assert!(all[index].hits() > hits_before[index]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panic_mode_balances_over_all_endpoints_when_most_are_ejected() {
    let all = servers(4, Duration::ZERO).await;
    for server in &all[..3] {
        server.fail_every(1);
    }
    let detection = OutlierDetection::new().max_ejection_percent(100);
    let balancer = balancer(detection, addrs(&all));
    ready(&balancer, 4).await;

    send(&balancer, 100).await;
    wait_until(WAIT, || ejected(&balancer).len() == 3).await;
    assert!(balancer.is_panicking());
    let hits_before: Vec<usize> = all.iter().map(TestServer::hits).collect();
    send(&balancer, 40).await;

    for (server, before) in all.iter().zip(hits_before) {
        assert_eq!(server.hits() - before, 10, "round robin over all four");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panic_threshold_zero_keeps_requests_off_ejected_endpoints() {
    let all = servers(4, Duration::ZERO).await;
    for server in &all[..3] {
        server.fail_every(1);
    }
    let client = lb_http::client();
    let balancer: HttpBalancer = builder(OutlierDetection::new().max_ejection_percent(100))
        .panic_threshold(0)
        .build(discover::fixed(lb_http::endpoints(&client, addrs(&all))));
    ready(&balancer, 4).await;

    send(&balancer, 100).await;
    wait_until(WAIT, || ejected(&balancer).len() == 3).await;
    let before = all[3].hits();
    send(&balancer, 40).await;

    assert!(!balancer.is_panicking());
    assert_eq!(all[3].hits() - before, 40);
}

#[tokio::test]
async fn a_healthy_interval_after_returning_brings_the_next_ejection_back_to_base() {
    let all = servers(3, Duration::ZERO).await;
    all[0].fail_every(1);
    let (base, interval) = (Duration::from_secs(10), Duration::from_secs(60));
    let detection = OutlierDetection::new()
        .base_ejection_time(base)
        .interval(interval);
    let balancer = balancer(detection, addrs(&all));
    ready(&balancer, 3).await;

    eject(&balancer, &all[0]).await;
    // Past the return (10 s) and the first interval (60 s), which finds it
    // in service: the multiplier drops from 1 to 0.
    run_one_interval(interval).await;
    wait_until(WAIT, || {
        stats_of(&balancer, all[0].addr).state == EndpointState::Active
    })
    .await;
    tokio::time::resume();
    eject(&balancer, &all[0]).await;

    let again = stats_of(&balancer, all[0].addr)
        .returns_in
        .expect("ejected");
    assert!(
        again <= base && again > base - Duration::from_secs(1),
        "{again:?}"
    );
}

#[tokio::test]
async fn panic_mode_ends_when_an_ejection_does() {
    let all = servers(2, Duration::ZERO).await;
    all[0].fail_every(1);
    let base = Duration::from_secs(10);
    let detection = OutlierDetection::new()
        .base_ejection_time(base)
        .max_ejection_percent(100);
    let balancer = balancer(detection, addrs(&all));
    ready(&balancer, 2).await;
    all[1].fail_every(1);
    send(&balancer, 20).await;
    wait_until(WAIT, || ejected(&balancer).len() == 2).await;
    assert!(balancer.is_panicking());

    tokio::time::pause();
    tokio::time::advance(base).await;
    wait_until(WAIT, || ejected(&balancer).is_empty()).await;
    assert!(!balancer.is_panicking());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_panic_mode_off_and_everything_ejected_requests_fail_at_once() {
    let all = servers(2, Duration::ZERO).await;
    for server in &all {
        server.fail_every(1);
    }
    let client = lb_http::client();
    let balancer: HttpBalancer = builder(OutlierDetection::new().max_ejection_percent(100))
        .panic_threshold(0)
        .build(discover::fixed(lb_http::endpoints(&client, addrs(&all))));
    ready(&balancer, 2).await;
    send(&balancer, 10).await;
    wait_until(WAIT, || ejected(&balancer).len() == 2).await;

    let started = std::time::Instant::now();
    let error = balancer
        .clone()
        .oneshot(get())
        .await
        .expect_err("nowhere to go");

    assert!(
        matches!(error, tower_lb::Error::AllEjected { endpoints: 2 }),
        "{error}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "no startup wait"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_service_for_an_ejected_key_stays_ejected() {
    let all = servers(2, Duration::ZERO).await;
    all[0].fail_every(1);
    let client = lb_http::client();
    let (handle, balancer) = channel_balancer(&all, &client).await;
    eject(&balancer, &all[0]).await;
    let before = stats_of(&balancer, all[0].addr)
        .returns_in
        .expect("ejected");

    // The same set again, as a stream that re-sends it on refresh would.
    insert_all(&handle, &all, &client);
    wait_until(WAIT, || {
        balancer
            .endpoints()
            .iter()
            .filter(|e| e.state == EndpointState::Draining)
            .count()
            == 0
            && balancer.endpoints().len() == 2
    })
    .await;
    let hits = all[0].hits();
    send(&balancer, 10).await;

    let stats = stats_of(&balancer, all[0].addr);
    assert_eq!((stats.state, stats.ejections), (EndpointState::Ejected, 1));
    assert!(stats.returns_in.expect("ejected") <= before);
    assert_eq!(all[0].hits(), hits, "still no requests");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interval_too_long_for_the_clock_disables_the_interval_detectors_only() {
    let all = servers(2, Duration::ZERO).await;
    all[0].fail_every(1);
    let balancer = balancer(OutlierDetection::new().interval(Duration::MAX), addrs(&all));
    ready(&balancer, 2).await;

    send(&balancer, 20).await;

    wait_until(WAIT, || ejected(&balancer) == vec![all[0].addr]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_endpoint_health_state_is_dropped() {
    let all = servers(2, Duration::ZERO).await;
    all[0].fail_every(1);
    let client = lb_http::client();
    let (handle, balancer) = channel_balancer(&all, &client).await;
    eject(&balancer, &all[0]).await;

    handle.remove(all[0].addr).unwrap();
    wait_until(WAIT, || balancer.endpoints().len() == 1).await;
    handle
        .insert(all[0].addr, HttpEndpoint::new(client.clone(), all[0].addr))
        .unwrap();
    wait_until(WAIT, || balancer.endpoints().len() == 2).await;

    let stats = stats_of(&balancer, all[0].addr);
    assert_eq!(stats.state, EndpointState::Active);
    assert_eq!(
        (stats.ejections, stats.failures, stats.returns_in),
        (0, 0, None)
    );
}

#[tokio::test]
async fn latency_detector_ejects_an_endpoint_far_slower_than_its_peers() {
    let mut all = servers(3, Duration::ZERO).await;
    all.push(TestServer::with_delay(Duration::from_millis(30)).await);
    let detection = interval_only().latency(Some(LatencyOutliers::new().intervals(2)));

    let balancer = after_one_interval(&all, detection, 40).await;
    assert!(
        ejected(&balancer).is_empty(),
        "one slow interval is not enough"
    );
    tokio::time::resume();
    send(&balancer, 40).await;
    run_one_interval(INTERVAL).await;

    wait_until(WAIT, || !ejected(&balancer).is_empty()).await;
    assert_eq!(ejected(&balancer), vec![all[3].addr]);
}

type GrpcBalancer =
    Balancer<SocketAddr, Endpoint, RoundRobin, HttpClassify<tower_lb::classify::GrpcClassifier>>;

async fn grpc_balancer(servers: &[GrpcTrailersServer]) -> GrpcBalancer {
    let client = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http::<Body>();
    let balancer = Balancer::builder()
        .strategy(RoundRobin::new())
        .classify(HttpClassify::grpc())
        .outlier_detection(OutlierDetection::new())
        .build(discover::fixed(
            servers
                .iter()
                .map(|s| (s.addr, HttpEndpoint::new(client.clone(), s.addr))),
        ));
    ready(&balancer, servers.len()).await;
    balancer
}

/// Sends `n` calls, reading each body to its trailers.
async fn grpc_calls(balancer: &GrpcBalancer, n: usize) {
    for _ in 0..n {
        let response = balancer.clone().oneshot(get()).await.expect("response");
        assert_eq!(response.status(), 200);
        let body = response.into_body().collect().await.expect("body");
        assert!(body.trailers().is_some());
    }
}

const UNAVAILABLE: u64 = 14;
const INVALID_ARGUMENT: u64 = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unavailable_in_trailers_counts_as_a_failure_and_ejects() {
    let mut all = Vec::new();
    for status in [0, UNAVAILABLE, 0] {
        all.push(GrpcTrailersServer::start(status).await);
    }
    let balancer = grpc_balancer(&all).await;

    grpc_calls(&balancer, 45).await;

    assert_eq!(all[1].hits(), 5);
    wait_until(WAIT, || {
        stats_of(&balancer, all[1].addr).state == EndpointState::Ejected
    })
    .await;
    assert_eq!(stats_of(&balancer, all[0].addr).failures, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_invalid_argument_in_trailers_is_not_the_servers_fault() {
    let mut all = Vec::new();
    for status in [0, INVALID_ARGUMENT, 0] {
        all.push(GrpcTrailersServer::start(status).await);
    }
    let balancer = grpc_balancer(&all).await;

    grpc_calls(&balancer, 30).await;

    let stats = stats_of(&balancer, all[1].addr);
    assert_eq!(all[1].hits(), 10);
    assert_eq!((stats.successes, stats.failures), (Some(10), 0));
    assert_eq!(stats.state, EndpointState::Active);
}

#[tokio::test]
async fn an_endpoint_back_from_ejection_ramps_up_in_slow_start() {
    let all = servers(3, Duration::ZERO).await;
    all[0].fail_every(1);
    let base = Duration::from_secs(10);
    let detection = OutlierDetection::new()
        .base_ejection_time(base)
        .interval(Duration::from_secs(3600));
    let balancer = builder(detection)
        .slow_start(tower_lb::health::SlowStart::new(Duration::from_secs(30)))
        .build(discover::fixed(lb_http::endpoints(
            &lb_http::client(),
            addrs(&all),
        )));
    ready(&balancer, 3).await;
    tokio::time::pause();
    // Past the slow start every endpoint begins with.
    tokio::time::advance(Duration::from_secs(31)).await;
    wait_until(WAIT, || {
        balancer
            .endpoints()
            .iter()
            .all(|e| e.slow_start_factor == 1.0)
    })
    .await;
    tokio::time::resume();

    eject(&balancer, &all[0]).await;
    all[0].fail_every(0);
    tokio::time::pause();
    tokio::time::advance(base).await;
    wait_until(WAIT, || {
        stats_of(&balancer, all[0].addr).state == EndpointState::Active
    })
    .await;
    assert_eq!(stats_of(&balancer, all[0].addr).slow_start_factor, 0.1);
    assert_eq!(stats_of(&balancer, all[1].addr).slow_start_factor, 1.0);
    tokio::time::advance(Duration::from_secs(15)).await;
    wait_until(WAIT, || {
        let factor = stats_of(&balancer, all[0].addr).slow_start_factor;
        factor > 0.45 && factor <= 0.55
    })
    .await;
    tokio::time::advance(Duration::from_secs(16)).await;
    wait_until(WAIT, || {
        stats_of(&balancer, all[0].addr).slow_start_factor == 1.0
    })
    .await;
}
