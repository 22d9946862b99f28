//! Decode benchmark: tokens per second and the fraction of memory bandwidth reached.

use std::time::Instant;

use dpllm_engine::{Model, Precision, RuntimePlan};
use serde::Serialize;

use crate::bandwidth::{self, Bandwidth};

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
}

impl Default for DecodeBenchConfig {
    fn default() -> Self {
        DecodeBenchConfig { prompt_tokens: 64, decode_tokens: 64, warmup_tokens: 4, bandwidth_bytes: 512 << 20 }
    }
}

impl DecodeBenchConfig {
    /// Check the settings against a model context of `max_ctx` positions and the
    /// memory available (before loading anything).
    pub fn check(&self, max_ctx: usize) -> anyhow::Result<()> {
        if self.decode_tokens == 0 {
            anyhow::bail!("--tokens must be at least 1");
        }
        let total = self.prompt_tokens.max(1).checked_add(self.warmup_tokens).and_then(|t| t.checked_add(self.decode_tokens));
        match total {
            Some(t) if t <= max_ctx => {}
            _ => anyhow::bail!(
                "--prompt-tokens {} + {} warm-up + --tokens {} exceed the model's context of {max_ctx} positions",
                self.prompt_tokens,
                self.warmup_tokens,
                self.decode_tokens
            ),
        }
        crate::memory::ensure_fits(crate::memory::product(&[self.bandwidth_bytes as u128, 2]), "the bandwidth test buffers (--bandwidth-mib)")
    }
}

/// Results of a decode benchmark.
#[derive(Debug, Clone, Serialize)]
pub struct DecodeBench {
    /// Settings used.
    pub config: DecodeBenchConfig,
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

/// Run the benchmark: measure bandwidth, prefill a synthetic prompt, then time
/// greedy decoding (under `plan`: prefill at maximum precision, per-token selection).
pub fn run(model: &Model, plan: Option<&RuntimePlan>, cfg: &DecodeBenchConfig) -> anyhow::Result<DecodeBench> {
    let (prefill_prec, decode_prec) = match plan {
        Some(p) => (Precision::Max(p), Precision::Dynamic(p)),
        None => (Precision::Fixed, Precision::Fixed),
    };
    cfg.check(model.config.max_position_embeddings)?;
    let mut stats = model.new_bit_stats();
    let bw = bandwidth::measure(cfg.bandwidth_bytes, 5);
    let vocab = model.config.vocab_size as u64;
    let prompt: Vec<u32> = (0..cfg.prompt_tokens.max(1) as u64).map(|i| ((i * 7919 + 13) % vocab) as u32).collect();
    let total = prompt.len() + cfg.warmup_tokens + cfg.decode_tokens;
    let mut cache = model.new_cache(total);
    let t = Instant::now();
    let mut logits = model.forward_last_with(&prompt, &mut cache, prefill_prec, None)?;
    let prefill = t.elapsed().as_secs_f64();
    let argmax = |l: &[f32]| l.iter().enumerate().fold((0, f32::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b }).0 as u32;
    let mut times = Vec::with_capacity(cfg.decode_tokens);
    for step in 0..cfg.warmup_tokens + cfg.decode_tokens {
        let next = argmax(&logits);
        let t = Instant::now();
        let timed = step >= cfg.warmup_tokens;
        logits = model.forward_last_with(&[next], &mut cache, decode_prec, if timed { Some(&mut stats) } else { None })?;
        if timed {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    let total_s: f64 = times.iter().sum();
    let tps = times.len() as f64 / total_s;
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let median = times.get(times.len() / 2).copied().unwrap_or(0.0);
    let bytes = model.weight_bytes_per_token(&stats) as usize;
    let achieved = bytes as f64 * tps / 1e9;
    Ok(DecodeBench {
        config: cfg.clone(),
        model: model.dir.display().to_string(),
        weights: match plan {
            Some(p) => format!("{:?} plan, target {:.2}, budget {:.2}", p.plan.kind, p.plan.target_bits, p.plan.budget_bits).to_lowercase(),
            None => model.blocks.first().and_then(|b| b.linears().first().map(|(_, l)| l.storage())).unwrap_or_default(),
        },
        prefill_tokens_per_sec: prompt.len() as f64 / prefill,
        decode_tokens_per_sec: tps,
        ms_per_token_median: median * 1e3,
        weight_bytes_per_token: bytes,
        effective_bits: stats.effective_bits(),
        estimator_overhead: plan.map(|_| stats.estimator_overhead()),
        achieved_gbs: achieved,
        fraction_of_copy_bandwidth: achieved / bw.copy_gbs,
        fraction_of_read_bandwidth: achieved / bw.read_gbs,
        threads: rayon::current_num_threads(),
        bandwidth: bw,
    })
}

impl DecodeBench {
    /// A human-readable table with units.
    pub fn table(&self) -> String {
        let rows = [
            ("model", self.model.clone()),
            ("weights", self.weights.clone()),
            ("threads", self.threads.to_string()),
            ("prompt / decoded tokens", format!("{} / {}", self.config.prompt_tokens, self.config.decode_tokens)),
            ("prefill", format!("{:.1} tok/s", self.prefill_tokens_per_sec)),
            ("decode", format!("{:.2} tok/s", self.decode_tokens_per_sec)),
            ("decode latency (median)", format!("{:.2} ms/token", self.ms_per_token_median)),
            ("weight bytes per token", format!("{:.2} MB", self.weight_bytes_per_token as f64 / 1e6)),
            ("effective bits (decode)", self.effective_bits.map_or("-".into(), |b| format!("{b:.3}"))),
            ("estimator work / linear work", self.estimator_overhead.map_or("-".into(), |o| format!("{:.2} %", 100.0 * o))),
            ("achieved weight bandwidth", format!("{:.2} GB/s", self.achieved_gbs)),
            ("machine copy bandwidth (r+w)", format!("{:.2} GB/s", self.bandwidth.copy_gbs)),
            ("machine read bandwidth", format!("{:.2} GB/s", self.bandwidth.read_gbs)),
            ("fraction of copy bandwidth", format!("{:.1} %", 100.0 * self.fraction_of_copy_bandwidth)),
            ("fraction of read bandwidth", format!("{:.1} %", 100.0 * self.fraction_of_read_bandwidth)),
        ];
        let w = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
        rows.iter().map(|(k, v)| format!("{k:<w$}  {v}\n")).collect()
    }
}
