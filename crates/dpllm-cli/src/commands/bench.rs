//! `dpllm bench ...`.

use std::path::PathBuf;

use clap::Subcommand;
use dpllm_eval::bench_decode::{self, DecodeBenchConfig};

/// Benchmarks.
#[derive(Subcommand)]
pub enum BenchCommand {
    /// Decode speed (tokens/s) and the fraction of the measured memory bandwidth it reaches.
    Decode(DecodeArgs),
}

/// Arguments of `bench decode`.
#[derive(clap::Args)]
pub struct DecodeArgs {
    /// Model directory.
    pub model: PathBuf,
    #[command(flatten)]
    pub bits: super::BitsArg,
    /// Prompt length in tokens (synthetic ids).
    #[arg(long, default_value_t = 64)]
    pub prompt_tokens: usize,
    /// Decoded tokens to time.
    #[arg(long, default_value_t = 64)]
    pub tokens: usize,
    /// Size of each bandwidth-test buffer, MiB.
    #[arg(long, default_value_t = 512)]
    pub bandwidth_mib: usize,
    /// Write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// Run a benchmark.
pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Decode(a) => {
            if a.tokens == 0 {
                anyhow::bail!("--tokens must be at least 1");
            }
            let model = super::load_model(&a.model, a.bits)?;
            let cfg = DecodeBenchConfig {
                prompt_tokens: a.prompt_tokens,
                decode_tokens: a.tokens,
                warmup_tokens: 4,
                bandwidth_bytes: a.bandwidth_mib.max(1) << 20,
            };
            let r = bench_decode::run(&model, &cfg)?;
            print!("{}", r.table());
            if let Some(p) = &a.json {
                dpllm_eval::report::write_json(p, &r)?;
            }
            Ok(())
        }
    }
}
