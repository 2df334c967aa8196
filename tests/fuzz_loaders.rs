//! Property tests of every loader that reads a user's file (issue 19): random mutations of a valid
//! model folder (config.json, safetensors header and body, tokenizer.json), run config, checkpoint
//! and data file must give `Ok` or an `Err`, never a panic, and never allocate more than a fixed cap
//! above what the loader held before (the inputs are a few hundred KB, so anything near the cap is a
//! size read from the file and trusted).
//!
//! The allocator below counts the bytes live in this test binary. An allocation that would pass
//! `HARD_CAP` fails (the process aborts with "memory allocation failed"), so a loader that trusts a
//! size in a file cannot take the machine down with it; the case being run is written to
//! `target/fuzz-last-case.txt` first, so an abort can be reproduced. Below the hard cap, a peak over
//! `CAP` is an ordinary test failure that proptest shrinks.
//!
//! `PROPTEST_CASES` changes the number of cases per loader (default below), `FASTPT_FUZZ_SEED`
//! the cases themselves.

use std::alloc::{GlobalAlloc, Layout, System};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use fastpt::backend::cpu::CpuBackend;
use fastpt::config::RunConfig;
use fastpt::model::linear::Quant;
use fastpt::train::checkpoint::{load_checkpoint, save_checkpoint, OptimTensor, TrainState};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};
use serde_json::Value;

/// Peak bytes a loader may allocate above what was live when it started.
const CAP: usize = 256 << 20;
/// Past this the allocator refuses (the process aborts): a trusted size from a file.
const HARD_CAP: usize = 2 << 30;

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if LIVE.load(Ordering::Relaxed).saturating_add(layout.size()) > HARD_CAP {
            return std::ptr::null_mut();
        }
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > layout.size()
            && LIVE
                .load(Ordering::Relaxed)
                .saturating_add(new_size - layout.size())
                > HARD_CAP
        {
            return std::ptr::null_mut();
        }
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                let now = LIVE.fetch_add(new_size - layout.size(), Ordering::Relaxed) + new_size
                    - layout.size();
                PEAK.fetch_max(now, Ordering::Relaxed);
            } else {
                LIVE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// One fuzz test at a time: the counters are process-wide.
static SERIAL: Mutex<()> = Mutex::new(());

/// Runs `load` under the cap: `Err` with the panic message or the peak when either happens.
fn guarded(what: &str, case: &str, load: impl FnOnce()) -> Result<(), TestCaseError> {
    let last = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz-last-case.txt");
    let _ = std::fs::write(&last, format!("{what}\n{case}"));
    let start = LIVE.load(Ordering::Relaxed);
    PEAK.store(start, Ordering::Relaxed);
    let result = catch_unwind(AssertUnwindSafe(load));
    let peak = PEAK.load(Ordering::Relaxed).saturating_sub(start);
    if let Err(payload) = result {
        let msg = payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        return Err(TestCaseError::fail(format!(
            "{what} panicked: {msg}\ncase: {case}"
        )));
    }
    if peak > CAP {
        return Err(TestCaseError::fail(format!(
            "{what} allocated {peak} bytes (cap {CAP})\ncase: {case}"
        )));
    }
    Ok(())
}

/// A runner with a fixed seed, so CI sees the same cases every time; `FASTPT_FUZZ_SEED=N` picks
/// other cases (a loop over seeds is how to search for new failures locally).
fn runner(default_cases: u32) -> TestRunner {
    let env = |name: &str| std::env::var(name).ok().and_then(|s| s.parse::<u64>().ok());
    let cases = env("PROPTEST_CASES").map_or(default_cases, |n| n as u32);
    let seed = env("FASTPT_FUZZ_SEED").unwrap_or(19);
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let config = Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    };
    TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &bytes))
}

// ---------------------------------------------------------------- mutations

/// A byte-level change to a file.
#[derive(Debug, Clone)]
enum ByteEdit {
    Set(usize, u8),
    Insert(usize, Vec<u8>),
    Delete(usize, usize),
    Truncate(usize),
    Duplicate(usize, usize),
}

fn byte_edit() -> impl Strategy<Value = ByteEdit> {
    prop_oneof![
        4 => (any::<usize>(), any::<u8>()).prop_map(|(i, b)| ByteEdit::Set(i, b)),
        1 => (any::<usize>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(i, v)| ByteEdit::Insert(i, v)),
        1 => (any::<usize>(), 1usize..64).prop_map(|(i, n)| ByteEdit::Delete(i, n)),
        1 => any::<usize>().prop_map(ByteEdit::Truncate),
        1 => (any::<usize>(), 1usize..64).prop_map(|(i, n)| ByteEdit::Duplicate(i, n)),
    ]
}

fn apply_bytes(bytes: &mut Vec<u8>, edit: &ByteEdit) {
    let n = bytes.len().max(1);
    match edit {
        ByteEdit::Set(i, b) => {
            if !bytes.is_empty() {
                bytes[i % n] = *b;
            }
        }
        ByteEdit::Insert(i, v) => {
            let at = i % (bytes.len() + 1);
            bytes.splice(at..at, v.iter().copied());
        }
        ByteEdit::Delete(i, len) => {
            let at = i % n;
            let end = (at + len).min(bytes.len());
            if at < end {
                bytes.drain(at..end);
            }
        }
        ByteEdit::Truncate(i) => bytes.truncate(i % n),
        ByteEdit::Duplicate(i, len) => {
            let at = i % n;
            let end = (at + len).min(bytes.len());
            if at < end {
                let copy = bytes[at..end].to_vec();
                bytes.splice(end..end, copy);
            }
        }
    }
}

/// Values that break size arithmetic or types when they replace a JSON/TOML leaf.
fn hostile_value(k: u8) -> Value {
    match k % 14 {
        0 => Value::from(0),
        1 => Value::from(-1),
        2 => Value::from(1_000_000_000u64),
        3 => Value::from(1u64 << 32),
        4 => Value::from(i64::MAX),
        5 => Value::from(u64::MAX),
        6 => serde_json::json!(1e300),
        7 => serde_json::json!(1e9),
        8 => serde_json::json!(0.5),
        9 => Value::from("x"),
        10 => Value::Null,
        11 => serde_json::json!([]),
        12 => serde_json::json!({}),
        _ => Value::from(1u64 << 62),
    }
}

/// Replaces the `pick`-th leaf (depth-first) of `v` by `with`; returns whether one was replaced.
fn replace_leaf(v: &mut Value, pick: &mut usize, with: &Value) -> bool {
    match v {
        Value::Object(map) => map.values_mut().any(|c| replace_leaf(c, pick, with)),
        Value::Array(items) => items.iter_mut().any(|c| replace_leaf(c, pick, with)),
        leaf => {
            if *pick == 0 {
                *leaf = with.clone();
                true
            } else {
                *pick -= 1;
                false
            }
        }
    }
}

fn count_leaves(v: &Value) -> usize {
    match v {
        Value::Object(map) => map.values().map(count_leaves).sum(),
        Value::Array(items) => items.iter().map(count_leaves).sum(),
        _ => 1,
    }
}

/// A change to a JSON document: a leaf replaced by a hostile value, or bytes edited.
#[derive(Debug, Clone)]
enum JsonEdit {
    Leaf(usize, u8),
    Bytes(ByteEdit),
}

fn json_edits() -> impl Strategy<Value = Vec<JsonEdit>> {
    prop::collection::vec(
        prop_oneof![
            3 => (any::<usize>(), any::<u8>()).prop_map(|(i, k)| JsonEdit::Leaf(i, k)),
            1 => byte_edit().prop_map(JsonEdit::Bytes),
        ],
        1..4,
    )
}

fn apply_json(text: &[u8], edits: &[JsonEdit]) -> Vec<u8> {
    let mut bytes = text.to_vec();
    for e in edits {
        match e {
            JsonEdit::Leaf(i, k) => {
                if let Ok(mut v) = serde_json::from_slice::<Value>(&bytes) {
                    let leaves = count_leaves(&v).max(1);
                    let mut pick = i % leaves;
                    replace_leaf(&mut v, &mut pick, &hostile_value(*k));
                    if let Ok(s) = serde_json::to_vec_pretty(&v) {
                        bytes = s;
                    }
                }
            }
            JsonEdit::Bytes(b) => apply_bytes(&mut bytes, b),
        }
    }
    bytes
}

/// A safetensors file: its JSON header edited as a document, and its bytes edited.
fn apply_safetensors(file: &[u8], header_edits: &[JsonEdit], body: &[ByteEdit]) -> Vec<u8> {
    let n = u64::from_le_bytes(file[..8].try_into().unwrap()) as usize;
    let header = apply_json(&file[8..8 + n], header_edits);
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&header);
    out.extend_from_slice(&file[8 + n..]);
    for e in body {
        apply_bytes(&mut out, e);
    }
    out
}

// ---------------------------------------------------------------- fixtures

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// A copy of a fixture model folder with `file` replaced by `bytes`.
fn model_copy(name: &str, file: &str, bytes: &[u8]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    std::fs::write(dir.path().join(file), bytes).unwrap();
    dir
}

fn load_model_folder(dir: &Path) {
    let be = CpuBackend::<f32>::new();
    for quant in [Quant::None, Quant::Nf4] {
        let _ = fastpt::model::load_model(&be, dir, quant);
    }
}

/// Runs `load` on a copy of fixture model `name` whose JSON `file` got `edits`, under the cap.
fn with_edited_json(
    name: &str,
    file: &str,
    edits: &[JsonEdit],
    what: &str,
    load: impl FnOnce(&Path),
) -> Result<(), TestCaseError> {
    let text = std::fs::read(fixture(name).join(file)).unwrap();
    let bytes = apply_json(&text, edits);
    let dir = model_copy(name, file, &bytes);
    let case = format!("{name}/{file}:\n{}", String::from_utf8_lossy(&bytes));
    guarded(what, &case, || load(dir.path()))
}

/// The two fixture families: T5 (sharded) and Llama (one file).
const MODELS: [(&str, &str); 2] = [
    ("t5-v1_1-tiny", "model-00002-of-00003.safetensors"),
    ("llama-gqa-tiny", "model.safetensors"),
];

// ---------------------------------------------------------------- the loaders

#[test]
fn model_config_json_mutations_never_panic_or_overallocate() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let strategy = (0usize..MODELS.len(), json_edits());
    runner(384)
        .run(&strategy, |(m, edits)| {
            let (name, _) = MODELS[m];
            with_edited_json(name, "config.json", &edits, "load_model", load_model_folder)
        })
        .unwrap();
}

#[test]
fn safetensors_mutations_never_panic_or_overallocate() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut runner = runner(384);
    let strategy = (
        0usize..MODELS.len(),
        prop::collection::vec(
            (any::<usize>(), any::<u8>()).prop_map(|(i, k)| JsonEdit::Leaf(i, k)),
            0..3,
        ),
        prop::collection::vec(byte_edit(), 0..3),
    );
    runner
        .run(&strategy, |(m, header, body)| {
            let (name, file) = MODELS[m];
            let original = std::fs::read(fixture(name).join(file)).unwrap();
            let bytes = apply_safetensors(&original, &header, &body);
            let dir = model_copy(name, file, &bytes);
            let case = format!("{name}/{file}: header {header:?}, body {body:?}");
            guarded("load_model (safetensors)", &case, || {
                load_model_folder(dir.path())
            })
        })
        .unwrap();
}

/// Issue 20: a bitsandbytes 4-bit folder, whose quant states are JSON inside the safetensors body
/// and whose sizes are read from them: header, body and config.json mutations.
#[test]
fn bnb_folder_mutations_never_panic_or_overallocate() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (name, file) = ("bnb-llama-tiny", "model.safetensors");
    let strategy = (
        prop::collection::vec(
            (any::<usize>(), any::<u8>()).prop_map(|(i, k)| JsonEdit::Leaf(i, k)),
            0..3,
        ),
        prop::collection::vec(byte_edit(), 0..3),
        json_edits(),
    );
    runner(128)
        .run(&strategy, |(header, body, config)| {
            let original = std::fs::read(fixture(name).join(file)).unwrap();
            let bytes = apply_safetensors(&original, &header, &body);
            let dir = model_copy(name, file, &bytes);
            let text = std::fs::read(fixture(name).join("config.json")).unwrap();
            std::fs::write(dir.path().join("config.json"), apply_json(&text, &config)).unwrap();
            let case =
                format!("{name}/{file}: header {header:?}, body {body:?}, config {config:?}");
            guarded("load_model (bnb 4-bit)", &case, || {
                load_model_folder(dir.path())
            })
        })
        .unwrap();
}

#[test]
fn safetensors_index_mutations_never_panic_or_overallocate() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let index = "model.safetensors.index.json";
    runner(192)
        .run(&json_edits(), |edits| {
            with_edited_json(
                "t5-v1_1-tiny",
                index,
                &edits,
                "load_model",
                load_model_folder,
            )
        })
        .unwrap();
}

#[test]
fn tokenizer_json_mutations_never_panic_or_overallocate() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let strategy = (0usize..MODELS.len(), json_edits());
    runner(384)
        .run(&strategy, |(m, edits)| {
            let (name, _) = MODELS[m];
            with_edited_json(name, "tokenizer.json", &edits, "load_tokenizer", |dir| {
                if let Ok(tok) = fastpt::model::hf::load_tokenizer(dir) {
                    let _ = tok.encode("premise: a cat sat. hypothesis: 12 dogs", true);
                }
            })
        })
        .unwrap();
}

/// A run config that sets every section (the keys a mutation can reach).
const RUN_TOML: &str = r#"
model = "t5-tiny"
method = "ept"
seed = 3
out_dir = "runs/x"

[train]
steps = 4
warmup_steps = 1
batch_size = 2
lr = 0.3

[data]
task = "synthetic"
train_examples = 8
dev_examples = 4

[ept]
prompt_len = 6
rank = 2
experts = 2
"#;

#[test]
fn run_config_mutations_never_panic_or_overallocate() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // The fixture must be valid, or every case would stop at the first error.
    let path = Path::new("fuzz.toml");
    let cfg = RunConfig::from_toml_str(RUN_TOML, path, &[]).unwrap();
    cfg.validate(path).unwrap();
    let mut runner = runner(512);
    let strategy = prop::collection::vec(
        prop_oneof![
            3 => (any::<usize>(), any::<u8>()).prop_map(|(i, k)| JsonEdit::Leaf(i, k)),
            1 => byte_edit().prop_map(JsonEdit::Bytes),
        ],
        1..4,
    );
    runner
        .run(&strategy, |edits| {
            let mut text = RUN_TOML.as_bytes().to_vec();
            for e in &edits {
                match e {
                    // A TOML value replaced through its JSON form (the leaf types match).
                    JsonEdit::Leaf(i, k) => {
                        let Ok(s) = std::str::from_utf8(&text) else {
                            continue;
                        };
                        let Ok(t) = toml::from_str::<toml::Value>(s) else {
                            continue;
                        };
                        let Ok(mut v) = serde_json::to_value(&t) else {
                            continue;
                        };
                        let leaves = count_leaves(&v).max(1);
                        let mut pick = i % leaves;
                        replace_leaf(&mut v, &mut pick, &hostile_value(*k));
                        if let Ok(t) = serde_json::from_value::<toml::Value>(v) {
                            if let Ok(s) = toml::to_string(&t) {
                                text = s.into_bytes();
                            }
                        }
                    }
                    JsonEdit::Bytes(b) => apply_bytes(&mut text, b),
                }
            }
            let case = String::from_utf8_lossy(&text).into_owned();
            guarded("RunConfig", &case, || {
                let Ok(s) = std::str::from_utf8(&text) else {
                    return;
                };
                if let Ok(cfg) = RunConfig::from_toml_str(s, path, &[]) {
                    let _ = cfg.validate(path);
                    let _ = cfg.to_toml_string();
                }
            })
        })
        .unwrap();
}

#[test]
fn checkpoint_mutations_never_panic_or_overallocate() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.safetensors");
    let t = |name: &str, shape: Vec<usize>| {
        let n = shape.iter().product();
        OptimTensor {
            name: name.to_string(),
            shape,
            value: (0..n).map(|i| i as f64 * 0.25).collect(),
            m: vec![0.5; n],
            v: vec![0.125; n],
        }
    };
    let state = TrainState {
        step: 3,
        epoch: 0,
        cursor: 6,
        best_metric: Some(0.5),
        best_step: Some(2),
        losses: vec![(1, 2.0), (2, 1.5), (3, 1.25)],
        config_hash: "abc".to_string(),
    };
    save_checkpoint(
        &good,
        &[t("prompt.a", vec![3, 5]), t("prompt.b", vec![7])],
        &state,
    )
    .unwrap();
    let original = std::fs::read(&good).unwrap();
    let mut runner = runner(512);
    let strategy = (
        prop::collection::vec(
            prop_oneof![
                3 => (any::<usize>(), any::<u8>()).prop_map(|(i, k)| JsonEdit::Leaf(i, k)),
                1 => byte_edit().prop_map(JsonEdit::Bytes),
            ],
            0..3,
        ),
        prop::collection::vec(byte_edit(), 0..3),
    );
    runner
        .run(&strategy, |(header, body)| {
            let bytes = apply_safetensors(&original, &header, &body);
            let path = dir.path().join("mutated.safetensors");
            std::fs::write(&path, &bytes).unwrap();
            let case = format!("checkpoint: header {header:?}, body {body:?}");
            guarded("load_checkpoint", &case, || {
                let _ = load_checkpoint(&path);
            })
        })
        .unwrap();
}

#[test]
fn data_file_mutations_never_panic_or_overallocate() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let originals: [(&str, &str); 3] = [
        (
            "train.jsonl",
            "{\"premise\": \"a cat\", \"hypothesis\": \"a pet\", \"label\": 0}\n\
             {\"premise\": \"rain\", \"hypothesis\": \"dry\", \"label\": 1, \"idx\": 7}\n",
        ),
        (
            "train.tsv",
            "index\tsentence1\tsentence2\tlabel\n0\ta cat\ta pet\tentailment\n\
             1\train\t\"dry\" day\tnot_entailment\n",
        ),
        (
            "train.csv",
            "sentence,label\n\"a, quoted \"\"cat\"\"\",1\nplain dog,0\n",
        ),
    ];
    let mut runner = runner(512);
    let strategy = (
        0usize..originals.len(),
        prop::collection::vec(byte_edit(), 1..5),
    );
    runner
        .run(&strategy, |(f, edits)| {
            let (name, text) = originals[f];
            let mut bytes = text.as_bytes().to_vec();
            for e in &edits {
                apply_bytes(&mut bytes, e);
            }
            let path = dir.path().join(name);
            std::fs::write(&path, &bytes).unwrap();
            let case = format!("{name}: {:?}", String::from_utf8_lossy(&bytes));
            guarded("read_records", &case, || {
                let _ = fastpt::data::readers::read_records(&path);
            })
        })
        .unwrap();
}

/// Parquet and Arrow IPC files (issue 20): the `datasets`-made fixtures, mutated, give `Ok` or an
/// `Err`, never a panic or an allocation sized by a corrupt length.
#[test]
fn columnar_file_mutations_never_panic_or_overallocate() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let glue = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data/glue");
    let originals: Vec<(&str, Vec<u8>)> = vec![
        (
            "train.parquet",
            std::fs::read(glue.join("rte_parquet/train.parquet")).unwrap(),
        ),
        (
            "train.arrow",
            std::fs::read(glue.join("rte_disk/train/data-00000-of-00002.arrow")).unwrap(),
        ),
    ];
    let mut runner = runner(512);
    let strategy = (
        0usize..originals.len(),
        prop::collection::vec(byte_edit(), 1..5),
    );
    runner
        .run(&strategy, |(f, edits)| {
            let (name, original) = &originals[f];
            let mut bytes = original.clone();
            for e in &edits {
                apply_bytes(&mut bytes, e);
            }
            let path = dir.path().join(name);
            std::fs::write(&path, &bytes).unwrap();
            let case = format!("{name}: edits {edits:?}");
            guarded("read_records", &case, || {
                let _ = fastpt::data::readers::read_records(&path);
            })
        })
        .unwrap();
}
