//! Sizes a careless or hostile user can type (issue 19, rule 1 and 2): each gets an error that
//! names the setting, the value and the limit, never a panic, a wrapped count or a huge
//! allocation.

mod common;

use common::fastpt;

/// A failed command: not a panic (Rust's panic message and exit code 101 are absent).
fn assert_clean_error(ok: bool, stderr: &str) {
    assert!(!ok, "the command succeeded: {stderr}");
    assert!(
        !stderr.contains("panicked") && !stderr.contains("memory allocation"),
        "{stderr}"
    );
    assert!(stderr.lines().any(|l| l.starts_with("error: ")), "{stderr}");
}

#[test]
fn params_refuses_a_prompt_length_whose_count_would_wrap() {
    // u64::MAX rows of d = 768 (t5-base, the default shape) would wrap to a small count in usize arithmetic.
    let (ok, stdout, stderr) = fastpt(&[
        "params",
        "--method",
        "pt",
        "--prompt-len",
        "18446744073709551615",
    ]);
    assert_clean_error(ok, &stderr);
    assert!(stdout.is_empty(), "{stdout}");
    assert!(
        stderr.contains("[pt]") && stderr.contains("at most 10000000000"),
        "{stderr}"
    );
    // The largest count still accepted is printed exactly.
    let (ok, stdout, stderr) = fastpt(&["params", "--method", "pt", "--prompt-len", "100000"]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("76,800,000"), "{stdout}");
}

#[test]
fn run_refuses_huge_method_sizes_before_building_anything() {
    let dir = tempfile::tempdir().unwrap();
    let out = format!("out_dir={:?}", dir.path().join("r").display().to_string());
    for (set, needle) in [
        // EPT-MS's experts: 2^62 of them would need more memory than exists.
        ("ept.experts=4611686018427387904", "trainable parameters"),
        // DePT: a prompt of 2^40 rows.
        ("dept.prompt_len=1099511627776", "trainable parameters"),
    ] {
        let method = set.split('.').next().unwrap();
        let (ok, _, stderr) = fastpt(&[
            "run",
            "--set",
            &format!("method={method:?}"),
            "--set",
            set,
            "--set",
            &out,
        ]);
        assert_clean_error(ok, &stderr);
        assert!(stderr.contains(needle), "{set}: {stderr}");
        assert!(
            !dir.path().join("r").exists(),
            "{set}: a run folder was made"
        );
    }
}

#[test]
fn run_refuses_a_synthetic_task_without_dev_examples() {
    let dir = tempfile::tempdir().unwrap();
    let out = format!("out_dir={:?}", dir.path().join("r").display().to_string());
    let (ok, _, stderr) = fastpt(&["run", "--set", "data.dev_examples=0", "--set", &out]);
    assert_clean_error(ok, &stderr);
    assert!(
        stderr.contains("data.dev_examples") && stderr.contains("got 0"),
        "{stderr}"
    );
}
