//! Text examples to token ids and generated ids back to text, with each family's special
//! tokens added explicitly (not by the tokenizer's post-processor, whose presence varies
//! between tokenizer.json files): T5 inputs and targets end in EOS; Llama inputs start with BOS
//! and targets end in EOS, so input + target is one causal row.

use std::path::Path;

use rayon::prelude::*;
use tokenizers::Tokenizer;

use super::tasks::TextExample;
use super::Example;
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::hf::load_tokenizer;
use crate::model::Backbone;

/// A model's tokenizer with the ids its examples need.
pub struct TextCodec {
    tokenizer: Tokenizer,
    /// Decoder-only (Llama): inputs start with BOS instead of ending in EOS.
    pub decoder_only: bool,
    pub eos: i32,
    /// Llama: prepended to every input.
    pub bos: Option<i32>,
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
        }
    }

    fn ids(&self, text: &str) -> Result<Vec<i32>> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| Error::Input(format!("tokenizing {text:?}: {e}")))?;
        Ok(enc.get_ids().iter().map(|&x| x as i32).collect())
    }

    /// The input ids: T5 `text EOS`, Llama `BOS text`.
    pub fn encode_input(&self, text: &str) -> Result<Vec<i32>> {
        let ids = self.ids(text)?;
        Ok(match self.bos {
            Some(bos) if self.decoder_only => std::iter::once(bos).chain(ids).collect(),
            _ => ids.into_iter().chain([self.eos]).collect(),
        })
    }

    /// The target ids `text EOS`.
    pub fn encode_target(&self, text: &str) -> Result<Vec<i32>> {
        let mut ids = self.ids(text)?;
        ids.push(self.eos);
        Ok(ids)
    }

    /// An example's input and target ids.
    pub fn example(&self, ex: &TextExample) -> Result<Example> {
        Ok(Example {
            input: self.encode_input(&ex.input)?,
            target: self.encode_target(&ex.target)?,
        })
    }

    /// Every example, tokenized (in parallel: large tasks hold hundreds of thousands); errors
    /// name the split and the example's index.
    pub fn examples(&self, split: &str, examples: &[TextExample]) -> Result<Vec<Example>> {
        examples
            .par_iter()
            .enumerate()
            .map(|(i, ex)| {
                self.example(ex)
                    .map_err(|e| Error::Input(format!("{split} example {i}: {e}")))
            })
            .collect()
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
