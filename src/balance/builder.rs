use std::fmt;
use std::hash::Hash;
use std::time::Duration;

use tower::discover::Discover;

use super::driver::EndpointSources;
use super::endpoint::Shared;
use super::tried::{CallHints, NoHints};
use super::{Balancer, Settings};
use crate::classify::ErrorsAsFailures;
use crate::error::BoxError;
use crate::health::HealthSettings;
use crate::health::{
    ActiveCheck, ConnectionStates, NoActiveCheck, NoConnectionStates, OutlierDetection, SlowStart,
};
use crate::load::{LatencyClock, RttEstimate};
use crate::setting::{self, InvalidSetting};
use crate::strategy::{P2c, Strategy};
use crate::topology::priority::DEFAULT_OVERPROVISIONING_PERCENT;
use crate::topology::{EndpointMetadata, ZoneAware};

/// Configures and builds a [`Balancer`].
///
/// ```
/// use std::time::Duration;
/// use tower_lb::{discover, load::RttEstimate, strategy::P2c, Balancer};
/// # use tower::service_fn;
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// # let svc = service_fn(|_: ()| async { Ok::<_, std::convert::Infallible>(()) });
/// let balancer = Balancer::builder()
///     .strategy(P2c::least_requests())
///     .startup_wait(Duration::from_secs(2))
///     .rtt_estimate(RttEstimate::new(Duration::from_millis(5), Duration::from_secs(10)))
///     .build(discover::fixed([("a", svc)]));
/// # let _ = balancer;
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Builder<
    P = P2c,
    C = ErrorsAsFailures,
    H = NoHints,
    W = NoStaticWeights,
    A = NoActiveCheck,
    N = NoConnectionStates,
> {
    strategy: P,
    classify: C,
    hints: H,
    weights: W,
    checks: A,
    connections: N,
    options: Options,
}

/// Where an endpoint's static weight comes from: its discovery key.
///
/// Implemented by [`NoStaticWeights`] (every endpoint weighs 1) and by any
/// `Fn(&K) -> f64`, so a key can carry its weight (a DNS SRV record's, a
/// config file's).
pub trait StaticWeights<K>: Send + 'static {
    /// The weight of the endpoint with `key`; one that is not finite and
    /// positive is refused (a `warn` event) and the endpoint weighs 1.
    fn weight(&self, key: &K) -> f64;
}

/// Every endpoint weighs 1: the default.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoStaticWeights;

impl<K> StaticWeights<K> for NoStaticWeights {
    fn weight(&self, _: &K) -> f64 {
        1.0
    }
}

impl<K, F: Fn(&K) -> f64 + Send + 'static> StaticWeights<K> for F {
    fn weight(&self, key: &K) -> f64 {
        self(key)
    }
}

/// Where an endpoint's [`EndpointMetadata`] comes from: its discovery key,
/// read once when discovery inserts it.
///
/// Implemented by [`NoStaticWeights`] (the defaults), [`WeightsOnly`]
/// (metadata with only the weight set: what [`Builder::static_weights`]
/// makes) and [`MetadataFn`] (what [`Builder::metadata`] makes of a
/// closure).
pub trait Describe<K>: Send + 'static {
    /// The metadata of the endpoint with `key`.
    fn describe(&self, key: &K) -> EndpointMetadata;
}

impl<K> Describe<K> for NoStaticWeights {
    fn describe(&self, _: &K) -> EndpointMetadata {
        EndpointMetadata::new()
    }
}

/// An endpoint's metadata with only its weight, from [`StaticWeights`]:
/// see [`Builder::static_weights`].
#[derive(Debug, Clone, Copy)]
pub struct WeightsOnly<V>(V);

impl<K, V: StaticWeights<K>> Describe<K> for WeightsOnly<V> {
    fn describe(&self, key: &K) -> EndpointMetadata {
        // Checked by the driver, which refuses a bad weight with a warning.
        EndpointMetadata::new().with_unchecked_weight(self.0.weight(key))
    }
}

/// An endpoint's metadata from a closure over its key: see
/// [`Builder::metadata`].
#[derive(Debug, Clone, Copy)]
pub struct MetadataFn<F>(F);

impl<K, F: Fn(&K) -> EndpointMetadata + Send + 'static> Describe<K> for MetadataFn<F> {
    fn describe(&self, key: &K) -> EndpointMetadata {
        (self.0)(key)
    }
}

/// Everything the builder sets that does not change its type, so that
/// `strategy` and `classify` carry it over in one move.
#[derive(Debug, Clone)]
struct Options {
    startup_wait: Duration,
    rtt: RttEstimate,
    track_latency: bool,
    latency_clock: LatencyClock,
    seed: Option<u64>,
    outlier_detection: Option<OutlierDetection>,
    panic_threshold: u32,
    overprovisioning_percent: u32,
    zone_aware: Option<ZoneAware>,
    slow_start: Option<SlowStart>,
}

impl Builder<P2c> {
    /// The defaults: [`P2c::peak_ewma`], a 5 s startup wait,
    /// [`RttEstimate::DEFAULT`], [`ErrorsAsFailures`], no outlier detection,
    /// and a 50 % panic threshold.
    pub fn new() -> Self {
        Self {
            strategy: P2c::peak_ewma(),
            classify: ErrorsAsFailures,
            hints: NoHints,
            weights: NoStaticWeights,
            checks: NoActiveCheck,
            connections: NoConnectionStates,
            options: Options {
                startup_wait: Duration::from_secs(5),
                rtt: RttEstimate::DEFAULT,
                track_latency: false,
                latency_clock: LatencyClock::CpuCounter,
                seed: None,
                outlier_detection: None,
                panic_threshold: 50,
                overprovisioning_percent: DEFAULT_OVERPROVISIONING_PERCENT,
                zone_aware: None,
                slow_start: None,
            },
        }
    }
}

impl Default for Builder<P2c> {
    fn default() -> Self {
        Self::new()
    }
}

impl<P: Strategy, C, H, W, A, N> Builder<P, C, H, W, A, N> {
    /// The balancing strategy.
    pub fn strategy<Q: Strategy>(self, strategy: Q) -> Builder<Q, C, H, W, A, N> {
        Builder {
            strategy,
            classify: self.classify,
            hints: self.hints,
            weights: self.weights,
            checks: self.checks,
            connections: self.connections,
            options: self.options,
        }
    }

    /// What counts as a failure of an endpoint (see [`crate::classify`]).
    /// Default [`ErrorsAsFailures`]; for HTTP use
    /// [`HttpClassify::server_errors`] or [`HttpClassify::grpc`] (feature
    /// `http`).
    ///
    #[cfg_attr(
        feature = "http",
        doc = "
[`HttpClassify::server_errors`]: crate::classify::HttpClassify::server_errors
[`HttpClassify::grpc`]: crate::classify::HttpClassify::grpc
"
    )]
    #[cfg_attr(
        not(feature = "http"),
        doc = "
[`HttpClassify::server_errors`]: crate#cargo-features
[`HttpClassify::grpc`]: crate#cargo-features
"
    )]
    pub fn classify<D>(self, classify: D) -> Builder<P, D, H, W, A, N> {
        Builder {
            strategy: self.strategy,
            classify,
            hints: self.hints,
            weights: self.weights,
            checks: self.checks,
            connections: self.connections,
            options: self.options,
        }
    }

    /// Gives each endpoint a static weight, read from its discovery key
    /// when it is inserted: [`WeightedRoundRobin`](crate::strategy::WeightedRoundRobin)
    /// follows these weights until load reports come in, and
    /// [`P2c`] draws candidates in proportion to them and compares their
    /// load per unit of weight (see [`P2c`]'s "Static weights"); either way
    /// each endpoint's share follows its weight, with one caller or many.
    /// Default: all 1.
    ///
    /// ```
    /// use std::net::SocketAddr;
    /// use tower_lb::{discover, strategy::WeightedRoundRobin, Balancer};
    /// # use tower::service_fn;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// # let svc = service_fn(|_: ()| async { Ok::<_, std::convert::Infallible>(()) });
    /// // The key carries the weight: (address, weight).
    /// let big: (SocketAddr, u32) = ("10.0.0.1:80".parse().unwrap(), 3);
    /// let small: (SocketAddr, u32) = ("10.0.0.2:80".parse().unwrap(), 1);
    /// let balancer = Balancer::builder()
    ///     .strategy(WeightedRoundRobin::new())
    ///     .static_weights(|&(_, weight): &(SocketAddr, u32)| f64::from(weight))
    ///     .build(discover::fixed([(big, svc.clone()), (small, svc)]));
    /// # let _ = balancer;
    /// # }
    /// ```
    pub fn static_weights<V>(self, weights: V) -> Builder<P, C, H, WeightsOnly<V>, A, N> {
        self.describe_with(WeightsOnly(weights))
    }

    /// The builder with `weights` describing the endpoints.
    fn describe_with<V>(self, weights: V) -> Builder<P, C, H, V, A, N> {
        Builder {
            strategy: self.strategy,
            classify: self.classify,
            hints: self.hints,
            weights,
            checks: self.checks,
            connections: self.connections,
            options: self.options,
        }
    }

    /// Reads each endpoint's [`EndpointMetadata`] (zone, region, priority,
    /// weight, labels, readiness) from its discovery key when it is
    /// inserted; replaces [`static_weights`](Self::static_weights) (the
    /// metadata's weight is the static weight). Strategies see it through
    /// [`Candidates::metadata`](crate::strategy::Candidates::metadata); the
    /// balancer routes by its [priority](crate::topology) and readiness.
    /// Discovery that re-inserts a key with new metadata (an endpoint now
    /// terminating, say) replaces its service, whose requests under way
    /// finish. Default: every endpoint has the defaults.
    ///
    /// ```
    /// use std::net::SocketAddr;
    /// use tower_lb::topology::EndpointMetadata;
    /// use tower_lb::{discover, Balancer};
    /// # use tower::service_fn;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// # let svc = service_fn(|_: ()| async { Ok::<_, std::convert::Infallible>(()) });
    /// // The key carries the endpoint's priority: (address, priority).
    /// let primary: (SocketAddr, u32) = ("10.0.0.1:80".parse().unwrap(), 0);
    /// let fallback: (SocketAddr, u32) = ("10.1.0.1:80".parse().unwrap(), 1);
    /// let balancer = Balancer::builder()
    ///     .metadata(|&(_, priority): &(SocketAddr, u32)| {
    ///         EndpointMetadata::new().with_priority(priority)
    ///     })
    ///     .build(discover::fixed([(primary, svc.clone()), (fallback, svc)]));
    /// # let _ = balancer;
    /// # }
    /// ```
    pub fn metadata<F>(self, describe: F) -> Builder<P, C, H, MetadataFn<F>, A, N> {
        self.describe_with(MetadataFn(describe))
    }

    /// Sends a retry or a hedge to an endpoint its call has not tried yet,
    /// while one in service is left: the balancer reads the
    /// [`TriedEndpoints`](crate::request::TriedEndpoints) that the
    /// [retry](crate::retry) and [hedge](crate::hedge) layers record in the
    /// call's [`CallContext`](crate::request::CallContext) (so requests must
    /// implement [`HasCallContext`](crate::request::HasCallContext), as
    /// `http::Request` does). Off by default, because a balancer over other
    /// request types has nothing to read. Costs each request one look-up of
    /// its context; no lock and no allocation.
    ///
    /// ```
    /// use tower_lb::Balancer;
    ///
    /// let builder = Balancer::builder().avoid_tried_endpoints();
    /// # let _ = builder;
    /// ```
    pub fn avoid_tried_endpoints(self) -> Builder<P, C, CallHints, W, A, N> {
        Builder {
            strategy: self.strategy,
            classify: self.classify,
            hints: CallHints,
            weights: self.weights,
            checks: self.checks,
            connections: self.connections,
            options: self.options,
        }
    }

    /// Ejects endpoints that fail (see [`crate::health`]). Default: off.
    ///
    /// ```
    /// use tower_lb::{classify::HttpClassify, health::OutlierDetection, Balancer};
    ///
    /// let builder = Balancer::builder()
    ///     .classify(HttpClassify::server_errors())
    ///     .outlier_detection(OutlierDetection::new());
    /// # let _ = builder;
    /// ```
    pub fn outlier_detection(mut self, detection: OutlierDetection) -> Self {
        self.options.outlier_detection = Some(detection);
        self
    }

    /// Keeps every endpoint in service whatever it answers: undoes
    /// [`outlier_detection`](Self::outlier_detection).
    pub fn no_outlier_detection(mut self) -> Self {
        self.options.outlier_detection = None;
        self
    }

    /// Checks every endpoint actively, besides what its traffic shows: an
    /// endpoint that fails its check, or has not passed its first one yet,
    /// is not picked (while the [panic threshold](Self::panic_threshold)
    /// allows), and outlier detection still applies to the rest. Each
    /// endpoint's check starts when discovery inserts it and stops when
    /// discovery removes it. Default: no active checks.
    ///
    /// [`HealthCheck`](crate::health::HealthCheck) has the built-in checks
    /// (a TCP connect, an HTTP GET, gRPC's `grpc.health.v1.Health/Watch`);
    /// any [`ActiveCheck`] will do.
    ///
    /// ```
    /// use std::{net::SocketAddr, time::Duration};
    /// use tower_lb::{discover, health::HealthCheck, Balancer};
    /// # use tower::service_fn;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), tower_lb::error::InvalidSetting> {
    /// # let svc = service_fn(|_: ()| async { Ok::<_, std::convert::Infallible>(()) });
    /// let addr: SocketAddr = "127.0.0.1:8080".parse().unwrap();
    /// let balancer = Balancer::builder()
    ///     .health_check(HealthCheck::tcp().interval(Duration::from_secs(2))?)
    ///     .build(discover::fixed([(addr, svc)]));
    /// # let _ = balancer;
    /// # Ok(())
    /// # }
    /// ```
    pub fn health_check<B>(self, checks: B) -> Builder<P, C, H, W, B, N> {
        Builder {
            strategy: self.strategy,
            classify: self.classify,
            hints: self.hints,
            weights: self.weights,
            checks,
            connections: self.connections,
            options: self.options,
        }
    }

    /// Reads each endpoint's [`ConnectionStatus`](crate::health::ConnectionStatus)
    /// from its service when discovery inserts it: while any endpoint in
    /// service has a connection that takes requests (ready, or idle), those
    /// whose connection is being made or failed to be made are not picked
    /// (see [`ConnectionState`](crate::health::ConnectionState)). Each change
    /// of state republishes the set, off the request path. Default: no
    /// endpoint reports one. The ready-made clients (`HttpClient` and
    /// `GrpcChannel`) set this for the connections they make themselves.
    /// See [`ConnectionStates`] for an example.
    pub fn connection_states<M>(self, connections: M) -> Builder<P, C, H, W, A, M> {
        Builder {
            strategy: self.strategy,
            classify: self.classify,
            hints: self.hints,
            weights: self.weights,
            checks: self.checks,
            connections,
            options: self.options,
        }
    }

    /// Ramps the share of new endpoints, and of endpoints back from an
    /// ejection, up over a window (see [`SlowStart`]). Default: off.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_lb::{health::SlowStart, Balancer};
    ///
    /// let builder = Balancer::builder().slow_start(SlowStart::new(Duration::from_secs(30)));
    /// # let _ = builder;
    /// ```
    pub fn slow_start(mut self, slow_start: SlowStart) -> Self {
        self.options.slow_start = Some(slow_start);
        self
    }

    /// No slow start: undoes [`slow_start`](Self::slow_start).
    pub fn no_slow_start(mut self) -> Self {
        self.options.slow_start = None;
        self
    }

    /// When fewer than this percentage of the endpoints are in service (not
    /// ejected), balance over all of them, as Envoy does. Default 50; 0 turns
    /// panic mode off.
    ///
    /// # Errors
    ///
    /// When `percent` is above 100.
    pub fn panic_threshold(mut self, percent: u32) -> Result<Self, InvalidSetting> {
        self.options.panic_threshold = setting::percent("Builder::panic_threshold", percent)?;
        Ok(self)
    }

    /// How much more than its share in service a [priority
    /// level](crate::topology) is taken to cover: a level takes
    /// `min(100 %, in service x factor)` of the traffic and the next level
    /// the rest. Default 1.4, as Envoy: a level 72 % in service keeps all
    /// of it. 1.0 moves traffic as soon as one endpoint of a level is out.
    ///
    /// # Errors
    ///
    /// When `factor` is below 1, above 100, or NaN.
    pub fn overprovisioning_factor(mut self, factor: f64) -> Result<Self, InvalidSetting> {
        let factor = setting::within(
            "Builder::overprovisioning_factor",
            factor,
            1.0,
            100.0,
            "a number from 1 to 100",
        )?;
        self.options.overprovisioning_percent = (factor * 100.0).round() as u32;
        Ok(self)
    }

    /// Routes by zone: requests stay in the client's own zone while it has
    /// the capacity for its share of the client fleet, and the rest spill
    /// to the zones with capacity to spare (see [`ZoneAware`]); endpoints
    /// give their zone through [`metadata`](Self::metadata). Default: off,
    /// every zone alike.
    ///
    /// ```
    /// use tower_lb::topology::ZoneAware;
    /// use tower_lb::Balancer;
    ///
    /// let builder = Balancer::builder().zone_aware(ZoneAware::new("eu-west-1a"));
    /// # let _ = builder;
    /// ```
    pub fn zone_aware(mut self, zones: ZoneAware) -> Self {
        self.options.zone_aware = Some(zones);
        self
    }

    /// How long a request waits for the first endpoint when discovery has not
    /// produced any yet, before it fails with
    /// [`Error::NoEndpoints`](crate::Error::NoEndpoints). Default 5 s.
    pub fn startup_wait(mut self, wait: Duration) -> Self {
        self.options.startup_wait = wait;
        self
    }

    /// The per-endpoint latency estimate's default RTT and decay, used by
    /// [`P2c::peak_ewma`] and shown by
    /// [`Balancer::endpoints`](crate::Balancer::endpoints).
    pub fn rtt_estimate(mut self, rtt: RttEstimate) -> Self {
        self.options.rtt = rtt;
        self
    }

    /// Times every request and keeps each endpoint's latency estimate even
    /// when the strategy does not use it (round robin, least requests), so
    /// that [`Balancer::endpoints`](crate::Balancer::endpoints) shows it.
    /// Costs two clock reads per request. Strategies that use latency turn it
    /// on by themselves.
    pub fn track_latency(mut self, on: bool) -> Self {
        self.options.track_latency = on;
        self
    }

    /// The clock that times requests for the latency estimates: the CPU's
    /// counter by default ([`LatencyClock::CpuCounter`], the cheapest to
    /// read), or tokio's ([`LatencyClock::Tokio`]) so that paused time
    /// applies to them in simulations and tests.
    ///
    /// ```
    /// use tower_lb::{load::LatencyClock, Balancer};
    /// let builder = Balancer::builder().latency_clock(LatencyClock::Tokio);
    /// # let _ = builder;
    /// ```
    pub fn latency_clock(mut self, clock: LatencyClock) -> Self {
        self.options.latency_clock = clock;
        self
    }

    /// Makes every random choice (P2C candidates, round-robin start) a
    /// function of `seed`, for repeatable simulations. Unseeded balancers use
    /// a faster thread-local generator; seeded ones share one atomic sequence.
    pub fn seed(mut self, seed: u64) -> Self {
        self.options.seed = Some(seed);
        self
    }

    /// Builds the balancer over `discover` and spawns its driver task.
    ///
    /// # Panics
    ///
    /// When called outside a tokio runtime, like `tokio::spawn`.
    pub fn build<D>(self, discover: D) -> Balancer<D::Key, D::Service, P, C, H>
    where
        D: Discover + Send + 'static,
        D::Key: Hash + Eq + Clone + fmt::Debug + Send + Sync + 'static,
        D::Service: Send + Sync + 'static,
        D::Error: Into<BoxError>,
        C: Send + Sync + 'static,
        H: Send + Sync + 'static,
        W: Describe<D::Key>,
        A: ActiveCheck<D::Key>,
        N: ConnectionStates<D::Service>,
    {
        let latency_detector = self
            .options
            .outlier_detection
            .as_ref()
            .is_some_and(|d| d.latency.is_some());
        let track_latency =
            self.options.track_latency || self.strategy.uses_latency() || latency_detector;
        let reads_clock = self.strategy.reads_clock();
        let shared = Shared::new(
            self.options.rtt,
            self.options.seed,
            (track_latency || reads_clock).then_some(self.options.latency_clock),
            track_latency,
            reads_clock,
            self.options.outlier_detection.as_ref(),
        );
        let settings = Settings {
            strategy: self.strategy,
            classify: self.classify,
            hints: self.hints,
            sources: EndpointSources {
                metadata: self.weights,
                checks: self.checks,
                connections: self.connections,
            },
            startup_wait: self.options.startup_wait,
            zone_aware: self.options.zone_aware,
            health: HealthSettings {
                outlier_detection: self.options.outlier_detection,
                panic_threshold: self.options.panic_threshold,
                overprovisioning_percent: self.options.overprovisioning_percent,
                slow_start: self.options.slow_start,
            },
        };
        super::spawn(discover, settings, shared)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_threshold_above_100_is_refused_by_name() {
        let error = Builder::new().panic_threshold(101).unwrap_err();
        assert_eq!(error.setting(), "Builder::panic_threshold");
        assert_eq!(error.value(), "101");
    }

    #[test]
    fn an_overprovisioning_factor_below_1_or_nan_is_refused_by_name() {
        for bad in [0.5, 100.5, f64::NAN, f64::INFINITY] {
            let error = Builder::new().overprovisioning_factor(bad).unwrap_err();
            assert_eq!(error.setting(), "Builder::overprovisioning_factor");
        }
        let fine = Builder::new().overprovisioning_factor(1.0);
        assert_eq!(
            fine.map(|b| b.options.overprovisioning_percent).ok(),
            Some(100)
        );
    }
}
