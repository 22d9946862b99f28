//! A checkpoint directory: one or many memory-mapped safetensors shards.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::SafeTensors;
use serde_json::Value;

use crate::{DType, FormatError, Result, TensorData};

/// Where one tensor lives and what it is.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// Index of the shard in [`Checkpoint::shards`].
    pub shard: usize,
    /// Stored element type as safetensors names it.
    pub dtype: safetensors::Dtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// The ggml type it is stored in, for tensors of a GGUF file (read as F32).
    pub ggml: Option<crate::gguf::GgmlType>,
    offset: usize,
    len: usize,
}

impl TensorInfo {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Stored bytes.
    pub fn nbytes(&self) -> usize {
        self.len
    }
}

struct Shard {
    path: PathBuf,
    map: Mmap,
    metadata: HashMap<String, String>,
}

/// A GGUF file behind a checkpoint: Hugging Face names → GGUF tensors, read as f32.
struct GgufSource {
    file: crate::gguf::GgufFile,
    /// Hugging Face name → GGUF name.
    names: HashMap<String, String>,
    /// (query heads, key/value heads) when llama.cpp permuted the q/k rows.
    unpermute: Option<(usize, usize)>,
    /// Dequantized f32 bytes of the tensors [`Checkpoint::raw`] was asked for.
    raw: HashMap<String, std::sync::OnceLock<Vec<u8>>>,
}

impl GgufSource {
    /// Tensor `hf` (a Hugging Face name) as f32, q/k rows in Hugging Face order.
    fn read(&self, hf: &str, info: &TensorInfo) -> Result<Vec<f32>> {
        let w = self.file.dequantize(&self.names[hf])?;
        let rows = info.shape[0];
        let cols = info.numel() / rows.max(1);
        let heads = match self.unpermute {
            Some((q, _)) if hf.contains(".self_attn.q_proj.") => Some(q),
            Some((_, kv)) if hf.contains(".self_attn.k_proj.") => Some(kv),
            _ => None,
        };
        Ok(match heads {
            Some(h) => crate::gguf::model::unpermute_rows(&w, rows, cols, h),
            None => w,
        })
    }
}

/// All safetensors shards of a model directory, or one GGUF file, indexed by
/// (Hugging Face) tensor name.
pub struct Checkpoint {
    dir: PathBuf,
    shards: Vec<Shard>,
    tensors: HashMap<String, TensorInfo>,
    gguf: Option<GgufSource>,
}

/// Shard files of a directory: from `model.safetensors.index.json` when present,
/// else `model.safetensors`, else every `*.safetensors` file.
fn shard_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| FormatError::io(&index, e))?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| FormatError::invalid(&index, format!("not valid JSON: {e}")))?;
        let map = v
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| FormatError::invalid(&index, "no \"weight_map\" object"))?;
        let mut files: Vec<String> = Vec::new();
        for (name, f) in map {
            let f = f.as_str().ok_or_else(|| {
                FormatError::invalid(&index, format!("weight_map[{name:?}] is not a file name"))
            })?;
            if f.contains('/') || f.contains("..") {
                return Err(FormatError::invalid(
                    &index,
                    format!("shard name {f:?} must be a plain file name"),
                ));
            }
            if !files.iter().any(|x| x == f) {
                files.push(f.to_string());
            }
        }
        files.sort();
        let paths: Vec<PathBuf> = files.iter().map(|f| dir.join(f)).collect();
        for p in &paths {
            if !p.exists() {
                return Err(FormatError::Missing {
                    path: p.clone(),
                    what: format!("it is listed in {}", index.display()),
                });
            }
        }
        return Ok(paths);
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| FormatError::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    paths.sort();
    if paths.is_empty() {
        return Err(FormatError::Missing {
            path: dir.join("model.safetensors"),
            what: "no *.safetensors weights in the model directory".into(),
        });
    }
    Ok(paths)
}

impl Checkpoint {
    /// Open every shard of the model in `dir` (or the GGUF file `dir`) and index its tensors.
    pub fn open(dir: &Path) -> Result<Checkpoint> {
        if crate::gguf::is_gguf(dir) {
            return Self::open_gguf(dir);
        }
        if !dir.is_dir() {
            return Err(FormatError::Missing {
                path: dir.into(),
                what: "model directory not found".into(),
            });
        }
        let mut shards = Vec::new();
        let mut tensors = HashMap::new();
        for path in shard_files(dir)? {
            let (shard, infos) = Self::open_shard(&path, shards.len())?;
            for (name, info) in infos {
                if tensors.insert(name.clone(), info).is_some() {
                    return Err(FormatError::invalid(
                        &path,
                        format!("tensor {name:?} also appears in another shard"),
                    ));
                }
            }
            shards.push(shard);
        }
        Ok(Checkpoint {
            dir: dir.into(),
            shards,
            tensors,
            gguf: None,
        })
    }

    /// Open a GGUF file: its tensors under their Hugging Face names, read as f32
    /// (dequantized; llama.cpp's q/k row permutation undone).
    pub fn open_gguf(path: &Path) -> Result<Checkpoint> {
        let file = crate::gguf::GgufFile::open(path)?;
        let (_, cfg) = crate::gguf::model::config(&file)?;
        let unpermute =
            crate::gguf::model::permutes_qk(&file).then_some((cfg.num_heads, cfg.num_kv_heads));
        let arch = crate::gguf::model::arch(&file)?.to_string();
        let mut tensors = HashMap::new();
        let mut names = HashMap::new();
        for t in file.tensors() {
            if let Some(hf) = crate::gguf::model::hf_name(&t.name, &arch) {
                let info = TensorInfo {
                    shard: 0,
                    dtype: safetensors::Dtype::F32,
                    shape: t.shape.clone(),
                    ggml: Some(t.dtype),
                    offset: 0,
                    len: t.nbytes,
                };
                tensors.insert(hf.clone(), info);
                names.insert(hf, t.name.clone());
            }
        }
        let raw = names
            .keys()
            .map(|k| (k.clone(), std::sync::OnceLock::new()))
            .collect();
        let f = File::open(path).map_err(|e| FormatError::io(path, e))?;
        // SAFETY: read-only map, as in `open_shard`; only its path is used for GGUF.
        let map = unsafe { Mmap::map(&f) }.map_err(|e| FormatError::io(path, e))?;
        Ok(Checkpoint {
            dir: path.into(),
            shards: vec![Shard {
                path: path.into(),
                map,
                metadata: HashMap::new(),
            }],
            tensors,
            gguf: Some(GgufSource {
                file,
                names,
                unpermute,
                raw,
            }),
        })
    }

    /// The GGUF file behind this checkpoint, if it is one.
    pub fn gguf(&self) -> Option<&crate::gguf::GgufFile> {
        self.gguf.as_ref().map(|g| &g.file)
    }

    /// Open a single safetensors file as a checkpoint.
    pub fn open_file(path: &Path) -> Result<Checkpoint> {
        let (shard, infos) = Self::open_shard(path, 0)?;
        Ok(Checkpoint {
            dir: path.parent().unwrap_or(Path::new(".")).into(),
            shards: vec![shard],
            tensors: infos.into_iter().collect(),
            gguf: None,
        })
    }

    fn open_shard(path: &Path, idx: usize) -> Result<(Shard, Vec<(String, TensorInfo)>)> {
        let file = File::open(path).map_err(|e| FormatError::io(path, e))?;
        // SAFETY: the map is read-only; a file changed underneath us while
        // mapped is outside what any mmap-based loader can guard against.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| FormatError::io(path, e))?;
        let st = SafeTensors::deserialize(&map).map_err(|e| {
            FormatError::invalid(
                path,
                format!("not a valid safetensors file (truncated or corrupt?): {e}"),
            )
        })?;
        let (_, meta) = SafeTensors::read_metadata(&map).map_err(|e| {
            FormatError::invalid(path, format!("not a valid safetensors header: {e}"))
        })?;
        let metadata = meta.metadata().clone().unwrap_or_default();
        let base = map.as_ptr() as usize;
        let infos = st
            .tensors()
            .into_iter()
            .map(|(name, view)| {
                let data = view.data();
                let info = TensorInfo {
                    shard: idx,
                    dtype: view.dtype(),
                    shape: view.shape().to_vec(),
                    ggml: None,
                    offset: data.as_ptr() as usize - base,
                    len: data.len(),
                };
                (name, info)
            })
            .collect();
        Ok((
            Shard {
                path: path.into(),
                map,
                metadata,
            },
            infos,
        ))
    }

    /// The model directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Paths of the shard files.
    pub fn shard_paths(&self) -> Vec<&Path> {
        self.shards.iter().map(|s| s.path.as_path()).collect()
    }

    /// The `__metadata__` string map of the first shard (empty when absent).
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.shards[0].metadata
    }

    /// Path of the shard that holds a tensor.
    pub fn shard_path_of(&self, info: &TensorInfo) -> &Path {
        &self.shards[info.shard].path
    }

    /// Metadata of a tensor, if present.
    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }

    /// True when the tensor exists.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// All tensors, sorted by name.
    pub fn tensors(&self) -> BTreeMap<&str, &TensorInfo> {
        self.tensors.iter().map(|(k, v)| (k.as_str(), v)).collect()
    }

    /// Raw stored bytes of a tensor (for a GGUF file: its f32 values, dequantized once).
    pub fn raw(&self, name: &str) -> Result<(&TensorInfo, &[u8])> {
        let info = self
            .tensors
            .get(name)
            .ok_or_else(|| FormatError::MissingTensor {
                name: name.into(),
                dir: self.dir.clone(),
            })?;
        if let Some(g) = &self.gguf {
            let cell = &g.raw[name];
            if cell.get().is_none() {
                let bytes: Vec<u8> = g
                    .read(name, info)?
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect();
                let _ = cell.set(bytes);
            }
            return Ok((info, cell.get().expect("set above")));
        }
        let map = &self.shards[info.shard].map;
        Ok((info, &map[info.offset..info.offset + info.len]))
    }

    /// Load a float tensor, checking its shape, into an owned buffer in its stored
    /// type (f32 for GGUF tensors, dequantized).
    pub fn tensor(&self, name: &str, shape: &[usize]) -> Result<TensorData> {
        let info = self
            .tensors
            .get(name)
            .ok_or_else(|| FormatError::MissingTensor {
                name: name.into(),
                dir: self.dir.clone(),
            })?;
        let path = &self.shards[info.shard].path;
        if info.shape != shape {
            return Err(FormatError::BadTensor {
                name: name.into(),
                path: path.clone(),
                reason: format!("shape {:?}, but the config implies {:?}", info.shape, shape),
            });
        }
        let data = match &self.gguf {
            Some(g) => TensorData::F32(g.read(name, info)?),
            None => {
                let dtype = float_dtype(info.dtype).ok_or_else(|| FormatError::BadTensor {
                    name: name.into(),
                    path: path.clone(),
                    reason: format!(
                        "dtype {:?} is not a float type the engine reads (F32, F16, BF16)",
                        info.dtype
                    ),
                })?;
                TensorData::from_le_bytes(dtype, self.raw(name)?.1)
            }
        };
        if let Some(i) = data.first_non_finite() {
            return Err(FormatError::BadTensor {
                name: name.into(),
                path: path.clone(),
                reason: format!(
                    "element {} is {} (every weight must be a finite number; corrupt checkpoint?)",
                    index_of(i, shape),
                    data.get_f32(i)
                ),
            });
        }
        Ok(data)
    }

    /// A [rows × cols] tensor kept in 8-bit blocks when it is stored so: a GGUF
    /// Q8_0 tensor, or a safetensors pair `NAME.q8_0` (I8 [rows, cols]) +
    /// `NAME.q8_0_scales` (F16 [rows, cols/32]) as `dpllm quantize` writes it.
    /// None when the tensor is stored another way (read it with [`Checkpoint::tensor`]).
    pub fn tensor_q8_0(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
    ) -> Result<Option<crate::Q8Matrix>> {
        let bad = |path: &Path, reason: String| FormatError::BadTensor {
            name: name.into(),
            path: path.to_path_buf(),
            reason,
        };
        let m = if let Some(g) = &self.gguf {
            let info = self
                .tensors
                .get(name)
                .ok_or_else(|| FormatError::MissingTensor {
                    name: name.into(),
                    dir: self.dir.clone(),
                })?;
            if info.ggml != Some(crate::gguf::GgmlType::Q8_0)
                || !cols.is_multiple_of(crate::q8::Q8_BLOCK)
            {
                return Ok(None);
            }
            if info.shape != [rows, cols] {
                return Err(bad(
                    g.file.path(),
                    format!(
                        "shape {:?}, but the config implies {:?}",
                        info.shape,
                        [rows, cols]
                    ),
                ));
            }
            let t = g.file.tensor(&g.names[name]).expect("indexed tensor");
            crate::Q8Matrix::from_gguf_blocks(g.file.data(t), rows, cols)
                .ok_or_else(|| bad(g.file.path(), "Q8_0 data of the wrong size".into()))?
        } else {
            let (qn, sn) = (format!("{name}.q8_0"), format!("{name}.q8_0_scales"));
            if !self.contains(&qn) {
                return Ok(None);
            }
            let (qi, qb) = self.raw(&qn)?;
            let path = self.shard_path_of(qi).to_path_buf();
            if qi.dtype != safetensors::Dtype::I8
                || qi.shape != [rows, cols]
                || !cols.is_multiple_of(crate::q8::Q8_BLOCK)
            {
                return Err(bad(&path, format!("{qn} must be I8 [{rows}, {cols}] with {cols} a multiple of 32, found {:?} {:?}", qi.dtype, qi.shape)));
            }
            let (si, sb) = self.raw(&sn)?;
            if si.dtype != safetensors::Dtype::F16 || si.shape != [rows, cols / crate::q8::Q8_BLOCK]
            {
                return Err(bad(
                    &path,
                    format!(
                        "{sn} must be F16 [{rows}, {}], found {:?} {:?}",
                        cols / crate::q8::Q8_BLOCK,
                        si.dtype,
                        si.shape
                    ),
                ));
            }
            crate::Q8Matrix {
                rows,
                cols,
                scales: sb
                    .chunks_exact(2)
                    .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])))
                    .collect(),
                quants: qb.iter().map(|&b| b as i8).collect(),
            }
        };
        if let Some(b) = m.first_non_finite_scale() {
            return Err(bad(
                &self.dir,
                format!("the scale of block {b} is not finite (corrupt checkpoint?)"),
            ));
        }
        Ok(Some(m))
    }

    /// Load a tensor of any float dtype converted to f32 (shape checked).
    pub fn tensor_f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        Ok(match self.tensor(name, shape)? {
            TensorData::F32(v) => v,
            other => other.to_f32(),
        })
    }

    /// Load an i64 tensor (e.g. token ids in reference fixtures).
    pub fn tensor_i64(&self, name: &str) -> Result<(Vec<i64>, Vec<usize>)> {
        let (info, bytes) = self.raw(name)?;
        if info.dtype != safetensors::Dtype::I64 {
            return Err(FormatError::BadTensor {
                name: name.into(),
                path: self.shards[info.shard].path.clone(),
                reason: format!("dtype {:?}, expected I64", info.dtype),
            });
        }
        let v = bytes
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        Ok((v, info.shape.clone()))
    }
}

/// Multi-dimensional index `[a, b, ..]` of flat element `i` of `shape`.
fn index_of(mut i: usize, shape: &[usize]) -> String {
    let mut idx = vec![0; shape.len()];
    for (k, &d) in shape.iter().enumerate().rev() {
        if d > 0 {
            idx[k] = i % d;
            i /= d;
        }
    }
    format!("{idx:?}")
}

/// The engine's float dtype for a safetensors dtype, if it is one.
pub fn float_dtype(d: safetensors::Dtype) -> Option<DType> {
    match d {
        safetensors::Dtype::F32 => Some(DType::F32),
        safetensors::Dtype::F16 => Some(DType::F16),
        safetensors::Dtype::BF16 => Some(DType::BF16),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap as Map;

    fn write_st(path: &Path, tensors: &[(&str, Vec<usize>, Vec<f32>)]) {
        let bufs: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
            .iter()
            .map(|(n, s, d)| {
                (
                    n.to_string(),
                    d.iter().flat_map(|x| x.to_le_bytes()).collect(),
                    s.clone(),
                )
            })
            .collect();
        let views: Map<String, safetensors::tensor::TensorView> = bufs
            .iter()
            .map(|(n, b, s)| {
                (
                    n.clone(),
                    safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                        .unwrap(),
                )
            })
            .collect();
        safetensors::serialize_to_file(views, None, path).unwrap();
    }

    #[test]
    fn reads_single_file_and_checks_shapes() {
        let d = tempfile::tempdir().unwrap();
        write_st(
            &d.path().join("model.safetensors"),
            &[("a", vec![2, 3], (0..6).map(|x| x as f32).collect())],
        );
        let ck = Checkpoint::open(d.path()).unwrap();
        assert_eq!(
            ck.tensor_f32("a", &[2, 3]).unwrap(),
            vec![0., 1., 2., 3., 4., 5.]
        );
        let e = ck.tensor("a", &[3, 2]).unwrap_err().to_string();
        assert!(e.contains("shape") && e.contains("[2, 3]"), "{e}");
        let e = ck.tensor("b", &[1]).unwrap_err().to_string();
        assert!(e.contains("\"b\" not found"), "{e}");
    }

    #[test]
    fn truncated_and_corrupt_files_name_the_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("model.safetensors");
        write_st(&p, &[("a", vec![64], vec![1.0; 64])]);
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 10]).unwrap();
        let e = Checkpoint::open(d.path()).err().unwrap().to_string();
        assert!(
            e.contains("model.safetensors") && e.contains("truncated"),
            "{e}"
        );
        std::fs::write(&p, b"\xff\xff\xff\xff\xff\xff\xff\x7fgarbage").unwrap();
        assert!(Checkpoint::open(d.path()).is_err());
        std::fs::write(&p, b"").unwrap();
        assert!(Checkpoint::open(d.path()).is_err());
    }

    #[test]
    fn sharded_index_and_missing_shard() {
        let d = tempfile::tempdir().unwrap();
        write_st(
            &d.path().join("s1.safetensors"),
            &[("a", vec![1], vec![1.0])],
        );
        write_st(
            &d.path().join("s2.safetensors"),
            &[("b", vec![1], vec![2.0])],
        );
        let idx = r#"{"metadata":{},"weight_map":{"a":"s1.safetensors","b":"s2.safetensors"}}"#;
        std::fs::write(d.path().join("model.safetensors.index.json"), idx).unwrap();
        let ck = Checkpoint::open(d.path()).unwrap();
        assert_eq!(ck.tensor_f32("b", &[1]).unwrap(), vec![2.0]);
        std::fs::remove_file(d.path().join("s2.safetensors")).unwrap();
        let e = Checkpoint::open(d.path()).err().unwrap().to_string();
        assert!(e.contains("s2.safetensors") && e.contains("missing"), "{e}");
    }

    #[test]
    fn empty_dir_is_a_clear_error() {
        let d = tempfile::tempdir().unwrap();
        let e = Checkpoint::open(d.path()).err().unwrap().to_string();
        assert!(e.contains("no *.safetensors"), "{e}");
        let e = Checkpoint::open(&d.path().join("nope"))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("not found"), "{e}");
    }
}
