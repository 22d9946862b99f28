//! Linear layers behind one interface, so dense and quantized weights plug into the same model.

use std::sync::Arc;

use dpllm_format::TensorData;

use crate::cpu::matmul::matmul_dense;

/// A linear map `y = x·Wᵀ (+ b)` with W of shape [out × in].
pub trait Linear: Send + Sync {
    /// Output features (rows of W).
    fn out_features(&self) -> usize;
    /// Input features (columns of W).
    fn in_features(&self) -> usize;
    /// `y [n × out] = x [n × in] · Wᵀ (+ b)`.
    fn forward(&self, x: &[f32], n: usize, y: &mut [f32]);
    /// Bytes of weight storage read by one full forward (for bandwidth accounting).
    fn weight_bytes(&self) -> usize;
    /// Short description of the storage ("bf16", "f32", ...).
    fn storage(&self) -> String;
}

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
        if let Some(b) = &self.bias {
            for row in y.chunks_mut(self.rows) {
                for (a, c) in row.iter_mut().zip(b) {
                    *a += c;
                }
            }
        }
    }
    fn weight_bytes(&self) -> usize {
        self.weight.nbytes() + self.bias.as_ref().map_or(0, |b| b.len() * 4)
    }
    fn storage(&self) -> String {
        self.weight.dtype().name().to_lowercase()
    }
}
