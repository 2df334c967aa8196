//! The memory a model, a step or a run needs, estimated from the config alone, and checked
//! against what the machine has free before anything is loaded (issue 19, rule 2): a run that
//! cannot fit stops with "needs about X GB, the CPU has Y GB available" instead of being killed
//! by the OS half-way through loading.
//!
//! The estimate counts, in the backend's storage type:
//! - weights: embeddings, norms and the relative bias dense; linear weights dense or NF4
//!   (4 bits + double-quantised absmax ≈ 0.52 bytes); the host copy of the largest tensor
//!   while loading and, with NF4, the dequantisation scratch of the largest linear;
//! - activations: the larger of one training step (every tensor the backward reads: per layer
//!   the norms' inputs, q/k/v/attention output/lse, the FFN pre-activations; logits and their
//!   gradient at the label rows; one layer's temporaries), a forward-only pass at the
//!   evaluation batch, and greedy generation (KV caches for the whole output length);
//! - the method: its parameters and their gradients in the storage type, AdamW's master copy
//!   and two moments (f32 on a GPU), and a checkpoint's host copy of all three.
//!
//! The sum is padded by [`OVERHEAD_FACTOR`] and [`OVERHEAD_BYTES`] (allocator slack, the
//! runtime, data): conservative, but within a small factor of the real peak.
//!
//! Available memory: a GPU's free device memory (the driver's figure); on the CPU (and the
//! virtual GPU, whose buffers are host memory) `MemAvailable` from /proc/meminfo, or the
//! cgroup v2 limit left (memory.max − memory.current + inactive file cache) when that is lower.
//! Two environment variables, named in the error: [`SKIP_ENV`]`=1` skips the check,
//! [`LIMIT_ENV`]`=GB` replaces the available figure (tests use it to be independent of the
//! machine).

use std::path::Path;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::config::{Architecture, CheckpointQuant, FeedForward, LlamaConfig, T5Config};
use crate::model::linear::Quant;
use crate::model::shapes::{is_builtin_shape, llama_shape, t5_shape};

/// Environment variable: `1` skips the memory check.
pub const SKIP_ENV: &str = "FASTPT_SKIP_MEMORY_CHECK";
/// Environment variable: the available memory in GB (10⁹ bytes) instead of the machine's.
pub const LIMIT_ENV: &str = "FASTPT_MEMORY_LIMIT_GB";
/// The estimate is multiplied by this (allocator slack, fragmentation).
pub const OVERHEAD_FACTOR: f64 = 1.1;
/// And this is added (the runtime, tokenizer, data, CUDA context).
pub const OVERHEAD_BYTES: u128 = 200_000_000;
/// Bytes per element of an NF4 weight: 4-bit codes, one absmax code per 64 values and an f32
/// scale per 256 blocks, rounded up.
const NF4_BYTES: f64 = 0.52;

/// The config of a backbone, whichever family.
#[derive(Debug, Clone)]
pub enum ModelShape {
    T5(T5Config),
    Llama(LlamaConfig),
}

impl ModelShape {
    /// The config of `model`: a built-in shape, or a Hugging Face folder's config.json (read and
    /// range-checked; no weight is touched).
    pub fn of_model(model: &str) -> Result<Self> {
        if is_builtin_shape(model) {
            return Ok(match Architecture::of_shape(model) {
                Some(Architecture::Llama) => ModelShape::Llama(llama_shape(model)?),
                _ => ModelShape::T5(t5_shape(model)?),
            });
        }
        let path = Path::new(model).join("config.json");
        Ok(match Architecture::of_config(&path)? {
            Architecture::T5 => ModelShape::T5(T5Config::from_file(&path)?),
            Architecture::Llama => ModelShape::Llama(LlamaConfig::from_file(&path)?),
        })
    }

    /// The model width C (d_model / hidden_size).
    pub fn width(&self) -> usize {
        match self {
            ModelShape::T5(c) => c.d_model,
            ModelShape::Llama(c) => c.hidden_size,
        }
    }
}

/// The sizes of the work to estimate. Lengths are the longest a batch can have.
#[derive(Debug, Clone, Copy, Default)]
pub struct Workload {
    /// Rows of a training step (0: no training step).
    pub train_batch: usize,
    /// Rows of a forward-only pass (dev loss, rank classification; 0: none).
    pub forward_batch: usize,
    /// Rows of a greedy-generation batch (0: no generation).
    pub generate_batch: usize,
    /// Prompt rows in front of the input (P).
    pub prompt_rows: usize,
    /// Input tokens (T5: the encoder's; Llama: before the target).
    pub input_len: usize,
    /// Target tokens (T5: the decoder's; Llama: the labelled end of a row).
    pub target_len: usize,
    /// Tokens generated per row (the KV caches' extra length).
    pub max_new_tokens: usize,
    /// Trainable parameters of the prompt method (0: none).
    pub method_params: u128,
}

impl Workload {
    /// One forward + backward of `batch` (`fastpt forward`): a decoder-only batch counts every
    /// position as a possible label row.
    pub fn of_batch(batch: &crate::model::batch::HostBatch) -> Self {
        let (input_len, target_len) = if batch.decoder_input_ids.is_empty() {
            (0, batch.enc_len)
        } else {
            (batch.enc_len, batch.dec_len)
        };
        Workload {
            train_batch: batch.batch,
            input_len,
            target_len,
            ..Workload::default()
        }
    }
}

/// Estimates `work` on `model` (a built-in shape or a Hugging Face folder, whose config.json is
/// read and range-checked) and refuses it when `be` has less memory available; `what` names
/// the command in the error. Reads no weight.
pub fn check_model<B: Backend>(
    be: &B,
    model: &str,
    quant: Quant,
    work: &Workload,
    what: &str,
) -> Result<()> {
    let shape = ModelShape::of_model(model)?;
    let quant = stored_quant(model, quant)?;
    check_fits(be, &estimate(&shape, Storage::of(be, quant), work), what)
}

/// How `model`'s linear weights will be stored: `quant`, or NF4 for a bitsandbytes 4-bit folder
/// (its linears load in NF4 whatever `quant` says; the few it keeps dense, T5's `wo`, are
/// counted at NF4 size too).
pub fn stored_quant(model: &str, quant: Quant) -> Result<Quant> {
    if is_builtin_shape(model) {
        return Ok(quant);
    }
    Ok(
        match CheckpointQuant::of_config(&Path::new(model).join("config.json"))? {
            CheckpointQuant::BnbNf4 => Quant::Nf4,
            CheckpointQuant::None => quant,
        },
    )
}

/// An estimate in bytes, by part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryNeed {
    pub weights: u128,
    pub activations: u128,
    pub method: u128,
    /// Elements of the largest single buffer (a weight, a row-major activation or a score
    /// matrix): the GPU kernels index with 32-bit integers.
    pub largest_buffer: u128,
}

impl MemoryNeed {
    /// The parts' sum with the overheads ([`OVERHEAD_FACTOR`], [`OVERHEAD_BYTES`]).
    pub fn total(&self) -> u128 {
        let sum = self
            .weights
            .saturating_add(self.activations)
            .saturating_add(self.method);
        ((sum as f64 * OVERHEAD_FACTOR) as u128).saturating_add(OVERHEAD_BYTES)
    }
}

/// How the backend stores tensors.
#[derive(Debug, Clone, Copy)]
pub struct Storage {
    /// Bytes per element of weights and activations (f32 4, bf16 2, f64 8).
    pub elem_bytes: usize,
    pub quant: Quant,
    /// The tensors live in device memory (a GPU), not in host memory.
    pub device: bool,
}

impl Storage {
    /// The storage of backend `be` with weights quantised as `quant`.
    pub fn of<B: Backend>(be: &B, quant: Quant) -> Self {
        Storage {
            elem_bytes: be.elem_bytes(),
            quant,
            device: be.device_free_bytes().is_some(),
        }
    }
}

/// An element count whose `+` and `·` saturate at `u128::MAX`: sizes come from user input, and
/// even u128 products of several u64 sizes can overflow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct S(u128);

fn w(x: usize) -> S {
    S(x as u128)
}

impl std::ops::Add for S {
    type Output = S;
    fn add(self, o: S) -> S {
        S(self.0.saturating_add(o.0))
    }
}

impl std::ops::Mul for S {
    type Output = S;
    fn mul(self, o: S) -> S {
        S(self.0.saturating_mul(o.0))
    }
}

impl std::ops::Mul<u128> for S {
    type Output = S;
    fn mul(self, o: u128) -> S {
        S(self.0.saturating_mul(o))
    }
}

impl std::ops::Mul<S> for u128 {
    type Output = S;
    fn mul(self, o: S) -> S {
        S(self.saturating_mul(o.0))
    }
}

/// `count` elements of `bytes` each, saturating.
fn bytes(count: S, bytes: usize) -> u128 {
    count.0.saturating_mul(bytes as u128)
}

/// The memory `model` needs for `work` on a backend storing tensors as `storage`.
pub fn estimate(model: &ModelShape, storage: Storage, work: &Workload) -> MemoryNeed {
    let e = storage.elem_bytes;
    let (dense, linear, largest_linear, largest) = weight_elements(model);
    let linear_bytes = match storage.quant {
        Quant::None => bytes(linear, e),
        Quant::Nf4 => {
            ((linear.0 as f64 * NF4_BYTES) as u128).saturating_add(bytes(largest_linear, e))
        }
    };
    // Loading holds one tensor as f32 on the host before it is converted and uploaded.
    let weights = bytes(dense, e)
        .saturating_add(linear_bytes)
        .saturating_add(bytes(largest, 4));
    let activations = match model {
        ModelShape::T5(c) => t5_activations(c, work),
        ModelShape::Llama(c) => llama_activations(c, work),
    };
    // Parameters and gradients in the storage type; AdamW's master copy and moments in f32 on
    // a GPU (the CPU's own type on the CPU); a checkpoint copies all three to the host as f32.
    let state = if storage.device { 4 } else { e };
    let p = S(work.method_params);
    let method = bytes(p, 2 * e + 3 * state + 3 * 4);
    MemoryNeed {
        weights,
        activations: bytes(activations, e),
        method,
        largest_buffer: largest_buffer(model, work).0.max(largest.0),
    }
}

/// Elements of the largest activation buffer of `work`: rows times the widest column (FFN,
/// vocabulary, heads · head width), or one batch's attention scores (B, H, T, T).
fn largest_buffer(model: &ModelShape, work: &Workload) -> S {
    let (widest, heads, t5) = match model {
        ModelShape::T5(c) => (
            w(c.d_model)
                .max(w(c.d_ff))
                .max(w(c.vocab_size))
                .max(w(c.num_heads) * w(c.d_kv)),
            w(c.num_heads),
            true,
        ),
        ModelShape::Llama(c) => (
            w(c.hidden_size)
                .max(w(c.intermediate_size))
                .max(w(c.vocab_size))
                .max(w(c.num_attention_heads) * w(c.head_dim)),
            w(c.num_attention_heads),
            false,
        ),
    };
    let batch = w(work.train_batch)
        .max(w(work.forward_batch))
        .max(w(work.generate_batch));
    let input = w(work.prompt_rows) + w(work.input_len);
    let target = w(work.target_len) + w(work.max_new_tokens) + S(1);
    // T5: encoder and decoder rows apart (the decoder has the start token in front); Llama:
    // one sequence of both.
    let t = if t5 {
        input.max(target)
    } else {
        input + target
    };
    (batch * t * widest).max(batch * heads * t * t)
}

/// (dense elements, linear elements, the largest linear, the largest tensor) of the weights.
fn weight_elements(model: &ModelShape) -> (S, S, S, S) {
    match model {
        ModelShape::T5(c) => {
            let (cc, hd, f, v) = (
                w(c.d_model),
                w(c.num_heads) * w(c.d_kv),
                w(c.d_ff),
                w(c.vocab_size),
            );
            let ffn_mats: u128 = match c.feed_forward {
                FeedForward::Relu => 2,
                FeedForward::GatedGelu => 3,
            };
            let heads: u128 = if c.tie_word_embeddings { 1 } else { 2 };
            let (enc, dec) = (w(c.num_layers), w(c.num_decoder_layers));
            let dense = heads * v * cc
                + 2 * w(c.relative_attention_num_buckets) * w(c.num_heads)
                + enc * 2 * cc
                + dec * 3 * cc
                + 2 * cc;
            let linear =
                enc * (4 * cc * hd + ffn_mats * cc * f) + dec * (8 * cc * hd + ffn_mats * cc * f);
            let largest_linear = (cc * hd).max(cc * f);
            (dense, linear, largest_linear, largest_linear.max(v * cc))
        }
        ModelShape::Llama(c) => {
            let (cc, f, v) = (w(c.hidden_size), w(c.intermediate_size), w(c.vocab_size));
            let qd = w(c.num_attention_heads) * w(c.head_dim);
            let kvd = w(c.num_key_value_heads) * w(c.head_dim);
            let heads: u128 = if c.tie_word_embeddings { 1 } else { 2 };
            let layers = w(c.num_hidden_layers);
            let dense = heads * v * cc + layers * 2 * cc + cc;
            let linear = layers * (2 * cc * qd + 2 * cc * kvd + 3 * cc * f);
            let largest_linear = (cc * qd).max(cc * f);
            (dense, linear, largest_linear, largest_linear.max(v * cc))
        }
    }
}

/// Activation elements of T5 for `work`: the largest of a training step, a forward pass and
/// generation.
fn t5_activations(c: &T5Config, work: &Workload) -> S {
    let (cc, hd, f, v, h) = (
        w(c.d_model),
        w(c.num_heads) * w(c.d_kv),
        w(c.d_ff),
        w(c.vocab_size),
        w(c.num_heads),
    );
    let g: u128 = match c.feed_forward {
        FeedForward::Relu => 1,
        FeedForward::GatedGelu => 2,
    };
    let (enc_layers, dec_layers) = (w(c.num_layers), w(c.num_decoder_layers));
    let te = w(work.prompt_rows) + w(work.input_len);
    // The decoder sees the target after the start token.
    let td = w(work.target_len) + S(1);
    // One layer's temporaries at n tokens (normed input, FFN hidden and its gradient, the
    // attention's gradients), alive while one layer runs.
    let temporaries = |n: S| n * (3 * cc + 2 * g * f + 4 * hd);
    // Everything a step over `b` rows keeps (`saved`: what the backward reads).
    let pass = |b: S, saved: bool| -> S {
        let (ne, nd) = (b * te, b * td);
        let enc_layer = 2 * ne * cc + 2 * ne + 4 * ne * hd + b * h * te + g * ne * f;
        let dec_layer = 3 * nd * cc
            + 3 * nd
            + 4 * nd * hd
            + b * h * td
            + 2 * nd * hd
            + 2 * ne * hd
            + b * h * td
            + g * nd * f;
        let layers = if saved {
            enc_layers * enc_layer + dec_layers * dec_layer
        } else {
            // Without a backward only one layer's outputs are alive at a time, but the
            // decoder's cross-attention k, v of the encoder output are built layer by layer.
            enc_layer.max(dec_layer)
        };
        // inputs_embeds and its gradient, the encoder output and its gradient, the decoder's
        // residual stream and its gradient, logits and their gradient at every target row.
        let streams = 4 * ne * cc + 2 * nd * cc + 2 * nd * v;
        layers + streams + temporaries(ne.max(nd))
    };
    let train = pass(w(work.train_batch), true);
    let forward = pass(w(work.forward_batch), false);
    let bg = w(work.generate_batch);
    let generate = if bg == S(0) {
        S(0)
    } else {
        let ne = bg * te;
        let cap = w(work.max_new_tokens) + S(1);
        // The encoder once (one layer alive), its output, the cross-attention k, v of every
        // decoder layer, the self-attention caches for the whole output, one row's logits.
        pass(bg, false).max(ne * cc + temporaries(ne))
            + dec_layers * (2 * ne * hd + 2 * bg * cap * hd)
            + bg * v
    };
    train.max(forward).max(generate)
}

/// Activation elements of Llama for `work` (see [`t5_activations`]).
fn llama_activations(c: &LlamaConfig, work: &Workload) -> S {
    let (cc, f, v, h) = (
        w(c.hidden_size),
        w(c.intermediate_size),
        w(c.vocab_size),
        w(c.num_attention_heads),
    );
    let qd = w(c.num_attention_heads) * w(c.head_dim);
    let kvd = w(c.num_key_value_heads) * w(c.head_dim);
    let layers = w(c.num_hidden_layers);
    let t = w(work.prompt_rows) + w(work.input_len) + w(work.target_len);
    let temporaries = |n: S| n * (3 * cc + 4 * f + 2 * qd + 2 * kvd);
    // RoPE's cos and sin tables, (T, D/2) each.
    let rope = |t: S| t * w(c.head_dim);
    let pass = |b: S, saved: bool| -> S {
        let n = b * t;
        let layer = 2 * n * cc + 2 * n + 2 * n * qd + 2 * n * kvd + b * h * t + 2 * n * f;
        let kept = if saved { layers * layer } else { layer };
        // inputs_embeds and its gradient, the residual stream and its gradient, logits and
        // their gradient at the label rows.
        kept + 4 * n * cc + 2 * b * w(work.target_len) * v + temporaries(n) + rope(t)
    };
    let train = pass(w(work.train_batch), true);
    let forward = pass(w(work.forward_batch), false);
    let bg = w(work.generate_batch);
    let generate = if bg == S(0) {
        S(0)
    } else {
        let cap = t + w(work.max_new_tokens);
        pass(bg, false) + layers * 2 * bg * cap * kvd + bg * v + rope(cap)
    };
    train.max(forward).max(generate)
}

/// Where the tensors live and how much memory is free there.
#[derive(Debug, Clone, PartialEq)]
pub struct Available {
    pub bytes: u64,
    /// "the CPU" or "the GPU", as the error says it.
    pub place: &'static str,
    /// Where the figure comes from ("MemAvailable in /proc/meminfo", ...).
    pub source: String,
}

/// The memory free for backend `be`: the GPU's free device memory, else the host's (see the
/// module docs); [`LIMIT_ENV`] replaces either. `None` when nothing can be read (then no check).
pub fn available<B: Backend>(be: &B) -> Result<Option<Available>> {
    let place = match be.device_free_bytes() {
        Some(_) => "the GPU",
        None => "the CPU",
    };
    if let Ok(text) = std::env::var(LIMIT_ENV) {
        let gb: f64 = text
            .trim()
            .parse()
            .ok()
            .filter(|x: &f64| x.is_finite() && *x >= 0.0)
            .ok_or_else(|| {
                Error::Input(format!(
                    "{LIMIT_ENV}={text:?}: expected a number of GB (10^9 bytes) ≥ 0"
                ))
            })?;
        return Ok(Some(Available {
            bytes: (gb * 1e9) as u64,
            place,
            source: format!("{LIMIT_ENV}={}", text.trim()),
        }));
    }
    if let Some(free) = be.device_free_bytes() {
        return Ok(Some(Available {
            bytes: free,
            place,
            source: "free device memory".into(),
        }));
    }
    Ok(host_available())
}

/// The host's available memory: MemAvailable, or the cgroup's limit left when lower.
fn host_available() -> Option<Available> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let mem = meminfo_available(&meminfo)?;
    let mut best = Available {
        bytes: mem,
        place: "the CPU",
        source: "MemAvailable in /proc/meminfo".into(),
    };
    if let Some((left, dir)) = cgroup_left() {
        if left < best.bytes {
            best = Available {
                bytes: left,
                place: "the CPU",
                source: format!("the cgroup limit of {dir}"),
            };
        }
    }
    Some(best)
}

/// `MemAvailable` of a /proc/meminfo text, in bytes.
fn meminfo_available(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kb.checked_mul(1024)
}

/// The smallest memory left under a cgroup v2 limit on the way from this process's cgroup to
/// the root, with the cgroup's folder: `memory.max − memory.current`, plus the inactive file
/// cache (`memory.stat`), which the kernel reclaims before it kills anything.
fn cgroup_left() -> Option<(u64, String)> {
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    // cgroup v2: the line "0::/path".
    let rel = own.lines().find_map(|l| l.strip_prefix("0::"))?.trim();
    let root = Path::new("/sys/fs/cgroup");
    let mut dir = root.join(rel.trim_start_matches('/'));
    let mut best: Option<(u64, String)> = None;
    loop {
        let read = |name: &str| std::fs::read_to_string(dir.join(name)).ok();
        if let (Some(max), Some(current)) = (read("memory.max"), read("memory.current")) {
            if let (Ok(max), Ok(current)) =
                (max.trim().parse::<u64>(), current.trim().parse::<u64>())
            {
                let inactive = read("memory.stat")
                    .and_then(|s| stat_field(&s, "inactive_file"))
                    .unwrap_or(0);
                let left = max.saturating_sub(current.saturating_sub(inactive));
                if best.as_ref().is_none_or(|(b, _)| left < *b) {
                    best = Some((left, dir.display().to_string()));
                }
            }
        }
        if dir == root || !dir.pop() || !dir.starts_with(root) {
            break;
        }
    }
    best
}

/// A field of a cgroup `memory.stat` text.
fn stat_field(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (key, value) = l.split_once(' ')?;
        (key == name).then(|| value.trim().parse().ok()).flatten()
    })
}

/// Bytes as GB with one decimal (10⁹ bytes, as the error says).
pub fn gb(bytes: u128) -> String {
    format!("{:.1}", bytes as f64 / 1e9)
}

/// Refuses `need` when it exceeds what `be` has free: an [`Error::Memory`] that names `what`,
/// the estimate and its largest parts, the available memory and where that figure comes from,
/// and the ways out. [`SKIP_ENV`]`=1` skips the check.
pub fn check_fits<B: Backend>(be: &B, need: &MemoryNeed, what: &str) -> Result<()> {
    if std::env::var(SKIP_ENV).is_ok_and(|v| v.trim() == "1") {
        return Ok(());
    }
    check_index_range(be, need, what)?;
    let Some(avail) = available(be)? else {
        return Ok(());
    };
    check_against(need, &avail, what)
}

/// The largest element count a GPU kernel indexes (they use 32-bit integers).
pub const MAX_GPU_BUFFER_ELEMENTS: u128 = i32::MAX as u128;

/// Refuses, on a GPU backend (real or virtual), a workload with a buffer past the kernels'
/// 32-bit indices: that would be a failed launch deep inside a step, not an error here.
fn check_index_range<B: Backend>(be: &B, need: &MemoryNeed, what: &str) -> Result<()> {
    if be.name().starts_with("cpu-") || need.largest_buffer <= MAX_GPU_BUFFER_ELEMENTS {
        return Ok(());
    }
    Err(Error::Memory {
        what: what.to_string(),
        msg: format!(
            "one buffer would hold {} elements, more than the {MAX_GPU_BUFFER_ELEMENTS} the GPU \
             kernels index (32-bit); use a smaller batch or shorter lengths, or --device cpu",
            need.largest_buffer
        ),
    })
}

/// [`check_fits`] against a given availability.
pub fn check_against(need: &MemoryNeed, avail: &Available, what: &str) -> Result<()> {
    let total = need.total();
    if total <= avail.bytes as u128 {
        return Ok(());
    }
    let mut parts = [
        ("weights", need.weights),
        ("activations", need.activations),
        ("method + AdamW", need.method),
    ];
    parts.sort_by_key(|p| std::cmp::Reverse(p.1));
    let parts = parts
        .iter()
        .map(|(name, b)| format!("{name} {} GB", gb(*b)))
        .collect::<Vec<_>>()
        .join(", ");
    Err(Error::Memory {
        what: what.to_string(),
        msg: format!(
            "needs about {} GB ({parts}; with {}% and {} GB of overhead), {} has {} GB available \
             ({}). Lower the sizes (batch, lengths), store the weights in NF4 (--quant nf4, \
             quant = \"nf4\"), or set {SKIP_ENV}=1 to try anyway",
            gb(total),
            ((OVERHEAD_FACTOR - 1.0) * 100.0).round(),
            gb(OVERHEAD_BYTES),
            avail.place,
            gb(avail.bytes as u128),
            avail.source
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const F32: Storage = Storage {
        elem_bytes: 4,
        quant: Quant::None,
        device: false,
    };

    fn t5(name: &str) -> ModelShape {
        ModelShape::T5(t5_shape(name).unwrap())
    }

    #[test]
    fn t5_base_weights_are_its_parameter_count_in_f32() {
        let need = estimate(&t5("t5-base"), F32, &Workload::default());
        // t5-base has 222.9M weights (tied head); + one 32128 × 768 f32 host copy.
        let want = 4 * (222_903_552u128 + 32128 * 768);
        assert_eq!(need.weights, want, "{need:?}");
        assert_eq!((need.activations, need.method), (0, 0));
        if let ModelShape::T5(c) = t5("t5-base") {
            assert_eq!(c.param_count(), 222_903_552);
        }
    }

    #[test]
    fn t5_base_step_at_batch_8_by_64_is_near_a_hand_count() {
        let work = Workload {
            train_batch: 8,
            prompt_rows: 100,
            input_len: 64,
            target_len: 8,
            method_params: 76_800,
            ..Workload::default()
        };
        let need = estimate(&t5("t5-base"), F32, &work);
        // By hand: 8 rows of 164 encoder tokens = 1312; per encoder layer the two norm inputs
        // (2·C), q, k, v, out (4·HD) and the relu pre-activation (F): 1312 · (1536 + 3072 +
        // 3072) ≈ 10.1M elements, × 12 layers ≈ 121M; the decoder (72 tokens, plus the cross
        // k, v over 1312 tokens: ≈ 2.4M per layer) ≈ 29M; logits and gradient 2 · 72 · 32128
        // ≈ 4.6M; streams ≈ 4M: about 159M elements, 0.64 GB in f32.
        let hand = 0.64e9;
        let act = need.activations as f64;
        assert!(act > hand && act < 1.5 * hand, "{act:e} vs {hand:e}");
        // 76,800 parameters: gradients, master, two moments, a checkpoint copy.
        assert_eq!(need.method, 76_800 * (2 * 4 + 3 * 4 + 3 * 4));
    }

    #[test]
    fn nf4_stores_linear_weights_in_about_half_a_byte() {
        let dense = estimate(&t5("t5-large"), F32, &Workload::default()).weights;
        let nf4 = estimate(
            &t5("t5-large"),
            Storage {
                quant: Quant::Nf4,
                ..F32
            },
            &Workload::default(),
        )
        .weights;
        assert!(nf4 * 3 < dense, "{nf4} vs {dense}");
    }

    #[test]
    fn generation_counts_the_kv_caches_of_the_whole_output() {
        let base = Workload {
            generate_batch: 32,
            input_len: 256,
            max_new_tokens: 128,
            ..Workload::default()
        };
        let huge = Workload {
            max_new_tokens: 1_000_000_000,
            ..base
        };
        let (a, b) = (
            estimate(&t5("t5-base"), F32, &base).activations,
            estimate(&t5("t5-base"), F32, &huge).activations,
        );
        // 12 layers · 32 rows · 2 · 1e9 · 768 · 4 bytes ≈ 2.4 PB.
        assert!(a < 2_000_000_000 && b > 2_000_000_000_000_000, "{a} {b}");
    }

    #[test]
    fn the_largest_sizes_a_config_accepts_do_not_wrap() {
        let mut c = t5_shape("t5-base").unwrap();
        c.num_layers = crate::model::config::MAX_LAYERS;
        c.d_ff = crate::model::config::MAX_FF_WIDTH;
        // 2^63 rows of 2^64 tokens: every activation term is a multiple of 2^128, which
        // wrapping products would turn into 0.
        let work = Workload {
            train_batch: 1 << 63,
            input_len: 1 << 63,
            target_len: usize::MAX,
            prompt_rows: 1 << 63,
            method_params: u128::MAX,
            ..Workload::default()
        };
        // u128 products of u64 sizes can still overflow: they saturate (no panic with overflow
        // checks, no wrap to a small figure without).
        let need = estimate(&ModelShape::T5(c), F32, &work);
        assert_eq!((need.activations, need.method), (u128::MAX, u128::MAX));
        assert_eq!(need.total(), u128::MAX);
    }

    /// t5-small's logits at batch 600 × 128 target tokens: 600 · 129 · 32128 elements, past
    /// 2^31, though a big GPU could hold them: the GPU backends refuse, the CPU does not.
    #[test]
    fn a_buffer_past_32_bit_indices_is_refused_on_a_gpu_backend_only() {
        use crate::backend::cpu::CpuBackend;
        use crate::backend::gpu::{device::DType, vgpu::VirtualDevice, GpuBackend};
        let work = Workload {
            train_batch: 600,
            input_len: 64,
            target_len: 128,
            ..Workload::default()
        };
        let need = estimate(
            &t5("t5-small"),
            Storage::of(&CpuBackend::<f32>::new(), Quant::None),
            &work,
        );
        assert_eq!(need.largest_buffer, 600 * 129 * 32128);
        let gpu = GpuBackend::new(VirtualDevice::new(), DType::F32);
        let err = check_index_range(&gpu, &need, "fastpt step")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("fastpt step") && err.contains("2147483647"),
            "{err}"
        );
        check_index_range(&CpuBackend::<f32>::new(), &need, "fastpt step").unwrap();
        let half = Workload {
            train_batch: 300,
            ..work
        };
        let need = estimate(&t5("t5-small"), Storage::of(&gpu, Quant::None), &half);
        check_index_range(&gpu, &need, "fastpt step").unwrap();
    }

    #[test]
    fn refusal_names_the_need_the_parts_the_place_and_the_way_out() {
        let need = MemoryNeed {
            weights: 45_000_000_000,
            activations: 3_000_000_000,
            method: 1_000_000,
            largest_buffer: 1_000_000,
        };
        let avail = Available {
            bytes: 24_000_000_000,
            place: "the CPU",
            source: "MemAvailable in /proc/meminfo".into(),
        };
        let err = check_against(&need, &avail, "t5-11b")
            .unwrap_err()
            .to_string();
        for needle in [
            "t5-11b",
            "needs about 53.0 GB",
            "weights 45.0 GB, activations 3.0 GB",
            "the CPU has 24.0 GB available",
            "MemAvailable",
            SKIP_ENV,
        ] {
            assert!(err.contains(needle), "`{needle}` not in: {err}");
        }
        let small = MemoryNeed {
            weights: 1_000_000,
            ..need
        };
        let small = MemoryNeed {
            activations: 0,
            method: 0,
            ..small
        };
        check_against(&small, &avail, "t5-tiny").unwrap();
    }

    #[test]
    fn meminfo_and_memory_stat_are_read() {
        let text = "MemTotal:       32000000 kB\nMemFree: 100 kB\nMemAvailable:   24000000 kB\n";
        assert_eq!(meminfo_available(text), Some(24_000_000 * 1024));
        assert_eq!(meminfo_available("MemTotal: 5 kB\n"), None);
        let stat = "anon 100\nfile 50\ninactive_file 40\nactive_file 10\n";
        assert_eq!(stat_field(stat, "inactive_file"), Some(40));
        assert_eq!(stat_field(stat, "inactive_anon"), None);
    }
}
