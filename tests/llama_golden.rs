//! The Llama CPU reference against Hugging Face transformers (goldens from tools/): a
//! prompt-tuned, right-padded batch (prompt rows before BOS, labels on some positions) through
//! a GQA model with plain RoPE and a model with llama3 RoPE scaling, tied embeddings and an
//! explicit head_dim; and greedy generation with the KV cache, token for token. Also T5's
//! greedy generation against transformers' `generate`.

use std::path::Path;

use fastpt::backend::cpu::CpuBackend;
use fastpt::backend::Backend;
use fastpt::model::generate::{GenerateConfig, Generated};
use fastpt::model::hf::{load_tokenizer, read_all_f64, F64Tensors};
use fastpt::model::linear::Quant;
use fastpt::model::llama::LlamaBatch;
use fastpt::model::{load_llama, load_t5};
use fastpt::testing::{fixture, golden, golden_ids, rel_err};

const LLAMA_FOLDERS: &[&str] = &["llama-gqa-tiny", "llama3-tied-tiny"];
const T5_FOLDERS: &[&str] = &["t5-v1_0-tiny", "t5-v1_1-tiny"];

/// Forward + backward on `be`: relative errors of (logits at the label rows, loss,
/// d inputs_embeds) against the goldens.
fn errors<B: Backend>(be: &B, dir: &Path) -> [f64; 3] {
    let model = load_llama(be, dir, Quant::None).unwrap();
    let g = read_all_f64(&dir.join("golden.safetensors")).unwrap();
    let (shape, embeds) = golden(&g, "inputs_embeds");
    let (b, t) = (shape[0], shape[1]);
    let v = model.cfg.vocab_size;
    let x = be.upload_f64(&embeds);
    let (mask, labels) = (golden_ids(&g, "attention_mask"), golden_ids(&g, "labels"));
    let batch = LlamaBatch::<B> {
        inputs_embeds: &x,
        attention_mask: &mask,
        labels: &labels,
        batch: b,
        len: t,
        loss_tokens: None,
    };
    let (out, saved) = model.forward(be, &batch).unwrap();
    let dx = model.backward_dinp(be, &saved);
    // Every label but those at a row's first position is predicted by the row before it.
    let predicted = (0..b * t)
        .filter(|&i| i % t != 0 && labels[i] != -100)
        .count();
    assert_eq!(out.label_rows.len(), predicted);
    assert!(
        predicted < b * t / 2,
        "labels should cover only some positions"
    );
    let logits = golden(&g, "logits").1;
    let expected: Vec<f64> = out
        .label_rows
        .iter()
        .flat_map(|&r| logits[r * v..(r + 1) * v].to_vec())
        .collect();
    let loss = golden(&g, "loss").1[0];
    [
        rel_err(&be.download_f64(&out.logits), &expected),
        ((out.loss - loss) / loss).abs(),
        rel_err(&be.download_f64(&dx), &golden(&g, "d_inputs_embeds").1),
    ]
}

#[test]
fn llama_cpu_f32_matches_hf_goldens() {
    for name in LLAMA_FOLDERS {
        let [logits, loss, grad] = errors(&CpuBackend::<f32>::new(), &fixture(name));
        println!("{name} f32: logits {logits:.2e} loss {loss:.2e} grad {grad:.2e}");
        assert!(logits <= 1e-4, "{name}: logits rel err {logits}");
        assert!(loss <= 1e-4, "{name}: loss rel err {loss}");
        assert!(grad <= 1e-3, "{name}: d inputs_embeds rel err {grad}");
    }
}

#[test]
fn llama_cpu_f64_matches_hf_goldens_tightly() {
    // HF computes RoPE's cos/sin from f32 angles and LlamaRMSNorm's variance in f32 even for a
    // double model, so the goldens carry ~1e-7 relative error of their own.
    for name in LLAMA_FOLDERS {
        let [logits, loss, grad] = errors(&CpuBackend::<f64>::new(), &fixture(name));
        println!("{name} f64: logits {logits:.2e} loss {loss:.2e} grad {grad:.2e}");
        for (what, err) in [("logits", logits), ("loss", loss), ("grad", grad)] {
            assert!(err <= 1e-6, "{name}: {what} rel err {err}");
        }
    }
}

#[test]
fn llama_prompt_rows_come_before_the_token_embeddings() {
    // The golden inputs_embeds are [prompt ; embed_tokens(input_ids)] in every row.
    let be = CpuBackend::<f64>::new();
    for name in LLAMA_FOLDERS {
        let dir = fixture(name);
        let model = load_llama(&be, &dir, Quant::None).unwrap();
        let g = read_all_f64(&dir.join("golden.safetensors")).unwrap();
        let (pshape, prompt) = golden(&g, "prompt");
        let (ishape, input_ids) = (golden(&g, "input_ids").0, golden_ids(&g, "input_ids"));
        let (p, c) = (pshape[0], pshape[1]);
        let (b, t) = (ishape[0], ishape[1]);
        let mut x = be.zeros(b * t * c);
        be.gather_rows(
            &mut x,
            &model.weights.embed,
            &be.upload_index(&input_ids),
            b * t,
            c,
        );
        let embeds = golden(&g, "inputs_embeds").1;
        for r in 0..b {
            let row = &embeds[r * (p + t) * c..(r + 1) * (p + t) * c];
            assert_eq!(&row[..p * c], prompt.as_slice(), "{name} row {r}");
            assert_eq!(
                &row[p * c..],
                &x[r * t * c..(r + 1) * t * c],
                "{name} row {r}"
            );
        }
    }
}

/// HF's tokens `(B, N)` (rows that stopped padded after EOS) against ours (ending at EOS), and
/// our kept step logits against HF's `(B, N, V)`. Returns the largest logits error.
fn compare_generation(
    name: &str,
    ours: &Generated,
    tokens: &[i32],
    step_logits: &[f64],
    eos: i32,
    n: usize,
    v: usize,
) -> f64 {
    let mut worst = 0f64;
    for (r, got) in ours.tokens.iter().enumerate() {
        let row = &tokens[r * n..(r + 1) * n];
        let end = row.iter().position(|&x| x == eos).map_or(n, |i| i + 1);
        let want: Vec<u32> = row[..end].iter().map(|&x| x as u32).collect();
        assert_eq!(got, &want, "{name}: row {r} generated tokens");
        for (s, logits) in ours.step_logits[r].iter().enumerate() {
            let reference = &step_logits[(r * n + s) * v..(r * n + s + 1) * v];
            let ours: Vec<f64> = logits.iter().map(|&x| x as f64).collect();
            worst = worst.max(rel_err(&ours, reference));
        }
    }
    worst
}

fn scalar(g: &F64Tensors, name: &str) -> usize {
    golden(g, name).1[0] as usize
}

/// The generation settings of a `generate.safetensors`: (config, max new tokens, EOS id).
fn generate_config(g: &F64Tensors) -> (GenerateConfig, usize, i32) {
    let n = scalar(g, "max_new_tokens");
    let eos = scalar(g, "eos_token_id") as i32;
    let gen = GenerateConfig {
        max_new_tokens: n,
        eos_token_ids: vec![eos as u32],
        keep_logits: true,
    };
    (gen, n, eos)
}

#[test]
fn llama_greedy_generation_matches_transformers() {
    let be = CpuBackend::<f32>::new();
    for name in LLAMA_FOLDERS {
        let dir = fixture(name);
        let model = load_llama(&be, &dir, Quant::None).unwrap();
        let g = read_all_f64(&dir.join("generate.safetensors")).unwrap();
        let (c, v) = (model.cfg.hidden_size, model.cfg.vocab_size);
        let (gen, n, eos) = generate_config(&g);

        // Token ids, left-padded.
        let (shape, input_ids) = (golden(&g, "input_ids").0, golden_ids(&g, "input_ids"));
        let (b, t) = (shape[0], shape[1]);
        let mask = golden_ids(&g, "attention_mask");
        assert!(mask.contains(&0), "{name}: the batch should be left-padded");
        let mut x = be.zeros(b * t * c);
        be.gather_rows(
            &mut x,
            &model.weights.embed,
            &be.upload_index(&input_ids),
            b * t,
            c,
        );
        let out = model.generate(&be, &x, &mask, b, t, &gen).unwrap();
        let tokens = golden_ids(&g, "tokens");
        let err = compare_generation(name, &out, &tokens, &golden(&g, "step_logits").1, eos, n, v);
        println!("{name}: ids case, step logits rel err {err:.2e}");
        assert!(err <= 1e-4, "{name}: step logits rel err {err}");
        let lens: Vec<usize> = out.tokens.iter().map(Vec::len).collect();
        assert!(
            lens.iter().any(|&l| l < n),
            "{name}: EOS should stop a row: {lens:?}"
        );
        assert!(
            lens.contains(&n),
            "{name}: some row should run to the budget: {lens:?}"
        );

        // Prompt rows + text embeddings.
        let (shape, embeds) = golden(&g, "embeds_inputs_embeds");
        let (b, t) = (shape[0], shape[1]);
        let out = model
            .generate(&be, &be.upload_f64(&embeds), &vec![1; b * t], b, t, &gen)
            .unwrap();
        let tokens = golden_ids(&g, "embeds_tokens");
        let logits = golden(&g, "embeds_step_logits").1;
        let err = compare_generation(name, &out, &tokens, &logits, eos, n, v);
        println!("{name}: prompt case, step logits rel err {err:.2e}");
        assert!(err <= 1e-4, "{name}: prompt case step logits rel err {err}");
    }
}

#[test]
fn t5_greedy_generation_matches_transformers() {
    let be = CpuBackend::<f32>::new();
    for name in T5_FOLDERS {
        let dir = fixture(name);
        let model = load_t5(&be, &dir, Quant::None).unwrap();
        let g = read_all_f64(&dir.join("generate.safetensors")).unwrap();
        let (c, v) = (model.cfg.d_model, model.cfg.vocab_size);
        assert_eq!(
            scalar(&g, "decoder_start_token_id"),
            model.cfg.decoder_start_token_id as usize
        );
        let (gen, n, eos) = generate_config(&g);
        let (shape, input_ids) = (golden(&g, "input_ids").0, golden_ids(&g, "input_ids"));
        let (b, t) = (shape[0], shape[1]);
        let mask = golden_ids(&g, "attention_mask");
        let mut x = be.zeros(b * t * c);
        be.gather_rows(
            &mut x,
            &model.weights.shared,
            &be.upload_index(&input_ids),
            b * t,
            c,
        );
        let out = model.generate(&be, &x, &mask, b, t, &gen).unwrap();
        let tokens = golden_ids(&g, "tokens");
        let err = compare_generation(name, &out, &tokens, &golden(&g, "step_logits").1, eos, n, v);
        println!("{name}: step logits rel err {err:.2e}");
        assert!(err <= 1e-4, "{name}: step logits rel err {err}");
        let lens: Vec<usize> = out.tokens.iter().map(Vec::len).collect();
        assert!(
            lens.iter().any(|&l| l < n),
            "{name}: EOS should stop a row: {lens:?}"
        );
    }
}

#[test]
fn llama_tokenizer_json_gives_hf_ids() {
    for name in LLAMA_FOLDERS {
        let dir = fixture(name);
        let tok = load_tokenizer(&dir).unwrap();
        let text = std::fs::read_to_string(dir.join("tokenizer_golden.json")).unwrap();
        let cases: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
        assert!(!cases.is_empty());
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
