//! `fastpt bench --claims`: the efficiency claims of ../shared/methods.md ("Efficiency claims to
//! re-measure") next to what fastpt measures in the same setting, the papers' sweeps (EPT-MS's
//! prompt length s at a fixed parameter budget, LAMP's pooling block p), and the other methods
//! against PT at the same shape (measured only: their papers make no efficiency claim).
//!
//! A claim runs at the papers' batch and input length (16 × 256, "Training defaults from the
//! papers") with its baseline and candidate in the same interleaved rounds; each sweep is a
//! second run at the bench's batch and lengths with every point and the baseline interleaved.
//! On a GPU the groups run at the papers' shapes (t5-base; t5-11b with NF4 weights); elsewhere,
//! or with `--shape`, at a stand-in shape. Every row says where it differs from the paper.

use serde::Serialize;

use super::{
    interval_note, run_bench, BenchClock, BenchConfig, Change, Machine, Report, Row, Setting, Stats,
};
use crate::error::{Error, Result};
use crate::model::flops::{t5_flops, StepTokens};
use crate::model::linear::Quant;
use crate::model::shapes::{shape_width, t5_shape};

/// The papers' batch size and maximum input length (../shared/methods.md, "Training defaults
/// from the papers"), which the claims are measured at.
pub const PAPER_BATCH: usize = 16;
pub const PAPER_INPUT_LEN: usize = 256;

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
    /// `(batch, input length)` of the claim's measurement: the papers' for a claim; None: the
    /// bench's `--batch` and `--input-len` (the groups without a paper figure).
    pub sizes: Option<(usize, usize)>,
    /// Where the candidate's setting comes from.
    pub source: String,
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

/// LAMP's paper reports its savings (−23.64% training time on T5-11B) without a pooling block
/// that any source we could read states. The block they imply: of the blocks that divide
/// l = 100, the one whose training-step FLOPs (fastpt's model of a step, [`t5_flops`]) at T5-11B,
/// batch 16, input 256 and `target_len` target tokens change by the amount closest to the
/// paper's figure. Returns `(p, the FLOPs change in %)`.
pub fn lamp_implied_pool(target_len: usize) -> Result<(u64, f64)> {
    let cfg = t5_shape("t5-11b")?;
    let flops = |prompt: usize| {
        t5_flops(
            &cfg,
            StepTokens {
                b: PAPER_BATCH,
                prompt,
                input: PAPER_INPUT_LEN,
                target: target_len,
            },
        )
    };
    let pt = flops(100);
    let change = |p: u64| (flops(100 / p as usize) / pt - 1.0) * 100.0;
    let paper = LAMP_TRAIN_TIME;
    let best = [1u64, 2, 4, 5, 10, 20, 25, 50, 100]
        .into_iter()
        .min_by(|a, b| {
            (change(*a) - paper)
                .abs()
                .total_cmp(&(change(*b) - paper).abs())
        })
        .unwrap_or(1);
    Ok((best, change(best)))
}

/// LAMP's training-time claim (Lan et al. 2025, T5-11B), in percent.
const LAMP_TRAIN_TIME: f64 = -23.64;

/// The groups of the claims table, each at `shape` or, when None, at its paper's shape; `m` is
/// the maximum input length (the length of EPT-MS's update), `target_len` the target tokens
/// (for LAMP's implied pooling block).
pub fn claim_groups(shape: Option<&str>, m: usize, target_len: usize) -> Result<Vec<ClaimGroup>> {
    let at = |paper_shape: &str| shape.unwrap_or(paper_shape).to_string();
    let pt = "pt:prompt_len=100".to_string();
    let ept_shape = at("t5-base");
    let d = shape_width(&ept_shape)?;
    let ept = |s: u64| {
        let r = ept_budget_rank(s as usize, d, m);
        format!("ept:source_len=100,prompt_len={s},rank={r}")
    };
    let lamp = |p: u64| format!("lamp:prompt_len=100,rank=8,pool={p}");
    let (p, flops_change) = lamp_implied_pool(target_len)?;
    let paper_sizes = Some((PAPER_BATCH, PAPER_INPUT_LEN));
    let mut groups = vec![ClaimGroup {
        name: "EPT-MS vs PT (Lan et al. 2024)",
        shape: ept_shape.clone(),
        paper_shape: "t5-base",
        quant: Quant::None,
        baseline: pt.clone(),
        // The paper's s = 60, r = 30 (at t5-base; a stand-in shape keeps PT's budget).
        candidate: ept(60),
        sizes: paper_sizes,
        source: "s = 60, r = 30: the paper's setting (Lan et al. 2024, Fig. 4b)".into(),
        paper: vec![(Metric::TrainTime, -14.0)],
        sweep: Some(Sweep {
            axis:
                "prompt length s (same parameter budget; s = 0 is the update alone, s = 100 is PT)",
            points: [0, 20, 40, 60, 80]
                .into_iter()
                .map(|s| (s, ept(s)))
                .chain([(100, pt.clone())])
                .collect(),
        }),
    }];
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
            sizes: None,
            source: "the method's defaults (../shared/methods.md); no efficiency claim".into(),
            paper: Vec::new(),
            sweep: None,
        });
    }
    // LAMP's group last: its T5-11B model is the slowest to build and run, so on a GPU
    // under a time limit the t5-base groups are written first.
    groups.push(ClaimGroup {
        name: "LAMP vs PT (Lan et al. 2025)",
        shape: at("t5-11b"),
        paper_shape: "t5-11b",
        quant: Quant::Nf4,
        baseline: pt.clone(),
        candidate: lamp(p),
        sizes: paper_sizes,
        source: format!(
            "p = {p}: no source we could read states the pooling block of the efficiency \
             figures; p = {p} is the block whose step FLOPs at T5-11B, batch 16 × 256 \
             change the closest to the paper's −23.64% ({flops_change:+.1}%)"
        ),
        paper: vec![
            (Metric::TrainTime, LAMP_TRAIN_TIME),
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
    });
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
    /// fastpt's relative change (%): the median over rounds for times, exact for parameters,
    /// the peaks' ratio for memory; None when it cannot be measured here (see `differences`).
    pub measured: Option<f64>,
    /// The interval of a time's change over the rounds (None for memory and parameters).
    pub change: Option<Change>,
    /// Where it was measured: batch, lengths, weights, device and dtype.
    pub setting: String,
    /// Where the candidate's setting comes from.
    pub source: String,
    /// How this measurement differs from the paper's.
    pub differences: String,
}

/// One point of a sweep.
#[derive(Debug, Clone, Serialize)]
pub struct SweepPoint {
    pub x: u64,
    pub setting: String,
    pub train_step_ms: Stats,
    pub generate_ms: Stats,
    /// The training step against the group's baseline, paired by round; None for the
    /// baseline itself.
    pub train_vs_baseline: Option<Change>,
}

/// One sweep's measurements.
#[derive(Debug, Clone, Serialize)]
pub struct SweepResult {
    pub claim: String,
    pub axis: String,
    pub shape: String,
    pub baseline: String,
    /// The baseline's training step in the sweep's rounds.
    pub baseline_train_ms: Stats,
    /// Batch × (input + target) of the sweep's run.
    pub setting: String,
    pub points: Vec<SweepPoint>,
}

/// Everything `--claims` measured.
#[derive(Debug, Clone, Serialize)]
pub struct ClaimsReport {
    pub schema: u32,
    pub machine: Machine,
    pub rounds: usize,
    pub rows: Vec<ClaimRow>,
    pub sweeps: Vec<SweepResult>,
    /// The underlying bench reports, one per claim and one per sweep.
    pub reports: Vec<Report>,
}

/// The change of `metric` from `base` to `cand`: `(median %, its interval)`; None for memory
/// measured as the process's RSS, which cannot tell settings of one process apart.
fn relative(metric: Metric, base: &Row, cand: &Row, memory: &str) -> (Option<f64>, Option<Change>) {
    let change = |new: f64, old: f64| (new / old - 1.0) * 100.0;
    let paired = |b: &Stats, c: &Stats, speed| {
        let ch = Change::paired(&b.samples, &c.samples, speed);
        (Some(ch.percent.median), Some(ch))
    };
    match metric {
        Metric::TrainTime => paired(&base.train_step_ms, &cand.train_step_ms, false),
        Metric::InferenceSpeed => paired(&base.generate_ms, &cand.generate_ms, true),
        Metric::Memory if memory.contains("RSS") => (None, None),
        Metric::Memory => (
            Some(change(
                cand.peak_memory_bytes as f64,
                base.peak_memory_bytes as f64,
            )),
            None,
        ),
        Metric::Params => (
            Some(change(cand.train_params as f64, base.train_params as f64)),
            None,
        ),
    }
}

/// Settings parsed, `first` first and each once.
fn settings_of<'a>(specs: impl IntoIterator<Item = &'a String>) -> Result<Vec<Setting>> {
    let mut seen: Vec<&String> = Vec::new();
    for s in specs {
        if !seen.contains(&s) {
            seen.push(s);
        }
    }
    seen.into_iter().map(|s| Setting::parse(s)).collect()
}

fn find_row<'r>(report: &'r Report, spec: &str) -> Result<&'r Row> {
    report
        .rows
        .iter()
        .find(|r| r.setting == spec && r.external.is_none())
        .ok_or_else(|| Error::Input(format!("claims: no measurement of {spec}")))
}

/// Runs every group at `shape` (or its paper shape when None): each claim at the papers' batch
/// and input length, each sweep at `base`'s (its shapes and settings are replaced; rounds, steps
/// and the rest are kept). `on_group` sees the report so far after each group (`fastpt bench
/// --claims --out` writes it then, so a run cut short keeps what finished).
pub fn run_claims<B: BenchClock + 'static>(
    be: &B,
    base: &BenchConfig,
    shape: Option<&str>,
    machine: &Machine,
    progress: &mut dyn FnMut(&str),
    on_group: &mut dyn FnMut(&ClaimsReport) -> Result<()>,
) -> Result<ClaimsReport> {
    let mut report = ClaimsReport {
        schema: 2,
        machine: machine.clone(),
        rounds: base.rounds,
        rows: Vec::new(),
        sweeps: Vec::new(),
        reports: Vec::new(),
    };
    // Each group's settings, sizes and memory are checked before the first measurement.
    let mut planned = Vec::new();
    for group in claim_groups(shape, base.max_len, base.target_len)? {
        let (batch, input_len) = group.sizes.unwrap_or((base.batch, base.input_len));
        let claim = BenchConfig {
            shapes: vec![group.shape.clone()],
            settings: settings_of([&group.baseline, &group.candidate])?,
            quant: group.quant,
            batch,
            input_len,
            max_len: base.max_len.max(input_len),
            ..base.clone()
        };
        let sweep = match &group.sweep {
            Some(sweep) => Some(BenchConfig {
                shapes: vec![group.shape.clone()],
                settings: settings_of(
                    std::iter::once(&group.baseline).chain(sweep.points.iter().map(|p| &p.1)),
                )?,
                quant: group.quant,
                ..base.clone()
            }),
            None => None,
        };
        for cfg in std::iter::once(&claim).chain(&sweep) {
            cfg.check_sizes()?;
            cfg.check_memory(be, &group.shape)?;
        }
        planned.push((group, claim, sweep));
    }
    let no_externals = &mut |_: &str, _: &[(String, usize)]| Ok(Vec::new());
    for (group, claim_cfg, sweep_cfg) in planned {
        let shape = group.shape.clone();
        let claim = run_bench(be, &claim_cfg, machine, progress, no_externals)?;
        let (b, c) = (
            find_row(&claim, &group.baseline)?,
            find_row(&claim, &group.candidate)?,
        );
        let setting = format!(
            "{shape}, batch {} × ({} in + {} target), {}{}",
            claim.batch,
            claim.input_len,
            claim.target_len,
            claim.backend,
            if group.quant == Quant::Nf4 {
                ", NF4 weights"
            } else {
                ""
            }
        );
        for metric in Metric::ALL {
            let paper = group.paper.iter().find(|(m, _)| *m == metric).map(|p| p.1);
            let (measured, change) = relative(metric, b, c, claim.memory);
            let mut differences = Vec::new();
            if measured.is_none() {
                differences.push("CPU: the process's peak RSS cannot separate settings".into());
            }
            if shape != group.paper_shape {
                differences.push(format!("stand-in shape (the paper: {})", group.paper_shape));
            }
            if !claim.backend.starts_with("cuda") {
                differences.push(format!("{} instead of a GPU", claim.backend));
            }
            if group.sizes.is_none() {
                differences.push(format!(
                    "the bench's batch and input length (the papers': {PAPER_BATCH} × {PAPER_INPUT_LEN})"
                ));
            }
            differences.push("random weights (time and memory do not depend on them)".into());
            report.rows.push(ClaimRow {
                claim: group.name.into(),
                shape: shape.clone(),
                paper_shape: group.paper_shape.into(),
                baseline: group.baseline.clone(),
                candidate: group.candidate.clone(),
                metric,
                paper,
                measured,
                change,
                setting: setting.clone(),
                source: group.source.clone(),
                differences: differences.join("; "),
            });
        }
        report.reports.push(claim);
        if let (Some(sweep), Some(cfg)) = (&group.sweep, &sweep_cfg) {
            let run = run_bench(be, cfg, machine, progress, no_externals)?;
            let base_row = find_row(&run, &group.baseline)?;
            let points = sweep
                .points
                .iter()
                .map(|(x, spec)| {
                    let r = find_row(&run, spec)?;
                    Ok(SweepPoint {
                        x: *x,
                        setting: spec.clone(),
                        train_step_ms: r.train_step_ms.clone(),
                        generate_ms: r.generate_ms.clone(),
                        train_vs_baseline: (*spec != group.baseline).then(|| {
                            Change::paired(
                                &base_row.train_step_ms.samples,
                                &r.train_step_ms.samples,
                                false,
                            )
                        }),
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            report.sweeps.push(SweepResult {
                claim: group.name.into(),
                axis: sweep.axis.into(),
                shape: shape.clone(),
                baseline: group.baseline.clone(),
                baseline_train_ms: base_row.train_step_ms.clone(),
                setting: format!(
                    "batch {} × ({} in + {} target)",
                    run.batch, run.input_len, run.target_len
                ),
                points,
            });
            report.reports.push(run);
        }
        on_group(&report)?;
    }
    Ok(report)
}

/// The claims table and the sweeps as markdown.
pub fn claims_markdown(report: &ClaimsReport) -> String {
    let mut s = format!(
        "Claims re-measured: {}\n\n{} interleaved rounds per measurement; {}\n\n\
         | claim | metric | paper | fastpt | measured at | baseline → candidate | differs from the paper |\n\
         |---|---|---:|---:|---|---|---|\n",
        report.machine.summary(),
        report.rounds,
        interval_note(report.rounds),
    );
    let pct = |x: Option<f64>| x.map_or("—".to_string(), |v| format!("{v:+.2}%"));
    for r in &report.rows {
        let fastpt = r.change.as_ref().map_or(pct(r.measured), Change::label);
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | `{}` → `{}` | {} |\n",
            r.claim,
            r.metric.label(),
            pct(r.paper),
            fastpt,
            r.setting,
            r.baseline,
            r.candidate,
            r.differences
        ));
    }
    let mut sources: Vec<(&str, &str)> = Vec::new();
    for r in &report.rows {
        if !sources.iter().any(|(c, _)| *c == r.claim) {
            sources.push((&r.claim, &r.source));
        }
    }
    s.push_str("\nSettings: ");
    s.push_str(
        &sources
            .iter()
            .map(|(c, src)| format!("{c}: {src}"))
            .collect::<Vec<_>>()
            .join(". "),
    );
    s.push_str(".\n");
    for sweep in &report.sweeps {
        s.push_str(&format!(
            "\n{} on {}, {}: {} (baseline `{}`: {} ms)\n\n| x | train step ms | vs baseline | generate ms |\n|---:|---:|---:|---:|\n",
            sweep.claim,
            sweep.shape,
            sweep.setting,
            sweep.axis,
            sweep.baseline,
            sweep.baseline_train_ms.label(),
        ));
        for p in &sweep.points {
            s.push_str(&format!(
                "| {} | {} | {} | {} |\n",
                p.x,
                p.train_step_ms.label(),
                p.train_vs_baseline
                    .as_ref()
                    .map_or("(baseline)".to_string(), Change::label),
                p.generate_ms.label(),
            ));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
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
            rounds: 1,
            steps: 1,
            quant: crate::model::linear::Quant::None,
            seed: 1,
        };
        let machine = Machine::probe(&be, Some("test"));
        let mut seen: Vec<usize> = Vec::new();
        let mut on_group = |r: &ClaimsReport| {
            seen.push(r.rows.len());
            Ok(())
        };
        let report = run_claims(
            &be,
            &cfg,
            Some("t5-tiny"),
            &machine,
            &mut |_| {},
            &mut on_group,
        )
        .unwrap();
        let groups = claim_groups(Some("t5-tiny"), 256, 3).unwrap();
        // One call per group, each with that group's four metrics added.
        let want: Vec<usize> = (1..=groups.len()).map(|g| 4 * g).collect();
        assert_eq!(seen, want);
        assert_eq!(report.rows.len(), 4 * groups.len());
        // One bench report per claim and one per sweep: the claims at the papers' 16 × 256,
        // the sweeps at the bench's sizes.
        let sweeps = groups.iter().filter(|g| g.sweep.is_some()).count();
        assert_eq!(report.reports.len(), groups.len() + sweeps);
        assert_eq!(
            (report.reports[0].batch, report.reports[0].input_len),
            (16, 256)
        );
        assert_eq!(
            (report.reports[1].batch, report.reports[1].input_len),
            (2, 12)
        );
        assert_eq!(report.sweeps.len(), sweeps);
        // A failure to write stops the run at once, with that error.
        let mut calls = 0;
        let mut failing = |_: &ClaimsReport| {
            calls += 1;
            Err(Error::Input("disk full".into()))
        };
        let err = run_claims(
            &be,
            &cfg,
            Some("t5-tiny"),
            &machine,
            &mut |_| {},
            &mut failing,
        )
        .unwrap_err();
        assert!(err.to_string().contains("disk full"), "{err}");
        assert_eq!(calls, 1);
    }

    #[test]
    fn every_setting_parses_and_the_ept_sweep_keeps_the_parameter_budget() {
        let groups = claim_groups(None, 256, 8).unwrap();
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
        let lamp = groups.last().unwrap();
        let count = |spec: &str| {
            let m: MethodConfig = Setting::parse(spec).unwrap().method.unwrap();
            m.param_counts(1024, 256).train as f64
        };
        let change = (count(&lamp.candidate) / count(&lamp.baseline) - 1.0) * 100.0;
        let paper = lamp.paper.iter().find(|p| p.0 == Metric::Params).unwrap().1;
        assert!((change - paper).abs() < 0.005, "{change} vs {paper}");
    }

    #[test]
    fn lamps_implied_pooling_block_is_the_one_closest_to_the_papers_time() {
        let (p, change) = lamp_implied_pool(8).unwrap();
        assert_eq!(100 % p, 0, "{p}");
        // Every other block that divides 100 predicts a change further from −23.64%.
        let cfg = t5_shape("t5-11b").unwrap();
        let flops = |rows: usize| {
            let x = StepTokens {
                b: 16,
                prompt: rows,
                input: 256,
                target: 8,
            };
            t5_flops(&cfg, x)
        };
        for q in [1usize, 2, 4, 5, 10, 20, 25, 50, 100] {
            let c = (flops(100 / q) / flops(100) - 1.0) * 100.0;
            assert!(
                (c + 23.64).abs() >= (change + 23.64).abs() - 1e-9,
                "p {q}: {c}"
            );
        }
        // Pooling only removes rows: the predicted saving grows with p.
        assert!(change < 0.0);
        let groups = claim_groups(None, 256, 8).unwrap();
        let lamp = groups.last().unwrap();
        assert_eq!(
            lamp.candidate,
            format!("lamp:prompt_len=100,rank=8,pool={p}")
        );
        assert!(lamp.source.contains(&format!("p = {p}")));
        assert_eq!(lamp.sizes, Some((16, 256)));
        eprintln!("LAMP's implied pooling block: p = {p} ({change:+.2}% step FLOPs)");
    }

    #[test]
    fn the_ept_sweep_at_a_stand_in_shape_keeps_pts_budget_to_a_rounding() {
        let (d, m) = (64, 256); // t5-tiny
        let groups = claim_groups(Some("t5-tiny"), m, 8).unwrap();
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
        assert!(claim_groups(Some("t5-huge"), m, 8).is_err());
    }

    fn row(step_ms: f64, forward_ms: f64, memory: u64, params: usize) -> Row {
        Row {
            shape: "s".into(),
            setting: "x".into(),
            external: None,
            prompt_rows: 1,
            train_step_ms: Stats::of(vec![step_ms]),
            train_vs_first: None,
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
        let r = |m| relative(m, &base, &cand, "device memory peak").0.unwrap();
        assert!((r(Metric::TrainTime) + 14.0).abs() < 1e-9);
        // 10 ms → 8 ms per batch is 25% more batches per second.
        assert!((r(Metric::InferenceSpeed) - 25.0).abs() < 1e-9);
        assert!((r(Metric::Memory) + 25.0).abs() < 1e-9);
        assert!((r(Metric::Params) + 75.0).abs() < 1e-9);
        assert!(relative(Metric::Memory, &base, &cand, "process peak RSS")
            .0
            .is_none());
        // Times carry their interval; memory and parameters are single figures.
        assert!(relative(Metric::TrainTime, &base, &cand, "heap peak")
            .1
            .is_some());
        assert!(relative(Metric::Params, &base, &cand, "heap peak")
            .1
            .is_none());
    }
}
