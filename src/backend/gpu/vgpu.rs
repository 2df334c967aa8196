//! The virtual GPU: device memory is host memory, kernels are the same kernels/*.cu compiled as
//! C++ (kernels/vgpu/, built by build.rs) and launched through one `void**` entry point exactly as
//! `cuLaunchKernel` takes them, GEMMs run on the CPU (the `gemm` crate, f32 accumulation).
//!
//! It is a test device: correct, not fast. It lets `cargo test` run every kernel and the whole
//! GPU backend on machines without a GPU.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ffi::{c_char, c_void, CStr, CString};
use std::ptr::NonNull;
use std::sync::Arc;
use std::time::Instant;

use half::bf16;

use super::device::{Arg, DType, Device, GemmDesc, GpuError, LaunchCfg, MemoryCounter};

extern "C" {
    fn vgpu_launch(
        name: *const c_char,
        grid: *const u32,
        block: *const u32,
        smem: u32,
        params: *mut *mut c_void,
        err: *mut c_char,
        err_len: usize,
    ) -> i32;
    fn vgpu_kernel_count() -> usize;
    fn vgpu_kernel_name(i: usize) -> *const c_char;
}

/// The names of every kernel the virtual GPU was built with, sorted.
pub fn kernel_names() -> Vec<String> {
    // SAFETY: the table is filled by static constructors before main and never changes after;
    // each name is a NUL-terminated string owned by the table.
    unsafe {
        (0..vgpu_kernel_count())
            .filter_map(|i| {
                let p = vgpu_kernel_name(i);
                (!p.is_null()).then(|| CStr::from_ptr(p).to_string_lossy().into_owned())
            })
            .collect()
    }
}

/// Host memory standing in for device memory, aligned like a CUDA allocation.
pub struct HostBuffer {
    ptr: NonNull<u8>,
    layout: Layout,
    memory: Arc<MemoryCounter>,
}

// SAFETY: a HostBuffer owns its allocation like a Box<[u8]>; access goes through &/&mut.
unsafe impl Send for HostBuffer {}
unsafe impl Sync for HostBuffer {}

impl Drop for HostBuffer {
    fn drop(&mut self) {
        // SAFETY: allocated in `alloc` with this layout.
        unsafe { dealloc(self.ptr.as_ptr(), self.layout) }
        self.memory.sub(self.layout.size());
    }
}

/// See the module docs.
#[derive(Debug, Default)]
pub struct VirtualDevice {
    memory: Arc<MemoryCounter>,
}

impl VirtualDevice {
    pub fn new() -> Self {
        VirtualDevice::default()
    }
}

impl Device for VirtualDevice {
    type Buffer = HostBuffer;
    /// Work runs when it is launched, so the host clock times it.
    type Event = Instant;

    fn name(&self) -> String {
        "vgpu".into()
    }

    fn alloc(&self, bytes: usize) -> Result<HostBuffer, GpuError> {
        // 256-byte alignment as cudaMalloc guarantees; at least 1 byte so the pointer is real.
        let layout = Layout::from_size_align(bytes.max(1), 256)
            .map_err(|_| GpuError::OutOfMemory { bytes })?;
        // SAFETY: the layout has non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr).ok_or(GpuError::OutOfMemory { bytes })?;
        self.memory.add(layout.size());
        Ok(HostBuffer {
            ptr,
            layout,
            memory: Arc::clone(&self.memory),
        })
    }

    fn ptr(&self, buf: &HostBuffer) -> u64 {
        buf.ptr.as_ptr() as u64
    }

    fn upload(&self, dst: &mut HostBuffer, src: &[u8]) -> Result<(), GpuError> {
        check_len("upload", dst, src.len())?;
        // SAFETY: dst holds at least src.len() bytes (checked) and does not overlap a slice.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst.ptr.as_ptr(), src.len()) };
        Ok(())
    }

    fn download(&self, src: &HostBuffer, dst: &mut [u8]) -> Result<(), GpuError> {
        check_len("download", src, dst.len())?;
        // SAFETY: as in upload.
        unsafe { std::ptr::copy_nonoverlapping(src.ptr.as_ptr(), dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    fn copy(&self, dst: &mut HostBuffer, src: &HostBuffer, bytes: usize) -> Result<(), GpuError> {
        check_len("copy", dst, bytes)?;
        check_len("copy", src, bytes)?;
        // SAFETY: both hold `bytes` bytes; distinct buffers (&mut and &) never overlap.
        unsafe { std::ptr::copy_nonoverlapping(src.ptr.as_ptr(), dst.ptr.as_ptr(), bytes) };
        Ok(())
    }

    fn memset_zero(&self, buf: &mut HostBuffer, bytes: usize) -> Result<(), GpuError> {
        check_len("memset", buf, bytes)?;
        // SAFETY: buf holds `bytes` bytes.
        unsafe { std::ptr::write_bytes(buf.ptr.as_ptr(), 0, bytes) };
        Ok(())
    }

    fn launch(&self, name: &str, cfg: LaunchCfg, args: &[Arg]) -> Result<(), GpuError> {
        let launch_err = |message: String| GpuError::Launch {
            kernel: name.to_string(),
            message,
        };
        let cname = CString::new(name).map_err(|_| launch_err("name contains NUL".into()))?;
        let mut args = args.to_vec();
        let mut params: Vec<*mut c_void> = args.iter_mut().map(Arg::as_param).collect();
        let mut err = [0u8; 256];
        // SAFETY: every pointer argument addresses a live HostBuffer of the size the kernel's
        // contract asks for (GpuBackend checks lengths before launching); `params` and `args`
        // outlive the synchronous call.
        let rc = unsafe {
            vgpu_launch(
                cname.as_ptr(),
                cfg.grid.as_ptr(),
                cfg.block.as_ptr(),
                cfg.smem,
                params.as_mut_ptr(),
                err.as_mut_ptr() as *mut c_char,
                err.len(),
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let msg = CStr::from_bytes_until_nul(&err)
            .map(|c| c.to_string_lossy().into_owned())
            .unwrap_or_default();
        Err(launch_err(msg))
    }

    fn gemm(&self, dtype: DType, c: u64, a: u64, b: u64, g: &GemmDesc) -> Result<(), GpuError> {
        if g.m == 0 || g.n == 0 {
            return Ok(());
        }
        for i in 0..g.batch {
            // SAFETY: GpuBackend passes addresses of buffers holding every element the strides
            // reach (it checks the lengths); f32 or bf16 as `dtype` says.
            unsafe {
                match dtype {
                    DType::F32 => gemm_f32(
                        (c as *mut f32).add(i * g.stride_c),
                        (a as *const f32).add(i * g.stride_a),
                        (b as *const f32).add(i * g.stride_b),
                        g,
                    ),
                    DType::Bf16 => gemm_bf16(
                        (c as *mut bf16).add(i * g.stride_c),
                        (a as *const bf16).add(i * g.stride_a),
                        (b as *const bf16).add(i * g.stride_b),
                        g,
                    ),
                }
            }
        }
        Ok(())
    }

    fn synchronize(&self) -> Result<(), GpuError> {
        Ok(())
    }

    fn record_event(&self) -> Result<Instant, GpuError> {
        Ok(Instant::now())
    }

    fn elapsed_ms(&self, start: &Instant, end: &Instant) -> Result<f64, GpuError> {
        Ok(end.duration_since(*start).as_secs_f64() * 1e3)
    }

    fn memory(&self) -> &MemoryCounter {
        &self.memory
    }
}

fn check_len(what: &str, buf: &HostBuffer, bytes: usize) -> Result<(), GpuError> {
    if bytes > buf.layout.size() {
        return Err(GpuError::Driver(format!(
            "vgpu {what}: {bytes} bytes into a buffer of {}",
            buf.layout.size()
        )));
    }
    Ok(())
}

/// Row and column strides of `op(x)` for a matrix stored with leading dimension `ld`.
fn op_strides(trans: bool, ld: usize) -> (isize, isize) {
    if trans {
        (1, ld as isize)
    } else {
        (ld as isize, 1)
    }
}

/// One f32 GEMM on raw pointers, `c = alpha·op(a)·op(b) + beta·c`.
///
/// # Safety
/// The pointers must address every element the dimensions and leading dimensions reach.
unsafe fn gemm_f32(c: *mut f32, a: *const f32, b: *const f32, g: &GemmDesc) {
    let (a_rs, a_cs) = op_strides(g.trans_a, g.lda);
    let (b_rs, b_cs) = op_strides(g.trans_b, g.ldb);
    if g.k == 0 {
        for i in 0..g.m {
            for j in 0..g.n {
                let p = c.add(i * g.ldc + j);
                *p = if g.beta == 0.0 { 0.0 } else { g.beta * *p };
            }
        }
        return;
    }
    // The gemm crate computes dst = alpha·dst + beta·lhs·rhs: our beta is its alpha.
    gemm::gemm(
        g.m,
        g.n,
        g.k,
        c,
        1,
        g.ldc as isize,
        g.beta != 0.0,
        a,
        a_cs,
        a_rs,
        b,
        b_cs,
        b_rs,
        g.beta,
        g.alpha,
        false,
        false,
        false,
        parallelism(g),
    );
}

/// A bf16 GEMM as cuBLAS computes it: bf16 inputs, f32 accumulation, one rounding of the result.
///
/// # Safety
/// As [`gemm_f32`].
unsafe fn gemm_bf16(c: *mut bf16, a: *const bf16, b: *const bf16, g: &GemmDesc) {
    let (a_rs, a_cs) = op_strides(g.trans_a, g.lda);
    let (b_rs, b_cs) = op_strides(g.trans_b, g.ldb);
    let (m, n, k) = (g.m, g.n, g.k);
    let mut a32 = vec![0f32; m * k]; // op(a) (M, K)
    let mut b32 = vec![0f32; k * n]; // op(b) (K, N)
    let mut c32 = vec![0f32; m * n]; // (M, N)
    for i in 0..m {
        for p in 0..k {
            a32[i * k + p] = (*a.offset(i as isize * a_rs + p as isize * a_cs)).to_f32();
        }
    }
    for p in 0..k {
        for j in 0..n {
            b32[p * n + j] = (*b.offset(p as isize * b_rs + j as isize * b_cs)).to_f32();
        }
    }
    for i in 0..m {
        for j in 0..n {
            c32[i * n + j] = (*c.add(i * g.ldc + j)).to_f32();
        }
    }
    let dense = GemmDesc {
        lda: k,
        ldb: n,
        ldc: n,
        trans_a: false,
        trans_b: false,
        ..*g
    };
    gemm_f32(c32.as_mut_ptr(), a32.as_ptr(), b32.as_ptr(), &dense);
    for i in 0..m {
        for j in 0..n {
            *c.add(i * g.ldc + j) = bf16::from_f32(c32[i * n + j]);
        }
    }
}

fn parallelism(g: &GemmDesc) -> gemm::Parallelism {
    if g.m * g.n * g.k >= 1 << 18 {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    }
}
