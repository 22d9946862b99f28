//! The forward pass, written once against [`Backend`]: embeddings, blocks with
//! KV cache, final norm, logits. Nothing leaves the backend until the logits:
//! finiteness checks and per-token precision counts are kept in backend
//! buffers ([`Deferred`]) and read once, after the output.

use crate::backend::{AttnShape, Backend, Step};
use crate::error::Result;
use crate::kv_cache::KvCache;
use crate::linear::Linear;
use crate::EngineError;

use super::{Block, GateUpProj, Model, QkvProj};
use crate::select::{run_linear, BitStats, LinearSelect, Precision, Tally};

/// Scratch activations of one forward call over `n` tokens.
struct Scratch<B: Backend> {
    xn: B::Buf,
    q: B::Buf,
    k: B::Buf,
    v: B::Buf,
    att: B::Buf,
    out: B::Buf,
    gate: B::Buf,
    up: B::Buf,
    /// Estimator input of q/k/v or gate/up under asynchronous estimation.
    xe: B::Buf,
    /// Residual stream before the previous sub-block's output was added.
    h_prev: B::Buf,
}

/// What a forward call reads back once, after its output.
pub(super) struct Deferred<B: Backend> {
    /// Per checked stage (the attention and MLP output of each layer): the
    /// first token holding a NaN or infinity, +inf when none.
    flags: B::Buf,
    /// Per-token precision counts, when the caller counts bits under a dynamic plan.
    tally: Option<Tally<B>>,
}

impl<B: Backend> Deferred<B> {
    /// Buffers for the checks of `layers` layers and, with `count_linears`,
    /// the counts of that many linears.
    pub(super) fn new(be: &B, layers: usize, count_linears: Option<usize>) -> Result<Self> {
        Ok(Deferred {
            flags: be.zeros(2 * layers)?,
            tally: count_linears.map(|n| Tally::new(be, n)).transpose()?,
        })
    }

    /// Queue the reset of the checks and counts (the first op of a forward call).
    fn reset(&mut self, be: &B) {
        be.fill(&mut self.flags, f32::INFINITY);
        if let Some(t) = &mut self.tally {
            t.reset(be);
        }
    }

    /// Read the checks (an error naming the first stage that went non-finite)
    /// and the counts into `stats`.
    pub(super) fn finish(&self, be: &B, stats: Option<&mut BitStats>) -> Result<()> {
        let flags = be.read(&self.flags)?;
        if let Some((slot, &t)) = flags.iter().enumerate().find(|(_, t)| t.is_finite()) {
            let what = if slot % 2 == 0 {
                "attention output"
            } else {
                "MLP output"
            };
            return Err(EngineError::NonFinite {
                stage: format!("layer {} ({what})", slot / 2),
                token: t as usize,
            });
        }
        match (&self.tally, stats) {
            (Some(t), Some(s)) => t.finish(be, s),
            _ => Ok(()),
        }
    }
}

/// Per-call selection state of one block.
struct BlockRun<'a, 'b, B: Backend> {
    be: &'a B,
    prec: Precision<'a, B>,
    sels: Option<&'a [LinearSelect<B>]>,
    stats: Option<&'b mut BitStats>,
    deferred: &'b mut Deferred<B>,
    /// Global index of the block's first linear (for the counters).
    offset: usize,
    n: usize,
}

impl<B: Backend> BlockRun<'_, '_, B> {
    /// Run linear `i` of the block on `x`, estimating from `xe`.
    fn run(
        &mut self,
        i: usize,
        lin: &Linear<B>,
        x: &B::Buf,
        xe: &B::Buf,
        y: &mut B::Buf,
    ) -> Result<()> {
        let sel = self.sels.map(|v| &v[i]);
        run_linear(
            self.be,
            lin,
            self.prec,
            sel,
            x,
            xe,
            self.n,
            y,
            self.offset + i,
            self.stats.as_deref_mut(),
            self.deferred.tally.as_mut(),
        )
    }

    /// Run a fused linear (`parts` consecutive outputs per token) and split its output.
    fn run_fused(
        &mut self,
        i: usize,
        lin: &Linear<B>,
        x: &B::Buf,
        xe: &B::Buf,
        parts: &mut [&mut B::Buf],
    ) -> Result<()> {
        let mut fused = self.be.zeros(self.n * lin.out_features())?;
        self.run(i, lin, x, xe, &mut fused)?;
        self.be.split_columns(&fused, self.n, parts);
        Ok(())
    }

    /// True when the asynchronous estimator input is needed for linears `range`.
    fn wants_async(&self, range: std::ops::Range<usize>) -> bool {
        match (self.prec, self.sels) {
            (Precision::Dynamic(p), Some(s)) => {
                p.async_estimation && s[range].iter().any(LinearSelect::selects)
            }
            _ => false,
        }
    }
}

impl<B: Backend> Model<B> {
    /// Check that `tokens` can be appended to `cache`.
    pub(super) fn check_input(&self, tokens: &[u32], cache: &KvCache<B>) -> Result<()> {
        if tokens.is_empty() {
            return Err(EngineError::EmptyInput);
        }
        if let Some(&t) = tokens
            .iter()
            .find(|&&t| t as usize >= self.config.vocab_size)
        {
            return Err(EngineError::TokenOutOfRange {
                token: t,
                vocab: self.config.vocab_size,
            });
        }
        if cache.len() + tokens.len() > cache.capacity() {
            return Err(EngineError::ContextFull {
                have: cache.len(),
                add: tokens.len(),
                capacity: cache.capacity(),
            });
        }
        Ok(())
    }

    /// Counters for every quantized linear of this model, in model order.
    pub fn new_bit_stats(&self) -> BitStats {
        BitStats::new(self.config.linears().iter().map(|s| s.size()).collect())
    }

    /// Process `tokens` after the positions already in `cache`; returns the final
    /// normed hidden states [n × hidden] on the host and extends the cache.
    pub fn forward_hidden(&self, tokens: &[u32], cache: &mut KvCache<B>) -> Result<Vec<f32>> {
        self.forward_hidden_with(tokens, cache, Precision::Highest, None)
    }

    /// [`Model::forward_hidden`] with a precision mode, counting the bits used into `stats`.
    pub fn forward_hidden_with(
        &self,
        tokens: &[u32],
        cache: &mut KvCache<B>,
        prec: Precision<'_, B>,
        mut stats: Option<&mut BitStats>,
    ) -> Result<Vec<f32>> {
        let before = cache.len();
        let r = (|| {
            let (h, deferred) = self.forward_queued(tokens, cache, prec, stats.as_deref_mut())?;
            let out = self.backend.download(h);
            deferred.finish(&self.backend, stats).and(out)
        })();
        Self::keep_or_undo(cache, before, r)
    }

    /// [`Model::forward_device`] over `tokens` after the cached positions, with
    /// new read-back buffers: the hidden states and what to read once they are.
    fn forward_queued(
        &self,
        tokens: &[u32],
        cache: &mut KvCache<B>,
        prec: Precision<'_, B>,
        stats: Option<&mut BitStats>,
    ) -> Result<(B::Buf, Deferred<B>)> {
        let mut deferred = self.new_deferred(prec, stats.is_some())?;
        let step = self.backend.step(tokens, cache.len())?;
        let h = self.forward_device(&step, cache, prec, stats, &mut deferred)?;
        Ok((h, deferred))
    }

    /// The read-back buffers of a forward call at `prec` (counting bits when `counting`).
    pub(super) fn new_deferred(&self, prec: Precision<'_, B>, counting: bool) -> Result<Deferred<B>> {
        let linears = (counting && matches!(prec, Precision::Dynamic(_)))
            .then(|| self.config.linears().len());
        Deferred::new(&self.backend, self.blocks.len(), linears)
    }

    /// The forward pass of `step` on the backend: final normed hidden states
    /// [n × hidden]; the checks and counts for `stats` go to `deferred`, read
    /// once the output is. Every op is queued on the backend, so a backend can
    /// record the call as a graph.
    pub(super) fn forward_device(
        &self,
        step: &Step<B::StepData>,
        cache: &mut KvCache<B>,
        prec: Precision<'_, B>,
        mut stats: Option<&mut BitStats>,
        deferred: &mut Deferred<B>,
    ) -> Result<B::Buf> {
        let tokens = &step.tokens;
        self.check_input(tokens, cache)?;
        self.check_precision(prec)?;
        if step.pos0 != cache.len() {
            return Err(EngineError::Device(format!(
                "a forward call at position {} after {} cached positions",
                step.pos0,
                cache.len()
            )));
        }
        let (be, c) = (&self.backend, &self.config);
        deferred.reset(be);
        let n = tokens.len();
        let d = c.hidden_size;
        let mut h = be.zeros(n * d)?;
        be.embed(&self.embed, step, &mut h);
        let mut s = Scratch {
            xn: be.zeros(n * d)?,
            q: be.zeros(n * c.q_dim())?,
            k: be.zeros(n * c.kv_dim())?,
            v: be.zeros(n * c.kv_dim())?,
            att: be.zeros(n * c.q_dim())?,
            out: be.zeros(n * d)?,
            gate: be.zeros(n * c.intermediate_size)?,
            up: be.zeros(n * c.intermediate_size)?,
            xe: be.zeros(n * d)?,
            h_prev: be.zeros(0)?,
        };
        let mut offset = 0;
        for (l, block) in self.blocks.iter().enumerate() {
            let sels = match prec {
                Precision::Highest | Precision::Uniform(_) => None,
                Precision::Max(p) | Precision::Dynamic(p) => Some(p.blocks[l].as_slice()),
            };
            let mut run = BlockRun {
                be,
                prec,
                sels,
                stats: stats.as_deref_mut(),
                deferred,
                offset,
                n,
            };
            self.block_forward(l, block, &mut h, (cache, step), &mut s, &mut run)?;
            offset += block.linears().len();
        }
        cache.advance(n);
        let mut out = be.zeros(n * d)?;
        be.rms_norm(&h, &self.final_norm, c.rms_norm_eps, &mut out);
        Ok(out)
    }

    fn block_forward(
        &self,
        l: usize,
        b: &Block<B>,
        h: &mut B::Buf,
        (cache, step): (&mut KvCache<B>, &Step<B::StepData>),
        s: &mut Scratch<B>,
        run: &mut BlockRun<'_, '_, B>,
    ) -> Result<()> {
        let (be, c) = (&self.backend, &self.config);
        let eps = c.rms_norm_eps;
        let nq = match &b.qkv {
            QkvProj::Separate { .. } => 3,
            QkvProj::Fused(_) => 1,
        };
        be.rms_norm(h, &b.attn_norm, eps, &mut s.xn);
        // q/k/v estimators read the previous block's residual before its MLP output
        // (normed with this block's norm); the first block has no such input.
        let qkv_async = l > 0 && run.wants_async(0..nq);
        if qkv_async {
            be.rms_norm(&s.h_prev, &b.attn_norm, eps, &mut s.xe);
        }
        let xe: &B::Buf = if qkv_async { &s.xe } else { &s.xn };
        match &b.qkv {
            QkvProj::Separate { q, k, v } => {
                run.run(0, q, &s.xn, xe, &mut s.q)?;
                run.run(1, k, &s.xn, xe, &mut s.k)?;
                run.run(2, v, &s.xn, xe, &mut s.v)?;
            }
            QkvProj::Fused(f) => {
                run.run_fused(0, f, &s.xn, xe, &mut [&mut s.q, &mut s.k, &mut s.v])?
            }
        }
        if let Some((qn, kn)) = &b.qk_norm {
            be.rms_norm_inplace(&mut s.q, qn, eps);
            be.rms_norm_inplace(&mut s.k, kn, eps);
        }
        let rot = self.rope.rot_dim();
        be.rope(
            &mut s.q,
            c.num_heads,
            c.head_dim,
            rot,
            step,
            &self.rope_table,
        );
        be.rope(
            &mut s.k,
            c.num_kv_heads,
            c.head_dim,
            rot,
            step,
            &self.rope_table,
        );
        cache.append(l, &s.k, &s.v, step)?;
        let shape = AttnShape {
            num_heads: c.num_heads,
            num_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            window: c.sliding_window,
        };
        be.attention(&s.q, cache.store(), l, step, shape, &mut s.att);
        run.run(nq, &b.o_proj, &s.att, &s.att, &mut s.out)?;
        let ngu = match &b.gate_up {
            GateUpProj::Separate { .. } => 2,
            GateUpProj::Fused(_) => 1,
        };
        let mlp_async = run.wants_async(nq + 1..nq + 1 + ngu);
        if mlp_async {
            // gate/up estimators: the residual before the attention output, normed with the MLP norm.
            be.rms_norm(h, &b.mlp_norm, eps, &mut s.xe);
        }
        be.add_checked(h, &s.out, c.hidden_size, &mut run.deferred.flags, 2 * l);

        be.rms_norm(h, &b.mlp_norm, eps, &mut s.xn);
        let xe: &B::Buf = if mlp_async { &s.xe } else { &s.xn };
        match &b.gate_up {
            GateUpProj::Separate { gate, up } => {
                run.run(nq + 1, gate, &s.xn, xe, &mut s.gate)?;
                run.run(nq + 2, up, &s.xn, xe, &mut s.up)?;
            }
            GateUpProj::Fused(f) => {
                run.run_fused(nq + 1, f, &s.xn, xe, &mut [&mut s.gate, &mut s.up])?
            }
        }
        be.swiglu(&mut s.gate, &s.up);
        run.run(nq + 1 + ngu, &b.down_proj, &s.gate, &s.gate, &mut s.out)?;
        // The next block's q/k/v estimators read this residual (before the MLP output).
        if l + 1 < self.blocks.len()
            && matches!(run.prec, Precision::Dynamic(p) if p.async_estimation)
        {
            be.copy(h, &mut s.h_prev);
        }
        be.add_checked(h, &s.out, c.hidden_size, &mut run.deferred.flags, 2 * l + 1);
        Ok(())
    }

    /// Logits [rows × vocab] of final hidden states `hidden` into `out`, on the backend.
    pub(super) fn logits_into(&self, hidden: &B::Buf, rows: usize, out: &mut B::Buf) {
        self.lm_head.forward(&self.backend, hidden, rows, None, out);
    }

    /// Logits read back from `out` after the forward call's deferred checks
    /// and counts (`deferred`, for `stats`); a non-finite logit is an error.
    pub(super) fn read_logits(
        &self,
        out: &B::Buf,
        deferred: Option<&Deferred<B>>,
        stats: Option<&mut BitStats>,
    ) -> Result<Vec<f32>> {
        let be = &self.backend;
        let vocab = self.config.vocab_size;
        let logits = be.read(out)?;
        if let Some(d) = deferred {
            d.finish(be, stats)?;
        }
        match logits.iter().position(|v| !v.is_finite()) {
            Some(i) => Err(EngineError::NonFinite {
                stage: "the logits (output layer)".into(),
                token: i / vocab.max(1),
            }),
            None => Ok(logits),
        }
    }

    /// Logits [rows × vocab] of final hidden states on the backend.
    fn logits_device(
        &self,
        hidden: &B::Buf,
        rows: usize,
        deferred: Option<&Deferred<B>>,
        stats: Option<&mut BitStats>,
    ) -> Result<Vec<f32>> {
        let mut out = self.backend.zeros(rows * self.config.vocab_size)?;
        self.logits_into(hidden, rows, &mut out);
        self.read_logits(&out, deferred, stats)
    }

    /// Logits [rows × vocab] for final hidden states [rows × hidden]; a non-finite logit is an error.
    pub fn logits(&self, hidden: &[f32]) -> Result<Vec<f32>> {
        let rows = hidden.len() / self.config.hidden_size;
        self.logits_device(&self.backend.upload(hidden)?, rows, None, None)
    }

    /// Process `tokens` and return the logits of the last one.
    pub fn forward_last(&self, tokens: &[u32], cache: &mut KvCache<B>) -> Result<Vec<f32>> {
        self.forward_last_with(tokens, cache, Precision::Highest, None)
    }

    /// [`Model::forward_last`] with a precision mode, counting the bits used into
    /// `stats`. A decode step (one token) on a backend that records graphs
    /// replays the cache's recorded step when it can (`super::graph`).
    pub fn forward_last_with(
        &self,
        tokens: &[u32],
        cache: &mut KvCache<B>,
        prec: Precision<'_, B>,
        mut stats: Option<&mut BitStats>,
    ) -> Result<Vec<f32>> {
        if let Some(r) = self.forward_graphed(tokens, cache, prec, stats.as_deref_mut()) {
            return r;
        }
        let before = cache.len();
        let r = (|| {
            let (h, deferred) = self.forward_queued(tokens, cache, prec, stats.as_deref_mut())?;
            let n = tokens.len();
            let last = match n {
                1 => h,
                _ => self.backend.rows(&h, self.config.hidden_size, n - 1, 1)?,
            };
            self.logits_device(&last, 1, Some(&deferred), stats)
        })();
        Self::keep_or_undo(cache, before, r)
    }

    /// Process `tokens` and return the logits of every position [n × vocab].
    pub fn forward_all(&self, tokens: &[u32], cache: &mut KvCache<B>) -> Result<Vec<f32>> {
        let before = cache.len();
        let r = (|| {
            let (h, deferred) = self.forward_queued(tokens, cache, Precision::Highest, None)?;
            self.logits_device(&h, tokens.len(), Some(&deferred), None)
        })();
        Self::keep_or_undo(cache, before, r)
    }

    /// `r`, and when it is an error the cache back at `before` positions: a
    /// failed call (a non-finite stage, an allocation) leaves no positions
    /// behind, in any layer.
    pub(super) fn keep_or_undo<T>(cache: &mut KvCache<B>, before: usize, r: Result<T>) -> Result<T> {
        if r.is_err() {
            cache.truncate(before);
        }
        r
    }
}
