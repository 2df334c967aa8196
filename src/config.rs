//! The run config of `fastpt run`: a TOML file (or the defaults alone), then `KEY=VALUE`
//! overrides from the command line, checked by [`RunConfig::validate`] before any work starts
//! and written back (defaults filled in) into the run folder by [`RunConfig::to_toml_string`].
//!
//! ```toml
//! model = "t5-base"        # a built-in shape (random weights) or a Hugging Face folder
//! seed = 0
//! out_dir = "runs/ept"
//! method = "ept"           # selects the [ept] section below; other method sections are ignored
//! quant = "none"           # or "nf4": the backbone's linear weights in 4 bits (QLoRA's NF4)
//!
//! [train]
//! steps = 30000
//! lr = 0.3
//!
//! [data]
//! task = "synthetic"
//!
//! [ept]
//! prompt_len = 60
//! rank = 30
//! ```
//!
//! Absent keys keep the defaults (the papers' settings, ../shared/methods.md); unknown keys are
//! errors that name the key, so a typo never silently trains with a default.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::backend::Backend;
use crate::data::tasks::{LabelStyle, TaskOptions, TASK_NAMES};
use crate::error::{Error, Result};
use crate::eval::EvalMode;
use crate::model::folder::{check_model_dir, check_tokenizer_file};
use crate::model::linear::Quant;
use crate::model::memory::{check_fits, estimate, ModelShape, Storage, Workload};
use crate::model::shapes::{builtin_shapes, is_builtin_shape};
use crate::prompt::config::{EptConfig, MethodConfig, METHOD_NAMES};

/// The method of a config that names none.
pub const DEFAULT_METHOD: &str = "ept";

/// What errors about a config built from overrides alone name as the file.
const NO_FILE: &str = "<command line>";

/// The top-level keys (besides the sections).
const TOP_KEYS: &[&str] = &["model", "seed", "out_dir", "method", "quant", "init_from"];

// Limits of the run's sizes (issue 19, rule 2): far above any paper's setting, so that a value
// past one is a typing mistake, refused naming the key before anything is sized from it. What
// fits within them is the memory estimate's question (`RunConfig::check_memory`).

/// train.steps: a hundred million optimiser steps.
pub const MAX_STEPS: usize = 100_000_000;
/// train.batch_size and data.eval_batch_size: rows of one batch.
pub const MAX_BATCH_SIZE: usize = 1 << 16;
/// train.grad_accum: micro-batches per optimiser step.
pub const MAX_GRAD_ACCUM: usize = 1 << 12;
/// train.max_len and train.max_target_len: tokens of an input or a target.
pub const MAX_SEQ_LEN: usize = 1 << 20;
/// data.train_examples and data.dev_examples: examples the synthetic task generates (held in
/// memory).
pub const MAX_SYNTHETIC_EXAMPLES: usize = 10_000_000;

/// The learning-rate schedule of the optimiser steps: transformers' `lr_scheduler_type`s of the
/// same names, step for step (train/schedule.rs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    /// Linear warmup from 0 over `warmup_steps`, then linear decay towards 0 at `steps`.
    #[default]
    Linear,
    /// Linear warmup, then half a cosine wave from the full rate towards 0 at `steps`.
    Cosine,
    /// Linear warmup over `warmup_steps`, then the full rate.
    ConstantWithWarmup,
    /// The full rate from the first step (no warmup: `warmup_steps` does not apply).
    Constant,
}

impl Schedule {
    /// Whether the schedule has a warmup (every one but `constant`).
    pub fn warms_up(self) -> bool {
        self != Schedule::Constant
    }
}

/// Section `[train]`: the optimiser (AdamW), its schedule, and the sequence limits.
///
/// transformers' `TrainingArguments` names are accepted for these keys ([`HF_ALIASES`]), and
/// resolve as a Trainer resolves them ([`TrainConfig::plan`]): `steps` (max_steps) wins over
/// `epochs` (num_train_epochs) unless it is 0, and `warmup_steps` over `warmup_ratio` unless it
/// is 0.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Optimiser steps; 0: from `epochs` (a config that gives `epochs` without `steps` reads
    /// as 0, as transformers' max_steps = -1).
    pub steps: usize,
    /// Passes over the training set (may be fractional), used when `steps` is 0: each pass is
    /// ceil(examples / (batch_size · grad_accum)) optimiser steps, and the run
    /// ceil(epochs × that) steps (transformers' num_train_epochs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epochs: Option<f64>,
    /// Examples per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimiser step.
    pub grad_accum: usize,
    /// Learning rate of the prompt group (prompts, reparameterisation networks, experts).
    pub lr: f64,
    /// Learning rate of the low-rank group (A, B of DePT and EPT-MS).
    pub lr_lowrank: f64,
    /// AdamW's decoupled weight decay.
    pub weight_decay: f64,
    /// Steps of linear warmup; 0 with `warmup_ratio` set: the ratio decides (a config that gives
    /// `warmup_ratio` without `warmup_steps` reads as 0, as transformers' default).
    pub warmup_steps: usize,
    /// Warmup as a fraction of the run's steps: ceil(ratio × steps) (transformers'
    /// `get_warmup_steps`), used when `warmup_steps` is 0.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warmup_ratio: Option<f64>,
    pub schedule: Schedule,
    /// Clip the global gradient norm to this; 0 disables clipping.
    pub max_grad_norm: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_eps: f64,
    /// Inputs are truncated to this many tokens (m, the length the low-rank updates span).
    pub max_len: usize,
    /// Targets are truncated to this many tokens.
    pub max_target_len: usize,
    /// Batch examples of similar length together (less padding).
    pub group_by_length: bool,
    /// Evaluate on the dev set every this many steps; 0: never.
    pub eval_every: usize,
    /// Write a checkpoint every this many steps; 0: only at the end (and on Ctrl-C).
    pub checkpoint_every: usize,
    /// Stop the run after this many dev evaluations in a row without a better keep-best value
    /// (transformers' EarlyStoppingCallback); 0: never.
    #[serde(skip_serializing_if = "is_zero")]
    pub early_stopping_patience: usize,
}

fn is_zero(v: &usize) -> bool {
    *v == 0
}

impl Default for TrainConfig {
    /// The papers' settings (methods.md, "Training defaults"): AdamW, prompt lr 0.3, low-rank lr
    /// 1e-4 (DePT), weight decay 1e-5, batch 16, 500 warmup steps, clip 1.0, 30k steps (EPT-MS),
    /// inputs of at most 256 tokens.
    fn default() -> Self {
        TrainConfig {
            steps: 30_000,
            epochs: None,
            batch_size: 16,
            grad_accum: 1,
            lr: 0.3,
            lr_lowrank: 1e-4,
            weight_decay: 1e-5,
            warmup_steps: 500,
            warmup_ratio: None,
            schedule: Schedule::Linear,
            max_grad_norm: 1.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_eps: 1e-8,
            max_len: 256,
            max_target_len: 128,
            group_by_length: false,
            eval_every: 1000,
            checkpoint_every: 1000,
            early_stopping_patience: 0,
        }
    }
}

/// The optimiser steps and warmup steps of a run, resolved from `train.steps` / `train.epochs`
/// and `train.warmup_steps` / `train.warmup_ratio` once the training set's size is known
/// ([`TrainConfig::plan`]).
#[derive(Debug, Clone, PartialEq)]
pub struct StepPlan {
    /// Optimiser steps of the run.
    pub steps: usize,
    /// Warmup steps (≤ `steps`).
    pub warmup: usize,
    /// Optimiser steps per pass over the training set: ceil(examples / (batch_size ·
    /// grad_accum)).
    pub per_epoch: usize,
    /// How `steps` was found, for the start banner (`3 epochs × 125 steps per epoch`).
    pub steps_from: String,
    /// How `warmup` was found (`train.warmup_steps`, `ceil(0.1 × 375)`, ...).
    pub warmup_from: String,
}

impl TrainConfig {
    /// The run's steps and warmup for a training set of `train_examples`, as a transformers
    /// Trainer finds them: `steps` when it is not 0 (max_steps wins over num_train_epochs),
    /// else ceil(epochs × per_epoch) with per_epoch = ceil(examples / (batch_size ·
    /// grad_accum)), so a fractional epoch rounds up to a whole step (`set_initial_training_values`);
    /// `warmup_steps` when it is not 0, else ceil(warmup_ratio × steps) (`get_warmup_steps`).
    /// The constant schedule has no warmup. Errors name the keys and values.
    pub fn plan(&self, train_examples: usize) -> Result<StepPlan> {
        let per_epoch = (train_examples.div_ceil(self.batch_size.max(1)))
            .div_ceil(self.grad_accum.max(1))
            .max(1);
        let (steps, steps_from) = match self.epochs {
            Some(epochs) if self.steps == 0 => {
                let steps = (epochs * per_epoch as f64).ceil();
                if !(steps >= 1.0 && steps <= MAX_STEPS as f64) {
                    return Err(Error::Input(format!(
                        "train.epochs = {epochs} × {per_epoch} steps per epoch ({train_examples} \
                         training examples in batches of train.batch_size = {} × \
                         train.grad_accum = {}) = {steps} steps, must be in 1..={MAX_STEPS} \
                         (MAX_STEPS)",
                        self.batch_size, self.grad_accum
                    )));
                }
                let steps = steps as usize;
                (
                    steps,
                    format!(
                        "train.epochs = {epochs} × {per_epoch} steps per epoch ({train_examples} \
                         examples / ({} × {}), rounded up)",
                        self.batch_size, self.grad_accum
                    ),
                )
            }
            Some(epochs) => (
                self.steps,
                format!(
                    "train.steps (train.epochs = {epochs} does not apply: steps win, as max_steps)"
                ),
            ),
            None => (self.steps, "train.steps".to_string()),
        };
        let (warmup, warmup_from) = match self.warmup_ratio {
            _ if !self.schedule.warms_up() => (0, "the constant schedule has none".to_string()),
            Some(ratio) if self.warmup_steps == 0 => {
                // ratio ≤ 1, so the warmup is at most the steps.
                let warmup = ((steps as f64 * ratio).ceil() as usize).min(steps);
                (
                    warmup,
                    format!("ceil(train.warmup_ratio = {ratio} × {steps} steps)"),
                )
            }
            Some(ratio) => (
                self.warmup_steps,
                format!(
                    "train.warmup_steps (train.warmup_ratio = {ratio} does not apply: warmup \
                     steps win, as transformers)"
                ),
            ),
            None => (self.warmup_steps, "train.warmup_steps".to_string()),
        };
        if warmup > steps {
            return Err(Error::Input(format!(
                "train.warmup_steps = {warmup} is more than the run's {steps} steps ({steps_from})"
            )));
        }
        Ok(StepPlan {
            steps,
            warmup,
            per_epoch,
            steps_from,
            warmup_from,
        })
    }
}

/// Section `[data]`: the task, where its files are, and how it is evaluated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    /// `synthetic` (built in, no files), a GLUE / SuperGLUE task (`rte`, `boolq`, ...; see
    /// `data::tasks`), or a custom task's TOML file (a path ending in `.toml`).
    pub task: String,
    /// The data folder of a task read from files.
    // TOML has no null: `None` is written as an absent key, which reads back as `None`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
    /// Training examples the synthetic task generates.
    pub train_examples: usize,
    /// Dev examples the synthetic task generates.
    pub dev_examples: usize,
    /// Label targets as `indices` ("0", the reference code's) or `words` ("entailment").
    pub labels: LabelStyle,
    /// Keep k training examples per class (k in all without classes); 0 keeps all.
    pub k_shot: usize,
    /// Training examples large tasks hold out as dev.
    pub dev_holdout: usize,
    /// Seed of the train / dev / test split and k-shot sampling (fixed, as in the papers' code,
    /// so runs with different `seed`s see the same splits).
    pub split_seed: u64,
    /// Predictions by greedy `generate` of the label text, or `rank` classification.
    pub eval: EvalMode,
    /// Rows per evaluation batch.
    pub eval_batch_size: usize,
    /// Evaluate the periodic dev checks on at most this many dev examples; 0: all. The final
    /// dev and test evaluations always use every example.
    pub max_eval_examples: usize,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            task: "synthetic".into(),
            dir: None,
            train_examples: 2000,
            dev_examples: 200,
            labels: LabelStyle::Indices,
            k_shot: 0,
            dev_holdout: 1000,
            split_seed: 42,
            eval: EvalMode::Generate,
            eval_batch_size: 32,
            max_eval_examples: 0,
        }
    }
}

impl DataConfig {
    /// Whether the task is the built-in synthetic one (no files, no tokenizer).
    pub fn is_synthetic(&self) -> bool {
        self.task == "synthetic"
    }

    /// The options the task loader takes.
    pub fn task_options(&self) -> TaskOptions {
        TaskOptions {
            seed: self.split_seed,
            k_shot: (self.k_shot > 0).then_some(self.k_shot),
            labels: self.labels,
            dev_holdout: self.dev_holdout,
        }
    }
}

/// The top-level keys of a run config, as read and written.
#[derive(Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct TopLevel {
    model: String,
    seed: u64,
    out_dir: PathBuf,
    method: String,
    quant: Quant,
    #[serde(skip_serializing_if = "Option::is_none")]
    init_from: Option<PathBuf>,
}

impl Default for TopLevel {
    fn default() -> Self {
        TopLevel {
            model: "t5-tiny".into(),
            seed: 0,
            out_dir: PathBuf::from("runs/run"),
            method: DEFAULT_METHOD.into(),
            quant: Quant::None,
            init_from: None,
        }
    }
}

/// Everything `fastpt run` needs to know about a run.
#[derive(Debug, Clone, PartialEq)]
pub struct RunConfig {
    /// A built-in shape name (random weights, see `model::shapes::builtin_shapes`) or a Hugging Face model folder.
    pub model: String,
    /// Seeds the weights of built-in shapes, the prompt inits, the data and its order.
    pub seed: u64,
    /// The run folder (config.toml, checkpoints, report).
    pub out_dir: PathBuf,
    /// How the backbone's frozen linear weights are stored (`quant = "nf4"`: 4-bit).
    pub quant: Quant,
    /// A PEFT prompt-tuning adapter folder whose rows start PT's prompt (`--init-from`); used
    /// by a new run only (a resume starts from its checkpoint).
    pub init_from: Option<PathBuf>,
    /// `method = "NAME"` and the options of its `[NAME]` section.
    pub method: MethodConfig,
    pub train: TrainConfig,
    pub data: DataConfig,
}

impl Default for RunConfig {
    fn default() -> Self {
        let top = TopLevel::default();
        RunConfig {
            model: top.model,
            seed: top.seed,
            out_dir: top.out_dir,
            quant: top.quant,
            init_from: top.init_from,
            method: MethodConfig::Ept(EptConfig::default()),
            train: TrainConfig::default(),
            data: DataConfig::default(),
        }
    }
}

impl RunConfig {
    /// Parses a run config from TOML text after applying `overrides` (`KEY.PATH=VALUE`);
    /// `path` only names the file in errors. Does not [`validate`](Self::validate).
    ///
    /// An override key is a dotted path into the TOML (`train.lr=0.1`, `seed=3`,
    /// `method=lamp`, `data.dir=data/rte`); `method.KEY` is the option `KEY` of the selected
    /// method (the section named by `method`, after the other overrides). The value is read as
    /// a TOML value (`8`, `0.1`, `true`, `"x"`), or else taken as a string, so bare words like
    /// `lamp` or `constant` need no quotes.
    pub fn from_toml_str(text: &str, path: &Path, overrides: &[String]) -> Result<Self> {
        let table: toml::Table = toml::from_str(text).map_err(|e| {
            let at = e
                .span()
                .map(|s| line_col(text, s.start))
                .map_or_else(String::new, |(line, col)| {
                    format!(" at line {line}, column {col}")
                });
            Error::format(path, format!("invalid TOML{at}: {}", e.message().trim()))
        })?;
        Self::from_table(table, path, overrides)
    }

    /// Reads and parses a run config file, then applies `overrides` (see
    /// [`from_toml_str`](Self::from_toml_str)). Does not [`validate`](Self::validate).
    pub fn from_file(path: &Path, overrides: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_toml_str(&text, path, overrides)
    }

    /// The defaults with `overrides` applied: `fastpt run` without `--config`. Errors name
    /// `<command line>` as the file. Does not [`validate`](Self::validate).
    pub fn from_overrides(overrides: &[String]) -> Result<Self> {
        Self::from_table(toml::Table::new(), Path::new(NO_FILE), overrides)
    }

    fn from_table(mut table: toml::Table, path: &Path, overrides: &[String]) -> Result<Self> {
        // The file's TrainingArguments names first (a key given twice in the file is an error),
        // then the overrides, whose keys are already fastpt's: an override replaces the file's
        // value whatever its spelling.
        resolve_aliases(&mut table, path)?;
        let overrides = overrides
            .iter()
            .map(|o| Override::parse(o))
            .collect::<Result<Vec<_>>>()?;
        // `method.KEY` follows the final `method`, so the plain overrides go first.
        let (into_method, plain): (Vec<_>, Vec<_>) = overrides
            .into_iter()
            .partition(|o| o.keys.len() > 1 && o.keys[0] == "method");
        for o in &plain {
            o.apply(&mut table, &o.keys)?;
        }
        fractional_warmup(&mut table, path)?;
        let method_name = match table.get("method") {
            None => DEFAULT_METHOD.to_string(),
            Some(toml::Value::String(name)) => name.clone(),
            Some(other) => {
                return Err(Error::config(
                    path,
                    "method",
                    format!(
                        "expected a method name ({}), found {other}",
                        METHOD_NAMES.join(", ")
                    ),
                ))
            }
        };
        for o in &into_method {
            let mut keys = o.keys.clone();
            keys[0] = method_name.clone();
            o.apply(&mut table, &keys)?;
        }

        // As transformers: epochs without steps mean steps from the epochs (max_steps = -1), a
        // warmup ratio without warmup steps means warmup from the ratio (warmup_steps = 0).
        if let Some(toml::Value::Table(train)) = table.get_mut("train") {
            for (given, absent) in [("epochs", "steps"), ("warmup_ratio", "warmup_steps")] {
                if train.contains_key(given) && !train.contains_key(absent) {
                    train.insert(absent.into(), toml::Value::Integer(0));
                }
            }
        }
        let train: TrainConfig = take_section(&mut table, path, "train")?;
        let data: DataConfig = take_section(&mut table, path, "data")?;
        // Every method section must be a table, but only the selected one is read: one file
        // may keep the options of several methods.
        let mut options = toml::Table::new();
        for name in METHOD_NAMES {
            match table.remove(*name) {
                Some(toml::Value::Table(t)) if *name == method_name => options = t,
                None | Some(toml::Value::Table(_)) => {}
                Some(other) => {
                    return Err(Error::config(
                        path,
                        *name,
                        format!("expected a [{name}] section, found {other}"),
                    ))
                }
            }
        }
        let top: TopLevel = deserialize_keys(path, None, table)?;
        let method = method_from_table(path, &top.method, options)?;
        Ok(RunConfig {
            model: top.model,
            seed: top.seed,
            out_dir: top.out_dir,
            quant: top.quant,
            init_from: top.init_from,
            method,
            train,
            data,
        })
    }

    /// Checks every value of the run (not the method's options against the model width: the
    /// trainer does that with `MethodConfig::validate` once the model is loaded). Errors name
    /// `path`, the key, the bad value and the rule.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let fail = |field: &str, msg: String| Err(Error::config(path, field, msg));
        let at_least_1 = |field: &str, v: usize| {
            if v == 0 {
                fail(field, "got 0, must be at least 1".into())
            } else {
                Ok(())
            }
        };
        let positive = |field: &str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                fail(field, format!("got {v}, must be a finite number > 0"))
            }
        };
        let non_negative = |field: &str, v: f64| {
            if v.is_finite() && v >= 0.0 {
                Ok(())
            } else {
                fail(field, format!("got {v}, must be a finite number ≥ 0"))
            }
        };
        let beta = |field: &str, v: f64| {
            if (0.0..1.0).contains(&v) {
                Ok(())
            } else {
                fail(field, format!("got {v}, must be in [0, 1)"))
            }
        };

        if self.model.trim().is_empty() {
            return fail(
                "model",
                format!(
                    "empty; give a built-in shape ({}) or a Hugging Face model folder",
                    builtin_shapes().collect::<Vec<_>>().join(", ")
                ),
            );
        }
        // TOML integers are signed 64-bit: a larger seed could not be written to config.toml.
        if self.seed > i64::MAX as u64 {
            return fail(
                "seed",
                format!("got {}, must be at most {}", self.seed, i64::MAX),
            );
        }
        if self.out_dir.as_os_str().is_empty() {
            return fail("out_dir", "empty; give the run folder".into());
        }

        // A size in 1..=limit, the limit named in the error.
        let size = |field: &str, v: usize, limit: usize, limit_name: &str| {
            at_least_1(field, v)?;
            if v > limit {
                return fail(
                    field,
                    format!("got {v}, must be at most {limit} ({limit_name})"),
                );
            }
            Ok(())
        };

        let t = &self.train;
        match t.epochs {
            // steps = 0: the steps come from the epochs (`plan`, once the data is read).
            Some(epochs) => {
                if !(epochs.is_finite() && epochs > 0.0 && epochs <= MAX_STEPS as f64) {
                    return fail(
                        "train.epochs",
                        format!(
                            "got {epochs}, must be a finite number > 0 and at most {MAX_STEPS} \
                             (MAX_STEPS)"
                        ),
                    );
                }
                if t.steps > 0 {
                    size("train.steps", t.steps, MAX_STEPS, "MAX_STEPS")?;
                }
            }
            None if t.steps == 0 => {
                return fail(
                    "train.steps",
                    "got 0, must be at least 1 (0 means: from train.epochs, which is not set)"
                        .into(),
                )
            }
            None => size("train.steps", t.steps, MAX_STEPS, "MAX_STEPS")?,
        }
        size(
            "train.batch_size",
            t.batch_size,
            MAX_BATCH_SIZE,
            "MAX_BATCH_SIZE",
        )?;
        size(
            "train.grad_accum",
            t.grad_accum,
            MAX_GRAD_ACCUM,
            "MAX_GRAD_ACCUM",
        )?;
        positive("train.lr", t.lr)?;
        positive("train.lr_lowrank", t.lr_lowrank)?;
        non_negative("train.weight_decay", t.weight_decay)?;
        if let Some(ratio) = t.warmup_ratio {
            if !(0.0..=1.0).contains(&ratio) {
                return fail(
                    "train.warmup_ratio",
                    format!("got {ratio}, must be in [0, 1]"),
                );
            }
        }
        // With steps from the epochs the bound is checked once they are known (`plan`); the
        // constant schedule has no warmup (its config.toml leaves warmup_steps out).
        if t.schedule.warms_up() && t.steps > 0 && t.warmup_steps > t.steps {
            return fail(
                "train.warmup_steps",
                format!(
                    "got {}, must be at most train.steps = {}",
                    t.warmup_steps, t.steps
                ),
            );
        }
        if t.early_stopping_patience > 0 && t.eval_every == 0 {
            return fail(
                "train.early_stopping_patience",
                format!(
                    "got {}, but train.eval_every = 0 never evaluates: give train.eval_every \
                     (patience counts dev evaluations)",
                    t.early_stopping_patience
                ),
            );
        }
        non_negative("train.max_grad_norm", t.max_grad_norm)?;
        beta("train.adam_beta1", t.adam_beta1)?;
        beta("train.adam_beta2", t.adam_beta2)?;
        positive("train.adam_eps", t.adam_eps)?;
        size("train.max_len", t.max_len, MAX_SEQ_LEN, "MAX_SEQ_LEN")?;
        size(
            "train.max_target_len",
            t.max_target_len,
            MAX_SEQ_LEN,
            "MAX_SEQ_LEN",
        )?;

        let d = &self.data;
        if d.task.trim().is_empty() {
            return fail(
                "data.task",
                "empty; give a task name such as \"synthetic\"".into(),
            );
        }
        if d.is_synthetic() {
            if d.train_examples == 0 {
                return fail(
                    "data.train_examples",
                    "got 0, the synthetic task needs at least 1".into(),
                );
            }
            if d.dev_examples == 0 {
                return fail(
                    "data.dev_examples",
                    "got 0, the synthetic task needs at least 1 (the dev loss picks the best \
                     checkpoint)"
                        .into(),
                );
            }
            for (field, v) in [
                ("data.train_examples", d.train_examples),
                ("data.dev_examples", d.dev_examples),
            ] {
                size(field, v, MAX_SYNTHETIC_EXAMPLES, "MAX_SYNTHETIC_EXAMPLES")?;
            }
        } else {
            let custom = d.task.ends_with(".toml");
            if !custom && !TASK_NAMES.contains(&d.task.as_str()) {
                return fail(
                    "data.task",
                    format!(
                        "unknown task {:?}; give synthetic, one of {}, or a custom task's .toml file",
                        d.task,
                        TASK_NAMES.join(", ")
                    ),
                );
            }
            match &d.dir {
                None => {
                    return fail(
                        "data.dir",
                        format!("task {:?} reads files: give their folder", d.task),
                    )
                }
                Some(dir) if !dir.is_dir() => {
                    return fail("data.dir", format!("{} is not a folder", dir.display()))
                }
                Some(_) => {}
            }
            if is_builtin_shape(&self.model) {
                return fail(
                    "model",
                    format!(
                        "{:?} is a built-in shape without a tokenizer; a text task needs a \
                         Hugging Face model folder with tokenizer.json",
                        self.model
                    ),
                );
            }
            // A Hub id, a pickle-only or SentencePiece-only folder: said before any work.
            let dir = Path::new(&self.model);
            check_model_dir(dir)?;
            check_tokenizer_file(dir)?;
        }
        size(
            "data.eval_batch_size",
            d.eval_batch_size,
            MAX_BATCH_SIZE,
            "MAX_BATCH_SIZE",
        )?;
        Ok(())
    }

    /// Estimates the memory of this run (model/memory.rs: the weights at their storage type, a
    /// training step at train.batch_size, the dev loss and generation at the evaluation batch,
    /// the method with its gradients and AdamW state) from the model's config alone, and
    /// refuses it when `be` has less available. Checks the method's sizes first (their counts
    /// enter the estimate). Nothing is loaded or allocated.
    pub fn check_memory<B: Backend>(&self, be: &B) -> Result<()> {
        let model = ModelShape::of_model(&self.model)?;
        let (d, m) = (model.width(), self.train.max_len);
        self.method.validate(d, m)?;
        let t = &self.train;
        // A batch larger than the training set is cut to the set (the batcher says so); the
        // synthetic task's size is known before anything is read.
        let train_batch = if self.data.is_synthetic() {
            t.batch_size.min(self.data.train_examples)
        } else {
            t.batch_size
        };
        let work = Workload {
            train_batch,
            // The dev loss runs in chunks of 32 rows, rank classification at eval_batch_size.
            forward_batch: self.data.eval_batch_size.max(32),
            generate_batch: self.data.eval_batch_size,
            prompt_rows: self.method.prompt_rows(),
            input_len: t.max_len,
            target_len: t.max_target_len,
            max_new_tokens: t.max_target_len,
            method_params: self.method.param_counts(d, m).train as u128,
        };
        let need = estimate(&model, Storage::of(be, self.quant), &work);
        check_fits(
            be,
            &need,
            &format!(
                "the run ({}, method {}, train.batch_size {}, train.max_len {}, \
                 train.max_target_len {}, data.eval_batch_size {})",
                self.model,
                self.method.name(),
                t.batch_size,
                t.max_len,
                t.max_target_len,
                self.data.eval_batch_size
            ),
        )
    }

    /// The config with every default filled in, as TOML: echoed into the run folder, and
    /// [`from_toml_str`](Self::from_toml_str) of it gives an equal `RunConfig`.
    pub fn to_toml_string(&self) -> String {
        let top = TopLevel {
            model: self.model.clone(),
            seed: self.seed,
            out_dir: self.out_dir.clone(),
            method: self.method.name().to_string(),
            quant: self.quant,
            init_from: self.init_from.clone(),
        };
        let name = self.method.name();
        let mut text =
            String::from("# fastpt run config: the effective values, defaults filled in.\n");
        text.push_str(&to_toml(&top, "top-level keys"));
        text.push_str("\n[train]\n");
        text.push_str(&to_toml_without(
            &self.train,
            "[train]",
            &self.train.keys_not_applying(),
        ));
        text.push_str("\n[data]\n");
        // A synthetic task's `dir` is left out (as every key that does not apply).
        let mut data = self.data.clone();
        if data.is_synthetic() {
            data.dir = None;
        }
        text.push_str(&to_toml_without(
            &data,
            "[data]",
            self.data.keys_not_applying(),
        ));
        text.push_str(&format!("\n[{name}]\n"));
        text.push_str(&self.method.options_toml());
        text
    }
}

impl TrainConfig {
    /// The keys whose values do not apply, left out of the effective config: `epochs` when
    /// `steps` is set, `steps` when it comes from `epochs`, `warmup_steps` or `warmup_ratio`
    /// when the other decides, both without a warmup (the constant schedule).
    fn keys_not_applying(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        match self.epochs {
            Some(_) if self.steps == 0 => out.push("steps"),
            Some(_) => out.push("epochs"),
            None => {}
        }
        match self.warmup_ratio {
            _ if !self.schedule.warms_up() => out.extend(["warmup_steps", "warmup_ratio"]),
            Some(_) if self.warmup_steps == 0 => out.push("warmup_steps"),
            Some(_) => out.push("warmup_ratio"),
            None => {}
        }
        out
    }
}

impl DataConfig {
    /// The keys that do not apply to the task, left out of the effective config: the built-in
    /// synthetic task reads no files and is judged by its dev loss alone (only its sizes
    /// apply); a task read from files has no generated sizes.
    fn keys_not_applying(&self) -> &'static [&'static str] {
        if self.is_synthetic() {
            &[
                "dir",
                "labels",
                "k_shot",
                "dev_holdout",
                "split_seed",
                "eval",
                "eval_batch_size",
                "max_eval_examples",
            ]
        } else {
            &["train_examples", "dev_examples"]
        }
    }
}

/// `value` as TOML (its fields in their order) without the top-level keys `drop`.
fn to_toml_without<T: Serialize>(value: &T, what: &str, drop: &[&str]) -> String {
    let text = to_toml(value, what);
    let mut out = String::with_capacity(text.len());
    // Inside a multi-line string value: (its delimiter, whether its key is dropped).
    let mut open: Option<(&str, bool)> = None;
    for line in text.lines() {
        let (skip, delimiter) = match open {
            Some((delim, skip)) => {
                if line.contains(delim) {
                    open = None;
                }
                (skip, None)
            }
            None => {
                let key = line.split(" = ").next().unwrap_or("").trim();
                let value = line.split_once(" = ").map_or("", |(_, v)| v);
                let delimiter = ["\"\"\"", "'''"]
                    .into_iter()
                    .find(|d| value.starts_with(d) && !value[d.len()..].contains(d));
                (drop.contains(&key), delimiter)
            }
        };
        if let Some(d) = delimiter {
            open = Some((d, skip));
        }
        if !skip {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// `value` as TOML; what cannot be written (a seed above i64::MAX, a path that is not UTF-8)
/// becomes a comment, since this text is only echoed for the user and `validate` rejects the
/// first, while the second cannot come from a TOML file.
fn to_toml<T: Serialize>(value: &T, what: &str) -> String {
    toml::to_string(value).unwrap_or_else(|e| format!("# {what}: not representable in TOML: {e}\n"))
}

/// One `KEY.PATH=VALUE` override.
#[derive(Debug, Clone)]
struct Override {
    /// The override as given, for messages.
    text: String,
    keys: Vec<String>,
    value: toml::Value,
}

impl Override {
    fn parse(text: &str) -> Result<Self> {
        let bad = |why: &str| {
            Err(Error::Input(format!(
                "override `{text}`: {why}; expected KEY=VALUE, e.g. train.lr=0.1 or method.rank=8"
            )))
        };
        let Some((key, value)) = text.split_once('=') else {
            return bad("no `=`");
        };
        let key = key.trim();
        if key.is_empty() {
            return bad("empty key");
        }
        let keys: Vec<String> = key.split('.').map(|k| k.trim().to_string()).collect();
        if keys.iter().any(String::is_empty) {
            return bad("empty part in the key");
        }
        let keys = canonical_keys(keys);
        Ok(Override {
            text: text.to_string(),
            keys,
            value: parse_value(value.trim()),
        })
    }

    /// Sets `keys` (this override's keys, or them with `method` resolved) in `table`.
    fn apply(&self, table: &mut toml::Table, keys: &[String]) -> Result<()> {
        let Some((last, parents)) = keys.split_last() else {
            return Err(Error::Input(format!("override `{}`: empty key", self.text)));
        };
        let mut table = table;
        for (i, key) in parents.iter().enumerate() {
            let entry = table
                .entry(key.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            table = match entry {
                toml::Value::Table(t) => t,
                other => {
                    return Err(Error::Input(format!(
                        "override `{}`: `{}` is {}, not a section",
                        self.text,
                        keys[..=i].join("."),
                        other.type_str()
                    )))
                }
            };
        }
        table.insert(last.clone(), self.value.clone());
        Ok(())
    }
}

/// transformers' `TrainingArguments` names that fastpt reads as its own keys: (TrainingArguments'
/// name, fastpt's key, `train.KEY` or a top-level key). They are accepted at the top level (as
/// TrainingArguments is flat) and in `[train]`, in a file and in `--set`; the config.toml a
/// run writes uses fastpt's names. `early_stopping_patience` is EarlyStoppingCallback's.
pub const HF_ALIASES: &[(&str, &str)] = &[
    ("learning_rate", "train.lr"),
    ("per_device_train_batch_size", "train.batch_size"),
    ("gradient_accumulation_steps", "train.grad_accum"),
    ("max_steps", "train.steps"),
    ("num_train_epochs", "train.epochs"),
    ("warmup_steps", "train.warmup_steps"),
    ("warmup_ratio", "train.warmup_ratio"),
    ("lr_scheduler_type", "train.schedule"),
    ("weight_decay", "train.weight_decay"),
    ("max_grad_norm", "train.max_grad_norm"),
    ("adam_beta1", "train.adam_beta1"),
    ("adam_beta2", "train.adam_beta2"),
    ("adam_epsilon", "train.adam_eps"),
    ("eval_steps", "train.eval_every"),
    ("save_steps", "train.checkpoint_every"),
    ("output_dir", "out_dir"),
    ("seed", "seed"),
    ("group_by_length", "train.group_by_length"),
    ("early_stopping_patience", "train.early_stopping_patience"),
];

/// fastpt's key of TrainingArguments' name `name`.
fn hf_alias(name: &str) -> Option<&'static str> {
    HF_ALIASES
        .iter()
        .find(|(hf, _)| *hf == name)
        .map(|(_, key)| *key)
}

/// An override's keys with a TrainingArguments name (`learning_rate`, `train.learning_rate`)
/// replaced by fastpt's key (`train.lr`).
fn canonical_keys(keys: Vec<String>) -> Vec<String> {
    let name = match keys.as_slice() {
        [name] => name,
        [section, name] if section == "train" => name,
        _ => return keys,
    };
    match hf_alias(name) {
        Some(key) => key.split('.').map(String::from).collect(),
        None => keys,
    }
}

/// Moves each TrainingArguments name of `table` (at the top level or in `[train]`) to fastpt's
/// key. One key given twice (two spellings, or one name in both places) is an error naming
/// both.
fn resolve_aliases(table: &mut toml::Table, path: &Path) -> Result<()> {
    // (how the key was written, fastpt's key, value)
    let mut moved: Vec<(String, &'static str, toml::Value)> = Vec::new();
    for &(hf, key) in HF_ALIASES {
        if key != hf {
            if let Some(value) = table.remove(hf) {
                moved.push((hf.to_string(), key, value));
            }
        }
    }
    if let Some(toml::Value::Table(train)) = table.get_mut("train") {
        for &(hf, key) in HF_ALIASES {
            if key.strip_prefix("train.") != Some(hf) {
                if let Some(value) = train.remove(hf) {
                    moved.push((format!("train.{hf}"), key, value));
                }
            }
        }
    }
    let mut placed: Vec<(&str, String)> = Vec::new();
    for (spelling, key, value) in moved {
        let (target, name) = match key.split_once('.') {
            None => (&mut *table, key),
            Some((section, name)) => {
                let entry = table
                    .entry(section)
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()));
                match entry {
                    toml::Value::Table(t) => (t, name),
                    other => {
                        return Err(Error::config(
                            path,
                            section,
                            format!("expected a [{section}] section, found {other}"),
                        ))
                    }
                }
            }
        };
        if target.contains_key(name) {
            let first = placed
                .iter()
                .find(|(k, _)| *k == key)
                .map_or_else(|| format!("`{key}`"), |(_, s)| format!("`{s}`"));
            return Err(Error::config(
                path,
                key,
                format!(
                    "given twice, as {first} and as `{spelling}` (TrainingArguments' name of \
                     {key}); keep one"
                ),
            ));
        }
        target.insert(name.to_string(), value);
        placed.push((key, spelling));
    }
    Ok(())
}

/// transformers 5 folds `warmup_ratio` into `warmup_steps`: a float in [0, 1) is the ratio of
/// the run's steps (`get_warmup_steps`). Such a value becomes `train.warmup_ratio`; a whole
/// float (`10.0`) becomes the integer; anything else is left for the type check to name.
fn fractional_warmup(table: &mut toml::Table, path: &Path) -> Result<()> {
    let Some(toml::Value::Table(train)) = table.get_mut("train") else {
        return Ok(());
    };
    let Some(&toml::Value::Float(x)) = train.get("warmup_steps") else {
        return Ok(());
    };
    if (0.0..1.0).contains(&x) {
        if let Some(ratio) = train.get("warmup_ratio") {
            return Err(Error::config(
                path,
                "train.warmup_steps",
                format!(
                    "{x} is a ratio of the steps (transformers 5's spelling of warmup_ratio), \
                     and train.warmup_ratio = {ratio} is given too; keep one"
                ),
            ));
        }
        train.insert("warmup_steps".into(), toml::Value::Integer(0));
        train.insert("warmup_ratio".into(), toml::Value::Float(x));
    } else if x >= 1.0 && x.fract() == 0.0 && x < 9.0e15 {
        train.insert("warmup_steps".into(), toml::Value::Integer(x as i64));
    }
    Ok(())
}

/// "; did you mean `KEY`?" for an unknown key `key`: the closest of `candidates` by edit
/// distance (or one that contains it or that it contains), none when nothing is close. A
/// TrainingArguments name is shown with the key it stands for.
fn did_you_mean<'c>(key: &str, candidates: impl IntoIterator<Item = &'c str>) -> String {
    let low = key.to_lowercase();
    let close = |c: &str| {
        let d = edit_distance(&low, &c.to_lowercase());
        let contains = low.len() >= 4 && c.len() >= 4 && (c.contains(&low) || low.contains(c));
        (d <= (low.chars().count() / 3).max(2) || contains).then_some(d)
    };
    let best = candidates
        .into_iter()
        .filter(|c| *c != key)
        .filter_map(|c| close(c).map(|d| (d, c)))
        .min_by_key(|(d, _)| *d);
    match best {
        None => String::new(),
        Some((_, c)) => match hf_alias(c).filter(|k| *k != c) {
            Some(k) => format!("; did you mean `{c}` (TrainingArguments' name of {k})?"),
            None => format!("; did you mean `{c}`?"),
        },
    }
}

/// Levenshtein distance of `a` and `b` (characters).
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    // (|b| + 1): the previous row of the table.
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diag = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let up = row[j + 1];
            row[j + 1] = (up + 1).min(row[j] + 1).min(diag + usize::from(ca != *cb));
            diag = up;
        }
    }
    row[b.len()]
}

/// The field names a serde "unknown field `x`, expected one of `a`, `b`" message lists.
fn expected_fields(msg: &str) -> Vec<&str> {
    let Some((_, list)) = msg.split_once("expected") else {
        return Vec::new();
    };
    list.split('`').skip(1).step_by(2).collect()
}

/// The right-hand side of an override: a TOML value if it is one, else the text as a string.
fn parse_value(text: &str) -> toml::Value {
    if let Ok(mut doc) = toml::from_str::<toml::Table>(&format!("v = {text}")) {
        // More than one key: the text held a newline and more TOML; keep it verbatim instead.
        if doc.len() == 1 {
            match doc.remove("v") {
                // No key takes a date; `out_dir=2024-05-01` means the folder name.
                Some(toml::Value::Datetime(_)) | None => {}
                Some(value) => return value,
            }
        }
    }
    toml::Value::String(text.to_string())
}

/// Removes section `name` from `table` and reads it (absent: the defaults).
fn take_section<T: DeserializeOwned + Default>(
    table: &mut toml::Table,
    path: &Path,
    name: &str,
) -> Result<T> {
    match table.remove(name) {
        None => Ok(T::default()),
        Some(toml::Value::Table(t)) => deserialize_keys(path, Some(name), t),
        Some(other) => Err(Error::config(
            path,
            name,
            format!("expected a [{name}] section, found {other}"),
        )),
    }
}

/// Reads `table` (the keys of `section`, or the top level) into `T`; errors name the key.
fn deserialize_keys<T: DeserializeOwned>(
    path: &Path,
    section: Option<&str>,
    table: toml::Table,
) -> Result<T> {
    match table.clone().try_into::<T>() {
        Ok(value) => Ok(value),
        Err(e) => {
            let key = culprit(&table, |one| one.try_into::<T>().is_err());
            let raw = e.message().trim();
            // An unknown key: the closest known one (and in [train], TrainingArguments' names).
            let suggestion = match (section, key) {
                (Some(section), Some(key)) if raw.starts_with("unknown field") => {
                    let hf = HF_ALIASES.iter().map(|(hf, _)| *hf);
                    let hf = hf.filter(|_| section == "train");
                    did_you_mean(key, expected_fields(raw).into_iter().chain(hf))
                }
                _ => String::new(),
            };
            let msg = format!(
                "{raw}{}{suggestion}",
                key.map_or(String::new(), |k| float_hint(&table[k]))
            );
            Err(match (section, key) {
                (None, Some(key)) if !TOP_KEYS.contains(&key) => Error::config(
                    path,
                    key,
                    format!(
                        "unknown key{}; the top level holds {} and the sections [train], [data], \
                         {}, and TrainingArguments' names ({})",
                        did_you_mean(
                            key,
                            TOP_KEYS
                                .iter()
                                .chain(&["train", "data"])
                                .chain(METHOD_NAMES)
                                .copied()
                                .chain(HF_ALIASES.iter().map(|(hf, _)| *hf))
                        ),
                        TOP_KEYS.join(", "),
                        METHOD_NAMES
                            .iter()
                            .map(|m| format!("[{m}]"))
                            .collect::<Vec<_>>()
                            .join(", "),
                        HF_ALIASES
                            .iter()
                            .map(|(hf, _)| *hf)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ),
                (None, Some(key)) => Error::config(path, key, msg),
                (None, None) => Error::config(path, "(top level)", msg),
                (Some(section), Some(key)) => Error::config(path, format!("{section}.{key}"), msg),
                (Some(section), None) => Error::config(path, section, msg),
            })
        }
    }
}

/// A hint for an integral float where an integer is expected (`1e9` and `8.0` are floats in
/// TOML, and serde does not convert them); empty for any other value.
fn float_hint(value: &toml::Value) -> String {
    match value {
        toml::Value::Float(x) if x.fract() == 0.0 => format!(
            " ({x:e} is a floating-point number in TOML: write the integer without an exponent or \
             decimal point{})",
            if x.abs() <= 1e15 {
                format!(", e.g. {x:.0}")
            } else {
                String::new()
            }
        ),
        _ => String::new(),
    }
}

/// The method `name` with the options of its section.
fn method_from_table(path: &Path, name: &str, options: toml::Table) -> Result<MethodConfig> {
    if !METHOD_NAMES.contains(&name) {
        return Err(Error::config(
            path,
            "method",
            format!(
                "unknown method `{name}`; methods: {}",
                METHOD_NAMES.join(", ")
            ),
        ));
    }
    let parse = |t: &toml::Table| -> Result<MethodConfig> {
        let text = toml::to_string(t).map_err(|e| Error::format(path, format!("[{name}]: {e}")))?;
        MethodConfig::from_toml(name, &text)
    };
    parse(&options).map_err(|e| {
        let key = culprit(&options, |one| parse(&one).is_err());
        let field = match key {
            Some(key) => format!("{name}.{key}"),
            None => name.to_string(),
        };
        // from_toml's message starts with "[name] options: "; the field says that already.
        let msg = e.to_string();
        let prefix = format!("[{name}] options: ");
        let msg = msg.strip_prefix(&prefix).unwrap_or(&msg);
        let hint = key.map_or(String::new(), |k| float_hint(&options[k]));
        let suggestion = match key {
            Some(key) if msg.starts_with("unknown field") => {
                did_you_mean(key, expected_fields(msg))
            }
            _ => String::new(),
        };
        Error::config(path, field, format!("{msg}{hint}{suggestion}"))
    })
}

/// The first key of `table` that fails alone: serde's messages for a wrong type do not say
/// which key holds it.
fn culprit(table: &toml::Table, fails: impl Fn(toml::Table) -> bool) -> Option<&str> {
    table
        .iter()
        .find(|(key, value)| {
            let mut one = toml::Table::new();
            one.insert((*key).clone(), (*value).clone());
            fails(one)
        })
        .map(|(key, _)| key.as_str())
}

/// The keys a resumed run may change: they do not alter the steps already taken (a longer
/// `train.steps` extends the run, a larger `train.early_stopping_patience` lets an early-stopped
/// run go on; `out_dir` follows a moved folder).
pub const RESUME_MAY_CHANGE: &[&str] = &[
    "train.steps",
    "train.epochs",
    "train.eval_every",
    "train.checkpoint_every",
    // A run early stopping ended goes on with more patience (or none).
    "train.early_stopping_patience",
    "out_dir",
];

/// One key whose value differs between two configs: (dotted key, old value, new value), the
/// values as TOML text (`"absent"` when a side lacks the key).
pub type KeyChange = (String, String, String);

impl RunConfig {
    /// The differences of `new` from `self` (a run's stored config) for a resume, split into
    /// the keys that may change ([`RESUME_MAY_CHANGE`]) and the others, each sorted by key. The
    /// method's options are named by their section (`ept.rank`).
    pub fn resume_changes(&self, new: &RunConfig) -> (Vec<KeyChange>, Vec<KeyChange>) {
        let (old, new) = (flat_keys(self), flat_keys(new));
        let mut keys: Vec<&String> = old.keys().chain(new.keys()).collect();
        keys.sort();
        keys.dedup();
        let show = |v: Option<&String>| v.cloned().unwrap_or_else(|| "absent".into());
        let (mut may, mut refused) = (Vec::new(), Vec::new());
        for key in keys {
            let (a, b) = (old.get(key), new.get(key));
            if a == b {
                continue;
            }
            let change = (key.clone(), show(a), show(b));
            if RESUME_MAY_CHANGE.contains(&key.as_str()) {
                may.push(change);
            } else {
                refused.push(change);
            }
        }
        (may, refused)
    }
}

/// Every key of the config's TOML form as `section.key` → the value as TOML text.
fn flat_keys(cfg: &RunConfig) -> std::collections::BTreeMap<String, String> {
    let mut out = std::collections::BTreeMap::new();
    // to_toml_string reads back with from_toml_str, so it parses; an error leaves the map empty
    // and every key of the other side then shows as a difference.
    let table: toml::Table = toml::from_str(&cfg.to_toml_string()).unwrap_or_default();
    for (key, value) in table {
        match value {
            toml::Value::Table(section) => {
                for (k, v) in section {
                    out.insert(format!("{key}.{k}"), v.to_string());
                }
            }
            other => {
                out.insert(key, other.to_string());
            }
        }
    }
    out
}

/// 1-based line and column of byte `offset` in `text`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prompt::config::{
        DeptConfig, DptConfig, LampConfig, PTuningConfig, PtConfig, ResidualConfig, XptConfig,
    };

    fn path() -> &'static Path {
        Path::new("run.toml")
    }

    fn sets(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn defaults_are_the_documented_values() {
        let t = TrainConfig::default();
        assert_eq!(
            (t.steps, t.batch_size, t.grad_accum, t.warmup_steps),
            (30_000, 16, 1, 500)
        );
        assert_eq!((t.lr, t.lr_lowrank, t.weight_decay), (0.3, 1e-4, 1e-5));
        assert_eq!(t.schedule, Schedule::Linear);
        assert_eq!(t.max_grad_norm, 1.0);
        assert_eq!((t.adam_beta1, t.adam_beta2, t.adam_eps), (0.9, 0.999, 1e-8));
        assert_eq!((t.max_len, t.max_target_len), (256, 128));
        assert!(!t.group_by_length);
        assert_eq!((t.eval_every, t.checkpoint_every), (1000, 1000));
        let d = DataConfig::default();
        assert_eq!((d.task.as_str(), d.dir.as_deref()), ("synthetic", None));
        assert_eq!((d.train_examples, d.dev_examples), (2000, 200));

        let cfg = RunConfig::from_overrides(&[]).unwrap();
        assert_eq!(cfg, RunConfig::default());
        assert_eq!(cfg.model, "t5-tiny");
        assert_eq!(cfg.seed, 0);
        assert_eq!(cfg.out_dir, PathBuf::from("runs/run"));
        assert_eq!(cfg.method, MethodConfig::Ept(EptConfig::default()));
        // An empty file is the defaults too.
        assert_eq!(RunConfig::from_toml_str("", path(), &[]).unwrap(), cfg);
        cfg.validate(path()).unwrap();
    }

    #[test]
    fn reads_every_section_and_ignores_other_methods() {
        let text = r#"
model = "t5-base"
seed = 7
out_dir = "runs/x"
method = "lamp"
[train]
steps = 100
lr = 1          # an integer where a float goes is fine
schedule = "constant"
[data]
task = "rte"
dir = "data/rte"
[lamp]
rank = 4
pool = 2
[ept]
rank = 99
bogus = "ignored with the section"
"#;
        let cfg = RunConfig::from_toml_str(text, path(), &[]).unwrap();
        assert_eq!((cfg.model.as_str(), cfg.seed), ("t5-base", 7));
        assert_eq!(cfg.out_dir, PathBuf::from("runs/x"));
        assert_eq!((cfg.train.steps, cfg.train.lr), (100, 1.0));
        assert_eq!(cfg.train.schedule, Schedule::Constant);
        assert_eq!(cfg.train.batch_size, 16);
        assert_eq!(cfg.data.task, "rte");
        assert_eq!(cfg.data.dir, Some(PathBuf::from("data/rte")));
        assert_eq!(
            cfg.method,
            MethodConfig::Lamp(LampConfig {
                rank: 4,
                pool: 2,
                ..LampConfig::default()
            })
        );
    }

    #[test]
    fn overrides_nested_top_level_and_method_pseudo_section() {
        let text = "method = \"dept\"\n[dept]\nrank = 20\n[train]\nsteps = 50\n";
        let cfg = RunConfig::from_toml_str(
            text,
            path(),
            &sets(&[
                "train.lr=0.1",
                "train.schedule=constant",
                "seed=3",
                "method.rank = 8",
                "model=/models/t5 base",
                "data.dir=\"quoted/dir\"",
                "train.group_by_length=true",
                "out_dir=2024-05-01",
            ]),
        )
        .unwrap();
        assert_eq!((cfg.train.lr, cfg.train.steps), (0.1, 50));
        assert_eq!(cfg.train.schedule, Schedule::Constant);
        assert!(cfg.train.group_by_length);
        assert_eq!(cfg.seed, 3);
        assert_eq!(cfg.model, "/models/t5 base");
        assert_eq!(cfg.out_dir, PathBuf::from("2024-05-01"));
        assert_eq!(cfg.data.dir, Some(PathBuf::from("quoted/dir")));
        assert_eq!(
            cfg.method,
            MethodConfig::Dept(DeptConfig {
                rank: 8,
                ..DeptConfig::default()
            })
        );

        // `method.KEY` follows a `method=` override wherever it stands; the file's [dept] is
        // then ignored.
        let cfg = RunConfig::from_toml_str(
            text,
            path(),
            &sets(&["method.prompt_len=20", "method=lamp", "lamp.rank=4"]),
        )
        .unwrap();
        assert_eq!(
            cfg.method,
            MethodConfig::Lamp(LampConfig {
                prompt_len: 20,
                rank: 4,
                ..LampConfig::default()
            })
        );

        // Without a file: the defaults, and the default method for `method.KEY`.
        let cfg = RunConfig::from_overrides(&sets(&["method.experts=2", "data.task=rte"])).unwrap();
        assert_eq!(
            cfg.method,
            MethodConfig::Ept(EptConfig {
                experts: 2,
                ..EptConfig::default()
            })
        );
        assert_eq!(cfg.data.task, "rte");
    }

    #[test]
    fn bad_overrides_name_the_override() {
        for (o, needle) in [
            ("train.lr", "no `=`"),
            ("=3", "empty key"),
            ("train..lr=3", "empty part"),
            ("seed.x=1", "`seed` is integer, not a section"),
        ] {
            let err = RunConfig::from_toml_str("seed = 1", path(), &sets(&[o]))
                .unwrap_err()
                .to_string();
            assert!(err.contains(o) && err.contains(needle), "{o}: {err}");
        }
        // Well-formed overrides of unknown keys fail like the same key in the file.
        let err = RunConfig::from_overrides(&sets(&["train.learning_rat=0.1"]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("<command line>") && err.contains("train.learning_rat"),
            "{err}"
        );
    }

    #[test]
    fn unknown_keys_and_wrong_types_name_the_key() {
        for (text, needle) in [
            ("stepz = 1", "field `stepz`: unknown key"),
            (
                "[train]\nstepz = 1",
                "field `train.stepz`: unknown field `stepz`",
            ),
            (
                "[data]\nfolder = \"x\"",
                "field `data.folder`: unknown field `folder`",
            ),
            (
                "method = \"pt\"\n[pt]\nlength = 5",
                "field `pt.length`: unknown field `length`",
            ),
            (
                "[train]\nlr = \"fast\"",
                "field `train.lr`: invalid type: string",
            ),
            (
                "[train]\nschedule = \"cosine_with_restarts\"",
                "field `train.schedule`: unknown variant",
            ),
            (
                "method = \"dpt\"\n[dpt]\nrank = \"x\"\nprompt_len = 5",
                "field `dpt.rank`: invalid type",
            ),
            ("seed = -1", "field `seed`"),
            ("model = 5", "field `model`: invalid type: integer"),
            ("train = 5", "field `train`: expected a [train] section"),
            ("lamp = 5", "field `lamp`: expected a [lamp] section"),
            ("method = \"lora\"", "field `method`: unknown method `lora`"),
            ("method = 3", "field `method`: expected a method name"),
        ] {
            let err = RunConfig::from_toml_str(text, path(), &[])
                .unwrap_err()
                .to_string();
            assert!(
                err.starts_with("run.toml: ") && err.contains(needle),
                "{text}: {err}"
            );
        }
    }

    #[test]
    fn bad_toml_is_a_format_error_with_the_path() {
        let err = RunConfig::from_toml_str("seed = 1\n[train\nsteps = 3", path(), &[]).unwrap_err();
        assert!(matches!(err, Error::Format { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.starts_with("run.toml: invalid TOML at line 2"), "{msg}");
        let err = RunConfig::from_file(Path::new("/nonexistent/run.toml"), &[]).unwrap_err();
        assert!(matches!(err, Error::Io { .. }), "{err:?}");
    }

    #[test]
    fn round_trips_through_to_toml_string() {
        let methods = [
            MethodConfig::Pt(PtConfig {
                init_text: "a \"quoted\" sentence\nwith a newline".into(),
                ..PtConfig::default()
            }),
            MethodConfig::PTuning(PTuningConfig::default()),
            MethodConfig::Residual(ResidualConfig {
                bottleneck: 64,
                ..ResidualConfig::default()
            }),
            MethodConfig::Dpt(DptConfig::default()),
            MethodConfig::Dept(DeptConfig {
                alpha: 0.1,
                ..DeptConfig::default()
            }),
            MethodConfig::Ept(EptConfig::default()),
            MethodConfig::Ept(EptConfig {
                expert_hidden: Some(32),
                multi_space: false,
                ..EptConfig::default()
            }),
            MethodConfig::Lamp(LampConfig::default()),
            MethodConfig::Xpt(XptConfig {
                repeats: 10,
                ..XptConfig::default()
            }),
        ];
        for method in methods {
            let cfg = RunConfig {
                model: "/models/t5 \"base\"".into(),
                seed: 42,
                out_dir: PathBuf::from("runs/a b"),
                quant: Quant::Nf4,
                init_from: Some(PathBuf::from("prompts/adapter")),
                method,
                train: TrainConfig {
                    lr: 0.123456789,
                    weight_decay: 0.0,
                    adam_eps: 1e-12,
                    schedule: Schedule::Constant,
                    group_by_length: true,
                    ..TrainConfig::default()
                },
                // A task read from files: `dir` applies (the synthetic task's config
                // leaves it out).
                data: DataConfig {
                    task: "rte".into(),
                    dir: Some(PathBuf::from("data/x")),
                    ..DataConfig::default()
                },
            };
            let text = cfg.to_toml_string();
            let back = RunConfig::from_toml_str(&text, path(), &[]).unwrap();
            assert_eq!(back, cfg, "{text}");
        }
        let text = RunConfig::default().to_toml_string();
        assert!(
            text.contains("\n[ept]\n") && !text.contains("\ndir ="),
            "{text}"
        );
        assert_eq!(
            RunConfig::from_toml_str(&text, path(), &[]).unwrap(),
            RunConfig::default()
        );
    }

    /// `validate` of the defaults with one change; the error message.
    fn invalid(change: impl FnOnce(&mut RunConfig)) -> String {
        let mut cfg = RunConfig::default();
        change(&mut cfg);
        cfg.validate(path()).unwrap_err().to_string()
    }

    fn assert_names(msg: &str, field: &str, value: &str) {
        assert!(
            msg.starts_with("run.toml: ")
                && msg.contains(&format!("field `{field}`"))
                && msg.contains(&format!("got {value},")),
            "{field} {value}: {msg}"
        );
    }

    #[test]
    fn validate_steps() {
        assert_names(&invalid(|c| c.train.steps = 0), "train.steps", "0");
    }

    #[test]
    fn validate_batch_size() {
        assert_names(
            &invalid(|c| c.train.batch_size = 0),
            "train.batch_size",
            "0",
        );
    }

    #[test]
    fn validate_grad_accum() {
        assert_names(
            &invalid(|c| c.train.grad_accum = 0),
            "train.grad_accum",
            "0",
        );
    }

    #[test]
    fn validate_sizes_past_their_limits() {
        let huge = usize::MAX;
        type Set = fn(&mut RunConfig, usize);
        let cases: [(&str, &str, Set); 8] = [
            ("train.steps", "MAX_STEPS", |c, v| c.train.steps = v),
            ("train.batch_size", "MAX_BATCH_SIZE", |c, v| {
                c.train.batch_size = v
            }),
            ("train.grad_accum", "MAX_GRAD_ACCUM", |c, v| {
                c.train.grad_accum = v
            }),
            ("train.max_len", "MAX_SEQ_LEN", |c, v| c.train.max_len = v),
            ("train.max_target_len", "MAX_SEQ_LEN", |c, v| {
                c.train.max_target_len = v
            }),
            ("data.train_examples", "MAX_SYNTHETIC_EXAMPLES", |c, v| {
                c.data.train_examples = v
            }),
            ("data.dev_examples", "MAX_SYNTHETIC_EXAMPLES", |c, v| {
                c.data.dev_examples = v
            }),
            ("data.eval_batch_size", "MAX_BATCH_SIZE", |c, v| {
                c.data.eval_batch_size = v
            }),
        ];
        for (key, limit, set) in cases {
            let msg = invalid(|c| set(c, huge));
            assert_names(&msg, key, &huge.to_string());
            assert!(msg.contains(limit), "{msg}");
        }
        // The limits themselves are accepted.
        let mut cfg = RunConfig::default();
        (cfg.train.steps, cfg.train.warmup_steps) = (MAX_STEPS, 0);
        cfg.train.batch_size = MAX_BATCH_SIZE;
        cfg.train.max_target_len = MAX_SEQ_LEN;
        cfg.data.train_examples = MAX_SYNTHETIC_EXAMPLES;
        cfg.validate(path()).unwrap();
    }

    #[test]
    fn an_integral_float_for_an_integer_key_says_how_to_write_it() {
        let err = RunConfig::from_overrides(&sets(&["train.max_target_len=1e9"]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("train.max_target_len")
                && err.contains("floating-point")
                && err.contains("e.g. 1000000000"),
            "{err}"
        );
        let err = RunConfig::from_overrides(&sets(&["method=pt", "method.prompt_len=1e9"]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("pt.prompt_len") && err.contains("floating-point"),
            "{err}"
        );
    }

    #[test]
    fn validate_lr() {
        assert_names(&invalid(|c| c.train.lr = -0.5), "train.lr", "-0.5");
        assert_names(&invalid(|c| c.train.lr = 0.0), "train.lr", "0");
        assert_names(&invalid(|c| c.train.lr = f64::INFINITY), "train.lr", "inf");
        assert_names(&invalid(|c| c.train.lr = f64::NAN), "train.lr", "NaN");
    }

    #[test]
    fn validate_lr_lowrank() {
        assert_names(
            &invalid(|c| c.train.lr_lowrank = -1e-4),
            "train.lr_lowrank",
            "-0.0001",
        );
        assert_names(
            &invalid(|c| c.train.lr_lowrank = f64::NAN),
            "train.lr_lowrank",
            "NaN",
        );
    }

    #[test]
    fn validate_weight_decay() {
        assert_names(
            &invalid(|c| c.train.weight_decay = -0.01),
            "train.weight_decay",
            "-0.01",
        );
        let mut cfg = RunConfig::default();
        cfg.train.weight_decay = 0.0;
        cfg.validate(path()).unwrap();
    }

    #[test]
    fn validate_warmup_steps() {
        let msg = invalid(|c| {
            c.train.steps = 100;
            c.train.warmup_steps = 101;
        });
        assert_names(&msg, "train.warmup_steps", "101");
        assert!(msg.contains("train.steps = 100"), "{msg}");
        let mut cfg = RunConfig::default();
        cfg.train.warmup_steps = cfg.train.steps;
        cfg.validate(path()).unwrap();
    }

    #[test]
    fn validate_max_grad_norm() {
        assert_names(
            &invalid(|c| c.train.max_grad_norm = -1.0),
            "train.max_grad_norm",
            "-1",
        );
        // 0 turns clipping off.
        let mut cfg = RunConfig::default();
        cfg.train.max_grad_norm = 0.0;
        cfg.validate(path()).unwrap();
    }

    #[test]
    fn validate_adam_betas() {
        assert_names(
            &invalid(|c| c.train.adam_beta1 = 1.0),
            "train.adam_beta1",
            "1",
        );
        assert_names(
            &invalid(|c| c.train.adam_beta1 = -0.1),
            "train.adam_beta1",
            "-0.1",
        );
        assert_names(
            &invalid(|c| c.train.adam_beta2 = 1.5),
            "train.adam_beta2",
            "1.5",
        );
        assert_names(
            &invalid(|c| c.train.adam_beta2 = f64::NAN),
            "train.adam_beta2",
            "NaN",
        );
        let mut cfg = RunConfig::default();
        (cfg.train.adam_beta1, cfg.train.adam_beta2) = (0.0, 0.0);
        cfg.validate(path()).unwrap();
    }

    #[test]
    fn validate_adam_eps() {
        assert_names(&invalid(|c| c.train.adam_eps = 0.0), "train.adam_eps", "0");
    }

    #[test]
    fn validate_max_len() {
        assert_names(&invalid(|c| c.train.max_len = 0), "train.max_len", "0");
    }

    #[test]
    fn validate_max_target_len() {
        assert_names(
            &invalid(|c| c.train.max_target_len = 0),
            "train.max_target_len",
            "0",
        );
    }

    #[test]
    fn validate_eval_and_checkpoint_every_take_any_value() {
        let mut cfg = RunConfig::default();
        (cfg.train.eval_every, cfg.train.checkpoint_every) = (0, 0);
        cfg.validate(path()).unwrap();
    }

    #[test]
    fn validate_data_task() {
        let msg = invalid(|c| c.data.task = " ".into());
        assert!(msg.contains("field `data.task`: empty"), "{msg}");
    }

    #[test]
    fn validate_train_examples() {
        assert_names(
            &invalid(|c| c.data.train_examples = 0),
            "data.train_examples",
            "0",
        );
        assert_names(
            &invalid(|c| c.data.dev_examples = 0),
            "data.dev_examples",
            "0",
        );
        // Other tasks read their examples from files.
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let mut cfg = RunConfig::default();
        (cfg.data.task, cfg.data.train_examples) = ("rte".into(), 0);
        cfg.data.dir = Some(fixtures.join("data/glue/rte"));
        cfg.model = fixtures.join("t5-v1_0-tiny").display().to_string();
        cfg.validate(path()).unwrap();
    }

    #[test]
    fn validate_text_tasks() {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let text = |c: &mut RunConfig| {
            c.data.task = "rte".into();
            c.data.dir = Some(fixtures.join("data/glue/rte"));
            c.model = fixtures.join("t5-v1_0-tiny").display().to_string();
        };
        let msg = invalid(|c| {
            text(c);
            c.data.task = "rtee".into();
        });
        assert!(msg.contains("`data.task`: unknown task \"rtee\"") && msg.contains("boolq"));
        let msg = invalid(|c| {
            text(c);
            c.data.dir = None;
        });
        assert!(
            msg.contains("`data.dir`: task \"rte\" reads files"),
            "{msg}"
        );
        let msg = invalid(|c| {
            text(c);
            c.data.dir = Some(fixtures.join("nowhere"));
        });
        assert!(msg.contains("`data.dir`") && msg.contains("nowhere is not a folder"));
        let msg = invalid(|c| {
            text(c);
            c.model = "llama-tiny".into();
        });
        assert!(
            msg.contains("`model`: \"llama-tiny\" is a built-in shape"),
            "{msg}"
        );
        assert_names(
            &invalid(|c| c.data.eval_batch_size = 0),
            "data.eval_batch_size",
            "0",
        );
        // A custom task is a .toml path; the loader checks the file itself.
        let mut cfg = RunConfig::default();
        text(&mut cfg);
        cfg.data.task = "custom/sentiment.toml".into();
        cfg.validate(path()).unwrap();
    }

    #[test]
    fn validate_model_out_dir_and_seed() {
        let msg = invalid(|c| c.model = String::new());
        assert!(
            msg.contains("field `model`: empty") && msg.contains("t5-base"),
            "{msg}"
        );
        let msg = invalid(|c| c.out_dir = PathBuf::new());
        assert!(msg.contains("field `out_dir`: empty"), "{msg}");
        assert_names(
            &invalid(|c| c.seed = u64::MAX),
            "seed",
            &u64::MAX.to_string(),
        );
    }

    #[test]
    fn every_example_parses_and_validates() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
        let mut seen = Vec::new();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().and_then(|e| e.to_str()) != Some("toml") {
                continue;
            }
            let cfg = RunConfig::from_file(&path, &[])
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            cfg.validate(&path).unwrap();
            // The file is named after its method, and the method fits the model it names.
            let stem = path
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap()
                .to_string();
            assert_eq!(cfg.method.name(), stem, "{}", path.display());
            let d = crate::model::shapes::shape_width(&cfg.model).unwrap();
            cfg.method.validate(d, cfg.train.max_len).unwrap();
            seen.push(stem);
        }
        seen.sort();
        let mut all: Vec<String> = METHOD_NAMES.iter().map(|s| s.to_string()).collect();
        all.sort();
        assert_eq!(seen, all, "one example per method");
    }
}
