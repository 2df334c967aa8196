//! Runtime model configs, read from a Hugging Face `config.json` and validated.

use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// The feed-forward block of a T5 layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeedForward {
    /// T5 v1.0: `wo(relu(wi(x)))`.
    Relu,
    /// T5 v1.1 / flan / mT5: `wo(gelu_tanh(wi_0(x)) * wi_1(x))`.
    GatedGelu,
}

/// The fields of a Hugging Face `T5Config` that the engine uses.
#[derive(Debug, Clone, PartialEq)]
pub struct T5Config {
    pub vocab_size: usize,
    /// Width of the residual stream (C).
    pub d_model: usize,
    /// Width of one attention head (D). `num_heads * d_kv` may differ from `d_model`.
    pub d_kv: usize,
    /// Hidden width of the feed-forward block (F).
    pub d_ff: usize,
    /// Encoder layers.
    pub num_layers: usize,
    /// Decoder layers (`num_decoder_layers`, defaulting to `num_layers`).
    pub num_decoder_layers: usize,
    /// Attention heads (H).
    pub num_heads: usize,
    pub relative_attention_num_buckets: usize,
    pub relative_attention_max_distance: usize,
    pub feed_forward: FeedForward,
    /// The lm_head is the shared embedding (v1.0); otherwise `lm_head.weight` (v1.1, flan).
    pub tie_word_embeddings: bool,
    /// Scale the decoder output by d_model^-0.5 before the lm_head (v1.0). Defaults to
    /// `tie_word_embeddings`; transformers 5 writes it as its own field.
    pub scale_decoder_outputs: bool,
    pub layer_norm_epsilon: f64,
    pub decoder_start_token_id: u32,
    pub pad_token_id: u32,
    pub eos_token_id: u32,
}

impl T5Config {
    /// Width of the concatenated attention heads (H·D); [`Self::check_sizes`] bounds it by
    /// [`MAX_INNER_DIM`].
    pub fn inner_dim(&self) -> usize {
        self.num_heads.saturating_mul(self.d_kv)
    }

    /// Every weight of the model, in u128 (no size a config holds wraps it).
    pub fn param_count(&self) -> u128 {
        let w = |x: usize| x as u128;
        let (c, hd, f) = (
            w(self.d_model),
            w(self.num_heads) * w(self.d_kv),
            w(self.d_ff),
        );
        let ffn = match self.feed_forward {
            FeedForward::Relu => 2 * c * f,
            FeedForward::GatedGelu => 3 * c * f,
        };
        let embeddings = w(self.vocab_size) * c * if self.tie_word_embeddings { 1 } else { 2 };
        let bias = 2 * w(self.relative_attention_num_buckets) * w(self.num_heads);
        embeddings
            + bias
            + w(self.num_layers) * (4 * c * hd + ffn + 2 * c)
            + w(self.num_decoder_layers) * (8 * c * hd + ffn + 3 * c)
            + 2 * c
    }

    /// Every size against its limit ([`MAX_WIDTH`], [`MAX_LAYERS`], ...) and the weight count
    /// against [`MAX_MODEL_PARAMS`]; errors name `path`, the field, the value and the limit.
    /// Config.json's reader calls it, and so does every built-in shape.
    pub fn check_sizes(&self, path: &Path) -> Result<()> {
        within(
            path,
            "vocab_size",
            self.vocab_size,
            MAX_VOCAB_SIZE,
            "MAX_VOCAB_SIZE",
        )?;
        within(path, "d_model", self.d_model, MAX_WIDTH, "MAX_WIDTH")?;
        within(path, "d_kv", self.d_kv, MAX_HEAD_DIM, "MAX_HEAD_DIM")?;
        within(path, "d_ff", self.d_ff, MAX_FF_WIDTH, "MAX_FF_WIDTH")?;
        within(
            path,
            "num_layers",
            self.num_layers,
            MAX_LAYERS,
            "MAX_LAYERS",
        )?;
        within(
            path,
            "num_decoder_layers",
            self.num_decoder_layers,
            MAX_LAYERS,
            "MAX_LAYERS",
        )?;
        within(path, "num_heads", self.num_heads, MAX_HEADS, "MAX_HEADS")?;
        within(
            path,
            "relative_attention_num_buckets",
            self.relative_attention_num_buckets,
            MAX_BUCKETS,
            "MAX_BUCKETS",
        )?;
        within(
            path,
            "relative_attention_max_distance",
            self.relative_attention_max_distance,
            MAX_POSITIONS,
            "MAX_POSITIONS",
        )?;
        within_inner(path, ("num_heads", self.num_heads), ("d_kv", self.d_kv))?;
        within_params(path, "num_layers", self.param_count())
    }
}

/// The values `feed_forward_proj` may take, as written in an error message.
const ACCEPTED_FEED_FORWARD: &str = "\"relu\" (T5 v1.0) or \"gated-gelu\" (T5 v1.1, flan-T5, mT5)";

/// Limits on config.json's sizes, far above any published model (the largest have vocabularies
/// of 256k, widths of 16k, feed-forward widths of 64k, 128 heads of 256, 126 layers) and low
/// enough that no product of them wraps in 64 bits: a value past one is a typing mistake or a
/// hostile file, refused before a layer list or a tensor is sized from it. Whether a model
/// within them fits is the memory estimate's question (model/memory.rs).
pub const MAX_VOCAB_SIZE: usize = 1 << 24;
/// d_model / hidden_size.
pub const MAX_WIDTH: usize = 1 << 17;
/// d_ff / intermediate_size.
pub const MAX_FF_WIDTH: usize = 1 << 20;
/// num_heads / num_attention_heads / num_key_value_heads.
pub const MAX_HEADS: usize = 1 << 12;
/// d_kv / head_dim.
pub const MAX_HEAD_DIM: usize = 1 << 12;
/// Heads × head width (H·D), the width of the attention projections.
pub const MAX_INNER_DIM: usize = 1 << 18;
/// num_layers / num_decoder_layers / num_hidden_layers.
pub const MAX_LAYERS: usize = 1 << 10;
/// relative_attention_num_buckets.
pub const MAX_BUCKETS: usize = 1 << 12;
/// relative_attention_max_distance, max_position_embeddings and RoPE's
/// original_max_position_embeddings.
pub const MAX_POSITIONS: usize = 1 << 24;
/// Every weight of the model together (2.2 trillion).
pub const MAX_MODEL_PARAMS: u128 = 1 << 41;

/// `value` of `field` is at most `limit` (named `limit_name` in the error).
fn within(path: &Path, field: &str, value: usize, limit: usize, limit_name: &str) -> Result<()> {
    if value > limit {
        return Err(Error::config(
            path,
            field,
            format!(
                "{value} is too large: fastpt accepts at most {limit} ({limit_name}; no \
                 published model comes near it)"
            ),
        ));
    }
    Ok(())
}

/// Heads × head width against [`MAX_INNER_DIM`], blaming the heads field. Both factors were
/// checked against their own limits first, so the product cannot wrap.
fn within_inner(path: &Path, heads: (&str, usize), width: (&str, usize)) -> Result<()> {
    let inner = heads.1 * width.1;
    if inner > MAX_INNER_DIM {
        return Err(Error::config(
            path,
            heads.0,
            format!(
                "{} × {} = {} × {} = {inner} is too large: fastpt accepts at most \
                 {MAX_INNER_DIM} (MAX_INNER_DIM)",
                heads.0, width.0, heads.1, width.1
            ),
        ));
    }
    Ok(())
}

/// The model's weight count against [`MAX_MODEL_PARAMS`]; `field` is the field to blame.
fn within_params(path: &Path, field: &str, params: u128) -> Result<()> {
    if params > MAX_MODEL_PARAMS {
        return Err(Error::config(
            path,
            field,
            format!(
                "these sizes give {params} weights; fastpt accepts at most {MAX_MODEL_PARAMS} \
                 (MAX_MODEL_PARAMS)"
            ),
        ));
    }
    Ok(())
}

impl T5Config {
    /// Reads and validates a Hugging Face T5 `config.json`.
    ///
    /// See [`T5Config::from_json_str`] for the rules.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json_str(&text, path)
    }

    /// Parses and validates the text of a Hugging Face T5 `config.json`; `path` is only used in
    /// error messages.
    ///
    /// Required: `vocab_size`, `d_model`, `d_kv`, `d_ff`, `num_layers`, `num_heads`. Absent (or
    /// `null`) optional fields take Hugging Face's `T5Config` defaults: `num_decoder_layers` =
    /// `num_layers`, `relative_attention_num_buckets` = 32, `relative_attention_max_distance` =
    /// 128, `feed_forward_proj` = `"relu"`, `tie_word_embeddings` = true, `layer_norm_epsilon` =
    /// 1e-6, `pad_token_id` = 0, `eos_token_id` = 1 (a list takes its first element), and
    /// `decoder_start_token_id` = `pad_token_id` (what Hugging Face uses for T5).
    ///
    /// `num_heads * d_kv` may differ from `d_model` (t5-11b, for instance): the attention
    /// projections map C to H·D and back, so it is allowed.
    ///
    /// Errors: malformed JSON is an [`Error::Format`] with serde_json's line and column; every
    /// field that is missing, of the wrong JSON type, or out of range is an [`Error::Config`]
    /// naming the field, the value found and the rule it breaks.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        let obj = json_object(text, path)?;
        let fields = Fields { obj: &obj, path };

        if let Some(v) = fields.get("model_type") {
            match v.as_str() {
                Some("t5" | "mt5") => {}
                _ => {
                    return Err(Error::config(
                        path,
                        "model_type",
                        format!(
                            "unsupported model type {}; fastpt reads \"t5\" and \"mt5\"",
                            show(v)
                        ),
                    ))
                }
            }
        }

        let vocab_size = fields.size("vocab_size", None)?;
        let d_model = fields.size("d_model", None)?;
        let d_kv = fields.size("d_kv", None)?;
        let d_ff = fields.size("d_ff", None)?;
        let num_layers = fields.size("num_layers", None)?;
        let num_decoder_layers = fields.size("num_decoder_layers", Some(num_layers))?;
        let num_heads = fields.size("num_heads", None)?;

        let num_buckets = fields.size("relative_attention_num_buckets", Some(32))?;
        let max_distance = fields.size("relative_attention_max_distance", Some(128))?;
        // Hugging Face's `_relative_position_bucket` computes, for a distance n >= max_exact,
        //     max_exact + log(n / max_exact) / log(max_distance / max_exact) * (buckets - max_exact)
        // where, in the bidirectional encoder, buckets = num_buckets / 2 and
        // max_exact = num_buckets / 4 (integer divisions), and in the causal decoder
        // buckets = num_buckets and max_exact = num_buckets / 2. Both need max_exact >= 1 (else
        // n / 0) and max_distance > max_exact (else the log is 0 or negative: division by zero
        // or buckets that shrink with distance). The encoder's max_exact >= 1 needs
        // num_buckets >= 4; the decoder's max_exact is the larger one, so
        // max_distance > num_buckets / 2 covers both. Even: the encoder splits the buckets into
        // two equal halves, one per direction.
        if num_buckets < 4 || num_buckets % 2 != 0 {
            return Err(Error::config(
                path,
                "relative_attention_num_buckets",
                format!(
                    "{num_buckets} is invalid: it must be even and at least 4 (the encoder gives \
                     half of the buckets to each direction and needs at least one exact bucket \
                     per half)"
                ),
            ));
        }
        if max_distance <= num_buckets / 2 {
            return Err(Error::config(
                path,
                "relative_attention_max_distance",
                format!(
                    "{max_distance} is invalid: it must be greater than \
                     relative_attention_num_buckets / 2 = {} (the log-spaced buckets start there)",
                    num_buckets / 2
                ),
            ));
        }

        let feed_forward = match fields.get("feed_forward_proj") {
            None => FeedForward::Relu,
            Some(v) => match v.as_str() {
                Some("relu") => FeedForward::Relu,
                Some("gated-gelu") => FeedForward::GatedGelu,
                _ => {
                    return Err(Error::config(
                        path,
                        "feed_forward_proj",
                        format!(
                            "unsupported value {}; accepted: {ACCEPTED_FEED_FORWARD}",
                            show(v)
                        ),
                    ))
                }
            },
        };

        let tie_word_embeddings = fields.boolean("tie_word_embeddings", true)?;
        // transformers >= 5 writes `scale_decoder_outputs` separately; hub configs only have
        // `tie_word_embeddings`, which then implies the rescaling (as transformers 4 did).
        let scale_decoder_outputs = fields.boolean("scale_decoder_outputs", tie_word_embeddings)?;

        let layer_norm_epsilon = fields.positive("layer_norm_epsilon", 1e-6)?;

        let pad_token_id = fields.token_id("pad_token_id", 0, vocab_size)?;
        let decoder_start_token_id =
            fields.token_id("decoder_start_token_id", pad_token_id, vocab_size)?;
        let eos_token_id = fields.token_id("eos_token_id", 1, vocab_size)?;

        let cfg = T5Config {
            vocab_size,
            d_model,
            d_kv,
            d_ff,
            num_layers,
            num_decoder_layers,
            num_heads,
            relative_attention_num_buckets: num_buckets,
            relative_attention_max_distance: max_distance,
            feed_forward,
            tie_word_embeddings,
            scale_decoder_outputs,
            layer_norm_epsilon,
            decoder_start_token_id,
            pad_token_id,
            eos_token_id,
        };
        cfg.check_sizes(path)?;
        Ok(cfg)
    }
}

/// Rotary-embedding frequency scaling (`rope_scaling` / `rope_parameters` in config.json).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE: `inv_freq[i] = theta^(−2i/D)`.
    None,
    /// Llama 3.1's frequency-dependent rescaling of long wavelengths.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
}

impl T5Config {
    /// The config as a Hugging Face `config.json` (what `from_json_str` reads back to the same
    /// config): a built-in shape for transformers (tools/peft_baseline.py).
    pub fn to_hf_json(&self) -> serde_json::Value {
        let (proj, act) = match self.feed_forward {
            FeedForward::Relu => ("relu", "relu"),
            FeedForward::GatedGelu => ("gated-gelu", "gelu_new"),
        };
        serde_json::json!({
            "model_type": "t5",
            "architectures": ["T5ForConditionalGeneration"],
            "vocab_size": self.vocab_size,
            "d_model": self.d_model,
            "d_kv": self.d_kv,
            "d_ff": self.d_ff,
            "num_layers": self.num_layers,
            "num_decoder_layers": self.num_decoder_layers,
            "num_heads": self.num_heads,
            "relative_attention_num_buckets": self.relative_attention_num_buckets,
            "relative_attention_max_distance": self.relative_attention_max_distance,
            "feed_forward_proj": proj,
            "dense_act_fn": act,
            "is_gated_act": self.feed_forward == FeedForward::GatedGelu,
            "tie_word_embeddings": self.tie_word_embeddings,
            "scale_decoder_outputs": self.scale_decoder_outputs,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "decoder_start_token_id": self.decoder_start_token_id,
            "pad_token_id": self.pad_token_id,
            "eos_token_id": self.eos_token_id,
            "dropout_rate": 0.0,
        })
    }
}

impl LlamaConfig {
    /// The config as a Hugging Face `config.json` (see [`T5Config::to_hf_json`]).
    pub fn to_hf_json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_ids,
            "pad_token_id": self.pad_token_id,
            "hidden_act": "silu",
            "attention_dropout": 0.0,
        });
        if let RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } = self.rope_scaling
        {
            v["rope_scaling"] = serde_json::json!({
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor,
                "original_max_position_embeddings": original_max_position_embeddings,
            });
        }
        v
    }
}

/// The fields of a Hugging Face `LlamaConfig` that the engine uses.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    /// Width of the residual stream (C).
    pub hidden_size: usize,
    /// Hidden width of the SwiGLU MLP (F).
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    /// Query heads (H).
    pub num_attention_heads: usize,
    /// Key/value heads (Hkv, grouped-query attention); divides H.
    pub num_key_value_heads: usize,
    /// Width of one head (D): `head_dim` when given, else C / H.
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    /// The lm_head is the token embedding table (no `lm_head.weight`).
    pub tie_word_embeddings: bool,
    pub bos_token_id: u32,
    /// Generation stops at any of these (Llama 3 instruct lists several).
    pub eos_token_ids: Vec<u32>,
    /// Llama checkpoints usually have none; padding then uses `eos_token_ids[0]`.
    pub pad_token_id: Option<u32>,
}

impl LlamaConfig {
    /// Width of the concatenated query heads (H·D); bounded by [`MAX_INNER_DIM`].
    pub fn q_dim(&self) -> usize {
        self.num_attention_heads.saturating_mul(self.head_dim)
    }

    /// Width of the concatenated key (or value) heads (Hkv·D).
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads.saturating_mul(self.head_dim)
    }

    /// Every weight of the model, in u128 (no size a config holds wraps it).
    pub fn param_count(&self) -> u128 {
        let w = |x: usize| x as u128;
        let c = w(self.hidden_size);
        let qd = w(self.num_attention_heads) * w(self.head_dim);
        let kvd = w(self.num_key_value_heads) * w(self.head_dim);
        let layer = 2 * c * qd + 2 * c * kvd + 3 * c * w(self.intermediate_size) + 2 * c;
        let embeddings = w(self.vocab_size) * c * if self.tie_word_embeddings { 1 } else { 2 };
        embeddings + w(self.num_hidden_layers) * layer + c
    }

    /// Every size against its limit and the weight count against [`MAX_MODEL_PARAMS`] (see
    /// [`T5Config::check_sizes`]).
    pub fn check_sizes(&self, path: &Path) -> Result<()> {
        within(
            path,
            "vocab_size",
            self.vocab_size,
            MAX_VOCAB_SIZE,
            "MAX_VOCAB_SIZE",
        )?;
        within(
            path,
            "hidden_size",
            self.hidden_size,
            MAX_WIDTH,
            "MAX_WIDTH",
        )?;
        within(
            path,
            "intermediate_size",
            self.intermediate_size,
            MAX_FF_WIDTH,
            "MAX_FF_WIDTH",
        )?;
        within(
            path,
            "num_hidden_layers",
            self.num_hidden_layers,
            MAX_LAYERS,
            "MAX_LAYERS",
        )?;
        within(
            path,
            "num_attention_heads",
            self.num_attention_heads,
            MAX_HEADS,
            "MAX_HEADS",
        )?;
        within(
            path,
            "num_key_value_heads",
            self.num_key_value_heads,
            MAX_HEADS,
            "MAX_HEADS",
        )?;
        within(
            path,
            "head_dim",
            self.head_dim,
            MAX_HEAD_DIM,
            "MAX_HEAD_DIM",
        )?;
        within(
            path,
            "max_position_embeddings",
            self.max_position_embeddings,
            MAX_POSITIONS,
            "MAX_POSITIONS",
        )?;
        if let RopeScaling::Llama3 {
            original_max_position_embeddings,
            ..
        } = self.rope_scaling
        {
            within(
                path,
                "rope_scaling.original_max_position_embeddings",
                original_max_position_embeddings,
                MAX_POSITIONS,
                "MAX_POSITIONS",
            )?;
        }
        within_inner(
            path,
            ("num_attention_heads", self.num_attention_heads),
            ("head_dim", self.head_dim),
        )?;
        within_params(path, "num_hidden_layers", self.param_count())
    }

    /// The id that pads token rows: `pad_token_id`, else the first EOS id.
    pub fn pad_id(&self) -> u32 {
        self.pad_token_id.unwrap_or(self.eos_id())
    }

    /// The EOS id that ends a target (the first of `eos_token_ids`; config.json parsing never
    /// leaves the list empty).
    pub fn eos_id(&self) -> u32 {
        self.eos_token_ids.first().copied().unwrap_or(2)
    }

    /// Reads and validates a Hugging Face Llama `config.json` (see [`Self::from_json_str`]).
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json_str(&text, path)
    }

    /// Parses and validates the text of a Llama `config.json`; `path` is only used in errors.
    ///
    /// Required: `vocab_size`, `hidden_size`, `intermediate_size`, `num_hidden_layers`,
    /// `num_attention_heads`. Defaults as Hugging Face's `LlamaConfig`: `num_key_value_heads` =
    /// H, `head_dim` = C / H, `rms_norm_eps` = 1e-6, `rope_theta` = 10000,
    /// `max_position_embeddings` = 2048, `tie_word_embeddings` = false, `bos_token_id` = 1,
    /// `eos_token_id` = 2 (a list keeps every id), `pad_token_id` = none. RoPE settings are read
    /// from `rope_theta` + `rope_scaling` (hub configs) or from `rope_parameters` (written by
    /// transformers 5); `rope_type` may be `"default"` or `"llama3"`. `hidden_act` must be
    /// `"silu"`, `attention_bias` and `mlp_bias` false: other variants are not implemented.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        let obj = json_object(text, path)?;
        let fields = Fields { obj: &obj, path };
        let cfg_err = |field: &str, msg: String| Error::config(path, field, msg);

        if let Some(v) = fields.get("model_type") {
            if v.as_str() != Some("llama") {
                return Err(cfg_err(
                    "model_type",
                    format!("unsupported model type {}; expected \"llama\"", show(v)),
                ));
            }
        }
        if let Some(v) = fields.get("hidden_act") {
            if v.as_str() != Some("silu") {
                return Err(cfg_err(
                    "hidden_act",
                    format!(
                        "unsupported activation {}; Llama's MLP is \"silu\" (SwiGLU)",
                        show(v)
                    ),
                ));
            }
        }
        for field in ["attention_bias", "mlp_bias"] {
            if fields.boolean(field, false)? {
                return Err(cfg_err(
                    field,
                    "true is not supported: fastpt's Llama has bias-free projections".into(),
                ));
            }
        }

        let vocab_size = fields.size("vocab_size", None)?;
        let hidden_size = fields.size("hidden_size", None)?;
        let intermediate_size = fields.size("intermediate_size", None)?;
        let num_hidden_layers = fields.size("num_hidden_layers", None)?;
        let heads = fields.size("num_attention_heads", None)?;
        let kv_heads = fields.size("num_key_value_heads", Some(heads))?;
        if heads % kv_heads != 0 {
            return Err(cfg_err(
                "num_key_value_heads",
                format!(
                    "{kv_heads} is invalid: it must divide num_attention_heads = {heads} \
                     (each key/value head serves a whole group of query heads)"
                ),
            ));
        }
        let head_dim = match fields.get("head_dim") {
            Some(_) => fields.size("head_dim", None)?,
            None => {
                if hidden_size % heads != 0 {
                    return Err(cfg_err(
                        "head_dim",
                        format!(
                            "absent, and hidden_size = {hidden_size} is not a multiple of \
                             num_attention_heads = {heads}; give head_dim explicitly"
                        ),
                    ));
                }
                hidden_size / heads
            }
        };
        if head_dim % 2 != 0 {
            return Err(cfg_err(
                "head_dim",
                format!(
                    "{head_dim} is invalid: rotary embeddings rotate pairs, so it must be even"
                ),
            ));
        }
        let rms_norm_eps = fields.positive("rms_norm_eps", 1e-6)?;
        let max_position_embeddings = fields.size("max_position_embeddings", Some(2048))?;
        let (rope_theta, rope_scaling) = fields.rope()?;
        let tie_word_embeddings = fields.boolean("tie_word_embeddings", false)?;
        let bos_token_id = fields.token_id("bos_token_id", 1, vocab_size)?;
        let eos_token_ids = fields.token_ids("eos_token_id", 2, vocab_size)?;
        let pad_token_id = match fields.get("pad_token_id") {
            None => None,
            Some(_) => Some(fields.token_id("pad_token_id", 0, vocab_size)?),
        };
        let cfg = LlamaConfig {
            vocab_size,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            rms_norm_eps,
            rope_theta,
            rope_scaling,
            max_position_embeddings,
            tie_word_embeddings,
            bos_token_id,
            eos_token_ids,
            pad_token_id,
        };
        cfg.check_sizes(path)?;
        Ok(cfg)
    }
}

/// The backbone family a model folder holds, from `model_type` in its config.json.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    T5,
    Llama,
}

impl Architecture {
    /// Reads `model_type` from `config.json`: `"t5"`/`"mt5"` or `"llama"`.
    pub fn of_config(path: &Path) -> Result<Self> {
        // A missing config.json: say what the folder is (a Hub id, not a model folder, ...).
        if let (false, Some(dir)) = (path.is_file(), path.parent()) {
            super::folder::check_model_dir(dir)?;
        }
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::of_config_str(&text, path)
    }

    /// [`Self::of_config`] on the text of a config.json; `path` names it in errors.
    pub fn of_config_str(text: &str, path: &Path) -> Result<Self> {
        let obj = json_object(text, path)?;
        match obj.get("model_type") {
            Some(v) => match v.as_str() {
                Some("t5" | "mt5") => Ok(Architecture::T5),
                Some("llama") => Ok(Architecture::Llama),
                _ => Err(Error::config(
                    path,
                    "model_type",
                    format!(
                        "{} is not supported; fastpt reads \"t5\", \"mt5\" and \"llama\"",
                        show(v)
                    ),
                )),
            },
            // Old configs may lack model_type: T5 names its width d_model, Llama hidden_size.
            None if obj.contains_key("d_model") => Ok(Architecture::T5),
            None if obj.contains_key("hidden_size") => Ok(Architecture::Llama),
            None => Err(Error::config(
                path,
                "model_type",
                "absent, and neither d_model (T5) nor hidden_size (Llama) says the family",
            )),
        }
    }
}

/// The top-level object of a config file, with typed getters whose errors name the field.
struct Fields<'a> {
    obj: &'a Map<String, Value>,
    path: &'a Path,
}

impl Fields<'_> {
    /// A boolean field, `default` when absent.
    fn boolean(&self, field: &str, default: bool) -> Result<bool> {
        match self.get(field) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| {
                Error::config(
                    self.path,
                    field,
                    format!("expected true or false, found {}", show(v)),
                )
            }),
        }
    }

    /// A finite number > 0, `default` when absent.
    fn positive(&self, field: &str, default: f64) -> Result<f64> {
        let Some(v) = self.get(field) else {
            return Ok(default);
        };
        positive_number(v, field, self.path)
    }

    /// One token id or a list of them (every element kept), `default` when absent.
    fn token_ids(&self, field: &str, default: u32, vocab_size: usize) -> Result<Vec<u32>> {
        match self.get(field) {
            Some(Value::Array(items)) => {
                if items.is_empty() {
                    return Err(Error::config(
                        self.path,
                        field,
                        "is an empty list; expected token ids",
                    ));
                }
                items
                    .iter()
                    .map(|item| {
                        let obj: Map<String, Value> =
                            [(field.to_string(), item.clone())].into_iter().collect();
                        Fields {
                            obj: &obj,
                            path: self.path,
                        }
                        .token_id(field, default, vocab_size)
                    })
                    .collect()
            }
            _ => Ok(vec![self.token_id(field, default, vocab_size)?]),
        }
    }

    /// `(rope_theta, scaling)` from `rope_theta` + `rope_scaling` (hub configs) or from
    /// `rope_parameters` (transformers 5), whichever is present.
    fn rope(&self) -> Result<(f64, RopeScaling)> {
        let (params, params_field) = match (self.get("rope_parameters"), self.get("rope_scaling")) {
            (Some(p), _) => (Some(p), "rope_parameters"),
            (None, Some(s)) => (Some(s), "rope_scaling"),
            (None, None) => (None, "rope_scaling"),
        };
        let obj = match params {
            None => None,
            Some(Value::Object(o)) => Some(o),
            Some(v) => {
                return Err(Error::config(
                    self.path,
                    params_field,
                    format!("expected an object or null, found {}", show(v)),
                ))
            }
        };
        // rope_theta sits inside rope_parameters (transformers 5) or at the top level.
        let theta_value = obj
            .and_then(|o| o.get("rope_theta"))
            .or_else(|| self.get("rope_theta"));
        let theta = match theta_value {
            None => 10000.0,
            Some(v) => positive_number(v, "rope_theta", self.path)?,
        };
        let Some(obj) = obj else {
            return Ok((theta, RopeScaling::None));
        };
        let field = |name: &str| format!("{params_field}.{name}");
        let kind = obj
            .get("rope_type")
            .or_else(|| obj.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let number = |name: &str| -> Result<f64> {
            let v = obj.get(name).ok_or_else(|| {
                Error::config(self.path, field(name), "required for llama3 rope scaling")
            })?;
            positive_number(v, &field(name), self.path)
        };
        match kind {
            "default" => Ok((theta, RopeScaling::None)),
            "llama3" => {
                let original = number("original_max_position_embeddings")?;
                if original.fract() != 0.0 {
                    return Err(Error::config(
                        self.path,
                        field("original_max_position_embeddings"),
                        format!("{original} is not an integer"),
                    ));
                }
                let (low, high) = (number("low_freq_factor")?, number("high_freq_factor")?);
                if high <= low {
                    return Err(Error::config(
                        self.path,
                        field("high_freq_factor"),
                        format!("{high} must be greater than low_freq_factor = {low}"),
                    ));
                }
                Ok((
                    theta,
                    RopeScaling::Llama3 {
                        factor: number("factor")?,
                        low_freq_factor: low,
                        high_freq_factor: high,
                        original_max_position_embeddings: original as usize,
                    },
                ))
            }
            other => Err(Error::config(
                self.path,
                field("rope_type"),
                format!("{other:?} is not supported; fastpt implements \"default\" and \"llama3\""),
            )),
        }
    }

    /// The field's value; `null` counts as absent, as Hugging Face treats `None` as "use the
    /// default".
    fn get(&self, field: &str) -> Option<&Value> {
        self.obj.get(field).filter(|v| !v.is_null())
    }

    /// A non-negative JSON integer; `default` is used when absent, and `None` makes it required.
    fn uint(&self, field: &str, default: Option<u64>) -> Result<u64> {
        match self.get(field) {
            None => default.ok_or_else(|| {
                let msg = if self.obj.contains_key(field) {
                    "is null, but it is required (a positive integer)"
                } else {
                    "required field is missing (a positive integer)"
                };
                Error::config(self.path, field, msg)
            }),
            // as_u64 is None for negative numbers, fractions, and integral floats like 512.0
            // or 1e9 (JSON numbers with an exponent or a decimal point are floats to serde).
            Some(v) => v.as_u64().ok_or_else(|| {
                let hint = match v.as_f64() {
                    Some(x) if v.is_f64() && x.fract() == 0.0 && x >= 0.0 => format!(
                        " (a floating-point number: write the integer without an exponent or \
                         decimal point{})",
                        if x <= 1e15 {
                            format!(", e.g. {x:.0}")
                        } else {
                            String::new()
                        }
                    ),
                    _ => String::new(),
                };
                Error::config(
                    self.path,
                    field,
                    format!("expected a non-negative integer, found {}{hint}", show(v)),
                )
            }),
        }
    }

    /// A size (a count or a width): an integer >= 1.
    fn size(&self, field: &str, default: Option<usize>) -> Result<usize> {
        let n = self.uint(field, default.map(|d| d as u64))?;
        if n == 0 {
            return Err(Error::config(
                self.path,
                field,
                "0 is invalid: it must be at least 1",
            ));
        }
        usize::try_from(n).map_err(|_| {
            Error::config(
                self.path,
                field,
                format!("{n} is too large for this platform"),
            )
        })
    }

    /// A token id: an integer below `vocab_size`. A list (some configs list several eos ids)
    /// takes its first element.
    fn token_id(&self, field: &str, default: u32, vocab_size: usize) -> Result<u32> {
        let id = match self.get(field) {
            Some(Value::Array(items)) => {
                let first = items.first().ok_or_else(|| {
                    Error::config(self.path, field, "is an empty list; expected a token id")
                })?;
                first.as_u64().ok_or_else(|| {
                    Error::config(
                        self.path,
                        field,
                        format!("expected a non-negative integer, found {}", show(first)),
                    )
                })?
            }
            _ => self.uint(field, Some(u64::from(default)))?,
        };
        if id >= vocab_size as u64 {
            return Err(Error::config(
                self.path,
                field,
                format!("{id} is invalid: token ids must be below vocab_size = {vocab_size}"),
            ));
        }
        // vocab_size may in principle exceed u32::MAX; ids fed to the model are u32.
        u32::try_from(id).map_err(|_| {
            Error::config(
                self.path,
                field,
                format!("{id} is too large for a u32 token id"),
            )
        })
    }
}

/// How a checkpoint stores its linear weights, from config.json's `quantization_config`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointQuant {
    /// No `quantization_config`: full-precision weights.
    None,
    /// bitsandbytes 4-bit as transformers saves it with `BitsAndBytesConfig(load_in_4bit=True,
    /// bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)`, f32 compute: the quantised
    /// linears load into fastpt's NF4 storage as they are.
    BnbNf4,
}

impl CheckpointQuant {
    /// The quantisation of the checkpoint whose config.json is `path`.
    pub fn of_config(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::of_config_str(&text, path)
    }

    /// [`Self::of_config`] on the text of a config.json; `path` names it in errors.
    ///
    /// Absent keys take `BitsAndBytesConfig`'s defaults (quant type fp4, no double quantisation,
    /// storage uint8, compute dtype float32). Everything but 4-bit NF4 with double quantisation,
    /// float32 compute and uint8 storage is refused, naming the field and its value: fp4, plain
    /// absmax, bf16/fp16 compute (bitsandbytes then rounds the dequantised weights to that type),
    /// 8-bit (LLM.int8) checkpoints and other quantisation methods.
    pub fn of_config_str(text: &str, path: &Path) -> Result<Self> {
        const Q: &str = "quantization_config";
        let obj = json_object(text, path)?;
        let qc = match obj.get(Q) {
            None | Some(Value::Null) => return Ok(CheckpointQuant::None),
            Some(Value::Object(qc)) => qc,
            Some(other) => {
                return Err(Error::config(
                    path,
                    Q,
                    format!("expected an object, found {}", show(other)),
                ))
            }
        };
        let field = |key: &str| format!("{Q}.{key}");
        let string = |key: &str, default: &str| -> Result<String> {
            match qc.get(key) {
                None | Some(Value::Null) => Ok(default.to_string()),
                Some(Value::String(s)) => Ok(s.clone()),
                Some(other) => Err(Error::config(
                    path,
                    field(key),
                    format!("expected a string, found {}", show(other)),
                )),
            }
        };
        let flag = |key: &str| -> Result<bool> {
            match qc.get(key) {
                None | Some(Value::Null) => Ok(false),
                Some(Value::Bool(b)) => Ok(*b),
                Some(other) => Err(Error::config(
                    path,
                    field(key),
                    format!("expected true or false, found {}", show(other)),
                )),
            }
        };
        let refuse = |key: &str, value: &str, why: &str| {
            Err(Error::config(path, field(key), format!("{value:?}: {why}")))
        };
        let method = string("quant_method", "")?;
        if method != "bitsandbytes" {
            return refuse(
                "quant_method",
                &method,
                "not supported; fastpt loads bitsandbytes 4-bit NF4 checkpoints (or full-precision ones)",
            );
        }
        if flag("load_in_8bit")? {
            return refuse(
                "load_in_8bit",
                "true",
                "8-bit (LLM.int8) checkpoints are not supported; fastpt loads bitsandbytes 4-bit NF4",
            );
        }
        if !flag("load_in_4bit")? {
            return refuse(
                "load_in_4bit",
                "false",
                "fastpt loads bitsandbytes 4-bit checkpoints only",
            );
        }
        let quant_type = string("bnb_4bit_quant_type", "fp4")?;
        if quant_type != "nf4" {
            return refuse(
                "bnb_4bit_quant_type",
                &quant_type,
                "only nf4 is supported (fastpt's 4-bit storage is NF4)",
            );
        }
        if !flag("bnb_4bit_use_double_quant")? {
            return refuse(
                "bnb_4bit_use_double_quant",
                "false",
                "only double-quantised absmax (bnb_4bit_use_double_quant=True) is supported",
            );
        }
        let compute = string("bnb_4bit_compute_dtype", "float32")?;
        if compute != "float32" {
            return refuse(
                "bnb_4bit_compute_dtype",
                &compute,
                "only float32 is supported (with another type bitsandbytes rounds the \
                 dequantised weights to it, which fastpt does not reproduce)",
            );
        }
        let storage = string("bnb_4bit_quant_storage", "uint8")?;
        if storage != "uint8" {
            return refuse(
                "bnb_4bit_quant_storage",
                &storage,
                "only uint8 storage is supported",
            );
        }
        Ok(CheckpointQuant::BnbNf4)
    }
}

/// The top-level object of a config file; malformed JSON is an [`Error::Format`] with
/// serde_json's line and column.
fn json_object(text: &str, path: &Path) -> Result<Map<String, Value>> {
    match serde_json::from_str(text) {
        Ok(Value::Object(obj)) => Ok(obj),
        Ok(other) => Err(Error::format(
            path,
            format!(
                "expected a JSON object at the top level, found {}",
                show(&other)
            ),
        )),
        Err(e) => Err(Error::format(path, format!("invalid JSON: {e}"))),
    }
}

/// A JSON number that is finite and > 0; errors name `field` in `path`.
fn positive_number(v: &Value, field: &str, path: &Path) -> Result<f64> {
    let x = v.as_f64().ok_or_else(|| {
        Error::config(path, field, format!("expected a number, found {}", show(v)))
    })?;
    if !(x.is_finite() && x > 0.0) {
        return Err(Error::config(
            path,
            field,
            format!(
                "{} is invalid: it must be finite and greater than 0",
                show(v)
            ),
        ));
    }
    Ok(x)
}

/// A JSON value as it appears in the file, shortened for an error message.
fn show(v: &Value) -> String {
    const MAX: usize = 80;
    let s = v.to_string();
    if s.chars().count() <= MAX {
        s
    } else {
        let head: String = s.chars().take(MAX).collect();
        format!("{head}...")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PATH: &str = "models/t5/config.json";

    /// The relevant fields of t5-small's config.json (v1.0).
    const T5_SMALL: &str = r#"{
        "architectures": ["T5ForConditionalGeneration"],
        "d_ff": 2048, "d_kv": 64, "d_model": 512, "decoder_start_token_id": 0,
        "dropout_rate": 0.1, "eos_token_id": 1, "initializer_factor": 1.0,
        "is_encoder_decoder": true, "layer_norm_epsilon": 1e-06, "model_type": "t5",
        "n_positions": 512, "num_heads": 8, "num_layers": 6, "output_past": true,
        "pad_token_id": 0, "relative_attention_num_buckets": 32, "vocab_size": 32128
    }"#;

    /// The relevant fields of google/flan-t5-base's config.json (v1.1 layout).
    const FLAN_T5_BASE: &str = r#"{
        "d_ff": 2048, "d_kv": 64, "d_model": 768, "decoder_start_token_id": 0,
        "dense_act_fn": "gelu_new", "eos_token_id": 1, "feed_forward_proj": "gated-gelu",
        "is_gated_act": true, "layer_norm_epsilon": 1e-06, "model_type": "t5",
        "num_decoder_layers": 12, "num_heads": 12, "num_layers": 12, "pad_token_id": 0,
        "relative_attention_max_distance": 128, "relative_attention_num_buckets": 32,
        "tie_word_embeddings": false, "vocab_size": 32128
    }"#;

    fn parse(text: &str) -> Result<T5Config> {
        T5Config::from_json_str(text, Path::new(PATH))
    }

    /// T5_SMALL with one field replaced (or removed when `value` is None).
    fn small_with(field: &str, value: Option<Value>) -> String {
        let mut v: Value = serde_json::from_str(T5_SMALL).unwrap();
        let obj = v.as_object_mut().unwrap();
        match value {
            Some(x) => obj.insert(field.to_string(), x),
            None => obj.remove(field),
        };
        v.to_string()
    }

    /// Asserts `text` fails with a Config error on `field` whose message contains every needle.
    fn assert_config_err(text: &str, field: &str, needles: &[&str]) {
        let err = parse(text).unwrap_err();
        let msg = err.to_string();
        match &err {
            Error::Config { field: f, path, .. } => {
                assert_eq!(f, field, "{msg}");
                assert_eq!(path, Path::new(PATH));
            }
            other => panic!("expected a Config error on {field}, got {other:?}"),
        }
        assert!(msg.contains(PATH), "{msg}");
        assert!(msg.contains(field), "{msg}");
        for n in needles {
            assert!(msg.contains(n), "`{n}` not in: {msg}");
        }
    }

    #[test]
    fn parses_v1_0_config_with_defaults() {
        let c = parse(T5_SMALL).unwrap();
        assert_eq!(
            c,
            T5Config {
                vocab_size: 32128,
                d_model: 512,
                d_kv: 64,
                d_ff: 2048,
                num_layers: 6,
                num_decoder_layers: 6,
                num_heads: 8,
                relative_attention_num_buckets: 32,
                relative_attention_max_distance: 128,
                feed_forward: FeedForward::Relu,
                tie_word_embeddings: true,
                scale_decoder_outputs: true,
                layer_norm_epsilon: 1e-6,
                decoder_start_token_id: 0,
                pad_token_id: 0,
                eos_token_id: 1,
            }
        );
        assert_eq!(c.inner_dim(), 512);
    }

    #[test]
    fn parses_v1_1_config() {
        let c = parse(FLAN_T5_BASE).unwrap();
        assert_eq!(c.feed_forward, FeedForward::GatedGelu);
        assert!(!c.tie_word_embeddings);
        assert_eq!(
            (c.d_model, c.num_layers, c.num_decoder_layers),
            (768, 12, 12)
        );
        assert_eq!(c.relative_attention_max_distance, 128);
    }

    #[test]
    fn mt5_and_absent_model_type_are_accepted() {
        parse(&small_with("model_type", Some("mt5".into()))).unwrap();
        parse(&small_with("model_type", None)).unwrap();
    }

    #[test]
    fn heads_times_d_kv_may_differ_from_d_model() {
        // t5-11b: d_model 1024, 128 heads of 128.
        let text = small_with("num_heads", Some(128.into()));
        let c = parse(&text).unwrap();
        assert_eq!(c.inner_dim(), 128 * 64);
        assert_ne!(c.inner_dim(), c.d_model);
    }

    #[test]
    fn null_num_decoder_layers_defaults_to_num_layers() {
        let c = parse(&small_with("num_decoder_layers", Some(Value::Null))).unwrap();
        assert_eq!(c.num_decoder_layers, 6);
        let c = parse(&small_with("num_decoder_layers", Some(3.into()))).unwrap();
        assert_eq!(c.num_decoder_layers, 3);
    }

    #[test]
    fn eos_list_takes_first_and_decoder_start_defaults_to_pad() {
        let mut v: Value = serde_json::from_str(T5_SMALL).unwrap();
        let obj = v.as_object_mut().unwrap();
        obj.insert("eos_token_id".into(), serde_json::json!([2, 7]));
        obj.insert("pad_token_id".into(), 5.into());
        obj.remove("decoder_start_token_id");
        let c = parse(&v.to_string()).unwrap();
        assert_eq!(
            (c.eos_token_id, c.pad_token_id, c.decoder_start_token_id),
            (2, 5, 5)
        );
    }

    #[test]
    fn missing_required_field() {
        assert_config_err(&small_with("d_kv", None), "d_kv", &["missing"]);
        assert_config_err(
            &small_with("vocab_size", Some(Value::Null)),
            "vocab_size",
            &["null"],
        );
    }

    #[test]
    fn wrong_types() {
        assert_config_err(
            &small_with("d_model", Some("512".into())),
            "d_model",
            &["\"512\""],
        );
        assert_config_err(
            &small_with("num_heads", Some((-8).into())),
            "num_heads",
            &["-8"],
        );
        assert_config_err(
            &small_with("d_ff", Some(2048.5.into())),
            "d_ff",
            &["2048.5"],
        );
        assert_config_err(
            &small_with("d_ff", Some(2048.0.into())),
            "d_ff",
            &["2048.0"],
        );
        assert_config_err(
            &small_with("tie_word_embeddings", Some("yes".into())),
            "tie_word_embeddings",
            &["\"yes\""],
        );
        assert_config_err(
            &small_with("layer_norm_epsilon", Some("1e-6".into())),
            "layer_norm_epsilon",
            &["\"1e-6\""],
        );
        assert_config_err(
            &small_with("eos_token_id", Some(serde_json::json!(["1"]))),
            "eos_token_id",
            &["\"1\""],
        );
        assert_config_err(
            &small_with("model_type", Some("bart".into())),
            "model_type",
            &["\"bart\"", "\"t5\"", "\"mt5\""],
        );
    }

    #[test]
    fn out_of_range() {
        assert_config_err(
            &small_with("num_layers", Some(0.into())),
            "num_layers",
            &["0", "at least 1"],
        );
        assert_config_err(
            &small_with("num_decoder_layers", Some(0.into())),
            "num_decoder_layers",
            &["0", "at least 1"],
        );
        let buckets = "relative_attention_num_buckets";
        assert_config_err(
            &small_with(buckets, Some(31.into())),
            buckets,
            &["31", "even"],
        );
        assert_config_err(
            &small_with(buckets, Some(2.into())),
            buckets,
            &["2", "at least 4"],
        );
        let dist = "relative_attention_max_distance";
        assert_config_err(
            &small_with(dist, Some(16.into())),
            dist,
            &["16", "greater than", "16"],
        );
        parse(&small_with(dist, Some(17.into()))).unwrap();
        let eps = "layer_norm_epsilon";
        assert_config_err(
            &small_with(eps, Some(0.into())),
            eps,
            &["0", "greater than 0"],
        );
        assert_config_err(&small_with(eps, Some((-1e-6).into())), eps, &["-1e-6"]);
        assert_config_err(
            &small_with("pad_token_id", Some(32128.into())),
            "pad_token_id",
            &["32128", "vocab_size"],
        );
        assert_config_err(
            &small_with("eos_token_id", Some(serde_json::json!([40000, 1]))),
            "eos_token_id",
            &["40000", "vocab_size = 32128"],
        );
        assert_config_err(
            &small_with("eos_token_id", Some(serde_json::json!([]))),
            "eos_token_id",
            &["empty list"],
        );
    }

    #[test]
    fn every_size_past_its_limit_is_refused_naming_field_value_and_limit() {
        let billion = 1_000_000_000u64;
        for (field, value, limit) in [
            ("num_layers", billion, "MAX_LAYERS"),
            ("num_decoder_layers", billion, "MAX_LAYERS"),
            ("vocab_size", 1 << 40, "MAX_VOCAB_SIZE"),
            ("d_model", 1 << 40, "MAX_WIDTH"),
            ("d_ff", 1 << 40, "MAX_FF_WIDTH"),
            ("d_kv", 1 << 32, "MAX_HEAD_DIM"),
            ("num_heads", 1 << 32, "MAX_HEADS"),
            ("relative_attention_max_distance", 1 << 40, "MAX_POSITIONS"),
        ] {
            assert_config_err(
                &small_with(field, Some(value.into())),
                field,
                &[&value.to_string(), limit],
            );
        }
        // Buckets past their limit, with a distance that the buckets' own rule accepts.
        let buckets = "relative_attention_num_buckets";
        let mut v: Value = serde_json::from_str(&small_with(buckets, Some(8192.into()))).unwrap();
        v["relative_attention_max_distance"] = 8192.into();
        assert_config_err(&v.to_string(), buckets, &["8192", "MAX_BUCKETS"]);
        // d_kv = num_heads = 2^32: their product wrapped to 0 ("expected shape [0, 36]").
        let text = small_with("d_kv", Some((1u64 << 32).into()));
        let mut v: Value = serde_json::from_str(&text).unwrap();
        v["num_heads"] = (1u64 << 32).into();
        let err = parse(&v.to_string()).unwrap_err().to_string();
        assert!(err.contains("4294967296") && err.contains("MAX_"), "{err}");
        // Within each limit, but a product past MAX_INNER_DIM.
        let text = small_with("d_kv", Some(4096.into()));
        let mut v: Value = serde_json::from_str(&text).unwrap();
        v["num_heads"] = 4096.into();
        assert_config_err(
            &v.to_string(),
            "num_heads",
            &["4096 × 4096", "MAX_INNER_DIM"],
        );
        // Each within its limit: the weight count (about 2^48) is refused, counted in u128.
        let mut v: Value = serde_json::from_str(T5_SMALL).unwrap();
        for (f, x) in [
            ("num_layers", MAX_LAYERS),
            ("d_model", MAX_WIDTH),
            ("d_ff", MAX_FF_WIDTH),
        ] {
            v[f] = x.into();
        }
        assert_config_err(&v.to_string(), "num_layers", &["MAX_MODEL_PARAMS"]);
    }

    #[test]
    fn a_float_where_an_integer_belongs_says_so() {
        // serde_json reads 1e9 as a float, which is no integer: the error says how to write it.
        let text = T5_SMALL.replace("\"num_layers\": 6", "\"num_layers\": 1e9");
        assert_config_err(
            &text,
            "num_layers",
            &["1000000000.0", "floating-point", "e.g. 1000000000"],
        );
    }

    #[test]
    fn llama_sizes_past_their_limits_are_refused() {
        for (field, value, limit) in [
            ("num_hidden_layers", 1_000_000_000u64, "MAX_LAYERS"),
            ("intermediate_size", 1 << 40, "MAX_FF_WIDTH"),
            ("max_position_embeddings", 1 << 40, "MAX_POSITIONS"),
            ("head_dim", 1 << 32, "MAX_HEAD_DIM"),
        ] {
            assert_llama_err(
                &llama_with(LLAMA2_7B, field, Some(value.into())),
                field,
                &[&value.to_string(), limit],
            );
        }
        assert_llama_err(
            &llama_with(
                LLAMA31_8B,
                "rope_scaling",
                Some(serde_json::json!({"rope_type": "llama3", "factor": 8.0,
                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 1e30})),
            ),
            "rope_scaling.original_max_position_embeddings",
            &["MAX_POSITIONS"],
        );
    }

    #[test]
    fn unknown_feed_forward_proj() {
        assert_config_err(
            &small_with("feed_forward_proj", Some("gated-silu".into())),
            "feed_forward_proj",
            &["\"gated-silu\"", "\"relu\"", "\"gated-gelu\""],
        );
    }

    #[test]
    fn malformed_json_is_a_format_error_with_position() {
        let err = parse("{\n  \"d_model\": 512,\n  \"d_kv\": }").unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, Error::Format { .. }), "{err:?}");
        assert!(msg.contains(PATH) && msg.contains("line 3"), "{msg}");
        let err = parse("[1, 2]").unwrap_err();
        assert!(matches!(err, Error::Format { .. }), "{err:?}");
    }

    #[test]
    fn from_file_reads_and_names_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, FLAN_T5_BASE).unwrap();
        assert_eq!(
            T5Config::from_file(&path).unwrap(),
            parse(FLAN_T5_BASE).unwrap()
        );
        let missing = dir.path().join("nope.json");
        let err = T5Config::from_file(&missing).unwrap_err();
        assert!(matches!(err, Error::Io { .. }), "{err:?}");
        assert!(err.to_string().contains("nope.json"), "{err}");
    }

    /// The relevant fields of meta-llama/Llama-2-7b-hf's config.json.
    const LLAMA2_7B: &str = r#"{
        "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2,
        "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
        "intermediate_size": 11008, "max_position_embeddings": 4096, "model_type": "llama",
        "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
        "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": null,
        "tie_word_embeddings": false, "torch_dtype": "float16", "vocab_size": 32000
    }"#;

    /// The relevant fields of meta-llama/Llama-3.1-8B's config.json.
    const LLAMA31_8B: &str = r#"{
        "attention_bias": false, "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
        "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 14336,
        "max_position_embeddings": 131072, "mlp_bias": false, "model_type": "llama",
        "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "tie_word_embeddings": false, "vocab_size": 128256
    }"#;

    fn llama(text: &str) -> Result<LlamaConfig> {
        LlamaConfig::from_json_str(text, Path::new(PATH))
    }

    fn llama_with(base: &str, field: &str, value: Option<Value>) -> String {
        let mut v: Value = serde_json::from_str(base).unwrap();
        let obj = v.as_object_mut().unwrap();
        match value {
            Some(x) => obj.insert(field.to_string(), x),
            None => obj.remove(field),
        };
        v.to_string()
    }

    fn assert_llama_err(text: &str, field: &str, needles: &[&str]) {
        let err = llama(text).unwrap_err();
        let msg = err.to_string();
        match &err {
            Error::Config { field: f, .. } => assert_eq!(f, field, "{msg}"),
            other => panic!("expected a Config error on {field}, got {other:?}"),
        }
        assert!(msg.contains(PATH), "{msg}");
        for n in needles {
            assert!(msg.contains(n), "`{n}` not in: {msg}");
        }
    }

    #[test]
    fn parses_llama2_config() {
        let c = llama(LLAMA2_7B).unwrap();
        assert_eq!(
            c,
            LlamaConfig {
                vocab_size: 32000,
                hidden_size: 4096,
                intermediate_size: 11008,
                num_hidden_layers: 32,
                num_attention_heads: 32,
                num_key_value_heads: 32,
                head_dim: 128,
                rms_norm_eps: 1e-5,
                rope_theta: 10000.0,
                rope_scaling: RopeScaling::None,
                max_position_embeddings: 4096,
                tie_word_embeddings: false,
                bos_token_id: 1,
                eos_token_ids: vec![2],
                pad_token_id: None,
            }
        );
        assert_eq!(c.pad_id(), 2);
        assert_eq!(
            Architecture::of_config_str(LLAMA2_7B, Path::new(PATH)).unwrap(),
            Architecture::Llama
        );
        assert_eq!(
            Architecture::of_config_str(T5_SMALL, Path::new(PATH)).unwrap(),
            Architecture::T5
        );
    }

    #[test]
    fn parses_llama31_rope_scaling_gqa_and_eos_list() {
        let c = llama(LLAMA31_8B).unwrap();
        assert_eq!((c.num_key_value_heads, c.kv_dim()), (8, 1024));
        assert_eq!(c.eos_token_ids, vec![128001, 128008, 128009]);
        assert_eq!(c.rope_theta, 500000.0);
        assert_eq!(
            c.rope_scaling,
            RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192,
            }
        );
    }

    #[test]
    fn reads_transformers5_rope_parameters_and_explicit_head_dim() {
        let text = llama_with(
            &llama_with(LLAMA31_8B, "rope_scaling", None),
            "rope_parameters",
            Some(
                serde_json::json!({"rope_type": "llama3", "rope_theta": 250000.0,
                "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 2.0,
                "original_max_position_embeddings": 16}),
            ),
        );
        let text = llama_with(
            &llama_with(&text, "rope_theta", None),
            "head_dim",
            Some(64.into()),
        );
        let c = llama(&text).unwrap();
        assert_eq!((c.rope_theta, c.head_dim, c.q_dim()), (250000.0, 64, 2048));
        assert!(matches!(c.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 4.0));
        let plain = llama_with(
            LLAMA2_7B,
            "rope_parameters",
            Some(serde_json::json!({"rope_type": "default", "rope_theta": 1e4})),
        );
        assert_eq!(llama(&plain).unwrap().rope_scaling, RopeScaling::None);
    }

    #[test]
    fn llama_errors_name_the_field_and_value() {
        assert_llama_err(
            &llama_with(LLAMA2_7B, "num_key_value_heads", Some(5.into())),
            "num_key_value_heads",
            &["5", "32"],
        );
        assert_llama_err(
            &llama_with(LLAMA2_7B, "hidden_act", Some("gelu".into())),
            "hidden_act",
            &["\"gelu\"", "silu"],
        );
        assert_llama_err(
            &llama_with(LLAMA2_7B, "attention_bias", Some(true.into())),
            "attention_bias",
            &["true"],
        );
        assert_llama_err(
            &llama_with(LLAMA2_7B, "head_dim", Some(63.into())),
            "head_dim",
            &["63", "even"],
        );
        assert_llama_err(
            &llama_with(LLAMA2_7B, "hidden_size", Some(4001.into())),
            "head_dim",
            &["4001", "32"],
        );
        assert_llama_err(
            &llama_with(
                LLAMA2_7B,
                "rope_scaling",
                Some(serde_json::json!({"rope_type": "yarn"})),
            ),
            "rope_scaling.rope_type",
            &["\"yarn\"", "llama3"],
        );
        assert_llama_err(
            &llama_with(
                LLAMA2_7B,
                "rope_scaling",
                Some(serde_json::json!({"rope_type": "llama3", "factor": 8.0})),
            ),
            "rope_scaling.original_max_position_embeddings",
            &["required"],
        );
        assert_llama_err(
            &llama_with(LLAMA2_7B, "rope_theta", Some((-1.0).into())),
            "rope_theta",
            &["-1"],
        );
        assert_llama_err(
            &llama_with(
                LLAMA2_7B,
                "eos_token_id",
                Some(serde_json::json!([2, 40000])),
            ),
            "eos_token_id",
            &["40000", "vocab_size = 32000"],
        );
        assert_llama_err(
            &llama_with(LLAMA2_7B, "model_type", Some("mistral".into())),
            "model_type",
            &["\"mistral\"", "\"llama\""],
        );
        assert_llama_err(
            &llama_with(LLAMA2_7B, "vocab_size", None),
            "vocab_size",
            &["missing"],
        );
        let err = Architecture::of_config_str(r#"{"model_type": "bert"}"#, Path::new(PATH))
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"bert\"") && err.contains("llama"), "{err}");
        let arch = |text: &str| Architecture::of_config_str(text, Path::new(PATH));
        assert_eq!(arch(r#"{"d_model": 8}"#).unwrap(), Architecture::T5);
        assert_eq!(arch(r#"{"hidden_size": 8}"#).unwrap(), Architecture::Llama);
        let err = arch("{}").unwrap_err().to_string();
        assert!(
            err.contains("model_type") && err.contains("absent"),
            "{err}"
        );
    }

    #[test]
    fn built_in_shapes_round_trip_through_hf_json() {
        use crate::model::shapes::{llama_shape, t5_shape, LLAMA_SHAPES, T5_SHAPES};
        let path = Path::new("<shape>");
        for name in T5_SHAPES {
            let cfg = t5_shape(name).unwrap();
            let text = cfg.to_hf_json().to_string();
            assert_eq!(T5Config::from_json_str(&text, path).unwrap(), cfg, "{name}");
        }
        for name in LLAMA_SHAPES {
            let cfg = llama_shape(name).unwrap();
            let text = cfg.to_hf_json().to_string();
            assert_eq!(
                LlamaConfig::from_json_str(&text, path).unwrap(),
                cfg,
                "{name}"
            );
        }
    }
}
