//! The CPU forward pass: embeddings, blocks with KV cache, final norm, logits.

use crate::cpu::activation::swiglu_inplace;
use crate::cpu::attention::{attention, AttnShape};
use crate::cpu::norm::{rms_norm, rms_norm_inplace};
use crate::kv_cache::KvCache;
use crate::linear::Linear;
use crate::EngineError;

use super::{Block, GateUpProj, Model, QkvProj};
use crate::select::{run_linear, BitStats, LinearSelect, Precision};

/// Scratch activations of one forward call over `n` tokens.
struct Scratch {
    xn: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    att: Vec<f32>,
    out: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    fused: Vec<f32>,
    /// Estimator input of q/k/v or gate/up under asynchronous estimation.
    xe: Vec<f32>,
    /// Residual stream before the previous sub-block's output was added.
    h_prev: Vec<f32>,
}

/// Split each token's row of a fused output `buf` [n × Σwidths] into consecutive parts.
fn split_fused(buf: &[f32], n: usize, parts: &mut [&mut Vec<f32>]) {
    let total = buf.len() / n;
    let widths: Vec<usize> = parts.iter().map(|p| p.len() / n).collect();
    for t in 0..n {
        let mut off = t * total;
        for (p, w) in parts.iter_mut().zip(&widths) {
            p[t * w..(t + 1) * w].copy_from_slice(&buf[off..off + w]);
            off += w;
        }
    }
}

/// Error at the first NaN / infinity of `x` [n × width], naming `stage`.
fn check_finite(x: &[f32], width: usize, stage: impl FnOnce() -> String) -> Result<(), EngineError> {
    match x.iter().position(|v| !v.is_finite()) {
        Some(i) => Err(EngineError::NonFinite { stage: stage(), token: i / width.max(1) }),
        None => Ok(()),
    }
}

fn add_inplace(h: &mut [f32], x: &[f32]) {
    for (a, b) in h.iter_mut().zip(x) {
        *a += b;
    }
}

/// Per-call selection state of one block.
struct BlockRun<'a, 'b> {
    prec: Precision<'a>,
    sels: Option<&'a [LinearSelect]>,
    stats: Option<&'b mut BitStats>,
    /// Global index of the block's first linear (for the counters).
    offset: usize,
    n: usize,
}

impl BlockRun<'_, '_> {
    /// Run linear `i` of the block on `x`, estimating from `xe`.
    fn run(&mut self, i: usize, lin: &dyn Linear, x: &[f32], xe: &[f32], y: &mut [f32]) {
        let sel = self.sels.map(|v| &v[i]);
        let stats = self.stats.as_deref_mut().map(|s| (s, self.offset + i));
        run_linear(lin, self.prec, sel, x, xe, self.n, y, stats);
    }

    /// True when the asynchronous estimator input is needed for linears `range`.
    fn wants_async(&self, range: std::ops::Range<usize>) -> bool {
        match (self.prec, self.sels) {
            (Precision::Dynamic(p), Some(s)) => p.async_estimation && s[range].iter().any(LinearSelect::selects),
            _ => false,
        }
    }
}

impl Model {
    /// Check that `tokens` can be appended to `cache`.
    fn check_input(&self, tokens: &[u32], cache: &KvCache) -> Result<(), EngineError> {
        if tokens.is_empty() {
            return Err(EngineError::EmptyInput);
        }
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= self.config.vocab_size) {
            return Err(EngineError::TokenOutOfRange { token: t, vocab: self.config.vocab_size });
        }
        if cache.len() + tokens.len() > cache.capacity() {
            return Err(EngineError::ContextFull { have: cache.len(), add: tokens.len(), capacity: cache.capacity() });
        }
        Ok(())
    }

    /// Counters for every quantized linear of this model, in model order.
    pub fn new_bit_stats(&self) -> BitStats {
        BitStats::new(self.config.linears().iter().map(|s| s.size()).collect())
    }

    /// Process `tokens` after the positions already in `cache`; returns the final
    /// normed hidden states [n × hidden] and extends the cache.
    pub fn forward_hidden(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Vec<f32>, EngineError> {
        self.forward_hidden_with(tokens, cache, Precision::Fixed, None)
    }

    /// [`Model::forward_hidden`] with a precision mode, counting the bits used into `stats`.
    pub fn forward_hidden_with(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        prec: Precision<'_>,
        mut stats: Option<&mut BitStats>,
    ) -> Result<Vec<f32>, EngineError> {
        self.check_input(tokens, cache)?;
        let c = &self.config;
        let n = tokens.len();
        let d = c.hidden_size;
        let mut h = vec![0f32; n * d];
        for (t, &tok) in tokens.iter().enumerate() {
            self.embed.copy_range_f32(tok as usize * d, &mut h[t * d..(t + 1) * d]);
        }
        let mut s = Scratch {
            xn: vec![0.0; n * d],
            q: vec![0.0; n * c.q_dim()],
            k: vec![0.0; n * c.kv_dim()],
            v: vec![0.0; n * c.kv_dim()],
            att: vec![0.0; n * c.q_dim()],
            out: vec![0.0; n * d],
            gate: vec![0.0; n * c.intermediate_size],
            up: vec![0.0; n * c.intermediate_size],
            fused: Vec::new(),
            xe: vec![0.0; n * d],
            h_prev: Vec::new(),
        };
        let mut offset = 0;
        for (l, block) in self.blocks.iter().enumerate() {
            let sels = match prec {
                Precision::Fixed => None,
                Precision::Max(p) | Precision::Dynamic(p) => Some(p.blocks[l].as_slice()),
            };
            let mut run = BlockRun { prec, sels, stats: stats.as_deref_mut(), offset, n };
            self.block_forward(l, block, &mut h, cache, &mut s, &mut run)?;
            offset += block.linears().len();
        }
        cache.advance(n);
        let mut out = vec![0f32; n * d];
        rms_norm(&h, &self.final_norm, c.rms_norm_eps, &mut out);
        Ok(out)
    }

    fn block_forward(&self, l: usize, b: &Block, h: &mut [f32], cache: &mut KvCache, s: &mut Scratch, run: &mut BlockRun<'_, '_>) -> Result<(), EngineError> {
        let c = &self.config;
        let (n, eps) = (run.n, c.rms_norm_eps);
        let pos0 = cache.len();
        let nq = match &b.qkv {
            QkvProj::Separate { .. } => 3,
            QkvProj::Fused(_) => 1,
        };
        rms_norm(h, &b.attn_norm, eps, &mut s.xn);
        // q/k/v estimators read the previous block's residual before its MLP output
        // (normed with this block's norm); the first block has no such input.
        let qkv_async = l > 0 && run.wants_async(0..nq);
        if qkv_async {
            rms_norm(&s.h_prev, &b.attn_norm, eps, &mut s.xe);
        }
        let xe: &[f32] = if qkv_async { &s.xe } else { &s.xn };
        match &b.qkv {
            QkvProj::Separate { q, k, v } => {
                run.run(0, q.as_ref(), &s.xn, xe, &mut s.q);
                run.run(1, k.as_ref(), &s.xn, xe, &mut s.k);
                run.run(2, v.as_ref(), &s.xn, xe, &mut s.v);
            }
            QkvProj::Fused(f) => {
                s.fused.resize(n * f.out_features(), 0.0);
                run.run(0, f.as_ref(), &s.xn, xe, &mut s.fused);
                split_fused(&s.fused, n, &mut [&mut s.q, &mut s.k, &mut s.v]);
            }
        }
        if let Some((qn, kn)) = &b.qk_norm {
            rms_norm_inplace(&mut s.q, qn, eps);
            rms_norm_inplace(&mut s.k, kn, eps);
        }
        self.rope.apply(&mut s.q, c.num_heads, pos0);
        self.rope.apply(&mut s.k, c.num_kv_heads, pos0);
        cache.append(l, &s.k, &s.v)?;
        let (kc, vc) = cache.layer(l);
        let shape = AttnShape {
            num_heads: c.num_heads,
            num_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            window: c.sliding_window,
        };
        attention(&s.q, kc, vc, pos0, shape, &mut s.att);
        run.run(nq, b.o_proj.as_ref(), &s.att, &s.att, &mut s.out);
        let ngu = match &b.gate_up {
            GateUpProj::Separate { .. } => 2,
            GateUpProj::Fused(_) => 1,
        };
        let mlp_async = run.wants_async(nq + 1..nq + 1 + ngu);
        if mlp_async {
            // gate/up estimators: the residual before the attention output, normed with the MLP norm.
            rms_norm(h, &b.mlp_norm, eps, &mut s.xe);
        }
        add_inplace(h, &s.out);
        check_finite(h, c.hidden_size, || format!("layer {l} (attention output)"))?;

        rms_norm(h, &b.mlp_norm, eps, &mut s.xn);
        let xe: &[f32] = if mlp_async { &s.xe } else { &s.xn };
        match &b.gate_up {
            GateUpProj::Separate { gate, up } => {
                run.run(nq + 1, gate.as_ref(), &s.xn, xe, &mut s.gate);
                run.run(nq + 2, up.as_ref(), &s.xn, xe, &mut s.up);
            }
            GateUpProj::Fused(f) => {
                s.fused.resize(n * f.out_features(), 0.0);
                run.run(nq + 1, f.as_ref(), &s.xn, xe, &mut s.fused);
                split_fused(&s.fused, n, &mut [&mut s.gate, &mut s.up]);
            }
        }
        swiglu_inplace(&mut s.gate, &s.up);
        run.run(nq + 1 + ngu, b.down_proj.as_ref(), &s.gate, &s.gate, &mut s.out);
        // The next block's q/k/v estimators read this residual (before the MLP output).
        if l + 1 < self.blocks.len() && matches!(run.prec, Precision::Dynamic(p) if p.async_estimation) {
            s.h_prev.clear();
            s.h_prev.extend_from_slice(h);
        }
        add_inplace(h, &s.out);
        check_finite(h, c.hidden_size, || format!("layer {l} (MLP output)"))
    }

    /// Logits [rows × vocab] for final hidden states [rows × hidden]; a non-finite logit is an error.
    pub fn logits(&self, hidden: &[f32]) -> Result<Vec<f32>, EngineError> {
        let d = self.config.hidden_size;
        let rows = hidden.len() / d;
        let mut out = vec![0f32; rows * self.config.vocab_size];
        self.lm_head.forward(hidden, rows, &mut out);
        check_finite(&out, self.config.vocab_size, || "the logits (output layer)".into())?;
        Ok(out)
    }

    /// Process `tokens` and return the logits of the last one.
    pub fn forward_last(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Vec<f32>, EngineError> {
        self.forward_last_with(tokens, cache, Precision::Fixed, None)
    }

    /// [`Model::forward_last`] with a precision mode, counting the bits used into `stats`.
    pub fn forward_last_with(&self, tokens: &[u32], cache: &mut KvCache, prec: Precision<'_>, stats: Option<&mut BitStats>) -> Result<Vec<f32>, EngineError> {
        let h = self.forward_hidden_with(tokens, cache, prec, stats)?;
        let d = self.config.hidden_size;
        self.logits(&h[h.len() - d..])
    }

    /// Process `tokens` and return the logits of every position [n × vocab].
    pub fn forward_all(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Vec<f32>, EngineError> {
        let h = self.forward_hidden(tokens, cache)?;
        self.logits(&h)
    }
}
