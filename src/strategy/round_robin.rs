use std::sync::atomic::{AtomicUsize, Ordering};

use super::{Candidates, PickContext, Strategy};

/// Round robin: endpoints in turn, from one shared atomic counter.
///
/// Each new set of endpoints starts at a random position, so that many clients
/// started together do not all hit the first endpoint first. Between changes
/// of the set, every full cycle gives each endpoint exactly one request.
///
/// ```
/// use tower_lb::strategy::RoundRobin;
/// let strategy = RoundRobin::new();
/// # let _ = strategy;
/// ```
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

/// Where the cycle starts for one set of endpoints.
#[derive(Debug, Clone, Copy)]
pub struct RoundRobinSchedule {
    start: usize,
}

impl RoundRobin {
    /// A round-robin strategy.
    pub fn new() -> Self {
        Self::default()
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
        }
    }

    fn pick<C: Candidates + ?Sized>(
        &self,
        schedule: &RoundRobinSchedule,
        candidates: &C,
        _ctx: &PickContext<'_>,
    ) -> Option<usize> {
        let n = candidates.len();
        if n == 0 {
            return None;
        }
        let turn = self.next.fetch_add(1, Ordering::Relaxed);
        Some(schedule.start.wrapping_add(turn) % n)
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
    fn empty_set_picks_nothing() {
        let rtt = RttEstimate::DEFAULT;
        let ctx = PickContext::new(0, &rtt);
        let rr = RoundRobin::new();
        let schedule = RoundRobinSchedule { start: 0 };
        assert_eq!(rr.pick(&schedule, &loads(0)[..], &ctx), None);
    }
}
