//! The kernel lab, in the spirit of llm.c's `dev/cuda`: one op of the GPU backend at a time, every
//! variant of it checked against the CPU reference and then timed.
//!
//! ```text
//! cargo run --release --example kernel_lab -- <op> [--device cuda|vgpu] [--dtype bf16|f32]
//!     [--shape [NAME,]key=value,...]... [--iters N] [--warmup N] [--no-check]
//! ```
//!
//! Ops: the cases of the op table (`fastpt::backend::gpu::cases`) that have lab shapes:
//! `attention_forward` (or `attention`; variants `flash`, `gemm` and `flash_tc`, see
//! `AttentionKernel`), `attention_backward_dinp` (same variants), `embed_prompt_forward`,
//! `rmsnorm_forward`, `nf4_dequantize`, `fusion_attention_forward`, `gated_experts_forward`,
//! `lamp_pool_forward`, `cross_entropy_forward_backward`; or `all`. `list` prints the ops with
//! their shape keys and default shapes.
//!
//! Device: `cuda` when the CUDA driver is present (`CudaDevice::new` asks
//! `cudarc::driver::sys::is_culib_present()` first) and device 0 opens, else the virtual GPU,
//! whose timings mean nothing (the kernels run as C++ on the CPU, one block at a time). Default
//! shapes follow the device (the case's `lab_cuda` and `lab_vgpu`): the real ones (T5-large,
//! Llama-7B/8B-like) on CUDA, tiny ones on the virtual GPU so that a run takes seconds. `--shape`
//! replaces the defaults: `llama,b=2` starts from the default shape named `llama` (else the first
//! one) and overrides `b`; it may be repeated.
//!
//! Check: as `fastpt doctor` (`cases::check_case`): inputs are random, rounded to the dtype before
//! the CPU sees them; a backward's saved inputs come from its forward on the CPU (with
//! `--no-check`, on the device); the error is `‖gpu − cpu‖ / ‖cpu‖` of every output against the
//! case's tolerance (`check::op_tolerance`, f32 1e-5 and bf16 2e-2, unless the case says
//! otherwise). The reference is `CpuBackend<f32>` on the whole shape (attention: parallel over the
//! batch); `--no-check` skips it for shapes too big for the CPU.
//!
//! Timing: `--warmup` calls, `device.synchronize()`, then `--iters` calls in up to 10 rounds,
//! each round ended by a synchronize; per call = round time / calls in the round. The table
//! prints the median and the minimum per call over the rounds, and the rates at the median:
//! GB/s from the bytes the op must move at least (each input read once, each output written once;
//! the formula is next to each case's `cost`) and, for the GEMM-like ops, TFLOP/s.

use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;

use fastpt::backend::cpu::CpuBackend;
use fastpt::backend::gpu::cases::{
    cases, derive, errors, find, reference, Bufs, Case, Cost, Host, OutputErr, Shape,
};
use fastpt::backend::gpu::check::variants;
use fastpt::backend::gpu::cuda::CudaDevice;
use fastpt::backend::gpu::device::{DType, Device};
use fastpt::backend::gpu::vgpu::VirtualDevice;
use fastpt::backend::gpu::{AttentionKernel, GpuBackend, FLASH_MAX_D};
use fastpt::backend::Backend;
use fastpt::model::memory::{check_fits, MemoryNeed};

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

/// The lab's ops: the cases with lab shapes, for backend `B`.
fn lab_cases<B: Backend>() -> Vec<Case<B>> {
    cases::<B>()
        .into_iter()
        .filter(|c| !c.lab_vgpu.is_empty())
        .collect()
}

/// The op named `name` (`attention` is `attention_forward`).
fn find_op<B: Backend>(table: &[Case<B>], name: &str) -> Result<&'static str> {
    let name = if name == "attention" {
        "attention_forward"
    } else {
        name
    };
    find(table, name).map(|c| c.op).ok_or_else(|| {
        let names: Vec<_> = table.iter().map(|c| c.op).collect();
        anyhow!("unknown op {name:?}; ops: {}, all, list", names.join(", "))
    })
}

/// The shapes to run: the defaults, or each `--shape` applied to a default; each one checked
/// against what the op needs.
fn shapes<B: Backend>(case: &Case<B>, real: bool, overrides: &[String]) -> Result<Vec<Shape>> {
    let defaults = case.shapes(if real { case.lab_cuda } else { case.lab_vgpu });
    let Some(first) = defaults.first() else {
        bail!("{} has no lab shapes", case.op);
    };
    let out = if overrides.is_empty() {
        defaults.clone()
    } else {
        let mut out = Vec::new();
        for spec in overrides {
            let mut parts = spec.split(',').map(str::trim).filter(|s| !s.is_empty());
            let mut shape = first.clone();
            let mut pending = Vec::new();
            if let Some(head) = parts.next() {
                match defaults.iter().find(|d| d.name == head) {
                    Some(d) => shape = d.clone(),
                    None => pending.push(head),
                }
            }
            pending.extend(parts);
            for kv in pending {
                let (k, v) = kv.split_once('=').with_context(|| {
                    format!(
                        "--shape {spec:?}: {kv:?} is neither key=value nor a shape name of {} ({})",
                        case.op,
                        defaults
                            .iter()
                            .map(|d| d.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                })?;
                let i = case
                    .keys
                    .iter()
                    .position(|key| *key == k)
                    .with_context(|| {
                        format!(
                            "--shape {spec:?}: {} has no key {k:?} (keys: {})",
                            case.op,
                            case.keys.join(", ")
                        )
                    })?;
                shape.vals[i] = v
                    .parse()
                    .with_context(|| format!("--shape {spec:?}: {k}={v:?} is not a count"))?;
                shape.name = "custom".into();
            }
            out.push(shape);
        }
        out
    };
    for shape in &out {
        (case.needs)(shape).map_err(|e| anyhow!("--shape [{shape}]: {e}"))?;
        // Issue 19: the cost formulas multiply up to five sizes in usize (attention's FLOPs:
        // b·h·t·s·d); bounding the product of the five largest keeps every such product, times
        // the element size and a few terms, from wrapping.
        let mut vals = shape.vals.clone();
        vals.sort_unstable_by_key(|&v| std::cmp::Reverse(v));
        let product = vals
            .iter()
            .take(5)
            .fold(1u128, |p, &v| p.saturating_mul(v.max(1) as u128));
        if product > MAX_SHAPE_PRODUCT {
            bail!(
                "--shape [{shape}]: the product of its five largest sizes is {product}, more \
                 than MAX_SHAPE_PRODUCT = {MAX_SHAPE_PRODUCT} (2^58): no device holds such a shape"
            );
        }
    }
    Ok(out)
}

/// The largest product of a lab shape's five largest sizes (attention at b 1, h 128, d 128 and
/// t = s = 131072 is 2^55).
const MAX_SHAPE_PRODUCT: u128 = 1 << 58;

/// Refuses a shape whose buffers cannot fit (issue 19, rule 2), before any is allocated: the
/// op's minimal bytes (`cost`) on the device, and as f32 on the host for the inputs, the CPU
/// reference and the downloaded outputs (host memory on the virtual GPU as well).
fn check_shape_memory<D: Device>(
    gpu: &GpuBackend<D>,
    case: &Case<GpuBackend<D>>,
    shape: &Shape,
    dtype: DType,
) -> Result<()> {
    let cost = (case.cost)(shape, dtype.size());
    let elements = cost.bytes / dtype.size() as f64;
    let need = MemoryNeed {
        weights: 0,
        activations: (elements * (dtype.size() + 3 * 4) as f64) as u128,
        method: 0,
        // The cost has no per-buffer sizes; the lab's own shapes stay within 32-bit indices.
        largest_buffer: 0,
    };
    check_fits(
        gpu,
        &need,
        &format!("kernel lab {} --shape [{shape}]", case.op),
    )?;
    Ok(())
}

// ---- the lab ---------------------------------------------------------------------------------

/// Per-call times over the rounds, in seconds.
struct Timing {
    median: f64,
    min: f64,
}

struct Lab<D: Device> {
    gpu: GpuBackend<D>,
    dtype: DType,
    warmup: usize,
    iters: usize,
    check: bool,
    seed: u64,
    failures: usize,
}

impl<D: Device> Lab<D> {
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
    fn report(&mut self, variant: &str, errors: Option<Vec<OutputErr>>, t: &Timing, cost: Cost) {
        let check = match &errors {
            None => "skipped".to_string(),
            Some(errs) => {
                // The worst output; a NaN (a non-finite GPU value) is the worst of all.
                let key = |e: f64| if e.is_nan() { f64::INFINITY } else { e };
                let worst = errs
                    .iter()
                    .max_by(|a, b| key(a.rel_err).total_cmp(&key(b.rel_err)));
                let (name, err) = worst.map_or(("", 0.0), |e| (e.output.as_str(), e.rel_err));
                let ok = errs.iter().all(OutputErr::passed);
                if !ok {
                    self.failures += 1;
                }
                let at = if errs.len() > 1 {
                    format!(" {name}")
                } else {
                    String::new()
                };
                format!("{} {err:.1e}{at}", if ok { "ok" } else { "FAIL" })
            }
        };
        let tflops = cost
            .flops
            .map_or("-".to_string(), |f| format!("{:.2}", f / t.median / 1e12));
        println!(
            "  {variant:<8} {check:<22} {:>11} {:>11} {:>9.1} {:>8}",
            fmt_time(t.median),
            fmt_time(t.min),
            cost.bytes / t.median / 1e9,
            tflops
        );
        if let Some(errs) = errors.filter(|e| e.len() > 1) {
            let all: Vec<String> = errs
                .iter()
                .map(|e| format!("{} {:.1e}", e.output, e.rel_err))
                .collect();
            println!("           ({})", all.join(", "));
        }
    }

    fn header(&self, cost: Cost, tol: f64, note: &str) {
        let flops = cost
            .flops
            .map_or(String::new(), |f| format!(", {:.3} GFLOP", f / 1e9));
        println!("  at least {:.2} MB moved{flops}{note}", cost.bytes / 1e6);
        println!(
            "  {:<8} {:<22} {:>11} {:>11} {:>9} {:>8}",
            "variant",
            format!("check (tol {tol:.0e})"),
            "median",
            "min",
            "GB/s",
            "TFLOP/s"
        );
    }

    /// Checks and times every variant of `case` at `shape`.
    fn run(&mut self, table: &[Case<GpuBackend<D>>], case: &Case<GpuBackend<D>>, shape: &Shape) {
        println!("{:<12} {shape}", shape.name);
        self.seed += 1;
        let mut host = Host::generate(case, shape, self.dtype, self.seed);
        let start = Instant::now();
        let want = if self.check {
            Some(reference(case.op, &mut host, shape))
        } else {
            derive(&self.gpu, table, case, shape, &mut host);
            None
        };
        let note = match &want {
            Some(_) => format!("; CPU reference {:.1} s", start.elapsed().as_secs_f64()),
            None => String::new(),
        };
        let cost = (case.cost)(shape, self.dtype.size());
        let first = want
            .as_ref()
            .and_then(|w| w.first())
            .map(|(n, _)| n.as_str());
        self.header(cost, (case.tol)(self.dtype, first.unwrap_or("")), &note);
        for (kernel, gpu) in variants(&self.gpu, case.attention_kernels) {
            let variant = match kernel {
                None => "kernel",
                Some(AttentionKernel::Gemm) => "gemm",
                Some(_) if shape["d"] > FLASH_MAX_D => {
                    println!(
                        "  (flash*: d > {FLASH_MAX_D}, wider than the flash kernels take: the \
                         GEMM path)"
                    );
                    "flash*"
                }
                Some(AttentionKernel::Flash) => "flash",
                // Tensor cores for the forward (bf16, D = 64 or 128); its backward is flash's.
                Some(AttentionKernel::FlashTc) => "flash_tc",
            };
            let mut bufs = Bufs::upload(&gpu, &host, true);
            (case.run)(&gpu, &mut bufs, shape);
            let errs = want
                .as_ref()
                .map(|w| errors(case, self.dtype, &bufs.outputs(&gpu, &host), w));
            let timing = self.time(|| (case.run)(&gpu, &mut bufs, shape));
            self.report(variant, errs, &timing, cost);
        }
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
    for case in lab_cases::<CpuBackend<f32>>() {
        let show = |list| -> String {
            case.shapes(list)
                .iter()
                .map(|sh| format!("{} [{}]", sh.name, sh.to_string().replace(' ', ",")))
                .collect::<Vec<_>>()
                .join("; ")
        };
        println!("{} ({})", case.op, case.keys.join(", "));
        println!("    cuda: {}", show(case.lab_cuda));
        println!("    vgpu: {}", show(case.lab_vgpu));
    }
}

fn lab_on<D: Device>(dev: D, real: bool, args: &Args) -> Result<()> {
    let dtype = match args.dtype.as_str() {
        "f32" => DType::F32,
        _ => DType::Bf16,
    };
    let table = lab_cases::<GpuBackend<D>>();
    let ops: Vec<&'static str> = if args.op == "all" {
        if !args.shape.is_empty() {
            bail!("--shape needs one op, not all");
        }
        table.iter().map(|c| c.op).collect()
    } else {
        vec![find_op(&table, &args.op)?]
    };
    // Parse every shape before running anything.
    let runs: Vec<(&Case<GpuBackend<D>>, Vec<Shape>)> = ops
        .into_iter()
        .filter_map(|op| find(&table, op))
        .map(|case| Ok((case, shapes(case, real, &args.shape)?)))
        .collect::<Result<_>>()?;
    let mut lab = Lab {
        gpu: GpuBackend::new(dev, dtype),
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
    for (case, shapes) in &runs {
        for shape in shapes {
            check_shape_memory(&lab.gpu, case, shape, dtype)?;
        }
    }
    let full = cases::<GpuBackend<D>>();
    for (case, shapes) in runs {
        println!("\n== {}", case.op);
        for shape in shapes {
            lab.run(&full, case, &shape);
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
