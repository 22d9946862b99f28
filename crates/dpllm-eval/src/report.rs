//! Writing results as JSON next to the printed tables.

use std::path::Path;

/// Serialize `value` as pretty JSON and write it atomically to `path`.
pub fn write_json(path: &Path, value: &impl serde::Serialize) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    dpllm_format::write_atomic(path, text.as_bytes())?;
    Ok(())
}
