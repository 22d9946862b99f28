//! Dense f16 weights through cuBLAS (f32 accumulation): the reference the
//! bit-plane GEMV is measured against, and the dense linear of the backend.

use std::sync::Arc;

use cudarc::cublas::{sys::cublasOperation_t, CudaBlas, Gemm, GemmConfig};
use cudarc::driver::CudaSlice;
use half::f16;

use super::{device_err, CudaDevice};
use crate::error::{EngineError, Result};

/// A [rows × cols] f16 weight in GPU memory.
pub struct CudaDenseF16 {
    rows: usize,
    cols: usize,
    w: CudaSlice<f16>,
    blas: Arc<CudaBlas>,
}

impl CudaDenseF16 {
    /// Copy a row-major [rows × cols] weight to the GPU.
    pub fn upload(device: &Arc<CudaDevice>, rows: usize, cols: usize, w: &[f16]) -> Result<Self> {
        if w.len() != rows * cols {
            return Err(EngineError::Device(format!(
                "dense weight: {} values for {rows}x{cols}",
                w.len()
            )));
        }
        let w = device
            .stream()
            .clone_htod(w)
            .map_err(device_err("copying a dense weight to the GPU"))?;
        Ok(CudaDenseF16 {
            rows,
            cols,
            w,
            blas: device.blas()?,
        })
    }

    /// A second copy in GPU memory (for benchmarks, as [`super::bitplane::CudaAnyPrec::replicate`]).
    pub fn replicate(&self, device: &CudaDevice) -> Result<CudaDenseF16> {
        Ok(CudaDenseF16 {
            w: device
                .stream()
                .clone_dtod(&self.w)
                .map_err(device_err("copying a weight on the GPU"))?,
            blas: self.blas.clone(),
            ..*self
        })
    }

    /// Bytes one product reads.
    pub fn bytes(&self) -> usize {
        2 * self.rows * self.cols
    }

    /// `y [n × rows] = x [n × cols] · Wᵀ`, f16 in and out, f32 accumulation.
    pub fn forward(&self, x: &CudaSlice<f16>, n: usize, y: &mut CudaSlice<f16>) -> Result<()> {
        if x.len() < n * self.cols || y.len() < n * self.rows {
            return Err(EngineError::Device(format!(
                "dense product: {n} tokens do not fit {} inputs and {} outputs",
                x.len(),
                y.len()
            )));
        }
        // Column-major view: C [rows × n] = Wᵀ' · X with W' = W viewed as [cols × rows].
        let cfg = GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_T,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: self.rows as i32,
            n: n as i32,
            k: self.cols as i32,
            alpha: f16::ONE,
            lda: self.cols as i32,
            ldb: self.cols as i32,
            beta: f16::ZERO,
            ldc: self.rows as i32,
        };
        // SAFETY: the shapes above match the buffers (checked).
        unsafe { self.blas.gemm(cfg, &self.w, x, y) }
            .map_err(|e| EngineError::Device(format!("cuBLAS GEMM: {e}")))
    }
}
