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
    /// A reproducible batch of random token ids with rows of different lengths: `enc_lens[i]`
    /// encoder tokens and `dec_lens[i]` target tokens in row `i`, each ending in EOS.
    pub fn random(cfg: &T5Config, enc_lens: &[usize], dec_lens: &[usize], seed: u64) -> Self {
        assert_eq!(enc_lens.len(), dec_lens.len(), "one decoder length per row");
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        // Ids above the special tokens (pad 0, eos 1, unk 2 in T5 vocabularies).
        let first = 3.min(cfg.vocab_size as i32 - 1);
        let token = |rng: &mut ChaCha8Rng| rng.random_range(first..cfg.vocab_size as i32);
        let (b, t, td) = (
            enc_lens.len(),
            enc_lens.iter().copied().max().unwrap_or(0),
            dec_lens.iter().copied().max().unwrap_or(0),
        );
        let (pad, eos) = (cfg.pad_token_id as i32, cfg.eos_token_id as i32);
        let mut ids = vec![pad; b * t];
        let mut mask = vec![0; b * t];
        let mut labels = vec![-100; b * td];
        let mut dec = vec![pad; b * td];
        for i in 0..b {
            for j in 0..enc_lens[i] {
                ids[i * t + j] = if j + 1 == enc_lens[i] {
                    eos
                } else {
                    token(&mut rng)
                };
                mask[i * t + j] = 1;
            }
            for j in 0..dec_lens[i] {
                labels[i * td + j] = if j + 1 == dec_lens[i] {
                    eos
                } else {
                    token(&mut rng)
                };
            }
            // Teacher forcing: the decoder reads the start token, then the labels shifted right.
            dec[i * td] = cfg.decoder_start_token_id as i32;
            for j in 1..dec_lens[i] {
                dec[i * td + j] = labels[i * td + j - 1];
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
}
