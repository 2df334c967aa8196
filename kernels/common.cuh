// Shared by every kernel file: the bf16 type, float conversions, reductions, and the macros that
// let one source compile for NVRTC (the real GPU) and g++ (the virtual GPU, kernels/vgpu/).
//
// Conventions (docs/kernels.md): each op is a `template <typename T> __device__` function, T = float
// or bf16 (storage), accumulating in float; `INSTANTIATE_*` macros export it as
// `extern "C" __global__ op_direction_{f32,bf16}` and register it with the virtual GPU.
// Arguments: outputs first, then inputs, then dimensions (int) and scalars (float).
#pragma once

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#include <cuda_bf16.h>
#define VGPU_KERNEL(name, block)
#define DYNAMIC_SMEM(T, name)                                          \
    extern __shared__ __align__(16) unsigned char name##_dynamic_raw[]; \
    T* name = reinterpret_cast<T*>(name##_dynamic_raw)
// Static shared memory: `SHARED(float, tile, 256);` is `__shared__ float tile[256];`. Kernels use
// the macro, never `__shared__` itself: on the virtual GPU it also poisons the array with NaN at
// each block's start and counts it against the launch's shared-memory limit.
#define SHARED(T, name, count) __shared__ T name[count]
#else
#include "vgpu/vgpu.h"
#endif

// Threads per block of each kind of launch. Every kernel declares its block size with
// `__launch_bounds__` (through INSTANTIATE) and GpuBackend launches it with exactly that many
// threads (src/backend/gpu/mod.rs has the same constants; the virtual GPU refuses any other size).
#define ROW_BLOCK 128          // one block per row (norms, softmax, loss, the method ops' rows)
#define ELEMENTWISE_BLOCK 256  // grid-stride loops over elements
#define FLASH_BLOCK 128        // the flash-attention kernels (4 warps)

// Tensor cores (`mma.sync` with bf16 operands) exist from sm_80 on. Kernels built for an older GPU
// (sm_75, through NVRTC at run time) keep their tensor-core code out; GpuBackend never launches it
// there (`fastpt doctor` says what is unavailable).
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define FASTPT_TENSOR_CORES 1
#else
#define FASTPT_TENSOR_CORES 0
#endif

typedef __nv_bfloat16 bf16;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(bf16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
    return x;
}
template <>
__device__ __forceinline__ bf16 from_float<bf16>(float x) {
    return __float2bfloat16(x);
}

// -inf without <cmath> (NVRTC has no INFINITY).
__device__ __forceinline__ float neg_inf() { return __int_as_float((int)0xff800000u); }

// max(a, b) that propagates NaN, as torch.max does (fmaxf drops a NaN operand). A softmax whose
// running max comes from it sees a NaN score: the row's lse and probabilities are NaN, not the
// all-zero row of a row that sees no key. One compare more than fmaxf, no extra pass.
__device__ __forceinline__ float max_nan(float a, float b) { return (a > b || a != a) ? a : b; }

__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int offset = 16; offset > 0; offset /= 2) v = max_nan(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}

// Sum over the block; every thread gets the result. blockDim.x must be a multiple of 32 (≤ 1024),
// and every thread of the block must call it (it contains barriers).
__device__ __forceinline__ float block_sum(float v) {
    SHARED(float, partial, 32);
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    v = warp_sum(v);
    __syncthreads();  // `partial` may still be read by a previous call
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    v = lane < warps ? partial[lane] : 0.0f;
    return warp_sum(v);
}

// Maximum over the block, as block_sum; NaN when any thread's value is NaN (max_nan).
__device__ __forceinline__ float block_max(float v) {
    SHARED(float, partial, 32);
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    v = lane < warps ? partial[lane] : neg_inf();
    return warp_max(v);
}

// ---- tensor cores (sm_80+): one warp computes D (16×8 f32) = A (16×16 bf16)·B (16×8 bf16) + C ----
// Fragment layout (lane = 4·g + q; two bf16 per register, lower index in the low half):
//   a[0] = A[g][2q..2q+1], a[1] = A[g+8][2q..], a[2] = A[g][2q+8..], a[3] = A[g+8][2q+8..];
//   b[0] = B[2q..2q+1][g], b[1] = B[2q+8..2q+9][g];  c[e], d[e] = C[g + 8·(e ≥ 2)][2q + (e & 1)].
// The virtual GPU emulates the instruction with the same layout (vgpu.h).
__device__ __forceinline__ void mma_m16n8k16_bf16(float d[4], const unsigned a[4], const unsigned b[2],
                                                  const float c[4]) {
#if (defined(__CUDACC__) || defined(__CUDACC_RTC__)) && FASTPT_TENSOR_CORES
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%10, %11, %12, %13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
#elif defined(__CUDACC__) || defined(__CUDACC_RTC__)
    __trap();  // never launched below sm_80
#else
    vgpu_mma_m16n8k16_bf16(d, a, b, c);
#endif
}

// The raw bits of a bf16.
__device__ __forceinline__ unsigned bf16_bits(bf16 x) {
#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
    return (unsigned)__bfloat16_as_ushort(x);
#else
    return (unsigned)x.bits;
#endif
}

// Two bf16 in one register: `lo` in the low half.
__device__ __forceinline__ unsigned pack_bf16(bf16 lo, bf16 hi) { return bf16_bits(lo) | (bf16_bits(hi) << 16); }
__device__ __forceinline__ unsigned pack_bf16(float lo, float hi) {
    return pack_bf16(__float2bfloat16(lo), __float2bfloat16(hi));
}

// Grid-stride loop over `n` elements.
#define FOR_EACH_INDEX(i, n) \
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < (long)(n); i += (long)gridDim.x * blockDim.x)

// Exports `op<T>` as `extern "C" __global__ op_f32` and `op_bf16` with `__launch_bounds__(BLOCK)`
// (the exact block size it is launched with: ROW_BLOCK, ELEMENTWISE_BLOCK, ...), registered with
// the virtual GPU. PARAMS is the parenthesised parameter list, written with `T` for the storage
// type (a typedef in the instance's namespace; C linkage ignores the namespace), ARGS the argument
// names.
#define INSTANTIATE_ONE(op, TYPE, suffix, BLOCK, PARAMS, ARGS)                                 \
    namespace op##_##suffix##_instance {                                                       \
    typedef TYPE T;                                                                            \
    extern "C" __global__ void __launch_bounds__(BLOCK) op##_##suffix PARAMS { op<T> ARGS; } \
    VGPU_KERNEL(op##_##suffix, BLOCK)                                                          \
    }
#define INSTANTIATE(op, BLOCK, PARAMS, ARGS)              \
    INSTANTIATE_ONE(op, float, f32, BLOCK, PARAMS, ARGS) \
    INSTANTIATE_ONE(op, bf16, bf16, BLOCK, PARAMS, ARGS)
