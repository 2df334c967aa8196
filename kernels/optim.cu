// The optimiser: AdamW, and the per-block partial sums of squares for the global gradient norm.
// Grid-stride loops, block 256.
#include "common.cuh"

// One AdamW step in place on param, m, v (n): with g = grad_scale · grad,
// m = β1·m + (1−β1)·g, v = β2·v + (1−β2)·g², param −= lr·((m/bc1)/(√(v/bc2) + eps) + wd·param).
// bc1 = 1 − β1^t, bc2 = 1 − β2^t come from the host (computed in f64).
template <typename T>
__device__ void adamw_step(T* param, T* m, T* v, const T* grad, int n, float lr, float beta1, float beta2, float eps,
                           float weight_decay, float bc1, float bc2, float grad_scale) {
    FOR_EACH_INDEX(i, n) {
        const float g = grad_scale * to_float(grad[i]);
        const float mi = beta1 * to_float(m[i]) + (1.0f - beta1) * g;
        const float vi = beta2 * to_float(v[i]) + (1.0f - beta2) * g * g;
        const float p = to_float(param[i]);
        const float update = (mi / bc1) / (sqrtf(vi / bc2) + eps) + weight_decay * p;
        param[i] = from_float<T>(p - lr * update);
        m[i] = from_float<T>(mi);
        v[i] = from_float<T>(vi);
    }
}
INSTANTIATE(adamw_step,
            (T * param, T* m, T* v, const T* grad, int n, float lr, float beta1, float beta2, float eps,
             float weight_decay, float bc1, float bc2, float grad_scale),
            (param, m, v, grad, n, lr, beta1, beta2, eps, weight_decay, bc1, bc2, grad_scale))

// partial (gridDim.x, f32 whatever T is): partial[block] = Σ x² over the block's grid-stride share
// of x (n). The host sums the partials in f64. Block size a multiple of 32.
template <typename T>
__device__ void sum_squares(float* partial, const T* x, int n) {
    float sum = 0.0f;
    FOR_EACH_INDEX(i, n) {
        const float xi = to_float(x[i]);
        sum += xi * xi;
    }
    sum = block_sum(sum);
    if (threadIdx.x == 0) partial[blockIdx.x] = sum;
}
INSTANTIATE(sum_squares, (float* partial, const T* x, int n), (partial, x, n))
