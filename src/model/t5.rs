//! T5 (v1.0 and v1.1/flan) over any [`Backend`]: forward from `inputs_embeds`, and the hand-written
//! backward that returns only d loss / d inputs_embeds (the weights are frozen, never differentiated).
//!
//! Gradient accumulation convention: activation gradients inside a sub-layer are written (`=`);
//! the residual-stream gradient `dx` and the encoder-output gradient `d_enc_out` (read by every
//! decoder cross-attention) are accumulated (`+=`).
//!
//! Shapes: B batch, T encoder positions (prompt rows included), Td decoder positions, C = d_model,
//! H heads of width D (H·D may differ from C), F = d_ff, V vocab, M label rows, NB buckets.
//! Dropout is not modelled: fastpt trains with deterministic forwards (dropout 0).

use crate::backend::profiling::nvtx_range;
use crate::backend::{Activation, AttnDims, AttnMask, Backend, LinearDims, RelBias, RmsNormDims};
use crate::error::{Error, Result};
use crate::model::batch::BatchSpec;
use crate::model::batch::HostBatch;
use crate::model::config::{Architecture, FeedForward, T5Config};
use crate::model::family::{million_params, Activations, Family, Saved, SpecialIds, StepBatch};
use crate::model::flops::{t5_flops, StepTokens};
use crate::model::generate::{check_generate_inputs, GenerateConfig, Generated, Greedy};
use crate::model::linear::{Linear, LinearData, Quant};
use crate::model::{
    label_rows_loss, label_rows_loss_backward, LmHead, LossSaved, ModelOutput, NormSaved,
};

/// The weights of one attention block, PyTorch layout `(out, in)`.
pub struct AttnWeights<B: Backend> {
    pub q: Linear<B>, // (H·D, C)
    pub k: Linear<B>, // (H·D, C)
    pub v: Linear<B>, // (H·D, C)
    pub o: Linear<B>, // (C, H·D)
}

/// The weights of one feed-forward block.
pub struct FfnWeights<B: Backend> {
    /// `wi` (v1.0) or `wi_0` (v1.1, the activated branch).
    pub wi: Linear<B>, // (F, C)
    /// `wi_1` (v1.1 only, the linear gate branch).
    pub wi_gate: Option<Linear<B>>, // (F, C)
    pub wo: Linear<B>, // (C, F)
}

pub struct EncoderLayer<B: Backend> {
    pub ln_attn: B::Tensor, // (C)
    pub attn: AttnWeights<B>,
    pub ln_ff: B::Tensor, // (C)
    pub ff: FfnWeights<B>,
}

pub struct DecoderLayer<B: Backend> {
    pub ln_self: B::Tensor, // (C)
    pub self_attn: AttnWeights<B>,
    pub ln_cross: B::Tensor, // (C)
    pub cross_attn: AttnWeights<B>,
    pub ln_ff: B::Tensor, // (C)
    pub ff: FfnWeights<B>,
}

/// All weights of a T5 model.
pub struct T5Weights<B: Backend> {
    pub shared: B::Tensor, // (V, C) token embeddings, shared by encoder and decoder
    pub encoder: Vec<EncoderLayer<B>>,
    pub encoder_rel_bias: B::Tensor, // (NB, H) held by encoder layer 0, used by all
    pub encoder_final_ln: B::Tensor, // (C)
    pub decoder: Vec<DecoderLayer<B>>,
    pub decoder_rel_bias: B::Tensor, // (NB, H) held by decoder layer 0, used by all
    pub decoder_final_ln: B::Tensor, // (C)
    /// Untied output projection (v1.1); `None` when tied to `shared` (v1.0).
    pub lm_head: Option<B::Tensor>, // (V, C)
}

/// Where weights come from: given a Hugging Face tensor name and its expected shape, returns the
/// values as f32 (a checkpoint folder, or random weights of a built-in shape).
pub type WeightSource<'a> = dyn FnMut(&str, &[usize]) -> Result<Vec<f32>> + 'a;

/// Where the frozen linear weights come from: as [`WeightSource`], but a weight may come
/// already quantised (a bitsandbytes 4-bit checkpoint).
pub type LinearSource<'a> = dyn FnMut(&str, &[usize]) -> Result<LinearData> + 'a;

/// The Hugging Face name and shape of every tensor a T5 checkpoint must hold, in load order.
pub fn t5_tensor_specs(cfg: &T5Config) -> Vec<(String, Vec<usize>)> {
    let (c, hd, f, v) = (cfg.d_model, cfg.inner_dim(), cfg.d_ff, cfg.vocab_size);
    let nb_h = vec![cfg.relative_attention_num_buckets, cfg.num_heads];
    let mut specs: Vec<(String, Vec<usize>)> = vec![("shared.weight".into(), vec![v, c])];
    let attn = |specs: &mut Vec<(String, Vec<usize>)>, prefix: &str| {
        for p in ["q", "k", "v"] {
            specs.push((format!("{prefix}.{p}.weight"), vec![hd, c]));
        }
        specs.push((format!("{prefix}.o.weight"), vec![c, hd]));
    };
    let ffn = |specs: &mut Vec<(String, Vec<usize>)>, prefix: &str| match cfg.feed_forward {
        FeedForward::Relu => specs.push((format!("{prefix}.wi.weight"), vec![f, c])),
        FeedForward::GatedGelu => {
            specs.push((format!("{prefix}.wi_0.weight"), vec![f, c]));
            specs.push((format!("{prefix}.wi_1.weight"), vec![f, c]));
        }
    };
    for l in 0..cfg.num_layers {
        let p = format!("encoder.block.{l}.layer");
        specs.push((format!("{p}.0.layer_norm.weight"), vec![c]));
        attn(&mut specs, &format!("{p}.0.SelfAttention"));
        if l == 0 {
            specs.push((
                format!("{p}.0.SelfAttention.relative_attention_bias.weight"),
                nb_h.clone(),
            ));
        }
        specs.push((format!("{p}.1.layer_norm.weight"), vec![c]));
        ffn(&mut specs, &format!("{p}.1.DenseReluDense"));
        specs.push((format!("{p}.1.DenseReluDense.wo.weight"), vec![c, f]));
    }
    specs.push(("encoder.final_layer_norm.weight".into(), vec![c]));
    for l in 0..cfg.num_decoder_layers {
        let p = format!("decoder.block.{l}.layer");
        specs.push((format!("{p}.0.layer_norm.weight"), vec![c]));
        attn(&mut specs, &format!("{p}.0.SelfAttention"));
        if l == 0 {
            specs.push((
                format!("{p}.0.SelfAttention.relative_attention_bias.weight"),
                nb_h.clone(),
            ));
        }
        specs.push((format!("{p}.1.layer_norm.weight"), vec![c]));
        attn(&mut specs, &format!("{p}.1.EncDecAttention"));
        specs.push((format!("{p}.2.layer_norm.weight"), vec![c]));
        ffn(&mut specs, &format!("{p}.2.DenseReluDense"));
        specs.push((format!("{p}.2.DenseReluDense.wo.weight"), vec![c, f]));
    }
    specs.push(("decoder.final_layer_norm.weight".into(), vec![c]));
    if !cfg.tie_word_embeddings {
        specs.push(("lm_head.weight".into(), vec![v, c]));
    }
    specs
}

impl<B: Backend> T5Weights<B> {
    /// Builds the weights from a source that returns each tensor of [`t5_tensor_specs`] as f32
    /// (a checkpoint folder, or random weights of a built-in shape). Tensors are uploaded one by
    /// one so that host memory holds at most one converted tensor at a time.
    pub fn load(be: &B, cfg: &T5Config, source: &mut WeightSource<'_>) -> Result<Self> {
        Self::load_quantized(be, cfg, source, Quant::None)
    }

    /// As [`T5Weights::load`], with the attention and feed-forward projections stored as `quant`
    /// says (embeddings, norms, the relative bias and the LM head stay dense, as bitsandbytes
    /// leaves them).
    pub fn load_quantized(
        be: &B,
        cfg: &T5Config,
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

    /// As [`T5Weights::load_quantized`], with the attention and feed-forward projections read
    /// through `linears` (dense ones stored as `quant` says, NF4 ones as they are).
    pub fn load_with_linears(
        be: &B,
        cfg: &T5Config,
        source: &mut WeightSource<'_>,
        linears: &mut LinearSource<'_>,
        quant: Quant,
    ) -> Result<Self> {
        let (c, hd, f, v) = (cfg.d_model, cfg.inner_dim(), cfg.d_ff, cfg.vocab_size);
        let nb = cfg.relative_attention_num_buckets;
        // Same names and order as t5_tensor_specs (a test checks that they agree).
        let shared = be.upload_f32(source("shared.weight", &[v, c])?);
        let mut encoder = Vec::with_capacity(cfg.num_layers);
        let mut encoder_rel_bias = None;
        for l in 0..cfg.num_layers {
            let p = format!("encoder.block.{l}.layer");
            let ln_attn = be.upload_f32(source(&format!("{p}.0.layer_norm.weight"), &[c])?);
            let attn = load_attn(be, linears, quant, &format!("{p}.0.SelfAttention"), hd, c)?;
            if l == 0 {
                let name = format!("{p}.0.SelfAttention.relative_attention_bias.weight");
                encoder_rel_bias = Some(be.upload_f32(source(&name, &[nb, cfg.num_heads])?));
            }
            let ln_ff = be.upload_f32(source(&format!("{p}.1.layer_norm.weight"), &[c])?);
            let ff = load_ffn(
                be,
                linears,
                quant,
                cfg,
                &format!("{p}.1.DenseReluDense"),
                c,
                f,
            )?;
            encoder.push(EncoderLayer {
                ln_attn,
                attn,
                ln_ff,
                ff,
            });
        }
        let encoder_final_ln = be.upload_f32(source("encoder.final_layer_norm.weight", &[c])?);
        let mut decoder = Vec::with_capacity(cfg.num_decoder_layers);
        let mut decoder_rel_bias = None;
        for l in 0..cfg.num_decoder_layers {
            let p = format!("decoder.block.{l}.layer");
            let ln_self = be.upload_f32(source(&format!("{p}.0.layer_norm.weight"), &[c])?);
            let self_attn = load_attn(be, linears, quant, &format!("{p}.0.SelfAttention"), hd, c)?;
            if l == 0 {
                let name = format!("{p}.0.SelfAttention.relative_attention_bias.weight");
                decoder_rel_bias = Some(be.upload_f32(source(&name, &[nb, cfg.num_heads])?));
            }
            let ln_cross = be.upload_f32(source(&format!("{p}.1.layer_norm.weight"), &[c])?);
            let cross_attn =
                load_attn(be, linears, quant, &format!("{p}.1.EncDecAttention"), hd, c)?;
            let ln_ff = be.upload_f32(source(&format!("{p}.2.layer_norm.weight"), &[c])?);
            let ff = load_ffn(
                be,
                linears,
                quant,
                cfg,
                &format!("{p}.2.DenseReluDense"),
                c,
                f,
            )?;
            decoder.push(DecoderLayer {
                ln_self,
                self_attn,
                ln_cross,
                cross_attn,
                ln_ff,
                ff,
            });
        }
        let decoder_final_ln = be.upload_f32(source("decoder.final_layer_norm.weight", &[c])?);
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(be.upload_f32(source("lm_head.weight", &[v, c])?))
        };
        let missing_bias = || Error::Input("T5 config has zero layers".into());
        Ok(T5Weights {
            shared,
            encoder,
            encoder_rel_bias: encoder_rel_bias.ok_or_else(missing_bias)?,
            encoder_final_ln,
            decoder,
            decoder_rel_bias: decoder_rel_bias.ok_or_else(missing_bias)?,
            decoder_final_ln,
            lm_head,
        })
    }
}

fn load_attn<B: Backend>(
    be: &B,
    linears: &mut LinearSource<'_>,
    quant: Quant,
    prefix: &str,
    hd: usize,
    c: usize,
) -> Result<AttnWeights<B>> {
    let mut linear = |name: &str, shape: [usize; 2]| -> Result<Linear<B>> {
        let data = linears(&format!("{prefix}.{name}.weight"), &shape)?;
        Ok(Linear::from_data(be, data, quant))
    };
    Ok(AttnWeights {
        q: linear("q", [hd, c])?,
        k: linear("k", [hd, c])?,
        v: linear("v", [hd, c])?,
        o: linear("o", [c, hd])?,
    })
}

fn load_ffn<B: Backend>(
    be: &B,
    linears: &mut LinearSource<'_>,
    quant: Quant,
    cfg: &T5Config,
    prefix: &str,
    c: usize,
    f: usize,
) -> Result<FfnWeights<B>> {
    let mut linear = |name: &str, shape: [usize; 2]| -> Result<Linear<B>> {
        let data = linears(&format!("{prefix}.{name}.weight"), &shape)?;
        Ok(Linear::from_data(be, data, quant))
    };
    let (wi, wi_gate) = match cfg.feed_forward {
        FeedForward::Relu => (linear("wi", [f, c])?, None),
        FeedForward::GatedGelu => (linear("wi_0", [f, c])?, Some(linear("wi_1", [f, c])?)),
    };
    Ok(FfnWeights {
        wi,
        wi_gate,
        wo: linear("wo", [c, f])?,
    })
}

/// A T5 model: config and weights on a backend.
pub struct T5<B: Backend> {
    pub cfg: T5Config,
    pub weights: T5Weights<B>,
}

/// One padded batch. Ids and masks stay on the host (the model validates and uploads them).
pub struct T5Batch<'a, B: Backend> {
    /// Encoder input rows, prompt rows included.
    pub inputs_embeds: &'a B::Tensor, // (B, T, C)
    /// 1 for real rows, 0 for padding.
    pub attention_mask: &'a [i32], // (B, T)
    pub decoder_input_ids: &'a [i32], // (B, Td)
    /// Target ids; -100 marks positions without a loss.
    pub labels: &'a [i32], // (B, Td)
    pub batch: usize,
    pub enc_len: usize,
    pub dec_len: usize,
    /// The loss is a mean over this many label tokens: a data-parallel rank's share of a
    /// larger batch divides by the whole batch's count, so the ranks' gradients sum to one
    /// process's. `None`: this batch's own label tokens.
    pub loss_tokens: Option<usize>,
}

/// What the backward of one attention sub-layer needs.
struct AttnSaved<B: Backend> {
    norm: NormSaved<B>,
    q: B::Tensor,   // (B, T, H·D)
    k: B::Tensor,   // (B, S, H·D)
    v: B::Tensor,   // (B, S, H·D)
    out: B::Tensor, // (B, T, H·D) attention output before the o projection
    lse: B::Tensor, // (B, H, T)
}

/// What the backward of one feed-forward sub-layer needs.
struct FfnSaved<B: Backend> {
    norm: NormSaved<B>,
    a: B::Tensor,            // (N, F) pre-activation (wi / wi_0)
    gate: Option<B::Tensor>, // (N, F) gate branch (wi_1), v1.1 only
}

struct EncoderLayerSaved<B: Backend> {
    attn: AttnSaved<B>,
    ff: FfnSaved<B>,
}

struct DecoderLayerSaved<B: Backend> {
    self_attn: AttnSaved<B>,
    cross_attn: AttnSaved<B>,
    ff: FfnSaved<B>,
}

/// Activations saved by [`T5::forward`] for [`T5::backward_dinp`].
pub struct T5Saved<B: Backend> {
    batch: usize,
    enc_len: usize,
    dec_len: usize,
    enc_mask: B::Index, // (B, T)
    dec_mask: B::Index, // (B, Td) all ones: the decoder sees no padding mask, only causality
    encoder: Vec<EncoderLayerSaved<B>>,
    enc_final: NormSaved<B>,
    enc_out: B::Tensor, // (B, T, C)
    decoder: Vec<DecoderLayerSaved<B>>,
    dec_final: NormSaved<B>,
    loss: LossSaved<B>,
}

impl<B: Backend> T5Saved<B> {
    /// The encoder output `(B, T, C)` (after the final norm).
    pub fn encoder_out(&self) -> &B::Tensor {
        &self.enc_out
    }
}

/// The keys and values a decoding step attends to.
enum CachedKv<'a, B: Backend> {
    /// Self-attention: this step's key and value are written to flat cache rows `slots`
    /// (`b·S + step`) of `k, v (B, S, H·D)` first.
    Write {
        k: &'a mut B::Tensor,
        v: &'a mut B::Tensor,
        slots: &'a B::Index, // (B)
    },
    /// Cross-attention: the encoder output's keys and values `(B, T, H·D)`, computed once.
    Read { k: &'a B::Tensor, v: &'a B::Tensor },
}

impl<B: Backend> T5<B> {
    pub fn new(cfg: T5Config, weights: T5Weights<B>) -> Self {
        T5 { cfg, weights }
    }

    fn eps(&self) -> f64 {
        self.cfg.layer_norm_epsilon
    }

    fn act(&self) -> Activation {
        match self.cfg.feed_forward {
            FeedForward::Relu => Activation::Relu,
            FeedForward::GatedGelu => Activation::GeluTanh,
        }
    }

    fn attn_dims(&self, b: usize, t: usize, s: usize) -> AttnDims {
        AttnDims {
            b,
            t,
            s,
            h: self.cfg.num_heads,
            h_kv: self.cfg.num_heads,
            d: self.cfg.d_kv,
        }
    }

    fn rel_bias<'a>(&self, table: &'a B::Tensor, bidirectional: bool) -> RelBias<'a, B::Tensor> {
        RelBias {
            table,
            bidirectional,
            num_buckets: self.cfg.relative_attention_num_buckets,
            max_distance: self.cfg.relative_attention_max_distance,
            q_offset: 0,
        }
    }

    /// The lm_head weight `(V, C)` and the scale applied to the decoder output before it:
    /// v1.0 ties the head to the embeddings and rescales by d_model^-0.5, as Hugging Face does.
    fn lm_head(&self) -> LmHead<'_, B::Tensor> {
        let weight = self
            .weights
            .lm_head
            .as_ref()
            .unwrap_or(&self.weights.shared);
        let scale = if self.cfg.scale_decoder_outputs {
            (self.cfg.d_model as f64).powf(-0.5)
        } else {
            1.0
        };
        LmHead { weight, scale }
    }

    /// `x + attention(rmsnorm(x))` with keys and values from `kv` (cross-attention) or from the
    /// normalised `x` itself. `x (B, T, C)` is moved into the saved activations.
    // Buffers and weights of one sub-layer plus the attention call (mask, bias, dims): no loose dimensions.
    #[allow(clippy::too_many_arguments)]
    fn attention_sublayer_forward(
        &self,
        be: &B,
        x: B::Tensor,
        ln: &B::Tensor,
        w: &AttnWeights<B>,
        kv: Option<&B::Tensor>,
        mask: AttnMask<'_, B::Index>,
        bias: Option<RelBias<'_, B::Tensor>>,
        dims: AttnDims,
    ) -> (B::Tensor, AttnSaved<B>) {
        let (c, hd) = (self.cfg.d_model, self.cfg.inner_dim());
        let (n, n_kv) = (dims.b * dims.t, dims.b * dims.s);
        let mut normed = be.zeros(n * c); // (B, T, C)
        let mut rstd = be.zeros(n); // (B·T)
        be.rmsnorm_forward(
            &mut normed,
            &mut rstd,
            &x,
            ln,
            self.eps(),
            RmsNormDims { n, c },
        );
        let kv_inp = kv.unwrap_or(&normed); // (B, S, C)
        let mut q = be.zeros(n * hd);
        let mut k = be.zeros(n_kv * hd);
        let mut v = be.zeros(n_kv * hd);
        w.q.forward(be, &mut q, &normed, LinearDims::new(n, c, hd));
        w.k.forward(be, &mut k, kv_inp, LinearDims::new(n_kv, c, hd));
        w.v.forward(be, &mut v, kv_inp, LinearDims::new(n_kv, c, hd));
        let mut out = be.zeros(n * hd);
        let mut lse = be.zeros(dims.b * dims.h * dims.t);
        // T5 does not scale scores by 1/sqrt(D): the scale is folded into the q init.
        be.attention_forward(&mut out, &mut lse, &q, &k, &v, mask, bias, 1.0, dims);
        let mut y = be.zeros(n * c);
        w.o.forward(be, &mut y, &out, LinearDims::new(n, hd, c));
        be.add_assign(&mut y, &x);
        let norm = NormSaved { inp: x, rstd };
        (
            y,
            AttnSaved {
                norm,
                q,
                k,
                v,
                out,
                lse,
            },
        )
    }

    /// Backward of [`Self::attention_sublayer_forward`]: `dx (B, T, C) +=` the gradient through
    /// the attention branch; for cross-attention `d_kv (B, S, C) +=` the gradient of the keys' and
    /// values' source (the encoder output).
    // Buffers and weights of one sub-layer plus the attention call (mask, bias, dims): no loose dimensions.
    #[allow(clippy::too_many_arguments)]
    fn attention_sublayer_backward(
        &self,
        be: &B,
        dx: &mut B::Tensor,
        d_kv: Option<&mut B::Tensor>,
        saved: &AttnSaved<B>,
        ln: &B::Tensor,
        w: &AttnWeights<B>,
        mask: AttnMask<'_, B::Index>,
        bias: Option<RelBias<'_, B::Tensor>>,
        dims: AttnDims,
    ) {
        let (c, hd) = (self.cfg.d_model, self.cfg.inner_dim());
        let (n, n_kv) = (dims.b * dims.t, dims.b * dims.s);
        let mut d_out = be.zeros(n * hd); // (B, T, H·D)
        w.o.backward_dinp(be, &mut d_out, dx, false, LinearDims::new(n, hd, c));
        let mut dq = be.zeros(n * hd);
        let mut dk = be.zeros(n_kv * hd);
        let mut dv = be.zeros(n_kv * hd);
        let s = saved;
        be.attention_backward_dinp(
            &mut dq, &mut dk, &mut dv, &d_out, &s.q, &s.k, &s.v, &s.out, &s.lse, mask, bias, 1.0,
            dims,
        );
        let mut d_normed = be.zeros(n * c); // (B, T, C)
        w.q.backward_dinp(be, &mut d_normed, &dq, false, LinearDims::new(n, c, hd));
        let d_kv_inp = match d_kv {
            Some(d_kv) => d_kv,
            None => &mut d_normed,
        };
        w.k.backward_dinp(be, d_kv_inp, &dk, true, LinearDims::new(n_kv, c, hd));
        w.v.backward_dinp(be, d_kv_inp, &dv, true, LinearDims::new(n_kv, c, hd));
        be.rmsnorm_backward_dinp(
            dx,
            &d_normed,
            &s.norm.inp,
            ln,
            &s.norm.rstd,
            RmsNormDims { n, c },
        );
    }

    /// `x + ffn(rmsnorm(x))`, `x (N, C)` moved into the saved activations.
    fn ffn_sublayer_forward(
        &self,
        be: &B,
        x: B::Tensor,
        ln: &B::Tensor,
        w: &FfnWeights<B>,
        n: usize,
    ) -> (B::Tensor, FfnSaved<B>) {
        let (c, f) = (self.cfg.d_model, self.cfg.d_ff);
        let mut normed = be.zeros(n * c); // (N, C)
        let mut rstd = be.zeros(n);
        be.rmsnorm_forward(
            &mut normed,
            &mut rstd,
            &x,
            ln,
            self.eps(),
            RmsNormDims { n, c },
        );
        let mut a = be.zeros(n * f); // (N, F)
        w.wi.forward(be, &mut a, &normed, LinearDims::new(n, c, f));
        let gate = w.wi_gate.as_ref().map(|wg| {
            let mut g = be.zeros(n * f); // (N, F)
            wg.forward(be, &mut g, &normed, LinearDims::new(n, c, f));
            g
        });
        let mut hidden = be.zeros(n * f); // (N, F)
        be.gated_act_forward(&mut hidden, &a, gate.as_ref(), self.act(), n * f);
        let mut y = be.zeros(n * c);
        w.wo.forward(be, &mut y, &hidden, LinearDims::new(n, f, c));
        be.add_assign(&mut y, &x);
        let norm = NormSaved { inp: x, rstd };
        (y, FfnSaved { norm, a, gate })
    }

    /// Backward of [`Self::ffn_sublayer_forward`]: `dx (N, C) +=` the gradient through the branch.
    fn ffn_sublayer_backward(
        &self,
        be: &B,
        dx: &mut B::Tensor,
        saved: &FfnSaved<B>,
        ln: &B::Tensor,
        w: &FfnWeights<B>,
        n: usize,
    ) {
        let (c, f) = (self.cfg.d_model, self.cfg.d_ff);
        let mut d_hidden = be.zeros(n * f); // (N, F)
        w.wo.backward_dinp(be, &mut d_hidden, dx, false, LinearDims::new(n, f, c));
        let mut da = be.zeros(n * f);
        let mut d_gate = saved.gate.as_ref().map(|_| be.zeros(n * f));
        be.gated_act_backward_dinp(
            &mut da,
            d_gate.as_mut(),
            &d_hidden,
            &saved.a,
            saved.gate.as_ref(),
            self.act(),
            n * f,
        );
        let mut d_normed = be.zeros(n * c); // (N, C)
        w.wi.backward_dinp(be, &mut d_normed, &da, false, LinearDims::new(n, c, f));
        if let (Some(dg), Some(wg)) = (&d_gate, &w.wi_gate) {
            wg.backward_dinp(be, &mut d_normed, dg, true, LinearDims::new(n, c, f));
        }
        be.rmsnorm_backward_dinp(
            dx,
            &d_normed,
            &saved.norm.inp,
            ln,
            &saved.norm.rstd,
            RmsNormDims { n, c },
        );
    }

    /// Checks a batch against the config; errors name the field and the bad value.
    fn validate(&self, be: &B, batch: &T5Batch<'_, B>) -> Result<()> {
        let (b, t, td) = (batch.batch, batch.enc_len, batch.dec_len);
        let (c, v) = (self.cfg.d_model, self.cfg.vocab_size);
        let bad = |msg: String| Err(Error::Input(msg));
        if b == 0 || t == 0 || td == 0 {
            return bad(format!(
                "batch: empty dimension (B = {b}, T = {t}, Td = {td})"
            ));
        }
        if be.len(batch.inputs_embeds) != b * t * c {
            let found = be.len(batch.inputs_embeds);
            return bad(format!(
                "inputs_embeds: {found} values, expected B·T·C = {b}·{t}·{c} = {}",
                b * t * c
            ));
        }
        for (name, len, want) in [
            ("attention_mask", batch.attention_mask.len(), b * t),
            ("decoder_input_ids", batch.decoder_input_ids.len(), b * td),
            ("labels", batch.labels.len(), b * td),
        ] {
            if len != want {
                return bad(format!("{name}: {len} values, expected {want}"));
            }
        }
        crate::model::check_attention_mask(batch.attention_mask, t)?;
        let in_vocab = |x: i32| x >= 0 && (x as usize) < v;
        if let Some(&x) = batch.decoder_input_ids.iter().find(|&&x| !in_vocab(x)) {
            return bad(format!(
                "decoder_input_ids: id {x} is outside the vocabulary 0..{v}"
            ));
        }
        if let Some(&x) = batch.labels.iter().find(|&&x| x != -100 && !in_vocab(x)) {
            return bad(format!(
                "labels: id {x} is outside the vocabulary 0..{v} (and not -100)"
            ));
        }
        if batch.labels.iter().all(|&x| x == -100) {
            return bad("labels: every position is -100, so there is no loss to compute".into());
        }
        Ok(())
    }

    /// The encoder: `inputs_embeds (B, T, C)` with key mask `enc_mask (B, T)` to the encoder
    /// output `(B, T, C)`, with what the backward needs.
    #[allow(clippy::type_complexity)]
    fn encoder_forward(
        &self,
        be: &B,
        inputs_embeds: &B::Tensor,
        enc_mask: &B::Index,
        b: usize,
        t: usize,
    ) -> (Vec<EncoderLayerSaved<B>>, NormSaved<B>, B::Tensor) {
        let c = self.cfg.d_model;
        let w = &self.weights;
        let enc_self = AttnMask {
            key_mask: enc_mask,
            causal: false,
        };
        let enc_bias = self.rel_bias(&w.encoder_rel_bias, true);
        let enc_dims = self.attn_dims(b, t, t);
        let mut x = be.copy(inputs_embeds); // (B, T, C) residual stream
        let mut encoder = Vec::with_capacity(w.encoder.len());
        for (l, layer) in w.encoder.iter().enumerate() {
            let _range = nvtx_range(&format!("encoder layer {l}"));
            let (y, attn) = self.attention_sublayer_forward(
                be,
                x,
                &layer.ln_attn,
                &layer.attn,
                None,
                enc_self,
                Some(enc_bias),
                enc_dims,
            );
            let (y, ff) = self.ffn_sublayer_forward(be, y, &layer.ln_ff, &layer.ff, b * t);
            x = y;
            encoder.push(EncoderLayerSaved { attn, ff });
        }
        let mut enc_out = be.zeros(b * t * c); // (B, T, C)
        let mut rstd = be.zeros(b * t);
        be.rmsnorm_forward(
            &mut enc_out,
            &mut rstd,
            &x,
            &w.encoder_final_ln,
            self.eps(),
            RmsNormDims { n: b * t, c },
        );
        let enc_final = NormSaved { inp: x, rstd };
        (encoder, enc_final, enc_out)
    }

    /// Forward through encoder, decoder and the loss; saves what [`Self::backward_dinp`] needs.
    /// Logits are computed only at label positions: the (B, Td, V) tensor never exists.
    pub fn forward(&self, be: &B, batch: &T5Batch<'_, B>) -> Result<(ModelOutput<B>, T5Saved<B>)> {
        self.validate(be, batch)?;
        let (b, t, td) = (batch.batch, batch.enc_len, batch.dec_len);
        let (c, v) = (self.cfg.d_model, self.cfg.vocab_size);
        let w = &self.weights;

        // Encoder.
        let enc_mask = be.upload_index(batch.attention_mask);
        let (encoder, enc_final, enc_out) =
            self.encoder_forward(be, batch.inputs_embeds, &enc_mask, b, t);

        // Decoder.
        let dec_mask = be.upload_index(&vec![1; b * td]);
        let dec_self = AttnMask {
            key_mask: &dec_mask,
            causal: true,
        };
        let cross = AttnMask {
            key_mask: &enc_mask,
            causal: false,
        };
        let dec_bias = self.rel_bias(&w.decoder_rel_bias, false);
        let (self_dims, cross_dims) = (self.attn_dims(b, td, td), self.attn_dims(b, td, t));
        let mut x = be.zeros(b * td * c); // (B, Td, C)
        be.gather_rows(
            &mut x,
            &w.shared,
            &be.upload_index(batch.decoder_input_ids),
            b * td,
            c,
        );
        let mut decoder = Vec::with_capacity(w.decoder.len());
        for (l, layer) in w.decoder.iter().enumerate() {
            let _range = nvtx_range(&format!("decoder layer {l}"));
            let (y, self_attn) = self.attention_sublayer_forward(
                be,
                x,
                &layer.ln_self,
                &layer.self_attn,
                None,
                dec_self,
                Some(dec_bias),
                self_dims,
            );
            let (y, cross_attn) = self.attention_sublayer_forward(
                be,
                y,
                &layer.ln_cross,
                &layer.cross_attn,
                Some(&enc_out),
                cross,
                None,
                cross_dims,
            );
            let (y, ff) = self.ffn_sublayer_forward(be, y, &layer.ln_ff, &layer.ff, b * td);
            x = y;
            decoder.push(DecoderLayerSaved {
                self_attn,
                cross_attn,
                ff,
            });
        }
        let mut dec_out = be.zeros(b * td * c); // (B, Td, C)
        let mut rstd = be.zeros(b * td);
        be.rmsnorm_forward(
            &mut dec_out,
            &mut rstd,
            &x,
            &w.decoder_final_ln,
            self.eps(),
            RmsNormDims { n: b * td, c },
        );
        let dec_final = NormSaved { inp: x, rstd };

        // Logits and loss at the label rows only.
        let rows: Vec<usize> = (0..b * td).filter(|&i| batch.labels[i] != -100).collect();
        let targets: Vec<i32> = rows.iter().map(|&i| batch.labels[i]).collect();
        let (output, loss) = label_rows_loss(
            be,
            &dec_out,
            self.lm_head(),
            (rows, batch.loss_tokens),
            &targets,
            (c, v),
        );
        let saved = T5Saved {
            batch: b,
            enc_len: t,
            dec_len: td,
            enc_mask,
            dec_mask,
            encoder,
            enc_final,
            enc_out,
            decoder,
            dec_final,
            loss,
        };
        Ok((output, saved))
    }

    /// One decoding step of an attention sub-layer, `x (B, C) +` attention of one query per
    /// row over cached keys and values (no activations saved: generation has no backward).
    // Buffers and weights of one sub-layer plus the attention call (mask, bias, dims): no loose dimensions.
    #[allow(clippy::too_many_arguments)]
    fn cached_attention(
        &self,
        be: &B,
        x: B::Tensor,
        ln: &B::Tensor,
        w: &AttnWeights<B>,
        kv: CachedKv<'_, B>,
        mask: AttnMask<'_, B::Index>,
        bias: Option<RelBias<'_, B::Tensor>>,
        dims: AttnDims,
    ) -> B::Tensor {
        let (c, hd, n) = (self.cfg.d_model, self.cfg.inner_dim(), dims.b);
        let mut normed = be.zeros(n * c); // (B, C)
        let mut rstd = be.zeros(n);
        be.rmsnorm_forward(
            &mut normed,
            &mut rstd,
            &x,
            ln,
            self.eps(),
            RmsNormDims { n, c },
        );
        let mut q = be.zeros(n * hd); // (B, H·D)
        w.q.forward(be, &mut q, &normed, LinearDims::new(n, c, hd));
        let (k, v): (&B::Tensor, &B::Tensor) = match kv {
            CachedKv::Write { k, v, slots } => {
                let mut k_new = be.zeros(n * hd); // (B, H·D)
                let mut v_new = be.zeros(n * hd);
                w.k.forward(be, &mut k_new, &normed, LinearDims::new(n, c, hd));
                w.v.forward(be, &mut v_new, &normed, LinearDims::new(n, c, hd));
                // The slots are zero (never written): adding writes them.
                be.scatter_rows_add(k, &k_new, slots, n, hd);
                be.scatter_rows_add(v, &v_new, slots, n, hd);
                (k, v)
            }
            CachedKv::Read { k, v } => (k, v),
        };
        let mut out = be.zeros(n * hd); // (B, H·D)
        let mut lse = be.zeros(n * dims.h);
        be.attention_forward(&mut out, &mut lse, &q, k, v, mask, bias, 1.0, dims);
        let mut y = be.zeros(n * c); // (B, C)
        w.o.forward(be, &mut y, &out, LinearDims::new(n, hd, c));
        be.add_assign(&mut y, &x);
        y
    }

    /// Greedy generation: the encoder once over `inputs_embeds (B, T, C)` with
    /// `attention_mask (B, T)`, then the decoder one token at a time from
    /// `decoder_start_token_id`. Self-attention keys and values are cached per layer, and the
    /// cross-attention keys and values of the encoder output are computed once.
    pub fn generate(
        &self,
        be: &B,
        inputs_embeds: &B::Tensor,
        attention_mask: &[i32],
        batch: usize,
        len: usize,
        gen: &GenerateConfig,
    ) -> Result<Generated> {
        let (b, t, cap) = (batch, len, gen.max_new_tokens); // cap: S, the cache capacity
        let (c, v, hd) = (self.cfg.d_model, self.cfg.vocab_size, self.cfg.inner_dim());
        check_generate_inputs(be.len(inputs_embeds), attention_mask, (b, t, c), gen)?;
        let w = &self.weights;
        let enc_mask = be.upload_index(attention_mask);
        let (_, _, enc_out) = self.encoder_forward(be, inputs_embeds, &enc_mask, b, t);
        // Cross-attention keys and values (B, T, H·D) per layer, from the encoder output.
        let cross_kv: Vec<(B::Tensor, B::Tensor)> = w
            .decoder
            .iter()
            .map(|layer| {
                let mut k = be.zeros(b * t * hd);
                let mut v = be.zeros(b * t * hd);
                layer
                    .cross_attn
                    .k
                    .forward(be, &mut k, &enc_out, LinearDims::new(b * t, c, hd));
                layer
                    .cross_attn
                    .v
                    .forward(be, &mut v, &enc_out, LinearDims::new(b * t, c, hd));
                (k, v)
            })
            .collect();
        // Self-attention caches (B, S, H·D) per layer.
        let mut self_kv: Vec<(B::Tensor, B::Tensor)> = w
            .decoder
            .iter()
            .map(|_| (be.zeros(b * cap * hd), be.zeros(b * cap * hd)))
            .collect();
        let cross = AttnMask {
            key_mask: &enc_mask,
            causal: false,
        };
        let mut key_mask = vec![0i32; b * cap]; // (B, S) the filled cache slots
        let mut greedy = Greedy::new(gen, b);
        let mut ids = vec![self.cfg.decoder_start_token_id as i32; b];
        for step in 0..cap {
            for r in 0..b {
                key_mask[r * cap + step] = 1;
            }
            let mask_idx = be.upload_index(&key_mask);
            let self_mask = AttnMask {
                key_mask: &mask_idx,
                causal: false,
            };
            // One query at absolute position `step`: the bias sees key − step.
            let bias = RelBias {
                q_offset: step,
                ..self.rel_bias(&w.decoder_rel_bias, false)
            };
            let slots =
                be.upload_index(&(0..b).map(|r| (r * cap + step) as i32).collect::<Vec<_>>());
            let mut x = be.zeros(b * c); // (B, C)
            be.gather_rows(&mut x, &w.shared, &be.upload_index(&ids), b, c);
            for (l, layer) in w.decoder.iter().enumerate() {
                let (k, v) = &mut self_kv[l];
                x = self.cached_attention(
                    be,
                    x,
                    &layer.ln_self,
                    &layer.self_attn,
                    CachedKv::Write {
                        k,
                        v,
                        slots: &slots,
                    },
                    self_mask,
                    Some(bias),
                    self.attn_dims(b, 1, cap),
                );
                let (k, v) = &cross_kv[l];
                x = self.cached_attention(
                    be,
                    x,
                    &layer.ln_cross,
                    &layer.cross_attn,
                    CachedKv::Read { k, v },
                    cross,
                    None,
                    self.attn_dims(b, 1, t),
                );
                x = self
                    .ffn_sublayer_forward(be, x, &layer.ln_ff, &layer.ff, b)
                    .0;
            }
            let mut h = be.zeros(b * c); // (B, C)
            let mut rstd = be.zeros(b);
            be.rmsnorm_forward(
                &mut h,
                &mut rstd,
                &x,
                &w.decoder_final_ln,
                self.eps(),
                RmsNormDims { n: b, c },
            );
            let head = self.lm_head();
            let mut logits = be.zeros(b * v); // (B, V)
            let gemm = crate::backend::Gemm::nt(b, v, c).alpha(head.scale);
            be.matmul(&mut logits, &h, head.weight, gemm);
            match greedy.step(&be.download_f32(&logits), v) {
                Some(next) => ids = next,
                None => break,
            }
        }
        Ok(greedy.finish())
    }

    /// d loss / d inputs_embeds `(B, T, C)`, back through lm_head, decoder and encoder.
    pub fn backward_dinp(&self, be: &B, saved: &T5Saved<B>) -> B::Tensor {
        let (b, t, td) = (saved.batch, saved.enc_len, saved.dec_len);
        let (c, v) = (self.cfg.d_model, self.cfg.vocab_size);
        let w = &self.weights;
        // lm_head and the final decoder norm.
        let d_dec_out = label_rows_loss_backward(be, &saved.loss, self.lm_head(), b * td, (c, v));
        let mut dx = be.zeros(b * td * c); // (B, Td, C) residual-stream gradient
        let fin = &saved.dec_final;
        be.rmsnorm_backward_dinp(
            &mut dx,
            &d_dec_out,
            &fin.inp,
            &w.decoder_final_ln,
            &fin.rstd,
            RmsNormDims { n: b * td, c },
        );

        // Decoder, last layer first; cross-attention accumulates into d_enc_out.
        let dec_self = AttnMask {
            key_mask: &saved.dec_mask,
            causal: true,
        };
        let cross = AttnMask {
            key_mask: &saved.enc_mask,
            causal: false,
        };
        let dec_bias = self.rel_bias(&w.decoder_rel_bias, false);
        let (self_dims, cross_dims) = (self.attn_dims(b, td, td), self.attn_dims(b, td, t));
        let mut d_enc_out = be.zeros(b * t * c); // (B, T, C)
        for (l, (layer, s)) in w.decoder.iter().zip(&saved.decoder).enumerate().rev() {
            let _range = nvtx_range(&format!("decoder layer {l} backward"));
            self.ffn_sublayer_backward(be, &mut dx, &s.ff, &layer.ln_ff, &layer.ff, b * td);
            self.attention_sublayer_backward(
                be,
                &mut dx,
                Some(&mut d_enc_out),
                &s.cross_attn,
                &layer.ln_cross,
                &layer.cross_attn,
                cross,
                None,
                cross_dims,
            );
            self.attention_sublayer_backward(
                be,
                &mut dx,
                None,
                &s.self_attn,
                &layer.ln_self,
                &layer.self_attn,
                dec_self,
                Some(dec_bias),
                self_dims,
            );
        }
        // dx now holds d (decoder input embeddings): frozen, dropped.

        // Final encoder norm, then the encoder, last layer first.
        let mut dx = be.zeros(b * t * c); // (B, T, C)
        let fin = &saved.enc_final;
        be.rmsnorm_backward_dinp(
            &mut dx,
            &d_enc_out,
            &fin.inp,
            &w.encoder_final_ln,
            &fin.rstd,
            RmsNormDims { n: b * t, c },
        );
        let enc_self = AttnMask {
            key_mask: &saved.enc_mask,
            causal: false,
        };
        let enc_bias = self.rel_bias(&w.encoder_rel_bias, true);
        let enc_dims = self.attn_dims(b, t, t);
        for (l, (layer, s)) in w.encoder.iter().zip(&saved.encoder).enumerate().rev() {
            let _range = nvtx_range(&format!("encoder layer {l} backward"));
            self.ffn_sublayer_backward(be, &mut dx, &s.ff, &layer.ln_ff, &layer.ff, b * t);
            self.attention_sublayer_backward(
                be,
                &mut dx,
                None,
                &s.attn,
                &layer.ln_attn,
                &layer.attn,
                enc_self,
                Some(enc_bias),
                enc_dims,
            );
        }
        dx
    }
}

/// T5 through the family interface (see family.rs).
impl<B: Backend> Family<B> for T5<B> {
    fn architecture(&self) -> Architecture {
        Architecture::T5
    }

    fn describe(&self) -> String {
        let cfg = &self.cfg;
        format!(
            "T5, d_model {}, {}+{} layers, {} heads × {}, d_ff {}, vocab {}, {:.2} M parameters",
            cfg.d_model,
            cfg.num_layers,
            cfg.num_decoder_layers,
            cfg.num_heads,
            cfg.d_kv,
            cfg.d_ff,
            cfg.vocab_size,
            million_params(&t5_tensor_specs(cfg))
        )
    }

    fn tensor_specs(&self) -> Vec<(String, Vec<usize>)> {
        t5_tensor_specs(&self.cfg)
    }

    fn embeddings(&self) -> &B::Tensor {
        &self.weights.shared
    }

    fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }

    fn width(&self) -> usize {
        self.cfg.d_model
    }

    fn special_ids(&self) -> SpecialIds {
        SpecialIds {
            pad: self.cfg.pad_token_id as i32,
            eos: self.cfg.eos_token_id as i32,
            bos: None,
            decoder_start: Some(self.cfg.decoder_start_token_id as i32),
        }
    }

    fn is_decoder_only(&self) -> bool {
        false
    }

    fn max_positions(&self) -> Option<usize> {
        None // relative positions have no limit
    }

    fn batch_spec(&self) -> BatchSpec {
        BatchSpec::from(&self.cfg)
    }

    fn random_batch(&self, input_lens: &[usize], target_lens: &[usize], seed: u64) -> HostBatch {
        HostBatch::random(&self.cfg, input_lens, target_lens, seed)
    }

    /// Label rows are decoder positions.
    fn label_grid_width(&self, host: &HostBatch, _prompt_rows: usize) -> usize {
        host.dec_len
    }

    /// Every decoder position with a label.
    fn label_count(&self, host: &HostBatch, _prompt_rows: usize) -> usize {
        host.labels.iter().filter(|&&l| l != -100).count()
    }

    fn forward_batch<'a>(
        &'a self,
        be: &B,
        batch: &StepBatch<'_, B>,
    ) -> Result<(ModelOutput<B>, Box<dyn Activations<B> + 'a>)> {
        let host = batch.host;
        let t5_batch = T5Batch::<B> {
            inputs_embeds: batch.inputs_embeds,
            attention_mask: batch.attention_mask,
            decoder_input_ids: &host.decoder_input_ids,
            labels: &host.labels,
            batch: host.batch,
            enc_len: batch.prompt_rows + host.enc_len,
            dec_len: host.dec_len,
            loss_tokens: batch.loss_tokens,
        };
        let (out, saved) = self.forward(be, &t5_batch)?;
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
        T5::generate(self, be, inputs_embeds, attention_mask, batch, len, gen)
    }

    fn train_step_flops(&self, x: StepTokens) -> f64 {
        t5_flops(&self.cfg, x)
    }
}

impl<B: Backend> Activations<B> for Saved<'_, T5<B>, T5Saved<B>> {
    fn backward_dinp(&self, be: &B) -> B::Tensor {
        self.model.backward_dinp(be, &self.saved)
    }

    fn encoder_out(&self) -> Option<&B::Tensor> {
        Some(self.saved.encoder_out())
    }
}
