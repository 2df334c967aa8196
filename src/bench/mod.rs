//! `fastpt bench`: training-step and inference time, memory and parameters of prompt methods on
//! built-in shapes with random weights (efficiency depends on shapes, not weight values).
//!
//! Each (shape × setting) cell builds the model and the method once, runs `warmup` steps, then
//! times `steps` training steps (forward, input-gradient backward, method backward, AdamW), as
//! many forward-only passes (loss) and as many greedy generations of the target length (the
//! papers' inference: KV cache, no early stop). Times
//! come from device events on a GPU ([`BenchClock`]), from the host clock on the CPU; the report
//! keeps the median and the spread of the per-step times.
//!
//! [`claims`] runs the papers' efficiency claims on top of this. What is left of the bench issue
//! (PEFT side by side, MFU with a measured GEMM peak) builds on these modules.

pub mod baseline;
pub mod charts;
pub mod claims;
pub mod heap;

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

/// How a backend times work and reports its memory.
pub trait BenchClock: Backend {
    /// Runs `f` and returns the milliseconds the device spent on it (all of its work, queued or
    /// not, finished before the clock stops).
    fn time_ms(&self, f: &mut dyn FnMut()) -> f64;
    /// Peak memory since [`BenchClock::reset_peak_memory`]: `(bytes, what was measured)`.
    fn peak_memory(&self) -> (u64, &'static str);
    fn reset_peak_memory(&self);
    /// The GEMM throughput this device reaches (TFLOP/s), measured, for MFU; None where MFU
    /// means nothing (the CPU, the virtual GPU).
    fn gemm_peak_tflops(&self) -> Option<f64> {
        None
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
    pub steps: usize,
    pub quant: Quant,
    pub seed: u64,
}

/// `--steps` and `--warmup`: timed and untimed steps (each timed one keeps three samples).
pub const MAX_BENCH_STEPS: usize = 1_000_000;

impl BenchConfig {
    /// Every size in 1..=its limit (`--batch` and the lengths as a run's, see
    /// [`crate::config`]; steps [`MAX_BENCH_STEPS`]), the flag, value and limit named.
    pub fn check_sizes(&self) -> Result<()> {
        for (flag, v, min, limit, name) in [
            ("--steps", self.steps, 1, MAX_BENCH_STEPS, "MAX_BENCH_STEPS"),
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

/// Median and spread of a set of times (ms).
#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    /// Per-step times in order.
    pub samples: Vec<f64>,
}

impl Stats {
    fn of(samples: Vec<f64>) -> Self {
        let mut sorted = samples.clone();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = if n == 0 {
            f64::NAN
        } else if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        };
        Stats {
            median,
            min: sorted.first().copied().unwrap_or(f64::NAN),
            max: sorted.last().copied().unwrap_or(f64::NAN),
            samples,
        }
    }
}

/// One cell of the matrix.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub shape: String,
    pub setting: String,
    /// Prompt rows in front of the input.
    pub prompt_rows: usize,
    pub train_step_ms: Stats,
    /// Input + target tokens (prompt rows excluded) per second of training step.
    pub train_tokens_per_s: f64,
    /// FLOPs of one training step ([`crate::model::Family::train_step_flops`]) over its median
    /// time.
    pub train_tflops: f64,
    /// `train_tflops` over the measured GEMM peak (GPU only).
    pub mfu: Option<f64>,
    pub forward_ms: Stats,
    /// Inference: greedy generation of `target_len` tokens per row (no early stop), prompt rows
    /// in front, KV cache.
    pub generate_ms: Stats,
    pub peak_memory_bytes: u64,
    pub train_params: usize,
    pub stored_params: usize,
    pub final_loss: f64,
}

/// The whole run, as report.json holds it.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub schema: u32,
    pub backend: String,
    pub memory: &'static str,
    pub quant: String,
    pub batch: usize,
    pub input_len: usize,
    pub target_len: usize,
    pub warmup: usize,
    pub steps: usize,
    /// Measured GEMM throughput (TFLOP/s) that MFU divides by; None off a GPU.
    pub gemm_peak_tflops: Option<f64>,
    pub rows: Vec<Row>,
}

/// Runs the matrix; `progress` is told each cell as it starts.
pub fn run_bench<B: BenchClock + 'static>(
    be: &B,
    cfg: &BenchConfig,
    progress: &mut dyn FnMut(&str),
) -> Result<Report> {
    cfg.check_sizes()?;
    // Every shape is checked before the first measurement.
    for shape in &cfg.shapes {
        cfg.check_memory(be, shape)?;
    }
    let mut rows = Vec::new();
    let mut memory = "";
    let peak = be.gemm_peak_tflops();
    for shape in &cfg.shapes {
        let model = random_model(be, shape, cfg.seed, cfg.quant)?;
        let inputs = vec![cfg.input_len; cfg.batch];
        let targets = vec![cfg.target_len; cfg.batch];
        let batch = model.random_batch(&inputs, &targets, cfg.seed + 1);
        let tokens = (cfg.batch * (cfg.input_len + cfg.target_len)) as f64;
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
        for setting in &cfg.settings {
            progress(&format!("{shape} × {}", setting.name));
            be.reset_peak_memory();
            let mut method = match &setting.method {
                Some(m) => Some(build_backbone_method(
                    be,
                    &model,
                    m,
                    cfg.max_len.max(cfg.input_len),
                    cfg.seed,
                    None,
                )?),
                None => None,
            };
            let train = TrainConfig::default();
            let mut optim = method.as_deref().map(|m| Optimizer::new(be, m, &train));
            let mut result: Result<f64> = Ok(f64::NAN);
            let mut step = |result: &mut Result<f64>| {
                let out = train_step(be, &model, method.as_deref_mut(), &batch);
                match (out, method.as_deref_mut(), optim.as_mut()) {
                    (Ok(loss), Some(m), Some(opt)) => {
                        opt.step(be, m, 1.0, 1.0);
                        zero_grads(be, m);
                        *result = Ok(loss);
                    }
                    (Ok(loss), _, _) => *result = Ok(loss),
                    (Err(e), _, _) => *result = Err(e),
                }
            };
            for _ in 0..cfg.warmup {
                step(&mut result);
                result.as_ref().map_err(|e| Error::Input(e.to_string()))?;
            }
            let mut times = Vec::with_capacity(cfg.steps);
            for _ in 0..cfg.steps {
                times.push(be.time_ms(&mut || step(&mut result)));
            }
            let final_loss = result?;
            let mut forward = Vec::with_capacity(cfg.steps);
            let mut fwd_result: Result<f64> = Ok(f64::NAN);
            for _ in 0..cfg.steps {
                forward.push(be.time_ms(&mut || {
                    fwd_result = forward_loss(be, &model, method.as_deref_mut(), &batch);
                }));
            }
            fwd_result?;
            let mut generate = Vec::with_capacity(cfg.steps);
            let mut gen_result: Result<()> = Ok(());
            for _ in 0..cfg.steps {
                generate.push(be.time_ms(&mut || {
                    let out =
                        generate_greedy(be, &model, method.as_deref_mut(), &infer_batch, &gen);
                    gen_result = out.map(|_| ());
                }));
            }
            gen_result?;
            let (peak_bytes, what) = be.peak_memory();
            memory = what;
            let (train_params_n, stored) = method
                .as_deref()
                .map_or((0, 0), |m| (train_params(m), m.stored_params()));
            let train_step_ms = Stats::of(times);
            let step_tokens = StepTokens {
                b: cfg.batch,
                prompt: method.as_deref().map_or(0, |m| m.prompt_rows()),
                input: cfg.input_len,
                target: cfg.target_len,
            };
            let train_tflops =
                model.train_step_flops(step_tokens) / (train_step_ms.median / 1e3) / 1e12;
            rows.push(Row {
                shape: shape.clone(),
                setting: setting.name.clone(),
                prompt_rows: method.as_deref().map_or(0, |m| m.prompt_rows()),
                train_tokens_per_s: tokens / (train_step_ms.median / 1e3),
                train_tflops,
                mfu: peak.map(|p| train_tflops / p),
                train_step_ms,
                forward_ms: Stats::of(forward),
                generate_ms: Stats::of(generate),
                peak_memory_bytes: peak_bytes,
                train_params: train_params_n,
                stored_params: stored,
                final_loss,
            });
        }
    }
    Ok(Report {
        schema: 1,
        backend: be.name(),
        memory,
        quant: format!("{:?}", cfg.quant).to_lowercase(),
        batch: cfg.batch,
        input_len: cfg.input_len,
        target_len: cfg.target_len,
        warmup: cfg.warmup,
        steps: cfg.steps,
        gemm_peak_tflops: peak,
        rows,
    })
}

/// The report as a markdown table, with each setting's step time relative to the first setting
/// of its shape.
pub fn markdown_table(report: &Report) -> String {
    let mut s = format!(
        "backend {} | batch {} × ({} in + {} target) | {} steps after {} warm-up | weights {}\n\n",
        report.backend,
        report.batch,
        report.input_len,
        report.target_len,
        report.steps,
        report.warmup,
        report.quant
    );
    s.push_str(
        "| shape | setting | prompt rows | train step ms (median, min–max) | vs first | tokens/s | TFLOP/s (MFU) | forward ms | generate ms | peak memory MB | train params | stored params |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let mut first: Option<(&str, f64)> = None;
    for r in &report.rows {
        if first.is_none_or(|(shape, _)| shape != r.shape) {
            first = Some((&r.shape, r.train_step_ms.median));
        }
        let base = first.map_or(f64::NAN, |(_, t)| t);
        s.push_str(&format!(
            "| {} | {} | {} | {:.2} ({:.2}–{:.2}) | {:+.1}% | {:.0} | {:.3}{} | {:.2} | {:.2} | {:.1} | {} | {} |\n",
            r.shape,
            r.setting,
            r.prompt_rows,
            r.train_step_ms.median,
            r.train_step_ms.min,
            r.train_step_ms.max,
            (r.train_step_ms.median / base - 1.0) * 100.0,
            r.train_tokens_per_s,
            r.train_tflops,
            r.mfu.map_or(String::new(), |m| format!(" ({:.1}%)", m * 100.0)),
            r.forward_ms.median,
            r.generate_ms.median,
            r.peak_memory_bytes as f64 / 1e6,
            r.train_params,
            r.stored_params,
        ));
    }
    s.push_str(&format!("\nmemory: {}\n", report.memory));
    if let Some(p) = report.gemm_peak_tflops {
        s.push_str(&format!(
            "MFU: step FLOPs (4·N·tokens + attention) over the measured GEMM peak, {p:.1} TFLOP/s\n"
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::gpu::device::DType;
    use crate::backend::gpu::vgpu::VirtualDevice;

    #[test]
    fn stats_median_min_max_keep_the_order_of_samples() {
        let s = Stats::of(vec![3.0, 1.0, 2.0, 10.0]);
        assert_eq!((s.median, s.min, s.max), (2.5, 1.0, 10.0));
        assert_eq!(s.samples, [3.0, 1.0, 2.0, 10.0]);
        assert_eq!(Stats::of(vec![4.0, 1.0, 9.0]).median, 4.0);
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
