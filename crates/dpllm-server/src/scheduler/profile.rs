//! What the loaded model offers ([`ModelInfo`]), the precision of each point,
//! and the start-up latency profile: a short greedy decode at every point.

use dpllm_engine::sampler::{Sampler, SamplingParams};
use dpllm_engine::session::{DecodeOptions, PlanKey};
use dpllm_engine::{Backend, EngineError, Precision, RunPrecision, ServedModel};
use dpllm_format::plan::{available_targets, budget_dir, PlanKind};

use super::{Latency, ModelInfo, OperatingPoint, Point};
use crate::config::ServerConfig;

/// Prompt tokens of a profiling run.
const PROFILE_PROMPT: usize = 8;
/// Decode steps of a profiling run left out of its timing.
const PROFILE_WARMUP: usize = 2;

/// What `served` offers under `cfg`; an error when the default operating
/// point is not among it.
pub(super) fn model_info<B: Backend>(
    served: &ServedModel<B>,
    cfg: &ServerConfig,
) -> Result<ModelInfo, EngineError> {
    let m = served.model();
    let bits = match m.bits_range() {
        Some(_) => (3..=8)
            .filter(|&b| m.check_precision(Precision::Uniform(b)).is_ok())
            .collect(),
        None => Vec::new(),
    };
    let targets = served
        .budget()
        .map(|b| available_targets(&budget_dir(&m.dir, b), PlanKind::Dynamic))
        .unwrap_or_default();
    let (mut sum, mut size) = (0f64, 0f64);
    for block in &m.blocks {
        for (_, lin) in block.linears() {
            if let Some((_, max)) = lin.bits_range() {
                let n = (lin.in_features() * lin.out_features()) as f64;
                sum += max as f64 * n;
                size += n;
            }
        }
    }
    let default = match cfg.default_point {
        OperatingPoint::Default => OperatingPoint::Highest,
        p => p,
    };
    let info = ModelInfo {
        name: cfg.model_name.clone(),
        context: m.config.max_position_embeddings,
        vocab: m.config.vocab_size,
        budget: served.budget(),
        bits,
        highest_bits: (size > 0.0).then(|| sum / size),
        targets,
        default,
    };
    info.check(default, cfg.profile_tokens > 0)
        .map_err(|e| EngineError::Plan(format!("the default operating point: {}", e.message)))?;
    Ok(info)
}

/// The precision `point` runs at on `served`.
pub(super) fn precision<B: Backend>(
    served: &ServedModel<B>,
    point: Point,
) -> Result<RunPrecision<B>, EngineError> {
    Ok(match point {
        Point::Highest => RunPrecision::Highest,
        Point::Bits(b) => RunPrecision::Uniform(b),
        Point::Target(t) => RunPrecision::Plan(served.plan(&PlanKey::Target {
            target: t,
            kind: PlanKind::Dynamic,
        })?),
    })
}

/// Decode latency of every point `info` lists: the median of `tokens` greedy
/// steps after a short prompt (none when `tokens` is 0).
pub(super) fn measure<B: Backend>(
    served: &ServedModel<B>,
    info: &ModelInfo,
    tokens: usize,
) -> Result<Vec<Latency>, EngineError> {
    if tokens == 0 {
        return Ok(Vec::new());
    }
    let vocab = served.model().config.vocab_size as u64;
    let prompt: Vec<u32> = (0..PROFILE_PROMPT as u64)
        .map(|i| ((i * 7919 + 11) % vocab) as u32)
        .collect();
    let opts = DecodeOptions {
        max_tokens: tokens + PROFILE_WARMUP,
        stop_tokens: Vec::new(),
        warmup_steps: PROFILE_WARMUP,
        sample_on_host: false,
    };
    let mut out = Vec::new();
    for point in info.points() {
        let mut s = served.session(precision(served, point)?, prompt.len() + opts.max_tokens)?;
        let mut greedy = Sampler::new(SamplingParams::default())?;
        let g = s.generate(&prompt, &mut greedy, &opts, |_| Ok(true))?;
        let mut steps = g.step_secs;
        if steps.is_empty() {
            continue;
        }
        steps.sort_by(f64::total_cmp);
        let ms = steps[steps.len() / 2] * 1000.0;
        tracing::info!(
            "latency profile: {} decodes at {ms:.2} ms/token",
            point.label()
        );
        out.push(Latency {
            point,
            ms_per_token: ms,
        });
    }
    Ok(out)
}
