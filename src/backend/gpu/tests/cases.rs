//! Every case of the op table (`gpu/cases.rs`) at its unit-test sizes on the virtual GPU against
//! the CPU reference, in f32 and bf16, the attention cases with each attention kernel: one test
//! per op, named after it.

use super::super::cases::{cases, check_case, Case};
use super::super::check::variants;
use super::*;

/// Checks every test shape of case `op` in both dtypes (and each attention kernel where the case
/// has them); fails listing every output over its tolerance.
fn check(op: &str) {
    let mut failures = Vec::new();
    let mut checked = 0;
    for dtype in [DType::F32, DType::Bf16] {
        let gpu = GpuBackend::new(VirtualDevice::new(), dtype);
        let table = cases::<Vgpu>();
        let case = table
            .iter()
            .find(|c| c.op == op)
            .unwrap_or_else(|| panic!("no case {op}"));
        for (i, shape) in case.shapes(case.tests).into_iter().enumerate() {
            for (kernel, be) in variants(&gpu, case.attention_kernels) {
                for e in check_case(&be, dtype, case, &shape, 1 + 100 * i as u64) {
                    checked += 1;
                    if !e.passed() {
                        let kernel = kernel.map_or(String::new(), |k| format!(" {k:?}"));
                        failures.push(format!(
                            "{op} {} ({dtype}{kernel}) [{shape}]: relative error {:.3e} > {:.0e}",
                            e.output, e.rel_err, e.tol
                        ));
                    }
                }
            }
        }
    }
    assert!(checked > 0, "{op}: no test shapes");
    assert!(
        failures.is_empty(),
        "{op}: {} of {checked} checks failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// One `#[test]` per op case, and the list of them.
macro_rules! op_tests {
    ($($op:ident),* $(,)?) => {
        $(
            #[test]
            fn $op() {
                check(stringify!($op));
            }
        )*
        const TESTED: &[&str] = &[$(stringify!($op)),*];
    };
}

op_tests!(
    add_assign,
    add_bias,
    bias_backward,
    gated_act_forward,
    gated_act_backward_dinp,
    gather_rows,
    scatter_rows_add,
    embed_prompt_forward,
    embed_prompt_backward,
    matmul,
    linear_backward_dweight,
    rmsnorm_forward,
    rmsnorm_backward_dinp,
    layernorm_forward,
    layernorm_backward,
    softmax_rows_forward,
    softmax_rows_backward_dinp,
    attention_forward,
    attention_backward_dinp,
    rope_forward,
    rope_backward_dinp,
    nf4_dequantize,
    fusion_attention_forward,
    fusion_attention_backward,
    gated_experts_forward,
    gated_experts_backward,
    lamp_pool_forward,
    lamp_pool_backward,
    sum_squares,
    adamw_step,
    cross_entropy_forward_backward,
);

/// Every case of the table has its test above, test shapes and doctor shapes (distinctly named)
/// that the op takes; derived inputs come from a case with the same keys.
#[test]
fn every_case_is_tested_and_well_formed() {
    let table = cases::<Vgpu>();
    let ops: Vec<&str> = table.iter().map(|c| c.op).collect();
    assert_eq!(
        ops, TESTED,
        "op_tests! lists every case of the table, in order"
    );
    for case in &table {
        assert!(!case.tests.is_empty(), "{}: no test shapes", case.op);
        assert!(!case.doctor.is_empty(), "{}: no doctor shapes", case.op);
        assert_eq!(
            case.lab_vgpu.is_empty(),
            case.lab_cuda.is_empty(),
            "{}: lab shapes for one device only",
            case.op
        );
        for list in [case.tests, case.doctor, case.lab_vgpu, case.lab_cuda] {
            for shape in case.shapes(list) {
                assert_eq!((case.needs)(&shape), Ok(()), "{} [{shape}]", case.op);
            }
        }
        // The doctor's rows are named after the shapes: distinct names.
        let mut names: Vec<&str> = case.doctor.iter().map(|(n, _)| *n).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(
            names.len(),
            case.doctor.len(),
            "{}: doctor shape names",
            case.op
        );
        if let Some(from) = case.derive_from {
            let from = table.iter().find(|c| c.op == from);
            assert_eq!(from.map(|c| c.keys), Some(case.keys), "{}", case.op);
        }
    }
}

/// The checks are not vacuous: an op that writes nothing (its outputs stay NaN) or writes wrong
/// values fails every output.
#[test]
fn a_skipped_or_wrong_output_fails_the_check() {
    let table = cases::<Vgpu>();
    let case = table
        .iter()
        .find(|c| c.op == "rmsnorm_forward")
        .expect("the rmsnorm_forward case");
    let shape = &case.shapes(case.tests)[0];
    let be = GpuBackend::new(VirtualDevice::new(), DType::F32);
    let skip = Case {
        run: |_, _, _| {},
        ..*case
    };
    let zero = Case {
        run: |be: &Vgpu, x, _| x.outs.iter_mut().for_each(|out| be.fill_zero(out)),
        ..*case
    };
    for wrong in [skip, zero] {
        let errs = check_case(&be, DType::F32, &wrong, shape, 1);
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(errs.iter().all(|e| !e.passed()), "{errs:?}");
    }
}
