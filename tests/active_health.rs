//! Active health checks against real servers on loopback: tonic-health's
//! own `Watch` service flipped between SERVING and NOT_SERVING, HTTP/1.1
//! servers whose `/healthz` a test turns, and addresses that refuse TCP.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tower::ServiceExt;
use tower_lb::client::{GrpcChannel, HttpClient};
use tower_lb::discover;
use tower_lb::health::{CheckStatus, HealthCheck};
use tower_lb::{EndpointState, EndpointStats};

use support::checked::{fast_http_check, HealthzServer, WatchedServer};
use support::grpc::{GrpcBehaviour, GrpcServer};
use support::{get, refusing_addr, wait_until, Body, TestServer};

const WAIT: Duration = Duration::from_secs(5);

fn stats_of<K: PartialEq + Copy>(all: Vec<EndpointStats<K>>, key: K) -> EndpointStats<K> {
    all.into_iter()
        .find(|e| e.key == key)
        .unwrap_or_else(|| panic!("endpoint not known"))
}

async fn send<K>(client: &HttpClient<Body, K>) {
    let response = client
        .clone()
        .oneshot(get())
        .await
        .unwrap_or_else(|e| panic!("{}", tower_lb::error::report(&*e)));
    assert_eq!(response.status(), 200);
}

/// The endpoint's check status; `None` also while it is not known yet.
fn check_of(client: &HttpClient<Body>, addr: SocketAddr) -> Option<CheckStatus> {
    let all = client.balancer().endpoints();
    all.into_iter().find(|e| e.key == addr)?.health_check
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_failing_its_http_check_gets_no_traffic_until_it_passes_again() {
    let (a, b) = (HealthzServer::start().await, HealthzServer::start().await);
    let client = HttpClient::builder()
        .health_check(fast_http_check())
        .build::<Body>([a.addr, b.addr]);
    let passing = |addr| check_of(&client, addr) == Some(CheckStatus::Passing);
    wait_until(WAIT, || passing(a.addr) && passing(b.addr)).await;

    a.set_health(503);
    wait_until(WAIT, || {
        check_of(&client, a.addr) == Some(CheckStatus::Failing)
    })
    .await;
    assert_eq!(
        stats_of(client.balancer().endpoints(), a.addr).state,
        EndpointState::Unhealthy
    );
    let before = a.traffic();
    for _ in 0..30 {
        send(&client).await;
    }
    assert_eq!(a.traffic(), before, "the failing endpoint got traffic");
    assert_eq!(b.traffic(), 30);

    a.set_health(200);
    wait_until(WAIT, || passing(a.addr)).await;
    for _ in 0..30 {
        send(&client).await;
    }
    assert!(a.traffic() > before, "the endpoint did not come back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn it_takes_the_unhealthy_threshold_of_failed_probes_in_a_row_to_go_out_and_the_healthy_threshold_to_come_back(
) {
    let server = HealthzServer::start().await;
    let check = fast_http_check()
        .unhealthy_threshold(4)
        .and_then(|check| check.healthy_threshold(3))
        .unwrap_or_else(|e| panic!("{e}"));
    let client = HttpClient::builder()
        .health_check(check)
        .build::<Body>([server.addr]);
    let status = || check_of(&client, server.addr);
    wait_until(WAIT, || status() == Some(CheckStatus::Passing)).await;

    server.set_health(503);
    let flipped_at = server.probes();
    wait_until(WAIT, || status() == Some(CheckStatus::Failing)).await;
    let failed = server.probes() - flipped_at;
    assert!(failed >= 4, "out after {failed} failed probes");

    server.set_health(200);
    let flipped_at = server.probes();
    wait_until(WAIT, || status() == Some(CheckStatus::Passing)).await;
    let passed = server.probes() - flipped_at;
    assert!(passed >= 3, "back after {passed} passed probes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_endpoint_gets_no_traffic_before_its_first_check_passes() {
    let (a, b) = (HealthzServer::start().await, HealthzServer::start().await);
    b.set_health_delay(Duration::from_millis(600));
    let (handle, stream) = discover::channel();
    handle
        .insert(a.addr, a.addr)
        .unwrap_or_else(|e| panic!("{e}"));
    let client = HttpClient::builder()
        .health_check(fast_http_check())
        .build_discover::<Body, _>(stream);
    wait_until(WAIT, || {
        check_of(&client, a.addr) == Some(CheckStatus::Passing)
    })
    .await;

    handle
        .insert(b.addr, b.addr)
        .unwrap_or_else(|e| panic!("{e}"));
    wait_until(WAIT, || b.probes() == 1).await;
    let pending = stats_of(client.balancer().endpoints(), b.addr);
    assert_eq!(pending.health_check, Some(CheckStatus::Pending));
    assert_eq!(pending.state, EndpointState::Unhealthy);
    for _ in 0..20 {
        send(&client).await;
    }
    assert_eq!(b.traffic(), 0, "traffic before the first check passed");

    wait_until(WAIT, || {
        check_of(&client, b.addr) == Some(CheckStatus::Passing)
    })
    .await;
    for _ in 0..20 {
        send(&client).await;
    }
    assert!(b.traffic() > 0, "no traffic after the check passed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checks_of_a_removed_endpoint_stop() {
    let (a, b) = (HealthzServer::start().await, HealthzServer::start().await);
    let (handle, stream) = discover::channel();
    handle
        .insert(a.addr, a.addr)
        .unwrap_or_else(|e| panic!("{e}"));
    handle
        .insert(b.addr, b.addr)
        .unwrap_or_else(|e| panic!("{e}"));
    let client = HttpClient::builder()
        .health_check(fast_http_check())
        .build_discover::<Body, _>(stream);
    wait_until(WAIT, || b.probes() >= 2).await;

    handle.remove(b.addr).unwrap_or_else(|e| panic!("{e}"));
    wait_until(WAIT, || client.balancer().endpoints().len() == 1).await;
    // A probe under way when it was removed may still land.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let after_removal = b.probes();
    let a_before = a.probes();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        b.probes(),
        after_removal,
        "the removed endpoint is still probed"
    );
    assert!(
        a.probes() >= a_before + 4,
        "the other endpoint's checks stopped too"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_every_endpoint_fails_its_check_the_panic_threshold_still_sends_requests() {
    let servers = [HealthzServer::start().await, HealthzServer::start().await];
    for server in &servers {
        server.set_health(503);
    }
    let client = HttpClient::builder()
        .health_check(fast_http_check())
        .build::<Body>(servers.iter().map(|s| s.addr));
    wait_until(WAIT, || {
        servers
            .iter()
            .all(|s| check_of(&client, s.addr) == Some(CheckStatus::Failing))
    })
    .await;
    assert!(client.balancer().is_panicking());
    for _ in 0..10 {
        send(&client).await;
    }
    assert_eq!(servers[0].traffic() + servers[1].traffic(), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_panic_mode_off_a_set_failing_its_checks_refuses_requests_and_says_why() {
    let server = HealthzServer::start().await;
    server.set_health(503);
    let client = HttpClient::builder()
        .health_check(fast_http_check())
        .panic_threshold(0)
        .unwrap_or_else(|e| panic!("{e}"))
        .build::<Body>([server.addr]);
    wait_until(WAIT, || {
        check_of(&client, server.addr) == Some(CheckStatus::Failing)
    })
    .await;
    let error = client
        .clone()
        .oneshot(get())
        .await
        .expect_err("no endpoint in service");
    let report = tower_lb::error::report(&*error).to_string();
    assert!(
        report.contains("the only endpoint is out of service (failing their health check or not passed it yet) and panic mode is off"),
        "{report}"
    );
    assert_eq!(server.traffic(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_check_keeps_requests_off_an_address_that_refuses_connections() {
    let up = TestServer::start().await;
    let down = refusing_addr().await;
    let check = HealthCheck::tcp()
        .interval(Duration::from_millis(50))
        .unwrap_or_else(|e| panic!("{e}"));
    let client = HttpClient::builder()
        .health_check(check)
        .build::<Body>([up.addr, down]);
    wait_until(WAIT, || {
        check_of(&client, up.addr) == Some(CheckStatus::Passing)
            && check_of(&client, down) == Some(CheckStatus::Failing)
    })
    .await;
    for _ in 0..20 {
        send(&client).await;
    }
    assert_eq!(up.hits(), 20);
    assert_eq!(stats_of(client.balancer().endpoints(), down).requests, 0);
}

// --- gRPC: grpc.health.v1.Health/Watch ---

async fn call(channel: &GrpcChannel) {
    HealthClient::new(channel.clone())
        .check(HealthCheckRequest::default())
        .await
        .unwrap_or_else(|status| panic!("{status}"));
}

fn grpc_check_of(channel: &GrpcChannel, addr: SocketAddr) -> Option<CheckStatus> {
    let all = channel.balancer().endpoints();
    all.into_iter().find(|e| e.key == addr)?.health_check
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_endpoint_that_says_not_serving_gets_no_calls_until_it_serves_again() {
    let (a, b) = (WatchedServer::start().await, WatchedServer::start().await);
    let channel = GrpcChannel::builder()
        .health_check(HealthCheck::grpc(""))
        .build([a.addr, b.addr]);
    let status = |addr| grpc_check_of(&channel, addr);
    wait_until(WAIT, || {
        status(a.addr) == Some(CheckStatus::Passing) && status(b.addr) == Some(CheckStatus::Passing)
    })
    .await;

    a.set_serving(false).await;
    wait_until(WAIT, || status(a.addr) == Some(CheckStatus::Failing)).await;
    let before = a.checks();
    for _ in 0..30 {
        call(&channel).await;
    }
    assert_eq!(a.checks(), before, "a NOT_SERVING endpoint got calls");

    a.set_serving(true).await;
    wait_until(WAIT, || status(a.addr) == Some(CheckStatus::Passing)).await;
    for _ in 0..30 {
        call(&channel).await;
    }
    assert!(a.checks() > before, "the endpoint did not come back");
    // One stream per endpoint carried every change: the server pushed them.
    assert_eq!(a.watches(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_server_without_a_health_service_is_taken_as_healthy() {
    // This server implements Check only: Watch answers UNIMPLEMENTED.
    let server = GrpcServer::start(GrpcBehaviour::Serve).await;
    let channel = GrpcChannel::builder()
        .health_check(HealthCheck::grpc(""))
        .build([server.addr]);
    wait_until(WAIT, || {
        grpc_check_of(&channel, server.addr) == Some(CheckStatus::Passing)
    })
    .await;
    call(&channel).await;
    assert_eq!(server.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_grpc_server_is_out_of_service_until_it_is_back_on_its_address() {
    let (a, b) = (WatchedServer::start().await, WatchedServer::start().await);
    let check = HealthCheck::grpc("")
        .interval(Duration::from_millis(200))
        .unwrap_or_else(|e| panic!("{e}"));
    let channel = GrpcChannel::builder()
        .health_check(check)
        .build([a.addr, b.addr]);
    let status = |addr| grpc_check_of(&channel, addr);
    wait_until(WAIT, || status(a.addr) == Some(CheckStatus::Passing)).await;

    a.kill();
    wait_until(WAIT, || status(a.addr) == Some(CheckStatus::Failing)).await;
    for _ in 0..10 {
        call(&channel).await;
    }

    let restarted = WatchedServer::start_at(a.addr).await;
    wait_until(WAIT, || status(a.addr) == Some(CheckStatus::Passing)).await;
    for _ in 0..30 {
        call(&channel).await;
    }
    assert!(restarted.checks() > 0, "no calls after the restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_not_yet_checked_do_not_count_toward_the_panic_threshold() {
    let first = HealthzServer::start().await;
    let (handle, stream) = discover::channel();
    handle
        .insert(first.addr, first.addr)
        .unwrap_or_else(|e| panic!("{e}"));
    let client = HttpClient::builder()
        .health_check(fast_http_check())
        .build_discover::<Body, _>(stream);
    wait_until(WAIT, || {
        check_of(&client, first.addr) == Some(CheckStatus::Passing)
    })
    .await;

    // A scale-up that triples the set: two of three are pending, which as
    // unhealthy endpoints would be below the 50 % threshold.
    let late = [HealthzServer::start().await, HealthzServer::start().await];
    for server in &late {
        server.set_health_delay(Duration::from_millis(800));
        handle
            .insert(server.addr, server.addr)
            .unwrap_or_else(|e| panic!("{e}"));
    }
    wait_until(WAIT, || late.iter().all(|s| s.probes() == 1)).await;
    assert!(!client.balancer().is_panicking());
    for _ in 0..20 {
        send(&client).await;
    }
    assert_eq!(late[0].traffic() + late[1].traffic(), 0);
    assert_eq!(first.traffic(), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_panic_mode_off_a_request_at_start_waits_for_the_first_check_rather_than_fail() {
    let server = HealthzServer::start().await;
    server.set_health_delay(Duration::from_millis(300));
    let client = HttpClient::builder()
        .health_check(fast_http_check())
        .panic_threshold(0)
        .unwrap_or_else(|e| panic!("{e}"))
        .build::<Body>([server.addr]);
    // Sent at once: the check answers 300 ms later.
    send(&client).await;
    assert_eq!(server.traffic(), 1);
    assert_eq!(check_of(&client, server.addr), Some(CheckStatus::Passing));
}

// --- any ActiveCheck, on a plain Balancer ---

/// Checks that report what a test sets per key, and count their starts and
/// the tasks still running.
#[derive(Clone, Default)]
struct Scripted {
    verdicts: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<&'static str, bool>>>,
    starts: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    running: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

/// Counts a running task down when it is dropped.
struct Running(std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl tower_lb::health::ActiveCheck<&'static str> for Scripted {
    fn start(
        &self,
        key: &&'static str,
        mut reporter: tower_lb::health::HealthReporter,
    ) -> Option<tower_lb::health::CheckTask> {
        self.starts
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if *key == "unchecked" {
            return None;
        }
        self.running
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let (key, verdicts, running) = (*key, self.verdicts.clone(), Running(self.running.clone()));
        Some(Box::pin(async move {
            let _running = running;
            loop {
                let healthy = verdicts.lock().map(|v| v.get(key).copied()).ok().flatten();
                match healthy {
                    Some(true) => reporter.healthy(),
                    Some(false) => reporter.unhealthy("told so"),
                    None => {}
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }))
    }
}

fn answering(
    name: &'static str,
) -> tower::util::BoxCloneSyncService<(), &'static str, std::convert::Infallible> {
    tower::util::BoxCloneSyncService::new(tower::service_fn(move |_: ()| async move {
        Ok::<_, std::convert::Infallible>(name)
    }))
}

#[tokio::test]
async fn an_endpoint_whose_check_starts_nothing_is_in_service_unchecked() {
    let checks = Scripted::default();
    let (handle, stream) = discover::channel();
    handle
        .insert("unchecked", answering("unchecked"))
        .unwrap_or_else(|e| panic!("{e}"));
    let balancer = tower_lb::Balancer::builder()
        .health_check(checks.clone())
        .build(stream);
    let answer = balancer
        .clone()
        .oneshot(())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(answer, "unchecked");
    let stats = balancer.endpoints();
    assert_eq!(stats[0].health_check, None);
    assert_eq!(stats[0].state, EndpointState::Active);
    // The check was asked, and chose to start nothing.
    assert_eq!(checks.starts.load(std::sync::atomic::Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_newcomer_whose_first_pass_comes_after_the_slow_start_window_still_ramps_from_it() {
    let checks = Scripted::default();
    let verdicts = checks.verdicts.clone();
    let say = move |key: &'static str| {
        verdicts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, true);
    };
    say("first");
    let (handle, stream) = discover::channel();
    handle
        .insert("first", answering("first"))
        .unwrap_or_else(|e| panic!("{e}"));
    let window = Duration::from_millis(200);
    let balancer = tower_lb::Balancer::builder()
        .health_check(checks.clone())
        .slow_start(tower_lb::health::SlowStart::new(window))
        .build(stream);
    let passing = |key| {
        balancer
            .endpoints()
            .iter()
            .any(|e| e.key == key && e.health_check == Some(CheckStatus::Passing))
    };
    wait_until(WAIT, || passing("first")).await;

    // A newcomer whose check stays silent for longer than the window.
    handle
        .insert("late", answering("late"))
        .unwrap_or_else(|e| panic!("{e}"));
    tokio::time::sleep(window * 2).await;
    say("late");
    wait_until(WAIT, || passing("late")).await;
    let late = balancer.endpoints();
    let late = late.iter().find(|e| e.key == "late");
    let factor = late.map(|e| e.slow_start_factor).unwrap_or(1.0);
    assert!(factor < 1.0, "no ramp after its first pass: {factor}");
}

#[tokio::test]
async fn a_new_service_for_a_key_keeps_its_check_and_a_removed_key_stops_it() {
    let checks = Scripted::default();
    checks
        .verdicts
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert("a", true);
    let (handle, stream) = discover::channel();
    handle
        .insert("a", answering("first"))
        .unwrap_or_else(|e| panic!("{e}"));
    let balancer = tower_lb::Balancer::builder()
        .health_check(checks.clone())
        .build(stream);
    wait_until(WAIT, || {
        balancer.endpoints().first().and_then(|e| e.health_check) == Some(CheckStatus::Passing)
    })
    .await;

    // The same key again, a new service: the check goes on, passing.
    handle
        .insert("a", answering("second"))
        .unwrap_or_else(|e| panic!("{e}"));
    let started = std::time::Instant::now();
    loop {
        let answer = balancer
            .clone()
            .oneshot(())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        if answer == "second" {
            break;
        }
        assert!(started.elapsed() < WAIT, "the new service never answered");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        balancer.endpoints()[0].health_check,
        Some(CheckStatus::Passing)
    );
    assert_eq!(checks.starts.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(checks.running.load(std::sync::atomic::Ordering::SeqCst), 1);

    handle.remove("a").unwrap_or_else(|e| panic!("{e}"));
    wait_until(WAIT, || {
        checks.running.load(std::sync::atomic::Ordering::SeqCst) == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_that_gets_no_answer_in_time_fails_and_says_so() {
    let server = HealthzServer::start().await;
    server.set_health_delay(Duration::from_secs(2));
    let logs = support::CapturedLogs::global();
    let check = fast_http_check()
        .timeout(Duration::from_millis(100))
        .unwrap_or_else(|e| panic!("{e}"));
    let client = HttpClient::builder()
        .health_check(check)
        .build::<Body>([server.addr]);
    wait_until(WAIT, || {
        check_of(&client, server.addr) == Some(CheckStatus::Failing)
    })
    .await;
    let port = server.addr.port().to_string();
    wait_until(WAIT, || {
        !logs
            .lines_with(&["no answer within 100ms", &port])
            .is_empty()
    })
    .await;
}
