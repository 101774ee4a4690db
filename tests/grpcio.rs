//! `GrpcChannel` on its defaults against real Python grpcio servers (gRPC's
//! C core, not a server of ours): the standard health service, and a
//! generic method that answers UNAVAILABLE, or enforces the caller's
//! deadline as a well-behaved server does (issue 16, item 3).

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tower_lb::client::{GrpcChannel, Http2KeepAlive};
use tower_lb::grpc::MethodSafety;
use tower_lb::request::Safety;
use tower_lb::strategy::RoundRobin;
use tower_lb::{EndpointState, EndpointStats};

use support::grpcio::{addrs, work, GrpcioServer, Mode};
use support::wait_until;

/// The caller's deadline in the deadline tests.
const DEADLINE: Duration = Duration::from_millis(300);
/// How long the work takes on a server that enforces deadlines.
const WORK: Duration = Duration::from_secs(1);
/// Calls in the deadline tests, and how many are in flight at once.
const CALLS: usize = 60;
const CONCURRENCY: usize = 20;

async fn start_all(modes: &[Mode]) -> Vec<GrpcioServer> {
    let starting = modes.iter().map(|&mode| GrpcioServer::start(mode));
    join_all(starting).await
}

/// Starts every server at once (each takes a few hundred ms to import
/// grpcio).
async fn join_all<F>(futures: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut outputs = Vec::with_capacity(handles.len());
    for handle in handles {
        outputs.push(handle.await.unwrap_or_else(|e| panic!("{e}")));
    }
    outputs
}

fn stats_of(channel: &GrpcChannel, addr: SocketAddr) -> EndpointStats<SocketAddr> {
    channel
        .balancer()
        .endpoints()
        .into_iter()
        .find(|e| e.key == addr)
        .unwrap_or_else(|| panic!("{addr} is not an endpoint"))
}

fn describe(channel: &GrpcChannel) -> String {
    channel
        .balancer()
        .endpoints()
        .iter()
        .map(|e| {
            format!(
                "{}: {} requests, {} failures, {} ejections, {:?}",
                e.key, e.requests, e.failures, e.ejections, e.state
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Makes `CALLS` calls with a `DEADLINE` each, `CONCURRENCY` at a time, and
/// returns each call's status code and how long it took.
async fn calls_with_a_short_deadline(channel: &GrpcChannel) -> Vec<(Code, Duration)> {
    let mut results = Vec::with_capacity(CALLS);
    for _ in 0..CALLS / CONCURRENCY {
        let wave: Vec<_> = (0..CONCURRENCY)
            .map(|_| {
                let channel = channel.clone();
                tokio::spawn(async move {
                    let started = tokio::time::Instant::now();
                    let code = match work(channel, b"work", Some(DEADLINE)).await {
                        Ok(_) => Code::Ok,
                        Err(status) => status.code(),
                    };
                    (code, started.elapsed())
                })
            })
            .collect();
        for call in wave {
            results.push(call.await.unwrap_or_else(|e| panic!("{e}")));
        }
    }
    results
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_enforces_the_callers_deadline_is_never_held_against_it() {
    let servers = start_all(&[Mode::EnforceDeadline(WORK); 2]).await;
    let channel = GrpcChannel::builder().build(addrs(&servers));

    let results = calls_with_a_short_deadline(&channel).await;

    eprintln!("enforce-deadline: {}", describe(&channel));
    assert!(
        results
            .iter()
            .all(|(code, _)| *code == Code::DeadlineExceeded),
        "{results:?}"
    );
    for server in &servers {
        let stats = stats_of(&channel, server.addr);
        assert_eq!(
            (stats.failures, stats.ejections),
            (0, 0),
            "the caller's deadline ran out, the server said so: {}",
            describe(&channel)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_answers_deadline_exceeded_early_is_never_held_against_it() {
    let servers = start_all(&[Mode::EarlyDeadline(WORK); 2]).await;
    let channel = GrpcChannel::builder().build(addrs(&servers));

    let results = calls_with_a_short_deadline(&channel).await;

    eprintln!("early-deadline: {}", describe(&channel));
    // The server's answers, before the caller's own timer: most of them at
    // least (a loaded machine may hold a few back until the timer fires).
    assert!(
        results
            .iter()
            .all(|(code, _)| *code == Code::DeadlineExceeded),
        "{results:?}"
    );
    let answered = results.iter().filter(|(_, took)| *took < DEADLINE).count();
    assert!(answered * 2 >= results.len(), "{results:?}");
    for server in &servers {
        let stats = stats_of(&channel, server.addr);
        assert_eq!(
            (stats.failures, stats.ejections),
            (0, 0),
            "the server saw the caller's deadline could not be met: {}",
            describe(&channel)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_answering_unavailable_is_ejected_after_five_and_the_healthy_one_takes_the_traffic(
) {
    let servers = start_all(&[Mode::Unavailable, Mode::Serve]).await;
    let (unavailable, healthy) = (servers[0].addr, servers[1].addr);
    // Work may repeat here, so that each UNAVAILABLE is retried; round
    // robin, so that the failing server keeps getting first attempts until
    // it is ejected (P2C would soon avoid it for being quicker to fail...
    // or not: it is a race).
    let channel = GrpcChannel::builder()
        .strategy(RoundRobin::new())
        .method_safety(MethodSafety::new().service("fieldtest.Modes", Safety::Safe))
        .build(addrs(&servers));

    for i in 0..60 {
        let reply = work(channel.clone(), b"hello", None).await;
        assert_eq!(
            reply.as_deref().map_err(tonic::Status::code),
            Ok(&b"hello"[..]),
            "call {i}: {}",
            describe(&channel)
        );
    }

    eprintln!("unavailable + serve: {}", describe(&channel));
    wait_until(Duration::from_secs(5), || {
        stats_of(&channel, unavailable).state == EndpointState::Ejected
    })
    .await;
    let stats = stats_of(&channel, unavailable);
    // Five consecutive failures (the default), one call at a time.
    assert_eq!((stats.requests, stats.failures), (5, 5), "{stats:?}");
    let stats = stats_of(&channel, healthy);
    assert_eq!((stats.requests, stats.failures), (60, 0), "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_health_service_of_every_server_answers_serving() {
    let servers = start_all(&[Mode::Serve, Mode::Serve]).await;
    let channel = GrpcChannel::builder()
        .method_safety(MethodSafety::new().service("grpc.health.v1.Health", Safety::Safe))
        .build(addrs(&servers));

    for service in ["", "fieldtest.Modes", "", "fieldtest.Modes"] {
        let reply = HealthClient::new(channel.clone())
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .unwrap_or_else(|e| panic!("Check({service:?}): {e}"))
            .into_inner();
        assert_eq!(reply.status(), ServingStatus::Serving, "{service:?}");
    }
    let requests: Vec<u64> = servers
        .iter()
        .map(|s| stats_of(&channel, s.addr).requests)
        .collect();
    assert_eq!(requests.iter().sum::<u64>(), 4, "{}", describe(&channel));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_dies_mid_call_reaches_the_caller_as_unavailable() {
    let servers = start_all(&[Mode::Exit]).await;
    let channel = GrpcChannel::builder().build(addrs(&servers));

    let status = work(channel.clone(), b"work", None)
        .await
        .err()
        .unwrap_or_else(|| panic!("a server that died answered"));

    eprintln!("exit: {status:?}");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
}

/// A server that is `kill -STOP`ped keeps its connections open and its
/// kernel keeps taking bytes, so TCP never says it is gone: HTTP/2 pings
/// do. Its calls in flight fail when the ping goes unanswered, idempotent
/// ones are resent to the others, and new calls avoid it; no call fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_server_is_found_by_keep_alive_and_no_idempotent_call_fails() {
    let servers = start_all(&[Mode::Serve, Mode::Serve, Mode::Serve]).await;
    // Generous for a loaded machine: a busy server's connection must not
    // miss a ping.
    let keep_alive = Http2KeepAlive::new(Duration::from_millis(500), Duration::from_secs(1))
        .unwrap_or_else(|e| panic!("{e}"));
    let channel = GrpcChannel::builder()
        .method_safety(MethodSafety::new().method(support::grpcio::WORK, Safety::Idempotent))
        .http2_keep_alive(keep_alive)
        .build(addrs(&servers));
    for _ in 0..30 {
        work(channel.clone(), b"warm", None)
            .await
            .unwrap_or_else(|status| panic!("{status}"));
    }
    let stopped = servers[0].addr;
    assert!(
        stats_of(&channel, stopped).requests > 0,
        "{}",
        describe(&channel)
    );

    servers[0].stop();
    let started = Instant::now();
    // Four callers for 4 s: every call must succeed, the ones caught on the
    // stopped server within about the keep-alive's interval and timeout.
    let callers = (0..4).map(|_| {
        let channel = channel.clone();
        async move {
            let mut slowest = Duration::ZERO;
            let mut calls = 0;
            while started.elapsed() < Duration::from_secs(4) {
                let call = Instant::now();
                // Bounded, so that a call left hanging fails the test
                // rather than stalling it.
                tokio::time::timeout(
                    Duration::from_secs(5),
                    work(channel.clone(), b"during", None),
                )
                .await
                .unwrap_or_else(|_| panic!("a call hung on the stopped server"))
                .unwrap_or_else(|status| panic!("a call failed: {status}"));
                slowest = slowest.max(call.elapsed());
                calls += 1;
            }
            (calls, slowest)
        }
    });
    let results = join_all(callers).await;
    let sent_to_stopped = stats_of(&channel, stopped).requests;
    servers[0].resume();
    let slowest = results.iter().map(|r| r.1).max().unwrap_or_default();
    let calls: usize = results.iter().map(|r| r.0).sum();
    assert!(
        calls > 100,
        "only {calls} calls in 4 s: {}",
        describe(&channel)
    );
    assert!(
        slowest < Duration::from_secs(4),
        "a call caught on the stopped server took {slowest:?}: {}",
        describe(&channel)
    );
    // After the first calls caught there, the stopped server is avoided.
    let failures = stats_of(&channel, stopped).failures;
    assert!(failures >= 1, "{}", describe(&channel));
    assert!(
        sent_to_stopped < 60,
        "{sent_to_stopped} calls went to the stopped server: {}",
        describe(&channel)
    );
}
