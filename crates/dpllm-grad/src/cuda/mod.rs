//! [`CudaGrad`]: the gradient model's ops on an NVIDIA GPU (issue #11), so the
//! sensitivity pass (and later precision fine-tuning) keeps weights,
//! activations and gradients on the device.
//!
//! Matrix products go through cuBLAS in f32 (no TF32, so results match the
//! CPU's to f32 rounding): the linears, and attention as per-head score
//! matrices [n × n] (strided batched GEMMs over the query heads of each
//! position in a GQA group), a causal softmax kernel, then the products with
//! V; the backward pass recomputes the probabilities. The rest are the
//! kernels of `grad.cu`, compiled by NVRTC on first use like the engine's.

use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use dpllm_engine::backend::cpu::attention::AttnShape;
use dpllm_engine::backend::cuda::cudarc;
use dpllm_engine::backend::cuda::{CudaDevice, Kernels};
use dpllm_engine::model::rope::Rope;

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{Gemm, GemmConfig, StridedBatchedConfig};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};

use crate::backend::GradBackend;

/// The kernels' CUDA C source.
pub const SOURCE: &str = include_str!("grad.cu");

/// Threads of a block in the row kernels (a multiple of 32).
const ROW_THREADS: u32 = 256;

/// Logit rows per lm_head chunk (bounds the logits buffer to chunk × vocab).
const LM_CHUNK: usize = 256;

/// One row-major matrix operand of a (batched) product: where it starts in
/// its buffer, its row stride, and the stride between the batch's matrices.
#[derive(Clone, Copy, Debug)]
struct Mat {
    off: usize,
    ld: usize,
    stride: usize,
}

impl Mat {
    fn new(off: usize, ld: usize, stride: usize) -> Mat {
        Mat { off, ld, stride }
    }
}

/// Queue kernel `$name` of a [`CudaGrad`]'s module with arguments `$arg`
/// (references), an error naming the kernel when it cannot be launched.
macro_rules! launch {
    ($g:expr, $name:expr, $cfg:expr, $($arg:expr),+ $(,)?) => {{
        let name: &str = $name;
        let f = $g.kernels.get(name)?;
        let cfg = $cfg;
        // SAFETY: every call site passes the kernel's parameters in order with
        // their C types (int = i32, long = i64, pointers as slices or device
        // addresses) and sizes the grid for buffers it has checked; the
        // kernels check their own bounds.
        let r = unsafe { $g.stream().launch_builder(&f)$(.arg($arg))+.launch(cfg) };
        r.map(|_| ()).with_context(|| format!("CUDA: launching {name}"))
    }};
}

/// RoPE tables on the device: (host table, inverse, device table).
type RopeTables = Vec<(Vec<f32>, bool, CudaSlice<f32>)>;

/// cuBLAS's (column-major) call for the row-major product `C [m × n] =
/// op(A) [m × k] · op(B) [k × n] + beta · C`, `batch` times: Cᵀ = op(B)ᵀ ·
/// op(A)ᵀ, so B (from `mb.off`) is cuBLAS's first operand and A its second.
fn blas_config(
    (ta, tb): (bool, bool),
    (m, n, k): (usize, usize, usize),
    (ma, mb, mc): (Mat, Mat, Mat),
    beta: f32,
    batch: usize,
) -> StridedBatchedConfig<f32> {
    let op = |t: bool| match t {
        true => cublasOperation_t::CUBLAS_OP_T,
        false => cublasOperation_t::CUBLAS_OP_N,
    };
    StridedBatchedConfig {
        gemm: GemmConfig {
            transa: op(tb),
            transb: op(ta),
            m: n as i32,
            n: m as i32,
            k: k as i32,
            alpha: 1f32,
            lda: mb.ld as i32,
            ldb: ma.ld as i32,
            beta,
            ldc: mc.ld as i32,
        },
        batch_size: batch as i32,
        stride_a: mb.stride as i64,
        stride_b: ma.stride as i64,
        stride_c: mc.stride as i64,
    }
}

/// The operands of attention's products: inputs q, k, v and the output's
/// gradient, the probabilities P and score gradients dS [heads × n × n], and
/// the outputs.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Operand {
    Q,
    K,
    V,
    DOut,
    P,
    DS,
    Out,
    DQ,
    DK,
    DV,
}

/// One batched product `C = op(A) · op(B) + beta · C` of a plan (row-major, as [`CudaGrad::gemm`] takes it).
#[derive(Clone, Copy, Debug)]
struct Product {
    trans: (bool, bool),
    dims: (usize, usize, usize),
    a: (Operand, Mat),
    b: (Operand, Mat),
    beta: f32,
    c: (Operand, Mat),
    batch: usize,
}

/// The stages of attention made of products; the softmax and its backward
/// run between them.
#[derive(Clone, Copy, Debug)]
enum Stage {
    /// P = Q · Kᵀ (scores; the softmax follows).
    Scores,
    /// Out = P · V.
    Output,
    /// dS = dOut · Vᵀ (the softmax backward follows).
    ScoreGrad,
    /// dQ = dS · K, dK = Σ dSᵀ · Q, dV = Σ Pᵀ · dOut (over each KV head's group).
    InputGrads,
}

/// The products of `stage` for attention of shape `s` over `n` tokens. Query
/// head h = kv·g + j of a group of g shares KV head kv: each product is
/// batched over the KV heads for one j, the j-th heads `g · head_dim` apart.
fn attention_plan(s: AttnShape, n: usize, stage: Stage) -> Vec<Product> {
    use Operand::*;
    let (nh, nkv, hd) = (s.num_heads, s.num_kv_heads, s.head_dim);
    let (qd, kvd, g) = (nh * hd, nkv * hd, nh / nkv);
    // Where operand o of query position j starts and how it is laid out.
    let mat = |o: Operand, j: usize| match o {
        Q | DOut | Out | DQ => Mat::new(j * hd, qd, g * hd),
        K | V | DK | DV => Mat::new(0, kvd, hd),
        P | DS => Mat::new(j * n * n, n, g * n * n),
    };
    let (scores, rows) = ((n, n, hd), (n, hd, n));
    // (transposes, dims, A, B, C) of each product.
    let steps = match stage {
        Stage::Scores => vec![((false, true), scores, Q, K, P)],
        Stage::Output => vec![((false, false), rows, P, V, Out)],
        Stage::ScoreGrad => vec![((false, true), scores, DOut, V, DS)],
        Stage::InputGrads => vec![
            ((false, false), rows, DS, K, DQ),
            ((true, false), rows, DS, Q, DK),
            ((true, false), rows, P, DOut, DV),
        ],
    };
    let mut plan = Vec::new();
    for j in 0..g {
        for &(trans, dims, a, b, c) in &steps {
            plan.push(Product {
                trans,
                dims,
                a: (a, mat(a, j)),
                b: (b, mat(b, j)),
                // A KV head's gradients sum over its group's query heads.
                beta: if j > 0 && matches!(c, DK | DV) {
                    1.0
                } else {
                    0.0
                },
                c: (c, mat(c, j)),
                batch: nkv,
            });
        }
    }
    plan
}

/// The gradient ops on one GPU.
pub struct CudaGrad {
    dev: Arc<CudaDevice>,
    kernels: Kernels,
    /// RoPE tables uploaded so far (the last few).
    rope_tables: Mutex<RopeTables>,
}

impl CudaGrad {
    /// The gradient ops on `dev`, their kernels compiled (or read from the PTX cache).
    pub fn new(dev: Arc<CudaDevice>) -> Result<CudaGrad> {
        let kernels = dev.load_kernels("grad", SOURCE)?;
        Ok(CudaGrad {
            dev,
            kernels,
            rope_tables: Mutex::default(),
        })
    }

    /// The device.
    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.dev
    }

    fn stream(&self) -> &Arc<CudaStream> {
        self.dev.stream()
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
        let blas = self.dev.blas()?;
        let (av, bv) = (a.slice(ma.off..), b.slice(mb.off..));
        let mut cv = c.slice_mut(mc.off..);
        // SAFETY: the extents of all three operands were checked above.
        unsafe { blas.gemm_strided_batched(cfg, &bv, &av, &mut cv) }
            .map_err(|e| anyhow::anyhow!("cuBLAS SGEMM: {e}"))
    }

    /// The device RoPE table for positions 0..n (sines negated for the inverse).
    fn rope_table(&self, rope: &Rope, n: usize, inverse: bool) -> Result<CudaSlice<f32>> {
        let mut host = rope.table(0, n);
        let half = rope.rot_dim() / 2;
        let mut cache = self.rope_tables.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, _, t)) = cache
            .iter()
            .find(|(h, inv, _)| *inv == inverse && *h == host)
        {
            return Ok(t.clone());
        }
        let key = host.clone();
        if inverse {
            for row in host.chunks_mut(2 * half) {
                row[half..].iter_mut().for_each(|s| *s = -*s);
            }
        }
        let t = self
            .stream()
            .clone_htod(&host)
            .context("CUDA: copying a RoPE table")?;
        if cache.len() >= 8 {
            cache.remove(0);
        }
        cache.push((key, inverse, t.clone()));
        Ok(t)
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
        let mut p = self.zeros(s.num_heads * n * n)?;
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

impl GradBackend for CudaGrad {
    type Buf = CudaSlice<f32>;

    fn name(&self) -> String {
        self.dev.describe()
    }
    fn upload(&self, host: &[f32]) -> Result<CudaSlice<f32>> {
        self.stream()
            .clone_htod(host)
            .context("CUDA: copying to the device")
    }
    fn zeros(&self, len: usize) -> Result<CudaSlice<f32>> {
        self.stream()
            .alloc_zeros(len)
            .with_context(|| format!("CUDA: allocating {len} floats"))
    }
    fn download(&self, buf: &CudaSlice<f32>) -> Result<Vec<f32>> {
        self.stream()
            .clone_dtoh(buf)
            .context("CUDA: copying to the host")
    }
    fn len(&self, buf: &CudaSlice<f32>) -> usize {
        buf.len()
    }
    fn copy(&self, buf: &CudaSlice<f32>) -> Result<CudaSlice<f32>> {
        self.stream()
            .clone_dtod(buf)
            .context("CUDA: copying a buffer")
    }
    fn embed(
        &self,
        table: &CudaSlice<f32>,
        d: usize,
        tokens: &[u32],
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let vocab = table.len() / d.max(1);
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= vocab) {
            bail!("token id {t} is out of range for a vocabulary of {vocab}");
        }
        self.check_len("embedding output", out, tokens.len() * d)?;
        let ids = self.upload_u32(tokens)?;
        let (d32, n32) = (d as i32, tokens.len() as i32);
        launch!(
            self,
            "embed_rows",
            Self::flat(out.len()),
            table,
            &ids,
            &d32,
            &n32,
            &mut *out
        )
    }
    fn add(&self, h: &mut CudaSlice<f32>, x: &CudaSlice<f32>) -> Result<()> {
        self.check_len("add", x, h.len())?;
        let n = h.len() as i64;
        launch!(self, "add_into", Self::flat(h.len()), &mut *h, x, &n)
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
                "add_row_bias",
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
        self.check_len("norm output", out, x.len())?;
        let d = w.len();
        let d32 = d as i32;
        launch!(
            self,
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
        let d = w.len();
        let d32 = d as i32;
        let rows = x.len() / d.max(1);
        // The kernel reads each value before the thread that reads it writes it.
        let (xp, _rec) = x.device_ptr_mut(self.stream());
        launch!(
            self,
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
        self.check_len("norm gradient", dy, x.len())?;
        self.check_len("norm input gradient", dx, x.len())?;
        let d = w.len();
        let d32 = d as i32;
        launch!(
            self,
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
        let hd = rope.head_dim();
        let n = x.len() / (heads * hd).max(1);
        self.check_len("rope input", x, n * heads * hd)?;
        let table = self.rope_table(rope, n, inverse)?;
        let rot = rope.rot_dim();
        let (n32, h32, hd32, rot32) = (n as i32, heads as i32, hd as i32, rot as i32);
        launch!(
            self,
            "rope_rows",
            Self::flat(n * heads * rot / 2),
            &mut *x,
            &table,
            &n32,
            &h32,
            &hd32,
            &rot32
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
        use Operand::*;
        let n = self.attn_check(q, k, v, s)?;
        self.check_len("attention output gradient", dout, q.len())?;
        self.check_len("q gradient", dq, q.len())?;
        self.check_len("k gradient", dk, k.len())?;
        self.check_len("v gradient", dv, v.len())?;
        let p = self.attention_probs(q, k, s, n)?;
        let mut ds = self.zeros(s.num_heads * n * n)?;
        let plan = attention_plan(s, n, Stage::ScoreGrad);
        self.run_plan(&plan, &[(DOut, dout), (V, v)], &mut [(DS, &mut ds)])?;
        let (n32, scale) = (n as i32, 1.0 / (s.head_dim as f32).sqrt());
        launch!(
            self,
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
        self.check_len("swiglu up", up, gate.len())?;
        self.check_len("swiglu output", act, gate.len())?;
        let n = gate.len() as i64;
        launch!(
            self,
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
        for (what, b) in [("up", up), ("output gradient", dact)] {
            self.check_len(&format!("swiglu {what}"), b, gate.len())?;
        }
        self.check_len("swiglu gate gradient", dgate, gate.len())?;
        self.check_len("swiglu up gradient", dup, gate.len())?;
        let n = gate.len() as i64;
        launch!(
            self,
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
        let total = x.len() / n.max(1);
        let mut off = 0;
        // The kernel only reads x when splitting.
        let (xp, _rec) = x.device_ptr(self.stream());
        for p in parts.iter_mut() {
            let width = p.len() / n.max(1);
            if off + width > total {
                bail!("split: parts wider than the {total} columns");
            }
            let args = (n as i32, total as i32, off as i32, width as i32, 0i32);
            launch!(
                self,
                "columns",
                Self::flat(p.len()),
                &xp,
                &mut **p,
                &args.0,
                &args.1,
                &args.2,
                &args.3,
                &args.4
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
        let total = out.len() / n.max(1);
        let mut off = 0;
        for p in parts {
            let width = p.len() / n.max(1);
            if off + width > total {
                bail!("join: parts wider than the {total} columns");
            }
            // The kernel only reads the part when joining.
            let (pp, _rec) = p.device_ptr(self.stream());
            let args = (n as i32, total as i32, off as i32, width as i32, 1i32);
            launch!(
                self,
                "columns",
                Self::flat(p.len()),
                &mut *out,
                &pp,
                &args.0,
                &args.1,
                &args.2,
                &args.3,
                &args.4
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
        targets: &[u32],
        mut dh: Option<&mut CudaSlice<f32>>,
    ) -> Result<f64> {
        let n = h.len() / d.max(1);
        let m = targets.len();
        if m == 0 || m > n {
            bail!("cross-entropy: {m} targets for {n} rows");
        }
        if let Some(&t) = targets.iter().find(|&&t| t as usize >= vocab) {
            bail!("target id {t} is out of range for a vocabulary of {vocab}");
        }
        self.check_len("lm_head", w, vocab * d)?;
        let scale = 1.0 / m as f32;
        let tg = self.upload_u32(targets)?;
        let mut losses = self
            .stream()
            .alloc_zeros::<f64>(m)
            .context("CUDA: allocating the losses")?;
        if let Some(g) = dh.as_deref_mut() {
            self.check_len("hidden gradient", g, n * d)?;
            self.stream()
                .memset_zeros(g)
                .context("CUDA: clearing a gradient")?;
        }
        let mut logits = self.zeros(LM_CHUNK.min(m) * vocab)?;
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
            let (tp, _rt) = tg.device_ptr(self.stream());
            let (lp, _rl) = losses.device_ptr_mut(self.stream());
            // Targets and losses of this chunk's rows.
            let (tp, lp) = (tp + (r0 * 4) as u64, lp + (r0 * 8) as u64);
            launch!(
                self,
                "cross_entropy",
                Self::per_row(rows),
                &mut logits,
                &tp,
                &v32,
                &scale,
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
        let l = self
            .stream()
            .clone_dtoh(&losses)
            .context("CUDA: copying the losses to the host")?;
        Ok(l.iter().sum::<f64>() / m as f64)
    }
    fn add_squared(&self, out: &mut CudaSlice<f32>, g: &CudaSlice<f32>) -> Result<()> {
        self.check_len("squared gradient", g, out.len())?;
        let n = out.len() as i64;
        launch!(self, "add_squared", Self::flat(out.len()), &mut *out, g, &n)
    }
    fn mix(
        &self,
        dst: &mut CudaSlice<f32>,
        a: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        ra: f32,
        rb: f32,
    ) -> Result<()> {
        self.check_len("mix a", a, dst.len())?;
        self.check_len("mix b", b, dst.len())?;
        let n = dst.len() as i64;
        launch!(
            self,
            "mix",
            Self::flat(dst.len()),
            &mut *dst,
            a,
            b,
            &ra,
            &rb,
            &n
        )
    }
    fn dot_diff(
        &self,
        g: &CudaSlice<f32>,
        hi: &CudaSlice<f32>,
        lo: &CudaSlice<f32>,
    ) -> Result<f64> {
        self.check_len("dot_diff hi", hi, g.len())?;
        self.check_len("dot_diff lo", lo, g.len())?;
        let mut out = (self.stream().alloc_zeros::<f64>(1)).context("CUDA: allocating a sum")?;
        let n = g.len() as i64;
        let cfg = LaunchConfig {
            block_dim: (ROW_THREADS, 1, 1),
            ..Self::flat(g.len().div_ceil(8))
        };
        launch!(self, "dot_diff", cfg, g, hi, lo, &n, &mut out)?;
        let v = self
            .stream()
            .clone_dtoh(&out)
            .context("CUDA: copying a sum to the host")?;
        Ok(v[0])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// cuBLAS's SGEMM strided-batched semantics (column-major) on the host.
    fn sgemm_host(cfg: &StridedBatchedConfig<f32>, a: &[f32], b: &[f32], c: &mut [f32]) {
        let g = cfg.gemm;
        let (m, n, k) = (g.m as usize, g.n as usize, g.k as usize);
        let (lda, ldb, ldc) = (g.lda as usize, g.ldb as usize, g.ldc as usize);
        let n_op = cublasOperation_t::CUBLAS_OP_N;
        for bi in 0..cfg.batch_size as usize {
            let (a, b) = (
                &a[bi * cfg.stride_a as usize..],
                &b[bi * cfg.stride_b as usize..],
            );
            let c = &mut c[bi * cfg.stride_c as usize..];
            for j in 0..n {
                for i in 0..m {
                    let s: f32 = (0..k)
                        .map(|p| {
                            let x = if g.transa == n_op {
                                a[i + p * lda]
                            } else {
                                a[p + i * lda]
                            };
                            let y = if g.transb == n_op {
                                b[p + j * ldb]
                            } else {
                                b[j + p * ldb]
                            };
                            x * y
                        })
                        .sum();
                    c[i + j * ldc] = g.alpha * s + g.beta * c[i + j * ldc];
                }
            }
        }
    }

    /// The call [`blas_config`] makes computes the row-major product, for every
    /// transposition, with offsets, padded rows and batches.
    #[test]
    fn blas_config_is_the_row_major_product() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
            let (m, n, k, batch, beta) = (5, 3, 4, 3, 0.5f32);
            let (ar, ac) = if ta { (k, m) } else { (m, k) };
            let (br, bc) = if tb { (n, k) } else { (k, n) };
            let ma = Mat::new(2, ac + 1, ar * (ac + 1) + 3);
            let mb = Mat::new(1, bc + 2, br * (bc + 2) + 1);
            let mc = Mat::new(3, n + 3, m * (n + 3) + 2);
            let len = |x: Mat, rows: usize| x.off + batch * x.stride + rows * x.ld;
            let mut r = |len: usize| {
                (0..len)
                    .map(|_| rng.random_range(-1.0f32..1.0))
                    .collect::<Vec<_>>()
            };
            let (a, b, c0) = (r(len(ma, ar)), r(len(mb, br)), r(len(mc, m)));
            let mut c = c0.clone();
            let cfg = blas_config((ta, tb), (m, n, k), (ma, mb, mc), beta, batch);
            sgemm_host(&cfg, &b[mb.off..], &a[ma.off..], &mut c[mc.off..]);
            for bi in 0..batch {
                for i in 0..m {
                    for j in 0..n {
                        let at =
                            |x: Mat, r: usize, cc: usize| x.off + bi * x.stride + r * x.ld + cc;
                        let want: f32 = (0..k)
                            .map(|p| {
                                let x = if ta { a[at(ma, p, i)] } else { a[at(ma, i, p)] };
                                let y = if tb { b[at(mb, j, p)] } else { b[at(mb, p, j)] };
                                x * y
                            })
                            .sum::<f32>()
                            + beta * c0[at(mc, i, j)];
                        let got = c[at(mc, i, j)];
                        assert!(
                            (got - want).abs() < 1e-5,
                            "{ta} {tb} batch {bi} ({i}, {j}): {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    /// Attention's plans, run on the host through [`blas_config`] and the
    /// kernels' softmax steps written out here, give the CPU's attention and
    /// its gradients (GQA groups, a sliding window).
    #[test]
    fn attention_plans_match_the_cpu() {
        use crate::backend::{CpuGrad, GradBackend};
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for (nh, nkv, hd, window, n) in [
            (6, 2, 4, None, 9),
            (4, 4, 3, Some(3), 7),
            (3, 1, 5, None, 1),
        ] {
            let s = AttnShape {
                num_heads: nh,
                num_kv_heads: nkv,
                head_dim: hd,
                window,
            };
            let mut r = |len: usize| {
                (0..len)
                    .map(|_| rng.random_range(-1.0f32..1.0))
                    .collect::<Vec<_>>()
            };
            let (q, k, v, dout) = (
                r(n * nh * hd),
                r(n * nkv * hd),
                r(n * nkv * hd),
                r(n * nh * hd),
            );
            let run = |stage, bufs: &mut std::collections::HashMap<Operand, Vec<f32>>| {
                for p in attention_plan(s, n, stage) {
                    let cfg = blas_config(p.trans, p.dims, (p.a.1, p.b.1, p.c.1), p.beta, p.batch);
                    let (a, b) = (bufs[&p.a.0].clone(), bufs[&p.b.0].clone());
                    let c = bufs.get_mut(&p.c.0).unwrap();
                    sgemm_host(&cfg, &b[p.b.1.off..], &a[p.a.1.off..], &mut c[p.c.1.off..]);
                }
            };
            let scale = 1.0 / (hd as f32).sqrt();
            let mut bufs = std::collections::HashMap::from([
                (Operand::Q, q.clone()),
                (Operand::K, k.clone()),
                (Operand::V, v.clone()),
                (Operand::DOut, dout.clone()),
                (Operand::P, vec![0.0; nh * n * n]),
                (Operand::DS, vec![0.0; nh * n * n]),
                (Operand::Out, vec![0.0; q.len()]),
                (Operand::DQ, vec![0.0; q.len()]),
                (Operand::DK, vec![9.0; k.len()]),
                (Operand::DV, vec![9.0; v.len()]),
            ]);
            run(Stage::Scores, &mut bufs);
            // causal_softmax
            for (row, x) in bufs.get_mut(&Operand::P).unwrap().chunks_mut(n).enumerate() {
                let t = row % n;
                let lo = window.map_or(0, |w| (t + 1).saturating_sub(w));
                let m = (lo..=t).map(|j| x[j] * scale).fold(f32::MIN, f32::max);
                let sum: f32 = (lo..=t).map(|j| (x[j] * scale - m).exp()).sum();
                for (j, v) in x.iter_mut().enumerate() {
                    *v = if j >= lo && j <= t {
                        (*v * scale - m).exp() / sum
                    } else {
                        0.0
                    };
                }
            }
            run(Stage::Output, &mut bufs);
            run(Stage::ScoreGrad, &mut bufs);
            // softmax_backward
            let pr = bufs[&Operand::P].clone();
            for (x, p) in bufs
                .get_mut(&Operand::DS)
                .unwrap()
                .chunks_mut(n)
                .zip(pr.chunks(n))
            {
                let dot: f32 = x.iter().zip(p).map(|(a, b)| a * b).sum();
                x.iter_mut()
                    .zip(p)
                    .for_each(|(d, p)| *d = p * (*d - dot) * scale);
            }
            run(Stage::InputGrads, &mut bufs);
            let cpu = CpuGrad;
            let mut want = [
                vec![0f32; q.len()],
                vec![0f32; q.len()],
                vec![0f32; k.len()],
                vec![0f32; v.len()],
            ];
            let [o, dq, dk, dv] = &mut want;
            cpu.attention_forward(&q, &k, &v, s, o).unwrap();
            cpu.attention_backward(&q, &k, &v, &dout, s, dq, dk, dv)
                .unwrap();
            for (op, w) in [
                (Operand::Out, &want[0]),
                (Operand::DQ, &want[1]),
                (Operand::DK, &want[2]),
                (Operand::DV, &want[3]),
            ] {
                for (i, (a, b)) in bufs[&op].iter().zip(w.iter()).enumerate() {
                    assert!(
                        (a - b).abs() < 1e-4,
                        "{nh}/{nkv} heads, n={n}, {window:?}: {op:?}[{i}] {a} vs {b}"
                    );
                }
            }
        }
    }
}
