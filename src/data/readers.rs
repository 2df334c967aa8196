//! Dataset readers: JSON Lines, tab-separated (GLUE) and comma-separated files into records of
//! named fields, each with the line it started on so that every error can name file, line and
//! field.
//!
//! - JSONL (`.jsonl`, `.json`): one JSON object per line, blank lines skipped. Values keep their
//!   JSON types (SuperGLUE labels are booleans, HF exports use integers, MultiRC/ReCoRD nest).
//! - TSV (`.tsv`): a header row, then one record per line split on tabs with **no quoting**: GLUE's
//!   TSVs contain literal `"` characters (MRPC, QQP), so a quote is text. Every row must have as
//!   many fields as the header. CoLA's train/dev files have no header; [`read_tsv_headerless`]
//!   reads them with given column names.
//! - CSV (`.csv`): a header row and RFC 4180 quoting (the `csv` crate), for custom tasks.
//!
//! TSV and CSV values are JSON strings. A file without records (empty, blank or header only) is an
//! error, so a bad path or an empty export is caught before any training starts.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};

/// One record: field name → value (TSV/CSV fields are JSON strings).
pub type Record = serde_json::Map<String, Value>;

/// A file's records with the 1-based line each started on (for errors).
#[derive(Debug, Clone, PartialEq)]
pub struct Records {
    pub path: PathBuf,
    pub rows: Vec<(usize, Record)>,
}

impl Records {
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

/// Reads a file into text, without a leading UTF-8 byte-order mark.
fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        let upto = &e.as_bytes()[..e.utf8_error().valid_up_to()];
        let line = 1 + upto.iter().filter(|&&b| b == b'\n').count();
        Error::format(path, format!("line {line}: not valid UTF-8"))
    })?;
    Ok(match text.strip_prefix('\u{feff}') {
        Some(rest) => rest.to_string(),
        None => text,
    })
}

/// Lines with their 1-based numbers, without the `\r` of CRLF files.
fn numbered_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.split('\n')
        .enumerate()
        .map(|(i, l)| (i + 1, l.strip_suffix('\r').unwrap_or(l)))
}

fn no_records(path: &Path, what: &str) -> Error {
    Error::format(path, format!("no records ({what})"))
}

/// A value shortened for an error message (long passages would drown the message).
pub fn show_value(v: &Value) -> String {
    let s = v.to_string();
    const MAX: usize = 80;
    if s.chars().count() <= MAX {
        s
    } else {
        let head: String = s.chars().take(MAX).collect();
        format!("{head}…")
    }
}

/// One JSON object per line; blank lines are skipped.
pub fn read_jsonl(path: &Path) -> Result<Records> {
    let text = read_text(path)?;
    let mut rows = Vec::new();
    for (line, l) in numbered_lines(&text) {
        if l.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(l).map_err(|e| {
            // serde counts lines within this one line; report the file's line and the column.
            let msg = e.to_string();
            let msg = msg.split(" at line ").next().unwrap_or(&msg).to_string();
            Error::format(
                path,
                format!("line {line}, column {}: invalid JSON: {msg}", e.column()),
            )
        })?;
        match v {
            Value::Object(map) => rows.push((line, map)),
            other => {
                return Err(Error::format(
                    path,
                    format!(
                        "line {line}: expected a JSON object, found {}",
                        show_value(&other)
                    ),
                ))
            }
        }
    }
    if rows.is_empty() {
        return Err(no_records(path, "the file is empty"));
    }
    Ok(Records {
        path: path.to_path_buf(),
        rows,
    })
}

/// Splits TSV data lines (after the header, if any) into records with the given column names.
fn tsv_rows<'a>(
    path: &Path,
    names: &[String],
    lines: impl Iterator<Item = (usize, &'a str)>,
) -> Result<Vec<(usize, Record)>> {
    let mut rows = Vec::new();
    for (line, l) in lines {
        if l.is_empty() {
            continue;
        }
        let fields: Vec<&str> = l.split('\t').collect();
        if fields.len() != names.len() {
            return Err(Error::format(
                path,
                format!(
                    "line {line}: expected {} tab-separated fields ({}), found {}",
                    names.len(),
                    names.join(", "),
                    fields.len()
                ),
            ));
        }
        let rec: Record = names
            .iter()
            .zip(fields)
            .map(|(n, f)| (n.clone(), Value::String(f.to_string())))
            .collect();
        rows.push((line, rec));
    }
    Ok(rows)
}

/// Column names must be unique, or a record would silently lose a field.
fn check_header(path: &Path, line: usize, names: &[String]) -> Result<()> {
    for (i, n) in names.iter().enumerate() {
        if names[..i].contains(n) {
            return Err(Error::format(
                path,
                format!("line {line}: header names column `{n}` twice"),
            ));
        }
    }
    Ok(())
}

/// A header row, then tab-separated rows; no quoting (a `"` is literal text, as in GLUE).
pub fn read_tsv(path: &Path) -> Result<Records> {
    let text = read_text(path)?;
    let mut lines = numbered_lines(&text).skip_while(|(_, l)| l.is_empty());
    let Some((hline, header)) = lines.next() else {
        return Err(no_records(path, "the file is empty"));
    };
    let names: Vec<String> = header.split('\t').map(str::to_string).collect();
    check_header(path, hline, &names)?;
    let rows = tsv_rows(path, &names, lines)?;
    if rows.is_empty() {
        return Err(no_records(path, "only a header"));
    }
    Ok(Records {
        path: path.to_path_buf(),
        rows,
    })
}

/// Tab-separated rows without a header row (CoLA's train.tsv / dev.tsv), named by `names`.
pub fn read_tsv_headerless(path: &Path, names: &[&str]) -> Result<Records> {
    let text = read_text(path)?;
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let rows = tsv_rows(path, &names, numbered_lines(&text))?;
    if rows.is_empty() {
        return Err(no_records(path, "the file is empty"));
    }
    Ok(Records {
        path: path.to_path_buf(),
        rows,
    })
}

/// The first non-empty line's tab-separated fields (to tell a header from data).
pub fn tsv_first_row(path: &Path) -> Result<Vec<String>> {
    let text = read_text(path)?;
    let first = numbered_lines(&text)
        .find(|(_, l)| !l.is_empty())
        .map(|(_, l)| l.split('\t').map(str::to_string).collect())
        .unwrap_or_default();
    Ok(first)
}

/// A header row, then comma-separated rows with RFC 4180 quoting.
pub fn read_csv(path: &Path) -> Result<Records> {
    let text = read_text(path)?;
    let csv_err = |e: csv::Error| {
        let line = e.position().map(|p| p.line()).unwrap_or(0);
        let msg = match e.kind() {
            csv::ErrorKind::UnequalLengths {
                expected_len, len, ..
            } => format!("expected {expected_len} comma-separated fields, found {len}"),
            _ => e.to_string(),
        };
        if line > 0 {
            Error::format(path, format!("line {line}: {msg}"))
        } else {
            Error::format(path, msg)
        }
    };
    let mut rdr = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(false)
        .from_reader(text.as_bytes());
    let names: Vec<String> = rdr
        .headers()
        .map_err(csv_err)?
        .iter()
        .map(str::to_string)
        .collect();
    if names.is_empty() || (names.len() == 1 && names[0].is_empty()) {
        return Err(no_records(path, "the file is empty"));
    }
    check_header(path, 1, &names)?;
    let mut rows = Vec::new();
    for rec in rdr.records() {
        let rec = rec.map_err(csv_err)?;
        let line = rec.position().map(|p| p.line() as usize).unwrap_or(0);
        // A blank line between records reads as one empty field; skip it like the other readers.
        if rec.len() == 1 && rec[0].is_empty() && names.len() > 1 {
            continue;
        }
        if rec.len() != names.len() {
            return Err(Error::format(
                path,
                format!(
                    "line {line}: expected {} comma-separated fields ({}), found {}",
                    names.len(),
                    names.join(", "),
                    rec.len()
                ),
            ));
        }
        let map: Record = names
            .iter()
            .zip(rec.iter())
            .map(|(n, f)| (n.clone(), Value::String(f.to_string())))
            .collect();
        rows.push((line, map));
    }
    if rows.is_empty() {
        return Err(no_records(path, "only a header"));
    }
    Ok(Records {
        path: path.to_path_buf(),
        rows,
    })
}

/// Reads by extension: `.jsonl` / `.json` (JSON Lines), `.tsv`, `.csv`.
pub fn read_records(path: &Path) -> Result<Records> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    match ext.as_deref() {
        Some("jsonl") | Some("json") => read_jsonl(path),
        Some("tsv") => read_tsv(path),
        Some("csv") => read_csv(path),
        _ => Err(Error::format(
            path,
            "unknown data file type: expected a .jsonl, .json, .tsv or .csv file",
        )),
    }
}

/// Where a value sits: file and line, for errors about one of its fields.
#[derive(Debug, Clone, Copy)]
pub struct Loc<'a> {
    pub path: &'a Path,
    pub line: usize,
}

impl Loc<'_> {
    /// An error about `field` (a dotted path for nested values) on this line.
    pub fn err(&self, field: &str, msg: impl std::fmt::Display) -> Error {
        Error::format(
            self.path,
            format!("line {}: field `{field}`: {msg}", self.line),
        )
    }

    /// A missing field, listing the fields the object does have.
    pub fn missing(&self, field: &str, obj: &Record) -> Error {
        let have: Vec<&str> = obj.keys().map(String::as_str).collect();
        self.err(
            field,
            format!("missing (the record has: {})", have.join(", ")),
        )
    }

    /// `obj[name]`, or an error naming the field.
    pub fn get<'r>(&self, obj: &'r Record, name: &str, shown: &str) -> Result<&'r Value> {
        obj.get(name).ok_or_else(|| self.missing(shown, obj))
    }

    /// A value as text: strings as they are, numbers and booleans written out.
    pub fn text(&self, v: &Value, field: &str) -> Result<String> {
        match v {
            Value::String(s) => Ok(s.clone()),
            Value::Number(n) => Ok(n.to_string()),
            Value::Bool(b) => Ok(b.to_string()),
            other => Err(self.err(field, format!("expected text, found {}", show_value(other)))),
        }
    }

    /// A value as an integer: a JSON integer (or integral float) or a string holding one.
    pub fn int(&self, v: &Value, field: &str) -> Result<i64> {
        let bad = || {
            self.err(
                field,
                format!("expected an integer, found {}", show_value(v)),
            )
        };
        match v {
            Value::Number(n) => n
                .as_i64()
                .or_else(|| {
                    n.as_f64()
                        .filter(|x| x.fract() == 0.0 && x.abs() < 9.0e15)
                        .map(|x| x as i64)
                })
                .ok_or_else(bad),
            Value::String(s) => s.trim().parse().map_err(|_| bad()),
            _ => Err(bad()),
        }
    }

    /// A value as a finite number: a JSON number or a string holding one.
    pub fn float(&self, v: &Value, field: &str) -> Result<f64> {
        let x = match v {
            Value::Number(n) => n.as_f64(),
            Value::String(s) => s.trim().parse::<f64>().ok(),
            _ => None,
        };
        x.filter(|x| x.is_finite())
            .ok_or_else(|| self.err(field, format!("expected a number, found {}", show_value(v))))
    }

    /// A value as a JSON array.
    pub fn array<'v>(&self, v: &'v Value, field: &str) -> Result<&'v Vec<Value>> {
        v.as_array()
            .ok_or_else(|| self.err(field, format!("expected an array, found {}", show_value(v))))
    }

    /// A value as a JSON object.
    pub fn object<'v>(&self, v: &'v Value, field: &str) -> Result<&'v Record> {
        v.as_object().ok_or_else(|| {
            self.err(
                field,
                format!("expected an object, found {}", show_value(v)),
            )
        })
    }
}

/// Field `name` as text (strings; numbers and booleans are written out), or an error naming file,
/// line and field.
pub fn field_str(rec: &Record, path: &Path, line: usize, name: &str) -> Result<String> {
    let loc = Loc { path, line };
    loc.text(loc.get(rec, name, name)?, name)
}

/// Field `name` as an integer (a JSON integer or a string holding one).
pub fn field_i64(rec: &Record, path: &Path, line: usize, name: &str) -> Result<i64> {
    let loc = Loc { path, line };
    loc.int(loc.get(rec, name, name)?, name)
}

/// Field `name` as a finite number (a JSON number or a string holding one).
pub fn field_f64(rec: &Record, path: &Path, line: usize, name: &str) -> Result<f64> {
    let loc = Loc { path, line };
    loc.float(loc.get(rec, name, name)?, name)
}

/// The first of `names` present in `rec` (GLUE TSVs and HF exports name fields differently).
pub fn find_field<'r, 'n>(rec: &'r Record, names: &[&'n str]) -> Option<(&'n str, &'r Value)> {
    names.iter().find_map(|&n| rec.get(n).map(|v| (n, v)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn tsv_keeps_quotes_and_counts_lines() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "a.tsv", "a\tb\r\n\"x\tsay \"hi\"\r\n\r\n1\t2\n");
        let r = read_tsv(&p).unwrap();
        assert_eq!(r.rows.len(), 2);
        assert_eq!(r.rows[0].0, 2);
        assert_eq!(r.rows[0].1["a"], "\"x");
        assert_eq!(r.rows[0].1["b"], "say \"hi\"");
        assert_eq!(r.rows[1].0, 4);
    }

    #[test]
    fn tsv_wrong_field_count_names_line() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "a.tsv", "a\tb\n1\t2\n3\n");
        let e = read_tsv(&p).unwrap_err().to_string();
        assert!(
            e.contains("a.tsv") && e.contains("line 3") && e.contains("found 1"),
            "{e}"
        );
    }

    #[test]
    fn csv_quotes_and_multiline_records() {
        let d = tempfile::tempdir().unwrap();
        let p = write(
            d.path(),
            "a.csv",
            "t,l\n\"a, b\",1\n\"two\nlines\",0\nc,1\n",
        );
        let r = read_csv(&p).unwrap();
        assert_eq!(r.rows.len(), 3);
        assert_eq!(r.rows[0].1["t"], "a, b");
        assert_eq!(r.rows[1].1["t"], "two\nlines");
        assert_eq!((r.rows[1].0, r.rows[2].0), (3, 5));
    }

    #[test]
    fn jsonl_errors_name_line() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "a.jsonl", "{\"a\": 1}\n\n[1]\n");
        let e = read_jsonl(&p).unwrap_err().to_string();
        assert!(e.contains("line 3") && e.contains("object"), "{e}");
        let p = write(d.path(), "b.jsonl", "\n  \n");
        assert!(read_jsonl(&p)
            .unwrap_err()
            .to_string()
            .contains("no records"));
    }

    #[test]
    fn field_helpers_convert_and_name_fields() {
        let rec: Record =
            serde_json::from_str(r#"{"s":"x","n":3,"b":true,"f":"2.5","o":{}}"#).unwrap();
        let p = Path::new("f.jsonl");
        assert_eq!(field_str(&rec, p, 1, "n").unwrap(), "3");
        assert_eq!(field_str(&rec, p, 1, "b").unwrap(), "true");
        assert_eq!(field_i64(&rec, p, 1, "n").unwrap(), 3);
        assert_eq!(field_f64(&rec, p, 1, "f").unwrap(), 2.5);
        let e = field_str(&rec, p, 7, "o").unwrap_err().to_string();
        assert!(e.contains("line 7") && e.contains("`o`"), "{e}");
        let e = field_i64(&rec, p, 7, "missing").unwrap_err().to_string();
        assert!(
            e.contains("`missing`") && e.contains("the record has"),
            "{e}"
        );
        let e = field_i64(&rec, p, 2, "s").unwrap_err().to_string();
        assert!(e.contains("\"x\""), "{e}");
    }

    #[test]
    fn unknown_extension_is_an_error() {
        let e = read_records(Path::new("data/x.parquet"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("x.parquet"), "{e}");
    }
}
