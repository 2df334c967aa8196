//! Parquet and Arrow IPC data files (what the Hugging Face Hub and `datasets` write) read into the
//! same [`Records`] as the text readers, and the folder layouts a split is found in.
//!
//! - Values: strings (utf8, large_string, string_view, dictionary-encoded), integers (i8..i64,
//!   u8..u64), floats (f16/f32/f64; NaN and ±inf become null, as JSON has no such numbers),
//!   booleans and nulls become the JSON value; lists (list, large_list, fixed_size_list) become
//!   arrays and structs objects, nested to any depth (MultiRC's `idx`, ReCoRD's `entities`). Other
//!   types (binary, dates, decimals, maps, unions) are an error naming file, column and type: drop
//!   such a column before saving (`ds.remove_columns`).
//! - Records are numbered by their 0-based row within the file (as `datasets` indexes them), so an
//!   error names file, row and column.
//! - `.arrow` files are Arrow IPC in the stream format (`datasets`' `save_to_disk`) or the file
//!   format (starting with `ARROW1`).
//! - Sizes: a file's rows are capped at [`MAX_ROWS`] and at one row per byte of the file (plus
//!   [`ROW_SLACK`]): a real text row takes several bytes, so a larger count is a corrupt or
//!   hostile size and is refused before it is decoded (memory grows with the rows actually read).
//!   Parquet column chunks must lie inside the file before any is read.
//!
//! # Split layouts ([`find_split`])
//! For split `s` (train, validation, validation_matched, test, …) in a folder `dir`, the first of:
//! 1. `dir/s.parquet`, or `dir/s-00000-of-0000N.parquet` … (all N shards, in order; the Hub may
//!    append a hash: `s-00000-of-00002-1a2b.parquet`; a missing shard is an error naming it), or
//!    other `dir/s-*.parquet` files (in name order);
//! 2. the same under `dir/data/` (the Hub's `data/{split}-*.parquet`);
//! 3. `dir/s/`: a `datasets` `save_to_disk` split (`state.json` lists its `data-*.arrow` files in
//!    order; `dataset_dict.json` in `dir` makes `dir` a `DatasetDict`), or a folder of
//!    `*.parquet` files (the Hub's parquet conversion, `{split}/0000.parquet`).

use std::cell::Cell;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Once;

use arrow_array::cast::AsArray;
use arrow_array::types::{
    Float16Type, Float32Type, Float64Type, Int16Type, Int32Type, Int64Type, Int8Type, UInt16Type,
    UInt32Type, UInt64Type, UInt8Type,
};
use arrow_array::{Array, OffsetSizeTrait, RecordBatch};
use arrow_schema::DataType;
use parquet::arrow::arrow_reader::{
    ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReaderBuilder,
};
use parquet::file::metadata::{PageIndexPolicy, ParquetMetaData};
use serde_json::Value;

use super::readers::{Record, Records, Unit};
use crate::error::{Error, Result};

/// The most rows one Parquet or Arrow file may hold (ten times the largest GLUE/SuperGLUE split).
pub const MAX_ROWS: u64 = 10_000_000;
/// Rows a file may hold beyond one per byte (tiny files of short rows).
pub const ROW_SLACK: u64 = 4096;
/// Rows decoded at a time.
const BATCH_ROWS: usize = 1024;
/// The largest `state.json` read.
const MAX_STATE_BYTES: u64 = 16 << 20;
/// The most shards a split may declare (`-of-NNNNN` has five digits on the Hub).
const MAX_SHARDS: u64 = 100_000;

/// The rows a file of `file_len` bytes may hold.
fn row_limit(file_len: u64) -> u64 {
    file_len.saturating_add(ROW_SLACK).min(MAX_ROWS)
}

thread_local! {
    /// Set while this thread runs a decoder under [`guarded`]: its panics are errors, not news.
    static IN_DECODER: Cell<bool> = const { Cell::new(false) };
}

/// Runs a third-party decoder on a file's bytes: a panic inside it (corrupt data it did not
/// expect) becomes an error naming the file instead of taking the process down, and the
/// panic hook stays quiet about it (the error says it all).
fn guarded<T>(path: &Path, what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    static QUIET_HOOK: Once = Once::new();
    QUIET_HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !IN_DECODER.with(Cell::get) {
                previous(info);
            }
        }));
    });
    IN_DECODER.with(|d| d.set(true));
    let result = catch_unwind(AssertUnwindSafe(f));
    IN_DECODER.with(|d| d.set(false));
    result.unwrap_or_else(|payload| {
        let msg = payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        Err(Error::format(
            path,
            format!("not a readable {what} file: its decoder failed ({msg}); is the file corrupt?"),
        ))
    })
}

/// A Parquet file's records.
pub fn read_parquet(path: &Path) -> Result<Records> {
    guarded(path, "Parquet", || read_parquet_inner(path))
}

fn read_parquet_inner(path: &Path) -> Result<Records> {
    // The whole file, read as it arrives (no size from the file is trusted): the decoder then
    // slices it, and every range it asks for is checked against it.
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(|e| Error::io(path, e))?;
    let data = bytes::Bytes::from(bytes);
    let bad = |e: parquet::errors::ParquetError| {
        Error::format(path, format!("not a readable Parquet file: {e}"))
    };
    let options = ArrowReaderOptions::new().with_page_index_policy(PageIndexPolicy::Skip);
    let meta = ArrowReaderMetadata::load(&data, options).map_err(bad)?;
    let total = check_parquet_metadata(path, meta.metadata(), &data)?;
    let names = column_names(path, meta.schema().fields())?;
    let reader = ParquetRecordBatchReaderBuilder::new_with_metadata(data, meta)
        .with_batch_size(BATCH_ROWS)
        .build()
        .map_err(bad)?;
    // Bounded by the checked row count, and by one batch before any data is decoded.
    let mut rows = Vec::with_capacity((total as usize).min(BATCH_ROWS));
    for batch in reader {
        let batch =
            batch.map_err(|e| Error::format(path, format!("not a readable Parquet file: {e}")))?;
        append_batch(path, &names, &batch, total, &mut rows)?;
    }
    if (rows.len() as u64) != total {
        return Err(Error::format(
            path,
            format!(
                "the file's metadata says {total} rows, its data holds {}; is the file corrupt?",
                rows.len()
            ),
        ));
    }
    finish(path, rows)
}

/// Checks the metadata's sizes before any data is decoded: the row count (see the module docs),
/// every column chunk's byte range inside the file, and its pages' sizes ([`check_pages`]).
/// Returns the row count.
fn check_parquet_metadata(path: &Path, meta: &ParquetMetaData, data: &[u8]) -> Result<u64> {
    let file_len = data.len() as u64;
    let mut total: u64 = 0;
    for (g, rg) in meta.row_groups().iter().enumerate() {
        let n = u64::try_from(rg.num_rows()).map_err(|_| {
            Error::format(
                path,
                format!("row group {g}: a negative row count ({})", rg.num_rows()),
            )
        })?;
        total = total.saturating_add(n);
        for c in rg.columns() {
            let start = c.dictionary_page_offset().unwrap_or(c.data_page_offset());
            let len = c.compressed_size();
            let end = u64::try_from(start)
                .ok()
                .zip(u64::try_from(len).ok())
                .and_then(|(s, l)| s.checked_add(l));
            let chunk = match end {
                Some(e) if e <= file_len => data.get(start as usize..e as usize),
                _ => None,
            };
            let Some(chunk) = chunk else {
                return Err(Error::format(
                    path,
                    format!(
                        "row group {g}, column `{}`: its data (offset {start}, {len} bytes) lies \
                         outside the file ({file_len} bytes); is the file truncated?",
                        c.column_path()
                    ),
                ));
            };
            check_pages(chunk).map_err(|msg| {
                Error::format(
                    path,
                    format!(
                        "row group {g}, column `{}`: {msg}; is the file corrupt?",
                        c.column_path()
                    ),
                )
            })?;
        }
    }
    let limit = row_limit(file_len);
    if total > limit {
        return Err(Error::format(
            path,
            format!(
                "the metadata claims {total} rows, more than a file of {file_len} bytes can hold \
                 (at most {limit}; fastpt reads at most {MAX_ROWS} rows per file); is the file \
                 corrupt?"
            ),
        ));
    }
    Ok(total)
}

/// The most a page may grow when decompressed, per compressed byte (deflate's limit is about
/// 1032; snappy's and lz4's are lower), and the size any page may have regardless.
const MAX_INFLATION: u64 = 1100;
const PAGE_SLACK: u64 = 1 << 20;

/// Walks the page headers of one column chunk (Thrift compact protocol): every page lies inside
/// the chunk, and its uncompressed size is one a codec can produce from its compressed bytes. The
/// decoder reserves a page's uncompressed size before decompressing, so a corrupt size would
/// otherwise be an allocation of up to 2 GiB.
fn check_pages(chunk: &[u8]) -> std::result::Result<(), String> {
    let mut pos = 0usize;
    while pos < chunk.len() {
        let mut t = Thrift {
            buf: chunk,
            pos,
            depth: 0,
        };
        let (uncompressed, compressed) = t.page_header()?;
        let (Ok(u), Ok(c)) = (u64::try_from(uncompressed), usize::try_from(compressed)) else {
            return Err(format!(
                "a page at chunk byte {pos} has negative sizes ({uncompressed}, {compressed})"
            ));
        };
        let end = t.pos.checked_add(c).filter(|&e| e <= chunk.len());
        let Some(end) = end else {
            return Err(format!(
                "a page at chunk byte {pos} ({c} bytes) runs past the column chunk"
            ));
        };
        if u > (c as u64).saturating_mul(MAX_INFLATION).max(PAGE_SLACK) {
            return Err(format!(
                "a page at chunk byte {pos} claims {u} bytes uncompressed from {c} compressed"
            ));
        }
        pos = end;
    }
    Ok(())
}

/// A reader of the Thrift compact protocol, just enough for a Parquet page header: its first
/// three fields, and skipping any other value.
struct Thrift<'a> {
    buf: &'a [u8],
    pos: usize,
    depth: usize,
}

impl Thrift<'_> {
    fn byte(&mut self) -> std::result::Result<u8, String> {
        let b = *self
            .buf
            .get(self.pos)
            .ok_or("a page header runs past the column chunk")?;
        self.pos += 1;
        Ok(b)
    }

    fn varint(&mut self) -> std::result::Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..70).step_by(7) {
            let b = self.byte()?;
            v |= u64::from(b & 0x7f) << shift.min(63);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("a page header holds a malformed number".to_string())
    }

    fn zigzag(&mut self) -> std::result::Result<i64, String> {
        let n = self.varint()?;
        Ok((n >> 1) as i64 ^ -((n & 1) as i64))
    }

    fn skip_bytes(&mut self, n: u64) -> std::result::Result<(), String> {
        let end = usize::try_from(n)
            .ok()
            .and_then(|n| self.pos.checked_add(n))
            .filter(|&e| e <= self.buf.len())
            .ok_or("a page header runs past the column chunk")?;
        self.pos = end;
        Ok(())
    }

    /// Skips one value of compact type `ty`.
    fn skip(&mut self, ty: u8) -> std::result::Result<(), String> {
        match ty {
            1 | 2 => Ok(()),
            3 => self.skip_bytes(1),
            4..=6 => self.varint().map(|_| ()),
            7 => self.skip_bytes(8),
            8 => {
                let n = self.varint()?;
                self.skip_bytes(n)
            }
            9 | 10 => {
                let h = self.byte()?;
                let n = match h >> 4 {
                    15 => self.varint()?,
                    n => u64::from(n),
                };
                self.skip_many(n, &[h & 0x0f])
            }
            11 => {
                let n = self.varint()?;
                if n == 0 {
                    return Ok(());
                }
                let kv = self.byte()?;
                self.skip_many(n, &[kv >> 4, kv & 0x0f])
            }
            12 => self.skip_struct(),
            _ => Err(format!("a page header holds an unknown Thrift type {ty}")),
        }
    }

    /// Skips `n` elements, each of `types` in turn (booleans in containers take a byte).
    fn skip_many(&mut self, n: u64, types: &[u8]) -> std::result::Result<(), String> {
        for _ in 0..n {
            // Each element takes at least a byte, so a corrupt count ends at the chunk's end.
            if self.pos >= self.buf.len() {
                return Err("a page header runs past the column chunk".to_string());
            }
            for &t in types {
                if t == 1 || t == 2 {
                    self.skip_bytes(1)?;
                } else {
                    self.skip(t)?;
                }
            }
        }
        Ok(())
    }

    fn nested<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> std::result::Result<T, String>,
    ) -> std::result::Result<T, String> {
        if self.depth >= 32 {
            return Err("a page header nests too deeply".to_string());
        }
        self.depth += 1;
        let r = f(self);
        self.depth -= 1;
        r
    }

    /// The next field's (id, type), or None at the struct's end.
    fn field(&mut self, last: &mut i64) -> std::result::Result<Option<(i64, u8)>, String> {
        let h = self.byte()?;
        let ty = h & 0x0f;
        if ty == 0 {
            return Ok(None);
        }
        let id = match h >> 4 {
            0 => self.zigzag()?,
            d => *last + i64::from(d),
        };
        *last = id;
        Ok(Some((id, ty)))
    }

    fn skip_struct(&mut self) -> std::result::Result<(), String> {
        self.nested(|t| {
            let mut last = 0;
            while let Some((_, ty)) = t.field(&mut last)? {
                t.skip(ty)?;
            }
            Ok(())
        })
    }

    /// A PageHeader's (uncompressed_page_size, compressed_page_size), the reader left after it.
    fn page_header(&mut self) -> std::result::Result<(i64, i64), String> {
        let (mut u, mut c) = (None, None);
        let mut last = 0;
        while let Some((id, ty)) = self.field(&mut last)? {
            match (id, ty) {
                (2, 5) => u = Some(self.zigzag()?),
                (3, 5) => c = Some(self.zigzag()?),
                _ => self.skip(ty)?,
            }
        }
        u.zip(c)
            .ok_or_else(|| "a page header without its sizes".to_string())
    }
}

/// An Arrow IPC file's records (stream format, or file format).
pub fn read_arrow(path: &Path) -> Result<Records> {
    guarded(path, "Arrow IPC", || read_arrow_inner(path))
}

fn read_arrow_inner(path: &Path) -> Result<Records> {
    let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
    let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut magic = [0u8; 6];
    let n = file.read(&mut magic).map_err(|e| Error::io(path, e))?;
    file.seek(SeekFrom::Start(0))
        .map_err(|e| Error::io(path, e))?;
    let bad = |e: arrow_schema::ArrowError| {
        Error::format(path, format!("not a readable Arrow IPC file: {e}"))
    };
    let limit = row_limit(file_len);
    let mut rows = Vec::new();
    if n == 6 && &magic == b"ARROW1" {
        // The file format (magic, messages, a footer listing them).
        let reader = arrow_ipc::reader::FileReader::try_new_buffered(file, None).map_err(bad)?;
        let names = column_names(path, reader.schema().fields())?;
        for batch in reader {
            append_batch(path, &names, &batch.map_err(bad)?, limit, &mut rows)?;
        }
    } else {
        // The stream format, which datasets' save_to_disk writes.
        let reader =
            arrow_ipc::reader::StreamReader::try_new(BufReader::new(file), None).map_err(bad)?;
        let names = column_names(path, reader.schema().fields())?;
        for batch in reader {
            append_batch(path, &names, &batch.map_err(bad)?, limit, &mut rows)?;
        }
    }
    finish(path, rows)
}

fn finish(path: &Path, rows: Vec<(usize, Record)>) -> Result<Records> {
    if rows.is_empty() {
        return Err(Error::format(path, "no records (the file has no rows)"));
    }
    Ok(Records {
        path: path.to_path_buf(),
        rows,
        unit: Unit::Row,
        parts: Vec::new(),
    })
}

/// The top-level column names, which must be unique (a record would silently lose one).
fn column_names(path: &Path, fields: &arrow_schema::Fields) -> Result<Vec<String>> {
    let names: Vec<String> = fields.iter().map(|f| f.name().clone()).collect();
    for (i, n) in names.iter().enumerate() {
        if names[..i].contains(n) {
            return Err(Error::format(
                path,
                format!("the schema names column `{n}` twice"),
            ));
        }
    }
    Ok(names)
}

/// Appends a batch's rows as records, numbered from the rows already read; refuses to pass
/// `limit` rows before converting anything.
fn append_batch(
    path: &Path,
    names: &[String],
    batch: &RecordBatch,
    limit: u64,
    rows: &mut Vec<(usize, Record)>,
) -> Result<()> {
    let first = rows.len();
    let n = batch.num_rows();
    if (first as u64).saturating_add(n as u64) > limit {
        return Err(Error::format(
            path,
            format!(
                "more than {limit} rows (at row {first}, a batch of {n} more): more than the \
                 file's size or metadata allows; is the file corrupt?"
            ),
        ));
    }
    // One converted column per name, each of n values.
    let mut columns = Vec::with_capacity(names.len());
    for (name, col) in names.iter().zip(batch.columns()) {
        let values = column_values(col.as_ref(), name).map_err(|msg| {
            Error::format(
                path,
                format!("rows {first}..{}: column `{name}`: {msg}", first + n),
            )
        })?;
        columns.push(values.into_iter());
    }
    for r in 0..n {
        let rec: Record = names
            .iter()
            .zip(columns.iter_mut())
            .map(|(name, col)| (name.clone(), col.next().unwrap_or(Value::Null)))
            .collect();
        rows.push((first + r, rec));
    }
    Ok(())
}

/// A finite float as a JSON number; NaN and infinities as null.
fn float(x: f64) -> Value {
    serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number)
}

/// Every value of an array as JSON (nulls as null), or a message naming the unsupported type.
fn column_values(a: &dyn Array, name: &str) -> std::result::Result<Vec<Value>, String> {
    macro_rules! prim {
        ($t:ty, $f:expr) => {{
            let p = a
                .as_primitive_opt::<$t>()
                .ok_or_else(|| format!("not a {:?} array", a.data_type()))?;
            each(a, |i| $f(p.value(i)))
        }};
    }
    let values = match a.data_type() {
        DataType::Null => vec![Value::Null; a.len()],
        DataType::Boolean => {
            let b = a.as_boolean_opt().ok_or("not a boolean array")?;
            each(a, |i| Value::Bool(b.value(i)))
        }
        DataType::Int8 => prim!(Int8Type, Value::from),
        DataType::Int16 => prim!(Int16Type, Value::from),
        DataType::Int32 => prim!(Int32Type, Value::from),
        DataType::Int64 => prim!(Int64Type, Value::from),
        DataType::UInt8 => prim!(UInt8Type, Value::from),
        DataType::UInt16 => prim!(UInt16Type, Value::from),
        DataType::UInt32 => prim!(UInt32Type, Value::from),
        DataType::UInt64 => prim!(UInt64Type, Value::from),
        DataType::Float16 => prim!(Float16Type, |x: half::f16| float(x.to_f64())),
        DataType::Float32 => prim!(Float32Type, |x: f32| float(f64::from(x))),
        DataType::Float64 => prim!(Float64Type, float),
        DataType::Utf8 => strings::<i32>(a)?,
        DataType::LargeUtf8 => strings::<i64>(a)?,
        DataType::Utf8View => {
            let s = a.as_string_view_opt().ok_or("not a string_view array")?;
            each(a, |i| Value::String(s.value(i).to_string()))
        }
        DataType::List(_) => list::<i32>(a, name)?,
        DataType::LargeList(_) => list::<i64>(a, name)?,
        DataType::FixedSizeList(_, _) => {
            let l = a.as_fixed_size_list_opt().ok_or("not a fixed_size_list")?;
            let child = column_values(l.values().as_ref(), name)?;
            let w = usize::try_from(l.value_length()).map_err(|_| "a negative list size")?;
            let mut out = Vec::with_capacity(a.len());
            for i in 0..a.len() {
                // A slice of the list slices its child array too: row i starts at i * w.
                let at = i.saturating_mul(w);
                out.push(if a.is_null(i) {
                    Value::Null
                } else {
                    Value::Array(
                        child
                            .get(at..at.saturating_add(w))
                            .ok_or("a list value outside its child array")?
                            .to_vec(),
                    )
                });
            }
            out
        }
        DataType::Struct(fields) => {
            let s = a.as_struct_opt().ok_or("not a struct array")?;
            let mut children = Vec::with_capacity(fields.len());
            for (f, c) in fields.iter().zip(s.columns()) {
                let field = format!("{name}.{}", f.name());
                children.push((f.name().clone(), column_values(c.as_ref(), &field)?));
            }
            let mut out = Vec::with_capacity(a.len());
            for i in 0..a.len() {
                out.push(if a.is_null(i) {
                    Value::Null
                } else {
                    let mut obj = Record::new();
                    for (k, vals) in &children {
                        obj.insert(k.clone(), vals.get(i).cloned().unwrap_or(Value::Null));
                    }
                    Value::Object(obj)
                });
            }
            out
        }
        DataType::Dictionary(_, _) => {
            let d = a.as_any_dictionary_opt().ok_or("not a dictionary array")?;
            let dict = column_values(d.values().as_ref(), name)?;
            let keys = d.normalized_keys();
            let mut out = Vec::with_capacity(a.len());
            for (i, k) in keys.iter().enumerate() {
                out.push(if a.is_null(i) {
                    Value::Null
                } else {
                    dict.get(*k)
                        .cloned()
                        .ok_or_else(|| format!("row {i}: dictionary key {k} out of range"))?
                });
            }
            out
        }
        other => {
            return Err(format!(
                "type {other} is not supported (strings, numbers, booleans and lists or structs \
                 of them are); drop the column before saving (datasets: ds.remove_columns)"
            ))
        }
    };
    Ok(values)
}

/// `f(i)` for each non-null row, null elsewhere.
fn each(a: &dyn Array, mut f: impl FnMut(usize) -> Value) -> Vec<Value> {
    (0..a.len())
        .map(|i| if a.is_null(i) { Value::Null } else { f(i) })
        .collect()
}

fn strings<O: OffsetSizeTrait>(a: &dyn Array) -> std::result::Result<Vec<Value>, String> {
    let s = a.as_string_opt::<O>().ok_or("not a string array")?;
    Ok(each(a, |i| Value::String(s.value(i).to_string())))
}

fn list<O: OffsetSizeTrait>(a: &dyn Array, name: &str) -> std::result::Result<Vec<Value>, String> {
    let l = a.as_list_opt::<O>().ok_or("not a list array")?;
    let child = column_values(l.values().as_ref(), name)?;
    let offsets = l.value_offsets();
    let mut out = Vec::with_capacity(a.len());
    for i in 0..a.len() {
        if a.is_null(i) {
            out.push(Value::Null);
            continue;
        }
        let (s, e) = (offsets.get(i), offsets.get(i + 1));
        let range = s
            .zip(e)
            .and_then(|(s, e)| Some(s.to_usize()?..e.to_usize()?))
            .and_then(|r| child.get(r))
            .ok_or("a list value outside its child array")?;
        out.push(Value::Array(range.to_vec()));
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Folders

/// The records of several data files of one split, in order (each read by its extension).
pub fn read_files(files: &[PathBuf]) -> Result<Records> {
    let mut all = Vec::with_capacity(files.len());
    for f in files {
        all.push(super::readers::read_records(f)?);
    }
    Records::concat(all).ok_or_else(|| Error::Input("no data files given".to_string()))
}

/// A folder holding one split: a `datasets` `save_to_disk` `Dataset` folder (its `state.json`
/// lists the Arrow files) or a folder of `.parquet` files (read in name order).
pub fn read_dataset_dir(dir: &Path) -> Result<Records> {
    read_files(&dataset_dir_files(dir)?)
}

/// The data files of a one-split folder, in order (see [`read_dataset_dir`]).
pub fn dataset_dir_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let state = dir.join("state.json");
    if state.is_file() {
        return state_files(dir, &state);
    }
    if dir.join("dataset_dict.json").is_file() {
        return Err(Error::format(
            dir,
            "a datasets DatasetDict (dataset_dict.json): give the task the folder (its splits are \
             found by name), or name one split's folder (train/, validation/)",
        ));
    }
    let parquet = files_with(dir, |n| n.ends_with(".parquet"))?;
    if parquet.is_empty() {
        return Err(Error::format(
            dir,
            "no data in this folder: expected a datasets save_to_disk folder (state.json and \
             data-*.arrow files) or .parquet files",
        ));
    }
    Ok(parquet)
}

/// The files of `dir` whose names pass `keep`, in name order.
fn files_with(dir: &Path, keep: impl Fn(&str) -> bool) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            continue;
        };
        if keep(&name) && entry.path().is_file() {
            out.push(entry.path());
        }
    }
    out.sort();
    Ok(out)
}

/// The Arrow files `state.json`'s `_data_files` lists, in its order; each must exist in `dir`.
fn state_files(dir: &Path, state: &Path) -> Result<Vec<PathBuf>> {
    let f = File::open(state).map_err(|e| Error::io(state, e))?;
    let mut text = String::new();
    f.take(MAX_STATE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| Error::io(state, e))?;
    if text.len() as u64 > MAX_STATE_BYTES {
        return Err(Error::format(
            state,
            format!(
                "larger than {} MiB; not a datasets state.json",
                MAX_STATE_BYTES >> 20
            ),
        ));
    }
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| Error::format(state, format!("invalid JSON: {e}")))?;
    let field = |msg: String| Error::format(state, format!("field `_data_files`: {msg}"));
    let list = v
        .get("_data_files")
        .and_then(Value::as_array)
        .ok_or_else(|| field("missing or not a list".to_string()))?;
    if list.is_empty() {
        return Err(field(
            "an empty list: the dataset has no data files".to_string(),
        ));
    }
    let mut files = Vec::with_capacity(list.len());
    for (i, entry) in list.iter().enumerate() {
        let name = entry
            .get("filename")
            .and_then(Value::as_str)
            .ok_or_else(|| field(format!("entry {i}: no `filename` string")))?;
        // Only a file in this folder: no separators, no `..`.
        if name.is_empty() || name.contains(['/', '\\']) || name == "." || name == ".." {
            return Err(field(format!(
                "entry {i}: {name:?} is not a file name in the dataset's folder"
            )));
        }
        let p = dir.join(name);
        if !p.is_file() {
            return Err(field(format!("entry {i}: {} is missing", p.display())));
        }
        files.push(p);
    }
    Ok(files)
}

/// One `{split}-{i}-of-{n}[-hash].parquet` file name's (i, n, digits of n).
fn shard_of(rest: &str) -> Option<(u64, u64, usize)> {
    let mut parts = rest.splitn(4, '-');
    let (i, of, n) = (parts.next()?, parts.next()?, parts.next()?);
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if of != "of" || !digits(i) || !digits(n) || i.len() > 9 || n.len() > 9 {
        return None;
    }
    Some((i.parse().ok()?, n.parse().ok()?, n.len()))
}

/// The `{split}-*.parquet` files in `base`: all shards of an `-of-N` set in order (a missing one
/// is an error), or the files in name order; None when there are none.
fn parquet_shards(base: &Path, split: &str) -> Result<Option<Vec<PathBuf>>> {
    if !base.is_dir() {
        return Ok(None);
    }
    let prefix = format!("{split}-");
    let files = files_with(base, |n| n.starts_with(&prefix) && n.ends_with(".parquet"))?;
    if files.is_empty() {
        return Ok(None);
    }
    let mut shards: BTreeMap<u64, PathBuf> = BTreeMap::new();
    let mut of: Option<(u64, usize)> = None;
    let mut plain = Vec::new();
    for f in &files {
        let name = f.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let rest = &name[prefix.len()..name.len() - ".parquet".len()];
        match shard_of(rest) {
            Some((i, n, w)) => {
                if of.is_some_and(|(m, _)| m != n) {
                    return Err(Error::format(
                        base,
                        format!(
                            "split `{split}`: shard files of different sets (-of-{} and -of-{n}); \
                             remove the stale ones",
                            of.map_or(0, |(m, _)| m)
                        ),
                    ));
                }
                of = Some((n, w));
                if let Some(prev) = shards.insert(i, f.clone()) {
                    return Err(Error::format(
                        base,
                        format!(
                            "split `{split}`: shard {i} twice ({} and {name})",
                            prev.file_name()
                                .and_then(|n| n.to_str())
                                .unwrap_or_default()
                        ),
                    ));
                }
            }
            None => plain.push(f.clone()),
        }
    }
    let Some((n, width)) = of else {
        return Ok(Some(plain));
    };
    if let Some(p) = plain.first() {
        return Err(Error::format(
            p,
            format!(
                "split `{split}`: not a shard name ({split}-NNNNN-of-{n:0width$}.parquet) next \
                 to shard files; remove it or the shards"
            ),
        ));
    }
    if n == 0 || n > MAX_SHARDS {
        return Err(Error::format(
            base,
            format!("split `{split}`: a shard set of {n} files (expected 1 to {MAX_SHARDS})"),
        ));
    }
    // Shards are 0..n: the first index that is not its position is the missing one.
    let missing = shards
        .keys()
        .enumerate()
        .find(|(pos, i)| **i != *pos as u64)
        .map_or(shards.len() as u64, |(pos, _)| pos as u64);
    if missing < n || shards.len() as u64 != n {
        let name = format!("{split}-{missing:0width$}-of-{n:0width$}.parquet");
        return Err(Error::format(
            base,
            format!(
                "split `{split}`: shard {name} is missing ({} of {n} shards found); download \
                 every shard of the split",
                shards.len()
            ),
        ));
    }
    Ok(Some(shards.into_values().collect()))
}

/// The files of split `split` in `dir` by the layouts of the module docs, in order; None when
/// none is there.
pub fn find_split(dir: &Path, split: &str) -> Result<Option<Vec<PathBuf>>> {
    for base in [dir.to_path_buf(), dir.join("data")] {
        let single = base.join(format!("{split}.parquet"));
        if single.is_file() {
            return Ok(Some(vec![single]));
        }
        if let Some(files) = parquet_shards(&base, split)? {
            return Ok(Some(files));
        }
    }
    let sub = dir.join(split);
    if sub.is_dir() {
        return dataset_dir_files(&sub).map(Some);
    }
    Ok(None)
}

/// The layouts [`find_split`] looks for, for messages.
pub fn split_layouts(split: &str) -> String {
    format!(
        "{split}.parquet, {split}-NNNNN-of-NNNNN.parquet, data/{split}-*.parquet, {split}/ (a \
         datasets save_to_disk split or Parquet files)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panicking_decoder_is_an_error_naming_the_file() {
        let r: Result<()> = guarded(Path::new("x.parquet"), "Parquet", || {
            panic!("index 9 out of range")
        });
        let msg = r.unwrap_err().to_string();
        assert!(
            msg.contains("x.parquet") && msg.contains("index 9 out of range"),
            "{msg}"
        );
        assert!(!IN_DECODER.with(Cell::get), "the hook speaks again after");
        let ok: Result<u8> = guarded(Path::new("y.parquet"), "Parquet", || Ok(3));
        assert_eq!(ok.unwrap(), 3);
    }
}
