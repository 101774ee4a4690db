//! DNS discovery, end to end on loopback: a DNS server whose SRV records
//! point at two hyper servers (weights 3 and 1), a balancer that follows the
//! records, and a change to the zone that it picks up.
//!
//!     cargo run --example dns

use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Bytes;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tower::ServiceExt;
use tower_lb::discover::{Dns, DnsEndpoint};
use tower_lb::http::{self as lb_http, HttpEndpoint};
use tower_lb::strategy::WeightedRoundRobin;
use tower_lb::Balancer;

// The tests' in-memory DNS server (hickory-server), reused rather than
// written twice.
#[path = "../tests/support/dns.rs"]
#[allow(dead_code)]
mod test_dns;

/// A hyper server on loopback that answers with its own port.
async fn backend() -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let port = addr.port().to_string();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |_| {
                    let port = port.clone();
                    async move {
                        Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(port))))
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

/// Sends `n` GETs and counts the answers per backend port.
async fn spread<S>(balancer: &S, n: usize) -> Result<Vec<(String, usize)>, tower::BoxError>
where
    S: tower::Service<
            http::Request<Empty<Bytes>>,
            Response = http::Response<tower_lb::http::EndpointBody>,
        > + Clone,
    S::Error: Into<tower::BoxError>,
{
    let mut counts = std::collections::BTreeMap::new();
    for _ in 0..n {
        let response = balancer
            .clone()
            .oneshot(http::Request::get("/").body(Empty::new())?)
            .await
            .map_err(Into::into)?;
        let port = response.into_body().collect().await?.to_bytes();
        *counts
            .entry(String::from_utf8_lossy(&port).into_owned())
            .or_insert(0) += 1;
    }
    Ok(counts.into_iter().collect())
}

#[tokio::main]
async fn main() -> Result<(), tower::BoxError> {
    let (a, b) = (backend().await?, backend().await?);
    let dns = test_dns::TestDns::start("example.").await;
    dns.set_a("web.example.", &[Ipv4Addr::LOCALHOST], 30).await;
    dns.set_srv(
        "_http._tcp.example.",
        &[
            (0, 3, a.port(), "web.example."),
            (0, 1, b.port(), "web.example."),
        ],
        30,
    )
    .await;
    println!(
        "DNS server on {}: _http._tcp.example. -> ports {} (weight 3) and {} (weight 1)",
        dns.addr,
        a.port(),
        b.port()
    );

    let client = lb_http::client();
    let (refresh, discover) = Dns::srv("_http._tcp.example.")
        .name_servers([dns.addr])
        .build(move |addr| HttpEndpoint::new(client.clone(), addr))?;
    let balancer = Balancer::builder()
        .strategy(WeightedRoundRobin::new())
        .static_weights(DnsEndpoint::static_weight)
        .build(discover);

    println!("400 requests: {:?}", spread(&balancer, 400).await?);

    dns.set_srv(
        "_http._tcp.example.",
        &[(0, 1, b.port(), "web.example.")],
        30,
    )
    .await;
    refresh.resolve_now();
    tokio::time::sleep(Duration::from_millis(200)).await;
    println!(
        "after removing port {} from DNS, 100 requests: {:?}",
        a.port(),
        spread(&balancer, 100).await?
    );
    for endpoint in balancer.endpoints() {
        println!(
            "  {:?} {:?} weight {}",
            endpoint.key.addr, endpoint.state, endpoint.static_weight
        );
    }
    Ok(())
}
