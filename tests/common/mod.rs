//! What the integration tests that run the `fastpt` binary share.

use std::process::Command;

/// Runs `fastpt ARGS`: (success, stdout, stderr).
pub fn fastpt(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_fastpt"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
