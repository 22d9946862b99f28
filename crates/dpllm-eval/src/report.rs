//! Writing results as JSON next to the printed tables, with their provenance.

use std::io::Write;
use std::path::Path;

use dpllm_format::output::{JSON_MARKER, VERSION};
use dpllm_format::OutputKind;

/// The git revision dpllm was built from (`-dirty` with uncommitted changes).
pub const GIT_REVISION: &str = match option_env!("DPLLM_GIT_REVISION") {
    Some(r) => r,
    None => "unknown",
};

/// What ran the measurement: "cpu: MODEL NAME, N threads".
pub fn device() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    format!("cpu: {cpu}, {} threads", rayon::current_num_threads())
}

/// Serialize `value` as pretty JSON with its provenance (dpllm version, which
/// also marks the file as dpllm's so a later run may refresh it; git revision;
/// device) and the `extra` fields, and write it atomically to `path`. An
/// existing file is replaced only when it is a JSON result dpllm wrote.
pub fn write_json_with(
    path: &Path,
    value: &impl serde::Serialize,
    extra: serde_json::Map<String, serde_json::Value>,
) -> anyhow::Result<()> {
    let mut v = serde_json::to_value(value)?;
    if let Some(obj) = v.as_object_mut() {
        obj.insert(JSON_MARKER.into(), VERSION.into());
        obj.insert("git_revision".into(), GIT_REVISION.into());
        obj.insert("device".into(), device().into());
        obj.extend(extra);
    }
    let text = serde_json::to_string_pretty(&v)?;
    dpllm_format::write_output_file(path, OutputKind::Json, |f| f.write_all(text.as_bytes()))?;
    Ok(())
}

/// [`write_json_with`] without extra fields.
pub fn write_json(path: &Path, value: &impl serde::Serialize) -> anyhow::Result<()> {
    write_json_with(path, value, serde_json::Map::new())
}
