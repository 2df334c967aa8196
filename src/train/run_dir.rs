//! The run folder's contract (README.md, "Run folders"): which folders a run may take, the
//! marker that says a folder is fastpt's, the lock that keeps two processes out of one folder,
//! and `metrics.jsonl`, the run's history appended as it goes.
//!
//! - `.fastpt-run` (the marker): written when a run creates its folder; a new run refuses a
//!   folder that has one (another run's results), and refuses a non-empty folder without one
//!   (files fastpt did not write). An empty or missing folder is fine.
//! - `.fastpt-lock`: an OS advisory lock (`flock`, released by the kernel when the process
//!   ends, even on `kill -9`) held for the whole run; the file holds the holder's pid, which
//!   the refused second process names.
//! - `metrics.jsonl`: one JSON object per line, `"kind": "step"` (step, loss, lr, grad_norm,
//!   tokens, tokens_per_s, seconds, time) or `"kind": "eval"` (step, split, dev_loss, metrics,
//!   score). A resume first drops the lines after the checkpoint's step (the steps it redoes).

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::fsutil::write_file_atomic;

/// The marker file of a run folder.
pub const MARKER: &str = ".fastpt-run";
/// The lock file of a run folder (holds the pid of the run that has it).
pub const LOCK: &str = ".fastpt-lock";
/// The run's metrics, one JSON object per line.
pub const METRICS: &str = "metrics.jsonl";
/// Every name fastpt writes in a run folder (besides hidden `.NAME.tmp-*` files a crash can
/// leave mid-write).
pub const RUN_FILES: &[&str] = &[
    MARKER,
    LOCK,
    METRICS,
    "config.toml",
    "checkpoint.safetensors",
    "best.safetensors",
    "method.safetensors",
    "report.json",
    "loss.svg",
    "predictions.jsonl",
    "eval-dev.json",
    "eval-test.json",
    "export",
];
/// How many names an error lists before "and N more".
const LISTED: usize = 5;

/// The names in `dir` (none when it does not exist), sorted.
fn entries(dir: &Path) -> Result<Vec<String>> {
    let read = match std::fs::read_dir(dir) {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(dir, e)),
    };
    let mut names = Vec::new();
    for entry in read {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

/// `a, b, c and 4 more`.
fn list(names: &[String]) -> String {
    let shown = names
        .iter()
        .take(LISTED)
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    match names.len().saturating_sub(LISTED) {
        0 => shown,
        more => format!("{shown} and {more} more"),
    }
}

/// A leftover temporary file of an atomic write (`.NAME.tmp-PID-N`).
fn is_temp(name: &str) -> bool {
    name.starts_with('.') && name.contains(".tmp-")
}

/// `fastpt run --resume DIR` for `dir`, quoted for a POSIX shell when it needs it.
pub fn resume_command(dir: &Path) -> String {
    let s = dir.display().to_string();
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+=:,@%".contains(c));
    if plain {
        format!("fastpt run --resume {s}")
    } else {
        format!("fastpt run --resume '{}'", s.replace('\'', "'\\''"))
    }
}

/// Whether `dir` can hold a NEW run: missing, empty (a lock file alone counts as empty), or
/// refused with an error that says whose files are there. Reads only.
pub fn check_new_run_dir(dir: &Path) -> Result<()> {
    if dir.exists() && !dir.is_dir() {
        return Err(Error::RunFolder {
            path: dir.to_path_buf(),
            msg: "exists and is not a folder; out_dir must name a new or empty folder".into(),
        });
    }
    let names: Vec<String> = entries(dir)?
        .into_iter()
        .filter(|n| n != LOCK && !is_temp(n))
        .collect();
    if names.is_empty() {
        return Ok(());
    }
    let ours: Vec<String> = names
        .iter()
        .filter(|n| RUN_FILES.contains(&n.as_str()))
        .cloned()
        .collect();
    let resumable =
        dir.join("config.toml").is_file() && dir.join("checkpoint.safetensors").is_file();
    let msg = if names.iter().any(|n| n == MARKER) {
        let next = if resumable {
            format!("continue it with `{}`, or choose", resume_command(dir))
        } else {
            "its checkpoint is gone, so it cannot be resumed: delete the folder, or choose".into()
        };
        format!(
            "holds the results of another fastpt run ({}): {next} another out_dir (nothing was \
             overwritten)",
            list(&ours)
        )
    } else if resumable {
        // A run folder of a fastpt from before the marker.
        format!(
            "holds a run (config.toml, checkpoint.safetensors) without the {MARKER} marker: \
             continue it with `{}`, or choose another out_dir (nothing was overwritten)",
            resume_command(dir)
        )
    } else {
        format!(
            "holds files fastpt did not write ({}): a run folder must be new or empty; choose \
             another out_dir (nothing was written)",
            list(&names)
        )
    };
    Err(Error::RunFolder {
        path: dir.to_path_buf(),
        msg,
    })
}

/// Whether `dir` holds a run to resume (its config.toml); reads only.
pub fn check_resume_dir(dir: &Path) -> Result<()> {
    if !dir.is_dir() {
        return Err(Error::RunFolder {
            path: dir.to_path_buf(),
            msg: "no such run folder to resume".into(),
        });
    }
    if !dir.join("config.toml").is_file() {
        return Err(Error::RunFolder {
            path: dir.to_path_buf(),
            msg: "not a fastpt run folder (no config.toml); nothing to resume".into(),
        });
    }
    Ok(())
}

/// The marker's content: which run created the folder.
fn marker_text(run_id: &str) -> String {
    format!(
        "{}\n",
        serde_json::json!({
            "fastpt": env!("CARGO_PKG_VERSION"),
            "run_id": run_id,
            "note": "this folder belongs to a fastpt run; see README.md, Run folders",
        })
    )
}

/// Writes the marker unless the folder has one (a resumed run keeps its run id).
pub fn write_marker(dir: &Path, run_id: &str) -> Result<()> {
    let path = dir.join(MARKER);
    if path.exists() {
        return Ok(());
    }
    write_file_atomic(&path, marker_text(run_id).as_bytes(), &mut || Ok(()))
}

/// The exclusive lock on a run folder; released when dropped (or when the process ends).
#[derive(Debug)]
pub struct RunLock {
    /// The open lock file; the lock lives as long as it does.
    file: File,
    path: PathBuf,
}

impl RunLock {
    /// Takes the lock of `dir` if its lock file exists (None when it does not). Opening an
    /// existing file writes nothing, so a command refused later has changed nothing.
    pub fn existing(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join(LOCK);
        match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(file) => Self::take(file, path).map(Some),
            // No folder, or a file where the folder should be (the folder checks say so).
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(Error::io(&path, e)),
        }
    }

    /// Takes the lock of `dir`, creating the lock file.
    pub fn create(dir: &Path) -> Result<Self> {
        let path = dir.join(LOCK);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        Self::take(file, path)
    }

    fn take(mut file: File, path: PathBuf) -> Result<Self> {
        match file.try_lock() {
            Ok(()) => Ok(RunLock { file, path }),
            Err(TryLockError::WouldBlock) => {
                let mut text = String::new();
                // The pid is for the message only: an unreadable file still refuses.
                let _ = file.read_to_string(&mut text);
                let pid = match text.trim() {
                    "" => "unknown".to_string(),
                    t => t.chars().take(20).collect(),
                };
                let dir = path.parent().unwrap_or(Path::new("."));
                Err(Error::RunFolder {
                    path: dir.to_path_buf(),
                    msg: format!(
                        "in use by another fastpt run (pid {pid}, lock {}): two runs cannot \
                         share a folder; wait for it to end or stop it",
                        path.display()
                    ),
                })
            }
            Err(TryLockError::Error(e)) => Err(Error::io(&path, e)),
        }
    }

    /// Writes this process's pid into the lock file (for the message of a refused second run).
    pub fn write_pid(&mut self) -> Result<()> {
        let pid = std::process::id();
        (|| {
            self.file.set_len(0)?;
            self.file.seek(SeekFrom::Start(0))?;
            writeln!(self.file, "{pid}")?;
            self.file.flush()
        })()
        .map_err(|e| Error::io(&self.path, e))
    }
}

/// The run's history file, open for appending. Every line is written with one `write` call
/// and flushed, so a kill leaves at most a torn last line (dropped when the run resumes).
#[derive(Debug)]
pub struct MetricsLog {
    file: File,
    path: PathBuf,
}

impl MetricsLog {
    /// A new run's log: an empty `metrics.jsonl` in `dir`.
    pub fn create(dir: &Path) -> Result<Self> {
        let path = dir.join(METRICS);
        let file = File::create(&path).map_err(|e| Error::io(&path, e))?;
        Ok(MetricsLog { file, path })
    }

    /// A resumed run's log: the lines of `dir/metrics.jsonl` up to and including `step` are
    /// kept (those after it belong to steps the resume redoes, a torn or unreadable line is
    /// dropped), the file rewritten when anything was dropped, and opened for appending.
    /// Returns the kept lines.
    pub fn resume(dir: &Path, step: u64) -> Result<(Self, Vec<serde_json::Value>)> {
        let path = dir.join(METRICS);
        let (kept, kept_text, dropped) = Self::kept_lines(dir, step)?;
        if dropped {
            write_file_atomic(&path, kept_text.as_bytes(), &mut || Ok(()))?;
        }
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        Ok((MetricsLog { file, path }, kept))
    }

    /// The lines [`Self::resume`] keeps, read only (the other ranks of a data-parallel run).
    pub fn history(dir: &Path, step: u64) -> Result<Vec<serde_json::Value>> {
        Ok(Self::kept_lines(dir, step)?.0)
    }

    /// The lines of `dir/metrics.jsonl` up to and including `step`, their text, and whether
    /// anything was dropped (a later step, a torn or unreadable line).
    fn kept_lines(dir: &Path, step: u64) -> Result<(Vec<serde_json::Value>, String, bool)> {
        let path = dir.join(METRICS);
        let text = match std::fs::read(&path) {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(Error::io(&path, e)),
        };
        let mut kept = Vec::new();
        let mut kept_text = String::new();
        let mut dropped = false;
        for line in text.lines() {
            let value: Option<serde_json::Value> = serde_json::from_str(line).ok();
            match value {
                Some(v) if v["step"].as_u64().is_some_and(|s| s <= step) => {
                    kept_text.push_str(line);
                    kept_text.push('\n');
                    kept.push(v);
                }
                _ => dropped = true,
            }
        }
        // A file that does not end in a newline has a torn last line (dropped above).
        dropped |= !text.is_empty() && !text.ends_with('\n');
        Ok((kept, kept_text, dropped))
    }

    /// Appends one line.
    pub fn append(&mut self, value: &serde_json::Value) -> Result<()> {
        let mut line = value.to_string();
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .and_then(|()| self.file.flush())
            .map_err(|e| Error::io(&self.path, e))
    }

    /// Makes the lines so far durable (at checkpoints: the history is never behind them).
    pub fn sync(&self) -> Result<()> {
        self.file.sync_data().map_err(|e| Error::io(&self.path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resume_command_quotes_what_a_shell_would_split() {
        assert_eq!(
            resume_command(Path::new("runs/a-1")),
            "fastpt run --resume runs/a-1"
        );
        assert_eq!(
            resume_command(Path::new("my runs/it's")),
            "fastpt run --resume 'my runs/it'\\''s'"
        );
    }

    #[test]
    fn new_run_dirs_missing_empty_or_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("r");
        check_new_run_dir(&dir).unwrap();
        std::fs::create_dir(&dir).unwrap();
        check_new_run_dir(&dir).unwrap();
        std::fs::write(dir.join("notes.txt"), "mine").unwrap();
        let e = check_new_run_dir(&dir).unwrap_err().to_string();
        assert!(e.contains("did not write (notes.txt)"), "{e}");
        std::fs::remove_file(dir.join("notes.txt")).unwrap();
        std::fs::write(dir.join(MARKER), "{}").unwrap();
        std::fs::write(dir.join("best.safetensors"), "x").unwrap();
        let e = check_new_run_dir(&dir).unwrap_err().to_string();
        assert!(
            e.contains("another fastpt run") && e.contains("gone"),
            "{e}"
        );
    }

    #[test]
    fn metrics_resume_drops_later_and_torn_lines() {
        let tmp = tempfile::tempdir().unwrap();
        let text = "{\"kind\":\"step\",\"step\":1}\n{\"kind\":\"eval\",\"step\":2}\n\
                    {\"kind\":\"step\",\"step\":3}\n{\"kind\":\"st";
        std::fs::write(tmp.path().join(METRICS), text).unwrap();
        let (mut log, kept) = MetricsLog::resume(tmp.path(), 2).unwrap();
        assert_eq!(kept.len(), 2);
        log.append(&serde_json::json!({"step": 3})).unwrap();
        let now = std::fs::read_to_string(tmp.path().join(METRICS)).unwrap();
        assert_eq!(
            now,
            "{\"kind\":\"step\",\"step\":1}\n{\"kind\":\"eval\",\"step\":2}\n{\"step\":3}\n"
        );
    }
}
