//! What a careless or hostile user can give (issue 19): sizes past any limit (rules 1 and 2) and
//! non-finite weights (rule 3). Each gets an error that names the setting or tensor, the value
//! and the limit, never a panic, a wrapped count, a huge allocation or a silent NaN.

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
    for (sets, needle) in [
        // EPT-MS's experts: 2^62 of them would need more memory than exists.
        (
            &["ept.experts=4611686018427387904"][..],
            "trainable parameters",
        ),
        // e · h · d = 2^63 · 2^63 · 64 is past even u128: the count saturates instead of
        // wrapping (or panicking, with overflow checks on).
        (
            &[
                "ept.experts=9223372036854775807",
                "ept.expert_hidden=9223372036854775807",
            ][..],
            "trainable parameters",
        ),
        // DePT: a prompt of 2^40 rows.
        (
            &["dept.prompt_len=1099511627776"][..],
            "trainable parameters",
        ),
    ] {
        let set = sets.join(" ");
        let method = set.split('.').next().unwrap();
        let method = format!("method={method:?}");
        let mut args = vec!["run", "--set", &method, "--set", &out];
        for s in sets {
            args.extend(["--set", s]);
        }
        let (ok, _, stderr) = fastpt(&args);
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

/// A NaN in a frozen weight (issue 19, rule 3) is refused at load, naming the file and tensor:
/// with `--quant nf4` it used to stop the process in the quantiser's assertion, without it the
/// run trained on NaN scores.
#[test]
fn a_non_finite_weight_is_refused_at_load_with_or_without_nf4() {
    use fastpt::backend::cpu::CpuBackend;
    use fastpt::model::hf::{save_safetensors, SafetensorsFolder, TensorData};
    use fastpt::model::linear::Quant;
    use fastpt::model::load_model;
    use fastpt::testing::fixture;

    let src = fixture("t5-v1_0-tiny");
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(src.join("config.json"), dir.path().join("config.json")).unwrap();
    let folder = SafetensorsFolder::open(&src).unwrap();
    let poisoned = "encoder.block.0.layer.0.SelfAttention.q.weight";
    let tensors: Vec<(String, Vec<usize>, TensorData)> = folder
        .names()
        .into_iter()
        .map(|name| {
            let shape = folder.shape(&name).unwrap();
            let mut values = folder.load_f32(&name, &shape).unwrap();
            if name == poisoned {
                values[3] = f32::NAN;
            }
            (name, shape, TensorData::F32(values))
        })
        .collect();
    assert!(
        tensors.iter().any(|t| t.0 == poisoned),
        "the fixture lacks {poisoned}"
    );
    save_safetensors(&dir.path().join("model.safetensors"), &tensors).unwrap();
    for quant in [Quant::None, Quant::Nf4] {
        let err = match load_model(&CpuBackend::<f32>::new(), dir.path(), quant) {
            Ok(_) => panic!("{quant:?}: a NaN weight was accepted"),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains("model.safetensors")
                && err.contains(&format!("tensor `{poisoned}`: element 3 of"))
                && err.contains("is NaN"),
            "{quant:?}: {err}"
        );
    }
}
