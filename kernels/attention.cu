// Attention (first version, see src/backend/gpu/mod.rs): the scores `scale·q·kᵀ (B, H, T, S)` come
// from batched GEMMs; these kernels mask them, add the T5 relative bias and take the softmax in
// place, and take the backward of that softmax. One block per score row, in float.
#include "common.cuh"

// The score of key j in row i of head hh of batch entry bi, masked and biased: −inf when the key is
// padding (key_mask_row[j] == 0) or in the future (causal && j > i), else the stored score plus
// bias_table[rel_buckets[j − i + t − 1] · h + hh] when bias_table is non-null.
template <typename T>
__device__ __forceinline__ float attention_masked_score(const T* scores_row, const int* key_mask_row,
                                                        const T* bias_table, const int* rel_buckets, int h, int hh,
                                                        int t, int i, int j, int causal) {
    if (key_mask_row[j] == 0 || (causal && j > i)) return neg_inf();
    float v = to_float(scores_row[j]);
    if (bias_table) v += to_float(bias_table[(long)rel_buckets[j - i + t - 1] * h + hh]);
    return v;
}

// scores (B, H, T, S): in place, the probabilities softmax(scores + bias + mask) of each row;
// lse (B, H, T) = log Σ_j exp(score_j) over the visible keys, −inf for a row with no visible key
// (whose probabilities are then all 0). key_mask (B, S) 1 = visible; bias_table (num_buckets, H)
// or null; rel_buckets (T + S − 1), entry j − i + T − 1 = bucket of key j for query i (null without
// bias); causal: query i sees keys j ≤ i only. Grid (B·H·T) (further rows looped over), block a
// multiple of 32.
template <typename T>
__device__ void attention_softmax_forward(T* scores, T* lse, const int* key_mask, const T* bias_table,
                                          const int* rel_buckets, int b, int h, int t, int s, int causal) {
    const long rows = (long)b * h * t;
    for (long row = blockIdx.x; row < rows; row += gridDim.x) {
        const int i = (int)(row % t);
        const int hh = (int)((row / t) % h);
        const long bi = row / ((long)t * h);
        T* x = scores + row * s;
        const int* km = key_mask + bi * s;
        float m = neg_inf();
        for (int j = threadIdx.x; j < s; j += blockDim.x) {
            m = fmaxf(m, attention_masked_score(x, km, bias_table, rel_buckets, h, hh, t, i, j, causal));
        }
        m = block_max(m);
        float sum = 0.0f;
        if (m != neg_inf()) {
            for (int j = threadIdx.x; j < s; j += blockDim.x) {
                sum += expf(attention_masked_score(x, km, bias_table, rel_buckets, h, hh, t, i, j, causal) - m);
            }
        }
        sum = block_sum(sum);
        const float row_lse = m == neg_inf() ? neg_inf() : m + logf(sum);
        // Each thread rewrites only the entries it read above: no barrier needed before the writes.
        for (int j = threadIdx.x; j < s; j += blockDim.x) {
            const float v = attention_masked_score(x, km, bias_table, rel_buckets, h, hh, t, i, j, causal);
            x[j] = from_float<T>(v == neg_inf() || row_lse == neg_inf() ? 0.0f : expf(v - row_lse));
        }
        if (threadIdx.x == 0) lse[row] = from_float<T>(row_lse);
    }
}
INSTANTIATE(attention_softmax_forward,
            (T * scores, T* lse, const int* key_mask, const T* bias_table, const int* rel_buckets, int b, int h, int t,
             int s, int causal),
            (scores, lse, key_mask, bias_table, rel_buckets, b, h, t, s, causal))

// dscores (rows, S): in place, dS = P ⊙ (dP − Σ_j P_j · dP_j) with dP the incoming dscores and
// P = probs (rows, S) from the forward. Grid (rows) (further rows looped over), block a multiple
// of 32.
template <typename T>
__device__ void attention_softmax_backward(T* dscores, const T* probs, int rows, int s) {
    for (long row = blockIdx.x; row < rows; row += gridDim.x) {
        T* ds = dscores + row * s;
        const T* p = probs + row * s;
        float dot = 0.0f;
        for (int j = threadIdx.x; j < s; j += blockDim.x) dot += to_float(p[j]) * to_float(ds[j]);
        dot = block_sum(dot);
        for (int j = threadIdx.x; j < s; j += blockDim.x) {
            ds[j] = from_float<T>(to_float(p[j]) * (to_float(ds[j]) - dot));
        }
    }
}
INSTANTIATE(attention_softmax_backward, (T * dscores, const T* probs, int rows, int s), (dscores, probs, rows, s))
