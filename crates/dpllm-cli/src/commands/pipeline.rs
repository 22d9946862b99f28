//! `dpllm pipeline MODEL --work DIR --calib FILE --text FILE`: the whole product
//! on one model: sensitivities → any-precision model → DP-LLM plans → perplexity
//! and effective bits of every plan against the static and uniform baselines.
//! Stages whose output already exists in DIR are skipped.

use std::path::PathBuf;

use dpllm_calibrate::pipeline::calibrate;
use dpllm_engine::tokenizer::TextTokenizer;
use dpllm_engine::{LoadOptions, Model, Precision, RuntimePlan};
use dpllm_eval::perplexity::{perplexity, Perplexity};
use dpllm_format::anyprec::ANYPREC_WEIGHTS;
use dpllm_format::plan::{self, Plan, PlanKind};
use dpllm_quantize::model_quant::{quantize_model, QuantizeOptions};
use serde::Serialize;

use super::calib_text::CalibArgs;
use super::calibrate::CalibrationArgs;

/// Arguments of `pipeline`.
#[derive(clap::Args)]
pub struct Args {
    /// Full-precision model directory (Hugging Face layout).
    pub model: PathBuf,
    /// Working directory: WORK/model is the any-precision model (with its plans).
    #[arg(long)]
    pub work: PathBuf,
    /// Held-out evaluation text.
    #[arg(long)]
    pub text: PathBuf,
    /// Tokens per perplexity chunk.
    #[arg(long, default_value_t = 1024)]
    pub ctx: usize,
    /// Evaluate at most this many chunks.
    #[arg(long)]
    pub max_chunks: Option<usize>,
    /// Sensitivity sequences (of --seq-len tokens) for quantization.
    #[arg(long, default_value_t = 100)]
    pub sensitivity_samples: usize,
    #[command(flatten)]
    pub calibration: CalibrationArgs,
    /// Write the results as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write the results table as Markdown.
    #[arg(long)]
    pub markdown: Option<PathBuf>,
}

/// One evaluated configuration.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// "full precision", "uniform", "static" or "dp-llm".
    pub method: String,
    /// Target (plans) or bits (uniform).
    pub target: Option<f64>,
    /// The perplexity run.
    pub result: Perplexity,
}

/// All results.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Source model.
    pub model: String,
    /// Evaluation text.
    pub text: String,
    /// Memory budget.
    pub budget: f64,
    /// Rows, in table order.
    pub rows: Vec<Row>,
}

fn eval(model: &Model, ids: &[u32], a: &Args, prec: Precision<'_>) -> anyhow::Result<Perplexity> {
    perplexity(model, ids, a.ctx, a.max_chunks, true, prec)
}

/// Run the stages that are missing, then evaluate.
pub fn run(a: Args) -> anyhow::Result<()> {
    let src = crate::model_dir(&a.model)?;
    let calib_file = a.calibration.calib.required_file()?;
    let text = std::fs::read_to_string(&a.text).map_err(|e| anyhow::anyhow!("cannot read --text {}: {e}", a.text.display()))?;
    std::fs::create_dir_all(&a.work).map_err(|e| anyhow::anyhow!("cannot create --work {}: {e}", a.work.display()))?;
    let q = a.work.join("model");
    if !q.join(ANYPREC_WEIGHTS).is_file() {
        let sens = a.work.join("sensitivity.safetensors");
        if !sens.is_file() {
            eprintln!("[1/3] sensitivities of {}", src.display());
            let args = CalibArgs { samples: a.sensitivity_samples, ..a.calibration.calib.clone() };
            super::sensitivity::compute(src, &args, &calib_file, &sens)?;
        }
        eprintln!("[2/3] quantizing into {}", q.display());
        let r = quantize_model(src, &q, &QuantizeOptions { sensitivity: Some(sens), progress: true, ..Default::default() })?;
        eprintln!("quantized {} linears in {:.1}s", r.linears, r.seconds);
    }
    let budget = a.calibration.budget;
    let bdir = plan::budget_dir(&q, budget);
    if !bdir.is_dir() {
        eprintln!("[3/3] calibrating budget {budget} for targets {:?}", a.calibration.targets);
        let (opts, data) = a.calibration.options_and_data(&q, &calib_file)?;
        let r = calibrate(&q, &data, &opts)?;
        eprintln!("calibrated in {:.1}s", r.seconds);
    }
    let config = dpllm_format::ModelConfig::from_dir(&q)?;
    let tok = TextTokenizer::from_dir(&q, config.bos_token_id, &config.eos_token_ids)?;
    let ids = tok.encode(&text, true)?;
    let mut rows = Vec::new();
    let full = Model::load(src)?;
    rows.push(Row { method: "full precision".into(), target: None, result: eval(&full, &ids, &a, Precision::Fixed)? });
    drop(full);
    let uniform = Model::load_with(&q, &LoadOptions { max_bits: Some(a.calibration.max_bits), ..Default::default() })?;
    for b in a.calibration.min_bits..=a.calibration.max_bits {
        uniform.set_bits(b)?;
        rows.push(Row { method: "uniform".into(), target: Some(b as f64), result: eval(&uniform, &ids, &a, Precision::Fixed)? });
    }
    drop(uniform);
    // One model loaded for the budget serves every plan of it: only the small tables change.
    let targets = plan::available_targets(&bdir, PlanKind::Dynamic);
    let first = targets.first().ok_or_else(|| anyhow::anyhow!("{} holds no plans", bdir.display()))?;
    let model = Model::load_with(&q, &LoadOptions::for_plan(&Plan::load(&plan::plan_path(&bdir, PlanKind::Dynamic, *first))?))?;
    for &t in &targets {
        for (kind, name) in [(PlanKind::Static, "static"), (PlanKind::Dynamic, "dp-llm")] {
            let path = plan::plan_path(&bdir, kind, t);
            if path.is_file() {
                let rp = RuntimePlan::load(&path, &model)?;
                rows.push(Row { method: name.into(), target: Some(t), result: eval(&model, &ids, &a, Precision::Dynamic(&rp))? });
            }
        }
    }
    let report = Report { model: src.display().to_string(), text: a.text.display().to_string(), budget, rows };
    let table = markdown(&report);
    print!("{table}");
    if let Some(p) = &a.json {
        dpllm_eval::report::write_json(p, &report)?;
    }
    if let Some(p) = &a.markdown {
        dpllm_format::write_atomic(p, table.as_bytes())?;
    }
    Ok(())
}

/// The results as a Markdown table.
pub fn markdown(r: &Report) -> String {
    let mut s = format!("Perplexity of {} on {} (memory budget {:.2} bits for the plans)\n\n", r.model, r.text, r.budget);
    s.push_str("| method | target / bits | effective bits | perplexity | estimator work |\n|---|---|---|---|---|\n");
    for row in &r.rows {
        s.push_str(&format!(
            "| {} | {} | {} | {:.4} | {} |\n",
            row.method,
            row.target.map_or("-".into(), |t| format!("{t:.2}")),
            row.result.effective_bits.map_or("16 (bf16)".into(), |b| format!("{b:.3}")),
            row.result.perplexity,
            row.result.estimator_overhead.map_or("-".into(), |o| format!("{:.2}%", 100.0 * o)),
        ));
    }
    s
}
