// Row ops: embedding lookups (gather), their gradient (scatter-add into distinct rows, so no
// atomics), and the encoder input of a prompt-tuned step. One block per output row (block 128)
// except embed_prompt_backward, a grid-stride loop over its outputs (block 256).
// A row index outside the table writes a NaN row (visible downstream) instead of reading out of
// bounds; the gradient of such a row is dropped.
#include "common.cuh"

__device__ __forceinline__ float embed_nan() { return __int_as_float(0x7fc00000); }

// out (M, C): out[i] = table[rows[i]], table (R, C), rows (M). Grid (M).
template <typename T>
__device__ void gather_rows(T* out, const T* table, const int* rows, int m, int c, int r) {
    const long i = blockIdx.x;
    if (i >= m) return;
    const int row = rows[i];
    T* dst = out + i * c;
    if (row < 0 || row >= r) {
        for (int k = threadIdx.x; k < c; k += blockDim.x) dst[k] = from_float<T>(embed_nan());
        return;
    }
    const T* src = table + (long)row * c;
    for (int k = threadIdx.x; k < c; k += blockDim.x) dst[k] = src[k];
}
INSTANTIATE(gather_rows, ROW_BLOCK, (T * out, const T* table, const int* rows, int m, int c, int r),
            (out, table, rows, m, c, r))

// dtable (R, C): dtable[rows[i]] += dout[i], dout (M, C), rows (M) distinct. Grid (M).
template <typename T>
__device__ void scatter_rows_add(T* dtable, const T* dout, const int* rows, int m, int c, int r) {
    const long i = blockIdx.x;
    if (i >= m) return;
    const int row = rows[i];
    if (row < 0 || row >= r) return;
    T* dst = dtable + (long)row * c;
    const T* src = dout + i * c;
    for (int k = threadIdx.x; k < c; k += blockDim.x) dst[k] = from_float<T>(to_float(dst[k]) + to_float(src[k]));
}
INSTANTIATE(scatter_rows_add, ROW_BLOCK, (T * dtable, const T* dout, const int* rows, int m, int c, int r),
            (dtable, dout, rows, m, c, r))

// out (B, P+T, C): row (b, j) is prompt[j] for j < P, else table[ids[b, j-P]] (+ update[j-P] when
// update is not null). table (R, C), ids (B, T), prompt (P, C), update (M ≥ T, C). Grid (B·(P+T)).
template <typename T>
__device__ void embed_prompt_forward(T* out, const T* table, const int* ids, const T* prompt, const T* update, int b,
                                     int t, int p, int c, int r) {
    const long row = blockIdx.x;
    if (row >= (long)b * (p + t)) return;
    const long bi = row / (p + t);
    const int j = (int)(row % (p + t));
    T* dst = out + row * c;
    if (j < p) {
        const T* src = prompt + (long)j * c;
        for (int k = threadIdx.x; k < c; k += blockDim.x) dst[k] = src[k];
        return;
    }
    const int ti = j - p;
    const int id = ids[bi * t + ti];
    if (id < 0 || id >= r) {
        for (int k = threadIdx.x; k < c; k += blockDim.x) dst[k] = from_float<T>(embed_nan());
        return;
    }
    const T* src = table + (long)id * c;
    if (update != nullptr) {
        const T* u = update + (long)ti * c;
        for (int k = threadIdx.x; k < c; k += blockDim.x) dst[k] = from_float<T>(to_float(src[k]) + to_float(u[k]));
    } else {
        for (int k = threadIdx.x; k < c; k += blockDim.x) dst[k] = src[k];
    }
}
INSTANTIATE(embed_prompt_forward, ROW_BLOCK,
            (T * out, const T* table, const int* ids, const T* prompt, const T* update, int b, int t, int p, int c,
             int r),
            (out, table, ids, prompt, update, b, t, p, c, r))

// Backward of embed_prompt_forward (`=`): d_prompt (P, C) = Σ_b dout[b, j] for j < P; when
// d_update (M ≥ T, C) is not null, its rows < T get Σ_b dout[b, P + row] and rows T..M zero.
// dout (B, P+T, C). Grid-stride over the (P+M)·C outputs, each summing over B in float.
template <typename T>
__device__ void embed_prompt_backward(T* d_prompt, T* d_update, const T* dout, int b, int t, int p, int c, int m) {
    const long rows = d_update != nullptr ? (long)p + m : (long)p;
    const long stride = (long)(p + t) * c;
    FOR_EACH_INDEX(i, rows * c) {
        const long row = i / c, k = i % c;
        if (row < p) {
            float sum = 0.0f;
            for (long bi = 0; bi < b; bi++) sum += to_float(dout[bi * stride + row * c + k]);
            d_prompt[i] = from_float<T>(sum);
        } else {
            const long u = row - p;
            float sum = 0.0f;
            if (u < t)
                for (long bi = 0; bi < b; bi++) sum += to_float(dout[bi * stride + (p + u) * c + k]);
            d_update[u * c + k] = from_float<T>(sum);
        }
    }
}
INSTANTIATE(embed_prompt_backward, ELEMENTWISE_BLOCK, (T * d_prompt, T* d_update, const T* dout, int b, int t, int p, int c, int m),
            (d_prompt, d_update, dout, b, t, p, c, m))
