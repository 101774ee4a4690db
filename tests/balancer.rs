//! The balancer against real hyper servers on loopback.
//!
//! The tests of the whole HTTP path run twice: `hand_built::*` against a
//! bare `Balancer` over `HttpEndpoint`s, `one_stop::*` against
//! `tower_lb::client::HttpClient` with the same strategy and the layers the
//! bare balancer lacks turned off (see [`bare`]). The few tests of the
//! balancer's own mechanics (a custom strategy) run against it alone.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http_body_util::BodyExt;
use tokio::sync::mpsc;
use tower::ServiceExt;
use tower_lb::client::{ClientBuilder, HttpClient};
use tower_lb::discover::{self, Change};
use tower_lb::http::{self as lb_http, HttpEndpoint};
use tower_lb::load::{LatencyClock, RttEstimate};
use tower_lb::strategy::{P2c, RoundRobin, Strategy};
use tower_lb::{Balancer, BoxError, EndpointState, Error};

use support::{
    find_error, get, refusing_addr, servers, wait_until, Body, CapturedLogs, Discovery, Lb,
    Registry, StackKind, TestServer,
};

type Endpoint = HttpEndpoint<Body>;

fn endpoint(addr: SocketAddr) -> Endpoint {
    HttpEndpoint::new(lb_http::client(), addr)
}

fn addrs(servers: &[TestServer]) -> Vec<SocketAddr> {
    servers.iter().map(|s| s.addr).collect()
}

/// The one-stop client as bare as the hand-built balancer: no outlier
/// detection, no retries, no per-attempt timeout, no deadline. It keeps its
/// own classifier (5xx are failures), which these servers never answer.
fn bare<T, P: Strategy, C, H, W>(
    builder: ClientBuilder<T, tower_lb::balance::Builder<P, C, H, W>>,
) -> ClientBuilder<T, tower_lb::balance::Builder<P, C, H, W>> {
    builder
        .no_outlier_detection()
        .no_retries()
        .no_attempt_timeout()
        .no_deadline()
}

/// `strategy` over a fixed list of addresses.
fn fixed<P: Strategy>(
    kind: StackKind,
    strategy: P,
    addrs: impl IntoIterator<Item = SocketAddr>,
) -> Lb {
    match kind {
        StackKind::HandBuilt => {
            let client = lb_http::client();
            Lb::hand_built(
                Balancer::builder()
                    .strategy(strategy)
                    .build(discover::fixed(lb_http::endpoints(&client, addrs))),
            )
        }
        StackKind::OneStop => {
            Lb::one_stop(bare(HttpClient::builder()).strategy(strategy).build(addrs))
        }
    }
}

/// `strategy` over a discovery channel (see [`Registry::new`]).
fn over<K, P>(discovery: Discovery<K>, strategy: P) -> Lb<K>
where
    K: std::hash::Hash + Eq + Clone + std::fmt::Debug + Send + Sync + 'static,
    P: Strategy,
{
    over_waiting(discovery, strategy, Duration::from_secs(5))
}

/// `strategy` over a discovery channel, a request waiting up to
/// `startup_wait` for the first endpoint.
fn over_waiting<K, P>(discovery: Discovery<K>, strategy: P, startup_wait: Duration) -> Lb<K>
where
    K: std::hash::Hash + Eq + Clone + std::fmt::Debug + Send + Sync + 'static,
    P: Strategy,
{
    match discovery {
        Discovery::HandBuilt(stream) => Lb::hand_built(
            Balancer::builder()
                .strategy(strategy)
                .startup_wait(startup_wait)
                .build(stream),
        ),
        Discovery::OneStop(stream) => Lb::one_stop(
            bare(HttpClient::builder())
                .strategy(strategy)
                .balancer(|b| b.startup_wait(startup_wait))
                .build_discover(stream),
        ),
    }
}

/// A discovery stream the test scripts item by item, errors included.
struct ScriptedOf<S>(mpsc::UnboundedReceiver<Result<Change<SocketAddr, S>, std::io::Error>>);

impl<S> futures_core::Stream for ScriptedOf<S> {
    type Item = Result<Change<SocketAddr, S>, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.0.poll_recv(cx)
    }
}

/// The sending end of a [`ScriptedOf`] stream, for either stack; dropping it
/// ends the stream.
enum Script {
    HandBuilt(mpsc::UnboundedSender<Result<Change<SocketAddr, Endpoint>, std::io::Error>>),
    OneStop(mpsc::UnboundedSender<Result<Change<SocketAddr, SocketAddr>, std::io::Error>>),
}

impl Script {
    /// A script, and a round-robin stack of `kind` reading it.
    fn round_robin(kind: StackKind) -> (Self, Lb) {
        match kind {
            StackKind::HandBuilt => {
                let (tx, rx) = mpsc::unbounded_channel();
                let balancer = Balancer::builder()
                    .strategy(RoundRobin::new())
                    .build(ScriptedOf(rx));
                (Script::HandBuilt(tx), Lb::hand_built(balancer))
            }
            StackKind::OneStop => {
                let (tx, rx) = mpsc::unbounded_channel();
                let client = bare(HttpClient::builder())
                    .strategy(RoundRobin::new())
                    .build_discover(ScriptedOf(rx));
                (Script::OneStop(tx), Lb::one_stop(client))
            }
        }
    }

    fn insert(&self, addr: SocketAddr) {
        let sent = match self {
            Script::HandBuilt(tx) => tx.send(Ok(Change::Insert(addr, endpoint(addr)))).is_ok(),
            Script::OneStop(tx) => tx.send(Ok(Change::Insert(addr, addr))).is_ok(),
        };
        assert!(sent, "the stack reads the script");
    }

    fn fail(&self, message: &str) {
        let sent = match self {
            Script::HandBuilt(tx) => tx.send(Err(std::io::Error::other(message))).is_ok(),
            Script::OneStop(tx) => tx.send(Err(std::io::Error::other(message))).is_ok(),
        };
        assert!(sent, "the stack reads the script");
    }
}

/// Sends one GET and reads the whole body; any failure is an error.
async fn roundtrip<K: 'static>(lb: &Lb<K>) -> Result<(), BoxError> {
    let response = lb.send(get()).await?;
    assert_eq!(response.status(), 200);
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    assert_eq!(&body[..], b"ok");
    Ok(())
}

// The tests of the whole HTTP path: each body below runs as
// `hand_built::<name>` and `one_stop::<name>`.
support::for_both_stacks! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    round_robin_spreads_requests_exactly_evenly,
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    p2c_sends_requests_to_every_endpoint,
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    removed_endpoint_gets_no_new_requests_and_its_in_flight_requests_complete,
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    inserts_and_removes_under_steady_load_fail_no_request,
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    request_waits_for_the_first_endpoint_then_succeeds,
    #[tokio::test(start_paused = true)]
    request_fails_with_no_endpoints_after_the_startup_wait,
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    shutdown_refuses_new_requests_and_waits_for_in_flight_ones,
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    shutdown_gives_up_after_its_timeout_and_says_how_many_are_left,
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    ten_thousand_requests_from_64_tasks_are_each_answered_once,
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    slow_endpoint_gets_far_fewer_requests_under_peak_ewma_than_round_robin,
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    dropping_a_response_future_releases_its_in_flight_count,
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    refused_connection_is_an_endpoint_error_marked_never_sent,
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    duplicate_insert_replaces_the_service_and_the_old_one_drains,
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    removing_an_unknown_endpoint_changes_nothing,
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    discovery_error_keeps_the_last_endpoints_and_later_changes_still_apply,
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    ended_discovery_stream_keeps_the_last_endpoints,
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    driver_stops_when_the_last_handle_is_dropped,
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    duration_max_means_wait_forever_not_overflow,
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    absolute_uri_keeps_its_authority_as_the_host_header,
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    https_request_through_a_plain_http_endpoint_is_refused_and_never_sent,
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    connect_request_is_refused_and_never_sent,
    #[tokio::test]
    a_second_attempt_of_a_call_goes_to_an_endpoint_the_call_has_not_tried,
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    an_empty_list_fails_requests_at_once_with_a_clear_error,
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    an_empty_set_pushed_at_startup_fails_requests_at_once,
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    a_set_emptied_by_discovery_fails_requests_at_once_until_an_endpoint_returns,
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    the_end_of_a_fixed_list_is_logged_at_debug_not_info,
    #[tokio::test]
    a_shut_down_stack_logs_no_ejection_over_afterwards,
}

async fn round_robin_spreads_requests_exactly_evenly(kind: StackKind) {
    let servers = servers(4, Duration::ZERO).await;
    let lb = fixed(kind, RoundRobin::new(), addrs(&servers));
    for _ in 0..400 {
        roundtrip(&lb).await.expect("request succeeds");
    }
    let hits: Vec<usize> = servers.iter().map(TestServer::hits).collect();
    assert_eq!(hits, [100, 100, 100, 100]);
}

async fn p2c_sends_requests_to_every_endpoint(kind: StackKind) {
    let servers = servers(4, Duration::from_millis(2)).await;
    for strategy in [P2c::least_requests(), P2c::peak_ewma()] {
        let lb = fixed(kind, strategy, addrs(&servers));
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let lb = lb.clone();
                tokio::spawn(async move {
                    for _ in 0..50 {
                        roundtrip(&lb).await.expect("request succeeds");
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("task");
        }
    }
    for server in &servers {
        assert!(
            server.hits() > 20,
            "every server gets a share: {}",
            server.hits()
        );
    }
}

async fn removed_endpoint_gets_no_new_requests_and_its_in_flight_requests_complete(
    kind: StackKind,
) {
    let slow = TestServer::with_delay(Duration::from_millis(400)).await;
    let fast = TestServer::start().await;
    let (registry, discovery) = Registry::new(kind);
    registry.insert(slow.addr, slow.addr);
    registry.insert(fast.addr, fast.addr);
    let lb = over(discovery, RoundRobin::new());

    let in_flight: Vec<_> = (0..10)
        .map(|_| {
            let lb = lb.clone();
            tokio::spawn(async move { roundtrip(&lb).await })
        })
        .collect();
    slow.wait_in_flight(5).await;

    registry.remove(slow.addr);
    wait_until(Duration::from_secs(2), || {
        lb.endpoints()
            .iter()
            .any(|e| e.key == slow.addr && e.state == EndpointState::Draining)
    })
    .await;
    let draining = lb
        .endpoints()
        .into_iter()
        .find(|e| e.key == slow.addr)
        .expect("the removed endpoint drains");
    assert_eq!(draining.in_flight, 5);

    for _ in 0..20 {
        roundtrip(&lb).await.expect("request succeeds");
    }
    assert_eq!(slow.hits(), 5, "the removed endpoint got no new request");

    for request in in_flight {
        request
            .await
            .expect("task")
            .expect("in-flight request completes");
    }
    wait_until(Duration::from_secs(2), || lb.endpoints().len() == 1).await;
    assert_eq!(lb.endpoints()[0].key, fast.addr);
    assert_eq!(lb.in_flight(), 0);
}

async fn inserts_and_removes_under_steady_load_fail_no_request(kind: StackKind) {
    let servers = servers(6, Duration::from_millis(1)).await;
    let addrs = addrs(&servers);
    let (registry, discovery) = Registry::new(kind);
    for &addr in &addrs[..3] {
        registry.insert(addr, addr);
    }
    let lb = over(discovery, P2c::peak_ewma());

    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let load: Vec<_> = (0..16)
        .map(|_| {
            let (lb, stop, sent) = (lb.clone(), stop.clone(), sent.clone());
            tokio::spawn(async move {
                let mut failures = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    if let Err(e) = roundtrip(&lb).await {
                        failures.push(tower_lb::error::report(&*e).to_string());
                    }
                    sent.fetch_add(1, Ordering::Relaxed);
                }
                failures
            })
        })
        .collect();

    // Churn: every step changes the set, never leaving it empty.
    for step in 0..40 {
        let a = addrs[step % 6];
        let b = addrs[(step + 3) % 6];
        match step % 4 {
            0 => registry.insert(b, b),
            1 => registry.remove(a),
            2 => registry.insert(a, a), // may be a duplicate insert
            _ => registry.replace_all([(a, a), (b, b)]),
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    stop.store(true, Ordering::Relaxed);

    let mut failures = Vec::new();
    for task in load {
        failures.extend(task.await.expect("task"));
    }
    assert!(failures.is_empty(), "failed requests: {failures:?}");
    assert!(sent.load(Ordering::Relaxed) > 500, "load was steady");
    wait_until(Duration::from_secs(2), || lb.in_flight() == 0).await;
}

async fn request_waits_for_the_first_endpoint_then_succeeds(kind: StackKind) {
    let server = TestServer::start().await;
    let (registry, discovery) = Registry::new(kind);
    let lb = over(discovery, P2c::peak_ewma());

    let started = tokio::time::Instant::now();
    let request = tokio::spawn({
        let lb = lb.clone();
        async move { roundtrip(&lb).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!request.is_finished(), "the request waits for an endpoint");

    registry.insert(server.addr, server.addr);
    request
        .await
        .expect("task")
        .expect("request succeeds once an endpoint exists");
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert_eq!(server.hits(), 1);
}

async fn request_fails_with_no_endpoints_after_the_startup_wait(kind: StackKind) {
    let (_registry, discovery) = Registry::<SocketAddr>::new(kind);
    let lb = over_waiting(discovery, P2c::peak_ewma(), Duration::from_millis(300));

    let err = lb.send(get()).await.expect_err("no endpoint ever appears");
    assert!(
        matches!(find_error(&*err), Some(Error::NoEndpoints { waited }) if *waited == Duration::from_millis(300)),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        "no endpoints available: none appeared within 300ms"
    );
}

async fn shutdown_refuses_new_requests_and_waits_for_in_flight_ones(kind: StackKind) {
    let server = TestServer::with_delay(Duration::from_millis(300)).await;
    let lb = fixed(kind, P2c::peak_ewma(), [server.addr]);

    let in_flight: Vec<_> = (0..4)
        .map(|_| {
            let lb = lb.clone();
            tokio::spawn(async move { roundtrip(&lb).await })
        })
        .collect();
    server.wait_in_flight(4).await;

    let shutdown = tokio::spawn({
        let lb = lb.clone();
        async move { lb.shutdown(Duration::from_secs(5)).await }
    });
    wait_until(Duration::from_secs(1), || lb.is_closed()).await;

    let refused = lb.send(get()).await.expect_err("closed");
    assert!(
        matches!(find_error(&*refused), Some(Error::Closed)),
        "{refused}"
    );
    assert!(
        !shutdown.is_finished(),
        "shutdown waits for in-flight requests"
    );

    for request in in_flight {
        request
            .await
            .expect("task")
            .expect("in-flight request completes");
    }
    shutdown.await.expect("task").expect("shutdown completes");
    assert_eq!(lb.in_flight(), 0);
    assert_eq!(server.hits(), 4);
}

async fn shutdown_gives_up_after_its_timeout_and_says_how_many_are_left(kind: StackKind) {
    let server = TestServer::with_delay(Duration::from_secs(30)).await;
    let lb = fixed(kind, P2c::peak_ewma(), [server.addr]);
    let _hung = tokio::spawn({
        let lb = lb.clone();
        async move { roundtrip(&lb).await }
    });
    server.wait_in_flight(1).await;

    let err = lb
        .shutdown(Duration::from_millis(200))
        .await
        .expect_err("a request is still in flight");
    assert!(
        matches!(err, Error::ShutdownTimedOut { in_flight: 1, waited } if waited >= Duration::from_millis(200)),
        "{err}"
    );
    assert!(
        err.to_string().contains("1 request still in flight"),
        "{err}"
    );
}

async fn ten_thousand_requests_from_64_tasks_are_each_answered_once(kind: StackKind) {
    const REQUESTS: usize = 10_000;
    const TASKS: usize = 64;
    let servers = servers(8, Duration::ZERO).await;
    let lb = fixed(kind, P2c::peak_ewma(), addrs(&servers));

    let tasks: Vec<_> = (0..TASKS)
        .map(|t| {
            let lb = lb.clone();
            let share = REQUESTS / TASKS + usize::from(t < REQUESTS % TASKS);
            tokio::spawn(async move {
                let mut ok = 0;
                for _ in 0..share {
                    roundtrip(&lb).await.expect("request succeeds");
                    ok += 1;
                }
                ok
            })
        })
        .collect();
    let mut answered = 0;
    for task in tasks {
        answered += task.await.expect("task");
    }

    assert_eq!(answered, REQUESTS);
    let received: usize = servers.iter().map(TestServer::hits).sum();
    assert_eq!(
        received, REQUESTS,
        "every request reached a server exactly once"
    );
    assert_eq!(lb.in_flight(), 0);
    let stats = lb.endpoints();
    assert_eq!(
        stats.iter().map(|e| e.requests).sum::<u64>(),
        REQUESTS as u64
    );
    assert!(stats.iter().all(|e| e.failures == 0 && e.in_flight == 0));
}

/// Share of `requests` that reached `slow`, with 8 concurrent senders.
async fn slow_share<P: Strategy>(
    kind: StackKind,
    strategy: P,
    servers: &[TestServer],
    slow: usize,
    requests: usize,
) -> f64 {
    let before = servers[slow].hits();
    let lb = fixed(kind, strategy, addrs(servers));
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let lb = lb.clone();
            tokio::spawn(async move {
                for _ in 0..requests / 8 {
                    roundtrip(&lb).await.expect("request succeeds");
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("task");
    }
    (servers[slow].hits() - before) as f64 / requests as f64
}

async fn slow_endpoint_gets_far_fewer_requests_under_peak_ewma_than_round_robin(kind: StackKind) {
    let servers = servers(4, Duration::from_millis(2)).await;
    servers[0].set_delay(Duration::from_millis(40));

    let round_robin = slow_share(kind, RoundRobin::new(), &servers, 0, 400).await;
    let peak_ewma = slow_share(kind, P2c::peak_ewma(), &servers, 0, 400).await;
    assert!(
        (round_robin - 0.25).abs() < 0.01,
        "round robin: {round_robin}"
    );
    assert!(
        peak_ewma < 0.08,
        "peak ewma sent {peak_ewma} of requests to the slow endpoint"
    );
}

async fn dropping_a_response_future_releases_its_in_flight_count(kind: StackKind) {
    let server = TestServer::with_delay(Duration::from_secs(30)).await;
    let lb = fixed(kind, P2c::least_requests(), [server.addr]);
    let mut future = Box::pin(lb.client().oneshot(get()));
    assert!(
        tokio::time::timeout(Duration::from_millis(100), &mut future)
            .await
            .is_err()
    );
    server.wait_in_flight(1).await;
    assert_eq!(lb.in_flight(), 1);

    drop(future);
    assert_eq!(lb.in_flight(), 0);
    let stats = &lb.endpoints()[0];
    assert_eq!(
        (stats.requests, stats.failures),
        (1, 0),
        "a cancelled request is no failure"
    );
}

async fn refused_connection_is_an_endpoint_error_marked_never_sent(kind: StackKind) {
    let addr = refusing_addr().await;
    let lb = fixed(kind, P2c::peak_ewma(), [addr]);
    let err = lb.send(get()).await.expect_err("nothing listens");

    assert!(
        matches!(find_error(&*err), Some(Error::Endpoint { .. })),
        "{err}"
    );
    assert!(tower_lb::error::is_never_sent(&*err), "{err}");
    let printed = tower_lb::error::report(&*err).to_string();
    assert!(printed.contains(&addr.to_string()), "{printed}");
    assert!(printed.contains("never sent"), "{printed}");
    assert_eq!(lb.endpoints()[0].failures, 1);
}

async fn duplicate_insert_replaces_the_service_and_the_old_one_drains(kind: StackKind) {
    const BACKEND: u32 = 7;
    let old = TestServer::with_delay(Duration::from_millis(300)).await;
    let new = TestServer::start().await;
    let (registry, discovery) = Registry::new(kind);
    registry.insert(BACKEND, old.addr);
    let lb = over(discovery, P2c::peak_ewma());

    let in_flight = tokio::spawn({
        let lb = lb.clone();
        async move { lb.send(get()).await.map(|r| r.status()) }
    });
    old.wait_in_flight(1).await;

    registry.insert(BACKEND, new.addr);
    wait_until(Duration::from_secs(2), || lb.endpoints().len() == 2).await;
    let states: Vec<_> = lb.endpoints().iter().map(|e| (e.key, e.state)).collect();
    assert_eq!(
        states,
        [
            (BACKEND, EndpointState::Active),
            (BACKEND, EndpointState::Draining)
        ]
    );

    for _ in 0..5 {
        lb.send(get()).await.expect("request succeeds");
    }
    assert_eq!((old.hits(), new.hits()), (1, 5));
    assert_eq!(
        in_flight
            .await
            .expect("task")
            .expect("old request completes"),
        200
    );
    wait_until(Duration::from_secs(2), || lb.endpoints().len() == 1).await;
}

async fn removing_an_unknown_endpoint_changes_nothing(kind: StackKind) {
    let server = TestServer::start().await;
    let (registry, discovery) = Registry::new(kind);
    registry.insert("known", server.addr);
    registry.remove("unknown");
    let lb = over(discovery, P2c::peak_ewma());

    lb.send(get()).await.expect("request succeeds");
    let keys: Vec<_> = lb.endpoints().iter().map(|e| e.key).collect();
    assert_eq!(keys, ["known"]);
}

async fn discovery_error_keeps_the_last_endpoints_and_later_changes_still_apply(kind: StackKind) {
    let (a, b) = (TestServer::start().await, TestServer::start().await);
    let (script, lb) = Script::round_robin(kind);
    script.insert(a.addr);
    roundtrip(&lb).await.expect("request succeeds");

    script.fail("registry unreachable");
    for _ in 0..10 {
        roundtrip(&lb).await.expect("requests still succeed");
    }
    assert_eq!(a.hits(), 11);

    script.insert(b.addr);
    wait_until(Duration::from_secs(2), || lb.endpoints().len() == 2).await;
    for _ in 0..10 {
        roundtrip(&lb).await.expect("request succeeds");
    }
    assert_eq!(b.hits(), 5);
}

async fn ended_discovery_stream_keeps_the_last_endpoints(kind: StackKind) {
    let servers = servers(2, Duration::ZERO).await;
    let (script, lb) = Script::round_robin(kind);
    for s in &servers {
        script.insert(s.addr);
    }
    drop(script); // the stream ends after the two inserts
    tokio::time::sleep(Duration::from_millis(50)).await;
    for _ in 0..10 {
        roundtrip(&lb).await.expect("request succeeds");
    }
    let hits: HashMap<_, _> = servers.iter().map(|s| (s.addr, s.hits())).collect();
    assert!(hits.values().all(|&h| h == 5), "{hits:?}");
}

async fn driver_stops_when_the_last_handle_is_dropped(kind: StackKind) {
    let (registry, discovery) = Registry::<SocketAddr>::new(kind);
    let lb = over(discovery, P2c::peak_ewma());
    let clone = lb.clone();
    drop(lb);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!registry.is_closed(), "a clone still holds the balancer");
    drop(clone);
    wait_until(Duration::from_secs(2), || registry.is_closed()).await;
}

// Against the hand-built balancer only: this is about the balancer's own
// snapshot race (a pick made on a set that discovery changed meanwhile),
// which sits below everything the one-stop client adds; with a custom
// strategy it would go through the same `Balancer::call`.

/// Blocks inside its first pick until the test opens the gate, so the test
/// can change the endpoints while a request holds an old snapshot.
struct GatedFirstPick {
    first: AtomicBool,
    entered: Arc<AtomicBool>,
    gate: Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>,
}

impl Strategy for GatedFirstPick {
    type Schedule = ();

    fn schedule<C: tower_lb::strategy::Candidates + ?Sized>(
        &self,
        _: &C,
        _: &tower_lb::strategy::PickContext<'_>,
    ) {
    }

    fn pick<C: tower_lb::strategy::Candidates + ?Sized>(
        &self,
        _: &(),
        _: &C,
        _: &tower_lb::strategy::PickContext<'_>,
    ) -> Option<usize> {
        if self.first.swap(false, Ordering::SeqCst) {
            self.entered.store(true, Ordering::SeqCst);
            let (open, opened) = &*self.gate;
            let mut open = open.lock().expect("lock");
            while !*open {
                open = opened.wait(open).expect("lock");
            }
        }
        Some(0)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_removed_while_a_request_picks_it_gets_no_request() {
    let (old, new) = (TestServer::start().await, TestServer::start().await);
    let (handle, stream) = discover::channel();
    handle
        .insert(1, endpoint(old.addr))
        .expect("the balancer is alive");
    let entered = Arc::new(AtomicBool::new(false));
    let gate = Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new()));
    let balancer = Balancer::builder()
        .strategy(GatedFirstPick {
            first: AtomicBool::new(true),
            entered: entered.clone(),
            gate: gate.clone(),
        })
        .build(stream);
    wait_until(Duration::from_secs(2), || balancer.endpoints().len() == 1).await;

    // The request loads the snapshot with `old` and stops inside the pick.
    let request = tokio::spawn({
        let balancer = balancer.clone();
        async move { balancer.oneshot(get()).await.map(|r| r.status()) }
    });
    wait_until(Duration::from_secs(2), || entered.load(Ordering::SeqCst)).await;

    // Meanwhile discovery replaces `old` by `new`; with nothing in flight,
    // `old` leaves the balancer entirely.
    handle
        .insert(2, endpoint(new.addr))
        .expect("the balancer is alive");
    handle.remove(1).expect("the balancer is alive");
    wait_until(Duration::from_secs(2), || {
        balancer
            .endpoints()
            .iter()
            .map(|e| e.key)
            .collect::<Vec<_>>()
            == [2]
    })
    .await;

    *gate.0.lock().expect("lock") = true;
    gate.1.notify_all();
    assert_eq!(request.await.expect("task").expect("request succeeds"), 200);
    assert_eq!(
        (old.hits(), new.hits()),
        (0, 1),
        "the stale pick was not used"
    );
    assert_eq!(balancer.in_flight(), 0);
}

async fn duration_max_means_wait_forever_not_overflow(kind: StackKind) {
    let server = TestServer::start().await;
    let (registry, discovery) = Registry::new(kind);
    let lb = over_waiting(discovery, P2c::peak_ewma(), Duration::MAX);
    let request = tokio::spawn({
        let lb = lb.clone();
        async move { roundtrip(&lb).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    registry.insert(server.addr, server.addr);
    request.await.expect("task").expect("request succeeds");
    lb.shutdown(Duration::MAX).await.expect("nothing in flight");
}

async fn absolute_uri_keeps_its_authority_as_the_host_header(kind: StackKind) {
    let server = TestServer::start().await;
    let lb = fixed(kind, RoundRobin::new(), [server.addr]);
    let request = http::Request::get("http://api.internal:8080/users?page=2")
        .body(Body::new())
        .expect("request");
    let response = lb.send(request).await.expect("request succeeds");
    assert_eq!(response.status(), 200);
    assert_eq!(server.last_host().as_deref(), Some("api.internal:8080"));
}

async fn https_request_through_a_plain_http_endpoint_is_refused_and_never_sent(kind: StackKind) {
    let server = TestServer::start().await;
    let lb = fixed(kind, RoundRobin::new(), [server.addr]);
    let request = http::Request::get("https://api.internal/secret")
        .body(Body::new())
        .expect("request");
    let err = lb.send(request).await.expect_err("refused");
    assert!(tower_lb::error::is_never_sent(&*err), "{err}");
    let printed = tower_lb::error::report(&*err).to_string();
    assert!(
        printed.contains("the request is for https but the endpoint speaks http"),
        "{printed}"
    );
    assert_eq!(server.hits(), 0);
}

async fn connect_request_is_refused_and_never_sent(kind: StackKind) {
    let server = TestServer::start().await;
    let lb = fixed(kind, RoundRobin::new(), [server.addr]);
    let request = http::Request::connect("example.com:443")
        .body(Body::new())
        .expect("request");
    let err = lb.send(request).await.expect_err("refused");
    assert!(tower_lb::error::is_never_sent(&*err), "{err}");
    assert_eq!(server.hits(), 0);
}

async fn a_second_attempt_of_a_call_goes_to_an_endpoint_the_call_has_not_tried(kind: StackKind) {
    let servers = servers(3, Duration::ZERO).await;
    let lb = match kind {
        StackKind::HandBuilt => {
            let client = lb_http::client();
            Lb::hand_built(
                Balancer::builder()
                    .strategy(P2c::least_requests())
                    .avoid_tried_endpoints()
                    .build(discover::fixed(lb_http::endpoints(
                        &client,
                        addrs(&servers),
                    ))),
            )
        }
        // The one-stop client avoids tried endpoints by default.
        StackKind::OneStop => fixed(kind, P2c::least_requests(), addrs(&servers)),
    };
    for _ in 0..30 {
        let tried = tower_lb::request::TriedEndpoints::new();
        let mut hits_before: Vec<usize> = servers.iter().map(TestServer::hits).collect();
        let mut first_and_second = Vec::new();
        for _attempt in 0..2 {
            let mut req = get();
            req.extensions_mut()
                .insert(tower_lb::request::CallContext::new().with_tried(tried.clone()));
            let response = lb.send(req).await.expect("answered");
            assert_eq!(response.status(), 200);
            let hits: Vec<usize> = servers.iter().map(TestServer::hits).collect();
            let which = (0..servers.len())
                .find(|&i| hits[i] > hits_before[i])
                .expect("some server got it");
            first_and_second.push(which);
            hits_before = hits;
        }
        assert_ne!(
            first_and_second[0], first_and_second[1],
            "went back to the same endpoint"
        );
        assert_eq!(tried.attempts(), 2);
    }
}

/// The latency estimate of an endpoint that answers after `delay` of tokio's
/// paused time, through a Peak-EWMA balancer timing requests with `clock`.
async fn estimate_of_a_paused_answer(clock: LatencyClock, delay: Duration) -> Duration {
    let slow = tower::service_fn(move |_: ()| async move {
        tokio::time::sleep(delay).await;
        Ok::<_, BoxError>(())
    });
    let balancer = Balancer::builder()
        .latency_clock(clock)
        .build(discover::fixed([(0, slow)]));
    balancer.clone().oneshot(()).await.expect("answered");
    balancer.endpoints()[0]
        .rtt_estimate
        .expect("Peak EWMA times requests")
}

#[tokio::test(start_paused = true)]
async fn the_tokio_latency_clock_times_requests_in_paused_time() {
    let delay = Duration::from_millis(250);
    let estimate = estimate_of_a_paused_answer(LatencyClock::Tokio, delay).await;
    assert_eq!(estimate, delay);
}

#[tokio::test(start_paused = true)]
async fn the_default_latency_clock_keeps_real_time_while_tokio_time_is_paused() {
    let delay = Duration::from_secs(10);
    let estimate = estimate_of_a_paused_answer(LatencyClock::default(), delay).await;
    assert!(estimate < Duration::from_secs(1), "{estimate:?}");
}

#[tokio::test(start_paused = true)]
async fn peak_ewma_keeps_avoiding_a_slow_endpoint_when_tokio_time_jumps_ahead() {
    // Endpoint 0 takes 30 ms of real time (the default clock's time); 1
    // answers at once. Both are measured first, twice each (at start-up,
    // endpoints not yet measured compare by requests in flight).
    let slow_hits = Arc::new(AtomicUsize::new(0));
    let slow = tower::service_fn({
        let slow_hits = slow_hits.clone();
        move |_: ()| {
            slow_hits.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(30));
            std::future::ready(Ok::<_, BoxError>(()))
        }
    });
    let fast = tower::service_fn(|_: ()| std::future::ready(Ok::<_, BoxError>(())));
    let endpoints = [(0, tower::util::BoxCloneSyncService::new(slow))]
        .into_iter()
        .chain([(1, tower::util::BoxCloneSyncService::new(fast))]);
    let balancer = Balancer::builder()
        .rtt_estimate(RttEstimate::new(
            Duration::from_micros(1),
            Duration::from_secs(10),
        ))
        .build(discover::fixed(endpoints));
    for _ in 0..50 {
        balancer.clone().oneshot(()).await.expect("answered");
        if balancer.endpoints().iter().all(|e| e.requests >= 2) {
            break;
        }
    }
    let warm_up = slow_hits.load(Ordering::SeqCst);
    assert!(
        balancer.endpoints().iter().all(|e| e.requests >= 2),
        "both endpoints were measured"
    );

    // Three hours of tokio time: estimates stamped on one clock and decayed
    // against the other would all reach 0 and tie.
    tokio::time::advance(Duration::from_secs(3 * 3600)).await;
    for _ in 0..50 {
        balancer.clone().oneshot(()).await.expect("answered");
    }
    assert_eq!(slow_hits.load(Ordering::SeqCst), warm_up);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_latency_clock_measures_a_real_servers_latency() {
    let server = TestServer::with_delay(Duration::from_millis(30)).await;
    let balancer = Balancer::builder().build(discover::fixed([(0, endpoint(server.addr))]));
    for _ in 0..3 {
        let response = balancer.clone().oneshot(get()).await.expect("answered");
        assert_eq!(response.status(), 200);
    }
    let estimate = balancer.endpoints()[0]
        .rtt_estimate
        .expect("Peak EWMA times requests");
    // At least the server's delay; the upper bound only catches a clock
    // that counts in the wrong unit.
    assert!(
        (Duration::from_millis(30)..Duration::from_secs(2)).contains(&estimate),
        "{estimate:?}"
    );
}

/// Well under the default 5 s startup wait: an error that comes sooner did
/// not wait for an endpoint that discovery has said will not come.
const AT_ONCE: Duration = Duration::from_secs(1);

/// Sends one GET that must fail because discovery found no endpoints: its
/// error, and how long it took.
async fn failure_and_time<K: 'static>(lb: &Lb<K>) -> (BoxError, Duration) {
    let started = tokio::time::Instant::now();
    let err = lb.send(get()).await.expect_err("there is no endpoint");
    let took = started.elapsed();
    assert!(
        matches!(find_error(&*err), Some(Error::DiscoveredNone { .. })),
        "{err:?}"
    );
    (err, took)
}

async fn an_empty_list_fails_requests_at_once_with_a_clear_error(kind: StackKind) {
    let lb = fixed(kind, RoundRobin::new(), []);
    let (err, took) = failure_and_time(&lb).await;
    assert!(took < AT_ONCE, "failed after {took:?}: {err}");
    assert_eq!(
        err.to_string(),
        "no endpoints available: the discovery stream ended without any endpoint"
    );
}

async fn an_empty_set_pushed_at_startup_fails_requests_at_once(kind: StackKind) {
    let (registry, discovery) = Registry::<SocketAddr>::new(kind);
    let lb = over(discovery, RoundRobin::new());
    registry.replace_all([]);
    let (err, took) = failure_and_time(&lb).await;
    assert!(took < AT_ONCE, "failed after {took:?}: {err}");
    assert_eq!(
        err.to_string(),
        "no endpoints available: the discovery channel's set was replaced with an empty one"
    );
}

async fn a_set_emptied_by_discovery_fails_requests_at_once_until_an_endpoint_returns(
    kind: StackKind,
) {
    let server = TestServer::start().await;
    let (registry, discovery) = Registry::new(kind);
    let lb = over(discovery, RoundRobin::new());
    registry.insert(server.addr, server.addr);
    roundtrip(&lb).await.expect("request succeeds");

    registry.remove(server.addr);
    wait_until(Duration::from_secs(2), || {
        lb.endpoints()
            .iter()
            .all(|e| e.state != EndpointState::Active)
    })
    .await;
    let (err, took) = failure_and_time(&lb).await;
    assert!(took < AT_ONCE, "failed after {took:?}: {err}");
    assert_eq!(
        err.to_string(),
        "no endpoints available: discovery removed every endpoint"
    );

    registry.insert(server.addr, server.addr);
    wait_until(Duration::from_secs(2), || {
        lb.endpoints()
            .iter()
            .any(|e| e.state == EndpointState::Active)
    })
    .await;
    roundtrip(&lb).await.expect("the returned endpoint answers");
}

async fn the_end_of_a_fixed_list_is_logged_at_debug_not_info(kind: StackKind) {
    let logs = CapturedLogs::global();
    let server = TestServer::start().await;
    let lb = fixed(kind, RoundRobin::new(), [server.addr]);
    roundtrip(&lb).await.expect("request succeeds");
    let ended = ["discovery stream ended", "DEBUG"];
    wait_until(Duration::from_secs(2), || {
        !logs.lines_with(&ended).is_empty()
    })
    .await;
    // Any stack in this test binary, this one included: the end of a list
    // is routine, so nothing logs it at INFO.
    let at_info = logs.lines_with(&["discovery stream ended", " INFO "]);
    assert!(at_info.is_empty(), "{at_info:?}");
}

/// A round-robin stack over `addrs` that ejects an endpoint after 5
/// consecutive 5xx answers, for 30 s.
fn ejecting(kind: StackKind, addrs: impl IntoIterator<Item = SocketAddr>) -> Lb {
    let detection = tower_lb::health::OutlierDetection::new().base_ejection_time(EJECTION);
    match kind {
        StackKind::HandBuilt => {
            let client = lb_http::client();
            Lb::hand_built(
                Balancer::builder()
                    .strategy(RoundRobin::new())
                    .classify(tower_lb::classify::HttpClassify::server_errors())
                    .outlier_detection(detection)
                    .build(discover::fixed(lb_http::endpoints(&client, addrs))),
            )
        }
        StackKind::OneStop => Lb::one_stop(
            bare(HttpClient::builder())
                .strategy(RoundRobin::new())
                .outlier_detection(detection)
                .build(addrs),
        ),
    }
}

const EJECTION: Duration = Duration::from_secs(30);

/// A stack over two servers, the first answering 500 to everything, with
/// that first one ejected (as the captured logs show); and its address.
async fn with_an_ejected_endpoint(
    kind: StackKind,
    logs: &CapturedLogs,
) -> (Lb, Vec<TestServer>, String) {
    let all = servers(2, Duration::ZERO).await;
    all[0].fail_every(1);
    let lb = ejecting(kind, addrs(&all));
    wait_until(Duration::from_secs(2), || lb.endpoints().len() == 2).await;
    for _ in 0..10 {
        let response = lb.send(get()).await.expect("answered");
        response.into_body().collect().await.expect("body");
    }
    let addr = all[0].addr.to_string();
    wait_until(Duration::from_secs(5), || {
        !logs.lines_with(&["endpoint ejected", &addr]).is_empty()
    })
    .await;
    (lb, all, addr)
}

/// Lets the ejection time of [`with_an_ejected_endpoint`] run out (on
/// tokio's paused clock) and gives a driver every chance to log its end.
async fn outlast_the_ejection() {
    tokio::time::pause();
    tokio::time::advance(EJECTION + Duration::from_secs(1)).await;
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
}

async fn a_shut_down_stack_logs_no_ejection_over_afterwards(kind: StackKind) {
    let logs = CapturedLogs::global();
    let (lb, _servers, addr) = with_an_ejected_endpoint(kind, logs).await;
    lb.shutdown(Duration::from_secs(1))
        .await
        .expect("nothing in flight");
    outlast_the_ejection().await;
    let late = logs.lines_with(&["ejection over", &addr]);
    assert!(late.is_empty(), "{late:?}");
}

/// An endpoint service that is not ready for its first `not_ready` polls
/// (waking its caller each time), or whose readiness fails when
/// `fails_ready`; it answers with its name.
#[derive(Clone)]
struct SlowToBeReady {
    not_ready: Arc<AtomicUsize>,
    fails_ready: bool,
}

impl tower::Service<()> for SlowToBeReady {
    type Response = &'static str;
    type Error = BoxError;
    type Future = std::future::Ready<Result<&'static str, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        if self.fails_ready {
            return Poll::Ready(Err("the endpoint's connection could not be made".into()));
        }
        let left = self.not_ready.load(Ordering::SeqCst);
        if left > 0 {
            self.not_ready.store(left - 1, Ordering::SeqCst);
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: ()) -> Self::Future {
        std::future::ready(Ok("answered"))
    }
}

#[tokio::test]
async fn a_request_to_an_endpoint_not_yet_ready_waits_for_it_and_is_answered() {
    let endpoint = SlowToBeReady {
        not_ready: Arc::new(AtomicUsize::new(3)),
        fails_ready: false,
    };
    let balancer = Balancer::builder().build(discover::fixed([(0, endpoint.clone())]));
    let answer = tokio::time::timeout(Duration::from_secs(5), balancer.clone().oneshot(()))
        .await
        .expect("answered in time");
    assert_eq!(answer.expect("answered"), "answered");
    assert_eq!(
        endpoint.not_ready.load(Ordering::SeqCst),
        0,
        "readiness was polled to the end"
    );
    assert_eq!(balancer.in_flight(), 0);
}

#[tokio::test]
async fn an_endpoint_whose_readiness_fails_fails_the_request_as_its_own_error() {
    let endpoint = SlowToBeReady {
        not_ready: Arc::new(AtomicUsize::new(0)),
        fails_ready: true,
    };
    let balancer = Balancer::builder().build(discover::fixed([(0, endpoint)]));
    let error = balancer.clone().oneshot(()).await.expect_err("failed");
    assert!(matches!(error, Error::Endpoint { .. }), "{error}");
    let report = tower_lb::error::report(&error).to_string();
    assert!(report.contains("could not be made"), "{report}");
    assert_eq!(balancer.in_flight(), 0);
}

/// A real server's endpoint whose connection state the test sets, as a
/// service of the user's own would report it.
#[derive(Clone)]
struct Reporting {
    endpoint: Endpoint,
    status: tower_lb::health::ConnectionStatus,
}

impl tower::Service<http::Request<Body>> for Reporting {
    type Response = <Endpoint as tower::Service<http::Request<Body>>>::Response;
    type Error = <Endpoint as tower::Service<http::Request<Body>>>::Error;
    type Future = <Endpoint as tower::Service<http::Request<Body>>>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.endpoint.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        self.endpoint.call(req)
    }
}

/// A bare balancer (round robin) over `servers`, each endpoint reporting
/// the connection state the test sets on the status returned beside it.
async fn reporting_balancer(
    servers: &[TestServer],
) -> (
    Balancer<SocketAddr, Reporting, RoundRobin>,
    Vec<tower_lb::health::ConnectionStatus>,
) {
    let statuses: Vec<_> = servers
        .iter()
        .map(|_| tower_lb::health::ConnectionStatus::new())
        .collect();
    let endpoints = servers.iter().zip(&statuses).map(|(s, status)| {
        let reporting = Reporting {
            endpoint: endpoint(s.addr),
            status: status.clone(),
        };
        (s.addr, reporting)
    });
    let balancer = Balancer::builder()
        .strategy(RoundRobin::new())
        .connection_states(|r: &Reporting| Some(r.status.clone()))
        .build(discover::fixed(endpoints));
    wait_until(Duration::from_secs(5), || {
        balancer.endpoints().len() == servers.len()
    })
    .await;
    (balancer, statuses)
}

async fn send_all(balancer: &Balancer<SocketAddr, Reporting, RoundRobin>, n: usize) {
    for i in 0..n {
        let response = balancer.clone().oneshot(get()).await;
        assert!(response.is_ok(), "request {i}: {:?}", response.err());
    }
}

#[tokio::test]
async fn an_endpoint_reporting_its_connection_being_made_gets_no_requests_until_it_is_ready() {
    use tower_lb::health::ConnectionState;
    let servers = servers(2, Duration::ZERO).await;
    let (balancer, statuses) = reporting_balancer(&servers).await;
    statuses[0].set(ConnectionState::Ready);
    statuses[1].set(ConnectionState::Connecting);
    tokio::time::sleep(Duration::from_millis(50)).await;
    send_all(&balancer, 10).await;
    assert_eq!((servers[0].hits(), servers[1].hits()), (10, 0));
    let shown: Vec<_> = balancer.endpoints().iter().map(|e| e.connection).collect();
    assert!(
        shown.contains(&Some(ConnectionState::Connecting)),
        "{shown:?}"
    );

    statuses[1].set(ConnectionState::Ready);
    tokio::time::sleep(Duration::from_millis(50)).await;
    send_all(&balancer, 10).await;
    assert_eq!((servers[0].hits(), servers[1].hits()), (15, 5));
}

#[tokio::test]
async fn when_no_connection_takes_requests_every_endpoint_is_picked() {
    use tower_lb::health::ConnectionState;
    let servers = servers(2, Duration::ZERO).await;
    let (balancer, statuses) = reporting_balancer(&servers).await;
    statuses[0].set(ConnectionState::Failed);
    statuses[1].set(ConnectionState::Connecting);
    tokio::time::sleep(Duration::from_millis(50)).await;
    send_all(&balancer, 10).await;
    assert_eq!((servers[0].hits(), servers[1].hits()), (5, 5));
}
