//! build.rs, part 2: every kernels/*.cu compiled by NVRTC into images the binary carries, so that a
//! user with a supported GPU needs only the driver: no NVRTC, no CUDA toolkit.
//!
//! Images: CUBIN (machine code, loaded as is) for each of [`CUBIN_ARCHS`], and PTX for
//! [`PTX_ARCH`] (the driver JIT-compiles it for any GPU from Ampere on, newer ones included).
//! NVRTC comes from the same places the run-time compiler looks (src/backend/gpu/toolkit_paths.rs),
//! is opened with `dlopen` (libloading) and called through its C API. ptxas' resource report
//! (`--ptxas-options=-v`: registers, spills, stack, shared memory) is kept with each CUBIN, for
//! `tests/ptxas_gates.rs` and `fastpt doctor`.

use std::ffi::{c_char, c_int, c_void, CString};
use std::path::{Path, PathBuf};

/// GPUs that get machine code: A100 (sm_80), RTX 30xx / A10 (sm_86), L4 / RTX 40xx (sm_89),
/// H100 / H200 (sm_90).
pub const CUBIN_ARCHS: [&str; 4] = ["sm_80", "sm_86", "sm_89", "sm_90"];
/// The PTX fallback for newer GPUs.
pub const PTX_ARCH: &str = "compute_80";

/// One compiled image of one kernel file.
pub struct Image {
    pub file: String,
    /// `sm_90` (CUBIN) or `compute_80` (PTX).
    pub arch: String,
    pub bytes: Vec<u8>,
    /// ptxas' `-v` report (CUBIN only), else NVRTC's log (empty when there were no warnings).
    pub log: String,
}

/// The NVRTC entry points we use.
struct Nvrtc {
    _lib: libloading::Library,
    version: unsafe extern "C" fn(*mut c_int, *mut c_int) -> c_int,
    create: unsafe extern "C" fn(
        *mut *mut c_void,
        *const c_char,
        *const c_char,
        c_int,
        *const *const c_char,
        *const *const c_char,
    ) -> c_int,
    compile: unsafe extern "C" fn(*mut c_void, c_int, *const *const c_char) -> c_int,
    log_size: unsafe extern "C" fn(*mut c_void, *mut usize) -> c_int,
    log: unsafe extern "C" fn(*mut c_void, *mut c_char) -> c_int,
    ptx_size: unsafe extern "C" fn(*mut c_void, *mut usize) -> c_int,
    ptx: unsafe extern "C" fn(*mut c_void, *mut c_char) -> c_int,
    cubin_size: unsafe extern "C" fn(*mut c_void, *mut usize) -> c_int,
    cubin: unsafe extern "C" fn(*mut c_void, *mut c_char) -> c_int,
    destroy: unsafe extern "C" fn(*mut *mut c_void) -> c_int,
}

impl Nvrtc {
    /// Opens `libnvrtc.so*` in `lib_dir` (its builtins library first, by full path, so that NVRTC's
    /// own `dlopen` of it by soname finds it loaded).
    fn open(lib_dir: &Path) -> Result<Nvrtc, String> {
        use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};
        if let Some(builtins) = super::toolkit_paths::find_lib(lib_dir, "libnvrtc-builtins.so") {
            // SAFETY: loading NVRTC's builtins runs only their initialisers.
            let lib = unsafe { Library::open(Some(&builtins), RTLD_NOW | RTLD_GLOBAL) }
                .map_err(|e| format!("loading {}: {e}", builtins.display()))?;
            // Kept for the life of the build script: NVRTC calls into it.
            std::mem::forget(lib);
        }
        let path = super::toolkit_paths::find_lib(lib_dir, "libnvrtc.so")
            .ok_or_else(|| format!("no libnvrtc.so* in {}", lib_dir.display()))?;
        // SAFETY: as above.
        let lib = unsafe { Library::open(Some(&path), RTLD_NOW | RTLD_GLOBAL) }
            .map_err(|e| format!("loading {}: {e}", path.display()))?;
        let lib = libloading::Library::from(lib);
        // SAFETY: each symbol has the C signature NVRTC's header gives (nvrtc.h); the library
        // outlives the pointers (it is kept in the struct).
        unsafe {
            macro_rules! sym {
                ($name:literal) => {
                    *lib.get($name)
                        .map_err(|e| format!("{}: {e}", String::from_utf8_lossy($name)))?
                };
            }
            Ok(Nvrtc {
                version: sym!(b"nvrtcVersion"),
                create: sym!(b"nvrtcCreateProgram"),
                compile: sym!(b"nvrtcCompileProgram"),
                log_size: sym!(b"nvrtcGetProgramLogSize"),
                log: sym!(b"nvrtcGetProgramLog"),
                ptx_size: sym!(b"nvrtcGetPTXSize"),
                ptx: sym!(b"nvrtcGetPTX"),
                cubin_size: sym!(b"nvrtcGetCUBINSize"),
                cubin: sym!(b"nvrtcGetCUBIN"),
                destroy: sym!(b"nvrtcDestroyProgram"),
                _lib: lib,
            })
        }
    }

    fn version_string(&self) -> String {
        let (mut major, mut minor) = (0, 0);
        // SAFETY: two valid out-pointers.
        unsafe { (self.version)(&mut major, &mut minor) };
        format!("{major}.{minor}")
    }

    /// Compiles `source` (named `name`) for `arch`: CUBIN for `sm_XY`, PTX for `compute_XY`.
    fn compile(
        &self,
        name: &str,
        source: &str,
        arch: &str,
        includes: &[&Path],
    ) -> Result<Image, String> {
        let src = CString::new(source).map_err(|_| "source contains NUL".to_string())?;
        let cname = CString::new(name).map_err(|_| "name contains NUL".to_string())?;
        let cubin = arch.starts_with("sm_");
        let mut options = vec![
            format!("--gpu-architecture={arch}"),
            "-std=c++17".to_string(),
            "-default-device".to_string(),
        ];
        options.extend(includes.iter().map(|d| format!("-I{}", d.display())));
        if cubin {
            options.push("--ptxas-options=-v".to_string());
        }
        let options: Vec<CString> = options
            .into_iter()
            .map(|o| CString::new(o).map_err(|_| "option contains NUL".to_string()))
            .collect::<Result<_, _>>()?;
        let option_ptrs: Vec<*const c_char> = options.iter().map(|o| o.as_ptr()).collect();
        let mut prog: *mut c_void = std::ptr::null_mut();
        // SAFETY: NVRTC's C API used as documented: the strings outlive the calls, the buffers are
        // sized by the matching *Size call, the program is destroyed once.
        unsafe {
            let rc = (self.create)(
                &mut prog,
                src.as_ptr(),
                cname.as_ptr(),
                0,
                std::ptr::null(),
                std::ptr::null(),
            );
            if rc != 0 {
                return Err(format!("nvrtcCreateProgram failed ({rc})"));
            }
            let compiled = (self.compile)(prog, option_ptrs.len() as c_int, option_ptrs.as_ptr());
            let mut size = 0usize;
            (self.log_size)(prog, &mut size);
            let mut log = vec![0u8; size.max(1)];
            (self.log)(prog, log.as_mut_ptr() as *mut c_char);
            let log = String::from_utf8_lossy(&log)
                .trim_end_matches('\0')
                .trim_end()
                .to_string();
            let result = if compiled != 0 {
                Err(format!("{name} ({arch}) does not compile:\n{log}"))
            } else {
                let (get_size, get) = if cubin {
                    (self.cubin_size, self.cubin)
                } else {
                    (self.ptx_size, self.ptx)
                };
                let mut size = 0usize;
                get_size(prog, &mut size);
                let mut bytes = vec![0u8; size];
                get(prog, bytes.as_mut_ptr() as *mut c_char);
                if !cubin {
                    // The PTX text ends with its NUL; include_str! wants the text alone.
                    while bytes.last() == Some(&0) {
                        bytes.pop();
                    }
                }
                Ok(Image {
                    file: name.to_string(),
                    arch: arch.to_string(),
                    bytes,
                    log,
                })
            };
            (self.destroy)(&mut prog);
            result
        }
    }
}

/// Every (file, arch) image, compiled in parallel; `Err` with the reason when NVRTC is not found
/// or any file fails (the binary then compiles at run time and reports the error there).
pub fn compile_all(
    repo: &Path,
    kernels: &Path,
    sources: &[PathBuf],
) -> Result<(String, Vec<Image>), String> {
    let (lib_dir, include_dir) =
        super::toolkit_paths::locate(&super::toolkit_paths::candidate_roots(repo))
            .map_err(|looked| format!("NVRTC not found; looked in {}", looked.join(", ")))?;
    let nvrtc = Nvrtc::open(&lib_dir)?;
    let version = format!(
        "NVRTC {} from {}",
        nvrtc.version_string(),
        lib_dir.display()
    );
    let jobs: Vec<(&PathBuf, &str)> = sources
        .iter()
        .flat_map(|src| {
            CUBIN_ARCHS
                .iter()
                .copied()
                .chain([PTX_ARCH])
                .map(move |arch| (src, arch))
        })
        .collect();
    let threads = std::env::var("NUM_JOBS")
        .ok()
        .and_then(|n| n.parse::<usize>().ok())
        .unwrap_or(2)
        .clamp(1, jobs.len().max(1));
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: Vec<Vec<(usize, Result<Image, String>)>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(&(src, arch)) = jobs.get(i) else {
                            break;
                        };
                        let name = src
                            .file_name()
                            .map(|n| n.to_string_lossy().into_owned())
                            .unwrap_or_default();
                        let result = std::fs::read_to_string(src)
                            .map_err(|e| format!("reading {}: {e}", src.display()))
                            .and_then(|text| {
                                nvrtc.compile(&name, &text, arch, &[&include_dir, kernels])
                            });
                        done.push((i, result));
                    }
                    done
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().unwrap_or_default())
            .collect()
    });
    let mut results: Vec<(usize, Result<Image, String>)> = results.into_iter().flatten().collect();
    if results.len() != jobs.len() {
        return Err("an NVRTC worker thread failed".into());
    }
    results.sort_by_key(|(i, _)| *i);
    let images = results
        .into_iter()
        .map(|(_, r)| r)
        .collect::<Result<Vec<_>, _>>()?;
    Ok((version, images))
}
