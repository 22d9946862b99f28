//! `dpllm pipeline MODEL --work DIR --calib FILE --text FILE`: the whole product
//! on one model: sensitivities → any-precision model → DP-LLM plans → perplexity
//! and effective bits of every plan against the static and uniform baselines.
//! Each stage records what it was made from (content fingerprints of the source
//! and calibration text, and the settings); a stage already in DIR is reused only
//! when that record matches this run's, recomputed with `--force`, refused otherwise.

use std::io::Write;
use std::path::{Path, PathBuf};

use dpllm_calibrate::pipeline::{calibrate, CalibrateOptions};
use dpllm_engine::session::PlanKey;
use dpllm_engine::tokenizer::TextTokenizer;
use dpllm_engine::{RunPrecision, ServedModel};
use dpllm_eval::perplexity::{perplexity, Perplexity};
use dpllm_format::fingerprint::{model_fingerprint, sha256_file, sha256_hex};
use dpllm_format::output::{Manifest, MARKDOWN_MARKER, VERSION};
use dpllm_format::plan::{self, PlanKind};
use dpllm_format::{check_output, OutputKind};
use dpllm_quantize::model_quant::{quantize_model, QuantizeOptions};
use serde::Serialize;
use serde_json::{json, Value};

use super::calib_text::CalibArgs;
use super::calibrate::CalibrationArgs;

/// Arguments of `pipeline`.
#[derive(clap::Args)]
pub struct Args {
    /// Where the sensitivities, the precision fine-tuning and the estimator
    /// data run: cpu, or cuda / cuda:N. Quantization, the estimator fits and
    /// the evaluation run on the CPU.
    #[arg(long, default_value = "cpu")]
    pub device: dpllm_engine::Device,
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
    /// Recompute the stages of WORK that were made from other inputs or settings
    /// (without it such stages are an error; matching stages are always reused).
    #[arg(long)]
    pub force: bool,
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

fn eval(
    served: &ServedModel,
    ids: &[u32],
    a: &Args,
    precision: RunPrecision,
) -> anyhow::Result<Perplexity> {
    perplexity(
        &mut served.session(precision, a.ctx)?,
        ids,
        a.ctx,
        a.max_chunks,
        true,
    )
}

/// `record` with its key: the sha256 of the record's JSON text.
fn keyed(mut record: Value) -> Value {
    let key = sha256_hex(record.to_string().as_bytes());
    record["key"] = key.into();
    record
}

/// What the stored stage at `path` was made from, as recorded when it was written.
fn stored_record(path: &Path, kind: OutputKind) -> Option<Value> {
    match kind {
        OutputKind::Sensitivity => {
            let ck = dpllm_format::Checkpoint::open_file(path).ok()?;
            serde_json::from_str(ck.metadata().get("inputs")?).ok()
        }
        OutputKind::Plans => Manifest::read(path)
            .ok()
            .map(|m| m.inputs["inputs"].clone()),
        _ => Manifest::read(path).ok().map(|m| m.inputs),
    }
}

/// Whether a stage must be computed: false when WORK holds it made from exactly
/// `record`; true when it is missing, or (with `force`) made from other inputs.
/// Made from other inputs without `force`: an error naming what differs.
fn must_compute(
    path: &Path,
    kind: OutputKind,
    record: &Value,
    force: bool,
) -> anyhow::Result<bool> {
    if !path.exists() {
        return Ok(true);
    }
    let stored = stored_record(path, kind);
    if stored.as_ref().map(|s| &s["key"]) == Some(&record["key"]) {
        eprintln!(
            "reusing {} (made from the same inputs and settings)",
            path.display()
        );
        return Ok(false);
    }
    let differs: Vec<String> = match stored.as_ref().and_then(Value::as_object) {
        Some(s) => record
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(k, v)| k.as_str() != "key" && s.get(k.as_str()) != Some(v))
            .map(|(k, _)| k.clone())
            .collect(),
        None => vec!["no record of its inputs: made by another command or dpllm version".into()],
    };
    if !force {
        anyhow::bail!(
            "{} was made from other inputs than this run's (differs in: {}): use --force to recompute it, or another --work",
            path.display(),
            differs.join(", ")
        );
    }
    eprintln!(
        "recomputing {} (made from other inputs: {})",
        path.display(),
        differs.join(", ")
    );
    Ok(true)
}

/// The calibration settings that decide what the plans are (not progress bars or --force).
fn plan_settings(opts: &CalibrateOptions) -> CalibrateOptions {
    let mut o = opts.clone();
    o.progress = false;
    o.overwrite = false;
    o.finetune.progress = false;
    o.inputs = Value::Null;
    o
}

/// Run the stages that are missing (or, with --force, made from other inputs), then evaluate.
pub fn run(a: Args) -> anyhow::Result<()> {
    a.device.check()?;
    let src = crate::model_dir(&a.model)?;
    let calib_file = a.calibration.calib.required_file()?;
    let q = a.work.join("model");
    let sens = a.work.join("sensitivity.safetensors");
    // Every output is checked before the long work starts.
    let inputs: [&Path; 3] = [src, &calib_file, &a.text];
    super::check_json(a.json.as_deref(), &inputs)?;
    if let Some(p) = &a.markdown {
        check_output(p, OutputKind::Markdown, &inputs, false)?;
        if a.json.as_ref() == Some(p) {
            anyhow::bail!("--json and --markdown name the same file {}", p.display());
        }
    }
    let text = super::read_text(&a.text, "--text")?;
    std::fs::create_dir_all(&a.work)
        .map_err(|e| anyhow::anyhow!("cannot create --work {}: {e}", a.work.display()))?;
    check_output(&q, OutputKind::AnyPrecModel, &inputs, true)?;
    check_output(&sens, OutputKind::Sensitivity, &inputs, true)?;
    let sens_args = CalibArgs {
        samples: a.sensitivity_samples,
        ..a.calibration.calib.clone()
    };
    sens_args.check(dpllm_format::ModelConfig::from_dir(src)?.max_position_embeddings)?;

    // What each stage is made from: the source's content, the calibration text's, the settings.
    eprintln!(
        "fingerprinting {} and {}",
        src.display(),
        calib_file.display()
    );
    let source = model_fingerprint(src)?;
    let calib_sha = sha256_file(&calib_file)?;
    let c = &a.calibration.calib;
    let sens_record = keyed(json!({
        "stage": "sensitivity", "source": source, "calib_sha256": calib_sha,
        "samples": a.sensitivity_samples, "seq_len": c.seq_len, "seed": c.seed,
    }));
    let seed_bits = QuantizeOptions::default().seed_bits;
    let model_record = keyed(
        json!({ "stage": "quantize", "source": source, "sensitivity": sens_record["key"], "seed_bits": seed_bits }),
    );
    let quantize = must_compute(&q, OutputKind::AnyPrecModel, &model_record, a.force)?;
    if quantize {
        if must_compute(&sens, OutputKind::Sensitivity, &sens_record, a.force)? {
            eprintln!("[1/3] sensitivities of {}", src.display());
            super::sensitivity::compute(
                &dpllm_engine::Device::Cpu,
                src,
                &sens_args,
                &calib_file,
                &sens,
                &sens_record,
            )?;
        }
        eprintln!("[2/3] quantizing into {}", q.display());
        let opts = QuantizeOptions {
            sensitivity: Some(sens.clone()),
            progress: true,
            overwrite: a.force,
            inputs: model_record.clone(),
            ..Default::default()
        };
        let r = quantize_model(src, &q, &opts)?;
        eprintln!("quantized {} linears in {:.1}s", r.linears, r.seconds);
    }
    let budget = a.calibration.budget;
    let bdir = plan::budget_dir(&q, budget);
    let (opts, data) = a.calibration.options_and_data(&q, &calib_file)?;
    let plans_record = keyed(json!({
        "stage": "calibrate", "model": model_record["key"], "calib_sha256": calib_sha,
        "samples": c.samples, "seq_len": c.seq_len, "seed": c.seed, "estimator_samples": a.calibration.estimator_samples,
        "options": plan_settings(&opts),
    }));
    if must_compute(&bdir, OutputKind::Plans, &plans_record, a.force)? {
        eprintln!(
            "[3/3] calibrating budget {budget} for targets {:?}",
            a.calibration.targets
        );
        let opts = CalibrateOptions {
            overwrite: a.force,
            inputs: plans_record,
            device: a.device,
            ..opts
        };
        let r = calibrate(&q, &data, &opts)?;
        eprintln!("calibrated in {:.1}s", r.seconds);
        super::calibrate::print_stages(&r);
    }
    let config = dpllm_format::ModelConfig::from_dir(&q)?;
    let tok = TextTokenizer::from_dir(&q, config.bos_token_id, &config.eos_token_ids)?;
    let ids = tok.encode(&text, true)?;
    let mut rows = Vec::new();
    let full = ServedModel::load(src, None, None)?;
    rows.push(Row {
        method: "full precision".into(),
        target: None,
        result: eval(&full, &ids, &a, RunPrecision::Highest)?,
    });
    drop(full);
    let uniform = ServedModel::load(&q, None, Some(a.calibration.max_bits))?;
    for b in a.calibration.min_bits..=a.calibration.max_bits {
        rows.push(Row {
            method: "uniform".into(),
            target: Some(b as f64),
            result: eval(&uniform, &ids, &a, RunPrecision::Uniform(b))?,
        });
    }
    drop(uniform);
    // One model loaded for the budget serves every plan of it: only the small tables change.
    let served = ServedModel::load(&q, Some(budget), None)?;
    for t in plan::available_targets(&bdir, PlanKind::Dynamic) {
        for (kind, name) in [(PlanKind::Static, "static"), (PlanKind::Dynamic, "dp-llm")] {
            if plan::plan_path(&bdir, kind, t).is_file() {
                let rp = served.plan(&PlanKey::Target { target: t, kind })?;
                rows.push(Row {
                    method: name.into(),
                    target: Some(t),
                    result: eval(&served, &ids, &a, RunPrecision::Plan(rp))?,
                });
            }
        }
    }
    let report = Report {
        model: src.display().to_string(),
        text: a.text.display().to_string(),
        budget,
        rows,
    };
    let table = markdown(&report);
    print!("{table}");
    if let Some(p) = &a.json {
        let mut extra = serde_json::Map::new();
        extra.insert("text_sha256".into(), sha256_hex(text.as_bytes()).into());
        extra.insert("calib_sha256".into(), calib_sha.clone().into());
        dpllm_eval::report::write_json_with(p, &report, extra)?;
    }
    if let Some(p) = &a.markdown {
        let file = format!("{table}{MARKDOWN_MARKER} {VERSION} -->\n");
        dpllm_format::write_output_file(p, OutputKind::Markdown, |f| f.write_all(file.as_bytes()))?;
    }
    Ok(())
}

/// The results as a Markdown table.
pub fn markdown(r: &Report) -> String {
    let mut s = format!(
        "Perplexity of {} on {} (memory budget {:.2} bits for the plans)\n\n",
        r.model, r.text, r.budget
    );
    s.push_str("| method | target / bits | effective bits | perplexity | estimator work |\n|---|---|---|---|---|\n");
    for row in &r.rows {
        s.push_str(&format!(
            "| {} | {} | {} | {:.4} | {} |\n",
            row.method,
            row.target.map_or("-".into(), |t| format!("{t:.2}")),
            row.result
                .effective_bits
                .map_or("16 (bf16)".into(), |b| format!("{b:.3}")),
            row.result.perplexity,
            row.result
                .estimator_overhead
                .map_or("-".into(), |o| format!("{:.2}%", 100.0 * o)),
        ));
    }
    s
}
