//! `fastpt bench --baseline`: the same PT steps in PyTorch + PEFT (tools/peft_baseline.py),
//! run as a [`PeftCell`] in the same interleaved rounds as fastpt's cells and put side by side
//! with fastpt's `pt` rows ([`baseline_table`]). [`check_baseline`] finds the script and checks
//! the interpreter's packages before anything is measured.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};

use super::{report_header, BenchConfig, Change, External, ExternalInfo, Report, RoundTimes};
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
    let out = Command::new(&python)
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

/// The longest line the script may print (its JSON replies are a few hundred bytes).
const MAX_REPLY_BYTES: u64 = 1 << 20;
/// How much of the script's stderr an error quotes.
const STDERR_TAIL: usize = 4000;

/// The PEFT script as a cell of the bench's rounds: one process per fastpt `pt` setting and
/// shape, started (model built, warmed up) before the rounds; each round sends it `round` on
/// stdin and reads one JSON line of per-step times, so PyTorch and fastpt alternate and drift
/// hits both alike. `finish` asks for its peak memory and ends it.
pub struct PeftCell {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    /// What the process wrote to stderr so far (the last [`STDERR_TAIL`] bytes).
    stderr: Arc<Mutex<String>>,
    setting: String,
    prompt_rows: usize,
    what: String,
}

impl PeftCell {
    /// Starts the script for `prompt_rows` prompt rows at `shape` with `cfg`'s batch, lengths,
    /// steps and seed, and waits until it is warmed up.
    pub fn start(
        tools: &BaselineTools,
        shape: &str,
        pt_setting: &str,
        prompt_rows: usize,
        cfg: &BenchConfig,
        cuda: bool,
    ) -> Result<Self> {
        let (python, script) = (&tools.python, &tools.script);
        let what = format!("the PEFT baseline ({python} {})", script.display());
        let exe = std::env::current_exe()
            .map_err(|e| Error::Input(format!("finding the fastpt binary: {e}")))?;
        let mut child = Command::new(python)
            .arg(script)
            .arg("--serve")
            .args(["--shape", shape, "--fastpt"])
            .arg(&exe)
            .args(["--num-virtual-tokens", &prompt_rows.to_string()])
            .args(["--batch", &cfg.batch.to_string()])
            .args(["--input-len", &cfg.input_len.to_string()])
            .args(["--target-len", &cfg.target_len.to_string()])
            .args(["--warmup", &cfg.warmup.to_string()])
            .args(["--steps", &cfg.steps.to_string()])
            .args(["--seed", &cfg.seed.to_string()])
            .args(["--device", if cuda { "cuda" } else { "cpu" }])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| Error::Input(format!("starting {what}: {e}")))?;
        let (Some(stdin), Some(stdout), Some(mut err)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            let _ = child.kill();
            return Err(Error::Input(format!("{what}: no pipes to the process")));
        };
        // Drained on a thread: a full stderr pipe would stop the script.
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = Arc::clone(&stderr);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                if let Ok(mut text) = sink.lock() {
                    text.push_str(&String::from_utf8_lossy(&buf[..n]));
                    if text.len() > 2 * STDERR_TAIL {
                        let cut = text.len() - STDERR_TAIL;
                        let cut = (cut..text.len())
                            .find(|&i| text.is_char_boundary(i))
                            .unwrap_or(text.len());
                        text.drain(..cut);
                    }
                }
            }
        });
        let mut cell = PeftCell {
            child,
            stdin: Some(stdin),
            stdout: BufReader::new(stdout),
            stderr,
            setting: format!("peft:{pt_setting}"),
            prompt_rows,
            what,
        };
        let ready = cell.reply()?;
        if ready["ready"] != true {
            return Err(cell.fail(&format!("expected its ready line, got {ready}")));
        }
        Ok(cell)
    }

    /// An error naming the process, with the end of its stderr.
    fn fail(&mut self, why: &str) -> Error {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Give the drain thread a moment to take the last of stderr.
        std::thread::sleep(std::time::Duration::from_millis(50));
        let tail = self.stderr.lock().map(|t| t.clone()).unwrap_or_default();
        Error::Input(format!(
            "{} failed: {why} (it needs torch, transformers and peft; FASTPT_PYTHON picks the \
             interpreter){}",
            self.what,
            if tail.trim().is_empty() {
                String::new()
            } else {
                format!(":\n{}", tail.trim_end())
            }
        ))
    }

    fn send(&mut self, command: &str) -> Result<()> {
        let sent = match self.stdin.as_mut() {
            Some(stdin) => writeln!(stdin, "{command}").and_then(|_| stdin.flush()),
            None => Err(std::io::Error::other("stdin closed")),
        };
        sent.map_err(|e| self.fail(&format!("sending {command:?}: {e}")))
    }

    /// The next JSON line on its stdout.
    fn reply(&mut self) -> Result<serde_json::Value> {
        let mut line = String::new();
        let read = (&mut self.stdout)
            .take(MAX_REPLY_BYTES)
            .read_line(&mut line);
        match read {
            Ok(0) => Err(self.fail("it exited")),
            Err(e) => Err(self.fail(&format!("reading its reply: {e}"))),
            Ok(_) => serde_json::from_str(line.trim())
                .map_err(|e| self.fail(&format!("its reply is not JSON ({e}): {line:.200}"))),
        }
    }
}

impl External for PeftCell {
    fn setting(&self) -> String {
        self.setting.clone()
    }

    fn prompt_rows(&self) -> usize {
        self.prompt_rows
    }

    fn round(&mut self) -> Result<RoundTimes> {
        self.send("round")?;
        let r = self.reply()?;
        let num = |v: &serde_json::Value| v.as_f64().filter(|x| x.is_finite() && *x >= 0.0);
        match (num(&r["train_step_ms"]), num(&r["generate_ms"])) {
            (Some(train), Some(generate)) => Ok(RoundTimes {
                train,
                forward: f64::NAN,
                generate,
            }),
            _ => Err(self.fail(&format!("a round's reply lacks its times: {r}"))),
        }
    }

    fn finish(&mut self) -> Result<(u64, usize, ExternalInfo)> {
        self.send("finish")?;
        let r = self.reply()?;
        self.stdin = None;
        let _ = self.child.wait();
        let bytes = r["peak_memory_bytes"].as_f64().unwrap_or(f64::NAN);
        let params = r["train_params"].as_u64();
        match (bytes.is_finite() && bytes >= 0.0, params) {
            (true, Some(params)) => Ok((
                bytes as u64,
                params.min(usize::MAX as u64) as usize,
                ExternalInfo {
                    backend: r["backend"].as_str().unwrap_or("PEFT").to_string(),
                    memory: r["memory"].as_str().unwrap_or("?").to_string(),
                },
            )),
            _ => Err(self.fail(&format!("its last reply lacks memory or parameters: {r}"))),
        }
    }
}

impl Drop for PeftCell {
    fn drop(&mut self) {
        // A run stopped by an error leaves no Python process behind.
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The PEFT cells of a shape: one per fastpt `pt` setting there.
pub fn peft_cells(
    tools: &BaselineTools,
    cfg: &BenchConfig,
    cuda: bool,
    shape: &str,
    cells: &[(String, usize)],
) -> Result<Vec<Box<dyn External>>> {
    let mut out: Vec<Box<dyn External>> = Vec::new();
    for (setting, rows) in cells.iter().filter(|(s, _)| s.starts_with("pt")) {
        eprintln!("bench --baseline: starting PEFT on {shape} with {rows} prompt rows");
        out.push(Box::new(PeftCell::start(
            tools, shape, setting, *rows, cfg, cuda,
        )?));
    }
    Ok(out)
}

/// fastpt's `pt` rows next to the PEFT rows of the same rounds: times with their intervals and
/// fastpt's change against PEFT paired by round (negative: fastpt is faster), memory as a ratio.
pub fn baseline_table(report: &Report) -> String {
    let mut table = format!(
        "fastpt vs PyTorch + PEFT prompt tuning, in the same interleaved rounds \
         (change < 0: fastpt is faster)\n\n{}\n\
         | shape | prompt rows | fastpt step ms | PEFT step ms | fastpt vs PEFT | fastpt generate ms | PEFT generate ms | fastpt vs PEFT | fastpt memory MB | PEFT memory MB | ratio |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        report_header(report)
    );
    let mut memories = Vec::new();
    for peft in report.rows.iter().filter(|r| r.external.is_some()) {
        let Some(ours) = report.rows.iter().find(|r| {
            r.external.is_none()
                && r.shape == peft.shape
                && Some(r.setting.as_str()) == peft.setting.strip_prefix("peft:")
        }) else {
            continue;
        };
        let step = Change::paired(
            &peft.train_step_ms.samples,
            &ours.train_step_ms.samples,
            false,
        );
        let gen = Change::paired(&peft.generate_ms.samples, &ours.generate_ms.samples, false);
        let (f_mem, p_mem) = (
            ours.peak_memory_bytes as f64 / 1e6,
            peft.peak_memory_bytes as f64 / 1e6,
        );
        table.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {f_mem:.1} | {p_mem:.1} | {:.2} |\n",
            ours.shape,
            ours.prompt_rows,
            ours.train_step_ms.label(),
            peft.train_step_ms.label(),
            step.label(),
            ours.generate_ms.label(),
            peft.generate_ms.label(),
            gen.label(),
            f_mem / p_mem,
        ));
        if let Some(info) = &peft.external {
            if !memories.contains(&info) {
                memories.push(info);
            }
        }
    }
    table.push_str(&format!("\nfastpt memory: {}", report.memory));
    for info in memories {
        table.push_str(&format!("; {}: {}", info.backend, info.memory));
    }
    table.push('\n');
    table
}
