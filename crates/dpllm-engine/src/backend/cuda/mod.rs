//! The CUDA backend (issue #10), built on `cudarc` with the driver, NVRTC and
//! cuBLAS loaded at run time, so the crate builds and its tests run where there
//! is no GPU or CUDA SDK (GPU tests skip there with a message).
//!
//! Kernels are CUDA C in `kernels/*.cu`, compiled by NVRTC for the GPU's own
//! architecture at first use and cached as PTX ([`compile`]). Nothing on the
//! required path uses Hopper-only instructions: the paper's targets are edge
//! and consumer GPUs (sm_87, sm_89).
//!
//! [`CudaBackend`] implements [`super::Backend`] on one GPU ([`CudaDevice`]):
//! the bit-plane GEMV ([`bitplane`]), dense weights ([`dense`]), the KV cache
//! (`kv`), the other ops ([`ops`], `kernels/ops.cu`) and the linears with
//! per-token precision and the GEMM path for long batches (`linear`). A
//! forward call waits for the GPU only for its output, and a decode step is
//! recorded once as a CUDA graph and replayed per token
//! (`crate::model::graph`; `DPLLM_CUDA_GRAPHS=0` turns that off). The KV
//! cache holds f16 by default (`CudaBackend::with_kv`), and tokens are
//! picked on the device, greedy (`Backend::argmax_rows`) or drawn with
//! temperature / top-k / top-p (`Backend::sample_rows`), so only the id
//! comes back. On sm_90 and later kernels are launched with programmatic
//! dependent launch ([`launch`]; `DPLLM_CUDA_PDL=0` turns it off).

/// Queue kernel `$name` of the ops module (on a `CudaBackend`) with arguments
/// `$arg` (references), an error naming the kernel when it cannot be launched.
macro_rules! launch {
    ($be:expr, $name:expr, $cfg:expr, $($arg:expr),+ $(,)?) => {{
        let name: &str = &$name;
        let f = $be.ops.get(name)?;
        // One statement, so the argument temporaries live until the launch.
        // SAFETY: each call site passes the kernel's parameters in order with
        // their C types (int = i32, long = i64, float = f32, pointers as
        // slices), and sizes its grid and buffers for what the kernel reads
        // and writes (it checks its own bounds).
        let cfg = $cfg;
        let r = unsafe { $be.device().launch(&f)$(.arg($arg))+.launch(cfg) };
        r.map(|_| ())
            .map_err(|e| EngineError::Device(format!("CUDA: launching {name}: {e}")))
    }};
}

mod backend;
pub mod bitplane;
mod buf;
pub mod compile;
pub mod dense;
mod kv;
pub mod launch;
mod levels;
mod linear;
pub mod ops;

pub use backend::{CudaBackend, CudaMask};
pub use buf::CudaBuf;
pub use dense::CudaDense;
pub use kv::CudaKv;
pub use levels::{pair_words, PAIR_WORDS};
pub use linear::CudaAnyPrecLinear;

/// The `cudarc` this backend is built on, for callers that allocate and copy.
pub use cudarc;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::cublas::CudaBlas;
use cudarc::driver::sys::{CUevent_flags, CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream};

use crate::error::{EngineError, Result};

/// A CUDA error as an engine error, saying what was being done.
pub(crate) fn device_err(
    what: &str,
) -> impl FnOnce(cudarc::driver::DriverError) -> EngineError + '_ {
    move |e| EngineError::Device(format!("CUDA: {what}: {e}"))
}

/// A loaded module with its functions looked up once by name (the driver's
/// lookup costs about a microsecond, a launch a few).
pub struct Kernels {
    module: Arc<CudaModule>,
    functions: Mutex<HashMap<String, CudaFunction>>,
    file: &'static str,
}

impl Kernels {
    /// The kernel `name`.
    pub fn get(&self, name: &str) -> Result<CudaFunction> {
        let mut m = self.functions.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = m.get(name) {
            return Ok(f.clone());
        }
        let f = self.module.load_function(name).map_err(|e| {
            EngineError::Device(format!("CUDA: finding {name} in {}.cu: {e}", self.file))
        })?;
        m.insert(name.to_string(), f.clone());
        Ok(f)
    }
}

/// Launch switch `var` from the environment: "1" on, "0" off, else `default`.
fn env_switch(var: &str, default: bool) -> bool {
    match std::env::var(var).as_deref() {
        Ok("1") => true,
        Ok("0") => false,
        _ => default,
    }
}

/// The first compute capability with programmatic dependent launch.
const PDL_ARCH: (i32, i32) = (9, 0);

/// One GPU: its context, the stream all work is queued on, and the kernels
/// compiled for it (each module compiled on first use).
pub struct CudaDevice {
    ordinal: usize,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    name: String,
    arch: (i32, i32),
    sms: usize,
    /// Most shared memory a block may take (bytes, with the opt-in attribute).
    max_shared: usize,
    bitplane: OnceLock<Arc<Kernels>>,
    ops: OnceLock<Arc<Kernels>>,
    blas: OnceLock<Arc<CudaBlas>>,
    /// Kernels are launched with programmatic dependent launch ([`launch`]).
    pdl: AtomicBool,
    /// Layers of few tiles split them over blocks ([`bitplane::GemvVariant::splits`]).
    split_k: AtomicBool,
    /// 4-bit GEMVs take pair tables of half the copies ([`CudaDevice::half_pairs`]).
    half_pairs: AtomicBool,
    /// GEMV blocks ask L2 for their planes first ([`CudaDevice::prefetch`]).
    prefetch: AtomicBool,
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.describe())
    }
}

impl CudaDevice {
    /// Open GPU `ordinal`; a clear error when there is no driver or no such GPU.
    pub fn new(ordinal: usize) -> Result<Arc<CudaDevice>> {
        // SAFETY: only asks whether the library can be opened.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(EngineError::Device(format!(
                "cuda:{ordinal}: no NVIDIA driver found (libcuda.so could not be loaded); \
                 run with --device cpu"
            )));
        }
        let count = CudaContext::device_count().map_err(device_err("counting GPUs"))?;
        if ordinal >= count.max(0) as usize {
            return Err(EngineError::Device(format!(
                "cuda:{ordinal} does not exist: this machine has {count} GPU(s); \
                 pick another --device"
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(device_err("creating a context"))?;
        // SAFETY: every buffer of this context is used on the one stream made
        // below, in order, so cudarc's per-buffer events (two driver calls per
        // allocation, two per free) would order nothing.
        unsafe { ctx.disable_event_tracking() };
        let name = ctx.name().map_err(device_err("reading the GPU's name"))?;
        let arch = ctx
            .compute_capability()
            .map_err(device_err("reading the compute capability"))?;
        if arch < (8, 0) {
            return Err(EngineError::Device(format!(
                "cuda:{ordinal} ({name}) is sm_{}{}: dpllm's kernels use the tensor-core \
                 instructions of compute capability 8.0 and later (Ampere, Orin, Ada, Hopper)",
                arch.0, arch.1
            )));
        }
        let sms = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map_err(device_err("reading the multiprocessor count"))?;
        let smem = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            )
            .map_err(device_err("reading the shared memory per block"))?;
        // A stream of its own: the legacy default stream cannot record graphs.
        let stream = ctx.new_stream().map_err(device_err("creating a stream"))?;
        Ok(Arc::new(CudaDevice {
            ordinal,
            ctx,
            stream,
            name,
            arch,
            sms: sms.max(1) as usize,
            max_shared: smem.max(48 << 10) as usize,
            bitplane: OnceLock::new(),
            ops: OnceLock::new(),
            blas: OnceLock::new(),
            // On by default: 8-10 % off the 8B's 3- and 4-bit decode (H100).
            pdl: AtomicBool::new(arch >= PDL_ARCH && env_switch("DPLLM_CUDA_PDL", true)),
            // Opt-in: slower where it applies (H100, 8B k/v: 5.9 against 4.5 µs).
            split_k: AtomicBool::new(env_switch("DPLLM_CUDA_SPLIT_K", false)),
            half_pairs: AtomicBool::new(env_switch("DPLLM_CUDA_HALF_PAIRS", false)),
            prefetch: AtomicBool::new(env_switch("DPLLM_CUDA_PREFETCH", false)),
        }))
    }

    /// "cuda:0 (NVIDIA H100 80GB HBM3, sm_90, PDL, split-K)", naming the
    /// launch options that are on ([`CudaDevice::pdl`],
    /// [`CudaDevice::split_k`], [`CudaDevice::half_pairs`],
    /// [`CudaDevice::prefetch`]), so results say how they were run.
    pub fn describe(&self) -> String {
        let pdl = if self.pdl() { ", PDL" } else { "" };
        let split_k = if self.split_k() { ", split-K" } else { "" };
        let half = if self.half_pairs() {
            ", half-pairs"
        } else {
            ""
        };
        let prefetch = if self.prefetch() { ", prefetch" } else { "" };
        format!(
            "cuda:{} ({}, sm_{}{}{pdl}{split_k}{half}{prefetch})",
            self.ordinal, self.name, self.arch.0, self.arch.1
        )
    }

    /// The context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream every op of this device is queued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// A launch of `f` on this device's stream ([`launch`]), with PDL when on.
    pub fn launch<'a>(&'a self, f: &'a CudaFunction) -> launch::Launch<'a> {
        launch::Launch::new(f, &self.stream, self.pdl())
    }

    /// True when kernels are launched with programmatic dependent launch
    /// (compute capability 9.0 and later, unless `DPLLM_CUDA_PDL=0`).
    pub fn pdl(&self) -> bool {
        self.pdl.load(Ordering::Relaxed)
    }

    /// Launch kernels from now on with PDL or not (for A/B timing and tests);
    /// returns whether it is on (never where the GPU lacks it).
    pub fn set_pdl(&self, on: bool) -> bool {
        let on = on && self.arch >= PDL_ARCH;
        self.pdl.store(on, Ordering::Relaxed);
        on
    }

    /// True when the bit-plane GEMV splits the tiles of a layer of fewer
    /// tiles than multiprocessors over several blocks each (split-K, opt-in
    /// with `DPLLM_CUDA_SPLIT_K=1`: slower where timed, see docs/benchmarks.md).
    pub fn split_k(&self) -> bool {
        self.split_k.load(Ordering::Relaxed)
    }

    /// Split-K on or off from now on (for A/B timing and tests).
    pub fn set_split_k(&self, on: bool) {
        self.split_k.store(on, Ordering::Relaxed);
    }

    /// True when 4-bit GEMVs (and the 4-bit side of DP-LLM's in-kernel
    /// choice) that would take pair tables take them with one copy for two
    /// lanes instead ([`bitplane::Tables::HalfPairs`]: half the shared
    /// memory, so the blocks of the 3-bit side fit as many a multiprocessor
    /// as its plain GEMV's); `DPLLM_CUDA_HALF_PAIRS=1`.
    pub fn half_pairs(&self) -> bool {
        self.half_pairs.load(Ordering::Relaxed)
    }

    /// Half-copy pair tables on or off from now on (for A/B timing and tests).
    pub fn set_half_pairs(&self, on: bool) {
        self.half_pairs.store(on, Ordering::Relaxed);
    }

    /// True when each bit-plane GEMV block first asks L2 for all the planes
    /// it will read (before its PDL wait, so they stream while the kernel
    /// before ends; not DP-LLM's in-kernel choice, whose 3-bit side spills
    /// at its register cap with it); `DPLLM_CUDA_PREFETCH=1`.
    pub fn prefetch(&self) -> bool {
        self.prefetch.load(Ordering::Relaxed)
    }

    /// The GEMV's L2 prefetch on or off from now on (for A/B timing and tests).
    pub fn set_prefetch(&self, on: bool) {
        self.prefetch.store(on, Ordering::Relaxed);
    }

    /// Compute capability (major, minor).
    pub fn arch(&self) -> (i32, i32) {
        self.arch
    }

    /// Streaming multiprocessors.
    pub fn multiprocessors(&self) -> usize {
        self.sms
    }

    /// Most shared memory one block may take, in bytes (above 48 KiB a
    /// kernel must opt in: [`CudaDevice::allow_shared`]).
    pub fn max_shared(&self) -> usize {
        self.max_shared
    }

    /// Let `f` take `bytes` of dynamic shared memory (a no-op up to 48 KiB).
    pub(crate) fn allow_shared(&self, f: &CudaFunction, bytes: u32) -> Result<()> {
        if bytes <= 48 << 10 {
            return Ok(());
        }
        f.set_attribute(
            cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            bytes as i32,
        )
        .map_err(device_err("raising a kernel's shared memory"))
    }

    /// (free, total) bytes of GPU memory now.
    pub fn memory(&self) -> Result<(usize, usize)> {
        self.ctx
            .bind_to_thread()
            .map_err(device_err("binding the context"))?;
        cudarc::driver::result::mem_get_info().map_err(device_err("reading the free memory"))
    }

    /// Wait for every queued op.
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(device_err("synchronizing"))
    }

    /// The cuBLAS handle on this device's stream, made on first use.
    pub fn blas(&self) -> Result<Arc<CudaBlas>> {
        if let Some(b) = self.blas.get() {
            return Ok(b.clone());
        }
        // SAFETY: only asks whether the library can be opened.
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(EngineError::Device(
                "cuBLAS (libcublas.so) was not found: install the CUDA toolkit's cuBLAS or \
                 add its directory to LD_LIBRARY_PATH"
                    .into(),
            ));
        }
        let b = CudaBlas::new(self.stream.clone())
            .map_err(|e| EngineError::Device(format!("cuBLAS: creating a handle: {e}")))?;
        Ok(self.blas.get_or_init(|| Arc::new(b)).clone())
    }

    /// Milliseconds per call of `f` on the device: `calls` calls recorded as
    /// one CUDA graph (after one untimed call), its replay timed by events, so
    /// the host's launch cost does not count. Where recording fails, the calls
    /// are queued back to back instead.
    pub fn time_ms(&self, calls: usize, f: impl FnMut() -> Result<()>) -> Result<f64> {
        self.time_calls(calls, true, f)
    }

    /// Milliseconds per call of `f` on the device, by events around `calls`
    /// calls queued back to back (after one untimed call). For copies: in a
    /// graph a device-to-device copy runs on a copy engine, slower than the
    /// kernel the driver uses otherwise (H100: 2.4 against 3.0 TB/s).
    pub fn time_ms_queued(&self, calls: usize, f: impl FnMut() -> Result<()>) -> Result<f64> {
        self.time_calls(calls, false, f)
    }

    fn time_calls(
        &self,
        calls: usize,
        graphed: bool,
        mut f: impl FnMut() -> Result<()>,
    ) -> Result<f64> {
        f()?;
        let graph = graphed.then(|| {
            self.stream
                .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
                .map_err(device_err("starting to record a graph"))?;
            let queued = (0..calls).try_for_each(|_| f());
            let g = self
                .stream
                .end_capture(CUgraphInstantiate_flags(0))
                .map_err(device_err("recording a graph"));
            queued?;
            g?.ok_or_else(|| EngineError::Device("CUDA: an empty graph was recorded".into()))
        });
        let mut graph = graph.and_then(|g| {
            g.inspect_err(|e| tracing::warn!("timing without a graph: {e}"))
                .ok()
        });
        if let Some(g) = &graph {
            g.launch().map_err(device_err("launching a graph"))?;
        }
        let ev = || {
            self.ctx
                .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(device_err("creating an event"))
        };
        let (start, end) = (ev()?, ev()?);
        start
            .record(&self.stream)
            .map_err(device_err("recording an event"))?;
        match &mut graph {
            Some(g) => g.launch().map_err(device_err("launching a graph"))?,
            None => (0..calls).try_for_each(|_| f())?,
        }
        end.record(&self.stream)
            .map_err(device_err("recording an event"))?;
        let ms = start.elapsed_ms(&end).map_err(device_err("timing"))?;
        Ok(ms as f64 / calls.max(1) as f64)
    }

    /// The bit-plane GEMV kernels, compiled on first use.
    pub(crate) fn bitplane_kernels(&self) -> Result<Arc<Kernels>> {
        self.kernels(&self.bitplane, "bitplane_gemv", bitplane::SOURCE)
    }

    /// The forward pass's other kernels (`kernels/ops.cu`), compiled on first
    /// use; the gradient model launches its grid-stride ones too.
    pub fn ops_kernels(&self) -> Result<Arc<Kernels>> {
        self.kernels(&self.ops, "ops", ops::SOURCE)
    }

    /// The kernels of `source`, compiled (or read from the PTX cache) and loaded on first use.
    fn kernels(
        &self,
        cell: &OnceLock<Arc<Kernels>>,
        name: &'static str,
        source: &str,
    ) -> Result<Arc<Kernels>> {
        if let Some(m) = cell.get() {
            return Ok(m.clone());
        }
        let k = Arc::new(self.load_kernels(name, source)?);
        Ok(cell.get_or_init(|| k).clone())
    }

    /// The kernels of CUDA C `source` (`name`.cu in messages and the PTX
    /// cache), compiled for this GPU or read from the cache, and loaded: for
    /// crates with kernels of their own (the gradient model's).
    pub fn load_kernels(&self, name: &'static str, source: &str) -> Result<Kernels> {
        let ptx = compile::ptx(name, source, self.arch)?;
        let module = self
            .ctx
            .load_module(ptx)
            .map_err(|e| EngineError::Device(format!("CUDA: loading {name}.cu: {e}")))?;
        Ok(Kernels {
            module,
            functions: Mutex::default(),
            file: name,
        })
    }
}

/// Open GPU `ordinal` for a test, or `None` with a message saying why the test
/// is skipped (no driver, no GPU).
pub fn test_device(ordinal: usize) -> Option<Arc<CudaDevice>> {
    match CudaDevice::new(ordinal) {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("SKIP CUDA test: {e}");
            None
        }
    }
}
