//! Perplexity over non-overlapping chunks (the GPTQ / Any-Precision protocol).
//!
//! The token stream is cut into `len / ctx` chunks of exactly `ctx` tokens (the
//! tail is dropped); each chunk runs from an empty cache, and every position but
//! the last predicts the next token. Perplexity = exp(mean NLL over all
//! predictions).

use std::time::Instant;

use dpllm_engine::{Backend, Session};

use crate::fidelity::{Fidelity, FidelityAcc};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

/// Rows of logits materialized at once (bounds memory for large vocabularies).
const LOGIT_BLOCK: usize = 128;

/// Result of a perplexity run.
#[derive(Debug, Clone, Serialize)]
pub struct Perplexity {
    /// exp(mean negative log-likelihood).
    pub perplexity: f64,
    /// Mean negative log-likelihood (nats per token).
    pub mean_nll: f64,
    /// Chunks evaluated.
    pub chunks: usize,
    /// Tokens per chunk.
    pub ctx: usize,
    /// Next-token predictions scored.
    pub predictions: usize,
    /// Wall time in seconds.
    pub seconds: f64,
    /// Tokens processed per second.
    pub tokens_per_sec: f64,
    /// Σ bits·size·tokens / Σ size·tokens over the quantized linears (None for dense models).
    pub effective_bits: Option<f64>,
    /// Estimator multiply-adds as a fraction of the linear layers' (DP-LLM plans).
    pub estimator_overhead: Option<f64>,
    /// Per quantized linear (model order): average precision it ran at.
    pub linear_bits: Vec<f64>,
    /// KL divergence and top-1 agreement against a reference model, when one was given.
    pub fidelity: Option<Fidelity>,
    /// Per selecting linear, the estimator against the true error (oracle runs only).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub selection: Vec<LinearSelection>,
}

/// One linear's estimator against its true error on the evaluated tokens.
#[derive(Debug, Clone, Serialize)]
pub struct LinearSelection {
    /// Tensor-name prefix.
    pub name: String,
    /// Tokens compared.
    pub tokens: u64,
    /// Pearson correlation of estimate and true error.
    pub correlation: Option<f64>,
    /// Share of tokens where the estimate and the true error decide alike.
    pub agreement: Option<f64>,
    /// Share of tokens the estimator sends high.
    pub estimate_high: f64,
    /// Share of tokens the true error sends high.
    pub true_high: f64,
}

pub use dpllm_engine::loss::nll_sum;

/// Perplexity of the session's model on `tokens` with chunks of `ctx` tokens; at
/// most `max_chunks` chunks when given. Under a DP-LLM plan every token of a
/// chunk selects its precision per linear ("prefill by decode").
pub fn perplexity<B: Backend>(
    session: &mut Session<B>,
    tokens: &[u32],
    ctx: usize,
    max_chunks: Option<usize>,
    progress: bool,
) -> anyhow::Result<Perplexity> {
    perplexity_vs::<B, B>(session, None, tokens, ctx, max_chunks, progress)
}

/// [`perplexity`], also comparing every prediction with a `reference` session
/// (its own model and precision) on the same chunks: KL divergence and top-1 agreement.
/// Both sessions need room for `ctx` positions.
pub fn perplexity_vs<B: Backend, R: Backend>(
    session: &mut Session<B>,
    mut reference: Option<&mut Session<R>>,
    tokens: &[u32],
    ctx: usize,
    max_chunks: Option<usize>,
    progress: bool,
) -> anyhow::Result<Perplexity> {
    let model = session.model();
    if let Some(r) = reference.as_deref() {
        if r.model().config.vocab_size != model.config.vocab_size {
            anyhow::bail!(
                "the reference {} has a vocabulary of {}, the model {}",
                r.model().dir.display(),
                r.model().config.vocab_size,
                model.config.vocab_size
            );
        }
    }
    let mut acc = reference.as_ref().map(|_| FidelityAcc::default());
    if ctx < 2 {
        anyhow::bail!("--ctx must be at least 2 (got {ctx})");
    }
    let max_ctx = model.config.max_position_embeddings;
    if ctx > max_ctx {
        anyhow::bail!("--ctx {ctx} exceeds the model's context window of {max_ctx} tokens");
    }
    let capacities =
        std::iter::once(session.capacity()).chain(reference.as_deref().map(Session::capacity));
    for cap in capacities {
        if cap < ctx {
            anyhow::bail!("a session of {cap} positions cannot hold chunks of {ctx} tokens");
        }
    }
    let mut chunks = tokens.len() / ctx;
    if chunks == 0 {
        let n = tokens.len();
        anyhow::bail!(
            "the text has only {n} token{}, fewer than one chunk of --ctx {ctx}",
            if n == 1 { "" } else { "s" }
        );
    }
    if let Some(m) = max_chunks {
        chunks = chunks.min(m.max(1));
    }
    let bar = if progress {
        ProgressBar::new(chunks as u64)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} perplexity [{bar:30}] {pos}/{len} chunks {msg} ({eta} left)",
        )
        .unwrap()
        .progress_chars("=> "),
    );
    let vocab = model.config.vocab_size;
    let d = model.config.hidden_size;
    let t0 = Instant::now();
    let mut total = 0f64;
    let mut count = 0usize;
    session.reset_stats();
    for c in 0..chunks {
        let chunk = &tokens[c * ctx..(c + 1) * ctx];
        session.reset();
        let hidden = session
            .score(chunk)
            .map_err(|e| anyhow::anyhow!("chunk {c}: {e}"))?;
        let ref_hidden = match reference.as_deref_mut() {
            Some(r) => {
                r.reset();
                Some(
                    r.score(chunk)
                        .map_err(|e| anyhow::anyhow!("reference, chunk {c}: {e}"))?,
                )
            }
            None => None,
        };
        for r0 in (0..ctx - 1).step_by(LOGIT_BLOCK) {
            let r1 = (r0 + LOGIT_BLOCK).min(ctx - 1);
            let logits = session
                .model()
                .logits(&hidden[r0 * d..r1 * d])
                .map_err(|e| anyhow::anyhow!("chunk {c}, positions {r0}..{r1}: {e}"))?;
            total += nll_sum(&logits, vocab, &chunk[r0 + 1..r1 + 1]);
            if let (Some(r), Some(rh), Some(acc)) =
                (reference.as_deref(), &ref_hidden, acc.as_mut())
            {
                let rl = r
                    .model()
                    .logits(&rh[r0 * d..r1 * d])
                    .map_err(|e| anyhow::anyhow!("reference, chunk {c}: {e}"))?;
                acc.add(&logits, &rl, vocab, &chunk[r0 + 1..r1 + 1]);
            }
            count += r1 - r0;
        }
        match session.stats().effective_bits() {
            Some(b) => bar.set_message(format!(
                "ppl {:.3}, {b:.3} bits",
                (total / count as f64).exp()
            )),
            None => bar.set_message(format!("ppl {:.3}", (total / count as f64).exp())),
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    let seconds = t0.elapsed().as_secs_f64();
    let stats = session.stats();
    let mean_nll = total / count as f64;
    Ok(Perplexity {
        perplexity: mean_nll.exp(),
        mean_nll,
        chunks,
        ctx,
        predictions: count,
        seconds,
        tokens_per_sec: (chunks * ctx) as f64 / seconds,
        effective_bits: stats.effective_bits(),
        estimator_overhead: session
            .precision()
            .plan()
            .is_some()
            .then(|| stats.estimator_overhead()),
        linear_bits: (0..stats.sizes.len())
            .filter_map(|i| stats.linear_bits(i))
            .collect(),
        fidelity: match (acc, reference) {
            (Some(a), Some(r)) => Some(a.finish(r.model().dir.display().to_string())),
            _ => None,
        },
        selection: session
            .model()
            .config
            .linears()
            .iter()
            .zip(&stats.selection)
            .filter(|(_, d)| d.tokens > 0)
            .map(|(spec, d)| LinearSelection {
                name: spec.prefix.clone(),
                tokens: d.tokens,
                correlation: d.correlation(),
                agreement: d.agreement(),
                estimate_high: d.estimate_high as f64 / d.tokens as f64,
                true_high: d.true_high as f64 / d.tokens as f64,
            })
            .collect(),
    })
}
