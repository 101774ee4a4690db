//! Output: a table per scenario on the terminal, and a self-contained HTML
//! report with a latency-by-percentile plot per scenario.

use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;

use crate::run::RunResult;
use crate::scenario::Scenario;

/// Quantiles shown in the tables.
const QUANTILES: [(f64, &str); 4] = [(0.5, "p50"), (0.9, "p90"), (0.99, "p99"), (0.999, "p99.9")];

/// The scenario's results as a text table.
pub fn table(scenario: &Scenario, results: &[RunResult]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "\n== {}: {}", scenario.name, scenario.about);
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

/// Line colours, one per contender, readable on white.
const COLORS: [RGBColor; 12] = [
    RGBColor(214, 39, 40),
    RGBColor(0, 0, 0),
    RGBColor(127, 127, 127),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(188, 189, 34),
    RGBColor(44, 160, 44),
    RGBColor(31, 119, 180),
    RGBColor(90, 90, 90),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(23, 190, 207),
];

fn nines_label(x: f64) -> String {
    let percentile = 100.0 * (1.0 - 10f64.powf(-x));
    format!("p{}", (percentile * 1000.0).round() / 1000.0)
}

/// A latency-by-percentile plot of every contender, as an SVG document.
pub fn plot(
    scenario: &Scenario,
    results: &[RunResult],
) -> Result<String, Box<dyn std::error::Error>> {
    let curves: Vec<(&str, Vec<(f64, f64)>)> = results
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
            (r.contender.name(), points)
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

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (760, 420)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!("{}: latency by percentile", scenario.name),
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..MAX_NINES, (lowest..highest).log_scale())?;
        chart
            .configure_mesh()
            .x_desc("percentile")
            .y_desc("latency (ms)")
            .x_labels(4)
            .x_label_formatter(&|x| nines_label(*x))
            .draw()?;
        for (i, (name, points)) in curves.into_iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            chart
                .draw_series(LineSeries::new(points, color.stroke_width(2)))?
                .label(name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
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
) -> Result<(), Box<dyn std::error::Error>> {
    let mut html = String::from(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>tower-lb shootout</title>\
         <style>body{font-family:sans-serif;max-width:900px;margin:auto}pre{background:#f4f4f4;padding:8px;overflow-x:auto}</style>\
         </head><body><h1>tower-lb strategy shootout</h1>",
    );
    let _ = write!(html, "<p>Command: <code>{}</code></p>", escape(command));
    html.push_str(
        "<p>Latency is that of successful requests, measured from each request's intended \
         arrival time under an open-loop load.</p>",
    );
    for (scenario, results) in runs {
        let _ = write!(
            html,
            "<h2>{}</h2><p>{}</p>",
            escape(scenario.name),
            escape(scenario.about)
        );
        let _ = write!(
            html,
            "<pre>{}</pre>",
            escape(table(scenario, results).trim())
        );
        let svg = plot(scenario, results)?;
        html.push_str(&svg);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
            std::fs::write(dir.join(format!("{}.svg", scenario.name)), &svg)?;
        }
    }
    html.push_str("</body></html>\n");
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, html)?;
    Ok(())
}
