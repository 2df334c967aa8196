//! One interface for every backbone family. [`Family`] is all that the engine, the trainer, eval,
//! bench, export and the CLI know of a model: its token embeddings and special ids, whether it is
//! decoder-only, a forward that keeps its activations for the input-gradient backward
//! ([`Activations`]), greedy generation, random batches, its tensors and the FLOPs of a step.
//! [`Backbone`] is a loaded model of any family (a boxed `Family`); [`Architecture`] names a
//! family where there is no model (config.json's `model_type`, built-in shapes, an export).
//!
//! Adding a family (say, a decoder-only model with another attention): implement `Family` and
//! `Activations` for it in its own file, add its `Architecture` variant (config.rs reads its
//! `model_type`) and its arms in the `impl Architecture` of model/mod.rs, the one registration
//! point. Nothing outside model/ changes.

use std::ops::Deref;

use crate::backend::Backend;
use crate::error::Result;
use crate::model::batch::BatchSpec;
use crate::model::batch::HostBatch;
use crate::model::config::Architecture;
use crate::model::flops::StepTokens;
use crate::model::generate::{GenerateConfig, Generated};
use crate::model::ModelOutput;

/// The special token ids that batches and the text codec need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecialIds {
    pub pad: i32,
    pub eos: i32,
    /// Put in front of every input (decoder-only models); without it inputs end in EOS.
    pub bos: Option<i32>,
    /// The decoder's first input (encoder-decoder models); `None` for a decoder-only model.
    pub decoder_start: Option<i32>,
}

/// One step's batch as a family's forward takes it: the embedded input rows, the method's
/// prompt rows in front, and the host batch they were embedded from (its decoder ids and labels
/// are read; its ids are not).
pub struct StepBatch<'a, B: Backend> {
    pub inputs_embeds: &'a B::Tensor, // (B, P+T, C)
    /// 1 for real rows (prompt rows included), 0 for padding.
    pub attention_mask: &'a [i32], // (B, P+T)
    /// Prompt rows P in front of every row's T input positions.
    pub prompt_rows: usize,
    pub host: &'a HostBatch,
    /// The loss is a mean over this many label tokens: a data-parallel rank's share of a
    /// larger batch divides by the whole batch's count, so the ranks' gradients sum to one
    /// process's. `None`: this batch's own label tokens.
    pub loss_tokens: Option<usize>,
}

/// What one forward saved, with the model that saved it: its backward.
pub trait Activations<B: Backend> {
    /// d loss / d inputs_embeds `(B, P+T, C)`.
    fn backward_dinp(&self, be: &B) -> B::Tensor;
    /// The encoder output `(B, P+T, C)` of an encoder-decoder model; `None` for a decoder-only
    /// one.
    fn encoder_out(&self) -> Option<&B::Tensor>;
}

/// A family's saved activations `S` next to the model `M` they belong to (what each family's
/// [`Activations`] is implemented for).
pub(crate) struct Saved<'a, M, S> {
    pub(crate) model: &'a M,
    pub(crate) saved: S,
}

/// A backbone family: T5 (encoder-decoder) or Llama (decoder-only), on a backend.
pub trait Family<B: Backend> {
    fn architecture(&self) -> Architecture;

    /// The family and its sizes in one line, e.g. `T5, d_model 64, 2+2 layers, …, 1.23 M
    /// parameters`.
    fn describe(&self) -> String;

    /// Every weight tensor: (Hugging Face name, shape).
    fn tensor_specs(&self) -> Vec<(String, Vec<usize>)>;

    /// The frozen token embeddings.
    fn embeddings(&self) -> &B::Tensor; // (V, C)

    fn vocab_size(&self) -> usize;

    /// Model width d (C).
    fn width(&self) -> usize;

    fn special_ids(&self) -> SpecialIds;

    /// The ids a batcher pads with: `(pad, eos, decoder start)` (0 without a decoder).
    fn batch_ids(&self) -> (i32, i32, i32) {
        let ids = self.special_ids();
        (ids.pad, ids.eos, ids.decoder_start.unwrap_or(0))
    }

    /// Decoder-only: a batch row is input then target (see `HostBatch::causal_from_ids`), its
    /// labels `(B, T)` align with the input, and generation continues each row.
    fn is_decoder_only(&self) -> bool;

    /// The most positions a row may hold (prompt rows included); `None` without a limit (T5's
    /// relative positions).
    fn max_positions(&self) -> Option<usize>;

    /// What a JSON batch (`fastpt forward`) is checked and padded against.
    fn batch_spec(&self) -> BatchSpec;

    /// A reproducible batch of random ids in this family's layout: row `i` has `input_lens[i]`
    /// input and `target_lens[i]` target tokens.
    fn random_batch(&self, input_lens: &[usize], target_lens: &[usize], seed: u64) -> HostBatch;

    /// The width of the `(B, width)` grid whose flat positions [`ModelOutput::label_rows`] are,
    /// for `host` with `prompt_rows` in front.
    fn label_grid_width(&self, host: &HostBatch, prompt_rows: usize) -> usize;

    /// How many label rows the loss of `host` (with `prompt_rows` in front) averages over: the
    /// count a data-parallel rank divides its share by (see [`StepBatch::loss_tokens`]).
    fn label_count(&self, host: &HostBatch, prompt_rows: usize) -> usize;

    /// The forward of one step: loss and label-row logits, and what the backward needs.
    fn forward_batch<'a>(
        &'a self,
        be: &B,
        batch: &StepBatch<'_, B>,
    ) -> Result<(ModelOutput<B>, Box<dyn Activations<B> + 'a>)>;

    /// Greedy generation of up to `gen.max_new_tokens` tokens per row after `inputs_embeds
    /// (B, T, C)` with `attention_mask (B, T)` (a decoder-only model: left-padded rows).
    fn generate(
        &self,
        be: &B,
        inputs_embeds: &B::Tensor,
        attention_mask: &[i32],
        batch: usize,
        len: usize,
        gen: &GenerateConfig,
    ) -> Result<Generated>;

    /// The FLOPs of one training step on `x` (see [`crate::model::flops`]).
    fn train_step_flops(&self, x: StepTokens) -> f64;
}

/// A model of any family.
pub struct Backbone<B: Backend>(Box<dyn Family<B>>);

impl<B: Backend> Backbone<B> {
    pub fn new(model: impl Family<B> + 'static) -> Self {
        Backbone(Box::new(model))
    }
}

impl<B: Backend> Deref for Backbone<B> {
    type Target = dyn Family<B>;

    fn deref(&self) -> &Self::Target {
        self.0.as_ref()
    }
}

/// Millions of parameters in `specs`, for [`Family::describe`].
pub(crate) fn million_params(specs: &[(String, Vec<usize>)]) -> f64 {
    let n: usize = specs.iter().map(|(_, s)| s.iter().product::<usize>()).sum();
    n as f64 / 1e6
}
