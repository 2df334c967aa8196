//! The kernel images build.rs compiled into the binary (build/kernel_images.rs): CUBIN for sm_80,
//! sm_86, sm_89 and sm_90 and `compute_80` PTX of every kernels/*.cu, each CUBIN with ptxas'
//! resource report. [`CudaDevice`](super::cuda::CudaDevice) loads the CUBIN of the GPU's compute
//! capability, else the PTX, else compiles at run time with NVRTC.
//!
//! Also the readers of what NVRTC produces, for the tests and `fastpt doctor`: ptxas' `-v` report
//! ([`parse_ptxas_report`]), a PTX module's entries and parameters ([`ptx_entries`]), a CUBIN's
//! kernels ([`cubin_kernels`]).

mod generated {
    include!(concat!(env!("OUT_DIR"), "/kernel_images.rs"));
}

/// One embedded image of one kernel file.
#[derive(Debug, Clone, Copy)]
pub struct EmbeddedImage {
    /// `attention.cu`.
    pub file: &'static str,
    /// `sm_90` (CUBIN) or `compute_80` (PTX).
    pub arch: &'static str,
    pub bytes: &'static [u8],
    /// ptxas' `-v` report for a CUBIN (see [`parse_ptxas_report`]); NVRTC's log for PTX.
    pub report: &'static str,
}

impl EmbeddedImage {
    pub fn is_cubin(&self) -> bool {
        self.arch.starts_with("sm_")
    }

    /// The compute capability the image is for: `sm_86` → (8, 6), `compute_80` → (8, 0).
    pub fn capability(&self) -> Option<(i32, i32)> {
        let digits = self
            .arch
            .strip_prefix("sm_")
            .or_else(|| self.arch.strip_prefix("compute_"))?;
        let (major, minor) = digits.split_at(digits.len().checked_sub(1)?);
        Some((major.parse().ok()?, minor.parse().ok()?))
    }
}

/// Every embedded image; empty when the binary was built without NVRTC.
pub fn embedded() -> Vec<EmbeddedImage> {
    generated::KERNEL_IMAGES
        .iter()
        .map(|&(file, arch, bytes, report)| EmbeddedImage {
            file,
            arch,
            bytes,
            report,
        })
        .collect()
}

/// The NVRTC that made the embedded images ("NVRTC 13.0 from /path"), or None.
pub fn nvrtc_used() -> Option<&'static str> {
    Some(generated::NVRTC_USED).filter(|v| !v.is_empty())
}

/// The embedded images of `file` a GPU of compute capability `cc` can load, best first: the CUBIN
/// of its exact capability, else the CUBIN of the same major version with the highest minor not
/// above its own (machine code runs on later minors of its major), then the PTX if the GPU is at
/// least as new as the PTX's target (the driver compiles it).
pub fn candidates(file: &str, cc: (i32, i32)) -> Vec<EmbeddedImage> {
    candidates_in(&embedded(), file, cc)
}

/// [`candidates`] among `images`.
fn candidates_in(images: &[EmbeddedImage], file: &str, cc: (i32, i32)) -> Vec<EmbeddedImage> {
    let of_file: Vec<EmbeddedImage> = images.iter().filter(|i| i.file == file).copied().collect();
    let mut cubins: Vec<(EmbeddedImage, (i32, i32))> = of_file
        .iter()
        .filter(|i| i.is_cubin())
        .filter_map(|i| Some((*i, i.capability()?)))
        .filter(|(_, c)| c.0 == cc.0 && c.1 <= cc.1)
        .collect();
    // The exact match first, then lower minors from the highest down.
    cubins.sort_by_key(|(_, c)| std::cmp::Reverse(c.1));
    let mut out: Vec<EmbeddedImage> = cubins.into_iter().map(|(i, _)| i).collect();
    out.extend(
        of_file
            .iter()
            .filter(|i| !i.is_cubin() && i.capability().is_some_and(|c| c <= cc))
            .copied(),
    );
    out
}

/// ptxas' resource report of one kernel (`--ptxas-options=-v`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelResources {
    pub kernel: String,
    /// `sm_90`.
    pub arch: String,
    pub registers: u32,
    /// Static shared memory in bytes.
    pub smem: u32,
    /// Stack frame (local memory) in bytes.
    pub stack: u32,
    pub spill_stores: u32,
    pub spill_loads: u32,
}

/// Reads ptxas' `-v` report: for every entry, "Compiling entry function 'K' for 'sm_90'", then
/// "N bytes stack frame, N bytes spill stores, N bytes spill loads" and "Used N registers, used N
/// barriers, N bytes smem". A kernel whose report lacks the "Used" line is not listed.
pub fn parse_ptxas_report(report: &str) -> Vec<KernelResources> {
    let mut out = Vec::new();
    let mut current: Option<KernelResources> = None;
    // The number before `unit` in a comma-separated list: "0 bytes spill stores" → 0.
    let figure = |line: &str, unit: &str| -> Option<u32> {
        line.split(',').find_map(|part| {
            let part = part.trim();
            let rest = part.strip_suffix(unit)?.trim();
            rest.rsplit(' ').next()?.parse().ok()
        })
    };
    for line in report.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            if let Some(done) = current.take() {
                out.push(done);
            }
            let mut parts = rest.split('\'');
            let kernel = parts.next().unwrap_or_default().to_string();
            let arch = parts.nth(1).unwrap_or_default().to_string();
            current = Some(KernelResources {
                kernel,
                arch,
                ..KernelResources::default()
            });
            continue;
        }
        let Some(k) = current.as_mut() else { continue };
        if line.contains("bytes stack frame") {
            k.stack = figure(line, "bytes stack frame").unwrap_or(0);
            k.spill_stores = figure(line, "bytes spill stores").unwrap_or(0);
            k.spill_loads = figure(line, "bytes spill loads").unwrap_or(0);
        } else if let Some(used) = line.split("Used ").nth(1) {
            k.registers = figure(used, "registers").unwrap_or(0);
            k.smem = figure(used, "bytes smem").unwrap_or(0);
            out.push(current.take().unwrap_or_default());
        }
    }
    out
}

/// One `.entry` of a PTX module and the kinds of its parameters in order: `"u64"`, `"u32"`,
/// `"f32"`, ... (the type after `.param`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PtxEntry {
    pub name: String,
    pub params: Vec<String>,
}

/// The `.entry` directives of a PTX module with their parameter types.
pub fn ptx_entries(ptx: &str) -> Vec<PtxEntry> {
    let mut out = Vec::new();
    let mut lines = ptx.lines();
    while let Some(line) = lines.next() {
        let Some(rest) = line.trim_start().strip_prefix(".visible .entry ") else {
            continue;
        };
        let name = rest
            .split(['(', ' '])
            .next()
            .unwrap_or_default()
            .trim()
            .to_string();
        let mut params = Vec::new();
        // Parameters follow one per line until the closing parenthesis.
        let mut text = rest
            .split_once('(')
            .map(|(_, p)| p.to_string())
            .unwrap_or_default();
        while !text.contains(')') {
            match lines.next() {
                Some(next) => {
                    text.push('\n');
                    text.push_str(next);
                }
                None => break,
            }
        }
        let text = text.split(')').next().unwrap_or_default();
        for param in text.split(',') {
            let mut words = param.split_whitespace();
            if words.next() == Some(".param") {
                if let Some(ty) = words.next() {
                    params.push(ty.trim_start_matches('.').to_string());
                }
            }
        }
        out.push(PtxEntry { name, params });
    }
    out
}

/// The PTX parameter type a kernel parameter of `kind` (see `vgpu::KernelInfo::signature`) has:
/// pointers and longs are 64-bit, ints 32-bit, floats `.f32`. PTX writes ints as `u32` or `s32`.
pub fn ptx_type_matches(kind: char, ptx_type: &str) -> bool {
    match kind {
        'p' | 'l' => matches!(ptx_type, "u64" | "b64" | "s64"),
        'i' | 'u' => matches!(ptx_type, "u32" | "b32" | "s32"),
        'f' => ptx_type == "f32",
        _ => false,
    }
}

/// The kernels a CUBIN (an ELF file) holds: the names of its `.text.<kernel>` sections. Empty for
/// anything that is not a well-formed 64-bit little-endian ELF.
pub fn cubin_kernels(elf: &[u8]) -> Vec<String> {
    let read = |at: usize, len: usize| -> Option<u64> {
        let bytes = elf.get(at..at.checked_add(len)?)?;
        Some(
            bytes
                .iter()
                .rev()
                .fold(0u64, |acc, &b| (acc << 8) | u64::from(b)),
        )
    };
    let sections = || -> Option<Vec<String>> {
        if elf.get(0..4)? != b"\x7fELF" || *elf.get(4)? != 2 || *elf.get(5)? != 1 {
            return None;
        }
        let shoff = usize::try_from(read(0x28, 8)?).ok()?;
        let shentsize = usize::try_from(read(0x3a, 2)?).ok()?;
        let shnum = usize::try_from(read(0x3c, 2)?).ok()?;
        let shstrndx = usize::try_from(read(0x3e, 2)?).ok()?;
        let header = |i: usize| shoff.checked_add(i.checked_mul(shentsize)?);
        let strtab = usize::try_from(read(header(shstrndx)?.checked_add(0x18)?, 8)?).ok()?;
        let mut names = Vec::new();
        for i in 0..shnum {
            let name_off = usize::try_from(read(header(i)?, 4)?).ok()?;
            let start = strtab.checked_add(name_off)?;
            let tail = elf.get(start..)?;
            let end = tail.iter().position(|&b| b == 0)?;
            let name = String::from_utf8_lossy(&tail[..end]).into_owned();
            if let Some(kernel) = name.strip_prefix(".text.") {
                names.push(kernel.to_string());
            }
        }
        Some(names)
    };
    let mut names = sections().unwrap_or_default();
    names.sort();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ptxas_report_is_read_per_kernel() {
        let report = "ptxas info    : 0 bytes gmem\n\
            ptxas info    : Compiling entry function 'a_bf16' for 'sm_90'\n\
            ptxas info    : Function properties for a_bf16\n\
            ptxas         .     16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads\n\
            ptxas info    : Used 40 registers, used 1 barriers, 2048 bytes smem\n\
            ptxas info    : Compile time = 5.7 ms\n\
            ptxas info    : Compiling entry function 'b_f32' for 'sm_80'\n\
            ptxas info    : Function properties for b_f32\n\
            ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
            ptxas info    : Used 8 registers\n";
        let got = parse_ptxas_report(report);
        assert_eq!(
            got,
            vec![
                KernelResources {
                    kernel: "a_bf16".into(),
                    arch: "sm_90".into(),
                    registers: 40,
                    smem: 2048,
                    stack: 16,
                    spill_stores: 8,
                    spill_loads: 4,
                },
                KernelResources {
                    kernel: "b_f32".into(),
                    arch: "sm_80".into(),
                    registers: 8,
                    ..KernelResources::default()
                },
            ]
        );
    }

    #[test]
    fn ptx_entries_list_parameter_types() {
        let ptx = "//\n.version 9.0\n.visible .entry add_f32(\n\t.param .u64 .ptr .align 1 add_f32_param_0,\n\
                   \t.param .u32 add_f32_param_1,\n\t.param .f32 add_f32_param_2\n)\n{\n}\n\
                   .visible .entry none_f32()\n{\n}\n";
        assert_eq!(
            ptx_entries(ptx),
            vec![
                PtxEntry {
                    name: "add_f32".into(),
                    params: vec!["u64".into(), "u32".into(), "f32".into()],
                },
                PtxEntry {
                    name: "none_f32".into(),
                    params: vec![],
                },
            ]
        );
        assert!(ptx_type_matches('p', "u64") && !ptx_type_matches('p', "u32"));
        assert!(ptx_type_matches('i', "s32") && !ptx_type_matches('i', "f32"));
    }

    #[test]
    fn capability_and_candidates_order() {
        let image = |arch| EmbeddedImage {
            file: "x.cu",
            arch,
            bytes: &[],
            report: "",
        };
        assert_eq!(image("sm_86").capability(), Some((8, 6)));
        assert_eq!(image("compute_80").capability(), Some((8, 0)));
        assert_eq!(image("sm_100").capability(), Some((10, 0)));
        assert_eq!(image("bogus").capability(), None);
        let images: Vec<EmbeddedImage> = ["sm_80", "sm_86", "sm_89", "sm_90", "compute_80"]
            .into_iter()
            .map(image)
            .collect();
        let order = |cc| -> Vec<&str> {
            candidates_in(&images, "x.cu", cc)
                .iter()
                .map(|i| i.arch)
                .collect()
        };
        assert_eq!(order((9, 0)), ["sm_90", "compute_80"]);
        assert_eq!(order((8, 7)), ["sm_86", "sm_80", "compute_80"]);
        assert_eq!(order((8, 9)), ["sm_89", "sm_86", "sm_80", "compute_80"]);
        assert_eq!(order((10, 0)), ["compute_80"]);
        assert!(order((7, 5)).is_empty());
        assert!(candidates_in(&images, "y.cu", (9, 0)).is_empty());
    }

    #[test]
    fn cubin_kernels_of_garbage_is_empty() {
        assert!(cubin_kernels(b"").is_empty());
        assert!(cubin_kernels(b"\x7fELF\x02\x01\x01").is_empty());
        assert!(cubin_kernels(&[0xff; 200]).is_empty());
    }
}
