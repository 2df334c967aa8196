//! NVRTC: compiling kernels/*.cu to PTX at run time, with a PTX cache on disk.
//!
//! The kernel sources are embedded in the binary by build.rs; `common.cuh` is inlined in place of
//! each file's `#include "common.cuh"` (NVRTC cannot see the repository at run time). NVRTC itself
//! and the CUDA headers come from a CUDA toolkit or from the pip wheels that
//! `tools/nvrtc-venv.sh` installs into `.venv-nvrtc/` ([`CudaToolkit::find`]).
//!
//! cudarc loads NVRTC by soname (`libnvrtc.so.13`, ...) from the loader's search path and panics
//! when it is not there. [`load_nvrtc`] first opens the toolkit's `libnvrtc-builtins.so.*` and
//! `libnvrtc.so.*` by full path; glibc then answers cudarc's `dlopen("libnvrtc.so.13")` with the
//! library already loaded (it matches sonames of loaded objects), so no `LD_LIBRARY_PATH` is needed.

use std::ffi::{c_int, CString};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use cudarc::nvrtc::{result, sys};

use super::device::GpuError;
use super::toolkit_paths;

mod sources {
    include!(concat!(env!("OUT_DIR"), "/kernel_sources.rs"));
}

/// Where NVRTC and the CUDA headers are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CudaToolkit {
    lib_dir: PathBuf,
    include_dir: PathBuf,
}

impl CudaToolkit {
    /// Looks, in order, in `$FASTPT_CUDA_HOME`, `$CUDA_HOME`, `$CUDA_PATH`, `/usr/local/cuda`
    /// (each with `lib64/` or `lib/`, and `include/`), then in the pip wheels of
    /// `<repo>/.venv-nvrtc` (`lib/python3*/site-packages/nvidia/cu13`). A place counts when its
    /// include folder has `cuda_bf16.h` and its lib folder a `libnvrtc.so*`.
    pub fn find() -> Result<CudaToolkit, GpuError> {
        Self::find_in(&toolkit_paths::candidate_roots(Path::new(env!(
            "CARGO_MANIFEST_DIR"
        ))))
    }

    /// The first of `roots` holding NVRTC and the headers (see [`CudaToolkit::find`]).
    pub fn find_in(roots: &[PathBuf]) -> Result<CudaToolkit, GpuError> {
        match toolkit_paths::locate(roots) {
            Ok((lib_dir, include_dir)) => Ok(CudaToolkit {
                lib_dir,
                include_dir,
            }),
            Err(looked) => Err(GpuError::Driver(format!(
                "NVRTC not found (need libnvrtc.so* and cuda_bf16.h). Looked in ($FASTPT_CUDA_HOME, \
                 $CUDA_HOME, $CUDA_PATH, /usr/local/cuda, .venv-nvrtc):\n  {}\n\
                 Install it with `bash tools/nvrtc-venv.sh` (pip wheels into .venv-nvrtc/) or point \
                 FASTPT_CUDA_HOME at a CUDA toolkit.",
                looked.join("\n  ")
            ))),
        }
    }

    pub fn lib_dir(&self) -> &Path {
        &self.lib_dir
    }

    pub fn include_dir(&self) -> &Path {
        &self.include_dir
    }
}

pub(crate) use super::toolkit_paths::find_lib;

/// Opens a shared library by full path with `RTLD_NOW | RTLD_GLOBAL` and never closes it.
pub(crate) fn preload(path: &Path) -> Result<(), GpuError> {
    use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};
    // SAFETY: loading a CUDA library runs only its initialisers, which have no preconditions.
    let lib = unsafe { Library::open(Some(path), RTLD_NOW | RTLD_GLOBAL) }
        .map_err(|e| GpuError::Driver(format!("loading {}: {e}", path.display())))?;
    // Kept loaded for the life of the process: cudarc's function pointers point into it.
    std::mem::forget(lib);
    Ok(())
}

/// Whether [`load_nvrtc`] succeeded: cudarc panics on an NVRTC call before that.
static LOADED: Mutex<bool> = Mutex::new(false);

/// Loads the toolkit's NVRTC (see the module docs). Idempotent: after the first success, later
/// calls do nothing, whatever toolkit they name.
pub fn load_nvrtc(toolkit: &CudaToolkit) -> Result<(), GpuError> {
    let mut loaded = LOADED.lock().unwrap_or_else(|p| p.into_inner());
    if *loaded {
        return Ok(());
    }
    // NVRTC opens its builtins library by soname when it compiles: load it first.
    if let Some(builtins) = find_lib(&toolkit.lib_dir, "libnvrtc-builtins.so") {
        preload(&builtins)?;
    }
    let nvrtc = find_lib(&toolkit.lib_dir, "libnvrtc.so").ok_or_else(|| {
        GpuError::Driver(format!("no libnvrtc.so* in {}", toolkit.lib_dir.display()))
    })?;
    preload(&nvrtc)?;
    // SAFETY: only opens libraries by name (cudarc's soname candidates).
    if !unsafe { sys::is_culib_present() } {
        return Err(GpuError::Driver(format!(
            "loaded {} but cudarc cannot open NVRTC by soname (is it a CUDA 13 NVRTC?)",
            nvrtc.display()
        )));
    }
    *loaded = true;
    Ok(())
}

/// NVRTC's version, `(major, minor)`; an error until [`load_nvrtc`] has succeeded.
pub fn nvrtc_version() -> Result<(i32, i32), GpuError> {
    if !*LOADED.lock().unwrap_or_else(|p| p.into_inner()) {
        return Err(GpuError::Driver("NVRTC is not loaded".into()));
    }
    let (mut major, mut minor): (c_int, c_int) = (0, 0);
    // SAFETY: two valid out-pointers.
    unsafe { sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| GpuError::Driver(format!("nvrtcVersion: {e}")))?;
    Ok((major, minor))
}

/// The kernel files, sorted (`act.cu`, `embed.cu`, ...).
pub fn kernel_files() -> Vec<&'static str> {
    sources::KERNEL_SOURCES
        .iter()
        .map(|(name, _)| *name)
        .collect()
}

/// The source of kernel file `file` with `common.cuh` inlined in place of its include line, with
/// `#line` directives so that NVRTC's messages name the right file and line.
///
/// # Panics
/// If `file` is not one of [`kernel_files`].
pub fn kernel_source(file: &str) -> String {
    let text = sources::KERNEL_SOURCES
        .iter()
        .find(|(name, _)| *name == file)
        .unwrap_or_else(|| panic!("no kernel file {file} (known: {:?})", kernel_files()))
        .1;
    let mut out = String::with_capacity(text.len() + sources::COMMON_CUH.len() + 100);
    for (i, line) in text.lines().enumerate() {
        if line.trim() == "#include \"common.cuh\"" {
            out.push_str("#line 1 \"common.cuh\"\n");
            out.push_str(sources::COMMON_CUH);
            if !sources::COMMON_CUH.ends_with('\n') {
                out.push('\n');
            }
            // `#line N` numbers the next line N; `i` is 0-based, so the next line is i + 2.
            out.push_str(&format!("#line {} \"{file}\"\n", i + 2));
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// PTX and NVRTC's log (empty when there were no warnings).
#[derive(Debug, Clone)]
pub struct Ptx {
    pub ptx: String,
    pub log: String,
}

/// Compiles `source` (named `file_name` in messages) for `arch` (`"sm_90"`, `"compute_80"`).
/// Options: `--gpu-architecture=<arch> -I<include> -std=c++17 -default-device`; no fast math (the
/// kernels must match the CPU reference). A failure is [`GpuError::Compile`] with NVRTC's log.
pub fn compile_ptx(
    toolkit: &CudaToolkit,
    file_name: &str,
    source: &str,
    arch: &str,
) -> Result<Ptx, GpuError> {
    let (ptx, log) = compile(toolkit, file_name, source, arch, false)?;
    Ok(Ptx {
        ptx: String::from_utf8_lossy(&ptx)
            .trim_end_matches('\0')
            .to_string(),
        log,
    })
}

/// A CUBIN and ptxas' `-v` report (registers, spills, stack, shared memory of every kernel; see
/// [`super::images::parse_ptxas_report`]), with any warnings.
#[derive(Debug, Clone)]
pub struct Cubin {
    pub cubin: Vec<u8>,
    pub report: String,
}

/// Compiles `source` to machine code for `arch` (`"sm_75"`), with `--ptxas-options=-v`. Otherwise
/// as [`compile_ptx`].
pub fn compile_cubin(
    toolkit: &CudaToolkit,
    file_name: &str,
    source: &str,
    arch: &str,
) -> Result<Cubin, GpuError> {
    let (cubin, report) = compile(toolkit, file_name, source, arch, true)?;
    Ok(Cubin { cubin, report })
}

/// NVRTC's output (PTX text, or the CUBIN when `cubin`) and its log.
fn compile(
    toolkit: &CudaToolkit,
    file_name: &str,
    source: &str,
    arch: &str,
    cubin: bool,
) -> Result<(Vec<u8>, String), GpuError> {
    load_nvrtc(toolkit)?;
    let fail = |log: String| GpuError::Compile {
        kernel: format!("{file_name} ({arch})"),
        log,
    };
    let src = CString::new(source).map_err(|_| fail("source contains a NUL byte".into()))?;
    let name = CString::new(file_name).map_err(|_| fail("name contains a NUL byte".into()))?;
    let mut options = vec![
        format!("--gpu-architecture={arch}"),
        format!("-I{}", toolkit.include_dir.display()),
        "-std=c++17".to_string(),
        "-default-device".to_string(),
    ];
    if cubin {
        options.push("--ptxas-options=-v".to_string());
    }
    let prog = result::create_program(&src, Some(&name))
        .map_err(|e| fail(format!("nvrtcCreateProgram: {e}")))?;
    // SAFETY: `prog` comes from create_program and is destroyed once, below; `src` and `name`
    // outlive it; the output buffer is sized by nvrtcGetCUBINSize.
    unsafe {
        let compiled = result::compile_program(prog, &options);
        let log = result::get_program_log(prog)
            .map(|l| c_chars_to_string(&l))
            .unwrap_or_else(|e| format!("(no log: {e})"));
        let image = compiled.and_then(|()| {
            if cubin {
                let mut size = 0usize;
                sys::nvrtcGetCUBINSize(prog, &mut size).result()?;
                let mut bytes = vec![0u8; size];
                sys::nvrtcGetCUBIN(prog, bytes.as_mut_ptr() as *mut std::ffi::c_char).result()?;
                Ok(bytes)
            } else {
                result::get_ptx(prog).map(|p| p.iter().map(|&c| c as u8).collect())
            }
        });
        let _ = result::destroy_program(prog);
        match image {
            Ok(image) => Ok((image, log)),
            Err(e) => Err(fail(if log.is_empty() { e.to_string() } else { log })),
        }
    }
}

/// A NUL-terminated C buffer as a string, trailing NULs and whitespace removed.
fn c_chars_to_string(chars: &[std::ffi::c_char]) -> String {
    let bytes: Vec<u8> = chars
        .iter()
        .map(|&c| c as u8)
        .take_while(|&b| b != 0)
        .collect();
    String::from_utf8_lossy(&bytes).trim_end().to_string()
}

/// The PTX cache folder: `$FASTPT_PTX_CACHE`, else `$XDG_CACHE_HOME/fastpt/ptx`, else
/// `~/.cache/fastpt/ptx`; `None` when none of these can be formed.
pub fn cache_dir() -> Option<PathBuf> {
    let var = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(dir) = var("FASTPT_PTX_CACHE") {
        return Some(dir);
    }
    let base = var("XDG_CACHE_HOME")
        .filter(|p| p.is_absolute())
        .or_else(|| var("HOME").map(|h| h.join(".cache")))?;
    Some(base.join("fastpt").join("ptx"))
}

/// FNV-1a, 64 bits: a hash that never changes between Rust versions or platforms.
fn fnv1a64(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in *part {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        // A separator, so that ("ab", "c") and ("a", "bc") differ.
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// `act-sm_90-0123456789abcdef-nvrtc`: the cache file name of `file` for `arch` without the
/// NVRTC version (the hash covers the inlined source and `arch`).
fn cache_prefix(file: &str, source: &str, arch: &str) -> String {
    let stem = file.strip_suffix(".cu").unwrap_or(file);
    let hash = fnv1a64(&[source.as_bytes(), arch.as_bytes()]);
    format!("{stem}-{arch}-{hash:016x}-nvrtc")
}

/// The PTX of kernel file `file` for `arch`, from the cache at [`cache_dir`] or compiled (and then
/// stored there). See [`cached_ptx_in`].
pub fn cached_ptx(
    toolkit: Option<&CudaToolkit>,
    file: &str,
    arch: &str,
) -> Result<String, GpuError> {
    cached_ptx_in(cache_dir().as_deref(), toolkit, file, arch)
}

/// The PTX of kernel file `file` for `arch`, cached in `dir` under a name made of the file, the
/// arch, a hash of the source and the NVRTC version. With a toolkit: the entry of this NVRTC
/// version, or a fresh compile stored atomically (a cache that cannot be written is skipped).
/// Without one (no NVRTC on this machine): the cached entry of the newest NVRTC version, if any;
/// this lets a machine without NVRTC run PTX compiled elsewhere ([`precompile`]).
pub fn cached_ptx_in(
    dir: Option<&Path>,
    toolkit: Option<&CudaToolkit>,
    file: &str,
    arch: &str,
) -> Result<String, GpuError> {
    let source = kernel_source(file);
    let prefix = cache_prefix(file, &source, arch);
    let Some(toolkit) = toolkit else {
        return dir.and_then(|d| newest_cached(d, &prefix)).ok_or_else(|| {
            GpuError::Driver(format!(
                "no NVRTC to compile {file} for {arch}, and no cached PTX {prefix}*.ptx in {}",
                dir.map_or("(no cache folder)".into(), |d| d.display().to_string())
            ))
        });
    };
    load_nvrtc(toolkit)?;
    let (major, minor) = nvrtc_version()?;
    let path = dir.map(|d| d.join(format!("{prefix}{major}.{minor}.ptx")));
    if let Some(ptx) = path.as_deref().and_then(read_ptx) {
        return Ok(ptx);
    }
    let ptx = compile_ptx(toolkit, file, &source, arch)?.ptx;
    if let Some(path) = &path {
        // Best effort: without a cache the next start compiles again.
        let _ = std::fs::create_dir_all(path.parent().unwrap_or(Path::new(".")))
            .map_err(|e| crate::error::Error::io(path, e))
            .and_then(|()| crate::fsutil::write_file_atomic(path, ptx.as_bytes(), &mut || Ok(())));
    }
    Ok(ptx)
}

/// A cache entry's PTX, if it is there and looks whole.
fn read_ptx(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .filter(|p| p.contains(".entry") || p.contains(".version"))
}

/// The entry `<prefix><major>.<minor>.ptx` in `dir` with the highest NVRTC version.
fn newest_cached(dir: &Path, prefix: &str) -> Option<String> {
    let mut found: Vec<((u32, u32), PathBuf)> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let version = name.strip_prefix(prefix)?.strip_suffix(".ptx")?;
            let (major, minor) = version.split_once('.')?;
            Some(((major.parse().ok()?, minor.parse().ok()?), e.path()))
        })
        .collect();
    found.sort();
    found.iter().rev().find_map(|(_, path)| read_ptx(path))
}

/// Compiles every kernel file for `arch` into the cache layout in `dir` (for a GPU machine without
/// NVRTC: copy `dir` there and point `FASTPT_PTX_CACHE` at it). Returns the files written or found.
pub fn precompile(toolkit: &CudaToolkit, arch: &str, dir: &Path) -> Result<Vec<PathBuf>, GpuError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| GpuError::Driver(format!("creating {}: {e}", dir.display())))?;
    load_nvrtc(toolkit)?;
    let (major, minor) = nvrtc_version()?;
    kernel_files()
        .into_iter()
        .map(|file| {
            cached_ptx_in(Some(dir), Some(toolkit), file, arch)?;
            let prefix = cache_prefix(file, &kernel_source(file), arch);
            Ok(dir.join(format!("{prefix}{major}.{minor}.ptx")))
        })
        .collect()
}

/// The toolkit, found once per process (the search reads the file system).
pub fn toolkit() -> Result<&'static CudaToolkit, GpuError> {
    static FOUND: OnceLock<Result<CudaToolkit, String>> = OnceLock::new();
    FOUND
        .get_or_init(|| CudaToolkit::find().map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| GpuError::Driver(e.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_is_stable() {
        // No parts: the FNV-1a 64 offset basis; a part followed by our separator step.
        assert_eq!(fnv1a64(&[]), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(&[b"a"]), 0x089b_c907_b544_c769);
        assert_ne!(fnv1a64(&[b"ab", b"c"]), fnv1a64(&[b"a", b"bc"]));
    }

    #[test]
    fn common_is_inlined_with_line_directives() {
        for file in kernel_files() {
            let src = kernel_source(file);
            assert!(!src.contains("#include \"common.cuh\""), "{file}");
            assert!(src.contains("#line 1 \"common.cuh\""), "{file}");
            assert!(src.contains(&format!("\"{file}\"")), "{file}");
        }
    }

    #[test]
    fn find_lib_prefers_the_soname() {
        let dir = tempfile::tempdir().unwrap();
        for n in [
            "libnvrtc.so.13.0.88",
            "libnvrtc.so.13",
            "libnvrtc.alt.so.13",
            "libnvrtc-builtins.so.13.0",
        ] {
            std::fs::write(dir.path().join(n), b"").unwrap();
        }
        assert_eq!(
            find_lib(dir.path(), "libnvrtc.so"),
            Some(dir.path().join("libnvrtc.so.13"))
        );
        assert_eq!(
            find_lib(dir.path(), "libnvrtc-builtins.so"),
            Some(dir.path().join("libnvrtc-builtins.so.13.0"))
        );
        assert_eq!(find_lib(dir.path(), "libcublasLt.so"), None);
    }

    #[test]
    fn find_lists_every_place_it_looked() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        let err = CudaToolkit::find_in(&[a.clone(), b.clone()])
            .unwrap_err()
            .to_string();
        for p in [
            a.join("lib64"),
            a.join("lib"),
            b.join("lib64"),
            b.join("include"),
        ] {
            assert!(err.contains(&p.display().to_string()), "{err}");
        }
        assert!(err.contains("tools/nvrtc-venv.sh"), "{err}");

        std::fs::create_dir_all(b.join("include")).unwrap();
        std::fs::create_dir_all(b.join("lib")).unwrap();
        std::fs::write(b.join("include/cuda_bf16.h"), b"").unwrap();
        std::fs::write(b.join("lib/libnvrtc.so.13"), b"").unwrap();
        let found = CudaToolkit::find_in(&[a, b.clone()]).unwrap();
        assert_eq!(found.lib_dir(), b.join("lib"));
        assert_eq!(found.include_dir(), b.join("include"));
    }

    #[test]
    fn cache_without_nvrtc_takes_the_newest_entry() {
        let dir = tempfile::tempdir().unwrap();
        let file = kernel_files()[0];
        let prefix = cache_prefix(file, &kernel_source(file), "sm_90");
        std::fs::write(
            dir.path().join(format!("{prefix}12.9.ptx")),
            ".version 8.8 old",
        )
        .unwrap();
        std::fs::write(
            dir.path().join(format!("{prefix}13.0.ptx")),
            ".version 9.0 new",
        )
        .unwrap();
        let ptx = cached_ptx_in(Some(dir.path()), None, file, "sm_90").unwrap();
        assert_eq!(ptx, ".version 9.0 new");
        assert!(cached_ptx_in(Some(dir.path()), None, file, "sm_80").is_err());
    }
}
