//! Streaming safetensors writer: the header is written from declared shapes, then
//! tensor data is produced one tensor at a time, so a model larger than memory
//! can be written. The file appears atomically (temp file + rename).

use std::collections::BTreeMap;
use std::io::{BufWriter, Write};
use std::path::Path;

use serde_json::{json, Map, Value};

use crate::{FormatError, Result};

/// A tensor declared before writing.
#[derive(Debug, Clone)]
pub struct TensorSpec {
    /// Tensor name.
    pub name: String,
    /// safetensors dtype name ("F32", "F16", "BF16", "U32", ...).
    pub dtype: &'static str,
    /// Shape.
    pub shape: Vec<usize>,
}

impl TensorSpec {
    /// Bytes of data this tensor occupies.
    pub fn nbytes(&self) -> usize {
        let elem = match self.dtype {
            "F64" | "I64" | "U64" => 8,
            "F32" | "I32" | "U32" => 4,
            "F16" | "BF16" | "I16" | "U16" => 2,
            _ => 1,
        };
        elem * self.shape.iter().product::<usize>()
    }
}

/// Write `specs` (in this order) to `path`; `produce(i, out)` must write exactly
/// the bytes of tensor i into `out`. Any error leaves no file behind.
pub fn write_safetensors(
    path: &Path,
    specs: &[TensorSpec],
    metadata: &BTreeMap<String, String>,
    mut produce: impl FnMut(usize, &mut dyn Write) -> std::io::Result<()>,
) -> Result<()> {
    let mut header = Map::new();
    if !metadata.is_empty() {
        header.insert("__metadata__".into(), json!(metadata));
    }
    let mut off = 0usize;
    for s in specs {
        let n = s.nbytes();
        header.insert(
            s.name.clone(),
            json!({"dtype": s.dtype, "shape": s.shape, "data_offsets": [off, off + n]}),
        );
        off += n;
    }
    let mut h = serde_json::to_string(&Value::Object(header))
        .map_err(|e| FormatError::invalid(path, e.to_string()))?;
    while h.len() % 8 != 0 {
        h.push(' ');
    }
    crate::write_atomic_with(path, |f| {
        let mut w = BufWriter::with_capacity(1 << 22, f);
        w.write_all(&(h.len() as u64).to_le_bytes())?;
        w.write_all(h.as_bytes())?;
        for (i, s) in specs.iter().enumerate() {
            let mut counter = CountingWriter {
                inner: &mut w,
                count: 0,
            };
            produce(i, &mut counter)?;
            if counter.count != s.nbytes() {
                return Err(std::io::Error::other(format!(
                    "tensor {} produced {} bytes, declared {}",
                    s.name,
                    counter.count,
                    s.nbytes()
                )));
            }
        }
        w.flush()
    })
}

struct CountingWriter<'a, W: Write> {
    inner: &'a mut W,
    count: usize,
}

impl<W: Write> Write for CountingWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.count += n;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Checkpoint;

    #[test]
    fn round_trip_through_checkpoint_reader() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.safetensors");
        let specs = vec![
            TensorSpec {
                name: "a".into(),
                dtype: "F32",
                shape: vec![2, 2],
            },
            TensorSpec {
                name: "b".into(),
                dtype: "U32",
                shape: vec![3],
            },
        ];
        let meta = BTreeMap::from([("format".to_string(), "test".to_string())]);
        write_safetensors(&p, &specs, &meta, |i, w| {
            if i == 0 {
                for v in [1.0f32, 2.0, 3.0, 4.0] {
                    w.write_all(&v.to_le_bytes())?;
                }
            } else {
                for v in [7u32, 8, 9] {
                    w.write_all(&v.to_le_bytes())?;
                }
            }
            Ok(())
        })
        .unwrap();
        let ck = Checkpoint::open_file(&p).unwrap();
        assert_eq!(
            ck.tensor_f32("a", &[2, 2]).unwrap(),
            vec![1.0, 2.0, 3.0, 4.0]
        );
        assert_eq!(
            ck.metadata().get("format").map(String::as_str),
            Some("test")
        );
        let (_, raw) = ck.raw("b").unwrap();
        assert_eq!(raw.len(), 12);
    }

    #[test]
    fn wrong_byte_count_fails_without_a_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.safetensors");
        let specs = vec![TensorSpec {
            name: "a".into(),
            dtype: "F32",
            shape: vec![2],
        }];
        let r = write_safetensors(&p, &specs, &BTreeMap::new(), |_, w| w.write_all(&[0u8; 4]));
        assert!(r.is_err());
        assert!(!p.exists());
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
    }
}
