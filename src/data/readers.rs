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
//! - CSV (`.csv`): a header row and RFC 4180 quoting, for custom tasks, read strictly: a quote
//!   left open, or text after a closing quote, is an error naming the line where the quote
//!   opened (a lenient reader lets such a quote swallow the rows after it into one field).
//!
//! TSV and CSV values are JSON strings. A file without records (empty, blank or header only) is an
//! error, so a bad path or an empty export is caught before any training starts.
//!
//! Files are read line by line, never whole: a line (a CSV record) longer than
//! [`MAX_LINE_BYTES`] is an error naming file and line, read without buffering more than the
//! limit; a NUL byte or invalid UTF-8 is an error naming the line and byte offset.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::columnar;
use crate::error::{Error, Result};

/// One record: field name → value (TSV/CSV fields are JSON strings).
pub type Record = serde_json::Map<String, Value>;

/// How a file numbers its records in errors: text files by 1-based line, Parquet / Arrow files
/// by 0-based row (the index `datasets` gives it within the file).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Line,
    Row,
}

/// A file's records, each with the line it started on or its row (see [`Unit`]), for errors.
/// A split read from several files (Parquet shards, `save_to_disk` Arrow files) holds them in
/// order; `parts` says where each file's rows start.
#[derive(Debug, Clone, PartialEq)]
pub struct Records {
    /// The (first) file read.
    pub path: PathBuf,
    /// (line or row within its file, record).
    pub rows: Vec<(usize, Record)>,
    /// How the numbers in `rows` count.
    pub unit: Unit,
    /// The files after the first: (index in `rows` of the file's first record, file).
    pub parts: Vec<(usize, PathBuf)>,
}

impl Records {
    /// The records of one text file, numbered by line.
    pub fn lines(path: &Path, rows: Vec<(usize, Record)>) -> Self {
        Records {
            path: path.to_path_buf(),
            rows,
            unit: Unit::Line,
            parts: Vec::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The file that holds `rows[i]`.
    pub fn path_of(&self, i: usize) -> &Path {
        // The last part starting at or before i.
        let k = self.parts.partition_point(|(start, _)| *start <= i);
        match k {
            0 => &self.path,
            k => &self.parts[k - 1].1,
        }
    }

    /// Each record with its location (file and line or row) for errors.
    pub fn iter(&self) -> impl Iterator<Item = (Loc<'_>, &Record)> {
        self.rows.iter().enumerate().map(move |(i, (n, rec))| {
            let loc = Loc {
                path: self.path_of(i),
                line: *n,
                unit: self.unit,
            };
            (loc, rec)
        })
    }

    /// The records of several files of one split, in order (an empty list gives None).
    /// All files must number their records the same way.
    pub fn concat(files: Vec<Records>) -> Option<Records> {
        let mut it = files.into_iter();
        let mut all = it.next()?;
        for r in it {
            all.parts.push((all.rows.len(), r.path));
            let base = all.rows.len();
            all.parts
                .extend(r.parts.into_iter().map(|(start, p)| (base + start, p)));
            all.rows.extend(r.rows);
        }
        Some(all)
    }
}

/// The longest line a data file may have (a CSV record: all its lines together). Reading stops
/// at this many bytes of one line, so a file without newlines is never buffered whole.
pub const MAX_LINE_BYTES: usize = 64 << 20;

/// A data file's lines, read one at a time with at most `limit` bytes each, checked for NUL
/// bytes and UTF-8 (errors name file, line and byte offset). The first line loses a leading
/// byte-order mark.
pub struct Lines {
    path: PathBuf,
    reader: BufReader<File>,
    limit: usize,
    /// 1-based number of the line last returned.
    line: usize,
    /// Byte offset of the next line's start.
    offset: u64,
    /// The bytes of the line being read, `\n` included.
    buf: Vec<u8>,
}

/// One line: its 1-based number, its text without `\n` (a CRLF file's `\r` is kept), and
/// whether a `\n` ended it (the last line of a file may have none).
pub struct Line<'a> {
    pub number: usize,
    pub text: &'a str,
    pub newline: bool,
}

impl Lines {
    /// Opens `path` with the line limit [`MAX_LINE_BYTES`].
    pub fn open(path: &Path) -> Result<Self> {
        Self::with_limit(path, MAX_LINE_BYTES)
    }

    /// Opens `path` with a line limit of `limit` bytes.
    pub fn with_limit(path: &Path, limit: usize) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        Ok(Lines {
            path: path.to_path_buf(),
            reader: BufReader::new(file),
            limit,
            line: 0,
            offset: 0,
            buf: Vec::new(),
        })
    }

    /// The next line, or `None` at the end of the file.
    pub fn next_line(&mut self) -> Result<Option<Line<'_>>> {
        self.buf.clear();
        let start = self.offset;
        let number = self.line + 1;
        // One byte past the limit tells a line of exactly `limit` bytes from a longer one.
        let max = (self.limit as u64).saturating_add(1);
        let n = (&mut self.reader)
            .take(max)
            .read_until(b'\n', &mut self.buf)
            .map_err(|e| Error::io(&self.path, e))?;
        if n == 0 {
            return Ok(None);
        }
        let newline = self.buf.last() == Some(&b'\n');
        let len = self.buf.len() - usize::from(newline);
        if len > self.limit {
            return Err(Error::format(
                &self.path,
                format!(
                    "line {number} (byte offset {start}): longer than the limit of {} bytes ({}); \
                     is this a text data file with one record per line?",
                    self.limit,
                    show_bytes(self.limit)
                ),
            ));
        }
        self.line = number;
        self.offset += n as u64;
        let mut bytes = &self.buf[..len];
        if number == 1 {
            bytes = bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(bytes);
        }
        let text = std::str::from_utf8(bytes).map_err(|e| {
            let at = start + (len - bytes.len() + e.valid_up_to()) as u64;
            // A UTF-16 byte-order mark: a file saved as "Unicode" by some editors.
            let utf16 =
                number == 1 && (bytes.starts_with(b"\xff\xfe") || bytes.starts_with(b"\xfe\xff"));
            Error::format(
                &self.path,
                format!(
                    "line {number} (byte offset {at}): not valid UTF-8{}; data files must be \
                     UTF-8 text",
                    if utf16 { " (a UTF-16 file)" } else { "" }
                ),
            )
        })?;
        // After the UTF-8 check, so that a UTF-16 file is named as such.
        if let Some(i) = bytes.iter().position(|&b| b == 0) {
            let at = start + (len - bytes.len() + i) as u64;
            return Err(Error::format(
                &self.path,
                format!(
                    "line {number} (byte offset {at}): a NUL byte; a data file is text \
                     (JSON Lines, TSV or CSV), not binary"
                ),
            ));
        }
        Ok(Some(Line {
            number,
            text,
            newline,
        }))
    }
}

/// A byte count for messages: "64 MiB".
fn show_bytes(n: usize) -> String {
    if n >= 1 << 20 && n.is_multiple_of(1 << 20) {
        format!("{} MiB", n >> 20)
    } else {
        format!("{n} bytes")
    }
}

/// A line without the `\r` of CRLF files.
fn strip_cr(l: &str) -> &str {
    l.strip_suffix('\r').unwrap_or(l)
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
    let mut lines = Lines::open(path)?;
    let mut rows = Vec::new();
    while let Some(Line {
        number: line,
        text: l,
        ..
    }) = lines.next_line()?
    {
        let l = strip_cr(l);
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
    Ok(Records::lines(path, rows))
}

/// Splits the TSV data lines still in `lines` (after the header, if any) into records with the
/// given column names.
fn tsv_rows(path: &Path, names: &[String], lines: &mut Lines) -> Result<Vec<(usize, Record)>> {
    let mut rows = Vec::new();
    while let Some(Line {
        number: line,
        text: l,
        ..
    }) = lines.next_line()?
    {
        let l = strip_cr(l);
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

/// The first non-empty line's number and tab-separated fields.
fn tsv_header(lines: &mut Lines) -> Result<Option<(usize, Vec<String>)>> {
    while let Some(l) = lines.next_line()? {
        let text = strip_cr(l.text);
        if !text.is_empty() {
            return Ok(Some((
                l.number,
                text.split('\t').map(str::to_string).collect(),
            )));
        }
    }
    Ok(None)
}

/// A header row, then tab-separated rows; no quoting (a `"` is literal text, as in GLUE).
pub fn read_tsv(path: &Path) -> Result<Records> {
    let mut lines = Lines::open(path)?;
    let Some((hline, names)) = tsv_header(&mut lines)? else {
        return Err(no_records(path, "the file is empty"));
    };
    check_header(path, hline, &names)?;
    let rows = tsv_rows(path, &names, &mut lines)?;
    if rows.is_empty() {
        return Err(no_records(path, "only a header"));
    }
    Ok(Records::lines(path, rows))
}

/// Tab-separated rows without a header row (CoLA's train.tsv / dev.tsv), named by `names`.
pub fn read_tsv_headerless(path: &Path, names: &[&str]) -> Result<Records> {
    let mut lines = Lines::open(path)?;
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let rows = tsv_rows(path, &names, &mut lines)?;
    if rows.is_empty() {
        return Err(no_records(path, "the file is empty"));
    }
    Ok(Records::lines(path, rows))
}

/// The first non-empty line's tab-separated fields (to tell a header from data); reads only
/// up to that line.
pub fn tsv_first_row(path: &Path) -> Result<Vec<String>> {
    let mut lines = Lines::open(path)?;
    Ok(tsv_header(&mut lines)?.map(|(_, f)| f).unwrap_or_default())
}

/// Where the CSV parser is within a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CsvState {
    /// At the start of a field.
    Start,
    /// In a field that did not start with a quote (a `"` in it is text).
    Unquoted,
    /// In a quoted field, opened on this line.
    Quoted { open: usize },
    /// Just after a `"` in a quoted field: the closing quote, or the first of a doubled `""`.
    QuoteInQuoted { open: usize },
}

/// Comma-separated records with RFC 4180 quoting, parsed strictly: a quoted field must be
/// closed before the end of the file and followed by a comma or the end of the record, so a
/// stray quote cannot silently swallow the lines after it (the `csv` crate's lenient reading
/// merges them into one field). Line ends are `\n`, `\r\n` or a lone `\r` outside quotes (as
/// the `csv` crate); inside quotes they are kept as they are. Blank lines are skipped.
struct CsvRecords {
    lines: Lines,
    path: PathBuf,
}

impl CsvRecords {
    /// The next record's first line and fields, or `None` at the end of the file.
    fn next_record(&mut self) -> Result<Option<(usize, Vec<String>)>> {
        let limit = self.lines.limit;
        let mut fields: Vec<String> = Vec::new();
        let mut field = String::new();
        let mut state = CsvState::Start;
        // The record's first line; None until a character of it is seen.
        let mut first: Option<usize> = None;
        let mut bytes = 0usize;
        loop {
            let Some(line) = self.lines.next_line()? else {
                return match (state, first) {
                    (CsvState::Quoted { open }, Some(_)) => Err(Error::format(
                        &self.path,
                        format!(
                            "line {open}: a quoted field opens here and is never closed: the \
                             quote swallows every line after it (up to line {}); close it or \
                             double a quote inside it as \"\"",
                            self.lines.line
                        ),
                    )),
                    (_, Some(start)) => {
                        fields.push(field);
                        Ok(Some((start, fields)))
                    }
                    (_, None) => Ok(None),
                };
            };
            let number = line.number;
            bytes = bytes.saturating_add(line.text.len() + 1);
            if bytes > limit.saturating_add(1) {
                return Err(Error::format(
                    &self.path,
                    format!(
                        "line {}: a record longer than the limit of {} ({}); an unclosed quote?",
                        first.unwrap_or(number),
                        show_bytes(limit),
                        match state {
                            CsvState::Quoted { open } | CsvState::QuoteInQuoted { open } =>
                                format!("the quoted field opened on line {open} is still open"),
                            _ => "the record has no end".to_string(),
                        }
                    ),
                ));
            }
            let mut chars = line.text.chars().peekable();
            while let Some(c) = chars.next() {
                // A CR alone (a CRLF blank line) does not start a record.
                if c != '\r' {
                    first.get_or_insert(number);
                }
                match (state, c) {
                    (CsvState::Start, '"') => state = CsvState::Quoted { open: number },
                    (CsvState::Start | CsvState::Unquoted, ',')
                    | (CsvState::QuoteInQuoted { .. }, ',') => {
                        fields.push(std::mem::take(&mut field));
                        state = CsvState::Start;
                    }
                    (
                        CsvState::Start | CsvState::Unquoted | CsvState::QuoteInQuoted { .. },
                        '\r',
                    ) => {
                        // A record ends at a CR; a lone CR followed by more text starts the next
                        // record on this line, which this line-based reader does not split.
                        if chars.peek().is_some() {
                            return Err(Error::format(
                                &self.path,
                                format!(
                                    "line {number}: a carriage return (\\r) inside a line; \
                                     save the file with \\n or \\r\\n line ends"
                                ),
                            ));
                        }
                    }
                    (CsvState::Start | CsvState::Unquoted, c) => {
                        field.push(c);
                        state = CsvState::Unquoted;
                    }
                    (CsvState::Quoted { open }, '"') => state = CsvState::QuoteInQuoted { open },
                    (CsvState::Quoted { .. }, c) => field.push(c),
                    (CsvState::QuoteInQuoted { open }, '"') => {
                        field.push('"');
                        state = CsvState::Quoted { open };
                    }
                    (CsvState::QuoteInQuoted { open }, c) => {
                        return Err(Error::format(
                            &self.path,
                            format!(
                                "line {number}: text ({c:?}) after the closing quote of field {} \
                                 (its quote opened on line {open}); a stray quote? Quote the \
                                 whole field and double the quotes inside it as \"\"",
                                fields.len() + 1
                            ),
                        ))
                    }
                }
            }
            match state {
                CsvState::Quoted { .. } => {
                    if line.newline {
                        field.push('\n');
                    }
                }
                _ => match first {
                    // A blank line: no record yet.
                    None => {}
                    Some(start) => {
                        fields.push(field);
                        return Ok(Some((start, fields)));
                    }
                },
            }
        }
    }
}

/// A header row, then comma-separated rows with RFC 4180 quoting (strict: see [`CsvRecords`]).
pub fn read_csv(path: &Path) -> Result<Records> {
    let mut rdr = CsvRecords {
        lines: Lines::open(path)?,
        path: path.to_path_buf(),
    };
    let Some((hline, names)) = rdr.next_record()? else {
        return Err(no_records(path, "the file is empty"));
    };
    if names.is_empty() || (names.len() == 1 && names[0].is_empty()) {
        return Err(no_records(path, "the file is empty"));
    }
    check_header(path, hline, &names)?;
    let mut rows = Vec::new();
    while let Some((line, rec)) = rdr.next_record()? {
        // A line holding only `""` reads as one empty field; skip it like a blank line.
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
            .cloned()
            .zip(rec.into_iter().map(Value::String))
            .collect();
        rows.push((line, map));
    }
    if rows.is_empty() {
        return Err(no_records(path, "only a header"));
    }
    Ok(Records::lines(path, rows))
}

/// Reads by extension: `.jsonl` / `.json` (JSON Lines), `.tsv`, `.csv`, `.parquet`, `.arrow`
/// (Arrow IPC, stream or file format); a folder is a `datasets` `save_to_disk` folder or a folder
/// of Parquet files (see [`columnar::read_dataset_dir`]).
pub fn read_records(path: &Path) -> Result<Records> {
    if path.is_dir() {
        return columnar::read_dataset_dir(path);
    }
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    match ext.as_deref() {
        Some("jsonl") | Some("json") => read_jsonl(path),
        Some("tsv") => read_tsv(path),
        Some("csv") => read_csv(path),
        Some("parquet") => columnar::read_parquet(path),
        Some("arrow") => columnar::read_arrow(path),
        _ => Err(Error::format(
            path,
            "unknown data file type: expected a .jsonl, .json, .tsv, .csv, .parquet or .arrow \
             file, or a datasets save_to_disk folder",
        )),
    }
}

/// Where a value sits: file and line (text files) or row (Parquet / Arrow), for errors about one
/// of its fields.
#[derive(Debug, Clone, Copy)]
pub struct Loc<'a> {
    pub path: &'a Path,
    /// The line (1-based) or row (0-based), as `unit` says.
    pub line: usize,
    pub unit: Unit,
}

impl<'a> Loc<'a> {
    /// A line of a text file.
    pub fn at_line(path: &'a Path, line: usize) -> Self {
        Loc {
            path,
            line,
            unit: Unit::Line,
        }
    }

    /// An error about `field` (a dotted path for nested values) on this line or row.
    pub fn err(&self, field: &str, msg: impl std::fmt::Display) -> Error {
        let at = match self.unit {
            Unit::Line => format!("line {}: field `{field}`", self.line),
            Unit::Row => format!("row {}: column `{field}`", self.line),
        };
        Error::format(self.path, format!("{at}: {msg}"))
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
    let loc = Loc::at_line(path, line);
    loc.text(loc.get(rec, name, name)?, name)
}

/// Field `name` as an integer (a JSON integer or a string holding one).
pub fn field_i64(rec: &Record, path: &Path, line: usize, name: &str) -> Result<i64> {
    let loc = Loc::at_line(path, line);
    loc.int(loc.get(rec, name, name)?, name)
}

/// Field `name` as a finite number (a JSON number or a string holding one).
pub fn field_f64(rec: &Record, path: &Path, line: usize, name: &str) -> Result<f64> {
    let loc = Loc::at_line(path, line);
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
        let e = read_records(Path::new("data/x.feather"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("x.feather") && e.contains(".parquet"), "{e}");
    }
}
