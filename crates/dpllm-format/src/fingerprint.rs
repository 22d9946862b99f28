//! Content fingerprints (sha256) of the inputs a stage was made from, so that a
//! cache can tell whether a stored stage still matches what it is asked for.

use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::{anyprec, Checkpoint, FormatError, Result};

/// Lowercase hex sha256 of a file's content.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| FormatError::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| FormatError::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

/// Lowercase hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Fingerprint of the model in `dir`: sha256 over the names and content hashes
/// of its config, tokenizer files and weight files (every shard), or of the GGUF file `dir`.
pub fn model_fingerprint(dir: &Path) -> Result<String> {
    if crate::gguf::is_gguf(dir) {
        return sha256_file(dir);
    }
    let mut files: Vec<std::path::PathBuf> =
        ["config.json", "tokenizer.json", "tokenizer_config.json"]
            .iter()
            .map(|f| dir.join(f))
            .filter(|p| p.is_file())
            .collect();
    if anyprec::is_anyprec_dir(dir) {
        files.push(dir.join(anyprec::ANYPREC_WEIGHTS));
    } else {
        files.extend(
            Checkpoint::open(dir)?
                .shard_paths()
                .into_iter()
                .map(Path::to_path_buf),
        );
    }
    let mut h = Sha256::new();
    for f in &files {
        let name = f
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        h.update(format!("{name}\0{}\n", sha256_file(f)?).as_bytes());
    }
    Ok(hex(&h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_digest_and_content_sensitivity() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.txt");
        std::fs::write(&p, "abc").unwrap();
        assert_eq!(
            sha256_file(&p).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        std::fs::write(d.path().join("config.json"), "{}").unwrap();
        std::fs::write(
            d.path().join("model.safetensors"),
            b"\x02\x00\x00\x00\x00\x00\x00\x00{}",
        )
        .unwrap();
        let a = model_fingerprint(d.path()).unwrap();
        std::fs::write(d.path().join("config.json"), "{ }").unwrap();
        assert_ne!(a, model_fingerprint(d.path()).unwrap());
        assert!(sha256_file(&d.path().join("missing")).is_err());
    }
}
