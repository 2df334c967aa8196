//! NVRTC: compiling kernels/*.cu to PTX at run time (placeholder; filled in by the CUDA work).
