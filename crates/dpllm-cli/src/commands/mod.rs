//! One module per subcommand.

pub mod bench;
pub mod bench_finetune;
pub mod bench_serve;
pub mod calib_text;
pub mod calibrate;
pub mod generate;
pub mod inspect;
pub mod perplexity;
pub mod pipeline;
pub mod quantize;
pub mod report;
pub mod sensitivity;
pub mod serve;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use dpllm_engine::session::{find_plan, PlanKey};
use dpllm_engine::tokenizer::TextTokenizer;
use dpllm_engine::{Backend, Model, RunPrecision, RuntimePlan, Selector, ServedModel, Session};
use dpllm_format::plan::PlanKind;

/// Check a `--json` output before any work: its directory exists and is
/// writable, it is none of `inputs`, and an existing file is a dpllm result.
pub fn check_json(path: Option<&Path>, inputs: &[&Path]) -> anyhow::Result<()> {
    if let Some(p) = path {
        dpllm_format::check_output(p, dpllm_format::OutputKind::Json, inputs, false)?;
    }
    Ok(())
}

/// Bytes of memory per byte of text to tokenize (the text, its encoding and ids).
const TOKENIZE_BYTES_PER_BYTE: u128 = 16;

/// Read a UTF-8 text argument (`flag` names it in errors): it must be a non-empty
/// file that fits in memory once tokenized.
pub fn read_text(path: &Path, flag: &str) -> anyhow::Result<String> {
    let meta = std::fs::metadata(path)
        .map_err(|e| anyhow::anyhow!("cannot read {flag} {}: {e}", path.display()))?;
    if meta.is_dir() {
        anyhow::bail!("{flag} {} is a directory, not a text file", path.display());
    }
    let what = format!("tokenizing {flag} {}", path.display());
    dpllm_eval::memory::ensure_fits(
        (meta.len() as u128).checked_mul(TOKENIZE_BYTES_PER_BYTE),
        &what,
    )?;
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read {flag} {}: {e}", path.display()))?;
    if text.trim().is_empty() {
        anyhow::bail!("{flag} {} is empty", path.display());
    }
    Ok(text)
}

/// Where a command runs the model.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct DeviceArg {
    /// Device to run on: cpu, or cuda / cuda:N (an NVIDIA GPU; the driver,
    /// NVRTC and cuBLAS are loaded at run time). On a GPU each decode step is
    /// recorded once as a CUDA graph and replayed per token; set
    /// DPLLM_CUDA_GRAPHS=0 to run it op by op.
    #[arg(long, default_value = "cpu")]
    pub device: dpllm_engine::Device,
    /// How the KV cache stores keys and values: f16 or f32. Default: f16 on a
    /// GPU (half the memory and attention's reads; logits move by about 1e-3),
    /// f32 on the CPU (the only type it has). --kv-cache f32 on a GPU matches
    /// the CPU's results to f32 rounding.
    #[arg(long, value_name = "TYPE")]
    pub kv_cache: Option<dpllm_engine::KvDtype>,
}

impl DeviceArg {
    /// Ok when this build can run on the device with the KV cache asked for.
    pub fn check(&self) -> anyhow::Result<()> {
        self.device.check()?;
        if self.device == dpllm_engine::Device::Cpu
            && self.kv_cache == Some(dpllm_engine::KvDtype::F16)
        {
            anyhow::bail!(
                "--kv-cache f16 is for --device cuda; the CPU backend keeps its KV cache in f32"
            );
        }
        Ok(())
    }

    /// The KV cache type on a GPU.
    #[cfg(feature = "cuda")]
    pub fn gpu_kv(&self) -> dpllm_engine::KvDtype {
        self.kv_cache.unwrap_or(dpllm_engine::KvDtype::F16)
    }
}

/// `$f(backend, $args...)` with the backend of `$device` (a [`DeviceArg`]):
/// the CPU, or the GPU opened with a clear error when it cannot be.
macro_rules! on_backend {
    ($device:expr, $f:ident($($arg:expr),* $(,)?)) => {{
        let device: &$crate::commands::DeviceArg = &$device;
        device.check()?;
        match device.device {
            dpllm_engine::Device::Cpu => $f(dpllm_engine::CpuBackend, $($arg),*),
            #[cfg(feature = "cuda")]
            dpllm_engine::Device::Cuda(n) => {
                let be = dpllm_engine::backend::cuda::CudaBackend::new(n)?;
                $f(be.with_kv(device.gpu_kv()), $($arg),*)
            }
            #[cfg(not(feature = "cuda"))]
            dpllm_engine::Device::Cuda(_) => unreachable!("refused by check"),
        }
    }};
}
pub(crate) use on_backend;

/// How an any-precision model picks its precision: uniform `--bits`, or a DP-LLM plan.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct BitsArg {
    /// Run every quantized linear at B bits (any-precision models only, 3..=8).
    /// Only the planes up to B are loaded. Default: the highest stored precision.
    #[arg(long, conflicts_with_all = ["target", "plan"])]
    pub bits: Option<u32>,
    /// Run the DP-LLM plan for this target average precision (see `dpllm calibrate`):
    /// each linear picks, per token, its lower or higher precision.
    #[arg(long, conflicts_with = "plan")]
    pub target: Option<f64>,
    /// Memory budget of the plan (default: the only calibrated budget). The model
    /// keeps in memory only the planes this budget allows.
    #[arg(long, requires = "target")]
    pub budget: Option<f64>,
    /// With --target: the static layer-wise baseline at that target instead of DP-LLM.
    #[arg(long = "static", requires = "target")]
    pub static_plan: bool,
    /// Run this plan file.
    #[arg(long)]
    pub plan: Option<PathBuf>,
    /// Feed every estimator its exact input instead of the asynchronous
    /// residual-stream approximation for q/k/v and gate/up.
    #[arg(long)]
    pub exact_estimator_input: bool,
    /// With a DP-LLM plan, what each token's decision follows: `estimator` (DP-LLM);
    /// `oracle`, the true error ||(W_h − W_l)x|| against the same thresholds (the
    /// upper bound of any estimator; runs both precisions, so it is slow, and
    /// reports each estimator's correlation with the true error); `random`, the
    /// plan's share of high-precision tokens drawn at random (the lower bound).
    #[arg(long, value_enum, default_value_t = SelectArg::Estimator)]
    pub select: SelectArg,
}

/// `--select`: what DP-LLM's per-token decisions follow.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SelectArg {
    /// The plan's error estimators (DP-LLM).
    #[default]
    Estimator,
    /// The true error (upper bound).
    Oracle,
    /// A random split with the plan's fractions (lower bound).
    Random,
}

impl SelectArg {
    /// The engine's selector.
    pub fn selector(self) -> Selector {
        match self {
            SelectArg::Estimator => Selector::Estimator,
            SelectArg::Oracle => Selector::Oracle,
            SelectArg::Random => Selector::Random { seed: 0 },
        }
    }

    /// The method's name in results and reports.
    pub fn method(self) -> &'static str {
        match self {
            SelectArg::Estimator => "dp-llm",
            SelectArg::Oracle => "oracle",
            SelectArg::Random => "random",
        }
    }
}

impl BitsArg {
    /// The plan file these arguments name, if any.
    pub fn plan_path(&self, dir: &Path) -> anyhow::Result<Option<PathBuf>> {
        if let Some(p) = &self.plan {
            return Ok(Some(p.clone()));
        }
        let Some(target) = self.target else {
            return Ok(None);
        };
        let kind = if self.static_plan {
            PlanKind::Static
        } else {
            PlanKind::Dynamic
        };
        Ok(Some(find_plan(dir, self.budget, target, kind)?))
    }
}

/// A model loaded for the precision arguments, and the precision they ask for.
pub struct Loaded<B: Backend = dpllm_engine::CpuBackend> {
    /// The model, with the planes the precision needs.
    pub served: ServedModel<B>,
    /// Uniform bits, highest precision, or a plan.
    pub precision: RunPrecision<B>,
}

impl<B: Backend> Loaded<B> {
    /// The model.
    pub fn model(&self) -> &Arc<Model<B>> {
        self.served.model()
    }

    /// The DP-LLM or static plan, if one runs.
    pub fn plan(&self) -> Option<&RuntimePlan<B>> {
        self.precision.plan()
    }

    /// A session at this precision with room for `capacity` positions.
    pub fn session(&self, capacity: usize) -> anyhow::Result<Session<B>> {
        Ok(self.served.session(self.precision.clone(), capacity)?)
    }
}

/// Load onto `backend` only the weights the precision arguments need.
pub fn load_model<B: Backend>(backend: B, dir: &Path, bits: &BitsArg) -> anyhow::Result<Loaded<B>> {
    let dir = crate::model_dir(&dir.to_path_buf())?.clone();
    if let Some(b) = bits.bits {
        if !(3..=8).contains(&b) {
            anyhow::bail!("--bits {b} is out of range (any-precision models run at 3..=8 bits)");
        }
    }
    if let Some(path) = bits.plan_path(&dir)? {
        let served = ServedModel::load_for_plan_file_on(backend, &dir, &path)?;
        let mut rp = served.plan(&PlanKey::File(path.clone()))?;
        if bits.select != SelectArg::Estimator && rp.kind() != PlanKind::Dynamic {
            anyhow::bail!(
                "--select {} needs a DP-LLM plan; {} is a static plan",
                bits.select.method(),
                path.display()
            );
        }
        if bits.exact_estimator_input || bits.select != SelectArg::Estimator {
            let mut p = (*rp).clone();
            p.async_estimation &= !bits.exact_estimator_input;
            p.selector = bits.select.selector();
            rp = Arc::new(p);
        }
        return Ok(Loaded {
            served,
            precision: RunPrecision::Plan(rp),
        });
    }
    if bits.select != SelectArg::Estimator {
        anyhow::bail!(
            "--select {} needs a DP-LLM plan (--target or --plan)",
            bits.select.method()
        );
    }
    let served = ServedModel::load_on(backend, &dir, None, bits.bits)?;
    let precision = bits
        .bits
        .map_or(RunPrecision::Highest, RunPrecision::Uniform);
    Ok(Loaded { served, precision })
}

/// Load a model onto `backend` (as `bits` asks) and its tokenizer, reporting
/// the load time on stderr.
pub fn load<B: Backend>(
    backend: B,
    dir: &Path,
    bits: &BitsArg,
) -> anyhow::Result<(Loaded<B>, TextTokenizer)> {
    let dir = crate::model_dir(&dir.to_path_buf())?.clone();
    let t = std::time::Instant::now();
    let loaded = load_model(backend, &dir, bits)?;
    let model = loaded.model();
    let tok =
        TextTokenizer::from_dir(&dir, model.config.bos_token_id, &model.config.eos_token_ids)?;
    let precision = match (loaded.plan(), model.bits_range()) {
        (Some(p), _) => format!(
            ", {} plan: target {:.2} bits, budget {:.2} bits",
            if p.plan.kind == PlanKind::Static {
                "static"
            } else {
                "DP-LLM"
            },
            p.plan.target_bits,
            p.plan.budget_bits
        ),
        (None, Some((_, max))) => format!(", any-precision at {} bits", bits.bits.unwrap_or(max)),
        (None, None) => String::new(),
    };
    eprintln!(
        "loaded {} ({}, {} layers{precision}) on {} in {:.2}s",
        dir.display(),
        model.config.arch.hf_name(),
        model.config.num_layers,
        model.backend.name(),
        t.elapsed().as_secs_f64()
    );
    Ok((loaded, tok))
}
