//! Where precision fine-tuning (2b) and the estimator data (2c, 2d) are
//! computed: the CPU's gradient model, or one held on a GPU with every
//! linear's weights at each of its precisions (`--device cuda`), so a step
//! moves no weights between host and device. On the GPU the precisions are
//! f32 copies where they fit ([`LevelStore`]), else read from the planes.

use anyhow::Result;
use dpllm_engine::{Device, Model};
use dpllm_grad::{GradBackend, GradModel};

use crate::collect::{collect, LinearCalib};
#[cfg(feature = "cuda")]
use crate::finetune::{finetune_lanes, Lane};
use crate::finetune::{finetune_on, FinetuneOptions, FinetuneResult};
#[cfg(feature = "cuda")]
use crate::step::Step;
use crate::step::{load_mixed, step_pairs};
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
    levels: GpuLevels,
    /// The fine-tuning step's buffers and recording, kept from target to
    /// target (made on the first, as the options say).
    step: Option<crate::step::Step<dpllm_grad::cuda::CudaGrad>>,
    /// More lanes (a stream, a copy of the model, a step each), made when
    /// several targets are fine-tuned at once.
    lanes: Vec<GpuLane>,
}

#[cfg(feature = "cuda")]
type GpuLane = (
    GradModel<dpllm_grad::cuda::CudaGrad>,
    crate::step::Step<dpllm_grad::cuda::CudaGrad>,
);

#[cfg(feature = "cuda")]
impl Gpu {
    /// Lanes for `targets` targets: as the options say, else as many as
    /// fit in a third of the free memory at twice the model's f32 size and
    /// 2 GiB of activations each, at most 8.
    fn lane_count(&self, targets: usize, opts: &FinetuneOptions) -> Result<usize> {
        let most = match opts.lanes {
            0 => {
                let (free, _) = self.gm.backend().device().memory()?;
                let per_lane = 8 * self.gm.values() + (2 << 30);
                1 + free / 3 / per_lane
            }
            n => n,
        };
        Ok(most.clamp(1, 8).min(targets.max(1)))
    }

    /// Lane 0's step, and the other lanes up to `count`.
    fn open_lanes(
        &mut self,
        count: usize,
        w: &[LinearWeights],
        opts: &FinetuneOptions,
    ) -> Result<()> {
        if self.step.is_none() {
            self.step = Some(Step::new(self.gm.backend(), w, opts.record)?);
        }
        while self.lanes.len() + 1 < count {
            let be = self.gm.backend();
            // The model's buffers (and the levels) complete before the copy,
            // and the copy complete before the model changes again.
            be.synchronize()?;
            let gm = self.gm.replicate(be.lane()?)?;
            gm.backend().synchronize()?;
            let step = Step::new(gm.backend(), w, opts.record)?;
            self.lanes.push((gm, step));
        }
        Ok(())
    }

    fn finetune_all(
        &mut self,
        w: &[LinearWeights],
        targets: &[(f64, Option<&[f64]>)],
        seqs: &[Vec<u32>],
        opts: &FinetuneOptions,
    ) -> Result<Vec<FinetuneResult>> {
        let count = self.lane_count(targets.len(), opts)?;
        self.open_lanes(count, w, opts)?;
        let Gpu {
            gm,
            levels,
            step,
            lanes,
        } = self;
        let mut all = vec![Lane {
            gm,
            step: step.as_mut().expect("opened above"),
        }];
        all.extend(lanes.iter_mut().map(|(gm, step)| Lane { gm, step }));
        let mut out = Vec::with_capacity(targets.len());
        for chunk in targets.chunks(count) {
            let lanes = &mut all[..chunk.len()];
            out.extend(match levels {
                GpuLevels::F32(l) => finetune_lanes(lanes, w, l, chunk, seqs, opts)?,
                GpuLevels::Planes(l) => finetune_lanes(lanes, w, l, chunk, seqs, opts)?,
            });
        }
        Ok(out)
    }
}

#[cfg(feature = "cuda")]
enum GpuLevels {
    F32(crate::weights::LevelsOn<dpllm_engine::backend::cuda::cudarc::driver::CudaSlice<f32>>),
    Planes(crate::weights::PlanesOn),
}

/// How a GPU tuner holds each linear's weights at its precisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LevelStore {
    /// f32 copies when they take at most a third of the free GPU memory, else the planes.
    #[default]
    Auto,
    /// An f32 copy of each precision ([`crate::weights::LevelsOn`]).
    F32,
    /// The bit-planes and LUTs, each precision pair read from them ([`crate::weights::PlanesOn`]).
    Planes,
}

impl LevelStore {
    /// Its name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            LevelStore::Auto => "auto",
            LevelStore::F32 => "f32",
            LevelStore::Planes => "planes",
        }
    }
}

impl std::str::FromStr for LevelStore {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(LevelStore::Auto),
            "f32" => Ok(LevelStore::F32),
            "planes" => Ok(LevelStore::Planes),
            _ => Err(format!("{s:?}: expected auto, f32 or planes")),
        }
    }
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
    /// `weights`' precisions copied there now as `store` says, and with `tf32`
    /// the matrix products on TF32 tensor cores).
    pub fn open(
        device: Device,
        model: &Model,
        weights: &[LinearWeights],
        tf32: bool,
        store: LevelStore,
    ) -> Result<Tuner> {
        device.check()?;
        let on = match device {
            Device::Cpu => {
                let _ = (weights, tf32, store);
                On::Cpu(Box::new(GradModel::from_model(model)))
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(n) => {
                use crate::weights::{f32_level_bytes, LevelsOn, PlanesOn};
                let mut be = dpllm_grad::cuda::CudaGrad::open(n)?;
                if tf32 {
                    be = be.with_tf32()?;
                }
                let gm = GradModel::on(be, model, None)?;
                let f32_fits = || -> Result<bool> {
                    let (free, _) = gm.backend().device().memory()?;
                    Ok(f32_level_bytes(weights) <= free / 3)
                };
                let levels = match store {
                    LevelStore::F32 => GpuLevels::F32(LevelsOn::upload(gm.backend(), weights)?),
                    LevelStore::Auto if f32_fits()? => {
                        GpuLevels::F32(LevelsOn::upload(gm.backend(), weights)?)
                    }
                    _ => GpuLevels::Planes(PlanesOn::upload(gm.backend(), weights)?),
                };
                On::Gpu(Box::new(Gpu {
                    gm,
                    levels,
                    step: None,
                    lanes: Vec::new(),
                }))
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

    /// GPU memory in use now (total − free bytes; another process's share
    /// included), or None on the CPU.
    pub fn gpu_memory_used(&self) -> Result<Option<usize>> {
        match &self.on {
            On::Cpu(_) => Ok(None),
            #[cfg(feature = "cuda")]
            On::Gpu(g) => {
                let (free, total) = g.gm.backend().device().memory()?;
                Ok(Some(total - free))
            }
        }
    }

    /// Whether fine-tuning steps replay a recording (a CUDA graph) now.
    pub fn replays_steps(&self) -> bool {
        match &self.on {
            On::Cpu(_) => false,
            #[cfg(feature = "cuda")]
            On::Gpu(g) => g.step.as_ref().is_some_and(|s| s.replays()),
        }
    }

    /// How the precisions are held: f32 copies or the planes (on the CPU, f32).
    pub fn level_store(&self) -> LevelStore {
        match &self.on {
            On::Cpu(_) => LevelStore::F32,
            #[cfg(feature = "cuda")]
            On::Gpu(g) => match g.levels {
                GpuLevels::F32(_) => LevelStore::F32,
                GpuLevels::Planes(_) => LevelStore::Planes,
            },
        }
    }

    /// [`finetune_on`] for every target (and its start, as `init`), on a
    /// GPU several at once ([`FinetuneOptions::lanes`]); results in target order.
    pub fn finetune_all(
        &mut self,
        w: &[LinearWeights],
        targets: &[(f64, Option<&[f64]>)],
        seqs: &[Vec<u32>],
        opts: &FinetuneOptions,
    ) -> Result<Vec<FinetuneResult>> {
        match &mut self.on {
            On::Cpu(gm) => (targets.iter())
                .map(|&(t, init)| finetune_on(gm, w, w, t, init, seqs, opts))
                .collect(),
            #[cfg(feature = "cuda")]
            On::Gpu(g) => g.finetune_all(w, targets, seqs, opts),
        }
    }

    /// Targets fine-tuned at once so far (1 on the CPU).
    pub fn lanes(&self) -> usize {
        match &self.on {
            On::Cpu(_) => 1,
            #[cfg(feature = "cuda")]
            On::Gpu(g) => 1 + g.lanes.len(),
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
            On::Gpu(g) => match &g.levels {
                GpuLevels::F32(l) => collect_at_max(&mut g.gm, w, l, seqs, opts),
                GpuLevels::Planes(l) => collect_at_max(&mut g.gm, w, l, seqs, opts),
            },
        }
    }
}

fn collect_at_max<G: GradBackend>(
    gm: &mut GradModel<G>,
    w: &[LinearWeights],
    levels: &(impl WeightLevels<G> + ?Sized),
    seqs: &[Vec<u32>],
    o: CollectOptions,
) -> Result<Vec<LinearCalib>> {
    let max: Vec<f64> = w.iter().map(|l| l.max_bits as f64).collect();
    let pairs = gm.backend().pairs(&step_pairs(w, &max))?;
    load_mixed(gm, w, levels, &pairs)?;
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
