// The virtual GPU: just enough of CUDA C++ for our kernels to compile with g++ and run on the CPU.
//
// A launch runs the grid one block at a time. The block's threads are cooperative fibers
// (ucontext): each runs until it reaches a barrier (__syncthreads, a warp shuffle or vote) or
// returns, then hands over to the next. A barrier releases once every live thread of its group (the
// block, or the 32 lanes of a warp) has arrived; threads that returned count as arrived, as on the
// hardware. If a sweep over all waiting threads makes no progress the launch fails with "deadlock"
// instead of hanging.
//
// The schedule (the order of the blocks of a grid, and the order in which the threads of a block
// run from one barrier to the next) is fixed (in index order), reversed, or shuffled from a seed:
// a kernel that reads shared memory another thread writes without a barrier between them, or
// global memory another block of the same launch writes, gets different results under different
// schedules (`VirtualDevice::with_schedule`, FASTPT_VGPU_SCHEDULE).
//
// Each launch is checked as the hardware and our conventions demand: the argument kinds the host
// passes against the kernel's C++ parameter list, the block size against the kernel's
// `__launch_bounds__`, static and dynamic shared memory against the limits of the smallest GPU we
// ship kernels for. Static shared memory (SHARED in common.cuh) and dynamic shared memory are
// filled with NaN bytes at the start of each block.
//
// Per OS thread state is thread_local, so independent launches (cargo test runs tests on several
// threads) never share shared memory or fiber state.
//
// What it cannot show: races between threads that never meet a barrier in between inside one
// sweep (fibers switch only at barriers), the memory model, speed. `fastpt doctor` checks those on
// a real GPU.
#pragma once

#include <cmath>
#include <math.h>  // expf, logf, tanhf, ... in the global namespace as in CUDA
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <utility>

// ---- CUDA keywords ---------------------------------------------------------------------------

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// Static shared memory goes through SHARED (below), which poisons it per block; a bare
// `__shared__` is a compile error here so that none slips past.
#define __shared__ VGPU_use_SHARED_from_common_cuh_instead_of___shared__
#define __align__(n) alignas(n)

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
typedef dim3 uint3;

namespace vgpu {

// Thread-local launch state (see vgpu.cpp).
const uint3& thread_idx();
extern thread_local uint3 block_idx;
extern thread_local dim3 block_dim;
extern thread_local dim3 grid_dim;
void* dynamic_smem();
// Called by each thread as it passes a SHARED declaration: poisons the array at its first use in a
// block and counts it against the launch's static shared-memory limit.
void static_smem(void* p, size_t bytes);
void syncthreads();
void syncwarp();
// Exchange one 64-bit value among the lanes of the calling thread's warp: every lane writes its
// `value`, then reads the one of lane `src` (a barrier before and after).
uint64_t warp_exchange(uint64_t value, int src_lane);
// Ballot: bit i set when lane i's predicate is true.
unsigned warp_ballot(bool pred);
int lane_id();

template <typename T>
uint64_t to_bits(T v) {
    static_assert(sizeof(T) <= 8, "warp shuffles move at most 8 bytes");
    uint64_t b = 0;
    std::memcpy(&b, &v, sizeof(T));
    return b;
}
template <typename T>
T from_bits(uint64_t b) {
    T v;
    std::memcpy(&v, &b, sizeof(T));
    return v;
}

}  // namespace vgpu

#define threadIdx (::vgpu::thread_idx())
#define blockIdx (::vgpu::block_idx)
#define blockDim (::vgpu::block_dim)
#define gridDim (::vgpu::grid_dim)
static const int warpSize = 32;

inline void __syncthreads() { ::vgpu::syncthreads(); }
inline void __syncwarp(unsigned = 0xffffffffu) { ::vgpu::syncwarp(); }

// Warp shuffles. `width` splits the warp into segments as on the hardware.
template <typename T>
inline T __shfl_sync(unsigned, T v, int src, int width = 32) {
    int lane = ::vgpu::lane_id();
    int base = lane - lane % width;
    int from = base + ((src % width) + width) % width;
    return ::vgpu::from_bits<T>(::vgpu::warp_exchange(::vgpu::to_bits(v), from));
}
template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int mask, int width = 32) {
    int lane = ::vgpu::lane_id();
    int from = lane ^ mask;
    // Lanes outside the caller's segment keep their own value, as on the hardware.
    if (from / width != lane / width) from = lane;
    return ::vgpu::from_bits<T>(::vgpu::warp_exchange(::vgpu::to_bits(v), from));
}
template <typename T>
inline T __shfl_down_sync(unsigned, T v, unsigned delta, int width = 32) {
    int lane = ::vgpu::lane_id();
    int from = lane + (int)delta;
    if (from / width != lane / width) from = lane;
    return ::vgpu::from_bits<T>(::vgpu::warp_exchange(::vgpu::to_bits(v), from));
}
template <typename T>
inline T __shfl_up_sync(unsigned, T v, unsigned delta, int width = 32) {
    int lane = ::vgpu::lane_id();
    int from = lane - (int)delta;
    if (from < 0 || from / width != lane / width) from = lane;
    return ::vgpu::from_bits<T>(::vgpu::warp_exchange(::vgpu::to_bits(v), from));
}
inline unsigned __ballot_sync(unsigned, bool pred) { return ::vgpu::warp_ballot(pred); }
inline bool __all_sync(unsigned, bool pred) { return ::vgpu::warp_ballot(!pred) == 0; }
inline bool __any_sync(unsigned, bool pred) { return ::vgpu::warp_ballot(pred) != 0; }

// ---- atomics (fibers switch only at barriers, so plain read-modify-write is atomic) ----------

template <typename T>
inline T atomicAdd(T* addr, T v) {
    T old = *addr;
    *addr = old + v;
    return old;
}
template <typename T>
inline T atomicMax(T* addr, T v) {
    T old = *addr;
    if (v > old) *addr = v;
    return old;
}
template <typename T>
inline T atomicExch(T* addr, T v) {
    T old = *addr;
    *addr = v;
    return old;
}
inline int atomicCAS(int* addr, int compare, int v) {
    int old = *addr;
    if (old == compare) *addr = v;
    return old;
}

// ---- math intrinsics -------------------------------------------------------------------------

inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __frcp_rn(float x) { return 1.0f / x; }
// Separately rounded multiply and add (no contraction into an fma; kernels/nf4.cu needs them).
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __int_as_float(int x) { return vgpu::from_bits<float>((uint32_t)x); }
inline int __float_as_int(float x) { return (int)(uint32_t)vgpu::to_bits(x); }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
// CUDA's integer min/max overloads.
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }

// ---- bf16 (the storage format of GPU tensors) ------------------------------------------------

// Bit-compatible with cuda_bf16.h's __nv_bfloat16; trivial so that __shared__ arrays of it are.
struct __nv_bfloat16 {
    uint16_t bits;
};

// Round to nearest even, as __float2bfloat16 (quiet NaN kept).
inline __nv_bfloat16 __float2bfloat16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    __nv_bfloat16 r;
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        r.bits = (uint16_t)((u >> 16) | 0x40u);
        return r;
    }
    uint32_t rounding = 0x7fffu + ((u >> 16) & 1u);
    r.bits = (uint16_t)((u + rounding) >> 16);
    return r;
}
inline float __bfloat162float(__nv_bfloat16 h) {
    uint32_t u = (uint32_t)h.bits << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

// ---- the launcher ---------------------------------------------------------------------------

namespace vgpu {

struct LaunchCfg {
    dim3 grid;
    dim3 block;
    unsigned smem;
    int schedule;         // 0 fixed, 1 reversed, 2 shuffled
    unsigned long seed;   // of the shuffled schedule
};

// The kind of one kernel parameter, as `Arg` in src/backend/gpu/device.rs names it: 'p' pointer,
// 'i' int, 'f' float ('l' long, 'u' unsigned for completeness). A parameter of any other type does
// not compile: the host side has no way to pass it.
template <typename T>
struct ArgKind;
template <typename T>
struct ArgKind<T*> {
    static constexpr char value = 'p';
};
#define VGPU_ARG_KIND(type, kind)                \
    template <>                                  \
    struct ArgKind<type> {                       \
        static constexpr char value = kind;      \
    };
VGPU_ARG_KIND(int, 'i')
VGPU_ARG_KIND(float, 'f')
VGPU_ARG_KIND(long, 'l')
VGPU_ARG_KIND(unsigned, 'u')

// "ppif": the kinds of a kernel's parameters, in order.
template <typename... A>
const char* signature_of(void (*)(A...)) {
    static const char sig[] = {ArgKind<A>::value..., '\0'};
    return sig;
}

typedef void (*BodyFn)(void* ctx);
// Runs `body(ctx)` once per thread of every block of the grid. Returns 0, or an error code
// with a message in `err` (see vgpu.cpp).
int run_grid(const LaunchCfg& cfg, BodyFn body, void* ctx, char* err, size_t err_len);

template <typename... A>
struct KernelCall {
    void (*kernel)(A...);
    void** params;
};

template <typename... A, size_t... I>
void call_kernel(void (*k)(A...), void** params, std::index_sequence<I...>) {
    // Each parameter is read from the pointer the caller passed, exactly as cuLaunchKernel does.
    k(*static_cast<typename std::remove_reference<A>::type*>(params[I])...);
}

template <typename... A>
void kernel_body(void* ctx) {
    auto* call = static_cast<KernelCall<A...>*>(ctx);
    call_kernel(call->kernel, call->params, std::index_sequence_for<A...>{});
}

template <typename... A>
int launch(void (*kernel)(A...), const LaunchCfg& cfg, void** params, char* err, size_t err_len) {
    KernelCall<A...> call{kernel, params};
    return run_grid(cfg, &kernel_body<A...>, &call, err, err_len);
}

typedef int (*Launcher)(const LaunchCfg& cfg, void** params, char* err, size_t err_len);
// Adds a kernel to the table that `vgpu_launch` looks names up in: its source file, its block size
// (`__launch_bounds__`), its parameter kinds.
struct Registrar {
    Registrar(const char* name, const char* file, unsigned block, const char* signature, Launcher launcher);
};

}  // namespace vgpu

// ---- tensor cores ------------------------------------------------------------------------------

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 for the calling warp, with the hardware's
// fragment layout (PTX ISA, "Matrix Fragments for mma.m16n8k16"): lane = 4·g + q;
//   a[0] = A[g][2q, 2q+1], a[1] = A[g+8][2q, 2q+1], a[2] = A[g][2q+8, 2q+9], a[3] = A[g+8][2q+8, 2q+9];
//   b[0] = B[2q, 2q+1][g], b[1] = B[2q+8, 2q+9][g];
//   c[0..1] = C[g][2q, 2q+1], c[2..3] = C[g+8][2q, 2q+1];
// two bf16 per register, the lower index in the low half. The lanes' fragments are gathered into
// a per-warp tile and each lane computes its own four outputs in f32, so a kernel that builds its
// fragments wrongly gets wrong numbers here as on the hardware.
inline float vgpu_bf16_bits_to_float(uint32_t bits16) { return ::vgpu::from_bits<float>((uint64_t)(bits16 << 16)); }
inline void vgpu_mma_m16n8k16_bf16(float d[4], const unsigned a[4], const unsigned b[2], const float c[4]) {
    static thread_local float tile_a[32][16][16];  // per warp of the block
    static thread_local float tile_b[32][16][8];
    const uint3& tid = ::vgpu::thread_idx();
    const int linear = (int)(tid.x + ::vgpu::block_dim.x * (tid.y + ::vgpu::block_dim.y * tid.z));
    const int warp = linear / 32, lane = linear % 32, g = lane / 4, q = lane % 4;
    float(*A)[16] = tile_a[warp];
    float(*B)[8] = tile_b[warp];
    const int rows[4] = {g, g + 8, g, g + 8}, cols[4] = {2 * q, 2 * q, 2 * q + 8, 2 * q + 8};
    for (int r = 0; r < 4; r++) {
        A[rows[r]][cols[r]] = vgpu_bf16_bits_to_float(a[r] & 0xffffu);
        A[rows[r]][cols[r] + 1] = vgpu_bf16_bits_to_float(a[r] >> 16);
    }
    for (int r = 0; r < 2; r++) {
        B[2 * q + 8 * r][g] = vgpu_bf16_bits_to_float(b[r] & 0xffffu);
        B[2 * q + 8 * r + 1][g] = vgpu_bf16_bits_to_float(b[r] >> 16);
    }
    ::vgpu::syncwarp();
    float out[4];
    for (int e = 0; e < 4; e++) {
        const int row = g + (e >= 2 ? 8 : 0), col = 2 * q + (e & 1);
        float acc = c[e];
        for (int kk = 0; kk < 16; kk++) acc += A[row][kk] * B[kk][col];
        out[e] = acc;
    }
    ::vgpu::syncwarp();  // the tiles are rewritten by the next call
    for (int e = 0; e < 4; e++) d[e] = out[e];
}

// After each kernel instantiation: makes it launchable by name from Rust. `block` is the kernel's
// `__launch_bounds__`; __FILE__ is the .cu file the instantiation is in.
#define VGPU_KERNEL(name, block)                                                                   \
    static ::vgpu::Registrar vgpu_registrar_##name(                                                \
        #name, __FILE__, block, ::vgpu::signature_of(&name),                                       \
        [](const ::vgpu::LaunchCfg& cfg, void** params, char* err, size_t err_len) {               \
            return ::vgpu::launch(&name, cfg, params, err, err_len);                               \
        });

// Static shared memory: one copy per OS thread (blocks run one after another on it), poisoned at
// each block's first use.
#define SHARED(T, name, count)          \
    static thread_local T name[count]; \
    ::vgpu::static_smem(name, sizeof(name))

// `extern __shared__` dynamic shared memory, sized by the launch.
#define DYNAMIC_SMEM(T, name) T* name = reinterpret_cast<T*>(::vgpu::dynamic_smem())
