//! The any-precision model format (see `docs/format.md`).
//!
//! A quantized model directory holds the source `config.json` and tokenizer
//! files plus one safetensors file, [`ANYPREC_WEIGHTS`], in which every quantized
//! linear `P` (e.g. `model.layers.0.self_attn.q_proj`) is stored as
//! - `P.planes`: U32 `[8, out, ceil(in/32)]`, plane-major: for plane j and row
//!   r, word w holds bit (7 − j) of the 8-bit indices of columns 32w .. 32w+31
//!   (bit t ↔ column 32w + t, padding bits zero). A b-bit index is the top b bits:
//!   planes 0..b−1, the first b slabs of the tensor.
//! - `P.lut{b}` for b = seed..8: F16 `[out, 2^b]`, the centroids of each row.
//! - `P.bias` when the source has one (unquantized).
//!
//! Every other tensor (embeddings, norms, lm_head) is copied unchanged from the
//! source. `__metadata__` carries [`AnyPrecInfo`].

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use half::f16;

use crate::{Checkpoint, FormatError, Result};

/// File name of the quantized weights inside a model directory.
pub const ANYPREC_WEIGHTS: &str = "dpllm-anyprec.safetensors";
/// `format` metadata value.
pub const FORMAT_NAME: &str = "dpllm-anyprec";
/// Current format version (2: plane-major `planes`).
pub const FORMAT_VERSION: u32 = 2;
/// Bit-planes stored per weight (the parent precision).
pub const STORED_BITS: u32 = 8;

/// Words (32 columns each) per row and plane.
pub fn words_per_row(cols: usize) -> usize {
    cols.div_ceil(32)
}

/// Bytes one pass over a `[rows × cols]` any-precision weight reads at `bits`:
/// b planes of `words_per_row(cols)` u32 words plus the f16 LUT of every row.
pub fn bytes_at(rows: usize, cols: usize, bits: u32) -> usize {
    rows * (bits as usize * words_per_row(cols) * 4 + (2usize << bits))
}

/// Name of the bit-plane tensor of linear `prefix`.
pub fn planes_name(prefix: &str) -> String {
    format!("{prefix}.planes")
}

/// Name of the b-bit centroid table of linear `prefix`.
pub fn lut_name(prefix: &str, bits: u32) -> String {
    format!("{prefix}.lut{bits}")
}

/// True when `dir` holds an any-precision model.
pub fn is_anyprec_dir(dir: &Path) -> bool {
    dir.join(ANYPREC_WEIGHTS).is_file()
}

/// File-level facts stored in the safetensors metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct AnyPrecInfo {
    /// Format version.
    pub version: u32,
    /// Lowest precision with a LUT (the k-means seed).
    pub seed_bits: u32,
    /// Highest precision stored (the parent model).
    pub max_bits: u32,
    /// Hugging Face architecture name.
    pub architecture: String,
    /// Free-form provenance (source model, sensitivity file, calibration).
    pub provenance: BTreeMap<String, String>,
}

impl AnyPrecInfo {
    /// Metadata map to store.
    pub fn to_metadata(&self) -> BTreeMap<String, String> {
        let mut m = self.provenance.clone();
        m.insert("format".into(), FORMAT_NAME.into());
        m.insert("version".into(), self.version.to_string());
        m.insert("seed_bits".into(), self.seed_bits.to_string());
        m.insert("max_bits".into(), self.max_bits.to_string());
        m.insert("architecture".into(), self.architecture.clone());
        m
    }

    /// Parse and validate stored metadata; `path` names the file in errors.
    pub fn from_metadata(m: &HashMap<String, String>, path: &Path) -> Result<AnyPrecInfo> {
        let get = |k: &str| {
            m.get(k).ok_or_else(|| {
                FormatError::invalid(
                    path,
                    format!("metadata has no {k:?}: not a dpllm any-precision file"),
                )
            })
        };
        if get("format")? != FORMAT_NAME {
            return Err(FormatError::invalid(
                path,
                format!(
                    "metadata format is {:?}, expected {FORMAT_NAME:?}",
                    m["format"]
                ),
            ));
        }
        let num = |k: &str| -> Result<u32> {
            get(k)?
                .parse()
                .map_err(|_| FormatError::invalid(path, format!("metadata {k:?} is not a number")))
        };
        let version = num("version")?;
        if version != FORMAT_VERSION {
            return Err(FormatError::invalid(
                path,
                format!("format version {version}; this dpllm reads version {FORMAT_VERSION}"),
            ));
        }
        let seed_bits = num("seed_bits")?;
        let max_bits = num("max_bits")?;
        if !(1..=max_bits).contains(&seed_bits) || max_bits != STORED_BITS {
            return Err(FormatError::invalid(
                path,
                format!("bad precisions: seed {seed_bits}, max {max_bits}"),
            ));
        }
        let reserved = ["format", "version", "seed_bits", "max_bits", "architecture"];
        Ok(AnyPrecInfo {
            version,
            seed_bits,
            max_bits,
            architecture: get("architecture")?.clone(),
            provenance: m
                .iter()
                .filter(|(k, _)| !reserved.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        })
    }
}

/// Read the bit-planes of linear `prefix` [rows × cols], keeping planes 0..`keep`:
/// returns u32 words laid out plane-major, [keep][rows][words] (the first `keep`
/// slabs of the tensor: a contiguous prefix of the file).
pub fn read_planes(
    ck: &Checkpoint,
    prefix: &str,
    rows: usize,
    cols: usize,
    keep: u32,
) -> Result<Vec<u32>> {
    let name = planes_name(prefix);
    let words = words_per_row(cols);
    let (info, bytes) = ck.raw(&name)?;
    let expect = [STORED_BITS as usize, rows, words];
    if info.dtype != safetensors::Dtype::U32 || info.shape != expect {
        return Err(FormatError::BadTensor {
            name,
            path: ck.shard_path_of(info).into(),
            reason: format!(
                "{:?} {:?}, expected U32 {:?}",
                info.dtype, info.shape, expect
            ),
        });
    }
    let n = keep as usize * rows * words;
    Ok(bytes[..4 * n]
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// Read the b-bit centroid table of linear `prefix` [rows × 2^b] (f16, checked finite).
pub fn read_lut(ck: &Checkpoint, prefix: &str, rows: usize, bits: u32) -> Result<Vec<f16>> {
    let name = lut_name(prefix, bits);
    let (info, bytes) = ck.raw(&name)?;
    let expect = [rows, 1usize << bits];
    if info.dtype != safetensors::Dtype::F16 || info.shape != expect {
        return Err(FormatError::BadTensor {
            name,
            path: ck.shard_path_of(info).into(),
            reason: format!(
                "{:?} {:?}, expected F16 {:?}",
                info.dtype, info.shape, expect
            ),
        });
    }
    let lut: Vec<f16> = bytes
        .chunks_exact(2)
        .map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])))
        .collect();
    if let Some(i) = lut.iter().position(|v| !v.is_finite()) {
        return Err(FormatError::BadTensor {
            name,
            path: ck.shard_path_of(info).into(),
            reason: format!("centroid {i} is not finite (corrupt file?)"),
        });
    }
    Ok(lut)
}

/// Name of the per-precision weighted squared error vector of linear `prefix`.
pub fn sq_err_name(prefix: &str) -> String {
    format!("{prefix}.sq_err")
}

/// Σ F·(W − Q_b(W))² of linear `prefix` for b = seed..=8 (written by the quantizer).
pub fn read_sq_err(ck: &Checkpoint, prefix: &str, seed_bits: u32) -> Result<Vec<f64>> {
    let name = sq_err_name(prefix);
    let n = (STORED_BITS - seed_bits + 1) as usize;
    let v = ck.tensor_f32(&name, &[n])?;
    if let Some(i) = v.iter().position(|x| !x.is_finite() || *x < 0.0) {
        let info = ck.info(&name).expect("tensor_f32 found it");
        return Err(FormatError::BadTensor {
            name,
            path: ck.shard_path_of(info).into(),
            reason: format!("error {i} is {} (corrupt file?)", v[i]),
        });
    }
    Ok(v.into_iter().map(f64::from).collect())
}
