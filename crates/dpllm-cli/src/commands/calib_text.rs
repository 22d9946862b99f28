//! Calibration text shared by `sensitivity`, `quantize --calib` and `calibrate`:
//! a UTF-8 file cut into fixed-length token windows.

use std::path::{Path, PathBuf};

use dpllm_engine::tokenizer::TextTokenizer;

/// `--calib FILE --samples N --seq-len L --seed S`.
#[derive(clap::Args, Clone, Debug)]
pub struct CalibArgs {
    /// Calibration text (UTF-8), e.g. ../shared/data/docs/calib.txt. Never the evaluation text.
    #[arg(long)]
    pub calib: Option<PathBuf>,
    /// Calibration sequences drawn from the text.
    #[arg(long, default_value_t = 100)]
    pub samples: usize,
    /// Tokens per calibration sequence.
    #[arg(long, default_value_t = 512)]
    pub seq_len: usize,
    /// Seed of the window positions (the same seed gives the same sequences).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl CalibArgs {
    /// The `--calib` file, for commands that cannot run without one.
    pub fn required_file(&self) -> anyhow::Result<PathBuf> {
        self.calib.clone().ok_or_else(|| anyhow::anyhow!("--calib FILE is required (the calibration text)"))
    }

    /// Tokenize `file` with the tokenizer of `model_dir` and draw the windows.
    pub fn sequences(&self, file: &Path, tok: &TextTokenizer) -> anyhow::Result<Vec<Vec<u32>>> {
        if self.samples == 0 {
            anyhow::bail!("--samples must be at least 1");
        }
        let text = std::fs::read_to_string(file).map_err(|e| anyhow::anyhow!("cannot read --calib {}: {e}", file.display()))?;
        let ids = tok.encode(&text, false)?;
        let seqs = dpllm_quantize::sensitivity::calibration_sequences(&ids, self.samples, self.seq_len, self.seed)?;
        eprintln!("{} calibration sequences x {} tokens from {} ({} tokens)", seqs.len(), self.seq_len, file.display(), ids.len());
        Ok(seqs)
    }
}
