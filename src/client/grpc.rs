use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::uri::{Authority, Scheme};
use http_body::Body;
use tonic::transport::Endpoint;
use tower::discover::Discover;
use tower::util::BoxCloneSyncService;
use tower::{Service, ServiceBuilder};

use super::{BalancedClient, BalancerHandle, ClientBuilder, Hints, MapEndpoints, ProtocolLayers};
use crate::balance::{self, Describe, RequestHints};
use crate::classify::{Classify, GrpcClassifier, HttpClassify};
use crate::connection::{ConnectFailureHook, H2Settings, Http2KeepAlive};
use crate::error::BoxError;
use crate::grpc::{
    status_from_error, ConfigureEndpoint, EndpointBody, GrpcEndpoint, GrpcTimeoutLayer,
    MethodSafety, StatusBody,
};
use crate::health::ActiveCheck;
use crate::load::OrcaLoadReports;
use crate::retry::{ReplayBody, RetryOn};
use crate::strategy::{P2c, Strategy};

/// The gRPC settings of a [`ClientBuilder`]: which methods may repeat, and
/// how each endpoint is reached.
#[derive(Clone)]
pub struct Grpc {
    safety: MethodSafety,
    scheme: Scheme,
    authority: Option<Authority>,
    /// `None`: tower-lb's own HTTP/2 connections (see `GrpcEndpoint::for_address`).
    configure: Option<ConfigureEndpoint>,
    /// The own connections' keep-alive.
    keep_alive: Option<Http2KeepAlive>,
}

impl fmt::Debug for Grpc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Grpc")
            .field("safety", &self.safety)
            .finish_non_exhaustive()
    }
}

/// The classifier [`GrpcChannel`] starts with: gRPC status codes, and ORCA
/// reports from the `endpoint-load-metrics-bin` trailer.
pub type DefaultGrpcClassify = HttpClassify<GrpcClassifier, OrcaLoadReports>;

type Call = http::Request<tonic::body::Body>;
type Reply = http::Response<tonic::body::Body>;

/// A balanced channel for tonic generated clients: see the [module
/// docs](crate::grpc).
///
/// A cheap `Clone` handle; every clone shares the endpoints and their
/// connections.
pub type GrpcChannel<K = SocketAddr> = BalancedClient<Call, Reply, K>;

impl BalancedClient<Call, Reply, ()> {
    /// A builder with the defaults of the [client module](crate::client),
    /// gRPC classification, and plain-text HTTP/2 endpoints: one connection
    /// each, made by tower-lb.
    #[allow(clippy::type_complexity)]
    pub fn builder() -> ClientBuilder<Grpc, balance::Builder<P2c, DefaultGrpcClassify, Hints>> {
        let balancer = balance::Builder::new()
            .classify(HttpClassify::grpc().load_reports(OrcaLoadReports))
            .outlier_detection(crate::health::OutlierDetection::default())
            .avoid_tried_endpoints();
        let grpc = Grpc {
            safety: MethodSafety::new(),
            scheme: Scheme::HTTP,
            authority: None,
            configure: None,
            keep_alive: Some(Http2KeepAlive::GRPC),
        };
        // gRPC deadlines are the caller's (`grpc-timeout`), and a call's
        // response headers may come only after a long request stream: no
        // timeouts of the channel's own unless asked for.
        ClientBuilder::with(grpc, balancer)
            .no_attempt_timeout()
            .no_deadline()
    }
}

impl<B, R> ClientBuilder<Grpc, B, R> {
    /// HTTP/2 pings on a quiet connection with calls open, and how long one
    /// may go unanswered before the connection is closed (see
    /// [`Http2KeepAlive`]). Default [`Http2KeepAlive::GRPC`]: 5 minutes,
    /// 20 s, as often as grpc-go and grpc-java servers allow by default.
    /// Applies to tower-lb's own connections; with
    /// [`configure_endpoint`](Self::configure_endpoint), set tonic's
    /// `http2_keep_alive_interval` there.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_lb::client::{GrpcChannel, Http2KeepAlive};
    ///
    /// // For servers that allow pings every 10 s.
    /// let keep_alive = Http2KeepAlive::new(Duration::from_secs(10), Duration::from_secs(5))?;
    /// let builder = GrpcChannel::builder().http2_keep_alive(keep_alive);
    /// # let _ = builder;
    /// # Ok::<_, tower_lb::error::InvalidSetting>(())
    /// ```
    pub fn http2_keep_alive(mut self, keep_alive: Http2KeepAlive) -> Self {
        self.target.keep_alive = Some(keep_alive);
        self
    }

    /// No HTTP/2 pings: undoes [`http2_keep_alive`](Self::http2_keep_alive).
    pub fn no_http2_keep_alive(mut self) -> Self {
        self.target.keep_alive = None;
        self
    }

    /// Which methods may be sent twice (retried and hedged).
    pub fn method_safety(mut self, safety: MethodSafety) -> Self {
        self.target.safety = safety;
        self
    }

    /// `https` to connect with TLS, through tonic's channels: give the TLS
    /// settings with [`configure_endpoint`](Self::configure_endpoint)
    /// (`tls_config`, from one of tonic's TLS features). Without TLS support
    /// an `https` endpoint fails every call; it never falls back to plain
    /// text. Default `http`.
    pub fn scheme(mut self, scheme: Scheme) -> Self {
        self.target.scheme = scheme;
        self
    }

    /// The `:authority` of every call: the service's name rather than each
    /// endpoint's address, for virtual hosts and sidecars that route by it.
    /// [`build_dns`] with [`Dns::host`] (feature `dns`) sets it to the name
    /// and port looked up, unless given here. (The TLS server name is the
    /// `tls_config`'s `domain_name`.)
    ///
    #[cfg_attr(
        feature = "dns",
        doc = "
[`build_dns`]: ClientBuilder::build_dns
[`Dns::host`]: crate::discover::Dns::host
"
    )]
    #[cfg_attr(
        not(feature = "dns"),
        doc = "
[`build_dns`]: crate#cargo-features
[`Dns::host`]: crate#cargo-features
"
    )]
    pub fn authority(mut self, authority: Authority) -> Self {
        self.target.authority = Some(authority);
        self
    }

    /// Makes each endpoint a tonic `Channel`, from a tonic [`Endpoint`]
    /// configured here (keep-alive, TLS, timeouts, limits, ...), instead of
    /// the HTTP/2 connection tower-lb makes by default (which has no queue
    /// in front of it, and so costs less per call). It starts from
    /// `scheme://address` with a connect timeout of
    /// [`DEFAULT_CONNECT_TIMEOUT`](crate::client::DEFAULT_CONNECT_TIMEOUT). An endpoint whose configuration fails
    /// is reported (a `warn` event) and left out.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_lb::client::GrpcChannel;
    ///
    /// let builder = GrpcChannel::builder().configure_endpoint(|e| {
    ///     Ok(e.connect_timeout(Duration::from_millis(500))
    ///         .http2_keep_alive_interval(Duration::from_secs(30)))
    /// });
    /// # let _ = builder;
    /// ```
    pub fn configure_endpoint(
        mut self,
        configure: impl Fn(Endpoint) -> Result<Endpoint, tonic::transport::Error>
            + Send
            + Sync
            + 'static,
    ) -> Self {
        self.target.configure = Some(Arc::new(configure));
        self
    }
}

impl<P, C, H, W, A, RB, R> ClientBuilder<Grpc, balance::Builder<P, C, H, W, A>, R>
where
    R: RetryOn<Reply>,
    P: Strategy,
    C: Classify<http::Response<EndpointBody>, Response = http::Response<RB>>,
    RB: Body<Data = Bytes> + Send + 'static,
    RB::Error: Into<BoxError>,
    H: RequestHints<http::Request<ReplayBody<tonic::body::Body>>> + Send + Sync + 'static,
{
    /// A channel over a fixed list of addresses.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime: the balancer spawns its driver task.
    pub fn build(self, addrs: impl IntoIterator<Item = SocketAddr>) -> GrpcChannel
    where
        W: Describe<SocketAddr>,
        A: ActiveCheck<SocketAddr>,
    {
        let addrs: Vec<_> = addrs.into_iter().map(|addr| (addr, addr)).collect();
        self.build_discover(crate::discover::fixed(addrs))
    }

    /// A channel over the addresses a discovery stream gives, under keys of
    /// its choosing.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime: the balancer spawns its driver task.
    pub fn build_discover<D>(self, discover: D) -> GrpcChannel<D::Key>
    where
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
    fn build_with<D>(
        self,
        discover: D,
        on_connect_failure: Option<ConnectFailureHook>,
    ) -> GrpcChannel<D::Key>
    where
        D: Discover<Service = SocketAddr> + Send + 'static,
        D::Key: std::hash::Hash + Eq + Clone + fmt::Debug + Send + Sync + 'static,
        D::Error: Into<BoxError>,
        W: Describe<D::Key>,
        A: ActiveCheck<D::Key>,
    {
        let Grpc {
            safety: method_safety,
            scheme,
            authority,
            configure,
            keep_alive,
        } = self.target;
        let h2 = H2Settings::new(keep_alive).on_connect_failure(on_connect_failure);
        let endpoints = MapEndpoints::new(discover, move |addr| {
            GrpcEndpoint::for_address(
                addr,
                &scheme,
                authority.as_ref(),
                configure.as_ref(),
                h2.clone(),
            )
        });
        let balancer = self
            .balancer
            .connection_states(GrpcEndpoint::connection_status)
            .build(endpoints);
        let boxed_bodies =
            tower::util::MapResponse::new(balancer.clone(), |response: http::Response<RB>| {
                response.map(|body| tonic::body::Body::new(StatusBody::new(body)))
            });
        let handle = BalancerHandle::new(balancer);
        self.calls
            .wrap(boxed_bodies, handle, GrpcLayers { method_safety })
    }

    /// A channel over every address of a DNS name, re-resolved on the
    /// records' TTL (see [`Dns`](crate::discover::Dns)).
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
    pub fn build_dns(
        self,
        dns: crate::discover::Dns,
    ) -> Result<GrpcChannel<crate::discover::DnsEndpoint>, crate::discover::DnsError>
    where
        W: Describe<crate::discover::DnsEndpoint>,
        A: ActiveCheck<crate::discover::DnsEndpoint>,
    {
        let mut builder = self;
        if builder.target.authority.is_none() {
            builder.target.authority = dns.authority();
        }
        let (resolve_now, discover) = dns.build(|addr| addr)?;
        let reresolve = resolve_now.clone();
        let hook = ConnectFailureHook::new(move || reresolve.connection_failed());
        Ok(builder
            .build_with(discover, Some(hook))
            .with_resolve_now(resolve_now))
    }
}

/// The request without the method name a generated client puts in its
/// extensions (tonic's `GrpcMethod`): nothing beneath reads it (the method
/// is in the path), and a request whose extensions hold only the call's
/// context is kept for retries without copying them (three allocations a
/// call; see `Replayable::replay_kept`).
fn without_method_name(mut req: Call) -> Call {
    req.extensions_mut().remove::<tonic::GrpcMethod<'static>>();
    req
}

/// `GrpcChannel`'s own outer layers: errors as `Status`, method safety,
/// `grpc-timeout`.
struct GrpcLayers {
    method_safety: MethodSafety,
}

impl ProtocolLayers<Call, Reply> for GrpcLayers {
    fn wrap<S>(self, stack: S) -> BoxCloneSyncService<Call, Reply, BoxError>
    where
        S: Service<Call, Response = Reply, Error = BoxError> + Clone + Send + Sync + 'static,
        S::Future: Send + 'static,
    {
        BoxCloneSyncService::new(
            ServiceBuilder::new()
                .map_err(|error| BoxError::from(status_from_error(error)))
                .map_request(without_method_name)
                .layer(self.method_safety)
                .layer(GrpcTimeoutLayer)
                .service(stack),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::{HasCallContext, Replayable};

    #[test]
    fn a_generated_clients_call_is_kept_for_retries_without_copying_its_extensions() {
        let mut call: Call = http::Request::new(tonic::body::Body::empty());
        call.extensions_mut()
            .insert(tonic::GrpcMethod::new("grpc.health.v1.Health", "Check"));
        call.call_context_mut();
        let call = without_method_name(call);
        assert_eq!(
            call.extensions().len(),
            1,
            "only the call's context is left"
        );
        let kept = call
            .map(|body| ReplayBody::new(body, 1024))
            .replay_kept()
            .expect("a copy");
        assert!(kept.extensions().is_empty());
    }
}
