//! Dense weights: f32 / f16 / bf16 as stored, or 8-bit blocks (Q8_0).

use std::sync::Arc;

use dpllm_format::TensorData;

use super::add_bias;
use super::matmul::matmul_dense;
use super::q8::matmul_q8;
use crate::backend::DenseHost;

/// A dense weight in its stored form.
pub struct DenseLinear {
    rows: usize,
    cols: usize,
    weight: DenseHost,
    bias: Option<Vec<f32>>,
}

impl DenseLinear {
    /// Wrap a [rows × cols] float matrix and an optional bias of length `rows`.
    pub fn new(
        weight: Arc<TensorData>,
        rows: usize,
        cols: usize,
        bias: Option<Vec<f32>>,
    ) -> DenseLinear {
        Self::from_host(DenseHost::Float(weight), rows, cols, bias)
    }

    /// Wrap a [rows × cols] matrix in either stored form.
    pub fn from_host(
        weight: DenseHost,
        rows: usize,
        cols: usize,
        bias: Option<Vec<f32>>,
    ) -> DenseLinear {
        assert_eq!(weight.len(), rows * cols, "weight is not {rows}x{cols}");
        if let Some(b) = &bias {
            assert_eq!(b.len(), rows, "bias length");
        }
        DenseLinear {
            rows,
            cols,
            weight,
            bias,
        }
    }

    /// The stored matrix.
    pub fn stored(&self) -> &DenseHost {
        &self.weight
    }

    /// The elements, when W is stored as f32.
    pub fn as_f32(&self) -> Option<&[f32]> {
        match &self.weight {
            DenseHost::Float(w) => match &**w {
                TensorData::F32(v) => Some(v),
                _ => None,
            },
            DenseHost::Q8_0(_) => None,
        }
    }

    /// Row `r` of W as f32 into `out` (len = cols): an embedding lookup.
    pub fn row_f32(&self, r: usize, out: &mut [f32]) {
        match &self.weight {
            DenseHost::Float(w) => w.copy_range_f32(r * self.cols, out),
            DenseHost::Q8_0(w) => w.row_f32(r, out),
        }
    }
}

impl DenseLinear {
    /// Output features.
    pub fn out_features(&self) -> usize {
        self.rows
    }
    /// Input features.
    pub fn in_features(&self) -> usize {
        self.cols
    }
    /// `y [n × out] = x [n × in] · Wᵀ (+ b)`.
    pub fn forward(&self, x: &[f32], n: usize, y: &mut [f32]) {
        match &self.weight {
            DenseHost::Float(w) => matmul_dense(w, self.rows, self.cols, x, n, y),
            DenseHost::Q8_0(w) => matmul_q8(w, x, n, y),
        }
        add_bias(y, self.bias.as_deref());
    }
    /// Bytes of weight (and bias) storage read by one forward.
    pub fn weight_bytes(&self) -> usize {
        self.weight.nbytes() + self.bias.as_ref().map_or(0, |b| b.len() * 4)
    }
    /// The stored type ("bf16", "f32", ...).
    pub fn storage(&self) -> String {
        self.weight.storage()
    }
    /// W [out × in] as f32.
    pub fn weight_f32(&self) -> Vec<f32> {
        match &self.weight {
            DenseHost::Float(w) => w.to_f32(),
            DenseHost::Q8_0(w) => w.to_f32(),
        }
    }
    /// The bias, if any.
    pub fn bias(&self) -> Option<&[f32]> {
        self.bias.as_deref()
    }
}
