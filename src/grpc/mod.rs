//! Glue for tonic: a balanced channel for generated gRPC clients.
//!
//! [`GrpcChannel`] is one tonic [`Channel`](tonic::transport::Channel) per
//! endpoint (each connects lazily, and reconnects after a drop), balanced by
//! a [`Balancer`](crate::Balancer), with a deadline, retries, a per-attempt
//! timeout and outlier detection around it. It is a
//! `Service<http::Request<tonic::body::Body>>` like tonic's own `Channel`,
//! so any generated client takes it unchanged:
//!
//! ```no_run
//! use tonic_health::pb::health_client::HealthClient;
//! use tonic_health::pb::HealthCheckRequest;
//! use tower_lb::grpc::{GrpcChannel, MethodSafety};
//! use tower_lb::request::Safety;
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), tower_lb::BoxError> {
//! let channel = GrpcChannel::builder()
//!     .method_safety(MethodSafety::new().service("grpc.health.v1.Health", Safety::Safe))
//!     .build(["127.0.0.1:50051".parse()?, "127.0.0.1:50052".parse()?]);
//!
//! let mut client = HealthClient::new(channel);
//! let reply = client.check(HealthCheckRequest { service: String::new() }).await?;
//! # let _ = reply;
//! # Ok(())
//! # }
//! ```
//!
//! What gRPC adds to the [ready-made client](crate::client) defaults:
//!
//! - **Classification** by gRPC status ([`HttpClassify::grpc`]): `UNKNOWN`,
//!   `DEADLINE_EXCEEDED`, `UNIMPLEMENTED`, `INTERNAL`, `UNAVAILABLE` and
//!   `DATA_LOSS` count against the endpoint, read from the headers or the
//!   trailers; ORCA reports in the `endpoint-load-metrics-bin` trailer feed
//!   [`WeightedRoundRobin`](crate::strategy::WeightedRoundRobin).
//! - **Retries**: `UNAVAILABLE` (and HTTP 502/503/504 from a proxy) is
//!   retried, no other code. A call is sent again only if its method may
//!   repeat ([`MethodSafety`], or a [`Safety`](crate::request::Safety) in the
//!   call's extensions) or it provably never left (the connection could not
//!   be made): gRPC calls are POSTs, unsafe unless said otherwise.
//! - **Deadlines** are the caller's: no channel deadline or attempt timeout
//!   by default (set them with [`ClientBuilder::deadline`] and
//!   [`ClientBuilder::attempt_timeout`]); a call's `grpc-timeout`
//!   (`tonic::Request::set_timeout`) bounds the call, retries included
//!   ([`GrpcTimeoutLayer`]), and each attempt tells the server the time left.
//!   A deadline running out is not held against the endpoint. Connecting
//!   times out after [`DEFAULT_CONNECT_TIMEOUT`](crate::client::DEFAULT_CONNECT_TIMEOUT).
//! - **Errors** reach the generated client as a `tonic::Status` with the
//!   right code ([`status_from_error`]): `DEADLINE_EXCEEDED` for timeouts,
//!   `UNAVAILABLE` when there is no endpoint, the channel is closed, or the
//!   connection broke under the call (reset, closed), even in the middle of
//!   the answer.
//! - **TLS**: [`ClientBuilder::scheme`]`(Scheme::HTTPS)`, with one of tonic's
//!   TLS features enabled in your `Cargo.toml` (tonic then applies TLS to
//!   `https` endpoints, or the `tls_config` you give
//!   [`ClientBuilder::configure_endpoint`]).

mod endpoint;
mod safety;
mod status;
mod timeout;

pub use self::endpoint::{GrpcEndpoint, GrpcResponseFuture};
pub use self::safety::{MethodSafety, WithMethodSafety};
pub use self::status::status_from_error;
pub use self::timeout::{GrpcTimeout, GrpcTimeoutLayer};

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, Scheme};
use http_body::Body;
use tonic::transport::Endpoint;
use tower::discover::Discover;
use tower::util::BoxCloneSyncService;
use tower::{Service, ServiceBuilder};

use self::endpoint::ConfigureEndpoint;
use crate::balance::{self, RequestHints, StaticWeights};
use crate::classify::{Classify, GrpcClassifier, HttpClassify};
use crate::client::{BalancerHandle, Calls, ClientBuilder, MapEndpoints, Parts};
use crate::error::BoxError;
use crate::load::OrcaLoadReports;
use crate::retry::{ReplayBody, RetryStats};
use crate::strategy::{P2c, Strategy};

/// The gRPC settings of a [`ClientBuilder`]: which methods may repeat, and
/// how each endpoint's tonic `Endpoint` is made.
#[derive(Clone)]
pub struct Grpc {
    safety: MethodSafety,
    scheme: Scheme,
    authority: Option<Authority>,
    configure: ConfigureEndpoint,
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
/// docs](self).
///
/// A cheap `Clone` handle; every clone shares the endpoints and their
/// connections.
pub struct GrpcChannel<K = SocketAddr> {
    service: BoxCloneSyncService<Call, Reply, BoxError>,
    parts: Parts<K>,
}

impl GrpcChannel<()> {
    /// A builder with the defaults of the [client module](crate::client),
    /// gRPC classification, and plain-text HTTP/2 endpoints with tonic's
    /// default settings.
    #[allow(clippy::type_complexity)]
    pub fn builder(
    ) -> ClientBuilder<Grpc, balance::Builder<P2c, DefaultGrpcClassify, crate::client::Hints>> {
        let balancer = balance::Builder::new()
            .classify(HttpClassify::grpc().load_reports(OrcaLoadReports))
            .outlier_detection(crate::health::OutlierDetection::default())
            .avoid_tried_endpoints();
        let grpc = Grpc {
            safety: MethodSafety::new(),
            scheme: Scheme::HTTP,
            authority: None,
            configure: Arc::new(Ok),
        };
        // gRPC deadlines are the caller's (`grpc-timeout`), and a call's
        // response headers may come only after a long request stream: no
        // timeouts of the channel's own unless asked for.
        ClientBuilder::with(grpc, balancer)
            .attempt_timeout(None)
            .deadline(None)
    }
}

impl<B> ClientBuilder<Grpc, B> {
    /// Which methods may be sent twice (retried and hedged).
    pub fn method_safety(mut self, safety: MethodSafety) -> Self {
        self.target.safety = safety;
        self
    }

    /// `https` to connect with TLS: give the TLS settings with
    /// [`configure_endpoint`](Self::configure_endpoint) (`tls_config`, from
    /// one of tonic's TLS features). Without TLS support an `https` endpoint
    /// fails every call; it never falls back to plain text. Default `http`.
    pub fn scheme(mut self, scheme: Scheme) -> Self {
        self.target.scheme = scheme;
        self
    }

    /// The `:authority` of every call: the service's name rather than each
    /// endpoint's address, for virtual hosts and sidecars that route by it.
    /// [`build_dns`](ClientBuilder::build_dns) with
    /// [`Dns::host`](crate::discover::Dns::host) sets it to the name and port
    /// looked up, unless given here. (The TLS server name is the
    /// `tls_config`'s `domain_name`.)
    pub fn authority(mut self, authority: Authority) -> Self {
        self.target.authority = Some(authority);
        self
    }

    /// Configures each endpoint's tonic [`Endpoint`] (keep-alive, TLS,
    /// timeouts, ...) before its channel is made. It starts from
    /// `scheme://address` with a connect timeout of
    /// [`DEFAULT_CONNECT_TIMEOUT`](crate::client::DEFAULT_CONNECT_TIMEOUT). An endpoint whose configuration fails
    /// is reported (a `warn` event) and left out.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_lb::grpc::GrpcChannel;
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
        self.target.configure = Arc::new(configure);
        self
    }
}

impl<P, C, H, W, RB> ClientBuilder<Grpc, balance::Builder<P, C, H, W>>
where
    P: Strategy,
    C: Classify<Reply, Response = http::Response<RB>>,
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
        W: StaticWeights<SocketAddr>,
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
        W: StaticWeights<D::Key>,
    {
        let Grpc {
            safety: method_safety,
            scheme,
            authority,
            configure,
        } = self.target;
        let endpoints = MapEndpoints::new(discover, move |addr| {
            GrpcEndpoint::lazy(addr, &scheme, authority.as_ref(), &configure)
        });
        let balancer = self.balancer.build(endpoints);
        let boxed_bodies =
            tower::util::MapResponse::new(balancer.clone(), |response: http::Response<RB>| {
                response.map(|body| tonic::body::Body::new(status::StatusBody::new(body)))
            });
        let calls = Calls::default();
        let service = ServiceBuilder::new()
            .map_err(|error| BoxError::from(status_from_error(error)))
            .layer(calls.clone())
            .layer(method_safety)
            .layer(GrpcTimeoutLayer)
            .service(self.calls.wrap(boxed_bodies));
        GrpcChannel {
            service: BoxCloneSyncService::new(service),
            parts: Parts::new(calls, BalancerHandle::new(balancer), self.calls.budget()),
        }
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
    pub fn build_dns(
        self,
        dns: crate::discover::Dns,
    ) -> Result<GrpcChannel<crate::discover::DnsEndpoint>, crate::discover::DnsError>
    where
        W: StaticWeights<crate::discover::DnsEndpoint>,
    {
        let mut builder = self;
        if builder.target.authority.is_none() {
            builder.target.authority = dns.authority();
        }
        let (discover, resolve_now) = dns.build(|addr| addr)?;
        let mut channel = builder.build_discover(discover);
        channel.parts.resolve_now = Some(resolve_now);
        Ok(channel)
    }
}

impl<K> GrpcChannel<K> {
    /// The balancer: its endpoints and their state.
    pub fn balancer(&self) -> &BalancerHandle<K> {
        &self.parts.balancer
    }

    /// Stops taking calls: new ones fail at once with `UNAVAILABLE`, while
    /// calls in progress go on, retries included. Affects every clone.
    pub fn close(&self) {
        self.parts.calls.close();
    }

    /// Calls in progress: from `call` until the response headers arrive,
    /// pauses between retries included.
    pub fn calls_in_progress(&self) -> usize {
        self.parts.calls.open()
    }

    /// Graceful shutdown: [`close`](Self::close)s, waits until the calls in
    /// progress are over (retries included) or `timeout` passes, then closes
    /// the balancer.
    ///
    /// # Errors
    ///
    /// [`Error::ShutdownTimedOut`](crate::Error::ShutdownTimedOut) when calls
    /// were still in progress after `timeout`.
    pub async fn shutdown(&self, timeout: Duration) -> Result<(), crate::Error> {
        self.parts.shutdown(timeout).await
    }

    /// What the retry budget has seen, or `None` without retries and
    /// hedging.
    pub fn retry_stats(&self) -> Option<RetryStats> {
        self.parts.retry_stats()
    }

    /// For a channel built with [`build_dns`](ClientBuilder::build_dns): a
    /// handle that asks for a resolution now.
    #[cfg(feature = "dns")]
    pub fn resolve_now(&self) -> Option<&crate::discover::ResolveNow> {
        self.parts.resolve_now.as_ref()
    }
}

impl<K> Service<Call> for GrpcChannel<K> {
    type Response = Reply;
    type Error = BoxError;
    type Future = <BoxCloneSyncService<Call, Reply, BoxError> as Service<Call>>::Future;

    /// Ready when the stack is. A closed balancer's refusal is not an error
    /// here (a generated client would turn it into `UNKNOWN`): `call`
    /// answers it with `UNAVAILABLE`.
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        match self.service.poll_ready(cx) {
            Poll::Ready(Err(_)) if self.parts.balancer.is_closed() => Poll::Ready(Ok(())),
            other => other,
        }
    }

    fn call(&mut self, req: Call) -> Self::Future {
        if self.parts.balancer.is_closed() {
            let closed = status_from_error(Box::new(crate::Error::Closed));
            return Box::pin(std::future::ready(Err(BoxError::from(closed))));
        }
        self.service.call(req)
    }
}

impl<K> Clone for GrpcChannel<K> {
    fn clone(&self) -> Self {
        Self {
            service: self.service.clone(),
            parts: self.parts.clone(),
        }
    }
}

impl<K> fmt::Debug for GrpcChannel<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrpcChannel")
            .field("balancer", &self.parts.balancer)
            .field("retry_stats", &self.retry_stats())
            .finish_non_exhaustive()
    }
}
