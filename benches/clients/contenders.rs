//! The contenders: tower-lb's clients and what a user would write instead,
//! each as a [`Caller`] that sends one request and checks its answer.
//!
//! Every contender sends the same request (a GET of `/` with no body, or a
//! gRPC health Check) and reads the whole answer, as a user would.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body::Body;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tower::balance::p2c::Balance;
use tower::buffer::Buffer;
use tower::discover::ServiceList;
use tower::load::{CompleteOnResponse, PeakEwmaDiscover};
use tower::{Service, ServiceExt};
use tower_lb::client::GrpcChannel;
use tower_lb::client::HttpClient;
use tower_lb::{discover, http as lb_http, Balancer};

use crate::measure::{drive, Mode, Sample};
use crate::server::{Ports, ServerCpu, HTTP_BODY};
use crate::BoxError;

/// The request body of every HTTP contender.
type HttpBody = Empty<Bytes>;

/// Sends one request and checks that it succeeded. Each of the closed
/// loop's tasks owns a clone.
pub trait Caller: Clone + Send + 'static {
    /// One request, answered and read whole: `Err` unless the answer was
    /// what the servers send.
    fn call(&mut self) -> impl Future<Output = Result<(), BoxError>> + Send;
}

/// The protocol a contender speaks, and so its baseline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    H2,
    Grpc,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Http1 => "HTTP/1.1",
            Protocol::H2 => "h2",
            Protocol::Grpc => "gRPC",
        }
    }
}

/// One contender.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Contender {
    Http1RawOne,
    Http1RawRoundRobin,
    Http1TowerP2c,
    Http1RawConnections,
    Http1Balancer,
    Http1HttpClient,
    H2RawRoundRobin,
    H2RawConnections,
    H2Balancer,
    H2HttpClient,
    H2HttpClientPool,
    GrpcOneChannel,
    GrpcRoundRobin,
    GrpcBalanceList,
    GrpcChannel,
    GrpcHyperRoundRobin,
    GrpcHyperConnections,
}

impl Contender {
    /// In the order of the table.
    pub const ALL: [Contender; 17] = [
        Contender::Http1RawOne,
        Contender::Http1RawRoundRobin,
        Contender::Http1TowerP2c,
        Contender::Http1RawConnections,
        Contender::Http1Balancer,
        Contender::Http1HttpClient,
        Contender::H2RawRoundRobin,
        Contender::H2RawConnections,
        Contender::H2Balancer,
        Contender::H2HttpClient,
        Contender::H2HttpClientPool,
        Contender::GrpcOneChannel,
        Contender::GrpcRoundRobin,
        Contender::GrpcBalanceList,
        Contender::GrpcChannel,
        Contender::GrpcHyperRoundRobin,
        Contender::GrpcHyperConnections,
    ];

    /// A short name, for `CLIENTS_BENCH_ONLY` and the progress lines.
    pub fn id(self) -> &'static str {
        match self {
            Contender::Http1RawOne => "h1-raw-one",
            Contender::Http1RawRoundRobin => "h1-raw-rr",
            Contender::Http1TowerP2c => "h1-tower-p2c",
            Contender::Http1RawConnections => "h1-raw-conns",
            Contender::Http1Balancer => "h1-balancer",
            Contender::Http1HttpClient => "h1-http-client",
            Contender::H2RawRoundRobin => "h2-raw-rr",
            Contender::H2RawConnections => "h2-raw-conns",
            Contender::H2Balancer => "h2-balancer",
            Contender::H2HttpClient => "h2-http-client",
            Contender::H2HttpClientPool => "h2-pooled-http-client",
            Contender::GrpcOneChannel => "grpc-one-channel",
            Contender::GrpcRoundRobin => "grpc-raw-rr",
            Contender::GrpcBalanceList => "grpc-balance-list",
            Contender::GrpcChannel => "grpc-channel",
            Contender::GrpcHyperRoundRobin => "grpc-hyper-rr",
            Contender::GrpcHyperConnections => "grpc-h2-conns",
        }
    }

    /// What the table calls it.
    pub fn label(self) -> &'static str {
        match self {
            Contender::Http1RawOne => "raw hyper-util `Client`, one server",
            Contender::Http1RawRoundRobin | Contender::H2RawRoundRobin => {
                "raw hyper-util `Client`, round robin by hand over 4 servers"
            }
            Contender::Http1TowerP2c => "tower `p2c::Balance` (Peak EWMA) behind a `Buffer`",
            Contender::Http1RawConnections => {
                "hyper HTTP/1.1 connections, a pool of idle ones per server by hand"
            }
            Contender::Http1Balancer | Contender::H2Balancer => {
                "tower-lb `Balancer` over `http::endpoints`"
            }
            Contender::Http1HttpClient => "tower-lb `HttpClient`, defaults",
            Contender::H2HttpClient => "tower-lb `HttpClient`, defaults, `http2_only()`",
            Contender::H2HttpClientPool => {
                "tower-lb `HttpClient`, defaults, hyper-util settings `http2_only(true)`"
            }
            Contender::GrpcOneChannel => "one tonic `Channel`",
            Contender::GrpcRoundRobin => "4 tonic `Channel`s, round robin by hand",
            Contender::GrpcBalanceList => "tonic `Channel::balance_list`",
            Contender::GrpcChannel => "tower-lb `GrpcChannel`, defaults",
            Contender::GrpcHyperRoundRobin => {
                "hyper-util h2 `Client` under a tonic client, round robin by hand"
            }
            Contender::GrpcHyperConnections => {
                "4 hyper h2 connections under a tonic client, round robin by hand"
            }
            Contender::H2RawConnections => "4 hyper h2 connections, round robin by hand",
        }
    }

    pub fn protocol(self) -> Protocol {
        match self {
            Contender::Http1RawOne
            | Contender::Http1RawRoundRobin
            | Contender::Http1TowerP2c
            | Contender::Http1RawConnections
            | Contender::Http1Balancer
            | Contender::Http1HttpClient => Protocol::Http1,
            Contender::H2RawRoundRobin
            | Contender::H2RawConnections
            | Contender::H2Balancer
            | Contender::H2HttpClient
            | Contender::H2HttpClientPool => Protocol::H2,
            Contender::GrpcOneChannel
            | Contender::GrpcRoundRobin
            | Contender::GrpcBalanceList
            | Contender::GrpcChannel
            | Contender::GrpcHyperRoundRobin
            | Contender::GrpcHyperConnections => Protocol::Grpc,
        }
    }

    /// Whether this is its protocol's baseline, the raw round robin that
    /// the others are compared with.
    pub fn is_baseline(self) -> bool {
        matches!(
            self,
            Contender::Http1RawRoundRobin | Contender::H2RawRoundRobin | Contender::GrpcRoundRobin
        )
    }

    /// Builds the contender over the servers and drives it once.
    pub async fn run(
        self,
        ports: &Ports,
        server: ServerCpu,
        tasks: usize,
        mode: Mode,
    ) -> Result<Sample, BoxError> {
        match self {
            Contender::Http1RawOne => {
                drive(
                    RawHttp::new(h1_client(), &ports.h1[..1]),
                    tasks,
                    mode,
                    server,
                )
                .await
            }
            Contender::Http1RawRoundRobin => {
                drive(RawHttp::new(h1_client(), &ports.h1), tasks, mode, server).await
            }
            Contender::Http1TowerP2c => drive(tower_p2c(&ports.h1), tasks, mode, server).await,
            Contender::Http1RawConnections => {
                drive(H1Connections::new(&ports.h1), tasks, mode, server).await
            }
            Contender::Http1Balancer => {
                drive(balancer(h1_client(), &ports.h1), tasks, mode, server).await
            }
            Contender::Http1HttpClient => {
                let client = HttpClient::builder().build::<HttpBody>(ports.h1.iter().copied());
                drive(ThroughService::new(client), tasks, mode, server).await
            }
            Contender::H2RawRoundRobin => {
                drive(RawHttp::new(h2_client(), &ports.h2), tasks, mode, server).await
            }
            Contender::H2Balancer => {
                drive(balancer(h2_client(), &ports.h2), tasks, mode, server).await
            }
            Contender::H2HttpClient => {
                let client = HttpClient::builder()
                    .http2_only()
                    .build::<HttpBody>(ports.h2.iter().copied());
                drive(ThroughService::new(client), tasks, mode, server).await
            }
            Contender::H2HttpClientPool => {
                // As a user sets up h2 through a connector of their own (the
                // `hyper` builder method's own example): hyper-util's
                // settings, HTTP/2 only.
                let mut hyper = Client::builder(TokioExecutor::new());
                hyper.http2_only(true);
                let client = HttpClient::builder()
                    .hyper(hyper)
                    .build::<HttpBody>(ports.h2.iter().copied());
                drive(ThroughService::new(client), tasks, mode, server).await
            }
            Contender::GrpcOneChannel => {
                let channels = vec![tonic_channel(ports.grpc[0])?];
                drive(Grpc::<Channel>::new(channels), tasks, mode, server).await
            }
            Contender::GrpcRoundRobin => {
                let channels = ports
                    .grpc
                    .iter()
                    .map(|addr| tonic_channel(*addr))
                    .collect::<Result<Vec<_>, _>>()?;
                drive(Grpc::<Channel>::new(channels), tasks, mode, server).await
            }
            Contender::GrpcBalanceList => {
                let endpoints = ports
                    .grpc
                    .iter()
                    .map(|addr| tonic_endpoint(*addr))
                    .collect::<Result<Vec<_>, _>>()?;
                let channel = Channel::balance_list(endpoints.into_iter());
                drive(Grpc::<Channel>::new(vec![channel]), tasks, mode, server).await
            }
            Contender::GrpcChannel => {
                let channel = GrpcChannel::builder().build(ports.grpc.iter().copied());
                drive(Grpc::<GrpcChannel>::new(vec![channel]), tasks, mode, server).await
            }
            Contender::GrpcHyperRoundRobin => {
                // Without TCP_NODELAY (hyper-util's default) a call's
                // frames wait on Nagle and the server's delayed ACK: 40 ms.
                let mut connector = HttpConnector::new();
                connector.set_nodelay(true);
                let service = HyperGrpc {
                    client: Client::builder(TokioExecutor::new())
                        .http2_only(true)
                        .build(connector),
                    origins: ports
                        .grpc
                        .iter()
                        .map(|a| origin(*a))
                        .collect::<Vec<_>>()
                        .into(),
                    next: Arc::default(),
                };
                drive(Grpc::<HyperGrpc>::new(vec![service]), tasks, mode, server).await
            }
            Contender::GrpcHyperConnections => {
                let service = H2Connections::<tonic::body::Body>::connect(&ports.grpc).await?;
                drive(
                    Grpc::<H2Connections<tonic::body::Body>>::new(vec![service]),
                    tasks,
                    mode,
                    server,
                )
                .await
            }
            Contender::H2RawConnections => {
                let service = H2Connections::<HttpBody>::connect(&ports.h2).await?;
                drive(ThroughService::new(service), tasks, mode, server).await
            }
        }
    }
}

/// hyper-util's client with its default settings, HTTP/1.1.
fn h1_client() -> Client<HttpConnector, HttpBody> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// hyper-util's client with its default settings, HTTP/2 only (prior
/// knowledge): one connection per server, requests multiplexed on it.
fn h2_client() -> Client<HttpConnector, HttpBody> {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// `GET /`, with the URI given.
fn get(uri: Uri) -> Result<Request<HttpBody>, BoxError> {
    Request::get(uri)
        .body(Empty::new())
        .map_err(|e| format!("cannot build the request: {e}").into())
}

/// Reads a whole HTTP answer; `Err` unless it is `200 ok`.
async fn read_ok<B>(response: Response<B>) -> Result<(), BoxError>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| {
            let e: BoxError = e.into();
            format!(
                "reading the body of a {status} answer failed: {}",
                error_chain(&*e)
            )
        })?
        .to_bytes();
    if status != http::StatusCode::OK || body != HTTP_BODY {
        return Err(format!("the server answered {status} {body:?}, not 200 {HTTP_BODY:?}").into());
    }
    Ok(())
}

/// A hyper-util client, sending absolute URIs to the servers in turn (or
/// to one server): what a user balances by hand.
#[derive(Clone)]
struct RawHttp {
    client: Client<HttpConnector, HttpBody>,
    uris: Arc<[Uri]>,
    /// Shared by the tasks: an even spread, as round robin means.
    next: Arc<AtomicUsize>,
}

impl RawHttp {
    fn new(client: Client<HttpConnector, HttpBody>, addrs: &[SocketAddr]) -> Self {
        let uris = addrs.iter().map(|addr| origin(*addr)).collect::<Vec<_>>();
        Self {
            client,
            uris: uris.into(),
            next: Arc::default(),
        }
    }
}

/// `http://addr/`.
fn origin(addr: SocketAddr) -> Uri {
    Uri::builder()
        .scheme("http")
        .authority(addr.to_string())
        .path_and_query("/")
        .build()
        .unwrap_or_else(|e| unreachable!("a socket address makes a valid URI: {e}"))
}

impl Caller for RawHttp {
    async fn call(&mut self) -> Result<(), BoxError> {
        let uri = if self.uris.len() == 1 {
            self.uris[0].clone()
        } else {
            let turn = self.next.fetch_add(1, Ordering::Relaxed);
            self.uris[turn % self.uris.len()].clone()
        };
        let response = self
            .client
            .request(get(uri)?)
            .await
            .map_err(|e| format!("the request failed: {}", error_chain(&e)))?;
        read_ok(response).await
    }
}

/// Any tower service that takes `GET /` (a path: the service picks the
/// server), used as a user would: wait until ready, then call.
#[derive(Clone)]
struct ThroughService<S> {
    service: S,
}

impl<S> ThroughService<S> {
    fn new(service: S) -> Self {
        Self { service }
    }
}

impl<S, RB> Caller for ThroughService<S>
where
    S: Service<Request<HttpBody>, Response = Response<RB>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send,
    RB: Body + Send,
    RB::Data: Send,
    RB::Error: Into<BoxError>,
{
    async fn call(&mut self) -> Result<(), BoxError> {
        let request = get(Uri::from_static("/"))?;
        let service = self.service.ready().await.map_err(|e| {
            let e: BoxError = e.into();
            format!("the service was not ready: {}", error_chain(&*e))
        })?;
        let response = service.call(request).await.map_err(|e| {
            let e: BoxError = e.into();
            format!("the request failed: {}", error_chain(&*e))
        })?;
        read_ok(response).await
    }
}

/// The tower-lb `Balancer` with its defaults over one `HttpEndpoint` per
/// server, all sharing `client`.
fn balancer(client: Client<HttpConnector, HttpBody>, addrs: &[SocketAddr]) -> impl Caller {
    let endpoints = lb_http::endpoints(&client, addrs.iter().copied());
    ThroughService::new(Balancer::builder().build(discover::fixed(endpoints)))
}

/// tower's `p2c::Balance` with Peak EWMA (Linkerd's settings: 30 ms
/// default RTT, 10 s decay, as tower-lb's default) over one service per
/// server, each the shared hyper-util client pointed at its server, behind
/// a `Buffer` so that the tasks can share it.
fn tower_p2c(addrs: &[SocketAddr]) -> impl Caller {
    let client = h1_client();
    let services = addrs
        .iter()
        .map(|addr| {
            let origin = origin(*addr);
            tower::util::MapRequest::new(client.clone(), move |mut request: Request<HttpBody>| {
                *request.uri_mut() = origin.clone();
                request
            })
        })
        .collect::<Vec<_>>();
    let discover = PeakEwmaDiscover::new::<Request<HttpBody>>(
        ServiceList::new(services),
        Duration::from_millis(30),
        Duration::from_secs(10),
        CompleteOnResponse::default(),
    );
    let balance: Balance<_, Request<HttpBody>> = Balance::new(discover);
    let buffer: Buffer<Request<HttpBody>, _> = Buffer::new(balance, 1024);
    ThroughService::new(buffer)
}

/// hyper-util's HTTP/2 client as a gRPC transport, taking the servers in
/// turn: a tonic client with no `Channel` (no `Buffer`) under it.
#[derive(Clone)]
struct HyperGrpc {
    client: Client<HttpConnector, tonic::body::Body>,
    origins: Arc<[Uri]>,
    next: Arc<AtomicUsize>,
}

impl Service<Request<tonic::body::Body>> for HyperGrpc {
    type Response = Response<hyper::body::Incoming>;
    type Error = hyper_util::client::legacy::Error;
    type Future = hyper_util::client::legacy::ResponseFuture;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: Request<tonic::body::Body>) -> Self::Future {
        let turn = self.next.fetch_add(1, Ordering::Relaxed) % self.origins.len();
        let mut parts = self.origins[turn].clone().into_parts();
        parts.path_and_query = request.uri().path_and_query().cloned();
        if let Ok(uri) = Uri::from_parts(parts) {
            *request.uri_mut() = uri;
        }
        self.client.request(request)
    }
}

/// hyper's HTTP/2 connections, one per server, taken in turn: no pool, no
/// queue, nothing between the caller and each connection.
struct H2Connections<B> {
    senders: Arc<[hyper::client::conn::http2::SendRequest<B>]>,
    origins: Arc<[Uri]>,
    next: Arc<AtomicUsize>,
}

impl<B> Clone for H2Connections<B> {
    fn clone(&self) -> Self {
        Self {
            senders: self.senders.clone(),
            origins: self.origins.clone(),
            next: self.next.clone(),
        }
    }
}

impl<B> H2Connections<B>
where
    B: Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    /// One connection to each of `addrs`, made now.
    async fn connect(addrs: &[SocketAddr]) -> Result<Self, BoxError> {
        let mut senders = Vec::new();
        for addr in addrs {
            let stream = tokio::net::TcpStream::connect(addr).await?;
            stream.set_nodelay(true)?;
            let (sender, connection) = hyper::client::conn::http2::handshake(
                TokioExecutor::new(),
                hyper_util::rt::TokioIo::new(stream),
            )
            .await?;
            tokio::spawn(connection);
            senders.push(sender);
        }
        Ok(Self {
            senders: senders.into(),
            origins: addrs.iter().map(|a| origin(*a)).collect::<Vec<_>>().into(),
            next: Arc::default(),
        })
    }
}

impl<B> Service<Request<B>> for H2Connections<B>
where
    B: Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Response = Response<hyper::body::Incoming>;
    type Error = hyper::Error;
    type Future =
        std::pin::Pin<Box<dyn Future<Output = Result<Self::Response, hyper::Error>> + Send>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let turn = self.next.fetch_add(1, Ordering::Relaxed) % self.origins.len();
        let mut parts = self.origins[turn].clone().into_parts();
        parts.path_and_query = request.uri().path_and_query().cloned();
        if let Ok(uri) = Uri::from_parts(parts) {
            *request.uri_mut() = uri;
        }
        let mut sender = self.senders[turn].clone();
        Box::pin(sender.send_request(request))
    }
}

/// Bare hyper HTTP/1.1 connections, taken from (and given back to) a list
/// of idle ones per server, the servers in turn: the floor under any
/// HTTP/1.1 pool, with nothing but a lock between the caller and hyper.
#[derive(Clone)]
struct H1Connections {
    servers: Arc<[(SocketAddr, http::HeaderValue, IdleH1)]>,
    next: Arc<AtomicUsize>,
}

type IdleH1 = std::sync::Mutex<Vec<hyper::client::conn::http1::SendRequest<HttpBody>>>;

impl H1Connections {
    fn new(addrs: &[SocketAddr]) -> Self {
        let servers = addrs
            .iter()
            .map(|addr| {
                let host = http::HeaderValue::from_str(&addr.to_string())
                    .unwrap_or_else(|e| unreachable!("an address is a valid Host: {e}"));
                (*addr, host, IdleH1::default())
            })
            .collect::<Vec<_>>();
        Self {
            servers: servers.into(),
            next: Arc::default(),
        }
    }
}

impl Caller for H1Connections {
    async fn call(&mut self) -> Result<(), BoxError> {
        let turn = self.next.fetch_add(1, Ordering::Relaxed) % self.servers.len();
        let (addr, host, idle) = &self.servers[turn];
        let idle_one = idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mut sender = match idle_one {
            Some(sender) => sender,
            None => {
                let stream = tokio::net::TcpStream::connect(addr).await?;
                stream.set_nodelay(true)?;
                let (sender, connection) =
                    hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                        .await?;
                tokio::spawn(connection);
                sender
            }
        };
        sender.ready().await?;
        let mut request = get(Uri::from_static("/"))?;
        request
            .headers_mut()
            .insert(http::header::HOST, host.clone());
        let response = sender.send_request(request).await?;
        read_ok(response).await?;
        idle.lock().unwrap_or_else(|e| e.into_inner()).push(sender);
        Ok(())
    }
}

/// `http://addr` as a tonic `Endpoint`, with tonic's defaults.
fn tonic_endpoint(addr: SocketAddr) -> Result<Endpoint, BoxError> {
    Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| format!("cannot make a tonic endpoint for {addr}: {e}").into())
}

/// A tonic `Channel` to `addr`, connecting on its first call.
fn tonic_channel(addr: SocketAddr) -> Result<Channel, BoxError> {
    Ok(tonic_endpoint(addr)?.connect_lazy())
}

/// A generated gRPC client per channel, the channels taken in turn when
/// there are several.
#[derive(Clone)]
struct Grpc<T> {
    clients: Vec<HealthClient<T>>,
    next: Arc<AtomicUsize>,
}

/// The same constructor and `Caller` for each channel type (spelled out per type rather
/// than over tonic's `GrpcService` bounds).
macro_rules! grpc_caller {
    ($channel:ty) => {
        impl Grpc<$channel> {
            fn new(channels: Vec<$channel>) -> Self {
                Self {
                    clients: channels.into_iter().map(HealthClient::new).collect(),
                    next: Arc::default(),
                }
            }
        }

        impl Caller for Grpc<$channel> {
            async fn call(&mut self) -> Result<(), BoxError> {
                let index = if self.clients.len() == 1 {
                    0
                } else {
                    self.next.fetch_add(1, Ordering::Relaxed) % self.clients.len()
                };
                let request = HealthCheckRequest {
                    service: String::new(),
                };
                let reply = self.clients[index]
                    .check(request)
                    .await
                    .map_err(|status| format!("the Check call failed: {status}"))?
                    .into_inner();
                if reply.status != ServingStatus::Serving as i32 {
                    return Err(format!(
                        "the server answered status {}, not SERVING",
                        reply.status
                    )
                    .into());
                }
                Ok(())
            }
        }
    };
}

grpc_caller!(HyperGrpc);
grpc_caller!(H2Connections<tonic::body::Body>);
grpc_caller!(Channel);
grpc_caller!(GrpcChannel);

/// An error and its causes, on one line.
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
