//! The clients' own HTTP/2 connections tell the balancer how they stand: an
//! endpoint whose connection is being made, or cannot be made, gets no
//! calls while another endpoint's connection is ready. Real tonic and hyper
//! servers on loopback, an address that never answers a connect, and one
//! that refuses.

mod support;

use std::time::Duration;

use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tower::ServiceExt;
use tower_lb::client::{BalancerHandle, GrpcChannel, HttpClient};
use tower_lb::health::ConnectionState;

use support::grpc::{GrpcBehaviour, GrpcServer};
use support::BlackHole;

fn connection_of<K: Clone + PartialEq>(
    balancer: &BalancerHandle<K>,
    key: &K,
) -> Option<ConnectionState> {
    balancer
        .endpoints()
        .into_iter()
        .find(|e| e.key == *key)
        .and_then(|e| e.connection)
}

fn requests_to<K: Clone + PartialEq>(balancer: &BalancerHandle<K>, key: &K) -> Option<u64> {
    balancer
        .endpoints()
        .into_iter()
        .find(|e| e.key == *key)
        .map(|e| e.requests)
}

/// Waits until the endpoint at `key` has its connection `state`, and the
/// balancer has published what that changes.
async fn wait_for_connection<K: Clone + PartialEq>(
    balancer: &BalancerHandle<K>,
    key: &K,
    state: ConnectionState,
) {
    support::wait_until(Duration::from_secs(10), || {
        connection_of(balancer, key) == Some(state)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(50)).await;
}

async fn call(channel: &GrpcChannel) -> Result<(), tonic::Status> {
    HealthClient::new(channel.clone())
        .check(HealthCheckRequest::default())
        .await
        .map(drop)
}

#[tokio::test]
async fn a_grpc_endpoint_still_connecting_gets_no_calls_while_another_is_connected() {
    let server = GrpcServer::start(GrpcBehaviour::Serve).await;
    let hole = BlackHole::start().await;
    let channel = GrpcChannel::builder().build([hole.addr, server.addr]);
    let balancer = channel.balancer();
    wait_for_connection(balancer, &server.addr, ConnectionState::Ready).await;
    for i in 0..20 {
        let started = tokio::time::Instant::now();
        call(&channel)
            .await
            .unwrap_or_else(|e| panic!("call {i}: {e}"));
        // Not one waited on the connect that hangs.
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "call {i} waited"
        );
    }
    assert_eq!(server.hits(), 20);
    assert_eq!(requests_to(balancer, &hole.addr), Some(0));
    assert_eq!(
        connection_of(balancer, &hole.addr),
        Some(ConnectionState::Connecting)
    );
}

#[tokio::test]
async fn a_grpc_server_that_went_away_gets_no_calls_and_is_picked_again_once_back() {
    let staying = GrpcServer::start(GrpcBehaviour::Serve).await;
    let leaving = GrpcServer::start(GrpcBehaviour::Serve).await;
    let addr = leaving.addr;
    let channel = GrpcChannel::builder().build([staying.addr, addr]);
    let balancer = channel.balancer();
    support::wait_connected(balancer).await;

    leaving.kill();
    wait_for_connection(balancer, &addr, ConnectionState::Failed).await;
    let before = requests_to(balancer, &addr);
    for i in 0..20 {
        call(&channel)
            .await
            .unwrap_or_else(|e| panic!("call {i}: {e}"));
    }
    assert_eq!(requests_to(balancer, &addr), before, "no call went to it");

    // Back on its address: connected again by the client's own back-off
    // (1 s, then 1.6 s, ...), without a call having to find it.
    let back = GrpcServer::start_at(addr, GrpcBehaviour::Serve).await;
    wait_for_connection(balancer, &addr, ConnectionState::Ready).await;
    for i in 0..40 {
        call(&channel)
            .await
            .unwrap_or_else(|e| panic!("call {i}: {e}"));
    }
    assert!(back.hits() > 0, "the server back got calls again");
}

#[tokio::test]
async fn an_http2_endpoint_still_connecting_gets_no_requests_while_another_is_connected() {
    let server = support::GrpcTrailersServer::start(0).await;
    let hole = BlackHole::start().await;
    let client = HttpClient::builder()
        .http2_only()
        .build::<support::Body>([hole.addr, server.addr]);
    let balancer = client.balancer();
    wait_for_connection(balancer, &server.addr, ConnectionState::Ready).await;
    for i in 0..20 {
        let started = tokio::time::Instant::now();
        let response = client
            .clone()
            .oneshot(support::get())
            .await
            .unwrap_or_else(|e| panic!("request {i}: {e}"));
        assert_eq!(response.status(), http::StatusCode::OK);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "request {i} waited"
        );
    }
    assert_eq!(requests_to(balancer, &hole.addr), Some(0));
}

#[tokio::test]
async fn when_no_connection_is_ready_a_call_waits_for_the_one_being_made() {
    // Both addresses drop every connect: both endpoints stay connecting,
    // none is ready, and a call must go to one and wait on its connect
    // (given up by the attempt timeout) rather than find nothing to pick.
    let (first, second) = (BlackHole::start().await, BlackHole::start().await);
    let client = HttpClient::builder()
        .http2_only()
        .attempt_timeout(Duration::from_millis(300))
        .no_retries()
        .build::<support::Body>([first.addr, second.addr]);
    let balancer = client.balancer();
    wait_for_connection(balancer, &first.addr, ConnectionState::Connecting).await;
    wait_for_connection(balancer, &second.addr, ConnectionState::Connecting).await;
    let started = tokio::time::Instant::now();
    let failed = client.clone().oneshot(support::get()).await;
    assert!(failed.is_err(), "nothing answers a connect");
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "it waited on a connect"
    );
    let sent: u64 = balancer.endpoints().iter().map(|e| e.requests).sum();
    assert_eq!(sent, 1, "the call went to one of them");
}

#[tokio::test]
async fn an_http1_endpoint_whose_connect_was_refused_gets_no_requests_until_its_back_off_ends() {
    let server = support::TestServer::start().await;
    let refusing = support::refusing_addr().await;
    let client = HttpClient::builder()
        .strategy(tower_lb::strategy::RoundRobin::new())
        .no_outlier_detection()
        .build::<support::Body>([refusing, server.addr]);
    let balancer = client.balancer();
    let send = || async {
        let response = client.clone().oneshot(support::get()).await;
        let response = response.unwrap_or_else(|e| panic!("{}", tower_lb::error::report(&*e)));
        assert_eq!(response.status(), http::StatusCode::OK);
    };
    // Round robin takes it within two requests; its refusal is retried on
    // the server.
    send().await;
    send().await;
    assert_eq!(requests_to(balancer, &refusing), Some(1));
    assert_eq!(
        connection_of(balancer, &refusing),
        Some(ConnectionState::Failed)
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    for _ in 0..20 {
        send().await;
    }
    assert_eq!(
        requests_to(balancer, &refusing),
        Some(1),
        "none while it failed"
    );

    // A server on the address now: after gRPC's first back-off (1 s ±20 %)
    // the endpoint is worth a try again, and connects.
    let listener = tokio::net::TcpListener::bind(refusing).await;
    let listener = listener.unwrap_or_else(|e| panic!("rebind {refusing}: {e}"));
    let back = support::TestServer::on(listener);
    wait_for_connection(balancer, &refusing, ConnectionState::Idle).await;
    for _ in 0..10 {
        send().await;
    }
    assert!(back.hits() > 0);
    assert_eq!(
        connection_of(balancer, &refusing),
        Some(ConnectionState::Ready)
    );
}

#[tokio::test]
async fn a_removed_endpoints_own_connection_is_closed() {
    // A bare listener that notes when the client's connection ends.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
    let (closed_tx, closed) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        let Ok((mut stream, _)) = listener.accept().await else {
            return;
        };
        let mut buf = [0u8; 1024];
        while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
        let _ = closed_tx.send(());
    });
    let (handle, stream) = tower_lb::discover::channel();
    let client = HttpClient::builder()
        .http2_only()
        .build_discover::<support::Body, _>(stream);
    handle.insert("a", addr).unwrap_or_else(|e| panic!("{e}"));
    wait_for_connection(client.balancer(), &"a", ConnectionState::Ready).await;

    handle.remove("a").unwrap_or_else(|e| panic!("{e}"));
    let ended = tokio::time::timeout(Duration::from_secs(5), closed).await;
    assert!(ended.is_ok(), "the connection outlived its endpoint");
}
