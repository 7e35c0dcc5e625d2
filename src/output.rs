//! Output files and folders, the one place that writes results to disk.
//!
//! Every output (PNG, latents, converted / exported / synthesised folders) is
//! 1. checked before the expensive work starts ([`check_output_file`], [`check_output_dir`]):
//!    the parent folder exists and is writable, the destination is not a folder (or, for a
//!    folder, does not exist unless replacing was asked for);
//! 2. written under a temporary name beside the destination (`.NAME.sdsparse-tmp-PID`) and
//!    renamed into place only when complete ([`PendingFile`], [`TempDir`]), so a failure
//!    (full disk, killed process) never leaves a partial or truncated file under the real name;
//! 3. reported by the DESTINATION's name when writing fails ([`TempDir::name_output`] maps
//!    errors about the temporary folder back to the output the user asked for).

use crate::error::{Error, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The temporary sibling `.NAME.sdsparse-tmp-PID` of `dest`.
fn temp_sibling(dest: &Path) -> Result<PathBuf> {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .ok_or_else(|| Error::Invalid(format!("{}: not a file name", dest.display())))?;
    Ok(parent_of(dest).join(format!(".{name}.sdsparse-tmp-{}", std::process::id())))
}

/// The folder an output goes into (`.` for a bare file name).
fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Checks that `parent` is an existing folder we can create files in (by creating and
/// removing a probe file, which is what answers for permissions, read-only mounts and ACLs).
fn check_writable_parent(dest: &Path, what: &str) -> Result<()> {
    let parent = parent_of(dest);
    if !parent.exists() {
        return Err(Error::Invalid(format!(
            "{what} {}: the folder {} does not exist",
            dest.display(),
            parent.display()
        )));
    }
    if !parent.is_dir() {
        return Err(Error::Invalid(format!(
            "{what} {}: {} is not a folder",
            dest.display(),
            parent.display()
        )));
    }
    let probe = temp_sibling(dest)?.with_extension("probe");
    match std::fs::OpenOptions::new().write(true).create_new(true).open(&probe) {
        Ok(f) => {
            drop(f);
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) => Err(Error::Invalid(format!(
            "{what} {}: cannot write in {}: {e}",
            dest.display(),
            parent.display()
        ))),
    }
}

/// Checks an output FILE before any work: not a folder, its folder exists and is writable.
/// `what` names it in errors (e.g. `--out`).
pub fn check_output_file(dest: &Path, what: &str) -> Result<()> {
    if dest.as_os_str().is_empty() {
        return Err(Error::Invalid(format!("{what}: empty file name")));
    }
    if dest.is_dir() || dest.as_os_str().to_string_lossy().ends_with(std::path::MAIN_SEPARATOR) {
        return Err(Error::Invalid(format!("{what} {}: is a folder, expected a file name", dest.display())));
    }
    check_writable_parent(dest, what)
}

/// Checks an output model FOLDER before any work: absent, or (with `force`) an empty folder or
/// a model folder (one with `model_index.json`, or a component's `config.json`), so `--force`
/// never deletes a file or a folder of other work; its parent exists and is writable.
pub fn check_output_dir(dest: &Path, force: bool, what: &str) -> Result<()> {
    if dest.exists() && !force {
        return Err(Error::Invalid(format!("{} already exists (use --force to replace it)", dest.display())));
    }
    if dest.exists() {
        let is_model = dest.join("model_index.json").is_file() || dest.join("config.json").is_file();
        let is_empty = std::fs::read_dir(dest).map(|mut d| d.next().is_none()).unwrap_or(false);
        if !dest.is_dir() || !(is_model || is_empty) {
            return Err(Error::Invalid(format!(
                "{what} {} exists and is not a model folder; --force replaces only a model folder (or an \
                 empty one): give another path",
                dest.display()
            )));
        }
    }
    check_writable_parent(dest, what)
}

/// A file written under a temporary name beside its destination; renamed into place by
/// [`PendingFile::commit`], removed if dropped uncommitted.
pub struct PendingFile {
    tmp: PathBuf,
    dest: PathBuf,
    committed: bool,
}

impl PendingFile {
    /// Writes `bytes` (flushed and synced) to the temporary sibling of `dest`. An I/O error
    /// names `dest`.
    pub fn write(dest: &Path, bytes: &[u8]) -> Result<PendingFile> {
        let tmp = temp_sibling(dest)?;
        let pending = PendingFile { tmp, dest: dest.to_path_buf(), committed: false };
        let io = |e| Error::io(dest, e);
        let mut f = std::fs::File::create(&pending.tmp).map_err(io)?;
        f.write_all(bytes).map_err(io)?;
        f.sync_all().map_err(io)?;
        Ok(pending)
    }

    /// Renames the file into place (replacing an existing file).
    pub fn commit(mut self) -> Result<()> {
        std::fs::rename(&self.tmp, &self.dest).map_err(|e| Error::io(&self.dest, e))?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for PendingFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Commits several pending files together: all are written before any is renamed, and if
/// a rename fails the files already renamed by this call are removed again, so a command
/// leaves either all of its outputs or none.
pub fn commit_all(files: Vec<PendingFile>) -> Result<()> {
    let mut done: Vec<PathBuf> = Vec::new();
    for f in files {
        let dest = f.dest.clone();
        if let Err(e) = f.commit() {
            for d in &done {
                let _ = std::fs::remove_file(d);
            }
            return Err(e);
        }
        done.push(dest);
    }
    Ok(())
}

/// Writes one file atomically (temporary sibling, then rename).
pub fn write_file(dest: &Path, bytes: &[u8]) -> Result<()> {
    PendingFile::write(dest, bytes)?.commit()
}

/// A temporary sibling folder of an output folder: everything is written inside it, and
/// [`TempDir::commit`] renames it into place; dropped uncommitted, it is removed.
pub struct TempDir {
    tmp: PathBuf,
    out: PathBuf,
    committed: bool,
}

impl TempDir {
    /// Checks `out` ([`check_output_dir`]) and creates its temporary sibling.
    pub fn new(out: &Path, force: bool, what: &str) -> Result<TempDir> {
        check_output_dir(out, force, what)?;
        let tmp = temp_sibling(out)?;
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        }
        std::fs::create_dir_all(&tmp).map_err(|e| Error::io(out, e))?;
        Ok(TempDir { tmp, out: out.to_path_buf(), committed: false })
    }

    /// The folder to write into.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// The output folder it becomes.
    pub fn out(&self) -> &Path {
        &self.out
    }

    /// An error about a file inside the temporary folder, reworded to name the file of the
    /// OUTPUT folder the user asked for (the temporary name means nothing to them).
    pub fn name_output(&self, e: Error) -> Error {
        let (tmp, out) = (self.tmp.display().to_string(), self.out.display().to_string());
        let fix = |s: String| s.replace(&tmp, &out);
        match e {
            Error::Io { path, err } => {
                let path = match path.strip_prefix(&self.tmp) {
                    Ok(rest) => self.out.join(rest),
                    Err(_) => path,
                };
                Error::Io { path, err }
            }
            Error::Checkpoint(s) => Error::Checkpoint(fix(s)),
            Error::Format(s) => Error::Format(fix(s)),
            Error::Msg(s) => Error::Msg(fix(s)),
            other => other,
        }
    }

    /// Replaces `out` (when it exists) with the finished folder.
    pub fn commit(mut self) -> Result<()> {
        if let Ok(meta) = std::fs::symlink_metadata(&self.out) {
            let removed = if meta.is_dir() {
                std::fs::remove_dir_all(&self.out)
            } else {
                std::fs::remove_file(&self.out)
            };
            removed.map_err(|e| Error::io(&self.out, e))?;
        }
        std::fs::rename(&self.tmp, &self.out).map_err(|e| Error::io(&self.out, e))?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

/// Copies one small file (configs, tokenizer files): a read error names `from`, a write
/// error names `to`.
pub fn copy_file(from: &Path, to: &Path) -> Result<()> {
    let bytes = std::fs::read(from).map_err(|e| Error::io(from, e))?;
    std::fs::write(to, bytes).map_err(|e| Error::io(to, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_file_is_invisible_until_committed() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("a.bin");
        let p = PendingFile::write(&dest, b"abc").unwrap();
        assert!(!dest.exists());
        p.commit().unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"abc");
        // Dropped uncommitted: nothing left.
        drop(PendingFile::write(&dir.path().join("b.bin"), b"x").unwrap());
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("a.bin")]);
    }

    #[test]
    fn output_checks_speak_of_the_output() {
        let dir = tempfile::tempdir().unwrap();
        let e = check_output_file(&dir.path().join("missing/x.png"), "--out").unwrap_err().to_string();
        assert!(e.contains("--out") && e.contains("does not exist"), "{e}");
        let e = check_output_file(dir.path(), "--out").unwrap_err().to_string();
        assert!(e.contains("is a folder"), "{e}");
        assert!(check_output_file(&dir.path().join("x.png"), "--out").is_ok());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "the probe is removed");
    }
}
