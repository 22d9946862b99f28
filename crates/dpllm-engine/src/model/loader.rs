//! Building a [`Model`] from a checkpoint directory, per architecture.

use std::path::Path;
use std::sync::Arc;

use dpllm_format::{Architecture, Checkpoint, FormatError, ModelConfig};

use super::{Block, GateUpProj, Model, QkvProj};
use crate::cpu::rope::Rope;
use crate::linear::{DenseLinear, Linear};

struct Loader<'a> {
    ck: &'a Checkpoint,
}

impl Loader<'_> {
    fn dense(&self, name: &str, rows: usize, cols: usize, bias: Option<&str>) -> Result<Box<dyn Linear>, FormatError> {
        let w = self.ck.tensor(name, &[rows, cols])?;
        let b = bias.map(|b| self.ck.tensor_f32(b, &[rows])).transpose()?;
        Ok(Box::new(DenseLinear::new(Arc::new(w), rows, cols, b)))
    }

    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>, FormatError> {
        self.ck.tensor_f32(name, &[len])
    }
}

impl Model {
    /// Load the model in `dir` (config.json + safetensors shards).
    pub fn load(dir: &Path) -> Result<Model, FormatError> {
        let config = ModelConfig::from_dir(dir)?;
        let ck = Checkpoint::open(dir)?;
        Self::from_checkpoint(config, &ck)
    }

    /// Build the model from an opened checkpoint.
    pub fn from_checkpoint(config: ModelConfig, ck: &Checkpoint) -> Result<Model, FormatError> {
        let c = &config;
        let ld = Loader { ck };
        let (d, qd, kvd, inter) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
        let embed = Arc::new(ck.tensor("model.embed_tokens.weight", &[c.vocab_size, d])?);
        let mut blocks = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let p = format!("model.layers.{i}.");
            let n = |s: &str| format!("{p}{s}");
            let bias = |s: &str| c.qkv_bias.then(|| n(s));
            let qkv = if c.arch == Architecture::Phi3 {
                QkvProj::Fused(ld.dense(&n("self_attn.qkv_proj.weight"), qd + 2 * kvd, d, None)?)
            } else {
                QkvProj::Separate {
                    q: ld.dense(&n("self_attn.q_proj.weight"), qd, d, bias("self_attn.q_proj.bias").as_deref())?,
                    k: ld.dense(&n("self_attn.k_proj.weight"), kvd, d, bias("self_attn.k_proj.bias").as_deref())?,
                    v: ld.dense(&n("self_attn.v_proj.weight"), kvd, d, bias("self_attn.v_proj.bias").as_deref())?,
                }
            };
            let gate_up = if c.arch == Architecture::Phi3 {
                GateUpProj::Fused(ld.dense(&n("mlp.gate_up_proj.weight"), 2 * inter, d, None)?)
            } else {
                GateUpProj::Separate {
                    gate: ld.dense(&n("mlp.gate_proj.weight"), inter, d, None)?,
                    up: ld.dense(&n("mlp.up_proj.weight"), inter, d, None)?,
                }
            };
            let qk_norm = if c.qk_norm {
                Some((ld.vector(&n("self_attn.q_norm.weight"), c.head_dim)?, ld.vector(&n("self_attn.k_norm.weight"), c.head_dim)?))
            } else {
                None
            };
            blocks.push(Block {
                attn_norm: ld.vector(&n("input_layernorm.weight"), d)?,
                qkv,
                qk_norm,
                o_proj: ld.dense(&n("self_attn.o_proj.weight"), d, qd, None)?,
                mlp_norm: ld.vector(&n("post_attention_layernorm.weight"), d)?,
                gate_up,
                down_proj: ld.dense(&n("mlp.down_proj.weight"), d, inter, None)?,
            });
        }
        let lm_head = if c.tie_word_embeddings || !ck.contains("lm_head.weight") {
            if !c.tie_word_embeddings {
                return Err(FormatError::MissingTensor { name: "lm_head.weight".into(), dir: ck.dir().into() });
            }
            DenseLinear::new(embed.clone(), c.vocab_size, d, None)
        } else {
            DenseLinear::new(Arc::new(ck.tensor("lm_head.weight", &[c.vocab_size, d])?), c.vocab_size, d, None)
        };
        Ok(Model {
            rope: Rope::new(c),
            final_norm: ld.vector("model.norm.weight", d)?,
            embed,
            blocks,
            lm_head,
            dir: ck.dir().into(),
            config,
        })
    }
}
