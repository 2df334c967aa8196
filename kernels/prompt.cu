// The prompt methods' own ops, around cuBLAS GEMMs (src/backend/gpu/mod.rs sequences them):
// EPT-MS's prompt fusion (the column softmax and the per-row scale of its "paper" reading) and its
// gated multi-space experts, and LAMP's pooled compressed outer product. These tensors are small
// (S, M ≤ a few hundred rows of C ≤ 8k), so the kernels favour one pass over their bytes and no
// atomics over occupancy; docs/kernels.md gives their floors.
#include "common.cuh"

// The backward of `y = g·x` for one row of C, by one block: dx (C) = g·dy, and returns
// Σ dy ⊙ x, the gradient of g, to every thread (block_sum: every thread must call it).
template <typename T>
__device__ __forceinline__ float scale_row_and_dot(T* dx, const T* dy, const T* x, float g, int c) {
    float dot = 0.0f;
    for (int k = threadIdx.x; k < c; k += blockDim.x) {
        const float d = to_float(dy[k]);
        dx[k] = from_float<T>(g * d);
        dot += d * to_float(x[k]);
    }
    return block_sum(dot);
}

// ---- EPT-MS prompt fusion ------------------------------------------------------------------------

// out (N, K): the softmax of each column of inp (N, K) over its N rows. One thread per column
// (grid-stride), three passes over the column; reads of a row are coalesced across threads.
template <typename T>
__device__ void softmax_cols_forward(T* out, const T* inp, int n, int k) {
    FOR_EACH_INDEX(j, k) {
        float mx = neg_inf();
        for (long i = 0; i < n; i++) mx = max_nan(mx, to_float(inp[i * k + j]));
        float sum = 0.0f;
        for (long i = 0; i < n; i++) sum += expf(to_float(inp[i * k + j]) - mx);
        const float lse = mx + logf(sum);
        for (long i = 0; i < n; i++) out[i * k + j] = from_float<T>(expf(to_float(inp[i * k + j]) - lse));
    }
}
INSTANTIATE(softmax_cols_forward, ELEMENTWISE_BLOCK, (T * out, const T* inp, int n, int k), (out, inp, n, k))

// g = 1 + Σ_j probs[p, j], the scale of prompt row p in the "paper" fusion. Every thread of the
// block must call it (block_sum).
template <typename T>
__device__ __forceinline__ float fusion_paper_scale(const T* probs, long p, int m) {
    float part = 0.0f;
    for (int j = threadIdx.x; j < m; j += blockDim.x) part += to_float(probs[p * m + j]);
    return 1.0f + block_sum(part);
}

// The "paper" fusion: out[p] = (1 + Σ_j probs[p, j]) · ps[p]. out, ps (S, C), probs (S, M).
// One block per prompt row.
template <typename T>
__device__ void fusion_paper_forward(T* out, const T* ps, const T* probs, int s, int m, int c) {
    const long p = blockIdx.x;
    if (p >= s) return;
    const float g = fusion_paper_scale(probs, p, m);
    for (int k = threadIdx.x; k < c; k += blockDim.x) out[p * c + k] = from_float<T>(g * to_float(ps[p * c + k]));
}
INSTANTIATE(fusion_paper_forward, ROW_BLOCK, (T * out, const T* ps, const T* probs, int s, int m, int c),
            (out, ps, probs, s, m, c))

// Backward of fusion_paper_forward, row part (`=`): d_ps[p] = g[p]·dout[p] (the direct path; the
// scores' path is added by a GEMM later) and dg[p] = dout[p]·ps[p], the gradient of the scale.
// d_ps, dout, ps (S, C), dg (S), probs (S, M). One block per prompt row.
template <typename T>
__device__ void fusion_paper_backward_rows(T* d_ps, T* dg, const T* dout, const T* ps, const T* probs, int s, int m,
                                           int c) {
    const long p = blockIdx.x;
    if (p >= s) return;
    const float g = fusion_paper_scale(probs, p, m);
    const float dot = scale_row_and_dot(d_ps + p * c, dout + p * c, ps + p * c, g, c);
    if (threadIdx.x == 0) dg[p] = from_float<T>(dot);
}
INSTANTIATE(fusion_paper_backward_rows, ROW_BLOCK,
            (T * d_ps, T* dg, const T* dout, const T* ps, const T* probs, int s, int m, int c),
            (d_ps, dg, dout, ps, probs, s, m, c))

// Backward of fusion_paper_forward, column part (`=`): every score of row p receives dg[p], so the
// column-softmax backward is d_scores[p, j] = probs[p, j]·(dg[p] − Σ_q probs[q, j]·dg[q]).
// d_scores, probs (S, M), dg (S). One thread per column.
template <typename T>
__device__ void fusion_paper_backward_cols(T* d_scores, const T* probs, const T* dg, int s, int m) {
    FOR_EACH_INDEX(j, m) {
        float dot = 0.0f;
        for (long p = 0; p < s; p++) dot += to_float(probs[p * m + j]) * to_float(dg[p]);
        for (long p = 0; p < s; p++) {
            const float w = to_float(probs[p * m + j]);
            d_scores[p * m + j] = from_float<T>(w * (to_float(dg[p]) - dot));
        }
    }
}
INSTANTIATE(fusion_paper_backward_cols, ELEMENTWISE_BLOCK, (T * d_scores, const T* probs, const T* dg, int s, int m),
            (d_scores, probs, dg, s, m))

// ---- EPT-MS gated experts ------------------------------------------------------------------------

// One expert's share of the gated sum: out (N, C) (= when first, else +=) gate[:, i] ⊙ x, with
// gate (N, E) and x (N, C) expert i. One launch per expert: the experts are separate tensors and
// E is small, so the extra reads of `out` (E−1 of them) cost less than gathering pointers.
template <typename T>
__device__ void gated_experts_forward_one(T* out, const T* gate, const T* x, int i, int e, int n, int c, int first) {
    FOR_EACH_INDEX(idx, (long)n * c) {
        const long row = idx / c;
        const float v = to_float(gate[row * e + i]) * to_float(x[idx]);
        out[idx] = from_float<T>(first ? v : to_float(out[idx]) + v);
    }
}
INSTANTIATE(gated_experts_forward_one, ELEMENTWISE_BLOCK, (T * out, const T* gate, const T* x, int i, int e, int n, int c, int first),
            (out, gate, x, i, e, n, c, first))

// Backward for expert i (`=`): d_x (N, C) = gate[:, i] ⊙ dout, d_gate[:, i] (column of (N, E)) =
// rowsum(x ⊙ dout). One block per row.
template <typename T>
__device__ void gated_experts_backward_one(T* d_gate, T* d_x, const T* dout, const T* gate, const T* x, int i, int e,
                                           int n, int c) {
    const long row = blockIdx.x;
    if (row >= n) return;
    const float g = to_float(gate[row * e + i]);
    const float dot = scale_row_and_dot(d_x + row * c, dout + row * c, x + row * c, g, c);
    if (threadIdx.x == 0) d_gate[row * e + i] = from_float<T>(dot);
}
INSTANTIATE(gated_experts_backward_one, ROW_BLOCK,
            (T * d_gate, T* d_x, const T* dout, const T* gate, const T* x, int i, int e, int n, int c),
            (d_gate, d_x, dout, gate, x, i, e, n, c))

// ---- LAMP pooling ----------------------------------------------------------------------------------

// w (L/p, R) = pool_p(u)·diag(q²): the mean of each block of p rows of u (L, R), each column k
// scaled by q[k]². The GEMM w·vᵀ that follows gives LAMP's prompt rows. Grid-stride.
template <typename T>
__device__ void lamp_pool_scale(T* w, const T* u, const T* q, int l, int r, int p) {
    const long lp = l / p;
    FOR_EACH_INDEX(idx, lp * r) {
        const long i = idx / r, k = idx % r;
        float sum = 0.0f;
        for (long j = 0; j < p; j++) sum += to_float(u[(i * p + j) * r + k]);
        const float qk = to_float(q[k]);
        w[idx] = from_float<T>(sum / (float)p * qk * qk);
    }
}
INSTANTIATE(lamp_pool_scale, ELEMENTWISE_BLOCK, (T * w, const T* u, const T* q, int l, int r, int p), (w, u, q, l, r, p))

// Backward of lamp_pool_scale into u (+=): du[i, k] += dw[i/p, k]·q[k]²/p. du, u (L, R),
// dw (L/p, R). Grid-stride.
template <typename T>
__device__ void lamp_pool_backward_du(T* du, const T* dw, const T* q, int l, int r, int p) {
    FOR_EACH_INDEX(idx, (long)l * r) {
        const long i = idx / r, k = idx % r;
        const float qk = to_float(q[k]);
        const float g = to_float(dw[(i / p) * r + k]) * qk * qk / (float)p;
        du[idx] = from_float<T>(to_float(du[idx]) + g);
    }
}
INSTANTIATE(lamp_pool_backward_du, ELEMENTWISE_BLOCK, (T * du, const T* dw, const T* q, int l, int r, int p), (du, dw, q, l, r, p))

// Backward of lamp_pool_scale into q (+=): dq[k] += 2·q[k]·Σ_i dw[i, k]·pool_p(u)[i, k].
// dq, q (R), dw (L/p, R), u (L, R). One thread per column k.
template <typename T>
__device__ void lamp_pool_backward_dq(T* dq, const T* dw, const T* u, const T* q, int l, int r, int p) {
    const long lp = l / p;
    FOR_EACH_INDEX(k, r) {
        float s = 0.0f;
        for (long i = 0; i < lp; i++) {
            float pooled = 0.0f;
            for (long j = 0; j < p; j++) pooled += to_float(u[(i * p + j) * r + k]);
            s += to_float(dw[i * r + k]) * pooled / (float)p;
        }
        dq[k] = from_float<T>(to_float(dq[k]) + 2.0f * to_float(q[k]) * s);
    }
}
INSTANTIATE(lamp_pool_backward_dq, ELEMENTWISE_BLOCK, (T * dq, const T* dw, const T* u, const T* q, int l, int r, int p),
            (dq, dw, u, q, l, r, p))
