//! `dpllm quantize MODEL --out DIR [--sensitivity FILE | --calib FILE]`.

use std::path::PathBuf;

use dpllm_quantize::model_quant::{quantize_model, QuantizeOptions};

use super::calib_text::CalibArgs;

/// Arguments of `quantize`.
#[derive(clap::Args)]
pub struct Args {
    /// Source model directory (Hugging Face layout).
    pub model: PathBuf,
    /// Output directory for the any-precision model (written to a temporary
    /// directory and renamed at the end: a failed run leaves nothing behind).
    #[arg(long)]
    pub out: PathBuf,
    /// Sensitivity file from `dpllm sensitivity`. Without it and without
    /// `--calib`, every weight counts the same (plain k-means).
    #[arg(long, conflicts_with = "calib")]
    pub sensitivity: Option<PathBuf>,
    /// Compute the sensitivities from this calibration text first (see `dpllm sensitivity`).
    #[command(flatten)]
    pub calib: CalibArgs,
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
    // Sensitivities computed here live in a temporary file beside OUT, removed on exit.
    let mut _tmp = None;
    let sensitivity = match (&a.sensitivity, &a.calib.calib) {
        (Some(p), _) => Some(p.clone()),
        (None, Some(file)) => {
            let parent = a.out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
            let t = tempfile::Builder::new()
                .prefix(".dpllm-sensitivity-")
                .suffix(".safetensors")
                .tempfile_in(parent)
                .map_err(|e| anyhow::anyhow!("cannot create a temporary file in {}: {e}", parent.display()))?;
            super::sensitivity::compute(&a.model, &a.calib, file, t.path())?;
            let p = t.path().to_path_buf();
            _tmp = Some(t);
            Some(p)
        }
        (None, None) => None,
    };
    let opts = QuantizeOptions { seed_bits: a.seed_bits, sensitivity, progress: true, overwrite: a.force };
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
