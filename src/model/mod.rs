//! Backbones: configs, loading from Hugging Face folders, built-in shapes, forward and backward.
//! Every family is used through one interface, [`Family`] (see family.rs); the `impl
//! Architecture` below is where the families are registered.

pub mod batch;
pub mod config;
pub mod family;
pub mod flops;
pub mod folder;
pub mod generate;
pub mod hf;
pub mod linear;
pub mod llama;
pub mod memory;
pub mod shapes;
pub mod t5;

use std::path::Path;

use crate::backend::profiling::nvtx_range;
use crate::backend::{Backend, CrossEntropyDims, Gemm};
use crate::error::{Error, Result};
pub use config::Architecture;
use config::{CheckpointQuant, LlamaConfig, T5Config};
pub use family::{Activations, Backbone, Family, SpecialIds, StepBatch};
use hf::SafetensorsFolder;
use linear::{LinearData, Quant};
use llama::{llama_tensor_specs, Llama, LlamaWeights};
use t5::{t5_tensor_specs, T5Weights, T5};

/// Loads a T5 model from a Hugging Face folder: `config.json` and `model.safetensors` (or the
/// shards of `model.safetensors.index.json`), weights converted to the backend's type. Every
/// missing tensor is reported at once, before any weight is read.
///
/// A bitsandbytes 4-bit folder (config.json's `quantization_config`, see [`CheckpointQuant`])
/// loads each linear as it is stored: NF4 where the checkpoint has its quant state, dense
/// otherwise (transformers keeps T5's `wo` and every lm_head dense); `quant` then applies to the
/// dense linears only (`Quant::None` keeps them dense, `Quant::Nf4` quantises them).
pub fn load_t5<B: Backend>(be: &B, dir: &Path, quant: Quant) -> Result<T5<B>> {
    let config = dir.join("config.json");
    let cfg = T5Config::from_file(&config)?;
    CheckpointQuant::of_config(&config)?;
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
    let weights = T5Weights::load_with_linears(
        be,
        &cfg,
        &mut |name, shape| folder.load_f32(&rename(name), shape),
        &mut |name, shape| checkpoint_linear(&folder, name, shape),
        quant,
    )?;
    Ok(T5::new(cfg, weights))
}

/// A built-in T5 shape (see [`shapes::T5_SHAPES`]) with random weights from `seed`.
pub fn random_t5<B: Backend>(be: &B, shape: &str, seed: u64, quant: Quant) -> Result<T5<B>> {
    random_t5_mapped(be, shape, seed, quant, None)
}

/// [`random_t5`] with every weight value passed through `map` first.
fn random_t5_mapped<B: Backend>(
    be: &B,
    shape: &str,
    seed: u64,
    quant: Quant,
    map: Option<&dyn Fn(f32) -> f32>,
) -> Result<T5<B>> {
    let cfg = shapes::t5_shape(shape)?;
    let weights = T5Weights::load_quantized(
        be,
        &cfg,
        &mut |name, dims| {
            Ok(map_values(
                shapes::random_t5_tensor(&cfg, name, dims, seed),
                map,
            ))
        },
        quant,
    )?;
    Ok(T5::new(cfg, weights))
}

/// Loads a Llama model from a Hugging Face folder: `config.json` and `model.safetensors` (or
/// the shards of `model.safetensors.index.json`). Every missing tensor is reported at once,
/// before any weight is read. A bitsandbytes 4-bit folder loads as in [`load_t5`].
pub fn load_llama<B: Backend>(be: &B, dir: &Path, quant: Quant) -> Result<Llama<B>> {
    let config = dir.join("config.json");
    let cfg = LlamaConfig::from_file(&config)?;
    CheckpointQuant::of_config(&config)?;
    let folder = SafetensorsFolder::open(dir)?;
    let names: Vec<String> = llama_tensor_specs(&cfg)
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    folder.require(&names)?;
    let weights = LlamaWeights::load_with_linears(
        be,
        &cfg,
        &mut |name, shape| folder.load_f32(name, shape),
        &mut |name, shape| checkpoint_linear(&folder, name, shape),
        quant,
    )?;
    Ok(Llama::new(cfg, weights))
}

/// Linear weight `name` of a checkpoint folder: NF4 as stored when it has a bitsandbytes 4-bit
/// quant state, else its full-precision values.
fn checkpoint_linear(
    folder: &SafetensorsFolder,
    name: &str,
    shape: &[usize],
) -> Result<LinearData> {
    if folder.is_bnb_4bit(name) {
        Ok(LinearData::Nf4(folder.load_bnb_nf4(name, shape)?))
    } else {
        Ok(LinearData::Dense(folder.load_f32(name, shape)?))
    }
}

/// A built-in Llama shape (see [`shapes::LLAMA_SHAPES`]) with random weights from `seed`.
pub fn random_llama<B: Backend>(be: &B, shape: &str, seed: u64, quant: Quant) -> Result<Llama<B>> {
    random_llama_mapped(be, shape, seed, quant, None)
}

/// [`random_llama`] with every weight value passed through `map` first.
fn random_llama_mapped<B: Backend>(
    be: &B,
    shape: &str,
    seed: u64,
    quant: Quant,
    map: Option<&dyn Fn(f32) -> f32>,
) -> Result<Llama<B>> {
    let cfg = shapes::llama_shape(shape)?;
    let weights = LlamaWeights::load_quantized(
        be,
        &cfg,
        &mut |name, dims| {
            Ok(map_values(
                shapes::random_llama_tensor(name, dims, seed),
                map,
            ))
        },
        quant,
    )?;
    Ok(Llama::new(cfg, weights))
}

/// `values` with `map` applied to each, in place.
fn map_values(mut values: Vec<f32>, map: Option<&dyn Fn(f32) -> f32>) -> Vec<f32> {
    if let Some(map) = map {
        values.iter_mut().for_each(|x| *x = map(*x));
    }
    values
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
    /// Mean cross-entropy over the label positions (sum over them / `loss_tokens` when the
    /// batch gives it).
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
/// over the rows (or over `loss_tokens` when given: a rank's share of a larger batch). Only these
/// M rows ever get logits.
pub(crate) fn label_rows_loss<B: Backend>(
    be: &B,
    hidden: &B::Tensor,
    head: LmHead<'_, B::Tensor>,
    (rows, loss_tokens): (Vec<usize>, Option<usize>),
    targets: &[i32],
    (c, v): (usize, usize),
) -> (ModelOutput<B>, LossSaved<B>) {
    let _range = nvtx_range("loss (label rows)");
    let m = rows.len();
    let denominator = loss_tokens.unwrap_or(m);
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
        1.0 / denominator as f64,
        CrossEntropyDims { m, v },
    );
    let row_losses = be.download_f64(&losses);
    let loss = row_losses.iter().sum::<f64>() / denominator as f64;
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

/// The registration point of the families: what is family-specific before a model is loaded
/// (or without one: an export names its base model), one arm per family.
impl Architecture {
    /// The family of built-in shape `name`; `None` when it is no built-in shape.
    pub fn of_shape(name: &str) -> Option<Self> {
        if shapes::T5_SHAPES.contains(&name) {
            Some(Architecture::T5)
        } else if shapes::LLAMA_SHAPES.contains(&name) {
            Some(Architecture::Llama)
        } else {
            None
        }
    }

    /// The short name export.json and the prompt's metadata store: "t5", "llama".
    pub fn name(self) -> &'static str {
        match self {
            Architecture::T5 => "t5",
            Architecture::Llama => "llama",
        }
    }

    /// PEFT's `TaskType` for this family.
    pub fn peft_task_type(self) -> &'static str {
        match self {
            Architecture::T5 => "SEQ_2_SEQ_LM",
            Architecture::Llama => "CAUSAL_LM",
        }
    }

    /// Where the prompt rows go, in words (export.json's `where`).
    pub fn prompt_place(self) -> &'static str {
        match self {
            Architecture::T5 => "encoder input",
            Architecture::Llama => "decoder input, before every token",
        }
    }

    /// The sizes of model `base` as this family's config names them: the config.json in folder
    /// `base`, else the built-in shape `base`; `None` when it is neither (a hub id).
    pub fn base_dims(self, base: &str) -> Result<Option<BaseDims>> {
        let config = Path::new(base).join("config.json");
        Ok(match self {
            Architecture::T5 => {
                let cfg = if config.is_file() {
                    T5Config::from_file(&config)?
                } else if let Ok(cfg) = shapes::t5_shape(base) {
                    cfg
                } else {
                    return Ok(None);
                };
                Some(BaseDims {
                    width: cfg.d_model,
                    layers: cfg.num_layers,
                    heads: cfg.num_heads,
                    width_key: "d_model",
                })
            }
            Architecture::Llama => {
                let cfg = if config.is_file() {
                    LlamaConfig::from_file(&config)?
                } else if let Ok(cfg) = shapes::llama_shape(base) {
                    cfg
                } else {
                    return Ok(None);
                };
                Some(BaseDims {
                    width: cfg.hidden_size,
                    layers: cfg.num_hidden_layers,
                    heads: cfg.num_attention_heads,
                    width_key: "hidden_size",
                })
            }
        })
    }

    /// The model of Hugging Face folder `dir`.
    fn load<B: Backend + 'static>(self, be: &B, dir: &Path, quant: Quant) -> Result<Backbone<B>> {
        Ok(match self {
            Architecture::T5 => Backbone::new(load_t5(be, dir, quant)?),
            Architecture::Llama => Backbone::new(load_llama(be, dir, quant)?),
        })
    }

    /// Built-in shape `shape` with random weights from `seed`, each value passed through `map`.
    fn random<B: Backend + 'static>(
        self,
        be: &B,
        shape: &str,
        seed: u64,
        quant: Quant,
        map: Option<&dyn Fn(f32) -> f32>,
    ) -> Result<Backbone<B>> {
        Ok(match self {
            Architecture::T5 => Backbone::new(random_t5_mapped(be, shape, seed, quant, map)?),
            Architecture::Llama => Backbone::new(random_llama_mapped(be, shape, seed, quant, map)?),
        })
    }

    /// The Hugging Face config.json of built-in shape `shape`.
    fn shape_hf_json(self, shape: &str) -> Result<serde_json::Value> {
        Ok(match self {
            Architecture::T5 => shapes::t5_shape(shape)?.to_hf_json(),
            Architecture::Llama => shapes::llama_shape(shape)?.to_hf_json(),
        })
    }
}

/// A base model's sizes, as an export's PEFT adapter_config names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BaseDims {
    /// Model width (C).
    pub width: usize,
    pub layers: usize,
    pub heads: usize,
    /// The config key of the width (its errors name it).
    pub width_key: &'static str,
}

/// Loads whichever model a Hugging Face folder holds, by the `model_type` of its config.json.
pub fn load_model<B: Backend + 'static>(be: &B, dir: &Path, quant: Quant) -> Result<Backbone<B>> {
    Architecture::of_config(&dir.join("config.json"))?.load(be, dir, quant)
}

/// A built-in shape of any family, with random weights from `seed`.
pub fn random_model<B: Backend + 'static>(
    be: &B,
    shape: &str,
    seed: u64,
    quant: Quant,
) -> Result<Backbone<B>> {
    shape_architecture(shape).random(be, shape, seed, quant, None)
}

/// [`random_model`] with every weight value passed through `round` (the GPU checks round them to
/// the device's storage type, so that the GPU and the CPU reference hold identical weights).
pub fn random_model_rounded<B: Backend + 'static>(
    be: &B,
    shape: &str,
    seed: u64,
    quant: Quant,
    round: &dyn Fn(f32) -> f32,
) -> Result<Backbone<B>> {
    shape_architecture(shape).random(be, shape, seed, quant, Some(round))
}

/// The Hugging Face config.json of a built-in shape (`fastpt shape`).
pub fn shape_hf_json(shape: &str) -> Result<serde_json::Value> {
    shape_architecture(shape).shape_hf_json(shape)
}

/// The family of a built-in shape; an unknown name goes to T5, whose error lists the shapes.
fn shape_architecture(shape: &str) -> Architecture {
    Architecture::of_shape(shape).unwrap_or(Architecture::T5)
}
