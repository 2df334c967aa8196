//! CPU reference of the ops used by the prompt methods: prompt-row concatenation, biases,
//! LayerNorm, row softmax, EPT-MS fusion and gated experts, LAMP pooling. Called by the
//! `Backend` impl in `mod.rs`; the definitions the GPU kernels will be tested against.
//! Parameter gradients accumulate (`+=`); input gradients are written (`=`).

use super::{gemm_slices, max_nan, Float};
use crate::backend::{
    check_add_bias, check_bias_backward, check_softmax_rows_backward_dinp,
    check_softmax_rows_forward, EmbedPromptDims, FusionAttentionDims, FusionMode, GatedExpertsDims,
    Gemm, LampPoolDims, LayerNormDims,
};

pub(super) fn embed_prompt_forward<T: Float>(
    out: &mut [T],
    table: &[T],
    ids: &[i32],
    prompt: &[T],
    update: Option<&[T]>,
    dims: EmbedPromptDims,
) {
    let EmbedPromptDims { t, p, c, .. } = dims;
    let update_len = update.map(|u| u.len());
    let v = dims.check_forward(out.len(), table.len(), ids.len(), prompt.len(), update_len);
    for (bi, out_b) in out.chunks_exact_mut((p + t) * c).enumerate() {
        let (rows_p, rows_t) = out_b.split_at_mut(p * c);
        rows_p.copy_from_slice(prompt);
        for (ti, row) in rows_t.chunks_exact_mut(c).enumerate() {
            let id = usize::try_from(ids[bi * t + ti]).ok().filter(|&x| x < v);
            let id = id.unwrap_or_else(|| panic!("embed_prompt_forward: id out of 0..{v}"));
            row.copy_from_slice(&table[id * c..(id + 1) * c]);
            if let Some(update) = update {
                for (x, &u) in row.iter_mut().zip(&update[ti * c..(ti + 1) * c]) {
                    *x += u;
                }
            }
        }
    }
}

pub(super) fn embed_prompt_backward<T: Float>(
    d_prompt: &mut [T],
    d_update: Option<&mut [T]>,
    dout: &[T],
    dims: EmbedPromptDims,
) {
    let EmbedPromptDims { t, p, c, .. } = dims;
    dims.check_backward(
        d_prompt.len(),
        d_update.as_ref().map(|u| u.len()),
        dout.len(),
    );
    d_prompt.fill(T::zero());
    let mut d_update = d_update;
    if let Some(du) = d_update.as_deref_mut() {
        du.fill(T::zero());
    }
    for dout_b in dout.chunks_exact((p + t) * c) {
        let (rows_p, rows_t) = dout_b.split_at(p * c);
        for (d, &g) in d_prompt.iter_mut().zip(rows_p) {
            *d += g;
        }
        if let Some(du) = d_update.as_deref_mut() {
            for (d, &g) in du.iter_mut().zip(rows_t) {
                *d += g;
            }
        }
    }
}

pub(super) fn add_bias<T: Float>(x: &mut [T], bias: &[T], n: usize, f: usize) {
    check_add_bias(x.len(), bias.len(), n, f);
    for row in x.chunks_exact_mut(f) {
        for (v, &bb) in row.iter_mut().zip(bias) {
            *v += bb;
        }
    }
}

pub(super) fn bias_backward<T: Float>(dbias: &mut [T], dout: &[T], n: usize, f: usize) {
    check_bias_backward(dbias.len(), dout.len(), n, f);
    for row in dout.chunks_exact(f) {
        for (d, &g) in dbias.iter_mut().zip(row) {
            *d += g;
        }
    }
}

/// `out (N, C)`, the saved `(mean, rstd)`, each `(N)`, `inp (N, C)`, the parameters
/// `(weight, bias)`, each `(C)`.
pub(super) fn layernorm_forward<T: Float>(
    out: &mut [T],
    (mean, rstd): (&mut [T], &mut [T]),
    inp: &[T],
    (weight, bias): (&[T], &[T]),
    eps: f64,
    dims: LayerNormDims,
) {
    let LayerNormDims { c, .. } = dims;
    dims.check_forward(
        out.len(),
        mean.len(),
        rstd.len(),
        inp.len(),
        weight.len(),
        bias.len(),
    );
    for (i, (x, y)) in inp.chunks_exact(c).zip(out.chunks_exact_mut(c)).enumerate() {
        let mu = x.iter().map(|v| v.f64()).sum::<f64>() / c as f64;
        let var = x.iter().map(|v| (v.f64() - mu).powi(2)).sum::<f64>() / c as f64;
        let r = 1.0 / (var + eps).sqrt();
        mean[i] = T::of(mu);
        rstd[i] = T::of(r);
        for ((yi, &xi), (&w, &bb)) in y.iter_mut().zip(x).zip(weight.iter().zip(bias)) {
            *yi = w * ((xi - mean[i]) * rstd[i]) + bb;
        }
    }
}

/// The gradients `(dinp (N, C), dweight (C), dbias (C))`, `dout, inp (N, C)`, `weight (C)`,
/// the saved `(mean, rstd)`, each `(N)`.
pub(super) fn layernorm_backward<T: Float>(
    (dinp, dweight, dbias): (&mut [T], &mut [T], &mut [T]),
    dout: &[T],
    inp: &[T],
    weight: &[T],
    (mean, rstd): (&[T], &[T]),
    dims: LayerNormDims,
) {
    let LayerNormDims { n, c } = dims;
    let grads = (dinp.len(), dweight.len(), dbias.len());
    dims.check_backward(
        grads,
        dout.len(),
        inp.len(),
        weight.len(),
        (mean.len(), rstd.len()),
    );
    // With x̂ = (x − μ)·r and g = dy ⊙ w: dx = r·(g − mean(g) − x̂·mean(g ⊙ x̂)).
    for i in 0..n {
        let (x, dy) = (&inp[i * c..(i + 1) * c], &dout[i * c..(i + 1) * c]);
        let (mu, r) = (mean[i], rstd[i]);
        let mut mean_g = 0.0;
        let mut mean_gx = 0.0;
        for j in 0..c {
            let xhat = (x[j] - mu) * r;
            let g = dy[j] * weight[j];
            mean_g += g.f64();
            mean_gx += (g * xhat).f64();
            dweight[j] += dy[j] * xhat;
            dbias[j] += dy[j];
        }
        let (mean_g, mean_gx) = (T::of(mean_g / c as f64), T::of(mean_gx / c as f64));
        for j in 0..c {
            let xhat = (x[j] - mu) * r;
            dinp[i * c + j] = r * (dy[j] * weight[j] - mean_g - xhat * mean_gx);
        }
    }
}

pub(super) fn softmax_rows_forward<T: Float>(out: &mut [T], inp: &[T], n: usize, k: usize) {
    check_softmax_rows_forward(out.len(), inp.len(), n, k);
    for (x, y) in inp.chunks_exact(k).zip(out.chunks_exact_mut(k)) {
        let max = x.iter().fold(T::neg_infinity(), |m, &v| max_nan(m, v));
        let sum: f64 = x.iter().map(|&v| (v - max).exp().f64()).sum();
        let lse = max + T::of(sum.ln());
        for (yi, &xi) in y.iter_mut().zip(x) {
            *yi = (xi - lse).exp();
        }
    }
}

pub(super) fn softmax_rows_backward_dinp<T: Float>(
    dinp: &mut [T],
    dout: &[T],
    out: &[T],
    n: usize,
    k: usize,
) {
    check_softmax_rows_backward_dinp(dinp.len(), dout.len(), out.len(), n, k);
    for ((dx, dy), y) in dinp
        .chunks_exact_mut(k)
        .zip(dout.chunks_exact(k))
        .zip(out.chunks_exact(k))
    {
        let dot: T = dy.iter().zip(y).map(|(&g, &v)| g * v).sum();
        for ((d, &g), &v) in dx.iter_mut().zip(dy).zip(y) {
            *d = v * (g - dot);
        }
    }
}

/// `probs (S, M)`: the fusion weights, softmaxed over M (Attend) or over S (Paper).
fn fusion_probs<T: Float>(
    probs: &mut [T],
    ps: &[T],
    lr: &[T],
    mode: FusionMode,
    dims: FusionAttentionDims,
) {
    let FusionAttentionDims { s, m, c } = dims;
    let inv_sqrt_c = 1.0 / (c as f64).sqrt();
    gemm_slices(probs, ps, lr, Gemm::nt(s, m, c).alpha(inv_sqrt_c), false);
    match mode {
        FusionMode::Attend => {
            let scores = probs.to_vec();
            softmax_rows_forward(probs, &scores, s, m);
        }
        FusionMode::Paper => {
            // Softmax of each column j over the prompt axis p.
            for j in 0..m {
                let max = (0..s)
                    .map(|p| probs[p * m + j])
                    .fold(T::neg_infinity(), max_nan);
                let sum: f64 = (0..s).map(|p| (probs[p * m + j] - max).exp().f64()).sum();
                let lse = max + T::of(sum.ln());
                for p in 0..s {
                    probs[p * m + j] = (probs[p * m + j] - lse).exp();
                }
            }
        }
    }
}

pub(super) fn fusion_attention_forward<T: Float>(
    out: &mut [T],
    probs: &mut [T],
    ps: &[T],
    lr: &[T],
    mode: FusionMode,
    dims: FusionAttentionDims,
) {
    let FusionAttentionDims { s, m, c } = dims;
    dims.check_forward(out.len(), probs.len(), ps.len(), lr.len());
    fusion_probs(probs, ps, lr, mode, dims);
    match mode {
        FusionMode::Attend => {
            out.copy_from_slice(ps);
            gemm_slices(out, probs, lr, Gemm::nn(s, c, m).accumulate(true), false);
        }
        FusionMode::Paper => {
            for p in 0..s {
                let g = T::one() + probs[p * m..(p + 1) * m].iter().copied().sum::<T>();
                for j in 0..c {
                    out[p * c + j] = g * ps[p * c + j];
                }
            }
        }
    }
}

/// The gradients `(d_ps (S, C), d_lr (M, C))`, `dout (S, C)`, the forward's
/// `(ps (S, C), lr (M, C), probs (S, M))`.
pub(super) fn fusion_attention_backward<T: Float>(
    (d_ps, d_lr): (&mut [T], &mut [T]),
    dout: &[T],
    (ps, lr, probs): (&[T], &[T], &[T]),
    mode: FusionMode,
    dims: FusionAttentionDims,
) {
    let FusionAttentionDims { s, m, c } = dims;
    dims.check_backward(
        d_ps.len(),
        d_lr.len(),
        dout.len(),
        ps.len(),
        lr.len(),
        probs.len(),
    );
    let inv_sqrt_c = 1.0 / (c as f64).sqrt();
    let mut d_scores = vec![T::zero(); s * m]; // (S, M)
    match mode {
        FusionMode::Attend => {
            // out = ps + W·lr: d lr = Wᵀ·dout, dW = dout·lrᵀ, then the row-softmax backward.
            d_ps.copy_from_slice(dout);
            let t_a = Gemm {
                trans_a: true,
                ..Gemm::nn(m, c, s)
            };
            gemm_slices(d_lr, probs, dout, t_a, false);
            let mut dw = vec![T::zero(); s * m];
            gemm_slices(&mut dw, dout, lr, Gemm::nt(s, m, c), false);
            softmax_rows_backward_dinp(&mut d_scores, &dw, probs, s, m);
        }
        FusionMode::Paper => {
            // out[p] = g[p]·ps[p], g[p] = 1 + Σ_j W'[p, j]: dW'[p, j] = dout[p]·ps[p] for all j,
            // then the column-softmax backward.
            let mut dg = vec![T::zero(); s];
            for p in 0..s {
                let g = T::one() + probs[p * m..(p + 1) * m].iter().copied().sum::<T>();
                for j in 0..c {
                    d_ps[p * c + j] = g * dout[p * c + j];
                }
                dg[p] = (0..c).map(|j| dout[p * c + j] * ps[p * c + j]).sum();
            }
            for j in 0..m {
                let dot: T = (0..s).map(|p| probs[p * m + j] * dg[p]).sum();
                for p in 0..s {
                    d_scores[p * m + j] = probs[p * m + j] * (dg[p] - dot);
                }
            }
            d_lr.fill(T::zero());
        }
    }
    // scores = ps·lrᵀ/√C
    gemm_slices(
        d_ps,
        &d_scores,
        lr,
        Gemm::nn(s, c, m).alpha(inv_sqrt_c).accumulate(true),
        false,
    );
    let t_a = Gemm {
        trans_a: true,
        ..Gemm::nn(m, c, s)
    };
    gemm_slices(
        d_lr,
        &d_scores,
        ps,
        t_a.alpha(inv_sqrt_c).accumulate(true),
        false,
    );
}

pub(super) fn gated_experts_forward<T: Float>(
    out: &mut [T],
    gate: &[T],
    experts: &[&[T]],
    dims: GatedExpertsDims,
) {
    let GatedExpertsDims { n, c } = dims;
    let e = experts.len();
    dims.check_forward(out.len(), gate.len(), experts.iter().map(|x| x.len()));
    out.fill(T::zero());
    for (i, x) in experts.iter().enumerate() {
        for row in 0..n {
            let g = gate[row * e + i];
            for j in 0..c {
                out[row * c + j] += g * x[row * c + j];
            }
        }
    }
}

pub(super) fn gated_experts_backward<T: Float>(
    d_gate: &mut [T],
    d_experts: &mut [&mut [T]],
    dout: &[T],
    gate: &[T],
    experts: &[&[T]],
    dims: GatedExpertsDims,
) {
    let GatedExpertsDims { n, c } = dims;
    let e = experts.len();
    dims.check_backward(
        d_gate.len(),
        d_experts.iter().map(|x| x.len()),
        dout.len(),
        gate.len(),
        experts.iter().map(|x| x.len()),
    );
    for (i, (x, dx)) in experts.iter().zip(d_experts.iter_mut()).enumerate() {
        for row in 0..n {
            let g = gate[row * e + i];
            let (xr, dr) = (&x[row * c..(row + 1) * c], &dout[row * c..(row + 1) * c]);
            d_gate[row * e + i] = xr.iter().zip(dr).map(|(&a, &b)| a * b).sum();
            for (d, &go) in dx[row * c..(row + 1) * c].iter_mut().zip(dr) {
                *d = g * go;
            }
        }
    }
}

/// Averages blocks of `p` consecutive rows: `out (L/p, R)` from `u (L, R)`.
fn pool_rows<T: Float>(u: &[T], l: usize, r: usize, p: usize) -> Vec<T> {
    let mut out = vec![T::zero(); l / p * r];
    let inv = T::of(1.0 / p as f64);
    for (i, row) in u.chunks_exact(r).enumerate() {
        for (o, &x) in out[(i / p) * r..(i / p + 1) * r].iter_mut().zip(row) {
            *o += x * inv;
        }
    }
    out
}

/// `x (N, R) · diag(q²)`.
fn scale_columns_by_square<T: Float>(mut x: Vec<T>, q: &[T]) -> Vec<T> {
    for row in x.chunks_exact_mut(q.len()) {
        for (v, &qq) in row.iter_mut().zip(q) {
            *v *= qq * qq;
        }
    }
    x
}

pub(super) fn lamp_pool_forward<T: Float>(
    out: &mut [T],
    u: &[T],
    q: &[T],
    v: &[T],
    dims: LampPoolDims,
) {
    let LampPoolDims { l, r, c, p } = dims;
    dims.check_forward(out.len(), u.len(), q.len(), v.len());
    let w = scale_columns_by_square(pool_rows(u, l, r, p), q); // (L/p, R)
    gemm_slices(out, &w, v, Gemm::nt(l / p, c, r), false);
}

/// The gradients `(du (L, R), dq (R), dv (C, R))`, `dout (L/p, C)`, the inputs
/// `(u (L, R), q (R), v (C, R))`.
pub(super) fn lamp_pool_backward<T: Float>(
    (du, dq, dv): (&mut [T], &mut [T], &mut [T]),
    dout: &[T],
    (u, q, v): (&[T], &[T], &[T]),
    dims: LampPoolDims,
) {
    let LampPoolDims { l, r, c, p } = dims;
    let grads = (du.len(), dq.len(), dv.len());
    dims.check_backward(grads, dout.len(), (u.len(), q.len(), v.len()));
    let lp = l / p;
    let pooled = pool_rows(u, l, r, p); // (L/p, R)
    let w = scale_columns_by_square(pooled.clone(), q); // (L/p, R)
                                                        // out = w·vᵀ: dw = dout·v (L/p, R), dv += doutᵀ·w (C, R).
    let mut dw = vec![T::zero(); lp * r];
    gemm_slices(&mut dw, dout, v, Gemm::nn(lp, r, c), false);
    let t_a = Gemm {
        trans_a: true,
        ..Gemm::nn(c, r, lp)
    };
    gemm_slices(dv, dout, &w, t_a.accumulate(true), false);
    // w = pooled·diag(q²): dq_k += Σ_i dw[i, k]·pooled[i, k]·2q_k; d pooled = dw·diag(q²).
    let inv = T::of(1.0 / p as f64);
    for k in 0..r {
        let s: T = (0..lp).map(|i| dw[i * r + k] * pooled[i * r + k]).sum();
        dq[k] += T::of(2.0) * q[k] * s;
    }
    for i in 0..l {
        for k in 0..r {
            du[i * r + k] += dw[(i / p) * r + k] * q[k] * q[k] * inv;
        }
    }
}
