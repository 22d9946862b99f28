//! Where precision fine-tuning (2b) and the estimator data (2c, 2d) are
//! computed: the CPU's gradient model, or one held on a GPU with every
//! linear's weights at each of its precisions (`--device cuda`), so a step
//! moves no weights between host and device.

use anyhow::Result;
use dpllm_engine::{Device, Model};
use dpllm_grad::{GradBackend, GradModel};

use crate::collect::{collect, LinearCalib};
use crate::finetune::{finetune_on, load_mixed, FinetuneOptions, FinetuneResult};
use crate::weights::{LinearWeights, WeightLevels};

/// The gradient model of calibration on the device a run asked for.
pub struct Tuner {
    on: On,
}

enum On {
    /// The weights at each precision are the `LinearWeights` themselves.
    Cpu(Box<GradModel>),
    #[cfg(feature = "cuda")]
    Gpu(Box<Gpu>),
}

#[cfg(feature = "cuda")]
struct Gpu {
    gm: GradModel<dpllm_grad::cuda::CudaGrad>,
    levels: crate::weights::LevelsOn<dpllm_engine::backend::cuda::cudarc::driver::CudaSlice<f32>>,
}

/// Settings of the estimator-data pass ([`collect`]).
#[derive(Debug, Clone, Copy)]
pub struct CollectOptions {
    /// Estimator inputs from the residual stream before the previous sub-block (METHOD.md 2f).
    pub async_estimation: bool,
    /// Sampled estimator inputs per linear, at most.
    pub max_samples: usize,
    /// Show a progress bar.
    pub progress: bool,
}

impl Tuner {
    /// Calibrate on `device`: `model`'s weights as f32 (on a GPU, with
    /// `weights`' precisions copied there now, and with `tf32` the matrix
    /// products on TF32 tensor cores).
    pub fn open(
        device: Device,
        model: &Model,
        weights: &[LinearWeights],
        tf32: bool,
    ) -> Result<Tuner> {
        device.check()?;
        let on = match device {
            Device::Cpu => {
                let _ = (weights, tf32);
                On::Cpu(Box::new(GradModel::from_model(model)))
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(n) => {
                let mut be = dpllm_grad::cuda::CudaGrad::open(n)?;
                if tf32 {
                    be = be.with_tf32()?;
                }
                let gm = GradModel::on(be, model, None)?;
                let levels = crate::weights::LevelsOn::upload(gm.backend(), weights)?;
                On::Gpu(Box::new(Gpu { gm, levels }))
            }
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => unreachable!("refused by Device::check"),
        };
        Ok(Tuner { on })
    }

    /// Where it computes: "cpu", or the GPU's description.
    pub fn device_name(&self) -> String {
        match &self.on {
            On::Cpu(gm) => gm.backend().name(),
            #[cfg(feature = "cuda")]
            On::Gpu(g) => g.gm.backend().name(),
        }
    }

    /// [`finetune_on`] for `target` on this tuner's device.
    pub fn finetune(
        &mut self,
        w: &[LinearWeights],
        target: f64,
        init: Option<&[f64]>,
        seqs: &[Vec<u32>],
        opts: &FinetuneOptions,
    ) -> Result<FinetuneResult> {
        match &mut self.on {
            On::Cpu(gm) => finetune_on(gm, w, w, target, init, seqs, opts),
            #[cfg(feature = "cuda")]
            On::Gpu(g) => finetune_on(&mut g.gm, w, &g.levels, target, init, seqs, opts),
        }
    }

    /// [`collect`] on this tuner's device, every linear at its highest precision m_l.
    pub fn collect(
        &mut self,
        w: &[LinearWeights],
        seqs: &[Vec<u32>],
        opts: CollectOptions,
    ) -> Result<Vec<LinearCalib>> {
        match &mut self.on {
            On::Cpu(gm) => collect_at_max(gm, w, w, seqs, opts),
            #[cfg(feature = "cuda")]
            On::Gpu(g) => collect_at_max(&mut g.gm, w, &g.levels, seqs, opts),
        }
    }
}

fn collect_at_max<G: GradBackend>(
    gm: &mut GradModel<G>,
    w: &[LinearWeights],
    levels: &(impl WeightLevels<G::Buf> + ?Sized),
    seqs: &[Vec<u32>],
    o: CollectOptions,
) -> Result<Vec<LinearCalib>> {
    let max: Vec<f64> = w.iter().map(|l| l.max_bits as f64).collect();
    load_mixed(gm, w, levels, &max)?;
    collect(
        gm,
        w,
        levels,
        seqs,
        o.async_estimation,
        o.max_samples,
        o.progress,
    )
}
