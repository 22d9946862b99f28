//! `dpllm serve` and `dpllm bench serve` as a user runs them: the binary
//! starts, answers over HTTP, stops cleanly on SIGTERM, and refuses bad
//! settings with a clear message.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::Stdio;
use std::sync::mpsc;
use std::time::Duration;

use common::{fails, json_file, ok, s, tiny};
use dpllm_testkit::TinySpec;

/// One HTTP/1.1 request on a fresh connection; the whole response.
fn http(addr: &str, method: &str, path: &str, body: &str) -> String {
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        c,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out).unwrap();
    out
}

#[cfg(unix)]
#[test]
fn serve_answers_over_http_and_stops_on_sigterm() {
    let (_d, model) = tiny(&TinySpec::default(), 3);
    let mut child = common::command(&["serve", s(&model), "--port", "0", "--profile-tokens", "2"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let err = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            if let Some(a) = line.strip_prefix("listening on http://") {
                let _ = tx.send(a.split_whitespace().next().unwrap_or("").to_string());
            }
            all += &line;
            all.push('\n');
        }
        all
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(120))
        .expect("the server did not start listening");
    let health = http(&addr, "GET", "/health", "");
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    assert!(health.contains("\"status\":\"ok\""), "{health}");
    let r = http(
        &addr,
        "POST",
        "/v1/completions",
        r#"{"prompt": "hi", "max_tokens": 3, "temperature": 0}"#,
    );
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(r.contains("\"usage\""), "{r}");
    let page = http(&addr, "GET", "/", "");
    assert!(page.contains("<title>dpllm</title>"), "{page}");
    // SIGTERM: a graceful stop with exit code 0.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let t = std::time::Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "no exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let log = reader.join().unwrap();
    assert!(status.success(), "{status:?}\n{log}");
    assert!(log.contains("stopped"), "{log}");
    assert!(
        log.contains("ms/token"),
        "the latency profile is shown: {log}"
    );
}

#[test]
fn serve_refuses_bad_settings_clearly() {
    let (_d, model) = tiny(&TinySpec::default(), 3);
    let m = s(&model);
    fails(&["serve", m, "--bits", "9"], &["--bits 9", "out of range"]);
    fails(&["serve", m, "--max-ms-per-token", "-3"], &["positive"]);
    fails(&["serve", m, "--max-batch", "0"], &["--max-batch"]);
    fails(&["serve", "/nonexistent/model"], &["not found"]);
    // A dense model has no plans and no bit-widths to default to.
    fails(
        &["serve", m, "--port", "0", "--bits", "4"],
        &["not an any-precision model"],
    );
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port().to_string();
    fails(
        &["serve", m, "--port", &port, "--profile-tokens", "0"],
        &["cannot listen on 127.0.0.1:"],
    );
}

#[test]
fn bench_serve_reports_throughput_and_latency_per_point() {
    let (d, model) = tiny(&TinySpec::default(), 3);
    let json = d.path().join("serve.json");
    let (out, _) = ok(&[
        "bench",
        "serve",
        s(&model),
        "--clients",
        "2",
        "--secs",
        "1",
        "--request-tokens",
        "4",
        "--profile-tokens",
        "2",
        "--json",
        s(&json),
    ]);
    assert!(
        out.contains("tokens/s") && out.contains("| default |"),
        "{out}"
    );
    let v = json_file(&json);
    let p = &v["points"][0];
    assert!(p["requests"].as_u64().unwrap() > 0, "{v}");
    assert!(p["tokens_per_sec"].as_f64().unwrap() > 0.0, "{v}");
    assert!(p["ttft_ms"]["p50"].as_f64().unwrap() > 0.0, "{v}");
    assert_eq!(p["failed"], 0, "{v}");
    fails(
        &["bench", "serve", s(&model), "--points", "fast"],
        &["--points \"fast\""],
    );
}
