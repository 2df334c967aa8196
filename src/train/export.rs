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
/// key PEFT's `PromptTuningConfig.save_pretrained` writes, sorted, 2-space indent, except
/// `peft_version` — PEFT fills it with its own version when absent, and a PEFT older than that
/// key rejects or warns about it.
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
    for file in [ADAPTER_CONFIG, ADAPTER_WEIGHTS] {
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
    /// num_virtual_tokens (P) — with num_transformer_submodules = 1 also the row count.
    p: usize,
    /// token_dim (C).
    c: usize,
}

/// Reads `dir/adapter_config.json` and checks it describes a PROMPT_TUNING adapter fastpt can
/// use (peft_type, num_virtual_tokens, token_dim, num_transformer_submodules = 1).
fn read_adapter_config(dir: &Path) -> Result<AdapterShape> {
    let path = dir.join(ADAPTER_CONFIG);
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let value: Value = serde_json::from_str(&text)
        .map_err(|e| Error::format(&path, format!("not valid JSON: {e}")))?;
    let Some(obj) = value.as_object() else {
        return Err(Error::format(&path, "not a JSON object"));
    };
    match obj.get("peft_type") {
        Some(Value::String(t)) if t == "PROMPT_TUNING" => {}
        Some(other) => {
            return Err(Error::config(
                &path,
                "peft_type",
                format!("is {other}; fastpt reads only \"PROMPT_TUNING\" adapters"),
            ))
        }
        None => {
            return Err(Error::config(
                &path,
                "peft_type",
                "missing; fastpt reads only \"PROMPT_TUNING\" adapters",
            ))
        }
    }
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
    let c = positive("token_dim")?;
    // PEFT's default when null: 2 for SEQ_2_SEQ_LM (a second prompt on the decoder input), else 1.
    let submodules = match obj.get("num_transformer_submodules") {
        None | Some(Value::Null) => match obj.get("task_type").and_then(Value::as_str) {
            Some("SEQ_2_SEQ_LM") => 2,
            _ => 1,
        },
        Some(_) => positive("num_transformer_submodules")?,
    };
    if submodules != 1 {
        return Err(Error::config(
            &path,
            "num_transformer_submodules",
            format!(
                "is {submodules} (PEFT then also prompts the decoder input); fastpt prompts \
                 the encoder input only, so only 1 is supported"
            ),
        ));
    }
    Ok(AdapterShape { p, c })
}

/// Reads the rows of an adapter whose config was checked: `prompt_embeddings` must be
/// (num_virtual_tokens · num_transformer_submodules, token_dim) and finite.
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
    let expected = vec![shape.p, shape.c];
    if found != expected {
        return Err(Error::Shape {
            path,
            name: PROMPT_EMBEDDINGS.to_string(),
            expected,
            found,
        });
    }
    // f32/bf16/f16 → f64 → f32 is exact, so f32 rows come back bit for bit.
    let rows: Vec<f32> = values.iter().map(|&x| x as f32).collect();
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

/// Reads a PEFT adapter folder (`adapter_config.json` with peft_type PROMPT_TUNING +
/// `adapter_model.safetensors` with `prompt_embeddings`) into its rows: `(P, rows (P, C))`.
/// Checks `token_dim == d_model`, num_transformer_submodules = 1 and the tensor's shape
/// (num_virtual_tokens · num_transformer_submodules, token_dim); errors name the file and field.
pub fn read_adapter(dir: &Path, d_model: usize) -> Result<(usize, Vec<f32>)> {
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
    Ok((shape.p, rows))
}

/// `fastpt run --init-from adapter_dir`: copies the adapter's rows into a PT method's `prompt`
/// parameter (a PT warm start). Any other method, or an adapter whose (P, C) differs from the
/// prompt's, is an error naming the folder and both shapes.
pub fn init_from_adapter<B: Backend>(
    be: &B,
    method: &mut dyn PromptMethod<B>,
    dir: &Path,
) -> Result<()> {
    let name = method.name();
    // Only PT's parameter *is* the prompt; the others compute it from other parameters, which
    // rows alone cannot set.
    let Some(param) = method
        .params_mut()
        .iter_mut()
        .find(|p| p.name == "prompt" && name == "pt")
    else {
        return Err(Error::Input(format!(
            "{}: --init-from warm-starts only the `pt` method (its parameter is the prompt \
             itself); the method is `{name}`",
            dir.display()
        )));
    };
    let shape = read_adapter_config(dir)?;
    let have = [shape.p, shape.c];
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
    Ok(())
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
