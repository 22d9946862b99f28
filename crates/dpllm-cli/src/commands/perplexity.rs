//! `dpllm perplexity MODEL --text FILE`.

use std::path::PathBuf;

use dpllm_eval::perplexity::perplexity;

/// Arguments of `perplexity`.
#[derive(clap::Args)]
pub struct Args {
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
    /// Also write the result as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// Tokenize the file, evaluate, print the result.
pub fn run(a: Args) -> anyhow::Result<()> {
    super::check_json(a.json.as_deref(), &[&a.model, &a.text])?;
    let text = super::read_text(&a.text, "--text")?;
    let (loaded, tok) = super::load(&a.model, &a.bits)?;
    let ids = tok.encode(&text, true)?;
    eprintln!("{} tokens from {}", ids.len(), a.text.display());
    let r = perplexity(&loaded.model, &ids, a.ctx, a.max_chunks, true, loaded.precision())?;
    let bits = r.effective_bits.map(|b| format!(", effective bits {b:.3}")).unwrap_or_default();
    let overhead = r.estimator_overhead.map(|o| format!(", estimator work {:.2}% of linear", 100.0 * o)).unwrap_or_default();
    println!(
        "perplexity {:.4}  (mean NLL {:.4} nats, {} chunks x {} tokens, {} predictions, {:.1} tok/s{bits}{overhead})",
        r.perplexity, r.mean_nll, r.chunks, r.ctx, r.predictions, r.tokens_per_sec
    );
    if let Some(p) = &a.json {
        dpllm_eval::report::write_json(p, &r)?;
    }
    Ok(())
}
