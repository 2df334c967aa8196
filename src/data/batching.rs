//! Batches of examples: shuffled per epoch from the seed (so a position `(epoch, cursor)` is all
//! the data-order state a checkpoint needs), optionally grouped by length, truncated to the
//! maximum lengths, padded to the longest row of each batch (never to the maximum).

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::{Example, HostBatch};

/// Where the batcher is in the data: the epoch and the index of the next example in its order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Position {
    pub epoch: u64,
    pub cursor: u64,
}

pub struct Batcher<'a> {
    examples: &'a [Example],
    batch_size: usize,
    max_len: usize,
    max_target_len: usize,
    group_by_length: bool,
    seed: u64,
    pad: i32,
    eos: i32,
    decoder_start: i32,
    /// Decoder-only batches (Llama): input and target in one row, see [`HostBatch::causal_from_ids`].
    causal: bool,
}

/// Batches of similar length are formed inside windows of this many batches (then the batches
/// are shuffled), as transformers' length-grouped sampler does with its "megabatches".
const GROUP_WINDOW: usize = 50;

impl<'a> Batcher<'a> {
    pub fn new(
        examples: &'a [Example],
        batch_size: usize,
        max_len: usize,
        max_target_len: usize,
        group_by_length: bool,
        seed: u64,
        (pad, eos, decoder_start): (i32, i32, i32),
    ) -> Self {
        assert!(
            !examples.is_empty() && batch_size > 0,
            "Batcher: no examples or batch size 0"
        );
        Batcher {
            examples,
            batch_size,
            max_len,
            max_target_len,
            group_by_length,
            seed,
            pad,
            eos,
            decoder_start,
            causal: false,
        }
    }

    /// Batches for a decoder-only model: each row is its input followed by its target.
    pub fn causal(mut self, causal: bool) -> Self {
        self.causal = causal;
        self
    }

    /// The order of the examples in `epoch`: a seeded shuffle, grouped by input length in
    /// windows when asked.
    pub fn order(&self, epoch: u64) -> Vec<usize> {
        let mut rng =
            ChaCha8Rng::seed_from_u64(self.seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let mut order: Vec<usize> = (0..self.examples.len()).collect();
        order.shuffle(&mut rng);
        if self.group_by_length {
            let window = self.batch_size * GROUP_WINDOW;
            let mut batches: Vec<Vec<usize>> = Vec::new();
            for chunk in order.chunks(window) {
                let mut chunk = chunk.to_vec();
                chunk.sort_by_key(|&i| std::cmp::Reverse(self.examples[i].input.len()));
                batches.extend(chunk.chunks(self.batch_size).map(<[usize]>::to_vec));
            }
            batches.shuffle(&mut rng);
            order = batches.concat();
        }
        order
    }

    /// The batch at `pos` and the position after it. An epoch ends with a short batch when the
    /// example count is not a multiple of the batch size. Also returns how many rows were
    /// truncated (input or target longer than its maximum).
    pub fn next_batch(&self, pos: Position) -> (HostBatch, Position, usize) {
        let order = self.order(pos.epoch);
        let start = pos.cursor as usize;
        let end = (start + self.batch_size).min(order.len());
        let rows: Vec<&Example> = order[start..end]
            .iter()
            .map(|&i| &self.examples[i])
            .collect();
        let next = if end >= order.len() {
            Position {
                epoch: pos.epoch + 1,
                cursor: 0,
            }
        } else {
            Position {
                epoch: pos.epoch,
                cursor: end as u64,
            }
        };
        let (batch, truncated) = self.pad(&rows);
        (batch, next, truncated)
    }

    /// Truncates (keeping EOS last) and pads `rows` into a batch.
    pub fn pad(&self, rows: &[&Example]) -> (HostBatch, usize) {
        let cut = |seq: &[i32], max: usize| -> Vec<i32> {
            if seq.len() <= max {
                return seq.to_vec();
            }
            let mut s = seq[..max].to_vec();
            // Keep the sequence's end marker, as a tokenizer truncating with EOS does.
            if seq.last() == Some(&self.eos) {
                s[max - 1] = self.eos;
            }
            s
        };
        let inputs: Vec<Vec<i32>> = rows.iter().map(|e| cut(&e.input, self.max_len)).collect();
        let targets: Vec<Vec<i32>> = rows
            .iter()
            .map(|e| cut(&e.target, self.max_target_len))
            .collect();
        let truncated_rows = rows
            .iter()
            .filter(|e| e.input.len() > self.max_len || e.target.len() > self.max_target_len)
            .count();
        let batch = if self.causal {
            HostBatch::causal_from_ids(&inputs, &targets, self.pad)
        } else {
            HostBatch::from_ids(&inputs, &targets, self.pad, self.decoder_start)
        };
        (batch, truncated_rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::EncoderInput;

    fn examples() -> Vec<Example> {
        (0..10)
            .map(|i| Example {
                input: (0..(3 + i)).map(|x| 5 + x).chain([1]).collect(),
                target: vec![7 + i, 1],
            })
            .collect()
    }

    #[test]
    fn batches_pad_to_the_longest_row_and_cover_each_epoch_once() {
        let ex = examples();
        let b = Batcher::new(&ex, 4, 100, 100, false, 3, (0, 1, 0));
        let mut pos = Position::default();
        let mut seen = Vec::new();
        for _ in 0..3 {
            let (batch, next, truncated) = b.next_batch(pos);
            assert_eq!(truncated, 0);
            let EncoderInput::Ids(ids) = &batch.input else {
                panic!("ids")
            };
            let longest = (0..batch.batch)
                .map(|i| {
                    batch.attention_mask[i * batch.enc_len..(i + 1) * batch.enc_len]
                        .iter()
                        .sum::<i32>()
                })
                .max()
                .unwrap();
            assert_eq!(
                longest as usize, batch.enc_len,
                "padded to the longest row, not more"
            );
            for i in 0..batch.batch {
                seen.push(batch.labels[i * batch.dec_len]);
                assert_eq!(batch.decoder_input_ids[i * batch.dec_len], 0);
                assert_eq!(
                    batch.decoder_input_ids[i * batch.dec_len + 1],
                    batch.labels[i * batch.dec_len]
                );
            }
            assert_eq!(ids.len(), batch.batch * batch.enc_len);
            pos = next;
        }
        seen.sort();
        assert_eq!(
            seen,
            (7..17).collect::<Vec<i32>>(),
            "each example once per epoch"
        );
        assert_eq!(
            pos,
            Position {
                epoch: 1,
                cursor: 0
            }
        );
        assert_ne!(b.order(0), b.order(1), "reshuffled per epoch");
        assert_eq!(
            b.order(1),
            Batcher::new(&ex, 4, 100, 100, false, 3, (0, 1, 0)).order(1),
            "seeded"
        );
    }

    #[test]
    fn truncation_keeps_eos_and_is_counted() {
        let ex = examples();
        let b = Batcher::new(&ex, 10, 5, 100, false, 0, (0, 1, 0));
        let rows: Vec<&Example> = ex.iter().collect();
        let (batch, truncated) = b.pad(&rows);
        // inputs have 4..13 tokens: those above 5 are cut
        assert_eq!(truncated, 8);
        assert_eq!(batch.enc_len, 5);
        let EncoderInput::Ids(ids) = &batch.input else {
            panic!("ids")
        };
        assert_eq!(&ids[9 * 5..], &[5, 6, 7, 8, 1]);
    }

    #[test]
    fn causal_batches_hold_input_then_target_with_labels_on_the_target() {
        let ex = examples();
        let b = Batcher::new(&ex, 2, 100, 100, false, 0, (0, 1, 0)).causal(true);
        let (batch, _) = b.pad(&[&ex[0], &ex[1]]);
        // Row 0: input 5 6 7 1, target 7 1; row 1: input 5 6 7 8 1, target 8 1 (T = 7).
        assert_eq!((batch.enc_len, batch.dec_len), (7, 0));
        let EncoderInput::Ids(ids) = &batch.input else {
            panic!("ids")
        };
        assert_eq!(&ids[..7], &[5, 6, 7, 1, 7, 1, 0]);
        assert_eq!(&batch.labels[..7], &[-100, -100, -100, -100, 7, 1, -100]);
        assert_eq!(&batch.labels[7..], &[-100, -100, -100, -100, -100, 8, 1]);
        assert!(batch.decoder_input_ids.is_empty());
    }

    #[test]
    fn length_grouping_puts_similar_lengths_together() {
        let ex: Vec<Example> = (0..40)
            .map(|i| Example {
                input: vec![5; 2 + (i * 7) % 40],
                target: vec![1],
            })
            .collect();
        let grouped = Batcher::new(&ex, 8, 100, 100, true, 1, (0, 1, 0));
        let spread = |b: &Batcher| -> usize {
            b.order(0)
                .chunks(8)
                .map(|c| {
                    let lens: Vec<usize> = c.iter().map(|&i| ex[i].input.len()).collect();
                    lens.iter().max().unwrap() - lens.iter().min().unwrap()
                })
                .sum()
        };
        let plain = Batcher::new(&ex, 8, 100, 100, false, 1, (0, 1, 0));
        assert!(
            spread(&grouped) * 3 < spread(&plain),
            "{} vs {}",
            spread(&grouped),
            spread(&plain)
        );
    }
}
