//! What a dpllm command may write or replace (`docs/safety.md`).
//!
//! Every output goes through [`check_output`] before the command's long work
//! starts, and through [`check_replaceable`] again when it is published:
//! 1. An output is never one of the command's inputs, nor a directory holding one.
//! 2. The directory it goes into must exist and be writable.
//! 3. An existing path is replaced only when dpllm itself wrote it as an output of
//!    the same kind, recognised by its own metadata: a directory by its
//!    [`MANIFEST`] (and holding nothing that manifest does not account for), a
//!    JSON result by its [`JSON_MARKER`] field, a Markdown report by its
//!    [`MARKDOWN_MARKER`] line, a sensitivity file by its safetensors metadata.
//!    Directories are replaced only with `--force`; result files are refreshed.
//!    An empty directory holds nothing to lose and counts as free.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{FormatError, Result};

/// Manifest file written into every directory dpllm produces.
pub const MANIFEST: &str = "dpllm-output.json";
/// Top-level field of every JSON result dpllm writes (its version).
pub const JSON_MARKER: &str = "dpllm_version";
/// Start of the last line of every Markdown report dpllm writes.
pub const MARKDOWN_MARKER: &str = "<!-- written by dpllm";
/// `format` metadata of a sensitivity file.
pub const SENSITIVITY_FORMAT: &str = "dpllm-sensitivity";
/// This dpllm's version, recorded in manifests and results.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// Result files larger than this are never taken for dpllm's own.
const MAX_RESULT_BYTES: u64 = 256 << 20;

/// The kinds of output dpllm writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OutputKind {
    /// An any-precision model directory (`dpllm quantize`).
    AnyPrecModel,
    /// The plans of one memory budget (`dpllm calibrate`): `MODEL/plans/budget-M`.
    Plans,
    /// A sensitivity file (`dpllm sensitivity`).
    Sensitivity,
    /// A JSON results file (`--json`).
    Json,
    /// A Markdown report (`--markdown`).
    Markdown,
    /// A report directory: Markdown and SVG plots (`dpllm report`).
    Report,
}

impl OutputKind {
    /// True for outputs that are directories.
    pub fn is_dir(self) -> bool {
        matches!(
            self,
            OutputKind::AnyPrecModel | OutputKind::Plans | OutputKind::Report
        )
    }

    /// What it is, with its article, for messages.
    pub fn describe(self) -> &'static str {
        match self {
            OutputKind::AnyPrecModel => "an any-precision model directory",
            OutputKind::Plans => "a plan directory",
            OutputKind::Sensitivity => "a sensitivity file",
            OutputKind::Json => "a JSON results file",
            OutputKind::Markdown => "a Markdown report",
            OutputKind::Report => "a report directory",
        }
    }

    /// Subdirectories an output of this kind may hold, each entry of which is an
    /// output of its own (checked recursively), e.g. a model's `plans/`.
    fn containers(self) -> &'static [(&'static str, OutputKind)] {
        match self {
            OutputKind::AnyPrecModel => &[("plans", OutputKind::Plans)],
            _ => &[],
        }
    }
}

/// The record dpllm leaves in each directory it produces.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always "dpllm".
    pub producer: String,
    /// dpllm version that wrote it.
    pub version: String,
    /// What the directory is.
    pub kind: OutputKind,
    /// The entries dpllm wrote into it (besides the manifest itself).
    pub files: Vec<String>,
    /// What produced it (input fingerprints and settings), for caches to compare.
    #[serde(default)]
    pub inputs: serde_json::Value,
}

impl Manifest {
    /// A manifest for `files` written now.
    pub fn new(kind: OutputKind, files: Vec<String>, inputs: serde_json::Value) -> Manifest {
        Manifest {
            producer: "dpllm".into(),
            version: VERSION.into(),
            kind,
            files,
            inputs,
        }
    }

    /// The manifest of `dir`, or why it has none that dpllm wrote.
    pub fn read(dir: &Path) -> std::result::Result<Manifest, String> {
        let path = dir.join(MANIFEST);
        let text = std::fs::read_to_string(&path)
            .map_err(|_| format!("it was not written by dpllm (it has no readable {MANIFEST})"))?;
        let m: Manifest = serde_json::from_str(&text)
            .map_err(|e| format!("its {MANIFEST} is not a dpllm manifest ({e})"))?;
        if m.producer != "dpllm" {
            return Err(format!(
                "its {MANIFEST} names producer {:?}, not dpllm",
                m.producer
            ));
        }
        Ok(m)
    }

    /// Write the manifest into `dir`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let path = dir.join(MANIFEST);
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| FormatError::invalid(&path, e.to_string()))?;
        std::fs::write(&path, text).map_err(|e| FormatError::write(&path, e))
    }
}

/// True for the names of dpllm's temporaries (`.NAME.tmp-PID-…`).
pub fn is_temp_name(name: &str) -> bool {
    name.starts_with('.') && name.contains(".tmp-")
}

/// Why `dir` is not a directory dpllm wrote as a `kind` output, if it is not.
fn owned_dir(dir: &Path, kind: OutputKind) -> std::result::Result<(), String> {
    let m = Manifest::read(dir)?;
    if m.kind != kind {
        return Err(format!(
            "dpllm wrote it as {}, not {}",
            m.kind.describe(),
            kind.describe()
        ));
    }
    let entries = std::fs::read_dir(dir).map_err(|e| format!("cannot list it: {e}"))?;
    let mut foreign = Vec::new();
    for e in entries {
        let e = e.map_err(|e| format!("cannot list it: {e}"))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name == MANIFEST || m.files.contains(&name) || is_temp_name(&name) {
            continue;
        }
        match kind.containers().iter().find(|(c, _)| *c == name) {
            Some((_, inner)) if e.path().is_dir() => {
                for child in
                    std::fs::read_dir(e.path()).map_err(|e| format!("cannot list {name}: {e}"))?
                {
                    let child = child.map_err(|e| format!("cannot list {name}: {e}"))?;
                    let cname = child.file_name().to_string_lossy().into_owned();
                    if !is_temp_name(&cname) && owned_dir(&child.path(), *inner).is_err() {
                        foreign.push(format!("{name}/{cname}"));
                    }
                }
            }
            _ => foreign.push(name),
        }
    }
    if !foreign.is_empty() {
        foreign.sort();
        return Err(format!(
            "it holds files dpllm did not write ({}); move them away or choose another path",
            foreign.join(", ")
        ));
    }
    Ok(())
}

/// True when the file at `path` is a `kind` result dpllm wrote.
fn owned_file(path: &Path, kind: OutputKind) -> bool {
    let small = std::fs::metadata(path)
        .map(|m| m.len() <= MAX_RESULT_BYTES)
        .unwrap_or(false);
    match kind {
        OutputKind::Json => {
            small
                && std::fs::read_to_string(path)
                    .ok()
                    .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                    .is_some_and(|v| v.get(JSON_MARKER).is_some())
        }
        OutputKind::Markdown => {
            small
                && std::fs::read_to_string(path)
                    .is_ok_and(|t| t.lines().any(|l| l.starts_with(MARKDOWN_MARKER)))
        }
        OutputKind::Sensitivity => crate::Checkpoint::open_file(path).is_ok_and(|ck| {
            ck.metadata().get("format").map(String::as_str) == Some(SENSITIVITY_FORMAT)
        }),
        OutputKind::AnyPrecModel | OutputKind::Plans | OutputKind::Report => false,
    }
}

/// Check that the existing `dst` may be replaced by a `kind` output (directories
/// only with `force`). A path that does not exist passes.
pub fn check_replaceable(dst: &Path, kind: OutputKind, force: bool) -> Result<()> {
    let Ok(meta) = std::fs::metadata(dst) else {
        return Ok(());
    };
    let refuse = |why: String| Err(FormatError::refused(dst, why));
    if kind.is_dir() {
        if !meta.is_dir() {
            return refuse(format!("it is a file, not {}", kind.describe()));
        }
        let empty = std::fs::read_dir(dst)
            .map(|mut d| d.next().is_none())
            .unwrap_or(false);
        if empty {
            return Ok(());
        }
        if let Err(why) = owned_dir(dst, kind) {
            return refuse(format!(
                "it exists and {why}; dpllm replaces only outputs it wrote itself"
            ));
        }
        if !force {
            return refuse("it already exists (use --force to replace it)".into());
        }
        return Ok(());
    }
    if meta.is_dir() {
        return refuse(format!("it is a directory, not {}", kind.describe()));
    }
    if !owned_file(dst, kind) {
        return refuse(format!(
            "it exists and is not {} written by dpllm; dpllm replaces only its own outputs (remove it or choose another path)",
            kind.describe()
        ));
    }
    Ok(())
}

/// The directory `path` goes into ("." for a bare name).
pub fn parent_dir(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// `path` with its directory resolved (symbolic links, `..`); the last component kept as is.
fn resolved(path: &Path) -> Option<PathBuf> {
    let name = path.file_name()?;
    Some(parent_dir(path).canonicalize().ok()?.join(name))
}

/// Check, before any work, that a command may write a `kind` output at `dst`:
/// it is none of `inputs` nor an ancestor of one, its directory exists and is
/// writable, and an existing `dst` may be replaced ([`check_replaceable`]).
pub fn check_output(dst: &Path, kind: OutputKind, inputs: &[&Path], force: bool) -> Result<()> {
    if dst.file_name().is_none() {
        return Err(FormatError::refused(
            dst,
            "it does not name a file or directory",
        ));
    }
    let parent = parent_dir(dst);
    if !parent.is_dir() {
        return Err(FormatError::refused(
            dst,
            format!("the directory {} does not exist", parent.display()),
        ));
    }
    let target = resolved(dst)
        .ok_or_else(|| FormatError::refused(dst, "its directory cannot be resolved"))?;
    let target = target.canonicalize().unwrap_or(target);
    for input in inputs {
        let Ok(i) = input.canonicalize() else {
            continue;
        };
        if i == target {
            return Err(FormatError::refused(
                dst,
                format!("it is an input of this command ({})", input.display()),
            ));
        }
        if i.starts_with(&target) {
            return Err(FormatError::refused(
                dst,
                format!("it contains an input of this command ({})", input.display()),
            ));
        }
    }
    check_replaceable(dst, kind, force)?;
    probe_writable(dst)
}

/// Create and remove a file beside `dst`: the directory accepts new files.
fn probe_writable(dst: &Path) -> Result<()> {
    let name = dst
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // Named like a temporary, so that a run killed right here leaves nothing the next run keeps.
    let probe = parent_dir(dst).join(format!(".{name}.tmp-{}-probe", std::process::id()));
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
    {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(FormatError::write(dst, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model_dir(root: &Path) -> PathBuf {
        let d = root.join("q");
        std::fs::create_dir(&d).unwrap();
        std::fs::write(d.join("config.json"), "{}").unwrap();
        Manifest::new(
            OutputKind::AnyPrecModel,
            vec!["config.json".into()],
            serde_json::Value::Null,
        )
        .write(&d)
        .unwrap();
        d
    }

    #[test]
    fn only_dpllm_directories_are_replaced_and_only_with_force() {
        let t = tempfile::tempdir().unwrap();
        let q = model_dir(t.path());
        check_replaceable(&q, OutputKind::AnyPrecModel, true).unwrap();
        let e = check_replaceable(&q, OutputKind::AnyPrecModel, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("already exists") && e.contains("--force"), "{e}");
        let e = check_replaceable(&q, OutputKind::Plans, true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a plan directory"), "{e}");
        // A plans/ container of owned budget directories is part of the model.
        let b = q.join("plans").join("budget-5.00");
        std::fs::create_dir_all(&b).unwrap();
        Manifest::new(OutputKind::Plans, vec![], serde_json::Value::Null)
            .write(&b)
            .unwrap();
        check_replaceable(&q, OutputKind::AnyPrecModel, true).unwrap();
        // Anything else the user put there blocks replacement, named.
        std::fs::write(q.join("plans").join("notes.txt"), "mine").unwrap();
        std::fs::write(q.join("my-results.csv"), "mine").unwrap();
        let e = check_replaceable(&q, OutputKind::AnyPrecModel, true)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("my-results.csv") && e.contains("plans/notes.txt"),
            "{e}"
        );
        // A directory without a manifest is never replaced; an empty one is free.
        let src = t.path().join("src");
        std::fs::create_dir(&src).unwrap();
        check_replaceable(&src, OutputKind::AnyPrecModel, true).unwrap();
        std::fs::write(src.join("model.safetensors"), "w").unwrap();
        let e = check_replaceable(&src, OutputKind::AnyPrecModel, true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not written by dpllm"), "{e}");
        let e = check_replaceable(
            &src.join("model.safetensors"),
            OutputKind::AnyPrecModel,
            true,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("is a file"), "{e}");
    }

    #[test]
    fn result_files_are_recognised_by_their_markers() {
        let t = tempfile::tempdir().unwrap();
        let j = t.path().join("r.json");
        std::fs::write(&j, format!("{{\"{JSON_MARKER}\": \"0.1.0\", \"x\": 1}}")).unwrap();
        check_replaceable(&j, OutputKind::Json, false).unwrap();
        std::fs::write(&j, "{\"x\": 1}").unwrap();
        assert!(check_replaceable(&j, OutputKind::Json, true).is_err());
        let m = t.path().join("r.md");
        std::fs::write(&m, format!("| a |\n{MARKDOWN_MARKER} 0.1.0 -->\n")).unwrap();
        check_replaceable(&m, OutputKind::Markdown, false).unwrap();
        assert!(check_replaceable(&m, OutputKind::Json, false).is_err());
        std::fs::write(&m, "# my notes\n").unwrap();
        let e = check_replaceable(&m, OutputKind::Markdown, true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a Markdown report written by dpllm"), "{e}");
        assert!(check_replaceable(&t.path().join("new.md"), OutputKind::Markdown, false).is_ok());
        assert!(check_replaceable(t.path(), OutputKind::Json, false)
            .unwrap_err()
            .to_string()
            .contains("is a directory"));
    }

    #[test]
    fn outputs_never_overlap_inputs_and_need_an_existing_directory() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        std::fs::create_dir(&src).unwrap();
        std::fs::write(src.join("w"), "w").unwrap();
        let e = check_output(&src, OutputKind::AnyPrecModel, &[&src], true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("is an input"), "{e}");
        let e = check_output(t.path(), OutputKind::AnyPrecModel, &[&src], true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("contains an input"), "{e}");
        // The same directory reached through `..` is still the input.
        let e = check_output(
            &src.join("..").join("src"),
            OutputKind::AnyPrecModel,
            &[&src],
            true,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("is an input"), "{e}");
        let e = check_output(&t.path().join("missing/out"), OutputKind::Json, &[], false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not exist"), "{e}");
        check_output(
            &t.path().join("out"),
            OutputKind::AnyPrecModel,
            &[&src],
            false,
        )
        .unwrap();
        assert_eq!(
            std::fs::read_dir(t.path()).unwrap().count(),
            1,
            "the write probe was left behind"
        );
    }
}
