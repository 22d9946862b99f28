//! The linears on the GPU: dense and any-precision, one token group at a time
//! through the GEMV kernels, or (from [`GEMM_MIN_TOKENS`] tokens) as one cuBLAS
//! GEMM on a copy of the weight made for the call (any-precision: f16 on
//! tensor cores, the activations split into f16 halves; dense: f32 SGEMM);
//! per-token precision; random weights.

use std::sync::Arc;

use cudarc::cublas::{sys::cublasOperation_t, CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{CudaSlice, CudaView};

use super::backend::{CudaBackend, CudaMask};
use super::bitplane::{CudaAnyPrec, GemvVariant, MAX_TOKENS};
use super::buf::CudaBuf;
use super::dense::CudaDense;
use crate::backend::Backend;
use crate::error::{EngineError, Result};

/// From this many tokens a linear runs as one cuBLAS GEMM on a copy of its
/// weight (dequantized or widened for the call) instead of GEMVs of 8 tokens:
/// prefill and perplexity. With f32 accumulation and the activations' f16
/// halves, results match the GEMV's.
const GEMM_MIN_TOKENS: usize = 16;

/// An any-precision weight on the GPU with its optional bias.
pub struct CudaAnyPrecLinear {
    pub(super) w: CudaAnyPrec,
    pub(super) bias: Option<CudaSlice<f32>>,
}

impl CudaBackend {
    /// cuBLAS, when it can be loaded (long batches fall back to the GEMV without it).
    pub(super) fn blas(&self) -> Option<Arc<CudaBlas>> {
        self.dev.blas().ok()
    }

    /// `len` floats of scratch, not zeroed (the caller writes them all).
    pub(super) fn scratch(&self, len: usize) -> Result<CudaSlice<f32>> {
        // SAFETY: every caller fills the buffer before reading it.
        unsafe { self.stream().alloc::<f32>(len.max(1)) }.map_err(|_| EngineError::OutOfMemory {
            what: "a widened weight (GPU)",
            bytes: len.saturating_mul(4),
        })
    }

    /// `y [n × rows] = x [n × cols] · Wᵀ` with W an f32 [rows × cols] in GPU
    /// memory: one cuBLAS SGEMM (f32 throughout, as exact as the GEMV path).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn gemm_f32(
        &self,
        blas: &CudaBlas,
        w: &CudaView<f32>,
        (rows, cols): (usize, usize),
        x: &CudaBuf,
        n: usize,
        y: &mut CudaBuf,
    ) -> Result<()> {
        // Column-major: C [rows × n] = Wᵀ' · X with W' = W viewed as [cols × rows].
        let cfg = GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_T,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: rows as i32,
            n: n as i32,
            k: cols as i32,
            alpha: 1.0f32,
            lda: cols as i32,
            ldb: cols as i32,
            beta: 0.0f32,
            ldc: rows as i32,
        };
        let mut yv = y.view_mut();
        // SAFETY: W holds rows × cols, x n × cols and y n × rows floats (checked by the callers).
        unsafe { blas.gemm(cfg, w, &x.view(), &mut yv) }
            .map_err(|e| EngineError::Device(format!("cuBLAS SGEMM: {e}")))
    }

    /// `y [n × rows] = x [n × cols] · W_bitsᵀ` for an any-precision W on
    /// tensor cores: W dequantized to f16 (exact: its values are LUT entries),
    /// x split into f16 halves hi + lo, one cuBLAS GEMM over both halves (f16
    /// in, f32 accumulation: products as exact as in f32), the halves' results
    /// summed. 2n columns cost about what n do: the GEMM is bound by the
    /// weight's reads until n is in the hundreds, and runs on tensor cores after.
    pub(super) fn gemm_anyprec(
        &self,
        blas: &CudaBlas,
        w: &CudaAnyPrec,
        bits: u32,
        x: &CudaBuf,
        n: usize,
        y: &mut CudaBuf,
    ) -> Result<()> {
        use cudarc::cublas::{result::gemm_ex, sys};
        use cudarc::driver::{DevicePtr, DevicePtrMut};
        let (rows, cols) = (w.rows(), w.cols());
        let oom = |what: &'static str, len: usize| EngineError::OutOfMemory {
            what,
            bytes: len.saturating_mul(2),
        };
        // SAFETY (both): every element is written below before cuBLAS reads it.
        let mut wide = unsafe { self.stream().alloc::<u16>((rows * cols).max(1)) }
            .map_err(|_| oom("a dequantized weight (GPU)", rows * cols))?;
        let mut xs = unsafe { self.stream().alloc::<u16>((2 * n * cols).max(1)) }
            .map_err(|_| oom("split activations (GPU)", 2 * n * cols))?;
        w.dequantize_into(bits, &mut wide)?;
        let len = (n * cols) as i64;
        launch!(
            self,
            "split_halves",
            self.ops.stride(n * cols),
            &x.view(),
            &len,
            &mut xs
        )?;
        let mut c = self.scratch(2 * n * rows)?;
        let (alpha, beta) = (1f32, 0f32);
        {
            let s = self.stream();
            let (a, _ra) = wide.device_ptr(s);
            let (b, _rb) = xs.device_ptr(s);
            let (cp, _rc) = c.device_ptr_mut(s);
            // Column-major: C [rows × 2n] = W'ᵀ · XS with W' = W viewed as
            // [cols × rows] and XS = the halves as [cols × 2n] (hi tokens, then lo).
            // SAFETY: W holds rows × cols, XS 2n × cols and C 2n × rows values
            // (allocated above); all are on the stream cuBLAS runs on.
            unsafe {
                gemm_ex(
                    *blas.handle(),
                    sys::cublasOperation_t::CUBLAS_OP_T,
                    sys::cublasOperation_t::CUBLAS_OP_N,
                    rows as i32,
                    2 * n as i32,
                    cols as i32,
                    (&alpha) as *const f32 as *const _,
                    a as *const _,
                    sys::cudaDataType_t::CUDA_R_16F,
                    cols as i32,
                    b as *const _,
                    sys::cudaDataType_t::CUDA_R_16F,
                    cols as i32,
                    (&beta) as *const f32 as *const _,
                    cp as *mut _,
                    sys::cudaDataType_t::CUDA_R_32F,
                    rows as i32,
                    sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            }
            .map_err(|e| {
                EngineError::Device(format!("cuBLAS GEMM (f16, f32 accumulation): {e}"))
            })?;
        }
        let out = (n * rows) as i64;
        launch!(
            self,
            "sum_halves",
            self.ops.stride(n * rows),
            &c,
            &out,
            &mut y.view_mut()
        )
    }

    pub(super) fn dense_into(
        &self,
        w: &CudaDense,
        x: &CudaBuf,
        n: usize,
        y: &mut CudaBuf,
    ) -> Result<()> {
        let (rows, cols) = (w.rows(), w.cols());
        Self::want_len("dense linear input", x, n * cols)?;
        Self::want_len("dense linear output", y, n * rows)?;
        if n >= GEMM_MIN_TOKENS {
            if let Some(blas) = self.blas() {
                let wide = match w.kind() {
                    "f32" => None,
                    kind => {
                        let mut out = self.scratch(rows * cols)?;
                        let (r, c) = (rows as i32, cols as i32);
                        launch!(
                            self,
                            format!("widen_{kind}"),
                            self.ops.stride(rows * cols),
                            w.weight(),
                            w.scales(),
                            &r,
                            &c,
                            &mut out
                        )?;
                        Some(out)
                    }
                };
                let wv =
                    match &wide {
                        Some(f) => f.slice(..rows * cols),
                        // SAFETY: an f32 weight's bytes are rows × cols floats.
                        None => unsafe { w.weight().transmute::<f32>(rows * cols) }.ok_or_else(
                            || EngineError::Device("an f32 weight shorter than its shape".into()),
                        )?,
                    };
                self.gemm_f32(&blas, &wv, (rows, cols), x, n, y)?;
                return self.add_bias(w.bias(), rows, n, y);
            }
        }
        let bias = w.bias().unwrap_or(&self.unused);
        let has_bias = w.bias().is_some() as i32;
        let (xs, ys, r, c) = (cols as i32, rows as i32, rows as i32, cols as i32);
        // 16-byte loads where rows of weights and activations stay 16-byte aligned.
        let v8 = matches!(w.kind(), "f16" | "bf16") && cols.is_multiple_of(8);
        for t0 in (0..n).step_by(MAX_TOKENS) {
            let nt = (n - t0).min(MAX_TOKENS);
            let name = if v8 {
                format!("dense_{}_v8_t{nt}", w.kind())
            } else {
                format!("dense_{}_t{nt}", w.kind())
            };
            let xv = x.slice(t0 * cols..(t0 + nt) * cols);
            let mut yv = y.slice_mut(t0 * rows..(t0 + nt) * rows);
            launch!(
                self,
                name,
                self.ops.warp_per_row(rows),
                w.weight(),
                w.scales(),
                &xv,
                &xs,
                bias,
                &has_bias,
                &mut yv,
                &ys,
                &r,
                &c
            )?;
        }
        Ok(())
    }

    pub(super) fn anyprec_into(
        &self,
        w: &CudaAnyPrecLinear,
        x: &CudaBuf,
        n: usize,
        bits: u32,
        y: &mut CudaBuf,
    ) -> Result<()> {
        let (rows, cols) = (w.w.rows(), w.w.cols());
        Self::want_len("any-precision linear input", x, n * cols)?;
        Self::want_len("any-precision linear output", y, n * rows)?;
        if n >= GEMM_MIN_TOKENS {
            if let Some(blas) = self.blas() {
                self.gemm_anyprec(&blas, &w.w, bits, x, n, y)?;
                return self.add_bias(w.bias.as_ref(), rows, n, y);
            }
        }
        Self::gemv_groups(w, x, n, bits, y, None)?;
        self.add_bias(w.bias.as_ref(), rows, n, y)
    }

    /// `y = x · W_bitsᵀ` through the GEMV, [`MAX_TOKENS`] tokens a launch; with
    /// `select = (mask, want)` only the tokens whose decision equals `want`.
    fn gemv_groups(
        w: &CudaAnyPrecLinear,
        x: &CudaBuf,
        n: usize,
        bits: u32,
        y: &mut CudaBuf,
        select: Option<(&CudaMask, bool)>,
    ) -> Result<()> {
        let (rows, cols) = (w.w.rows(), w.w.cols());
        for t0 in (0..n).step_by(MAX_TOKENS) {
            let nt = (n - t0).min(MAX_TOKENS);
            let mut yv = y.slice_mut(t0 * rows..(t0 + nt) * rows);
            let m = select.map(|(m, want)| (m.flags.slice(t0..t0 + nt), want));
            x.with_gemv_input((n, cols), t0..t0 + nt, |input| {
                w.w.gemv_input(
                    input,
                    nt,
                    bits,
                    &mut yv,
                    GemvVariant::default(),
                    m.as_ref().map(|(v, want)| (v, *want)),
                )
            })?;
        }
        Ok(())
    }

    /// Add `bias` (if any) to the `n` rows of `rows` values of `y`.
    pub(super) fn add_bias(
        &self,
        bias: Option<&CudaSlice<f32>>,
        rows: usize,
        n: usize,
        y: &mut CudaBuf,
    ) -> Result<()> {
        if let Some(b) = bias {
            let (r, total) = (rows as i32, (n * rows) as i64);
            launch!(
                self,
                "add_bias",
                self.ops.stride(n * rows),
                &mut y.view_mut(),
                b,
                &r,
                &total
            )?;
        }
        Ok(())
    }

    /// [`Backend::anyprec_linear_select`] on `w`'s own shape: long batches as
    /// two GEMMs and a per-token blend, short ones as masked GEMVs.
    pub(super) fn select_into(
        &self,
        w: &CudaAnyPrecLinear,
        x: &CudaBuf,
        n: usize,
        (low, high): (u32, u32),
        mask: &CudaMask,
        y: &mut CudaBuf,
    ) -> Result<()> {
        let (rows, cols) = (w.w.rows(), w.w.cols());
        Self::want_len("any-precision linear input", x, n * cols)?;
        Self::want_len("any-precision linear output", y, n * rows)?;
        if mask.n != n {
            return Err(EngineError::Device(format!(
                "per-token precision: {} decisions for {n} tokens",
                mask.n
            )));
        }
        // A long batch: both precisions as GEMMs, then each token keeps its own.
        if n >= GEMM_MIN_TOKENS {
            if let Some(blas) = self.blas() {
                let mut y_low = self.zeros(n * rows)?;
                self.gemm_anyprec(&blas, &w.w, low, x, n, &mut y_low)?;
                self.gemm_anyprec(&blas, &w.w, high, x, n, y)?;
                let (ni, wi) = (n as i32, rows as i32);
                launch!(
                    self,
                    "blend_rows",
                    self.ops.stride(n * rows),
                    &mut y.view_mut(),
                    &y_low.view(),
                    &mask.flags,
                    &ni,
                    &wi
                )?;
                return self.add_bias(w.bias.as_ref(), rows, n, y);
            }
        }
        // Both precisions are queued for every group of tokens; each kernel
        // computes and writes only the tokens of its decision (and returns at
        // once when there are none), so nothing waits for the decisions.
        Self::gemv_groups(w, x, n, low, y, Some((mask, false)))?;
        Self::gemv_groups(w, x, n, high, y, Some((mask, true)))?;
        self.add_bias(w.bias.as_ref(), rows, n, y)
    }

    /// [`Backend::anyprec_random`] made on the GPU.
    pub(super) fn random_anyprec(
        &self,
        rows: usize,
        cols: usize,
        max_bits: u32,
        seed: u64,
    ) -> Result<CudaAnyPrecLinear> {
        let mut w = CudaAnyPrec::uninit(&self.dev, rows, cols, max_bits)?;
        let scale = 1.0 / (cols.max(1) as f32).sqrt();
        let (planes, luts) = w.buffers_mut();
        let n = planes.len() as i64;
        launch!(
            self,
            "fill_random_u32",
            self.ops.stride(planes.len()),
            planes,
            &n,
            &seed
        )?;
        for (i, l) in luts.iter_mut().enumerate() {
            let (n, s) = (l.len() as i64, seed ^ (i as u64 + 1) << 56);
            launch!(
                self,
                "fill_random_f16",
                self.ops.stride(l.len()),
                l,
                &n,
                &scale,
                &s
            )?;
        }
        Ok(CudaAnyPrecLinear { w, bias: None })
    }

    /// [`Backend::dense_random`] made on the GPU.
    pub(super) fn random_dense(&self, rows: usize, cols: usize, seed: u64) -> Result<CudaDense> {
        let mut d = CudaDense::uninit_f16(&self.dev, rows, cols)?;
        let scale = 1.0 / (cols.max(1) as f32).sqrt();
        let n = (rows * cols) as i64;
        launch!(
            self,
            "fill_random_f16",
            self.ops.stride(rows * cols),
            d.weight_mut(),
            &n,
            &scale,
            &seed
        )?;
        Ok(d)
    }
}
