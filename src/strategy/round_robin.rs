use std::sync::atomic::{AtomicUsize, Ordering};

use crossbeam_utils::CachePadded;

use super::{Candidates, PickContext, Ramp, Strategy, MAX_PASSES};

/// Round robin: endpoints in turn, from one shared atomic counter.
///
/// Each new set of endpoints starts at a random position, so that many clients
/// started together do not all hit the first endpoint first. Between changes
/// of the set, every full cycle gives each endpoint exactly one request
/// (an endpoint in [slow start](crate::health::SlowStart) takes its turn only
/// with the probability of its factor).
///
/// A retry or a hedge ([`PickContext::is_retry`]) takes no turn: it goes to
/// an endpoint at random (the balancer then steers it off the endpoints its
/// call tried), so first attempts stay exactly evenly spread even when one
/// endpoint fails every request.
///
/// ```
/// use tower_lb::strategy::RoundRobin;
/// let strategy = RoundRobin::new();
/// # let _ = strategy;
/// ```
#[derive(Debug, Default)]
pub struct RoundRobin {
    /// On a cache line of its own: every pick writes it, and the balancer's
    /// fields beside it are read by every request.
    next: CachePadded<AtomicUsize>,
}

/// Where the cycle starts for one set of endpoints.
#[derive(Debug, Clone, Copy)]
pub struct RoundRobinSchedule {
    start: usize,
    ramp: Option<Ramp>,
}

impl RoundRobin {
    /// A round-robin strategy.
    pub fn new() -> Self {
        Self::default()
    }
}

impl RoundRobin {
    /// The next endpoint in turn, or for a retry one at random, leaving the
    /// turns to first attempts.
    fn turn(&self, schedule: &RoundRobinSchedule, n: usize, ctx: &PickContext<'_>) -> usize {
        if ctx.is_retry() {
            return ctx.random_index(n);
        }
        let turn = self.next.fetch_add(1, Ordering::Relaxed);
        schedule.start.wrapping_add(turn) % n
    }
}

impl Strategy for RoundRobin {
    type Schedule = RoundRobinSchedule;

    fn schedule<C: Candidates + ?Sized>(
        &self,
        candidates: &C,
        ctx: &PickContext<'_>,
    ) -> RoundRobinSchedule {
        RoundRobinSchedule {
            start: ctx.random_index(candidates.len()),
            ramp: Ramp::of(candidates),
        }
    }

    fn pick<C: Candidates + ?Sized>(
        &self,
        schedule: &RoundRobinSchedule,
        candidates: &C,
        ctx: &PickContext<'_>,
    ) -> Option<usize> {
        let n = candidates.len();
        if n == 0 {
            return None;
        }
        let mut index = self.turn(schedule, n, ctx);
        // While some endpoint ramps up, it keeps its turn with the
        // probability of its factor (relative to the furthest along), else
        // the turn passes on.
        if let Some(ramp) = &schedule.ramp {
            for _ in 0..MAX_PASSES {
                if ramp.keeps(candidates.load(index).slow_start_factor(), ctx) {
                    break;
                }
                index = self.turn(schedule, n, ctx);
            }
        }
        Some(index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::RttEstimate;
    use crate::strategy::test_support::loads;

    #[test]
    fn spread_is_exact_over_whole_cycles() {
        let rtt = RttEstimate::DEFAULT;
        let ctx = PickContext::new(0, &rtt);
        for n in [1, 2, 7, 64] {
            let endpoints = loads(n);
            let rr = RoundRobin::new();
            let schedule = rr.schedule(&endpoints[..], &ctx);
            let mut counts = vec![0usize; n];
            for _ in 0..n * 13 {
                let i = rr.pick(&schedule, &endpoints[..], &ctx).unwrap();
                counts[i] += 1;
            }
            assert!(counts.iter().all(|&c| c == 13), "n={n}: {counts:?}");
        }
    }

    #[test]
    fn consecutive_picks_visit_endpoints_in_turn() {
        let rtt = RttEstimate::DEFAULT;
        let ctx = PickContext::new(0, &rtt);
        let endpoints = loads(5);
        let rr = RoundRobin::new();
        let schedule = rr.schedule(&endpoints[..], &ctx);
        let first = rr.pick(&schedule, &endpoints[..], &ctx).unwrap();
        for step in 1..10 {
            let i = rr.pick(&schedule, &endpoints[..], &ctx).unwrap();
            assert_eq!(i, (first + step) % 5);
        }
    }

    #[test]
    fn a_retry_takes_no_turn() {
        let rtt = RttEstimate::DEFAULT;
        let ctx = PickContext::new(0, &rtt);
        let retry = PickContext::new(0, &rtt).retry(true);
        let endpoints = loads(3);
        let rr = RoundRobin::new();
        let schedule = rr.schedule(&endpoints[..], &ctx);
        let first = rr.pick(&schedule, &endpoints[..], &ctx).unwrap();
        for step in 1..10 {
            for _ in 0..5 {
                assert!(rr.pick(&schedule, &endpoints[..], &retry).unwrap() < 3);
            }
            assert_eq!(
                rr.pick(&schedule, &endpoints[..], &ctx),
                Some((first + step) % 3)
            );
        }
    }

    #[test]
    fn empty_set_picks_nothing() {
        let rtt = RttEstimate::DEFAULT;
        let ctx = PickContext::new(0, &rtt);
        let rr = RoundRobin::new();
        let schedule = RoundRobinSchedule {
            start: 0,
            ramp: None,
        };
        assert_eq!(rr.pick(&schedule, &loads(0)[..], &ctx), None);
    }

    #[test]
    fn an_endpoint_in_slow_start_takes_its_factor_of_its_turns() {
        let rtt = RttEstimate::DEFAULT;
        let ctx = PickContext::new(0, &rtt);
        let endpoints = loads(4);
        endpoints[0].set_slow_start_factor(0.25);
        let rr = RoundRobin::new();
        let schedule = rr.schedule(&endpoints[..], &ctx);
        let mut counts = [0usize; 4];
        for _ in 0..40_000 {
            counts[rr.pick(&schedule, &endpoints[..], &ctx).unwrap()] += 1;
        }
        // Shares 0.25 : 1 : 1 : 1 of 3.25.
        let share = counts[0] as f64 / 40_000.0;
        assert!((share - 0.25 / 3.25).abs() < 0.01, "{counts:?}");
    }

    #[test]
    fn a_set_that_ramps_together_is_plain_round_robin() {
        let rtt = RttEstimate::DEFAULT;
        let ctx = PickContext::new(0, &rtt);
        let endpoints = loads(4);
        for load in &endpoints {
            load.set_slow_start_factor(0.1);
        }
        let rr = RoundRobin::new();
        let schedule = rr.schedule(&endpoints[..], &ctx);
        let mut counts = [0usize; 4];
        for _ in 0..400 {
            counts[rr.pick(&schedule, &endpoints[..], &ctx).unwrap()] += 1;
        }
        assert_eq!(counts, [100; 4]);
    }

    #[test]
    fn a_factor_of_zero_costs_a_bounded_number_of_turns() {
        let rtt = RttEstimate::DEFAULT;
        let ctx = PickContext::new(0, &rtt);
        let endpoints = loads(1_000);
        for load in &endpoints {
            load.set_slow_start_factor(0.0);
        }
        let rr = RoundRobin::new();
        let schedule = rr.schedule(&endpoints[..], &ctx);
        let before = rr.next.load(Ordering::Relaxed);
        assert!(rr.pick(&schedule, &endpoints[..], &ctx).is_some());
        assert!(rr.next.load(Ordering::Relaxed) - before <= MAX_PASSES + 1);
    }
}
