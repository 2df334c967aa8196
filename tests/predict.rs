//! `fastpt predict` and `fastpt eval --task` (issue 20) on runs trained on the RTE fixture: the
//! predictions for the run's own test inputs equal its predictions.jsonl, from the run folder,
//! its export (PT, DePT) and its PEFT adapter, on JSONL / Parquet / TSV / CSV / stdin inputs, for T5 and
//! Llama; `--scores`; errors; transfer evaluation on another task.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;

mod common;

use arrow_array::{ArrayRef, RecordBatch, StringArray};
use common::{assert_clean_error, fastpt};
use fastpt::testing::fixture;
use parquet::arrow::ArrowWriter;
use parquet::file::properties::WriterProperties;
use serde_json::Value;

fn path(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

/// A short run of `model` on the RTE fixture with label words, into `out` (as tests/run_tasks.rs).
fn train(model: &str, out: &Path, extra: &[&str]) {
    let (model, data, out_s) = (
        path(&fixture(model)),
        path(&fixture("data/glue/rte")),
        path(out),
    );
    let mut args = vec![
        "run", "--device", "cpu", "--model", &model, "--task", "rte", "--data", &data,
    ];
    let sets = [
        "train.steps=4".to_string(),
        "train.batch_size=3".into(),
        "train.warmup_steps=0".into(),
        "train.eval_every=4".into(),
        "train.max_len=40".into(),
        "train.max_target_len=4".into(),
        "data.labels=words".into(),
        format!("out_dir={out_s:?}"),
    ];
    for s in &sets {
        args.extend(["--set", s.as_str()]);
    }
    args.extend(extra);
    let (ok, _, stderr) = fastpt(&args);
    assert!(ok, "{stderr}");
}

fn jsonl(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// (input, prediction) of each line of the run's predictions.jsonl.
fn run_predictions(dir: &Path) -> Vec<(String, String)> {
    jsonl(&std::fs::read_to_string(dir.join("predictions.jsonl")).unwrap())
        .iter()
        .map(|v| {
            (
                v["input"].as_str().unwrap().to_string(),
                v["prediction"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// (input, prediction) of predict's output.
fn pairs(out: &str) -> Vec<(String, String)> {
    jsonl(out)
        .iter()
        .map(|v| {
            (
                v["input"].as_str().unwrap().to_string(),
                v["prediction"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// `fastpt predict ARGS` with `stdin` piped in: (success, stdout, stderr).
fn predict_stdin(args: &[&str], stdin: &str) -> (bool, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_fastpt"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The run's test inputs as a JSONL file of `input` records.
fn inputs_jsonl(run: &[(String, String)], file: &Path) {
    let text: String = run
        .iter()
        .map(|(input, _)| format!("{}\n", serde_json::json!({ "input": input })))
        .collect();
    std::fs::write(file, text).unwrap();
}

/// "rte sentence1: A sentence2: B" → (A, B): the fields of a rendered RTE input.
fn rte_fields(input: &str) -> (String, String) {
    let rest = input.strip_prefix("rte sentence1: ").unwrap();
    let (a, b) = rest.split_once(" sentence2: ").unwrap();
    (a.to_string(), b.to_string())
}

/// A string column for [`write_parquet`].
fn strings(values: &[&str]) -> ArrayRef {
    Arc::new(StringArray::from(values.to_vec()))
}

/// A Parquet file of the given columns, written as the `parquet` crate writes it, with row groups
/// of two rows.
fn write_parquet(file: &Path, columns: Vec<(&str, ArrayRef)>) {
    let batch = RecordBatch::try_from_iter(columns).unwrap();
    let props = WriterProperties::builder()
        .set_max_row_group_row_count(Some(2))
        .build();
    let f = std::fs::File::create(file).unwrap();
    let mut w = ArrowWriter::try_new(f, batch.schema(), Some(props)).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}

#[test]
fn t5_run_predicts_its_own_test_predictions_from_every_input_form() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    train(
        "t5-v1_0-tiny",
        &run,
        &["--set", "method=pt", "--set", "method.prompt_len=4"],
    );
    let own = run_predictions(&run);
    assert_eq!(own.len(), 3);
    let run_s = path(&run);

    // JSONL with `input`, to a file.
    let inputs = tmp.path().join("inputs.jsonl");
    inputs_jsonl(&own, &inputs);
    let out = tmp.path().join("out.jsonl");
    let (ok, _, stderr) = fastpt(&[
        "predict",
        &run_s,
        &path(&inputs),
        "--out",
        &path(&out),
        "--device",
        "cpu",
    ]);
    assert!(ok, "{stderr}");
    assert_eq!(pairs(&std::fs::read_to_string(&out).unwrap()), own);

    // Parquet (the Hub's format): an `input` column, and the task's fields with --task, in
    // two row groups so the reader crosses a group boundary.
    let parquet_inputs: Vec<&str> = own.iter().map(|(i, _)| i.as_str()).collect();
    let plain = tmp.path().join("inputs.parquet");
    write_parquet(&plain, vec![("input", strings(&parquet_inputs))]);
    let fields: Vec<(String, String)> = own.iter().map(|(i, _)| rte_fields(i)).collect();
    let (s1, s2): (Vec<&str>, Vec<&str>) =
        fields.iter().map(|(a, b)| (a.as_str(), b.as_str())).unzip();
    let by_fields = tmp.path().join("fields.parquet");
    write_parquet(
        &by_fields,
        vec![("sentence2", strings(&s2)), ("sentence1", strings(&s1))],
    );
    for (file, task) in [(&plain, None), (&by_fields, Some("rte"))] {
        let file_s = path(file);
        let mut args = vec!["predict", &run_s, &file_s, "--device", "cpu"];
        if let Some(t) = task {
            args.extend(["--task", t]);
        }
        let (ok, stdout, stderr) = fastpt(&args);
        assert!(ok, "{file_s}: {stderr}");
        assert_eq!(pairs(&stdout), own, "{file_s}");
    }

    // The task's fields with --task: a TSV with labels (kept as targets), a CSV without.
    let mut tsv = String::from("sentence1\tsentence2\tlabel\n");
    let mut csv = String::from("sentence2,sentence1\n");
    for (input, _) in &own {
        let (a, b) = rte_fields(input);
        tsv.push_str(&format!("{a}\t{b}\tentailment\n"));
        csv.push_str(&format!("\"{b}\",\"{a}\"\n"));
    }
    std::fs::write(tmp.path().join("in.tsv"), tsv).unwrap();
    std::fs::write(tmp.path().join("in.csv"), csv).unwrap();
    for (file, target) in [("in.tsv", Some("entailment")), ("in.csv", None)] {
        let (ok, stdout, stderr) = fastpt(&[
            "predict",
            &run_s,
            &path(&tmp.path().join(file)),
            "--task",
            "rte",
            "--device",
            "cpu",
        ]);
        assert!(ok, "{file}: {stderr}");
        assert_eq!(pairs(&stdout), own, "{file}");
        for v in jsonl(&stdout) {
            assert_eq!(v["target"].as_str(), target, "{file}: {v}");
        }
    }

    // stdin: one input per line.
    let lines: String = own.iter().map(|(i, _)| format!("{i}\n")).collect();
    let (ok, stdout, stderr) = predict_stdin(&["predict", &run_s, "-", "--device", "cpu"], &lines);
    assert!(ok, "{stderr}");
    assert_eq!(pairs(&stdout), own);

    // --scores: log-likelihoods of both labels, ≤ 0, whose argmax is the rank prediction.
    let (ok, stdout, stderr) = fastpt(&[
        "predict",
        &run_s,
        &path(&inputs),
        "--scores",
        "--mode",
        "rank",
        "--device",
        "cpu",
    ]);
    assert!(ok, "{stderr}");
    let lines = jsonl(&stdout);
    assert_eq!(lines.len(), 3);
    for v in &lines {
        let scores = v["scores"].as_object().unwrap();
        let mut keys: Vec<&String> = scores.keys().collect();
        keys.sort();
        assert_eq!(keys, ["entailment", "not_entailment"], "{v}");
        let best = scores
            .iter()
            .map(|(k, s)| (k, s.as_f64().unwrap()))
            .inspect(|(_, s)| assert!(*s <= 0.0 && s.is_finite(), "{v}"))
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .unwrap();
        assert_eq!(v["prediction"].as_str().unwrap(), best.0, "{v}");
        assert!(
            scores["entailment"] != scores["not_entailment"],
            "the labels' likelihoods differ: {v}"
        );
    }

    // The export folder and its PEFT adapter, inside the run (its settings apply: its task
    // and label words for --scores, its lengths) give the run folder's output, scores included.
    let with_scores = |source: &Path| {
        let (ok, stdout, stderr) = fastpt(&[
            "predict",
            &path(source),
            &path(&inputs),
            "--scores",
            "--device",
            "cpu",
        ]);
        assert!(ok, "{}: {stderr}", source.display());
        stdout
    };
    let from_run = with_scores(&run);
    assert_eq!(pairs(&from_run), own);
    for sub in ["export", "export/adapter"] {
        assert_eq!(with_scores(&run.join(sub)), from_run, "{sub}");
    }
    // ... and a copy of the adapter elsewhere, with the settings as flags.
    let copy = tmp.path().join("adapter");
    std::fs::create_dir(&copy).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(run.join("export/adapter").join(f), copy.join(f)).unwrap();
    }
    let (ok, stdout, stderr) = fastpt(&[
        "predict",
        &path(&copy),
        &path(&inputs),
        "--max-len",
        "40",
        "--max-new-tokens",
        "4",
        "--device",
        "cpu",
    ]);
    assert!(ok, "{stderr}");
    assert_eq!(pairs(&stdout), own);

    // Transfer: the RTE prompt evaluated on CB's test split, in generate and rank mode; the
    // run's own eval files stay untouched.
    let cb = path(&fixture("data/superglue/cb"));
    for mode in ["generate", "rank"] {
        let (ok, stdout, stderr) = fastpt(&[
            "eval", &run_s, "--task", "cb", "--data", &cb, "--split", "test", "--mode", mode,
            "--device", "cpu",
        ]);
        assert!(ok, "{mode}: {stderr}");
        assert!(stdout.contains("f1_macro"), "{stdout}");
        let ev: Value =
            serde_json::from_str(&std::fs::read_to_string(run.join("eval-cb-test.json")).unwrap())
                .unwrap();
        assert!(ev["metrics"]["accuracy"].is_number(), "{ev}");
        if mode == "rank" {
            // CB's three labels, not RTE's two.
            let preds = ev["predictions"].as_array().unwrap();
            assert!(!preds.is_empty());
            for p in preds {
                assert!(
                    ["entailment", "contradiction", "neutral"].contains(&p.as_str().unwrap()),
                    "{p}"
                );
            }
        }
    }
    assert!(!run.join("eval-test.json").exists());
}

#[test]
fn dept_export_and_llama_run_predict_their_own_predictions() {
    let tmp = tempfile::tempdir().unwrap();
    // DePT: prompt rows + the update of the text embeddings, rebuilt from export/.
    let dept = tmp.path().join("dept");
    train(
        "t5-v1_0-tiny",
        &dept,
        &[
            "--set",
            "method=dept",
            "--set",
            "method.prompt_len=3",
            "--set",
            "method.rank=2",
            // A large step for A and B, so that the update weighs in the scores.
            "--set",
            "train.lr_lowrank=0.3",
        ],
    );
    let llama = tmp.path().join("llama");
    train(
        "llama-gqa-tiny",
        &llama,
        &["--set", "method=pt", "--set", "method.prompt_len=4"],
    );
    for (source, run) in [(dept.join("export"), &dept), (llama.clone(), &llama)] {
        let own = run_predictions(run);
        let inputs = tmp.path().join("inputs.jsonl");
        inputs_jsonl(&own, &inputs);
        let (ok, stdout, stderr) =
            fastpt(&["predict", &path(&source), &path(&inputs), "--device", "cpu"]);
        assert!(ok, "{}: {stderr}", source.display());
        assert_eq!(pairs(&stdout), own, "{}", source.display());
    }
    assert!(!dept.join("export/adapter").exists(), "DePT has no adapter");
    // The export's rows + update give the run's own log-likelihoods, to the last bit.
    let inputs = tmp.path().join("inputs.jsonl");
    inputs_jsonl(&run_predictions(&dept), &inputs);
    let scores = |source: &Path| {
        let (ok, stdout, stderr) = fastpt(&[
            "predict",
            &path(source),
            &path(&inputs),
            "--scores",
            "--device",
            "cpu",
        ]);
        assert!(ok, "{stderr}");
        stdout
    };
    assert_eq!(scores(&dept.join("export")), scores(&dept));
}

#[test]
fn predict_errors_name_the_file_row_and_field() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    train(
        "t5-v1_0-tiny",
        &run,
        &["--set", "method=pt", "--set", "method.prompt_len=2"],
    );
    let run_s = path(&run);

    // A record without `input` (no --task): file, line and field.
    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"input\": \"a\"}\n{\"text\": \"b\"}\n").unwrap();
    let (ok, _, stderr) = fastpt(&["predict", &run_s, &path(&bad), "--device", "cpu"]);
    assert_clean_error(ok, &stderr);
    assert!(
        stderr.contains("bad.jsonl") && stderr.contains("line 2") && stderr.contains("input"),
        "{stderr}"
    );
    // --task rte without sentence2.
    let (ok, _, stderr) = fastpt(&[
        "predict",
        &run_s,
        &path(&bad),
        "--task",
        "rte",
        "--device",
        "cpu",
    ]);
    assert_clean_error(ok, &stderr);
    assert!(
        stderr.contains("bad.jsonl") && stderr.contains("line 1") && stderr.contains("sentence1"),
        "{stderr}"
    );
    // A folder that holds no prompt.
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let (ok, _, stderr) = fastpt(&["predict", &path(&empty), &path(&bad), "--device", "cpu"]);
    assert_clean_error(ok, &stderr);
    assert!(stderr.contains("neither a run folder"), "{stderr}");
    // The T5 adapter (36 wide) on the Llama fixture (48 wide).
    let (ok, _, stderr) = fastpt(&[
        "predict",
        &path(&run.join("export/adapter")),
        &path(&bad),
        "--model",
        &path(&fixture("llama-gqa-tiny")),
        "--device",
        "cpu",
    ]);
    assert_clean_error(ok, &stderr);
    assert!(
        stderr.contains("adapter_config.json") && stderr.contains("token_dim"),
        "{stderr}"
    );
    // An adapter whose base model is not a local folder needs --model.
    let copy = tmp.path().join("adapter");
    std::fs::create_dir(&copy).unwrap();
    std::fs::copy(
        run.join("export/adapter/adapter_model.safetensors"),
        copy.join("adapter_model.safetensors"),
    )
    .unwrap();
    let config = std::fs::read_to_string(run.join("export/adapter/adapter_config.json")).unwrap();
    let mut v: Value = serde_json::from_str(&config).unwrap();
    v["base_model_name_or_path"] = "google/t5-small".into();
    std::fs::write(copy.join("adapter_config.json"), v.to_string()).unwrap();
    let (ok, _, stderr) = fastpt(&["predict", &path(&copy), &path(&bad), "--device", "cpu"]);
    assert_clean_error(ok, &stderr);
    assert!(
        stderr.contains("base_model_name_or_path") && stderr.contains("--model"),
        "{stderr}"
    );
    // --scores on an adapter outside a run without --task: no labels to rank.
    let good = tmp.path().join("good.jsonl");
    std::fs::write(&good, "{\"input\": \"a\"}\n").unwrap();
    let (ok, _, stderr) = fastpt(&[
        "predict",
        &path(&copy),
        &path(&good),
        "--model",
        &path(&fixture("t5-v1_0-tiny")),
        "--scores",
        "--device",
        "cpu",
    ]);
    assert_clean_error(ok, &stderr);
    assert!(stderr.contains("--task"), "{stderr}");
    // A size past its limit.
    let (ok, _, stderr) = fastpt(&[
        "predict",
        &run_s,
        &path(&bad),
        "--batch-size",
        "0",
        "--device",
        "cpu",
    ]);
    assert_clean_error(ok, &stderr);
    assert!(stderr.contains("--batch-size 0"), "{stderr}");
}

/// A custom task (its TOML): `--task FILE.toml` applies its template to the fields, and the
/// run's own custom task gives `--scores` its labels (from `label_map`).
#[test]
fn custom_task_inputs_predict_the_runs_own_predictions() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let (toml, data) = (
        path(&fixture("data/custom/sentiment.toml")),
        path(&fixture("data/custom")),
    );
    let out_s = format!("out_dir={:?}", path(&run));
    let (ok, _, stderr) = fastpt(&[
        "run",
        "--device",
        "cpu",
        "--model",
        &path(&fixture("t5-v1_0-tiny")),
        "--task",
        &toml,
        "--data",
        &data,
        "--set",
        "train.steps=2",
        "--set",
        "train.batch_size=2",
        "--set",
        "train.warmup_steps=0",
        "--set",
        "train.eval_every=2",
        "--set",
        "train.max_len=24",
        "--set",
        "train.max_target_len=3",
        "--set",
        "data.labels=words",
        "--set",
        "method=pt",
        "--set",
        "method.prompt_len=2",
        "--set",
        &out_s,
    ]);
    assert!(ok, "{stderr}");
    let own = run_predictions(&run);
    assert!(!own.is_empty());
    // "review: {text} rating: {stars}" → the fields, as JSON Lines without the label.
    let records: String = own
        .iter()
        .map(|(input, _)| {
            let rest = input.strip_prefix("review: ").unwrap();
            let (text, stars) = rest.rsplit_once(" rating: ").unwrap();
            format!("{}\n", serde_json::json!({ "text": text, "stars": stars }))
        })
        .collect();
    let inputs = tmp.path().join("reviews.jsonl");
    std::fs::write(&inputs, records).unwrap();
    let run_s = path(&run);
    let (ok, stdout, stderr) = fastpt(&[
        "predict",
        &run_s,
        &path(&inputs),
        "--task",
        &toml,
        "--device",
        "cpu",
    ]);
    assert!(ok, "{stderr}");
    assert_eq!(pairs(&stdout), own);
    // The run's own task gives the labels of --scores (raw `input` records).
    let raw = tmp.path().join("raw.jsonl");
    inputs_jsonl(&own, &raw);
    let (ok, stdout, stderr) = fastpt(&[
        "predict",
        &run_s,
        &path(&raw),
        "--scores",
        "--device",
        "cpu",
    ]);
    assert!(ok, "{stderr}");
    for v in jsonl(&stdout) {
        let mut keys: Vec<&String> = v["scores"].as_object().unwrap().keys().collect();
        keys.sort();
        assert_eq!(keys, ["negative", "positive"], "{v}");
    }
    // A task whose classes come from its train file, away from the run's data: what to do.
    let no_map = tmp.path().join("no_map.toml");
    let text = std::fs::read_to_string(fixture("data/custom/sentiment.toml")).unwrap();
    let cut = text.find("[label_map]").unwrap();
    std::fs::write(&no_map, &text[..cut]).unwrap();
    let (ok, _, stderr) = fastpt(&[
        "predict",
        &run_s,
        &path(&inputs),
        "--task",
        &path(&no_map),
        "--device",
        "cpu",
    ]);
    assert_clean_error(ok, &stderr);
    assert!(
        stderr.contains("no_map.toml") && stderr.contains("label_map"),
        "{stderr}"
    );
}
