//! `fastpt predict`: a trained prompt applied to new inputs.
//!
//! The prompt comes from a [`PromptSource`]: a run folder (its config rebuilds the method, its
//! best or last parameters are loaded), an export folder (`prompt.safetensors`: the prompt rows
//! and, for DePT / EPT-MS, the update of the text embeddings, applied as they were computed), or
//! a PEFT prompt-tuning adapter folder (its rows). An export or adapter needs its base model:
//! `base_model_name_or_path` when that is a local folder, else `--model DIR`.
//!
//! Settings (batch size, input and generation lengths, label style, mode, task) come from the
//! flags, else from the run: the run folder itself, or the run folder an export / adapter sits
//! in (`RUN/export`, `RUN/export/adapter`), else the run config's defaults. With the run's own
//! settings, the predictions for the run's test inputs equal its `predictions.jsonl`: the same
//! batches (same size, same longest-first order) go through the same code.
//!
//! Inputs: records (JSONL / CSV / TSV / Parquet / Arrow, whatever `data::readers::read_records` reads) with an
//! `input` field (raw text, no template), or with `--task NAME` that task's fields (its
//! template applies, a built-in task's or a custom task's TOML; the label may be absent), or `-`: stdin, one raw input per line (JSON
//! Lines of the task's fields with `--task`).

use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use super::export::{read_adapter, ADAPTER_CONFIG, EXPORT_JSON, PROMPT_FILE};
use super::run_dir::MARKER;
use super::trainer::{open_run_model, run_eval_options, RunParams};
use crate::backend::Backend;
use crate::config::{RunConfig, MAX_BATCH_SIZE, MAX_SEQ_LEN};
use crate::data::readers::{read_jsonl, read_records, Lines, Records};
use crate::data::tasks::{
    builtin_spec, task_inputs, CustomInputs, LabelStyle, TaskSpec, TextExample,
};
use crate::data::tokenize::TextCodec;
use crate::error::{Error, Result};
use crate::eval::{option_nll, options_of, predict_generate, rank_best, EvalMode, EvalOptions};
use crate::model::hf::read_all_f64;
use crate::model::linear::Quant;
use crate::model::memory::{check_model, Workload};
use crate::model::{load_model, Backbone};
use crate::prompt::{Param, PromptMethod};

/// Where a trained prompt comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PromptSource {
    /// A run folder (config.toml and best / method.safetensors).
    Run(PathBuf),
    /// An export folder (prompt.safetensors + export.json).
    Export(PathBuf),
    /// A PEFT PROMPT_TUNING adapter folder (adapter_config.json + adapter_model.safetensors).
    Adapter(PathBuf),
}

impl PromptSource {
    /// Recognises `dir` by its files: a run's marker or config.toml, an export's
    /// prompt.safetensors, an adapter's adapter_config.json.
    pub fn detect(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::Input(format!(
                "{}: not a folder; give a run folder, an export folder or a PEFT adapter folder",
                dir.display()
            )));
        }
        if dir.join(MARKER).exists() || dir.join("config.toml").is_file() {
            Ok(PromptSource::Run(dir.to_path_buf()))
        } else if dir.join(PROMPT_FILE).is_file() {
            Ok(PromptSource::Export(dir.to_path_buf()))
        } else if dir.join(ADAPTER_CONFIG).is_file() {
            Ok(PromptSource::Adapter(dir.to_path_buf()))
        } else {
            Err(Error::Input(format!(
                "{}: neither a run folder (config.toml), an export folder ({PROMPT_FILE}) nor a \
                 PEFT adapter folder ({ADAPTER_CONFIG})",
                dir.display()
            )))
        }
    }

    pub fn dir(&self) -> &Path {
        match self {
            PromptSource::Run(d) | PromptSource::Export(d) | PromptSource::Adapter(d) => d,
        }
    }
}

/// What `fastpt predict` may set; `None`: the run's setting (see the module docs).
#[derive(Debug, Clone, Default)]
pub struct PredictOptions {
    /// A run's best (keep-best) or last parameters.
    pub params: Option<RunParams>,
    /// The base model folder of an export or adapter (or another copy of a run's model).
    pub model: Option<PathBuf>,
    /// A built-in task whose template applies to the inputs' fields.
    pub task: Option<String>,
    pub labels: Option<LabelStyle>,
    pub mode: Option<EvalMode>,
    /// Per-label log-likelihoods (rank classification over the task's label texts).
    pub scores: bool,
    pub batch_size: Option<usize>,
    pub max_len: Option<usize>,
    pub max_new_tokens: Option<usize>,
    pub quant: Option<Quant>,
}

/// The prompt rows (and update) of an export or adapter, as a method with no parameters: the
/// engine prepends them (and adds the update) exactly as it does a trained method's.
pub struct FixedPrompt<B: Backend> {
    p: usize,
    rows: B::Tensor, // (P, C)
    /// DePT / EPT-MS: (M, update (M, C)).
    update: Option<(usize, B::Tensor)>,
    stored: usize,
    params: Vec<Param<B>>,
}

impl<B: Backend> FixedPrompt<B> {
    /// `rows` (P, C) and optionally `update` (M, C), both row-major.
    pub fn new(be: &B, p: usize, c: usize, rows: Vec<f32>, update: Option<Vec<f32>>) -> Self {
        let m = update.as_ref().map(|u| u.len() / c.max(1));
        let stored = rows.len() + update.as_ref().map_or(0, Vec::len);
        FixedPrompt {
            p,
            rows: be.upload_f32(rows),
            update: m.zip(update).map(|(m, u)| (m, be.upload_f32(u))),
            stored,
            params: Vec::new(),
        }
    }
}

impl<B: Backend> PromptMethod<B> for FixedPrompt<B> {
    fn name(&self) -> &'static str {
        "export"
    }

    fn prompt_rows(&self) -> usize {
        self.p
    }

    fn update_rows(&self) -> Option<usize> {
        self.update.as_ref().map(|(m, _)| *m)
    }

    fn forward(&mut self, _be: &B) {}

    fn rows(&self) -> &B::Tensor {
        &self.rows
    }

    fn update(&self) -> Option<&B::Tensor> {
        self.update.as_ref().map(|(_, u)| u)
    }

    fn backward(&mut self, _be: &B, _d_rows: &B::Tensor, _d_update: Option<&B::Tensor>) {}

    fn params(&self) -> &[Param<B>] {
        &self.params
    }

    fn params_mut(&mut self) -> &mut [Param<B>] {
        &mut self.params
    }

    fn stored_params(&self) -> usize {
        self.stored
    }
}

/// A loaded prompt with its model, tokenizer, task and settings.
pub struct Predictor<B: Backend> {
    model: Backbone<B>,
    method: Box<dyn PromptMethod<B>>,
    codec: TextCodec,
    /// The task whose labels `--scores` and rank mode use (and whose template `--task` applies).
    spec: Option<TaskSpec>,
    /// `--task`: how input records become examples (None: records with an `input` field).
    pub inputs: Option<InputTask>,
    /// The label style of the task's targets.
    pub labels: LabelStyle,
    pub opts: EvalOptions,
    /// One line for the user: what was loaded and with which settings.
    pub describe: String,
}

/// How `--task` turns input records into examples: a built-in task's template, or a custom
/// task's (its TOML).
pub enum InputTask {
    Builtin(String),
    Custom(Box<CustomInputs>),
}

/// One prediction: the model's input text, the target when the input had a label, the
/// prediction, and with `--scores` each label's log-likelihood.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    pub input: String,
    pub target: Option<String>,
    pub prediction: String,
    /// (label, log-likelihood ≤ 0) in the task's label order.
    pub scores: Option<Vec<(String, f64)>>,
}

impl Prediction {
    /// One JSON line: input, [target,] prediction[, scores {label: log-likelihood}].
    pub fn to_json(&self) -> Value {
        let mut obj = Map::new();
        obj.insert("input".into(), json!(self.input));
        if let Some(t) = &self.target {
            obj.insert("target".into(), json!(t));
        }
        obj.insert("prediction".into(), json!(self.prediction));
        if let Some(scores) = &self.scores {
            let map: Map<String, Value> =
                scores.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
            obj.insert("scores".into(), Value::Object(map));
        }
        Value::Object(obj)
    }
}

/// The run folder `dir` belongs to: itself, or the folder holding an export (`RUN/export`) or
/// its adapter (`RUN/export/adapter`), when that has a config.toml.
fn enclosing_run(dir: &Path) -> Option<PathBuf> {
    dir.ancestors()
        .take(3)
        .find(|d| d.join("config.toml").is_file())
        .map(Path::to_path_buf)
}

/// A local model folder named by an export or adapter (`base_model_name_or_path`).
fn local_model(name: Option<&str>) -> Option<PathBuf> {
    let name = name?;
    let dir = PathBuf::from(name);
    dir.join("config.json").is_file().then_some(dir)
}

/// The base model folder: `--model`, else the source's local folder, else an error saying why.
fn base_model(flag: Option<&Path>, named: Option<&str>, file: &Path) -> Result<PathBuf> {
    if let Some(dir) = flag {
        return Ok(dir.to_path_buf());
    }
    local_model(named).ok_or_else(|| {
        Error::config(
            file,
            "base_model_name_or_path",
            format!(
                "is {}, not a local model folder (with config.json): give the base model with \
                 --model DIR",
                named.map_or("null".to_string(), |n| format!("{n:?}"))
            ),
        )
    })
}

/// The `base_model_name_or_path` of a JSON file (export.json, adapter_config.json).
fn named_base(file: &Path) -> Result<Option<String>> {
    let text = std::fs::read_to_string(file).map_err(|e| Error::io(file, e))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| Error::format(file, format!("not valid JSON: {e}")))?;
    Ok(v.get("base_model_name_or_path")
        .and_then(Value::as_str)
        .map(str::to_string))
}

/// What an export folder's prompt.safetensors holds.
struct ExportRows {
    p: usize,
    c: usize,
    rows: Vec<f32>,           // (P, C)
    update: Option<Vec<f32>>, // (M, C)
}

/// An export's rows `(P, C)` and update `(M, C)`, checked finite and of one width.
fn read_export(dir: &Path) -> Result<ExportRows> {
    let path = dir.join(PROMPT_FILE);
    let mut tensors = read_all_f64(&path)?;
    let Some((shape, rows)) = tensors.remove("prompt") else {
        return Err(Error::MissingTensors {
            path,
            count: 1,
            names: vec!["prompt".into()],
        });
    };
    let [p, c] = shape[..] else {
        return Err(Error::format(
            &path,
            format!("tensor `prompt` has shape {shape:?}; expected (P, C)"),
        ));
    };
    let update = match tensors.remove("update") {
        Some((ushape, u)) => {
            if ushape.len() != 2 || ushape[1] != c {
                return Err(Error::format(
                    &path,
                    format!("tensor `update` has shape {ushape:?}; expected (M, {c})"),
                ));
            }
            Some(u)
        }
        None => None,
    };
    let to_f32 = |name: &str, v: Vec<f64>| -> Result<Vec<f32>> {
        match v.iter().position(|x| !x.is_finite()) {
            Some(i) => Err(Error::format(
                &path,
                format!(
                    "tensor `{name}` row {} column {} is {}",
                    i / c.max(1),
                    i % c.max(1),
                    v[i]
                ),
            )),
            // The file holds f32: the round trip through f64 is exact.
            None => Ok(v.iter().map(|&x| x as f32).collect()),
        }
    };
    Ok(ExportRows {
        p,
        c,
        rows: to_f32("prompt", rows)?,
        update: update.map(|u| to_f32("update", u)).transpose()?,
    })
}

/// Loads the prompt of `source` with its model and settings (see the module docs). The memory
/// check runs before any weight is read.
pub fn load_predictor<B: Backend + 'static>(
    be: &B,
    source: &PromptSource,
    po: &PredictOptions,
) -> Result<Predictor<B>> {
    // Issue 19: the sizes the flags set have the run config's limits.
    for (flag, value, limit) in [
        ("--batch-size", po.batch_size, MAX_BATCH_SIZE),
        ("--max-len", po.max_len, MAX_SEQ_LEN),
        ("--max-new-tokens", po.max_new_tokens, MAX_SEQ_LEN),
    ] {
        if let Some(v) = value.filter(|&v| v == 0 || v > limit) {
            return Err(Error::Input(format!("{flag} {v}: expected 1 to {limit}")));
        }
    }
    let run_dir = enclosing_run(source.dir());
    let run_cfg = match &run_dir {
        Some(d) => Some(RunConfig::from_file(&d.join("config.toml"), &[])?),
        None => None,
    };
    let defaults = run_cfg.clone().unwrap_or_default();
    let mut opts = run_eval_options(&defaults);
    if let Some(n) = po.batch_size {
        opts.batch_size = n;
    }
    if let Some(n) = po.max_len {
        opts.max_len = n;
    }
    if let Some(n) = po.max_new_tokens {
        opts.max_new_tokens = n;
    }
    if let Some(mode) = po.mode {
        opts.mode = mode;
    }
    let labels = po.labels.unwrap_or(defaults.data.labels);
    let quant = po.quant.unwrap_or(defaults.quant);
    let (model, method, model_dir, what): (Backbone<B>, Box<dyn PromptMethod<B>>, PathBuf, String) =
        match source {
            PromptSource::Run(dir) => {
                if let Some(m) = &po.model {
                    return Err(Error::Input(format!(
                        "--model {}: a run folder loads the model its config.toml names;                          --model is for export and adapter folders",
                        m.display()
                    )));
                }
                let params = po.params.unwrap_or(RunParams::Best);
                let (cfg, model, method, path) = open_run_model(be, dir, params, Some(quant))?;
                let model_dir = PathBuf::from(&cfg.model);
                let what = format!("run {} ({})", dir.display(), path.display());
                (model, method, model_dir, what)
            }
            PromptSource::Export(dir) => {
                let named = named_base(&dir.join(EXPORT_JSON))?;
                let model_dir = base_model(
                    po.model.as_deref(),
                    named.as_deref(),
                    &dir.join(EXPORT_JSON),
                )?;
                let ExportRows { p, c, rows, update } = read_export(dir)?;
                let m = update.as_ref().map(|u| u.len() / c.max(1));
                // DePT / EPT-MS: inputs longer than the update cannot be embedded, so they are
                // cut to its length (as training cut them to train.max_len = M).
                if let Some(m) = m {
                    opts.max_len = opts.max_len.min(m);
                }
                let model = load_base(be, &model_dir, quant, p, &opts)?;
                if model.width() != c {
                    return Err(Error::format(
                        dir.join(PROMPT_FILE),
                        format!(
                            "the prompt rows are {c} wide, but the model {} is {} wide: not the \
                             model they were trained on",
                            model_dir.display(),
                            model.width()
                        ),
                    ));
                }
                let method: Box<dyn PromptMethod<B>> =
                    Box::new(FixedPrompt::new(be, p, c, rows, update));
                (
                    model,
                    method,
                    model_dir,
                    format!("export {}", dir.display()),
                )
            }
            PromptSource::Adapter(dir) => {
                let named = named_base(&dir.join(ADAPTER_CONFIG))?;
                let model_dir = base_model(
                    po.model.as_deref(),
                    named.as_deref(),
                    &dir.join(ADAPTER_CONFIG),
                )?;
                // The adapter's row count sizes the memory check; its width is checked below.
                let model = load_base(be, &model_dir, quant, 0, &opts)?;
                let (p, rows) = read_adapter(dir, model.width())?;
                let method: Box<dyn PromptMethod<B>> =
                    Box::new(FixedPrompt::new(be, p, model.width(), rows, None));
                (
                    model,
                    method,
                    model_dir,
                    format!("adapter {}", dir.display()),
                )
            }
        };
    let codec = TextCodec::load(&model_dir, &model)?;
    // The task: --task, else the run's. A custom task (its TOML) that takes its classes from
    // its train file reads it from the run's data folder, when the run is of that task.
    let task = po.task.clone().or_else(|| {
        run_cfg
            .as_ref()
            .map(|c| c.data.task.clone())
            .filter(|t| t != "synthetic")
    });
    let task = match task {
        Some(t) if t.ends_with(".toml") => {
            let data_dir = run_cfg
                .as_ref()
                .filter(|c| c.data.task == t)
                .and_then(|c| c.data.dir.as_deref());
            Some(InputTask::Custom(Box::new(CustomInputs::load(
                Path::new(&t),
                labels,
                data_dir,
            )?)))
        }
        Some(t) => Some(InputTask::Builtin(t)),
        None => None,
    };
    let spec = match &task {
        Some(InputTask::Custom(c)) => Some(c.spec().clone()),
        Some(InputTask::Builtin(t)) => Some(builtin_spec(t, labels)?),
        None => None,
    };
    // Input records are read with the task's template only when --task names it.
    let inputs = task.filter(|_| po.task.is_some());
    if let Some(s) = &spec {
        codec.check_classes(s)?;
    }
    let describe = format!(
        "{what} on {} | {} prompt rows | {} | batch {} | max_len {} | max_new_tokens {}{}",
        model_dir.display(),
        method.prompt_rows(),
        match opts.mode {
            EvalMode::Generate => "generate",
            EvalMode::Rank => "rank",
        },
        opts.batch_size,
        opts.max_len,
        opts.max_new_tokens,
        spec.as_ref()
            .map_or(String::new(), |s| format!(" | task {}", s.name)),
    );
    Ok(Predictor {
        model,
        method,
        codec,
        spec,
        inputs,
        labels,
        opts,
        describe,
    })
}

/// Checks the memory of prediction on `dir`'s model, then loads it.
fn load_base<B: Backend + 'static>(
    be: &B,
    dir: &Path,
    quant: Quant,
    prompt_rows: usize,
    opts: &EvalOptions,
) -> Result<Backbone<B>> {
    let work = Workload {
        forward_batch: opts.batch_size,
        generate_batch: opts.batch_size,
        prompt_rows,
        input_len: opts.max_len,
        target_len: opts.max_new_tokens,
        max_new_tokens: opts.max_new_tokens,
        ..Workload::default()
    };
    let source = dir.display().to_string();
    check_model(
        be,
        &source,
        quant,
        &work,
        &format!("fastpt predict on {source}"),
    )?;
    load_model(be, dir, quant)
}

/// The inputs of `path` (`-`: stdin): records with an `input` field, or with `task` the task's
/// fields (see the module docs). Errors name the file, line and field.
pub fn read_inputs(
    path: &Path,
    task: Option<&InputTask>,
    labels: LabelStyle,
) -> Result<Vec<TextExample>> {
    let stdin = path == Path::new("-");
    let raw = |input: String| TextExample {
        input,
        target: String::new(),
        answers: Vec::new(),
        options: Vec::new(),
        group: None,
    };
    let examples = match (stdin, task) {
        (true, None) => {
            // One raw input per line; blank lines are skipped.
            let mut lines = Lines::open(Path::new("/dev/stdin"))?;
            let mut out = Vec::new();
            while let Some(line) = lines.next_line()? {
                let text = line.text.trim_end_matches('\r');
                if !text.trim().is_empty() {
                    out.push(raw(text.to_string()));
                }
            }
            out
        }
        (true, Some(t)) => t.inputs(&read_jsonl(Path::new("/dev/stdin"))?, labels)?,
        (false, Some(t)) => t.inputs(&read_records(path)?, labels)?,
        (false, None) => input_field(&read_records(path)?)?,
    };
    if examples.is_empty() {
        return Err(Error::format(
            if stdin { Path::new("<stdin>") } else { path },
            "no inputs",
        ));
    }
    Ok(examples)
}

impl InputTask {
    /// The examples of `recs` under the task's template.
    fn inputs(&self, recs: &Records, labels: LabelStyle) -> Result<Vec<TextExample>> {
        match self {
            InputTask::Builtin(name) => task_inputs(name, recs, labels),
            InputTask::Custom(c) => c.inputs(recs),
        }
    }
}

/// Each record's `input` field (raw text); a `target` field, when present, is kept.
fn input_field(recs: &Records) -> Result<Vec<TextExample>> {
    recs.iter()
        .map(|(loc, rec)| {
            let v = rec.get("input").ok_or_else(|| {
                loc.err(
                    "input",
                    "missing: each record needs an `input` field (the model's input text), or \
                     give --task NAME to apply a task's template to its fields",
                )
            })?;
            let target = match rec.get("target") {
                Some(t) => loc.text(t, "target")?,
                None => String::new(),
            };
            Ok(TextExample {
                input: loc.text(v, "input")?,
                target,
                answers: Vec::new(),
                options: Vec::new(),
                group: None,
            })
        })
        .collect()
}

impl<B: Backend> Predictor<B> {
    /// Predicts every example (greedy generation, or rank classification over the task's
    /// labels), with each label's log-likelihood when `scores`.
    pub fn predict(
        &mut self,
        be: &B,
        examples: &[TextExample],
        scores: bool,
    ) -> Result<Vec<Prediction>> {
        let needs_labels = scores || self.opts.mode == EvalMode::Rank;
        let spec =
            match (&self.spec, needs_labels) {
                (Some(s), _) => s.clone(),
                (None, false) => TaskSpec {
                    name: "inputs".into(),
                    metrics: Vec::new(),
                    classes: Vec::new(),
                },
                (None, true) => return Err(Error::Input(
                    "--scores and --mode rank rank the task's label texts: give --task NAME (a \
                     built-in task with labels)"
                        .into(),
                )),
            };
        if needs_labels && spec.classes.is_empty() && examples.iter().any(|e| e.options.is_empty())
        {
            return Err(Error::Input(format!(
                "task {} has no label texts (a regression or free-text task): --scores and \
                 --mode rank need labels; predict with generation",
                spec.name
            )));
        }
        let method = Some(self.method.as_mut());
        let (predictions, nll) = match (self.opts.mode, scores) {
            (EvalMode::Generate, false) => (
                predict_generate(be, &self.model, method, &self.codec, examples, &self.opts)?,
                None,
            ),
            (EvalMode::Generate, true) => {
                let p =
                    predict_generate(be, &self.model, method, &self.codec, examples, &self.opts)?;
                let nll = option_nll(
                    be,
                    &self.model,
                    Some(self.method.as_mut()),
                    &self.codec,
                    &spec,
                    examples,
                    &self.opts,
                )?;
                (p, Some(nll))
            }
            (EvalMode::Rank, _) => {
                let nll = option_nll(
                    be,
                    &self.model,
                    method,
                    &self.codec,
                    &spec,
                    examples,
                    &self.opts,
                )?;
                let p = examples
                    .iter()
                    .zip(&nll)
                    .map(|(ex, n)| options_of(ex, &spec)[rank_best(n)].clone())
                    .collect();
                (p, scores.then_some(nll))
            }
        };
        Ok(examples
            .iter()
            .zip(predictions)
            .enumerate()
            .map(|(i, (ex, prediction))| Prediction {
                input: ex.input.clone(),
                target: (!ex.target.is_empty()).then(|| ex.target.clone()),
                prediction,
                scores: nll.as_ref().map(|n| {
                    options_of(ex, &spec)
                        .iter()
                        .zip(&n[i])
                        .map(|(label, &nll)| (label.clone(), -nll))
                        .collect()
                }),
            })
            .collect())
    }
}

/// The predictions as JSON Lines.
pub fn predictions_jsonl(predictions: &[Prediction]) -> String {
    let mut text = String::new();
    for p in predictions {
        text.push_str(&p.to_json().to_string());
        text.push('\n');
    }
    text
}
