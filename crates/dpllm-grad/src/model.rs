//! The full-precision model as f32 buffers, with a forward pass that keeps the
//! activations and the backward pass that yields ∂L/∂W for every quantized linear.
//!
//! L is the mean next-token cross-entropy of one sequence (position t predicts
//! token t+1). Gradients flow through lm_head, the final norm and every block;
//! only the gradients of the block linears are produced (nothing else is quantized).

use dpllm_engine::backend::cpu::attention::AttnShape;
use dpllm_engine::backend::cpu::rows::{join_columns, split_columns};
use dpllm_engine::linear::Linear;
use dpllm_engine::model::rope::Rope;
use dpllm_engine::model::{GateUpProj, QkvProj};
use dpllm_engine::Model;
use dpllm_format::ModelConfig;

use crate::ops;

/// One linear layer with an f32 copy of its weight.
pub struct LinearF32 {
    /// Short name as in `Block::linears()` ("q_proj", "qkv_proj", ...).
    pub name: &'static str,
    /// W [out × in], row-major.
    pub w: Vec<f32>,
    /// Optional bias [out].
    pub bias: Option<Vec<f32>>,
    /// Output features.
    pub out_f: usize,
    /// Input features.
    pub in_f: usize,
}

impl LinearF32 {
    fn from_linear(name: &'static str, l: &Linear, bits: Option<u32>) -> LinearF32 {
        LinearF32 {
            name,
            w: l.weight_f32_at(bits),
            bias: l.bias().map(|b| b.to_vec()),
            out_f: l.out_features(),
            in_f: l.in_features(),
        }
    }

    fn forward(&self, x: &[f32], n: usize) -> Vec<f32> {
        let mut y = vec![0f32; n * self.out_f];
        ops::linear_forward(
            x,
            n,
            &self.w,
            self.out_f,
            self.in_f,
            self.bias.as_deref(),
            &mut y,
        );
        y
    }
}

/// Linears reading the same input whose outputs, per token, are the consecutive
/// `widths` parts (q|k|v or gate|up): either one linear per part or one fused linear.
pub struct Group {
    /// The linears, in `Block::linears()` order.
    pub linears: Vec<LinearF32>,
    widths: Vec<usize>,
}

impl Group {
    fn fused(&self) -> bool {
        self.linears.len() == 1 && self.widths.len() > 1
    }

    /// Outputs of the parts, each [n × width].
    fn forward(&self, x: &[f32], n: usize) -> Vec<Vec<f32>> {
        if !self.fused() {
            return self.linears.iter().map(|l| l.forward(x, n)).collect();
        }
        let y = self.linears[0].forward(x, n);
        let mut parts: Vec<Vec<f32>> = self.widths.iter().map(|&w| vec![0f32; n * w]).collect();
        let mut views: Vec<&mut [f32]> = parts.iter_mut().map(|p| p.as_mut_slice()).collect();
        split_columns(&y, n, &mut views);
        parts
    }

    /// Given the gradients of the parts, report each linear's dW (index `first + i`)
    /// and write the input gradient into `dx` (overwritten).
    fn backward(
        &self,
        x: &[f32],
        n: usize,
        dparts: &[&[f32]],
        dx: &mut [f32],
        first: usize,
        sink: &mut Sink<'_>,
    ) {
        let concat;
        let dys: Vec<&[f32]> = if self.fused() {
            let total: usize = self.widths.iter().sum();
            let mut c = vec![0f32; n * total];
            join_columns(dparts, n, &mut c);
            concat = c;
            vec![&concat[..]]
        } else {
            dparts.to_vec()
        };
        for (i, (l, dy)) in self.linears.iter().zip(dys).enumerate() {
            sink.weight_grad(first + i, l, dy, x, n);
            ops::linear_backward_input(dy, n, &l.w, l.out_f, l.in_f, dx, i > 0);
        }
    }
}

/// Where weight gradients go: computes dW = dyᵀx into a scratch buffer and hands it on.
pub(crate) struct Sink<'a> {
    layer: usize,
    buf: Vec<f32>,
    f: &'a mut dyn FnMut(usize, usize, &[f32]),
}

impl Sink<'_> {
    fn weight_grad(&mut self, idx: usize, l: &LinearF32, dy: &[f32], x: &[f32], n: usize) {
        self.buf.resize(l.out_f * l.in_f, 0.0);
        ops::linear_backward_weight(dy, x, n, l.out_f, l.in_f, &mut self.buf);
        (self.f)(self.layer, idx, &self.buf);
    }
}

/// One transformer block with f32 weights.
pub struct BlockF32 {
    /// RMSNorm before attention.
    pub attn_norm: Vec<f32>,
    /// q|k|v projections.
    pub qkv: Group,
    /// Per-head q/k RMSNorm weights (Qwen3).
    pub qk_norm: Option<(Vec<f32>, Vec<f32>)>,
    /// Attention output projection.
    pub o_proj: LinearF32,
    /// RMSNorm before the MLP.
    pub mlp_norm: Vec<f32>,
    /// gate|up projections.
    pub gate_up: Group,
    /// MLP down projection.
    pub down_proj: LinearF32,
}

impl BlockF32 {
    /// Every linear in `Block::linears()` order.
    pub fn linears(&self) -> Vec<&LinearF32> {
        let mut v: Vec<&LinearF32> = self.qkv.linears.iter().collect();
        v.push(&self.o_proj);
        v.extend(self.gate_up.linears.iter());
        v.push(&self.down_proj);
        v
    }

    /// Mutable access to linear `idx` (in `Block::linears()` order).
    pub fn linear_mut(&mut self, idx: usize) -> &mut LinearF32 {
        let nq = self.qkv.linears.len();
        let ng = self.gate_up.linears.len();
        if idx < nq {
            &mut self.qkv.linears[idx]
        } else if idx == nq {
            &mut self.o_proj
        } else if idx < nq + 1 + ng {
            &mut self.gate_up.linears[idx - nq - 1]
        } else {
            assert_eq!(idx, nq + 1 + ng, "linear index out of range");
            &mut self.down_proj
        }
    }
}

/// Activations of one block kept for the backward pass (and read by DP-LLM
/// calibration: the inputs of every linear).
pub struct BlockActs {
    /// Residual stream entering the block.
    pub h_in: Vec<f32>,
    /// Normed input of q/k/v.
    pub xn1: Vec<f32>,
    /// q and k before the per-head norm (Qwen3 only).
    qk_pre: Option<(Vec<f32>, Vec<f32>)>,
    /// q, k after RoPE; v.
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// Attention output: the input of o_proj.
    pub att: Vec<f32>,
    /// Residual stream after the attention sub-block.
    pub h_mid: Vec<f32>,
    /// Normed input of gate/up.
    pub xn2: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    /// silu(gate)·up: the input of down_proj.
    pub act: Vec<f32>,
}

/// The model in f32, ready for forward/backward passes over whole sequences.
pub struct GradModel {
    /// The model's config.
    pub config: ModelConfig,
    embed: Vec<f32>,
    /// Blocks with f32 weights (mutable, e.g. for finite-difference tests).
    pub blocks: Vec<BlockF32>,
    final_norm: Vec<f32>,
    lm_head: Vec<f32>,
    rope: Rope,
}

impl GradModel {
    /// Copy every weight of `model` to f32 (quantized linears at their highest loaded precision).
    pub fn from_model(model: &Model) -> GradModel {
        Self::from_model_at(model, None)
    }

    /// Copy every weight of `model` to f32, quantized linears dequantized at `bits`
    /// (at most their loaded precision; None: the highest loaded).
    pub fn from_model_at(model: &Model, bits: Option<u32>) -> GradModel {
        let c = &model.config;
        let blocks = model
            .blocks
            .iter()
            .map(|b| {
                let qkv = match &b.qkv {
                    QkvProj::Separate { q, k, v } => vec![
                        LinearF32::from_linear("q_proj", q, bits),
                        LinearF32::from_linear("k_proj", k, bits),
                        LinearF32::from_linear("v_proj", v, bits),
                    ],
                    QkvProj::Fused(f) => vec![LinearF32::from_linear("qkv_proj", f, bits)],
                };
                let gate_up = match &b.gate_up {
                    GateUpProj::Separate { gate, up } => {
                        vec![
                            LinearF32::from_linear("gate_proj", gate, bits),
                            LinearF32::from_linear("up_proj", up, bits),
                        ]
                    }
                    GateUpProj::Fused(f) => vec![LinearF32::from_linear("gate_up_proj", f, bits)],
                };
                BlockF32 {
                    attn_norm: b.attn_norm.clone(),
                    qkv: Group {
                        linears: qkv,
                        widths: vec![c.q_dim(), c.kv_dim(), c.kv_dim()],
                    },
                    qk_norm: b.qk_norm.clone(),
                    o_proj: LinearF32::from_linear("o_proj", &b.o_proj, bits),
                    mlp_norm: b.mlp_norm.clone(),
                    gate_up: Group {
                        linears: gate_up,
                        widths: vec![c.intermediate_size, c.intermediate_size],
                    },
                    down_proj: LinearF32::from_linear("down_proj", &b.down_proj, bits),
                }
            })
            .collect();
        GradModel {
            config: c.clone(),
            embed: model.embedding_f32(),
            blocks,
            final_norm: model.final_norm().to_vec(),
            lm_head: model.lm_head().weight_f32(),
            rope: model.rope().clone(),
        }
    }

    fn attn_shape(&self) -> AttnShape {
        let c = &self.config;
        AttnShape {
            num_heads: c.num_heads,
            num_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            window: c.sliding_window,
        }
    }

    fn check(&self, tokens: &[u32]) -> anyhow::Result<()> {
        anyhow::ensure!(
            tokens.len() >= 2,
            "a sequence needs at least 2 tokens for a next-token loss, got {}",
            tokens.len()
        );
        if let Some(&t) = tokens
            .iter()
            .find(|&&t| t as usize >= self.config.vocab_size)
        {
            anyhow::bail!(
                "token id {t} is out of range for a vocabulary of {}",
                self.config.vocab_size
            );
        }
        Ok(())
    }

    /// Forward over `tokens` (positions 0..n); returns the block activations, the
    /// hidden state before the final norm and the normed final hidden state.
    fn forward(&self, tokens: &[u32]) -> (Vec<BlockActs>, Vec<f32>, Vec<f32>) {
        let c = &self.config;
        let (n, d, eps) = (tokens.len(), c.hidden_size, c.rms_norm_eps);
        let mut h = vec![0f32; n * d];
        for (t, &tok) in tokens.iter().enumerate() {
            h[t * d..(t + 1) * d]
                .copy_from_slice(&self.embed[tok as usize * d..(tok as usize + 1) * d]);
        }
        let mut acts = Vec::with_capacity(self.blocks.len());
        for b in &self.blocks {
            let mut xn1 = vec![0f32; n * d];
            ops::rms_norm_forward(&h, &b.attn_norm, eps, &mut xn1);
            let mut parts = b.qkv.forward(&xn1, n).into_iter();
            let (mut q, mut k, v) = (
                parts.next().unwrap(),
                parts.next().unwrap(),
                parts.next().unwrap(),
            );
            let qk_pre = b.qk_norm.as_ref().map(|(qn, kn)| {
                let pre = (q.clone(), k.clone());
                ops::rms_norm_forward_inplace(&mut q, qn, eps);
                ops::rms_norm_forward_inplace(&mut k, kn, eps);
                pre
            });
            ops::rope_forward(&self.rope, &mut q, c.num_heads);
            ops::rope_forward(&self.rope, &mut k, c.num_kv_heads);
            let mut att = vec![0f32; n * c.q_dim()];
            ops::attention_forward(&q, &k, &v, self.attn_shape(), &mut att);
            let mut h_mid = b.o_proj.forward(&att, n);
            h_mid.iter_mut().zip(&h).for_each(|(a, b)| *a += b);
            let mut xn2 = vec![0f32; n * d];
            ops::rms_norm_forward(&h_mid, &b.mlp_norm, eps, &mut xn2);
            let mut parts = b.gate_up.forward(&xn2, n).into_iter();
            let (gate, up) = (parts.next().unwrap(), parts.next().unwrap());
            let mut act = vec![0f32; gate.len()];
            ops::swiglu_forward(&gate, &up, &mut act);
            let mut h_out = b.down_proj.forward(&act, n);
            h_out.iter_mut().zip(&h_mid).for_each(|(a, b)| *a += b);
            let h_in = std::mem::replace(&mut h, h_out);
            acts.push(BlockActs {
                h_in,
                xn1,
                qk_pre,
                q,
                k,
                v,
                att,
                h_mid,
                xn2,
                gate,
                up,
                act,
            });
        }
        let mut hf = vec![0f32; n * d];
        ops::rms_norm_forward(&h, &self.final_norm, eps, &mut hf);
        (acts, h, hf)
    }

    /// Forward over `tokens`, returning every block's activations.
    pub fn activations(&self, tokens: &[u32]) -> anyhow::Result<Vec<BlockActs>> {
        self.check(tokens)?;
        Ok(self.forward(tokens).0)
    }

    /// Mean next-token cross-entropy of `tokens` (forward only).
    pub fn loss(&self, tokens: &[u32]) -> anyhow::Result<f64> {
        self.check(tokens)?;
        let (_, _, hf) = self.forward(tokens);
        let c = &self.config;
        Ok(ops::lm_head_cross_entropy(
            &hf,
            c.hidden_size,
            &self.lm_head,
            c.vocab_size,
            &tokens[1..],
            None,
        ))
    }

    /// Loss of `tokens` and the gradient of every block linear: `sink(layer, idx, dW)`
    /// with idx in `Block::linears()` order and dW [out × in]. Layers come last to first.
    pub fn gradient(
        &self,
        tokens: &[u32],
        sink: &mut dyn FnMut(usize, usize, &[f32]),
    ) -> anyhow::Result<f64> {
        self.check(tokens)?;
        let c = &self.config;
        let (n, d, eps) = (tokens.len(), c.hidden_size, c.rms_norm_eps);
        let (acts, h_last, hf) = self.forward(tokens);
        let mut dhf = vec![0f32; n * d];
        let loss = ops::lm_head_cross_entropy(
            &hf,
            d,
            &self.lm_head,
            c.vocab_size,
            &tokens[1..],
            Some(&mut dhf),
        );
        let mut dh = vec![0f32; n * d];
        ops::rms_norm_backward_add(&h_last, &self.final_norm, eps, &dhf, &mut dh);
        drop(dhf);
        let mut s = Sink {
            layer: 0,
            buf: Vec::new(),
            f: sink,
        };
        for (l, (b, a)) in self.blocks.iter().zip(&acts).enumerate().rev() {
            s.layer = l;
            self.block_backward(b, a, n, &mut dh, &mut s);
        }
        Ok(loss)
    }

    /// Loss of `tokens` and every block linear's gradient, `[layer][idx]` = dW [out × in].
    pub fn gradients(&self, tokens: &[u32]) -> anyhow::Result<(f64, Vec<Vec<Vec<f32>>>)> {
        let mut g: Vec<Vec<Vec<f32>>> = self
            .blocks
            .iter()
            .map(|b| vec![Vec::new(); b.linears().len()])
            .collect();
        let loss = self.gradient(tokens, &mut |l, i, dw| g[l][i] = dw.to_vec())?;
        Ok((loss, g))
    }

    /// Back-propagate `dh` (gradient w.r.t. the block output) to the block input, in place.
    fn block_backward(
        &self,
        b: &BlockF32,
        a: &BlockActs,
        n: usize,
        dh: &mut [f32],
        s: &mut Sink<'_>,
    ) {
        let c = &self.config;
        let (d, inter, eps) = (c.hidden_size, c.intermediate_size, c.rms_norm_eps);
        let nq = b.qkv.linears.len();
        let idx_o = nq;
        let idx_gu = nq + 1;
        let idx_down = idx_gu + b.gate_up.linears.len();

        // MLP: h_out = h_mid + down(silu(gate)·up), gate|up = proj(norm(h_mid)).
        let dn = &b.down_proj;
        s.weight_grad(idx_down, dn, dh, &a.act, n);
        let mut dact = vec![0f32; n * inter];
        ops::linear_backward_input(dh, n, &dn.w, dn.out_f, dn.in_f, &mut dact, false);
        let mut dgate = vec![0f32; n * inter];
        let mut dup = vec![0f32; n * inter];
        ops::swiglu_backward(&a.gate, &a.up, &dact, &mut dgate, &mut dup);
        drop(dact);
        let mut dxn = vec![0f32; n * d];
        b.gate_up
            .backward(&a.xn2, n, &[&dgate, &dup], &mut dxn, idx_gu, s);
        drop((dgate, dup));
        ops::rms_norm_backward_add(&a.h_mid, &b.mlp_norm, eps, &dxn, dh);

        // Attention: h_mid = h_in + o(attn(rope(qn(q)), rope(kn(k)), v)), q|k|v = proj(norm(h_in)).
        let o = &b.o_proj;
        s.weight_grad(idx_o, o, dh, &a.att, n);
        let mut datt = vec![0f32; n * c.q_dim()];
        ops::linear_backward_input(dh, n, &o.w, o.out_f, o.in_f, &mut datt, false);
        let mut dq = vec![0f32; n * c.q_dim()];
        let mut dk = vec![0f32; n * c.kv_dim()];
        let mut dv = vec![0f32; n * c.kv_dim()];
        ops::attention_backward(
            &a.q,
            &a.k,
            &a.v,
            &datt,
            self.attn_shape(),
            &mut dq,
            &mut dk,
            &mut dv,
        );
        drop(datt);
        ops::rope_backward(&self.rope, &mut dq, c.num_heads);
        ops::rope_backward(&self.rope, &mut dk, c.num_kv_heads);
        if let (Some((qn, kn)), Some((q_pre, k_pre))) = (&b.qk_norm, &a.qk_pre) {
            let mut dq_pre = vec![0f32; dq.len()];
            ops::rms_norm_backward_add(q_pre, qn, eps, &dq, &mut dq_pre);
            let mut dk_pre = vec![0f32; dk.len()];
            ops::rms_norm_backward_add(k_pre, kn, eps, &dk, &mut dk_pre);
            dq = dq_pre;
            dk = dk_pre;
        }
        b.qkv.backward(&a.xn1, n, &[&dq, &dk, &dv], &mut dxn, 0, s);
        ops::rms_norm_backward_add(&a.h_in, &b.attn_norm, eps, &dxn, dh);
    }
}

/// Mean next-token cross-entropy (f64) of `tokens` from the engine's own forward
/// pass: the reference the f32 model is checked against.
pub fn engine_loss(model: &Model, tokens: &[u32]) -> anyhow::Result<f64> {
    let mut cache = model.new_cache(tokens.len());
    let logits = model.forward_all(tokens, &mut cache)?;
    let n = tokens.len();
    let v = model.config.vocab_size;
    Ok(dpllm_engine::loss::nll_sum(&logits[..(n - 1) * v], v, &tokens[1..]) / (n - 1) as f64)
}
