//! Servers for the active health check tests: a gRPC server whose health
//! is tonic-health's own service, flipped through its reporter, and an
//! HTTP/1.1 server with a `/healthz` a test can turn.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;
use tower::ServiceExt;

use super::killable::Killable;

/// A gRPC server on loopback serving tonic-health's `grpc.health.v1.Health`
/// as tonic-health implements it (`Watch` included): a test flips the
/// status with [`set_serving`](Self::set_serving). The `Check` calls it
/// receives are the tests' traffic and are counted; `Watch` calls are the
/// balancer's checks.
pub struct WatchedServer {
    pub addr: SocketAddr,
    reporter: HealthReporter,
    checks: Arc<AtomicUsize>,
    watches: Arc<AtomicUsize>,
    serving: Killable,
}

impl WatchedServer {
    /// Serves on `127.0.0.1:0`, `SERVING`.
    pub async fn start() -> Self {
        Self::start_at(SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// Serves on `addr` (a server restarted where one was), `SERVING`.
    pub async fn start_at(addr: SocketAddr) -> Self {
        let listener = TcpListener::bind(addr).await.expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        let (reporter, health) = tonic_health::server::health_reporter();
        reporter
            .set_service_status("", ServingStatus::Serving)
            .await;
        let checks = Arc::new(AtomicUsize::new(0));
        let watches = Arc::new(AtomicUsize::new(0));
        let serving = {
            let (checks, watches) = (checks.clone(), watches.clone());
            Killable::serve(listener, move |stream| {
                let (health, checks, watches) = (health.clone(), checks.clone(), watches.clone());
                async move {
                    let service =
                        hyper::service::service_fn(move |req: http::Request<Incoming>| {
                            match req.uri().path() {
                                "/grpc.health.v1.Health/Check" => {
                                    checks.fetch_add(1, Ordering::SeqCst)
                                }
                                "/grpc.health.v1.Health/Watch" => {
                                    watches.fetch_add(1, Ordering::SeqCst)
                                }
                                _ => 0,
                            };
                            let health = health.clone();
                            async move {
                                match health.oneshot(req).await {
                                    Ok(response) => Ok::<_, Infallible>(response),
                                    Err(never) => match never {},
                                }
                            }
                        });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                }
            })
        };
        Self {
            addr,
            reporter,
            checks,
            watches,
            serving,
        }
    }

    /// What the server says of itself as a whole (service `""`).
    pub async fn set_serving(&self, serving: bool) {
        let status = match serving {
            true => ServingStatus::Serving,
            false => ServingStatus::NotServing,
        };
        self.reporter.set_service_status("", status).await;
    }

    /// `Check` calls received: the tests' traffic.
    pub fn checks(&self) -> usize {
        self.checks.load(Ordering::SeqCst)
    }

    /// `Watch` streams opened: the balancer's health checks.
    pub fn watches(&self) -> usize {
        self.watches.load(Ordering::SeqCst)
    }

    /// Closes the port and resets every connection (a crashed server).
    pub fn kill(&self) {
        self.serving.kill();
    }
}

/// An HTTP/1.1 server on loopback whose `/healthz` answers as a test says
/// (and after a delay it sets); every other path is traffic, answered 200.
pub struct HealthzServer {
    pub addr: SocketAddr,
    state: Arc<HealthzState>,
    serving: Killable,
}

#[derive(Default)]
struct HealthzState {
    /// The status `/healthz` answers.
    status: AtomicU16,
    /// How long `/healthz` takes, in milliseconds.
    delay_ms: AtomicU64,
    probes: AtomicUsize,
    traffic: AtomicUsize,
}

impl HealthzServer {
    /// Serves on `127.0.0.1:0`, `/healthz` answering 200.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        let state = Arc::new(HealthzState::default());
        state.status.store(200, Ordering::SeqCst);
        let serving = {
            let state = state.clone();
            Killable::serve(listener, move |stream| {
                let state = state.clone();
                async move {
                    let service =
                        hyper::service::service_fn(move |req: http::Request<Incoming>| {
                            answer(req, state.clone())
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                }
            })
        };
        Self {
            addr,
            state,
            serving,
        }
    }

    /// What `/healthz` answers from now on.
    pub fn set_health(&self, status: u16) {
        self.state.status.store(status, Ordering::SeqCst);
    }

    /// How long `/healthz` takes to answer from now on.
    pub fn set_health_delay(&self, delay: Duration) {
        self.state
            .delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// `/healthz` requests received.
    pub fn probes(&self) -> usize {
        self.state.probes.load(Ordering::SeqCst)
    }

    /// Requests for any other path.
    pub fn traffic(&self) -> usize {
        self.state.traffic.load(Ordering::SeqCst)
    }

    /// Closes the port and resets every connection.
    pub fn kill(&self) {
        self.serving.kill();
    }
}

async fn answer(
    req: http::Request<Incoming>,
    state: Arc<HealthzState>,
) -> Result<http::Response<Full<Bytes>>, Infallible> {
    if req.uri().path() != "/healthz" {
        state.traffic.fetch_add(1, Ordering::SeqCst);
        return Ok(http::Response::new(Full::new(Bytes::from("traffic"))));
    }
    state.probes.fetch_add(1, Ordering::SeqCst);
    let delay = state.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let mut response = http::Response::new(Full::new(Bytes::from("health")));
    *response.status_mut() = http::StatusCode::from_u16(state.status.load(Ordering::SeqCst))
        .unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
    Ok(response)
}

/// `HealthzServer`'s check: `/healthz` every 50 ms (no jitter, so that
/// counts are predictable), with the default thresholds: 3 failures out,
/// 2 passes back.
pub fn fast_http_check() -> tower_lb::health::HealthCheck {
    tower_lb::health::HealthCheck::http_get("/healthz")
        .and_then(|check| check.interval(Duration::from_millis(50)))
        .and_then(|check| check.jitter_percent(0))
        .unwrap_or_else(|e| panic!("{e}"))
}
