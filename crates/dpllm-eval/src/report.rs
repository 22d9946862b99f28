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
/// `device`: the backend that ran, from a `backend` field of `value` or of
/// `extra` such as "cuda:0 (NVIDIA H100 …)", else the CPU; `host`: the CPU)
/// and the `extra` fields, and write it atomically to `path`. An existing
/// file is replaced only when it is a JSON result dpllm wrote.
pub fn write_json_with(
    path: &Path,
    value: &impl serde::Serialize,
    extra: serde_json::Map<String, serde_json::Value>,
) -> anyhow::Result<()> {
    let mut v = serde_json::to_value(value)?;
    if let Some(obj) = v.as_object_mut() {
        obj.insert(JSON_MARKER.into(), VERSION.into());
        obj.insert("git_revision".into(), GIT_REVISION.into());
        obj.extend(extra);
        let host = device();
        let ran_on = match obj.get("backend").and_then(|b| b.as_str()) {
            Some(b) if !b.starts_with("cpu") => b.to_string(),
            _ => host.clone(),
        };
        obj.insert("device".into(), ran_on.into());
        obj.insert("host".into(), host.into());
    }
    let text = serde_json::to_string_pretty(&v)?;
    dpllm_format::write_output_file(path, OutputKind::Json, |f| f.write_all(text.as_bytes()))?;
    Ok(())
}

/// [`write_json_with`] without extra fields.
pub fn write_json(path: &Path, value: &impl serde::Serialize) -> anyhow::Result<()> {
    write_json_with(path, value, serde_json::Map::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The JSON's fields, written by [`write_json`] from `value`.
    fn written(value: serde_json::Value) -> serde_json::Value {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.json");
        write_json(&p, &value).unwrap();
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
    }

    #[test]
    fn the_device_is_the_backend_that_ran_and_the_host_its_cpu() {
        let gpu = written(serde_json::json!({"backend": "cuda:0 (H100)", "x": 1}));
        assert_eq!(gpu["device"], "cuda:0 (H100)");
        assert!(gpu["host"].as_str().unwrap().starts_with("cpu: "), "{gpu}");
        assert_eq!(gpu["x"], 1);
        assert_eq!(gpu["dpllm_version"], VERSION);
        let cpu = written(serde_json::json!({"backend": "cpu (avx2)"}));
        assert_eq!(cpu["device"], cpu["host"]);
        assert_eq!(written(serde_json::json!({}))["device"], device());
    }
}
