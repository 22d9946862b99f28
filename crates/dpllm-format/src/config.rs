//! `config.json` of a Hugging Face causal LM, reduced to what the engine needs.

use std::path::Path;

use serde_json::Value;

use crate::{FormatError, Result};

/// Supported model families.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// Llama 2 / 3 / 3.1 / 3.2 (`LlamaForCausalLM`).
    Llama,
    /// Mistral (`MistralForCausalLM`).
    Mistral,
    /// Qwen2 / Qwen2.5 (`Qwen2ForCausalLM`): q/k/v bias.
    Qwen2,
    /// Qwen3 (`Qwen3ForCausalLM`): RMSNorm on q and k per head.
    Qwen3,
    /// Phi-3 (`Phi3ForCausalLM`): fused qkv and gate_up projections.
    Phi3,
}

impl Architecture {
    /// Every supported `architectures` name.
    pub const SUPPORTED: &'static [(&'static str, Architecture)] = &[
        ("LlamaForCausalLM", Architecture::Llama),
        ("MistralForCausalLM", Architecture::Mistral),
        ("Qwen2ForCausalLM", Architecture::Qwen2),
        ("Qwen3ForCausalLM", Architecture::Qwen3),
        ("Phi3ForCausalLM", Architecture::Phi3),
    ];

    /// The Hugging Face class name.
    pub fn hf_name(self) -> &'static str {
        Self::SUPPORTED
            .iter()
            .find(|(_, a)| *a == self)
            .map(|(n, _)| *n)
            .unwrap_or("?")
    }

    fn from_model_type(t: &str) -> Option<Architecture> {
        Some(match t {
            "llama" => Architecture::Llama,
            "mistral" => Architecture::Mistral,
            "qwen2" => Architecture::Qwen2,
            "qwen3" => Architecture::Qwen3,
            "phi3" => Architecture::Phi3,
            _ => return None,
        })
    }
}

/// Frequency scaling applied to RoPE.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Position interpolation: frequencies divided by `factor`.
    Linear {
        /// Scale factor.
        factor: f64,
    },
    /// Llama 3.1 frequency-dependent scaling.
    Llama3 {
        /// Scale factor for low frequencies.
        factor: f64,
        /// Wavelength band edge (low).
        low_freq_factor: f64,
        /// Wavelength band edge (high).
        high_freq_factor: f64,
        /// Context length of the original model.
        original_max_position_embeddings: f64,
    },
}

/// Rotary position embedding settings.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    /// Base of the frequencies.
    pub theta: f64,
    /// Fraction of each head's dimensions that rotate (Phi-3: may be < 1).
    pub partial_rotary_factor: f64,
    /// Frequency scaling.
    pub scaling: RopeScaling,
}

/// The parts of a model's config the engine uses, validated.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    /// Model family.
    pub arch: Architecture,
    /// Model width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Number of transformer blocks.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (GQA when fewer than `num_heads`).
    pub num_kv_heads: usize,
    /// Per-head dimension.
    pub head_dim: usize,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f32,
    /// Positional encoding.
    pub rope: RopeConfig,
    /// lm_head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry a bias.
    pub qkv_bias: bool,
    /// Per-head RMSNorm on q and k (Qwen3).
    pub qk_norm: bool,
    /// Attention window (tokens) when the model uses sliding-window attention.
    pub sliding_window: Option<usize>,
    /// Trained context length.
    pub max_position_embeddings: usize,
    /// Beginning-of-sequence token.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence tokens.
    pub eos_token_ids: Vec<u32>,
}

fn get_usize(v: &Value, key: &str, path: &Path) -> Result<usize> {
    v.get(key)
        .and_then(Value::as_u64)
        .map(|x| x as usize)
        .ok_or_else(|| {
            FormatError::invalid(
                path,
                format!("field {key:?} is missing or not a non-negative integer"),
            )
        })
}

fn opt_usize(v: &Value, key: &str) -> Option<usize> {
    v.get(key).and_then(Value::as_u64).map(|x| x as usize)
}

fn opt_f64(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64)
}

fn opt_bool(v: &Value, key: &str) -> Option<bool> {
    v.get(key).and_then(Value::as_bool)
}

fn token_ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_u64)
            .map(|x| x as u32)
            .collect(),
        _ => Vec::new(),
    }
}

fn parse_rope(v: &Value, path: &Path) -> Result<RopeConfig> {
    // transformers >= 5 writes `rope_parameters`; older configs use top-level
    // `rope_theta` plus an optional `rope_scaling` object.
    let params = v.get("rope_parameters").filter(|p| p.is_object());
    let scaling = params.or_else(|| v.get("rope_scaling").filter(|p| p.is_object()));
    let theta = params
        .and_then(|p| opt_f64(p, "rope_theta"))
        .or_else(|| opt_f64(v, "rope_theta"))
        .unwrap_or(10000.0);
    let partial = params
        .and_then(|p| opt_f64(p, "partial_rotary_factor"))
        .or_else(|| opt_f64(v, "partial_rotary_factor"))
        .unwrap_or(1.0);
    if !(theta > 0.0 && theta.is_finite() && partial > 0.0 && partial <= 1.0) {
        return Err(FormatError::invalid(
            path,
            format!("bad RoPE settings: theta {theta}, partial_rotary_factor {partial}"),
        ));
    }
    let scaling = match scaling {
        None => RopeScaling::None,
        Some(s) => {
            let kind = s
                .get("rope_type")
                .or_else(|| s.get("type"))
                .and_then(Value::as_str)
                .unwrap_or("default");
            let need = |k: &str| {
                opt_f64(s, k).ok_or_else(|| {
                    FormatError::invalid(path, format!("rope scaling {kind:?} needs field {k:?}"))
                })
            };
            match kind {
                "default" => RopeScaling::None,
                "linear" => RopeScaling::Linear { factor: need("factor")? },
                "llama3" => RopeScaling::Llama3 {
                    factor: need("factor")?,
                    low_freq_factor: need("low_freq_factor")?,
                    high_freq_factor: need("high_freq_factor")?,
                    original_max_position_embeddings: need("original_max_position_embeddings")?,
                },
                other => {
                    return Err(FormatError::invalid(
                        path,
                        format!("rope scaling type {other:?} is not supported (supported: default, linear, llama3)"),
                    ))
                }
            }
        }
    };
    let factors: Vec<f64> = match &scaling {
        RopeScaling::None => vec![],
        RopeScaling::Linear { factor } => vec![*factor],
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            if low_freq_factor >= high_freq_factor {
                return Err(FormatError::invalid(path, format!("rope scaling: low_freq_factor {low_freq_factor} must be below high_freq_factor {high_freq_factor}")));
            }
            vec![
                *factor,
                *low_freq_factor,
                *high_freq_factor,
                *original_max_position_embeddings,
            ]
        }
    };
    if let Some(f) = factors.iter().find(|f| !(f.is_finite() && **f > 0.0)) {
        return Err(FormatError::invalid(
            path,
            format!("rope scaling factor {f} must be a positive finite number"),
        ));
    }
    Ok(RopeConfig {
        theta,
        partial_rotary_factor: partial,
        scaling,
    })
}

impl ModelConfig {
    /// Read and validate `DIR/config.json` (or, for a GGUF file, its metadata).
    pub fn from_dir(dir: &Path) -> Result<ModelConfig> {
        if crate::gguf::is_gguf(dir) {
            return Ok(crate::gguf::model::config(&crate::gguf::GgufFile::open(dir)?)?.1);
        }
        let path = dir.join("config.json");
        if !path.exists() {
            return Err(FormatError::Missing {
                path,
                what: "every Hugging Face model directory has a config.json".into(),
            });
        }
        let text = std::fs::read_to_string(&path).map_err(|e| FormatError::io(&path, e))?;
        Self::from_json_str(&text, &path)
    }

    /// Parse a config from JSON text; `path` is used in error messages.
    pub fn from_json_str(text: &str, path: &Path) -> Result<ModelConfig> {
        let v: Value = serde_json::from_str(text)
            .map_err(|e| FormatError::invalid(path, format!("not valid JSON: {e}")))?;
        let arch_name = v
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(Value::as_str)
            .map(str::to_string);
        let supported = Architecture::SUPPORTED
            .iter()
            .map(|(n, _)| *n)
            .collect::<Vec<_>>()
            .join(", ");
        let arch = match &arch_name {
            Some(name) => Architecture::SUPPORTED
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, a)| *a)
                .ok_or_else(|| FormatError::UnsupportedArchitecture {
                    path: path.into(),
                    name: name.clone(),
                    supported: supported.clone(),
                })?,
            None => {
                let mt = v.get("model_type").and_then(Value::as_str).unwrap_or("");
                Architecture::from_model_type(mt).ok_or_else(|| {
                    FormatError::UnsupportedArchitecture {
                        path: path.into(),
                        name: if mt.is_empty() {
                            "<no architectures or model_type>".into()
                        } else {
                            mt.to_string()
                        },
                        supported: supported.clone(),
                    }
                })?
            }
        };
        let hidden_size = get_usize(&v, "hidden_size", path)?;
        let num_heads = get_usize(&v, "num_attention_heads", path)?;
        let num_kv_heads = opt_usize(&v, "num_key_value_heads").unwrap_or(num_heads);
        if num_heads == 0 || hidden_size == 0 {
            return Err(FormatError::invalid(
                path,
                "hidden_size and num_attention_heads must be positive",
            ));
        }
        let head_dim = opt_usize(&v, "head_dim").unwrap_or(hidden_size / num_heads);
        if num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(FormatError::invalid(
                path,
                format!("num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}"),
            ));
        }
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(FormatError::invalid(
                path,
                format!("head_dim {head_dim} must be positive and even"),
            ));
        }
        let act = v
            .get("hidden_act")
            .and_then(Value::as_str)
            .unwrap_or("silu");
        if act != "silu" {
            return Err(FormatError::invalid(
                path,
                format!("hidden_act {act:?} is not supported (only silu / SwiGLU)"),
            ));
        }
        if opt_bool(&v, "mlp_bias").unwrap_or(false) {
            return Err(FormatError::invalid(
                path,
                "mlp_bias = true is not supported",
            ));
        }
        let sliding_window = match arch {
            Architecture::Qwen2 | Architecture::Qwen3 => {
                if opt_bool(&v, "use_sliding_window").unwrap_or(false) {
                    return Err(FormatError::invalid(
                        path,
                        "use_sliding_window = true is not supported for Qwen models",
                    ));
                }
                None
            }
            _ => opt_usize(&v, "sliding_window").filter(|&w| w > 0),
        };
        let rope = parse_rope(&v, path)?;
        let rot = (head_dim as f64 * rope.partial_rotary_factor).round() as usize;
        if rot == 0 || !rot.is_multiple_of(2) {
            return Err(FormatError::invalid(
                path,
                format!("rotary dimension {rot} must be positive and even"),
            ));
        }
        let cfg = ModelConfig {
            arch,
            hidden_size,
            intermediate_size: get_usize(&v, "intermediate_size", path)?,
            num_layers: get_usize(&v, "num_hidden_layers", path)?,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size: get_usize(&v, "vocab_size", path)?,
            rms_norm_eps: opt_f64(&v, "rms_norm_eps").unwrap_or(1e-6) as f32,
            rope,
            tie_word_embeddings: opt_bool(&v, "tie_word_embeddings").unwrap_or(false),
            qkv_bias: match arch {
                Architecture::Qwen2 => true,
                _ => opt_bool(&v, "attention_bias").unwrap_or(false),
            },
            qk_norm: arch == Architecture::Qwen3,
            sliding_window,
            max_position_embeddings: opt_usize(&v, "max_position_embeddings").unwrap_or(4096),
            bos_token_id: v
                .get("bos_token_id")
                .and_then(Value::as_u64)
                .map(|x| x as u32),
            eos_token_ids: token_ids(v.get("eos_token_id")),
        };
        if cfg.intermediate_size == 0 || cfg.num_layers == 0 || cfg.vocab_size == 0 {
            return Err(FormatError::invalid(
                path,
                "intermediate_size, num_hidden_layers and vocab_size must be positive",
            ));
        }
        let eps = opt_f64(&v, "rms_norm_eps").unwrap_or(1e-6);
        if !(eps > 0.0 && eps.is_finite() && cfg.rms_norm_eps > 0.0) {
            return Err(FormatError::invalid(
                path,
                format!(
                    "rms_norm_eps {eps} must be a positive number (at least {:e} in f32)",
                    f32::MIN_POSITIVE
                ),
            ));
        }
        if cfg.max_position_embeddings == 0 {
            return Err(FormatError::invalid(
                path,
                "max_position_embeddings must be positive",
            ));
        }
        // Sizes far beyond any real model are corrupt values, and would overflow size arithmetic.
        let limits = [
            ("hidden_size", cfg.hidden_size, 1 << 20),
            ("intermediate_size", cfg.intermediate_size, 1 << 22),
            ("num_hidden_layers", cfg.num_layers, 1 << 12),
            ("num_attention_heads", cfg.num_heads, 1 << 12),
            ("head_dim", cfg.head_dim, 1 << 14),
            ("vocab_size", cfg.vocab_size, 1 << 24),
            (
                "max_position_embeddings",
                cfg.max_position_embeddings,
                1 << 24,
            ),
        ];
        for (name, value, max) in limits {
            if value > max {
                return Err(FormatError::invalid(
                    path,
                    format!("{name} {value} is beyond what dpllm supports ({max})"),
                ));
            }
        }
        if cfg.sliding_window.is_some_and(|w| w > 1 << 24) {
            return Err(FormatError::invalid(
                path,
                "sliding_window is beyond what dpllm supports",
            ));
        }
        if cfg
            .bos_token_id
            .is_some_and(|t| t as usize >= cfg.vocab_size)
            || cfg
                .eos_token_ids
                .iter()
                .any(|&t| t as usize >= cfg.vocab_size)
        {
            return Err(FormatError::invalid(
                path,
                format!(
                    "bos_token_id / eos_token_id must be below vocab_size {}",
                    cfg.vocab_size
                ),
            ));
        }
        Ok(cfg)
    }

    /// Check that a checkpoint holds no blocks beyond `num_hidden_layers`: a config
    /// that undercounts the layers would otherwise run a silently smaller model.
    pub fn check_layer_count(&self, ck: &crate::Checkpoint) -> Result<()> {
        let beyond = ck
            .tensors()
            .keys()
            .filter_map(|n| {
                n.strip_prefix("model.layers.")?
                    .split('.')
                    .next()?
                    .parse::<usize>()
                    .ok()
            })
            .filter(|&l| l >= self.num_layers)
            .max();
        match beyond {
            Some(l) => Err(FormatError::invalid(
                ck.dir().join("config.json"),
                format!("num_hidden_layers is {}, but the weights hold layers up to model.layers.{l} ({} layers)", self.num_layers, l + 1),
            )),
            None => Ok(()),
        }
    }

    /// Number of dimensions per head that RoPE rotates.
    pub fn rotary_dim(&self) -> usize {
        (self.head_dim as f64 * self.rope.partial_rotary_factor).round() as usize
    }

    /// Width of the query projection output.
    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    /// Width of the key (and value) projection output.
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<ModelConfig> {
        ModelConfig::from_json_str(s, Path::new("config.json"))
    }

    const BASE: &str = r#""hidden_size":64,"intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4,"vocab_size":100"#;

    #[test]
    fn old_and_new_rope_layouts_agree() {
        let old = parse(&format!(r#"{{"architectures":["LlamaForCausalLM"],{BASE},"rope_theta":500000.0,
            "rope_scaling":{{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192}}}}"#)).unwrap();
        let new = parse(&format!(r#"{{"architectures":["LlamaForCausalLM"],{BASE},
            "rope_parameters":{{"rope_type":"llama3","rope_theta":500000.0,"factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192}}}}"#)).unwrap();
        assert_eq!(old.rope, new.rope);
        assert_eq!(old.rope.theta, 500000.0);
        assert!(matches!(old.rope.scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
        assert_eq!(old.num_kv_heads, 4);
        assert_eq!(old.head_dim, 16);
    }

    #[test]
    fn unknown_architecture_is_named() {
        let e = parse(&format!(
            r#"{{"architectures":["GPT2LMHeadModel"],{BASE}}}"#
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("GPT2LMHeadModel") && e.contains("LlamaForCausalLM"),
            "{e}"
        );
    }

    #[test]
    fn missing_field_and_bad_gqa_are_errors() {
        let e = parse(r#"{"architectures":["LlamaForCausalLM"],"hidden_size":64}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("num_attention_heads"), "{e}");
        let e = parse(&format!(
            r#"{{"architectures":["LlamaForCausalLM"],{BASE},"num_key_value_heads":3}}"#
        ))
        .unwrap_err();
        assert!(e.to_string().contains("multiple"), "{e}");
        let e = parse("{not json").unwrap_err();
        assert!(e.to_string().contains("JSON"), "{e}");
    }

    #[test]
    fn non_positive_eps_and_absurd_sizes_are_errors() {
        for eps in ["0", "-1e-5", "1e-60"] {
            let e = parse(&format!(
                r#"{{"architectures":["LlamaForCausalLM"],{BASE},"rms_norm_eps":{eps}}}"#
            ))
            .unwrap_err()
            .to_string();
            assert!(e.contains("rms_norm_eps"), "{eps}: {e}");
        }
        let e = parse(r#"{"architectures":["LlamaForCausalLM"],"hidden_size":64,"intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4,"vocab_size":100000000000}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("vocab_size"), "{e}");
        let e = parse(&format!(
            r#"{{"architectures":["LlamaForCausalLM"],{BASE},"max_position_embeddings":0}}"#
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("max_position_embeddings"), "{e}");
        let e = parse(&format!(
            r#"{{"architectures":["LlamaForCausalLM"],{BASE},"eos_token_id":100}}"#
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("eos_token_id"), "{e}");
        let e = parse(&format!(r#"{{"architectures":["LlamaForCausalLM"],{BASE},"rope_scaling":{{"type":"linear","factor":-2.0}}}}"#)).unwrap_err().to_string();
        assert!(e.contains("factor"), "{e}");
    }

    #[test]
    fn unsupported_rope_type_is_an_error() {
        let e = parse(&format!(r#"{{"architectures":["Phi3ForCausalLM"],{BASE},"rope_scaling":{{"type":"longrope","factor":4.0}}}}"#))
            .unwrap_err()
            .to_string();
        assert!(e.contains("longrope"), "{e}");
    }

    #[test]
    fn family_specific_flags() {
        let q2 = parse(&format!(
            r#"{{"architectures":["Qwen2ForCausalLM"],{BASE},"eos_token_id":[5,6]}}"#
        ))
        .unwrap();
        assert!(q2.qkv_bias && !q2.qk_norm);
        assert_eq!(q2.eos_token_ids, vec![5, 6]);
        let q3 = parse(&format!(r#"{{"model_type":"qwen3",{BASE},"head_dim":32}}"#)).unwrap();
        assert!(q3.qk_norm && q3.head_dim == 32 && q3.q_dim() == 128);
        let m = parse(&format!(
            r#"{{"architectures":["MistralForCausalLM"],{BASE},"sliding_window":4096}}"#
        ))
        .unwrap();
        assert_eq!(m.sliding_window, Some(4096));
    }
}
