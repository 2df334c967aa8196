//! The training loop of `fastpt run`: model and method from the run config, batches from the
//! task, AdamW steps with the schedule, evaluation and keep-best, checkpoints that never lose
//! work, and the run folder (config.toml, checkpoint.safetensors, best.safetensors,
//! method.safetensors, report.json, loss.svg).
//!
//! State that a checkpoint must hold for an exact resume: the method parameters, the AdamW
//! moments and step, and the data position (epoch, cursor) — the data order is a function of
//! the seed and the epoch, and the steps themselves are deterministic, so nothing else is needed.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

use super::checkpoint::{load_checkpoint, save_checkpoint, OptimTensor, TrainState};
use super::optim::Optimizer;
use super::report::{peak_rss_bytes, write_loss_svg, Report, StepRecord};
use super::schedule::lr_factor;
use crate::backend::Backend;
use crate::config::RunConfig;
use crate::data::batching::{Batcher, Position};
use crate::data::{synthetic, Example, HostBatch};
use crate::engine::{build_t5_method, t5_forward_backward, t5_loss};
use crate::error::{Error, Result};
use crate::fsutil::write_file_atomic;
use crate::model::hf::load_tokenizer;
use crate::model::shapes::T5_SHAPES;
use crate::model::t5::T5;
use crate::model::{load_t5, random_t5};
use crate::prompt::{save_params, train_params, zero_grads, PromptMethod};

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
    pub best: Option<(u64, f64)>,
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
}

/// Whether `model` names a built-in shape rather than a folder.
fn is_builtin_shape(model: &str) -> bool {
    T5_SHAPES.contains(&model)
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

/// The examples of the configured task: (train, dev).
fn task_examples(
    cfg: &RunConfig,
    model_vocab: usize,
    eos: i32,
) -> Result<(Vec<Example>, Vec<Example>)> {
    match cfg.data.task.as_str() {
        "synthetic" => Ok((
            synthetic::keyword_task(cfg.data.train_examples, model_vocab, eos, cfg.seed),
            synthetic::keyword_task(
                cfg.data.dev_examples,
                model_vocab,
                eos,
                cfg.seed.wrapping_add(1),
            ),
        )),
        other => Err(Error::Input(format!(
            "data.task = {other:?}: only the built-in \"synthetic\" task exists so far (GLUE / \
             SuperGLUE readers come with the tasks issue)"
        ))),
    }
}

/// Mean loss over the dev examples, forward only.
fn dev_loss<B: Backend>(
    be: &B,
    model: &T5<B>,
    method: &mut dyn PromptMethod<B>,
    batcher: &Batcher<'_>,
    dev: &[Example],
) -> Result<f64> {
    let (mut sum, mut n) = (0.0, 0usize);
    for chunk in dev.chunks(32) {
        let rows: Vec<&Example> = chunk.iter().collect();
        let (batch, _) = batcher.pad(&rows);
        sum += t5_loss(be, model, Some(method), &batch)? * chunk.len() as f64;
        n += chunk.len();
    }
    Ok(sum / n.max(1) as f64)
}

/// Trains the method of `cfg` and writes the run folder. Returns when the configured steps are
/// done or an interrupt was requested; a NaN or infinite loss is an error naming the step (the
/// last checkpoint on disk is kept).
pub fn train<B: Backend + 'static>(
    be: &B,
    cfg: &RunConfig,
    opts: &TrainOptions<'_>,
) -> Result<Outcome> {
    let tc = &cfg.train;
    let out_dir = cfg.out_dir.clone();
    let ckpt_path = out_dir.join("checkpoint.safetensors");
    if !opts.resume && ckpt_path.exists() {
        return Err(Error::Input(format!(
            "{} holds a checkpoint from an earlier run: continue it with --resume, or choose \
             another out_dir (nothing was overwritten)",
            out_dir.display()
        )));
    }
    std::fs::create_dir_all(&out_dir).map_err(|e| Error::io(&out_dir, e))?;

    // Model, tokenizer, method.
    let model = if is_builtin_shape(&cfg.model) {
        random_t5(be, &cfg.model, cfg.seed, cfg.quant)?
    } else {
        load_t5(be, Path::new(&cfg.model), cfg.quant)?
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
    cfg.method.validate(model.cfg.d_model, tc.max_len)?;
    let mut method = build_t5_method(be, &model, &cfg.method, tc.max_len, cfg.seed, tokenize_ref)?;
    let mut opt = Optimizer::new(be, method.as_ref(), tc);

    // Data.
    let (pad, eos, start) = (
        model.cfg.pad_token_id as i32,
        model.cfg.eos_token_id as i32,
        model.cfg.decoder_start_token_id as i32,
    );
    let (train_set, dev_set) = task_examples(cfg, model.cfg.vocab_size, eos)?;
    let batcher = Batcher::new(
        &train_set,
        tc.batch_size,
        tc.max_len,
        tc.max_target_len,
        tc.group_by_length,
        cfg.seed,
        (pad, eos, start),
    );

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

    let total = tc.steps as u64;
    let bar = if opts.progress && std::io::stdout().is_terminal() {
        let bar = ProgressBar::new(total);
        let style = ProgressStyle::with_template("{bar:30} step {pos}/{len}  {msg}  ETA {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
        bar.set_position(state.step);
        bar
    } else {
        ProgressBar::hidden()
    };

    let mut records: Vec<StepRecord> = Vec::new();
    let mut dev_losses = Vec::new();
    let mut truncated_rows = 0u64;
    let mut tokens_total = 0u64;
    let run_start = Instant::now();
    let mut stopped = Stopped::Finished;
    let mut pos = Position {
        epoch: state.epoch,
        cursor: state.cursor,
    };
    while state.step < total {
        let step = state.step + 1;
        let t0 = Instant::now();
        zero_grads(be, method.as_mut());
        let (mut loss_sum, mut tokens) = (0.0, 0u64);
        for _ in 0..tc.grad_accum {
            let (batch, next, truncated) = batcher.next_batch(pos);
            pos = next;
            truncated_rows += truncated as u64;
            tokens += batch_tokens(&batch);
            loss_sum += t5_forward_backward(be, &model, Some(method.as_mut()), &batch)?.loss;
        }
        let loss = loss_sum / tc.grad_accum as f64;
        if !loss.is_finite() {
            return Err(Error::Input(format!(
                "step {step}: the loss is {loss}; training stopped. The last good checkpoint \
                 (step {}) is kept in {}",
                state.step,
                ckpt_path.display()
            )));
        }
        let factor = lr_factor(tc.schedule, step as usize, tc.warmup_steps, tc.steps);
        let info = opt.step(be, method.as_mut(), factor, 1.0 / tc.grad_accum as f64);
        state.step = step;
        state.epoch = pos.epoch;
        state.cursor = pos.cursor;
        state.losses.push((step, loss));
        tokens_total += tokens;
        let seconds = t0.elapsed().as_secs_f64();
        records.push(StepRecord {
            step,
            loss,
            lr: info.lr,
            seconds,
            tokens,
        });
        bar.set_position(step);
        bar.set_message(format!(
            "loss {loss:.4}  lr {:.2e}  {:.0} tok/s",
            info.lr,
            tokens as f64 / seconds.max(1e-9)
        ));

        if tc.eval_every > 0 && step.is_multiple_of(tc.eval_every as u64) {
            let dl = dev_loss(be, &model, method.as_mut(), &batcher, &dev_set)?;
            dev_losses.push((step, dl));
            if state.best_metric.is_none_or(|best| dl < best) {
                state.best_metric = Some(dl);
                state.best_step = Some(step);
                save_params(be, method.as_ref(), &out_dir.join("best.safetensors"))?;
            }
        }
        let interrupted = opts.interrupt.load(Ordering::SeqCst);
        if (tc.checkpoint_every > 0 && step.is_multiple_of(tc.checkpoint_every as u64))
            || interrupted
        {
            save_checkpoint(
                &ckpt_path,
                &optim_tensors(be, method.as_ref(), &opt),
                &state,
            )?;
        }
        if interrupted {
            stopped = Stopped::Interrupted;
            break;
        }
    }
    bar.finish_and_clear();
    if stopped == Stopped::Finished {
        save_checkpoint(
            &ckpt_path,
            &optim_tensors(be, method.as_ref(), &opt),
            &state,
        )?;
        save_params(be, method.as_ref(), &out_dir.join("method.safetensors"))?;
    }

    let seconds = run_start.elapsed().as_secs_f64();
    let tokens_per_second = tokens_total as f64 / seconds.max(1e-9);
    let mut eval = std::collections::BTreeMap::new();
    if let (Some(best), Some(step)) = (state.best_metric, state.best_step) {
        eval.insert("best_dev_loss".to_string(), best);
        eval.insert("best_step".to_string(), step as f64);
    }
    if let Some(&(_, last)) = dev_losses.last() {
        eval.insert("last_dev_loss".to_string(), last);
    }
    let report = Report {
        config: toml_to_json(&config_text),
        backend: be.name(),
        model: cfg.model.clone(),
        method: cfg.method.name().to_string(),
        train_params: train_params(method.as_ref()),
        stored_params: method.stored_params(),
        steps: records,
        tokens_per_second,
        peak_memory_bytes: peak_rss_bytes().unwrap_or(0),
        truncated_rows,
        eval,
        stopped: match stopped {
            Stopped::Finished => "finished".into(),
            Stopped::Interrupted => "interrupted".into(),
        },
    };
    report.write_json(&out_dir.join("report.json"))?;
    if !state.losses.is_empty() {
        let title = format!("{} on {}: training loss", cfg.method.name(), cfg.model);
        write_loss_svg(&out_dir.join("loss.svg"), &state.losses, &title)?;
    }
    Ok(Outcome {
        run_dir: out_dir,
        stopped,
        losses: state.losses,
        dev_losses,
        best: state.best_step.zip(state.best_metric),
        tokens_per_second,
        seconds,
    })
}

/// Parameters and moments of every method tensor, for a checkpoint.
fn optim_tensors<B: Backend>(
    be: &B,
    method: &dyn PromptMethod<B>,
    opt: &Optimizer<B>,
) -> Vec<OptimTensor> {
    method
        .params()
        .iter()
        .zip(opt.moments(be))
        .map(|(p, (m, v))| OptimTensor {
            name: p.name.clone(),
            shape: p.shape.clone(),
            value: be.download_f64(&p.value),
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
    let mut moments = Vec::new();
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
        moments.push((t.m.clone(), t.v.clone()));
    }
    opt.restore(be, &moments, step);
    Ok(())
}

/// The effective config as JSON for report.json.
fn toml_to_json(text: &str) -> serde_json::Value {
    toml::from_str::<toml::Table>(text)
        .ok()
        .and_then(|t| serde_json::to_value(t).ok())
        .unwrap_or(serde_json::Value::Null)
}
