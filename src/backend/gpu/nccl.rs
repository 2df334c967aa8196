//! NCCL on our CUDA devices: the all-reduce of GPU buffers without staging them through the
//! host. libnccl is opened at run time (cudarc's dynamic loading): a build needs no NCCL, and a
//! machine without it gets an error, never a panic.
//!
//! - [`NcclComm::init`]: one GPU per rank of a data-parallel run. Rank 0 creates NCCL's unique
//!   id, the ranks' [`Collective`] (MPI) broadcasts it, each rank joins with its own device.
//! - [`check_all_reduce_on_every_gpu`]: `fastpt doctor`'s check: one process, every visible
//!   GPU in one communicator (`ncclCommInitAll`), a sum whose result each GPU checks. On one GPU
//!   the all-reduce is the identity.

use cudarc::nccl::{result as nccl, sys as nccl_sys};

use super::cuda::{CudaBuffer, CudaDevice};
use super::device::{Device, GpuError};
use crate::backend::collective::Collective;

/// True when libnccl can be opened. Never panics.
pub fn nccl_available() -> bool {
    // SAFETY: only tries to open the library by name.
    std::panic::catch_unwind(|| unsafe { nccl_sys::is_culib_present() }).unwrap_or(false)
}

fn nccl_err(what: &str, e: nccl::NcclError) -> GpuError {
    GpuError::Driver(format!("NCCL {what}: {:?}", e.0))
}

fn need_nccl() -> Result<(), GpuError> {
    match nccl_available() {
        true => Ok(()),
        false => Err(GpuError::Driver(
            "no NCCL library (libnccl.so.2) found: install NCCL (apt-get install libnccl2, or \
             pip install nvidia-nccl-cu13 and add its lib folder to LD_LIBRARY_PATH)"
                .into(),
        )),
    }
}

/// NCCL's version as `major.minor.patch`.
pub fn nccl_version() -> Result<String, GpuError> {
    need_nccl()?;
    let v = nccl::get_nccl_version().map_err(|e| nccl_err("ncclGetVersion", e))?;
    // NCCL ≥ 2.9 encodes major·10000 + minor·100 + patch.
    Ok(format!("{}.{}.{}", v / 10000, (v / 100) % 100, v % 100))
}

/// One rank's member of an NCCL communicator, bound to one device.
pub struct NcclComm {
    comm: nccl_sys::ncclComm_t,
    rank: usize,
    size: usize,
}

// SAFETY: an NCCL communicator may be used from any thread, one call at a time (&mut or the
// device's stream serialises them).
unsafe impl Send for NcclComm {}

impl NcclComm {
    /// Joins the communicator of `ranks`, on `dev` (a collective call: every rank calls it).
    pub fn init(dev: &CudaDevice, ranks: &dyn Collective) -> Result<Self, GpuError> {
        need_nccl()?;
        // The id travels as its 128 bytes; rank 0's is the one every rank uses.
        let mut id_bytes = match ranks.rank() {
            0 => {
                let id = nccl::get_uniqueid().map_err(|e| nccl_err("ncclGetUniqueId", e))?;
                id.internal.iter().map(|&c| c as u8).collect()
            }
            _ => Vec::new(),
        };
        ranks
            .broadcast(&mut id_bytes, 0)
            .map_err(|e| GpuError::Driver(format!("broadcasting the NCCL id: {e}")))?;
        let mut internal = [0 as std::ffi::c_char; 128];
        if id_bytes.len() != internal.len() {
            return Err(GpuError::Driver(format!(
                "the NCCL id from rank 0 has {} bytes, not 128",
                id_bytes.len()
            )));
        }
        for (d, s) in internal.iter_mut().zip(&id_bytes) {
            *d = *s as std::ffi::c_char;
        }
        let id = nccl_sys::ncclUniqueId { internal };
        dev.bound_stream()?;
        let mut comm = std::ptr::null_mut();
        let (n, r) = (ranks.size() as i32, ranks.rank() as i32);
        // SAFETY: `comm` is written by NCCL; the device's context is current on this thread.
        unsafe { nccl::comm_init_rank(&mut comm, n, id, r) }
            .map_err(|e| nccl_err("ncclCommInitRank", e))?;
        Ok(NcclComm {
            comm,
            rank: ranks.rank(),
            size: ranks.size(),
        })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// `buf`'s first `n` f32 become their sum over the ranks, in place, on `dev`'s stream; returns
    /// when it is done.
    pub fn all_reduce_sum_f32(
        &self,
        dev: &CudaDevice,
        buf: &mut CudaBuffer,
        n: usize,
    ) -> Result<(), GpuError> {
        if buf.len() < n * 4 {
            return Err(GpuError::Driver(format!(
                "all-reduce of {n} f32 in a buffer of {} bytes",
                buf.len()
            )));
        }
        enqueue_sum_f32(self.comm, dev, buf, n)?;
        dev.synchronize()
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        // SAFETY: created by ncclCommInitRank / InitAll and destroyed once, here.
        let _ = unsafe { nccl::comm_destroy(self.comm) };
    }
}

/// Enqueues the in-place all-reduce (sum) of `buf`'s first `n` f32 on `dev`'s stream; `buf` must
/// hold at least `n` f32 (both callers check or allocate it so).
fn enqueue_sum_f32(
    comm: nccl_sys::ncclComm_t,
    dev: &CudaDevice,
    buf: &CudaBuffer,
    n: usize,
) -> Result<(), GpuError> {
    let stream = dev.bound_stream()?;
    let ptr = dev.ptr(buf) as *mut std::ffi::c_void;
    // SAFETY: `ptr` holds n f32 on this device; in place is allowed.
    unsafe {
        nccl::all_reduce(
            ptr,
            ptr,
            n,
            nccl_sys::ncclDataType_t::ncclFloat32,
            nccl_sys::ncclRedOp_t::ncclSum,
            comm,
            stream as _,
        )
    }
    .map_err(|e| nccl_err("ncclAllReduce", e))?;
    Ok(())
}

/// What [`check_all_reduce_on_every_gpu`] found on one GPU.
#[derive(Debug, Clone)]
pub struct AllReduceCheck {
    pub device: String,
    /// ‖got − want‖ / ‖want‖ over the buffer (0 when every value is exact).
    pub rel_err: f64,
    pub passed: bool,
}

/// The all-reduce on every GPU the driver sees, in one process: GPU g holds `x_g[i] = (g + 1) ·
/// (1 + i mod 7)`, every GPU must get `Σ_g x_g[i]` (exact in f32 at these sizes). `n` values per
/// GPU. One GPU: the identity.
pub fn check_all_reduce_on_every_gpu(n: usize) -> Result<Vec<AllReduceCheck>, GpuError> {
    need_nccl()?;
    let count = super::cuda::device_count();
    if count == 0 {
        return Err(GpuError::Driver("no CUDA device".into()));
    }
    let devs: Vec<CudaDevice> = (0..count).map(CudaDevice::new).collect::<Result<_, _>>()?;
    let value = |g: usize, i: usize| ((g + 1) * (1 + i % 7)) as f32;
    let mut bufs = Vec::with_capacity(count);
    for (g, dev) in devs.iter().enumerate() {
        let host: Vec<f32> = (0..n).map(|i| value(g, i)).collect();
        let mut buf = dev.alloc(n * 4)?;
        dev.upload(&mut buf, bytemuck::cast_slice(&host))?;
        bufs.push(buf);
    }
    let list: Vec<i32> = (0..count as i32).collect();
    let mut comms: Vec<nccl_sys::ncclComm_t> = vec![std::ptr::null_mut(); count];
    // SAFETY: `comms` has room for `count` communicators, `list` names `count` devices.
    unsafe { nccl::comm_init_all(comms.as_mut_ptr(), count as i32, list.as_ptr()) }
        .map_err(|e| nccl_err("ncclCommInitAll", e))?;
    // One group: NCCL must see every device's call before any can complete.
    let reduced = (|| {
        nccl::group_start().map_err(|e| nccl_err("ncclGroupStart", e))?;
        for ((dev, buf), &comm) in devs.iter().zip(&bufs).zip(&comms) {
            enqueue_sum_f32(comm, dev, buf, n)?;
        }
        nccl::group_end().map_err(|e| nccl_err("ncclGroupEnd", e))?;
        Ok::<(), GpuError>(())
    })();
    let mut out = Vec::with_capacity(count);
    if reduced.is_ok() {
        for (dev, buf) in devs.iter().zip(&bufs) {
            dev.synchronize()?;
            let mut got = vec![0f32; n];
            dev.download(buf, bytemuck::cast_slice_mut(&mut got))?;
            let (mut num, mut den) = (0.0f64, 0.0f64);
            for (i, &x) in got.iter().enumerate() {
                let want: f64 = (0..count).map(|g| value(g, i) as f64).sum();
                num += (x as f64 - want).powi(2);
                den += want * want;
            }
            let rel_err = (num / den.max(1e-300)).sqrt();
            out.push(AllReduceCheck {
                device: dev.name(),
                rel_err,
                passed: rel_err == 0.0,
            });
        }
    }
    for comm in comms {
        // SAFETY: each communicator was created above and is destroyed once.
        let _ = unsafe { nccl::comm_destroy(comm) };
    }
    reduced.map(|()| out)
}
