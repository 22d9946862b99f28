//! `dpllm bench serve MODEL`: the server started in this process on a
//! loopback port, N concurrent streaming clients for a bounded time, and per
//! operating point the throughput, time to first token and per-token latency.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use dpllm_engine::Backend;
use dpllm_server::loadgen::{self, LoadConfig, PointLoad};
use serde_json::{json, Value};

/// Arguments of `bench serve` (its own group id: the flattened `serve::Args`
/// already takes the derived "Args").
#[derive(clap::Args)]
#[group(id = "BenchServeArgs")]
pub struct Args {
    #[command(flatten)]
    pub serve: super::serve::Args,
    /// Concurrent clients; client i runs point i mod the number of points.
    #[arg(long, default_value_t = 4)]
    pub clients: usize,
    /// Seconds during which clients start new requests.
    #[arg(long, default_value_t = 20)]
    pub secs: u64,
    /// max_tokens of every request.
    #[arg(long, default_value_t = 64)]
    pub request_tokens: usize,
    /// Operating points, comma-separated: default, target=T, bits=B, ms=M
    /// (a latency budget in ms per token).
    #[arg(long, value_delimiter = ',', default_value = "default")]
    pub points: Vec<String>,
    /// The prompt of every request.
    #[arg(
        long,
        default_value = "The quick brown fox jumps over the lazy dog. Once upon a time"
    )]
    pub prompt: String,
    /// Write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// A `--points` entry as a name and the request's `"dpllm"` object.
fn parse_point(s: &str) -> anyhow::Result<(String, Option<Value>)> {
    let s = s.trim();
    if s == "default" {
        return Ok((s.into(), None));
    }
    let (k, v) = s.split_once('=').ok_or_else(|| {
        anyhow::anyhow!("--points {s:?}: expected default, target=T, bits=B or ms=M")
    })?;
    let x: f64 = v
        .parse()
        .map_err(|_| anyhow::anyhow!("--points {s:?}: {v:?} is not a number"))?;
    let obj = match k {
        "target" => json!({"target_bits": x}),
        "bits" if x.fract() == 0.0 => json!({"bits": x as u32}),
        "ms" => json!({"max_ms_per_token": x}),
        _ => anyhow::bail!("--points {s:?}: expected default, target=T, bits=B (whole) or ms=M"),
    };
    Ok((s.into(), Some(obj)))
}

/// Run the load benchmark.
pub fn run(a: Args) -> anyhow::Result<()> {
    super::check_json(a.json.as_deref(), &[a.serve.model.as_path()])?;
    if a.clients == 0 || a.secs == 0 || a.request_tokens == 0 {
        anyhow::bail!("--clients, --secs and --request-tokens must be at least 1");
    }
    let points = a
        .points
        .iter()
        .map(|p| parse_point(p))
        .collect::<anyhow::Result<Vec<_>>>()?;
    super::on_backend!(a.serve.device.clone(), run_on(a, points))
}

fn run_on<B: Backend>(
    backend: B,
    a: Args,
    points: Vec<(String, Option<Value>)>,
) -> anyhow::Result<()> {
    let device = backend.name();
    let server = super::serve::build(backend, &a.serve, SocketAddr::from(([127, 0, 0, 1], 0)))?;
    let cfg = LoadConfig {
        clients: a.clients,
        duration: Duration::from_secs(a.secs),
        max_tokens: a.request_tokens,
        points,
        prompt: a.prompt.clone(),
        api_key: a.serve.api_key.clone(),
    };
    eprintln!(
        "{} clients for {} s, {} tokens a request, max batch {}...",
        a.clients, a.secs, a.request_tokens, a.serve.max_batch
    );
    let (results, secs) = server
        .drive(move |base| loadgen::drive_blocking(&base, &cfg))?
        .map_err(anyhow::Error::msg)?;
    let total: f64 = results.iter().map(|r| r.tokens_per_sec).sum();
    let mut table = String::from(
        "| point | served as | clients | requests | 429 | failed | tokens/s | TTFT p50 / p90 / p99 ms | ms per output token p50 / p90 / p99 | effective bits |\n|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in &results {
        table += &row(r);
    }
    table += &format!("\ntotal {total:.1} tokens/s over {secs:.1} s on {device}\n");
    for r in results.iter().filter(|r| r.error.is_some()) {
        table += &format!("{}: {}\n", r.point, r.error.as_deref().unwrap_or(""));
    }
    let report = json!({
        "benchmark": "serve",
        "model": a.serve.model,
        "backend": device,
        "clients": a.clients,
        "secs": secs,
        "request_tokens": a.request_tokens,
        "max_batch": a.serve.max_batch,
        "total_tokens_per_sec": total,
        "points": results,
    });
    print!("{table}");
    if let Some(p) = &a.json {
        dpllm_eval::report::write_json(p, &report)?;
    }
    Ok(())
}

/// One table row.
fn row(r: &PointLoad) -> String {
    let p = |x: &loadgen::Percentiles| format!("{:.1} / {:.1} / {:.1}", x.p50, x.p90, x.p99);
    format!(
        "| {} | {} | {} | {} | {} | {} | {:.1} | {} | {} | {} |\n",
        r.point,
        if r.served_as.is_empty() {
            "-".into()
        } else {
            r.served_as.join(", ")
        },
        r.clients,
        r.requests,
        r.rejected,
        r.failed,
        r.tokens_per_sec,
        p(&r.ttft_ms),
        p(&r.token_latency_ms),
        r.effective_bits.map_or("-".into(), |b| format!("{b:.3}"))
    )
}
