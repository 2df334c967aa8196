//! Prompt methods: each builds, per step, the prompt rows prepended to the backbone's input (the
//! T5 encoder's, or Llama's whole row) and optionally an update of the text embeddings, and
//! backpropagates their gradients into its own small parameters. One file per method; the
//! equations, shapes, inits and parameter counts they match are in ../shared/methods.md.
//!
//! A step with a method (see `engine`'s `step`):
//! `method.forward(be)` → `embed_prompt_forward(rows, update)` → backbone forward/backward →
//! `embed_prompt_backward` → `method.backward(be, d_rows, d_update)` → parameter grads (`+=`).

pub mod config;
pub mod init;
pub mod table;
#[cfg(test)]
pub(crate) mod testing;

pub mod dept;
pub mod dpt;
pub mod ept;
pub mod lamp;
pub mod pt;
pub mod ptuning;
pub mod residual;
pub mod xpt;

use std::path::Path;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::hf::{read_all_f64, save_safetensors, TensorData};
pub use config::{MethodConfig, ParamCounts, METHOD_NAMES};

/// The learning-rate group of a parameter (DePT and EPT-MS train their low-rank pair with a
/// smaller learning rate than the prompt).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamGroup {
    /// Prompt rows and the networks around them (MLPs, experts, gate).
    Prompt,
    /// The low-rank update pair A, B of DePT and EPT-MS.
    LowRank,
}

/// One trainable tensor of a method, with its gradient.
pub struct Param<B: Backend> {
    /// Name in saved files, e.g. `prompt`, `expert.0.down.weight`.
    pub name: String,
    pub shape: Vec<usize>,
    pub group: ParamGroup,
    pub value: B::Tensor, // (shape)
    /// Accumulated by `backward` (`+=`); cleared by [`zero_grads`].
    pub grad: B::Tensor, // (shape)
}

impl<B: Backend> Param<B> {
    /// A parameter with initial values `data` (row-major, `shape`) and a zero gradient.
    pub fn new(be: &B, name: &str, shape: &[usize], group: ParamGroup, data: Vec<f32>) -> Self {
        let len: usize = shape.iter().product();
        assert_eq!(
            data.len(),
            len,
            "Param::new: {name} has {} values, not {len}",
            data.len()
        );
        Param {
            name: name.to_string(),
            shape: shape.to_vec(),
            group,
            value: be.upload_f32(data),
            grad: be.zeros(len),
        }
    }

    /// Like [`Param::new`] with f64 initial values, so that values computed in f64 (the SVD
    /// factors of EPT-MS and LAMP) keep their precision on an f64 backend.
    pub fn from_f64(be: &B, name: &str, shape: &[usize], group: ParamGroup, data: &[f64]) -> Self {
        let len: usize = shape.iter().product();
        assert_eq!(
            data.len(),
            len,
            "Param::from_f64: {name} has {} values, not {len}",
            data.len()
        );
        Param {
            name: name.to_string(),
            shape: shape.to_vec(),
            group,
            value: be.upload_f64(data),
            grad: be.zeros(len),
        }
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Token ids of a text, from the model's tokenizer.
pub type Tokenize<'a> = dyn Fn(&str) -> Result<Vec<u32>> + 'a;

/// The frozen embeddings of some ids, `(len, d)` row-major.
pub type EmbedRows<'a> = dyn Fn(&[u32]) -> Result<Vec<f32>> + 'a;

/// What a method needs to know about the backbone when it is built.
pub struct MethodContext<'a> {
    /// Model width d (C).
    pub d_model: usize,
    /// Maximum input length m (the length of DePT's / EPT's update).
    pub max_len: usize,
    pub vocab_size: usize,
    /// The first id that is not a special token (3 for T5: pad, eos, unk).
    pub first_regular_id: u32,
    pub seed: u64,
    /// The frozen embeddings of some ids, `(len, d)` row-major (for `vocab` and `text` inits).
    pub embed_rows: &'a EmbedRows<'a>,
    /// The model's tokenizer, when there is one (for `text` init).
    pub tokenize: Option<&'a Tokenize<'a>>,
}

/// A prompt method over backend `B`.
pub trait PromptMethod<B: Backend> {
    fn name(&self) -> &'static str;

    /// Number of prompt rows P.
    fn prompt_rows(&self) -> usize;

    /// Rows M of the text-embedding update, for methods that have one (DePT, EPT-MS).
    fn update_rows(&self) -> Option<usize> {
        None
    }

    /// Computes the prompt rows (and update) from the parameters, saving what `backward` needs.
    fn forward(&mut self, be: &B);

    /// The prompt rows `(P, C)` of the last `forward`.
    fn rows(&self) -> &B::Tensor;

    /// The update `(M, C)` of the text embeddings of the last `forward`, added to text row t.
    fn update(&self) -> Option<&B::Tensor> {
        None
    }

    /// Adds the gradients of the parameters, given `d_rows (P, C)` and `d_update (M, C)`.
    fn backward(&mut self, be: &B, d_rows: &B::Tensor, d_update: Option<&B::Tensor>);

    fn params(&self) -> &[Param<B>];

    fn params_mut(&mut self) -> &mut [Param<B>];

    /// Parameters inference needs once the reparameterisation is folded away.
    fn stored_params(&self) -> usize;
}

/// Everything the optimiser updates.
pub fn train_params<B: Backend>(method: &dyn PromptMethod<B>) -> usize {
    method.params().iter().map(Param::numel).sum()
}

/// Clears every parameter gradient.
pub fn zero_grads<B: Backend>(be: &B, method: &mut dyn PromptMethod<B>) {
    for p in method.params_mut() {
        be.fill_zero(&mut p.grad);
    }
}

/// Saves the parameters (f32) under their names.
pub fn save_params<B: Backend>(be: &B, method: &dyn PromptMethod<B>, path: &Path) -> Result<()> {
    let tensors: Vec<(String, Vec<usize>, TensorData)> = method
        .params()
        .iter()
        .map(|p| {
            let data = TensorData::F32(be.download_f32(&p.value));
            (p.name.clone(), p.shape.clone(), data)
        })
        .collect();
    save_safetensors(path, &tensors)
}

/// Loads parameters saved by [`save_params`] into a method built with the same options; every
/// parameter must be present with its shape.
pub fn load_params<B: Backend>(
    be: &B,
    method: &mut dyn PromptMethod<B>,
    path: &Path,
) -> Result<()> {
    let file = read_all_f64(path)?;
    let missing: Vec<String> = method
        .params()
        .iter()
        .filter(|p| !file.contains_key(&p.name))
        .map(|p| p.name.clone())
        .collect();
    if !missing.is_empty() {
        return Err(Error::MissingTensors {
            path: path.to_path_buf(),
            count: missing.len(),
            names: missing,
        });
    }
    for p in method.params_mut() {
        let (shape, data) = &file[&p.name];
        if shape != &p.shape {
            return Err(Error::Shape {
                path: path.to_path_buf(),
                name: p.name.clone(),
                expected: p.shape.clone(),
                found: shape.clone(),
            });
        }
        p.value = be.upload_f64(data);
    }
    Ok(())
}

/// Builds a method from its options, validated against the backbone first.
pub fn build_method<B: Backend + 'static>(
    be: &B,
    cfg: &MethodConfig,
    ctx: &MethodContext<'_>,
) -> Result<Box<dyn PromptMethod<B>>> {
    cfg.validate(ctx.d_model, ctx.max_len)?;
    Ok(match cfg {
        MethodConfig::Pt(c) => Box::new(pt::Pt::new(be, c, ctx)?),
        MethodConfig::PTuning(c) => Box::new(ptuning::PTuning::new(be, c, ctx)?),
        MethodConfig::Residual(c) => Box::new(residual::Residual::new(be, c, ctx)?),
        MethodConfig::Dpt(c) => Box::new(dpt::Dpt::new(be, c, ctx)?),
        MethodConfig::Dept(c) => Box::new(dept::Dept::new(be, c, ctx)?),
        MethodConfig::Ept(c) => Box::new(ept::Ept::new(be, c, ctx)?),
        MethodConfig::Lamp(c) => Box::new(lamp::Lamp::new(be, c, ctx)?),
        MethodConfig::Xpt(c) => Box::new(xpt::Xpt::new(be, c, ctx)?),
    })
}
