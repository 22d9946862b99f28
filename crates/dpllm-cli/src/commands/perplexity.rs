//! `dpllm perplexity MODEL --text FILE`.

use std::path::PathBuf;

use dpllm_engine::{Backend, RunPrecision, ServedModel};
use dpllm_eval::perplexity::perplexity_vs;

/// Arguments of `perplexity`.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub device: super::DeviceArg,
    /// Model directory.
    pub model: PathBuf,
    #[command(flatten)]
    pub bits: super::BitsArg,
    /// UTF-8 text file to evaluate (e.g. ../shared/data/docs/test.txt).
    #[arg(long)]
    pub text: PathBuf,
    /// Tokens per chunk (non-overlapping; the tail shorter than one chunk is dropped).
    #[arg(long, default_value_t = 2048)]
    pub ctx: usize,
    /// Evaluate at most this many chunks.
    #[arg(long)]
    pub max_chunks: Option<usize>,
    /// Also run this full-precision reference model (same tokenizer) on the same
    /// chunks and report the KL divergence of this model's predictions from it
    /// (mean, 99th percentile, max) and their top-1 agreement.
    #[arg(long)]
    pub compare_to: Option<PathBuf>,
    /// Also write the result as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// Tokenize the file, evaluate, print the result.
pub fn run(a: Args) -> anyhow::Result<()> {
    super::on_backend!(a.device.clone(), run_on(a))
}

/// [`run`] on `backend` (the reference model too).
fn run_on<B: Backend>(backend: B, a: Args) -> anyhow::Result<()> {
    let mut inputs = vec![a.model.as_path(), a.text.as_path()];
    inputs.extend(a.compare_to.as_deref());
    super::check_json(a.json.as_deref(), &inputs)?;
    if let Some(r) = &a.compare_to {
        crate::model_dir(r)?;
    }
    let text = super::read_text(&a.text, "--text")?;
    let (loaded, tok) = super::load(backend.clone(), &a.model, &a.bits)?;
    let ids = tok.encode(&text, true)?;
    eprintln!("{} tokens from {}", ids.len(), a.text.display());
    let reference = a
        .compare_to
        .as_deref()
        .map(|r| ServedModel::load_on(backend.clone(), r, None, None))
        .transpose()?;
    let mut session = loaded.session(a.ctx)?;
    let mut ref_session = reference
        .map(|r| r.session(RunPrecision::Highest, a.ctx))
        .transpose()?;
    let r = perplexity_vs(
        &mut session,
        ref_session.as_mut(),
        &ids,
        a.ctx,
        a.max_chunks,
        true,
    )?;
    let bits = r
        .effective_bits
        .map(|b| format!(", effective bits {b:.3}"))
        .unwrap_or_default();
    let overhead = r
        .estimator_overhead
        .map(|o| format!(", estimator work {:.2}% of linear", 100.0 * o))
        .unwrap_or_default();
    println!(
        "perplexity {:.4}  (mean NLL {:.4} nats, {} chunks x {} tokens, {} predictions, {:.1} tok/s{bits}{overhead})",
        r.perplexity, r.mean_nll, r.chunks, r.ctx, r.predictions, r.tokens_per_sec
    );
    if let Some(f) = &r.fidelity {
        println!(
            "vs {}: mean KL {:.6} nats, p99 {:.6}, max {:.4}, top-1 agreement {:.2}% (reference perplexity {:.4})",
            f.reference,
            f.mean_kl,
            f.p99_kl,
            f.max_kl,
            100.0 * f.top1_agreement,
            f.reference_perplexity
        );
    }
    print_selection(&r.selection);
    if let Some(p) = &a.json {
        let mut extra = serde_json::Map::new();
        extra.insert("model".into(), a.model.display().to_string().into());
        extra.insert("backend".into(), loaded.model().backend.name().into());
        extra.insert("text".into(), a.text.display().to_string().into());
        extra.insert(
            "text_sha256".into(),
            dpllm_format::fingerprint::sha256_hex(text.as_bytes()).into(),
        );
        // What ran, so that reports can put results of one method on one line.
        let (method, target) = match (loaded.plan(), loaded.model().bits_range()) {
            (Some(p), _) => (
                if p.plan.kind == dpllm_format::plan::PlanKind::Static {
                    "static"
                } else {
                    a.bits.select.method()
                },
                Some(p.plan.target_bits),
            ),
            (None, Some((_, max))) => ("uniform", Some(a.bits.bits.unwrap_or(max) as f64)),
            (None, None) => ("full precision", None),
        };
        extra.insert("method".into(), method.into());
        extra.insert("target".into(), target.into());
        extra.insert(
            "budget".into(),
            loaded.plan().map(|p| p.plan.budget_bits).into(),
        );
        dpllm_eval::report::write_json_with(p, &r, extra)?;
    }
    Ok(())
}

/// The estimators against the true error (oracle runs): a line per linear kind.
fn print_selection(sel: &[dpllm_eval::perplexity::LinearSelection]) {
    if sel.is_empty() {
        return;
    }
    let mut kinds: Vec<(String, Vec<&dpllm_eval::perplexity::LinearSelection>)> = Vec::new();
    for s in sel {
        let kind = s.name.rsplit('.').next().unwrap_or(&s.name).to_string();
        match kinds.iter_mut().find(|(k, _)| *k == kind) {
            Some((_, v)) => v.push(s),
            None => kinds.push((kind, vec![s])),
        }
    }
    println!(
        "estimator vs true error on these tokens (mean over the selecting linears of each kind):"
    );
    println!(
        "  {:<10} {:>7} {:>12} {:>10} {:>14} {:>10}",
        "linear", "count", "correlation", "agreement", "estimate high", "true high"
    );
    for (kind, v) in kinds {
        let mean = |f: &dyn Fn(&dpllm_eval::perplexity::LinearSelection) -> Option<f64>| {
            let xs: Vec<f64> = v.iter().filter_map(|s| f(s)).collect();
            if xs.is_empty() {
                f64::NAN
            } else {
                xs.iter().sum::<f64>() / xs.len() as f64
            }
        };
        println!(
            "  {:<10} {:>7} {:>12.3} {:>9.1}% {:>13.1}% {:>9.1}%",
            kind,
            v.len(),
            mean(&|s| s.correlation),
            100.0 * mean(&|s| s.agreement),
            100.0 * mean(&|s| Some(s.estimate_high)),
            100.0 * mean(&|s| Some(s.true_high))
        );
    }
}
