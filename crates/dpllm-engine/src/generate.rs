//! Text generation on a [`Session`]: the prompt's ids in, streamed text out.

use crate::backend::Backend;
use crate::error::{EngineError, Result};
use crate::sampler::{Sampler, SamplingParams};
use crate::select::BitStats;
use crate::session::{DecodeOptions, Session, StopReason};
use crate::tokenizer::{TextTokenizer, TokenStream};

/// Options of one generation request (its precision is the session's).
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// Maximum new tokens.
    pub max_tokens: usize,
    /// Sampling settings.
    pub sampling: SamplingParams,
    /// Stop at an end-of-sequence token.
    pub stop_at_eos: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_tokens: 128,
            sampling: SamplingParams::default(),
            stop_at_eos: true,
        }
    }
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

/// Generate from `prompt` (token ids) in `session`; `on_text` receives text pieces as they are completed.
pub fn generate<B: Backend>(
    session: &mut Session<B>,
    tok: &TextTokenizer,
    prompt: &[u32],
    opts: &GenerateOptions,
    mut on_text: impl FnMut(&str),
) -> Result<Generation> {
    let max_ctx = session.capacity();
    if prompt.len() >= max_ctx {
        return Err(EngineError::ContextFull {
            have: 0,
            add: prompt.len(),
            capacity: max_ctx,
        });
    }
    let mut sampler = Sampler::new(opts.sampling.clone())?;
    let mut stream = TokenStream::new(tok);
    let mut text = String::new();
    let decode = DecodeOptions {
        max_tokens: opts.max_tokens,
        stop_tokens: if opts.stop_at_eos {
            tok.eos_ids().to_vec()
        } else {
            Vec::new()
        },
        warmup_steps: 0,
        sample_on_host: false,
    };
    let g = session.generate(prompt, &mut sampler, &decode, |id| {
        if let Some(piece) = stream.push(id)? {
            on_text(&piece);
            text.push_str(&piece);
        }
        Ok(true)
    })?;
    if let Some(piece) = stream.finish()? {
        on_text(&piece);
        text.push_str(&piece);
    }
    Ok(Generation {
        decode_secs: g.decode_secs(),
        tokens: g.tokens,
        text,
        prompt_tokens: g.prompt_tokens,
        prefill_secs: g.prefill_secs,
        stop: g.stop,
        decode_bits: session.stats().clone(),
    })
}
