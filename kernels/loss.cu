// Cross-entropy of the label rows: one block per row (block 128), the row's max and sum of
// exponentials reduced over the block in float.
#include "common.cuh"

// losses (M) = lse(logits[i]) − logits[i, targets[i]], dlogits (M, V) = dloss · (softmax(logits[i])
// − onehot(targets[i])); logits (M, V), targets (M). A target outside 0..V writes NaN to the loss
// and to the row of dlogits. Grid (M), any block size that is a multiple of 32.
template <typename T>
__device__ void cross_entropy_forward_backward(T* losses, T* dlogits, const T* logits, const int* targets, int m,
                                               int v, float dloss) {
    const long row = blockIdx.x;
    if (row >= m) return;
    const T* x = logits + row * v;
    T* dx = dlogits + row * v;
    const int target = targets[row];
    if (target < 0 || target >= v) {  // uniform over the block: no thread reaches a barrier
        const float qnan = __int_as_float(0x7fc00000);
        for (int j = threadIdx.x; j < v; j += blockDim.x) dx[j] = from_float<T>(qnan);
        if (threadIdx.x == 0) losses[row] = from_float<T>(qnan);
        return;
    }
    float mx = neg_inf();
    for (int j = threadIdx.x; j < v; j += blockDim.x) mx = max_nan(mx, to_float(x[j]));
    mx = block_max(mx);
    float sum = 0.0f;
    for (int j = threadIdx.x; j < v; j += blockDim.x) sum += expf(to_float(x[j]) - mx);
    const float lse = mx + logf(block_sum(sum));
    for (int j = threadIdx.x; j < v; j += blockDim.x) {
        const float prob = expf(to_float(x[j]) - lse);
        dx[j] = from_float<T>(dloss * (prob - (j == target ? 1.0f : 0.0f)));
    }
    if (threadIdx.x == 0) losses[row] = from_float<T>(lse - to_float(x[target]));
}
INSTANTIATE(cross_entropy_forward_backward, ROW_BLOCK,
            (T * losses, T* dlogits, const T* logits, const int* targets, int m, int v, float dloss),
            (losses, dlogits, logits, targets, m, v, dloss))
