//! Dense f32 / f16 / bf16 weights.

use std::sync::Arc;

use dpllm_format::TensorData;

use super::matmul::matmul_dense;
use super::add_bias;

/// A dense weight in its stored float type (f32, f16 or bf16).
pub struct DenseLinear {
    rows: usize,
    cols: usize,
    weight: Arc<TensorData>,
    bias: Option<Vec<f32>>,
}

impl DenseLinear {
    /// Wrap a [rows × cols] matrix and an optional bias of length `rows`.
    pub fn new(weight: Arc<TensorData>, rows: usize, cols: usize, bias: Option<Vec<f32>>) -> DenseLinear {
        assert_eq!(weight.len(), rows * cols, "weight is not {rows}x{cols}");
        if let Some(b) = &bias {
            assert_eq!(b.len(), rows, "bias length");
        }
        DenseLinear { rows, cols, weight, bias }
    }

    /// The stored matrix.
    pub fn weight(&self) -> &TensorData {
        &self.weight
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
        matmul_dense(&self.weight, self.rows, self.cols, x, n, y);
        add_bias(y, self.bias.as_deref());
    }
    /// Bytes of weight (and bias) storage read by one forward.
    pub fn weight_bytes(&self) -> usize {
        self.weight.nbytes() + self.bias.as_ref().map_or(0, |b| b.len() * 4)
    }
    /// The stored type ("bf16", "f32", ...).
    pub fn storage(&self) -> String {
        self.weight.dtype().name().to_lowercase()
    }
    /// W [out × in] as f32.
    pub fn weight_f32(&self) -> Vec<f32> {
        self.weight.to_f32()
    }
    /// The bias, if any.
    pub fn bias(&self) -> Option<&[f32]> {
        self.bias.as_deref()
    }
}
