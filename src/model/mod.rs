//! Backbones: configs, loading from Hugging Face folders, built-in shapes, forward and backward.

pub mod config;
pub mod generate;
pub mod hf;
pub mod linear;
pub mod llama;
pub mod nf4;
pub mod shapes;
pub mod t5;

use std::path::Path;

use crate::backend::gpu::cuda::nvtx_range;
use crate::backend::{Backend, CrossEntropyDims, Gemm};
use crate::error::{Error, Result};
use config::{Architecture, LlamaConfig, T5Config};
use hf::SafetensorsFolder;
use linear::Quant;
use llama::{llama_tensor_specs, Llama, LlamaWeights};
use t5::{t5_tensor_specs, T5Weights, T5};

/// Loads a T5 model from a Hugging Face folder: `config.json` and `model.safetensors` (or the
/// shards of `model.safetensors.index.json`), weights converted to the backend's type. Every
/// missing tensor is reported at once, before any weight is read.
pub fn load_t5<B: Backend>(be: &B, dir: &Path, quant: Quant) -> Result<T5<B>> {
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
    let weights = T5Weights::load_quantized(
        be,
        &cfg,
        &mut |name, shape| folder.load_f32(&rename(name), shape),
        quant,
    )?;
    Ok(T5::new(cfg, weights))
}

/// A built-in T5 shape (see [`shapes::T5_SHAPES`]) with random weights from `seed`.
pub fn random_t5<B: Backend>(be: &B, shape: &str, seed: u64, quant: Quant) -> Result<T5<B>> {
    let cfg = shapes::t5_shape(shape)?;
    let weights = T5Weights::load_quantized(
        be,
        &cfg,
        &mut |name, dims| Ok(shapes::random_t5_tensor(&cfg, name, dims, seed)),
        quant,
    )?;
    Ok(T5::new(cfg, weights))
}

/// Loads a Llama model from a Hugging Face folder: `config.json` and `model.safetensors` (or
/// the shards of `model.safetensors.index.json`). Every missing tensor is reported at once,
/// before any weight is read.
pub fn load_llama<B: Backend>(be: &B, dir: &Path, quant: Quant) -> Result<Llama<B>> {
    let cfg = LlamaConfig::from_file(&dir.join("config.json"))?;
    let folder = SafetensorsFolder::open(dir)?;
    let names: Vec<String> = llama_tensor_specs(&cfg)
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    folder.require(&names)?;
    let weights = LlamaWeights::load_quantized(
        be,
        &cfg,
        &mut |name, shape| folder.load_f32(name, shape),
        quant,
    )?;
    Ok(Llama::new(cfg, weights))
}

/// A built-in Llama shape (see [`shapes::LLAMA_SHAPES`]) with random weights from `seed`.
pub fn random_llama<B: Backend>(be: &B, shape: &str, seed: u64, quant: Quant) -> Result<Llama<B>> {
    let cfg = shapes::llama_shape(shape)?;
    let weights = LlamaWeights::load_quantized(
        be,
        &cfg,
        &mut |name, dims| Ok(shapes::random_llama_tensor(name, dims, seed)),
        quant,
    )?;
    Ok(Llama::new(cfg, weights))
}

/// Every mask row holds only 0 and 1 and at least one 1.
pub(crate) fn check_attention_mask(mask: &[i32], t: usize) -> Result<()> {
    for (row, m) in mask.chunks(t).enumerate() {
        if let Some(&x) = m.iter().find(|&&x| x != 0 && x != 1) {
            return Err(Error::Input(format!(
                "attention_mask: row {row} holds {x}; only 0 and 1 are allowed"
            )));
        }
        if m.iter().all(|&x| x == 0) {
            return Err(Error::Input(format!(
                "attention_mask: row {row} has no real position"
            )));
        }
    }
    Ok(())
}

/// What a model's forward returns: the loss and the logits of the rows that enter it.
pub struct ModelOutput<B: Backend> {
    /// Mean cross-entropy over the label positions.
    pub loss: f64,
    /// Logits of the label rows only; row `i` is flat position `label_rows[i]`.
    pub logits: B::Tensor, // (M, V)
    /// T5: the flat decoder positions `b·Td + t` that carry a label. Llama: the flat positions
    /// `b·T + t` whose next token `labels[b, t + 1]` is a label.
    pub label_rows: Vec<usize>, // (M)
    /// The cross-entropy of each label row (rank classification sums them per example).
    pub row_losses: Vec<f64>, // (M)
}

/// The input and saved `1/rms` of one RMSNorm, for its backward.
pub(crate) struct NormSaved<B: Backend> {
    pub(crate) inp: B::Tensor,  // (N, C) the residual stream before the norm
    pub(crate) rstd: B::Tensor, // (N)
}

/// The output projection of a model: `logits = scale · hidden · headᵀ`, `head (V, C)`.
#[derive(Clone, Copy)]
pub(crate) struct LmHead<'a, X> {
    pub(crate) weight: &'a X, // (V, C)
    pub(crate) scale: f64,
}

/// What the backward of [`label_rows_loss`] needs.
pub(crate) struct LossSaved<B: Backend> {
    pub(crate) rows: B::Index,     // (M) flat rows of the hidden states
    pub(crate) dlogits: B::Tensor, // (M, V) d loss / d logits
}

/// The loss head shared by the backbones: gathers the rows `rows (M)` of `hidden (N, C)`,
/// projects them with the lm_head and runs the fused cross-entropy against `targets (M)`, mean
/// over the rows. Only these M rows ever get logits.
pub(crate) fn label_rows_loss<B: Backend>(
    be: &B,
    hidden: &B::Tensor,
    head: LmHead<'_, B::Tensor>,
    rows: Vec<usize>,
    targets: &[i32],
    (c, v): (usize, usize),
) -> (ModelOutput<B>, LossSaved<B>) {
    let _range = nvtx_range("loss (label rows)");
    let m = rows.len();
    let rows_i32: Vec<i32> = rows.iter().map(|&r| r as i32).collect();
    let rows_idx = be.upload_index(&rows_i32);
    let mut h_rows = be.zeros(m * c); // (M, C)
    be.gather_rows(&mut h_rows, hidden, &rows_idx, m, c);
    let mut logits = be.zeros(m * v); // (M, V)
    be.matmul(
        &mut logits,
        &h_rows,
        head.weight,
        Gemm::nt(m, v, c).alpha(head.scale),
    );
    let mut losses = be.zeros(m); // (M)
    let mut dlogits = be.zeros(m * v); // (M, V)
    be.cross_entropy_forward_backward(
        &mut losses,
        &mut dlogits,
        &logits,
        &be.upload_index(targets),
        1.0 / m as f64,
        CrossEntropyDims { m, v },
    );
    let row_losses = be.download_f64(&losses);
    let loss = row_losses.iter().sum::<f64>() / m as f64;
    let output = ModelOutput {
        loss,
        logits,
        label_rows: rows,
        row_losses,
    };
    let saved = LossSaved {
        rows: rows_idx,
        dlogits,
    };
    (output, saved)
}

/// Backward of [`label_rows_loss`]: d loss / d hidden `(N, C)`, zero on rows without a label.
pub(crate) fn label_rows_loss_backward<B: Backend>(
    be: &B,
    saved: &LossSaved<B>,
    head: LmHead<'_, B::Tensor>,
    n: usize,
    (c, v): (usize, usize),
) -> B::Tensor {
    let _range = nvtx_range("loss backward");
    let m = be.len(&saved.dlogits) / v;
    let mut dh_rows = be.zeros(m * c); // (M, C)
    be.matmul(
        &mut dh_rows,
        &saved.dlogits,
        head.weight,
        Gemm::nn(m, c, v).alpha(head.scale),
    );
    let mut d_hidden = be.zeros(n * c); // (N, C)
    be.scatter_rows_add(&mut d_hidden, &dh_rows, &saved.rows, m, c);
    d_hidden
}

/// A model of either family.
pub enum Backbone<B: Backend> {
    T5(T5<B>),
    Llama(Llama<B>),
}

impl<B: Backend> Backbone<B> {
    /// Model width d (C).
    pub fn width(&self) -> usize {
        match self {
            Backbone::T5(m) => m.cfg.d_model,
            Backbone::Llama(m) => m.cfg.hidden_size,
        }
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            Backbone::T5(m) => m.cfg.vocab_size,
            Backbone::Llama(m) => m.cfg.vocab_size,
        }
    }

    /// The ids a batch of its examples needs: `(pad, eos, decoder start)` (Llama has no
    /// decoder: 0).
    pub fn batch_ids(&self) -> (i32, i32, i32) {
        match self {
            Backbone::T5(m) => (
                m.cfg.pad_token_id as i32,
                m.cfg.eos_token_id as i32,
                m.cfg.decoder_start_token_id as i32,
            ),
            Backbone::Llama(m) => (m.cfg.pad_id() as i32, m.cfg.eos_id() as i32, 0),
        }
    }

    /// Decoder-only: a batch row is input then target (see `HostBatch::causal_from_ids`).
    pub fn is_causal(&self) -> bool {
        matches!(self, Backbone::Llama(_))
    }
}

/// Loads whichever model a Hugging Face folder holds, by the `model_type` of its config.json.
pub fn load_model<B: Backend>(be: &B, dir: &Path, quant: Quant) -> Result<Backbone<B>> {
    Ok(match Architecture::of_config(&dir.join("config.json"))? {
        Architecture::T5 => Backbone::T5(load_t5(be, dir, quant)?),
        Architecture::Llama => Backbone::Llama(load_llama(be, dir, quant)?),
    })
}

/// A built-in shape of either family, with random weights from `seed`.
pub fn random_model<B: Backend>(
    be: &B,
    shape: &str,
    seed: u64,
    quant: Quant,
) -> Result<Backbone<B>> {
    if shapes::LLAMA_SHAPES.contains(&shape) {
        Ok(Backbone::Llama(random_llama(be, shape, seed, quant)?))
    } else {
        Ok(Backbone::T5(random_t5(be, shape, seed, quant)?))
    }
}
