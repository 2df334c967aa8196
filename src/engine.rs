//! One forward + backward of a host batch on a backend: embed the ids, run the model, return the
//! loss, the label-row logits and d loss / d inputs_embeds. Used by `fastpt run`, `fastpt forward`
//! and the benches; the trainer builds on it.

use std::time::{Duration, Instant};

use crate::backend::Backend;
use crate::data::{EncoderInput, HostBatch};
use crate::error::{Error, Result};
use crate::model::t5::{T5Batch, T5};

/// The results of one step, downloaded to the host.
pub struct StepOutput {
    pub loss: f64,
    pub logits: Vec<f32>,          // (M, V) label rows only
    pub label_rows: Vec<usize>,    // (M) flat decoder positions b·Td + t
    pub inputs_embeds: Vec<f32>,   // (B, T, C)
    pub encoder_out: Vec<f32>,     // (B, T, C)
    pub d_inputs_embeds: Vec<f32>, // (B, T, C)
    pub forward_time: Duration,
    pub backward_time: Duration,
}

impl StepOutput {
    /// ‖d loss / d inputs_embeds‖₂.
    pub fn grad_norm(&self) -> f64 {
        self.d_inputs_embeds
            .iter()
            .map(|&g| (g as f64) * (g as f64))
            .sum::<f64>()
            .sqrt()
    }
}

/// Embeds the batch (gather from the shared table when it holds ids), runs forward and backward.
pub fn t5_forward_backward<B: Backend>(
    be: &B,
    model: &T5<B>,
    batch: &HostBatch,
) -> Result<StepOutput> {
    let (b, t, c) = (batch.batch, batch.enc_len, model.cfg.d_model);
    let start = Instant::now();
    let inputs_embeds = match &batch.input {
        EncoderInput::Ids(ids) => {
            let v = model.cfg.vocab_size;
            if let Some(&bad) = ids.iter().find(|&&x| x < 0 || x as usize >= v) {
                return Err(Error::Input(format!(
                    "input_ids: id {bad} is outside the vocabulary 0..{v}"
                )));
            }
            let mut x = be.zeros(b * t * c); // (B, T, C)
            be.gather_rows(
                &mut x,
                &model.weights.shared,
                &be.upload_index(ids),
                b * t,
                c,
            );
            x
        }
        EncoderInput::Embeds(e) => be.upload_f32(e.clone()),
    };
    let t5_batch = T5Batch::<B> {
        inputs_embeds: &inputs_embeds,
        attention_mask: &batch.attention_mask,
        decoder_input_ids: &batch.decoder_input_ids,
        labels: &batch.labels,
        batch: b,
        enc_len: t,
        dec_len: batch.dec_len,
    };
    let (out, saved) = model.forward(be, &t5_batch)?;
    let forward_time = start.elapsed();
    let start = Instant::now();
    let dx = model.backward_dinp(be, &saved);
    let backward_time = start.elapsed();
    Ok(StepOutput {
        loss: out.loss,
        logits: be.download_f32(&out.logits),
        label_rows: out.label_rows,
        inputs_embeds: be.download_f32(&inputs_embeds),
        encoder_out: be.download_f32(saved.encoder_out()),
        d_inputs_embeds: be.download_f32(&dx),
        forward_time,
        backward_time,
    })
}
