//! `--device cuda` end to end: a quantized model and its DP-LLM plans give the
//! same perplexity and effective bits on the GPU as on the CPU, and generate
//! and bench decode run there. Skips with a message where there is no GPU.
#![cfg(feature = "cuda")]

mod common;

use common::{json_file, ok, s};

/// Perplexity and effective bits of `dpllm perplexity MODEL ARGS --device DEVICE`.
fn perplexity(q: &str, text: &str, json: &str, device: &str, args: &[&str]) -> (f64, f64) {
    let base = [
        "perplexity",
        q,
        "--text",
        text,
        "--ctx",
        "32",
        "--max-chunks",
        "3",
        "--json",
        json,
        "--device",
        device,
    ];
    // On the GPU an f32 KV cache, unless the test asks otherwise: results to f32 rounding.
    let kv: &[&str] = if device == "cpu" || args.contains(&"--kv-cache") {
        &[]
    } else {
        &["--kv-cache", "f32"]
    };
    let (_, err) = ok(&[&base[..], kv, args].concat());
    assert!(err.contains(&format!("on {device}")), "{err}");
    let v = json_file(std::path::Path::new(json));
    (
        v["perplexity"].as_f64().unwrap(),
        v["effective_bits"].as_f64().unwrap_or(0.0),
    )
}

#[test]
fn the_gpu_matches_the_cpu_from_quantized_model_to_dp_llm_plans() {
    if dpllm_engine::backend::cuda::test_device(0).is_none() {
        return;
    }
    let common::Quantized { dir, text, q, .. } = common::tiny_quantized(17);
    let small = common::small_calibration(&text);
    ok(&[
        &[
            "calibrate",
            s(&q),
            "--budget",
            "4.5",
            "--max-bits",
            "5",
            "--targets",
            "3.5",
        ][..],
        &small,
    ]
    .concat());
    let json = dir.path().join("p.json");
    for args in [
        &["--bits", "3"][..],
        &["--bits", "5"],
        &["--target", "3.5", "--static"],
        &["--target", "3.5"],
        &["--target", "3.5", "--exact-estimator-input"],
        &["--target", "3.5", "--select", "oracle"],
    ] {
        let cpu = perplexity(s(&q), s(&text), s(&json), "cpu", args);
        let gpu = perplexity(s(&q), s(&text), s(&json), "cuda:0", args);
        println!("{args:?}: cpu {cpu:?}, gpu {gpu:?}");
        assert!(
            (gpu.0 - cpu.0).abs() <= 1e-3 * cpu.0,
            "{args:?}: perplexity {} on the GPU, {} on the CPU",
            gpu.0,
            cpu.0
        );
        // A token whose estimate sits at a threshold may go the other way in f32.
        assert!(
            (gpu.1 - cpu.1).abs() <= 0.02,
            "{args:?}: effective bits {} on the GPU, {} on the CPU",
            gpu.1,
            cpu.1
        );
    }
    // The default f16 KV cache: keys and values rounded to 11 significant bits
    // move the perplexity by far less than a wrong kernel would.
    let cpu = perplexity(s(&q), s(&text), s(&json), "cpu", &["--bits", "5"]);
    let f16 = perplexity(
        s(&q),
        s(&text),
        s(&json),
        "cuda:0",
        &["--bits", "5", "--kv-cache", "f16"],
    );
    println!("--bits 5: cpu {cpu:?}, gpu with an f16 KV cache {f16:?}");
    assert!(
        (f16.0 - cpu.0).abs() <= 1e-2 * cpu.0,
        "perplexity {} on the GPU with an f16 KV cache, {} on the CPU",
        f16.0,
        cpu.0
    );
    // Generate under a DP-LLM plan; decode steps replayed as CUDA graphs (the
    // default) give the same text and counts as op by op.
    let gen = [
        "generate",
        s(&q),
        "--target",
        "3.5",
        "-p",
        "the",
        "--max-tokens",
        "40",
        "--device",
        "cuda",
    ];
    let plain = common::command(&gen)
        .env("DPLLM_CUDA_GRAPHS", "0")
        .output()
        .unwrap();
    assert!(plain.status.success(), "{}", common::stderr(&plain));
    let (graphed, graphed_err) = ok(&gen);
    assert!(graphed.starts_with("the"), "{graphed}");
    assert!(
        graphed_err.contains("decode effective bits"),
        "{graphed_err}"
    );
    assert_eq!(graphed, common::stdout(&plain));
    let bits = |e: &str| e.split("decode effective bits").nth(1).map(str::to_owned);
    assert_eq!(bits(&graphed_err), bits(&common::stderr(&plain)));
    assert!(bits(&graphed_err).is_some(), "{graphed_err}");
    let (out, _) = ok(&[
        "bench",
        "decode",
        s(&q),
        "--bits",
        "4",
        "--prompt-tokens",
        "8",
        "--tokens",
        "8",
        "--bandwidth-mib",
        "64",
        "--json",
        s(&json),
        "--device",
        "cuda",
    ]);
    let v = json_file(&json);
    assert!(
        v["backend"].as_str().unwrap().starts_with("cuda:0"),
        "{out}"
    );
    assert!(v["decode_tokens_per_sec"].as_f64().unwrap() > 0.0, "{out}");
    assert_eq!(v["bandwidth"]["threads"].as_u64(), Some(0), "{out}");
}
