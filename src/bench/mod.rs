//! `fastpt bench`: training-step and inference time, memory and parameters of prompt methods on
//! built-in shapes with random weights (efficiency depends on shapes, not weight values).
//!
//! Each shape builds the model and every setting's method once, warms each cell up, then runs
//! interleaved rounds: in each round every cell (in an order rotated by one per round) times
//! `steps` training steps (forward, input-gradient backward, method backward, AdamW), as many
//! forward-only passes (loss) and as many greedy generations of the target length (the papers'
//! inference: KV cache, no early stop). Drift of the machine hits all cells of a round alike, so
//! comparisons pair cells by round ([`stats`]): medians with confidence intervals, and `≈` where a
//! difference cannot be told from noise. Times come from device events on a GPU
//! ([`BenchClock`]), from the host clock on the CPU; every report names the machine and commit
//! ([`machine`]).
//!
//! [`claims`] runs the papers' efficiency claims on top of this; [`baseline`] runs PyTorch +
//! PEFT as an [`External`] cell in the same rounds.

pub mod baseline;
pub mod charts;
pub mod claims;
pub mod heap;
pub mod machine;
pub mod ranks;
pub mod stats;

use std::time::Instant;

use serde::Serialize;

use crate::backend::cpu::{CpuBackend, Float};
use crate::backend::gpu::device::Device;
use crate::backend::gpu::GpuBackend;
use crate::backend::Backend;
use crate::config::{TrainConfig, MAX_BATCH_SIZE, MAX_SEQ_LEN};
use crate::engine::{build_backbone_method, forward_loss, generate_greedy, train_step};
use crate::error::{Error, Result};
use crate::model::flops::StepTokens;
use crate::model::generate::GenerateConfig;
use crate::model::linear::Quant;
use crate::model::memory::{check_model, ModelShape, Workload};
use crate::model::random_model;
use crate::prompt::{train_params, zero_grads, MethodConfig};
use crate::train::optim::Optimizer;
use crate::train::report::peak_rss_bytes;
pub use machine::Machine;
pub use stats::{Change, Stats, MAX_ROUNDS};

/// How a backend times work and reports its memory.
pub trait BenchClock: Backend {
    /// Runs `f` and returns the milliseconds the device spent on it (all of its work, queued or
    /// not, finished before the clock stops).
    fn time_ms(&self, f: &mut dyn FnMut()) -> f64;
    /// Peak memory since [`BenchClock::reset_peak_memory`]: `(bytes, what was measured)`.
    fn peak_memory(&self) -> (u64, &'static str);
    fn reset_peak_memory(&self);
    /// The memory held now, in the units of [`BenchClock::peak_memory`] (0 where only the
    /// process's RSS is known).
    fn current_memory(&self) -> u64;
    /// The GEMM throughput this device reaches (TFLOP/s), measured, for MFU; None where MFU
    /// means nothing (the CPU, the virtual GPU).
    fn gemm_peak_tflops(&self) -> Option<f64> {
        None
    }
    /// Device-to-device copy bandwidth (GB/s, bytes read + written), measured; None off a GPU.
    fn copy_bandwidth_gbs(&self) -> Option<f64> {
        None
    }
    /// Facts about the device for the report (driver, compute capability, ...).
    fn device_facts(&self) -> Vec<String> {
        Vec::new()
    }
}

impl<T: Float> BenchClock for CpuBackend<T> {
    fn time_ms(&self, f: &mut dyn FnMut()) -> f64 {
        let start = Instant::now();
        f();
        start.elapsed().as_secs_f64() * 1e3
    }

    /// The heap peak when the binary counts allocations ([`heap::PeakAlloc`]), else the
    /// process's peak resident set, which cannot be reset and so covers the whole run.
    fn peak_memory(&self) -> (u64, &'static str) {
        match heap::heap_peak_bytes() {
            Some(bytes) => (bytes, "heap peak"),
            None => (peak_rss_bytes().unwrap_or(0), "process peak RSS"),
        }
    }

    fn reset_peak_memory(&self) {
        heap::reset_heap_peak();
    }

    fn current_memory(&self) -> u64 {
        heap::heap_current_bytes().unwrap_or(0)
    }
}

impl<D: Device> BenchClock for GpuBackend<D> {
    fn time_ms(&self, f: &mut dyn FnMut()) -> f64 {
        let dev = self.device();
        // A failed event is a device failure, not input: fatal, as every op of the GPU
        // backend (see `GpuBackend::expect`).
        let start = dev.record_event().expect("record a device event");
        f();
        let end = dev.record_event().expect("record a device event");
        dev.elapsed_ms(&start, &end)
            .expect("elapsed time between device events")
    }

    fn peak_memory(&self) -> (u64, &'static str) {
        (self.device().memory().peak() as u64, "device memory peak")
    }

    fn reset_peak_memory(&self) {
        self.device().memory().reset_peak();
    }

    fn current_memory(&self) -> u64 {
        self.device().memory().current() as u64
    }

    fn device_facts(&self) -> Vec<String> {
        self.device().describe()
    }

    /// Copies of 1 GiB: the best of 3 rounds of 10, counting the bytes read and written.
    fn copy_bandwidth_gbs(&self) -> Option<f64> {
        if !self.device().name().starts_with("cuda") {
            return None;
        }
        let dev = self.device();
        let bytes = 1usize << 30;
        let src = dev.alloc(bytes).ok()?;
        let mut dst = dev.alloc(bytes).ok()?;
        dev.copy(&mut dst, &src, bytes).ok()?;
        let mut best_ms = f64::INFINITY;
        for _ in 0..3 {
            let mut ok = true;
            let ms = self.time_ms(&mut || {
                for _ in 0..10 {
                    ok &= dev.copy(&mut dst, &src, bytes).is_ok();
                }
            });
            if !ok {
                return None;
            }
            best_ms = best_ms.min(ms);
        }
        Some(2.0 * bytes as f64 * 10.0 / (best_ms / 1e3) / 1e9)
    }

    /// Square GEMMs of 8192 in the backend's dtype: the best of 3 rounds of 10.
    fn gemm_peak_tflops(&self) -> Option<f64> {
        if !self.device().name().starts_with("cuda") {
            return None;
        }
        let n = 8192;
        let (a, b) = (self.zeros(n * n), self.zeros(n * n));
        let mut c = self.zeros(n * n);
        let g = crate::backend::Gemm::nn(n, n, n);
        self.matmul(&mut c, &a, &b, g);
        let best_ms = (0..3)
            .map(|_| {
                self.time_ms(&mut || {
                    for _ in 0..10 {
                        self.matmul(&mut c, &a, &b, g);
                    }
                })
            })
            .fold(f64::INFINITY, f64::min);
        Some(2.0 * (n as f64).powi(3) * 10.0 / (best_ms / 1e3) / 1e12)
    }
}

/// One prompt-method setting of the matrix: a name and the method (None: the backbone alone,
/// input gradient only).
#[derive(Debug, Clone)]
pub struct Setting {
    pub name: String,
    pub method: Option<MethodConfig>,
}

impl Setting {
    /// `none`, or a method name with `key=value` options (`pt`, `ept:prompt_len=60,rank=30`).
    pub fn parse(spec: &str) -> Result<Self> {
        let (name, options) = spec.split_once(':').unwrap_or((spec, ""));
        if name == "none" {
            return Ok(Setting {
                name: spec.into(),
                method: None,
            });
        }
        let toml: String = options
            .split(',')
            .filter(|kv| !kv.trim().is_empty())
            .map(|kv| format!("{}\n", kv.trim()))
            .collect();
        let method = MethodConfig::from_toml(name, &toml).map_err(|e| {
            Error::Input(format!(
                "--setting {spec:?}: {e} (expected NAME or NAME:key=value,...)"
            ))
        })?;
        Ok(Setting {
            name: spec.into(),
            method: Some(method),
        })
    }
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub shapes: Vec<String>,
    pub settings: Vec<Setting>,
    pub batch: usize,
    /// Input tokens per row (encoder for T5, the text for Llama).
    pub input_len: usize,
    /// Target tokens per row (T5 decoder; Llama labels at the end of the text).
    pub target_len: usize,
    /// Maximum input length m (the length of DePT's and EPT-MS's embedding update), ≥ input_len.
    pub max_len: usize,
    pub warmup: usize,
    /// Interleaved rounds (see [`run_bench`]).
    pub rounds: usize,
    /// Timed steps of each kind per cell and round.
    pub steps: usize,
    pub quant: Quant,
    pub seed: u64,
}

/// `--steps` and `--warmup`: timed steps per round and untimed steps (the report keeps one value
/// per round and kind, so only time grows with them).
pub const MAX_BENCH_STEPS: usize = 1_000_000;

impl BenchConfig {
    /// Every size in 1..=its limit (`--batch` and the lengths as a run's, see
    /// [`crate::config`]; steps [`MAX_BENCH_STEPS`]), the flag, value and limit named.
    pub fn check_sizes(&self) -> Result<()> {
        for (flag, v, min, limit, name) in [
            ("--steps", self.steps, 1, MAX_BENCH_STEPS, "MAX_BENCH_STEPS"),
            ("--rounds", self.rounds, 1, MAX_ROUNDS, "MAX_ROUNDS"),
            (
                "--warmup",
                self.warmup,
                0,
                MAX_BENCH_STEPS,
                "MAX_BENCH_STEPS",
            ),
            ("--batch", self.batch, 1, MAX_BATCH_SIZE, "MAX_BATCH_SIZE"),
            ("--input-len", self.input_len, 1, MAX_SEQ_LEN, "MAX_SEQ_LEN"),
            (
                "--target-len",
                self.target_len,
                1,
                MAX_SEQ_LEN,
                "MAX_SEQ_LEN",
            ),
            ("--max-len", self.max_len, 0, MAX_SEQ_LEN, "MAX_SEQ_LEN"),
        ] {
            if v < min || v > limit {
                return Err(Error::Input(format!(
                    "bench {flag} {v}: must be in {min}..={limit} ({name})"
                )));
            }
        }
        Ok(())
    }

    /// Checks every setting's method at `shape` and the memory of the largest cell (a training
    /// step, the forward passes, generation of `target_len` tokens) before the model is built.
    pub fn check_memory<B: Backend>(&self, be: &B, shape: &str) -> Result<()> {
        let m = self.max_len.max(self.input_len);
        let d = ModelShape::of_model(shape)?.width();
        let mut work = Workload {
            train_batch: self.batch,
            forward_batch: self.batch,
            generate_batch: self.batch,
            input_len: self.input_len,
            target_len: self.target_len,
            max_new_tokens: self.target_len,
            ..Workload::default()
        };
        for method in self.settings.iter().filter_map(|s| s.method.as_ref()) {
            method.validate(d, m)?;
            work.prompt_rows = work.prompt_rows.max(method.prompt_rows());
            work.method_params = work
                .method_params
                .max(method.param_counts(d, m).train as u128);
        }
        let what = format!(
            "bench --shape {shape} (--batch {}, --input-len {}, --target-len {})",
            self.batch, self.input_len, self.target_len
        );
        check_model(be, shape, self.quant, &work, &what)
    }
}

/// One cell of the matrix.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub shape: String,
    pub setting: String,
    /// Who measured it when not fastpt (the PEFT baseline: its libraries and device), and what
    /// its memory figure is; None for fastpt's own cells.
    pub external: Option<ExternalInfo>,
    /// Prompt rows in front of the input.
    pub prompt_rows: usize,
    /// Per-step time of each round (`samples`, in round order), their median and its interval.
    pub train_step_ms: Stats,
    /// The change of the training step against the first cell of the shape (paired by round);
    /// None for the first cell.
    pub train_vs_first: Option<Change>,
    /// Input + target tokens (prompt rows excluded) per second of training step.
    pub train_tokens_per_s: f64,
    /// FLOPs of one training step ([`crate::model::Family::train_step_flops`]) over its median
    /// time.
    pub train_tflops: f64,
    /// `train_tflops` over the measured GEMM peak (GPU only).
    pub mfu: Option<f64>,
    /// Forward pass (loss only) per round; empty for an external row that does not measure it.
    pub forward_ms: Stats,
    /// Inference: greedy generation of `target_len` tokens per row (no early stop), prompt rows
    /// in front, KV cache; per round.
    pub generate_ms: Stats,
    /// The most memory the cell needed at once, as if it were alone (see [`run_bench`]).
    pub peak_memory_bytes: u64,
    pub train_params: usize,
    pub stored_params: usize,
    /// The loss of the last training step (NaN for an external row).
    pub final_loss: f64,
}

/// What an external row (the PEFT baseline) is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExternalInfo {
    /// "torch 2.15 cpu float32, transformers 5.24, peft 0.21.2".
    pub backend: String,
    /// What its `peak_memory_bytes` measures.
    pub memory: String,
}

/// The whole run, as report.json holds it.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub schema: u32,
    pub backend: String,
    /// The machine and commit that measured it.
    pub machine: Machine,
    pub memory: &'static str,
    pub quant: String,
    pub batch: usize,
    pub input_len: usize,
    pub target_len: usize,
    pub warmup: usize,
    /// Interleaved rounds, and timed steps of each kind per cell and round.
    pub rounds: usize,
    pub steps: usize,
    pub rows: Vec<Row>,
}

/// One round's times of a cell: milliseconds per training step, per forward pass and per
/// generation (each the mean of the round's `steps`; NaN where not measured).
#[derive(Debug, Clone, Copy)]
pub struct RoundTimes {
    pub train: f64,
    pub forward: f64,
    pub generate: f64,
}

/// A cell timed in the rounds beside fastpt's own: `fastpt bench --baseline`'s PEFT process.
pub trait External {
    /// Its setting's name in the report.
    fn setting(&self) -> String;
    fn prompt_rows(&self) -> usize;
    /// One round of `steps` timed steps of each kind it measures.
    fn round(&mut self) -> Result<RoundTimes>;
    /// After the last round: its peak memory (bytes), trainable parameters and what it is.
    fn finish(&mut self) -> Result<(u64, usize, ExternalInfo)>;
}

/// Makes the external cells of a shape from fastpt's cells there (`(setting, prompt rows)`).
pub type Externals<'a> = dyn FnMut(&str, &[(String, usize)]) -> Result<Vec<Box<dyn External>>> + 'a;

/// The test hook of the statistics: `FASTPT_BENCH_TEST_DELAY=SETTING=MS` adds MS milliseconds
/// of sleep to every training step of the cells named SETTING (fastpt's tests slow one of two
/// identical settings down and check the bench reports the difference as significant).
pub const TEST_DELAY_ENV: &str = "FASTPT_BENCH_TEST_DELAY";

fn test_delay(setting: &str) -> Option<std::time::Duration> {
    let spec = std::env::var(TEST_DELAY_ENV).ok()?;
    let (name, ms) = spec.rsplit_once('=')?;
    let ms: f64 = ms.trim().parse().ok()?;
    (name == setting && ms.is_finite() && ms > 0.0)
        .then(|| std::time::Duration::from_secs_f64(ms.min(60_000.0) / 1e3))
}

/// fastpt's cell of one setting at one shape: the method and its optimizer, kept for all rounds.
struct Cell<'s, B: Backend> {
    setting: &'s Setting,
    method: Option<Box<dyn crate::prompt::PromptMethod<B>>>,
    optim: Option<Optimizer<B>>,
    delay: Option<std::time::Duration>,
    /// Bytes the cell holds between rounds (its parameters, gradients, optimizer state).
    own_bytes: i128,
    /// The most it needed at once, counted as if it were the only cell.
    peak_bytes: u64,
    rounds: Vec<RoundTimes>,
    final_loss: f64,
}

/// What every cell of a shape shares.
struct ShapeWork<B: Backend> {
    model: crate::model::Backbone<B>,
    batch: crate::data::HostBatch,
    infer_batch: crate::data::HostBatch,
    gen: GenerateConfig,
    /// Bytes held before the first cell was built (the model, the batches).
    base_bytes: i128,
}

impl<B: BenchClock + 'static> Cell<'_, B> {
    /// Runs `f` with the memory accounting of a cell: the peak during `f`, less what other
    /// cells hold, plus what this cell holds.
    fn metered<T>(&mut self, be: &B, base: i128, f: impl FnOnce(&mut Self) -> T) -> T {
        let before = be.current_memory() as i128;
        be.reset_peak_memory();
        let out = f(self);
        let peak = be.peak_memory().0 as i128;
        let after = be.current_memory() as i128;
        let alone = peak - before + base + self.own_bytes;
        self.peak_bytes = self.peak_bytes.max(alone.max(0) as u64);
        self.own_bytes += after - before;
        out
    }

    fn train_step(&mut self, be: &B, w: &ShapeWork<B>) -> Result<f64> {
        let loss = train_step(be, &w.model, self.method.as_deref_mut(), &w.batch)?;
        if let (Some(m), Some(opt)) = (self.method.as_deref_mut(), self.optim.as_mut()) {
            opt.step(be, m, 1.0, 1.0);
            zero_grads(be, m);
        }
        if let Some(d) = self.delay {
            std::thread::sleep(d);
        }
        self.final_loss = loss;
        Ok(loss)
    }

    /// A forward pass (the loss only).
    fn forward(&mut self, be: &B, w: &ShapeWork<B>) -> Result<()> {
        forward_loss(be, &w.model, self.method.as_deref_mut(), &w.batch).map(|_| ())
    }

    /// Greedy generation of the target length, prompt rows in front.
    fn generate(&mut self, be: &B, w: &ShapeWork<B>) -> Result<()> {
        let m = self.method.as_deref_mut();
        generate_greedy(be, &w.model, m, &w.infer_batch, &w.gen).map(|_| ())
    }

    fn warm_up(&mut self, be: &B, w: &ShapeWork<B>, warmup: usize) -> Result<()> {
        self.metered(be, w.base_bytes, |c| {
            for _ in 0..warmup {
                c.train_step(be, w)?;
            }
            if warmup > 0 {
                c.forward(be, w)?;
                c.generate(be, w)?;
            }
            Ok(())
        })
    }

    /// `steps` timed training steps, forward passes and generations.
    fn round(&mut self, be: &B, w: &ShapeWork<B>, steps: usize) -> Result<()> {
        let times = self.metered(be, w.base_bytes, |c| -> Result<RoundTimes> {
            let mean = |f: &mut dyn FnMut() -> Result<()>| -> Result<f64> {
                let mut total = 0.0;
                for _ in 0..steps {
                    let mut out = Ok(());
                    total += be.time_ms(&mut || out = f());
                    out?;
                }
                Ok(total / steps as f64)
            };
            let train = mean(&mut || c.train_step(be, w).map(|_| ()))?;
            let forward = mean(&mut || c.forward(be, w))?;
            let generate = mean(&mut || c.generate(be, w))?;
            Ok(RoundTimes {
                train,
                forward,
                generate,
            })
        })?;
        self.rounds.push(times);
        Ok(())
    }
}

/// A setting's method at the bench's sizes and seed, with its optimizer (None, None: the
/// backbone alone).
#[allow(clippy::type_complexity)]
fn build_setting<B: Backend + 'static>(
    be: &B,
    model: &crate::model::Backbone<B>,
    setting: &Setting,
    cfg: &BenchConfig,
) -> Result<(
    Option<Box<dyn crate::prompt::PromptMethod<B>>>,
    Option<Optimizer<B>>,
)> {
    let method = match &setting.method {
        Some(m) => Some(build_backbone_method(
            be,
            model,
            m,
            cfg.max_len.max(cfg.input_len),
            cfg.seed,
            None,
        )?),
        None => None,
    };
    let optim = method
        .as_deref()
        .map(|m| Optimizer::new(be, m, &TrainConfig::default()));
    Ok((method, optim))
}

/// The per-round values of one kind of time.
fn per_round(rounds: &[RoundTimes], kind: fn(&RoundTimes) -> f64) -> Vec<f64> {
    rounds.iter().map(kind).collect()
}

/// Runs the matrix; `progress` is told what starts. Each shape builds every setting's cell,
/// warms each up, then runs `rounds` interleaved rounds (cell order rotated by one each round)
/// of `steps` timed steps per cell, with the `externals` of the shape (the PEFT baseline) taking
/// their turn in the same rotation. All cells stay alive during the rounds; a cell's peak memory
/// is what it needed at once as if it were alone (the model, the batches and its own state,
/// without the other cells').
pub fn run_bench<B: BenchClock + 'static>(
    be: &B,
    cfg: &BenchConfig,
    machine: &Machine,
    progress: &mut dyn FnMut(&str),
    externals: &mut Externals<'_>,
) -> Result<Report> {
    cfg.check_sizes()?;
    // Every shape is checked before the first measurement.
    for shape in &cfg.shapes {
        cfg.check_memory(be, shape)?;
    }
    let mut rows = Vec::new();
    let peak = machine.gemm_peak_tflops;
    for shape in &cfg.shapes {
        let model = random_model(be, shape, cfg.seed, cfg.quant)?;
        let inputs = vec![cfg.input_len; cfg.batch];
        let targets = vec![cfg.target_len; cfg.batch];
        let batch = model.random_batch(&inputs, &targets, cfg.seed + 1);
        // Generation starts from the input alone: a decoder-only row of exactly input_len tokens.
        let infer_batch = if model.is_decoder_only() {
            let n = cfg.input_len.saturating_sub(1).max(1);
            model.random_batch(&vec![n; cfg.batch], &vec![1; cfg.batch], cfg.seed + 2)
        } else {
            batch.clone()
        };
        let gen = GenerateConfig {
            max_new_tokens: cfg.target_len,
            eos_token_ids: Vec::new(),
            keep_logits: false,
        };
        // One pass of the backbone alone first, so what the libraries keep after their first
        // use (thread pools, GEMM workspaces) counts in every cell's memory, not the first's.
        if cfg.warmup > 0 {
            train_step(be, &model, None, &batch)?;
            generate_greedy(be, &model, None, &infer_batch, &gen)?;
        }
        let work = ShapeWork {
            model,
            batch,
            infer_batch,
            gen,
            base_bytes: be.current_memory() as i128,
        };
        let mut cells = Vec::with_capacity(cfg.settings.len());
        for setting in &cfg.settings {
            progress(&format!("{shape} × {}: build and warm up", setting.name));
            let before = be.current_memory() as i128;
            let (method, optim) = build_setting(be, &work.model, setting, cfg)?;
            let mut cell = Cell {
                setting,
                method,
                optim,
                delay: test_delay(&setting.name),
                own_bytes: be.current_memory() as i128 - before,
                peak_bytes: 0,
                rounds: Vec::with_capacity(cfg.rounds),
                final_loss: f64::NAN,
            };
            cell.warm_up(be, &work, cfg.warmup)?;
            cells.push(cell);
        }
        let fastpt_cells: Vec<(String, usize)> = cells
            .iter()
            .map(|c| {
                let rows = c.method.as_deref().map_or(0, |m| m.prompt_rows());
                (c.setting.name.clone(), rows)
            })
            .collect();
        let mut extra = externals(shape, &fastpt_cells)?;
        let mut extra_rounds: Vec<Vec<RoundTimes>> = vec![Vec::new(); extra.len()];
        let n = cells.len() + extra.len();
        for round in 0..cfg.rounds {
            progress(&format!("{shape}: round {} of {}", round + 1, cfg.rounds));
            for i in (0..n).map(|i| (i + round) % n) {
                match cells.get_mut(i) {
                    Some(cell) => cell.round(be, &work, cfg.steps)?,
                    None => {
                        let j = i - cells.len();
                        extra_rounds[j].push(extra[j].round()?);
                    }
                }
            }
        }
        let tokens = (cfg.batch * (cfg.input_len + cfg.target_len)) as f64;
        let first_train = cells
            .first()
            .map(|c| per_round(&c.rounds, |r| r.train))
            .unwrap_or_default();
        let row_of = |setting: String,
                      prompt_rows: usize,
                      rounds: &[RoundTimes],
                      external: Option<ExternalInfo>,
                      first: bool| {
            let train = per_round(rounds, |r| r.train);
            let train_vs_first = (!first).then(|| Change::paired(&first_train, &train, false));
            let train_step_ms = Stats::of(train);
            let step_tokens = StepTokens {
                b: cfg.batch,
                prompt: prompt_rows,
                input: cfg.input_len,
                target: cfg.target_len,
            };
            let train_tflops =
                work.model.train_step_flops(step_tokens) / (train_step_ms.median / 1e3) / 1e12;
            Row {
                shape: shape.clone(),
                setting,
                external,
                prompt_rows,
                train_tokens_per_s: tokens / (train_step_ms.median / 1e3),
                train_tflops,
                mfu: peak.map(|p| train_tflops / p),
                train_step_ms,
                train_vs_first,
                forward_ms: Stats::of(
                    per_round(rounds, |r| r.forward)
                        .into_iter()
                        .filter(|t| t.is_finite())
                        .collect(),
                ),
                generate_ms: Stats::of(per_round(rounds, |r| r.generate)),
                peak_memory_bytes: 0,
                train_params: 0,
                stored_params: 0,
                final_loss: f64::NAN,
            }
        };
        for (i, cell) in cells.iter().enumerate() {
            let m = cell.method.as_deref();
            let prompt_rows = m.map_or(0, |m| m.prompt_rows());
            let mut row = row_of(
                cell.setting.name.clone(),
                prompt_rows,
                &cell.rounds,
                None,
                i == 0,
            );
            row.peak_memory_bytes = cell.peak_bytes;
            (row.train_params, row.stored_params) =
                m.map_or((0, 0), |m| (train_params(m), m.stored_params()));
            row.final_loss = cell.final_loss;
            rows.push(row);
        }
        for (ext, rounds) in extra.iter_mut().zip(&extra_rounds) {
            let (bytes, params, info) = ext.finish()?;
            let mut row = row_of(ext.setting(), ext.prompt_rows(), rounds, Some(info), false);
            row.peak_memory_bytes = bytes;
            row.train_params = params;
            row.stored_params = params;
            rows.push(row);
        }
    }
    Ok(Report {
        schema: 2,
        backend: be.name(),
        machine: machine.clone(),
        memory: be.peak_memory().1,
        quant: format!("{:?}", cfg.quant).to_lowercase(),
        batch: cfg.batch,
        input_len: cfg.input_len,
        target_len: cfg.target_len,
        warmup: cfg.warmup,
        rounds: cfg.rounds,
        steps: cfg.steps,
        rows,
    })
}

/// The header lines every table starts with: the machine, the sizes, the rounds and what the
/// intervals are.
pub fn report_header(report: &Report) -> String {
    let conf = interval_note(report.rounds);
    format!(
        "{}\n\nbatch {} × ({} in + {} target) | weights {} | {} interleaved rounds × {} steps after {} warm-up | {conf}\n",
        report.machine.summary(),
        report.batch,
        report.input_len,
        report.target_len,
        report.quant,
        report.rounds,
        report.steps,
        report.warmup,
    )
}

/// What the intervals of `rounds` rounds are.
pub fn interval_note(rounds: usize) -> String {
    let c = Stats::of(vec![0.0; rounds]).confidence;
    match rounds {
        1 => "one round: no intervals (--rounds 6 or more gives 95%)".into(),
        _ => format!(
            "intervals: {:.0}% over rounds (distribution-free, of the median); ≈: within noise",
            c * 100.0
        ),
    }
}

/// The report as a markdown table, with each setting's step time against the first setting of
/// its shape (paired by round).
pub fn markdown_table(report: &Report) -> String {
    let mut s = report_header(report);
    s.push_str(
        "\n| shape | setting | prompt rows | train step ms (median, interval) | vs first | tokens/s | TFLOP/s (MFU) | forward ms | generate ms | peak memory MB | train params | stored params |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in &report.rows {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {:.0} | {:.3}{} | {} | {:.2} | {:.1} | {} | {} |\n",
            r.shape,
            r.setting,
            r.prompt_rows,
            r.train_step_ms.label(),
            r.train_vs_first
                .as_ref()
                .map_or("(first)".to_string(), Change::label),
            r.train_tokens_per_s,
            r.train_tflops,
            r.mfu
                .map_or(String::new(), |m| format!(" ({:.1}%)", m * 100.0)),
            // An external row may not measure forward passes.
            match r.forward_ms.median {
                t if t.is_finite() => format!("{t:.2}"),
                _ => "—".into(),
            },
            r.generate_ms.median,
            r.peak_memory_bytes as f64 / 1e6,
            r.train_params,
            r.stored_params,
        ));
    }
    s.push_str(&format!("\nmemory: {}", report.memory));
    for r in report.rows.iter().filter_map(|r| r.external.as_ref()) {
        s.push_str(&format!("; {}: {}", r.backend, r.memory));
    }
    s.push('\n');
    if let Some(p) = report.machine.gemm_peak_tflops {
        s.push_str(&format!(
            "MFU: step FLOPs (4·N·tokens + attention) over the measured GEMM peak, {p:.1} TFLOP/s\n"
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::backend::gpu::device::DType;
    use crate::backend::gpu::vgpu::VirtualDevice;

    /// A stand-in external cell that logs its name at each round.
    struct Logged(
        &'static str,
        std::rc::Rc<std::cell::RefCell<Vec<&'static str>>>,
    );

    impl External for Logged {
        fn setting(&self) -> String {
            format!("logged:{}", self.0)
        }
        fn prompt_rows(&self) -> usize {
            0
        }
        fn round(&mut self) -> Result<RoundTimes> {
            self.1.borrow_mut().push(self.0);
            Ok(RoundTimes {
                train: 1.0,
                forward: f64::NAN,
                generate: 2.0,
            })
        }
        fn finish(&mut self) -> Result<(u64, usize, ExternalInfo)> {
            self.1.borrow_mut().push("finish");
            let info = ExternalInfo {
                backend: "log".into(),
                memory: "none".into(),
            };
            Ok((7, 3, info))
        }
    }

    #[test]
    fn rounds_rotate_the_order_of_every_cell_externals_included() {
        let be = CpuBackend::<f32>::new();
        let cfg = BenchConfig {
            shapes: vec!["t5-tiny".into()],
            settings: vec![Setting::parse("none").unwrap()],
            batch: 1,
            input_len: 4,
            target_len: 2,
            max_len: 4,
            warmup: 0,
            rounds: 4,
            steps: 1,
            quant: Quant::None,
            seed: 3,
        };
        let log = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
        let mut made = Vec::new();
        let mut externals = |shape: &str, cells: &[(String, usize)]| {
            made.push((shape.to_string(), cells.to_vec()));
            let v: Vec<Box<dyn External>> = vec![
                Box::new(Logged("a", log.clone())),
                Box::new(Logged("b", log.clone())),
            ];
            Ok(v)
        };
        let machine = Machine::probe(&be, Some("test"));
        let report = run_bench(&be, &cfg, &machine, &mut |_| {}, &mut externals).unwrap();
        assert_eq!(
            made,
            [("t5-tiny".to_string(), vec![("none".to_string(), 0)])]
        );
        // Cells [none, a, b], the first of each round one further on: none a b | a b none |
        // b none a | none a b; then each external is finished once.
        assert_eq!(
            *log.borrow(),
            ["a", "b", "a", "b", "b", "a", "a", "b", "finish", "finish"]
        );
        let setting = |r: &Row| r.setting.clone();
        assert_eq!(
            report.rows.iter().map(setting).collect::<Vec<_>>(),
            ["none", "logged:a", "logged:b"]
        );
        let a = &report.rows[1];
        assert_eq!(a.train_step_ms.samples, [1.0; 4]);
        assert!(a.forward_ms.samples.is_empty());
        assert_eq!((a.peak_memory_bytes, a.train_params), (7, 3));
        assert_eq!(report.rows[0].train_step_ms.samples.len(), 4);
    }

    #[test]
    fn settings_parse_names_and_options() {
        assert!(Setting::parse("none").unwrap().method.is_none());
        let s = Setting::parse("ept:prompt_len=60, rank=30").unwrap();
        assert_eq!(s.method.unwrap().name(), "ept");
        let err = Setting::parse("lamp:bogus=1").unwrap_err().to_string();
        assert!(err.contains("lamp:bogus=1"), "{err}");
    }

    #[test]
    fn device_memory_peak_follows_allocations_and_resets() {
        let be = GpuBackend::new(VirtualDevice::new(), DType::F32);
        let a = be.zeros(1000); // 4000 bytes, rounded up to the 256-byte alignment
        let before = be.peak_memory().0;
        assert!(before >= 4000, "{before}");
        {
            let _b = be.zeros(10_000);
            assert!(be.peak_memory().0 >= before + 40_000);
        }
        // Dropped: the peak stays until reset, then falls back to what is held.
        assert!(be.peak_memory().0 >= before + 40_000);
        be.reset_peak_memory();
        assert_eq!(be.peak_memory().0, be.device().memory().current() as u64);
        assert!(be.peak_memory().0 < before + 40_000);
        drop(a);
        let ms = be.time_ms(&mut || std::thread::sleep(std::time::Duration::from_millis(5)));
        assert!(ms >= 5.0, "{ms}");
    }
}
