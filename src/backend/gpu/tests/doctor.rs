//! `fastpt doctor`'s op checks on the virtual GPU: every op case at its doctor sizes against the
//! CPU in f32 and bf16, and every kernel launched by them, so that every launch site's arguments
//! were checked against its kernel's declaration. (The doctor's whole steps are tested in
//! `crate::doctor`.)

use super::super::check::{check_mma, check_ops, results_table, CheckResult};
use super::super::device::DType;
use super::super::vgpu::{kernels, VirtualDevice};
use super::super::GpuBackend;

fn assert_all_pass(what: &str, results: &[CheckResult]) {
    let table = results_table(results);
    assert!(results.iter().all(|r| r.passed()), "{what}:\n{table}");
}

#[test]
fn doctor_op_checks_pass_and_launch_every_kernel() {
    let f32_backend = GpuBackend::new(VirtualDevice::new(), DType::F32);
    for dtype in [DType::F32, DType::Bf16] {
        let be = f32_backend.with_dtype(dtype);
        let results = check_ops(&be, 100);
        assert!(results.len() > 30, "only {} checks ran", results.len());
        assert_all_pass(&format!("{dtype} ops"), &results);
    }
    let r = check_mma(f32_backend.device(), 5);
    assert!(r.passed(), "{r:?}");
    // The shim's own kernels are launched by tests/shim.rs.
    let launched = f32_backend.device().launched();
    let missing: Vec<String> = kernels()
        .into_iter()
        .map(|k| k.name)
        .filter(|n| !n.starts_with("selftest_") && !launched.contains(n))
        .collect();
    assert!(
        missing.is_empty(),
        "the doctor's op checks never launch {missing:?}: add a check (each launch is where the \
         virtual GPU compares the arguments with the kernel's parameters)"
    );
}
