//! How strategies spread requests over real hyper servers on loopback:
//! retries under round robin, new and recovered endpoints under P2C
//! Peak-EWMA.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use tower::{ServiceBuilder, ServiceExt};
use tower_lb::http::{self as lb_http, HttpEndpoint};
use tower_lb::load::RttEstimate;
use tower_lb::retry::{Backoff, ReplayBody, ReplayLayer, RetryBudget, RetryLayer, RetryPolicy};
use tower_lb::strategy::{P2c, RoundRobin};
use tower_lb::{discover, Balancer};

use support::{get, Body, TestServer};

/// Held by the tests that measure shares, and by the one that loads the
/// machine: measured while another test in this binary keeps both cores
/// busy, latency estimates are mostly scheduling noise.
static MEASURING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Requests over which a share is measured: an endpoint with a fair fifth
/// gets 300 +- 15 of them, so 0.8x (240) is about four deviations below:
/// bad luck alone fails the test about once in 10,000 runs.
const SHARE_WINDOW: usize = 1_500;

/// How long the servers take to answer in the share tests. Long beside the
/// timer's 1 ms tick (a 1 ms sleep takes 1 to 2 ms): identical servers
/// should measure alike within the 25 % P2C takes for noise.
const ANSWER_IN: Duration = Duration::from_millis(5);

/// When an estimate is stale here (10 s by default). Short, so that an
/// endpoint whose estimate caught a scheduling hiccup (on a busy machine,
/// 9 ms where its peers measure 7) is out of rotation for a fraction of
/// the window at most, and the shares measure how new and recovered
/// endpoints are treated rather than that noise.
const STALE_AFTER: Duration = Duration::from_millis(250);

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

/// The endpoints (0 to 9) that `calls` requests sent one by one went to,
/// through P2C least-requests seeded with `seed`: every endpoint is idle at
/// each pick, so the picks are the seeded draws themselves.
async fn seeded_picks(seed: u64, calls: usize) -> Vec<usize> {
    let endpoints = (0..10usize).map(|i| {
        let answer = tower::service_fn(move |_: ()| async move { Ok::<_, Infallible>(i) });
        (i, answer)
    });
    let balancer = Balancer::builder()
        .strategy(P2c::least_requests())
        .seed(seed)
        .build(discover::fixed(endpoints));
    let mut picks = Vec::with_capacity(calls);
    for _ in 0..calls {
        picks.push(
            balancer
                .clone()
                .oneshot(())
                .await
                .unwrap_or_else(|e| panic!("{e}")),
        );
    }
    picks
}

#[tokio::test]
async fn balancers_with_consecutive_seeds_pick_independently() {
    let _alone = MEASURING.lock().await;
    let mut runs = Vec::new();
    for seed in 1..=20 {
        runs.push(seeded_picks(seed, 200).await);
    }
    assert_eq!(
        runs[0],
        seeded_picks(1, 200).await,
        "a seed repeats its picks"
    );
    let mut most = 0;
    for (i, a) in runs.iter().enumerate() {
        for (j, b) in runs.iter().enumerate() {
            for shift in 1..=3 {
                let agree = a.iter().zip(&b[shift..]).filter(|(x, y)| x == y).count();
                most = most.max(agree);
                // Independent picks among 10 agree about a tenth of the time.
                assert!(
                    agree <= 100,
                    "seeds {} and {}: {agree} picks agree after a shift of {shift}",
                    i + 1,
                    j + 1
                );
            }
        }
    }
    println!("most picks two seeds agree on after a shift of 1 to 3: {most} of 199");
}

/// P2C Peak-EWMA (the default) over a push channel, outlier detection off,
/// with estimates stale after [`STALE_AFTER`] (10 s by default).
fn peak_ewma_over_channel() -> (
    tower_lb::discover::DiscoveryHandle<SocketAddr, HttpEndpoint<Body>>,
    Balancer<SocketAddr, HttpEndpoint<Body>>,
) {
    let (handle, stream) = discover::channel();
    let balancer = Balancer::builder()
        .rtt_estimate(RttEstimate::DEFAULT.probe_after(STALE_AFTER))
        .build(stream);
    (handle, balancer)
}

fn insert(
    handle: &tower_lb::discover::DiscoveryHandle<SocketAddr, HttpEndpoint<Body>>,
    http: &hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        Body,
    >,
    server: &TestServer,
) {
    handle
        .insert(server.addr, HttpEndpoint::new(http.clone(), server.addr))
        .unwrap_or_else(|e| panic!("{e}"));
}

/// Sends `n` GETs one by one.
async fn send_one_by_one<S>(balancer: &S, n: usize)
where
    S: tower::Service<http::Request<Body>> + Clone,
    S::Error: std::fmt::Debug,
{
    for _ in 0..n {
        let response = balancer.clone().oneshot(get()).await;
        assert!(response.is_ok(), "{:?}", response.err());
    }
}

/// `hits` of one server over the mean of `others`' since `before`.
fn relative_share(server: usize, others: &[usize], hits: &[usize], before: &[usize]) -> f64 {
    let got = |i: usize| (hits[i] - before[i]) as f64;
    let mean = others.iter().map(|&i| got(i)).sum::<f64>() / others.len() as f64;
    got(server) / mean.max(1.0)
}

#[tokio::test]
async fn every_endpoint_of_a_new_balancer_gets_requests_from_one_caller_at_once() {
    let servers = support::servers(3, Duration::ZERO).await;
    let http = lb_http::client();
    let balancer = Balancer::builder().build(discover::fixed(lb_http::endpoints(
        &http,
        servers.iter().map(|s| s.addr),
    )));
    support::wait_until(Duration::from_secs(1), || balancer.endpoints().len() == 3).await;
    // Well within the second before the balancer first computes a typical
    // estimate. Each of three gets none of 60 with a chance of 1 in 10^10.
    send_one_by_one(&balancer, 60).await;
    let hits: Vec<usize> = servers.iter().map(TestServer::hits).collect();
    assert!(hits.iter().all(|&h| h > 0), "{hits:?}");
}

#[tokio::test]
async fn a_new_endpoint_gets_its_share_within_20_requests_from_one_caller() {
    let _alone = MEASURING.lock().await;
    let servers = support::servers(5, ANSWER_IN).await;
    let http = lb_http::client();
    let (handle, balancer) = peak_ewma_over_channel();
    for server in &servers[..4] {
        insert(&handle, &http, server);
    }
    support::wait_until(Duration::from_secs(1), || balancer.endpoints().len() == 4).await;
    // Every old endpoint measured, for a second or so.
    send_one_by_one(&balancer, 200).await;
    insert(&handle, &http, &servers[4]);
    support::wait_until(Duration::from_secs(1), || balancer.endpoints().len() == 5).await;
    // Its share from the 21st request on. (Whether it had one of the first
    // 20 is chance: with a fair fifth, none in one run of 90.)
    send_one_by_one(&balancer, 20).await;
    let before: Vec<usize> = servers.iter().map(TestServer::hits).collect();
    send_one_by_one(&balancer, SHARE_WINDOW).await;
    let hits: Vec<usize> = servers.iter().map(TestServer::hits).collect();
    let relative = relative_share(4, &[0, 1, 2, 3], &hits, &before);
    println!("after 20 requests, the newcomer gets {relative:.2}x an old endpoint's share");
    assert!(
        relative >= 0.8,
        "{relative:.2}x: {hits:?} (before: {before:?})"
    );
}

#[tokio::test]
async fn a_recovered_endpoint_is_probed_within_the_bound_and_gets_its_share_back() {
    let _alone = MEASURING.lock().await;
    let servers = support::servers(4, ANSWER_IN).await;
    servers[0].set_delay(ANSWER_IN * 20);
    let http = lb_http::client();
    let (handle, balancer) = peak_ewma_over_channel();
    for server in &servers {
        insert(&handle, &http, server);
    }
    support::wait_until(Duration::from_secs(1), || balancer.endpoints().len() == 4).await;
    // Until the slow one has answered slowly, and some more.
    while servers[0].hits() == 0 {
        send_one_by_one(&balancer, 1).await;
    }
    send_one_by_one(&balancer, 100).await;
    // It recovers; its estimate still says 100 ms.
    servers[0].set_delay(ANSWER_IN);
    let recovered = tokio::time::Instant::now();
    let slow_hits = servers[0].hits();
    // A probe within the bound (plus the requests in between).
    while servers[0].hits() == slow_hits {
        assert!(
            recovered.elapsed() < STALE_AFTER * 2,
            "no probe {:?} after it recovered",
            STALE_AFTER * 2
        );
        send_one_by_one(&balancer, 1).await;
    }
    println!("probed {:?} after it recovered", recovered.elapsed());
    let before: Vec<usize> = servers.iter().map(TestServer::hits).collect();
    send_one_by_one(&balancer, SHARE_WINDOW).await;
    let hits: Vec<usize> = servers.iter().map(TestServer::hits).collect();
    let relative = relative_share(0, &[1, 2, 3], &hits, &before);
    println!("after its probe, it gets {relative:.2}x the others' share");
    assert!(
        relative >= 0.8,
        "{relative:.2}x: {hits:?} (before: {before:?})"
    );
}

/// `requests` GETs through `balancer` from 16 callers at once. Returns how
/// many each of `servers` received.
async fn from_16_callers<S>(balancer: S, servers: &[TestServer], requests: usize) -> Vec<usize>
where
    S: tower::Service<http::Request<Body>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: std::fmt::Debug,
    S::Response: Send,
{
    let before: Vec<usize> = servers.iter().map(TestServer::hits).collect();
    let callers = (0..16).map(|caller| {
        let balancer = balancer.clone();
        tokio::spawn(async move {
            for _ in (caller..requests).step_by(16) {
                let response = balancer.clone().oneshot(get()).await;
                assert!(response.is_ok(), "{:?}", response.err());
            }
        })
    });
    for caller in callers.collect::<Vec<_>>() {
        caller.await.unwrap_or_else(|e| panic!("{e}"));
    }
    servers
        .iter()
        .zip(before)
        .map(|(server, before)| server.hits() - before)
        .collect()
}

/// `p2c` over `servers` with HTTP classification (5xx are failures), no
/// outlier detection and no retries: `requests` GETs from 16 callers at
/// once. Returns each server's hits.
async fn p2c_from_16_callers(p2c: P2c, servers: &[TestServer], requests: usize) -> Vec<usize> {
    let http = lb_http::client();
    let balancer = Balancer::builder()
        .strategy(p2c)
        .classify(tower_lb::classify::HttpClassify::server_errors())
        .build(discover::fixed(lb_http::endpoints(
            &http,
            servers.iter().map(|s| s.addr),
        )));
    from_16_callers(balancer, servers, requests).await
}

#[tokio::test]
async fn a_server_failing_fast_gets_little_traffic_under_p2c_without_outlier_detection() {
    let _alone = MEASURING.lock().await;
    // Seven answer in 5 ms; one answers 503 at once, which looked like the
    // fastest server to P2C, and took 20 - 25 % of the requests.
    let servers = support::servers(8, ANSWER_IN).await;
    servers[0].set_delay(Duration::ZERO);
    servers[0].fail_every(1);
    for p2c in [P2c::peak_ewma(), P2c::least_requests()] {
        let hits = p2c_from_16_callers(p2c, &servers, SHARE_WINDOW).await;
        let share = hits[0] as f64 / hits.iter().sum::<usize>() as f64;
        println!(
            "{p2c:?}: the failing server got {:.1} % ({hits:?})",
            share * 100.0
        );
        // A fair eighth would be 12.5 %.
        assert!(share <= 0.06, "{p2c:?}: {:.1} % ({hits:?})", share * 100.0);
    }
}

#[tokio::test]
async fn a_server_answering_429_gets_little_traffic_and_is_never_held_against_it() {
    let _alone = MEASURING.lock().await;
    // Too many requests, at once: busy, not sick.
    let servers = support::servers(8, ANSWER_IN).await;
    servers[0].set_delay(Duration::ZERO);
    servers[0].fail_with(429);
    servers[0].fail_every(1);
    let http = lb_http::client();
    let balancer = Balancer::builder()
        .classify(tower_lb::classify::HttpClassify::server_errors())
        .outlier_detection(tower_lb::health::OutlierDetection::default())
        .build(discover::fixed(lb_http::endpoints(
            &http,
            servers.iter().map(|s| s.addr),
        )));
    let hits = from_16_callers(balancer.clone(), &servers, SHARE_WINDOW).await;
    let share = hits[0] as f64 / hits.iter().sum::<usize>() as f64;
    println!(
        "the server answering 429 got {:.1} % ({hits:?})",
        share * 100.0
    );
    assert!(share <= 0.06, "{:.1} % ({hits:?})", share * 100.0);
    let busy = balancer
        .endpoints()
        .into_iter()
        .find(|e| e.key == servers[0].addr)
        .unwrap_or_else(|| panic!("endpoint known"));
    assert_eq!(
        (busy.failures, busy.state),
        (0, tower_lb::EndpointState::Active),
        "{busy:?}"
    );
}
