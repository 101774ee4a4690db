//! One rule for settings: a setter that can be given a value it cannot use
//! (NaN, an infinity, a negative number, a percentage above 100, a count of
//! zero) returns `Result<Self, InvalidSetting>` and says which setting and
//! which value. Nothing panics, nothing is clamped, nothing is quietly
//! replaced by a default. A setter that takes only values it can use (most
//! durations) returns `Self`.
//!
//! The check is made in the setter rather than deferred to a `build()`:
//! several of the settings types (`RetryBudget`, `Backoff`, `HedgeLayer`)
//! are used as they are, with no build step where a deferred error could
//! come out, and an error at the call that made the mistake points at it.

use std::fmt;

/// A setting given a value it cannot take: the setting's name, the value as
/// given, and what it must be.
///
/// ```
/// use tower_lb::retry::RetryBudget;
///
/// let error = RetryBudget::new().ratio(f64::NAN).unwrap_err();
/// assert_eq!(error.setting(), "RetryBudget::ratio");
/// assert_eq!(error.value(), "NaN");
/// assert_eq!(
///     error.to_string(),
///     "invalid setting RetryBudget::ratio = NaN: it must be a finite number, 0 or more"
/// );
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidSetting {
    setting: &'static str,
    value: String,
    expected: &'static str,
}

impl InvalidSetting {
    /// `setting` was given `value`, which is not `expected`.
    pub(crate) fn new(
        setting: &'static str,
        value: impl fmt::Debug,
        expected: &'static str,
    ) -> Self {
        Self {
            setting,
            value: format!("{value:?}"),
            expected,
        }
    }

    /// The setting, as `Type::method`.
    pub fn setting(&self) -> &'static str {
        self.setting
    }

    /// The value it was given, as Rust's `Debug` prints it.
    pub fn value(&self) -> &str {
        &self.value
    }

    /// What the value must be.
    pub fn expected(&self) -> &'static str {
        self.expected
    }
}

impl fmt::Display for InvalidSetting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid setting {} = {}: it must be {}",
            self.setting, self.value, self.expected
        )
    }
}

impl std::error::Error for InvalidSetting {}

/// `value` when `valid` says it can be used, else the error naming
/// `setting`, the value and what it must be: every setter's check.
pub(crate) fn check<T: fmt::Debug>(
    setting: &'static str,
    value: T,
    valid: bool,
    expected: &'static str,
) -> Result<T, InvalidSetting> {
    if valid {
        Ok(value)
    } else {
        Err(InvalidSetting::new(setting, value, expected))
    }
}

/// `value` when it is finite and at least `min`.
pub(crate) fn finite_at_least(
    setting: &'static str,
    value: f64,
    min: f64,
    expected: &'static str,
) -> Result<f64, InvalidSetting> {
    check(setting, value, value.is_finite() && value >= min, expected)
}

/// `value` when it is within `min..=max` (which rules out NaN).
pub(crate) fn within(
    setting: &'static str,
    value: f64,
    min: f64,
    max: f64,
    expected: &'static str,
) -> Result<f64, InvalidSetting> {
    check(setting, value, (min..=max).contains(&value), expected)
}

/// `percent` when it is at most 100.
pub(crate) fn percent(setting: &'static str, percent: u32) -> Result<u32, InvalidSetting> {
    check(setting, percent, percent <= 100, "a percentage, 0 to 100")
}

/// `count` when it is at least 1.
pub(crate) fn at_least_one(setting: &'static str, count: u32) -> Result<u32, InvalidSetting> {
    check(setting, count, count >= 1, "1 or more")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_float_check_refuses_nan_and_both_infinities_and_values_below_its_minimum() {
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -0.5] {
            assert!(
                finite_at_least("T::x", bad, 0.0, "0 or more").is_err(),
                "{bad}"
            );
        }
        assert_eq!(finite_at_least("T::x", 0.0, 0.0, "0 or more"), Ok(0.0));
    }

    #[test]
    fn a_range_check_refuses_nan_and_values_outside_it() {
        for bad in [f64::NAN, f64::INFINITY, -0.1, 1.1] {
            assert!(within("T::x", bad, 0.0, 1.0, "0 to 1").is_err(), "{bad}");
        }
        assert_eq!(within("T::x", 1.0, 0.0, 1.0, "0 to 1"), Ok(1.0));
    }

    #[test]
    fn the_error_names_the_setting_the_value_and_what_it_must_be() {
        let error = percent("Builder::panic_threshold", 150).unwrap_err();
        assert_eq!(
            error.to_string(),
            "invalid setting Builder::panic_threshold = 150: it must be a percentage, 0 to 100"
        );
        assert_eq!(at_least_one("T::n", 0).unwrap_err().value(), "0");
    }
}
