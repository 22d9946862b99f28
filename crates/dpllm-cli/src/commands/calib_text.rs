//! Calibration text shared by `sensitivity`, `quantize --calib` and `calibrate`:
//! a UTF-8 file cut into fixed-length token windows.

use std::path::{Path, PathBuf};

use dpllm_engine::tokenizer::TextTokenizer;

/// Most calibration sequences a run may draw.
const MAX_SAMPLES: usize = 1_000_000;

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
        self.calib
            .clone()
            .ok_or_else(|| anyhow::anyhow!("--calib FILE is required (the calibration text)"))
    }

    /// Check the counts: at least one sequence, windows within the model's
    /// context of `max_ctx` positions, and all of them within memory.
    pub fn check(&self, max_ctx: usize) -> anyhow::Result<()> {
        if let Some(f) = &self.calib {
            std::fs::metadata(f)
                .map_err(|e| anyhow::anyhow!("cannot read --calib {}: {e}", f.display()))?;
        }
        if !(1..=MAX_SAMPLES).contains(&self.samples) {
            anyhow::bail!(
                "--samples {} is out of range 1..={MAX_SAMPLES}",
                self.samples
            );
        }
        if !(2..=max_ctx).contains(&self.seq_len) {
            anyhow::bail!(
                "--seq-len {} is out of range 2..={max_ctx} (the model's context)",
                self.seq_len
            );
        }
        dpllm_eval::memory::ensure_fits(
            dpllm_eval::memory::product(&[self.samples as u128, self.seq_len as u128, 4]),
            "the calibration sequences (--samples x --seq-len)",
        )
    }

    /// Tokenize `file` with the tokenizer `tok` and draw the windows (each of at most `max_ctx` tokens).
    pub fn sequences(
        &self,
        file: &Path,
        tok: &TextTokenizer,
        max_ctx: usize,
    ) -> anyhow::Result<Vec<Vec<u32>>> {
        self.check(max_ctx)?;
        let text = super::read_text(file, "--calib")?;
        let ids = tok.encode(&text, false)?;
        let seqs = dpllm_quantize::sensitivity::calibration_sequences(
            &ids,
            self.samples,
            self.seq_len,
            self.seed,
        )?;
        eprintln!(
            "{} calibration sequences x {} tokens from {} ({} tokens)",
            seqs.len(),
            self.seq_len,
            file.display(),
            ids.len()
        );
        Ok(seqs)
    }
}
