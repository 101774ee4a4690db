//! Drives a contender closed-loop and measures it: requests per second of
//! wall time, and the process's CPU time (user + system, from
//! `getrusage(RUSAGE_SELF)`) per request. The servers run in another
//! process, so that CPU time is the client's alone.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::resource::{getrusage, UsageWho};
use nix::sys::time::TimeValLike;
use tokio::task::JoinSet;

use crate::contenders::Caller;
use crate::server::ServerCpu;
use crate::BoxError;

/// How long the tasks may take to stop once told (a request in flight
/// finishes first); past that, a request hangs.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// How a contender is driven.
#[derive(Clone, Copy, Debug)]
pub enum Mode {
    /// Run for `warmup`, then measure over `measure`.
    Timed { warmup: Duration, measure: Duration },
    /// Send `requests` requests in all, every one of which must succeed,
    /// within `limit`.
    Smoke { requests: u64, limit: Duration },
}

/// One run of one contender.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    /// Requests that succeeded in the measured window (all of them in a
    /// smoke run).
    pub requests: u64,
    pub elapsed: Duration,
    /// The process's CPU time over the window.
    pub cpu: Duration,
    /// The server process's, when it can be read.
    pub server_cpu: Option<Duration>,
    /// The whole machine's busy time over the window (all cores, steal
    /// included), when it can be read: what is left after the client and
    /// the servers is other processes', which skews the run.
    pub machine_cpu: Option<Duration>,
}

impl Sample {
    pub fn per_second(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Client CPU per request, µs.
    pub fn cpu_micros(&self) -> f64 {
        self.cpu.as_secs_f64() * 1e6 / (self.requests.max(1) as f64)
    }

    /// How busy the client's core was, in %: below 100 the client waited
    /// for the servers.
    pub fn client_busy(&self) -> f64 {
        self.cpu.as_secs_f64() / self.elapsed.as_secs_f64().max(1e-9) * 100.0
    }

    /// How busy the servers' core was, in %, if known: near 100 the
    /// servers, not the client, set the rate.
    pub fn server_busy(&self) -> Option<f64> {
        self.server_cpu
            .map(|cpu| cpu.as_secs_f64() / self.elapsed.as_secs_f64().max(1e-9) * 100.0)
    }

    /// How much of a core other processes (and the hypervisor) took over
    /// the window, in %, if known.
    pub fn others_busy(&self) -> Option<f64> {
        let others = self
            .machine_cpu?
            .saturating_sub(self.cpu)
            .saturating_sub(self.server_cpu?);
        Some(others.as_secs_f64() / self.elapsed.as_secs_f64().max(1e-9) * 100.0)
    }
}

/// What the tasks share.
#[derive(Default)]
struct Progress {
    succeeded: AtomicU64,
    failed: AtomicU64,
    first_error: Mutex<Option<String>>,
    stop: AtomicBool,
    /// Requests handed out, in a smoke run.
    claimed: AtomicU64,
}

impl Progress {
    fn failure(&self) -> Option<String> {
        let failed = self.failed.load(Ordering::Relaxed);
        (failed > 0).then(|| {
            let first = self
                .first_error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
                .unwrap_or_default();
            format!("{failed} requests failed; the first: {first}")
        })
    }
}

/// Every clock a sample reads, at one moment.
struct Clocks {
    wall: Instant,
    cpu: Duration,
    server_cpu: Option<Duration>,
    machine_cpu: Option<Duration>,
}

impl Clocks {
    fn read(server_cpu: &impl Fn() -> Option<Duration>) -> Result<Self, BoxError> {
        Ok(Self {
            wall: Instant::now(),
            cpu: cpu_time()?,
            server_cpu: server_cpu(),
            machine_cpu: machine_cpu(),
        })
    }

    /// The sample of `requests` between `start` and these readings.
    fn since(&self, start: &Clocks, requests: u64) -> Sample {
        let between = |start: Option<Duration>, end: Option<Duration>| {
            start.zip(end).map(|(start, end)| end.saturating_sub(start))
        };
        Sample {
            requests,
            elapsed: self.wall - start.wall,
            cpu: self.cpu.saturating_sub(start.cpu),
            server_cpu: between(start.server_cpu, self.server_cpu),
            machine_cpu: between(start.machine_cpu, self.machine_cpu),
        }
    }
}

/// The process's CPU time so far, user + system, all threads.
pub fn cpu_time() -> Result<Duration, BoxError> {
    let usage = getrusage(UsageWho::RUSAGE_SELF).map_err(|e| format!("getrusage failed: {e}"))?;
    let micros = usage.user_time().num_microseconds() + usage.system_time().num_microseconds();
    Ok(Duration::from_micros(u64::try_from(micros).unwrap_or(0)))
}

/// The machine's busy time so far, all cores: user, nice, system, irq,
/// softirq and steal from the first line of `/proc/stat`, in `USER_HZ`
/// (100 a second), or `None` where there is no `/proc/stat`.
fn machine_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|line| line.starts_with("cpu "))?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|field| field.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is
    // already in user).
    let busy = [0, 1, 2, 5, 6, 7]
        .iter()
        .map(|&i| ticks.get(i).copied().unwrap_or(0))
        .sum::<u64>();
    Some(Duration::from_millis(busy * 10))
}

/// Runs `tasks` tasks, each sending requests through its clone of `caller`
/// one after another, as `mode` says.
///
/// # Errors
///
/// When a request failed, a task panicked, or the tasks did not stop in
/// time.
pub async fn drive<C: Caller>(
    caller: C,
    tasks: usize,
    mode: Mode,
    server: ServerCpu,
) -> Result<Sample, BoxError> {
    // The server's CPU time is a hint: missing where /proc is.
    let server_cpu = || server.read().ok();
    let progress = Arc::new(Progress::default());
    let budget = match mode {
        Mode::Smoke { requests, .. } => Some(requests),
        Mode::Timed { .. } => None,
    };
    let mut set = JoinSet::new();
    for _ in 0..tasks {
        let mut caller = caller.clone();
        let progress = progress.clone();
        set.spawn(async move {
            loop {
                if progress.stop.load(Ordering::Relaxed) {
                    break;
                }
                if let Some(budget) = budget {
                    if progress.claimed.fetch_add(1, Ordering::Relaxed) >= budget {
                        break;
                    }
                }
                match caller.call().await {
                    Ok(()) => {
                        progress.succeeded.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        if progress.failed.fetch_add(1, Ordering::Relaxed) == 0 {
                            *progress
                                .first_error
                                .lock()
                                .unwrap_or_else(|e| e.into_inner()) = Some(e.to_string());
                        }
                        // A smoke run stops at the first failure; a timed
                        // one reports them all at its end.
                        if budget.is_some() {
                            break;
                        }
                    }
                }
            }
        });
    }
    drop(caller);

    let sample = match mode {
        Mode::Timed { warmup, measure } => {
            tokio::time::sleep(warmup).await;
            let start = Clocks::read(&server_cpu)?;
            let done_start = progress.succeeded.load(Ordering::Relaxed);
            tokio::time::sleep(measure).await;
            let end = Clocks::read(&server_cpu)?;
            let done_end = progress.succeeded.load(Ordering::Relaxed);
            progress.stop.store(true, Ordering::Relaxed);
            join(&mut set, STOP_TIMEOUT, "stop after the measured window").await?;
            end.since(&start, done_end - done_start)
        }
        Mode::Smoke { requests, limit } => {
            let start = Clocks::read(&server_cpu)?;
            join(&mut set, limit, "send their requests").await?;
            let end = Clocks::read(&server_cpu)?;
            if let Some(failure) = progress.failure() {
                return Err(failure.into());
            }
            let succeeded = progress.succeeded.load(Ordering::Relaxed);
            if succeeded != requests {
                return Err(format!("{succeeded} requests succeeded, expected {requests}").into());
            }
            end.since(&start, succeeded)
        }
    };
    match progress.failure() {
        Some(failure) => Err(failure.into()),
        None => Ok(sample),
    }
}

/// Waits for every task, at most `limit` (the `JoinSet` aborts the rest
/// when dropped).
async fn join(set: &mut JoinSet<()>, limit: Duration, what: &str) -> Result<(), BoxError> {
    let all = async {
        while let Some(joined) = set.join_next().await {
            joined.map_err(|e| format!("a request task failed: {e}"))?;
        }
        Ok::<(), BoxError>(())
    };
    let joined = tokio::time::timeout(limit, all).await;
    match joined {
        Ok(result) => result,
        Err(_) => Err(format!(
            "the tasks did not {what} within {limit:?}: a request hangs ({} still running)",
            set.len()
        )
        .into()),
    }
}

/// The median of `values` (not empty).
pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    }
}
