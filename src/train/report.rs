//! The run folder's report: `report.json` (config, throughput, memory, losses, evaluation) and a
//! loss chart as SVG.
//!
//! Both files are written atomically (temp file, fsync, rename), so a run killed while writing
//! its report keeps the previous one.

use std::collections::BTreeMap;
use std::path::Path;

use plotters::chart::MeshStyle;
use plotters::coord::ranged1d::ValueFormatter;
use plotters::prelude::*;
use serde::Serialize;

use super::checkpoint::write_file_atomic;
use crate::error::{Error, Result};

/// One optimizer step as recorded in the report.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct StepRecord {
    /// Optimizer step, from 1.
    pub step: u64,
    /// Mean training loss of the step's batch (nats per target token).
    pub loss: f64,
    /// Learning rate used for the step.
    pub lr: f64,
    /// ‖gradient‖ of the method's parameters before clipping (NaN when it was not finite).
    pub grad_norm: f64,
    /// Wall-clock seconds the step took.
    pub seconds: f64,
    /// Tokens processed in the step (inputs and targets, without padding).
    pub tokens: u64,
}

/// Everything a run reports, written to the run folder as pretty JSON by [`Report::write_json`].
///
/// JSON has no NaN or infinity: non-finite numbers (a diverged loss) are written as `null`.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct Report {
    /// The effective run config.
    pub config: serde_json::Value,
    /// Backend that ran the steps (e.g. `cpu`).
    pub backend: String,
    /// Model name or folder.
    pub model: String,
    /// Tuning method (e.g. `prompt`).
    pub method: String,
    /// Parameters updated by the optimizer.
    pub train_params: usize,
    /// Parameters stored in the method's output (may differ from `train_params`, e.g. when a
    /// reparameterisation is folded away after training).
    pub stored_params: usize,
    /// Every optimizer step, in order.
    pub steps: Vec<StepRecord>,
    /// Tokens per second over the whole run.
    pub tokens_per_second: f64,
    /// Peak resident set size of the process on CPU, bytes.
    pub peak_memory_bytes: u64,
    /// Rows whose input or target was cut to the length limit.
    pub truncated_rows: u64,
    /// Evaluation metrics by name (e.g. `accuracy`).
    pub eval: BTreeMap<String, f64>,
    /// Where the run is: `running` (written at each checkpoint), `finished`, `interrupted
    /// (SIGINT)` / `interrupted (SIGTERM)`, `error: MESSAGE`.
    pub stopped: String,
    /// Set when early stopping ended the run before its last step: `step`, `patience`,
    /// `best_step`, `best`, `compared` (dev loss or dev score) and `reason` (a sentence).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub early_stop: Option<serde_json::Value>,
}

impl Report {
    /// Writes the report as pretty JSON, atomically (temp file, fsync, rename).
    pub fn write_json(&self, path: &Path) -> Result<()> {
        let mut json = serde_json::to_string_pretty(self).map_err(|e| {
            Error::Input(format!("{}: cannot encode the report: {e}", path.display()))
        })?;
        json.push('\n');
        write_file_atomic(path, json.as_bytes(), &mut || Ok(()))
    }
}

/// Peak resident set size of this process (Linux: VmHWM in /proc/self/status), None elsewhere.
pub fn peak_rss_bytes() -> Option<u64> {
    #[cfg(target_os = "linux")]
    {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        parse_vm_hwm(&status)
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}

/// The `VmHWM:   1234 kB` line of /proc/self/status, in bytes.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
fn parse_vm_hwm(status: &str) -> Option<u64> {
    let line = status.lines().find_map(|l| l.strip_prefix("VmHWM:"))?;
    let mut words = line.split_whitespace();
    let kib: u64 = words.next()?.parse().ok()?;
    // The kernel always reports kB (KiB); refuse anything else rather than guess.
    (words.next()? == "kB").then_some(kib * 1024)
}

/// Chart size in SVG pixels.
const CHART_SIZE: (u32, u32) = (800, 480);
/// More points than this are thinned (see [`thin`]); a chart 800 pixels wide cannot show more.
const MAX_PLOTTED: usize = 2000;
/// Up to this many points each get a marker, so a short run (or a single step) is visible.
const MAX_MARKED: usize = 60;

/// A chart title longer than this many characters is shortened ([`fit_title`]): the title's
/// 26 px sans-serif averages under 15 px a character, and the chart is 800 px wide with 16 px
/// margins.
pub const TITLE_MAX_CHARS: usize = 52;

/// `title` shortened to at most `max` characters so a chart never clips it: path-like words
/// (holding a `/`) lose leading components first, keeping their end (`…/runs/rte-pt`), the
/// longest first; what is still too long keeps its start and end around a `…`.
pub fn fit_title(title: &str, max: usize) -> String {
    let len = |s: &str| s.chars().count();
    let mut words: Vec<String> = title.split(' ').map(String::from).collect();
    while len(&words.join(" ")) > max {
        // The longest word that still has a leading path component to drop.
        let Some(i) = (0..words.len())
            .filter(|&i| without_first_component(&words[i]).is_some())
            .max_by_key(|&i| len(&words[i]))
        else {
            break;
        };
        match without_first_component(&words[i]) {
            Some(shorter) => words[i] = shorter,
            None => break,
        }
    }
    let text = words.join(" ");
    let chars: Vec<char> = text.chars().collect();
    if chars.len() <= max {
        return text;
    }
    let keep = max.saturating_sub(1);
    let head = keep / 2;
    let tail = keep - head;
    let mut out: String = chars[..head].iter().collect();
    out.push('…');
    out.extend(&chars[chars.len() - tail..]);
    out
}

/// `word` without its first path component, marked `…/` (`/a/b/c` → `…/b/c`, `…/b/c` →
/// `…/c`); None when only one component is left.
fn without_first_component(word: &str) -> Option<String> {
    let rest = word.trim_start_matches('…').trim_start_matches('/');
    let cut = rest.find('/')?;
    Some(format!("…/{}", &rest[cut + 1..]))
}

/// A run's loss chart: the training loss of every step and, when the run evaluated on dev,
/// the dev loss (same axis) and a dev metric (its own axis on the right), with a legend.
#[derive(Debug, Clone, Copy)]
pub struct LossChart<'a> {
    pub title: &'a str,
    /// (step, training loss).
    pub train: &'a [(u64, f64)],
    /// (step, dev loss) of each evaluation; empty when there were none.
    pub dev_loss: &'a [(u64, f64)],
    /// The dev metric's label and its (step, value) points.
    pub dev_metric: Option<(&'a str, &'a [(u64, f64)])>,
}

/// An SVG line chart of (step, loss) with title and axis labels; atomic write.
///
/// Non-finite losses (NaN, infinities) are skipped. With no finite point at all (an empty slice
/// included) nothing is written and the error names `path`. Long runs are thinned to at most
/// 2000 points keeping each stretch's lowest and highest loss, so spikes stay visible
/// and the file stays small. Text is drawn as SVG `<text>` (no font is needed to write it; the
/// viewer picks a sans-serif font).
pub fn write_loss_svg(path: &Path, points: &[(u64, f64)], title: &str) -> Result<()> {
    write_line_svg(path, points, title, ("step", "loss"))
}

/// loss.svg of a run ([`LossChart`]): written as [`write_loss_svg`] writes the loss (the same
/// rules for non-finite points and thinning; the dev series are drawn when they have a finite
/// point).
pub fn write_run_svg(path: &Path, chart: &LossChart<'_>) -> Result<()> {
    let finite = |points: &[(u64, f64)]| -> Vec<(u64, f64)> {
        points.iter().copied().filter(|p| p.1.is_finite()).collect()
    };
    let train = finite(chart.train);
    if train.is_empty() {
        return Err(Error::Input(format!(
            "{}: no finite (step, loss) points to plot ({} given)",
            path.display(),
            chart.train.len()
        )));
    }
    let dev = finite(chart.dev_loss);
    let metric = chart
        .dev_metric
        .map(|(label, points)| (label, finite(points)))
        .filter(|(_, points)| !points.is_empty());
    let svg = render_run_svg(
        &thin(&train, MAX_PLOTTED),
        &dev,
        metric.as_ref().map(|(l, p)| (*l, p.as_slice())),
        chart.title,
    )
    .map_err(|e| Error::Input(format!("{}: cannot draw the chart: {e}", path.display())))?;
    write_file_atomic(path, svg.as_bytes(), &mut || Ok(()))
}

/// A line chart of `(x, y)` points with the axes named `(x, y)`, written as
/// [`write_loss_svg`] writes the loss (the same rules for non-finite points and thinning).
pub fn write_line_svg(
    path: &Path,
    points: &[(u64, f64)],
    title: &str,
    axes: (&str, &str),
) -> Result<()> {
    let finite: Vec<(u64, f64)> = points
        .iter()
        .copied()
        .filter(|(_, loss)| loss.is_finite())
        .collect();
    if finite.is_empty() {
        return Err(Error::Input(format!(
            "{}: no finite ({}, {}) points to plot ({} given)",
            path.display(),
            axes.0,
            axes.1,
            points.len()
        )));
    }
    let svg = render_line_svg(&thin(&finite, MAX_PLOTTED), title, axes)
        .map_err(|e| Error::Input(format!("{}: cannot draw the chart: {e}", path.display())))?;
    write_file_atomic(path, svg.as_bytes(), &mut || Ok(()))
}

/// At most about `max` points: the input cut into `max / 2` runs of consecutive points, each
/// kept as its lowest and highest point in step order.
fn thin(points: &[(u64, f64)], max: usize) -> Vec<(u64, f64)> {
    if points.len() <= max {
        return points.to_vec();
    }
    let chunk = points.len().div_ceil(max / 2);
    let mut out = Vec::with_capacity(max);
    for run in points.chunks(chunk) {
        let lo = run.iter().min_by(|a, b| a.1.total_cmp(&b.1)).copied();
        let hi = run.iter().max_by(|a, b| a.1.total_cmp(&b.1)).copied();
        if let (Some(lo), Some(hi)) = (lo, hi) {
            if lo.0 == hi.0 {
                out.push(lo);
            } else if lo.0 < hi.0 {
                out.extend([lo, hi]);
            } else {
                out.extend([hi, lo]);
            }
        }
    }
    out
}

/// The steps' range widened by 5% (at least one step) each side, so the curve's ends stay off
/// the axes. Integer steps give integer tick labels.
fn step_range(steps: impl Iterator<Item = u64> + Clone) -> std::ops::Range<u64> {
    let lo = steps.clone().min().unwrap_or(0);
    let hi = steps.max().unwrap_or(0);
    let pad = ((hi - lo) / 20).max(1);
    lo.saturating_sub(pad)..hi.saturating_add(pad)
}

/// `lo..hi` widened by 5% each side, or around the value when all values are equal.
fn loss_range(values: impl Iterator<Item = f64> + Clone) -> std::ops::Range<f64> {
    let lo = values.clone().fold(f64::INFINITY, f64::min);
    let hi = values.fold(f64::NEG_INFINITY, f64::max);
    let pad = if hi > lo {
        (hi - lo) * 0.05
    } else if lo != 0.0 {
        lo.abs() * 0.1
    } else {
        1.0
    };
    // Losses near f64::MAX would overflow to infinity; keep the range finite.
    let widen = |x: f64, d: f64| if (x + d).is_finite() { x + d } else { x };
    widen(lo, -pad)..widen(hi, pad)
}

/// The frame every chart shares: title, margins and label areas.
fn chart_frame<'a, 'b, DB: DrawingBackend>(
    root: &'a DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
) -> ChartBuilder<'a, 'b, DB> {
    let mut builder = ChartBuilder::on(root);
    builder
        .caption(fit_title(title, TITLE_MAX_CHARS), ("sans-serif", 26))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(72);
    builder
}

/// The grid and label style every chart shares.
fn style_mesh<'m, 'a, 'b, X, Y, XT, YT, DB>(
    mesh: &'m mut MeshStyle<'a, 'b, X, Y, DB>,
) -> &'m mut MeshStyle<'a, 'b, X, Y, DB>
where
    X: Ranged<ValueType = XT> + ValueFormatter<XT>,
    Y: Ranged<ValueType = YT> + ValueFormatter<YT>,
    DB: DrawingBackend,
{
    mesh.axis_desc_style(("sans-serif", 18))
        .label_style(("sans-serif", 15))
        .light_line_style(WHITE.mix(0.0))
        .bold_line_style(BLACK.mix(0.12))
}

/// The chart as an SVG document. `points` is non-empty and finite.
fn render_line_svg(
    points: &[(u64, f64)],
    title: &str,
    (x_desc, y_desc): (&str, &str),
) -> std::result::Result<String, Box<dyn std::error::Error>> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, CHART_SIZE).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = chart_frame(&root, title).build_cartesian_2d(
            step_range(points.iter().map(|p| p.0)),
            loss_range(points.iter().map(|p| p.1)),
        )?;
        let mut mesh = chart.configure_mesh();
        mesh.x_desc(x_desc).y_desc(y_desc);
        style_mesh(&mut mesh).draw()?;
        let marker = if points.len() <= MAX_MARKED { 3 } else { 0 };
        chart.draw_series(
            LineSeries::new(points.iter().copied(), BLUE.stroke_width(2)).point_size(marker),
        )?;
        root.present()?;
    }
    Ok(svg)
}

/// The run's chart as an SVG document: the training loss (`train`, non-empty and finite),
/// the dev loss on the same axis, the dev metric on a right-hand axis; a legend when there is
/// more than the training loss.
fn render_run_svg(
    train: &[(u64, f64)],
    dev: &[(u64, f64)],
    metric: Option<(&str, &[(u64, f64)])>,
    title: &str,
) -> std::result::Result<String, Box<dyn std::error::Error>> {
    let metric_points = metric.map_or(&[][..], |m| m.1);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, CHART_SIZE).into_drawing_area();
        root.fill(&WHITE)?;
        let steps = step_range(train.iter().chain(dev).chain(metric_points).map(|p| p.0));
        let mut frame = chart_frame(&root, title);
        if metric.is_some() {
            frame.right_y_label_area_size(72);
        }
        let mut chart = frame
            .build_cartesian_2d(
                steps.clone(),
                loss_range(train.iter().chain(dev).map(|p| p.1)),
            )?
            // The same steps: the metric's points line up with the losses'.
            .set_secondary_coord(steps, loss_range(metric_points.iter().map(|p| p.1)));
        let mut mesh = chart.configure_mesh();
        mesh.x_desc("step").y_desc("loss");
        style_mesh(&mut mesh).draw()?;
        let marker = |n: usize| if n <= MAX_MARKED { 3 } else { 0 };
        let [train_colour, dev_colour, metric_colour] =
            [SERIES_COLOURS[0], SERIES_COLOURS[1], SERIES_COLOURS[2]];
        chart
            .draw_series(
                LineSeries::new(train.iter().copied(), train_colour.stroke_width(2))
                    .point_size(marker(train.len())),
            )?
            .label("training loss")
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], train_colour));
        if !dev.is_empty() {
            chart
                .draw_series(
                    LineSeries::new(dev.iter().copied(), dev_colour.stroke_width(2))
                        .point_size(marker(dev.len())),
                )?
                .label("dev loss")
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], dev_colour));
        }
        if let Some((label, points)) = metric {
            chart
                .configure_secondary_axes()
                .y_desc(label)
                .axis_desc_style(("sans-serif", 18))
                .label_style(("sans-serif", 15))
                .draw()?;
            chart
                .draw_secondary_series(
                    LineSeries::new(points.iter().copied(), metric_colour.stroke_width(2))
                        .point_size(marker(points.len())),
                )?
                .label(label)
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], metric_colour));
        }
        if !dev.is_empty() || metric.is_some() {
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK.mix(0.3))
                .label_font(("sans-serif", 15))
                .position(SeriesLabelPosition::UpperRight)
                .draw()?;
        }
        root.present()?;
    }
    Ok(svg)
}

/// A grouped bar chart: one group of bars per category (`categories`, along x), one bar per
/// series in each group, `series[i].1[j]` the height of series i in category j (non-finite or
/// negative heights are drawn as 0). Written atomically; errors name `path`.
pub fn write_bars_svg(
    path: &Path,
    categories: &[String],
    series: &[(String, Vec<f64>)],
    title: &str,
    y_desc: &str,
) -> Result<()> {
    if categories.is_empty() || series.is_empty() {
        return Err(Error::Input(format!(
            "{}: a bar chart needs at least one category and one series ({} and {} given)",
            path.display(),
            categories.len(),
            series.len()
        )));
    }
    if let Some((name, values)) = series.iter().find(|(_, v)| v.len() != categories.len()) {
        return Err(Error::Input(format!(
            "{}: series {name:?} has {} values for {} categories",
            path.display(),
            values.len(),
            categories.len()
        )));
    }
    let svg = render_bars_svg(categories, series, title, y_desc)
        .map_err(|e| Error::Input(format!("{}: cannot draw the chart: {e}", path.display())))?;
    write_file_atomic(path, svg.as_bytes(), &mut || Ok(()))
}

/// Colours of the series, repeated when there are more.
const SERIES_COLOURS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

fn render_bars_svg(
    categories: &[String],
    series: &[(String, Vec<f64>)],
    title: &str,
    y_desc: &str,
) -> std::result::Result<String, Box<dyn std::error::Error>> {
    let height = |v: f64| if v.is_finite() { v.max(0.0) } else { 0.0 };
    let top = series
        .iter()
        .flat_map(|(_, v)| v.iter().copied().map(height))
        .fold(0.0f64, f64::max);
    let top = if top > 0.0 { top * 1.1 } else { 1.0 };
    // Category j spans x in [j, j+1); its bars fill the middle 80%.
    let n = categories.len();
    let width = 0.8 / series.len() as f64;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, CHART_SIZE).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = chart_frame(&root, title).build_cartesian_2d(0.0..n as f64, 0.0..top)?;
        let label = |x: &f64| {
            let j = (x - 0.5).round();
            if (x - 0.5 - j).abs() < 1e-6 && j >= 0.0 && (j as usize) < n {
                categories[j as usize].clone()
            } else {
                String::new()
            }
        };
        let mut mesh = chart.configure_mesh();
        mesh.disable_x_mesh()
            .x_labels(n * 2 + 1)
            // Label each category's centre only.
            .x_label_formatter(&label)
            .y_desc(y_desc);
        style_mesh(&mut mesh).draw()?;
        for (i, (name, values)) in series.iter().enumerate() {
            let colour = SERIES_COLOURS[i % SERIES_COLOURS.len()];
            chart
                .draw_series(values.iter().enumerate().map(|(j, &v)| {
                    let x0 = j as f64 + 0.1 + i as f64 * width;
                    Rectangle::new([(x0, 0.0), (x0 + width, height(v))], colour.filled())
                }))?
                .label(name.as_str())
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 10, y + 5)], colour.filled())
                });
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK.mix(0.3))
            .label_font(("sans-serif", 15))
            .position(SeriesLabelPosition::UpperLeft)
            .draw()?;
        root.present()?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> Report {
        Report {
            config: serde_json::json!({"lr": 0.3, "prompt_len": 20}),
            backend: "cpu".into(),
            model: "t5-small".into(),
            method: "prompt".into(),
            train_params: 10240,
            stored_params: 10240,
            steps: vec![
                StepRecord {
                    step: 1,
                    loss: 2.5,
                    lr: 0.3,
                    grad_norm: 1.5,
                    seconds: 0.25,
                    tokens: 512,
                },
                StepRecord {
                    step: 2,
                    loss: f64::NAN,
                    lr: 0.3,
                    grad_norm: f64::NAN,
                    seconds: 0.5,
                    tokens: 500,
                },
            ],
            tokens_per_second: 1350.5,
            peak_memory_bytes: 123 << 20,
            truncated_rows: 3,
            eval: BTreeMap::from([("accuracy".to_string(), 0.75)]),
            stopped: "nan".into(),
            early_stop: None,
        }
    }

    #[test]
    fn report_json_round_trips_its_fields() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("report.json");
        report().write_json(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.contains("\n  \"backend\": \"cpu\""),
            "pretty JSON:\n{text}"
        );
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["config"]["prompt_len"], 20);
        assert_eq!(v["backend"], "cpu");
        assert_eq!(v["model"], "t5-small");
        assert_eq!(v["method"], "prompt");
        assert_eq!(v["train_params"], 10240);
        assert_eq!(v["stored_params"], 10240);
        assert_eq!(v["steps"][0]["step"], 1);
        assert_eq!(v["steps"][0]["loss"], 2.5);
        assert_eq!(v["steps"][0]["lr"], 0.3);
        assert_eq!(v["steps"][0]["grad_norm"], 1.5);
        assert_eq!(v["steps"][0]["seconds"], 0.25);
        assert_eq!(v["steps"][0]["tokens"], 512);
        assert!(v["steps"][1]["loss"].is_null(), "NaN is written as null");
        assert_eq!(v["tokens_per_second"], 1350.5);
        assert_eq!(v["peak_memory_bytes"], 123 << 20);
        assert_eq!(v["truncated_rows"], 3);
        assert_eq!(v["eval"]["accuracy"], 0.75);
        assert_eq!(v["stopped"], "nan");
        assert_eq!(v.as_object().unwrap().len(), 12);
        // Overwriting works and leaves no temp file.
        report().write_json(&path).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn report_to_a_missing_folder_is_an_io_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("no/such/report.json");
        let e = report().write_json(&path).unwrap_err();
        assert!(matches!(e, Error::Io { .. }), "{e}");
        assert!(e.to_string().contains("no/such/report.json"), "{e}");
    }

    #[test]
    fn vm_hwm_parsing() {
        let status = "Name:\tx\nVmPeak:\t  9000 kB\nVmHWM:\t    2048 kB\nVmRSS:\t 1000 kB\n";
        assert_eq!(parse_vm_hwm(status), Some(2048 * 1024));
        assert_eq!(parse_vm_hwm("VmRSS:\t 1000 kB\n"), None);
        assert_eq!(parse_vm_hwm("VmHWM:\t 1000 MB\n"), None);
        assert_eq!(parse_vm_hwm("VmHWM:\t x kB\n"), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn peak_rss_is_reported_on_linux() {
        let rss = peak_rss_bytes().unwrap();
        assert!(rss > 1 << 20, "{rss}");
    }

    /// Checks the SVG looks like a chart with a curve and returns its text.
    fn check_svg(path: &Path, title: &str) -> String {
        let svg = std::fs::read_to_string(path).unwrap();
        assert!(
            svg.starts_with("<svg") || svg.starts_with("<?xml"),
            "{}",
            &svg[..80]
        );
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(
            svg.contains("<polyline") || svg.contains("<path"),
            "no curve"
        );
        assert!(svg.contains(title), "no title");
        assert!(
            svg.contains(">\nstep\n<") || svg.contains(">step<"),
            "no x label"
        );
        assert!(
            svg.contains(">\nloss\n<") || svg.contains(">loss<"),
            "no y label"
        );
        svg
    }

    #[test]
    fn bars_svg_has_a_bar_per_value_labels_and_legend() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory.svg");
        let categories = vec!["t5-small".to_string(), "t5-base".to_string()];
        let series = vec![
            ("pt".to_string(), vec![100.0, 300.0]),
            ("lamp".to_string(), vec![90.0, f64::NAN]),
        ];
        write_bars_svg(&path, &categories, &series, "peak memory", "MB").unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.trim_end().ends_with("</svg>"));
        for text in ["t5-small", "t5-base", "pt", "lamp", "peak memory", "MB"] {
            assert!(svg.contains(text), "no {text}");
        }
        // Four bars + two legend swatches + the background, in the series colours.
        let blue = svg.matches("#1F77B4").count();
        let orange = svg.matches("#FF7F0E").count();
        assert_eq!((blue, orange), (3, 3), "bars and legend swatches");
        // A series whose length differs from the categories is refused, naming it.
        let bad = vec![("pt".to_string(), vec![1.0])];
        let err = write_bars_svg(&path, &categories, &bad, "t", "y").unwrap_err();
        assert!(err
            .to_string()
            .contains("\"pt\" has 1 values for 2 categories"));
    }

    #[test]
    fn loss_svg_with_one_point() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("loss.svg");
        write_loss_svg(&path, &[(7, 1.25)], "one step").unwrap();
        let svg = check_svg(&path, "one step");
        assert!(svg.contains("<circle"), "a single point gets a marker");
    }

    #[test]
    fn loss_svg_with_hundreds_of_points_and_special_values() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("loss.svg");
        let mut points: Vec<(u64, f64)> = (1..=500)
            .map(|s| (s, 3.0 / (1.0 + s as f64 / 50.0)))
            .collect();
        points[100].1 = f64::NAN;
        points[200].1 = f64::INFINITY;
        write_loss_svg(&path, &points, "t5-small <prompt> & \"quotes\"").unwrap();
        let svg = check_svg(&path, "t5-small &lt;prompt&gt; &amp;");
        assert!(!svg.contains("<circle"), "no markers on long runs");
        assert!(!svg.contains("NaN") && !svg.contains("inf"));

        // Constant loss (a flat range) still draws.
        write_loss_svg(&path, &[(1, 0.0), (2, 0.0)], "flat").unwrap();
        check_svg(&path, "flat");
    }

    #[test]
    fn long_runs_are_thinned_keeping_spikes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("loss.svg");
        let mut points: Vec<(u64, f64)> = (0..200_000).map(|s| (s, 1.0)).collect();
        points[123_457].1 = 50.0;
        write_loss_svg(&path, &points, "long").unwrap();
        let svg = check_svg(&path, "long");
        assert!(svg.len() < 200_000, "{} bytes", svg.len());

        let thinned = thin(&points, MAX_PLOTTED);
        assert!(thinned.len() <= MAX_PLOTTED);
        assert!(thinned.contains(&(123_457, 50.0)), "the spike survives");
        assert!(thinned.windows(2).all(|w| w[0].0 < w[1].0), "step order");
        assert_eq!(thin(&points[..10], MAX_PLOTTED), points[..10].to_vec());
    }

    /// The text of the SVG's title (its first `<text>` element holds the caption).
    fn svg_title(svg: &str) -> String {
        let start = svg.find("<text").unwrap();
        let open = start + svg[start..].find('>').unwrap() + 1;
        let close = open + svg[open..].find("</text>").unwrap();
        svg[open..close].trim().to_string()
    }

    #[test]
    fn a_long_title_keeps_the_end_of_its_path_and_fits_the_chart() {
        let long_dir = format!("/home/user/{}runs/rte-pt", "nested/".repeat(40));
        assert!(long_dir.len() > 300);
        let title = format!("pt on {long_dir}: loss");
        let short = fit_title(&title, TITLE_MAX_CHARS);
        assert!(short.chars().count() <= TITLE_MAX_CHARS, "{short}");
        assert_eq!(short, "pt on …/nested/nested/nested/runs/rte-pt: loss");
        // A short title is left alone; a word without a path keeps its start and end.
        assert_eq!(fit_title("pt on t5-tiny: loss", 52), "pt on t5-tiny: loss");
        let word = "x".repeat(100);
        let cut = fit_title(&word, 10);
        assert_eq!((cut.chars().count(), cut.contains('…')), (10, true));
        // In the chart: the caption is the shortened title.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("loss.svg");
        write_loss_svg(&path, &[(1, 2.0), (2, 1.0)], &title).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert_eq!(svg_title(&svg), short);
    }

    #[test]
    fn run_svg_draws_the_dev_loss_and_metric_with_a_legend_when_given() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("loss.svg");
        let train: Vec<(u64, f64)> = (1..=20).map(|s| (s, 3.0 - s as f64 * 0.1)).collect();
        let dev = [(5, 2.8), (10, 2.5), (15, f64::NAN), (20, 2.2)];
        let score = [(5, 0.5), (10, 0.625), (15, 0.7), (20, 0.75)];
        let chart = LossChart {
            title: "pt on t5: loss",
            train: &train,
            dev_loss: &dev,
            dev_metric: Some(("dev score (mean of accuracy)", &score)),
        };
        write_run_svg(&path, &chart).unwrap();
        let svg = check_svg(&path, "pt on t5: loss");
        for text in ["training loss", "dev loss", "dev score (mean of accuracy)"] {
            // The legend names each series (the metric's label is also its axis).
            assert!(svg.contains(text), "no {text}");
        }
        // One colour per series (the curve and its legend swatch).
        for colour in ["#1F77B4", "#FF7F0E", "#2CA02C"] {
            assert!(
                svg.contains(&format!("stroke=\"{colour}\"")),
                "no {colour} series"
            );
        }
        // Without dev points: the training loss alone, no legend.
        let alone = LossChart {
            dev_loss: &[],
            dev_metric: None,
            ..chart
        };
        write_run_svg(&path, &alone).unwrap();
        let svg = check_svg(&path, "pt on t5: loss");
        assert!(!svg.contains("dev loss") && !svg.contains("training loss"));
        assert!(svg.contains("stroke=\"#1F77B4\""));
        assert!(!svg.contains("#FF7F0E") && !svg.contains("#2CA02C"));
    }

    #[test]
    fn loss_svg_without_finite_points_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("loss.svg");
        for points in [&[][..], &[(1, f64::NAN)][..]] {
            let e = write_loss_svg(&path, points, "t").unwrap_err();
            assert!(matches!(e, Error::Input(_)), "{e}");
            assert!(e.to_string().contains("loss.svg"), "{e}");
        }
        assert!(!path.exists());
    }
}
