//! `--quant nf4`: a backbone with NF4 linear weights computes exactly what a dense backbone with
//! the dequantised weights computes (the scratch is dequantised right before each GEMM), for T5
//! and Llama, forward and input gradient; NF4 stays close to the dense model it approximates;
//! the storage shrinks to about 4.1 bits per linear weight.

use fastpt::backend::cpu::CpuBackend;
use fastpt::backend::nf4::{dequantize_nf4, quantize_nf4};
use fastpt::data::HostBatch;
use fastpt::engine::forward_backward;
use fastpt::model::linear::{Linear, Quant};
use fastpt::model::llama::{Llama, LlamaWeights};
use fastpt::model::shapes::{llama_shape, random_llama_tensor, random_t5_tensor, t5_shape};
use fastpt::model::t5::{T5Weights, T5};
use fastpt::model::Backbone;
use fastpt::testing::rel_err;

/// The frozen linear weights: the ones `--quant nf4` stores in 4 bits.
fn is_linear(name: &str) -> bool {
    let linear = [
        ".q.weight",
        ".k.weight",
        ".v.weight",
        ".o.weight",
        ".wi.weight",
        ".wi_0.weight",
        ".wi_1.weight",
        ".wo.weight",
        "_proj.weight",
    ];
    linear.iter().any(|s| name.ends_with(s))
}

/// The NF4 round trip of a tensor: what the quantised model multiplies by.
fn nf4_round_trip(x: Vec<f32>) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    dequantize_nf4(&mut out, &quantize_nf4(&x));
    out
}

/// `(nf4 model, dense model of the dequantised weights, dense model of the original weights)`.
fn models(shape: &str, seed: u64) -> [Backbone<CpuBackend<f32>>; 3] {
    let be = CpuBackend::<f32>::new();
    let build = |quant: Quant, round_trip: bool| -> Backbone<CpuBackend<f32>> {
        let prep = |name: &str, w: Vec<f32>| {
            if round_trip && is_linear(name) {
                nf4_round_trip(w)
            } else {
                w
            }
        };
        if shape.starts_with("llama") {
            let cfg = llama_shape(shape).unwrap();
            let mut src =
                |name: &str, dims: &[usize]| Ok(prep(name, random_llama_tensor(name, dims, seed)));
            let w = LlamaWeights::load_quantized(&be, &cfg, &mut src, quant).unwrap();
            Backbone::new(Llama::new(cfg, w))
        } else {
            let cfg = t5_shape(shape).unwrap();
            let mut src = |name: &str, dims: &[usize]| {
                Ok(prep(name, random_t5_tensor(&cfg, name, dims, seed)))
            };
            let w = T5Weights::load_quantized(&be, &cfg, &mut src, quant).unwrap();
            Backbone::new(T5::new(cfg, w))
        }
    };
    [
        build(Quant::Nf4, false),
        build(Quant::None, true),
        build(Quant::None, false),
    ]
}

fn batch(model: &Backbone<CpuBackend<f32>>, seed: u64) -> HostBatch {
    let (inputs, targets) = ([7, 5, 9], [3, 2, 4]);
    model.random_batch(&inputs, &targets, seed)
}

#[test]
fn nf4_backbone_equals_dense_backbone_of_dequantised_weights() {
    let be = CpuBackend::<f32>::new();
    for shape in ["t5-tiny", "llama-tiny"] {
        let [nf4, round_trip, dense] = models(shape, 3);
        let batch = batch(&dense, 4);
        let q = forward_backward(&be, &nf4, None, &batch).unwrap();
        let r = forward_backward(&be, &round_trip, None, &batch).unwrap();
        let d = forward_backward(&be, &dense, None, &batch).unwrap();
        // Same arithmetic on the same values: equal to the last bit.
        assert_eq!(q.loss, r.loss, "{shape}: loss");
        assert_eq!(q.logits, r.logits, "{shape}: logits");
        assert_eq!(
            q.d_inputs_embeds, r.d_inputs_embeds,
            "{shape}: d inputs_embeds"
        );
        // And an approximation of the dense model, not something else: random N(0, σ²) weights
        // lose ~9% to NF4 each; the outputs move by a few percent.
        let f = |x: &[f32]| x.iter().map(|&v| v as f64).collect::<Vec<_>>();
        let err = rel_err(&f(&q.logits), &f(&d.logits));
        assert!(
            err > 1e-4 && err < 0.3,
            "{shape}: NF4 vs dense logits differ by {err:.3e}"
        );
    }
}

#[test]
fn nf4_weights_take_about_a_quarter_byte_per_value() {
    let be = CpuBackend::<f32>::new();
    let x: Vec<f32> = (0..4096 * 64)
        .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    let dense = Linear::<CpuBackend<f32>>::load(&be, x.clone(), Quant::None);
    let nf4 = Linear::<CpuBackend<f32>>::load(&be, x, Quant::Nf4);
    let (d, q) = (dense.bytes(&be, 2), nf4.bytes(&be, 2));
    let bits = q as f64 * 8.0 / (4096.0 * 64.0);
    assert!((4.1..4.2).contains(&bits), "{bits} bits per value");
    assert!(q * 3 < d, "nf4 {q} bytes vs bf16 {d} bytes");
}

#[test]
fn quant_names_parse_and_unknown_ones_are_rejected() {
    assert_eq!("nf4".parse::<Quant>().unwrap(), Quant::Nf4);
    assert_eq!("none".parse::<Quant>().unwrap(), Quant::None);
    let err = "int8".parse::<Quant>().unwrap_err().to_string();
    assert!(err.contains("int8") && err.contains("nf4"), "{err}");
}
