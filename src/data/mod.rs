//! Batches on the host: padded token ids, masks and labels, before they reach a backend.

pub mod batch_json;
pub mod batching;
pub mod synthetic;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::model::config::T5Config;

/// One text-to-text example as token ids (EOS included).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    pub input: Vec<i32>,
    pub target: Vec<i32>,
}

/// The encoder input of a batch: token ids, or ready-made embeddings.
#[derive(Debug, Clone, PartialEq)]
pub enum EncoderInput {
    Ids(Vec<i32>),    // (B, T), padded with pad_token_id
    Embeds(Vec<f32>), // (B, T, C), padded with zeros
}

/// A padded batch: rows padded to the longest row of the batch, never to a fixed maximum.
#[derive(Debug, Clone, PartialEq)]
pub struct HostBatch {
    pub batch: usize,
    pub enc_len: usize,
    pub dec_len: usize,
    pub input: EncoderInput,
    pub attention_mask: Vec<i32>,    // (B, T) 1 real, 0 padding
    pub decoder_input_ids: Vec<i32>, // (B, Td)
    pub labels: Vec<i32>,            // (B, Td), -100 where no loss
}

impl HostBatch {
    /// Pads token-id rows into a batch: inputs with `pad` and mask 0, targets with label -100;
    /// the decoder reads `decoder_start` then the target shifted right (teacher forcing).
    pub fn from_ids(
        inputs: &[Vec<i32>],
        targets: &[Vec<i32>],
        pad: i32,
        decoder_start: i32,
    ) -> Self {
        assert_eq!(inputs.len(), targets.len(), "one target per input");
        let b = inputs.len();
        let t = inputs.iter().map(Vec::len).max().unwrap_or(0);
        let td = targets.iter().map(Vec::len).max().unwrap_or(0);
        let mut ids = vec![pad; b * t];
        let mut mask = vec![0; b * t];
        let mut labels = vec![-100; b * td];
        let mut dec = vec![pad; b * td];
        for i in 0..b {
            for (j, &x) in inputs[i].iter().enumerate() {
                ids[i * t + j] = x;
                mask[i * t + j] = 1;
            }
            for (j, &y) in targets[i].iter().enumerate() {
                labels[i * td + j] = y;
                dec[i * td + j] = if j == 0 {
                    decoder_start
                } else {
                    targets[i][j - 1]
                };
            }
        }
        HostBatch {
            batch: b,
            enc_len: t,
            dec_len: td,
            input: EncoderInput::Ids(ids),
            attention_mask: mask,
            decoder_input_ids: dec,
            labels,
        }
    }

    /// A reproducible batch of random token ids with rows of different lengths: `enc_lens[i]`
    /// encoder tokens and `dec_lens[i]` target tokens in row `i`, each ending in EOS.
    pub fn random(cfg: &T5Config, enc_lens: &[usize], dec_lens: &[usize], seed: u64) -> Self {
        assert_eq!(enc_lens.len(), dec_lens.len(), "one decoder length per row");
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        // Ids above the special tokens (pad 0, eos 1, unk 2 in T5 vocabularies).
        let first = 3.min(cfg.vocab_size as i32 - 1);
        let eos = cfg.eos_token_id as i32;
        let mut row = |len: usize| -> Vec<i32> {
            (0..len)
                .map(|j| {
                    if j + 1 == len {
                        eos
                    } else {
                        rng.random_range(first..cfg.vocab_size as i32)
                    }
                })
                .collect()
        };
        let (mut inputs, mut targets) = (Vec::new(), Vec::new());
        for (&n, &m) in enc_lens.iter().zip(dec_lens) {
            // Input then target, row by row: the order the random stream is drawn in.
            inputs.push(row(n));
            targets.push(row(m));
        }
        HostBatch::from_ids(
            &inputs,
            &targets,
            cfg.pad_token_id as i32,
            cfg.decoder_start_token_id as i32,
        )
    }
}
