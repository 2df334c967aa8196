//! Built-in model shapes with random weights: the papers' settings without downloads.
//!
//! Efficiency depends on shapes, not weight values, so `fastpt bench` and the embedded default
//! run on these. Weights follow Hugging Face's T5 initialisation (normal with the same standard
//! deviations), so activations have realistic magnitudes. Every tensor is generated from the seed
//! and its own name, so the result does not depend on load order or thread count.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use rayon::prelude::*;

use std::path::Path;

use crate::error::{Error, Result};
use crate::model::config::{FeedForward, LlamaConfig, RopeScaling, T5Config};

/// Every built-in shape name, of every family.
pub fn builtin_shapes() -> impl Iterator<Item = &'static str> + Clone {
    T5_SHAPES.iter().chain(LLAMA_SHAPES).copied()
}

/// Whether `name` is a built-in shape (T5 or Llama) rather than a model folder. A folder of
/// that name in the working directory wins: a user's `t5-small/` download is loaded, never
/// shadowed by the random-weight shape (write another path to it to be explicit either way).
pub fn is_builtin_shape(name: &str) -> bool {
    (T5_SHAPES.contains(&name) || LLAMA_SHAPES.contains(&name)) && !Path::new(name).is_dir()
}

/// The model width (d_model / hidden_size) of a built-in shape.
pub fn shape_width(name: &str) -> Result<usize> {
    if LLAMA_SHAPES.contains(&name) {
        Ok(llama_shape(name)?.hidden_size)
    } else {
        Ok(t5_shape(name)?.d_model)
    }
}

/// The built-in T5 shapes, by name.
pub const T5_SHAPES: &[&str] = &[
    "t5-tiny",
    "t5-tiny-d64",
    "t5-small",
    "t5-base",
    "t5-large",
    "t5-3b",
    "t5-11b",
    "flan-t5-small",
    "flan-t5-base",
    "flan-t5-large",
];

/// The config of a built-in T5 shape (values of the published Hugging Face configs).
pub fn t5_shape(name: &str) -> Result<T5Config> {
    // (d_model, d_kv, d_ff, layers, heads, feed-forward, vocab)
    let (d_model, d_kv, d_ff, layers, heads, ff, vocab) = match name {
        // Small enough for the embedded default and CI, same structure as t5-base.
        "t5-tiny" => (64, 16, 256, 2, 4, FeedForward::Relu, 1000),
        // As t5-tiny with heads 64 wide, the width the tensor-core attention kernels take
        // (`fastpt doctor` checks whole steps on them with it).
        "t5-tiny-d64" => (128, 64, 256, 2, 2, FeedForward::Relu, 1000),
        "t5-small" => (512, 64, 2048, 6, 8, FeedForward::Relu, 32128),
        "t5-base" => (768, 64, 3072, 12, 12, FeedForward::Relu, 32128),
        "t5-large" => (1024, 64, 4096, 24, 16, FeedForward::Relu, 32128),
        "t5-3b" => (1024, 128, 16384, 24, 32, FeedForward::Relu, 32128),
        "t5-11b" => (1024, 128, 65536, 24, 128, FeedForward::Relu, 32128),
        "flan-t5-small" => (512, 64, 1024, 8, 6, FeedForward::GatedGelu, 32128),
        "flan-t5-base" => (768, 64, 2048, 12, 12, FeedForward::GatedGelu, 32128),
        "flan-t5-large" => (1024, 64, 2816, 24, 16, FeedForward::GatedGelu, 32128),
        _ => {
            return Err(Error::Input(format!(
                "unknown shape `{name}`; built-in shapes: {}",
                T5_SHAPES.join(", ")
            )))
        }
    };
    let cfg = T5Config {
        vocab_size: vocab,
        d_model,
        d_kv,
        d_ff,
        num_layers: layers,
        num_decoder_layers: layers,
        num_heads: heads,
        relative_attention_num_buckets: 32,
        relative_attention_max_distance: 128,
        feed_forward: ff,
        // v1.0 ties the lm_head to the embeddings; v1.1 / flan do not.
        tie_word_embeddings: ff == FeedForward::Relu,
        scale_decoder_outputs: ff == FeedForward::Relu,
        layer_norm_epsilon: 1e-6,
        decoder_start_token_id: 0,
        pad_token_id: 0,
        eos_token_id: 1,
    };
    // The same limits as a config.json's (a shape edited past them fails here, not in a kernel).
    cfg.check_sizes(std::path::Path::new(name))?;
    Ok(cfg)
}

/// The standard deviation Hugging Face's `T5PreTrainedModel._init_weights` uses for a tensor
/// (initializer_factor 1); `None` for norms, which start at 1.
fn t5_init_std(cfg: &T5Config, name: &str) -> Option<f64> {
    let (c, d_kv, f, hd) = (
        cfg.d_model as f64,
        cfg.d_kv as f64,
        cfg.d_ff as f64,
        cfg.inner_dim() as f64,
    );
    let std = if name.ends_with("layer_norm.weight") {
        return None;
    } else if name == "shared.weight" || name == "lm_head.weight" {
        1.0
    } else if name.ends_with(".q.weight") {
        (c * d_kv).powf(-0.5)
    } else if name.ends_with(".k.weight") || name.ends_with(".v.weight") {
        c.powf(-0.5)
    } else if name.ends_with(".o.weight") {
        hd.powf(-0.5)
    } else if name.ends_with(".wo.weight") {
        f.powf(-0.5)
    } else {
        // wi, wi_0, wi_1 and the relative attention bias
        c.powf(-0.5)
    };
    Some(std)
}

/// A stable 64-bit hash of a tensor name (FNV-1a), mixed into the seed.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Values generated per block, each block from its own stream so generation runs in parallel.
const BLOCK: usize = 1 << 16;

/// The random value of T5 tensor `name` of `shape` for `seed`.
pub fn random_t5_tensor(cfg: &T5Config, name: &str, shape: &[usize], seed: u64) -> Vec<f32> {
    let len: usize = shape.iter().product();
    match t5_init_std(cfg, name) {
        Some(std) => random_normal(name, len, std, seed),
        None => vec![1.0; len],
    }
}

/// `len` values `N(0, std²)` drawn from `seed` and the tensor's name, in parallel blocks.
fn random_normal(name: &str, len: usize, std: f64, seed: u64) -> Vec<f32> {
    let base = seed ^ name_hash(name);
    let mut data = vec![0f32; len];
    data.par_chunks_mut(BLOCK)
        .enumerate()
        .for_each(|(block, chunk)| {
            let mut rng = ChaCha8Rng::seed_from_u64(base.wrapping_add(block as u64));
            for x in chunk {
                let z: f64 = StandardNormal.sample(&mut rng);
                *x = (z * std) as f32;
            }
        });
    data
}

/// The built-in Llama shapes, by name.
pub const LLAMA_SHAPES: &[&str] = &[
    "llama-tiny",
    "llama-tiny-d64",
    "tinyllama-1.1b",
    "llama-2-7b",
    "llama-2-13b",
    "llama-3-8b",
];

/// The config of a built-in Llama shape (values of the published Hugging Face configs).
pub fn llama_shape(name: &str) -> Result<LlamaConfig> {
    // (hidden, intermediate, layers, heads, kv heads, vocab, rope_theta, max positions)
    let (c, f, layers, heads, kv_heads, vocab, theta, max_pos) = match name {
        // Small enough for tests and CI, with grouped-query attention like the large ones.
        "llama-tiny" => (64, 160, 2, 4, 2, 1000, 10000.0, 512),
        // As llama-tiny with heads 64 wide (see t5-tiny-d64); still grouped-query.
        "llama-tiny-d64" => (256, 320, 2, 4, 2, 1000, 10000.0, 512),
        "tinyllama-1.1b" => (2048, 5632, 22, 32, 4, 32000, 10000.0, 2048),
        "llama-2-7b" => (4096, 11008, 32, 32, 32, 32000, 10000.0, 4096),
        "llama-2-13b" => (5120, 13824, 40, 40, 40, 32000, 10000.0, 4096),
        "llama-3-8b" => (4096, 14336, 32, 32, 8, 128256, 500000.0, 8192),
        _ => {
            return Err(Error::Input(format!(
                "unknown shape `{name}`; built-in Llama shapes: {}",
                LLAMA_SHAPES.join(", ")
            )))
        }
    };
    let llama3 = name == "llama-3-8b";
    let cfg = LlamaConfig {
        vocab_size: vocab,
        hidden_size: c,
        intermediate_size: f,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim: c / heads,
        rms_norm_eps: 1e-5,
        rope_theta: theta,
        rope_scaling: RopeScaling::None,
        max_position_embeddings: max_pos,
        tie_word_embeddings: false,
        bos_token_id: if llama3 { 128000 } else { 1 },
        eos_token_ids: vec![if llama3 { 128001 } else { 2 }],
        pad_token_id: None,
    };
    cfg.check_sizes(std::path::Path::new(name))?;
    Ok(cfg)
}

/// The random value of Llama tensor `name` of `shape` for `seed`: Hugging Face's init,
/// `N(0, 0.02²)` (initializer_range) for every matrix, ones for the norms.
pub fn random_llama_tensor(name: &str, shape: &[usize], seed: u64) -> Vec<f32> {
    let len: usize = shape.iter().product();
    if name.ends_with("norm.weight") {
        vec![1.0; len]
    } else {
        random_normal(name, len, 0.02, seed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_shape_resolves_and_unknown_names_are_rejected() {
        for name in T5_SHAPES {
            let cfg = t5_shape(name).unwrap();
            assert!(cfg.d_model > 0);
        }
        let err = t5_shape("t5-huge").unwrap_err().to_string();
        assert!(err.contains("t5-huge") && err.contains("t5-base"), "{err}");
    }

    #[test]
    fn t5_11b_keeps_its_wide_attention() {
        // T5-11B: 128 heads of 128 = 16384 ≠ d_model 1024.
        let cfg = t5_shape("t5-11b").unwrap();
        assert_eq!(cfg.inner_dim(), 16384);
        assert_eq!(cfg.d_model, 1024);
    }

    #[test]
    fn random_tensors_are_seeded_and_scaled() {
        let cfg = t5_shape("t5-tiny").unwrap();
        let name = "encoder.block.0.layer.0.SelfAttention.k.weight";
        let a = random_t5_tensor(&cfg, name, &[64, 64], 7);
        let b = random_t5_tensor(&cfg, name, &[64, 64], 7);
        let c = random_t5_tensor(&cfg, name, &[64, 64], 8);
        assert_eq!(a, b);
        assert_ne!(a, c);
        let var = a.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / a.len() as f64;
        // std should be d_model^-0.5 = 0.125, variance 1/64
        assert!((var * 64.0 - 1.0).abs() < 0.1, "variance {var}");
        let norm = random_t5_tensor(&cfg, "encoder.final_layer_norm.weight", &[64], 7);
        assert!(norm.iter().all(|&x| x == 1.0));
    }

    #[test]
    fn llama_shapes_resolve_with_their_published_head_layout() {
        for name in LLAMA_SHAPES {
            let cfg = llama_shape(name).unwrap();
            assert_eq!(
                cfg.head_dim * cfg.num_attention_heads,
                cfg.hidden_size,
                "{name}"
            );
            assert_eq!(
                cfg.num_attention_heads % cfg.num_key_value_heads,
                0,
                "{name}"
            );
        }
        // Llama 3 8B: 8 key/value heads serve 32 query heads; 128k vocabulary.
        let l3 = llama_shape("llama-3-8b").unwrap();
        assert_eq!((l3.kv_dim(), l3.vocab_size), (1024, 128256));
        let err = llama_shape("llama-4").unwrap_err().to_string();
        assert!(
            err.contains("llama-4") && err.contains("llama-2-7b"),
            "{err}"
        );
        let w = random_llama_tensor("model.layers.0.mlp.up_proj.weight", &[100, 100], 3);
        let var = w.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / w.len() as f64;
        assert!((var.sqrt() / 0.02 - 1.0).abs() < 0.05, "std {}", var.sqrt());
        assert!(random_llama_tensor("model.norm.weight", &[4], 3)
            .iter()
            .all(|&x| x == 1.0));
    }
}
