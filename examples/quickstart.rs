//! Balances real HTTP servers on loopback and prints what happened.
//!
//! Four hyper servers start on `127.0.0.1` (one of them ten times slower);
//! a tower-lb `Balancer` (P2C with Peak-EWMA) spreads 4,000 GETs from 32 tasks
//! over them; halfway through, discovery removes one server and adds a fifth.
//!
//!     cargo run --release --example quickstart

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Bytes;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tower::{ServiceBuilder, ServiceExt};
use tower_lb::http::{self as lb_http, HttpEndpoint};
use tower_lb::{discover, Balancer, EndpointState};

const REQUESTS: usize = 4_000;
const TASKS: usize = 32;

/// A hyper server on a free loopback port that answers after `delay`.
async fn backend(delay: Duration) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = service_fn(move |_req| async move {
                    tokio::time::sleep(delay).await;
                    Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from("ok"))))
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(addr)
}

#[tokio::main]
async fn main() -> Result<(), tower::BoxError> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "tower_lb=info".into()),
        )
        .init();

    let delays = [2, 2, 2, 20].map(Duration::from_millis);
    let mut addrs = Vec::new();
    for delay in delays {
        addrs.push(backend(delay).await?);
    }
    let spare = backend(Duration::from_millis(2)).await?;
    println!("backends: {addrs:?} (the last one answers in 20 ms, the others in 2 ms)");

    // One hyper-util client shared by every endpoint; discovery through a channel.
    let client = lb_http::client::<Empty<Bytes>>();
    let (discovery, stream) = discover::channel();
    for &addr in &addrs {
        discovery.insert(addr, HttpEndpoint::new(client.clone(), addr))?;
    }
    let balancer = Balancer::builder().build(stream);
    let service = ServiceBuilder::new()
        .concurrency_limit(TASKS)
        .service(balancer.clone());

    let started = tokio::time::Instant::now();
    let tasks: Vec<_> = (0..TASKS)
        .map(|_| {
            let service = service.clone();
            tokio::spawn(async move {
                let mut failed = 0;
                for _ in 0..REQUESTS / TASKS {
                    let request = http::Request::get("/").body(Empty::new())?;
                    match service.clone().oneshot(request).await {
                        Ok(response) => drop(response.into_body().collect().await?),
                        Err(_) => failed += 1,
                    }
                }
                Ok::<_, tower::BoxError>(failed)
            })
        })
        .collect();

    tokio::time::sleep(Duration::from_millis(300)).await;
    println!("discovery: removing {} and adding {spare}", addrs[0]);
    discovery.remove(addrs[0])?;
    discovery.insert(spare, HttpEndpoint::new(client.clone(), spare))?;

    let mut failed = 0;
    for task in tasks {
        failed += task.await??;
    }
    let elapsed = started.elapsed();
    println!(
        "\n{REQUESTS} requests in {:.2?} ({:.0} req/s), {failed} failed\n",
        elapsed,
        REQUESTS as f64 / elapsed.as_secs_f64()
    );

    // Give the removed endpoint's last requests a moment to drain out.
    tokio::time::sleep(Duration::from_millis(50)).await;
    println!(
        "{:<18} {:>8} {:>9} {:>9} {:>12}",
        "endpoint", "state", "requests", "failures", "latency est"
    );
    for stats in balancer.endpoints() {
        let state = match stats.state {
            EndpointState::Active => "active",
            _ => "draining",
        };
        let rtt = stats
            .rtt_estimate
            .map(|d| format!("{d:.2?}"))
            .unwrap_or_default();
        println!(
            "{:<18} {:>8} {:>9} {:>9} {:>12}",
            stats.key.to_string(),
            state,
            stats.requests,
            stats.failures,
            rtt
        );
    }
    println!("\n(the removed endpoint is gone once drained; the slow one got the smallest share)");
    balancer.shutdown(Duration::from_secs(1)).await?;
    Ok(())
}
