// Kernels that exercise the virtual GPU's shim itself (barriers, shared memory, warp shuffles,
// votes, deadlock detection); src/backend/gpu/tests/shim.rs runs them. They compile for the real
// GPU too, so the shim and CUDA agree on the language they accept.
#include "common.cuh"

// out[i] = inp[n-1-i] within each block of 256 threads: needs a working __syncthreads and
// static shared memory that belongs to the block.
template <typename T>
__device__ void selftest_reverse(T* out, const T* inp, int n) {
    SHARED(float, tile, 256);
    const int base = blockIdx.x * 256, i = threadIdx.x;
    const int len = n - base < 256 ? n - base : 256;
    if (i < len) tile[i] = to_float(inp[base + i]);
    __syncthreads();
    if (i < len) out[base + i] = from_float<T>(tile[len - 1 - i]);
}
INSTANTIATE(selftest_reverse, 256, (T * out, const T* inp, int n), (out, inp, n))

// Per block: out[3·block] = block_sum, out[3·block+1] = block_max, out[3·block+2] = the sum of
// lane values gathered with __shfl_down_sync (warp 0 only), over one value per thread
// (threads past n contribute 0 to the sums and -inf to the maximum).
template <typename T>
__device__ void selftest_reduce(float* out, const T* inp, int n) {
    const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    const float v = i < n ? to_float(inp[i]) : 0.0f;
    const float s = block_sum(v);
    const float m = block_max(i < n ? v : neg_inf());
    float d = v;
    if (threadIdx.x < 32) {
        for (int offset = 16; offset > 0; offset /= 2) d += __shfl_down_sync(0xffffffffu, d, offset);
    }
    if (threadIdx.x == 0) {
        out[3 * blockIdx.x] = s;
        out[3 * blockIdx.x + 1] = m;
        out[3 * blockIdx.x + 2] = d;
    }
}
INSTANTIATE(selftest_reduce, 128, (float* out, const T* inp, int n), (out, inp, n))

// out[i] = number of lanes in i's warp whose input is positive (__ballot_sync + __popc-free
// count), written through dynamic shared memory sized by the launch.
template <typename T>
__device__ void selftest_ballot(int* out, const T* inp, int n) {
    DYNAMIC_SMEM(int, counts);
    const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    const bool pos = i < n && to_float(inp[i]) > 0.0f;
    const unsigned bits = __ballot_sync(0xffffffffu, pos);
    int count = 0;
    for (int b = 0; b < 32; b++) count += (bits >> b) & 1u;
    counts[threadIdx.x] = count;
    __syncthreads();
    if (i < n) out[i] = counts[threadIdx.x];
}
INSTANTIATE(selftest_ballot, 128, (int* out, const T* inp, int n), (out, inp, n))

// Deliberately broken: lane 0 of each warp waits in a shuffle while the other threads wait at
// __syncthreads. Never launched on a real GPU; the virtual GPU must report a deadlock.
template <typename T>
__device__ void selftest_deadlock(T* out, int n) {
    if (threadIdx.x % 32 == 0) {
        out[0] = from_float<T>(__shfl_sync(0xffffffffu, 1.0f, 1));
    } else {
        __syncthreads();
    }
}
INSTANTIATE(selftest_deadlock, 64, (T * out, int n), (out, n))

// One tensor-core step: d (16, 8) = a (16, 16)·b (16, 8) + c (16, 8), all row-major f32 in global
// memory, a and b rounded to bf16; fragments built with the layout common.cuh documents. One
// warp. Checks that layout (and, on the virtual GPU, the emulation) against a plain product.
template <typename T>
__device__ void selftest_mma(float* d, const float* a, const float* b, const float* c) {
    const int lane = threadIdx.x % 32, g = lane / 4, q = lane % 4;
    const unsigned fa[4] = {pack_bf16(a[g * 16 + 2 * q], a[g * 16 + 2 * q + 1]),
                            pack_bf16(a[(g + 8) * 16 + 2 * q], a[(g + 8) * 16 + 2 * q + 1]),
                            pack_bf16(a[g * 16 + 2 * q + 8], a[g * 16 + 2 * q + 9]),
                            pack_bf16(a[(g + 8) * 16 + 2 * q + 8], a[(g + 8) * 16 + 2 * q + 9])};
    const unsigned fb[2] = {pack_bf16(b[(2 * q) * 8 + g], b[(2 * q + 1) * 8 + g]),
                            pack_bf16(b[(2 * q + 8) * 8 + g], b[(2 * q + 9) * 8 + g])};
    float acc[4];
    for (int e = 0; e < 4; e++) acc[e] = c[(g + 8 * (e / 2)) * 8 + 2 * q + (e & 1)];
    mma_m16n8k16_bf16(acc, fa, fb, acc);
    for (int e = 0; e < 4; e++) d[(g + 8 * (e / 2)) * 8 + 2 * q + (e & 1)] = acc[e];
}
INSTANTIATE(selftest_mma, 32, (float* d, const float* a, const float* b, const float* c), (d, a, b, c))

// out[block] = the first element of a static shared array as the block finds it, then the block
// writes 1 there. The virtual GPU poisons static shared memory at each block's start, so every
// block must read NaN (the hardware gives no promise either way: never read before writing).
template <typename T>
__device__ void selftest_static_poison(T* out, int n) {
    SHARED(float, cell, 1);
    if (threadIdx.x == 0 && (int)blockIdx.x < n) {
        out[blockIdx.x] = from_float<T>(cell[0]);
        cell[0] = 1.0f;
    }
}
INSTANTIATE(selftest_static_poison, 32, (T * out, int n), (out, n))
