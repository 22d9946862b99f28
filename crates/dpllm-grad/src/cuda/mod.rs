//! [`CudaGrad`]: the gradient model's ops on an NVIDIA GPU (issue #11), so the
//! sensitivity pass and precision fine-tuning keep weights, activations and
//! gradients on the device.
//!
//! Matrix products go through cuBLAS in f32 (no TF32, so results match the
//! CPU's to f32 rounding): the linears, and attention as per-head score
//! matrices [n × n] (strided batched GEMMs over the query heads of each
//! position in a GQA group), a causal softmax kernel, then the products with
//! V; the backward pass recomputes the probabilities (the products as data:
//! `plan`). The rest are the kernels of `grad.cu`, compiled by NVRTC on
//! first use like the engine's.

use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use dpllm_engine::backend::cpu::attention::AttnShape;
use dpllm_engine::backend::cuda::cudarc;
use dpllm_engine::backend::cuda::{pair_words, CudaDevice, Kernels, PAIR_WORDS};
use dpllm_engine::model::rope::Rope;

use cudarc::cublas::Gemm;
use cudarc::driver::result::memset_d8_async;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};

use crate::backend::{check_adam, check_lengths, GradBackend};
use crate::ops;
use crate::step::{Pair, Recorder};

mod graph;
mod plan;
pub mod profile;
use plan::{attention_plan, blas_config, Mat, Operand, Product, Stage};

/// The kernels' CUDA C source.
pub const SOURCE: &str = include_str!("grad.cu");

/// Threads of a block in the row kernels (a multiple of 32).
const ROW_THREADS: u32 = 256;

/// Logit rows per lm_head chunk (bounds the logits buffer to chunk × vocab).
const LM_CHUNK: usize = 256;

/// Queue kernel `$name` of module `$k` (a [`CudaGrad`]'s `kernels`, or the
/// engine's `ops`) with arguments `$arg` (references), an error naming the
/// kernel when it cannot be launched.
macro_rules! launch {
    ($g:expr, $k:ident, $name:expr, $cfg:expr, $($arg:expr),+ $(,)?) => {{
        let name: &str = $name;
        let f = $g.$k.get(name)?;
        let cfg = $cfg;
        // SAFETY: every call site passes the kernel's parameters in order with
        // their C types (int = i32, long = i64, pointers as slices or device
        // addresses) and sizes the grid for buffers it has checked; the
        // kernels check their own bounds.
        let r = unsafe { $g.stream().launch_builder(&f)$(.arg($arg))+.launch(cfg) };
        r.map(|_| ()).with_context(|| format!("CUDA: launching {name}"))
    }};
}

/// RoPE tables on the device: ((positions, inverse, last position's host row), table).
type RopeTables = Vec<((usize, bool, Vec<f32>), Arc<CudaSlice<f32>>)>;

/// The gradient ops on one GPU, queued on one stream.
pub struct CudaGrad {
    dev: Arc<CudaDevice>,
    /// Where this backend's ops are queued: the device's, or a lane's own
    /// ([`CudaGrad::lane`]).
    stream: Arc<CudaStream>,
    /// `grad.cu`.
    kernels: Arc<Kernels>,
    /// The engine's `ops.cu`, for the element-wise ops both passes share
    /// (`add`, `add_bias`, `rope`, `split_cols`).
    ops: Arc<Kernels>,
    /// Position 0 for the engine's `rope`, which reads its first position
    /// from the device.
    pos0: CudaSlice<u32>,
    /// RoPE tables uploaded so far (the last few).
    rope_tables: Mutex<RopeTables>,
    /// Time per op, when `DPLLM_PROFILE` is set.
    profile: Option<profile::Profile>,
    /// A cuBLAS handle of this backend's own, on its stream (TF32 mode with
    /// [`CudaGrad::with_tf32`], or a lane's); None: the device's, exact f32.
    blas: Option<Arc<cudarc::cublas::CudaBlas>>,
    /// Matrix products on TF32 tensor cores.
    tf32: bool,
    /// Scratch buffers filled with NaN (`DPLLM_POISON_SCRATCH` set), so
    /// that a value an op failed to write shows in the tests.
    poison: bool,
}

impl CudaGrad {
    /// The gradient ops on `dev`, their kernels compiled (or read from the PTX cache).
    pub fn new(dev: Arc<CudaDevice>) -> Result<CudaGrad> {
        let kernels = Arc::new(dev.load_kernels("grad", SOURCE)?);
        let ops = dev.ops_kernels()?;
        let stream = dev.stream().clone();
        let pos0 = (stream.clone_htod(&[0u32][..])).context("CUDA: copying a position")?;
        Ok(CudaGrad {
            dev,
            stream,
            kernels,
            ops,
            pos0,
            rope_tables: Mutex::default(),
            profile: profile::Profile::from_env(),
            blas: None,
            tf32: false,
            poison: std::env::var_os("DPLLM_POISON_SCRATCH").is_some(),
        })
    }

    /// The gradient ops on GPU `ordinal`; a clear error when there is no
    /// driver, no such GPU, or no NVRTC.
    pub fn open(ordinal: usize) -> Result<CudaGrad> {
        CudaGrad::new(CudaDevice::new(ordinal)?)
    }

    /// Matrix products on TF32 tensor cores (inputs rounded to 10-bit
    /// mantissas, f32 accumulation) instead of exact f32, for passes that need
    /// gradients, not bit-exact ones (precision fine-tuning).
    pub fn with_tf32(mut self) -> Result<CudaGrad> {
        self.blas = Some(own_blas(&self.dev, &self.stream, true)?);
        self.tf32 = true;
        Ok(self)
    }

    /// Scratch buffers filled with NaN, as `DPLLM_POISON_SCRATCH` does: a
    /// value an op fails to write then shows in the result (the GPU tests).
    pub fn poisoned(mut self) -> CudaGrad {
        self.poison = true;
        self
    }

    /// The same ops (TF32 or not) on a new stream of the same GPU, with a
    /// cuBLAS handle of its own: several lanes run fine-tuning steps of
    /// different targets at once. Buffers another lane (or the device's
    /// stream) wrote must be complete before this lane reads them
    /// ([`CudaGrad::synchronize`]).
    pub fn lane(&self) -> Result<CudaGrad> {
        let stream = (self.dev.context().new_stream()).context("CUDA: creating a stream")?;
        let pos0 = (stream.clone_htod(&[0u32][..])).context("CUDA: copying a position")?;
        Ok(CudaGrad {
            dev: self.dev.clone(),
            blas: Some(own_blas(&self.dev, &stream, self.tf32)?),
            stream,
            kernels: self.kernels.clone(),
            ops: self.ops.clone(),
            pos0,
            rope_tables: Mutex::default(),
            profile: None,
            tf32: self.tf32,
            poison: self.poison,
        })
    }

    /// Wait until everything queued on this backend's stream is done.
    pub fn synchronize(&self) -> Result<()> {
        (self.stream.synchronize()).context("CUDA: waiting for the stream")
    }

    /// The device.
    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.dev
    }

    /// The stream this backend queues its ops on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Time op `name` until the guard drops, when profiling (`DPLLM_PROFILE`);
    /// also for ops queued on this backend's stream from outside it.
    pub fn span(&self, name: &'static str) -> Option<profile::Span<'_>> {
        Some(self.profile.as_ref()?.span(self.stream(), name))
    }

    /// A grid-stride launch over `n` elements.
    fn flat(n: usize) -> LaunchConfig {
        let blocks = n.div_ceil(256).clamp(1, 65_535) as u32;
        LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// One block of [`ROW_THREADS`] per row.
    fn per_row(rows: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (rows.max(1) as u32, 1, 1),
            block_dim: (ROW_THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    fn upload_u32(&self, v: &[u32]) -> Result<CudaSlice<u32>> {
        self.stream()
            .clone_htod(v)
            .context("CUDA: copying token ids to the device")
    }

    /// Row-major `C [m × n] = alpha · op(A) [m × k] · op(B) [k × n] + beta · C`,
    /// `batch` times (the operands' `stride` apart), through cuBLAS (column-major:
    /// Cᵀ = op(B)ᵀ · op(A)ᵀ).
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        (ta, tb): (bool, bool),
        (m, n, k): (usize, usize, usize),
        (a, ma): (&CudaSlice<f32>, Mat),
        (b, mb): (&CudaSlice<f32>, Mat),
        beta: f32,
        (c, mc): (&mut CudaSlice<f32>, Mat),
        batch: usize,
    ) -> Result<()> {
        if m == 0 || n == 0 || batch == 0 {
            return Ok(());
        }
        // The last element each operand reaches must lie in its buffer.
        let reach = |rows: usize, cols: usize, mat: Mat| {
            mat.off + (batch - 1) * mat.stride + (rows - 1) * mat.ld + cols
        };
        let (ar, ac) = if ta { (k, m) } else { (m, k) };
        let (br, bc) = if tb { (n, k) } else { (k, n) };
        if k > 0 && (reach(ar, ac, ma) > a.len() || reach(br, bc, mb) > b.len())
            || reach(m, n, mc) > c.len()
        {
            bail!("CUDA GEMM: a {m}x{n}x{k} product (batch {batch}) reaches past its buffers");
        }
        let cfg = blas_config((ta, tb), (m, n, k), (ma, mb, mc), beta, batch);
        let blas = match &self.blas {
            Some(b) => b.clone(),
            None => self.dev.blas()?,
        };
        let (av, bv) = (a.slice(ma.off..), b.slice(mb.off..));
        let mut cv = c.slice_mut(mc.off..);
        // SAFETY: the extents of all three operands were checked above.
        unsafe { blas.gemm_strided_batched(cfg, &bv, &av, &mut cv) }
            .map_err(|e| anyhow::anyhow!("cuBLAS SGEMM: {e}"))
    }

    /// The device RoPE table for positions 0..n (sines negated for the inverse),
    /// made once per (rope, n, direction): the host table costs n × rot_dim/2
    /// sines and cosines in f64, more than the GPU's whole op.
    fn rope_table(&self, rope: &Rope, n: usize, inverse: bool) -> Result<Arc<CudaSlice<f32>>> {
        // The last position's row tells ropes of other frequencies apart.
        let key = (n, inverse, rope.table(n.saturating_sub(1), 1));
        let mut cache = self.rope_tables.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, t)) = cache.iter().find(|(k, _)| *k == key) {
            return Ok(t.clone());
        }
        let mut host = rope.table(0, n);
        let half = rope.rot_dim() / 2;
        if inverse {
            for row in host.chunks_mut(2 * half) {
                row[half..].iter_mut().for_each(|s| *s = -*s);
            }
        }
        let t = Arc::new((self.stream().clone_htod(&host)).context("CUDA: copying a RoPE table")?);
        if cache.len() >= 8 {
            cache.remove(0);
        }
        cache.push((key, t.clone()));
        Ok(t)
    }

    /// The level count of `levels` (whole weights of `len` values) and the
    /// device address of pair `slot` of `pairs`, checked.
    fn pair_args(
        &self,
        levels: &CudaSlice<f32>,
        len: usize,
        pairs: &CudaSlice<f32>,
        slot: usize,
    ) -> Result<(i32, u64)> {
        if len == 0 || !levels.len().is_multiple_of(len) {
            bail!(
                "{} level values are not whole weights of {len}",
                levels.len()
            );
        }
        if PAIR_WORDS * (slot + 1) > pairs.len() {
            bail!("precision pair {slot} of {}", pairs.len() / PAIR_WORDS);
        }
        let (at, _rec) = pairs.device_ptr(self.stream());
        let offset = PAIR_WORDS * std::mem::size_of::<f32>() * slot;
        Ok(((levels.len() / len) as i32, at + offset as u64))
    }

    fn check_len(&self, what: &str, buf: &CudaSlice<f32>, len: usize) -> Result<()> {
        if buf.len() != len {
            bail!(
                "{what}: a buffer of {} values where {len} are needed",
                buf.len()
            );
        }
        Ok(())
    }

    /// Run the products of `plan`, reading `inputs` and writing `outputs`.
    fn run_plan(
        &self,
        plan: &[Product],
        inputs: &[(Operand, &CudaSlice<f32>)],
        outputs: &mut [(Operand, &mut CudaSlice<f32>)],
    ) -> Result<()> {
        for p in plan {
            let read = |o: Operand| {
                (inputs.iter().find(|(x, _)| *x == o).map(|(_, b)| *b))
                    .ok_or_else(|| anyhow::anyhow!("attention plan: {o:?} is not an input"))
            };
            let (a, b) = (read(p.a.0)?, read(p.b.0)?);
            let Some((_, c)) = outputs.iter_mut().find(|(x, _)| *x == p.c.0) else {
                bail!("attention plan: {:?} is not an output", p.c.0);
            };
            self.gemm(
                p.trans,
                p.dims,
                (a, p.a.1),
                (b, p.b.1),
                p.beta,
                (c, p.c.1),
                p.batch,
            )?;
        }
        Ok(())
    }

    /// Per-head scores of q·kᵀ [heads × n × n] turned into causal probabilities.
    fn attention_probs(
        &self,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        s: AttnShape,
        n: usize,
    ) -> Result<CudaSlice<f32>> {
        let mut p = self.scratch(s.num_heads * n * n)?;
        let plan = attention_plan(s, n, Stage::Scores);
        self.run_plan(
            &plan,
            &[(Operand::Q, q), (Operand::K, k)],
            &mut [(Operand::P, &mut p)],
        )?;
        let window = s.window.map_or(0, |w| w.min(i32::MAX as usize) as i32);
        let scale = 1.0 / (s.head_dim as f32).sqrt();
        let n32 = n as i32;
        launch!(
            self,
            kernels,
            "causal_softmax",
            Self::per_row(s.num_heads * n),
            &mut p,
            &n32,
            &window,
            &scale
        )?;
        Ok(p)
    }

    fn attn_check(
        &self,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        s: AttnShape,
    ) -> Result<usize> {
        let (qd, kvd) = (s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim);
        if s.num_kv_heads == 0 || !s.num_heads.is_multiple_of(s.num_kv_heads) || qd == 0 {
            bail!(
                "attention: {} query heads over {} kv heads",
                s.num_heads,
                s.num_kv_heads
            );
        }
        let n = q.len() / qd;
        self.check_len("attention q", q, n * qd)?;
        self.check_len("attention k", k, n * kvd)?;
        self.check_len("attention v", v, n * kvd)?;
        Ok(n)
    }
}

impl Drop for CudaGrad {
    fn drop(&mut self) {
        if let Some(p) = &self.profile {
            eprintln!("{}", p.report());
        }
    }
}

impl GradBackend for CudaGrad {
    type Buf = CudaSlice<f32>;
    type Sums = CudaSlice<f64>;
    type Ids = CudaSlice<u32>;
    /// [`PAIR_WORDS`] f32 a pair, as the engine's kernels read them ([`pair_words`]).
    type Pairs = CudaSlice<f32>;

    fn name(&self) -> String {
        self.dev.describe()
    }
    fn upload(&self, host: &[f32]) -> Result<CudaSlice<f32>> {
        let _p = self.span("upload");
        self.stream()
            .clone_htod(host)
            .context("CUDA: copying to the device")
    }
    fn zeros(&self, len: usize) -> Result<CudaSlice<f32>> {
        let _p = self.span("zeros");
        self.stream()
            .alloc_zeros(len)
            .with_context(|| format!("CUDA: allocating {len} floats"))
    }
    fn scratch(&self, len: usize) -> Result<CudaSlice<f32>> {
        let _p = self.span("scratch");
        // SAFETY: f32 has no invalid bit patterns, and the caller's op
        // overwrites every value before one is read (GradBackend::scratch).
        let mut buf = unsafe { self.stream().alloc(len) }
            .with_context(|| format!("CUDA: allocating {len} floats"))?;
        if self.poison {
            // Bytes 0xff: every f32 a NaN.
            let (at, _record) = buf.device_ptr_mut(self.stream());
            // SAFETY: the buffer's own bytes, on its stream.
            unsafe { memset_d8_async(at, 0xff, 4 * len, self.stream().cu_stream()) }
                .context("CUDA: poisoning a buffer")?;
        }
        Ok(buf)
    }
    fn download(&self, buf: &CudaSlice<f32>) -> Result<Vec<f32>> {
        let _p = self.span("download");
        self.stream()
            .clone_dtoh(buf)
            .context("CUDA: copying to the host")
    }
    fn len(&self, buf: &CudaSlice<f32>) -> usize {
        buf.len()
    }
    fn copy(&self, buf: &CudaSlice<f32>) -> Result<CudaSlice<f32>> {
        let _p = self.span("copy");
        self.stream()
            .clone_dtod(buf)
            .context("CUDA: copying a buffer")
    }
    fn ids(&self, tokens: &[u32]) -> Result<CudaSlice<u32>> {
        let _p = self.span("upload");
        self.upload_u32(tokens)
    }
    fn set_ids(&self, ids: &mut CudaSlice<u32>, tokens: &[u32]) -> Result<()> {
        let _p = self.span("upload");
        if ids.len() != tokens.len() {
            bail!("{} token ids into room for {}", tokens.len(), ids.len());
        }
        (self.stream().memcpy_htod(tokens, ids)).context("CUDA: copying token ids to the device")
    }
    fn ids_len(&self, ids: &CudaSlice<u32>) -> usize {
        ids.len()
    }
    fn embed(
        &self,
        table: &CudaSlice<f32>,
        d: usize,
        ids: &CudaSlice<u32>,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let _p = self.span("embed");
        let vocab = table.len() / d.max(1);
        self.check_len("embedding output", out, ids.len() * d)?;
        let (d32, n32, v32) = (d as i32, ids.len() as i32, vocab as i32);
        launch!(
            self,
            kernels,
            "embed_rows",
            Self::flat(out.len()),
            table,
            ids,
            &d32,
            &n32,
            &v32,
            &mut *out
        )
    }
    fn add(&self, h: &mut CudaSlice<f32>, x: &CudaSlice<f32>) -> Result<()> {
        let _p = self.span("add");
        self.check_len("add", x, h.len())?;
        let n = h.len() as i64;
        launch!(self, ops, "add", Self::flat(h.len()), &mut *h, x, &n)
    }
    fn linear_forward(
        &self,
        x: &CudaSlice<f32>,
        n: usize,
        w: &CudaSlice<f32>,
        out_f: usize,
        in_f: usize,
        bias: Option<&CudaSlice<f32>>,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let _p = self.span("linear_forward");
        self.check_len("linear output", y, n * out_f)?;
        self.gemm(
            (false, true),
            (n, out_f, in_f),
            (x, Mat::new(0, in_f, 0)),
            (w, Mat::new(0, in_f, 0)),
            0.0,
            (y, Mat::new(0, out_f, 0)),
            1,
        )?;
        if let Some(bias) = bias {
            self.check_len("bias", bias, out_f)?;
            let (w32, len) = (out_f as i32, y.len() as i64);
            launch!(
                self,
                ops,
                "add_bias",
                Self::flat(y.len()),
                &mut *y,
                bias,
                &w32,
                &len
            )?;
        }
        Ok(())
    }
    fn linear_backward_input(
        &self,
        dy: &CudaSlice<f32>,
        n: usize,
        w: &CudaSlice<f32>,
        out_f: usize,
        in_f: usize,
        dx: &mut CudaSlice<f32>,
        accumulate: bool,
    ) -> Result<()> {
        let _p = self.span("linear_backward_input");
        self.check_len("input gradient", dx, n * in_f)?;
        self.gemm(
            (false, false),
            (n, in_f, out_f),
            (dy, Mat::new(0, out_f, 0)),
            (w, Mat::new(0, in_f, 0)),
            if accumulate { 1.0 } else { 0.0 },
            (dx, Mat::new(0, in_f, 0)),
            1,
        )
    }
    fn linear_backward_weight(
        &self,
        dy: &CudaSlice<f32>,
        x: &CudaSlice<f32>,
        n: usize,
        out_f: usize,
        in_f: usize,
        dw: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let _p = self.span("linear_backward_weight");
        self.check_len("weight gradient", dw, out_f * in_f)?;
        self.gemm(
            (true, false),
            (out_f, in_f, n),
            (dy, Mat::new(0, out_f, 0)),
            (x, Mat::new(0, in_f, 0)),
            0.0,
            (dw, Mat::new(0, in_f, 0)),
            1,
        )
    }
    fn rms_norm_forward(
        &self,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        eps: f32,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let _p = self.span("rms_norm_forward");
        self.check_len("norm output", out, x.len())?;
        let d = w.len();
        let d32 = d as i32;
        launch!(
            self,
            kernels,
            "rms_norm_rows",
            Self::per_row(x.len() / d.max(1)),
            x,
            w,
            &eps,
            &mut *out,
            &d32
        )
    }
    fn rms_norm_forward_inplace(
        &self,
        x: &mut CudaSlice<f32>,
        w: &CudaSlice<f32>,
        eps: f32,
    ) -> Result<()> {
        let _p = self.span("rms_norm_forward_inplace");
        let d = w.len();
        let d32 = d as i32;
        let rows = x.len() / d.max(1);
        // The kernel reads each value before the thread that reads it writes it.
        let (xp, _rec) = x.device_ptr_mut(self.stream());
        launch!(
            self,
            kernels,
            "rms_norm_rows",
            Self::per_row(rows),
            &xp,
            w,
            &eps,
            &xp,
            &d32
        )
    }
    fn rms_norm_backward_add(
        &self,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        eps: f32,
        dy: &CudaSlice<f32>,
        dx: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let _p = self.span("rms_norm_backward_add");
        self.check_len("norm gradient", dy, x.len())?;
        self.check_len("norm input gradient", dx, x.len())?;
        let d = w.len();
        let d32 = d as i32;
        launch!(
            self,
            kernels,
            "rms_norm_backward_add",
            Self::per_row(x.len() / d.max(1)),
            x,
            w,
            &eps,
            dy,
            &mut *dx,
            &d32
        )
    }
    fn rope(&self, rope: &Rope, x: &mut CudaSlice<f32>, heads: usize, inverse: bool) -> Result<()> {
        let _p = self.span("rope");
        let hd = rope.head_dim();
        let n = x.len() / (heads * hd).max(1);
        self.check_len("rope input", x, n * heads * hd)?;
        let table = self.rope_table(rope, n, inverse)?;
        let rot = rope.rot_dim();
        let (n32, h32, hd32, rot32) = (n as i32, heads as i32, hd as i32, rot as i32);
        launch!(
            self,
            ops,
            "rope",
            Self::flat(n * heads * rot / 2),
            &mut *x,
            &*table,
            &n32,
            &h32,
            &hd32,
            &rot32,
            &self.pos0
        )
    }
    fn attention_forward(
        &self,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        s: AttnShape,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let _p = self.span("attention_forward");
        use Operand::*;
        let n = self.attn_check(q, k, v, s)?;
        self.check_len("attention output", out, q.len())?;
        let p = self.attention_probs(q, k, s, n)?;
        let plan = attention_plan(s, n, Stage::Output);
        self.run_plan(&plan, &[(P, &p), (V, v)], &mut [(Out, out)])
    }
    fn attention_backward(
        &self,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        dout: &CudaSlice<f32>,
        s: AttnShape,
        dq: &mut CudaSlice<f32>,
        dk: &mut CudaSlice<f32>,
        dv: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let _p = self.span("attention_backward");
        use Operand::*;
        let n = self.attn_check(q, k, v, s)?;
        self.check_len("attention output gradient", dout, q.len())?;
        self.check_len("q gradient", dq, q.len())?;
        self.check_len("k gradient", dk, k.len())?;
        self.check_len("v gradient", dv, v.len())?;
        let p = self.attention_probs(q, k, s, n)?;
        let mut ds = self.scratch(s.num_heads * n * n)?;
        let plan = attention_plan(s, n, Stage::ScoreGrad);
        self.run_plan(&plan, &[(DOut, dout), (V, v)], &mut [(DS, &mut ds)])?;
        let (n32, scale) = (n as i32, 1.0 / (s.head_dim as f32).sqrt());
        launch!(
            self,
            kernels,
            "softmax_backward",
            Self::per_row(s.num_heads * n),
            &p,
            &mut ds,
            &n32,
            &scale
        )?;
        let plan = attention_plan(s, n, Stage::InputGrads);
        let inputs = [(DS, &ds), (P, &p), (Q, q), (K, k), (DOut, dout)];
        self.run_plan(&plan, &inputs, &mut [(DQ, dq), (DK, dk), (DV, dv)])
    }
    fn swiglu_forward(
        &self,
        gate: &CudaSlice<f32>,
        up: &CudaSlice<f32>,
        act: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let _p = self.span("swiglu_forward");
        self.check_len("swiglu up", up, gate.len())?;
        self.check_len("swiglu output", act, gate.len())?;
        let n = gate.len() as i64;
        launch!(
            self,
            kernels,
            "swiglu_forward",
            Self::flat(gate.len()),
            gate,
            up,
            &mut *act,
            &n
        )
    }
    fn swiglu_backward(
        &self,
        gate: &CudaSlice<f32>,
        up: &CudaSlice<f32>,
        dact: &CudaSlice<f32>,
        dgate: &mut CudaSlice<f32>,
        dup: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let _p = self.span("swiglu_backward");
        for (what, b) in [("up", up), ("output gradient", dact)] {
            self.check_len(&format!("swiglu {what}"), b, gate.len())?;
        }
        self.check_len("swiglu gate gradient", dgate, gate.len())?;
        self.check_len("swiglu up gradient", dup, gate.len())?;
        let n = gate.len() as i64;
        launch!(
            self,
            kernels,
            "swiglu_backward",
            Self::flat(gate.len()),
            gate,
            up,
            dact,
            &mut *dgate,
            &mut *dup,
            &n
        )
    }
    fn split_columns(
        &self,
        x: &CudaSlice<f32>,
        n: usize,
        parts: &mut [&mut CudaSlice<f32>],
    ) -> Result<()> {
        let _p = self.span("split_columns");
        let total = x.len() / n.max(1);
        let mut off = 0;
        let (xp, _rec) = x.device_ptr(self.stream());
        for p in parts.iter_mut() {
            let width = p.len() / n.max(1);
            if off + width > total {
                bail!("split: parts wider than the {total} columns");
            }
            let args = (n as i32, total as i32, off as i32, width as i32);
            launch!(
                self,
                ops,
                "split_cols",
                Self::flat(p.len()),
                &xp,
                &args.0,
                &args.1,
                &args.2,
                &args.3,
                &mut **p
            )?;
            off += width;
        }
        Ok(())
    }
    fn join_columns(
        &self,
        parts: &[&CudaSlice<f32>],
        n: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let _p = self.span("join_columns");
        let total = out.len() / n.max(1);
        let mut off = 0;
        for p in parts {
            let width = p.len() / n.max(1);
            if off + width > total {
                bail!("join: parts wider than the {total} columns");
            }
            let (pp, _rec) = p.device_ptr(self.stream());
            let args = (n as i32, total as i32, off as i32, width as i32);
            launch!(
                self,
                kernels,
                "join_cols",
                Self::flat(p.len()),
                &pp,
                &args.0,
                &args.1,
                &args.2,
                &args.3,
                &mut *out
            )?;
            off += width;
        }
        Ok(())
    }
    fn lm_head_cross_entropy(
        &self,
        h: &CudaSlice<f32>,
        d: usize,
        w: &CudaSlice<f32>,
        vocab: usize,
        ids: &CudaSlice<u32>,
        mut dh: Option<&mut CudaSlice<f32>>,
        loss: &mut CudaSlice<f64>,
        slot: usize,
    ) -> Result<()> {
        let _p = self.span("lm_head_cross_entropy");
        let n = h.len() / d.max(1);
        if n < 2 || ids.len() != n || h.len() != n * d {
            bail!(
                "cross-entropy: {} ids for {} values of width {d}",
                ids.len(),
                h.len()
            );
        }
        if slot >= loss.len() {
            bail!("cross-entropy: sum {slot} of {}", loss.len());
        }
        self.check_len("lm_head", w, vocab * d)?;
        // Row t predicts ids[t + 1] (out-of-range ids make the loss NaN).
        let m = n - 1;
        let (scale, inv_rows) = (1.0 / m as f32, 1.0 / m as f64);
        if let Some(g) = dh.as_deref_mut() {
            self.check_len("hidden gradient", g, n * d)?;
            self.stream()
                .memset_zeros(g)
                .context("CUDA: clearing a gradient")?;
        }
        let mut logits = self.scratch(LM_CHUNK.min(m) * vocab)?;
        for r0 in (0..m).step_by(LM_CHUNK) {
            let rows = LM_CHUNK.min(m - r0);
            self.gemm(
                (false, true),
                (rows, vocab, d),
                (h, Mat::new(r0 * d, d, 0)),
                (w, Mat::new(0, d, 0)),
                0.0,
                (&mut logits, Mat::new(0, vocab, 0)),
                1,
            )?;
            let v32 = vocab as i32;
            let (tp, _rt) = ids.device_ptr(self.stream());
            let (lp, _rl) = loss.device_ptr_mut(self.stream());
            // This chunk's targets, and the loss's slot.
            let (tp, lp) = (tp + ((1 + r0) * 4) as u64, lp + (slot * 8) as u64);
            launch!(
                self,
                kernels,
                "cross_entropy",
                Self::per_row(rows),
                &mut logits,
                &tp,
                &v32,
                &scale,
                &inv_rows,
                &lp
            )?;
            if let Some(g) = dh.as_deref_mut() {
                self.gemm(
                    (false, false),
                    (rows, d, vocab),
                    (&logits, Mat::new(0, vocab, 0)),
                    (w, Mat::new(0, d, 0)),
                    0.0,
                    (g, Mat::new(r0 * d, d, 0)),
                    1,
                )?;
            }
        }
        Ok(())
    }
    fn add_squared(&self, out: &mut CudaSlice<f32>, g: &CudaSlice<f32>) -> Result<()> {
        let _p = self.span("add_squared");
        self.check_len("squared gradient", g, out.len())?;
        let n = out.len() as i64;
        launch!(
            self,
            kernels,
            "add_squared",
            Self::flat(out.len()),
            &mut *out,
            g,
            &n
        )
    }
    fn pairs(&self, pairs: &[Pair]) -> Result<CudaSlice<f32>> {
        let _p = self.span("upload");
        (self.stream().clone_htod(&words(pairs))).context("CUDA: copying precision pairs")
    }
    fn set_pairs(&self, dst: &mut CudaSlice<f32>, pairs: &[Pair]) -> Result<()> {
        let _p = self.span("upload");
        if dst.len() != PAIR_WORDS * pairs.len() {
            bail!(
                "{} pairs into room for {}",
                pairs.len(),
                dst.len() / PAIR_WORDS
            );
        }
        (self.stream().memcpy_htod(&words(pairs), dst)).context("CUDA: copying precision pairs")
    }
    fn mix(
        &self,
        dst: &mut CudaSlice<f32>,
        levels: &CudaSlice<f32>,
        min_bits: u32,
        pairs: &CudaSlice<f32>,
        slot: usize,
    ) -> Result<()> {
        let _p = self.span("mix");
        let (count, pair) = self.pair_args(levels, dst.len(), pairs, slot)?;
        let (n, min) = (dst.len() as i64, min_bits as i32);
        launch!(
            self,
            kernels,
            "mix_levels",
            Self::flat(dst.len()),
            &mut *dst,
            levels,
            &min,
            &count,
            &pair,
            &n
        )
    }
    fn sums(&self, len: usize) -> Result<CudaSlice<f64>> {
        let _p = self.span("sums");
        (self.stream().alloc_zeros::<f64>(len)).context("CUDA: allocating sums")
    }
    fn clear_sums(&self, sums: &mut CudaSlice<f64>) -> Result<()> {
        let _p = self.span("sums");
        (self.stream().memset_zeros(sums)).context("CUDA: clearing sums")
    }
    fn read_sums(&self, sums: &CudaSlice<f64>) -> Result<Vec<f64>> {
        let _p = self.span("read_sums");
        (self.stream().clone_dtoh(sums)).context("CUDA: copying sums to the host")
    }
    fn dot_diff(
        &self,
        g: &CudaSlice<f32>,
        levels: &CudaSlice<f32>,
        min_bits: u32,
        pairs: &CudaSlice<f32>,
        slot: usize,
        sums: &mut CudaSlice<f64>,
        sum_slot: usize,
    ) -> Result<()> {
        let _p = self.span("dot_diff");
        let (count, pair) = self.pair_args(levels, g.len(), pairs, slot)?;
        if sum_slot >= sums.len() {
            bail!("dot_diff: sum {sum_slot} of {}", sums.len());
        }
        let (n, min) = (g.len() as i64, min_bits as i32);
        let cfg = LaunchConfig {
            block_dim: (ROW_THREADS, 1, 1),
            ..Self::flat(g.len().div_ceil(8))
        };
        let (sp, _rec) = sums.device_ptr_mut(self.stream());
        let out = sp + (sum_slot * std::mem::size_of::<f64>()) as u64;
        launch!(
            self,
            kernels,
            "dot_diff_levels",
            cfg,
            g,
            levels,
            &min,
            &count,
            &pair,
            &n,
            &out
        )
    }
    fn recorder(&self) -> Option<Box<dyn Recorder>> {
        // As the engine's decode graphs: DPLLM_CUDA_GRAPHS=0 turns them off.
        let off = std::env::var("DPLLM_CUDA_GRAPHS").is_ok_and(|v| v == "0");
        if self.profile.is_some() || off {
            return None;
        }
        Some(Box::new(graph::StreamRecorder::new(self.stream().clone())))
    }
    fn row_norms(&self, x: &CudaSlice<f32>, width: usize, out: &mut CudaSlice<f32>) -> Result<()> {
        let _p = self.span("row_norms");
        if width == 0 || x.len() != out.len() * width {
            bail!(
                "row_norms: {} values are not {} rows of {width}",
                x.len(),
                out.len()
            );
        }
        let (w32, a, c) = (width as i32, 1f32, 0f32);
        launch!(
            self,
            ops,
            "row_norm_affine",
            Self::per_row(out.len()),
            x,
            &w32,
            &a,
            &c,
            &mut *out
        )
    }
    fn norm_error_scale(&self, y: &mut CudaSlice<f32>, k: usize, e: &CudaSlice<f32>) -> Result<()> {
        let _p = self.span("norm_error_scale");
        check_lengths("norm_error_scale", y.len(), &[k * e.len()])?;
        if e.is_empty() {
            return Ok(());
        }
        let (k32, n32) = (k as i32, e.len() as i32);
        launch!(
            self,
            kernels,
            "norm_error_scale",
            Self::per_row(e.len()),
            &mut *y,
            e,
            &k32,
            &n32
        )
    }
    fn adam_step(
        &self,
        w: &mut CudaSlice<f32>,
        g: &CudaSlice<f32>,
        m: &mut CudaSlice<f32>,
        v: &mut CudaSlice<f32>,
        lr: f32,
        t: i32,
    ) -> Result<()> {
        let _p = self.span("adam_step");
        check_adam([w.len(), g.len(), m.len(), v.len()], t)?;
        let ((b1, b2), (c1, c2)) = (ops::ADAM_BETAS, ops::adam_corrections(t));
        let n = w.len() as i64;
        launch!(
            self,
            kernels,
            "adam_step",
            Self::flat(w.len()),
            &mut *w,
            g,
            &mut *m,
            &mut *v,
            &lr,
            &b1,
            &b2,
            &c1,
            &c2,
            &ops::ADAM_EPS,
            &n
        )
    }
}

/// `pairs` as the engine's kernels read them, one after another.
fn words(pairs: &[Pair]) -> Vec<f32> {
    (pairs.iter())
        .flat_map(|p| pair_words(p.lo, p.hi, p.a, p.b))
        .collect()
}

/// A cuBLAS handle on `stream`, in TF32 mode when `tf32`; a clear error
/// when cuBLAS is missing.
fn own_blas(
    dev: &CudaDevice,
    stream: &Arc<CudaStream>,
    tf32: bool,
) -> Result<Arc<cudarc::cublas::CudaBlas>> {
    dev.blas()?; // the clear error when cuBLAS is missing
    let blas = cudarc::cublas::CudaBlas::new(stream.clone())
        .map_err(|e| anyhow::anyhow!("cuBLAS: creating a handle: {e}"))?;
    if tf32 {
        use cudarc::cublas::sys;
        // SAFETY: the handle is live; the mode is a valid cublasMath_t.
        let status = unsafe {
            sys::cublasSetMathMode(
                *blas.handle(),
                sys::cublasMath_t::CUBLAS_TF32_TENSOR_OP_MATH,
            )
        };
        if status != sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            bail!("cuBLAS: cannot enable TF32 ({status:?})");
        }
    }
    Ok(Arc::new(blas))
}
