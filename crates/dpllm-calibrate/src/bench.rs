//! `dpllm bench finetune`: the wall time of a precision fine-tuning step
//! (METHOD.md 2b) at shapes no file here holds (an 8B model), on random
//! any-precision weights. A step's cost is a fixed part (embedding, lm_head)
//! plus a part per block, so the model is built at two depths and the time
//! of the full depth extrapolated from the line through them.

use anyhow::{ensure, Result};
use dpllm_engine::model::synthetic::{synthetic_config, SyntheticWeights};
use dpllm_engine::{CpuBackend, Device, Model};
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::finetune::FinetuneOptions;
use crate::tuner::{LevelStore, Tuner};
use crate::weights::quantized_linears;

/// Settings of the fine-tuning benchmark.
#[derive(Debug, Clone)]
pub struct FinetuneBenchConfig {
    /// Shapes: a name `synthetic_config` knows (llama3-8b, smollm2-135m).
    pub model: String,
    /// The two depths built and timed (blocks).
    pub depths: (usize, usize),
    /// Where fine-tuning runs.
    pub device: Device,
    /// TF32 products on a GPU.
    pub tf32: bool,
    /// Timed steps per depth (after one untimed step).
    pub steps: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Highest precision of every linear (the levels held are 3..=max_bits).
    pub max_bits: u32,
    /// How the GPU holds the precisions.
    pub levels: LevelStore,
    /// Record the step once and replay it (a CUDA graph) where the backend can.
    pub record: bool,
    /// Targets fine-tuned at once (GPU lanes); the time is per step of one target.
    pub targets: usize,
}

/// One depth's measurement.
#[derive(Debug, Clone, Serialize)]
pub struct DepthTime {
    /// Blocks in the model.
    pub layers: usize,
    /// Mean wall time of a step, ms.
    pub ms_per_step: f64,
    /// GPU memory in use after the steps, GiB (None on the CPU).
    pub gpu_used_gib: Option<f64>,
}

/// What the benchmark measured.
#[derive(Debug, Clone, Serialize)]
pub struct FinetuneBenchResult {
    /// The shapes' name.
    pub model: String,
    /// Where it ran ("cpu", or the GPU): the JSON's `device`.
    pub backend: String,
    /// TF32 products.
    pub tf32: bool,
    /// Tokens per step.
    pub seq_len: usize,
    /// Levels held per linear: 3..=max_bits.
    pub max_bits: u32,
    /// How they were held (f32 copies or the planes).
    pub levels: LevelStore,
    /// Whether the timed steps replayed a recording (a CUDA graph).
    pub replayed: bool,
    /// Targets fine-tuned at once (on as many GPU lanes as fit): `ms_per_step`
    /// is the wall time of a step of all of them over their number.
    pub targets: usize,
    /// Lanes they ran on.
    pub lanes: usize,
    /// The measured depths.
    pub depths: Vec<DepthTime>,
    /// A block's share of a step, ms (the slope between the depths; at or
    /// below 0 the timings are noise and the extrapolation means nothing).
    pub ms_per_block: f64,
    /// Blocks of the real model.
    pub full_layers: usize,
    /// A step of the full model, ms (extrapolated from the depths).
    pub full_ms_per_step: f64,
    /// The paper's 5000 steps (1000 sequences, 5 epochs) for one target, minutes.
    pub paper_minutes_per_target: f64,
}

/// Time fine-tuning steps of `cfg.model`'s shapes at two depths.
pub fn bench_finetune(cfg: &FinetuneBenchConfig) -> Result<FinetuneBenchResult> {
    let (d1, d2) = cfg.depths;
    ensure!(
        d1 >= 1 && d2 > d1,
        "depths must be two block counts, the second larger"
    );
    ensure!(cfg.steps >= 1, "time at least one step");
    ensure!(
        (1..=8).contains(&cfg.targets),
        "--targets {} must be within 1..=8",
        cfg.targets
    );
    ensure!(cfg.seq_len >= 2, "a sequence needs at least 2 tokens");
    ensure!(
        (4..=8).contains(&cfg.max_bits),
        "--max-bits {} must be within 4..=8",
        cfg.max_bits
    );
    let full = synthetic_config(&cfg.model)?;
    let mut depths = Vec::new();
    let mut backend = String::new();
    let mut levels = cfg.levels;
    let mut replayed = true;
    let mut lanes = 1;
    for layers in [d1, d2] {
        let mut config = full.clone();
        config.num_layers = layers;
        let model = Model::synthetic(
            CpuBackend,
            &cfg.model,
            config,
            SyntheticWeights::AnyPrec {
                max_bits: cfg.max_bits,
            },
            7,
        )?;
        let n = model.config.linears().len();
        let w = quantized_linears(&model, 3, &vec![cfg.max_bits; n])?;
        let mut tuner = Tuner::open(cfg.device, &model, &w, cfg.tf32, cfg.levels)?;
        backend = tuner.device_name();
        levels = tuner.level_store();
        drop(model);
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let vocab = full.vocab_size as u32;
        let seqs: Vec<Vec<u32>> = (0..=cfg.steps)
            .map(|_| {
                (0..cfg.seq_len)
                    .map(|_| rng.random_range(0..vocab))
                    .collect()
            })
            .collect();
        let opts = FinetuneOptions {
            epochs: 1,
            record: cfg.record,
            ..Default::default()
        };
        // Targets between 3.5 bits and the highest precision.
        let span = (cfg.max_bits as f64 - 3.5) / cfg.targets as f64;
        let targets: Vec<(f64, Option<&[f64]>)> = (0..cfg.targets)
            .map(|k| (3.5 + span * k as f64, None))
            .collect();
        // One untimed step: kernels compiled, buffers allocated, the steps recorded.
        tuner.finetune_all(&w, &targets, &seqs[..1], &opts)?;
        let r = tuner.finetune_all(&w, &targets, &seqs[1..], &opts)?;
        replayed &= tuner.replays_steps();
        lanes = tuner.lanes();
        depths.push(DepthTime {
            layers,
            ms_per_step: 1e3 * r[0].seconds / (r[0].steps * cfg.targets) as f64,
            gpu_used_gib: tuner
                .gpu_memory_used()?
                .map(|b| b as f64 / (1u64 << 30) as f64),
        });
    }
    let (a, b) = (&depths[0], &depths[1]);
    let per_layer = (b.ms_per_step - a.ms_per_step) / (b.layers - a.layers) as f64;
    let full_ms = a.ms_per_step + per_layer * (full.num_layers as f64 - a.layers as f64);
    Ok(FinetuneBenchResult {
        model: cfg.model.clone(),
        backend,
        tf32: cfg.tf32,
        seq_len: cfg.seq_len,
        max_bits: cfg.max_bits,
        levels,
        replayed,
        targets: cfg.targets,
        lanes,
        depths,
        full_layers: full.num_layers,
        ms_per_block: per_layer,
        full_ms_per_step: full_ms,
        paper_minutes_per_target: full_ms * 5000.0 / 60e3,
    })
}
