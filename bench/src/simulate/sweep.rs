//! Sweeps: the same fleet run over a range of one setting, every strategy scored at each
//! point, written as JSON, a Markdown table and an SVG plot (plotters).
//!
//! - wrong dependencies against the inventory events' delay (p99);
//! - unattributed flows against the exporters' batch loss;
//! - misattributed flows against the IP reuse cool-down;
//! - flowattr with its guards (fast reuse, clock correction) on and off: misattributed and
//!   unattributed flows against the cool-down, and against hosts' clock skew.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use plotters::prelude::*;
use serde::Serialize;

use super::score::Score;
use super::{SimulateArgs, progress_bar, simulate_once};

/// One setting varied over `points`.
pub struct Sweep {
    /// File stem and title.
    pub name: &'static str,
    pub title: &'static str,
    pub x_label: &'static str,
    pub y_label: &'static str,
    pub points: Vec<f64>,
    /// Sets the swept value on the run's arguments.
    pub apply: fn(&mut SimulateArgs, f64),
    /// The figure plotted for one strategy.
    pub measure: fn(&Score) -> f64,
    pub compare: Compare,
}

/// What the lines of a sweep are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compare {
    /// Every strategy, as configured.
    Strategies,
    /// flowattr alone, with its guards (`--reuse-guard`, `--clock-readings`) on and off.
    Guards,
}

#[derive(Debug, Serialize)]
pub struct SweepResult {
    pub name: &'static str,
    pub x_label: &'static str,
    pub y_label: &'static str,
    pub points: Vec<SweepPoint>,
}

#[derive(Debug, Serialize)]
pub struct SweepPoint {
    pub x: f64,
    pub scores: Vec<Score>,
}

/// The three sweeps of docs/benchmarks.md.
pub fn sweeps() -> Vec<Sweep> {
    vec![
        Sweep {
            name: "wrong-dependencies-vs-event-delay",
            title: "Wrong dependencies against inventory event delay",
            x_label: "event delay p99 (s)",
            y_label: "wrong dependencies, all (%)",
            points: vec![5.0, 30.0, 60.0, 120.0, 300.0, 600.0],
            apply: |args, x| args.event_delay_p99 = Duration::from_secs_f64(x),
            measure: |score| score.dependencies.overall.wrong_share * 100.0,
            compare: Compare::Strategies,
        },
        Sweep {
            name: "unattributed-vs-batch-loss",
            title: "Unattributed flows against exporter batch loss",
            x_label: "batches lost (%)",
            y_label: "flows unattributed (%)",
            points: vec![0.0, 1.0, 2.0, 5.0, 10.0, 20.0],
            apply: |args, x| args.batch_loss = x / 100.0,
            measure: |score| score.unattributed_share * 100.0,
            compare: Compare::Strategies,
        },
        Sweep {
            name: "misattributed-vs-ip-cooldown",
            title: "Misattributed flows against IP reuse cool-down",
            x_label: "IP reuse cool-down (s)",
            y_label: "flows misattributed (%)",
            points: vec![0.0, 5.0, 30.0, 120.0, 600.0],
            apply: |args, x| args.ip_cooldown = Duration::from_secs_f64(x),
            measure: |score| score.misattributed_share * 100.0,
            compare: Compare::Strategies,
        },
        Sweep {
            name: "guards-misattributed-vs-ip-cooldown",
            title: "flowattr's guards: misattributed flows against IP reuse cool-down (90 s containers)",
            x_label: "IP reuse cool-down (s)",
            y_label: "flows misattributed",
            points: COOLDOWNS.to_vec(),
            apply: fast_reuse_at_cooldown,
            measure: |score| score.misattributed as f64,
            compare: Compare::Guards,
        },
        Sweep {
            name: "guards-unattributed-vs-ip-cooldown",
            title: "flowattr's guards: unattributed flows against IP reuse cool-down (90 s containers)",
            x_label: "IP reuse cool-down (s)",
            y_label: "flows unattributed (%)",
            points: COOLDOWNS.to_vec(),
            apply: fast_reuse_at_cooldown,
            measure: |score| score.unattributed_share * 100.0,
            compare: Compare::Guards,
        },
        Sweep {
            name: "guards-misattributed-vs-skew",
            title: "flowattr's guards: misattributed flows against host clock skew (1 s cool-down, 90 s containers)",
            x_label: "largest host clock error (s)",
            y_label: "flows misattributed",
            points: SKEWS.to_vec(),
            apply: fast_reuse_at_skew,
            measure: |score| score.misattributed as f64,
            compare: Compare::Guards,
        },
        Sweep {
            name: "guards-unattributed-vs-skew",
            title: "flowattr's guards: unattributed flows against host clock skew (1 s cool-down, 90 s containers)",
            x_label: "largest host clock error (s)",
            y_label: "flows unattributed (%)",
            points: SKEWS.to_vec(),
            apply: fast_reuse_at_skew,
            measure: |score| score.unattributed_share * 100.0,
            compare: Compare::Guards,
        },
    ]
}

const COOLDOWNS: [f64; 8] = [0.0, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0];
const SKEWS: [f64; 8] = [0.0, 0.25, 0.5, 0.9, 1.5, 2.0, 2.5, 3.0];

/// Short-lived containers, so that IPs change hands often.
fn fast_reuse_at_cooldown(args: &mut SimulateArgs, cooldown: f64) {
    args.container_life = Duration::from_secs(90);
    args.ip_cooldown = Duration::from_secs_f64(cooldown);
}

fn fast_reuse_at_skew(args: &mut SimulateArgs, skew: f64) {
    fast_reuse_at_cooldown(args, 1.0);
    args.max_skew = Duration::from_secs_f64(skew);
}

/// Runs every sweep from `base`, writing `<name>.json`, `<name>.md` and `<name>.svg` to `dir`.
pub fn run_all(base: &SimulateArgs, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for sweep in sweeps() {
        let result = run(base, &sweep)?;
        let stem = dir.join(sweep.name);
        std::fs::write(
            stem.with_extension("json"),
            serde_json::to_string_pretty(&result)?,
        )?;
        std::fs::write(stem.with_extension("md"), table(&sweep, &result))?;
        plot(&sweep, &result, &stem.with_extension("svg"))?;
        eprintln!("wrote {}.{{json,md,svg}}", stem.display());
    }
    Ok(())
}

pub fn run(base: &SimulateArgs, sweep: &Sweep) -> anyhow::Result<SweepResult> {
    let mut points = Vec::new();
    for &x in &sweep.points {
        let mut args = base.clone();
        (sweep.apply)(&mut args, x);
        let progress = progress_bar(&format!("{} = {x}", sweep.x_label));
        let scores = match sweep.compare {
            Compare::Strategies => simulate_once(&args, &progress)?.1,
            Compare::Guards => {
                let mut scores = Vec::new();
                for guards in [true, false] {
                    args.reuse_guard = guards;
                    args.clock_readings = guards;
                    // flowattr is the first strategy.
                    let mut flowattr = simulate_once(&args, &progress)?.1.swap_remove(0);
                    flowattr.strategy =
                        format!("flowattr, guards {}", if guards { "on" } else { "off" });
                    scores.push(flowattr);
                }
                scores
            }
        };
        progress.finish_and_clear();
        points.push(SweepPoint { x, scores });
    }
    Ok(SweepResult {
        name: sweep.name,
        x_label: sweep.x_label,
        y_label: sweep.y_label,
        points,
    })
}

/// Rows are the swept values, columns the strategies.
pub fn table(sweep: &Sweep, result: &SweepResult) -> String {
    let names: Vec<&str> = result
        .points
        .first()
        .map(|point| {
            point
                .scores
                .iter()
                .map(|score| score.strategy.as_str())
                .collect()
        })
        .unwrap_or_default();
    let mut out = format!(
        "{}: {}\n\n| {} | {} |\n|{}\n",
        sweep.title,
        sweep.y_label,
        sweep.x_label,
        names.join(" | "),
        " ---: |".repeat(names.len() + 1)
    );
    for point in &result.points {
        let cells: Vec<String> = point
            .scores
            .iter()
            .map(|score| match (sweep.measure)(score) {
                count if count.fract() == 0.0 && !sweep.y_label.ends_with("(%)") => {
                    format!("{count}")
                }
                share => format!("{share:.2}"),
            })
            .collect();
        let _ = writeln!(out, "| {} | {} |", point.x, cells.join(" | "));
    }
    out
}

pub fn plot(sweep: &Sweep, result: &SweepResult, path: &Path) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let x_max = sweep.points.iter().copied().fold(0.0, f64::max).max(1e-9);
    let y_max = result
        .points
        .iter()
        .flat_map(|point| point.scores.iter().map(sweep.measure))
        .fold(0.0, f64::max)
        .max(1.0)
        // Headroom above the highest line for the legend.
        * 1.45;
    let mut chart = ChartBuilder::on(&root)
        .caption(sweep.title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .x_desc(sweep.x_label)
        .y_desc(sweep.y_label)
        .draw()
        .map_err(plot_error)?;
    let strategies = result.points.first().map_or(0, |point| point.scores.len());
    for index in 0..strategies {
        let color = Palette99::pick(index).to_rgba();
        let series: Vec<(f64, f64)> = result
            .points
            .iter()
            .map(|point| (point.x, (sweep.measure)(&point.scores[index])))
            .collect();
        let name = result.points[0].scores[index].strategy.clone();
        chart
            .draw_series(LineSeries::new(series.clone(), color.stroke_width(2)))
            .map_err(plot_error)?
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
        chart
            .draw_series(
                series
                    .into_iter()
                    .map(|point| Circle::new(point, 3, color.filled())),
            )
            .map_err(plot_error)?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(plot_error)?;
    root.present().map_err(plot_error)?;
    Ok(())
}

fn plot_error<E: std::fmt::Display>(error: E) -> anyhow::Error {
    anyhow::anyhow!("plotting: {error}")
}
