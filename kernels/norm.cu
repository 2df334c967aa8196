// Normalisation: RMSNorm (T5LayerNorm, LlamaRMSNorm), LayerNorm (Residual PT's reparameterisation)
// and the plain row softmax. One block per row; the row's statistics are reduced over the block in
// float.
#include "common.cuh"

// out (N, C) = weight · inp · rstd, rstd (N) = 1 / sqrt(mean(inp²) + eps). Grid (N), any block
// size that is a multiple of 32.
template <typename T>
__device__ void rmsnorm_forward(T* out, T* rstd, const T* inp, const T* weight, int n, int c, float eps) {
    const long row = blockIdx.x;
    if (row >= n) return;
    const T* x = inp + row * c;
    T* y = out + row * c;
    float sum_sq = 0.0f;
    for (int i = threadIdx.x; i < c; i += blockDim.x) {
        float v = to_float(x[i]);
        sum_sq += v * v;
    }
    const float r = rsqrtf(block_sum(sum_sq) / c + eps);
    for (int i = threadIdx.x; i < c; i += blockDim.x) {
        y[i] = from_float<T>(to_float(weight[i]) * (to_float(x[i]) * r));
    }
    if (threadIdx.x == 0) rstd[row] = from_float<T>(r);
}
INSTANTIATE(rmsnorm_forward, ROW_BLOCK, (T * out, T* rstd, const T* inp, const T* weight, int n, int c, float eps),
            (out, rstd, inp, weight, n, c, eps))

// dinp (N, C) += r·w·dout − r³/C · inp · Σ_j w_j·dout_j·inp_j, with r = rstd (N) from the forward.
template <typename T>
__device__ void rmsnorm_backward_dinp(T* dinp, const T* dout, const T* inp, const T* weight, const T* rstd, int n,
                                      int c) {
    const long row = blockIdx.x;
    if (row >= n) return;
    const T* x = inp + row * c;
    const T* dy = dout + row * c;
    T* dx = dinp + row * c;
    float dot = 0.0f;
    for (int i = threadIdx.x; i < c; i += blockDim.x) dot += to_float(dy[i]) * to_float(weight[i]) * to_float(x[i]);
    dot = block_sum(dot);
    const float r = to_float(rstd[row]);
    const float coef = r * r * r * dot / c;
    for (int i = threadIdx.x; i < c; i += blockDim.x) {
        float g = r * to_float(weight[i]) * to_float(dy[i]) - coef * to_float(x[i]);
        dx[i] = from_float<T>(to_float(dx[i]) + g);
    }
}
INSTANTIATE(rmsnorm_backward_dinp, ROW_BLOCK, (T * dinp, const T* dout, const T* inp, const T* weight, const T* rstd, int n, int c),
            (dinp, dout, inp, weight, rstd, n, c))

// LayerNorm: out (N, C) = weight · (inp − μ) · rstd + bias, mean (N) = μ, rstd (N) = 1 / sqrt(var + eps)
// (biased variance, two passes in float). Grid (N) (rows beyond the grid are looped over), any block
// size that is a multiple of 32.
template <typename T>
__device__ void layernorm_forward(T* out, T* mean, T* rstd, const T* inp, const T* weight, const T* bias, int n, int c,
                                  float eps) {
    for (long row = blockIdx.x; row < n; row += gridDim.x) {
        const T* x = inp + row * c;
        T* y = out + row * c;
        float sum = 0.0f;
        for (int i = threadIdx.x; i < c; i += blockDim.x) sum += to_float(x[i]);
        const float mu = block_sum(sum) / c;
        float sum_sq = 0.0f;
        for (int i = threadIdx.x; i < c; i += blockDim.x) {
            const float v = to_float(x[i]) - mu;
            sum_sq += v * v;
        }
        const float r = rsqrtf(block_sum(sum_sq) / c + eps);
        for (int i = threadIdx.x; i < c; i += blockDim.x) {
            y[i] = from_float<T>(to_float(weight[i]) * ((to_float(x[i]) - mu) * r) + to_float(bias[i]));
        }
        if (threadIdx.x == 0) {
            mean[row] = from_float<T>(mu);
            rstd[row] = from_float<T>(r);
        }
    }
}
INSTANTIATE(layernorm_forward, ROW_BLOCK,
            (T * out, T* mean, T* rstd, const T* inp, const T* weight, const T* bias, int n, int c, float eps),
            (out, mean, rstd, inp, weight, bias, n, c, eps))

// dinp (N, C) = r · (g − mean(g) − x̂ · mean(g ⊙ x̂)) with g = dout ⊙ weight, x̂ = (inp − mean) · r,
// mean and r = rstd (N) from the forward (`=`). Grid (N), block a multiple of 32.
template <typename T>
__device__ void layernorm_backward_dinp(T* dinp, const T* dout, const T* inp, const T* weight, const T* mean,
                                        const T* rstd, int n, int c) {
    for (long row = blockIdx.x; row < n; row += gridDim.x) {
        const T* x = inp + row * c;
        const T* dy = dout + row * c;
        T* dx = dinp + row * c;
        const float mu = to_float(mean[row]), r = to_float(rstd[row]);
        float sum_g = 0.0f, sum_gx = 0.0f;
        for (int i = threadIdx.x; i < c; i += blockDim.x) {
            const float g = to_float(dy[i]) * to_float(weight[i]);
            sum_g += g;
            sum_gx += g * ((to_float(x[i]) - mu) * r);
        }
        const float mean_g = block_sum(sum_g) / c;
        const float mean_gx = block_sum(sum_gx) / c;
        for (int i = threadIdx.x; i < c; i += blockDim.x) {
            const float xhat = (to_float(x[i]) - mu) * r;
            dx[i] = from_float<T>(r * (to_float(dy[i]) * to_float(weight[i]) - mean_g - xhat * mean_gx));
        }
    }
}
INSTANTIATE(layernorm_backward_dinp, ROW_BLOCK,
            (T * dinp, const T* dout, const T* inp, const T* weight, const T* mean, const T* rstd, int n, int c),
            (dinp, dout, inp, weight, mean, rstd, n, c))

// dweight (C) += Σ_rows dout ⊙ x̂, dbias (C) += Σ_rows dout, with x̂ = (inp − mean) · rstd; dout, inp
// (N, C), mean, rstd (N). One thread per column (grid-stride), looping over the rows.
template <typename T>
__device__ void layernorm_backward_dweight(T* dweight, T* dbias, const T* dout, const T* inp, const T* mean,
                                           const T* rstd, int n, int c) {
    FOR_EACH_INDEX(col, c) {
        float dw = 0.0f, db = 0.0f;
        for (long row = 0; row < n; row++) {
            const float dy = to_float(dout[row * c + col]);
            const float xhat = (to_float(inp[row * c + col]) - to_float(mean[row])) * to_float(rstd[row]);
            dw += dy * xhat;
            db += dy;
        }
        dweight[col] = from_float<T>(to_float(dweight[col]) + dw);
        dbias[col] = from_float<T>(to_float(dbias[col]) + db);
    }
}
INSTANTIATE(layernorm_backward_dweight, ELEMENTWISE_BLOCK,
            (T * dweight, T* dbias, const T* dout, const T* inp, const T* mean, const T* rstd, int n, int c),
            (dweight, dbias, dout, inp, mean, rstd, n, c))

// out (N, K) = softmax(inp (N, K)) along K, in float (max-subtracted). A row that is entirely −inf
// gets all-zero probabilities; a row holding a NaN gets NaN ones (max_nan). Grid (N), block a multiple of 32.
template <typename T>
__device__ void softmax_rows_forward(T* out, const T* inp, int n, int k) {
    for (long row = blockIdx.x; row < n; row += gridDim.x) {
        const T* x = inp + row * k;
        T* y = out + row * k;
        float m = neg_inf();
        for (int j = threadIdx.x; j < k; j += blockDim.x) m = max_nan(m, to_float(x[j]));
        m = block_max(m);
        float sum = 0.0f;
        if (m != neg_inf()) {
            for (int j = threadIdx.x; j < k; j += blockDim.x) sum += expf(to_float(x[j]) - m);
        }
        sum = block_sum(sum);
        const float inv = m == neg_inf() ? 0.0f : 1.0f / sum;
        for (int j = threadIdx.x; j < k; j += blockDim.x) {
            y[j] = from_float<T>(m == neg_inf() ? 0.0f : expf(to_float(x[j]) - m) * inv);
        }
    }
}
INSTANTIATE(softmax_rows_forward, ROW_BLOCK, (T * out, const T* inp, int n, int k), (out, inp, n, k))

// dinp (N, K) = out ⊙ (dout − Σ_j dout_j · out_j) per row (`=`); out (N, K) from the forward.
// Grid (N), block a multiple of 32.
template <typename T>
__device__ void softmax_rows_backward_dinp(T* dinp, const T* dout, const T* out, int n, int k) {
    for (long row = blockIdx.x; row < n; row += gridDim.x) {
        const T* dy = dout + row * k;
        const T* y = out + row * k;
        T* dx = dinp + row * k;
        float dot = 0.0f;
        for (int j = threadIdx.x; j < k; j += blockDim.x) dot += to_float(dy[j]) * to_float(y[j]);
        dot = block_sum(dot);
        for (int j = threadIdx.x; j < k; j += blockDim.x) {
            dx[j] = from_float<T>(to_float(y[j]) * (to_float(dy[j]) - dot));
        }
    }
}
INSTANTIATE(softmax_rows_backward_dinp, ROW_BLOCK, (T * dinp, const T* dout, const T* out, int n, int k),
            (dinp, dout, out, n, k))
