//! The calibration of one memory budget and several targets, end to end:
//! knapsack → fine-tuning per target → estimator inputs at m_l → estimators
//! (shared by every target that needs the same linear and precision pair) →
//! thresholds → plan files, written to a fresh budget directory atomically.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use dpllm_engine::{Device, LoadOptions, Model};
use dpllm_format::anyprec::{self, AnyPrecInfo, ANYPREC_WEIGHTS};
use dpllm_format::output::{check_replaceable, OutputKind};
use dpllm_format::plan::{
    self, EstimatorSpec, LinearPlan, Plan, PlanKind, ESTIMATORS_FILE, PLAN_FORMAT, PLAN_VERSION,
};
use dpllm_format::st_writer::{write_safetensors, TensorSpec};
use dpllm_format::{Checkpoint, StagingDir};
use dpllm_grad::{CpuGrad, GradBackend};
use serde::Serialize;

use crate::budget::{self, Item};
use crate::collect::LinearCalib;
use crate::estimators::{fit, FitOptions, Fitted};
use crate::finetune::FinetuneOptions;
use crate::threshold::{decide, quantile, Decision};
use crate::tuner::{CollectOptions, LevelStore, Tuner};
use crate::weights::{quantized_linears, split_precision, LinearWeights};

/// Which errors the thresholds are quantiles of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ThresholdSource {
    /// The true relative error (METHOD.md 2d).
    True,
    /// The estimator's output on the same inputs: hits the intended fraction of
    /// high-precision tokens exactly on calibration text, whatever the estimator's bias.
    Estimate,
}

/// Where precision fine-tuning starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinetuneInit {
    /// p = T for every linear (METHOD.md's option "at the target").
    Target,
    /// The static knapsack assignment at T: fine-tuning then only has to improve
    /// on the static baseline, which matters when few fine-tuning steps are affordable.
    Static,
}

/// Settings of a calibration run.
#[derive(Debug, Clone, Serialize)]
pub struct CalibrateOptions {
    /// Memory budget, average bits.
    pub budget: f64,
    /// Target average precisions.
    pub targets: Vec<f64>,
    /// Lowest precision (b_min).
    pub min_bits: u32,
    /// Highest precision any linear may keep (b_max).
    pub max_bits: u32,
    /// Estimators read the asynchronous input for q/k/v and gate/up.
    pub async_estimation: bool,
    /// What thresholds are quantiles of.
    pub threshold_source: ThresholdSource,
    /// Precision fine-tuning settings.
    pub finetune: FinetuneOptions,
    /// Where fine-tuning starts.
    pub init: FinetuneInit,
    /// Estimator settings.
    pub fit: FitOptions,
    /// Estimator inputs sampled per linear for random projections.
    pub max_samples: usize,
    /// Also write the static layer-wise baseline plan of every target.
    pub static_plans: bool,
    /// Replace an existing plan directory of this budget (only one dpllm wrote).
    pub overwrite: bool,
    /// Show progress bars.
    pub progress: bool,
    /// Where precision fine-tuning and the estimator data run (thresholds
    /// and plans are made on the CPU).
    #[serde(skip)]
    pub device: dpllm_engine::Device,
    /// Where the projection estimators are fine-tuned: the CPU (every core,
    /// linears in parallel) or a GPU (one linear after another).
    #[serde(skip)]
    pub fit_device: dpllm_engine::Device,
    /// On a GPU, fine-tuning's matrix products on TF32 tensor cores (recorded
    /// only when set, so records of earlier runs still match).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub tf32: bool,
    /// What else produced these plans (e.g. a cache key), stored in the plan directory's manifest.
    #[serde(skip)]
    pub inputs: serde_json::Value,
}

impl Default for CalibrateOptions {
    fn default() -> Self {
        CalibrateOptions {
            budget: 5.0,
            targets: vec![3.25, 3.5, 3.75, 4.0, 4.25, 4.5, 4.75],
            min_bits: 3,
            max_bits: 6,
            async_estimation: true,
            threshold_source: ThresholdSource::True,
            finetune: FinetuneOptions::default(),
            init: FinetuneInit::Static,
            fit: FitOptions::default(),
            max_samples: 4096,
            static_plans: true,
            overwrite: false,
            progress: false,
            device: dpllm_engine::Device::Cpu,
            fit_device: dpllm_engine::Device::Cpu,
            tf32: false,
            inputs: serde_json::Value::Null,
        }
    }
}

/// Token sequences of a calibration run.
#[derive(Debug, Clone)]
pub struct CalibrationData {
    /// For precision fine-tuning.
    pub finetune: Vec<Vec<u32>>,
    /// For estimators and thresholds.
    pub estimator: Vec<Vec<u32>>,
}

/// What one target's calibration produced.
#[derive(Debug, Clone, Serialize)]
pub struct TargetReport {
    /// Target average precision.
    pub target: f64,
    /// Σ size·p / Σ size right after fine-tuning.
    pub trained_mean_bits: f64,
    /// Σ size·p / Σ size of the plan.
    pub mean_bits: f64,
    /// Mean CE of the last fine-tuning epoch.
    pub last_epoch_ce: f64,
    /// Average bits the plan's thresholds give on the calibration tokens.
    pub calibration_effective_bits: f64,
    /// Linears that select per token.
    pub dynamic_linears: usize,
    /// Of those, the ones estimating by norm regression.
    pub linear_estimators: usize,
    /// Of those, the ones estimating by random projection.
    pub jl_estimators: usize,
    /// Average bits of the static baseline plan.
    pub static_bits: Option<f64>,
    /// Plan file.
    pub plan: PathBuf,
}

/// Result of a calibration run.
#[derive(Debug, Clone, Serialize)]
pub struct CalibrateReport {
    /// Where the plans are.
    pub budget_dir: PathBuf,
    /// Σ size·m / Σ size.
    pub memory_bits: f64,
    /// Whether the knapsack was solved exactly.
    pub exact_knapsack: bool,
    /// Per target.
    pub targets: Vec<TargetReport>,
    /// Wall time of each stage, in order.
    pub stages: Vec<StageTime>,
    /// Wall time.
    pub seconds: f64,
}

/// Wall time of one calibration stage.
#[derive(Debug, Clone, Serialize)]
pub struct StageTime {
    /// What ran.
    pub stage: String,
    /// Seconds it took.
    pub seconds: f64,
}

impl StageTime {
    fn since(stage: &str, t: Instant) -> StageTime {
        StageTime {
            stage: stage.into(),
            seconds: t.elapsed().as_secs_f64(),
        }
    }
}

/// Largest distance, in average bits, between a plan's precision and its target.
pub const TARGET_TOLERANCE: f64 = 0.05;

/// Check every setting against the model's precisions and a sane range, before any work.
pub fn check_options(o: &CalibrateOptions, info: &AnyPrecInfo) -> Result<()> {
    let (lo, hi) = (info.seed_bits.max(3), info.max_bits);
    ensure!(
        (lo..=hi).contains(&o.min_bits),
        "--min-bits {} is out of range: this model runs at {lo}..={hi} bits",
        o.min_bits
    );
    ensure!(
        (lo..=hi).contains(&o.max_bits) && o.max_bits > o.min_bits,
        "--max-bits {} is out of range: it must be above --min-bits {} and at most the model's {hi} bits",
        o.max_bits,
        o.min_bits
    );
    ensure!(
        o.budget.is_finite() && o.budget >= o.min_bits as f64 && o.budget <= o.max_bits as f64,
        "--budget {} must be within {}..={} bits (--min-bits..=--max-bits)",
        o.budget,
        o.min_bits,
        o.max_bits
    );
    ensure!(!o.targets.is_empty(), "no --targets given");
    ensure!(
        !o.tf32 || o.device != dpllm_engine::Device::Cpu,
        "--tf32 is a GPU setting: add --device cuda"
    );
    for &t in &o.targets {
        ensure!(
            t.is_finite() && t >= o.min_bits as f64 && t <= o.budget,
            "target {t} must be within {}..={} (the lowest precision and the budget)",
            o.min_bits,
            o.budget
        );
    }
    let f = &o.finetune;
    ensure!(
        f.lr.is_finite() && f.lr > 0.0 && f.lr <= 1.0,
        "--lr {} is out of range (0, 1]",
        f.lr
    );
    ensure!(
        f.weight_decay.is_finite() && (0.0..1.0).contains(&f.weight_decay),
        "weight decay {} is out of range [0, 1)",
        f.weight_decay
    );
    if let Some(a) = f.alpha {
        ensure!(
            a.is_finite() && (0.0..=1e6).contains(&a),
            "--alpha {a} is out of range [0, 1e6]"
        );
    }
    ensure!(
        (1..=1000).contains(&f.epochs),
        "--epochs {} is out of range 1..=1000",
        f.epochs
    );
    ensure!(
        (1..=1_000_000).contains(&o.fit.steps),
        "--jl-steps {} is out of range 1..=1000000",
        o.fit.steps
    );
    ensure!(
        (1..=4096).contains(&o.fit.k),
        "--jl-k {} is out of range 1..=4096",
        o.fit.k
    );
    ensure!(
        (1..=1 << 20).contains(&o.max_samples),
        "estimator input samples {} is out of range 1..=1048576",
        o.max_samples
    );
    Ok(o.fit_device.check()?)
}

/// Refuse a plan whose precision misses its target: the average of its linears'
/// precisions, and the average its thresholds give on the calibration tokens.
fn check_plan_precision(
    target: f64,
    mean_bits: f64,
    calibration_bits: f64,
    opts: &CalibrateOptions,
) -> Result<()> {
    for (what, bits) in [
        ("the plan's average precision", mean_bits),
        ("its thresholds on the calibration tokens", calibration_bits),
    ] {
        ensure!(
            (bits - target).abs() <= TARGET_TOLERANCE,
            "target {target}: {what} is {bits:.3} bits, more than {TARGET_TOLERANCE} from the target (fine-tuning diverged or saturated: lower --lr (now {}){}); no plans were written",
            opts.finetune.lr,
            if opts.finetune.exact_target { "" } else { ", or drop --no-exact-target" }
        );
    }
    Ok(())
}

/// Per-linear fitted estimators, keyed by (linear, lower precision).
type EstimatorCache = HashMap<(usize, u32), Fitted>;

/// The estimator of linear `g`'s precision pair (lo, lo + 1), a projection
/// fine-tuned on `be`.
fn fit_pair<G: GradBackend>(
    be: &G,
    g: usize,
    l: &LinearWeights,
    calib: &LinearCalib,
    lo: u32,
    opts: &CalibrateOptions,
) -> Result<Fitted> {
    let e = &calib.e[(lo - l.min_bits) as usize];
    let e_sample: Vec<f32> = calib.sample_idx.iter().map(|&t| e[t]).collect();
    fit(
        be,
        &calib.est_norm,
        e,
        &l.delta(lo),
        l.rows,
        l.cols,
        &calib.sample,
        &e_sample,
        &opts.fit,
        opts.fit.seed ^ (g as u64) << 8 ^ lo as u64,
    )
}

/// Linear `l`'s precision pair (lo, hi) around p, the weight r of lo, and,
/// when it has two precisions, how its calibration errors decide between
/// them: worked out once per target and linear, read by the fits and the plans.
#[derive(Debug, Clone, Copy)]
struct PairRule {
    lo: u32,
    hi: u32,
    r: f64,
    decision: Option<Decision>,
}

fn pair_rule(l: &LinearWeights, calib: &LinearCalib, p: f64) -> PairRule {
    let (lo, hi, r) = split_precision(p, l.min_bits, l.max_bits);
    let decision = (lo != hi).then(|| decide(&calib.e[(lo - l.min_bits) as usize], r));
    PairRule {
        lo,
        hi,
        r,
        decision,
    }
}

/// Where the projection estimators are fine-tuned (`opts.fit_device`),
/// opened before the long stages so that a missing GPU fails early.
enum FitBackend {
    Cpu,
    #[cfg(feature = "cuda")]
    Cuda(Box<dpllm_grad::cuda::CudaGrad>),
}

impl FitBackend {
    fn open(device: Device) -> Result<FitBackend> {
        match device {
            Device::Cpu => Ok(FitBackend::Cpu),
            #[cfg(feature = "cuda")]
            Device::Cuda(n) => Ok(FitBackend::Cuda(Box::new(
                dpllm_grad::cuda::CudaGrad::open(n)
                    .with_context(|| format!("--jl-device {device}"))?,
            ))),
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => unreachable!("refused by Device::check"),
        }
    }
}

/// Every estimator the targets' rules need (one rule per linear per target),
/// on `fit`: on the CPU in parallel over linears (each fit is a long chain
/// of small products), on a GPU one after another.
fn fit_all(
    fit: &FitBackend,
    w: &[LinearWeights],
    calib: &[LinearCalib],
    rules: &[Vec<PairRule>],
    opts: &CalibrateOptions,
) -> Result<EstimatorCache> {
    use rayon::prelude::*;
    let mut pairs: Vec<(usize, u32)> = (rules.iter())
        .flat_map(|r| r.iter().enumerate())
        .filter(|(_, r)| matches!(r.decision, Some(Decision::Threshold(_))))
        .map(|(g, r)| (g, r.lo))
        .collect();
    pairs.sort_unstable();
    pairs.dedup();
    match fit {
        FitBackend::Cpu => (pairs.into_par_iter())
            .map(|(g, lo)| Ok(((g, lo), fit_pair(&CpuGrad, g, &w[g], &calib[g], lo, opts)?)))
            .collect(),
        #[cfg(feature = "cuda")]
        FitBackend::Cuda(be) => (pairs.into_iter())
            .map(|(g, lo)| Ok(((g, lo), fit_pair(&**be, g, &w[g], &calib[g], lo, opts)?)))
            .collect(),
    }
}

/// The estimates of a linear's calibration tokens: every token for a regression,
/// the sampled tokens for a projection (only those inputs are kept).
fn estimates_of(f: &Fitted, c: &LinearCalib) -> Vec<f32> {
    match f {
        Fitted::Linear { .. } => f.estimate(&[], &c.est_norm, c.cols),
        Fitted::Jl { .. } => f.estimate(&c.sample, &[], c.cols),
    }
}

/// Build the plan entry of linear `g` for precision `p` by its `rule` (the
/// estimator fitted in `cache`); also returns the average bits the rule
/// gives on the calibration tokens.
fn linear_plan(
    g: usize,
    l: &LinearWeights,
    calib: &LinearCalib,
    p: f64,
    rule: PairRule,
    opts: &CalibrateOptions,
    cache: &EstimatorCache,
) -> (LinearPlan, f64) {
    let PairRule {
        lo,
        hi,
        r,
        decision,
    } = rule;
    let base = LinearPlan {
        name: l.name.clone(),
        size: l.size(),
        max_bits: l.max_bits,
        avg_bits: p as f32,
        low_bits: lo,
        high_bits: lo,
        threshold: 0.0,
        estimator: EstimatorSpec::None,
    };
    let Some(decision) = decision else {
        // m_l = b_min: the linear has a single precision.
        return (
            LinearPlan {
                avg_bits: lo as f32,
                ..base
            },
            lo as f64,
        );
    };
    match decision {
        Decision::AlwaysLow => (
            LinearPlan {
                avg_bits: lo as f32,
                ..base
            },
            lo as f64,
        ),
        Decision::AlwaysHigh => (
            LinearPlan {
                avg_bits: hi as f32,
                low_bits: hi,
                high_bits: hi,
                ..base
            },
            hi as f64,
        ),
        Decision::Threshold(tau_true) => {
            let fitted = &cache[&(g, lo)]; // fit_all fitted every threshold rule
            let est = estimates_of(fitted, calib);
            let tau = match opts.threshold_source {
                ThresholdSource::True => tau_true,
                ThresholdSource::Estimate => quantile(&est, r),
            };
            let high = est.iter().filter(|&&v| v > tau).count() as f64 / est.len().max(1) as f64;
            let estimator = match fitted {
                Fitted::Linear { a, c, r2 } => EstimatorSpec::Linear {
                    a: *a,
                    c: *c,
                    r2: *r2,
                },
                Fitted::Jl { k, r2, bias, .. } => EstimatorSpec::Jl {
                    tensor: format!("{}.jl{lo}", l.name),
                    k: *k,
                    bias: *bias,
                    r2: *r2,
                },
            };
            (
                LinearPlan {
                    high_bits: hi,
                    threshold: tau,
                    estimator,
                    ..base
                },
                lo as f64 + high,
            )
        }
    }
}

fn new_plan(
    kind: PlanKind,
    opts: &CalibrateOptions,
    target: f64,
    linears: Vec<LinearPlan>,
    calibration: serde_json::Map<String, serde_json::Value>,
) -> Plan {
    Plan {
        format: PLAN_FORMAT.into(),
        version: PLAN_VERSION,
        kind,
        budget_bits: opts.budget,
        target_bits: target,
        min_bits: opts.min_bits,
        max_bits: opts.max_bits,
        async_estimation: opts.async_estimation,
        calibration,
        linears,
    }
}

/// Write the random-projection matrices the plans use.
fn write_estimators(path: &Path, w: &[LinearWeights], cache: &EstimatorCache) -> Result<()> {
    let mut keys: Vec<&(usize, u32)> = cache
        .keys()
        .filter(|k| matches!(cache[k], Fitted::Jl { .. }))
        .collect();
    keys.sort();
    let specs: Vec<TensorSpec> = keys
        .iter()
        .map(|&&(g, lo)| {
            let k = match &cache[&(g, lo)] {
                Fitted::Jl { k, .. } => *k,
                Fitted::Linear { .. } => unreachable!("filtered above"),
            };
            TensorSpec {
                name: format!("{}.jl{lo}", w[g].name),
                dtype: "F32",
                shape: vec![k, w[g].cols],
            }
        })
        .collect();
    let meta = BTreeMap::from([("format".to_string(), "dpllm-estimators".to_string())]);
    write_safetensors(path, &specs, &meta, |i, out: &mut dyn Write| {
        match &cache[keys[i]] {
            Fitted::Jl { g, .. } => {
                out.write_all(&g.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>())
            }
            Fitted::Linear { .. } => unreachable!("filtered above"),
        }
    })?;
    Ok(())
}

/// Calibrate the any-precision model in `model_dir` for one budget and its targets,
/// writing `model_dir/plans/budget-M/`.
pub fn calibrate(
    model_dir: &Path,
    data: &CalibrationData,
    opts: &CalibrateOptions,
) -> Result<CalibrateReport> {
    let t0 = Instant::now();
    let path = model_dir.join(ANYPREC_WEIGHTS);
    ensure!(
        path.is_file(),
        "{} is not a dpllm any-precision model (no {ANYPREC_WEIGHTS}; run `dpllm quantize` first)",
        model_dir.display()
    );
    let ck = Checkpoint::open_file(&path)?;
    let info = AnyPrecInfo::from_metadata(ck.metadata(), &path)?;
    check_options(opts, &info)?;
    ensure!(
        !data.finetune.is_empty() && !data.estimator.is_empty(),
        "calibration needs fine-tuning and estimator sequences"
    );
    let out_dir = plan::budget_dir(model_dir, opts.budget);
    check_replaceable(&out_dir, OutputKind::Plans, opts.overwrite)?;
    let fit_backend = FitBackend::open(opts.fit_device)?;
    let model = Model::load_with(
        model_dir,
        &LoadOptions {
            max_bits: Some(opts.max_bits),
            ..Default::default()
        },
    )?;
    let specs = model.config.linears();

    // 2a: memory budget → m_l from the quantizer's weighted errors.
    let items: Vec<Item> = specs
        .iter()
        .map(|s| {
            let err = anyprec::read_sq_err(&ck, &s.prefix, info.seed_bits)?;
            let cost = (opts.min_bits..=opts.max_bits)
                .map(|b| err[(b - info.seed_bits) as usize])
                .collect();
            Ok(Item {
                size: s.size(),
                cost,
            })
        })
        .collect::<Result<_>>()?;
    let assign = budget::solve(&items, opts.min_bits, opts.budget)?;
    let weights = quantized_linears(&model, opts.min_bits, &assign.bits)?;
    let mut tuner = Tuner::open(opts.device, &model, &weights, opts.tf32, LevelStore::Auto)?;
    drop(model);
    let load = format!("load, budget, weights ({})", tuner.level_store().name());
    let mut stages = vec![StageTime::since(&load, t0)];

    // The static baseline per target: the same knapsack at T, each linear up to its m_l.
    let static_items: Vec<Item> = weights
        .iter()
        .zip(&items)
        .map(|(l, it)| Item {
            size: it.size,
            cost: it.cost[..=(l.max_bits - opts.min_bits) as usize].to_vec(),
        })
        .collect();
    let statics = opts
        .targets
        .iter()
        .map(|&t| budget::solve(&static_items, opts.min_bits, t))
        .collect::<Result<Vec<_>>>()?;

    // 2b: one fine-tuning per target (on a GPU, several at once).
    let inits: Vec<Option<Vec<f64>>> = (statics.iter())
        .map(|st| {
            (opts.init == FinetuneInit::Static).then(|| st.bits.iter().map(|&b| b as f64).collect())
        })
        .collect();
    let targets: Vec<(f64, Option<&[f64]>)> = (opts.targets.iter().zip(&inits))
        .map(|(&t, i)| (t, i.as_deref()))
        .collect();
    let start = Instant::now();
    let tuned = tuner.finetune_all(&weights, &targets, &data.finetune, &opts.finetune)?;
    let names: Vec<String> = opts.targets.iter().map(|t| t.to_string()).collect();
    let stage = format!(
        "fine-tune T={} ({} steps each, {} at once)",
        names.join(","),
        tuned.first().map_or(0, |f| f.steps),
        tuner.lanes()
    );
    stages.push(StageTime::since(&stage, start));

    // 2c/2d inputs: the model at m_l.
    let t = Instant::now();
    let calib = tuner.collect(
        &weights,
        &data.estimator,
        CollectOptions {
            async_estimation: opts.async_estimation,
            max_samples: opts.max_samples,
            progress: opts.progress,
        },
    )?;
    drop(tuner);
    stages.push(StageTime::since("estimator data", t));
    let t_fit = Instant::now();

    let parent = out_dir.parent().expect("budget dir has a parent");
    std::fs::create_dir_all(parent)
        .with_context(|| format!("cannot create {}", parent.display()))?;
    // The budget directory is written beside its place and renamed in at the end
    // (removed if anything fails on the way).
    let mut staging = StagingDir::new(&out_dir, OutputKind::Plans, opts.overwrite)?;
    let tmp = staging.path();
    let reports = {
        let rules: Vec<Vec<PairRule>> = (tuned.iter())
            .map(|ft| {
                (weights.iter().zip(&calib).zip(&ft.p))
                    .map(|((l, c), &p)| pair_rule(l, c, p))
                    .collect()
            })
            .collect();
        let cache = fit_all(&fit_backend, &weights, &calib, &rules, opts)?;
        let mut reports = Vec::new();
        let per_target = opts.targets.iter().zip(&tuned).zip(&statics).zip(&rules);
        for (((&target, ft), st), rules) in per_target {
            let mut linears = Vec::new();
            let mut expected = 0.0;
            for (g, l) in weights.iter().enumerate() {
                let rule = rules[g];
                let (lp, bits) = linear_plan(g, l, &calib[g], ft.p[g], rule, opts, &cache);
                expected += bits * l.size() as f64;
                linears.push(lp);
            }
            let total: f64 = weights.iter().map(|l| l.size() as f64).sum();
            let expected = expected / total;
            check_plan_precision(target, ft.mean_bits, expected, opts)?;
            let count =
                |f: fn(&EstimatorSpec) -> bool| linears.iter().filter(|l| f(&l.estimator)).count();
            let (nlin, njl) = (
                count(|e| matches!(e, EstimatorSpec::Linear { .. })),
                count(|e| matches!(e, EstimatorSpec::Jl { .. })),
            );
            let mut info = serde_json::Map::new();
            info.insert("finetune".into(), serde_json::to_value(&opts.finetune)?);
            info.insert("finetune_init".into(), serde_json::to_value(opts.init)?);
            info.insert("finetune_sequences".into(), data.finetune.len().into());
            info.insert("estimator_sequences".into(), data.estimator.len().into());
            info.insert(
                "sequence_tokens".into(),
                data.finetune.first().map_or(0, Vec::len).into(),
            );
            info.insert("estimators".into(), serde_json::to_value(&opts.fit)?);
            info.insert(
                "threshold_source".into(),
                serde_json::to_value(opts.threshold_source)?,
            );
            info.insert("trained_mean_bits".into(), ft.trained_mean_bits.into());
            info.insert("last_epoch_ce".into(), ft.last_epoch_ce.into());
            info.insert("calibration_effective_bits".into(), expected.into());
            info.insert("exact_knapsack".into(), assign.exact.into());
            let plan = new_plan(PlanKind::Dynamic, opts, target, linears, info);
            let plan_file = plan::plan_path(tmp, PlanKind::Dynamic, target);
            plan.validate(&plan_file)?;
            plan.save(&plan_file)?;
            let static_bits = if opts.static_plans {
                let linears = weights
                    .iter()
                    .zip(&st.bits)
                    .map(|(l, &b)| LinearPlan {
                        name: l.name.clone(),
                        size: l.size(),
                        max_bits: l.max_bits,
                        avg_bits: b as f32,
                        low_bits: b,
                        high_bits: b,
                        threshold: 0.0,
                        estimator: EstimatorSpec::None,
                    })
                    .collect();
                let mut info = serde_json::Map::new();
                info.insert("exact_knapsack".into(), st.exact.into());
                let sp = new_plan(PlanKind::Static, opts, target, linears, info);
                sp.save(&plan::plan_path(tmp, PlanKind::Static, target))?;
                Some(st.avg_bits)
            } else {
                None
            };
            reports.push(TargetReport {
                target,
                trained_mean_bits: ft.trained_mean_bits,
                mean_bits: ft.mean_bits,
                last_epoch_ce: ft.last_epoch_ce,
                calibration_effective_bits: expected,
                dynamic_linears: nlin + njl,
                linear_estimators: nlin,
                jl_estimators: njl,
                static_bits,
                plan: plan::plan_path(&out_dir, PlanKind::Dynamic, target),
            });
        }
        write_estimators(&tmp.join(ESTIMATORS_FILE), &weights, &cache)?;
        reports
    };
    stages.push(StageTime::since("estimator fits, thresholds, plans", t_fit));
    staging.set_inputs(serde_json::json!({ "options": opts, "inputs": opts.inputs }));
    staging
        .publish()
        .with_context(|| format!("cannot move the plans to {}", out_dir.display()))?;
    Ok(CalibrateReport {
        budget_dir: out_dir,
        memory_bits: assign.avg_bits,
        exact_knapsack: assign.exact,
        targets: reports,
        stages,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> AnyPrecInfo {
        AnyPrecInfo {
            version: anyprec::FORMAT_VERSION,
            seed_bits: 3,
            max_bits: 8,
            architecture: "LlamaForCausalLM".into(),
            provenance: Default::default(),
        }
    }

    #[test]
    fn plans_off_their_target_are_refused() {
        let o = CalibrateOptions::default();
        check_plan_precision(4.0, 4.0, 4.03, &o).unwrap();
        let e = check_plan_precision(4.0, 5.2, 5.1, &o)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("target 4") && e.contains("5.200") && e.contains("--lr"),
            "{e}"
        );
        let e = check_plan_precision(3.5, 3.5, 3.3, &o)
            .unwrap_err()
            .to_string();
        assert!(e.contains("thresholds") && e.contains("3.300"), "{e}");
    }

    #[test]
    fn every_numeric_setting_is_range_checked() {
        let ok = CalibrateOptions::default();
        check_options(&ok, &info()).unwrap();
        let bad: Vec<(CalibrateOptions, &str)> = vec![
            (
                CalibrateOptions {
                    finetune: FinetuneOptions {
                        lr: 1e3,
                        ..Default::default()
                    },
                    ..ok.clone()
                },
                "--lr",
            ),
            (
                CalibrateOptions {
                    finetune: FinetuneOptions {
                        lr: f64::NAN,
                        ..Default::default()
                    },
                    ..ok.clone()
                },
                "--lr",
            ),
            (
                CalibrateOptions {
                    finetune: FinetuneOptions {
                        alpha: Some(f64::INFINITY),
                        ..Default::default()
                    },
                    ..ok.clone()
                },
                "--alpha",
            ),
            (
                CalibrateOptions {
                    finetune: FinetuneOptions {
                        epochs: 0,
                        ..Default::default()
                    },
                    ..ok.clone()
                },
                "--epochs",
            ),
            (
                CalibrateOptions {
                    fit: FitOptions {
                        k: 0,
                        ..Default::default()
                    },
                    ..ok.clone()
                },
                "--jl-k",
            ),
            (
                CalibrateOptions {
                    fit: FitOptions {
                        steps: usize::MAX,
                        ..Default::default()
                    },
                    ..ok.clone()
                },
                "--jl-steps",
            ),
            (
                CalibrateOptions {
                    min_bits: 2,
                    ..ok.clone()
                },
                "--min-bits 2",
            ),
            (
                CalibrateOptions {
                    min_bits: 7,
                    max_bits: 6,
                    ..ok.clone()
                },
                "--max-bits 6",
            ),
            (
                CalibrateOptions {
                    budget: f64::NAN,
                    ..ok.clone()
                },
                "--budget",
            ),
            (
                CalibrateOptions {
                    targets: vec![5.5],
                    ..ok.clone()
                },
                "target 5.5",
            ),
        ];
        for (o, want) in bad {
            let e = check_options(&o, &info()).unwrap_err().to_string();
            assert!(e.contains(want), "{want}: {e}");
        }
    }
}
