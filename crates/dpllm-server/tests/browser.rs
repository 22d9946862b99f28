//! The built-in web page in a real headless browser (Debian's chromium and
//! chromedriver, driven over the WebDriver protocol): it loads, offers the
//! model's operating points, sends a message and shows a streamed answer
//! with its operating point and effective bits. Skips with a message when
//! chromium or chromedriver is missing.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// WebDriver's key of an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A chromedriver process, killed on drop.
struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One WebDriver session.
struct Session {
    http: reqwest::Client,
    base: String,
}

impl Session {
    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut r = self.http.request(method, format!("{}{path}", self.base));
        if let Some(b) = body {
            r = r.json(&b);
        }
        let v: Value = r.send().await.unwrap().json().await.unwrap();
        assert!(!v["value"]["error"].is_string(), "WebDriver {path}: {v}");
        v["value"].clone()
    }

    async fn post(&self, path: &str, body: Value) -> Value {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }

    async fn find(&self, css: &str) -> String {
        let v = self
            .post("/element", json!({"using": "css selector", "value": css}))
            .await;
        v[ELEMENT]
            .as_str()
            .unwrap_or_else(|| panic!("no element {css}: {v}"))
            .to_string()
    }

    async fn script(&self, js: &str) -> Value {
        self.post("/execute/sync", json!({"script": js, "args": []}))
            .await
    }

    /// Run `js` until it returns something truthy, or fail after `secs`.
    async fn wait_for(&self, js: &str, secs: u64) -> Value {
        let t = Instant::now();
        loop {
            let v = self.script(js).await;
            if !(v.is_null() || v == json!(false) || v == json!("")) {
                return v;
            }
            assert!(
                t.elapsed() < Duration::from_secs(secs),
                "timed out waiting for: {js}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_page_streams_a_chat_answer_in_a_real_browser() {
    if !std::path::Path::new(CHROMIUM).exists() || !std::path::Path::new(CHROMEDRIVER).exists() {
        eprintln!("SKIP: {CHROMIUM} or {CHROMEDRIVER} not found (apt-get install chromium chromium-driver)");
        return;
    }
    let f = common::quantized();
    let s = common::start(&f.model, Some(common::BUDGET), common::config());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let _driver = Driver(
        Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let http = reqwest::Client::new();
    let root = format!("http://127.0.0.1:{port}");
    let t = Instant::now();
    while http.get(format!("{root}/status")).send().await.is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "chromedriver did not start"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let profile = tempfile::tempdir().unwrap();
    let caps = json!({"capabilities": {"alwaysMatch": {
        "browserName": "chrome",
        "goog:chromeOptions": {"binary": CHROMIUM, "args": [
            "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync",
            format!("--user-data-dir={}", profile.path().display()),
        ]},
    }}});
    let v: Value = http
        .post(format!("{root}/session"))
        .json(&caps)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = v["value"]["sessionId"]
        .as_str()
        .unwrap_or_else(|| panic!("no WebDriver session: {v}"))
        .to_string();
    let b = Session {
        http: http.clone(),
        base: format!("{root}/session/{id}"),
    };
    b.post("/url", json!({"url": format!("http://{}/", s.addr)}))
        .await;
    // The page read /v1/models: the model's name and its DP-LLM targets.
    b.wait_for(
        "return document.getElementById('model-name').textContent",
        10,
    )
    .await;
    b.script(
        "const k = document.getElementById('point-kind'); k.value = 'target_bits';\
         k.dispatchEvent(new Event('change')); document.getElementById('max-tokens').value = '24';",
    )
    .await;
    let targets = b
        .script("return [...document.querySelectorAll('#point-choice option')].map(o => o.value)")
        .await;
    assert_eq!(targets, json!(["3.5", "4.5"]));
    let prompt = b.find("#prompt").await;
    b.post(
        &format!("/element/{prompt}/value"),
        json!({"text": "Hello, model"}),
    )
    .await;
    let send = b.find("#send").await;
    b.post(&format!("/element/{send}/click"), json!({})).await;
    b.wait_for(
        "const m = document.querySelector('.msg.assistant'); return m && m.dataset.done",
        30,
    )
    .await;
    let got = b
        .script(
            "const m = document.querySelector('.msg.assistant');\
             return {text: m.querySelector('.text').textContent, meta: m.querySelector('.meta').textContent,\
                     chunks: Number(m.dataset.chunks), error: m.classList.contains('error'),\
                     user: document.querySelector('.msg.user').textContent}",
        )
        .await;
    assert_eq!(got["error"], false, "{got}");
    assert_eq!(got["user"], "Hello, model");
    assert!(!got["text"].as_str().unwrap().is_empty(), "{got}");
    assert!(
        got["chunks"].as_u64().unwrap() > 1,
        "streamed in pieces: {got}"
    );
    let meta = got["meta"].as_str().unwrap();
    assert!(
        meta.contains("target 3.5") && meta.contains("effective bits"),
        "{meta}"
    );
    b.call(reqwest::Method::DELETE, "", None).await;
    s.shutdown().unwrap();
}
