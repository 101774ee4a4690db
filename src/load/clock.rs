//! The clock that times requests for the latency estimates.

use tokio::time::Instant;

/// Which clock times requests for the Peak-EWMA latency estimates (see
/// [`Builder::latency_clock`](crate::balance::Builder::latency_clock)).
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
    /// for `Instant::now()`. It keeps real time: `tokio::time::pause` does
    /// not stop it.
    ///
    /// Where the CPU has no usable counter, quanta uses the OS's monotonic
    /// clock; so does this clock on Linux when the kernel does not time
    /// itself with the TSC (it marks the TSC unreliable on some virtual
    /// machines, or after a live migration). The first balancer built in a
    /// process calibrates the counter against the OS clock, which takes
    /// about half a millisecond (quanta allows up to 200 ms on a noisy
    /// machine).
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
    CpuCounter {
        clock: quanta::Clock,
        epoch: u64,
    },
    /// `CpuCounter` where the kernel does not trust the TSC.
    Monotonic {
        epoch: std::time::Instant,
    },
    Tokio {
        epoch: Instant,
    },
}

impl RequestClock {
    pub(crate) fn new(kind: LatencyClock) -> Self {
        match kind {
            // The first `quanta::Clock::new` in a process calibrates the
            // counter (about half a millisecond); later ones reuse it.
            LatencyClock::CpuCounter if kernel_distrusts_tsc() => Self::Monotonic {
                epoch: std::time::Instant::now(),
            },
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
            Self::Monotonic { epoch } => nanos(epoch.elapsed()),
            Self::Tokio { epoch } => nanos(Instant::now().saturating_duration_since(*epoch)),
        }
    }
}

fn nanos(elapsed: std::time::Duration) -> u64 {
    u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX)
}

/// True on x86-64 Linux when the kernel times itself with another
/// clocksource than the TSC: quanta trusts the CPU's flags alone, the kernel
/// also how the TSC has behaved since boot. Elsewhere, or when the file
/// cannot be read, quanta's own check stands.
fn kernel_distrusts_tsc() -> bool {
    if !cfg!(all(target_os = "linux", target_arch = "x86_64")) {
        return false;
    }
    let current =
        std::fs::read_to_string("/sys/devices/system/clocksource/clocksource0/current_clocksource");
    distrusts_tsc(current.ok().as_deref())
}

fn distrusts_tsc(current_clocksource: Option<&str>) -> bool {
    current_clocksource.is_some_and(|current| current.trim() != "tsc")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// The counter itself, whatever the kernel here uses (`new` would fall
    /// back to the OS clock on a kernel that does not trust the TSC).
    fn cpu_counter() -> RequestClock {
        let clock = quanta::Clock::new();
        let epoch = clock.raw();
        RequestClock::CpuCounter { clock, epoch }
    }

    #[test]
    fn the_cpu_counter_measures_real_time_in_nanoseconds() {
        let clock = cpu_counter();
        let before = clock.now_ns();
        std::thread::sleep(Duration::from_millis(20));
        // Saturating: another core's counter may be a few cycles behind.
        let elapsed = clock.now_ns().saturating_sub(before);
        // Generous upper bound: a loaded CI machine may oversleep.
        assert!(
            (19_000_000..2_000_000_000).contains(&elapsed),
            "{elapsed} ns for a 20 ms sleep"
        );
    }

    #[test]
    fn a_kernel_on_another_clocksource_than_the_tsc_means_the_os_clock() {
        assert!(distrusts_tsc(Some("kvm-clock\n")));
        assert!(distrusts_tsc(Some("hpet\n")));
        assert!(!distrusts_tsc(Some("tsc\n")));
        assert!(!distrusts_tsc(None), "no sysfs: quanta's own check");
    }

    #[test]
    fn the_os_clock_fallback_measures_real_time_in_nanoseconds() {
        let clock = RequestClock::Monotonic {
            epoch: std::time::Instant::now(),
        };
        std::thread::sleep(Duration::from_millis(20));
        let elapsed = clock.now_ns();
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
        let clock = cpu_counter();
        tokio::time::advance(Duration::from_secs(3)).await;
        assert!(clock.now_ns() < 1_000_000_000, "{}", clock.now_ns());
    }
}
