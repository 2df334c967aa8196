//! The training loop of `fastpt run`: model and method from the run config, batches from the
//! task, AdamW steps with the schedule, evaluation and keep-best, checkpoints that never lose
//! work, and the run folder (config.toml, checkpoint.safetensors, best.safetensors,
//! method.safetensors, report.json, loss.svg, metrics.jsonl; the marker and the lock of
//! [`super::run_dir`]).
//!
//! State that a checkpoint must hold for an exact resume: the method parameters, the AdamW
//! moments and step, and the data position (epoch, cursor) — the data order is a function of
//! the seed and the epoch, and the steps themselves are deterministic, so nothing else is needed.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use indicatif::{ProgressBar, ProgressStyle};

use super::checkpoint::{load_checkpoint, save_checkpoint, OptimTensor, TrainState};
use super::export::{export_prompt, init_from_adapter, ExportInfo, Exported};
use super::optim::Optimizer;
use super::report::{peak_rss_bytes, write_run_svg, LossChart, Report, StepRecord};
use super::run_dir::{
    check_new_run_dir, check_resume_dir, write_marker, MetricsLog, RunLock, MARKER,
};
use super::schedule::lr_factor;
use crate::backend::collective::{Collective, SingleProcess};
use crate::backend::Backend;
use crate::config::{RunConfig, StepPlan, RESUME_MAY_CHANGE};
use crate::data::batching::{Batcher, Position};
use crate::data::tasks::{load_custom_task, load_task, TaskData, TextExample};
use crate::data::tokenize::TextCodec;
use crate::data::{synthetic, Example, HostBatch};
use crate::engine::{
    all_reduce_grads, build_backbone_method, forward_loss, train_step, train_step_share,
};
use crate::error::{Error, Result};
use crate::eval::{evaluate, evaluate_on_ranks, EvalMode, EvalOptions, Evaluation};
use crate::fsutil::write_file_atomic;
use crate::model::hf::load_tokenizer;
use crate::model::shapes::is_builtin_shape;
use crate::model::{load_model, random_model, Backbone};
use crate::prompt::{load_params, save_params, train_params, zero_grads, PromptMethod};

/// The run config of `fastpt run` without `--config` (src/train/default_run.toml).
pub const DEFAULT_RUN_TOML: &str = include_str!("default_run.toml");

/// The signal numbers of SIGINT and SIGTERM (the same on every Unix): a run interrupted by
/// one exits with 128 + its number (130, 143).
pub const SIGINT: usize = 2;
pub const SIGTERM: usize = 15;

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    Finished,
    /// A signal (its number; 0 when the flag was set otherwise) stopped the run after a step:
    /// the checkpoint and report.json were written; `fastpt run --resume RUN_DIR` continues.
    Interrupted(usize),
    /// `--resume` of a run that had already finished: nothing was done or written.
    AlreadyFinished,
}

impl Stopped {
    /// What report.json's `stopped` says.
    pub fn describe(self) -> String {
        match self {
            Stopped::Finished | Stopped::AlreadyFinished => "finished".into(),
            Stopped::Interrupted(sig) => format!("interrupted ({})", signal_name(sig)),
        }
    }
}

/// `SIGINT`, `SIGTERM`, or `signal N`.
pub fn signal_name(sig: usize) -> String {
    match sig {
        SIGINT => "SIGINT".into(),
        SIGTERM => "SIGTERM".into(),
        0 => "a stop request".into(),
        n => format!("signal {n}"),
    }
}

/// The summary `fastpt run` prints.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub run_dir: PathBuf,
    pub stopped: Stopped,
    /// (step, mean training loss of the step), the whole run's (a resumed run's included).
    pub losses: Vec<(u64, f64)>,
    /// (step, dev loss) of each evaluation.
    pub dev_losses: Vec<(u64, f64)>,
    /// (step, mean of the dev metrics) of each evaluation of a text task.
    pub dev_scores: Vec<(u64, f64)>,
    /// (step, value) of the kept parameters: the mean of the dev metrics (a text task), or the
    /// dev loss (the synthetic task).
    pub best: Option<(u64, f64)>,
    /// What report.json's `eval` holds (final dev/test metrics of a text task).
    pub eval: BTreeMap<String, f64>,
    pub tokens_per_second: f64,
    pub seconds: f64,
    /// A resume's changed keys, `(key, old, new)` (only [`RESUME_MAY_CHANGE`] keys).
    pub changed: Vec<(String, String, String)>,
    /// The run's optimiser steps (resolved from `train.steps` or `train.epochs`).
    pub total_steps: u64,
    /// Early stopping ended the run before `total_steps`: when and why.
    pub early_stop: Option<EarlyStop>,
}

/// Why a run stopped before its last step: `patience` dev evaluations in a row (the last at
/// `step`) without a better keep-best value than `best` at `best_step`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct EarlyStop {
    pub step: u64,
    pub patience: usize,
    pub best_step: u64,
    pub best: f64,
    /// What was compared: `dev loss` (lower is better) or `dev score` (higher is better).
    pub compared: String,
}

impl EarlyStop {
    /// The sentence the run prints and report.json's `early_stop.reason` holds.
    pub fn describe(&self) -> String {
        format!(
            "stopped early at step {}: {} dev evaluations in a row without a better {} than {:.4} \
             (step {}; train.early_stopping_patience = {})",
            self.step, self.patience, self.compared, self.best, self.best_step, self.patience
        )
    }
}

/// Options of one `train` call that are not part of the run config.
pub struct TrainOptions<'a> {
    /// Continue the run in `cfg.out_dir` from its checkpoint. `cfg` is compared with the
    /// folder's config.toml: only the keys of [`RESUME_MAY_CHANGE`] may differ.
    pub resume: bool,
    /// A signal number (set by a signal handler; 0: none): the run stops after the current
    /// step with a checkpoint and report.json.
    pub interrupt: &'a AtomicUsize,
    /// Show a progress bar (stdout a terminal) or plain progress lines (a log).
    pub progress: bool,
    /// A PEFT prompt-tuning adapter folder whose rows start a PT method (a warm start), when
    /// the config's `init_from` names none (`fastpt run --init-from` sets the config key, so
    /// config.toml records it; this one is recorded the same way).
    pub init_from: Option<&'a Path>,
    /// Fault injection for tests: at this step the method's gradients are set to NaN before
    /// the gradient-norm check, as a diverging backward would leave them. `None` in every
    /// real run (the CLI never sets it).
    pub nan_grad_at_step: Option<u64>,
    /// The ranks of a data-parallel run (`&SingleProcess` for one process): each rank takes
    /// rows r, r + N, ... of every batch one process would take and its share of every
    /// evaluation; the gradients are summed across ranks before each optimizer step; rank 0
    /// alone writes the run folder, which every rank must see (a resume reads it).
    pub ranks: &'a dyn Collective,
    /// Every this many steps (0: never) the ranks compare a hash of the method parameters and
    /// stop with an error naming the step when they differ (they must stay identical).
    pub check_replicas_every: u64,
    /// Fault injection for tests: at this step the last rank nudges one parameter after the
    /// optimizer step, as a rank computing something else would. `None` in every real run.
    pub diverge_at_step: Option<u64>,
}

/// The signal several ranks stop on, from the sums of their flags: 0 when none was signalled;
/// the signal when every signalled rank got the same one; SIGTERM's number otherwise (a mix,
/// as when a scheduler's SIGTERM and a user's SIGINT cross).
fn agreed_signal([signalled, sum, sum_sq]: [f64; 3]) -> usize {
    if signalled < 0.5 {
        return 0;
    }
    // All equal exactly when count · Σs² = (Σs)² (small integers: exact in f64).
    match signalled * sum_sq == sum * sum {
        true => (sum / signalled) as usize,
        false => SIGTERM,
    }
}

/// This rank's stop flags for [`agreed_signal`]: (signalled, signal, signal²).
fn signal_flags(signal: usize) -> [f64; 3] {
    let s = signal as f64;
    [f64::from(u8::from(signal != 0)), s, s * s]
}

/// Every rank must run the same run: the same effective config (steps resolved) and the same
/// number of method parameters. Ranks that differ would make collectives of different sizes
/// (under MPI a crash, not an error), so they are refused first, naming each rank's. A
/// collective: every rank calls it.
fn check_same_run(ranks: &dyn Collective, cfg: &RunConfig, params: usize) -> Result<()> {
    if ranks.size() == 1 {
        return Ok(());
    }
    let mine = format!(
        "config {} ({} steps), {params} method parameters",
        config_hash(&cfg.to_toml_string()),
        cfg.train.steps
    );
    let all = ranks.all_gather(mine.as_bytes())?;
    let all: Vec<String> = all
        .iter()
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .collect();
    if all.iter().all(|x| *x == all[0]) {
        return Ok(());
    }
    let list = all
        .iter()
        .enumerate()
        .map(|(r, x)| format!("rank {r}: {x}"))
        .collect::<Vec<_>>()
        .join("; ");
    Err(Error::Ranks(format!(
        "the ranks were given different runs ({list}): every rank must get the same config, \
         model and data (nothing was written)"
    )))
}

/// A short hash of the effective config: a resume must continue the same run.
fn config_hash(text: &str) -> String {
    let h = text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("{h:016x}")
}

/// The hash a checkpoint stores: the config without the keys a resume may change (they are
/// blanked here; keep in step with [`RESUME_MAY_CHANGE`]).
fn resume_hash(cfg: &RunConfig) -> String {
    let mut c = cfg.clone();
    c.train.steps = 0;
    c.train.epochs = None;
    c.train.eval_every = 0;
    c.train.checkpoint_every = 0;
    c.out_dir = PathBuf::new();
    config_hash(&c.to_toml_string())
}

/// Seconds since the Unix epoch (metrics.jsonl's `time`).
fn unix_time() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Real tokens in a batch (input positions + label positions): the tokens/s numerator.
fn batch_tokens(batch: &HostBatch) -> u64 {
    let inputs = batch.attention_mask.iter().filter(|&&m| m != 0).count();
    let labels = batch.labels.iter().filter(|&&l| l != -100).count();
    (inputs + labels) as u64
}

/// The examples of a run: token ids to train on and to compute the dev loss with, and for a
/// text task the texts its metrics are computed on.
struct RunData {
    train: Vec<Example>,
    dev: Vec<Example>,
    text: Option<TextTask>,
}

/// A GLUE / SuperGLUE / custom task with the model's tokenizer.
struct TextTask {
    codec: TextCodec,
    task: TaskData,
}

impl TextTask {
    /// The task's metrics on `examples` (one of its splits) with `method`'s prompt.
    /// `ranks` split the examples (see [`evaluate_on_ranks`]); every rank gets the result.
    fn evaluate<B: Backend>(
        &self,
        be: &B,
        model: &Backbone<B>,
        method: &mut dyn PromptMethod<B>,
        examples: &[TextExample],
        opts: &EvalOptions,
        ranks: &dyn Collective,
    ) -> Result<Evaluation> {
        evaluate_on_ranks(
            be,
            model,
            Some(method),
            (&self.codec, &self.task.spec),
            examples,
            opts,
            ranks,
        )
    }
}

/// Loads (or generates) the configured task for `model`.
fn run_data<B: Backend>(be_model: &Backbone<B>, cfg: &RunConfig) -> Result<RunData> {
    let d = &cfg.data;
    if d.is_synthetic() {
        let (vocab, eos) = (be_model.vocab_size(), be_model.special_ids().eos);
        return Ok(RunData {
            train: synthetic::keyword_task(d.train_examples, vocab, eos, cfg.seed)?,
            dev: synthetic::keyword_task(d.dev_examples, vocab, eos, cfg.seed.wrapping_add(1))?,
            text: None,
        });
    }
    let task = load_text_task(d)?;
    for (split, examples) in [
        ("train", &task.train),
        ("dev", &task.dev),
        ("test", &task.test),
    ] {
        if examples.is_empty() {
            return Err(Error::Input(format!(
                "task {} in {}: the {split} split is empty",
                task.spec.name,
                d.dir.as_deref().unwrap_or(Path::new("?")).display()
            )));
        }
    }
    let codec = TextCodec::load(Path::new(&cfg.model), be_model)?;
    codec.check_classes(&task.spec)?;
    let (max_len, max_target_len) = (cfg.train.max_len, cfg.train.max_target_len);
    Ok(RunData {
        train: codec.examples("train", &task.train, max_len, max_target_len)?,
        dev: codec.examples("dev", &task.dev, max_len, max_target_len)?,
        text: Some(TextTask { codec, task }),
    })
}

/// Everything a run folder's config builds: the model, the method, the data.
struct Setup<B: Backend> {
    model: Backbone<B>,
    method: Box<dyn PromptMethod<B>>,
    data: RunData,
}

/// Builds the model (a built-in shape with random weights, or a Hugging Face folder), the
/// method (its `text` init uses the folder's tokenizer) and the data of `cfg`.
fn setup<B: Backend + 'static>(be: &B, cfg: &RunConfig) -> Result<Setup<B>> {
    let (model, method) = model_and_method(be, cfg)?;
    let data = run_data(&model, cfg)?;
    Ok(Setup {
        model,
        method,
        data,
    })
}

/// The model and the method of `cfg`, freshly initialised (the run's seed), after the memory
/// check: what a run starts from and what a finished run's parameters are loaded into.
fn model_and_method<B: Backend + 'static>(
    be: &B,
    cfg: &RunConfig,
) -> Result<(Backbone<B>, Box<dyn PromptMethod<B>>)> {
    cfg.check_memory(be)?; // issue 19: refuse what cannot fit before loading anything
    let tc = &cfg.train;
    let model = if is_builtin_shape(&cfg.model) {
        random_model(be, &cfg.model, cfg.seed, cfg.quant)?
    } else {
        load_model(be, Path::new(&cfg.model), cfg.quant)?
    };
    // A `text` init reads the tokenizer.
    let tokenizer = match Path::new(&cfg.model).join("tokenizer.json").exists() {
        true => Some(load_tokenizer(Path::new(&cfg.model))?),
        false => None,
    };
    let tokenize = |text: &str| -> Result<Vec<u32>> {
        let tok = tokenizer
            .as_ref()
            .ok_or_else(|| Error::Input("no tokenizer.json".into()))?;
        let enc = tok
            .encode(text, false)
            .map_err(|e| Error::Input(format!("tokenizing {text:?}: {e}")))?;
        Ok(enc.get_ids().to_vec())
    };
    let tokenize_ref: Option<&crate::prompt::Tokenize<'_>> =
        tokenizer.as_ref().map(|_| &tokenize as _);
    // The text rows a method may update (DePT, EPT-MS): the input, and on a decoder-only model
    // the target after it (one row holds both).
    let update_rows = match model.is_decoder_only() {
        true => tc.max_len.saturating_add(tc.max_target_len),
        false => tc.max_len,
    };
    cfg.method.validate(model.width(), update_rows)?;
    let method =
        build_backbone_method(be, &model, &cfg.method, update_rows, cfg.seed, tokenize_ref)?;
    Ok((model, method))
}

/// The text task of `d` (built-in or a custom task's TOML), read from its data folder.
fn load_text_task(d: &crate::config::DataConfig) -> Result<TaskData> {
    let dir = d.dir.as_deref().ok_or_else(|| {
        Error::config(
            "<run config>",
            "data.dir",
            "a text task needs its data folder",
        )
    })?;
    if d.task.ends_with(".toml") {
        load_custom_task(Path::new(&d.task), dir, &d.task_options())
    } else {
        load_task(&d.task, dir, &d.task_options())
    }
}

/// A batcher over `examples` with the run's lengths and the model's special ids.
fn run_batcher<'a, B: Backend>(
    model: &Backbone<B>,
    examples: &'a [Example],
    cfg: &RunConfig,
) -> Result<Batcher<'a>> {
    let tc = &cfg.train;
    Ok(Batcher::new(
        examples,
        tc.batch_size,
        tc.max_len,
        tc.max_target_len,
        tc.group_by_length,
        cfg.seed,
        model.batch_ids(),
    )?
    .causal(model.is_decoder_only()))
}

/// The longest row (prompt rows + truncated input + target) must fit the model's positions
/// (Llama's; T5's relative positions have no limit). Checked before training, so the error
/// names the setting to change instead of stopping a run at its first long batch.
fn check_positions<B: Backend>(
    model: &Backbone<B>,
    prompt_rows: usize,
    data: &RunData,
    tc: &crate::config::TrainConfig,
) -> Result<()> {
    let Some(limit) = model.max_positions() else {
        return Ok(());
    };
    let longest = data
        .train
        .iter()
        .chain(&data.dev)
        .map(|e| e.input.len().min(tc.max_len) + e.target.len().min(tc.max_target_len))
        .max()
        .unwrap_or(0);
    if prompt_rows + longest > limit {
        return Err(Error::Input(format!(
            "the longest example needs {prompt_rows} prompt rows + {longest} tokens (input cut \
             to train.max_len = {}, target to train.max_target_len = {}) = {} positions, more \
             than the model's max_position_embeddings = {limit}: lower train.max_len or the \
             prompt length",
            tc.max_len,
            tc.max_target_len,
            prompt_rows + longest
        )));
    }
    Ok(())
}

/// Mean loss over the dev examples, forward only. Chunk i of 32 examples is computed by rank
/// i mod N and the sums are added across ranks.
fn dev_loss<B: Backend>(
    be: &B,
    model: &Backbone<B>,
    method: &mut dyn PromptMethod<B>,
    batcher: &Batcher<'_>,
    dev: &[Example],
    ranks: &dyn Collective,
) -> Result<f64> {
    let mut sum_n = [0.0, 0.0]; // (Σ chunk loss × rows, rows)
    for (i, chunk) in dev.chunks(32).enumerate() {
        if i % ranks.size() != ranks.rank() {
            continue;
        }
        let rows: Vec<&Example> = chunk.iter().collect();
        let (batch, _) = batcher.pad(&rows);
        sum_n[0] += forward_loss(be, model, Some(method), &batch)? * chunk.len() as f64;
        sum_n[1] += chunk.len() as f64;
    }
    ranks.all_reduce_sum_f64(&mut sum_n)?;
    Ok(sum_n[0] / sum_n[1].max(1.0))
}

/// The evaluation settings of a run.
fn eval_options(cfg: &RunConfig) -> EvalOptions {
    EvalOptions {
        mode: cfg.data.eval,
        batch_size: cfg.data.eval_batch_size,
        max_len: cfg.train.max_len,
        max_new_tokens: cfg.train.max_target_len,
        progress: true,
    }
}

/// Trains the method of `cfg` and writes the run folder. Returns when the configured steps are
/// done or an interrupt was requested; a NaN or infinite loss or gradient norm is an error
/// naming the step and the last checkpoint that was verified good (the checkpoint on disk is
/// kept).
///
/// Keep-best: every `eval_every` steps the dev set is evaluated; a text task keeps the
/// parameters with the best mean of its metrics (higher is better), the synthetic task those
/// with the lowest dev loss, in `best.safetensors`. At the end a text task's best parameters
/// are evaluated on the whole dev and test sets (report.json `eval`, predictions.jsonl), and
/// the prompt they give is exported to `export/` (PEFT adapter where the method allows).
///
/// The phases: the folder checks (a new run needs a missing or empty folder; a resume compares
/// the config with the folder's and validates the checkpoint) and `setup` (model, method,
/// data), none of which writes anything; `Run::start` (lock, marker, config.toml,
/// metrics.jsonl); `Run::step_loop` (steps, dev evaluations, checkpoints, signals);
/// `Run::finish` (final checkpoint, evaluation, export, report). report.json is written at
/// every checkpoint and at every stop, an error's included.
pub fn train<B: Backend + 'static>(
    be: &B,
    cfg: &RunConfig,
    opts: &TrainOptions<'_>,
) -> Result<Outcome> {
    // The config as asked (config.toml records it, a resume compares with it): `init_from`
    // of the options goes into it.
    let mut asked = cfg.clone();
    if asked.init_from.is_none() {
        asked.init_from = opts.init_from.map(Path::to_path_buf);
    }
    let asked = &asked;
    let dir = &asked.out_dir;
    // Rank 0 alone owns the folder (the other ranks of a data-parallel run only read it). A
    // folder in use is refused first, naming the pid that holds it. Opening the existing lock
    // file writes nothing.
    let writer = opts.ranks.rank() == 0;
    let lock = match writer {
        true => RunLock::existing(dir)?,
        false => None,
    };
    let resume = match opts.resume {
        true => Some(check_resume(asked, &plan_before_setup(asked)?)?),
        false => {
            if writer {
                check_new_run_dir(dir)?;
            }
            None
        }
    };
    if let Some(r) = &resume {
        if r.finished {
            return Ok(Outcome {
                run_dir: dir.clone(),
                stopped: Stopped::AlreadyFinished,
                losses: r.state.losses.clone(),
                dev_losses: Vec::new(),
                dev_scores: Vec::new(),
                best: r.state.best_step.zip(r.state.best_metric),
                eval: BTreeMap::new(),
                tokens_per_second: 0.0,
                seconds: 0.0,
                changed: r.changed.clone(),
                total_steps: r.total_steps,
                early_stop: None,
            });
        }
    }
    // Everything is loaded and checked before the run folder is touched.
    let Setup {
        model,
        mut method,
        data,
    } = setup(be, asked)?;
    // A resume's parameters come from its checkpoint.
    if let (Some(dir), None) = (&asked.init_from, &resume) {
        if let Some(note) = init_from_adapter(be, method.as_mut(), dir)? {
            if opts.ranks.rank() == 0 {
                println!("{note}");
            }
        }
    }
    check_positions(&model, method.prompt_rows(), &data, &asked.train)?;
    let plan = asked.train.plan(data.train.len())?;
    // The run's config with its steps and warmup resolved: what the loop reads.
    let mut run_cfg = asked.clone();
    run_cfg.train.steps = plan.steps;
    run_cfg.train.warmup_steps = plan.warmup;
    (run_cfg.train.epochs, run_cfg.train.warmup_ratio) = (None, None);
    if opts.progress {
        println!("{}", banner(asked, &plan, &data));
    }
    let mut run = Run::start(
        be, &run_cfg, asked, opts, &model, method, &data, resume, lock,
    )?;
    let stopped = match run.step_loop() {
        Ok(stopped) => stopped,
        Err(e) => return Err(run.failed(e)),
    };
    match run.finish(stopped) {
        Ok(out) => Ok(out),
        Err(e) => Err(run.failed(e)),
    }
}

/// The start banner's second line: the data's sizes, the resolved steps and warmup (and how
/// they were found), the schedule, early stopping.
fn banner(cfg: &RunConfig, plan: &StepPlan, data: &RunData) -> String {
    let sizes = match &data.text {
        Some(t) => format!(
            "{} train, {} dev, {} test examples",
            t.task.train.len(),
            t.task.dev.len(),
            t.task.test.len()
        ),
        None => format!(
            "{} train, {} dev examples (synthetic)",
            data.train.len(),
            data.dev.len()
        ),
    };
    let tc = &cfg.train;
    let mut line = format!(
        "data: {sizes} | {} steps ({}; {} per epoch of {} × {}) | warmup {} steps ({}) | \
         schedule {}",
        plan.steps,
        plan.steps_from,
        plan.per_epoch,
        tc.batch_size,
        tc.grad_accum,
        plan.warmup,
        plan.warmup_from,
        serde_json::to_value(tc.schedule)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default()
    );
    if tc.early_stopping_patience > 0 {
        line.push_str(&format!(
            " | early stopping after {} dev evaluations without a better {}",
            tc.early_stopping_patience,
            compared(data)
        ));
    }
    line
}

/// What keep-best and early stopping compare: a text task's dev score, the synthetic task's
/// dev loss.
fn compared(data: &RunData) -> &'static str {
    match data.text {
        Some(_) => "dev score",
        None => "dev loss",
    }
}

/// The run's steps before the model and data are loaded (a resume's checks need them): only
/// steps from `train.epochs` depend on the training set, whose size the synthetic task's
/// config holds and a text task's files give (read here without a tokenizer; one example per
/// record, as the tokenized set has).
fn plan_before_setup(cfg: &RunConfig) -> Result<StepPlan> {
    let tc = &cfg.train;
    let d = &cfg.data;
    let examples = if tc.epochs.is_none() || tc.steps > 0 {
        1
    } else if d.is_synthetic() {
        d.train_examples
    } else {
        load_text_task(d)?.train.len()
    };
    tc.plan(examples)
}

/// What a resume starts from: the checkpoint, checked against the run's config.
struct Resume {
    tensors: Vec<OptimTensor>,
    state: TrainState,
    /// The keys that changed (all in [`RESUME_MAY_CHANGE`]): (key, old, new).
    changed: Vec<(String, String, String)>,
    /// The run had finished (its report says so) and `cfg` does not extend it.
    finished: bool,
    /// The run's steps.
    total_steps: u64,
}

/// A resume's checks that need no model: the folder, the config against the folder's
/// config.toml (only [`RESUME_MAY_CHANGE`] keys may differ), the checkpoint's format and its
/// step against `train.steps`. Reads only.
fn check_resume(cfg: &RunConfig, plan: &StepPlan) -> Result<Resume> {
    let dir = &cfg.out_dir;
    check_resume_dir(dir)?;
    let config_path = dir.join("config.toml");
    let stored = RunConfig::from_file(&config_path, &[])?;
    let (changed, refused) = stored.resume_changes(cfg);
    if !refused.is_empty() {
        let list = refused
            .iter()
            .map(|(k, a, b)| format!("{k}: {a} in the run, {b} now"))
            .collect::<Vec<_>>()
            .join("; ");
        return Err(Error::Input(format!(
            "{}: the run config differs from the one the run was started with, in keys a \
             resume cannot change ({list}); only {} may change on resume (nothing was written)",
            config_path.display(),
            RESUME_MAY_CHANGE.join(", ")
        )));
    }
    let ckpt_path = dir.join("checkpoint.safetensors");
    if !ckpt_path.exists() {
        return Err(Error::RunFolder {
            path: dir.clone(),
            msg: "no checkpoint.safetensors to resume from (the run stopped before its first \
                  checkpoint); start it again in a new folder"
                .into(),
        });
    }
    let (tensors, state) = load_checkpoint(&ckpt_path)?;
    // The checkpoint's hash is of the config without the keys that may change; a checkpoint
    // of an older fastpt hashed the whole config.toml text.
    if state.config_hash != resume_hash(&stored)
        && state.config_hash != config_hash(&stored.to_toml_string())
    {
        return Err(Error::Input(format!(
            "{}: the run config differs from the one the checkpoint was written with (was \
             {} edited in a key other than {}?); resume with the run's own config",
            ckpt_path.display(),
            config_path.display(),
            RESUME_MAY_CHANGE.join(", ")
        )));
    }
    let steps = plan.steps as u64;
    if state.step > steps {
        return Err(Error::Checkpoint {
            path: ckpt_path,
            field: "step".into(),
            value: state.step.to_string(),
            limit: format!(
                "more than train.steps = {steps} (a resume can extend a run, not shorten it)"
            ),
        });
    }
    // Finished: the report says so, at the last step or where early stopping ended the run
    // (unless the resume changes the patience).
    let patience_changed = changed
        .iter()
        .any(|(k, _, _)| k == "train.early_stopping_patience");
    let finished = report_says_finished(&dir.join("report.json")).is_some_and(|early| {
        state.step == steps || (early == Some(state.step) && !patience_changed)
    });
    Ok(Resume {
        tensors,
        state,
        changed,
        finished,
        total_steps: steps,
    })
}

/// Whether report.json says the run finished (its final evaluation and export are done):
/// `Some(the step early stopping ended it at, if it did)`.
fn report_says_finished(path: &Path) -> Option<Option<u64>> {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .filter(|v| v["stopped"] == "finished")
        .map(|v| v["early_stop"]["step"].as_u64())
}

/// The position of the data after `step` optimizer steps: every step takes `grad_accum`
/// batches of `batch_size` (an epoch ends with a short batch), so it follows from the step.
fn position_after(step: u64, tc: &crate::config::TrainConfig, examples: usize) -> Option<Position> {
    let batches = step.checked_mul(tc.grad_accum as u64)?;
    let per_epoch = (examples as u64).div_ceil(tc.batch_size.max(1) as u64);
    if per_epoch == 0 {
        return None;
    }
    Some(Position {
        epoch: batches / per_epoch,
        cursor: (batches % per_epoch).checked_mul(tc.batch_size as u64)?,
    })
}

/// Checks a checkpoint's fields against the run: step, data position, loss history,
/// keep-best, tensor names and shapes (the method's), values finite. Errors name the file, the
/// field, the value and the limit.
fn validate_checkpoint<B: Backend>(
    path: &Path,
    tensors: &[OptimTensor],
    state: &TrainState,
    method: &dyn PromptMethod<B>,
    cfg: &RunConfig,
    train_examples: usize,
) -> Result<()> {
    let bad = |field: &str, value: String, limit: String| Error::Checkpoint {
        path: path.to_path_buf(),
        field: field.into(),
        value,
        limit,
    };
    let tc = &cfg.train;
    if state.step > tc.steps as u64 {
        return Err(bad(
            "step",
            state.step.to_string(),
            format!("more than train.steps = {}", tc.steps),
        ));
    }
    if state.cursor >= train_examples as u64 {
        return Err(bad(
            "cursor",
            state.cursor.to_string(),
            format!(
                "past the end of the training data ({train_examples} examples; the cursor must \
                 be below)"
            ),
        ));
    }
    let at = Position {
        epoch: state.epoch,
        cursor: state.cursor,
    };
    if let Some(want) = position_after(state.step, tc, train_examples) {
        if want != at {
            return Err(bad(
                "epoch, cursor",
                format!("{}, {}", state.epoch, state.cursor),
                format!(
                    "step {} with train.batch_size = {} × train.grad_accum = {} over {} \
                     training examples is at epoch {}, cursor {}",
                    state.step,
                    tc.batch_size,
                    tc.grad_accum,
                    train_examples,
                    want.epoch,
                    want.cursor
                ),
            ));
        }
    }
    if state.losses.len() as u64 != state.step {
        return Err(bad(
            "losses",
            format!("{} entries", state.losses.len()),
            format!("one loss per step done: step = {}", state.step),
        ));
    }
    for (i, &(step, loss)) in state.losses.iter().enumerate() {
        if step != i as u64 + 1 || !loss.is_finite() {
            return Err(bad(
                &format!("losses[{i}]"),
                format!("(step {step}, loss {loss})"),
                format!("must be step {} with a finite loss", i + 1),
            ));
        }
    }
    match (state.best_step, state.best_metric) {
        (None, None) => {}
        (Some(s), Some(m)) if s <= state.step && s > 0 && m.is_finite() => {}
        (s, m) => {
            return Err(bad(
                "best_step, best_metric",
                format!("{s:?}, {m:?}"),
                format!(
                    "both absent, or a step in 1..={} with a finite value",
                    state.step
                ),
            ))
        }
    }
    let params = method.params();
    if tensors.len() != params.len() {
        let names: Vec<&str> = tensors.iter().map(|t| t.name.as_str()).collect();
        return Err(bad(
            "tensors",
            format!("{names:?}"),
            format!(
                "the method {} has {} parameter tensors ({:?})",
                cfg.method.name(),
                params.len(),
                params.iter().map(|p| p.name.as_str()).collect::<Vec<_>>()
            ),
        ));
    }
    for p in params {
        let t = checkpoint_tensor(tensors, &p.name, &p.shape, path)?;
        for (part, values) in [("param", &t.value), ("adam_m", &t.m), ("adam_v", &t.v)] {
            let bad_at = values
                .iter()
                .position(|x| !x.is_finite() || (part == "adam_v" && *x < 0.0));
            if let Some(i) = bad_at {
                return Err(bad(
                    &format!("{part}/{}[{i}]", t.name),
                    values[i].to_string(),
                    match part {
                        "adam_v" => "must be finite and not negative".into(),
                        _ => "must be finite".into(),
                    },
                ));
            }
        }
    }
    Ok(())
}

/// A run in progress: what its step loop, its evaluations and its end share.
struct Run<'a, B: Backend> {
    be: &'a B,
    cfg: &'a RunConfig,
    opts: &'a TrainOptions<'a>,
    model: &'a Backbone<B>,
    method: Box<dyn PromptMethod<B>>,
    data: &'a RunData,
    opt: Optimizer<B>,
    batcher: Batcher<'a>,
    dev_batcher: Batcher<'a>,
    eval_opts: EvalOptions,
    ckpt_path: PathBuf,
    /// The effective config as written to config.toml.
    config_text: String,
    /// What a checkpoint holds besides the tensors (the step, the data position, keep-best).
    state: TrainState,
    bar: ProgressBar,
    /// Every training step of the run, a resumed run's earlier ones included (from
    /// metrics.jsonl): report.json's `steps`.
    records: Vec<StepRecord>,
    /// (step, dev loss) and (step, mean of the dev metrics) of each evaluation.
    dev_losses: Vec<(u64, f64)>,
    dev_scores: Vec<(u64, f64)>,
    truncated_rows: u64,
    /// Tokens of this process's steps (tokens/s is this process's).
    tokens_total: u64,
    run_start: Instant,
    /// metrics.jsonl, open for appending (rank 0; `None` on the other ranks, which write
    /// nothing).
    metrics: Option<MetricsLog>,
    /// The folder's lock, held until the run ends (rank 0).
    _lock: Option<RunLock>,
    /// Plain progress lines (stdout is not a terminal): every `line_every` steps or
    /// [`LINE_SECONDS`], whichever comes first; when the last one was printed.
    line_every: u64,
    last_line: Instant,
    /// A resume's changed keys.
    changed: Vec<(String, String, String)>,
    /// Every periodic dev evaluation of the run (a resumed run's earlier ones included, from
    /// metrics.jsonl): the plot's dev series and early stopping's count.
    evals: Vec<EvalPoint>,
    /// Set when early stopping ended the run.
    early_stop: Option<EarlyStop>,
}

/// One periodic dev evaluation: step, dev loss (NaN when it was not finite), a text task's dev
/// score.
#[derive(Debug, Clone, Copy)]
struct EvalPoint {
    step: u64,
    dev_loss: f64,
    score: Option<f64>,
}

/// The periodic dev evaluations among metrics.jsonl's lines (`kind: eval`, split dev, with
/// `periodic: true`; a line without that field, from an older fastpt, is periodic when it has
/// a dev loss, as only those had one).
fn eval_points(lines: &[serde_json::Value]) -> Vec<EvalPoint> {
    lines
        .iter()
        .filter(|v| v["kind"] == "eval" && v["split"] == "dev")
        .filter(|v| {
            v["periodic"]
                .as_bool()
                .unwrap_or_else(|| v["dev_loss"].is_number())
        })
        .filter_map(|v| {
            Some(EvalPoint {
                step: v["step"].as_u64()?,
                dev_loss: v["dev_loss"].as_f64().unwrap_or(f64::NAN),
                score: v["score"].as_f64(),
            })
        })
        .collect()
}

/// A plain progress line at least this often (seconds) when stdout is not a terminal.
const LINE_SECONDS: f64 = 30.0;

impl<'a, B: Backend + 'static> Run<'a, B> {
    /// The run folder (lock, marker, config.toml, metrics.jsonl), the optimiser, and with a
    /// resume the parameters, moments and data position of the checkpoint (validated before
    /// anything is written).
    #[allow(clippy::too_many_arguments)]
    fn start(
        be: &'a B,
        cfg: &'a RunConfig,
        asked: &RunConfig,
        opts: &'a TrainOptions<'a>,
        model: &'a Backbone<B>,
        mut method: Box<dyn PromptMethod<B>>,
        data: &'a RunData,
        resume: Option<Resume>,
        lock: Option<RunLock>,
    ) -> Result<Self> {
        let out_dir = &cfg.out_dir;
        let ckpt_path = out_dir.join("checkpoint.safetensors");
        let mut opt = Optimizer::new(be, method.as_ref(), &cfg.train);
        let batcher = run_batcher(model, &data.train, cfg)?;
        if let Some(note) = batcher.reduced_note("train.batch_size") {
            if opts.ranks.rank() == 0 {
                println!("{note}");
            }
        }
        let dev_batcher = run_batcher(model, &data.dev, cfg)?;

        // The effective config as asked (steps from epochs stay epochs), echoed into the run
        // folder and hashed for resume checks.
        let config_text = asked.to_toml_string();
        let hash = resume_hash(asked);
        let mut state = TrainState {
            step: 0,
            epoch: 0,
            cursor: 0,
            best_metric: None,
            best_step: None,
            losses: Vec::new(),
            config_hash: hash.clone(),
        };
        let mut changed = Vec::new();
        if let Some(r) = &resume {
            validate_checkpoint(
                &ckpt_path,
                &r.tensors,
                &r.state,
                method.as_ref(),
                cfg,
                data.train.len(),
            )?;
            restore(
                be,
                method.as_mut(),
                &mut opt,
                &r.tensors,
                r.state.step,
                &ckpt_path,
            )?;
            state = r.state.clone();
            state.config_hash = hash;
            changed = r.changed.clone();
        }

        // The other ranks read the run's history before rank 0 writes anything.
        let history = match (&resume, opts.ranks.rank()) {
            (Some(_), 1..) => MetricsLog::history(out_dir, state.step)?,
            _ => Vec::new(),
        };
        // Also the barrier before rank 0 writes anything.
        check_same_run(opts.ranks, cfg, train_params(method.as_ref()))?;
        if opts.ranks.rank() > 0 {
            let bar = ProgressBar::hidden();
            return Ok(Self::new(
                (be, cfg, opts, model, method, data),
                (opt, batcher, dev_batcher),
                (config_text, state, bar),
                (None, None),
                (step_records(&history), eval_points(&history), changed),
            ));
        }

        // Every check passed: from here on the folder is written.
        std::fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))?;
        let mut lock = match lock {
            Some(lock) => lock,
            None => RunLock::create(out_dir)?,
        };
        // Under the lock: a new run's folder must still be free (another process may have
        // taken it since the check).
        if resume.is_none() && out_dir.join(MARKER).exists() {
            check_new_run_dir(out_dir)?;
        }
        lock.write_pid()?;
        let run_id = config_hash(&format!(
            "{config_text}{}{}",
            std::process::id(),
            unix_time()
        ));
        write_marker(out_dir, &run_id)?;
        if resume.is_none() || !changed.is_empty() {
            write_file_atomic(
                &out_dir.join("config.toml"),
                config_text.as_bytes(),
                &mut || Ok(()),
            )?;
        }
        let (metrics, records, evals) = match &resume {
            None => (MetricsLog::create(out_dir)?, Vec::new(), Vec::new()),
            Some(_) => {
                let (log, lines) = MetricsLog::resume(out_dir, state.step)?;
                (log, step_records(&lines), eval_points(&lines))
            }
        };
        if opts.progress {
            if let Some(r) = &resume {
                println!(
                    "resuming {} at step {} of {}",
                    out_dir.display(),
                    r.state.step,
                    cfg.train.steps
                );
            }
            for (key, old, new) in &changed {
                println!("changed on resume: {key} = {new} (was {old})");
            }
        }

        let bar = progress_bar(opts, cfg.train.steps as u64, state.step);
        Ok(Self::new(
            (be, cfg, opts, model, method, data),
            (opt, batcher, dev_batcher),
            (config_text, state, bar),
            (Some(metrics), Some(lock)),
            (records, evals, changed),
        ))
    }

    /// A run from its parts (rank 0 holds the metrics log and the lock; the other ranks none).
    #[allow(clippy::type_complexity)]
    fn new(
        (be, cfg, opts, model, method, data): (
            &'a B,
            &'a RunConfig,
            &'a TrainOptions<'a>,
            &'a Backbone<B>,
            Box<dyn PromptMethod<B>>,
            &'a RunData,
        ),
        (opt, batcher, dev_batcher): (Optimizer<B>, Batcher<'a>, Batcher<'a>),
        (config_text, state, bar): (String, TrainState, ProgressBar),
        (metrics, lock): (Option<MetricsLog>, Option<RunLock>),
        (records, evals, changed): (
            Vec<StepRecord>,
            Vec<EvalPoint>,
            Vec<(String, String, String)>,
        ),
    ) -> Self {
        Run {
            be,
            cfg,
            opts,
            model,
            method,
            data,
            opt,
            batcher,
            dev_batcher,
            eval_opts: eval_options(cfg),
            ckpt_path: cfg.out_dir.join("checkpoint.safetensors"),
            config_text,
            state,
            bar,
            records,
            dev_losses: Vec::new(),
            dev_scores: Vec::new(),
            truncated_rows: 0,
            tokens_total: 0,
            run_start: Instant::now(),
            metrics,
            _lock: lock,
            line_every: (cfg.train.steps as u64 / 10).max(1),
            last_line: Instant::now(),
            changed,
            evals,
            early_stop: None,
        }
    }

    /// Rank 0: the one that writes the run folder.
    fn writer(&self) -> bool {
        self.metrics.is_some()
    }

    /// Appends a metrics.jsonl line (rank 0; nothing on the other ranks).
    fn append_metrics(&mut self, line: &serde_json::Value) -> Result<()> {
        match &mut self.metrics {
            Some(m) => m.append(line),
            None => Ok(()),
        }
    }

    /// Makes metrics.jsonl durable (rank 0).
    fn sync_metrics(&self) -> Result<()> {
        self.metrics.as_ref().map_or(Ok(()), MetricsLog::sync)
    }

    /// Steps until the configured count or an interrupt: each step, then the dev evaluation
    /// and the checkpoint when they are due. A signal is looked at after each step (the step
    /// in progress is finished first).
    fn step_loop(&mut self) -> Result<Stopped> {
        let tc = &self.cfg.train;
        let total = tc.steps as u64;
        let mut pos = Position {
            epoch: self.state.epoch,
            cursor: self.state.cursor,
        };
        while self.state.step < total {
            // Checked before each step: a resume of a run that early stopping had ended (a
            // signal then stopped its final evaluation) takes no step.
            if self.should_stop_early()? {
                return Ok(Stopped::Finished);
            }
            let step = self.state.step + 1;
            let agreed;
            (pos, agreed) = self.train_step(step, pos)?;
            if tc.eval_every > 0 && step.is_multiple_of(tc.eval_every as u64) {
                self.evaluate_dev(step)?;
            }
            self.progress_line(step, total);
            // Several ranks stop at the step they agreed on in its all-reduce; one process
            // looks at its flag now.
            let signal = agreed.unwrap_or_else(|| self.opts.interrupt.load(Ordering::SeqCst));
            if (tc.checkpoint_every > 0 && step.is_multiple_of(tc.checkpoint_every as u64))
                || signal != 0
            {
                self.save_checkpoint()?;
            }
            if signal != 0 {
                return Ok(Stopped::Interrupted(signal));
            }
        }
        Ok(Stopped::Finished)
    }

    /// Early stopping: `train.early_stopping_patience` periodic dev evaluations since the one
    /// that set the keep-best value (none better since). Sets `early_stop`, writes its
    /// metrics.jsonl line and says so.
    fn should_stop_early(&mut self) -> Result<bool> {
        let patience = self.cfg.train.early_stopping_patience;
        let (Some(best_step), Some(best)) = (self.state.best_step, self.state.best_metric) else {
            return Ok(false);
        };
        let since = self.evals.iter().filter(|e| e.step > best_step).count();
        if patience == 0 || since < patience {
            return Ok(false);
        }
        let stop = EarlyStop {
            step: self.state.step,
            patience,
            best_step,
            best,
            compared: compared(self.data).to_string(),
        };
        let line = stop.describe();
        self.append_metrics(&serde_json::json!({
            "kind": "early_stop",
            "step": stop.step,
            "patience": patience,
            "best_step": best_step,
            "best": best,
            "compared": stop.compared,
            "reason": line,
            "time": unix_time(),
        }))?;
        self.say(line);
        self.early_stop = Some(stop);
        Ok(true)
    }

    /// A line above the progress bar on a terminal, a plain line in a log, nothing without
    /// progress output.
    fn say(&self, line: String) {
        match (self.opts.progress, self.bar.is_hidden()) {
            (true, true) => println!("{line}"),
            (true, false) => self.bar.println(line),
            (false, _) => {}
        }
    }

    /// A plain line when stdout is not a terminal (a cluster log shows the run is alive):
    /// every tenth of the run, every [`LINE_SECONDS`], and at the last step.
    fn progress_line(&mut self, step: u64, total: u64) {
        if !self.opts.progress || !self.bar.is_hidden() {
            return;
        }
        let due = step.is_multiple_of(self.line_every)
            || step == total
            || self.last_line.elapsed().as_secs_f64() >= LINE_SECONDS;
        let Some(r) = self.records.last().filter(|_| due) else {
            return;
        };
        println!(
            "step {step}/{total} ({:.0}%): loss {:.4}, lr {:.2e}, grad norm {:.3e}, {:.0} tok/s, \
             {:.1} s",
            step as f64 * 100.0 / total.max(1) as f64,
            r.loss,
            r.lr,
            r.grad_norm,
            r.tokens as f64 / r.seconds.max(1e-9),
            self.run_start.elapsed().as_secs_f64()
        );
        self.last_line = Instant::now();
    }

    /// Optimizer step `step` over `grad_accum` micro-batches from data position `pos`; returns
    /// the position after them, and with several ranks the signal they agreed on (see
    /// [`Self::all_reduce_step`]). The loss and the gradient norm are checked before the
    /// optimizer step: a non-finite one stops the run (its metrics line is written first).
    fn train_step(&mut self, step: u64, mut pos: Position) -> Result<(Position, Option<usize>)> {
        let (be, tc) = (self.be, &self.cfg.train);
        let ranks = self.opts.ranks;
        let t0 = Instant::now();
        zero_grads(be, self.method.as_mut());
        let (mut loss_sum, mut tokens) = (0.0, 0u64);
        for _ in 0..tc.grad_accum {
            // Every rank forms the whole batch (the same on all: same data, seed, position).
            let (batch, next, truncated) = self.batcher.next_batch(pos)?;
            pos = next;
            self.truncated_rows += truncated as u64;
            tokens += batch_tokens(&batch);
            loss_sum += match ranks.size() {
                1 => train_step(be, self.model, Some(self.method.as_mut()), &batch)?,
                n => {
                    // Rank r's rows r, r + n, ..., their loss a share of the whole batch's mean.
                    let label_tokens = self.model.label_count(&batch, self.method.prompt_rows());
                    let rows: Vec<usize> = (ranks.rank()..batch.batch).step_by(n).collect();
                    match rows.is_empty() {
                        true => 0.0,
                        false => train_step_share(
                            be,
                            self.model,
                            Some(self.method.as_mut()),
                            &batch.select_rows(&rows),
                            label_tokens,
                        )?,
                    }
                }
            };
        }
        let agreed = match ranks.size() {
            1 => None,
            _ => Some(self.all_reduce_step(&mut loss_sum)?),
        };
        let loss = loss_sum / tc.grad_accum as f64;
        if self.opts.nan_grad_at_step == Some(step) {
            for p in self.method.params_mut() {
                p.grad = be.upload_f64(&vec![f64::NAN; p.numel()]);
            }
        }
        let grad_scale = 1.0 / tc.grad_accum as f64;
        let grad_norm = Optimizer::grad_norm(be, self.method.as_ref(), grad_scale);
        let factor = lr_factor(tc.schedule, step as usize, tc.warmup_steps, tc.steps);
        let seconds = t0.elapsed().as_secs_f64();
        let record = StepRecord {
            step,
            loss,
            lr: self.opt.lr() * factor,
            grad_norm,
            seconds,
            tokens,
        };
        self.log_step(&record)?;
        self.records.push(record);
        for (what, value) in [("the loss", loss), ("the gradient norm", grad_norm)] {
            if !value.is_finite() {
                return Err(self.stop_message(step, what, value, loss));
            }
        }
        let info = self
            .opt
            .apply(be, self.method.as_mut(), factor, grad_scale, grad_norm);
        if ranks.size() > 1 {
            if self.opts.diverge_at_step == Some(step) && ranks.rank() + 1 == ranks.size() {
                if let Some(p) = self.method.params_mut().first_mut() {
                    let mut v = be.download_f64(&p.value);
                    v[0] += 1e-3;
                    p.value = be.upload_f64(&v);
                }
            }
            let every = self.opts.check_replicas_every;
            if every > 0 && (step.is_multiple_of(every) || step == tc.steps as u64) {
                self.check_replicas(step)?;
            }
        }
        self.state.step = step;
        self.state.epoch = pos.epoch;
        self.state.cursor = pos.cursor;
        self.state.losses.push((step, loss));
        self.tokens_total += tokens;
        self.bar.set_position(step);
        self.bar.set_message(format!(
            "loss {loss:.4}  lr {:.2e}  {:.0} tok/s",
            info.lr,
            tokens as f64 / seconds.max(1e-9)
        ));
        Ok((pos, agreed))
    }

    /// The one collective of a step on several ranks: a flat buffer of every method gradient,
    /// this rank's share of the loss and its stop flags (signalled, signal number), summed
    /// across ranks. The gradients and `loss_sum` become the whole batch's; returns the signal
    /// the ranks agree to stop on (0: none; the number when they all got the same one).
    fn all_reduce_step(&mut self, loss_sum: &mut f64) -> Result<usize> {
        let flags = signal_flags(self.opts.interrupt.load(Ordering::SeqCst));
        let mut extra = [*loss_sum, flags[0], flags[1], flags[2]];
        all_reduce_grads(self.be, self.method.as_mut(), self.opts.ranks, &mut extra)?;
        *loss_sum = extra[0];
        Ok(agreed_signal([extra[1], extra[2], extra[3]]))
    }

    /// Every rank compares a hash of its method parameters with the others': an error naming
    /// the step and the ranks when they differ (data-parallel replicas must stay identical).
    fn check_replicas(&self, step: u64) -> Result<()> {
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        for p in self.method.params() {
            for x in self.be.download_f64(&p.value) {
                for b in x.to_bits().to_le_bytes() {
                    h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
                }
            }
        }
        let all = self.opts.ranks.all_gather(&h.to_le_bytes())?;
        let hashes: Vec<String> = all
            .iter()
            .map(|b| b.iter().rev().map(|x| format!("{x:02x}")).collect())
            .collect();
        if hashes.iter().any(|x| *x != hashes[0]) {
            let list = hashes
                .iter()
                .enumerate()
                .map(|(r, x)| format!("rank {r} {x}"))
                .collect::<Vec<_>>()
                .join(", ");
            return Err(Error::Ranks(format!(
                "step {step}: the method parameters differ across ranks after the optimizer \
                 step ({list}); the ranks must run the same fastpt, config and data. {}",
                self.last_good()
            )));
        }
        Ok(())
    }

    /// The signal every rank stops on, agreed through a collective (one process: its flag).
    fn agreed_signal_now(&self) -> Result<usize> {
        let signal = self.opts.interrupt.load(Ordering::SeqCst);
        if self.opts.ranks.size() == 1 {
            return Ok(signal);
        }
        let mut flags = signal_flags(signal);
        self.opts.ranks.all_reduce_sum_f64(&mut flags)?;
        Ok(agreed_signal(flags))
    }

    /// One `kind: step` line of metrics.jsonl.
    fn log_step(&mut self, r: &StepRecord) -> Result<()> {
        let finite = |x: f64| x.is_finite().then_some(x);
        self.append_metrics(&serde_json::json!({
            "kind": "step",
            "step": r.step,
            "loss": finite(r.loss),
            "lr": r.lr,
            "grad_norm": finite(r.grad_norm),
            "tokens": r.tokens,
            "tokens_per_s": r.tokens as f64 / r.seconds.max(1e-9),
            "seconds": r.seconds,
            "time": unix_time(),
        }))
    }

    /// One `kind: eval` line of metrics.jsonl.
    fn log_eval(
        &mut self,
        step: u64,
        split: &str,
        dev_loss: Option<f64>,
        metrics: &BTreeMap<String, f64>,
        score: Option<f64>,
    ) -> Result<()> {
        self.append_metrics(&serde_json::json!({
            "kind": "eval",
            "step": step,
            "split": split,
            // The evaluations during training (with a dev loss) or the final one.
            "periodic": dev_loss.is_some(),
            "dev_loss": dev_loss.filter(|x| x.is_finite()),
            "metrics": metrics,
            "score": score.filter(|x| x.is_finite()),
            "time": unix_time(),
        }))
    }

    /// The error that stops a run at a non-finite loss or gradient norm. It names the
    /// checkpoint to go back to only after loading it: the file must exist, hold finite values
    /// and a finite loss history, and the step it names is the one it holds.
    fn stop_message(&self, step: u64, what: &str, value: f64, loss: f64) -> Error {
        let loss_note = match what {
            "the loss" => String::new(),
            _ => format!(" (the loss was {loss})"),
        };
        Error::Input(format!(
            "step {step}: {what} is {value}{loss_note}; training stopped before the optimizer \
             step. {}. A smaller train.lr or train.max_grad_norm usually avoids this (start a \
             new run: a resume cannot change them)",
            self.last_good()
        ))
    }

    /// Which checkpoint a stopped run can go back to, checked by loading it: it must exist,
    /// hold finite values and one finite loss per step; the step named is the one it holds.
    fn last_good(&self) -> String {
        let path = &self.ckpt_path;
        match load_checkpoint(path) {
            Err(_) if !path.exists() => format!(
                "No checkpoint was written yet (train.checkpoint_every = {}), so there is none \
                 to go back to",
                self.cfg.train.checkpoint_every
            ),
            Err(e) => format!("The checkpoint in the run folder cannot be read ({e})"),
            Ok((tensors, st)) => {
                let finite = tensors.iter().all(|t| {
                    [&t.value, &t.m, &t.v]
                        .iter()
                        .all(|v| v.iter().all(|x| x.is_finite()))
                });
                let history =
                    st.losses.len() as u64 == st.step && st.losses.iter().all(|l| l.1.is_finite());
                if finite && history {
                    format!(
                        "The last good checkpoint (step {}) is kept in {}",
                        st.step,
                        path.display()
                    )
                } else {
                    format!(
                        "The checkpoint in {} (step {}) holds non-finite values: there is no good \
                         checkpoint to go back to",
                        path.display(),
                        st.step
                    )
                }
            }
        }
    }

    /// The dev loss, a text task's dev metrics, and keep-best: `best.safetensors` when the
    /// value improved (a text task keeps the highest mean of its metrics, the synthetic task
    /// the lowest dev loss).
    fn evaluate_dev(&mut self, step: u64) -> Result<()> {
        let be = self.be;
        let dl = dev_loss(
            be,
            self.model,
            self.method.as_mut(),
            &self.dev_batcher,
            &self.data.dev,
            self.opts.ranks,
        )?;
        self.dev_losses.push((step, dl));
        let (value, line) = match &self.data.text {
            Some(t) => {
                let cap = match self.cfg.data.max_eval_examples {
                    0 => t.task.dev.len(),
                    n => n.min(t.task.dev.len()),
                };
                let ev = t.evaluate(
                    be,
                    self.model,
                    self.method.as_mut(),
                    &t.task.dev[..cap],
                    &self.eval_opts,
                    self.opts.ranks,
                )?;
                self.dev_scores.push((step, ev.score));
                self.log_eval(step, "dev", Some(dl), &ev.metrics, Some(ev.score))?;
                let line = format!(
                    "step {step}: dev loss {dl:.4}, dev {}",
                    metrics_line(&ev.metrics)
                );
                (ev.score, line)
            }
            None => {
                self.log_eval(step, "dev", Some(dl), &BTreeMap::new(), None)?;
                (dl, format!("step {step}: dev loss {dl:.4}"))
            }
        };
        self.evals.push(EvalPoint {
            step,
            dev_loss: dl,
            score: self.data.text.as_ref().map(|_| value),
        });
        // Above the bar on a terminal; a plain line in a log.
        self.say(line);
        let better = |best: f64| match self.data.text {
            Some(_) => value > best,
            None => value < best,
        };
        if self.state.best_metric.is_none_or(better) {
            self.state.best_metric = Some(value);
            self.state.best_step = Some(step);
            if self.writer() {
                let best = self.cfg.out_dir.join("best.safetensors");
                save_params(be, self.method.as_ref(), &best)?;
            }
        }
        Ok(())
    }

    /// checkpoint.safetensors (the parameters, the AdamW moments and the state), after
    /// checking every value is finite (a checkpoint is always one to go back to); then
    /// metrics.jsonl is made durable and report.json rewritten.
    fn save_checkpoint(&mut self) -> Result<()> {
        let tensors = optim_tensors(self.be, self.method.as_ref(), &self.opt);
        for t in &tensors {
            for (part, values) in [("param", &t.value), ("adam_m", &t.m), ("adam_v", &t.v)] {
                if let Some(x) = values.iter().find(|x| !x.is_finite()) {
                    return Err(Error::Input(format!(
                        "step {}: {part}/{} holds {x} after the optimizer step; training \
                         stopped without writing this checkpoint. {}. A smaller train.lr \
                         usually avoids this",
                        self.state.step,
                        t.name,
                        self.last_good()
                    )));
                }
            }
        }
        if !self.writer() {
            return Ok(());
        }
        save_checkpoint(&self.ckpt_path, &tensors, &self.state)?;
        self.sync_metrics()?;
        self.write_report("running", &BTreeMap::new())
    }

    /// An error ends the run: report.json (stopped: the error) is written and the metrics made
    /// durable, best effort (the error itself is what the user needs).
    fn failed(&mut self, e: Error) -> Error {
        self.bar.abandon();
        if !self.writer() {
            return e;
        }
        let _ = self.sync_metrics();
        let _ = self.write_report(&format!("error: {e}"), &BTreeMap::new());
        if !self.state.losses.is_empty() {
            let _ = self.write_loss_svg();
        }
        e
    }

    /// The end of a run: a finished one writes its last checkpoint and method.safetensors and
    /// evaluates and exports its best parameters; both write report.json and loss.svg.
    fn finish(&mut self, stopped: Stopped) -> Result<Outcome> {
        self.bar.finish_and_clear();
        let seconds = self.run_start.elapsed().as_secs_f64();
        let tokens_per_second = self.tokens_total as f64 / seconds.max(1e-9);
        let mut eval = BTreeMap::new();
        if let (Some(best), Some(step)) = (self.state.best_metric, self.state.best_step) {
            let key = if self.data.text.is_some() {
                "best_dev_score"
            } else {
                "best_dev_loss"
            };
            eval.insert(key.to_string(), best);
            eval.insert("best_step".to_string(), step as f64);
        }
        if let Some(&(_, last)) = self.dev_losses.last() {
            eval.insert("last_dev_loss".to_string(), last);
        }
        let mut stopped = stopped;
        if stopped == Stopped::Finished {
            if let Some(signal) = self.final_evaluation_and_export(&mut eval)? {
                // The report then says "interrupted": a resume finds the run unfinished and
                // does the final evaluation again (no step is redone).
                stopped = Stopped::Interrupted(signal);
            }
        }
        if self.writer() {
            self.sync_metrics()?;
            self.write_report(&stopped.describe(), &eval)?;
            if !self.state.losses.is_empty() {
                self.write_loss_svg()?;
            }
        }
        Ok(Outcome {
            run_dir: self.cfg.out_dir.clone(),
            stopped,
            losses: self.state.losses.clone(),
            dev_losses: self.dev_losses.clone(),
            dev_scores: self.dev_scores.clone(),
            best: self.state.best_step.zip(self.state.best_metric),
            eval,
            tokens_per_second,
            seconds,
            changed: self.changed.clone(),
            total_steps: self.cfg.train.steps as u64,
            early_stop: self.early_stop.clone(),
        })
    }

    /// A finished run: the last checkpoint, method.safetensors, then with the best parameters
    /// (when there are any) the whole dev and test sets (into `eval`, predictions.jsonl,
    /// metrics.jsonl) and the export. A signal is acted on between these stages (an evaluation
    /// can take minutes, more than a scheduler waits after SIGTERM): `Some(signal)`.
    fn final_evaluation_and_export(
        &mut self,
        eval: &mut BTreeMap<String, f64>,
    ) -> Result<Option<usize>> {
        let be = self.be;
        let out_dir = self.cfg.out_dir.clone();
        let writer = self.writer();
        self.save_checkpoint()?;
        if writer {
            save_params(
                be,
                self.method.as_ref(),
                &out_dir.join("method.safetensors"),
            )?;
        }
        // The final evaluation and the export use the best parameters when there are any
        // (every rank evaluates its share with them: the folder is one all ranks see).
        let best = out_dir.join("best.safetensors");
        if self.state.best_step.is_some() && best.exists() {
            load_params(be, self.method.as_mut(), &best)?;
        }
        if let Some(t) = &self.data.text {
            for (split, examples) in [("dev", &t.task.dev), ("test", &t.task.test)] {
                match self.agreed_signal_now()? {
                    0 => {}
                    signal => return Ok(Some(signal)),
                }
                let ev = t.evaluate(
                    be,
                    self.model,
                    self.method.as_mut(),
                    examples,
                    &self.eval_opts,
                    self.opts.ranks,
                )?;
                for (name, value) in &ev.metrics {
                    eval.insert(format!("{split}_{name}"), *value);
                }
                eval.insert(format!("{split}_score"), ev.score);
                let step = self.state.step;
                self.log_eval(step, split, None, &ev.metrics, Some(ev.score))?;
                if split == "test" && writer {
                    write_predictions(&out_dir.join("predictions.jsonl"), examples, &ev)?;
                }
            }
        }
        let info = ExportInfo {
            kind: self.model.architecture(),
            base_model: Some(&self.cfg.model),
        };
        match self.agreed_signal_now()? {
            0 => {}
            signal => return Ok(Some(signal)),
        }
        if writer {
            export_prompt(be, self.method.as_mut(), &info, &out_dir.join("export"))?;
        }
        Ok(None)
    }

    /// report.json: every step of the run (metrics.jsonl's history), this process's tokens/s,
    /// `stopped` (running, finished, interrupted (SIGTERM), error: ...).
    fn write_report(&self, stopped: &str, eval: &BTreeMap<String, f64>) -> Result<()> {
        let cfg = self.cfg;
        let seconds = self.run_start.elapsed().as_secs_f64();
        let report = Report {
            config: toml_to_json(&self.config_text),
            backend: self.be.name(),
            model: cfg.model.clone(),
            method: cfg.method.name().to_string(),
            train_params: train_params(self.method.as_ref()),
            stored_params: self.method.stored_params(),
            steps: self.records.clone(),
            tokens_per_second: self.tokens_total as f64 / seconds.max(1e-9),
            peak_memory_bytes: peak_rss_bytes().unwrap_or(0),
            truncated_rows: self.truncated_rows,
            eval: eval.clone(),
            stopped: stopped.to_string(),
            early_stop: self.early_stop.as_ref().map(|e| {
                let mut v = serde_json::to_value(e).unwrap_or_default();
                v["reason"] = e.describe().into();
                v
            }),
        };
        report.write_json(&cfg.out_dir.join("report.json"))
    }

    /// loss.svg: the whole run's training loss, with the dev loss and a text task's dev score
    /// of its periodic evaluations when there are any.
    fn write_loss_svg(&self) -> Result<()> {
        let cfg = self.cfg;
        let title = format!(
            "{} on {}: {}",
            cfg.method.name(),
            cfg.model,
            match self.evals.is_empty() {
                true => "training loss",
                false => "loss",
            }
        );
        let dev_loss: Vec<(u64, f64)> = self.evals.iter().map(|e| (e.step, e.dev_loss)).collect();
        let score: Vec<(u64, f64)> = self
            .evals
            .iter()
            .filter_map(|e| Some((e.step, e.score?)))
            .collect();
        let metric_names = match &self.data.text {
            Some(t) => t
                .task
                .spec
                .metrics
                .iter()
                .map(|m| m.name())
                .collect::<Vec<_>>()
                .join(", "),
            None => String::new(),
        };
        let score_label = format!("dev score (mean of {metric_names})");
        let chart = LossChart {
            title: &title,
            train: &self.state.losses,
            dev_loss: &dev_loss,
            dev_metric: (!score.is_empty()).then_some((score_label.as_str(), score.as_slice())),
        };
        write_run_svg(&cfg.out_dir.join("loss.svg"), &chart)
    }
}

/// The `kind: step` lines of metrics.jsonl as report records (a null number reads as NaN).
fn step_records(lines: &[serde_json::Value]) -> Vec<StepRecord> {
    let num = |v: &serde_json::Value| v.as_f64().unwrap_or(f64::NAN);
    lines
        .iter()
        .filter(|v| v["kind"] == "step")
        .filter_map(|v| {
            Some(StepRecord {
                step: v["step"].as_u64()?,
                loss: num(&v["loss"]),
                lr: num(&v["lr"]),
                grad_norm: num(&v["grad_norm"]),
                seconds: num(&v["seconds"]),
                tokens: v["tokens"].as_u64().unwrap_or(0),
            })
        })
        .collect()
}

/// A progress bar of `total` steps at `step` (hidden unless asked for and stdout is a
/// terminal).
fn progress_bar(opts: &TrainOptions<'_>, total: u64, step: u64) -> ProgressBar {
    if opts.progress && std::io::stdout().is_terminal() {
        let bar = ProgressBar::new(total);
        let style = ProgressStyle::with_template("{bar:30} step {pos}/{len}  {msg}  ETA {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
        bar.set_position(step);
        bar
    } else {
        ProgressBar::hidden()
    }
}

/// `name value` pairs, values as percentages (as the papers print them).
pub fn metrics_line(metrics: &BTreeMap<String, f64>) -> String {
    metrics
        .iter()
        .map(|(k, v)| format!("{k} {:.2}", v * 100.0))
        .collect::<Vec<_>>()
        .join(", ")
}

/// One JSON line per example: input, target and prediction.
fn write_predictions(path: &Path, examples: &[TextExample], ev: &Evaluation) -> Result<()> {
    let mut text = String::new();
    for (ex, pred) in examples.iter().zip(&ev.predictions) {
        let line = serde_json::json!({
            "input": ex.input,
            "target": ex.target,
            "prediction": pred,
        });
        text.push_str(&line.to_string());
        text.push('\n');
    }
    write_file_atomic(path, text.as_bytes(), &mut || Ok(()))
}

/// Which parameters of a run folder to evaluate or export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunParams {
    /// best.safetensors (keep-best), else method.safetensors.
    Best,
    /// method.safetensors: the parameters after the last step.
    Last,
}

/// The parameter file of a finished run: keep-best's (best.safetensors, else the last) or the
/// last (method.safetensors); an error when the run never wrote one.
fn params_file(run_dir: &Path, params: RunParams) -> Result<PathBuf> {
    let best = run_dir.join("best.safetensors");
    let path = match params {
        RunParams::Best if best.exists() => best,
        _ => run_dir.join("method.safetensors"),
    };
    if !path.exists() {
        return Err(Error::Input(format!(
            "{}: no trained parameters (the run did not finish: resume it first)",
            path.display()
        )));
    }
    Ok(path)
}

/// A finished run folder's model and method with the chosen parameters loaded.
fn open_run<B: Backend + 'static>(
    be: &B,
    run_dir: &Path,
    params: RunParams,
) -> Result<(RunConfig, Setup<B>, PathBuf)> {
    let config_path = run_dir.join("config.toml");
    let cfg = RunConfig::from_file(&config_path, &[])?;
    let mut s = setup(be, &cfg)?;
    let path = params_file(run_dir, params)?;
    load_params(be, s.method.as_mut(), &path)?;
    Ok((cfg, s, path))
}

/// `fastpt eval`: evaluates a run folder's parameters on its task's `split` (dev or test),
/// optionally with another evaluation mode. Returns the evaluation and the parameter file used.
pub fn evaluate_run<B: Backend + 'static>(
    be: &B,
    run_dir: &Path,
    params: RunParams,
    split: &str,
    mode: Option<EvalMode>,
) -> Result<(Evaluation, PathBuf)> {
    let (cfg, mut s, path) = open_run(be, run_dir, params)?;
    let Some(t) = &s.data.text else {
        return Err(Error::Input(format!(
            "{}: the run's task is {:?}, which has no metrics (only a dev loss)",
            run_dir.display(),
            cfg.data.task
        )));
    };
    let examples = match split {
        "dev" => &t.task.dev,
        "test" => &t.task.test,
        other => {
            return Err(Error::Input(format!(
                "unknown split {other:?}: dev or test"
            )))
        }
    };
    let mut opts = eval_options(&cfg);
    if let Some(mode) = mode {
        opts.mode = mode;
    }
    let ev = t.evaluate(
        be,
        &s.model,
        s.method.as_mut(),
        examples,
        &opts,
        &SingleProcess,
    )?;
    Ok((ev, path))
}

/// `fastpt export`: writes a run folder's prompt (see [`export_prompt`]) into `out`.
pub fn export_run<B: Backend + 'static>(
    be: &B,
    run_dir: &Path,
    params: RunParams,
    out: &Path,
) -> Result<Exported> {
    let (cfg, mut s, _) = open_run(be, run_dir, params)?;
    let info = ExportInfo {
        kind: s.model.architecture(),
        base_model: Some(&cfg.model),
    };
    export_prompt(be, s.method.as_mut(), &info, out)
}

/// What [`open_run_model`] returns: the run's config, its backbone, its method with the
/// parameters loaded, and the parameter file.
pub type OpenedRun<B> = (RunConfig, Backbone<B>, Box<dyn PromptMethod<B>>, PathBuf);

/// A finished run's backbone and method with the chosen parameters loaded, without its data
/// (`fastpt predict`, `fastpt eval --task`): the run's task files need not exist any more.
/// `quant` replaces the run's `quant` when given. Returns the run's config (the model and
/// method it names), both, and the parameter file used.
pub fn open_run_model<B: Backend + 'static>(
    be: &B,
    run_dir: &Path,
    params: RunParams,
    quant: Option<crate::model::linear::Quant>,
) -> Result<OpenedRun<B>> {
    let config_path = run_dir.join("config.toml");
    let mut cfg = RunConfig::from_file(&config_path, &[])?;
    if let Some(q) = quant {
        cfg.quant = q;
    }
    let path = params_file(run_dir, params)?;
    // As `setup` builds them (the same init, then the saved parameters over it), minus the data.
    let (model, mut method) = model_and_method(be, &cfg)?;
    load_params(be, method.as_mut(), &path)?;
    Ok((cfg, model, method, path))
}

/// The evaluation settings of a run (batch size, lengths, mode), for predictions made outside
/// it that must equal its own.
pub fn run_eval_options(cfg: &RunConfig) -> EvalOptions {
    eval_options(cfg)
}

/// `fastpt eval RUN --task T --data DIR`: evaluates a run's prompt on another task's `split`
/// (transfer): the target task's template, labels (in the run's label style) and metrics, the
/// run's evaluation settings. Returns the evaluation, the parameter file and the task's name.
pub fn evaluate_transfer<B: Backend + 'static>(
    be: &B,
    run_dir: &Path,
    params: RunParams,
    task: &str,
    data_dir: &Path,
    split: &str,
    mode: Option<EvalMode>,
) -> Result<(Evaluation, PathBuf, String)> {
    if !matches!(split, "dev" | "test") {
        return Err(Error::Input(format!(
            "unknown split {split:?}: dev or test"
        )));
    }
    let config_path = run_dir.join("config.toml");
    let cfg = RunConfig::from_file(&config_path, &[])?;
    // The task first: a wrong name or folder is reported before the model is loaded.
    let opts = cfg.data.task_options();
    let data = if task.ends_with(".toml") {
        load_custom_task(Path::new(task), data_dir, &opts)?
    } else {
        load_task(task, data_dir, &opts)?
    };
    let examples = if split == "dev" {
        &data.dev
    } else {
        &data.test
    };
    let (cfg, model, mut method, path) = open_run_model(be, run_dir, params, None)?;
    let codec = TextCodec::load(Path::new(&cfg.model), &model)?;
    codec.check_classes(&data.spec)?;
    let mut eo = eval_options(&cfg);
    if let Some(mode) = mode {
        eo.mode = mode;
    }
    let ev = evaluate(
        be,
        &model,
        Some(method.as_mut()),
        &codec,
        &data.spec,
        examples,
        &eo,
    )?;
    Ok((ev, path, data.spec.name))
}

/// Parameters (the optimiser's masters) and moments of every method tensor, for a checkpoint.
fn optim_tensors<B: Backend>(
    be: &B,
    method: &dyn PromptMethod<B>,
    opt: &Optimizer<B>,
) -> Vec<OptimTensor> {
    method
        .params()
        .iter()
        .zip(opt.masters(be))
        .zip(opt.moments(be))
        .map(|((p, value), (m, v))| OptimTensor {
            name: p.name.clone(),
            shape: p.shape.clone(),
            value,
            m,
            v,
        })
        .collect()
}

/// The checkpoint tensor of parameter `name`, which must have `shape`.
fn checkpoint_tensor<'t>(
    tensors: &'t [OptimTensor],
    name: &str,
    shape: &[usize],
    path: &Path,
) -> Result<&'t OptimTensor> {
    let t = tensors
        .iter()
        .find(|t| t.name == name)
        .ok_or_else(|| Error::MissingTensors {
            path: path.to_path_buf(),
            count: 1,
            names: vec![name.to_string()],
        })?;
    if t.shape != shape {
        return Err(Error::Shape {
            path: path.to_path_buf(),
            name: name.to_string(),
            expected: shape.to_vec(),
            found: t.shape.clone(),
        });
    }
    Ok(t)
}

/// Puts a checkpoint's tensors back into the method and the optimiser.
fn restore<B: Backend>(
    be: &B,
    method: &mut dyn PromptMethod<B>,
    opt: &mut Optimizer<B>,
    tensors: &[OptimTensor],
    step: u64,
    path: &Path,
) -> Result<()> {
    let (mut values, mut moments) = (Vec::new(), Vec::new());
    for p in method.params_mut() {
        let t = checkpoint_tensor(tensors, &p.name, &p.shape, path)?;
        p.value = be.upload_f64(&t.value);
        values.push(t.value.clone());
        moments.push((t.m.clone(), t.v.clone()));
    }
    opt.restore(be, &values, &moments, step);
    Ok(())
}

/// The effective config as JSON for report.json.
fn toml_to_json(text: &str) -> serde_json::Value {
    toml::from_str::<toml::Table>(text)
        .ok()
        .and_then(|t| serde_json::to_value(t).ok())
        .unwrap_or(serde_json::Value::Null)
}
