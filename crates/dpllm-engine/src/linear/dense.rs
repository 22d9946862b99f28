//! Dense f32 / f16 / bf16 weights.

use std::sync::Arc;

use dpllm_format::TensorData;

use super::{add_bias, Linear};
use crate::cpu::matmul::matmul_dense;

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

impl Linear for DenseLinear {
    fn out_features(&self) -> usize {
        self.rows
    }
    fn in_features(&self) -> usize {
        self.cols
    }
    fn forward(&self, x: &[f32], n: usize, y: &mut [f32]) {
        matmul_dense(&self.weight, self.rows, self.cols, x, n, y);
        add_bias(y, self.bias.as_deref());
    }
    fn weight_bytes(&self) -> usize {
        self.weight.nbytes() + self.bias.as_ref().map_or(0, |b| b.len() * 4)
    }
    fn storage(&self) -> String {
        self.weight.dtype().name().to_lowercase()
    }
    fn weight_f32(&self) -> Vec<f32> {
        self.weight.to_f32()
    }
    fn bias(&self) -> Option<&[f32]> {
        self.bias.as_deref()
    }
}
