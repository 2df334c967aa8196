//! Peak heap bytes of the process, counted by a global allocator the `fastpt` binary installs:
//! on the CPU backend every tensor is a heap allocation, so this separates the settings of one
//! bench run, which the process's peak RSS (never reset, and kept high by the allocator's
//! free lists) cannot. Libraries and tests that do not install [`PeakAlloc`] fall back to RSS.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// The system allocator plus two counters (bytes live now, and the most since the last reset).
/// Install with `#[global_allocator] static ALLOC: PeakAlloc = PeakAlloc;`.
pub struct PeakAlloc;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
/// Set by the first allocation through [`PeakAlloc`]: the counters mean something.
static INSTALLED: AtomicBool = AtomicBool::new(false);

fn grow(bytes: usize) {
    let now = CURRENT.fetch_add(bytes, Ordering::Relaxed) + bytes;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

fn shrink(bytes: usize) {
    CURRENT.fetch_sub(bytes, Ordering::Relaxed);
}

// SAFETY: every call is forwarded unchanged to the system allocator; the counters only observe.
unsafe impl GlobalAlloc for PeakAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            INSTALLED.store(true, Ordering::Relaxed);
            grow(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            INSTALLED.store(true, Ordering::Relaxed);
            grow(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        shrink(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            // Count the new block before releasing the old one: a copying realloc holds both.
            grow(new_size);
            shrink(layout.size());
        }
        p
    }
}

/// The most heap bytes live at once since [`reset_heap_peak`]; None when [`PeakAlloc`] is not
/// the global allocator of this process.
pub fn heap_peak_bytes() -> Option<u64> {
    INSTALLED
        .load(Ordering::Relaxed)
        .then(|| PEAK.load(Ordering::Relaxed) as u64)
}

/// The heap bytes live now; None when [`PeakAlloc`] is not the global allocator.
pub fn heap_current_bytes() -> Option<u64> {
    INSTALLED
        .load(Ordering::Relaxed)
        .then(|| CURRENT.load(Ordering::Relaxed) as u64)
}

/// Starts a new peak from the bytes live now.
pub fn reset_heap_peak() {
    PEAK.store(CURRENT.load(Ordering::Relaxed), Ordering::Relaxed);
}
