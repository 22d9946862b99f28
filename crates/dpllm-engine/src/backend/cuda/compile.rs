//! CUDA C to PTX through NVRTC at run time, for the GPU's own architecture,
//! cached on disk: the key is a hash of the source, the architecture, the
//! options and the NVRTC library found, and a cache file is written whole
//! (temporary file, then rename) so a crash never leaves half a PTX behind.

use std::path::PathBuf;

use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions, Ptx};
use sha2::{Digest, Sha256};

use crate::error::{EngineError, Result};

/// Options every kernel is compiled with (besides the architecture).
const OPTIONS: [&str; 2] = ["--std=c++17", "-lineinfo"];

/// Where PTX is cached: `$DPLLM_CACHE_DIR/ptx`, else `$XDG_CACHE_HOME/dpllm/ptx`,
/// else `~/.cache/dpllm/ptx`; `None` when none of them is set.
pub fn cache_dir() -> Option<PathBuf> {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    env("DPLLM_CACHE_DIR")
        .or_else(|| env("XDG_CACHE_HOME").map(|d| d.join("dpllm")))
        .or_else(|| env("HOME").map(|d| d.join(".cache").join("dpllm")))
        .map(|d| d.join("ptx"))
}

/// The cache file of `source` compiled for compute capability `arch`.
/// `nvrtc` is NVRTC's version (a newer NVRTC may emit other PTX).
fn cache_file(
    dir: &std::path::Path,
    name: &str,
    source: &str,
    arch: (i32, i32),
    nvrtc: Option<(i32, i32)>,
) -> PathBuf {
    let mut h = Sha256::new();
    h.update(source.as_bytes());
    h.update(format!("{arch:?} {OPTIONS:?} nvrtc {nvrtc:?}").as_bytes());
    let hex: String = h.finalize()[..12]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    dir.join(format!("{name}-sm{}{}-{hex}.ptx", arch.0, arch.1))
}

/// NVRTC's version (the library must be present).
fn nvrtc_version() -> Option<(i32, i32)> {
    let (mut major, mut minor) = (0, 0);
    // SAFETY: plain out-parameters; the library was found before any compile.
    let r = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    (r == cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS).then_some((major, minor))
}

/// The architectures every kernel must compile for: the paper's edge and
/// consumer GPUs (Jetson Orin sm_87, RTX 40xx sm_89) and Hopper.
pub const TARGETS: [(i32, i32); 3] = [(8, 7), (8, 9), (9, 0)];

/// Whether NVRTC (libnvrtc.so) loads in this process.
pub fn nvrtc_present() -> bool {
    // SAFETY: only asks whether the library can be opened.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// For tests: every `(name, source, kernels)` compiles for each of
/// [`TARGETS`] and its PTX holds the named kernels. `Ok(false)`, with a
/// message, where NVRTC is not found (no GPU is needed).
pub fn check_compiles(sources: &[(&str, &str, &[&str])]) -> Result<bool> {
    if !nvrtc_present() {
        eprintln!(
            "SKIP kernel compile check: NVRTC (libnvrtc.so) not found (tools/fetch-nvrtc.sh caches one)"
        );
        return Ok(false);
    }
    for arch in TARGETS {
        for (name, source, kernels) in sources {
            let ptx = ptx(name, source, arch)?.to_src();
            if let Some(k) = kernels.iter().find(|k| !ptx.contains(**k)) {
                return Err(EngineError::Device(format!(
                    "{name} for {arch:?}: no kernel {k}"
                )));
            }
        }
    }
    Ok(true)
}

/// Environment variable naming a folder of kernel sources that replace the
/// built-in ones, for timing kernel variants with one binary: a file
/// `<name>.cu` there (the whole module, headers included, as the built-in
/// source concatenates them) is compiled instead of module `name`'s source.
pub const SOURCE_DIR_ENV: &str = "DPLLM_KERNEL_SOURCE_DIR";

/// Module `name`'s source from [`SOURCE_DIR_ENV`]'s folder, when that is set
/// and holds `<name>.cu`; `None` otherwise. A file that cannot be read is an
/// error, never a silent fall-back to the built-in source.
fn source_override(name: &str) -> Result<Option<String>> {
    let Some(dir) = std::env::var_os(SOURCE_DIR_ENV).filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    let file = PathBuf::from(dir).join(format!("{name}.cu"));
    if !file.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&file).map_err(|e| {
        EngineError::Device(format!("reading kernel source {}: {e}", file.display()))
    })?;
    tracing::warn!(
        "kernel module {name}: source replaced by {}",
        file.display()
    );
    Ok(Some(text))
}

/// PTX of `source` (named `name` in messages and cache files) for compute
/// capability `arch`: from the cache when present, else compiled and cached.
/// A `<name>.cu` in [`SOURCE_DIR_ENV`]'s folder replaces `source`.
pub fn ptx(name: &str, source: &str, arch: (i32, i32)) -> Result<Ptx> {
    let replaced = source_override(name)?;
    let source = replaced.as_deref().unwrap_or(source);
    // SAFETY: only asks whether the library can be opened.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(EngineError::Device(
            "NVRTC (libnvrtc.so) was not found: install the CUDA toolkit's NVRTC or add \
             its directory to LD_LIBRARY_PATH"
                .into(),
        ));
    }
    let version = nvrtc_version();
    let file = cache_dir().map(|d| cache_file(&d, name, source, arch, version));
    if let Some(text) = file.as_ref().and_then(|f| std::fs::read_to_string(f).ok()) {
        return Ok(Ptx::from_src(text));
    }
    let opts = CompileOptions {
        options: OPTIONS
            .iter()
            .map(|s| s.to_string())
            .chain([format!("--gpu-architecture=compute_{}{}", arch.0, arch.1)])
            .collect(),
        name: Some(format!("{name}.cu")),
        ..Default::default()
    };
    let ptx = compile_ptx_with_opts(source, opts)
        .map_err(|e| EngineError::Device(format!("NVRTC could not compile {name}.cu: {e}")))?;
    if let Some(file) = file {
        // A cache that cannot be written only costs the next start a compile.
        let _ = write_atomically(&file, ptx.to_src().as_bytes());
    }
    Ok(ptx)
}

/// Write `bytes` to `path` through a temporary file in the same directory.
fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(std::path::Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_keys_follow_source_and_architecture() {
        let d = std::path::Path::new("/c");
        let v = Some((13, 0));
        let a = cache_file(d, "k", "src", (9, 0), v);
        assert_eq!(a, cache_file(d, "k", "src", (9, 0), v));
        assert_ne!(a, cache_file(d, "k", "src2", (9, 0), v));
        assert_ne!(a, cache_file(d, "k", "src", (8, 9), v));
        assert_ne!(a, cache_file(d, "k", "src", (9, 0), Some((13, 1))));
        assert!(a.to_string_lossy().starts_with("/c/k-sm90-"));
    }

    #[test]
    fn kernel_sources_are_replaced_only_by_a_named_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("mine.cu"), "// variant").unwrap();
        std::env::set_var(SOURCE_DIR_ENV, dir.path());
        let mine = source_override("mine").unwrap();
        let other = source_override("other").unwrap();
        std::env::remove_var(SOURCE_DIR_ENV);
        assert_eq!(mine.as_deref(), Some("// variant"));
        assert_eq!(other, None);
        assert_eq!(source_override("mine").unwrap(), None);
    }

    #[test]
    fn cache_files_are_written_whole() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("sub").join("x.ptx");
        write_atomically(&f, b"ptx text").unwrap();
        write_atomically(&f, b"newer").unwrap();
        assert_eq!(std::fs::read(&f).unwrap(), b"newer");
        assert_eq!(std::fs::read_dir(f.parent().unwrap()).unwrap().count(), 1);
    }
}
