//! The forward pass, written once against [`Backend`]: embeddings, blocks with
//! KV cache, final norm, logits. Nothing leaves the backend until the logits:
//! finiteness checks and per-token precision counts are kept in backend
//! buffers ([`Deferred`]) and read once, after the output.

use crate::backend::{AttnShape, Backend, EstInput, Estimator, InputNorms, RopeArgs, Step, SumSq};
use crate::error::Result;
use crate::kv_cache::KvCache;
use crate::linear::Linear;
use crate::sampler::Draw;
use crate::EngineError;

use super::{Block, GateUpProj, Model, QkvProj};
use crate::select::{
    count_decisions, run_linear, BitStats, LinearSelect, Precision, RowTally, Tally,
};

/// What a forward call hands back for its last position.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Readout {
    /// The logits, for any sampler.
    Logits,
    /// Only the argmax of the logits (greedy decoding): a device backend
    /// picks it there and copies back one id instead of the vocabulary's logits.
    Argmax,
    /// Only the token of this random draw from the logits (temperature,
    /// top-k, top-p: [`crate::sampler::Sampler::device_draw`]), drawn where
    /// the logits are, as [`crate::Backend::sample_rows`] does.
    Sample(crate::sampler::Draw),
}

impl Readout {
    /// What `sampler` needs of the next forward call: a draw made on the
    /// device when it can be, the argmax for greedy decoding, else the
    /// logits. Takes the sampler's random number for a device draw.
    pub fn for_sampler(sampler: &mut crate::sampler::Sampler) -> Readout {
        match sampler.device_draw() {
            Some(d) => Readout::Sample(d),
            None if sampler.is_argmax() => Readout::Argmax,
            None => Readout::Logits,
        }
    }
}

/// The output of a forward call, as its [`Readout`] asked.
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    /// The last position's logits [vocab].
    Logits(Vec<f32>),
    /// The last position's token, chosen on the backend (greedy or drawn).
    Token(u32),
}

impl Next {
    /// The logits (an error for a call that read back only a token).
    pub fn into_logits(self) -> Result<Vec<f32>> {
        match self {
            Next::Logits(l) => Ok(l),
            Next::Token(_) => Err(EngineError::Device(
                "a forward call read back a token where its logits were asked for".into(),
            )),
        }
    }
}

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
    /// Estimator input of q/k/v or gate/up under asynchronous estimation,
    /// when a JL estimator needs its rows.
    xe: B::Buf,
    /// Residual stream before the previous sub-block's output was added (for `xe`).
    h_prev: B::Buf,
    /// Per token, the norm of the last residual add's normed output (the
    /// exact estimator input of the linears after it) and of the normed
    /// residual before it (their asynchronous input): under a dynamic plan,
    /// left there by [`Backend::add_checked_norm`].
    norm_after: B::Buf,
    norm_before: B::Buf,
}

/// Where a linear (or a group: q/k/v, gate/up) finds its estimator input:
/// its rows where they were made, and what the norm regression reads of
/// them (their norms, or sums of squares) where a kernel left it.
struct EstSrc<'a, B: Backend> {
    rows: Option<&'a B::Buf>,
    norms: Option<EstInput<'a, B>>,
}

impl<'a, B: Backend> EstSrc<'a, B> {
    /// The rows, and their sums of squares when the kernel that made them left them.
    fn rows(rows: &'a B::Buf, sums: Option<&'a SumSq<B>>) -> Self {
        EstSrc {
            rows: Some(rows),
            norms: sums.map(SumSq::input),
        }
    }

    /// The input for `est`: the norms (or sums) when they are there and
    /// enough for it, else the rows.
    fn input(&self, est: Option<&Estimator<B>>) -> Result<EstInput<'a, B>> {
        match (self.norms, est) {
            (Some(n), Some(Estimator::None | Estimator::Linear { .. }) | None) => Ok(n),
            _ => self.rows.map(EstInput::Rows).ok_or_else(|| {
                EngineError::Device(
                    "an estimator needs its input's rows, which were not made".into(),
                )
            }),
        }
    }
}

/// The error for a NaN or an infinity in token `token`'s logits.
fn non_finite_logits(token: usize) -> EngineError {
    EngineError::NonFinite {
        stage: "the logits (output layer)".into(),
        token,
    }
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

/// The rows of a forward call that run their linears at one precision.
pub(super) struct Group<'a, B: Backend> {
    /// Their precision.
    pub(super) prec: Precision<'a, B>,
    /// The mask that picks them, when the call has other groups (None: every row).
    pub(super) pick: Option<B::Mask>,
    /// Their row indices in the call.
    pub(super) rows: Vec<usize>,
}

impl<'a, B: Backend> Group<'a, B> {
    /// Every row of a call at `prec`.
    fn all(prec: Precision<'a, B>) -> Self {
        Group {
            prec,
            pick: None,
            rows: Vec::new(),
        }
    }

    /// The selection rules of block `l` under this group's plan.
    fn sels(&self, l: usize) -> Option<&'a [LinearSelect<B>]> {
        sels_of(self.prec, l)
    }
}

/// The selection rules of block `l` under `prec` (None without a plan).
fn sels_of<B: Backend>(prec: Precision<'_, B>, l: usize) -> Option<&[LinearSelect<B>]> {
    match prec {
        Precision::Highest | Precision::Uniform(_) => None,
        Precision::Max(p) | Precision::Dynamic(p) => Some(p.blocks[l].as_slice()),
    }
}

/// One sequence of a forward call: its cache, its step (tokens and first
/// position) and its rows, with the mask that picks them when the call holds
/// other sequences too.
pub(super) struct Seq<'s, 'c, B: Backend> {
    pub(super) cache: &'c mut KvCache<B>,
    pub(super) step: &'s Step<B::StepData>,
    pub(super) row0: usize,
    pub(super) pick: Option<B::Mask>,
}

/// Where the precision counts of a forward call go.
pub(super) enum Counting<'b, B: Backend> {
    /// One set of counters for every row (or none).
    Whole(Option<&'b mut BitStats>),
    /// One per row (a batch of sessions' decode steps, one token each), with
    /// each group's device tally of its tokens' DP-LLM decisions (read once,
    /// after the call: no wait per linear and row).
    PerRow(&'b mut [BitStats], &'b mut [RowTally<B>]),
}

/// An estimator input of the rows of a call, taken out of its buffer.
struct OwnedInput<'a, B: Backend> {
    buf: B::Buf,
    /// The input it was taken from (its kind).
    like: EstInput<'a, B>,
}

impl<'a, B: Backend> OwnedInput<'a, B> {
    /// The rows of `input` (of `width` per row) that `mask` picks.
    fn gather(be: &B, input: EstInput<'a, B>, width: usize, mask: &B::Mask) -> Result<Self> {
        Ok(OwnedInput {
            buf: be.gather_rows(input.buf(), input.per_token(width), mask, true)?,
            like: input,
        })
    }

    fn input(&self) -> EstInput<'_, B> {
        self.like.with_buf(&self.buf)
    }
}

/// Per-call selection state of one block.
struct BlockRun<'a, 'g, 'b, B: Backend> {
    be: &'a B,
    groups: &'g [Group<'a, B>],
    /// The block's index.
    layer: usize,
    counting: Counting<'b, B>,
    deferred: &'b mut Deferred<B>,
    /// Global index of the block's first linear (for the counters).
    offset: usize,
    n: usize,
    /// Some group picks precisions per token (a dynamic plan whose linears
    /// are not all at one precision).
    selects: bool,
}

impl<B: Backend> BlockRun<'_, '_, '_, B> {
    /// Run linear `i` of the block on `x`, estimating from `xe`: once for
    /// each group of rows, each at its own precision.
    fn run(
        &mut self,
        i: usize,
        lin: &Linear<B>,
        x: &B::Buf,
        xe: &EstSrc<'_, B>,
        y: &mut B::Buf,
    ) -> Result<()> {
        let (be, idx) = (self.be, self.offset + i);
        let (cols, rows) = (lin.in_features(), lin.out_features());
        for (gi, g) in self.groups.iter().enumerate() {
            let sel = g.sels(self.layer).map(|v| &v[i]);
            let input = xe.input(sel.map(|s| &s.estimator))?;
            let (stats, tally) = match &mut self.counting {
                Counting::Whole(s) => (s.as_deref_mut(), self.deferred.tally.as_mut()),
                Counting::PerRow(..) => (None, None),
            };
            // The group's rows, gathered when the call holds other groups too.
            let picked = match &g.pick {
                None => None,
                Some(mask) => Some((
                    mask,
                    be.gather_rows(x, cols, mask, true)?,
                    OwnedInput::gather(be, input, cols, mask)?,
                )),
            };
            let group_input = picked.as_ref().map_or(input, |(_, _, ig)| ig.input());
            match &picked {
                None => run_linear(be, lin, g.prec, sel, x, input, self.n, y, idx, stats, tally)?,
                Some((mask, xg, _)) => {
                    let n = g.rows.len();
                    let mut yg = be.zeros(n * rows)?;
                    run_linear(
                        be,
                        lin,
                        g.prec,
                        sel,
                        xg,
                        group_input,
                        n,
                        &mut yg,
                        idx,
                        stats,
                        tally,
                    )?;
                    be.scatter_rows(&yg, rows, mask, true, y);
                }
            }
            if let Counting::PerRow(per_row, tallies) = &mut self.counting {
                let (rows, tally) = (&g.rows, &mut tallies[gi]);
                count_decisions(be, lin, g.prec, sel, group_input, idx, rows, per_row, tally)?;
            }
        }
        Ok(())
    }

    /// Run a fused linear (`parts` consecutive outputs per token) and split its output.
    fn run_fused(
        &mut self,
        i: usize,
        lin: &Linear<B>,
        x: &B::Buf,
        xe: &EstSrc<'_, B>,
        parts: &mut [&mut B::Buf],
    ) -> Result<()> {
        let mut fused = self.be.zeros(self.n * lin.out_features())?;
        self.run(i, lin, x, xe, &mut fused)?;
        self.be.split_columns(&fused, self.n, parts);
        Ok(())
    }

    /// True when some group needs the asynchronous estimator input for linears `range`.
    fn wants_async(&self, range: std::ops::Range<usize>) -> bool {
        (self.groups.iter()).any(|g| wants_async(g.prec, g.sels(self.layer), range.clone()))
    }

    /// True when some group needs that input as rows (a JL estimator).
    fn async_rows(&self, range: std::ops::Range<usize>) -> bool {
        any_async_rows(self.groups, self.layer, range)
    }

    /// True when the kernels that make estimator inputs leave their norms
    /// (or sums of squares): some group's plan picks precisions per token.
    fn wants_norms(&self) -> bool {
        self.selects
    }
}

/// True when some group of `groups` needs the asynchronous estimator input of
/// linears `range` of block `l` as rows.
fn any_async_rows<B: Backend>(
    groups: &[Group<'_, B>],
    l: usize,
    range: std::ops::Range<usize>,
) -> bool {
    (groups.iter()).any(|g| async_rows(g.prec, g.sels(l), range.clone()))
}

/// True when the asynchronous estimator input is needed for linears `range`
/// of a block whose rules are `sels`.
fn wants_async<B: Backend>(
    prec: Precision<'_, B>,
    sels: Option<&[LinearSelect<B>]>,
    range: std::ops::Range<usize>,
) -> bool {
    match (prec, sels) {
        (Precision::Dynamic(p), Some(s)) => {
            p.async_estimation && s[range].iter().any(LinearSelect::selects)
        }
        _ => false,
    }
}

/// True when the asynchronous estimator input of linears `range` must be made
/// as rows: a JL estimator among them needs more than its norm.
fn async_rows<B: Backend>(
    prec: Precision<'_, B>,
    sels: Option<&[LinearSelect<B>]>,
    range: std::ops::Range<usize>,
) -> bool {
    wants_async(prec, sels, range.clone())
        && sels.is_some_and(|s| {
            s[range]
                .iter()
                .any(|l| l.selects() && matches!(l.estimator, Estimator::Jl { .. }))
        })
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
    pub(super) fn new_deferred(
        &self,
        prec: Precision<'_, B>,
        counting: bool,
    ) -> Result<Deferred<B>> {
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
        stats: Option<&mut BitStats>,
        deferred: &mut Deferred<B>,
    ) -> Result<B::Buf> {
        self.check_input(&step.tokens, cache)?;
        self.check_precision(prec)?;
        if step.pos0 != cache.len() {
            return Err(EngineError::Device(format!(
                "a forward call at position {} after {} cached positions",
                step.pos0,
                cache.len()
            )));
        }
        let mut seqs = [Seq {
            cache,
            step,
            row0: 0,
            pick: None,
        }];
        let groups = [Group::all(prec)];
        self.forward_rows(step, &mut seqs, &groups, Counting::Whole(stats), deferred)
    }

    /// The forward pass of the tokens of `all` (checked by the caller), which
    /// belong to `seqs` (each with its cache and positions) and run their
    /// linears in `groups` (each at its precision): final normed hidden states
    /// [n × hidden]. Ops over every row run once; RoPE, the KV store and
    /// attention run per sequence, each linear once per group.
    pub(super) fn forward_rows(
        &self,
        all: &Step<B::StepData>,
        seqs: &mut [Seq<'_, '_, B>],
        groups: &[Group<'_, B>],
        mut counting: Counting<'_, B>,
        deferred: &mut Deferred<B>,
    ) -> Result<B::Buf> {
        let (be, c) = (&self.backend, &self.config);
        deferred.reset(be);
        let n = all.tokens.len();
        let d = c.hidden_size;
        let mut h = be.zeros(n * d)?;
        be.embed(&self.embed, all, &mut h);
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
            norm_after: be.zeros(n)?,
            norm_before: be.zeros(n)?,
        };
        // Each block starts from its input normed into s.xn, and norms its
        // output with the next block's norm (the last with the final norm)
        // in the kernel of its residual add.
        match self.blocks.first() {
            Some(b) => be.rms_norm(&h, &b.attn_norm, c.rms_norm_eps, &mut s.xn),
            None => be.rms_norm(&h, &self.final_norm, c.rms_norm_eps, &mut s.xn),
        }
        let selects = (groups.iter()).any(|g| match g.prec {
            Precision::Dynamic(p) => p.selects(),
            _ => false,
        });
        let mut offset = 0;
        for (l, block) in self.blocks.iter().enumerate() {
            // What the block leaves for the next: its input normed, and the
            // residual for asynchronous q/k/v estimators that need rows.
            let next = match self.blocks.get(l + 1) {
                Some(b) => (
                    &b.attn_norm,
                    any_async_rows(groups, l + 1, 0..b.qkv_linears()),
                ),
                None => (&self.final_norm, false),
            };
            let counting = match &mut counting {
                Counting::Whole(st) => Counting::Whole(st.as_deref_mut()),
                Counting::PerRow(per_row, tallies) => Counting::PerRow(per_row, tallies),
            };
            let mut run = BlockRun {
                be,
                groups,
                layer: l,
                counting,
                deferred,
                offset,
                n,
                selects,
            };
            self.block_forward(l, (block, next), &mut h, seqs, &mut s, &mut run)?;
            offset += block.linears().len();
        }
        for seq in seqs {
            seq.cache.advance(seq.step.tokens.len());
        }
        Ok(s.xn)
    }

    /// Block `l` on the residual stream `h`, its input normed in `s.xn`; its
    /// output normed with `next_norm` is left in `s.xn`, and with `next_rows`
    /// the residual before its MLP output in `s.h_prev`.
    fn block_forward(
        &self,
        l: usize,
        (b, (next_norm, next_rows)): (&Block<B>, (&B::Buf, bool)),
        h: &mut B::Buf,
        seqs: &mut [Seq<'_, '_, B>],
        s: &mut Scratch<B>,
        run: &mut BlockRun<'_, '_, '_, B>,
    ) -> Result<()> {
        let (be, c) = (&self.backend, &self.config);
        let eps = c.rms_norm_eps;
        let nq = b.qkv_linears();
        // q/k/v estimators read the previous block's residual before its MLP
        // output, normed with this block's norm (asynchronous), or xn; the
        // previous block's last add left both norms (none before the first).
        let norms = l > 0 && run.wants_norms();
        let qkv_async = l > 0 && run.wants_async(0..nq);
        let qkv_rows = l > 0 && run.async_rows(0..nq);
        if qkv_rows {
            be.rms_norm(&s.h_prev, &b.attn_norm, eps, &mut s.xe);
        }
        let xe = match (qkv_async, norms) {
            (true, _) => EstSrc {
                rows: qkv_rows.then_some(&s.xe),
                norms: Some(EstInput::Norms(&s.norm_before)),
            },
            (false, true) => EstSrc {
                rows: Some(&s.xn),
                norms: Some(EstInput::Norms(&s.norm_after)),
            },
            (false, false) => EstSrc::rows(&s.xn, None),
        };
        match &b.qkv {
            QkvProj::Separate { q, k, v } => {
                run.run(0, q, &s.xn, &xe, &mut s.q)?;
                run.run(1, k, &s.xn, &xe, &mut s.k)?;
                run.run(2, v, &s.xn, &xe, &mut s.v)?;
            }
            QkvProj::Fused(f) => {
                run.run_fused(0, f, &s.xn, &xe, &mut [&mut s.q, &mut s.k, &mut s.v])?
            }
        }
        if let Some((qn, kn)) = &b.qk_norm {
            be.rms_norm_inplace(&mut s.q, qn, eps);
            be.rms_norm_inplace(&mut s.k, kn, eps);
        }
        let mut att_sums = None;
        for seq in seqs.iter_mut() {
            self.attend(l, seq, s, run.wants_norms().then_some(&mut att_sums))?;
        }
        let xe = EstSrc::rows(&s.att, att_sums.as_ref());
        run.run(nq, &b.o_proj, &s.att, &xe, &mut s.out)?;
        let gu = nq + 1..nq + 1 + b.gate_up_linears();
        // gate/up estimators: the residual before the attention output, normed
        // with the MLP norm (asynchronous), or xn; the add leaves both norms.
        let mlp_async = run.wants_async(gu.clone());
        let mlp_rows = run.async_rows(gu.clone());
        if mlp_rows {
            be.rms_norm(h, &b.mlp_norm, eps, &mut s.xe);
        }
        let norms = run.wants_norms();
        self.add_norm(h, &b.mlp_norm, s, (run, 2 * l))?;
        let xe = match (mlp_async, norms) {
            (true, _) => EstSrc {
                rows: mlp_rows.then_some(&s.xe),
                norms: Some(EstInput::Norms(&s.norm_before)),
            },
            (false, true) => EstSrc {
                rows: Some(&s.xn),
                norms: Some(EstInput::Norms(&s.norm_after)),
            },
            (false, false) => EstSrc::rows(&s.xn, None),
        };
        match &b.gate_up {
            GateUpProj::Separate { gate, up } => {
                run.run(gu.start, gate, &s.xn, &xe, &mut s.gate)?;
                run.run(gu.start + 1, up, &s.xn, &xe, &mut s.up)?;
            }
            GateUpProj::Fused(f) => {
                run.run_fused(gu.start, f, &s.xn, &xe, &mut [&mut s.gate, &mut s.up])?
            }
        }
        // The down estimator's input: the SwiGLU output, whose sums of
        // squares its kernel leaves under a dynamic plan (where it can).
        let mlp_sums = match run.wants_norms() {
            true => be.swiglu_sumsq(&mut s.gate, &s.up, run.n)?,
            false => {
                be.swiglu(&mut s.gate, &s.up, run.n);
                None
            }
        };
        let xe = EstSrc::rows(&s.gate, mlp_sums.as_ref());
        run.run(gu.end, &b.down_proj, &s.gate, &xe, &mut s.out)?;
        // The next block's q/k/v estimators read this residual (before the
        // MLP output), as rows when one of them needs more than its norm.
        if next_rows {
            be.copy(h, &mut s.h_prev);
        }
        self.add_norm(h, next_norm, s, (run, 2 * l + 1))
    }

    /// RoPE of `seq`'s rows of q and k, their keys and values into its cache
    /// (layer `l`), and its attention output into `s.att`: on the call's
    /// buffers when it is the only sequence, else on its rows taken out.
    /// With `sums`, the sums of squares of its output rows go there too (the
    /// o estimator's input; [`Backend::attention_sumsq`]), into the call's
    /// [n × parts] sums, made by the first sequence.
    fn attend(
        &self,
        l: usize,
        seq: &mut Seq<'_, '_, B>,
        s: &mut Scratch<B>,
        sums: Option<&mut Option<SumSq<B>>>,
    ) -> Result<()> {
        let (be, c) = (&self.backend, &self.config);
        let rope = || RopeArgs {
            heads: c.num_heads,
            kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            rot_dim: self.rope.rot_dim(),
            table: &self.rope_table,
        };
        let shape = AttnShape {
            num_heads: c.num_heads,
            num_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            window: c.sliding_window,
        };
        let attention = |q: &B::Buf, cache: &KvCache<B>, out: &mut B::Buf, sums: bool| {
            let (store, step) = (cache.store(), seq.step);
            match sums {
                true => be.attention_sumsq(q, store, l, step, shape, out),
                false => {
                    be.attention(q, store, l, step, shape, out);
                    Ok(None)
                }
            }
        };
        let Some(pick) = &seq.pick else {
            let qkv = (&mut s.q, &mut s.k, &s.v);
            seq.cache.append_rotated(l, qkv, seq.step, rope())?;
            let made = attention(&s.q, seq.cache, &mut s.att, sums.is_some())?;
            if let Some(slot) = sums {
                *slot = made;
            }
            return Ok(());
        };
        let (r, n) = (seq.row0, seq.step.tokens.len());
        let mut q = be.rows(&s.q, c.q_dim(), r, n)?;
        let mut k = be.rows(&s.k, c.kv_dim(), r, n)?;
        let v = be.rows(&s.v, c.kv_dim(), r, n)?;
        seq.cache
            .append_rotated(l, (&mut q, &mut k, &v), seq.step, rope())?;
        let mut att = be.zeros(n * c.q_dim())?;
        let made = attention(&q, seq.cache, &mut att, sums.is_some())?;
        be.scatter_rows(&att, c.q_dim(), pick, true, &mut s.att);
        if let (Some(slot), Some(mine)) = (sums, made) {
            if slot.is_none() {
                let rows = be.len(&s.att) / c.q_dim().max(1);
                *slot = Some(SumSq {
                    sums: be.zeros(rows * mine.parts)?,
                    parts: mine.parts,
                });
            }
            if let Some(all) = slot {
                be.scatter_rows(&mine.sums, mine.parts, pick, true, &mut all.sums);
            }
        }
        Ok(())
    }

    /// `h += s.out`, checked into stage `slot` of the deferred flags, then
    /// `s.xn` = the RMSNorm of `h` with `w` (and, under a dynamic plan, the
    /// norms of the estimator inputs into `s.norm_after` / `s.norm_before`).
    fn add_norm(
        &self,
        h: &mut B::Buf,
        w: &B::Buf,
        s: &mut Scratch<B>,
        (run, slot): (&mut BlockRun<'_, '_, '_, B>, usize),
    ) -> Result<()> {
        let norms = run.wants_norms().then_some(InputNorms {
            after: &mut s.norm_after,
            before: &mut s.norm_before,
        });
        let flags = (&mut run.deferred.flags, slot);
        let eps = self.config.rms_norm_eps;
        self.backend
            .add_checked_norm(h, &s.out, flags, w, eps, &mut s.xn, norms)
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
            Some(i) => Err(non_finite_logits(i / vocab.max(1))),
            None => Ok(logits),
        }
    }

    /// The last position's [`Next`] from the logits in `out` [1 × vocab],
    /// after the call's deferred checks and counts, as [`Self::read_logits`].
    pub(super) fn read_next(
        &self,
        out: &B::Buf,
        deferred: Option<&Deferred<B>>,
        stats: Option<&mut BitStats>,
        readout: Readout,
    ) -> Result<Next> {
        let mut next = self.read_next_rows(out, deferred, stats, &[readout])?;
        Ok(next.pop().expect("one row, one readout"))
    }

    /// Each row's [`Next`] from the logits in `out` [rows × vocab], as its
    /// readout asks, after the call's deferred checks and counts. Tokens are
    /// chosen on the backend (one id a row read back); only the rows that
    /// want their logits (a logit bias, a repetition penalty) are gathered
    /// and read back.
    pub(super) fn read_next_rows(
        &self,
        out: &B::Buf,
        deferred: Option<&Deferred<B>>,
        stats: Option<&mut BitStats>,
        readouts: &[Readout],
    ) -> Result<Vec<Next>> {
        let (be, vocab) = (&self.backend, self.config.vocab_size);
        if readouts.iter().all(|r| *r == Readout::Logits) {
            let logits = self.read_logits(out, deferred, stats)?;
            return Ok(logits
                .chunks(vocab)
                .map(|r| Next::Logits(r.to_vec()))
                .collect());
        }
        let ids = if readouts
            .iter()
            .all(|r| matches!(r, Readout::Argmax | Readout::Logits))
        {
            be.argmax_rows(out, vocab)?
        } else {
            let draws: Vec<Draw> = (readouts.iter())
                .map(|r| match *r {
                    Readout::Sample(d) => d,
                    _ => Draw::greedy(),
                })
                .collect();
            be.sample_rows(out, vocab, &draws)?
        };
        let wanted: Vec<bool> = readouts.iter().map(|r| *r == Readout::Logits).collect();
        let mut logits = match wanted.contains(&true) {
            true => {
                let rows = be.gather_rows(out, vocab, &be.mask_from(&wanted)?, true)?;
                be.download(rows)?
            }
            false => Vec::new(),
        }
        .into_iter();
        if let Some(d) = deferred {
            d.finish(be, stats)?;
        }
        (ids.into_iter().zip(readouts).enumerate())
            .map(|(row, (id, r))| match r {
                Readout::Logits => {
                    let l: Vec<f32> = logits.by_ref().take(vocab).collect();
                    match l.iter().all(|v| v.is_finite()) {
                        true => Ok(Next::Logits(l)),
                        false => Err(non_finite_logits(row)),
                    }
                }
                _ => id.map(Next::Token).ok_or_else(|| non_finite_logits(row)),
            })
            .collect()
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
        stats: Option<&mut BitStats>,
    ) -> Result<Vec<f32>> {
        self.forward_next_with(tokens, cache, prec, stats, Readout::Logits)?
            .into_logits()
    }

    /// [`Model::forward_last_with`] handing back what `readout` asks for:
    /// the logits, or only the greedy token.
    pub fn forward_next_with(
        &self,
        tokens: &[u32],
        cache: &mut KvCache<B>,
        prec: Precision<'_, B>,
        mut stats: Option<&mut BitStats>,
        readout: Readout,
    ) -> Result<Next> {
        if let Some(r) = self.forward_graphed(tokens, cache, prec, stats.as_deref_mut(), readout) {
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
            let mut out = self.backend.zeros(self.config.vocab_size)?;
            self.logits_into(&last, 1, &mut out);
            self.read_next(&out, Some(&deferred), stats, readout)
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
    pub(super) fn keep_or_undo<T>(
        cache: &mut KvCache<B>,
        before: usize,
        r: Result<T>,
    ) -> Result<T> {
        if r.is_err() {
            cache.truncate(before);
        }
        r
    }
}
