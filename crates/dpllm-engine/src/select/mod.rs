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
mod tally;

use std::path::Path;

use std::sync::Arc;

use dpllm_format::plan::{EstimatorSpec, Plan, PlanKind, ESTIMATORS_FILE};
use dpllm_format::{Checkpoint, FormatError, TensorData};

pub use estimator::Estimator;
pub(crate) use run::{count_decisions, run_linear};
pub use stats::{BitStats, SelectionDiag};
pub(crate) use tally::{RowTally, Tally};

use crate::backend::cpu::CpuBackend;
use crate::backend::{Backend, DenseHost};
use crate::error::{EngineError, Result};
use crate::Model;

/// A plan that is a valid file but was made for another model (or budget): the
/// request's mistake, not the files'.
fn unfit(path: &Path, reason: String) -> EngineError {
    EngineError::Plan(format!(
        "{} does not fit this model: {reason}",
        path.display()
    ))
}

/// How the quantized linears of one forward call choose their precision: an
/// argument of every call, never state on the shared weights, so one loaded
/// model serves concurrent calls at different precisions.
pub enum Precision<'a, B: Backend = CpuBackend> {
    /// Every quantized linear at the highest precision loaded; dense layers as stored.
    Highest,
    /// Every quantized linear at this many bits (within the loaded range).
    Uniform(u32),
    /// Every linear at its maximum precision m_l under the plan (generation prefill).
    Max(&'a RuntimePlan<B>),
    /// Per token and linear: estimate, compare with the threshold, run at b_l or b_h.
    Dynamic(&'a RuntimePlan<B>),
}

impl<B: Backend> Clone for Precision<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<B: Backend> Copy for Precision<'_, B> {}

/// The selection rule of one linear.
#[derive(Debug)]
pub struct LinearSelect<B: Backend = CpuBackend> {
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
    /// The learned average precision p (b_l ≤ p ≤ b_h).
    pub avg_bits: f32,
    /// Estimator, its weights on the model's backend.
    pub estimator: Estimator<B>,
}

impl<B: Backend> LinearSelect<B> {
    /// True when this linear needs a per-token estimate.
    pub fn selects(&self) -> bool {
        self.low != self.high
    }

    /// The share of tokens the plan sends to the higher precision, (p − b_l) / (b_h − b_l).
    pub fn high_fraction(&self) -> f32 {
        if self.selects() {
            ((self.avg_bits - self.low as f32) / (self.high as f32 - self.low as f32))
                .clamp(0.0, 1.0)
        } else {
            0.0
        }
    }
}

/// What a DP-LLM plan's linears decide by, per token. Evaluation swaps the
/// estimator for the true error or a coin to bound what selection can buy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Selector {
    /// The plan's error estimators against their thresholds (DP-LLM).
    #[default]
    Estimator,
    /// The true error ||(W_h − W_l)x|| against the thresholds: the upper bound of
    /// any estimator. Runs both precisions on every token (evaluation only), and
    /// records how the estimator compares ([`BitStats::selection`]).
    Oracle,
    /// High precision for a random share of the tokens equal to the plan's
    /// [`LinearSelect::high_fraction`]: the lower bound.
    Random {
        /// Seed of the draw.
        seed: u64,
    },
}

/// A plan ready to run on one model.
#[derive(Debug)]
pub struct RuntimePlan<B: Backend = CpuBackend> {
    /// The plan as stored.
    pub plan: Plan,
    /// Per block, per linear in `Block::linears()` order (shared by copies that
    /// change only the estimator input).
    pub blocks: Arc<Vec<Vec<LinearSelect<B>>>>,
    /// Feed q/k/v and gate/up estimators the residual-stream approximation of
    /// their input (METHOD.md 2f) instead of the exact input.
    pub async_estimation: bool,
    /// What the per-token decisions follow (the estimators unless evaluating bounds).
    pub selector: Selector,
}

impl<B: Backend> Clone for RuntimePlan<B> {
    fn clone(&self) -> Self {
        RuntimePlan {
            plan: self.plan.clone(),
            blocks: self.blocks.clone(),
            async_estimation: self.async_estimation,
            selector: self.selector,
        }
    }
}

impl<B: Backend> RuntimePlan<B> {
    /// True when some linear picks its precision per token (a static plan's
    /// linears each run at one precision, so its forward calls make no estimator inputs).
    pub fn selects(&self) -> bool {
        self.blocks.iter().flatten().any(LinearSelect::selects)
    }

    /// Load the plan at `path` (with the estimator file beside it) for `model`.
    pub fn load(path: &Path, model: &Model<B>) -> Result<RuntimePlan<B>> {
        let plan = Plan::load(path)?;
        let est_path = path
            .parent()
            .unwrap_or(Path::new("."))
            .join(ESTIMATORS_FILE);
        let needs_file = plan
            .linears
            .iter()
            .any(|l| matches!(l.estimator, EstimatorSpec::Jl { .. }));
        let est = if needs_file {
            Some(Checkpoint::open_file(&est_path)?)
        } else {
            None
        };
        Self::from_plan(plan, est.as_ref(), model, path)
    }

    /// Check `plan` against `model` and resolve its estimators; `path` names the plan in errors.
    pub fn from_plan(
        plan: Plan,
        estimators: Option<&Checkpoint>,
        model: &Model<B>,
        path: &Path,
    ) -> Result<RuntimePlan<B>> {
        let specs = model.config.linears();
        if specs.len() != plan.linears.len() {
            return Err(unfit(
                path,
                format!(
                    "plan has {} linears, the model {}",
                    plan.linears.len(),
                    specs.len()
                ),
            ));
        }
        let mut blocks: Vec<Vec<LinearSelect<B>>> =
            model.blocks.iter().map(|_| Vec::new()).collect();
        for ((spec, lp), (_, lin)) in specs
            .iter()
            .zip(&plan.linears)
            .zip(model.blocks.iter().flat_map(|b| b.linears()))
        {
            if spec.prefix != lp.name || spec.size() != lp.size {
                return Err(unfit(
                    path,
                    format!(
                        "plan linear {} ({} params) does not match the model's {} ({} params)",
                        lp.name,
                        lp.size,
                        spec.prefix,
                        spec.size()
                    ),
                ));
            }
            let Some((seed, max)) = lin.bits_range() else {
                return Err(unfit(
                    path,
                    "a plan needs a dpllm any-precision model (this one is not quantized)".into(),
                ));
            };
            let need = lp.max_bits.max(lp.high_bits);
            if max < need || seed > lp.low_bits {
                return Err(unfit(path, format!("{} needs {}..={} bits but the model holds {seed}..={max} (load it for this plan's budget)", lp.name, lp.low_bits, need)));
            }
            let estimator = match &lp.estimator {
                EstimatorSpec::None => Estimator::None,
                EstimatorSpec::Linear { a, c, .. } => Estimator::Linear { a: *a, c: *c },
                EstimatorSpec::Jl {
                    tensor, k, bias, ..
                } => {
                    let ck = estimators.ok_or_else(|| {
                        FormatError::invalid(path, format!("{ESTIMATORS_FILE} is missing"))
                    })?;
                    let g = ck.tensor_f32(tensor, &[*k, spec.cols])?;
                    if g.iter().any(|v| !v.is_finite()) {
                        return Err(FormatError::invalid(
                            path,
                            format!("estimator {tensor} has non-finite values"),
                        )
                        .into());
                    }
                    Estimator::Jl {
                        k: *k,
                        g: model.backend.dense(
                            DenseHost::Float(Arc::new(TensorData::F32(g))),
                            *k,
                            spec.cols,
                            None,
                        )?,
                        bias: *bias,
                    }
                }
            };
            blocks[spec.layer].push(LinearSelect {
                name: lp.name.clone(),
                max_bits: lp.max_bits,
                low: lp.low_bits,
                high: lp.high_bits,
                threshold: lp.threshold,
                avg_bits: lp.avg_bits,
                estimator,
            });
        }
        let async_estimation = plan.async_estimation;
        Ok(RuntimePlan {
            plan,
            blocks: Arc::new(blocks),
            async_estimation,
            selector: Selector::Estimator,
        })
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
