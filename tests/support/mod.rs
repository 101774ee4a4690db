//! Real HTTP servers on loopback for the integration tests.
#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{Empty, Full};
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// A hyper 1.x server on `127.0.0.1:0` that answers 200 with its own port
/// after an adjustable delay, and counts what it receives.
pub struct TestServer {
    pub addr: SocketAddr,
    state: Arc<ServerState>,
    accept: JoinHandle<()>,
}

#[derive(Default)]
struct ServerState {
    hits: AtomicUsize,
    in_flight: AtomicUsize,
    delay_ms: AtomicU64,
    last_host: std::sync::Mutex<Option<String>>,
}

impl TestServer {
    pub async fn start() -> Self {
        Self::with_delay(Duration::ZERO).await
    }

    pub async fn with_delay(delay: Duration) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        let state = Arc::new(ServerState::default());
        state
            .delay_ms
            .store(delay.as_millis() as u64, Ordering::Relaxed);
        let accept = tokio::spawn(accept_loop(listener, state.clone()));
        Self {
            addr,
            state,
            accept,
        }
    }

    pub fn hits(&self) -> usize {
        self.state.hits.load(Ordering::SeqCst)
    }

    /// The `Host` header of the last request received.
    pub fn last_host(&self) -> Option<String> {
        self.state.last_host.lock().expect("lock").clone()
    }

    pub fn in_flight(&self) -> usize {
        self.state.in_flight.load(Ordering::SeqCst)
    }

    pub fn set_delay(&self, delay: Duration) {
        self.state
            .delay_ms
            .store(delay.as_millis() as u64, Ordering::Relaxed);
    }

    /// Waits (up to 5 s) until `n` requests are being handled.
    pub async fn wait_in_flight(&self, n: usize) {
        wait_until(Duration::from_secs(5), || self.in_flight() >= n).await;
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn accept_loop(listener: TcpListener, state: Arc<ServerState>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(req, state.clone()));
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn handle(
    req: Request<Incoming>,
    state: Arc<ServerState>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let host = req
        .headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned);
    *state.last_host.lock().expect("lock") = host;
    state.hits.fetch_add(1, Ordering::SeqCst);
    state.in_flight.fetch_add(1, Ordering::SeqCst);
    let delay = state.delay_ms.load(Ordering::Relaxed);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    state.in_flight.fetch_sub(1, Ordering::SeqCst);
    Ok(Response::new(Full::new(Bytes::from("ok"))))
}

/// Starts `n` servers with the given delay.
pub async fn servers(n: usize, delay: Duration) -> Vec<TestServer> {
    let mut all = Vec::with_capacity(n);
    for _ in 0..n {
        all.push(TestServer::with_delay(delay).await);
    }
    all
}

pub type Body = Empty<Bytes>;

pub fn get() -> http::Request<Body> {
    http::Request::get("/")
        .body(Empty::new())
        .expect("valid request")
}

/// Polls `cond` every 5 ms until it holds; panics after `limit`.
pub async fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) {
    let start = tokio::time::Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < limit,
            "condition not met within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// An address on loopback where nothing listens.
pub async fn refusing_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    drop(listener);
    addr
}
