//! The kernels as a GPU gets them, checked without a GPU:
//! - build.rs embedded CUBIN for sm_80, sm_86, sm_89 and sm_90 and `compute_80` PTX of every
//!   kernel file, each holding exactly the kernels the virtual GPU registered from that file;
//! - ptxas' resource report of every kernel passes the gates: no spills and no stack (local
//!   memory), registers × its block size within the 65,536 registers of an SM, static shared
//!   memory within 48 KiB, static + dynamic shared memory (at the widest head, FLASH_MAX_D) within
//!   the GPU's per-block maximum, no warnings;
//! - every kernel's PTX parameter list matches its declaration (which the virtual GPU checks
//!   every launch against), so a launch site that passes arguments in the wrong order or width
//!   fails a test;
//! - every file compiles for sm_75 too (tensor-core code guarded out) and passes the same gates;
//! - the resource table in docs/kernels.md is the one this NVRTC produces.
//!
//! The images need NVRTC at build time: `bash tools/nvrtc-venv.sh` before `cargo test` (the
//! README's test command does it).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use fastpt::backend::gpu::images::{self, EmbeddedImage, KernelResources};
use fastpt::backend::gpu::nvrtc::{self, CudaToolkit};
use fastpt::backend::gpu::vgpu::{self, KernelInfo};
use fastpt::backend::gpu::{dynamic_smem_bytes, FLASH_MAX_D};

/// The targets build.rs embeds.
const EMBEDDED_ARCHS: [&str; 5] = ["sm_80", "sm_86", "sm_89", "sm_90", "compute_80"];

/// Shared memory one block may use (static + dynamic, with the opt-in attribute) per GPU
/// generation, from the CUDA programming guide's table of compute capabilities.
fn max_smem_per_block(arch: &str) -> usize {
    match arch {
        "sm_75" => 64 << 10,
        "sm_80" => 163 << 10,
        "sm_86" | "sm_89" => 99 << 10,
        "sm_90" => 227 << 10,
        other => panic!("no shared-memory limit known for {other}"),
    }
}
/// Registers of one SM, the same on every GPU here.
const REGISTERS_PER_SM: usize = 65_536;
/// Static shared memory without the opt-in, on every GPU.
const MAX_STATIC_SMEM: usize = 48 << 10;

fn embedded_or_explain() -> Vec<EmbeddedImage> {
    let found = images::embedded();
    assert!(
        !found.is_empty(),
        "this build embeds no kernel images: build.rs found no NVRTC. Run `bash \
         tools/nvrtc-venv.sh` in the repository root (or set FASTPT_CUDA_HOME to a CUDA toolkit), \
         then `touch build.rs` and test again."
    );
    found
}

/// The virtual GPU's kernels of one file, by name.
fn kernels_of(file: &str) -> BTreeMap<String, KernelInfo> {
    vgpu::kernels()
        .into_iter()
        .filter(|k| k.file == file)
        .map(|k| (k.name.clone(), k))
        .collect()
}

/// The op name a launch site uses: the kernel name without its dtype suffix.
fn op_of(kernel: &str) -> &str {
    kernel
        .strip_suffix("_f32")
        .or_else(|| kernel.strip_suffix("_bf16"))
        .unwrap_or(kernel)
}

#[test]
fn embedded_images_hold_every_kernel_for_every_arch() {
    let found = embedded_or_explain();
    eprintln!(
        "{} images from {}",
        found.len(),
        images::nvrtc_used().unwrap_or("?")
    );
    let mut problems = Vec::new();
    let mut total = 0usize;
    for file in nvrtc::kernel_files() {
        let want: Vec<String> = kernels_of(file).into_keys().collect();
        assert!(
            !want.is_empty(),
            "{file}: the virtual GPU has no kernel of it"
        );
        for arch in EMBEDDED_ARCHS {
            let Some(image) = found.iter().find(|i| i.file == file && i.arch == arch) else {
                problems.push(format!("{file}: no {arch} image"));
                continue;
            };
            total += image.bytes.len();
            let mut have = if image.is_cubin() {
                images::cubin_kernels(image.bytes)
            } else {
                let text = std::str::from_utf8(image.bytes).unwrap_or("");
                images::ptx_entries(text)
                    .into_iter()
                    .map(|e| e.name)
                    .collect()
            };
            have.sort();
            eprintln!(
                "{file:<14} {arch:<10} {:>9} bytes, {:>2} kernels",
                image.bytes.len(),
                have.len()
            );
            if have != want {
                problems.push(format!(
                    "{file} {arch}: kernels {have:?}, the virtual GPU has {want:?}"
                ));
            }
        }
    }
    eprintln!(
        "{:.1} MB of kernel images in the binary",
        total as f64 / 1e6
    );
    assert!(problems.is_empty(), "\n{}\n", problems.join("\n"));
}

/// The gates of one arch's reports: the problems found, and every kernel's resources.
fn gate(arch: &str, reports: &[(&str, &str)]) -> (Vec<String>, Vec<KernelResources>) {
    let mut problems = Vec::new();
    let mut all = Vec::new();
    for &(file, report) in reports {
        for line in report.lines() {
            let line = line.trim();
            if !(line.is_empty() || line.starts_with("ptxas info") || line.starts_with("ptxas   "))
            {
                problems.push(format!("{file} ({arch}): {line}"));
            }
        }
        let resources = images::parse_ptxas_report(report);
        for (name, info) in kernels_of(file) {
            let Some(r) = resources.iter().find(|r| r.kernel == name) else {
                problems.push(format!("{name} ({arch}): not in ptxas' report"));
                continue;
            };
            let block = info.block as usize;
            let dynamic = dynamic_smem_bytes(op_of(&name), FLASH_MAX_D);
            let smem = r.smem as usize;
            let mut fail = |what: String| problems.push(format!("{name} ({arch}): {what}"));
            if r.spill_stores > 0 || r.spill_loads > 0 {
                fail(format!(
                    "spills ({} bytes stored, {} loaded)",
                    r.spill_stores, r.spill_loads
                ));
            }
            if r.stack > 0 {
                fail(format!("{} bytes of stack (local memory)", r.stack));
            }
            if r.registers as usize * block > REGISTERS_PER_SM {
                fail(format!(
                    "{} registers × {block} threads > {REGISTERS_PER_SM}",
                    r.registers
                ));
            }
            if smem > MAX_STATIC_SMEM {
                fail(format!("{smem} bytes of static shared memory > 48 KiB"));
            }
            if smem + dynamic > max_smem_per_block(arch) {
                fail(format!(
                    "{smem} static + {dynamic} dynamic bytes of shared memory (D = {FLASH_MAX_D}) > \
                     {} KiB",
                    max_smem_per_block(arch) >> 10
                ));
            }
            all.push(r.clone());
        }
    }
    (problems, all)
}

#[test]
fn ptxas_gates_hold_for_every_embedded_cubin() {
    let found = embedded_or_explain();
    let mut problems = Vec::new();
    let mut by_arch: BTreeMap<&str, Vec<KernelResources>> = BTreeMap::new();
    for arch in ["sm_80", "sm_86", "sm_89", "sm_90"] {
        let reports: Vec<(&str, &str)> = found
            .iter()
            .filter(|i| i.arch == arch)
            .map(|i| (i.file, i.report))
            .collect();
        assert!(!reports.is_empty(), "no {arch} images");
        let (p, resources) = gate(arch, &reports);
        problems.extend(p);
        by_arch.insert(arch, resources);
    }
    let table = resource_table(&by_arch["sm_80"], &by_arch["sm_90"]);
    eprintln!("{table}");
    assert!(problems.is_empty(), "\n{}\n", problems.join("\n"));
    docs_table_is_current(&table);
}

#[test]
fn every_kernel_compiles_for_sm75_and_passes_the_gates() {
    let toolkit = CudaToolkit::find().unwrap_or_else(|e| {
        panic!("{e}\n\nThis test needs NVRTC: run `bash tools/nvrtc-venv.sh`.")
    });
    let files = nvrtc::kernel_files();
    // In parallel: NVRTC is thread-safe and attention.cu takes seconds.
    let compiled: Vec<(&str, Result<nvrtc::Cubin, String>)> = std::thread::scope(|s| {
        let handles: Vec<_> = files
            .iter()
            .map(|&file| {
                let toolkit = &toolkit;
                s.spawn(move || {
                    let source = nvrtc::kernel_source(file);
                    let r = nvrtc::compile_cubin(toolkit, file, &source, "sm_75")
                        .map_err(|e| e.to_string());
                    (file, r)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("compile thread"))
            .collect()
    });
    let mut problems = Vec::new();
    let mut reports = Vec::new();
    for (file, r) in &compiled {
        match r {
            Err(e) => problems.push(format!("{file} does not compile for sm_75:\n{e}")),
            Ok(c) => {
                let mut have = images::cubin_kernels(&c.cubin);
                have.sort();
                let want: Vec<String> = kernels_of(file).into_keys().collect();
                if have != want {
                    problems.push(format!("{file} sm_75: kernels {have:?}, want {want:?}"));
                }
                reports.push((*file, c.report.as_str()));
            }
        }
    }
    let (gates, resources) = gate("sm_75", &reports);
    problems.extend(gates);
    // The tensor-core kernels are traps there: no mma, no shared tiles.
    for r in resources.iter().filter(|r| r.kernel.contains("_tc_")) {
        if r.smem > 0 {
            problems.push(format!(
                "{} (sm_75): {} bytes of shared memory: the tensor-core code was not guarded out",
                r.kernel, r.smem
            ));
        }
    }
    assert!(problems.is_empty(), "\n{}\n", problems.join("\n"));
}

#[test]
fn ptx_parameters_match_the_kernel_declarations() {
    let found = embedded_or_explain();
    let mut problems = Vec::new();
    let mut checked = 0;
    for image in found.iter().filter(|i| i.arch == "compute_80") {
        let text = std::str::from_utf8(image.bytes).expect("PTX is text");
        let declared = kernels_of(image.file);
        for entry in images::ptx_entries(text) {
            let Some(info) = declared.get(&entry.name) else {
                problems.push(format!(
                    "{}: {} is not a declared kernel",
                    image.file, entry.name
                ));
                continue;
            };
            let kinds: Vec<char> = info.signature.chars().collect();
            let matches = kinds.len() == entry.params.len()
                && kinds
                    .iter()
                    .zip(&entry.params)
                    .all(|(&k, t)| images::ptx_type_matches(k, t));
            if !matches {
                problems.push(format!(
                    "{}: PTX parameters {:?}, declared ({})",
                    entry.name, entry.params, info.signature
                ));
            }
            checked += 1;
        }
    }
    assert_eq!(
        checked,
        vgpu::kernels().len(),
        "not every kernel's PTX entry was checked"
    );
    assert!(problems.is_empty(), "\n{}\n", problems.join("\n"));
}

/// The resource table of docs/kernels.md: one row per op, f32 / bf16 instances side by side.
fn resource_table(sm80: &[KernelResources], sm90: &[KernelResources]) -> String {
    let kernels = vgpu::kernels();
    let find = |set: &[KernelResources], name: &str| set.iter().find(|r| r.kernel == name).cloned();
    let mut ops: BTreeMap<String, Vec<&KernelInfo>> = BTreeMap::new();
    for k in &kernels {
        ops.entry(op_of(&k.name).to_string()).or_default().push(k);
    }
    let mut s = String::from(
        "| kernel (f32 / bf16) | file | block | registers sm_80 | registers sm_90 | static smem | \
         dynamic smem at D = 128 |\n|---|---|---:|---:|---:|---:|---:|\n",
    );
    for (op, instances) in &ops {
        let pair = |set: &[KernelResources], f: fn(&KernelResources) -> u32| {
            instances
                .iter()
                .map(|k| find(set, &k.name).map_or("?".into(), |r| f(&r).to_string()))
                .collect::<Vec<_>>()
                .join(" / ")
        };
        let dynamic = dynamic_smem_bytes(op, FLASH_MAX_D);
        let _ = writeln!(
            s,
            "| `{op}` | {} | {} | {} | {} | {} | {} |",
            instances[0].file,
            instances[0].block,
            pair(sm80, |r| r.registers),
            pair(sm90, |r| r.registers),
            pair(sm90, |r| r.smem),
            if dynamic > 0 {
                dynamic.to_string()
            } else {
                "–".into()
            }
        );
    }
    s
}

const TABLE_START: &str = "<!-- resource table: generated by tests/kernel_images.rs";
const TABLE_END: &str = "<!-- end of resource table -->";

/// docs/kernels.md holds `table` between the markers when the images come from the NVRTC the
/// docs name (the registers depend on the compiler); `FASTPT_BLESS=1` rewrites it.
fn docs_table_is_current(table: &str) {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/kernels.md");
    let docs = std::fs::read_to_string(path).expect("docs/kernels.md");
    let start = docs
        .find(TABLE_START)
        .expect("docs/kernels.md has the table's start marker");
    let header_end = start + docs[start..].find("-->").expect("marker closes") + 3;
    let end = docs
        .find(TABLE_END)
        .expect("docs/kernels.md has the table's end marker");
    let marker = &docs[start..header_end];
    let nvrtc_in_docs = marker
        .split("NVRTC ")
        .nth(1)
        .and_then(|v| v.split_whitespace().next())
        .unwrap_or("");
    let used = images::nvrtc_used().unwrap_or("");
    let used_version = used
        .strip_prefix("NVRTC ")
        .and_then(|v| v.split_whitespace().next())
        .unwrap_or("");
    let current = &docs[header_end..end];
    let want = format!("\n{table}");
    if std::env::var("FASTPT_BLESS").is_ok_and(|v| v == "1") {
        let new_marker = format!("{TABLE_START}, NVRTC {used_version} -->");
        let updated = format!("{}{new_marker}{want}{}", &docs[..start], &docs[end..]);
        std::fs::write(path, updated).expect("writing docs/kernels.md");
        return;
    }
    if nvrtc_in_docs != used_version {
        eprintln!(
            "note: docs/kernels.md's table is from NVRTC {nvrtc_in_docs}, these images from \
             NVRTC {used_version}: not compared"
        );
        return;
    }
    assert_eq!(
        current.trim(),
        want.trim(),
        "docs/kernels.md's resource table is out of date: rerun this test with FASTPT_BLESS=1"
    );
}

/// The PTX cache round trip: compiled into a folder, then found there without NVRTC (as on a GPU
/// machine that has only the cached PTX).
#[test]
fn cached_ptx_is_found_without_nvrtc() {
    let toolkit = CudaToolkit::find().unwrap_or_else(|e| {
        panic!("{e}\n\nThis test needs NVRTC: run `bash tools/nvrtc-venv.sh`.")
    });
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
