//! `dpllm bench finetune --synthetic NAME`: the wall time of a precision
//! fine-tuning step on random any-precision weights of a known model's
//! shapes, measured at two depths and extrapolated to the full model and the
//! paper's 5000 steps.

use std::path::PathBuf;

use dpllm_calibrate::bench::{bench_finetune, FinetuneBenchConfig, FinetuneBenchResult};

/// Arguments of `bench finetune`.
#[derive(clap::Args)]
pub struct Args {
    /// Where fine-tuning runs: cpu, or cuda / cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: dpllm_engine::Device,
    /// The shapes: llama3-8b or smollm2-135m (random weights, built on the host).
    #[arg(long, default_value = "smollm2-135m")]
    pub synthetic: String,
    /// The two depths (blocks) built and timed, e.g. 1,2: the step of the full
    /// depth is extrapolated from the line through them.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    pub depths: Vec<usize>,
    /// Timed steps per depth (after one untimed step).
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Tokens per step (the paper: 512).
    #[arg(long, default_value_t = 512)]
    pub seq_len: usize,
    /// Highest precision of every linear: fine-tuning holds 3..=B bits.
    #[arg(long, default_value_t = 6)]
    pub max_bits: u32,
    /// With --device cuda: matrix products on TF32 tensor cores.
    #[arg(long)]
    pub tf32: bool,
    /// With --device cuda, how the precisions are held: f32 (a copy of each),
    /// planes (the bit-planes, each pair read from them; what an 8B model
    /// needs) or auto (f32 when it takes at most a third of the free memory).
    #[arg(long, default_value = "auto")]
    pub levels: dpllm_calibrate::tuner::LevelStore,
    /// With --device cuda: queue each step's ops one by one instead of
    /// replaying the step recorded as a CUDA graph (to compare).
    #[arg(long)]
    pub no_graph: bool,
    /// Targets fine-tuned at once (1..=8; on a GPU, on as many lanes as
    /// fit): the time shown is per step of one target.
    #[arg(long, default_value_t = 1)]
    pub targets: usize,
    /// Write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// Run the benchmark and print its table.
pub fn run(a: Args) -> anyhow::Result<()> {
    super::check_json(a.json.as_deref(), &[])?;
    a.device.check()?;
    let &[d1, d2] = a.depths.as_slice() else {
        anyhow::bail!("--depths takes two block counts, e.g. 1,2");
    };
    if a.device == dpllm_engine::Device::Cpu {
        if a.tf32 {
            anyhow::bail!("--tf32 is a GPU setting: add --device cuda");
        }
        if a.levels == dpllm_calibrate::tuner::LevelStore::Planes {
            anyhow::bail!(
                "--levels planes is a GPU setting (the CPU holds f32 copies): add --device cuda"
            );
        }
    }
    let cfg = FinetuneBenchConfig {
        model: a.synthetic,
        depths: (d1, d2),
        device: a.device,
        tf32: a.tf32,
        steps: a.steps,
        seq_len: a.seq_len,
        max_bits: a.max_bits,
        levels: a.levels,
        record: !a.no_graph,
        targets: a.targets,
    };
    let r = bench_finetune(&cfg)?;
    super::bench::publish(&table(&r), a.json.as_deref(), &r)
}

fn table(r: &FinetuneBenchResult) -> String {
    let mut s =
        format!(
        "fine-tuning step, {} shapes, {} tokens, levels 3..={} bits as {}, {}{}{}\n{:>8} {:>12}\n",
        r.model,
        r.seq_len,
        r.max_bits,
        r.levels.name(),
        r.backend,
        if r.tf32 { ", TF32" } else { "" },
        if r.replayed { ", replayed as a CUDA graph" } else { "" },
        "layers",
        "ms/step"
    );
    if r.targets > 1 {
        s += &format!(
            "({} targets at once on {} lanes: time per step of one target)\n",
            r.targets, r.lanes
        );
    }
    for d in &r.depths {
        s += &format!("{:>8} {:>12.1}", d.layers, d.ms_per_step);
        if let Some(gib) = d.gpu_used_gib {
            s += &format!("  ({gib:.1} GiB of GPU memory in use)");
        }
        s += "\n";
    }
    s += &format!(
        "{:>8} {:>12.1}  (extrapolated)\n5000 steps (the paper's 1000 x 5 epochs): {:.1} min per target\n",
        r.full_layers, r.full_ms_per_step, r.paper_minutes_per_target
    );
    if r.ms_per_block <= 0.0 {
        s += "the deeper model was not slower: these timings are noise and the extrapolation \
              means nothing; time more steps (--steps) or deeper models (--depths)\n";
    }
    s
}
