// Normalisation: RMSNorm (T5LayerNorm, LlamaRMSNorm). One block per row; the row's statistics
// are reduced over the block in float.
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
INSTANTIATE(rmsnorm_forward, (T * out, T* rstd, const T* inp, const T* weight, int n, int c, float eps),
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
INSTANTIATE(rmsnorm_backward_dinp, (T * dinp, const T* dout, const T* inp, const T* weight, const T* rstd, int n, int c),
            (dinp, dout, inp, weight, rstd, n, c))
