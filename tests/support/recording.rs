//! A hyper server that records every request id it receives and misbehaves
//! on demand: 503s (with pushback), stalls, resets before or after the
//! response headers.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::{Request, Response};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// What the server does with the requests it receives.
#[derive(Debug, Clone)]
pub enum Behaviour {
    /// 200 with the server's port in the body.
    Answer,
    /// 200 with the server's port in the body and this header (value `yes`).
    AnswerWithHeader(&'static str),
    /// 503, with `Retry-After: n` if given.
    Unavailable { retry_after: Option<&'static str> },
    /// Waits this long before answering 200.
    Stall(Duration),
    /// Sends a 503's headers and a first chunk, waits 20 ms (so they are on
    /// the wire), then drops the connection.
    ResetAfterHeaders,
    /// Drops the connection without answering, once the request is read.
    ResetBeforeHeaders,
    /// 503 (with `Retry-After` if given) to the first `times` requests the
    /// server receives, then 200.
    UnavailableFirst {
        times: usize,
        retry_after: Option<&'static str>,
    },
}

/// What the test servers answer with: any body, failing with an I/O error.
pub type ServerBody = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

pub struct RecordingServer {
    pub addr: SocketAddr,
    state: Arc<State>,
    accept: JoinHandle<()>,
}

struct State {
    port: u16,
    behaviour: Mutex<Behaviour>,
    /// Request id (the `x-request-id` header) -> when each copy arrived
    /// (whole), on tokio's clock.
    received: Mutex<HashMap<String, Vec<tokio::time::Instant>>>,
    /// The length of each request body, in arrival order.
    body_lengths: Mutex<Vec<usize>>,
}

impl RecordingServer {
    pub async fn start(behaviour: Behaviour) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        let state = Arc::new(State {
            port: addr.port(),
            behaviour: Mutex::new(behaviour),
            received: Mutex::new(HashMap::new()),
            body_lengths: Mutex::new(Vec::new()),
        });
        let accept = tokio::spawn(super::serve_http1(listener, state.clone(), handle));
        Self {
            addr,
            state,
            accept,
        }
    }

    pub fn set(&self, behaviour: Behaviour) {
        *self.state.behaviour.lock().expect("lock") = behaviour;
    }

    /// Requests received, counting repeats.
    pub fn hits(&self) -> usize {
        self.state
            .received
            .lock()
            .expect("lock")
            .values()
            .map(Vec::len)
            .sum()
    }

    /// How often the request with `id` arrived.
    pub fn received(&self, id: &str) -> usize {
        self.arrivals(id).len()
    }

    /// When each copy of the request with `id` arrived, in order.
    pub fn arrivals(&self, id: &str) -> Vec<tokio::time::Instant> {
        let received = self.state.received.lock().expect("lock");
        received.get(id).cloned().unwrap_or_default()
    }

    /// Every id with how often it arrived.
    pub fn all_received(&self) -> HashMap<String, usize> {
        let received = self.state.received.lock().expect("lock");
        received
            .iter()
            .map(|(id, at)| (id.clone(), at.len()))
            .collect()
    }

    pub fn body_lengths(&self) -> Vec<usize> {
        self.state.body_lengths.lock().expect("lock").clone()
    }
}

/// Starts one server per behaviour.
pub async fn start_all(behaviours: Vec<Behaviour>) -> Vec<RecordingServer> {
    let mut servers = Vec::new();
    for behaviour in behaviours {
        servers.push(RecordingServer::start(behaviour).await);
    }
    servers
}

pub fn addrs(servers: &[RecordingServer]) -> Vec<SocketAddr> {
    servers.iter().map(|s| s.addr).collect()
}

/// How often the servers received `id`, together.
pub fn received(servers: &[RecordingServer], id: &str) -> usize {
    servers.iter().map(|s| s.received(id)).sum()
}

impl Drop for RecordingServer {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn handle(
    req: Request<Incoming>,
    state: Arc<State>,
) -> Result<Response<ServerBody>, std::io::Error> {
    let port = state.port;
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    // The whole body first: a request counts as received once it is all
    // here, as a real server would act on it.
    let body = req
        .into_body()
        .collect()
        .await
        .map_err(std::io::Error::other)?
        .to_bytes();
    let nth = {
        let mut received = state.received.lock().expect("lock");
        received
            .entry(id)
            .or_default()
            .push(tokio::time::Instant::now());
        received.values().map(Vec::len).sum::<usize>()
    };
    state.body_lengths.lock().expect("lock").push(body.len());
    let behaviour = state.behaviour.lock().expect("lock").clone();
    let answer = || text_response(http::StatusCode::OK, port.to_string());
    match behaviour {
        Behaviour::Answer => Ok(answer()),
        Behaviour::AnswerWithHeader(name) => {
            let mut response = answer();
            response.headers_mut().insert(
                http::HeaderName::from_static(name),
                http::HeaderValue::from_static("yes"),
            );
            Ok(response)
        }
        Behaviour::UnavailableFirst { times, retry_after } if nth <= times => {
            Ok(unavailable(retry_after))
        }
        Behaviour::UnavailableFirst { .. } => Ok(answer()),
        Behaviour::Stall(delay) => {
            tokio::time::sleep(delay).await;
            Ok(answer())
        }
        Behaviour::Unavailable { retry_after } => Ok(unavailable(retry_after)),
        Behaviour::ResetAfterHeaders => Ok(reset_after_headers()),
        Behaviour::ResetBeforeHeaders => Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "reset before the response",
        )),
    }
}

/// A request the recording servers know by its `x-request-id`.
pub fn request(
    method: http::Method,
    id: &str,
    body: impl Into<Bytes>,
) -> http::Request<Full<Bytes>> {
    http::Request::builder()
        .method(method)
        .uri("/")
        .header("x-request-id", id)
        .body(Full::new(body.into()))
        .unwrap_or_else(|e| panic!("{e}"))
}

/// A response of `status` with `text` for its body.
pub fn text_response(status: http::StatusCode, text: impl Into<Bytes>) -> Response<ServerBody> {
    let mut response = Response::new(
        Full::new(text.into())
            .map_err(|never: Infallible| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    response
}

/// A 503 whose body promises 1,000 bytes and is reset after one chunk (see
/// [`ResetBody`]).
pub fn reset_after_headers() -> Response<ServerBody> {
    let mut response = Response::new(ResetBody::default().boxed());
    *response.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
    response.headers_mut().insert(
        http::header::CONTENT_LENGTH,
        http::HeaderValue::from_static("1000"),
    );
    response
}

/// A 503, with `Retry-After` if given.
fn unavailable(retry_after: Option<&'static str>) -> Response<ServerBody> {
    let mut response = text_response(http::StatusCode::SERVICE_UNAVAILABLE, "unavailable");
    if let Some(after) = retry_after {
        response
            .headers_mut()
            .insert("retry-after", http::HeaderValue::from_static(after));
    }
    response
}

/// A body that sends one chunk, stalls 20 ms so that the headers and the
/// chunk reach the client, then fails, which makes hyper drop the connection
/// (a reset, where the socket has a zero linger).
#[derive(Default)]
pub struct ResetBody {
    sent: bool,
    stall: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl http_body::Body for ResetBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        if !self.sent {
            self.sent = true;
            return std::task::Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"partial")))));
        }
        let stall = self
            .stall
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(Duration::from_millis(20))));
        std::task::ready!(std::future::Future::poll(stall.as_mut(), cx));
        std::task::Poll::Ready(Some(Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "reset after the headers",
        ))))
    }
}
