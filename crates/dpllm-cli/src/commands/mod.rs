//! One module per subcommand.

pub mod bench;
pub mod calib_text;
pub mod generate;
pub mod inspect;
pub mod perplexity;
pub mod quantize;
pub mod sensitivity;

use std::path::Path;

use dpllm_engine::tokenizer::TextTokenizer;
use dpllm_engine::{LoadOptions, Model};

/// `--bits B`: run an any-precision model at a uniform precision.
#[derive(clap::Args, Clone, Copy, Debug, Default)]
pub struct BitsArg {
    /// Run every quantized linear at B bits (any-precision models only, 3..=8).
    /// Only the planes up to B are loaded. Default: the highest stored precision.
    #[arg(long)]
    pub bits: Option<u32>,
}

/// Load only the weights needed for `bits` and select that precision.
pub fn load_model(dir: &Path, bits: BitsArg) -> anyhow::Result<Model> {
    let dir = crate::model_dir(&dir.to_path_buf())?.clone();
    if let Some(b) = bits.bits {
        if !(3..=8).contains(&b) {
            anyhow::bail!("--bits {b} is out of range (any-precision models run at 3..=8 bits)");
        }
    }
    let model = Model::load_with(&dir, &LoadOptions { max_bits: bits.bits, ..Default::default() })?;
    if let Some(b) = bits.bits {
        model.set_bits(b)?;
    }
    Ok(model)
}

/// Load a model (at `bits` when given) and its tokenizer, reporting the load time on stderr.
pub fn load(dir: &Path, bits: BitsArg) -> anyhow::Result<(Model, TextTokenizer)> {
    let dir = crate::model_dir(&dir.to_path_buf())?.clone();
    let t = std::time::Instant::now();
    let model = load_model(&dir, bits)?;
    let tok = TextTokenizer::from_dir(&dir, model.config.bos_token_id, &model.config.eos_token_ids)?;
    eprintln!(
        "loaded {} ({}, {} layers{}) in {:.2}s",
        dir.display(),
        model.config.arch.hf_name(),
        model.config.num_layers,
        model.bits_range().map(|(_, max)| format!(", any-precision at {} bits", bits.bits.unwrap_or(max))).unwrap_or_default(),
        t.elapsed().as_secs_f64()
    );
    Ok((model, tok))
}
