//! Real HTTP servers on loopback for the integration tests.
#![allow(dead_code)]

pub mod checked;
pub mod dns;
pub mod grpc;
pub mod grpcio;
pub mod killable;
#[cfg(feature = "kubernetes")]
pub mod kube_api;
pub mod nginx;
pub mod raw_h2;
pub mod recording;
pub mod reporting;

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
    /// Every n-th request is answered 503 (1: all of them; 0: none).
    fail_every: AtomicU64,
    /// What the failing answers are: 503 unless set.
    fail_status: std::sync::atomic::AtomicU16,
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
        let server = Self::on(listener);
        server.set_delay(delay);
        server
    }

    /// Serves on `listener` (an address a test chose), with no delay.
    pub fn on(listener: TcpListener) -> Self {
        let addr = listener.local_addr().expect("local addr");
        let state = Arc::new(ServerState::default());
        let accept = tokio::spawn(serve_http1(listener, state.clone(), handle));
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

    /// Answers every `n`-th request with 503 from now on (1: all; 0: none).
    pub fn fail_every(&self, n: u64) {
        self.state.fail_every.store(n, Ordering::SeqCst);
    }

    /// Makes the failing answers `status` (429, say) instead of 503.
    pub fn fail_with(&self, status: u16) {
        self.state.fail_status.store(status, Ordering::SeqCst);
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

/// Serves HTTP/1 on `listener` until aborted, answering each request with
/// `handle(request, state)`.
pub async fn serve_http1<S, F, Fut, B, E>(listener: TcpListener, state: Arc<S>, handle: F)
where
    S: Send + Sync + 'static,
    F: Fn(Request<Incoming>, Arc<S>) -> Fut + Copy + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Response<B>, E>> + Send + 'static,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
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
    let hit = state.hits.fetch_add(1, Ordering::SeqCst) as u64 + 1;
    state.in_flight.fetch_add(1, Ordering::SeqCst);
    let delay = state.delay_ms.load(Ordering::Relaxed);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    state.in_flight.fetch_sub(1, Ordering::SeqCst);
    let wanted = req
        .headers()
        .get("x-want-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u16>().ok())
        .and_then(|v| http::StatusCode::from_u16(v).ok());
    if let Some(status) = wanted {
        let mut response = Response::new(Full::new(Bytes::from("as asked")));
        *response.status_mut() = status;
        return Ok(response);
    }
    let fail_every = state.fail_every.load(Ordering::SeqCst);
    if fail_every > 0 && hit % fail_every == 0 {
        let mut response = Response::new(Full::new(Bytes::from("unavailable")));
        *response.status_mut() =
            http::StatusCode::from_u16(state.fail_status.load(Ordering::SeqCst))
                .unwrap_or(http::StatusCode::SERVICE_UNAVAILABLE);
        return Ok(response);
    }
    Ok(Response::new(Full::new(Bytes::from("ok"))))
}

/// Starts `n` servers with the given delay.
/// Serves HTTP/2 (prior knowledge) on `stream` with `service` until the
/// connection ends, with hyper's server defaults.
pub async fn serve_h2<S, B>(stream: tokio::net::TcpStream, service: S)
where
    S: hyper::service::Service<Request<Incoming>, Response = http::Response<B>>,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

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

/// The response of an `HttpClient` to `req`; any error fails the test,
/// printed link by link.
pub async fn send_ok<K>(
    client: &tower_lb::client::HttpClient<Full<Bytes>, K>,
    req: http::Request<Full<Bytes>>,
) -> http::Response<tower_lb::client::ResponseBody> {
    use tower::ServiceExt;
    client
        .clone()
        .oneshot(req)
        .await
        .unwrap_or_else(|e| panic!("{}", tower_lb::error::report(&*e)))
}

/// Waits until every endpoint of a ready-made client has its connection
/// ready: the clients connect at once, and pick only connected endpoints
/// while any is, so a test that counts where calls go starts here.
pub async fn wait_connected<K: Clone>(balancer: &tower_lb::client::BalancerHandle<K>) {
    wait_until(Duration::from_secs(5), || {
        balancer
            .endpoints()
            .iter()
            .all(|e| e.connection == Some(tower_lb::health::ConnectionState::Ready))
    })
    .await;
    // The balancer's driver publishes the set anew on the last change: a
    // moment later.
    tokio::time::sleep(Duration::from_millis(50)).await;
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

/// A server on loopback that reads each request and then, when told, closes
/// every connection without answering: what a server does to the requests
/// written to keep-alive connections it is closing (a reload, a restart, an
/// idle timeout racing the request). The client sees "connection closed
/// before message completed" on each of them at once.
pub struct HangUpServer {
    pub addr: SocketAddr,
    /// Requests read and waiting for the hang-up.
    waiting: Arc<AtomicUsize>,
    hang_up: Arc<tokio::sync::Notify>,
    accept: JoinHandle<()>,
}

impl HangUpServer {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        let waiting = Arc::new(AtomicUsize::new(0));
        let hang_up = Arc::new(tokio::sync::Notify::new());
        let accept = tokio::spawn({
            let (waiting, hang_up) = (waiting.clone(), hang_up.clone());
            async move {
                while let Ok((mut stream, _)) = listener.accept().await {
                    let (waiting, hang_up) = (waiting.clone(), hang_up.clone());
                    tokio::spawn(async move {
                        use tokio::io::AsyncReadExt;
                        let mut buf = [0u8; 4096];
                        // A GET's head fits one read on loopback.
                        if matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {
                            let notified = hang_up.notified();
                            waiting.fetch_add(1, Ordering::SeqCst);
                            notified.await;
                            waiting.fetch_sub(1, Ordering::SeqCst);
                        }
                        drop(stream);
                    });
                }
            }
        });
        Self {
            addr,
            waiting,
            hang_up,
            accept,
        }
    }

    /// Waits until `n` requests have been read.
    pub async fn wait_for(&self, n: usize) {
        wait_until(Duration::from_secs(5), || {
            self.waiting.load(Ordering::SeqCst) >= n
        })
        .await;
    }

    /// Closes every connection holding a request, all at once.
    pub fn hang_up(&self) {
        self.hang_up.notify_waiters();
    }
}

impl Drop for HangUpServer {
    fn drop(&mut self) {
        self.accept.abort();
        self.hang_up.notify_waiters();
    }
}

/// An HTTP/2 server on loopback that answers like a gRPC server: a data frame,
/// then trailers carrying `grpc-status` (settable), and counts requests.
pub struct GrpcTrailersServer {
    pub addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    status: Arc<AtomicU64>,
    accept: JoinHandle<()>,
}

impl GrpcTrailersServer {
    pub async fn start(grpc_status: u64) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        let hits = Arc::new(AtomicUsize::new(0));
        let status = Arc::new(AtomicU64::new(grpc_status));
        let (h, st) = (hits.clone(), status.clone());
        let accept = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (h, st) = (h.clone(), st.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |_req: Request<Incoming>| {
                        h.fetch_add(1, Ordering::SeqCst);
                        let code = st.load(Ordering::SeqCst);
                        async move { Ok::<_, Infallible>(grpc_response(code)) }
                    });
                    serve_h2(stream, service).await;
                });
            }
        });
        Self {
            addr,
            hits,
            status,
            accept,
        }
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    pub fn set_status(&self, grpc_status: u64) {
        self.status.store(grpc_status, Ordering::SeqCst);
    }
}

impl Drop for GrpcTrailersServer {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// A body of frames known in advance (data, then trailers).
pub struct Frames(std::collections::VecDeque<hyper::body::Frame<Bytes>>);

impl http_body::Body for Frames {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        std::task::Poll::Ready(self.0.pop_front().map(Ok))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_empty()
    }
}

fn grpc_response(code: u64) -> Response<Frames> {
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from(code));
    let frames = [
        hyper::body::Frame::data(Bytes::from_static(b"\0\0\0\0\0")),
        hyper::body::Frame::trailers(trailers),
    ];
    let mut response = Response::new(Frames(frames.into_iter().collect()));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    response
}

/// A discovery stream that the test scripts item by item, errors included.
pub struct Scripted(
    pub  tokio::sync::mpsc::UnboundedReceiver<
        Result<
            tower::discover::Change<SocketAddr, tower_lb::http::HttpEndpoint<Body>>,
            std::io::Error,
        >,
    >,
);

impl futures_core::Stream for Scripted {
    type Item = Result<
        tower::discover::Change<SocketAddr, tower_lb::http::HttpEndpoint<Body>>,
        std::io::Error,
    >;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.0.poll_recv(cx)
    }
}

/// Everything `tracing` writes in this test binary, from every thread.
///
/// One global subscriber rather than one per test: a thread-local default
/// races with tracing's global cache of which call sites are enabled when
/// other tests run at the same time, and events go missing. Tests that read
/// it look for text unique to them (an address, a port).
#[derive(Clone, Default)]
pub struct CapturedLogs(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for CapturedLogs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl CapturedLogs {
    /// The binary's capture, installed as the global subscriber on first use.
    pub fn global() -> &'static CapturedLogs {
        static LOGS: std::sync::OnceLock<CapturedLogs> = std::sync::OnceLock::new();
        LOGS.get_or_init(|| {
            let logs = CapturedLogs::default();
            let writer = logs.clone();
            let subscriber = tracing_subscriber::fmt()
                .with_max_level(tracing::Level::DEBUG)
                .with_ansi(false)
                .with_writer(move || writer.clone())
                .finish();
            tracing::subscriber::set_global_default(subscriber).expect("first subscriber");
            logs
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("lock")).into_owned()
    }

    /// The lines that contain every one of `needles`.
    pub fn lines_with(&self, needles: &[&str]) -> Vec<String> {
        self.text()
            .lines()
            .filter(|l| needles.iter().all(|n| l.contains(n)))
            .map(str::to_owned)
            .collect()
    }
}

// ---------------------------------------------------------------------------
// One test body, two stacks: the one built by hand from the crate's layers,
// and the one-stop `tower_lb::client::HttpClient` set up the same way.
// ---------------------------------------------------------------------------

/// Which request path a test runs through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StackKind {
    /// The stack the test assembles itself: a `Balancer`, and around it
    /// whatever layers the test file puts there.
    HandBuilt,
    /// `tower_lb::client::HttpClient`, configured to the hand-built stack's
    /// settings.
    OneStop,
}

/// Generates the `#[tokio::test]` entry points of test bodies shared by both
/// stacks: for every `async fn name(kind: StackKind)` listed, with the test
/// attribute it needs, `hand_built::name` and `one_stop::name`.
///
/// ```ignore
/// support::for_both_stacks! {
///     #[tokio::test] a_get_is_answered,
///     #[tokio::test(start_paused = true)] the_deadline_holds,
/// }
/// ```
#[allow(unused_macros)]
macro_rules! for_both_stacks {
    ($($(#[$test:meta])+ $name:ident),+ $(,)?) => {
        /// The bodies against the stack the test builds by hand.
        mod hand_built {
            $(
                $(#[$test])+
                async fn $name() {
                    super::$name($crate::support::StackKind::HandBuilt).await
                }
            )+
        }

        /// The same bodies against the one-stop `HttpClient`.
        mod one_stop {
            $(
                $(#[$test])+
                async fn $name() {
                    super::$name($crate::support::StackKind::OneStop).await
                }
            )+
        }
    };
}
#[allow(unused_imports)]
pub(crate) use for_both_stacks;

/// Any response body, boxed: what every stack under test answers with.
pub type AnyBody = http_body_util::combinators::BoxBody<Bytes, tower_lb::BoxError>;

/// A stack under test as a plain service, whichever it is.
pub type Client<B = Body> =
    tower::util::BoxCloneSyncService<http::Request<B>, http::Response<AnyBody>, tower_lb::BoxError>;

/// `service` as a [`Client`]: its response body boxed, its error a `BoxError`.
pub fn boxed<S, B, RB>(service: S) -> Client<B>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Error: Into<tower_lb::BoxError>,
    S::Future: Send + 'static,
    B: 'static,
    RB: http_body::Body<Data = Bytes> + Send + Sync + 'static,
    RB::Error: Into<tower_lb::BoxError>,
{
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    tower::util::BoxCloneSyncService::new(
        service
            .map_response(|response: http::Response<RB>| {
                response.map(|body| body.map_err(Into::into).boxed())
            })
            .map_err(Into::into),
    )
}

/// The first `E` in `err`'s `source()` chain, `err` included: where a
/// balancer error ends up once the one-stop client has boxed it.
pub fn find_error<'a, E: std::error::Error + 'static>(
    err: &'a (dyn std::error::Error + 'static),
) -> Option<&'a E> {
    std::iter::successors(Some(err), |e| e.source()).find_map(|e| e.downcast_ref::<E>())
}

/// A balanced stack under test: requests go through [`Lb::send`], and the
/// balancer inside shows its endpoints.
pub struct Lb<K = SocketAddr, B = Body> {
    client: Client<B>,
    balancer: tower_lb::client::BalancerHandle<K>,
}

impl<K: 'static, B: 'static> Lb<K, B> {
    /// A hand-built `Balancer`, used as the whole stack.
    pub fn hand_built<T, RB>(balancer: T) -> Self
    where
        T: tower::Service<http::Request<B>, Response = http::Response<RB>>
            + Into<tower_lb::client::BalancerHandle<K>>
            + Clone
            + Send
            + Sync
            + 'static,
        T::Error: Into<tower_lb::BoxError>,
        T::Future: Send + 'static,
        RB: http_body::Body<Data = Bytes> + Send + Sync + 'static,
        RB::Error: Into<tower_lb::BoxError>,
    {
        Self {
            client: boxed(balancer.clone()),
            balancer: balancer.into(),
        }
    }

    /// The one-stop client.
    pub fn one_stop(client: tower_lb::client::HttpClient<B, K>) -> Self
    where
        K: Send + Sync,
    {
        Self {
            balancer: client.balancer().clone(),
            client: boxed(client),
        }
    }

    /// The stack as a service.
    pub fn client(&self) -> Client<B> {
        self.client.clone()
    }

    /// Sends `request` through the stack.
    pub async fn send(
        &self,
        request: http::Request<B>,
    ) -> Result<http::Response<AnyBody>, tower_lb::BoxError> {
        tower::ServiceExt::oneshot(self.client.clone(), request).await
    }

    pub fn endpoints(&self) -> Vec<tower_lb::EndpointStats<K>> {
        self.balancer.endpoints()
    }

    pub fn in_flight(&self) -> usize {
        self.balancer.in_flight()
    }

    pub fn is_panicking(&self) -> bool {
        self.balancer.is_panicking()
    }

    pub fn is_closed(&self) -> bool {
        self.balancer.is_closed()
    }

    pub async fn shutdown(&self, timeout: Duration) -> Result<(), tower_lb::Error> {
        self.balancer.shutdown(timeout).await
    }
}

impl<K, B> Clone for Lb<K, B> {
    fn clone(&self) -> Self {
        Self {
            client: self.client.clone(),
            balancer: self.balancer.clone(),
        }
    }
}

/// A discovery channel as the test drives it, whichever stack consumes it:
/// the hand-built balancer is given endpoint services, the one-stop client
/// addresses.
pub enum Registry<K> {
    HandBuilt {
        handle: tower_lb::discover::DiscoveryHandle<K, tower_lb::http::HttpEndpoint<Body>>,
        /// The hyper client the endpoint services share (boxed: it is large).
        client: Box<
            hyper_util::client::legacy::Client<
                hyper_util::client::legacy::connect::HttpConnector,
                Body,
            >,
        >,
    },
    OneStop(tower_lb::discover::DiscoveryHandle<K, SocketAddr>),
}

/// The stream a [`Registry`] feeds: give it to the stack of its kind.
pub enum Discovery<K> {
    /// For `Balancer::builder().build(..)`.
    HandBuilt(tower_lb::discover::ChannelDiscover<K, tower_lb::http::HttpEndpoint<Body>>),
    /// For the one-stop client's `build_discover(..)`.
    OneStop(tower_lb::discover::ChannelDiscover<K, SocketAddr>),
}

impl<K> Registry<K> {
    /// A discovery channel for a stack of `kind`: endpoints pushed to the
    /// registry come out of the stream, in order, once a stack reads it.
    pub fn new(kind: StackKind) -> (Self, Discovery<K>) {
        match kind {
            StackKind::HandBuilt => {
                let (handle, stream) = tower_lb::discover::channel();
                let client = Box::new(tower_lb::http::client());
                (
                    Registry::HandBuilt { handle, client },
                    Discovery::HandBuilt(stream),
                )
            }
            StackKind::OneStop => {
                let (handle, stream) = tower_lb::discover::channel();
                (Registry::OneStop(handle), Discovery::OneStop(stream))
            }
        }
    }

    /// Adds `addr` under `key`, or replaces the endpoint of a known key.
    pub fn insert(&self, key: K, addr: SocketAddr) {
        let sent = match self {
            Registry::HandBuilt { handle, client } => handle.insert(
                key,
                tower_lb::http::HttpEndpoint::new((**client).clone(), addr),
            ),
            Registry::OneStop(handle) => handle.insert(key, addr),
        };
        sent.expect("the balancer is alive");
    }

    pub fn remove(&self, key: K) {
        let sent = match self {
            Registry::HandBuilt { handle, .. } => handle.remove(key),
            Registry::OneStop(handle) => handle.remove(key),
        };
        sent.expect("the balancer is alive");
    }

    pub fn replace_all(&self, endpoints: impl IntoIterator<Item = (K, SocketAddr)>) {
        let sent = match self {
            Registry::HandBuilt { handle, client } => {
                handle.replace_all(endpoints.into_iter().map(|(key, addr)| {
                    (
                        key,
                        tower_lb::http::HttpEndpoint::new((**client).clone(), addr),
                    )
                }))
            }
            Registry::OneStop(handle) => handle.replace_all(endpoints),
        };
        sent.expect("the balancer is alive");
    }

    /// True once the balancer consuming the stream is gone.
    pub fn is_closed(&self) -> bool {
        match self {
            Registry::HandBuilt { handle, .. } => handle.is_closed(),
            Registry::OneStop(handle) => handle.is_closed(),
        }
    }
}

/// An HTTP/2 server on `127.0.0.1:0` that refuses every stream with
/// `RST_STREAM(REFUSED_STREAM)`, as a server does when it will not take
/// more work: "closed prior to any processing having occurred".
pub struct RefusingH2Server {
    pub addr: SocketAddr,
    refused: Arc<AtomicUsize>,
    accept: JoinHandle<()>,
}

impl RefusingH2Server {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        let refused = Arc::new(AtomicUsize::new(0));
        let counter = refused.clone();
        let accept = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let counter = counter.clone();
                tokio::spawn(async move {
                    let Ok(mut connection) = h2::server::handshake(stream).await else {
                        return;
                    };
                    while let Some(Ok((_request, mut respond))) = connection.accept().await {
                        counter.fetch_add(1, Ordering::SeqCst);
                        respond.send_reset(h2::Reason::REFUSED_STREAM);
                    }
                });
            }
        });
        Self {
            addr,
            refused,
            accept,
        }
    }

    /// Streams refused so far.
    pub fn refused(&self) -> usize {
        self.refused.load(Ordering::SeqCst)
    }
}

impl Drop for RefusingH2Server {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// An address on loopback that never answers a connect: a socket that
/// listens and never accepts, its backlog filled, so the kernel drops new
/// SYNs, as for a host that is gone. Lives as long as this value.
pub struct BlackHole {
    pub addr: SocketAddr,
    _socket: TcpListener,
    _held: Vec<tokio::net::TcpStream>,
}

impl BlackHole {
    pub async fn start() -> Self {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .expect("bind loopback");
        let addr = socket.local_addr().expect("local addr");
        let listener = socket.listen(1).expect("listen");
        // A backlog of 1 takes about two connections; then connects hang.
        let mut held = Vec::new();
        for _ in 0..4 {
            let connect = tokio::net::TcpStream::connect(addr);
            if let Ok(Ok(stream)) = tokio::time::timeout(Duration::from_millis(200), connect).await
            {
                held.push(stream);
            }
        }
        Self {
            addr,
            _socket: listener,
            _held: held,
        }
    }
}
