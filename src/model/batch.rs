//! The batch a backbone takes, on the host: padded token ids (or embeddings), masks and labels,
//! in the layout of either kind of model, and the sizes a batch is checked against. data/ builds
//! batches from text; the engine and the model families read them.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::config::{LlamaConfig, T5Config};

/// The encoder input of a batch: token ids, or ready-made embeddings.
#[derive(Debug, Clone, PartialEq)]
pub enum EncoderInput {
    Ids(Vec<i32>),    // (B, T), padded with pad_token_id
    Embeds(Vec<f32>), // (B, T, C), padded with zeros
}

/// A padded batch: rows padded to the longest row of the batch, never to a fixed maximum.
///
/// Encoder-decoder (T5): `input` feeds the encoder, `decoder_input_ids` and `labels` are
/// `(B, Td)`. Decoder-only (Llama): `input` is the whole sequence, `dec_len` is 0, there are no
/// decoder ids, and `labels` are `(B, T)` aligned with the input, unshifted as in Hugging Face
/// (`labels[t]` is predicted by position `t − 1`).
#[derive(Debug, Clone, PartialEq)]
pub struct HostBatch {
    pub batch: usize,
    pub enc_len: usize,
    pub dec_len: usize,
    pub input: EncoderInput,
    pub attention_mask: Vec<i32>,    // (B, T) 1 real, 0 padding
    pub decoder_input_ids: Vec<i32>, // (B, Td); empty for decoder-only
    pub labels: Vec<i32>,            // (B, Td), or (B, T) for decoder-only; -100 where no loss
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

    /// A decoder-only batch: each row is its input then its target, right-padded with `pad`;
    /// labels are the target ids on the target positions (unshifted), -100 elsewhere.
    pub fn causal_from_ids(inputs: &[Vec<i32>], targets: &[Vec<i32>], pad: i32) -> Self {
        assert_eq!(inputs.len(), targets.len(), "one target per input");
        let b = inputs.len();
        let t = inputs
            .iter()
            .zip(targets)
            .map(|(i, o)| i.len() + o.len())
            .max()
            .unwrap_or(0);
        let mut ids = vec![pad; b * t];
        let mut mask = vec![0; b * t];
        let mut labels = vec![-100; b * t];
        for (r, (input, target)) in inputs.iter().zip(targets).enumerate() {
            for (j, &x) in input.iter().chain(target).enumerate() {
                ids[r * t + j] = x;
                mask[r * t + j] = 1;
                if j >= input.len() {
                    labels[r * t + j] = x;
                }
            }
        }
        HostBatch {
            batch: b,
            enc_len: t,
            dec_len: 0,
            input: EncoderInput::Ids(ids),
            attention_mask: mask,
            decoder_input_ids: Vec::new(),
            labels,
        }
    }

    /// The rows `rows` of this batch (a rank's share of a data-parallel batch), padded to
    /// their own longest row: trailing columns that are padding in every chosen row are cut
    /// (encoder positions with mask 0; T5 decoder positions without a label), which changes
    /// no result. Every index must be below `self.batch`; no rows give an empty batch.
    pub fn select_rows(&self, rows: &[usize]) -> HostBatch {
        let (t, td) = (self.enc_len, self.dec_len);
        let t_new = (0..t)
            .rev()
            .find(|&j| rows.iter().any(|&r| self.attention_mask[r * t + j] != 0))
            .map_or(0, |j| j + 1);
        let td_new = (0..td)
            .rev()
            .find(|&j| rows.iter().any(|&r| self.labels[r * td + j] != -100))
            .map_or(0, |j| j + 1);
        // The first `keep` of each chosen row's `width` values.
        fn pick<T: Copy>(v: &[T], rows: &[usize], width: usize, keep: usize) -> Vec<T> {
            rows.iter()
                .flat_map(|&r| v[r * width..r * width + keep].iter().copied())
                .collect()
        }
        let input = match &self.input {
            EncoderInput::Ids(ids) => EncoderInput::Ids(pick(ids, rows, t, t_new)),
            EncoderInput::Embeds(x) => {
                let c = x.len() / (self.batch * t).max(1);
                EncoderInput::Embeds(pick(x, rows, t * c, t_new * c))
            }
        };
        // Decoder-only labels are aligned with the input (B, T).
        let (label_width, label_keep) = match td {
            0 => (t, t_new),
            _ => (td, td_new),
        };
        HostBatch {
            batch: rows.len(),
            enc_len: t_new,
            dec_len: if td == 0 { 0 } else { td_new },
            input,
            attention_mask: pick(&self.attention_mask, rows, t, t_new),
            decoder_input_ids: match td {
                0 => Vec::new(),
                _ => pick(&self.decoder_input_ids, rows, td, td_new),
            },
            labels: pick(&self.labels, rows, label_width, label_keep),
        }
    }

    /// A reproducible decoder-only batch of random ids for a Llama config: row `i` is BOS,
    /// `input_lens[i] − 1` random ids, then `target_lens[i]` random ids ending in EOS.
    pub fn random_causal(
        cfg: &LlamaConfig,
        input_lens: &[usize],
        target_lens: &[usize],
        seed: u64,
    ) -> Self {
        assert_eq!(
            input_lens.len(),
            target_lens.len(),
            "one target length per row"
        );
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let v = cfg.vocab_size as i32;
        let first = 3.min(v - 1);
        let (bos, eos) = (cfg.bos_token_id as i32, cfg.eos_token_ids[0] as i32);
        let mut inputs = Vec::new();
        let mut targets = Vec::new();
        for (&n, &m) in input_lens.iter().zip(target_lens) {
            let mut input = vec![bos];
            input.extend((1..n).map(|_| rng.random_range(first..v)));
            let mut target: Vec<i32> = (1..m).map(|_| rng.random_range(first..v)).collect();
            target.push(eos);
            inputs.push(input);
            targets.push(target);
        }
        HostBatch::causal_from_ids(&inputs, &targets, cfg.pad_id() as i32)
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

/// What a batch is checked and padded against: the model's sizes and special ids.
#[derive(Debug, Clone, Copy)]
pub struct BatchSpec {
    pub vocab_size: usize,
    /// Width of an embedding row (C).
    pub d_model: usize,
    pub pad_token_id: u32,
    /// The decoder's first input (encoder-decoder models); `None` for a decoder-only model.
    pub decoder_start_token_id: Option<u32>,
}

impl From<&T5Config> for BatchSpec {
    fn from(cfg: &T5Config) -> Self {
        BatchSpec {
            vocab_size: cfg.vocab_size,
            d_model: cfg.d_model,
            pad_token_id: cfg.pad_token_id,
            decoder_start_token_id: Some(cfg.decoder_start_token_id),
        }
    }
}

impl From<&LlamaConfig> for BatchSpec {
    fn from(cfg: &LlamaConfig) -> Self {
        BatchSpec {
            vocab_size: cfg.vocab_size,
            d_model: cfg.hidden_size,
            pad_token_id: cfg.pad_id(),
            decoder_start_token_id: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn select_rows_keeps_the_rows_and_cuts_shared_padding() {
        // T5: rows of 1, 3 and 2 encoder tokens, 2, 1 and 3 target tokens.
        let inputs = [vec![5], vec![6, 7, 8], vec![9, 10]];
        let targets = [vec![11, 1], vec![12], vec![13, 14, 1]];
        let b = HostBatch::from_ids(&inputs, &targets, 0, 0);
        let s = b.select_rows(&[0, 2]);
        let want = HostBatch::from_ids(
            &[inputs[0].clone(), inputs[2].clone()],
            &[targets[0].clone(), targets[2].clone()],
            0,
            0,
        );
        assert_eq!(s, want);
        // Rows 0 alone: one encoder position, two decoder positions.
        assert_eq!(
            b.select_rows(&[0]),
            HostBatch::from_ids(&[vec![5]], &[vec![11, 1]], 0, 0)
        );
        // Llama: input then target in one row.
        let c = HostBatch::causal_from_ids(&inputs, &targets, 0);
        let want = HostBatch::causal_from_ids(&[inputs[1].clone()], &[targets[1].clone()], 0);
        assert_eq!(c.select_rows(&[1]), want);
        assert_eq!(c.select_rows(&[]).batch, 0);
    }

    #[test]
    fn causal_batches_concatenate_input_and_target_with_unshifted_labels() {
        let b = HostBatch::causal_from_ids(&[vec![1, 5, 6], vec![1]], &[vec![7, 2], vec![9, 2]], 0);
        assert_eq!((b.batch, b.enc_len, b.dec_len), (2, 5, 0));
        assert_eq!(
            b.input,
            EncoderInput::Ids(vec![1, 5, 6, 7, 2, 1, 9, 2, 0, 0])
        );
        assert_eq!(b.attention_mask, vec![1, 1, 1, 1, 1, 1, 1, 1, 0, 0]);
        assert_eq!(
            b.labels,
            vec![-100, -100, -100, 7, 2, -100, 9, 2, -100, -100]
        );
    }

    #[test]
    fn random_causal_rows_start_with_bos_and_end_with_eos() {
        let cfg = crate::model::shapes::llama_shape("llama-tiny").unwrap();
        let b = HostBatch::random_causal(&cfg, &[4, 2], &[3, 1], 9);
        let EncoderInput::Ids(ids) = &b.input else {
            panic!("ids expected")
        };
        assert_eq!(b.enc_len, 7);
        assert_eq!((ids[0], ids[6]), (1, 2));
        assert_eq!((ids[7], ids[9]), (1, 2));
        assert_eq!(b.labels.iter().filter(|&&x| x != -100).count(), 4);
        assert_eq!(b, HostBatch::random_causal(&cfg, &[4, 2], &[3, 1], 9));
    }
}
