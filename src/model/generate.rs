//! Greedy decoding shared by the backbones: settings, results, and the per-step choice of each
//! row's next token. The models run their own cached forwards (`Llama::generate`,
//! `T5::generate`) and hand each step's logits to `Greedy::step`.

use crate::error::{Error, Result};

/// Settings of greedy generation.
#[derive(Debug, Clone)]
pub struct GenerateConfig {
    pub max_new_tokens: usize,
    /// A row stops after producing any of these.
    pub eos_token_ids: Vec<u32>,
    /// Keep the logits of every step (for checks against a reference).
    pub keep_logits: bool,
}

/// The result of a greedy generation.
#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    /// The new tokens of each row, its EOS included when it stopped on one.
    pub tokens: Vec<Vec<u32>>,
    /// With `keep_logits`: per row, the logits `(V)` of each step that produced a token.
    pub step_logits: Vec<Vec<Vec<f32>>>,
}

/// Checks a generation request: a non-empty batch, at least one new token, `inputs_embeds`
/// of `B·T·C` values (`embeds_len`) and a valid `attention_mask (B, T)`.
pub(crate) fn check_generate_inputs(
    embeds_len: usize,
    attention_mask: &[i32],
    (b, t, c): (usize, usize, usize),
    gen: &GenerateConfig,
) -> Result<()> {
    if b == 0 || t == 0 || gen.max_new_tokens == 0 {
        return Err(Error::Input(format!(
            "generate: empty batch or no new tokens (B = {b}, T = {t}, max_new_tokens = {})",
            gen.max_new_tokens
        )));
    }
    if embeds_len != b * t * c || attention_mask.len() != b * t {
        return Err(Error::Input(format!(
            "generate: inputs_embeds has {embeds_len} values and attention_mask {}, expected \
             B·T·C = {} and B·T = {}",
            attention_mask.len(),
            b * t * c,
            b * t
        )));
    }
    crate::model::check_attention_mask(attention_mask, t)
}

/// Index of the largest value (the first one on a tie, as `torch.argmax`).
pub fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best
}

/// The state of a batch being decoded: tokens so far and which rows have stopped.
pub(crate) struct Greedy<'a> {
    cfg: &'a GenerateConfig,
    out: Generated,
    done: Vec<bool>,
}

impl<'a> Greedy<'a> {
    pub(crate) fn new(cfg: &'a GenerateConfig, batch: usize) -> Self {
        Greedy {
            cfg,
            out: Generated {
                tokens: vec![Vec::new(); batch],
                step_logits: vec![Vec::new(); batch],
            },
            done: vec![false; batch],
        }
    }

    /// Takes the argmax of each row of `logits (B, V)`, records it for rows still running, and
    /// returns the ids to feed next (stopped rows keep being fed, as Hugging Face does; their
    /// tokens are dropped). Returns `None` when every row has stopped or the budget is spent.
    pub(crate) fn step(&mut self, logits: &[f32], vocab: usize) -> Option<Vec<i32>> {
        let mut next = Vec::with_capacity(self.done.len());
        for (r, row) in logits.chunks_exact(vocab).enumerate() {
            let id = argmax(row) as u32;
            next.push(id as i32);
            if !self.done[r] {
                self.out.tokens[r].push(id);
                if self.cfg.keep_logits {
                    self.out.step_logits[r].push(row.to_vec());
                }
                self.done[r] = self.cfg.eos_token_ids.contains(&id);
            }
        }
        let produced = self.out.tokens.iter().map(Vec::len).max().unwrap_or(0);
        let finished = self.done.iter().all(|&d| d) || produced >= self.cfg.max_new_tokens;
        (!finished).then_some(next)
    }

    pub(crate) fn finish(self) -> Generated {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_takes_the_first_maximum() {
        assert_eq!(argmax(&[0.0, 2.0, 2.0, -1.0]), 1);
        assert_eq!(argmax(&[3.0]), 0);
    }

    #[test]
    fn rows_stop_at_eos_and_the_batch_at_the_budget() {
        let cfg = GenerateConfig {
            max_new_tokens: 3,
            eos_token_ids: vec![2],
            keep_logits: true,
        };
        let mut g = Greedy::new(&cfg, 2);
        // Row 0 picks EOS (2) first; row 1 picks 1.
        assert_eq!(g.step(&[0., 0., 1., 0., 1., 0.], 3), Some(vec![2, 1]));
        assert_eq!(g.step(&[1., 0., 0., 1., 0., 0.], 3), Some(vec![0, 0]));
        assert_eq!(g.step(&[1., 0., 0., 0., 0., 1.], 3), None);
        let out = g.finish();
        assert_eq!(out.tokens, vec![vec![2], vec![1, 0, 2]]);
        assert_eq!(out.step_logits[0], vec![vec![0., 0., 1.]]);
        assert_eq!(out.step_logits[1].len(), 3);
    }
}
