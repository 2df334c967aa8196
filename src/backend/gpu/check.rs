//! The op checks behind `fastpt doctor`: every case of the op table (`cases.rs`) at its doctor
//! sizes against the CPU reference, on any [`Device`] (the attention cases with each attention
//! kernel), and one tensor-core `mma`. `cargo test` runs them on the virtual GPU; on a GPU
//! machine `fastpt doctor` runs them on the real one, then whole steps (`crate::doctor`).
//!
//! Inputs are rounded to the backend's dtype before the CPU sees them, so both backends start
//! from the same numbers; errors are ‖gpu − cpu‖ / ‖cpu‖. Sizes are odd so that swapped
//! dimensions show.

use half::bf16;

use super::cases::{cases, check_case, Shape};
use super::device::{Arg, DType, Device, LaunchCfg};
use super::{AttentionKernel, GpuBackend};
use crate::testing::{random_vec, rel_err_f32};

pub use super::cases::op_tolerance;

/// One row of the doctor's table.
#[derive(Debug, Clone)]
pub struct CheckResult {
    pub op: String,
    pub dtype: DType,
    /// ‖gpu − cpu‖ / ‖cpu‖ (NaN when the GPU produced a non-finite value).
    pub rel_err: f64,
    pub tol: f64,
}

impl CheckResult {
    pub fn passed(&self) -> bool {
        self.rel_err <= self.tol
    }
}

/// Markdown table of results, failures marked.
pub fn results_table(results: &[CheckResult]) -> String {
    let mut s = String::from("| op | dtype | rel err | tol | result |\n|---|---|---:|---:|---|\n");
    for r in results {
        s.push_str(&format!(
            "| {} | {} | {:.2e} | {:.0e} | {} |\n",
            r.op,
            r.dtype,
            r.rel_err,
            r.tol,
            if r.passed() { "pass" } else { "FAIL" }
        ));
    }
    s
}

/// The backends a case runs on: `gpu` itself, or, for a case with `attention_kernels`, `gpu`
/// with each attention kernel, its own first (a fallback must be as right as the default).
pub fn variants<D: Device>(
    gpu: &GpuBackend<D>,
    attention_kernels: bool,
) -> Vec<(Option<AttentionKernel>, GpuBackend<D>)> {
    let own = gpu.attention_kernel();
    if !attention_kernels {
        return vec![(None, gpu.with_attention(own))];
    }
    let others = [
        AttentionKernel::Flash,
        AttentionKernel::Gemm,
        AttentionKernel::FlashTc,
    ]
    .into_iter()
    .filter(|k| *k != own);
    std::iter::once(own)
        .chain(others)
        .map(|k| (Some(k), gpu.with_attention(k)))
        .collect()
}

/// Every op case at its doctor sizes against the CPU reference (see the module docs), then
/// [`check_mma`]. A row is `op [kernel] [shape] [output]`: the output named when the op has
/// several.
pub fn check_ops<D: Device>(gpu: &GpuBackend<D>, seed: u64) -> Vec<CheckResult> {
    let dtype = gpu.dtype();
    let mut results = Vec::new();
    let mut next_seed = seed;
    for case in &cases::<GpuBackend<D>>() {
        for (kernel, be) in variants(gpu, case.attention_kernels) {
            for (name, vals) in case.doctor {
                next_seed += 1;
                let shape = Shape::new(name, case.keys, vals);
                let errs = check_case(&be, dtype, case, &shape, next_seed);
                let several = errs.len() > 1;
                for e in errs {
                    let mut op = case.op.to_string();
                    if let Some(k) = kernel {
                        op.push_str(&format!(" {k:?}"));
                    }
                    if !name.is_empty() {
                        op.push_str(&format!(" {name}"));
                    }
                    if several {
                        op.push_str(&format!(" {}", e.output));
                    }
                    results.push(CheckResult {
                        op,
                        dtype,
                        rel_err: e.rel_err,
                        tol: e.tol,
                    });
                }
            }
        }
    }
    results.push(check_mma(gpu.device(), seed));
    results
}

/// One tensor-core step (`selftest_mma` in kernels/selftest.cu): `d = a·b + c` for a 16×16 by
/// 16×8 product with bf16 operands, against the same product on the host. A wrong fragment
/// layout gives errors of order 1.
pub fn check_mma<D: Device>(dev: &D, seed: u64) -> CheckResult {
    let bf = |x: f64| bf16::from_f32(x as f32).to_f32();
    let a: Vec<f32> = random_vec(16 * 16, 1.0, seed).into_iter().map(bf).collect(); // (16, 16)
    let b: Vec<f32> = random_vec(16 * 8, 1.0, seed + 1) // (16, 8)
        .into_iter()
        .map(bf)
        .collect();
    let c: Vec<f32> = random_vec(16 * 8, 1.0, seed + 2) // (16, 8)
        .into_iter()
        .map(|x| x as f32)
        .collect();
    let mut want = vec![0f32; 16 * 8]; // (16, 8)
    for i in 0..16 {
        for j in 0..8 {
            let dot: f64 = (0..16)
                .map(|k| a[i * 16 + k] as f64 * b[k * 8 + j] as f64)
                .sum();
            want[i * 8 + j] = (dot + c[i * 8 + j] as f64) as f32;
        }
    }
    let run = || -> Result<Vec<f32>, super::device::GpuError> {
        let up = |x: &[f32]| -> Result<D::Buffer, super::device::GpuError> {
            let mut buf = dev.alloc(x.len() * 4)?;
            dev.upload(&mut buf, bytemuck::cast_slice(x))?;
            Ok(buf)
        };
        let (ga, gb, gc, gd) = (up(&a)?, up(&b)?, up(&c)?, up(&[f32::NAN; 16 * 8])?);
        let args = [&gd, &ga, &gb, &gc].map(|x| Arg::Ptr(dev.ptr(x)));
        dev.launch("selftest_mma_f32", LaunchCfg::linear(1, 32), &args)?;
        let mut bytes = vec![0u8; 16 * 8 * 4];
        dev.download(&gd, &mut bytes)?;
        Ok(bytemuck::pod_collect_to_vec(&bytes))
    };
    let rel_err = match run() {
        Ok(got) if got.iter().all(|x| x.is_finite()) => rel_err_f32(&got, &want),
        _ => f64::NAN,
    };
    CheckResult {
        op: "mma_m16n8k16_bf16 (tensor-core fragment layout)".into(),
        dtype: DType::Bf16,
        rel_err,
        tol: 1e-5,
    }
}
