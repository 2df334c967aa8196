//! Data that lies (issue 19, rules 1, 2 and 7 for data files): a CSV quote that swallows the rows
//! after it, labels outside the task's domain, class targets the tokenizer cannot tell apart,
//! binary or non-UTF-8 files, lines past the hard limit, fields far longer than `max_len` keeps,
//! a data cursor past the end, a batch size above the training set. Each is an error naming the
//! file, line and value (or, for the batch size, a printed reduction), never a panic, a silent
//! merge or an allocation sized by the lie.

mod common;

use std::fs::File;
use std::path::{Path, PathBuf};

use common::{assert_clean_error, fastpt};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use fastpt::backend::cpu::CpuBackend;
use fastpt::data::batching::{Batcher, Position};
use fastpt::data::metric::Metric;
use fastpt::data::readers::{read_csv, read_records, MAX_LINE_BYTES};
use fastpt::data::tasks::{
    load_custom_task, load_task, LabelStyle, TaskOptions, TaskSpec, TextExample,
};
use fastpt::data::tokenize::TextCodec;
use fastpt::data::Example;
use fastpt::eval::{predict_generate, predict_rank, EvalMode, EvalOptions};
use fastpt::model::hf::load_tokenizer;
use fastpt::model::linear::Quant;
use fastpt::model::{load_model, Backbone};
use fastpt::testing::fixture;

type B = CpuBackend<f32>;

fn write(dir: &Path, name: &str, text: impl AsRef<[u8]>) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn err<T: std::fmt::Debug>(r: fastpt::Result<T>) -> String {
    r.expect_err("expected an error").to_string()
}

fn opts() -> TaskOptions {
    TaskOptions {
        seed: 42,
        k_shot: None,
        labels: LabelStyle::Indices,
        dev_holdout: 1000,
    }
}

fn path(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

#[test]
fn csv_quote_left_open_swallowing_rows_is_an_error_naming_its_line() {
    let d = tempfile::tempdir().unwrap();
    // The quote opened on line 3 is never closed: rows 3-5 would become one example.
    let p = write(
        d.path(),
        "train.csv",
        "text,label\nfine,1\nx,\"0\ny,1\nz,0\n",
    );
    let e = err(read_csv(&p));
    assert!(
        e.contains("train.csv") && e.contains("line 3") && e.contains("never closed"),
        "{e}"
    );
    // A stray quote closed by another one later: rows 2-4 would merge into `great film,1 …`.
    let p = write(
        d.path(),
        "b.csv",
        "text,label\n\"great film,1\nbad,0\nshe said \"hi\",1\n",
    );
    let e = err(read_csv(&p));
    assert!(
        e.contains("b.csv") && e.contains("line 4") && e.contains("opened on line 2"),
        "{e}"
    );
    // Valid quoting still reads: doubled quotes, commas and line breaks inside quotes, CRLF.
    let p = write(
        d.path(),
        "ok.csv",
        "text,label\r\n\"say \"\"hi\"\", ok\",1\r\n\r\n\"two\r\nlines\",0\r\nplain \"q\" text,1",
    );
    let r = read_csv(&p).unwrap();
    let rows: Vec<(usize, &str)> = r
        .rows
        .iter()
        .map(|(l, rec)| (*l, rec["text"].as_str().unwrap()))
        .collect();
    assert_eq!(
        rows,
        vec![
            (2, "say \"hi\", ok"),
            (4, "two\r\nlines"),
            (6, "plain \"q\" text")
        ]
    );
}

/// One HF-style JSON line per task: its fields, then a label outside the task's labels.
fn bad_label_line(task: &str) -> String {
    let fields = match task {
        "cola" | "sst2" => r#""sentence": "s""#,
        "mrpc" | "rte" | "stsb" => r#""sentence1": "a", "sentence2": "b""#,
        "qqp" => r#""question1": "a", "question2": "b""#,
        "mnli" | "mnli_mismatched" | "cb" | "superglue-rte" => {
            r#""premise": "p", "hypothesis": "h""#
        }
        "qnli" => r#""question": "q", "sentence": "s""#,
        "boolq" => r#""question": "q", "passage": "p""#,
        "copa" => r#""premise": "p", "choice1": "a", "choice2": "b""#,
        "wic" => r#""sentence1": "a b", "sentence2": "b c", "word": "b""#,
        "multirc" => {
            r#""paragraph": "p", "question": "q", "answer": "a", "idx": {"paragraph": 0, "question": 0}"#
        }
        "wsc" => {
            r#""text": "Mark said he", "span1_index": 0, "span1_text": "Mark", "span2_index": 2, "span2_text": "he""#
        }
        _ => unreachable!("{task}"),
    };
    format!("{{{fields}, \"label\": 7}}")
}

#[test]
fn labels_outside_every_tasks_domain_name_file_line_and_value() {
    let d = tempfile::tempdir().unwrap();
    for task in fastpt::data::tasks::TASK_NAMES {
        if *task == "record" {
            continue; // no labels: answers are entity texts
        }
        let dir = d.path().join(task);
        std::fs::create_dir(&dir).unwrap();
        let line = bad_label_line(task);
        // Line 1 is valid (label 0), line 2 has label 7 (STS-B: a score above 5).
        let good = line.replace("\"label\": 7", "\"label\": 0");
        write(&dir, "train.jsonl", format!("{good}\n{line}\n"));
        let e = err(load_task(task, &dir, &opts()));
        assert!(
            e.contains("train.jsonl") && e.contains("line 2") && e.contains('7'),
            "{task}: {e}"
        );
    }
    // STS-B below 0, in a GLUE TSV.
    let dir = d.path().join("stsb_tsv");
    std::fs::create_dir(&dir).unwrap();
    write(
        &dir,
        "train.tsv",
        "sentence1\tsentence2\tscore\na\tb\t2.5\nc\td\t-0.4\n",
    );
    let e = err(load_task("stsb", &dir, &opts()));
    assert!(
        e.contains("train.tsv") && e.contains("line 3") && e.contains("-0.4") && e.contains("0–5"),
        "{e}"
    );
    // A custom task: a dev label that is not in the label map.
    let dir = d.path().join("custom");
    std::fs::create_dir(&dir).unwrap();
    write(&dir, "train.csv", "text,label\na,0\nb,1\n");
    write(&dir, "dev.csv", "text,label\nc,1\nd,2\n");
    let toml = write(
        &dir,
        "task.toml",
        "name = \"x\"\ninput = \"{text}\"\nlabel_field = \"label\"\ntrain = \"train.csv\"\n\
         dev = \"dev.csv\"\n[label_map]\n\"0\" = \"neg\"\n\"1\" = \"pos\"\n",
    );
    let e = err(load_custom_task(&toml, &dir, &opts()));
    assert!(
        e.contains("dev.csv") && e.contains("line 3") && e.contains("\"2\""),
        "{e}"
    );
}

#[test]
fn a_free_text_label_field_with_thousands_of_values_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let mut csv = String::from("text,label\n");
    for i in 0..1500 {
        csv.push_str(&format!("t{i},label {i}\n"));
    }
    write(d.path(), "train.csv", csv);
    let toml = write(
        d.path(),
        "task.toml",
        "name = \"x\"\ninput = \"{text}\"\nlabel_field = \"label\"\ntrain = \"train.csv\"\n",
    );
    let e = err(load_custom_task(&toml, d.path(), &opts()));
    assert!(
        e.contains("train.csv") && e.contains("line 1002") && e.contains("more than 1000"),
        "{e}"
    );
}

#[test]
fn labels_that_tokenize_alike_are_refused_suggesting_words() {
    // The tiny T5 tokenizer has no digits: "0" and "1" both read as `▁ <unk>`.
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let model = path(&fixture("t5-v1_0-tiny"));
    let data = path(&fixture("data/glue/rte"));
    let out_dir = format!("out_dir={:?}", path(&out));
    let mut args = vec![
        "run",
        "--device",
        "cpu",
        "--model",
        &model,
        "--task",
        "rte",
        "--data",
        &data,
        "--set",
        &out_dir,
        "--set",
        "train.steps=1",
        "--set",
        "train.warmup_steps=0",
        "--set",
        "method=pt",
        "--set",
        "method.prompt_len=2",
    ];
    let (ok, _, stderr) = fastpt(&args);
    assert_clean_error(ok, &stderr);
    assert!(
        stderr.contains("\"0\" and \"1\"") && stderr.contains("data.labels = \"words\""),
        "{stderr}"
    );
    assert!(!out.exists(), "a refused run leaves no folder");
    // With label words the same run starts.
    args.extend(["--set", "data.labels=words"]);
    let (ok, _, stderr) = fastpt(&args);
    assert!(ok, "{stderr}");
}

#[test]
fn nul_bytes_and_invalid_utf8_name_line_and_byte_offset() {
    let d = tempfile::tempdir().unwrap();
    let p = write(d.path(), "train.jsonl", [0u8; 64]);
    let e = err(read_records(&p));
    assert!(
        e.contains("train.jsonl") && e.contains("line 1 (byte offset 0)") && e.contains("NUL"),
        "{e}"
    );
    let p = write(d.path(), "a.tsv", b"a\tb\nx\ty\nok\tbad \xff\n".as_slice());
    let e = err(read_records(&p));
    assert!(
        e.contains("a.tsv") && e.contains("line 3 (byte offset 15)") && e.contains("UTF-8"),
        "{e}"
    );
    let p = write(d.path(), "u16.jsonl", b"\xff\xfe{\x00}\x00".as_slice());
    let e = err(read_records(&p));
    assert!(
        e.contains("line 1 (byte offset 0)") && e.contains("UTF-16"),
        "{e}"
    );
    let p = write(d.path(), "a.csv", b"a,b\n1,\x00\n".as_slice());
    let e = err(read_records(&p));
    assert!(
        e.contains("line 2 (byte offset 6)") && e.contains("NUL"),
        "{e}"
    );
}

#[test]
fn a_line_over_the_hard_limit_is_an_error_naming_file_and_line() {
    let d = tempfile::tempdir().unwrap();
    for (name, head) in [
        ("a.jsonl", "{\"a\": 1}\n"),
        ("a.tsv", "a\tb\n"),
        ("a.csv", "a,b\n"),
    ] {
        let p = write(d.path(), name, head);
        // Line 2: a hole of MAX_LINE_BYTES + 10 zero bytes without a newline (a sparse file:
        // nothing is written to disk).
        let f = File::options().write(true).open(&p).unwrap();
        f.set_len((head.len() + MAX_LINE_BYTES + 10) as u64)
            .unwrap();
        drop(f);
        let e = err(read_records(&p));
        assert!(
            e.contains(name) && e.contains("line 2") && e.contains("(64 MiB)"),
            "{name}: {e}"
        );
    }
}

fn codec(name: &str) -> (Backbone<B>, TextCodec) {
    let (_, model, codec) = codec_on(name);
    (model, codec)
}

fn codec_on(name: &str) -> (B, Backbone<B>, TextCodec) {
    let be = B::new();
    let dir = fixture(name);
    let model = load_model(&be, &dir, Quant::None).unwrap();
    let codec = TextCodec::new(load_tokenizer(&dir).unwrap(), &model);
    (be, model, codec)
}

/// The batch of one example as the trainer builds it: input cut to `max_len` (EOS kept).
fn batch_of(model: &Backbone<B>, ex: Example, max_len: usize) -> fastpt::data::HostBatch {
    let rows = [ex];
    let b = Batcher::new(&rows, 1, max_len, 8, false, 0, model.batch_ids())
        .unwrap()
        .causal(model.is_decoder_only());
    let (batch, next, truncated) = b.next_batch(Position::default()).unwrap();
    assert_eq!((next.epoch, truncated), (1, 1));
    batch
}

#[test]
fn a_long_field_is_tokenized_only_as_far_as_max_len_keeps() {
    let words = ["the", "cat", "sat", "on", "a", "mat", "train", "wind"];
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let mut long = String::new();
    while long.len() < 3 << 20 {
        long.push_str(words[rng.random_range(0..words.len())]);
        long.push(' ');
    }
    for name in ["t5-v1_0-tiny", "llama-gqa-tiny"] {
        let (be, model, codec) = codec_on(name);
        let max_len = 16;
        let before = codec.tokenized_bytes();
        let full = codec.encode_input_max(&long, max_len).unwrap();
        let read = codec.tokenized_bytes() - before;
        assert!(
            read <= 64 * 1024,
            "{name}: {read} bytes tokenized to keep {max_len} tokens"
        );
        // The same batch as the field cut to a modest length (tokenized whole).
        let cut = &long[..long[..4000].rfind(' ').unwrap()];
        let short = codec.encode_input(cut).unwrap();
        let target = codec.encode_target("x").unwrap();
        let a = batch_of(
            &model,
            Example {
                input: full,
                target: target.clone(),
            },
            max_len,
        );
        let b = batch_of(
            &model,
            Example {
                input: short,
                target,
            },
            max_len,
        );
        assert_eq!(a, b, "{name}");

        // Evaluation (generation and rank classification) reads the field as far, too, and
        // predicts what it predicts for the cut field.
        let ex = |input: &str| TextExample {
            input: input.to_string(),
            target: "x".into(),
            answers: Vec::new(),
            options: vec!["x".into(), "y".into()],
            group: None,
        };
        let spec = TaskSpec {
            name: "t".into(),
            metrics: vec![Metric::Accuracy],
            classes: Vec::new(),
        };
        for mode in [EvalMode::Generate, EvalMode::Rank] {
            let opts = EvalOptions {
                mode,
                batch_size: 2,
                max_len,
                max_new_tokens: 3,
                progress: false,
            };
            let predict = |text: &str| match mode {
                EvalMode::Generate => {
                    predict_generate(&be, &model, None, &codec, &[ex(text)], &opts).unwrap()
                }
                EvalMode::Rank => {
                    predict_rank(&be, &model, None, &codec, &spec, &[ex(text)], &opts).unwrap()
                }
            };
            let before = codec.tokenized_bytes();
            let long_pred = predict(&long);
            let read = codec.tokenized_bytes() - before;
            assert!(read <= 64 * 1024, "{name} {mode:?}: {read} bytes tokenized");
            assert_eq!(long_pred, predict(cut), "{name} {mode:?}");
        }
    }
}

/// Random text of words the tokenizers know, unknown and multibyte characters, digits, runs
/// without spaces and runs of spaces.
fn random_text(rng: &mut ChaCha8Rng, bytes: usize) -> String {
    const PIECES: [&str; 16] = [
        "the",
        "cat",
        "sat",
        "on",
        "a",
        "mat.",
        "Rain",
        "fell",
        "Oslo",
        "été",
        "日本語",
        "42",
        "xqzv",
        "  ",
        "\t",
        "@#!",
    ];
    let mut s = String::new();
    while s.len() < bytes {
        let p = PIECES[rng.random_range(0..PIECES.len())];
        s.push_str(p);
        if rng.random_bool(0.8) {
            s.push(' ');
        }
        if rng.random_bool(0.02) {
            // A long run without whitespace.
            for _ in 0..rng.random_range(50..400) {
                s.push(char::from(b'a' + rng.random_range(0..26u8)));
            }
        }
    }
    s
}

#[test]
fn the_truncation_margin_never_changes_which_tokens_are_kept() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    for name in ["t5-v1_0-tiny", "llama-gqa-tiny"] {
        let (model, codec) = codec(name);
        for case in 0..60 {
            let bytes = rng.random_range(1..4000);
            let text = random_text(&mut rng, bytes);
            let max_len = rng.random_range(1..24);
            let bounded = codec.encode_input_max(&text, max_len).unwrap();
            let whole = codec.encode_input(&text).unwrap();
            let n = bounded.len();
            if n <= max_len {
                assert_eq!(bounded, whole, "{name} case {case}");
            } else if n < whole.len() {
                // A cut text: its ids are the first of the whole text's (T5: then EOS), one
                // more than the batch keeps, so the row still counts as truncated.
                // (T5: text ids then EOS; Llama: BOS then text ids.)
                let same = if model.is_decoder_only() { n } else { n - 1 };
                assert_eq!(bounded[..same], whole[..same], "{name} case {case}");
                assert_eq!(n - 1, max_len + 1, "{name} case {case}: text ids kept");
            }
            let target = codec.encode_target("y").unwrap();
            let rows = [
                Example {
                    input: bounded,
                    target: target.clone(),
                },
                Example {
                    input: whole,
                    target,
                },
            ];
            let b = Batcher::new(&rows, 2, max_len, 8, false, 0, model.batch_ids())
                .unwrap()
                .causal(model.is_decoder_only());
            let (a, na) = b.pad(&[&rows[0]]);
            let (w, nw) = b.pad(&[&rows[1]]);
            assert_eq!((a, na), (w, nw), "{name} case {case}: max_len {max_len}");
        }
    }
}

#[test]
fn a_cursor_past_the_end_of_the_data_is_an_error_not_a_panic() {
    let rows: Vec<Example> = (0..5)
        .map(|i| Example {
            input: vec![5 + i, 1],
            target: vec![1],
        })
        .collect();
    let b = Batcher::new(&rows, 2, 16, 16, false, 0, (0, 1, 0)).unwrap();
    for cursor in [5, 6, 1 << 40, u64::MAX] {
        let e = err(b.next_batch(Position { epoch: 3, cursor }));
        assert!(
            e.contains(&format!("cursor {cursor}")) && e.contains("5 training examples"),
            "{e}"
        );
    }
    let (_, next, _) = b
        .next_batch(Position {
            epoch: 3,
            cursor: 4,
        })
        .unwrap();
    assert_eq!(
        next,
        Position {
            epoch: 4,
            cursor: 0
        }
    );
}

#[test]
fn a_batch_size_above_the_training_set_is_reduced_with_a_note() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |out: &str, batch: &str| {
        let out_dir = format!("out_dir={:?}", path(&tmp.path().join(out)));
        let batch = format!("train.batch_size={batch}");
        let (ok, stdout, stderr) = fastpt(&[
            "run",
            "--device",
            "cpu",
            "--model",
            "t5-tiny",
            "--set",
            &out_dir,
            "--set",
            &batch,
            "--set",
            "data.train_examples=6",
            "--set",
            "data.dev_examples=4",
            "--set",
            "train.steps=2",
            "--set",
            "train.warmup_steps=0",
            "--set",
            "train.eval_every=0",
        ]);
        assert!(ok, "{stderr}");
        let report: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(tmp.path().join(out).join("report.json")).unwrap(),
        )
        .unwrap();
        (stdout, report)
    };
    // Under the 65536 cap on train.batch_size, and the memory check counts the 6 rows a batch
    // can hold, not 60000.
    let (stdout, huge) = run("huge", "60000");
    assert!(
        stdout.contains("train.batch_size = 60000 is larger than the 6 training examples"),
        "{stdout}"
    );
    let (stdout, six) = run("six", "6");
    assert!(!stdout.contains("note: train.batch_size"), "{stdout}");
    // The reduction is exact: the same batches, the same losses.
    let losses = |r: &serde_json::Value| -> Vec<f64> {
        r["steps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["loss"].as_f64().unwrap())
            .collect()
    };
    assert_eq!(losses(&huge).len(), 2);
    assert_eq!(losses(&huge), losses(&six));
}
