//! The trainer: determinism, exact resume after interruptions, the NaN guard, the run folder,
//! and the embedded default's loss drop.

use std::sync::atomic::AtomicUsize;

mod common;

use common::default_config as config;

use fastpt::backend::collective::SingleProcess;
use fastpt::backend::cpu::CpuBackend;
use fastpt::config::RunConfig;
use fastpt::train::checkpoint::load_checkpoint;
use fastpt::train::trainer::{train, Outcome, Stopped, TrainOptions, SIGINT};

fn run(cfg: &RunConfig, resume: bool, interrupt: bool) -> fastpt::Result<Outcome> {
    let flag = AtomicUsize::new(if interrupt { SIGINT } else { 0 });
    let opts = TrainOptions {
        resume,
        interrupt: &flag,
        progress: false,
        init_from: None,
        nan_grad_at_step: None,
        ranks: &SingleProcess,
        check_replicas_every: 0,
        diverge_at_step: None,
    };
    train(&CpuBackend::<f32>::new(), cfg, &opts)
}

/// A short run that still exercises accumulation, evaluation and checkpoints.
const SHORT: &[&str] = &[
    "train.steps=6",
    "train.warmup_steps=2",
    "train.grad_accum=2",
    "train.batch_size=4",
    "train.eval_every=3",
    "train.checkpoint_every=2",
    "data.train_examples=20",
    "data.dev_examples=8",
];

#[test]
fn same_seed_same_losses_bit_for_bit_and_resume_continues_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let a = run(&config(&tmp.path().join("a"), SHORT), false, false).unwrap();
    let b = run(&config(&tmp.path().join("b"), SHORT), false, false).unwrap();
    assert_eq!(a.losses.len(), 6);
    assert_eq!(a.losses, b.losses, "same seed, same losses");

    // Interrupted after step 1 (Ctrl-C), resumed and interrupted after step 2, then resumed to
    // the end: the losses must equal the uninterrupted run's, bit for bit.
    let dir = tmp.path().join("c");
    let cfg = config(&dir, SHORT);
    let first = run(&cfg, false, true).unwrap();
    assert_eq!(first.stopped, Stopped::Interrupted(SIGINT));
    assert_eq!(first.losses.len(), 1);
    let second = run(&cfg, true, true).unwrap();
    assert_eq!(second.losses.len(), 2);
    let last = run(&cfg, true, false).unwrap();
    assert_eq!(last.stopped, Stopped::Finished);
    assert_eq!(
        last.losses, a.losses,
        "resumed run differs from the uninterrupted one"
    );

    // Another seed gives other losses (the comparison above can fail).
    let mut other = SHORT.to_vec();
    other.push("seed=1");
    let d = run(&config(&tmp.path().join("d"), &other), false, false).unwrap();
    assert_ne!(d.losses, a.losses);
}

#[test]
fn run_folder_holds_report_plot_config_and_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    let out = run(&config(&dir, SHORT), false, false).unwrap();
    for f in [
        "report.json",
        "loss.svg",
        "config.toml",
        "checkpoint.safetensors",
        "method.safetensors",
        "best.safetensors",
    ] {
        assert!(dir.join(f).exists(), "{f} missing");
    }
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["steps"].as_array().unwrap().len(), 6);
    assert_eq!(report["method"], "ept");
    assert!(report["tokens_per_second"].as_f64().unwrap() > 0.0);
    assert!(report["peak_memory_bytes"].as_u64().unwrap() > 1 << 20);
    assert!(report["train_params"].as_u64().unwrap() > report["stored_params"].as_u64().unwrap());
    assert_eq!(report["config"]["train"]["steps"], 6);
    assert_eq!(out.dev_losses.len(), 2, "evaluated at steps 3 and 6");
    // The echoed config reproduces the run's config.
    let echoed = RunConfig::from_file(&dir.join("config.toml"), &[]).unwrap();
    assert_eq!(echoed, config(&dir, SHORT));
    // A second run into the same folder refuses instead of overwriting.
    let err = run(&config(&dir, SHORT), false, false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("--resume") && err.contains("checkpoint"),
        "{err}"
    );
    // Resuming with another config is refused too.
    let mut changed = SHORT.to_vec();
    changed.push("train.lr=0.1");
    let err = run(&config(&dir, &changed), true, false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("config differs"), "{err}");
}

#[test]
fn a_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("nan");
    // An absurd learning rate blows the prompt up within a few steps.
    let cfg = config(
        &dir,
        &[
            "train.steps=50",
            "train.lr=1e30",
            "train.warmup_steps=0",
            "train.max_grad_norm=0",
            "train.checkpoint_every=1",
            "train.eval_every=0",
            "train.batch_size=2",
            "data.train_examples=8",
        ],
    );
    let err = run(&cfg, false, false).unwrap_err().to_string();
    assert!(
        err.contains("step ") && err.contains("last good checkpoint"),
        "{err}"
    );
    let (_, state) = load_checkpoint(&dir.join("checkpoint.safetensors")).unwrap();
    assert!(
        state.losses.iter().all(|l| l.1.is_finite()),
        "only good steps were checkpointed"
    );
    assert!(err.contains(&format!("step {}", state.step + 1)), "{err}");
}

#[test]
fn embedded_default_loss_falls_measurably() {
    let tmp = tempfile::tempdir().unwrap();
    let out = run(&config(&tmp.path().join("default"), &[]), false, false).unwrap();
    let first = out.losses[0].1;
    let tail: Vec<f64> = out.losses[out.losses.len() - 20..]
        .iter()
        .map(|l| l.1)
        .collect();
    let last = tail.iter().sum::<f64>() / tail.len() as f64;
    // From about ln(1000) ≈ 6.9 to well below: the prompt learns at least the label words.
    assert!(last < first - 2.0, "loss {first} → {last}");
    let (step, best) = out.best.unwrap();
    assert!(best < first - 2.0 && step > 0);
}

/// A run of `cfg` whose gradients turn NaN at `step` (the trainer's test hook).
fn run_nan_grad_at(cfg: &RunConfig, step: u64) -> fastpt::Result<Outcome> {
    let flag = AtomicUsize::new(0);
    let opts = TrainOptions {
        resume: false,
        interrupt: &flag,
        progress: false,
        init_from: None,
        nan_grad_at_step: Some(step),
        ranks: &SingleProcess,
        check_replicas_every: 0,
        diverge_at_step: None,
    };
    train(&CpuBackend::<f32>::new(), cfg, &opts)
}

#[test]
fn a_nan_gradient_stops_the_run_naming_the_checkpoint_the_file_holds() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("nan-grad");
    // Checkpoints at steps 2 and 4; the gradient turns NaN at step 5 while the loss is finite.
    let sets = [
        "train.steps=8",
        "train.warmup_steps=0",
        "train.batch_size=2",
        "train.checkpoint_every=2",
        "train.eval_every=0",
        "data.train_examples=8",
    ];
    let err = run_nan_grad_at(&config(&dir, &sets), 5)
        .unwrap_err()
        .to_string();
    assert!(err.contains("step 5: the gradient norm is NaN"), "{err}");
    assert!(err.contains("(the loss was "), "{err}");
    let (tensors, state) = load_checkpoint(&dir.join("checkpoint.safetensors")).unwrap();
    assert_eq!(state.step, 4, "the NaN step was not applied or saved");
    assert!(tensors.iter().all(|t| t
        .value
        .iter()
        .chain(&t.m)
        .chain(&t.v)
        .all(|x| x.is_finite())));
    assert!(
        err.contains(&format!(
            "The last good checkpoint (step 4) is kept in {}",
            dir.join("checkpoint.safetensors").display()
        )),
        "{err}"
    );
    // The history and the report survive the error.
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap()).unwrap();
    let stopped = report["stopped"].as_str().unwrap();
    assert!(
        stopped.starts_with("error: step 5: the gradient norm is NaN"),
        "{stopped}"
    );
    assert_eq!(report["steps"].as_array().unwrap().len(), 5);
    let last = std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .last()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .unwrap();
    assert_eq!(last["step"], 5);
    assert!(
        last["grad_norm"].is_null() && last["loss"].as_f64().is_some(),
        "{last}"
    );

    // Between checkpoints: the file holds step 2, not the step before the failure.
    let dir = tmp.path().join("between");
    let err = run_nan_grad_at(&config(&dir, &sets), 4)
        .unwrap_err()
        .to_string();
    assert!(err.contains("The last good checkpoint (step 2)"), "{err}");

    // Before the first checkpoint: no file is named, because none exists.
    let dir = tmp.path().join("none");
    let err = run_nan_grad_at(&config(&dir, &sets), 1)
        .unwrap_err()
        .to_string();
    assert!(err.contains("No checkpoint was written yet"), "{err}");
    assert!(!err.contains("checkpoint.safetensors"), "{err}");
    assert!(!dir.join("checkpoint.safetensors").exists());
}

/// A signal during the final evaluation and export (which can outlast a scheduler's grace
/// period) stops the run there: it reports "interrupted", writes no export, and a resume redoes
/// only the final stage.
#[test]
fn a_signal_during_the_final_evaluation_stops_it_and_a_resume_redoes_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let mut sets = SHORT.to_vec();
    sets.extend(["train.steps=1", "train.warmup_steps=0"]);
    let cfg = config(&out, &sets);
    // Step 1 is the last: a signal there leaves a checkpoint at the last step, and no report
    // that says finished.
    let first = run(&cfg, false, true).unwrap();
    assert_eq!(first.stopped, Stopped::Interrupted(SIGINT));
    assert_eq!(
        load_checkpoint(&out.join("checkpoint.safetensors"))
            .unwrap()
            .1
            .step,
        1
    );
    // The resume has no step to take; its signal arrives before the final stage.
    let second = run(&cfg, true, true).unwrap();
    assert_eq!(second.stopped, Stopped::Interrupted(SIGINT));
    assert!(
        !out.join("export").exists(),
        "the export ran after the signal"
    );
    let report = std::fs::read_to_string(out.join("report.json")).unwrap();
    assert!(report.contains("interrupted (SIGINT)"), "{report}");
    // Without a signal the resume finishes the final stage.
    let third = run(&cfg, true, false).unwrap();
    assert_eq!(third.stopped, Stopped::Finished);
    assert!(out.join("export").is_dir());
    assert_eq!(third.losses, first.losses);
}

/// Early stopping: with a learning rate too small to move f32 parameters, the dev loss never
/// improves on the first evaluation's, so the run stops at the evaluation that makes
/// `patience` without a better one, says so in report.json and metrics.jsonl, still exports,
/// a resume finds it finished, and one with more patience goes on.
#[test]
fn early_stopping_ends_the_run_at_the_patience_th_evaluation_without_improvement() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("early");
    let sets = [
        "train.steps=20",
        "learning_rate=1e-30",
        "train.lr_lowrank=1e-30",
        "train.warmup_steps=0",
        "train.batch_size=2",
        "eval_steps=2",
        "save_steps=4",
        "early_stopping_patience=3",
        "data.train_examples=8",
        "data.dev_examples=4",
    ];
    let cfg = config(&dir, &sets);
    let out = run(&cfg, false, false).unwrap();
    // Evaluations at 2 (the best), 4, 6, 8: the third without a better dev loss is at step 8.
    assert_eq!(out.stopped, Stopped::Finished);
    assert_eq!(out.losses.len(), 8);
    assert_eq!(out.total_steps, 20);
    let stop = out.early_stop.clone().unwrap();
    assert_eq!((stop.step, stop.best_step, stop.patience), (8, 2, 3));
    assert_eq!(out.best.unwrap().0, 2);
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["stopped"], "finished");
    assert_eq!(report["early_stop"]["step"], 8);
    assert!(report["early_stop"]["reason"]
        .as_str()
        .unwrap()
        .contains("3 dev evaluations in a row without a better dev loss"));
    let metrics = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    let line = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| v["kind"] == "early_stop")
        .unwrap();
    assert_eq!(
        (line["step"].as_u64(), line["best_step"].as_u64()),
        (Some(8), Some(2))
    );
    assert!(dir.join("export").is_dir(), "the final stage still ran");
    let (_, state) = load_checkpoint(&dir.join("checkpoint.safetensors")).unwrap();
    assert_eq!(state.step, 8);
    // A resume of the stopped run has nothing to do.
    let again = run(&cfg, true, false).unwrap();
    assert_eq!(again.stopped, Stopped::AlreadyFinished);
    // More patience lets it go on: evaluations at 4..=12 are five without a better one.
    let mut more = cfg.clone();
    more.train.early_stopping_patience = 5;
    let longer = run(&more, true, false).unwrap();
    assert_eq!(longer.stopped, Stopped::Finished);
    assert_eq!(longer.early_stop.unwrap().step, 12);
    assert_eq!(longer.losses[..8], out.losses[..]);
    assert_eq!(longer.losses.len(), 12);

    // Interrupted at step 5 and resumed: the evaluations before the interruption count.
    let dir = tmp.path().join("early-resumed");
    let cfg = config(&dir, &sets);
    let flag = AtomicUsize::new(0);
    let opts = TrainOptions {
        resume: false,
        interrupt: &flag,
        progress: false,
        init_from: None,
        nan_grad_at_step: None,
        ranks: &SingleProcess,
        check_replicas_every: 0,
        diverge_at_step: None,
    };
    let mut stop_at = cfg.clone();
    stop_at.train.steps = 5;
    // Stopped at 5 by a shorter run (steps may grow on resume), then resumed to 20.
    let first = train(&CpuBackend::<f32>::new(), &stop_at, &opts).unwrap();
    assert_eq!(first.losses.len(), 5);
    let resumed = run(&cfg, true, false).unwrap();
    assert_eq!(resumed.early_stop.unwrap().step, 8);
    assert_eq!(resumed.losses.len(), 8);

    // Without patience the same run takes every step.
    let dir = tmp.path().join("patient");
    let mut no_patience = sets.to_vec();
    no_patience.push("early_stopping_patience=0");
    let out = run(&config(&dir, &no_patience), false, false).unwrap();
    assert_eq!((out.losses.len(), out.early_stop), (20, None));
}

/// num_train_epochs and warmup_ratio resolve against the training set: 20 examples in
/// batches of 4 × 2 are 3 steps an epoch; 2 epochs are 6 steps, warmup ceil(0.5 × 6) = 3. The
/// learning rates of the steps are the schedule's (transformers' lambda at step − 1), and
/// config.toml keeps the epochs.
#[test]
fn epochs_and_warmup_ratio_set_the_steps_of_a_run() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("epochs");
    let cfg = config(
        &dir,
        &[
            "max_steps=0",
            "num_train_epochs=2",
            "warmup_steps=0",
            "warmup_ratio=0.5",
            "lr_scheduler_type=cosine",
            "train.batch_size=4",
            "train.grad_accum=2",
            "train.eval_every=3",
            "data.train_examples=20",
            "data.dev_examples=4",
        ],
    );
    let out = run(&cfg, false, false).unwrap();
    assert_eq!((out.losses.len(), out.total_steps), (6, 6));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap()).unwrap();
    let lrs: Vec<f64> = report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["lr"].as_f64().unwrap())
        .collect();
    let want: Vec<f64> = (1..=6)
        .map(|s| 0.3 * fastpt::train::schedule::lr_factor(cfg.train.schedule, s, 3, 6))
        .collect();
    // serde_json's float parser may be an ulp off.
    for (got, want) in lrs.iter().zip(&want) {
        assert!(
            (got - want).abs() <= 1e-15 * want.abs(),
            "{lrs:?} vs {want:?}"
        );
    }
    assert_eq!(lrs[0], 0.0, "transformers' warmup starts at 0");
    let text = std::fs::read_to_string(dir.join("config.toml")).unwrap();
    assert!(
        text.contains("\nepochs = 2.0\n") && !text.contains("\nsteps ="),
        "{text}"
    );
    assert!(text.contains("\nwarmup_ratio = 0.5\n") && !text.contains("\nwarmup_steps ="));
    assert!(text.contains("\nschedule = \"cosine\"\n"), "{text}");
    assert_eq!(report["config"]["train"]["epochs"], 2.0);
}
