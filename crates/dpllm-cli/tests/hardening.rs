//! Hostile-but-realistic use of the `dpllm` binary (issue: hardening): outputs
//! that overlap inputs or belong to the user, caches made from other inputs,
//! extreme and non-finite weights, absurd arguments, interrupts, and checks that
//! must happen before the long work. Every case must end in a clear error (or a
//! correct result), never data loss, a panic, a hang or a wrong answer.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{
    check_fails, command, dpllm_within, entries, fails, hidden, ok, s, sample_text, stderr, tiny,
};
use dpllm_testkit::{edit_tensor, write_tiny_model, TinySpec};
use safetensors::Dtype;

/// Every file under `dir` with its content, for before/after comparisons.
fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            v.extend(snapshot(&p).into_iter().map(|(n, b)| {
                (
                    format!("{}/{n}", p.file_name().unwrap().to_string_lossy()),
                    b,
                )
            }));
        } else {
            v.push((
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            ));
        }
    }
    v.sort();
    v
}

// ------------------------------------------------ 1. --force never deletes what dpllm did not write

#[test]
fn force_never_replaces_the_source_its_ancestors_or_foreign_directories() {
    let (t, m) = tiny(&TinySpec::default(), 1);
    let notes = t.path().join("notes.txt");
    std::fs::write(&notes, "the user's own file").unwrap();
    let before = snapshot(t.path());
    fails(
        &["quantize", s(&m), "--out", s(&m), "--force"],
        &["is an input"],
    );
    fails(
        &["quantize", s(&m), "--out", s(t.path()), "--force"],
        &["contains an input"],
    );
    fails(
        &[
            "quantize",
            s(&m),
            "--out",
            &format!("{}/../model", s(&m)),
            "--force",
        ],
        &["is an input"],
    );
    assert_eq!(
        snapshot(t.path()),
        before,
        "a refused --force changed files"
    );

    // A directory dpllm did not write, and a file where a directory would go.
    let mine = t.path().join("mine");
    std::fs::create_dir(&mine).unwrap();
    std::fs::write(mine.join("thesis.tex"), "years of work").unwrap();
    fails(
        &["quantize", s(&m), "--out", s(&mine), "--force"],
        &["not written by dpllm"],
    );
    fails(
        &["quantize", s(&m), "--out", s(&notes), "--force"],
        &["is a file"],
    );
    assert_eq!(
        std::fs::read_to_string(mine.join("thesis.tex")).unwrap(),
        "years of work"
    );
    assert_eq!(
        std::fs::read_to_string(&notes).unwrap(),
        "the user's own file"
    );

    // dpllm's own output is replaced with --force, but not once the user put files into it.
    let q = t.path().join("q");
    ok(&["quantize", s(&m), "--out", s(&q)]);
    ok(&["quantize", s(&m), "--out", s(&q), "--force"]);
    std::fs::write(q.join("my-eval.csv"), "keep me").unwrap();
    fails(
        &["quantize", s(&m), "--out", s(&q), "--force"],
        &["my-eval.csv", "did not write"],
    );
    assert_eq!(
        std::fs::read_to_string(q.join("my-eval.csv")).unwrap(),
        "keep me"
    );
    // The quantized model is not a source, and cannot be its own output.
    fails(
        &["quantize", s(&q), "--out", s(&q), "--force"],
        &["is an input"],
    );
}

#[test]
fn result_files_never_overwrite_inputs_or_user_files() {
    let (t, m) = tiny(&TinySpec::default(), 2);
    let text = t.path().join("text.txt");
    std::fs::write(&text, sample_text()).unwrap();
    let weights = m.join("model.safetensors");
    let before = std::fs::read(&weights).unwrap();
    let run = ["--text", s(&text), "--ctx", "32", "--max-chunks", "1"];
    fails(
        &[&["perplexity", s(&m)][..], &run, &["--json", s(&text)]].concat(),
        &["is an input"],
    );
    fails(
        &[&["perplexity", s(&m)][..], &run, &["--json", s(&weights)]].concat(),
        &["not a JSON results file written by dpllm"],
    );
    fails(
        &[
            "sensitivity",
            s(&m),
            "--calib",
            s(&text),
            "--samples",
            "1",
            "--seq-len",
            "16",
            "--out",
            s(&weights),
        ],
        &["model.safetensors"],
    );
    fails(
        &[
            "sensitivity",
            s(&m),
            "--calib",
            s(&text),
            "--samples",
            "1",
            "--seq-len",
            "16",
            "--out",
            s(&text),
        ],
        &["is an input"],
    );
    assert_eq!(
        std::fs::read(&weights).unwrap(),
        before,
        "the source weights changed"
    );
    assert_eq!(std::fs::read_to_string(&text).unwrap(), sample_text());

    // A JSON file of the user's is kept; dpllm's own result is refreshed by the next run.
    let user = t.path().join("user.json");
    std::fs::write(&user, "{\"mine\": true}").unwrap();
    fails(
        &[&["perplexity", s(&m)][..], &run, &["--json", s(&user)]].concat(),
        &["user.json", "not a JSON results file written by dpllm"],
    );
    assert_eq!(std::fs::read_to_string(&user).unwrap(), "{\"mine\": true}");
    let out = t.path().join("ppl.json");
    ok(&[&["perplexity", s(&m)][..], &run, &["--json", s(&out)]].concat());
    ok(&[&["perplexity", s(&m)][..], &run, &["--json", s(&out)]].concat());
    assert!(common::json_file(&out)["dpllm_version"].is_string());
    let sens = t.path().join("sens.safetensors");
    for _ in 0..2 {
        ok(&[
            "sensitivity",
            s(&m),
            "--calib",
            s(&text),
            "--samples",
            "1",
            "--seq-len",
            "16",
            "--out",
            s(&sens),
        ]);
    }
}

// ------------------------------------------------ 2. caches never mix inputs

#[test]
fn pipeline_reuses_only_stages_made_from_the_same_inputs() {
    let (t, m) = tiny(&TinySpec::default(), 3);
    let other = t.path().join("other");
    write_tiny_model(&other, &TinySpec::default(), 4).unwrap();
    let text = t.path().join("text.txt");
    std::fs::write(&text, sample_text()).unwrap();
    let work = t.path().join("work");
    let args = |model: &Path, samples: &str| -> Vec<String> {
        [
            "pipeline",
            s(model),
            "--work",
            s(&work),
            "--text",
            s(&text),
            "--calib",
            s(&text),
            "--ctx",
            "32",
            "--max-chunks",
            "1",
            "--sensitivity-samples",
            samples,
            "--samples",
            "2",
            "--seq-len",
            "32",
            "--epochs",
            "1",
            "--estimator-samples",
            "2",
            "--jl-steps",
            "10",
            "--jl-k",
            "4",
            "--budget",
            "4.5",
            "--max-bits",
            "5",
            "--targets",
            "4",
        ]
        .iter()
        .map(|x| x.to_string())
        .collect()
    };
    let run = |a: &[String]| ok(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let (table, _) = run(&args(&m, "2"));
    let (again, err) = run(&args(&m, "2"));
    assert!(err.contains("reusing") && !err.contains("[1/3]"), "{err}");
    assert_eq!(table, again, "reused stages gave another table");

    // Another model into the same WORK: refused, naming what differs; recomputed with --force.
    let a = args(&other, "2");
    let av: Vec<&str> = a.iter().map(String::as_str).collect();
    fails(&av, &["made from other inputs", "source", "--force"]);
    let a = args(&m, "3");
    let av: Vec<&str> = a.iter().map(String::as_str).collect();
    fails(&av, &["made from other inputs", "sensitivity"]);
    let mut forced = args(&other, "2");
    forced.push("--force".into());
    let (table2, err) = run(&forced);
    assert!(
        err.contains("recomputing")
            && err.contains("[1/3]")
            && err.contains("[2/3]")
            && err.contains("[3/3]"),
        "{err}"
    );
    assert_ne!(table, table2, "a different model gave the same table");
    let (_, err) = run(&args(&other, "2"));
    assert!(err.contains("reusing") && !err.contains("[2/3]"), "{err}");
}

// ------------------------------------------------ 3. never a model that cannot load or a plan off its target

#[test]
fn weights_beyond_the_lut_range_are_refused_before_anything_is_written() {
    let (t, m) = tiny(
        &TinySpec {
            dtype: Dtype::BF16,
            ..TinySpec::default()
        },
        5,
    );
    edit_tensor(&m, "model.layers.1.self_attn.o_proj.weight", |v| {
        v[3] = 1.0e6
    })
    .unwrap();
    let q = t.path().join("q");
    fails(
        &["quantize", s(&m), "--out", s(&q)],
        &["model.layers.1.self_attn.o_proj.weight", "f16"],
    );
    assert_eq!(
        entries(t.path()),
        ["model"],
        "a refused quantization left files"
    );
    // The same magnitude in an unquantized tensor (kept as bf16) is fine.
    let (t2, m2) = tiny(
        &TinySpec {
            dtype: Dtype::BF16,
            ..TinySpec::default()
        },
        5,
    );
    edit_tensor(&m2, "model.embed_tokens.weight", |v| v[3] = 1.0e6).unwrap();
    ok(&["quantize", s(&m2), "--out", s(&t2.path().join("q"))]);
}

#[test]
fn a_quantized_model_that_does_not_load_back_is_never_published() {
    let (t, m) = tiny(&TinySpec::default(), 6);
    std::fs::write(m.join("tokenizer.json"), "{ not a tokenizer").unwrap();
    let q = t.path().join("q");
    fails(
        &["quantize", s(&m), "--out", s(&q)],
        &["does not load back"],
    );
    assert_eq!(entries(t.path()), ["model"]);
}

#[test]
fn calibration_settings_out_of_range_are_refused() {
    let common::Quantized {
        dir: _dir, text, q, ..
    } = common::tiny_quantized(7);
    let base = [
        "calibrate",
        s(&q),
        "--calib",
        s(&text),
        "--estimator-samples",
        "2",
    ];
    for (flag, value, phrase) in [
        ("--lr", "100", "--lr 100 is out of range"),
        ("--lr", "0", "--lr 0 is out of range"),
        ("--lr", "NaN", "--lr NaN is out of range"),
        ("--alpha", "-1", "--alpha -1 is out of range"),
        ("--alpha", "inf", "--alpha inf is out of range"),
        ("--epochs", "1000000", "--epochs 1000000 is out of range"),
        ("--jl-steps", "0", "--jl-steps 0 is out of range"),
        ("--jl-k", "100000", "--jl-k 100000 is out of range"),
        ("--min-bits", "9", "--min-bits 9 is out of range"),
        ("--seq-len", "100000", "--seq-len 100000 is out of range"),
        ("--samples", "0", "--samples 0 is out of range"),
    ] {
        let arg = format!("{flag}={value}");
        let mut args = [&base[..], &[arg.as_str()]].concat();
        for (f, v) in [("--samples", "2"), ("--seq-len", "32")] {
            if f != flag {
                args.extend([f, v]);
            }
        }
        fails(&args, &[phrase]);
    }
    fails(
        &[
            &base[..],
            &[
                "--samples",
                "2",
                "--seq-len",
                "32",
                "--min-bits",
                "6",
                "--max-bits",
                "5",
            ],
        ]
        .concat(),
        &["--max-bits 5 is out of range", "above --min-bits 6"],
    );
    assert!(
        !q.join("plans").exists(),
        "a refused calibration wrote plans"
    );
}

// ------------------------------------------------ 4. non-finite numbers are errors

#[test]
fn non_finite_weights_are_refused_where_they_are_read() {
    for (name, at) in [
        ("model.embed_tokens.weight", "[1, 2]"),
        ("model.layers.0.input_layernorm.weight", "[5]"),
        ("model.norm.weight", "[0]"),
    ] {
        let (t, m) = tiny(&TinySpec::default(), 8);
        let text = t.path().join("text.txt");
        std::fs::write(&text, sample_text()).unwrap();
        let idx = if name.contains("embed") {
            32 + 2
        } else if name.contains("layers") {
            5
        } else {
            0
        };
        edit_tensor(&m, name, |v| v[idx] = f32::NAN).unwrap();
        fails(
            &["generate", s(&m), "--prompt", "x", "--max-tokens", "2"],
            &[name, at, "finite"],
        );
        fails(
            &["perplexity", s(&m), "--text", s(&text), "--ctx", "32"],
            &[name],
        );
        fails(
            &["quantize", s(&m), "--out", s(&t.path().join("q"))],
            &[name],
        );
        assert!(!t.path().join("q").exists());
    }
}

#[test]
fn activations_that_overflow_are_an_error_naming_the_layer() {
    let (t, m) = tiny(
        &TinySpec {
            dtype: Dtype::F32,
            ..TinySpec::default()
        },
        9,
    );
    edit_tensor(&m, "model.layers.0.post_attention_layernorm.weight", |v| {
        v.iter_mut().for_each(|x| *x = 3.0e38)
    })
    .unwrap();
    let text = t.path().join("text.txt");
    std::fs::write(&text, sample_text()).unwrap();
    fails(
        &["perplexity", s(&m), "--text", s(&text), "--ctx", "32"],
        &["non-finite", "layer 0 (MLP output)", "chunk 0"],
    );
    fails(
        &["generate", s(&m), "--prompt", "hello", "--max-tokens", "3"],
        &["non-finite", "layer 0"],
    );
}

#[test]
fn configs_that_disagree_with_the_weights_are_errors() {
    let (t, m) = tiny(
        &TinySpec {
            layers: 3,
            ..TinySpec::default()
        },
        10,
    );
    let cfg = m.join("config.json");
    let mut v = common::json_file(&cfg);
    v["num_hidden_layers"] = 2.into();
    std::fs::write(&cfg, v.to_string()).unwrap();
    fails(
        &["generate", s(&m), "--prompt", "x"],
        &["num_hidden_layers is 2", "model.layers.2"],
    );
    fails(
        &["quantize", s(&m), "--out", s(&t.path().join("q"))],
        &["num_hidden_layers is 2"],
    );
    for eps in ["0", "-1e-6"] {
        v["num_hidden_layers"] = 3.into();
        v["rms_norm_eps"] = serde_json::from_str(eps).unwrap();
        std::fs::write(&cfg, v.to_string()).unwrap();
        fails(&["generate", s(&m), "--prompt", "x"], &["rms_norm_eps"]);
    }
}

// ------------------------------------------------ 5. no panics, aborts or hangs from arguments

#[test]
fn absurd_arguments_are_clear_errors_not_panics_or_hangs() {
    let (t, m) = tiny(
        &TinySpec {
            max_positions: 64,
            ..TinySpec::default()
        },
        11,
    );
    let limit = Duration::from_secs(60);
    let max = u64::MAX.to_string();
    let tokenizer = m.join("tokenizer.json");
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (
            vec!["bench", "gemv", "--shapes", "100000000000x4"],
            vec!["--shapes"],
        ),
        (
            vec![
                "bench",
                "gemv",
                "--shapes",
                "16777216x16777216",
                "--bandwidth-mib",
                "1",
            ],
            vec!["16777216x16777216", "memory"],
        ),
        (
            vec!["bench", "gemv", "--working-set-mib", &max],
            vec!["--working-set-mib", "too large"],
        ),
        (
            vec![
                "bench",
                "gemv",
                "--shapes",
                "64x64",
                "--bandwidth-mib",
                "1000000000",
            ],
            vec!["--bandwidth-mib", "memory"],
        ),
        (
            vec!["bench", "gemv", "--shapes", "64x64", "--seconds", "inf"],
            vec!["--seconds inf is out of range"],
        ),
        (
            vec!["bench", "gemv", "--shapes", "64x64", "--seconds", "NaN"],
            vec!["--seconds NaN is out of range"],
        ),
        (
            vec!["bench", "decode", s(&m), "--prompt-tokens", &max],
            vec!["exceed the model's context of 64"],
        ),
        // GPU benchmark settings are checked before any GPU is looked for.
        (
            vec!["bench", "gemv", "--device", "cuda", "--tokens", "9"],
            vec!["--tokens 9 is out of range 1..=8"],
        ),
        (
            vec!["bench", "gemv", "--device", "cuda", "--bits", "2"],
            vec!["--bits 2 is out of range 3..=8"],
        ),
        (
            vec!["bench", "gemv", "--device", "cuda", "--warps", "17"],
            vec!["--warps 17 is out of range 1..=16"],
        ),
        (
            vec!["bench", "gemv", "--device", "cuda", "--splits", "5"],
            vec!["--splits 5 is out of range 1..=4"],
        ),
        (
            vec!["bench", "gemv", "--device", "cuda", "--tables", "pairs,lut"],
            vec!["--tables", "unknown tables \"lut\"", "regs, pairs, entries"],
        ),
        // No driver (CI) or no such GPU: either way a clear error naming it.
        (
            vec!["generate", s(&m), "-p", "x", "--device", "cuda:7"],
            vec!["cuda:7", "--device"],
        ),
        (
            vec![
                "quantize",
                s(&m),
                "--out",
                "never-written",
                "--device",
                "cuda",
            ],
            vec![
                "without --calib quantize runs on the CPU only",
                "--device cpu",
            ],
        ),
        (
            vec![
                "sensitivity",
                s(&m),
                "--calib",
                s(&tokenizer),
                "--seq-len",
                "8",
                "--device",
                "cuda:7",
            ],
            vec!["cuda:7", "--device"],
        ),
        (
            vec![
                "perplexity",
                s(&m),
                "--text",
                s(&tokenizer),
                "--device",
                "tpu",
            ],
            vec!["unknown device", "cpu, cuda or cuda:N"],
        ),
        (
            vec!["generate", s(&m), "-p", "x", "--kv-cache", "f16"],
            vec!["--kv-cache f16 is for --device cuda", "f32"],
        ),
        (
            vec!["generate", s(&m), "-p", "x", "--kv-cache", "q8"],
            vec!["unknown KV cache type", "f32 or f16"],
        ),
        (
            vec!["bench", "decode", s(&m), "--tokens", &max],
            vec!["exceed the model's context of 64"],
        ),
        (
            vec!["bench", "decode", s(&m), "--bandwidth-mib", &max],
            vec!["--bandwidth-mib", "too large"],
        ),
        (
            vec![
                "sensitivity",
                s(&m),
                "--calib",
                s(&tokenizer),
                "--samples",
                "1000000000000",
            ],
            vec!["--samples 1000000000000 is out of range"],
        ),
    ];
    for (args, phrases) in cases {
        let o = dpllm_within(&args, limit);
        check_fails(&o, &args, &phrases);
    }
    // Thousands of threads: refused at once (exit 2), not a crawl.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_dpllm"))
        .args(["--threads", "10000", "inspect", s(&m)])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("--threads 10000 is out of range"),
        "{}",
        stderr(&o)
    );
    // A huge --max-tokens runs until the context is full.
    let (_, err) = ok(&[
        "generate",
        s(&m),
        "--prompt",
        "abc",
        "--max-tokens",
        &max,
        "--ignore-eos",
    ]);
    assert!(err.contains("stop: context full"), "{err}");
    drop(t);
}

// ------------------------------------------------ 6. interrupts leave nothing behind

/// A model big enough that quantizing it with --calib takes a few seconds.
fn slow_model() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let (t, m) = tiny(
        &TinySpec {
            hidden: 256,
            heads: 8,
            kv_heads: 4,
            intermediate: 768,
            layers: 4,
            ..TinySpec::default()
        },
        12,
    );
    let text = t.path().join("calib.txt");
    std::fs::write(&text, sample_text().repeat(8)).unwrap();
    (t, m, text)
}

/// Start `quantize` into DIR/q and wait until its staging directory exists.
fn start_quantize(dir: &Path, m: &Path, text: &Path) -> std::process::Child {
    let q = dir.join("q");
    let args = [
        "quantize",
        s(m),
        "--out",
        s(&q),
        "--calib",
        s(text),
        "--samples",
        "64",
        "--seq-len",
        "128",
    ];
    let mut child = command(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !hidden(dir).iter().any(|n| n.starts_with(".q.tmp-")) {
        assert!(
            child.try_wait().unwrap().is_none(),
            "quantize ended before it could be interrupted"
        );
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no staging directory appeared"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(200));
    child
}

#[test]
fn signals_remove_staging_and_temporary_files_and_exit_conventionally() {
    let (t, m, text) = slow_model();
    for (name, sig, code) in [
        ("SIGINT", libc::SIGINT, 130),
        ("SIGTERM", libc::SIGTERM, 143),
        ("SIGHUP", libc::SIGHUP, 129),
    ] {
        let child = start_quantize(t.path(), &m, &text);
        // SAFETY: sends a signal to our own child process, which has not been reaped yet.
        assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, sig) }, 0);
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(code), "{name}: {}", stderr(&out));
        assert!(stderr(&out).contains("interrupted"), "{}", stderr(&out));
        assert!(
            hidden(t.path()).is_empty(),
            "{name} left {:?}",
            hidden(t.path())
        );
        assert!(!t.path().join("q").exists());
    }
}

#[test]
fn the_next_run_removes_what_a_killed_run_left() {
    let (t, m, text) = slow_model();
    let mut child = start_quantize(t.path(), &m, &text);
    child.kill().unwrap(); // SIGKILL: no handler runs
    child.wait().unwrap();
    assert!(
        !hidden(t.path()).is_empty(),
        "SIGKILL should have left the staging directory"
    );
    ok(&["quantize", s(&m), "--out", s(&t.path().join("q"))]);
    assert!(
        hidden(t.path()).is_empty(),
        "stale staging kept: {:?}",
        hidden(t.path())
    );
}

// ------------------------------------------------ 7. check before the long work, and say the right thing

#[test]
fn outputs_are_checked_before_the_work_and_messages_say_what_is_wrong() {
    let common::Quantized {
        dir: t,
        model: m,
        text,
        q,
    } = common::tiny_quantized(13);
    // An existing --out is found before the sensitivities are computed.
    let err = fails(
        &[
            "quantize",
            s(&m),
            "--out",
            s(&q),
            "--calib",
            s(&text),
            "--samples",
            "2",
            "--seq-len",
            "16",
        ],
        &["already exists", "--force"],
    );
    assert!(
        !err.contains("calibration sequences"),
        "sensitivities were computed first:\n{err}"
    );
    // A --json whose directory is missing is found before the model loads.
    let json = t.path().join("missing").join("p.json");
    let err = fails(
        &["perplexity", s(&m), "--text", s(&text), "--json", s(&json)],
        &["cannot write", "does not exist"],
    );
    assert!(
        !err.contains("loaded"),
        "the model was loaded first:\n{err}"
    );
    fails(
        &["sensitivity", s(&m), "--calib", s(&text), "--out", s(&json)],
        &["does not exist"],
    );
    fails(
        &["bench", "gemv", "--shapes", "8x8", "--json", s(&json)],
        &["does not exist"],
    );
    // Wording: a file given as a model, an empty text, a directory given as a text.
    fails(
        &["inspect", s(&m.join("config.json"))],
        &["is a file, not a model directory"],
    );
    let empty = t.path().join("empty.txt");
    std::fs::write(&empty, "\n").unwrap();
    fails(
        &["perplexity", s(&m), "--text", s(&empty)],
        &["--text", "is empty"],
    );
    fails(
        &["perplexity", s(&m), "--text", s(t.path())],
        &["is a directory"],
    );
    let one = t.path().join("one.txt");
    std::fs::write(&one, "a").unwrap();
    fails(
        &["perplexity", s(&m), "--text", s(&one), "--ctx", "8"],
        &["only 2 tokens"],
    );
}
