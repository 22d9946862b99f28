//! Names and shapes of every linear layer of a model, per architecture: the one
//! place that knows Hugging Face tensor names, shared by loaders and quantizer.

use crate::{Architecture, ModelConfig};

/// Which projection a linear is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LinearKind {
    /// Query projection.
    Q,
    /// Key projection.
    K,
    /// Value projection.
    V,
    /// Fused q/k/v projection (Phi-3).
    Qkv,
    /// Attention output projection.
    O,
    /// MLP gate projection.
    Gate,
    /// MLP up projection.
    Up,
    /// Fused gate/up projection (Phi-3).
    GateUp,
    /// MLP down projection.
    Down,
}

impl LinearKind {
    /// Module name as Hugging Face spells it.
    pub fn hf_name(self) -> &'static str {
        match self {
            LinearKind::Q => "self_attn.q_proj",
            LinearKind::K => "self_attn.k_proj",
            LinearKind::V => "self_attn.v_proj",
            LinearKind::Qkv => "self_attn.qkv_proj",
            LinearKind::O => "self_attn.o_proj",
            LinearKind::Gate => "mlp.gate_proj",
            LinearKind::Up => "mlp.up_proj",
            LinearKind::GateUp => "mlp.gate_up_proj",
            LinearKind::Down => "mlp.down_proj",
        }
    }
}

/// One linear layer of a transformer block.
#[derive(Debug, Clone, PartialEq)]
pub struct LinearSpec {
    /// Block index.
    pub layer: usize,
    /// Projection.
    pub kind: LinearKind,
    /// Tensor-name prefix, e.g. `model.layers.3.self_attn.q_proj`.
    pub prefix: String,
    /// Output features.
    pub rows: usize,
    /// Input features.
    pub cols: usize,
    /// Carries `{prefix}.bias`.
    pub has_bias: bool,
}

impl LinearSpec {
    /// Name of the weight tensor in a Hugging Face checkpoint.
    pub fn weight_name(&self) -> String {
        format!("{}.weight", self.prefix)
    }

    /// Name of the bias tensor.
    pub fn bias_name(&self) -> String {
        format!("{}.bias", self.prefix)
    }

    /// Parameter count.
    pub fn size(&self) -> usize {
        self.rows * self.cols
    }
}

impl ModelConfig {
    /// The linears of block `layer`, in execution order.
    pub fn block_linears(&self, layer: usize) -> Vec<LinearSpec> {
        let (d, qd, kvd, inter) = (
            self.hidden_size,
            self.q_dim(),
            self.kv_dim(),
            self.intermediate_size,
        );
        let fused = self.arch == Architecture::Phi3;
        let mut v: Vec<(LinearKind, usize, usize, bool)> = Vec::new();
        if fused {
            v.push((LinearKind::Qkv, qd + 2 * kvd, d, self.qkv_bias));
        } else {
            v.push((LinearKind::Q, qd, d, self.qkv_bias));
            v.push((LinearKind::K, kvd, d, self.qkv_bias));
            v.push((LinearKind::V, kvd, d, self.qkv_bias));
        }
        v.push((LinearKind::O, d, qd, false));
        if fused {
            v.push((LinearKind::GateUp, 2 * inter, d, false));
        } else {
            v.push((LinearKind::Gate, inter, d, false));
            v.push((LinearKind::Up, inter, d, false));
        }
        v.push((LinearKind::Down, d, inter, false));
        v.into_iter()
            .map(|(kind, rows, cols, has_bias)| LinearSpec {
                layer,
                kind,
                prefix: format!("model.layers.{layer}.{}", kind.hf_name()),
                rows,
                cols,
                has_bias,
            })
            .collect()
    }

    /// Every quantizable linear of the model, block by block.
    pub fn linears(&self) -> Vec<LinearSpec> {
        (0..self.num_layers)
            .flat_map(|l| self.block_linears(l))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn phi3_is_fused_and_llama_is_not() {
        let base = r#""hidden_size":64,"intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"vocab_size":10"#;
        let l = ModelConfig::from_json_str(
            &format!(r#"{{"architectures":["LlamaForCausalLM"],{base}}}"#),
            Path::new("c"),
        )
        .unwrap();
        let p = ModelConfig::from_json_str(
            &format!(r#"{{"architectures":["Phi3ForCausalLM"],{base}}}"#),
            Path::new("c"),
        )
        .unwrap();
        assert_eq!(l.linears().len(), 14);
        assert_eq!(p.linears().len(), 8);
        let qkv = &p.block_linears(1)[0];
        assert_eq!(
            (qkv.prefix.as_str(), qkv.rows, qkv.cols),
            ("model.layers.1.self_attn.qkv_proj", 64 + 2 * 32, 64)
        );
        let down = l.block_linears(0).pop().unwrap();
        assert_eq!(
            (down.rows, down.cols, down.weight_name().as_str()),
            (64, 128, "model.layers.0.mlp.down_proj.weight")
        );
    }
}
