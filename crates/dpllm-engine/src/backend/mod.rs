//! The seam between the model and the hardware, at the level of this engine's
//! ops (not a general tensor library).
//!
//! The forward pass ([`crate::model`]) is written once against [`Backend`]:
//! activations, weights, the KV cache and the DP-LLM precision decisions all
//! live in the backend's own buffers, so a device backend runs a whole forward
//! call without copying to the host between ops or synchronising at a precision
//! decision. Only the logits (and, for evaluation, final hidden states) come back.
//!
//! - [`cpu`]: the CPU backend: SIMD kernels chosen at run time beside portable references.
//! - [`cuda`] (feature `cuda`): NVIDIA GPUs, kernels compiled by NVRTC at run time.
//!
//! Shapes: activations are row-major `[n × width]`, one row per token; weights
//! are `[out × in]` as in Hugging Face checkpoints.

pub mod conformance;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
mod device;

use std::sync::Arc;

use dpllm_format::{Q8Matrix, TensorData};
use half::f16;

pub use cpu::CpuBackend;
pub use device::{Device, KvDtype};

use crate::error::Result;
use crate::sampler::Draw;

/// [`Backend::argmax_rows`] on host rows.
pub fn argmax_rows_host(x: &[f32], width: usize) -> Vec<Option<u32>> {
    if width == 0 {
        return Vec::new();
    }
    x.chunks(width)
        .map(|r| {
            r.iter()
                .all(|v| v.is_finite())
                .then(|| crate::sampler::argmax(r))
        })
        .collect()
}

/// [`Backend::sample_rows`] on host rows.
pub fn sample_rows_host(x: &[f32], width: usize, draws: &[Draw]) -> Vec<Option<u32>> {
    if width == 0 {
        return Vec::new();
    }
    x.chunks(width)
        .zip(draws)
        .map(|(r, &d)| sample_row_host(r, d))
        .collect()
}

/// [`Backend::sample_rows`] of one host row.
pub fn sample_row_host(row: &[f32], d: Draw) -> Option<u32> {
    row.iter()
        .all(|v| v.is_finite())
        .then(|| crate::sampler::draw(row, d))
}

/// Head layout of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (divides `num_heads`).
    pub num_kv_heads: usize,
    /// Dimension per head.
    pub head_dim: usize,
    /// Each query sees at most this many most recent positions (itself included).
    pub window: Option<usize>,
}

/// What RoPE rotates in [`Backend::rope_append`]: q and k heads of
/// `head_dim`, whose first `rot_dim` dimensions turn by the angles of `table`
/// ([position][cos 0..rot/2 | sin 0..rot/2]).
pub struct RopeArgs<'a, B: Backend> {
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Dimension per head.
    pub head_dim: usize,
    /// Rotated dimensions per head (even, at most `head_dim`).
    pub rot_dim: usize,
    /// The cos/sin table.
    pub table: &'a B::Buf,
}

/// The token ids and first position of one forward call, with the backend's
/// own copy of them (`data`): on a GPU, device memory that the embedding, RoPE,
/// KV and attention kernels read, so that a captured graph of the call runs
/// the next token once [`Backend::step_update`] has rewritten it.
pub struct Step<D> {
    /// Token ids.
    pub tokens: Vec<u32>,
    /// Position of the first token.
    pub pos0: usize,
    /// The backend's copy.
    pub data: D,
}

/// What a DP-LLM estimator reads for `n` tokens: the rows of its input
/// [n × in] (the linear's input, or the asynchronous approximation of it), or
/// what the norm regression needs of them, left by the kernel that made the
/// input: their Euclidean norms [n] ([`Backend::add_checked_norm`]), or
/// their sums of squares in parts ([`SumSq`]).
pub enum EstInput<'a, B: Backend> {
    /// The input's rows.
    Rows(&'a B::Buf),
    /// The rows' norms.
    Norms(&'a B::Buf),
    /// Per token, `parts` sums of squares whose total is the row's squared
    /// norm ([n × parts]).
    SumSq {
        /// The sums.
        sums: &'a B::Buf,
        /// Sums a token.
        parts: usize,
    },
}

impl<'a, B: Backend> EstInput<'a, B> {
    /// Values a token of this input holds, for rows of `width` values.
    pub fn per_token(&self, width: usize) -> usize {
        match self {
            EstInput::Rows(_) => width,
            EstInput::Norms(_) => 1,
            EstInput::SumSq { parts, .. } => *parts,
        }
    }

    /// The buffer the values are in.
    pub fn buf(&self) -> &'a B::Buf {
        match self {
            EstInput::Rows(b) | EstInput::Norms(b) | EstInput::SumSq { sums: b, .. } => b,
        }
    }

    /// The same kind of input from another buffer (the picked tokens' values).
    pub fn with_buf<'b>(&self, buf: &'b B::Buf) -> EstInput<'b, B> {
        match self {
            EstInput::Rows(_) => EstInput::Rows(buf),
            EstInput::Norms(_) => EstInput::Norms(buf),
            EstInput::SumSq { parts, .. } => EstInput::SumSq {
                sums: buf,
                parts: *parts,
            },
        }
    }
}

/// Per-token sums of squares of a kernel's output rows, `parts` a token
/// ([n × parts]; their total is the row's squared norm), written as the
/// kernel writes the rows ([`Backend::swiglu_sumsq`],
/// [`Backend::attention_sumsq`]): what the norm regression of the linear
/// that reads those rows needs, without reading them again.
pub struct SumSq<B: Backend> {
    /// The sums.
    pub sums: B::Buf,
    /// Sums a token.
    pub parts: usize,
}

impl<B: Backend> SumSq<B> {
    /// These sums as an estimator input.
    pub fn input(&self) -> EstInput<'_, B> {
        EstInput::SumSq {
            sums: &self.sums,
            parts: self.parts,
        }
    }
}

impl<B: Backend> Clone for EstInput<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<B: Backend> Copy for EstInput<'_, B> {}

/// The error of an estimator that needs its input's rows but was given their norms.
pub fn needs_rows(est: &Estimator<impl Backend>) -> crate::EngineError {
    crate::EngineError::Device(format!(
        "the estimator {est:?} needs its input's rows, not their norms"
    ))
}

/// How one linear decides each token's precision (DP-LLM): its estimator on
/// `input`, high when the estimate exceeds `threshold`.
pub struct Decide<'a, B: Backend> {
    /// The estimator.
    pub estimator: &'a Estimator<B>,
    /// The estimator's input.
    pub input: EstInput<'a, B>,
    /// Threshold τ.
    pub threshold: f32,
}

/// Where [`Backend::add_checked_norm`] leaves the norms of DP-LLM's
/// estimator inputs, one per token: `after`, of its output (the next
/// linears' input); `before`, of the RMSNorm of the residual before the add
/// (their asynchronous input, METHOD.md 2f).
pub struct InputNorms<'a, B: Backend> {
    /// ||out|| per token.
    pub after: &'a mut B::Buf,
    /// ||RMSNorm(h before the add)|| per token.
    pub before: &'a mut B::Buf,
}

/// A dense weight as read from the file, before a backend takes it.
#[derive(Debug, Clone)]
pub enum DenseHost {
    /// f32, f16 or bf16 elements.
    Float(Arc<TensorData>),
    /// 8-bit blocks (llama.cpp's Q8_0), kept so: an output layer stored this way
    /// is read at a quarter of its f32 size.
    Q8_0(Arc<Q8Matrix>),
}

impl DenseHost {
    /// Elements.
    pub fn len(&self) -> usize {
        match self {
            DenseHost::Float(w) => w.len(),
            DenseHost::Q8_0(w) => w.quants.len(),
        }
    }

    /// True when there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes held.
    pub fn nbytes(&self) -> usize {
        match self {
            DenseHost::Float(w) => w.nbytes(),
            DenseHost::Q8_0(w) => w.nbytes(),
        }
    }

    /// Short name of the stored form ("bf16", "q8_0", ...).
    pub fn storage(&self) -> String {
        match self {
            DenseHost::Float(w) => w.dtype().name().to_lowercase(),
            DenseHost::Q8_0(_) => "q8_0".into(),
        }
    }
}

/// An any-precision weight as read from the file, before a backend takes it:
/// planes 0..max_bits plane-major (`[plane][rows][ceil(cols/32)]` words) and one
/// f16 LUT per precision seed..=max ([rows × 2^b]).
#[derive(Clone)]
pub struct AnyPrecHost {
    /// Output features.
    pub rows: usize,
    /// Input features.
    pub cols: usize,
    /// Lowest precision held.
    pub seed_bits: u32,
    /// Highest precision held.
    pub max_bits: u32,
    /// Bit-planes.
    pub planes: Vec<u32>,
    /// LUTs, `luts[b - seed_bits]`.
    pub luts: Vec<Vec<f16>>,
    /// Optional bias, `rows` values.
    pub bias: Option<Vec<f32>>,
}

/// Ok when a layer holding precisions `seed..=max` can run at `bits`, else why not.
pub fn check_bits_in(bits: u32, seed: u32, max: u32) -> std::result::Result<(), String> {
    if bits < seed || bits > max {
        return Err(format!(
            "{bits} bits is outside the loaded range {seed}..={max}"
        ));
    }
    Ok(())
}

impl AnyPrecHost {
    /// The weight dequantized at `bits` (within `seed_bits..=max_bits`), [rows × cols].
    pub fn dequantize(&self, bits: u32) -> Vec<f32> {
        assert!(
            check_bits_in(bits, self.seed_bits, self.max_bits).is_ok(),
            "bits out of range"
        );
        cpu::anyprec::dequantize_planes(
            &self.planes,
            self.rows,
            self.cols,
            bits,
            &self.luts[(bits - self.seed_bits) as usize],
        )
    }

    /// A layer of random planes (padding bits zero, as the packer writes them) and
    /// random LUTs in [-1, 1) for precisions 3..=`max_bits`, no bias: for tests and benchmarks.
    pub fn random(rows: usize, cols: usize, max_bits: u32, seed: u64) -> AnyPrecHost {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let words = cols.div_ceil(32);
        let mut planes: Vec<u32> = (0..rows * max_bits as usize * words)
            .map(|_| rng.random())
            .collect();
        if !cols.is_multiple_of(32) {
            let mask = (1u32 << (cols % 32)) - 1;
            for row in planes.chunks_mut(words) {
                row[words - 1] &= mask;
            }
        }
        let luts = (3..=max_bits)
            .map(|b| {
                (0..rows << b)
                    .map(|_| f16::from_f32(rng.random_range(-1.0..1.0)))
                    .collect()
            })
            .collect();
        AnyPrecHost {
            rows,
            cols,
            seed_bits: 3,
            max_bits,
            planes,
            luts,
            bias: None,
        }
    }
}

/// A DP-LLM error estimator (METHOD.md 2c) with its weights on a backend.
pub enum Estimator<B: Backend = CpuBackend> {
    /// No estimate: the linear always runs at one precision.
    None,
    /// ê = a·||x|| + c.
    Linear {
        /// Slope.
        a: f32,
        /// Intercept.
        c: f32,
    },
    /// ê = ||G x|| + bias with G [k × in].
    Jl {
        /// Rows of G.
        k: usize,
        /// G, a dense f32 weight.
        g: B::Dense,
        /// Added to ||G x||.
        bias: f32,
    },
}

impl<B: Backend> Estimator<B> {
    /// Multiply-adds per token (for overhead accounting).
    pub fn flops_per_token(&self, in_features: usize) -> usize {
        match self {
            Estimator::None => 0,
            Estimator::Linear { .. } => in_features,
            Estimator::Jl { k, .. } => k * in_features + k,
        }
    }
}

impl<B: Backend> std::fmt::Debug for Estimator<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Estimator::None => write!(f, "None"),
            Estimator::Linear { a, c } => write!(f, "Linear {{ a: {a}, c: {c} }}"),
            Estimator::Jl { k, bias, .. } => write!(f, "Jl {{ k: {k}, bias: {bias} }}"),
        }
    }
}

/// [`Backend::anyprec_linear_decided`] in two steps: the decisions as a mask,
/// then the linear at each token's precision.
#[allow(clippy::too_many_arguments)]
pub fn decided_by_mask<B: Backend>(
    be: &B,
    w: &B::AnyPrec,
    shape: (usize, usize),
    x: &B::Buf,
    n: usize,
    bits: (u32, u32),
    decide: Decide<'_, B>,
    count: Option<(&mut B::Buf, usize)>,
    y: &mut B::Buf,
) -> Result<()> {
    let Decide {
        estimator,
        input,
        threshold,
    } = decide;
    let mask = match count {
        Some(c) => be.estimate_counted(estimator, input, n, threshold, c)?,
        None => be.estimate(estimator, input, n, threshold)?,
    };
    be.anyprec_linear_select(w, shape, x, n, bits, &mask, y)
}

/// The error of a graph call on a backend that records none.
fn no_graphs(backend: &str) -> crate::EngineError {
    crate::EngineError::Device(format!("{backend} does not record graphs"))
}

/// The ops a device must provide to run the model. Kernels take buffers and
/// shapes, never `ModelConfig` or file types.
pub trait Backend: Clone + Send + Sync + 'static {
    /// f32 activations in device memory.
    type Buf: Send + Sync;
    /// A dense weight in its stored float type, with its optional bias.
    type Dense: Send + Sync;
    /// An any-precision weight (bit-planes + LUTs), with its optional bias.
    type AnyPrec: Send + Sync;
    /// Keys and values of every layer of one sequence.
    type Kv: Send + Sync;
    /// Per-token precision decisions of one linear (true = the higher precision).
    type Mask: Send + Sync;
    /// The backend's copy of a [`Step`].
    type StepData: Send + Sync;
    /// A recorded sequence of ops, run again as one ([`Backend::capture_begin`]).
    type Graph: Send + Sync;

    /// Short name ("cpu (avx2)", "cuda:0 (H100)", ...).
    fn name(&self) -> String;

    // --- memory ---
    /// A zeroed buffer of `len` floats.
    fn zeros(&self, len: usize) -> Result<Self::Buf>;
    /// Copy host data to the device.
    fn upload(&self, host: &[f32]) -> Result<Self::Buf>;
    /// Copy a buffer to the host, consuming it.
    fn download(&self, buf: Self::Buf) -> Result<Vec<f32>>;
    /// Copy a buffer to the host, keeping it.
    fn read(&self, buf: &Self::Buf) -> Result<Vec<f32>>;
    /// Set every float of `buf` to `value`.
    fn fill(&self, buf: &mut Self::Buf, value: f32);
    /// Floats in a buffer.
    fn len(&self, buf: &Self::Buf) -> usize;
    /// Wait until every queued op has finished.
    fn synchronize(&self) -> Result<()>;
    /// Per row of `x` [rows × width]: the index of its largest value (the
    /// lowest on ties), None for a row holding a NaN or an infinity. Greedy
    /// decoding reads back these ids, not the logits.
    fn argmax_rows(&self, x: &Self::Buf, width: usize) -> Result<Vec<Option<u32>>> {
        Ok(argmax_rows_host(&self.read(x)?, width))
    }
    /// Per row of `x` [rows × width]: the token of `draws[row]` (temperature,
    /// top-k, top-p and a uniform number), as [`crate::sampler::draw`] draws
    /// it (a device sums in another order: a draw within rounding of a
    /// boundary between two tokens, or a top-p cut within rounding of its
    /// share, may go either way); None for a row holding a NaN or an
    /// infinity. Random sampling reads back these ids, not the logits.
    fn sample_rows(&self, x: &Self::Buf, width: usize, draws: &[Draw]) -> Result<Vec<Option<u32>>> {
        Ok(sample_rows_host(&self.read(x)?, width, draws))
    }

    // --- weights ---
    /// Take a dense [rows × cols] weight (and bias).
    fn dense(
        &self,
        w: DenseHost,
        rows: usize,
        cols: usize,
        bias: Option<Vec<f32>>,
    ) -> Result<Self::Dense>;
    /// Take an any-precision weight.
    fn anyprec(&self, w: AnyPrecHost) -> Result<Self::AnyPrec>;
    /// A random any-precision layer (precisions 3..=`max_bits`, LUT values
    /// within ±1/√cols) for benchmarks; a device backend may make it in its own
    /// memory instead of copying it there.
    fn anyprec_random(
        &self,
        rows: usize,
        cols: usize,
        max_bits: u32,
        seed: u64,
    ) -> Result<Self::AnyPrec> {
        let mut h = AnyPrecHost::random(rows, cols, max_bits, seed);
        let scale = 1.0 / (cols.max(1) as f32).sqrt();
        for v in h.luts.iter_mut().flatten() {
            *v = f16::from_f32(v.to_f32() * scale);
        }
        self.anyprec(h)
    }
    /// A random f16 dense layer (values within ±1/√cols) for benchmarks; a
    /// device backend may make it in its own memory.
    fn dense_random(&self, rows: usize, cols: usize, seed: u64) -> Result<Self::Dense> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let scale = 1.0 / (cols.max(1) as f32).sqrt();
        let w: Vec<f16> = (0..rows * cols)
            .map(|_| f16::from_f32(rng.random_range(-scale..scale)))
            .collect();
        self.dense(
            DenseHost::Float(Arc::new(TensorData::F16(w))),
            rows,
            cols,
            None,
        )
    }

    // --- KV cache ---
    /// An empty cache for `layers` layers of width `kv_dim`.
    fn kv_new(&self, layers: usize, kv_dim: usize) -> Self::Kv;
    /// Append the keys and values [n × kv_dim] of positions `step.pos0`.. (the
    /// next ones) to `layer`; memory that cannot be had is an error.
    fn kv_append(
        &self,
        kv: &mut Self::Kv,
        layer: usize,
        k: &Self::Buf,
        v: &Self::Buf,
        step: &Step<Self::StepData>,
    ) -> Result<()>;
    /// Make room for `positions` positions in every layer without storing any;
    /// returns the positions the storage now holds. A backend that moves its
    /// storage to grow it holds it in place until this number changes, so a
    /// captured graph stays valid while it does not.
    fn kv_reserve(&self, kv: &mut Self::Kv, positions: usize) -> Result<usize> {
        let _ = kv;
        Ok(positions)
    }
    /// Mark positions up to `positions` as stored in every layer, after a
    /// replayed graph wrote them (backends that capture no graphs never see it).
    fn kv_commit(&self, kv: &mut Self::Kv, positions: usize) {
        let _ = (kv, positions);
    }
    /// Keep the first `positions` positions of every layer.
    fn kv_truncate(&self, kv: &mut Self::Kv, positions: usize);
    /// Bytes the cache holds.
    fn kv_bytes(&self, kv: &Self::Kv) -> usize;
    /// How this backend's caches store keys and values.
    fn kv_dtype(&self) -> KvDtype {
        KvDtype::F32
    }

    // --- steps and graphs ---
    /// The step of a forward call over `tokens` at positions `pos0`.. .
    fn step(&self, tokens: &[u32], pos0: usize) -> Result<Step<Self::StepData>>;
    /// Rewrite `step` in place for as many other tokens at another position: a
    /// captured graph that reads it then runs them.
    fn step_update(
        &self,
        step: &mut Step<Self::StepData>,
        tokens: &[u32],
        pos0: usize,
    ) -> Result<()> {
        *step = self.step(tokens, pos0)?;
        Ok(())
    }
    /// True when this backend records graphs ([`Backend::capture_begin`]).
    fn captures_graphs(&self) -> bool {
        false
    }
    /// Record the ops queued from now on into a graph instead of running them
    /// (their buffers are taken as they are: a replay runs on the same ones).
    /// Only on a backend that [`Backend::captures_graphs`]; always follow it
    /// with [`Backend::capture_end`], also when an op failed.
    fn capture_begin(&self) -> Result<()> {
        Err(no_graphs(&self.name()))
    }
    /// Stop recording: the graph of the ops queued since [`Backend::capture_begin`].
    fn capture_end(&self) -> Result<Self::Graph> {
        Err(no_graphs(&self.name()))
    }
    /// Run a recorded graph once more.
    fn graph_launch(&self, graph: &mut Self::Graph) -> Result<()> {
        let _ = graph;
        Err(no_graphs(&self.name()))
    }

    // --- ops ---
    /// Rows `step.tokens` of the embedding table into `out` [n × cols].
    fn embed(&self, table: &Self::Dense, step: &Step<Self::StepData>, out: &mut Self::Buf);
    /// RMSNorm of every `w`-sized row of `x` into `out`.
    fn rms_norm(&self, x: &Self::Buf, w: &Self::Buf, eps: f32, out: &mut Self::Buf);
    /// In-place RMSNorm of every `w`-sized segment (per-head q/k norm).
    fn rms_norm_inplace(&self, x: &mut Self::Buf, w: &Self::Buf, eps: f32);
    /// Rotate `x` [n × heads × head_dim] for positions `step.pos0`.. with a
    /// precomputed table ([position][cos 0..rot/2 | sin 0..rot/2]).
    fn rope(
        &self,
        x: &mut Self::Buf,
        heads: usize,
        head_dim: usize,
        rot_dim: usize,
        step: &Step<Self::StepData>,
        table: &Self::Buf,
    );
    /// RoPE of `q` (in place) and `k` for the positions of `step`, and the
    /// rotated keys with the values `v` appended to `layer` of the cache, as
    /// [`Backend::rope`] twice and [`Backend::kv_append`] do; a device backend
    /// does it in one kernel. `k` is left rotated or as it was.
    #[allow(clippy::too_many_arguments)]
    fn rope_append(
        &self,
        q: &mut Self::Buf,
        k: &mut Self::Buf,
        v: &Self::Buf,
        kv: &mut Self::Kv,
        layer: usize,
        step: &Step<Self::StepData>,
        rope: RopeArgs<'_, Self>,
    ) -> Result<()> {
        let RopeArgs {
            heads,
            kv_heads,
            head_dim,
            rot_dim,
            table,
        } = rope;
        self.rope(q, heads, head_dim, rot_dim, step, table);
        self.rope(k, kv_heads, head_dim, rot_dim, step, table);
        self.kv_append(kv, layer, k, v, step)
    }
    /// Causal attention of queries `q` [n × heads·hd] at positions `step.pos0`..
    /// over `layer` of the cache (which already holds their keys and values).
    fn attention(
        &self,
        q: &Self::Buf,
        kv: &Self::Kv,
        layer: usize,
        step: &Step<Self::StepData>,
        shape: AttnShape,
        out: &mut Self::Buf,
    );
    /// [`Backend::attention`], also leaving the sums of squares of the
    /// output's rows ([`SumSq`]) where this backend's kernel can do so as it
    /// writes them; None where it cannot (then the estimators read the rows).
    #[allow(clippy::too_many_arguments)]
    fn attention_sumsq(
        &self,
        q: &Self::Buf,
        kv: &Self::Kv,
        layer: usize,
        step: &Step<Self::StepData>,
        shape: AttnShape,
        out: &mut Self::Buf,
    ) -> Result<Option<SumSq<Self>>> {
        self.attention(q, kv, layer, step, shape, out);
        Ok(None)
    }
    /// `gate = silu(gate) ⊙ up` over `n` rows (a device backend may leave
    /// the output ready for the linear that reads it).
    fn swiglu(&self, gate: &mut Self::Buf, up: &Self::Buf, n: usize);
    /// [`Backend::swiglu`] over `n` rows, also leaving the sums of squares of
    /// the output's rows ([`SumSq`]) where this backend's kernel can;
    /// None where it cannot.
    fn swiglu_sumsq(
        &self,
        gate: &mut Self::Buf,
        up: &Self::Buf,
        n: usize,
    ) -> Result<Option<SumSq<Self>>> {
        self.swiglu(gate, up, n);
        Ok(None)
    }
    /// `h += x`.
    fn add(&self, h: &mut Self::Buf, x: &Self::Buf);
    /// `h += x`, then [`Backend::flag_non_finite`] on `h` (a device backend
    /// does both in one kernel).
    fn add_checked(
        &self,
        h: &mut Self::Buf,
        x: &Self::Buf,
        width: usize,
        flags: &mut Self::Buf,
        slot: usize,
    ) {
        self.add(h, x);
        self.flag_non_finite(h, width, flags, slot);
    }
    /// [`Backend::add_checked`] (`h += x`, checked per token of `w.len()`
    /// values), then `out` = [`Backend::rms_norm`] of `h` with `w`, and with
    /// `norms` the norms of the estimator inputs that follow ([`InputNorms`]);
    /// a device backend does it all in one kernel.
    #[allow(clippy::too_many_arguments)]
    fn add_checked_norm(
        &self,
        h: &mut Self::Buf,
        x: &Self::Buf,
        (flags, slot): (&mut Self::Buf, usize),
        w: &Self::Buf,
        eps: f32,
        out: &mut Self::Buf,
        norms: Option<InputNorms<'_, Self>>,
    ) -> Result<()> {
        let width = self.len(w);
        let n = self.len(h) / width.max(1);
        let norm_of = |v: &Self::Buf| {
            self.estimates(&Estimator::Linear { a: 1.0, c: 0.0 }, EstInput::Rows(v), n)
        };
        let before = match &norms {
            Some(_) => {
                let mut pre = self.zeros(self.len(h))?;
                self.rms_norm(h, w, eps, &mut pre);
                Some(norm_of(&pre)?)
            }
            None => None,
        };
        self.add_checked(h, x, width, flags, slot);
        self.rms_norm(h, w, eps, out);
        if let (Some(InputNorms { after, before: b }), Some(pre)) = (norms, before) {
            self.copy(&pre, b);
            self.copy(&norm_of(out)?, after);
        }
        Ok(())
    }
    /// `dst` becomes a copy of `src` (resized to it).
    fn copy(&self, src: &Self::Buf, dst: &mut Self::Buf);
    /// Rows row0..row0+n of `x` [· × width] as a new buffer.
    fn rows(&self, x: &Self::Buf, width: usize, row0: usize, n: usize) -> Result<Self::Buf>;
    /// Split each row of `x` [n × Σ widths] into consecutive parts [n × width_i].
    fn split_columns(&self, x: &Self::Buf, n: usize, parts: &mut [&mut Self::Buf]);
    /// `y [n × rows] = x [n × cols] · Wᵀ (+ b)`.
    fn dense_linear(&self, w: &Self::Dense, x: &Self::Buf, n: usize, y: &mut Self::Buf);
    /// `y = x · W_bᵀ (+ b)` at `bits` precision.
    fn anyprec_linear(
        &self,
        w: &Self::AnyPrec,
        x: &Self::Buf,
        n: usize,
        bits: u32,
        y: &mut Self::Buf,
    );
    /// The estimate of each of `n` tokens from `input`, `n` values (a JL
    /// estimator given only norms is an error: [`needs_rows`]).
    fn estimates(
        &self,
        est: &Estimator<Self>,
        input: EstInput<'_, Self>,
        n: usize,
    ) -> Result<Self::Buf>;
    /// Per-token decisions: each of `values` above `threshold`.
    fn threshold_mask(&self, values: &Self::Buf, threshold: f32) -> Result<Self::Mask>;
    /// Per-token decisions: the estimate of each of `n` tokens from `input`
    /// above `threshold` (a backend may fuse the two steps).
    fn estimate(
        &self,
        est: &Estimator<Self>,
        input: EstInput<'_, Self>,
        n: usize,
        threshold: f32,
    ) -> Result<Self::Mask> {
        self.threshold_mask(&self.estimates(est, input, n)?, threshold)
    }
    /// [`Backend::estimate`], also writing the number of tokens it sends high to
    /// `count.0[count.1]`, which holds 0 before (a tally zeroes its slots per
    /// call); a device backend decides and counts in one kernel.
    fn estimate_counted(
        &self,
        est: &Estimator<Self>,
        input: EstInput<'_, Self>,
        n: usize,
        threshold: f32,
        count: (&mut Self::Buf, usize),
    ) -> Result<Self::Mask> {
        let mask = self.estimate(est, input, n, threshold)?;
        self.mask_count_into(&mask, count.0, count.1);
        Ok(mask)
    }
    /// Decisions known on the host (`high[t]`: token t high), such as the
    /// rows of one sequence in a batch; a device backend keeps their indices
    /// too, so that gathering and scattering by them never waits for the GPU.
    fn mask_from(&self, high: &[bool]) -> Result<Self::Mask> {
        let values: Vec<f32> = high.iter().map(|&h| h as u8 as f32).collect();
        self.threshold_mask(&self.upload(&values)?, 0.5)
    }
    /// Tokens a mask sends to the higher precision.
    fn mask_count(&self, mask: &Self::Mask) -> Result<usize>;
    /// Write the number of tokens `mask` sends high to element `slot` of `out`
    /// (a device backend does so without waiting for the GPU).
    fn mask_count_into(&self, mask: &Self::Mask, out: &mut Self::Buf, slot: usize);
    /// Write each token's decision (1 high, 0 low) to `out[offset + t·stride]`
    /// (a device backend does so without waiting: per-token counts of a batch
    /// of sessions, read once after the call).
    fn mask_store_into(&self, mask: &Self::Mask, out: &mut Self::Buf, offset: usize, stride: usize);
    /// `y [n × rows] = x [n × cols] · W_bᵀ (+ b)` with b = `high` for the
    /// tokens `mask` marks and `low` for the others. This default splits the
    /// batch on the host (it waits for the decisions); a device backend decides
    /// per token inside its kernels instead.
    #[allow(clippy::too_many_arguments)]
    fn anyprec_linear_select(
        &self,
        w: &Self::AnyPrec,
        (rows, cols): (usize, usize),
        x: &Self::Buf,
        n: usize,
        (low, high): (u32, u32),
        mask: &Self::Mask,
        y: &mut Self::Buf,
    ) -> Result<()> {
        let n_high = self.mask_count(mask)?;
        for (is_high, count, bits) in [(false, n - n_high, low), (true, n_high, high)] {
            if count == n {
                self.anyprec_linear(w, x, n, bits, y);
            } else if count > 0 {
                let xg = self.gather_rows(x, cols, mask, is_high)?;
                let mut yg = self.zeros(count * rows)?;
                self.anyprec_linear(w, &xg, count, bits, &mut yg);
                self.scatter_rows(&yg, rows, mask, is_high, y);
            }
        }
        Ok(())
    }
    /// DP-LLM's per-token precision decided and run together: the decisions of
    /// [`Backend::estimate`] on `decide.input` (counted into `count` as
    /// [`Backend::estimate_counted`] does), then
    /// [`Backend::anyprec_linear_select`]. A device backend may do it all in one
    /// kernel.
    #[allow(clippy::too_many_arguments)]
    fn anyprec_linear_decided(
        &self,
        w: &Self::AnyPrec,
        shape: (usize, usize),
        x: &Self::Buf,
        n: usize,
        bits: (u32, u32),
        decide: Decide<'_, Self>,
        count: Option<(&mut Self::Buf, usize)>,
        y: &mut Self::Buf,
    ) -> Result<()> {
        decided_by_mask(self, w, shape, x, n, bits, decide, count, y)
    }
    /// The rows of `x` [n × width] whose decision equals `high`, in order.
    fn gather_rows(
        &self,
        x: &Self::Buf,
        width: usize,
        mask: &Self::Mask,
        high: bool,
    ) -> Result<Self::Buf>;
    /// Write the rows of `src` back to the rows of `dst` whose decision equals `high`.
    fn scatter_rows(
        &self,
        src: &Self::Buf,
        width: usize,
        mask: &Self::Mask,
        high: bool,
        dst: &mut Self::Buf,
    );
    /// Lower `flags[slot]` (a non-negative float) to the first token of `x`
    /// [· × width] holding a NaN or infinity; left as is when there is none.
    /// A device backend checks without waiting: the flags are read once, at the
    /// end of a forward call.
    fn flag_non_finite(&self, x: &Self::Buf, width: usize, flags: &mut Self::Buf, slot: usize);
}
