//! The binary that travels to a GPU machine (`cargo build --profile dist`, tools/gpu-check.sh):
//! the device tool carries at most 64 MiB in all, and the GPU machines have no Rust toolchain.
//! The dist profile is the release profile without debug info, stripped; this test strips a copy
//! of the release binary the same way and checks its size (`.ci/run` also builds the dist binary
//! itself and checks it).

const CARRY_LIMIT: u64 = 64 << 20;

#[test]
fn dist_profile_is_release_stripped() {
    let manifest: toml::Table = toml::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"))
            .expect("Cargo.toml"),
    )
    .expect("Cargo.toml parses");
    let dist = manifest
        .get("profile")
        .and_then(|p| p.get("dist"))
        .and_then(|d| d.as_table())
        .expect("Cargo.toml has [profile.dist]");
    assert_eq!(
        dist.get("inherits").and_then(|v| v.as_str()),
        Some("release")
    );
    assert_eq!(dist.get("strip").and_then(|v| v.as_bool()), Some(true));
    assert_eq!(dist.get("debug").and_then(|v| v.as_bool()), Some(false));
}

#[test]
fn stripped_binary_fits_the_carry_limit() {
    let dir = tempfile::tempdir().expect("temp dir");
    let copy = dir.path().join("fastpt");
    std::fs::copy(env!("CARGO_BIN_EXE_fastpt"), &copy).expect("copying the binary");
    let status = std::process::Command::new("strip")
        .arg("--strip-all")
        .arg(&copy)
        .status()
        .expect("running `strip` (binutils)");
    assert!(status.success(), "strip failed");
    let size = std::fs::metadata(&copy).expect("stripped binary").len();
    eprintln!(
        "stripped fastpt: {:.1} MiB (carry limit {} MiB)",
        size as f64 / (1u64 << 20) as f64,
        CARRY_LIMIT >> 20
    );
    // The kernel lab travels with it: leave it room.
    assert!(
        size < CARRY_LIMIT / 2,
        "the stripped binary is {size} bytes: over half of the 64 MiB the device tool carries"
    );
    // Stripping left a working program.
    let out = std::process::Command::new(&copy)
        .args(["--version"])
        .output()
        .expect("running the stripped binary");
    assert!(out.status.success());
}
