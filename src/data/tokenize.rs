//! Text examples to token ids and generated ids back to text, with each family's special
//! tokens added explicitly (not by the tokenizer's post-processor, whose presence varies
//! between tokenizer.json files): T5 inputs and targets end in EOS; Llama inputs start with BOS
//! and targets end in EOS, so input + target is one causal row.
//!
//! Examples for training and evaluation are tokenized only as far as the batch keeps
//! (`*_max`, see [`BYTES_PER_TOKEN`]): a field of any length costs memory and time in
//! proportion to `max_len`, and the kept tokens are those of the whole text.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use rayon::prelude::*;
use tokenizers::Tokenizer;

use super::tasks::{TaskSpec, TextExample};
use super::Example;
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::hf::load_tokenizer;
use crate::model::Backbone;

/// A text of at most this many bytes per kept token is tokenized whole. A longer one is cut
/// before tokenizing (at a whitespace where there is one), to a prefix of this many bytes per
/// token to keep, doubled until it yields the tokens to keep plus [`TAIL_TOKENS`]: memory and
/// time stay proportional to what `max_len` keeps, not to the field (a 150 MB field took 24 GB
/// when tokenized whole). Typical text has 3–6 bytes per token.
pub const BYTES_PER_TOKEN: usize = 64;

/// Tokens at the end of a cut prefix that are not trusted (the text after the cut could merge
/// with them); the prefix must yield this many beyond the ones kept.
const TAIL_TOKENS: usize = 16;

/// A model's tokenizer with the ids its examples need.
pub struct TextCodec {
    tokenizer: Tokenizer,
    /// Decoder-only (Llama): inputs start with BOS instead of ending in EOS.
    pub decoder_only: bool,
    pub eos: i32,
    /// Llama: prepended to every input.
    pub bos: Option<i32>,
    /// Bytes of text handed to the tokenizer so far (what the bound on tokenizing limits).
    tokenized_bytes: AtomicU64,
}

impl TextCodec {
    /// The tokenizer.json of model folder `dir`, for `model`.
    pub fn load<B: Backend>(dir: &Path, model: &Backbone<B>) -> Result<Self> {
        if !dir.join("tokenizer.json").exists() {
            return Err(Error::Input(format!(
                "{}: no tokenizer.json; a text task needs the model's tokenizer (built-in shapes \
                 have none: train them on the synthetic task)",
                dir.display()
            )));
        }
        Ok(Self::new(load_tokenizer(dir)?, model))
    }

    pub fn new<B: Backend>(tokenizer: Tokenizer, model: &Backbone<B>) -> Self {
        let ids = model.special_ids();
        TextCodec {
            tokenizer,
            decoder_only: model.is_decoder_only(),
            eos: ids.eos,
            bos: ids.bos,
            tokenized_bytes: AtomicU64::new(0),
        }
    }

    /// Bytes of text tokenized so far by this codec.
    pub fn tokenized_bytes(&self) -> u64 {
        self.tokenized_bytes.load(Ordering::Relaxed)
    }

    fn ids(&self, text: &str) -> Result<Vec<i32>> {
        self.tokenized_bytes
            .fetch_add(text.len() as u64, Ordering::Relaxed);
        let enc = self.tokenizer.encode(text, false).map_err(|e| {
            Error::Input(format!(
                "tokenizing {}: {e}",
                super::readers::show_value(&text.into())
            ))
        })?;
        Ok(enc.get_ids().iter().map(|&x| x as i32).collect())
    }

    /// The first `keep` ids of `text` (all of them when it has fewer), tokenizing only a prefix
    /// of a long text (see [`BYTES_PER_TOKEN`]). A text of at most `keep · BYTES_PER_TOKEN`
    /// bytes is tokenized whole and returned whole, exactly as before the bound.
    fn ids_prefix(&self, text: &str, keep: usize) -> Result<Vec<i32>> {
        let mut budget = keep.saturating_mul(BYTES_PER_TOKEN);
        // Padding to a fixed length (a tokenizer.json setting) would fill any prefix up.
        if text.len() <= budget || self.tokenizer.get_padding().is_some() {
            return self.ids(text);
        }
        loop {
            let end = cut_point(text, budget);
            if end >= text.len() {
                return self.ids(text);
            }
            let mut ids = self.ids(&text[..end])?;
            if ids.len() >= keep.saturating_add(TAIL_TOKENS) {
                ids.truncate(keep);
                return Ok(ids);
            }
            budget = budget.saturating_mul(2);
        }
    }

    /// The input ids: T5 `text EOS`, Llama `BOS text`.
    pub fn encode_input(&self, text: &str) -> Result<Vec<i32>> {
        self.encode_input_max(text, usize::MAX)
    }

    /// The input ids for a batch that keeps `max_len` tokens: the same ids as
    /// [`Self::encode_input`] when the text is short; a long text's are cut after `max_len + 1`
    /// text tokens, so the row is still seen as truncated and truncates to the same tokens
    /// (the batcher keeps the first `max_len`, EOS last for T5).
    pub fn encode_input_max(&self, text: &str, max_len: usize) -> Result<Vec<i32>> {
        let ids = self.ids_prefix(text, max_len.saturating_add(1))?;
        Ok(match self.bos {
            Some(bos) if self.decoder_only => std::iter::once(bos).chain(ids).collect(),
            _ => ids.into_iter().chain([self.eos]).collect(),
        })
    }

    /// The target ids `text EOS`.
    pub fn encode_target(&self, text: &str) -> Result<Vec<i32>> {
        self.encode_target_max(text, usize::MAX)
    }

    /// The target ids for a batch that keeps `max_len` tokens (see [`Self::encode_input_max`]).
    pub fn encode_target_max(&self, text: &str, max_len: usize) -> Result<Vec<i32>> {
        let mut ids = self.ids_prefix(text, max_len.saturating_add(1))?;
        ids.push(self.eos);
        Ok(ids)
    }

    /// An example's input and target ids.
    pub fn example(&self, ex: &TextExample) -> Result<Example> {
        self.example_max(ex, usize::MAX, usize::MAX)
    }

    /// An example's ids for batches that keep `max_len` input and `max_target_len` target
    /// tokens (see [`Self::encode_input_max`]).
    pub fn example_max(
        &self,
        ex: &TextExample,
        max_len: usize,
        max_target_len: usize,
    ) -> Result<Example> {
        Ok(Example {
            input: self.encode_input_max(&ex.input, max_len)?,
            target: self.encode_target_max(&ex.target, max_target_len)?,
        })
    }

    /// Every example, tokenized (in parallel: large tasks hold hundreds of thousands) for
    /// batches of `max_len` input and `max_target_len` target tokens; errors name the split
    /// and the example's index.
    pub fn examples(
        &self,
        split: &str,
        examples: &[TextExample],
        max_len: usize,
        max_target_len: usize,
    ) -> Result<Vec<Example>> {
        examples
            .par_iter()
            .enumerate()
            .map(|(i, ex)| {
                self.example_max(ex, max_len, max_target_len)
                    .map_err(|e| Error::Input(format!("{split} example {i}: {e}")))
            })
            .collect()
    }

    /// The task's label texts must tokenize to different ids, or the model cannot tell its
    /// classes apart (a tokenizer without digits reads "0" and "1" as the same `<unk>`).
    pub fn check_classes(&self, spec: &TaskSpec) -> Result<()> {
        let mut seen: Vec<(&str, Vec<i32>)> = Vec::with_capacity(spec.classes.len());
        for class in &spec.classes {
            let ids = self.encode_target(class)?;
            if let Some((other, _)) = seen.iter().find(|(_, o)| *o == ids) {
                let indices = [*other, class.as_str()]
                    .iter()
                    .all(|c| !c.is_empty() && c.bytes().all(|b| b.is_ascii_digit()));
                let advice = if indices {
                    "set data.labels = \"words\" (label words instead of indices)"
                } else {
                    "give the labels texts the tokenizer knows (a custom task's label_map)"
                };
                return Err(Error::Input(format!(
                    "task {}: the labels {other:?} and {class:?} tokenize to the same ids \
                     {ids:?} with this model's tokenizer, so the model could not tell the \
                     classes apart: {advice}",
                    spec.name
                )));
            }
            seen.push((class, ids));
        }
        Ok(())
    }

    /// Generated ids as text: special tokens (EOS included) dropped, whitespace trimmed.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let text = self
            .tokenizer
            .decode(ids, true)
            .map_err(|e| Error::Input(format!("decoding {ids:?}: {e}")))?;
        Ok(text.trim().to_string())
    }
}

/// Where to cut `text` to at most `budget` bytes: at a char boundary, and at the start of the
/// last whitespace run in the second half of the prefix when there is one (a word is then never
/// split, so the kept words tokenize as they do in the whole text).
fn cut_point(text: &str, budget: usize) -> usize {
    if budget >= text.len() {
        return text.len();
    }
    let mut end = budget;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let head = &text[..end];
    let half = end / 2;
    match head.rfind(char::is_whitespace) {
        Some(i) if i >= half => match head[..i].trim_end().len() {
            0 => end,
            t => t,
        },
        _ => end,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cut_points_are_char_boundaries_before_whitespace() {
        assert_eq!(cut_point("abc def ghi", 100), 11);
        assert_eq!(cut_point("abc def ghi", 9), 7);
        assert_eq!(cut_point("abcdefghij", 5), 5);
        // "é" is 2 bytes: never cut inside it.
        assert_eq!(cut_point("ééééé", 5), 4);
        assert_eq!(cut_point("a  b", 3), 1);
    }
}
