//! The CUDA device (placeholder; filled in by the CUDA work).
