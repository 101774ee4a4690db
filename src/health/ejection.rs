//! What the driver remembers about one endpoint's health between intervals.
//! It lives in the driver's map next to the endpoint, so removing an endpoint
//! drops it.

use std::time::Duration;

use tokio::time::Instant;

use super::{IntervalCounts, OutlierDetection};

/// One endpoint's ejection history and the counter readings of the last
/// interval.
#[derive(Debug, Clone, Default)]
pub(crate) struct EjectionRecord {
    /// Grows by one per ejection, drops by one per interval in service.
    multiplier: u32,
    /// When the current ejection ends; `None` while in service.
    ejected_until: Option<Instant>,
    /// Success and failure totals at the end of the previous interval.
    baseline: IntervalCounts,
    /// And at the end of the one before: the start of the recent window
    /// (see `recent`).
    earlier_baseline: IntervalCounts,
    /// Intervals in a row that the latency detector found it slow.
    pub(crate) slow_intervals: u32,
    /// For an ejection for failures in a row: when to look at it again,
    /// and its interval at the ejection (see `Health::return_due`).
    review: Option<(Instant, IntervalCounts)>,
}

impl EjectionRecord {
    /// The same history for a new service under the same key, whose counters
    /// start from zero.
    pub(crate) fn for_new_counters(&self) -> Self {
        Self {
            baseline: IntervalCounts::default(),
            earlier_baseline: IntervalCounts::default(),
            ..self.clone()
        }
    }

    pub(crate) fn is_ejected(&self) -> bool {
        self.ejected_until.is_some()
    }

    /// When something is next due: the ejection's end, or its review.
    pub(crate) fn next_due(&self) -> Option<Instant> {
        let review = self.review.map(|(at, _)| at);
        match (self.ejected_until, review) {
            (Some(until), Some(review)) => Some(until.min(review)),
            (until, review) => until.or(review),
        }
    }

    /// Looks at the ejection again at `at`, against `interval`, its
    /// outcomes when it was ejected.
    pub(crate) fn review_at(&mut self, at: Instant, interval: IntervalCounts) {
        self.review = Some((at, interval));
    }

    /// The interval to judge again, once the review is due (and only while
    /// the ejection lasts); the review is then done.
    pub(crate) fn take_review_due(&mut self, now: Instant) -> Option<IntervalCounts> {
        match self.review {
            Some((at, interval)) if at <= now => {
                self.review = None;
                self.is_ejected().then_some(interval)
            }
            _ => None,
        }
    }

    /// Takes back an ejection that should not have been: the endpoint is in
    /// service again, and the ejection does not count toward the next one's
    /// length.
    pub(crate) fn withdraw(&mut self) {
        self.ejected_until = None;
        self.review = None;
        self.multiplier = self.multiplier.saturating_sub(1);
    }

    /// The outcomes of the interval so far, given the current totals.
    fn interval_so_far(&self, successes: u64, failures: u64) -> IntervalCounts {
        IntervalCounts {
            successes: successes.wrapping_sub(self.baseline.successes),
            failures: failures.wrapping_sub(self.baseline.failures),
        }
    }

    /// The outcomes of the previous interval and this one so far, given the
    /// current totals: a window of one to two intervals, never the few
    /// requests since an interval began.
    pub(crate) fn recent(&self, successes: u64, failures: u64) -> IntervalCounts {
        IntervalCounts {
            successes: successes.wrapping_sub(self.earlier_baseline.successes),
            failures: failures.wrapping_sub(self.earlier_baseline.failures),
        }
    }

    /// The outcomes since the previous call, given the current totals; the
    /// totals become the next interval's baseline.
    pub(crate) fn take_interval(&mut self, successes: u64, failures: u64) -> IntervalCounts {
        let interval = self.interval_so_far(successes, failures);
        self.earlier_baseline = self.baseline;
        self.baseline = IntervalCounts {
            successes,
            failures,
        };
        interval
    }

    /// Ejects the endpoint from `now`; returns how long for, until when, and
    /// the new multiplier.
    pub(crate) fn eject(
        &mut self,
        now: Instant,
        settings: &OutlierDetection,
    ) -> (Duration, Instant, u32) {
        self.multiplier = self.multiplier.saturating_add(1);
        let time = settings.ejection_time(self.multiplier);
        // An ejection too long for the clock lasts as long as it can.
        let until = now
            .checked_add(time)
            .unwrap_or_else(crate::request::far_future);
        self.ejected_until = Some(until);
        self.slow_intervals = 0;
        (time, until, self.multiplier)
    }

    /// Ends the ejection if its time is up; returns whether it did. The
    /// interval starts afresh from `successes` and `failures`.
    pub(crate) fn try_return(&mut self, now: Instant, successes: u64, failures: u64) -> bool {
        match self.ejected_until {
            Some(until) if until <= now => {
                self.ejected_until = None;
                self.review = None;
                self.take_interval(successes, failures);
                true
            }
            _ => false,
        }
    }

    /// Called every interval while the endpoint is in service.
    pub(crate) fn healthy_interval(&mut self) {
        if !self.is_ejected() {
            self.multiplier = self.multiplier.saturating_sub(1);
        }
    }

    pub(crate) fn multiplier(&self) -> u32 {
        self.multiplier
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> OutlierDetection {
        OutlierDetection::new()
            .base_ejection_time(Duration::from_secs(30))
            .max_ejection_time(Duration::from_secs(300))
    }

    #[test]
    fn each_ejection_raises_the_multiplier_and_lengthens_the_next() {
        let now = Instant::now();
        let mut record = EjectionRecord::default();
        let (time, until, multiplier) = record.eject(now, &settings());
        assert_eq!(
            (time, until, multiplier),
            (Duration::from_secs(30), now + time, 1)
        );
        assert!(record.try_return(until, 0, 0));
        let (time, _, multiplier) = record.eject(now, &settings());
        assert_eq!((time, multiplier), (Duration::from_secs(60), 2));
    }

    #[test]
    fn an_ejection_does_not_end_before_its_time() {
        let now = Instant::now();
        let mut record = EjectionRecord::default();
        record.eject(now, &settings());
        assert!(!record.try_return(now + Duration::from_secs(29), 0, 0));
        assert!(record.is_ejected());
    }

    #[test]
    fn healthy_intervals_decay_the_multiplier_only_while_in_service() {
        let now = Instant::now();
        let mut record = EjectionRecord::default();
        record.eject(now, &settings());
        record.healthy_interval();
        assert_eq!(record.multiplier(), 1);
        record.try_return(now + Duration::from_secs(30), 0, 0);
        record.healthy_interval();
        assert_eq!(record.multiplier(), 0);
        record.healthy_interval();
        assert_eq!(record.multiplier(), 0);
    }

    #[test]
    fn intervals_count_from_the_previous_reading() {
        let mut record = EjectionRecord::default();
        record.take_interval(10, 2);
        let first = record.take_interval(15, 5);
        assert_eq!((first.successes, first.failures), (5, 3));
        let second = record.take_interval(15, 6);
        assert_eq!((second.successes, second.failures), (0, 1));
    }

    #[test]
    fn a_review_is_due_once_and_only_while_the_ejection_lasts() {
        let now = Instant::now();
        let mut record = EjectionRecord::default();
        record.eject(now, &settings());
        let at_ejection = IntervalCounts {
            successes: 86,
            failures: 14,
        };
        record.review_at(now + Duration::from_secs(1), at_ejection);
        assert_eq!(record.next_due(), Some(now + Duration::from_secs(1)));
        assert_eq!(record.take_review_due(now), None);
        assert_eq!(
            record.take_review_due(now + Duration::from_secs(1)),
            Some(at_ejection)
        );
        assert_eq!(record.take_review_due(now + Duration::from_secs(2)), None);
        assert_eq!(record.next_due(), Some(now + Duration::from_secs(30)));
        record.withdraw();
        assert!(!record.is_ejected());
        assert_eq!((record.multiplier(), record.next_due()), (0, None));
    }

    #[test]
    fn an_ejection_too_long_for_the_clock_does_not_panic() {
        let settings = OutlierDetection::new()
            .base_ejection_time(Duration::MAX)
            .max_ejection_time(Duration::MAX);
        let mut record = EjectionRecord::default();
        record.eject(Instant::now(), &settings);
        assert!(record.is_ejected());
    }
}
