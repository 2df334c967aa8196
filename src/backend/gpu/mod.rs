//! The GPU backend: every op is a sequence of our kernels (kernels/*.cu) and GEMMs on a
//! [`Device`], the real CUDA device or the virtual GPU.
//!
//! Tensors are stored in one dtype per backend ([`DType::Bf16`] for speed, [`DType::F32`] for
//! tight checks against the CPU); kernels accumulate in f32. Each op checks the lengths of its
//! buffers on the host (the shape check of its dims struct, shared with the CPU backend) before
//! it launches anything, so a shape bug panics with the op's name instead of reading past a
//! buffer on the device.
//!
//! Attention runs on the flash kernels of kernels/attention.cu by default: scores, masks, the T5
//! relative bias (looked up from a `(T+S-1)` vector of bucket ids, never a `(B, H, T, S)` tensor)
//! and the softmax stay in shared memory. The GEMM path ([`AttentionKernel::Gemm`]: batched GEMMs
//! into a `(B, H, T, S)` scratch around a softmax kernel) takes heads wider than
//! [`FLASH_MAX_D`] and is the kernel lab's second variant.
//!
//! The method ops (EPT-MS fusion and experts, LAMP pooling) are GEMMs around the small kernels
//! of kernels/prompt.cu.

pub mod cases;
pub mod check;
pub mod cuda;
pub mod device;
pub mod images;
pub mod nccl;
pub mod nvrtc;
#[cfg(test)]
mod tests;
mod toolkit_paths;
pub mod vgpu;

use std::sync::Arc;

use half::bf16;

use self::device::{Arg, DType, Device, GemmDesc, GpuError, LaunchCfg};
use super::{
    check_add_assign, check_add_bias, check_bias_backward, check_gated_act_backward_dinp,
    check_gated_act_forward, check_gather_rows, check_nf4_dequantize, check_scatter_rows_add,
    check_softmax_rows_backward_dinp, check_softmax_rows_forward, relative_position_bucket,
    Activation, AdamW, AttnDims, AttnMask, Backend, CrossEntropyDims, EmbedPromptDims,
    FusionAttentionDims, FusionMode, GatedExpertsDims, Gemm, LampPoolDims, LayerNormDims, RelBias,
    RmsNormDims, RopeDims,
};
use crate::backend::nf4::{dynamic_map_signed, Nf4Tensor};

/// A tensor on a GPU device: `len` elements of the backend's dtype.
pub struct GpuTensor<D: Device> {
    buf: D::Buffer,
    len: usize,
}

/// A buffer of `len` i32 on a GPU device.
pub struct GpuIndex<D: Device> {
    buf: D::Buffer,
    len: usize,
}

/// Optimiser state on a GPU device: `len` f32 whatever the backend's storage dtype.
pub struct GpuState<D: Device> {
    buf: D::Buffer,
    len: usize,
}

/// An NF4 tensor on a GPU device (the layout of `backend::nf4`).
pub struct GpuNf4<D: Device> {
    packed: D::Buffer,       // (ceil(N/2)) u8, two codes per byte, high nibble first
    absmax_codes: D::Buffer, // (ceil(N/64)) u8 into the dynamic map
    absmax_scale: D::Buffer, // (ceil(N/64/256)) f32
    code2: D::Buffer,        // (256) f32, the signed dynamic map
    offset: f32,
    len: usize,
    bytes: usize,
}

/// The matrix of one attention head inside a batched tensor: element `offset` of entry 0, row
/// stride `ld`, `batch_stride` between batch entries (all in elements).
struct HeadView<'a, D: Device> {
    x: &'a GpuTensor<D>,
    offset: usize,
    ld: usize,
    batch_stride: usize,
}

impl<'a, D: Device> HeadView<'a, D> {
    /// Head `hh` of `(B, T, heads·D)` rows (queries, outputs; keys and values with T = S).
    fn rows(x: &'a GpuTensor<D>, hh: usize, heads: usize, t: usize, d: usize) -> Self {
        HeadView {
            x,
            offset: hh * d,
            ld: heads * d,
            batch_stride: t * heads * d,
        }
    }

    /// Head `hh` of `(B, H, T, S)` scores or probabilities.
    fn scores(x: &'a GpuTensor<D>, hh: usize, dims: AttnDims) -> Self {
        let AttnDims { h, t, s, .. } = dims;
        HeadView {
            x,
            offset: hh * t * s,
            ld: s,
            batch_stride: h * t * s,
        }
    }
}

/// See the module docs.
pub struct GpuBackend<D: Device> {
    /// Shared: backends of both dtypes can run on one device (see [`GpuBackend::with_dtype`]).
    device: Arc<D>,
    dtype: DType,
    attention: AttentionKernel,
}

/// How [`Backend::attention_forward`] and its backward run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionKernel {
    /// The fused kernels (scores stay in shared memory); heads wider than [`FLASH_MAX_D`] use the
    /// GEMM path.
    Flash,
    /// cuBLAS scores into a `(B, H, T, S)` scratch, a softmax kernel, cuBLAS again.
    Gemm,
    /// The flash kernels on tensor cores (`mma.sync`; bf16, heads of width 64 or 128; otherwise
    /// as `Flash`). Becomes the default once `fastpt doctor` has passed it on a GPU: the virtual
    /// GPU emulates the instruction's fragment layout, not the hardware.
    FlashTc,
}

/// The widest head the flash kernels take (kernels/attention.cu `FLASH_MAX_D`).
pub const FLASH_MAX_D: usize = 128;
/// The flash kernels' tiles (kernels/attention.cu): query rows per block, key rows per tile,
/// query rows per tile of the dk/dv kernel.
const FLASH_BR: usize = 16;
const FLASH_BC: usize = 16;
const FLASH_BR_KV: usize = 8;
const FLASH_BLOCK: u32 = 128;

/// Threads per block of the row-wise kernels (one block per row). Each kernel declares its block
/// size with `__launch_bounds__` (kernels/common.cuh has the same constants); the virtual GPU
/// refuses a launch with any other size.
const ROW_BLOCK: u32 = 128;
/// Threads per block of the elementwise kernels.
const ELEMENTWISE_BLOCK: u32 = 256;

/// Bytes of dynamic shared memory the launch of kernel `op` (no dtype suffix) asks for with heads
/// of width `d`: the flash kernels' tiles in f32, 0 for kernels without dynamic shared memory.
/// `tests/kernel_images.rs` checks static + dynamic at [`FLASH_MAX_D`] against each GPU's limit.
pub fn dynamic_smem_bytes(op: &str, d: usize) -> usize {
    let (br, bc, br_kv) = (FLASH_BR, FLASH_BC, FLASH_BR_KV);
    let floats = match op {
        "attention_forward" => (2 * br + 2 * bc) * d + br * bc + 3 * br,
        "attention_backward_prep" => (br + bc) * d + br * bc + 2 * br,
        "attention_backward_dkv" => (4 * bc + 2 * br_kv) * d + 2 * br_kv * bc + 2 * br_kv,
        "attention_backward_dq" => (3 * br + 2 * bc) * d + br * bc + 2 * br,
        // One int per thread of its block of 128 (the shim test's launch).
        "selftest_ballot" => 128,
        _ => 0,
    };
    floats * 4
}

fn blocks_for(n: usize, block: u32) -> u32 {
    n.div_ceil(block as usize).clamp(1, 65535) as u32
}

fn act_code(act: Activation) -> i32 {
    match act {
        Activation::Relu => 0,
        Activation::GeluTanh => 1,
        Activation::Silu => 2,
    }
}

fn dim(x: usize) -> Arg {
    // Infallible from input: before a model is built, `model::memory::check_fits` refuses on a
    // GPU backend any workload with a buffer past i32::MAX elements, and every dimension is at
    // most its buffer's length. Reaching this would be a bug in that bound.
    Arg::I32(i32::try_from(x).expect("dimension fits in i32"))
}

impl<D: Device> GpuBackend<D> {
    pub fn new(device: D, dtype: DType) -> Self {
        GpuBackend {
            device: Arc::new(device),
            dtype,
            attention: AttentionKernel::Flash,
        }
    }

    /// A backend of another dtype on the same device.
    pub fn with_dtype(&self, dtype: DType) -> Self {
        GpuBackend {
            device: Arc::clone(&self.device),
            dtype,
            attention: self.attention,
        }
    }

    /// The same backend with another attention implementation (the kernel lab compares them).
    pub fn with_attention(&self, attention: AttentionKernel) -> Self {
        GpuBackend {
            device: Arc::clone(&self.device),
            dtype: self.dtype,
            attention,
        }
    }

    pub fn attention_kernel(&self) -> AttentionKernel {
        self.attention
    }

    pub fn device(&self) -> &D {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    fn ptr(&self, x: &GpuTensor<D>) -> Arg {
        Arg::Ptr(self.device.ptr(&x.buf))
    }

    fn sptr(&self, x: &GpuState<D>) -> Arg {
        Arg::Ptr(self.device.ptr(&x.buf))
    }

    fn iptr(&self, x: &GpuIndex<D>) -> Arg {
        Arg::Ptr(self.device.ptr(&x.buf))
    }

    fn opt_ptr(&self, x: Option<&GpuTensor<D>>) -> Arg {
        x.map_or(Arg::Ptr(0), |x| self.ptr(x))
    }

    /// Launches `{op}_{dtype}`; a failure is a bug or a broken device, so it panics.
    fn launch(&self, op: &str, cfg: LaunchCfg, args: &[Arg]) {
        let name = format!("{op}_{}", self.dtype.suffix());
        if let Err(e) = self.device.launch(&name, cfg, args) {
            panic!("{}: {e}", self.device.name());
        }
    }

    fn gemm(&self, c: u64, a: u64, b: u64, g: &GemmDesc) {
        if let Err(e) = self.device.gemm(self.dtype, c, a, b, g) {
            panic!("{}: GEMM {g:?}: {e}", self.device.name());
        }
    }

    fn alloc_bytes(&self, bytes: usize) -> D::Buffer {
        match self.device.alloc(bytes) {
            Ok(b) => b,
            Err(e) => panic!("{}: {e}", self.device.name()),
        }
    }

    /// The backend's ops are infallible by design (the model code reads like the math): a
    /// device failure (a lost context, a driver error) is not an input error and ends the
    /// process naming the device. Memory is checked against the device's free memory before
    /// a model is loaded (`model::memory`), so out-of-memory is not reachable from a config.
    fn expect<T>(&self, r: Result<T, GpuError>) -> T {
        r.unwrap_or_else(|e| panic!("{}: {e}", self.device.name()))
    }

    /// Bytes of `x` as stored, from host f32.
    fn encode(&self, data: &[f32]) -> Vec<u8> {
        match self.dtype {
            DType::F32 => bytemuck::cast_slice(data).to_vec(),
            DType::Bf16 => {
                let h: Vec<bf16> = data.iter().map(|&x| bf16::from_f32(x)).collect();
                bytemuck::cast_slice(&h).to_vec()
            }
        }
    }

    /// Host f32 of a stored tensor.
    fn decode(&self, bytes: &[u8]) -> Vec<f32> {
        match self.dtype {
            DType::F32 => bytemuck::pod_collect_to_vec(bytes),
            DType::Bf16 => {
                let h: Vec<bf16> = bytemuck::pod_collect_to_vec(bytes);
                h.iter().map(|x| x.to_f32()).collect()
            }
        }
    }

    /// `dst = src` on the device, same length.
    fn copy_into(&self, dst: &mut GpuTensor<D>, src: &GpuTensor<D>) {
        assert_eq!(src.len, dst.len, "copy_into: lengths differ");
        let bytes = dst.len * self.dtype.size();
        self.expect(self.device.copy(&mut dst.buf, &src.buf, bytes));
    }

    /// LAMP's `w (L/p, R) = pool_p(u)·diag(q²)` from `u (L, R)`, `q (R)` (already checked).
    fn lamp_pooled(&self, u: &GpuTensor<D>, q: &GpuTensor<D>, dims: LampPoolDims) -> GpuTensor<D> {
        let LampPoolDims { l, r, p, .. } = dims;
        let w = self.zeros(l / p * r);
        self.launch(
            "lamp_pool_scale",
            LaunchCfg::linear(blocks_for(l / p * r, ELEMENTWISE_BLOCK), ELEMENTWISE_BLOCK),
            &[
                self.ptr(&w),
                self.ptr(u),
                self.ptr(q),
                dim(l),
                dim(r),
                dim(p),
            ],
        );
        w
    }

    /// The relative-position bucket of every `key - query` in `-(T-1) ..= S-1`: `(T+S-1)`,
    /// entry `rel + T - 1` (the bucket of `rel - q_offset`). Computed on the host with the one definition all backends share.
    fn relative_buckets(
        &self,
        bias: &RelBias<'_, GpuTensor<D>>,
        t: usize,
        s: usize,
    ) -> GpuIndex<D> {
        let buckets: Vec<i32> = (-(t as i64 - 1)..s as i64)
            .map(|rel| {
                relative_position_bucket(
                    rel - bias.q_offset as i64,
                    bias.bidirectional,
                    bias.num_buckets,
                    bias.max_distance,
                ) as i32
            })
            .collect();
        self.upload_index(&buckets)
    }

    /// Launches `rope_forward` or `rope_backward_dinp` (same arguments): `out, inp (N, H·D)`,
    /// `positions (N)`, `cos, sin (P, D/2)`. Positions are read on the device only: one outside
    /// the tables turns its row into NaN instead of reading out of bounds.
    fn rope(
        &self,
        op: &str,
        out: &mut GpuTensor<D>,
        inp: &GpuTensor<D>,
        positions: &GpuIndex<D>,
        (cos, sin): (&GpuTensor<D>, &GpuTensor<D>),
        dims: RopeDims,
    ) {
        let RopeDims { n, h, d } = dims;
        let rows = dims.check(op, out.len, inp.len, positions.len, cos.len, sin.len);
        let len = n * h * (d / 2);
        self.launch(
            op,
            LaunchCfg::linear(blocks_for(len, ELEMENTWISE_BLOCK), ELEMENTWISE_BLOCK),
            &[
                self.ptr(out),
                self.ptr(inp),
                self.iptr(positions),
                self.ptr(cos),
                self.ptr(sin),
                dim(n),
                dim(h),
                dim(d),
                dim(rows),
            ],
        );
    }

    /// One head's matrices inside a batched tensor, for [`GpuBackend::head_gemm`].
    fn head_gemm(&self, c: HeadView<'_, D>, a: HeadView<'_, D>, b: HeadView<'_, D>, g: GemmDesc) {
        let el = self.dtype.size() as u64;
        let at = |v: &HeadView<'_, D>| self.device.ptr(&v.x.buf) + (v.offset as u64) * el;
        let g = GemmDesc {
            lda: a.ld,
            ldb: b.ld,
            ldc: c.ld,
            stride_a: a.batch_stride,
            stride_b: b.batch_stride,
            stride_c: c.batch_stride,
            ..g
        };
        self.gemm(at(&c), at(&a), at(&b), &g);
    }

    /// Scaled scores `scale·Q·Kᵀ` of every head into `scores (B, H, T, S)`.
    fn attention_scores(
        &self,
        scores: &GpuTensor<D>,
        q: &GpuTensor<D>,
        k: &GpuTensor<D>,
        scale: f64,
        dims: AttnDims,
    ) {
        let AttnDims {
            b,
            t,
            s,
            h,
            h_kv,
            d,
        } = dims;
        for hh in 0..h {
            let kvh = hh / (h / h_kv);
            self.head_gemm(
                HeadView::scores(scores, hh, dims),
                HeadView::rows(q, hh, h, t, d),
                HeadView::rows(k, kvh, h_kv, s, d),
                GemmDesc {
                    batch: b,
                    alpha: scale as f32,
                    ..GemmDesc::dense(t, s, d, false, true)
                },
            );
        }
    }

    /// Masks, biases and softmaxes `scores (B, H, T, S)` in place; `lse (B, H, T)`.
    fn attention_softmax(
        &self,
        scores: &GpuTensor<D>,
        lse: &GpuTensor<D>,
        mask: &AttnMask<'_, GpuIndex<D>>,
        bias: Option<&RelBias<'_, GpuTensor<D>>>,
        dims: AttnDims,
    ) {
        let AttnDims { b, t, s, h, .. } = dims;
        let buckets = self.bias_buckets(bias, dims);
        self.launch(
            "attention_softmax_forward",
            LaunchCfg::linear((b * h * t) as u32, ROW_BLOCK),
            &[
                self.ptr(scores),
                self.ptr(lse),
                self.iptr(mask.key_mask),
                bias.map_or(Arg::Ptr(0), |bias| self.ptr(bias.table)),
                buckets.as_ref().map_or(Arg::Ptr(0), |x| self.iptr(x)),
                dim(b),
                dim(h),
                dim(t),
                dim(s),
                Arg::I32(mask.causal as i32),
            ],
        );
    }

    /// Refuses an empty attention on the host, before any launch: the kernels divide by these
    /// lengths (tiles per sequence, heads per group). The shapes are checked by [`AttnDims`].
    fn refuse_empty_attention(dims: AttnDims) {
        let AttnDims { b, t, s, d, .. } = dims;
        assert!(
            b > 0 && t > 0 && s > 0 && d > 0,
            "attention: empty input (B = {b}, T = {t}, S = {s}, D = {d}): every length must be > 0"
        );
    }
}

/// What attention's scores are computed from, in the forward and again in the backward.
struct AttnInputs<'a, D: Device> {
    q: &'a GpuTensor<D>, // (B, T, H·D)
    k: &'a GpuTensor<D>, // (B, S, Hkv·D)
    v: &'a GpuTensor<D>, // (B, S, Hkv·D)
    mask: &'a AttnMask<'a, GpuIndex<D>>,
    bias: Option<&'a RelBias<'a, GpuTensor<D>>>,
    scale: f64,
    dims: AttnDims,
}

impl<D: Device> GpuBackend<D> {
    /// Whether attention with heads of width `d` runs on the flash kernels.
    fn flash(&self, d: usize) -> bool {
        self.attention != AttentionKernel::Gemm && d <= FLASH_MAX_D
    }

    /// Whether the forward with heads of width `d` runs on the tensor-core flash kernel.
    fn tensor_cores(&self, d: usize) -> bool {
        self.attention == AttentionKernel::FlashTc
            && self.dtype == DType::Bf16
            && (d == 64 || d == 128)
    }

    /// The launch of a flash kernel: `blocks` blocks, `bytes` of dynamic shared memory.
    fn flash_cfg(blocks: usize, bytes: usize) -> LaunchCfg {
        // Infallible: `bytes` is a few tiles of at most 128 × 128 elements, and `blocks` is at
        // most a (B, H, T) buffer's length, below i32::MAX by the memory check.
        LaunchCfg {
            smem: u32::try_from(bytes).expect("flash tiles fit in u32 bytes"),
            ..LaunchCfg::linear(
                u32::try_from(blocks).expect("attention grid fits in u32"),
                FLASH_BLOCK,
            )
        }
    }

    /// The arguments every flash kernel ends with: key mask, bias table and bucket ids, dims,
    /// causal, scale.
    fn flash_tail(
        &self,
        mask: &AttnMask<'_, GpuIndex<D>>,
        bias: Option<&RelBias<'_, GpuTensor<D>>>,
        buckets: Option<&GpuIndex<D>>,
        scale: f64,
        dims: AttnDims,
    ) -> Vec<Arg> {
        let AttnDims {
            b,
            t,
            s,
            h,
            h_kv,
            d,
        } = dims;
        vec![
            self.iptr(mask.key_mask),
            bias.map_or(Arg::Ptr(0), |bias| self.ptr(bias.table)),
            buckets.map_or(Arg::Ptr(0), |x| self.iptr(x)),
            dim(b),
            dim(t),
            dim(s),
            dim(h),
            dim(h_kv),
            dim(d),
            Arg::I32(mask.causal as i32),
            Arg::F32(scale as f32),
        ]
    }

    /// The bucket ids of the bias (checking its table), or None without bias.
    fn bias_buckets(
        &self,
        bias: Option<&RelBias<'_, GpuTensor<D>>>,
        dims: AttnDims,
    ) -> Option<GpuIndex<D>> {
        bias.map(|bias| {
            dims.check_bias_table(bias.table.len, bias.num_buckets);
            self.relative_buckets(bias, dims.t, dims.s)
        })
    }

    /// `out (B, T, H·D)`, `lse (B, H, T)`.
    fn flash_forward(&self, out: &mut GpuTensor<D>, lse: &mut GpuTensor<D>, x: &AttnInputs<'_, D>) {
        let AttnDims { b, t, h, d, .. } = x.dims;
        let buckets = self.bias_buckets(x.bias, x.dims);
        let blocks = b * h * t.div_ceil(FLASH_BR);
        let mut args = vec![
            self.ptr(out),
            self.ptr(lse),
            self.ptr(x.q),
            self.ptr(x.k),
            self.ptr(x.v),
        ];
        args.extend(self.flash_tail(x.mask, x.bias, buckets.as_ref(), x.scale, x.dims));
        if self.tensor_cores(d) {
            // 64 query rows per block (4 warps), static shared memory.
            let blocks = b * h * t.div_ceil(64);
            let name = format!("attention_forward_tc_d{d}");
            self.launch(&name, Self::flash_cfg(blocks, 0), &args);
            return;
        }
        let smem = dynamic_smem_bytes("attention_forward", d);
        self.launch("attention_forward", Self::flash_cfg(blocks, smem), &args);
    }

    /// Three launches: the row statistics (lse, rowsum(dout ⊙ out)) into an f32 scratch, then
    /// dk/dv by key tiles and dq by query tiles (no atomics). `(out, lse)` as the forward wrote
    /// them.
    fn flash_backward(
        &self,
        (dq, dk, dv): (&mut GpuTensor<D>, &mut GpuTensor<D>, &mut GpuTensor<D>),
        dout: &GpuTensor<D>,
        (out, lse): (&GpuTensor<D>, &GpuTensor<D>),
        x: &AttnInputs<'_, D>,
    ) {
        let AttnDims {
            b,
            t,
            s,
            h,
            h_kv,
            d,
        } = x.dims;
        let buckets = self.bias_buckets(x.bias, x.dims);
        let tail = self.flash_tail(x.mask, x.bias, buckets.as_ref(), x.scale, x.dims);
        let stats = self.alloc_bytes(b * h * t * 2 * 4); // (B, H, T, 2) f32
        let stats_ptr = Arg::Ptr(self.device.ptr(&stats));
        let tc = self.tensor_cores(d);
        // A bf16 lse is too coarse to rebuild probabilities from: recompute it (on tensor cores
        // with attention_stats_tc, else in the prep kernel).
        let recompute = self.dtype != DType::F32 && !tc;
        let q_blocks = b * h * t.div_ceil(FLASH_BR);
        let mut args = vec![
            stats_ptr,
            self.ptr(lse),
            self.ptr(out),
            self.ptr(dout),
            self.ptr(x.q),
            self.ptr(x.k),
        ];
        args.extend(tail.iter().copied());
        args.push(Arg::I32(recompute as i32));
        self.launch(
            "attention_backward_prep",
            Self::flash_cfg(q_blocks, dynamic_smem_bytes("attention_backward_prep", d)),
            &args,
        );
        if tc {
            // 64 query rows or keys per block (4 warps of 16), static shared memory.
            let (q_blocks, kv_blocks) = (b * h * t.div_ceil(64), b * h_kv * s.div_ceil(64));
            let mut args = vec![stats_ptr, self.ptr(x.q), self.ptr(x.k)];
            args.extend(tail.iter().copied());
            let cfg = Self::flash_cfg(q_blocks, 0);
            self.launch(&format!("attention_stats_tc_d{d}"), cfg, &args);
            let mut args = vec![
                self.ptr(dk),
                self.ptr(dv),
                stats_ptr,
                self.ptr(dout),
                self.ptr(x.q),
                self.ptr(x.k),
                self.ptr(x.v),
            ];
            args.extend(tail.iter().copied());
            let cfg = Self::flash_cfg(kv_blocks, 0);
            self.launch(&format!("attention_backward_dkv_tc_d{d}"), cfg, &args);
            let mut args = vec![
                self.ptr(dq),
                stats_ptr,
                self.ptr(dout),
                self.ptr(x.q),
                self.ptr(x.k),
                self.ptr(x.v),
            ];
            args.extend(tail.iter().copied());
            let cfg = Self::flash_cfg(q_blocks, 0);
            self.launch(&format!("attention_backward_dq_tc_d{d}"), cfg, &args);
            return;
        }

        let kv_blocks = b * h_kv * s.div_ceil(FLASH_BC);
        let mut args = vec![
            self.ptr(dk),
            self.ptr(dv),
            stats_ptr,
            self.ptr(dout),
            self.ptr(x.q),
            self.ptr(x.k),
            self.ptr(x.v),
        ];
        args.extend(tail.iter().copied());
        self.launch(
            "attention_backward_dkv",
            Self::flash_cfg(kv_blocks, dynamic_smem_bytes("attention_backward_dkv", d)),
            &args,
        );

        let mut args = vec![
            self.ptr(dq),
            stats_ptr,
            self.ptr(dout),
            self.ptr(x.q),
            self.ptr(x.k),
            self.ptr(x.v),
        ];
        args.extend(tail.iter().copied());
        self.launch(
            "attention_backward_dq",
            Self::flash_cfg(q_blocks, dynamic_smem_bytes("attention_backward_dq", d)),
            &args,
        );
    }

    /// The GEMM path of [`Backend::attention_forward`] (see the module docs): `out (B, T, H·D)`,
    /// `lse (B, H, T)`.
    fn gemm_attention_forward(
        &self,
        out: &mut GpuTensor<D>,
        lse: &mut GpuTensor<D>,
        x: &AttnInputs<'_, D>,
    ) {
        let AttnInputs {
            q,
            k,
            v,
            mask,
            bias,
            scale,
            dims,
        } = *x;
        let AttnDims {
            b,
            t,
            s,
            h,
            h_kv,
            d,
        } = dims;
        let probs = self.zeros(b * h * t * s); // (B, H, T, S)
        self.attention_scores(&probs, q, k, scale, dims);
        self.attention_softmax(&probs, lse, mask, bias, dims);
        // out[b, :, hh] = P[b, hh] · V[b, :, kvh]
        for hh in 0..h {
            let kvh = hh / (h / h_kv);
            self.head_gemm(
                HeadView::rows(out, hh, h, t, d),
                HeadView::scores(&probs, hh, dims),
                HeadView::rows(v, kvh, h_kv, s, d),
                GemmDesc {
                    batch: b,
                    ..GemmDesc::dense(t, d, s, false, false)
                },
            );
        }
    }

    /// The GEMM path of [`Backend::attention_backward_dinp`].
    fn gemm_attention_backward(
        &self,
        (dq, dk, dv): (&mut GpuTensor<D>, &mut GpuTensor<D>, &mut GpuTensor<D>),
        dout: &GpuTensor<D>,
        x: &AttnInputs<'_, D>,
    ) {
        let AttnInputs {
            q,
            k,
            v,
            mask,
            bias,
            scale,
            dims,
        } = *x;
        let AttnDims {
            b,
            t,
            s,
            h,
            h_kv,
            d,
        } = dims;
        // P is recomputed in full from the scores rather than from the saved lse, which in bf16
        // would be too coarse (an error δ in lse scales a whole row of P by e^δ).
        let probs = self.zeros(b * h * t * s); // (B, H, T, S)
        let lse_scratch = self.zeros(b * h * t); // (B, H, T)
        self.attention_scores(&probs, q, k, scale, dims);
        self.attention_softmax(&probs, &lse_scratch, mask, bias, dims);
        let dprobs = self.zeros(b * h * t * s); // (B, H, T, S): dP, then dS in place
        self.fill_zero(dk);
        self.fill_zero(dv);
        for hh in 0..h {
            let kvh = hh / (h / h_kv);
            let (dov, vv) = (
                HeadView::rows(dout, hh, h, t, d),
                HeadView::rows(v, kvh, h_kv, s, d),
            );
            // dP = dO · Vᵀ  (T, S)
            self.head_gemm(
                HeadView::scores(&dprobs, hh, dims),
                dov,
                vv,
                GemmDesc {
                    batch: b,
                    ..GemmDesc::dense(t, s, d, false, true)
                },
            );
            // dV += Pᵀ · dO  (S, D)
            self.head_gemm(
                HeadView::rows(dv, kvh, h_kv, s, d),
                HeadView::scores(&probs, hh, dims),
                HeadView::rows(dout, hh, h, t, d),
                GemmDesc {
                    batch: b,
                    beta: 1.0,
                    ..GemmDesc::dense(s, d, t, true, false)
                },
            );
        }
        // dS = P ⊙ (dP − rowsum(P ⊙ dP)), in place.
        self.launch(
            "attention_softmax_backward",
            LaunchCfg::linear((b * h * t) as u32, ROW_BLOCK),
            &[self.ptr(&dprobs), self.ptr(&probs), dim(b * h * t), dim(s)],
        );
        for hh in 0..h {
            let kvh = hh / (h / h_kv);
            // dQ = scale · dS · K  (T, D)
            self.head_gemm(
                HeadView::rows(dq, hh, h, t, d),
                HeadView::scores(&dprobs, hh, dims),
                HeadView::rows(k, kvh, h_kv, s, d),
                GemmDesc {
                    batch: b,
                    alpha: scale as f32,
                    ..GemmDesc::dense(t, d, s, false, false)
                },
            );
            // dK += scale · dSᵀ · Q  (S, D)
            self.head_gemm(
                HeadView::rows(dk, kvh, h_kv, s, d),
                HeadView::scores(&dprobs, hh, dims),
                HeadView::rows(q, hh, h, t, d),
                GemmDesc {
                    batch: b,
                    alpha: scale as f32,
                    beta: 1.0,
                    ..GemmDesc::dense(s, d, t, true, false)
                },
            );
        }
    }
}

impl<D: Device> Backend for GpuBackend<D> {
    type Tensor = GpuTensor<D>;
    type Index = GpuIndex<D>;
    type Nf4 = GpuNf4<D>;
    type State = GpuState<D>;

    fn name(&self) -> String {
        format!("{}-{}", self.device.name(), self.dtype)
    }

    fn elem_bytes(&self) -> usize {
        self.dtype.size()
    }

    fn device_free_bytes(&self) -> Option<u64> {
        self.device.free_bytes()
    }

    // ---- buffers ------------------------------------------------------------------------------

    fn zeros(&self, len: usize) -> GpuTensor<D> {
        GpuTensor {
            buf: self.alloc_bytes(len * self.dtype.size()),
            len,
        }
    }

    fn upload_f32(&self, data: Vec<f32>) -> GpuTensor<D> {
        let mut x = self.zeros(data.len());
        let bytes = self.encode(&data);
        self.expect(self.device.upload(&mut x.buf, &bytes));
        x
    }

    fn upload_f64(&self, data: &[f64]) -> GpuTensor<D> {
        self.upload_f32(data.iter().map(|&x| x as f32).collect())
    }

    fn download_f32(&self, x: &GpuTensor<D>) -> Vec<f32> {
        let mut bytes = vec![0u8; x.len * self.dtype.size()];
        self.expect(self.device.download(&x.buf, &mut bytes));
        self.decode(&bytes)
    }

    fn download_f64(&self, x: &GpuTensor<D>) -> Vec<f64> {
        self.download_f32(x).into_iter().map(f64::from).collect()
    }

    fn copy(&self, x: &GpuTensor<D>) -> GpuTensor<D> {
        let mut y = self.zeros(x.len);
        self.expect(
            self.device
                .copy(&mut y.buf, &x.buf, x.len * self.dtype.size()),
        );
        y
    }

    fn upload_index(&self, data: &[i32]) -> GpuIndex<D> {
        let mut buf = self.alloc_bytes(std::mem::size_of_val(data));
        self.expect(self.device.upload(&mut buf, bytemuck::cast_slice(data)));
        GpuIndex {
            buf,
            len: data.len(),
        }
    }

    fn upload_nf4(&self, q: Nf4Tensor) -> GpuNf4<D> {
        let bytes = q.bytes();
        let up = |data: &[u8]| {
            let mut buf = self.alloc_bytes(data.len().max(1));
            self.expect(self.device.upload(&mut buf, data));
            buf
        };
        GpuNf4 {
            packed: up(&q.packed),
            absmax_codes: up(&q.absmax_codes),
            absmax_scale: up(bytemuck::cast_slice(&q.absmax_scale)),
            code2: up(bytemuck::cast_slice(&dynamic_map_signed())),
            offset: q.offset,
            len: q.len,
            bytes,
        }
    }

    fn nf4_len(&self, q: &GpuNf4<D>) -> usize {
        q.len
    }

    fn nf4_bytes(&self, q: &GpuNf4<D>) -> usize {
        q.bytes
    }

    fn nf4_dequantize(&self, out: &mut GpuTensor<D>, q: &GpuNf4<D>) {
        check_nf4_dequantize(out.len, q.len);
        let ptr = |b: &D::Buffer| Arg::Ptr(self.device.ptr(b));
        self.launch(
            "nf4_dequantize",
            LaunchCfg::linear(
                blocks_for(q.len.div_ceil(2), ELEMENTWISE_BLOCK),
                ELEMENTWISE_BLOCK,
            ),
            &[
                self.ptr(out),
                ptr(&q.packed),
                ptr(&q.absmax_codes),
                ptr(&q.absmax_scale),
                ptr(&q.code2),
                dim(q.len),
                Arg::F32(q.offset),
            ],
        );
    }

    fn len(&self, x: &GpuTensor<D>) -> usize {
        x.len
    }

    // ---- elementwise --------------------------------------------------------------------------

    fn fill_zero(&self, x: &mut GpuTensor<D>) {
        let bytes = x.len * self.dtype.size();
        self.expect(self.device.memset_zero(&mut x.buf, bytes));
    }

    fn add_assign(&self, dst: &mut GpuTensor<D>, src: &GpuTensor<D>) {
        check_add_assign(dst.len, src.len);
        let n = dst.len;
        self.launch(
            "add_assign",
            LaunchCfg::linear(blocks_for(n, ELEMENTWISE_BLOCK), ELEMENTWISE_BLOCK),
            &[self.ptr(dst), self.ptr(src), dim(n)],
        );
    }

    // ---- GEMM ---------------------------------------------------------------------------------

    fn matmul(&self, out: &mut GpuTensor<D>, a: &GpuTensor<D>, b: &GpuTensor<D>, g: Gemm) {
        g.check(out.len, a.len, b.len);
        let desc = GemmDesc {
            alpha: g.alpha as f32,
            beta: if g.accumulate { 1.0 } else { 0.0 },
            ..GemmDesc::dense(g.m, g.n, g.k, g.trans_a, g.trans_b)
        };
        self.gemm(
            self.device.ptr(&out.buf),
            self.device.ptr(&a.buf),
            self.device.ptr(&b.buf),
            &desc,
        );
    }

    fn add_bias(&self, x: &mut GpuTensor<D>, bias: &GpuTensor<D>, n: usize, f: usize) {
        check_add_bias(x.len, bias.len, n, f);
        self.launch(
            "add_bias",
            LaunchCfg::linear(blocks_for(n * f, ELEMENTWISE_BLOCK), ELEMENTWISE_BLOCK),
            &[self.ptr(x), self.ptr(bias), dim(n), dim(f)],
        );
    }

    fn bias_backward(&self, dbias: &mut GpuTensor<D>, dout: &GpuTensor<D>, n: usize, f: usize) {
        check_bias_backward(dbias.len, dout.len, n, f);
        self.launch(
            "bias_backward",
            LaunchCfg::linear(blocks_for(f, ELEMENTWISE_BLOCK), ELEMENTWISE_BLOCK),
            &[self.ptr(dbias), self.ptr(dout), dim(n), dim(f)],
        );
    }

    // ---- rows ---------------------------------------------------------------------------------

    fn gather_rows(
        &self,
        out: &mut GpuTensor<D>,
        table: &GpuTensor<D>,
        rows: &GpuIndex<D>,
        m: usize,
        c: usize,
    ) {
        let r = check_gather_rows(out.len, table.len, rows.len, m, c);
        self.launch(
            "gather_rows",
            LaunchCfg::linear(m as u32, ROW_BLOCK),
            &[
                self.ptr(out),
                self.ptr(table),
                self.iptr(rows),
                dim(m),
                dim(c),
                dim(r),
            ],
        );
    }

    fn scatter_rows_add(
        &self,
        dtable: &mut GpuTensor<D>,
        dout: &GpuTensor<D>,
        rows: &GpuIndex<D>,
        m: usize,
        c: usize,
    ) {
        let r = check_scatter_rows_add(dtable.len, dout.len, rows.len, m, c);
        self.launch(
            "scatter_rows_add",
            LaunchCfg::linear(m as u32, ROW_BLOCK),
            &[
                self.ptr(dtable),
                self.ptr(dout),
                self.iptr(rows),
                dim(m),
                dim(c),
                dim(r),
            ],
        );
    }

    fn embed_prompt_forward(
        &self,
        out: &mut GpuTensor<D>,
        table: &GpuTensor<D>,
        ids: &GpuIndex<D>,
        prompt: &GpuTensor<D>,
        update: Option<&GpuTensor<D>>,
        dims: EmbedPromptDims,
    ) {
        let EmbedPromptDims { b, t, p, c } = dims;
        let update_len = update.map(|u| u.len);
        let v = dims.check_forward(out.len, table.len, ids.len, prompt.len, update_len);
        self.launch(
            "embed_prompt_forward",
            LaunchCfg::linear((b * (p + t)) as u32, ROW_BLOCK),
            &[
                self.ptr(out),
                self.ptr(table),
                self.iptr(ids),
                self.ptr(prompt),
                self.opt_ptr(update),
                dim(b),
                dim(t),
                dim(p),
                dim(c),
                dim(v),
            ],
        );
    }

    fn embed_prompt_backward(
        &self,
        d_prompt: &mut GpuTensor<D>,
        d_update: Option<&mut GpuTensor<D>>,
        dout: &GpuTensor<D>,
        dims: EmbedPromptDims,
    ) {
        let EmbedPromptDims { b, t, p, c } = dims;
        let m = dims.check_backward(d_prompt.len, d_update.as_ref().map(|u| u.len), dout.len);
        let d_update_ptr = d_update.map_or(Arg::Ptr(0), |u| self.ptr(u));
        self.launch(
            "embed_prompt_backward",
            LaunchCfg::linear(
                blocks_for((p + m) * c, ELEMENTWISE_BLOCK),
                ELEMENTWISE_BLOCK,
            ),
            &[
                self.ptr(d_prompt),
                d_update_ptr,
                self.ptr(dout),
                dim(b),
                dim(t),
                dim(p),
                dim(c),
                dim(m),
            ],
        );
    }

    // ---- normalisation ------------------------------------------------------------------------

    fn rmsnorm_forward(
        &self,
        out: &mut GpuTensor<D>,
        rstd: &mut GpuTensor<D>,
        inp: &GpuTensor<D>,
        weight: &GpuTensor<D>,
        eps: f64,
        dims: RmsNormDims,
    ) {
        let RmsNormDims { n, c } = dims;
        dims.check_forward(out.len, rstd.len, inp.len, weight.len);
        self.launch(
            "rmsnorm_forward",
            LaunchCfg::linear(n as u32, ROW_BLOCK),
            &[
                self.ptr(out),
                self.ptr(rstd),
                self.ptr(inp),
                self.ptr(weight),
                dim(n),
                dim(c),
                Arg::F32(eps as f32),
            ],
        );
    }

    fn rmsnorm_backward_dinp(
        &self,
        dinp: &mut GpuTensor<D>,
        dout: &GpuTensor<D>,
        inp: &GpuTensor<D>,
        weight: &GpuTensor<D>,
        rstd: &GpuTensor<D>,
        dims: RmsNormDims,
    ) {
        let RmsNormDims { n, c } = dims;
        dims.check_backward_dinp(dinp.len, dout.len, inp.len, weight.len, rstd.len);
        self.launch(
            "rmsnorm_backward_dinp",
            LaunchCfg::linear(n as u32, ROW_BLOCK),
            &[
                self.ptr(dinp),
                self.ptr(dout),
                self.ptr(inp),
                self.ptr(weight),
                self.ptr(rstd),
                dim(n),
                dim(c),
            ],
        );
    }

    fn layernorm_forward(
        &self,
        out: &mut GpuTensor<D>,
        mean: &mut GpuTensor<D>,
        rstd: &mut GpuTensor<D>,
        inp: &GpuTensor<D>,
        weight: &GpuTensor<D>,
        bias: &GpuTensor<D>,
        eps: f64,
        dims: LayerNormDims,
    ) {
        let LayerNormDims { n, c } = dims;
        dims.check_forward(out.len, mean.len, rstd.len, inp.len, weight.len, bias.len);
        self.launch(
            "layernorm_forward",
            LaunchCfg::linear(n as u32, ROW_BLOCK),
            &[
                self.ptr(out),
                self.ptr(mean),
                self.ptr(rstd),
                self.ptr(inp),
                self.ptr(weight),
                self.ptr(bias),
                dim(n),
                dim(c),
                Arg::F32(eps as f32),
            ],
        );
    }

    fn layernorm_backward(
        &self,
        dinp: &mut GpuTensor<D>,
        dweight: &mut GpuTensor<D>,
        dbias: &mut GpuTensor<D>,
        dout: &GpuTensor<D>,
        inp: &GpuTensor<D>,
        weight: &GpuTensor<D>,
        mean: &GpuTensor<D>,
        rstd: &GpuTensor<D>,
        dims: LayerNormDims,
    ) {
        let LayerNormDims { n, c } = dims;
        let grads = (dinp.len, dweight.len, dbias.len);
        dims.check_backward(grads, dout.len, inp.len, weight.len, (mean.len, rstd.len));
        self.launch(
            "layernorm_backward_dinp",
            LaunchCfg::linear(n as u32, ROW_BLOCK),
            &[
                self.ptr(dinp),
                self.ptr(dout),
                self.ptr(inp),
                self.ptr(weight),
                self.ptr(mean),
                self.ptr(rstd),
                dim(n),
                dim(c),
            ],
        );
        self.launch(
            "layernorm_backward_dweight",
            LaunchCfg::linear(blocks_for(c, ELEMENTWISE_BLOCK), ELEMENTWISE_BLOCK),
            &[
                self.ptr(dweight),
                self.ptr(dbias),
                self.ptr(dout),
                self.ptr(inp),
                self.ptr(mean),
                self.ptr(rstd),
                dim(n),
                dim(c),
            ],
        );
    }

    fn softmax_rows_forward(&self, out: &mut GpuTensor<D>, inp: &GpuTensor<D>, n: usize, k: usize) {
        check_softmax_rows_forward(out.len, inp.len, n, k);
        self.launch(
            "softmax_rows_forward",
            LaunchCfg::linear(n as u32, ROW_BLOCK),
            &[self.ptr(out), self.ptr(inp), dim(n), dim(k)],
        );
    }

    fn softmax_rows_backward_dinp(
        &self,
        dinp: &mut GpuTensor<D>,
        dout: &GpuTensor<D>,
        out: &GpuTensor<D>,
        n: usize,
        k: usize,
    ) {
        check_softmax_rows_backward_dinp(dinp.len, dout.len, out.len, n, k);
        self.launch(
            "softmax_rows_backward_dinp",
            LaunchCfg::linear(n as u32, ROW_BLOCK),
            &[
                self.ptr(dinp),
                self.ptr(dout),
                self.ptr(out),
                dim(n),
                dim(k),
            ],
        );
    }

    // ---- attention ----------------------------------------------------------------------------

    fn attention_forward(
        &self,
        out: &mut GpuTensor<D>,
        lse: &mut GpuTensor<D>,
        q: &GpuTensor<D>,
        k: &GpuTensor<D>,
        v: &GpuTensor<D>,
        mask: AttnMask<'_, GpuIndex<D>>,
        bias: Option<RelBias<'_, GpuTensor<D>>>,
        scale: f64,
        dims: AttnDims,
    ) {
        dims.check_forward(out.len, lse.len, (q.len, k.len, v.len), mask.key_mask.len);
        Self::refuse_empty_attention(dims);
        let inputs = AttnInputs {
            q,
            k,
            v,
            mask: &mask,
            bias: bias.as_ref(),
            scale,
            dims,
        };
        if self.flash(dims.d) {
            self.flash_forward(out, lse, &inputs);
        } else {
            self.gemm_attention_forward(out, lse, &inputs);
        }
    }

    fn attention_backward_dinp(
        &self,
        dq: &mut GpuTensor<D>,
        dk: &mut GpuTensor<D>,
        dv: &mut GpuTensor<D>,
        dout: &GpuTensor<D>,
        q: &GpuTensor<D>,
        k: &GpuTensor<D>,
        v: &GpuTensor<D>,
        out: &GpuTensor<D>,
        lse: &GpuTensor<D>,
        mask: AttnMask<'_, GpuIndex<D>>,
        bias: Option<RelBias<'_, GpuTensor<D>>>,
        scale: f64,
        dims: AttnDims,
    ) {
        dims.check_backward_dinp(
            (dq.len, dk.len, dv.len),
            dout.len,
            (q.len, k.len, v.len),
            (out.len, lse.len),
            mask.key_mask.len,
        );
        Self::refuse_empty_attention(dims);
        let inputs = AttnInputs {
            q,
            k,
            v,
            mask: &mask,
            bias: bias.as_ref(),
            scale,
            dims,
        };
        if self.flash(dims.d) {
            self.flash_backward((dq, dk, dv), dout, (out, lse), &inputs);
        } else {
            self.gemm_attention_backward((dq, dk, dv), dout, &inputs);
        }
    }

    // ---- feed-forward -------------------------------------------------------------------------

    fn rope_forward(
        &self,
        out: &mut GpuTensor<D>,
        inp: &GpuTensor<D>,
        positions: &GpuIndex<D>,
        cos: &GpuTensor<D>,
        sin: &GpuTensor<D>,
        dims: RopeDims,
    ) {
        self.rope("rope_forward", out, inp, positions, (cos, sin), dims);
    }

    fn rope_backward_dinp(
        &self,
        dinp: &mut GpuTensor<D>,
        dout: &GpuTensor<D>,
        positions: &GpuIndex<D>,
        cos: &GpuTensor<D>,
        sin: &GpuTensor<D>,
        dims: RopeDims,
    ) {
        self.rope(
            "rope_backward_dinp",
            dinp,
            dout,
            positions,
            (cos, sin),
            dims,
        );
    }

    fn gated_act_forward(
        &self,
        out: &mut GpuTensor<D>,
        a: &GpuTensor<D>,
        gate: Option<&GpuTensor<D>>,
        act: Activation,
        len: usize,
    ) {
        check_gated_act_forward(out.len, a.len, gate.map(|g| g.len), len);
        self.launch(
            "gated_act_forward",
            LaunchCfg::linear(blocks_for(len, ELEMENTWISE_BLOCK), ELEMENTWISE_BLOCK),
            &[
                self.ptr(out),
                self.ptr(a),
                self.opt_ptr(gate),
                dim(len),
                Arg::I32(act_code(act)),
            ],
        );
    }

    fn gated_act_backward_dinp(
        &self,
        da: &mut GpuTensor<D>,
        dgate: Option<&mut GpuTensor<D>>,
        dout: &GpuTensor<D>,
        a: &GpuTensor<D>,
        gate: Option<&GpuTensor<D>>,
        act: Activation,
        len: usize,
    ) {
        let (gate_len, dgate_len) = (gate.map(|g| g.len), dgate.as_ref().map(|g| g.len));
        check_gated_act_backward_dinp(da.len, dgate_len, dout.len, a.len, gate_len, len);
        let dgate_ptr = dgate.map_or(Arg::Ptr(0), |x| self.ptr(x));
        self.launch(
            "gated_act_backward_dinp",
            LaunchCfg::linear(blocks_for(len, ELEMENTWISE_BLOCK), ELEMENTWISE_BLOCK),
            &[
                self.ptr(da),
                dgate_ptr,
                self.ptr(dout),
                self.ptr(a),
                self.opt_ptr(gate),
                dim(len),
                Arg::I32(act_code(act)),
            ],
        );
    }

    // ---- prompt-method ops --------------------------------------------------------------------

    fn fusion_attention_forward(
        &self,
        out: &mut GpuTensor<D>,
        probs: &mut GpuTensor<D>,
        ps: &GpuTensor<D>,
        lr: &GpuTensor<D>,
        mode: FusionMode,
        dims: FusionAttentionDims,
    ) {
        let FusionAttentionDims { s, m, c } = dims;
        dims.check_forward(out.len, probs.len, ps.len, lr.len);
        let mut scores = self.zeros(s * m); // (S, M)
        let inv_sqrt_c = 1.0 / (c as f64).sqrt();
        self.matmul(&mut scores, ps, lr, Gemm::nt(s, m, c).alpha(inv_sqrt_c));
        match mode {
            FusionMode::Attend => {
                self.softmax_rows_forward(probs, &scores, s, m);
                self.copy_into(out, ps);
                self.matmul(out, probs, lr, Gemm::nn(s, c, m).accumulate(true));
            }
            FusionMode::Paper => {
                self.launch(
                    "softmax_cols_forward",
                    LaunchCfg::linear(blocks_for(m, ELEMENTWISE_BLOCK), ELEMENTWISE_BLOCK),
                    &[self.ptr(probs), self.ptr(&scores), dim(s), dim(m)],
                );
                self.launch(
                    "fusion_paper_forward",
                    LaunchCfg::linear(s as u32, ROW_BLOCK),
                    &[
                        self.ptr(out),
                        self.ptr(ps),
                        self.ptr(probs),
                        dim(s),
                        dim(m),
                        dim(c),
                    ],
                );
            }
        }
    }

    fn fusion_attention_backward(
        &self,
        d_ps: &mut GpuTensor<D>,
        d_lr: &mut GpuTensor<D>,
        dout: &GpuTensor<D>,
        ps: &GpuTensor<D>,
        lr: &GpuTensor<D>,
        probs: &GpuTensor<D>,
        mode: FusionMode,
        dims: FusionAttentionDims,
    ) {
        let FusionAttentionDims { s, m, c } = dims;
        dims.check_backward(d_ps.len, d_lr.len, dout.len, ps.len, lr.len, probs.len);
        let mut d_scores = self.zeros(s * m); // (S, M)
        let t_a = Gemm {
            trans_a: true,
            ..Gemm::nn(m, c, s)
        };
        match mode {
            FusionMode::Attend => {
                // out = ps + W·lr: d lr = Wᵀ·dout, dW = dout·lrᵀ, then the row-softmax backward.
                self.copy_into(d_ps, dout);
                self.matmul(d_lr, probs, dout, t_a);
                let mut dw = self.zeros(s * m); // (S, M)
                self.matmul(&mut dw, dout, lr, Gemm::nt(s, m, c));
                self.softmax_rows_backward_dinp(&mut d_scores, &dw, probs, s, m);
            }
            FusionMode::Paper => {
                let dg = self.zeros(s); // (S)
                self.launch(
                    "fusion_paper_backward_rows",
                    LaunchCfg::linear(s as u32, ROW_BLOCK),
                    &[
                        self.ptr(d_ps),
                        self.ptr(&dg),
                        self.ptr(dout),
                        self.ptr(ps),
                        self.ptr(probs),
                        dim(s),
                        dim(m),
                        dim(c),
                    ],
                );
                self.launch(
                    "fusion_paper_backward_cols",
                    LaunchCfg::linear(blocks_for(m, ELEMENTWISE_BLOCK), ELEMENTWISE_BLOCK),
                    &[
                        self.ptr(&d_scores),
                        self.ptr(probs),
                        self.ptr(&dg),
                        dim(s),
                        dim(m),
                    ],
                );
                self.fill_zero(d_lr);
            }
        }
        // scores = ps·lrᵀ/√C
        let inv_sqrt_c = 1.0 / (c as f64).sqrt();
        self.matmul(
            d_ps,
            &d_scores,
            lr,
            Gemm::nn(s, c, m).alpha(inv_sqrt_c).accumulate(true),
        );
        self.matmul(d_lr, &d_scores, ps, t_a.alpha(inv_sqrt_c).accumulate(true));
    }

    fn gated_experts_forward(
        &self,
        out: &mut GpuTensor<D>,
        gate: &GpuTensor<D>,
        experts: &[&GpuTensor<D>],
        dims: GatedExpertsDims,
    ) {
        let GatedExpertsDims { n, c } = dims;
        let e = experts.len();
        dims.check_forward(out.len, gate.len, experts.iter().map(|x| x.len));
        // The first expert's launch writes `out`, the others add to it: none would leave it as
        // it was.
        assert!(e > 0, "gated_experts_forward: no experts");
        for (i, x) in experts.iter().enumerate() {
            self.launch(
                "gated_experts_forward_one",
                LaunchCfg::linear(blocks_for(n * c, ELEMENTWISE_BLOCK), ELEMENTWISE_BLOCK),
                &[
                    self.ptr(out),
                    self.ptr(gate),
                    self.ptr(x),
                    dim(i),
                    dim(e),
                    dim(n),
                    dim(c),
                    Arg::I32((i == 0) as i32),
                ],
            );
        }
    }

    fn gated_experts_backward(
        &self,
        d_gate: &mut GpuTensor<D>,
        d_experts: &mut [GpuTensor<D>],
        dout: &GpuTensor<D>,
        gate: &GpuTensor<D>,
        experts: &[&GpuTensor<D>],
        dims: GatedExpertsDims,
    ) {
        let GatedExpertsDims { n, c } = dims;
        let e = experts.len();
        dims.check_backward(
            d_gate.len,
            d_experts.iter().map(|x| x.len),
            dout.len,
            gate.len,
            experts.iter().map(|x| x.len),
        );
        for (i, (x, dx)) in experts.iter().zip(d_experts.iter_mut()).enumerate() {
            self.launch(
                "gated_experts_backward_one",
                LaunchCfg::linear(n as u32, ROW_BLOCK),
                &[
                    self.ptr(d_gate),
                    self.ptr(dx),
                    self.ptr(dout),
                    self.ptr(gate),
                    self.ptr(x),
                    dim(i),
                    dim(e),
                    dim(n),
                    dim(c),
                ],
            );
        }
    }

    fn lamp_pool_forward(
        &self,
        out: &mut GpuTensor<D>,
        u: &GpuTensor<D>,
        q: &GpuTensor<D>,
        v: &GpuTensor<D>,
        dims: LampPoolDims,
    ) {
        let LampPoolDims { l, r, c, p } = dims;
        dims.check_forward(out.len, u.len, q.len, v.len);
        let w = self.lamp_pooled(u, q, dims); // (L/p, R)
        self.matmul(out, &w, v, Gemm::nt(l / p, c, r));
    }

    fn lamp_pool_backward(
        &self,
        du: &mut GpuTensor<D>,
        dq: &mut GpuTensor<D>,
        dv: &mut GpuTensor<D>,
        dout: &GpuTensor<D>,
        u: &GpuTensor<D>,
        q: &GpuTensor<D>,
        v: &GpuTensor<D>,
        dims: LampPoolDims,
    ) {
        let LampPoolDims { l, r, c, p } = dims;
        dims.check_backward((du.len, dq.len, dv.len), dout.len, (u.len, q.len, v.len));
        let w = self.lamp_pooled(u, q, dims); // (L/p, R)
        let lp = l / p;
        // out = w·vᵀ: dw = dout·v (L/p, R), dv += doutᵀ·w (C, R).
        let mut dw = self.zeros(lp * r);
        self.matmul(&mut dw, dout, v, Gemm::nn(lp, r, c));
        let t_a = Gemm {
            trans_a: true,
            ..Gemm::nn(c, r, lp)
        };
        self.matmul(dv, dout, &w, t_a.accumulate(true));
        self.launch(
            "lamp_pool_backward_dq",
            LaunchCfg::linear(blocks_for(r, ELEMENTWISE_BLOCK), ELEMENTWISE_BLOCK),
            &[
                self.ptr(dq),
                self.ptr(&dw),
                self.ptr(u),
                self.ptr(q),
                dim(l),
                dim(r),
                dim(p),
            ],
        );
        self.launch(
            "lamp_pool_backward_du",
            LaunchCfg::linear(blocks_for(l * r, ELEMENTWISE_BLOCK), ELEMENTWISE_BLOCK),
            &[
                self.ptr(du),
                self.ptr(&dw),
                self.ptr(q),
                dim(l),
                dim(r),
                dim(p),
            ],
        );
    }

    // ---- optimiser ----------------------------------------------------------------------------

    fn sum_squares(&self, x: &GpuTensor<D>) -> f64 {
        let n = x.len;
        let blocks = blocks_for(n, ELEMENTWISE_BLOCK).min(1024);
        let mut partial = self.alloc_bytes(blocks as usize * 4); // (blocks) f32
        self.expect(self.device.memset_zero(&mut partial, blocks as usize * 4));
        self.launch(
            "sum_squares",
            LaunchCfg::linear(blocks, ELEMENTWISE_BLOCK),
            &[Arg::Ptr(self.device.ptr(&partial)), self.ptr(x), dim(n)],
        );
        let mut bytes = vec![0u8; blocks as usize * 4];
        self.expect(self.device.download(&partial, &mut bytes));
        let partial: Vec<f32> = bytemuck::pod_collect_to_vec(&bytes);
        partial.iter().map(|&p| p as f64).sum()
    }

    fn state_upload(&self, data: &[f64]) -> GpuState<D> {
        let values: Vec<f32> = data.iter().map(|&x| x as f32).collect();
        let mut buf = self.alloc_bytes(std::mem::size_of_val(values.as_slice()).max(1));
        self.expect(self.device.upload(&mut buf, bytemuck::cast_slice(&values)));
        GpuState {
            buf,
            len: data.len(),
        }
    }

    fn state_download(&self, x: &GpuState<D>) -> Vec<f64> {
        let mut values = vec![0f32; x.len];
        self.expect(
            self.device
                .download(&x.buf, bytemuck::cast_slice_mut(&mut values)),
        );
        values.into_iter().map(f64::from).collect()
    }

    fn adamw_step(
        &self,
        param: &mut GpuTensor<D>,
        master: &mut GpuState<D>,
        m: &mut GpuState<D>,
        v: &mut GpuState<D>,
        grad: &GpuTensor<D>,
        h: AdamW,
    ) {
        let n = param.len;
        h.check(n, master.len, m.len, v.len, grad.len);
        // Bias corrections in f64 on the host, as the CPU reference.
        let bc1 = 1.0 - h.beta1.powf(h.step as f64);
        let bc2 = 1.0 - h.beta2.powf(h.step as f64);
        self.launch(
            "adamw_step",
            LaunchCfg::linear(blocks_for(n, ELEMENTWISE_BLOCK), ELEMENTWISE_BLOCK),
            &[
                self.ptr(param),
                self.sptr(master),
                self.sptr(m),
                self.sptr(v),
                self.ptr(grad),
                dim(n),
                Arg::F32(h.lr as f32),
                Arg::F32(h.beta1 as f32),
                Arg::F32(h.beta2 as f32),
                Arg::F32(h.eps as f32),
                Arg::F32(h.weight_decay as f32),
                Arg::F32(bc1 as f32),
                Arg::F32(bc2 as f32),
                Arg::F32(h.grad_scale as f32),
            ],
        );
    }

    // ---- loss ---------------------------------------------------------------------------------

    fn cross_entropy_forward_backward(
        &self,
        losses: &mut GpuTensor<D>,
        dlogits: &mut GpuTensor<D>,
        logits: &GpuTensor<D>,
        targets: &GpuIndex<D>,
        dloss: f64,
        dims: CrossEntropyDims,
    ) {
        let CrossEntropyDims { m, v } = dims;
        dims.check(losses.len, dlogits.len, logits.len, targets.len);
        self.launch(
            "cross_entropy_forward_backward",
            LaunchCfg::linear(m as u32, ROW_BLOCK),
            &[
                self.ptr(losses),
                self.ptr(dlogits),
                self.ptr(logits),
                self.iptr(targets),
                dim(m),
                dim(v),
                Arg::F32(dloss as f32),
            ],
        );
    }
}
