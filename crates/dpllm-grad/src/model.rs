//! The full-precision model as f32 buffers, with a forward pass that keeps the
//! activations and the backward pass that yields ∂L/∂W for every quantized linear.
//!
//! L is the mean next-token cross-entropy of one sequence (position t predicts
//! token t+1). Gradients flow through lm_head, the final norm and every block;
//! only the gradients of the block linears are produced (nothing else is quantized).

use anyhow::Result;
use dpllm_engine::backend::cpu::attention::AttnShape;
use dpllm_engine::linear::Linear;
use dpllm_engine::model::rope::Rope;
use dpllm_engine::model::{GateUpProj, QkvProj};
use dpllm_engine::Model;
use dpllm_format::ModelConfig;

use crate::backend::{CpuGrad, GradBackend};

/// One linear layer with an f32 copy of its weight (in a buffer `B` of the backend).
pub struct LinearF32<B = Vec<f32>> {
    /// Short name as in `Block::linears()` ("q_proj", "qkv_proj", ...).
    pub name: &'static str,
    /// W [out × in], row-major.
    pub w: B,
    /// Optional bias [out].
    pub bias: Option<B>,
    /// Output features.
    pub out_f: usize,
    /// Input features.
    pub in_f: usize,
}

impl<B> LinearF32<B> {
    fn from_linear<G: GradBackend<Buf = B>>(
        be: &G,
        name: &'static str,
        l: &Linear,
        bits: Option<u32>,
    ) -> Result<Self> {
        Ok(LinearF32 {
            name,
            w: be.upload(&l.weight_f32_at(bits))?,
            bias: l.bias().map(|b| be.upload(b)).transpose()?,
            out_f: l.out_features(),
            in_f: l.in_features(),
        })
    }

    fn forward<G: GradBackend<Buf = B>>(&self, be: &G, x: &B, n: usize) -> Result<B> {
        let mut y = be.scratch(n * self.out_f)?;
        be.linear_forward(
            x,
            n,
            &self.w,
            self.out_f,
            self.in_f,
            self.bias.as_ref(),
            &mut y,
        )?;
        Ok(y)
    }
}

/// Linears reading the same input whose outputs, per token, are the consecutive
/// `widths` parts (q|k|v or gate|up): either one linear per part or one fused linear.
pub struct Group<B = Vec<f32>> {
    /// The linears, in `Block::linears()` order.
    pub linears: Vec<LinearF32<B>>,
    widths: Vec<usize>,
}

impl<B> Group<B> {
    fn fused(&self) -> bool {
        self.linears.len() == 1 && self.widths.len() > 1
    }

    /// Outputs of the parts, each [n × width].
    fn forward<G: GradBackend<Buf = B>>(&self, be: &G, x: &B, n: usize) -> Result<Vec<B>> {
        if !self.fused() {
            return self.linears.iter().map(|l| l.forward(be, x, n)).collect();
        }
        let y = self.linears[0].forward(be, x, n)?;
        let mut parts =
            (self.widths.iter().map(|&w| be.scratch(n * w))).collect::<Result<Vec<B>>>()?;
        let mut views: Vec<&mut B> = parts.iter_mut().collect();
        be.split_columns(&y, n, &mut views)?;
        Ok(parts)
    }

    /// Given the gradients of the parts, report each linear's dW (index `first + i`)
    /// and write the input gradient into `dx` (overwritten).
    #[allow(clippy::too_many_arguments)]
    fn backward<G: GradBackend<Buf = B>>(
        &self,
        be: &G,
        x: &B,
        n: usize,
        dparts: &[&B],
        dx: &mut B,
        first: usize,
        sink: &mut Sink<'_, '_, G>,
    ) -> Result<()> {
        let concat;
        let dys: Vec<&B> = if self.fused() {
            let total: usize = self.widths.iter().sum();
            let mut c = be.scratch(n * total)?;
            be.join_columns(dparts, n, &mut c)?;
            concat = c;
            vec![&concat]
        } else {
            dparts.to_vec()
        };
        for (i, (l, dy)) in self.linears.iter().zip(dys).enumerate() {
            sink.weight_grad(first + i, l, dy, x, n)?;
            be.linear_backward_input(dy, n, &l.w, l.out_f, l.in_f, dx, i > 0)?;
        }
        Ok(())
    }
}

/// What receives each weight gradient: `(layer, index in Block::linears(), dW [out × in])`.
pub type GradSink<'a, B> = dyn FnMut(usize, usize, &B) -> Result<()> + 'a;

/// Where weight gradients go: computes dW = dyᵀx into a scratch buffer and hands it on.
pub(crate) struct Sink<'a, 'f, G: GradBackend> {
    be: &'a G,
    layer: usize,
    /// One scratch buffer a weight size, kept for the whole pass.
    bufs: Vec<G::Buf>,
    f: &'a mut GradSink<'f, G::Buf>,
}

impl<G: GradBackend> Sink<'_, '_, G> {
    fn weight_grad(
        &mut self,
        idx: usize,
        l: &LinearF32<G::Buf>,
        dy: &G::Buf,
        x: &G::Buf,
        n: usize,
    ) -> Result<()> {
        let len = l.out_f * l.in_f;
        let at = match self.bufs.iter().position(|b| self.be.len(b) == len) {
            Some(at) => at,
            None => {
                self.bufs.push(self.be.scratch(len)?);
                self.bufs.len() - 1
            }
        };
        let buf = &mut self.bufs[at];
        self.be
            .linear_backward_weight(dy, x, n, l.out_f, l.in_f, buf)?;
        (self.f)(self.layer, idx, buf)
    }
}

/// One transformer block with f32 weights.
pub struct BlockF32<B = Vec<f32>> {
    /// RMSNorm before attention.
    pub attn_norm: B,
    /// q|k|v projections.
    pub qkv: Group<B>,
    /// Per-head q/k RMSNorm weights (Qwen3).
    pub qk_norm: Option<(B, B)>,
    /// Attention output projection.
    pub o_proj: LinearF32<B>,
    /// RMSNorm before the MLP.
    pub mlp_norm: B,
    /// gate|up projections.
    pub gate_up: Group<B>,
    /// MLP down projection.
    pub down_proj: LinearF32<B>,
}

impl<B> BlockF32<B> {
    /// Every linear in `Block::linears()` order.
    pub fn linears(&self) -> Vec<&LinearF32<B>> {
        let mut v: Vec<&LinearF32<B>> = self.qkv.linears.iter().collect();
        v.push(&self.o_proj);
        v.extend(self.gate_up.linears.iter());
        v.push(&self.down_proj);
        v
    }

    /// Mutable access to linear `idx` (in `Block::linears()` order).
    pub fn linear_mut(&mut self, idx: usize) -> &mut LinearF32<B> {
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
pub struct BlockActs<B = Vec<f32>> {
    /// Residual stream entering the block.
    pub h_in: B,
    /// Normed input of q/k/v.
    pub xn1: B,
    /// q and k before the per-head norm (Qwen3 only).
    qk_pre: Option<(B, B)>,
    /// q, k after RoPE; v.
    q: B,
    k: B,
    v: B,
    /// Attention output: the input of o_proj.
    pub att: B,
    /// Residual stream after the attention sub-block.
    pub h_mid: B,
    /// Normed input of gate/up.
    pub xn2: B,
    gate: B,
    up: B,
    /// silu(gate)·up: the input of down_proj.
    pub act: B,
}

/// The model in f32 on backend `G` (the CPU by default), ready for forward and
/// backward passes over whole sequences.
pub struct GradModel<G: GradBackend = CpuGrad> {
    be: G,
    /// The model's config.
    pub config: ModelConfig,
    embed: G::Buf,
    /// Blocks with f32 weights (mutable, e.g. for finite-difference tests).
    pub blocks: Vec<BlockF32<G::Buf>>,
    final_norm: G::Buf,
    lm_head: G::Buf,
    rope: Rope,
}

/// What a forward pass keeps: every block's activations, the hidden state
/// before the final norm and the normed final hidden state.
type Forward<B> = (Vec<BlockActs<B>>, B, B);

/// The value of a CPU op, which cannot fail.
fn on_cpu<T>(r: Result<T>) -> T {
    r.unwrap_or_else(|e| unreachable!("the CPU gradient ops do not fail: {e}"))
}

impl GradModel<CpuGrad> {
    /// Copy every weight of `model` to f32 (quantized linears at their highest loaded precision).
    pub fn from_model(model: &Model) -> GradModel {
        Self::from_model_at(model, None)
    }

    /// Copy every weight of `model` to f32, quantized linears dequantized at `bits`
    /// (at most their loaded precision; None: the highest loaded).
    pub fn from_model_at(model: &Model, bits: Option<u32>) -> GradModel {
        on_cpu(GradModel::on(CpuGrad, model, bits))
    }

    /// Mean next-token cross-entropy of `tokens` and the gradient of every block
    /// linear, `[layer][idx]` = dW [out × in].
    pub fn gradients(&self, tokens: &[u32]) -> Result<(f64, Vec<Vec<Vec<f32>>>)> {
        let mut g: Vec<Vec<Vec<f32>>> = self
            .blocks
            .iter()
            .map(|b| vec![Vec::new(); b.linears().len()])
            .collect();
        let loss = self.gradient(tokens, &mut |l, i, dw| {
            g[l][i] = dw.clone();
            Ok(())
        })?;
        Ok((loss, g))
    }
}

impl<G: GradBackend> GradModel<G> {
    /// Every weight of `model` as f32 on backend `be`, quantized linears
    /// dequantized at `bits` (at most their loaded precision; None: the highest loaded).
    pub fn on(be: G, model: &Model, bits: Option<u32>) -> Result<Self> {
        let c = &model.config;
        let lin = |name, l: &Linear| LinearF32::from_linear(&be, name, l, bits);
        let mut blocks = Vec::with_capacity(model.blocks.len());
        for b in &model.blocks {
            let qkv = match &b.qkv {
                QkvProj::Separate { q, k, v } => {
                    vec![lin("q_proj", q)?, lin("k_proj", k)?, lin("v_proj", v)?]
                }
                QkvProj::Fused(f) => vec![lin("qkv_proj", f)?],
            };
            let gate_up = match &b.gate_up {
                GateUpProj::Separate { gate, up } => {
                    vec![lin("gate_proj", gate)?, lin("up_proj", up)?]
                }
                GateUpProj::Fused(f) => vec![lin("gate_up_proj", f)?],
            };
            let qk_norm = match &b.qk_norm {
                Some((qn, kn)) => Some((be.upload(qn)?, be.upload(kn)?)),
                None => None,
            };
            blocks.push(BlockF32 {
                attn_norm: be.upload(&b.attn_norm)?,
                qkv: Group {
                    linears: qkv,
                    widths: vec![c.q_dim(), c.kv_dim(), c.kv_dim()],
                },
                qk_norm,
                o_proj: lin("o_proj", &b.o_proj)?,
                mlp_norm: be.upload(&b.mlp_norm)?,
                gate_up: Group {
                    linears: gate_up,
                    widths: vec![c.intermediate_size, c.intermediate_size],
                },
                down_proj: lin("down_proj", &b.down_proj)?,
            });
        }
        Ok(GradModel {
            config: c.clone(),
            embed: be.upload(&model.embedding_f32())?,
            blocks,
            final_norm: be.upload(model.final_norm())?,
            lm_head: be.upload(&model.lm_head().weight_f32())?,
            rope: model.rope().clone(),
            be,
        })
    }

    /// The backend the model runs on.
    pub fn backend(&self) -> &G {
        &self.be
    }

    /// A copy of every weight on backend `be` (another lane of the same
    /// device: what this model's backend queued must be complete first).
    pub fn replicate(&self, be: G) -> Result<GradModel<G>> {
        let copy_lin = |l: &LinearF32<G::Buf>| -> Result<LinearF32<G::Buf>> {
            Ok(LinearF32 {
                name: l.name,
                w: be.copy(&l.w)?,
                bias: l.bias.as_ref().map(|b| be.copy(b)).transpose()?,
                out_f: l.out_f,
                in_f: l.in_f,
            })
        };
        let copy_group = |g: &Group<G::Buf>| -> Result<Group<G::Buf>> {
            Ok(Group {
                linears: g.linears.iter().map(copy_lin).collect::<Result<_>>()?,
                widths: g.widths.clone(),
            })
        };
        let blocks = (self.blocks.iter())
            .map(|b| {
                Ok(BlockF32 {
                    attn_norm: be.copy(&b.attn_norm)?,
                    qkv: copy_group(&b.qkv)?,
                    qk_norm: match &b.qk_norm {
                        Some((q, k)) => Some((be.copy(q)?, be.copy(k)?)),
                        None => None,
                    },
                    o_proj: copy_lin(&b.o_proj)?,
                    mlp_norm: be.copy(&b.mlp_norm)?,
                    gate_up: copy_group(&b.gate_up)?,
                    down_proj: copy_lin(&b.down_proj)?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(GradModel {
            config: self.config.clone(),
            embed: be.copy(&self.embed)?,
            blocks,
            final_norm: be.copy(&self.final_norm)?,
            lm_head: be.copy(&self.lm_head)?,
            rope: self.rope.clone(),
            be,
        })
    }

    /// Values in all the model's buffers (4 bytes each).
    pub fn values(&self) -> usize {
        let be = &self.be;
        let lin = |l: &LinearF32<G::Buf>| be.len(&l.w) + l.bias.as_ref().map_or(0, |b| be.len(b));
        let blocks: usize = (self.blocks.iter())
            .map(|b| {
                b.linears().into_iter().map(lin).sum::<usize>()
                    + be.len(&b.attn_norm)
                    + be.len(&b.mlp_norm)
                    + b.qk_norm.as_ref().map_or(0, |(q, k)| be.len(q) + be.len(k))
            })
            .sum();
        blocks + be.len(&self.embed) + be.len(&self.final_norm) + be.len(&self.lm_head)
    }

    /// The backend with the blocks open for writing (to load other weights).
    pub fn backend_and_blocks(&mut self) -> (&G, &mut [BlockF32<G::Buf>]) {
        (&self.be, &mut self.blocks)
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

    /// Whether `tokens` can be a sequence of this model: at least 2 ids, all
    /// within the vocabulary.
    pub fn check(&self, tokens: &[u32]) -> Result<()> {
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
    fn forward(&self, ids: &G::Ids) -> Result<Forward<G::Buf>> {
        let (be, c) = (&self.be, &self.config);
        let (n, d, eps) = (be.ids_len(ids), c.hidden_size, c.rms_norm_eps);
        let mut h = be.scratch(n * d)?;
        be.embed(&self.embed, d, ids, &mut h)?;
        let mut acts = Vec::with_capacity(self.blocks.len());
        for b in &self.blocks {
            let mut xn1 = be.scratch(n * d)?;
            be.rms_norm_forward(&h, &b.attn_norm, eps, &mut xn1)?;
            let mut parts = b.qkv.forward(be, &xn1, n)?.into_iter();
            let (Some(mut q), Some(mut k), Some(v)) = (parts.next(), parts.next(), parts.next())
            else {
                unreachable!("q|k|v has three parts")
            };
            let qk_pre = match &b.qk_norm {
                Some((qn, kn)) => {
                    let pre = (be.copy(&q)?, be.copy(&k)?);
                    be.rms_norm_forward_inplace(&mut q, qn, eps)?;
                    be.rms_norm_forward_inplace(&mut k, kn, eps)?;
                    Some(pre)
                }
                None => None,
            };
            be.rope(&self.rope, &mut q, c.num_heads, false)?;
            be.rope(&self.rope, &mut k, c.num_kv_heads, false)?;
            let mut att = be.scratch(n * c.q_dim())?;
            be.attention_forward(&q, &k, &v, self.attn_shape(), &mut att)?;
            let mut h_mid = b.o_proj.forward(be, &att, n)?;
            be.add(&mut h_mid, &h)?;
            let mut xn2 = be.scratch(n * d)?;
            be.rms_norm_forward(&h_mid, &b.mlp_norm, eps, &mut xn2)?;
            let mut parts = b.gate_up.forward(be, &xn2, n)?.into_iter();
            let (Some(gate), Some(up)) = (parts.next(), parts.next()) else {
                unreachable!("gate|up has two parts")
            };
            let mut act = be.scratch(n * c.intermediate_size)?;
            be.swiglu_forward(&gate, &up, &mut act)?;
            let mut h_out = b.down_proj.forward(be, &act, n)?;
            be.add(&mut h_out, &h_mid)?;
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
        let mut hf = be.scratch(n * d)?;
        be.rms_norm_forward(&h, &self.final_norm, eps, &mut hf)?;
        Ok((acts, h, hf))
    }

    /// Forward over `tokens`, returning every block's activations.
    pub fn activations(&self, tokens: &[u32]) -> Result<Vec<BlockActs<G::Buf>>> {
        self.check(tokens)?;
        Ok(self.forward(&self.be.ids(tokens)?)?.0)
    }

    /// Mean next-token cross-entropy of `tokens` (forward only).
    pub fn loss(&self, tokens: &[u32]) -> Result<f64> {
        self.check(tokens)?;
        let ids = self.be.ids(tokens)?;
        let (_, _, hf) = self.forward(&ids)?;
        let c = &self.config;
        let mut loss = self.be.sums(1)?;
        (self.be).lm_head_cross_entropy(
            &hf,
            c.hidden_size,
            &self.lm_head,
            c.vocab_size,
            &ids,
            None,
            &mut loss,
            0,
        )?;
        Ok(self.be.read_sums(&loss)?[0])
    }

    /// Loss of `tokens` and the gradient of every block linear: `sink(layer, idx, dW)`
    /// with idx in `Block::linears()` order and dW [out × in]. Layers come last to first.
    pub fn gradient(&self, tokens: &[u32], sink: &mut GradSink<'_, G::Buf>) -> Result<f64> {
        self.check(tokens)?;
        let mut loss = self.be.sums(1)?;
        self.gradient_on(&self.be.ids(tokens)?, &mut loss, 0, sink)?;
        Ok(self.be.read_sums(&loss)?[0])
    }

    /// [`GradModel::gradient`] of a sequence already on the backend (`ids`,
    /// checked by [`GradModel::check`]), its loss added to `loss[slot]`: no
    /// host transfer, so a GPU can record it once and replay it.
    pub fn gradient_on(
        &self,
        ids: &G::Ids,
        loss: &mut G::Sums,
        slot: usize,
        sink: &mut GradSink<'_, G::Buf>,
    ) -> Result<()> {
        let (be, c) = (&self.be, &self.config);
        let (n, d, eps) = (be.ids_len(ids), c.hidden_size, c.rms_norm_eps);
        anyhow::ensure!(
            n >= 2,
            "a sequence needs at least 2 tokens for a next-token loss, got {n}"
        );
        let (acts, h_last, hf) = self.forward(ids)?;
        let mut dhf = be.scratch(n * d)?;
        be.lm_head_cross_entropy(
            &hf,
            d,
            &self.lm_head,
            c.vocab_size,
            ids,
            Some(&mut dhf),
            loss,
            slot,
        )?;
        let mut dh = be.zeros(n * d)?;
        be.rms_norm_backward_add(&h_last, &self.final_norm, eps, &dhf, &mut dh)?;
        drop(dhf);
        let mut s = Sink {
            be,
            layer: 0,
            bufs: Vec::new(),
            f: sink,
        };
        for (l, (b, a)) in self.blocks.iter().zip(&acts).enumerate().rev() {
            s.layer = l;
            self.block_backward(b, a, n, &mut dh, &mut s)?;
        }
        Ok(())
    }

    /// Back-propagate `dh` (gradient w.r.t. the block output) to the block input, in place.
    fn block_backward(
        &self,
        b: &BlockF32<G::Buf>,
        a: &BlockActs<G::Buf>,
        n: usize,
        dh: &mut G::Buf,
        s: &mut Sink<'_, '_, G>,
    ) -> Result<()> {
        let (be, c) = (&self.be, &self.config);
        let (d, inter, eps) = (c.hidden_size, c.intermediate_size, c.rms_norm_eps);
        let nq = b.qkv.linears.len();
        let idx_o = nq;
        let idx_gu = nq + 1;
        let idx_down = idx_gu + b.gate_up.linears.len();

        // MLP: h_out = h_mid + down(silu(gate)·up), gate|up = proj(norm(h_mid)).
        let dn = &b.down_proj;
        s.weight_grad(idx_down, dn, dh, &a.act, n)?;
        let mut dact = be.scratch(n * inter)?;
        be.linear_backward_input(dh, n, &dn.w, dn.out_f, dn.in_f, &mut dact, false)?;
        let mut dgate = be.scratch(n * inter)?;
        let mut dup = be.scratch(n * inter)?;
        be.swiglu_backward(&a.gate, &a.up, &dact, &mut dgate, &mut dup)?;
        drop(dact);
        let mut dxn = be.scratch(n * d)?;
        b.gate_up
            .backward(be, &a.xn2, n, &[&dgate, &dup], &mut dxn, idx_gu, s)?;
        drop((dgate, dup));
        be.rms_norm_backward_add(&a.h_mid, &b.mlp_norm, eps, &dxn, dh)?;

        // Attention: h_mid = h_in + o(attn(rope(qn(q)), rope(kn(k)), v)), q|k|v = proj(norm(h_in)).
        let o = &b.o_proj;
        s.weight_grad(idx_o, o, dh, &a.att, n)?;
        let mut datt = be.scratch(n * c.q_dim())?;
        be.linear_backward_input(dh, n, &o.w, o.out_f, o.in_f, &mut datt, false)?;
        let mut dq = be.scratch(n * c.q_dim())?;
        let mut dk = be.scratch(n * c.kv_dim())?;
        let mut dv = be.scratch(n * c.kv_dim())?;
        be.attention_backward(
            &a.q,
            &a.k,
            &a.v,
            &datt,
            self.attn_shape(),
            &mut dq,
            &mut dk,
            &mut dv,
        )?;
        drop(datt);
        be.rope(&self.rope, &mut dq, c.num_heads, true)?;
        be.rope(&self.rope, &mut dk, c.num_kv_heads, true)?;
        if let (Some((qn, kn)), Some((q_pre, k_pre))) = (&b.qk_norm, &a.qk_pre) {
            let mut dq_pre = be.zeros(n * c.q_dim())?;
            be.rms_norm_backward_add(q_pre, qn, eps, &dq, &mut dq_pre)?;
            let mut dk_pre = be.zeros(n * c.kv_dim())?;
            be.rms_norm_backward_add(k_pre, kn, eps, &dk, &mut dk_pre)?;
            dq = dq_pre;
            dk = dk_pre;
        }
        b.qkv
            .backward(be, &a.xn1, n, &[&dq, &dk, &dv], &mut dxn, 0, s)?;
        be.rms_norm_backward_add(&a.h_in, &b.attn_norm, eps, &dxn, dh)
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
