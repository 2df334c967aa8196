//! One forward + backward of a host batch on a backend, with or without a prompt method:
//! method rows and update → embed + prepend → the backbone's forward → loss → backward (input
//! gradient) → split into d rows / d update → method backward (parameter gradients, `+=`).
//! The backbone is any [`Family`] (T5, Llama): the engine never asks which.
//! Used by `fastpt run`, `fastpt forward` and the benches; the trainer builds on it.

use std::time::{Duration, Instant};

use crate::backend::collective::Collective;
use crate::backend::profiling::nvtx_range;
use crate::backend::{Backend, EmbedPromptDims};
use crate::error::{Error, Result};
use crate::model::batch::{EncoderInput, HostBatch};
use crate::model::generate::{GenerateConfig, Generated};
use crate::model::llama::Llama;
use crate::model::t5::T5;
use crate::model::{Backbone, Family, StepBatch};
use crate::prompt::{build_method, MethodConfig, MethodContext, PromptMethod, Tokenize};

/// The results of one step, downloaded to the host by [`forward_backward`] (the training loop
/// calls [`train_step`], which downloads only the loss).
pub struct StepOutput {
    pub loss: f64,
    pub logits: Vec<f32>, // (M, V) label rows only
    /// Flat decoder positions `b·Td + t` (T5), or flat positions `b·(P+T) + t` of the rows that
    /// predict a label (Llama).
    pub label_rows: Vec<usize>, // (M)
    /// The cross-entropy of each label row.
    pub label_losses: Vec<f64>, // (M)
    /// Prompt rows prepended to the text rows.
    pub prompt_rows: usize,
    pub inputs_embeds: Vec<f32>, // (B, P+T, C)
    /// The T5 encoder output; empty for a decoder-only model.
    pub encoder_out: Vec<f32>, // (B, P+T, C)
    pub d_inputs_embeds: Vec<f32>, // (B, P+T, C)
    pub forward_time: Duration,
    pub backward_time: Duration,
}

impl StepOutput {
    /// An error when the loss or the input gradient is NaN or infinite, naming which, how many
    /// label rows are affected, and `source` (the model and batch the step ran on): a NaN must
    /// never leave `fastpt forward` or `step` as a number printed with exit 0.
    pub fn check_finite(&self, source: &str) -> Result<()> {
        let hint = "a weight or input holds NaN or inf, or an activation overflowed";
        if !self.loss.is_finite() {
            let bad = self.label_losses.iter().filter(|l| !l.is_finite()).count();
            return Err(Error::NonFinite {
                what: format!(
                    "the loss of {source} ({bad} of {} label rows non-finite)",
                    self.label_losses.len()
                ),
                value: self.loss,
                hint: hint.into(),
            });
        }
        let norm = self.grad_norm();
        if !norm.is_finite() {
            let bad = self
                .d_inputs_embeds
                .iter()
                .filter(|g| !g.is_finite())
                .count();
            return Err(Error::NonFinite {
                what: format!(
                    "the gradient norm ‖d loss / d inputs_embeds‖ of {source} ({bad} of {} \
                     elements non-finite)",
                    self.d_inputs_embeds.len()
                ),
                value: norm,
                hint: hint.into(),
            });
        }
        Ok(())
    }

    /// ‖d loss / d inputs_embeds‖₂.
    pub fn grad_norm(&self) -> f64 {
        self.d_inputs_embeds
            .iter()
            .map(|&g| (g as f64) * (g as f64))
            .sum::<f64>()
            .sqrt()
    }
}

/// Runs one step. With a method, its parameter gradients are added to (`+=`); the batch must
/// then hold token ids, at most `method.update_rows()` long when the method updates them.
pub fn t5_forward_backward<'m, B: Backend>(
    be: &B,
    model: &T5<B>,
    // Two lifetimes: the borrow is short, the method itself may live longer (a Box).
    method: Option<&mut (dyn PromptMethod<B> + 'm)>,
    batch: &HostBatch,
) -> Result<StepOutput> {
    step(be, model, method, batch, Pass::Download, None)
}

/// What [`step`] runs and hands back.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Pass {
    /// Forward only; the loss.
    Forward,
    /// Forward and backward; the loss (the training loop: no tensor leaves the device).
    Train,
    /// Forward and backward; the loss, logits, inputs_embeds, encoder output and input gradient
    /// downloaded to the host (`fastpt step`, parity checks).
    Download,
}

/// One training step's forward and backward (the method's gradients are added to), returning
/// only the loss: nothing else is copied to the host, so a GPU step stays on the device.
pub fn train_step<'m, B: Backend>(
    be: &B,
    model: &Backbone<B>,
    method: Option<&mut (dyn PromptMethod<B> + 'm)>,
    batch: &HostBatch,
) -> Result<f64> {
    Ok(step(be, &**model, method, batch, Pass::Train, None)?.loss)
}

/// [`train_step`] on a data-parallel rank's share of a larger batch: the loss and the gradients
/// it adds are sums over this share's label tokens divided by `loss_tokens`, the whole batch's
/// count, so the ranks' results add up to what one process computes on the whole batch.
pub fn train_step_share<'m, B: Backend>(
    be: &B,
    model: &Backbone<B>,
    method: Option<&mut (dyn PromptMethod<B> + 'm)>,
    batch: &HostBatch,
    loss_tokens: usize,
) -> Result<f64> {
    Ok(step(be, &**model, method, batch, Pass::Train, Some(loss_tokens))?.loss)
}

/// Sums the method's gradients across `ranks` in one call: a flat f64 buffer of every
/// parameter's gradient, then `extra` (scalars that ride along: a step's loss, stop flags),
/// summed in place on every rank. A data-parallel step's one collective.
pub fn all_reduce_grads<B: Backend>(
    be: &B,
    method: &mut (dyn PromptMethod<B> + '_),
    ranks: &dyn Collective,
    extra: &mut [f64],
) -> Result<()> {
    let mut flat: Vec<f64> = Vec::new(); // (Σ numel + extra)
    for p in method.params() {
        flat.extend(be.download_f64(&p.grad));
    }
    flat.extend_from_slice(extra);
    ranks.all_reduce_sum_f64(&mut flat)?;
    let mut at = 0;
    for p in method.params_mut() {
        let n = p.numel();
        p.grad = be.upload_f64(&flat[at..at + n]);
        at += n;
    }
    extra.copy_from_slice(&flat[at..]);
    Ok(())
}

/// The loss of a batch on any backbone, forward only (no gradient is computed or added).
pub fn forward_loss<'m, B: Backend>(
    be: &B,
    model: &Backbone<B>,
    method: Option<&mut (dyn PromptMethod<B> + 'm)>,
    batch: &HostBatch,
) -> Result<f64> {
    Ok(step(be, &**model, method, batch, Pass::Forward, None)?.loss)
}

/// Each row's negative log-likelihood of its labels, `Σ_t −log p(label_t)` over the row's label
/// positions (0 for a row without labels), forward only: the score of rank classification.
pub fn label_nll<'m, B: Backend>(
    be: &B,
    model: &Backbone<B>,
    method: Option<&mut (dyn PromptMethod<B> + 'm)>,
    batch: &HostBatch,
) -> Result<Vec<f64>> {
    let out = step(be, &**model, method, batch, Pass::Forward, None)?;
    // Label rows are flat positions of (B, width) grids: the decoder (T5), prompt + input (Llama).
    let width = model.label_grid_width(batch, out.prompt_rows);
    let mut nll = vec![0.0; batch.batch]; // (B)
    for (&row, &loss) in out.label_rows.iter().zip(&out.label_losses) {
        nll[row / width] += loss;
    }
    Ok(nll)
}

/// [`t5_forward_backward`] for Llama: the batch is decoder-only (labels `(B, T)` aligned with
/// the input, unshifted; see [`HostBatch`]), prompt rows go in front of every row.
pub fn llama_forward_backward<'m, B: Backend>(
    be: &B,
    model: &Llama<B>,
    method: Option<&mut (dyn PromptMethod<B> + 'm)>,
    batch: &HostBatch,
) -> Result<StepOutput> {
    step(be, model, method, batch, Pass::Download, None)
}

/// One step of any backbone, its results downloaded (see [`t5_forward_backward`]).
pub fn forward_backward<'m, B: Backend>(
    be: &B,
    model: &Backbone<B>,
    method: Option<&mut (dyn PromptMethod<B> + 'm)>,
    batch: &HostBatch,
) -> Result<StepOutput> {
    step(be, &**model, method, batch, Pass::Download, None)
}

/// The input embeddings of a batch `(B, P+T, C)` with the method's prompt rows in front (and its
/// update of the text rows), and the attention mask `(B, P+T)` with the prompt rows visible.
fn encoder_inputs<'m, B: Backend>(
    be: &B,
    model: &dyn Family<B>,
    mut method: Option<&mut (dyn PromptMethod<B> + 'm)>,
    batch: &HostBatch,
) -> Result<(B::Tensor, Vec<i32>)> {
    let (table, v, c) = (model.embeddings(), model.vocab_size(), model.width());
    let (b, t) = (batch.batch, batch.enc_len);
    let p = method.as_ref().map_or(0, |m| m.prompt_rows());
    let _range = nvtx_range("embed (method forward + prompt rows)");
    let inputs_embeds = match &batch.input {
        EncoderInput::Ids(ids) => {
            if let Some(&bad) = ids.iter().find(|&&x| x < 0 || x as usize >= v) {
                return Err(Error::Input(format!(
                    "input_ids: id {bad} is outside the vocabulary 0..{v}"
                )));
            }
            let mut x = be.zeros(b * (p + t) * c); // (B, P+T, C)
            let ids = be.upload_index(ids);
            match method.as_deref_mut() {
                Some(m) => {
                    m.forward(be);
                    if let Some(rows) = m.update_rows().filter(|&rows| rows < t) {
                        return Err(Error::Input(format!(
                            "the batch has {t} input positions, more than the method's maximum \
                             input length m = {rows}; truncate the inputs or raise max_len"
                        )));
                    }
                    let (rows, update) = (m.rows(), m.update());
                    be.embed_prompt_forward(
                        &mut x,
                        table,
                        &ids,
                        rows,
                        update,
                        EmbedPromptDims { b, t, p, c },
                    );
                }
                None => be.gather_rows(&mut x, table, &ids, b * t, c),
            }
            x
        }
        EncoderInput::Embeds(e) => {
            if method.is_some() {
                return Err(Error::Input(
                    "a prompt method needs input_ids, not inputs_embeds".into(),
                ));
            }
            be.upload_f32(e.clone())
        }
    };
    // Prompt rows are always attended to.
    let mask: Vec<i32> = batch
        .attention_mask
        .chunks(t)
        .flat_map(|row| std::iter::repeat_n(1, p).chain(row.iter().copied()))
        .collect();
    Ok((inputs_embeds, mask))
}

/// Greedy generation of up to `max_new_tokens` tokens per row after the batch's input (T5: from
/// the encoder input; Llama: after the whole row, so give it a batch of inputs only, left-padded
/// or of one length), with the method's prompt rows in front. The batch's labels are not read.
pub fn generate_greedy<'m, B: Backend>(
    be: &B,
    model: &Backbone<B>,
    method: Option<&mut (dyn PromptMethod<B> + 'm)>,
    batch: &HostBatch,
    gen: &GenerateConfig,
) -> Result<Generated> {
    let p = method.as_ref().map_or(0, |m| m.prompt_rows());
    let (embeds, mask) = encoder_inputs(be, &**model, method, batch)?;
    let len = p + batch.enc_len;
    model.generate(be, &embeds, &mask, batch.batch, len, gen)
}

/// Embedding (with the method's rows), the family's forward, and for `Train` / `Download` its
/// backward and the method's.
fn step<'m, B: Backend>(
    be: &B,
    model: &dyn Family<B>,
    mut method: Option<&mut (dyn PromptMethod<B> + 'm)>,
    batch: &HostBatch,
    pass: Pass,
    loss_tokens: Option<usize>,
) -> Result<StepOutput> {
    let c = model.width();
    let (b, t) = (batch.batch, batch.enc_len);
    let start = Instant::now();
    let p = method.as_ref().map_or(0, |m| m.prompt_rows());
    let (inputs_embeds, mask) = encoder_inputs(be, model, method.as_deref_mut(), batch)?;
    let forward_range = nvtx_range("forward");
    let step_batch = StepBatch {
        inputs_embeds: &inputs_embeds,
        attention_mask: &mask,
        prompt_rows: p,
        host: batch,
        loss_tokens,
    };
    let (out, saved) = model.forward_batch(be, &step_batch)?;
    drop(forward_range);
    let forward_time = start.elapsed();
    let start = Instant::now();
    let loss_only = |backward_time| StepOutput {
        loss: out.loss,
        logits: Vec::new(),
        label_rows: out.label_rows.clone(),
        label_losses: out.row_losses.clone(),
        prompt_rows: p,
        inputs_embeds: Vec::new(),
        encoder_out: Vec::new(),
        d_inputs_embeds: Vec::new(),
        forward_time,
        backward_time,
    };
    if pass == Pass::Forward {
        return Ok(loss_only(start.elapsed()));
    }
    let _backward_range = nvtx_range("backward");
    let dx = saved.backward_dinp(be); // (B, P+T, C)
    if let Some(m) = method {
        let mut d_rows = be.zeros(p * c); // (P, C)
        let mut d_update = m.update_rows().map(|rows| be.zeros(rows * c)); // (M, C)
        be.embed_prompt_backward(
            &mut d_rows,
            d_update.as_mut(),
            &dx,
            EmbedPromptDims { b, t, p, c },
        );
        m.backward(be, &d_rows, d_update.as_ref());
    }
    let backward_time = start.elapsed();
    if pass == Pass::Train {
        return Ok(loss_only(backward_time));
    }
    let encoder_out = saved
        .encoder_out()
        .map_or_else(Vec::new, |x| be.download_f32(x));
    Ok(StepOutput {
        loss: out.loss,
        logits: be.download_f32(&out.logits),
        label_rows: out.label_rows,
        label_losses: out.row_losses,
        prompt_rows: p,
        inputs_embeds: be.download_f32(&inputs_embeds),
        encoder_out,
        d_inputs_embeds: be.download_f32(&dx),
        forward_time,
        backward_time,
    })
}

/// Builds a prompt method for a T5 model: `vocab` and `text` inits read the model's frozen
/// embeddings (gathered on the backend, only the rows asked for), T5's special ids (pad, eos,
/// unk) are skipped by the `vocab` init, `max_len` is m.
pub fn build_t5_method<B: Backend + 'static>(
    be: &B,
    model: &T5<B>,
    cfg: &MethodConfig,
    max_len: usize,
    seed: u64,
    tokenize: Option<&Tokenize<'_>>,
) -> Result<Box<dyn PromptMethod<B>>> {
    build_with_embeddings(be, model, cfg, max_len, seed, tokenize)
}

/// [`build_t5_method`] for Llama; the `vocab` init skips ids 0–2 (unk, bos, eos in Llama 2
/// vocabularies).
pub fn build_llama_method<B: Backend + 'static>(
    be: &B,
    model: &Llama<B>,
    cfg: &MethodConfig,
    max_len: usize,
    seed: u64,
    tokenize: Option<&Tokenize<'_>>,
) -> Result<Box<dyn PromptMethod<B>>> {
    build_with_embeddings(be, model, cfg, max_len, seed, tokenize)
}

/// A prompt method for any backbone.
pub fn build_backbone_method<B: Backend + 'static>(
    be: &B,
    model: &Backbone<B>,
    cfg: &MethodConfig,
    max_len: usize,
    seed: u64,
    tokenize: Option<&Tokenize<'_>>,
) -> Result<Box<dyn PromptMethod<B>>> {
    build_with_embeddings(be, &**model, cfg, max_len, seed, tokenize)
}

fn build_with_embeddings<B: Backend + 'static>(
    be: &B,
    model: &dyn Family<B>,
    cfg: &MethodConfig,
    max_len: usize,
    seed: u64,
    tokenize: Option<&Tokenize<'_>>,
) -> Result<Box<dyn PromptMethod<B>>> {
    let (table, vocab_size, c) = (model.embeddings(), model.vocab_size(), model.width());
    let embed_rows = |ids: &[u32]| -> Result<Vec<f32>> {
        let ids: Vec<i32> = ids.iter().map(|&id| id as i32).collect();
        let mut rows = be.zeros(ids.len() * c); // (len, C)
        be.gather_rows(&mut rows, table, &be.upload_index(&ids), ids.len(), c);
        Ok(be.download_f32(&rows))
    };
    let ctx = MethodContext {
        d_model: c,
        max_len,
        vocab_size,
        // T5: pad, eos, unk; Llama 2: unk, bos, eos.
        first_regular_id: 3,
        seed,
        embed_rows: &embed_rows,
        tokenize,
    };
    build_method(be, cfg, &ctx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::model::linear::Quant;
    use crate::model::random_model;

    #[test]
    fn generate_greedy_is_the_models_generation_on_the_step_inputs() {
        let be = CpuBackend::<f32>::new();
        for shape in ["t5-tiny", "llama-tiny"] {
            let model = random_model(&be, shape, 3, Quant::None).unwrap();
            // T5: rows of two lengths; Llama generates after left padding only: rows of one
            // length.
            let batch = match model.is_decoder_only() {
                false => model.random_batch(&[6, 4], &[2, 2], 4),
                true => model.random_batch(&[6, 6], &[1, 1], 4),
            };
            let gen = GenerateConfig {
                max_new_tokens: 3,
                eos_token_ids: Vec::new(),
                keep_logits: false,
            };
            // Without a method: the model's own generate on the gathered embeddings.
            let got = generate_greedy(&be, &model, None, &batch, &gen).unwrap();
            let (embeds, mask) = encoder_inputs(&be, &*model, None, &batch).unwrap();
            let want = model
                .generate(&be, &embeds, &mask, 2, batch.enc_len, &gen)
                .unwrap();
            assert_eq!(got.tokens, want.tokens, "{shape}");
            assert!(got.tokens.iter().all(|row| row.len() == 3), "{shape}");
            // With PT: prompt rows in front change what is generated, never its length.
            let cfg = MethodConfig::from_toml("pt", "prompt_len = 4\ninit = \"uniform\"").unwrap();
            let mut pt = build_backbone_method(&be, &model, &cfg, 16, 5, None).unwrap();
            let with_pt = generate_greedy(&be, &model, Some(pt.as_mut()), &batch, &gen).unwrap();
            assert!(with_pt.tokens.iter().all(|row| row.len() == 3), "{shape}");
        }
    }
}
