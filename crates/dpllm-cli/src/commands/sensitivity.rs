//! `dpllm sensitivity MODEL --calib FILE`: the diagonal Fisher of every quantized weight.

use std::path::{Path, PathBuf};

use dpllm_format::{check_output, OutputKind};
use dpllm_quantize::sensitivity::{accumulate_sensitivities, save};

use super::calib_text::CalibArgs;

/// Arguments of `sensitivity`.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub device: super::DeviceArg,
    /// Full-precision model directory (Hugging Face layout).
    pub model: PathBuf,
    #[command(flatten)]
    pub calib: CalibArgs,
    /// Output safetensors file (default: `<model name>.sensitivity.safetensors` in the current directory).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Compute the sensitivities of `model` on the calibration windows and write them
/// to `out`, recording `inputs` (what produced them) in its metadata.
pub fn compute(
    model: &Path,
    calib: &CalibArgs,
    file: &Path,
    out: &Path,
    inputs: &serde_json::Value,
) -> anyhow::Result<()> {
    // Checked before anything loads (a quantized model is recognised by its weights file).
    if dpllm_format::anyprec::is_anyprec_dir(model) {
        anyhow::bail!(
            "{} is already quantized; sensitivities come from the full-precision model",
            model.display()
        );
    }
    calib.check(dpllm_format::ModelConfig::from_dir(model)?.max_position_embeddings)?;
    let (loaded, tok) = super::load(dpllm_engine::CpuBackend, model, &super::BitsArg::default())?;
    let m = loaded.model();
    let seqs = calib.sequences(file, &tok, m.config.max_position_embeddings)?;
    let t = std::time::Instant::now();
    let s = accumulate_sensitivities(m, &seqs, true)?;
    save(&s, out, inputs)?;
    eprintln!(
        "sensitivities of {} linears written to {} in {:.1}s",
        s.tensors().count(),
        out.display(),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Run the command.
pub fn run(a: Args) -> anyhow::Result<()> {
    a.device.require_cpu("sensitivity")?;
    let dir = crate::model_dir(&a.model)?;
    let file = a.calib.required_file()?;
    let out = a.out.clone().unwrap_or_else(|| {
        let name = dir
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
        PathBuf::from(format!(
            "{}.sensitivity.safetensors",
            name.unwrap_or_else(|| "model".into())
        ))
    });
    check_output(&out, OutputKind::Sensitivity, &[dir, &file], false)?;
    compute(
        dir,
        &a.calib,
        &file,
        &out,
        &serde_json::json!({ "model": dir.display().to_string() }),
    )
}
