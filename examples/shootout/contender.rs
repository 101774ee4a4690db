//! The contenders: every tower-lb strategy, and tower's own p2c as the
//! baseline, each built over the same endpoints.

use std::time::Duration;

use http::StatusCode;
use rand::rngs::SmallRng;
use rand::{RngCore, SeedableRng};
use tower::balance::p2c::Balance;
use tower::buffer::Buffer;
use tower::discover::ServiceList;
use tower::load::{CompleteOnResponse, PeakEwmaDiscover};
use tower::util::{BoxCloneService, BoxCloneSyncService};
use tower::{BoxError, ServiceExt};
use tower_lb::strategy::{P2c, RoundRobin, Strategy};
use tower_lb::{discover, Balancer};

/// What the load generator sends.
pub type Request = http::Request<http_body_util::Empty<hyper::body::Bytes>>;
/// One endpoint, real (hyper client) or simulated, as every contender sees it.
pub type Endpoint = BoxCloneSyncService<Request, StatusCode, BoxError>;
/// A contender, ready to take requests.
pub type Client = BoxCloneService<Request, StatusCode, BoxError>;

/// The Peak-EWMA settings every latency-aware contender gets (Linkerd's).
const DEFAULT_RTT: Duration = Duration::from_millis(30);
const DECAY: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Contender {
    RoundRobin,
    P2cLeastRequests,
    P2cPeakEwma,
    TowerP2cPeakEwma,
}

impl Contender {
    pub const ALL: [Contender; 4] = [
        Contender::RoundRobin,
        Contender::P2cLeastRequests,
        Contender::P2cPeakEwma,
        Contender::TowerP2cPeakEwma,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Contender::RoundRobin => "round-robin",
            Contender::P2cLeastRequests => "p2c-least-requests",
            Contender::P2cPeakEwma => "p2c-peak-ewma",
            Contender::TowerP2cPeakEwma => "tower-p2c-peak-ewma",
        }
    }

    pub fn by_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.name() == name)
    }

    /// Builds the contender over `endpoints` (index = backend number). Must run
    /// inside the tokio runtime it will serve on.
    pub fn build(self, endpoints: Vec<Endpoint>, seed: u64) -> Client {
        match self {
            Contender::RoundRobin => tower_lb(RoundRobin::new(), endpoints, seed),
            Contender::P2cLeastRequests => tower_lb(P2c::least_requests(), endpoints, seed),
            Contender::P2cPeakEwma => tower_lb(P2c::peak_ewma(), endpoints, seed),
            Contender::TowerP2cPeakEwma => {
                let discover = PeakEwmaDiscover::new(
                    ServiceList::new(endpoints),
                    DEFAULT_RTT,
                    DECAY,
                    CompleteOnResponse::default(),
                );
                let balance = Balance::from_rng(discover, SeededRng(SmallRng::seed_from_u64(seed)));
                // `Balance` takes `&mut self`; a `Buffer` is how it is shared.
                BoxCloneService::new(Buffer::new(balance, 1024))
            }
        }
    }
}

fn tower_lb<P: Strategy>(strategy: P, endpoints: Vec<Endpoint>, seed: u64) -> Client {
    let balancer = Balancer::builder()
        .strategy(strategy)
        .rtt_estimate(tower_lb::load::RttEstimate::new(DEFAULT_RTT, DECAY))
        .seed(seed)
        .build(discover::fixed(endpoints.into_iter().enumerate()));
    BoxCloneService::new(balancer.map_err(BoxError::from))
}

/// tower's p2c takes its own `Rng` trait; this feeds it a seeded generator so
/// that simulated runs repeat.
struct SeededRng(SmallRng);

impl tower::util::rng::Rng for SeededRng {
    fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }
}
