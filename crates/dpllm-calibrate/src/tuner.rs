//! Where precision fine-tuning (2b) runs: the CPU's gradient model, or one
//! held on a GPU with every linear's weights at each of its precisions
//! (`--device cuda`), so a step moves no weights between host and device.

use anyhow::Result;
use dpllm_engine::{Device, Model};
use dpllm_grad::GradModel;

use crate::finetune::{finetune, FinetuneOptions, FinetuneResult};
use crate::weights::LinearWeights;

/// Precision fine-tuning's model on the device a run asked for.
pub struct Tuner {
    #[cfg(feature = "cuda")]
    gpu: Option<Gpu>,
}

#[cfg(feature = "cuda")]
struct Gpu {
    gm: GradModel<dpllm_grad::cuda::CudaGrad>,
    levels: crate::weights::LevelsOn<dpllm_engine::backend::cuda::cudarc::driver::CudaSlice<f32>>,
}

impl Tuner {
    /// Fine-tune on `device`: on a GPU, `model`'s f32 weights and `weights`'
    /// precisions are copied there now.
    pub fn open(device: Device, model: &Model, weights: &[LinearWeights]) -> Result<Tuner> {
        device.check()?;
        match device {
            Device::Cpu => Ok(Tuner {
                #[cfg(feature = "cuda")]
                gpu: None,
            }),
            #[cfg(feature = "cuda")]
            Device::Cuda(n) => {
                let gm = GradModel::on(dpllm_grad::cuda::CudaGrad::open(n)?, model, None)?;
                let levels = crate::weights::LevelsOn::upload(gm.backend(), weights)?;
                Ok(Tuner {
                    gpu: Some(Gpu { gm, levels }),
                })
            }
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => {
                let _ = (model, weights);
                unreachable!("refused by Device::check")
            }
        }
    }

    /// [`finetune`] for `target` here, or on `cpu` when this tuner is the CPU's.
    pub fn finetune(
        &mut self,
        cpu: &mut GradModel,
        w: &[LinearWeights],
        target: f64,
        init: Option<&[f64]>,
        seqs: &[Vec<u32>],
        opts: &FinetuneOptions,
    ) -> Result<FinetuneResult> {
        #[cfg(feature = "cuda")]
        if let Some(g) = &mut self.gpu {
            return crate::finetune::finetune_on(&mut g.gm, w, &g.levels, target, init, seqs, opts);
        }
        finetune(cpu, w, target, init, seqs, opts)
    }
}
