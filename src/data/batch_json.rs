//! The JSON batch of `fastpt forward`: a user's own batch, to check parity of a checkpoint with
//! another implementation. Rows may have different lengths; they are padded here.
//!
//! ```json
//! {
//!   "input_ids": [[37, 5, 1], [8, 1]],        // or "inputs_embeds": [[[..C floats..], ...], ...]
//!                                              // or "input_text": ["...", "..."] (tokenizer.json)
//!   "attention_mask": [[1, 1, 1], [1, 1]],     // optional; default 1 on every given position
//!   "labels": [[5, 1], [9, 9, 1]],             // or "target_text": ["...", "..."]; -100 = no loss
//!   "decoder_input_ids": [[0, 5], [0, 9, 9]]   // optional; default labels shifted right
//! }
//! ```
//!
//! For a decoder-only model (Llama) `labels` are Hugging Face's unshifted causal-LM labels: one
//! per input position (`labels[t]` is predicted by position `t − 1`), and neither
//! `target_text` nor `decoder_input_ids` exists.

use std::path::Path;

use serde_json::Value;

use super::{BatchSpec, EncoderInput, HostBatch};
use crate::error::{Error, Result};

/// Encodes texts with the tokenizer of the model folder (which appends EOS for T5).
pub type Encode<'a> = &'a dyn Fn(&str) -> Result<Vec<u32>>;

impl HostBatch {
    /// Reads a JSON batch file (format in the module docs). `encode` is only called for `input_text` / `target_text`.
    pub fn from_json_file(
        path: &Path,
        spec: impl Into<BatchSpec>,
        encode: Option<Encode<'_>>,
    ) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json_str(&text, path, spec, encode)
    }

    /// Parses a batch; `path` names the source in errors.
    pub fn from_json_str(
        text: &str,
        path: &Path,
        spec: impl Into<BatchSpec>,
        encode: Option<Encode<'_>>,
    ) -> Result<Self> {
        let cfg: BatchSpec = spec.into();
        let value: Value = serde_json::from_str(text)
            .map_err(|e| Error::format(path, format!("invalid JSON: {e}")))?;
        let Value::Object(obj) = &value else {
            return Err(Error::format(
                path,
                "expected a JSON object with the batch fields",
            ));
        };
        let field_err = |field: &str, msg: String| Error::config(path, field, msg);
        let known = [
            "input_ids",
            "inputs_embeds",
            "input_text",
            "attention_mask",
            "decoder_input_ids",
            "labels",
            "target_text",
        ];
        if let Some(k) = obj.keys().find(|k| !known.contains(&k.as_str())) {
            return Err(field_err(
                k,
                format!("unknown field; known: {}", known.join(", ")),
            ));
        }
        let one_of = |names: &[&'static str]| -> Result<&'static str> {
            let present: Vec<&str> = names
                .iter()
                .copied()
                .filter(|n| obj.contains_key(*n))
                .collect();
            match present.as_slice() {
                [one] => Ok(one),
                [] => Err(Error::format(
                    path,
                    format!("needs one of {}", names.join(", ")),
                )),
                many => Err(Error::format(
                    path,
                    format!(
                        "give only one of {} (found {})",
                        names.join(", "),
                        many.join(" and ")
                    ),
                )),
            }
        };
        let text_ids = |field: &str| -> Result<Vec<Vec<i64>>> {
            let encode = encode.ok_or_else(|| {
                field_err(field, "text needs the model folder's tokenizer.json".into())
            })?;
            let texts = obj[field]
                .as_array()
                .ok_or_else(|| field_err(field, "expected a list of strings".into()))?;
            texts
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    let t = t.as_str().ok_or_else(|| {
                        field_err(field, format!("row {i}: expected a string, found {t}"))
                    })?;
                    Ok(encode(t)?.into_iter().map(i64::from).collect())
                })
                .collect()
        };

        // Encoder input.
        let (rows, embeds) = match one_of(&["input_ids", "inputs_embeds", "input_text"])? {
            "input_ids" => (int_rows(&obj["input_ids"], "input_ids", path)?, None),
            "input_text" => (text_ids("input_text")?, None),
            _ => {
                let e = embed_rows(&obj["inputs_embeds"], cfg.d_model, path)?;
                (e.iter().map(|r| vec![0; r.len()]).collect(), Some(e))
            }
        };
        let b = rows.len();
        if b == 0 {
            return Err(Error::format(path, "the batch has no rows"));
        }
        let lens: Vec<usize> = rows.iter().map(Vec::len).collect();
        let t = *lens.iter().max().unwrap_or(&0);
        if let Some(i) = lens.iter().position(|&l| l == 0) {
            return Err(Error::format(path, format!("encoder row {i} is empty")));
        }
        let mask_rows = match obj.get("attention_mask") {
            Some(v) => {
                let m = int_rows(v, "attention_mask", path)?;
                same_lengths(&m, &lens, "attention_mask", path)?;
                m
            }
            None => lens.iter().map(|&l| vec![1; l]).collect(),
        };
        let attention_mask = pad(&mask_rows, t, 0);

        let Some(decoder_start) = cfg.decoder_start_token_id else {
            return decoder_only(obj, path, cfg, rows, embeds, lens, attention_mask);
        };

        // Decoder side.
        let label_rows = match one_of(&["labels", "target_text"])? {
            "labels" => int_rows(&obj["labels"], "labels", path)?,
            _ => text_ids("target_text")?,
        };
        if label_rows.len() != b {
            return Err(field_err(
                "labels",
                format!("{} rows, but the encoder input has {b}", label_rows.len()),
            ));
        }
        let dec_lens: Vec<usize> = label_rows.iter().map(Vec::len).collect();
        let td = *dec_lens.iter().max().unwrap_or(&0);
        if let Some(i) = dec_lens.iter().position(|&l| l == 0) {
            return Err(field_err("labels", format!("row {i} is empty")));
        }
        let dec_rows = match obj.get("decoder_input_ids") {
            Some(v) => {
                let d = int_rows(v, "decoder_input_ids", path)?;
                same_lengths(&d, &dec_lens, "decoder_input_ids", path)?;
                d
            }
            // Hugging Face's `_shift_right`: start token, then the labels with -100 as pad.
            None => label_rows
                .iter()
                .map(|r| {
                    std::iter::once(decoder_start as i64)
                        .chain(r[..r.len() - 1].iter().map(|&x| {
                            if x == -100 {
                                cfg.pad_token_id as i64
                            } else {
                                x
                            }
                        }))
                        .collect()
                })
                .collect(),
        };

        let v = cfg.vocab_size as i64;
        let check_ids = |rows: &[Vec<i64>], field: &str, allow_ignore: bool| -> Result<()> {
            for (i, r) in rows.iter().enumerate() {
                for &x in r {
                    if !((0..v).contains(&x) || (allow_ignore && x == -100)) {
                        return Err(field_err(
                            field,
                            format!("row {i}: id {x} is outside the vocabulary 0..{v}"),
                        ));
                    }
                }
            }
            Ok(())
        };
        if embeds.is_none() {
            check_ids(&rows, "input_ids", false)?;
        }
        check_ids(&label_rows, "labels", true)?;
        check_ids(&dec_rows, "decoder_input_ids", false)?;
        for (i, r) in mask_rows.iter().enumerate() {
            if r.iter().any(|&x| x != 0 && x != 1) {
                return Err(field_err(
                    "attention_mask",
                    format!("row {i}: only 0 and 1 are allowed"),
                ));
            }
        }

        let input = encoder_input(&rows, embeds, t, cfg);
        Ok(HostBatch {
            batch: b,
            enc_len: t,
            dec_len: td,
            input,
            attention_mask,
            decoder_input_ids: pad(&dec_rows, td, cfg.pad_token_id as i64),
            labels: pad(&label_rows, td, -100),
        })
    }
}

/// The rest of a decoder-only batch: `labels` aligned with the input rows (unshifted), no
/// decoder side (`dec_len` 0).
fn decoder_only(
    obj: &serde_json::Map<String, Value>,
    path: &Path,
    cfg: BatchSpec,
    rows: Vec<Vec<i64>>,
    embeds: Option<Vec<Vec<Vec<f32>>>>,
    lens: Vec<usize>,
    attention_mask: Vec<i32>,
) -> Result<HostBatch> {
    let field_err = |field: &str, msg: String| Error::config(path, field, msg);
    for field in ["target_text", "decoder_input_ids"] {
        if obj.contains_key(field) {
            return Err(field_err(
                field,
                "not used by a decoder-only model: give `labels` with one entry per input \
                 position (unshifted, -100 = no loss)"
                    .into(),
            ));
        }
    }
    let labels = obj
        .get("labels")
        .ok_or_else(|| Error::format(path, "needs `labels` (one per input position)"))?;
    let label_rows = int_rows(labels, "labels", path)?;
    same_lengths(&label_rows, &lens, "labels", path)?;
    let v = cfg.vocab_size as i64;
    for (field, rows, allow_ignore) in [("input_ids", &rows, false), ("labels", &label_rows, true)]
    {
        if field == "input_ids" && embeds.is_some() {
            continue;
        }
        for (i, r) in rows.iter().enumerate() {
            if let Some(x) = r
                .iter()
                .find(|&&x| !((0..v).contains(&x) || (allow_ignore && x == -100)))
            {
                return Err(field_err(
                    field,
                    format!("row {i}: id {x} is outside the vocabulary 0..{v}"),
                ));
            }
        }
    }
    if let Some(i) = attention_mask
        .chunks(lens.iter().copied().max().unwrap_or(1))
        .position(|r| r.iter().any(|&x| x != 0 && x != 1))
    {
        return Err(field_err(
            "attention_mask",
            format!("row {i}: only 0 and 1 are allowed"),
        ));
    }
    let (b, t) = (rows.len(), lens.iter().copied().max().unwrap_or(0));
    Ok(HostBatch {
        batch: b,
        enc_len: t,
        dec_len: 0,
        input: encoder_input(&rows, embeds, t, cfg),
        attention_mask,
        decoder_input_ids: Vec::new(),
        labels: pad(&label_rows, t, -100),
    })
}

/// Padded ids, or embeddings flattened to `(B, T, C)` with zero rows as padding.
fn encoder_input(
    rows: &[Vec<i64>],
    embeds: Option<Vec<Vec<Vec<f32>>>>,
    t: usize,
    cfg: BatchSpec,
) -> EncoderInput {
    match embeds {
        Some(e) => {
            let c = cfg.d_model;
            let mut flat = vec![0f32; rows.len() * t * c];
            for (i, row) in e.iter().enumerate() {
                for (j, x) in row.iter().enumerate() {
                    flat[(i * t + j) * c..][..c].copy_from_slice(x);
                }
            }
            EncoderInput::Embeds(flat)
        }
        None => EncoderInput::Ids(pad(rows, t, cfg.pad_token_id as i64)),
    }
}

/// Right-pads rows to `len` with `fill` and flattens them.
fn pad(rows: &[Vec<i64>], len: usize, fill: i64) -> Vec<i32> {
    rows.iter()
        .flat_map(|r| r.iter().copied().chain(std::iter::repeat(fill)).take(len))
        .map(|x| x as i32)
        .collect()
}

fn same_lengths(rows: &[Vec<i64>], lens: &[usize], field: &str, path: &Path) -> Result<()> {
    if rows.len() != lens.len() {
        return Err(Error::config(
            path,
            field,
            format!("{} rows, expected {}", rows.len(), lens.len()),
        ));
    }
    for (i, (r, &l)) in rows.iter().zip(lens).enumerate() {
        if r.len() != l {
            return Err(Error::config(
                path,
                field,
                format!("row {i} has {} values, expected {l}", r.len()),
            ));
        }
    }
    Ok(())
}

/// A list of lists of integers.
fn int_rows(v: &Value, field: &str, path: &Path) -> Result<Vec<Vec<i64>>> {
    let err = |msg: String| Error::config(path, field, msg);
    let rows = v
        .as_array()
        .ok_or_else(|| err(format!("expected a list of lists, found {v}")))?;
    rows.iter()
        .enumerate()
        .map(|(i, r)| {
            let r = r
                .as_array()
                .ok_or_else(|| err(format!("row {i}: expected a list, found {r}")))?;
            r.iter()
                .map(|x| {
                    x.as_i64()
                        .filter(|x| i32::try_from(*x).is_ok())
                        .ok_or_else(|| err(format!("row {i}: {x} is not a 32-bit integer")))
                })
                .collect()
        })
        .collect()
}

/// `inputs_embeds`: a list of rows, each a list of C-float vectors.
fn embed_rows(v: &Value, c: usize, path: &Path) -> Result<Vec<Vec<Vec<f32>>>> {
    let err = |msg: String| Error::config(path, "inputs_embeds", msg);
    let rows = v
        .as_array()
        .ok_or_else(|| err("expected a list of rows of vectors".into()))?;
    rows.iter()
        .enumerate()
        .map(|(i, r)| {
            let r = r
                .as_array()
                .ok_or_else(|| err(format!("row {i}: expected a list of vectors")))?;
            r.iter()
                .enumerate()
                .map(|(j, x)| {
                    let x = x.as_array().ok_or_else(|| {
                        err(format!(
                            "row {i}, position {j}: expected a list of {c} numbers"
                        ))
                    })?;
                    if x.len() != c {
                        return Err(err(format!(
                            "row {i}, position {j}: {} numbers, expected d_model = {c}",
                            x.len()
                        )));
                    }
                    x.iter()
                        .enumerate()
                        .map(|(k, y)| {
                            let v = y.as_f64().ok_or_else(|| {
                                err(format!("row {i}, position {j}: {y} is not a number"))
                            })?;
                            // A JSON number beyond f32 (|x| > 3.4e38) would become inf here and a
                            // NaN loss later: refuse it as the input error it is.
                            let f = v as f32;
                            if !f.is_finite() {
                                return Err(err(format!(
                                    "row {i}, position {j}, element {k}: {v:e} overflows f32 \
                                     (|x| ≤ {:e})",
                                    f32::MAX
                                )));
                            }
                            Ok(f)
                        })
                        .collect()
                })
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::T5Config;
    use crate::model::shapes::t5_shape;

    fn cfg() -> T5Config {
        t5_shape("t5-tiny").unwrap()
    }

    fn parse(text: &str) -> Result<HostBatch> {
        HostBatch::from_json_str(text, Path::new("batch.json"), &cfg(), None)
    }

    #[test]
    fn ragged_ids_are_padded_and_decoder_inputs_shifted() {
        let b =
            parse(r#"{"input_ids": [[5, 6, 1], [7, 1]], "labels": [[9, 1], [4, 4, 1]]}"#).unwrap();
        assert_eq!((b.batch, b.enc_len, b.dec_len), (2, 3, 3));
        assert_eq!(b.input, EncoderInput::Ids(vec![5, 6, 1, 7, 1, 0]));
        assert_eq!(b.attention_mask, vec![1, 1, 1, 1, 1, 0]);
        assert_eq!(b.labels, vec![9, 1, -100, 4, 4, 1]);
        assert_eq!(b.decoder_input_ids, vec![0, 9, 0, 0, 4, 4]);
    }

    #[test]
    fn explicit_mask_and_decoder_ids_are_kept() {
        let b = parse(
            r#"{"input_ids": [[5, 6]], "attention_mask": [[1, 0]], "labels": [[-100, 3]],
                "decoder_input_ids": [[0, 2]]}"#,
        )
        .unwrap();
        assert_eq!(b.attention_mask, vec![1, 0]);
        assert_eq!(b.decoder_input_ids, vec![0, 2]);
        assert_eq!(b.labels, vec![-100, 3]);
    }

    #[test]
    fn texts_go_through_the_tokenizer() {
        let encode =
            |t: &str| -> Result<Vec<u32>> { Ok(t.bytes().map(|b| (b % 50) as u32 + 2).collect()) };
        let b = HostBatch::from_json_str(
            r#"{"input_text": ["abc"], "target_text": ["de"]}"#,
            Path::new("b.json"),
            &cfg(),
            Some(&encode),
        )
        .unwrap();
        assert_eq!(b.input, EncoderInput::Ids(vec![49, 50, 51]));
        assert_eq!(b.labels, vec![2, 3]);
        let err = parse(r#"{"input_text": ["abc"], "labels": [[1]]}"#)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("input_text") && err.contains("tokenizer.json"),
            "{err}"
        );
    }

    #[test]
    fn embeds_are_checked_against_d_model() {
        let row = format!("[{}]", vec!["0.5"; 64].join(","));
        let ok = parse(&format!(
            r#"{{"inputs_embeds": [[{row}, {row}]], "labels": [[1]]}}"#
        ))
        .unwrap();
        match ok.input {
            EncoderInput::Embeds(e) => assert_eq!(e.len(), 2 * 64),
            other => panic!("expected embeds, got {other:?}"),
        }
        let err = parse(r#"{"inputs_embeds": [[[0.5, 1.0]]], "labels": [[1]]}"#)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("inputs_embeds") && err.contains("d_model = 64"),
            "{err}"
        );
    }

    /// A number JSON holds but f32 cannot (it would become inf, then a NaN loss) is refused,
    /// naming file, field, position and value; the largest f32 still passes.
    #[test]
    fn embeds_beyond_f32_are_refused() {
        let row = |x: &str| {
            let mut v = vec!["0.5"; 64];
            v[3] = x;
            format!("[{}]", v.join(","))
        };
        for bad in ["1e39", "-1e39", "3.5e38"] {
            let text = format!(
                r#"{{"inputs_embeds": [[{}, {}]], "labels": [[1]]}}"#,
                row("0.5"),
                row(bad)
            );
            let err = parse(&text).unwrap_err().to_string();
            assert!(
                err.contains("batch.json")
                    && err.contains("inputs_embeds")
                    && err.contains("position 1, element 3")
                    && err.contains(bad.trim_start_matches('-'))
                    && err.contains("overflows f32"),
                "{bad}: {err}"
            );
        }
        let max = format!("{:e}", f32::MAX);
        let text = format!(r#"{{"inputs_embeds": [[{}]], "labels": [[1]]}}"#, row(&max));
        assert!(parse(&text).is_ok(), "{max} fits f32");
    }

    #[test]
    fn bad_batches_name_the_file_field_and_value() {
        let cases = [
            (r#"{"labels": [[1]]}"#, "input_ids"),
            (
                r#"{"input_ids": [[1]], "input_text": ["a"], "labels": [[1]]}"#,
                "only one",
            ),
            (r#"{"input_ids": [[1]]}"#, "labels"),
            (r#"{"input_ids": [[1, 5000]], "labels": [[1]]}"#, "5000"),
            (r#"{"input_ids": [[1]], "labels": [[-5]]}"#, "-5"),
            (
                r#"{"input_ids": [[1, 2]], "attention_mask": [[1]], "labels": [[1]]}"#,
                "attention_mask",
            ),
            (
                r#"{"input_ids": [[1]], "attention_mask": [[2]], "labels": [[1]]}"#,
                "only 0 and 1",
            ),
            (r#"{"input_ids": [[1], [2]], "labels": [[1]]}"#, "1 rows"),
            (r#"{"input_ids": [[]], "labels": [[1]]}"#, "empty"),
            (r#"{"input_ids": [["a"]], "labels": [[1]]}"#, "\"a\""),
            (
                r#"{"input_ids": [[1]], "labels": [[1]], "extra": 1}"#,
                "extra",
            ),
            (r#"{"input_ids": [[1]], "labels": [[1]] "#, "invalid JSON"),
        ];
        for (text, needle) in cases {
            let err = parse(text).unwrap_err().to_string();
            assert!(
                err.contains("batch.json") && err.contains(needle),
                "{text}: {err}"
            );
        }
    }

    fn parse_llama(text: &str) -> Result<HostBatch> {
        let cfg = crate::model::shapes::llama_shape("llama-tiny").unwrap();
        HostBatch::from_json_str(text, Path::new("batch.json"), &cfg, None)
    }

    #[test]
    fn decoder_only_labels_align_with_the_input() {
        let b = parse_llama(
            r#"{"input_ids": [[1, 7, 8, 9], [1, 5]], "labels": [[-100, -100, 8, 9], [-100, 5]]}"#,
        )
        .unwrap();
        assert_eq!((b.batch, b.enc_len, b.dec_len), (2, 4, 0));
        // llama-tiny has no pad id: rows are padded with EOS (2), labels with -100.
        assert_eq!(b.input, EncoderInput::Ids(vec![1, 7, 8, 9, 1, 5, 2, 2]));
        assert_eq!(b.attention_mask, vec![1, 1, 1, 1, 1, 1, 0, 0]);
        assert_eq!(b.labels, vec![-100, -100, 8, 9, -100, 5, -100, -100]);
        assert!(b.decoder_input_ids.is_empty());
    }

    #[test]
    fn decoder_only_batches_reject_the_decoder_side() {
        for (text, field) in [
            (r#"{"input_ids": [[1, 7]], "labels": [[5]]}"#, "labels"),
            (
                r#"{"input_ids": [[1, 7]], "target_text": ["x"]}"#,
                "target_text",
            ),
            (
                r#"{"input_ids": [[1, 7]], "labels": [[1, 7]], "decoder_input_ids": [[0]]}"#,
                "decoder_input_ids",
            ),
            (
                r#"{"input_ids": [[1, 7]], "labels": [[1, 1000]]}"#,
                "labels",
            ),
            (
                r#"{"input_ids": [[1, 1000]], "labels": [[1, 7]]}"#,
                "input_ids",
            ),
        ] {
            let msg = parse_llama(text).unwrap_err().to_string();
            assert!(
                msg.contains("batch.json") && msg.contains(field),
                "{field}: {msg}"
            );
        }
    }
}
