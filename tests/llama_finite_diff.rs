//! The whole Llama input gradient against central finite differences in f64 (GQA, RoPE with and
//! without llama3 scaling, tied and untied heads, a right-padded batch with labels on some
//! positions), and greedy generation with the KV cache against full forwards.

use fastpt::backend::cpu::CpuBackend;
use fastpt::backend::Backend;
use fastpt::model::config::{LlamaConfig, RopeScaling};
use fastpt::model::generate::GenerateConfig;
use fastpt::model::llama::{Llama, LlamaBatch, LlamaWeights};
use fastpt::model::shapes::random_llama_tensor;
use fastpt::testing::{finite_diff, random_vec, rel_err};

fn tiny_config(scaling: RopeScaling, tied: bool) -> LlamaConfig {
    LlamaConfig {
        vocab_size: 19,
        hidden_size: 10,
        intermediate_size: 14,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2, // GQA: two query heads per key/value head
        head_dim: 4,            // H·D = 16 ≠ C = 10
        rms_norm_eps: 1e-5,
        rope_theta: 100.0,
        rope_scaling: scaling,
        max_position_embeddings: 32,
        tie_word_embeddings: tied,
        bos_token_id: 1,
        eos_token_ids: vec![2],
        pad_token_id: Some(0),
    }
}

const LLAMA3: RopeScaling = RopeScaling::Llama3 {
    factor: 4.0,
    low_freq_factor: 1.0,
    high_freq_factor: 2.0,
    original_max_position_embeddings: 8,
};

/// Random weights large enough that attention is far from uniform; norms perturbed from 1.
fn model(cfg: &LlamaConfig, be: &CpuBackend<f64>) -> Llama<CpuBackend<f64>> {
    let mut source = |name: &str, shape: &[usize]| -> fastpt::Result<Vec<f32>> {
        let len: usize = shape.iter().product();
        let seed = name
            .bytes()
            .fold(7u64, |h, x| h.wrapping_mul(31).wrapping_add(x as u64));
        let noise = random_vec(len, 0.3, seed);
        let w = random_llama_tensor(name, shape, 42);
        Ok(if name.ends_with("norm.weight") {
            w.iter().zip(noise).map(|(x, n)| x + n as f32).collect()
        } else {
            noise.iter().map(|&n| n as f32 * 2.0).collect()
        })
    };
    let weights = LlamaWeights::load(be, cfg, &mut source).unwrap();
    Llama::new(cfg.clone(), weights)
}

#[test]
fn llama_input_gradient_matches_finite_differences() {
    let be = CpuBackend::<f64>::new();
    let (b, t) = (2, 6);
    // Row 1 has 4 real positions, then padding.
    let attention_mask = vec![1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0];
    // Unshifted labels: row 0 predicts positions 3..6, row 1 positions 2 and 3.
    let labels = vec![-100, -100, -100, 5, 7, 2, -100, -100, 9, 2, -100, -100];
    for (scaling, tied) in [(RopeScaling::None, false), (LLAMA3, true)] {
        let cfg = tiny_config(scaling, tied);
        let m = model(&cfg, &be);
        let c = cfg.hidden_size;
        let embeds = random_vec(b * t * c, 1.0, 3);
        let run = |x: &[f64]| {
            let x = be.upload_f64(x);
            let batch = LlamaBatch::<CpuBackend<f64>> {
                inputs_embeds: &x,
                attention_mask: &attention_mask,
                labels: &labels,
                batch: b,
                len: t,
                loss_tokens: None,
            };
            m.forward(&be, &batch).unwrap()
        };
        let (out, saved) = run(&embeds);
        assert!(out.loss.is_finite() && out.loss > 0.0);
        assert_eq!(out.label_rows, vec![2, 3, 4, 7, 8]);
        let analytic = be.download_f64(&m.backward_dinp(&be, &saved));
        let numeric = finite_diff(&mut |x| run(x).0.loss, &embeds, None, 1e-6);
        let err = rel_err(&analytic, &numeric);
        assert!(err < 1e-7, "{scaling:?} tied={tied}: rel err {err}");
        // Causality: the last position of row 0 predicts nothing and influences no earlier row.
        assert!(analytic[(t - 1) * c..t * c].iter().all(|&g| g == 0.0));
        // Padding rows of row 1 influence nothing.
        assert!(analytic[(t + 4) * c..(t + 6) * c].iter().all(|&g| g == 0.0));
        assert!(analytic[..c].iter().any(|&g| g != 0.0));
    }
}

/// Generation with the KV cache gives, at every step, the logits a full forward over the
/// sequence so far gives at its last position (left padding, GQA, both RoPE variants).
#[test]
fn cached_generation_matches_full_forwards() {
    let be = CpuBackend::<f64>::new();
    let (b, t, new) = (2, 5, 4);
    for (scaling, tied) in [(RopeScaling::None, false), (LLAMA3, true)] {
        let cfg = tiny_config(scaling, tied);
        let m = model(&cfg, &be);
        let c = cfg.hidden_size;
        // Row 1 is left-padded by two positions.
        let mask = vec![1, 1, 1, 1, 1, 0, 0, 1, 1, 1];
        let embeds = random_vec(b * t * c, 1.0, 11);
        let gen = GenerateConfig {
            max_new_tokens: new,
            eos_token_ids: vec![],
            keep_logits: true,
        };
        let out = m
            .generate(&be, &be.upload_f64(&embeds), &mask, b, t, &gen)
            .unwrap();
        for r in 0..b {
            assert_eq!(out.tokens[r].len(), new);
            // The row without its padding, then the generated tokens' embeddings.
            let real: Vec<usize> = (0..t).filter(|&j| mask[r * t + j] == 1).collect();
            let mut seq: Vec<f64> = real
                .iter()
                .flat_map(|&j| embeds[(r * t + j) * c..(r * t + j + 1) * c].to_vec())
                .collect();
            for step in 0..new {
                let len = seq.len() / c;
                // One dummy row after the sequence and labels everywhere: the forward then
                // returns the logits of every real row (causality keeps the dummy out of them).
                let mut padded = seq.clone();
                padded.extend(vec![0.0; c]);
                let x = be.upload_f64(&padded);
                let (ones, labels) = (vec![1; len + 1], vec![3; len + 1]);
                let batch = LlamaBatch::<CpuBackend<f64>> {
                    inputs_embeds: &x,
                    attention_mask: &ones,
                    labels: &labels,
                    batch: 1,
                    len: len + 1,
                    loss_tokens: None,
                };
                let (full, _) = m.forward(&be, &batch).unwrap();
                let v = cfg.vocab_size;
                let want = be.download_f64(&full.logits)[(len - 1) * v..len * v].to_vec();
                let got: Vec<f64> = out.step_logits[r][step].iter().map(|&x| x as f64).collect();
                let err = rel_err(&got, &want);
                assert!(err < 1e-6, "{scaling:?} row {r} step {step}: rel err {err}");
                let id = out.tokens[r][step] as usize;
                seq.extend(be.download_f64(&m.weights.embed)[id * c..(id + 1) * c].to_vec());
            }
        }
    }
}

#[test]
fn generation_stops_rows_at_eos() {
    let be = CpuBackend::<f64>::new();
    let cfg = tiny_config(RopeScaling::None, false);
    let m = model(&cfg, &be);
    let (b, t, c) = (2, 3, cfg.hidden_size);
    let embeds = be.upload_f64(&random_vec(b * t * c, 1.0, 5));
    let mask = vec![1; b * t];
    let free = GenerateConfig {
        max_new_tokens: 6,
        eos_token_ids: vec![],
        keep_logits: false,
    };
    let all = m.generate(&be, &embeds, &mask, b, t, &free).unwrap();
    // Stop on row 0's third token: row 0 ends there, row 1 at its first occurrence (if any).
    let eos = all.tokens[0][2];
    let stop = GenerateConfig {
        eos_token_ids: vec![eos],
        ..free
    };
    let cut = m.generate(&be, &embeds, &mask, b, t, &stop).unwrap();
    for r in 0..b {
        let end = all.tokens[r]
            .iter()
            .position(|&x| x == eos)
            .map_or(6, |i| i + 1);
        assert_eq!(cut.tokens[r], all.tokens[r][..end], "row {r}");
    }
    assert!(cut.tokens[0].len() <= 3);
}

#[test]
fn generation_rejects_bad_requests_with_clear_errors() {
    let be = CpuBackend::<f64>::new();
    let cfg = tiny_config(RopeScaling::None, false);
    let m = model(&cfg, &be);
    let (b, t, c) = (2, 3, cfg.hidden_size);
    let x = be.upload_f64(&random_vec(b * t * c, 1.0, 5));
    let gen = GenerateConfig {
        max_new_tokens: 2,
        eos_token_ids: vec![2],
        keep_logits: false,
    };
    let err = |mask: &[i32], gen: &GenerateConfig| {
        m.generate(&be, &x, mask, b, t, gen)
            .expect_err("should fail")
            .to_string()
    };
    assert!(err(&[1, 1, 1, 1, 1, 0], &gen).contains("left padding"));
    assert!(err(&[1, 1, 1, 0, 0, 0], &gen).contains("row 1 has no real position"));
    assert!(err(&[1, 1, 1, 1, 2, 1], &gen).contains("only 0 and 1"));
    assert!(err(&[1, 1, 1], &gen).contains("attention_mask 3"));
    let long = GenerateConfig {
        max_new_tokens: 40,
        ..gen.clone()
    };
    assert!(err(&[1; 6], &long).contains("max_position_embeddings = 32"));
    let none = GenerateConfig {
        max_new_tokens: 0,
        ..gen
    };
    assert!(err(&[1; 6], &none).contains("no new tokens"));
}
