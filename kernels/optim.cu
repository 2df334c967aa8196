// The optimiser: AdamW, and the per-block partial sums of squares for the global gradient norm.
// Grid-stride loops, block 256.
#include "common.cuh"

// One AdamW step in place on the f32 state master, m, v (n) and the parameter param (n, storage
// dtype): with g = grad_scale · grad, m = β1·m + (1−β1)·g, v = β2·v + (1−β2)·g²,
// master −= lr·((m/bc1)/(√(v/bc2) + eps) + wd·master), param = master (rounded). The state stays
// f32 so that updates below bf16's resolution accumulate instead of rounding away.
// bc1 = 1 − β1^t, bc2 = 1 − β2^t come from the host (computed in f64).
template <typename T>
__device__ void adamw_step(T* param, float* master, float* m, float* v, const T* grad, int n, float lr, float beta1,
                           float beta2, float eps, float weight_decay, float bc1, float bc2, float grad_scale) {
    FOR_EACH_INDEX(i, n) {
        const float g = grad_scale * to_float(grad[i]);
        const float mi = beta1 * m[i] + (1.0f - beta1) * g;
        const float vi = beta2 * v[i] + (1.0f - beta2) * g * g;
        const float p = master[i];
        const float update = (mi / bc1) / (sqrtf(vi / bc2) + eps) + weight_decay * p;
        const float next = p - lr * update;
        master[i] = next;
        param[i] = from_float<T>(next);
        m[i] = mi;
        v[i] = vi;
    }
}
INSTANTIATE(adamw_step, ELEMENTWISE_BLOCK,
            (T * param, float* master, float* m, float* v, const T* grad, int n, float lr, float beta1, float beta2,
             float eps, float weight_decay, float bc1, float bc2, float grad_scale),
            (param, master, m, v, grad, n, lr, beta1, beta2, eps, weight_decay, bc1, bc2, grad_scale))

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
INSTANTIATE(sum_squares, ELEMENTWISE_BLOCK, (float* partial, const T* x, int n), (partial, x, n))
