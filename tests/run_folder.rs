//! The run-folder contract of `fastpt run` (README.md, "Run folders"), through the binary:
//! resume from the folder alone, what a resume may change, a refused command writes nothing,
//! moved folders, finished runs, foreign and other runs' folders, the lock, checkpoint fields
//! validated on load, metrics.jsonl across a resume, plain progress lines in a log.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use fastpt::train::checkpoint::{load_checkpoint, save_checkpoint};

/// A short run of the embedded default (a few ms per step on the CPU).
fn short(steps: usize) -> Vec<String> {
    [
        format!("train.steps={steps}"),
        "train.batch_size=2".into(),
        "train.warmup_steps=0".into(),
        "train.eval_every=2".into(),
        "train.checkpoint_every=2".into(),
        "data.train_examples=8".into(),
        "data.dev_examples=4".into(),
    ]
    .to_vec()
}

fn path_str(p: &Path) -> String {
    p.display().to_string()
}

/// `fastpt run --device cpu` with `--set` for each of `sets` and the `extra` arguments, in `cwd`.
fn run_in(cwd: Option<&Path>, sets: &[String], extra: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fastpt"));
    cmd.args(["run", "--device", "cpu"]);
    for s in sets {
        cmd.args(["--set", s]);
    }
    cmd.args(extra);
    if let Some(dir) = cwd {
        cmd.current_dir(dir);
    }
    cmd.output().unwrap()
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A new finished run of `steps` steps in `dir`.
fn new_run(dir: &Path, steps: usize) {
    let mut sets = short(steps);
    sets.push(format!("out_dir={:?}", path_str(dir)));
    let out = run_in(None, &sets, &[]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
}

/// `fastpt run --resume DIR` with `sets`.
fn resume(dir: &Path, sets: &[String]) -> Output {
    run_in(None, sets, &["--resume", &path_str(dir)])
}

/// Every file under `dir` (hidden ones included) with its bytes.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let p = entry.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                files.insert(p.clone(), std::fs::read(&p).unwrap());
            }
        }
    }
    files
}

/// The `step` of each `kind: step` line of metrics.jsonl.
fn metric_steps(dir: &Path) -> Vec<u64> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["kind"] == "step")
        .map(|v| v["step"].as_u64().unwrap())
        .collect()
}

#[test]
fn a_refused_resume_names_each_key_and_both_values_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("r");
    new_run(&dir, 3);
    let before = snapshot(&dir);
    let bad = vec!["train.lr=0.1".to_string(), "method.rank=4".to_string()];
    let out = resume(&dir, &bad);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    for want in [
        "train.lr: 0.3 in the run, 0.1 now",
        "ept.rank: 8 in the run, 4 now",
    ] {
        assert!(stderr.contains(want), "{want:?} not in {stderr}");
    }
    assert!(stderr.contains("config.toml"), "{stderr}");
    assert_eq!(
        snapshot(&dir),
        before,
        "a refused resume changed the folder"
    );
    // The older form, --config FILE --resume, compares the same way.
    let config = tmp.path().join("other.toml");
    std::fs::copy(dir.join("config.toml"), &config).unwrap();
    let out = run_in(
        None,
        &bad[..1],
        &["--config", &path_str(&config), "--resume"],
    );
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(
        stderr.contains("train.lr: 0.3 in the run, 0.1 now"),
        "{stderr}"
    );
    assert_eq!(snapshot(&dir), before);
    // config.toml edited by hand in a key a resume cannot change: the checkpoint's hash of
    // the run's config tells, and nothing is written.
    let edited = String::from_utf8(before[&dir.join("config.toml")].clone())
        .unwrap()
        .replace("lr = 0.3", "lr = 0.2");
    std::fs::write(dir.join("config.toml"), edited).unwrap();
    let before = snapshot(&dir);
    let out = resume(&dir, &["train.steps=5".to_string()]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("differs from the one the checkpoint was written with"),
        "{stderr}"
    );
    assert_eq!(snapshot(&dir), before);
    // --resume without a folder (and without --config) says what it needs.
    let out = run_in(None, &[], &["--resume"]);
    assert!(
        text(&out).1.contains("--resume RUN_DIR"),
        "{:?}",
        text(&out)
    );
}

#[test]
fn a_moved_folder_resumes_where_it_is_and_extends_with_train_steps() {
    let tmp = tempfile::tempdir().unwrap();
    let old = tmp.path().join("old");
    new_run(&old, 3);
    let new = tmp.path().join("moved");
    std::fs::rename(&old, &new).unwrap();
    let out = resume(&new, &["train.steps=5".to_string()]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("changed on resume: train.steps = 5 (was 3)"),
        "{stdout}"
    );
    assert!(stdout.contains("changed on resume: out_dir"), "{stdout}");
    assert!(stdout.contains("finished after 5 steps"), "{stdout}");
    assert!(!old.exists(), "nothing is written at the old place");
    let config = std::fs::read_to_string(new.join("config.toml")).unwrap();
    assert!(
        config.contains(&format!("out_dir = {:?}", path_str(&new))),
        "{config}"
    );
    assert!(config.contains("steps = 5"), "{config}");
    // The history is whole: each step once, in order, across the resume.
    assert_eq!(metric_steps(&new), vec![1, 2, 3, 4, 5]);
    let (_, state) = load_checkpoint(&new.join("checkpoint.safetensors")).unwrap();
    assert_eq!(state.step, 5);
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(new.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["steps"].as_array().unwrap().len(), 5);
    assert_eq!(report["stopped"], "finished");
}

#[test]
fn resuming_a_finished_run_says_so_and_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("done");
    new_run(&dir, 3);
    let before = snapshot(&dir);
    let out = resume(&dir, &[]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("the run is finished (step 3 of 3); nothing was changed"),
        "{stdout}"
    );
    assert_eq!(
        snapshot(&dir),
        before,
        "resuming a finished run wrote files"
    );
}

#[test]
fn a_new_run_refuses_a_folder_with_files_fastpt_did_not_write() {
    let tmp = tempfile::tempdir().unwrap();
    // out_dir = "." in a project folder holding the user's own config.toml and report.json.
    let project = tmp.path().join("project");
    std::fs::create_dir(&project).unwrap();
    std::fs::write(project.join("config.toml"), "# mine\n").unwrap();
    std::fs::write(project.join("report.json"), "{\"mine\": true}\n").unwrap();
    std::fs::write(project.join("notes.txt"), "mine\n").unwrap();
    let before = snapshot(&project);
    let mut sets = short(2);
    sets.push("out_dir=.".into());
    let out = run_in(Some(&project), &sets, &[]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("files fastpt did not write (config.toml, notes.txt, report.json)"),
        "{stderr}"
    );
    assert_eq!(snapshot(&project), before);
}

#[test]
fn a_new_run_refuses_another_runs_folder_even_without_its_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("r");
    new_run(&dir, 2);
    std::fs::remove_file(dir.join("checkpoint.safetensors")).unwrap();
    let before = snapshot(&dir);
    let mut sets = short(2);
    sets.push(format!("out_dir={:?}", path_str(&dir)));
    let out = run_in(None, &sets, &[]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("another fastpt run") && stderr.contains("best.safetensors"),
        "{stderr}"
    );
    assert_eq!(snapshot(&dir), before);
    // The embedded default picks the next free folder instead: runs/default holds an earlier
    // run's results (its checkpoint gone), so the new run goes to runs/default-2.
    let cwd = tmp.path().join("cwd");
    std::fs::create_dir(&cwd).unwrap();
    let out = run_in(Some(&cwd), &short(2), &[]);
    assert!(out.status.success(), "{:?}", text(&out));
    std::fs::remove_file(cwd.join("runs/default/checkpoint.safetensors")).unwrap();
    let out = run_in(Some(&cwd), &short(2), &[]);
    let (stdout, _) = text(&out);
    assert!(out.status.success());
    assert!(stdout.contains("run folder runs/default-2"), "{stdout}");
    assert!(cwd.join("runs/default-2/checkpoint.safetensors").exists());
    assert!(!cwd.join("runs/default/checkpoint.safetensors").exists());
}

/// A run long enough to be stopped: `fastpt run` with many steps into `dir`, stdout piped.
fn start_long_run(dir: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_fastpt"))
        .args(["run", "--device", "cpu"])
        .args(["--set", "train.warmup_steps=0"])
        .args([
            "--set",
            "train.steps=1000000",
            "--set",
            "train.batch_size=2",
        ])
        .args([
            "--set",
            "train.eval_every=0",
            "--set",
            "train.checkpoint_every=0",
        ])
        .args([
            "--set",
            "data.train_examples=8",
            "--set",
            "data.dev_examples=4",
        ])
        .args(["--set", &format!("out_dir={:?}", path_str(dir))])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits (up to two minutes: a loaded machine is slow, this is no timing test) until
/// metrics.jsonl in `dir` holds `lines` lines, i.e. the run is in its step loop.
fn wait_for_steps(dir: &Path, lines: usize) {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(120) {
        let n = std::fs::read_to_string(dir.join("metrics.jsonl"))
            .map(|t| t.lines().count())
            .unwrap_or(0);
        if n >= lines {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("the run in {} did not reach {lines} steps", dir.display());
}

#[test]
fn two_processes_cannot_share_a_run_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("busy");
    let mut first = start_long_run(&dir);
    wait_for_steps(&dir, 2);
    let pid = format!("pid {}", first.id());
    // A resume of the folder, and a new run into it, are both refused naming the first's pid.
    let out = resume(&dir, &[]);
    let (_, stderr) = text(&out);
    let out2 = run_in(None, &[format!("out_dir={:?}", path_str(&dir))], &[]);
    let (_, stderr2) = text(&out2);
    let _ = Command::new("kill")
        .args(["-TERM", &first.id().to_string()])
        .status();
    let status = first.wait().unwrap();
    assert!(!out.status.success() && stderr.contains(&pid), "{stderr}");
    assert!(stderr.contains("in use by another fastpt run"), "{stderr}");
    assert!(
        !out2.status.success() && stderr2.contains(&pid),
        "{stderr2}"
    );
    assert_eq!(status.code(), Some(143));
    // Once the first has ended, the folder resumes.
    let (_, state) = load_checkpoint(&dir.join("checkpoint.safetensors")).unwrap();
    let out = resume(&dir, &[format!("train.steps={}", state.step + 1)]);
    assert!(out.status.success(), "{:?}", text(&out));
}

/// Resumes `dir` (steps 6) after `tamper` changed its checkpoint; the error must hold each of
/// `want`, and the folder must be unchanged.
fn refused_checkpoint(
    dir: &Path,
    original: &[u8],
    tamper: impl FnOnce(
        &mut Vec<fastpt::train::checkpoint::OptimTensor>,
        &mut fastpt::train::checkpoint::TrainState,
    ),
    want: &[&str],
) {
    let path = dir.join("checkpoint.safetensors");
    std::fs::write(&path, original).unwrap();
    let (mut tensors, mut state) = load_checkpoint(&path).unwrap();
    tamper(&mut tensors, &mut state);
    save_checkpoint(&path, &tensors, &state).unwrap();
    let before = snapshot(dir);
    let out = resume(dir, &["train.steps=6".to_string()]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{want:?}: {stderr}");
    for w in want {
        assert!(stderr.contains(w), "{w:?} not in {stderr}");
    }
    assert!(stderr.contains("checkpoint.safetensors"), "{stderr}");
    assert_eq!(snapshot(dir), before, "{want:?}: the refused resume wrote");
}

#[test]
fn checkpoint_fields_are_validated_on_load() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("r");
    new_run(&dir, 4);
    let original = std::fs::read(dir.join("checkpoint.safetensors")).unwrap();
    refused_checkpoint(
        &dir,
        &original,
        |_, s| s.step = 7,
        &["field `step` = 7", "train.steps = 6"],
    );
    refused_checkpoint(
        &dir,
        &original,
        |_, s| s.cursor = 1000,
        &[
            "field `cursor` = 1000",
            "past the end of the training data (8 examples",
        ],
    );
    refused_checkpoint(
        &dir,
        &original,
        |_, s| (s.epoch, s.cursor) = (0, 2),
        &["field `epoch, cursor` = 0, 2", "is at epoch 1, cursor 0"],
    );
    refused_checkpoint(
        &dir,
        &original,
        |_, s| {
            s.losses.pop();
        },
        &["field `losses` = 3 entries", "step = 4"],
    );
    refused_checkpoint(
        &dir,
        &original,
        |_, s| s.losses[1].1 = f64::NAN,
        &["field `losses[1]`", "finite loss"],
    );
    refused_checkpoint(
        &dir,
        &original,
        |t, _| t[0].value[3] = f64::NAN,
        &["field `param/", "[3]` = NaN: must be finite"],
    );
    refused_checkpoint(
        &dir,
        &original,
        |t, _| t[0].v[0] = -1.0,
        &["field `adam_v/", "must be finite and not negative"],
    );
    refused_checkpoint(
        &dir,
        &original,
        |t, _| {
            let x = &mut t[0];
            let n = x.value.len();
            x.shape = vec![n, 1];
        },
        &["expected shape"],
    );
    refused_checkpoint(
        &dir,
        &original,
        |t, _| {
            t.pop();
        },
        &["field `tensors`"],
    );
    refused_checkpoint(
        &dir,
        &original,
        |_, s| s.best_step = Some(9),
        &["field `best_step, best_metric`"],
    );
    // The untouched checkpoint resumes.
    std::fs::write(dir.join("checkpoint.safetensors"), &original).unwrap();
    let out = resume(&dir, &["train.steps=6".to_string()]);
    assert!(out.status.success(), "{:?}", text(&out));
}

#[test]
fn metrics_after_the_checkpoint_are_dropped_on_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("r");
    new_run(&dir, 4);
    assert_eq!(metric_steps(&dir), vec![1, 2, 3, 4]);
    // As a kill -9 after step 6 (checkpoint at 4) would leave them, and a torn last line.
    let mut text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    text.push_str("{\"kind\":\"step\",\"step\":5,\"loss\":1.0}\n");
    text.push_str("{\"kind\":\"eval\",\"step\":6,\"split\":\"dev\"}\n{\"kind\":\"st");
    std::fs::write(dir.join("metrics.jsonl"), text).unwrap();
    let out = resume(&dir, &["train.steps=6".to_string()]);
    assert!(out.status.success(), "{:?}", self::text(&out));
    assert_eq!(metric_steps(&dir), vec![1, 2, 3, 4, 5, 6]);
    let lines = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    let evals: Vec<serde_json::Value> = lines
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["kind"] == "eval")
        .collect();
    // Evaluations at steps 2, 4, 6 (eval_every = 2), each once, each with its dev loss.
    let steps: Vec<u64> = evals.iter().map(|v| v["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, vec![2, 4, 6]);
    assert!(evals.iter().all(|v| v["dev_loss"].as_f64().is_some()));
    let step1: serde_json::Value = serde_json::from_str(lines.lines().next().unwrap()).unwrap();
    for key in ["loss", "lr", "grad_norm", "tokens_per_s", "time"] {
        assert!(step1[key].as_f64().is_some(), "{key}: {step1}");
    }
}

#[test]
fn a_log_gets_plain_progress_lines() {
    let tmp = tempfile::tempdir().unwrap();
    let mut sets = short(20);
    sets.push(format!("out_dir={:?}", path_str(&tmp.path().join("r"))));
    let out = run_in(None, &sets, &[]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    // Every tenth of the run (stdout is a pipe here, not a terminal) and at each evaluation.
    for want in [
        "step 2/20 (10%): loss ",
        "step 20/20 (100%)",
        "step 4: dev loss ",
    ] {
        assert!(stdout.contains(want), "{want:?} not in {stdout}");
    }
    assert_eq!(stdout.matches("/20 (").count(), 10, "{stdout}");
}

/// The start banner names the data's sizes and the resolved steps and warmup, here from
/// TrainingArguments' names: 8 examples in batches of 2 are 4 steps an epoch, 2 epochs 8
/// steps, warmup ceil(0.25 × 8) = 2; loss.svg draws the dev loss of the evaluations.
#[test]
fn the_banner_shows_sizes_and_resolved_steps_and_the_plot_the_dev_loss() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("r");
    let mut sets = short(4);
    sets.extend([
        "max_steps=0".to_string(),
        "num_train_epochs=2".into(),
        "warmup_ratio=0.25".into(),
        format!("output_dir={:?}", path_str(&dir)),
    ]);
    let out = run_in(None, &sets, &[]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.contains("data: 8 train, 4 dev examples (synthetic) | 8 steps (train.epochs = 2"),
        "{stdout}"
    );
    assert!(
        stdout.contains("| warmup 2 steps (ceil(train.warmup_ratio = 0.25 × 8 steps))"),
        "{stdout}"
    );
    assert!(stdout.contains("run folder "), "{stdout}");
    let svg = std::fs::read_to_string(dir.join("loss.svg")).unwrap();
    assert!(
        svg.contains("training loss") && svg.contains("dev loss"),
        "no dev series in loss.svg"
    );
    // The synthetic task's config.toml holds no data keys that do not apply to it.
    let config = std::fs::read_to_string(dir.join("config.toml")).unwrap();
    for key in ["dir", "labels", "k_shot", "eval_batch_size"] {
        assert!(!config.contains(&format!("\n{key} =")), "{key} in {config}");
    }
    assert!(config.contains("\ntrain_examples = 8\n"), "{config}");
}

/// `--init-from DIR` is recorded in config.toml as `init_from`, which `--config` honours.
#[test]
fn init_from_is_recorded_and_a_config_file_honours_it() {
    let tmp = tempfile::tempdir().unwrap();
    let pt = ["method=pt".to_string(), "method.prompt_len=4".into()];
    let first = tmp.path().join("first");
    let mut sets = short(2);
    sets.extend(pt.clone());
    sets.push(format!("out_dir={:?}", path_str(&first)));
    let out = run_in(None, &sets, &[]);
    assert!(out.status.success(), "{:?}", text(&out));
    let adapter = first.join("export/adapter");
    assert!(adapter.is_dir());

    let warm = tmp.path().join("warm");
    let mut sets = short(2);
    sets.extend(pt.clone());
    sets.push(format!("out_dir={:?}", path_str(&warm)));
    let out = run_in(None, &sets, &["--init-from", &path_str(&adapter)]);
    assert!(out.status.success(), "{:?}", text(&out));
    let config = std::fs::read_to_string(warm.join("config.toml")).unwrap();
    assert!(
        config.contains(&format!("init_from = {:?}", path_str(&adapter))),
        "{config}"
    );
    // The recorded config starts the same warm start: the adapter is read (a missing one is
    // an error naming it; another method refuses it).
    let file = tmp.path().join("run.toml");
    let missing = tmp.path().join("no-adapter");
    std::fs::write(
        &file,
        config.replace(&path_str(&adapter), &path_str(&missing)),
    )
    .unwrap();
    let again = tmp.path().join("again");
    let out = run_in(
        None,
        &[format!("out_dir={:?}", path_str(&again))],
        &["--config", &path_str(&file)],
    );
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("no-adapter"), "{stderr}");
    let out = run_in(
        None,
        &[
            format!("out_dir={:?}", path_str(&again)),
            format!("init_from={:?}", path_str(&adapter)),
            "method=dpt".into(),
            "method.prompt_len=4".into(),
            "method.rank=2".into(),
        ],
        &["--config", &path_str(&file)],
    );
    let (_, stderr) = text(&out);
    assert!(stderr.contains("warm-starts the `pt` method"), "{stderr}");
    assert!(!again.exists(), "a refused run leaves no folder");
}
