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
    /// A Markdown report with SVG plots from JSON results and plan files.
    Report(commands::report::Args),
    /// An OpenAI-compatible HTTP server whose precision each request chooses
    /// (DP-LLM target, uniform bits or a latency budget), with a chat page at /.
    Serve(commands::serve::Args),
    /// Benchmarks (print a table with units, optionally write JSON).
    #[command(subcommand)]
    Bench(commands::bench::BenchCommand),
}

/// Most worker threads per core `--threads` may ask for: more only thrashes (and
/// thousands of spinning workers make every parallel step crawl).
const MAX_THREADS_PER_CORE: usize = 4;

/// On SIGINT, SIGTERM or SIGHUP: remove this process's temporary files and
/// staging directories, then exit with the conventional 128 + signal.
#[cfg(unix)]
fn install_signal_cleanup() -> std::io::Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])?;
    std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            dpllm_format::atomic::remove_pending_then(|| {
                eprintln!(
                    "\ninterrupted (signal {sig}): temporary files removed, nothing was published"
                );
                std::process::exit(128 + sig)
            });
        }
    });
    Ok(())
}

#[cfg(not(unix))]
fn install_signal_cleanup() -> std::io::Result<()> {
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("DPLLM_LOG"))
        .with_writer(std::io::stderr)
        .init();
    // The server writes no files and stops gracefully on SIGINT/SIGTERM itself.
    if !matches!(cli.command, Command::Serve(_)) {
        if let Err(e) = install_signal_cleanup() {
            eprintln!("error: cannot install the signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = cli.threads.unwrap_or(cores);
    let max = MAX_THREADS_PER_CORE * cores;
    if threads == 0 || threads > max {
        eprintln!("error: --threads {threads} is out of range 1..={max} ({MAX_THREADS_PER_CORE} per core on this machine's {cores} cores)");
        return ExitCode::from(2);
    }
    // The main thread is worker 0: a parallel loop it starts runs on it at once
    // and the other workers steal from it, instead of handing every loop to the
    // pool and sleeping until it ends (two thread switches per loop, ~15 % of a
    // decode step at a few hundred loops per token).
    if let Err(e) = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .use_current_thread()
        .build_global()
    {
        eprintln!("error: cannot set up {threads} threads: {e}");
        return ExitCode::FAILURE;
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
        Command::Report(a) => commands::report::run(a),
        Command::Serve(a) => commands::serve::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A model argument, checked to be a directory or a GGUF file.
pub(crate) fn model_dir(p: &PathBuf) -> anyhow::Result<&PathBuf> {
    match std::fs::metadata(p) {
        Ok(m) if m.is_dir() => Ok(p),
        Ok(_) if dpllm_format::gguf::is_gguf(p) => Ok(p),
        Ok(_) => anyhow::bail!("{} is a file, not a model directory or a GGUF file (give the directory that holds config.json)", p.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => anyhow::bail!("model directory {} not found", p.display()),
        Err(e) => anyhow::bail!("cannot read model directory {}: {e}", p.display()),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// clap's own consistency checks (unique argument and group ids, valid
    /// conflicts) over every subcommand. They run only in debug builds and only
    /// for the subcommand parsed, so a release-only test run misses them.
    #[test]
    fn command_line_definition_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
