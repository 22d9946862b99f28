//! Writing results as JSON next to the printed tables.

use std::io::Write;
use std::path::Path;

use dpllm_format::output::{JSON_MARKER, VERSION};
use dpllm_format::OutputKind;

/// Serialize `value` as pretty JSON, marked with the dpllm version that wrote it
/// (so a later run may refresh it), and write it atomically to `path`. An
/// existing file is replaced only when it is a JSON result dpllm wrote.
pub fn write_json(path: &Path, value: &impl serde::Serialize) -> anyhow::Result<()> {
    let mut v = serde_json::to_value(value)?;
    if let Some(obj) = v.as_object_mut() {
        obj.insert(JSON_MARKER.into(), VERSION.into());
    }
    let text = serde_json::to_string_pretty(&v)?;
    dpllm_format::write_output_file(path, OutputKind::Json, |f| f.write_all(text.as_bytes()))?;
    Ok(())
}
