//! `fastpt bench --claims`: the efficiency claims of ../shared/methods.md ("Efficiency claims to
//! re-measure") next to what fastpt measures in the same setting, the papers' sweeps (EPT-MS's
//! prompt length s at a fixed parameter budget, LAMP's pooling block p), and the other methods
//! against PT at the same shape (measured only: their papers make no efficiency claim).
//!
//! On a GPU the groups run at the papers' shapes (t5-base; t5-11b with NF4 weights); elsewhere,
//! or with `--shape`, at a stand-in shape, which the table names.

use serde::Serialize;

use super::{run_bench, BenchClock, BenchConfig, Report, Row, Setting};
use crate::error::{Error, Result};
use crate::model::linear::Quant;
use crate::model::shapes::shape_width;

/// What a claim is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Training-step time, relative change (negative: faster).
    TrainTime,
    /// Inference speed (1 / greedy-generation time), relative change (positive: faster).
    InferenceSpeed,
    /// Peak memory, relative change.
    Memory,
    /// Train-time parameters, relative change.
    Params,
}

impl Metric {
    fn label(self) -> &'static str {
        match self {
            Metric::TrainTime => "training step time",
            Metric::InferenceSpeed => "inference speed",
            Metric::Memory => "peak memory",
            Metric::Params => "trainable params",
        }
    }

    const ALL: [Metric; 4] = [
        Metric::TrainTime,
        Metric::InferenceSpeed,
        Metric::Memory,
        Metric::Params,
    ];
}

/// A sweep of one option of the candidate.
pub struct Sweep {
    pub axis: &'static str,
    /// `(x, setting)`.
    pub points: Vec<(u64, String)>,
}

/// A candidate setting against a baseline at one shape.
pub struct ClaimGroup {
    pub name: &'static str,
    /// The built-in shape it runs at: the paper's, or the stand-in `--shape`.
    pub shape: String,
    pub paper_shape: &'static str,
    pub quant: Quant,
    pub baseline: String,
    pub candidate: String,
    /// The paper's relative changes, in percent; empty when the paper claims nothing.
    pub paper: Vec<(Metric, f64)>,
    pub sweep: Option<Sweep>,
}

/// EPT-MS's rank r at prompt length s holding the stored parameters s·d + (m + d)·r at PT's
/// l·d with l = 100 (the paper's budget): r = (100 − s)·d / (m + d), rounded. On t5-base (d 768,
/// m 256) that is r = 75 − 0.75·s, the paper's s = 60, r = 30 included.
pub fn ept_budget_rank(s: usize, d: usize, m: usize) -> usize {
    ((100 - s.min(100)) * d + (m + d) / 2) / (m + d)
}

/// The groups of the claims table, each at `shape` or, when None, at its paper's shape; `m` is
/// the maximum input length (the length of EPT-MS's update).
pub fn claim_groups(shape: Option<&str>, m: usize) -> Result<Vec<ClaimGroup>> {
    let at = |paper_shape: &str| shape.unwrap_or(paper_shape).to_string();
    let pt = "pt:prompt_len=100".to_string();
    let ept_shape = at("t5-base");
    let d = shape_width(&ept_shape)?;
    let ept = |s: u64| {
        let r = ept_budget_rank(s as usize, d, m);
        format!("ept:source_len=100,prompt_len={s},rank={r}")
    };
    let lamp = |p: u64| format!("lamp:prompt_len=100,rank=8,pool={p}");
    let mut groups = vec![
        ClaimGroup {
            name: "EPT-MS vs PT (Lan et al. 2024)",
            shape: ept_shape.clone(),
            paper_shape: "t5-base",
            quant: Quant::None,
            baseline: pt.clone(),
            candidate: ept(60),
            paper: vec![(Metric::TrainTime, -14.0)],
            sweep: Some(Sweep {
                axis: "prompt length s (same parameter budget; s = 0 is the update alone, s = 100 is PT)",
                points: [0, 20, 40, 60, 80]
                    .into_iter()
                    .map(|s| (s, ept(s)))
                    .chain([(100, pt.clone())])
                    .collect(),
            }),
        },
        ClaimGroup {
            name: "LAMP vs PT (Lan et al. 2025)",
            shape: at("t5-11b"),
            paper_shape: "t5-11b",
            quant: Quant::Nf4,
            baseline: pt.clone(),
            candidate: lamp(1),
            paper: vec![
                (Metric::TrainTime, -23.64),
                (Metric::InferenceSpeed, 31.0),
                (Metric::Memory, -24.49),
                (Metric::Params, -91.21),
            ],
            sweep: Some(Sweep {
                axis: "pooling block p",
                points: [1, 2, 4, 5, 10, 20]
                    .into_iter()
                    .map(|p| (p, lamp(p)))
                    .collect(),
            }),
        },
    ];
    for (name, candidate) in [
        ("DPT vs PT (Xiao et al. 2023)", "dpt:prompt_len=100,rank=10"),
        (
            "DePT vs PT (Shi & Lipani 2024)",
            "dept:prompt_len=60,rank=30",
        ),
        (
            "Residual PT vs PT (Razdaibiedina et al. 2023)",
            "residual:prompt_len=100",
        ),
        ("Explosive PT* vs PT", "xpt:repeats=10"),
    ] {
        groups.push(ClaimGroup {
            name,
            shape: at("t5-base"),
            paper_shape: "t5-base",
            quant: Quant::None,
            baseline: pt.clone(),
            candidate: candidate.into(),
            paper: Vec::new(),
            sweep: None,
        });
    }
    Ok(groups)
}

/// One line of the claims table.
#[derive(Debug, Clone, Serialize)]
pub struct ClaimRow {
    pub claim: String,
    pub shape: String,
    pub paper_shape: String,
    pub baseline: String,
    pub candidate: String,
    pub metric: Metric,
    /// The paper's relative change (%).
    pub paper: Option<f64>,
    /// fastpt's relative change (%); None when it cannot be measured here (see `note`).
    pub measured: Option<f64>,
    pub note: String,
}

/// One sweep's measurements: `(x, median training-step ms, median generation ms)`.
#[derive(Debug, Clone, Serialize)]
pub struct SweepResult {
    pub claim: String,
    pub axis: String,
    pub shape: String,
    pub points: Vec<(u64, f64, f64)>,
}

/// Everything `--claims` measured.
#[derive(Debug, Clone, Serialize)]
pub struct ClaimsReport {
    pub schema: u32,
    pub rows: Vec<ClaimRow>,
    pub sweeps: Vec<SweepResult>,
    /// The underlying bench reports, one per group.
    pub reports: Vec<Report>,
}

/// The relative change (%) of `metric` from `base` to `cand`; None for memory measured as the
/// process's RSS, which cannot tell settings of one process apart.
fn relative(metric: Metric, base: &Row, cand: &Row, memory: &str) -> Option<f64> {
    let change = |new: f64, old: f64| (new / old - 1.0) * 100.0;
    match metric {
        Metric::TrainTime => Some(change(cand.train_step_ms.median, base.train_step_ms.median)),
        Metric::InferenceSpeed => Some(change(base.generate_ms.median, cand.generate_ms.median)),
        Metric::Memory if memory.contains("RSS") => None,
        Metric::Memory => Some(change(
            cand.peak_memory_bytes as f64,
            base.peak_memory_bytes as f64,
        )),
        Metric::Params => Some(change(cand.train_params as f64, base.train_params as f64)),
    }
}

/// Runs every group at `shape` (or its paper shape when None), with the batch and step counts of
/// `base` (its shapes and settings are replaced). `on_group` sees the report so far after each
/// group (`fastpt bench --claims --out` writes it then, so a run cut short keeps what finished).
pub fn run_claims<B: BenchClock + 'static>(
    be: &B,
    base: &BenchConfig,
    shape: Option<&str>,
    progress: &mut dyn FnMut(&str),
    on_group: &mut dyn FnMut(&ClaimsReport) -> Result<()>,
) -> Result<ClaimsReport> {
    let mut rows = Vec::new();
    let mut sweeps = Vec::new();
    let mut reports = Vec::new();
    // Each group's settings, sizes and memory are checked before the first measurement.
    let mut planned = Vec::new();
    for group in claim_groups(shape, base.max_len)? {
        let mut specs = vec![group.baseline.clone(), group.candidate.clone()];
        if let Some(sweep) = &group.sweep {
            for (_, spec) in &sweep.points {
                if !specs.contains(spec) {
                    specs.push(spec.clone());
                }
            }
        }
        let settings = specs
            .iter()
            .map(|s| Setting::parse(s))
            .collect::<Result<Vec<_>>>()?;
        let cfg = BenchConfig {
            shapes: vec![group.shape.clone()],
            settings,
            quant: group.quant,
            ..base.clone()
        };
        cfg.check_sizes()?;
        cfg.check_memory(be, &group.shape)?;
        planned.push((group, cfg));
    }
    for (group, cfg) in planned {
        let shape = group.shape.clone();
        let report = run_bench(be, &cfg, progress)?;
        let row_of = |spec: &str| -> Result<&Row> {
            report
                .rows
                .iter()
                .find(|r| r.setting == spec)
                .ok_or_else(|| Error::Input(format!("claims: no measurement of {spec}")))
        };
        let (b, c) = (row_of(&group.baseline)?, row_of(&group.candidate)?);
        for metric in Metric::ALL {
            let paper = group.paper.iter().find(|(m, _)| *m == metric).map(|p| p.1);
            let measured = relative(metric, b, c, report.memory);
            let mut notes = Vec::new();
            if measured.is_none() {
                notes.push("CPU: the process's peak RSS cannot separate settings".to_string());
            }
            if group.quant == Quant::Nf4 {
                notes.push("NF4 frozen weights".to_string());
            }
            if shape != group.paper_shape {
                notes.push(format!("stand-in shape (the paper: {})", group.paper_shape));
            }
            let note = notes.join("; ");
            rows.push(ClaimRow {
                claim: group.name.into(),
                shape: shape.clone(),
                paper_shape: group.paper_shape.into(),
                baseline: group.baseline.clone(),
                candidate: group.candidate.clone(),
                metric,
                paper,
                measured,
                note,
            });
        }
        if let Some(sweep) = &group.sweep {
            let points = sweep
                .points
                .iter()
                .map(|(x, spec)| {
                    row_of(spec).map(|r| (*x, r.train_step_ms.median, r.generate_ms.median))
                })
                .collect::<Result<Vec<_>>>()?;
            sweeps.push(SweepResult {
                claim: group.name.into(),
                axis: sweep.axis.into(),
                shape: shape.clone(),
                points,
            });
        }
        reports.push(report);
        on_group(&ClaimsReport {
            schema: 1,
            rows: rows.clone(),
            sweeps: sweeps.clone(),
            reports: reports.clone(),
        })?;
    }
    Ok(ClaimsReport {
        schema: 1,
        rows,
        sweeps,
        reports,
    })
}

/// The claims table and the sweeps as markdown.
pub fn claims_markdown(report: &ClaimsReport) -> String {
    let backend = report.reports.first().map_or("?", |r| r.backend.as_str());
    let mut s = format!(
        "Claims re-measured on {backend} (relative change of the candidate against the baseline):\n\n\
         | claim | metric | paper | fastpt | shape | baseline → candidate | note |\n\
         |---|---|---:|---:|---|---|---|\n"
    );
    let pct = |x: Option<f64>| x.map_or("—".to_string(), |v| format!("{v:+.2}%"));
    for r in &report.rows {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | `{}` → `{}` | {} |\n",
            r.claim,
            r.metric.label(),
            pct(r.paper),
            pct(r.measured),
            r.shape,
            r.baseline,
            r.candidate,
            r.note
        ));
    }
    for sweep in &report.sweeps {
        s.push_str(&format!(
            "\n{} on {}: {}\n\n| x | train step ms | generate ms |\n|---:|---:|---:|\n",
            sweep.claim, sweep.shape, sweep.axis
        ));
        for (x, train, fwd) in &sweep.points {
            s.push_str(&format!("| {x} | {train:.2} | {fwd:.2} |\n"));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::Stats;
    use crate::prompt::MethodConfig;

    #[test]
    fn each_finished_group_is_reported_before_the_next_starts() {
        let be = crate::backend::cpu::CpuBackend::<f32>::new();
        let cfg = BenchConfig {
            shapes: Vec::new(),
            settings: Vec::new(),
            batch: 2,
            input_len: 12,
            target_len: 3,
            // The EPT-MS group's update covers m = 256 rows (its source_len is 100).
            max_len: 256,
            warmup: 0,
            steps: 1,
            quant: crate::model::linear::Quant::None,
            seed: 1,
        };
        let mut seen: Vec<usize> = Vec::new();
        let mut on_group = |r: &ClaimsReport| {
            seen.push(r.rows.len());
            Ok(())
        };
        let report = run_claims(&be, &cfg, Some("t5-tiny"), &mut |_| {}, &mut on_group).unwrap();
        let groups = claim_groups(Some("t5-tiny"), 256).unwrap().len();
        // One call per group, each with that group's four metrics added.
        let want: Vec<usize> = (1..=groups).map(|g| 4 * g).collect();
        assert_eq!(seen, want);
        assert_eq!(report.rows.len(), 4 * groups);
        // A failure to write stops the run at once, with that error.
        let mut calls = 0;
        let mut failing = |_: &ClaimsReport| {
            calls += 1;
            Err(Error::Input("disk full".into()))
        };
        let err = run_claims(&be, &cfg, Some("t5-tiny"), &mut |_| {}, &mut failing).unwrap_err();
        assert!(err.to_string().contains("disk full"), "{err}");
        assert_eq!(calls, 1);
    }

    #[test]
    fn every_setting_parses_and_the_ept_sweep_keeps_the_parameter_budget() {
        let groups = claim_groups(None, 256).unwrap();
        for g in &groups {
            Setting::parse(&g.baseline).unwrap();
            Setting::parse(&g.candidate).unwrap();
            for (_, spec) in g.sweep.iter().flat_map(|s| &s.points) {
                Setting::parse(spec).unwrap();
            }
        }
        // t5-base (d 768, m 256): stored s·d + (m + d)·r = 76,800 at every s of the sweep.
        let ept = &groups[0];
        assert_eq!(ept.shape, "t5-base");
        assert_eq!(ept.candidate, "ept:source_len=100,prompt_len=60,rank=30");
        for (s, spec) in &ept.sweep.as_ref().unwrap().points {
            let cfg = Setting::parse(spec).unwrap().method.unwrap();
            let stored = cfg.param_counts(768, 256).stored;
            assert_eq!(stored, 76_800, "s = {s}: {spec}");
        }
        // LAMP's parameter claim is exact: 9,000 vs 102,400 at d = 1024.
        let lamp = &groups[1];
        let count = |spec: &str| {
            let m: MethodConfig = Setting::parse(spec).unwrap().method.unwrap();
            m.param_counts(1024, 256).train as f64
        };
        let change = (count(&lamp.candidate) / count(&lamp.baseline) - 1.0) * 100.0;
        let paper = lamp.paper.iter().find(|p| p.0 == Metric::Params).unwrap().1;
        assert!((change - paper).abs() < 0.005, "{change} vs {paper}");
    }

    #[test]
    fn the_ept_sweep_at_a_stand_in_shape_keeps_pts_budget_to_a_rounding() {
        let (d, m) = (64, 256); // t5-tiny
        let groups = claim_groups(Some("t5-tiny"), m).unwrap();
        assert!(groups.iter().all(|g| g.shape == "t5-tiny"));
        let points = &groups[0].sweep.as_ref().unwrap().points;
        assert_eq!(
            points.iter().map(|p| p.0).collect::<Vec<_>>(),
            [0, 20, 40, 60, 80, 100]
        );
        for (s, spec) in points {
            let cfg = Setting::parse(spec).unwrap().method.unwrap();
            cfg.validate(d, m).unwrap();
            let stored = cfg.param_counts(d, m).stored as i64;
            assert!(
                (stored - 100 * d as i64).abs() <= (m + d) as i64 / 2,
                "s = {s}: {spec} stores {stored}"
            );
        }
        assert!(claim_groups(Some("t5-huge"), m).is_err());
    }

    fn row(step_ms: f64, forward_ms: f64, memory: u64, params: usize) -> Row {
        Row {
            shape: "s".into(),
            setting: "x".into(),
            prompt_rows: 1,
            train_step_ms: Stats::of(vec![step_ms]),
            train_tokens_per_s: 1.0,
            train_tflops: 1.0,
            mfu: None,
            forward_ms: Stats::of(vec![forward_ms]),
            generate_ms: Stats::of(vec![forward_ms]),
            peak_memory_bytes: memory,
            train_params: params,
            stored_params: params,
            final_loss: 1.0,
        }
    }

    #[test]
    fn relative_changes_have_the_papers_signs() {
        let (base, cand) = (row(100.0, 10.0, 1000, 400), row(86.0, 8.0, 750, 100));
        let r = |m| relative(m, &base, &cand, "device memory peak").unwrap();
        assert!((r(Metric::TrainTime) + 14.0).abs() < 1e-9);
        // 10 ms → 8 ms per batch is 25% more batches per second.
        assert!((r(Metric::InferenceSpeed) - 25.0).abs() < 1e-9);
        assert!((r(Metric::Memory) + 25.0).abs() < 1e-9);
        assert!((r(Metric::Params) + 75.0).abs() < 1e-9);
        assert_eq!(
            relative(Metric::Memory, &base, &cand, "process peak RSS"),
            None
        );
    }
}
