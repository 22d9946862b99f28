//! DP-LLM precision plans (see `docs/format.md`, "Plans").
//!
//! A plan is a small JSON file holding, per quantized linear, the maximum
//! precision m, the two precisions b_l ≤ b_h it picks from per token, the
//! threshold and the error estimator. Random-projection estimators are matrices;
//! they live in one safetensors file per budget ([`ESTIMATORS_FILE`]) shared by
//! every target of that budget, and the plan names its tensors.
//!
//! Layout beside a model: `MODEL/plans/budget-5.00/{target-3.50.json,
//! static-3.50.json, estimators.safetensors}`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{FormatError, Result};

/// `format` value of a plan file.
pub const PLAN_FORMAT: &str = "dpllm-plan";
/// Current plan version.
pub const PLAN_VERSION: u32 = 1;
/// Name of the per-budget estimator matrices file.
pub const ESTIMATORS_FILE: &str = "estimators.safetensors";

/// Dynamic (per-token selection) or static (fixed per-layer precisions) plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PlanKind {
    /// DP-LLM: per token, b_l or b_h from the estimator and threshold.
    Dynamic,
    /// Baseline: every linear at a fixed precision (b_l = b_h).
    Static,
}

/// How a linear's relative error ||(W_h − W_l)x|| is estimated at run time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum EstimatorSpec {
    /// No estimate needed (b_l = b_h).
    None,
    /// ê = a·||x|| + c.
    Linear {
        /// Slope.
        a: f32,
        /// Intercept.
        c: f32,
        /// R² of the fit on calibration inputs.
        r2: f32,
    },
    /// ê = ||G x|| + bias with G [k × in] stored in the estimators file.
    Jl {
        /// Tensor name in [`ESTIMATORS_FILE`].
        tensor: String,
        /// Rows of G.
        k: usize,
        /// Added to ||G x||.
        #[serde(default)]
        bias: f32,
        /// R² of ||Gx|| against the true error on calibration inputs.
        r2: f32,
    },
}

/// The plan of one linear layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinearPlan {
    /// Tensor-name prefix, e.g. `model.layers.3.mlp.down_proj`.
    pub name: String,
    /// Parameter count.
    pub size: usize,
    /// Maximum precision kept in memory for this linear (from the budget).
    pub max_bits: u32,
    /// Learned average precision p (b_l ≤ p ≤ b_h).
    pub avg_bits: f32,
    /// Precision used when the estimate is at most the threshold.
    pub low_bits: u32,
    /// Precision used when the estimate exceeds the threshold.
    pub high_bits: u32,
    /// Threshold τ on the estimated error.
    pub threshold: f32,
    /// Error estimator.
    pub estimator: EstimatorSpec,
}

/// A precision plan for one (budget, target).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// Always [`PLAN_FORMAT`].
    pub format: String,
    /// Plan version.
    pub version: u32,
    /// Dynamic or static.
    pub kind: PlanKind,
    /// Memory budget, average bits over quantized parameters.
    pub budget_bits: f64,
    /// Target average precision.
    pub target_bits: f64,
    /// Lowest precision any linear may run at.
    pub min_bits: u32,
    /// Highest precision any linear may keep.
    pub max_bits: u32,
    /// Estimators read the asynchronous (residual-stream) input for q/k/v and gate/up.
    pub async_estimation: bool,
    /// Free-form facts of the calibration (settings, losses, measured averages).
    #[serde(default)]
    pub calibration: serde_json::Map<String, serde_json::Value>,
    /// One entry per quantized linear, in model order.
    pub linears: Vec<LinearPlan>,
}

impl Plan {
    /// Σ size·p / Σ size: the plan's intended average precision.
    pub fn mean_bits(&self) -> f64 {
        let total: f64 = self.linears.iter().map(|l| l.size as f64).sum();
        self.linears
            .iter()
            .map(|l| l.size as f64 * l.avg_bits as f64)
            .sum::<f64>()
            / total.max(1.0)
    }

    /// Σ size·m / Σ size: the memory the plan needs, in average bits.
    pub fn memory_bits(&self) -> f64 {
        let total: f64 = self.linears.iter().map(|l| l.size as f64).sum();
        self.linears
            .iter()
            .map(|l| l.size as f64 * l.max_bits as f64)
            .sum::<f64>()
            / total.max(1.0)
    }

    /// Check internal consistency; `path` names the file in errors.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let bad = |m: String| Err(FormatError::invalid(path, m));
        if self.format != PLAN_FORMAT {
            return bad(format!(
                "format is {:?}, expected {PLAN_FORMAT:?}",
                self.format
            ));
        }
        if self.version != PLAN_VERSION {
            return bad(format!(
                "plan version {}; this dpllm reads version {PLAN_VERSION}",
                self.version
            ));
        }
        if !(1..=8).contains(&self.min_bits) || self.min_bits > self.max_bits || self.max_bits > 8 {
            return bad(format!(
                "bad precision range {}..={}",
                self.min_bits, self.max_bits
            ));
        }
        if !(self.target_bits.is_finite() && self.budget_bits.is_finite())
            || self.target_bits > self.budget_bits + 1e-9
            || self.budget_bits > self.max_bits as f64
        {
            return bad(format!(
                "bad target {} / budget {} bits (plan precisions {}..={})",
                self.target_bits, self.budget_bits, self.min_bits, self.max_bits
            ));
        }
        if self.linears.is_empty() {
            return bad("the plan has no linears".into());
        }
        for l in &self.linears {
            let ok = self.min_bits <= l.low_bits
                && l.low_bits <= l.high_bits
                && l.high_bits <= l.max_bits
                && l.max_bits <= self.max_bits
                && l.size > 0
                && l.threshold.is_finite()
                && (l.avg_bits as f64) >= l.low_bits as f64 - 1e-3
                && (l.avg_bits as f64) <= l.high_bits as f64 + 1e-3;
            if !ok {
                return bad(format!(
                    "linear {}: inconsistent precisions (min {}, low {}, avg {}, high {}, max {}, plan max {}) or threshold {}",
                    l.name, self.min_bits, l.low_bits, l.avg_bits, l.high_bits, l.max_bits, self.max_bits, l.threshold
                ));
            }
            let finite = match &l.estimator {
                EstimatorSpec::None => true,
                EstimatorSpec::Linear { a, c, r2 } => {
                    a.is_finite() && c.is_finite() && r2.is_finite()
                }
                EstimatorSpec::Jl { k, bias, r2, .. } => {
                    *k > 0 && bias.is_finite() && r2.is_finite()
                }
            };
            if !finite {
                return bad(format!(
                    "linear {}: estimator parameters must be finite numbers (and k > 0)",
                    l.name
                ));
            }
            if l.low_bits != l.high_bits && l.estimator == EstimatorSpec::None {
                return bad(format!(
                    "linear {}: picks between {} and {} bits but has no estimator",
                    l.name, l.low_bits, l.high_bits
                ));
            }
        }
        Ok(())
    }

    /// Read and validate a plan file.
    pub fn load(path: &Path) -> Result<Plan> {
        let text = std::fs::read_to_string(path).map_err(|e| FormatError::io(path, e))?;
        let plan: Plan = serde_json::from_str(&text)
            .map_err(|e| FormatError::invalid(path, format!("not a plan: {e}")))?;
        plan.validate(path)?;
        Ok(plan)
    }

    /// Write the plan atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| FormatError::invalid(path, e.to_string()))?;
        crate::write_atomic(path, text.as_bytes())
    }
}

/// Directory of the plans of `budget` beside the model in `model_dir`.
pub fn budget_dir(model_dir: &Path, budget: f64) -> PathBuf {
    model_dir.join("plans").join(format!("budget-{budget:.2}"))
}

/// File of the plan for `target` in a budget directory.
pub fn plan_path(budget_dir: &Path, kind: PlanKind, target: f64) -> PathBuf {
    let prefix = match kind {
        PlanKind::Dynamic => "target",
        PlanKind::Static => "static",
    };
    budget_dir.join(format!("{prefix}-{target:.2}.json"))
}

/// Budgets that have a plan directory beside the model, ascending.
pub fn available_budgets(model_dir: &Path) -> Vec<f64> {
    let mut v: Vec<f64> = std::fs::read_dir(model_dir.join("plans"))
        .into_iter()
        .flatten()
        .filter_map(|e| {
            e.ok()?
                .file_name()
                .to_str()?
                .strip_prefix("budget-")?
                .parse()
                .ok()
        })
        .collect();
    v.sort_by(|a, b| a.total_cmp(b));
    v
}

/// One plan file of a budget directory (the lowest DP-LLM target, else the
/// lowest static one): every plan of a budget loads the same planes.
pub fn first_plan(budget_dir: &Path) -> Option<PathBuf> {
    [PlanKind::Dynamic, PlanKind::Static]
        .into_iter()
        .find_map(|k| {
            available_targets(budget_dir, k)
                .first()
                .map(|t| plan_path(budget_dir, k, *t))
        })
}

/// Targets with a plan of `kind` in a budget directory, ascending.
pub fn available_targets(budget_dir: &Path, kind: PlanKind) -> Vec<f64> {
    let prefix = match kind {
        PlanKind::Dynamic => "target-",
        PlanKind::Static => "static-",
    };
    let mut v: Vec<f64> = std::fs::read_dir(budget_dir)
        .into_iter()
        .flatten()
        .filter_map(|e| {
            e.ok()?
                .file_name()
                .to_str()?
                .strip_prefix(prefix)?
                .strip_suffix(".json")?
                .parse()
                .ok()
        })
        .collect();
    v.sort_by(|a, b| a.total_cmp(b));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> Plan {
        Plan {
            format: PLAN_FORMAT.into(),
            version: PLAN_VERSION,
            kind: PlanKind::Dynamic,
            budget_bits: 5.0,
            target_bits: 4.0,
            min_bits: 3,
            max_bits: 6,
            async_estimation: true,
            calibration: Default::default(),
            linears: vec![
                LinearPlan {
                    name: "a".into(),
                    size: 100,
                    max_bits: 5,
                    avg_bits: 4.5,
                    low_bits: 4,
                    high_bits: 5,
                    threshold: 0.3,
                    estimator: EstimatorSpec::Linear {
                        a: 1.0,
                        c: 0.0,
                        r2: 0.95,
                    },
                },
                LinearPlan {
                    name: "b".into(),
                    size: 300,
                    max_bits: 6,
                    avg_bits: 3.0,
                    low_bits: 3,
                    high_bits: 3,
                    threshold: 0.0,
                    estimator: EstimatorSpec::None,
                },
            ],
        }
    }

    #[test]
    fn round_trip_and_averages() {
        let d = tempfile::tempdir().unwrap();
        let bd = budget_dir(d.path(), 5.0);
        std::fs::create_dir_all(&bd).unwrap();
        let p = plan_path(&bd, PlanKind::Dynamic, 4.0);
        plan().save(&p).unwrap();
        assert_eq!(Plan::load(&p).unwrap(), plan());
        assert!((plan().mean_bits() - (450.0 + 900.0) / 400.0).abs() < 1e-9);
        assert!((plan().memory_bits() - (500.0 + 1800.0) / 400.0).abs() < 1e-9);
        assert_eq!(available_budgets(d.path()), vec![5.0]);
        assert_eq!(available_targets(&bd, PlanKind::Dynamic), vec![4.0]);
        assert!(available_targets(&bd, PlanKind::Static).is_empty());
    }

    #[test]
    fn inconsistent_plans_are_rejected() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("p.json");
        type Spoil = Box<dyn Fn(&mut Plan)>;
        let cases: Vec<(Spoil, &str)> = vec![
            (Box::new(|p| p.version = 7), "plan version 7"),
            (Box::new(|p| p.linears[0].high_bits = 6), "inconsistent"),
            (Box::new(|p| p.linears[0].low_bits = 2), "inconsistent"),
            (
                Box::new(|p| p.linears[0].threshold = f32::NAN),
                "inconsistent",
            ),
            (
                Box::new(|p| p.linears[0].estimator = EstimatorSpec::None),
                "no estimator",
            ),
            (Box::new(|p| p.linears.clear()), "no linears"),
            (Box::new(|p| p.max_bits = 9), "precision range"),
        ];
        for (edit, want) in cases {
            let mut pl = plan();
            edit(&mut pl);
            // NaN is not JSON: write the text by hand for that case.
            let text = serde_json::to_string(&pl).unwrap_or_default();
            std::fs::write(&p, if text.is_empty() { "{}".into() } else { text }).unwrap();
            let e = Plan::load(&p).unwrap_err().to_string();
            assert!(e.contains(want) || e.contains("not a plan"), "{want}: {e}");
        }
        std::fs::write(&p, "{\"format\": \"dpllm-plan\"").unwrap();
        assert!(Plan::load(&p)
            .unwrap_err()
            .to_string()
            .contains("not a plan"));
        assert!(Plan::load(&d.path().join("missing.json")).is_err());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 256, failure_persistence: None, ..Default::default() })]

        /// Any mutation of a valid plan file, and any garbage, loads or fails cleanly.
        #[test]
        fn arbitrary_and_mutated_plans_load_or_fail_cleanly(
            edits in proptest::collection::vec((proptest::prelude::any::<usize>(), b' '..=b'~'), 0..6),
            truncate in proptest::option::of(proptest::prelude::any::<usize>()),
            garbage in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64),
        ) {
            let d = tempfile::tempdir().unwrap();
            let p = d.path().join("target-4.00.json");
            let mut bytes = serde_json::to_vec_pretty(&plan()).unwrap();
            let n = bytes.len();
            for (i, v) in edits {
                bytes[i % n] = v;
            }
            bytes.truncate(truncate.map_or(n, |t| t % (n + 1)));
            std::fs::write(&p, &bytes).unwrap();
            if let Ok(pl) = Plan::load(&p) {
                let _ = (pl.mean_bits(), pl.memory_bits());
            }
            std::fs::write(&p, &garbage).unwrap();
            proptest::prop_assert!(Plan::load(&p).is_err());
        }
    }
}
