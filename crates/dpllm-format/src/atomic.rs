//! Atomic output: everything is written to a temporary beside its destination
//! and published by rename, so readers see the old output or the complete new
//! one, never a partial one.
//!
//! Temporaries are named `.NAME.tmp-PID-N` (and `.NAME.tmp-PID-probe` for the
//! write probe of [`crate::output::check_output`]) and
//! - are removed on an error or a panic (drop);
//! - are registered while they exist, so a signal handler can remove them
//!   ([`remove_pending_then`]) before the process exits;
//! - hold an advisory lock while their process lives, so the next run that
//!   writes the same output removes those left by a process that no longer
//!   exists (SIGKILL, power loss): [`remove_stale`].

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use crate::output::{check_replaceable, parent_dir, Manifest, OutputKind};
use crate::{FormatError, Result};

/// Temporaries of this process that exist now.
static PENDING: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
/// Distinguishes temporaries of one process.
static COUNTER: AtomicU64 = AtomicU64::new(0);
/// Lock file inside a staging directory.
const LOCK: &str = ".lock";
/// Scratch directory inside a staging directory (removed before publishing).
const SCRATCH: &str = ".scratch";

fn pending() -> MutexGuard<'static, Vec<PathBuf>> {
    PENDING.lock().unwrap_or_else(|e| e.into_inner())
}

fn unregister(list: &mut Vec<PathBuf>, path: &Path) {
    list.retain(|p| p != path);
}

fn remove_any(path: &Path) {
    if path.is_dir() {
        let _ = std::fs::remove_dir_all(path);
    } else {
        let _ = std::fs::remove_file(path);
    }
}

/// Remove every temporary file and staging directory of this process, then run
/// `f` (typically `std::process::exit`) while no output can be published.
pub fn remove_pending_then<T>(f: impl FnOnce() -> T) -> T {
    let mut list = pending();
    for p in list.drain(..) {
        remove_any(&p);
    }
    f()
}

/// A fresh temporary path beside `dst`.
fn temp_path(dst: &Path) -> Result<PathBuf> {
    let name = dst
        .file_name()
        .ok_or_else(|| FormatError::invalid(dst, "not a file or directory path"))?;
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    Ok(parent_dir(dst).join(format!(
        ".{}.tmp-{}-{n}",
        name.to_string_lossy(),
        std::process::id()
    )))
}

/// True when process `pid` is known to be running (always true where it cannot be told).
fn pid_alive(pid: u32) -> bool {
    if cfg!(target_os = "linux") {
        Path::new("/proc").join(pid.to_string()).exists()
    } else {
        true
    }
}

/// True when the advisory lock of temporary `path` is held by some process.
fn lock_held(path: &Path) -> bool {
    let lock = if path.is_dir() {
        path.join(LOCK)
    } else {
        path.to_path_buf()
    };
    match File::open(&lock) {
        Ok(f) => f.try_lock().is_err(),
        Err(_) => false,
    }
}

/// Remove the temporaries of `dst` left by processes that no longer exist. A
/// replaced output caught half-way through publication (`.tmp-…old`) is put
/// back when `dst` is missing.
pub fn remove_stale(dst: &Path) {
    let Some(name) = dst.file_name() else { return };
    let prefix = format!(".{}.tmp-", name.to_string_lossy());
    let Ok(entries) = std::fs::read_dir(parent_dir(dst)) else {
        return;
    };
    for e in entries.flatten() {
        let fname = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = fname.strip_prefix(&prefix) else {
            continue;
        };
        let Some(pid) = rest
            .split(['-', '.'])
            .next()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let path = e.path();
        if pid == std::process::id() || pid_alive(pid) || lock_held(&path) {
            continue;
        }
        if fname.ends_with(".old") && !dst.exists() && std::fs::rename(&path, dst).is_ok() {
            tracing::warn!("restored {} from an interrupted replacement", dst.display());
            continue;
        }
        tracing::info!(
            "removing {} left by process {pid}, which no longer exists",
            path.display()
        );
        remove_any(&path);
    }
}

/// Write `bytes` to `path` atomically: readers see the old file or the complete new one, never a partial one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |f| f.write_all(bytes))
}

/// Create `path` atomically from a writer callback; on any error the target is untouched and the temp file removed.
pub fn write_atomic_with(
    path: &Path,
    write: impl FnOnce(&mut File) -> std::io::Result<()>,
) -> Result<()> {
    remove_stale(path);
    let tmp = temp_path(path)?;
    pending().push(tmp.clone());
    let result = (|| {
        let mut f = File::options().write(true).create_new(true).open(&tmp)?;
        let _ = f.try_lock();
        write(&mut f)?;
        f.sync_all()?;
        let mut list = pending();
        std::fs::rename(&tmp, path)?;
        unregister(&mut list, &tmp);
        Ok(())
    })();
    result.map_err(|e: std::io::Error| {
        let _ = std::fs::remove_file(&tmp);
        unregister(&mut pending(), &tmp);
        FormatError::write(path, e)
    })
}

/// Write a `kind` result file atomically, after checking (again) that an existing
/// file at `path` is one dpllm wrote ([`check_replaceable`]).
pub fn write_output_file(
    path: &Path,
    kind: OutputKind,
    write: impl FnOnce(&mut File) -> std::io::Result<()>,
) -> Result<()> {
    check_replaceable(path, kind, false)?;
    write_atomic_with(path, write)
}

/// A directory built beside its destination and moved into place at the end.
///
/// Created as a hidden sibling of the destination; removed on drop (an error or
/// a panic), on a signal, or by the next run after a kill, unless
/// [`StagingDir::publish`] moved it into place. Publishing writes the
/// directory's [`Manifest`] and replaces an existing output (only one that
/// dpllm wrote: [`check_replaceable`]) by renames only, so a failure keeps the old one.
pub struct StagingDir {
    path: PathBuf,
    dst: PathBuf,
    kind: OutputKind,
    force: bool,
    inputs: serde_json::Value,
    _lock: Option<File>,
    done: bool,
}

impl StagingDir {
    /// A fresh, empty staging directory for a `kind` output at `dst`, whose
    /// parent must exist; an existing `dst` must be replaceable (with `force`).
    pub fn new(dst: &Path, kind: OutputKind, force: bool) -> Result<StagingDir> {
        let parent = parent_dir(dst);
        if !parent.is_dir() {
            return Err(FormatError::refused(
                dst,
                format!("the directory {} does not exist", parent.display()),
            ));
        }
        check_replaceable(dst, kind, force)?;
        remove_stale(dst);
        let path = temp_path(dst)?;
        pending().push(path.clone());
        let mut s = StagingDir {
            path,
            dst: dst.to_path_buf(),
            kind,
            force,
            inputs: serde_json::Value::Null,
            _lock: None,
            done: false,
        };
        std::fs::create_dir(&s.path).map_err(|e| FormatError::write(&s.path, e))?;
        let lock = File::create(s.path.join(LOCK)).map_err(|e| FormatError::write(&s.path, e))?;
        let _ = lock.try_lock();
        s._lock = Some(lock);
        Ok(s)
    }

    /// Where to write the contents.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A scratch directory for temporary files of the run (inside the staging
    /// directory, so every cleanup covers it); removed before publishing.
    pub fn scratch(&self) -> Result<PathBuf> {
        let p = self.path.join(SCRATCH);
        std::fs::create_dir_all(&p).map_err(|e| FormatError::write(&p, e))?;
        Ok(p)
    }

    /// Record what produced the output (stored in its manifest).
    pub fn set_inputs(&mut self, inputs: serde_json::Value) {
        self.inputs = inputs;
    }

    /// Write the manifest and move the directory to its destination, replacing an existing one.
    pub fn publish(mut self) -> Result<()> {
        let _ = std::fs::remove_dir_all(self.path.join(SCRATCH));
        let _ = std::fs::remove_file(self.path.join(LOCK));
        let mut files: Vec<String> = std::fs::read_dir(&self.path)
            .map_err(|e| FormatError::io(&self.path, e))?
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect();
        files.sort();
        Manifest::new(self.kind, files, std::mem::take(&mut self.inputs)).write(&self.path)?;
        // No signal cleanup between the renames: the handler waits for this lock.
        let mut list = pending();
        check_replaceable(&self.dst, self.kind, self.force)?;
        let old = PathBuf::from(format!("{}.old", self.path.display()));
        let had_old = self.dst.exists();
        if had_old {
            std::fs::rename(&self.dst, &old).map_err(|e| FormatError::write(&self.dst, e))?;
        }
        if let Err(e) = std::fs::rename(&self.path, &self.dst) {
            if had_old {
                let _ = std::fs::rename(&old, &self.dst);
            }
            return Err(FormatError::write(&self.dst, e));
        }
        self.done = true;
        unregister(&mut list, &self.path);
        if had_old {
            let _ = std::fs::remove_dir_all(&old);
        }
        Ok(())
    }
}

impl Drop for StagingDir {
    fn drop(&mut self) {
        if !self.done {
            let mut list = pending();
            let _ = std::fs::remove_dir_all(&self.path);
            unregister(&mut list, &self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn staging_dirs_publish_by_rename_and_vanish_otherwise() {
        let d = tempfile::tempdir().unwrap();
        let dst = d.path().join("out");
        let s = StagingDir::new(&dst, OutputKind::Plans, false).unwrap();
        std::fs::write(s.path().join("a"), b"1").unwrap();
        std::fs::write(s.scratch().unwrap().join("tmp"), b"x").unwrap();
        s.publish().unwrap();
        assert_eq!(std::fs::read(dst.join("a")).unwrap(), b"1");
        assert_eq!(
            names(&dst),
            ["a", crate::output::MANIFEST],
            "scratch and lock are not published"
        );
        // Replacing an existing output needs --force.
        assert!(StagingDir::new(&dst, OutputKind::Plans, false).is_err());
        let s = StagingDir::new(&dst, OutputKind::Plans, true).unwrap();
        std::fs::write(s.path().join("b"), b"2").unwrap();
        s.publish().unwrap();
        assert!(!dst.join("a").exists() && dst.join("b").exists());
        // Dropped (an error or a panic on the way): nothing is left, the old output stays.
        let s = StagingDir::new(&dst, OutputKind::Plans, true).unwrap();
        std::fs::write(s.path().join("c"), b"3").unwrap();
        drop(s);
        let r = std::panic::catch_unwind(|| {
            let s = StagingDir::new(&d.path().join("out"), OutputKind::Plans, true).unwrap();
            std::fs::write(s.path().join("d"), b"4").unwrap();
            panic!("boom");
        });
        assert!(r.is_err());
        assert_eq!(names(d.path()), ["out"]);
        assert!(dst.join("b").exists());
        assert!(StagingDir::new(&d.path().join("missing/out"), OutputKind::Plans, false).is_err());
        // A directory dpllm did not write is never replaced, even with force.
        let mine = d.path().join("mine");
        std::fs::create_dir(&mine).unwrap();
        std::fs::write(mine.join("thesis.tex"), b"!").unwrap();
        let e = StagingDir::new(&mine, OutputKind::Plans, true)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("not written by dpllm"), "{e}");
    }

    #[test]
    fn failed_write_leaves_no_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("out.json");
        let r = write_atomic_with(&p, |f| {
            f.write_all(b"partial")?;
            Err(std::io::Error::other("boom"))
        });
        let e = r.unwrap_err().to_string();
        assert!(e.contains("cannot write") && e.contains("out.json"), "{e}");
        assert!(!p.exists());
        assert_eq!(
            std::fs::read_dir(d.path()).unwrap().count(),
            0,
            "temp file left behind"
        );
        write_atomic(&p, b"ok").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"ok");
    }

    #[test]
    fn temporaries_of_dead_processes_are_removed_live_ones_kept() {
        let d = tempfile::tempdir().unwrap();
        let dst = d.path().join("q");
        // A pid that cannot be running (above Linux's pid_max).
        let dead = 4_194_304 + 17;
        let stale_dir = d.path().join(format!(".q.tmp-{dead}-0"));
        std::fs::create_dir(&stale_dir).unwrap();
        std::fs::write(stale_dir.join("dpllm-anyprec.safetensors"), vec![0u8; 1024]).unwrap();
        let stale_file = d.path().join(format!(".q.tmp-{dead}-3"));
        std::fs::write(&stale_file, b"partial").unwrap();
        // An interrupted replacement: the old output was moved away, the new one never landed.
        let moved = d.path().join(format!(".q.tmp-{dead}-1.old"));
        std::fs::create_dir(&moved).unwrap();
        std::fs::write(moved.join("x"), b"old model").unwrap();
        // A live process's staging (ours, from another output) and other names stay.
        let live = d.path().join(format!(".q.tmp-{}-99", std::process::id()));
        std::fs::create_dir(&live).unwrap();
        std::fs::write(d.path().join(".other.tmp-5"), b"").unwrap();
        if cfg!(target_os = "linux") {
            remove_stale(&dst);
            assert!(
                !stale_dir.exists() && !stale_file.exists(),
                "stale temporaries kept"
            );
            assert_eq!(
                std::fs::read(dst.join("x")).unwrap(),
                b"old model",
                "the old output was not put back"
            );
            assert!(live.exists() && d.path().join(".other.tmp-5").exists());
        }
        // A held lock keeps a temporary whatever its pid says.
        let locked = d.path().join(format!(".q.tmp-{dead}-7"));
        let f = File::create(&locked).unwrap();
        f.try_lock().unwrap();
        remove_stale(&dst);
        assert!(locked.exists());
    }
}
