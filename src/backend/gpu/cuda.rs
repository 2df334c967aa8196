//! The CUDA device: cudarc's thin driver layer (`result`/`sys`), one context (the device's
//! primary context, shared with cuBLASLt) and one stream for everything, our kernels and GEMMs by
//! cuBLASLt.
//!
//! Kernels load one file (one module) at a time, at the first launch of one of its kernels: the
//! CUBIN build.rs embedded for the GPU's compute capability, else the embedded `compute_80` PTX
//! (the driver compiles it), else NVRTC at run time (or its PTX cache). A GPU without an embedded
//! image (sm_75, say) thus still runs what its architecture supports, and a module that fails to
//! load costs only its own kernels. Load failures carry the driver's JIT error log.
//!
//! cudarc loads libcuda, NVRTC and cuBLASLt at first use and panics when one is missing; every
//! entry point here checks that a library is present before its first call, so that a machine
//! without a GPU gets an error (or `false` from [`cuda_available`]), never a panic.

use std::collections::hash_map::{Entry, HashMap};
use std::ffi::{c_void, CString};
use std::sync::{Arc, Mutex};

use cudarc::cublaslt::{result as blas, sys as blas_sys};
use cudarc::driver::result::{self as drv, DriverError};
use cudarc::driver::sys;

use super::device::{Arg, DType, Device, GemmDesc, GpuError, LaunchCfg, MemoryCounter};
use super::{images, nvrtc};

/// cuBLASLt's workspace, allocated once per device (what cuBLASLt asks for on Hopper).
const WORKSPACE_BYTES: usize = 32 << 20;

/// True when a CUDA driver is installed and sees at least one device. Never panics.
pub fn cuda_available() -> bool {
    std::panic::catch_unwind(|| {
        // SAFETY: only tries to open libcuda by name.
        (unsafe { sys::is_culib_present() })
            && drv::init().is_ok()
            && drv::device::get_count().is_ok_and(|n| n > 0)
    })
    .unwrap_or(false)
}

/// The number of CUDA devices the driver sees (0 without a driver). Never panics.
pub fn device_count() -> usize {
    std::panic::catch_unwind(|| {
        // SAFETY: only tries to open libcuda by name.
        if !(unsafe { sys::is_culib_present() }) || drv::init().is_err() {
            return 0;
        }
        drv::device::get_count().map_or(0, |n| n.max(0) as usize)
    })
    .unwrap_or(0)
}

/// A driver error as "what: CUDA_ERROR_NAME (description)".
fn driver_err(what: &str, e: DriverError) -> GpuError {
    let name = e.error_name().map(|s| s.to_string_lossy().into_owned());
    let text = e.error_string().map(|s| s.to_string_lossy().into_owned());
    GpuError::Driver(match (name, text) {
        (Ok(n), Ok(t)) => format!("{what}: {n} ({t})"),
        _ => format!("{what}: {:?}", e.0),
    })
}

fn blas_err(what: &str, e: blas::CublasError) -> GpuError {
    GpuError::Driver(format!("cuBLASLt {what}: {:?}", e.0))
}

/// The primary context of a device and our stream. Buffers hold an `Arc` of it, so it lives until
/// the last buffer is freed.
struct Context {
    dev: sys::CUdevice,
    ctx: sys::CUcontext,
    stream: sys::CUstream,
    /// Stream-ordered allocation (`cuMemAllocAsync`) from the device's default pool.
    pools: bool,
    /// Bytes our buffers hold (peak for `fastpt bench`).
    memory: MemoryCounter,
}

// SAFETY: CUDA handles may be used from any thread once the context is current there ([`bind`]);
// the driver serialises work on one stream.
unsafe impl Send for Context {}
unsafe impl Sync for Context {}

impl Context {
    /// Makes the context current on the calling thread (the driver's current context is per
    /// thread; rayon threads and others may call in).
    fn bind(&self) -> Result<(), GpuError> {
        if drv::ctx::get_current().ok().flatten() != Some(self.ctx) {
            // SAFETY: `ctx` is the retained primary context, alive while `self` is.
            unsafe { drv::ctx::set_current(self.ctx) }
                .map_err(|e| driver_err("cuCtxSetCurrent", e))?;
        }
        Ok(())
    }

    fn sync(&self) -> Result<(), GpuError> {
        self.bind()?;
        // SAFETY: our stream, alive while `self` is.
        unsafe { drv::stream::synchronize(self.stream) }
            .map_err(|e| driver_err("cuStreamSynchronize", e))
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // Errors are ignored: nothing can be done about them while dropping.
        let _ = self.sync();
        // SAFETY: created in CudaDevice::new and destroyed once, here; the primary context was
        // retained once there.
        unsafe {
            let _ = drv::stream::destroy(self.stream);
            let _ = drv::primary_ctx::release(self.dev);
        }
    }
}

/// Device memory; zero-filled at allocation, freed (stream-ordered) on drop.
pub struct CudaBuffer {
    ptr: sys::CUdeviceptr,
    bytes: usize,
    ctx: Arc<Context>,
}

impl CudaBuffer {
    pub fn len(&self) -> usize {
        self.bytes
    }

    pub fn is_empty(&self) -> bool {
        self.bytes == 0
    }

    fn check(&self, what: &str, bytes: usize) -> Result<(), GpuError> {
        if bytes > self.bytes {
            return Err(GpuError::Driver(format!(
                "cuda {what}: {bytes} bytes into a buffer of {}",
                self.bytes
            )));
        }
        Ok(())
    }
}

impl Drop for CudaBuffer {
    fn drop(&mut self) {
        if self.ptr == 0 {
            return;
        }
        let _ = self.ctx.bind();
        self.ctx.memory.sub(self.bytes);
        // SAFETY: allocated by `alloc_on` with the same `pools` setting; freed once. Freeing on
        // the stream orders the free after the work queued so far.
        unsafe {
            let _ = if self.ctx.pools {
                drv::free_async(self.ptr, self.ctx.stream)
            } else {
                drv::free_sync(self.ptr)
            };
        }
    }
}

fn alloc_on(ctx: &Arc<Context>, bytes: usize) -> Result<CudaBuffer, GpuError> {
    let mut buf = CudaBuffer {
        ptr: 0,
        bytes,
        ctx: Arc::clone(ctx),
    };
    if bytes == 0 {
        return Ok(buf);
    }
    ctx.bind()?;
    // SAFETY: the context is current and the stream is ours; the memory is zeroed right after.
    let ptr = unsafe {
        if ctx.pools {
            drv::malloc_async(ctx.stream, bytes)
        } else {
            drv::malloc_sync(bytes)
        }
    };
    buf.ptr = ptr.map_err(|e| match e.0 {
        sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY => GpuError::OutOfMemory { bytes },
        _ => driver_err("cuMemAlloc", e),
    })?;
    ctx.memory.add(bytes);
    // SAFETY: `bytes` bytes were just allocated at `buf.ptr`.
    unsafe { drv::memset_d8_async(buf.ptr, 0, bytes, ctx.stream) }
        .map_err(|e| driver_err("cuMemsetD8Async", e))?;
    Ok(buf)
}

/// Facts about a device, for `fastpt doctor`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    pub compute_capability: (i32, i32),
    /// The CUDA version the driver supports, e.g. (13, 0).
    pub driver_version: (i32, i32),
    pub total_memory: usize,
    pub free_memory: usize,
}

/// A CUDA GPU running our kernels. See the module docs.
pub struct CudaDevice {
    ordinal: usize,
    name: String,
    cc: (i32, i32),
    /// Boxed: keeps the device small enough to move around by value.
    kernels: Box<Kernels>,
    blas: blas_sys::cublasLtHandle_t,
    plans: Mutex<HashMap<PlanKey, GemmPlan>>,
    workspace: CudaBuffer,
    // Last: dropped after everything above that lives in the context.
    ctx: Arc<Context>,
}

/// A loaded module and where it came from ("embedded CUBIN sm_90"), or why it could not be loaded.
type Loaded = Result<(sys::CUmodule, String), String>;

/// The kernel modules of a device, loaded per file on first use, and the functions looked up in
/// them.
struct Kernels {
    /// Kernel file → its module.
    modules: Mutex<HashMap<String, Loaded>>,
    /// Kernel name → the function and its static shared memory in bytes (asked once).
    functions: Mutex<HashMap<String, (sys::CUfunction, usize)>>,
    /// Kernel name → kernel file (the virtual GPU's table: built from the same sources).
    files: HashMap<String, String>,
}

// SAFETY: see `Context`; the function and plan tables are behind mutexes, the module and cuBLASLt
// handles are only read after creation (cuBLASLt handles are thread-safe).
unsafe impl Send for CudaDevice {}
unsafe impl Sync for CudaDevice {}

impl CudaDevice {
    /// Opens device `ordinal`: context, stream, cuBLASLt (kernel modules load at first use, see
    /// the module docs). Errors (never panics) when there is no driver, no such device, or no
    /// cuBLASLt.
    pub fn new(ordinal: usize) -> Result<CudaDevice, GpuError> {
        // SAFETY: only tries to open libcuda by name.
        if !std::panic::catch_unwind(|| unsafe { sys::is_culib_present() }).unwrap_or(false) {
            return Err(GpuError::Driver("no CUDA driver (libcuda) found".into()));
        }
        drv::init().map_err(|e| driver_err("cuInit", e))?;
        let count = drv::device::get_count().map_err(|e| driver_err("cuDeviceGetCount", e))?;
        if ordinal >= count.max(0) as usize {
            return Err(GpuError::Driver(format!(
                "no CUDA device {ordinal} (the driver sees {count})"
            )));
        }
        let dev = drv::device::get(ordinal as i32).map_err(|e| driver_err("cuDeviceGet", e))?;
        let attr = |a: sys::CUdevice_attribute| {
            // SAFETY: `dev` comes from cuDeviceGet.
            unsafe { drv::device::get_attribute(dev, a) }
                .map_err(|e| driver_err("cuDeviceGetAttribute", e))
        };
        use sys::CUdevice_attribute::*;
        let cc = (
            attr(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
            attr(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
        );
        let pools = attr(CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED)? != 0;
        let name = drv::device::get_name(dev).map_err(|e| driver_err("cuDeviceGetName", e))?;

        // SAFETY: `dev` comes from cuDeviceGet; released once, by Context::drop.
        let ctx = unsafe { drv::primary_ctx::retain(dev) }
            .map_err(|e| driver_err("cuDevicePrimaryCtxRetain", e))?;
        // SAFETY: just retained.
        unsafe { drv::ctx::set_current(ctx) }.map_err(|e| driver_err("cuCtxSetCurrent", e))?;
        let stream = drv::stream::create(drv::stream::StreamKind::NonBlocking).map_err(|e| {
            // SAFETY: retained above and not yet owned by a Context.
            let _ = unsafe { drv::primary_ctx::release(dev) };
            driver_err("cuStreamCreate", e)
        })?;
        let ctx = Arc::new(Context {
            dev,
            ctx,
            stream,
            pools,
            memory: MemoryCounter::default(),
        });
        if pools {
            // Keep freed memory in the pool instead of returning it to the driver at every
            // synchronisation (what a caching allocator does).
            // SAFETY: `dev` is valid; the attribute takes a u64.
            unsafe {
                let pool = drv::device::get_default_mem_pool(dev)
                    .map_err(|e| driver_err("cuDeviceGetDefaultMemPool", e))?;
                let mut threshold = u64::MAX;
                drv::mem_pool::set_attribute(
                    pool,
                    sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                    &mut threshold as *mut u64 as *mut c_void,
                )
                .map_err(|e| driver_err("cuMemPoolSetAttribute", e))?;
            }
        }

        let toolkit = nvrtc::toolkit();
        // Modules load at first use; that each one can be loaded from somewhere is checked now,
        // so that a GPU no embedded image fits, on a machine without NVRTC, is an error here
        // and not at the first launch.
        let cc_images_missing: Vec<&str> = nvrtc::kernel_files()
            .into_iter()
            .filter(|f| images::candidates(f, cc).is_empty())
            .collect();
        if !cc_images_missing.is_empty() {
            if let Err(e) = &toolkit {
                let arch = format!("sm_{}{}", cc.0, cc.1);
                let cached = cc_images_missing
                    .iter()
                    .all(|f| nvrtc::cached_ptx(None, f, &arch).is_ok());
                if !cached {
                    return Err(GpuError::Driver(format!(
                        "no kernel image in this binary fits {name} ({arch}: it carries CUBIN \
                         for sm_80/86/89/90 and PTX for sm_80+{}), and NVRTC to compile them \
                         is not here either:\n{e}",
                        if images::embedded().is_empty() {
                            "; this build has none: it was built without NVRTC"
                        } else {
                            ""
                        }
                    )));
                }
            }
        }

        let blas = create_blas(toolkit.as_ref().ok().copied())?;
        let workspace = alloc_on(&ctx, WORKSPACE_BYTES)?;
        Ok(CudaDevice {
            ordinal,
            name,
            cc,
            kernels: Box::new(Kernels {
                modules: Mutex::new(HashMap::new()),
                functions: Mutex::new(HashMap::new()),
                files: super::vgpu::kernels()
                    .into_iter()
                    .map(|k| (k.name, k.file))
                    .collect(),
            }),
            blas,
            plans: Mutex::new(HashMap::new()),
            workspace,
            ctx,
        })
    }

    /// Facts for `fastpt doctor` (memory figures are 0 when the driver cannot say).
    pub fn info(&self) -> DeviceInfo {
        let mut driver = 0;
        // SAFETY: a valid out-pointer.
        let _ = unsafe { sys::cuDriverGetVersion(&mut driver) };
        let (free, total) = self
            .ctx
            .bind()
            .ok()
            .and_then(|()| drv::mem_get_info().ok())
            .unwrap_or((0, 0));
        DeviceInfo {
            ordinal: self.ordinal,
            name: self.name.clone(),
            compute_capability: self.cc,
            driver_version: (driver / 1000, (driver % 1000) / 10),
            total_memory: total,
            free_memory: free,
        }
    }

    /// The compute capability, (major, minor).
    pub fn compute_capability(&self) -> (i32, i32) {
        self.cc
    }

    /// Whether bf16 storage works here: bf16 GEMMs (cuBLASLt) and `mma.sync` with bf16 operands
    /// need sm_80 or newer.
    pub fn supports_bf16(&self) -> bool {
        self.cc.0 >= 8
    }

    /// The kernel `name` and its static shared memory (bytes): its file's module loaded if it is
    /// not yet, the function looked up once and then cached.
    fn function(&self, name: &str) -> Result<(sys::CUfunction, usize), GpuError> {
        let mut functions = self
            .kernels
            .functions
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(&found) = functions.get(name) {
            return Ok(found);
        }
        let launch_err = |message: String| GpuError::Launch {
            kernel: name.to_string(),
            message,
        };
        let file = self
            .kernels
            .files
            .get(name)
            .ok_or_else(|| launch_err("no such kernel in kernels/*.cu".into()))?;
        let module = self.module(file).map_err(launch_err)?.0;
        let cname = CString::new(name).map_err(|_| launch_err("name contains NUL".into()))?;
        // SAFETY: the module is loaded and unloaded only on drop.
        let f = unsafe { drv::module::get_function(module, cname) }
            .map_err(|e| driver_err(&format!("cuModuleGetFunction({name}) in {file}"), e))?;
        let mut static_smem = 0;
        // SAFETY: `f` was just looked up; a valid out-pointer.
        unsafe {
            sys::cuFuncGetAttribute(
                &mut static_smem,
                sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES,
                f,
            )
        }
        .result()
        .map_err(|e| driver_err(&format!("cuFuncGetAttribute({name})"), e))?;
        let found = (f, usize::try_from(static_smem).unwrap_or(0));
        functions.insert(name.to_string(), found);
        Ok(found)
    }

    /// The module of kernel file `file` and where it came from, loaded at the first call (a
    /// failure is remembered: later calls return the same error).
    fn module(&self, file: &str) -> Loaded {
        let mut modules = self
            .kernels
            .modules
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(loaded) = modules.get(file) {
            return loaded.clone();
        }
        let loaded = self
            .ctx
            .bind()
            .map_err(|e| e.to_string())
            .and_then(|()| load_module(file, self.cc));
        modules.insert(file.to_string(), loaded.clone());
        loaded
    }

    /// Loads every kernel file's module (`fastpt doctor` does, to report them): `(file, where it
    /// came from or why it failed)`, sorted by file.
    pub fn load_all_modules(&self) -> Vec<(String, Result<String, String>)> {
        nvrtc::kernel_files()
            .into_iter()
            .map(|file| (file.to_string(), self.module(file).map(|(_, from)| from)))
            .collect()
    }

    /// `c = beta · c` for a GEMM with `k = 0` (cuBLASLt wants `k > 0`): only beta 0 or 1.
    fn gemm_empty_k(&self, dtype: DType, c: u64, g: &GemmDesc) -> Result<(), GpuError> {
        if g.beta == 1.0 {
            return Ok(());
        }
        if g.beta != 0.0 {
            return Err(GpuError::Driver(format!(
                "cuda gemm with k = 0 and beta = {} is not supported",
                g.beta
            )));
        }
        let size = dtype.size();
        for i in 0..g.batch {
            let dst = c + (i * g.stride_c * size) as u64;
            // SAFETY: GpuBackend passes a buffer holding every element the strides reach.
            unsafe {
                let pitch = g.ldc.max(g.n) * size;
                sys::cuMemsetD2D8Async(dst, pitch, 0, g.n * size, g.m, self.ctx.stream)
            }
            .result()
            .map_err(|e| driver_err("cuMemsetD2D8Async", e))?;
        }
        Ok(())
    }
}

impl Drop for CudaDevice {
    fn drop(&mut self) {
        let _ = self.ctx.sync();
        self.plans
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        // SAFETY: created in `new`, destroyed once; no work is queued any more.
        unsafe {
            let _ = blas::destroy_handle(self.blas);
            let modules = self
                .kernels
                .modules
                .get_mut()
                .unwrap_or_else(|p| p.into_inner());
            for (m, _) in modules.values().flatten() {
                let _ = drv::module::unload(*m);
            }
        }
    }
}

/// Loads kernel file `file` for a GPU of compute capability `cc` into the current context: the
/// first embedded image that loads ([`images::candidates`]), else PTX from NVRTC at run time (or
/// its cache). Returns the module and where it came from; the error lists every attempt.
fn load_module(file: &str, cc: (i32, i32)) -> Loaded {
    let arch = format!("sm_{}{}", cc.0, cc.1);
    let mut tried = Vec::new();
    for image in images::candidates(file, cc) {
        let kind = if image.is_cubin() { "CUBIN" } else { "PTX" };
        match load_image(image.bytes, !image.is_cubin()) {
            Ok(module) => {
                let jit = if image.is_cubin() {
                    ""
                } else {
                    ", compiled by the driver"
                };
                return Ok((module, format!("embedded {kind} {}{jit}", image.arch)));
            }
            Err(e) => tried.push(format!("embedded {kind} {}: {e}", image.arch)),
        }
    }
    if tried.is_empty() {
        tried.push(format!(
            "no embedded image for {arch} ({})",
            if images::embedded().is_empty() {
                "this binary was built without NVRTC"
            } else {
                "CUBIN for sm_80/86/89/90, PTX for sm_80 and newer"
            }
        ));
    }
    let toolkit = nvrtc::toolkit().ok();
    match nvrtc::cached_ptx(toolkit, file, &arch) {
        Ok(ptx) => match load_image(ptx.as_bytes(), true) {
            Ok(module) => {
                let from = match (toolkit, nvrtc::nvrtc_version()) {
                    (Some(_), Ok((major, minor))) => {
                        format!("NVRTC {major}.{minor} at run time for {arch}")
                    }
                    _ => format!("cached PTX for {arch}"),
                };
                return Ok((module, from));
            }
            Err(e) => tried.push(format!("PTX from NVRTC for {arch}: {e}")),
        },
        Err(e) => tried.push(format!("NVRTC for {arch}: {e}")),
    }
    Err(format!("cannot load {file}:\n  {}", tried.join("\n  ")))
}

/// One module from an image (CUBIN, or PTX text which gets its terminating NUL here), with the
/// driver's JIT error log in the error.
fn load_image(bytes: &[u8], is_text: bool) -> Result<sys::CUmodule, String> {
    // A private copy: aligned as the heap aligns, and NUL-terminated for PTX.
    let mut image = bytes.to_vec();
    if is_text {
        image.push(0);
    }
    const LOG: usize = 16 << 10;
    let mut error_log = vec![0u8; LOG];
    let mut options = [
        sys::CUjit_option::CU_JIT_ERROR_LOG_BUFFER,
        sys::CUjit_option::CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES,
    ];
    // The size option's value is the number itself, in the pointer's place (cuda.h).
    let mut values = [error_log.as_mut_ptr() as *mut c_void, LOG as *mut c_void];
    let mut module = std::ptr::null_mut();
    // SAFETY: `image` is a whole CUBIN or NUL-terminated PTX; the option arrays have two entries
    // each; the log buffer holds LOG bytes and outlives the call.
    let rc = unsafe {
        sys::cuModuleLoadDataEx(
            &mut module,
            image.as_ptr() as *const c_void,
            options.len() as u32,
            options.as_mut_ptr(),
            values.as_mut_ptr(),
        )
    };
    if rc == sys::CUresult::CUDA_SUCCESS {
        return Ok(module);
    }
    let log = String::from_utf8_lossy(&error_log)
        .trim_end_matches('\0')
        .trim()
        .to_string();
    let what = match rc {
        sys::CUresult::CUDA_ERROR_UNSUPPORTED_PTX_VERSION => format!(
            "{} (the PTX is newer than this driver accepts: update the driver)",
            driver_err("cuModuleLoadDataEx", DriverError(rc))
        ),
        _ => driver_err("cuModuleLoadDataEx", DriverError(rc)).to_string(),
    };
    Err(if log.is_empty() {
        what
    } else {
        format!("{what}; JIT log: {log}")
    })
}

/// A cuBLASLt handle; loads `libcublasLt.so*` from the toolkit's lib folder first when it is
/// there (cudarc then finds it by soname, as for NVRTC).
fn create_blas(
    toolkit: Option<&nvrtc::CudaToolkit>,
) -> Result<blas_sys::cublasLtHandle_t, GpuError> {
    if let Some(lib) = toolkit.and_then(|t| nvrtc::find_lib(t.lib_dir(), "libcublasLt.so")) {
        nvrtc::preload(&lib)?;
    }
    // SAFETY: only tries to open libcublasLt by name.
    if !std::panic::catch_unwind(|| unsafe { blas_sys::is_culib_present() }).unwrap_or(false) {
        return Err(GpuError::Driver(
            "no cuBLASLt (libcublasLt.so.13) found: install the CUDA toolkit's cuBLAS, or the \
             pip wheel nvidia-cublas into .venv-nvrtc"
                .into(),
        ));
    }
    blas::create_handle().map_err(|e| blas_err("create", e))
}

/// What a cuBLASLt plan depends on: the GEMM's shape and strides, the dtype, and the alignment of
/// the pointers (an algorithm picked for 256-byte aligned operands may not run on others).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct PlanKey {
    dtype: DType,
    m: usize,
    n: usize,
    k: usize,
    trans_a: bool,
    trans_b: bool,
    lda: usize,
    ldb: usize,
    ldc: usize,
    batch: usize,
    stride_a: usize,
    stride_b: usize,
    stride_c: usize,
    align: [u32; 3],
}

impl PlanKey {
    fn new(dtype: DType, g: &GemmDesc, a: u64, b: u64, c: u64) -> Self {
        let size = dtype.size();
        let align = |ptr: u64, stride: usize| {
            let bits = if g.batch > 1 {
                ptr | (stride * size) as u64
            } else {
                ptr
            };
            if bits == 0 {
                256
            } else {
                (1u64 << bits.trailing_zeros()).min(256) as u32
            }
        };
        PlanKey {
            dtype,
            m: g.m,
            n: g.n,
            k: g.k,
            trans_a: g.trans_a,
            trans_b: g.trans_b,
            lda: g.lda,
            ldb: g.ldb,
            ldc: g.ldc,
            batch: g.batch,
            stride_a: g.stride_a,
            stride_b: g.stride_b,
            stride_c: g.stride_c,
            align: [
                align(a, g.stride_a),
                align(b, g.stride_b),
                align(c, g.stride_c),
            ],
        }
    }
}

/// A cuBLASLt matrix layout, destroyed on drop.
struct Layout(blas_sys::cublasLtMatrixLayout_t);

impl Layout {
    /// A column-major `rows × cols` matrix with leading dimension `ld`, `batch` of them `stride`
    /// elements apart.
    fn new(
        dtype: blas_sys::cudaDataType,
        rows: usize,
        cols: usize,
        ld: usize,
        batch: usize,
        stride: usize,
    ) -> Result<Layout, GpuError> {
        // A single column's leading dimension is never used; cuBLASLt still wants ld >= rows.
        let ld = if cols <= 1 { ld.max(rows) } else { ld }.max(1);
        let layout = Layout(
            blas::create_matrix_layout(dtype, rows as u64, cols as u64, ld as i64)
                .map_err(|e| blas_err("matrix layout", e))?,
        );
        if batch > 1 {
            // Infallible from input: a batch count is at most a buffer's length, which the
            // memory check keeps below i32::MAX elements on a GPU.
            let count = i32::try_from(batch).expect("batch fits in i32");
            let offset = stride as i64;
            use blas_sys::cublasLtMatrixLayoutAttribute_t::*;
            // SAFETY: each attribute gets a pointer to a value of its type (int32, int64).
            unsafe {
                blas::set_matrix_layout_attribute(
                    layout.0,
                    CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
                    &count as *const i32 as *const c_void,
                    size_of::<i32>(),
                )
                .and_then(|()| {
                    blas::set_matrix_layout_attribute(
                        layout.0,
                        CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                        &offset as *const i64 as *const c_void,
                        size_of::<i64>(),
                    )
                })
                .map_err(|e| blas_err("batch layout", e))?;
            }
        }
        Ok(layout)
    }
}

impl Drop for Layout {
    fn drop(&mut self) {
        // SAFETY: created by create_matrix_layout, destroyed once.
        let _ = unsafe { blas::destroy_matrix_layout(self.0) };
    }
}

/// A matmul description with its layouts and the algorithm cuBLASLt's heuristic chose.
struct GemmPlan {
    desc: blas_sys::cublasLtMatmulDesc_t,
    /// cuBLASLt's A, B, C (= D); see [`GemmPlan::new`] for which of ours they are.
    layouts: [Layout; 3],
    algo: blas_sys::cublasLtMatmulAlgo_t,
}

impl Drop for GemmPlan {
    fn drop(&mut self) {
        // SAFETY: created by create_matmul_desc, destroyed once.
        let _ = unsafe { blas::destroy_matmul_desc(self.desc) };
    }
}

impl GemmPlan {
    /// Row-major `C = op(A)·op(B)` is column-major `Cᵀ = op(B)ᵀ·op(A)ᵀ`: a row-major matrix is its
    /// transpose in column-major, so cuBLASLt's A is our `b`, its B our `a`, and its `m × n` is
    /// our `n × m`. bf16 operands with f32 compute and scale; f32 all through with
    /// `CUBLAS_COMPUTE_32F` (no TF32).
    fn new(handle: blas_sys::cublasLtHandle_t, key: &PlanKey) -> Result<GemmPlan, GpuError> {
        use blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F;
        use blas_sys::cudaDataType_t::{CUDA_R_16BF, CUDA_R_32F};
        let elem = match key.dtype {
            DType::F32 => CUDA_R_32F,
            DType::Bf16 => CUDA_R_16BF,
        };
        let (m, n, k) = (key.m, key.n, key.k);
        // Our b, stored (K, N) row-major = (N, K) column-major; transposed: stored (N, K).
        let (a_rows, a_cols) = if key.trans_b { (k, n) } else { (n, k) };
        // Our a, stored (M, K) row-major = (K, M) column-major; transposed: stored (K, M).
        let (b_rows, b_cols) = if key.trans_a { (m, k) } else { (k, m) };
        let layouts = [
            Layout::new(elem, a_rows, a_cols, key.ldb, key.batch, key.stride_b)?,
            Layout::new(elem, b_rows, b_cols, key.lda, key.batch, key.stride_a)?,
            Layout::new(elem, n, m, key.ldc, key.batch, key.stride_c)?,
        ];
        let desc = blas::create_matmul_desc(CUBLAS_COMPUTE_32F, CUDA_R_32F)
            .map_err(|e| blas_err("matmul desc", e))?;
        let mut plan = GemmPlan {
            desc,
            layouts,
            algo: blas_sys::cublasLtMatmulAlgo_t { data: [0; 8] },
        };
        use blas_sys::cublasLtMatmulDescAttributes_t::*;
        // cublasOperation_t: 0 = N, 1 = T.
        let (op_a, op_b) = (i32::from(key.trans_b), i32::from(key.trans_a));
        // SAFETY: both attributes take a cublasOperation_t (int32).
        unsafe {
            blas::set_matmul_desc_attribute(
                desc,
                CUBLASLT_MATMUL_DESC_TRANSA,
                &op_a as *const i32 as *const c_void,
                size_of::<i32>(),
            )
            .and_then(|()| {
                blas::set_matmul_desc_attribute(
                    desc,
                    CUBLASLT_MATMUL_DESC_TRANSB,
                    &op_b as *const i32 as *const c_void,
                    size_of::<i32>(),
                )
            })
            .map_err(|e| blas_err("transpose", e))?;
        }

        let pref = blas::create_matmul_pref().map_err(|e| blas_err("preference", e))?;
        let workspace = WORKSPACE_BYTES as u64;
        // cuBLASLt's A is our b, its B our a.
        let [align_a, align_b, align_c] = key.align;
        use blas_sys::cublasLtMatmulPreferenceAttributes_t::*;
        let u32_attrs = [
            (CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, align_b),
            (CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, align_a),
            (CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, align_c),
            (CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, align_c),
        ];
        // SAFETY: the workspace size is a uint64, the alignments uint32; `pref` is destroyed once,
        // after the heuristic that reads it.
        let heuristic = unsafe {
            let mut r = blas::set_matmul_pref_attribute(
                pref,
                CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &workspace as *const u64 as *const c_void,
                size_of::<u64>(),
            );
            for (attr, value) in &u32_attrs {
                r = r.and_then(|()| {
                    blas::set_matmul_pref_attribute(
                        pref,
                        *attr,
                        value as *const u32 as *const c_void,
                        size_of::<u32>(),
                    )
                });
            }
            let h = r.and_then(|()| {
                blas::get_matmul_algo_heuristic(
                    handle,
                    desc,
                    plan.layouts[0].0,
                    plan.layouts[1].0,
                    plan.layouts[2].0,
                    plan.layouts[2].0,
                    pref,
                )
            });
            let _ = blas::destroy_matmul_pref(pref);
            h
        }
        .map_err(|e| blas_err(&format!("no algorithm for {key:?}"), e))?;
        plan.algo = heuristic.algo;
        Ok(plan)
    }
}

impl CudaDevice {
    /// Makes this device's context current on the calling thread and returns our stream (for
    /// NCCL, which enqueues on it).
    pub(crate) fn bound_stream(&self) -> Result<sys::CUstream, GpuError> {
        self.ctx.bind()?;
        Ok(self.ctx.stream)
    }

    /// The device's index in the driver's list.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }
}

impl Device for CudaDevice {
    type Buffer = CudaBuffer;
    type Event = CudaEvent;

    fn name(&self) -> String {
        format!(
            "cuda:{} {} (sm_{}{})",
            self.ordinal, self.name, self.cc.0, self.cc.1
        )
    }

    fn describe(&self) -> Vec<String> {
        let i = self.info();
        let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
        vec![
            format!(
                "compute capability {}.{}, driver for CUDA {}.{}",
                i.compute_capability.0,
                i.compute_capability.1,
                i.driver_version.0,
                i.driver_version.1
            ),
            format!(
                "memory {:.1} GiB total, {:.1} GiB free",
                gib(i.total_memory),
                gib(i.free_memory)
            ),
            format!(
                "kernels: {}",
                match images::nvrtc_used() {
                    Some(nvrtc) => format!(
                        "{} images embedded (by {nvrtc}); modules load at first use",
                        images::embedded().len()
                    ),
                    None => "none embedded: NVRTC compiles them at run time".into(),
                }
            ),
        ]
    }

    fn kernel_modules(&self) -> Vec<(String, Result<String, String>)> {
        self.load_all_modules()
    }

    fn unavailable(&self) -> Vec<String> {
        if self.supports_bf16() {
            return Vec::new();
        }
        let arch = format!("sm_{}{}", self.cc.0, self.cc.1);
        vec![
            format!("bf16 storage: cuBLASLt's bf16 GEMMs need sm_80 or newer (this GPU is {arch})"),
            format!(
                "tensor-core attention (--attention flash-tc): bf16 mma.sync needs sm_80 or newer \
                 (this GPU is {arch})"
            ),
        ]
    }

    fn alloc(&self, bytes: usize) -> Result<CudaBuffer, GpuError> {
        alloc_on(&self.ctx, bytes)
    }

    fn ptr(&self, buf: &CudaBuffer) -> u64 {
        buf.ptr
    }

    fn upload(&self, dst: &mut CudaBuffer, src: &[u8]) -> Result<(), GpuError> {
        dst.check("upload", src.len())?;
        if src.is_empty() {
            return Ok(());
        }
        self.ctx.bind()?;
        // SAFETY: dst holds src.len() bytes; the stream is synchronised before `src` is released.
        unsafe { drv::memcpy_htod_async(dst.ptr, src, self.ctx.stream) }
            .map_err(|e| driver_err("cuMemcpyHtoDAsync", e))?;
        self.ctx.sync()
    }

    fn download(&self, src: &CudaBuffer, dst: &mut [u8]) -> Result<(), GpuError> {
        src.check("download", dst.len())?;
        if dst.is_empty() {
            return Ok(());
        }
        self.ctx.bind()?;
        // SAFETY: src holds dst.len() bytes; the stream is synchronised before `dst` is released.
        unsafe { drv::memcpy_dtoh_async(dst, src.ptr, self.ctx.stream) }
            .map_err(|e| driver_err("cuMemcpyDtoHAsync", e))?;
        self.ctx.sync()
    }

    fn copy(&self, dst: &mut CudaBuffer, src: &CudaBuffer, bytes: usize) -> Result<(), GpuError> {
        dst.check("copy", bytes)?;
        src.check("copy", bytes)?;
        if bytes == 0 {
            return Ok(());
        }
        self.ctx.bind()?;
        // SAFETY: both hold `bytes` bytes and are distinct buffers.
        unsafe { drv::memcpy_dtod_async(dst.ptr, src.ptr, bytes, self.ctx.stream) }
            .map_err(|e| driver_err("cuMemcpyDtoDAsync", e))
    }

    fn memset_zero(&self, buf: &mut CudaBuffer, bytes: usize) -> Result<(), GpuError> {
        buf.check("memset", bytes)?;
        if bytes == 0 {
            return Ok(());
        }
        self.ctx.bind()?;
        // SAFETY: buf holds `bytes` bytes.
        unsafe { drv::memset_d8_async(buf.ptr, 0, bytes, self.ctx.stream) }
            .map_err(|e| driver_err("cuMemsetD8Async", e))
    }

    fn launch(&self, name: &str, cfg: LaunchCfg, args: &[Arg]) -> Result<(), GpuError> {
        if cfg.grid.contains(&0) {
            return Ok(());
        }
        self.ctx.bind()?;
        let (f, static_smem) = self.function(name)?;
        let launch_err = |what: &str, e: DriverError| GpuError::Launch {
            kernel: name.to_string(),
            message: driver_err(what, e).to_string(),
        };
        // Above 48 KiB of static + dynamic shared memory a kernel must opt in (the default dynamic
        // maximum is 48 KiB minus its static shared memory).
        if cfg.smem > 0 && static_smem + cfg.smem as usize > 48 << 10 {
            // SAFETY: `f` is a live function of our modules.
            unsafe {
                drv::function::set_function_attribute(
                    f,
                    sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    cfg.smem as i32,
                )
            }
            .map_err(|e| launch_err("cuFuncSetAttribute", e))?;
        }
        let mut args = args.to_vec();
        let mut params: Vec<*mut c_void> = args.iter_mut().map(Arg::as_param).collect();
        let [gx, gy, gz] = cfg.grid;
        let [bx, by, bz] = cfg.block;
        // SAFETY: every pointer argument addresses a live buffer of the size the kernel's contract
        // asks for (GpuBackend checks lengths before launching); cuLaunchKernel copies the
        // argument values before it returns.
        unsafe {
            drv::launch_kernel(
                f,
                (gx, gy, gz),
                (bx, by, bz),
                cfg.smem,
                self.ctx.stream,
                &mut params,
            )
        }
        .map_err(|e| launch_err("cuLaunchKernel", e))
    }

    fn gemm(&self, dtype: DType, c: u64, a: u64, b: u64, g: &GemmDesc) -> Result<(), GpuError> {
        if g.m == 0 || g.n == 0 || g.batch == 0 {
            return Ok(());
        }
        self.ctx.bind()?;
        if g.k == 0 {
            return self.gemm_empty_k(dtype, c, g);
        }
        let key = PlanKey::new(dtype, g, a, b, c);
        let mut plans = self.plans.lock().unwrap_or_else(|p| p.into_inner());
        let plan = match plans.entry(key) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => e.insert(GemmPlan::new(self.blas, &key)?),
        };
        let (alpha, beta) = (g.alpha, g.beta);
        // SAFETY: GpuBackend passes addresses of buffers holding every element the strides reach;
        // the plan was made for this shape, dtype and alignment; alpha and beta are host f32 (the
        // scale type), read before cublasLtMatmul returns.
        unsafe {
            blas::matmul(
                self.blas,
                plan.desc,
                &alpha as *const f32 as *const c_void,
                &beta as *const f32 as *const c_void,
                b as *const c_void,
                plan.layouts[0].0,
                a as *const c_void,
                plan.layouts[1].0,
                c as *const c_void,
                plan.layouts[2].0,
                c as *mut c_void,
                plan.layouts[2].0,
                &plan.algo,
                self.workspace.ptr as *mut c_void,
                WORKSPACE_BYTES,
                self.ctx.stream as blas_sys::cudaStream_t,
            )
        }
        .map_err(|e| blas_err(&format!("matmul {g:?}"), e))
    }

    fn synchronize(&self) -> Result<(), GpuError> {
        self.ctx.sync()
    }

    fn record_event(&self) -> Result<CudaEvent, GpuError> {
        self.ctx.bind()?;
        let event = drv::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT)
            .map_err(|e| driver_err("cuEventCreate", e))?;
        let event = CudaEvent {
            event,
            ctx: Arc::clone(&self.ctx),
        };
        // SAFETY: a live event of this context, recorded on our stream.
        unsafe { drv::event::record(event.event, self.ctx.stream) }
            .map_err(|e| driver_err("cuEventRecord", e))?;
        Ok(event)
    }

    fn elapsed_ms(&self, start: &CudaEvent, end: &CudaEvent) -> Result<f64, GpuError> {
        self.ctx.bind()?;
        // SAFETY: both events were created and recorded on our stream and are alive.
        unsafe {
            drv::event::synchronize(end.event).map_err(|e| driver_err("cuEventSynchronize", e))?;
            drv::event::elapsed(start.event, end.event)
                .map(f64::from)
                .map_err(|e| driver_err("cuEventElapsedTime", e))
        }
    }

    fn free_bytes(&self) -> Option<u64> {
        let (free, _) = self
            .ctx
            .bind()
            .ok()
            .and_then(|()| drv::mem_get_info().ok())?;
        u64::try_from(free).ok()
    }

    fn memory(&self) -> &MemoryCounter {
        &self.ctx.memory
    }
}

/// A recorded CUDA event, destroyed on drop.
pub struct CudaEvent {
    event: sys::CUevent,
    ctx: Arc<Context>,
}

impl Drop for CudaEvent {
    fn drop(&mut self) {
        let _ = self.ctx.bind();
        // SAFETY: created in record_event, destroyed once.
        unsafe {
            let _ = drv::event::destroy(self.event);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_gpu_is_an_error_not_a_panic() {
        // On a machine without a GPU (CI) this checks the error path; with one, that it opens.
        match CudaDevice::new(0) {
            Ok(dev) => assert!(cuda_available() && dev.name().starts_with("cuda:0")),
            Err(e) => {
                assert!(!e.to_string().is_empty());
                assert!(CudaDevice::new(usize::MAX).is_err());
            }
        }
    }

    #[test]
    fn plan_key_alignment() {
        let g = GemmDesc::dense(4, 4, 4, false, false);
        let key = PlanKey::new(DType::Bf16, &g, 0x1000, 0x1002, 0x1010);
        assert_eq!(key.align, [256, 2, 16]);
        let g = GemmDesc {
            batch: 2,
            stride_a: 3,
            ..g
        };
        assert_eq!(PlanKey::new(DType::F32, &g, 0x1000, 0, 0).align[0], 4);
    }
}
