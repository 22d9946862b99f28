//! The decoder-only transformer (Llama family layout) and its forward pass.

mod forward;
mod loader;

pub use loader::LoadOptions;

use std::path::PathBuf;
use std::sync::Arc;

use dpllm_format::anyprec::AnyPrecInfo;
use dpllm_format::{ModelConfig, TensorData};

use crate::cpu::rope::Rope;
use crate::kv_cache::KvCache;
use crate::linear::{DenseLinear, Linear};
use crate::EngineError;

/// Query/key/value projections: three matrices, or one fused (Phi-3).
pub enum QkvProj {
    /// Separate q, k, v projections.
    Separate {
        /// Query projection.
        q: Box<dyn Linear>,
        /// Key projection.
        k: Box<dyn Linear>,
        /// Value projection.
        v: Box<dyn Linear>,
    },
    /// One [q + 2·kv, hidden] projection.
    Fused(Box<dyn Linear>),
}

/// Gate/up projections of the SwiGLU MLP: two matrices, or one fused (Phi-3).
pub enum GateUpProj {
    /// Separate gate and up projections.
    Separate {
        /// Gate projection.
        gate: Box<dyn Linear>,
        /// Up projection.
        up: Box<dyn Linear>,
    },
    /// One [2·intermediate, hidden] projection (gate rows first).
    Fused(Box<dyn Linear>),
}

/// One transformer block.
pub struct Block {
    /// RMSNorm before attention.
    pub attn_norm: Vec<f32>,
    /// q/k/v projections.
    pub qkv: QkvProj,
    /// Per-head RMSNorm weights on q and k (Qwen3).
    pub qk_norm: Option<(Vec<f32>, Vec<f32>)>,
    /// Attention output projection.
    pub o_proj: Box<dyn Linear>,
    /// RMSNorm before the MLP.
    pub mlp_norm: Vec<f32>,
    /// gate/up projections.
    pub gate_up: GateUpProj,
    /// MLP down projection.
    pub down_proj: Box<dyn Linear>,
}

impl Block {
    /// Every linear of the block with a short name, in execution order.
    pub fn linears(&self) -> Vec<(&'static str, &dyn Linear)> {
        let mut v: Vec<(&'static str, &dyn Linear)> = Vec::new();
        match &self.qkv {
            QkvProj::Separate { q, k, v: vv } => {
                v.push(("q_proj", q.as_ref()));
                v.push(("k_proj", k.as_ref()));
                v.push(("v_proj", vv.as_ref()));
            }
            QkvProj::Fused(f) => v.push(("qkv_proj", f.as_ref())),
        }
        v.push(("o_proj", self.o_proj.as_ref()));
        match &self.gate_up {
            GateUpProj::Separate { gate, up } => {
                v.push(("gate_proj", gate.as_ref()));
                v.push(("up_proj", up.as_ref()));
            }
            GateUpProj::Fused(f) => v.push(("gate_up_proj", f.as_ref())),
        }
        v.push(("down_proj", self.down_proj.as_ref()));
        v
    }
}

/// A loaded causal language model.
pub struct Model {
    /// Validated config.
    pub config: ModelConfig,
    /// Directory it was loaded from.
    pub dir: PathBuf,
    embed: Arc<TensorData>,
    /// Transformer blocks.
    pub blocks: Vec<Block>,
    final_norm: Vec<f32>,
    lm_head: DenseLinear,
    rope: Rope,
    anyprec: Option<AnyPrecInfo>,
}

impl Model {
    /// A fresh KV cache sized for `capacity` positions (at most the trained context unless asked).
    pub fn new_cache(&self, capacity: usize) -> KvCache {
        KvCache::new(self.config.num_layers, self.config.kv_dim(), capacity)
    }

    /// Average weight bytes read per token by a run whose precisions `stats` counted
    /// (quantized linears at the precisions they ran at, plus every dense layer).
    pub fn weight_bytes_per_token(&self, stats: &crate::select::BitStats) -> f64 {
        let mut bytes = self.lm_head.weight_bytes() as f64;
        for (g, (_, lin)) in self.blocks.iter().flat_map(|b| b.linears()).enumerate() {
            let c = &stats.counts[g];
            let tokens: u64 = c.iter().sum();
            bytes += match lin.as_anyprec() {
                Some(q) if tokens > 0 => {
                    c.iter().enumerate().filter(|(_, &k)| k > 0).map(|(b, &k)| q.bytes_at(b as u32) as f64 * k as f64).sum::<f64>() / tokens as f64
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

    /// Run every quantized linear at `bits` (uniform precision).
    pub fn set_bits(&self, bits: u32) -> Result<(), EngineError> {
        if self.anyprec.is_none() {
            return Err(EngineError::NotAnyPrecision);
        }
        for b in &self.blocks {
            for (name, l) in b.linears() {
                if let Some(q) = l.as_anyprec() {
                    q.set_bits(bits).map_err(|e| EngineError::Bits(format!("{name}: {e}")))?;
                }
            }
        }
        Ok(())
    }

    /// Precision range every quantized linear can run at (seed..=loaded max).
    pub fn bits_range(&self) -> Option<(u32, u32)> {
        let q = self.blocks.first()?.linears().into_iter().find_map(|(_, l)| l.as_anyprec().map(|q| (q.seed_bits(), q.max_bits())));
        q
    }

    /// The embedding matrix [vocab × hidden] as f32.
    pub fn embedding_f32(&self) -> Vec<f32> {
        self.embed.to_f32()
    }

    /// Weights of the final RMSNorm.
    pub fn final_norm(&self) -> &[f32] {
        &self.final_norm
    }

    /// The output projection [vocab × hidden] (the embedding when tied).
    pub fn lm_head(&self) -> &DenseLinear {
        &self.lm_head
    }

    /// The model's rotary embedding.
    pub fn rope(&self) -> &Rope {
        &self.rope
    }
}
