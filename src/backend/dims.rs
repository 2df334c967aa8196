//! The dimensions of the ops, one struct per op (shared by its forward and backward), and the one
//! shape check of each op that every backend calls before it touches a buffer.
//!
//! Shapes are internal invariants: the model and method code computes them, never user input.
//! A mismatch is a bug, so a check panics, naming the op, the buffer and the shape it should
//! have, before a kernel could read past a buffer on a device. The checks take buffer lengths,
//! so each backend measures its own buffers and all share the same rules and messages.

use super::AdamW;

/// Panics unless buffer `name` of `op` holds `want` elements; `shape` as in the op's docs.
#[track_caller]
fn check_len(op: &str, name: &str, len: usize, shape: &str, want: usize) {
    assert!(
        len == want,
        "{op}: {name} has {len} elements, not {shape} = {want}"
    );
}

/// The rows of buffer `name` of `op` when it is `(rows, C)`; panics if `len` is not a multiple
/// of `c` (an empty row width counts as 1, so `c = 0` never divides by zero).
#[track_caller]
fn rows_of(op: &str, name: &str, len: usize, shape: &str, c: usize) -> usize {
    assert!(
        len.is_multiple_of(c.max(1)),
        "{op}: {name} has {len} elements, not {shape} with C = {c}"
    );
    len / c.max(1)
}

// ---- GEMM and linear layers ----------------------------------------------------------------

/// Dimensions of a GEMM `out (M, N) = alpha · op(a) · op(b) [+ out]`.
///
/// `op(a)` is `a (M, K)`, or `aᵀ` with `a` stored as `(K, M)` when `trans_a`; likewise `op(b)` is
/// `b (K, N)`, or `bᵀ` with `b` stored as `(N, K)` when `trans_b`.
#[derive(Debug, Clone, Copy)]
pub struct Gemm {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub trans_a: bool,
    pub trans_b: bool,
    pub alpha: f64,
    /// Add to `out` instead of overwriting it.
    pub accumulate: bool,
}

impl Gemm {
    /// `out (M, N) = a (M, K) · b (K, N)`.
    pub fn nn(m: usize, n: usize, k: usize) -> Self {
        Gemm {
            m,
            n,
            k,
            trans_a: false,
            trans_b: false,
            alpha: 1.0,
            accumulate: false,
        }
    }

    /// `out (M, N) = a (M, K) · bᵀ` with `b (N, K)`: a linear layer with a PyTorch weight.
    pub fn nt(m: usize, n: usize, k: usize) -> Self {
        Gemm {
            trans_b: true,
            ..Gemm::nn(m, n, k)
        }
    }

    pub fn alpha(self, alpha: f64) -> Self {
        Gemm { alpha, ..self }
    }

    pub fn accumulate(self, accumulate: bool) -> Self {
        Gemm { accumulate, ..self }
    }

    /// The shapes of [`Backend::matmul`](super::Backend::matmul): `out` M·N, `a` M·K, `b` K·N
    /// elements (transposed or not).
    #[track_caller]
    pub fn check(&self, out: usize, a: usize, b: usize) {
        let Gemm { m, n, k, .. } = *self;
        check_len("matmul", "out", out, "M·N", m * n);
        check_len("matmul", "a", a, "M·K", m * k);
        check_len("matmul", "b", b, "K·N", k * n);
    }
}

/// Dimensions of a linear layer with a PyTorch weight `w (OC, IC)`:
/// [`Backend::linear_forward`](super::Backend::linear_forward) and its two backwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinearDims {
    /// Rows: `inp (N, IC)`, `out (N, OC)`.
    pub n: usize,
    /// Input features.
    pub ic: usize,
    /// Output features.
    pub oc: usize,
}

impl LinearDims {
    pub fn new(n: usize, ic: usize, oc: usize) -> Self {
        LinearDims { n, ic, oc }
    }
}

// ---- elementwise, rows, softmax --------------------------------------------------------------

/// The shapes of [`Backend::nf4_dequantize`](super::Backend::nf4_dequantize): `out (N)` for an
/// NF4 tensor of N elements.
#[track_caller]
pub fn check_nf4_dequantize(out: usize, n: usize) {
    check_len("nf4_dequantize", "out", out, "the NF4 tensor's (N)", n);
}

/// The shapes of [`Backend::add_assign`](super::Backend::add_assign): `src` as long as `dst`.
#[track_caller]
pub fn check_add_assign(dst: usize, src: usize) {
    check_len("add_assign", "src", src, "dst's (N)", dst);
}

/// The shapes of [`Backend::add_bias`](super::Backend::add_bias): `x (N, F)`, `bias (F)`.
#[track_caller]
pub fn check_add_bias(x: usize, bias: usize, n: usize, f: usize) {
    check_len("add_bias", "x", x, "(N, F)", n * f);
    check_len("add_bias", "bias", bias, "(F)", f);
}

/// The shapes of [`Backend::bias_backward`](super::Backend::bias_backward): `dbias (F)`,
/// `dout (N, F)`.
#[track_caller]
pub fn check_bias_backward(dbias: usize, dout: usize, n: usize, f: usize) {
    check_len("bias_backward", "dbias", dbias, "(F)", f);
    check_len("bias_backward", "dout", dout, "(N, F)", n * f);
}

/// The shapes of [`Backend::gather_rows`](super::Backend::gather_rows): `out (M, C)`,
/// `table (R, C)`, `rows (M)`. Returns R.
#[track_caller]
pub fn check_gather_rows(out: usize, table: usize, rows: usize, m: usize, c: usize) -> usize {
    check_len("gather_rows", "out", out, "(M, C)", m * c);
    check_len("gather_rows", "rows", rows, "(M)", m);
    rows_of("gather_rows", "table", table, "(R, C)", c)
}

/// The shapes of [`Backend::scatter_rows_add`](super::Backend::scatter_rows_add):
/// `dtable (R, C)`, `dout (M, C)`, `rows (M)`. Returns R.
#[track_caller]
pub fn check_scatter_rows_add(
    dtable: usize,
    dout: usize,
    rows: usize,
    m: usize,
    c: usize,
) -> usize {
    check_len("scatter_rows_add", "dout", dout, "(M, C)", m * c);
    check_len("scatter_rows_add", "rows", rows, "(M)", m);
    rows_of("scatter_rows_add", "dtable", dtable, "(R, C)", c)
}

/// The shapes of [`Backend::softmax_rows_forward`](super::Backend::softmax_rows_forward):
/// `out, inp (N, K)`.
#[track_caller]
pub fn check_softmax_rows_forward(out: usize, inp: usize, n: usize, k: usize) {
    let op = "softmax_rows_forward";
    check_len(op, "out", out, "(N, K)", n * k);
    check_len(op, "inp", inp, "(N, K)", n * k);
}

/// The shapes of
/// [`Backend::softmax_rows_backward_dinp`](super::Backend::softmax_rows_backward_dinp):
/// `dinp, dout, out (N, K)`.
#[track_caller]
pub fn check_softmax_rows_backward_dinp(dinp: usize, dout: usize, out: usize, n: usize, k: usize) {
    let op = "softmax_rows_backward_dinp";
    check_len(op, "dinp", dinp, "(N, K)", n * k);
    check_len(op, "dout", dout, "(N, K)", n * k);
    check_len(op, "out", out, "(N, K)", n * k);
}

// ---- prompt rows -----------------------------------------------------------------------------

/// Dimensions of [`Backend::embed_prompt_forward`](super::Backend::embed_prompt_forward) and
/// [`Backend::embed_prompt_backward`](super::Backend::embed_prompt_backward).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmbedPromptDims {
    /// Batch entries.
    pub b: usize,
    /// Tokens per entry: `ids (B, T)`.
    pub t: usize,
    /// Prompt rows put before the tokens: `prompt (P, C)`, `out (B, P+T, C)`.
    pub p: usize,
    /// Embedding width.
    pub c: usize,
}

impl EmbedPromptDims {
    /// `update (M, C)` with M ≥ T, for `op`: returns M.
    #[track_caller]
    fn update_rows(&self, op: &str, name: &str, update: usize) -> usize {
        let rows = rows_of(op, name, update, "(M ≥ T, C)", self.c);
        assert!(
            rows >= self.t,
            "{op}: {name} has {rows} rows, fewer than T = {}",
            self.t
        );
        rows
    }

    /// The shapes of the forward: `out (B, P+T, C)`, `table (V, C)`, `ids (B, T)`,
    /// `prompt (P, C)`, `update (M ≥ T, C)`. Returns V.
    #[track_caller]
    pub fn check_forward(
        &self,
        out: usize,
        table: usize,
        ids: usize,
        prompt: usize,
        update: Option<usize>,
    ) -> usize {
        let EmbedPromptDims { b, t, p, c } = *self;
        let op = "embed_prompt_forward";
        check_len(op, "out", out, "(B, P+T, C)", b * (p + t) * c);
        check_len(op, "ids", ids, "(B, T)", b * t);
        check_len(op, "prompt", prompt, "(P, C)", p * c);
        if let Some(update) = update {
            self.update_rows(op, "update", update);
        }
        rows_of(op, "table", table, "(V, C)", c)
    }

    /// The shapes of the backward: `d_prompt (P, C)`, `d_update (M ≥ T, C)`,
    /// `dout (B, P+T, C)`. Returns M (0 without `d_update`).
    #[track_caller]
    pub fn check_backward(&self, d_prompt: usize, d_update: Option<usize>, dout: usize) -> usize {
        let EmbedPromptDims { b, t, p, c } = *self;
        let op = "embed_prompt_backward";
        check_len(op, "d_prompt", d_prompt, "(P, C)", p * c);
        check_len(op, "dout", dout, "(B, P+T, C)", b * (p + t) * c);
        d_update.map_or(0, |d_update| self.update_rows(op, "d_update", d_update))
    }
}

// ---- normalisation ---------------------------------------------------------------------------

/// Dimensions of [`Backend::rmsnorm_forward`](super::Backend::rmsnorm_forward) and
/// [`Backend::rmsnorm_backward_dinp`](super::Backend::rmsnorm_backward_dinp).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RmsNormDims {
    /// Rows, each normalised on its own: `inp (N, C)`, `rstd (N)`.
    pub n: usize,
    /// Row width: `weight (C)`.
    pub c: usize,
}

impl RmsNormDims {
    /// The shapes of the forward: `out, inp (N, C)`, `rstd (N)`, `weight (C)`.
    #[track_caller]
    pub fn check_forward(&self, out: usize, rstd: usize, inp: usize, weight: usize) {
        let RmsNormDims { n, c } = *self;
        let op = "rmsnorm_forward";
        check_len(op, "out", out, "(N, C)", n * c);
        check_len(op, "rstd", rstd, "(N)", n);
        check_len(op, "inp", inp, "(N, C)", n * c);
        check_len(op, "weight", weight, "(C)", c);
    }

    /// The shapes of the backward: `dinp, dout, inp (N, C)`, `weight (C)`, `rstd (N)`.
    #[track_caller]
    pub fn check_backward_dinp(
        &self,
        dinp: usize,
        dout: usize,
        inp: usize,
        weight: usize,
        rstd: usize,
    ) {
        let RmsNormDims { n, c } = *self;
        let op = "rmsnorm_backward_dinp";
        check_len(op, "dinp", dinp, "(N, C)", n * c);
        check_len(op, "dout", dout, "(N, C)", n * c);
        check_len(op, "inp", inp, "(N, C)", n * c);
        check_len(op, "weight", weight, "(C)", c);
        check_len(op, "rstd", rstd, "(N)", n);
    }
}

/// Dimensions of [`Backend::layernorm_forward`](super::Backend::layernorm_forward) and
/// [`Backend::layernorm_backward`](super::Backend::layernorm_backward).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerNormDims {
    /// Rows, each normalised on its own: `inp (N, C)`, `mean, rstd (N)`.
    pub n: usize,
    /// Row width: `weight, bias (C)`.
    pub c: usize,
}

impl LayerNormDims {
    /// The shapes of the forward: `out, inp (N, C)`, `mean, rstd (N)`, `weight, bias (C)`.
    #[track_caller]
    pub fn check_forward(
        &self,
        out: usize,
        mean: usize,
        rstd: usize,
        inp: usize,
        weight: usize,
        bias: usize,
    ) {
        let LayerNormDims { n, c } = *self;
        let op = "layernorm_forward";
        check_len(op, "out", out, "(N, C)", n * c);
        check_len(op, "mean", mean, "(N)", n);
        check_len(op, "rstd", rstd, "(N)", n);
        check_len(op, "inp", inp, "(N, C)", n * c);
        check_len(op, "weight", weight, "(C)", c);
        check_len(op, "bias", bias, "(C)", c);
    }

    /// The shapes of the backward: the gradients `(dinp (N, C), dweight (C), dbias (C))`,
    /// `dout, inp (N, C)`, `weight (C)`, the saved `(mean, rstd)`, each `(N)`.
    #[track_caller]
    pub fn check_backward(
        &self,
        (dinp, dweight, dbias): (usize, usize, usize),
        dout: usize,
        inp: usize,
        weight: usize,
        (mean, rstd): (usize, usize),
    ) {
        let LayerNormDims { n, c } = *self;
        let op = "layernorm_backward";
        check_len(op, "dinp", dinp, "(N, C)", n * c);
        check_len(op, "dweight", dweight, "(C)", c);
        check_len(op, "dbias", dbias, "(C)", c);
        check_len(op, "dout", dout, "(N, C)", n * c);
        check_len(op, "inp", inp, "(N, C)", n * c);
        check_len(op, "weight", weight, "(C)", c);
        check_len(op, "mean", mean, "(N)", n);
        check_len(op, "rstd", rstd, "(N)", n);
    }
}

// ---- attention and RoPE ----------------------------------------------------------------------

/// Dimensions of multi-head attention. Queries are `(B, T, H·D)`, keys and values `(B, S, Hkv·D)`
/// with the heads side by side in a row, exactly as the projections write them (no transposes).
#[derive(Debug, Clone, Copy)]
pub struct AttnDims {
    pub b: usize,
    /// Query positions.
    pub t: usize,
    /// Key positions.
    pub s: usize,
    /// Query heads.
    pub h: usize,
    /// Key/value heads (`h` for T5; fewer for grouped-query attention). Must divide `h`.
    pub h_kv: usize,
    /// Width of one head.
    pub d: usize,
}

impl AttnDims {
    /// What the forward and backward share: `q (B, T, H·D)`, `k, v (B, S, Hkv·D)`,
    /// `key_mask (B, S)`, `lse (B, H, T)`, and Hkv dividing H.
    #[track_caller]
    fn check_inputs(
        &self,
        op: &str,
        (q, k, v): (usize, usize, usize),
        key_mask: usize,
        lse: usize,
    ) {
        let AttnDims {
            b,
            t,
            s,
            h,
            h_kv,
            d,
        } = *self;
        assert!(
            h_kv > 0 && h.is_multiple_of(h_kv),
            "{op}: H = {h} is not a multiple of Hkv = {h_kv}"
        );
        check_len(op, "q", q, "(B, T, H·D)", b * t * h * d);
        check_len(op, "k", k, "(B, S, Hkv·D)", b * s * h_kv * d);
        check_len(op, "v", v, "(B, S, Hkv·D)", b * s * h_kv * d);
        check_len(op, "key_mask", key_mask, "(B, S)", b * s);
        check_len(op, "lse", lse, "(B, H, T)", b * h * t);
    }

    /// The shapes of [`Backend::attention_forward`](super::Backend::attention_forward):
    /// `out, q (B, T, H·D)`, `lse (B, H, T)`, `k, v (B, S, Hkv·D)`, `key_mask (B, S)`.
    #[track_caller]
    pub fn check_forward(
        &self,
        out: usize,
        lse: usize,
        qkv: (usize, usize, usize),
        key_mask: usize,
    ) {
        let AttnDims { b, t, h, d, .. } = *self;
        let op = "attention_forward";
        self.check_inputs(op, qkv, key_mask, lse);
        check_len(op, "out", out, "(B, T, H·D)", b * t * h * d);
    }

    /// The shapes of
    /// [`Backend::attention_backward_dinp`](super::Backend::attention_backward_dinp): the
    /// gradients `(dq, dk, dv)` shaped as `(q, k, v)`, `dout, out` as `q (B, T, H·D)`,
    /// `k, v (B, S, Hkv·D)`, `lse (B, H, T)`, `key_mask (B, S)`.
    #[track_caller]
    pub fn check_backward_dinp(
        &self,
        (dq, dk, dv): (usize, usize, usize),
        dout: usize,
        qkv: (usize, usize, usize),
        (out, lse): (usize, usize),
        key_mask: usize,
    ) {
        let AttnDims {
            b,
            t,
            s,
            h,
            h_kv,
            d,
        } = *self;
        let op = "attention_backward_dinp";
        self.check_inputs(op, qkv, key_mask, lse);
        let (queries, keys) = (b * t * h * d, b * s * h_kv * d);
        check_len(op, "dq", dq, "(B, T, H·D)", queries);
        check_len(op, "dk", dk, "(B, S, Hkv·D)", keys);
        check_len(op, "dv", dv, "(B, S, Hkv·D)", keys);
        check_len(op, "dout", dout, "(B, T, H·D)", queries);
        check_len(op, "out", out, "(B, T, H·D)", queries);
    }

    /// The shape of a relative-bias table, `(num_buckets, H)`.
    #[track_caller]
    pub fn check_bias_table(&self, table: usize, num_buckets: usize) {
        let shape = "(num_buckets, H)";
        check_len(
            "attention",
            "relative bias table",
            table,
            shape,
            num_buckets * self.h,
        );
    }
}

/// Dimensions of [`Backend::rope_forward`](super::Backend::rope_forward) and
/// [`Backend::rope_backward_dinp`](super::Backend::rope_backward_dinp).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RopeDims {
    /// Rows (B·T tokens): `inp (N, H·D)`, `positions (N)`.
    pub n: usize,
    /// Heads in a row.
    pub h: usize,
    /// Width of one head, even: the tables are `(P, D/2)`.
    pub d: usize,
}

impl RopeDims {
    /// The shapes of `op`, the forward or the backward (the same buffers): `out, inp (N, H·D)`,
    /// `positions (N)`, `cos, sin (P, D/2)`. Returns P, the tables' rows.
    #[track_caller]
    pub fn check(
        &self,
        op: &str,
        out: usize,
        inp: usize,
        positions: usize,
        cos: usize,
        sin: usize,
    ) -> usize {
        let RopeDims { n, h, d } = *self;
        assert!(d.is_multiple_of(2), "{op}: head width D = {d} is odd");
        check_len(op, "out", out, "(N, H·D)", n * h * d);
        check_len(op, "inp", inp, "(N, H·D)", n * h * d);
        check_len(op, "positions", positions, "(N)", n);
        let rows = rows_of(op, "cos", cos, "(P, D/2)", d / 2);
        check_len(op, "sin", sin, "cos's (P, D/2)", cos);
        rows
    }
}

// ---- feed-forward ----------------------------------------------------------------------------

/// The shapes of [`Backend::gated_act_forward`](super::Backend::gated_act_forward):
/// `out, a, gate (N, F)`, `len = N·F`.
#[track_caller]
pub fn check_gated_act_forward(out: usize, a: usize, gate: Option<usize>, len: usize) {
    let op = "gated_act_forward";
    check_len(op, "out", out, "N·F", len);
    check_len(op, "a", a, "N·F", len);
    if let Some(gate) = gate {
        check_len(op, "gate", gate, "N·F", len);
    }
}

/// The shapes of [`Backend::gated_act_backward_dinp`](super::Backend::gated_act_backward_dinp):
/// `da, dgate, dout, a, gate (N, F)`, `len = N·F`; `gate` and `dgate` both given or both absent.
#[track_caller]
pub fn check_gated_act_backward_dinp(
    da: usize,
    dgate: Option<usize>,
    dout: usize,
    a: usize,
    gate: Option<usize>,
    len: usize,
) {
    let op = "gated_act_backward_dinp";
    check_len(op, "da", da, "N·F", len);
    check_len(op, "dout", dout, "N·F", len);
    check_len(op, "a", a, "N·F", len);
    match (gate, dgate) {
        (Some(gate), Some(dgate)) => {
            check_len(op, "gate", gate, "N·F", len);
            check_len(op, "dgate", dgate, "N·F", len);
        }
        (None, None) => {}
        _ => panic!("{op}: gate and dgate must both be given or both absent"),
    }
}

// ---- prompt-method ops -----------------------------------------------------------------------

/// Dimensions of EPT-MS's prompt fusion:
/// [`Backend::fusion_attention_forward`](super::Backend::fusion_attention_forward) and
/// [`Backend::fusion_attention_backward`](super::Backend::fusion_attention_backward).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FusionAttentionDims {
    /// Prompt rows: `ps (S, C)`.
    pub s: usize,
    /// Rows of the low-rank update: `lr (M, C)`.
    pub m: usize,
    /// Embedding width.
    pub c: usize,
}

impl FusionAttentionDims {
    /// The shapes of the forward: `out, ps (S, C)`, `probs (S, M)`, `lr (M, C)`.
    #[track_caller]
    pub fn check_forward(&self, out: usize, probs: usize, ps: usize, lr: usize) {
        let FusionAttentionDims { s, m, c } = *self;
        let op = "fusion_attention_forward";
        check_len(op, "out", out, "(S, C)", s * c);
        check_len(op, "probs", probs, "(S, M)", s * m);
        check_len(op, "ps", ps, "(S, C)", s * c);
        check_len(op, "lr", lr, "(M, C)", m * c);
    }

    /// The shapes of the backward: `d_ps, dout, ps (S, C)`, `d_lr, lr (M, C)`, `probs (S, M)`.
    #[track_caller]
    pub fn check_backward(
        &self,
        d_ps: usize,
        d_lr: usize,
        dout: usize,
        ps: usize,
        lr: usize,
        probs: usize,
    ) {
        let FusionAttentionDims { s, m, c } = *self;
        let op = "fusion_attention_backward";
        check_len(op, "d_ps", d_ps, "(S, C)", s * c);
        check_len(op, "d_lr", d_lr, "(M, C)", m * c);
        check_len(op, "dout", dout, "(S, C)", s * c);
        check_len(op, "ps", ps, "(S, C)", s * c);
        check_len(op, "lr", lr, "(M, C)", m * c);
        check_len(op, "probs", probs, "(S, M)", s * m);
    }
}

/// Dimensions of EPT-MS's gated experts:
/// [`Backend::gated_experts_forward`](super::Backend::gated_experts_forward) and
/// [`Backend::gated_experts_backward`](super::Backend::gated_experts_backward). The number of
/// experts E is the number of expert tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GatedExpertsDims {
    /// Rows: `gate (N, E)`, each expert `(N, C)`.
    pub n: usize,
    /// Row width of the experts.
    pub c: usize,
}

impl GatedExpertsDims {
    /// `experts` each `(N, C)`, for `op`.
    #[track_caller]
    fn check_experts(&self, op: &str, name: &str, experts: impl Iterator<Item = usize>) {
        let want = self.n * self.c;
        for (i, len) in experts.enumerate() {
            assert!(
                len == want,
                "{op}: {name} {i} has {len} elements, not (N, C) = {want}"
            );
        }
    }

    /// The shapes of the forward: `out (N, C)`, `gate (N, E)`, E `experts (N, C)`.
    #[track_caller]
    pub fn check_forward(
        &self,
        out: usize,
        gate: usize,
        experts: impl ExactSizeIterator<Item = usize>,
    ) {
        let GatedExpertsDims { n, c } = *self;
        let op = "gated_experts_forward";
        check_len(op, "out", out, "(N, C)", n * c);
        check_len(op, "gate", gate, "(N, E)", n * experts.len());
        self.check_experts(op, "expert", experts);
    }

    /// The shapes of the backward: `d_gate, gate (N, E)`, one `d_experts (N, C)` per expert,
    /// `dout (N, C)`, E `experts (N, C)`.
    #[track_caller]
    pub fn check_backward(
        &self,
        d_gate: usize,
        d_experts: impl ExactSizeIterator<Item = usize>,
        dout: usize,
        gate: usize,
        experts: impl ExactSizeIterator<Item = usize>,
    ) {
        let GatedExpertsDims { n, c } = *self;
        let op = "gated_experts_backward";
        let e = experts.len();
        assert_eq!(d_experts.len(), e, "{op}: one d_expert per expert");
        check_len(op, "d_gate", d_gate, "(N, E)", n * e);
        check_len(op, "dout", dout, "(N, C)", n * c);
        check_len(op, "gate", gate, "(N, E)", n * e);
        self.check_experts(op, "expert", experts);
        self.check_experts(op, "d_expert", d_experts);
    }
}

/// Dimensions of LAMP's pooled outer product:
/// [`Backend::lamp_pool_forward`](super::Backend::lamp_pool_forward) and
/// [`Backend::lamp_pool_backward`](super::Backend::lamp_pool_backward).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LampPoolDims {
    /// Rows of `u (L, R)`, a multiple of `p`.
    pub l: usize,
    /// Rank: `q (R)`.
    pub r: usize,
    /// Embedding width: `v (C, R)`, `out (L/p, C)`.
    pub c: usize,
    /// Rows pooled into one.
    pub p: usize,
}

impl LampPoolDims {
    /// `u (L, R)`, `q (R)`, `v (C, R)` and L a multiple of p, for `op`.
    #[track_caller]
    fn check_inputs(&self, op: &str, (u, q, v): (usize, usize, usize)) {
        let LampPoolDims { l, r, c, p } = *self;
        assert!(
            p > 0 && l.is_multiple_of(p),
            "{op}: L = {l} is not a multiple of p = {p}"
        );
        check_len(op, "u", u, "(L, R)", l * r);
        check_len(op, "q", q, "(R)", r);
        check_len(op, "v", v, "(C, R)", c * r);
    }

    /// The shapes of the forward: `out (L/p, C)`, `u (L, R)`, `q (R)`, `v (C, R)`.
    #[track_caller]
    pub fn check_forward(&self, out: usize, u: usize, q: usize, v: usize) {
        let op = "lamp_pool_forward";
        self.check_inputs(op, (u, q, v));
        check_len(op, "out", out, "(L/p, C)", self.l / self.p * self.c);
    }

    /// The shapes of the backward: the gradients `(du, dq, dv)` shaped as the inputs
    /// `(u (L, R), q (R), v (C, R))`, `dout (L/p, C)`.
    #[track_caller]
    pub fn check_backward(
        &self,
        (du, dq, dv): (usize, usize, usize),
        dout: usize,
        uqv: (usize, usize, usize),
    ) {
        let LampPoolDims { l, r, c, p } = *self;
        let op = "lamp_pool_backward";
        self.check_inputs(op, uqv);
        check_len(op, "du", du, "(L, R)", l * r);
        check_len(op, "dq", dq, "(R)", r);
        check_len(op, "dv", dv, "(C, R)", c * r);
        check_len(op, "dout", dout, "(L/p, C)", l / p * c);
    }
}

// ---- optimiser and loss ----------------------------------------------------------------------

impl AdamW {
    /// The shapes of [`Backend::adamw_step`](super::Backend::adamw_step): `master, m, v, grad`
    /// as long as `param`; and steps count from 1.
    #[track_caller]
    pub fn check(&self, param: usize, master: usize, m: usize, v: usize, grad: usize) {
        let op = "adamw_step";
        check_len(op, "master", master, "param's (N)", param);
        check_len(op, "m", m, "param's (N)", param);
        check_len(op, "v", v, "param's (N)", param);
        check_len(op, "grad", grad, "param's (N)", param);
        assert!(self.step >= 1, "{op}: steps count from 1");
    }
}

/// Dimensions of
/// [`Backend::cross_entropy_forward_backward`](super::Backend::cross_entropy_forward_backward).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CrossEntropyDims {
    /// Label rows: `logits (M, V)`, `targets (M)`.
    pub m: usize,
    /// Vocabulary size.
    pub v: usize,
}

impl CrossEntropyDims {
    /// The shapes: `losses (M)`, `dlogits, logits (M, V)`, `targets (M)`.
    #[track_caller]
    pub fn check(&self, losses: usize, dlogits: usize, logits: usize, targets: usize) {
        let CrossEntropyDims { m, v } = *self;
        let op = "cross_entropy_forward_backward";
        check_len(op, "losses", losses, "(M)", m);
        check_len(op, "dlogits", dlogits, "(M, V)", m * v);
        check_len(op, "logits", logits, "(M, V)", m * v);
        check_len(op, "targets", targets, "(M)", m);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn panic_message(f: impl FnOnce() + std::panic::UnwindSafe) -> String {
        let err = std::panic::catch_unwind(f).expect_err("the check panics");
        err.downcast_ref::<String>().cloned().unwrap_or_default()
    }

    #[test]
    fn a_wrong_length_names_the_op_the_buffer_and_its_shape() {
        let dims = RmsNormDims { n: 2, c: 3 };
        dims.check_forward(6, 2, 6, 3);
        let msg = panic_message(|| dims.check_forward(6, 2, 5, 3));
        assert_eq!(msg, "rmsnorm_forward: inp has 5 elements, not (N, C) = 6");
    }

    #[test]
    fn row_tables_must_hold_whole_rows() {
        assert_eq!(check_gather_rows(6, 12, 2, 2, 3), 4);
        let msg = panic_message(|| {
            check_gather_rows(6, 13, 2, 2, 3);
        });
        assert!(msg.contains("gather_rows: table has 13 elements"), "{msg}");
        let dims = EmbedPromptDims {
            b: 1,
            t: 3,
            p: 1,
            c: 2,
        };
        assert_eq!(dims.check_backward(2, Some(8), 8), 4);
        let msg = panic_message(|| {
            dims.check_backward(2, Some(4), 8);
        });
        assert!(
            msg.contains("d_update has 2 rows, fewer than T = 3"),
            "{msg}"
        );
    }
}
