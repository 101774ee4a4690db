use std::fmt;
use std::hash::Hash;
use std::time::Duration;

use tower::discover::Discover;

use super::endpoint::Shared;
use super::Balancer;
use crate::error::BoxError;
use crate::load::RttEstimate;
use crate::strategy::{P2c, Strategy};

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
pub struct Builder<P = P2c> {
    strategy: P,
    startup_wait: Duration,
    rtt: RttEstimate,
    track_latency: bool,
    seed: Option<u64>,
}

impl Builder<P2c> {
    /// The defaults: [`P2c::peak_ewma`], a 5 s startup wait, and
    /// [`RttEstimate::DEFAULT`].
    pub fn new() -> Self {
        Self {
            strategy: P2c::peak_ewma(),
            startup_wait: Duration::from_secs(5),
            rtt: RttEstimate::DEFAULT,
            track_latency: false,
            seed: None,
        }
    }
}

impl Default for Builder<P2c> {
    fn default() -> Self {
        Self::new()
    }
}

impl<P: Strategy> Builder<P> {
    /// The balancing strategy.
    pub fn strategy<Q: Strategy>(self, strategy: Q) -> Builder<Q> {
        Builder {
            strategy,
            startup_wait: self.startup_wait,
            rtt: self.rtt,
            track_latency: self.track_latency,
            seed: self.seed,
        }
    }

    /// How long a request waits for the first endpoint when discovery has not
    /// produced any yet, before it fails with
    /// [`Error::NoEndpoints`](crate::Error::NoEndpoints). Default 5 s.
    pub fn startup_wait(mut self, wait: Duration) -> Self {
        self.startup_wait = wait;
        self
    }

    /// The per-endpoint latency estimate's default RTT and decay, used by
    /// [`P2c::peak_ewma`] and shown by
    /// [`Balancer::endpoints`](crate::Balancer::endpoints).
    pub fn rtt_estimate(mut self, rtt: RttEstimate) -> Self {
        self.rtt = rtt;
        self
    }

    /// Times every request and keeps each endpoint's latency estimate even
    /// when the strategy does not use it (round robin, least requests), so
    /// that [`Balancer::endpoints`](crate::Balancer::endpoints) shows it.
    /// Costs two clock reads per request. Strategies that use latency turn it
    /// on by themselves.
    pub fn track_latency(mut self, on: bool) -> Self {
        self.track_latency = on;
        self
    }

    /// Makes every random choice (P2C candidates, round-robin start) a
    /// function of `seed`, for repeatable simulations. Unseeded balancers use
    /// a faster thread-local generator; seeded ones share one atomic sequence.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// Builds the balancer over `discover` and spawns its driver task.
    ///
    /// # Panics
    ///
    /// When called outside a tokio runtime, like `tokio::spawn`.
    pub fn build<D>(self, discover: D) -> Balancer<D::Key, D::Service, P>
    where
        D: Discover + Send + 'static,
        D::Key: Hash + Eq + Clone + fmt::Debug + Send + Sync + 'static,
        D::Service: Send + Sync + 'static,
        D::Error: Into<BoxError>,
    {
        let track_latency = self.track_latency || self.strategy.uses_latency();
        let shared = Shared::new(self.rtt, self.seed, track_latency);
        super::spawn(discover, self.strategy, self.startup_wait, shared)
    }
}
