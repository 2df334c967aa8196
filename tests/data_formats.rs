//! Parquet and Arrow IPC data (issue 20, item 3): the layouts Python's `datasets` writes
//! (tools/make_data_fixtures.py: a Parquet folder, the Hub's sharded `data/` layout, a
//! `save_to_disk` DatasetDict) read as the same records as the JSONL export; files written here
//! with the arrow-rs crates (odd types, nulls, nested values, dictionary strings, several row
//! groups / batches); the errors (corrupt file, wrong type, missing column, missing shard, too
//! many rows) naming file, row and column; and `fastpt run` training from those folders.

use std::path::{Path, PathBuf};
use std::sync::Arc;

mod common;

use arrow_array::builder::{ListBuilder, StringBuilder};
use arrow_array::types::Int8Type;
use arrow_array::{
    ArrayRef, BinaryArray, BooleanArray, DictionaryArray, FixedSizeListArray, Float16Array,
    Float32Array, Int32Array, Int8Array, LargeStringArray, NullArray, RecordBatch, StringArray,
    StringViewArray, StructArray, UInt64Array,
};
use arrow_schema::{DataType, Field};
use common::fastpt;
use fastpt::data::columnar::find_split;
use fastpt::data::readers::{read_records, Records, Unit};
use fastpt::data::tasks::{load_task, LabelStyle, TaskData, TaskOptions};
use parquet::arrow::ArrowWriter;
use parquet::file::properties::WriterProperties;
use serde_json::{json, Value};

fn glue(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/data/glue")
        .join(rel)
}

fn records(r: &Records) -> Vec<Value> {
    r.rows
        .iter()
        .map(|(_, m)| Value::Object(m.clone()))
        .collect()
}

fn opts() -> TaskOptions {
    TaskOptions {
        seed: 42,
        k_shot: None,
        labels: LabelStyle::Words,
        dev_holdout: 1000,
    }
}

fn err<T>(r: fastpt::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

fn assert_names(e: &str, needles: &[&str]) {
    for n in needles {
        assert!(e.contains(n), "{e:?} lacks {n:?}");
    }
}

#[test]
fn python_made_fixtures_equal_the_jsonl_records() {
    for split in ["train", "validation"] {
        let jsonl = read_records(&glue(&format!("rte_hf/{split}.jsonl"))).unwrap();
        let want = records(&jsonl);
        // A single Parquet file (Dataset.to_parquet).
        let p = read_records(&glue(&format!("rte_parquet/{split}.parquet"))).unwrap();
        assert_eq!(records(&p), want, "rte_parquet {split}");
        assert_eq!(p.unit, Unit::Row);
        // The Hub's layout, found by split name: data/{split}-0000i-of-0000N.parquet.
        let files = find_split(&glue("rte_sharded"), split).unwrap().unwrap();
        let s = fastpt::data::columnar::read_files(&files).unwrap();
        assert_eq!(records(&s), want, "rte_sharded {split}");
        // save_to_disk: the split's folder, its Arrow files in state.json's order.
        let d = read_records(&glue(&format!("rte_disk/{split}"))).unwrap();
        assert_eq!(records(&d), want, "rte_disk {split}");
    }
    // Two train shards of two rows: rows count within each file, and each row knows its file.
    let files = find_split(&glue("rte_sharded"), "train").unwrap().unwrap();
    let names: Vec<_> = files.iter().map(|f| f.file_name().unwrap()).collect();
    assert_eq!(
        names,
        [
            "train-00000-of-00002.parquet",
            "train-00001-of-00002.parquet"
        ]
    );
    let s = fastpt::data::columnar::read_files(&files).unwrap();
    let rows: Vec<usize> = s.rows.iter().map(|r| r.0).collect();
    assert_eq!(rows, [0, 1, 0, 1]);
    assert_eq!(s.path_of(1), files[0]);
    assert_eq!(s.path_of(2), files[1]);
    let d = read_records(&glue("rte_disk/train")).unwrap();
    assert!(d.path_of(3).ends_with("train/data-00001-of-00002.arrow"));
}

#[test]
fn rte_from_parquet_and_save_to_disk_folders_equals_rte_from_jsonl() {
    let want: TaskData = load_task("rte", &glue("rte_hf"), &opts()).unwrap();
    for rel in ["rte_parquet", "rte_sharded", "rte_disk"] {
        let got = load_task("rte", &glue(rel), &opts()).unwrap_or_else(|e| panic!("{rel}: {e}"));
        assert_eq!(got.train, want.train, "{rel}");
        assert_eq!(got.dev, want.dev, "{rel}");
        assert_eq!(got.test, want.test, "{rel}");
    }
}

/// A batch of every value kind the reader turns into JSON, `n` = 3 rows.
fn odd_batch(offset: i32) -> RecordBatch {
    let dict: DictionaryArray<Int8Type> = vec![Some("yes"), None, Some("no")].into_iter().collect();
    let mut lists = ListBuilder::new(StringBuilder::new());
    lists.values().append_value("a");
    lists.values().append_value("b");
    lists.append(true);
    lists.append(false);
    lists.append(true);
    let inner: ArrayRef = Arc::new(Int32Array::from(vec![1, 2, 3]));
    let flags: ArrayRef = Arc::new(BooleanArray::from(vec![Some(true), None, Some(false)]));
    let st = StructArray::from(vec![
        (Arc::new(Field::new("n", DataType::Int32, true)), inner),
        (Arc::new(Field::new("f", DataType::Boolean, true)), flags),
    ]);
    let pairs = FixedSizeListArray::from_iter_primitive::<arrow_array::types::Int32Type, _, _>(
        vec![
            Some(vec![Some(1), Some(2)]),
            Some(vec![Some(3), None]),
            None,
        ],
        2,
    );
    let cols: Vec<(&str, ArrayRef)> = vec![
        ("i8", Arc::new(Int8Array::from(vec![-128, 0, 127]))),
        ("u64", Arc::new(UInt64Array::from(vec![u64::MAX, 1, 2]))),
        (
            "i32",
            Arc::new(Int32Array::from(vec![offset, offset + 1, offset + 2])),
        ),
        (
            "f32",
            Arc::new(Float32Array::from(vec![Some(0.5), Some(f32::NAN), None])),
        ),
        (
            "f16",
            Arc::new(Float16Array::from(vec![half::f16::from_f32(1.5); 3])),
        ),
        (
            "b",
            Arc::new(BooleanArray::from(vec![Some(false), Some(true), None])),
        ),
        (
            "s",
            Arc::new(StringArray::from(vec![Some("é ü"), None, Some("")])),
        ),
        ("ls", Arc::new(LargeStringArray::from(vec!["x", "y", "z"]))),
        ("d", Arc::new(dict)),
        ("l", Arc::new(lists.finish())),
        ("st", Arc::new(st)),
        ("fl", Arc::new(pairs)),
    ];
    RecordBatch::try_from_iter_with_nullable(cols.into_iter().map(|(n, a)| (n, a, true))).unwrap()
}

/// The records of `odd_batch(offset)`, written out by hand.
fn odd_json(offset: i32) -> Vec<Value> {
    vec![
        json!({"i8": -128, "u64": u64::MAX, "i32": offset, "f32": 0.5, "f16": 1.5, "b": false,
               "s": "é ü", "ls": "x", "d": "yes", "l": ["a", "b"], "st": {"n": 1, "f": true},
               "fl": [1, 2]}),
        json!({"i8": 0, "u64": 1, "i32": offset + 1, "f32": null, "f16": 1.5, "b": true,
               "s": null, "ls": "y", "d": null, "l": null, "st": {"n": 2, "f": null},
               "fl": [3, null]}),
        json!({"i8": 127, "u64": 2, "i32": offset + 2, "f32": null, "f16": 1.5, "b": null,
               "s": "", "ls": "z", "d": "no", "l": [], "st": {"n": 3, "f": false},
               "fl": null}),
    ]
}

fn write_parquet(path: &Path, batches: &[RecordBatch], row_group: usize) {
    let props = WriterProperties::builder()
        .set_max_row_group_row_count(Some(row_group))
        .build();
    let f = std::fs::File::create(path).unwrap();
    let mut w = ArrowWriter::try_new(f, batches[0].schema(), Some(props)).unwrap();
    for b in batches {
        w.write(b).unwrap();
    }
    w.close().unwrap();
}

fn write_ipc(path: &Path, batches: &[RecordBatch]) {
    let f = std::fs::File::create(path).unwrap();
    let mut w = arrow_ipc::writer::StreamWriter::try_new(f, &batches[0].schema()).unwrap();
    for b in batches {
        w.write(b).unwrap();
    }
    w.finish().unwrap();
}

#[test]
fn odd_types_nulls_nested_and_dictionaries_in_several_row_groups_and_batches() {
    let tmp = tempfile::tempdir().unwrap();
    let batches = [odd_batch(10), odd_batch(20)];
    let mut want = odd_json(10);
    want.extend(odd_json(20));

    // Parquet: row groups of 2 rows, so the 6 rows span 3 groups across the 2 batches.
    let pq = tmp.path().join("odd.parquet");
    write_parquet(&pq, &batches, 2);
    let meta = parquet::file::reader::SerializedFileReader::new(std::fs::File::open(&pq).unwrap())
        .unwrap();
    assert_eq!(parquet::file::reader::FileReader::num_row_groups(&meta), 3);
    let r = read_records(&pq).unwrap();
    assert_eq!(records(&r), want);
    assert_eq!(
        r.rows.iter().map(|x| x.0).collect::<Vec<_>>(),
        [0, 1, 2, 3, 4, 5]
    );

    // Arrow IPC stream (two record batches), and the IPC file format.
    let ipc = tmp.path().join("odd.arrow");
    write_ipc(&ipc, &batches);
    assert_eq!(records(&read_records(&ipc).unwrap()), want);
    let file = tmp.path().join("file.arrow");
    {
        let f = std::fs::File::create(&file).unwrap();
        let mut w = arrow_ipc::writer::FileWriter::try_new(f, &batches[0].schema()).unwrap();
        for b in &batches {
            w.write(b).unwrap();
        }
        w.finish().unwrap();
    }
    assert_eq!(records(&read_records(&file).unwrap()), want);

    // A string_view column (IPC only) and a sliced batch.
    let views = RecordBatch::try_from_iter([(
        "v",
        Arc::new(StringViewArray::from(vec![
            Some("long enough to be out of line"),
            None,
        ])) as ArrayRef,
    )])
    .unwrap();
    let p = tmp.path().join("views.arrow");
    write_ipc(&p, &[views]);
    let got = records(&read_records(&p).unwrap());
    assert_eq!(
        got,
        [
            json!({"v": "long enough to be out of line"}),
            json!({"v": null})
        ]
    );
}

fn rte_batch(s2: ArrayRef, label: ArrayRef) -> RecordBatch {
    let s1: ArrayRef = Arc::new(StringArray::from(vec!["A cat.", "A dog."]));
    let mut cols = vec![("sentence1", s1), ("label", label)];
    if !s2.is_empty() {
        cols.push(("sentence2", s2));
    }
    RecordBatch::try_from_iter(cols).unwrap()
}

#[test]
fn errors_name_file_row_and_column() {
    let tmp = tempfile::tempdir().unwrap();
    let s2: ArrayRef = Arc::new(StringArray::from(vec!["A pet.", "A pet."]));
    let labels: ArrayRef = Arc::new(Int32Array::from(vec![0, 1]));

    // A wrong value type: a label that is neither an index nor a label word.
    let d = tmp.path().join("wrong_type");
    std::fs::create_dir(&d).unwrap();
    let bad: ArrayRef = Arc::new(StringArray::from(vec!["entailment", "maybe"]));
    write_parquet(&d.join("train.parquet"), &[rte_batch(s2.clone(), bad)], 100);
    write_parquet(
        &d.join("validation.parquet"),
        &[rte_batch(s2.clone(), labels.clone())],
        100,
    );
    let e = err(load_task("rte", &d, &opts()));
    assert_names(
        &e,
        &[
            "wrong_type/train.parquet",
            "row 1",
            "column `label`",
            "\"maybe\"",
        ],
    );

    // A missing column, in the second shard of a sharded split: the shard and its row.
    let d = tmp.path().join("missing_column");
    std::fs::create_dir(&d).unwrap();
    let none: ArrayRef = Arc::new(StringArray::from(Vec::<&str>::new()));
    write_parquet(
        &d.join("train-00000-of-00002.parquet"),
        &[rte_batch(s2.clone(), labels.clone())],
        100,
    );
    write_parquet(
        &d.join("train-00001-of-00002.parquet"),
        &[rte_batch(none, labels.clone())],
        100,
    );
    write_parquet(
        &d.join("validation.parquet"),
        &[rte_batch(s2.clone(), labels.clone())],
        100,
    );
    let e = err(load_task("rte", &d, &opts()));
    assert_names(
        &e,
        &[
            "train-00001-of-00002.parquet",
            "row 0",
            "column `sentence2`",
            "missing",
        ],
    );

    // A missing shard: named with its number.
    std::fs::remove_file(d.join("train-00001-of-00002.parquet")).unwrap();
    let e = err(load_task("rte", &d, &opts()));
    assert_names(&e, &["train-00001-of-00002.parquet", "missing", "1 of 2"]);

    // A corrupt Parquet file: its name, not a panic.
    let p = tmp.path().join("corrupt.parquet");
    let bytes = std::fs::read(glue("rte_parquet/train.parquet")).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 100]).unwrap();
    assert_names(&err(read_records(&p)), &["corrupt.parquet", "Parquet"]);
    let p = tmp.path().join("corrupt.arrow");
    let bytes = std::fs::read(glue("rte_disk/train/data-00000-of-00002.arrow")).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    assert_names(&err(read_records(&p)), &["corrupt.arrow", "Arrow"]);

    // A column of an unsupported type names the column and its type.
    let p = tmp.path().join("binary.parquet");
    let bin: ArrayRef = Arc::new(BinaryArray::from(vec![&b"\x00"[..]]));
    write_parquet(
        &p,
        &[RecordBatch::try_from_iter([("image", bin)]).unwrap()],
        100,
    );
    assert_names(
        &err(read_records(&p)),
        &["binary.parquet", "column `image`", "Binary"],
    );

    // state.json naming a file that is not there.
    let d = tmp.path().join("disk");
    std::fs::create_dir(&d).unwrap();
    std::fs::write(
        d.join("state.json"),
        r#"{"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}"#,
    )
    .unwrap();
    assert_names(
        &err(read_records(&d)),
        &[
            "state.json",
            "_data_files",
            "data-00000-of-00001.arrow",
            "missing",
        ],
    );
    std::fs::write(
        d.join("state.json"),
        r#"{"_data_files": [{"filename": "../x.arrow"}]}"#,
    )
    .unwrap();
    assert_names(&err(read_records(&d)), &["state.json", "../x.arrow"]);
}

#[test]
fn more_rows_than_the_file_can_hold_are_refused() {
    // 200 000 null rows take a few hundred bytes: more rows than bytes (+ 4096) is refused before
    // any record is built.
    let tmp = tempfile::tempdir().unwrap();
    let many =
        RecordBatch::try_from_iter([("x", Arc::new(NullArray::new(200_000)) as ArrayRef)]).unwrap();
    let p = tmp.path().join("many.arrow");
    write_ipc(&p, std::slice::from_ref(&many));
    assert_names(&err(read_records(&p)), &["many.arrow", "more than", "rows"]);
    // Parquet stores a null column as definition levels: 200 000 nulls in a few bytes.
    let nulls = RecordBatch::try_from_iter([(
        "x",
        Arc::new(Int32Array::from(vec![None; 200_000])) as ArrayRef,
    )])
    .unwrap();
    let p = tmp.path().join("many.parquet");
    write_parquet(&p, &[nulls], 1 << 20);
    assert!(std::fs::metadata(&p).unwrap().len() < 10_000);
    assert_names(&err(read_records(&p)), &["many.parquet", "200000 rows"]);
}

/// A copy of the tiny T5 fixture whose tokenizer knows "0" and "1" (the index labels).
fn t5_with_digits(tmp: &Path) -> String {
    let src = fastpt::testing::fixture("t5-v1_0-tiny");
    let dst = tmp.join("t5-digits");
    std::fs::create_dir(&dst).unwrap();
    for f in ["config.json", "generation_config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), dst.join(f)).unwrap();
    }
    let mut tok: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("tokenizer.json")).unwrap())
            .unwrap();
    let vocab = tok["model"]["vocab"].as_array_mut().unwrap();
    let n = vocab.len();
    vocab[n - 2][0] = "0".into();
    vocab[n - 1][0] = "1".into();
    std::fs::write(dst.join("tokenizer.json"), tok.to_string()).unwrap();
    dst.to_str().unwrap().to_string()
}

#[test]
fn fastpt_run_trains_rte_from_single_and_sharded_parquet_and_save_to_disk() {
    let tmp = tempfile::tempdir().unwrap();
    let model = t5_with_digits(tmp.path());
    for rel in ["rte_parquet", "rte_sharded", "rte_disk"] {
        let out = tmp.path().join(rel);
        let data = glue(rel);
        let sets = [
            "method=pt".to_string(),
            "method.prompt_len=4".into(),
            "train.steps=3".into(),
            "train.batch_size=2".into(),
            "train.warmup_steps=0".into(),
            "train.eval_every=3".into(),
            "train.max_len=40".into(),
            "train.max_target_len=4".into(),
            format!("out_dir={:?}", out.to_str().unwrap()),
        ];
        let mut args = vec![
            "run",
            "--device",
            "cpu",
            "--model",
            &model,
            "--task",
            "rte",
            "--data",
            data.to_str().unwrap(),
        ];
        for s in &sets {
            args.extend(["--set", s.as_str()]);
        }
        let (ok, stdout, stderr) = fastpt(&args);
        assert!(ok, "{rel}: {stderr}");
        assert!(stdout.contains("test: accuracy"), "{rel}: {stdout}");
        let report: Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap())
                .unwrap();
        // All 4 train rows were read: 3 steps of 2 cover them.
        assert!(
            report["eval"]["test_accuracy"].is_number(),
            "{rel}: {report}"
        );
        // RTE is small: its 4 validation rows become 2 dev + 2 test.
        let preds = std::fs::read_to_string(out.join("predictions.jsonl")).unwrap();
        assert_eq!(preds.lines().count(), 2, "{rel}");
    }
}
