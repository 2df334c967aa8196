//! The bench's charts (SVG, drawn by train::report): peak memory per shape and setting, and the
//! claims' sweeps.

use std::path::{Path, PathBuf};

use super::claims::ClaimsReport;
use super::Report;
use crate::error::Result;
use crate::train::report::{write_bars_svg, write_line_svg};

/// Peak memory by shape, one bar per setting.
pub fn write_memory_chart(path: &Path, report: &Report) -> Result<()> {
    let mut shapes: Vec<String> = Vec::new();
    let mut settings: Vec<String> = Vec::new();
    // fastpt's cells only: an external row's memory is measured differently.
    let rows: Vec<_> = report
        .rows
        .iter()
        .filter(|r| r.external.is_none())
        .collect();
    for r in &rows {
        if !shapes.contains(&r.shape) {
            shapes.push(r.shape.clone());
        }
        if !settings.contains(&r.setting) {
            settings.push(r.setting.clone());
        }
    }
    let series: Vec<(String, Vec<f64>)> = settings
        .iter()
        .map(|setting| {
            let mb = shapes
                .iter()
                .map(|shape| {
                    rows.iter()
                        .find(|r| &r.shape == shape && &r.setting == setting)
                        .map_or(f64::NAN, |r| r.peak_memory_bytes as f64 / 1e6)
                })
                .collect();
            (setting.clone(), mb)
        })
        .collect();
    let title = format!(
        "peak memory by shape ({}, {})",
        report.backend, report.memory
    );
    write_bars_svg(path, &shapes, &series, &title, "MB")
}

/// One line chart per sweep of `report` (training step time against the swept setting), as
/// `dir/sweep-N.svg`; returns the paths written.
pub fn write_sweep_charts(dir: &Path, report: &ClaimsReport) -> Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    for (i, sweep) in report.sweeps.iter().enumerate() {
        let points: Vec<(u64, f64)> = sweep
            .points
            .iter()
            .map(|p| (p.x, p.train_step_ms.median))
            .collect();
        let path = dir.join(format!("sweep-{}.svg", i + 1));
        let title = format!("{} ({})", sweep.claim, sweep.shape);
        write_line_svg(&path, &points, &title, (&sweep.axis, "training step (ms)"))?;
        written.push(path);
    }
    Ok(written)
}
