//! `dpllm quantize MODEL --out DIR`.

use std::path::PathBuf;

use dpllm_quantize::model_quant::{quantize_model, QuantizeOptions};

/// Arguments of `quantize`.
#[derive(clap::Args)]
pub struct Args {
    /// Source model directory (Hugging Face layout).
    pub model: PathBuf,
    /// Output directory for the any-precision model (created atomically).
    #[arg(long)]
    pub out: PathBuf,
    /// Sensitivity file from `dpllm sensitivity` (default: uniform weights, i.e. plain k-means).
    #[arg(long)]
    pub sensitivity: Option<PathBuf>,
    /// Seed precision of the k-means step; upscaling goes from there to 8 bits.
    #[arg(long, default_value_t = 3)]
    pub seed_bits: u32,
    /// Replace OUT if it exists.
    #[arg(long)]
    pub force: bool,
}

/// Quantize and print a per-precision error summary.
pub fn run(a: Args) -> anyhow::Result<()> {
    crate::model_dir(&a.model)?;
    let opts = QuantizeOptions { seed_bits: a.seed_bits, sensitivity: a.sensitivity.clone(), progress: true, overwrite: a.force };
    let r = quantize_model(&a.model, &a.out, &opts)?;
    println!(
        "quantized {} linears ({:.2} M params) in {:.1}s -> {} ({:.2} MB)",
        r.linears,
        r.params as f64 / 1e6,
        r.seconds,
        a.out.display(),
        r.bytes as f64 / 1e6
    );
    let nb = r.errors.first().map_or(0, |e| e.1.len());
    let mut line = String::from("weighted squared error by bits:");
    for i in 0..nb {
        let total: f64 = r.errors.iter().map(|e| e.1[i]).sum();
        line.push_str(&format!("  {}b {:.3e}", a.seed_bits + i as u32, total));
    }
    println!("{line}");
    Ok(())
}
