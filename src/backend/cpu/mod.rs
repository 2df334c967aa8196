//! The CPU reference backend: the readable definition of every op, and the oracle every other
//! backend is tested against. Generic over the float type so that finite-difference checks run
//! in f64 (`CpuBackend<f64>`) while the engine runs in f32 (`CpuBackend<f32>`).
//!
//! GEMMs go through the `gemm` crate (the kernels under faer), the other ops are plain loops
//! parallelised over rows or batch entries with rayon. Reductions accumulate in f64.
//!
//! Gradient convention: `*_backward_dinp` write (`=`) their output gradient, except
//! `rmsnorm_backward_dinp` and `scatter_rows_add`, which add (`+=`), as in `backend/mod.rs`.

use rayon::prelude::*;

use crate::backend::nf4::{dequantize_nf4, Nf4Tensor};

mod method_ops;

use super::{
    check_add_assign, check_gated_act_backward_dinp, check_gated_act_forward, check_gather_rows,
    check_nf4_dequantize, check_scatter_rows_add, relative_position_bucket, Activation, AdamW,
    AttnDims, AttnMask, Backend, CrossEntropyDims, EmbedPromptDims, FusionAttentionDims,
    FusionMode, GatedExpertsDims, Gemm, LampPoolDims, LayerNormDims, RelBias, RmsNormDims,
    RopeDims,
};

/// The float types the CPU backend runs in.
pub trait Float:
    num_traits::Float
    + num_traits::NumAssign
    + Default
    + std::fmt::Debug
    + std::iter::Sum
    + Send
    + Sync
    + 'static
{
    fn of(x: f64) -> Self;
    fn f64(self) -> f64;
    fn of_f32(x: f32) -> Self;
    fn f32(self) -> f32;
}

impl Float for f32 {
    fn of(x: f64) -> Self {
        x as f32
    }
    fn f64(self) -> f64 {
        self as f64
    }
    fn of_f32(x: f32) -> Self {
        x
    }
    fn f32(self) -> f32 {
        self
    }
}

impl Float for f64 {
    fn of(x: f64) -> Self {
        x
    }
    fn f64(self) -> f64 {
        self
    }
    fn of_f32(x: f32) -> Self {
        x as f64
    }
    fn f32(self) -> f32 {
        self as f32
    }
}

/// `max(a, b)`, NaN when either is NaN (as `torch.max`; `f32::max` drops a NaN operand). Softmax
/// maxima use it, so that a row with a NaN score gets NaN probabilities, never the all-zero row of
/// a row that sees no key.
pub fn max_nan<T: Float>(a: T, b: T) -> T {
    if a > b || a.is_nan() {
        a
    } else {
        b
    }
}

/// The CPU backend in float type `T`.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuBackend<T> {
    _t: std::marker::PhantomData<T>,
}

impl<T: Float> CpuBackend<T> {
    pub fn new() -> Self {
        CpuBackend {
            _t: std::marker::PhantomData,
        }
    }
}

/// Below this many multiply-adds a GEMM runs on one thread: spawning costs more than it saves.
const GEMM_PARALLEL_MIN: usize = 1 << 18;

/// `out (M, N) = alpha·op(a)·op(b) [+ out]` on raw slices; see [`Gemm`]. Used by the trait's
/// `matmul` and inside attention.
fn gemm_slices<T: Float>(out: &mut [T], a: &[T], b: &[T], g: Gemm, parallel: bool) {
    let Gemm {
        m,
        n,
        k,
        trans_a,
        trans_b,
        alpha,
        accumulate,
    } = g;
    g.check(out.len(), a.len(), b.len());
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            out.fill(T::zero());
        }
        return;
    }
    // Row and column strides of op(a) and op(b) in their row-major storage.
    let (a_rs, a_cs) = if trans_a {
        (1, m as isize)
    } else {
        (k as isize, 1)
    };
    let (b_rs, b_cs) = if trans_b {
        (1, k as isize)
    } else {
        (n as isize, 1)
    };
    let parallelism = if parallel && m * n * k >= GEMM_PARALLEL_MIN {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the check above bounds every index the strides reach: out is M×N row-major,
    // op(a) reads M×K and op(b) K×N elements of buffers of exactly that size.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            T::one(),
            T::of(alpha),
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// The bias of every relative position `key - query` in `-(T-1) ..= S-1`, per head:
/// `(T+S-1, H)`, row `rel + T - 1` (holding the bucket of `rel - q_offset`). Built once per call so the inner loops only index.
fn relative_bias_rows<T: Float>(bias: &RelBias<'_, Vec<T>>, dims: AttnDims) -> Vec<T> {
    let AttnDims { t, s, h, .. } = dims;
    dims.check_bias_table(bias.table.len(), bias.num_buckets);
    let mut rows = Vec::with_capacity((t + s - 1) * h);
    for rel in -(t as i64 - 1)..(s as i64) {
        let bucket = relative_position_bucket(
            rel - bias.q_offset as i64,
            bias.bidirectional,
            bias.num_buckets,
            bias.max_distance,
        );
        rows.extend_from_slice(&bias.table[bucket * h..(bucket + 1) * h]);
    }
    rows
}

/// Copies head `head` of every row: `dst (N, D)` from `src (N, heads·D)`.
fn gather_head<T: Float>(dst: &mut [T], src: &[T], head: usize, heads: usize, d: usize) {
    for (row, out) in src.chunks_exact(heads * d).zip(dst.chunks_exact_mut(d)) {
        out.copy_from_slice(&row[head * d..(head + 1) * d]);
    }
}

/// Adds `src (N, D)` into head `head` of every row of `dst (N, heads·D)`.
fn scatter_head_add<T: Float>(dst: &mut [T], src: &[T], head: usize, heads: usize, d: usize) {
    for (row, x) in dst.chunks_exact_mut(heads * d).zip(src.chunks_exact(d)) {
        for (o, &v) in row[head * d..(head + 1) * d].iter_mut().zip(x) {
            *o += v;
        }
    }
}

/// What every head's scores share within one attention call.
struct Scores<'a, T> {
    /// `(T+S-1, H)` from [`relative_bias_rows`], or None without bias.
    bias_rows: Option<&'a [T]>,
    causal: bool,
    scale: T,
    dims: AttnDims,
}

/// The log-sum-exp of each score row of one head, `(T)`: computed and written by the forward,
/// read back by the backward.
enum RowLse<'a, T> {
    Write(&'a mut [T]),
    Read(&'a [T]),
}

/// The probabilities of head `hh` of one batch entry, `probs (T, S)`: scores `scale·q·kᵀ` plus
/// the relative bias, masked entries (padding keys, future keys when causal) set to probability
/// 0. `qh (T, D)`, `kh (S, D)`, `key_mask_b (S)`. With [`RowLse::Write`] the softmax is computed
/// and each row's log-sum-exp written; with [`RowLse::Read`] (the backward) the saved one is
/// reused instead.
fn head_probs<T: Float>(
    probs: &mut [T],
    qh: &[T],
    kh: &[T],
    key_mask_b: &[i32],
    hh: usize,
    scores: &Scores<'_, T>,
    mut lse: RowLse<'_, T>,
) {
    let AttnDims { t, s, h, d, .. } = scores.dims;
    let alpha = scores.scale.f64();
    gemm_slices(probs, qh, kh, Gemm::nt(t, s, d).alpha(alpha), false);
    for (i, row) in probs.chunks_exact_mut(s).enumerate() {
        for (j, x) in row.iter_mut().enumerate() {
            if key_mask_b[j] == 0 || (scores.causal && j > i) {
                *x = T::neg_infinity();
            } else if let Some(rows) = scores.bias_rows {
                *x += rows[(j + t - 1 - i) * h + hh];
            }
        }
        let row_lse = match &mut lse {
            RowLse::Read(lse) => lse[i],
            RowLse::Write(out) => {
                let max = row.iter().fold(T::neg_infinity(), |m, &x| max_nan(m, x));
                out[i] = if max == T::neg_infinity() {
                    T::neg_infinity()
                } else {
                    let sum: f64 = row.iter().map(|&x| (x - max).exp().f64()).sum();
                    max + T::of(sum.ln())
                };
                out[i]
            }
        };
        for x in row.iter_mut() {
            // A row with no visible key (lse = -inf) gets all-zero probabilities: output 0, no
            // gradient. A NaN visible score makes the max and lse NaN: the row's probabilities are NaN.
            *x = if *x == T::neg_infinity() || row_lse == T::neg_infinity() {
                T::zero()
            } else {
                (*x - row_lse).exp()
            };
        }
    }
}

impl<T: Float> Backend for CpuBackend<T> {
    type Tensor = Vec<T>;
    type Index = Vec<i32>;
    type Nf4 = Nf4Tensor;
    type State = Vec<T>;

    fn name(&self) -> String {
        format!("cpu-{}", std::any::type_name::<T>())
    }

    fn elem_bytes(&self) -> usize {
        std::mem::size_of::<T>()
    }

    fn zeros(&self, len: usize) -> Vec<T> {
        vec![T::zero(); len]
    }

    fn upload_f32(&self, data: Vec<f32>) -> Vec<T> {
        // For T = f32 this is a move; the generic path converts.
        let any: Box<dyn std::any::Any> = Box::new(data);
        match any.downcast::<Vec<T>>() {
            Ok(same) => *same,
            Err(any) => match any.downcast::<Vec<f32>>() {
                Ok(data) => data.into_iter().map(T::of_f32).collect(),
                Err(_) => unreachable!("downcast of Vec<f32> to Vec<f32> failed"),
            },
        }
    }

    fn upload_f64(&self, data: &[f64]) -> Vec<T> {
        data.iter().map(|&x| T::of(x)).collect()
    }

    fn download_f32(&self, x: &Vec<T>) -> Vec<f32> {
        x.iter().map(|v| v.f32()).collect()
    }

    fn download_f64(&self, x: &Vec<T>) -> Vec<f64> {
        x.iter().map(|v| v.f64()).collect()
    }

    fn copy(&self, x: &Vec<T>) -> Vec<T> {
        x.clone()
    }

    fn upload_index(&self, data: &[i32]) -> Vec<i32> {
        data.to_vec()
    }

    fn upload_nf4(&self, q: Nf4Tensor) -> Nf4Tensor {
        q
    }

    fn nf4_len(&self, q: &Nf4Tensor) -> usize {
        q.len
    }

    fn nf4_bytes(&self, q: &Nf4Tensor) -> usize {
        q.bytes()
    }

    fn nf4_dequantize(&self, out: &mut Vec<T>, q: &Nf4Tensor) {
        check_nf4_dequantize(out.len(), q.len);
        let mut values = vec![0f32; q.len]; // (N)
        dequantize_nf4(&mut values, q);
        for (o, v) in out.iter_mut().zip(values) {
            *o = T::of(v as f64);
        }
    }

    fn len(&self, x: &Vec<T>) -> usize {
        x.len()
    }

    fn fill_zero(&self, x: &mut Vec<T>) {
        x.fill(T::zero());
    }

    fn add_assign(&self, dst: &mut Vec<T>, src: &Vec<T>) {
        check_add_assign(dst.len(), src.len());
        dst.par_iter_mut()
            .with_min_len(1 << 14)
            .zip(src.par_iter())
            .for_each(|(d, &s)| *d += s);
    }

    fn matmul(&self, out: &mut Vec<T>, a: &Vec<T>, b: &Vec<T>, g: Gemm) {
        gemm_slices(out, a, b, g, true);
    }

    fn gather_rows(&self, out: &mut Vec<T>, table: &Vec<T>, rows: &Vec<i32>, m: usize, c: usize) {
        let r = check_gather_rows(out.len(), table.len(), rows.len(), m, c);
        for (dst, &row) in out.chunks_exact_mut(c).zip(rows) {
            let row = usize::try_from(row).ok().filter(|&x| x < r);
            let row = row.unwrap_or_else(|| panic!("gather_rows: row index out of 0..{r}"));
            dst.copy_from_slice(&table[row * c..(row + 1) * c]);
        }
    }

    fn scatter_rows_add(
        &self,
        dtable: &mut Vec<T>,
        dout: &Vec<T>,
        rows: &Vec<i32>,
        m: usize,
        c: usize,
    ) {
        let r = check_scatter_rows_add(dtable.len(), dout.len(), rows.len(), m, c);
        for (src, &row) in dout.chunks_exact(c).zip(rows) {
            let row = usize::try_from(row).ok().filter(|&x| x < r);
            let row = row.unwrap_or_else(|| panic!("scatter_rows_add: row index out of 0..{r}"));
            for (d, &s) in dtable[row * c..(row + 1) * c].iter_mut().zip(src) {
                *d += s;
            }
        }
    }

    fn sum_squares(&self, x: &Vec<T>) -> f64 {
        x.iter().map(|&v| v.f64() * v.f64()).sum()
    }

    fn state_upload(&self, data: &[f64]) -> Vec<T> {
        data.iter().map(|&x| T::of(x)).collect()
    }

    fn state_download(&self, x: &Vec<T>) -> Vec<f64> {
        x.iter().map(|v| v.f64()).collect()
    }

    fn adamw_step(
        &self,
        param: &mut Vec<T>,
        master: &mut Vec<T>,
        m: &mut Vec<T>,
        v: &mut Vec<T>,
        grad: &Vec<T>,
        h: AdamW,
    ) {
        let n = param.len();
        h.check(n, master.len(), m.len(), v.len(), grad.len());
        // The bias corrections in f64: β^t underflows gracefully, 1 − β^t stays accurate.
        let bc1 = 1.0 - h.beta1.powf(h.step as f64);
        let bc2 = 1.0 - h.beta2.powf(h.step as f64);
        for i in 0..n {
            let g = grad[i].f64() * h.grad_scale;
            let mi = h.beta1 * m[i].f64() + (1.0 - h.beta1) * g;
            let vi = h.beta2 * v[i].f64() + (1.0 - h.beta2) * g * g;
            let p = master[i].f64();
            let update = (mi / bc1) / ((vi / bc2).sqrt() + h.eps) + h.weight_decay * p;
            master[i] = T::of(p - h.lr * update);
            param[i] = master[i];
            m[i] = T::of(mi);
            v[i] = T::of(vi);
        }
    }

    fn add_bias(&self, x: &mut Vec<T>, bias: &Vec<T>, n: usize, f: usize) {
        method_ops::add_bias(x, bias, n, f);
    }

    fn bias_backward(&self, dbias: &mut Vec<T>, dout: &Vec<T>, n: usize, f: usize) {
        method_ops::bias_backward(dbias, dout, n, f);
    }

    fn embed_prompt_forward(
        &self,
        out: &mut Vec<T>,
        table: &Vec<T>,
        ids: &Vec<i32>,
        prompt: &Vec<T>,
        update: Option<&Vec<T>>,
        dims: EmbedPromptDims,
    ) {
        let update = update.map(|u| u.as_slice());
        method_ops::embed_prompt_forward(out, table, ids, prompt, update, dims);
    }

    fn embed_prompt_backward(
        &self,
        d_prompt: &mut Vec<T>,
        d_update: Option<&mut Vec<T>>,
        dout: &Vec<T>,
        dims: EmbedPromptDims,
    ) {
        let d_update = d_update.map(|u| u.as_mut_slice());
        method_ops::embed_prompt_backward(d_prompt, d_update, dout, dims);
    }

    fn layernorm_forward(
        &self,
        out: &mut Vec<T>,
        mean: &mut Vec<T>,
        rstd: &mut Vec<T>,
        inp: &Vec<T>,
        weight: &Vec<T>,
        bias: &Vec<T>,
        eps: f64,
        dims: LayerNormDims,
    ) {
        let stats = (mean.as_mut_slice(), rstd.as_mut_slice());
        let params = (weight.as_slice(), bias.as_slice());
        method_ops::layernorm_forward(out, stats, inp, params, eps, dims);
    }

    fn layernorm_backward(
        &self,
        dinp: &mut Vec<T>,
        dweight: &mut Vec<T>,
        dbias: &mut Vec<T>,
        dout: &Vec<T>,
        inp: &Vec<T>,
        weight: &Vec<T>,
        mean: &Vec<T>,
        rstd: &Vec<T>,
        dims: LayerNormDims,
    ) {
        let grads = (
            dinp.as_mut_slice(),
            dweight.as_mut_slice(),
            dbias.as_mut_slice(),
        );
        let stats = (mean.as_slice(), rstd.as_slice());
        method_ops::layernorm_backward(grads, dout, inp, weight, stats, dims);
    }

    fn softmax_rows_forward(&self, out: &mut Vec<T>, inp: &Vec<T>, n: usize, k: usize) {
        method_ops::softmax_rows_forward(out, inp, n, k);
    }

    fn softmax_rows_backward_dinp(
        &self,
        dinp: &mut Vec<T>,
        dout: &Vec<T>,
        out: &Vec<T>,
        n: usize,
        k: usize,
    ) {
        method_ops::softmax_rows_backward_dinp(dinp, dout, out, n, k);
    }

    fn fusion_attention_forward(
        &self,
        out: &mut Vec<T>,
        probs: &mut Vec<T>,
        ps: &Vec<T>,
        lr: &Vec<T>,
        mode: FusionMode,
        dims: FusionAttentionDims,
    ) {
        method_ops::fusion_attention_forward(out, probs, ps, lr, mode, dims);
    }

    fn fusion_attention_backward(
        &self,
        d_ps: &mut Vec<T>,
        d_lr: &mut Vec<T>,
        dout: &Vec<T>,
        ps: &Vec<T>,
        lr: &Vec<T>,
        probs: &Vec<T>,
        mode: FusionMode,
        dims: FusionAttentionDims,
    ) {
        let inputs = (ps.as_slice(), lr.as_slice(), probs.as_slice());
        let grads = (d_ps.as_mut_slice(), d_lr.as_mut_slice());
        method_ops::fusion_attention_backward(grads, dout, inputs, mode, dims);
    }

    fn gated_experts_forward(
        &self,
        out: &mut Vec<T>,
        gate: &Vec<T>,
        experts: &[&Vec<T>],
        dims: GatedExpertsDims,
    ) {
        let experts: Vec<&[T]> = experts.iter().map(|x| x.as_slice()).collect();
        method_ops::gated_experts_forward(out, gate, &experts, dims);
    }

    fn gated_experts_backward(
        &self,
        d_gate: &mut Vec<T>,
        d_experts: &mut [Vec<T>],
        dout: &Vec<T>,
        gate: &Vec<T>,
        experts: &[&Vec<T>],
        dims: GatedExpertsDims,
    ) {
        let experts: Vec<&[T]> = experts.iter().map(|x| x.as_slice()).collect();
        let mut d: Vec<&mut [T]> = d_experts.iter_mut().map(|x| x.as_mut_slice()).collect();
        method_ops::gated_experts_backward(d_gate, &mut d, dout, gate, &experts, dims);
    }

    fn lamp_pool_forward(
        &self,
        out: &mut Vec<T>,
        u: &Vec<T>,
        q: &Vec<T>,
        v: &Vec<T>,
        dims: LampPoolDims,
    ) {
        method_ops::lamp_pool_forward(out, u, q, v, dims);
    }

    fn lamp_pool_backward(
        &self,
        du: &mut Vec<T>,
        dq: &mut Vec<T>,
        dv: &mut Vec<T>,
        dout: &Vec<T>,
        u: &Vec<T>,
        q: &Vec<T>,
        v: &Vec<T>,
        dims: LampPoolDims,
    ) {
        let grads = (du.as_mut_slice(), dq.as_mut_slice(), dv.as_mut_slice());
        let inputs = (u.as_slice(), q.as_slice(), v.as_slice());
        method_ops::lamp_pool_backward(grads, dout, inputs, dims);
    }

    fn rmsnorm_forward(
        &self,
        out: &mut Vec<T>,
        rstd: &mut Vec<T>,
        inp: &Vec<T>,
        weight: &Vec<T>,
        eps: f64,
        dims: RmsNormDims,
    ) {
        let RmsNormDims { c, .. } = dims;
        dims.check_forward(out.len(), rstd.len(), inp.len(), weight.len());
        out.par_chunks_mut(c)
            .zip(rstd.par_iter_mut())
            .zip(inp.par_chunks(c))
            .for_each(|((y, r), x)| {
                let mean_sq = x.iter().map(|&v| v.f64() * v.f64()).sum::<f64>() / c as f64;
                *r = T::of(1.0 / (mean_sq + eps).sqrt());
                for ((yi, &xi), &wi) in y.iter_mut().zip(x).zip(weight) {
                    *yi = wi * (xi * *r);
                }
            });
    }

    fn rmsnorm_backward_dinp(
        &self,
        dinp: &mut Vec<T>,
        dout: &Vec<T>,
        inp: &Vec<T>,
        weight: &Vec<T>,
        rstd: &Vec<T>,
        dims: RmsNormDims,
    ) {
        let RmsNormDims { c, .. } = dims;
        dims.check_backward_dinp(dinp.len(), dout.len(), inp.len(), weight.len(), rstd.len());
        // y = w·x·r with r = (mean(x²) + eps)^-½, so
        // dx_i = r·w_i·dy_i − r³/C · x_i · Σ_j w_j·dy_j·x_j.
        dinp.par_chunks_mut(c)
            .zip(dout.par_chunks(c))
            .zip(inp.par_chunks(c))
            .zip(rstd.par_iter())
            .for_each(|(((dx, dy), x), &r)| {
                let dot: f64 = dy
                    .iter()
                    .zip(x)
                    .zip(weight)
                    .map(|((&g, &xi), &wi)| (g * wi * xi).f64())
                    .sum();
                let r64 = r.f64();
                let coef = T::of(r64 * r64 * r64 * dot / c as f64);
                for (((dxi, &g), &xi), &wi) in dx.iter_mut().zip(dy).zip(x).zip(weight) {
                    *dxi += r * wi * g - coef * xi;
                }
            });
    }

    fn attention_forward(
        &self,
        out: &mut Vec<T>,
        lse: &mut Vec<T>,
        q: &Vec<T>,
        k: &Vec<T>,
        v: &Vec<T>,
        mask: AttnMask<'_, Vec<i32>>,
        bias: Option<RelBias<'_, Vec<T>>>,
        scale: f64,
        dims: AttnDims,
    ) {
        let AttnDims {
            t, s, h, h_kv, d, ..
        } = dims;
        let qkv = (q.len(), k.len(), v.len());
        dims.check_forward(out.len(), lse.len(), qkv, mask.key_mask.len());
        let bias_rows = bias.map(|bias| relative_bias_rows(&bias, dims));
        let scores = Scores {
            bias_rows: bias_rows.as_deref(),
            causal: mask.causal,
            scale: T::of(scale),
            dims,
        };
        let group = h / h_kv;

        // One batch entry per task; per head: P = softmax(scale·Q·Kᵀ + bias + mask), O = P·V.
        out.par_chunks_mut(t * h * d)
            .zip(lse.par_chunks_mut(h * t))
            .enumerate()
            .for_each(|(bi, (out_b, lse_b))| {
                let q_b = &q[bi * t * h * d..][..t * h * d];
                let k_b = &k[bi * s * h_kv * d..][..s * h_kv * d];
                let v_b = &v[bi * s * h_kv * d..][..s * h_kv * d];
                let key_mask_b = &mask.key_mask[bi * s..][..s];
                let (mut qh, mut kh, mut vh) = (
                    vec![T::zero(); t * d],
                    vec![T::zero(); s * d],
                    vec![T::zero(); s * d],
                );
                let mut probs = vec![T::zero(); t * s]; // (T, S)
                let mut oh = vec![T::zero(); t * d]; // (T, D)
                out_b.fill(T::zero());
                for hh in 0..h {
                    let kvh = hh / group;
                    gather_head(&mut qh, q_b, hh, h, d);
                    gather_head(&mut kh, k_b, kvh, h_kv, d);
                    gather_head(&mut vh, v_b, kvh, h_kv, d);
                    let lse_h = RowLse::Write(&mut lse_b[hh * t..(hh + 1) * t]);
                    head_probs(&mut probs, &qh, &kh, key_mask_b, hh, &scores, lse_h);
                    gemm_slices(&mut oh, &probs, &vh, Gemm::nn(t, d, s), false);
                    scatter_head_add(out_b, &oh, hh, h, d);
                }
            });
    }

    fn attention_backward_dinp(
        &self,
        dq: &mut Vec<T>,
        dk: &mut Vec<T>,
        dv: &mut Vec<T>,
        dout: &Vec<T>,
        q: &Vec<T>,
        k: &Vec<T>,
        v: &Vec<T>,
        out: &Vec<T>,
        lse: &Vec<T>,
        mask: AttnMask<'_, Vec<i32>>,
        bias: Option<RelBias<'_, Vec<T>>>,
        scale: f64,
        dims: AttnDims,
    ) {
        let AttnDims {
            t, s, h, h_kv, d, ..
        } = dims;
        dims.check_backward_dinp(
            (dq.len(), dk.len(), dv.len()),
            dout.len(),
            (q.len(), k.len(), v.len()),
            (out.len(), lse.len()),
            mask.key_mask.len(),
        );
        let bias_rows = bias.map(|bias| relative_bias_rows(&bias, dims));
        let scale_t = T::of(scale);
        let scores = Scores {
            bias_rows: bias_rows.as_deref(),
            causal: mask.causal,
            scale: scale_t,
            dims,
        };
        let group = h / h_kv;

        // With P recomputed from the saved log-sum-exp and O = P·V:
        // dV = Pᵀ·dO, dP = dO·Vᵀ, dS = P ⊙ (dP − rowsum(dO ⊙ O)), dQ = scale·dS·K, dK = scale·dSᵀ·Q.
        dq.par_chunks_mut(t * h * d)
            .zip(dk.par_chunks_mut(s * h_kv * d))
            .zip(dv.par_chunks_mut(s * h_kv * d))
            .enumerate()
            .for_each(|(bi, ((dq_b, dk_b), dv_b))| {
                let q_b = &q[bi * t * h * d..][..t * h * d];
                let k_b = &k[bi * s * h_kv * d..][..s * h_kv * d];
                let v_b = &v[bi * s * h_kv * d..][..s * h_kv * d];
                let o_b = &out[bi * t * h * d..][..t * h * d];
                let do_b = &dout[bi * t * h * d..][..t * h * d];
                let lse_b = &lse[bi * h * t..][..h * t];
                let key_mask_b = &mask.key_mask[bi * s..][..s];
                dq_b.fill(T::zero());
                dk_b.fill(T::zero());
                dv_b.fill(T::zero());
                let (mut qh, mut kh, mut vh) = (
                    vec![T::zero(); t * d],
                    vec![T::zero(); s * d],
                    vec![T::zero(); s * d],
                );
                let (mut oh, mut doh) = (vec![T::zero(); t * d], vec![T::zero(); t * d]);
                let mut probs = vec![T::zero(); t * s]; // (T, S)
                let mut dprobs = vec![T::zero(); t * s]; // (T, S)
                let mut dqh = vec![T::zero(); t * d];
                let (mut dkh, mut dvh) = (vec![T::zero(); s * d], vec![T::zero(); s * d]);
                for hh in 0..h {
                    let kvh = hh / group;
                    gather_head(&mut qh, q_b, hh, h, d);
                    gather_head(&mut kh, k_b, kvh, h_kv, d);
                    gather_head(&mut vh, v_b, kvh, h_kv, d);
                    gather_head(&mut oh, o_b, hh, h, d);
                    gather_head(&mut doh, do_b, hh, h, d);
                    let lse_h = RowLse::Read(&lse_b[hh * t..(hh + 1) * t]);
                    head_probs(&mut probs, &qh, &kh, key_mask_b, hh, &scores, lse_h);
                    gemm_slices(
                        &mut dvh,
                        &probs,
                        &doh,
                        Gemm {
                            trans_a: true,
                            ..Gemm::nn(s, d, t)
                        },
                        false,
                    );
                    gemm_slices(&mut dprobs, &doh, &vh, Gemm::nt(t, s, d), false);
                    for ((dp_row, p_row), (o_row, do_row)) in dprobs
                        .chunks_exact_mut(s)
                        .zip(probs.chunks_exact(s))
                        .zip(oh.chunks_exact(d).zip(doh.chunks_exact(d)))
                    {
                        let delta: T = o_row.iter().zip(do_row).map(|(&x, &y)| x * y).sum();
                        for (ds, &p) in dp_row.iter_mut().zip(p_row) {
                            *ds = p * (*ds - delta) * scale_t;
                        }
                    }
                    let dscores = &dprobs;
                    gemm_slices(&mut dqh, dscores, &kh, Gemm::nn(t, d, s), false);
                    gemm_slices(
                        &mut dkh,
                        dscores,
                        &qh,
                        Gemm {
                            trans_a: true,
                            ..Gemm::nn(s, d, t)
                        },
                        false,
                    );
                    scatter_head_add(dq_b, &dqh, hh, h, d);
                    scatter_head_add(dk_b, &dkh, kvh, h_kv, d);
                    scatter_head_add(dv_b, &dvh, kvh, h_kv, d);
                }
            });
    }

    fn rope_forward(
        &self,
        out: &mut Vec<T>,
        inp: &Vec<T>,
        positions: &Vec<i32>,
        cos: &Vec<T>,
        sin: &Vec<T>,
        dims: RopeDims,
    ) {
        rope_rotate(out, inp, positions, (cos, sin), dims, Rotation::Forward);
    }

    fn rope_backward_dinp(
        &self,
        dinp: &mut Vec<T>,
        dout: &Vec<T>,
        positions: &Vec<i32>,
        cos: &Vec<T>,
        sin: &Vec<T>,
        dims: RopeDims,
    ) {
        rope_rotate(dinp, dout, positions, (cos, sin), dims, Rotation::Transpose);
    }

    fn gated_act_forward(
        &self,
        out: &mut Vec<T>,
        a: &Vec<T>,
        gate: Option<&Vec<T>>,
        act: Activation,
        len: usize,
    ) {
        check_gated_act_forward(out.len(), a.len(), gate.map(|g| g.len()), len);
        match gate {
            Some(gate) => {
                out.par_iter_mut()
                    .with_min_len(1 << 12)
                    .zip(a.par_iter().zip(gate.par_iter()))
                    .for_each(|(o, (&x, &g))| *o = activation(act, x) * g);
            }
            None => out
                .par_iter_mut()
                .with_min_len(1 << 12)
                .zip(a.par_iter())
                .for_each(|(o, &x)| *o = activation(act, x)),
        }
    }

    fn gated_act_backward_dinp(
        &self,
        da: &mut Vec<T>,
        dgate: Option<&mut Vec<T>>,
        dout: &Vec<T>,
        a: &Vec<T>,
        gate: Option<&Vec<T>>,
        act: Activation,
        len: usize,
    ) {
        check_gated_act_backward_dinp(
            da.len(),
            dgate.as_ref().map(|g| g.len()),
            dout.len(),
            a.len(),
            gate.map(|g| g.len()),
            len,
        );
        match (gate, dgate) {
            (Some(gate), Some(dgate)) => {
                da.par_iter_mut()
                    .with_min_len(1 << 12)
                    .zip(dgate.par_iter_mut())
                    .zip(dout.par_iter().zip(a.par_iter().zip(gate.par_iter())))
                    .for_each(|((dx, dg), (&g, (&x, &gv)))| {
                        *dx = g * gv * activation_grad(act, x);
                        *dg = g * activation(act, x);
                    });
            }
            (None, None) => da
                .par_iter_mut()
                .with_min_len(1 << 12)
                .zip(dout.par_iter().zip(a.par_iter()))
                .for_each(|(dx, (&g, &x))| *dx = g * activation_grad(act, x)),
            _ => unreachable!("checked: gate and dgate are both given or both absent"),
        }
    }

    fn cross_entropy_forward_backward(
        &self,
        losses: &mut Vec<T>,
        dlogits: &mut Vec<T>,
        logits: &Vec<T>,
        targets: &Vec<i32>,
        dloss: f64,
        dims: CrossEntropyDims,
    ) {
        let CrossEntropyDims { v, .. } = dims;
        dims.check(losses.len(), dlogits.len(), logits.len(), targets.len());
        let dloss = T::of(dloss);
        losses
            .par_iter_mut()
            .zip(dlogits.par_chunks_mut(v))
            .zip(logits.par_chunks(v).zip(targets.par_iter()))
            .for_each(|((loss, dl), (l, &target))| {
                let target = usize::try_from(target).ok().filter(|&x| x < v);
                let target =
                    target.unwrap_or_else(|| panic!("cross_entropy: target out of 0..{v}"));
                let max = l.iter().fold(T::neg_infinity(), |m, &x| max_nan(m, x));
                let sum: f64 = l.iter().map(|&x| (x - max).exp().f64()).sum();
                let lse = max + T::of(sum.ln());
                *loss = lse - l[target];
                for (j, (g, &x)) in dl.iter_mut().zip(l).enumerate() {
                    let onehot = if j == target { T::one() } else { T::zero() };
                    *g = dloss * ((x - lse).exp() - onehot);
                }
            });
    }
}

/// Which way [`rope_rotate`] turns each pair.
#[derive(Clone, Copy)]
enum Rotation {
    /// By θ: RoPE's forward.
    Forward,
    /// By −θ, the transpose of the rotation: the backward.
    Transpose,
}

/// `out = R(±θ)·inp` on each (i, i + D/2) pair of each head: RoPE's forward and its transpose.
/// `out, inp (N, H·D)`, `positions (N)`, `cos, sin (P, D/2)`.
fn rope_rotate<T: Float>(
    out: &mut [T],
    inp: &[T],
    positions: &[i32],
    (cos, sin): (&[T], &[T]),
    dims: RopeDims,
    rotation: Rotation,
) {
    let RopeDims { h, d, .. } = dims;
    // The transpose of a rotation is the rotation by −θ: flip the sign of sin.
    let (op, sign) = match rotation {
        Rotation::Forward => ("rope_forward", T::one()),
        Rotation::Transpose => ("rope_backward_dinp", -T::one()),
    };
    let rows = dims.check(
        op,
        out.len(),
        inp.len(),
        positions.len(),
        cos.len(),
        sin.len(),
    );
    let half = d / 2;
    out.par_chunks_exact_mut(h * d)
        .zip(inp.par_chunks_exact(h * d))
        .zip(positions.par_iter())
        .for_each(|((o_row, x_row), &pos)| {
            let p = usize::try_from(pos)
                .ok()
                .filter(|&p| p < rows)
                .unwrap_or_else(|| panic!("{op}: position {pos} outside the tables' {rows} rows"));
            let (c_row, s_row) = (&cos[p * half..][..half], &sin[p * half..][..half]);
            for (o, x) in o_row.chunks_exact_mut(d).zip(x_row.chunks_exact(d)) {
                for i in 0..half {
                    let (c, sn) = (c_row[i], sign * s_row[i]);
                    let (x1, x2) = (x[i], x[i + half]);
                    o[i] = x1 * c - x2 * sn;
                    o[i + half] = x2 * c + x1 * sn;
                }
            }
        });
}

/// `act(x)` for one element.
pub fn activation<T: Float>(act: Activation, x: T) -> T {
    match act {
        // Not `x.max(0)`: that drops a NaN x (torch.relu keeps it).
        Activation::Relu => {
            if x <= T::zero() {
                T::zero()
            } else {
                x
            }
        }
        Activation::GeluTanh => {
            let c = T::of((2.0 / std::f64::consts::PI).sqrt());
            let u = c * (x + T::of(0.044715) * x * x * x);
            T::of(0.5) * x * (T::one() + u.tanh())
        }
        Activation::Silu => x / (T::one() + (-x).exp()),
    }
}

/// `d act(x) / dx` for one element. ReLU's derivative at 0 is 0, as in PyTorch; at NaN it is NaN
/// (a NaN input never gives a finite gradient).
pub fn activation_grad<T: Float>(act: Activation, x: T) -> T {
    match act {
        Activation::Relu => {
            if x > T::zero() {
                T::one()
            } else if x.is_nan() {
                x
            } else {
                T::zero()
            }
        }
        Activation::GeluTanh => {
            let c = T::of((2.0 / std::f64::consts::PI).sqrt());
            let k = T::of(0.044715);
            let u = c * (x + k * x * x * x);
            let th = u.tanh();
            let du = c * (T::one() + T::of(3.0) * k * x * x);
            T::of(0.5) * (T::one() + th) + T::of(0.5) * x * (T::one() - th * th) * du
        }
        Activation::Silu => {
            let sig = T::one() / (T::one() + (-x).exp());
            sig * (T::one() + x * (T::one() - sig))
        }
    }
}

#[cfg(test)]
pub(crate) mod nonfinite;
#[cfg(test)]
mod tests;
