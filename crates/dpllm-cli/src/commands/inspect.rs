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
        "kv cache       {} per token (f32), {} at full context",
        human(kv_per_token),
        human(kv_per_token * cfg.max_position_embeddings)
    );
    if a.tensors {
        for (name, info) in &tensors {
            println!("  {name:<60} {:?} {:?}", info.dtype, info.shape);
        }
    }
    Ok(())
}
