//! The virtual GPU: device memory is host memory, kernels are the same kernels/*.cu compiled as
//! C++ (kernels/vgpu/, built by build.rs) and launched through one `void**` entry point exactly as
//! `cuLaunchKernel` takes them, GEMMs run on the CPU (the `gemm` crate, f32 accumulation).
//!
//! It is a test device: correct, not fast. It lets `cargo test` run every kernel and the whole
//! GPU backend on machines without a GPU. Every launch is checked: the argument kinds against the
//! kernel's parameters, the block size against its `__launch_bounds__`, shared memory against the
//! hardware's limits. The [`Schedule`] sets the order of blocks and threads, so that a missing
//! barrier or a dependency between blocks shows as a wrong result under another schedule.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::collections::BTreeSet;
use std::ffi::{c_char, c_void, CStr, CString};
use std::fmt;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use half::bf16;

use super::device::{Arg, DType, Device, GemmDesc, GpuError, LaunchCfg, MemoryCounter};

extern "C" {
    fn vgpu_launch(
        name: *const c_char,
        grid: *const u32,
        block: *const u32,
        smem: u32,
        schedule: i32,
        seed: u64,
        kinds: *const c_char,
        params: *mut *mut c_void,
        err: *mut c_char,
        err_len: usize,
    ) -> i32;
    fn vgpu_kernel_count() -> usize;
    fn vgpu_kernel_info(
        i: usize,
        name: *mut *const c_char,
        file: *mut *const c_char,
        block: *mut u32,
        signature: *mut *const c_char,
    ) -> bool;
}

/// A kernel the virtual GPU was built with: the same source the CUDA device compiles.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelInfo {
    /// `rmsnorm_forward_bf16`.
    pub name: String,
    /// The kernel file it is in: `norm.cu`.
    pub file: String,
    /// Its `__launch_bounds__`, the block size every launch uses.
    pub block: u32,
    /// The kinds of its parameters in order, as [`Arg::kind`] names them: `"ppif"`.
    pub signature: String,
}

/// Every kernel the virtual GPU was built with, sorted by name.
pub fn kernels() -> Vec<KernelInfo> {
    // SAFETY: the table is filled by static constructors before main and never changes after;
    // the strings are NUL-terminated and owned by the table.
    unsafe {
        (0..vgpu_kernel_count())
            .filter_map(|i| {
                let (mut name, mut file, mut sig) =
                    (std::ptr::null(), std::ptr::null(), std::ptr::null());
                let mut block = 0u32;
                if !vgpu_kernel_info(i, &mut name, &mut file, &mut block, &mut sig) {
                    return None;
                }
                let text = |p: *const c_char| CStr::from_ptr(p).to_string_lossy().into_owned();
                Some(KernelInfo {
                    name: text(name),
                    file: text(file),
                    block,
                    signature: text(sig),
                })
            })
            .collect()
    }
}

/// The names of every kernel the virtual GPU was built with, sorted.
pub fn kernel_names() -> Vec<String> {
    kernels().into_iter().map(|k| k.name).collect()
}

/// The order in which the virtual GPU runs the blocks of a grid and, between two barriers, the
/// threads of a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Schedule {
    /// Index order: block 0 first, thread 0 first.
    #[default]
    Fixed,
    /// The reverse of index order.
    Reversed,
    /// A permutation drawn from this seed (a new one for every launch and every sweep of a block).
    Shuffled(u64),
}

impl Schedule {
    /// The environment variable that sets the schedule of [`VirtualDevice::new`].
    pub const ENV: &'static str = "FASTPT_VGPU_SCHEDULE";

    /// `fixed`, `reversed` (or `reverse`), `shuffled:SEED` (or `shuffle:SEED`).
    pub fn parse(text: &str) -> Result<Schedule, GpuError> {
        let bad = || {
            GpuError::Driver(format!(
                "virtual GPU schedule {text:?}: expected fixed, reversed or shuffled:SEED \
                 (SEED an unsigned integer)"
            ))
        };
        match text.trim() {
            "fixed" => Ok(Schedule::Fixed),
            "reversed" | "reverse" => Ok(Schedule::Reversed),
            other => {
                let seed = other
                    .strip_prefix("shuffled:")
                    .or_else(|| other.strip_prefix("shuffle:"))
                    .ok_or_else(bad)?;
                seed.parse().map(Schedule::Shuffled).map_err(|_| bad())
            }
        }
    }

    /// The schedule `$FASTPT_VGPU_SCHEDULE` names; [`Schedule::Fixed`] when it is unset or empty.
    pub fn from_env() -> Result<Schedule, GpuError> {
        match std::env::var(Self::ENV) {
            Ok(v) if !v.trim().is_empty() => {
                Self::parse(&v).map_err(|e| GpuError::Driver(format!("${}: {e}", Self::ENV)))
            }
            _ => Ok(Schedule::Fixed),
        }
    }

    fn code(self) -> i32 {
        match self {
            Schedule::Fixed => 0,
            Schedule::Reversed => 1,
            Schedule::Shuffled(_) => 2,
        }
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Schedule::Fixed => f.write_str("fixed"),
            Schedule::Reversed => f.write_str("reversed"),
            Schedule::Shuffled(seed) => write!(f, "shuffled:{seed}"),
        }
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
    schedule: Schedule,
    /// Launches so far: mixed into the shuffled schedule's seed, so every launch draws anew.
    launches: AtomicU64,
    /// The kernels launched on this device (tests check that every kernel was).
    launched: Mutex<BTreeSet<String>>,
}

impl VirtualDevice {
    /// A device with the schedule of `$FASTPT_VGPU_SCHEDULE` (fixed when unset). An invalid value
    /// is reported on stderr and the fixed schedule used; [`VirtualDevice::from_env`] returns the
    /// error instead.
    pub fn new() -> Self {
        let schedule = Schedule::from_env().unwrap_or_else(|e| {
            eprintln!("warning: {e}; using the fixed schedule");
            Schedule::Fixed
        });
        VirtualDevice::with_schedule(schedule)
    }

    /// A device with the schedule of `$FASTPT_VGPU_SCHEDULE`, or its parse error.
    pub fn from_env() -> Result<Self, GpuError> {
        Ok(VirtualDevice::with_schedule(Schedule::from_env()?))
    }

    pub fn with_schedule(schedule: Schedule) -> Self {
        VirtualDevice {
            schedule,
            ..VirtualDevice::default()
        }
    }

    pub fn schedule(&self) -> Schedule {
        self.schedule
    }

    /// The names of the kernels launched on this device so far, sorted.
    pub fn launched(&self) -> Vec<String> {
        let launched = self.launched.lock().unwrap_or_else(|p| p.into_inner());
        launched.iter().cloned().collect()
    }
}

impl Device for VirtualDevice {
    type Buffer = HostBuffer;
    /// Work runs when it is launched, so the host clock times it.
    type Event = Instant;

    fn name(&self) -> String {
        match self.schedule {
            Schedule::Fixed => "vgpu".into(),
            other => format!("vgpu ({other} schedule)"),
        }
    }

    fn kernel_modules(&self) -> Vec<(String, Result<String, String>)> {
        super::nvrtc::kernel_files()
            .into_iter()
            .map(|file| {
                let from = format!(
                    "compiled into the binary as C++ ({} schedule)",
                    self.schedule
                );
                (file.to_string(), Ok(from))
            })
            .collect()
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
        let kinds: String = args.iter().map(|a| a.kind()).collect();
        let ckinds = CString::new(kinds).map_err(|_| launch_err("kinds contain NUL".into()))?;
        let mut args = args.to_vec();
        let mut params: Vec<*mut c_void> = args.iter_mut().map(Arg::as_param).collect();
        let mut err = [0u8; 256];
        let launch = self.launches.fetch_add(1, Ordering::Relaxed);
        let seed = match self.schedule {
            // splitmix-style mixing: nearby (seed, launch) pairs draw unrelated orders.
            Schedule::Shuffled(seed) => (seed ^ launch.wrapping_mul(0x9e37_79b9_7f4a_7c15))
                .wrapping_mul(0xbf58_476d_1ce4_e5b9),
            _ => 0,
        };
        // SAFETY: every pointer argument addresses a live HostBuffer of the size the kernel's
        // contract asks for (GpuBackend checks lengths before launching); the C side checks the
        // argument kinds against the kernel's parameters before it reads `params`; `params` and
        // `args` outlive the synchronous call.
        let rc = unsafe {
            vgpu_launch(
                cname.as_ptr(),
                cfg.grid.as_ptr(),
                cfg.block.as_ptr(),
                cfg.smem,
                self.schedule.code(),
                seed,
                ckinds.as_ptr(),
                params.as_mut_ptr(),
                err.as_mut_ptr() as *mut c_char,
                err.len(),
            )
        };
        if rc == 0 {
            let mut launched = self.launched.lock().unwrap_or_else(|p| p.into_inner());
            if !launched.contains(name) {
                launched.insert(name.to_string());
            }
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
