//! A linear layer of the model on a backend: dense (f32/f16/bf16 as stored) or
//! any-precision (bit-planes, run at any precision from the seed to the loaded maximum).

use std::sync::Arc;

use crate::backend::cpu::{AnyPrecLinear, CpuBackend, DenseLinear};
use crate::backend::Backend;

/// The weight of a [`Linear`] as its backend holds it.
pub enum Weight<B: Backend> {
    /// Dense, shared when tied (the embedding and the output layer).
    Dense(Arc<B::Dense>),
    /// Any-precision: runs at `seed_bits..=max_bits`.
    AnyPrec {
        /// The planes and LUTs.
        w: B::AnyPrec,
        /// Lowest precision.
        seed_bits: u32,
        /// Highest precision loaded.
        max_bits: u32,
    },
}

/// A linear map `y = x·Wᵀ (+ b)` with W of shape [out × in].
pub struct Linear<B: Backend = CpuBackend> {
    rows: usize,
    cols: usize,
    /// Bytes of a dense weight and its bias (any-precision: see [`Linear::bytes_at`]).
    dense_bytes: usize,
    storage: String,
    weight: Weight<B>,
}

impl<B: Backend> Linear<B> {
    /// A dense linear over a backend weight of `bytes` bytes stored as `storage` ("bf16", ...).
    pub fn dense(
        w: Arc<B::Dense>,
        rows: usize,
        cols: usize,
        bytes: usize,
        storage: String,
    ) -> Linear<B> {
        Linear {
            rows,
            cols,
            dense_bytes: bytes,
            storage,
            weight: Weight::Dense(w),
        }
    }

    /// An any-precision linear holding precisions `seed_bits..=max_bits`.
    pub fn anyprec(
        w: B::AnyPrec,
        rows: usize,
        cols: usize,
        seed_bits: u32,
        max_bits: u32,
    ) -> Linear<B> {
        let storage = format!("anyprec {seed_bits}..={max_bits}-bit");
        Linear {
            rows,
            cols,
            dense_bytes: 0,
            storage,
            weight: Weight::AnyPrec {
                w,
                seed_bits,
                max_bits,
            },
        }
    }

    /// Output features (rows of W).
    pub fn out_features(&self) -> usize {
        self.rows
    }

    /// Input features (columns of W).
    pub fn in_features(&self) -> usize {
        self.cols
    }

    /// The weight as the backend holds it.
    pub fn weight(&self) -> &Weight<B> {
        &self.weight
    }

    /// `(seed, max)` precisions of an any-precision layer.
    pub fn bits_range(&self) -> Option<(u32, u32)> {
        match &self.weight {
            Weight::AnyPrec {
                seed_bits,
                max_bits,
                ..
            } => Some((*seed_bits, *max_bits)),
            Weight::Dense(_) => None,
        }
    }

    /// `y [n × out] = x [n × in] · Wᵀ (+ b)`; any-precision layers at `bits`
    /// (None: their highest loaded precision), dense layers as stored.
    pub fn forward(&self, be: &B, x: &B::Buf, n: usize, bits: Option<u32>, y: &mut B::Buf) {
        match &self.weight {
            Weight::Dense(w) => be.dense_linear(w, x, n, y),
            Weight::AnyPrec { w, max_bits, .. } => {
                be.anyprec_linear(w, x, n, bits.unwrap_or(*max_bits), y)
            }
        }
    }

    /// [`Linear::forward`] of an any-precision layer at `low` bits for the
    /// tokens `mask` sends low and `high` for the others (dense layers: as stored).
    pub fn forward_select(
        &self,
        be: &B,
        x: &B::Buf,
        n: usize,
        bits: (u32, u32),
        mask: &B::Mask,
        y: &mut B::Buf,
    ) -> crate::error::Result<()> {
        self.per_token(be, x, n, y, |w, shape, y| {
            be.anyprec_linear_select(w, shape, x, n, bits, mask, y)
        })
    }

    /// `y = x · Wᵀ` with each token's precision decided by `decide`
    /// ([`Backend::anyprec_linear_decided`]); a dense weight runs as stored.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_decided(
        &self,
        be: &B,
        x: &B::Buf,
        n: usize,
        bits: (u32, u32),
        decide: crate::backend::Decide<'_, B>,
        count: Option<(&mut B::Buf, usize)>,
        y: &mut B::Buf,
    ) -> crate::error::Result<()> {
        self.per_token(be, x, n, y, |w, shape, y| {
            be.anyprec_linear_decided(w, shape, x, n, bits, decide, count, y)
        })
    }

    /// `run` on an any-precision weight and its shape (rows, cols); a dense
    /// weight runs as stored instead.
    fn per_token(
        &self,
        be: &B,
        x: &B::Buf,
        n: usize,
        y: &mut B::Buf,
        run: impl FnOnce(&B::AnyPrec, (usize, usize), &mut B::Buf) -> crate::error::Result<()>,
    ) -> crate::error::Result<()> {
        match &self.weight {
            Weight::Dense(w) => {
                be.dense_linear(w, x, n, y);
                Ok(())
            }
            Weight::AnyPrec { w, .. } => run(w, (self.rows, self.cols), y),
        }
    }

    /// Bytes read by one forward at `bits` (any-precision: b planes + the f16 LUT
    /// of each row; dense: the stored weight and bias).
    pub fn bytes_at(&self, bits: u32) -> usize {
        match &self.weight {
            Weight::Dense(_) => self.dense_bytes,
            Weight::AnyPrec { .. } => dpllm_format::anyprec::bytes_at(self.rows, self.cols, bits),
        }
    }

    /// Bytes read by one forward at the highest loaded precision.
    pub fn weight_bytes(&self) -> usize {
        self.bytes_at(self.bits_range().map_or(0, |r| r.1))
    }

    /// Short description of the storage ("bf16", "anyprec 3..=8-bit", ...).
    pub fn storage(&self) -> &str {
        &self.storage
    }
}

/// Host access to the weights of the CPU backend (for the training model,
/// calibration, inspection and benchmarks).
impl Linear<CpuBackend> {
    /// The any-precision weight, when this layer is one.
    pub fn as_anyprec(&self) -> Option<&AnyPrecLinear> {
        match &self.weight {
            Weight::AnyPrec { w, .. } => Some(w),
            Weight::Dense(_) => None,
        }
    }

    /// The dense weight, when this layer is one.
    pub fn as_dense(&self) -> Option<&DenseLinear> {
        match &self.weight {
            Weight::Dense(w) => Some(w),
            Weight::AnyPrec { .. } => None,
        }
    }

    /// W [out × in] as f32, row-major (any-precision: at `bits`, None = highest loaded).
    pub fn weight_f32_at(&self, bits: Option<u32>) -> Vec<f32> {
        match &self.weight {
            Weight::Dense(w) => w.weight_f32(),
            Weight::AnyPrec { w, max_bits, .. } => w.dequantize(bits.unwrap_or(*max_bits)),
        }
    }

    /// W [out × in] as f32 at the highest loaded precision.
    pub fn weight_f32(&self) -> Vec<f32> {
        self.weight_f32_at(None)
    }

    /// The bias, if any.
    pub fn bias(&self) -> Option<&[f32]> {
        match &self.weight {
            Weight::Dense(w) => w.bias(),
            Weight::AnyPrec { w, .. } => w.bias(),
        }
    }
}
