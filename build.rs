//! Build script. For now it only declares what the build depends on; the GPU issue adds the
//! virtual-GPU library (kernels/*.cu compiled as C++ with the cc crate) and PTX precompilation
//! when nvcc is present (see docs/architecture.md).

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
}
