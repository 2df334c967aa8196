//! What a model folder must hold, said in words a user coming from transformers understands:
//! a Hub id is not a folder (and how to download one), PyTorch pickles are not read (and how to
//! convert them), a SentencePiece-only tokenizer needs its tokenizer.json (and how to make it).
//! The loaders call these where they would otherwise fail with a bare "file not found".

use std::path::Path;

use crate::error::{Error, Result};

/// Checks that `dir` is a folder holding `config.json`. A missing path that looks like a Hub id
/// (`owner/name`) says fastpt reads local folders and how to download that one.
pub fn check_model_dir(dir: &Path) -> Result<()> {
    if dir.is_dir() {
        let config = dir.join("config.json");
        if config.is_file() {
            return Ok(());
        }
        return Err(Error::format(
            dir,
            "no config.json: not a Hugging Face model folder (a folder saved by \
             `save_pretrained` holds config.json, model.safetensors and tokenizer.json)",
        ));
    }
    if dir.exists() {
        return Err(Error::format(
            dir,
            "not a folder: give a Hugging Face model folder (config.json, model.safetensors, \
             tokenizer.json)",
        ));
    }
    let text = dir.to_string_lossy();
    if looks_like_hub_id(&text) {
        let local = text.rsplit('/').next().unwrap_or(&text);
        return Err(Error::Input(format!(
            "{text} is not a local folder. It looks like a Hugging Face Hub id; fastpt reads \
             local folders only (it never downloads). Download it first, e.g.\n  \
             hf download {text} --local-dir models/{local}\n\
             (or `huggingface-cli download ...` with older huggingface_hub), then use \
             models/{local}"
        )));
    }
    Err(Error::Input(format!(
        "{text}: no such folder (a Hugging Face model folder, or a built-in shape name)"
    )))
}

/// `owner/name` with the characters the Hub allows, and not an existing path.
fn looks_like_hub_id(text: &str) -> bool {
    let ok = |part: &str| {
        !part.is_empty()
            && part
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && !part.starts_with('.')
    };
    match text.split_once('/') {
        Some((owner, name)) => ok(owner) && ok(name) && !name.contains('/'),
        None => false,
    }
}

/// Why a folder has no safetensors checkpoint, when it holds a PyTorch one instead: the
/// conversion to run. None when there is no pickle either.
pub fn pickle_hint(dir: &Path) -> Option<String> {
    let pickles = [
        "pytorch_model.bin",
        "pytorch_model.bin.index.json",
        "model.pt",
    ];
    let found = pickles.iter().find(|f| dir.join(f).is_file())?;
    Some(format!(
        "the folder holds {found} (a PyTorch pickle, which fastpt does not read: loading one \
         can run code). Convert it once with transformers, which writes safetensors:\n  \
         python -c \"import transformers as t; \
         t.AutoModelForSeq2SeqLM.from_pretrained('{d}').save_pretrained('{d}-st')\"\n\
         (AutoModelForCausalLM for Llama), and copy tokenizer.json into {d}-st",
        d = dir.display()
    ))
}

/// Checks that `dir` has tokenizer.json; a folder with only a SentencePiece model
/// (spiece.model, tokenizer.model) says how to write tokenizer.json from it.
pub fn check_tokenizer_file(dir: &Path) -> Result<()> {
    if dir.join("tokenizer.json").is_file() {
        return Ok(());
    }
    let spm = ["spiece.model", "tokenizer.model"]
        .into_iter()
        .find(|f| dir.join(f).is_file());
    let msg = match spm {
        Some(f) => format!(
            "no tokenizer.json, only {f} (a SentencePiece model, which fastpt does not read). \
             Write tokenizer.json once with transformers (needs sentencepiece and protobuf):\n  \
             python -c \"from transformers import AutoTokenizer; \
             AutoTokenizer.from_pretrained('{d}').save_pretrained('{d}')\"",
            d = dir.display()
        ),
        None => "no tokenizer.json: a text task needs the model folder's tokenizer".to_string(),
    };
    Err(Error::format(dir, msg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_are_told_apart_from_paths() {
        assert!(looks_like_hub_id("google/flan-t5-base"));
        assert!(looks_like_hub_id("meta-llama/Llama-2-7b-hf"));
        assert!(!looks_like_hub_id("models/t5/base"));
        assert!(!looks_like_hub_id("./t5"));
        assert!(!looks_like_hub_id("t5-base"));
        assert!(!looks_like_hub_id("/abs/path"));
    }
}
