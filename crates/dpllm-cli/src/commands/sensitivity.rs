//! `dpllm sensitivity MODEL --calib FILE`: the diagonal Fisher of every quantized weight.

use std::path::{Path, PathBuf};

use dpllm_engine::Device;
use dpllm_format::{check_output, OutputKind};
use dpllm_quantize::sensitivity::{accumulate_sensitivities, save, Sensitivities};

use super::calib_text::CalibArgs;

/// Arguments of `sensitivity`.
#[derive(clap::Args)]
pub struct Args {
    /// Where the forward and backward passes run: cpu, or cuda / cuda:N (the
    /// model's f32 weights, activations and gradient sums stay on the GPU).
    #[arg(long, default_value = "cpu")]
    pub device: Device,
    /// Full-precision model directory (Hugging Face layout).
    pub model: PathBuf,
    #[command(flatten)]
    pub calib: CalibArgs,
    /// Output safetensors file (default: `<model name>.sensitivity.safetensors` in the current directory).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Compute the sensitivities of `model` on the calibration windows on `device`
/// and write them to `out`, recording `inputs` (what produced them) in its metadata.
pub fn compute(
    device: &Device,
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
    let grad = GradDevice::open(device)?;
    let (loaded, tok) = super::load(dpllm_engine::CpuBackend, model, &super::BitsArg::default())?;
    let m = loaded.model();
    let seqs = calib.sequences(file, &tok, m.config.max_position_embeddings)?;
    let t = std::time::Instant::now();
    let s = grad.accumulate(m, &seqs)?;
    save(&s, out, inputs)?;
    eprintln!(
        "sensitivities of {} linears written to {} in {:.1}s",
        s.tensors().count(),
        out.display(),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Where the gradient passes run, opened before the model loads (so a
/// missing GPU fails at once).
enum GradDevice {
    Cpu,
    #[cfg(feature = "cuda")]
    Cuda(Box<dpllm_grad::cuda::CudaGrad>),
}

impl GradDevice {
    fn open(device: &Device) -> anyhow::Result<GradDevice> {
        device.check()?;
        Ok(match *device {
            Device::Cpu => GradDevice::Cpu,
            #[cfg(feature = "cuda")]
            Device::Cuda(n) => GradDevice::Cuda(Box::new(dpllm_grad::cuda::CudaGrad::open(n)?)),
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => unreachable!("refused by Device::check"),
        })
    }

    /// Σ of the squared gradients over `seqs`.
    fn accumulate(
        self,
        m: &dpllm_engine::Model,
        seqs: &[Vec<u32>],
    ) -> anyhow::Result<Sensitivities> {
        match self {
            GradDevice::Cpu => accumulate_sensitivities(m, seqs, true),
            #[cfg(feature = "cuda")]
            GradDevice::Cuda(g) => {
                use dpllm_grad::GradBackend;
                eprintln!("forward and backward passes on {}", g.name());
                dpllm_quantize::sensitivity::accumulate_sensitivities_on(*g, m, seqs, true)
            }
        }
    }
}

/// Run the command.
pub fn run(a: Args) -> anyhow::Result<()> {
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
        &a.device,
        dir,
        &a.calib,
        &file,
        &out,
        &serde_json::json!({ "model": dir.display().to_string() }),
    )
}
