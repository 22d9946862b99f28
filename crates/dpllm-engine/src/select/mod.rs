//! DP-LLM run-time precision selection (METHOD.md 2e–2h).
//!
//! A [`RuntimePlan`] is a loaded plan file: per quantized linear, the two
//! precisions it picks from, the threshold and the error estimator. A forward
//! call takes a [`Precision`]: the layers' own fixed precision, every linear at
//! the plan's maximum (prefill for generation), or per-token selection. Plans are
//! small tables; switching target swaps the plan, never the weights.

pub mod estimator;
mod run;
pub mod stats;

use std::path::Path;

use dpllm_format::plan::{EstimatorSpec, Plan, PlanKind, ESTIMATORS_FILE};
use dpllm_format::{Checkpoint, FormatError, TensorData};

pub use estimator::Estimator;
pub(crate) use run::run_linear;
pub use stats::BitStats;

use crate::Model;

/// How the quantized linears of one forward call choose their precision.
#[derive(Clone, Copy)]
pub enum Precision<'a> {
    /// Each linear at the precision set on it ([`Model::set_bits`]); dense layers as stored.
    Fixed,
    /// Every linear at its maximum precision m_l under the plan (generation prefill).
    Max(&'a RuntimePlan),
    /// Per token and linear: estimate, compare with the threshold, run at b_l or b_h.
    Dynamic(&'a RuntimePlan),
}

/// The selection rule of one linear.
#[derive(Debug, Clone)]
pub struct LinearSelect {
    /// Tensor-name prefix.
    pub name: String,
    /// Maximum precision m_l.
    pub max_bits: u32,
    /// Precision when the estimate is at most the threshold.
    pub low: u32,
    /// Precision when the estimate exceeds the threshold.
    pub high: u32,
    /// Threshold τ.
    pub threshold: f32,
    /// Estimator.
    pub estimator: Estimator,
}

impl LinearSelect {
    /// True when this linear needs a per-token estimate.
    pub fn selects(&self) -> bool {
        self.low != self.high
    }
}

/// A plan ready to run on one model.
#[derive(Debug, Clone)]
pub struct RuntimePlan {
    /// The plan as stored.
    pub plan: Plan,
    /// Per block, per linear in `Block::linears()` order.
    pub blocks: Vec<Vec<LinearSelect>>,
    /// Feed q/k/v and gate/up estimators the residual-stream approximation of
    /// their input (METHOD.md 2f) instead of the exact input.
    pub async_estimation: bool,
}

impl RuntimePlan {
    /// Load the plan at `path` (with the estimator file beside it) for `model`.
    pub fn load(path: &Path, model: &Model) -> Result<RuntimePlan, FormatError> {
        let plan = Plan::load(path)?;
        let est_path = path.parent().unwrap_or(Path::new(".")).join(ESTIMATORS_FILE);
        let needs_file = plan.linears.iter().any(|l| matches!(l.estimator, EstimatorSpec::Jl { .. }));
        let est = if needs_file { Some(Checkpoint::open_file(&est_path)?) } else { None };
        Self::from_plan(plan, est.as_ref(), model, path)
    }

    /// Check `plan` against `model` and resolve its estimators; `path` names the plan in errors.
    pub fn from_plan(plan: Plan, estimators: Option<&Checkpoint>, model: &Model, path: &Path) -> Result<RuntimePlan, FormatError> {
        let specs = model.config.linears();
        if specs.len() != plan.linears.len() {
            return Err(FormatError::invalid(path, format!("plan has {} linears, the model {}", plan.linears.len(), specs.len())));
        }
        let mut blocks: Vec<Vec<LinearSelect>> = model.blocks.iter().map(|_| Vec::new()).collect();
        for ((spec, lp), (_, lin)) in specs.iter().zip(&plan.linears).zip(model.blocks.iter().flat_map(|b| b.linears())) {
            if spec.prefix != lp.name || spec.size() != lp.size {
                return Err(FormatError::invalid(path, format!("plan linear {} ({} params) does not match the model's {} ({} params)", lp.name, lp.size, spec.prefix, spec.size())));
            }
            let Some(q) = lin.as_anyprec() else {
                return Err(FormatError::invalid(path, "a plan needs a dpllm any-precision model (this one is not quantized)"));
            };
            let need = lp.max_bits.max(lp.high_bits);
            if q.max_bits() < need || q.seed_bits() > lp.low_bits {
                return Err(FormatError::invalid(path, format!("{} needs {}..={} bits but the model holds {}..={} (load it for this plan's budget)", lp.name, lp.low_bits, need, q.seed_bits(), q.max_bits())));
            }
            let estimator = match &lp.estimator {
                EstimatorSpec::None => Estimator::None,
                EstimatorSpec::Linear { a, c, .. } => Estimator::Linear { a: *a, c: *c },
                EstimatorSpec::Jl { tensor, k, bias, .. } => {
                    let ck = estimators.ok_or_else(|| FormatError::invalid(path, format!("{ESTIMATORS_FILE} is missing")))?;
                    let g = ck.tensor_f32(tensor, &[*k, spec.cols])?;
                    if g.iter().any(|v| !v.is_finite()) {
                        return Err(FormatError::invalid(path, format!("estimator {tensor} has non-finite values")));
                    }
                    Estimator::Jl { k: *k, g: TensorData::F32(g), bias: *bias }
                }
            };
            blocks[spec.layer].push(LinearSelect {
                name: lp.name.clone(),
                max_bits: lp.max_bits,
                low: lp.low_bits,
                high: lp.high_bits,
                threshold: lp.threshold,
                estimator,
            });
        }
        let async_estimation = plan.async_estimation;
        Ok(RuntimePlan { plan, blocks, async_estimation })
    }

    /// Dynamic or static.
    pub fn kind(&self) -> PlanKind {
        self.plan.kind
    }

    /// The plan's target average precision.
    pub fn target_bits(&self) -> f64 {
        self.plan.target_bits
    }
}
