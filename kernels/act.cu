// Elementwise ops: residual adds, biases, and the (gated) activations of feed-forward blocks.
// Grid-stride loops over the elements (block 256); the bias gradient runs one thread per column.
#include "common.cuh"

// dst (N) += src (N).
template <typename T>
__device__ void add_assign(T* dst, const T* src, int n) {
    FOR_EACH_INDEX(i, n) dst[i] = from_float<T>(to_float(dst[i]) + to_float(src[i]));
}
INSTANTIATE(add_assign, ELEMENTWISE_BLOCK, (T * dst, const T* src, int n), (dst, src, n))

// x (N, F) += bias (F) on every row.
template <typename T>
__device__ void add_bias(T* x, const T* bias, int n, int f) {
    FOR_EACH_INDEX(i, (long)n * f) x[i] = from_float<T>(to_float(x[i]) + to_float(bias[i % f]));
}
INSTANTIATE(add_bias, ELEMENTWISE_BLOCK, (T * x, const T* bias, int n, int f), (x, bias, n, f))

// dbias (F) += Σ_rows dout (N, F). One thread per column (grid-stride over the columns), the rows
// summed in float.
template <typename T>
__device__ void bias_backward(T* dbias, const T* dout, int n, int f) {
    FOR_EACH_INDEX(col, f) {
        float sum = 0.0f;
        for (long row = 0; row < n; row++) sum += to_float(dout[row * f + col]);
        dbias[col] = from_float<T>(to_float(dbias[col]) + sum);
    }
}
INSTANTIATE(bias_backward, ELEMENTWISE_BLOCK, (T * dbias, const T* dout, int n, int f), (dbias, dout, n, f))

// Activation codes, as the backend passes them: 0 ReLU, 1 GELU (tanh approximation, HF's
// gelu_new), 2 SiLU. The constants of src/backend/cpu/mod.rs `activation`.
#define ACT_GELU_C 0.7978845608028654f  // sqrt(2/pi)
#define ACT_GELU_K 0.044715f

__device__ __forceinline__ float act_apply(int act, float x) {
    if (act == 0) return x <= 0.0f ? 0.0f : x;  // NaN stays NaN, as torch.relu
    if (act == 1) {
        const float u = ACT_GELU_C * (x + ACT_GELU_K * x * x * x);
        return 0.5f * x * (1.0f + tanhf(u));
    }
    return x / (1.0f + expf(-x));
}

// d act(x) / dx; ReLU's derivative at 0 is 0 (PyTorch), at NaN NaN (a NaN input never gives a
// finite gradient).
__device__ __forceinline__ float act_grad(int act, float x) {
    if (act == 0) return x > 0.0f ? 1.0f : (x != x ? x : 0.0f);
    if (act == 1) {
        const float u = ACT_GELU_C * (x + ACT_GELU_K * x * x * x);
        const float th = tanhf(u);
        const float du = ACT_GELU_C * (1.0f + 3.0f * ACT_GELU_K * x * x);
        return 0.5f * (1.0f + th) + 0.5f * x * (1.0f - th * th) * du;
    }
    const float sig = 1.0f / (1.0f + expf(-x));
    return sig * (1.0f + x * (1.0f - sig));
}

// out (len) = act(a) · gate, or act(a) when gate is null.
template <typename T>
__device__ void gated_act_forward(T* out, const T* a, const T* gate, int len, int act) {
    FOR_EACH_INDEX(i, len) {
        float y = act_apply(act, to_float(a[i]));
        if (gate != nullptr) y *= to_float(gate[i]);
        out[i] = from_float<T>(y);
    }
}
INSTANTIATE(gated_act_forward, ELEMENTWISE_BLOCK, (T * out, const T* a, const T* gate, int len, int act), (out, a, gate, len, act))

// da (len) = dout · gate · act'(a) (dout · act'(a) without gate); dgate (len) = dout · act(a)
// when dgate is not null. Both `=`.
template <typename T>
__device__ void gated_act_backward_dinp(T* da, T* dgate, const T* dout, const T* a, const T* gate, int len,
                                        int act) {
    FOR_EACH_INDEX(i, len) {
        const float x = to_float(a[i]), dy = to_float(dout[i]);
        const float g = gate != nullptr ? to_float(gate[i]) : 1.0f;
        da[i] = from_float<T>(dy * g * act_grad(act, x));
        if (dgate != nullptr) dgate[i] = from_float<T>(dy * act_apply(act, x));
    }
}
INSTANTIATE(gated_act_backward_dinp, ELEMENTWISE_BLOCK,
            (T * da, T* dgate, const T* dout, const T* a, const T* gate, int len, int act),
            (da, dgate, dout, a, gate, len, act))
