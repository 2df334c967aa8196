//! Export of trained prompts: fastpt's own `prompt.safetensors` (+ `export.json`) for every
//! method, and a PEFT prompt-tuning adapter folder for the methods whose result is a plain
//! prompt; reading such an adapter back (`fastpt run --init-from`, a PT warm start).
//!
//! Layout of an export folder `dir`:
//!
//! ```text
//! dir/prompt.safetensors      "prompt" (P, C) f32 — the rows the method's forward computes;
//!                             DePT / EPT-MS also "update" (M, C) f32. Metadata: format "pt",
//!                             fastpt.method, fastpt.backbone.
//! dir/export.json             method, shapes, backbone, how to apply the tensors, whether and
//!                             why (not) a PEFT adapter was written.
//! dir/adapter/                PEFT PROMPT_TUNING adapter (pt, ptuning, residual, dpt, lamp, xpt):
//!   adapter_config.json       PromptTuningConfig as PEFT's save_pretrained writes it
//!   adapter_model.safetensors "prompt_embeddings" (num_virtual_tokens · num_transformer_submodules,
//!                             token_dim) f32
//! ```
//!
//! The PEFT format (PEFT ≥ 0.4, checked against 0.21): `PeftModel.save_pretrained` writes the
//! config dataclass `asdict` with sorted keys and `inference_mode` true, and a safetensors file
//! whose only tensor `prompt_embeddings` is the prompt encoder's `embedding.weight`. With
//! `num_transformer_submodules = 1` PEFT prepends the rows to the encoder input only (T5) or to
//! the input (Llama), exactly where fastpt's `embed_prompt_forward` puts them — so the adapter
//! reproduces fastpt's model. `tools/check_peft_export.py` loads one with `PeftModel`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde_json::{json, Value};

use crate::backend::Backend;
use crate::config::MAX_SEQ_LEN;
use crate::error::{Error, Result};
use crate::fsutil::write_file_atomic;
use crate::model::hf::read_all_f64;
use crate::model::Architecture;
use crate::prompt::PromptMethod;

/// PEFT's file names (peft/utils/constants.py).
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// The tensor of a prompt-learning adapter (BasePromptEncoder._get_adapter_state_dict).
pub const PROMPT_EMBEDDINGS: &str = "prompt_embeddings";
/// The model card PEFT's save_pretrained writes next to an adapter.
pub const ADAPTER_CARD: &str = "README.md";
/// The PEFT version whose `save_pretrained` output fastpt's adapter matches (checked with
/// tools/check_peft_export.py); written as `peft_version`, as PEFT ≥ 0.18 writes its own. Older
/// PEFTs drop the key they do not know, with a warning.
pub const PEFT_VERSION: &str = "0.21.2";
/// Sub-folder of an export that holds the PEFT adapter.
pub const ADAPTER_DIR: &str = "adapter";
/// fastpt's own files of an export.
pub const PROMPT_FILE: &str = "prompt.safetensors";
pub const EXPORT_JSON: &str = "export.json";

/// What the export needs to know about the backbone.
#[derive(Debug, Clone, Copy)]
pub struct ExportInfo<'a> {
    /// The family the prompt was trained for (decides PEFT's `task_type`).
    pub kind: Architecture,
    /// The Hugging Face folder or built-in shape name the prompt was trained on; written as
    /// `base_model_name_or_path`. A folder with a config.json or a built-in shape name also
    /// fills `num_layers` / `num_attention_heads` (otherwise null: PEFT reads them from the
    /// model it loads the adapter onto) and is checked to have the prompt's width.
    pub base_model: Option<&'a str>,
}

/// What [`export_prompt`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct Exported {
    /// Every file written, in writing order.
    pub files: Vec<PathBuf>,
    /// Whether the PEFT adapter folder `dir/adapter/` was written.
    pub peft: bool,
    /// Why there is no adapter, for methods PEFT's PROMPT_TUNING cannot represent.
    pub note: Option<String>,
}

/// Why DePT / EPT-MS results are not PEFT adapters (shown to the user and stored in export.json).
fn no_adapter_note(method: &str, m: usize) -> String {
    format!(
        "no PEFT adapter for `{method}`: besides its prompt rows it adds a low-rank update \
         (M = {m} rows) to the text embeddings of input positions t < M; that update is not a \
         prompt, and PEFT's PROMPT_TUNING can only prepend rows, so it cannot hold this result. \
         Use prompt.safetensors (see export.json)"
    )
}

/// Writes `dir/prompt.safetensors` (tensor `prompt` (P, C) f32 = the rows the method's forward
/// computes; DePT / EPT-MS also `update` (M, C)), `dir/export.json`, and, for methods whose
/// result is a plain prompt (pt, ptuning, residual, dpt, lamp, xpt), the PEFT adapter folder
/// `dir/adapter/` with `adapter_config.json` + `adapter_model.safetensors`. For dept / ept no
/// adapter is written (and a stale one from an earlier export into `dir` is removed);
/// [`Exported::note`] says why. Runs `method.forward` once so the rows match the parameters.
pub fn export_prompt<B: Backend>(
    be: &B,
    method: &mut dyn PromptMethod<B>,
    info: &ExportInfo<'_>,
    dir: &Path,
) -> Result<Exported> {
    let name = method.name();
    method.forward(be);
    let p = method.prompt_rows();
    let rows = be.download_f32(method.rows()); // (P, C)

    // Only DePT and EPT-MS have an update; its presence (not the name) decides the format, so a
    // method added later is exported by what it computes.
    let update = match (method.update(), method.update_rows()) {
        (Some(u), Some(m)) if m > 0 => Some((m, be.download_f32(u))), // (M, C)
        _ => None,
    };
    // The width comes from the prompt rows, or from the update when there are none (EPT-MS at
    // s = 0 is the update alone).
    let c = match (p, &update) {
        (0, Some((m, u))) => u.len() / m,
        (0, None) => 0,
        _ => rows.len() / p,
    };
    if c == 0 || rows.len() != p * c {
        return Err(Error::Input(format!(
            "export of `{name}`: {} prompt values do not form {p} rows",
            rows.len()
        )));
    }
    check_finite(&rows, name, "prompt", c)?;
    if let Some((m, u)) = &update {
        if u.len() != m * c {
            return Err(Error::Input(format!(
                "export of `{name}`: the update has {} values, not ({m}, {c})",
                u.len()
            )));
        }
        check_finite(u, name, "update", c)?;
    }
    let layers = base_model_layers(info, c)?;

    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut files = Vec::new();

    let prompt_path = dir.join(PROMPT_FILE);
    let mut tensors: Vec<(&str, Vec<usize>, &[f32])> = vec![("prompt", vec![p, c], &rows)];
    if let Some((m, u)) = &update {
        tensors.push(("update", vec![*m, c], u));
    }
    let metadata = HashMap::from([
        ("format".to_string(), "pt".to_string()),
        ("fastpt.method".to_string(), name.to_string()),
        ("fastpt.backbone".to_string(), info.kind.name().to_string()),
    ]);
    write_f32_safetensors(&prompt_path, &tensors, metadata)?;
    files.push(prompt_path);

    let adapter_dir = dir.join(ADAPTER_DIR);
    let note = match &update {
        Some((m, _)) => {
            remove_stale_adapter(&adapter_dir)?;
            Some(no_adapter_note(name, *m))
        }
        None => {
            std::fs::create_dir_all(&adapter_dir).map_err(|e| Error::io(&adapter_dir, e))?;
            let weights = adapter_dir.join(ADAPTER_WEIGHTS);
            write_f32_safetensors(
                &weights,
                &[(PROMPT_EMBEDDINGS, vec![p, c], &rows)],
                HashMap::from([("format".to_string(), "pt".to_string())]),
            )?;
            files.push(weights);
            let card = adapter_dir.join(ADAPTER_CARD);
            let text = adapter_card(name, info, p, c);
            write_file_atomic(&card, text.as_bytes(), &mut || Ok(()))?;
            files.push(card);
            // The config last: a folder interrupted before it is not mistaken for an adapter.
            let config = adapter_dir.join(ADAPTER_CONFIG);
            let text = adapter_config_json(info, p, c, layers);
            write_file_atomic(&config, text.as_bytes(), &mut || Ok(()))?;
            files.push(config);
            None
        }
    };

    let export_json = dir.join(EXPORT_JSON);
    let doc = export_json_doc(name, info, p, c, update.as_ref().map(|(m, _)| *m), &note);
    write_file_atomic(&export_json, doc.as_bytes(), &mut || Ok(()))?;
    files.push(export_json);

    Ok(Exported {
        files,
        peft: update.is_none(),
        note,
    })
}

/// The adapter_config.json of a PROMPT_TUNING adapter with P virtual tokens of width C: every
/// key PEFT's `PromptTuningConfig.save_pretrained` writes, sorted, 2-space indent, with
/// `peft_version` = [`PEFT_VERSION`], the version this format was checked against.
pub fn adapter_config_json(
    info: &ExportInfo<'_>,
    p: usize,
    c: usize,
    layers: Option<(usize, usize)>,
) -> String {
    let (num_layers, num_heads) = match layers {
        Some((l, h)) => (json!(l), json!(h)),
        None => (Value::Null, Value::Null),
    };
    // BTreeMap: sorted keys whatever serde_json's map features are.
    let config: BTreeMap<&str, Value> = BTreeMap::from([
        ("auto_mapping", Value::Null),
        ("base_model_name_or_path", json!(info.base_model)),
        // As PeftModel.save_pretrained writes it: the saved adapter is for inference.
        ("inference_mode", json!(true)),
        ("modules_to_save", Value::Null),
        ("num_attention_heads", num_heads),
        ("num_layers", num_layers),
        // fastpt prompts the encoder input only (T5) / the input (Llama).
        ("num_transformer_submodules", json!(1)),
        ("num_virtual_tokens", json!(p)),
        ("peft_type", json!("PROMPT_TUNING")),
        ("peft_version", json!(PEFT_VERSION)),
        // The rows are trained, not initialised: RANDOM makes PEFT skip any init on load.
        ("prompt_tuning_init", json!("RANDOM")),
        ("prompt_tuning_init_text", Value::Null),
        ("revision", Value::Null),
        ("task_type", json!(info.kind.peft_task_type())),
        ("token_dim", json!(c)),
        ("tokenizer_kwargs", Value::Null),
        ("tokenizer_name_or_path", Value::Null),
    ]);
    let mut text = serde_json::to_string_pretty(&config).unwrap_or_default();
    text.push('\n');
    text
}

/// The adapter's README.md, a model card as the Hub reads one: YAML metadata with the keys
/// PEFT's `create_or_update_model_card` sets (base_model, library_name: peft, the
/// `base_model:adapter:` tag), then what the adapter is, how to load it, and the framework
/// versions.
pub fn adapter_card(method: &str, info: &ExportInfo<'_>, p: usize, c: usize) -> String {
    // JSON strings are valid YAML double-quoted scalars: any path or id is quoted safely.
    let quoted = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into());
    let base = info.base_model.unwrap_or("");
    let mut yaml = String::from("---\n");
    if !base.is_empty() {
        yaml.push_str(&format!("base_model: {}\n", quoted(base)));
    }
    yaml.push_str("library_name: peft\ntags:\n");
    if !base.is_empty() {
        yaml.push_str(&format!(
            "- {}\n",
            quoted(&format!("base_model:adapter:{base}"))
        ));
    }
    yaml.push_str("- prompt-tuning\n- fastpt\n---\n\n");
    let (auto, place) = match info.kind.peft_task_type() {
        "SEQ_2_SEQ_LM" => ("AutoModelForSeq2SeqLM", "the encoder input"),
        _ => ("AutoModelForCausalLM", "the input"),
    };
    let shown = if base.is_empty() { "BASE_MODEL" } else { base };
    format!(
        "{yaml}# Prompt-tuning adapter{of}\n\n\
         {p} virtual tokens of width {c}, trained by fastpt's `{method}` method on a frozen \
         backbone and saved as the plain prompt PEFT's PROMPT_TUNING prepends to {place} \
         (num_transformer_submodules = 1).\n\n\
         ## How to use\n\n\
         ```python\n\
         from peft import PeftModel\n\
         from transformers import {auto}\n\n\
         base = {auto}.from_pretrained({base_q})\n\
         model = PeftModel.from_pretrained(base, \"PATH/TO/THIS/FOLDER\")\n\
         ```\n\n\
         `fastpt run --init-from PATH/TO/THIS/FOLDER` starts a `pt` run from it.\n\n\
         ### Framework versions\n\n\
         - PEFT {PEFT_VERSION}\n\
         - fastpt {}\n",
        env!("CARGO_PKG_VERSION"),
        of = if base.is_empty() {
            String::new()
        } else {
            format!(" for {base}")
        },
        base_q = quoted(shown),
    )
}

/// export.json: fastpt's own format, documented for whoever reads the folder.
fn export_json_doc(
    method: &str,
    info: &ExportInfo<'_>,
    p: usize,
    c: usize,
    m: Option<usize>,
    note: &Option<String>,
) -> String {
    let apply = match m {
        Some(m) => format!(
            "inputs_embeds = concat(prompt (P={p}, C={c}), E(x) + U) along the sequence, where \
             E(x) are the frozen text embeddings of the input and U adds update row t to input \
             row t for t < min(n, M={m}); the attention mask gets P leading ones"
        ),
        None => format!(
            "inputs_embeds = concat(prompt (P={p}, C={c}), E(x)) along the sequence; the \
             attention mask gets P leading ones"
        ),
    };
    let doc: BTreeMap<&str, Value> = BTreeMap::from([
        ("format", json!("fastpt-prompt")),
        ("version", json!(1)),
        ("method", json!(method)),
        ("backbone", json!(info.kind.name())),
        ("base_model_name_or_path", json!(info.base_model)),
        ("file", json!(PROMPT_FILE)),
        (
            "prompt",
            json!({"tensor": "prompt", "shape": [p, c], "dtype": "F32"}),
        ),
        (
            "update",
            match m {
                Some(m) => json!({"tensor": "update", "shape": [m, c], "dtype": "F32"}),
                None => Value::Null,
            },
        ),
        ("where", json!(info.kind.prompt_place())),
        ("apply", json!(apply)),
        (
            "peft_adapter",
            match m {
                Some(_) => Value::Null,
                None => json!(ADAPTER_DIR),
            },
        ),
        ("note", json!(note)),
    ]);
    let mut text = serde_json::to_string_pretty(&doc).unwrap_or_default();
    text.push('\n');
    text
}

/// (num_layers, num_attention_heads) of the base model when `base_model` names a folder with a
/// config.json or a built-in shape; checks that its width is the prompt's.
fn base_model_layers(info: &ExportInfo<'_>, c: usize) -> Result<Option<(usize, usize)>> {
    let Some(base) = info.base_model else {
        return Ok(None);
    };
    let config = Path::new(base).join("config.json");
    // Neither (a hub id or a folder elsewhere): PEFT fills the counts from the model.
    let Some(dims) = info.kind.base_dims(base)? else {
        return Ok(None);
    };
    let (width, layers, heads, source) = (dims.width, dims.layers, dims.heads, dims.width_key);
    if width != c {
        return Err(Error::config(
            if config.is_file() {
                config
            } else {
                PathBuf::from(base)
            },
            source,
            format!(
                "is {width}, but the prompt rows are {c} wide: not the model they were trained on"
            ),
        ));
    }
    Ok(Some((layers, heads)))
}

/// Rejects NaN / ±inf (a diverged run) before they are written anywhere.
fn check_finite(values: &[f32], method: &str, tensor: &str, c: usize) -> Result<()> {
    match values.iter().position(|x| !x.is_finite()) {
        Some(i) => Err(Error::Input(format!(
            "export of `{method}`: tensor `{tensor}` row {} column {} is {} (the training \
             diverged); nothing was written",
            i / c,
            i % c,
            values[i]
        ))),
        None => Ok(()),
    }
}

/// Removes the two files of an adapter an earlier export left in `adapter_dir` (and the folder
/// if that empties it), so a DePT/EPT export is not shadowed by an unrelated old adapter.
fn remove_stale_adapter(adapter_dir: &Path) -> Result<()> {
    for file in [ADAPTER_CONFIG, ADAPTER_WEIGHTS, ADAPTER_CARD] {
        let path = adapter_dir.join(file);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(path, e)),
        }
    }
    // Best effort: a folder the user put other files in stays.
    let _ = std::fs::remove_dir(adapter_dir);
    Ok(())
}

/// f32 tensors with file metadata (the crate's save_safetensors writes none), atomically.
fn write_f32_safetensors(
    path: &Path,
    tensors: &[(&str, Vec<usize>, &[f32])],
    metadata: HashMap<String, String>,
) -> Result<()> {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let mut views = Vec::with_capacity(tensors.len());
    for ((name, shape, _), b) in tensors.iter().zip(&bytes) {
        let view = TensorView::new(Dtype::F32, shape.clone(), b)
            .map_err(|e| Error::Input(format!("{}: tensor `{name}`: {e}", path.display())))?;
        views.push((*name, view));
    }
    let data = safetensors::serialize(views, Some(metadata))
        .map_err(|e| Error::Input(format!("{}: cannot serialize: {e}", path.display())))?;
    write_file_atomic(path, &data, &mut || Ok(()))
}

/// An adapter's config fields that decide its rows.
struct AdapterShape {
    /// num_virtual_tokens (P): the rows of one prompt.
    p: usize,
    /// token_dim (C).
    c: usize,
    /// num_transformer_submodules: 1, or 2 for PEFT's seq2seq default (a second P rows that
    /// PEFT prepends to the decoder input); the file holds P · submodules rows.
    submodules: usize,
    /// PROMPT_TUNING or P_TUNING (whose file holds the rows its encoder computed).
    peft_type: String,
}

/// The peft_types whose `prompt_embeddings` are a plain prompt fastpt can read.
const PROMPT_PEFT_TYPES: [&str; 2] = ["PROMPT_TUNING", "P_TUNING"];

/// Reads `dir/adapter_config.json` and checks it describes a prompt adapter fastpt can use
/// (peft_type PROMPT_TUNING or P_TUNING, num_virtual_tokens, token_dim,
/// num_transformer_submodules 1 or 2).
fn read_adapter_config(dir: &Path) -> Result<AdapterShape> {
    let path = dir.join(ADAPTER_CONFIG);
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let value: Value = serde_json::from_str(&text)
        .map_err(|e| Error::format(&path, format!("not valid JSON: {e}")))?;
    let Some(obj) = value.as_object() else {
        return Err(Error::format(&path, "not a JSON object"));
    };
    let known = "fastpt reads \"PROMPT_TUNING\" and \"P_TUNING\" adapters";
    let peft_type = match obj.get("peft_type") {
        Some(Value::String(t)) if PROMPT_PEFT_TYPES.contains(&t.as_str()) => t.clone(),
        Some(other) => {
            return Err(Error::config(
                &path,
                "peft_type",
                format!("is {other}; {known}"),
            ))
        }
        None => {
            return Err(Error::config(
                &path,
                "peft_type",
                format!("missing; {known}"),
            ))
        }
    };
    let positive = |field: &str| -> Result<usize> {
        match obj.get(field) {
            Some(v) => match v.as_u64() {
                Some(n) if n > 0 => usize::try_from(n).map_err(|_| {
                    Error::config(&path, field, format!("{n} is too large for this machine"))
                }),
                _ => Err(Error::config(
                    &path,
                    field,
                    format!("is {v}; expected a positive integer"),
                )),
            },
            None => Err(Error::config(&path, field, "missing")),
        }
    };
    let p = positive("num_virtual_tokens")?;
    if p > MAX_SEQ_LEN {
        return Err(Error::config(
            &path,
            "num_virtual_tokens",
            format!("is {p}; a prompt holds at most {MAX_SEQ_LEN} rows (MAX_SEQ_LEN)"),
        ));
    }
    let c = positive("token_dim")?;
    // PEFT's default when null: 2 for SEQ_2_SEQ_LM (a second prompt on the decoder input), else 1.
    let submodules = match obj.get("num_transformer_submodules") {
        None | Some(Value::Null) => match obj.get("task_type").and_then(Value::as_str) {
            Some("SEQ_2_SEQ_LM") => 2,
            _ => 1,
        },
        Some(_) => positive("num_transformer_submodules")?,
    };
    if submodules > 2 {
        return Err(Error::config(
            &path,
            "num_transformer_submodules",
            format!("is {submodules}; PEFT writes 1 or 2 (2: a second prompt for the decoder)"),
        ));
    }
    Ok(AdapterShape {
        p,
        c,
        submodules,
        peft_type,
    })
}

/// What fastpt does with an adapter's rows beyond the first P, said to the user (None for a
/// one-submodule PROMPT_TUNING adapter, which fastpt uses as it is).
fn adapter_note(dir: &Path, shape: &AdapterShape) -> Option<String> {
    let p = shape.p;
    let mut notes = Vec::new();
    if shape.submodules == 2 {
        notes.push(format!(
            "the adapter has num_transformer_submodules = 2 (PEFT's seq2seq default), so it \
             holds {} rows: fastpt prompts the encoder with rows 0..{p}, the half PEFT's \
             generate() uses; rows {p}..{}, the prompt PEFT prepends to the decoder input in its \
             training forward only, are left out (fastpt never prompts the decoder)",
            2 * p,
            2 * p
        ));
    }
    if shape.peft_type == "P_TUNING" {
        notes.push(
            "a P_TUNING adapter stores the rows its MLP computed, which fastpt reads as a plain \
             prompt"
                .to_string(),
        );
    }
    (!notes.is_empty()).then(|| format!("{}: {}", dir.display(), notes.join("; ")))
}

/// Reads the rows of an adapter whose config was checked: `prompt_embeddings` must be
/// (num_virtual_tokens · num_transformer_submodules, token_dim) and finite; returns the first
/// num_virtual_tokens rows (the encoder's, or the only ones).
fn read_adapter_rows(dir: &Path, shape: &AdapterShape) -> Result<Vec<f32>> {
    let path = dir.join(ADAPTER_WEIGHTS);
    if !path.is_file() && dir.join("adapter_model.bin").is_file() {
        return Err(Error::format(
            &path,
            "missing; the folder holds adapter_model.bin (a torch pickle), which fastpt does not \
             read: save the adapter with safe_serialization=True",
        ));
    }
    let mut tensors = read_all_f64(&path)?;
    let Some((found, values)) = tensors.remove(PROMPT_EMBEDDINGS) else {
        return Err(Error::MissingTensors {
            path,
            count: 1,
            names: vec![PROMPT_EMBEDDINGS.to_string()],
        });
    };
    let expected = vec![shape.p * shape.submodules, shape.c];
    if found != expected {
        return Err(Error::Shape {
            path,
            name: PROMPT_EMBEDDINGS.to_string(),
            expected,
            found,
        });
    }
    // f32/bf16/f16 → f64 → f32 is exact, so f32 rows come back bit for bit.
    let rows: Vec<f32> = values[..shape.p * shape.c]
        .iter()
        .map(|&x| x as f32)
        .collect();
    if let Some(i) = rows.iter().position(|x| !x.is_finite()) {
        return Err(Error::format(
            &path,
            format!(
                "tensor `{PROMPT_EMBEDDINGS}` row {} column {} is {}",
                i / shape.c,
                i % shape.c,
                rows[i]
            ),
        ));
    }
    Ok(rows)
}

/// A PEFT adapter's prompt, as fastpt uses it.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterPrompt {
    /// num_virtual_tokens.
    pub p: usize,
    /// (P, C): the encoder's rows (the first P of a two-submodule adapter).
    pub rows: Vec<f32>,
    /// What was left out or how the rows were read (a two-submodule adapter's decoder half, a
    /// P_TUNING adapter's computed rows), for the user; None when the adapter is used as is.
    pub note: Option<String>,
}

/// Reads a PEFT adapter folder (`adapter_config.json` with peft_type PROMPT_TUNING or P_TUNING,
/// and `adapter_model.safetensors` with `prompt_embeddings`). Checks `token_dim == d_model` and
/// the tensor's shape (num_virtual_tokens · num_transformer_submodules, token_dim); errors name
/// the file and field. Of a two-submodule adapter (PEFT's seq2seq default) it keeps the encoder
/// half, and [`AdapterPrompt::note`] says so.
pub fn read_adapter_prompt(dir: &Path, d_model: usize) -> Result<AdapterPrompt> {
    let shape = read_adapter_config(dir)?;
    if shape.c != d_model {
        return Err(Error::config(
            dir.join(ADAPTER_CONFIG),
            "token_dim",
            format!(
                "is {}, but the model's width (d_model) is {d_model}: the adapter was made for \
                 another model",
                shape.c
            ),
        ));
    }
    let rows = read_adapter_rows(dir, &shape)?;
    Ok(AdapterPrompt {
        p: shape.p,
        rows,
        note: adapter_note(dir, &shape),
    })
}

/// [`read_adapter_prompt`] without the note: `(P, rows (P, C))`.
pub fn read_adapter(dir: &Path, d_model: usize) -> Result<(usize, Vec<f32>)> {
    let prompt = read_adapter_prompt(dir, d_model)?;
    Ok((prompt.p, prompt.rows))
}

/// `fastpt run --init-from PATH`: a warm start from PEFT's files.
///
/// - `pt`: PATH is an adapter folder (PROMPT_TUNING or P_TUNING, one or two submodules); its
///   encoder rows become the prompt.
/// - `ptuning`: PATH holds P-Tuning's trainable state under PEFT's names — a safetensors file,
///   or an adapter folder whose adapter_model.safetensors has them: `…embedding.weight`
///   (P·S, C) and `…mlp_head.{0,2,4}.{weight,bias}` (PEFT's `Sequential` counts its ReLUs;
///   fastpt's layers are `mlp.{0,1,2}`). A saved PEFT adapter holds only the computed rows,
///   which cannot set an MLP: the error says how to save the state.
///
/// Any other method, or shapes that differ from the method's, is an error naming the path and
/// both shapes; nothing is changed then. Returns a note for the user (see
/// [`AdapterPrompt::note`]).
pub fn init_from_adapter<B: Backend>(
    be: &B,
    method: &mut dyn PromptMethod<B>,
    path: &Path,
) -> Result<Option<String>> {
    match method.name() {
        "pt" => init_pt(be, method, path),
        "ptuning" => init_ptuning(be, method, path),
        name => Err(Error::Input(format!(
            "{}: --init-from warm-starts the `pt` method (its parameter is the prompt itself) \
             and `ptuning` (from PEFT's P-Tuning state); the method is `{name}`",
            path.display()
        ))),
    }
}

fn init_pt<B: Backend>(
    be: &B,
    method: &mut dyn PromptMethod<B>,
    dir: &Path,
) -> Result<Option<String>> {
    let Some(index) = method.params().iter().position(|p| p.name == "prompt") else {
        return Err(Error::Input(format!(
            "{}: the `pt` method has no `prompt` parameter",
            dir.display()
        )));
    };
    let shape = read_adapter_config(dir)?;
    let have = [shape.p, shape.c];
    let param = &mut method.params_mut()[index];
    if param.shape[..] != have {
        return Err(Error::Input(format!(
            "{}: the adapter holds prompt rows of shape {have:?} (num_virtual_tokens, \
             token_dim), but the `pt` prompt is {:?} (prompt_len, d_model)",
            dir.display(),
            param.shape
        )));
    }
    let rows = read_adapter_rows(dir, &shape)?;
    param.value = be.upload_f32(rows);
    method.forward(be);
    Ok(adapter_note(dir, &shape))
}

/// PEFT's name suffix of each fastpt P-Tuning parameter (PromptEncoder's `embedding` and its
/// MLP `Sequential(Linear, ReLU, Linear, ReLU, Linear)`).
const PTUNING_PEFT_NAMES: [(&str, &str); 7] = [
    ("prompt", "embedding.weight"),
    ("mlp.0.weight", "mlp_head.0.weight"),
    ("mlp.0.bias", "mlp_head.0.bias"),
    ("mlp.1.weight", "mlp_head.2.weight"),
    ("mlp.1.bias", "mlp_head.2.bias"),
    ("mlp.2.weight", "mlp_head.4.weight"),
    ("mlp.2.bias", "mlp_head.4.bias"),
];

fn init_ptuning<B: Backend>(
    be: &B,
    method: &mut dyn PromptMethod<B>,
    path: &Path,
) -> Result<Option<String>> {
    let file = if path.is_dir() {
        path.join(ADAPTER_WEIGHTS)
    } else {
        path.to_path_buf()
    };
    let tensors = read_all_f64(&file)?;
    let how_to_save = "PEFT's saved adapter holds only the rows the MLP computed (they can \
         warm-start `pt`); save P-Tuning's state with `safetensors.torch.save_file({k: v for k, v \
         in model.state_dict().items() if k.startswith(\"prompt_encoder.\")}, \"state.safetensors\")` \
         and pass that file";
    if tensors.keys().any(|k| k.contains("lstm_head.")) {
        return Err(Error::format(
            &file,
            "an LSTM P-Tuning encoder (lstm_head); fastpt's `ptuning` is the MLP encoder \
             (encoder_reparameterization_type = \"MLP\")",
        ));
    }
    let is_state = |k: &String| k.ends_with("embedding.weight") || k.contains("mlp_head.");
    if !tensors.keys().any(is_state) {
        return Err(Error::format(
            &file,
            format!(
                "holds no P-Tuning encoder state (`…embedding.weight`, \
                 `…mlp_head.{{0,2,4}}.{{weight,bias}}`): {how_to_save}"
            ),
        ));
    }
    // Find each parameter by its PEFT suffix; exactly one tensor may match.
    let mut found = Vec::with_capacity(PTUNING_PEFT_NAMES.len());
    for (ours, suffix) in PTUNING_PEFT_NAMES {
        let matches: Vec<&String> = tensors
            .keys()
            .filter(|k| *k == suffix || k.ends_with(&format!(".{suffix}")))
            .collect();
        match matches[..] {
            [name] => found.push((ours, name.clone())),
            [] => {
                return Err(Error::format(
                    &file,
                    format!("no tensor named `…{suffix}` (P-Tuning's `{ours}`); {how_to_save}"),
                ))
            }
            _ => {
                return Err(Error::format(
                    &file,
                    format!(
                        "several tensors end in `{suffix}` ({}): one adapter's state at a time",
                        matches
                            .iter()
                            .map(|s| s.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ))
            }
        }
    }
    // Check every shape before changing anything.
    let mut values = Vec::with_capacity(found.len());
    for (ours, theirs) in &found {
        let Some(param) = method.params().iter().find(|p| p.name == *ours) else {
            return Err(Error::Input(format!(
                "{}: the `ptuning` method has no parameter `{ours}`",
                path.display()
            )));
        };
        let want = param.shape.clone();
        let (shape, data) = &tensors[theirs];
        // The embedding may hold two prompts (num_transformer_submodules = 2): the first is the
        // encoder's; the MLP maps each row alone, so the first P rows are its prompt.
        let rows_ok = *ours == "prompt"
            && shape.len() == 2
            && want.len() == 2
            && shape[1] == want[1]
            && (shape[0] == want[0] || shape[0] == 2 * want[0]);
        if shape != &want && !rows_ok {
            return Err(Error::Shape {
                path: file.clone(),
                name: theirs.clone(),
                expected: want,
                found: shape.clone(),
            });
        }
        let n: usize = want.iter().product();
        let v: Vec<f32> = data[..n].iter().map(|&x| x as f32).collect();
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            return Err(Error::format(
                &file,
                format!("tensor `{theirs}` element {i} is {}", v[i]),
            ));
        }
        values.push((*ours, v));
    }
    for (ours, v) in values {
        if let Some(param) = method.params_mut().iter_mut().find(|p| p.name == ours) {
            param.value = be.upload_f32(v);
        }
    }
    method.forward(be);
    let embedding = &tensors[&found[0].1].0;
    let p = method.prompt_rows();
    Ok((embedding.first() == Some(&(2 * p))).then(|| {
        format!(
            "{}: the P-Tuning embedding holds {} rows (two submodules): fastpt uses rows \
             0..{p}, the encoder's, and leaves out the decoder's",
            file.display(),
            2 * p
        )
    }))
}

/// Reads the method name stored in an export's `prompt.safetensors` metadata (None when absent).
pub fn exported_method(dir: &Path) -> Result<Option<String>> {
    let path = dir.join(PROMPT_FILE);
    let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
    let (_, meta) = SafeTensors::read_metadata(&bytes)
        .map_err(|e| Error::format(&path, format!("not a valid safetensors file: {e}")))?;
    Ok(meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("fastpt.method").cloned()))
}
