//! `fastpt bench --baseline`: the same PT steps in PyTorch + PEFT (tools/peft_baseline.py),
//! side by side with fastpt's rows of a bench report. [`check_baseline`] finds the script and
//! checks the interpreter's packages before anything is measured.

use std::path::{Path, PathBuf};

use super::Report;
use crate::error::{Error, Result};

/// The script's path inside the repository.
const SCRIPT: &str = "tools/peft_baseline.py";
/// The Python packages the script imports.
const PACKAGES: [&str; 3] = ["torch", "transformers", "peft"];

/// What `--baseline` runs: the interpreter and the script, both checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaselineTools {
    pub python: String,
    pub script: PathBuf,
}

/// Where tools/peft_baseline.py is: `FASTPT_BASELINE_SCRIPT`, else a `tools/` beside an
/// ancestor of the binary (target/release/fastpt in a checkout), else the checkout the binary
/// was built from, else the working directory. An error lists where it looked.
pub fn find_baseline_script() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("FASTPT_BASELINE_SCRIPT") {
        let path = PathBuf::from(path);
        return match path.is_file() {
            true => Ok(path),
            false => Err(Error::Input(format!(
                "FASTPT_BASELINE_SCRIPT={}: no such file (it names tools/peft_baseline.py)",
                path.display()
            ))),
        };
    }
    let mut tried = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        tried.extend(exe.ancestors().skip(1).map(|dir| dir.join(SCRIPT)));
    }
    tried.push(Path::new(env!("CARGO_MANIFEST_DIR")).join(SCRIPT));
    tried.push(PathBuf::from(SCRIPT));
    if let Some(found) = tried.iter().find(|p| p.is_file()) {
        return Ok(found.clone());
    }
    Err(Error::Input(format!(
        "--baseline runs {SCRIPT}, which is not beside the binary ({}) nor in the checkout it \
         was built from ({}) nor in the working directory: set FASTPT_BASELINE_SCRIPT to it",
        std::env::current_exe()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| "?".into()),
        env!("CARGO_MANIFEST_DIR")
    )))
}

/// Finds the script and checks that the interpreter (`FASTPT_PYTHON`, else `python3`) has
/// torch, transformers and peft, without importing them (a second, not a minute): what
/// `--baseline` needs, before fastpt measures anything.
pub fn check_baseline() -> Result<BaselineTools> {
    let script = find_baseline_script()?;
    let python = std::env::var("FASTPT_PYTHON").unwrap_or_else(|_| "python3".into());
    let code = format!(
        "import importlib.util as u, sys\n\
         missing = [n for n in {PACKAGES:?} if u.find_spec(n) is None]\n\
         print(' '.join(missing))\n\
         sys.exit(1 if missing else 0)"
    );
    let out = std::process::Command::new(&python)
        .args(["-c", &code])
        .output()
        .map_err(|e| {
            Error::Input(format!(
                "--baseline runs {} with {python} (FASTPT_PYTHON picks the interpreter), which \
                 cannot be started: {e}",
                script.display()
            ))
        })?;
    if !out.status.success() {
        let missing = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let why = match missing.is_empty() {
            true => String::from_utf8_lossy(&out.stderr).trim().to_string(),
            false => format!("it lacks {missing}: pip install {missing}"),
        };
        return Err(Error::Input(format!(
            "--baseline runs {} with {python} (FASTPT_PYTHON picks the interpreter): {why}",
            script.display()
        )));
    }
    Ok(BaselineTools { python, script })
}

/// Runs the PEFT script of `tools` for every fastpt `pt` row of `report` (same shape, batch, lengths,
/// steps, prompt length, `seed`; on CUDA when `cuda`) and returns the side-by-side table and the
/// script's reports.
pub fn peft_baseline(
    tools: &BaselineTools,
    report: &Report,
    seed: u64,
    cuda: bool,
) -> Result<(String, serde_json::Value)> {
    let (python, script) = (&tools.python, &tools.script);
    let exe = std::env::current_exe()
        .map_err(|e| Error::Input(format!("finding the fastpt binary: {e}")))?;
    let pt_rows: Vec<_> = report
        .rows
        .iter()
        .filter(|r| r.setting.starts_with("pt"))
        .collect();
    if pt_rows.is_empty() {
        return Err(Error::Input(
            "--baseline compares against fastpt's PT: add --setting pt (or pt:prompt_len=N)".into(),
        ));
    }
    let mut table = String::from(
        "fastpt vs PyTorch + PEFT prompt tuning (ratio < 1: fastpt is faster or smaller)\n\n\
         | shape | prompt rows | fastpt step ms | PEFT step ms | ratio | fastpt generate ms | PEFT generate ms | ratio | fastpt memory MB | PEFT memory MB | ratio |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let mut reports = Vec::new();
    for row in pt_rows {
        eprintln!(
            "bench --baseline: PEFT on {} with {} prompt rows",
            row.shape, row.prompt_rows
        );
        let out = std::process::Command::new(python)
            .arg(script)
            .args(["--shape", &row.shape, "--fastpt"])
            .arg(&exe)
            .args(["--num-virtual-tokens", &row.prompt_rows.to_string()])
            .args(["--batch", &report.batch.to_string()])
            .args(["--input-len", &report.input_len.to_string()])
            .args(["--target-len", &report.target_len.to_string()])
            .args(["--warmup", &report.warmup.to_string()])
            .args(["--steps", &report.steps.to_string()])
            .args(["--seed", &seed.to_string()])
            .args(["--device", if cuda { "cuda" } else { "cpu" }])
            .output()
            .map_err(|e| Error::Input(format!("running {python} {}: {e}", script.display())))?;
        if !out.status.success() {
            return Err(Error::Input(format!(
                "the PEFT baseline failed ({python} {}; it needs torch, transformers and peft; \
                 FASTPT_PYTHON picks the interpreter):\n{}",
                script.display(),
                String::from_utf8_lossy(&out.stderr).trim_end()
            )));
        }
        let json: serde_json::Value = serde_json::from_slice(&out.stdout)
            .map_err(|e| Error::Input(format!("reading the PEFT baseline's JSON: {e}")))?;
        let peft = &json["rows"][0];
        let num = |v: &serde_json::Value| v.as_f64().unwrap_or(f64::NAN);
        let (p_step, p_gen, p_mem) = (
            num(&peft["train_step_ms"]["median"]),
            num(&peft["generate_ms"]["median"]),
            num(&peft["peak_memory_bytes"]) / 1e6,
        );
        let (f_step, f_gen, f_mem) = (
            row.train_step_ms.median,
            row.generate_ms.median,
            row.peak_memory_bytes as f64 / 1e6,
        );
        table.push_str(&format!(
            "| {} | {} | {f_step:.2} | {p_step:.2} | {:.2} | {f_gen:.2} | {p_gen:.2} | {:.2} | {f_mem:.1} | {p_mem:.1} | {:.2} |\n",
            row.shape,
            row.prompt_rows,
            f_step / p_step,
            f_gen / p_gen,
            f_mem / p_mem,
        ));
        reports.push(json);
    }
    let peft_memory = reports
        .first()
        .and_then(|r| r["memory"].as_str())
        .unwrap_or("?");
    table.push_str(&format!(
        "\nfastpt memory: {}; PEFT memory: {peft_memory}\n",
        report.memory
    ));
    Ok((table, serde_json::Value::Array(reports)))
}
