//! Data-parallel training with N ranks as threads of this process (`ThreadGroup`): the same
//! trainer code as under `mpirun`, without MPI, so every build checks it. tests/mpi.rs runs the
//! real launcher (feature `mpi`).
//!
//! The claims: N ranks with a global batch B give the losses of one process with batch B (to
//! 1e-6 relative: the gradient sum and the loss sum are formed in another order, so not bit for
//! bit); a run resumes on another number of ranks; one failing rank stops the others with an
//! error naming it; ranks whose parameters diverge are stopped at the check.

use std::sync::atomic::AtomicUsize;

mod common;

use common::{default_config as config, rel_diff, DATA_PARALLEL_CASES};

use fastpt::backend::collective::{Collective, SingleProcess, ThreadGroup};
use fastpt::backend::cpu::CpuBackend;
use fastpt::bench::ranks::{run_scaling, scaling_table};
use fastpt::bench::{BenchConfig, Setting};
use fastpt::config::RunConfig;
use fastpt::train::checkpoint::load_checkpoint;
use fastpt::train::trainer::{train, Outcome, Stopped, TrainOptions, SIGINT};

/// What a test run may change.
#[derive(Clone, Copy, Default)]
struct Knobs {
    resume: bool,
    /// Start with SIGINT set: the run stops after its first step.
    interrupt: bool,
    diverge_at_step: Option<u64>,
    check_replicas_every: u64,
}

fn run_on(cfg: &RunConfig, ranks: &dyn Collective, k: Knobs) -> fastpt::Result<Outcome> {
    let flag = AtomicUsize::new(if k.interrupt { SIGINT } else { 0 });
    let opts = TrainOptions {
        resume: k.resume,
        interrupt: &flag,
        progress: false,
        init_from: None,
        nan_grad_at_step: None,
        ranks,
        check_replicas_every: k.check_replicas_every,
        diverge_at_step: k.diverge_at_step,
    };
    train(&CpuBackend::<f32>::new(), cfg, &opts)
}

/// The run on `n` thread ranks; every rank's outcome, rank 0 first.
fn run_ranks(cfg: &RunConfig, n: usize, k: Knobs) -> Vec<fastpt::Result<Outcome>> {
    std::thread::scope(|s| {
        let handles: Vec<_> = ThreadGroup::new(n)
            .into_iter()
            .map(|g| {
                s.spawn(move || {
                    let out = run_on(cfg, &g, k);
                    // What the CLI does on an error: the others stop at their next collective.
                    if out.is_err() {
                        g.fail();
                    }
                    out
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// 20 steps of batch 16 (8 per rank on 2 ranks), dev evaluations and checkpoints on the way.
const TWENTY: &[&str] = &[
    "train.steps=20",
    "train.batch_size=16",
    "train.warmup_steps=3",
    "train.eval_every=10",
    "train.checkpoint_every=10",
    "data.train_examples=120",
    "data.dev_examples=40",
    "train.max_len=24",
];

fn with(extra: &[&str]) -> Vec<String> {
    TWENTY.iter().chain(extra).map(|s| s.to_string()).collect()
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn two_ranks_with_half_batches_give_one_process_losses_for_t5_and_llama() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, extra) in DATA_PARALLEL_CASES {
        let o = with(extra);
        let one = run_on(
            &config(&tmp.path().join(format!("{name}-1")), &strs(&o)),
            &SingleProcess,
            Knobs::default(),
        )
        .unwrap();
        let two_cfg = config(&tmp.path().join(format!("{name}-2")), &strs(&o));
        let two = run_ranks(&two_cfg, 2, Knobs::default());
        let (r0, r1) = (two[0].as_ref().unwrap(), two[1].as_ref().unwrap());
        assert_eq!(one.losses.len(), 20);
        let d = rel_diff(&r0.losses, &one.losses);
        assert!(d <= 1e-6, "{name}: 2 ranks differ from 1 process by {d:e}");
        // Both ranks report the same (all-reduced) losses and dev losses.
        assert_eq!(r0.losses, r1.losses, "{name}: ranks disagree");
        assert_eq!(r0.dev_losses, r1.dev_losses, "{name}: ranks' dev losses");
        let dd = rel_diff(&r0.dev_losses, &one.dev_losses);
        assert!(dd <= 1e-6, "{name}: dev losses differ by {dd:e}");
        // Rank 0 wrote the folder: its checkpoint is the 1-process run's step.
        let (_, state) = load_checkpoint(&two_cfg.out_dir.join("checkpoint.safetensors")).unwrap();
        assert_eq!(state.step, 20);
        eprintln!("{name}: 2 ranks vs 1 process: losses {d:.2e}, dev losses {dd:.2e}");
    }
}

#[test]
fn three_ranks_take_uneven_shares_of_batches_that_do_not_divide() {
    // Batch 7 over 3 ranks (3, 2, 2 rows), and the epoch's last batch of 1 row (two ranks
    // with nothing): the losses still follow one process's.
    let tmp = tempfile::tempdir().unwrap();
    let o = [
        "train.steps=6",
        "train.batch_size=7",
        "train.warmup_steps=1",
        "train.eval_every=3",
        "data.train_examples=15",
        "data.dev_examples=9",
        "train.max_len=24",
        "train.grad_accum=2",
    ];
    let one = run_on(
        &config(&tmp.path().join("one"), &o),
        &SingleProcess,
        Knobs::default(),
    )
    .unwrap();
    let three = run_ranks(&config(&tmp.path().join("three"), &o), 3, Knobs::default());
    let r0 = three[0].as_ref().unwrap();
    let d = rel_diff(&r0.losses, &one.losses);
    assert!(d <= 1e-6, "3 ranks differ from 1 process by {d:e}");
}

#[test]
fn a_run_resumes_on_another_number_of_ranks_with_the_same_losses() {
    let tmp = tempfile::tempdir().unwrap();
    let o = with(&["method=pt", "pt.prompt_len=6"]);
    let whole = run_on(
        &config(&tmp.path().join("whole"), &strs(&o)),
        &SingleProcess,
        Knobs::default(),
    )
    .unwrap();
    let cfg = config(&tmp.path().join("mixed"), &strs(&o));
    // 2 ranks, stopped by SIGINT after step 1 (both ranks agree on it).
    let interrupt = Knobs {
        interrupt: true,
        ..Knobs::default()
    };
    let first = run_ranks(&cfg, 2, interrupt);
    for r in &first {
        assert_eq!(r.as_ref().unwrap().stopped, Stopped::Interrupted(SIGINT));
        assert_eq!(r.as_ref().unwrap().losses.len(), 1);
    }
    // 2 → 1: one process, stopped again after step 2.
    let resumed = Knobs {
        resume: true,
        ..interrupt
    };
    let second = run_on(&cfg, &SingleProcess, resumed).unwrap();
    assert_eq!(second.losses.len(), 2);
    // 1 → 3: three ranks to the end.
    let rest = run_ranks(
        &cfg,
        3,
        Knobs {
            resume: true,
            ..Knobs::default()
        },
    );
    let last = rest[0].as_ref().unwrap();
    assert_eq!(last.stopped, Stopped::Finished);
    let d = rel_diff(&last.losses, &whole.losses);
    assert!(
        d <= 1e-6,
        "resumed across rank counts: {d:e} from the whole run"
    );
}

#[test]
fn a_failing_rank_stops_the_others_with_an_error_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(&tmp.path().join("fail"), &strs(&with(&[])));
    let out = std::thread::scope(|s| {
        let handles: Vec<_> = ThreadGroup::new(2)
            .into_iter()
            .map(|g| {
                let cfg = &cfg;
                s.spawn(move || {
                    if g.rank() == 1 {
                        // Rank 1 fails before the run starts (as a bad model folder would).
                        g.fail();
                        return Err(fastpt::Error::Input("rank 1's own error".into()));
                    }
                    run_on(cfg, &g, Knobs::default())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect::<Vec<_>>()
    });
    let e = out[0].as_ref().unwrap_err().to_string();
    assert!(e.contains("rank 1 of 2 failed"), "{e}");
}

#[test]
fn diverged_parameters_stop_the_run_at_the_check_naming_the_step() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(&tmp.path().join("div"), &strs(&with(&["method=pt"])));
    let out = run_ranks(
        &cfg,
        2,
        Knobs {
            diverge_at_step: Some(4),
            check_replicas_every: 2,
            ..Knobs::default()
        },
    );
    for r in &out {
        let e = r.as_ref().unwrap_err().to_string();
        assert!(
            e.contains("step 4: the method parameters differ across ranks"),
            "{e}"
        );
    }
    // Without the nudge the same check passes.
    let cfg = config(&tmp.path().join("same"), &strs(&with(&["method=pt"])));
    let out = run_ranks(
        &cfg,
        2,
        Knobs {
            check_replicas_every: 2,
            ..Knobs::default()
        },
    );
    assert!(out.iter().all(|r| r.is_ok()));
}

#[test]
fn bench_on_two_ranks_times_one_rank_against_both_for_every_setting() {
    let cfg = BenchConfig {
        shapes: vec!["t5-tiny".into()],
        settings: vec![
            Setting::parse("none").unwrap(),
            Setting::parse("pt").unwrap(),
        ],
        batch: 6,
        input_len: 12,
        target_len: 3,
        max_len: 16,
        warmup: 1,
        rounds: 3,
        steps: 1,
        quant: "none".parse().unwrap(),
        seed: 0,
    };
    let out = std::thread::scope(|s| {
        let cfg = &cfg;
        let handles: Vec<_> = ThreadGroup::new(2)
            .into_iter()
            .map(|g| {
                s.spawn(move || {
                    let be = CpuBackend::<f32>::new();
                    run_scaling(&be, cfg, &g, &mut |_| {}).unwrap()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect::<Vec<_>>()
    });
    let rows = &out[0];
    assert_eq!(rows.len(), 2);
    // Every rank reports the same (slowest-rank) figures.
    assert_eq!(
        serde_json::to_string(&out[0]).unwrap(),
        serde_json::to_string(&out[1]).unwrap()
    );
    let pt = &rows[1];
    assert_eq!((pt.setting.as_str(), pt.ranks, pt.batch), ("pt", 2, 6));
    assert_eq!(pt.reduce_bytes, 8 * (pt.params + 4));
    assert!(pt.params > 0 && rows[0].params == 0);
    for r in rows {
        assert_eq!(r.one_ms.samples.len(), 3);
        assert!(r.one_ms.median > 0.0 && r.parallel_ms.median > 0.0);
        assert!((r.efficiency - r.speedup.median / 2.0).abs() < 1e-12);
    }
    let table = scaling_table(rows);
    assert!(table.contains("| t5-tiny | pt | 2 | 6 (3–3) |"), "{table}");
}

#[test]
fn ranks_given_different_configs_are_refused_before_anything_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("mixed");
    let (a, b) = (
        config(&dir, &strs(&with(&["method=pt"]))),
        config(&dir, &strs(&with(&["method=pt", "train.steps=21"]))),
    );
    let out = std::thread::scope(|s| {
        let handles: Vec<_> = ThreadGroup::new(2)
            .into_iter()
            .map(|g| {
                let cfg = if g.rank() == 0 { &a } else { &b };
                s.spawn(move || run_on(cfg, &g, Knobs::default()).map(|_| ()))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect::<Vec<_>>()
    });
    for r in &out {
        let e = r.as_ref().unwrap_err().to_string();
        assert!(
            e.contains("the ranks were given different runs")
                && e.contains("(20 steps)")
                && e.contains("(21 steps)"),
            "{e}"
        );
    }
    assert!(!dir.exists(), "a refused run wrote its folder");
}
