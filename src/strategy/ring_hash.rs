//! Consistent hashing with bounded loads: requests of one hash key go to
//! the same endpoint while it is in service and not overloaded.

use std::fmt;

use super::{Candidates, P2c, P2cSchedule, PickContext, Strategy};
use crate::setting::{self, InvalidSetting};

/// Consistent hashing on a ring, with the bounded-loads rule of Mirrokni,
/// Thorup and Zadimoghaddam ("Consistent Hashing with Bounded Loads",
/// 2018): the requests of one [hash key](crate::request::HashKeyLayer) go
/// to the same endpoint, so that its cache stays warm, while no endpoint
/// takes more than `balance_factor` times its share of the requests in
/// flight.
///
/// - **The ring**: each endpoint is put at 160 points of a ring of 64-bit
///   hashes per mean weight (Ketama's number, which pingora keeps),
///   by the xxHash64 of its [identity](Candidates::identity) (the
///   discovery key's hash) and the point's number. A key goes to the first
///   point at or after its hash. With equal weights an endpoint's points
///   do not depend on the others, so when one comes or goes only the keys
///   on its arcs move
///   (gRPC's `ring_hash` and Envoy size the ring to the set, and move a
///   share of every endpoint's keys as well). A ring rather than Maglev's
///   table for the same reason: Maglev moves a few more keys than those of
///   the endpoint that changed. A pick is a binary search.
/// - **Bounded loads**: walking on from the key's point, the first
///   endpoint whose requests in flight, this one included, stay within
///   `balance_factor` x its weight's share of all requests in flight
///   (rounded up) takes the request. 1.25 by default, the paper's and
///   Envoy's `hash_balance_factor` example; [`unbounded`](Self::unbounded)
///   turns the rule off. A keyed pick whose endpoint has requests in
///   flight sums the loads in flight of every candidate (the bound needs
///   the total; no allocation): about 60 ns over 100 endpoints and 0.6 µs
///   over 1,000, where an idle endpoint, or no bound, costs 15 - 30 ns.
/// - **Health**: the ring is built from the endpoints in service, so an
///   ejected, failing or removed endpoint's keys move to the next
///   endpoints on the ring, and come back when it does.
/// - **Retries and hedges** of a key go to the next endpoints on the ring,
///   one further for each attempt before ([`PickContext::attempt`]), in
///   the same order in every client.
/// - **No key**: a request without a hash key goes where P2C by requests
///   in flight sends it.
/// - **What moves keys**: an endpoint leaving the candidates: removed,
///   ejected, failing its check, not serving, or (with connection states)
///   connecting or failed while another endpoint's connection is ready.
///   Slow start does not hold a returning endpoint's keys back: it gets
///   them all at once. With priority levels or zones, a key stays in one
///   level and one zone (the balancer draws them from the key) while their
///   shares do not change.
///
/// The balancer reads requests' keys with
/// [`CallHints`](crate::balance::CallHints), which
/// [`Builder::avoid_tried_endpoints`](crate::balance::Builder::avoid_tried_endpoints)
/// (on in the ready-made clients) turns on.
///
/// ```
/// use tower_lb::strategy::RingHash;
/// use tower_lb::Balancer;
///
/// let builder = Balancer::builder()
///     .strategy(RingHash::new().balance_factor(1.5)?)
///     .avoid_tried_endpoints(); // reads each request's hash key
/// # let _ = builder;
/// # Ok::<_, tower_lb::error::InvalidSetting>(())
/// ```
#[derive(Clone)]
pub struct RingHash {
    points_per_weight: u32,
    balance_factor: Option<f64>,
    fallback: P2c,
}

impl fmt::Debug for RingHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RingHash")
            .field("points_per_weight", &self.points_per_weight)
            .field("balance_factor", &self.balance_factor)
            .finish()
    }
}

/// Ketama's points per server, which pingora keeps.
const DEFAULT_POINTS_PER_WEIGHT: u32 = 160;
/// gRPC's cap on the ring (A42): a large set with large weights is scaled
/// down to it, at the cost of moving more keys on a change.
const MAX_RING_SIZE: usize = 8 * 1024 * 1024;

impl Default for RingHash {
    fn default() -> Self {
        Self::new()
    }
}

impl RingHash {
    /// 160 points per unit of weight, loads bounded at 1.25 x the mean.
    pub fn new() -> Self {
        Self {
            points_per_weight: DEFAULT_POINTS_PER_WEIGHT,
            balance_factor: Some(1.25),
            fallback: P2c::least_requests(),
        }
    }

    /// How far above its share of the requests in flight an endpoint may
    /// go before its keys walk on to the next endpoints (default 1.25).
    ///
    /// A request that walks on is likely a cache miss where it lands: a
    /// larger factor keeps more keys at home and lets a busy endpoint take
    /// more. With a few requests in flight per endpoint the default is
    /// reached by chance alone; the shootout's `cache` scenario (about 4
    /// per endpoint) keeps 0.89x the unbounded ring's hits at 1.25 and
    /// 0.93x at 1.5 (the busiest endpoint 1.09 and 1.13x the mean).
    ///
    /// # Errors
    ///
    /// When `factor` is not a finite number of at least 1.
    pub fn balance_factor(mut self, factor: f64) -> Result<Self, InvalidSetting> {
        self.balance_factor = Some(setting::finite_at_least(
            "RingHash::balance_factor",
            factor,
            1.0,
            "a finite number, 1 or more",
        )?);
        Ok(self)
    }

    /// Plain consistent hashing: a key's endpoint takes its requests
    /// however many it has in flight.
    pub fn unbounded(mut self) -> Self {
        self.balance_factor = None;
        self
    }

    /// Points on the ring per unit of an endpoint's weight (default 160):
    /// more spread the keys more evenly (an endpoint's share of them varies
    /// by about 1 / sqrt(points)), and cost memory (16 bytes a point, for
    /// each set of endpoints) and a step more in each pick's search.
    ///
    /// # Errors
    ///
    /// When `points` is 0 or above 65,536.
    pub fn points_per_weight(mut self, points: u32) -> Result<Self, InvalidSetting> {
        self.points_per_weight = setting::check(
            "RingHash::points_per_weight",
            points,
            (1..=65_536).contains(&points),
            "from 1 to 65,536",
        )?;
        Ok(self)
    }
}

/// One point of the ring: its hash and the endpoint there.
#[derive(Debug, Clone, Copy)]
struct Point {
    hash: u64,
    index: u32,
}

/// The ring for one set of endpoints, each endpoint's share of the weight,
/// and the fallback's schedule.
pub struct RingHashSchedule {
    points: Box<[Point]>,
    shares: Box<[f64]>,
    fallback: P2cSchedule,
}

impl fmt::Debug for RingHashSchedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RingHashSchedule")
            .field("points", &self.points.len())
            .finish_non_exhaustive()
    }
}

/// The hash of point `n` of the endpoint `identity`.
fn point_hash(identity: u64, n: u64) -> u64 {
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&identity.to_le_bytes());
    bytes[8..].copy_from_slice(&n.to_le_bytes());
    crate::request::hash_key_of(&bytes)
}

/// The points of a ring: `per_weight` x each endpoint's weight over the
/// mean weight (at least one), numbered from 0 for each endpoint, so that
/// with equal weights an endpoint's points are the same whatever the other
/// endpoints are. Over the mean, so that weights in large units (DNS SRV
/// weights go to 65,535) do not make a huge ring; a ring that would still
/// exceed `MAX_RING_SIZE` is scaled down to it.
fn ring(identities: &[u64], weights: &[f64], per_weight: u32) -> Vec<Point> {
    let mean = weights.iter().sum::<f64>() / weights.len().max(1) as f64;
    let per_unit = f64::from(per_weight) / mean;
    let wanted: f64 = weights.iter().map(|w| w * per_unit).sum();
    let scale = (MAX_RING_SIZE as f64 / wanted).min(1.0);
    let counts: Vec<u64> = weights
        .iter()
        .map(|w| ((w * per_unit * scale).round() as u64).max(1))
        .collect();
    let mut points = Vec::with_capacity(counts.iter().sum::<u64>() as usize);
    for (index, (&identity, &count)) in identities.iter().zip(&counts).enumerate() {
        points.extend((0..count).map(|n| Point {
            hash: point_hash(identity, n),
            index: index as u32,
        }));
    }
    points.sort_unstable_by_key(|p| p.hash);
    points
}

impl Strategy for RingHash {
    type Schedule = RingHashSchedule;

    fn schedule<C: Candidates + ?Sized>(
        &self,
        candidates: &C,
        ctx: &PickContext<'_>,
    ) -> RingHashSchedule {
        let n = candidates.len().min(u32::MAX as usize);
        let weights: Vec<f64> = (0..n).map(|i| candidates.load(i).static_weight()).collect();
        let total: f64 = weights.iter().sum();
        let shares: Box<[f64]> = weights.iter().map(|w| w / total).collect();
        let identities: Vec<u64> = (0..n).map(|i| candidates.identity(i)).collect();
        let points = match n {
            0 => Vec::new(),
            _ => ring(&identities, &weights, self.points_per_weight),
        };
        RingHashSchedule {
            points: points.into_boxed_slice(),
            shares,
            fallback: self.fallback.schedule(candidates, ctx),
        }
    }

    fn uses_latency(&self) -> bool {
        self.fallback.uses_latency()
    }

    fn reads_clock(&self) -> bool {
        self.fallback.reads_clock()
    }

    fn pick<C: Candidates + ?Sized>(
        &self,
        schedule: &RingHashSchedule,
        candidates: &C,
        ctx: &PickContext<'_>,
    ) -> Option<usize> {
        let (Some(key), false) = (ctx.hash_key(), schedule.points.is_empty()) else {
            return self.fallback.pick(&schedule.fallback, candidates, ctx);
        };
        let points = &schedule.points;
        // The first point at or after the key, round the ring; a retry (or
        // a hedge) starts at the next endpoint on the ring for each attempt
        // before it, rather than going back to the one that had the call.
        let at_key = points.partition_point(|p| p.hash < key) % points.len();
        let start = skip_endpoints(points, at_key, ctx.attempt());
        let first = points[start].index as usize;
        let Some(factor) = self.balance_factor else {
            return Some(first);
        };
        let in_flight = |i: usize| candidates.load(i).in_flight();
        // An idle endpoint is within any bound (at least 1): no need for
        // the total, whose sum reads every candidate's load.
        if in_flight(first) == 0 {
            return Some(first);
        }
        let total = (0..candidates.len()).map(in_flight).sum::<usize>() + 1;
        let fits = |i: usize| {
            let share = schedule.shares.get(i).copied().unwrap_or(0.0);
            let bound = (factor * total as f64 * share).ceil();
            (in_flight(i) + 1) as f64 <= bound
        };
        // At most a ring's turn; loads that move while they are read may
        // leave none fitting, and then the key's endpoint takes it.
        (0..points.len())
            .map(|step| points[(start + step) % points.len()].index as usize)
            .find(|&i| i < candidates.len() && fits(i))
            .or(Some(first))
    }
}

/// The position where the `n`-th endpoint after the one at `from` is
/// first met along the ring, counting distinct endpoints (the first 8 are
/// remembered, on the stack: a call makes a handful of attempts). Stops
/// after a turn of the ring.
fn skip_endpoints(points: &[Point], from: usize, n: u32) -> usize {
    const REMEMBERED: usize = 8;
    let mut seen = [points[from].index; REMEMBERED];
    let (mut distinct, mut at) = (1usize, from);
    for _ in 0..points.len() {
        if distinct > n as usize {
            break;
        }
        at = (at + 1) % points.len();
        let index = points[at].index;
        if !seen[..distinct.min(REMEMBERED)].contains(&index) {
            if distinct < REMEMBERED {
                seen[distinct] = index;
            }
            distinct += 1;
        }
    }
    at
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::{EndpointLoad, RttEstimate};
    use crate::request::hash_key_of;
    use std::collections::HashMap;

    /// Candidates with identities of their own (the default identity is
    /// the index, which moves when the set changes).
    struct Named<'a> {
        loads: &'a [EndpointLoad],
        names: &'a [u64],
    }

    impl Candidates for Named<'_> {
        fn len(&self) -> usize {
            self.names.len()
        }
        fn load(&self, index: usize) -> &EndpointLoad {
            &self.loads[index]
        }
        fn identity(&self, index: usize) -> u64 {
            self.names[index]
        }
    }

    fn loads(n: usize) -> Vec<EndpointLoad> {
        (0..n)
            .map(|_| EndpointLoad::new(0, &RttEstimate::DEFAULT))
            .collect()
    }

    /// Where each of `keys` goes, by endpoint name.
    fn placement(
        strategy: &RingHash,
        names: &[u64],
        loads: &[EndpointLoad],
        keys: u64,
    ) -> Vec<u64> {
        let candidates = Named { loads, names };
        let rtt = RttEstimate::DEFAULT;
        let schedule = strategy.schedule(&candidates, &PickContext::new(0, &rtt));
        (0..keys)
            .map(|k| {
                let ctx =
                    PickContext::new(0, &rtt).with_hash_key(Some(hash_key_of(&k.to_le_bytes())));
                let i = strategy.pick(&schedule, &candidates, &ctx).expect("a pick");
                names[i]
            })
            .collect()
    }

    #[test]
    fn a_key_goes_to_the_same_endpoint_every_time() {
        let names: Vec<u64> = (1..=5).collect();
        let loads = loads(5);
        let first = placement(&RingHash::new(), &names, &loads, 1000);
        assert_eq!(first, placement(&RingHash::new(), &names, &loads, 1000));
    }

    #[test]
    fn keys_spread_over_the_endpoints_by_weight() {
        let names: Vec<u64> = (1..=4).collect();
        let loads = loads(4);
        assert!(loads[3].set_static_weight(2.0));
        // 640 points per mean weight, so that the shares (an endpoint's
        // arcs vary by about 1 / sqrt(points)) show the weights.
        let ring = RingHash::new()
            .points_per_weight(640)
            .expect("a setting")
            .unbounded();
        let placed = placement(&ring, &names, &loads, 20_000);
        let mut counts: HashMap<u64, usize> = HashMap::new();
        for name in placed {
            *counts.entry(name).or_default() += 1;
        }
        // Shares 1/5, 1/5, 1/5, 2/5: 4,000 and 8,000 keys, within 15 %.
        for name in 1..=3 {
            let got = counts[&name] as f64;
            assert!((3_400.0..=4_600.0).contains(&got), "{counts:?}");
        }
        let heavy = counts[&4] as f64;
        assert!((6_800.0..=9_200.0).contains(&heavy), "{counts:?}");
    }

    #[test]
    fn an_endpoint_leaving_moves_only_its_own_keys() {
        let names: Vec<u64> = (1..=10).collect();
        let before = placement(&RingHash::new().unbounded(), &names, &loads(10), 10_000);
        let without: Vec<u64> = names.iter().copied().filter(|&n| n != 4).collect();
        let after = placement(&RingHash::new().unbounded(), &without, &loads(9), 10_000);
        let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count();
        let on_it = before.iter().filter(|&&n| n == 4).count();
        // Exactly the keys that were on it move: minimal remapping.
        assert_eq!(moved, on_it);
        assert!(before.iter().zip(&after).all(|(b, a)| b == a || *b == 4));
    }

    #[test]
    fn a_loaded_endpoint_passes_its_keys_on_within_the_bound() {
        let names: Vec<u64> = (1..=4).collect();
        let loads = loads(4);
        let key_of_first =
            |loads: &[EndpointLoad]| placement(&RingHash::new(), &names, loads, 1)[0];
        let home = key_of_first(&loads);
        let home_index = names.iter().position(|&n| n == home).expect("home");
        // 10 in flight on the key's endpoint, none elsewhere: 11 in all,
        // its bound 1.25 x 11 / 4 = 3.4 (4 with this request): it is over.
        for _ in 0..10 {
            loads[home_index].start();
        }
        assert_ne!(key_of_first(&loads), home);
        // Unbounded, it stays.
        assert_eq!(
            placement(&RingHash::new().unbounded(), &names, &loads, 1)[0],
            home
        );
    }

    #[test]
    fn a_retry_of_a_key_goes_to_the_next_endpoint_on_the_ring() {
        let names: Vec<u64> = (1..=5).collect();
        let loads = loads(5);
        let candidates = Named {
            loads: &loads,
            names: &names,
        };
        let rtt = RttEstimate::DEFAULT;
        let strategy = RingHash::new();
        let schedule = strategy.schedule(&candidates, &PickContext::new(0, &rtt));
        let key = Some(hash_key_of(b"user-42"));
        let pick = |attempt| {
            let ctx = PickContext::new(0, &rtt)
                .with_hash_key(key)
                .retry(attempt > 0)
                .with_attempt(attempt);
            strategy.pick(&schedule, &candidates, &ctx).expect("a pick")
        };
        let (first, second, third) = (pick(0), pick(1), pick(2));
        assert_ne!(first, second);
        assert_ne!(second, third);
        assert_ne!(third, first, "a walk that doubles back");
        // The same order every time (in every client).
        assert_eq!((pick(0), pick(1), pick(2)), (first, second, third));
    }

    #[test]
    fn weights_in_large_units_make_no_larger_ring() {
        let names: Vec<u64> = (1..=3).collect();
        let loads = loads(3);
        for load in &loads {
            assert!(load.set_static_weight(65_535.0));
        }
        let candidates = Named {
            loads: &loads,
            names: &names,
        };
        let rtt = RttEstimate::DEFAULT;
        let schedule = RingHash::new().schedule(&candidates, &PickContext::new(0, &rtt));
        assert_eq!(schedule.points.len(), 3 * 160);
    }

    #[test]
    fn a_request_without_a_key_goes_where_p2c_sends_it() {
        let names: Vec<u64> = (1..=2).collect();
        let loads = loads(2);
        for _ in 0..5 {
            loads[0].start();
        }
        let candidates = Named {
            loads: &loads,
            names: &names,
        };
        let rtt = RttEstimate::DEFAULT;
        let strategy = RingHash::new();
        let schedule = strategy.schedule(&candidates, &PickContext::new(0, &rtt));
        for _ in 0..20 {
            let pick = strategy.pick(&schedule, &candidates, &PickContext::new(0, &rtt));
            assert_eq!(pick, Some(1), "the idle one, as P2C picks between two");
        }
    }

    #[test]
    fn bad_settings_are_refused_by_name() {
        for bad in [0.5, f64::NAN, f64::INFINITY] {
            let error = RingHash::new().balance_factor(bad).expect_err("refused");
            assert_eq!(error.setting(), "RingHash::balance_factor");
        }
        let error = RingHash::new().points_per_weight(0).expect_err("refused");
        assert_eq!(error.setting(), "RingHash::points_per_weight");
    }
}
