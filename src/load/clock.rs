//! The clock that times requests for the latency estimates.

use tokio::time::Instant;

/// Which clock times requests for the Peak-EWMA latency estimates (see
/// [`Builder::latency_clock`](crate::Builder::latency_clock)).
///
/// A balancer that uses latency reads its clock twice per request: when the
/// request starts and when its response arrives. With `Instant::now()` those
/// two reads were a quarter of the cost of a request through a Peak-EWMA
/// balancer, so the default reads the CPU's counter instead.
///
/// Everything else that keeps time (ejections, slow start, load-report
/// expiry, the startup wait) stays on tokio's clock whichever is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum LatencyClock {
    /// The CPU's counter (the invariant TSC on x86-64, the system counter on
    /// AArch64), read through [`quanta`](https://docs.rs/quanta) and scaled
    /// to nanoseconds: about 8 ns a read on this project's VM, against 17 ns
    /// for `Instant::now()`. Where the CPU has no usable counter, quanta
    /// falls back to the OS's monotonic clock. It keeps real time:
    /// `tokio::time::pause` does not stop it.
    #[default]
    CpuCounter,
    /// tokio's clock, so that paused time (`tokio::time::pause`,
    /// `#[tokio::test(start_paused = true)]`) applies to latency estimates as
    /// it does to tower's `PeakEwma`: for simulations and tests whose
    /// endpoints take their time with `tokio::time::sleep`.
    Tokio,
}

/// Reads the chosen [`LatencyClock`] as nanoseconds since the balancer was
/// built.
#[derive(Debug)]
pub(crate) enum RequestClock {
    CpuCounter { clock: quanta::Clock, epoch: u64 },
    Tokio { epoch: Instant },
}

impl RequestClock {
    pub(crate) fn new(kind: LatencyClock) -> Self {
        match kind {
            // The first `quanta::Clock::new` in a process calibrates the
            // counter (about half a millisecond); later ones reuse it.
            LatencyClock::CpuCounter => {
                let clock = quanta::Clock::new();
                let epoch = clock.raw();
                Self::CpuCounter { clock, epoch }
            }
            LatencyClock::Tokio => Self::Tokio {
                epoch: Instant::now(),
            },
        }
    }

    /// Nanoseconds since the clock was made.
    #[inline]
    pub(crate) fn now_ns(&self) -> u64 {
        match self {
            // 0 rather than a wrapped value if another core's counter is a
            // little behind the epoch's.
            Self::CpuCounter { clock, epoch } => clock.delta_as_nanos(*epoch, clock.raw()),
            Self::Tokio { epoch } => {
                let nanos = Instant::now().saturating_duration_since(*epoch).as_nanos();
                u64::try_from(nanos).unwrap_or(u64::MAX)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_cpu_counter_measures_real_time_in_nanoseconds() {
        let clock = RequestClock::new(LatencyClock::CpuCounter);
        let before = clock.now_ns();
        std::thread::sleep(Duration::from_millis(20));
        let elapsed = clock.now_ns() - before;
        // Generous upper bound: a loaded CI machine may oversleep.
        assert!(
            (19_000_000..2_000_000_000).contains(&elapsed),
            "{elapsed} ns for a 20 ms sleep"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_tokio_clock_follows_paused_time() {
        let clock = RequestClock::new(LatencyClock::Tokio);
        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!(clock.now_ns(), 3_000_000_000);
    }

    #[tokio::test(start_paused = true)]
    async fn the_cpu_counter_ignores_paused_time() {
        let clock = RequestClock::new(LatencyClock::CpuCounter);
        tokio::time::advance(Duration::from_secs(3)).await;
        assert!(clock.now_ns() < 1_000_000_000, "{}", clock.now_ns());
    }
}
