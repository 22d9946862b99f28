//! The library's front door: a model loaded once ([`ServedModel`], for a memory
//! budget, with its plans cached by target) and one [`Session`] per request,
//! with its own KV cache, precision and cancellation. `generate`, `perplexity`,
//! `bench decode`, `pipeline` and the server all run through it.

mod served;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

pub use served::{find_plan, resolve_budget, PlanKey, ServedModel};

use crate::backend::cpu::CpuBackend;
use crate::backend::Backend;
use crate::error::{EngineError, Result};
use crate::kv_cache::KvCache;
use crate::model::{Next, Readout};
use crate::sampler::Sampler;
use crate::select::{BitStats, Precision, RuntimePlan};
use crate::Model;

/// The precision a request runs at, chosen per request (never stored on the weights).
#[derive(Debug)]
pub enum RunPrecision<B: Backend = CpuBackend> {
    /// Every quantized linear at the highest precision loaded; dense models as stored.
    Highest,
    /// Every quantized linear at this many bits.
    Uniform(u32),
    /// A DP-LLM (or static) plan: a prompt runs every linear at its maximum m_l,
    /// each decoded or scored token picks per linear.
    Plan(Arc<RuntimePlan<B>>),
}

impl<B: Backend> Clone for RunPrecision<B> {
    fn clone(&self) -> Self {
        match self {
            RunPrecision::Highest => RunPrecision::Highest,
            RunPrecision::Uniform(b) => RunPrecision::Uniform(*b),
            RunPrecision::Plan(p) => RunPrecision::Plan(p.clone()),
        }
    }
}

impl<B: Backend> RunPrecision<B> {
    /// Precision of a prompt (prefill) call.
    pub fn prefill(&self) -> Precision<'_, B> {
        match self {
            RunPrecision::Highest => Precision::Highest,
            RunPrecision::Uniform(b) => Precision::Uniform(*b),
            RunPrecision::Plan(p) => Precision::Max(p),
        }
    }

    /// Precision of decoded tokens, and of every token when scoring a text.
    pub fn per_token(&self) -> Precision<'_, B> {
        match self {
            RunPrecision::Plan(p) => Precision::Dynamic(p),
            _ => self.prefill(),
        }
    }

    /// The plan, when one runs.
    pub fn plan(&self) -> Option<&RuntimePlan<B>> {
        match self {
            RunPrecision::Plan(p) => Some(p),
            _ => None,
        }
    }
}

/// A flag that stops a session at its next step; clones share the flag.
#[derive(Clone, Debug, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    /// Ask the session to stop.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    /// True once cancelled.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// One request's state: its KV cache, precision, counters and cancellation.
pub struct Session<B: Backend = CpuBackend> {
    model: Arc<Model<B>>,
    precision: RunPrecision<B>,
    cache: KvCache<B>,
    stats: BitStats,
    cancel: CancelToken,
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// An end-of-sequence token was sampled.
    Eos,
    /// `max_tokens` reached.
    MaxTokens,
    /// The KV cache (the context window) is full.
    ContextFull,
    /// The caller stopped it (its token callback returned false).
    Caller,
}

/// Settings of the decode loop.
#[derive(Debug, Clone)]
pub struct DecodeOptions {
    /// Maximum new tokens.
    pub max_tokens: usize,
    /// Tokens that end the generation (not included in the output).
    pub stop_tokens: Vec<u32>,
    /// Decode steps excluded from the timing and the precision counters (benchmark warm-up).
    pub warmup_steps: usize,
    /// Read back the logits every step and choose on the host even where
    /// the backend could choose (greedy, plain temperature): the reference
    /// that `bench decode --sample-on-host` measures the device's choice against.
    pub sample_on_host: bool,
}

/// Token ids a decode loop produced and how long it took.
#[derive(Debug, Clone)]
pub struct TokenGeneration {
    /// New token ids (without the prompt and without the stop token).
    pub tokens: Vec<u32>,
    /// Prompt length.
    pub prompt_tokens: usize,
    /// Seconds of the prompt's forward pass.
    pub prefill_secs: f64,
    /// Seconds of every timed decode step (after the warm-up).
    pub step_secs: Vec<f64>,
    /// Why it stopped.
    pub stop: StopReason,
}

impl TokenGeneration {
    /// Seconds of the timed decode steps.
    pub fn decode_secs(&self) -> f64 {
        self.step_secs.iter().sum()
    }

    /// Timed decode steps per second (0 without any).
    pub fn decode_tokens_per_sec(&self) -> f64 {
        let s = self.decode_secs();
        if s > 0.0 {
            self.step_secs.len() as f64 / s
        } else {
            0.0
        }
    }
}

impl<B: Backend> Session<B> {
    /// A session on `model` at `precision`, caching at most `capacity` positions
    /// (at most the model's context window).
    pub fn new(
        model: Arc<Model<B>>,
        precision: RunPrecision<B>,
        capacity: usize,
    ) -> Result<Session<B>> {
        model.check_precision(precision.per_token())?;
        let capacity = capacity.min(model.config.max_position_embeddings);
        let cache = model.new_cache(capacity);
        let stats = model.new_bit_stats();
        Ok(Session {
            model,
            precision,
            cache,
            stats,
            cancel: CancelToken::default(),
        })
    }

    /// The model.
    pub fn model(&self) -> &Model<B> {
        &self.model
    }

    /// The precision of this session.
    pub fn precision(&self) -> &RunPrecision<B> {
        &self.precision
    }

    /// A handle that cancels this session from another thread.
    pub fn cancel_token(&self) -> CancelToken {
        self.cancel.clone()
    }

    /// Positions cached.
    pub fn len(&self) -> usize {
        self.cache.len()
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.cache.is_empty()
    }

    /// Positions the cache can hold.
    pub fn capacity(&self) -> usize {
        self.cache.capacity()
    }

    /// Forget the cached positions (the precision counters are kept).
    pub fn reset(&mut self) {
        self.cache.clear();
    }

    /// Precisions of the per-token calls so far (decode steps and scored tokens).
    pub fn stats(&self) -> &BitStats {
        &self.stats
    }

    /// Zero the precision counters.
    pub fn reset_stats(&mut self) {
        self.stats = self.model.new_bit_stats();
    }

    fn check_cancel(&self) -> Result<()> {
        if self.cancel.is_cancelled() {
            return Err(EngineError::Cancelled);
        }
        Ok(())
    }

    /// Run a prompt at the prefill precision; returns the last position's logits.
    pub fn prefill(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        self.prefill_next(tokens, Readout::Logits)?.into_logits()
    }

    /// [`Session::prefill`] handing back what `readout` asks for.
    pub fn prefill_next(&mut self, tokens: &[u32], readout: Readout) -> Result<Next> {
        self.check_cancel()?;
        let prec = self.precision.prefill();
        self.model
            .forward_next_with(tokens, &mut self.cache, prec, None, readout)
    }

    /// Run one decoded token at the per-token precision (counted); returns its logits.
    pub fn decode_step(&mut self, token: u32) -> Result<Vec<f32>> {
        self.decode_next(token, Readout::Logits)?.into_logits()
    }

    /// [`Session::decode_step`] handing back what `readout` asks for.
    pub fn decode_next(&mut self, token: u32, readout: Readout) -> Result<Next> {
        self.check_cancel()?;
        self.model.forward_next_with(
            &[token],
            &mut self.cache,
            self.precision.per_token(),
            Some(&mut self.stats),
            readout,
        )
    }

    /// One decode step of each session, in one forward call
    /// ([`crate::Model::decode_batch`]): `(session, token, readout)` on one
    /// model, each token at its session's per-token precision and counted
    /// into its counters; each session's logits or next token (as its
    /// readout asks), in order. On an error no cache has changed (a
    /// cancelled session is an error before any work).
    pub fn decode_batch(batch: &mut [(&mut Session<B>, u32, Readout)]) -> Result<Vec<Next>> {
        let Some(model) = batch.first().map(|(s, ..)| s.model.clone()) else {
            return Ok(Vec::new());
        };
        for (s, ..) in batch.iter() {
            s.check_cancel()?;
            if !Arc::ptr_eq(&s.model, &model) {
                return Err(EngineError::Device(
                    "sessions of different models cannot share a batch".into(),
                ));
            }
        }
        let mut steps: Vec<crate::model::BatchStep<'_, '_, B>> = batch
            .iter_mut()
            .map(|(s, token, readout)| {
                let Session {
                    precision,
                    cache,
                    stats,
                    ..
                } = &mut **s;
                crate::model::BatchStep {
                    token: *token,
                    cache,
                    prec: precision.per_token(),
                    stats: Some(stats),
                    readout: *readout,
                }
            })
            .collect();
        model.decode_batch(&mut steps)
    }

    /// Run `tokens` at the per-token precision (counted), every token selecting as a
    /// decoded one would ("prefill by decode"); returns the final normed hidden
    /// states [n × hidden] for [`Model::logits`].
    pub fn score(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        self.check_cancel()?;
        self.model.forward_hidden_with(
            tokens,
            &mut self.cache,
            self.precision.per_token(),
            Some(&mut self.stats),
        )
    }

    /// The decode loop: prefill `prompt`, then pick each next token with `sampler`
    /// until a stop token, `max_tokens`, a full cache, or `on_token` returning false.
    /// `on_token` sees every kept token as soon as it is chosen.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        sampler: &mut Sampler,
        opts: &DecodeOptions,
        mut on_token: impl FnMut(u32) -> Result<bool>,
    ) -> Result<TokenGeneration> {
        if self.cache.len() + prompt.len() > self.cache.capacity() {
            return Err(EngineError::ContextFull {
                have: self.cache.len(),
                add: prompt.len(),
                capacity: self.cache.capacity(),
            });
        }
        let mut history = prompt.to_vec();
        // Greedy and plain temperature choices are made where the logits are:
        // only the id comes back. A device draw takes the sampler's random
        // number for the token when the call is made, as sampling would after.
        let t0 = Instant::now();
        let readout = |s: &mut Sampler| match opts.sample_on_host {
            true => Readout::Logits,
            false => Readout::for_sampler(s),
        };
        let mut chosen = self.prefill_next(prompt, readout(sampler))?;
        let prefill_secs = t0.elapsed().as_secs_f64();
        let mut out = Vec::new();
        let mut step_secs = Vec::new();
        let mut stop = StopReason::MaxTokens;
        for step in 0..opts.max_tokens {
            let next = match &mut chosen {
                Next::Token(t) => *t,
                Next::Logits(logits) => sampler.sample(logits, &history),
            };
            if opts.stop_tokens.contains(&next) {
                stop = StopReason::Eos;
                break;
            }
            out.push(next);
            history.push(next);
            if !on_token(next)? {
                stop = StopReason::Caller;
                break;
            }
            if step + 1 == opts.max_tokens {
                break;
            }
            if self.cache.len() + 1 > self.cache.capacity() {
                stop = StopReason::ContextFull;
                break;
            }
            if step == opts.warmup_steps && opts.warmup_steps > 0 {
                self.reset_stats();
            }
            let t = Instant::now();
            chosen = self.decode_next(next, readout(sampler))?;
            if step >= opts.warmup_steps {
                step_secs.push(t.elapsed().as_secs_f64());
            }
        }
        Ok(TokenGeneration {
            tokens: out,
            prompt_tokens: prompt.len(),
            prefill_secs,
            step_secs,
            stop,
        })
    }
}
