//! The decoder-only transformer (Llama family layout) and its forward pass,
//! generic over the [`Backend`] that holds its weights and runs its ops.

mod batch;
mod forward;
mod graph;
mod loader;
pub mod rope;
pub mod synthetic;

pub use batch::BatchStep;
pub use forward::{Next, Readout};
pub(crate) use graph::GraphSlot;
pub use loader::LoadOptions;

use std::path::PathBuf;
use std::sync::Arc;

use dpllm_format::anyprec::AnyPrecInfo;
use dpllm_format::ModelConfig;

use crate::backend::cpu::{CpuBackend, DenseLinear};
use crate::backend::Backend;
use crate::kv_cache::KvCache;
use crate::linear::Linear;
use crate::select::Precision;
use crate::EngineError;
use rope::Rope;

/// Query/key/value projections: three matrices, or one fused (Phi-3).
pub enum QkvProj<B: Backend = CpuBackend> {
    /// Separate q, k, v projections.
    Separate {
        /// Query projection.
        q: Linear<B>,
        /// Key projection.
        k: Linear<B>,
        /// Value projection.
        v: Linear<B>,
    },
    /// One [q + 2·kv, hidden] projection.
    Fused(Linear<B>),
}

/// Gate/up projections of the SwiGLU MLP: two matrices, or one fused (Phi-3).
pub enum GateUpProj<B: Backend = CpuBackend> {
    /// Separate gate and up projections.
    Separate {
        /// Gate projection.
        gate: Linear<B>,
        /// Up projection.
        up: Linear<B>,
    },
    /// One [2·intermediate, hidden] projection (gate rows first).
    Fused(Linear<B>),
}

/// One transformer block.
pub struct Block<B: Backend = CpuBackend> {
    /// RMSNorm before attention.
    pub attn_norm: B::Buf,
    /// q/k/v projections.
    pub qkv: QkvProj<B>,
    /// Per-head RMSNorm weights on q and k (Qwen3).
    pub qk_norm: Option<(B::Buf, B::Buf)>,
    /// Attention output projection.
    pub o_proj: Linear<B>,
    /// RMSNorm before the MLP.
    pub mlp_norm: B::Buf,
    /// gate/up projections.
    pub gate_up: GateUpProj<B>,
    /// MLP down projection.
    pub down_proj: Linear<B>,
}

impl<B: Backend> Block<B> {
    /// Linears of the q/k/v projection (3, or 1 fused): the block's linears
    /// `0..qkv_linears()`, then o_proj.
    pub fn qkv_linears(&self) -> usize {
        match &self.qkv {
            QkvProj::Separate { .. } => 3,
            QkvProj::Fused(_) => 1,
        }
    }

    /// Linears of the gate/up projection (2, or 1 fused), after o_proj.
    pub fn gate_up_linears(&self) -> usize {
        match &self.gate_up {
            GateUpProj::Separate { .. } => 2,
            GateUpProj::Fused(_) => 1,
        }
    }

    /// Every linear of the block with a short name, in execution order.
    pub fn linears(&self) -> Vec<(&'static str, &Linear<B>)> {
        let mut v: Vec<(&'static str, &Linear<B>)> = Vec::new();
        match &self.qkv {
            QkvProj::Separate { q, k, v: vv } => {
                v.push(("q_proj", q));
                v.push(("k_proj", k));
                v.push(("v_proj", vv));
            }
            QkvProj::Fused(f) => v.push(("qkv_proj", f)),
        }
        v.push(("o_proj", &self.o_proj));
        match &self.gate_up {
            GateUpProj::Separate { gate, up } => {
                v.push(("gate_proj", gate));
                v.push(("up_proj", up));
            }
            GateUpProj::Fused(f) => v.push(("gate_up_proj", f)),
        }
        v.push(("down_proj", &self.down_proj));
        v
    }
}

/// A loaded causal language model on backend `B`.
pub struct Model<B: Backend = CpuBackend> {
    /// Validated config.
    pub config: ModelConfig,
    /// Directory it was loaded from.
    pub dir: PathBuf,
    /// The backend holding the weights and running the ops.
    pub backend: B,
    embed: Arc<B::Dense>,
    /// Transformer blocks.
    pub blocks: Vec<Block<B>>,
    final_norm: B::Buf,
    lm_head: Linear<B>,
    rope: Rope,
    /// cos/sin of every position up to the context window, on the backend.
    rope_table: B::Buf,
    anyprec: Option<AnyPrecInfo>,
}

impl<B: Backend> Model<B> {
    /// A fresh KV cache sized for `capacity` positions.
    pub fn new_cache(&self, capacity: usize) -> KvCache<B> {
        KvCache::new(
            self.backend.clone(),
            self.config.num_layers,
            self.config.kv_dim(),
            capacity,
        )
    }

    /// Average weight bytes read per token by a run whose precisions `stats` counted
    /// (quantized linears at the precisions they ran at, plus every dense layer).
    pub fn weight_bytes_per_token(&self, stats: &crate::select::BitStats) -> f64 {
        let mut bytes = self.lm_head.weight_bytes() as f64;
        for (g, (_, lin)) in self.blocks.iter().flat_map(|b| b.linears()).enumerate() {
            let c = &stats.counts[g];
            let tokens: u64 = c.iter().sum();
            bytes += match lin.bits_range() {
                Some(_) if tokens > 0 => {
                    c.iter()
                        .enumerate()
                        .filter(|(_, &k)| k > 0)
                        .map(|(b, &k)| lin.bytes_at(b as u32) as f64 * k as f64)
                        .sum::<f64>()
                        / tokens as f64
                }
                _ => lin.weight_bytes() as f64,
            };
        }
        bytes
    }

    /// Facts of the any-precision file, when this is a quantized model.
    pub fn anyprec_info(&self) -> Option<&AnyPrecInfo> {
        self.anyprec.as_ref()
    }

    /// Check that this model can run a call at `prec`: uniform bits within the
    /// loaded range of an any-precision model, a plan made for this model.
    pub fn check_precision(&self, prec: Precision<'_, B>) -> Result<(), EngineError> {
        match prec {
            Precision::Highest => Ok(()),
            Precision::Uniform(bits) => {
                let (lo, hi) = self.bits_range().ok_or(EngineError::NotAnyPrecision)?;
                if !(lo..=hi).contains(&bits) {
                    return Err(EngineError::Bits(format!("{bits} bits is outside the loaded range {lo}..={hi} (the bits every linear holds; load the model with more planes to run higher)")));
                }
                Ok(())
            }
            Precision::Max(p) | Precision::Dynamic(p) => {
                if p.blocks.len() != self.blocks.len()
                    || p.blocks
                        .iter()
                        .zip(&self.blocks)
                        .any(|(s, b)| s.len() != b.linears().len())
                {
                    return Err(EngineError::Plan(
                        "the plan was made for a model with other layers".into(),
                    ));
                }
                Ok(())
            }
        }
    }

    /// Precision range every quantized linear can run at: the highest seed
    /// to the lowest loaded maximum (a model loaded for a memory budget holds
    /// fewer planes in some linears; then the range may be empty, lo > hi).
    pub fn bits_range(&self) -> Option<(u32, u32)> {
        self.blocks
            .iter()
            .flat_map(|b| b.linears())
            .filter_map(|(_, l)| l.bits_range())
            .reduce(|(lo, hi), (l, h)| (lo.max(l), hi.min(h)))
    }

    /// The output projection [vocab × hidden] (the embedding when tied).
    pub fn lm_head(&self) -> &Linear<B> {
        &self.lm_head
    }

    /// The model's rotary embedding.
    pub fn rope(&self) -> &Rope {
        &self.rope
    }
}

/// Host access to the weights of a model on the CPU backend.
impl Model<CpuBackend> {
    /// The embedding matrix [vocab × hidden] as f32.
    pub fn embedding_f32(&self) -> Vec<f32> {
        self.embed.weight_f32()
    }

    /// The embedding table.
    pub fn embedding(&self) -> &DenseLinear {
        &self.embed
    }

    /// Weights of the final RMSNorm.
    pub fn final_norm(&self) -> &[f32] {
        &self.final_norm
    }
}
