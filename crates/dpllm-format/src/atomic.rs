//! Atomic file output: write to a temporary file beside the target, then rename.

use std::io::Write;
use std::path::Path;

use crate::{FormatError, Result};

/// Write `bytes` to `path` atomically: readers see the old file or the complete new one, never a partial one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |f| f.write_all(bytes))
}

/// Create `path` atomically from a writer callback; on any error the target is untouched and the temp file removed.
pub fn write_atomic_with(path: &Path, write: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().ok_or_else(|| FormatError::invalid(path, "not a file path"))?;
    let tmp = dir.join(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        write(&mut f)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        FormatError::io(path, e)
    })
}

/// A directory built beside its destination and moved into place at the end.
///
/// Created as a hidden sibling of the destination; removed on drop (an error or
/// a panic) unless [`StagingDir::publish`] moved it into place. Publishing over an
/// existing directory uses renames only, so a failure keeps the old one.
pub struct StagingDir {
    path: std::path::PathBuf,
    dst: std::path::PathBuf,
    done: bool,
}

impl StagingDir {
    /// A fresh, empty staging directory for `dst` (whose parent must exist).
    pub fn new(dst: &Path) -> Result<StagingDir> {
        let parent = dst.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let name = dst.file_name().ok_or_else(|| FormatError::invalid(dst, "not a directory path"))?;
        if !parent.is_dir() {
            return Err(FormatError::invalid(dst, format!("the parent directory {} does not exist", parent.display())));
        }
        let path = parent.join(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir(&path).map_err(|e| FormatError::io(&path, e))?;
        Ok(StagingDir { path, dst: dst.to_path_buf(), done: false })
    }

    /// Where to write the contents.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Move the directory to its destination, replacing an existing one.
    pub fn publish(mut self) -> Result<()> {
        let old = self.path.with_extension("old");
        let had_old = self.dst.exists();
        if had_old {
            std::fs::rename(&self.dst, &old).map_err(|e| FormatError::io(&self.dst, e))?;
        }
        if let Err(e) = std::fs::rename(&self.path, &self.dst) {
            if had_old {
                let _ = std::fs::rename(&old, &self.dst);
            }
            return Err(FormatError::io(&self.dst, e));
        }
        self.done = true;
        if had_old {
            let _ = std::fs::remove_dir_all(&old);
        }
        Ok(())
    }
}

impl Drop for StagingDir {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staging_dirs_publish_by_rename_and_vanish_otherwise() {
        let d = tempfile::tempdir().unwrap();
        let dst = d.path().join("out");
        let s = StagingDir::new(&dst).unwrap();
        std::fs::write(s.path().join("a"), b"1").unwrap();
        s.publish().unwrap();
        assert_eq!(std::fs::read(dst.join("a")).unwrap(), b"1");
        // Replacing an existing directory.
        let s = StagingDir::new(&dst).unwrap();
        std::fs::write(s.path().join("b"), b"2").unwrap();
        s.publish().unwrap();
        assert!(!dst.join("a").exists() && dst.join("b").exists());
        // Dropped (an error or a panic on the way): nothing is left, the old output stays.
        let s = StagingDir::new(&dst).unwrap();
        std::fs::write(s.path().join("c"), b"3").unwrap();
        drop(s);
        let r = std::panic::catch_unwind(|| {
            let s = StagingDir::new(&d.path().join("out")).unwrap();
            std::fs::write(s.path().join("d"), b"4").unwrap();
            panic!("boom");
        });
        assert!(r.is_err());
        let names: Vec<_> = std::fs::read_dir(d.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("out")]);
        assert!(dst.join("b").exists());
        assert!(StagingDir::new(&d.path().join("missing/out")).is_err());
    }

    #[test]
    fn failed_write_leaves_no_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("out.json");
        let r = write_atomic_with(&p, |f| {
            f.write_all(b"partial")?;
            Err(std::io::Error::other("boom"))
        });
        assert!(r.is_err());
        assert!(!p.exists());
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0, "temp file left behind");
        write_atomic(&p, b"ok").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"ok");
    }
}
