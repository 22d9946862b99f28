//! Linear layers behind one interface, so dense and quantized weights plug into the same model.

mod anyprec;
mod dense;

pub use anyprec::AnyPrecLinear;
pub use dense::DenseLinear;

/// A linear map `y = x·Wᵀ (+ b)` with W of shape [out × in].
pub trait Linear: Send + Sync {
    /// Output features (rows of W).
    fn out_features(&self) -> usize;
    /// Input features (columns of W).
    fn in_features(&self) -> usize;
    /// `y [n × out] = x [n × in] · Wᵀ (+ b)`.
    fn forward(&self, x: &[f32], n: usize, y: &mut [f32]);
    /// [`Linear::forward`] at an explicit precision (quantized layers; others ignore `bits`).
    fn forward_at(&self, x: &[f32], n: usize, y: &mut [f32], bits: u32) {
        let _ = bits;
        self.forward(x, n, y)
    }
    /// Bytes of weight storage read by one full forward (for bandwidth accounting).
    fn weight_bytes(&self) -> usize;
    /// Short description of the storage ("bf16", "f32", ...).
    fn storage(&self) -> String;
    /// The effective weight matrix W [out × in] as f32, row-major (dequantized if quantized).
    fn weight_f32(&self) -> Vec<f32>;
    /// The bias, if any.
    fn bias(&self) -> Option<&[f32]>;
    /// The any-precision view of this layer, when it is one.
    fn as_anyprec(&self) -> Option<&AnyPrecLinear> {
        None
    }
}

/// Add a bias to every row of `y` [n × out].
pub(crate) fn add_bias(y: &mut [f32], bias: Option<&[f32]>) {
    if let Some(b) = bias {
        for row in y.chunks_mut(b.len()) {
            for (a, c) in row.iter_mut().zip(b) {
                *a += c;
            }
        }
    }
}

