//! Output: a table per scenario on the terminal, and a self-contained HTML
//! report with a latency-by-percentile plot per scenario.

use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;

use crate::contender::Contender;
use crate::run::RunResult;
use crate::scenario::{Scenario, CLIENT_ZONE};

/// Quantiles shown in the tables.
const QUANTILES: [(f64, &str); 4] = [(0.5, "p50"), (0.9, "p90"), (0.99, "p99"), (0.999, "p99.9")];

/// The scenario's results as a text table.
pub fn table(scenario: &Scenario, results: &[RunResult]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "\n== {}: {}", scenario.name, scenario.about);
    let _ = writeln!(out, "verdict: {}", verdict(results));
    let _ = write!(
        out,
        "{:<20} {:>9} {:>8} {:>5}",
        "contender", "ok/s", "success", "amp"
    );
    for (_, name) in QUANTILES {
        let _ = write!(out, " {:>9}", name);
    }
    let _ = writeln!(out, "  share per backend (%)");
    for r in results {
        let _ = write!(
            out,
            "{:<20} {:>9.0} {:>7.2}% {:>5.3}",
            r.contender.name(),
            r.throughput(),
            100.0 * r.success_rate(),
            r.amplification()
        );
        for (q, _) in QUANTILES {
            let _ = write!(out, " {:>7.1}ms", r.latency_ms(q));
        }
        let shares: Vec<String> = r.shares().iter().map(|s| format!("{s:.1}")).collect();
        let _ = writeln!(out, "  {}", shares.join(" "));
    }
    out.push_str(&details(scenario, results));
    out
}

/// What follows a scenario's table: utilization, the scale-up, ejections,
/// for the scenarios that have them.
fn details(scenario: &Scenario, results: &[RunResult]) -> String {
    let mut out = String::new();
    let utilization: Vec<String> = results.iter().filter_map(utilization_summary).collect();
    if !utilization.is_empty() {
        let _ = writeln!(
            out,
            "utilization per backend (%), and the spread max / min:"
        );
        for line in utilization {
            let _ = writeln!(out, "  {line}");
        }
    }
    if scenario.late > 0 {
        let _ = writeln!(
            out,
            "after the scale-up: time for each new backend to get 0.8x an old one's requests \
             (100 ms windows); the lowest new/old ratio in each of the first 10 windows; \
             old backends' req/s before -> after:"
        );
        for r in results {
            let Some(s) = r.scale_up(scenario.late) else {
                continue;
            };
            let reach: Vec<String> = s
                .reach
                .iter()
                .map(|t| t.map_or("never".to_string(), |t| format!("{:.1}s", t.as_secs_f64())))
                .collect();
            let lowest: Vec<String> = s.lowest.iter().map(|x| format!("{x:.2}")).collect();
            let _ = writeln!(
                out,
                "  {:<20} {}  | {}  | {:.0} -> {:.0}",
                r.contender.name(),
                reach.join(" "),
                lowest.join(" "),
                s.old_before,
                s.old_after
            );
        }
    }
    if scenario.backends.iter().any(|b| b.zone != CLIENT_ZONE) {
        let _ = writeln!(
            out,
            "by zone (the client in zone {CLIENT_ZONE}), first half | second half of the run: \
             requests sent to other zones, p99, failed:"
        );
        for r in results {
            let cross = r.cross_zone_shares(scenario);
            let [first, second] = &r.halves;
            let _ = writeln!(
                out,
                "  {:<20} cross-zone {:>5.1} % | {:>5.1} %   p99 {:>6.1} | {:>6.1} ms   failed {} | {}",
                r.contender.name(),
                cross[0] * 100.0,
                cross[1] * 100.0,
                first.latency_ms(0.99),
                second.latency_ms(0.99),
                first.failed,
                second.failed
            );
        }
    }
    if let Some(capacity) = scenario
        .capacity()
        .filter(|_| scenario.backends.iter().any(|b| b.shed_after.is_some()))
    {
        let _ =
            writeln!(
            out,
            "overload: goodput (answered requests per second) over the capacity ({capacity:.0}/s: \
             {} slots over a mean service of {:.2} ms on the 1 ms timer), attempts and refusals \
             (503 after waiting too long) per second, p99:",
            scenario.backends.iter().filter_map(|b| b.capacity).sum::<usize>(),
            scenario
                .backends
                .first()
                .map_or(0.0, |b| b.mean_service_on_timer().as_secs_f64() * 1000.0),
        );
        for r in results {
            let seconds = r.elapsed.as_secs_f64().max(1e-9);
            let _ = writeln!(
                out,
                "  {:<22} goodput {:>5.0}/s = {:>5.1} %   attempts {:>6.0}/s   refused {:>6.0}/s   p99 {:>6.1} ms",
                r.contender.name(),
                r.throughput(),
                100.0 * r.throughput() / capacity,
                r.attempts() as f64 / seconds,
                r.shed as f64 / seconds,
                r.latency_ms(0.99)
            );
        }
    }
    if scenario.keys.is_some() {
        let _ = writeln!(
            out,
            "by key: cache hit rate, p99, the busiest backend over the mean (utilization; requests):"
        );
        for r in results {
            let _ = writeln!(
                out,
                "  {:<20} hit rate {:>5.1} %   p99 {:>6.1} ms   max/mean load {:.2}; requests {:.2}",
                r.contender.name(),
                r.cache_hit_rate() * 100.0,
                r.latency_ms(0.99),
                r.max_over_mean_load().unwrap_or(f64::NAN),
                r.max_over_mean_requests()
            );
        }
    }
    if !scenario.down_from_halfway.is_empty()
        || scenario.backends.iter().any(|b| !b.outages.is_empty())
    {
        let _ = writeln!(
            out,
            "while backends were down: requests failed (of all), attempts sent to a down backend, p99.9:"
        );
        for r in results {
            let _ = writeln!(
                out,
                "  {:<20} {:>6} failed  {:>6} sent to down backends  p99.9 {:.1} ms",
                r.contender.name(),
                r.failed,
                r.hits_while_down.iter().sum::<u64>(),
                r.latency_ms(0.999)
            );
        }
    }
    let ejections: Vec<String> = results
        .iter()
        .filter_map(|r| ejection_summary(scenario, r))
        .collect();
    if !ejections.is_empty() {
        let _ = writeln!(out, "failing backends and outlier ejections:");
        for line in ejections {
            let _ = writeln!(out, "  {line}");
        }
    }
    out
}

/// How far below the best success rate a contender may be and still win on
/// latency: a contender that drops requests must not win by dropping the
/// slow ones.
const SUCCESS_SLACK: f64 = 0.001;

/// The best success rate among the contenders that answered, and those
/// within [`SUCCESS_SLACK`] of it: who may win on latency, in the verdict and
/// in the plots.
fn eligible(results: &[RunResult]) -> (f64, Vec<&RunResult>) {
    let answered = results.iter().filter(|r| r.ok > 0);
    let best = answered
        .clone()
        .map(|r| r.success_rate())
        .fold(0.0, f64::max);
    let eligible = answered
        .filter(|r| r.success_rate() >= best - SUCCESS_SLACK)
        .collect();
    (best, eligible)
}

/// One line that says who wins: lowest p99 and p99.9 among the contenders
/// whose success rate is within 0.1 percentage point of the best, each with
/// its margin over the runner-up, and how the success rates compare.
pub fn verdict(results: &[RunResult]) -> String {
    let answered: Vec<&RunResult> = results.iter().filter(|r| r.ok > 0).collect();
    if answered.is_empty() {
        return "no contender had a successful request".to_string();
    }
    let (best_success, eligible) = eligible(results);
    let mut parts = Vec::new();
    for (q, label) in [(0.99, "p99"), (0.999, "p99.9")] {
        let mut ranked: Vec<(f64, &str)> = eligible
            .iter()
            .map(|r| (r.latency_ms(q), r.contender.name()))
            .collect();
        ranked.sort_by(|a, b| a.0.total_cmp(&b.0));
        parts.push(format!("{label} {}", rank_line(&ranked)));
    }
    let worst = answered
        .iter()
        .copied()
        .min_by(|a, b| a.success_rate().total_cmp(&b.success_rate()));
    let success = match worst {
        Some(w) if w.success_rate() < best_success => format!(
            "success {:.2} % at best, lowest {} {:.2} %",
            100.0 * best_success,
            w.contender.name(),
            100.0 * w.success_rate()
        ),
        _ => format!(
            "success {:.2} % for all {}",
            100.0 * best_success,
            answered.len()
        ),
    };
    parts.push(success);
    parts.join("; ")
}

/// Latencies closer than this to the best are a tie: the simulation's
/// histogram and the noise of a real run do not tell them apart.
const TIE: f64 = 1.02;

/// Who is best in `ranked` (sorted, lowest first) and by how much: the
/// best (or the contenders tied with it), the first one behind them with
/// its ratio to the best, and the last.
fn rank_line(ranked: &[(f64, &str)]) -> String {
    let Some(&(best, best_name)) = ranked.first() else {
        return "none".to_string();
    };
    let tied = ranked.iter().take_while(|(v, _)| *v <= best * TIE).count();
    let mut line = if tied == 1 {
        format!("best {best_name} {best:.1} ms")
    } else if tied == ranked.len() {
        format!("{best:.1} ms, all {tied} within 2 %")
    } else {
        let names: Vec<&str> = ranked[..tied.min(3)].iter().map(|(_, n)| *n).collect();
        let more = if tied > 3 {
            format!(" and {} more", tied - 3)
        } else {
            String::new()
        };
        format!("best {best:.1} ms, tied: {}{more}", names.join(", "))
    };
    if let Some(&(next, next_name)) = ranked.get(tied) {
        let _ = write!(
            line,
            "; next {next_name} {next:.1} ms ({:.2}x)",
            next / best
        );
        if let Some(&(worst, worst_name)) = ranked.last().filter(|_| ranked.len() > tied + 1) {
            let _ = write!(
                line,
                ", worst {worst_name} {worst:.1} ms ({:.2}x)",
                worst / best
            );
        }
    }
    line
}

/// What every column and contender name means, as the report's legend.
fn legend(results: &[RunResult]) -> String {
    let mut html = String::from(
        "<h2>How to read this</h2><table class=\"legend\"><tr><th>column</th><th>meaning</th></tr>\
         <tr><td>ok/s</td><td>successful requests per second</td></tr>\
         <tr><td>success</td><td>requests that got a successful answer, in the end (after retries)</td></tr>\
         <tr><td>amp</td><td>amplification: attempts sent per request (1.000 = no retry or hedge was sent)</td></tr>\
         <tr><td>p50 … p99.9</td><td>latency of successful requests at that percentile, from the request's intended start</td></tr>\
         <tr><td>share per backend</td><td>% of the attempts each backend received, in backend order</td></tr>\
         <tr><td>verdict</td><td>lowest p99 and p99.9 among the contenders within 0.1 point of the best success rate, with the margin over the runner-up</td></tr>\
         </table><table class=\"legend\"><tr><th>contender</th><th>what it is</th></tr>",
    );
    let mut seen = Vec::new();
    for r in results {
        if seen.contains(&r.contender) {
            continue;
        }
        seen.push(r.contender);
        let _ = write!(
            html,
            "<tr><td><code>{}</code></td><td>{}</td></tr>",
            escape(r.contender.name()),
            escape(r.contender.about())
        );
    }
    html.push_str(
        "</table><p>In the plots the contenders with the lowest p99 (and round robin and \
         tower's p2c, for reference) are drawn in colour, the others in grey.</p>",
    );
    html
}

/// The scenario's main table as HTML; the share column wraps rather than
/// widening the page.
fn html_table(results: &[RunResult]) -> String {
    let mut html = String::from(
        "<table class=\"results\"><tr><th>contender</th><th>ok/s</th><th>success</th><th>amp</th>",
    );
    for (_, name) in QUANTILES {
        let _ = write!(html, "<th>{name}</th>");
    }
    html.push_str("<th>share per backend (%)</th></tr>");
    for r in results {
        let _ = write!(
            html,
            "<tr><td><code>{}</code></td><td>{:.0}</td><td>{:.2} %</td><td>{:.3}</td>",
            escape(r.contender.name()),
            r.throughput(),
            100.0 * r.success_rate(),
            r.amplification()
        );
        for (q, _) in QUANTILES {
            let _ = write!(html, "<td>{:.1} ms</td>", r.latency_ms(q));
        }
        let shares: Vec<String> = r.shares().iter().map(|s| format!("{s:.1}")).collect();
        let _ = write!(html, "<td class=\"shares\">{}</td></tr>", shares.join(" "));
    }
    html.push_str("</table>");
    html
}

/// Each backend's average utilization, for scenarios whose backends have a
/// capacity.
fn utilization_summary(r: &RunResult) -> Option<String> {
    let all: Vec<f64> = r.utilization.iter().copied().collect::<Option<_>>()?;
    let max = all.iter().copied().fold(f64::MIN, f64::max);
    let min = all.iter().copied().fold(f64::MAX, f64::min);
    let each: Vec<String> = all.iter().map(|u| format!("{:.0}", 100.0 * u)).collect();
    Some(format!(
        "{:<20} {}  spread {:.2}",
        r.contender.name(),
        each.join(" "),
        max / min.max(1e-9)
    ))
}

/// For each backend that fails on purpose or was ejected: how many requests
/// it got in all, and, if ejected, how many before its first ejection.
fn ejection_summary(scenario: &Scenario, r: &RunResult) -> Option<String> {
    let parts: Vec<String> = r
        .ejections
        .iter()
        .enumerate()
        .filter(|(backend, e)| e.count > 0 || scenario.backends[*backend].error_rate > 0.0)
        .map(|(backend, e)| {
            let ejected = match e.sent_before_first {
                Some(n) => format!("ejected {}x, first after {n} requests", e.count),
                None => "never ejected".to_string(),
            };
            format!("backend {backend}: {} requests, {ejected}", r.hits[backend])
        })
        .collect();
    (!parts.is_empty()).then(|| format!("{:<20} {}", r.contender.name(), parts.join("; ")))
}

/// x axis of the plots: "nines" of the percentile, so p90 is 1, p99 is 2.
const MAX_NINES: f64 = 3.0;

/// Colours of the highlighted curves: the Okabe-Ito palette, told apart by
/// colour-blind readers too, strong on white.
const HIGHLIGHT: [RGBColor; 6] = [
    RGBColor(0, 0, 0),
    RGBColor(230, 159, 0),
    RGBColor(0, 114, 178),
    RGBColor(0, 158, 115),
    RGBColor(213, 94, 0),
    RGBColor(204, 121, 167),
];

/// The grey of the curves not highlighted.
const BACKGROUND_CURVE: RGBColor = RGBColor(200, 200, 200);

/// How many of the best contenders (by p99) a plot highlights, beside the
/// two references.
const HIGHLIGHT_BEST: usize = 4;

fn nines_label(x: f64) -> String {
    let percentile = 100.0 * (1.0 - 10f64.powf(-x));
    format!("p{}", (percentile * 1000.0).round() / 1000.0)
}

/// Tick values for a log axis over `low..high`: 1, 2 and 5 times each power
/// of ten inside it, or every whole multiple when that gives fewer than
/// three, so that an axis spanning less than a decade still has labelled
/// ticks (plotters labels only powers of ten on a log axis).
fn log_ticks(low: f64, high: f64) -> Vec<f64> {
    let ticks = |steps: &[f64]| {
        let mut ticks = Vec::new();
        let mut decade = 10f64.powf(low.log10().floor());
        while decade <= high {
            for step in steps {
                let tick = decade * step;
                if tick >= low && tick <= high {
                    ticks.push(tick);
                }
            }
            decade *= 10.0;
        }
        ticks
    };
    let coarse = ticks(&[1.0, 2.0, 5.0]);
    if coarse.len() >= 3 {
        return coarse;
    }
    ticks(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0])
}

fn ms_label(ms: f64) -> String {
    if ms >= 1.0 {
        format!("{ms:.0} ms")
    } else {
        format!("{ms} ms")
    }
}

/// Which contenders a plot draws in colour: the few with the lowest p99
/// among those within the verdict's success slack, and the references
/// (round robin, tower's p2c) when they ran.
fn highlighted(results: &[RunResult]) -> Vec<Contender> {
    let (_, mut ranked) = eligible(results);
    ranked.sort_by(|a, b| a.latency_ms(0.99).total_cmp(&b.latency_ms(0.99)));
    let mut chosen: Vec<Contender> = ranked
        .iter()
        .take(HIGHLIGHT_BEST)
        .map(|r| r.contender)
        .collect();
    for reference in [Contender::RoundRobin, Contender::TowerP2cPeakEwma] {
        if !chosen.contains(&reference)
            && results.iter().any(|r| r.contender == reference && r.ok > 0)
        {
            chosen.push(reference);
        }
    }
    chosen.truncate(HIGHLIGHT.len());
    chosen
}

/// A latency-by-percentile plot, as an SVG document: every contender, the
/// [`highlighted`] ones in colour and named in a legend beside the plot,
/// the others in grey behind them.
pub fn plot(
    scenario: &Scenario,
    results: &[RunResult],
) -> Result<String, Box<dyn std::error::Error>> {
    let curves: Vec<(Contender, Vec<(f64, f64)>)> = results
        .iter()
        .filter(|r| r.ok > 0)
        .map(|r| {
            let points = (0..=(MAX_NINES * 50.0) as usize)
                .map(|i| {
                    let nines = i as f64 / 50.0;
                    let q = 1.0 - 10f64.powf(-nines);
                    (nines, r.latency_ms(q).max(0.001))
                })
                .collect();
            (r.contender, points)
        })
        .collect();
    let lowest = curves
        .iter()
        .flat_map(|(_, p)| p.iter().map(|&(_, y)| y))
        .fold(f64::INFINITY, f64::min);
    let highest = curves
        .iter()
        .flat_map(|(_, p)| p.iter().map(|&(_, y)| y))
        .fold(0.0, f64::max);
    let (lowest, highest) = if lowest.is_finite() {
        (lowest * 0.8, highest * 1.25)
    } else {
        (0.1, 1.0)
    };
    let colour_of = highlighted(results);

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (900, 420)).into_drawing_area();
        root.fill(&WHITE)?;
        let (plot_area, legend_area) = root.split_horizontally(680);
        let mut chart = ChartBuilder::on(&plot_area)
            .caption(
                format!("{}: latency by percentile", scenario.name),
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(64)
            .build_cartesian_2d(
                0.0..MAX_NINES,
                (lowest..highest)
                    .log_scale()
                    .with_key_points(log_ticks(lowest, highest)),
            )?;
        chart
            .configure_mesh()
            .x_desc("percentile")
            .y_desc("latency (log scale)")
            .x_labels(4)
            .x_label_formatter(&|x| nines_label(*x))
            .y_label_formatter(&|y| ms_label(*y))
            .draw()?;
        // Grey first, so that the highlighted curves are drawn over them.
        for (contender, points) in &curves {
            if !colour_of.contains(contender) {
                chart.draw_series(LineSeries::new(
                    points.iter().copied(),
                    BACKGROUND_CURVE.stroke_width(1),
                ))?;
            }
        }
        for (i, contender) in colour_of.iter().enumerate() {
            if let Some((_, points)) = curves.iter().find(|(c, _)| c == contender) {
                chart.draw_series(LineSeries::new(
                    points.iter().copied(),
                    HIGHLIGHT[i].stroke_width(2),
                ))?;
            }
        }
        // The legend beside the plot, never over a curve.
        let font = ("sans-serif", 14).into_font();
        for (i, contender) in colour_of.iter().enumerate() {
            let y = 50 + 24 * i as i32;
            legend_area.draw(&PathElement::new(
                vec![(8, y), (36, y)],
                HIGHLIGHT[i].stroke_width(3),
            ))?;
            legend_area.draw(&Text::new(contender.name(), (44, y - 8), font.clone()))?;
        }
        let others = curves.len().saturating_sub(colour_of.len());
        if others > 0 {
            let y = 50 + 24 * colour_of.len() as i32;
            legend_area.draw(&PathElement::new(
                vec![(8, y), (36, y)],
                BACKGROUND_CURVE.stroke_width(2),
            ))?;
            legend_area.draw(&Text::new(
                format!("{others} others"),
                (44, y - 8),
                font.clone(),
            ))?;
        }
        root.present()?;
    }
    Ok(svg)
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Writes the HTML report (for each scenario its table and its plot), and
/// each plot beside it as `<scenario>.svg`.
pub fn write_html(
    path: &Path,
    command: &str,
    runs: &[(Scenario, Vec<RunResult>)],
    fleet: Option<&str>,
) -> Result<(), Box<dyn std::error::Error>> {
    let mut html = String::from(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>tower-lb shootout</title>\
         <style>body{font-family:sans-serif;max-width:940px;margin:auto;padding:0 8px}\
         pre{background:#f4f4f4;padding:8px;white-space:pre-wrap;font-size:12px}\
         table{border-collapse:collapse;font-size:13px;margin:8px 0}\
         td,th{border-bottom:1px solid #ddd;padding:2px 6px;text-align:right;vertical-align:top}\
         td:first-child,th:first-child,.legend td,.legend th{text-align:left}\
         td.shares{text-align:left;font-size:11px;max-width:220px}\
         .verdict{background:#eef6ee;padding:6px 8px}svg{max-width:100%;height:auto}</style>\
         </head><body><h1>tower-lb strategy shootout</h1>",
    );
    let _ = write!(html, "<p>Command: <code>{}</code></p>", escape(command));
    html.push_str(
        "<p>Latency is that of successful requests, measured from each request's intended \
         arrival time under an open-loop load.</p>",
    );
    let _ = write!(
        html,
        "<h2>Summary</h2><table class=\"legend\"><tr><th>scenario</th><th>verdict</th></tr>"
    );
    for (scenario, results) in runs {
        let _ = write!(
            html,
            "<tr><td><a href=\"#{0}\">{0}</a></td><td>{1}</td></tr>",
            escape(scenario.name),
            escape(&verdict(results))
        );
    }
    html.push_str("</table>");
    if let Some((_, results)) = runs.first() {
        html.push_str(&legend(results));
    }
    for (scenario, results) in runs {
        let _ = write!(
            html,
            "<h2 id=\"{0}\">{0}</h2><p>{1}</p>",
            escape(scenario.name),
            escape(scenario.about)
        );
        let _ = write!(
            html,
            "<p class=\"verdict\"><b>Verdict:</b> {}</p>{}",
            escape(&verdict(results)),
            html_table(results)
        );
        let details = details(scenario, results);
        if !details.trim().is_empty() {
            let _ = write!(html, "<pre>{}</pre>", escape(details.trim()));
        }
        let svg = plot(scenario, results)?;
        html.push_str(&svg);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
            std::fs::write(dir.join(format!("{}.svg", scenario.name)), &svg)?;
        }
    }
    if let Some(fleet) = fleet {
        let _ = write!(
            html,
            "<h2 id=\"fleet\">fleet</h2><pre>{}</pre>",
            escape(fleet.trim())
        );
    }
    html.push_str("</body></html>\n");
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, html)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{log_ticks, rank_line};

    #[test]
    fn a_clear_winner_is_named_with_its_margin_over_the_next_and_the_worst() {
        let ranked = [(5.0, "a"), (10.0, "b"), (50.0, "c")];
        assert_eq!(
            rank_line(&ranked),
            "best a 5.0 ms; next b 10.0 ms (2.00x), worst c 50.0 ms (10.00x)"
        );
    }

    #[test]
    fn contenders_within_two_percent_of_the_best_are_a_tie() {
        let ranked = [(6.0, "a"), (6.1, "b"), (6.12, "c"), (6.3, "d")];
        assert_eq!(
            rank_line(&ranked),
            "best 6.0 ms, tied: a, b, c; next d 6.3 ms (1.05x)"
        );
    }

    #[test]
    fn when_all_tie_the_line_says_so() {
        let ranked = [(6.0, "a"), (6.0, "b")];
        assert_eq!(rank_line(&ranked), "6.0 ms, all 2 within 2 %");
    }

    #[test]
    fn an_axis_within_one_decade_still_gets_at_least_three_labelled_ticks() {
        let ticks = log_ticks(4.4, 7.5);
        assert_eq!(ticks, vec![5.0, 6.0, 7.0]);
        let wide = log_ticks(0.8, 250.0);
        assert_eq!(wide, vec![1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0]);
    }
}
