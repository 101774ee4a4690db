//! The `fleet` scenario: many clients, each a balancer of its own, over
//! many backends, with and without subsetting (`discover::Subset`). Only
//! simulated: 200 clients would hold 20,000 connections on loopback.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use hdrhistogram::Histogram;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::task::JoinSet;
use tokio::time::{sleep_until, Instant};
use tower::{BoxError, ServiceExt};
use tower_lb::discover::{self, DiscoveryHandle, Subset};
use tower_lb::load::LatencyClock;

use crate::backend::{Backend, WINDOW};
use crate::contender::{Built, Contender, Discovery, Endpoint, Probe};
use crate::run::{paused_runtime, request, simulated, BoxErrors, Load, GIVE_UP};
use crate::scenario::{cluster_backend, CLUSTER_MEAN_MS, CLUSTER_SLOTS};

/// Clients, each with a balancer of its own.
pub const CLIENTS: usize = 200;
/// Backends at any time.
pub const BACKENDS: usize = 100;
/// Backends per client with subsetting.
pub const SUBSET: u32 = 10;
/// Backends replaced at the halfway point: the first ones go, as many new
/// ones come (10 %).
pub const REPLACED: usize = 10;

/// Half the backends' capacity (100 x 8 slots, 10 ms each): 40,000 req/s,
/// 200 per client.
pub fn rate() -> f64 {
    0.5 * (BACKENDS * CLUSTER_SLOTS) as f64 * 1000.0 / CLUSTER_MEAN_MS as f64
}

pub const ABOUT: &str = "200 clients x 100 backends (8 slots, exponential, mean 10 ms), 50 % load (40,000 req/s, 200 per client), each client a balancer of its own; 10 backends replaced by 10 new ones at the halfway point. Connections: clients holding each backend before the replacement; load: the busiest backend's requests over the mean, first half";

/// How long the fleet runs unless `--duration` says: long enough that a
/// backend's requests in the first half (about 2,000) vary by a few percent
/// only.
pub const DEFAULT_DURATION: Duration = Duration::from_secs(10);

/// How the clients of the fleet choose their backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subsetting {
    /// Every client over every backend.
    None,
    /// `Subset::aperture(i, 200, 10)`: Finagle's deterministic aperture.
    Aperture,
    /// `Subset::random(i, 10)`: gRPC's random subsetting (A68).
    Random,
}

impl Subsetting {
    /// Client `client`'s discovery: the backends through its subset.
    fn discovery(
        self,
        client: usize,
        stream: discover::ChannelDiscover<usize, Endpoint>,
    ) -> Discovery {
        let subset = match self {
            Subsetting::None => return Box::pin(BoxErrors(stream)),
            Subsetting::Aperture => Subset::aperture(client as u32, CLIENTS as u32, SUBSET),
            Subsetting::Random => Subset::random(client as u64, SUBSET),
        };
        let subset = subset.unwrap_or_else(|e| panic!("the fleet's subset: {e}"));
        Box::pin(BoxErrors(subset.discover(stream)))
    }
}

/// A row of the fleet's table: every client's strategy, and its subsetting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FleetContender {
    pub strategy: Contender,
    pub subsetting: Subsetting,
}

impl FleetContender {
    /// P2C by requests in flight (what Finagle's aperture balances with),
    /// then by Peak-EWMA, each over all backends and over the two subsets.
    pub const ALL: [FleetContender; 6] = {
        const fn row(strategy: Contender, subsetting: Subsetting) -> FleetContender {
            FleetContender {
                strategy,
                subsetting,
            }
        }
        [
            row(Contender::P2cLeastRequests, Subsetting::None),
            row(Contender::P2cLeastRequests, Subsetting::Aperture),
            row(Contender::P2cLeastRequests, Subsetting::Random),
            row(Contender::P2cPeakEwma, Subsetting::None),
            row(Contender::P2cPeakEwma, Subsetting::Aperture),
            row(Contender::P2cPeakEwma, Subsetting::Random),
        ]
    };

    pub fn name(self) -> String {
        let subset = match self.subsetting {
            Subsetting::None => ", all",
            Subsetting::Aperture => "+aperture",
            Subsetting::Random => "+random-subset",
        };
        format!("{}{subset}", self.strategy.name())
    }
}

/// What one way of choosing did for the fleet.
#[derive(Debug, Clone)]
pub struct FleetResult {
    pub contender: FleetContender,
    /// Per backend of the first half: how many clients held it just before
    /// the replacement (a balancer holds a connection, or a pool, per
    /// endpoint).
    pub connections: Vec<usize>,
    /// Per backend: requests received in the first half.
    pub first_half: Vec<u64>,
    pub latency_us: Histogram<u64>,
    pub ok: u64,
    pub failed: u64,
    /// Client-backend pairs that the replacement ended or began.
    pub moved: usize,
    /// Of those, the pairs that had to: with a backend that left or came.
    pub forced: usize,
}

impl FleetResult {
    pub fn total_connections(&self) -> usize {
        self.connections.iter().sum()
    }

    /// The busiest backend's requests over the mean, in the first half.
    pub fn max_over_mean_load(&self) -> f64 {
        let max = self.first_half.iter().copied().max().unwrap_or(0) as f64;
        let mean = self.first_half.iter().sum::<u64>() as f64 / self.first_half.len().max(1) as f64;
        max / mean.max(1.0)
    }

    pub fn latency_ms(&self, q: f64) -> f64 {
        self.latency_us.value_at_quantile(q) as f64 / 1000.0
    }

    pub fn success_rate(&self) -> f64 {
        self.ok as f64 / (self.ok + self.failed).max(1) as f64
    }
}

/// The keys each client's balancer holds.
fn held(probes: &[Probe]) -> Vec<BTreeSet<usize>> {
    probes
        .iter()
        .map(|probe| probe().into_iter().map(|e| e.key).collect())
        .collect()
}

/// Runs the fleet on simulated time: same seed, same numbers.
pub fn simulate(contender: FleetContender, load: Load) -> FleetResult {
    paused_runtime().block_on(async {
        let backends: Vec<Arc<Backend>> = (0..BACKENDS + REPLACED)
            .map(|i| {
                Backend::new(
                    cluster_backend(),
                    load.seed.wrapping_mul(31).wrapping_add(i as u64),
                )
            })
            .collect();
        let mut handles: Vec<DiscoveryHandle<usize, Endpoint>> = Vec::with_capacity(CLIENTS);
        let mut clients = Vec::with_capacity(CLIENTS);
        let mut probes = Vec::with_capacity(CLIENTS);
        for client in 0..CLIENTS {
            let (handle, stream) = discover::channel();
            for (key, backend) in backends.iter().enumerate().take(BACKENDS) {
                let _ = handle.insert(key, simulated(backend));
            }
            let seed = load.seed.wrapping_mul(1_000).wrapping_add(client as u64);
            let Built { client, probe } = contender.strategy.build(
                contender.subsetting.discovery(client, stream),
                seed,
                LatencyClock::Tokio,
                &backends,
            );
            handles.push(handle);
            clients.push(client);
            probes.extend(probe);
        }

        let mut rng = SmallRng::seed_from_u64(load.seed ^ 0xf1ee_7000);
        let start = Instant::now();
        let (half, end) = (start + load.duration / 2, start + load.duration);
        let mut next = start;
        let mut in_flight = JoinSet::new();
        let mut before = None;
        while next < end {
            let now = Instant::now();
            while next <= now && next < end {
                let intended = next;
                let client = clients[rng.random_range(0..CLIENTS)].clone();
                in_flight.spawn(async move {
                    let answer =
                        match tokio::time::timeout(GIVE_UP, client.oneshot(request(None))).await {
                            Ok(answer) => answer,
                            Err(elapsed) => Err(BoxError::from(elapsed)),
                        };
                    (
                        intended.elapsed(),
                        matches!(answer, Ok(s) if s.is_success()),
                    )
                });
                next += Duration::from_secs_f64(crate::backend::exponential(&mut rng) / load.rate);
            }
            if before.is_none() && now >= half {
                // The replacement: new backends in, then the old ones out.
                before = Some(held(&probes));
                for handle in &handles {
                    for (key, backend) in backends.iter().enumerate().skip(BACKENDS) {
                        let _ = handle.insert(key, simulated(backend));
                    }
                    for key in 0..REPLACED {
                        let _ = handle.remove(key);
                    }
                }
            }
            let wake = if before.is_none() {
                next.min(half)
            } else {
                next
            };
            sleep_until(wake.min(end)).await;
        }
        let mut latency_us = Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid bounds");
        let (mut ok, mut failed) = (0, 0);
        while let Some(done) = in_flight.join_next().await {
            match done {
                Ok((latency, true)) => {
                    ok += 1;
                    latency_us.saturating_record(latency.as_micros().max(1) as u64);
                }
                _ => failed += 1,
            }
        }
        let before = before.unwrap_or_else(|| held(&probes));
        let after = held(&probes);
        let mut connections = vec![0; BACKENDS];
        for set in &before {
            for &key in set {
                if let Some(n) = connections.get_mut(key) {
                    *n += 1;
                }
            }
        }
        let changed = |key: usize| !(REPLACED..BACKENDS).contains(&key);
        let (mut moved, mut forced) = (0, 0);
        for (b, a) in before.iter().zip(&after) {
            for &key in b.symmetric_difference(a) {
                moved += 1;
                forced += usize::from(changed(key));
            }
        }
        let half_windows = ((load.duration / 2).as_nanos() / WINDOW.as_nanos()) as usize;
        let first_half = backends
            .iter()
            .take(BACKENDS)
            .map(|b| b.timeline().iter().take(half_windows).sum())
            .collect();
        FleetResult {
            contender,
            connections,
            first_half,
            latency_us,
            ok,
            failed,
            moved,
            forced,
        }
    })
}

/// The fleet's table.
pub fn table(results: &[FleetResult]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "\n== fleet: {ABOUT}");
    let _ = writeln!(
        out,
        "{:<33} {:>12} {:>11} {:>14} {:>9} {:>9} {:>9}  churn: client-backend pairs the replacement ended or began",
        "contender", "connections", "per backend", "load max/mean", "p50", "p99", "success"
    );
    for r in results {
        // Against the same strategy over every backend.
        let all = results
            .iter()
            .find(|a| {
                a.contender.strategy == r.contender.strategy
                    && a.contender.subsetting == Subsetting::None
            })
            .map(FleetResult::total_connections);
        let total = r.total_connections();
        let cut = match all {
            Some(all) if r.contender.subsetting != Subsetting::None && all > 0 => {
                format!(" (-{:.0} %)", 100.0 * (1.0 - total as f64 / all as f64))
            }
            _ => String::new(),
        };
        let min = r.connections.iter().min().copied().unwrap_or(0);
        let max = r.connections.iter().max().copied().unwrap_or(0);
        let _ = writeln!(
            out,
            "{:<33} {:>12} {:>11} {:>14.2} {:>7.1}ms {:>7.1}ms {:>8.2}%  {} ({:.1} %; {} with a backend that left or came)",
            r.contender.name(),
            format!("{total}{cut}"),
            format!("{min} to {max}"),
            r.max_over_mean_load(),
            r.latency_ms(0.5),
            r.latency_ms(0.99),
            100.0 * r.success_rate(),
            r.moved,
            100.0 * r.moved as f64 / total.max(1) as f64,
            r.forced,
        );
    }
    out
}
