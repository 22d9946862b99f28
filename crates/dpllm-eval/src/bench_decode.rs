//! Decode benchmark: tokens per second and the fraction of memory bandwidth reached.

use std::sync::Arc;

use dpllm_engine::sampler::{Sampler, SamplingParams};
use dpllm_engine::session::DecodeOptions;
use dpllm_engine::{Backend, Model, RunPrecision, Session};
use serde::Serialize;

use crate::bandwidth::Bandwidth;

/// Settings of a decode benchmark.
#[derive(Debug, Clone, Serialize)]
pub struct DecodeBenchConfig {
    /// Prompt length (synthetic token ids).
    pub prompt_tokens: usize,
    /// Tokens decoded and timed.
    pub decode_tokens: usize,
    /// Untimed decode steps first.
    pub warmup_tokens: usize,
    /// Size of each bandwidth-test buffer in bytes.
    pub bandwidth_bytes: usize,
    /// Sampling temperature of the decoded tokens (0: greedy), seed 0.
    pub temperature: f32,
    /// Top-k filter of the draws (0: off).
    pub top_k: usize,
    /// Top-p filter of the draws (1: off).
    pub top_p: f32,
    /// Choose every token on the host from logits read back (the reference
    /// for the backend's own greedy or temperature choice).
    pub sample_on_host: bool,
}

impl Default for DecodeBenchConfig {
    fn default() -> Self {
        DecodeBenchConfig {
            prompt_tokens: 64,
            decode_tokens: 64,
            warmup_tokens: 4,
            bandwidth_bytes: 512 << 20,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            sample_on_host: false,
        }
    }
}

impl DecodeBenchConfig {
    /// How the decoded tokens are chosen (seed 0).
    pub fn sampling(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            ..Default::default()
        }
    }

    /// Check the settings against a model context of `max_ctx` positions and the
    /// memory available (before loading anything).
    pub fn check(&self, max_ctx: usize) -> anyhow::Result<()> {
        if self.decode_tokens == 0 {
            anyhow::bail!("--tokens must be at least 1");
        }
        self.sampling().validate()?;
        let total = self
            .prompt_tokens
            .max(1)
            .checked_add(self.warmup_tokens)
            .and_then(|t| t.checked_add(self.decode_tokens));
        match total {
            Some(t) if t <= max_ctx => {}
            _ => anyhow::bail!(
                "--prompt-tokens {} + {} warm-up + --tokens {} exceed the model's context of {max_ctx} positions",
                self.prompt_tokens,
                self.warmup_tokens,
                self.decode_tokens
            ),
        }
        crate::memory::ensure_fits(
            crate::memory::product(&[self.bandwidth_bytes as u128, 2]),
            "the bandwidth test buffers (--bandwidth-mib)",
        )
    }
}

/// Results of a decode benchmark.
#[derive(Debug, Clone, Serialize)]
pub struct DecodeBench {
    /// Settings used.
    pub config: DecodeBenchConfig,
    /// The backend the model ran on ("cpu (avx2)", "cuda:0 (...)"); the
    /// report's `device` field describes the machine.
    pub backend: String,
    /// Decode steps were recorded once and replayed as graphs (CUDA).
    pub graphs: bool,
    /// Model directory.
    pub model: String,
    /// Storage type of the weights.
    pub weights: String,
    /// Prefill speed, tokens/s.
    pub prefill_tokens_per_sec: f64,
    /// Decode speed, tokens/s.
    pub decode_tokens_per_sec: f64,
    /// Median time per decoded token, ms.
    pub ms_per_token_median: f64,
    /// Weight bytes read per decoded token (at the precisions actually used).
    pub weight_bytes_per_token: usize,
    /// Effective bits of the decoded tokens (quantized models).
    pub effective_bits: Option<f64>,
    /// Estimator multiply-adds as a fraction of the linears' (DP-LLM plans).
    pub estimator_overhead: Option<f64>,
    /// What estimation and selection cost in time, against a static plan
    /// that decides alike ([`with_selection_cost`]; synthetic plans).
    pub selection: Option<SelectionCost>,
    /// Weight bytes per token × tokens/s, GB/s.
    pub achieved_gbs: f64,
    /// Measured machine bandwidth.
    pub bandwidth: Bandwidth,
    /// achieved / measured copy bandwidth.
    pub fraction_of_copy_bandwidth: f64,
    /// achieved / measured read bandwidth.
    pub fraction_of_read_bandwidth: f64,
    /// Threads.
    pub threads: usize,
}

/// Run the benchmark: prefill a synthetic prompt, then time greedy decoding at
/// `precision` (under a plan: prefill at maximum precision, per-token
/// selection); `bw` is the bandwidth of the model's device, measured by the caller.
pub fn run<B: Backend>(
    model: Arc<Model<B>>,
    precision: RunPrecision<B>,
    cfg: &DecodeBenchConfig,
    bw: Bandwidth,
) -> anyhow::Result<DecodeBench> {
    cfg.check(model.config.max_position_embeddings)?;
    let vocab = model.config.vocab_size as u64;
    let prompt: Vec<u32> = (0..cfg.prompt_tokens.max(1) as u64)
        .map(|i| ((i * 7919 + 13) % vocab) as u32)
        .collect();
    let total = prompt.len() + cfg.warmup_tokens + cfg.decode_tokens;
    let weights = match precision.plan() {
        Some(p) => format!(
            "{:?} plan, target {:.2}, budget {:.2}",
            p.plan.kind, p.plan.target_bits, p.plan.budget_bits
        )
        .to_lowercase(),
        None => match (&precision, model.bits_range()) {
            (RunPrecision::Uniform(b), _) => format!("anyprec {b}-bit"),
            (_, Some((_, max))) => format!("anyprec {max}-bit"),
            (_, None) => model
                .blocks
                .first()
                .and_then(|b| b.linears().first().map(|(_, l)| l.storage().to_string()))
                .unwrap_or_default(),
        },
    };
    let has_plan = precision.plan().is_some();
    let mut session = Session::new(model.clone(), precision, total)?;
    let mut sampler = Sampler::new(cfg.sampling())?;
    // Every decoded token is fed back: warm-up steps, then the timed ones.
    let opts = DecodeOptions {
        max_tokens: cfg.warmup_tokens + cfg.decode_tokens + 1,
        stop_tokens: Vec::new(),
        warmup_steps: cfg.warmup_tokens,
        sample_on_host: cfg.sample_on_host,
    };
    let g = session.generate(&prompt, &mut sampler, &opts, |_| Ok(true))?;
    let stats = session.stats();
    let tps = g.decode_tokens_per_sec();
    let mut times = g.step_secs.clone();
    times.sort_by(|a, b| a.total_cmp(b));
    let median = times.get(times.len() / 2).copied().unwrap_or(0.0);
    let bytes = model.weight_bytes_per_token(stats) as usize;
    let achieved = bytes as f64 * tps / 1e9;
    Ok(DecodeBench {
        config: cfg.clone(),
        backend: model.backend.name(),
        graphs: model.backend.captures_graphs(),
        model: model.dir.display().to_string(),
        weights,
        prefill_tokens_per_sec: prompt.len() as f64 / g.prefill_secs,
        decode_tokens_per_sec: tps,
        ms_per_token_median: median * 1e3,
        weight_bytes_per_token: bytes,
        effective_bits: stats.effective_bits(),
        estimator_overhead: has_plan.then(|| stats.estimator_overhead()),
        selection: None,
        achieved_gbs: achieved,
        fraction_of_copy_bandwidth: achieved / bw.copy_gbs,
        fraction_of_read_bandwidth: achieved / bw.read_gbs,
        threads: rayon::current_num_threads(),
        bandwidth: bw,
    })
}

/// DP-LLM's estimation and selection in time: a dynamic plan's decode
/// against a static plan that runs every linear at the precision the
/// dynamic plan's decisions pick, so both do the same GEMV work and the
/// difference is what estimating and choosing costs.
#[derive(Debug, Clone, Serialize)]
pub struct SelectionCost {
    /// Rounds timed, dynamic and static alternating.
    pub rounds: usize,
    /// The static plan's median ms/token (the best round).
    pub static_ms_per_token: f64,
    /// The static plan's effective bits (equal to the dynamic plan's when
    /// they decide alike).
    pub static_effective_bits: Option<f64>,
    /// (dynamic − static) / dynamic median ms/token, best rounds of each.
    pub share_of_decode: f64,
}

/// [`run`] of `dynamic` and `fixed` (a static plan deciding as `dynamic`
/// does) alternating for `rounds` rounds: the dynamic plan's best round
/// (lowest median ms/token), with [`SelectionCost`] from the best rounds of
/// both. An error when their effective bits differ (they do not decide alike).
pub fn with_selection_cost<B: Backend>(
    model: Arc<Model<B>>,
    (dynamic, fixed): (RunPrecision<B>, RunPrecision<B>),
    cfg: &DecodeBenchConfig,
    bw: Bandwidth,
    rounds: usize,
) -> anyhow::Result<DecodeBench> {
    let best = |a: Option<DecodeBench>, b: DecodeBench| match a {
        Some(a) if a.ms_per_token_median <= b.ms_per_token_median => a,
        _ => b,
    };
    let (mut dyn_best, mut static_best) = (None, None);
    for _ in 0..rounds.max(1) {
        dyn_best = Some(best(
            dyn_best,
            run(model.clone(), dynamic.clone(), cfg, bw.clone())?,
        ));
        static_best = Some(best(
            static_best,
            run(model.clone(), fixed.clone(), cfg, bw.clone())?,
        ));
    }
    let (mut d, s) = (dyn_best.unwrap(), static_best.unwrap());
    let alike = match (d.effective_bits, s.effective_bits) {
        (Some(a), Some(b)) => (a - b).abs() < 1e-9,
        (a, b) => a == b,
    };
    if !alike {
        anyhow::bail!(
            "the static reference plan decodes at {:?} effective bits, the dynamic plan at {:?}: \
             they do not decide alike, so their difference is not the selection's cost",
            s.effective_bits,
            d.effective_bits
        );
    }
    d.selection = Some(SelectionCost {
        rounds: rounds.max(1),
        static_ms_per_token: s.ms_per_token_median,
        static_effective_bits: s.effective_bits,
        share_of_decode: (d.ms_per_token_median - s.ms_per_token_median)
            / d.ms_per_token_median.max(f64::MIN_POSITIVE),
    });
    Ok(d)
}

impl DecodeBench {
    /// A human-readable table with units.
    pub fn table(&self) -> String {
        let rows = [
            ("model", self.model.clone()),
            ("backend", self.backend.clone()),
            (
                "decode steps",
                if self.graphs {
                    "replayed as graphs"
                } else {
                    "op by op"
                }
                .to_string(),
            ),
            ("weights", self.weights.clone()),
            ("threads", self.threads.to_string()),
            (
                "prompt / decoded tokens",
                format!(
                    "{} / {}",
                    self.config.prompt_tokens, self.config.decode_tokens
                ),
            ),
            (
                "prefill",
                format!("{:.1} tok/s", self.prefill_tokens_per_sec),
            ),
            ("decode", format!("{:.2} tok/s", self.decode_tokens_per_sec)),
            (
                "decode latency (median)",
                format!("{:.2} ms/token", self.ms_per_token_median),
            ),
            (
                "weight bytes per token",
                format!("{:.2} MB", self.weight_bytes_per_token as f64 / 1e6),
            ),
            (
                "effective bits (decode)",
                self.effective_bits
                    .map_or("-".into(), |b| format!("{b:.3}")),
            ),
            (
                "estimator work / linear work",
                self.estimator_overhead
                    .map_or("-".into(), |o| format!("{:.2} %", 100.0 * o)),
            ),
            (
                "estimation + selection",
                self.selection.as_ref().map_or("-".into(), |c| {
                    format!(
                        "{:.1} % of decode time (static plan deciding alike: {:.2} ms/token)",
                        100.0 * c.share_of_decode,
                        c.static_ms_per_token
                    )
                }),
            ),
            (
                "achieved weight bandwidth",
                format!("{:.2} GB/s", self.achieved_gbs),
            ),
            (
                "machine copy bandwidth (r+w)",
                format!("{:.2} GB/s", self.bandwidth.copy_gbs),
            ),
            (
                "machine read bandwidth",
                format!("{:.2} GB/s", self.bandwidth.read_gbs),
            ),
            (
                "fraction of copy bandwidth",
                format!("{:.1} %", 100.0 * self.fraction_of_copy_bandwidth),
            ),
            (
                "fraction of read bandwidth",
                format!("{:.1} %", 100.0 * self.fraction_of_read_bandwidth),
            ),
        ];
        let w = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
        rows.iter()
            .map(|(k, v)| format!("{k:<w$}  {v}\n"))
            .collect()
    }
}
