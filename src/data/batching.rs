//! Batches of examples: shuffled per epoch from the seed (so a position `(epoch, cursor)` is all
//! the data-order state a checkpoint needs), optionally grouped by length, truncated to the
//! maximum lengths, padded to the longest row of each batch (never to the maximum).

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::{Example, HostBatch};
use crate::error::{Error, Result};

/// Where the batcher is in the data: the epoch and the index of the next example in its order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Position {
    pub epoch: u64,
    pub cursor: u64,
}

pub struct Batcher<'a> {
    examples: &'a [Example],
    /// Rows per batch: the requested size, at most the number of examples.
    batch_size: usize,
    /// The batch size asked for (larger than `batch_size` when there are fewer examples).
    requested: usize,
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
    /// A batcher over `examples` (at least one). A `batch_size` above the number of examples
    /// is reduced to it: each batch is then the whole epoch, the same batches the larger size
    /// gives, without anything sized by the larger number (see [`Self::reduced`]).
    pub fn new(
        examples: &'a [Example],
        batch_size: usize,
        max_len: usize,
        max_target_len: usize,
        group_by_length: bool,
        seed: u64,
        (pad, eos, decoder_start): (i32, i32, i32),
    ) -> Result<Self> {
        if examples.is_empty() {
            return Err(Error::Input("batching: there are no examples".into()));
        }
        if batch_size == 0 {
            return Err(Error::Input("batching: the batch size is 0".into()));
        }
        Ok(Batcher {
            examples,
            batch_size: batch_size.min(examples.len()),
            requested: batch_size,
            max_len,
            max_target_len,
            group_by_length,
            seed,
            pad,
            eos,
            decoder_start,
            causal: false,
        })
    }

    /// Rows per batch (at most the number of examples).
    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// `(requested, used)` when the batch size asked for was larger than the set and was
    /// reduced to its size.
    pub fn reduced(&self) -> Option<(usize, usize)> {
        (self.requested > self.batch_size).then_some((self.requested, self.batch_size))
    }

    /// A note for the user when the batch size was reduced, naming the setting `key`.
    pub fn reduced_note(&self, key: &str) -> Option<String> {
        self.reduced().map(|(requested, used)| {
            format!(
                "note: {key} = {requested} is larger than the {used} training examples: each \
                 batch holds all {used} (one batch per epoch)"
            )
        })
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
            let window = self.batch_size.saturating_mul(GROUP_WINDOW);
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
    /// truncated (input or target longer than its maximum). A cursor at or past the end of the
    /// data (a checkpoint of other data) is an error naming it and the data size.
    pub fn next_batch(&self, pos: Position) -> Result<(HostBatch, Position, usize)> {
        let n = self.examples.len();
        let start = usize::try_from(pos.cursor)
            .ok()
            .filter(|&c| c < n)
            .ok_or_else(|| {
                Error::Input(format!(
                    "data position: cursor {} (epoch {}) is past the end of the {n} training \
                     examples; the checkpoint was written for other data",
                    pos.cursor, pos.epoch
                ))
            })?;
        let order = self.order(pos.epoch);
        let end = start.saturating_add(self.batch_size).min(order.len());
        let rows: Vec<&Example> = order[start..end]
            .iter()
            .map(|&i| &self.examples[i])
            .collect();
        let next = if end >= order.len() {
            let epoch = pos.epoch.checked_add(1).ok_or_else(|| {
                Error::Input(format!("data position: epoch {} is the last", pos.epoch))
            })?;
            Position { epoch, cursor: 0 }
        } else {
            Position {
                epoch: pos.epoch,
                cursor: end as u64,
            }
        };
        let (batch, truncated) = self.pad(&rows);
        Ok((batch, next, truncated))
    }

    /// Truncates (keeping EOS last) and pads `rows` into a batch.
    pub fn pad(&self, rows: &[&Example]) -> (HostBatch, usize) {
        let cut = |seq: &[i32], max: usize| -> Vec<i32> {
            if seq.len() <= max {
                return seq.to_vec();
            }
            if max == 0 {
                return Vec::new();
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
        let b = Batcher::new(&ex, 4, 100, 100, false, 3, (0, 1, 0)).unwrap();
        let mut pos = Position::default();
        let mut seen = Vec::new();
        for _ in 0..3 {
            let (batch, next, truncated) = b.next_batch(pos).unwrap();
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
            Batcher::new(&ex, 4, 100, 100, false, 3, (0, 1, 0))
                .unwrap()
                .order(1),
            "seeded"
        );
    }

    #[test]
    fn truncation_keeps_eos_and_is_counted() {
        let ex = examples();
        let b = Batcher::new(&ex, 10, 5, 100, false, 0, (0, 1, 0)).unwrap();
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
        let b = Batcher::new(&ex, 2, 100, 100, false, 0, (0, 1, 0))
            .unwrap()
            .causal(true);
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
        let grouped = Batcher::new(&ex, 8, 100, 100, true, 1, (0, 1, 0)).unwrap();
        let spread = |b: &Batcher| -> usize {
            b.order(0)
                .chunks(8)
                .map(|c| {
                    let lens: Vec<usize> = c.iter().map(|&i| ex[i].input.len()).collect();
                    lens.iter().max().unwrap() - lens.iter().min().unwrap()
                })
                .sum()
        };
        let plain = Batcher::new(&ex, 8, 100, 100, false, 1, (0, 1, 0)).unwrap();
        assert!(
            spread(&grouped) * 3 < spread(&plain),
            "{} vs {}",
            spread(&grouped),
            spread(&plain)
        );
    }

    #[test]
    fn a_cursor_past_the_end_is_an_error_and_a_large_batch_is_the_epoch() {
        let ex = examples();
        let b = Batcher::new(&ex, 4, 100, 100, false, 3, (0, 1, 0)).unwrap();
        for cursor in [10, 11, u64::MAX] {
            let e = b
                .next_batch(Position { epoch: 2, cursor })
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(&format!("cursor {cursor}")) && e.contains("10 training"),
                "{e}"
            );
        }
        let big = Batcher::new(&ex, usize::MAX, 100, 100, true, 3, (0, 1, 0)).unwrap();
        assert_eq!(big.batch_size(), 10);
        assert_eq!(big.reduced(), Some((usize::MAX, 10)));
        let (batch, next, _) = big.next_batch(Position::default()).unwrap();
        assert_eq!(batch.batch, 10);
        assert_eq!(
            next,
            Position {
                epoch: 1,
                cursor: 0
            }
        );
        assert!(Batcher::new(&ex, 0, 100, 100, false, 3, (0, 1, 0)).is_err());
        assert!(Batcher::new(&[], 4, 100, 100, false, 3, (0, 1, 0)).is_err());
    }
}
