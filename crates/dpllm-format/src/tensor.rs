//! Typed tensor buffers as loaded from a checkpoint.

use half::{bf16, f16};
use rayon::prelude::*;

/// Element types of stored tensors that the engine reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    /// IEEE single precision.
    F32,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    BF16,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// Name as safetensors spells it.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
        }
    }
}

/// An owned tensor buffer in its stored element type (row-major).
#[derive(Debug, Clone)]
pub enum TensorData {
    /// f32 elements.
    F32(Vec<f32>),
    /// f16 elements.
    F16(Vec<f16>),
    /// bf16 elements.
    BF16(Vec<bf16>),
}

impl TensorData {
    /// Decode little-endian bytes of the given dtype (any alignment).
    pub fn from_le_bytes(dtype: DType, bytes: &[u8]) -> TensorData {
        match dtype {
            DType::F32 => TensorData::F32(
                bytes
                    .par_chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            ),
            DType::F16 => TensorData::F16(
                bytes
                    .par_chunks_exact(2)
                    .map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])))
                    .collect(),
            ),
            DType::BF16 => TensorData::BF16(
                bytes
                    .par_chunks_exact(2)
                    .map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])))
                    .collect(),
            ),
        }
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        match self {
            TensorData::F32(_) => DType::F32,
            TensorData::F16(_) => DType::F16,
            TensorData::BF16(_) => DType::BF16,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            TensorData::F32(v) => v.len(),
            TensorData::F16(v) => v.len(),
            TensorData::BF16(v) => v.len(),
        }
    }

    /// True when there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of storage.
    pub fn nbytes(&self) -> usize {
        self.len() * self.dtype().size()
    }

    /// Index of the first NaN or infinite element, if any.
    pub fn first_non_finite(&self) -> Option<usize> {
        match self {
            TensorData::F32(v) => v.par_iter().position_first(|x| !x.is_finite()),
            TensorData::F16(v) => v.par_iter().position_first(|x| !x.is_finite()),
            TensorData::BF16(v) => v.par_iter().position_first(|x| !x.is_finite()),
        }
    }

    /// Element `i` as f32.
    pub fn get_f32(&self, i: usize) -> f32 {
        match self {
            TensorData::F32(v) => v[i],
            TensorData::F16(v) => v[i].to_f32(),
            TensorData::BF16(v) => v[i].to_f32(),
        }
    }

    /// Convert (copy) to f32.
    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            TensorData::F32(v) => v.clone(),
            TensorData::F16(v) => v.par_iter().map(|x| x.to_f32()).collect(),
            TensorData::BF16(v) => v.par_iter().map(|x| x.to_f32()).collect(),
        }
    }

    /// Copy elements `range` into `out` as f32.
    pub fn copy_range_f32(&self, start: usize, out: &mut [f32]) {
        let end = start + out.len();
        match self {
            TensorData::F32(v) => out.copy_from_slice(&v[start..end]),
            TensorData::F16(v) => {
                use half::slice::HalfFloatSliceExt;
                v[start..end].convert_to_f32_slice(out)
            }
            TensorData::BF16(v) => {
                use half::slice::HalfFloatSliceExt;
                v[start..end].convert_to_f32_slice(out)
            }
        }
    }
}
