//! Every kernel file compiles with NVRTC, without a single warning, for `compute_80` (PTX for any
//! GPU from Ampere on) and `sm_90` (H100), and every kernel the virtual GPU registered is an entry
//! of both builds. No GPU needed: NVRTC only compiles.
//!
//! NVRTC comes from a CUDA toolkit or from `bash tools/nvrtc-venv.sh` (pip wheels into
//! `.venv-nvrtc/`). Without it the test fails, unless `FASTPT_SKIP_NVRTC=1`.

use std::collections::BTreeMap;

use fastpt::backend::gpu::nvrtc::{self, CudaToolkit};
use fastpt::backend::gpu::vgpu;

const ARCHS: [&str; 2] = ["compute_80", "sm_90"];

#[test]
fn every_kernel_compiles_with_nvrtc() {
    let toolkit = match CudaToolkit::find() {
        Ok(t) => t,
        Err(e) if std::env::var("FASTPT_SKIP_NVRTC").is_ok_and(|v| v == "1") => {
            eprintln!("\n!!!!! SKIPPED: FASTPT_SKIP_NVRTC=1 and {e}\n");
            return;
        }
        Err(e) => panic!(
            "{e}\n\nThis test needs NVRTC: run `bash tools/nvrtc-venv.sh` in the repository \
             root, or set FASTPT_SKIP_NVRTC=1 to skip it."
        ),
    };
    nvrtc::load_nvrtc(&toolkit).expect("NVRTC loads");
    let (major, minor) = nvrtc::nvrtc_version().expect("nvrtcVersion");
    eprintln!("NVRTC {major}.{minor} from {}", toolkit.lib_dir().display());

    // Every (file, arch) in parallel: NVRTC is thread-safe and a file takes seconds.
    let files = nvrtc::kernel_files();
    let results: Vec<(&str, &str, Result<nvrtc::Ptx, String>)> = std::thread::scope(|s| {
        let handles: Vec<_> = files
            .iter()
            .flat_map(|&file| ARCHS.iter().map(move |&arch| (file, arch)))
            .map(|(file, arch)| {
                let toolkit = &toolkit;
                s.spawn(move || {
                    let source = nvrtc::kernel_source(file);
                    let r =
                        nvrtc::compile_ptx(toolkit, file, &source, arch).map_err(|e| e.to_string());
                    (file, arch, r)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("compile thread"))
            .collect()
    });

    let mut problems = Vec::new();
    // arch -> every entry name of that arch's PTX.
    let mut entries: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for (file, arch, r) in &results {
        match r {
            Err(e) => problems.push(format!("{file} ({arch}) does not compile:\n{e}")),
            Ok(ptx) if !ptx.log.is_empty() => problems.push(format!(
                "{file} ({arch}) compiles with warnings:\n{}",
                ptx.log
            )),
            Ok(ptx) => {
                eprintln!(
                    "ok  {file:<14} {arch:<10} {:>8} bytes of PTX",
                    ptx.ptx.len()
                );
                entries
                    .entry(arch)
                    .or_default()
                    .extend(entry_names(&ptx.ptx));
            }
        }
    }

    let kernels = vgpu::kernel_names();
    assert!(!kernels.is_empty(), "the virtual GPU registered no kernel");
    for arch in ARCHS {
        let have = entries.get(arch).cloned().unwrap_or_default();
        let missing: Vec<&String> = kernels.iter().filter(|k| !have.contains(k)).collect();
        if !missing.is_empty() {
            problems.push(format!(
                "{arch}: {} of {} kernels are not in the PTX: {missing:?}",
                missing.len(),
                kernels.len()
            ));
        }
    }
    assert!(problems.is_empty(), "\n{}\n", problems.join("\n\n"));
    eprintln!(
        "{} kernels in {} files compile for {ARCHS:?}",
        kernels.len(),
        files.len()
    );
}

/// The names of the `.entry` directives of a PTX module (`.visible .entry name(`).
fn entry_names(ptx: &str) -> Vec<String> {
    ptx.lines()
        .filter_map(|l| {
            let rest = l.trim_start().strip_prefix(".visible")?.trim_start();
            let rest = rest.strip_prefix(".entry")?.trim_start();
            Some(rest.split(['(', ' ']).next()?.trim().to_string())
        })
        .collect()
}

/// The PTX cache round trip: compiled into a folder, then found there without NVRTC (as on a GPU
/// machine that has only the cached PTX).
#[test]
fn precompiled_ptx_is_found_without_nvrtc() {
    let Ok(toolkit) = CudaToolkit::find() else {
        // The test above reports the missing NVRTC.
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    // One small file is enough to check the layout; precompile does them all.
    let file = nvrtc::kernel_files()[0];
    let compiled = nvrtc::cached_ptx_in(Some(dir.path()), Some(&toolkit), file, "sm_90")
        .expect("compiles into the cache");
    let cached = nvrtc::cached_ptx_in(Some(dir.path()), None, file, "sm_90")
        .expect("found in the cache without NVRTC");
    assert_eq!(compiled, cached);
    assert!(nvrtc::cached_ptx_in(Some(dir.path()), None, file, "sm_80").is_err());
}
