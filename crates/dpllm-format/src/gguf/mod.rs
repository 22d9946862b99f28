//! GGUF files, llama.cpp's model format (versions 2 and 3): header, metadata,
//! tensor infos and the memory-mapped, aligned tensor data.
//!
//! Layout (little-endian): magic `GGUF`, version u32, tensor count u64, metadata
//! count u64; metadata entries (key string, value type u32, value); tensor infos
//! (name string, n_dims u32, dims u64 × n_dims with the innermost dimension
//! first, ggml type u32, offset u64 from the start of the data); then padding to
//! `general.alignment` (default 32) and the data. Strings are a u64 length and
//! UTF-8 bytes. Every count and length is checked against the bytes that remain,
//! so a corrupt or truncated file is an error naming the file, never a panic or
//! a huge allocation.

pub mod dequant;
pub mod model;

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

pub use dequant::GgmlType;

use crate::{FormatError, Result};

/// `GGUF` read as a little-endian u32.
const MAGIC: u32 = 0x4655_4747;
/// Alignment of the data section when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: usize = 32;
/// Deepest nesting of metadata arrays accepted.
const MAX_ARRAY_DEPTH: usize = 4;
/// Most dimensions of a tensor (ggml's GGML_MAX_DIMS).
const MAX_DIMS: usize = 4;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// u8.
    U8(u8),
    /// i8.
    I8(i8),
    /// u16.
    U16(u16),
    /// i16.
    I16(i16),
    /// u32.
    U32(u32),
    /// i32.
    I32(i32),
    /// u64.
    U64(u64),
    /// i64.
    I64(i64),
    /// f32.
    F32(f32),
    /// f64.
    F64(f64),
    /// bool.
    Bool(bool),
    /// UTF-8 string.
    String(String),
    /// Array of values of one type.
    Array(Vec<Value>),
}

impl Value {
    /// The value as a non-negative integer, if it is one.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a float, if it is a number.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            Value::I8(v) => Some(v.into()),
            Value::I16(v) => Some(v.into()),
            Value::I32(v) => Some(v.into()),
            Value::I64(v) => Some(v as f64),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    /// The value as a string, if it is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value as a bool, if it is one.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The elements, if the value is an array.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// One tensor of the file.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensor {
    /// Name as llama.cpp writes it (`blk.0.attn_q.weight`, ...).
    pub name: String,
    /// Element type.
    pub dtype: GgmlType,
    /// Shape, row-major (outermost first, as safetensors and PyTorch write it).
    pub shape: Vec<usize>,
    /// Byte offset of the data in the file.
    pub offset: usize,
    /// Bytes of data.
    pub nbytes: usize,
}

impl GgufTensor {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A GGUF file, memory-mapped, with its metadata and tensor index.
pub struct GgufFile {
    path: PathBuf,
    map: Mmap,
    /// Format version (2 or 3).
    pub version: u32,
    /// Every metadata entry.
    pub metadata: BTreeMap<String, Value>,
    tensors: Vec<GgufTensor>,
    index: HashMap<String, usize>,
}

/// A bounds-checked little-endian reader over the header bytes.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn bad(&self, what: impl std::fmt::Display) -> FormatError {
        FormatError::invalid(
            self.path,
            format!(
                "not a valid GGUF file (truncated or corrupt?): {what} at byte {}",
                self.pos
            ),
        )
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| self.bad(format!("{n} bytes needed, the file ends")))?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    /// A count of items each at least `min_bytes` long, checked against what remains.
    fn count(&mut self, what: &str, min_bytes: usize) -> Result<usize> {
        let n = self.u64()?;
        match usize::try_from(n) {
            Ok(n) if n.saturating_mul(min_bytes.max(1)) <= self.remaining() => Ok(n),
            _ => Err(self.bad(format!("{what} count {n} exceeds the file"))),
        }
    }

    fn string(&mut self) -> Result<String> {
        let n = self.count("string length", 1)?;
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| self.bad("a string is not UTF-8"))
    }

    fn value(&mut self, ty: u32, depth: usize) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.u8()?),
            1 => Value::I8(self.u8()? as i8),
            2 => Value::U16(self.u16()?),
            3 => Value::I16(self.u16()? as i16),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(self.u32()? as i32),
            6 => Value::F32(f32::from_bits(self.u32()?)),
            7 => match self.u8()? {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(self.bad(format!("bool value {b}"))),
            },
            8 => Value::String(self.string()?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(self.bad("metadata arrays nested too deeply"));
                }
                let inner = self.u32()?;
                let n = self.count("array", value_min_bytes(inner))?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.value(inner, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(self.u64()? as i64),
            12 => Value::F64(f64::from_bits(self.u64()?)),
            other => return Err(self.bad(format!("unknown metadata value type {other}"))),
        })
    }
}

/// Fewest bytes a value of type `ty` occupies.
fn value_min_bytes(ty: u32) -> usize {
    match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 | 10..=12 => 8,
        9 => 12,
        _ => 1,
    }
}

/// True when `path` is a GGUF file (by its magic), the form a model path takes for llama.cpp models.
pub fn is_gguf(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    path.is_file()
        && File::open(path)
            .and_then(|mut f| f.read_exact(&mut magic))
            .is_ok()
        && u32::from_le_bytes(magic) == MAGIC
}

impl GgufFile {
    /// Open and index a GGUF file (the data stays memory-mapped).
    pub fn open(path: &Path) -> Result<GgufFile> {
        let file = File::open(path).map_err(|e| FormatError::io(path, e))?;
        // SAFETY: the map is read-only; a file changed underneath us while
        // mapped is outside what any mmap-based loader can guard against.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| FormatError::io(path, e))?;
        let (version, metadata, tensors) = parse(&map, path)?;
        let index = tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(GgufFile {
            path: path.into(),
            map,
            version,
            metadata,
            tensors,
            index,
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every tensor, in file order.
    pub fn tensors(&self) -> &[GgufTensor] {
        &self.tensors
    }

    /// The tensor named `name`, if present.
    pub fn tensor(&self, name: &str) -> Option<&GgufTensor> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    /// A metadata value.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// The stored bytes of a tensor.
    pub fn data(&self, t: &GgufTensor) -> &[u8] {
        &self.map[t.offset..t.offset + t.nbytes]
    }

    /// Tensor `name` dequantized to f32 (row-major, `shape` elements).
    pub fn dequantize(&self, name: &str) -> Result<Vec<f32>> {
        let t = self
            .tensor(name)
            .ok_or_else(|| FormatError::MissingTensor {
                name: name.into(),
                dir: self.path.clone(),
            })?;
        let mut out = vec![0f32; t.numel()];
        dequant::dequantize(t.dtype, self.data(t), &mut out);
        Ok(out)
    }
}

/// Parse the header, metadata and tensor infos of the GGUF bytes in `bytes`.
fn parse(bytes: &[u8], path: &Path) -> Result<(u32, BTreeMap<String, Value>, Vec<GgufTensor>)> {
    let mut c = Cursor {
        bytes,
        pos: 0,
        path,
    };
    if c.u32()? != MAGIC {
        return Err(FormatError::invalid(
            path,
            "not a GGUF file (no GGUF magic)",
        ));
    }
    let version = c.u32()?;
    if !(2..=3).contains(&version) {
        return Err(FormatError::invalid(
            path,
            format!("GGUF version {version}; dpllm reads versions 2 and 3"),
        ));
    }
    // A tensor info is at least 8 (name) + 4 (n_dims) + 4 (type) + 8 (offset) bytes; an entry 8 + 4 + 1.
    let n_tensors = c.count("tensor", 24)?;
    let n_kv = c.count("metadata", 13)?;
    let mut metadata = BTreeMap::new();
    for _ in 0..n_kv {
        let key = c.string()?;
        let ty = c.u32()?;
        let v = c.value(ty, 0)?;
        if metadata.insert(key.clone(), v).is_some() {
            return Err(c.bad(format!("metadata key {key:?} appears twice")));
        }
    }
    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => match v.as_u64() {
            Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 20 => a as usize,
            _ => {
                return Err(FormatError::invalid(
                    path,
                    format!("general.alignment {v:?} is not a power of two"),
                ))
            }
        },
    };
    let mut raw = Vec::with_capacity(n_tensors);
    for _ in 0..n_tensors {
        let name = c.string()?;
        let n_dims = c.u32()? as usize;
        if !(1..=MAX_DIMS).contains(&n_dims) {
            return Err(c.bad(format!("tensor {name:?} has {n_dims} dimensions")));
        }
        let mut dims = Vec::with_capacity(n_dims);
        for _ in 0..n_dims {
            dims.push(
                usize::try_from(c.u64()?)
                    .map_err(|_| c.bad(format!("tensor {name:?} is too large")))?,
            );
        }
        let ty = c.u32()?;
        let offset = c.u64()?;
        raw.push((name, dims, ty, offset));
    }
    let data_start = c
        .pos
        .div_ceil(alignment)
        .checked_mul(alignment)
        .ok_or_else(|| c.bad("bad alignment"))?;
    let mut tensors = Vec::with_capacity(raw.len());
    let mut seen = HashMap::new();
    for (name, dims, ty, offset) in raw {
        let bad = |why: String| FormatError::BadTensor {
            name: name.clone(),
            path: path.into(),
            reason: why,
        };
        let dtype = GgmlType::from_id(ty).ok_or_else(|| {
            bad(format!(
                "ggml type {ty} is not one dpllm reads ({})",
                GgmlType::supported()
            ))
        })?;
        let numel = dims
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| bad(format!("shape {dims:?} overflows")))?;
        if numel == 0 || dims[0] % dtype.block_size() != 0 {
            return Err(bad(format!(
                "shape {dims:?} does not hold whole {dtype:?} blocks of {}",
                dtype.block_size()
            )));
        }
        let nbytes = (numel / dtype.block_size())
            .checked_mul(dtype.block_bytes())
            .ok_or_else(|| bad("too large".into()))?;
        let start = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(data_start))
            .filter(|s| s % alignment == 0);
        let Some(start) =
            start.filter(|&s| s.checked_add(nbytes).is_some_and(|e| e <= bytes.len()))
        else {
            return Err(bad(format!("data at offset {offset} ({nbytes} bytes) is misaligned or beyond the end of the file (truncated?)")));
        };
        if seen.insert(name.clone(), ()).is_some() {
            return Err(bad("appears twice".into()));
        }
        let shape = dims.iter().rev().copied().collect();
        tensors.push(GgufTensor {
            name,
            dtype,
            shape,
            offset: start,
            nbytes,
        });
    }
    Ok((version, metadata, tensors))
}

#[cfg(test)]
pub(crate) mod tests;
