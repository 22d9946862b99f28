//! One module per subcommand.

pub mod bench;
pub mod generate;
pub mod inspect;
pub mod perplexity;

use std::path::Path;

use dpllm_engine::tokenizer::TextTokenizer;
use dpllm_engine::Model;

/// Load a model and its tokenizer, reporting the load time on stderr.
pub fn load(dir: &Path) -> anyhow::Result<(Model, TextTokenizer)> {
    let dir = crate::model_dir(&dir.to_path_buf())?.clone();
    let t = std::time::Instant::now();
    let model = Model::load(&dir)?;
    let tok = TextTokenizer::from_dir(&dir, model.config.bos_token_id, &model.config.eos_token_ids)?;
    eprintln!(
        "loaded {} ({}, {} layers) in {:.2}s",
        dir.display(),
        model.config.arch.hf_name(),
        model.config.num_layers,
        t.elapsed().as_secs_f64()
    );
    Ok((model, tok))
}
