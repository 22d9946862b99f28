//! Writing results as JSON next to the printed tables.

use std::path::Path;

/// Serialize `value` as pretty JSON and write it atomically to `path`.
pub fn write_json(path: &Path, value: &impl serde::Serialize) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    // FormatError::Io reads "cannot read PATH"; say what actually failed.
    dpllm_format::write_atomic(path, text.as_bytes()).map_err(|e| match e {
        dpllm_format::FormatError::Io { source, .. } => anyhow::anyhow!("cannot write {}: {source}", path.display()),
        other => other.into(),
    })?;
    Ok(())
}
