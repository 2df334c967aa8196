//! The CPU reference against Hugging Face transformers (goldens from tools/make_goldens.py):
//! logits at the label rows, loss, encoder output and d loss / d inputs_embeds, for a T5 v1.0
//! folder (ReLU, tied, f32 single file) and a T5 v1.1 folder (gated GELU, untied, bf16 shards).
//! The goldens are f64; the f32 engine must match within 1e-4 (outputs) / 1e-3 (gradients), the
//! f64 engine far tighter.

use std::path::Path;

use fastpt::backend::cpu::CpuBackend;
use fastpt::backend::Backend;
use fastpt::model::hf::{load_tokenizer, read_all_f64};
use fastpt::model::linear::Quant;
use fastpt::model::load_t5;
use fastpt::model::t5::T5Batch;
use fastpt::testing::{fixture, golden, golden_ids, rel_err};

const FOLDERS: &[&str] = &["t5-v1_0-tiny", "t5-v1_1-tiny"];

/// Runs forward + backward on backend `be` and returns the relative errors of
/// (logits at label rows, loss, encoder output, d inputs_embeds) against the goldens.
fn errors<B: Backend>(be: &B, dir: &Path) -> [f64; 4] {
    let model = load_t5(be, dir, Quant::None).unwrap();
    let g = read_all_f64(&dir.join("golden.safetensors")).unwrap();
    let (shape, embeds) = golden(&g, "inputs_embeds");
    let (b, t) = (shape[0], shape[1]);
    let td = golden(&g, "labels").0[1];
    let v = model.cfg.vocab_size;
    let x = be.upload_f64(&embeds);
    let (mask, dec_ids, labels) = (
        golden_ids(&g, "attention_mask"),
        golden_ids(&g, "decoder_input_ids"),
        golden_ids(&g, "labels"),
    );
    let batch = T5Batch::<B> {
        inputs_embeds: &x,
        attention_mask: &mask,
        decoder_input_ids: &dec_ids,
        labels: &labels,
        batch: b,
        enc_len: t,
        dec_len: td,
        loss_tokens: None,
    };
    let (out, saved) = model.forward(be, &batch).unwrap();
    let dx = model.backward_dinp(be, &saved);

    let logits = golden(&g, "logits").1;
    let expected: Vec<f64> = out
        .label_rows
        .iter()
        .flat_map(|&r| logits[r * v..(r + 1) * v].to_vec())
        .collect();
    assert_eq!(
        out.label_rows.len(),
        labels.iter().filter(|&&l| l != -100).count()
    );
    let loss = golden(&g, "loss").1[0];
    [
        rel_err(&be.download_f64(&out.logits), &expected),
        ((out.loss - loss) / loss).abs(),
        rel_err(
            &be.download_f64(saved.encoder_out()),
            &golden(&g, "encoder_last_hidden_state").1,
        ),
        rel_err(&be.download_f64(&dx), &golden(&g, "d_inputs_embeds").1),
    ]
}

#[test]
fn t5_cpu_f32_matches_hf_goldens() {
    for name in FOLDERS {
        let [logits, loss, enc, grad] = errors(&CpuBackend::<f32>::new(), &fixture(name));
        println!(
            "{name} f32: logits {logits:.2e} loss {loss:.2e} encoder {enc:.2e} grad {grad:.2e}"
        );
        assert!(logits <= 1e-4, "{name}: logits rel err {logits}");
        assert!(loss <= 1e-4, "{name}: loss rel err {loss}");
        assert!(enc <= 1e-4, "{name}: encoder output rel err {enc}");
        assert!(grad <= 1e-3, "{name}: d inputs_embeds rel err {grad}");
    }
}

#[test]
fn t5_cpu_f64_matches_hf_goldens_tightly() {
    // Same weights and f64 on both sides, except that HF's T5LayerNorm computes the variance in
    // f32 even for a double model (`hidden_states.to(torch.float32).pow(2).mean(-1)`), so the
    // goldens carry ~1e-7 relative error of their own: the bound is 1e-6, not 1e-12.
    for name in FOLDERS {
        let [logits, loss, enc, grad] = errors(&CpuBackend::<f64>::new(), &fixture(name));
        println!(
            "{name} f64: logits {logits:.2e} loss {loss:.2e} encoder {enc:.2e} grad {grad:.2e}"
        );
        for (what, err) in [
            ("logits", logits),
            ("loss", loss),
            ("encoder", enc),
            ("grad", grad),
        ] {
            assert!(err <= 1e-6, "{name}: {what} rel err {err}");
        }
    }
}

#[test]
fn input_ids_gather_to_the_golden_inputs_embeds() {
    // The golden inputs_embeds are HF's shared(input_ids): our embedding gather must agree.
    let be = CpuBackend::<f64>::new();
    for name in FOLDERS {
        let dir = fixture(name);
        let model = load_t5(&be, &dir, Quant::None).unwrap();
        let g = read_all_f64(&dir.join("golden.safetensors")).unwrap();
        let input_ids = golden_ids(&g, "input_ids");
        let c = model.cfg.d_model;
        let mut x = be.zeros(input_ids.len() * c);
        be.gather_rows(
            &mut x,
            &model.weights.shared,
            &be.upload_index(&input_ids),
            input_ids.len(),
            c,
        );
        assert_eq!(x, golden(&g, "inputs_embeds").1, "{name}");
    }
}

#[test]
fn tokenizer_json_gives_hf_ids() {
    for name in FOLDERS {
        let dir = fixture(name);
        let tok = load_tokenizer(&dir).unwrap();
        let text = std::fs::read_to_string(dir.join("tokenizer_golden.json")).unwrap();
        let cases: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
        assert!(cases.len() >= 4);
        for case in cases {
            let input = case["text"].as_str().unwrap();
            let want: Vec<u32> = case["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect();
            let got = tok.encode(input, true).unwrap();
            assert_eq!(got.get_ids(), want.as_slice(), "{name}: {input:?}");
        }
    }
}
