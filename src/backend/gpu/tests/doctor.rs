//! `fastpt doctor`'s checks on the virtual GPU: every op and whole T5 and Llama steps (with and
//! without a prompt method) against the CPU, in f32 and bf16.

use super::super::check::{check_ops, check_steps, results_table};
use super::backends;

#[test]
fn doctor_op_checks_pass_on_the_virtual_gpu() {
    for (be, _) in backends() {
        let results = check_ops(&be, 100);
        assert!(results.len() > 30, "only {} checks ran", results.len());
        let table = results_table(&results);
        assert!(
            results.iter().all(|r| r.passed()),
            "{}:\n{table}",
            be.dtype()
        );
    }
}

#[test]
fn doctor_step_checks_pass_on_the_virtual_gpu() {
    step_checks_pass("t5-tiny");
}

#[test]
fn doctor_llama_step_checks_pass_on_the_virtual_gpu() {
    step_checks_pass("llama-tiny");
}

fn step_checks_pass(shape: &str) {
    for (be, _) in backends() {
        let results = check_steps(&be, shape, 7).unwrap();
        let table = results_table(&results);
        println!("{table}");
        assert!(
            results.iter().all(|r| r.passed()),
            "{}:\n{table}",
            be.dtype()
        );
    }
}
