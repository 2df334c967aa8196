//! tools/gpu-check.sh without a GPU. Stubs of fastpt, kernel_lab, ncu and nvidia-smi
//! (tests/fixtures/gpu-check/) answer at once, or hang in the stage named by `STUB_HANG`; the
//! script must keep to its time budget, stop after a failed doctor, and leave in $OUT, after
//! every stage and whatever kills it, a summary and the logs of the stages that finished.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

const STUBS: [(&str, &str); 4] = [
    ("fastpt", include_str!("fixtures/gpu-check/fastpt")),
    ("kernel_lab", include_str!("fixtures/gpu-check/kernel_lab")),
    ("ncu", include_str!("fixtures/gpu-check/ncu")),
    ("nvidia-smi", include_str!("fixtures/gpu-check/nvidia-smi")),
];

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tools/gpu-check.sh");

/// Every stage, in the script's order.
const STAGES: [&str; 8] = [
    "doctor",
    "flash-tc",
    "kernel-lab",
    "claims",
    "baseline",
    "memory",
    "text-task",
    "ncu",
];

/// A temporary folder with the stubs in `bin/`, `$OUT` in `out/` and the results in `results/`.
struct Sandbox {
    tmp: tempfile::TempDir,
}

impl Sandbox {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let bin = tmp.path().join("bin");
        fs::create_dir(&bin).unwrap();
        for (name, text) in STUBS {
            let path = bin.join(name);
            fs::write(&path, text).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        }
        Sandbox { tmp }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.tmp.path().join(rel)
    }

    /// The script with the stubs (first on PATH), `budget` seconds and `env`; a clean
    /// environment, so that no setting of the machine running the tests leaks in. It leads its
    /// own process group (so a test can kill the group) and writes to files, not pipes (a
    /// process left behind must not hold the test's pipes open).
    fn command(&self, budget: Option<u64>, env: &[(&str, &str)]) -> Command {
        let bin = self.path("bin");
        let mut cmd = Command::new("bash");
        cmd.arg(SCRIPT)
            .env_clear()
            .env(
                "PATH",
                format!("{}:{}", bin.display(), std::env::var("PATH").unwrap()),
            )
            .env("FASTPT_BIN", bin.join("fastpt"))
            .env("KERNEL_LAB", bin.join("kernel_lab"))
            .env("GPU_CHECK_RESULTS", self.path("results"))
            .env("OUT", self.path("out"))
            .env("STUB_PIDS", self.path("pids"))
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(fs::File::create(self.path("stdout")).unwrap())
            .stderr(fs::File::create(self.path("stderr")).unwrap())
            .process_group(0);
        if let Ok(home) = std::env::var("HOME") {
            cmd.env("HOME", home);
        }
        if let Some(budget) = budget {
            cmd.env("GPU_CHECK_BUDGET", budget.to_string());
        }
        cmd
    }

    /// Runs the script to its end (at most `limit`) and returns its status and wall time.
    fn run(&self, budget: u64, env: &[(&str, &str)], limit: Duration) -> (ExitStatus, Duration) {
        let start = Instant::now();
        let mut child = self.command(Some(budget), env).spawn().unwrap();
        let status = wait_for(&mut child, limit).unwrap_or_else(|| {
            kill_group(&child, "KILL");
            panic!(
                "gpu-check.sh ran past {limit:?}; stdout:\n{}",
                self.stdout()
            )
        });
        (status, start.elapsed())
    }

    fn stdout(&self) -> String {
        fs::read_to_string(self.path("stdout")).unwrap_or_default()
    }

    fn summary(&self) -> String {
        fs::read_to_string(self.path("out/summary.md")).unwrap_or_default()
    }

    /// The files of logs.tar.gz, relative to the results folder.
    fn logs(&self) -> Vec<String> {
        let out = Command::new("tar")
            .arg("-tzf")
            .arg(self.path("out/logs.tar.gz"))
            .output()
            .unwrap();
        assert!(out.status.success(), "logs.tar.gz does not read");
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .filter_map(|l| l.strip_prefix("results/").map(str::to_string))
            .collect()
    }

    /// The pids of the stubs that hung.
    fn hung_pids(&self) -> Vec<u32> {
        fs::read_to_string(self.path("pids"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        // A hung stub outlives a SIGKILL of the script: timeout(1) leads its own process group.
        for pid in self.hung_pids() {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .stderr(Stdio::null())
                .status();
        }
    }
}

fn wait_for(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        sleep(Duration::from_millis(50));
    }
    None
}

fn kill_group(child: &Child, signal: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{signal}"), "--", &format!("-{}", child.id())])
        .status();
}

/// Waits until `cond` holds (checked every 50 ms), at most `limit`.
fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if cond() {
            return true;
        }
        sleep(Duration::from_millis(50));
    }
    false
}

/// A stage's status in the summary's table (`| stage | status | seconds | timeout | note |`).
fn status(summary: &str, stage: &str) -> String {
    summary
        .lines()
        .find_map(|l| l.strip_prefix(&format!("| {stage} | ")))
        .and_then(|rest| rest.split(" |").next())
        .unwrap_or_else(|| panic!("no row for {stage} in the summary:\n{summary}"))
        .to_string()
}

/// What the device tool brings back: at most 8 files, at most two folders deep, names of
/// letters, digits, `.`, `_` and `-`.
fn check_out(out: &Path) {
    fn walk(dir: &Path, depth: usize, files: &mut Vec<PathBuf>) {
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_str().unwrap().to_string();
            assert!(
                !name.is_empty()
                    && name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)),
                "{name:?} is not a name the device tool brings back"
            );
            if path.is_dir() {
                assert!(depth < 2, "{} is too deep", path.display());
                walk(&path, depth + 1, files);
            } else {
                files.push(path);
            }
        }
    }
    let mut files = Vec::new();
    walk(out, 0, &mut files);
    assert!(files.len() <= 8, "{} files in $OUT: {files:?}", files.len());
    assert!(
        files
            .iter()
            .all(|f| f.extension().is_none_or(|e| e != "partial")),
        "a temporary file was left in $OUT: {files:?}"
    );
}

#[test]
fn header_gives_the_device_command_and_a_budget_under_the_tool_limit() {
    let script = fs::read_to_string(SCRIPT).unwrap();
    let header: Vec<&str> = script.lines().take_while(|l| l.starts_with('#')).collect();
    let line = header
        .iter()
        .find(|l| l.contains("run(command=\"bash tools/gpu-check.sh\""))
        .expect("the header gives the device tool's command");
    assert!(
        line.contains(r#"carry=["target/dist/fastpt", "target/dist/examples/kernel_lab"]"#),
        "{line}"
    );
    let timeout: u64 = line
        .split("timeout_s=")
        .nth(1)
        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|s| s.parse().ok())
        .expect("the command names timeout_s");
    assert!(timeout <= 600, "{line}");
    let budget: u64 = script
        .split("GPU_CHECK_BUDGET:-")
        .nth(1)
        .and_then(|s| s.split('}').next())
        .and_then(|s| s.parse().ok())
        .expect("a default budget");
    assert!(
        budget <= 540 && budget < timeout,
        "budget {budget}, timeout {timeout}"
    );
    // The binaries it says to carry are the ones the script looks for first.
    assert!(script.contains("pick_bin target/dist/fastpt"));
    assert!(script.contains("pick_bin target/dist/examples/kernel_lab"));
}

#[test]
fn a_hang_in_an_early_stage_times_out_and_the_rest_still_run() {
    let sb = Sandbox::new();
    let budget = 30;
    let (code, took) = sb.run(
        budget,
        &[("STUB_HANG", "kernel-lab")],
        Duration::from_secs(budget + 15),
    );
    assert!(
        took <= Duration::from_secs(budget + 3),
        "took {took:?} with a budget of {budget} s"
    );
    assert_eq!(code.code(), Some(124), "{}", sb.stdout());
    check_out(&sb.path("out"));
    let summary = sb.summary();
    for stage in STAGES {
        let want = if stage == "kernel-lab" {
            "timed out"
        } else {
            "ok"
        };
        assert_eq!(status(&summary, stage), want, "{stage}:\n{summary}");
    }
    // Key lines of the stages made it into the summary.
    assert!(summary.contains("all 3 checks passed"), "{summary}");
    assert!(summary.contains("| t5-small | 10.373021 | 10.373021 |"));
    assert!(summary.contains("attention_forward_bf16 (96, 12, 8)"));
    let logs = sb.logs();
    for f in [
        "doctor.log",
        "flash-tc.log",
        "kernel-lab.log",
        "claims.log",
        "claims/claims.md",
        "baseline/baseline.md",
        "memory/table.md",
        "text-task.log",
        "ncu/details.txt",
        "env.txt",
        "nvidia-smi.txt",
        "summary.md",
    ] {
        assert!(logs.iter().any(|l| l == f), "{f} not in {logs:?}");
    }
    // Checkpoints and the ncu report do not go into the tarball; the report travels alone.
    assert!(
        !logs.iter().any(|l| l.ends_with(".safetensors")),
        "{logs:?}"
    );
    assert!(sb.path("out/kernels.ncu-rep").is_file());
    assert!(sb.path("out/ncu-details.txt").is_file());
    // The results stay in the results folder too.
    assert!(sb.path("results/claims/claims.md").is_file());
}

#[test]
fn a_hang_in_a_late_stage_is_cut_at_the_global_deadline() {
    let sb = Sandbox::new();
    let budget = 16;
    // Its own timeout is far past the budget: the deadline must cut it.
    let (code, took) = sb.run(
        budget,
        &[
            ("STUB_HANG", "memory"),
            ("GPU_CHECK_TIMEOUT_MEMORY", "1000"),
        ],
        Duration::from_secs(budget + 15),
    );
    assert!(
        took <= Duration::from_secs(budget + 2),
        "took {took:?} with a budget of {budget} s"
    );
    assert_eq!(code.code(), Some(124), "{}", sb.stdout());
    check_out(&sb.path("out"));
    let summary = sb.summary();
    for stage in ["doctor", "flash-tc", "kernel-lab", "claims", "baseline"] {
        assert_eq!(status(&summary, stage), "ok", "{stage}:\n{summary}");
    }
    assert_eq!(status(&summary, "memory"), "timed out", "{summary}");
    for stage in ["text-task", "ncu"] {
        assert_eq!(status(&summary, stage), "skipped", "{stage}:\n{summary}");
    }
    assert!(summary.contains("too little time left"), "{summary}");
    let logs = sb.logs();
    for f in ["claims.log", "baseline.log", "memory.log"] {
        assert!(logs.iter().any(|l| l == f), "{f} not in {logs:?}");
    }
}

#[test]
fn a_failed_doctor_stops_the_script_and_names_the_failing_check() {
    let sb = Sandbox::new();
    let (code, took) = sb.run(30, &[("STUB_FAIL", "doctor")], Duration::from_secs(30));
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert_eq!(code.code(), Some(1), "{}", sb.stdout());
    check_out(&sb.path("out"));
    let summary = sb.summary();
    assert_eq!(status(&summary, "doctor"), "FAILED rc 1", "{summary}");
    for stage in &STAGES[1..] {
        assert_eq!(status(&summary, stage), "skipped", "{stage}:\n{summary}");
    }
    assert!(summary.contains("doctor did not pass"), "{summary}");
    for key in [
        "| attention_forward flash_tc | bf16 | 4.10e-1 | 2e-2 | FAIL |",
        "error: 1 of 3 checks failed",
    ] {
        assert!(summary.contains(key), "{key} not in:\n{summary}");
        assert!(sb.stdout().contains(key), "{key} not printed");
    }
    // Nothing after the doctor ran.
    assert!(!sb.path("results/kernel-lab.log").exists());
    assert!(!sb.path("results/claims").exists());
    assert!(sb.logs().iter().any(|l| l == "doctor.log"));
}

/// Starts the script with `STUB_HANG=claims` and waits until claims is running (the stages
/// before it packed, the stub's pid recorded).
fn start_hanging_in_claims(sb: &Sandbox) -> Child {
    let child = sb
        .command(Some(60), &[("STUB_HANG", "claims")])
        .spawn()
        .unwrap();
    let running = wait_until(Duration::from_secs(15), || {
        sb.summary().contains("| claims | running |") && !sb.hung_pids().is_empty()
    });
    if !running {
        kill_group(&child, "KILL");
        panic!(
            "claims never ran; summary:\n{}\nstdout:\n{}",
            sb.summary(),
            sb.stdout()
        );
    }
    child
}

#[test]
fn a_sigkill_leaves_the_finished_stages_in_out() {
    let sb = Sandbox::new();
    let mut child = start_hanging_in_claims(&sb);
    kill_group(&child, "KILL");
    assert!(wait_for(&mut child, Duration::from_secs(5)).is_some());
    check_out(&sb.path("out"));
    let summary = sb.summary();
    for stage in ["doctor", "flash-tc", "kernel-lab"] {
        assert_eq!(status(&summary, stage), "ok", "{stage}:\n{summary}");
    }
    assert_eq!(status(&summary, "claims"), "running", "{summary}");
    let logs = sb.logs();
    for f in ["doctor.log", "flash-tc.log", "kernel-lab.log", "env.txt"] {
        assert!(logs.iter().any(|l| l == f), "{f} not in {logs:?}");
    }
}

#[test]
fn a_sigterm_stops_the_running_stage_and_packs() {
    let sb = Sandbox::new();
    let mut child = start_hanging_in_claims(&sb);
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let code = wait_for(&mut child, Duration::from_secs(5)).expect("the script ends on SIGTERM");
    assert_eq!(code.code(), Some(143));
    check_out(&sb.path("out"));
    let summary = sb.summary();
    assert_eq!(
        status(&summary, "claims"),
        "interrupted (SIGTERM)",
        "{summary}"
    );
    assert!(sb.logs().iter().any(|l| l == "claims.log"));
    // The hung stage went with it: no stub is left running (or only as a zombie).
    let gone = |pid: u32| {
        fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                s.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
            .unwrap_or(true)
    };
    assert!(
        wait_until(Duration::from_secs(3), || sb
            .hung_pids()
            .into_iter()
            .all(gone)),
        "the hung stub outlived SIGTERM"
    );
}

/// What the first GPU session would see without a GPU: the real binary, no nvidia-smi, the
/// default budget. Doctor fails at once and the summary comes back within seconds.
#[test]
fn a_dry_run_without_a_gpu_stops_after_doctor_within_seconds() {
    if Path::new("/dev/nvidiactl").exists() {
        eprintln!("skipped: this machine has a GPU, so doctor would run for real");
        return;
    }
    let sb = Sandbox::new();
    let mut cmd = sb.command(None, &[]);
    // The real binaries, and PATH without the stubs.
    cmd.env("FASTPT_BIN", env!("CARGO_BIN_EXE_fastpt"))
        .env("PATH", std::env::var("PATH").unwrap());
    let start = Instant::now();
    let mut child = cmd.spawn().unwrap();
    let code = wait_for(&mut child, Duration::from_secs(30)).unwrap_or_else(|| {
        kill_group(&child, "KILL");
        panic!("the dry run did not end:\n{}", sb.stdout())
    });
    let took = start.elapsed();
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert!(!code.success());
    check_out(&sb.path("out"));
    let summary = sb.summary();
    assert!(
        status(&summary, "doctor").starts_with("FAILED"),
        "{summary}"
    );
    assert_eq!(status(&summary, "ncu"), "skipped", "{summary}");
    assert!(summary.contains("error:"), "{summary}");
}
