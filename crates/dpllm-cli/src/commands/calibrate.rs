//! `dpllm calibrate MODEL --budget M --targets T,... --calib FILE`: DP-LLM plans.

use std::path::{Path, PathBuf};

use dpllm_calibrate::estimators::FitOptions;
use dpllm_calibrate::finetune::FinetuneOptions;
use dpllm_calibrate::pipeline::{
    calibrate, CalibrateOptions, CalibrateReport, CalibrationData, FinetuneInit, ThresholdSource,
};
use dpllm_engine::tokenizer::TextTokenizer;

use super::calib_text::CalibArgs;

/// Arguments of `calibrate`.
#[derive(clap::Args)]
pub struct Args {
    /// Where precision fine-tuning and the estimator data run: cpu, or cuda /
    /// cuda:N (the model's f32 weights at every precision a plan may use are
    /// held on the GPU). Estimators and thresholds are fitted on the CPU.
    #[arg(long, default_value = "cpu")]
    pub device: dpllm_engine::Device,
    /// Any-precision model directory (from `dpllm quantize`); plans go to MODEL/plans/budget-M/.
    pub model: PathBuf,
    #[command(flatten)]
    pub calibration: CalibrationArgs,
    /// Replace this budget's existing plans.
    #[arg(long)]
    pub force: bool,
}

/// The settings of a calibration (shared by `calibrate` and `pipeline`).
#[derive(clap::Args)]
pub struct CalibrationArgs {
    /// Memory budget in average bits: each linear keeps at most the precision the
    /// budget's knapsack gives it.
    #[arg(long, default_value_t = 5.0)]
    pub budget: f64,
    /// Target average precisions, one plan each (each ≤ the budget).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "3.25,3.5,3.75,4.0,4.25,4.5,4.75"
    )]
    pub targets: Vec<f64>,
    /// Calibration text and fine-tuning sequences (--samples x --seq-len; the paper uses 1000 x 512).
    #[command(flatten)]
    pub calib: CalibArgs,
    /// Epochs of precision fine-tuning (paper: 5).
    #[arg(long, default_value_t = 2)]
    pub epochs: usize,
    /// AdamW learning rate of precision fine-tuning.
    #[arg(long, default_value_t = 0.01)]
    pub lr: f64,
    /// Weight α of the (P − T)² penalty (default: 1, or 10 for targets ≤ 3.25).
    #[arg(long)]
    pub alpha: Option<f64>,
    /// Start fine-tuning from the static knapsack assignment (default) or from p = T everywhere.
    #[arg(long, value_enum, default_value = "static")]
    pub init: Init,
    /// Keep the trained average precision instead of shifting it onto the target exactly.
    #[arg(long)]
    pub no_exact_target: bool,
    /// Sequences (of --seq-len tokens) for estimators and thresholds (paper: 40 x 512).
    #[arg(long, default_value_t = 40)]
    pub estimator_samples: usize,
    /// Lowest precision a linear may run at.
    #[arg(long, default_value_t = 3)]
    pub min_bits: u32,
    /// Highest precision a linear may keep.
    #[arg(long, default_value_t = 6)]
    pub max_bits: u32,
    /// Fit estimators on the exact inputs of q/k/v and gate/up instead of the
    /// asynchronous residual-stream approximation.
    #[arg(long)]
    pub sync_estimation: bool,
    /// Thresholds are quantiles of the true error (METHOD.md) or of the estimates.
    #[arg(long, value_enum, default_value = "true")]
    pub threshold_from: ThresholdFrom,
    /// SGD steps of each random-projection estimator (paper: ~10000).
    #[arg(long, default_value_t = 2000)]
    pub jl_steps: usize,
    /// Rows of each random projection.
    #[arg(long, default_value_t = 64)]
    pub jl_k: usize,
    /// Where the random projections are fine-tuned: cpu (every core, linears
    /// in parallel) or cuda / cuda:N (one linear after another: for the wide
    /// linears of 7B-class models, where the CPU takes minutes a target).
    #[arg(long, default_value = "cpu")]
    pub jl_device: dpllm_engine::Device,
    /// Skip the static layer-wise baseline plans.
    #[arg(long)]
    pub no_static: bool,
    /// With --device cuda: fine-tuning's matrix products on TF32 tensor cores
    /// (10-bit mantissas, f32 sums) instead of exact f32; the tests hold the
    /// learned precisions within 0.01 bits of the CPU's on a tiny model.
    #[arg(long)]
    pub tf32: bool,
    /// With --device cuda: targets fine-tuned at once, each on a stream with a
    /// copy of the f32 model of its own (1..=8); 0 picks as many as fit in a
    /// third of the free GPU memory.
    #[arg(long, default_value_t = 0)]
    pub lanes: usize,
}

/// `--init`.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum Init {
    /// The static layer-wise assignment at the target.
    Static,
    /// Every linear at the target.
    Target,
}

/// `--threshold-from`.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum ThresholdFrom {
    /// Quantiles of the true relative error.
    True,
    /// Quantiles of the estimator's output.
    Estimate,
}

impl CalibrationArgs {
    /// Pipeline options and token sequences for calibrating the model in `dir` on `file`.
    pub fn options_and_data(
        &self,
        dir: &Path,
        file: &Path,
    ) -> anyhow::Result<(CalibrateOptions, CalibrationData)> {
        if !dir.join(dpllm_format::anyprec::ANYPREC_WEIGHTS).is_file() {
            anyhow::bail!(
                "{} is not a dpllm any-precision model: run `dpllm quantize` first",
                dir.display()
            );
        }
        if self.estimator_samples == 0 || self.epochs == 0 {
            anyhow::bail!("--estimator-samples and --epochs must be at least 1");
        }
        if self.lanes > 8 {
            anyhow::bail!(
                "--lanes {} must be within 0..=8 (0: as many as fit)",
                self.lanes
            );
        }
        let config = dpllm_format::ModelConfig::from_dir(dir)?;
        let tok = TextTokenizer::from_dir(dir, config.bos_token_id, &config.eos_token_ids)?;
        let finetune = self
            .calib
            .sequences(file, &tok, config.max_position_embeddings)?;
        let est_args = CalibArgs {
            samples: self.estimator_samples,
            seed: self.calib.seed.wrapping_add(1),
            ..self.calib.clone()
        };
        let estimator = est_args.sequences(file, &tok, config.max_position_embeddings)?;
        let opts = CalibrateOptions {
            budget: self.budget,
            targets: self.targets.clone(),
            min_bits: self.min_bits,
            max_bits: self.max_bits,
            async_estimation: !self.sync_estimation,
            threshold_source: match self.threshold_from {
                ThresholdFrom::True => ThresholdSource::True,
                ThresholdFrom::Estimate => ThresholdSource::Estimate,
            },
            finetune: FinetuneOptions {
                lr: self.lr,
                epochs: self.epochs,
                alpha: self.alpha,
                exact_target: !self.no_exact_target,
                progress: true,
                lanes: self.lanes,
                ..Default::default()
            },
            init: match self.init {
                Init::Static => FinetuneInit::Static,
                Init::Target => FinetuneInit::Target,
            },
            fit: FitOptions {
                steps: self.jl_steps,
                k: self.jl_k,
                ..Default::default()
            },
            fit_device: self.jl_device,
            static_plans: !self.no_static,
            tf32: self.tf32,
            progress: true,
            ..Default::default()
        };
        Ok((
            opts,
            CalibrationData {
                finetune,
                estimator,
            },
        ))
    }
}

/// Run the calibration and print a table of targets.
pub fn run(a: Args) -> anyhow::Result<()> {
    a.device.check()?;
    let dir = crate::model_dir(&a.model)?;
    let file = a.calibration.calib.required_file()?;
    let (opts, data) = a.calibration.options_and_data(dir, &file)?;
    let opts = CalibrateOptions {
        overwrite: a.force,
        device: a.device,
        ..opts
    };
    let r = calibrate(dir, &data, &opts)?;
    println!(
        "budget {:.2} bits: memory {:.3} bits/weight ({} knapsack), plans in {} ({:.1}s)",
        opts.budget,
        r.memory_bits,
        if r.exact_knapsack {
            "exact"
        } else {
            "coarsened"
        },
        r.budget_dir.display(),
        r.seconds
    );
    println!(
        "{:>7} {:>9} {:>9} {:>10} {:>9} {:>8} {:>5} {:>7}",
        "target", "trained P", "plan P", "calib bits", "static", "dynamic", "jl", "last CE"
    );
    for t in &r.targets {
        println!(
            "{:>7.2} {:>9.3} {:>9.3} {:>10.3} {:>9} {:>8} {:>5} {:>7.4}",
            t.target,
            t.trained_mean_bits,
            t.mean_bits,
            t.calibration_effective_bits,
            t.static_bits.map_or("-".into(), |b| format!("{b:.3}")),
            t.dynamic_linears,
            t.jl_estimators,
            t.last_epoch_ce
        );
    }
    print_stages(&r);
    Ok(())
}

/// The wall time of each calibration stage, on stderr.
pub fn print_stages(r: &CalibrateReport) {
    for s in &r.stages {
        eprintln!("  {:<44} {:>8.1} s", s.stage, s.seconds);
    }
}
