//! What measured a report: the device (GPU name, driver, clocks at the start and the end of the
//! run; or the CPU model, cores and SIMD level) and the commit, so that two reports from two
//! machines are never mixed up. On a GPU it also holds the GEMM peak and copy bandwidth the bench
//! measures itself, which MFU (and any bandwidth fraction) divide by.

use std::path::Path;
use std::process::Command;

use serde::Serialize;

use super::BenchClock;

/// The machine a report comes from.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Machine {
    /// The git commit of the build (see [`commit`]).
    pub commit: String,
    /// The backend's name: "cpu-f32", "cuda:0 NVIDIA H200 (sm_90) bf16", ...
    pub device: String,
    /// Driver, compute capability, memory (GPU); empty on the CPU.
    pub device_facts: Vec<String>,
    /// `nvidia-smi`'s name, driver, SM and memory clocks (MHz), temperature and power at the
    /// start and at the end of the run; None off a GPU or without nvidia-smi.
    pub gpu_start: Option<String>,
    pub gpu_end: Option<String>,
    /// The host CPU: model name, logical cores this process may use, SIMD level.
    pub cpu: String,
    pub cores: usize,
    pub simd: String,
    /// Measured GEMM throughput (TFLOP/s) that MFU divides by; None off a GPU.
    pub gemm_peak_tflops: Option<f64>,
    /// Measured device-to-device copy bandwidth (GB/s, read + written); None off a GPU.
    pub copy_bandwidth_gbs: Option<f64>,
}

impl Machine {
    /// Probes the host and `be` (on a GPU this runs the GEMM and copy measurements, a few
    /// seconds); `built_commit` is the commit the binary was built at, when the build knew it.
    pub fn probe<B: BenchClock>(be: &B, built_commit: Option<&str>) -> Self {
        let gpu = be.name().starts_with("cuda");
        Machine {
            commit: commit(built_commit),
            device: be.name(),
            device_facts: be.device_facts(),
            gpu_start: gpu.then(nvidia_smi).flatten(),
            gpu_end: None,
            cpu: cpu_model(),
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            simd: simd_level(),
            gemm_peak_tflops: be.gemm_peak_tflops(),
            copy_bandwidth_gbs: be.copy_bandwidth_gbs(),
        }
    }

    /// Records the GPU's state at the end of the run (clocks fall when a GPU heats up).
    pub fn finish(&mut self) {
        if self.gpu_start.is_some() {
            self.gpu_end = nvidia_smi();
        }
    }

    /// One line for the top of a table.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "{} on {} ({} cores, {}), commit {}",
            self.device, self.cpu, self.cores, self.simd, self.commit
        );
        if let Some(g) = &self.gpu_start {
            s.push_str(&format!("; GPU at start: {g}"));
        }
        if let Some(g) = &self.gpu_end {
            s.push_str(&format!("; at end: {g}"));
        }
        if let Some(p) = self.gemm_peak_tflops {
            s.push_str(&format!("; measured GEMM peak {p:.1} TFLOP/s"));
        }
        if let Some(b) = self.copy_bandwidth_gbs {
            s.push_str(&format!(", copy bandwidth {b:.0} GB/s"));
        }
        s
    }
}

/// The commit: `$FASTPT_COMMIT` when set, else the one the binary was built at (`FASTPT_COMMIT`
/// in the build's environment), else `git rev-parse` in the checkout the binary was built from
/// (with `-dirty` when it has changes), else "unknown".
pub fn commit(built_commit: Option<&str>) -> String {
    if let Ok(c) = std::env::var("FASTPT_COMMIT") {
        if !c.trim().is_empty() {
            return c.trim().to_string();
        }
    }
    if let Some(c) = built_commit.filter(|c| !c.trim().is_empty()) {
        return c.trim().to_string();
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(root)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
    };
    match git(&["rev-parse", "--short=12", "HEAD"]) {
        Some(out) => {
            let hash = String::from_utf8_lossy(&out.stdout).trim().to_string();
            let dirty = git(&["status", "--porcelain", "--untracked-files=no"])
                .is_some_and(|o| !o.stdout.is_empty());
            if dirty {
                format!("{hash}-dirty")
            } else {
                hash
            }
        }
        None => "unknown".into(),
    }
}

/// The CPU's model name (Linux: /proc/cpuinfo), else the architecture.
fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("model name") || l.starts_with("Model"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

/// The widest vector instructions the CPU has (what the `gemm` crate picks at run time).
fn simd_level() -> String {
    #[cfg(target_arch = "x86_64")]
    {
        let level = if std::arch::is_x86_feature_detected!("avx512f") {
            "AVX-512"
        } else if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
        {
            "AVX2+FMA"
        } else if std::arch::is_x86_feature_detected!("avx") {
            "AVX"
        } else {
            "SSE2"
        };
        level.to_string()
    }
    #[cfg(target_arch = "aarch64")]
    {
        "NEON".to_string()
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        "scalar".to_string()
    }
}

/// A read-only `nvidia-smi` query of every visible GPU (name, driver, clocks, temperature,
/// power); None when it is missing or fails.
fn nvidia_smi() -> Option<String> {
    let out = Command::new("nvidia-smi")
        .args([
            "--query-gpu=name,driver_version,clocks.sm,clocks.mem,clocks.max.sm,temperature.gpu,power.draw",
            "--format=csv,noheader",
        ])
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<String> = text
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split(',').map(str::trim).collect();
            match f.as_slice() {
                [name, driver, sm, mem, max_sm, temp, power] => format!(
                    "{name}, driver {driver}, SM {sm} (max {max_sm}), memory {mem}, {temp} °C, {power}"
                ),
                _ => l.trim().to_string(),
            }
        })
        .filter(|l| !l.is_empty())
        .collect();
    (!lines.is_empty()).then(|| lines.join(" | "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cpu_machine_names_its_model_cores_simd_and_commit() {
        let be = crate::backend::cpu::CpuBackend::<f32>::new();
        let m = Machine::probe(&be, Some("abc123"));
        assert_eq!(m.device, "cpu-f32");
        assert!(
            !m.cpu.is_empty() && m.cores >= 1 && !m.simd.is_empty(),
            "{m:?}"
        );
        assert!(m.gpu_start.is_none() && m.gemm_peak_tflops.is_none());
        // The build's commit unless FASTPT_COMMIT overrides it.
        if std::env::var("FASTPT_COMMIT").is_err() {
            assert_eq!(m.commit, "abc123");
        }
        let line = m.summary();
        assert!(line.contains("cpu-f32") && line.contains(&m.simd), "{line}");
        // Without a built commit, git names this checkout (or the test runs outside one).
        let c = commit(None);
        assert!(!c.is_empty(), "{c}");
    }
}
