//! Fixtures of the server tests: tiny models on disk, a server started on a
//! loopback port, and an HTTP client that reads plain and streamed answers.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use dpllm_engine::tokenizer::TextTokenizer;
use dpllm_engine::ServedModel;
use dpllm_format::plan::{
    budget_dir, plan_path, EstimatorSpec, LinearPlan, Plan, PlanKind, PLAN_FORMAT, PLAN_VERSION,
};
use dpllm_quantize::model_quant::{quantize_model, QuantizeOptions};
use dpllm_server::{RunningServer, Server, ServerConfig};
use dpllm_testkit::{write_tiny_model, TinySpec, EOS_ID};
use serde_json::{json, Value};

/// A model directory that lives as long as the fixture.
pub struct Fixture {
    _dir: tempfile::TempDir,
    pub model: PathBuf,
}

/// A chat template for the tiny models.
const TEMPLATE: &str = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}";

/// The memory budget of the hand-made plans.
pub const BUDGET: f64 = 5.0;

/// A tiny model quantized to 3..8 bits, with DP-LLM plans for budget 5 at
/// targets 3.5 (3 or 4 bits a token) and 4.5 (4 or 5), and a chat template.
pub fn quantized() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let spec = TinySpec {
        chat_template: Some(TEMPLATE.into()),
        ..TinySpec::default()
    };
    write_tiny_model(&src, &spec, 17).unwrap();
    let q = dir.path().join("q");
    quantize_model(&src, &q, &QuantizeOptions::default()).unwrap();
    let model = dpllm_engine::Model::load(&q).unwrap();
    for (target, lo) in [(3.5, 3), (4.5, 4)] {
        let linears = (model.config.linears().iter())
            .map(|s| LinearPlan {
                name: s.prefix.clone(),
                size: s.size(),
                max_bits: 5,
                avg_bits: lo as f32 + 0.5,
                low_bits: lo,
                high_bits: lo + 1,
                // ||x|| of a normed input of width 32 is about 5.7: both ways.
                threshold: 5.6,
                estimator: EstimatorSpec::Linear {
                    a: 1.0,
                    c: 0.0,
                    r2: 1.0,
                },
            })
            .collect();
        let plan = Plan {
            format: PLAN_FORMAT.into(),
            version: PLAN_VERSION,
            kind: PlanKind::Dynamic,
            budget_bits: BUDGET,
            target_bits: target,
            min_bits: 3,
            max_bits: 5,
            async_estimation: false,
            calibration: Default::default(),
            linears,
        };
        let bdir = budget_dir(&q, BUDGET);
        std::fs::create_dir_all(&bdir).unwrap();
        plan.save(&plan_path(&bdir, PlanKind::Dynamic, target))
            .unwrap();
    }
    Fixture {
        _dir: dir,
        model: q,
    }
}

/// A dense model slow enough (about a millisecond a token) for a request to
/// be caught in flight, with a long context.
pub fn slow() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let spec = TinySpec {
        hidden: 256,
        layers: 4,
        heads: 4,
        kv_heads: 2,
        intermediate: 768,
        dtype: safetensors::Dtype::F32,
        max_positions: 8192,
        ..TinySpec::default()
    };
    write_tiny_model(dir.path(), &spec, 5).unwrap();
    let model = dir.path().to_path_buf();
    Fixture { _dir: dir, model }
}

/// Settings for a test server on a free loopback port.
pub fn config() -> ServerConfig {
    ServerConfig {
        addr: "127.0.0.1:0".parse().unwrap(),
        profile_tokens: 4,
        model_name: "tiny".into(),
        ..ServerConfig::default()
    }
}

/// Start a server on `model` (loaded for `budget`) with `cfg`, on the CPU.
pub fn start(model: &Path, budget: Option<f64>, cfg: ServerConfig) -> RunningServer {
    start_on(dpllm_engine::CpuBackend, model, budget, cfg)
}

/// [`start`] on `backend`.
pub fn start_on<B: dpllm_engine::Backend>(
    backend: B,
    model: &Path,
    budget: Option<f64>,
    cfg: ServerConfig,
) -> RunningServer {
    let served = ServedModel::load_on(backend, model, budget, None).unwrap();
    let m = served.model();
    let tok =
        TextTokenizer::from_dir(model, m.config.bos_token_id, &m.config.eos_token_ids).unwrap();
    Server::new(served, tok, cfg).unwrap().spawn().unwrap()
}

/// A greedy request body that never ends early (EOS banned), merged with `extra`.
pub fn greedy(max_tokens: usize, extra: Value) -> Value {
    let mut v = json!({
        "max_tokens": max_tokens,
        "temperature": 0,
        "logit_bias": {EOS_ID.to_string(): -100},
    });
    for (k, x) in extra.as_object().unwrap() {
        v[k] = x.clone();
    }
    v
}

/// An HTTP client for one server.
pub struct Client {
    pub base: String,
    pub http: reqwest::Client,
    pub key: Option<String>,
}

/// A plain answer.
pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl Client {
    pub fn new(s: &RunningServer) -> Client {
        Client {
            base: format!("http://{}", s.addr),
            http: reqwest::Client::new(),
            key: None,
        }
    }

    fn auth(&self, r: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.key {
            Some(k) => r.bearer_auth(k),
            None => r,
        }
    }

    /// POST `body` (raw bytes) to `path`.
    pub async fn post_raw(&self, path: &str, body: impl Into<reqwest::Body>) -> Reply {
        let r = self.auth(self.http.post(format!("{}{path}", self.base)).body(body));
        read(r.send().await.unwrap()).await
    }

    /// POST JSON to `path`.
    pub async fn post(&self, path: &str, body: &Value) -> Reply {
        self.post_raw(path, body.to_string()).await
    }

    /// GET `path`.
    pub async fn get(&self, path: &str) -> (u16, String) {
        let r = self.auth(self.http.get(format!("{}{path}", self.base)));
        let r = r.send().await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    /// POST a streaming request; the response, to read chunk by chunk.
    pub async fn stream(&self, path: &str, body: &Value) -> reqwest::Response {
        let mut b = body.clone();
        b["stream"] = json!(true);
        let r = self.auth(self.http.post(format!("{}{path}", self.base)).json(&b));
        r.send().await.unwrap()
    }

    /// POST a streaming request and read it to the end: its `data:` payloads.
    pub async fn stream_all(&self, path: &str, body: &Value) -> (u16, Vec<String>) {
        let r = self.stream(path, body).await;
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (status, sse_data(&text))
    }

    /// A metric's value from `/metrics` (the first sample named `name`).
    pub async fn metric(&self, name: &str) -> f64 {
        let (_, text) = self.get("/metrics").await;
        text.lines()
            .find_map(|l| {
                let (n, v) = l.rsplit_once(' ')?;
                (n == name).then(|| v.parse().unwrap())
            })
            .unwrap_or(0.0)
    }
}

async fn read(r: reqwest::Response) -> Reply {
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let text = r.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Reply {
        status,
        headers,
        body,
    }
}

/// The `data:` payloads of a server-sent event stream.
pub fn sse_data(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
        .map(str::to_string)
        .collect()
}

/// The text of a streamed answer (chat deltas or completion texts).
pub fn streamed_text(data: &[String]) -> String {
    data.iter()
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| {
            let v: Value = serde_json::from_str(d).unwrap();
            let c = v["choices"].get(0)?.clone();
            c["delta"]["content"]
                .as_str()
                .or(c["text"].as_str())
                .map(str::to_string)
        })
        .collect()
}

/// The text of a whole answer.
pub fn answer_text(v: &Value) -> String {
    let c = &v["choices"][0];
    c["message"]["content"]
        .as_str()
        .or(c["text"].as_str())
        .unwrap_or_else(|| panic!("no text in {v}"))
        .to_string()
}
