//! Every prompt method end to end on the tiny T5 v1.0 and Llama (GQA) fixtures, in f64: d loss /
//! d method parameters from the hand-written backward (model input gradient →
//! embed_prompt_backward → method backward) against central finite differences of the loss, on
//! sampled coordinates of every parameter.

use std::path::Path;

use fastpt::backend::cpu::CpuBackend;
use fastpt::backend::Backend;
use fastpt::engine::{forward_backward, StepOutput};
use fastpt::model::linear::Quant;
use fastpt::model::{load_model, Backbone};
use fastpt::prompt::{build_method, zero_grads, MethodConfig, MethodContext, PromptMethod};
use fastpt::testing::{random_vec, rel_err};

type B64 = CpuBackend<f64>;

/// Small options per method so that every part of it is exercised on d = 36.
const CASES: &[(&str, &str)] = &[
    ("pt", "prompt_len = 3"),
    ("ptuning", "prompt_len = 2"),
    ("residual", "prompt_len = 3\nbottleneck = 4"),
    ("dpt", "prompt_len = 3\nrank = 2"),
    ("dept", "prompt_len = 2\nrank = 2"),
    ("ept", "source_len = 5\nprompt_len = 3\nrank = 2\nexperts = 2\nexpert_hidden = 4"),
    ("ept", "source_len = 5\nprompt_len = 3\nrank = 2\nexperts = 2\nexpert_hidden = 4\nfusion = \"paper\""),
    ("lamp", "prompt_len = 4\nrank = 2\npool = 2"),
    ("lamp", "prompt_len = 4\nrank = 2\npool = 2\npool_mode = \"attention\""),
    ("xpt", "repeats = 3"),
];

const MAX_LEN: usize = 8;

fn build(be: &B64, model: &Backbone<B64>, name: &str, section: &str) -> Box<dyn PromptMethod<B64>> {
    let (table, c, vocab_size) = (model.embeddings(), model.width(), model.vocab_size());
    let table = be.download_f64(table);
    let embed_rows = |ids: &[u32]| -> fastpt::Result<Vec<f32>> {
        Ok(ids
            .iter()
            .flat_map(|&id| {
                table[id as usize * c..(id as usize + 1) * c]
                    .iter()
                    .map(|&x| x as f32)
            })
            .collect())
    };
    let ctx = MethodContext {
        d_model: c,
        max_len: MAX_LEN,
        vocab_size,
        first_regular_id: 3,
        seed: 11,
        embed_rows: &embed_rows,
        tokenize: None,
    };
    let cfg = MethodConfig::from_toml(name, section).unwrap();
    let mut method = build_method(be, &cfg, &ctx).unwrap();
    // Parameters initialised to zero (DePT's B) would make the other factor's gradient zero:
    // give every parameter random values so that all gradients are exercised.
    for (i, p) in method.params_mut().iter_mut().enumerate() {
        if p.value.iter().all(|&x| x == 0.0) {
            p.value = random_vec(p.value.len(), 0.3, 500 + i as u64);
        }
    }
    method
}

fn check_every_method(fixture: &str) {
    let be = B64::new();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(fixture);
    let model = load_model(&be, &dir, Quant::None).unwrap();
    let batch = match model.is_decoder_only() {
        false => model.random_batch(&[6, 4], &[3, 2], 3),
        true => model.random_batch(&[6, 3], &[2, 3], 3),
    };
    let step = |method: &mut dyn PromptMethod<B64>| -> StepOutput {
        forward_backward(&be, &model, Some(method), &batch).unwrap()
    };
    for &(name, section) in CASES {
        let mut method = build(&be, &model, name, section);
        zero_grads(&be, method.as_mut());
        let out = step(method.as_mut());
        assert_eq!(out.prompt_rows, method.prompt_rows());
        // The FD evaluations below run full steps that add to the gradients: keep these first.
        let grads: Vec<Vec<f64>> = method.params().iter().map(|p| p.grad.clone()).collect();
        let loss = |method: &mut dyn PromptMethod<B64>| step(method).loss;
        for (i, grad) in grads.iter().enumerate() {
            let len = method.params()[i].value.len();
            // Up to 6 coordinates spread over rows and columns of the tensor.
            let n = 6.min(len);
            let coords: Vec<usize> = (0..n).map(|k| (k * (len / n) + k).min(len - 1)).collect();
            let analytic: Vec<f64> = coords.iter().map(|&k| grad[k]).collect();
            let mut numeric = Vec::new();
            for &k in &coords {
                let x0 = method.params()[i].value[k];
                let eps = 1e-5;
                method.params_mut()[i].value[k] = x0 + eps;
                let plus = loss(method.as_mut());
                method.params_mut()[i].value[k] = x0 - eps;
                let minus = loss(method.as_mut());
                method.params_mut()[i].value[k] = x0;
                numeric.push((plus - minus) / (2.0 * eps));
            }
            let err = rel_err(&analytic, &numeric);
            let pname = &method.params()[i].name;
            assert!(
                err < 1e-5,
                "{fixture} {name} [{section}]: d loss / d {pname}: rel err {err}"
            );
            assert!(
                numeric.iter().any(|&g| g != 0.0),
                "{name}: {pname} gets no gradient"
            );
        }
    }
}

#[test]
fn every_method_gradient_matches_finite_differences_through_t5() {
    check_every_method("t5-v1_0-tiny");
}

#[test]
fn every_method_gradient_matches_finite_differences_through_llama() {
    check_every_method("llama-gqa-tiny");
}
