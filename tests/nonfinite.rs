//! Non-finite values never pass silently (issue 19, rule 3, the numeric half):
//!
//! - a NaN in one element of a frozen attention q weight makes the loss and the input gradient
//!   NaN, on the CPU and on the virtual GPU (each attention kernel, f32 and bf16), for T5 and
//!   Llama. The weight is poisoned after load: `load_model` refuses NaN weights (hostile_sizes.rs);
//!   this checks what the numerics do with a NaN that arises anyway (it used to become a score row
//!   of NaN, then all-zero probabilities, then a finite loss);
//! - `fastpt forward` refuses an input value that overflows f32, naming file, field and value;
//! - `fastpt forward` whose loss is not finite (a finite weight so large the activations
//!   overflow) exits non-zero saying so.

mod common;

use common::fastpt;
use fastpt::backend::cpu::CpuBackend;
use fastpt::backend::gpu::device::DType;
use fastpt::backend::gpu::vgpu::VirtualDevice;
use fastpt::backend::gpu::{AttentionKernel, GpuBackend};
use fastpt::backend::Backend;
use fastpt::engine::{llama_forward_backward, t5_forward_backward, StepOutput};
use fastpt::model::family::Family;
use fastpt::model::linear::{Linear, Quant};
use fastpt::model::{random_llama, random_t5};
use fastpt::testing::fixture;

/// Element `at` of a dense weight set to NaN, on the device.
fn poison<B: Backend>(be: &B, w: &mut Linear<B>, at: usize) {
    let Linear::Dense(t) = w else {
        panic!("the test loads dense weights")
    };
    let mut x = be.download_f32(t);
    x[at] = f32::NAN;
    *t = be.upload_f32(x);
}

/// One forward + backward of a random T5 of `shape` on a padded batch, with (or without) a NaN
/// in encoder layer 0's q weight.
fn t5_step<B: Backend>(be: &B, shape: &str, nan: bool) -> StepOutput {
    let mut model = random_t5(be, shape, 7, Quant::None).unwrap();
    if nan {
        poison(be, &mut model.weights.encoder[0].attn.q, 5);
    }
    let batch = model.random_batch(&[9, 5], &[4, 3], 7);
    t5_forward_backward(be, &model, None, &batch).unwrap()
}

/// As [`t5_step`] for a random Llama (NaN in layer 0's q weight).
fn llama_step<B: Backend>(be: &B, shape: &str, nan: bool) -> StepOutput {
    let mut model = random_llama(be, shape, 7, Quant::None).unwrap();
    if nan {
        poison(be, &mut model.weights.layers[0].q, 5);
    }
    let batch = model.random_batch(&[9, 5], &[4, 3], 7);
    llama_forward_backward(be, &model, None, &batch).unwrap()
}

/// The loss and the input gradient are NaN with the poisoned weight (and, with `control`,
/// finite without it), and `check_finite` (what `fastpt forward` and `step` report) refuses the
/// NaN step.
fn assert_nan_surfaces(what: &str, control: bool, step: &dyn Fn(bool) -> StepOutput) {
    if control {
        let clean = step(false);
        assert!(clean.loss.is_finite(), "{what}: clean loss {}", clean.loss);
        clean.check_finite(what).unwrap();
    }
    let bad = step(true);
    assert!(
        bad.loss.is_nan(),
        "{what}: loss {} with a NaN q weight",
        bad.loss
    );
    assert!(
        bad.grad_norm().is_nan(),
        "{what}: grad norm {}",
        bad.grad_norm()
    );
    let err = bad.check_finite(what).unwrap_err().to_string();
    assert!(
        err.contains("loss") && err.contains("NaN") && err.contains(what),
        "{err}"
    );
}

#[test]
fn a_nan_attention_weight_gives_a_nan_loss_on_the_cpu() {
    let be = CpuBackend::<f32>::new();
    assert_nan_surfaces("cpu t5-tiny", true, &|nan| t5_step(&be, "t5-tiny", nan));
    assert_nan_surfaces("cpu llama-tiny", true, &|nan| {
        llama_step(&be, "llama-tiny", nan)
    });
}

#[test]
fn a_nan_attention_weight_gives_a_nan_loss_on_the_virtual_gpu() {
    // Each kernel once (tensor cores: bf16 only), both dtypes; the clean control on the first.
    let settings = [
        (DType::F32, AttentionKernel::Flash),
        (DType::Bf16, AttentionKernel::Flash),
        (DType::F32, AttentionKernel::Gemm),
        (DType::Bf16, AttentionKernel::FlashTc),
    ];
    for (i, (dtype, kernel)) in settings.into_iter().enumerate() {
        let be = GpuBackend::new(VirtualDevice::new(), dtype).with_attention(kernel);
        // The tensor-core kernels take heads 64 wide (otherwise they run as Flash).
        let (t5, llama) = if kernel == AttentionKernel::FlashTc {
            ("t5-tiny-d64", "llama-tiny-d64")
        } else {
            ("t5-tiny", "llama-tiny")
        };
        let what = format!("vgpu {dtype} {kernel:?} {t5}");
        assert_nan_surfaces(&what, i == 0, &|nan| t5_step(&be, t5, nan));
        let what = format!("vgpu {dtype} {kernel:?} {llama}");
        assert_nan_surfaces(&what, i == 0, &|nan| llama_step(&be, llama, nan));
    }
}

/// A JSON batch for `fastpt forward --shape t5-tiny` (d_model 64): two positions of
/// inputs_embeds, the second holding `value` at element 7.
fn embeds_batch(value: &str) -> String {
    let row = |x: &str| {
        let mut v = vec!["0.25"; 64];
        v[7] = x;
        format!("[{}]", v.join(", "))
    };
    format!(
        r#"{{"inputs_embeds": [[{}, {}]], "labels": [[5, 1]]}}"#,
        row("0.5"),
        row(value)
    )
}

/// An input value beyond f32 is an input error naming file, field, position and value, and
/// nothing is written (it used to become inf, then "loss NaN" with exit 0).
#[test]
fn forward_refuses_an_input_that_overflows_f32() {
    let dir = tempfile::tempdir().unwrap();
    let batch = dir.path().join("batch.json");
    let out = dir.path().join("out.safetensors");
    let (b, o) = (batch.to_str().unwrap(), out.to_str().unwrap());
    std::fs::write(&batch, embeds_batch("0.75")).unwrap();
    let (ok, stdout, stderr) = fastpt(&["forward", "--shape", "t5-tiny", "--batch", b, "--out", o]);
    assert!(ok, "a finite batch: {stdout}\n{stderr}");
    std::fs::remove_file(&out).unwrap();

    for value in ["1e39", "-2.5e40"] {
        std::fs::write(&batch, embeds_batch(value)).unwrap();
        let (ok, _, stderr) = fastpt(&["forward", "--shape", "t5-tiny", "--batch", b, "--out", o]);
        assert!(!ok && !stderr.contains("panicked"), "{value}: {stderr}");
        assert!(
            stderr.contains("batch.json")
                && stderr.contains("inputs_embeds")
                && stderr.contains("position 1, element 7")
                && stderr.contains(value)
                && stderr.contains("overflows f32"),
            "{value}: {stderr}"
        );
        assert!(
            !out.exists(),
            "{value}: outputs written for a refused batch"
        );
    }
}

/// A model folder whose weights are finite but so large that the activations overflow: the
/// loss is not finite, and `fastpt forward` exits non-zero saying so (it printed "loss NaN"
/// and exited 0), after writing the outputs for inspection.
#[test]
fn forward_with_a_non_finite_loss_exits_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    let huge = "encoder.block.0.layer.0.SelfAttention.q.weight";
    // Row 0 (output feature 0 of every query): finite, but q·k overflows f32.
    common::model_with_edited_tensor(&fixture("t5-v1_0-tiny"), &model, huge, |v, shape| {
        v[..shape[1]].fill(3e38)
    });
    let batch = dir.path().join("batch.json");
    std::fs::write(
        &batch,
        r#"{"input_ids": [[5, 6, 7, 1]], "labels": [[8, 1]]}"#,
    )
    .unwrap();
    let out = dir.path().join("out.safetensors");
    let (ok, stdout, stderr) = fastpt(&[
        "forward",
        "--model",
        model.to_str().unwrap(),
        "--batch",
        batch.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!ok && !stderr.contains("panicked"), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("the loss of")
            && stderr.contains("not finite")
            && stderr.contains("batch.json"),
        "{stderr}"
    );
    assert!(out.exists(), "the outputs are kept for inspection");
}
