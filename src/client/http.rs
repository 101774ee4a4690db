use std::fmt;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, Scheme};
use http_body::{Body, Frame, SizeHint};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::{self, Client};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use pin_project_lite::pin_project;
use tower::discover::Discover;
use tower::util::BoxCloneSyncService;
use tower::Service;

use super::pool::{ObservedConnector, PoolConnections};
use super::{
    BalancedClient, BalancerHandle, ClientBuilder, Hints, MapEndpoints, ProtocolLayers,
    DEFAULT_CONNECT_TIMEOUT, DEFAULT_POOL_IDLE_TIMEOUT,
};
use crate::balance::{self, Describe, RequestHints};
use crate::classify::{Classify, HttpClassify};
use crate::connection::{ConnectFailureHook, H1Settings, H2Settings, Http2KeepAlive};
use crate::error::BoxError;
use crate::health::ActiveCheck;
use crate::http::{EndpointBody, HttpEndpoint};
use crate::load::OrcaLoadReports;
use crate::retry::{ReplayBody, RetryOn};
use crate::strategy::{P2c, Strategy};

/// The HTTP settings of a [`ClientBuilder`]: the hyper-util client every
/// endpoint shares, and its connector.
#[derive(Debug, Clone)]
pub struct Http<C = HttpConnector> {
    connector: C,
    hyper: legacy::Builder,
    scheme: Scheme,
    authority: Option<Authority>,
    /// [`http2_only`](ClientBuilder::http2_only): an HTTP/2 connection of
    /// each endpoint's own rather than the hyper-util client's pool.
    own_http2: bool,
    /// HTTP/1.1 connections of each endpoint's own rather than the
    /// hyper-util client's pool: while the connector and the hyper-util
    /// settings are the defaults.
    own_http1: bool,
    /// How long a connection may stay idle (the pool's is in `hyper`).
    idle_timeout: Duration,
    /// HTTP/2 keep-alive of the own connections (the pool's is in `hyper`).
    keep_alive: Option<Http2KeepAlive>,
}

/// The classifier [`HttpClient`] starts with: 5xx are failures, and ORCA
/// `endpoint-load-metrics` headers are read (for weighted round robin).
pub type DefaultHttpClassify =
    HttpClassify<tower_http::classify::ServerErrorsAsFailures, OrcaLoadReports>;

/// A balanced, retrying HTTP client over a set of endpoints: the one-stop
/// stack of this crate (see the [module docs](super) for its parts and
/// defaults).
///
/// A cheap `Clone` handle, a `Service<http::Request<B>>`; send requests with
/// a path (`/users/7`) or an absolute URI, whose authority is kept as the
/// `Host` header.
///
/// ```no_run
/// use std::time::Duration;
/// use http_body_util::Full;
/// use hyper::body::Bytes;
/// use tower::ServiceExt;
/// use tower_lb::client::HttpClient;
/// use tower_lb::discover::Dns;
/// use tower_lb::strategy::RoundRobin;
///
/// # #[tokio::main]
/// # async fn main() -> Result<(), tower_lb::BoxError> {
/// // Every address of a name, re-resolved on its TTL, round robin, 2 s a call.
/// let client = HttpClient::builder()
///     .strategy(RoundRobin::new())
///     .deadline(Duration::from_secs(2))
///     .build_dns(Dns::host("api.internal", 8080))?;
///
/// let request = http::Request::get("/users/7").body(Full::new(Bytes::new()))?;
/// let response = client.oneshot(request).await?;
/// # let _ = response;
/// # Ok(())
/// # }
/// ```
pub type HttpClient<B, K = SocketAddr> =
    BalancedClient<http::Request<B>, http::Response<ResponseBody>, K>;

impl BalancedClient<http::Request<()>, http::Response<ResponseBody>, ()> {
    /// A builder with the defaults of the [module docs](super), over plain
    /// HTTP/1.1 connections of each endpoint's own: a request takes the
    /// endpoint's newest free connection or makes one (TCP with
    /// `TCP_NODELAY` and a [`DEFAULT_CONNECT_TIMEOUT`]), with no pool shared
    /// by all endpoints in between (in `benches/clients.rs` that is as cheap
    /// as hyper-util's `Client` used by hand); idle connections are closed
    /// after [`DEFAULT_POOL_IDLE_TIMEOUT`]. A [`connector`](ClientBuilder::connector)
    /// or [`hyper`](ClientBuilder::hyper) settings of your own send requests
    /// through hyper-util's pooled `Client` instead.
    #[allow(clippy::type_complexity)]
    pub fn builder() -> ClientBuilder<Http, balance::Builder<P2c, DefaultHttpClassify, Hints>> {
        let balancer = balance::Builder::new()
            .classify(HttpClassify::server_errors().load_reports(OrcaLoadReports))
            .outlier_detection(crate::health::OutlierDetection::default())
            .avoid_tried_endpoints();
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(DEFAULT_CONNECT_TIMEOUT));
        // hyper-util leaves Nagle's algorithm on. Over HTTP/2 a request's
        // DATA frame, written after its HEADERS, then waits for the server
        // to acknowledge them, which it delays: 40 ms a call on Linux.
        // tonic, grpc-go, Go's net/http and reqwest all turn it off.
        connector.set_nodelay(true);
        let mut hyper = Client::builder(TokioExecutor::new());
        hyper
            .pool_idle_timeout(DEFAULT_POOL_IDLE_TIMEOUT)
            .pool_timer(TokioTimer::new());
        let http = Http {
            connector,
            hyper,
            scheme: Scheme::HTTP,
            authority: None,
            own_http2: false,
            own_http1: true,
            idle_timeout: DEFAULT_POOL_IDLE_TIMEOUT,
            keep_alive: Some(Http2KeepAlive::HTTP),
        };
        ClientBuilder::with(http, balancer)
    }
}

impl<Conn, B, R> ClientBuilder<Http<Conn>, B, R> {
    /// The connector the shared hyper-util client dials with: a TLS one
    /// (hyper-rustls, say) for `https`, with [`scheme`](Self::scheme). The
    /// default is hyper-util's `HttpConnector` with a
    /// [`DEFAULT_CONNECT_TIMEOUT`] and `TCP_NODELAY` (set it on yours too:
    /// with Nagle's algorithm on, an HTTP/2 request with a body waits for a
    /// delayed ACK, 40 ms on Linux). Requests then go through the client's
    /// pool, not the endpoints' own connections, even after
    /// [`http2_only`](Self::http2_only): for HTTP/2 through your connector,
    /// give [`hyper`](Self::hyper) settings with `http2_only(true)`.
    pub fn connector<C2>(self, connector: C2) -> ClientBuilder<Http<C2>, B, R> {
        ClientBuilder {
            target: Http {
                connector,
                hyper: self.target.hyper,
                scheme: self.target.scheme,
                authority: self.target.authority,
                own_http2: false,
                own_http1: false,
                idle_timeout: self.target.idle_timeout,
                keep_alive: self.target.keep_alive,
            },
            balancer: self.balancer,
            calls: self.calls,
        }
    }

    /// The hyper-util client settings (pool, HTTP/2 prior knowledge, ...),
    /// shared by every endpoint: requests then go through hyper-util's
    /// pooled `Client` rather than the endpoints' own HTTP/1.1 connections.
    /// They replace the default settings entirely, idle timeout included:
    /// set `pool_idle_timeout` (with a `pool_timer`) below your servers'
    /// idle timeout, as the default does with [`DEFAULT_POOL_IDLE_TIMEOUT`].
    ///
    /// ```
    /// use hyper_util::client::legacy::Client;
    /// use hyper_util::rt::TokioExecutor;
    /// use tower_lb::client::HttpClient;
    ///
    /// let mut hyper = Client::builder(TokioExecutor::new());
    /// hyper.http2_only(true);
    /// let builder = HttpClient::builder().hyper(hyper);
    /// # let _ = builder;
    /// ```
    pub fn hyper(mut self, builder: legacy::Builder) -> Self {
        self.target.hyper = builder;
        self.target.own_http1 = false;
        self
    }

    /// How long a keep-alive connection may stay idle before the client
    /// closes it: keep it below your servers' idle timeout (see
    /// [`DEFAULT_POOL_IDLE_TIMEOUT`], the default). Zero keeps no
    /// connection: each serves one request. It sets the
    /// [`hyper`](Self::hyper) settings' `pool_idle_timeout` too, which a
    /// later call to `hyper` replaces.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_lb::client::HttpClient;
    ///
    /// // For gunicorn, which closes idle connections after 2 s.
    /// let builder = HttpClient::builder().pool_idle_timeout(Duration::from_secs(1));
    /// # let _ = builder;
    /// ```
    pub fn pool_idle_timeout(mut self, timeout: Duration) -> Self {
        self.target.idle_timeout = timeout;
        self.target.hyper.pool_idle_timeout(timeout);
        self
    }

    /// The scheme requests go out with: `https` with a TLS
    /// [`connector`](Self::connector). Default `http`. A request whose
    /// absolute URI has another scheme is refused, never downgraded.
    pub fn scheme(mut self, scheme: Scheme) -> Self {
        self.target.scheme = scheme;
        self
    }

    /// The `Host` of HTTP/1 requests that name none: the service's name
    /// rather than each endpoint's address, for virtual hosts and sidecars.
    ///
    /// HTTP/1 only. On HTTP/2, hyper takes `:authority` from the request's
    /// URI, which is the endpoint's address, and a `Host` that differs from
    /// it is malformed (RFC 9113, 8.3.1): leave this unset there. The TLS
    /// server name is the connector's business.
    pub fn authority(mut self, authority: Authority) -> Self {
        self.target.authority = Some(authority);
        self
    }
}

/// Sets hyper-util's HTTP/2 keep-alive as `keep_alive` says; `None` leaves
/// the builder's own. With the timer the pings need: a builder given with
/// [`ClientBuilder::hyper`] may have none, and hyper panics without one.
fn pool_keep_alive(hyper: &mut legacy::Builder, keep_alive: Option<Http2KeepAlive>) {
    if let Some(keep_alive) = keep_alive {
        hyper
            .timer(TokioTimer::new())
            .http2_keep_alive_interval(keep_alive.interval())
            .http2_keep_alive_timeout(keep_alive.timeout())
            // Idle connections too: with it off, hyper (1.12) can leave a
            // connection's pings unarmed (see `Http2KeepAlive`).
            .http2_keep_alive_while_idle(true);
    }
}

impl<Conn, B, R> ClientBuilder<Http<Conn>, B, R> {
    /// HTTP/2 pings on a quiet connection (idle ones too: see
    /// [`Http2KeepAlive`] for why), and how long one may go unanswered
    /// before the connection is closed, over HTTP/2: on the
    /// [`http2_only`](Self::http2_only) connections and hyper-util's. HTTP/1.1
    /// has no pings. Default [`Http2KeepAlive::HTTP`]: 30 s, 10 s. It is
    /// applied over the [`hyper`](Self::hyper) settings when the client is
    /// built, whatever the order of the calls; to keep the pings a `hyper`
    /// builder sets itself, call [`no_http2_keep_alive`](Self::no_http2_keep_alive).
    pub fn http2_keep_alive(mut self, keep_alive: Http2KeepAlive) -> Self {
        self.target.keep_alive = Some(keep_alive);
        self
    }

    /// No HTTP/2 pings of the client's own: undoes
    /// [`http2_keep_alive`](Self::http2_keep_alive) (the pool keeps what its
    /// [`hyper`](Self::hyper) settings say).
    pub fn no_http2_keep_alive(mut self) -> Self {
        self.target.keep_alive = None;
        self
    }
}

impl<B, R> ClientBuilder<Http<HttpConnector>, B, R> {
    /// HTTP/2 only, in plain text (prior knowledge, as gRPC does): each
    /// endpoint gets one HTTP/2 connection of its own, made on its first
    /// request (one attempt shared by every request that waits for it) and
    /// made again after it closes. A request goes from the balancer
    /// straight to its endpoint's connection, with no connection pool in
    /// between: in `benches/clients.rs` that is about 0.9 µs less client
    /// CPU per request than hyper-util's pooled client with
    /// `http2_only(true)`.
    ///
    /// The connections are TCP with `TCP_NODELAY` and a
    /// [`DEFAULT_CONNECT_TIMEOUT`]; the [`hyper`](Self::hyper) settings do
    /// not apply (there is no pool). Over `https`, or for hyper-util's
    /// HTTP/2 settings, use the hyper-util client instead: a TLS
    /// [`connector`](Self::connector) and `hyper` settings with
    /// `http2_only(true)`.
    ///
    /// ```
    /// use tower_lb::client::HttpClient;
    ///
    /// let builder = HttpClient::builder().http2_only();
    /// # let _ = builder;
    /// ```
    pub fn http2_only(mut self) -> Self {
        self.target.own_http2 = true;
        self
    }
}

impl<Conn, P, C, H, W, A, RB, R> ClientBuilder<Http<Conn>, balance::Builder<P, C, H, W, A>, R>
where
    R: RetryOn<http::Response<ResponseBody>>,
    // hyper-util's `Connect`, spelled out: its connectors are `Service<Uri>`s
    // (the only way to be one), which the client wraps to hear of failed
    // connections.
    Conn: tower::Service<http::Uri> + Clone + Send + Sync + 'static,
    Conn::Response: hyper::rt::Read
        + hyper::rt::Write
        + hyper_util::client::legacy::connect::Connection
        + Unpin
        + Send
        + 'static,
    Conn::Future: Unpin + Send,
    Conn::Error: Into<BoxError>,
    P: Strategy,
    C: Classify<http::Response<EndpointBody>, Response = http::Response<RB>>,
    RB: Body<Data = Bytes> + Send + Sync + 'static,
    RB::Error: Into<BoxError>,
    H: Send + Sync + 'static,
{
    /// A client over a fixed list of addresses.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime: the balancer spawns its driver task.
    pub fn build<B>(self, addrs: impl IntoIterator<Item = SocketAddr>) -> HttpClient<B>
    where
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
        H: RequestHints<http::Request<ReplayBody<B>>>,
        W: Describe<SocketAddr>,
        A: ActiveCheck<SocketAddr>,
    {
        let addrs: Vec<_> = addrs.into_iter().map(|addr| (addr, addr)).collect();
        self.build_discover(crate::discover::fixed(addrs))
    }

    /// A client over the addresses a discovery stream gives, under keys of
    /// its choosing (a [`discover::channel`](crate::discover::channel) of
    /// addresses, say).
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime: the balancer spawns its driver task.
    pub fn build_discover<B, D>(self, discover: D) -> HttpClient<B, D::Key>
    where
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
        H: RequestHints<http::Request<ReplayBody<B>>>,
        D: Discover<Service = SocketAddr> + Send + 'static,
        D::Key: std::hash::Hash + Eq + Clone + fmt::Debug + Send + Sync + 'static,
        D::Error: Into<BoxError>,
        W: Describe<D::Key>,
        A: ActiveCheck<D::Key>,
    {
        self.build_with(discover, None)
    }

    /// [`build_discover`](Self::build_discover), telling `on_connect_failure`
    /// of each connection that cannot be made.
    fn build_with<B, D>(
        self,
        discover: D,
        on_connect_failure: Option<ConnectFailureHook>,
    ) -> HttpClient<B, D::Key>
    where
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
        H: RequestHints<http::Request<ReplayBody<B>>>,
        D: Discover<Service = SocketAddr> + Send + 'static,
        D::Key: std::hash::Hash + Eq + Clone + fmt::Debug + Send + Sync + 'static,
        D::Error: Into<BoxError>,
        W: Describe<D::Key>,
        A: ActiveCheck<D::Key>,
    {
        let connections = PoolConnections::default();
        let connector = ObservedConnector::new(
            self.target.connector,
            on_connect_failure.clone(),
            connections.clone(),
        );
        let mut hyper = self.target.hyper;
        pool_keep_alive(&mut hyper, self.target.keep_alive);
        let hyper = hyper.build(connector);
        let scheme = self.target.scheme;
        let authority = self.target.authority;
        // Over `https` the pool's TLS connector is needed.
        let own_http2 = self.target.own_http2 && scheme == Scheme::HTTP;
        let own_http1 = self.target.own_http1 && scheme == Scheme::HTTP;
        let http1 = H1Settings {
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            idle_timeout: self.target.idle_timeout,
            on_connect_failure: on_connect_failure.clone(),
        };
        let settings = H2Settings::new(self.target.keep_alive)
            .ping_while_idle(true)
            .on_connect_failure(on_connect_failure);
        let endpoints = MapEndpoints::new(discover, move |addr: SocketAddr| {
            let endpoint = if own_http2 {
                HttpEndpoint::http2_connection(addr, settings.clone())
            } else if own_http1 {
                HttpEndpoint::http1_connections(addr, http1.clone())
            } else {
                let endpoint = HttpEndpoint::with_address(hyper.clone(), scheme.clone(), addr);
                let status = connections.register(endpoint.authority());
                endpoint.with_pool_status(status)
            };
            Some(match &authority {
                Some(host) => endpoint.with_host(host),
                None => endpoint,
            })
        });
        let balancer = self
            .balancer
            .connection_states(HttpEndpoint::connection_status)
            .build(endpoints);
        let handle = BalancerHandle::new(balancer.clone());
        self.calls
            .wrap(ResponseBody::map(balancer), handle, HttpLayers)
    }

    /// A client over every address of a DNS name (A/AAAA, or SRV),
    /// re-resolved on the records' TTL (see [`Dns`](crate::discover::Dns)).
    /// Give SRV weights to the balancer with
    /// [`static_weights`](ClientBuilder::static_weights)`(DnsEndpoint::static_weight)`.
    ///
    /// # Errors
    ///
    /// When the resolver cannot be set up (see
    /// [`Dns::build`](crate::discover::Dns::build)).
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    #[cfg(feature = "dns")]
    #[cfg_attr(docsrs, doc(cfg(feature = "dns")))]
    pub fn build_dns<B>(
        self,
        dns: crate::discover::Dns,
    ) -> Result<HttpClient<B, crate::discover::DnsEndpoint>, crate::discover::DnsError>
    where
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
        H: RequestHints<http::Request<ReplayBody<B>>>,
        W: Describe<crate::discover::DnsEndpoint>,
        A: ActiveCheck<crate::discover::DnsEndpoint>,
    {
        let (resolve_now, discover) = dns.build(|addr| addr)?;
        let reresolve = resolve_now.clone();
        let hook = ConnectFailureHook::new(move || reresolve.connection_failed());
        Ok(self
            .build_with(discover, Some(hook))
            .with_resolve_now(resolve_now))
    }
}

/// `HttpClient` has no layers of its own beyond the shared ones: the stack
/// is only boxed.
struct HttpLayers;

impl<B> ProtocolLayers<http::Request<B>, http::Response<ResponseBody>> for HttpLayers {
    fn wrap<S>(
        self,
        stack: S,
    ) -> BoxCloneSyncService<http::Request<B>, http::Response<ResponseBody>, BoxError>
    where
        S: Service<http::Request<B>, Response = http::Response<ResponseBody>, Error = BoxError>
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        BoxCloneSyncService::new(stack)
    }
}

/// The body of an [`HttpClient`]'s responses: the endpoint's body, read
/// through the classifier (which may judge the call, or take a load report,
/// at its end).
pub struct ResponseBody {
    inner: Pin<Box<dyn Body<Data = Bytes, Error = BoxError> + Send + Sync>>,
}

impl ResponseBody {
    fn new<B>(body: B) -> Self
    where
        B: Body<Data = Bytes> + Send + Sync + 'static,
        B::Error: Into<BoxError>,
    {
        Self {
            inner: Box::pin(ErrInto { inner: body }),
        }
    }

    /// `service` with its response bodies boxed.
    fn map<S, Req, RB>(service: S) -> tower::util::MapResponse<S, BoxBodyFn<RB>>
    where
        S: Service<Req, Response = http::Response<RB>>,
        RB: Body<Data = Bytes> + Send + Sync + 'static,
        RB::Error: Into<BoxError>,
    {
        tower::util::MapResponse::new(service, |response| response.map(ResponseBody::new))
    }
}

type BoxBodyFn<RB> = fn(http::Response<RB>) -> http::Response<ResponseBody>;

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.inner.as_mut().poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl fmt::Debug for ResponseBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseBody")
            .field("size_hint", &self.inner.size_hint())
            .finish()
    }
}

pin_project! {
    /// A body with its error boxed.
    struct ErrInto<B> {
        #[pin]
        inner: B,
    }
}

impl<B> Body for ErrInto<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.project()
            .inner
            .poll_frame(cx)
            .map(|frame| frame.map(|result| result.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
