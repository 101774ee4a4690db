//! The balancer against real hyper servers on loopback.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use tower::ServiceExt;
use tower_lb::discover::{self, Change};
use tower_lb::http::{self as lb_http, HttpEndpoint};
use tower_lb::strategy::{P2c, RoundRobin, Strategy};
use tower_lb::{Balancer, EndpointState, Error};

use support::{get, refusing_addr, servers, wait_until, Body, Scripted, TestServer};

type Endpoint = HttpEndpoint<Body>;

fn endpoint(addr: SocketAddr) -> Endpoint {
    HttpEndpoint::new(lb_http::client(), addr)
}

fn fixed_balancer<P: Strategy>(
    strategy: P,
    servers: &[TestServer],
) -> Balancer<SocketAddr, Endpoint, P> {
    let client = lb_http::client();
    let addrs = servers.iter().map(|s| s.addr);
    Balancer::builder()
        .strategy(strategy)
        .build(discover::fixed(lb_http::endpoints(&client, addrs)))
}

/// Sends one GET and reads the whole body; any failure is an error.
async fn roundtrip<P: Strategy>(balancer: &Balancer<SocketAddr, Endpoint, P>) -> Result<(), Error> {
    let response = balancer.clone().oneshot(get()).await?;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_spreads_requests_exactly_evenly() {
    let servers = servers(4, Duration::ZERO).await;
    let balancer = fixed_balancer(RoundRobin::new(), &servers);
    for _ in 0..400 {
        roundtrip(&balancer).await.expect("request succeeds");
    }
    let hits: Vec<usize> = servers.iter().map(TestServer::hits).collect();
    assert_eq!(hits, [100, 100, 100, 100]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p2c_sends_requests_to_every_endpoint() {
    let servers = servers(4, Duration::from_millis(2)).await;
    for strategy in [P2c::least_requests(), P2c::peak_ewma()] {
        let balancer = fixed_balancer(strategy, &servers);
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let balancer = balancer.clone();
                tokio::spawn(async move {
                    for _ in 0..50 {
                        roundtrip(&balancer).await.expect("request succeeds");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_endpoint_gets_no_new_requests_and_its_in_flight_requests_complete() {
    let slow = TestServer::with_delay(Duration::from_millis(400)).await;
    let fast = TestServer::start().await;
    let (handle, stream) = discover::channel();
    handle.insert(slow.addr, endpoint(slow.addr)).unwrap();
    handle.insert(fast.addr, endpoint(fast.addr)).unwrap();
    let balancer = Balancer::builder()
        .strategy(RoundRobin::new())
        .build(stream);

    let in_flight: Vec<_> = (0..10)
        .map(|_| {
            let balancer = balancer.clone();
            tokio::spawn(async move { roundtrip(&balancer).await })
        })
        .collect();
    slow.wait_in_flight(5).await;

    handle.remove(slow.addr).unwrap();
    wait_until(Duration::from_secs(2), || {
        balancer
            .endpoints()
            .iter()
            .any(|e| e.key == slow.addr && e.state == EndpointState::Draining)
    })
    .await;
    let draining = balancer
        .endpoints()
        .into_iter()
        .find(|e| e.key == slow.addr)
        .unwrap();
    assert_eq!(draining.in_flight, 5);

    for _ in 0..20 {
        roundtrip(&balancer).await.expect("request succeeds");
    }
    assert_eq!(slow.hits(), 5, "the removed endpoint got no new request");

    for request in in_flight {
        request
            .await
            .expect("task")
            .expect("in-flight request completes");
    }
    wait_until(Duration::from_secs(2), || balancer.endpoints().len() == 1).await;
    assert_eq!(balancer.endpoints()[0].key, fast.addr);
    assert_eq!(balancer.in_flight(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inserts_and_removes_under_steady_load_fail_no_request() {
    let servers = servers(6, Duration::from_millis(1)).await;
    let addrs: Vec<SocketAddr> = servers.iter().map(|s| s.addr).collect();
    let (handle, stream) = discover::channel();
    for &addr in &addrs[..3] {
        handle.insert(addr, endpoint(addr)).unwrap();
    }
    let balancer = Balancer::builder().build(stream);

    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let load: Vec<_> = (0..16)
        .map(|_| {
            let (balancer, stop, sent) = (balancer.clone(), stop.clone(), sent.clone());
            tokio::spawn(async move {
                let mut failures = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    if let Err(e) = roundtrip(&balancer).await {
                        failures.push(e.to_string());
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
            0 => handle.insert(b, endpoint(b)).unwrap(),
            1 => handle.remove(a).unwrap(),
            2 => handle.insert(a, endpoint(a)).unwrap(), // may be a duplicate insert
            _ => handle
                .replace_all([(a, endpoint(a)), (b, endpoint(b))])
                .unwrap(),
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
    wait_until(Duration::from_secs(2), || balancer.in_flight() == 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_waits_for_the_first_endpoint_then_succeeds() {
    let server = TestServer::start().await;
    let (handle, stream) = discover::channel();
    let balancer = Balancer::builder().build(stream);

    let started = tokio::time::Instant::now();
    let request = tokio::spawn({
        let balancer = balancer.clone();
        async move { roundtrip(&balancer).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!request.is_finished(), "the request waits for an endpoint");

    handle.insert(server.addr, endpoint(server.addr)).unwrap();
    request
        .await
        .expect("task")
        .expect("request succeeds once an endpoint exists");
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert_eq!(server.hits(), 1);
}

#[tokio::test(start_paused = true)]
async fn request_fails_with_no_endpoints_after_the_startup_wait() {
    let (_handle, stream) = discover::channel::<SocketAddr, Endpoint>();
    let balancer = Balancer::builder()
        .startup_wait(Duration::from_millis(300))
        .build(stream);

    let err = balancer.oneshot(get()).await.unwrap_err();
    assert!(matches!(err, Error::NoEndpoints { waited } if waited == Duration::from_millis(300)));
    assert_eq!(
        err.to_string(),
        "no endpoints available: none appeared within 300ms"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_refuses_new_requests_and_waits_for_in_flight_ones() {
    let server = TestServer::with_delay(Duration::from_millis(300)).await;
    let balancer = fixed_balancer(P2c::peak_ewma(), std::slice::from_ref(&server));

    let in_flight: Vec<_> = (0..4)
        .map(|_| {
            let balancer = balancer.clone();
            tokio::spawn(async move { roundtrip(&balancer).await })
        })
        .collect();
    server.wait_in_flight(4).await;

    let shutdown = tokio::spawn({
        let balancer = balancer.clone();
        async move { balancer.shutdown(Duration::from_secs(5)).await }
    });
    wait_until(Duration::from_secs(1), || balancer.is_closed()).await;

    let refused = balancer.clone().oneshot(get()).await.unwrap_err();
    assert!(matches!(refused, Error::Closed), "{refused}");
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
    assert_eq!(balancer.in_flight(), 0);
    assert_eq!(server.hits(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_gives_up_after_its_timeout_and_says_how_many_are_left() {
    let server = TestServer::with_delay(Duration::from_secs(30)).await;
    let balancer = fixed_balancer(P2c::peak_ewma(), std::slice::from_ref(&server));
    let _hung = tokio::spawn({
        let balancer = balancer.clone();
        async move { roundtrip(&balancer).await }
    });
    server.wait_in_flight(1).await;

    let err = balancer
        .shutdown(Duration::from_millis(200))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::ShutdownTimedOut { in_flight: 1, waited } if waited >= Duration::from_millis(200)),
        "{err}"
    );
    assert!(err.to_string().contains("1 requests still in flight"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_requests_from_64_tasks_are_each_answered_once() {
    const REQUESTS: usize = 10_000;
    const TASKS: usize = 64;
    let servers = servers(8, Duration::ZERO).await;
    let balancer = fixed_balancer(P2c::peak_ewma(), &servers);

    let tasks: Vec<_> = (0..TASKS)
        .map(|t| {
            let balancer = balancer.clone();
            let share = REQUESTS / TASKS + usize::from(t < REQUESTS % TASKS);
            tokio::spawn(async move {
                let mut ok = 0;
                for _ in 0..share {
                    roundtrip(&balancer).await.expect("request succeeds");
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
    assert_eq!(balancer.in_flight(), 0);
    let stats = balancer.endpoints();
    assert_eq!(
        stats.iter().map(|e| e.requests).sum::<u64>(),
        REQUESTS as u64
    );
    assert!(stats.iter().all(|e| e.failures == 0 && e.in_flight == 0));
}

/// Share of `requests` that reached `slow`, with 8 concurrent senders.
async fn slow_share<P: Strategy>(
    strategy: P,
    servers: &[TestServer],
    slow: usize,
    requests: usize,
) -> f64 {
    let before = servers[slow].hits();
    let balancer = fixed_balancer(strategy, servers);
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let balancer = balancer.clone();
            tokio::spawn(async move {
                for _ in 0..requests / 8 {
                    roundtrip(&balancer).await.expect("request succeeds");
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("task");
    }
    (servers[slow].hits() - before) as f64 / requests as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_endpoint_gets_far_fewer_requests_under_peak_ewma_than_round_robin() {
    let servers = servers(4, Duration::from_millis(2)).await;
    servers[0].set_delay(Duration::from_millis(40));

    let round_robin = slow_share(RoundRobin::new(), &servers, 0, 400).await;
    let peak_ewma = slow_share(P2c::peak_ewma(), &servers, 0, 400).await;
    assert!(
        (round_robin - 0.25).abs() < 0.01,
        "round robin: {round_robin}"
    );
    assert!(
        peak_ewma < 0.08,
        "peak ewma sent {peak_ewma} of requests to the slow endpoint"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_response_future_releases_its_in_flight_count() {
    let server = TestServer::with_delay(Duration::from_secs(30)).await;
    let balancer = fixed_balancer(P2c::least_requests(), std::slice::from_ref(&server));
    let mut future = Box::pin(balancer.clone().oneshot(get()));
    assert!(
        tokio::time::timeout(Duration::from_millis(100), &mut future)
            .await
            .is_err()
    );
    server.wait_in_flight(1).await;
    assert_eq!(balancer.in_flight(), 1);

    drop(future);
    assert_eq!(balancer.in_flight(), 0);
    let stats = &balancer.endpoints()[0];
    assert_eq!(
        (stats.requests, stats.failures),
        (1, 0),
        "a cancelled request is no failure"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connection_is_an_endpoint_error_marked_never_sent() {
    let addr = refusing_addr().await;
    let balancer = Balancer::builder().build(discover::fixed([(addr, endpoint(addr))]));
    let err = balancer.clone().oneshot(get()).await.unwrap_err();

    assert!(matches!(err, Error::Endpoint { .. }), "{err}");
    assert!(err.is_never_sent(), "{err}");
    assert!(err.to_string().contains(&addr.to_string()), "{err}");
    assert!(err.to_string().contains("never sent"), "{err}");
    assert_eq!(balancer.endpoints()[0].failures, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_insert_replaces_the_service_and_the_old_one_drains() {
    const BACKEND: u32 = 7;
    let old = TestServer::with_delay(Duration::from_millis(300)).await;
    let new = TestServer::start().await;
    let (handle, stream) = discover::channel();
    handle.insert(BACKEND, endpoint(old.addr)).unwrap();
    let balancer = Balancer::builder().build(stream);

    let in_flight = tokio::spawn({
        let balancer = balancer.clone();
        async move { balancer.oneshot(get()).await.map(|r| r.status()) }
    });
    old.wait_in_flight(1).await;

    handle.insert(BACKEND, endpoint(new.addr)).unwrap();
    wait_until(Duration::from_secs(2), || balancer.endpoints().len() == 2).await;
    let states: Vec<_> = balancer
        .endpoints()
        .iter()
        .map(|e| (e.key, e.state))
        .collect();
    assert_eq!(
        states,
        [
            (BACKEND, EndpointState::Active),
            (BACKEND, EndpointState::Draining)
        ]
    );

    for _ in 0..5 {
        balancer
            .clone()
            .oneshot(get())
            .await
            .expect("request succeeds");
    }
    assert_eq!((old.hits(), new.hits()), (1, 5));
    assert_eq!(
        in_flight
            .await
            .expect("task")
            .expect("old request completes"),
        200
    );
    wait_until(Duration::from_secs(2), || balancer.endpoints().len() == 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_an_unknown_endpoint_changes_nothing() {
    let server = TestServer::start().await;
    let (handle, stream) = discover::channel();
    handle.insert("known", endpoint(server.addr)).unwrap();
    handle.remove("unknown").unwrap();
    let balancer = Balancer::builder().build(stream);

    balancer
        .clone()
        .oneshot(get())
        .await
        .expect("request succeeds");
    let keys: Vec<_> = balancer.endpoints().iter().map(|e| e.key).collect();
    assert_eq!(keys, ["known"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_error_keeps_the_last_endpoints_and_later_changes_still_apply() {
    let (a, b) = (TestServer::start().await, TestServer::start().await);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tx.send(Ok(Change::Insert(a.addr, endpoint(a.addr))))
        .unwrap();
    let balancer = Balancer::builder()
        .strategy(RoundRobin::new())
        .build(Scripted(rx));
    roundtrip(&balancer).await.expect("request succeeds");

    tx.send(Err(std::io::Error::other("registry unreachable")))
        .unwrap();
    for _ in 0..10 {
        roundtrip(&balancer).await.expect("requests still succeed");
    }
    assert_eq!(a.hits(), 11);

    tx.send(Ok(Change::Insert(b.addr, endpoint(b.addr))))
        .unwrap();
    wait_until(Duration::from_secs(2), || balancer.endpoints().len() == 2).await;
    for _ in 0..10 {
        roundtrip(&balancer).await.expect("request succeeds");
    }
    assert_eq!(b.hits(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ended_discovery_stream_keeps_the_last_endpoints() {
    let servers = servers(2, Duration::ZERO).await;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    for s in &servers {
        tx.send(Ok(Change::Insert(s.addr, endpoint(s.addr))))
            .unwrap();
    }
    drop(tx); // the stream ends after the two inserts
    let balancer = Balancer::builder()
        .strategy(RoundRobin::new())
        .build(Scripted(rx));
    tokio::time::sleep(Duration::from_millis(50)).await;
    for _ in 0..10 {
        roundtrip(&balancer).await.expect("request succeeds");
    }
    let hits: HashMap<_, _> = servers.iter().map(|s| (s.addr, s.hits())).collect();
    assert!(hits.values().all(|&h| h == 5), "{hits:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn driver_stops_when_the_last_handle_is_dropped() {
    let (handle, stream) = discover::channel::<SocketAddr, Endpoint>();
    let balancer = Balancer::builder().build(stream);
    let clone = balancer.clone();
    drop(balancer);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!handle.is_closed(), "a clone still holds the balancer");
    drop(clone);
    wait_until(Duration::from_secs(2), || handle.is_closed()).await;
}

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
    handle.insert(1, endpoint(old.addr)).unwrap();
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
    handle.insert(2, endpoint(new.addr)).unwrap();
    handle.remove(1).unwrap();
    wait_until(Duration::from_secs(2), || {
        balancer
            .endpoints()
            .iter()
            .map(|e| e.key)
            .collect::<Vec<_>>()
            == [2]
    })
    .await;

    *gate.0.lock().unwrap() = true;
    gate.1.notify_all();
    assert_eq!(request.await.expect("task").expect("request succeeds"), 200);
    assert_eq!(
        (old.hits(), new.hits()),
        (0, 1),
        "the stale pick was not used"
    );
    assert_eq!(balancer.in_flight(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duration_max_means_wait_forever_not_overflow() {
    let server = TestServer::start().await;
    let (handle, stream) = discover::channel();
    let balancer = Balancer::builder()
        .startup_wait(Duration::MAX)
        .build(stream);
    let request = tokio::spawn({
        let balancer = balancer.clone();
        async move { roundtrip(&balancer).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    handle.insert(server.addr, endpoint(server.addr)).unwrap();
    request.await.expect("task").expect("request succeeds");
    balancer
        .shutdown(Duration::MAX)
        .await
        .expect("nothing in flight");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absolute_uri_keeps_its_authority_as_the_host_header() {
    let server = TestServer::start().await;
    let balancer = fixed_balancer(RoundRobin::new(), std::slice::from_ref(&server));
    let request = http::Request::get("http://api.internal:8080/users?page=2")
        .body(support::Body::new())
        .unwrap();
    let response = balancer.oneshot(request).await.expect("request succeeds");
    assert_eq!(response.status(), 200);
    assert_eq!(server.last_host().as_deref(), Some("api.internal:8080"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_request_through_a_plain_http_endpoint_is_refused_and_never_sent() {
    let server = TestServer::start().await;
    let balancer = fixed_balancer(RoundRobin::new(), std::slice::from_ref(&server));
    let request = http::Request::get("https://api.internal/secret")
        .body(support::Body::new())
        .unwrap();
    let err = balancer.oneshot(request).await.unwrap_err();
    assert!(err.is_never_sent(), "{err}");
    assert!(
        err.to_string()
            .contains("the request is for https but the endpoint speaks http"),
        "{err}"
    );
    assert_eq!(server.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_request_is_refused_and_never_sent() {
    let server = TestServer::start().await;
    let balancer = fixed_balancer(RoundRobin::new(), std::slice::from_ref(&server));
    let request = http::Request::connect("example.com:443")
        .body(support::Body::new())
        .unwrap();
    let err = balancer.oneshot(request).await.unwrap_err();
    assert!(err.is_never_sent(), "{err}");
    assert_eq!(server.hits(), 0);
}

#[tokio::test]
async fn a_second_attempt_of_a_call_goes_to_an_endpoint_the_call_has_not_tried() {
    let servers = servers(3, Duration::ZERO).await;
    let client = lb_http::client();
    let addrs = servers.iter().map(|s| s.addr);
    let balancer = Balancer::builder()
        .strategy(P2c::least_requests())
        .avoid_tried_endpoints()
        .build(discover::fixed(lb_http::endpoints(&client, addrs)));
    for _ in 0..30 {
        let tried = tower_lb::TriedEndpoints::new();
        let mut hits_before: Vec<usize> = servers.iter().map(TestServer::hits).collect();
        let mut first_and_second = Vec::new();
        for _attempt in 0..2 {
            let mut req = get();
            req.extensions_mut().insert(tried.clone());
            let response = balancer.clone().oneshot(req).await.expect("answered");
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
