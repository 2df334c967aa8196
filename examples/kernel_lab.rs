//! The kernel lab, in the spirit of llm.c's `dev/cuda`: one op of the GPU backend at a time, every
//! variant of it checked against the CPU reference and then timed.
//!
//! ```text
//! cargo run --release --example kernel_lab -- <op> [--device cuda|vgpu] [--dtype bf16|f32]
//!     [--shape [NAME,]key=value,...]... [--iters N] [--warmup N] [--no-check]
//! ```
//!
//! Ops: `attention` (the forward; variants `flash`, `gemm` and `flash_tc`, see `AttentionKernel`),
//! `attention_backward_dinp` (same variants), `rmsnorm_forward`, `embed_prompt_forward`,
//! `fusion_attention_forward`, `gated_experts_forward`, `lamp_pool_forward`,
//! `cross_entropy_forward_backward`, `nf4_dequantize`, or `all`. `list` prints the ops with their shape keys and default shapes.
//!
//! Device: `cuda` when the CUDA driver is present (`CudaDevice::new` asks
//! `cudarc::driver::sys::is_culib_present()` first) and device 0 opens, else the virtual GPU,
//! whose timings mean nothing (the kernels run as C++ on the CPU, one block at a time). Default
//! shapes follow the device: the real ones (T5-large, Llama-7B/8B-like) on CUDA, tiny ones on the
//! virtual GPU so that a run takes seconds. `--shape` replaces the defaults: `llama,b=2` starts
//! from the default shape named `llama` (else the first one) and overrides `b`; it may be repeated.
//!
//! Check: inputs are random, rounded to the dtype before the CPU sees them (as `fastpt doctor`);
//! the error is `‖gpu − cpu‖ / ‖cpu‖` over every output, against `check::op_tolerance`
//! (f32 1e-5, bf16 2e-2). The attention reference runs in parallel over batch entries and key/value
//! heads (the CPU backend parallelises over the batch only); shapes beyond ~2e10 B·H·T·S·D are
//! checked on the last batch entry only (entries are independent; the last one catches a wrong
//! batch stride).
//!
//! Timing: `--warmup` calls, `device.synchronize()`, then `--iters` calls in up to 10 rounds,
//! each round ended by a synchronize; per call = round time / calls in the round. The table
//! prints the median and the minimum per call over the rounds, and the rates at the median:
//! GB/s from the bytes the op must move at least (each input read once, each output written once;
//! the formula is next to each op) and, for the GEMM-like ops, TFLOP/s.

use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use half::bf16;
use rayon::prelude::*;

use fastpt::backend::cpu::CpuBackend;
use fastpt::backend::gpu::check::op_tolerance;
use fastpt::backend::gpu::cuda::CudaDevice;
use fastpt::backend::gpu::device::{DType, Device};
use fastpt::backend::gpu::vgpu::VirtualDevice;
use fastpt::backend::gpu::{AttentionKernel, GpuBackend, GpuTensor, FLASH_MAX_D};
use fastpt::backend::nf4::{dequantize_nf4, quantize_nf4};
use fastpt::backend::{
    AttnDims, AttnMask, Backend, CrossEntropyDims, EmbedPromptDims, FusionAttentionDims,
    FusionMode, GatedExpertsDims, LampPoolDims, RelBias, RmsNormDims,
};
use fastpt::testing::random_vec;

#[derive(Parser, Debug)]
#[command(about = "Check every variant of one GPU op against the CPU reference, then time it")]
struct Args {
    /// The op (`list` shows them with their shape keys; `all` runs every op).
    op: String,
    /// auto: cuda when a CUDA device opens, else the virtual GPU.
    #[arg(long, default_value = "auto", value_parser = ["auto", "cuda", "vgpu"])]
    device: String,
    #[arg(long, default_value = "bf16", value_parser = ["bf16", "f32"])]
    dtype: String,
    /// `[NAME,]key=value,...`: a default shape (NAME, else the first) with keys overridden.
    /// Repeat for several shapes; replaces the default list.
    #[arg(long)]
    shape: Vec<String>,
    /// Timed calls per variant (default: 100 on cuda, 3 on the virtual GPU).
    #[arg(long)]
    iters: Option<usize>,
    /// Untimed calls before timing (default: 10 on cuda, 1 on the virtual GPU).
    #[arg(long)]
    warmup: Option<usize>,
    /// Skip the CPU reference (for shapes too big for the CPU).
    #[arg(long)]
    no_check: bool,
}

// ---- ops and shapes ------------------------------------------------------------------------

/// Named shapes: values in the order of the op's keys.
type Shapes = &'static [(&'static str, &'static [usize])];

struct OpSpec {
    name: &'static str,
    keys: &'static [&'static str],
    /// On a real GPU.
    real: Shapes,
    /// On the virtual GPU.
    tiny: Shapes,
}

const ATTN_KEYS: &[&str] = &["b", "t", "s", "h", "hkv", "d", "causal", "bias", "pad"];
/// T5-large encoder self-attention (relative bias, padded keys) and a Llama-7B/8B-like causal
/// GQA layer (Llama-2-7B has Hkv = H; the 8 key/value heads are Llama-3-8B's).
const ATTN_REAL: Shapes = &[
    ("t5-large", &[8, 512, 512, 16, 16, 64, 0, 1, 1]),
    ("llama", &[4, 1024, 1024, 32, 8, 128, 1, 0, 0]),
];
const ATTN_TINY: Shapes = &[
    ("t5-tiny", &[2, 32, 32, 4, 4, 32, 0, 1, 1]),
    ("llama-tiny", &[2, 32, 32, 4, 2, 64, 1, 0, 0]),
];

const OPS: &[OpSpec] = &[
    OpSpec {
        name: "attention",
        keys: ATTN_KEYS,
        real: ATTN_REAL,
        tiny: ATTN_TINY,
    },
    OpSpec {
        name: "attention_backward_dinp",
        keys: ATTN_KEYS,
        real: ATTN_REAL,
        tiny: ATTN_TINY,
    },
    OpSpec {
        name: "rmsnorm_forward",
        keys: &["n", "c"],
        // B·T rows of d_model.
        real: &[("t5-large", &[4096, 1024]), ("llama", &[4096, 4096])],
        tiny: &[("tiny", &[64, 257])],
    },
    OpSpec {
        name: "embed_prompt_forward",
        keys: &["b", "t", "p", "c", "v", "update"],
        // DePT-like: 100 prompt rows + text rows, with the (T, C) update of the text embeddings.
        real: &[
            ("t5-large", &[8, 412, 100, 1024, 32128, 1]),
            ("llama", &[4, 924, 100, 4096, 32000, 1]),
        ],
        tiny: &[("tiny", &[3, 24, 8, 65, 500, 1])],
    },
    OpSpec {
        name: "fusion_attention_forward",
        keys: &["s", "m", "c", "paper"],
        // EPT-MS: s = 60 prompt rows attend to the m rows of the low-rank product.
        real: &[
            ("t5-large", &[60, 256, 1024, 0]),
            ("llama", &[60, 1024, 4096, 0]),
        ],
        tiny: &[("tiny", &[7, 24, 65, 0]), ("tiny-paper", &[7, 24, 65, 1])],
    },
    OpSpec {
        name: "gated_experts_forward",
        keys: &["n", "c", "e"],
        real: &[("t5-large", &[60, 1024, 4]), ("llama", &[60, 4096, 4])],
        tiny: &[("tiny", &[7, 65, 4])],
    },
    OpSpec {
        name: "lamp_pool_forward",
        keys: &["l", "r", "c", "p"],
        real: &[
            ("t5-large", &[100, 8, 1024, 1]),
            ("llama", &[100, 8, 4096, 4]),
        ],
        tiny: &[("tiny", &[12, 5, 65, 3])],
    },
    OpSpec {
        name: "cross_entropy_forward_backward",
        keys: &["m", "v"],
        // Label rows only: T5 8 × 128 targets; Llama-3 vocabulary, 4 × 128 targets.
        real: &[("t5-large", &[1024, 32128]), ("llama3", &[512, 128256])],
        tiny: &[("tiny", &[7, 1001])],
    },
    OpSpec {
        name: "nf4_dequantize",
        keys: &["rows", "cols"],
        // A Llama-7B attention projection and FFN weight.
        real: &[("llama-attn", &[4096, 4096]), ("llama-ffn", &[11008, 4096])],
        tiny: &[("tiny", &[37, 129])],
    },
];

fn find_op(name: &str) -> Result<&'static OpSpec> {
    let name = if name == "attention_forward" {
        "attention"
    } else {
        name
    };
    OPS.iter().find(|o| o.name == name).ok_or_else(|| {
        let names: Vec<_> = OPS.iter().map(|o| o.name).collect();
        anyhow!("unknown op {name:?}; ops: {}, all, list", names.join(", "))
    })
}

#[derive(Debug, Clone)]
struct Shape {
    name: String,
    keys: &'static [&'static str],
    vals: Vec<usize>,
}

impl Shape {
    fn get(&self, key: &str) -> usize {
        let i = self.keys.iter().position(|k| *k == key);
        self.vals[i.unwrap_or_else(|| panic!("no shape key {key}"))]
    }

    fn flag(&self, key: &str) -> bool {
        self.get(key) != 0
    }
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:<12}", self.name)?;
        for (k, v) in self.keys.iter().zip(&self.vals) {
            write!(f, " {k}={v}")?;
        }
        Ok(())
    }
}

/// The shapes to run: the defaults, or each `--shape` applied to a default.
fn shapes(op: &OpSpec, real: bool, overrides: &[String]) -> Result<Vec<Shape>> {
    let defaults = if real { op.real } else { op.tiny };
    let make = |(name, vals): &(&str, &[usize])| Shape {
        name: name.to_string(),
        keys: op.keys,
        vals: vals.to_vec(),
    };
    if overrides.is_empty() {
        return Ok(defaults.iter().map(make).collect());
    }
    let mut out = Vec::new();
    for spec in overrides {
        let mut parts = spec.split(',').map(str::trim).filter(|s| !s.is_empty());
        let mut shape = make(&defaults[0]);
        let mut pending = Vec::new();
        if let Some(first) = parts.next() {
            match defaults.iter().find(|(n, _)| *n == first) {
                Some(d) => shape = make(d),
                None => pending.push(first),
            }
        }
        pending.extend(parts);
        for kv in pending {
            let (k, v) = kv.split_once('=').with_context(|| {
                format!(
                    "--shape {spec:?}: {kv:?} is neither key=value nor a shape name of {} ({})",
                    op.name,
                    defaults.iter().map(|d| d.0).collect::<Vec<_>>().join(", ")
                )
            })?;
            let i = op.keys.iter().position(|key| *key == k).with_context(|| {
                format!(
                    "--shape {spec:?}: {} has no key {k:?} (keys: {})",
                    op.name,
                    op.keys.join(", ")
                )
            })?;
            shape.vals[i] = v
                .parse()
                .with_context(|| format!("--shape {spec:?}: {k}={v:?} is not a count"))?;
            shape.name = "custom".into();
        }
        out.push(shape);
    }
    Ok(out)
}

// ---- the lab ---------------------------------------------------------------------------------

fn round(x: f32, dtype: DType) -> f32 {
    match dtype {
        DType::F32 => x,
        DType::Bf16 => bf16::from_f32(x).to_f32(),
    }
}

/// Per-call times over the rounds, in seconds.
struct Timing {
    median: f64,
    min: f64,
}

/// ‖got − want‖² and ‖want‖² of one output, summed over the pieces compared.
#[derive(Default)]
struct Err2 {
    diff: f64,
    norm: f64,
    nonfinite: bool,
}

impl Err2 {
    fn add(&mut self, got: &[f32], want: &[f32]) {
        assert_eq!(got.len(), want.len(), "compared slices differ in length");
        for (&g, &w) in got.iter().zip(want) {
            if !g.is_finite() {
                self.nonfinite = true;
            }
            let (g, w) = (g as f64, w as f64);
            self.diff += (g - w) * (g - w);
            self.norm += w * w;
        }
    }

    /// NaN when the GPU wrote a non-finite value.
    fn rel(&self) -> f64 {
        if self.nonfinite {
            f64::NAN
        } else if self.norm == 0.0 {
            self.diff.sqrt()
        } else {
            (self.diff / self.norm).sqrt()
        }
    }
}

/// The relative error of each output of one variant.
type Errors = Vec<(&'static str, f64)>;

/// The named outputs of the CPU reference for one batch entry.
type Outputs = Vec<(&'static str, Vec<f32>)>;

struct Lab<D: Device> {
    gpu: GpuBackend<D>,
    cpu: CpuBackend<f32>,
    dtype: DType,
    warmup: usize,
    iters: usize,
    check: bool,
    seed: u64,
    failures: usize,
}

impl<D: Device> Lab<D> {
    /// Random values in (-scale, scale), rounded to the dtype.
    fn rand(&mut self, n: usize, scale: f64) -> Vec<f32> {
        self.seed += 1;
        random_vec(n, scale, self.seed)
            .into_iter()
            .map(|x| round(x as f32, self.dtype))
            .collect()
    }

    fn up(&self, x: &[f32]) -> GpuTensor<D> {
        self.gpu.upload_f32(x.to_vec())
    }

    fn nan(&self, n: usize) -> GpuTensor<D> {
        self.gpu.upload_f32(vec![f32::NAN; n])
    }

    fn sync(&self) {
        self.gpu
            .device()
            .synchronize()
            .unwrap_or_else(|e| panic!("synchronize: {e}"));
    }

    /// See the module docs: warm-up, synchronize, rounds of calls each ended by a synchronize.
    fn time(&self, mut f: impl FnMut()) -> Timing {
        for _ in 0..self.warmup {
            f();
        }
        self.sync();
        let rounds = self.iters.clamp(1, 10);
        let per_round = self.iters.div_ceil(rounds);
        let mut times: Vec<f64> = (0..rounds)
            .map(|_| {
                let start = Instant::now();
                for _ in 0..per_round {
                    f();
                }
                self.sync();
                start.elapsed().as_secs_f64() / per_round as f64
            })
            .collect();
        times.sort_by(f64::total_cmp);
        Timing {
            median: times[times.len() / 2],
            min: times[0],
        }
    }

    /// Prints one variant's row; `errors` is `None` when the check was skipped.
    fn report(
        &mut self,
        variant: &str,
        errors: Option<Errors>,
        t: &Timing,
        bytes: f64,
        flops: Option<f64>,
    ) {
        let tol = op_tolerance(self.dtype);
        let check = match &errors {
            None => "skipped".to_string(),
            Some(errs) => {
                // The worst output; a NaN (a non-finite GPU value) is the worst of all.
                let key = |e: f64| if e.is_nan() { f64::INFINITY } else { e };
                let (worst, err) = errs
                    .iter()
                    .copied()
                    .max_by(|a, b| key(a.1).total_cmp(&key(b.1)))
                    .unwrap_or(("", 0.0));
                let ok = err <= tol;
                if !ok {
                    self.failures += 1;
                }
                let at = if errs.len() > 1 {
                    format!(" {worst}")
                } else {
                    String::new()
                };
                format!("{} {err:.1e}{at}", if ok { "ok" } else { "FAIL" })
            }
        };
        let tflops = flops.map_or("-".to_string(), |f| format!("{:.2}", f / t.median / 1e12));
        println!(
            "  {variant:<8} {check:<22} {:>11} {:>11} {:>9.1} {:>8}",
            fmt_time(t.median),
            fmt_time(t.min),
            bytes / t.median / 1e9,
            tflops
        );
        if let Some(errs) = errors.filter(|e| e.len() > 1) {
            let all: Vec<String> = errs.iter().map(|(n, e)| format!("{n} {e:.1e}")).collect();
            println!("           ({})", all.join(", "));
        }
    }

    fn header(&self, bytes: f64, flops: Option<f64>, note: &str) {
        let flops = flops.map_or(String::new(), |f| format!(", {:.3} GFLOP", f / 1e9));
        println!("  at least {:.2} MB moved{flops}{note}", bytes / 1e6);
        println!(
            "  {:<8} {:<22} {:>11} {:>11} {:>9} {:>8}",
            "variant",
            format!("check (tol {:.0e})", op_tolerance(self.dtype)),
            "median",
            "min",
            "GB/s",
            "TFLOP/s"
        );
    }

    fn run(&mut self, op: &OpSpec, shape: &Shape) -> Result<()> {
        println!("{shape}");
        match op.name {
            "attention" => self.attention(shape, false),
            "attention_backward_dinp" => self.attention(shape, true),
            "rmsnorm_forward" => self.rmsnorm(shape),
            "embed_prompt_forward" => self.embed_prompt(shape),
            "fusion_attention_forward" => self.fusion(shape),
            "gated_experts_forward" => self.experts(shape),
            "lamp_pool_forward" => self.lamp(shape),
            "cross_entropy_forward_backward" => self.cross_entropy(shape),
            "nf4_dequantize" => self.nf4(shape),
            other => unreachable!("op {other} has no runner"),
        }
    }

    // ---- attention -----------------------------------------------------------------------

    fn attention(&mut self, sh: &Shape, backward: bool) -> Result<()> {
        let dims = AttnDims {
            b: sh.get("b"),
            t: sh.get("t"),
            s: sh.get("s"),
            h: sh.get("h"),
            h_kv: sh.get("hkv"),
            d: sh.get("d"),
        };
        let AttnDims {
            b,
            t,
            s,
            h,
            h_kv,
            d,
        } = dims;
        if b == 0 || t == 0 || s == 0 || d == 0 || h_kv == 0 || h % h_kv != 0 {
            bail!("attention needs b, t, s, d, hkv > 0 and hkv dividing h");
        }
        let (causal, biased, padded) = (sh.flag("causal"), sh.flag("bias"), sh.flag("pad"));
        let a = AttnHost {
            dims,
            causal,
            bias: biased,
            scale: 1.0 / (d as f64).sqrt(),
            q: self.rand(b * t * h * d, 1.0),
            k: self.rand(b * s * h_kv * d, 1.0),
            v: self.rand(b * s * h_kv * d, 1.0),
            dout: self.rand(b * t * h * d, 1.0),
            table: self.rand(NUM_BUCKETS * h, 1.0),
            // Padding: the last batch entry's last S/8 keys.
            mask: (0..b * s)
                .map(|i| i32::from(!(padded && i / s == b - 1 && i % s >= s - s / 8)))
                .collect(),
        };
        let (gq, gk, gv) = (self.up(&a.q), self.up(&a.k), self.up(&a.v));
        let gmask = self.gpu.upload_index(&a.mask);
        let gtable = self.up(&a.table);
        let mask = AttnMask {
            key_mask: &gmask,
            causal,
        };
        let bias = biased.then(|| rel_bias(&gtable, causal));

        // FLOPs: the forward is two GEMMs per head, scores q·kᵀ and probabilities·v, each
        // 2·T·S·D: 4·B·H·T·S·D. The backward recomputes the scores and does four more GEMMs
        // (dv = pᵀ·dout, dp = dout·vᵀ, dq = ds·k, dk = dsᵀ·q): 5 GEMMs, 2.5× the forward
        // (FlashAttention-2's convention). Causal: half of that, the work a kernel that skips
        // masked tiles must do (a kernel that does not skip shows as slower, not as more FLOPs).
        // Bytes at least: q, k, v (and dout, out for the backward) read once, the outputs
        // written once, the i32 mask and the bias table read once.
        let causal_frac = if causal { 0.5 } else { 1.0 };
        let fwd_flops = 4.0 * (b * h * t * s * d) as f64 * causal_frac;
        let el = self.dtype.size() as f64;
        let (nq, nk, nlse) = (
            (b * t * h * d) as f64,
            (b * s * h_kv * d) as f64,
            (b * h * t) as f64,
        );
        let side = (b * s * 4) as f64
            + if biased {
                NUM_BUCKETS as f64 * h as f64 * el
            } else {
                0.0
            };
        let (flops, bytes) = if backward {
            // Reads dout, q, k, v, out, lse; writes dq, dk, dv.
            (2.5 * fwd_flops, el * (4.0 * nq + 4.0 * nk + nlse) + side)
        } else {
            // Reads q, k, v; writes out, lse.
            (fwd_flops, el * (2.0 * nq + 2.0 * nk + nlse) + side)
        };

        // Which batch entries the CPU checks (module docs).
        // The CPU does a (1, 1024, 1024, 4 heads, 128) forward in about 0.1 s per core: the whole
        // batch of the default shapes takes seconds. Beyond ~2e10 only the last entry.
        let big = (b * h * t * s * d) as f64 > 2e10;
        let entries: Vec<usize> = if big { vec![b - 1] } else { (0..b).collect() };
        // The backward's saved out and lse: the default kernel's forward, so that both sides of
        // the check start from the same numbers (the forward is checked by `attention`).
        let saved_gpu = backward.then(|| {
            let (mut o, mut lse) = (self.nan(b * t * h * d), self.nan(b * h * t));
            self.gpu
                .attention_forward(&mut o, &mut lse, &gq, &gk, &gv, mask, bias, a.scale, dims);
            (o, lse)
        });
        let saved = match &saved_gpu {
            Some((o, lse)) if self.check => {
                Some((self.gpu.download_f32(o), self.gpu.download_f32(lse)))
            }
            _ => None,
        };
        let start = Instant::now();
        let reference: Option<Vec<Outputs>> = self.check.then(|| {
            entries
                .par_iter()
                .map(|&e| {
                    let saved = saved.as_ref().map(|(o, l)| (o.as_slice(), l.as_slice()));
                    a.cpu_entry(&self.cpu, e, saved)
                })
                .collect()
        });
        let note = match (self.check, big) {
            (false, _) => String::new(),
            (true, false) => format!("; CPU reference {:.1} s", start.elapsed().as_secs_f64()),
            (true, true) => format!(
                "; checked on batch entry {} of {b} (CPU reference {:.1} s)",
                b - 1,
                start.elapsed().as_secs_f64()
            ),
        };
        self.header(bytes, Some(flops), &note);

        let gdout = self.up(&a.dout);
        for (variant, kernel) in [
            ("flash", AttentionKernel::Flash),
            ("gemm", AttentionKernel::Gemm),
            // Tensor cores for the forward (bf16, D = 64 or 128); its backward is flash's.
            ("flash_tc", AttentionKernel::FlashTc),
        ] {
            let gpu = self.gpu.with_attention(kernel);
            let variant = if kernel != AttentionKernel::Gemm && d > FLASH_MAX_D {
                println!("  (flash*: d > {FLASH_MAX_D}, wider than the flash kernels take: the GEMM path)");
                "flash*"
            } else {
                variant
            };
            if backward {
                let (mut dq, mut dk, mut dv) = (
                    self.nan(b * t * h * d),
                    self.nan(b * s * h_kv * d),
                    self.nan(b * s * h_kv * d),
                );
                let (gout, glse) = saved_gpu.as_ref().expect("saved for the backward");
                let call = |dq: &mut GpuTensor<D>, dk: &mut GpuTensor<D>, dv: &mut GpuTensor<D>| {
                    gpu.attention_backward_dinp(
                        dq, dk, dv, &gdout, &gq, &gk, &gv, gout, glse, mask, bias, a.scale, dims,
                    )
                };
                call(&mut dq, &mut dk, &mut dv);
                let errors = reference.as_ref().map(|r| {
                    let got = [&dq, &dk, &dv].map(|x| gpu.download_f32(x));
                    a.compare(&entries, r, &got)
                });
                let timing = self.time(|| call(&mut dq, &mut dk, &mut dv));
                self.report(variant, errors, &timing, bytes, Some(flops));
            } else {
                let (mut o, mut lse) = (self.nan(b * t * h * d), self.nan(b * h * t));
                let call = |o: &mut GpuTensor<D>, lse: &mut GpuTensor<D>| {
                    gpu.attention_forward(o, lse, &gq, &gk, &gv, mask, bias, a.scale, dims)
                };
                call(&mut o, &mut lse);
                let errors = reference.as_ref().map(|r| {
                    let got = [&o, &lse].map(|x| gpu.download_f32(x));
                    a.compare(&entries, r, &got)
                });
                let timing = self.time(|| call(&mut o, &mut lse));
                self.report(variant, errors, &timing, bytes, Some(flops));
            }
        }
        Ok(())
    }

    // ---- rows, norms, loss ----------------------------------------------------------------

    fn rmsnorm(&mut self, sh: &Shape) -> Result<()> {
        let (n, c) = (sh.get("n"), sh.get("c"));
        let (x, w) = (self.rand(n * c, 2.0), self.rand(c, 1.5));
        // Reads inp (N, C) and weight (C); writes out (N, C) and rstd (N).
        let bytes = self.dtype.size() as f64 * (2 * n * c + c + n) as f64;
        self.header(bytes, None, "");
        let (gx, gw) = (self.up(&x), self.up(&w));
        let (mut y, mut r) = (self.nan(n * c), self.nan(n));
        let gpu = &self.gpu;
        let call = |y: &mut GpuTensor<D>, r: &mut GpuTensor<D>| {
            gpu.rmsnorm_forward(y, r, &gx, &gw, 1e-6, RmsNormDims { n, c })
        };
        call(&mut y, &mut r);
        let errors = self.check.then(|| {
            let (mut y_r, mut r_r) = (vec![0f32; n * c], vec![0f32; n]);
            self.cpu
                .rmsnorm_forward(&mut y_r, &mut r_r, &x, &w, 1e-6, RmsNormDims { n, c });
            vec![("out", self.err(&y, &y_r)), ("rstd", self.err(&r, &r_r))]
        });
        let timing = self.time(|| call(&mut y, &mut r));
        self.report("kernel", errors, &timing, bytes, None);
        Ok(())
    }

    fn embed_prompt(&mut self, sh: &Shape) -> Result<()> {
        let (b, t, p, c, v) = (
            sh.get("b"),
            sh.get("t"),
            sh.get("p"),
            sh.get("c"),
            sh.get("v"),
        );
        let with_update = sh.flag("update");
        if v == 0 {
            bail!("embed_prompt_forward needs v > 0");
        }
        let table = self.rand(v * c, 1.0);
        let prompt = self.rand(p * c, 1.0);
        let update = self.rand(t * c, 0.5);
        let ids: Vec<i32> = (0..b * t).map(|i| ((i * 7919 + 3) % v) as i32).collect();
        // Writes out (B, P+T, C); reads the B·T gathered table rows, prompt (P, C), update
        // (T, C) once, ids (B, T) i32.
        let el = self.dtype.size() as f64;
        let bytes = el * (b * (p + t) * c + b * t * c + p * c) as f64
            + if with_update {
                el * (t * c) as f64
            } else {
                0.0
            }
            + (4 * b * t) as f64;
        self.header(bytes, None, "");
        let (gt, gp, gu) = (self.up(&table), self.up(&prompt), self.up(&update));
        let gids = self.gpu.upload_index(&ids);
        let mut out = self.nan(b * (p + t) * c);
        let gpu = &self.gpu;
        let gu_opt = with_update.then_some(&gu);
        let call = |out: &mut GpuTensor<D>| {
            gpu.embed_prompt_forward(out, &gt, &gids, &gp, gu_opt, EmbedPromptDims { b, t, p, c })
        };
        call(&mut out);
        let errors = self.check.then(|| {
            let mut want = vec![0f32; b * (p + t) * c];
            let u = with_update.then_some(&update);
            self.cpu.embed_prompt_forward(
                &mut want,
                &table,
                &ids,
                &prompt,
                u,
                EmbedPromptDims { b, t, p, c },
            );
            vec![("out", self.err(&out, &want))]
        });
        let timing = self.time(|| call(&mut out));
        self.report("kernel", errors, &timing, bytes, None);
        Ok(())
    }

    fn cross_entropy(&mut self, sh: &Shape) -> Result<()> {
        let (m, v) = (sh.get("m"), sh.get("v"));
        if v == 0 {
            bail!("cross_entropy_forward_backward needs v > 0");
        }
        let logits = self.rand(m * v, 4.0);
        let targets: Vec<i32> = (0..m).map(|i| ((i * 389 + 5) % v) as i32).collect();
        let dloss = 1.0 / m.max(1) as f64;
        // Reads logits (M, V), targets (M) i32; writes dlogits (M, V), losses (M).
        let el = self.dtype.size() as f64;
        let bytes = el * (2 * m * v + m) as f64 + (4 * m) as f64;
        self.header(bytes, None, "");
        let glogits = self.up(&logits);
        let gtargets = self.gpu.upload_index(&targets);
        let (mut l, mut dl) = (self.nan(m), self.nan(m * v));
        let gpu = &self.gpu;
        let call = |l: &mut GpuTensor<D>, dl: &mut GpuTensor<D>| {
            gpu.cross_entropy_forward_backward(
                l,
                dl,
                &glogits,
                &gtargets,
                dloss,
                CrossEntropyDims { m, v },
            )
        };
        call(&mut l, &mut dl);
        let errors = self.check.then(|| {
            let (mut l_r, mut d_r) = (vec![0f32; m], vec![0f32; m * v]);
            self.cpu.cross_entropy_forward_backward(
                &mut l_r,
                &mut d_r,
                &logits,
                &targets,
                dloss,
                CrossEntropyDims { m, v },
            );
            vec![
                ("losses", self.err(&l, &l_r)),
                ("dlogits", self.err(&dl, &d_r)),
            ]
        });
        let timing = self.time(|| call(&mut l, &mut dl));
        self.report("kernel", errors, &timing, bytes, None);
        Ok(())
    }

    // ---- method ops ------------------------------------------------------------------------

    fn fusion(&mut self, sh: &Shape) -> Result<()> {
        let (s, m, c) = (sh.get("s"), sh.get("m"), sh.get("c"));
        let mode = if sh.flag("paper") {
            FusionMode::Paper
        } else {
            FusionMode::Attend
        };
        let (ps, lr) = (self.rand(s * c, 1.0), self.rand(m * c, 1.0));
        // Reads ps (S, C), lr (M, C); writes out (S, C), probs (S, M).
        // FLOPs: scores ps·lrᵀ 2·S·M·C, plus W·lr 2·S·M·C for Attend (Paper scales rows).
        let el = self.dtype.size() as f64;
        let bytes = el * (2 * s * c + m * c + s * m) as f64;
        let flops = match mode {
            FusionMode::Attend => 4.0,
            FusionMode::Paper => 2.0,
        } * (s * m * c) as f64;
        self.header(bytes, Some(flops), "");
        let (gps, glr) = (self.up(&ps), self.up(&lr));
        let (mut out, mut probs) = (self.nan(s * c), self.nan(s * m));
        let gpu = &self.gpu;
        let call = |out: &mut GpuTensor<D>, probs: &mut GpuTensor<D>| {
            gpu.fusion_attention_forward(
                out,
                probs,
                &gps,
                &glr,
                mode,
                FusionAttentionDims { s, m, c },
            )
        };
        call(&mut out, &mut probs);
        let errors = self.check.then(|| {
            let (mut out_r, mut probs_r) = (vec![0f32; s * c], vec![0f32; s * m]);
            self.cpu.fusion_attention_forward(
                &mut out_r,
                &mut probs_r,
                &ps,
                &lr,
                mode,
                FusionAttentionDims { s, m, c },
            );
            vec![
                ("out", self.err(&out, &out_r)),
                ("probs", self.err(&probs, &probs_r)),
            ]
        });
        let timing = self.time(|| call(&mut out, &mut probs));
        self.report("kernel", errors, &timing, bytes, Some(flops));
        Ok(())
    }

    fn experts(&mut self, sh: &Shape) -> Result<()> {
        let (n, c, e) = (sh.get("n"), sh.get("c"), sh.get("e"));
        let logits = self.rand(n * e, 2.0);
        let mut gate = vec![0f32; n * e];
        self.cpu.softmax_rows_forward(&mut gate, &logits, n, e);
        let gate: Vec<f32> = gate.iter().map(|&x| round(x, self.dtype)).collect();
        let experts: Vec<Vec<f32>> = (0..e).map(|_| self.rand(n * c, 1.0)).collect();
        // Reads gate (N, E) and E experts (N, C); writes out (N, C).
        let bytes = self.dtype.size() as f64 * (n * e + e * n * c + n * c) as f64;
        self.header(bytes, None, "");
        let ggate = self.up(&gate);
        let gexperts: Vec<_> = experts.iter().map(|x| self.up(x)).collect();
        let grefs: Vec<_> = gexperts.iter().collect();
        let mut out = self.nan(n * c);
        let gpu = &self.gpu;
        let call = |out: &mut GpuTensor<D>| {
            gpu.gated_experts_forward(out, &ggate, &grefs, GatedExpertsDims { n, c })
        };
        call(&mut out);
        let errors = self.check.then(|| {
            let refs: Vec<&Vec<f32>> = experts.iter().collect();
            let mut want = vec![0f32; n * c];
            self.cpu
                .gated_experts_forward(&mut want, &gate, &refs, GatedExpertsDims { n, c });
            vec![("out", self.err(&out, &want))]
        });
        let timing = self.time(|| call(&mut out));
        self.report("kernel", errors, &timing, bytes, None);
        Ok(())
    }

    fn lamp(&mut self, sh: &Shape) -> Result<()> {
        let (l, r, c, p) = (sh.get("l"), sh.get("r"), sh.get("c"), sh.get("p"));
        if p == 0 || l % p != 0 {
            bail!("lamp_pool_forward needs p > 0 dividing l (l={l}, p={p})");
        }
        let (u, q, v) = (
            self.rand(l * r, 1.0),
            self.rand(r, 1.5),
            self.rand(c * r, 1.0),
        );
        // Reads u (L, R), q (R), v (C, R); writes out (L/p, C).
        // FLOPs: pooling L·R adds, then the (L/p, R)·(R, C) product 2·(L/p)·R·C.
        let bytes = self.dtype.size() as f64 * (l * r + r + c * r + l / p * c) as f64;
        let flops = (2 * (l / p) * r * c + l * r) as f64;
        self.header(bytes, Some(flops), "");
        let (gu, gq, gv) = (self.up(&u), self.up(&q), self.up(&v));
        let mut out = self.nan(l / p * c);
        let gpu = &self.gpu;
        let call = |out: &mut GpuTensor<D>| {
            gpu.lamp_pool_forward(out, &gu, &gq, &gv, LampPoolDims { l, r, c, p })
        };
        call(&mut out);
        let errors = self.check.then(|| {
            let mut want = vec![0f32; l / p * c];
            self.cpu
                .lamp_pool_forward(&mut want, &u, &q, &v, LampPoolDims { l, r, c, p });
            vec![("out", self.err(&out, &want))]
        });
        let timing = self.time(|| call(&mut out));
        self.report("kernel", errors, &timing, bytes, Some(flops));
        Ok(())
    }

    // ---- NF4 ---------------------------------------------------------------------------------

    /// `Backend::nf4_dequantize`: a frozen NF4 weight back to the dtype.
    fn nf4(&mut self, sh: &Shape) -> Result<()> {
        let n = sh.get("rows") * sh.get("cols");
        // Weight-like values: uniform in (-0.05, 0.05), as a linear layer's init.
        self.seed += 1;
        let x: Vec<f32> = random_vec(n, 0.05, self.seed)
            .into_iter()
            .map(|v| v as f32)
            .collect();
        let q = quantize_nf4(&x);
        let nb = n.div_ceil(64);
        // Reads the packed codes (N/2 bytes), the absmax codes (NB = N/64 bytes), the f32
        // absmax scales (NB/256 · 4 bytes); writes out (N) in the dtype. (The 1 KiB map and the
        // NF4 table are per launch.)
        let bytes = (n.div_ceil(2) + nb + 4 * nb.div_ceil(256) + n * self.dtype.size()) as f64;
        self.header(bytes, None, "");
        let want = self.check.then(|| {
            let mut want = vec![0f32; n];
            dequantize_nf4(&mut want, &q);
            want
        });
        let gq = self.gpu.upload_nf4(q);
        let mut out = self.nan(n);
        let gpu = &self.gpu;
        let call = |out: &mut GpuTensor<D>| gpu.nf4_dequantize(out, &gq);
        call(&mut out);
        // The f32 kernel is bit-identical to the CPU reference; bf16 rounds it once.
        let errors = want.map(|w| vec![("out", self.err(&out, &w))]);
        let timing = self.time(|| call(&mut out));
        self.report("kernel", errors, &timing, bytes, None);
        Ok(())
    }

    fn err(&self, got: &GpuTensor<D>, want: &[f32]) -> f64 {
        let mut e = Err2::default();
        e.add(&self.gpu.download_f32(got), want);
        e.rel()
    }
}

// ---- attention on the host -------------------------------------------------------------------

const NUM_BUCKETS: usize = 32;
const MAX_DISTANCE: usize = 128;

fn rel_bias<X>(table: &X, causal: bool) -> RelBias<'_, X> {
    RelBias {
        table,
        bidirectional: !causal,
        num_buckets: NUM_BUCKETS,
        max_distance: MAX_DISTANCE,
        q_offset: 0,
    }
}

/// The host copies of an attention problem.
struct AttnHost {
    dims: AttnDims,
    causal: bool,
    bias: bool,
    scale: f64,
    q: Vec<f32>,     // (B, T, H·D)
    k: Vec<f32>,     // (B, S, Hkv·D)
    v: Vec<f32>,     // (B, S, Hkv·D)
    dout: Vec<f32>,  // (B, T, H·D)
    table: Vec<f32>, // (NUM_BUCKETS, H)
    mask: Vec<i32>,  // (B, S)
}

/// Columns `start..start + len` of a row-major `(rows, width)` matrix.
fn cols(x: &[f32], width: usize, start: usize, len: usize) -> Vec<f32> {
    x.chunks(width)
        .flat_map(|row| &row[start..start + len])
        .copied()
        .collect()
}

/// Writes `src (rows, len)` into columns `start..start + len` of `dst (rows, width)`.
fn put_cols(dst: &mut [f32], width: usize, start: usize, len: usize, src: &[f32]) {
    for (row, s) in dst.chunks_mut(width).zip(src.chunks(len)) {
        row[start..start + len].copy_from_slice(s);
    }
}

impl AttnHost {
    /// The CPU reference for batch entry `e`: forward (`out`, `lse`) or, given the saved
    /// `(out, lse)` of the whole batch, the backward (`dq`, `dk`, `dv`). One CPU call per
    /// key/value head (its group of query heads), in parallel: the CPU backend parallelises
    /// over the batch only.
    fn cpu_entry(
        &self,
        cpu: &CpuBackend<f32>,
        e: usize,
        saved: Option<(&[f32], &[f32])>,
    ) -> Outputs {
        let AttnDims {
            t, s, h, h_kv, d, ..
        } = self.dims;
        let g = h / h_kv; // query heads per key/value head
        let (qw, kw) = (h * d, h_kv * d); // row widths
        let q = &self.q[e * t * qw..(e + 1) * t * qw];
        let k = &self.k[e * s * kw..(e + 1) * s * kw];
        let v = &self.v[e * s * kw..(e + 1) * s * kw];
        let dout = &self.dout[e * t * qw..(e + 1) * t * qw];
        let mask = self.mask[e * s..(e + 1) * s].to_vec();
        let gdims = AttnDims {
            b: 1,
            t,
            s,
            h: g,
            h_kv: 1,
            d,
        };
        let parts: Vec<Vec<Vec<f32>>> = (0..h_kv)
            .into_par_iter()
            .map(|kv| {
                let qg = cols(q, qw, kv * g * d, g * d);
                let kg = cols(k, kw, kv * d, d);
                let vg = cols(v, kw, kv * d, d);
                let table = cols(&self.table, h, kv * g, g);
                let bias = self.bias.then(|| rel_bias(&table, self.causal));
                let m = AttnMask {
                    key_mask: &mask,
                    causal: self.causal,
                };
                match saved {
                    None => {
                        let (mut o, mut lse) = (vec![0f32; t * g * d], vec![0f32; g * t]);
                        cpu.attention_forward(
                            &mut o, &mut lse, &qg, &kg, &vg, m, bias, self.scale, gdims,
                        );
                        vec![o, lse]
                    }
                    Some((out, lse)) => {
                        let og = cols(&out[e * t * qw..(e + 1) * t * qw], qw, kv * g * d, g * d);
                        let lse_e = &lse[e * h * t..(e + 1) * h * t];
                        let lg = lse_e[kv * g * t..(kv + 1) * g * t].to_vec();
                        let dg = cols(dout, qw, kv * g * d, g * d);
                        let (mut dq, mut dk, mut dv) =
                            (vec![0f32; t * g * d], vec![0f32; s * d], vec![0f32; s * d]);
                        cpu.attention_backward_dinp(
                            &mut dq, &mut dk, &mut dv, &dg, &qg, &kg, &vg, &og, &lg, m, bias,
                            self.scale, gdims,
                        );
                        vec![dq, dk, dv]
                    }
                }
            })
            .collect();
        if saved.is_none() {
            let (mut o, mut lse) = (vec![0f32; t * qw], vec![0f32; h * t]);
            for (kv, p) in parts.iter().enumerate() {
                put_cols(&mut o, qw, kv * g * d, g * d, &p[0]);
                lse[kv * g * t..(kv + 1) * g * t].copy_from_slice(&p[1]);
            }
            vec![("out", o), ("lse", lse)]
        } else {
            let (mut dq, mut dk, mut dv) =
                (vec![0f32; t * qw], vec![0f32; s * kw], vec![0f32; s * kw]);
            for (kv, p) in parts.iter().enumerate() {
                put_cols(&mut dq, qw, kv * g * d, g * d, &p[0]);
                put_cols(&mut dk, kw, kv * d, d, &p[1]);
                put_cols(&mut dv, kw, kv * d, d, &p[2]);
            }
            vec![("dq", dq), ("dk", dk), ("dv", dv)]
        }
    }

    /// Relative errors of the GPU's whole-batch outputs `got` on the checked `entries`.
    fn compare(&self, entries: &[usize], reference: &[Outputs], got: &[Vec<f32>]) -> Errors {
        let b = self.dims.b;
        let mut errs: Vec<(&'static str, Err2)> = reference[0]
            .iter()
            .map(|(name, _)| (*name, Err2::default()))
            .collect();
        for (&e, outputs) in entries.iter().zip(reference) {
            for ((_, want), (err, g)) in outputs.iter().zip(errs.iter_mut().zip(got)) {
                let per = g.len() / b; // every output is batch-major
                err.1.add(&g[e * per..(e + 1) * per], want);
            }
        }
        errs.into_iter().map(|(n, e)| (n, e.rel())).collect()
    }
}

// ---- main --------------------------------------------------------------------------------------

fn fmt_time(secs: f64) -> String {
    if secs >= 1.0 {
        format!("{secs:.3} s")
    } else if secs >= 1e-3 {
        format!("{:.3} ms", secs * 1e3)
    } else {
        format!("{:.1} µs", secs * 1e6)
    }
}

fn list() {
    println!("op (shape keys): default shapes on cuda | on the virtual GPU");
    for op in OPS {
        let show = |shapes: Shapes| -> String {
            shapes
                .iter()
                .map(|(n, v)| {
                    let kv: Vec<String> = op
                        .keys
                        .iter()
                        .zip(*v)
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect();
                    format!("{n} [{}]", kv.join(","))
                })
                .collect::<Vec<_>>()
                .join("; ")
        };
        println!("{} ({})", op.name, op.keys.join(", "));
        println!("    cuda: {}", show(op.real));
        println!("    vgpu: {}", show(op.tiny));
    }
}

fn lab_on<D: Device>(dev: D, real: bool, args: &Args) -> Result<()> {
    let dtype = match args.dtype.as_str() {
        "f32" => DType::F32,
        _ => DType::Bf16,
    };
    let ops: Vec<&OpSpec> = if args.op == "all" {
        if !args.shape.is_empty() {
            bail!("--shape needs one op, not all");
        }
        OPS.iter().collect()
    } else {
        vec![find_op(&args.op)?]
    };
    // Parse every shape before running anything.
    let runs: Vec<(&OpSpec, Vec<Shape>)> = ops
        .into_iter()
        .map(|op| Ok((op, shapes(op, real, &args.shape)?)))
        .collect::<Result<_>>()?;
    let mut lab = Lab {
        gpu: GpuBackend::new(dev, dtype),
        cpu: CpuBackend::new(),
        dtype,
        warmup: args.warmup.unwrap_or(if real { 10 } else { 1 }),
        iters: args.iters.unwrap_or(if real { 100 } else { 3 }).max(1),
        check: !args.no_check,
        seed: 0,
        failures: 0,
    };
    println!("device  {}", lab.gpu.device().name());
    for line in lab.gpu.device().describe() {
        println!("        {line}");
    }
    if !real {
        println!(
            "note    the virtual GPU runs the kernels as C++ on the CPU, one block at a time: \
             its timings mean nothing (the checks do)"
        );
    }
    println!(
        "timing  {dtype}, {} warm-up + {} timed calls per variant in up to 10 synchronized rounds; \
         median and min per call, rates at the median",
        lab.warmup, lab.iters
    );
    for (op, shapes) in runs {
        println!("\n== {}", op.name);
        for shape in shapes {
            lab.run(op, &shape)?;
        }
    }
    if lab.failures > 0 {
        bail!("{} check(s) failed (FAIL rows above)", lab.failures);
    }
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.op == "list" {
        list();
        return Ok(());
    }
    match args.device.as_str() {
        "vgpu" => lab_on(VirtualDevice::new(), false, &args),
        "cuda" => lab_on(CudaDevice::new(0)?, true, &args),
        _ => match CudaDevice::new(0) {
            Ok(dev) => lab_on(dev, true, &args),
            Err(e) => {
                println!("no usable GPU ({e}); running on the virtual GPU");
                lab_on(VirtualDevice::new(), false, &args)
            }
        },
    }
}
