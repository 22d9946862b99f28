//! `dpllm generate MODEL --prompt ...`.

use std::io::Write;
use std::path::PathBuf;

use dpllm_engine::chat_template::ChatMessage;
use dpllm_engine::generate::{generate, GenerateOptions};
use dpllm_engine::sampler::SamplingParams;
use dpllm_engine::session::StopReason;
use dpllm_engine::Backend;

/// Arguments of `generate`.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub device: super::DeviceArg,
    /// Model directory.
    pub model: PathBuf,
    #[command(flatten)]
    pub bits: super::BitsArg,
    /// The prompt.
    #[arg(long, short)]
    pub prompt: String,
    /// Maximum new tokens.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 = greedy.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub temperature: f32,
    /// Keep only the k most likely tokens (0 = off).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Nucleus sampling: keep the smallest set of tokens with this total probability.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub top_p: f32,
    /// Penalize tokens already in the context (1.0 = off; HF semantics).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub repetition_penalty: f32,
    /// Random seed for sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Wrap the prompt in the model's chat template (tokenizer_config.json) as a user message.
    #[arg(long)]
    pub chat: bool,
    /// System message for --chat.
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    pub ignore_eos: bool,
}

/// Generate and stream to stdout; a summary goes to stderr.
pub fn run(a: Args) -> anyhow::Result<()> {
    super::on_backend!(a.device.clone(), run_on(a))
}

/// [`run`] on `backend`.
fn run_on<B: Backend>(backend: B, a: Args) -> anyhow::Result<()> {
    let sampling = SamplingParams {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        repetition_penalty: a.repetition_penalty,
        seed: a.seed,
    };
    sampling.validate()?;
    let (loaded, tok) = super::load(backend, &a.model, &a.bits)?;
    let ids = if a.chat {
        let tpl = tok.chat_template().ok_or_else(|| {
            anyhow::anyhow!(
                "--chat: {} has no chat_template in tokenizer_config.json",
                a.model.display()
            )
        })?;
        let mut msgs = Vec::new();
        if let Some(s) = &a.system {
            msgs.push(ChatMessage {
                role: "system".into(),
                content: s.clone(),
            });
        }
        msgs.push(ChatMessage {
            role: "user".into(),
            content: a.prompt.clone(),
        });
        tok.encode(&tpl.render(&msgs, true)?, false)?
    } else {
        tok.encode(&a.prompt, true)?
    };
    let opts = GenerateOptions {
        max_tokens: a.max_tokens,
        sampling,
        stop_at_eos: !a.ignore_eos,
    };
    let mut session = loaded.session(ids.len().saturating_add(a.max_tokens))?;
    let mut stdout = std::io::stdout();
    if !a.chat {
        print!("{}", a.prompt);
    }
    let g = generate(&mut session, &tok, &ids, &opts, |piece| {
        print!("{piece}");
        let _ = stdout.flush();
    })?;
    println!();
    let stop = match g.stop {
        StopReason::Eos => "end of sequence",
        StopReason::MaxTokens => "max tokens",
        StopReason::ContextFull => "context full",
        StopReason::Caller => "stopped",
    };
    let bits = g
        .decode_bits
        .effective_bits()
        .map(|b| format!(" | decode effective bits {b:.3}"))
        .unwrap_or_default();
    eprintln!(
        "prompt {} tokens in {:.2}s ({:.1} tok/s) | generated {} tokens, {:.2} tok/s | stop: {stop}{bits}",
        g.prompt_tokens,
        g.prefill_secs,
        g.prompt_tokens as f64 / g.prefill_secs.max(1e-9),
        g.tokens.len(),
        g.decode_tokens_per_sec()
    );
    Ok(())
}
