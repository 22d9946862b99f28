//! [`Backend`] for an NVIDIA GPU: every op is a kernel queued on the device's
//! stream; only `download`, `read`, `mask_count` and the row moves of a
//! split batch wait for the GPU.
//!
//! Ops that return nothing cannot report a failed launch at once: the first
//! such error is kept and returned by the next call that returns a result
//! (every forward pass ends in one, `download`), so a failure never passes
//! for a result.

use std::sync::{Arc, Mutex};

use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaGraph, CudaSlice, CudaStream, CudaViewMut, DevicePtrMut};

use super::bitplane::{padded_cols, CudaAnyPrec, EstForm};
use super::buf::CudaBuf;
use super::dense::CudaDense;
use super::kv::CudaKv;
use super::linear::CudaAnyPrecLinear;
use super::ops::{OpsKernels, ATT_MAX_HEAD_DIM, SWIGLU_PART};
use super::{device_err, CudaDevice};
use crate::backend::{
    decided_by_mask, needs_rows, sample_row_host, AnyPrecHost, AttnShape, Backend, Decide,
    DenseHost, EstInput, Estimator, InputNorms, KvDtype, RopeArgs, Step, SumSq,
};
use crate::error::{EngineError, Result};
use crate::sampler::Draw;

/// The id `sample_rows` (`kernels/sample.cu`) writes for a row the host must
/// draw: more candidates than a block sorts, or a scaled logit that overflowed.
const SAMPLE_ON_HOST: u32 = 0xffff_fffe;

/// Per-token decisions: 1 = the higher precision.
pub struct CudaMask {
    pub(super) flags: CudaSlice<u32>,
    pub(super) n: usize,
    /// The tokens of each side (low, high) on the device and their number,
    /// when the decisions came from the host ([`Backend::mask_from`]): rows
    /// are then gathered and scattered without reading the flags back.
    pub(super) known: Option<[(CudaSlice<u32>, usize); 2]>,
}

/// Token indices on the device: a mask's own, or made for one op.
enum Ids<'m> {
    Known(&'m CudaSlice<u32>),
    Made(CudaSlice<u32>),
}

impl std::ops::Deref for Ids<'_> {
    type Target = CudaSlice<u32>;
    fn deref(&self) -> &CudaSlice<u32> {
        match self {
            Ids::Known(s) => s,
            Ids::Made(s) => s,
        }
    }
}

/// A recorded CUDA graph, instantiated.
pub struct CudaStepGraph(CudaGraph);

// SAFETY: a CUDA graph must not be used from two threads at once. The only
// use, `Backend::graph_launch`, takes it by `&mut`, which rules that out.
unsafe impl Send for CudaStepGraph {}
// SAFETY: as above; a shared reference gives no access to the graph.
unsafe impl Sync for CudaStepGraph {}

/// The CUDA backend on one GPU. Clones share the device and its kernels.
///
/// All work goes to the device's one stream; while a decode step is being
/// recorded ([`Backend::capture_begin`]) no other thread may queue work on it.
#[derive(Clone)]
pub struct CudaBackend {
    pub(super) dev: Arc<CudaDevice>,
    pub(super) ops: Arc<OpsKernels>,
    /// One float, passed for a kernel's pointer argument that is not read.
    pub(super) unused: Arc<CudaSlice<f32>>,
    /// The first error of an op that could not return it.
    error: Arc<Mutex<Option<EngineError>>>,
    /// Decode steps are recorded as graphs (`DPLLM_CUDA_GRAPHS=0`: not).
    graphs: bool,
    /// The norms, attention and SwiGLU leave their output split for the
    /// bit-plane GEMV beside it ([`CudaBuf`]; `DPLLM_CUDA_OP_HALVES=0`: not,
    /// so every GEMV splits its input itself, for A/B timing).
    op_halves: bool,
    /// How new KV caches store keys and values.
    kv: KvDtype,
}

impl CudaBackend {
    /// The backend on GPU `ordinal`, its kernels compiled (or read from the PTX cache).
    pub fn new(ordinal: usize) -> Result<CudaBackend> {
        Self::on(CudaDevice::new(ordinal)?)
    }

    /// The backend on an opened device.
    pub fn on(dev: Arc<CudaDevice>) -> Result<CudaBackend> {
        let ops = Arc::new(OpsKernels::new(&dev)?);
        dev.bitplane_kernels()?;
        let unused = Arc::new(
            dev.stream()
                .alloc_zeros::<f32>(1)
                .map_err(device_err("allocating"))?,
        );
        let on = |var: &str| std::env::var(var).map_or(true, |v| v != "0");
        Ok(CudaBackend {
            dev,
            ops,
            unused,
            error: Arc::default(),
            graphs: on("DPLLM_CUDA_GRAPHS"),
            op_halves: on("DPLLM_CUDA_OP_HALVES"),
            kv: KvDtype::F16,
        })
    }

    /// The split halves the op that last wrote `x` left beside it as `rows`
    /// rows of `width` (`[2][rows][width padded to 128]` f16 bits, what the
    /// bit-plane GEMV reads), or `None` where it left none in that shape
    /// (tests, diagnostics).
    pub fn halves_of(&self, x: &CudaBuf, rows: usize, width: usize) -> Result<Option<Vec<u16>>> {
        self.check()?;
        let Some(h) = x.halves(rows, width) else {
            return Ok(None);
        };
        let mut v = (self.stream().clone_dtoh(&h)).map_err(device_err("copying split halves"))?;
        v.truncate(2 * rows * padded_cols(width));
        Ok(Some(v))
    }

    /// The same backend with KV caches made from now on in `dtype` (f16 by
    /// default; f32 where results must match the CPU backend's closely).
    pub fn with_kv(mut self, dtype: KvDtype) -> CudaBackend {
        self.kv = dtype;
        self
    }

    /// The same backend with decode steps recorded as graphs or not.
    pub fn with_graphs(mut self, on: bool) -> CudaBackend {
        self.graphs = on;
        self
    }

    /// The same backend with the ops that make a linear's input leaving it
    /// split for the bit-plane GEMV or not (`DPLLM_CUDA_OP_HALVES`).
    pub fn with_op_halves(mut self, on: bool) -> CudaBackend {
        self.op_halves = on;
        self
    }

    /// The device.
    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.dev
    }

    pub(super) fn stream(&self) -> &Arc<CudaStream> {
        self.dev.stream()
    }

    /// Keep the first error of an op that cannot return one.
    pub(super) fn keep(&self, r: Result<()>) {
        if let Err(e) = r {
            let mut g = self.error.lock().unwrap_or_else(|p| p.into_inner());
            g.get_or_insert(e);
        }
    }

    /// The kept error, if any (then cleared: it is reported once).
    pub(super) fn check(&self) -> Result<()> {
        match self.error.lock().unwrap_or_else(|p| p.into_inner()).take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    pub(super) fn alloc(&self, len: usize, what: &'static str) -> Result<CudaSlice<f32>> {
        self.stream()
            .alloc_zeros::<f32>(len.max(1))
            .map_err(|_| EngineError::OutOfMemory {
                what,
                bytes: len.saturating_mul(4),
            })
    }

    /// Room for `len` floats left as they are, for a kernel that writes
    /// every one before anything reads them (no memset: in a recorded decode
    /// step each is a graph node of its own).
    fn for_kernel(&self, len: usize, what: &'static str) -> Result<CudaBuf> {
        // SAFETY: uninitialized device memory of plain floats; the callers'
        // kernels write all `len` before any read.
        let data = unsafe { self.stream().alloc::<f32>(len.max(1)) }.map_err(|_| {
            EngineError::OutOfMemory {
                what,
                bytes: len.saturating_mul(4),
            }
        })?;
        Ok(CudaBuf::new(data, len))
    }

    pub(super) fn upload_u32(&self, v: &[u32]) -> Result<CudaSlice<u32>> {
        let one = [0u32];
        self.stream()
            .clone_htod(if v.is_empty() { &one[..] } else { v })
            .map_err(device_err("copying indices to the GPU"))
    }

    /// The width of `x` as `n` rows: an error naming `op` where they do not
    /// divide it (or there are none).
    fn rows_width(op: &str, x: &CudaBuf, n: usize) -> Result<usize> {
        let width = x.len.checked_div(n).unwrap_or(0);
        if n == 0 || width * n != x.len || width > i32::MAX as usize {
            return Err(EngineError::Device(format!(
                "{op}: {} values in {n} rows",
                x.len
            )));
        }
        Ok(width)
    }

    /// An error unless `b` holds `want` floats, naming the op.
    pub(super) fn want_len(op: &str, b: &CudaBuf, want: usize) -> Result<()> {
        if b.len != want {
            return Err(EngineError::Device(format!(
                "{op}: a buffer of {} floats where {want} are needed",
                b.len
            )));
        }
        Ok(())
    }

    /// The DP-LLM decisions of the `n` rows of `x` against `threshold` in one
    /// kernel (after the projection of a JL estimator), counted into
    /// `count.0[count.1]` when given: what `estimates` + `threshold_mask` +
    /// `mask_count_into` do in three.
    fn decide(
        &self,
        est: &Estimator<Self>,
        input: EstInput<'_, Self>,
        n: usize,
        threshold: f32,
        count: Option<(&mut CudaBuf, usize)>,
    ) -> Result<CudaMask> {
        self.check()?;
        Self::check_count(&count)?;
        // SAFETY: the kernel writes all n flags.
        let mut flags = unsafe { self.stream().alloc::<u32>(n.max(1)) }
            .map_err(device_err("allocating decisions"))?;
        if n == 0 {
            return Ok(CudaMask {
                flags,
                n,
                known: None,
            });
        }
        let mut projected = None;
        let (src, form, a, c) = self.estimator_input(est, input, n, &mut projected)?;
        let (di, si) = (form.n_e(), count.as_ref().map_or(0, |c| c.1) as i32);
        let mut counts = count.map(|(b, _)| b.view_mut());
        let (count_ptr, _in_use) = optional_ptr(counts.as_mut(), self.stream());
        launch!(
            self,
            "decide_norm",
            self.ops.per_row(n, form.per_token()),
            &src.view(),
            &di,
            &a,
            &c,
            &threshold,
            &mut flags,
            &count_ptr,
            &si
        )?;
        Ok(CudaMask {
            flags,
            n,
            known: None,
        })
    }

    /// An error unless a decision count's slot lies in its buffer.
    fn check_count(count: &Option<(&mut CudaBuf, usize)>) -> Result<()> {
        match count {
            Some((counts, slot)) => Self::check_slot("a decision count", counts, *slot),
            None => Ok(()),
        }
    }

    /// An error naming `what` unless `slot` lies in `buf`.
    fn check_slot(what: &str, buf: &CudaBuf, slot: usize) -> Result<()> {
        if slot >= buf.len {
            return Err(EngineError::Device(format!(
                "{what}: slot {slot} of {}",
                buf.len
            )));
        }
        Ok(())
    }

    /// What a decision takes the norm of, in what form, and its (a, c) in
    /// a·||·|| + c: the `n` rows of the input, or their JL projection (made
    /// into `projected`); or the rows' norms, or the parts of their sums of
    /// squares, left by the input's producer.
    fn estimator_input<'a>(
        &self,
        est: &Estimator<Self>,
        input: EstInput<'a, Self>,
        n: usize,
        projected: &'a mut Option<CudaBuf>,
    ) -> Result<(&'a CudaBuf, EstForm, f32, f32)> {
        let (a, c) = match est {
            // No estimator: every estimate is 0.
            Estimator::None => (0.0, 0.0),
            Estimator::Linear { a, c } => (*a, *c),
            Estimator::Jl { k, g, bias } => {
                let EstInput::Rows(x) = input else {
                    return Err(needs_rows(est));
                };
                let mut gx = self.zeros(n * k)?;
                self.dense_into(g, x, n, &mut gx)?;
                return Ok((projected.insert(gx), EstForm::Rows(*k), 1.0, *bias));
            }
        };
        let (buf, form) = match input {
            EstInput::Rows(x) => (x, EstForm::Rows(x.len.checked_div(n).unwrap_or(0))),
            EstInput::Norms(v) => (v, EstForm::Norm),
            EstInput::SumSq { sums, parts } => (sums, EstForm::SumSq(parts)),
        };
        // A row of no values would read as a norm (the kernels' n_e = 0).
        let empty = matches!(form, EstForm::Rows(0) | EstForm::SumSq(0));
        if n > 0 && (empty || buf.len != n * form.per_token()) {
            return Err(EngineError::Device(format!(
                "{} estimator input values for {n} tokens in the form {form:?}",
                buf.len
            )));
        }
        Ok((buf, form, a, c))
    }

    /// A step as the kernels read it: [pos0, tokens...].
    fn step_words(tokens: &[u32], pos0: usize) -> Result<Vec<u32>> {
        let pos0 = u32::try_from(pos0)
            .map_err(|_| EngineError::Device(format!("position {pos0} is past 2^32")))?;
        Ok(std::iter::once(pos0)
            .chain(tokens.iter().copied())
            .collect())
    }

    /// Row indices of the tokens whose decision equals `high`.
    /// The tokens whose decision equals `high` on the device, and their
    /// number: the mask's own when its decisions came from the host, else
    /// read back (a wait for the GPU) and uploaded.
    fn picked_ids<'m>(&self, mask: &'m CudaMask, high: bool) -> Result<(Ids<'m>, usize)> {
        if let Some(known) = &mask.known {
            let (ids, count) = &known[high as usize];
            return Ok((Ids::Known(ids), *count));
        }
        let idx = self.picked(mask, high)?;
        Ok((Ids::Made(self.upload_u32(&idx)?), idx.len()))
    }

    fn picked(&self, mask: &CudaMask, high: bool) -> Result<Vec<u32>> {
        let flags = self
            .stream()
            .clone_dtoh(&mask.flags.slice(..mask.n))
            .map_err(device_err("reading decisions"))?;
        Ok((0..mask.n as u32)
            .filter(|&t| (flags[t as usize] != 0) == high)
            .collect())
    }

    /// One block of 1024 threads for each of `rows` rows.
    fn one_block_a_row(rows: usize) -> cudarc::driver::LaunchConfig {
        cudarc::driver::LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// How many rows of `width` logits `x` holds, for `what` (a kernel
    /// choosing a token a row), after the check for an earlier fault.
    fn logit_rows(&self, what: &str, x: &CudaBuf, width: usize) -> Result<usize> {
        self.check()?;
        let rows = x.len.checked_div(width).unwrap_or(0);
        if rows * width != x.len || width > i32::MAX as usize {
            return Err(EngineError::Device(format!(
                "{what}: {} floats in rows of {width}",
                x.len
            )));
        }
        Ok(rows)
    }

    /// Room for a token id a row, every one written by the kernel that fills it.
    fn id_slots(&self, rows: usize) -> Result<CudaSlice<u32>> {
        // SAFETY: the kernels choosing tokens write every row's id.
        unsafe { self.stream().alloc::<u32>(rows) }.map_err(device_err("allocating token ids"))
    }

    /// Token ids read back, `u32::MAX` (a row that was not finite) as None.
    fn read_ids(&self, ids: &CudaSlice<u32>) -> Result<Vec<Option<u32>>> {
        let ids = self
            .stream()
            .clone_dtoh(ids)
            .map_err(device_err("reading token ids"))?;
        Ok(ids
            .into_iter()
            .map(|i| (i != u32::MAX).then_some(i))
            .collect())
    }

    /// The GPU's memory bandwidth on buffers of `bytes` (well beyond its L2),
    /// best of `reps`, in GB/s: (a device-to-device copy counting bytes read plus
    /// written, a read-only sum).
    pub fn bandwidth(&self, bytes: usize, reps: usize) -> Result<(f64, f64)> {
        let n = (bytes / 4).next_multiple_of(4).max(4);
        let s = self.stream();
        let oom = |_| EngineError::OutOfMemory {
            what: "the bandwidth test buffers (GPU)",
            bytes: 8 * n,
        };
        let src = s.alloc_zeros::<f32>(n).map_err(oom)?;
        let mut dst = s.alloc_zeros::<f32>(n).map_err(oom)?;
        let mut sum = s.alloc_zeros::<f32>(1).map_err(device_err("allocating"))?;
        let (mut copy, mut read) = (f64::MAX, f64::MAX);
        let n4 = (n / 4) as i64;
        for _ in 0..reps.max(1) {
            copy = copy.min(self.dev.time_ms_queued(3, || {
                s.memcpy_dtod(&src, &mut dst)
                    .map_err(device_err("copying on the GPU"))
            })?);
            read = read.min(self.dev.time_ms_queued(3, || {
                launch!(
                    self,
                    "read_sum",
                    self.ops.stride(n / 4),
                    &src,
                    &n4,
                    &mut sum
                )
            })?);
        }
        let gbs = |b: usize, ms: f64| b as f64 / (ms * 1e-3) / 1e9;
        Ok((gbs(8 * n, copy), gbs(4 * n, read)))
    }

    /// [`Backend::attention`], with `sumsq` [n × heads] the sums of squares
    /// of each head's output ([`Backend::attention_sumsq`]).
    #[allow(clippy::too_many_arguments)]
    fn attention_into(
        &self,
        q: &CudaBuf,
        kv: &CudaKv,
        layer: usize,
        step: &Step<CudaSlice<u32>>,
        shape: AttnShape,
        out: &mut CudaBuf,
        mut sumsq: Option<&mut CudaBuf>,
    ) -> Result<()> {
        let pos0 = step.pos0;
        let (nh, nkv, hd) = (shape.num_heads, shape.num_kv_heads, shape.head_dim);
        let qd = nh * hd;
        let n = q.len / qd.max(1);
        Self::want_len("attention output", out, q.len)?;
        if let Some(sums) = &sumsq {
            Self::want_len("attention sums of squares", sums, n * nh)?;
        }
        if hd > ATT_MAX_HEAD_DIM || nkv == 0 || !nh.is_multiple_of(nkv) || n * qd != q.len {
            return Err(EngineError::Device(format!(
                "attention: {nh} heads over {nkv} KV heads of dimension {hd} \
                     (at most {ATT_MAX_HEAD_DIM}) for {} values",
                q.len
            )));
        }
        let Some((k, v)) = kv.layer(layer).filter(|_| kv.positions(layer) >= pos0 + n) else {
            return Err(EngineError::Device(format!(
                "attention: layer {layer} of the KV cache holds {} positions, not {}",
                kv.positions(layer),
                pos0 + n
            )));
        };
        let (h, hk, d) = (nh as i32, nkv as i32, hd as i32);
        let window = shape.window.map_or(0, |w| w.min(i32::MAX as usize)) as i32;
        let scale = 1.0 / (hd as f32).sqrt();
        let spans = self.ops.attention_spans(kv.capacity(layer), nh * n);
        // With one span the kernel writes `out` and never touches `part`;
        // with more, every block writes its span's part.
        let part_len = if spans > 1 {
            n * nh * spans * (2 + hd)
        } else {
            1
        };
        let mut part = self.for_kernel(part_len, "attention spans")?.into_data();
        let mut sums = sumsq.as_mut().map(|b| b.view_mut());
        let (sums_ptr, _in_use) = optional_ptr(sums.as_mut(), self.stream());
        // The kernel that writes the output (the merge where there are spans)
        // splits it for the o projection too.
        let cp = padded_cols(qd) as i32;
        let (mut ov, mut halves) = out.write_with_halves(self.stream(), n, qd, self.op_halves)?;
        let (xs, _h) = optional_ptr(halves.as_mut(), self.stream());
        let (att_xs, merge_xs) = if spans > 1 { (0, xs) } else { (xs, 0) };
        launch!(
            self,
            kv.kernel("attention"),
            self.ops.attention(nh, n, spans),
            &q.view(),
            k,
            v,
            &mut ov,
            &mut part,
            &step.data,
            &h,
            &hk,
            &d,
            &window,
            &scale,
            &sums_ptr,
            &att_xs,
            &cp
        )?;
        if spans > 1 {
            let s = spans as i32;
            launch!(
                self,
                "attention_merge",
                self.ops.attention_merge(nh, n, hd),
                &part,
                &mut ov,
                &h,
                &d,
                &s,
                &sums_ptr,
                &merge_xs,
                &cp
            )?;
        }
        Ok(())
    }

    /// `out[t] = a·||x_t|| + c` for the `n` tokens of `x` in the form `form`.
    fn row_norms(&self, x: &CudaBuf, n: usize, form: EstForm, a: f32, c: f32) -> Result<CudaBuf> {
        let mut out = self.zeros(n)?;
        if n == 0 {
            return Ok(out);
        }
        let di = form.n_e();
        launch!(
            self,
            "row_norm_affine",
            self.ops.per_row(n, form.per_token()),
            &x.view(),
            &di,
            &a,
            &c,
            &mut out.view_mut()
        )?;
        Ok(out)
    }
}

impl Backend for CudaBackend {
    type Buf = CudaBuf;
    type Dense = CudaDense;
    type AnyPrec = CudaAnyPrecLinear;
    type Kv = CudaKv;
    type Mask = CudaMask;
    type StepData = CudaSlice<u32>;
    type Graph = CudaStepGraph;

    fn name(&self) -> String {
        let d = self.dev.describe();
        format!("{}, {} KV)", d.strip_suffix(')').unwrap_or(&d), self.kv)
    }

    fn zeros(&self, len: usize) -> Result<CudaBuf> {
        self.check()?;
        Ok(CudaBuf::new(self.alloc(len, "activations (GPU)")?, len))
    }

    fn upload(&self, host: &[f32]) -> Result<CudaBuf> {
        self.check()?;
        let one = [0f32];
        let data = self
            .stream()
            .clone_htod(if host.is_empty() { &one[..] } else { host })
            .map_err(device_err("copying activations to the GPU"))?;
        Ok(CudaBuf::new(data, host.len()))
    }

    fn download(&self, buf: CudaBuf) -> Result<Vec<f32>> {
        self.check()?;
        let mut v = self
            .stream()
            .clone_dtoh(buf.data())
            .map_err(device_err("copying activations from the GPU"))?;
        v.truncate(buf.len);
        self.check()?;
        Ok(v)
    }

    fn read(&self, buf: &CudaBuf) -> Result<Vec<f32>> {
        self.check()?;
        let v = self
            .stream()
            .clone_dtoh(&buf.view())
            .map_err(device_err("copying activations from the GPU"))?;
        self.check()?;
        Ok(v)
    }

    fn fill(&self, buf: &mut CudaBuf, value: f32) {
        let n = buf.len as i64;
        let r = (|| {
            launch!(
                self,
                "fill",
                self.ops.stride(buf.len),
                &mut buf.view_mut(),
                &n,
                &value
            )
        })();
        self.keep(r)
    }

    fn len(&self, buf: &CudaBuf) -> usize {
        buf.len
    }

    fn synchronize(&self) -> Result<()> {
        self.dev.synchronize()?;
        self.check()
    }

    fn argmax_rows(&self, x: &CudaBuf, width: usize) -> Result<Vec<Option<u32>>> {
        let rows = self.logit_rows("argmax_rows", x, width)?;
        if rows == 0 {
            return Ok(Vec::new());
        }
        let mut ids = self.id_slots(rows)?;
        let w = width as i32;
        launch!(
            self,
            "argmax_rows",
            Self::one_block_a_row(rows),
            &x.view(),
            &w,
            &mut ids
        )?;
        self.read_ids(&ids)
    }

    fn sample_rows(&self, x: &CudaBuf, width: usize, draws: &[Draw]) -> Result<Vec<Option<u32>>> {
        let rows = self.logit_rows("sample_rows", x, width)?;
        if draws.len() != rows {
            return Err(EngineError::Device(format!(
                "sample_rows: {rows} rows, {} draws",
                draws.len()
            )));
        }
        if rows == 0 {
            return Ok(Vec::new());
        }
        // (1/T, u, top_p, top_k as a float's bits) a row.
        let params: Vec<f32> = draws
            .iter()
            .flat_map(|d| {
                [
                    d.inv_temperature,
                    d.uniform,
                    d.top_p,
                    f32::from_bits(d.top_k),
                ]
            })
            .collect();
        let params = self.upload(&params)?;
        let mut ids = self.id_slots(rows)?;
        let w = width as i32;
        launch!(
            self,
            "sample_rows",
            Self::one_block_a_row(rows),
            &x.view(),
            &w,
            &params.view(),
            &mut ids
        )?;
        // Rows whose candidates a block cannot sort itself (a flat nucleus, a
        // large top-k) or whose scaled logits overflow are drawn here.
        (self.read_ids(&ids)?.into_iter().enumerate())
            .map(|(r, id)| match id {
                Some(SAMPLE_ON_HOST) => {
                    let row = x.slice(r * width..(r + 1) * width);
                    let row = self
                        .stream()
                        .clone_dtoh(&row)
                        .map_err(device_err("reading a row of logits"))?;
                    Ok(sample_row_host(&row, draws[r]))
                }
                id => Ok(id),
            })
            .collect()
    }

    fn dense(
        &self,
        w: DenseHost,
        rows: usize,
        cols: usize,
        bias: Option<Vec<f32>>,
    ) -> Result<CudaDense> {
        CudaDense::upload(&self.dev, &w, rows, cols, bias.as_deref())
    }

    fn anyprec(&self, w: AnyPrecHost) -> Result<CudaAnyPrecLinear> {
        let bias = match &w.bias {
            Some(b) if b.len() != w.rows => {
                return Err(EngineError::Device(format!(
                    "a bias of {} values for {} rows",
                    b.len(),
                    w.rows
                )))
            }
            Some(b) => Some(
                self.stream()
                    .clone_htod(b)
                    .map_err(device_err("copying a bias to the GPU"))?,
            ),
            None => None,
        };
        Ok(CudaAnyPrecLinear {
            w: CudaAnyPrec::upload(&self.dev, &w)?,
            bias,
        })
    }

    fn anyprec_random(
        &self,
        rows: usize,
        cols: usize,
        max_bits: u32,
        seed: u64,
    ) -> Result<CudaAnyPrecLinear> {
        self.random_anyprec(rows, cols, max_bits, seed)
    }

    fn dense_random(&self, rows: usize, cols: usize, seed: u64) -> Result<CudaDense> {
        self.random_dense(rows, cols, seed)
    }

    fn kv_new(&self, layers: usize, kv_dim: usize) -> CudaKv {
        CudaKv::new(layers, kv_dim, self.kv)
    }

    fn kv_append(
        &self,
        kv: &mut CudaKv,
        layer: usize,
        k: &CudaBuf,
        v: &CudaBuf,
        step: &Step<CudaSlice<u32>>,
    ) -> Result<()> {
        self.check()?;
        let d = kv.kv_dim().max(1);
        if k.len != v.len || !k.len.is_multiple_of(d) {
            return Err(EngineError::Device(format!(
                "KV cache: {} keys and {} values for positions of width {d}",
                k.len, v.len
            )));
        }
        let kernel = kv.kernel("kv_store");
        let (keys, values) = kv.slots(&self.dev, layer, step.pos0, k.len / d)?;
        if k.len == 0 {
            return Ok(());
        }
        let (nd, di) = (k.len as i64, d as i32);
        launch!(
            self,
            kernel,
            self.ops.stride(k.len),
            &k.view(),
            &v.view(),
            keys,
            values,
            &step.data,
            &nd,
            &di
        )
    }

    fn rope_append(
        &self,
        q: &mut CudaBuf,
        k: &mut CudaBuf,
        v: &CudaBuf,
        kv: &mut CudaKv,
        layer: usize,
        step: &Step<CudaSlice<u32>>,
        rope: RopeArgs<'_, Self>,
    ) -> Result<()> {
        self.check()?;
        let RopeArgs {
            heads,
            kv_heads,
            head_dim,
            rot_dim,
            table,
        } = rope;
        let (qd, kvd) = (heads * head_dim, kv_heads * head_dim);
        let n = q.len / qd.max(1);
        if n * qd != q.len
            || k.len != n * kvd
            || v.len != k.len
            || kv.kv_dim() != kvd
            || rot_dim > head_dim
            || table.len < (step.pos0 + n) * rot_dim
        {
            return Err(EngineError::Device(format!(
                "rope_append: {} queries ({heads} heads of {head_dim}), {} keys, {} values \
                 ({kv_heads} heads) into a cache of width {}, {rot_dim} rotated, a table of {} \
                 for positions up to {}",
                q.len,
                k.len,
                v.len,
                kv.kv_dim(),
                table.len,
                step.pos0 + n
            )));
        }
        let kernel = kv.kernel("rope_store");
        let (keys, values) = kv.slots(&self.dev, layer, step.pos0, n)?;
        if n == 0 {
            return Ok(());
        }
        let [ni, h, hk, hd, rot] = [n, heads, kv_heads, head_dim, rot_dim].map(|v| v as i32);
        launch!(
            self,
            kernel,
            self.ops.stride((n * heads * rot_dim / 2).max(k.len)),
            &mut q.view_mut(),
            &k.view(),
            &v.view(),
            keys,
            values,
            &table.view(),
            &ni,
            &h,
            &hk,
            &hd,
            &rot,
            &step.data
        )
    }

    fn kv_reserve(&self, kv: &mut CudaKv, positions: usize) -> Result<usize> {
        self.check()?;
        kv.reserve(&self.dev, positions)
    }

    fn kv_commit(&self, kv: &mut CudaKv, positions: usize) {
        kv.commit(positions)
    }

    fn kv_truncate(&self, kv: &mut CudaKv, positions: usize) {
        kv.truncate(positions)
    }

    fn kv_bytes(&self, kv: &CudaKv) -> usize {
        kv.bytes()
    }

    fn kv_dtype(&self) -> KvDtype {
        self.kv
    }

    fn step(&self, tokens: &[u32], pos0: usize) -> Result<Step<CudaSlice<u32>>> {
        self.check()?;
        let data = self.upload_u32(&Self::step_words(tokens, pos0)?)?;
        Ok(Step {
            tokens: tokens.to_vec(),
            pos0,
            data,
        })
    }

    fn step_update(
        &self,
        step: &mut Step<CudaSlice<u32>>,
        tokens: &[u32],
        pos0: usize,
    ) -> Result<()> {
        self.check()?;
        if tokens.len() != step.tokens.len() {
            return Err(EngineError::Device(format!(
                "a step of {} tokens rewritten for {}",
                step.tokens.len(),
                tokens.len()
            )));
        }
        self.stream()
            .memcpy_htod(&Self::step_words(tokens, pos0)?, &mut step.data)
            .map_err(device_err("copying tokens to the GPU"))?;
        step.tokens.copy_from_slice(tokens);
        step.pos0 = pos0;
        Ok(())
    }

    fn captures_graphs(&self) -> bool {
        self.graphs
    }

    fn capture_begin(&self) -> Result<()> {
        self.check()?;
        self.stream()
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
            .map_err(device_err("starting to record a graph"))
    }

    fn capture_end(&self) -> Result<CudaStepGraph> {
        // End the recording before anything else: the stream must leave
        // capture mode even when an op failed.
        let g = self
            .stream()
            .end_capture(CUgraphInstantiate_flags(0))
            .map_err(device_err("recording a graph"));
        self.check()?;
        match g? {
            Some(g) => Ok(CudaStepGraph(g)),
            None => Err(EngineError::Device(
                "CUDA: an empty graph was recorded".into(),
            )),
        }
    }

    fn graph_launch(&self, graph: &mut CudaStepGraph) -> Result<()> {
        self.check()?;
        graph.0.launch().map_err(device_err("launching a graph"))
    }

    fn embed(&self, table: &CudaDense, step: &Step<CudaSlice<u32>>, out: &mut CudaBuf) {
        let r = (|| {
            let cols = table.cols();
            let tokens = &step.tokens;
            Self::want_len("embedding output", out, tokens.len() * cols)?;
            if let Some(&t) = tokens.iter().find(|&&t| t as usize >= table.rows()) {
                return Err(EngineError::TokenOutOfRange {
                    token: t,
                    vocab: table.rows(),
                });
            }
            let (n, c) = (tokens.len() as i32, cols as i32);
            launch!(
                self,
                format!("embed_{}", table.kind()),
                self.ops.stride(tokens.len() * cols),
                table.weight(),
                table.scales(),
                &step.data.slice(1..),
                &n,
                &c,
                &mut out.view_mut()
            )
        })();
        self.keep(r)
    }

    fn rms_norm(&self, x: &CudaBuf, w: &CudaBuf, eps: f32, out: &mut CudaBuf) {
        let r = (|| {
            let d = w.len.max(1);
            Self::want_len("rms_norm output", out, x.len)?;
            if !x.len.is_multiple_of(d) {
                return Err(EngineError::Device(format!(
                    "rms_norm: {} values in rows of {d}",
                    x.len
                )));
            }
            let rows = x.len / d;
            let (di, cp) = (d as i32, padded_cols(d) as i32);
            let (mut ov, mut halves) =
                out.write_with_halves(self.stream(), rows, d, self.op_halves)?;
            let (xs, _in_use) = optional_ptr(halves.as_mut(), self.stream());
            launch!(
                self,
                "rms_norm",
                self.ops.norm_rows(rows, d),
                &x.view(),
                &w.view(),
                &eps,
                &mut ov,
                &di,
                &xs,
                &cp
            )
        })();
        self.keep(r)
    }

    fn rms_norm_inplace(&self, x: &mut CudaBuf, w: &CudaBuf, eps: f32) {
        let r = (|| {
            let d = w.len.max(1);
            if !x.len.is_multiple_of(d) {
                return Err(EngineError::Device(format!(
                    "rms_norm: {} values in segments of {d}",
                    x.len
                )));
            }
            let di = d as i32;
            let cfg = self.ops.norm_rows(x.len / d, d);
            // In place: the kernel's input and output are the same buffer (each
            // thread writes only the values it read).
            let (xv, no_halves, cp) = (x.in_place(), 0u64, 0i32);
            launch!(
                self,
                "rms_norm",
                cfg,
                &xv,
                &w.view(),
                &eps,
                &xv,
                &di,
                &no_halves,
                &cp
            )
        })();
        self.keep(r)
    }

    fn rope(
        &self,
        x: &mut CudaBuf,
        heads: usize,
        head_dim: usize,
        rot_dim: usize,
        step: &Step<CudaSlice<u32>>,
        table: &CudaBuf,
    ) {
        let r = (|| {
            let pos0 = step.pos0;
            let n = x.len / (heads * head_dim).max(1);
            if n * heads * head_dim != x.len
                || rot_dim > head_dim
                || table.len < (pos0 + n) * rot_dim
            {
                return Err(EngineError::Device(format!(
                    "rope: {} values, {heads} heads of {head_dim}, {rot_dim} rotated, \
                     a table of {} for positions up to {}",
                    x.len,
                    table.len,
                    pos0 + n
                )));
            }
            let (ni, h, hd, rot) = (n as i32, heads as i32, head_dim as i32, rot_dim as i32);
            launch!(
                self,
                "rope",
                self.ops.stride(n * heads * rot_dim / 2),
                &mut x.view_mut(),
                &table.view(),
                &ni,
                &h,
                &hd,
                &rot,
                &step.data
            )
        })();
        self.keep(r)
    }

    fn attention(
        &self,
        q: &CudaBuf,
        kv: &CudaKv,
        layer: usize,
        step: &Step<CudaSlice<u32>>,
        shape: AttnShape,
        out: &mut CudaBuf,
    ) {
        let r = self.attention_into(q, kv, layer, step, shape, out, None);
        self.keep(r)
    }

    fn attention_sumsq(
        &self,
        q: &CudaBuf,
        kv: &CudaKv,
        layer: usize,
        step: &Step<CudaSlice<u32>>,
        shape: AttnShape,
        out: &mut CudaBuf,
    ) -> Result<Option<SumSq<Self>>> {
        let n = q
            .len
            .checked_div(shape.num_heads * shape.head_dim)
            .unwrap_or(0);
        self.check()?;
        // The attention kernel (one span) or the merge writes a sum a head.
        let mut sums = self.for_kernel(n * shape.num_heads, "attention sums of squares")?;
        self.attention_into(q, kv, layer, step, shape, out, Some(&mut sums))?;
        Ok(Some(SumSq {
            sums,
            parts: shape.num_heads,
        }))
    }

    fn swiglu(&self, gate: &mut CudaBuf, up: &CudaBuf, n: usize) {
        let r = (|| {
            Self::want_len("swiglu", up, gate.len)?;
            let width = Self::rows_width("swiglu", gate, n)?;
            let len = gate.len as i64;
            let (w, rows, cp) = (width as i32, n as i32, padded_cols(width) as i32);
            let (mut gv, mut halves) =
                gate.write_with_halves(self.stream(), n, width, self.op_halves)?;
            let (xs, _in_use) = optional_ptr(halves.as_mut(), self.stream());
            // With halves the kernel covers the padded rows (their padding too).
            let cfg = self.ops.stride(if xs != 0 {
                n * padded_cols(width)
            } else {
                width * n
            });
            launch!(
                self,
                "swiglu",
                cfg,
                &mut gv,
                &up.view(),
                &len,
                &w,
                &xs,
                &rows,
                &cp
            )
        })();
        self.keep(r)
    }

    fn swiglu_sumsq(
        &self,
        gate: &mut CudaBuf,
        up: &CudaBuf,
        n: usize,
    ) -> Result<Option<SumSq<Self>>> {
        self.check()?;
        Self::want_len("swiglu", up, gate.len)?;
        let width = Self::rows_width("swiglu", gate, n)?;
        let parts = width.div_ceil(SWIGLU_PART);
        // One block a part writes each sum.
        let mut sums = self.for_kernel(n * parts, "SwiGLU sums of squares")?;
        let (w, cp) = (width as i32, padded_cols(width) as i32);
        let (mut gv, mut halves) =
            gate.write_with_halves(self.stream(), n, width, self.op_halves)?;
        let (xs, _in_use) = optional_ptr(halves.as_mut(), self.stream());
        launch!(
            self,
            "swiglu_sumsq",
            self.ops.parts(parts, n),
            &mut gv,
            &up.view(),
            &w,
            &mut sums.view_mut(),
            &xs,
            &cp
        )?;
        Ok(Some(SumSq { sums, parts }))
    }

    fn add(&self, h: &mut CudaBuf, x: &CudaBuf) {
        let r = (|| {
            Self::want_len("add", x, h.len)?;
            let n = h.len as i64;
            launch!(
                self,
                "add",
                self.ops.stride(h.len),
                &mut h.view_mut(),
                &x.view(),
                &n
            )
        })();
        self.keep(r)
    }

    fn add_checked(
        &self,
        h: &mut CudaBuf,
        x: &CudaBuf,
        width: usize,
        flags: &mut CudaBuf,
        slot: usize,
    ) {
        let r = (|| {
            Self::want_len("add", x, h.len)?;
            Self::check_slot("flag_non_finite", flags, slot)?;
            let (n, w, s) = (h.len as i64, width.max(1) as i32, slot as i32);
            launch!(
                self,
                "add_flag",
                self.ops.stride(h.len),
                &mut h.view_mut(),
                &x.view(),
                &n,
                &w,
                &mut flags.view_mut(),
                &s
            )
        })();
        self.keep(r)
    }

    fn add_checked_norm(
        &self,
        h: &mut CudaBuf,
        x: &CudaBuf,
        (flags, slot): (&mut CudaBuf, usize),
        w: &CudaBuf,
        eps: f32,
        out: &mut CudaBuf,
        norms: Option<InputNorms<'_, Self>>,
    ) -> Result<()> {
        self.check()?;
        let d = w.len.max(1);
        let n = h.len / d;
        Self::want_len("add", x, h.len)?;
        Self::want_len("add_checked_norm output", out, h.len)?;
        Self::check_slot("flag_non_finite", flags, slot)?;
        if !h.len.is_multiple_of(d) {
            return Err(EngineError::Device(format!(
                "add_checked_norm: {} values in rows of {d}",
                h.len
            )));
        }
        // The norms' buffers (resized to n), or null pointers for none.
        let mut norms = norms;
        if let Some(InputNorms { after, before }) = norms.as_mut() {
            for b in [&mut **after, &mut **before] {
                b.resize_with(n, |n| self.alloc(n, "estimator input norms (GPU)"))?;
            }
        }
        let (mut after, mut before) = match norms {
            Some(InputNorms { after, before }) => (Some(after.view_mut()), Some(before.view_mut())),
            None => (None, None),
        };
        let stream = self.stream();
        let (after_ptr, _a) = optional_ptr(after.as_mut(), stream);
        let (before_ptr, _b) = optional_ptr(before.as_mut(), stream);
        let (mut ov, mut halves) = out.write_with_halves(stream, n, d, self.op_halves)?;
        let (xs, _h) = optional_ptr(halves.as_mut(), stream);
        let (di, s, cp) = (d as i32, slot as i32, padded_cols(d) as i32);
        launch!(
            self,
            "add_flag_norm",
            self.ops.norm_rows(n, d),
            &mut h.view_mut(),
            &x.view(),
            &w.view(),
            &eps,
            &mut ov,
            &di,
            &mut flags.view_mut(),
            &s,
            &after_ptr,
            &before_ptr,
            &xs,
            &cp
        )
    }

    fn copy(&self, src: &CudaBuf, dst: &mut CudaBuf) {
        let r = (|| {
            dst.resize_with(src.len, |n| self.alloc(n, "activations (GPU)"))?;
            if src.len > 0 {
                self.stream()
                    .memcpy_dtod(&src.view(), &mut dst.view_mut())
                    .map_err(device_err("copying activations"))?;
            }
            Ok(())
        })();
        self.keep(r)
    }

    fn rows(&self, x: &CudaBuf, width: usize, row0: usize, n: usize) -> Result<CudaBuf> {
        self.check()?;
        let (a, b) = (row0 * width, (row0 + n) * width);
        if b > x.len {
            return Err(EngineError::Device(format!(
                "rows {row0}..{} of width {width} from {} values",
                row0 + n,
                x.len
            )));
        }
        let mut out = self.zeros(b - a)?;
        if b > a {
            self.stream()
                .memcpy_dtod(&x.slice(a..b), &mut out.view_mut())
                .map_err(device_err("copying rows"))?;
        }
        Ok(out)
    }

    fn split_columns(&self, x: &CudaBuf, n: usize, parts: &mut [&mut CudaBuf]) {
        let r = (|| {
            let widths: Vec<usize> = parts.iter().map(|p| p.len / n.max(1)).collect();
            let total: usize = widths.iter().sum();
            if n * total != x.len || parts.iter().zip(&widths).any(|(p, w)| p.len != n * w) {
                return Err(EngineError::Device(format!(
                    "split_columns: {} values into parts of {:?} floats for {n} tokens",
                    x.len,
                    parts.iter().map(|p| p.len).collect::<Vec<_>>()
                )));
            }
            let mut off = 0;
            for (p, &w) in parts.iter_mut().zip(&widths) {
                let (ni, ti, oi, wi) = (n as i32, total as i32, off as i32, w as i32);
                launch!(
                    self,
                    "split_cols",
                    self.ops.stride(n * w),
                    &x.view(),
                    &ni,
                    &ti,
                    &oi,
                    &wi,
                    &mut p.view_mut()
                )?;
                off += w;
            }
            Ok(())
        })();
        self.keep(r)
    }

    fn dense_linear(&self, w: &CudaDense, x: &CudaBuf, n: usize, y: &mut CudaBuf) {
        let r = self.dense_into(w, x, n, y);
        self.keep(r)
    }

    fn anyprec_linear(
        &self,
        w: &CudaAnyPrecLinear,
        x: &CudaBuf,
        n: usize,
        bits: u32,
        y: &mut CudaBuf,
    ) {
        let r = self.anyprec_into(w, x, n, bits, y);
        self.keep(r)
    }

    fn estimates(
        &self,
        est: &Estimator<Self>,
        input: EstInput<'_, Self>,
        n: usize,
    ) -> Result<CudaBuf> {
        self.check()?;
        let mut projected = None;
        let (src, form, a, c) = self.estimator_input(est, input, n, &mut projected)?;
        self.row_norms(src, n, form, a, c)
    }

    fn estimate(
        &self,
        est: &Estimator<Self>,
        input: EstInput<'_, Self>,
        n: usize,
        threshold: f32,
    ) -> Result<CudaMask> {
        self.decide(est, input, n, threshold, None)
    }

    fn estimate_counted(
        &self,
        est: &Estimator<Self>,
        input: EstInput<'_, Self>,
        n: usize,
        threshold: f32,
        count: (&mut CudaBuf, usize),
    ) -> Result<CudaMask> {
        self.decide(est, input, n, threshold, Some(count))
    }

    fn threshold_mask(&self, values: &CudaBuf, threshold: f32) -> Result<CudaMask> {
        self.check()?;
        let n = values.len;
        let mut flags = self
            .stream()
            .alloc_zeros::<u32>(n.max(1))
            .map_err(device_err("allocating decisions"))?;
        let ni = n as i32;
        launch!(
            self,
            "threshold",
            self.ops.stride(n),
            &values.view(),
            &ni,
            &threshold,
            &mut flags
        )?;
        Ok(CudaMask {
            flags,
            n,
            known: None,
        })
    }

    fn mask_from(&self, high: &[bool]) -> Result<CudaMask> {
        self.check()?;
        let flags: Vec<u32> = high.iter().map(|&h| h as u32).collect();
        let side = |h: bool| -> Result<(CudaSlice<u32>, usize)> {
            let ids: Vec<u32> = (0..high.len() as u32)
                .filter(|&t| high[t as usize] == h)
                .collect();
            Ok((self.upload_u32(&ids)?, ids.len()))
        };
        Ok(CudaMask {
            flags: self.upload_u32(&flags)?,
            n: high.len(),
            known: Some([side(false)?, side(true)?]),
        })
    }

    fn mask_count(&self, mask: &CudaMask) -> Result<usize> {
        self.check()?;
        match &mask.known {
            Some([_, (_, high)]) => Ok(*high),
            None => Ok(self.picked(mask, true)?.len()),
        }
    }

    fn mask_count_into(&self, mask: &CudaMask, out: &mut CudaBuf, slot: usize) {
        let r = (|| {
            Self::check_slot("mask_count_into", out, slot)?;
            let (n, s) = (mask.n as i32, slot as i32);
            let one_warp = cudarc::driver::LaunchConfig {
                grid_dim: (1, 1, 1),
                block_dim: (32, 1, 1),
                shared_mem_bytes: 0,
            };
            launch!(
                self,
                "count_flags",
                one_warp,
                &mask.flags,
                &n,
                &mut out.view_mut(),
                &s
            )
        })();
        self.keep(r)
    }

    fn mask_store_into(&self, mask: &CudaMask, out: &mut CudaBuf, offset: usize, stride: usize) {
        let r = (|| {
            if mask.n == 0 {
                return Ok(());
            }
            Self::check_slot("mask_store_into", out, offset + (mask.n - 1) * stride)?;
            let (n, o, s) = (mask.n as i32, offset as i32, stride as i32);
            launch!(
                self,
                "store_flags",
                self.ops.stride(mask.n),
                &mask.flags,
                &n,
                &mut out.view_mut(),
                &o,
                &s
            )
        })();
        self.keep(r)
    }

    fn anyprec_linear_select(
        &self,
        w: &CudaAnyPrecLinear,
        (rows, cols): (usize, usize),
        x: &CudaBuf,
        n: usize,
        (low, high): (u32, u32),
        mask: &CudaMask,
        y: &mut CudaBuf,
    ) -> Result<()> {
        self.check()?;
        if (w.w.rows(), w.w.cols()) != (rows, cols) {
            return Err(EngineError::Device(format!(
                "per-token precision: a {}x{} weight for {rows}x{cols}",
                w.w.rows(),
                w.w.cols()
            )));
        }
        self.select_into(w, x, n, (low, high), mask, y)
    }

    fn anyprec_linear_decided(
        &self,
        w: &CudaAnyPrecLinear,
        shape: (usize, usize),
        x: &CudaBuf,
        n: usize,
        bits: (u32, u32),
        decide: Decide<'_, Self>,
        count: Option<(&mut CudaBuf, usize)>,
        y: &mut CudaBuf,
    ) -> Result<()> {
        self.check()?;
        let (low, high) = bits;
        let one_kernel = n == 1
            && high == low + 1
            && w.w.selects_in_kernel(low)
            && (w.w.rows(), w.w.cols()) == shape;
        if !one_kernel {
            return decided_by_mask(self, w, shape, x, n, bits, decide, count, y);
        }
        Self::want_len("any-precision linear input", x, shape.1)?;
        Self::want_len("any-precision linear output", y, shape.0)?;
        let mut projected = None;
        let (e, form, a, c) =
            self.estimator_input(decide.estimator, decide.input, 1, &mut projected)?;
        Self::check_count(&count)?;
        let mut counts = count.map(|(b, slot)| (b.view_mut(), slot));
        x.with_gemv_input((1, shape.1), 0..1, |input| {
            w.w.gemv_select(
                input,
                low,
                (&e.view(), form),
                (a, c, decide.threshold),
                counts.as_mut().map(|(v, slot)| (v, *slot)),
                &mut y.view_mut(),
            )
        })?;
        self.add_bias(w.bias.as_ref(), shape.0, 1, y)
    }

    fn gather_rows(
        &self,
        x: &CudaBuf,
        width: usize,
        mask: &CudaMask,
        high: bool,
    ) -> Result<CudaBuf> {
        self.check()?;
        Self::want_len("gather_rows", x, mask.n * width)?;
        let (ids, count) = self.picked_ids(mask, high)?;
        let mut out = self.zeros(count * width)?;
        if count > 0 {
            let (w, c) = (width as i32, count as i32);
            launch!(
                self,
                "gather_rows",
                self.ops.stride(count * width),
                &x.view(),
                &w,
                &*ids,
                &c,
                &mut out.view_mut()
            )?;
        }
        Ok(out)
    }

    fn scatter_rows(
        &self,
        src: &CudaBuf,
        width: usize,
        mask: &CudaMask,
        high: bool,
        dst: &mut CudaBuf,
    ) {
        let r = (|| {
            Self::want_len("scatter_rows", dst, mask.n * width)?;
            let (ids, count) = self.picked_ids(mask, high)?;
            Self::want_len("scatter_rows source", src, count * width)?;
            if count == 0 {
                return Ok(());
            }
            let (w, c) = (width as i32, count as i32);
            launch!(
                self,
                "scatter_rows",
                self.ops.stride(count * width),
                &src.view(),
                &w,
                &*ids,
                &c,
                &mut dst.view_mut()
            )
        })();
        self.keep(r)
    }

    fn flag_non_finite(&self, x: &CudaBuf, width: usize, flags: &mut CudaBuf, slot: usize) {
        let r = (|| {
            Self::check_slot("flag_non_finite", flags, slot)?;
            let (n, w, s) = (x.len as i64, width.max(1) as i32, slot as i32);
            launch!(
                self,
                "flag_non_finite",
                self.ops.stride(x.len),
                &x.view(),
                &n,
                &w,
                &mut flags.view_mut(),
                &s
            )
        })();
        self.keep(r)
    }
}

/// The device address of `v` and the guard that keeps it in use, or 0 (a
/// kernel's null pointer) for none.
fn optional_ptr<'a, T>(
    v: Option<&'a mut CudaViewMut<'_, T>>,
    stream: &'a Arc<CudaStream>,
) -> (u64, Option<impl Drop + 'a>) {
    match v {
        Some(v) => {
            let (p, in_use) = v.device_ptr_mut(stream);
            (p, Some(in_use))
        }
        None => (0, None),
    }
}
