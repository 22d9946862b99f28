//! The CPU forward pass: embeddings, blocks with KV cache, final norm, logits.

use crate::cpu::activation::swiglu_inplace;
use crate::cpu::attention::{attention, AttnShape};
use crate::cpu::norm::{rms_norm, rms_norm_inplace};
use crate::kv_cache::KvCache;
use crate::linear::Linear;
use crate::EngineError;

use super::{Block, GateUpProj, Model, QkvProj};

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
}

/// Run a fused projection and split each token's output row into consecutive parts.
fn fused_split(lin: &dyn Linear, x: &[f32], n: usize, buf: &mut Vec<f32>, parts: &mut [&mut Vec<f32>]) {
    let total = lin.out_features();
    buf.resize(n * total, 0.0);
    lin.forward(x, n, buf);
    let widths: Vec<usize> = parts.iter().map(|p| p.len() / n).collect();
    for t in 0..n {
        let mut off = t * total;
        for (p, w) in parts.iter_mut().zip(&widths) {
            p[t * w..(t + 1) * w].copy_from_slice(&buf[off..off + w]);
            off += w;
        }
    }
}

fn add_inplace(h: &mut [f32], x: &[f32]) {
    for (a, b) in h.iter_mut().zip(x) {
        *a += b;
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

    /// Process `tokens` after the positions already in `cache`; returns the final
    /// normed hidden states [n × hidden] and extends the cache.
    pub fn forward_hidden(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Vec<f32>, EngineError> {
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
        };
        for (l, block) in self.blocks.iter().enumerate() {
            self.block_forward(l, block, &mut h, n, cache, &mut s);
        }
        cache.advance(n);
        let mut out = vec![0f32; n * d];
        rms_norm(&h, &self.final_norm, c.rms_norm_eps, &mut out);
        Ok(out)
    }

    fn block_forward(&self, l: usize, b: &Block, h: &mut [f32], n: usize, cache: &mut KvCache, s: &mut Scratch) {
        let c = &self.config;
        let pos0 = cache.len();
        rms_norm(h, &b.attn_norm, c.rms_norm_eps, &mut s.xn);
        match &b.qkv {
            QkvProj::Separate { q, k, v } => {
                q.forward(&s.xn, n, &mut s.q);
                k.forward(&s.xn, n, &mut s.k);
                v.forward(&s.xn, n, &mut s.v);
            }
            QkvProj::Fused(f) => fused_split(f.as_ref(), &s.xn, n, &mut s.fused, &mut [&mut s.q, &mut s.k, &mut s.v]),
        }
        if let Some((qn, kn)) = &b.qk_norm {
            rms_norm_inplace(&mut s.q, qn, c.rms_norm_eps);
            rms_norm_inplace(&mut s.k, kn, c.rms_norm_eps);
        }
        self.rope.apply(&mut s.q, c.num_heads, pos0);
        self.rope.apply(&mut s.k, c.num_kv_heads, pos0);
        cache.append(l, &s.k, &s.v);
        let (kc, vc) = cache.layer(l);
        let shape = AttnShape {
            num_heads: c.num_heads,
            num_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            window: c.sliding_window,
        };
        attention(&s.q, kc, vc, pos0, shape, &mut s.att);
        b.o_proj.forward(&s.att, n, &mut s.out);
        add_inplace(h, &s.out);

        rms_norm(h, &b.mlp_norm, c.rms_norm_eps, &mut s.xn);
        match &b.gate_up {
            GateUpProj::Separate { gate, up } => {
                gate.forward(&s.xn, n, &mut s.gate);
                up.forward(&s.xn, n, &mut s.up);
            }
            GateUpProj::Fused(f) => fused_split(f.as_ref(), &s.xn, n, &mut s.fused, &mut [&mut s.gate, &mut s.up]),
        }
        swiglu_inplace(&mut s.gate, &s.up);
        b.down_proj.forward(&s.gate, n, &mut s.out);
        add_inplace(h, &s.out);
    }

    /// Logits [rows × vocab] for final hidden states [rows × hidden].
    pub fn logits(&self, hidden: &[f32]) -> Vec<f32> {
        let d = self.config.hidden_size;
        let rows = hidden.len() / d;
        let mut out = vec![0f32; rows * self.config.vocab_size];
        self.lm_head.forward(hidden, rows, &mut out);
        out
    }

    /// Process `tokens` and return the logits of the last one.
    pub fn forward_last(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Vec<f32>, EngineError> {
        let h = self.forward_hidden(tokens, cache)?;
        let d = self.config.hidden_size;
        Ok(self.logits(&h[h.len() - d..]))
    }

    /// Process `tokens` and return the logits of every position [n × vocab].
    pub fn forward_all(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Vec<f32>, EngineError> {
        let h = self.forward_hidden(tokens, cache)?;
        Ok(self.logits(&h))
    }
}
