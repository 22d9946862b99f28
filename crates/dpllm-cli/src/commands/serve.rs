//! `dpllm serve MODEL`: the OpenAI-compatible server (`dpllm-server`).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use dpllm_engine::session::resolve_budget;
use dpllm_engine::tokenizer::TextTokenizer;
use dpllm_engine::{Backend, ServedModel};
use dpllm_format::plan::available_budgets;
use dpllm_server::{Limits, OperatingPoint, Server, ServerConfig};

/// Arguments of `serve`.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub device: super::DeviceArg,
    /// Model: an any-precision directory (with its plans), a Hugging Face
    /// directory or a GGUF file.
    pub model: PathBuf,
    /// Address to bind. The default serves this machine only; 0.0.0.0 serves
    /// the network (set an API key).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,
    /// Port (0: any free port, printed at start-up).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on every route but /health and the
    /// web page.
    #[arg(long, env = "DPLLM_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Memory budget (average bits) whose plans to serve; the model keeps only
    /// the planes it allows. Default: the model's only calibrated budget.
    #[arg(long)]
    pub budget: Option<f64>,
    /// Default operating point: the DP-LLM plan for this target (requests
    /// choose their own with {"dpllm": {"target_bits": T}}).
    #[arg(long, conflicts_with_all = ["bits", "max_ms_per_token"], allow_negative_numbers = true)]
    pub target: Option<f64>,
    /// Default operating point: uniform bits.
    #[arg(long, conflicts_with = "max_ms_per_token")]
    pub bits: Option<u32>,
    /// Default operating point: the best plan decoding within this many ms
    /// per token on this device. Without any of the three: the highest
    /// precision loaded.
    #[arg(long, allow_negative_numbers = true)]
    pub max_ms_per_token: Option<f64>,
    /// Requests decoded together at most (continuous batching).
    #[arg(long, default_value_t = 8)]
    pub max_batch: usize,
    /// Requests waiting for a place at most; beyond, HTTP 429 with Retry-After.
    #[arg(long, default_value_t = 32)]
    pub max_queue: usize,
    /// Largest request body, KiB.
    #[arg(long, default_value_t = 1024)]
    pub max_body_kib: usize,
    /// Longest prompt, tokens (also bounded by the model's context).
    #[arg(long, default_value_t = 8192)]
    pub max_prompt_tokens: usize,
    /// Largest max_tokens a request may ask.
    #[arg(long, default_value_t = 4096)]
    pub max_tokens_limit: usize,
    /// max_tokens of a request that names none.
    #[arg(long, default_value_t = 256)]
    pub default_max_tokens: usize,
    /// Decoded tokens per operating point in the start-up latency profile
    /// (0: no profile; then requests cannot name a latency budget).
    #[arg(long, default_value_t = 16)]
    pub profile_tokens: usize,
    /// Prompt tokens run per engine step while the other requests decode
    /// (chunked prefill: a long prompt delays the batch's next token by one
    /// chunk, not by the whole prompt); 0 runs every new prompt whole first.
    #[arg(long, default_value_t = 256)]
    pub prefill_chunk: usize,
    /// On SIGINT/SIGTERM, seconds the requests in flight may run before they
    /// are cancelled.
    #[arg(long, default_value_t = 10)]
    pub shutdown_grace_secs: u64,
    /// Model name in responses (default: the model's directory or file name).
    #[arg(long)]
    pub name: Option<String>,
}

/// Serve until SIGINT or SIGTERM.
pub fn run(a: Args) -> anyhow::Result<()> {
    super::on_backend!(a.device.clone(), run_on(a))
}

/// The operating point the flags name.
fn default_point(a: &Args) -> anyhow::Result<OperatingPoint> {
    Ok(match (a.target, a.bits, a.max_ms_per_token) {
        (Some(t), _, _) => OperatingPoint::Target(t),
        (_, Some(b), _) if (3..=8).contains(&b) => OperatingPoint::Bits(b),
        (_, Some(b), _) => anyhow::bail!("--bits {b} is out of range 3..=8"),
        (_, _, Some(ms)) if ms > 0.0 && ms.is_finite() => OperatingPoint::Latency(ms),
        (_, _, Some(ms)) => anyhow::bail!("--max-ms-per-token {ms} must be a positive number"),
        _ => OperatingPoint::Default,
    })
}

/// [`run`] on `backend`.
fn run_on<B: Backend>(backend: B, a: Args) -> anyhow::Result<()> {
    let server = build(backend, &a, SocketAddr::new(a.host, a.port))?;
    let open = a.host.is_unspecified() && a.api_key.is_none();
    server.serve_blocking(|addr| {
        eprintln!("listening on http://{addr} (Ctrl-C to stop)");
        if open {
            eprintln!("warning: serving every network interface without --api-key");
        }
    })?;
    eprintln!("stopped");
    Ok(())
}

/// The model of `a` loaded onto `backend` and profiled: a server for `addr`.
pub fn build<B: Backend>(backend: B, a: &Args, addr: SocketAddr) -> anyhow::Result<Server<B>> {
    let point = default_point(a)?;
    if a.max_batch == 0 || a.max_queue == 0 {
        anyhow::bail!("--max-batch and --max-queue must be at least 1");
    }
    let dir = crate::model_dir(&a.model)?.clone();
    let budget = match (a.budget, available_budgets(&dir).is_empty()) {
        (None, true) => None,
        (b, _) => Some(resolve_budget(&dir, b)?),
    };
    let t = std::time::Instant::now();
    let served = ServedModel::load_on(backend, &dir, budget, None)?;
    let m = served.model();
    let tok = TextTokenizer::from_dir(&dir, m.config.bos_token_id, &m.config.eos_token_ids)?;
    eprintln!(
        "loaded {} ({}, {} layers{}) on {} in {:.2}s",
        dir.display(),
        m.config.arch.hf_name(),
        m.config.num_layers,
        budget
            .map(|b| format!(", budget {b} bits"))
            .unwrap_or_default(),
        m.backend.name(),
        t.elapsed().as_secs_f64()
    );
    let name = a.name.clone().unwrap_or_else(|| {
        dir.file_name()
            .map_or("dpllm".into(), |n| n.to_string_lossy().into_owned())
    });
    let cfg = ServerConfig {
        addr,
        api_key: a.api_key.clone().filter(|k| !k.is_empty()),
        limits: Limits {
            max_body_bytes: a.max_body_kib.saturating_mul(1024),
            max_prompt_tokens: a.max_prompt_tokens,
            max_tokens: a.max_tokens_limit,
            default_max_tokens: a.default_max_tokens,
        },
        max_batch: a.max_batch,
        max_queue: a.max_queue,
        default_point: point,
        shutdown_grace: Duration::from_secs(a.shutdown_grace_secs),
        model_name: name,
        profile_tokens: a.profile_tokens,
        prefill_chunk: a.prefill_chunk,
    };
    if a.profile_tokens > 0 {
        eprintln!(
            "measuring the decode latency of every operating point ({} tokens each)...",
            a.profile_tokens
        );
    }
    let server = Server::new(served, tok, cfg)?;
    for l in server.profile() {
        eprintln!("  {:<14} {:>8.2} ms/token", l.point.label(), l.ms_per_token);
    }
    Ok(server)
}
