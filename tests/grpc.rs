//! `GrpcChannel` under a tonic generated client (the standard health
//! service), against real tonic servers on loopback that record every call.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use tonic::Code;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tower_lb::client::GrpcChannel;
use tower_lb::grpc::MethodSafety;
use tower_lb::health::ConnectionState;
use tower_lb::request::Safety;
use tower_lb::retry::{Backoff, RetryPolicy};
use tower_lb::strategy::{RoundRobin, WeightedRoundRobin};
use tower_lb::EndpointState;

use support::grpc::{addrs, received, start_all, GrpcBehaviour, GrpcServer};
use support::raw_h2::{RawH2Behaviour, RawH2Server};

const HEALTH: &str = "grpc.health.v1.Health";

/// The default policy with a 1 ms backoff, so that tests do not wait on it.
fn fast_retries() -> RetryPolicy {
    RetryPolicy::new().backoff(Backoff::new().initial(Duration::from_millis(1)))
}

/// Health checks may repeat: they change nothing.
fn safe_checks() -> MethodSafety {
    MethodSafety::new().service(HEALTH, Safety::Safe)
}

fn check(id: &str) -> tonic::Request<HealthCheckRequest> {
    let mut request = tonic::Request::new(HealthCheckRequest::default());
    let id = id.parse().unwrap_or_else(|e| panic!("{e}"));
    request.metadata_mut().insert("x-request-id", id);
    request
}

async fn call(channel: &GrpcChannel, id: &str) -> Result<(), tonic::Status> {
    HealthClient::new(channel.clone())
        .check(check(id))
        .await
        .map(drop)
}

fn state_of(channel: &GrpcChannel, addr: SocketAddr) -> Option<EndpointState> {
    channel
        .balancer()
        .endpoints()
        .into_iter()
        .find(|e| e.key == addr)
        .map(|e| e.state)
}

#[tokio::test]
async fn calls_spread_evenly_over_every_server_through_the_generated_client() {
    let servers = start_all(vec![GrpcBehaviour::Serve; 3]).await;
    let channel = GrpcChannel::builder()
        .retry_policy(fast_retries())
        .strategy(RoundRobin::new())
        .build(addrs(&servers));
    support::wait_connected(channel.balancer()).await;
    for i in 0..300 {
        call(&channel, &format!("c{i}"))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let hits: Vec<usize> = servers.iter().map(GrpcServer::hits).collect();
    assert_eq!(hits, vec![100, 100, 100]);
}

#[tokio::test]
async fn calls_made_at_once_share_one_connection_per_server() {
    let servers = start_all(vec![GrpcBehaviour::Serve; 3]).await;
    let channel = GrpcChannel::builder()
        .strategy(RoundRobin::new())
        .build(addrs(&servers));
    let calls = (0..60).map(|i| {
        let channel = channel.clone();
        tokio::spawn(async move { call(&channel, &format!("once{i}")).await })
    });
    for call in calls.collect::<Vec<_>>() {
        call.await
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let connections: Vec<usize> = servers.iter().map(GrpcServer::connections).collect();
    assert_eq!(connections, vec![1, 1, 1]);
}

#[tokio::test]
async fn a_server_restarted_on_its_address_is_connected_to_again() {
    let first = GrpcServer::start(GrpcBehaviour::Serve).await;
    let addr = first.addr;
    let channel = GrpcChannel::builder()
        .retry_policy(fast_retries())
        .method_safety(safe_checks())
        .no_outlier_detection()
        .build([addr]);
    call(&channel, "before")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    first.kill();
    let down = call(&channel, "down")
        .await
        .err()
        .unwrap_or_else(|| panic!("a call succeeded with the server down"));
    assert_eq!(down.code(), Code::Unavailable, "{down:?}");
    let second = GrpcServer::start_at(addr, GrpcBehaviour::Serve).await;
    call(&channel, "after")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(second.received("after"), 1);
    assert_eq!(second.connections(), 1);
}

#[tokio::test]
async fn calls_name_tower_lb_as_their_user_agent() {
    let server = GrpcServer::start(GrpcBehaviour::Serve).await;
    let channel = GrpcChannel::builder().build([server.addr]);
    call(&channel, "ua").await.unwrap_or_else(|e| panic!("{e}"));
    let agent = server.last_user_agent().unwrap_or_default();
    assert_eq!(
        agent,
        concat!("grpc-rust-tower-lb/", env!("CARGO_PKG_VERSION"))
    );
}

#[tokio::test]
async fn a_configured_endpoint_is_a_tonic_channel_with_those_settings() {
    let server = GrpcServer::start(GrpcBehaviour::Serve).await;
    let channel = GrpcChannel::builder()
        .configure_endpoint(|e| e.user_agent("configured"))
        .build([server.addr]);
    call(&channel, "ua").await.unwrap_or_else(|e| panic!("{e}"));
    let agent = server.last_user_agent().unwrap_or_default();
    assert!(agent.starts_with("configured tonic/"), "{agent:?}");
}

#[tokio::test]
async fn an_unavailable_server_is_retried_elsewhere_and_ejected() {
    let servers = start_all(vec![
        GrpcBehaviour::Serve,
        GrpcBehaviour::Serve,
        GrpcBehaviour::Fail(Code::Unavailable),
    ])
    .await;
    let channel = GrpcChannel::builder()
        .retry_policy(fast_retries())
        .strategy(RoundRobin::new())
        .method_safety(safe_checks())
        .build(addrs(&servers));
    for i in 0..60 {
        call(&channel, &format!("c{i}"))
            .await
            .unwrap_or_else(|e| panic!("call {i}: {e}"));
    }
    // Five consecutive failures eject it (the default); one at a time, so
    // exactly five.
    assert_eq!(servers[2].hits(), 5);
    assert_eq!(
        state_of(&channel, servers[2].addr),
        Some(EndpointState::Ejected)
    );
    let stats = channel.retry_stats().unwrap_or_default();
    assert_eq!(stats.retries, 5, "{stats:?}");
}

#[tokio::test]
async fn invalid_argument_is_not_retried() {
    let servers = start_all(vec![GrpcBehaviour::Fail(Code::InvalidArgument); 3]).await;
    let channel = GrpcChannel::builder()
        .retry_policy(fast_retries())
        .method_safety(safe_checks())
        .build(addrs(&servers));
    let status = call(&channel, "bad")
        .await
        .err()
        .unwrap_or_else(|| panic!("no error"));
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(received(&servers, "bad"), 1);
    // Nor does it count against the server.
    assert!(channel
        .balancer()
        .endpoints()
        .iter()
        .all(|e| e.failures == 0));
}

#[tokio::test]
async fn unavailable_is_not_retried_for_a_method_that_may_not_repeat() {
    let servers = start_all(vec![GrpcBehaviour::Fail(Code::Unavailable); 2]).await;
    // No `MethodSafety`: a gRPC call is a POST, so it is unsafe.
    let channel = GrpcChannel::builder()
        .retry_policy(fast_retries())
        .build(addrs(&servers));
    let status = call(&channel, "once")
        .await
        .err()
        .unwrap_or_else(|| panic!("no error"));
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(received(&servers, "once"), 1);
}

#[tokio::test]
async fn a_call_the_caller_marks_idempotent_is_retried() {
    let servers = start_all(vec![
        GrpcBehaviour::Fail(Code::Unavailable),
        GrpcBehaviour::Serve,
    ])
    .await;
    let channel = GrpcChannel::builder()
        .retry_policy(fast_retries())
        .strategy(RoundRobin::new())
        .build(addrs(&servers));
    for i in 0..4 {
        let mut request = check(&format!("m{i}"));
        request.extensions_mut().insert(Safety::Idempotent);
        HealthClient::new(channel.clone())
            .check(request)
            .await
            .unwrap_or_else(|e| panic!("call {i}: {e}"));
    }
    assert!(
        servers[0].hits() >= 1,
        "round robin reached the failing server"
    );
}

fn connection_of(channel: &GrpcChannel, addr: SocketAddr) -> Option<ConnectionState> {
    channel
        .balancer()
        .endpoints()
        .into_iter()
        .find(|e| e.key == addr)
        .and_then(|e| e.connection)
}

#[tokio::test]
async fn an_address_that_refuses_connections_gets_no_calls_while_a_server_is_connected() {
    let server = GrpcServer::start(GrpcBehaviour::Serve).await;
    let refusing = support::refusing_addr().await;
    let channel = GrpcChannel::builder()
        .retry_policy(fast_retries())
        .strategy(RoundRobin::new())
        .no_outlier_detection()
        .build([refusing, server.addr]);
    support::wait_until(Duration::from_secs(5), || {
        connection_of(&channel, refusing) == Some(ConnectionState::Failed)
            && connection_of(&channel, server.addr) == Some(ConnectionState::Ready)
    })
    .await;
    for i in 0..6 {
        call(&channel, &format!("u{i}"))
            .await
            .unwrap_or_else(|e| panic!("call {i}: {e}"));
    }
    assert_eq!(server.hits(), 6);
    assert_eq!(channel.retry_stats().unwrap_or_default().retries, 0);
    let refused = channel.balancer().endpoints();
    let refused = refused.iter().find(|e| e.key == refusing);
    assert_eq!(refused.map(|e| (e.requests, e.failures)), Some((0, 0)));
}

#[tokio::test]
async fn a_refused_connection_is_retried_even_for_a_method_that_may_not_repeat() {
    // Nothing listens on either address, so neither connection is ready
    // and both stay in the picks: the call meets a refused connection on
    // one, is sent to the other, and meets another.
    let refusing = [
        support::refusing_addr().await,
        support::refusing_addr().await,
    ];
    let channel = GrpcChannel::builder()
        .retry_policy(fast_retries())
        .strategy(RoundRobin::new())
        .no_outlier_detection()
        .build(refusing);
    let status = call(&channel, "u").await.err();
    assert_eq!(status.map(|s| s.code()), Some(Code::Unavailable));
    let requests: Vec<u64> = channel
        .balancer()
        .endpoints()
        .iter()
        .map(|e| e.requests)
        .collect();
    assert!(requests.iter().all(|&r| r >= 1), "{requests:?}");
    assert!(channel.retry_stats().unwrap_or_default().retries >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_mid_run_is_drained_out_with_no_failed_calls() {
    let servers = start_all(vec![GrpcBehaviour::Delay(Duration::from_millis(2)); 3]).await;
    let channel = GrpcChannel::builder()
        .retry_policy(fast_retries())
        .method_safety(safe_checks())
        .build(addrs(&servers));
    let until = tokio::time::Instant::now() + Duration::from_millis(900);
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..8 {
        let channel = channel.clone();
        tasks.spawn(async move {
            let (mut calls, mut failures) = (0, Vec::new());
            while tokio::time::Instant::now() < until {
                if let Err(status) = call(&channel, &format!("t{task}-{calls}")).await {
                    failures.push(status.to_string());
                }
                calls += 1;
            }
            (calls, failures)
        });
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let killed_at = servers[0].hits();
    servers[0].crash().await;

    let (mut calls, mut failures) = (0, Vec::new());
    while let Some(done) = tasks.join_next().await {
        let (c, f) = done.unwrap_or_else(|e| panic!("{e}"));
        calls += c;
        failures.extend(f);
    }
    println!(
        "{calls} calls, {} retries, killed server had {killed_at}",
        channel.retry_stats().unwrap_or_default().retries
    );
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(3)]
    );
    assert!(killed_at > 0, "the killed server had taken calls");
    // Out of the picks: its connection failing to be made again (or, if
    // calls met enough refused connections before that, ejected).
    assert!(
        connection_of(&channel, servers[0].addr) == Some(ConnectionState::Failed)
            || state_of(&channel, servers[0].addr) == Some(EndpointState::Ejected),
        "{:?}",
        channel.balancer().endpoints()
    );
    assert_eq!(channel.balancer().in_flight(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orca_trailers_shift_weighted_round_robin() {
    let servers = start_all(vec![GrpcBehaviour::Serve; 2]).await;
    // Same rate, utilization 0.1 against 0.4: weights 4 to 1.
    servers[0].report_load(0.1, 100.0);
    servers[1].report_load(0.4, 100.0);
    let channel = GrpcChannel::builder()
        .retry_policy(fast_retries())
        .strategy(
            WeightedRoundRobin::new()
                .blackout_period(Duration::from_millis(200))
                .weight_update_period(Duration::from_millis(100))
                .expect("valid setting"),
        )
        .build(addrs(&servers));
    let drive = |period: Duration| {
        let channel = channel.clone();
        async move {
            let until = tokio::time::Instant::now() + period;
            let mut i = 0;
            while tokio::time::Instant::now() < until {
                call(&channel, &format!("w{i}"))
                    .await
                    .unwrap_or_else(|e| panic!("{e}"));
                i += 1;
            }
        }
    };
    // Reports, the blackout, and a few weight updates.
    drive(Duration::from_millis(800)).await;
    let before: Vec<usize> = servers.iter().map(GrpcServer::hits).collect();
    drive(Duration::from_millis(800)).await;
    let during: Vec<usize> = servers
        .iter()
        .zip(&before)
        .map(|(s, b)| s.hits() - b)
        .collect();
    let share = during[0] as f64 / (during[0] + during[1]) as f64;
    println!("calls after the weights settled: {during:?}, share of the lightly loaded server {share:.3}");
    assert!((share - 0.8).abs() < 0.05, "share {share:.3}, want 0.8");
    let loads = channel.balancer().endpoints();
    assert!(loads.iter().all(|e| e.reported_load.is_some()), "{loads:?}");
}

#[tokio::test]
async fn the_grpc_timeout_of_a_call_bounds_it_retries_included() {
    // Three slow servers, a safe method and no attempt timeout: without the
    // call's own deadline the retry layer would try each in turn.
    let servers = start_all(vec![GrpcBehaviour::Delay(Duration::from_millis(150)); 3]).await;
    let channel = GrpcChannel::builder()
        .retry_policy(fast_retries())
        .method_safety(safe_checks())
        .no_outlier_detection()
        .build(addrs(&servers));
    let mut request = check("slow");
    request.set_timeout(Duration::from_millis(100));
    let started = tokio::time::Instant::now();
    let status = HealthClient::new(channel.clone())
        .check(request)
        .await
        .err()
        .unwrap_or_else(|| panic!("no error"));
    let took = started.elapsed();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(took < Duration::from_millis(180), "{took:?}");
    assert_eq!(channel.retry_stats().unwrap_or_default().retries, 0);
}

#[tokio::test]
async fn a_callers_short_grpc_timeouts_are_not_held_against_healthy_servers() {
    let servers = start_all(vec![GrpcBehaviour::Delay(Duration::from_millis(200)); 3]).await;
    let channel = GrpcChannel::builder()
        .method_safety(safe_checks())
        .build(addrs(&servers));
    for i in 0..30 {
        let mut request = check(&format!("t{i}"));
        request.set_timeout(Duration::from_millis(20));
        let status = HealthClient::new(channel.clone())
            .check(request)
            .await
            .err()
            .unwrap_or_else(|| panic!("no error"));
        assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    }
    let endpoints = channel.balancer().endpoints();
    assert!(
        endpoints
            .iter()
            .all(|e| e.failures == 0 && e.ejections == 0),
        "{endpoints:?}"
    );
}

#[tokio::test]
async fn each_attempt_tells_the_server_the_time_left() {
    // Round robin over a failing server and a serving one, and calls until
    // one starts on the failing server: the last call the serving server
    // gets is that one's retry, 300 ms into the call.
    let servers = start_all(vec![
        GrpcBehaviour::Fail(Code::Unavailable),
        GrpcBehaviour::Serve,
    ])
    .await;
    let backoff = Backoff::new()
        .initial(Duration::from_millis(300))
        .max(Duration::from_millis(300))
        .jitter(0.0);
    let channel = GrpcChannel::builder()
        .deadline(Duration::from_secs(2))
        .retry_policy(RetryPolicy::new().backoff(backoff.expect("valid setting")))
        .strategy(RoundRobin::new())
        .method_safety(safe_checks())
        .build(addrs(&servers));
    let mut id = 0;
    while servers[0].hits() == 0 {
        id += 1;
        call(&channel, &format!("timed-{id}"))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let sent = servers[1]
        .last_grpc_timeout()
        .unwrap_or_else(|| panic!("no grpc-timeout reached the server"));
    // The whole budget less the failed attempt and the backoff.
    assert!(
        sent <= Duration::from_millis(1_700) && sent > Duration::from_millis(1_200),
        "{sent:?}"
    );
}

#[tokio::test]
async fn without_a_deadline_no_grpc_timeout_is_sent() {
    let server = GrpcServer::start(GrpcBehaviour::Serve).await;
    let channel = GrpcChannel::builder().build([server.addr]);
    call(&channel, "untimed")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(server.last_grpc_timeout(), None);
}

#[tokio::test]
async fn a_closed_channel_answers_unavailable() {
    let server = GrpcServer::start(GrpcBehaviour::Serve).await;
    let channel = GrpcChannel::builder().build([server.addr]);
    call(&channel, "before")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    channel.close();
    let status = call(&channel, "after")
        .await
        .err()
        .unwrap_or_else(|| panic!("no error"));
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(server.received("after"), 0);
}

#[tokio::test]
async fn a_closed_balancer_answers_unavailable_too() {
    let server = GrpcServer::start(GrpcBehaviour::Serve).await;
    let channel = GrpcChannel::builder().build([server.addr]);
    channel.balancer().close();
    let status = call(&channel, "after")
        .await
        .err()
        .unwrap_or_else(|| panic!("no error"));
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
}

#[tokio::test]
async fn shutdown_waits_for_a_call_between_two_attempts() {
    let servers = start_all(vec![
        GrpcBehaviour::Fail(Code::Unavailable),
        GrpcBehaviour::Serve,
    ])
    .await;
    let channel = GrpcChannel::builder()
        .retry_policy(
            RetryPolicy::new().backoff(Backoff::new().initial(Duration::from_millis(300))),
        )
        .strategy(RoundRobin::new())
        .method_safety(safe_checks())
        .build(addrs(&servers));
    support::wait_connected(channel.balancer()).await;
    // Round robin starts at random: once a call has drawn the failing
    // server (then the other, on its retry, which takes no turn), the next
    // starts with the serving one and the one after with the failing one.
    let mut warm = 0;
    while servers[0].hits() == 0 {
        warm += 1;
        call(&channel, &format!("warm-{warm}"))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    call(&channel, "the-serving-ones-turn")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let in_progress = {
        let channel = channel.clone();
        tokio::spawn(async move { call(&channel, "slow-retry").await })
    };
    support::wait_until(Duration::from_secs(5), || {
        received(&servers, "slow-retry") == 1
    })
    .await;
    assert_eq!(
        servers[0].received("slow-retry"),
        1,
        "the first attempt drew the failing server"
    );
    channel
        .shutdown(Duration::from_secs(5))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let result = in_progress.await.unwrap_or_else(|e| panic!("{e}"));
    assert!(result.is_ok(), "{result:?}");
    assert_eq!(servers[1].received("slow-retry"), 1);
    let refused = call(&channel, "late")
        .await
        .err()
        .unwrap_or_else(|| panic!("no error"));
    assert_eq!(refused.code(), Code::Unavailable);
}

#[tokio::test]
async fn orca_reports_in_trailers_only_errors_are_read() {
    let servers = start_all(vec![GrpcBehaviour::Fail(Code::NotFound); 2]).await;
    for server in &servers {
        server.report_load(0.5, 10.0);
    }
    let channel = GrpcChannel::builder()
        .strategy(RoundRobin::new())
        .build(addrs(&servers));
    for i in 0..4 {
        let status = call(&channel, &format!("n{i}"))
            .await
            .err()
            .unwrap_or_else(|| panic!("no error"));
        assert_eq!(status.code(), Code::NotFound);
    }
    let endpoints = channel.balancer().endpoints();
    assert!(
        endpoints.iter().all(|e| e.reported_load.is_some()),
        "{endpoints:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsafe_call_is_never_sent_twice_when_its_server_is_killed() {
    let servers = start_all(vec![GrpcBehaviour::Delay(Duration::from_millis(50)); 2]).await;
    // No `MethodSafety`: every call is unsafe.
    let channel = GrpcChannel::builder()
        .retry_policy(fast_retries())
        .strategy(RoundRobin::new())
        .build(addrs(&servers));
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..40 {
        let channel = channel.clone();
        calls.spawn(async move { call(&channel, &format!("u{i}")).await });
    }
    support::wait_until(Duration::from_secs(5), || servers[0].hits() >= 10).await;
    servers[0].kill();
    let mut failed = 0;
    while let Some(done) = calls.join_next().await {
        if done.unwrap_or_else(|e| panic!("{e}")).is_err() {
            failed += 1;
        }
    }
    let twice = (0..40)
        .filter(|i| received(&servers, &format!("u{i}")) > 1)
        .count();
    assert!(failed > 0, "the kill cut calls that had reached the server");
    assert_eq!(twice, 0, "{twice} unsafe calls were received twice");
}

#[tokio::test]
async fn an_https_endpoint_never_falls_back_to_plain_text() {
    let server = GrpcServer::start(GrpcBehaviour::Serve).await;
    let channel = GrpcChannel::builder()
        .scheme(http::uri::Scheme::HTTPS)
        .method_safety(safe_checks())
        .build([server.addr]);
    let status = call(&channel, "tls")
        .await
        .err()
        .unwrap_or_else(|| panic!("no error"));
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(server.hits(), 0, "a call reached the plain-text server");
}

#[tokio::test]
async fn an_address_whose_configuration_fails_is_left_out() {
    let servers = start_all(vec![GrpcBehaviour::Serve; 2]).await;
    let bad_port = servers[0].addr.port();
    let channel = GrpcChannel::builder()
        .method_safety(safe_checks())
        .configure_endpoint(move |e| {
            if e.uri().port_u16() == Some(bad_port) {
                e.user_agent("bad\nagent")
            } else {
                Ok(e)
            }
        })
        .build(addrs(&servers));
    for i in 0..20 {
        call(&channel, &format!("cfg{i}"))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    assert_eq!(servers[0].hits(), 0);
    assert_eq!(servers[1].hits(), 20);
    let keys: Vec<_> = channel
        .balancer()
        .endpoints()
        .into_iter()
        .map(|e| e.key)
        .collect();
    assert_eq!(keys, vec![servers[1].addr]);
}

#[tokio::test]
async fn an_endpoint_timeout_of_tonics_own_is_held_against_the_endpoint() {
    let server = GrpcServer::start(GrpcBehaviour::Delay(Duration::from_secs(2))).await;
    let channel = GrpcChannel::builder()
        .no_outlier_detection()
        .configure_endpoint(|e| Ok(e.timeout(Duration::from_millis(50))))
        .build([server.addr]);
    let status = call(&channel, "slow")
        .await
        .err()
        .unwrap_or_else(|| panic!("no error"));
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert_eq!(channel.balancer().endpoints()[0].failures, 1);
}

#[tokio::test]
async fn an_attempt_timeout_reaches_the_client_as_deadline_exceeded() {
    let server = GrpcServer::start(GrpcBehaviour::Delay(Duration::from_secs(5))).await;
    let channel = GrpcChannel::builder()
        .retry_policy(fast_retries())
        .attempt_timeout(Duration::from_millis(50))
        .deadline(Duration::from_millis(300))
        .method_safety(safe_checks())
        .build([server.addr]);
    let status = call(&channel, "slow")
        .await
        .err()
        .unwrap_or_else(|| panic!("no error"));
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
}

#[tokio::test]
async fn no_endpoint_reaches_the_client_as_unavailable() {
    let channel = GrpcChannel::builder()
        .retry_policy(fast_retries())
        .balancer(|b| b.startup_wait(Duration::from_millis(50)))
        .build([]);
    let status = call(&channel, "none")
        .await
        .err()
        .unwrap_or_else(|| panic!("no error"));
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("no endpoints"), "{status:?}");
}

#[tokio::test]
async fn built_from_a_dns_name_calls_carry_the_name_as_their_authority() {
    let server = GrpcServer::start(GrpcBehaviour::Serve).await;
    let dns = support::dns::TestDns::start("test.").await;
    dns.set_a("orders.test.", &[std::net::Ipv4Addr::LOCALHOST], 60)
        .await;
    let channel = GrpcChannel::builder()
        .build_dns(
            tower_lb::discover::Dns::host("orders.test.", server.addr.port())
                .name_servers([dns.addr]),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    HealthClient::new(channel)
        .check(check("named"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let authority = format!("orders.test:{}", server.addr.port());
    assert_eq!(server.last_authority(), Some(authority));
}

#[tokio::test]
async fn a_call_whose_stream_was_refused_is_sent_elsewhere_even_if_unsafe() {
    let refusing = support::RefusingH2Server::start().await;
    let server = GrpcServer::start(GrpcBehaviour::Serve).await;
    // No `MethodSafety`: every call is unsafe, so only the proof that the
    // server processed nothing lets it go elsewhere.
    let channel = GrpcChannel::builder()
        .retry_policy(fast_retries())
        .strategy(RoundRobin::new())
        .no_outlier_detection()
        .build([refusing.addr, server.addr]);
    for i in 0..10 {
        call(&channel, &format!("r{i}"))
            .await
            .unwrap_or_else(|e| panic!("call {i}: {e}"));
    }
    assert!(
        refusing.refused() >= 4,
        "round robin drew the refusing server: {}",
        refusing.refused()
    );
    assert!((0..10).all(|i| server.received(&format!("r{i}")) == 1));
}

#[tokio::test]
async fn a_call_whose_stream_was_refused_reaches_the_caller_as_unavailable() {
    let refusing = support::RefusingH2Server::start().await;
    let channel = GrpcChannel::builder()
        .no_retries()
        .no_outlier_detection()
        .build([refusing.addr]);
    let status = call(&channel, "refused")
        .await
        .err()
        .unwrap_or_else(|| panic!("a refused stream answered"));
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
}

#[tokio::test]
async fn a_call_left_unprocessed_by_a_graceful_goaway_reaches_the_caller_as_unavailable() {
    let going = RawH2Server::start(RawH2Behaviour::GoAway(0)).await;
    let channel = GrpcChannel::builder()
        .no_retries()
        .no_outlier_detection()
        .build([going.addr]);
    let status = call(&channel, "going")
        .await
        .err()
        .unwrap_or_else(|| panic!("a server going away answered"));
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
}

#[tokio::test]
async fn a_call_the_server_did_not_process_before_a_graceful_goaway_is_sent_elsewhere_once() {
    let going = RawH2Server::start(RawH2Behaviour::GoAway(0)).await;
    let server = GrpcServer::start(GrpcBehaviour::Serve).await;
    // No `MethodSafety`: every call is unsafe, so only the proof that the
    // server processed nothing lets it go elsewhere.
    let channel = GrpcChannel::builder()
        .retry_policy(fast_retries())
        .strategy(RoundRobin::new())
        .build([going.addr, server.addr]);
    for i in 0..10 {
        call(&channel, &format!("g{i}"))
            .await
            .unwrap_or_else(|e| panic!("call {i}: {e}"));
    }
    assert!(
        going.streams() >= 4,
        "round robin drew the server going away: {}",
        going.streams()
    );
    assert!((0..10).all(|i| server.received(&format!("g{i}")) == 1));
}

#[tokio::test]
async fn a_graceful_goaway_is_not_held_against_the_grpc_server() {
    let going = RawH2Server::start(RawH2Behaviour::GoAway(0)).await;
    let server = GrpcServer::start(GrpcBehaviour::Serve).await;
    let channel = GrpcChannel::builder()
        .retry_policy(fast_retries())
        .strategy(RoundRobin::new())
        .build([going.addr, server.addr]);
    for i in 0..10 {
        call(&channel, &format!("g{i}"))
            .await
            .unwrap_or_else(|e| panic!("call {i}: {e}"));
    }
    assert!(going.streams() >= 4, "{}", going.streams());
    let stats = channel
        .balancer()
        .endpoints()
        .into_iter()
        .find(|e| e.key == going.addr)
        .unwrap_or_else(|| panic!("endpoint known"));
    assert_eq!(
        (stats.failures, stats.state),
        (0, EndpointState::Active),
        "{stats:?}"
    );
}

#[tokio::test]
async fn a_call_cut_off_by_a_goaway_with_an_error_code_is_not_sent_again() {
    // INTERNAL_ERROR: h2 hands such an error to every open stream, so it
    // proves nothing about what the server processed.
    let going = RawH2Server::start(RawH2Behaviour::GoAway(2)).await;
    let server = GrpcServer::start(GrpcBehaviour::Serve).await;
    let channel = GrpcChannel::builder()
        .retry_policy(fast_retries())
        .strategy(RoundRobin::new())
        .no_outlier_detection()
        .build([going.addr, server.addr]);
    let mut failed = Vec::new();
    for i in 0..10 {
        let id = format!("e{i}");
        if call(&channel, &id).await.is_err() {
            failed.push(id);
        }
    }
    assert!(
        failed.len() >= 4,
        "round robin drew the server going away: {failed:?}"
    );
    assert!(
        failed.iter().all(|id| server.received(id) == 0),
        "{failed:?}"
    );
}

/// The status of a call to a single `server` that may not repeat.
async fn status_of_one_unsafe_call(server: SocketAddr) -> tonic::Status {
    let channel = GrpcChannel::builder()
        .retry_policy(fast_retries())
        .build([server]);
    call(&channel, "once")
        .await
        .err()
        .unwrap_or_else(|| panic!("the call succeeded"))
}

#[tokio::test]
async fn a_connection_reset_mid_call_reaches_the_caller_as_unavailable() {
    let server = GrpcServer::start(GrpcBehaviour::Delay(Duration::from_secs(10))).await;
    let status = tokio::spawn(status_of_one_unsafe_call(server.addr));
    support::wait_until(Duration::from_secs(5), || server.hits() == 1).await;
    server.kill();
    let status = status.await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
}

#[tokio::test]
async fn a_connection_closed_before_the_answer_reaches_the_caller_as_unavailable() {
    let server = RawH2Server::start(RawH2Behaviour::Close).await;
    let status = status_of_one_unsafe_call(server.addr).await;
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
}

#[tokio::test]
async fn a_connection_closed_in_the_middle_of_the_answer_reaches_the_caller_as_unavailable() {
    let server = RawH2Server::start(RawH2Behaviour::AnswerHeadersThenClose).await;
    let status = status_of_one_unsafe_call(server.addr).await;
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
}

#[tokio::test]
async fn a_server_that_refuses_a_deadline_too_short_for_its_work_is_not_held_against() {
    // The server answers DEADLINE_EXCEEDED at once: the caller chose a
    // deadline shorter than the work. Healthy servers, every call a
    // server's answer: none may count, so none is ejected.
    let servers = start_all(vec![
        GrpcBehaviour::RefuseShortDeadline(Duration::from_secs(
            1
        ));
        3
    ])
    .await;
    let channel = GrpcChannel::builder()
        .method_safety(safe_checks())
        .build(addrs(&servers));
    for i in 0..30 {
        let mut request = check(&format!("early{i}"));
        request.set_timeout(Duration::from_millis(300));
        let status = HealthClient::new(channel.clone())
            .check(request)
            .await
            .err()
            .unwrap_or_else(|| panic!("no error"));
        assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    }
    let endpoints = channel.balancer().endpoints();
    assert!(
        endpoints
            .iter()
            .all(|e| e.failures == 0 && e.ejections == 0),
        "{endpoints:?}"
    );
    let answered: u64 = endpoints.iter().map(|e| e.requests).sum();
    assert_eq!(answered, 30, "every call reached a server: {endpoints:?}");
}

#[tokio::test]
async fn a_server_that_enforces_the_callers_deadline_is_never_ejected() {
    // 300 ms deadlines on 1 s of work: the server's DEADLINE_EXCEEDED and
    // the client's own timer race; whichever wins, nothing counts.
    let servers = start_all(vec![
        GrpcBehaviour::EnforceDeadline(Duration::from_secs(1));
        3
    ])
    .await;
    let channel = GrpcChannel::builder()
        .method_safety(safe_checks())
        .build(addrs(&servers));
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..60 {
        let channel = channel.clone();
        calls.spawn(async move {
            let mut request = check(&format!("late{i}"));
            request.set_timeout(Duration::from_millis(300));
            HealthClient::new(channel).check(request).await
        });
    }
    while let Some(result) = calls.join_next().await {
        let status = result
            .unwrap_or_else(|e| panic!("{e}"))
            .err()
            .unwrap_or_else(|| panic!("no error"));
        assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    }
    let endpoints = channel.balancer().endpoints();
    assert!(
        endpoints
            .iter()
            .all(|e| e.failures == 0 && e.ejections == 0),
        "{endpoints:?}"
    );
}

#[tokio::test]
async fn a_servers_deadline_exceeded_with_most_of_a_long_deadline_left_is_its_failure() {
    // 10 s were left: the server speaks of a deadline of its own (a
    // dependency that timed out), or it is broken. Either way it counts.
    let server = GrpcServer::start(GrpcBehaviour::Fail(Code::DeadlineExceeded)).await;
    let channel = GrpcChannel::builder()
        .no_outlier_detection()
        .build([server.addr]);
    let mut request = check("long");
    request.set_timeout(Duration::from_secs(10));
    let status = HealthClient::new(channel.clone())
        .check(request)
        .await
        .err()
        .unwrap_or_else(|| panic!("no error"));
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert_eq!(channel.balancer().endpoints()[0].failures, 1);
}

#[tokio::test]
async fn without_a_callers_deadline_a_servers_deadline_exceeded_is_its_failure() {
    // No deadline was sent: the server's DEADLINE_EXCEEDED is about its own
    // work (a dependency timing out), so it counts.
    let server = GrpcServer::start(GrpcBehaviour::Fail(Code::DeadlineExceeded)).await;
    let channel = GrpcChannel::builder()
        .no_outlier_detection()
        .build([server.addr]);
    let status = call(&channel, "own")
        .await
        .err()
        .unwrap_or_else(|| panic!("no error"));
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert_eq!(channel.balancer().endpoints()[0].failures, 1);
}
