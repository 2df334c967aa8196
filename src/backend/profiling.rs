//! Profiling ranges: NVTX ranges that name the phases of a step in Nsight Systems / Compute
//! timelines. Model and engine code open them on every backend (they cost nothing without NVTX).

use std::sync::OnceLock;

/// An NVTX range (for Nsight Systems), popped on drop. A no-op when `libnvToolsExt` is absent:
/// cudarc's NVTX binding loads that library, which CUDA 13 no longer ships (NVTX 3 is
/// header-only), so on most CUDA 13 machines these ranges are not recorded.
pub struct NvtxRange {
    active: bool,
}

/// Pushes an NVTX range named `name`; it ends when the guard drops.
pub fn nvtx_range(name: &str) -> NvtxRange {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    let active = *PRESENT.get_or_init(|| {
        // SAFETY: only tries to open libnvToolsExt by name.
        std::panic::catch_unwind(|| unsafe { cudarc::nvtx::sys::is_culib_present() })
            .unwrap_or(false)
    });
    if active {
        cudarc::nvtx::result::range_push(name.replace('\0', " "));
    }
    NvtxRange { active }
}

impl Drop for NvtxRange {
    fn drop(&mut self) {
        if self.active {
            cudarc::nvtx::result::range_pop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nvtx_range_without_nvtx_is_a_no_op() {
        // Nested ranges push and pop in order, whether or not libnvToolsExt is present.
        let outer = nvtx_range("outer");
        let inner = nvtx_range("inner\0with a NUL");
        drop(inner);
        drop(outer);
    }
}
