//! Helpers shared by the `dpllm` binary's test files: run the binary (with a
//! time limit, so a hang fails the test), require success or a clean failure,
//! and build tiny models in temporary directories.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use dpllm_testkit::{write_tiny_model, TinySpec};
use tempfile::TempDir;

/// Longest any single test invocation may run before it counts as a hang.
pub const TIME_LIMIT: Duration = Duration::from_secs(300);

/// `dpllm --threads 2 ARGS...` as a command, not started.
pub fn command(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_dpllm"));
    c.arg("--threads")
        .arg("2")
        .args(args)
        .env_remove("DPLLM_LOG")
        .stdin(Stdio::null());
    c
}

/// Run `dpllm --threads 2 ARGS...`, failing the test if it runs past `limit`.
pub fn dpllm_within(args: &[&str], limit: Duration) -> Output {
    let mut child = command(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start the dpllm binary");
    let start = Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("dpllm {args:?} did not finish within {limit:?} (hang?)");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

/// Run `dpllm --threads 2 ARGS...` within [`TIME_LIMIT`].
pub fn dpllm(args: &[&str]) -> Output {
    dpllm_within(args, TIME_LIMIT)
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Run and require success; returns (stdout, stderr).
pub fn ok(args: &[&str]) -> (String, String) {
    let o = dpllm(args);
    let (out, err) = (stdout(&o), stderr(&o));
    assert!(
        o.status.success(),
        "dpllm {args:?} failed ({:?})\nstdout:\n{out}\nstderr:\n{err}",
        o.status
    );
    (out, err)
}

/// Require a clean failure of `o` (non-zero, not a panic or abort, `error:` on
/// stderr containing every phrase); returns stderr.
pub fn check_fails(o: &Output, args: &[&str], phrases: &[&str]) -> String {
    let err = stderr(o);
    let code = o.status.code();
    assert!(
        !o.status.success(),
        "dpllm {args:?} should fail\nstdout:\n{}\nstderr:\n{err}",
        stdout(o)
    );
    assert!(
        code.is_some() && code != Some(101),
        "dpllm {args:?} exited with {code:?} (panic or signal?)\nstderr:\n{err}"
    );
    assert!(!err.contains("panicked"), "dpllm {args:?} panicked:\n{err}");
    assert!(
        err.contains("error:"),
        "dpllm {args:?}: no `error:` on stderr:\n{err}"
    );
    for p in phrases {
        assert!(
            err.contains(p),
            "dpllm {args:?}: stderr lacks {p:?}:\n{err}"
        );
    }
    err
}

/// Run and require a clean failure naming every phrase; returns stderr.
pub fn fails(args: &[&str], phrases: &[&str]) -> String {
    check_fails(&dpllm(args), args, phrases)
}

/// A temporary directory holding a tiny model written from `spec` in `DIR/model`.
pub fn tiny(spec: &TinySpec, seed: u64) -> (TempDir, PathBuf) {
    let t = tempfile::tempdir().unwrap();
    let m = t.path().join("model");
    write_tiny_model(&m, spec, seed).unwrap();
    (t, m)
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A few KB of English-like text.
pub fn sample_text() -> String {
    let words = [
        "the", "model", "reads", "a", "file", "and", "writes", "tokens", "to", "standard",
        "output", "while", "each", "layer", "keeps", "its", "cache", "of", "keys", "values", "for",
        "every", "position", "in", "context",
    ];
    let mut out = String::new();
    let mut x: u64 = 12345;
    while out.len() < 4096 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        out.push_str(words[(x >> 33) as usize % words.len()]);
        out.push(if (x >> 20).is_multiple_of(11) {
            '\n'
        } else {
            ' '
        });
    }
    out
}

pub fn json_file(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Names of the entries of `dir`, sorted.
pub fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Hidden entries of `dir` (dpllm's temporaries are hidden).
pub fn hidden(dir: &Path) -> Vec<String> {
    entries(dir)
        .into_iter()
        .filter(|n| n.starts_with('.'))
        .collect()
}

/// `calibrate` settings small enough for a test on a tiny model, calibrating on `text`.
pub fn small_calibration(text: &Path) -> [&str; 14] {
    [
        "--calib",
        s(text),
        "--samples",
        "3",
        "--seq-len",
        "32",
        "--epochs",
        "1",
        "--estimator-samples",
        "3",
        "--jl-steps",
        "20",
        "--jl-k",
        "8",
    ]
}

/// A tiny default model (`dir/model`), a sample text (`dir/text.txt`) and the
/// model quantized by `dpllm quantize` (`dir/q`).
pub struct Quantized {
    pub dir: TempDir,
    pub model: PathBuf,
    pub text: PathBuf,
    pub q: PathBuf,
}

/// [`Quantized`] for the tiny default model of `seed`.
pub fn tiny_quantized(seed: u64) -> Quantized {
    let (dir, model) = tiny(&TinySpec::default(), seed);
    let text = dir.path().join("text.txt");
    std::fs::write(&text, sample_text()).unwrap();
    let q = dir.path().join("q");
    ok(&["quantize", s(&model), "--out", s(&q)]);
    Quantized {
        dir,
        model,
        text,
        q,
    }
}
