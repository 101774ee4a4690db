use super::{Candidates, PickContext, Ramp, Strategy};

/// Power of two choices: two distinct endpoints at random, the less loaded
/// one wins. Load is divided by each endpoint's static weight, if discovery
/// gave it one; a winner in [slow start](crate::health::SlowStart) keeps its
/// win with the probability of its factor.
///
/// Two load signals are available:
/// - [`P2c::least_requests`]: requests in flight;
/// - [`P2c::peak_ewma`]: Peak-EWMA latency x (in flight + 1), as in Finagle,
///   Linkerd and `tower::load::PeakEwma`. The estimate's default RTT and decay
///   are set on the balancer's builder
///   ([`Builder::rtt_estimate`](crate::balance::Builder::rtt_estimate)),
///   because every strategy and [`Balancer::endpoints`](crate::Balancer::endpoints)
///   share it.
///
/// ```
/// use tower_lb::strategy::P2c;
/// let by_latency = P2c::peak_ewma();
/// let by_requests = P2c::least_requests();
/// # let _ = (by_latency, by_requests);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct P2c {
    cost: Cost,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cost {
    InFlight,
    PeakEwma,
}

impl P2c {
    /// Compare candidates by requests in flight.
    pub fn least_requests() -> Self {
        Self {
            cost: Cost::InFlight,
        }
    }

    /// Compare candidates by Peak-EWMA latency x (in flight + 1).
    pub fn peak_ewma() -> Self {
        Self {
            cost: Cost::PeakEwma,
        }
    }

    /// The candidate's load, and its [static
    /// weight](crate::load::EndpointLoad::static_weight). Least-requests
    /// counts the request about to be sent, as Envoy's weighted least-request
    /// does, so that weights tell idle endpoints apart too.
    fn cost<C: Candidates + ?Sized>(
        &self,
        candidates: &C,
        i: usize,
        ctx: &PickContext<'_>,
    ) -> (f64, f64) {
        let load = candidates.load(i);
        let cost = match self.cost {
            Cost::InFlight => (load.in_flight() + 1) as f64,
            Cost::PeakEwma => load.peak_ewma_cost(ctx),
        };
        (cost, load.static_weight())
    }

    /// Whether `b` is less loaded than `a` per unit of weight: an endpoint
    /// of weight 2 looks half as loaded. Cross-multiplied rather than
    /// divided: a division is most of a pick's cost.
    fn prefers_b<C: Candidates + ?Sized>(
        &self,
        candidates: &C,
        a: usize,
        b: usize,
        ctx: &PickContext<'_>,
    ) -> bool {
        let (cost_a, weight_a) = self.cost(candidates, a, ctx);
        let (cost_b, weight_b) = self.cost(candidates, b, ctx);
        cost_b * weight_a < cost_a * weight_b
    }
}

impl Default for P2c {
    /// [`P2c::peak_ewma`].
    fn default() -> Self {
        Self::peak_ewma()
    }
}

/// What P2C precomputes: whether any endpoint is in slow start.
#[derive(Debug, Clone, Copy)]
pub struct P2cSchedule {
    ramping: bool,
}

impl Strategy for P2c {
    type Schedule = P2cSchedule;

    fn schedule<C: Candidates + ?Sized>(&self, candidates: &C, _: &PickContext<'_>) -> P2cSchedule {
        P2cSchedule {
            ramping: Ramp::of(candidates).is_some(),
        }
    }

    fn uses_latency(&self) -> bool {
        self.cost == Cost::PeakEwma
    }

    fn pick<C: Candidates + ?Sized>(
        &self,
        schedule: &P2cSchedule,
        candidates: &C,
        ctx: &PickContext<'_>,
    ) -> Option<usize> {
        match candidates.len() {
            0 => None,
            1 => Some(0),
            n => {
                let (a, b) = ctx.random_pair(n);
                let (winner, loser) = if self.prefers_b(candidates, a, b, ctx) {
                    (b, a)
                } else {
                    (a, b)
                };
                if !schedule.ramping {
                    return Some(winner);
                }
                // A winner further behind in slow start than the loser keeps
                // its win only with the ratio of their factors, so its share
                // ramps whatever the load (a cost penalty alone would give it
                // nothing while every endpoint is idle), and two endpoints
                // that ramp together compare by load alone.
                let won = candidates.load(winner).slow_start_factor();
                let lost = candidates.load(loser).slow_start_factor();
                if won >= lost || ctx.chance(won / lost) {
                    Some(winner)
                } else {
                    Some(loser)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::RttEstimate;
    use crate::strategy::test_support::loads;

    #[test]
    fn never_picks_the_more_loaded_of_two_candidates() {
        let rtt = RttEstimate::DEFAULT;
        let ctx = PickContext::new(0, &rtt);
        let endpoints = loads(2);
        endpoints[0].set_in_flight(3);
        for p2c in [P2c::least_requests(), P2c::peak_ewma()] {
            for _ in 0..1_000 {
                assert_eq!(
                    p2c.pick(&p2c.schedule(&endpoints[..], &ctx), &endpoints[..], &ctx),
                    Some(1)
                );
            }
        }
    }

    #[test]
    fn never_picks_the_most_loaded_endpoint() {
        // With n endpoints, the unique maximum loses every pair it is part of.
        let rtt = RttEstimate::DEFAULT;
        let ctx = PickContext::new(0, &rtt);
        let endpoints = loads(10);
        for (i, e) in endpoints.iter().enumerate() {
            e.set_in_flight(i % 4);
        }
        endpoints[6].set_in_flight(9);
        for p2c in [P2c::least_requests(), P2c::peak_ewma()] {
            for _ in 0..10_000 {
                assert_ne!(
                    p2c.pick(&p2c.schedule(&endpoints[..], &ctx), &endpoints[..], &ctx),
                    Some(6)
                );
            }
        }
    }

    #[test]
    fn spread_is_even_under_equal_load() {
        let rtt = RttEstimate::DEFAULT;
        let ctx = PickContext::new(0, &rtt);
        let n = 10;
        let picks = 200_000;
        let endpoints = loads(n);
        let mut counts = vec![0f64; n];
        let p2c = P2c::least_requests();
        for _ in 0..picks {
            counts[p2c
                .pick(&p2c.schedule(&endpoints[..], &ctx), &endpoints[..], &ctx)
                .unwrap()] += 1.0;
        }
        // Ties go to the first candidate, which is uniform: chi-square with 9
        // degrees of freedom stays below 27.9 with probability 0.999.
        let expected = picks as f64 / n as f64;
        let chi2: f64 = counts
            .iter()
            .map(|c| (c - expected).powi(2) / expected)
            .sum();
        assert!(chi2 < 27.9, "chi2 = {chi2}, counts = {counts:?}");
    }

    #[test]
    fn single_endpoint_is_always_picked_and_empty_set_never() {
        let rtt = RttEstimate::DEFAULT;
        let ctx = PickContext::new(0, &rtt);
        assert_eq!(
            P2c::peak_ewma().pick(&P2cSchedule { ramping: false }, &loads(1)[..], &ctx),
            Some(0)
        );
        assert_eq!(
            P2c::peak_ewma().pick(&P2cSchedule { ramping: false }, &loads(0)[..], &ctx),
            None
        );
    }

    #[test]
    fn an_endpoint_of_twice_the_weight_takes_twice_the_load_before_losing() {
        let rtt = RttEstimate::DEFAULT;
        let ctx = PickContext::new(0, &rtt);
        let endpoints = loads(2);
        assert!(endpoints[1].set_static_weight(2.0));
        // (2 + 1) / 2 = 1.5 beats (1 + 1) / 1 = 2: the heavier one still wins.
        endpoints[0].set_in_flight(1);
        endpoints[1].set_in_flight(2);
        assert_eq!(
            P2c::least_requests().pick(&P2cSchedule { ramping: false }, &endpoints[..], &ctx),
            Some(1)
        );
        // (4 + 1) / 2 = 2.5 loses to 2.
        endpoints[1].set_in_flight(4);
        assert_eq!(
            P2c::least_requests().pick(&P2cSchedule { ramping: false }, &endpoints[..], &ctx),
            Some(0)
        );
    }

    #[test]
    fn a_weight_that_is_not_finite_and_positive_is_refused() {
        let endpoints = loads(1);
        for bad in [f64::NAN, f64::INFINITY, 0.0, -1.0] {
            assert!(!endpoints[0].set_static_weight(bad));
        }
        assert_eq!(endpoints[0].static_weight(), 1.0);
    }

    #[test]
    fn two_endpoints_ramping_together_compare_by_load_alone() {
        let rtt = RttEstimate::DEFAULT;
        let ctx = PickContext::new(0, &rtt);
        let endpoints = loads(2);
        for load in &endpoints {
            load.set_slow_start_factor(0.1);
        }
        endpoints[0].set_in_flight(3);
        let p2c = P2c::least_requests();
        let schedule = p2c.schedule(&endpoints[..], &ctx);
        for _ in 0..1_000 {
            assert_eq!(p2c.pick(&schedule, &endpoints[..], &ctx), Some(1));
        }
    }
}
