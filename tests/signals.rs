//! Real signals to `fastpt run` (what SLURM, Kubernetes, `timeout` and Ctrl-C send): the run
//! finishes its step, writes the checkpoint, report.json and metrics.jsonl, prints the command
//! that resumes, and exits 143 (SIGTERM) or 130 (SIGINT); the resumed run's losses equal an
//! uninterrupted run's bit for bit.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use fastpt::train::checkpoint::load_checkpoint;

/// The config of every run here: the constant schedule, so a run's steps do not depend on
/// train.steps (the interrupted run is long; the resume sets the steps it ends at). No
/// periodic checkpoint: the signal's checkpoint is the only one.
fn sets(dir: &Path, steps: u64) -> Vec<String> {
    [
        format!("train.steps={steps}"),
        "train.batch_size=2".into(),
        "train.warmup_steps=0".into(),
        "train.schedule=constant".into(),
        "train.eval_every=0".into(),
        "train.checkpoint_every=0".into(),
        "data.train_examples=8".into(),
        "data.dev_examples=4".into(),
        format!("out_dir={:?}", dir.display().to_string()),
    ]
    .to_vec()
}

fn command(sets: &[String], resume: Option<&Path>) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fastpt"));
    cmd.args(["run", "--device", "cpu"]);
    if let Some(dir) = resume {
        cmd.arg("--resume").arg(dir);
    }
    for s in sets {
        cmd.args(["--set", s]);
    }
    cmd
}

fn finished(out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Starts a long run in `dir`, waits until it has taken a few steps (up to two minutes: this
/// is no timing test), sends `signal` with kill(1), and returns its output.
fn interrupted_run(dir: &Path, signal: &str) -> Output {
    let child = command(&sets(dir, 1_000_000), None)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let steps = || {
        std::fs::read_to_string(dir.join("metrics.jsonl"))
            .map(|t| t.lines().count())
            .unwrap_or(0)
    };
    while steps() < 3 {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no steps after two minutes"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let sent = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    child.wait_with_output().unwrap()
}

/// Checks what an interrupted run leaves and returns the step its checkpoint holds.
fn check_interrupted(dir: &Path, out: &Output, code: i32, name: &str) -> u64 {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{stdout}\n{stderr}");
    let (_, state) = load_checkpoint(&dir.join("checkpoint.safetensors")).unwrap();
    assert!(state.step >= 3, "{}", state.step);
    assert!(
        stdout.contains(&format!("interrupted by {name} after {} steps", state.step)),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "resume with: fastpt run --resume {}",
            dir.display()
        )),
        "{stdout}"
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["stopped"], format!("interrupted ({name})"));
    assert_eq!(report["steps"].as_array().unwrap().len() as u64, state.step);
    let lines = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    assert_eq!(lines.lines().count() as u64, state.step, "{lines}");
    state.step
}

#[test]
fn sigterm_writes_the_checkpoint_exits_143_and_the_resume_matches_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("term");
    let out = interrupted_run(&dir, "-TERM");
    let step = check_interrupted(&dir, &out, 143, "SIGTERM");

    // Resumed from the folder alone, to three steps past the interruption.
    let end = step + 3;
    let resumed = command(&[format!("train.steps={end}")], Some(&dir))
        .output()
        .unwrap();
    let stdout = finished(&resumed);
    assert!(
        stdout.contains(&format!("finished after {end} steps")),
        "{stdout}"
    );
    let (_, resumed) = load_checkpoint(&dir.join("checkpoint.safetensors")).unwrap();

    // The same config run without interruption.
    let whole = tmp.path().join("whole");
    finished(&command(&sets(&whole, end), None).output().unwrap());
    let (_, reference) = load_checkpoint(&whole.join("checkpoint.safetensors")).unwrap();
    let bits = |l: &[(u64, f64)]| l.iter().map(|&(s, x)| (s, x.to_bits())).collect::<Vec<_>>();
    assert_eq!(reference.losses.len() as u64, end);
    assert_eq!(bits(&resumed.losses), bits(&reference.losses));
    // metrics.jsonl holds each step once across the interruption.
    let steps: Vec<u64> = std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["kind"] == "step")
        .map(|v| v["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, (1..=end).collect::<Vec<_>>());
}

#[test]
fn sigint_writes_the_checkpoint_exits_130_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("int");
    let out = interrupted_run(&dir, "-INT");
    let step = check_interrupted(&dir, &out, 130, "SIGINT");
    let resumed = command(&[format!("train.steps={}", step + 1)], Some(&dir))
        .output()
        .unwrap();
    finished(&resumed);
    let (_, state) = load_checkpoint(&dir.join("checkpoint.safetensors")).unwrap();
    assert_eq!(state.step, step + 1);
}
