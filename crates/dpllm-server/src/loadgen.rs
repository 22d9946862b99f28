//! A load generator for `dpllm bench serve`: N concurrent clients stream
//! completions from a server for a bounded time, each at one operating point;
//! per point, throughput, time to first token and per-token latency
//! percentiles (from the arrival times of the streamed chunks).

use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{json, Value};

/// What to drive.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// Concurrent clients (client i runs point i mod the number of points).
    pub clients: usize,
    /// How long clients start new requests.
    pub duration: Duration,
    /// `max_tokens` of every request.
    pub max_tokens: usize,
    /// The operating points: a name and the request's `"dpllm"` object
    /// (None: the server's default).
    pub points: Vec<(String, Option<Value>)>,
    /// The prompt of every request.
    pub prompt: String,
    /// `Authorization: Bearer` key, if the server wants one.
    pub api_key: Option<String>,
}

/// 50th, 90th and 99th percentiles, ms.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
}

impl Percentiles {
    fn of(mut v: Vec<f64>) -> Percentiles {
        if v.is_empty() {
            return Percentiles::default();
        }
        v.sort_by(f64::total_cmp);
        let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
        Percentiles {
            p50: at(0.5),
            p90: at(0.9),
            p99: at(0.99),
        }
    }
}

/// One operating point under load.
#[derive(Debug, Clone, Serialize)]
pub struct PointLoad {
    /// The point's name.
    pub point: String,
    /// Clients that ran it.
    pub clients: usize,
    /// Requests completed.
    pub requests: usize,
    /// Requests refused with 429.
    pub rejected: usize,
    /// Requests that failed otherwise.
    pub failed: usize,
    /// Tokens generated.
    pub tokens: usize,
    /// Tokens generated per second of the run.
    pub tokens_per_sec: f64,
    /// Time to first token, ms.
    pub ttft_ms: Percentiles,
    /// Time per output token after the first (a request's decode time over
    /// its tokens after the first), ms, over requests.
    pub token_latency_ms: Percentiles,
    /// Mean effective bits the server reported.
    pub effective_bits: Option<f64>,
    /// The operating points the server reported using (a latency budget's
    /// choice follows the live latency profile).
    pub served_as: Vec<String>,
    /// The first error the server answered (a client stops at it).
    pub error: Option<String>,
}

/// What one client saw.
#[derive(Default)]
struct Tally {
    requests: usize,
    rejected: usize,
    failed: usize,
    tokens: usize,
    ttft: Vec<f64>,
    tpot: Vec<f64>,
    bits: Vec<f64>,
    served_as: Vec<String>,
    /// The server's answer to a request it refused (not a 429): the client stops.
    error: Option<String>,
}

/// Drive the server at `base` (`http://host:port`) as `cfg` says; one result
/// per point, and the run's wall time in seconds.
pub async fn drive(base: &str, cfg: &LoadConfig) -> Result<(Vec<PointLoad>, f64), String> {
    if cfg.points.is_empty() || cfg.clients == 0 {
        return Err("the load needs at least one client and one operating point".into());
    }
    let http = reqwest::Client::new();
    let t0 = Instant::now();
    let deadline = t0 + cfg.duration;
    let clients = (0..cfg.clients).map(|i| {
        let (http, point) = (http.clone(), cfg.points[i % cfg.points.len()].1.clone());
        async move {
            let mut t = Tally::default();
            while Instant::now() < deadline && t.error.is_none() {
                one_request(&http, base, cfg, point.as_ref(), i, &mut t).await;
            }
            t
        }
    });
    let tallies = futures_util::future::join_all(clients).await;
    let secs = t0.elapsed().as_secs_f64();
    let out = (cfg.points.iter().enumerate())
        .map(|(p, (name, _))| {
            let mine: Vec<&Tally> = (tallies.iter().enumerate())
                .filter(|(i, _)| i % cfg.points.len() == p)
                .map(|(_, t)| t)
                .collect();
            let sum = |f: fn(&Tally) -> usize| mine.iter().map(|t| f(t)).sum::<usize>();
            let cat = |f: fn(&Tally) -> &Vec<f64>| -> Vec<f64> {
                mine.iter().flat_map(|t| f(t).iter().copied()).collect()
            };
            let bits = cat(|t| &t.bits);
            let tokens = sum(|t| t.tokens);
            PointLoad {
                point: name.clone(),
                clients: mine.len(),
                requests: sum(|t| t.requests),
                rejected: sum(|t| t.rejected),
                failed: sum(|t| t.failed),
                tokens,
                tokens_per_sec: tokens as f64 / secs,
                ttft_ms: Percentiles::of(cat(|t| &t.ttft)),
                token_latency_ms: Percentiles::of(cat(|t| &t.tpot)),
                effective_bits: (!bits.is_empty())
                    .then(|| bits.iter().sum::<f64>() / bits.len() as f64),
                served_as: {
                    let mut v: Vec<String> = mine
                        .iter()
                        .flat_map(|t| t.served_as.iter().cloned())
                        .collect();
                    v.sort();
                    v.dedup();
                    v
                },
                error: mine.iter().find_map(|t| t.error.clone()),
            }
        })
        .collect();
    Ok((out, secs))
}

/// [`drive`] on a runtime of its own (from synchronous code).
pub fn drive_blocking(base: &str, cfg: &LoadConfig) -> Result<(Vec<PointLoad>, f64), String> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the load generator's runtime: {e}"))?
        .block_on(drive(base, cfg))
}

/// One streamed request of client `i`, recorded into `t`.
async fn one_request(
    http: &reqwest::Client,
    base: &str,
    cfg: &LoadConfig,
    point: Option<&Value>,
    i: usize,
    t: &mut Tally,
) {
    let mut body = json!({
        "prompt": cfg.prompt,
        "max_tokens": cfg.max_tokens,
        "temperature": 0.7,
        "seed": (i * 1_000_003 + t.requests) as u64,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    if let Some(p) = point {
        body["dpllm"] = p.clone();
    }
    let mut req = http.post(format!("{base}/v1/completions")).json(&body);
    if let Some(k) = &cfg.api_key {
        req = req.bearer_auth(k);
    }
    let start = Instant::now();
    let mut resp = match req.send().await {
        Ok(r) => r,
        Err(_) => {
            t.failed += 1;
            return;
        }
    };
    match resp.status().as_u16() {
        200 => {}
        429 => {
            t.rejected += 1;
            let wait = (resp.headers().get("retry-after"))
                .and_then(|v| v.to_str().ok()?.parse().ok())
                .unwrap_or(1u64);
            tokio::time::sleep(Duration::from_secs(wait.min(5))).await;
            return;
        }
        status => {
            t.failed += 1;
            let body = resp.text().await.unwrap_or_default();
            let msg = serde_json::from_str::<Value>(&body)
                .ok()
                .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
                .unwrap_or(body);
            t.error = Some(format!("HTTP {status}: {msg}"));
            return;
        }
    }
    let mut buf = String::new();
    let (mut first, mut last) = (None::<Instant>, start);
    let mut finished = false;
    while let Ok(Some(chunk)) = resp.chunk().await {
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            let Some(data) = event.trim().strip_prefix("data:") else {
                continue;
            };
            let Ok(v) = serde_json::from_str::<Value>(data.trim()) else {
                continue;
            };
            if v.get("error").is_some() {
                t.failed += 1;
                return;
            }
            let text = v["choices"][0]["text"].as_str().unwrap_or("");
            if !text.is_empty() {
                last = Instant::now();
                if first.is_none() {
                    t.ttft.push((last - start).as_secs_f64() * 1000.0);
                    first = Some(last);
                }
            }
            if let Some(d) = v.get("dpllm") {
                if let Some(b) = d["effective_bits"].as_f64() {
                    t.bits.push(b);
                }
                if let Some(p) = d["operating_point"].as_str() {
                    if !t.served_as.iter().any(|s| s == p) {
                        t.served_as.push(p.to_string());
                    }
                }
            }
            if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                t.tokens += n as usize;
                finished = true;
                if let (Some(f), true) = (first, n > 1) {
                    t.tpot
                        .push((last - f).as_secs_f64() * 1000.0 / (n - 1) as f64);
                }
            }
        }
    }
    if finished {
        t.requests += 1;
    } else {
        t.failed += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::Percentiles;

    #[test]
    fn percentiles_of_a_sample() {
        let p = Percentiles::of((1..=100).map(f64::from).collect());
        assert_eq!((p.p50, p.p90, p.p99), (51.0, 90.0, 99.0));
        assert_eq!(Percentiles::of(vec![]).p99, 0.0);
    }
}
