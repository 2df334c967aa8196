// Rotary position embedding, Llama's rotate-half layout. One thread per (row, head, pair i < D/2):
// with c = cos[pos, i], s = sign · sin[pos, i],
//   out[i] = x[i]·c − x[i + D/2]·s,   out[i + D/2] = x[i + D/2]·c + x[i]·s.
// sign 1 is the forward; sign −1 the input gradient (a rotation's transpose is the rotation by −θ).
// The cos/sin tables (P, D/2) are built on the host. A position outside the tables writes NaN
// (the host cannot cheaply check device-side positions; NaN makes the error visible downstream).
#include "common.cuh"

template <typename T>
__device__ void rope_rotate_pairs(T* out, const T* inp, const int* positions, const T* cos_table,
                                  const T* sin_table, int n, int h, int d, int table_rows, float sign) {
    const int half = d / 2;
    FOR_EACH_INDEX(idx, (long)n * h * half) {
        const long row = idx / ((long)h * half);
        const int head = (int)((idx / half) % h);
        const int i = (int)(idx % half);
        const long base = (row * h + head) * d;
        const int pos = positions[row];
        if (pos < 0 || pos >= table_rows) {
            const float nan = __int_as_float(0x7fc00000);
            out[base + i] = from_float<T>(nan);
            out[base + i + half] = from_float<T>(nan);
            continue;
        }
        const float c = to_float(cos_table[(long)pos * half + i]);
        const float s = sign * to_float(sin_table[(long)pos * half + i]);
        const float x1 = to_float(inp[base + i]);
        const float x2 = to_float(inp[base + i + half]);
        out[base + i] = from_float<T>(x1 * c - x2 * s);
        out[base + i + half] = from_float<T>(x2 * c + x1 * s);
    }
}

// out, inp (N, H·D); positions (N) rows of cos, sin (table_rows, D/2).
template <typename T>
__device__ void rope_forward(T* out, const T* inp, const int* positions, const T* cos_table,
                             const T* sin_table, int n, int h, int d, int table_rows) {
    rope_rotate_pairs(out, inp, positions, cos_table, sin_table, n, h, d, table_rows, 1.0f);
}
INSTANTIATE(rope_forward, ELEMENTWISE_BLOCK,
            (T * out, const T* inp, const int* positions, const T* cos_table, const T* sin_table, int n,
             int h, int d, int table_rows),
            (out, inp, positions, cos_table, sin_table, n, h, d, table_rows))

// dinp (N, H·D) = the rotation of dout (N, H·D) by −θ (`=`).
template <typename T>
__device__ void rope_backward_dinp(T* dinp, const T* dout, const int* positions, const T* cos_table,
                                   const T* sin_table, int n, int h, int d, int table_rows) {
    rope_rotate_pairs(dinp, dout, positions, cos_table, sin_table, n, h, d, table_rows, -1.0f);
}
INSTANTIATE(rope_backward_dinp, ELEMENTWISE_BLOCK,
            (T * dinp, const T* dout, const int* positions, const T* cos_table, const T* sin_table, int n,
             int h, int d, int table_rows),
            (dinp, dout, positions, cos_table, sin_table, n, h, d, table_rows))
