//! `dpllm`: quantize, run and measure Hugging Face causal LMs on CPU.

mod commands;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// dpllm: an any-precision LLM inference engine.
#[derive(Parser)]
#[command(name = "dpllm", version, about, long_about = None)]
struct Cli {
    /// Worker threads (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print a model's architecture, parameter count, tensor dtypes and memory.
    Inspect(commands::inspect::Args),
    /// Generate text from a prompt, streaming tokens to stdout.
    Generate(commands::generate::Args),
    /// Sensitivity of every quantized weight (squared LM-loss gradients) on calibration text.
    Sensitivity(commands::sensitivity::Args),
    /// Quantize a checkpoint into an any-precision model (3..8 bits in one file).
    Quantize(commands::quantize::Args),
    /// DP-LLM: calibrate precision plans for a memory budget and target precisions.
    Calibrate(commands::calibrate::Args),
    /// The whole pipeline on one model (sensitivity, quantize, calibrate), then
    /// perplexity and effective bits of every plan against static and uniform baselines.
    Pipeline(commands::pipeline::Args),
    /// Perplexity of a text file over non-overlapping chunks.
    Perplexity(commands::perplexity::Args),
    /// Benchmarks (print a table with units, optionally write JSON).
    #[command(subcommand)]
    Bench(commands::bench::BenchCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("DPLLM_LOG"))
        .with_writer(std::io::stderr)
        .init();
    if let Some(t) = cli.threads {
        if t == 0 {
            eprintln!("error: --threads must be at least 1");
            return ExitCode::from(2);
        }
        if let Err(e) = rayon::ThreadPoolBuilder::new().num_threads(t).build_global() {
            eprintln!("error: cannot set up {t} threads: {e}");
            return ExitCode::FAILURE;
        }
    }
    let result = match cli.command {
        Command::Inspect(a) => commands::inspect::run(a),
        Command::Generate(a) => commands::generate::run(a),
        Command::Perplexity(a) => commands::perplexity::run(a),
        Command::Quantize(a) => commands::quantize::run(a),
        Command::Sensitivity(a) => commands::sensitivity::run(a),
        Command::Calibrate(a) => commands::calibrate::run(a),
        Command::Pipeline(a) => commands::pipeline::run(a),
        Command::Bench(b) => commands::bench::run(b),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A model directory argument, checked to exist.
pub(crate) fn model_dir(p: &PathBuf) -> anyhow::Result<&PathBuf> {
    if !p.is_dir() {
        anyhow::bail!("model directory {} not found", p.display());
    }
    Ok(p)
}
