//! Models with random weights made on the backend, for benchmarks at shapes
//! no file here holds (an 8B model on a GPU): the forward pass is the real
//! one, only the numbers are random.

use std::path::PathBuf;
use std::sync::Arc;

use dpllm_format::anyprec::AnyPrecInfo;
use dpllm_format::{LinearSpec, ModelConfig};

use super::loader::WeightSource;
use super::Model;
use crate::backend::Backend;
use crate::error::{EngineError, Result};
use crate::linear::Linear;

/// What the linears of a synthetic model hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyntheticWeights {
    /// Any-precision bit-planes at precisions 3..=`max_bits`.
    AnyPrec {
        /// Highest precision held.
        max_bits: u32,
    },
    /// Dense f16 (the reference every quantized run is compared with).
    DenseF16,
}

/// Shapes of well-known models, as Hugging Face `config.json` text.
pub fn synthetic_config(name: &str) -> Result<ModelConfig> {
    let json = match name {
        "llama3-8b" => {
            r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
            "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "tie_word_embeddings": false}"#
        }
        "smollm2-135m" => {
            r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
            "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
            "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
            "tie_word_embeddings": true}"#
        }
        other => {
            return Err(EngineError::ModelFiles(format!(
                "--synthetic {other}: no such model shapes; use llama3-8b or smollm2-135m"
            )))
        }
    };
    Ok(ModelConfig::from_json_str(
        json,
        &PathBuf::from(format!("synthetic:{name}")),
    )?)
}

/// Random weights from the backend.
struct Random<'a, B: Backend> {
    be: &'a B,
    weights: SyntheticWeights,
    seed: u64,
}

impl<B: Backend> Random<'_, B> {
    /// A seed of its own for each tensor.
    fn seed_of(&self, name: &str) -> u64 {
        name.bytes()
            .fold(self.seed ^ 0xcbf2_9ce4_8422_2325, |h, b| {
                (h ^ b as u64).wrapping_mul(0x1000_0000_01b3)
            })
    }

    fn dense(&self, name: &str, rows: usize, cols: usize) -> Result<Linear<B>> {
        let w = self.be.dense_random(rows, cols, self.seed_of(name))?;
        Ok(Linear::dense(
            Arc::new(w),
            rows,
            cols,
            2 * rows * cols,
            "f16".into(),
        ))
    }
}

impl<B: Backend> WeightSource<B> for Random<'_, B> {
    fn linear(&self, s: &LinearSpec) -> Result<Linear<B>> {
        match self.weights {
            SyntheticWeights::DenseF16 => self.dense(&s.prefix, s.rows, s.cols),
            SyntheticWeights::AnyPrec { max_bits } => Ok(Linear::anyprec(
                self.be
                    .anyprec_random(s.rows, s.cols, max_bits, self.seed_of(&s.prefix))?,
                s.rows,
                s.cols,
                3,
                max_bits,
            )),
        }
    }

    fn table(&self, name: &str, rows: usize, cols: usize) -> Result<Linear<B>> {
        self.dense(name, rows, cols)
    }

    fn vector(&self, _: &str, len: usize) -> Result<B::Buf> {
        self.be.upload(&vec![1.0; len])
    }
}

impl<B: Backend> Model<B> {
    /// A model of `config`'s shapes (named `name`: its `dir` reads
    /// `synthetic:name`) with random weights made on `backend` (embedding and
    /// output layer in f16, norms of ones).
    pub fn synthetic(
        backend: B,
        name: &str,
        config: ModelConfig,
        weights: SyntheticWeights,
        seed: u64,
    ) -> Result<Model<B>> {
        if let SyntheticWeights::AnyPrec { max_bits } = weights {
            crate::backend::check_bits_in(max_bits, 3, 8).map_err(EngineError::Bits)?;
        }
        let dir = PathBuf::from(format!("synthetic:{name}"));
        let info = match weights {
            SyntheticWeights::AnyPrec { max_bits } => Some(AnyPrecInfo {
                version: 1,
                seed_bits: 3,
                max_bits,
                architecture: config.arch.hf_name().into(),
                provenance: [("source".to_string(), "synthetic (random)".to_string())].into(),
            }),
            SyntheticWeights::DenseF16 => None,
        };
        let src = Random {
            be: &backend,
            weights,
            seed,
        };
        Self::build(&src, backend.clone(), config, dir, info)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CpuBackend;

    #[test]
    fn a_synthetic_model_runs_and_says_what_it_is() {
        let mut c = synthetic_config("smollm2-135m").unwrap();
        c.num_layers = 2;
        let m = Model::synthetic(
            CpuBackend,
            "small",
            c,
            SyntheticWeights::AnyPrec { max_bits: 4 },
            7,
        )
        .unwrap();
        assert_eq!(m.bits_range(), Some((3, 4)));
        assert!(m.dir.display().to_string().starts_with("synthetic:"));
        let mut cache = m.new_cache(8);
        let logits = m.forward_last(&[1, 2, 3], &mut cache).unwrap();
        assert_eq!(logits.len(), 49152);
        assert!(logits.iter().all(|v| v.is_finite()));
        assert!(synthetic_config("gpt-5").is_err());
        let bad = synthetic_config("smollm2-135m").unwrap();
        let nine = SyntheticWeights::AnyPrec { max_bits: 9 };
        assert!(Model::synthetic(CpuBackend, "bad", bad, nine, 0).is_err());
    }
}
