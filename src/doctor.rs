//! `fastpt doctor`: the GPU backend against the CPU reference on any device. The op checks
//! (every op case of `backend::gpu::cases` and one tensor-core `mma`) are in
//! `backend::gpu::check`; this module adds whole training steps of built-in T5 and Llama shapes
//! (dense and NF4 weights, no method, PT, EPT-MS) and greedy generation with the KV cache.

use crate::backend::cpu::CpuBackend;
use crate::backend::gpu::cases::round_to;
use crate::backend::gpu::device::{DType, Device};
use crate::backend::gpu::GpuBackend;
use crate::backend::Backend;
use crate::engine::{build_backbone_method, forward_backward};
use crate::model::generate::{GenerateConfig, Generated};
use crate::model::linear::Quant;
use crate::model::{random_model_rounded, Backbone};
use crate::prompt::MethodConfig;
use crate::testing::{random_vec, rel_err_f32};

pub use crate::backend::gpu::check::{
    check_mma, check_ops, op_tolerance, results_table, CheckResult,
};

/// The tolerance of a whole step's outputs (loss, logits): f32 1e-4 (errors compound over
/// layers), bf16 2e-2.
pub fn step_tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-4,
        DType::Bf16 => 2e-2,
    }
}

/// The tolerance of a whole step's gradients. In bf16 every activation of the forward and every
/// gradient of the backward is stored rounded to 8 bits of mantissa; over the dozens of ops
/// between the loss and the input embeddings these roundings add up to 3–5e-2 (measured on
/// t5-tiny against the f32 CPU with the same bf16 weights), so bf16 gets 1e-1. A real bug (a
/// wrong sign, a skipped head or row) gives errors of order 1; the f32 row is the tight check.
pub fn step_grad_tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-4,
        DType::Bf16 => 1e-1,
    }
}

/// A model of a built-in shape (T5 or Llama) with random weights rounded to `dtype`, on any
/// backend: the GPU and the CPU reference get identical weights.
fn model_with_weights<B: Backend + 'static>(
    be: &B,
    shape: &str,
    seed: u64,
    dtype: DType,
    quant: Quant,
) -> crate::Result<Backbone<B>> {
    random_model_rounded(be, shape, seed, quant, &|x| round_to(x, dtype))
}

/// Whole forward + backward steps of a built-in shape (T5 or Llama) on a padded random batch,
/// without and with a prompt method (PT: embed + prompt rows; EPT-MS: the low-rank update and
/// the method ops), against the CPU: loss, label-row logits, d inputs_embeds and the method's
/// gradients.
pub fn check_steps<D: Device>(
    gpu: &GpuBackend<D>,
    shape: &str,
    seed: u64,
) -> crate::Result<Vec<CheckResult>> {
    let dt = gpu.dtype();
    let cpu = CpuBackend::<f32>::new();
    let model_g = model_with_weights(gpu, shape, seed, dt, Quant::None)?;
    let model_c = model_with_weights(&cpu, shape, seed, dt, Quant::None)?;
    let (inputs, targets) = ([9, 6, 11], [4, 2, 5]);
    let batch = model_c.random_batch(&inputs, &targets, seed + 1);
    let mut results = Vec::new();
    let mut push = |op: String, got: &[f32], want: &[f32], tol: f64| {
        let rel_err = if got.iter().all(|x| x.is_finite()) {
            rel_err_f32(got, want)
        } else {
            f64::NAN
        };
        results.push(CheckResult {
            op,
            dtype: dt,
            rel_err,
            tol,
        });
    };

    // Dense weights, then NF4 weights (dequantised before each GEMM, bit-identically on both
    // backends in f32).
    let nf4_g = model_with_weights(gpu, shape, seed, dt, Quant::Nf4)?;
    let nf4_c = model_with_weights(&cpu, shape, seed, dt, Quant::Nf4)?;
    for (tag, mg, mc) in [("", &model_g, &model_c), (" nf4", &nf4_g, &nf4_c)] {
        let g = forward_backward(gpu, mg, None, &batch)?;
        let c = forward_backward(&cpu, mc, None, &batch)?;
        push(
            format!("{shape} step{tag}: loss"),
            &[g.loss as f32],
            &[c.loss as f32],
            step_tolerance(dt),
        );
        push(
            format!("{shape} step{tag}: logits"),
            &g.logits,
            &c.logits,
            step_tolerance(dt),
        );
        push(
            format!("{shape} step{tag}: d inputs_embeds"),
            &g.d_inputs_embeds,
            &c.d_inputs_embeds,
            step_grad_tolerance(dt),
        );
    }

    for (label, method, options) in [
        ("pt", "pt", "prompt_len = 5"),
        ("ept", "ept", "prompt_len = 4\nrank = 3"),
        // No prompt rows: the update alone (the end of the claims' sweep over s).
        ("ept s=0", "ept", "prompt_len = 0\nrank = 3"),
    ] {
        let cfg = MethodConfig::from_toml(method, options)?;
        let mut mg = build_backbone_method(gpu, &model_g, &cfg, 100, seed, None)?;
        let mut mc = build_backbone_method(&cpu, &model_c, &cfg, 100, seed, None)?;
        // Same starting values on both: the GPU's (rounded) parameters copied to the CPU.
        for (pg, pc) in mg.params().iter().zip(mc.params_mut()) {
            pc.value = gpu.download_f32(&pg.value);
        }
        let g = forward_backward(gpu, &model_g, Some(mg.as_mut()), &batch)?;
        let c = forward_backward(&cpu, &model_c, Some(mc.as_mut()), &batch)?;
        push(
            format!("{shape} step + {label}: loss"),
            &[g.loss as f32],
            &[c.loss as f32],
            step_tolerance(dt),
        );
        // An empty parameter (EPT-MS's prompt at s = 0) has nothing to compare.
        for (pg, pc) in mg
            .params()
            .iter()
            .zip(mc.params())
            .filter(|(p, _)| p.numel() > 0)
        {
            push(
                format!("{shape} step + {label}: d {}", pg.name),
                &gpu.download_f32(&pg.grad),
                &pc.grad,
                step_grad_tolerance(dt),
            );
        }
    }

    // Greedy generation with the KV cache (left-padded for Llama): the logits of the first step
    // (prefill) and, in f32, of every step, where both backends pick the same tokens.
    let (b, t) = (2, 7);
    let mask: Vec<i32> = match model_c.is_decoder_only() {
        false => vec![1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0],
        true => vec![1, 1, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1],
    };
    let width = model_c.width();
    let embeds: Vec<f32> = random_vec(b * t * width, 1.0, seed + 2)
        .into_iter()
        .map(|x| round_to(x as f32, dt))
        .collect();
    let gen = GenerateConfig {
        max_new_tokens: 4,
        eos_token_ids: Vec::new(),
        keep_logits: true,
    };
    let generate = |be_g: Option<&GpuBackend<D>>| -> crate::Result<Generated> {
        match be_g {
            Some(g) => model_g.generate(g, &g.upload_f32(embeds.clone()), &mask, b, t, &gen),
            None => model_c.generate(&cpu, &cpu.upload_f32(embeds.clone()), &mask, b, t, &gen),
        }
    };
    let (g, c) = (generate(Some(gpu))?, generate(None)?);
    let first =
        |x: &Generated| -> Vec<f32> { x.step_logits.iter().flat_map(|r| r[0].clone()).collect() };
    push(
        format!("{shape} generate: first-step logits"),
        &first(&g),
        &first(&c),
        step_tolerance(dt),
    );
    if dt == DType::F32 && g.tokens != c.tokens {
        // Recorded as a failure (NaN), not a panic: doctor reports every check.
        push(
            format!("{shape} generate: tokens differ"),
            &[f32::NAN],
            &[0.0],
            0.0,
        );
    } else if dt == DType::F32 {
        let all = |x: &Generated| -> Vec<f32> {
            x.step_logits.iter().flatten().flatten().copied().collect()
        };
        push(
            format!("{shape} generate: all step logits"),
            &all(&g),
            &all(&c),
            step_tolerance(dt),
        );
    }
    Ok(results)
}

#[cfg(test)]
mod tests {
    //! The doctor's whole steps on the virtual GPU: T5 and Llama (with and without a prompt
    //! method, and with the tensor-core attention on heads 64 wide) against the CPU, in f32 and
    //! bf16. (Also run under the other virtual-GPU schedules by
    //! `backend::gpu::tests::gpu_tests_pass_under_other_schedules`.)

    use super::*;
    use crate::backend::gpu::vgpu::VirtualDevice;
    use crate::backend::gpu::AttentionKernel;

    fn assert_all_pass(what: &str, results: &[CheckResult]) {
        let table = results_table(results);
        assert!(results.iter().all(|r| r.passed()), "{what}:\n{table}");
    }

    #[test]
    fn doctor_step_checks_pass_on_the_virtual_gpu() {
        step_checks_pass("t5-tiny", AttentionKernel::Flash);
    }

    #[test]
    fn doctor_llama_step_checks_pass_on_the_virtual_gpu() {
        step_checks_pass("llama-tiny", AttentionKernel::Flash);
    }

    #[test]
    fn doctor_tensor_core_step_checks_pass_on_the_virtual_gpu() {
        for shape in ["t5-tiny-d64", "llama-tiny-d64"] {
            let be = GpuBackend::new(VirtualDevice::new(), DType::Bf16)
                .with_attention(AttentionKernel::FlashTc);
            let results = check_steps(&be, shape, 7).unwrap();
            assert_all_pass(&format!("{shape} bf16 flash-tc"), &results);
            let launched = be.device().launched();
            assert!(
                launched
                    .iter()
                    .any(|k| k.starts_with("attention_forward_tc_d64")),
                "{shape}: the tensor-core kernels did not run: {launched:?}"
            );
        }
    }

    fn step_checks_pass(shape: &str, attention: AttentionKernel) {
        for dtype in [DType::F32, DType::Bf16] {
            let be = GpuBackend::new(VirtualDevice::new(), dtype).with_attention(attention);
            let results = check_steps(&be, shape, 7).unwrap();
            assert_all_pass(&format!("{shape} {dtype}"), &results);
        }
    }
}
