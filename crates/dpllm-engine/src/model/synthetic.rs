//! Models with random weights made on the backend, for benchmarks at shapes
//! no file here holds (an 8B model on a GPU): the forward pass is the real
//! one, only the numbers are random.

use std::path::PathBuf;
use std::sync::Arc;

use dpllm_format::anyprec::AnyPrecInfo;
use dpllm_format::plan::{EstimatorSpec, LinearPlan, Plan, PlanKind, PLAN_FORMAT, PLAN_VERSION};
use dpllm_format::{LinearSpec, ModelConfig};

use super::loader::WeightSource;
use super::Model;
use crate::backend::Backend;
use crate::error::{EngineError, Result};
use crate::linear::Linear;
use crate::select::RuntimePlan;

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

/// A plan for a synthetic any-precision model at `target` bits, for
/// measuring what per-token selection costs, not what it buys: with b_l =
/// ⌊target⌋ and b_h = b_l + 1, the linears of an evenly spread
/// (target − b_l) share of the layers run at b_h and the others at b_l. A
/// static plan fixes them so; a dynamic one makes every linear select between
/// b_l and b_h by a norm-regression estimate that is constant (its threshold
/// puts it on the layer's side), so both do the same GEMV work and the
/// difference is DP-LLM's estimation and selection. The model must hold b_h bits.
pub fn synthetic_plan<B: Backend>(
    model: &Model<B>,
    target: f64,
    kind: PlanKind,
    async_estimation: bool,
) -> Result<RuntimePlan<B>> {
    let low = target.floor();
    if !(3.0..8.0).contains(&low) {
        return Err(EngineError::Bits(format!(
            "a synthetic plan's target {target} must lie in [3, 8)"
        )));
    }
    let (low, high, frac) = (low as u32, low as u32 + 1, target - low);
    // Bresenham: layer l is high when the running share crosses an integer.
    let is_high = |l: usize| ((l + 1) as f64 * frac).floor() > (l as f64 * frac).floor();
    let linears = model
        .config
        .linears()
        .iter()
        .map(|spec| {
            let bits = if is_high(spec.layer) { high } else { low };
            let dynamic = kind == PlanKind::Dynamic;
            LinearPlan {
                name: spec.prefix.clone(),
                size: spec.size(),
                max_bits: high,
                avg_bits: bits as f32,
                low_bits: if dynamic { low } else { bits },
                high_bits: if dynamic { high } else { bits },
                // The estimate is 1: above 0.5 (high), not above 1.5 (low).
                threshold: if bits == high { 0.5 } else { 1.5 },
                estimator: if dynamic {
                    EstimatorSpec::Linear {
                        a: 0.0,
                        c: 1.0,
                        r2: 0.0,
                    }
                } else {
                    EstimatorSpec::None
                },
            }
        })
        .collect::<Vec<_>>();
    let total: f64 = linears.iter().map(|l| l.size as f64).sum();
    let mean = linears
        .iter()
        .map(|l| l.size as f64 * l.avg_bits as f64)
        .sum::<f64>()
        / total.max(1.0);
    let plan = Plan {
        format: PLAN_FORMAT.into(),
        version: PLAN_VERSION,
        kind,
        budget_bits: high as f64,
        target_bits: mean,
        min_bits: low,
        max_bits: high,
        async_estimation,
        calibration: Default::default(),
        linears,
    };
    RuntimePlan::from_plan(plan, None, model, &model.dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CpuBackend, Precision};

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
        // A plan at 3.5 over 2 layers: one layer at 4 bits, one at 3, and the
        // dynamic plan decides so per token.
        let mut stats = m.new_bit_stats();
        for kind in [PlanKind::Static, PlanKind::Dynamic] {
            let p = synthetic_plan(&m, 3.5, kind, true).unwrap();
            assert!((p.plan.target_bits - 3.5).abs() < 1e-9, "{kind:?}");
            let mut cache = m.new_cache(8);
            stats = m.new_bit_stats();
            m.forward_last_with(
                &[1, 2],
                &mut cache,
                Precision::Dynamic(&p),
                Some(&mut stats),
            )
            .unwrap();
            assert_eq!(stats.effective_bits(), Some(3.5), "{kind:?}");
        }
        assert!(stats.estimator_flops > 0, "the dynamic plan estimates");
        assert!(synthetic_plan(&m, 2.5, PlanKind::Dynamic, true).is_err());
        let bad = synthetic_config("smollm2-135m").unwrap();
        let nine = SyntheticWeights::AnyPrec { max_bits: 9 };
        assert!(Model::synthetic(CpuBackend, "bad", bad, nine, 0).is_err());
    }
}
