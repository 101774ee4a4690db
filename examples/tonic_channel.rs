//! A tonic generated client over a balanced `GrpcChannel`, against real
//! gRPC servers on loopback: balancing, a retry, and a failing server
//! ejected.
//!
//! Three tonic servers of the standard health service start on
//! `127.0.0.1`; one of them answers every call with `UNAVAILABLE`. The
//! generated `HealthClient` sends 600 `Check` calls from 12 tasks through
//! one `GrpcChannel`, then one call the server refuses with `NOT_FOUND`.
//!
//!     cargo run --release --example tonic_channel

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tower_lb::client::GrpcChannel;
use tower_lb::grpc::MethodSafety;
use tower_lb::request::Safety;
use tower_lb::EndpointState;

const CALLS: usize = 600;
const TASKS: usize = 12;

/// The health service, answering `SERVING` for the whole server (the empty
/// service name), `NOT_FOUND` for any other name, or failing every call
/// with `UNAVAILABLE` when `broken`.
struct Backend {
    broken: bool,
    received: Arc<AtomicUsize>,
}

#[tonic::async_trait]
impl Health for Backend {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        self.received.fetch_add(1, Ordering::Relaxed);
        if self.broken {
            return Err(Status::unavailable("this backend is broken"));
        }
        if !request.get_ref().service.is_empty() {
            return Err(Status::not_found("no such service"));
        }
        Ok(Response::new(HealthCheckResponse {
            status: ServingStatus::Serving as i32,
        }))
    }

    type WatchStream = tokio_stream_free::Never;

    async fn watch(
        &self,
        _: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        Err(Status::unimplemented("watch is not served here"))
    }
}

/// A stream type for the unused `Watch` method, so the example needs no
/// extra crate.
mod tokio_stream_free {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use tonic::Status;
    use tonic_health::pb::HealthCheckResponse;

    /// Ends at once.
    pub struct Never;

    impl tonic::codegen::tokio_stream::Stream for Never {
        type Item = Result<HealthCheckResponse, Status>;

        fn poll_next(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            Poll::Ready(None)
        }
    }
}

/// A tonic server on a free loopback port.
async fn backend(broken: bool, received: Arc<AtomicUsize>) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let service = HealthServer::new(Backend { broken, received });
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(TcpIncoming::from(listener).with_nodelay(Some(true))),
    );
    Ok(addr)
}

#[tokio::main]
async fn main() -> Result<(), tower::BoxError> {
    let mut addrs = Vec::new();
    let mut received = Vec::new();
    for broken in [false, false, true] {
        let counter = Arc::new(AtomicUsize::new(0));
        addrs.push(backend(broken, counter.clone()).await?);
        received.push(counter);
    }
    println!("backends: {addrs:?} (the last one fails every call with UNAVAILABLE)\n");

    // Health checks change nothing, so they may be retried; every other
    // method of every other service stays unsafe (a gRPC call is a POST).
    let channel = GrpcChannel::builder()
        .method_safety(MethodSafety::new().service("grpc.health.v1.Health", Safety::Safe))
        .build(addrs.clone());

    let tasks: Vec<_> = (0..TASKS)
        .map(|_| {
            let mut client = HealthClient::new(channel.clone());
            tokio::spawn(async move {
                let mut failed = 0;
                for _ in 0..CALLS / TASKS {
                    let check = HealthCheckRequest {
                        service: String::new(),
                    };
                    if client.check(check).await.is_err() {
                        failed += 1;
                    }
                }
                failed
            })
        })
        .collect();
    let mut failed = 0;
    for task in tasks {
        failed += task.await.unwrap_or(CALLS / TASKS);
    }
    println!(
        "{CALLS} Check calls: {} succeeded, {failed} failed (a call that drew UNAVAILABLE was retried elsewhere)",
        CALLS - failed
    );
    let stats = channel.retry_stats().unwrap_or_default();
    println!(
        "retry budget: {} calls, {} retries, amplification {:.3}",
        stats.requests,
        stats.retries,
        stats.amplification()
    );

    let before = stats.retries;
    let unknown = HealthCheckRequest {
        service: "no.such.Service".into(),
    };
    let refused = HealthClient::new(channel.clone()).check(unknown).await;
    let retries = channel.retry_stats().unwrap_or_default().retries - before;
    match refused {
        Err(status) => println!(
            "a call for an unknown service: {:?} ({retries} retries: only UNAVAILABLE is retried)\n",
            status.code()
        ),
        Ok(_) => println!("a call for an unknown service unexpectedly succeeded\n"),
    }

    println!(
        "{:<18} {:>8} {:>9} {:>9} {:>9} {:>12}",
        "endpoint", "state", "received", "requests", "ejections", "latency est"
    );
    let mut endpoints = channel.balancer().endpoints();
    endpoints.sort_by_key(|e| e.key);
    for stats in endpoints {
        let state = match stats.state {
            EndpointState::Active => "active",
            EndpointState::Ejected => "ejected",
            _ => "draining",
        };
        let index = addrs.iter().position(|a| *a == stats.key).unwrap_or(0);
        let rtt = stats
            .rtt_estimate
            .map(|d| format!("{d:.2?}"))
            .unwrap_or_default();
        println!(
            "{:<18} {:>8} {:>9} {:>9} {:>9} {:>12}",
            stats.key.to_string(),
            state,
            received[index].load(Ordering::Relaxed),
            stats.requests,
            stats.ejections,
            rtt
        );
    }
    channel.shutdown(Duration::from_secs(1)).await?;
    Ok(())
}
