//! Where NVRTC and the CUDA headers are: one search, shared by build.rs (which compiles the kernels
//! into the binary) and the run-time compiler ([`super::nvrtc::CudaToolkit`]). Plain std only:
//! build.rs includes this file with `#[path]`.

use std::path::{Path, PathBuf};

/// The places to look, in order: `$FASTPT_CUDA_HOME`, `$CUDA_HOME`, `$CUDA_PATH`,
/// `/usr/local/cuda`, then the pip wheels of `<repo>/.venv-nvrtc`
/// (`lib/python3*/site-packages/nvidia/cu13`, from `tools/nvrtc-venv.sh`).
pub fn candidate_roots(repo: &Path) -> Vec<PathBuf> {
    let mut roots: Vec<PathBuf> = Vec::new();
    for var in ["FASTPT_CUDA_HOME", "CUDA_HOME", "CUDA_PATH"] {
        if let Some(v) = std::env::var_os(var).filter(|v| !v.is_empty()) {
            roots.push(PathBuf::from(v));
        }
    }
    roots.push(PathBuf::from("/usr/local/cuda"));
    roots.extend(venv_roots(&repo.join(".venv-nvrtc")));
    roots
}

/// `<venv>/lib/python3*/site-packages/nvidia/cu13`, for every python3* folder (sorted).
fn venv_roots(venv: &Path) -> Vec<PathBuf> {
    let mut pythons: Vec<PathBuf> = std::fs::read_dir(venv.join("lib"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("python3"))
        .map(|e| e.path().join("site-packages/nvidia/cu13"))
        .collect();
    pythons.sort();
    if pythons.is_empty() {
        // Listed anyway, so that an error names the place.
        pythons.push(venv.join("lib/python3*/site-packages/nvidia/cu13"));
    }
    pythons
}

/// `(lib folder, include folder)` of the first root whose include folder has `cuda_bf16.h` and
/// whose `lib64/` or `lib/` has a `libnvrtc.so*`; else every `lib + include` pair looked at.
pub fn locate(roots: &[PathBuf]) -> Result<(PathBuf, PathBuf), Vec<String>> {
    let mut looked = Vec::new();
    for root in roots {
        let include_dir = root.join("include");
        for lib in ["lib64", "lib"] {
            let lib_dir = root.join(lib);
            if include_dir.join("cuda_bf16.h").is_file()
                && find_lib(&lib_dir, "libnvrtc.so").is_some()
            {
                return Ok((lib_dir, include_dir));
            }
            looked.push(format!("{} + {}", lib_dir.display(), include_dir.display()));
        }
    }
    Err(looked)
}

/// The file in `dir` named `<stem>.<digits...>` (e.g. `libnvrtc.so.13`), else `<stem>` itself;
/// the shortest versioned name wins (the soname, not `libnvrtc.so.13.0.88`). `.alt` variants and
/// other names that merely start with `stem` are not matched.
pub fn find_lib(dir: &Path, stem: &str) -> Option<PathBuf> {
    let mut versioned: Vec<String> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| {
            n.strip_prefix(stem)
                .and_then(|rest| rest.strip_prefix('.'))
                .is_some_and(|v| !v.is_empty() && v.chars().all(|c| c.is_ascii_digit() || c == '.'))
        })
        .collect();
    versioned.sort_by_key(|n| (n.len(), n.clone()));
    match versioned.first() {
        Some(n) => Some(dir.join(n)),
        None => Some(dir.join(stem)).filter(|p| p.is_file()),
    }
}
