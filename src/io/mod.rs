//! File formats: PyTorch checkpoints, safetensors weights and results, atomic writes.

pub mod gguf;
mod pickle_scan;
pub mod pt;
pub mod weights;

use anyhow::Context;
use std::path::Path;

/// Refuses anything but a regular file (a FIFO with no writer would block a read forever; a
/// device or folder is never a model or dataset), naming the path.
pub fn check_regular(path: &Path) -> anyhow::Result<()> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    if !meta.is_file() {
        anyhow::bail!(
            "{} is not a regular file ({})",
            path.display(),
            if meta.is_dir() {
                "a folder"
            } else {
                "a FIFO, socket or device"
            }
        );
    }
    Ok(())
}

/// The bytes of the regular file `path`.
pub fn read_file(path: &Path) -> anyhow::Result<Vec<u8>> {
    check_regular(path)?;
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

/// The text of the regular file `path`.
pub fn read_text(path: &Path) -> anyhow::Result<String> {
    check_regular(path)?;
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

/// Writes `bytes` to `path` atomically: a temporary file beside it, then a rename, so a crash
/// or error never leaves a half-written file behind.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create folder {}", dir.display()))?;
    let name = path
        .file_name()
        .context("output path has no file name")?
        .to_string_lossy();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    std::fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("cannot move {} into place", path.display()))
}
