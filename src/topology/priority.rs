//! Priority levels with failover, as Envoy computes its "priority load".
//!
//! Each level's *health* is the share of its endpoints in service, times
//! the overprovisioning factor (1.4 by default), capped at 100 %: a level
//! 72 % in service still counts as whole. Level 0 takes its health's share
//! of the traffic, level 1 as much of the rest as its health covers, and so
//! on. When the levels' health adds up to less than 100 % (the *normalized
//! total health*), the shares are scaled up to fill 100 %, and each level
//! whose own share in service is below the panic threshold panics (balances
//! over all its endpoints); while the levels together have enough, none
//! panics. With every level at 0 %, level 0 takes everything, in panic.
//!
//! One level behaves exactly as without levels: it takes everything, and
//! it panics when its share in service is below the threshold.

/// One level's endpoints: those known (a level leaves out endpoints whose
/// active check has not answered yet), and those of them in service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LevelCounts {
    pub(crate) known: usize,
    pub(crate) in_service: usize,
}

/// What each level gets: a share of the traffic in percent (they add up to
/// 100), and whether it panics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PriorityLoad {
    pub(crate) percent: Vec<u32>,
    pub(crate) panic: Vec<bool>,
}

/// The overprovisioning factor Envoy uses by default, in percent.
pub(crate) const DEFAULT_OVERPROVISIONING_PERCENT: u32 = 140;

/// The priority load of `levels` (lowest number first), for an
/// overprovisioning factor in percent (140 for 1.4) and a panic threshold
/// in percent. Integer percentages, as Envoy's.
pub(crate) fn priority_load(
    levels: &[LevelCounts],
    overprovisioning_percent: u32,
    panic_threshold: u32,
) -> PriorityLoad {
    let below_threshold = |c: &LevelCounts| {
        c.in_service < c.known && c.in_service * 100 < panic_threshold as usize * c.known
    };
    if let [only] = levels {
        return PriorityLoad {
            percent: vec![100],
            panic: vec![below_threshold(only)],
        };
    }
    let health: Vec<u32> = levels
        .iter()
        .map(|c| match c.known {
            0 => 0,
            known => {
                let scaled =
                    c.in_service as u64 * u64::from(overprovisioning_percent) / known as u64;
                scaled.min(100) as u32
            }
        })
        .collect();
    let total: u32 = health.iter().sum::<u32>().min(100);
    let mut percent = vec![0; levels.len()];
    if total == 0 {
        // Nothing in service anywhere: everything to the first level, which
        // panics (Envoy does the same).
        if let Some(first) = percent.first_mut() {
            *first = 100;
        }
        let panic = levels.iter().map(below_threshold).collect();
        return PriorityLoad { percent, panic };
    }
    let mut left = 100u32;
    for (share, &h) in percent.iter_mut().zip(&health) {
        *share = (h * 100 / total).min(left);
        left -= *share;
    }
    // Rounding leaves a few percent: to the first level with any health.
    if left > 0 {
        if let Some(i) = health.iter().position(|&h| h > 0) {
            percent[i] += left;
        }
    }
    let panic = levels
        .iter()
        .map(|c| total < 100 && below_threshold(c))
        .collect();
    PriorityLoad { percent, panic }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn level(in_service: usize, known: usize) -> LevelCounts {
        LevelCounts { known, in_service }
    }

    fn load(levels: &[LevelCounts]) -> PriorityLoad {
        priority_load(levels, DEFAULT_OVERPROVISIONING_PERCENT, 50)
    }

    /// Envoy's table for two levels, level 1 wholly in service.
    #[test]
    fn traffic_moves_to_the_next_level_as_envoys_table_says() {
        let cases = [(100, 100), (72, 100), (71, 99), (50, 70), (25, 35), (0, 0)];
        for (healthy, to_first) in cases {
            let got = load(&[level(healthy, 100), level(100, 100)]);
            assert_eq!(
                got.percent,
                [to_first, 100 - to_first],
                "{healthy} % in service"
            );
            assert_eq!(got.panic, [false, false], "enough in total: no panic");
        }
    }

    /// Envoy's table for three levels.
    #[test]
    fn a_third_level_takes_what_the_first_two_cannot() {
        let got = load(&[level(20, 100), level(20, 100), level(100, 100)]);
        assert_eq!(got.percent, [28, 28, 44]);
        let got = load(&[level(0, 100), level(0, 100), level(100, 100)]);
        assert_eq!(got.percent, [0, 0, 100]);
    }

    #[test]
    fn short_levels_are_scaled_up_and_those_below_the_threshold_panic() {
        // 30 % x 1.4 = 42 and 20 % x 1.4 = 28: 70 in total, scaled to 100.
        let got = load(&[level(3, 10), level(2, 10)]);
        assert_eq!(got.percent, [60, 40]);
        assert_eq!(got.panic, [true, true]);
        // The first level above the threshold does not panic.
        let got = load(&[level(6, 10), level(0, 10)]);
        assert_eq!(got.percent, [100, 0]);
        assert_eq!(got.panic, [false, true]);
    }

    #[test]
    fn with_nothing_in_service_the_first_level_takes_everything_in_panic() {
        let got = load(&[level(0, 4), level(0, 4)]);
        assert_eq!(got.percent, [100, 0]);
        assert_eq!(got.panic, [true, true]);
    }

    #[test]
    fn one_level_takes_everything_and_panics_below_the_threshold_alone() {
        assert_eq!(load(&[level(3, 4)]).panic, [false]);
        assert_eq!(load(&[level(1, 4)]).panic, [true]);
        assert_eq!(load(&[level(2, 4)]).percent, [100]);
        // A threshold above what overprovisioning covers still applies.
        assert_eq!(priority_load(&[level(3, 4)], 140, 80).panic, [true]);
    }

    #[test]
    fn a_level_of_endpoints_not_yet_checked_has_no_health() {
        let got = load(&[level(0, 0), level(2, 2)]);
        assert_eq!(got.percent, [0, 100]);
    }
}
