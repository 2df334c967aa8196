//! GpuBackend<VirtualDevice> against the CPU reference: every case of the op table
//! (`cases.rs`: fresh random inputs, odd sizes, outputs poisoned with NaN before each launch so
//! that a kernel that skips an element shows, f32 rel ≤ 1e-5 and bf16 rel ≤ 2e-2 unless a case
//! says otherwise; inputs rounded to the dtype first, so both backends see the same numbers and
//! only the arithmetic differs), the edge cases the table does not cover (`edges.rs`), the
//! doctor's op checks (`doctor.rs`) and the virtual GPU's shim itself (`shim.rs`).

use half::bf16;

use super::device::DType;
use super::vgpu::VirtualDevice;
use super::GpuBackend;
use crate::backend::cpu::CpuBackend;
use crate::backend::Backend;
use crate::testing::{random_vec, rel_err_f32};

mod cases;
mod doctor;
mod edges;
mod shim;

pub(super) type Vgpu = GpuBackend<VirtualDevice>;

/// The GPU tests of this module (every op, the shim) and the doctor's whole steps
/// (`crate::doctor::tests`) run again under the reversed schedule and two shuffled ones
/// (`vgpu::Schedule`), in child processes of this test binary with `$FASTPT_VGPU_SCHEDULE` set: a
/// missing barrier or a dependency between the blocks of one launch gives different results
/// there than in the fixed order.
#[test]
fn gpu_tests_pass_under_other_schedules() {
    use super::vgpu::Schedule;
    const ME: &str = "backend::gpu::tests::gpu_tests_pass_under_other_schedules";
    if std::env::var_os(Schedule::ENV).is_some() {
        // A child run: the parent runs each schedule once.
        return;
    }
    let exe = std::env::current_exe().expect("the test binary's path");
    for schedule in ["reversed", "shuffled:1", "shuffled:2"] {
        let out = std::process::Command::new(&exe)
            .args(["backend::gpu::tests::", "doctor::tests::"])
            .args(["--skip", ME, "--test-threads", "2"])
            .env(Schedule::ENV, schedule)
            .output()
            .expect("running the test binary");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail = |s: &str| {
            s.lines()
                .rev()
                .take(60)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n")
        };
        assert!(
            out.status.success(),
            "under the {schedule} schedule:\n{}\n{}",
            tail(&stdout),
            tail(&stderr)
        );
        let passed: usize = stdout
            .lines()
            .find_map(|l| l.strip_prefix("test result: ok. "))
            .and_then(|l| l.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        assert!(
            passed >= 50,
            "under the {schedule} schedule only {passed} tests ran:\n{}",
            tail(&stdout)
        );
        eprintln!("{schedule}: {passed} GPU tests passed");
    }
}

/// Both dtypes with their tolerances.
pub(super) fn backends() -> Vec<(Vgpu, f64)> {
    vec![
        (GpuBackend::new(VirtualDevice::new(), DType::F32), 1e-5),
        (GpuBackend::new(VirtualDevice::new(), DType::Bf16), 2e-2),
    ]
}

pub(super) fn cpu() -> CpuBackend<f32> {
    CpuBackend::new()
}

/// Random values in (-scale, scale), rounded to what `dtype` can hold.
pub(super) fn inputs(n: usize, scale: f64, seed: u64, dtype: DType) -> Vec<f32> {
    random_vec(n, scale, seed)
        .into_iter()
        .map(|x| round_to(x as f32, dtype))
        .collect()
}

pub(super) fn round_to(x: f32, dtype: DType) -> f32 {
    match dtype {
        DType::F32 => x,
        DType::Bf16 => bf16::from_f32(x).to_f32(),
    }
}

/// An output buffer full of NaN: every element the op should write but does not stays NaN.
pub(super) fn poisoned(be: &Vgpu, n: usize) -> <Vgpu as Backend>::Tensor {
    be.upload_f32(vec![f32::NAN; n])
}

/// Asserts `rel_err(gpu, reference) ≤ tol`, naming the op and dtype.
#[track_caller]
pub(super) fn assert_close(
    what: &str,
    be: &Vgpu,
    x: &<Vgpu as Backend>::Tensor,
    reference: &[f32],
    tol: f64,
) {
    let got = be.download_f32(x);
    assert!(
        got.iter().all(|v| v.is_finite()),
        "{what} ({}): non-finite output (an element was not written?)",
        be.dtype()
    );
    let err = rel_err_f32(&got, reference);
    assert!(
        err <= tol,
        "{what} ({}): relative error {err:.3e} > {tol:.0e}",
        be.dtype()
    );
}
