//! The ops that models and prompt methods are written in, and nothing more.
//!
//! A [`Backend`] owns its buffers: `Tensor` holds floats of the backend's storage type (f32 or f64
//! on the CPU; bf16 or f32 on a GPU), `Index` holds i32 (token ids, masks, row indices). Tensors
//! are flat, contiguous and row-major; every op takes its dimensions explicitly, outputs first,
//! then inputs, then dimensions, with the shape of each buffer in a comment. An op with several
//! dimensions takes them in one struct named after it (`Gemm`, `AttnDims`, `EmbedPromptDims`,
//! ...; see `dims.rs`), whose shape check each backend calls before it touches a buffer.
//!
//! Gradient conventions (see docs/architecture.md): `*_backward_dinp` ops compute only the
//! gradient of their input, never of weights. They write (`=`) their output gradient, except
//! [`Backend::rmsnorm_backward_dinp`] and [`Backend::scatter_rows_add`], which add (`+=`) because
//! their input is the residual stream, whose gradient collects contributions from several places.
//! Ops that produce gradients of prompt-method parameters (`*_backward_dweight`, `bias_backward`,
//! `layernorm_backward`'s dweight/dbias, `lamp_pool_backward`) add (`+=`), so that gradients
//! accumulate over micro-batches.

pub mod collective;
pub mod cpu;
mod dims;
pub mod gpu;
pub mod nf4;
pub mod profiling;

pub use dims::{
    check_add_assign, check_add_bias, check_bias_backward, check_gated_act_backward_dinp,
    check_gated_act_forward, check_gather_rows, check_nf4_dequantize, check_scatter_rows_add,
    check_softmax_rows_backward_dinp, check_softmax_rows_forward, AttnDims, CrossEntropyDims,
    EmbedPromptDims, FusionAttentionDims, GatedExpertsDims, Gemm, LampPoolDims, LayerNormDims,
    LinearDims, RmsNormDims, RopeDims,
};

use nf4::Nf4Tensor;

// Scalar parameters (alpha, eps, scale, dloss) are f64 so that the f64 CPU backend computes
// exactly what an f64 reference does; f32 backends round them once.

/// How scores are masked and biased before the softmax.
pub struct AttnMask<'a, I> {
    /// `(B, S)`: 1 for keys that may be attended to, 0 for padding.
    pub key_mask: &'a I,
    /// Query `i` sees only keys `j ≤ i` (decoder self-attention).
    pub causal: bool,
}

/// The T5 relative-position bias, computed from bucket ids inside the op: no `(B, H, T, S)` tensor.
pub struct RelBias<'a, X> {
    /// `(num_buckets, H)`: the learned bias of each bucket and head.
    pub table: &'a X,
    /// Encoder: both directions; decoder self-attention: keys before the query only.
    pub bidirectional: bool,
    pub num_buckets: usize,
    pub max_distance: usize,
    /// Absolute position of query 0: 0 for a whole sequence; the number of positions already
    /// decoded when one new query attends to a KV cache. The bias uses `key − (query + q_offset)`.
    pub q_offset: usize,
}

// Manual impls: a derive would require `I: Copy` / `X: Copy`, but only references are copied.
impl<I> Clone for AttnMask<'_, I> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<I> Copy for AttnMask<'_, I> {}
impl<X> Clone for RelBias<'_, X> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<X> Copy for RelBias<'_, X> {}

/// The activation of a (gated) feed-forward block: `act(a) · gate`, or `act(a)` without a gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Relu,
    /// HF's `gelu_new`: `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`.
    GeluTanh,
    /// `x·sigmoid(x)` (Llama's SwiGLU).
    Silu,
}

/// Hyperparameters of one AdamW step (decoupled weight decay, as PyTorch's `AdamW`).
#[derive(Debug, Clone, Copy)]
pub struct AdamW {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// 1 for the first step: the bias corrections use it.
    pub step: u64,
    /// Multiplies the gradient first (1 / accumulation steps, times the clipping factor).
    pub grad_scale: f64,
}

/// The two readings of EPT-MS's prompt fusion (see src/prompt/ept.rs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FusionMode {
    /// `P_f = Ps + W·(A·B)`, W softmaxed over the M axis (the default).
    Attend,
    /// The paper's einsum read literally, with the softmax over the prompt axis instead:
    /// `P_f[p] = (1 + Σ_j W'[p, j])·Ps[p]`.
    Paper,
}

/// The bucket of the relative position `key - query`, exactly as Hugging Face's
/// `T5Attention._relative_position_bucket` computes it. The logarithmic part runs in f32 as in
/// PyTorch: bucket boundaries depend on f32 rounding, and every backend must agree on them.
pub fn relative_position_bucket(
    relative_position: i64,
    bidirectional: bool,
    num_buckets: usize,
    max_distance: usize,
) -> usize {
    let mut num_buckets = num_buckets as i64;
    let mut bucket = 0i64;
    let distance = if bidirectional {
        num_buckets /= 2;
        if relative_position > 0 {
            bucket += num_buckets;
        }
        relative_position.abs()
    } else {
        // Only keys at or before the query get their own buckets; later keys share bucket 0.
        (-relative_position).max(0)
    };
    let max_exact = num_buckets / 2;
    if distance < max_exact {
        bucket += distance;
    } else {
        let ratio = (distance as f32 / max_exact as f32).ln();
        let span = ((max_distance as f64) / (max_exact as f64)).ln() as f32;
        let large = max_exact + (ratio / span * (num_buckets - max_exact) as f32) as i64;
        bucket += large.min(num_buckets - 1);
    }
    bucket as usize
}

/// The ops of the engine. See the module docs for the conventions.
pub trait Backend: Sync {
    /// A flat buffer of the backend's float type.
    type Tensor: Send + Sync;
    /// A flat buffer of i32.
    type Index: Send + Sync;
    /// A frozen weight quantised to NF4 with double-quantised absmax (see `backend::nf4`).
    type Nf4: Send + Sync;
    /// Optimiser state (AdamW's moments and the parameters' master copy): f32 on a GPU whatever
    /// the storage dtype, so updates far below bf16's resolution (lr 1e-4 on the low-rank
    /// factors) still accumulate; the CPU's own precision on the CPU.
    type State: Send + Sync;

    /// A short name for logs: "cpu-f32", "cpu-f64", ...
    fn name(&self) -> String;

    /// Bytes of one stored element (weights, activations): what the memory estimate
    /// (model/memory.rs) sizes tensors with.
    fn elem_bytes(&self) -> usize {
        4
    }

    /// Free memory of the device the tensors live on, in bytes; `None` when they live in host
    /// memory (the CPU, the virtual GPU), which the memory check reads from the OS instead.
    fn device_free_bytes(&self) -> Option<u64> {
        None
    }

    // ---- buffers --------------------------------------------------------------------------

    fn zeros(&self, len: usize) -> Self::Tensor;
    /// Takes ownership of host data (no copy where the backend stores f32 on the host).
    fn upload_f32(&self, data: Vec<f32>) -> Self::Tensor;
    fn upload_f64(&self, data: &[f64]) -> Self::Tensor;
    fn download_f32(&self, x: &Self::Tensor) -> Vec<f32>;
    fn download_f64(&self, x: &Self::Tensor) -> Vec<f64>;
    fn copy(&self, x: &Self::Tensor) -> Self::Tensor;
    fn upload_index(&self, data: &[i32]) -> Self::Index;
    /// Takes an NF4 tensor quantised on the host (`backend::nf4::quantize_nf4`).
    fn upload_nf4(&self, q: Nf4Tensor) -> Self::Nf4;
    /// Number of elements of an NF4 tensor.
    fn nf4_len(&self, q: &Self::Nf4) -> usize;
    /// Bytes an NF4 tensor occupies (codes, absmax codes, scales, offset).
    fn nf4_bytes(&self, q: &Self::Nf4) -> usize;
    fn len(&self, x: &Self::Tensor) -> usize;

    // ---- elementwise ----------------------------------------------------------------------

    fn fill_zero(&self, x: &mut Self::Tensor);
    /// `dst += src`, same length.
    fn add_assign(&self, dst: &mut Self::Tensor, src: &Self::Tensor);

    // ---- quantised weights ----------------------------------------------------------------

    /// `out (N) =` the dequantised values of `q` (N elements): `NF4[code]·absmax[block]`.
    fn nf4_dequantize(&self, out: &mut Self::Tensor, q: &Self::Nf4);

    // ---- GEMM -----------------------------------------------------------------------------

    /// `out = alpha · op(a) · op(b)`, or `out += ...` with `g.accumulate`. See [`Gemm`].
    fn matmul(&self, out: &mut Self::Tensor, a: &Self::Tensor, b: &Self::Tensor, g: Gemm);

    /// A linear layer with a PyTorch weight: `out (N, OC) = inp (N, IC) · wᵀ`, `w (OC, IC)`.
    fn linear_forward(
        &self,
        out: &mut Self::Tensor,
        inp: &Self::Tensor,
        w: &Self::Tensor,
        dims: LinearDims,
    ) {
        let LinearDims { n, ic, oc } = dims;
        self.matmul(out, inp, w, Gemm::nt(n, oc, ic));
    }

    /// Input gradient of [`Backend::linear_forward`]: `dinp (N, IC) (=, or += with accumulate)
    /// = dout (N, OC) · w`, `w (OC, IC)`.
    fn linear_backward_dinp(
        &self,
        dinp: &mut Self::Tensor,
        dout: &Self::Tensor,
        w: &Self::Tensor,
        accumulate: bool,
        dims: LinearDims,
    ) {
        let LinearDims { n, ic, oc } = dims;
        self.matmul(dinp, dout, w, Gemm::nn(n, ic, oc).accumulate(accumulate));
    }

    /// Weight gradient of a linear layer, for the prompt methods' own networks (the backbone's
    /// weights are never differentiated): `dw (OC, IC) += dout (N, OC)ᵀ · inp (N, IC)`.
    fn linear_backward_dweight(
        &self,
        dw: &mut Self::Tensor,
        dout: &Self::Tensor,
        inp: &Self::Tensor,
        dims: LinearDims,
    ) {
        let LinearDims { n, ic, oc } = dims;
        let g = Gemm {
            trans_a: true,
            ..Gemm::nn(oc, ic, n)
        };
        self.matmul(dw, dout, inp, g.accumulate(true));
    }

    /// `x (N, F) += bias (F)` on every row. Also broadcasts one row to N rows (on zeroed `x`).
    fn add_bias(&self, x: &mut Self::Tensor, bias: &Self::Tensor, n: usize, f: usize);

    /// `dbias (F) += Σ_rows dout (N, F)`: the bias gradient, and the backward of a broadcast row.
    fn bias_backward(&self, dbias: &mut Self::Tensor, dout: &Self::Tensor, n: usize, f: usize);

    // ---- rows -----------------------------------------------------------------------------

    /// `out[i] = table[rows[i]]`: `out (M, C)`, `table (R, C)`, `rows (M)`. Embedding lookup, and
    /// the selection of the rows that carry a label.
    fn gather_rows(
        &self,
        out: &mut Self::Tensor,
        table: &Self::Tensor,
        rows: &Self::Index,
        m: usize,
        c: usize,
    );

    /// Backward of [`Backend::gather_rows`]: `dtable[rows[i]] += dout[i]`. Rows must be distinct.
    fn scatter_rows_add(
        &self,
        dtable: &mut Self::Tensor,
        dout: &Self::Tensor,
        rows: &Self::Index,
        m: usize,
        c: usize,
    );

    /// The encoder input of a prompt-tuned step, `out (B, P+T, C)`: the P prompt rows first, then
    /// the token embeddings `table[ids[b, t]]`, plus `update[t]` when the method updates the text
    /// embeddings (DePT, EPT; `update (M, C)` with M ≥ T). `ids (B, T)`, `prompt (P, C)`.
    fn embed_prompt_forward(
        &self,
        out: &mut Self::Tensor,
        table: &Self::Tensor,
        ids: &Self::Index,
        prompt: &Self::Tensor,
        update: Option<&Self::Tensor>,
        dims: EmbedPromptDims,
    );

    /// Backward of [`Backend::embed_prompt_forward`] (`=`): `d_prompt (P, C) = Σ_b dout[b, ..P]`
    /// and, when given, `d_update (M, C)`: rows `..T` get `Σ_b dout[b, P + t]`, rows `T..M` zero.
    /// The frozen table gets nothing.
    fn embed_prompt_backward(
        &self,
        d_prompt: &mut Self::Tensor,
        d_update: Option<&mut Self::Tensor>,
        dout: &Self::Tensor,
        dims: EmbedPromptDims,
    );

    // ---- normalisation --------------------------------------------------------------------

    /// RMSNorm (T5LayerNorm, LlamaRMSNorm): `out = weight · inp / sqrt(mean(inp²) + eps)`.
    /// `out (N, C)`, `rstd (N)` saved for the backward, `inp (N, C)`, `weight (C)`.
    fn rmsnorm_forward(
        &self,
        out: &mut Self::Tensor,
        rstd: &mut Self::Tensor,
        inp: &Self::Tensor,
        weight: &Self::Tensor,
        eps: f64,
        dims: RmsNormDims,
    );

    /// `dinp (N, C) +=` the input gradient of RMSNorm (`+=`: `inp` is the residual stream).
    fn rmsnorm_backward_dinp(
        &self,
        dinp: &mut Self::Tensor,
        dout: &Self::Tensor,
        inp: &Self::Tensor,
        weight: &Self::Tensor,
        rstd: &Self::Tensor,
        dims: RmsNormDims,
    );

    /// LayerNorm with mean, `weight` and `bias` (Residual PT's reparameterisation):
    /// `out (N, C)`, `mean (N)` and `rstd (N)` saved, `inp (N, C)`, `weight, bias (C)`.
    #[allow(clippy::too_many_arguments)] // six buffers, each its own role in LayerNorm
    fn layernorm_forward(
        &self,
        out: &mut Self::Tensor,
        mean: &mut Self::Tensor,
        rstd: &mut Self::Tensor,
        inp: &Self::Tensor,
        weight: &Self::Tensor,
        bias: &Self::Tensor,
        eps: f64,
        dims: LayerNormDims,
    );

    /// Backward of [`Backend::layernorm_forward`]: `dinp (N, C) =`, and the parameter gradients
    /// `dweight, dbias (C) +=` (LayerNorm only occurs inside trainable prompt networks).
    #[allow(clippy::too_many_arguments)] // eight buffers, each its own role in LayerNorm
    fn layernorm_backward(
        &self,
        dinp: &mut Self::Tensor,
        dweight: &mut Self::Tensor,
        dbias: &mut Self::Tensor,
        dout: &Self::Tensor,
        inp: &Self::Tensor,
        weight: &Self::Tensor,
        mean: &Self::Tensor,
        rstd: &Self::Tensor,
        dims: LayerNormDims,
    );

    /// Softmax of each row: `out (N, K) = softmax(inp (N, K))` along K.
    fn softmax_rows_forward(&self, out: &mut Self::Tensor, inp: &Self::Tensor, n: usize, k: usize);

    /// `dinp (N, K) = out ⊙ (dout − rowsum(dout ⊙ out))` (`=`).
    fn softmax_rows_backward_dinp(
        &self,
        dinp: &mut Self::Tensor,
        dout: &Self::Tensor,
        out: &Self::Tensor,
        n: usize,
        k: usize,
    );

    // ---- attention ------------------------------------------------------------------------

    /// Scaled dot-product attention with padding mask, optional causal mask and optional T5
    /// relative bias: `out = softmax(scale·q·kᵀ + bias + mask)·v` per head.
    /// `out (B, T, H·D)`, `lse (B, H, T)` the log-sum-exp of each score row, saved for the
    /// backward; `q (B, T, H·D)`, `k, v (B, S, Hkv·D)`.
    #[allow(clippy::too_many_arguments)] // five buffers, mask, bias and scale besides the dims
    fn attention_forward(
        &self,
        out: &mut Self::Tensor,
        lse: &mut Self::Tensor,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        mask: AttnMask<'_, Self::Index>,
        bias: Option<RelBias<'_, Self::Tensor>>,
        scale: f64,
        dims: AttnDims,
    );

    /// Input gradients of [`Backend::attention_forward`] (`=`): `dq (B, T, H·D)`,
    /// `dk, dv (B, S, Hkv·D)`. The bias table is frozen: no gradient.
    #[allow(clippy::too_many_arguments)] // nine buffers, mask, bias and scale besides the dims
    fn attention_backward_dinp(
        &self,
        dq: &mut Self::Tensor,
        dk: &mut Self::Tensor,
        dv: &mut Self::Tensor,
        dout: &Self::Tensor,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        out: &Self::Tensor,
        lse: &Self::Tensor,
        mask: AttnMask<'_, Self::Index>,
        bias: Option<RelBias<'_, Self::Tensor>>,
        scale: f64,
        dims: AttnDims,
    );

    // ---- rotary position embedding ---------------------------------------------------------

    /// Rotary position embedding, Llama's rotate-half layout: for each head and `i < D/2`, with
    /// `c = cos[positions[n], i]`, `s = sin[positions[n], i]`,
    /// `out[i] = inp[i]·c − inp[i + D/2]·s`, `out[i + D/2] = inp[i + D/2]·c + inp[i]·s`.
    /// `out, inp (N, H·D)`, `positions (N)` rows of the tables, `cos, sin (P, D/2)` built on the
    /// host (see `model::llama::RopeTables`), so RoPE scaling never reaches a kernel.
    fn rope_forward(
        &self,
        out: &mut Self::Tensor,
        inp: &Self::Tensor,
        positions: &Self::Index,
        cos: &Self::Tensor,
        sin: &Self::Tensor,
        dims: RopeDims,
    );

    /// Input gradient of [`Backend::rope_forward`] (`=`): the rotation is orthogonal, so
    /// `dinp` is `dout` rotated by the opposite angle. Shapes as the forward.
    fn rope_backward_dinp(
        &self,
        dinp: &mut Self::Tensor,
        dout: &Self::Tensor,
        positions: &Self::Index,
        cos: &Self::Tensor,
        sin: &Self::Tensor,
        dims: RopeDims,
    );

    // ---- feed-forward ---------------------------------------------------------------------

    /// `out = act(a) · gate` elementwise, or `act(a)` without a gate. All `(N, F)`, `len = N·F`.
    fn gated_act_forward(
        &self,
        out: &mut Self::Tensor,
        a: &Self::Tensor,
        gate: Option<&Self::Tensor>,
        act: Activation,
        len: usize,
    );

    /// Input gradients of [`Backend::gated_act_forward`] (`=`): `da`, and `dgate` when gated.
    #[allow(clippy::too_many_arguments)] // five buffers and the activation; one length, no dims
    fn gated_act_backward_dinp(
        &self,
        da: &mut Self::Tensor,
        dgate: Option<&mut Self::Tensor>,
        dout: &Self::Tensor,
        a: &Self::Tensor,
        gate: Option<&Self::Tensor>,
        act: Activation,
        len: usize,
    );

    // ---- prompt-method ops ----------------------------------------------------------------

    /// EPT-MS prompt fusion (see src/prompt/ept.rs): with `W = softmax(ps·lrᵀ / √C)` (S, M)
    /// over the M axis, `Attend`: `out = ps + W·lr`; with `W' = softmax` of the same scores over
    /// the S axis, `Paper`: `out[p] = (1 + Σ_j W'[p, j])·ps[p]`. `out, ps (S, C)`, `lr (M, C)`.
    /// `probs (S, M)` saves W (Attend) or W' (Paper) for the backward.
    fn fusion_attention_forward(
        &self,
        out: &mut Self::Tensor,
        probs: &mut Self::Tensor,
        ps: &Self::Tensor,
        lr: &Self::Tensor,
        mode: FusionMode,
        dims: FusionAttentionDims,
    );

    /// Backward of [`Backend::fusion_attention_forward`] (`=`): `d_ps (S, C)`, `d_lr (M, C)`.
    #[allow(clippy::too_many_arguments)] // six buffers and the mode besides the dims
    fn fusion_attention_backward(
        &self,
        d_ps: &mut Self::Tensor,
        d_lr: &mut Self::Tensor,
        dout: &Self::Tensor,
        ps: &Self::Tensor,
        lr: &Self::Tensor,
        probs: &Self::Tensor,
        mode: FusionMode,
        dims: FusionAttentionDims,
    );

    /// The gated sum of EPT-MS's experts: `out (N, C) = Σ_i gate[:, i] ⊙ experts[i]`,
    /// `gate (N, E)` (already softmaxed), `experts`: E tensors `(N, C)`.
    fn gated_experts_forward(
        &self,
        out: &mut Self::Tensor,
        gate: &Self::Tensor,
        experts: &[&Self::Tensor],
        dims: GatedExpertsDims,
    );

    /// Backward of [`Backend::gated_experts_forward`] (`=`): `d_gate (N, E)`, and each
    /// `d_experts[i] (N, C) = gate[:, i] ⊙ dout`.
    fn gated_experts_backward(
        &self,
        d_gate: &mut Self::Tensor,
        d_experts: &mut [Self::Tensor],
        dout: &Self::Tensor,
        gate: &Self::Tensor,
        experts: &[&Self::Tensor],
        dims: GatedExpertsDims,
    );

    /// LAMP's pooled compressed outer product `out (L/p, C) = pool_p(u)·diag(q²)·vᵀ`, where
    /// `pool_p` averages blocks of `p` consecutive rows: `u (L, R)`, `q (R)`, `v (C, R)`.
    /// Pooling U first gives the same rows as pooling `u·diag(q²)·vᵀ`, with L/p × R work.
    fn lamp_pool_forward(
        &self,
        out: &mut Self::Tensor,
        u: &Self::Tensor,
        q: &Self::Tensor,
        v: &Self::Tensor,
        dims: LampPoolDims,
    );

    /// Backward of [`Backend::lamp_pool_forward`] into the parameters (`+=`): `du (L, R)`,
    /// `dq (R)`, `dv (C, R)`.
    #[allow(clippy::too_many_arguments)] // seven buffers (three gradients) besides the dims
    fn lamp_pool_backward(
        &self,
        du: &mut Self::Tensor,
        dq: &mut Self::Tensor,
        dv: &mut Self::Tensor,
        dout: &Self::Tensor,
        u: &Self::Tensor,
        q: &Self::Tensor,
        v: &Self::Tensor,
        dims: LampPoolDims,
    );

    // ---- optimiser ------------------------------------------------------------------------

    /// `Σ x²` in f64 (for the global gradient norm).
    fn sum_squares(&self, x: &Self::Tensor) -> f64;

    /// Optimiser state holding `data`.
    fn state_upload(&self, data: &[f64]) -> Self::State;

    fn state_download(&self, x: &Self::State) -> Vec<f64>;

    /// One AdamW step on one parameter, in place: with `g = grad_scale·grad`,
    /// `m = β1·m + (1−β1)·g`, `v = β2·v + (1−β2)·g²`,
    /// `master −= lr·(m/(1−β1^t) / (√(v/(1−β2^t)) + eps) + weight_decay·master)`, then
    /// `param = master` rounded to the storage dtype. `master`, `m`, `v` have param's length.
    fn adamw_step(
        &self,
        param: &mut Self::Tensor,
        master: &mut Self::State,
        m: &mut Self::State,
        v: &mut Self::State,
        grad: &Self::Tensor,
        h: AdamW,
    );

    // ---- loss -----------------------------------------------------------------------------

    /// Cross-entropy of label rows only. `losses (M)` gets `-log softmax(logits[i])[targets[i]]`,
    /// `dlogits (M, V) = dloss · (softmax(logits[i]) - onehot(targets[i]))`. `logits (M, V)`,
    /// `targets (M)` all valid (rows without a label are never computed).
    fn cross_entropy_forward_backward(
        &self,
        losses: &mut Self::Tensor,
        dlogits: &mut Self::Tensor,
        logits: &Self::Tensor,
        targets: &Self::Index,
        dloss: f64,
        dims: CrossEntropyDims,
    );
}

#[cfg(test)]
mod tests {
    use super::relative_position_bucket;

    #[test]
    fn relative_position_bucket_matches_hf_small_table() {
        // Hand-computed with HF's formula for num_buckets = 32, max_distance = 128:
        // bidirectional → 16 buckets per side, max_exact 8; log buckets from distance 8 on.
        let b = |r| relative_position_bucket(r, true, 32, 128);
        assert_eq!(b(0), 0);
        assert_eq!(b(-1), 1);
        assert_eq!(b(1), 17);
        assert_eq!(b(-7), 7);
        assert_eq!(b(7), 23);
        // distance 8: 8 + floor(ln(1)/ln(16)·8) = 8
        assert_eq!(b(-8), 8);
        // distance 12: 8 + floor(ln(1.5)/ln(16)·8) = 8 + floor(1.1699) = 9
        assert_eq!(b(-12), 9);
        // distance 100: 8 + floor(ln(12.5)/ln(16)·8) = 8 + floor(7.2877) = 15
        assert_eq!(b(-100), 15);
        // far away saturates at the last bucket of the side
        assert_eq!(b(-1000), 15);
        assert_eq!(b(1000), 31);
        // unidirectional (decoder): later keys share bucket 0, 32 buckets, max_exact 16
        let u = |r| relative_position_bucket(r, false, 32, 128);
        assert_eq!(u(5), 0);
        assert_eq!(u(-5), 5);
        assert_eq!(u(-15), 15);
        // distance 16: 16 + floor(ln(1)/ln(8)·16) = 16
        assert_eq!(u(-16), 16);
        // distance 64: 16 + floor(ln(4)/ln(8)·16) = 16 + floor(10.667) = 26
        assert_eq!(u(-64), 26);
        assert_eq!(u(-500), 31);
    }
}
