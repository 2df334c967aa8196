//! The training loop of `fastpt run`: model and method from the run config, batches from the
//! task, AdamW steps with the schedule, evaluation and keep-best, checkpoints that never lose
//! work, and the run folder (config.toml, checkpoint.safetensors, best.safetensors,
//! method.safetensors, report.json, loss.svg).
//!
//! State that a checkpoint must hold for an exact resume: the method parameters, the AdamW
//! moments and step, and the data position (epoch, cursor) — the data order is a function of
//! the seed and the epoch, and the steps themselves are deterministic, so nothing else is needed.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

use super::checkpoint::{load_checkpoint, save_checkpoint, OptimTensor, TrainState};
use super::export::{export_prompt, init_from_adapter, ExportInfo, Exported};
use super::optim::Optimizer;
use super::report::{peak_rss_bytes, write_loss_svg, Report, StepRecord};
use super::schedule::lr_factor;
use crate::backend::Backend;
use crate::config::RunConfig;
use crate::data::batching::{Batcher, Position};
use crate::data::tasks::{load_custom_task, load_task, TaskData, TextExample};
use crate::data::tokenize::TextCodec;
use crate::data::{synthetic, Example, HostBatch};
use crate::engine::{build_backbone_method, forward_loss, train_step};
use crate::error::{Error, Result};
use crate::eval::{evaluate, EvalMode, EvalOptions, Evaluation};
use crate::fsutil::write_file_atomic;
use crate::model::hf::load_tokenizer;
use crate::model::shapes::is_builtin_shape;
use crate::model::{load_model, random_model, Backbone};
use crate::prompt::{load_params, save_params, train_params, zero_grads, PromptMethod};

/// The run config of `fastpt run` without `--config` (src/train/default_run.toml).
pub const DEFAULT_RUN_TOML: &str = include_str!("default_run.toml");

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    Finished,
    /// Ctrl-C: a checkpoint was written; `--resume` continues.
    Interrupted,
}

/// The summary `fastpt run` prints.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub run_dir: PathBuf,
    pub stopped: Stopped,
    /// (step, mean training loss of the step).
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
}

/// Options of one `train` call that are not part of the run config.
pub struct TrainOptions<'a> {
    /// Continue from `out_dir/checkpoint.safetensors`.
    pub resume: bool,
    /// Set (by a Ctrl-C handler) to stop after the current step with a checkpoint.
    pub interrupt: &'a AtomicBool,
    /// Show a progress bar (only when stdout is a terminal).
    pub progress: bool,
    /// A PEFT prompt-tuning adapter folder whose rows start a PT method (a warm start).
    pub init_from: Option<&'a Path>,
}

/// A short hash of the effective config: a resume must continue the same run.
fn config_hash(text: &str) -> String {
    let h = text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("{h:016x}")
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
    fn evaluate<B: Backend>(
        &self,
        be: &B,
        model: &Backbone<B>,
        method: &mut dyn PromptMethod<B>,
        examples: &[TextExample],
        opts: &EvalOptions,
    ) -> Result<Evaluation> {
        evaluate(
            be,
            model,
            Some(method),
            &self.codec,
            &self.task.spec,
            examples,
            opts,
        )
    }
}

/// Loads (or generates) the configured task for `model`.
fn run_data<B: Backend>(be_model: &Backbone<B>, cfg: &RunConfig) -> Result<RunData> {
    let d = &cfg.data;
    if d.is_synthetic() {
        let (vocab, eos) = (be_model.vocab_size(), be_model.special_ids().eos);
        return Ok(RunData {
            train: synthetic::keyword_task(d.train_examples, vocab, eos, cfg.seed),
            dev: synthetic::keyword_task(d.dev_examples, vocab, eos, cfg.seed.wrapping_add(1)),
            text: None,
        });
    }
    let dir = d.dir.as_deref().ok_or_else(|| {
        Error::config(
            "<run config>",
            "data.dir",
            "a text task needs its data folder",
        )
    })?;
    let task = if d.task.ends_with(".toml") {
        load_custom_task(Path::new(&d.task), dir, &d.task_options())?
    } else {
        load_task(&d.task, dir, &d.task_options())?
    };
    for (split, examples) in [
        ("train", &task.train),
        ("dev", &task.dev),
        ("test", &task.test),
    ] {
        if examples.is_empty() {
            return Err(Error::Input(format!(
                "task {} in {}: the {split} split is empty",
                task.spec.name,
                dir.display()
            )));
        }
    }
    let codec = TextCodec::load(Path::new(&cfg.model), be_model)?;
    Ok(RunData {
        train: codec.examples("train", &task.train)?,
        dev: codec.examples("dev", &task.dev)?,
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
    cfg.check_memory(be)?; // issue 19: refuse what cannot fit before loading anything
    let tc = &cfg.train;
    let model = if is_builtin_shape(&cfg.model) {
        random_model(be, &cfg.model, cfg.seed, cfg.quant)?
    } else {
        load_model(be, Path::new(&cfg.model), cfg.quant)?
    };
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
    cfg.method.validate(model.width(), tc.max_len)?;
    let method =
        build_backbone_method(be, &model, &cfg.method, tc.max_len, cfg.seed, tokenize_ref)?;
    let data = run_data(&model, cfg)?;
    Ok(Setup {
        model,
        method,
        data,
    })
}

/// A batcher over `examples` with the run's lengths and the model's special ids.
fn run_batcher<'a, B: Backend>(
    model: &Backbone<B>,
    examples: &'a [Example],
    cfg: &RunConfig,
) -> Batcher<'a> {
    let tc = &cfg.train;
    Batcher::new(
        examples,
        tc.batch_size,
        tc.max_len,
        tc.max_target_len,
        tc.group_by_length,
        cfg.seed,
        model.batch_ids(),
    )
    .causal(model.is_decoder_only())
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

/// Mean loss over the dev examples, forward only.
fn dev_loss<B: Backend>(
    be: &B,
    model: &Backbone<B>,
    method: &mut dyn PromptMethod<B>,
    batcher: &Batcher<'_>,
    dev: &[Example],
) -> Result<f64> {
    let (mut sum, mut n) = (0.0, 0usize);
    for chunk in dev.chunks(32) {
        let rows: Vec<&Example> = chunk.iter().collect();
        let (batch, _) = batcher.pad(&rows);
        sum += forward_loss(be, model, Some(method), &batch)? * chunk.len() as f64;
        n += chunk.len();
    }
    Ok(sum / n.max(1) as f64)
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
/// done or an interrupt was requested; a NaN or infinite loss is an error naming the step (the
/// last checkpoint on disk is kept).
///
/// Keep-best: every `eval_every` steps the dev set is evaluated; a text task keeps the
/// parameters with the best mean of its metrics (higher is better), the synthetic task those
/// with the lowest dev loss, in `best.safetensors`. At the end a text task's best parameters
/// are evaluated on the whole dev and test sets (report.json `eval`, predictions.jsonl), and
/// the prompt they give is exported to `export/` (PEFT adapter where the method allows).
///
/// The phases: `setup` (model, method, data; nothing written yet), `Run::start` (the run
/// folder, the optimiser, a resumed checkpoint), `Run::step_loop` (steps, dev evaluations,
/// checkpoints, Ctrl-C), `Run::finish` (final checkpoint, evaluation, export, report).
pub fn train<B: Backend + 'static>(
    be: &B,
    cfg: &RunConfig,
    opts: &TrainOptions<'_>,
) -> Result<Outcome> {
    let ckpt_path = cfg.out_dir.join("checkpoint.safetensors");
    if !opts.resume && ckpt_path.exists() {
        return Err(Error::Input(format!(
            "{} holds a checkpoint from an earlier run: continue it with --resume, or choose \
             another out_dir (nothing was overwritten)",
            cfg.out_dir.display()
        )));
    }
    // Everything is loaded and checked before the run folder is touched.
    let Setup {
        model,
        mut method,
        data,
    } = setup(be, cfg)?;
    if let Some(dir) = opts.init_from {
        init_from_adapter(be, method.as_mut(), dir)?;
    }
    check_positions(&model, method.prompt_rows(), &data, &cfg.train)?;
    let mut run = Run::start(be, cfg, opts, &model, method, &data, ckpt_path)?;
    let stopped = run.step_loop()?;
    run.finish(stopped)
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
    /// Training steps of this process (a resumed run: since the resume).
    records: Vec<StepRecord>,
    /// (step, dev loss) and (step, mean of the dev metrics) of each evaluation.
    dev_losses: Vec<(u64, f64)>,
    dev_scores: Vec<(u64, f64)>,
    truncated_rows: u64,
    tokens_total: u64,
    run_start: Instant,
}

impl<'a, B: Backend + 'static> Run<'a, B> {
    /// Creates the run folder and writes config.toml; the optimiser, and with `--resume` the
    /// parameters, moments and data position of the checkpoint (refused if the config differs).
    fn start(
        be: &'a B,
        cfg: &'a RunConfig,
        opts: &'a TrainOptions<'a>,
        model: &'a Backbone<B>,
        mut method: Box<dyn PromptMethod<B>>,
        data: &'a RunData,
        ckpt_path: PathBuf,
    ) -> Result<Self> {
        let out_dir = &cfg.out_dir;
        std::fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))?;
        let mut opt = Optimizer::new(be, method.as_ref(), &cfg.train);
        let batcher = run_batcher(model, &data.train, cfg);
        let dev_batcher = run_batcher(model, &data.dev, cfg);

        // The effective config, echoed into the run folder and hashed for resume checks.
        let config_text = cfg.to_toml_string();
        let hash = config_hash(&config_text);
        write_file_atomic(
            &out_dir.join("config.toml"),
            config_text.as_bytes(),
            &mut || Ok(()),
        )?;

        let mut state = TrainState {
            step: 0,
            epoch: 0,
            cursor: 0,
            best_metric: None,
            best_step: None,
            losses: Vec::new(),
            config_hash: hash.clone(),
        };
        if opts.resume {
            let (tensors, saved) = load_checkpoint(&ckpt_path)?;
            if saved.config_hash != hash {
                return Err(Error::Input(format!(
                    "{}: the run config differs from the one the checkpoint was written with \
                     (compare {}); resume with the same config",
                    ckpt_path.display(),
                    out_dir.join("config.toml").display()
                )));
            }
            restore(
                be,
                method.as_mut(),
                &mut opt,
                &tensors,
                saved.step,
                &ckpt_path,
            )?;
            state = saved;
        }

        let bar = progress_bar(opts, cfg.train.steps as u64, state.step);
        Ok(Run {
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
            ckpt_path,
            config_text,
            state,
            bar,
            records: Vec::new(),
            dev_losses: Vec::new(),
            dev_scores: Vec::new(),
            truncated_rows: 0,
            tokens_total: 0,
            run_start: Instant::now(),
        })
    }

    /// Steps until the configured count or an interrupt: each step, then the dev evaluation
    /// and the checkpoint when they are due.
    fn step_loop(&mut self) -> Result<Stopped> {
        let tc = &self.cfg.train;
        let total = tc.steps as u64;
        let mut pos = Position {
            epoch: self.state.epoch,
            cursor: self.state.cursor,
        };
        while self.state.step < total {
            let step = self.state.step + 1;
            pos = self.train_step(step, pos)?;
            if tc.eval_every > 0 && step.is_multiple_of(tc.eval_every as u64) {
                self.evaluate_dev(step)?;
            }
            let interrupted = self.opts.interrupt.load(Ordering::SeqCst);
            if (tc.checkpoint_every > 0 && step.is_multiple_of(tc.checkpoint_every as u64))
                || interrupted
            {
                self.save_checkpoint()?;
            }
            if interrupted {
                return Ok(Stopped::Interrupted);
            }
        }
        Ok(Stopped::Finished)
    }

    /// Optimizer step `step` over `grad_accum` micro-batches from data position `pos`; returns
    /// the position after them.
    fn train_step(&mut self, step: u64, mut pos: Position) -> Result<Position> {
        let (be, tc) = (self.be, &self.cfg.train);
        let t0 = Instant::now();
        zero_grads(be, self.method.as_mut());
        let (mut loss_sum, mut tokens) = (0.0, 0u64);
        for _ in 0..tc.grad_accum {
            let (batch, next, truncated) = self.batcher.next_batch(pos);
            pos = next;
            self.truncated_rows += truncated as u64;
            tokens += batch_tokens(&batch);
            loss_sum += train_step(be, self.model, Some(self.method.as_mut()), &batch)?;
        }
        let loss = loss_sum / tc.grad_accum as f64;
        if !loss.is_finite() {
            return Err(Error::Input(format!(
                "step {step}: the loss is {loss}; training stopped. The last good checkpoint \
                 (step {}) is kept in {}",
                self.state.step,
                self.ckpt_path.display()
            )));
        }
        let factor = lr_factor(tc.schedule, step as usize, tc.warmup_steps, tc.steps);
        let info = self
            .opt
            .step(be, self.method.as_mut(), factor, 1.0 / tc.grad_accum as f64);
        self.state.step = step;
        self.state.epoch = pos.epoch;
        self.state.cursor = pos.cursor;
        self.state.losses.push((step, loss));
        self.tokens_total += tokens;
        let seconds = t0.elapsed().as_secs_f64();
        self.records.push(StepRecord {
            step,
            loss,
            lr: info.lr,
            seconds,
            tokens,
        });
        self.bar.set_position(step);
        self.bar.set_message(format!(
            "loss {loss:.4}  lr {:.2e}  {:.0} tok/s",
            info.lr,
            tokens as f64 / seconds.max(1e-9)
        ));
        Ok(pos)
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
        )?;
        self.dev_losses.push((step, dl));
        let value = match &self.data.text {
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
                )?;
                self.dev_scores.push((step, ev.score));
                let line = format!(
                    "step {step}: dev loss {dl:.4}, dev {}",
                    metrics_line(&ev.metrics)
                );
                // Above the bar on a terminal; a plain line in a log.
                match (self.opts.progress, self.bar.is_hidden()) {
                    (true, true) => println!("{line}"),
                    (true, false) => self.bar.println(line),
                    (false, _) => {}
                }
                ev.score
            }
            None => dl,
        };
        let better = |best: f64| match self.data.text {
            Some(_) => value > best,
            None => value < best,
        };
        if self.state.best_metric.is_none_or(better) {
            self.state.best_metric = Some(value);
            self.state.best_step = Some(step);
            let best = self.cfg.out_dir.join("best.safetensors");
            save_params(be, self.method.as_ref(), &best)?;
        }
        Ok(())
    }

    /// checkpoint.safetensors: the parameters, the AdamW moments and the state.
    fn save_checkpoint(&self) -> Result<()> {
        save_checkpoint(
            &self.ckpt_path,
            &optim_tensors(self.be, self.method.as_ref(), &self.opt),
            &self.state,
        )
    }

    /// The end of a run: a finished one writes its last checkpoint and method.safetensors and
    /// evaluates and exports its best parameters; both write report.json and loss.svg.
    fn finish(mut self, stopped: Stopped) -> Result<Outcome> {
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
        if stopped == Stopped::Finished {
            self.final_evaluation_and_export(&mut eval)?;
        }
        self.write_report(stopped, tokens_per_second, &eval)?;
        Ok(Outcome {
            run_dir: self.cfg.out_dir.clone(),
            stopped,
            losses: self.state.losses,
            dev_losses: self.dev_losses,
            dev_scores: self.dev_scores,
            best: self.state.best_step.zip(self.state.best_metric),
            eval,
            tokens_per_second,
            seconds,
        })
    }

    /// A finished run: the last checkpoint, method.safetensors, then with the best parameters
    /// (when there are any) the whole dev and test sets (into `eval`, predictions.jsonl) and
    /// the export.
    fn final_evaluation_and_export(&mut self, eval: &mut BTreeMap<String, f64>) -> Result<()> {
        let (be, out_dir) = (self.be, &self.cfg.out_dir);
        self.save_checkpoint()?;
        save_params(
            be,
            self.method.as_ref(),
            &out_dir.join("method.safetensors"),
        )?;
        // The final evaluation and the export use the best parameters when there are any.
        let best = out_dir.join("best.safetensors");
        if self.state.best_step.is_some() && best.exists() {
            load_params(be, self.method.as_mut(), &best)?;
        }
        if let Some(t) = &self.data.text {
            for (split, examples) in [("dev", &t.task.dev), ("test", &t.task.test)] {
                let ev = t.evaluate(
                    be,
                    self.model,
                    self.method.as_mut(),
                    examples,
                    &self.eval_opts,
                )?;
                for (name, value) in &ev.metrics {
                    eval.insert(format!("{split}_{name}"), *value);
                }
                eval.insert(format!("{split}_score"), ev.score);
                if split == "test" {
                    write_predictions(&out_dir.join("predictions.jsonl"), examples, &ev)?;
                }
            }
        }
        let info = ExportInfo {
            kind: self.model.architecture(),
            base_model: Some(&self.cfg.model),
        };
        export_prompt(be, self.method.as_mut(), &info, &out_dir.join("export"))?;
        Ok(())
    }

    /// report.json and, when there are losses, loss.svg.
    fn write_report(
        &mut self,
        stopped: Stopped,
        tokens_per_second: f64,
        eval: &BTreeMap<String, f64>,
    ) -> Result<()> {
        let (cfg, out_dir) = (self.cfg, &self.cfg.out_dir);
        let report = Report {
            config: toml_to_json(&self.config_text),
            backend: self.be.name(),
            model: cfg.model.clone(),
            method: cfg.method.name().to_string(),
            train_params: train_params(self.method.as_ref()),
            stored_params: self.method.stored_params(),
            steps: std::mem::take(&mut self.records),
            tokens_per_second,
            peak_memory_bytes: peak_rss_bytes().unwrap_or(0),
            truncated_rows: self.truncated_rows,
            eval: eval.clone(),
            stopped: match stopped {
                Stopped::Finished => "finished".into(),
                Stopped::Interrupted => "interrupted".into(),
            },
        };
        report.write_json(&out_dir.join("report.json"))?;
        if !self.state.losses.is_empty() {
            let title = format!("{} on {}: training loss", cfg.method.name(), cfg.model);
            write_loss_svg(&out_dir.join("loss.svg"), &self.state.losses, &title)?;
        }
        Ok(())
    }
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

/// A finished run folder's model and method with the chosen parameters loaded.
fn open_run<B: Backend + 'static>(
    be: &B,
    run_dir: &Path,
    params: RunParams,
) -> Result<(RunConfig, Setup<B>, PathBuf)> {
    let config_path = run_dir.join("config.toml");
    let cfg = RunConfig::from_file(&config_path, &[])?;
    let mut s = setup(be, &cfg)?;
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
    let ev = t.evaluate(be, &s.model, s.method.as_mut(), examples, &opts)?;
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
        let t = tensors
            .iter()
            .find(|t| t.name == p.name)
            .ok_or_else(|| Error::MissingTensors {
                path: path.to_path_buf(),
                count: 1,
                names: vec![p.name.clone()],
            })?;
        if t.shape != p.shape {
            return Err(Error::Shape {
                path: path.to_path_buf(),
                name: p.name.clone(),
                expected: p.shape.clone(),
                found: t.shape.clone(),
            });
        }
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
