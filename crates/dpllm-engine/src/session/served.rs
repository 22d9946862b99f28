//! A model loaded once for a memory budget, serving every plan of that budget.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use dpllm_format::plan::{self, Plan, PlanKind};

use super::{RunPrecision, Session};
use crate::backend::cpu::CpuBackend;
use crate::backend::Backend;
use crate::error::{EngineError, Result};
use crate::model::LoadOptions;
use crate::select::RuntimePlan;
use crate::Model;

/// Which plan a request asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum PlanKey {
    /// The plan calibrated for this target average precision.
    Target {
        /// Target bits.
        target: f64,
        /// DP-LLM or the static layer-wise baseline.
        kind: PlanKind,
    },
    /// A plan file.
    File(PathBuf),
}

/// A model loaded once, holding only the bit-planes its memory budget allows,
/// with the runtime plans it has served cached by target. Shared by every session.
pub struct ServedModel<B: Backend = CpuBackend> {
    model: Arc<Model<B>>,
    /// The memory budget it was loaded for (None: no budget chosen, the planes asked for loaded).
    budget: Option<f64>,
    plans: Mutex<HashMap<String, Arc<RuntimePlan<B>>>>,
}

impl ServedModel<CpuBackend> {
    /// [`ServedModel::load_on`] the CPU.
    pub fn load(dir: &Path, budget: Option<f64>, max_bits: Option<u32>) -> Result<ServedModel> {
        Self::load_on(CpuBackend, dir, budget, max_bits)
    }

    /// [`ServedModel::load_for_plan_file_on`] the CPU.
    pub fn load_for_plan_file(dir: &Path, path: &Path) -> Result<ServedModel> {
        Self::load_for_plan_file_on(CpuBackend, dir, path)
    }
}

impl<B: Backend> ServedModel<B> {
    /// Load the model at `dir` onto `backend`. With a `budget`, only the planes its
    /// plans may use (each linear's m_l) are loaded; with `max_bits`, planes up to
    /// that precision; otherwise every stored plane.
    pub fn load_on(
        backend: B,
        dir: &Path,
        budget: Option<f64>,
        max_bits: Option<u32>,
    ) -> Result<ServedModel<B>> {
        let Some(b) = budget else {
            let model = Model::load_on(
                backend,
                dir,
                &LoadOptions {
                    max_bits,
                    ..Default::default()
                },
            )?;
            return Ok(ServedModel {
                model: Arc::new(model),
                budget: None,
                plans: Mutex::default(),
            });
        };
        let bdir = plan::budget_dir(dir, b);
        let first = plan::first_plan(&bdir).ok_or_else(|| EngineError::Plan(no_plans(dir, b)))?;
        Self::load_for_plan(backend, dir, &first, Some(b))
    }

    /// Load the model at `dir` onto `backend` with the planes the plan file `path` uses.
    pub fn load_for_plan_file_on(backend: B, dir: &Path, path: &Path) -> Result<ServedModel<B>> {
        Self::load_for_plan(backend, dir, path, None)
    }

    fn load_for_plan(
        backend: B,
        dir: &Path,
        path: &Path,
        budget: Option<f64>,
    ) -> Result<ServedModel<B>> {
        let p = Plan::load(path)?;
        let model = Model::load_on(backend, dir, &LoadOptions::for_plan(&p))?;
        Ok(ServedModel {
            model: Arc::new(model),
            budget,
            plans: Mutex::default(),
        })
    }

    /// Wrap a model loaded by other means (no budget).
    pub fn from_model(model: Model<B>) -> ServedModel<B> {
        ServedModel {
            model: Arc::new(model),
            budget: None,
            plans: Mutex::default(),
        }
    }

    /// The model.
    pub fn model(&self) -> &Arc<Model<B>> {
        &self.model
    }

    /// The memory budget it was loaded for (None: loaded without one).
    pub fn budget(&self) -> Option<f64> {
        self.budget
    }

    /// The plan `key` names, loaded once and then served from the cache.
    pub fn plan(&self, key: &PlanKey) -> Result<Arc<RuntimePlan<B>>> {
        let path = match key {
            PlanKey::File(p) => p.clone(),
            PlanKey::Target { target, kind } => self.plan_path(*target, *kind)?,
        };
        let name = path.display().to_string();
        if let Some(p) = self.plans.lock().expect("plan cache lock").get(&name) {
            return Ok(p.clone());
        }
        let rp = RuntimePlan::load(&path, &self.model)?;
        let rp = Arc::new(rp);
        self.plans
            .lock()
            .expect("plan cache lock")
            .insert(name, rp.clone());
        Ok(rp)
    }

    /// The file of the plan for `target`, in the loaded budget or the model's only budget.
    fn plan_path(&self, target: f64, kind: PlanKind) -> Result<PathBuf> {
        find_plan(&self.model.dir, self.budget, target, kind)
    }

    /// A new session at `precision` with room for `capacity` positions.
    pub fn session(&self, precision: RunPrecision<B>, capacity: usize) -> Result<Session<B>> {
        Session::new(self.model.clone(), precision, capacity)
    }
}

/// The budget a request means: `budget` when given, else the model's only calibrated one.
pub fn resolve_budget(dir: &Path, budget: Option<f64>) -> Result<f64> {
    match (budget, plan::available_budgets(dir).as_slice()) {
        (Some(b), _) => Ok(b),
        (None, [b]) => Ok(*b),
        (None, []) => Err(EngineError::Plan(format!(
            "{} has no plans: run `dpllm calibrate` first",
            dir.display()
        ))),
        (None, many) => Err(EngineError::Plan(format!(
            "{} has plans for several budgets ({many:?}): choose one with --budget",
            dir.display()
        ))),
    }
}

/// The plan file for `target` at `budget` (default: the only one) beside the model in `dir`.
pub fn find_plan(dir: &Path, budget: Option<f64>, target: f64, kind: PlanKind) -> Result<PathBuf> {
    let budget = resolve_budget(dir, budget)?;
    target_file(&plan::budget_dir(dir, budget), budget, target, kind)
}

fn target_file(bdir: &Path, budget: f64, target: f64, kind: PlanKind) -> Result<PathBuf> {
    let path = plan::plan_path(bdir, kind, target);
    if !path.is_file() {
        let have = plan::available_targets(bdir, kind);
        let what = if kind == PlanKind::Static {
            "static"
        } else {
            "DP-LLM"
        };
        return Err(EngineError::Plan(format!("no {what} plan for target {target} at budget {budget} in {} (calibrated targets: {have:?})", bdir.display())));
    }
    Ok(path)
}

fn no_plans(dir: &Path, budget: f64) -> String {
    let have = plan::available_budgets(dir);
    if have.is_empty() {
        format!(
            "{} has no plans: run `dpllm calibrate` first",
            dir.display()
        )
    } else {
        format!(
            "{} has no plans for budget {budget} (calibrated budgets: {have:?})",
            dir.display()
        )
    }
}
