//! NF4 quantisation with double quantisation of the block scales, in bitsandbytes' storage
//! layout and with bitsandbytes' own rounding (0.50, CPU): the CPU reference of
//! `kernels/nf4.cu` (`nf4_dequantize`). `--quant nf4` and a bitsandbytes 4-bit checkpoint
//! (`model::bnb`) both end up in an [`Nf4Tensor`].
//!
//! A flat f32 tensor of `n` elements is cut into `nb = ceil(n/64)` blocks of [`NF4_BLOCK`] (the
//! last one partial). Each block keeps its `absmax` (max |x|) and each element the 4-bit index of
//! an [`NF4_CODE`] entry. The rules below are bitsandbytes' (`quantize_4bit` with
//! `compress_statistics=True`, read in its Python source and its `cpu_ops.cpp`, and checked
//! bit for bit against its output by `tests/bnb_checkpoint.rs`):
//!
//! - **Packing**: two codes per byte, element `2j` in the HIGH nibble of byte `j`, element `2j+1`
//!   in the low nibble; `ceil(n/2)` bytes. An odd `n` pads the last low nibble with
//!   [`NF4_ZERO_CODE`] (7, the code of 0.0: bitsandbytes pads the scaled values with 0).
//! - **Scaled value**: in a full block `s = x · (1/a)` (the f32 reciprocal of the block's absmax
//!   `a`, then one f32 multiply); in the partial final block `s = x / a` (one f32 division).
//!   These differ in the last bit, which moves values that sit on a threshold. `a` is clamped
//!   to at least 1e-38 first, so an all-zero block scales to 0 (code 7).
//! - **Element code**: the number of decision thresholds strictly below `s`, the thresholds being
//!   the f32 midpoints `(c[k] + c[k+1]) / 2` of consecutive codes (`torch.bucketize`, right =
//!   False): a value exactly on a threshold takes the LOWER code.
//! - **Double quantisation** of the absmax vector: `offset = mean(absmax)` as torch computes it in
//!   f32 (a cascade sum over 8-wide vector lanes, single-threaded, then `/ nb`: see
//!   [`torch_mean_f32`]); `centred = absmax − offset` (f32). In blocks of [`ABSMAX_BLOCK`] (256)
//!   values, `absmax_scale[j] = max |centred|` and each `v = centred · (1/absmax_scale[j])` (f32)
//!   is coded by bitsandbytes' CPU `quantize_blockwise`: NOT the nearest entry of
//!   [`dynamic_map_signed`], but a 65536-entry lookup table: `v` (clamped to [−1, 1]) goes to
//!   bin `trunc((v + 1) · 0.5 · 65535 + 0.5)`, and bin `i` holds the number of map midpoints (f32
//!   `0.5 · (m[k] + m[k+1])`) strictly below `−1 + 2i/65535` (f32). Values near a midpoint can so
//!   take the farther entry; this is where exact nearest-entry rounding differed from
//!   bitsandbytes by up to 4e-3 per element. A block whose scale is 0 stores code 0.
//! - **Dequantisation**: `absmax[b] = map[absmax_codes[b]] · absmax_scale[b/256] + offset` with
//!   TWO f32 roundings (bitsandbytes multiplies in `dequantize_blockwise`, then adds the offset
//!   as a separate tensor op; a fused multiply-add differs in the last bit),
//!   `out[i] = NF4_CODE[code(i)] · absmax[i/64]` (one rounding). The kernel does the same
//!   operations (`__fmul_rn`, `__fadd_rn`: no contraction), so its f32 output is bit-identical
//!   to [`dequantize_nf4`].
//!
//! The block absmax is quantised only after the codes are chosen: the codes use the exact absmax,
//! and the double-quantisation error shows up as a per-block scale error on dequantisation.
//! Inputs must be finite (checked).
//!
//! What can still differ from a bitsandbytes run: torch sums the absmax vector per thread when it
//! holds more than 32768 values (tensors over 2M elements) and with 16-wide lanes on some
//! builds, so its `offset` depends on the machine; ours is the single-threaded 8-lane sum (the
//! fixtures are made with one thread). A different offset moves the dequantised values by
//! about one ulp of the offset.

use std::sync::OnceLock;

/// Elements per NF4 block (one absmax each).
pub const NF4_BLOCK: usize = 64;

/// Absmax values per double-quantisation block (one `absmax_scale` each).
pub const ABSMAX_BLOCK: usize = 256;

/// The 16 NF4 code values, index 0..15 (sorted ascending; index 7 is 0.0).
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// The index of 0.0 in [`NF4_CODE`]: the code of an all-zero block and the pad of an odd tail.
pub const NF4_ZERO_CODE: u8 = 7;

/// The decision thresholds: `NF4_MID[k]` is the f32 midpoint of codes `k` and `k + 1`.
const NF4_MID: [f32; 15] = {
    let mut mid = [0.0f32; 15];
    let mut k = 0;
    while k < 15 {
        mid[k] = (NF4_CODE[k] + NF4_CODE[k + 1]) * 0.5;
        k += 1;
    }
    mid
};

/// The index of the [`NF4_CODE`] entry nearest to `s` (ties to the lower code).
fn nf4_nearest(s: f32) -> u8 {
    // The number of thresholds strictly below s: s on a threshold stays with the lower code.
    NF4_MID.partition_point(|&m| m < s) as u8
}

/// The signed 8-bit dynamic map (256 values, sorted ascending) that the absmax vector is
/// double-quantised with: bitsandbytes' `create_dynamic_map(signed=True, max_exponent_bits=7,
/// total_bits=8)`. For decade `i` in 0..7, the midpoints of `linspace(0.1, 1, 2^i + 1)` scaled by
/// `10^(i−6)`, with both signs (2·127 values), then 0 and 1. It holds 0.0 (index 127) and 1.0
/// (index 255) but not −1.0: its minimum is about `−(1 − 0.9/128)`.
///
/// Every step in f32 as torch does it, so the entries equal bitsandbytes' bit for bit (computing
/// in f64 and rounding once differs in the last bit of 72 entries): `torch.linspace` in f32 (step
/// `(1 − 0.1)/(k − 1)`, the first half `fma(step, j, 0.1)`, the second half `fma(−step, k−1−j,
/// 1)`), midpoints `(b[j] + b[j+1]) / 2`, then `f32(10^(i−6)) · midpoint`.
pub fn dynamic_map_signed() -> [f32; 256] {
    const MAX_EXPONENT_BITS: u32 = 7;
    const TOTAL_BITS: u32 = 8;
    const NON_SIGN_BITS: u32 = TOTAL_BITS - 1;
    // 10^(−(MAX_EXPONENT_BITS−1) + i) as literals, each the correctly rounded f32.
    const DECADE: [f32; MAX_EXPONENT_BITS as usize] = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1e0];
    // 2^(NON_SIGN_BITS − MAX_EXPONENT_BITS) − 1 = 0 extra items for this configuration.
    const _: () = assert!(NON_SIGN_BITS == MAX_EXPONENT_BITS);

    let mut data: Vec<f32> = Vec::with_capacity(256);
    for (i, &decade) in DECADE.iter().enumerate() {
        let items = (1usize << (i as u32 + NON_SIGN_BITS - MAX_EXPONENT_BITS)) + 1;
        let boundaries = linspace_f32(0.1, 1.0, items); // (items)
        for w in boundaries.windows(2) {
            let mean = (w[0] + w[1]) / 2.0;
            data.push(decade * mean);
            data.push(-(decade * mean));
        }
    }
    data.push(0.0);
    data.push(1.0);
    assert_eq!(data.len(), 256, "the signed dynamic map has 256 entries");
    let mut map = [0.0f32; 256];
    map.copy_from_slice(&data);
    map.sort_by(f32::total_cmp);
    map
}

/// `torch.linspace(start, end, steps, dtype=float32)` on the CPU: an f32 step, the first half
/// counted up from `start` and the second half down from `end`, each with one fused
/// multiply-add (checked against torch for 2..129 steps by the dynamic-map golden).
fn linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps)
        .map(|j| {
            if j < half {
                step.mul_add(j as f32, start)
            } else {
                (-step).mul_add((steps - 1 - j) as f32, end)
            }
        })
        .collect()
}

/// [`dynamic_map_signed`], computed once.
fn dynamic_map() -> &'static [f32; 256] {
    static MAP: OnceLock<[f32; 256]> = OnceLock::new();
    MAP.get_or_init(dynamic_map_signed)
}

/// Bins of bitsandbytes' CPU lookup table for 8-bit blockwise quantisation.
const LUT_BINS: usize = 65536;

/// bitsandbytes' CPU lookup table of [`dynamic_map_signed`]: bin `i` covers the value
/// `−1 + 2i/65535` (f32) and holds the number of map midpoints `0.5 · (m[k] + m[k+1])` (f32)
/// strictly below it.
fn dynamic_lut() -> &'static [u8] {
    static LUT: OnceLock<Vec<u8>> = OnceLock::new();
    LUT.get_or_init(|| {
        let map = dynamic_map();
        let mid: Vec<f32> = map.windows(2).map(|w| 0.5 * (w[0] + w[1])).collect(); // (255)
        (0..LUT_BINS)
            .map(|i| {
                let val = -1.0f32 + (2.0f32 * i as f32) / (LUT_BINS - 1) as f32;
                mid.partition_point(|&m| m < val) as u8
            })
            .collect()
    })
}

/// The dynamic-map code of a scaled absmax `v` as bitsandbytes' CPU `quantize_blockwise` picks
/// it: clamp to [−1, 1], bin `trunc((v + 1) · 0.5 · 65535 + 0.5)` (f32, each step rounded), the
/// table's entry for that bin.
fn dynamic_code(lut: &[u8], v: f32) -> u8 {
    let v = v.clamp(-1.0, 1.0);
    let bin = ((v + 1.0) * 0.5 * (LUT_BINS - 1) as f32 + 0.5) as usize;
    lut[bin.min(LUT_BINS - 1)]
}

/// The mean of `x` as `torch.mean` computes it for a contiguous f32 vector on the CPU with one
/// thread (0 for an empty vector): an f32 sum, then one f32 division by the count.
///
/// The sum (ATen's vectorised inner sum) reads `x` as 8-lane vectors; the `x.len()/8` vectors
/// are taken 4 at a time (4 lane-wise partial sums) through a cascade of 4 accumulator levels
/// of `2^p` rows each, `p = max(4, ceil(log2(rows))/4)`: rows go into level 0, and after every
/// `2^p` rows each level spills into the next until the row count is not a multiple of that
/// level's span. Leftover vectors are added to partial 0, the partials are added lane-wise (1,
/// 2, 3 into 0), then the scalar tail (from 0.0) and finally the 8 lanes in order. Checked
/// against torch 2.15 on lengths 1..40000 (all equal); bitsandbytes' offset is this value.
pub fn torch_mean_f32(x: &[f32]) -> f32 {
    const LANES: usize = 8;
    const ILP: usize = 4;
    const LEVELS: usize = 4;
    type Lanes = [f32; LANES];
    let add = |a: &mut Lanes, b: &Lanes| a.iter_mut().zip(b).for_each(|(a, b)| *a += b);
    if x.is_empty() {
        return 0.0;
    }
    let vectors = x.len() / LANES;
    let rows = vectors / ILP; // rows of ILP vectors
    let load = |v: usize| -> Lanes {
        let mut l = [0.0f32; LANES];
        l.copy_from_slice(&x[v * LANES..(v + 1) * LANES]);
        l
    };
    let ceil_log2 = |n: usize| -> u32 {
        if n <= 2 {
            1
        } else {
            usize::BITS - (n - 1).leading_zeros()
        }
    };
    let power = 4.max(ceil_log2(rows) / LEVELS as u32);
    let span = 1usize << power;
    let mut acc = [[[0.0f32; LANES]; ILP]; LEVELS]; // (LEVELS, ILP, LANES)
    let mut r = 0;
    while r + span <= rows {
        for _ in 0..span {
            for (k, a) in acc[0].iter_mut().enumerate() {
                add(a, &load(r * ILP + k));
            }
            r += 1;
        }
        for j in 1..LEVELS {
            let lower = acc[j - 1];
            for (a, l) in acc[j].iter_mut().zip(&lower) {
                add(a, l);
            }
            acc[j - 1] = [[0.0; LANES]; ILP];
            let mask = (span - 1) << (j as u32 * power);
            if r & mask != 0 {
                break;
            }
        }
    }
    while r < rows {
        for (k, a) in acc[0].iter_mut().enumerate() {
            add(a, &load(r * ILP + k));
        }
        r += 1;
    }
    for j in 1..LEVELS {
        let upper = acc[j];
        for (a, u) in acc[0].iter_mut().zip(&upper) {
            add(a, u);
        }
    }
    let mut partial = acc[0];
    for v in rows * ILP..vectors {
        add(&mut partial[0], &load(v));
    }
    for k in 1..ILP {
        let p = partial[k];
        add(&mut partial[0], &p);
    }
    let mut sum = 0.0f32;
    for &t in &x[vectors * LANES..] {
        sum += t;
    }
    for &lane in &partial[0] {
        sum += lane;
    }
    sum / x.len() as f32
}

/// An NF4-quantised flat tensor with double-quantised block absmax (layout in the module docs).
#[derive(Debug, Clone, PartialEq)]
pub struct Nf4Tensor {
    /// Two 4-bit codes per byte, the first element of a pair in the high nibble.
    pub packed: Vec<u8>, // (ceil(n/2))
    /// u8 index into [`dynamic_map_signed`] of each block's centred, scaled absmax.
    pub absmax_codes: Vec<u8>, // (nb = ceil(n/64))
    /// max |absmax − offset| over each block of 256 absmax values.
    pub absmax_scale: Vec<f32>, // (ceil(nb/256))
    /// The mean of the absmax vector (0 for an empty tensor).
    pub offset: f32,
    /// The number of elements `n`.
    pub len: usize,
}

impl Nf4Tensor {
    /// The number of NF4 blocks, `ceil(len/64)`.
    pub fn blocks(&self) -> usize {
        self.len.div_ceil(NF4_BLOCK)
    }

    /// The 4-bit code of element `i`.
    pub fn code(&self, i: usize) -> u8 {
        let byte = self.packed[i / 2];
        if i.is_multiple_of(2) {
            byte >> 4
        } else {
            byte & 0x0f
        }
    }

    /// The double-dequantised block absmax `(nb)`: `code2[q] · scale + offset` per block, two
    /// roundings.
    pub fn absmax(&self) -> Vec<f32> {
        self.check();
        let map = dynamic_map();
        self.absmax_codes
            .iter()
            .enumerate()
            .map(|(b, &q)| map[q as usize] * self.absmax_scale[b / ABSMAX_BLOCK] + self.offset)
            .collect()
    }

    /// Storage in bytes: packed codes, absmax codes, f32 absmax scales and the f32 offset. The
    /// 1 KiB dynamic map is shared by every tensor and not counted.
    pub fn bytes(&self) -> usize {
        Self::bytes_for(self.len)
    }

    /// [`Nf4Tensor::bytes`] of a tensor of `len` elements.
    pub fn bytes_for(len: usize) -> usize {
        let nb = len.div_ceil(NF4_BLOCK);
        len.div_ceil(2) + nb + 4 * nb.div_ceil(ABSMAX_BLOCK) + 4
    }

    /// Whether the buffer lengths match `len` (what `check` asserts).
    pub fn is_consistent(&self) -> bool {
        let nb = self.blocks();
        self.packed.len() == self.len.div_ceil(2)
            && self.absmax_codes.len() == nb
            && self.absmax_scale.len() == nb.div_ceil(ABSMAX_BLOCK)
    }

    /// Panics when the buffer lengths do not match `len`.
    fn check(&self) {
        let nb = self.blocks();
        assert!(
            self.is_consistent(),
            "Nf4Tensor of {} elements needs packed ({}), absmax_codes ({}), absmax_scale ({}); \
             it has ({}), ({}), ({})",
            self.len,
            self.len.div_ceil(2),
            nb,
            nb.div_ceil(ABSMAX_BLOCK),
            self.packed.len(),
            self.absmax_codes.len(),
            self.absmax_scale.len()
        );
    }
}

/// The smallest absmax bitsandbytes divides by (`absmax.clamp(min=1e-38)`).
const MIN_ABSMAX: f32 = 1e-38;

/// Quantises `x (n)` to NF4 with double-quantised absmax (see the module docs). Panics on a
/// non-finite element: model loading (`SafetensorsFolder::load_f32`) refuses such weights first.
pub fn quantize_nf4(x: &[f32]) -> Nf4Tensor {
    let n = x.len();
    let nb = n.div_ceil(NF4_BLOCK);
    let full_blocks = n / NF4_BLOCK;
    let mut packed = vec![0u8; n.div_ceil(2)]; // (ceil(n/2))
    let mut absmax = vec![0.0f32; nb]; // (nb)
    for (b, (block, out)) in x
        .chunks(NF4_BLOCK)
        .zip(packed.chunks_mut(NF4_BLOCK / 2))
        .enumerate()
    {
        let mut a = 0.0f32;
        for (k, &v) in block.iter().enumerate() {
            assert!(
                v.is_finite(),
                "quantize_nf4: element {} is {v}; only finite values can be quantised",
                b * NF4_BLOCK + k
            );
            a = a.max(v.abs());
        }
        absmax[b] = a;
        let a = a.max(MIN_ABSMAX);
        // Full blocks multiply by the reciprocal, the partial final block divides (bitsandbytes'
        // two code paths; the results differ in the last bit).
        let inv = 1.0 / a;
        let full = b < full_blocks;
        let code = |v: f32| nf4_nearest(if full { v * inv } else { v / a });
        for (pair, byte) in block.chunks(2).zip(out.iter_mut()) {
            let hi = code(pair[0]);
            let lo = pair.get(1).map_or(NF4_ZERO_CODE, |&v| code(v));
            *byte = (hi << 4) | lo;
        }
    }
    let (absmax_codes, absmax_scale, offset) = double_quantize(&absmax);
    Nf4Tensor {
        packed,
        absmax_codes,
        absmax_scale,
        offset,
        len: n,
    }
}

/// `absmax (nb)` → (codes (nb), scales (ceil(nb/256)), offset).
fn double_quantize(absmax: &[f32]) -> (Vec<u8>, Vec<f32>, f32) {
    if absmax.is_empty() {
        return (Vec::new(), Vec::new(), 0.0);
    }
    let lut = dynamic_lut();
    let offset = torch_mean_f32(absmax);
    let mut codes = Vec::with_capacity(absmax.len()); // (nb)
    let mut scales = Vec::with_capacity(absmax.len().div_ceil(ABSMAX_BLOCK)); // (ceil(nb/256))
    for block in absmax.chunks(ABSMAX_BLOCK) {
        let centred: Vec<f32> = block.iter().map(|&a| a - offset).collect(); // (≤ 256)
        let scale = centred.iter().fold(0.0f32, |m, c| m.max(c.abs()));
        scales.push(scale);
        if scale == 0.0 {
            // bitsandbytes writes code 0 (map[0] · 0 + offset = offset).
            codes.extend(std::iter::repeat_n(0u8, centred.len()));
            continue;
        }
        let inv = 1.0 / scale;
        codes.extend(centred.iter().map(|&c| dynamic_code(lut, c * inv)));
    }
    (codes, scales, offset)
}

/// Dequantises `q` into `out (q.len)`: `out[i] = NF4_CODE[code(i)] · absmax[i/64]` with the
/// double-dequantised absmax ([`Nf4Tensor::absmax`]).
pub fn dequantize_nf4(out: &mut [f32], q: &Nf4Tensor) {
    assert_eq!(
        out.len(),
        q.len,
        "dequantize_nf4: out has {} elements but the NF4 tensor holds {}",
        out.len(),
        q.len
    );
    let absmax = q.absmax();
    for ((block, bytes), &a) in out
        .chunks_mut(NF4_BLOCK)
        .zip(q.packed.chunks(NF4_BLOCK / 2))
        .zip(&absmax)
    {
        for (pair, &byte) in block.chunks_mut(2).zip(bytes) {
            pair[0] = NF4_CODE[(byte >> 4) as usize] * a;
            if let Some(second) = pair.get_mut(1) {
                *second = NF4_CODE[(byte & 0x0f) as usize] * a;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::gpu::device::{Arg, DType, Device, LaunchCfg};
    use crate::backend::gpu::vgpu::VirtualDevice;
    use crate::testing::rel_err_f32;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;
    use rand_distr::{Distribution, StandardNormal};

    fn gaussian(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n)
            .map(|_| {
                let z: f64 = StandardNormal.sample(&mut rng);
                z as f32
            })
            .collect()
    }

    fn dequant(q: &Nf4Tensor) -> Vec<f32> {
        let mut out = vec![f32::NAN; q.len];
        dequantize_nf4(&mut out, q);
        out
    }

    /// The exact block absmax of `x`, as quantize_nf4 sees it.
    fn true_absmax(x: &[f32]) -> Vec<f32> {
        x.chunks(NF4_BLOCK)
            .map(|b| b.iter().fold(0.0f32, |m, v| m.max(v.abs())))
            .collect()
    }

    /// Half the largest distance from any point of [-1, 1] to its nearest map entry.
    fn half_max_gap(codes: &[f32]) -> f32 {
        let inner = codes
            .windows(2)
            .map(|w| (w[1] - w[0]) / 2.0)
            .fold(0.0f32, f32::max);
        inner.max(codes[0] + 1.0).max(1.0 - codes[codes.len() - 1])
    }

    #[test]
    fn nf4_code_table_is_sorted_with_zero_at_seven() {
        assert!(NF4_CODE.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(NF4_CODE[NF4_ZERO_CODE as usize], 0.0);
        assert_eq!((NF4_CODE[0], NF4_CODE[15]), (-1.0, 1.0));
        for (k, &m) in NF4_MID.iter().enumerate() {
            assert!(NF4_CODE[k] < m && m < NF4_CODE[k + 1]);
            assert_eq!(nf4_nearest(m), k as u8, "tie at threshold {k} goes down");
            assert_eq!(nf4_nearest(m.next_up()), k as u8 + 1);
        }
        for (k, &c) in NF4_CODE.iter().enumerate() {
            assert_eq!(nf4_nearest(c), k as u8);
        }
    }

    #[test]
    fn dynamic_map_signed_has_256_sorted_symmetric_entries() {
        let map = dynamic_map_signed();
        assert_eq!(map.len(), 256);
        assert!(map.windows(2).all(|w| w[0] < w[1]), "strictly ascending");
        assert_eq!(map[127], 0.0);
        assert_eq!(map[255], 1.0);
        assert!(!map.contains(&-1.0));
        // Every entry but 0 and 1 has its negation: index k ↔ 254 − k.
        for k in 0..127 {
            assert_eq!(map[k], -map[254 - k], "entry {k}");
        }
        // Hand values: the extremes of the top and bottom decades (to f32 rounding; the exact
        // bits are checked against bitsandbytes by tests/bnb_checkpoint.rs).
        let near = |a: f32, b: f64| (a as f64 - b).abs() <= 1e-7 * b.abs();
        assert!(near(map[254], 1.0 - 0.9 / 128.0));
        assert!(near(map[0], -(1.0 - 0.9 / 128.0)));
        assert!(near(map[128], 0.55e-6));
        assert!(near(map[131], 2.125e-5));
        let lut = dynamic_lut();
        assert_eq!(dynamic_code(lut, 1.0), 255);
        assert_eq!(dynamic_code(lut, -1.0), 0);
        // 0 falls in bin 32768, whose value −1 + 65536/65535 ≈ 1.53e-5 lies above the midpoint
        // of 7.75e-6 (130) and 2.125e-5 (131): the table's 3e-5 bins cannot hold the small
        // entries, and a centred absmax of 0 comes back as 2.125e-5 · scale.
        assert_eq!(dynamic_code(lut, 0.0), 131);
    }

    /// The offset is torch's f32 mean: on values whose sum rounds differently in another order,
    /// the cascade's order decides. Hand cases: fewer than 8 values are summed in order.
    #[test]
    fn torch_mean_sums_in_the_cascade_order() {
        assert_eq!(torch_mean_f32(&[]), 0.0);
        assert_eq!(torch_mean_f32(&[3.0]), 3.0);
        // Sequential: (1 + 2^-24) + 2^-24 = 1 (each addition rounds back to 1), then / 3.
        let t = f32::EPSILON / 2.0;
        assert_eq!(torch_mean_f32(&[1.0, t, t]), 1.0f32 / 3.0);
        // 8 values are one vector: lanes added in order after a zero tail gives the same.
        let mut x = [0.0f32; 8];
        x[0] = 1.0;
        x[1] = t;
        x[2] = t;
        assert_eq!(torch_mean_f32(&x), 1.0f32 / 8.0);
        // 16 values, two vectors: lane-wise first (lane 1 gets t + t = 2^-23), then lanes in
        // order: 1 + 2^-23 is representable, so the sum keeps it.
        let mut y = [0.0f32; 16];
        y[0] = 1.0;
        y[1] = t;
        y[9] = t;
        assert_eq!(torch_mean_f32(&y), (1.0f32 + f32::EPSILON) / 16.0);
    }

    /// (a) One block, absmax 2 (a power of two, so x / absmax is exact): codes k = j mod 16 in the
    /// first 32 elements, then values on, just above and just below the thresholds.
    #[test]
    fn quantize_hand_block_codes_and_nibble_order() {
        let a = 2.0f32;
        let mut x = vec![0.0f32; 64];
        let mut want = [0u8; 64];
        for j in 0..32 {
            want[j] = (j % 16) as u8;
            x[j] = NF4_CODE[j % 16] * a;
        }
        for k in 0..10 {
            let m = NF4_MID[k];
            x[32 + 3 * k] = m * a; // exactly on the threshold: the lower code
            want[32 + 3 * k] = k as u8;
            x[32 + 3 * k + 1] = m.next_up() * a; // just above: the upper code
            want[32 + 3 * k + 1] = k as u8 + 1;
            x[32 + 3 * k + 2] = m.next_down() * a; // just below: the lower code
            want[32 + 3 * k + 2] = k as u8;
        }
        // 62, 63: a small negative and a small positive value near 0.
        x[62] = -0.04 * a;
        want[62] = 7;
        x[63] = 0.041 * a;
        want[63] = 8;

        let q = quantize_nf4(&x);
        assert_eq!(q.len, 64);
        assert_eq!(q.packed.len(), 32);
        // First element of a pair in the high nibble: codes 0,1 → 0x01, 2,3 → 0x23, ...
        assert_eq!(
            &q.packed[..8],
            &[0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef]
        );
        assert_eq!(&q.packed[8..16], &q.packed[..8]);
        // Threshold 0: 2·mid → 0, next_up → 1 ; element 34 → 0, 35 (threshold 1 on) → 1.
        assert_eq!(q.packed[16], 0x01);
        assert_eq!(q.packed[17], 0x01);
        for (i, &w) in want.iter().enumerate() {
            assert_eq!(q.code(i), w, "element {i} = {}", x[i]);
        }
        // One block: offset = absmax, centred 0, so the absmax comes back exactly.
        assert_eq!(q.offset, a);
        assert_eq!(q.absmax(), vec![a]);
        let out = dequant(&q);
        for j in 0..32 {
            assert_eq!(out[j], x[j], "representable element {j}");
        }
    }

    /// (b) Four blocks with absmax 1, 2, 3, 6: offset 3, centred −2, −1, 0, 3, scale 3, scaled
    /// −2/3, −1/3, 0, 1. Map entries: −(0.1 + 0.9·40.5/64) = −0.66953125 (index 23),
    /// −(0.1 + 0.9·16.5/64) = −0.33203125 (index 47), 2.125e-5 (index 131), 1 (index 255).
    #[test]
    fn double_quant_hand_check() {
        let mut x = vec![0.0f32; 256];
        for (b, &a) in [1.0f32, 2.0, 3.0, 6.0].iter().enumerate() {
            x[b * 64 + 5] = -a;
            x[b * 64 + 6] = 0.5 * a;
        }
        let q = quantize_nf4(&x);
        assert_eq!(q.offset, 3.0);
        assert_eq!(q.absmax_scale, vec![3.0]);
        // Codes by bitsandbytes' lookup table: −2/3 → bin 10923 (value −0.66665, between the
        // midpoints −0.6766 and −0.6625: entry 23), −1/3 → bin 21845 (entry 47), 0 → bin 32768
        // (entry 131 = 2.125e-5, not 0: see dynamic_map_signed_has_256...), 1 → 255.
        assert_eq!(q.absmax_codes, vec![23, 47, 131, 255]);
        let map = dynamic_map_signed();
        assert!((map[23] as f64 + 0.66953125).abs() < 1e-7);
        assert_eq!(map[47], -0.33203125);
        let absmax = q.absmax();
        let want = [
            3.0 - 3.0 * 0.66953125,
            3.0 - 3.0 * 0.33203125,
            3.0 + 3.0 * 2.125e-5,
            6.0,
        ];
        for (got, want) in absmax.iter().zip(want) {
            assert!((*got as f64 - want).abs() < 1e-6, "{got} vs {want}");
        }
        // The elements dequantise with that absmax: code 0 (−1) and code 12, the nearest to 0.5.
        let out = dequant(&q);
        assert_eq!(q.code(5), 0);
        assert_eq!(q.code(6), 12); // 0.5 < (0.4407 + 0.5626)/2
        assert_eq!(out[5], -absmax[0]);
        assert_eq!(out[6], NF4_CODE[12] * absmax[0]);
        assert_eq!(out[64 + 5], -absmax[1]);
        assert_eq!(out[3 * 64 + 5], -6.0);
    }

    /// (c) Gaussian data of odd length: relative L2 error in NF4's range, and exactly
    /// representable data comes back up to the absmax double-quantisation error.
    #[test]
    fn round_trip_gaussian_odd_length() {
        let n = 64 * 37 + 13;
        let x = gaussian(n, 11);
        let q = quantize_nf4(&x);
        assert_eq!(q.packed.len(), n.div_ceil(2));
        assert_eq!(q.absmax_codes.len(), 38);
        assert_eq!(q.absmax_scale.len(), 1);
        assert_eq!(
            q.code(n),
            NF4_ZERO_CODE,
            "odd tail pads the low nibble with 7"
        );
        let err = rel_err_f32(&dequant(&q), &x);
        eprintln!("NF4 round trip, N(0,1), n = {n}: relative L2 error {err:.4}");
        assert!(err > 0.01 && err < 0.12, "relative error {err}");

        // Larger, several 256-blocks of absmax.
        let n = 64 * 600 + 1;
        let x = gaussian(n, 12);
        let q = quantize_nf4(&x);
        assert_eq!(q.absmax_scale.len(), 3);
        let err = rel_err_f32(&dequant(&q), &x);
        eprintln!("NF4 round trip, N(0,1), n = {n}: relative L2 error {err:.4}");
        assert!(err > 0.01 && err < 0.12, "relative error {err}");
    }

    #[test]
    fn representable_values_round_trip_up_to_absmax_error() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let nb = 300; // two absmax blocks, the second partial
        let n = nb * 64 - 17;
        let mut x = Vec::with_capacity(n);
        let mut codes = Vec::with_capacity(n);
        for b in 0..nb {
            let a: f32 = rng.random_range(0.01..3.0);
            for j in 0..64 {
                // Each block holds ±1·a so its absmax is exactly a.
                let k = if j == 0 {
                    15
                } else if j == 1 {
                    0
                } else {
                    rng.random_range(0..16)
                };
                if b * 64 + j < n {
                    x.push(NF4_CODE[k] * a);
                    codes.push(k as u8);
                }
            }
        }
        let q = quantize_nf4(&x);
        let exact = true_absmax(&x);
        let absmax = q.absmax();
        let map = dynamic_map_signed();
        let gap2 = half_max_gap(&map);
        let out = dequant(&q);
        for i in 0..n {
            assert_eq!(q.code(i), codes[i], "element {i}");
            let b = i / 64;
            let da = (absmax[b] - exact[b]).abs();
            let scale = q.absmax_scale[b / ABSMAX_BLOCK];
            assert!(da <= gap2 * scale + 4.0 * f32::EPSILON * exact[b].max(q.offset));
            let bound = NF4_CODE[codes[i] as usize].abs() * da + f32::EPSILON * exact[b];
            assert!(
                (out[i] - x[i]).abs() <= bound,
                "element {i}: {} vs {}, bound {bound}",
                out[i],
                x[i]
            );
        }
    }

    /// (d) An all-zero tensor, a zero block among others, a block with one nonzero, the partial
    /// final block.
    #[test]
    fn zero_single_and_partial_blocks() {
        // All zero, odd length.
        let q = quantize_nf4(&[0.0; 201]);
        assert!(q.packed.iter().all(|&b| b == 0x77));
        assert_eq!(q.offset, 0.0);
        assert_eq!(q.absmax_scale, vec![0.0]);
        // A zero scale: bitsandbytes stores code 0 (map[0] · 0 + offset = offset).
        assert!(q.absmax_codes.iter().all(|&c| c == 0));
        assert!(dequant(&q).iter().all(|&v| v == 0.0));

        // Empty.
        let q = quantize_nf4(&[]);
        assert_eq!((q.packed.len(), q.absmax_codes.len(), q.len), (0, 0, 0));
        assert_eq!(q.bytes(), 4);
        dequantize_nf4(&mut [], &q);

        // Block 0 nonzero, block 1 zero, block 2 one nonzero, block 3 partial (5 elements).
        let n = 3 * 64 + 5;
        let mut x = gaussian(n, 3);
        x[64..128].fill(0.0);
        x[128..192].fill(0.0);
        x[150] = -0.75;
        let q = quantize_nf4(&x);
        assert_eq!(q.packed.len(), 99);
        assert_eq!(q.code(n - 1), nf4_nearest(x[n - 1] / true_absmax(&x)[3]));
        assert_eq!(q.packed[98] & 0x0f, NF4_ZERO_CODE);
        let out = dequant(&q);
        assert!(out[64..128].iter().all(|&v| v == 0.0), "zero block");
        let absmax = q.absmax();
        for (i, &v) in out.iter().enumerate().take(192).skip(128) {
            if i == 150 {
                assert_eq!(q.code(i), 0);
                assert_eq!(v, -absmax[2]);
            } else {
                assert_eq!(q.code(i), NF4_ZERO_CODE);
                assert_eq!(v, 0.0);
            }
        }
        // The partial block's absmax is over its 5 elements only.
        let tail = x[192..].iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let scale = q.absmax_scale[0];
        assert!((absmax[3] - tail).abs() <= half_max_gap(&dynamic_map_signed()) * scale + 1e-6);
        assert!(out[192..].iter().any(|&v| v.abs() == absmax[3]));

        // A single block with one nonzero: its absmax survives double quantisation exactly.
        let mut x = vec![0.0f32; 64];
        x[9] = 0.3;
        let q = quantize_nf4(&x);
        let out = dequant(&q);
        assert_eq!(out[9], 0.3);
        assert!(out.iter().enumerate().all(|(i, &v)| i == 9 || v == 0.0));
    }

    /// (e) Every element is within half the largest code gap of its block's absmax, plus the
    /// absmax error; and its code is the nearest one.
    #[test]
    fn per_element_error_bound() {
        let gap = half_max_gap(&NF4_CODE);
        assert!((gap - (1.0 - 0.696_192_8) / 2.0).abs() < 1e-7);
        for (n, seed) in [(1usize, 1u64), (63, 2), (64 * 5 + 1, 3), (64 * 257 + 31, 4)] {
            let mut x = gaussian(n, seed);
            // Mixed scales across blocks.
            for (b, block) in x.chunks_mut(64).enumerate() {
                let s = 10f32.powi((b % 5) as i32 - 2);
                block.iter_mut().for_each(|v| *v *= s);
            }
            let q = quantize_nf4(&x);
            let exact = true_absmax(&x);
            let absmax = q.absmax();
            let out = dequant(&q);
            for i in 0..n {
                let b = i / 64;
                let da = (absmax[b] - exact[b]).abs();
                let bound = gap * exact[b] + da + 4.0 * f32::EPSILON * exact[b];
                let e = (out[i] - x[i]).abs();
                assert!(e <= bound, "n {n}, element {i}: error {e} > {bound}");
                let s = x[i] / exact[b];
                let c = q.code(i) as usize;
                let d = (s - NF4_CODE[c]).abs();
                assert!(
                    NF4_CODE.iter().all(|&k| d <= (s - k).abs() + 1e-6),
                    "element {i}: code {c} is not the nearest to {s}"
                );
            }
        }
    }

    #[test]
    fn bytes_counts_codes_absmax_and_scales() {
        let q = quantize_nf4(&gaussian(64 * 300 + 1, 9));
        // 19201 codes → 9601 bytes; 301 absmax codes; 2 scales; the offset.
        assert_eq!(q.bytes(), 9601 + 301 + 2 * 4 + 4);
        // About 4.13 bits per element for large tensors.
        let bits = 8.0 * q.bytes() as f64 / q.len as f64;
        assert!(bits > 4.1 && bits < 4.2, "{bits}");
    }

    #[test]
    #[should_panic(expected = "dequantize_nf4: out has 10 elements but the NF4 tensor holds 11")]
    fn dequantize_checks_length() {
        let q = quantize_nf4(&[1.0; 11]);
        dequantize_nf4(&mut [0.0; 10], &q);
    }

    #[test]
    #[should_panic(expected = "only finite values")]
    fn quantize_rejects_nan() {
        quantize_nf4(&[1.0, f32::NAN]);
    }

    /// Runs `nf4_dequantize_{f32,bf16}` on the virtual GPU; returns the output widened to f32.
    fn vgpu_dequantize(q: &Nf4Tensor, dtype: DType, grid: u32, block: u32) -> Vec<f32> {
        let dev = VirtualDevice::new();
        let upload = |bytes: &[u8]| {
            let mut buf = dev.alloc(bytes.len()).unwrap();
            dev.upload(&mut buf, bytes).unwrap();
            buf
        };
        let packed = upload(&q.packed);
        let codes = upload(&q.absmax_codes);
        let scales = upload(bytemuck::cast_slice(&q.absmax_scale));
        let map = dynamic_map_signed();
        let code2 = upload(bytemuck::cast_slice(&map[..]));
        let out = dev.alloc(q.len * dtype.size()).unwrap();
        let args = [
            Arg::Ptr(dev.ptr(&out)),
            Arg::Ptr(dev.ptr(&packed)),
            Arg::Ptr(dev.ptr(&codes)),
            Arg::Ptr(dev.ptr(&scales)),
            Arg::Ptr(dev.ptr(&code2)),
            Arg::I32(q.len as i32),
            Arg::F32(q.offset),
        ];
        let name = format!("nf4_dequantize_{}", dtype.suffix());
        dev.launch(&name, LaunchCfg::linear(grid, block), &args)
            .unwrap();
        let mut bytes = vec![0u8; q.len * dtype.size()];
        dev.download(&out, &mut bytes).unwrap();
        match dtype {
            DType::F32 => bytemuck::pod_collect_to_vec(&bytes),
            DType::Bf16 => bytemuck::pod_collect_to_vec::<u8, half::bf16>(&bytes)
                .iter()
                .map(|v| v.to_f32())
                .collect(),
        }
    }

    #[test]
    fn nf4_dequantize_kernel_matches_cpu() {
        for n in [1usize, 2, 127, 64 * 37 + 13, 64 * 300 + 2] {
            let mut x = gaussian(n, n as u64);
            if n > 200 {
                x[64..128].fill(0.0);
            }
            let q = quantize_nf4(&x);
            let cpu = dequant(&q);
            let nbytes = n.div_ceil(2) as u32;
            // One thread per byte, and fewer blocks than bytes need (the grid-stride loop); the
            // block is always the kernel's __launch_bounds__ (256).
            for (grid, block) in [(nbytes.div_ceil(256), 256), (3, 256), (1, 256)] {
                let f32_out = vgpu_dequantize(&q, DType::F32, grid, block);
                for i in 0..n {
                    assert_eq!(
                        f32_out[i].to_bits(),
                        cpu[i].to_bits(),
                        "f32, n {n}, element {i}"
                    );
                }
                let bf16_out = vgpu_dequantize(&q, DType::Bf16, grid, block);
                for i in 0..n {
                    let want = half::bf16::from_f32(cpu[i]).to_f32();
                    assert_eq!(
                        bf16_out[i].to_bits(),
                        want.to_bits(),
                        "bf16, n {n}, element {i}"
                    );
                }
            }
        }
    }
}
