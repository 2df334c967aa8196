//! `fastpt bench` tells a measured difference from noise: the same setting twice comes out `≈`,
//! a setting slowed down by the bench's test hook (`FASTPT_BENCH_TEST_DELAY`) comes out as a
//! difference, and `--baseline` runs its PEFT process as a cell of the same rounds.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

/// `fastpt bench` on the CPU at t5-tiny with `settings`, small shapes and `rounds` rounds, with
/// extra environment `envs`; returns (stdout, report.json).
fn bench(settings: &[&str], rounds: usize, envs: &[(&str, &str)]) -> (String, serde_json::Value) {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fastpt"));
    cmd.args(["bench", "--device", "cpu", "--shape", "t5-tiny"])
        .args(["--batch", "2", "--input-len", "9", "--target-len", "2"])
        .args(["--warmup", "1", "--steps", "1"])
        .args(["--rounds", &rounds.to_string()])
        .arg("--out")
        .arg(dir.path());
    for s in settings {
        cmd.args(["--setting", s]);
    }
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let report = std::fs::read_to_string(dir.path().join("report.json")).unwrap();
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        serde_json::from_str(&report).unwrap(),
    )
}

/// The table line of `setting` (the `n`-th with that name).
fn line<'a>(stdout: &'a str, setting: &str, n: usize) -> &'a str {
    let prefix = format!("| t5-tiny | {setting} |");
    stdout
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .nth(n)
        .unwrap_or_else(|| panic!("no line {n} of {setting}: {stdout}"))
}

#[test]
fn bench_a_setting_against_itself_is_within_noise() {
    // Eight rounds: the interval is [min, max] of the per-round changes, which misses 0% for two
    // identical cells only when all eight fall on one side (2/256 of runs, if nothing else is
    // wrong). A second run makes a false alarm of this test 1 in 16,000; a bench that reported
    // differences between identical cells would fail both.
    let attempt = || {
        let (stdout, report) = bench(&["pt:prompt_len=5", "pt:prompt_len=5"], 8, &[]);
        let rows = report["rows"].as_array().unwrap().clone();
        (stdout, rows)
    };
    let (mut stdout, mut rows) = attempt();
    if !line(&stdout, "pt:prompt_len=5", 1).contains("≈ (within noise") {
        (stdout, rows) = attempt();
    }
    let second = line(&stdout, "pt:prompt_len=5", 1);
    assert!(second.contains("≈ (within noise"), "{stdout}");
    let change = &rows[1]["train_vs_first"];
    assert_eq!(change["within_noise"], true, "{change}");
    let (low, high) = (
        change["percent"]["low"].as_f64().unwrap(),
        change["percent"]["high"].as_f64().unwrap(),
    );
    assert!(low <= 0.0 && 0.0 <= high, "{change}");
    // One value per round, and the interval of each time holds its median.
    for row in &rows {
        let t = &row["train_step_ms"];
        assert_eq!(t["samples"].as_array().unwrap().len(), 8);
        let (lo, med, hi) = (
            t["low"].as_f64().unwrap(),
            t["median"].as_f64().unwrap(),
            t["high"].as_f64().unwrap(),
        );
        assert!(0.0 < lo && lo <= med && med <= hi, "{t}");
        assert!(t["confidence"].as_f64().unwrap() >= 0.95, "{t}");
    }
    assert!(
        stdout.contains("8 interleaved rounds") && stdout.contains("intervals: 99%"),
        "{stdout}"
    );
}

#[test]
fn bench_a_slowed_setting_is_reported_as_a_difference() {
    // The same setting spelled twice; the test hook sleeps 60 ms in each training step of the
    // second (a t5-tiny step at these sizes takes a few ms).
    let (stdout, report) = bench(
        &["pt:prompt_len=5", "pt:prompt_len=5,"],
        10,
        &[("FASTPT_BENCH_TEST_DELAY", "pt:prompt_len=5,=60")],
    );
    let slowed = line(&stdout, "pt:prompt_len=5,", 0);
    assert!(!slowed.contains('≈'), "{stdout}");
    let change = &report["rows"][1]["train_vs_first"];
    assert_eq!(change["within_noise"], false, "{change}");
    let low = change["percent"]["low"].as_f64().unwrap();
    assert!(low > 100.0, "{change}");
    // The cell's own step time moved by about the delay; the first cell's did not.
    let ms = |i: usize| {
        report["rows"][i]["train_step_ms"]["median"]
            .as_f64()
            .unwrap()
    };
    assert!(ms(1) - ms(0) > 50.0, "{} vs {}", ms(0), ms(1));
    // Forward passes and generation are not slowed.
    let fwd = |i: usize| report["rows"][i]["forward_ms"]["median"].as_f64().unwrap();
    assert!(fwd(1) < fwd(0) + 30.0, "{} vs {}", fwd(0), fwd(1));
}

/// Writes an executable `path` with `text`.
fn script(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// A folder for PYTHONPATH with empty packages torch, transformers and peft: what
/// `--baseline`'s check looks for, without the libraries.
fn fake_site(dir: &Path) -> std::path::PathBuf {
    let site = dir.join("site");
    for pkg in ["torch", "transformers", "peft"] {
        std::fs::create_dir_all(site.join(pkg)).unwrap();
        std::fs::write(site.join(pkg).join("__init__.py"), "").unwrap();
    }
    site
}

/// `--baseline` with a stand-in for tools/peft_baseline.py (packages torch, transformers and
/// peft that are empty folders; the script speaks the --serve protocol and sleeps instead of
/// training): the PEFT cell is started before the rounds, gets one `round` per round, is
/// finished once, and its row sits next to fastpt's with intervals.
#[test]
fn bench_baseline_runs_peft_as_a_cell_of_the_same_rounds() {
    let tmp = tempfile::tempdir().unwrap();
    let site = fake_site(tmp.path());
    let fake = tmp.path().join("fake_peft.py");
    script(
        &fake,
        r#"import json, sys, time
args = sys.argv[1:]
log = open(sys.argv[0] + ".log", "a")
log.write("start " + " ".join(args) + "\n"); log.flush()
assert "--serve" in args
def say(obj):
    sys.stdout.write(json.dumps(obj) + "\n"); sys.stdout.flush()
say({"ready": True, "train_params": 15, "backend": "fake torch"})
for line in sys.stdin:
    cmd = line.strip()
    log.write(cmd + "\n"); log.flush()
    if cmd == "round":
        time.sleep(0.02)
        say({"train_step_ms": 20.0, "generate_ms": 10.0})
    elif cmd == "finish":
        say({"peak_memory_bytes": 1e6, "memory": "fake RSS", "train_params": 15, "backend": "fake torch"})
        break
"#,
    );
    let out_dir = tmp.path().join("out");
    // From another directory than the checkout.
    let out = Command::new(env!("CARGO_BIN_EXE_fastpt"))
        .current_dir(tmp.path())
        .args([
            "bench",
            "--device",
            "cpu",
            "--shape",
            "t5-tiny",
            "--baseline",
        ])
        .args(["--setting", "none", "--setting", "pt:prompt_len=3"])
        .args(["--batch", "2", "--input-len", "9", "--target-len", "2"])
        .args(["--warmup", "1", "--steps", "1", "--rounds", "6"])
        .arg("--out")
        .arg(&out_dir)
        .env("FASTPT_PYTHON", "python3")
        .env("PYTHONPATH", &site)
        .env("FASTPT_BASELINE_SCRIPT", &fake)
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    // Started once for the one pt setting, with its sizes; six rounds; finished.
    let log = std::fs::read_to_string(tmp.path().join("fake_peft.py.log"))
        .unwrap_or_else(|e| panic!("no log: {e}\n{stderr}"));
    let lines: Vec<&str> = log.lines().collect();
    assert!(
        lines[0].starts_with("start --serve --shape t5-tiny"),
        "{log}"
    );
    for arg in [
        "--num-virtual-tokens 3",
        "--batch 2",
        "--input-len 9",
        "--steps 1",
    ] {
        assert!(lines[0].contains(arg), "{arg}: {log}");
    }
    assert_eq!(
        &lines[1..],
        [&["round"; 6][..], &["finish"]].concat(),
        "{log}"
    );
    // The PEFT process started before the first round and answered in the rounds.
    let started = stderr.find("starting PEFT on t5-tiny").unwrap();
    let first_round = stderr.find("round 1 of 6").unwrap();
    assert!(started < first_round, "{stderr}");
    // The bench's own table holds the PEFT row too; it measures no forward pass.
    let peft_line = stdout
        .lines()
        .find(|l| l.starts_with("| t5-tiny | peft:pt:prompt_len=3 | 3 |"))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(peft_line.contains("| — |"), "{peft_line}");
    let table = std::fs::read_to_string(out_dir.join("baseline.md")).unwrap();
    assert!(stdout.contains(table.trim()), "{stdout}");
    let row = table
        .lines()
        .find(|l| l.starts_with("| t5-tiny | 3 |"))
        .unwrap_or_else(|| panic!("{table}"));
    // PEFT's 20.00 ms in every round: its interval is a point; fastpt's change against it has
    // an interval (or ≈).
    assert!(row.contains("| 20.00 (20.00–20.00) |"), "{row}");
    assert!(row.contains('…'), "{row}");
    assert!(table.contains("fake torch: fake RSS"), "{table}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("report.json")).unwrap())
            .unwrap();
    let peft = report["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["setting"] == "peft:pt:prompt_len=3")
        .unwrap();
    assert_eq!(
        peft["train_step_ms"]["samples"].as_array().unwrap().len(),
        6
    );
    assert_eq!(peft["train_params"], 15);
    assert_eq!(peft["external"]["backend"], "fake torch");
}

/// A PEFT process that dies mid-run stops the bench with its stderr, and none is left behind.
#[test]
fn bench_baseline_names_a_peft_process_that_fails() {
    let tmp = tempfile::tempdir().unwrap();
    let site = fake_site(tmp.path());
    let fake = tmp.path().join("dying_peft.py");
    script(
        &fake,
        r#"import json, sys
sys.stdout.write(json.dumps({"ready": True}) + "\n"); sys.stdout.flush()
sys.stdin.readline()
sys.stderr.write("CUDA out of memory (pretend)\n")
sys.exit(3)
"#,
    );
    let out = Command::new(env!("CARGO_BIN_EXE_fastpt"))
        .args([
            "bench",
            "--device",
            "cpu",
            "--shape",
            "t5-tiny",
            "--baseline",
        ])
        .args(["--setting", "pt:prompt_len=3", "--batch", "1"])
        .args(["--input-len", "4", "--target-len", "2", "--rounds", "2"])
        .env("PYTHONPATH", &site)
        .env("FASTPT_BASELINE_SCRIPT", &fake)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    common::assert_clean_error(out.status.success(), &stderr);
    assert!(
        stderr.contains("the PEFT baseline") && stderr.contains("CUDA out of memory (pretend)"),
        "{stderr}"
    );
}
