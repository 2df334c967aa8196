//! Files written so that a crash never leaves a half-written one: a temporary file in the same
//! folder, flushed to disk, then renamed over the target.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};

/// Distinguishes temp files of concurrent writes within one process.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Writes `bytes` to `path` atomically: a temp file in the same folder (so the rename cannot
/// cross file systems), flushed and fsynced, renamed over `path`, then the folder fsynced so the
/// rename itself survives a power loss. `before_rename` runs between the fsync and the rename; an
/// error from it is returned with the temp file left in place, as a kill would leave it. Any I/O
/// error removes the temp file and leaves `path` untouched.
pub fn write_file_atomic(
    path: &Path,
    bytes: &[u8],
    before_rename: &mut dyn FnMut() -> Result<()>,
) -> Result<()> {
    let file_name = path
        .file_name()
        .ok_or_else(|| Error::Input(format!("{}: not a file path", path.display())))?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut temp_name = std::ffi::OsString::from(".");
    temp_name.push(file_name);
    temp_name.push(format!(
        ".tmp-{}-{}",
        std::process::id(),
        TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let temp: PathBuf = dir.join(temp_name);

    let cleanup = |e: std::io::Error| {
        // Best effort: the write already failed, and a leftover temp file is only clutter.
        let _ = std::fs::remove_file(&temp);
        Error::io(path, e)
    };
    (|| {
        let mut f = File::create(&temp)?;
        f.write_all(bytes)?;
        // Data on disk before the rename, so a crash cannot leave a renamed but empty file.
        f.sync_all()
    })()
    .map_err(cleanup)?;
    before_rename()?;
    std::fs::rename(&temp, path).map_err(cleanup)?;
    sync_dir(dir)
}

/// Fsyncs a folder so a rename in it is durable (Unix; elsewhere a no-op).
fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, e))?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}
