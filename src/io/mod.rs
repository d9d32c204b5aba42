//! File formats: PyTorch checkpoints, safetensors weights and results, atomic writes.

pub mod gguf;
mod pickle_scan;
pub mod pt;
pub mod weights;

use anyhow::Context;
use std::path::{Path, PathBuf};

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

/// `DIR.TAG-PID` beside `dir`.
fn sibling(dir: &Path, tag: &str) -> anyhow::Result<PathBuf> {
    let name = dir
        .file_name()
        .with_context(|| format!("{} has no folder name", dir.display()))?;
    let mut name = name.to_os_string();
    name.push(format!(".{tag}-{}", std::process::id()));
    Ok(dir.with_file_name(name))
}

/// A fresh, empty staging folder `DIR.partial-PID` beside `dir` (a leftover of that name
/// cleared first).
pub(crate) fn fresh_staging(dir: &Path) -> anyhow::Result<PathBuf> {
    let staging = sibling(dir, "partial")?;
    if staging.exists() {
        std::fs::remove_dir_all(&staging)
            .with_context(|| format!("cannot clear {}", staging.display()))?;
    }
    std::fs::create_dir_all(&staging)
        .with_context(|| format!("cannot create folder {}", staging.display()))?;
    Ok(staging)
}

/// Puts the complete folder `staging` at `dir`: an existing `dir` is renamed aside to
/// `DIR.old-PID`, `staging` renamed into place, then the old one removed (killed between the
/// two renames, `dir` is absent and the old folder is whole in `DIR.old-PID`).
pub(crate) fn replace_dir(staging: &Path, dir: &Path) -> anyhow::Result<()> {
    let old = sibling(dir, "old")?;
    let had_old = dir.exists();
    if had_old {
        std::fs::rename(dir, &old)
            .with_context(|| format!("cannot move the previous {} aside", dir.display()))?;
    }
    std::fs::rename(staging, dir).with_context(|| {
        format!(
            "cannot move {} into place at {}",
            staging.display(),
            dir.display()
        )
    })?;
    if had_old {
        std::fs::remove_dir_all(&old)
            .with_context(|| format!("cannot remove the previous {}", old.display()))?;
    }
    Ok(())
}

/// Writes `files` (name, bytes) into the folder `dir` as one result, so that after a crash or
/// kill `dir` holds either the files of the previous call or all of the new ones, never a mix
/// (`ibasis build --out DIR`'s `graph.safetensors` + `graph.json`).
///
/// When `dir` is absent or holds nothing but files of these names, the new files are written
/// into a fresh sibling `DIR.partial-PID` that replaces `dir` by renames (the previous folder
/// moved aside to `DIR.old-PID` and removed after; killed between those two renames, `dir` is
/// absent and the old result is whole in `DIR.old-PID`). When `dir` holds other files too, they
/// are kept: each new file is written to a temporary name in `dir` and all are renamed into
/// place only once every one is complete, in the order given (a kill within that last step,
/// a few microseconds, can still mix them).
pub fn write_files_as_one(dir: &Path, files: &[(&str, &[u8])]) -> anyhow::Result<()> {
    let names: Vec<&str> = files.iter().map(|f| f.0).collect();
    write_as_one(dir, &names, &|i, path| {
        std::fs::write(path, files[i].1).with_context(|| format!("cannot write {}", path.display()))
    })
}

/// [`write_files_as_one`] with the files written by `write(i, path)` (file `names[i]` at its
/// temporary `path`), for contents too large to hold twice (a graph's safetensors: written
/// tensor by tensor).
pub fn write_as_one(
    dir: &Path,
    names: &[&str],
    write: &dyn Fn(usize, &Path) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let ours = |name: &std::ffi::OsStr| names.iter().any(|n| name == std::ffi::OsStr::new(n));
    let only_ours = match std::fs::read_dir(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
        Err(e) => return Err(e).with_context(|| format!("cannot read folder {}", dir.display())),
        Ok(entries) => {
            let mut only = true;
            for e in entries {
                let e = e.with_context(|| format!("cannot read folder {}", dir.display()))?;
                only &= ours(&e.file_name()) && e.file_type().is_ok_and(|t| t.is_file());
            }
            only
        }
    };
    // (`--out .` has no name to stage beside: its files are replaced one by one.)
    if only_ours && dir.file_name().is_some() {
        let staging = fresh_staging(dir)?;
        let written = (0..names.len()).try_for_each(|i| write(i, &staging.join(names[i])));
        if let Err(e) = written {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(e);
        }
        return replace_dir(&staging, dir);
    }
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create folder {}", dir.display()))?;
    let pid = std::process::id();
    let tmp: Vec<PathBuf> = names
        .iter()
        .map(|name| dir.join(format!(".{name}.{pid}.tmp")))
        .collect();
    for (i, t) in tmp.iter().enumerate() {
        if let Err(e) = write(i, t) {
            for t in &tmp {
                let _ = std::fs::remove_file(t);
            }
            return Err(e);
        }
    }
    for (name, t) in names.iter().zip(&tmp) {
        std::fs::rename(t, dir.join(name))
            .with_context(|| format!("cannot move {} into place", dir.join(name).display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ibasis-io-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn listing(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn files_written_as_one_replace_the_previous_pair_whole() {
        let root = tmpdir("pair");
        let out = root.join("g");
        write_files_as_one(&out, &[("a.bin", b"new-a"), ("b.json", b"new-b")]).unwrap();
        assert_eq!(listing(&out), ["a.bin", "b.json"]);
        write_files_as_one(&out, &[("a.bin", b"2a"), ("b.json", b"2b")]).unwrap();
        assert_eq!(std::fs::read(out.join("a.bin")).unwrap(), b"2a");
        assert_eq!(std::fs::read(out.join("b.json")).unwrap(), b"2b");
        // Nothing left beside it: no staging or old folder.
        assert_eq!(listing(&root), ["g"]);
        // A folder holding other files keeps them; no temporary files are left.
        std::fs::write(out.join("notes.txt"), b"mine").unwrap();
        write_files_as_one(&out, &[("a.bin", b"3a"), ("b.json", b"3b")]).unwrap();
        assert_eq!(listing(&out), ["a.bin", "b.json", "notes.txt"]);
        assert_eq!(std::fs::read(out.join("b.json")).unwrap(), b"3b");
        assert_eq!(std::fs::read(out.join("notes.txt")).unwrap(), b"mine");
        // An unwritable target fails with the path named and leaves the old pair.
        let e = write_files_as_one(&out.join("notes.txt"), &[("a.bin", b"x")]).unwrap_err();
        assert!(format!("{e:#}").contains("notes.txt"), "{e:#}");
        assert_eq!(std::fs::read(out.join("a.bin")).unwrap(), b"3a");
        let _ = std::fs::remove_dir_all(root);
    }
}
