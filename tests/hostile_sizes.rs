//! What a careless or hostile user can give (issue 19): sizes past any limit (rules 1 and 2) and
//! non-finite weights (rule 3). Each gets an error that names the setting or tensor, the value
//! and the limit, never a panic, a wrapped count, a huge allocation or a silent NaN. Work that
//! is within every limit but cannot fit the machine is refused by the memory estimate
//! (model/memory.rs), tested here with FASTPT_MEMORY_LIMIT_GB so that it does not depend on the
//! machine.

mod common;

use common::{assert_clean_error, fastpt};

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
    use fastpt::model::linear::Quant;
    use fastpt::model::load_model;
    use fastpt::testing::fixture;

    let dir = tempfile::tempdir().unwrap();
    let poisoned = "encoder.block.0.layer.0.SelfAttention.q.weight";
    common::model_with_edited_tensor(&fixture("t5-v1_0-tiny"), dir.path(), poisoned, |v, _| {
        v[3] = f32::NAN
    });
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

// ---- issue 19, rule 2: sizes of config.json, run config keys, flags; the memory estimate ----

/// Runs `fastpt ARGS` with environment variables set: (success, stdout, stderr).
fn fastpt_env(args: &[&str], envs: &[(&str, &str)]) -> (bool, String, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_fastpt"));
    cmd.args(args)
        .env_remove("FASTPT_SKIP_MEMORY_CHECK")
        .env_remove("FASTPT_MEMORY_LIMIT_GB");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A copy of the tiny T5 fixture whose config.json has `edit` applied to its text (weights
/// are never reached: the config is refused first).
fn t5_folder_with(edit: impl Fn(&mut serde_json::Value)) -> tempfile::TempDir {
    let src = fastpt::testing::fixture("t5-v1_0-tiny");
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    let path = dir.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(&path, cfg.to_string()).unwrap();
    dir
}

/// `fastpt forward` on a model folder with a minimal batch; the batch is never read when the
/// config is refused.
fn forward_on(dir: &std::path::Path) -> (bool, String, String) {
    let batch = dir.join("batch.json");
    std::fs::write(&batch, r#"{"input_ids": [[5, 6, 1]], "labels": [[7, 1]]}"#).unwrap();
    let out = dir.join("out.safetensors");
    fastpt(&[
        "forward",
        "--device",
        "cpu",
        "--model",
        dir.to_str().unwrap(),
        "--batch",
        batch.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ])
}

#[test]
fn config_json_with_a_billion_layers_is_refused_by_its_limit_before_loading() {
    for field in ["num_layers", "num_decoder_layers"] {
        let dir = t5_folder_with(|c| c[field] = 1_000_000_000u64.into());
        let (ok, _, stderr) = forward_on(dir.path());
        assert_clean_error(ok, &stderr);
        assert!(
            stderr.contains("config.json")
                && stderr.contains(&format!("field `{field}`"))
                && stderr.contains("1000000000")
                && stderr.contains("MAX_LAYERS"),
            "{field}: {stderr}"
        );
        // The same folder as a run's model.
        let out = dir.path().join("run");
        let (ok, _, stderr) = fastpt(&[
            "run",
            "--device",
            "cpu",
            "--set",
            &format!("model={:?}", dir.path().display().to_string()),
            "--set",
            &format!("out_dir={:?}", out.display().to_string()),
        ]);
        assert_clean_error(ok, &stderr);
        assert!(stderr.contains("MAX_LAYERS"), "{field}: {stderr}");
        assert!(!out.exists(), "a run folder was made");
    }
}

#[test]
fn config_json_heads_and_head_width_of_2_pow_32_do_not_wrap() {
    // num_heads · d_kv = 2^64 wrapped to 0: "expected shape [0, 36]".
    let dir = t5_folder_with(|c| {
        c["d_kv"] = (1u64 << 32).into();
        c["num_heads"] = (1u64 << 32).into();
    });
    let (ok, _, stderr) = forward_on(dir.path());
    assert_clean_error(ok, &stderr);
    assert!(
        stderr.contains("config.json")
            && stderr.contains("4294967296")
            && stderr.contains("MAX_HEAD_DIM")
            && !stderr.contains("expected shape"),
        "{stderr}"
    );
}

#[test]
fn config_json_with_a_float_for_a_size_says_it_is_a_float() {
    let dir = t5_folder_with(|_| {});
    let path = dir.path().join("config.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(&text).unwrap();
    cfg["num_layers"] = serde_json::json!("PLACEHOLDER");
    let text = cfg.to_string().replace("\"PLACEHOLDER\"", "1e9");
    std::fs::write(&path, text).unwrap();
    let (ok, _, stderr) = forward_on(dir.path());
    assert_clean_error(ok, &stderr);
    assert!(
        stderr.contains("field `num_layers`") && stderr.contains("floating-point"),
        "{stderr}"
    );
}

#[test]
fn run_refuses_each_size_key_past_its_limit() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("r");
    let out = format!("out_dir={:?}", run.display().to_string());
    for (set, key, limit) in [
        (
            "train.max_target_len=1000000000",
            "train.max_target_len",
            "MAX_SEQ_LEN",
        ),
        ("train.max_len=1000000000", "train.max_len", "MAX_SEQ_LEN"),
        (
            "train.grad_accum=1000000000",
            "train.grad_accum",
            "MAX_GRAD_ACCUM",
        ),
        (
            "train.batch_size=1000000000",
            "train.batch_size",
            "MAX_BATCH_SIZE",
        ),
        (
            "train.steps=9223372036854775807",
            "train.steps",
            "MAX_STEPS",
        ),
        (
            "data.train_examples=1000000000",
            "data.train_examples",
            "MAX_SYNTHETIC_EXAMPLES",
        ),
        (
            "data.dev_examples=1000000000",
            "data.dev_examples",
            "MAX_SYNTHETIC_EXAMPLES",
        ),
        (
            "data.eval_batch_size=1000000000",
            "data.eval_batch_size",
            "MAX_BATCH_SIZE",
        ),
    ] {
        let (ok, _, stderr) = fastpt(&["run", "--device", "cpu", "--set", set, "--set", &out]);
        assert_clean_error(ok, &stderr);
        let value = set.split('=').nth(1).unwrap();
        assert!(
            stderr.contains(&format!("field `{key}`"))
                && stderr.contains(value)
                && stderr.contains(limit),
            "{set}: {stderr}"
        );
        assert!(!run.exists(), "{set}: a run folder was made");
    }
}

#[test]
fn run_refuses_huge_prompt_sizes_with_the_key_named() {
    let dir = tempfile::tempdir().unwrap();
    let out = format!("out_dir={:?}", dir.path().join("r").display().to_string());
    for (sets, needle) in [
        (&["method=pt", "method.prompt_len=1000000000"][..], "[pt]"),
        (
            &["method=residual", "residual.bottleneck=9223372036854775807"][..],
            "[residual]",
        ),
        (
            &["method=xpt", "xpt.repeats=9223372036854775807"][..],
            "[xpt]",
        ),
        (&["method=pt", "pt.prompt_len=1e9"][..], "floating-point"),
    ] {
        let mut args = vec!["run", "--device", "cpu", "--set", &out];
        for s in sets {
            args.extend(["--set", s]);
        }
        let (ok, _, stderr) = fastpt(&args);
        assert_clean_error(ok, &stderr);
        assert!(stderr.contains(needle), "{sets:?}: {stderr}");
    }
}

#[test]
fn run_that_cannot_fit_is_refused_with_the_estimate_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("r");
    let out = format!("out_dir={:?}", run.display().to_string());
    // 10 MB available: less than even the overhead the estimate adds.
    let limit = [("FASTPT_MEMORY_LIMIT_GB", "0.01")];
    let (ok, _, stderr) = fastpt_env(&["run", "--device", "cpu", "--set", &out], &limit);
    assert_clean_error(ok, &stderr);
    assert!(
        stderr.contains("needs about")
            && stderr.contains("the CPU has 0.0 GB available")
            && stderr.contains("FASTPT_MEMORY_LIMIT_GB=0.01")
            && stderr.contains("FASTPT_SKIP_MEMORY_CHECK=1")
            && stderr.contains("activations"),
        "{stderr}"
    );
    assert!(!run.exists(), "a run folder was made");
}

#[test]
fn step_and_forward_refuse_a_shape_the_memory_cannot_hold_and_the_override_skips() {
    let limit = ("FASTPT_MEMORY_LIMIT_GB", "0.01");
    let (ok, _, stderr) = fastpt_env(&["step", "--device", "cpu", "--shape", "t5-tiny"], &[limit]);
    assert_clean_error(ok, &stderr);
    assert!(
        stderr.contains("fastpt step --shape t5-tiny") && stderr.contains("needs about"),
        "{stderr}"
    );
    // The documented escape hatch runs it anyway.
    let (ok, _, stderr) = fastpt_env(
        &["step", "--device", "cpu", "--shape", "t5-tiny"],
        &[limit, ("FASTPT_SKIP_MEMORY_CHECK", "1")],
    );
    assert!(ok, "{stderr}");
    let dir = tempfile::tempdir().unwrap();
    let batch = dir.path().join("b.json");
    std::fs::write(&batch, r#"{"input_ids": [[5, 6, 1]], "labels": [[7, 1]]}"#).unwrap();
    let out = dir.path().join("o.safetensors");
    let (ok, _, stderr) = fastpt_env(
        &[
            "forward",
            "--device",
            "cpu",
            "--shape",
            "t5-11b",
            "--batch",
            batch.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
        &[("FASTPT_MEMORY_LIMIT_GB", "24")],
    );
    assert_clean_error(ok, &stderr);
    assert!(
        stderr.contains("t5-11b") && stderr.contains("24.0 GB available"),
        "{stderr}"
    );
}

#[test]
fn bench_refuses_t5_11b_on_a_24_gb_cpu_before_measuring_anything() {
    let (ok, stdout, stderr) = fastpt_env(
        &["bench", "--device", "cpu", "--shape", "t5-11b"],
        &[("FASTPT_MEMORY_LIMIT_GB", "24")],
    );
    assert_clean_error(ok, &stderr);
    assert!(
        stdout.is_empty() || !stdout.contains("| t5-11b"),
        "{stdout}"
    );
    assert!(
        stderr.contains("bench --shape t5-11b")
            && stderr.contains("needs about")
            && stderr.contains("weights")
            && stderr.contains("the CPU has 24.0 GB available"),
        "{stderr}"
    );
    // After a shape that fits, the same refusal comes before the first measurement.
    let (ok, _, stderr) = fastpt_env(
        &[
            "bench", "--device", "cpu", "--shape", "t5-tiny", "--shape", "t5-11b", "--steps", "1",
        ],
        &[("FASTPT_MEMORY_LIMIT_GB", "24")],
    );
    assert_clean_error(ok, &stderr);
    assert!(stderr.contains("bench --shape t5-11b"), "{stderr}");
    assert!(
        !stderr.contains("bench: t5-tiny"),
        "measured first: {stderr}"
    );
}

#[test]
fn eval_of_a_run_folder_whose_model_cannot_fit_is_refused_before_loading() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.toml"),
        "model = \"t5-11b\"\nmethod = \"pt\"\n",
    )
    .unwrap();
    let (ok, _, stderr) = fastpt_env(
        &["eval", "--device", "cpu", dir.path().to_str().unwrap()],
        &[("FASTPT_MEMORY_LIMIT_GB", "24")],
    );
    assert_clean_error(ok, &stderr);
    assert!(
        stderr.contains("t5-11b") && stderr.contains("24.0 GB available"),
        "{stderr}"
    );
}

#[test]
fn bench_flags_past_their_limits_are_refused() {
    for (flag, value, limit) in [
        ("--steps", "18446744073709551615", "MAX_BENCH_STEPS"),
        ("--warmup", "18446744073709551615", "MAX_BENCH_STEPS"),
        ("--batch", "1000000000", "MAX_BATCH_SIZE"),
        ("--input-len", "1000000000", "MAX_SEQ_LEN"),
        ("--target-len", "1000000000", "MAX_SEQ_LEN"),
    ] {
        let (ok, _, stderr) = fastpt(&["bench", "--device", "cpu", flag, value]);
        assert_clean_error(ok, &stderr);
        assert!(
            stderr.contains(flag) && stderr.contains(value) && stderr.contains(limit),
            "{flag}: {stderr}"
        );
    }
}
