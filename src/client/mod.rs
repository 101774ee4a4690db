//! Ready-made clients: from "a DNS name, or a list of addresses" to a
//! balanced, retrying service in a few lines.
//!
//! [`HttpClient`] (feature `http`) and
//! [`GrpcChannel`] (feature `grpc`) are the whole
//! request path of the crate put together with defaults an experienced user
//! would pick:
//!
//! | part | default | change it with |
//! |---|---|---|
//! | strategy | [`P2c::peak_ewma`](crate::strategy::P2c::peak_ewma) | [`ClientBuilder::strategy`] |
//! | what a failure is | HTTP 5xx, or the gRPC codes that mean "server trouble"; load reports read from ORCA headers or trailers | [`ClientBuilder::classify`] |
//! | outlier detection | [`OutlierDetection::default`] (5 consecutive failures, success rate, 30 s base ejection) | [`ClientBuilder::outlier_detection`], [`ClientBuilder::no_outlier_detection`] |
//! | per-attempt timeout | HTTP: 5 s; gRPC: none | [`ClientBuilder::attempt_timeout`], [`ClientBuilder::no_attempt_timeout`] |
//! | deadline, whole call | HTTP: 15 s (Envoy's route timeout); gRPC: none, the caller's `grpc-timeout` | [`ClientBuilder::deadline`], [`ClientBuilder::no_deadline`] |
//! | connect timeout | 5 s (Envoy's); a connection never made is retried even for a POST | the connector, or tonic's `Endpoint` |
//! | HTTP/2 keep-alive (a ping on a quiet connection: HTTP, any; gRPC, with calls open) | HTTP: 30 s, 10 s to answer; gRPC: 5 minutes, 20 s (what grpc-go and grpc-java servers allow) | `http2_keep_alive`, `no_http2_keep_alive` (see [`Http2KeepAlive`]) |
//! | active health checks | none | [`ClientBuilder::health_check`] |
//! | retries | 3 attempts, gated by the request's [`Safety`](crate::request::Safety) class, on untried endpoints | [`ClientBuilder::retry_policy`], [`ClientBuilder::no_retries`] |
//! | retry budget | [`RetryBudget::new`] (20 % of requests over 10 s, plus 10/s) | [`ClientBuilder::retry_budget`] |
//! | hedging | off | [`ClientBuilder::hedging`] (drawing on the retry budget), [`ClientBuilder::no_hedging`] |
//! | slow start | off | [`ClientBuilder::slow_start`], [`ClientBuilder::no_slow_start`] |
//! | anything else on the balancer | [`Balancer::builder`](crate::Balancer::builder) defaults | [`ClientBuilder::balancer`] |
//!
//! One rule for every part that can be off: `x(settings)` sets it, `no_x()`
//! switches it off.
//!
//! The layers are those of the rest of the crate, in the order of the
//! design: deadline, body replay, retry, hedge, per-attempt timeout, then the
//! balancer. Build the stack by hand with `tower::ServiceBuilder` when you
//! need a layer of your own in between.
//!
//! ```no_run
//! use std::time::Duration;
//! use http_body_util::Full;
//! use hyper::body::Bytes;
//! use tower::ServiceExt;
//! use tower_lb::client::HttpClient;
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), tower_lb::BoxError> {
//! let client = HttpClient::builder()
//!     .attempt_timeout(Duration::from_secs(1))
//!     .build(["127.0.0.1:8080".parse()?, "127.0.0.1:8081".parse()?]);
//!
//! let request = http::Request::get("/hello").body(Full::new(Bytes::new()))?;
//! let response = client.clone().oneshot(request).await?;
//! println!("{} from {:?}", response.status(), client.balancer().endpoints());
//! # Ok(())
//! # }
//! ```
//!
//! Both are one type, [`BalancedClient`], for their protocol's requests and
//! responses: the same handle (balancer, graceful shutdown, retry stats) and
//! one "closed" flag, which closing the client or its balancer sets. The
//! services are type-erased (`BoxCloneSyncService` inside), so the client
//! is a plain named type you can keep in a struct. That costs an
//! allocation per call for the boxed future (about 130 ns in
//! `benches/layers.rs`), and for `HttpClient` one per response for the boxed
//! body; counting calls for a graceful shutdown adds two atomic operations.
//!
#![cfg_attr(feature = "grpc", doc = "[`GrpcChannel`]: GrpcChannel")]
#![cfg_attr(not(feature = "grpc"), doc = "[`GrpcChannel`]: crate#cargo-features")]

mod calls;
mod discover;
#[cfg(feature = "grpc")]
mod grpc;
mod handle;
mod http;
mod pool;
mod service;

#[cfg(feature = "grpc")]
#[cfg_attr(docsrs, doc(cfg(feature = "grpc")))]
pub use self::grpc::{DefaultGrpcClassify, Grpc, GrpcChannel};
pub use self::handle::BalancerHandle;
pub use self::http::{DefaultHttpClassify, Http, HttpClient, ResponseBody};
pub use self::service::BalancedClient;
pub use crate::connection::Http2KeepAlive;

pub(crate) use self::calls::Calls;
pub(crate) use self::discover::MapEndpoints;

use std::fmt;
use std::marker::PhantomData;
use std::time::Duration;

use tower::util::BoxCloneSyncService;
use tower::{Layer, Service, ServiceBuilder};

use crate::balance::{self, CallHints, StaticWeights};
use crate::error::{BoxError, InvalidSetting};
use crate::health::{OutlierDetection, SlowStart};
use crate::hedge::HedgeLayer;
use crate::request::Replayable;
use crate::retry::{
    HttpRetryOn, ReplayBody, ReplayLayer, RetryBudget, RetryLayer, RetryOn, RetryPolicy,
};
use crate::strategy::Strategy;
use crate::timeout::{AttemptTimeoutLayer, DeadlineLayer};

/// The default per-attempt timeout of the ready-made clients.
pub const DEFAULT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long connecting to an endpoint may take before the request goes
/// elsewhere (Envoy's default connect timeout): the default of both
/// ready-made clients. A connection that was never made proves the request
/// never left, so even a POST is retried.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long `HttpClient` keeps an idle keep-alive connection: 4 s, below
/// the idle timeout of Node.js and Apache (5 s) and nginx (75 s). A client
/// that keeps a connection longer than the server races the server's close:
/// a request written just as the server closes fails with "connection closed
/// before message completed", and a POST so lost cannot be resent.
/// hyper-util's own default is 90 s. Servers with shorter timeouts exist
/// (gunicorn's is 2 s): against those, set the client's lower with
/// [`ClientBuilder::pool_idle_timeout`]. Either way such races do not eject a healthy
/// endpoint: the failures of one lost connection count as one (see
/// [`health`](crate::health)).
pub const DEFAULT_POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(4);

/// The default deadline of the ready-made clients: Envoy's route timeout.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(15);

/// Configures a ready-made client: [`HttpClient::builder`] or
/// [`GrpcChannel::builder`] (feature `grpc`).
///
/// `T` is what it builds (its protocol's settings), `B` the
/// [`balance::Builder`] it hands the endpoints to. Every setter replaces one
/// part and keeps the rest; see the [module docs](self) for the defaults.
///
#[cfg_attr(
    feature = "grpc",
    doc = "[`GrpcChannel::builder`]: GrpcChannel::builder"
)]
#[cfg_attr(
    not(feature = "grpc"),
    doc = "[`GrpcChannel::builder`]: crate#cargo-features"
)]
pub struct ClientBuilder<T, B, R = HttpRetryOn> {
    pub(crate) target: T,
    pub(crate) balancer: B,
    pub(crate) calls: CallSettings<R>,
}

/// The layers around the balancer.
#[derive(Debug)]
pub(crate) struct CallSettings<R = HttpRetryOn> {
    attempt_timeout: Option<Duration>,
    deadline: Option<Duration>,
    retry: Option<RetryPolicy<R>>,
    budget: RetryBudget,
    hedge: Option<HedgeLayer>,
    replay_cap: usize,
}

impl Default for CallSettings<HttpRetryOn> {
    fn default() -> Self {
        Self {
            attempt_timeout: Some(DEFAULT_ATTEMPT_TIMEOUT),
            deadline: Some(DEFAULT_DEADLINE),
            retry: Some(RetryPolicy::new()),
            budget: RetryBudget::new(),
            hedge: None,
            replay_cap: crate::retry::DEFAULT_REPLAY_CAP,
        }
    }
}

impl<R> CallSettings<R> {
    /// The same settings with another retry policy.
    fn with_retry<D>(self, retry: Option<RetryPolicy<D>>) -> CallSettings<D> {
        CallSettings {
            attempt_timeout: self.attempt_timeout,
            deadline: self.deadline,
            retry,
            budget: self.budget,
            hedge: self.hedge,
            replay_cap: self.replay_cap,
        }
    }
}

impl<T, B> ClientBuilder<T, B> {
    pub(crate) fn with(target: T, balancer: B) -> Self {
        Self {
            target,
            balancer,
            calls: CallSettings::default(),
        }
    }
}

impl<T, B, R> ClientBuilder<T, B, R> {
    /// How long one attempt may take, until its response headers arrive,
    /// before it is abandoned (and, for a request that may repeat, retried
    /// elsewhere).
    pub fn attempt_timeout(mut self, timeout: Duration) -> Self {
        self.calls.attempt_timeout = Some(timeout);
        self
    }

    /// No bound on one attempt (the deadline, if any, still ends it).
    pub fn no_attempt_timeout(mut self) -> Self {
        self.calls.attempt_timeout = None;
        self
    }

    /// How long a whole call may take, every attempt and backoff included,
    /// until the response headers arrive (a response body still streaming
    /// is the caller's to bound). A caller's earlier
    /// [`CallDeadline`](crate::timeout::CallDeadline) in the request's
    /// extensions wins.
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.calls.deadline = Some(deadline);
        self
    }

    /// No deadline of the client's own; a caller's
    /// [`CallDeadline`](crate::timeout::CallDeadline) (or gRPC
    /// `grpc-timeout`) still holds.
    pub fn no_deadline(mut self) -> Self {
        self.calls.deadline = None;
        self
    }

    /// The retry policy (attempts, backoff, which responses to retry).
    /// Whatever it says, a request whose [`Safety`](crate::request::Safety)
    /// class forbids repeating is sent again only when it provably never
    /// left.
    ///
    /// Which responses are retried is the policy's [`RetryOn`] rule:
    /// [`HttpRetryOn`] (HTTP 502, 503, 504 and gRPC `UNAVAILABLE` by
    /// default), or a rule of your own through
    /// [`RetryPolicy::retry_on`]. It sees the response as the client's
    /// layers do (for [`HttpClient`], an `http::Response<`[`ResponseBody`]`>`;
    /// for `GrpcChannel`, an `http::Response<tonic::body::Body>`), so a
    /// rule over any `http::Response<B>` fits both:
    ///
    /// ```
    /// use tower_lb::client::HttpClient;
    /// use tower_lb::retry::{ResponseVerdict, RetryOn, RetryPolicy};
    ///
    /// /// Retries what the server marks as worth another try.
    /// struct RetryWhenAsked;
    ///
    /// impl<B> RetryOn<http::Response<B>> for RetryWhenAsked {
    ///     fn response(&self, response: &http::Response<B>) -> ResponseVerdict {
    ///         match response.headers().get("x-try-elsewhere") {
    ///             Some(_) => ResponseVerdict::Retry { after: None },
    ///             None => ResponseVerdict::Accept,
    ///         }
    ///     }
    /// }
    ///
    /// let builder = HttpClient::builder()
    ///     .retry_policy(RetryPolicy::new().max_attempts(2)?.retry_on(RetryWhenAsked));
    /// # let _ = builder;
    /// # Ok::<_, tower_lb::error::InvalidSetting>(())
    /// ```
    pub fn retry_policy<D>(self, policy: RetryPolicy<D>) -> ClientBuilder<T, B, D> {
        ClientBuilder {
            target: self.target,
            balancer: self.balancer,
            calls: self.calls.with_retry(Some(policy)),
        }
    }

    /// No retries (hedging, if set, still draws on the budget).
    pub fn no_retries(mut self) -> Self {
        self.calls.retry = None;
        self
    }

    /// The budget retries and hedges draw from. Share one budget between
    /// clients to cap their retries together.
    pub fn retry_budget(mut self, budget: RetryBudget) -> Self {
        self.calls.budget = budget;
        self
    }

    /// Sends a hedge (a second attempt) after an adaptive delay, for safe
    /// and idempotent requests, with `hedge`'s settings
    /// ([`HedgeLayer::default`] for the defaults). Hedges draw on the
    /// client's retry budget, whichever budget `hedge` was made with, so that
    /// [`retry_stats`](HttpClient::retry_stats) counts them and the budget
    /// caps retries and hedges together. Off unless set.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_lb::client::HttpClient;
    /// use tower_lb::hedge::HedgeLayer;
    ///
    /// let builder = HttpClient::builder()
    ///     .hedging(HedgeLayer::default().percentile(0.9)?.min_delay(Duration::from_millis(20)));
    /// # let _ = builder;
    /// # Ok::<_, tower_lb::error::InvalidSetting>(())
    /// ```
    pub fn hedging(mut self, hedge: HedgeLayer) -> Self {
        self.calls.hedge = Some(hedge);
        self
    }

    /// No hedges: undoes [`hedging`](Self::hedging).
    pub fn no_hedging(mut self) -> Self {
        self.calls.hedge = None;
        self
    }

    /// The largest request body kept for a retry or a hedge
    /// ([`DEFAULT_REPLAY_CAP`](crate::retry::DEFAULT_REPLAY_CAP) by default);
    /// a larger body is sent once and not repeated.
    pub fn replay_cap(mut self, bytes: usize) -> Self {
        self.calls.replay_cap = bytes;
        self
    }
}

impl<T, P, C, H, W, A, R> ClientBuilder<T, balance::Builder<P, C, H, W, A>, R>
where
    P: Strategy,
{
    /// The balancing strategy.
    pub fn strategy<Q: Strategy>(
        self,
        strategy: Q,
    ) -> ClientBuilder<T, balance::Builder<Q, C, H, W, A>, R> {
        self.balancer(|b| b.strategy(strategy))
    }

    /// What counts as a failure of an endpoint (and which load reports are
    /// read), for outlier detection and the latency estimate.
    pub fn classify<D>(self, classify: D) -> ClientBuilder<T, balance::Builder<P, D, H, W, A>, R> {
        self.balancer(|b| b.classify(classify))
    }

    /// Outlier detection (on by default, with [`OutlierDetection::new`]).
    pub fn outlier_detection(self, detection: OutlierDetection) -> Self {
        self.balancer(|b| b.outlier_detection(detection))
    }

    /// Keeps every endpoint in service whatever it answers.
    pub fn no_outlier_detection(self) -> Self {
        self.balancer(|b| b.no_outlier_detection())
    }

    /// Slow start for endpoints that join after the first set, or come back
    /// from an ejection. Default off.
    pub fn slow_start(self, slow_start: SlowStart) -> Self {
        self.balancer(|b| b.slow_start(slow_start))
    }

    /// No slow start: undoes [`slow_start`](Self::slow_start).
    pub fn no_slow_start(self) -> Self {
        self.balancer(|b| b.no_slow_start())
    }

    /// When fewer than this percentage of the endpoints are in service,
    /// balance over all of them (see
    /// [`balance::Builder::panic_threshold`]). Default 50; 0: never.
    ///
    /// # Errors
    ///
    /// When `percent` is above 100.
    pub fn panic_threshold(self, percent: u32) -> Result<Self, InvalidSetting> {
        let percent = crate::setting::percent("ClientBuilder::panic_threshold", percent)?;
        let ClientBuilder {
            target,
            balancer,
            calls,
        } = self;
        Ok(ClientBuilder {
            target,
            balancer: balancer.panic_threshold(percent)?,
            calls,
        })
    }

    /// Checks every endpoint actively (see
    /// [`balance::Builder::health_check`]): an endpoint that fails its
    /// check, or has not passed it yet, is not picked. Default: none.
    ///
    /// ```
    /// use tower_lb::{client::HttpClient, health::HealthCheck};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), tower_lb::error::InvalidSetting> {
    /// let client = HttpClient::builder()
    ///     .health_check(HealthCheck::http_get("/healthz")?)
    ///     .build::<String>(["127.0.0.1:8080".parse().unwrap()]);
    /// # let _ = client;
    /// # Ok(())
    /// # }
    /// ```
    pub fn health_check<Ck>(
        self,
        checks: Ck,
    ) -> ClientBuilder<T, balance::Builder<P, C, H, W, Ck>, R> {
        self.balancer(|b| b.health_check(checks))
    }

    /// Static weights from the discovery keys, for example
    /// [`DnsEndpoint::static_weight`] with [`build_dns`] (feature `dns`).
    ///
    #[cfg_attr(
        feature = "dns",
        doc = "
[`DnsEndpoint::static_weight`]: crate::discover::DnsEndpoint::static_weight
[`build_dns`]: ClientBuilder::build_dns
"
    )]
    #[cfg_attr(
        not(feature = "dns"),
        doc = "
[`DnsEndpoint::static_weight`]: crate#cargo-features
[`build_dns`]: crate#cargo-features
"
    )]
    pub fn static_weights<V: StaticWeights<K>, K>(
        self,
        weights: V,
    ) -> ClientBuilder<T, WeightedBuilder<P, C, H, V, A>, R> {
        self.balancer(|b| b.static_weights(weights))
    }
}

/// The balancer's builder after [`ClientBuilder::static_weights`].
type WeightedBuilder<P, C, H, V, A> = balance::Builder<P, C, H, balance::WeightsOnly<V>, A>;

impl<T, B, R> ClientBuilder<T, B, R> {
    /// Anything else on the balancer: `f` gets the [`balance::Builder`] and
    /// returns the one to use.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_lb::client::HttpClient;
    ///
    /// let builder = HttpClient::builder()
    ///     .balancer(|b| b.startup_wait(Duration::from_secs(1)).seed(7));
    /// # let _ = builder;
    /// ```
    pub fn balancer<B2>(self, f: impl FnOnce(B) -> B2) -> ClientBuilder<T, B2, R> {
        ClientBuilder {
            target: self.target,
            balancer: f(self.balancer),
            calls: self.calls,
        }
    }
}

impl<T: fmt::Debug, B: fmt::Debug, R: fmt::Debug> fmt::Debug for ClientBuilder<T, B, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientBuilder")
            .field("target", &self.target)
            .field("balancer", &self.balancer)
            .field("calls", &self.calls)
            .finish()
    }
}

/// The balancer hints every ready-made client uses: retries and hedges go to
/// endpoints the call has not tried.
pub(crate) type Hints = CallHints;

impl<R> CallSettings<R> {
    /// The budget, when anything draws on it.
    pub(crate) fn budget(&self) -> Option<RetryBudget> {
        (self.retry.is_some() || self.hedge.is_some()).then(|| self.budget.clone())
    }

    /// The client: calls counted -> deadline -> replay -> retry -> hedge ->
    /// per-attempt timeout -> `inner` (over `balancer`), under the
    /// protocol's own outer layers.
    ///
    /// The parts that are off are left out of the type, not put in as
    /// `Either` or `Option` layers: an `Either`'s future is as large as its
    /// larger side, so an unused hedge layer made every call's future some
    /// 700 bytes larger, and every layer above moves that future once. Each
    /// combination is its own type (eight in all), which `protocol` boxes.
    pub(crate) fn wrap<S, Body, Resp, K, P>(
        self,
        inner: S,
        balancer: BalancerHandle<K>,
        protocol: P,
    ) -> Built<Body, Resp, K>
    where
        S: Service<::http::Request<ReplayBody<Body>>, Response = Resp>
            + Clone
            + Send
            + Sync
            + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
        Body: http_body::Body + Send + 'static,
        Body::Error: Into<BoxError>,
        ::http::Request<ReplayBody<Body>>: Replayable + Send + 'static,
        Resp: Send + 'static,
        R: RetryOn<Resp>,
        P: ProtocolLayers<::http::Request<Body>, Resp>,
    {
        let attempt_timeout = self.attempt_timeout;
        let stack = Stack {
            budget: self.budget(),
            settings: self,
            balancer,
            protocol,
            _types: PhantomData,
        };
        let inner =
            tower::util::MapErr::new(inner, Into::<BoxError>::into as fn(S::Error) -> BoxError);
        match attempt_timeout {
            Some(timeout) => stack.hedge(AttemptTimeoutLayer::new(timeout).layer(inner)),
            None => stack.hedge(inner),
        }
    }
}

/// [`CallSettings::wrap`] under way: each step adds its layer, if it is on,
/// and hands the stack to the next, so that every combination is a type of
/// its own.
struct Stack<Body, Resp, K, P, R> {
    /// The settings; each step takes its layer out of them.
    settings: CallSettings<R>,
    /// The budget, when anything draws on it (read before the steps take
    /// the retry and hedge layers out).
    budget: Option<RetryBudget>,
    balancer: BalancerHandle<K>,
    protocol: P,
    _types: PhantomData<fn(Body) -> Resp>,
}

/// What [`CallSettings::wrap`] builds.
type Built<Body, Resp, K> = BalancedClient<::http::Request<Body>, Resp, K>;

/// A stack of the client's layers so far, over requests with replayable
/// bodies.
trait Layered<Body, Resp>:
    Service<
        ::http::Request<ReplayBody<Body>>,
        Response = Resp,
        Error = BoxError,
        Future: Send + 'static,
    > + Clone
    + Send
    + Sync
    + 'static
{
}

impl<S, Body, Resp> Layered<Body, Resp> for S where
    S: Service<
            ::http::Request<ReplayBody<Body>>,
            Response = Resp,
            Error = BoxError,
            Future: Send + 'static,
        > + Clone
        + Send
        + Sync
        + 'static
{
}

impl<Body, Resp, K, P, R> Stack<Body, Resp, K, P, R>
where
    Body: http_body::Body + Send + 'static,
    Body::Error: Into<BoxError>,
    ::http::Request<ReplayBody<Body>>: Replayable + Send + 'static,
    Resp: Send + 'static,
    R: RetryOn<Resp>,
    P: ProtocolLayers<::http::Request<Body>, Resp>,
{
    fn hedge(mut self, inner: impl Layered<Body, Resp>) -> Built<Body, Resp, K> {
        // Hedges draw on the budget set last, whether `retry_budget` came
        // before or after `hedging`.
        match self.settings.hedge.take() {
            Some(hedge) => {
                let layer = hedge.budget(self.settings.budget.clone());
                self.retry(layer.layer(inner))
            }
            None => self.retry(inner),
        }
    }

    fn retry(mut self, inner: impl Layered<Body, Resp>) -> Built<Body, Resp, K> {
        match self.settings.retry.take() {
            Some(policy) => {
                let layer = RetryLayer::new(policy, self.settings.budget.clone());
                self.deadline(layer.layer(inner))
            }
            None => self.deadline(inner),
        }
    }

    fn deadline(self, inner: impl Layered<Body, Resp>) -> Built<Body, Resp, K> {
        let Stack {
            settings,
            budget,
            balancer,
            protocol,
            ..
        } = self;
        // Nothing repeats a request without retries or hedges, so nothing
        // needs keeping: a cap of 0 sends bodies straight through.
        let replay_cap = if budget.is_some() {
            settings.replay_cap
        } else {
            0
        };
        // Always there, so that a deadline the caller sets (a
        // `CallDeadline`, a gRPC `grpc-timeout`) holds even when the client
        // sets none of its own; a call with neither arms no timer.
        let deadline = settings
            .deadline
            .map_or(DeadlineLayer::callers_only(), DeadlineLayer::new);
        // With attempt timeouts every attempt ends by the deadline, and the
        // retry layer pauses no further than it (hedges start only while
        // an attempt runs): the deadline needs no timer of its own, and a
        // call arms one per attempt instead of two.
        let deadline = match settings.attempt_timeout {
            Some(_) => deadline.enforced_by_attempts(),
            None => deadline,
        };
        let calls = Calls::default();
        let stack = ServiceBuilder::new()
            .layer(calls.clone())
            .layer(deadline)
            .layer(ReplayLayer::new(replay_cap))
            .service(inner);
        let service = protocol.wrap(stack);
        BalancedClient::new(service, calls, balancer, budget)
    }
}

/// A ready-made client's own outer layers, put on the stack
/// [`CallSettings::wrap`] built, and the box that gives it a name.
pub(crate) trait ProtocolLayers<Req, Resp> {
    /// `stack` under the protocol's layers, boxed.
    fn wrap<S>(self, stack: S) -> BoxCloneSyncService<Req, Resp, BoxError>
    where
        S: Service<Req, Response = Resp, Error = BoxError> + Clone + Send + Sync + 'static,
        S::Future: Send + 'static;
}
