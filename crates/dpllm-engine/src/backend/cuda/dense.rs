//! Dense weights on the GPU: [`CudaDense`] in its stored form (f32, f16, bf16
//! or Q8_0 blocks) for the backend's dense linears and embeddings, and
//! [`CudaDenseF16`] through cuBLAS (f32 accumulation), the reference the
//! bit-plane GEMV is measured against.

use std::sync::Arc;

use cudarc::cublas::{sys::cublasOperation_t, CudaBlas, Gemm, GemmConfig};
use cudarc::driver::CudaSlice;
use half::f16;

use super::{device_err, CudaDevice};
use crate::backend::DenseHost;
use crate::error::{EngineError, Result};
use dpllm_format::TensorData;

/// A dense [rows × cols] weight in GPU memory in its stored form, with its
/// optional bias: read by the `dense_*` and `embed_*` kernels of `ops.cu`.
pub struct CudaDense {
    rows: usize,
    cols: usize,
    /// "f32", "f16", "bf16" or "q8_0": the kernels' name suffix.
    kind: &'static str,
    /// The elements' bytes (Q8_0: the signed bytes).
    w: CudaSlice<u8>,
    /// Q8_0: one f16 scale per 32 columns; otherwise one unused value.
    scales: CudaSlice<u16>,
    bias: Option<CudaSlice<f32>>,
}

impl CudaDense {
    /// Copy `w` (and `bias`) to the GPU; a clear error when the sizes disagree.
    pub fn upload(
        device: &CudaDevice,
        w: &DenseHost,
        rows: usize,
        cols: usize,
        bias: Option<&[f32]>,
    ) -> Result<CudaDense> {
        let bad = |what: String| EngineError::Device(format!("dense weight {rows}x{cols}: {what}"));
        if w.len() != rows * cols || rows == 0 || cols == 0 {
            return Err(bad(format!("{} elements", w.len())));
        }
        if let Some(b) = bias.filter(|b| b.len() != rows) {
            return Err(bad(format!("a bias of {} values", b.len())));
        }
        let s = device.stream();
        let up = |bytes: &[u8]| {
            s.clone_htod(bytes)
                .map_err(device_err("copying a dense weight to the GPU"))
        };
        let one = [0u16];
        let (kind, w, scales) = match w {
            DenseHost::Float(t) => match &**t {
                TensorData::F32(v) => ("f32", up(bytemuck::cast_slice(v))?, &one[..]),
                TensorData::F16(v) => ("f16", up(bytemuck::cast_slice(v))?, &one[..]),
                TensorData::BF16(v) => ("bf16", up(bytemuck::cast_slice(v))?, &one[..]),
            },
            DenseHost::Q8_0(q) => {
                if !cols.is_multiple_of(32) || q.scales.len() != rows * cols / 32 {
                    return Err(bad(format!(
                        "Q8_0 needs columns in blocks of 32 and one scale a block ({} scales)",
                        q.scales.len()
                    )));
                }
                let sc: &[u16] = bytemuck::cast_slice(&q.scales);
                ("q8_0", up(bytemuck::cast_slice(&q.quants))?, sc)
            }
        };
        Ok(CudaDense {
            rows,
            cols,
            kind,
            w,
            scales: s
                .clone_htod(scales)
                .map_err(device_err("copying block scales to the GPU"))?,
            bias: bias
                .map(|b| s.clone_htod(b))
                .transpose()
                .map_err(device_err("copying a bias to the GPU"))?,
        })
    }

    /// A [rows × cols] f16 weight left for the caller to fill (benchmarks).
    pub(crate) fn uninit_f16(device: &CudaDevice, rows: usize, cols: usize) -> Result<CudaDense> {
        let s = device.stream();
        let bytes = 2 * rows * cols;
        Ok(CudaDense {
            rows,
            cols,
            kind: "f16",
            // SAFETY: filled by the caller before any read.
            w: unsafe { s.alloc::<u8>(bytes.max(2)) }.map_err(|_| EngineError::OutOfMemory {
                what: "a dense weight (GPU)",
                bytes,
            })?,
            scales: s.alloc_zeros::<u16>(1).map_err(device_err("allocating"))?,
            bias: None,
        })
    }

    /// The elements' bytes, to fill ([`CudaDense::uninit_f16`]).
    pub(crate) fn weight_mut(&mut self) -> &mut CudaSlice<u8> {
        &mut self.w
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The stored form, as the kernels' names spell it ("f16", "q8_0", ...).
    pub fn kind(&self) -> &'static str {
        self.kind
    }

    /// The elements' bytes.
    pub(crate) fn weight(&self) -> &CudaSlice<u8> {
        &self.w
    }

    /// The Q8_0 block scales (one unused value for other forms).
    pub(crate) fn scales(&self) -> &CudaSlice<u16> {
        &self.scales
    }

    /// The bias, if any.
    pub(crate) fn bias(&self) -> Option<&CudaSlice<f32>> {
        self.bias.as_ref()
    }
}

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
