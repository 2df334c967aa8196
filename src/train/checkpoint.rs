//! Training checkpoints that never lose work.
//!
//! A checkpoint is one safetensors file. For every optimised tensor `NAME` it holds
//! `param/NAME`, `adam_m/NAME` and `adam_v/NAME`, all F64 (exact for both f32 and f64 training).
//! The safetensors `__metadata__` map holds:
//!
//! - `fastpt_format`: `"1"`, the version of this layout;
//! - `fastpt_tensors`: a JSON array of the tensor names in the order they were saved (safetensors
//!   sorts its tensors, and the trainer wants its own order back);
//! - `fastpt_state`: the [`TrainState`] as JSON.
//!
//! The file is written to a temporary file in the same folder, flushed and fsynced, then renamed
//! over the target, and the folder is fsynced. A crash at any moment therefore leaves either the
//! previous checkpoint or the new one, never a mix. A crash between the write and the rename can
//! leave a hidden `.NAME.tmp-PID-N` file beside the checkpoint; it is never read and may be
//! deleted.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};

pub(crate) use crate::fsutil::write_file_atomic;

use crate::error::{Error, Result};

/// Metadata key of the layout version.
const FORMAT_KEY: &str = "fastpt_format";
/// The layout version this build writes and reads.
const FORMAT_VERSION: &str = "1";
/// Metadata key of the tensor names, in saved order (JSON array of strings).
const TENSORS_KEY: &str = "fastpt_tensors";
/// Metadata key of the [`TrainState`] JSON.
const STATE_KEY: &str = "fastpt_state";
/// Name prefixes of the three parts of one optimised tensor.
const PARTS: [&str; 3] = ["param", "adam_m", "adam_v"];
/// Bytes of the little-endian header length that starts every safetensors file.
const HEADER_LEN_BYTES: usize = 8;

/// One optimised tensor: the method parameter and its AdamW moments, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct OptimTensor {
    /// Unique, non-empty name (e.g. `prompt.embedding`).
    pub name: String,
    /// Dimensions; the product is the length of `value`, `m` and `v`.
    pub shape: Vec<usize>,
    /// The parameter itself.
    pub value: Vec<f64>,
    /// AdamW first moment (same shape).
    pub m: Vec<f64>,
    /// AdamW second moment (same shape).
    pub v: Vec<f64>,
}

/// Trainer state besides the tensors (serde): JSON in the file's metadata.
///
/// Floats are stored as strings in Rust's shortest round-trip notation (`"0.6931471805599453"`,
/// `"NaN"`, `"inf"`), because JSON has no NaN or infinity and serde_json's default float parser
/// can be off by one ulp; plain JSON numbers are accepted on reading too.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct TrainState {
    /// Optimizer steps done.
    pub step: u64,
    /// Epochs completed.
    pub epoch: u64,
    /// Position in the current epoch's example order (examples consumed).
    pub cursor: u64,
    /// Best evaluation metric so far, if any evaluation ran.
    #[serde(with = "exact_f64::option")]
    pub best_metric: Option<f64>,
    /// Step at which `best_metric` was reached.
    pub best_step: Option<u64>,
    /// Training loss history: (step, loss).
    #[serde(with = "exact_f64::pairs")]
    pub losses: Vec<(u64, f64)>,
    /// Hash of the effective config, to refuse resuming a different run.
    pub config_hash: String,
}

/// Writes a checkpoint atomically: after a crash at any moment `path` holds either its previous
/// content or the new checkpoint. Names must be unique and non-empty, and every tensor's `value`,
/// `m` and `v` must have as many elements as its shape.
pub fn save_checkpoint(path: &Path, tensors: &[OptimTensor], state: &TrainState) -> Result<()> {
    save_checkpoint_with(path, tensors, state, &mut || Ok(()))
}

/// [`save_checkpoint`] with a hook run after the temporary file is written and fsynced, just
/// before the rename. An error from the hook aborts the save as a kill would: the temporary file
/// is left behind and `path` is untouched. Tests use it to simulate a crash.
pub(crate) fn save_checkpoint_with(
    path: &Path,
    tensors: &[OptimTensor],
    state: &TrainState,
    before_rename: &mut dyn FnMut() -> Result<()>,
) -> Result<()> {
    let bytes = serialize_checkpoint(path, tensors, state)?;
    write_file_atomic(path, &bytes, before_rename)
}

/// The checkpoint's file content.
fn serialize_checkpoint(
    path: &Path,
    tensors: &[OptimTensor],
    state: &TrainState,
) -> Result<Vec<u8>> {
    let input_err = |msg: String| Error::Input(format!("{}: {msg}", path.display()));
    let mut seen = HashSet::new();
    // (stored name, shape, little-endian bytes); the views below borrow the bytes.
    let mut raw: Vec<(String, &[usize], Vec<u8>)> = Vec::with_capacity(3 * tensors.len());
    for t in tensors {
        if t.name.is_empty() {
            return Err(input_err("a checkpoint tensor has an empty name".into()));
        }
        if !seen.insert(t.name.as_str()) {
            return Err(input_err(format!("tensor `{}` is given twice", t.name)));
        }
        let numel = t.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        for (part, data) in PARTS.iter().zip([&t.value, &t.m, &t.v]) {
            if numel != Some(data.len()) {
                return Err(input_err(format!(
                    "tensor `{}`: shape {:?} does not match the {} elements of its {part}",
                    t.name,
                    t.shape,
                    data.len()
                )));
            }
            let bytes = data.iter().flat_map(|x| x.to_le_bytes()).collect();
            raw.push((format!("{part}/{}", t.name), &t.shape, bytes));
        }
    }
    let views = raw
        .iter()
        .map(|(name, shape, bytes)| {
            TensorView::new(Dtype::F64, shape.to_vec(), bytes)
                .map(|view| (name.as_str(), view))
                .map_err(|e| input_err(format!("tensor `{name}`: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;

    let names: Vec<&str> = tensors.iter().map(|t| t.name.as_str()).collect();
    let to_json = |what: &str, r: serde_json::Result<String>| {
        r.map_err(|e| input_err(format!("cannot encode {what} as JSON: {e}")))
    };
    let metadata = HashMap::from([
        (FORMAT_KEY.to_string(), FORMAT_VERSION.to_string()),
        (
            TENSORS_KEY.to_string(),
            to_json("the tensor names", serde_json::to_string(&names))?,
        ),
        (
            STATE_KEY.to_string(),
            to_json("the train state", serde_json::to_string(state))?,
        ),
    ]);
    safetensors::serialize(views, Some(metadata))
        .map_err(|e| input_err(format!("cannot serialize the checkpoint: {e}")))
}

/// Reads a checkpoint written by [`save_checkpoint`]: the tensors in their saved order, and the
/// state. Errors name the file: `Io` if it cannot be read, `Format` if it is truncated, is not a
/// fastpt checkpoint, or lacks a part of a tensor.
pub fn load_checkpoint(path: &Path) -> Result<(Vec<OptimTensor>, TrainState)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let format_err = |msg: String| Error::format(path, msg);
    // read_metadata checks the header, the offsets against dtypes and shapes, and that the data
    // ends exactly at the end of the file, so a truncated file stops here.
    let (header_len, header) = SafeTensors::read_metadata(&bytes).map_err(|e| {
        format_err(format!(
            "not a valid safetensors file (truncated or corrupt?): {e}"
        ))
    })?;
    let empty = HashMap::new();
    let meta = header.metadata().as_ref().unwrap_or(&empty);
    let get_meta = |key: &str| {
        meta.get(key).ok_or_else(|| {
            format_err(format!(
                "not a fastpt checkpoint: no `{key}` in the safetensors metadata"
            ))
        })
    };
    let version = get_meta(FORMAT_KEY)?;
    if version != FORMAT_VERSION {
        return Err(format_err(format!(
            "unsupported fastpt checkpoint format `{version}` (this build reads format {FORMAT_VERSION})"
        )));
    }
    let names: Vec<String> = serde_json::from_str(get_meta(TENSORS_KEY)?).map_err(|e| {
        format_err(format!(
            "`{TENSORS_KEY}` metadata is not a list of names: {e}"
        ))
    })?;
    let state: TrainState = serde_json::from_str(get_meta(STATE_KEY)?).map_err(|e| {
        format_err(format!(
            "`{STATE_KEY}` metadata is not a valid train state: {e}"
        ))
    })?;

    let data = &bytes[HEADER_LEN_BYTES + header_len..];
    let infos = header.tensors();
    // Every stored name the list accounts for.
    let mut listed = HashSet::new();
    let mut tensors = Vec::with_capacity(names.len());
    for name in &names {
        let mut shape = None;
        let mut parts = Vec::with_capacity(3);
        for part in PARTS {
            let stored = format!("{part}/{name}");
            let info = infos
                .get(&stored)
                .ok_or_else(|| format_err(format!("tensor `{name}`: `{stored}` is missing")))?;
            if info.dtype != Dtype::F64 {
                return Err(format_err(format!(
                    "tensor `{stored}`: dtype {}, expected F64",
                    info.dtype
                )));
            }
            match &shape {
                None => shape = Some(info.shape.clone()),
                Some(s) if *s != info.shape => {
                    return Err(format_err(format!(
                        "tensor `{name}`: `{stored}` has shape {:?} but `param/{name}` has {s:?}",
                        info.shape
                    )))
                }
                Some(_) => {}
            }
            let (start, end) = info.data_offsets;
            // Validated by read_metadata; checked again so a logic error cannot panic.
            let raw = data.get(start..end).ok_or_else(|| {
                format_err(format!("tensor `{stored}`: data past the end of the file"))
            })?;
            parts.push(
                // Infallible: chunks_exact(8) yields only 8-byte slices.
                raw.chunks_exact(8)
                    .map(|b| f64::from_le_bytes(b.try_into().expect("chunks of 8 bytes")))
                    .collect::<Vec<f64>>(),
            );
            if !listed.insert(stored) {
                return Err(format_err(format!(
                    "`{TENSORS_KEY}` lists tensor `{name}` twice"
                )));
            }
        }
        // Infallible: the loop above pushed one part per entry of PARTS (three), or returned.
        let [value, m, v]: [Vec<f64>; 3] = parts.try_into().expect("three parts");
        tensors.push(OptimTensor {
            name: name.clone(),
            shape: shape.unwrap_or_default(),
            value,
            m,
            v,
        });
    }
    // A tensor the list does not name would be silently dropped on resume; refuse instead.
    let mut extra: Vec<&String> = infos.keys().filter(|k| !listed.contains(*k)).collect();
    if !extra.is_empty() {
        extra.sort();
        return Err(format_err(format!(
            "tensors not listed in `{TENSORS_KEY}`: {}",
            extra
                .iter()
                .map(|s| format!("`{s}`"))
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    Ok((tensors, state))
}

/// Serde helpers that store f64 as strings in Rust's shortest round-trip notation, so values
/// (NaN and infinities included) come back bit-exact. Reading also accepts JSON numbers.
mod exact_f64 {
    use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

    /// A float as read: a string (what we write) or a number (hand-written JSON).
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Repr {
        Num(f64),
        Str(String),
    }

    fn to_string(x: f64) -> String {
        // `{:?}` is the shortest string that parses back to the same f64 (and uses an exponent
        // for very large or small values, unlike `{}`).
        format!("{x:?}")
    }

    fn from_repr<E: de::Error>(r: Repr) -> Result<f64, E> {
        match r {
            Repr::Num(x) => Ok(x),
            Repr::Str(s) => s
                .parse()
                .map_err(|_| E::custom(format!("`{s}` is not a number"))),
        }
    }

    pub mod option {
        use super::*;

        pub fn serialize<S: Serializer>(x: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
            x.map(to_string).serialize(s)
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
            Option::<Repr>::deserialize(d)?.map(from_repr).transpose()
        }
    }

    pub mod pairs {
        use super::*;

        pub fn serialize<S: Serializer>(v: &[(u64, f64)], s: S) -> Result<S::Ok, S::Error> {
            s.collect_seq(v.iter().map(|&(k, x)| (k, to_string(x))))
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<(u64, f64)>, D::Error> {
            Vec::<(u64, Repr)>::deserialize(d)?
                .into_iter()
                .map(|(k, r)| Ok((k, from_repr(r)?)))
                .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(name: &str, shape: &[usize], seed: f64) -> OptimTensor {
        let n: usize = shape.iter().product();
        let gen = |k: f64| {
            (0..n)
                .map(|i| (i as f64 + k) * seed / 7.0)
                .collect::<Vec<_>>()
        };
        OptimTensor {
            name: name.into(),
            shape: shape.to_vec(),
            value: gen(0.1),
            m: gen(-0.3),
            v: gen(2.0).iter().map(|x| x * x).collect(),
        }
    }

    fn state(step: u64) -> TrainState {
        TrainState {
            step,
            epoch: 2,
            cursor: 17,
            best_metric: Some(0.1 + 0.2),
            best_step: Some(step / 2),
            losses: vec![
                (1, std::f64::consts::LN_10),
                (2, 1.0 / 3.0),
                (3, f64::NAN),
                (4, 1e-310),
            ],
            config_hash: "abc123".into(),
        }
    }

    fn bits(v: &[f64]) -> Vec<u64> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// Bit-exact comparison of tensors (NaN-safe), and of states (NaN losses compared by bits).
    fn assert_same(got: &(Vec<OptimTensor>, TrainState), tensors: &[OptimTensor], st: &TrainState) {
        assert_eq!(got.0.len(), tensors.len());
        for (a, b) in got.0.iter().zip(tensors) {
            assert_eq!(a.name, b.name);
            assert_eq!(a.shape, b.shape);
            assert_eq!(bits(&a.value), bits(&b.value), "{}", a.name);
            assert_eq!(bits(&a.m), bits(&b.m), "{}", a.name);
            assert_eq!(bits(&a.v), bits(&b.v), "{}", a.name);
        }
        let key = |s: &TrainState| {
            let mut s = s.clone();
            let losses: Vec<(u64, u64)> = s.losses.iter().map(|&(k, x)| (k, x.to_bits())).collect();
            s.losses.clear();
            (s, losses)
        };
        assert_eq!(key(&got.1), key(st));
    }

    fn err_msg<T: std::fmt::Debug>(r: Result<T>) -> (Error, String) {
        let e = r.unwrap_err();
        let msg = e.to_string();
        (e, msg)
    }

    fn temp_files(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".tmp-"))
            .collect()
    }

    #[test]
    fn round_trip_is_bit_exact_and_keeps_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ckpt.safetensors");
        let mut special = tensor("a/nested.name", &[2, 3], 1.0);
        special.value = vec![
            -0.0,
            f64::MIN_POSITIVE / 4.0,
            f64::MAX,
            f64::INFINITY,
            f64::NAN,
            0.1,
        ];
        let tensors = vec![
            tensor("z.prompt", &[4, 5], 3.0),
            special,
            tensor("bias", &[3], -2.0),
            tensor("scalar", &[], 0.5),
            tensor("empty", &[0, 4], 1.0),
        ];
        let st = state(40);
        save_checkpoint(&path, &tensors, &st).unwrap();
        let got = load_checkpoint(&path).unwrap();
        assert_same(&got, &tensors, &st);
        assert!(got.1.losses[2].1.is_nan());
        assert!(temp_files(dir.path()).is_empty());

        // The layout is plain safetensors other tools can read.
        let all = crate::model::hf::read_all_f64(&path).unwrap();
        assert_eq!(all.len(), 15);
        assert_eq!(all["param/bias"].1, tensors[2].value);
        assert_eq!(all["adam_v/z.prompt"].0, vec![4, 5]);
    }

    #[test]
    fn state_json_accepts_plain_numbers() {
        let json = r#"{"step":3,"epoch":0,"cursor":1,"best_metric":0.5,"best_step":null,
            "losses":[[1,0.25],[2,"NaN"]],"config_hash":"h"}"#;
        let st: TrainState = serde_json::from_str(json).unwrap();
        assert_eq!(st.best_metric, Some(0.5));
        assert_eq!(st.losses[0], (1, 0.25));
        assert!(st.losses[1].1.is_nan());
        let bad = r#"{"step":3,"epoch":0,"cursor":1,"best_metric":"x","best_step":null,
            "losses":[],"config_hash":"h"}"#;
        assert!(serde_json::from_str::<TrainState>(bad).is_err());
    }

    #[test]
    fn overwrite_replaces_the_old_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ckpt.safetensors");
        save_checkpoint(&path, &[tensor("p", &[2, 2], 1.0)], &state(1)).unwrap();
        let new = vec![tensor("p", &[3], 5.0), tensor("q", &[1], 6.0)];
        save_checkpoint(&path, &new, &state(2)).unwrap();
        assert_same(&load_checkpoint(&path).unwrap(), &new, &state(2));
        assert!(temp_files(dir.path()).is_empty());
    }

    #[test]
    fn crash_before_rename_keeps_the_old_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ckpt.safetensors");
        let old = vec![tensor("p", &[2, 2], 1.0)];
        save_checkpoint(&path, &old, &state(10)).unwrap();

        // A kill between the fsync of the temp file and the rename.
        let new = vec![tensor("p", &[2, 2], 9.0)];
        let mut ran = false;
        let (_, msg) = err_msg(save_checkpoint_with(&path, &new, &state(20), &mut || {
            ran = true;
            Err(Error::Input("killed".into()))
        }));
        assert!(ran);
        assert_eq!(msg, "killed");
        let leftover = temp_files(dir.path());
        assert_eq!(leftover.len(), 1, "the simulated kill leaves its temp file");
        // The temp file is complete (it was fsynced) but is not what `path` names.
        assert_same(
            &load_checkpoint(&dir.path().join(&leftover[0])).unwrap(),
            &new,
            &state(20),
        );
        assert_same(&load_checkpoint(&path).unwrap(), &old, &state(10));

        // The next save and load ignore the leftover.
        save_checkpoint(&path, &new, &state(30)).unwrap();
        assert_same(&load_checkpoint(&path).unwrap(), &new, &state(30));
        assert_eq!(temp_files(dir.path()), leftover);
    }

    #[test]
    fn failed_write_leaves_old_checkpoint_and_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ckpt.safetensors");
        save_checkpoint(&path, &[tensor("p", &[2], 1.0)], &state(1)).unwrap();
        // Renaming a file over a non-empty folder fails after the temp file is written.
        let target = dir.path().join("folder");
        std::fs::create_dir(&target).unwrap();
        std::fs::write(target.join("x"), b"x").unwrap();
        let (e, msg) = err_msg(save_checkpoint(
            &target,
            &[tensor("p", &[2], 2.0)],
            &state(2),
        ));
        assert!(matches!(e, Error::Io { .. }), "{msg}");
        assert!(msg.contains("folder"), "{msg}");
        assert!(temp_files(dir.path()).is_empty());
        assert_same(
            &load_checkpoint(&path).unwrap(),
            &[tensor("p", &[2], 1.0)],
            &state(1),
        );
    }

    #[test]
    fn bad_input_is_rejected_before_writing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ckpt.safetensors");
        let mut short = tensor("p", &[2, 3], 1.0);
        short.m.pop();
        let cases = [
            (
                vec![short],
                "tensor `p`: shape [2, 3] does not match the 5 elements of its adam_m",
            ),
            (
                vec![tensor("p", &[1], 1.0), tensor("p", &[1], 1.0)],
                "tensor `p` is given twice",
            ),
            (vec![tensor("", &[1], 1.0)], "empty name"),
        ];
        for (tensors, want) in cases {
            let (e, msg) = err_msg(save_checkpoint(&path, &tensors, &state(1)));
            assert!(matches!(e, Error::Input(_)), "{msg}");
            assert!(
                msg.contains(want) && msg.contains("ckpt.safetensors"),
                "{msg}"
            );
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn missing_file_is_an_io_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nope.safetensors");
        let (e, msg) = err_msg(load_checkpoint(&path));
        assert!(matches!(e, Error::Io { .. }), "{msg}");
        assert!(msg.contains("nope.safetensors"), "{msg}");
    }

    #[test]
    fn truncated_and_garbage_files_are_format_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ckpt.safetensors");
        save_checkpoint(&path, &[tensor("p", &[4, 4], 1.0)], &state(1)).unwrap();
        let full = std::fs::read(&path).unwrap();
        for len in [0, 5, 8, 40, full.len() / 2, full.len() - 1] {
            std::fs::write(&path, &full[..len]).unwrap();
            let (e, msg) = err_msg(load_checkpoint(&path));
            assert!(matches!(e, Error::Format { .. }), "{len}: {msg}");
            assert!(
                msg.contains("ckpt.safetensors") && msg.contains("truncated"),
                "{msg}"
            );
        }
        std::fs::write(&path, b"{\"not\": \"safetensors\"}").unwrap();
        let (e, _) = err_msg(load_checkpoint(&path));
        assert!(matches!(e, Error::Format { .. }));
    }

    /// Writes a safetensors file with the given F64 tensors (1 element each) and metadata.
    fn write_raw(path: &Path, names: &[&str], meta: &[(&str, String)]) {
        let bytes = 1.5f64.to_le_bytes();
        let views = names
            .iter()
            .map(|n| (*n, TensorView::new(Dtype::F64, vec![1], &bytes).unwrap()));
        let meta: HashMap<String, String> = meta
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        let out = safetensors::serialize(views, Some(meta).filter(|m| !m.is_empty())).unwrap();
        std::fs::write(path, out).unwrap();
    }

    #[test]
    fn files_that_are_not_fastpt_checkpoints_say_what_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        let st = serde_json::to_string(&state(1)).unwrap();
        let list = r#"["p"]"#.to_string();
        let one = "1".to_string();
        let all = ["param/p", "adam_m/p", "adam_v/p"];
        // (stored tensors, metadata, expected message)
        type Case<'a> = (Vec<&'a str>, Vec<(&'a str, String)>, &'a str);
        let cases: Vec<Case> = vec![
            (
                all.to_vec(),
                vec![],
                "not a fastpt checkpoint: no `fastpt_format`",
            ),
            (
                all.to_vec(),
                vec![(FORMAT_KEY, one.clone()), (TENSORS_KEY, list.clone())],
                "not a fastpt checkpoint: no `fastpt_state`",
            ),
            (
                all.to_vec(),
                vec![(FORMAT_KEY, one.clone()), (STATE_KEY, st.clone())],
                "not a fastpt checkpoint: no `fastpt_tensors`",
            ),
            (
                all.to_vec(),
                vec![
                    (FORMAT_KEY, "2".into()),
                    (TENSORS_KEY, list.clone()),
                    (STATE_KEY, st.clone()),
                ],
                "unsupported fastpt checkpoint format `2`",
            ),
            (
                all.to_vec(),
                vec![
                    (FORMAT_KEY, one.clone()),
                    (TENSORS_KEY, list.clone()),
                    (STATE_KEY, "{}".into()),
                ],
                "`fastpt_state` metadata is not a valid train state",
            ),
            (
                vec!["param/p", "adam_m/p"],
                vec![
                    (FORMAT_KEY, one.clone()),
                    (TENSORS_KEY, list.clone()),
                    (STATE_KEY, st.clone()),
                ],
                "tensor `p`: `adam_v/p` is missing",
            ),
            (
                vec!["param/p", "adam_m/p", "adam_v/p", "param/q"],
                vec![
                    (FORMAT_KEY, one.clone()),
                    (TENSORS_KEY, list.clone()),
                    (STATE_KEY, st.clone()),
                ],
                "tensors not listed in `fastpt_tensors`: `param/q`",
            ),
        ];
        for (names, meta, want) in cases {
            write_raw(&path, &names, &meta);
            let (e, msg) = err_msg(load_checkpoint(&path));
            assert!(matches!(e, Error::Format { .. }), "{msg}");
            assert!(
                msg.contains("model.safetensors") && msg.contains(want),
                "{msg}"
            );
        }
    }

    #[test]
    fn wrong_dtype_or_shape_of_a_part_is_a_format_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ckpt.safetensors");
        let meta = HashMap::from([
            (FORMAT_KEY.to_string(), "1".to_string()),
            (TENSORS_KEY.to_string(), r#"["p"]"#.to_string()),
            (
                STATE_KEY.to_string(),
                serde_json::to_string(&state(1)).unwrap(),
            ),
        ]);
        let f64s = [0u8; 16];
        let f32s = [0u8; 8];
        let write = |adam_v: TensorView| {
            let views = vec![
                (
                    "param/p",
                    TensorView::new(Dtype::F64, vec![2], &f64s).unwrap(),
                ),
                (
                    "adam_m/p",
                    TensorView::new(Dtype::F64, vec![2], &f64s).unwrap(),
                ),
                ("adam_v/p", adam_v),
            ];
            std::fs::write(
                &path,
                safetensors::serialize(views, Some(meta.clone())).unwrap(),
            )
            .unwrap();
        };
        write(TensorView::new(Dtype::F32, vec![2], &f32s).unwrap());
        let (_, msg) = err_msg(load_checkpoint(&path));
        assert!(
            msg.contains("tensor `adam_v/p`: dtype F32, expected F64"),
            "{msg}"
        );
        write(TensorView::new(Dtype::F64, vec![1, 2], &f64s).unwrap());
        let (_, msg) = err_msg(load_checkpoint(&path));
        assert!(
            msg.contains("`adam_v/p` has shape [1, 2] but `param/p` has [2]"),
            "{msg}"
        );
    }
}
