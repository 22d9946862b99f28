//! `dpllm bench ...`.

use std::path::PathBuf;

use clap::Subcommand;
use dpllm_engine::backend::cpu::bitplane::BitplaneKernel;
use std::sync::Arc;

use dpllm_engine::model::synthetic::{synthetic_config, synthetic_plan, SyntheticWeights};
use dpllm_engine::{Backend, Model, RunPrecision};
use dpllm_eval::bandwidth::Bandwidth;
use dpllm_eval::bench_decode::{self, DecodeBenchConfig};
use dpllm_eval::bench_gemv::{self, GemvBenchConfig};
use dpllm_format::plan::PlanKind;

/// Benchmarks.
#[derive(Subcommand)]
pub enum BenchCommand {
    /// Decode speed (tokens/s) and the fraction of the measured memory bandwidth it reaches.
    Decode(DecodeArgs),
    /// GEMV through a single linear: bit-plane weights at each precision versus
    /// dense f16/f32 (on a GPU: cuBLAS f16 at 1..8 tokens), time per call and
    /// effective GB/s against the bandwidth measured in the same run.
    Gemv(GemvArgs),
    /// The server under load: N concurrent streaming clients for a bounded
    /// time against `dpllm serve` started in this process; per operating
    /// point, throughput, time to first token and per-token latency percentiles.
    Serve(super::bench_serve::Args),
    /// Precision fine-tuning (calibration step 2b) on random weights of a
    /// known model's shapes: time per step at two depths, extrapolated to the
    /// full model and to the paper's 5000 steps.
    Finetune(super::bench_finetune::Args),
}

/// Arguments of `bench gemv`.
#[derive(clap::Args)]
pub struct GemvArgs {
    /// cpu, or cuda / cuda:N for the GPU kernels against cuBLAS.
    #[arg(long, default_value = "cpu")]
    pub device: dpllm_engine::Device,
    /// Tokens per call on a GPU, each 1..=8 (the CPU benchmark times one token).
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    pub tokens: Vec<usize>,
    /// Timed calls per case on a GPU.
    #[arg(long, default_value_t = 200)]
    pub calls: usize,
    /// On a GPU, also time the bit-plane kernel with these warps a block
    /// (1..=16; they split a 16-row tile's columns); default: the built-in choice only.
    #[arg(long, value_delimiter = ',')]
    pub warps: Vec<u32>,
    /// On a GPU, also time the bit-plane kernel with each 16-row tile split
    /// over this many blocks (split-K, 1..=4; each adds its part of the
    /// columns and the tile's last block sums them), on the layers that can
    /// (fewer tiles than multiprocessors); default: the built-in choice only
    /// (`DPLLM_CUDA_SPLIT_K=1` turns split-K on there).
    #[arg(long, value_delimiter = ',')]
    pub splits: Vec<u32>,
    /// On a GPU, also time the bit-plane kernel with this many 16-row tiles a
    /// block (1..=4; the warps split between them, those of one column block
    /// reading the same activations together; no split-K); default: 1.
    #[arg(long, value_delimiter = ',')]
    pub tiles_per_block: Vec<u32>,
    /// On a GPU, also time the bit-plane kernel with these lookup tables, at
    /// the precisions that have them: regs (3 bits), pairs (3-4), entries
    /// (4-8), half-pairs (3-4: pairs with one copy for two lanes, half the
    /// shared memory); default: the built-in choice only.
    #[arg(long, value_delimiter = ',')]
    pub tables: Vec<String>,
    /// On a GPU, also time each bit-plane variant on f32 activations, as a
    /// GEMV whose input no op split ("-rows": the block splits them where
    /// they fit, else a separate launch does). The default cases read them
    /// split into f16 halves beforehand, as the forward pass's linears do
    /// (the norms, attention and SwiGLU leave them so).
    #[arg(long)]
    pub rows: bool,
    /// On a GPU, also time each bit-plane variant on f32 activations split
    /// into f16 halves by a separate launch where the GEMV block would split
    /// them itself ("-xs").
    #[arg(long)]
    pub split_launch: bool,
    /// Weight shapes ROWSxCOLS (default: the q/o, gate/up and down shapes of an
    /// 8B Llama, and docs-llama-12m's up projection).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "4096x4096,14336x4096,4096x14336,1024x384"
    )]
    pub shapes: Vec<String>,
    /// Precisions of the bit-plane weights. On a GPU, with 1 in --tokens,
    /// each b of 4..=8 also times DP-LLM's in-kernel choice between b - 1
    /// and b bits for one token, forced each way ("select-3/4").
    #[arg(long, value_delimiter = ',', default_value = "3,4,5,6,7,8")]
    pub bits: Vec<u32>,
    /// Bit-plane kernels to time: portable, avx2, avx2-i16, avx512, avx512-vbmi
    /// (default: every one this CPU has; an unknown name lists them).
    #[arg(long, value_delimiter = ',')]
    pub kernels: Vec<String>,
    /// Minimum timed seconds per case.
    #[arg(long, default_value_t = 0.3)]
    pub seconds: f64,
    /// Cycle through copies of each weight until this many MiB are read per round,
    /// so the caches cannot hold them (0: one copy, cache-resident for small shapes).
    #[arg(long, default_value_t = 512)]
    pub working_set_mib: usize,
    /// Size of each bandwidth-test buffer, MiB.
    #[arg(long, default_value_t = 512)]
    pub bandwidth_mib: usize,
    /// Write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// Parse "ROWSxCOLS" (each at most 2^24).
fn parse_shape(s: &str) -> anyhow::Result<(usize, usize)> {
    let bad = || {
        anyhow::anyhow!("--shapes: {s:?} is not ROWSxCOLS with sizes 1..=16777216 (e.g. 4096x4096)")
    };
    let (r, c) = s.split_once(['x', 'X']).ok_or_else(bad)?;
    let (r, c): (usize, usize) = (
        r.trim().parse().map_err(|_| bad())?,
        c.trim().parse().map_err(|_| bad())?,
    );
    if !(1..=1 << 24).contains(&r) || !(1..=1 << 24).contains(&c) {
        return Err(bad());
    }
    Ok((r, c))
}

/// Every `--shapes` entry, parsed.
fn parse_shapes(shapes: &[String]) -> anyhow::Result<Vec<(usize, usize)>> {
    shapes.iter().map(|s| parse_shape(s)).collect()
}

/// Print a benchmark's table and write its JSON where `--json` asks.
pub(super) fn publish(
    table: &str,
    json: Option<&std::path::Path>,
    r: &impl serde::Serialize,
) -> anyhow::Result<()> {
    print!("{table}");
    if let Some(p) = json {
        dpllm_eval::report::write_json(p, r)?;
    }
    Ok(())
}

/// MiB given on the command line, in bytes (checked).
fn mib(flag: &str, v: usize) -> anyhow::Result<usize> {
    v.checked_mul(1 << 20)
        .ok_or_else(|| anyhow::anyhow!("{flag} {v} is too large"))
}

/// Arguments of `bench decode`.
#[derive(clap::Args)]
pub struct DecodeArgs {
    #[command(flatten)]
    pub device: super::DeviceArg,
    /// Model directory (or --synthetic).
    #[arg(required_unless_present = "synthetic")]
    pub model: Option<PathBuf>,
    /// Instead of a model directory, random weights of a known model's shapes
    /// made on the device (no file needed): llama3-8b or smollm2-135m. With
    /// --bits B its linears are any-precision at B bits, else dense f16 (the
    /// reference line). With --target T (3 <= T < 8), a plan that runs a
    /// (T - ⌊T⌋) share of the layers at ⌊T⌋ + 1 bits and the rest at ⌊T⌋:
    /// fixed (--static), or chosen per token by DP-LLM's estimators and
    /// thresholds (set so every token of a layer decides the same way), to
    /// measure what the selection costs.
    #[arg(long, conflicts_with_all = ["model", "plan", "budget"])]
    pub synthetic: Option<String>,
    #[command(flatten)]
    pub bits: super::BitsArg,
    /// Prompt length in tokens (synthetic ids).
    #[arg(long, default_value_t = 64)]
    pub prompt_tokens: usize,
    /// Decoded tokens to time.
    #[arg(long, default_value_t = 64)]
    pub tokens: usize,
    /// With --synthetic and a DP-LLM --target: rounds of the dynamic plan and
    /// of the static plan that decides alike, alternating; the best round of
    /// each gives the share of decode time spent in estimation and selection.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub rounds: u32,
    /// Size of each bandwidth-test buffer, MiB.
    #[arg(long, default_value_t = 512)]
    pub bandwidth_mib: usize,
    /// Sampling temperature of the decoded tokens (0: greedy; seed 0). On a
    /// GPU the token is chosen there, filters included (one id read back a
    /// step).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Keep only the k most likely tokens before drawing (0: off).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens holding this probability (1: off).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Read back the logits every step and choose on the host: the reference
    /// for the device's own choice.
    #[arg(long)]
    pub sample_on_host: bool,
    /// Write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// Run a benchmark.
pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Serve(a) => super::bench_serve::run(a),
        BenchCommand::Finetune(a) => super::bench_finetune::run(a),
        BenchCommand::Decode(a) => {
            let inputs: Vec<&std::path::Path> = a.model.iter().map(PathBuf::as_path).collect();
            super::check_json(a.json.as_deref(), &inputs)?;
            let cfg = DecodeBenchConfig {
                prompt_tokens: a.prompt_tokens,
                decode_tokens: a.tokens,
                warmup_tokens: 4,
                bandwidth_bytes: mib("--bandwidth-mib", a.bandwidth_mib.max(1))?,
                temperature: a.temperature,
                top_k: a.top_k,
                top_p: a.top_p,
                sample_on_host: a.sample_on_host,
            };
            // Settings first: the context and memory they need, before the model loads.
            let config = match (&a.synthetic, &a.model) {
                (Some(name), _) => {
                    if let Some(b) = a.bits.bits.filter(|b| !(3..=8).contains(b)) {
                        anyhow::bail!(
                            "--bits {b} is out of range (any-precision models run at 3..=8 bits)"
                        );
                    }
                    if let Some(t) = a.bits.target.filter(|t| !(3.0..8.0).contains(t)) {
                        anyhow::bail!("--target {t} with --synthetic must lie in [3, 8)");
                    }
                    if a.bits.select != super::SelectArg::Estimator {
                        anyhow::bail!("--synthetic plans select by their estimators only");
                    }
                    synthetic_config(name)?
                }
                (None, Some(m)) => dpllm_format::ModelConfig::from_dir(crate::model_dir(m)?)?,
                (None, None) => {
                    anyhow::bail!("bench decode needs a model directory or --synthetic")
                }
            };
            cfg.check(config.max_position_embeddings)?;
            super::on_backend!(a.device.clone(), decode_on(a, cfg, config))
        }
        BenchCommand::Gemv(a) => {
            super::check_json(a.json.as_deref(), &[])?;
            if let dpllm_engine::Device::Cuda(ordinal) = a.device {
                return gemv_cuda(ordinal, a);
            }
            let kernels = if a.kernels.is_empty() {
                BitplaneKernel::available()
                    .iter()
                    .map(|k| k.name().to_string())
                    .collect()
            } else {
                a.kernels
            };
            let cfg = GemvBenchConfig {
                shapes: parse_shapes(&a.shapes)?,
                bits: a.bits,
                kernels,
                min_seconds: a.seconds,
                bandwidth_bytes: mib("--bandwidth-mib", a.bandwidth_mib.max(1))?,
                working_set_bytes: mib("--working-set-mib", a.working_set_mib)?,
            };
            let r = bench_gemv::run(&cfg)?;
            publish(&r.table(), a.json.as_deref(), &r)
        }
    }
}

/// `bench decode` on `backend` (of the model whose config is `config`),
/// against the bandwidth of its device.
fn decode_on<B: Backend>(
    backend: B,
    a: DecodeArgs,
    cfg: DecodeBenchConfig,
    config: dpllm_format::ModelConfig,
) -> anyhow::Result<()> {
    let bw = device_bandwidth(&backend, cfg.bandwidth_bytes)?;
    // A synthetic dynamic plan is timed against the static plan that decides
    // alike (its estimation and selection's share of decode time).
    let mut reference = None;
    let (model, precision) = match (&a.synthetic, &a.model) {
        (Some(name), _) => {
            let target = a.bits.target;
            let weights = match (a.bits.bits, target) {
                (Some(max_bits), _) => SyntheticWeights::AnyPrec { max_bits },
                (None, Some(t)) => SyntheticWeights::AnyPrec {
                    max_bits: t.floor() as u32 + 1,
                },
                (None, None) => SyntheticWeights::DenseF16,
            };
            eprintln!(
                "building {name} with random {weights:?} weights on {}",
                backend.name()
            );
            let m = Model::synthetic(backend, name, config, weights, 0)?;
            let p = match (a.bits.bits, target) {
                (Some(b), _) => RunPrecision::Uniform(b),
                (None, Some(t)) => {
                    let kind = if a.bits.static_plan {
                        PlanKind::Static
                    } else {
                        PlanKind::Dynamic
                    };
                    let async_est = !a.bits.exact_estimator_input;
                    if kind == PlanKind::Dynamic {
                        let fixed = synthetic_plan(&m, t, PlanKind::Static, async_est)?;
                        reference = Some(RunPrecision::Plan(Arc::new(fixed)));
                    }
                    RunPrecision::Plan(Arc::new(synthetic_plan(&m, t, kind, async_est)?))
                }
                (None, None) => RunPrecision::Highest,
            };
            (Arc::new(m), p)
        }
        (None, Some(dir)) => {
            let loaded = super::load_model(backend, dir, &a.bits)?;
            (loaded.model().clone(), loaded.precision.clone())
        }
        (None, None) => unreachable!("checked by the caller"),
    };
    let r = match reference {
        Some(fixed) => bench_decode::with_selection_cost(
            model,
            (precision, fixed),
            &cfg,
            bw,
            a.rounds as usize,
        )?,
        None => bench_decode::run(model, precision, &cfg, bw)?,
    };
    publish(&r.table(), a.json.as_deref(), &r)
}

/// The memory bandwidth of the device `backend` runs on.
fn device_bandwidth<B: Backend>(backend: &B, bytes: usize) -> anyhow::Result<Bandwidth> {
    #[cfg(feature = "cuda")]
    if let Some(gpu) =
        (backend as &dyn std::any::Any).downcast_ref::<dpllm_engine::backend::cuda::CudaBackend>()
    {
        return dpllm_eval::bandwidth::measure_cuda(gpu, bytes, 5);
    }
    let _ = backend;
    Ok(dpllm_eval::bandwidth::measure(bytes, 5))
}

/// `bench gemv --device cuda:N`.
#[cfg(feature = "cuda")]
fn gemv_cuda(ordinal: usize, a: GemvArgs) -> anyhow::Result<()> {
    use dpllm_eval::bench_gemv_cuda::{self, CudaGemvConfig};
    let cfg = CudaGemvConfig {
        shapes: parse_shapes(&a.shapes)?,
        bits: a.bits,
        tokens: a.tokens,
        working_set_bytes: mib("--working-set-mib", a.working_set_mib)?,
        calls: a.calls.max(1),
        warps: a.warps,
        splits: a.splits,
        tiles_per_block: a.tiles_per_block,
        tables: a
            .tables
            .iter()
            .map(|t| {
                t.parse()
                    .map_err(|e: String| anyhow::anyhow!("--tables: {e}"))
            })
            .collect::<anyhow::Result<_>>()?,
        rows: a.rows,
        split_launch: a.split_launch,
    };
    let r = bench_gemv_cuda::run(ordinal, &cfg)?;
    publish(&r.table(), a.json.as_deref(), &r)
}

/// `bench gemv --device cuda:N` in a build without CUDA.
#[cfg(not(feature = "cuda"))]
fn gemv_cuda(_: usize, _: GemvArgs) -> anyhow::Result<()> {
    anyhow::bail!("this dpllm was built without the cuda feature")
}
