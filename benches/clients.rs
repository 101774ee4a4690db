//! What the ready-made clients cost on real connections, against what a
//! user would write instead: raw hyper-util, round robin by hand, tower's
//! p2c, the tower-lb `Balancer`, `HttpClient` (HTTP/1.1 and h2); one tonic
//! `Channel`, four round robin by hand, tonic's `balance_list`, and
//! `GrpcChannel`.
//!
//! The servers (four each of HTTP/1.1, h2 and gRPC, hyper and tonic, tiny
//! answers) run in a process of their own: this binary started again with
//! a role in its environment. With two cores or more the servers are
//! pinned to one and the client to another. Each contender is driven
//! closed-loop by 64 tasks; the figures are requests per second and the
//! client process's CPU time (user + system, `getrusage`) per request,
//! medians of interleaved repetitions, each set against the raw round
//! robin of its protocol.
//!
//! `cargo bench --bench clients` measures and prints a markdown table.
//! Settings, from the environment:
//!
//! - `CLIENTS_BENCH_REPS` (5): repetitions; each runs every contender, in
//!   an order rotated by one each time;
//! - `CLIENTS_BENCH_WARMUP_MS` (300) and `CLIENTS_BENCH_MEASURE_MS` (2000):
//!   the warm-up and the measured window of each run;
//! - `CLIENTS_BENCH_TASKS` (64): the closed loop's tasks;
//! - `CLIENTS_BENCH_WORKERS` (0): 0 for a current-thread tokio runtime,
//!   `n` for a multi-thread one with `n` workers;
//! - `CLIENTS_BENCH_MAX_OTHERS` (10): a run during which other processes
//!   (or the hypervisor) took more than this % of a core is run again, at
//!   most twice, and the quietest attempt kept;
//! - `CLIENTS_BENCH_ONLY`: contender ids to run (comma separated, a part
//!   of the id is enough: `h2`, `grpc-channel`);
//! - `CLIENTS_BENCH_SMOKE` (unset): `1` for the smoke run below.
//!
//! Without `--bench` (as `cargo test --all-targets` runs it) it is a smoke
//! run instead: every contender sends a few hundred requests once, each of
//! which must succeed, so that CI proves the plumbing in seconds.

#[path = "clients/contenders.rs"]
mod contenders;
#[path = "clients/measure.rs"]
mod measure;
#[path = "clients/server.rs"]
mod server;

use std::fmt::Write as _;
use std::process::ExitCode;
use std::str::FromStr;
use std::time::Duration;

use contenders::{Contender, Protocol};
use measure::{median, Mode, Sample};
use server::ServerProcess;

/// The error of everything here: a message saying what happened.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Requests per contender in a smoke run, and how long they may take (a
/// debug build on a busy machine).
const SMOKE_REQUESTS: u64 = 300;
const SMOKE_LIMIT: Duration = Duration::from_secs(20);

/// A pause between runs, outside any measured window: the previous
/// contender's connections and background tasks wind down.
const BETWEEN_RUNS: Duration = Duration::from_millis(100);

/// Attempts at a run while other processes keep the machine busy.
const NOISY_ATTEMPTS: usize = 3;

fn main() -> ExitCode {
    if let Ok(core) = std::env::var(server::ROLE_ENV) {
        return match server::run_child(&core) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("clients bench, server process: {e}");
                ExitCode::FAILURE
            }
        };
    }
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("clients bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The settings of a run.
#[derive(Debug)]
struct Config {
    smoke: bool,
    reps: usize,
    warmup: Duration,
    measure: Duration,
    tasks: usize,
    workers: usize,
    /// The share of a core, in %, that other processes may take during a
    /// run before it is run again.
    max_others: f64,
    only: Vec<String>,
}

impl Config {
    fn from_env() -> Result<Self, BoxError> {
        // cargo bench passes --bench; cargo test does not.
        let bench = std::env::args().any(|arg| arg == "--bench");
        let smoke = !bench || env_or("CLIENTS_BENCH_SMOKE", 0u8)? == 1;
        let config = Self {
            smoke,
            reps: env_or("CLIENTS_BENCH_REPS", 5)?,
            warmup: Duration::from_millis(env_or("CLIENTS_BENCH_WARMUP_MS", 300)?),
            measure: Duration::from_millis(env_or("CLIENTS_BENCH_MEASURE_MS", 2000)?),
            tasks: env_or("CLIENTS_BENCH_TASKS", 64)?,
            workers: env_or("CLIENTS_BENCH_WORKERS", 0)?,
            max_others: env_or("CLIENTS_BENCH_MAX_OTHERS", 10.0)?,
            only: std::env::var("CLIENTS_BENCH_ONLY")
                .unwrap_or_default()
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect(),
        };
        if config.reps == 0 || config.tasks == 0 || config.measure.is_zero() {
            return Err(
                "CLIENTS_BENCH_REPS, CLIENTS_BENCH_TASKS and CLIENTS_BENCH_MEASURE_MS must be above 0"
                    .into(),
            );
        }
        Ok(config)
    }

    fn contenders(&self) -> Result<Vec<Contender>, BoxError> {
        let chosen: Vec<_> = Contender::ALL
            .into_iter()
            .filter(|c| {
                self.only.is_empty() || self.only.iter().any(|o| c.id().contains(o.as_str()))
            })
            .collect();
        if chosen.is_empty() {
            let ids: Vec<_> = Contender::ALL.iter().map(|c| c.id()).collect();
            return Err(format!(
                "CLIENTS_BENCH_ONLY={:?} matches no contender; the ids are {}",
                self.only.join(","),
                ids.join(", ")
            )
            .into());
        }
        Ok(chosen)
    }

    fn runtime(&self) -> Result<tokio::runtime::Runtime, BoxError> {
        let mut builder = if self.workers == 0 {
            tokio::runtime::Builder::new_current_thread()
        } else {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(self.workers);
            builder
        };
        builder
            .enable_all()
            .build()
            .map_err(|e| format!("cannot build the client's tokio runtime: {e}").into())
    }

    fn runtime_name(&self) -> String {
        match self.workers {
            0 => "one current-thread tokio runtime (the tasks, the connections' tasks and every background worker share one thread)".to_owned(),
            n => format!("a multi-thread tokio runtime with {n} worker(s)"),
        }
    }
}

/// `name` from the environment, or `default` when unset.
fn env_or<T: FromStr>(name: &str, default: T) -> Result<T, BoxError>
where
    T::Err: std::fmt::Display,
{
    match std::env::var(name) {
        Ok(value) => value
            .trim()
            .parse()
            .map_err(|e| format!("{name}={value:?} is not a valid number: {e}").into()),
        Err(_) => Ok(default),
    }
}

fn run() -> Result<(), BoxError> {
    let config = Config::from_env()?;
    let contenders = config.contenders()?;

    // Servers on the first core, client on the second. The child is
    // started before this process pins itself, so it does not inherit the
    // client's core; it pins itself.
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let (server_core, client_core) = match cores.as_slice() {
        [first, second, ..] => (Some(first.id), Some(second.id)),
        _ => (None, None),
    };
    let mut servers = ServerProcess::spawn(server_core)?;
    let client_pinned =
        client_core.filter(|&id| core_affinity::set_for_current(core_affinity::CoreId { id }));
    let runtime = config.runtime()?;

    let machine = machine(cores.len(), servers.pinned, client_pinned);
    if config.smoke {
        smoke(&config, &contenders, &mut servers, &runtime, &machine)
    } else {
        timed(&config, &contenders, &mut servers, &runtime, &machine)
    }
}

/// Every contender once, a few hundred requests each, all of which must
/// succeed.
fn smoke(
    config: &Config,
    contenders: &[Contender],
    servers: &mut ServerProcess,
    runtime: &tokio::runtime::Runtime,
    machine: &str,
) -> Result<(), BoxError> {
    println!(
        "clients bench, smoke run (no --bench): {SMOKE_REQUESTS} requests per contender, {} tasks; {machine}",
        config.tasks
    );
    for &contender in contenders {
        servers.check_alive()?;
        let mode = Mode::Smoke {
            requests: SMOKE_REQUESTS,
            limit: SMOKE_LIMIT,
        };
        let sample = runtime
            .block_on(contender.run(&servers.ports, servers.cpu(), config.tasks, mode))
            .map_err(|e| format!("{}: {e}", contender.id()))?;
        println!(
            "{:<18} {} requests, all OK, in {:.0} ms",
            contender.id(),
            sample.requests,
            sample.elapsed.as_secs_f64() * 1e3
        );
        runtime.block_on(async { tokio::time::sleep(BETWEEN_RUNS).await });
    }
    Ok(())
}

/// The measurement: every repetition runs every contender, in an order
/// rotated by one each time; then the table.
fn timed(
    config: &Config,
    contenders: &[Contender],
    servers: &mut ServerProcess,
    runtime: &tokio::runtime::Runtime,
    machine: &str,
) -> Result<(), BoxError> {
    println!(
        "clients bench: {} repetitions, interleaved; each run {} ms warm-up + {} ms measured; {} tasks, closed loop",
        config.reps,
        config.warmup.as_millis(),
        config.measure.as_millis(),
        config.tasks
    );
    println!("{machine}");
    println!("client: {}", config.runtime_name());
    println!();

    let mode = Mode::Timed {
        warmup: config.warmup,
        measure: config.measure,
    };
    // Each contender's samples, with the repetition each came from.
    let mut samples: Vec<Vec<(usize, Sample)>> = vec![Vec::new(); contenders.len()];
    let mut failures = Vec::new();
    for rep in 0..config.reps {
        for turn in 0..contenders.len() {
            let index = (turn + rep) % contenders.len();
            let contender = contenders[index];
            // A run during which other processes took more than
            // `max_others` % of a core is run again (twice at most), and
            // the quietest attempt kept: on a shared machine their work
            // lands on the client's or the servers' core.
            let mut kept: Option<Sample> = None;
            for attempt in 1..=NOISY_ATTEMPTS {
                servers.check_alive()?;
                let run = contender.run(&servers.ports, servers.cpu(), config.tasks, mode);
                let sample = match runtime.block_on(run) {
                    Ok(sample) => sample,
                    Err(e) => {
                        eprintln!(
                            "repetition {}/{} {}: {e}",
                            rep + 1,
                            config.reps,
                            contender.id()
                        );
                        failures.push(format!("{} (repetition {}): {e}", contender.id(), rep + 1));
                        break;
                    }
                };
                let others = sample.others_busy().unwrap_or(0.0);
                eprintln!(
                    "repetition {}/{} {:<18} {:>9} req/s {:>7.2} µs CPU/request; busy: client {:.0} %, servers {}, others {}{}",
                    rep + 1,
                    config.reps,
                    contender.id(),
                    thousands(sample.per_second()),
                    sample.cpu_micros(),
                    sample.client_busy(),
                    percent(sample.server_busy()),
                    percent(sample.others_busy()),
                    if others > config.max_others && attempt < NOISY_ATTEMPTS {
                        ": too noisy, again"
                    } else {
                        ""
                    },
                );
                if kept.is_none_or(|kept| kept.others_busy().unwrap_or(0.0) > others) {
                    kept = Some(sample);
                }
                runtime.block_on(async { tokio::time::sleep(BETWEEN_RUNS).await });
                if others <= config.max_others {
                    break;
                }
            }
            if let Some(sample) = kept {
                samples[index].push((rep, sample));
            }
        }
    }
    println!("{}", table(contenders, &samples));
    println!(
        "Medians of {} interleaved runs. Run for run: the median of the contender's throughput over its baseline's in the same repetition \
         (a few seconds apart; this sets aside a machine that drifts between repetitions), and their lowest and highest. \
         Client CPU: user + system time of the client process (getrusage), servers excluded. \
         Busy: % of one core over the measured window, taken by the client process / the server process / everything else on the machine. \
         Spread: (highest - lowest req/s) / median.",
        config.reps
    );
    if failures.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} runs failed:\n  {}",
            failures.len(),
            failures.join("\n  ")
        )
        .into())
    }
}

/// The machine facts the figures depend on.
fn machine(cores: usize, server_pinned: Option<usize>, client_pinned: Option<usize>) -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split_once(':'))
                .map(|(_, model)| model.trim().to_owned())
        })
        .unwrap_or_else(|| "CPU model unknown".to_owned());
    let pinning = match (server_pinned, client_pinned) {
        (Some(server), Some(client)) => {
            format!("servers pinned to core {server}, client to core {client}")
        }
        (server, client) => format!(
            "not pinned ({} core(s) usable; servers {}, client {})",
            cores,
            server.map_or("unpinned".to_owned(), |c| format!("on core {c}")),
            client.map_or("unpinned".to_owned(), |c| format!("on core {c}")),
        ),
    };
    format!("machine: {cores} core(s) usable, {model}; servers in a separate process; {pinning}")
}

/// Medians per contender, against the raw round robin of its protocol, as
/// a markdown table.
fn table(contenders: &[Contender], samples: &[Vec<(usize, Sample)>]) -> String {
    struct Row<'a> {
        contender: Contender,
        samples: &'a [(usize, Sample)],
        rate: f64,
        cpu: f64,
        spread: f64,
        client_busy: f64,
        server_busy: Option<f64>,
        others_busy: Option<f64>,
    }
    let rows: Vec<Row> = contenders
        .iter()
        .zip(samples)
        .filter(|(_, samples)| !samples.is_empty())
        .map(|(contender, samples)| {
            let of = |f: fn(&Sample) -> f64| samples.iter().map(|(_, s)| f(s)).collect::<Vec<_>>();
            let busy = |f: fn(&Sample) -> Option<f64>| {
                samples
                    .iter()
                    .map(|(_, s)| f(s))
                    .collect::<Option<Vec<_>>>()
                    .map(|busy| median(&busy))
            };
            let rates = of(Sample::per_second);
            let rate = median(&rates);
            let (low, high) = rates
                .iter()
                .fold((f64::INFINITY, 0.0f64), |(low, high), &r| {
                    (low.min(r), high.max(r))
                });
            Row {
                contender: *contender,
                samples,
                rate,
                cpu: median(&of(Sample::cpu_micros)),
                spread: (high - low) / rate.max(1e-9) * 100.0,
                client_busy: median(&of(Sample::client_busy)),
                server_busy: busy(Sample::server_busy),
                others_busy: busy(Sample::others_busy),
            }
        })
        .collect();
    let baseline = |protocol: Protocol| {
        rows.iter()
            .find(|row| row.contender.protocol() == protocol && row.contender.is_baseline())
    };
    let mut out = String::from(
        "| protocol | contender | req/s | throughput vs raw round robin | run for run | client CPU per request | CPU vs raw round robin | busy: client / servers / others | req/s spread (runs) |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    for row in &rows {
        let (ratio, paired, diff) = match baseline(row.contender.protocol()) {
            _ if row.contender.is_baseline() => (
                "1.00x (baseline)".to_owned(),
                "–".to_owned(),
                "baseline".to_owned(),
            ),
            Some(base) => (
                format!("{:.2}x", row.rate / base.rate),
                run_for_run(row.samples, base.samples),
                format!("{:+.2} µs", row.cpu - base.cpu),
            ),
            None => ("–".to_owned(), "–".to_owned(), "–".to_owned()),
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {:.2} µs | {} | {:.0} / {} / {} % | {:.0} % ({}) |",
            row.contender.protocol().name(),
            row.contender.label(),
            thousands(row.rate),
            ratio,
            paired,
            row.cpu,
            diff,
            row.client_busy,
            whole(row.server_busy),
            whole(row.others_busy),
            row.spread,
            row.samples.len()
        );
    }
    out
}

/// The median of `samples`' throughput over `baseline`'s in the same
/// repetition, and the lowest and highest of those ratios: `1.01x (0.81 –
/// 1.10)`.
fn run_for_run(samples: &[(usize, Sample)], baseline: &[(usize, Sample)]) -> String {
    let ratios: Vec<f64> = samples
        .iter()
        .filter_map(|(rep, sample)| {
            let (_, base) = baseline.iter().find(|(r, _)| r == rep)?;
            Some(sample.per_second() / base.per_second().max(1e-9))
        })
        .collect();
    if ratios.is_empty() {
        return "–".to_owned();
    }
    let (low, high) = ratios
        .iter()
        .fold((f64::INFINITY, 0.0f64), |(low, high), &r| {
            (low.min(r), high.max(r))
        });
    format!("{:.2}x ({low:.2} – {high:.2})", median(&ratios))
}

/// `Some(97.4)` as `97 %`, `None` as `?`.
fn percent(value: Option<f64>) -> String {
    value.map_or_else(|| "?".to_owned(), |value| format!("{value:.0} %"))
}

/// `Some(97.4)` as `97`, `None` as `?`.
fn whole(value: Option<f64>) -> String {
    value.map_or_else(|| "?".to_owned(), |value| format!("{value:.0}"))
}

/// `63394.2` as `63,394`.
fn thousands(value: f64) -> String {
    let digits = format!("{:.0}", value.max(0.0));
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(digit);
    }
    out
}
