//! Backbones: configs, loading from Hugging Face folders, built-in shapes, forward and backward.

pub mod config;
pub mod hf;
pub mod shapes;
pub mod t5;

use std::path::Path;

use crate::backend::Backend;
use crate::error::Result;
use config::T5Config;
use hf::SafetensorsFolder;
use t5::{t5_tensor_specs, T5Weights, T5};

/// Loads a T5 model from a Hugging Face folder: `config.json` and `model.safetensors` (or the
/// shards of `model.safetensors.index.json`), weights converted to the backend's type. Every
/// missing tensor is reported at once, before any weight is read.
pub fn load_t5<B: Backend>(be: &B, dir: &Path) -> Result<T5<B>> {
    let cfg = T5Config::from_file(&dir.join("config.json"))?;
    let folder = SafetensorsFolder::open(dir)?;
    // Checkpoints saved with tied embeddings may keep only the encoder's copy of the table.
    let shared_name =
        if !folder.contains("shared.weight") && folder.contains("encoder.embed_tokens.weight") {
            "encoder.embed_tokens.weight"
        } else {
            "shared.weight"
        };
    let rename = |name: &str| -> String {
        if name == "shared.weight" {
            shared_name.to_string()
        } else {
            name.to_string()
        }
    };
    let names: Vec<String> = t5_tensor_specs(&cfg)
        .iter()
        .map(|(n, _)| rename(n))
        .collect();
    folder.require(&names)?;
    let weights = T5Weights::load(be, &cfg, &mut |name, shape| {
        folder.load_f32(&rename(name), shape)
    })?;
    Ok(T5::new(cfg, weights))
}

/// A built-in T5 shape (see [`shapes::T5_SHAPES`]) with random weights from `seed`.
pub fn random_t5<B: Backend>(be: &B, shape: &str, seed: u64) -> Result<T5<B>> {
    let cfg = shapes::t5_shape(shape)?;
    let weights = T5Weights::load(be, &cfg, &mut |name, dims| {
        Ok(shapes::random_t5_tensor(&cfg, name, dims, seed))
    })?;
    Ok(T5::new(cfg, weights))
}
