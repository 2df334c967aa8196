//! The whole T5 input gradient against central finite differences in f64, for v1.0 (ReLU, tied
//! lm_head) and v1.1 (gated GELU, untied) structures, on a tiny shape with odd sizes and a padded
//! batch. Also checks that the tensor list used for loading matches what the loader asks for.

use fastpt::backend::cpu::CpuBackend;
use fastpt::backend::Backend;
use fastpt::model::config::{FeedForward, T5Config};
use fastpt::model::shapes::random_t5_tensor;
use fastpt::model::t5::{t5_tensor_specs, T5Batch, T5Weights, T5};
use fastpt::testing::{finite_diff, random_vec, rel_err};

fn tiny_config(ff: FeedForward, tied: bool) -> T5Config {
    T5Config {
        vocab_size: 23,
        d_model: 8,
        d_kv: 3,
        d_ff: 10,
        num_layers: 2,
        num_decoder_layers: 2,
        num_heads: 2, // H·D = 6 ≠ C = 8
        relative_attention_num_buckets: 6,
        relative_attention_max_distance: 7,
        feed_forward: ff,
        tie_word_embeddings: tied,
        scale_decoder_outputs: tied,
        layer_norm_epsilon: 1e-6,
        decoder_start_token_id: 0,
        pad_token_id: 0,
        eos_token_id: 1,
    }
}

fn model(cfg: &T5Config, be: &CpuBackend<f64>) -> T5<CpuBackend<f64>> {
    let mut source = |name: &str, shape: &[usize]| -> fastpt::Result<Vec<f32>> {
        let mut w = random_t5_tensor(cfg, name, shape, 42);
        if name.ends_with("layer_norm.weight") {
            // Norm weights of 1 would hide a missing multiplication: perturb them.
            let noise = random_vec(w.len(), 0.3, w.len() as u64);
            w.iter_mut().zip(noise).for_each(|(x, n)| *x += n as f32);
        }
        Ok(w)
    };
    let weights = T5Weights::load(be, cfg, &mut source).unwrap();
    T5::new(cfg.clone(), weights)
}

#[test]
fn t5_input_gradient_matches_finite_differences() {
    let be = CpuBackend::<f64>::new();
    let (b, t, td) = (2, 5, 4);
    let attention_mask = vec![1, 1, 1, 1, 1, 1, 1, 1, 0, 0]; // row 1 has 3 real positions
    let decoder_input_ids = vec![0, 5, 7, 9, 0, 11, 3, 0];
    let labels = vec![5, 7, 9, 1, 11, 3, 1, -100];
    for (ff, tied) in [(FeedForward::Relu, true), (FeedForward::GatedGelu, false)] {
        let cfg = tiny_config(ff, tied);
        let m = model(&cfg, &be);
        let c = cfg.d_model;
        let embeds = random_vec(b * t * c, 1.0, 3);
        let loss = |x: &[f64]| {
            let x = be.upload_f64(x);
            let batch = T5Batch::<CpuBackend<f64>> {
                inputs_embeds: &x,
                attention_mask: &attention_mask,
                decoder_input_ids: &decoder_input_ids,
                labels: &labels,
                batch: b,
                enc_len: t,
                dec_len: td,
                loss_tokens: None,
            };
            m.forward(&be, &batch).unwrap()
        };
        let (out, saved) = loss(&embeds);
        assert!(out.loss.is_finite() && out.loss > 0.0);
        assert_eq!(out.label_rows, vec![0, 1, 2, 3, 4, 5, 6]);
        let analytic = be.download_f64(&m.backward_dinp(&be, &saved));
        let numeric = finite_diff(&mut |x| loss(x).0.loss, &embeds, None, 1e-6);
        let err = rel_err(&analytic, &numeric);
        assert!(err < 1e-7, "{ff:?} tied={tied}: rel err {err}");
        // Padded encoder rows influence nothing: their gradient is exactly zero.
        assert!(analytic[(t + 3) * c..(t + 5) * c].iter().all(|&g| g == 0.0));
        assert!(analytic[..c].iter().any(|&g| g != 0.0));
    }
}

#[test]
fn tensor_specs_list_exactly_what_the_loader_reads() {
    for (ff, tied) in [(FeedForward::Relu, true), (FeedForward::GatedGelu, false)] {
        let cfg = tiny_config(ff, tied);
        let mut asked = Vec::new();
        let be = CpuBackend::<f32>::new();
        T5Weights::load(&be, &cfg, &mut |name: &str, shape: &[usize]| {
            asked.push((name.to_string(), shape.to_vec()));
            Ok(vec![0.0; shape.iter().product()])
        })
        .unwrap();
        assert_eq!(asked, t5_tensor_specs(&cfg));
    }
}

/// Generation with the KV cache gives, at every step, the logits of a full teacher-forced
/// decoder forward over the tokens so far (relative bias with a query offset, cross-attention
/// over a padded encoder batch).
#[test]
fn t5_cached_generation_matches_full_forwards() {
    use fastpt::model::generate::GenerateConfig;
    let be = CpuBackend::<f64>::new();
    let (b, t, new) = (2, 5, 9); // 9 steps pass max_distance 7: the clamped bucket is used
    let attention_mask = vec![1, 1, 1, 1, 1, 1, 1, 1, 0, 0];
    for (ff, tied) in [(FeedForward::Relu, true), (FeedForward::GatedGelu, false)] {
        let cfg = tiny_config(ff, tied);
        let m = model(&cfg, &be);
        let (c, v) = (cfg.d_model, cfg.vocab_size);
        let embeds = random_vec(b * t * c, 1.0, 4);
        let x = be.upload_f64(&embeds);
        let gen = GenerateConfig {
            max_new_tokens: new,
            eos_token_ids: vec![],
            keep_logits: true,
        };
        let out = m.generate(&be, &x, &attention_mask, b, t, &gen).unwrap();
        for r in 0..b {
            assert_eq!(out.tokens[r].len(), new);
            let mut dec = vec![cfg.decoder_start_token_id as i32];
            dec.extend(out.tokens[r].iter().map(|&id| id as i32));
            dec.pop();
            let labels = vec![3; new];
            let row = be.upload_f64(&embeds[r * t * c..(r + 1) * t * c]);
            let batch = T5Batch::<CpuBackend<f64>> {
                inputs_embeds: &row,
                attention_mask: &attention_mask[r * t..(r + 1) * t],
                decoder_input_ids: &dec,
                labels: &labels,
                batch: 1,
                enc_len: t,
                dec_len: new,
                loss_tokens: None,
            };
            let full = be.download_f64(&m.forward(&be, &batch).unwrap().0.logits);
            for step in 0..new {
                let got: Vec<f64> = out.step_logits[r][step].iter().map(|&x| x as f64).collect();
                let err = rel_err(&got, &full[step * v..(step + 1) * v]);
                assert!(err < 1e-6, "{ff:?} row {r} step {step}: rel err {err}");
            }
        }
    }
}
