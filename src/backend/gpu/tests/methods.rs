//! The prompt-method ops (EPT-MS fusion in both readings, gated experts, LAMP pooling) on the
//! virtual GPU against the CPU reference, forward and backward, over several odd sizes: one
//! prompt row, one expert, no pooling (p = 1), pooling the whole prompt (p = L), widths that are
//! not multiples of a block.

use super::super::check::{check_method_ops, results_table, MethodDims};
use super::backends;

fn sweep() -> Vec<MethodDims> {
    vec![
        MethodDims::DOCTOR,
        MethodDims {
            s: 1,
            m: 1,
            c: 3,
            e: 1,
            l: 4,
            r: 1,
            p: 1,
        },
        MethodDims {
            s: 20,
            m: 37,
            c: 130,
            e: 4,
            l: 20,
            r: 8,
            p: 20,
        },
        MethodDims {
            s: 5,
            m: 300,
            c: 257,
            e: 2,
            l: 100,
            r: 16,
            p: 4,
        },
    ]
}

/// Runs the checks whose name starts with `op` at every size and asserts they all pass.
fn check(op: &str) {
    for (be, _) in backends() {
        for (i, dims) in sweep().into_iter().enumerate() {
            let results: Vec<_> = check_method_ops(&be, 40 + i as u64, dims)
                .into_iter()
                .filter(|r| r.op.starts_with(op))
                .collect();
            assert!(!results.is_empty(), "no {op} checks ran");
            let table = results_table(&results);
            assert!(
                results.iter().all(|r| r.passed()),
                "{} {dims:?}:\n{table}",
                be.dtype()
            );
        }
    }
}

#[test]
fn fusion_attention_forward_matches_cpu() {
    check("fusion_attention_forward");
}

#[test]
fn fusion_attention_backward_matches_cpu() {
    check("fusion_attention_backward");
}

#[test]
fn gated_experts_forward_matches_cpu() {
    check("gated_experts_forward");
}

#[test]
fn gated_experts_backward_matches_cpu() {
    check("gated_experts_backward");
}

#[test]
fn lamp_pool_forward_matches_cpu() {
    check("lamp_pool_forward");
}

#[test]
fn lamp_pool_backward_matches_cpu() {
    check("lamp_pool_backward");
}
