// NF4 weights with double-quantised absmax (the bitsandbytes storage layout; CPU reference and the
// layout's description in src/backend/nf4.rs): dequantisation to f32 / bf16.
//
// Layout of a tensor of N elements, NB = ceil(N/64) blocks of 64:
//   packed (ceil(N/2)) bytes: element 2j in the HIGH nibble of byte j, element 2j+1 in the low one
//     (an odd N pads the last low nibble with code 7, the zero);
//   absmax[b] = code2[absmax_codes[b]] · absmax_scale[b/256] + offset (double quantisation: blocks
//     of 256 absmax values, u8 codes into the 256-entry signed dynamic map `code2`);
//   out[i] = NF4[nibble(i)] · absmax[i/64].
// The absmax is a multiply then an add, each rounded (__fmul_rn / __fadd_rn: nvcc would otherwise
// contract them into one fma), and the value one multiply, exactly as the CPU reference and
// bitsandbytes' dequantize_4bit, so the f32 output is bit-identical to it and the bf16 output is
// that value rounded once.
//
// Floors, per element: read 0.5 byte of codes + 1/64 byte of absmax code + 4/(64·256) byte of
// absmax scale ≈ 0.516 byte (the 1 KiB dynamic map and the 64-byte NF4 table are per launch);
// write 2 bytes (bf16) or 4 bytes (f32). About 2.5 bytes per element in bf16: purely
// bandwidth-bound (1 multiply per element, 1 fma per 64), e.g. a 4096×4096 weight moves ≈ 42 MB.
//
// Launch: grid-stride over the ceil(N/2) bytes, one byte (two outputs) per thread so that a warp
// reads 32 consecutive bytes and writes 64 consecutive outputs; block 256 (any multiple of 32
// works; the table load below needs no minimum), any grid.
#include "common.cuh"

// The NF4 code table, index 0..15 (the same values as NF4_CODE in src/backend/nf4.rs).
__device__ const float nf4_code_table[16] = {
    -1.0f,
    -0.6961928009986877f,
    -0.5250730514526367f,
    -0.39491748809814453f,
    -0.28444138169288635f,
    -0.18477343022823334f,
    -0.09105003625154495f,
    0.0f,
    0.07958029955625534f,
    0.16093020141124725f,
    0.24611230194568634f,
    0.33791524171829224f,
    0.44070982933044434f,
    0.5626170039176941f,
    0.7229568362236023f,
    1.0f,
};

// out (N) = dequantised NF4 tensor. packed (ceil(N/2)), absmax_codes (NB = ceil(N/64)),
// absmax_scale (ceil(NB/256)), code2 (256) the signed dynamic map; offset the mean absmax.
template <typename T>
__device__ void nf4_dequantize(T* out, const unsigned char* packed, const unsigned char* absmax_codes,
                               const float* absmax_scale, const float* code2, int n, float offset) {
    // The 16 codes in shared memory: the nibbles of a warp index them at random, which shared
    // memory serves in one pass (constant memory would serialise distinct addresses).
    SHARED(float, table, 16);
    for (int k = threadIdx.x; k < 16; k += blockDim.x) table[k] = nf4_code_table[k];
    __syncthreads();

    const long nbytes = ((long)n + 1) / 2;
    FOR_EACH_INDEX(j, nbytes) {
        const unsigned int byte = packed[j];
        const long i = 2 * j;  // elements i and i + 1 share block i / 64 (64 is even)
        const long b = i / 64;
        const float absmax = __fadd_rn(__fmul_rn(code2[absmax_codes[b]], absmax_scale[b / 256]), offset);
        out[i] = from_float<T>(table[byte >> 4] * absmax);
        if (i + 1 < n) out[i + 1] = from_float<T>(table[byte & 15u] * absmax);
    }
}
INSTANTIATE(nf4_dequantize, ELEMENTWISE_BLOCK,
            (T * out, const unsigned char* packed, const unsigned char* absmax_codes, const float* absmax_scale,
             const float* code2, int n, float offset),
            (out, packed, absmax_codes, absmax_scale, code2, n, offset))
