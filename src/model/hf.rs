//! Reading Hugging Face model folders (safetensors weights, `tokenizer.json`) and writing
//! safetensors files.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Component, Path, PathBuf};

use memmap2::Mmap;
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::{Dtype, SafeTensors, View};
use serde_json::Value;

use crate::backend::nf4::{dynamic_map_signed, Nf4Tensor, ABSMAX_BLOCK, NF4_BLOCK, NF4_CODE};
use crate::error::{Error, Result};
use crate::fsutil::write_file_atomic;

/// The single-file checkpoint name.
const SINGLE_FILE: &str = "model.safetensors";
/// The index of a sharded checkpoint.
const INDEX_FILE: &str = "model.safetensors.index.json";
/// Bytes of the little-endian header length that starts every safetensors file.
const HEADER_LEN_BYTES: usize = 8;

/// One memory-mapped safetensors file and its parsed header.
#[derive(Debug)]
struct MappedFile {
    path: PathBuf,
    mmap: Mmap,
    /// Offset of the data section in the file (the 8 length bytes plus the JSON header).
    data_start: usize,
    metadata: Metadata,
}

impl MappedFile {
    /// Maps `path` and parses its header. Only the header pages are read; the data stays on disk
    /// until a tensor is loaded.
    fn open(path: PathBuf) -> Result<Self> {
        let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
        // SAFETY: the map is read-only. Another process truncating or rewriting the file while it
        // is mapped is undefined behaviour; checkpoints are treated as immutable while in use, as
        // every mmap-based loader (safetensors, candle, PyTorch) does.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
        // read_metadata checks the header length, the JSON, the offsets against the dtypes and
        // shapes, and that the data section ends exactly at the end of the file, so a truncated or
        // corrupt file is rejected here and later slicing is in bounds.
        let (header_len, metadata) = SafeTensors::read_metadata(&mmap)
            .map_err(|e| Error::format(&path, format!("not a valid safetensors file: {e}")))?;
        Ok(MappedFile {
            path,
            mmap,
            data_start: HEADER_LEN_BYTES + header_len,
            metadata,
        })
    }

    /// The bytes of one tensor.
    fn bytes(&self, name: &str, info: &TensorInfo) -> Result<&[u8]> {
        let (start, end) = info.data_offsets;
        // Validated at open; checked again so a logic error cannot become a panic.
        self.mmap
            .get(self.data_start + start..self.data_start + end)
            .ok_or_else(|| {
                Error::format(
                    &self.path,
                    format!(
                        "tensor `{name}`: data offsets {start}..{end} past the end of the file"
                    ),
                )
            })
    }
}

/// All safetensors tensors of one HF model folder: `model.safetensors`, or the shards listed in
/// `model.safetensors.index.json` (weight_map). Files are memory-mapped; tensors are converted
/// to f32 on request.
///
/// `open` parses only the headers, so opening a multi-gigabyte checkpoint is cheap. When both
/// files exist, `model.safetensors` wins, as in `transformers`. In a sharded folder the index
/// must agree with the shards: every listed tensor must be in its shard, and every tensor of a
/// shard must be listed for that shard.
#[derive(Debug)]
pub struct SafetensorsFolder {
    /// `model.safetensors` or the index: the file named by folder-wide errors.
    source: PathBuf,
    files: Vec<MappedFile>,
    /// Tensor name → index into `files`.
    location: HashMap<String, usize>,
}

impl SafetensorsFolder {
    /// Opens the checkpoint in `dir`; see the type's documentation.
    pub fn open(dir: &Path) -> Result<Self> {
        // An absent folder is an Io error on the folder itself.
        std::fs::metadata(dir).map_err(|e| Error::io(dir, e))?;
        let single = dir.join(SINGLE_FILE);
        let index = dir.join(INDEX_FILE);
        if single.exists() {
            let file = MappedFile::open(single.clone())?;
            let location = file
                .metadata
                .tensors()
                .into_keys()
                .map(|name| (name, 0))
                .collect();
            return Ok(SafetensorsFolder {
                source: single,
                files: vec![file],
                location,
            });
        }
        if index.exists() {
            return Self::open_sharded(dir, index);
        }
        let hint = super::folder::pickle_hint(dir).map_or_else(String::new, |h| format!("; {h}"));
        Err(Error::format(
            dir,
            format!("no safetensors checkpoint: neither `{SINGLE_FILE}` nor `{INDEX_FILE}` is in this folder{hint}"),
        ))
    }

    fn open_sharded(dir: &Path, index_path: PathBuf) -> Result<Self> {
        let text = std::fs::read_to_string(&index_path).map_err(|e| Error::io(&index_path, e))?;
        let index: Value = serde_json::from_str(&text)
            .map_err(|e| Error::format(&index_path, format!("invalid JSON: {e}")))?;
        let Some(weight_map) = index.get("weight_map").and_then(Value::as_object) else {
            return Err(Error::format(
                &index_path,
                "no `weight_map` object (tensor name → shard file)",
            ));
        };

        // Shards in sorted order so that error messages and `files` are deterministic.
        let mut shard_of: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (name, shard) in weight_map {
            let shard = shard.as_str().ok_or_else(|| {
                Error::format(
                    &index_path,
                    format!("weight_map: tensor `{name}`: expected a file name, found {shard}"),
                )
            })?;
            // A shard is a file next to the index; refuse paths that would leave the folder.
            let plain = Path::new(shard)
                .components()
                .all(|c| matches!(c, Component::Normal(_)));
            if !plain || shard.is_empty() {
                return Err(Error::format(
                    &index_path,
                    format!(
                        "weight_map: tensor `{name}`: shard {shard:?} is not a plain file name"
                    ),
                ));
            }
            shard_of.entry(shard).or_default().push(name);
        }

        let mut files = Vec::with_capacity(shard_of.len());
        let mut location = HashMap::with_capacity(weight_map.len());
        for (shard, listed) in &shard_of {
            let file = MappedFile::open(dir.join(shard))?;
            let idx = files.len();
            for name in listed {
                if file.metadata.info(name).is_none() {
                    return Err(Error::format(
                        &index_path,
                        format!(
                            "weight_map puts tensor `{name}` in `{shard}`, but {} does not contain it",
                            file.path.display()
                        ),
                    ));
                }
                location.insert((*name).to_string(), idx);
            }
            // Tensors the shard holds but the index does not assign to it.
            let mut extra: Vec<String> = file
                .metadata
                .tensors()
                .into_keys()
                .filter(|name| weight_map.get(name).and_then(Value::as_str) != Some(*shard))
                .collect();
            if !extra.is_empty() {
                extra.sort();
                let name = &extra[0];
                let listed_in = match weight_map.get(name).and_then(Value::as_str) {
                    Some(other) => format!("weight_map puts it in `{other}`"),
                    None => "weight_map does not list it".to_string(),
                };
                return Err(Error::format(
                    &index_path,
                    format!(
                        "{} contains tensor `{name}` but {listed_in} ({} such tensors in this shard)",
                        file.path.display(),
                        extra.len()
                    ),
                ));
            }
            files.push(file);
        }
        Ok(SafetensorsFolder {
            source: index_path,
            files,
            location,
        })
    }

    fn lookup(&self, name: &str) -> Option<(&MappedFile, &TensorInfo)> {
        let file = &self.files[*self.location.get(name)?];
        Some((file, file.metadata.info(name)?))
    }

    /// Whether the checkpoint holds a tensor called `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.location.contains_key(name)
    }

    /// The shape of `name`, as stored.
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.lookup(name).map(|(_, info)| info.shape.clone())
    }

    /// The file that holds `name` (for error messages).
    pub fn file_of(&self, name: &str) -> Option<&Path> {
        self.lookup(name).map(|(file, _)| file.path.as_path())
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.location.keys().cloned().collect();
        names.sort();
        names
    }

    /// Errors with Error::MissingTensors listing ALL absent names (sorted) if any is missing.
    pub fn require(&self, names: &[String]) -> Result<()> {
        let mut missing: Vec<String> = names
            .iter()
            .filter(|n| !self.contains(n))
            .cloned()
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        missing.sort();
        missing.dedup();
        Err(Error::MissingTensors {
            path: self.source.clone(),
            count: missing.len(),
            names: missing,
        })
    }

    /// Loads `name`, checks its shape equals `expected` (Error::Shape with the file path, name,
    /// expected and found), converts F32/BF16/F16 (and F64) to f32 (Error::Dtype for anything
    /// else), returns the data row-major. An absent tensor is Error::MissingTensors.
    pub fn load_f32(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>> {
        let Some((file, info)) = self.lookup(name) else {
            return Err(Error::MissingTensors {
                path: self.source.clone(),
                count: 1,
                names: vec![name.to_string()],
            });
        };
        if info.shape != expected {
            return Err(Error::Shape {
                path: file.path.clone(),
                name: name.to_string(),
                expected: expected.to_vec(),
                found: info.shape.clone(),
            });
        }
        let bytes = file.bytes(name, info)?;
        let values = match info.dtype {
            Dtype::F32 => decode_le(bytes, f32::from_le_bytes, |x| x),
            Dtype::BF16 => decode_le(
                bytes,
                |b| half::bf16::from_bits(u16::from_le_bytes(b)),
                half::bf16::to_f32,
            ),
            Dtype::F16 => decode_le(
                bytes,
                |b| half::f16::from_bits(u16::from_le_bytes(b)),
                half::f16::to_f32,
            ),
            // Rounds to nearest; weights saved in f64 are rare but harmless to accept (one
            // beyond f32's range becomes inf, refused below).
            Dtype::F64 => decode_le(bytes, f64::from_le_bytes, |x| x as f32),
            other => {
                return Err(Error::Dtype {
                    path: file.path.clone(),
                    name: name.to_string(),
                    dtype: other.to_string(),
                })
            }
        };
        // A NaN or inf weight would poison every step (or stop NF4 quantisation): refuse it
        // here, naming the tensor, instead of training on it.
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(Error::format(
                &file.path,
                format!(
                    "tensor `{name}`: element {i} of {} is {} (after conversion to f32); \
                     weights must be finite",
                    values.len(),
                    values[i]
                ),
            ));
        }
        Ok(values)
    }
}

/// The largest quant-state JSON of one bitsandbytes weight read (real ones are ~200 bytes).
pub const MAX_QUANT_STATE_BYTES: usize = 1 << 16;

/// The suffix of the tensor that holds a bitsandbytes 4-bit weight's quant state (JSON bytes).
const BNB_NF4_STATE: &str = "quant_state.bitsandbytes__nf4";
const BNB_FP4_STATE: &str = "quant_state.bitsandbytes__fp4";

impl SafetensorsFolder {
    /// The stored bytes of `name`, which must have `dtype` and `numel` elements (whatever its
    /// shape); errors name the file, the tensor and what it holds.
    fn raw(&self, name: &str, dtype: Dtype, numel: usize) -> Result<&[u8]> {
        let Some((file, info)) = self.lookup(name) else {
            return Err(Error::MissingTensors {
                path: self.source.clone(),
                count: 1,
                names: vec![name.to_string()],
            });
        };
        if info.dtype != dtype {
            return Err(Error::format(
                &file.path,
                format!(
                    "tensor `{name}`: dtype {}, but a bitsandbytes 4-bit weight stores it as {dtype}",
                    info.dtype
                ),
            ));
        }
        let found = info.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        if found != Some(numel) {
            return Err(Error::format(
                &file.path,
                format!(
                    "tensor `{name}`: shape {:?} holds {} elements; the weight's quant state \
                     needs {numel}",
                    info.shape,
                    found.map_or("too many".to_string(), |n| n.to_string())
                ),
            ));
        }
        file.bytes(name, info)
    }

    /// Whether linear weight `name` is stored bitsandbytes 4-bit (it has a quant-state tensor).
    pub fn is_bnb_4bit(&self, name: &str) -> bool {
        self.contains(&format!("{name}.{BNB_NF4_STATE}"))
            || self.contains(&format!("{name}.{BNB_FP4_STATE}"))
    }

    /// Loads bitsandbytes 4-bit weight `name` of shape `expected` as it is stored: the packed
    /// codes `name` (u8, `ceil(n/2)`), the absmax codes `name.absmax` (u8, `ceil(n/64)`), the
    /// absmax scales `name.nested_absmax` (f32, one per 256 blocks), the maps `name.quant_map`
    /// (16) and `name.nested_quant_map` (256), and the JSON `name.quant_state.bitsandbytes__nf4`
    /// (quant_type nf4, blocksize 64, dtype float32, shape, nested_blocksize 256, nested_dtype
    /// float32, nested_offset). Every field and size is checked before anything is copied; the
    /// maps must equal fastpt's NF4 code and dynamic map bit for bit. Errors name the file, the
    /// tensor, the field and its value.
    pub fn load_bnb_nf4(&self, name: &str, expected: &[usize]) -> Result<Nf4Tensor> {
        let fp4 = format!("{name}.{BNB_FP4_STATE}");
        if self.contains(&fp4) {
            return Err(self.bnb_error(
                &fp4,
                "quant_type fp4 is not supported; fastpt loads bitsandbytes NF4 weights",
            ));
        }
        let state_name = format!("{name}.{BNB_NF4_STATE}");
        let Some((file, info)) = self.lookup(&state_name) else {
            return Err(Error::MissingTensors {
                path: self.source.clone(),
                count: 1,
                names: vec![state_name],
            });
        };
        if info.dtype != Dtype::U8 || info.shape.len() != 1 || info.shape[0] > MAX_QUANT_STATE_BYTES
        {
            return Err(self.bnb_error(
                &state_name,
                format!(
                    "expected JSON bytes (u8, one dimension, at most {MAX_QUANT_STATE_BYTES}), \
                     found {} {:?}",
                    info.dtype, info.shape
                ),
            ));
        }
        let bytes = file.bytes(&state_name, info)?;
        let text = std::str::from_utf8(bytes)
            .map_err(|e| self.bnb_error(&state_name, format!("not UTF-8 ({e})")))?;
        let state: Value = serde_json::from_str(text)
            .map_err(|e| self.bnb_error(&state_name, format!("not valid JSON: {e}")))?;
        let state = state
            .as_object()
            .ok_or_else(|| self.bnb_error(&state_name, "expected a JSON object"))?;
        let field = |key: &str| -> Result<&Value> {
            state
                .get(key)
                .ok_or_else(|| self.bnb_error(&state_name, format!("no field `{key}`")))
        };
        let want_str = |key: &str, want: &str, why: &str| -> Result<()> {
            let v = field(key)?;
            if v.as_str() == Some(want) {
                Ok(())
            } else {
                Err(self.bnb_error(&state_name, format!("field `{key}` = {v}: {why}")))
            }
        };
        let want_int = |key: &str, want: u64, why: &str| -> Result<()> {
            let v = field(key)?;
            if v.as_u64() == Some(want) {
                Ok(())
            } else {
                Err(self.bnb_error(&state_name, format!("field `{key}` = {v}: {why}")))
            }
        };
        want_str("quant_type", "nf4", "only nf4 is supported")?;
        want_int(
            "blocksize",
            NF4_BLOCK as u64,
            "only blocksize 64 is supported",
        )?;
        want_str(
            "dtype",
            "float32",
            "only float32 weights are supported (bitsandbytes rounds the dequantised weights \
             to this type)",
        )?;
        if !state.contains_key("nested_blocksize") {
            return Err(self.bnb_error(
                &state_name,
                "no `nested_blocksize`: the absmax is not double-quantised \
                 (bnb_4bit_use_double_quant=False), which fastpt does not load",
            ));
        }
        want_int(
            "nested_blocksize",
            ABSMAX_BLOCK as u64,
            "only nested blocksize 256 is supported",
        )?;
        want_str("nested_dtype", "float32", "only float32 is supported")?;
        let shape_value = field("shape")?;
        let shape: Option<Vec<usize>> = shape_value.as_array().and_then(|dims| {
            dims.iter()
                .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
                .collect()
        });
        if shape.as_deref() != Some(expected) {
            return Err(self.bnb_error(
                &state_name,
                format!("field `shape` = {shape_value}: the model needs {expected:?}"),
            ));
        }
        let offset_value = field("nested_offset")?;
        let offset = offset_value
            .as_f64()
            .filter(|x| x.is_finite() && (*x as f32).is_finite())
            .ok_or_else(|| {
                self.bnb_error(
                    &state_name,
                    format!("field `nested_offset` = {offset_value}: expected a finite number"),
                )
            })? as f32;

        // Sizes from the (validated) shape, checked against every tensor before copying.
        let n = expected
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| self.bnb_error(&state_name, format!("shape {expected:?} overflows")))?;
        let nb = n.div_ceil(NF4_BLOCK);
        let nb2 = nb.div_ceil(ABSMAX_BLOCK);
        let absmax_name = format!("{name}.absmax");
        if self.lookup(&absmax_name).map(|(_, i)| i.dtype) == Some(Dtype::F32) {
            return Err(self.bnb_error(
                &absmax_name,
                "f32 absmax: the absmax is not double-quantised, which fastpt does not load",
            ));
        }
        let packed = self.raw(name, Dtype::U8, n.div_ceil(2))?;
        let absmax_codes = self.raw(&absmax_name, Dtype::U8, nb)?;
        let scale_name = format!("{name}.nested_absmax");
        let scales = decode_le(
            self.raw(&scale_name, Dtype::F32, nb2)?,
            f32::from_le_bytes,
            |x| x,
        ); // (ceil(nb/256))
        if let Some(i) = scales.iter().position(|s| !s.is_finite() || *s < 0.0) {
            return Err(self.bnb_error(
                &scale_name,
                format!(
                    "element {i} is {}; absmax scales are finite and ≥ 0",
                    scales[i]
                ),
            ));
        }
        let map_name = format!("{name}.quant_map");
        let code = decode_le(
            self.raw(&map_name, Dtype::F32, 16)?,
            f32::from_le_bytes,
            |x| x,
        );
        if let Some(k) = (0..16).find(|&k| code[k].to_bits() != NF4_CODE[k].to_bits()) {
            return Err(self.bnb_error(
                &map_name,
                format!(
                    "entry {k} is {}, not NF4's {}: only the NF4 code is supported",
                    code[k], NF4_CODE[k]
                ),
            ));
        }
        let nested_name = format!("{name}.nested_quant_map");
        let map = decode_le(
            self.raw(&nested_name, Dtype::F32, 256)?,
            f32::from_le_bytes,
            |x| x,
        );
        let ours = dynamic_map_signed();
        if let Some(k) = (0..256).find(|&k| map[k].to_bits() != ours[k].to_bits()) {
            return Err(self.bnb_error(
                &nested_name,
                format!(
                    "entry {k} is {}, not the signed dynamic map's {}: only bitsandbytes' \
                     default dynamic map is supported",
                    map[k], ours[k]
                ),
            ));
        }
        let q = Nf4Tensor {
            packed: packed.to_vec(),
            absmax_codes: absmax_codes.to_vec(),
            absmax_scale: scales,
            offset,
            len: n,
        };
        debug_assert!(q.is_consistent());
        Ok(q)
    }

    /// An error about tensor `name` of a bitsandbytes weight, naming its file.
    fn bnb_error(&self, name: &str, msg: impl std::fmt::Display) -> Error {
        let path = self
            .file_of(name)
            .map_or_else(|| self.source.clone(), Path::to_path_buf);
        Error::format(path, format!("tensor `{name}`: {msg}"))
    }
}

/// Decodes little-endian `N`-byte elements of type `T` and maps them through `convert`.
///
/// On little-endian hosts an aligned slice is reinterpreted in place; safetensors data inside an
/// mmap need not be aligned to `T` (the header length is arbitrary in older writers), so the
/// fallback reads each element with `from_le`.
fn decode_le<T: bytemuck::Pod, U, const N: usize>(
    bytes: &[u8],
    from_le: impl Fn([u8; N]) -> T,
    convert: impl Fn(T) -> U,
) -> Vec<U> {
    if cfg!(target_endian = "little") {
        if let Ok(items) = bytemuck::try_cast_slice::<u8, T>(bytes) {
            return items.iter().map(|&x| convert(x)).collect();
        }
    }
    bytes
        .chunks_exact(N)
        .map(|chunk| {
            let mut b = [0u8; N];
            b.copy_from_slice(chunk);
            convert(from_le(b))
        })
        .collect()
}

/// The largest `tokenizer.json` read (the biggest published ones are tens of MB).
pub const MAX_TOKENIZER_BYTES: u64 = 1 << 30;

/// Loads `dir/tokenizer.json` with the tokenizers crate; errors name the file.
pub fn load_tokenizer(dir: &Path) -> Result<tokenizers::Tokenizer> {
    let path = dir.join("tokenizer.json");
    let len = std::fs::metadata(&path)
        .map_err(|e| Error::io(&path, e))?
        .len();
    if len > MAX_TOKENIZER_BYTES {
        return Err(Error::format(
            &path,
            format!("{len} bytes, more than the {MAX_TOKENIZER_BYTES} a tokenizer.json may have"),
        ));
    }
    let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
    // UTF-8 and JSON syntax first: the tokenizers crate panics (instead of failing) when its
    // parser errors inside the `decoder` object (a truncated file, a bad byte there).
    let text = std::str::from_utf8(&bytes).map_err(|e| {
        Error::format(
            &path,
            format!("not UTF-8 text (at byte {})", e.valid_up_to()),
        )
    })?;
    serde_json::from_str::<Value>(text)
        .map_err(|e| Error::format(&path, format!("not valid JSON: {e}")))?;
    text.parse::<tokenizers::Tokenizer>()
        .map_err(|e| Error::format(&path, format!("not a valid tokenizer.json: {e}")))
}

/// The data of one tensor to write with [`save_safetensors`].
#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    F32(Vec<f32>),
    F64(Vec<f64>),
    I64(Vec<i64>),
}

impl TensorData {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            TensorData::F32(v) => v.len(),
            TensorData::F64(v) => v.len(),
            TensorData::I64(v) => v.len(),
        }
    }

    /// Whether there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn dtype(&self) -> Dtype {
        match self {
            TensorData::F32(_) => Dtype::F32,
            TensorData::F64(_) => Dtype::F64,
            TensorData::I64(_) => Dtype::I64,
        }
    }

    /// The elements as little-endian bytes, as safetensors stores them.
    fn to_le_bytes(&self) -> Vec<u8> {
        match self {
            TensorData::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            TensorData::F64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            TensorData::I64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }
}

/// A tensor ready for `safetensors::serialize`.
struct RawTensor {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl View for &RawTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// Writes tensors to a safetensors file (used by `fastpt forward --out` and by tests).
/// `tensors`: (name, shape, data); the element count must match the shape, and names must be
/// unique. Writes to a temp file in the same folder then renames it over `path`, so a failure
/// never leaves a half-written file.
pub fn save_safetensors(path: &Path, tensors: &[(String, Vec<usize>, TensorData)]) -> Result<()> {
    let mut raw: BTreeMap<&str, RawTensor> = BTreeMap::new();
    for (name, shape, data) in tensors {
        let numel = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        if numel != Some(data.len()) {
            return Err(Error::Input(format!(
                "{}: tensor `{name}`: shape {shape:?} does not match its {} elements",
                path.display(),
                data.len()
            )));
        }
        if name == "__metadata__" {
            return Err(Error::Input(format!(
                "{}: `__metadata__` is reserved by safetensors and cannot name a tensor",
                path.display()
            )));
        }
        let tensor = RawTensor {
            dtype: data.dtype(),
            shape: shape.clone(),
            bytes: data.to_le_bytes(),
        };
        if raw.insert(name, tensor).is_some() {
            return Err(Error::Input(format!(
                "{}: tensor `{name}` is given twice",
                path.display()
            )));
        }
    }
    let bytes = safetensors::serialize(raw.iter().map(|(name, t)| (*name, t)), None)
        .map_err(|e| Error::Input(format!("{}: cannot serialize: {e}", path.display())))?;

    write_file_atomic(path, &bytes, &mut || Ok(()))
}

/// Every tensor of a file, by name: (shape, row-major data).
pub type F64Tensors = BTreeMap<String, (Vec<usize>, Vec<f64>)>;

/// Reads every tensor of a safetensors file as f64 (F64, F32, BF16, F16, I64, I32 accepted) —
/// used by tests to read goldens. I64 values beyond 2^53 are rounded.
pub fn read_all_f64(path: &Path) -> Result<F64Tensors> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| Error::format(path, format!("not a valid safetensors file: {e}")))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.iter() {
        let data = view.data();
        let values = match view.dtype() {
            Dtype::F64 => decode_le(data, f64::from_le_bytes, |x| x),
            Dtype::F32 => decode_le(data, f32::from_le_bytes, f64::from),
            Dtype::BF16 => decode_le(
                data,
                |b| half::bf16::from_bits(u16::from_le_bytes(b)),
                half::bf16::to_f64,
            ),
            Dtype::F16 => decode_le(
                data,
                |b| half::f16::from_bits(u16::from_le_bytes(b)),
                half::f16::to_f64,
            ),
            Dtype::I64 => decode_le(data, i64::from_le_bytes, |x| x as f64),
            Dtype::I32 => decode_le(data, i32::from_le_bytes, f64::from),
            other => {
                return Err(Error::Dtype {
                    path: path.to_path_buf(),
                    name: name.to_string(),
                    dtype: other.to_string(),
                })
            }
        };
        out.insert(name.to_string(), (view.shape().to_vec(), values));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::TensorView;

    /// (name, dtype, shape, little-endian bytes) of a tensor to write with the safetensors crate.
    type Spec = (&'static str, Dtype, Vec<usize>, Vec<u8>);

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn f32_spec(name: &'static str, shape: Vec<usize>, v: &[f32]) -> Spec {
        (name, Dtype::F32, shape, f32_bytes(v))
    }

    /// Writes a safetensors file with the safetensors crate's own serializer.
    fn write_st(path: &Path, specs: &[Spec]) {
        let views: Vec<(&str, TensorView<'_>)> = specs
            .iter()
            .map(|(n, d, s, b)| (*n, TensorView::new(*d, s.clone(), b).unwrap()))
            .collect();
        std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
    }

    fn write_index(dir: &Path, map: &[(&str, &str)]) {
        let weight_map: serde_json::Map<String, Value> = map
            .iter()
            .map(|(n, f)| (n.to_string(), Value::from(*f)))
            .collect();
        let index =
            serde_json::json!({ "metadata": { "total_size": 0 }, "weight_map": weight_map });
        std::fs::write(dir.join(INDEX_FILE), index.to_string()).unwrap();
    }

    fn err_msg<T: std::fmt::Debug>(r: Result<T>) -> (Error, String) {
        let e = r.unwrap_err();
        let m = e.to_string();
        (e, m)
    }

    /// The tokenizers crate panics on these (its parser fails inside `decoder`); fastpt must
    /// give an error naming the file.
    #[test]
    fn broken_tokenizer_json_is_an_error_not_a_panic() {
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/t5-v1_1-tiny");
        let good = std::fs::read(fixture.join("tokenizer.json")).unwrap();
        let at = good.windows(9).position(|w| w == b"\"decoder\"").unwrap() + 20;
        let truncated = good[..at].to_vec();
        let mut bad_byte = good.clone();
        bad_byte[at] = 0x80;
        for (bytes, needle) in [(truncated, "not valid JSON"), (bad_byte, "not UTF-8")] {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("tokenizer.json"), bytes).unwrap();
            let err = load_tokenizer(dir.path()).unwrap_err().to_string();
            assert!(
                err.contains("tokenizer.json") && err.contains(needle),
                "{err}"
            );
        }
        assert!(load_tokenizer(&fixture).is_ok());
    }

    #[test]
    fn non_finite_weights_are_refused_naming_tensor_and_element() {
        let dir = tempfile::tempdir().unwrap();
        let nan = [0.5f32, f32::NAN, 1.0];
        // 1e300 in f64 overflows f32: inf after conversion.
        let big: Vec<u8> = [0.25f64, 1e300]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        write_st(
            &dir.path().join(SINGLE_FILE),
            &[
                f32_spec("q.weight", vec![3], &nan),
                ("k.weight", Dtype::F64, vec![2], big),
                f32_spec("ok", vec![1], &[2.0]),
            ],
        );
        let st = SafetensorsFolder::open(dir.path()).unwrap();
        let (_, m) = err_msg(st.load_f32("q.weight", &[3]));
        assert!(
            m.contains(SINGLE_FILE) && m.contains("tensor `q.weight`: element 1 of 3 is NaN"),
            "{m}"
        );
        let (_, m) = err_msg(st.load_f32("k.weight", &[2]));
        assert!(
            m.contains("tensor `k.weight`: element 1 of 2 is inf"),
            "{m}"
        );
        assert_eq!(st.load_f32("ok", &[1]).unwrap(), [2.0]);
    }

    #[test]
    fn single_file_f32_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let a: Vec<f32> = (0..6).map(|i| i as f32 * 0.5 - 1.0).collect();
        let b = [3.25f32];
        write_st(
            &dir.path().join(SINGLE_FILE),
            &[f32_spec("enc.a", vec![2, 3], &a), f32_spec("b", vec![], &b)],
        );
        let st = SafetensorsFolder::open(dir.path()).unwrap();
        assert_eq!(st.names(), vec!["b".to_string(), "enc.a".to_string()]);
        assert!(st.contains("enc.a") && !st.contains("nope"));
        assert_eq!(st.shape("enc.a"), Some(vec![2, 3]));
        assert_eq!(st.shape("nope"), None);
        assert_eq!(
            st.file_of("b"),
            Some(dir.path().join(SINGLE_FILE).as_path())
        );
        assert_eq!(st.load_f32("enc.a", &[2, 3]).unwrap(), a);
        assert_eq!(st.load_f32("b", &[]).unwrap(), b);
        st.require(&["b".into(), "enc.a".into()]).unwrap();
        let (e, _) = err_msg(st.load_f32("nope", &[1]));
        assert!(matches!(e, Error::MissingTensors { count: 1, .. }), "{e:?}");
    }

    #[test]
    fn half_precision_conversion_is_exact_for_representable_values() {
        let f16_vals = [
            0.0f32,
            -0.0,
            1.0,
            -2.5,
            0.15625,
            1024.0,
            6.1035156e-5,
            65504.0,
            -65504.0,
        ];
        let bf16_vals = [
            0.0f32,
            1.0,
            -2.5,
            3.140625,
            2f32.powi(100),
            -2f32.powi(-100),
            0.0078125,
        ];
        let f16_bytes: Vec<u8> = f16_vals
            .iter()
            .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
            .collect();
        let bf16_bytes: Vec<u8> = bf16_vals
            .iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
            .collect();
        let dir = tempfile::tempdir().unwrap();
        write_st(
            &dir.path().join(SINGLE_FILE),
            &[
                ("h", Dtype::F16, vec![3, 3], f16_bytes),
                ("b", Dtype::BF16, vec![7], bf16_bytes),
                (
                    "d",
                    Dtype::F64,
                    vec![2],
                    [0.1f64, -3.0]
                        .iter()
                        .flat_map(|x| x.to_le_bytes())
                        .collect(),
                ),
            ],
        );
        let st = SafetensorsFolder::open(dir.path()).unwrap();
        let h = st.load_f32("h", &[3, 3]).unwrap();
        let b = st.load_f32("b", &[7]).unwrap();
        // Bitwise, so -0.0 must stay -0.0.
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&h), bits(&f16_vals));
        assert_eq!(bits(&b), bits(&bf16_vals));
        assert_eq!(st.load_f32("d", &[2]).unwrap(), vec![0.1f32, -3.0]);
    }

    #[test]
    fn unaligned_data_decodes_like_aligned() {
        let vals = [1.5f32, -2.0, 1e-3];
        let mut buf = vec![0u8];
        buf.extend(f32_bytes(&vals));
        // buf[1..] cannot be 4-aligned if buf[0..] is (and vice versa): one of the two slices
        // takes the chunked path.
        assert_eq!(decode_le(&buf[1..], f32::from_le_bytes, |x| x), vals);
        let mut buf2 = f32_bytes(&vals);
        buf2.push(0);
        assert_eq!(decode_le(&buf2[..12], f32::from_le_bytes, |x| x), vals);

        // A hand-written file whose header is not padded to 8 bytes, as some old
        // writers produce: the data then starts at an odd offset in the mmap.
        let header = br#"{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,12]}}"#;
        assert_ne!(header.len() % 4, 0);
        let mut file = (header.len() as u64).to_le_bytes().to_vec();
        file.extend_from_slice(header);
        file.extend(f32_bytes(&vals));
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(SINGLE_FILE), file).unwrap();
        let st = SafetensorsFolder::open(dir.path()).unwrap();
        assert_eq!(st.load_f32("w", &[3]).unwrap(), vals);
    }

    #[test]
    fn sharded_folder_with_index() {
        let dir = tempfile::tempdir().unwrap();
        let s1 = "model-00001-of-00002.safetensors";
        let s2 = "model-00002-of-00002.safetensors";
        write_st(
            &dir.path().join(s1),
            &[
                f32_spec("a", vec![2], &[1.0, 2.0]),
                f32_spec("b", vec![1], &[3.0]),
            ],
        );
        write_st(
            &dir.path().join(s2),
            &[f32_spec("c", vec![2, 1], &[4.0, 5.0])],
        );
        write_index(dir.path(), &[("a", s1), ("b", s1), ("c", s2)]);
        let st = SafetensorsFolder::open(dir.path()).unwrap();
        assert_eq!(st.names(), vec!["a", "b", "c"]);
        assert_eq!(st.file_of("a"), Some(dir.path().join(s1).as_path()));
        assert_eq!(st.file_of("c"), Some(dir.path().join(s2).as_path()));
        assert_eq!(st.load_f32("a", &[2]).unwrap(), vec![1.0, 2.0]);
        assert_eq!(st.load_f32("c", &[2, 1]).unwrap(), vec![4.0, 5.0]);
        // Missing tensors of a sharded folder are reported against the index.
        let (_, m) = err_msg(st.require(&["zz".into()]));
        assert!(m.contains(INDEX_FILE), "{m}");
    }

    #[test]
    fn single_file_wins_over_index() {
        let dir = tempfile::tempdir().unwrap();
        write_st(
            &dir.path().join(SINGLE_FILE),
            &[f32_spec("x", vec![1], &[7.0])],
        );
        std::fs::write(dir.path().join(INDEX_FILE), "not json").unwrap();
        let st = SafetensorsFolder::open(dir.path()).unwrap();
        assert_eq!(st.names(), vec!["x"]);
    }

    #[test]
    fn index_disagreeing_with_shards_is_a_format_error() {
        let dir = tempfile::tempdir().unwrap();
        let (s1, s2) = ("s1.safetensors", "s2.safetensors");
        write_st(&dir.path().join(s1), &[f32_spec("a", vec![1], &[1.0])]);
        write_st(&dir.path().join(s2), &[f32_spec("b", vec![1], &[2.0])]);

        // Index puts `a` in s2, which does not hold it.
        write_index(dir.path(), &[("a", s2), ("b", s2)]);
        let (e, m) = err_msg(SafetensorsFolder::open(dir.path()));
        assert!(matches!(e, Error::Format { .. }), "{e:?}");
        assert!(
            m.contains(INDEX_FILE) && m.contains("`a`") && m.contains(s2),
            "{m}"
        );

        // A shard holding a tensor the index does not list for it.
        write_index(dir.path(), &[("a", s1)]);
        write_st(
            &dir.path().join(s1),
            &[
                f32_spec("a", vec![1], &[1.0]),
                f32_spec("stale", vec![1], &[0.0]),
            ],
        );
        let (e, m) = err_msg(SafetensorsFolder::open(dir.path()));
        assert!(matches!(e, Error::Format { .. }), "{e:?}");
        assert!(m.contains("`stale`") && m.contains("does not list"), "{m}");

        // A shard name that would leave the folder.
        write_index(dir.path(), &[("a", "../s1.safetensors")]);
        let (e, m) = err_msg(SafetensorsFolder::open(dir.path()));
        assert!(
            matches!(e, Error::Format { .. }) && m.contains("plain file name"),
            "{m}"
        );
    }

    #[test]
    fn require_lists_all_missing_sorted() {
        let dir = tempfile::tempdir().unwrap();
        write_st(
            &dir.path().join(SINGLE_FILE),
            &[f32_spec("present", vec![1], &[1.0])],
        );
        let st = SafetensorsFolder::open(dir.path()).unwrap();
        let want: Vec<String> = ["zeta", "present", "alpha", "mid"]
            .map(String::from)
            .to_vec();
        let (e, m) = err_msg(st.require(&want));
        match e {
            Error::MissingTensors { count, names, path } => {
                assert_eq!(count, 3);
                assert_eq!(names, vec!["alpha", "mid", "zeta"]);
                assert_eq!(path, dir.path().join(SINGLE_FILE));
            }
            other => panic!("{other:?}"),
        }
        assert!(m.contains("alpha, mid, zeta"), "{m}");
    }

    #[test]
    fn shape_mismatch_names_file_expected_and_found() {
        let dir = tempfile::tempdir().unwrap();
        write_st(
            &dir.path().join(SINGLE_FILE),
            &[f32_spec("w", vec![2, 3], &[0.0; 6])],
        );
        let st = SafetensorsFolder::open(dir.path()).unwrap();
        let (e, m) = err_msg(st.load_f32("w", &[3, 2]));
        assert!(matches!(e, Error::Shape { .. }), "{e:?}");
        assert!(m.contains(SINGLE_FILE) && m.contains("`w`"), "{m}");
        assert!(m.contains("[3, 2]") && m.contains("[2, 3]"), "{m}");
    }

    #[test]
    fn integer_and_bool_weights_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        write_st(
            &dir.path().join(SINGLE_FILE),
            &[
                ("q", Dtype::I8, vec![4], vec![1, 2, 3, 4]),
                ("mask", Dtype::BOOL, vec![2], vec![0, 1]),
                ("ids", Dtype::I64, vec![1], 5i64.to_le_bytes().to_vec()),
            ],
        );
        let st = SafetensorsFolder::open(dir.path()).unwrap();
        for (name, shape, dtype) in [("q", [4], "I8"), ("mask", [2], "BOOL"), ("ids", [1], "I64")] {
            let (e, m) = err_msg(st.load_f32(name, &shape));
            assert!(matches!(e, Error::Dtype { .. }), "{e:?}");
            assert!(
                m.contains(dtype) && m.contains(name) && m.contains(SINGLE_FILE),
                "{m}"
            );
        }
    }

    #[test]
    fn truncated_and_garbage_files_are_format_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SINGLE_FILE);
        write_st(&path, &[f32_spec("w", vec![64], &[1.0; 64])]);
        let full = std::fs::read(&path).unwrap();
        for cut in [full.len() / 2, full.len() - 1, 20, 4, 0] {
            std::fs::write(&path, &full[..cut]).unwrap();
            let (e, m) = err_msg(SafetensorsFolder::open(dir.path()));
            assert!(matches!(e, Error::Format { .. }), "cut {cut}: {e:?}");
            assert!(m.contains(SINGLE_FILE) && m.contains("safetensors"), "{m}");
        }
        // Trailing bytes after the data are corruption too.
        let mut longer = full.clone();
        longer.extend([0u8; 3]);
        std::fs::write(&path, &longer).unwrap();
        assert!(matches!(
            SafetensorsFolder::open(dir.path()),
            Err(Error::Format { .. })
        ));

        std::fs::write(
            &path,
            b"this is not a safetensors file at all, just some text",
        )
        .unwrap();
        let (e, m) = err_msg(SafetensorsFolder::open(dir.path()));
        assert!(
            matches!(e, Error::Format { .. }) && m.contains(SINGLE_FILE),
            "{m}"
        );

        // A plausible length followed by a header that is not JSON.
        let mut bad = 16u64.to_le_bytes().to_vec();
        bad.extend_from_slice(b"{not json at all");
        std::fs::write(&path, &bad).unwrap();
        let (e, m) = err_msg(SafetensorsFolder::open(dir.path()));
        assert!(
            matches!(e, Error::Format { .. }) && m.contains(SINGLE_FILE),
            "{m}"
        );

        // Offsets past the end of the data.
        let header = br#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#;
        let mut short = (header.len() as u64).to_le_bytes().to_vec();
        short.extend_from_slice(header);
        short.extend([0u8; 8]);
        std::fs::write(&path, &short).unwrap();
        let (e, m) = err_msg(SafetensorsFolder::open(dir.path()));
        assert!(
            matches!(e, Error::Format { .. }) && m.contains(SINGLE_FILE),
            "{m}"
        );
    }

    #[test]
    fn missing_shard_is_named() {
        let dir = tempfile::tempdir().unwrap();
        write_st(
            &dir.path().join("s1.safetensors"),
            &[f32_spec("a", vec![1], &[1.0])],
        );
        write_index(
            dir.path(),
            &[("a", "s1.safetensors"), ("b", "s2.safetensors")],
        );
        let (e, m) = err_msg(SafetensorsFolder::open(dir.path()));
        assert!(matches!(e, Error::Io { .. }), "{e:?}");
        assert!(
            m.contains(&dir.path().join("s2.safetensors").display().to_string()),
            "{m}"
        );
    }

    #[test]
    fn bad_index_is_a_format_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let index = dir.path().join(INDEX_FILE);
        for text in [
            "{\"weight_map\": ",
            "{\"metadata\": {}}",
            "{\"weight_map\": [1]}",
            "{\"weight_map\": {\"a\": 3}}",
        ] {
            std::fs::write(&index, text).unwrap();
            let (e, m) = err_msg(SafetensorsFolder::open(dir.path()));
            assert!(matches!(e, Error::Format { .. }), "{text}: {e:?}");
            assert!(m.contains(INDEX_FILE), "{m}");
        }
    }

    #[test]
    fn folder_without_checkpoint_names_folder_and_both_files() {
        let dir = tempfile::tempdir().unwrap();
        let (e, m) = err_msg(SafetensorsFolder::open(dir.path()));
        assert!(matches!(e, Error::Format { .. }), "{e:?}");
        assert!(m.contains(&dir.path().display().to_string()), "{m}");
        assert!(m.contains(SINGLE_FILE) && m.contains(INDEX_FILE), "{m}");

        let absent = dir.path().join("no-such-model");
        let (e, m) = err_msg(SafetensorsFolder::open(&absent));
        assert!(matches!(e, Error::Io { .. }), "{e:?}");
        assert!(m.contains("no-such-model"), "{m}");
    }

    #[test]
    fn save_then_read_all_f64_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.safetensors");
        let tensors = vec![
            (
                "logits".to_string(),
                vec![2, 2],
                TensorData::F32(vec![0.5, -1.25, 3.0, 1e-7]),
            ),
            (
                "loss".to_string(),
                vec![],
                TensorData::F64(vec![std::f64::consts::PI]),
            ),
            (
                "ids".to_string(),
                vec![3],
                TensorData::I64(vec![0, -7, 1 << 40]),
            ),
        ];
        save_safetensors(&path, &tensors).unwrap();
        // Overwriting an existing file works too.
        save_safetensors(&path, &tensors).unwrap();
        let back = read_all_f64(&path).unwrap();
        assert_eq!(back.len(), 3);
        assert_eq!(
            back["logits"],
            (vec![2, 2], vec![0.5, -1.25, 3.0, 1e-7f32 as f64])
        );
        assert_eq!(back["loss"], (vec![], vec![std::f64::consts::PI]));
        assert_eq!(back["ids"], (vec![3], vec![0.0, -7.0, (1u64 << 40) as f64]));
        // The f32 tensor is readable by the folder loader as well.
        std::fs::rename(&path, dir.path().join(SINGLE_FILE)).unwrap();
        let st = SafetensorsFolder::open(dir.path()).unwrap();
        assert_eq!(
            st.load_f32("logits", &[2, 2]).unwrap(),
            vec![0.5, -1.25, 3.0, 1e-7]
        );
        // No temp files are left behind.
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from(SINGLE_FILE)]);
    }

    #[test]
    fn save_rejects_bad_input_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.safetensors");
        let bad_shape = vec![("x".to_string(), vec![2, 2], TensorData::F32(vec![1.0; 3]))];
        let (e, m) = err_msg(save_safetensors(&path, &bad_shape));
        assert!(
            matches!(e, Error::Input(_)) && m.contains("`x`") && m.contains("[2, 2]"),
            "{m}"
        );
        let dup = vec![
            ("x".to_string(), vec![1], TensorData::F32(vec![1.0])),
            ("x".to_string(), vec![1], TensorData::I64(vec![1])),
        ];
        let (e, m) = err_msg(save_safetensors(&path, &dup));
        assert!(matches!(e, Error::Input(_)) && m.contains("twice"), "{m}");
        assert!(!path.exists());

        let in_missing_dir = dir.path().join("nope").join("out.safetensors");
        let ok = vec![("x".to_string(), vec![1], TensorData::F32(vec![1.0]))];
        let (e, m) = err_msg(save_safetensors(&in_missing_dir, &ok));
        assert!(
            matches!(e, Error::Io { .. }) && m.contains("out.safetensors"),
            "{m}"
        );
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn read_all_f64_accepts_listed_dtypes_and_rejects_others() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("golden.safetensors");
        write_st(
            &path,
            &[
                (
                    "h",
                    Dtype::F16,
                    vec![1],
                    half::f16::from_f32(-0.5).to_le_bytes().to_vec(),
                ),
                (
                    "b",
                    Dtype::BF16,
                    vec![1],
                    half::bf16::from_f32(2.0).to_le_bytes().to_vec(),
                ),
                (
                    "i",
                    Dtype::I32,
                    vec![2],
                    [-3i32, 9].iter().flat_map(|x| x.to_le_bytes()).collect(),
                ),
            ],
        );
        let back = read_all_f64(&path).unwrap();
        assert_eq!(back["h"].1, vec![-0.5]);
        assert_eq!(back["b"].1, vec![2.0]);
        assert_eq!(back["i"], (vec![2], vec![-3.0, 9.0]));

        write_st(&path, &[("u", Dtype::U8, vec![1], vec![1])]);
        let (e, m) = err_msg(read_all_f64(&path));
        assert!(
            matches!(e, Error::Dtype { .. }) && m.contains("U8") && m.contains("golden"),
            "{m}"
        );

        std::fs::write(&path, b"garbage").unwrap();
        let (e, m) = err_msg(read_all_f64(&path));
        assert!(
            matches!(e, Error::Format { .. }) && m.contains("golden"),
            "{m}"
        );
    }

    #[test]
    fn tokenizer_loads_and_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let (e, m) = err_msg(load_tokenizer(dir.path()));
        assert!(
            matches!(e, Error::Io { .. }) && m.contains("tokenizer.json"),
            "{m}"
        );

        std::fs::write(dir.path().join("tokenizer.json"), "{\"model\": 3}").unwrap();
        let (e, m) = err_msg(load_tokenizer(dir.path()));
        assert!(
            matches!(e, Error::Format { .. }) && m.contains("tokenizer.json"),
            "{m}"
        );

        let json = r#"{
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null, "pre_tokenizer": {"type": "Whitespace"},
            "post_processor": null, "decoder": null,
            "model": {"type": "WordLevel", "vocab": {"hello": 0, "world": 1, "<unk>": 2},
                      "unk_token": "<unk>"}
        }"#;
        std::fs::write(dir.path().join("tokenizer.json"), json).unwrap();
        let tok = load_tokenizer(dir.path()).unwrap();
        let enc = tok.encode("hello world again", false).unwrap();
        assert_eq!(enc.get_ids(), &[0, 1, 2]);
    }
}
