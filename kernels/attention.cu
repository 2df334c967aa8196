// Attention (first version, see src/backend/gpu/mod.rs): the scores `scale·q·kᵀ (B, H, T, S)` come
// from batched GEMMs; these kernels mask them, add the T5 relative bias and take the softmax in
// place, and take the backward of that softmax. One block per score row, in float.
#include "common.cuh"

// The score of key j in row i of head hh of batch entry bi, masked and biased: −inf when the key is
// padding (key_mask_row[j] == 0) or in the future (causal && j > i), else the stored score plus
// bias_table[rel_buckets[j − i + t − 1] · h + hh] when bias_table is non-null.
template <typename T>
__device__ __forceinline__ float attention_masked_score(const T* scores_row, const int* key_mask_row,
                                                        const T* bias_table, const int* rel_buckets, int h, int hh,
                                                        int t, int i, int j, int causal) {
    if (key_mask_row[j] == 0 || (causal && j > i)) return neg_inf();
    float v = to_float(scores_row[j]);
    if (bias_table) v += to_float(bias_table[(long)rel_buckets[j - i + t - 1] * h + hh]);
    return v;
}

// scores (B, H, T, S): in place, the probabilities softmax(scores + bias + mask) of each row;
// lse (B, H, T) = log Σ_j exp(score_j) over the visible keys, −inf for a row with no visible key
// (whose probabilities are then all 0), NaN for a row with a NaN visible score (the max is taken
// with max_nan, so the row's probabilities are NaN too, as in PyTorch). key_mask (B, S) 1 = visible; bias_table (num_buckets, H)
// or null; rel_buckets (T + S − 1), entry j − i + T − 1 = bucket of key j for query i (null without
// bias); causal: query i sees keys j ≤ i only. Grid (B·H·T) (further rows looped over), block a
// multiple of 32.
template <typename T>
__device__ void attention_softmax_forward(T* scores, T* lse, const int* key_mask, const T* bias_table,
                                          const int* rel_buckets, int b, int h, int t, int s, int causal) {
    const long rows = (long)b * h * t;
    for (long row = blockIdx.x; row < rows; row += gridDim.x) {
        const int i = (int)(row % t);
        const int hh = (int)((row / t) % h);
        const long bi = row / ((long)t * h);
        T* x = scores + row * s;
        const int* km = key_mask + bi * s;
        float m = neg_inf();
        for (int j = threadIdx.x; j < s; j += blockDim.x) {
            m = max_nan(m, attention_masked_score(x, km, bias_table, rel_buckets, h, hh, t, i, j, causal));
        }
        m = block_max(m);
        float sum = 0.0f;
        if (m != neg_inf()) {
            for (int j = threadIdx.x; j < s; j += blockDim.x) {
                sum += expf(attention_masked_score(x, km, bias_table, rel_buckets, h, hh, t, i, j, causal) - m);
            }
        }
        sum = block_sum(sum);
        const float row_lse = m == neg_inf() ? neg_inf() : m + logf(sum);
        // Each thread rewrites only the entries it read above: no barrier needed before the writes.
        for (int j = threadIdx.x; j < s; j += blockDim.x) {
            const float v = attention_masked_score(x, km, bias_table, rel_buckets, h, hh, t, i, j, causal);
            x[j] = from_float<T>(v == neg_inf() || row_lse == neg_inf() ? 0.0f : expf(v - row_lse));
        }
        if (threadIdx.x == 0) lse[row] = from_float<T>(row_lse);
    }
}
INSTANTIATE(attention_softmax_forward, ROW_BLOCK,
            (T * scores, T* lse, const int* key_mask, const T* bias_table, const int* rel_buckets, int b, int h, int t,
             int s, int causal),
            (scores, lse, key_mask, bias_table, rel_buckets, b, h, t, s, causal))

// dscores (rows, S): in place, dS = P ⊙ (dP − Σ_j P_j · dP_j) with dP the incoming dscores and
// P = probs (rows, S) from the forward. Grid (rows) (further rows looped over), block a multiple
// of 32.
template <typename T>
__device__ void attention_softmax_backward(T* dscores, const T* probs, int rows, int s) {
    for (long row = blockIdx.x; row < rows; row += gridDim.x) {
        T* ds = dscores + row * s;
        const T* p = probs + row * s;
        float dot = 0.0f;
        for (int j = threadIdx.x; j < s; j += blockDim.x) dot += to_float(p[j]) * to_float(ds[j]);
        dot = block_sum(dot);
        for (int j = threadIdx.x; j < s; j += blockDim.x) {
            ds[j] = from_float<T>(to_float(p[j]) * (to_float(ds[j]) - dot));
        }
    }
}
INSTANTIATE(attention_softmax_backward, ROW_BLOCK, (T * dscores, const T* probs, int rows, int s), (dscores, probs, rows, s))

// ---- Flash attention ---------------------------------------------------------------------------
//
// The fused kernels (the default; the GEMM path above remains as the kernel lab's second variant and
// for heads wider than FLASH_MAX_D): scores, masks, the T5 bias and the softmax never leave shared
// memory. The forward keeps a running max and sum per query row (online softmax) and saves the
// log-sum-exp; the backward recomputes each tile's probabilities from it. No atomics: dK and dV come
// from blocks that own a key tile (and loop over the query heads of its group, for GQA), dQ from
// blocks that own a query tile; each recomputes the scores it needs. Scalar f32 FMA for now; the
// tile loops are where tensor-core fragments go.
//
// Layouts: q, out, dout (B, T, H·D); k, v (B, S, Hkv·D); key_mask (B, S); bias_table
// (num_buckets, H) or null with rel_buckets (T + S − 1) as attention_softmax_forward;
// lse (B, H, T); stats (B, H, T, 2) f32: the log-sum-exp and D = rowsum(dout ⊙ out) of each row.

#define FLASH_BR 16     // query rows per block (forward, dq, prep)
#define FLASH_BC 16     // key rows per tile
#define FLASH_BR_KV 8   // query rows per tile of the dk/dv kernel
#define FLASH_MAX_D 128 // widest head: the tiles of the largest kernel fill 42 KB of shared memory

// The tile a block owns when the grid covers (B, heads, ceil(len / per_block)) in that order:
// batch entry `bi`, head `head`, first row `first`. False for a block past the end.
__device__ __forceinline__ bool flash_block(long& bi, int& head, int& first, int len, int heads, int per_block,
                                            int b) {
    const int tiles = (len + per_block - 1) / per_block;
    const long blk = blockIdx.x;
    first = (int)(blk % tiles) * per_block;
    head = (int)((blk / tiles) % heads);
    bi = blk / ((long)tiles * heads);
    return bi < b;
}

// Rows base_row.. of a (B·L, heads·D) tensor, head `head`, into tile (rows_in_tile, D) of float
// or bf16; rows past `valid` are zero.
template <typename TileT, typename T>
__device__ __forceinline__ void flash_load_tile(TileT* tile, const T* x, long base_row, int valid, int rows_in_tile,
                                                int heads, int head, int d) {
    for (int idx = threadIdx.x; idx < rows_in_tile * d; idx += blockDim.x) {
        const int r = idx / d, dd = idx % d;
        const float v = r < valid ? to_float(x[(base_row + r) * heads * d + (long)head * d + dd]) : 0.0f;
        tile[idx] = from_float<TileT>(v);
    }
}

// scores (R, BC) of query rows i0.. (R of them, `rows` valid) against key rows j0.. (`cols`
// valid): scale·q·k + bias, −inf where masked or outside the tile.
template <typename T>
__device__ __forceinline__ void flash_scores(float* scores, const float* qs, const float* ks, int rows_in_tile,
                                             int rows, int cols, int i0, int j0, const int* km, const T* bias_table,
                                             const int* rel_buckets, int t, int h, int hh, int d, int causal,
                                             float scale) {
    for (int idx = threadIdx.x; idx < rows_in_tile * FLASH_BC; idx += blockDim.x) {
        const int r = idx / FLASH_BC, c = idx % FLASH_BC;
        const int i = i0 + r, j = j0 + c;
        float sc = neg_inf();
        if (r < rows && c < cols && km[j] != 0 && !(causal && j > i)) {
            float dot = 0.0f;
            for (int dd = 0; dd < d; dd++) dot += qs[r * d + dd] * ks[c * d + dd];
            sc = scale * dot;
            if (bias_table) sc += to_float(bias_table[(long)rel_buckets[j - i + t - 1] * h + hh]);
        }
        scores[idx] = sc;
    }
}

// The probability of a score given its row's log-sum-exp (0 for masked scores and empty rows).
__device__ __forceinline__ float flash_prob(float score, float lse) {
    return score == neg_inf() || lse == neg_inf() ? 0.0f : expf(score - lse);
}

// Keys a query tile can see: all, or with the causal mask only j < i0 + rows.
__device__ __forceinline__ int flash_key_end(int s, int i0, int rows, int causal) {
    return causal ? min(s, i0 + rows) : s;
}

// out, lse: see above. Grid (B·H·ceil(T/BR)), block 128, smem (2·BR + 2·BC)·D + BR·BC + 3·BR floats.
template <typename T>
__device__ void attention_forward(T* out, T* lse, const T* q, const T* k, const T* v, const int* key_mask,
                                  const T* bias_table, const int* rel_buckets, int b, int t, int s, int h, int h_kv,
                                  int d, int causal, float scale) {
    DYNAMIC_SMEM(float, smem);
    float* qs = smem;                   // (BR, D)
    float* ks = qs + FLASH_BR * d;      // (BC, D)
    float* vs = ks + FLASH_BC * d;      // (BC, D)
    float* os = vs + FLASH_BC * d;      // (BR, D) running output, unnormalised
    float* ps = os + FLASH_BR * d;      // (BR, BC) scores, then probabilities
    float* row_m = ps + FLASH_BR * FLASH_BC;  // (BR) running max
    float* row_l = row_m + FLASH_BR;          // (BR) running sum
    float* row_a = row_l + FLASH_BR;          // (BR) rescale of the previous tiles
    long bi;
    int hh, i0;
    if (!flash_block(bi, hh, i0, t, h, FLASH_BR, b)) return;
    const int kvh = hh / (h / h_kv);
    const int rows = min(FLASH_BR, t - i0);
    const int* km = key_mask + bi * s;
    flash_load_tile(qs, q, bi * t + i0, rows, FLASH_BR, h, hh, d);
    for (int idx = threadIdx.x; idx < FLASH_BR * d; idx += blockDim.x) os[idx] = 0.0f;
    for (int r = threadIdx.x; r < FLASH_BR; r += blockDim.x) {
        row_m[r] = neg_inf();
        row_l[r] = 0.0f;
    }
    const int s_end = flash_key_end(s, i0, rows, causal);
    for (int j0 = 0; j0 < s_end; j0 += FLASH_BC) {
        const int cols = min(FLASH_BC, s - j0);
        __syncthreads();  // the previous tile's readers are done
        flash_load_tile(ks, k, bi * s + j0, cols, FLASH_BC, h_kv, kvh, d);
        flash_load_tile(vs, v, bi * s + j0, cols, FLASH_BC, h_kv, kvh, d);
        __syncthreads();
        flash_scores(ps, qs, ks, FLASH_BR, rows, cols, i0, j0, km, bias_table, rel_buckets, t, h, hh, d, causal,
                     scale);
        __syncthreads();
        for (int r = threadIdx.x; r < FLASH_BR; r += blockDim.x) {
            float* pr = ps + r * FLASH_BC;
            float mx = row_m[r];
            for (int c = 0; c < FLASH_BC; c++) mx = max_nan(mx, pr[c]);
            float alpha = 1.0f, sum = 0.0f;
            if (mx == neg_inf()) {
                for (int c = 0; c < FLASH_BC; c++) pr[c] = 0.0f;
            } else {
                alpha = expf(row_m[r] - mx);  // 0 while the row had seen nothing
                for (int c = 0; c < FLASH_BC; c++) {
                    pr[c] = expf(pr[c] - mx);
                    sum += pr[c];
                }
            }
            row_m[r] = mx;
            row_l[r] = row_l[r] * alpha + sum;
            row_a[r] = alpha;
        }
        __syncthreads();
        for (int idx = threadIdx.x; idx < FLASH_BR * d; idx += blockDim.x) {
            const int r = idx / d, dd = idx % d;
            float acc = os[idx] * row_a[r];
            for (int c = 0; c < FLASH_BC; c++) acc += ps[r * FLASH_BC + c] * vs[c * d + dd];
            os[idx] = acc;
        }
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < rows * d; idx += blockDim.x) {
        const int r = idx / d, dd = idx % d;
        const float l = row_l[r];
        // A row with no visible key keeps max −inf (output 0); a NaN score made the max NaN (out NaN).
        out[(bi * t + i0 + r) * h * d + (long)hh * d + dd] =
            from_float<T>(row_m[r] != neg_inf() ? os[idx] / l : 0.0f);
    }
    for (int r = threadIdx.x; r < rows; r += blockDim.x) {
        const float l = row_l[r];
        lse[(bi * h + hh) * t + i0 + r] = from_float<T>(row_m[r] != neg_inf() ? row_m[r] + logf(l) : neg_inf());
    }
}
INSTANTIATE(attention_forward, FLASH_BLOCK,
            (T * out, T* lse, const T* q, const T* k, const T* v, const int* key_mask, const T* bias_table,
             const int* rel_buckets, int b, int t, int s, int h, int h_kv, int d, int causal, float scale),
            (out, lse, q, k, v, key_mask, bias_table, rel_buckets, b, t, s, h, h_kv, d, causal, scale))

// stats (B, H, T, 2) f32 = (lse, rowsum(dout ⊙ out)) for the backward kernels. The lse is read from
// the forward's `lse` when `recompute` is 0 (f32 storage), else recomputed from the scores: a
// bf16 lse is too coarse (an error δ scales a whole row of probabilities by e^δ).
// Grid (B·H·ceil(T/BR)), block 128, smem (BR + BC)·D + BR·BC + 2·BR floats.
template <typename T>
__device__ void attention_backward_prep(float* stats, const T* lse, const T* out, const T* dout, const T* q,
                                        const T* k, const int* key_mask, const T* bias_table, const int* rel_buckets,
                                        int b, int t, int s, int h, int h_kv, int d, int causal, float scale,
                                        int recompute) {
    DYNAMIC_SMEM(float, smem);
    float* qs = smem;                         // (BR, D)
    float* ks = qs + FLASH_BR * d;            // (BC, D)
    float* ps = ks + FLASH_BC * d;            // (BR, BC)
    float* row_m = ps + FLASH_BR * FLASH_BC;  // (BR)
    float* row_l = row_m + FLASH_BR;          // (BR)
    long bi;
    int hh, i0;
    if (!flash_block(bi, hh, i0, t, h, FLASH_BR, b)) return;
    const int kvh = hh / (h / h_kv);
    const int rows = min(FLASH_BR, t - i0);
    float* st = stats + ((bi * h + hh) * t + i0) * 2;
    for (int r = threadIdx.x; r < rows; r += blockDim.x) {
        const long base = (bi * t + i0 + r) * h * d + (long)hh * d;
        float dsum = 0.0f;
        for (int dd = 0; dd < d; dd++) dsum += to_float(dout[base + dd]) * to_float(out[base + dd]);
        st[r * 2 + 1] = dsum;
        if (!recompute) st[r * 2] = to_float(lse[(bi * h + hh) * t + i0 + r]);
    }
    if (!recompute) return;
    const int* km = key_mask + bi * s;
    flash_load_tile(qs, q, bi * t + i0, rows, FLASH_BR, h, hh, d);
    for (int r = threadIdx.x; r < FLASH_BR; r += blockDim.x) {
        row_m[r] = neg_inf();
        row_l[r] = 0.0f;
    }
    const int s_end = flash_key_end(s, i0, rows, causal);
    for (int j0 = 0; j0 < s_end; j0 += FLASH_BC) {
        const int cols = min(FLASH_BC, s - j0);
        __syncthreads();
        flash_load_tile(ks, k, bi * s + j0, cols, FLASH_BC, h_kv, kvh, d);
        __syncthreads();
        flash_scores(ps, qs, ks, FLASH_BR, rows, cols, i0, j0, km, bias_table, rel_buckets, t, h, hh, d, causal,
                     scale);
        __syncthreads();
        for (int r = threadIdx.x; r < FLASH_BR; r += blockDim.x) {
            const float* pr = ps + r * FLASH_BC;
            float mx = row_m[r];
            for (int c = 0; c < FLASH_BC; c++) mx = max_nan(mx, pr[c]);
            if (mx == neg_inf()) continue;
            float sum = row_l[r] * expf(row_m[r] - mx);
            for (int c = 0; c < FLASH_BC; c++) sum += expf(pr[c] - mx);
            row_m[r] = mx;
            row_l[r] = sum;
        }
    }
    __syncthreads();
    for (int r = threadIdx.x; r < rows; r += blockDim.x) {
        st[r * 2] = row_m[r] != neg_inf() ? row_m[r] + logf(row_l[r]) : neg_inf();
    }
}
INSTANTIATE(attention_backward_prep, FLASH_BLOCK,
            (float* stats, const T* lse, const T* out, const T* dout, const T* q, const T* k, const int* key_mask,
             const T* bias_table, const int* rel_buckets, int b, int t, int s, int h, int h_kv, int d, int causal,
             float scale, int recompute),
            (stats, lse, out, dout, q, k, key_mask, bias_table, rel_buckets, b, t, s, h, h_kv, d, causal, scale,
             recompute))

// dS of one tile, in place of its scores: P = exp(score − lse), dP = dout·vᵀ, dS = P ⊙ (dP − D).
// Also leaves P in `probs` when not null (the dk/dv kernel needs it for dV).
__device__ __forceinline__ void flash_dscores(float* scores, float* probs, const float* dos, const float* vs,
                                              const float* st_lse, const float* st_d, int rows_in_tile, int d) {
    for (int idx = threadIdx.x; idx < rows_in_tile * FLASH_BC; idx += blockDim.x) {
        const int r = idx / FLASH_BC, c = idx % FLASH_BC;
        const float p = flash_prob(scores[idx], st_lse[r]);
        float dp = 0.0f;
        if (p != 0.0f)
            for (int dd = 0; dd < d; dd++) dp += dos[r * d + dd] * vs[c * d + dd];
        if (probs) probs[idx] = p;
        scores[idx] = p * (dp - st_d[r]);
    }
}

// dk, dv (B, S, Hkv·D) (=). Grid (B·Hkv·ceil(S/BC)), block 128,
// smem (4·BC + 2·BR_KV)·D + 2·BR_KV·BC + 2·BR_KV floats.
template <typename T>
__device__ void attention_backward_dkv(T* dk, T* dv, const float* stats, const T* dout, const T* q, const T* k,
                                       const T* v, const int* key_mask, const T* bias_table, const int* rel_buckets,
                                       int b, int t, int s, int h, int h_kv, int d, int causal, float scale) {
    DYNAMIC_SMEM(float, smem);
    float* ks = smem;                              // (BC, D)
    float* vs = ks + FLASH_BC * d;                 // (BC, D)
    float* dks = vs + FLASH_BC * d;                // (BC, D)
    float* dvs = dks + FLASH_BC * d;               // (BC, D)
    float* qs = dvs + FLASH_BC * d;                // (BR_KV, D)
    float* dos = qs + FLASH_BR_KV * d;             // (BR_KV, D)
    float* ds = dos + FLASH_BR_KV * d;             // (BR_KV, BC) scores, then dS
    float* ps = ds + FLASH_BR_KV * FLASH_BC;       // (BR_KV, BC) probabilities
    float* st_lse = ps + FLASH_BR_KV * FLASH_BC;   // (BR_KV)
    float* st_d = st_lse + FLASH_BR_KV;            // (BR_KV)
    long bi;
    int kvh, j0;
    if (!flash_block(bi, kvh, j0, s, h_kv, FLASH_BC, b)) return;
    const int group = h / h_kv;
    const int cols = min(FLASH_BC, s - j0);
    const int* km = key_mask + bi * s;
    flash_load_tile(ks, k, bi * s + j0, cols, FLASH_BC, h_kv, kvh, d);
    flash_load_tile(vs, v, bi * s + j0, cols, FLASH_BC, h_kv, kvh, d);
    for (int idx = threadIdx.x; idx < FLASH_BC * d; idx += blockDim.x) {
        dks[idx] = 0.0f;
        dvs[idx] = 0.0f;
    }
    // With the causal mask only queries i ≥ j0 see this tile.
    const int i_start = causal ? (j0 / FLASH_BR_KV) * FLASH_BR_KV : 0;
    for (int hh = kvh * group; hh < (kvh + 1) * group; hh++) {
        for (int i0 = i_start; i0 < t; i0 += FLASH_BR_KV) {
            const int rows = min(FLASH_BR_KV, t - i0);
            __syncthreads();
            flash_load_tile(qs, q, bi * t + i0, rows, FLASH_BR_KV, h, hh, d);
            flash_load_tile(dos, dout, bi * t + i0, rows, FLASH_BR_KV, h, hh, d);
            for (int r = threadIdx.x; r < FLASH_BR_KV; r += blockDim.x) {
                const float* st = stats + ((bi * h + hh) * t + i0 + r) * 2;
                st_lse[r] = r < rows ? st[0] : neg_inf();
                st_d[r] = r < rows ? st[1] : 0.0f;
            }
            __syncthreads();
            flash_scores(ds, qs, ks, FLASH_BR_KV, rows, cols, i0, j0, km, bias_table, rel_buckets, t, h, hh, d, causal,
                         scale);
            __syncthreads();
            flash_dscores(ds, ps, dos, vs, st_lse, st_d, FLASH_BR_KV, d);
            __syncthreads();
            for (int idx = threadIdx.x; idx < FLASH_BC * d; idx += blockDim.x) {
                const int c = idx / d, dd = idx % d;
                float acc_v = 0.0f, acc_k = 0.0f;
                for (int r = 0; r < FLASH_BR_KV; r++) {
                    acc_v += ps[r * FLASH_BC + c] * dos[r * d + dd];
                    acc_k += ds[r * FLASH_BC + c] * qs[r * d + dd];
                }
                dvs[idx] += acc_v;
                dks[idx] += scale * acc_k;
            }
        }
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < cols * d; idx += blockDim.x) {
        const int c = idx / d, dd = idx % d;
        const long at = (bi * s + j0 + c) * h_kv * d + (long)kvh * d + dd;
        dk[at] = from_float<T>(dks[idx]);
        dv[at] = from_float<T>(dvs[idx]);
    }
}
INSTANTIATE(attention_backward_dkv, FLASH_BLOCK,
            (T * dk, T* dv, const float* stats, const T* dout, const T* q, const T* k, const T* v,
             const int* key_mask, const T* bias_table, const int* rel_buckets, int b, int t, int s, int h, int h_kv,
             int d, int causal, float scale),
            (dk, dv, stats, dout, q, k, v, key_mask, bias_table, rel_buckets, b, t, s, h, h_kv, d, causal, scale))

// dq (B, T, H·D) (=). Grid (B·H·ceil(T/BR)), block 128, smem (3·BR + 2·BC)·D + BR·BC + 2·BR floats.
template <typename T>
__device__ void attention_backward_dq(T* dq, const float* stats, const T* dout, const T* q, const T* k, const T* v,
                                      const int* key_mask, const T* bias_table, const int* rel_buckets, int b, int t,
                                      int s, int h, int h_kv, int d, int causal, float scale) {
    DYNAMIC_SMEM(float, smem);
    float* qs = smem;                          // (BR, D)
    float* dos = qs + FLASH_BR * d;            // (BR, D)
    float* dqs = dos + FLASH_BR * d;           // (BR, D)
    float* ks = dqs + FLASH_BR * d;            // (BC, D)
    float* vs = ks + FLASH_BC * d;             // (BC, D)
    float* ds = vs + FLASH_BC * d;             // (BR, BC) scores, then dS
    float* st_lse = ds + FLASH_BR * FLASH_BC;  // (BR)
    float* st_d = st_lse + FLASH_BR;           // (BR)
    long bi;
    int hh, i0;
    if (!flash_block(bi, hh, i0, t, h, FLASH_BR, b)) return;
    const int kvh = hh / (h / h_kv);
    const int rows = min(FLASH_BR, t - i0);
    const int* km = key_mask + bi * s;
    flash_load_tile(qs, q, bi * t + i0, rows, FLASH_BR, h, hh, d);
    flash_load_tile(dos, dout, bi * t + i0, rows, FLASH_BR, h, hh, d);
    for (int idx = threadIdx.x; idx < FLASH_BR * d; idx += blockDim.x) dqs[idx] = 0.0f;
    for (int r = threadIdx.x; r < FLASH_BR; r += blockDim.x) {
        const float* st = stats + ((bi * h + hh) * t + i0 + r) * 2;
        st_lse[r] = r < rows ? st[0] : neg_inf();
        st_d[r] = r < rows ? st[1] : 0.0f;
    }
    const int s_end = flash_key_end(s, i0, rows, causal);
    for (int j0 = 0; j0 < s_end; j0 += FLASH_BC) {
        const int cols = min(FLASH_BC, s - j0);
        __syncthreads();
        flash_load_tile(ks, k, bi * s + j0, cols, FLASH_BC, h_kv, kvh, d);
        flash_load_tile(vs, v, bi * s + j0, cols, FLASH_BC, h_kv, kvh, d);
        __syncthreads();
        flash_scores(ds, qs, ks, FLASH_BR, rows, cols, i0, j0, km, bias_table, rel_buckets, t, h, hh, d, causal,
                     scale);
        __syncthreads();
        flash_dscores(ds, nullptr, dos, vs, st_lse, st_d, FLASH_BR, d);
        __syncthreads();
        for (int idx = threadIdx.x; idx < FLASH_BR * d; idx += blockDim.x) {
            const int r = idx / d, dd = idx % d;
            float acc = 0.0f;
            for (int c = 0; c < FLASH_BC; c++) acc += ds[r * FLASH_BC + c] * ks[c * d + dd];
            dqs[idx] += scale * acc;
        }
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < rows * d; idx += blockDim.x) {
        const int r = idx / d, dd = idx % d;
        dq[(bi * t + i0 + r) * h * d + (long)hh * d + dd] = from_float<T>(dqs[idx]);
    }
}
INSTANTIATE(attention_backward_dq, FLASH_BLOCK,
            (T * dq, const float* stats, const T* dout, const T* q, const T* k, const T* v, const int* key_mask,
             const T* bias_table, const int* rel_buckets, int b, int t, int s, int h, int h_kv, int d, int causal,
             float scale),
            (dq, stats, dout, q, k, v, key_mask, bias_table, rel_buckets, b, t, s, h, h_kv, d, causal, scale))

// ---- Flash attention forward on tensor cores (bf16) ---------------------------------------------
//
// As attention_forward, with the two products on mma.sync m16n8k16 (f32 accumulate): each of the 4
// warps owns 16 query rows of a 64-row block and keeps its Q fragments, running max/sum and output
// accumulators in registers; P goes from the S accumulators straight into A fragments (the C layout
// of two adjacent 8-key tiles is the A layout of one 16-key step), rounded to bf16 as FlashAttention
// does. Head widths D = 64 and 128 (one instance each), bf16 storage only. Not yet the default: it
// becomes so once `fastpt doctor` has passed it on a GPU (AttentionKernel::FlashTc).

#define MMA_BR 64  // query rows per block: 4 warps × 16

// The body of a tensor-core kernel: the call, or a trap where the GPU has no bf16 mma (below
// sm_80; GpuBackend never launches these there, and the template is then never instantiated).
// At least one block per SM is all these kernels ask of ptxas: with `__launch_bounds__(128)` alone
// it aims at four (128 registers each) and spills the D = 64 forward on sm_80.
#define TC_LAUNCH_BOUNDS __launch_bounds__(FLASH_BLOCK, 1)
#if FASTPT_TENSOR_CORES
#define TC_BODY(call) call
#else
#define TC_BODY(call) __trap()
#endif
#define MMA_BC 32  // keys per tile

// STATS: only the row statistics, for the backward: stats[row·2] = the f32 log-sum-exp (a bf16
// one is too coarse to rebuild probabilities from); out, lse and v are not touched.
template <int D, bool STATS>
__device__ void attention_forward_tc(bf16* out, bf16* lse, float* stats, const bf16* q, const bf16* k,
                                     const bf16* v, const int* key_mask, const bf16* bias_table,
                                     const int* rel_buckets, int b, int t, int s, int h, int h_kv, int causal,
                                     float scale) {
    SHARED(bf16, qs, MMA_BR * D);  // (BR, D)
    SHARED(bf16, ks, MMA_BC * D);  // (BC, D)
    SHARED(bf16, vs, MMA_BC * D);  // (BC, D)
    long bi;
    int hh, i0;
    if (!flash_block(bi, hh, i0, t, h, MMA_BR, b)) return;
    const int kvh = hh / (h / h_kv);
    const int rows = min(MMA_BR, t - i0);
    const int* km = key_mask + bi * s;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, tq = lane % 4;
    flash_load_tile(qs, q, bi * t + i0, rows, MMA_BR, h, hh, D);
    __syncthreads();
    // This warp's Q fragments, one per 16-wide step along D.
    unsigned qa[D / 16][4];
    const int r0 = warp * 16 + g;  // this lane's rows in the block: r0 and r0 + 8
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++) {
        const int c0 = 16 * kk + 2 * tq;
        qa[kk][0] = pack_bf16(qs[r0 * D + c0], qs[r0 * D + c0 + 1]);
        qa[kk][1] = pack_bf16(qs[(r0 + 8) * D + c0], qs[(r0 + 8) * D + c0 + 1]);
        qa[kk][2] = pack_bf16(qs[r0 * D + c0 + 8], qs[r0 * D + c0 + 9]);
        qa[kk][3] = pack_bf16(qs[(r0 + 8) * D + c0 + 8], qs[(r0 + 8) * D + c0 + 9]);
    }
    float o[D / 8][4];  // output accumulators: o[n][e] = row r0 + 8·(e ≥ 2), column 8n + 2·tq + (e & 1)
#pragma unroll
    for (int n = 0; n < D / 8; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    float row_m[2] = {neg_inf(), neg_inf()}, row_l[2] = {0.0f, 0.0f};
    const int s_end = flash_key_end(s, i0, rows, causal);
    for (int j0 = 0; j0 < s_end; j0 += MMA_BC) {
        __syncthreads();  // the previous tile's readers are done
        const int cols = min(MMA_BC, s - j0);
        flash_load_tile(ks, k, bi * s + j0, cols, MMA_BC, h_kv, kvh, D);
        if (!STATS) flash_load_tile(vs, v, bi * s + j0, cols, MMA_BC, h_kv, kvh, D);
        __syncthreads();
        // S (16 × BC) of this warp: BC/8 tiles of 8 keys.
        float sc[MMA_BC / 8][4];
#pragma unroll
        for (int n = 0; n < MMA_BC / 8; n++) {
            sc[n][0] = sc[n][1] = sc[n][2] = sc[n][3] = 0.0f;
            const int key = n * 8 + g;
#pragma unroll
            for (int kk = 0; kk < D / 16; kk++) {
                const int c0 = 16 * kk + 2 * tq;
                const unsigned kb[2] = {pack_bf16(ks[key * D + c0], ks[key * D + c0 + 1]),
                                        pack_bf16(ks[key * D + c0 + 8], ks[key * D + c0 + 9])};
                mma_m16n8k16_bf16(sc[n], qa[kk], kb, sc[n]);
            }
        }
        // Scale, bias, masks; the tile's row maxima (each row is spread over the 4 lanes of a group).
        float tile_m[2] = {neg_inf(), neg_inf()};
#pragma unroll
        for (int n = 0; n < MMA_BC / 8; n++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int i = i0 + r0 + (e >= 2 ? 8 : 0), j = j0 + n * 8 + 2 * tq + (e & 1);
                float x = neg_inf();
                if (i < t && j < s && km[j] != 0 && !(causal && j > i)) {
                    x = scale * sc[n][e];
                    if (bias_table) x += to_float(bias_table[(long)rel_buckets[j - i + t - 1] * h + hh]);
                }
                sc[n][e] = x;
                tile_m[e >= 2] = max_nan(tile_m[e >= 2], x);
            }
        }
        float alpha[2];
#pragma unroll
        for (int r = 0; r < 2; r++) {
            tile_m[r] = max_nan(tile_m[r], __shfl_xor_sync(0xffffffffu, tile_m[r], 1));
            tile_m[r] = max_nan(tile_m[r], __shfl_xor_sync(0xffffffffu, tile_m[r], 2));
            const float m_new = max_nan(row_m[r], tile_m[r]);
            alpha[r] = m_new == neg_inf() ? 1.0f : expf(row_m[r] - m_new);
            row_m[r] = m_new;
        }
        float tile_l[2] = {0.0f, 0.0f};
#pragma unroll
        for (int n = 0; n < MMA_BC / 8; n++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const float m = row_m[e >= 2];
                const float p = sc[n][e] == neg_inf() ? 0.0f : expf(sc[n][e] - m);
                sc[n][e] = p;
                tile_l[e >= 2] += p;
            }
        }
#pragma unroll
        for (int r = 0; r < 2; r++) {
            tile_l[r] += __shfl_xor_sync(0xffffffffu, tile_l[r], 1);
            tile_l[r] += __shfl_xor_sync(0xffffffffu, tile_l[r], 2);
            row_l[r] = row_l[r] * alpha[r] + tile_l[r];
        }
        if (!STATS) {  // the statistics need no output
#pragma unroll
            for (int n = 0; n < D / 8; n++) {
                o[n][0] *= alpha[0];
                o[n][1] *= alpha[0];
                o[n][2] *= alpha[1];
                o[n][3] *= alpha[1];
            }
            // O += P·V, 16 keys per step: P's A fragments are the S accumulators of two 8-key tiles.
#pragma unroll
            for (int kk = 0; kk < MMA_BC / 16; kk++) {
                const unsigned pa[4] = {pack_bf16(sc[2 * kk][0], sc[2 * kk][1]), pack_bf16(sc[2 * kk][2], sc[2 * kk][3]),
                                        pack_bf16(sc[2 * kk + 1][0], sc[2 * kk + 1][1]),
                                        pack_bf16(sc[2 * kk + 1][2], sc[2 * kk + 1][3])};
                const int key = 16 * kk + 2 * tq;
#pragma unroll
                for (int n = 0; n < D / 8; n++) {
                    const int col = n * 8 + g;
                    const unsigned vb[2] = {pack_bf16(vs[key * D + col], vs[(key + 1) * D + col]),
                                            pack_bf16(vs[(key + 8) * D + col], vs[(key + 9) * D + col])};
                    mma_m16n8k16_bf16(o[n], pa, vb, o[n]);
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < 2; r++) {
        const int i = i0 + r0 + 8 * r;
        if (i >= t) continue;
        const float l = row_l[r];
        if (STATS) {
            if (tq == 0) stats[((bi * h + hh) * t + i) * 2] = row_m[r] != neg_inf() ? row_m[r] + logf(l) : neg_inf();
            continue;
        }
        // No visible key: max −inf, output 0. A NaN score: max NaN, output NaN (max_nan).
        const float inv = row_m[r] != neg_inf() ? 1.0f / l : 0.0f;
        bf16* dst = out + (bi * t + i) * h * D + (long)hh * D;
#pragma unroll
        for (int n = 0; n < D / 8; n++) {
            dst[n * 8 + 2 * tq] = __float2bfloat16(o[n][2 * r] * inv);
            dst[n * 8 + 2 * tq + 1] = __float2bfloat16(o[n][2 * r + 1] * inv);
        }
        if (tq == 0)
            lse[(bi * h + hh) * t + i] = __float2bfloat16(row_m[r] != neg_inf() ? row_m[r] + logf(l) : neg_inf());
    }
}

#define INSTANTIATE_ATTENTION_FORWARD_TC(D)                                                                                \
    extern "C" __global__ void TC_LAUNCH_BOUNDS attention_forward_tc_d##D##_bf16(                                          \
        bf16* out, bf16* lse, const bf16* q, const bf16* k, const bf16* v, const int* key_mask,                            \
        const bf16* bias_table, const int* rel_buckets, int b, int t, int s, int h, int h_kv, int d, int causal,           \
        float scale) {                                                                                                     \
        TC_BODY((attention_forward_tc<D, false>(out, lse, nullptr, q, k, v, key_mask, bias_table, rel_buckets, b, t, s, h, \
                                       h_kv, causal, scale)));                                                             \
    }                                                                                                                      \
    VGPU_KERNEL(attention_forward_tc_d##D##_bf16, FLASH_BLOCK)                                                             \
    extern "C" __global__ void TC_LAUNCH_BOUNDS attention_stats_tc_d##D##_bf16(                                            \
        float* stats, const bf16* q, const bf16* k, const int* key_mask, const bf16* bias_table,                           \
        const int* rel_buckets, int b, int t, int s, int h, int h_kv, int d, int causal, float scale) {                    \
        TC_BODY((attention_forward_tc<D, true>(nullptr, nullptr, stats, q, k, nullptr, key_mask, bias_table, rel_buckets,  \
                                      b, t, s, h, h_kv, causal, scale)));                                                  \
    }                                                                                                                      \
    VGPU_KERNEL(attention_stats_tc_d##D##_bf16, FLASH_BLOCK)
INSTANTIATE_ATTENTION_FORWARD_TC(64)
INSTANTIATE_ATTENTION_FORWARD_TC(128)

// ---- Flash attention backward on tensor cores (bf16) ------------------------------------------------
//
// The scalar backward's split on mma.sync: dk/dv by blocks of 64 keys (16 per warp, transposed
// products Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ so that Pᵀ and dSᵀ feed dV += Pᵀ·dO and dK += dSᵀ·Q straight
// from the accumulators), dq by blocks of 64 query rows (dQ += dS·K). stats (B, H, T, 2) f32 as
// the scalar kernels: the f32 lse from attention_stats_tc, D = rowsum(dout ⊙ out) from
// attention_backward_prep. K/V and Q/dO tiles live in shared memory; fragments are built from it.

#define TC_KEYS 64     // keys per dk/dv block: 4 warps × 16
#define TC_QSTEP 16    // query rows per step of the dk/dv block

// The A fragment of rows r0, r0 + 8 and columns c0.., c0 + 8.. of a row-major (·, D) bf16 tile.
template <int D>
__device__ __forceinline__ void tc_a_frag(unsigned a[4], const bf16* tile, int r0, int c0) {
    a[0] = pack_bf16(tile[r0 * D + c0], tile[r0 * D + c0 + 1]);
    a[1] = pack_bf16(tile[(r0 + 8) * D + c0], tile[(r0 + 8) * D + c0 + 1]);
    a[2] = pack_bf16(tile[r0 * D + c0 + 8], tile[r0 * D + c0 + 9]);
    a[3] = pack_bf16(tile[(r0 + 8) * D + c0 + 8], tile[(r0 + 8) * D + c0 + 9]);
}

// B fragment for X·tileᵀ: B[k = d][n = row] = tile[row][d], rows n0 + g, d from c0 = 16·kk + 2·tq.
template <int D>
__device__ __forceinline__ void tc_b_frag_t(unsigned bb[2], const bf16* tile, int row, int c0) {
    bb[0] = pack_bf16(tile[row * D + c0], tile[row * D + c0 + 1]);
    bb[1] = pack_bf16(tile[row * D + c0 + 8], tile[row * D + c0 + 9]);
}

// B fragment for X·tile: B[k = row][n = d] = tile[row][d], rows k0 = 16·kk + 2·tq (and +1, +8, +9),
// column col.
template <int D>
__device__ __forceinline__ void tc_b_frag_n(unsigned bb[2], const bf16* tile, int k0, int col) {
    bb[0] = pack_bf16(tile[k0 * D + col], tile[(k0 + 1) * D + col]);
    bb[1] = pack_bf16(tile[(k0 + 8) * D + col], tile[(k0 + 9) * D + col]);
}

// The A fragment of a 16 × 16 step built from the accumulators of two 8-wide tiles.
__device__ __forceinline__ void tc_a_from_acc(unsigned a[4], const float lo[4], const float hi[4]) {
    a[0] = pack_bf16(lo[0], lo[1]);
    a[1] = pack_bf16(lo[2], lo[3]);
    a[2] = pack_bf16(hi[0], hi[1]);
    a[3] = pack_bf16(hi[2], hi[3]);
}

// The masked, biased, scaled score of query i and key j, or −inf.
__device__ __forceinline__ float tc_score(float dot, int i, int j, int t, int s, const int* km,
                                          const bf16* bias_table, const int* rel_buckets, int h, int hh, int causal,
                                          float scale) {
    if (i >= t || j >= s || km[j] == 0 || (causal && j > i)) return neg_inf();
    float x = scale * dot;
    if (bias_table) x += to_float(bias_table[(long)rel_buckets[j - i + t - 1] * h + hh]);
    return x;
}

// dk, dv (B, S, Hkv·D) (=). Grid (B·Hkv·ceil(S/64)), block 128, static shared memory.
template <int D>
__device__ void attention_backward_dkv_tc(bf16* dk, bf16* dv, const float* stats, const bf16* dout, const bf16* q,
                                          const bf16* k, const bf16* v, const int* key_mask,
                                          const bf16* bias_table, const int* rel_buckets, int b, int t, int s, int h,
                                          int h_kv, int causal, float scale) {
    SHARED(bf16, ks, TC_KEYS * D);    // (64, D)
    SHARED(bf16, vs, TC_KEYS * D);    // (64, D)
    SHARED(bf16, qs, TC_QSTEP * D);   // (16, D)
    SHARED(bf16, dos, TC_QSTEP * D);  // (16, D)
    SHARED(float, st_lse, TC_QSTEP);
    SHARED(float, st_d, TC_QSTEP);
    long bi;
    int kvh, j0;
    if (!flash_block(bi, kvh, j0, s, h_kv, TC_KEYS, b)) return;
    const int group = h / h_kv;
    const int* km = key_mask + bi * s;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, tq = lane % 4;
    const int kw = warp * 16;  // this warp's keys in the block: kw + g and kw + g + 8
    const int cols = min(TC_KEYS, s - j0);
    flash_load_tile(ks, k, bi * s + j0, cols, TC_KEYS, h_kv, kvh, D);
    flash_load_tile(vs, v, bi * s + j0, cols, TC_KEYS, h_kv, kvh, D);
    float acc_dk[D / 8][4], acc_dv[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; n++)
        for (int e = 0; e < 4; e++) acc_dk[n][e] = acc_dv[n][e] = 0.0f;
    const int i_start = causal ? (j0 / TC_QSTEP) * TC_QSTEP : 0;
    for (int hh = kvh * group; hh < (kvh + 1) * group; hh++) {
        for (int i0 = i_start; i0 < t; i0 += TC_QSTEP) {
            __syncthreads();
            const int rows = min(TC_QSTEP, t - i0);
            flash_load_tile(qs, q, bi * t + i0, rows, TC_QSTEP, h, hh, D);
            flash_load_tile(dos, dout, bi * t + i0, rows, TC_QSTEP, h, hh, D);
            for (int r = threadIdx.x; r < TC_QSTEP; r += blockDim.x) {
                const bool in = i0 + r < t;
                const float* st = stats + ((bi * h + hh) * t + i0 + r) * 2;
                st_lse[r] = in ? st[0] : neg_inf();
                st_d[r] = in ? st[1] : 0.0f;
            }
            __syncthreads();
            // Sᵀ and dPᵀ (16 keys × 16 queries): two 8-query tiles each.
            float p[2][4], ds[2][4];
#pragma unroll
            for (int n = 0; n < 2; n++) {
                float sc[4] = {0.0f, 0.0f, 0.0f, 0.0f}, dp[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
                for (int kk = 0; kk < D / 16; kk++) {
                    unsigned a[4], bb[2];
                    tc_a_frag<D>(a, ks, kw + g, 16 * kk + 2 * tq);
                    tc_b_frag_t<D>(bb, qs, n * 8 + g, 16 * kk + 2 * tq);
                    mma_m16n8k16_bf16(sc, a, bb, sc);
                    tc_a_frag<D>(a, vs, kw + g, 16 * kk + 2 * tq);
                    tc_b_frag_t<D>(bb, dos, n * 8 + g, 16 * kk + 2 * tq);
                    mma_m16n8k16_bf16(dp, a, bb, dp);
                }
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int qi = n * 8 + 2 * tq + (e & 1), key = kw + g + (e >= 2 ? 8 : 0);
                    const float x = tc_score(sc[e], i0 + qi, j0 + key, t, s, km, bias_table, rel_buckets, h, hh,
                                             causal, scale);
                    p[n][e] = flash_prob(x, st_lse[qi]);
                    ds[n][e] = p[n][e] * (dp[e] - st_d[qi]);
                }
            }
            // dV += Pᵀ·dO and dK += dSᵀ·Q over the 16 queries of this step.
            unsigned pa[4], dsa[4];
            tc_a_from_acc(pa, p[0], p[1]);
            tc_a_from_acc(dsa, ds[0], ds[1]);
#pragma unroll
            for (int n = 0; n < D / 8; n++) {
                unsigned bb[2];
                tc_b_frag_n<D>(bb, dos, 2 * tq, n * 8 + g);
                mma_m16n8k16_bf16(acc_dv[n], pa, bb, acc_dv[n]);
                tc_b_frag_n<D>(bb, qs, 2 * tq, n * 8 + g);
                mma_m16n8k16_bf16(acc_dk[n], dsa, bb, acc_dk[n]);
            }
        }
    }
#pragma unroll
    for (int r = 0; r < 2; r++) {
        const int j = j0 + kw + g + 8 * r;
        if (j >= s) continue;
        const long at = (bi * s + j) * h_kv * D + (long)kvh * D;
#pragma unroll
        for (int n = 0; n < D / 8; n++) {
            const int col = n * 8 + 2 * tq;
            dk[at + col] = __float2bfloat16(scale * acc_dk[n][2 * r]);
            dk[at + col + 1] = __float2bfloat16(scale * acc_dk[n][2 * r + 1]);
            dv[at + col] = __float2bfloat16(acc_dv[n][2 * r]);
            dv[at + col + 1] = __float2bfloat16(acc_dv[n][2 * r + 1]);
        }
    }
}

// dq (B, T, H·D) (=). Grid (B·H·ceil(T/64)), block 128, static shared memory.
template <int D>
__device__ void attention_backward_dq_tc(bf16* dq, const float* stats, const bf16* dout, const bf16* q,
                                         const bf16* k, const bf16* v, const int* key_mask, const bf16* bias_table,
                                         const int* rel_buckets, int b, int t, int s, int h, int h_kv, int causal,
                                         float scale) {
    SHARED(bf16, rows_s, MMA_BR * D);  // (64, D): Q, then dO, staged for their fragments
    SHARED(bf16, ks, MMA_BC * D);      // (BC, D)
    SHARED(bf16, vs, MMA_BC * D);      // (BC, D)
    long bi;
    int hh, i0;
    if (!flash_block(bi, hh, i0, t, h, MMA_BR, b)) return;
    const int kvh = hh / (h / h_kv);
    const int rows = min(MMA_BR, t - i0);
    const int* km = key_mask + bi * s;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, tq = lane % 4;
    const int r0 = warp * 16 + g;
    unsigned qa[D / 16][4], da[D / 16][4];
    for (int pass = 0; pass < 2; pass++) {
        const bf16* src = pass == 0 ? q : dout;
        __syncthreads();
        flash_load_tile(rows_s, src, bi * t + i0, rows, MMA_BR, h, hh, D);
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) tc_a_frag<D>(pass == 0 ? qa[kk] : da[kk], rows_s, r0, 16 * kk + 2 * tq);
    }
    float row_lse[2], row_d[2];
    for (int r = 0; r < 2; r++) {
        const int i = i0 + r0 + 8 * r;
        const float* st = stats + ((bi * h + hh) * t + i) * 2;
        row_lse[r] = i < t ? st[0] : neg_inf();
        row_d[r] = i < t ? st[1] : 0.0f;
    }
    float acc_dq[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; n++) acc_dq[n][0] = acc_dq[n][1] = acc_dq[n][2] = acc_dq[n][3] = 0.0f;
    const int s_end = flash_key_end(s, i0, rows, causal);
    for (int j0 = 0; j0 < s_end; j0 += MMA_BC) {
        __syncthreads();
        const int cols = min(MMA_BC, s - j0);
        flash_load_tile(ks, k, bi * s + j0, cols, MMA_BC, h_kv, kvh, D);
        flash_load_tile(vs, v, bi * s + j0, cols, MMA_BC, h_kv, kvh, D);
        __syncthreads();
        float ds[MMA_BC / 8][4];
#pragma unroll
        for (int n = 0; n < MMA_BC / 8; n++) {
            float sc[4] = {0.0f, 0.0f, 0.0f, 0.0f}, dp[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
            for (int kk = 0; kk < D / 16; kk++) {
                unsigned bb[2];
                tc_b_frag_t<D>(bb, ks, n * 8 + g, 16 * kk + 2 * tq);
                mma_m16n8k16_bf16(sc, qa[kk], bb, sc);
                tc_b_frag_t<D>(bb, vs, n * 8 + g, 16 * kk + 2 * tq);
                mma_m16n8k16_bf16(dp, da[kk], bb, dp);
            }
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int r = e >= 2, i = i0 + r0 + 8 * r, j = j0 + n * 8 + 2 * tq + (e & 1);
                const float x = tc_score(sc[e], i, j, t, s, km, bias_table, rel_buckets, h, hh, causal, scale);
                const float pr = flash_prob(x, row_lse[r]);
                ds[n][e] = pr * (dp[e] - row_d[r]);
            }
        }
#pragma unroll
        for (int kk = 0; kk < MMA_BC / 16; kk++) {
            unsigned a[4];
            tc_a_from_acc(a, ds[2 * kk], ds[2 * kk + 1]);
#pragma unroll
            for (int n = 0; n < D / 8; n++) {
                unsigned bb[2];
                tc_b_frag_n<D>(bb, ks, 16 * kk + 2 * tq, n * 8 + g);
                mma_m16n8k16_bf16(acc_dq[n], a, bb, acc_dq[n]);
            }
        }
    }
#pragma unroll
    for (int r = 0; r < 2; r++) {
        const int i = i0 + r0 + 8 * r;
        if (i >= t) continue;
        bf16* dst = dq + (bi * t + i) * h * D + (long)hh * D;
#pragma unroll
        for (int n = 0; n < D / 8; n++) {
            dst[n * 8 + 2 * tq] = __float2bfloat16(scale * acc_dq[n][2 * r]);
            dst[n * 8 + 2 * tq + 1] = __float2bfloat16(scale * acc_dq[n][2 * r + 1]);
        }
    }
}

#define INSTANTIATE_ATTENTION_BACKWARD_TC(D)                                                                                \
    extern "C" __global__ void TC_LAUNCH_BOUNDS attention_backward_dkv_tc_d##D##_bf16(                                      \
        bf16* dk, bf16* dv, const float* stats, const bf16* dout, const bf16* q, const bf16* k, const bf16* v,              \
        const int* key_mask, const bf16* bias_table, const int* rel_buckets, int b, int t, int s, int h, int h_kv,          \
        int d, int causal, float scale) {                                                                                   \
        TC_BODY((attention_backward_dkv_tc<D>(dk, dv, stats, dout, q, k, v, key_mask, bias_table, rel_buckets, b, t, s, h,  \
                                     h_kv, causal, scale)));                                                                \
    }                                                                                                                       \
    VGPU_KERNEL(attention_backward_dkv_tc_d##D##_bf16, FLASH_BLOCK)                                                         \
    extern "C" __global__ void TC_LAUNCH_BOUNDS attention_backward_dq_tc_d##D##_bf16(                                       \
        bf16* dq, const float* stats, const bf16* dout, const bf16* q, const bf16* k, const bf16* v,                        \
        const int* key_mask, const bf16* bias_table, const int* rel_buckets, int b, int t, int s, int h, int h_kv,          \
        int d, int causal, float scale) {                                                                                   \
        TC_BODY((attention_backward_dq_tc<D>(dq, stats, dout, q, k, v, key_mask, bias_table, rel_buckets, b, t, s, h, h_kv, \
                                    causal, scale)));                                                                       \
    }                                                                                                                       \
    VGPU_KERNEL(attention_backward_dq_tc_d##D##_bf16, FLASH_BLOCK)
INSTANTIATE_ATTENTION_BACKWARD_TC(64)
INSTANTIATE_ATTENTION_BACKWARD_TC(128)
