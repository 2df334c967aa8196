//! Llama (decoder-only) over any [`Backend`]: forward from `inputs_embeds`, the hand-written
//! backward that returns only d loss / d inputs_embeds, and greedy generation with a KV cache.
//!
//! A layer is `x + attn(rmsnorm(x))` then `x + mlp(rmsnorm(x))`: grouped-query attention with
//! rotary embeddings on queries and keys, causal and padding masks, scale 1/√D; SwiGLU MLP
//! `down(silu(gate(x)) · up(x))`. Same gradient conventions as T5 (see `t5.rs`): activation
//! gradients inside a sub-layer are written (`=`), the residual-stream gradient `dx` is
//! accumulated (`+=`).
//!
//! Shapes: B batch, T positions (prompt rows included), C hidden, H query heads and Hkv
//! key/value heads of width D, F intermediate, V vocab, M label rows, S cache capacity.

use crate::backend::profiling::nvtx_range;
use crate::backend::{
    Activation, AttnDims, AttnMask, Backend, Gemm, LinearDims, RmsNormDims, RopeDims,
};
use crate::error::{Error, Result};
use crate::model::batch::BatchSpec;
use crate::model::batch::HostBatch;
use crate::model::config::{Architecture, LlamaConfig, RopeScaling};
use crate::model::family::{million_params, Activations, Family, Saved, SpecialIds, StepBatch};
use crate::model::flops::{llama_flops, StepTokens};
use crate::model::generate::{check_generate_inputs, GenerateConfig, Generated, Greedy};
use crate::model::linear::{Linear, LinearData, Quant};
use crate::model::t5::{LinearSource, WeightSource};
use crate::model::{
    label_rows_loss, label_rows_loss_backward, LmHead, LossSaved, ModelOutput, NormSaved,
};

/// The weights of one decoder layer, PyTorch layout `(out, in)`.
pub struct LlamaLayer<B: Backend> {
    pub ln_attn: B::Tensor, // (C) input_layernorm
    pub q: Linear<B>,       // (H·D, C)
    pub k: Linear<B>,       // (Hkv·D, C)
    pub v: Linear<B>,       // (Hkv·D, C)
    pub o: Linear<B>,       // (C, H·D)
    pub ln_mlp: B::Tensor,  // (C) post_attention_layernorm
    pub gate: Linear<B>,    // (F, C) the SiLU branch
    pub up: Linear<B>,      // (F, C) the linear branch
    pub down: Linear<B>,    // (C, F)
}

/// All weights of a Llama model.
pub struct LlamaWeights<B: Backend> {
    pub embed: B::Tensor, // (V, C) model.embed_tokens
    pub layers: Vec<LlamaLayer<B>>,
    pub final_norm: B::Tensor, // (C) model.norm
    /// Untied output projection; `None` when tied to `embed`.
    pub lm_head: Option<B::Tensor>, // (V, C)
}

/// The Hugging Face name and shape of every tensor a Llama checkpoint must hold, in load order.
pub fn llama_tensor_specs(cfg: &LlamaConfig) -> Vec<(String, Vec<usize>)> {
    let (c, f, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let (qd, kvd) = (cfg.q_dim(), cfg.kv_dim());
    let mut specs = vec![("model.embed_tokens.weight".to_string(), vec![v, c])];
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        for (name, shape) in [
            ("input_layernorm", vec![c]),
            ("self_attn.q_proj", vec![qd, c]),
            ("self_attn.k_proj", vec![kvd, c]),
            ("self_attn.v_proj", vec![kvd, c]),
            ("self_attn.o_proj", vec![c, qd]),
            ("post_attention_layernorm", vec![c]),
            ("mlp.gate_proj", vec![f, c]),
            ("mlp.up_proj", vec![f, c]),
            ("mlp.down_proj", vec![c, f]),
        ] {
            specs.push((format!("{p}.{name}.weight"), shape));
        }
    }
    specs.push(("model.norm.weight".into(), vec![c]));
    if !cfg.tie_word_embeddings {
        specs.push(("lm_head.weight".into(), vec![v, c]));
    }
    specs
}

impl<B: Backend> LlamaWeights<B> {
    /// Builds the weights from a source that returns each tensor of [`llama_tensor_specs`] as
    /// f32, uploading them one by one (host memory holds one converted tensor at a time).
    pub fn load(be: &B, cfg: &LlamaConfig, source: &mut WeightSource<'_>) -> Result<Self> {
        Self::load_quantized(be, cfg, source, Quant::None)
    }

    /// As [`LlamaWeights::load`], with the attention and MLP projections stored as `quant` says
    /// (embeddings, norms and the output projection stay dense, as bitsandbytes leaves them).
    pub fn load_quantized(
        be: &B,
        cfg: &LlamaConfig,
        source: &mut WeightSource<'_>,
        quant: Quant,
    ) -> Result<Self> {
        // One source behind both callbacks (they are never called at the same time).
        let source = std::cell::RefCell::new(source);
        Self::load_with_linears(
            be,
            cfg,
            &mut |name, shape| (*source.borrow_mut())(name, shape),
            &mut |name, shape| Ok(LinearData::Dense((*source.borrow_mut())(name, shape)?)),
            quant,
        )
    }

    /// As [`LlamaWeights::load_quantized`], with the attention and MLP projections read through
    /// `linears` (dense ones stored as `quant` says, NF4 ones as they are).
    pub fn load_with_linears(
        be: &B,
        cfg: &LlamaConfig,
        source: &mut WeightSource<'_>,
        linears: &mut LinearSource<'_>,
        quant: Quant,
    ) -> Result<Self> {
        let mut specs = llama_tensor_specs(cfg).into_iter();
        let mut next = || -> Result<(String, Vec<usize>)> {
            specs
                .next()
                .ok_or_else(|| Error::Input("Llama tensor list ended early".into()))
        };
        let mut dense = |spec: (String, Vec<usize>)| -> Result<B::Tensor> {
            Ok(be.upload_f32(source(&spec.0, &spec.1)?))
        };
        let mut linear = |spec: (String, Vec<usize>)| -> Result<Linear<B>> {
            Ok(Linear::from_data(be, linears(&spec.0, &spec.1)?, quant))
        };
        let embed = dense(next()?)?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for _ in 0..cfg.num_hidden_layers {
            // The order of llama_tensor_specs.
            layers.push(LlamaLayer {
                ln_attn: dense(next()?)?,
                q: linear(next()?)?,
                k: linear(next()?)?,
                v: linear(next()?)?,
                o: linear(next()?)?,
                ln_mlp: dense(next()?)?,
                gate: linear(next()?)?,
                up: linear(next()?)?,
                down: linear(next()?)?,
            });
        }
        let final_norm = dense(next()?)?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(dense(next()?)?)
        };
        Ok(LlamaWeights {
            embed,
            layers,
            final_norm,
            lm_head,
        })
    }
}

/// RoPE's inverse frequencies `(D/2)`, computed in f32 exactly as Hugging Face does (the llama3
/// regime boundaries depend on f32 rounding).
pub fn rope_inv_freq(cfg: &LlamaConfig) -> Vec<f32> {
    let d = cfg.head_dim;
    let base = cfg.rope_theta as f32;
    let inv: Vec<f32> = (0..d / 2)
        .map(|i| 1.0 / base.powf((2 * i) as f32 / d as f32))
        .collect();
    match cfg.rope_scaling {
        RopeScaling::None => inv,
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            let (factor, low, high) = (
                factor as f32,
                low_freq_factor as f32,
                high_freq_factor as f32,
            );
            let old = original_max_position_embeddings as f32;
            let (low_wavelen, high_wavelen) = (old / low, old / high);
            inv.into_iter()
                .map(|f| {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    if wavelen > low_wavelen {
                        // Long wavelengths: slowed down by the factor.
                        f / factor
                    } else if wavelen < high_wavelen {
                        // Short wavelengths: unchanged.
                        f
                    } else {
                        // In between: interpolated smoothly.
                        let smooth = (old / wavelen - low) / (high - low);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    }
}

/// The cos and sin tables of positions `0..rows`: `(rows, D/2)` each. The angle `pos·inv_freq`
/// is rounded to f32 as in Hugging Face; cos and sin are taken in f64.
pub fn rope_tables(cfg: &LlamaConfig, rows: usize) -> (Vec<f32>, Vec<f32>) {
    let inv = rope_inv_freq(cfg);
    let mut cos = Vec::with_capacity(rows * inv.len());
    let mut sin = Vec::with_capacity(rows * inv.len());
    for pos in 0..rows {
        for &f in &inv {
            let angle = (pos as f32 * f) as f64;
            cos.push(angle.cos() as f32);
            sin.push(angle.sin() as f32);
        }
    }
    (cos, sin)
}

/// A Llama model: config and weights on a backend.
pub struct Llama<B: Backend> {
    pub cfg: LlamaConfig,
    pub weights: LlamaWeights<B>,
}

/// One right-padded batch. Masks and labels stay on the host (the model validates them).
pub struct LlamaBatch<'a, B: Backend> {
    /// Prompt rows first (before BOS, as PEFT places them), then the text embeddings.
    pub inputs_embeds: &'a B::Tensor, // (B, T, C)
    /// 1 for real rows, 0 for padding.
    pub attention_mask: &'a [i32], // (B, T)
    /// Hugging Face's unshifted labels: `labels[b, t]` is predicted by row `t − 1`; -100 marks
    /// positions without a loss.
    pub labels: &'a [i32], // (B, T)
    pub batch: usize,
    pub len: usize,
    /// The loss is a mean over this many label tokens: a data-parallel rank's share of a
    /// larger batch divides by the whole batch's count, so the ranks' gradients sum to one
    /// process's. `None`: this batch's own label tokens.
    pub loss_tokens: Option<usize>,
}

/// What the backward of one layer needs.
struct LayerSaved<B: Backend> {
    attn_norm: NormSaved<B>,
    q: B::Tensor,   // (N, H·D) after RoPE
    k: B::Tensor,   // (N, Hkv·D) after RoPE
    v: B::Tensor,   // (N, Hkv·D)
    out: B::Tensor, // (N, H·D) attention output before o_proj
    lse: B::Tensor, // (B, H, T)
    mlp_norm: NormSaved<B>,
    gate: B::Tensor, // (N, F) gate_proj output (pre-SiLU)
    up: B::Tensor,   // (N, F) up_proj output
}

/// Activations saved by [`Llama::forward`] for [`Llama::backward_dinp`].
pub struct LlamaSaved<B: Backend> {
    batch: usize,
    len: usize,
    mask: B::Index,      // (B, T)
    positions: B::Index, // (B·T)
    cos: B::Tensor,      // (T, D/2)
    sin: B::Tensor,      // (T, D/2)
    layers: Vec<LayerSaved<B>>,
    final_norm: NormSaved<B>,
    loss: LossSaved<B>,
}

/// Where a layer's attention reads its keys and values.
enum KeyValues<'a, B: Backend> {
    /// The layer's own keys of this call (training forward: S = T).
    Own,
    /// A KV cache: this call's keys and values are first written to flat cache rows `slots`
    /// (`b·S + slot`, one per input row), then every query attends over all S slots.
    Cache {
        k: &'a mut B::Tensor, // (B, S, Hkv·D)
        v: &'a mut B::Tensor, // (B, S, Hkv·D)
        slots: &'a B::Index,  // (N)
        capacity: usize,
    },
}

/// Per-layer key and value caches of a generation.
struct KvCache<B: Backend> {
    k: Vec<B::Tensor>, // per layer (B, S, Hkv·D)
    v: Vec<B::Tensor>, // per layer (B, S, Hkv·D)
}

impl<B: Backend> Llama<B> {
    pub fn new(cfg: LlamaConfig, weights: LlamaWeights<B>) -> Self {
        Llama { cfg, weights }
    }

    fn attn_dims(&self, b: usize, t: usize, s: usize) -> AttnDims {
        AttnDims {
            b,
            t,
            s,
            h: self.cfg.num_attention_heads,
            h_kv: self.cfg.num_key_value_heads,
            d: self.cfg.head_dim,
        }
    }

    fn scale(&self) -> f64 {
        1.0 / (self.cfg.head_dim as f64).sqrt()
    }

    fn lm_head(&self) -> LmHead<'_, B::Tensor> {
        LmHead {
            weight: self.weights.lm_head.as_ref().unwrap_or(&self.weights.embed),
            scale: 1.0,
        }
    }

    /// cos and sin tables `(rows, D/2)` on the backend.
    fn tables(&self, be: &B, rows: usize) -> (B::Tensor, B::Tensor) {
        let (cos, sin) = rope_tables(&self.cfg, rows);
        (be.upload_f32(cos), be.upload_f32(sin))
    }

    /// One layer on `x (N, C)`, N = B·T rows, moved into the saved activations. `positions
    /// (N)` index the RoPE tables; `mask` masks keys (of this call, or of the cache).
    // Buffers and weights of one layer plus the attention call (mask, positions, dims): no loose dimensions.
    #[allow(clippy::too_many_arguments)]
    fn layer_forward(
        &self,
        be: &B,
        x: B::Tensor,
        layer: &LlamaLayer<B>,
        positions: &B::Index,
        (cos, sin): (&B::Tensor, &B::Tensor),
        mask: AttnMask<'_, B::Index>,
        kv: KeyValues<'_, B>,
        (b, t): (usize, usize),
    ) -> (B::Tensor, LayerSaved<B>) {
        let cfg = &self.cfg;
        let (c, f, qd, kvd, hd) = (
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.q_dim(),
            cfg.kv_dim(),
            cfg.head_dim,
        );
        let (h, h_kv, n) = (cfg.num_attention_heads, cfg.num_key_value_heads, b * t);
        let eps = cfg.rms_norm_eps;

        // Attention.
        let mut normed = be.zeros(n * c); // (N, C)
        let mut rstd = be.zeros(n); // (N)
        be.rmsnorm_forward(
            &mut normed,
            &mut rstd,
            &x,
            &layer.ln_attn,
            eps,
            RmsNormDims { n, c },
        );
        let mut q_lin = be.zeros(n * qd); // (N, H·D) before RoPE
        let mut k_lin = be.zeros(n * kvd); // (N, Hkv·D) before RoPE
        let mut v = be.zeros(n * kvd); // (N, Hkv·D)
        layer
            .q
            .forward(be, &mut q_lin, &normed, LinearDims::new(n, c, qd));
        layer
            .k
            .forward(be, &mut k_lin, &normed, LinearDims::new(n, c, kvd));
        layer
            .v
            .forward(be, &mut v, &normed, LinearDims::new(n, c, kvd));
        let mut q = be.zeros(n * qd); // (N, H·D)
        let mut k = be.zeros(n * kvd); // (N, Hkv·D)
        be.rope_forward(
            &mut q,
            &q_lin,
            positions,
            cos,
            sin,
            RopeDims { n, h, d: hd },
        );
        be.rope_forward(
            &mut k,
            &k_lin,
            positions,
            cos,
            sin,
            RopeDims { n, h: h_kv, d: hd },
        );
        let mut out = be.zeros(n * qd); // (N, H·D)
        let mut lse = be.zeros(b * h * t); // (B, H, T)
        match kv {
            KeyValues::Own => {
                let dims = self.attn_dims(b, t, t);
                be.attention_forward(
                    &mut out,
                    &mut lse,
                    &q,
                    &k,
                    &v,
                    mask,
                    None,
                    self.scale(),
                    dims,
                );
            }
            KeyValues::Cache {
                k: k_cache,
                v: v_cache,
                slots,
                capacity,
            } => {
                // The slots are zero (never written): adding writes them.
                be.scatter_rows_add(k_cache, &k, slots, n, kvd);
                be.scatter_rows_add(v_cache, &v, slots, n, kvd);
                let dims = self.attn_dims(b, t, capacity);
                be.attention_forward(
                    &mut out,
                    &mut lse,
                    &q,
                    k_cache,
                    v_cache,
                    mask,
                    None,
                    self.scale(),
                    dims,
                );
            }
        }
        let mut y = be.zeros(n * c); // (N, C)
        layer.o.forward(be, &mut y, &out, LinearDims::new(n, qd, c));
        be.add_assign(&mut y, &x);
        let attn_norm = NormSaved { inp: x, rstd };

        // SwiGLU MLP.
        let mut normed = be.zeros(n * c); // (N, C)
        let mut rstd = be.zeros(n); // (N)
        be.rmsnorm_forward(
            &mut normed,
            &mut rstd,
            &y,
            &layer.ln_mlp,
            eps,
            RmsNormDims { n, c },
        );
        let mut gate = be.zeros(n * f); // (N, F)
        let mut up = be.zeros(n * f); // (N, F)
        layer
            .gate
            .forward(be, &mut gate, &normed, LinearDims::new(n, c, f));
        layer
            .up
            .forward(be, &mut up, &normed, LinearDims::new(n, c, f));
        let mut hidden = be.zeros(n * f); // (N, F)
        be.gated_act_forward(&mut hidden, &gate, Some(&up), Activation::Silu, n * f);
        let mut z = be.zeros(n * c); // (N, C)
        layer
            .down
            .forward(be, &mut z, &hidden, LinearDims::new(n, f, c));
        be.add_assign(&mut z, &y);
        let mlp_norm = NormSaved { inp: y, rstd };
        let saved = LayerSaved {
            attn_norm,
            q,
            k,
            v,
            out,
            lse,
            mlp_norm,
            gate,
            up,
        };
        (z, saved)
    }

    /// Backward of [`Self::layer_forward`] (training, [`KeyValues::Own`]): `dx (N, C) +=` the
    /// gradient through both branches.
    fn layer_backward(
        &self,
        be: &B,
        dx: &mut B::Tensor,
        s: &LayerSaved<B>,
        layer: &LlamaLayer<B>,
        saved: &LlamaSaved<B>,
    ) {
        let cfg = &self.cfg;
        let (c, f, qd, kvd, hd) = (
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.q_dim(),
            cfg.kv_dim(),
            cfg.head_dim,
        );
        let (h, h_kv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let (b, t) = (saved.batch, saved.len);
        let n = b * t;

        // MLP branch.
        let mut d_hidden = be.zeros(n * f); // (N, F)
        layer
            .down
            .backward_dinp(be, &mut d_hidden, dx, false, LinearDims::new(n, f, c));
        let mut d_gate = be.zeros(n * f); // (N, F)
        let mut d_up = be.zeros(n * f); // (N, F)
        be.gated_act_backward_dinp(
            &mut d_gate,
            Some(&mut d_up),
            &d_hidden,
            &s.gate,
            Some(&s.up),
            Activation::Silu,
            n * f,
        );
        let mut d_normed = be.zeros(n * c); // (N, C)
        layer
            .gate
            .backward_dinp(be, &mut d_normed, &d_gate, false, LinearDims::new(n, c, f));
        layer
            .up
            .backward_dinp(be, &mut d_normed, &d_up, true, LinearDims::new(n, c, f));
        let norm = &s.mlp_norm;
        be.rmsnorm_backward_dinp(
            dx,
            &d_normed,
            &norm.inp,
            &layer.ln_mlp,
            &norm.rstd,
            RmsNormDims { n, c },
        );

        // Attention branch.
        let mut d_out = be.zeros(n * qd); // (N, H·D)
        layer
            .o
            .backward_dinp(be, &mut d_out, dx, false, LinearDims::new(n, qd, c));
        let mut dq = be.zeros(n * qd); // (N, H·D) after RoPE
        let mut dk = be.zeros(n * kvd); // (N, Hkv·D) after RoPE
        let mut dv = be.zeros(n * kvd); // (N, Hkv·D)
        let mask = AttnMask {
            key_mask: &saved.mask,
            causal: true,
        };
        be.attention_backward_dinp(
            &mut dq,
            &mut dk,
            &mut dv,
            &d_out,
            &s.q,
            &s.k,
            &s.v,
            &s.out,
            &s.lse,
            mask,
            None,
            self.scale(),
            self.attn_dims(b, t, t),
        );
        let (pos, cos, sin) = (&saved.positions, &saved.cos, &saved.sin);
        let mut dq_lin = be.zeros(n * qd); // (N, H·D) before RoPE
        let mut dk_lin = be.zeros(n * kvd); // (N, Hkv·D) before RoPE
        be.rope_backward_dinp(&mut dq_lin, &dq, pos, cos, sin, RopeDims { n, h, d: hd });
        be.rope_backward_dinp(
            &mut dk_lin,
            &dk,
            pos,
            cos,
            sin,
            RopeDims { n, h: h_kv, d: hd },
        );
        let mut d_normed = be.zeros(n * c); // (N, C)
        layer
            .q
            .backward_dinp(be, &mut d_normed, &dq_lin, false, LinearDims::new(n, c, qd));
        layer
            .k
            .backward_dinp(be, &mut d_normed, &dk_lin, true, LinearDims::new(n, c, kvd));
        layer
            .v
            .backward_dinp(be, &mut d_normed, &dv, true, LinearDims::new(n, c, kvd));
        let norm = &s.attn_norm;
        be.rmsnorm_backward_dinp(
            dx,
            &d_normed,
            &norm.inp,
            &layer.ln_attn,
            &norm.rstd,
            RmsNormDims { n, c },
        );
    }

    /// Checks a batch against the config; errors name the field and the bad value.
    fn validate(&self, be: &B, batch: &LlamaBatch<'_, B>) -> Result<()> {
        let (b, t) = (batch.batch, batch.len);
        let (c, v) = (self.cfg.hidden_size, self.cfg.vocab_size);
        let bad = |msg: String| Err(Error::Input(msg));
        if b == 0 || t == 0 {
            return bad(format!("batch: empty dimension (B = {b}, T = {t})"));
        }
        if be.len(batch.inputs_embeds) != b * t * c {
            let found = be.len(batch.inputs_embeds);
            return bad(format!(
                "inputs_embeds: {found} values, expected B·T·C = {b}·{t}·{c} = {}",
                b * t * c
            ));
        }
        for (name, len) in [
            ("attention_mask", batch.attention_mask.len()),
            ("labels", batch.labels.len()),
        ] {
            if len != b * t {
                return bad(format!("{name}: {len} values, expected B·T = {}", b * t));
            }
        }
        crate::model::check_attention_mask(batch.attention_mask, t)?;
        if t > self.cfg.max_position_embeddings {
            return bad(format!(
                "batch: {t} positions, more than max_position_embeddings = {}",
                self.cfg.max_position_embeddings
            ));
        }
        let in_vocab = |x: i32| x >= 0 && (x as usize) < v;
        if let Some(&x) = batch.labels.iter().find(|&&x| x != -100 && !in_vocab(x)) {
            return bad(format!(
                "labels: id {x} is outside the vocabulary 0..{v} (and not -100)"
            ));
        }
        if label_rows(batch.labels, b, t).is_empty() {
            return bad(
                "labels: no position after the first of a row holds a label, so there is no \
                 loss to compute (labels are unshifted: labels[t] is predicted by row t − 1)"
                    .into(),
            );
        }
        Ok(())
    }

    /// Forward through the layers and the loss; saves what [`Self::backward_dinp`] needs.
    /// Logits are computed only for the rows that predict a label: with a 32k–128k vocabulary
    /// the full (B, T, V) tensor would dwarf every activation, and only label rows enter the loss.
    pub fn forward(
        &self,
        be: &B,
        batch: &LlamaBatch<'_, B>,
    ) -> Result<(ModelOutput<B>, LlamaSaved<B>)> {
        self.validate(be, batch)?;
        let (b, t) = (batch.batch, batch.len);
        let (c, v) = (self.cfg.hidden_size, self.cfg.vocab_size);
        let n = b * t;

        // Positions 0..T in every row, counted over prompt + text (what Hugging Face uses when
        // no position_ids are given); right padding leaves real rows at the same positions.
        let pos: Vec<i32> = (0..b).flat_map(|_| 0..t as i32).collect();
        let positions = be.upload_index(&pos);
        let (cos, sin) = self.tables(be, t);
        let mask = be.upload_index(batch.attention_mask);
        let attn_mask = AttnMask {
            key_mask: &mask,
            causal: true,
        };
        let mut x = be.copy(batch.inputs_embeds); // (N, C) residual stream
        let mut layers = Vec::with_capacity(self.weights.layers.len());
        for (l, layer) in self.weights.layers.iter().enumerate() {
            let _range = nvtx_range(&format!("layer {l}"));
            let (y, saved) = self.layer_forward(
                be,
                x,
                layer,
                &positions,
                (&cos, &sin),
                attn_mask,
                KeyValues::Own,
                (b, t),
            );
            x = y;
            layers.push(saved);
        }
        let mut hidden = be.zeros(n * c); // (N, C)
        let mut rstd = be.zeros(n); // (N)
        let eps = self.cfg.rms_norm_eps;
        be.rmsnorm_forward(
            &mut hidden,
            &mut rstd,
            &x,
            &self.weights.final_norm,
            eps,
            RmsNormDims { n, c },
        );
        let final_norm = NormSaved { inp: x, rstd };

        // Logits and loss at the rows that predict a label.
        let rows = label_rows(batch.labels, b, t);
        let targets: Vec<i32> = rows.iter().map(|&r| batch.labels[r + 1]).collect();
        let (output, loss) = label_rows_loss(
            be,
            &hidden,
            self.lm_head(),
            (rows, batch.loss_tokens),
            &targets,
            (c, v),
        );
        let saved = LlamaSaved {
            batch: b,
            len: t,
            mask,
            positions,
            cos,
            sin,
            layers,
            final_norm,
            loss,
        };
        Ok((output, saved))
    }

    /// d loss / d inputs_embeds `(B, T, C)`, back through lm_head, the final norm and the layers.
    pub fn backward_dinp(&self, be: &B, saved: &LlamaSaved<B>) -> B::Tensor {
        let (c, v) = (self.cfg.hidden_size, self.cfg.vocab_size);
        let n = saved.batch * saved.len;
        let d_hidden = label_rows_loss_backward(be, &saved.loss, self.lm_head(), n, (c, v));
        let mut dx = be.zeros(n * c); // (N, C) residual-stream gradient
        let fin = &saved.final_norm;
        let w = &self.weights;
        be.rmsnorm_backward_dinp(
            &mut dx,
            &d_hidden,
            &fin.inp,
            &w.final_norm,
            &fin.rstd,
            RmsNormDims { n, c },
        );
        for (l, (layer, s)) in w.layers.iter().zip(&saved.layers).enumerate().rev() {
            let _range = nvtx_range(&format!("layer {l} backward"));
            self.layer_backward(be, &mut dx, s, layer, saved);
        }
        dx
    }

    /// Greedy generation from left-padded `inputs_embeds (B, T, C)` with `attention_mask (B, T)`
    /// (prompt rows and text, as [`Self::forward`] takes them, but padded on the left so every
    /// row ends at T − 1). Positions count real rows only (`cumsum(mask) − 1`, as Hugging Face's
    /// `generate` does); keys and values are cached, so each new token costs one row per layer.
    pub fn generate(
        &self,
        be: &B,
        inputs_embeds: &B::Tensor,
        attention_mask: &[i32],
        batch: usize,
        len: usize,
        gen: &GenerateConfig,
    ) -> Result<Generated> {
        let (b, t) = (batch, len);
        let cfg = &self.cfg;
        let (c, v, kvd) = (cfg.hidden_size, cfg.vocab_size, cfg.kv_dim());
        check_generate_inputs(be.len(inputs_embeds), attention_mask, (b, t, c), gen)?;
        if let Some(row) = (0..b).find(|&r| attention_mask[r * t + t - 1] == 0) {
            return Err(Error::Input(format!(
                "generate: row {row} ends in padding; generation needs left padding"
            )));
        }
        let cap = t + gen.max_new_tokens; // S
        if cap > cfg.max_position_embeddings {
            return Err(Error::Input(format!(
                "generate: {t} input positions + {} new tokens exceed max_position_embeddings = {}",
                gen.max_new_tokens, cfg.max_position_embeddings
            )));
        }
        // Positions of the input rows: real rows count 0, 1, ...; padding gets 0 (never seen).
        let mut pos = vec![0i32; b * t];
        let mut real = vec![0i32; b]; // real rows per sequence = next position
        for r in 0..b {
            for j in 0..t {
                if attention_mask[r * t + j] == 1 {
                    pos[r * t + j] = real[r];
                    real[r] += 1;
                }
            }
        }
        let (cos, sin) = self.tables(be, cap);
        let mut cache = KvCache::<B> {
            k: (0..cfg.num_hidden_layers)
                .map(|_| be.zeros(b * cap * kvd))
                .collect(),
            v: (0..cfg.num_hidden_layers)
                .map(|_| be.zeros(b * cap * kvd))
                .collect(),
        };
        // Cache key mask (B, S): the input's mask, then each generated slot as it is filled.
        let mut key_mask = vec![0i32; b * cap];
        for r in 0..b {
            key_mask[r * cap..r * cap + t].copy_from_slice(&attention_mask[r * t..(r + 1) * t]);
        }

        let mut greedy = Greedy::new(gen, b);
        // Prefill: all T rows at cache slots 0..T, causal.
        let slots: Vec<i32> = (0..b)
            .flat_map(|r| (0..t).map(move |j| (r * cap + j) as i32))
            .collect();
        let last_rows: Vec<i32> = (0..b).map(|r| (r * t + t - 1) as i32).collect();
        let mut x = be.copy(inputs_embeds); // (B·T, C)
        let mut next_pos = real;
        let mut step_len = t; // rows per sequence in this call
        let mut slots = be.upload_index(&slots);
        let mut positions = be.upload_index(&pos);
        let mut causal = true;
        let mut last = be.upload_index(&last_rows);
        for step in 0.. {
            let mask_idx = be.upload_index(&key_mask);
            let attn_mask = AttnMask {
                key_mask: &mask_idx,
                causal,
            };
            for (l, layer) in self.weights.layers.iter().enumerate() {
                let kv = KeyValues::Cache {
                    k: &mut cache.k[l],
                    v: &mut cache.v[l],
                    slots: &slots,
                    capacity: cap,
                };
                let (y, _) = self.layer_forward(
                    be,
                    x,
                    layer,
                    &positions,
                    (&cos, &sin),
                    attn_mask,
                    kv,
                    (b, step_len),
                );
                x = y;
            }
            let logits = self.last_row_logits(be, &x, &last, b, step_len)?; // (B, V) host
            let Some(next_ids) = greedy.step(&logits, v) else {
                break;
            };
            // The next call: one row per sequence, at slot T + step, attending to every filled slot.
            let slot = t + step;
            for r in 0..b {
                key_mask[r * cap + slot] = 1;
            }
            x = be.zeros(b * c);
            be.gather_rows(
                &mut x,
                &self.weights.embed,
                &be.upload_index(&next_ids),
                b,
                c,
            );
            positions = be.upload_index(&next_pos);
            for p in &mut next_pos {
                *p += 1;
            }
            slots = be.upload_index(&(0..b).map(|r| (r * cap + slot) as i32).collect::<Vec<_>>());
            last = be.upload_index(&(0..b as i32).collect::<Vec<_>>());
            step_len = 1;
            causal = false;
        }
        Ok(greedy.finish())
    }

    /// Final norm and lm_head on the rows `last (B)` of `x (B·len, C)`: the next-token logits
    /// `(B, V)`, on the host.
    fn last_row_logits(
        &self,
        be: &B,
        x: &B::Tensor,
        last: &B::Index,
        b: usize,
        len: usize,
    ) -> Result<Vec<f32>> {
        let (c, v) = (self.cfg.hidden_size, self.cfg.vocab_size);
        debug_assert_eq!(be.len(x), b * len * c);
        let mut rows = be.zeros(b * c); // (B, C)
        be.gather_rows(&mut rows, x, last, b, c);
        let mut normed = be.zeros(b * c); // (B, C)
        let mut rstd = be.zeros(b); // (B)
        let eps = self.cfg.rms_norm_eps;
        be.rmsnorm_forward(
            &mut normed,
            &mut rstd,
            &rows,
            &self.weights.final_norm,
            eps,
            RmsNormDims { n: b, c },
        );
        let mut logits = be.zeros(b * v); // (B, V)
        be.matmul(
            &mut logits,
            &normed,
            self.lm_head().weight,
            Gemm::nt(b, v, c),
        );
        Ok(be.download_f32(&logits))
    }
}

/// Flat rows `b·T + t` whose next position `t + 1` holds a label.
fn label_rows(labels: &[i32], b: usize, t: usize) -> Vec<usize> {
    (0..b)
        .flat_map(|r| (0..t.saturating_sub(1)).map(move |j| r * t + j))
        .filter(|&i| labels[i + 1] != -100)
        .collect()
}

/// `host`'s labels `(B, P+T)` with `p` prompt rows in front of every row: the prompt rows
/// predict nothing (-100), the last one predicts the text's first position.
fn labels_behind_prompt(host: &HostBatch, p: usize) -> Vec<i32> {
    host.labels
        .chunks(host.enc_len.max(1))
        .flat_map(|row| std::iter::repeat_n(-100, p).chain(row.iter().copied()))
        .collect()
}

/// Llama through the family interface (see family.rs).
impl<B: Backend> Family<B> for Llama<B> {
    fn architecture(&self) -> Architecture {
        Architecture::Llama
    }

    fn describe(&self) -> String {
        let cfg = &self.cfg;
        format!(
            "Llama, hidden {}, {} layers, {} heads ({} key/value) × {}, intermediate {}, vocab {}, {:.2} M parameters",
            cfg.hidden_size,
            cfg.num_hidden_layers,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
            cfg.intermediate_size,
            cfg.vocab_size,
            million_params(&llama_tensor_specs(cfg))
        )
    }

    fn tensor_specs(&self) -> Vec<(String, Vec<usize>)> {
        llama_tensor_specs(&self.cfg)
    }

    fn embeddings(&self) -> &B::Tensor {
        &self.weights.embed
    }

    fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }

    fn width(&self) -> usize {
        self.cfg.hidden_size
    }

    fn special_ids(&self) -> SpecialIds {
        SpecialIds {
            pad: self.cfg.pad_id() as i32,
            eos: self.cfg.eos_id() as i32,
            bos: Some(self.cfg.bos_token_id as i32),
            decoder_start: None,
        }
    }

    fn is_decoder_only(&self) -> bool {
        true
    }

    fn max_positions(&self) -> Option<usize> {
        Some(self.cfg.max_position_embeddings)
    }

    fn batch_spec(&self) -> BatchSpec {
        BatchSpec::from(&self.cfg)
    }

    fn random_batch(&self, input_lens: &[usize], target_lens: &[usize], seed: u64) -> HostBatch {
        HostBatch::random_causal(&self.cfg, input_lens, target_lens, seed)
    }

    /// Label rows are positions of the whole row: prompt rows, then input and target.
    fn label_grid_width(&self, host: &HostBatch, prompt_rows: usize) -> usize {
        prompt_rows + host.enc_len
    }

    /// The positions whose next position carries a label (see [`label_rows`]).
    fn label_count(&self, host: &HostBatch, prompt_rows: usize) -> usize {
        let labels = labels_behind_prompt(host, prompt_rows);
        label_rows(&labels, host.batch, prompt_rows + host.enc_len).len()
    }

    fn forward_batch<'a>(
        &'a self,
        be: &B,
        batch: &StepBatch<'_, B>,
    ) -> Result<(ModelOutput<B>, Box<dyn Activations<B> + 'a>)> {
        let (host, p) = (batch.host, batch.prompt_rows);
        let (b, t) = (host.batch, host.enc_len);
        if host.labels.len() != b * t || host.dec_len != 0 {
            return Err(Error::Input(format!(
                "a Llama batch has labels (B, T) = {b}·{t} aligned with the input and no \
                 decoder side; this batch has {} labels and {} decoder positions",
                host.labels.len(),
                host.dec_len
            )));
        }
        let labels = labels_behind_prompt(host, p);
        let llama_batch = LlamaBatch::<B> {
            inputs_embeds: batch.inputs_embeds,
            attention_mask: batch.attention_mask,
            labels: &labels,
            batch: b,
            len: p + t,
            loss_tokens: batch.loss_tokens,
        };
        let (out, saved) = self.forward(be, &llama_batch)?;
        Ok((out, Box::new(Saved { model: self, saved })))
    }

    fn generate(
        &self,
        be: &B,
        inputs_embeds: &B::Tensor,
        attention_mask: &[i32],
        batch: usize,
        len: usize,
        gen: &GenerateConfig,
    ) -> Result<Generated> {
        Llama::generate(self, be, inputs_embeds, attention_mask, batch, len, gen)
    }

    fn train_step_flops(&self, x: StepTokens) -> f64 {
        llama_flops(&self.cfg, x)
    }
}

impl<B: Backend> Activations<B> for Saved<'_, Llama<B>, LlamaSaved<B>> {
    fn backward_dinp(&self, be: &B) -> B::Tensor {
        self.model.backward_dinp(be, &self.saved)
    }

    fn encoder_out(&self) -> Option<&B::Tensor> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(scaling: RopeScaling) -> LlamaConfig {
        LlamaConfig {
            vocab_size: 10,
            hidden_size: 8,
            intermediate_size: 12,
            num_hidden_layers: 1,
            num_attention_heads: 2,
            num_key_value_heads: 1,
            head_dim: 16,
            rms_norm_eps: 1e-5,
            rope_theta: 500000.0,
            rope_scaling: scaling,
            max_position_embeddings: 64,
            tie_word_embeddings: true,
            bos_token_id: 1,
            eos_token_ids: vec![2],
            pad_token_id: None,
        }
    }

    #[test]
    fn rope_inv_freq_plain_is_theta_power() {
        let inv = rope_inv_freq(&cfg(RopeScaling::None));
        assert_eq!(inv.len(), 8);
        for (i, &f) in inv.iter().enumerate() {
            let want = 500000f64.powf(-(2.0 * i as f64) / 16.0);
            assert!((f as f64 / want - 1.0).abs() < 1e-6, "{i}: {f} vs {want}");
        }
    }

    #[test]
    fn rope_inv_freq_llama3_has_three_regimes() {
        // theta 10000, D 16: wavelengths 6.3, 20, 63, 199, ...; with 64 original positions the
        // regime bounds are 64 / 4 = 16 and 64 / 1 = 64.
        let with = |scaling| LlamaConfig {
            rope_theta: 10000.0,
            ..cfg(scaling)
        };
        let plain = rope_inv_freq(&with(RopeScaling::None));
        let scaled = rope_inv_freq(&with(RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 64,
        }));
        let (mut kept, mut divided, mut between) = (0, 0, 0);
        for (&p, &s) in plain.iter().zip(&scaled) {
            let wavelen = 2.0 * std::f64::consts::PI / p as f64;
            if wavelen < 16.0 {
                assert_eq!(s, p);
                kept += 1;
            } else if wavelen > 64.0 {
                assert!((s * 8.0 / p - 1.0).abs() < 1e-6);
                divided += 1;
            } else {
                assert!(
                    s < p && s > p / 8.0,
                    "interpolated {s} not between {p}/8 and {p}"
                );
                between += 1;
            }
        }
        assert!(
            kept > 0 && divided > 0 && between > 0,
            "{kept} {divided} {between}"
        );
    }

    #[test]
    fn label_rows_are_the_rows_before_each_label() {
        // B = 2, T = 4: row 0 labels at t = 2, 3; row 1 a label at t = 0 (never predicted) and 3.
        let labels = [-100, -100, 5, 6, 7, -100, -100, 8];
        assert_eq!(label_rows(&labels, 2, 4), vec![1, 2, 6]);
    }
}
