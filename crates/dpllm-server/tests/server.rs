//! The real server on a loopback port, driven over HTTP: answers whole and
//! streamed, operating points, concurrent requests batched together, the
//! bounded queue, cancellation, authentication, bad input and shutdown.

mod common;

use std::time::{Duration, Instant};

use common::{answer_text, greedy, streamed_text, Client};
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_whole_and_streamed_agree_and_report_their_operating_point() {
    let f = common::quantized();
    let s = common::start(&f.model, Some(common::BUDGET), common::config());
    let c = Client::new(&s);
    for (path, prompt) in [
        ("/v1/completions", json!({"prompt": "hello there"})),
        (
            "/v1/chat/completions",
            json!({"messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hello there"}]},
            ]}),
        ),
    ] {
        let mut body = greedy(24, json!({"dpllm": {"target_bits": 3.5}}));
        for (k, v) in prompt.as_object().unwrap() {
            body[k] = v.clone();
        }
        let whole = c.post(path, &body).await;
        assert_eq!(whole.status, 200, "{path}: {}", whole.body);
        let v = &whole.body;
        let text = answer_text(v);
        assert!(!text.is_empty(), "{v}");
        assert_eq!(v["choices"][0]["finish_reason"], "length", "{v}");
        assert_eq!(v["usage"]["completion_tokens"], 24, "{v}");
        let prompt_tokens = v["usage"]["prompt_tokens"].as_u64().unwrap();
        assert!(prompt_tokens > 2, "{v}");
        assert_eq!(v["usage"]["total_tokens"], prompt_tokens + 24);
        assert_eq!(v["dpllm"]["operating_point"], "target 3.5", "{v}");
        let bits = v["dpllm"]["effective_bits"].as_f64().unwrap();
        assert!((3.0..=4.0).contains(&bits), "{v}");
        assert!(v["dpllm"]["ms_per_token"].as_f64().unwrap() > 0.0, "{v}");
        // The same request streamed: the same text in pieces, then the finish
        // chunk, the usage chunk and [DONE].
        body["stream_options"] = json!({"include_usage": true});
        let (status, data) = c.stream_all(path, &body).await;
        assert_eq!(status, 200);
        assert_eq!(streamed_text(&data), text, "{path}: {data:?}");
        assert_eq!(data.last().unwrap(), "[DONE]");
        let usage: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
        assert_eq!(usage["usage"]["completion_tokens"], 24, "{usage}");
        let fin: Value = serde_json::from_str(&data[data.len() - 3]).unwrap();
        assert_eq!(fin["choices"][0]["finish_reason"], "length", "{fin}");
        assert_eq!(fin["dpllm"]["effective_bits"].as_f64().unwrap(), bits);
        assert!(data.len() > 5, "streamed in pieces: {data:?}");
    }
    // Uniform bits run at exactly those bits; a stop string ends the answer
    // before it and is not included.
    let v = c
        .post(
            "/v1/completions",
            &greedy(16, json!({"prompt": "abc", "dpllm": {"bits": 4}})),
        )
        .await
        .body;
    assert_eq!(v["dpllm"]["effective_bits"].as_f64(), Some(4.0), "{v}");
    let text = answer_text(&v);
    let stop: String = text.chars().skip(3).take(2).collect();
    let before = &text[..text.find(&stop).unwrap()];
    let v = c
        .post(
            "/v1/completions",
            &greedy(
                16,
                json!({"prompt": "abc", "dpllm": {"bits": 4}, "stop": [stop]}),
            ),
        )
        .await
        .body;
    assert_eq!(answer_text(&v), before, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let (status, models) = c.get("/v1/models").await;
    assert_eq!(status, 200);
    let m: Value = serde_json::from_str(&models).unwrap();
    assert_eq!(m["data"][0]["id"], "tiny");
    assert_eq!(m["data"][0]["dpllm"]["targets"], json!([3.5, 4.5]), "{m}");
    assert_eq!(m["data"][0]["dpllm"]["bits"], json!([3, 4, 5]), "{m}");
    s.shutdown().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_at_different_targets_get_what_each_gets_alone() {
    let f = common::quantized();
    let cfg = dpllm_server::ServerConfig {
        max_batch: 4,
        ..common::config()
    };
    let s = common::start(&f.model, Some(common::BUDGET), cfg);
    let c = Client::new(&s);
    let points = [
        json!({"target_bits": 3.5}),
        json!({"target_bits": 4.5}),
        json!({"bits": 3}),
        json!({"target_bits": 3.5}),
    ];
    let body = |i: usize| {
        greedy(
            120,
            json!({"prompt": format!("request number {i}"), "dpllm": points[i]}),
        )
    };
    let mut alone = Vec::new();
    for i in 0..points.len() {
        let v = c.post("/v1/completions", &body(i)).await.body;
        alone.push((answer_text(&v), v["dpllm"]["effective_bits"].clone()));
    }
    assert_ne!(alone[0].1, alone[1].1, "the targets must differ");
    let steps = c.metric("dpllm_batch_size_count").await;
    let rows = c.metric("dpllm_batch_size_sum").await;
    assert_eq!(steps, rows, "alone, every step runs one request");
    for _ in 0..2 {
        let together = futures_util::future::join_all((0..points.len()).map(|i| {
            let c = &c;
            async move { c.post("/v1/completions", &body(i)).await.body }
        }))
        .await;
        for (i, v) in together.iter().enumerate() {
            assert_eq!(
                (answer_text(v), v["dpllm"]["effective_bits"].clone()),
                alone[i],
                "request {i} in a batch must get what it gets alone"
            );
        }
    }
    let steps = c.metric("dpllm_batch_size_count").await - steps;
    let rows = c.metric("dpllm_batch_size_sum").await - rows;
    assert!(
        rows > 1.5 * steps,
        "concurrent requests must decode together: {rows} request-steps in {steps} steps"
    );
    let (_, metrics) = c.get("/metrics").await;
    for name in [
        "dpllm_http_requests_total{route=\"/v1/completions\",status=\"200\"}",
        "dpllm_time_to_first_token_seconds_bucket",
        "dpllm_time_per_output_token_seconds_count",
        "dpllm_effective_bits_bucket{le=\"3.5\",point=\"target 3.5\"}",
        "dpllm_queue_depth 0",
    ] {
        assert!(metrics.contains(name), "{name} missing from:\n{metrics}");
    }
    s.shutdown().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_queue_answers_429_with_retry_after() {
    let f = common::slow();
    let cfg = dpllm_server::ServerConfig {
        max_batch: 1,
        max_queue: 1,
        ..common::config()
    };
    let s = common::start(&f.model, None, cfg);
    let c = Client::new(&s);
    // One request runs (the batch holds one)...
    let mut running = c
        .stream("/v1/completions", &greedy(2000, json!({"prompt": "first"})))
        .await;
    running.chunk().await.unwrap().unwrap();
    // ...so of six more, one waits in the queue and five are refused.
    let replies = futures_util::future::join_all((0..6).map(|i| {
        let c = &c;
        async move {
            c.post(
                "/v1/completions",
                &greedy(20, json!({"prompt": format!("p{i}")})),
            )
            .await
        }
    }))
    .await;
    let refused: Vec<_> = replies.iter().filter(|r| r.status == 429).collect();
    let served = replies.iter().filter(|r| r.status == 200).count();
    assert_eq!((served, refused.len()), (1, 5), "one queued place");
    drop(running);
    for r in refused {
        assert_eq!(r.body["error"]["type"], "rate_limit_error", "{}", r.body);
        let after: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
        assert!((1..=60).contains(&after));
    }
    s.shutdown().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_goes_away_cancels_its_request() {
    let f = common::slow();
    let s = common::start(&f.model, None, common::config());
    let c = Client::new(&s);
    let mut r = c
        .stream("/v1/completions", &greedy(4000, json!({"prompt": "go"})))
        .await;
    assert_eq!(r.status(), 200);
    let first = r.chunk().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("data:"));
    assert_eq!(s.load().1, 1, "the request is running");
    drop(r);
    let t = Instant::now();
    while s.load().1 > 0 {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the request went on after its client left"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(c.metric("dpllm_cancelled_requests_total").await, 1.0);
    assert!(c.metric("dpllm_generated_tokens_total").await < 4000.0);
    s.shutdown().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_key_guards_every_route_but_health_and_the_page() {
    let f = common::quantized();
    let cfg = dpllm_server::ServerConfig {
        api_key: Some("s3cret".into()),
        ..common::config()
    };
    let s = common::start(&f.model, Some(common::BUDGET), cfg);
    let mut c = Client::new(&s);
    let body = greedy(2, json!({"prompt": "hi"}));
    for key in [None, Some("wrong"), Some("s3cret-but-longer")] {
        c.key = key.map(str::to_string);
        let r = c.post("/v1/completions", &body).await;
        assert_eq!(r.status, 401, "{key:?}: {}", r.body);
        assert_eq!(r.body["error"]["type"], "authentication_error");
        assert_eq!(c.get("/v1/models").await.0, 401);
        assert_eq!(c.get("/metrics").await.0, 401);
        assert_eq!(c.get("/health").await.0, 200);
        let (status, page) = c.get("/").await;
        assert_eq!(status, 200);
        assert!(page.contains("<html"), "the web page");
    }
    c.key = Some("s3cret".into());
    assert_eq!(c.post("/v1/completions", &body).await.status, 200);
    assert_eq!(c.get("/v1/models").await.0, 200);
    s.shutdown().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_a_clear_4xx_and_the_server_goes_on() {
    let f = common::quantized();
    let cfg = dpllm_server::ServerConfig {
        limits: dpllm_server::Limits {
            max_body_bytes: 4096,
            max_prompt_tokens: 40,
            ..Default::default()
        },
        ..common::config()
    };
    let s = common::start(&f.model, Some(common::BUDGET), cfg);
    let c = Client::new(&s);
    let chat = "/v1/chat/completions";
    let cmpl = "/v1/completions";
    let cases: Vec<(&str, String, u16, &str)> = vec![
        (cmpl, "{not json".into(), 400, "invalid JSON"),
        (cmpl, "".into(), 400, "invalid JSON"),
        (cmpl, "[1, 2]".into(), 400, "invalid JSON"),
        (cmpl, json!({"max_tokens": 3}).to_string(), 400, "prompt"),
        (cmpl, json!({"prompt": 5}).to_string(), 400, "prompt"),
        (
            cmpl,
            json!({"prompt": "x", "temperature": "hot"}).to_string(),
            400,
            "temperature",
        ),
        (
            cmpl,
            json!({"prompt": "x", "max_tokens": -1}).to_string(),
            400,
            "max_tokens",
        ),
        (
            cmpl,
            json!({"prompt": "x", "max_tokens": 0}).to_string(),
            400,
            "max_tokens",
        ),
        (
            cmpl,
            json!({"prompt": "x", "top_p": 0}).to_string(),
            400,
            "top_p",
        ),
        (
            cmpl,
            json!({"prompt": "x", "n": 3}).to_string(),
            400,
            "n = 1",
        ),
        (
            cmpl,
            json!({"prompt": ["a", "b"]}).to_string(),
            400,
            "one prompt",
        ),
        (
            cmpl,
            json!({"prompt": "x".repeat(200)}).to_string(),
            400,
            "at most 40",
        ),
        (
            cmpl,
            json!({"prompt": "x", "logit_bias": {"999": 1}}).to_string(),
            400,
            "vocabulary",
        ),
        (
            cmpl,
            json!({"prompt": "x", "dpllm": {"target_bits": 4.0}}).to_string(),
            400,
            "calibrated targets: [3.5, 4.5]",
        ),
        (
            cmpl,
            json!({"prompt": "x", "dpllm": {"bits": 7}}).to_string(),
            400,
            "not loaded",
        ),
        (
            cmpl,
            json!({"prompt": "x", "dpllm": {"bits": 2}}).to_string(),
            400,
            "3..=8",
        ),
        (
            cmpl,
            json!({"prompt": "x", "dpllm": {"watts": 2}}).to_string(),
            400,
            "dpllm",
        ),
        (
            cmpl,
            json!({"prompt": "x".repeat(5000)}).to_string(),
            413,
            "length limit",
        ),
        (
            chat,
            json!({"messages": []}).to_string(),
            400,
            "must not be empty",
        ),
        (
            chat,
            json!({"messages": [{"content": "hi"}]}).to_string(),
            400,
            "role",
        ),
        (
            chat,
            json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}).to_string(),
            400,
            "only text",
        ),
    ];
    for (path, body, status, needle) in cases {
        let r = c.post_raw(path, body.clone()).await;
        assert_eq!(r.status, status, "{body:.80}: {}", r.body);
        let msg = r.body["error"]["message"]
            .as_str()
            .unwrap_or_else(|| panic!("{}", r.body));
        assert!(msg.contains(needle), "{body:.80}: {msg}");
        assert_eq!(
            r.body["error"]["type"], "invalid_request_error",
            "{}",
            r.body
        );
    }
    let (status, body) = c.get("/v1/nothing").await;
    assert_eq!(status, 404, "{body}");
    // Malformed HTTP on a raw connection: a 400, and the server goes on.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    tcp.write_all(b"GARBAGE \x01\x02 NOT-HTTP\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut out)).await;
    assert!(
        String::from_utf8_lossy(&out).starts_with("HTTP/1.1 400"),
        "{out:?}"
    );
    let r = c
        .post(cmpl, &greedy(3, json!({"prompt": "still here"})))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(c.get("/health").await.0, 200);
    s.shutdown().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_latency_budget_picks_the_best_point_that_meets_it() {
    let f = common::quantized();
    let s = common::start(&f.model, Some(common::BUDGET), common::config());
    let c = Client::new(&s);
    let (_, models) = c.get("/v1/models").await;
    let m: Value = serde_json::from_str(&models).unwrap();
    let profile = m["data"][0]["dpllm"]["latency_profile"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(profile.len(), 6, "highest, 3/4/5 bits, two targets: {m}");
    let slowest = (profile.iter())
        .map(|l| l["ms_per_token"].as_f64().unwrap())
        .fold(0.0, f64::max);
    let ask = |ms: f64| greedy(4, json!({"prompt": "x", "dpllm": {"max_ms_per_token": ms}}));
    let v = c.post("/v1/completions", &ask(100.0 * slowest)).await.body;
    assert_eq!(v["dpllm"]["operating_point"], "highest", "{v}");
    assert_eq!(v["dpllm"]["latency_met"], true, "{v}");
    let v = c.post("/v1/completions", &ask(1e-6)).await.body;
    assert_eq!(v["dpllm"]["latency_met"], false, "{v}");
    let fastest = (profile.iter())
        .min_by(|a, b| {
            a["ms_per_token"]
                .as_f64()
                .unwrap()
                .total_cmp(&b["ms_per_token"].as_f64().unwrap())
        })
        .unwrap();
    assert_eq!(
        v["dpllm"]["operating_point"], fastest["operating_point"],
        "{v}"
    );
    s.shutdown().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_the_requests_in_flight_and_refuses_new_ones() {
    let f = common::slow();
    let s = common::start(&f.model, None, common::config());
    let c = Client::new(&s);
    let addr = s.addr;
    let mut r = c
        .stream("/v1/completions", &greedy(200, json!({"prompt": "go"})))
        .await;
    let mut text = String::from_utf8_lossy(&r.chunk().await.unwrap().unwrap()).into_owned();
    let stopper = tokio::task::spawn_blocking(move || s.shutdown());
    while let Some(chunk) = r.chunk().await.unwrap() {
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    stopper.await.unwrap().unwrap();
    let data = common::sse_data(&text);
    assert_eq!(data.last().unwrap(), "[DONE]");
    let fin: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert_eq!(
        fin["choices"][0]["finish_reason"], "length",
        "finished, not cut: {fin}"
    );
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "no longer listening"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_openai_python_client_works_against_it() {
    let has_client = std::process::Command::new("python3")
        .args(["-c", "import openai"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_client {
        eprintln!("SKIP: python3 with the `openai` package not found (pip install openai)");
        return;
    }
    let f = common::quantized();
    let cfg = dpllm_server::ServerConfig {
        api_key: Some("k".into()),
        ..common::config()
    };
    let s = common::start(&f.model, Some(common::BUDGET), cfg);
    let script = format!(
        r#"
import json, openai
c = openai.OpenAI(base_url="http://{addr}/v1", api_key="k")
ban = {{"257": -100}}
r = c.chat.completions.create(model="tiny", messages=[{{"role": "user", "content": "hi"}}],
    max_tokens=8, temperature=0, logit_bias=ban, extra_body={{"dpllm": {{"target_bits": 3.5}}}})
s = c.chat.completions.create(model="tiny", messages=[{{"role": "user", "content": "hi"}}],
    max_tokens=8, temperature=0, logit_bias=ban, stream=True, extra_body={{"dpllm": {{"target_bits": 3.5}}}})
streamed = "".join(ch.choices[0].delta.content or "" for ch in s if ch.choices)
t = c.completions.create(model="tiny", prompt="abc", max_tokens=5, temperature=0, logit_bias=ban)
m = c.models.list()
try:
    openai.OpenAI(base_url="http://{addr}/v1", api_key="bad").models.list()
    denied = False
except openai.AuthenticationError:
    denied = True
print(json.dumps({{"chat": r.choices[0].message.content, "tokens": r.usage.completion_tokens,
    "bits": r.model_extra["dpllm"]["effective_bits"], "streamed": streamed,
    "text": t.choices[0].text, "model": m.data[0].id, "denied": denied}}))
"#,
        addr = s.addr
    );
    let out = tokio::process::Command::new("python3")
        .args(["-c", &script])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["tokens"], 8, "{v}");
    assert!(!v["chat"].as_str().unwrap().is_empty(), "{v}");
    assert_eq!(v["streamed"], v["chat"], "{v}");
    assert!((3.0..=4.0).contains(&v["bits"].as_f64().unwrap()), "{v}");
    assert!(!v["text"].as_str().unwrap().is_empty(), "{v}");
    assert_eq!(v["model"], "tiny");
    assert_eq!(v["denied"], true);
    s.shutdown().unwrap();
}

/// Chunked prefill: while a long prompt runs, a request already decoding
/// goes on decoding, a step between every chunk, instead of waiting for the
/// whole prompt.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_long_prompt_runs_in_chunks_between_the_batch_steps() {
    let f = common::slow();
    let chunk = 16;
    let cfg = dpllm_server::ServerConfig {
        prefill_chunk: chunk,
        ..common::config()
    };
    let s = common::start(&f.model, None, cfg);
    let c = Client::new(&s);
    let mut a = c
        .stream("/v1/completions", &greedy(4000, json!({"prompt": "go"})))
        .await;
    assert_eq!(a.status(), 200);
    a.chunk().await.unwrap().unwrap();
    let steps = c.metric("dpllm_batch_size_count").await;
    let long = "the quick brown fox jumps over the lazy dog ".repeat(60);
    let b = c
        .post("/v1/completions", &greedy(1, json!({"prompt": long})))
        .await;
    assert_eq!(b.status, 200, "{}", b.body);
    let prompt = b.body["usage"]["prompt_tokens"].as_u64().unwrap() as f64;
    assert!(prompt >= 1000.0, "a long prompt: {prompt} tokens");
    let during = c.metric("dpllm_batch_size_count").await - steps;
    // Whole prompts would leave the decoding request a handful of steps
    // (those while the HTTP request and its tokenizing ran).
    assert!(
        during >= prompt / chunk as f64 - 2.0,
        "{during} decode steps while a {prompt}-token prompt ran in chunks of {chunk}"
    );
    // Every prompt token counted once ("go" is a token or a few).
    let counted = c.metric("dpllm_prompt_tokens_total").await - prompt;
    assert!(
        (1.0..=8.0).contains(&counted),
        "{counted} beside the long prompt"
    );
    drop(a);
    s.shutdown().unwrap();
}
