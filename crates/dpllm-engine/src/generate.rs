//! The decoding loop: prefill the prompt, then sample token by token with streaming output.

use std::sync::Arc;
use std::time::Instant;

use crate::sampler::{Sampler, SamplingParams};
use crate::select::{BitStats, Precision, RuntimePlan};
use crate::tokenizer::{TextTokenizer, TokenStream};
use crate::Model;

/// Options of one generation request.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// Maximum new tokens.
    pub max_tokens: usize,
    /// Sampling settings.
    pub sampling: SamplingParams,
    /// Stop at an end-of-sequence token.
    pub stop_at_eos: bool,
    /// DP-LLM plan: the prompt runs every linear at its maximum precision, each
    /// decoded token selects per linear. None: the layers' fixed precision.
    pub plan: Option<Arc<RuntimePlan>>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions { max_tokens: 128, sampling: SamplingParams::default(), stop_at_eos: true, plan: None }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// An end-of-sequence token was sampled.
    Eos,
    /// `max_tokens` reached.
    MaxTokens,
    /// The model's context window is full.
    ContextFull,
}

/// What a generation produced and how fast.
#[derive(Debug, Clone)]
pub struct Generation {
    /// New token ids (without the prompt, without a final EOS).
    pub tokens: Vec<u32>,
    /// Decoded text of `tokens`.
    pub text: String,
    /// Prompt length in tokens.
    pub prompt_tokens: usize,
    /// Seconds spent on the prompt (prefill).
    pub prefill_secs: f64,
    /// Seconds spent decoding the new tokens.
    pub decode_secs: f64,
    /// Why it stopped.
    pub stop: StopReason,
    /// Precisions used while decoding (quantized models).
    pub decode_bits: BitStats,
}

impl Generation {
    /// Decode speed in tokens per second (tokens after the first, which prefill produces).
    pub fn decode_tokens_per_sec(&self) -> f64 {
        let n = self.tokens.len().saturating_sub(1).max(1) as f64;
        if self.decode_secs > 0.0 {
            n / self.decode_secs
        } else {
            0.0
        }
    }
}

/// Generate from `prompt` (token ids); `on_text` receives text pieces as they are completed.
pub fn generate(
    model: &Model,
    tok: &TextTokenizer,
    prompt: &[u32],
    opts: &GenerateOptions,
    mut on_text: impl FnMut(&str),
) -> anyhow::Result<Generation> {
    let max_ctx = model.config.max_position_embeddings;
    if prompt.len() >= max_ctx {
        anyhow::bail!("prompt of {} tokens does not fit the model's context of {max_ctx}", prompt.len());
    }
    let mut sampler = Sampler::new(opts.sampling.clone())?;
    let mut cache = model.new_cache(prompt.len().saturating_add(opts.max_tokens).min(max_ctx));
    let mut history = prompt.to_vec();
    let mut stream = TokenStream::new(tok);
    let mut out = Vec::new();
    let mut text = String::new();
    let (prefill_prec, decode_prec) = match opts.plan.as_deref() {
        Some(p) => (Precision::Max(p), Precision::Dynamic(p)),
        None => (Precision::Fixed, Precision::Fixed),
    };
    let mut decode_bits = model.new_bit_stats();
    let t0 = Instant::now();
    let mut logits = model.forward_last_with(prompt, &mut cache, prefill_prec, None)?;
    let prefill_secs = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let mut stop = StopReason::MaxTokens;
    for i in 0..opts.max_tokens {
        let next = sampler.sample(&mut logits, &history);
        if opts.stop_at_eos && tok.eos_ids().contains(&next) {
            stop = StopReason::Eos;
            break;
        }
        out.push(next);
        history.push(next);
        if let Some(piece) = stream.push(next)? {
            on_text(&piece);
            text.push_str(&piece);
        }
        if i + 1 == opts.max_tokens {
            break;
        }
        if cache.len() + 1 > cache.capacity() {
            stop = StopReason::ContextFull;
            break;
        }
        logits = model.forward_last_with(&[next], &mut cache, decode_prec, Some(&mut decode_bits))?;
    }
    if let Some(piece) = stream.finish()? {
        on_text(&piece);
        text.push_str(&piece);
    }
    Ok(Generation {
        tokens: out,
        text,
        prompt_tokens: prompt.len(),
        prefill_secs,
        decode_secs: t1.elapsed().as_secs_f64(),
        stop,
        decode_bits,
    })
}
