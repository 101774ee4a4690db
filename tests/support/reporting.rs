//! A hyper server that reports its load in `endpoint-load-metrics`, as an
//! ORCA-speaking backend does: the rate it serves and the utilization that
//! rate causes given its capacity.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// How the server measures the rate it serves.
const WINDOW: Duration = Duration::from_millis(250);

pub struct ReportingServer {
    pub addr: SocketAddr,
    state: Arc<State>,
    accept: JoinHandle<()>,
}

struct State {
    /// Requests per second it could serve at 100 % utilization.
    capacity: f64,
    hits: AtomicU64,
    /// Requests in the current window, and the window's start; the rate of
    /// the last full window.
    window: Mutex<(u64, Instant, f64)>,
    /// What to send instead of a real report, if set.
    fixed_report: Mutex<Option<&'static str>>,
}

impl ReportingServer {
    pub async fn start(capacity: f64) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        let state = Arc::new(State {
            capacity,
            hits: AtomicU64::new(0),
            window: Mutex::new((0, Instant::now(), 0.0)),
            fixed_report: Mutex::new(None),
        });
        let accept = tokio::spawn(super::serve_http1(listener, state.clone(), handle));
        Self {
            addr,
            state,
            accept,
        }
    }

    pub fn hits(&self) -> u64 {
        self.state.hits.load(Ordering::SeqCst)
    }

    /// Sends `value` as the `endpoint-load-metrics` header from now on.
    pub fn report_verbatim(&self, value: &'static str) {
        *self.state.fixed_report.lock().expect("lock") = Some(value);
    }
}

impl Drop for ReportingServer {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn handle(
    _req: Request<Incoming>,
    state: Arc<State>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    state.hits.fetch_add(1, Ordering::SeqCst);
    let rate = {
        let mut window = state.window.lock().expect("lock");
        window.0 += 1;
        let elapsed = window.1.elapsed();
        if elapsed >= WINDOW {
            window.2 = window.0 as f64 / elapsed.as_secs_f64();
            *window = (0, Instant::now(), window.2);
        }
        window.2
    };
    let report = match *state.fixed_report.lock().expect("lock") {
        Some(fixed) => fixed.to_owned(),
        None if rate > 0.0 => format!(
            "TEXT rps_fractional={rate:.3}, application_utilization={:.5}",
            rate / state.capacity
        ),
        None => String::new(),
    };
    let mut response = Response::new(Full::new(Bytes::from_static(b"ok")));
    if !report.is_empty() {
        if let Ok(value) = http::HeaderValue::from_str(&report) {
            response
                .headers_mut()
                .insert("endpoint-load-metrics", value);
        }
    }
    Ok(response)
}
