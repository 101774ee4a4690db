//! The strategy shootout: every balancing strategy tower-lb has, and tower's
//! own p2c as the baseline, on the same request stream against the same
//! backends, scenario by scenario.
//!
//!     cargo run --release --example shootout -- --quick        # all scenarios, simulated, seconds
//!     cargo run --release --example shootout -- --sim          # simulated, 10 s of virtual time each
//!     cargo run --release --example shootout                   # real hyper servers on 127.0.0.1
//!     cargo run --release --example shootout -- --scenario slow-node --strategy round-robin,p2c-peak-ewma
//!
//! It prints a table per scenario and writes `target/shootout/report.html`
//! (tables and latency-by-percentile plots).

mod backend;
mod contender;
mod fleet;
mod report;
mod run;
mod scenario;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};

use contender::Contender;
use run::Load;
#[cfg(test)]
use run::RunResult;
use scenario::Scenario;

/// Compare load-balancing strategies on local backends.
#[derive(Debug, Parser)]
#[command(name = "shootout")]
struct Args {
    /// Run one scenario (baseline, slow-node, heterogeneous, failing-node,
    /// gc-pause, capacity, heavy-tail, scale-up, rolling-restart, blackhole,
    /// cluster, cluster-slow-node, cluster-gc-pause, zones, cache, overload, overload-3x, fleet);
    /// default: all. `fleet` (200 clients, each a balancer of its own, over
    /// 100 backends, with and without subsetting) always runs simulated.
    #[arg(long)]
    scenario: Option<String>,
    /// Contenders to run, comma separated (round-robin, p2c-least-requests,
    /// p2c-peak-ewma, tower-p2c-peak-ewma, and the tower-lb ones with outlier
    /// detection: round-robin+od, p2c-least-req+od, p2c-peak-ewma+od; and
    /// Peak EWMA under retries and hedging: p2c-peak-ewma+retry,
    /// ewma+od+retry, ewma+od+retry+hedge, ewma+od+retry+check,
    /// ewma+od+retry+zone, ewma+od+retry+throttle; round-robin+hedge;
    /// weighted-round-robin; and
    /// the hashing ones: ring-hash, ring-hash-bounded); default: all.
    #[arg(long, value_delimiter = ',')]
    strategy: Vec<String>,
    /// Deterministic mode: simulated backends on virtual time.
    #[arg(long)]
    sim: bool,
    /// All scenarios, deterministic mode, 5 s of virtual time each.
    #[arg(long)]
    quick: bool,
    /// Seconds of load per run (default: 10 simulated, 5 real).
    #[arg(long)]
    duration: Option<f64>,
    /// Requests per second offered (open loop).
    #[arg(long, default_value_t = 2000.0)]
    rate: f64,
    /// Seed of every random choice (arrivals, backends, strategies).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Where to write report.html.
    #[arg(long, default_value = "target/shootout")]
    out: PathBuf,
}

fn main() -> ExitCode {
    // `RUST_LOG=tower_lb=info` shows what the balancers decide (ejections,
    // say); nothing by default.
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    match shootout(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("shootout: {}", tower_lb::error::report(&*error));
            ExitCode::FAILURE
        }
    }
}

fn shootout(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let (scenarios, fleet): (Vec<Scenario>, bool) = match &args.scenario {
        Some(name) if !args.quick && name == "fleet" => (Vec::new(), true),
        Some(name) if !args.quick => (
            vec![scenario::by_name(name).ok_or_else(|| {
                let known: Vec<_> = scenario::all().iter().map(|s| s.name).collect();
                format!(
                    "unknown scenario {name:?}; known: {}, fleet",
                    known.join(", ")
                )
            })?],
            false,
        ),
        _ => (scenario::all(), true),
    };
    let contenders: Vec<Contender> = if args.strategy.is_empty() {
        Contender::ALL.to_vec()
    } else {
        args.strategy
            .iter()
            .map(|name| {
                Contender::by_name(name).ok_or_else(|| {
                    let known: Vec<_> = Contender::ALL.iter().map(|c| c.name()).collect();
                    format!("unknown strategy {name:?}; known: {}", known.join(", "))
                })
            })
            .collect::<Result<_, _>>()?
    };
    let simulated = args.sim || args.quick;
    let seconds = match (args.duration, args.quick, simulated) {
        (Some(s), _, _) => s,
        (None, true, _) => 5.0,
        (None, false, true) => 10.0,
        (None, false, false) => 5.0,
    };
    if !(seconds > 0.0 && seconds.is_finite() && args.rate > 0.0 && args.rate.is_finite()) {
        return Err("--duration and --rate must be positive numbers".into());
    }
    let load = Load {
        rate: args.rate,
        duration: Duration::from_secs_f64(seconds),
        seed: args.seed,
    };
    let mode = if simulated {
        "simulated, virtual time"
    } else {
        "real hyper servers on 127.0.0.1"
    };
    println!(
        "shootout: {} scenarios x {} contenders{}, {mode}, {} req/s (the cluster scenarios: their own) for {seconds} s each, seed {}",
        scenarios.len(),
        contenders.len(),
        if fleet { ", and the fleet (simulated)" } else { "" },
        args.rate,
        args.seed
    );

    let progress = ProgressBar::new((scenarios.len() * contenders.len()) as u64).with_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} [{elapsed}]")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let runtime = if simulated {
        None
    } else {
        Some(
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?,
        )
    };
    let mut all = Vec::new();
    for scenario in scenarios {
        let mut results = Vec::new();
        for &contender in &contenders {
            progress.set_message(format!("{} / {}", scenario.name, contender.name()));
            // The cluster scenarios offer their own rate.
            let load = Load {
                rate: scenario.rate.unwrap_or(load.rate),
                ..load
            };
            let result = match &runtime {
                None => run::simulate(&scenario, contender, load),
                Some(runtime) => runtime.block_on(run::real(&scenario, contender, load))?,
            };
            results.push(result);
            progress.inc(1);
        }
        progress.suspend(|| print!("{}", report::table(&scenario, &results)));
        all.push((scenario, results));
    }
    progress.finish_and_clear();
    let fleet_table = fleet.then(|| {
        let load = Load {
            rate: fleet::rate(),
            duration: args
                .duration
                .map_or(fleet::DEFAULT_DURATION, Duration::from_secs_f64),
            ..load
        };
        let results: Vec<_> = fleet::FleetContender::ALL
            .into_iter()
            .map(|contender| fleet::simulate(contender, load))
            .collect();
        let table = fleet::table(&results);
        print!("{table}");
        table
    });

    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let path = args.out.join("report.html");
    report::write_html(&path, &command, &all, fleet_table.as_deref())?;
    println!("\nreport: {}", path.display());
    Ok(())
}

/// Runs every contender on one scenario in deterministic mode.
#[cfg(test)]
fn simulate_all(name: &str, load: Load) -> Vec<RunResult> {
    let scenario = scenario::by_name(name).expect("known scenario");
    Contender::ALL
        .into_iter()
        .map(|c| run::simulate(&scenario, c, load))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn short(seed: u64) -> Load {
        Load {
            rate: 1000.0,
            duration: Duration::from_secs(3),
            seed,
        }
    }

    fn fingerprint(results: &[RunResult]) -> Vec<(u64, u64, Vec<u64>, Vec<u64>)> {
        results
            .iter()
            .map(|r| {
                let quantiles = [0.5, 0.9, 0.99, 0.999]
                    .iter()
                    .map(|&q| r.latency_us.value_at_quantile(q))
                    .collect();
                (r.ok, r.failed, quantiles, r.hits.clone())
            })
            .collect()
    }

    #[test]
    fn same_seed_gives_the_same_numbers_in_deterministic_mode() {
        let first = simulate_all("heavy-tail", short(7));
        let second = simulate_all("heavy-tail", short(7));
        assert_eq!(fingerprint(&first), fingerprint(&second));
        let other = simulate_all("heavy-tail", short(8));
        assert_ne!(fingerprint(&first), fingerprint(&other), "the seed matters");
    }

    #[test]
    fn in_a_rolling_restart_active_checks_keep_most_attempts_off_the_restarting_backends() {
        let scenario = scenario::by_name("rolling-restart").expect("known scenario");
        let load = Load {
            rate: 1000.0,
            duration: Duration::from_secs(5),
            seed: 3,
        };
        let without = run::simulate(&scenario, Contender::P2cPeakEwmaOutliersRetry, load);
        let with = run::simulate(&scenario, Contender::P2cPeakEwmaOutliersRetryCheck, load);
        let to_down = |r: &RunResult| r.hits_while_down.iter().sum::<u64>();
        assert_eq!(with.failed, 0);
        assert!(
            to_down(&with) * 3 < to_down(&without),
            "to down backends: {} with checks, {} without",
            to_down(&with),
            to_down(&without)
        );
        // Without retries every attempt to a restarting backend fails.
        let bare = run::simulate(&scenario, Contender::P2cPeakEwma, load);
        assert_eq!(bare.failed, to_down(&bare));
        assert!(bare.failed > 0);
    }

    #[test]
    fn a_black_holed_backend_stops_getting_requests_and_its_hung_ones_are_counted_failed() {
        let scenario = scenario::by_name("blackhole").expect("known scenario");
        let load = short(5);
        let bare = run::simulate(&scenario, Contender::RoundRobin, load);
        // Round robin keeps sending it its turn; nothing ends those calls.
        assert_eq!(bare.failed, bare.hits_while_down[0]);
        assert!(bare.failed > 100);
        let checked = run::simulate(&scenario, Contender::P2cPeakEwmaOutliersRetryCheck, load);
        assert_eq!(checked.failed, 0);
        assert!(
            checked.hits_while_down[0] < 20,
            "{:?}",
            checked.hits_while_down
        );
    }

    #[test]
    fn zone_aware_routing_keeps_a_healthy_zone_local_and_spills_after_its_loss() {
        let scenario = scenario::by_name("zones").expect("known scenario");
        let load = Load {
            rate: 1000.0,
            duration: Duration::from_secs(4),
            seed: 1,
        };
        let blind = run::simulate(&scenario, Contender::P2cPeakEwmaOutliersRetry, load);
        let aware = run::simulate(&scenario, Contender::P2cPeakEwmaOutliersRetryZone, load);
        let [healthy, lost] = aware.cross_zone_shares(&scenario);
        assert!(healthy < 0.05, "{healthy} cross-zone while zone a is whole");
        assert!(lost > 0.3, "{lost} cross-zone after zone a lost two thirds");
        assert_eq!(aware.failed, 0);
        // Zone-blind P2C sends two thirds of everything across zones.
        assert!(blind.cross_zone_shares(&scenario)[0] > 0.5);
    }

    #[test]
    fn same_seed_gives_the_same_numbers_with_retries_and_hedges_on() {
        // Every 503 from the failing backend is retried after a jittered
        // backoff: the jitter must come from the seed too.
        let scenario = scenario::by_name("failing-node").expect("known scenario");
        let retrying = [
            Contender::P2cPeakEwmaRetry,
            Contender::P2cPeakEwmaOutliersRetry,
            Contender::P2cPeakEwmaOutliersHedge,
            Contender::RoundRobinHedge,
        ];
        let run = |seed| {
            retrying
                .iter()
                .map(|&c| run::simulate(&scenario, c, short(seed)))
                .collect::<Vec<_>>()
        };
        let first = run(7);
        assert_eq!(fingerprint(&first), fingerprint(&run(7)));
        assert_ne!(
            fingerprint(&first),
            fingerprint(&run(8)),
            "the seed matters"
        );
    }

    #[test]
    fn open_loop_offers_the_configured_rate_whatever_the_answers() {
        let results = simulate_all("slow-node", short(1));
        for r in &results {
            // 1000 req/s for 3 s, Poisson: within 10 % of 3000.
            assert!(
                (2700..=3300).contains(&r.requests()),
                "{}: {}",
                r.contender.name(),
                r.requests()
            );
        }
        let counts: Vec<u64> = results.iter().map(RunResult::requests).collect();
        assert!(
            counts.windows(2).all(|w| w[0] == w[1]),
            "identical request stream: {counts:?}"
        );
    }

    #[test]
    fn peak_ewma_has_a_lower_p99_than_round_robin_on_slow_node() {
        let results = simulate_all("slow-node", short(1));
        let p99 = |c: Contender| {
            results
                .iter()
                .find(|r| r.contender == c)
                .map(|r| r.latency_ms(0.99))
                .expect("ran")
        };
        let (rr, ewma) = (p99(Contender::RoundRobin), p99(Contender::P2cPeakEwma));
        assert!(
            ewma < rr,
            "p2c-peak-ewma p99 {ewma} ms vs round-robin {rr} ms"
        );
    }

    #[test]
    fn failing_backend_lowers_the_success_rate_and_latency_counts_successes_only() {
        let results = simulate_all("failing-node", short(1));
        let rr = &results[0];
        assert_eq!(rr.contender, Contender::RoundRobin);
        // Round robin sends 1/8 of requests to the backend that always fails.
        assert!(
            (rr.success_rate() - 0.875).abs() < 0.01,
            "{}",
            rr.success_rate()
        );
        assert!(
            rr.latency_ms(0.0) >= 5.0,
            "a 1 ms 503 is not a successful latency"
        );
    }

    #[test]
    fn outlier_detection_ejects_the_failing_backend_after_five_requests() {
        let results = simulate_all("failing-node", short(1));
        for r in &results {
            let failing = r.ejections[0];
            match r.contender {
                Contender::RoundRobinOutliers
                | Contender::P2cLeastRequestsOutliers
                | Contender::P2cPeakEwmaOutliers
                | Contender::P2cPeakEwmaOutliersRetry
                | Contender::P2cPeakEwmaOutliersHedge
                | Contender::P2cPeakEwmaOutliersRetryCheck
                | Contender::P2cPeakEwmaOutliersRetryZone
                | Contender::P2cPeakEwmaOutliersRetryThrottle => {
                    assert_eq!(failing.sent_before_first, Some(5), "{}", r.contender.name());
                    assert_eq!(r.hits[0], 5, "{}", r.contender.name());
                    assert!(r.success_rate() > 0.99, "{}", r.contender.name());
                }
                // Without detection, tower-lb's P2C weighs the failures
                // into the backend's cost and sends it little (the hashing
                // contenders send requests without a key by P2C); tower's
                // p2c prefers it (it answers fast), round robin its eighth.
                Contender::P2cLeastRequests
                | Contender::P2cPeakEwma
                | Contender::P2cPeakEwmaRetry
                | Contender::RingHash
                | Contender::RingHashBounded
                | Contender::RingHashLooseBound => {
                    assert_eq!(failing.count, 0, "{}", r.contender.name());
                    let share = r.hits[0] as f64 / r.hits.iter().sum::<u64>() as f64;
                    assert!(share < 0.06, "{}: {share}", r.contender.name());
                }
                _ => {
                    assert_eq!(failing.count, 0, "{}", r.contender.name());
                    assert!(r.hits[0] > 300, "{}", r.contender.name());
                }
            }
            let healthy_ejected = r.ejections[1..].iter().any(|e| e.count > 0);
            assert!(
                !healthy_ejected,
                "{} ejected a healthy backend",
                r.contender.name()
            );
        }
    }

    #[test]
    fn hashing_keeps_keys_in_warm_caches_and_the_bound_evens_the_work() {
        // The scenario's own rate (8,000 req/s), over 3 s.
        let scenario = scenario::by_name("cache").expect("known scenario");
        let load = Load {
            rate: scenario.rate.unwrap_or(1000.0),
            ..short(1)
        };
        let run = |c| run::simulate(&scenario, c, load);
        let (p2c, ring, bounded, loose) = (
            run(Contender::P2cLeastRequests),
            run(Contender::RingHash),
            run(Contender::RingHashBounded),
            run(Contender::RingHashLooseBound),
        );
        // Every backend sees every key under P2C; a ring splits them.
        assert!(p2c.cache_hit_rate() < 0.6, "{}", p2c.cache_hit_rate());
        assert!(ring.cache_hit_rate() > 0.75, "{}", ring.cache_hit_rate());
        assert!(bounded.cache_hit_rate() > p2c.cache_hit_rate() + 0.1);
        // Hot keys pile onto their backends on the plain ring; the bound
        // evens the work out, and the warm caches beat P2C's tail.
        let even = |r: &RunResult| r.max_over_mean_load().expect("capacities");
        assert!(even(&bounded) <= 1.25, "{}", even(&bounded));
        assert!(
            even(&bounded) < even(&ring),
            "{} {}",
            even(&bounded),
            even(&ring)
        );
        assert!(ring.max_over_mean_requests() > bounded.max_over_mean_requests());
        assert!(bounded.latency_ms(0.99) < p2c.latency_ms(0.99));
        assert_eq!(bounded.failed + ring.failed + p2c.failed, 0);
        // A looser bound spills fewer keys: more hits than the default's,
        // and issue 21's targets (0.9x the plain ring's hit rate, the
        // busiest backend within 1.25x the mean, p99 below P2C's).
        let hits = |r: &RunResult| r.cache_hit_rate();
        assert!(
            hits(&loose) > hits(&bounded),
            "{} {}",
            hits(&loose),
            hits(&bounded)
        );
        assert!(
            hits(&loose) >= 0.9 * hits(&ring),
            "{} {}",
            hits(&loose),
            hits(&ring)
        );
        assert!(even(&loose) <= 1.25, "{}", even(&loose));
        assert!(loose.latency_ms(0.99) < p2c.latency_ms(0.99));
        assert_eq!(loose.failed, 0);
    }

    #[test]
    fn an_aperture_cuts_connections_by_90_percent_and_loads_every_backend_alike() {
        use fleet::{FleetContender, Subsetting};
        let load = Load {
            rate: fleet::rate(),
            duration: Duration::from_secs(4),
            seed: 1,
        };
        let run = |subsetting| {
            fleet::simulate(
                FleetContender {
                    strategy: Contender::P2cLeastRequests,
                    subsetting,
                },
                load,
            )
        };
        let (all, aperture, random) = (
            run(Subsetting::None),
            run(Subsetting::Aperture),
            run(Subsetting::Random),
        );
        assert_eq!(all.total_connections(), fleet::CLIENTS * fleet::BACKENDS);
        assert_eq!(aperture.total_connections(), all.total_connections() / 10);
        // 200 apertures of 10 over 100 backends: 20 clients each, exactly;
        // random subsets of 10 overlap at random.
        assert!(aperture.connections.iter().all(|&n| n == 20));
        assert!(random.connections.iter().any(|&n| n >= 25));
        assert!(
            aperture.max_over_mean_load() < 1.15,
            "{}",
            aperture.max_over_mean_load()
        );
        assert!(random.max_over_mean_load() > aperture.max_over_mean_load());
        // Ten of 100 backends replaced: 4,000 pairs end or begin when every
        // client holds every backend; an aperture moves a few more than
        // its own 400.
        assert_eq!((all.moved, all.forced), (4_000, 4_000));
        assert!(
            aperture.forced > 0 && aperture.moved < 1_000,
            "{}",
            aperture.moved
        );
        for r in [&all, &aperture, &random] {
            assert_eq!(r.failed, 0);
        }
    }

    /// The scenario's own rate, for 4 s, seed 1.
    fn overloaded(name: &str, contender: Contender) -> RunResult {
        let scenario = scenario::by_name(name).expect("known scenario");
        let load = Load {
            rate: scenario.rate.unwrap_or(1000.0),
            duration: Duration::from_secs(4),
            seed: 1,
        };
        run::simulate(&scenario, contender, load)
    }

    #[test]
    fn at_three_times_the_capacity_adaptive_throttling_sends_less_and_serves_more() {
        let without = overloaded("overload-3x", Contender::P2cPeakEwmaOutliersRetry);
        let with = overloaded("overload-3x", Contender::P2cPeakEwmaOutliersRetryThrottle);
        assert!(
            with.attempts() * 4 < without.attempts() * 3,
            "{} against {} attempts",
            with.attempts(),
            without.attempts()
        );
        assert!(
            with.throughput() > without.throughput() * 1.1,
            "goodput {} against {}",
            with.throughput(),
            without.throughput()
        );
    }

    #[test]
    fn an_overloaded_fleet_keeps_every_backend_in_service_under_outlier_detection() {
        let bare = overloaded("overload", Contender::P2cPeakEwma);
        let detecting = overloaded("overload", Contender::P2cPeakEwmaOutliers);
        // Every backend sheds: none is an outlier for long (one may be
        // ejected for a second at the start, and the ejection withdrawn).
        assert!(
            detecting.throughput() > bare.throughput() * 0.97,
            "goodput {} against {}",
            detecting.throughput(),
            bare.throughput()
        );
        // Out for a second of the four at most (ejected for 30 s and never
        // taken back, it would get nearly nothing).
        let least = detecting.hits.iter().min().copied().unwrap_or(0) as f64;
        let mean = detecting.attempts() as f64 / detecting.hits.len() as f64;
        assert!(least > mean * 0.7, "{:?}", detecting.hits);
    }

    #[test]
    fn retries_stay_within_the_budget_and_with_ejection_hide_the_failing_backend() {
        let results = simulate_all("failing-node", short(1));
        let success = |c: Contender| {
            results
                .iter()
                .find(|r| r.contender == c)
                .map(RunResult::success_rate)
                .expect("ran")
        };
        for r in &results {
            let name = r.contender.name();
            match r.contender {
                Contender::P2cPeakEwmaOutliersRetry
                | Contender::P2cPeakEwmaOutliersHedge
                | Contender::P2cPeakEwmaOutliersRetryCheck
                | Contender::P2cPeakEwmaOutliersRetryZone
                | Contender::P2cPeakEwmaOutliersRetryThrottle => {
                    assert_eq!(r.failed, 0, "{name} failed requests");
                }
                Contender::P2cPeakEwmaRetry | Contender::RoundRobinHedge => {
                    // 20 % of the requests plus the floor of 10 a second
                    // over the 10 s window.
                    let allowed = 1.2 + 100.0 / r.requests() as f64;
                    assert!(
                        r.amplification() <= allowed,
                        "{name}: {}",
                        r.amplification()
                    );
                }
                _ => assert!((r.amplification() - 1.0).abs() < 1e-9, "{name}"),
            }
        }
        assert!(success(Contender::P2cPeakEwmaRetry) > success(Contender::P2cPeakEwma));
    }

    #[test]
    fn after_a_scale_up_every_new_backend_gets_its_share_within_a_second() {
        let scenario = scenario::by_name("scale-up").expect("known scenario");
        let load = Load {
            rate: 2000.0,
            duration: Duration::from_secs(4),
            seed: 1,
        };
        for contender in [Contender::P2cPeakEwma, Contender::P2cPeakEwmaOutliersRetry] {
            let result = run::simulate(&scenario, contender, load);
            let scale_up = result.scale_up(scenario.late).expect("late backends");
            for (i, reach) in scale_up.reach.iter().enumerate() {
                assert!(
                    reach.is_some_and(|t| t <= Duration::from_secs(1)),
                    "{}: new backend {i} reached 0.8x an old one's share after {reach:?}: {scale_up:?}",
                    contender.name()
                );
            }
        }
    }

    #[test]
    fn the_plot_draws_every_contender_and_names_the_highlighted_ones() {
        let scenario = scenario::by_name("baseline").expect("known");
        let results = simulate_all("baseline", short(1));
        let svg = report::plot(&scenario, &results).expect("plot");
        // A curve per contender, and a legend line per highlighted one
        // and for the grey rest.
        let lines = svg.matches("<polyline").count();
        assert!(lines > Contender::ALL.len(), "{lines} lines");
        let named: Vec<&str> = Contender::ALL
            .iter()
            .map(|c| c.name())
            .filter(|name| svg.lines().any(|line| line.trim() == *name))
            .collect();
        assert!((3..=6).contains(&named.len()), "named: {named:?}");
        assert!(svg.contains(&format!("{} others", Contender::ALL.len() - named.len())));
        let table = report::table(&scenario, &results);
        for c in Contender::ALL {
            assert!(
                table.contains(c.name()),
                "{} missing from the table",
                c.name()
            );
        }
    }
}
