//! Exponential backoff with jitter between retries.

use std::time::Duration;

use crate::setting::{self, InvalidSetting};

/// Exponential backoff with jitter, by the gRPC formula (A6): the delay
/// before retry `n` (1 for the first retry) is
///
/// ```text
/// min(initial * multiplier^(n-1), max) * random(1 - jitter, 1 + jitter)
/// ```
///
/// The defaults are Envoy's numbers, 25 ms growing to 250 ms, with gRPC's
/// doubling and ±20 % jitter: short enough that a retry still helps a caller
/// waiting on it, and the jitter keeps clients that failed together from
/// retrying together.
///
/// ```
/// use std::time::Duration;
/// use rand::SeedableRng;
/// use tower_lb::retry::Backoff;
///
/// let backoff = Backoff::new()
///     .initial(Duration::from_millis(100))
///     .max(Duration::from_secs(1))
///     .jitter(0.0)?;
/// let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
/// assert_eq!(backoff.delay(1, &mut rng), Duration::from_millis(100));
/// assert_eq!(backoff.delay(3, &mut rng), Duration::from_millis(400));
/// assert_eq!(backoff.delay(9, &mut rng), Duration::from_secs(1));
/// # Ok::<_, tower_lb::error::InvalidSetting>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    multiplier: f64,
    jitter: f64,
}

impl Backoff {
    /// 25 ms before the first retry, doubling up to 250 ms, ±20 % jitter.
    pub const DEFAULT: Backoff = Backoff {
        initial: Duration::from_millis(25),
        max: Duration::from_millis(250),
        multiplier: 2.0,
        jitter: 0.2,
    };

    /// gRPC's connection back-off: 1 s, growing 1.6x up to 120 s, ±20 %.
    // Used by the clients' connections only.
    #[cfg_attr(not(feature = "http"), allow(dead_code))]
    pub(crate) const CONNECTION: Backoff = Backoff {
        initial: Duration::from_secs(1),
        max: Duration::from_secs(120),
        multiplier: 1.6,
        jitter: 0.2,
    };

    /// The default backoff (see [`Backoff::DEFAULT`]).
    pub fn new() -> Self {
        Self::DEFAULT
    }

    /// The delay before the first retry, before jitter.
    pub fn initial(mut self, initial: Duration) -> Self {
        self.initial = initial;
        self
    }

    /// The longest delay before jitter: growth stops here. A `max` below
    /// `initial` makes every delay `max`.
    pub fn max(mut self, max: Duration) -> Self {
        self.max = max;
        self
    }

    /// The factor each delay grows by over the one before. 1.0 gives a
    /// constant delay.
    ///
    /// # Errors
    ///
    /// When `multiplier` is below 1, NaN or infinite.
    pub fn multiplier(mut self, multiplier: f64) -> Result<Self, InvalidSetting> {
        self.multiplier = setting::finite_at_least(
            "Backoff::multiplier",
            multiplier,
            1.0,
            "a finite number, 1 or more",
        )?;
        Ok(self)
    }

    /// How far each delay is randomly spread around its nominal value, as a
    /// fraction of it: 0.2 picks uniformly within ±20 %; 0 turns jitter off.
    ///
    /// # Errors
    ///
    /// When `jitter` is not within 0 to 1 (NaN included).
    pub fn jitter(mut self, jitter: f64) -> Result<Self, InvalidSetting> {
        self.jitter = setting::within("Backoff::jitter", jitter, 0.0, 1.0, "a fraction, 0 to 1")?;
        Ok(self)
    }

    /// A bound on what [`delay`](Self::delay) returns, `max * (1 + jitter)`
    /// (saturating): what a retry layer may have to wait at worst.
    pub fn upper_bound(&self) -> Duration {
        scale(self.max, 1.0 + self.jitter)
    }

    /// The delay before retry number `retry`, counting the first retry as 1
    /// (0 is treated as 1). Never panics: huge retry numbers and durations
    /// saturate.
    pub fn delay(&self, retry: u32, rng: &mut impl rand::Rng) -> Duration {
        let exponent = i32::try_from(retry.saturating_sub(1)).unwrap_or(i32::MAX);
        // Grow in f64 and compare with `max` before building a `Duration`,
        // so that a growth factor beyond any `Duration` (or infinite) never
        // reaches a conversion that could panic.
        let growth = self.multiplier.powi(exponent);
        let nominal_secs = self.initial.as_secs_f64() * growth;
        let nominal = if nominal_secs >= self.max.as_secs_f64() {
            self.max
        } else {
            Duration::try_from_secs_f64(nominal_secs).unwrap_or(self.max)
        };
        if self.jitter == 0.0 {
            return nominal;
        }
        // `random::<f64>()` is uniform in [0, 1), so the factor is uniform
        // in [1 - jitter, 1 + jitter); unlike `random_range` it cannot panic
        // on an empty range.
        let factor = 1.0 - self.jitter + 2.0 * self.jitter * rng.random::<f64>();
        scale(nominal, factor)
    }
}

/// `duration * factor` for a non-negative `factor`, saturating at
/// `Duration::MAX` where `Duration::mul_f64` would panic.
fn scale(duration: Duration, factor: f64) -> Duration {
    Duration::try_from_secs_f64(duration.as_secs_f64() * factor).unwrap_or(Duration::MAX)
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::SmallRng;
    use rand::SeedableRng;

    use super::*;

    fn rng() -> SmallRng {
        SmallRng::seed_from_u64(42)
    }

    #[test]
    fn the_first_delay_is_within_the_jitter_of_initial() {
        let backoff = Backoff::new();
        let mut rng = rng();
        for _ in 0..1_000 {
            let delay = backoff.delay(1, &mut rng);
            assert!(delay >= Duration::from_millis(20), "{delay:?}");
            assert!(delay <= Duration::from_millis(30), "{delay:?}");
        }
    }

    #[test]
    fn delays_grow_by_the_multiplier() {
        let backoff = Backoff::new()
            .initial(Duration::from_millis(10))
            .max(Duration::from_secs(60))
            .multiplier(3.0)
            .and_then(|b| b.jitter(0.0))
            .expect("valid setting");
        let mut rng = rng();
        let delays: Vec<_> = (1..=4).map(|n| backoff.delay(n, &mut rng)).collect();
        assert_eq!(
            delays,
            [10, 30, 90, 270].map(Duration::from_millis).to_vec()
        );
    }

    #[test]
    fn jittered_delays_grow_by_the_multiplier_on_average() {
        let backoff = Backoff::new().max(Duration::from_secs(60));
        let mut rng = rng();
        let mean = |n: u32, rng: &mut SmallRng| {
            (0..1_000)
                .map(|_| backoff.delay(n, rng).as_secs_f64())
                .sum::<f64>()
                / 1_000.0
        };
        let (first, second) = (mean(1, &mut rng), mean(2, &mut rng));
        assert!((second / first - 2.0).abs() < 0.05, "{first} -> {second}");
    }

    #[test]
    fn delays_are_capped_at_max_plus_jitter() {
        let backoff = Backoff::new();
        let mut rng = rng();
        let mut longest = Duration::ZERO;
        for _ in 0..1_000 {
            longest = longest.max(backoff.delay(20, &mut rng));
        }
        assert!(longest <= Duration::from_millis(300), "{longest:?}");
        assert!(longest >= Duration::from_millis(250), "{longest:?}");
        assert_eq!(backoff.upper_bound(), Duration::from_millis(300));
    }

    #[test]
    fn huge_retry_numbers_do_not_panic() {
        let mut rng = rng();
        for backoff in [
            Backoff::new(),
            Backoff::new().max(Duration::MAX),
            Backoff::new()
                .max(Duration::MAX)
                .jitter(1.0)
                .expect("valid setting"),
            Backoff::new().initial(Duration::MAX).max(Duration::MAX),
        ] {
            for retry in [0, 1, 64, 1_100, u32::MAX] {
                let _ = backoff.delay(retry, &mut rng);
            }
            let _ = backoff.upper_bound();
        }
        assert_eq!(
            Backoff::new()
                .jitter(0.0)
                .expect("valid setting")
                .delay(u32::MAX, &mut rng),
            Duration::from_millis(250)
        );
    }

    #[test]
    fn zero_jitter_is_exact() {
        let backoff = Backoff::new().jitter(0.0).expect("valid setting");
        let mut rng = rng();
        let delays: Vec<_> = (1..=5).map(|n| backoff.delay(n, &mut rng)).collect();
        assert_eq!(
            delays,
            [25, 50, 100, 200, 250].map(Duration::from_millis).to_vec()
        );
    }

    #[test]
    fn retry_zero_counts_as_the_first() {
        let backoff = Backoff::new().jitter(0.0).expect("valid setting");
        assert_eq!(backoff.delay(0, &mut rng()), Duration::from_millis(25));
    }

    #[test]
    fn a_jitter_outside_0_to_1_is_refused_by_name() {
        for bad in [7.0, -1.0, f64::NAN, f64::INFINITY] {
            let error = Backoff::new().jitter(bad).unwrap_err();
            assert_eq!(error.setting(), "Backoff::jitter");
        }
    }

    #[test]
    fn a_multiplier_below_one_or_not_finite_is_refused_by_name() {
        for bad in [0.5, f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let error = Backoff::new().multiplier(bad).unwrap_err();
            assert_eq!(error.setting(), "Backoff::multiplier");
        }
    }
}
