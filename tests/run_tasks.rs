//! `fastpt run` on text tasks end to end (a fixture model folder with its tokenizer, the
//! committed GLUE fixtures): final dev/test metrics equal to the metrics of the written
//! predictions, the export, `fastpt eval`, `fastpt export`, `--init-from`, and the config errors.

use std::path::Path;
mod common;

use common::fastpt;

use fastpt::eval::metrics::accuracy;
use fastpt::testing::fixture;

fn path(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

/// A short run of `method_sets` on `model` × `task`, into `out`.
fn run(model: &str, task: &str, data: &str, out: &Path, extra: &[&str]) -> (bool, String, String) {
    let (model, data, out) = (path(&fixture(model)), path(&fixture(data)), path(out));
    let mut args = vec![
        "run", "--device", "cpu", "--model", &model, "--task", task, "--data", &data,
    ];
    let sets = [
        "train.steps=6".to_string(),
        "train.batch_size=3".into(),
        "train.warmup_steps=0".into(),
        "train.eval_every=3".into(),
        "train.max_len=40".into(),
        "train.max_target_len=4".into(),
        format!("out_dir={out:?}"),
    ];
    for s in &sets {
        args.extend(["--set", s.as_str()]);
    }
    args.extend(extra);
    fastpt(&args)
}

fn report(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap()).unwrap()
}

/// (prediction, target) of each line of predictions.jsonl.
fn predictions(dir: &Path) -> Vec<(String, String)> {
    std::fs::read_to_string(dir.join("predictions.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["prediction"].as_str().unwrap().to_string(),
                v["target"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// A copy of the tiny T5 fixture in `tmp` whose tokenizer knows "0" and "1" (the fixture's has
/// no digits, so index labels would all read as `<unk>`, which a run refuses): its two last
/// pieces become the digits. Returns the folder's absolute path, which `fixture` passes on.
fn t5_with_digits(tmp: &Path) -> String {
    let src = fixture("t5-v1_0-tiny");
    let dst = tmp.join("t5-digits");
    std::fs::create_dir(&dst).unwrap();
    for f in ["config.json", "generation_config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), dst.join(f)).unwrap();
    }
    let mut tok: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("tokenizer.json")).unwrap())
            .unwrap();
    let vocab = tok["model"]["vocab"].as_array_mut().unwrap();
    let n = vocab.len();
    vocab[n - 2][0] = "0".into();
    vocab[n - 1][0] = "1".into();
    std::fs::write(dst.join("tokenizer.json"), tok.to_string()).unwrap();
    path(&dst)
}

#[test]
fn t5_on_rte_reports_dev_and_test_metrics_exports_and_evaluates_again() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("rte");
    let pt = ["--set", "method=pt", "--set", "method.prompt_len=4"];
    let t5 = t5_with_digits(tmp.path());
    let (ok, stdout, stderr) = run(&t5, "rte", "data/glue/rte", &dir, &pt);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("test: accuracy"), "{stdout}");
    let r = report(&dir);
    let eval = &r["eval"];
    // RTE is a small task: its 6 validation rows become 3 dev + 3 test.
    let preds = predictions(&dir);
    assert_eq!(preds.len(), 3);
    let (p, g): (Vec<String>, Vec<String>) = preds.into_iter().unzip();
    assert_eq!(
        eval["test_accuracy"].as_f64().unwrap(),
        accuracy(&p, &g).unwrap()
    );
    for key in [
        "dev_accuracy",
        "dev_score",
        "test_score",
        "best_dev_score",
        "best_step",
    ] {
        assert!(eval[key].is_number(), "no {key} in {eval}");
    }
    // Indices are the default label style.
    assert!(g.iter().all(|t| t == "0" || t == "1"), "{g:?}");
    for f in [
        "export/prompt.safetensors",
        "export/export.json",
        "export/adapter/adapter_config.json",
        "export/adapter/adapter_model.safetensors",
        "best.safetensors",
    ] {
        assert!(dir.join(f).exists(), "no {f}");
    }

    // `fastpt eval` of the same parameters on test agrees with the report.
    let (ok, stdout, stderr) = fastpt(&["eval", &path(&dir), "--split", "test", "--device", "cpu"]);
    assert!(ok, "{stderr}");
    let again: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("eval-test.json")).unwrap())
            .unwrap();
    assert_eq!(
        again["metrics"]["accuracy"], eval["test_accuracy"],
        "{stdout}"
    );

    // `fastpt export` writes the same prompt the run exported.
    let out = tmp.path().join("exp");
    let (ok, _, stderr) = fastpt(&[
        "export",
        &path(&dir),
        "--out",
        &path(&out),
        "--device",
        "cpu",
    ]);
    assert!(ok, "{stderr}");
    assert_eq!(
        std::fs::read(out.join("adapter/adapter_model.safetensors")).unwrap(),
        std::fs::read(dir.join("export/adapter/adapter_model.safetensors")).unwrap()
    );

    // A PT warm start from the adapter is accepted (same P and C; the rows themselves are
    // checked in tests/export.rs); another method refuses it before writing anything.
    let adapter = path(&dir.join("export/adapter"));
    let warm = tmp.path().join("warm");
    let (ok, _, stderr) = run(
        &t5,
        "rte",
        "data/glue/rte",
        &warm,
        &[
            "--set",
            "method=pt",
            "--set",
            "method.prompt_len=4",
            "--init-from",
            &adapter,
        ],
    );
    assert!(ok, "{stderr}");
    let (ok, _, stderr) = run(
        &t5,
        "rte",
        "data/glue/rte",
        &tmp.path().join("bad"),
        &[
            "--set",
            "method=dpt",
            "--set",
            "method.prompt_len=4",
            "--set",
            "method.rank=2",
            "--init-from",
            &adapter,
        ],
    );
    assert!(
        !ok && stderr.contains("warm-starts the `pt` method"),
        "{stderr}"
    );
    assert!(
        !tmp.path().join("bad").exists(),
        "a refused run leaves no folder"
    );
}

#[test]
fn llama_with_words_and_rank_classification() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("llama");
    let extra = [
        "--set",
        "method=lamp",
        "--set",
        "method.prompt_len=4",
        "--set",
        "method.rank=2",
        "--set",
        "method.pool=2",
        "--set",
        "data.labels=words",
        "--set",
        "data.eval=rank",
    ];
    let (ok, stdout, stderr) = run("llama-gqa-tiny", "rte", "data/glue/rte", &dir, &extra);
    assert!(ok, "{stderr}");
    let preds = predictions(&dir);
    // Rank classification can only answer a label word.
    for (p, t) in &preds {
        assert!(
            ["entailment", "not_entailment"].contains(&p.as_str()),
            "{p}"
        );
        assert!(
            ["entailment", "not_entailment"].contains(&t.as_str()),
            "{t}"
        );
    }
    let (p, g): (Vec<String>, Vec<String>) = preds.into_iter().unzip();
    assert_eq!(
        report(&dir)["eval"]["test_accuracy"].as_f64().unwrap(),
        accuracy(&p, &g).unwrap(),
        "{stdout}"
    );
    let config = std::fs::read_to_string(dir.join("export/adapter/adapter_config.json")).unwrap();
    assert!(config.contains("CAUSAL_LM"), "{config}");

    // Rows longer than the model's positions are refused before training, naming the setting.
    // (Label words: the tiny tokenizer has no digits, so index labels would be refused first.)
    let long = tmp.path().join("long");
    let (ok, _, stderr) = run(
        "llama-gqa-tiny",
        "rte",
        "data/glue/rte",
        &long,
        &[
            "--set",
            "method=pt",
            "--set",
            "method.prompt_len=30",
            "--set",
            "data.labels=words",
        ],
    );
    assert!(
        !ok && stderr.contains("max_position_embeddings = 64: lower train.max_len"),
        "{stderr}"
    );
    assert!(!long.exists(), "a refused run leaves no folder");
}

#[test]
fn text_task_config_errors_name_the_field() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x");
    let model = path(&fixture("t5-v1_0-tiny"));
    let data = path(&fixture("data/glue/rte"));
    let cases: [(Vec<&str>, &str); 4] = [
        (
            vec!["--model", &model, "--task", "rtee", "--data", &data],
            "data.task",
        ),
        (vec!["--model", &model, "--task", "rte"], "data.dir"),
        (
            vec!["--model", "t5-tiny", "--task", "rte", "--data", &data],
            "built-in shape without a tokenizer",
        ),
        (
            vec!["--model", &model, "--task", "rte", "--data", &model],
            "train.tsv",
        ),
    ];
    for (args, needle) in cases {
        let out_dir = format!("out_dir={:?}", path(&out));
        let mut all = vec!["run", "--device", "cpu", "--set", &out_dir];
        all.extend(args);
        let (ok, _, stderr) = fastpt(&all);
        assert!(!ok && stderr.contains(needle), "{all:?}: {stderr}");
        assert!(!out.exists(), "{all:?} left a run folder");
    }
}
