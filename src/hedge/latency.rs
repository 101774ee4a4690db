//! An online latency percentile, lock-free, over a sliding pair of windows.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Values below this many microseconds get one bucket each.
const LINEAR: u64 = 16;
/// Buckets per power of two above `LINEAR`: 8 keeps the error under 12.5 %.
const SUB_BITS: u32 = 3;
const SUB: u64 = 1 << SUB_BITS;
/// Powers of two covered above `LINEAR` (16 µs to about 2^40 µs, 12 days).
const OCTAVES: u64 = 36;
const BUCKETS: usize = (LINEAR + OCTAVES * SUB) as usize;

/// The bucket of `micros`.
fn bucket(micros: u64) -> usize {
    if micros < LINEAR {
        return micros as usize;
    }
    let octave = u64::from(63 - micros.leading_zeros()); // >= 4
    let sub = (micros >> (octave - u64::from(SUB_BITS))) & (SUB - 1);
    let index = LINEAR + (octave - 4) * SUB + sub;
    (index as usize).min(BUCKETS - 1)
}

/// The largest value in bucket `index`, in microseconds: a percentile
/// reported from it errs on the late side, so a hedge is never early.
fn upper_bound(index: usize) -> u64 {
    let index = index as u64;
    if index < LINEAR {
        return index;
    }
    let octave = (index - LINEAR) / SUB + 4;
    let sub = (index - LINEAR) % SUB;
    let width = 1u64 << (octave - u64::from(SUB_BITS));
    (1u64 << octave) + (sub + 1) * width - 1
}

/// One window's counts.
struct Window {
    /// The window's sequence number (time / window length) plus one; 0 is
    /// never a live window.
    sequence: AtomicU64,
    counts: Box<[AtomicU64]>,
}

impl Window {
    fn new() -> Self {
        Self {
            sequence: AtomicU64::new(0),
            counts: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

/// Latencies of recent requests: the current window and the one before, so
/// the estimate never starts from nothing when a window turns over.
///
/// Recording is two relaxed atomic operations. Turning a window over zeroes
/// its buckets while other threads may be recording into it; a sample lost
/// that way is a rounding error for an estimate over thousands.
pub(crate) struct LatencyWindows {
    windows: [Window; 2],
    window_ns: u64,
}

impl LatencyWindows {
    pub(crate) fn new(window: Duration) -> Self {
        Self {
            windows: [Window::new(), Window::new()],
            window_ns: u64::try_from(window.as_nanos()).unwrap_or(u64::MAX).max(1),
        }
    }

    /// The window for `now_ns`, turned over first if it holds an older one.
    fn current(&self, now_ns: u64) -> &Window {
        let sequence = now_ns / self.window_ns + 1;
        let window = &self.windows[(sequence % 2) as usize];
        let seen = window.sequence.load(Ordering::Acquire);
        if seen != sequence
            && window
                .sequence
                .compare_exchange(seen, sequence, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            for count in window.counts.iter() {
                count.store(0, Ordering::Relaxed);
            }
        }
        window
    }

    pub(crate) fn record(&self, now_ns: u64, latency: Duration) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.current(now_ns).counts[bucket(micros)].fetch_add(1, Ordering::Relaxed);
    }

    /// The latency below which `quantile` (0 to 1) of the samples of this
    /// window and the one before fall, or `None` with fewer than
    /// `min_samples`.
    pub(crate) fn quantile(
        &self,
        now_ns: u64,
        quantile: f64,
        min_samples: u64,
    ) -> Option<Duration> {
        let sequence = now_ns / self.window_ns + 1;
        let live = |w: &&Window| {
            let s = w.sequence.load(Ordering::Acquire);
            s == sequence || s + 1 == sequence
        };
        let live = [&self.windows[0], &self.windows[1]].map(|w| Some(w).filter(live));
        let count_at = |i: usize| -> u64 {
            live.iter()
                .flatten()
                .map(|w| w.counts[i].load(Ordering::Relaxed))
                .sum()
        };
        let total: u64 = (0..BUCKETS).map(count_at).sum();
        if total == 0 || total < min_samples {
            return None;
        }
        // The rank of the sample at `quantile`, at least the first.
        let rank = ((quantile.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for i in 0..BUCKETS {
            seen += count_at(i);
            if seen >= rank {
                return Some(Duration::from_micros(upper_bound(i)));
            }
        }
        Some(Duration::from_micros(upper_bound(BUCKETS - 1)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn buckets_cover_their_values() {
        for micros in [0, 1, 15, 16, 17, 100, 1_000, 12_345, 1 << 30] {
            let i = bucket(micros);
            assert!(upper_bound(i) >= micros, "{micros} above bucket {i}");
            if i > 0 {
                assert!(
                    upper_bound(i - 1) < micros,
                    "{micros} in a later bucket than {i}"
                );
            }
        }
    }

    #[test]
    fn bucket_error_is_under_an_eighth() {
        for micros in [100u64, 999, 5_000, 77_777, 1_000_000] {
            let reported = upper_bound(bucket(micros));
            assert!(
                (reported - micros) as f64 <= micros as f64 / 8.0,
                "{micros} -> {reported}"
            );
        }
    }

    #[test]
    fn p95_of_a_known_distribution() {
        let w = LatencyWindows::new(Duration::from_secs(10));
        for i in 1..=100u64 {
            w.record(0, Duration::from_millis(i));
        }
        let p95 = w.quantile(0, 0.95, 1).unwrap_or_default();
        assert!(
            p95 >= Duration::from_millis(95) && p95 <= Duration::from_millis(107),
            "{p95:?}"
        );
    }

    #[test]
    fn too_few_samples_give_no_estimate() {
        let w = LatencyWindows::new(Duration::from_secs(10));
        w.record(0, Duration::from_millis(5));
        assert_eq!(w.quantile(0, 0.95, 2), None);
    }

    #[test]
    fn samples_older_than_two_windows_are_forgotten() {
        let w = LatencyWindows::new(Duration::from_secs(1));
        for _ in 0..100 {
            w.record(0, Duration::from_millis(500));
        }
        w.record(1_500 * MS, Duration::from_millis(2));
        let p50_next = w.quantile(1_500 * MS, 0.5, 1).unwrap_or_default();
        assert!(
            p50_next >= Duration::from_millis(450),
            "previous window still counts: {p50_next:?}"
        );
        w.record(2_500 * MS, Duration::from_millis(2));
        let p50_later = w.quantile(2_500 * MS, 0.5, 1).unwrap_or_default();
        assert!(
            p50_later <= Duration::from_millis(3),
            "old window still counts: {p50_later:?}"
        );
    }
}
