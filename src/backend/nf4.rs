//! NF4 quantisation with double quantisation of the block scales, in bitsandbytes' storage
//! layout: the CPU reference of `kernels/nf4.cu` (`nf4_dequantize`).
//!
//! A flat f32 tensor of `n` elements is cut into `nb = ceil(n/64)` blocks of [`NF4_BLOCK`] (the
//! last one partial). Each block keeps its `absmax` (max |x|) and each element the 4-bit index of
//! the [`NF4_CODE`] entry nearest to `x / absmax`:
//!
//! - **Packing**: two codes per byte, element `2j` in the HIGH nibble of byte `j`, element `2j+1`
//!   in the low nibble; `ceil(n/2)` bytes. An odd `n` pads the last low nibble with
//!   [`NF4_ZERO_CODE`] (7, the code of 0.0).
//! - **Nearest code**: the decision thresholds are the midpoints between consecutive codes
//!   (computed in f32); a scaled value exactly on a midpoint takes the LOWER code (the one nearer
//!   −1). The scaled value is `x / absmax` in f32; a block whose absmax is 0 gets code 7 throughout.
//! - **Double quantisation** of the absmax vector: `offset = mean(absmax)` (summed in f64, stored
//!   f32); `centred = absmax − offset`; in blocks of [`ABSMAX_BLOCK`] (256) absmax values,
//!   `absmax_scale[j] = max |centred|` over the block and each `centred / absmax_scale[j]` is
//!   stored as the u8 index of the nearest entry of [`dynamic_map_signed`] (ties to the lower
//!   entry; a block whose scale is 0 stores the index of 0.0).
//! - **Dequantisation**: `absmax[b] = fma(code2[absmax_codes[b]], absmax_scale[b/256], offset)`
//!   (one rounding), `out[i] = NF4_CODE[code(i)] · absmax[i/64]` (one rounding). The kernel does
//!   the same two operations, so its f32 output is bit-identical to [`dequantize_nf4`].
//!
//! The block absmax is quantised only after the codes are chosen: the codes use the exact absmax,
//! and the double-quantisation error shows up as a per-block scale error on dequantisation.
//! Inputs must be finite (checked).

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
/// `10^(i−6)`, with both signs (2·127 values), then 0 and 1. Computed in f64, stored f32. It holds
/// 0.0 (index 127) and 1.0 (index 255) but not −1.0: its minimum is `−(1 − 0.9/128)`.
pub fn dynamic_map_signed() -> [f32; 256] {
    const MAX_EXPONENT_BITS: u32 = 7;
    const TOTAL_BITS: u32 = 8;
    const NON_SIGN_BITS: u32 = TOTAL_BITS - 1;
    // 10^(−(MAX_EXPONENT_BITS−1) + i) as literals, so each is the correctly rounded f64.
    const DECADE: [f64; MAX_EXPONENT_BITS as usize] = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1e0];
    // 2^(NON_SIGN_BITS − MAX_EXPONENT_BITS) − 1 = 0 extra items for this configuration.
    const _: () = assert!(NON_SIGN_BITS == MAX_EXPONENT_BITS);

    let mut data: Vec<f64> = Vec::with_capacity(256);
    for (i, &decade) in DECADE.iter().enumerate() {
        let fraction_items = (1usize << (i as u32 + NON_SIGN_BITS - MAX_EXPONENT_BITS)) + 1;
        let boundary = |k: usize| 0.1 + (1.0 - 0.1) * k as f64 / (fraction_items - 1) as f64;
        for k in 0..fraction_items - 1 {
            let mean = (boundary(k) + boundary(k + 1)) / 2.0;
            data.push(decade * mean);
            data.push(-decade * mean);
        }
    }
    data.push(0.0);
    data.push(1.0);
    assert_eq!(data.len(), 256, "the signed dynamic map has 256 entries");
    let mut map = [0.0f32; 256];
    for (m, &d) in map.iter_mut().zip(&data) {
        *m = d as f32;
    }
    map.sort_by(f32::total_cmp);
    map
}

/// [`dynamic_map_signed`], computed once.
fn dynamic_map() -> &'static [f32; 256] {
    static MAP: OnceLock<[f32; 256]> = OnceLock::new();
    MAP.get_or_init(dynamic_map_signed)
}

/// The index of the dynamic-map entry nearest to `s` (ties to the lower entry).
fn dynamic_nearest(map: &[f32; 256], s: f32) -> u8 {
    let hi = map.partition_point(|&c| c < s).min(255);
    if hi == 0 {
        return 0;
    }
    let lo = hi - 1;
    let (s, a, b) = (s as f64, map[lo] as f64, map[hi] as f64);
    if s - a <= b - s {
        lo as u8
    } else {
        hi as u8
    }
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

    /// The double-dequantised block absmax `(nb)`: `fma(code2[q], scale, offset)` per block.
    pub fn absmax(&self) -> Vec<f32> {
        self.check();
        let map = dynamic_map();
        self.absmax_codes
            .iter()
            .enumerate()
            .map(|(b, &q)| {
                map[q as usize].mul_add(self.absmax_scale[b / ABSMAX_BLOCK], self.offset)
            })
            .collect()
    }

    /// Storage in bytes: packed codes, absmax codes, f32 absmax scales and the f32 offset. The
    /// 1 KiB dynamic map is shared by every tensor and not counted.
    pub fn bytes(&self) -> usize {
        self.packed.len() + self.absmax_codes.len() + 4 * self.absmax_scale.len() + 4
    }

    /// Panics when the buffer lengths do not match `len`.
    fn check(&self) {
        let nb = self.blocks();
        assert!(
            self.packed.len() == self.len.div_ceil(2)
                && self.absmax_codes.len() == nb
                && self.absmax_scale.len() == nb.div_ceil(ABSMAX_BLOCK),
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

/// Quantises `x (n)` to NF4 with double-quantised absmax (see the module docs). Panics on a
/// non-finite element: model loading (`SafetensorsFolder::load_f32`) refuses such weights first.
pub fn quantize_nf4(x: &[f32]) -> Nf4Tensor {
    let n = x.len();
    let nb = n.div_ceil(NF4_BLOCK);
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
        let code = |v: f32| {
            if a > 0.0 {
                nf4_nearest(v / a)
            } else {
                NF4_ZERO_CODE
            }
        };
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
    let map = dynamic_map();
    let zero = dynamic_nearest(map, 0.0);
    let offset = (absmax.iter().map(|&a| a as f64).sum::<f64>() / absmax.len() as f64) as f32;
    let mut codes = Vec::with_capacity(absmax.len()); // (nb)
    let mut scales = Vec::with_capacity(absmax.len().div_ceil(ABSMAX_BLOCK)); // (ceil(nb/256))
    for block in absmax.chunks(ABSMAX_BLOCK) {
        let centred: Vec<f32> = block.iter().map(|&a| a - offset).collect();
        let scale = centred.iter().fold(0.0f32, |m, c| m.max(c.abs()));
        scales.push(scale);
        codes.extend(centred.iter().map(|&c| {
            if scale > 0.0 {
                dynamic_nearest(map, c / scale)
            } else {
                zero
            }
        }));
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
        // Hand values: the extremes of the top and bottom decades.
        assert_eq!(map[254], (1.0 - 0.9 / 128.0) as f32);
        assert_eq!(map[0], -(1.0 - 0.9 / 128.0) as f32);
        assert_eq!(map[128], (0.55e-6f64) as f32);
        assert_eq!(dynamic_nearest(&map, 0.0), 127);
        assert_eq!(dynamic_nearest(&map, 1.0), 255);
        assert_eq!(dynamic_nearest(&map, -1.0), 0);
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
    /// −2/3, −1/3, 0, 1. Nearest map entries: −(0.1 + 0.9·40.5/64) = −0.66953125 (index 23),
    /// −(0.1 + 0.9·16.5/64) = −0.33203125 (index 47), 0 (index 127), 1 (index 255).
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
        assert_eq!(q.absmax_codes, vec![23, 47, 127, 255]);
        let map = dynamic_map_signed();
        assert!((map[23] as f64 + 0.66953125).abs() < 1e-7);
        assert_eq!(map[47], -0.33203125);
        let absmax = q.absmax();
        let want = [3.0 - 3.0 * 0.66953125, 3.0 - 3.0 * 0.33203125, 3.0, 6.0];
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
        assert!(q.absmax_codes.iter().all(|&c| c == 127));
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
