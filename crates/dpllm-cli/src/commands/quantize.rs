//! `dpllm quantize MODEL --out DIR [--sensitivity FILE | --calib FILE]`.

use std::path::PathBuf;

use dpllm_format::{check_output, OutputKind, StagingDir};
use dpllm_quantize::model_quant::{check_source, quantize_into, QuantizeOptions};

use super::calib_text::CalibArgs;

/// Arguments of `quantize`.
#[derive(clap::Args)]
pub struct Args {
    /// Where the sensitivities of `--calib` are computed: cpu, or cuda /
    /// cuda:N. The quantization itself runs on the CPU.
    #[arg(long, default_value = "cpu")]
    pub device: dpllm_engine::Device,
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
    /// Replace OUT if it exists and is a model dpllm wrote (never anything else).
    #[arg(long)]
    pub force: bool,
}

/// Quantize and print a per-precision error summary.
pub fn run(a: Args) -> anyhow::Result<()> {
    a.device.check()?;
    if a.device != dpllm_engine::Device::Cpu && a.calib.calib.is_none() {
        anyhow::bail!(
            "--device {} computes the sensitivities of --calib on the GPU; without --calib \
             quantize runs on the CPU only: run with --device cpu",
            a.device
        );
    }
    crate::model_dir(&a.model)?;
    // Outputs first: OUT is never an input and is replaced only when dpllm wrote it (and --force).
    let mut inputs: Vec<&std::path::Path> = vec![&a.model];
    inputs.extend(a.sensitivity.as_deref());
    inputs.extend(a.calib.calib.as_deref());
    check_output(&a.out, OutputKind::AnyPrecModel, &inputs, a.force)?;
    let opts = QuantizeOptions {
        seed_bits: a.seed_bits,
        progress: true,
        overwrite: a.force,
        ..Default::default()
    };
    // The source is checked before the sensitivities are computed.
    let checked = check_source(&a.model, &opts)?;
    let mut staging = StagingDir::new(&a.out, OutputKind::AnyPrecModel, a.force)?;
    // Sensitivities computed here live in the staging directory's scratch space:
    // every cleanup (error, signal, the next run after a kill) removes them.
    let (sensitivity, origin) = match (&a.sensitivity, &a.calib.calib) {
        (Some(p), _) => (Some(p.clone()), None),
        (None, Some(file)) => {
            let p = staging.scratch()?.join("sensitivity.safetensors");
            super::sensitivity::compute(
                &a.device,
                &a.model,
                &a.calib,
                file,
                &p,
                &serde_json::Value::Null,
            )?;
            (
                Some(p),
                Some(format!(
                    "computed from {} ({} x {} tokens, seed {})",
                    file.display(),
                    a.calib.samples,
                    a.calib.seq_len,
                    a.calib.seed
                )),
            )
        }
        (None, None) => (None, None),
    };
    let opts = QuantizeOptions {
        sensitivity,
        sensitivity_source: origin,
        ..opts
    };
    let r = quantize_into(&checked, &staging, &opts)?;
    staging.set_inputs(
        serde_json::json!({ "source": a.model.display().to_string(), "seed_bits": a.seed_bits }),
    );
    staging.publish()?;
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
