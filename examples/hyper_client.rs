//! The one-stop HTTP client against real servers on loopback: balancing, a
//! retry, and a failing server ejected.
//!
//! Four hyper servers start on `127.0.0.1`; one of them answers every request
//! with 503. `HttpClient` (P2C Peak-EWMA, outlier detection, timeouts and
//! idempotency-gated retries, all defaults) sends 2,000 GETs from 16 tasks,
//! then 160 POSTs.
//!
//!     cargo run --release --example hyper_client

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tower::ServiceExt;
use tower_lb::client::HttpClient;
use tower_lb::EndpointState;

const GETS: usize = 2_000;
const POSTS: usize = 160;
const TASKS: usize = 16;

/// A hyper server on a free loopback port that answers `status` and counts
/// the requests it receives.
async fn backend(status: u16, received: Arc<AtomicUsize>) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let received = received.clone();
            tokio::spawn(async move {
                let service = service_fn(move |_req| {
                    received.fetch_add(1, Ordering::Relaxed);
                    async move {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        let mut response = hyper::Response::new(Full::new(Bytes::from("ok")));
                        *response.status_mut() = http::StatusCode::from_u16(status)
                            .unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
                        Ok::<_, Infallible>(response)
                    }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(addr)
}

/// Sends `count` requests of `method` from [`TASKS`] tasks; counts the
/// answers by status.
async fn send(
    client: &HttpClient<Full<Bytes>>,
    method: http::Method,
    count: usize,
) -> (usize, usize) {
    let tasks: Vec<_> = (0..TASKS)
        .map(|_| {
            let client = client.clone();
            let method = method.clone();
            tokio::spawn(async move {
                let (mut ok, mut failed) = (0, 0);
                for _ in 0..count / TASKS {
                    let request = http::Request::builder()
                        .method(method.clone())
                        .uri("/")
                        .body(Full::new(Bytes::from("hello")))?;
                    match client.clone().oneshot(request).await {
                        Ok(response) if response.status().is_success() => {
                            response.into_body().collect().await?;
                            ok += 1;
                        }
                        _ => failed += 1,
                    }
                }
                Ok::<_, tower::BoxError>((ok, failed))
            })
        })
        .collect();
    let (mut ok, mut failed) = (0, 0);
    for task in tasks {
        if let Ok(Ok((o, f))) = task.await {
            ok += o;
            failed += f;
        }
    }
    (ok, failed)
}

#[tokio::main]
async fn main() -> Result<(), tower::BoxError> {
    let statuses = [200, 200, 200, 503];
    let mut addrs = Vec::new();
    let mut received = Vec::new();
    for status in statuses {
        let counter = Arc::new(AtomicUsize::new(0));
        addrs.push(backend(status, counter.clone()).await?);
        received.push(counter);
    }
    println!("backends: {addrs:?} (the last one answers 503 to everything)\n");

    // Everything else is a default: P2C Peak-EWMA, outlier detection, 5 s per
    // attempt, 15 s per call, 3 attempts for GETs within a retry budget.
    let client = HttpClient::builder().build::<Full<Bytes>>(addrs.clone());

    let (ok, failed) = send(&client, http::Method::GET, GETS).await;
    println!("{GETS} GETs: {ok} succeeded, {failed} failed (a GET that drew the 503 was retried elsewhere)");
    let stats = client.retry_stats().unwrap_or_default();
    println!(
        "retry budget: {} requests, {} retries, amplification {:.3}\n",
        stats.requests,
        stats.retries,
        stats.amplification()
    );

    let (ok, failed) = send(&client, http::Method::POST, POSTS).await;
    println!(
        "{POSTS} POSTs: {ok} succeeded, {failed} failed (a POST is never sent twice once it reached a server;\n\
         by now the failing backend is ejected, so none should draw it)\n"
    );

    println!(
        "{:<18} {:>8} {:>9} {:>9} {:>9} {:>12}",
        "endpoint", "state", "received", "requests", "ejections", "latency est"
    );
    let mut endpoints = client.balancer().endpoints();
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
    client.shutdown(Duration::from_secs(1)).await?;
    Ok(())
}
