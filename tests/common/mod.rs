//! What the integration tests that run the `fastpt` binary share.

// Each test binary compiles this module and uses only some of it.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

use fastpt::config::RunConfig;
use fastpt::model::hf::{save_safetensors, SafetensorsFolder, TensorData};
use fastpt::train::trainer::DEFAULT_RUN_TOML;

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

/// A failed command: not a panic (Rust's panic message and exit code 101 are absent), not an
/// allocation abort, and an `error: ` line.
pub fn assert_clean_error(ok: bool, stderr: &str) {
    assert!(!ok, "the command succeeded: {stderr}");
    assert!(
        !stderr.contains("panicked") && !stderr.contains("memory allocation"),
        "{stderr}"
    );
    assert!(stderr.lines().any(|l| l.starts_with("error: ")), "{stderr}");
}

/// Copies the model folder `src` to `dst` (config.json, tokenizer.json when there is one, the
/// weights as one f32 model.safetensors) with tensor `name` changed by `edit(values, shape)`.
pub fn model_with_edited_tensor(
    src: &Path,
    dst: &Path,
    name: &str,
    edit: impl Fn(&mut [f32], &[usize]),
) {
    std::fs::create_dir_all(dst).unwrap();
    for f in ["config.json", "tokenizer.json"] {
        if src.join(f).exists() {
            std::fs::copy(src.join(f), dst.join(f)).unwrap();
        }
    }
    let folder = SafetensorsFolder::open(src).unwrap();
    assert!(folder.contains(name), "{} lacks {name}", src.display());
    let tensors: Vec<(String, Vec<usize>, TensorData)> = folder
        .names()
        .into_iter()
        .map(|n| {
            let shape = folder.shape(&n).unwrap();
            let mut values = folder.load_f32(&n, &shape).unwrap();
            if n == name {
                edit(&mut values, &shape);
            }
            (n, shape, TensorData::F32(values))
        })
        .collect();
    save_safetensors(&dst.join("model.safetensors"), &tensors).unwrap();
}

/// The embedded default run config (the synthetic task) with `overrides` (`--set` syntax),
/// writing into `dir`.
pub fn default_config(dir: &Path, overrides: &[&str]) -> RunConfig {
    let mut all: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    all.push(format!("out_dir={:?}", dir.display().to_string()));
    let cfg = RunConfig::from_toml_str(DEFAULT_RUN_TOML, Path::new("default"), &all).unwrap();
    cfg.validate(Path::new("default")).unwrap();
    cfg
}

/// The backbones × methods whose data-parallel losses are compared with one process's
/// (tests/data_parallel.rs in process, tests/mpi.rs under mpirun): (name, `--set` overrides).
pub const DATA_PARALLEL_CASES: &[(&str, &[&str])] = &[
    ("t5-pt", &["method=pt", "pt.prompt_len=6"]),
    (
        "t5-dept",
        &["method=dept", "dept.prompt_len=6", "dept.rank=4"],
    ),
    ("t5-ept", &[]), // the default: EPT-MS
    (
        "llama-pt",
        &["model=llama-tiny", "method=pt", "pt.prompt_len=6"],
    ),
    (
        "llama-dept",
        &[
            "model=llama-tiny",
            "method=dept",
            "dept.prompt_len=6",
            "dept.rank=4",
        ],
    ),
    ("llama-ept", &["model=llama-tiny"]),
];

/// ‖a − b‖ / ‖b‖ over two runs' (step, loss) lists, which must hold the same steps.
pub fn rel_diff(a: &[(u64, f64)], b: &[(u64, f64)]) -> f64 {
    let steps = |v: &[(u64, f64)]| v.iter().map(|x| x.0).collect::<Vec<_>>();
    assert_eq!(steps(a), steps(b), "runs of different steps");
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x.1 - y.1).powi(2)).sum();
    let den: f64 = b.iter().map(|y| y.1 * y.1).sum();
    (num / den).sqrt()
}
