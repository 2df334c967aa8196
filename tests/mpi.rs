//! `mpirun -np 2 fastpt run ...` end to end over the system MPI (feature `mpi`; .ci/run installs
//! Open MPI and runs these with `cargo test --release --features mpi --test mpi`).
//!
//! The claims of issue 22 on the CPU: 2 ranks with 8 rows each give the losses of one process
//! with batch 16 for 20 steps (T5 and Llama; PT, DePT, EPT-MS); a run resumes from 2 ranks on 1
//! and from 1 on 2 with the same losses; killing one rank stops the other within seconds with
//! an error naming it, and the checkpoint stays loadable; an error on the ranks ends the job.
#![cfg(feature = "mpi")]

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use fastpt::train::checkpoint::load_checkpoint;

mod common;

use common::{rel_diff, DATA_PARALLEL_CASES};

/// `fastpt ARGS` as one process.
fn one(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fastpt"))
        .args(args)
        // The ranks' thread count: a GEMM may split its sums by threads.
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .expect("starting fastpt")
}

/// `mpirun -np N fastpt ARGS` (oversubscribed: CI has 2 cores; allowed as root: CI is root).
fn mpirun(n: usize) -> Command {
    let mut cmd = Command::new("mpirun");
    cmd.args(["--oversubscribe", "-np", &n.to_string()])
        .arg(env!("CARGO_BIN_EXE_fastpt"))
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        // Two ranks on two cores: one thread each.
        .env("RAYON_NUM_THREADS", "1");
    cmd
}

fn ranks(n: usize, args: &[&str]) -> Output {
    mpirun(n).args(args).output().expect("starting mpirun")
}

fn check(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The training losses metrics.jsonl holds, in step order.
fn losses(dir: &Path) -> Vec<(u64, f64)> {
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    text.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["kind"] == "step")
        .map(|v| (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap()))
        .collect()
}

/// `run` with the embedded default's synthetic task at test sizes, into `dir`.
fn run_args(dir: &Path, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = ["run"].iter().map(|s| s.to_string()).collect();
    for s in [
        "train.batch_size=16",
        "train.warmup_steps=3",
        "train.eval_every=10",
        "train.checkpoint_every=10",
        "data.train_examples=120",
        "data.dev_examples=40",
        "train.max_len=24",
        &format!("out_dir={:?}", dir.display().to_string()),
    ]
    .iter()
    .chain(extra)
    {
        v.push("--set".into());
        v.push(s.to_string());
    }
    v
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn two_mpi_ranks_with_8_rows_give_the_losses_of_one_process_with_16() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, extra) in DATA_PARALLEL_CASES {
        let mut e = extra.to_vec();
        e.push("train.steps=20");
        let (d1, d2) = (tmp.path().join(format!("{name}-1")), tmp.path().join(name));
        check(&one(&strs(&run_args(&d1, &e))), name);
        let out = ranks(2, &strs(&run_args(&d2, &e)));
        check(&out, name);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("2 ranks"), "{name}: {stdout}");
        // --device auto's fallback note comes once per machine, not once per rank.
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.matches("no usable GPU").count(), 1, "{stderr}");
        let (a, b) = (losses(&d2), losses(&d1));
        assert_eq!(b.len(), 20);
        let d = rel_diff(&a, &b);
        eprintln!("{name}: 2 MPI ranks vs 1 process: {d:.2e}");
        assert!(d <= 1e-6, "{name}: 2 ranks differ from 1 process by {d:e}");
    }
}

#[test]
fn a_run_resumes_from_2_ranks_on_1_and_from_1_on_2() {
    let tmp = tempfile::tempdir().unwrap();
    // A constant schedule: extending a run changes nothing before its old end.
    let e = [
        "method=\"pt\"",
        "pt.prompt_len=6",
        "train.warmup_steps=0",
        "train.schedule=\"constant\"",
    ];
    let with_steps = |n: u64| {
        let mut v: Vec<String> = e.iter().map(|s| s.to_string()).collect();
        v.push(format!("train.steps={n}"));
        v
    };
    let (s10, s20) = (with_steps(10), with_steps(20));
    let whole = tmp.path().join("whole");
    check(&one(&strs(&run_args(&whole, &strs(&s20)))), "whole");
    // 2 ranks for 10 steps, then 1 process to 20.
    let a = tmp.path().join("two-then-one");
    check(&ranks(2, &strs(&run_args(&a, &strs(&s10)))), "2 ranks");
    let resume = |dir: &Path| {
        vec![
            "run".to_string(),
            "--resume".into(),
            dir.display().to_string(),
            "--set".into(),
            "train.steps=20".into(),
        ]
    };
    check(&one(&strs(&resume(&a))), "resume on 1");
    // 1 process for 10 steps, then 2 ranks to 20.
    let b = tmp.path().join("one-then-two");
    check(&one(&strs(&run_args(&b, &strs(&s10)))), "1 process");
    check(&ranks(2, &strs(&resume(&b))), "resume on 2 ranks");
    for dir in [&a, &b] {
        let d = rel_diff(&losses(dir), &losses(&whole));
        assert!(d <= 1e-6, "{}: {d:e} from the whole run", dir.display());
    }
}

/// The pid of rank `rank` among the children of `parent` (from /proc: its environment says
/// which rank it is).
fn rank_pid(parent: u32, rank: usize) -> Option<u32> {
    let want = format!("OMPI_COMM_WORLD_RANK={rank}");
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        // "pid (comm) state ppid ...": the ppid is the second field after the comm's ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
        if ppid != Some(parent) {
            continue;
        }
        let env = std::fs::read(entry.path().join("environ")).unwrap_or_default();
        if env.split(|&b| b == 0).any(|v| v == want.as_bytes()) {
            return Some(pid);
        }
    }
    None
}

#[test]
fn killing_one_rank_stops_the_other_and_leaves_a_loadable_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("killed");
    let args = run_args(
        &dir,
        &[
            "method=\"pt\"",
            "train.steps=100000",
            "train.checkpoint_every=3",
        ],
    );
    let mut child = mpirun(2)
        .args(strs(&args))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting mpirun");
    // Wait for a checkpoint, then kill rank 1.
    let ckpt = dir.join("checkpoint.safetensors");
    let start = Instant::now();
    while !ckpt.exists() {
        assert!(start.elapsed() < Duration::from_secs(120), "no checkpoint");
        std::thread::sleep(Duration::from_millis(100));
    }
    let pid = rank_pid(child.id(), 1).expect("rank 1's process");
    let killed = Instant::now();
    let status = Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    // The job ends within seconds, non-zero, naming the killed rank.
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(30),
            "rank 0 still runs 30 s after rank 1 was killed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let took = killed.elapsed();
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("rank 1") && stderr.contains("signal 9"),
        "mpirun's message: {stderr}"
    );
    eprintln!(
        "the job stopped {:.1} s after rank 1 was killed",
        took.as_secs_f64()
    );
    assert!(took < Duration::from_secs(10), "took {took:?}");
    // The checkpoint is whole, and a resume on one process continues from it.
    let (_, state) = load_checkpoint(&ckpt).expect("a loadable checkpoint");
    assert!(state.step >= 3 && state.step.is_multiple_of(3));
    let resume = one(&[
        "run",
        "--resume",
        dir.to_str().unwrap(),
        "--set",
        &format!("train.steps={}", state.step + 2),
    ]);
    check(&resume, "resume after the kill");
}

#[test]
fn an_error_on_the_ranks_ends_the_job_with_the_error() {
    let tmp = tempfile::tempdir().unwrap();
    let out = ranks(
        2,
        &strs(&run_args(
            &tmp.path().join("bad"),
            &["model=\"/nonexistent/model\""],
        )),
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Each rank fails alike; the first to abort ends the job (the other's line may be cut).
    assert!(
        stderr.contains("of 2): /nonexistent/model: no such folder")
            && stderr.contains("MPI_ABORT was invoked"),
        "{stderr}"
    );
}

#[test]
fn sigterm_to_mpirun_stops_every_rank_at_the_same_step_with_a_checkpoint() {
    // A scheduler's preemption: mpirun forwards SIGTERM to the ranks, which agree on the step
    // to stop after (the stop flags ride in the step's all-reduce), write the checkpoint and
    // report.json, and a resume continues.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("term");
    let args = run_args(
        &dir,
        &[
            "method=\"pt\"",
            "train.steps=100000",
            "train.checkpoint_every=50",
        ],
    );
    let child = mpirun(2)
        .args(strs(&args))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting mpirun");
    let metrics = dir.join("metrics.jsonl");
    let start = Instant::now();
    while !metrics.exists() || losses(&dir).len() < 5 {
        assert!(start.elapsed() < Duration::from_secs(120), "no steps");
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("interrupted by SIGTERM"), "{stdout}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["stopped"], "interrupted (SIGTERM)");
    let (_, state) = load_checkpoint(&dir.join("checkpoint.safetensors")).unwrap();
    assert_eq!(state.step as usize, losses(&dir).len());
    let resume = one(&[
        "run",
        "--resume",
        dir.to_str().unwrap(),
        "--set",
        &format!("train.steps={}", state.step + 1),
    ]);
    check(&resume, "resume after SIGTERM");
}

#[test]
fn bench_under_mpirun_reports_speedup_and_efficiency_against_one_rank() {
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("scaling");
    let out = ranks(
        2,
        &[
            "bench",
            "--device",
            "cpu",
            "--shape",
            "t5-tiny",
            "--setting",
            "pt",
            "--batch",
            "6",
            "--rounds",
            "2",
            "--out",
            out_dir.to_str().unwrap(),
        ],
    );
    check(&out, "bench under mpirun");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("| t5-tiny | pt | 2 | 6 (3–3) |"),
        "{stdout}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("scaling.json")).unwrap())
            .unwrap();
    let row = &json["rows"][0];
    assert_eq!(json["ranks"], 2);
    assert!(row["speedup"]["median"].as_f64().unwrap() > 0.0);
    assert!(out_dir.join("scaling.md").exists());
}
