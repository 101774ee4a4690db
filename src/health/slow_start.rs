//! Slow start: a new endpoint, or one back from an ejection, gets a growing
//! share of the traffic instead of its full share at once.

use std::time::Duration;

use crate::setting::{self, InvalidSetting};

/// Ramps an endpoint's share of the traffic up over a window after it joins
/// (or returns from an ejection), so that a cold cache or a JIT that has not
/// warmed up is not flooded, as Envoy's slow start does.
///
/// The endpoint's weight is multiplied by
/// `max(min_weight_percent / 100, (age / window) ^ (1 / aggression))`:
/// an `aggression` of 1 ramps linearly, above 1 it ramps faster early.
/// Every strategy honours it (but [`RingHash`](crate::strategy::RingHash)
/// for requests with a hash key, whose endpoint is the key's), by the
/// endpoint's factor relative to its
/// peers' (so that endpoints ramping together are not held back): round
/// robin lets the endpoint keep a turn it drew with the probability of its
/// factor, P2C lets a winner in slow start keep its win with the probability
/// of its factor, and weighted round robin multiplies its weight by the
/// factor.
///
/// ```
/// use std::time::Duration;
/// use tower_lb::health::SlowStart;
///
/// let slow_start = SlowStart::new(Duration::from_secs(30))
///     .min_weight_percent(5.0)?
///     .aggression(2.0)?;
/// assert_eq!(slow_start.factor(Duration::ZERO), 0.05);
/// assert_eq!(slow_start.factor(Duration::from_secs(30)), 1.0);
/// # Ok::<_, tower_lb::error::InvalidSetting>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SlowStart {
    window: Duration,
    min_weight: f64,
    aggression: f64,
}

impl SlowStart {
    /// A ramp over `window`, from 10 % (Envoy's default minimum), linear.
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            min_weight: 0.1,
            aggression: 1.0,
        }
    }

    /// The share an endpoint starts at, in percent (0 to 100; default 10).
    ///
    /// # Errors
    ///
    /// When `percent` is not within 0 to 100 (NaN included).
    pub fn min_weight_percent(mut self, percent: f64) -> Result<Self, InvalidSetting> {
        let percent = setting::within(
            "SlowStart::min_weight_percent",
            percent,
            0.0,
            100.0,
            "a percentage, 0 to 100",
        )?;
        self.min_weight = percent / 100.0;
        Ok(self)
    }

    /// The ramp's shape (default 1, linear).
    ///
    /// # Errors
    ///
    /// When `aggression` is not a finite number above 0.
    pub fn aggression(mut self, aggression: f64) -> Result<Self, InvalidSetting> {
        self.aggression = setting::check(
            "SlowStart::aggression",
            aggression,
            aggression.is_finite() && aggression > 0.0,
            "a finite number above 0",
        )?;
        Ok(self)
    }

    /// The window over which the share ramps up.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// The weight factor (0 to 1) of an endpoint `age` into its slow start;
    /// 1 once the window is over.
    pub fn factor(&self, age: Duration) -> f64 {
        if age >= self.window {
            return 1.0;
        }
        let progress = age.as_secs_f64() / self.window.as_secs_f64();
        progress
            .powf(1.0 / self.aggression)
            .max(self.min_weight)
            .clamp(0.0, 1.0)
    }

    /// How often the balancer updates the factors of endpoints in slow
    /// start: 30 steps over the window, between 10 ms and 1 s apart.
    pub(crate) fn step(&self) -> Duration {
        (self.window / 30).clamp(Duration::from_millis(10), Duration::from_secs(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_secs(10);

    #[test]
    fn the_share_starts_at_the_minimum_and_ends_full() {
        let slow_start = SlowStart::new(WINDOW);
        assert_eq!(slow_start.factor(Duration::ZERO), 0.1);
        assert_eq!(slow_start.factor(Duration::from_millis(500)), 0.1);
        assert_eq!(slow_start.factor(WINDOW), 1.0);
        assert_eq!(slow_start.factor(WINDOW * 2), 1.0);
    }

    #[test]
    fn aggression_one_ramps_linearly() {
        let slow_start = SlowStart::new(WINDOW);
        assert!((slow_start.factor(Duration::from_secs(5)) - 0.5).abs() < 1e-9);
    }

    #[test]
    fn more_aggression_ramps_faster_early() {
        let slow_start = SlowStart::new(WINDOW)
            .aggression(2.0)
            .expect("valid setting");
        // (0.25) ^ (1/2) = 0.5
        assert!((slow_start.factor(Duration::from_millis(2_500)) - 0.5).abs() < 1e-9);
    }

    #[test]
    fn odd_settings_are_refused_by_name() {
        for bad in [f64::NAN, -1.0, 101.0] {
            let error = SlowStart::new(WINDOW).min_weight_percent(bad).unwrap_err();
            assert_eq!(error.setting(), "SlowStart::min_weight_percent");
        }
        for bad in [f64::NAN, f64::INFINITY, 0.0, -2.0] {
            let error = SlowStart::new(WINDOW).aggression(bad).unwrap_err();
            assert_eq!(error.setting(), "SlowStart::aggression");
        }
    }

    #[test]
    fn a_zero_window_is_no_ramp() {
        let zero_window = SlowStart::new(Duration::ZERO);
        assert_eq!(zero_window.factor(Duration::ZERO), 1.0);
    }
}
