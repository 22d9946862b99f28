//! `dpllm inspect MODEL`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use dpllm_format::{Checkpoint, ModelConfig, RopeScaling};

/// Arguments of `inspect`.
#[derive(clap::Args)]
pub struct Args {
    /// Model directory (Hugging Face layout: config.json, *.safetensors, tokenizer.json) or GGUF file.
    pub model: PathBuf,
    /// List every tensor.
    #[arg(long)]
    pub tensors: bool,
}

fn human(bytes: usize) -> String {
    dpllm_eval::memory::human(bytes as u128)
}

/// The GPU memory an any-precision model needs on `--device cuda`: at its
/// highest precision, and at each calibrated budget (only the planes its plans
/// use are loaded), plus the f16 copy of the widest linear a long batch makes.
#[cfg(feature = "cuda")]
fn print_gpu_memory(
    dir: &std::path::Path,
    cfg: &ModelConfig,
    ck: &Checkpoint,
) -> anyhow::Result<()> {
    use dpllm_engine::backend::cuda::bitplane::device_bytes;
    use dpllm_format::anyprec::{AnyPrecInfo, ANYPREC_WEIGHTS};
    use dpllm_format::plan::{self, Plan};
    let info = AnyPrecInfo::from_metadata(ck.metadata(), &dir.join(ANYPREC_WEIGHTS))?;
    let linears = cfg.linears();
    // Embedding, output layer and norms: every tensor that is not a plane or a LUT.
    let dense: usize = ck
        .tensors()
        .iter()
        .filter(|(n, _)| !n.ends_with(".planes") && !n.contains(".lut"))
        .map(|(_, t)| t.nbytes())
        .sum();
    let at = |keep: &dyn Fn(&str) -> u32| -> usize {
        dense
            + linears
                .iter()
                .map(|s| device_bytes(s.rows, s.cols, info.seed_bits, keep(&s.prefix)))
                .sum::<usize>()
    };
    let scratch = linears
        .iter()
        .map(|s| 2 * s.rows * s.cols)
        .max()
        .unwrap_or(0);
    println!(
        "gpu memory     {} at {} bits (weights; + {} for a long batch's widened layer)",
        human(at(&|_| info.max_bits)),
        info.max_bits,
        human(2 * scratch)
    );
    for budget in plan::available_budgets(dir) {
        let Some(path) = plan::first_plan(&plan::budget_dir(dir, budget)) else {
            continue;
        };
        let p = Plan::load(&path)?;
        let keep: std::collections::HashMap<&str, u32> = p
            .linears
            .iter()
            .map(|l| (l.name.as_str(), l.max_bits.max(l.high_bits)))
            .collect();
        println!(
            "               {} at budget {budget:.2} bits (the planes its plans use)",
            human(at(&|name| keep.get(name).copied().unwrap_or(info.max_bits)))
        );
    }
    Ok(())
}

/// Print architecture, parameters, dtypes and memory.
pub fn run(a: Args) -> anyhow::Result<()> {
    let dir = crate::model_dir(&a.model)?;
    let cfg = ModelConfig::from_dir(dir)?;
    let ck = Checkpoint::open(dir)?;
    let tensors = ck.tensors();
    let mut by_dtype: BTreeMap<String, (usize, usize, usize)> = BTreeMap::new();
    let (mut params, mut bytes) = (0usize, 0usize);
    for info in tensors.values() {
        // GGUF tensors are read as f32 but stored in their ggml type: report that.
        let stored = info
            .ggml
            .map_or_else(|| format!("{:?}", info.dtype), |g| format!("{g:?}"));
        let e = by_dtype.entry(stored).or_default();
        e.0 += 1;
        e.1 += info.numel();
        e.2 += info.nbytes();
        params += info.numel();
        bytes += info.nbytes();
    }
    let rope = match &cfg.rope.scaling {
        RopeScaling::None => "default".to_string(),
        RopeScaling::Linear { factor } => format!("linear x{factor}"),
        RopeScaling::Llama3 { factor, .. } => format!("llama3 x{factor}"),
    };
    println!("model          {}", dir.display());
    println!("architecture   {}", cfg.arch.hf_name());
    println!("layers         {}", cfg.num_layers);
    println!(
        "hidden / mlp   {} / {}",
        cfg.hidden_size, cfg.intermediate_size
    );
    println!(
        "heads          {} query, {} key/value (GQA {}:1), head_dim {}",
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.num_heads / cfg.num_kv_heads,
        cfg.head_dim
    );
    println!("vocab          {}", cfg.vocab_size);
    println!(
        "context        {} tokens{}",
        cfg.max_position_embeddings,
        cfg.sliding_window
            .map(|w| format!(", sliding window {w}"))
            .unwrap_or_default()
    );
    println!(
        "rope           theta {}, {rope}, rotary dims {}",
        cfg.rope.theta,
        cfg.rotary_dim()
    );
    println!("tied embedding {}", cfg.tie_word_embeddings);
    println!("qkv bias       {}  qk-norm {}", cfg.qkv_bias, cfg.qk_norm);
    println!("parameters     {} ({:.2} M)", params, params as f64 / 1e6);
    println!(
        "weights        {} in {} shard(s)",
        human(bytes),
        ck.shard_paths().len()
    );
    for (dt, (n, p, b)) in &by_dtype {
        println!("  {dt:<6} {n:>5} tensors {p:>14} params {:>10}", human(*b));
    }
    let kv_per_token = 2 * cfg.num_layers * cfg.kv_dim() * 4;
    println!(
        "kv cache       {} per token (f32; f16 on a GPU: half), {} at full context",
        human(kv_per_token),
        human(kv_per_token * cfg.max_position_embeddings)
    );
    #[cfg(feature = "cuda")]
    if dpllm_format::anyprec::is_anyprec_dir(dir) {
        print_gpu_memory(dir, &cfg, &ck)?;
    }
    if a.tensors {
        for (name, info) in &tensors {
            println!("  {name:<60} {:?} {:?}", info.dtype, info.shape);
        }
    }
    Ok(())
}
