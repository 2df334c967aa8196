//! What [`super::GpuBackend`] needs from a device: memory, kernel launches by name with
//! `cuLaunchKernel`'s calling convention, and GEMMs. Two implementations: [`super::cuda::CudaDevice`]
//! (a real GPU) and [`super::vgpu::VirtualDevice`] (the same kernels compiled as C++, on the CPU).

use std::fmt;

/// The storage type of a GPU backend's tensors. Accumulation is always f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    Bf16,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::Bf16 => 2,
        }
    }

    /// The suffix of the kernel instantiations: `rmsnorm_forward_bf16`.
    pub fn suffix(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::Bf16 => "bf16",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.suffix())
    }
}

/// One kernel argument. Pointers are device addresses ([`Device::ptr`]).
#[derive(Debug, Clone, Copy)]
pub enum Arg {
    Ptr(u64),
    I32(i32),
    F32(f32),
}

impl Arg {
    /// The kind of the argument as the kernel's parameter must be: `'p'` pointer (`.u64` in PTX),
    /// `'i'` int (`.u32`), `'f'` float (`.f32`).
    pub fn kind(&self) -> char {
        match self {
            Arg::Ptr(_) => 'p',
            Arg::I32(_) => 'i',
            Arg::F32(_) => 'f',
        }
    }

    /// The address of the argument's value, as `cuLaunchKernel`'s `kernelParams` wants it.
    pub fn as_param(&mut self) -> *mut std::ffi::c_void {
        match self {
            Arg::Ptr(p) => p as *mut u64 as *mut _,
            Arg::I32(x) => x as *mut i32 as *mut _,
            Arg::F32(x) => x as *mut f32 as *mut _,
        }
    }
}

/// Grid and block dimensions and dynamic shared memory of a launch.
#[derive(Debug, Clone, Copy)]
pub struct LaunchCfg {
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub smem: u32,
}

impl LaunchCfg {
    /// A 1-D launch: `grid` blocks of `block` threads.
    pub fn linear(grid: u32, block: u32) -> Self {
        LaunchCfg {
            grid: [grid.max(1), 1, 1],
            block: [block, 1, 1],
            smem: 0,
        }
    }
}

/// A strided, batched GEMM on row-major matrices: for each batch entry `i`,
/// `c_i (M, N) = alpha · op(a_i) · op(b_i) + beta · c_i`, with `op(a_i)` `(M, K)` (`a` stored
/// `(K, M)` when `trans_a`) and `op(b_i)` `(K, N)`. Leading dimensions are row strides in
/// elements; batch strides are in elements. Inputs and output have the device's dtype.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GemmDesc {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub trans_a: bool,
    pub trans_b: bool,
    pub lda: usize,
    pub ldb: usize,
    pub ldc: usize,
    pub batch: usize,
    pub stride_a: usize,
    pub stride_b: usize,
    pub stride_c: usize,
    pub alpha: f32,
    pub beta: f32,
}

impl GemmDesc {
    /// One dense GEMM with packed rows (`lda` = row length of the stored `a`, and so on).
    pub fn dense(m: usize, n: usize, k: usize, trans_a: bool, trans_b: bool) -> Self {
        GemmDesc {
            m,
            n,
            k,
            trans_a,
            trans_b,
            lda: if trans_a { m } else { k },
            ldb: if trans_b { k } else { n },
            ldc: n,
            batch: 1,
            stride_a: 0,
            stride_b: 0,
            stride_c: 0,
            alpha: 1.0,
            beta: 0.0,
        }
    }
}

/// Errors from a device. Ops panic with these: they mean a broken device or a bug, not bad input.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("{0}")]
    Driver(String),
    #[error("kernel {kernel}: {message}")]
    Launch { kernel: String, message: String },
    #[error("kernel {kernel} failed to compile:\n{log}")]
    Compile { kernel: String, log: String },
    #[error("out of device memory allocating {bytes} bytes")]
    OutOfMemory { bytes: usize },
}

/// Bytes of device memory held by a device's buffers: now, and the most at any time since the
/// device opened or the last [`MemoryCounter::reset_peak`]. Buffers update it as they are
/// allocated and dropped.
#[derive(Debug, Default)]
pub struct MemoryCounter {
    current: std::sync::atomic::AtomicUsize,
    peak: std::sync::atomic::AtomicUsize,
}

impl MemoryCounter {
    pub fn add(&self, bytes: usize) {
        use std::sync::atomic::Ordering::Relaxed;
        let now = self.current.fetch_add(bytes, Relaxed) + bytes;
        self.peak.fetch_max(now, Relaxed);
    }

    pub fn sub(&self, bytes: usize) {
        self.current
            .fetch_sub(bytes, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn current(&self) -> usize {
        self.current.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn peak(&self) -> usize {
        self.peak.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Starts a new peak from what is held now.
    pub fn reset_peak(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        self.peak.store(self.current.load(Relaxed), Relaxed);
    }
}

/// A device that runs our kernels. All operations are ordered (one stream); `download` waits for
/// the work before it.
pub trait Device: Send + Sync + 'static {
    /// Device memory; freed on drop.
    type Buffer: Send + Sync;
    /// A point in the device's queue of work, for timing it (`cuEventRecord` on a GPU).
    type Event;

    /// "cuda:0 NVIDIA H100 80GB HBM3 (sm_90)", "vgpu".
    fn name(&self) -> String;

    /// Facts for `fastpt doctor`: driver, compute capability, memory, ...
    fn describe(&self) -> Vec<String> {
        Vec::new()
    }

    /// Every kernel file with where its module came from (an embedded CUBIN, PTX, NVRTC at run
    /// time, ...) or why it could not be loaded. Loads them all, for `fastpt doctor`.
    fn kernel_modules(&self) -> Vec<(String, Result<String, String>)>;

    /// What this device cannot run, and why ("bf16: needs sm_80 ..."); empty when it runs
    /// everything.
    fn unavailable(&self) -> Vec<String> {
        Vec::new()
    }

    /// Zero-filled memory of `bytes` bytes (0 is allowed).
    fn alloc(&self, bytes: usize) -> Result<Self::Buffer, GpuError>;

    /// The device address of a buffer, for kernel arguments and GEMMs.
    fn ptr(&self, buf: &Self::Buffer) -> u64;

    fn upload(&self, dst: &mut Self::Buffer, src: &[u8]) -> Result<(), GpuError>;

    fn download(&self, src: &Self::Buffer, dst: &mut [u8]) -> Result<(), GpuError>;

    /// Copies `bytes` bytes from `src` to `dst`.
    fn copy(
        &self,
        dst: &mut Self::Buffer,
        src: &Self::Buffer,
        bytes: usize,
    ) -> Result<(), GpuError>;

    fn memset_zero(&self, buf: &mut Self::Buffer, bytes: usize) -> Result<(), GpuError>;

    /// Launches kernel `name` (e.g. `rmsnorm_forward_bf16`) with `args` in declaration order.
    fn launch(&self, name: &str, cfg: LaunchCfg, args: &[Arg]) -> Result<(), GpuError>;

    /// See [`GemmDesc`]. `c`, `a`, `b` are device addresses of `dtype` elements.
    fn gemm(&self, dtype: DType, c: u64, a: u64, b: u64, g: &GemmDesc) -> Result<(), GpuError>;

    /// Waits for all queued work.
    fn synchronize(&self) -> Result<(), GpuError>;

    /// Records an event after the work queued so far.
    fn record_event(&self) -> Result<Self::Event, GpuError>;

    /// Milliseconds the device spent between two recorded events (waits for `end`).
    fn elapsed_ms(&self, start: &Self::Event, end: &Self::Event) -> Result<f64, GpuError>;

    /// The memory our buffers hold on this device (see [`MemoryCounter`]).
    fn memory(&self) -> &MemoryCounter;

    /// Free device memory in bytes (the driver's figure); `None` for a device in host memory
    /// (the virtual GPU) or when the driver cannot say.
    fn free_bytes(&self) -> Option<u64> {
        None
    }
}
