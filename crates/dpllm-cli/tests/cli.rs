//! End-to-end tests of the `dpllm` binary on tiny random-weight models (written by
//! dpllm-testkit) and, when present, the real `docs-llama-12m` model in ../shared.

mod common;

use std::path::{Path, PathBuf};

use common::{dpllm, fails, json_file, ok, s, sample_text, stderr, tiny};
use dpllm_testkit::{TinySpec, TINY_VOCAB};
use safetensors::Dtype;
use tempfile::TempDir;

const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// Parameter count implied by the spec, computed from the family's layout (independently of the testkit).
fn expected_params(spec: &TinySpec) -> usize {
    let (d, v, i, l) = (spec.hidden, TINY_VOCAB, spec.intermediate, spec.layers);
    let hd = d / spec.heads;
    let (q, kv) = (spec.heads * hd, spec.kv_heads * hd);
    let mut block = 2 * d + (q + 2 * kv) * d + d * q + 3 * i * d;
    match spec.arch {
        "Qwen2ForCausalLM" => block += q + 2 * kv,
        "Qwen3ForCausalLM" => block += 2 * hd,
        _ => {}
    }
    let embed = v * d * if spec.tie_embeddings { 1 } else { 2 };
    embed + d + l * block
}

fn family_specs() -> Vec<TinySpec> {
    vec![
        TinySpec::default(),
        TinySpec {
            dtype: Dtype::F16,
            tie_embeddings: true,
            ..TinySpec::with_arch("MistralForCausalLM")
        },
        TinySpec {
            dtype: Dtype::F32,
            shards: 2,
            ..TinySpec::with_arch("Qwen2ForCausalLM")
        },
        TinySpec {
            tie_embeddings: true,
            shards: 3,
            layers: 3,
            ..TinySpec::with_arch("Qwen3ForCausalLM")
        },
        TinySpec {
            dtype: Dtype::F16,
            heads: 8,
            kv_heads: 4,
            hidden: 64,
            intermediate: 96,
            ..TinySpec::with_arch("Phi3ForCausalLM")
        },
    ]
}

// ---------------------------------------------------------------- inspect

#[test]
fn inspect_every_family_reports_architecture_and_exact_parameters() {
    for spec in family_specs() {
        let (_t, m) = tiny(&spec, 1);
        let (out, _) = ok(&["inspect", s(&m)]);
        let want = expected_params(&spec);
        assert!(
            out.contains(&format!("architecture   {}", spec.arch)),
            "{}:\n{out}",
            spec.arch
        );
        assert!(
            out.contains(&format!("parameters     {want} (")),
            "{}: expected {want} parameters:\n{out}",
            spec.arch
        );
        assert!(
            out.contains(&format!("in {} shard(s)", spec.shards)),
            "{}:\n{out}",
            spec.arch
        );
        assert!(
            out.contains(&format!("vocab          {TINY_VOCAB}")),
            "{out}"
        );
        // --tensors lists every tensor of the family's layout.
        let (out, _) = ok(&["inspect", s(&m), "--tensors"]);
        for (name, _) in spec.tensor_shapes() {
            assert!(
                out.contains(&name),
                "{}: --tensors lacks {name}:\n{out}",
                spec.arch
            );
        }
    }
}

// ---------------------------------------------------------------- generate

#[test]
fn generate_every_family_runs() {
    for spec in family_specs() {
        let (_t, m) = tiny(&spec, 2);
        let (out, err) = ok(&[
            "generate",
            s(&m),
            "--prompt",
            "hello",
            "--max-tokens",
            "4",
            "--ignore-eos",
        ]);
        assert!(out.starts_with("hello"), "{}: {out}", spec.arch);
        // 5 byte tokens + <s>.
        assert!(err.contains("prompt 6 tokens"), "{}: {err}", spec.arch);
        assert!(err.contains("generated 4 tokens"), "{}: {err}", spec.arch);
        assert!(err.contains(spec.arch), "{err}");
    }
}

#[test]
fn generate_is_deterministic_greedy_and_seeded() {
    let (_t, m) = tiny(&TinySpec::default(), 3);
    let base = [
        "generate",
        s(&m),
        "--prompt",
        "Once upon a time",
        "--max-tokens",
        "20",
        "--ignore-eos",
    ];
    let greedy1 = ok(&base).0;
    let greedy2 = ok(&base).0;
    assert!(greedy1.starts_with("Once upon a time"), "{greedy1}");
    assert_eq!(greedy1, greedy2, "greedy decoding must be deterministic");

    let sampled = |seed: &str| {
        let mut a = base.to_vec();
        a.extend([
            "--temperature",
            "1.0",
            "--top-k",
            "100",
            "--top-p",
            "0.95",
            "--repetition-penalty",
            "1.1",
            "--seed",
            seed,
        ]);
        ok(&a).0
    };
    let a1 = sampled("42");
    let a2 = sampled("42");
    assert_eq!(a1, a2, "same seed must give the same sample");
    let b = sampled("7");
    assert_ne!(a1, b, "different seeds gave the same 20 sampled tokens");
}

#[test]
fn generate_max_tokens_with_ignore_eos() {
    let (_t, m) = tiny(&TinySpec::default(), 4);
    let (_, err) = ok(&[
        "generate",
        s(&m),
        "--prompt",
        "abc",
        "--max-tokens",
        "5",
        "--ignore-eos",
    ]);
    assert!(err.contains("generated 5 tokens"), "{err}");
    assert!(err.contains("stop: max tokens"), "{err}");
    // A context of 16 positions stops generation early instead of failing.
    let (_t2, m2) = tiny(
        &TinySpec {
            max_positions: 16,
            ..TinySpec::default()
        },
        4,
    );
    let (_, err) = ok(&[
        "generate",
        s(&m2),
        "--prompt",
        "abc",
        "--max-tokens",
        "50",
        "--ignore-eos",
    ]);
    assert!(
        err.contains("stop: context full") || err.contains("generated 12 tokens"),
        "{err}"
    );
}

#[test]
fn generate_chat_uses_the_template() {
    let spec = TinySpec {
        chat_template: Some(CHATML.to_string()),
        ..TinySpec::default()
    };
    let (_t, m) = tiny(&spec, 5);
    let (out, err) = ok(&[
        "generate",
        s(&m),
        "--prompt",
        "hi",
        "--chat",
        "--max-tokens",
        "3",
        "--ignore-eos",
    ]);
    // Rendered without BOS; one byte-level token per byte.
    let rendered = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n";
    assert!(
        err.contains(&format!("prompt {} tokens", rendered.len())),
        "{err}"
    );
    assert!(err.contains("generated 3 tokens"), "{err}");
    assert!(
        !out.starts_with("hi"),
        "--chat must not echo the prompt: {out:?}"
    );
    let (_, err) = ok(&[
        "generate",
        s(&m),
        "--prompt",
        "hi",
        "--chat",
        "--system",
        "Be brief.",
        "--max-tokens",
        "2",
        "--ignore-eos",
    ]);
    let rendered_sys = format!("<|im_start|>system\nBe brief.<|im_end|>\n{rendered}");
    assert!(
        err.contains(&format!("prompt {} tokens", rendered_sys.len())),
        "{err}"
    );
}

#[test]
fn generate_chat_without_template_fails() {
    let (_t, m) = tiny(&TinySpec::default(), 6);
    fails(
        &[
            "generate",
            s(&m),
            "--prompt",
            "hi",
            "--chat",
            "--max-tokens",
            "3",
        ],
        &["chat_template"],
    );
}

// ---------------------------------------------------------------- perplexity

#[test]
fn perplexity_on_tiny_model_writes_json() {
    let (t, m) = tiny(&TinySpec::default(), 8);
    let text = t.path().join("text.txt");
    std::fs::write(&text, sample_text()).unwrap();
    let json = t.path().join("ppl.json");
    let (out, _) = ok(&[
        "perplexity",
        s(&m),
        "--text",
        s(&text),
        "--ctx",
        "32",
        "--max-chunks",
        "3",
        "--json",
        s(&json),
    ]);
    assert!(out.contains("perplexity"), "{out}");
    assert!(out.contains("3 chunks x 32 tokens"), "{out}");
    let v = json_file(&json);
    let ppl = v["perplexity"].as_f64().expect("perplexity field");
    assert!(ppl.is_finite() && ppl > 1.0, "perplexity {ppl}");
    assert_eq!(v["chunks"], 3);
    assert_eq!(v["predictions"], 3 * 31);
    // Provenance: the dpllm version and revision, the device, the model and the text's sha256.
    let sha = v["text_sha256"].as_str().expect("text_sha256");
    assert!(
        sha.len() == 64 && sha.chars().all(|c| c.is_ascii_hexdigit()),
        "{sha}"
    );
    assert!(
        v["dpllm_version"].is_string() && !v["git_revision"].as_str().unwrap().is_empty(),
        "{v}"
    );
    assert!(v["device"].as_str().unwrap().starts_with("cpu"), "{v}");
    assert_eq!(v["model"].as_str(), Some(s(&m)));
}

#[test]
fn perplexity_compare_to_reports_kl_and_top1_agreement() {
    let (t, m) = tiny(&TinySpec::default(), 17);
    let text = t.path().join("text.txt");
    std::fs::write(&text, sample_text()).unwrap();
    let json = t.path().join("p.json");
    let run = |model: &Path, extra: &[&str]| {
        let args = [
            &[
                "perplexity",
                s(model),
                "--compare-to",
                s(&m),
                "--text",
                s(&text),
                "--ctx",
                "32",
                "--max-chunks",
                "3",
                "--json",
                s(&json),
            ][..],
            extra,
        ]
        .concat();
        let (out, _) = ok(&args);
        assert!(
            out.contains("mean KL") && out.contains("top-1 agreement"),
            "{out}"
        );
        json_file(&json)["fidelity"].clone()
    };
    // Against itself: no divergence, full agreement, the same perplexity.
    let f = run(&m, &[]);
    assert!(
        f["mean_kl"].as_f64().unwrap() < 1e-9 && f["max_kl"].as_f64().unwrap() < 1e-9,
        "{f}"
    );
    assert_eq!(f["top1_agreement"].as_f64(), Some(1.0));
    assert!(
        (f["reference_perplexity"].as_f64().unwrap()
            - json_file(&json)["perplexity"].as_f64().unwrap())
        .abs()
            < 1e-9
    );
    // Quantized: divergence grows as bits fall.
    let q = t.path().join("q");
    ok(&["quantize", s(&m), "--out", s(&q)]);
    let (k3, k8) = (run(&q, &["--bits", "3"]), run(&q, &["--bits", "8"]));
    let (m3, m8) = (
        k3["mean_kl"].as_f64().unwrap(),
        k8["mean_kl"].as_f64().unwrap(),
    );
    assert!(m8 > 0.0 && m8 < m3, "KL at 8 bits {m8}, at 3 bits {m3}");
    assert!(
        k3["p99_kl"].as_f64().unwrap() >= m3 * 0.5 && k3["top1_agreement"].as_f64().unwrap() <= 1.0
    );
    fails(
        &[
            "perplexity",
            s(&q),
            "--compare-to",
            s(&t.path().join("none")),
            "--text",
            s(&text),
        ],
        &["none", "not found"],
    );
}

// ---------------------------------------------------------------- bench

#[test]
fn bench_decode_prints_units_and_writes_json() {
    let (t, m) = tiny(&TinySpec::default(), 9);
    let json = t.path().join("bench.json");
    let (out, _) = ok(&[
        "bench",
        "decode",
        s(&m),
        "--prompt-tokens",
        "8",
        "--tokens",
        "4",
        "--bandwidth-mib",
        "8",
        "--json",
        s(&json),
    ]);
    assert!(out.contains("tok/s") && out.contains("GB/s"), "{out}");
    let v = json_file(&json);
    let tps = v["decode_tokens_per_sec"]
        .as_f64()
        .expect("decode_tokens_per_sec");
    assert!(tps.is_finite() && tps > 0.0, "{v}");
    assert!(v["weight_bytes_per_token"].as_u64().unwrap() > 0, "{v}");
    assert!(v["backend"].as_str().unwrap().starts_with("cpu"), "{v}");
}

#[test]
fn bench_decode_runs_a_synthetic_model_and_refuses_bad_settings() {
    let t = tempfile::tempdir().unwrap();
    let json = t.path().join("bench.json");
    // Two prompt tokens and two decoded ones on synthetic SmolLM2 shapes.
    let small = |args: &[&str]| {
        let base = [
            "bench",
            "decode",
            "--synthetic",
            "smollm2-135m",
            "--prompt-tokens",
            "2",
            "--tokens",
            "2",
            "--bandwidth-mib",
            "8",
            "--json",
            s(&json),
        ];
        let (out, err) = ok(&[&base[..], args].concat());
        (out, err, json_file(&json))
    };
    let (out, err, v) = small(&["--bits", "3"]);
    assert!(err.contains("random"), "{err}");
    assert_eq!(v["model"], "synthetic:smollm2-135m", "{out}");
    assert_eq!(v["weights"], "anyprec 3-bit", "{out}");
    assert_eq!(v["effective_bits"].as_f64(), Some(3.0), "{out}");
    fails(
        &["bench", "decode", "--synthetic", "gpt-9"],
        &["--synthetic gpt-9", "llama3-8b"],
    );
    fails(
        &["bench", "decode", "--synthetic", "llama3-8b", "--bits", "9"],
        &["--bits 9 is out of range"],
    );
    // A synthetic plan: half the layers at 4 bits, chosen per token by DP-LLM.
    let (out, _, v) = small(&["--target", "3.5"]);
    assert_eq!(
        v["weights"], "dynamic plan, target 3.50, budget 4.00",
        "{out}"
    );
    assert_eq!(v["effective_bits"].as_f64(), Some(3.5), "{out}");
    assert!(v["estimator_overhead"].as_f64().unwrap() > 0.0, "{out}");
    // Timed against the static plan that decides alike, in alternating rounds.
    let sel = &v["selection"];
    assert_eq!(sel["rounds"], 2, "{out}");
    assert_eq!(sel["static_effective_bits"].as_f64(), Some(3.5), "{out}");
    assert!(sel["static_ms_per_token"].as_f64().unwrap() > 0.0, "{out}");
    assert!(sel["share_of_decode"].as_f64().unwrap() < 1.0, "{out}");
    assert!(
        out.contains("% of decode time (static plan deciding alike"),
        "{out}"
    );
    let (out, _, v) = small(&["--target", "3.5", "--static"]);
    assert_eq!(
        v["weights"], "static plan, target 3.50, budget 4.00",
        "{out}"
    );
    assert!(v["selection"].is_null(), "{out}");
    fails(
        &[
            "bench",
            "decode",
            "--synthetic",
            "smollm2-135m",
            "--target",
            "3.5",
            "--rounds",
            "0",
        ],
        &["--rounds", "0"],
    );
    let plan_8b = ["bench", "decode", "--synthetic", "llama3-8b", "--target"];
    for (args, phrases) in [
        (
            &["8"][..],
            &["--target 8 with --synthetic must lie in [3, 8)"][..],
        ),
        (
            &["4", "--budget", "5"],
            &["--budget", "cannot be used with"],
        ),
        (&["4", "--select", "oracle"], &["estimators only"]),
    ] {
        fails(&[&plan_8b[..], args].concat(), phrases);
    }
    fails(&["bench", "decode"], &["<MODEL>"]);
}

#[test]
fn bench_finetune_times_steps_and_refuses_bad_settings() {
    let t = tempfile::tempdir().unwrap();
    let json = t.path().join("ft.json");
    let (out, _) = ok(&[
        "bench",
        "finetune",
        "--synthetic",
        "smollm2-135m",
        "--steps",
        "1",
        "--seq-len",
        "8",
        "--json",
        s(&json),
    ]);
    assert!(
        out.contains("ms/step") && out.contains("min per target"),
        "{out}"
    );
    let v = json_file(&json);
    let depths = v["depths"].as_array().expect("depths");
    assert_eq!(depths.len(), 2, "{v}");
    for d in depths {
        let ms = d["ms_per_step"].as_f64().unwrap();
        assert!(ms.is_finite() && ms > 0.0, "{v}");
    }
    assert_eq!(v["full_layers"].as_u64(), Some(30), "{v}");
    assert!(v["full_ms_per_step"].as_f64().unwrap().is_finite(), "{v}");
    assert!(v["device"].as_str().unwrap().starts_with("cpu"), "{v}");
    assert_eq!(v["levels"].as_str(), Some("f32"), "{v}");
    assert_eq!(
        (v["targets"].as_u64(), v["lanes"].as_u64()),
        (Some(1), Some(1)),
        "{v}"
    );
    assert!(v["ms_per_block"].as_f64().unwrap().is_finite(), "{v}");
    for (args, phrases) in [
        (
            &["--depths", "2,1"][..],
            &["depths must be two block counts"][..],
        ),
        (&["--depths", "1"], &["--depths takes two block counts"]),
        (&["--tf32"], &["--tf32 is a GPU setting"]),
        (
            &["--levels", "planes"],
            &["--levels planes is a GPU setting"],
        ),
        (&["--levels", "f16"], &["expected auto, f32 or planes"]),
        (&["--synthetic", "gpt-9"], &["--synthetic gpt-9"]),
        (&["--max-bits", "9"], &["--max-bits 9"]),
        (&["--targets", "9"], &["--targets 9 must be within 1..=8"]),
        (&["--targets", "0"], &["--targets 0 must be within 1..=8"]),
    ] {
        fails(
            &[
                &["bench", "finetune", "--steps", "1", "--seq-len", "8"][..],
                args,
            ]
            .concat(),
            phrases,
        );
    }
}

// ---------------------------------------------------------------- bad inputs

#[test]
fn bad_model_directories_are_clear_errors() {
    let t = tempfile::tempdir().unwrap();
    let missing = t.path().join("no-such-model");
    fails(&["inspect", s(&missing)], &["no-such-model", "not found"]);
    fails(&["generate", s(&missing), "--prompt", "x"], &["not found"]);

    // Unsupported architecture.
    let (_t, m) = tiny(&TinySpec::default(), 10);
    let cfg = m.join("config.json");
    let mut v = json_file(&cfg);
    v["architectures"] = serde_json::json!(["GPT2LMHeadModel"]);
    std::fs::write(&cfg, v.to_string()).unwrap();
    fails(
        &["inspect", s(&m)],
        &["GPT2LMHeadModel", "unsupported architecture"],
    );
    fails(&["generate", s(&m), "--prompt", "x"], &["GPT2LMHeadModel"]);

    // config.json that is not JSON.
    std::fs::write(&cfg, "{ this is not json").unwrap();
    fails(&["inspect", s(&m)], &["config.json", "JSON"]);
}

#[test]
fn truncated_weights_name_the_file() {
    let (_t, m) = tiny(&TinySpec::default(), 11);
    let st = m.join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() / 2]).unwrap();
    fails(&["inspect", s(&m)], &["model.safetensors", "truncated"]);
    fails(
        &["generate", s(&m), "--prompt", "x"],
        &["model.safetensors"],
    );
}

#[test]
fn missing_shard_is_named() {
    let (_t, m) = tiny(
        &TinySpec {
            shards: 2,
            ..TinySpec::default()
        },
        12,
    );
    ok(&["inspect", s(&m)]);
    std::fs::remove_file(m.join("model-00002-of-00002.safetensors")).unwrap();
    fails(
        &["inspect", s(&m)],
        &[
            "model-00002-of-00002.safetensors",
            "missing",
            "model.safetensors.index.json",
        ],
    );
}

#[test]
fn wrong_tensor_shape_is_named() {
    let (_t, m) = tiny(&TinySpec::default(), 13);
    let path = m.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let bad = "model.layers.1.mlp.down_proj.weight";
    let tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| {
            let mut shape = v.shape().to_vec();
            if n == bad {
                shape.reverse(); // [32, 64] -> [64, 32]: same bytes, wrong layout
            }
            (n, v.dtype(), shape, v.data().to_vec())
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &path).unwrap();
    fails(
        &["generate", s(&m), "--prompt", "x"],
        &[bad, "shape", "[64, 32]", "[32, 64]"],
    );
    fails(
        &[
            "perplexity",
            s(&m),
            "--text",
            s(&m.join("config.json")),
            "--ctx",
            "8",
        ],
        &[bad],
    );
}

#[test]
fn missing_tokenizer_fails_generate() {
    let (_t, m) = tiny(&TinySpec::default(), 14);
    std::fs::remove_file(m.join("tokenizer.json")).unwrap();
    fails(
        &["generate", s(&m), "--prompt", "x"],
        &["tokenizer.json", "not found"],
    );
    // inspect does not need the tokenizer.
    ok(&["inspect", s(&m)]);
}

#[test]
fn bad_sampling_flags_are_rejected() {
    let (_t, m) = tiny(&TinySpec::default(), 15);
    fails(
        &["generate", s(&m), "--prompt", "x", "--top-p", "0"],
        &["--top-p"],
    );
    fails(
        &["generate", s(&m), "--prompt", "x", "--temperature", "-1"],
        &["--temperature"],
    );
    fails(
        &["generate", s(&m), "--prompt", "x", "--temperature=-1"],
        &["--temperature"],
    );
    fails(
        &[
            "generate",
            s(&m),
            "--prompt",
            "x",
            "--repetition-penalty",
            "0",
        ],
        &["--repetition-penalty"],
    );
}

#[test]
fn bad_perplexity_requests_are_rejected() {
    let (t, m) = tiny(
        &TinySpec {
            max_positions: 64,
            ..TinySpec::default()
        },
        16,
    );
    let text = t.path().join("text.txt");
    std::fs::write(&text, sample_text()).unwrap();
    fails(
        &["perplexity", s(&m), "--text", s(&text), "--ctx", "128"],
        &["--ctx 128", "context window of 64"],
    );

    let short = t.path().join("short.txt");
    std::fs::write(&short, "tiny").unwrap();
    fails(
        &["perplexity", s(&m), "--text", s(&short), "--ctx", "32"],
        &["fewer than one chunk"],
    );

    fails(
        &[
            "perplexity",
            s(&m),
            "--text",
            s(&t.path().join("nope.txt")),
            "--ctx",
            "32",
        ],
        &["nope.txt"],
    );

    // --json into a directory that does not exist: an error naming the file, and nothing left behind.
    let before: Vec<_> = std::fs::read_dir(t.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    let out = t.path().join("no-such-dir").join("ppl.json");
    fails(
        &[
            "perplexity",
            s(&m),
            "--text",
            s(&text),
            "--ctx",
            "32",
            "--max-chunks",
            "1",
            "--json",
            s(&out),
        ],
        &["ppl.json", "cannot write"],
    );
    let after: Vec<_> = std::fs::read_dir(t.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(before, after, "stray files after a failed --json write");
    assert!(!t.path().join("no-such-dir").exists());
}

// ---------------------------------------------------------------- real model

fn shared() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared")
}

#[test]
fn real_model_perplexity_and_generate() {
    let model = shared().join("models/docs-llama-12m");
    let text = shared().join("data/docs/test.txt");
    if !model.join("config.json").is_file() || !text.is_file() {
        eprintln!("SKIP: {} or {} is missing", model.display(), text.display());
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let json = t.path().join("ppl.json");
    let (out, _) = ok(&[
        "perplexity",
        s(&model),
        "--text",
        s(&text),
        "--ctx",
        "1024",
        "--max-chunks",
        "2",
        "--json",
        s(&json),
    ]);
    let ppl = json_file(&json)["perplexity"].as_f64().unwrap();
    assert!(
        (10.0..25.0).contains(&ppl),
        "perplexity {ppl} outside [10, 25] (reference 15.65 over the whole file)\n{out}"
    );
    assert!(out.contains("2 chunks x 1024 tokens"), "{out}");

    let (out, err) = ok(&[
        "generate",
        s(&model),
        "--prompt",
        "The os module",
        "--max-tokens",
        "16",
    ]);
    assert!(
        out.starts_with("The os module") && out.len() > "The os module".len() + 4,
        "{out}"
    );
    assert!(err.contains("LlamaForCausalLM"), "{err}");
}

// ---------------------------------------------------------------- quantize

#[test]
fn sensitivity_quantize_and_run_at_every_bit_width() {
    let (t, m) = tiny(&TinySpec::default(), 30);
    let text = t.path().join("calib.txt");
    std::fs::write(&text, sample_text()).unwrap();
    let sens = t.path().join("sens.safetensors");
    let calib = ["--calib", s(&text), "--samples", "2", "--seq-len", "16"];
    let (_, err) = ok(&[&["sensitivity", s(&m)][..], &calib, &["--out", s(&sens)]].concat());
    assert!(
        sens.is_file() && err.contains("sensitivities of 14 linears"),
        "{err}"
    );
    let q = t.path().join("q");
    let (out, _) = ok(&["quantize", s(&m), "--out", s(&q), "--sensitivity", s(&sens)]);
    assert!(
        out.contains("quantized 14 linears") && out.contains("8b "),
        "{out}"
    );
    // --calib computes the sensitivities on the fly and leaves no temporary file.
    let q2 = t.path().join("q2");
    ok(&[&["quantize", s(&m), "--out", s(&q2)][..], &calib].concat());
    let stray: Vec<_> = std::fs::read_dir(t.path())
        .unwrap()
        .filter_map(|e| {
            let n = e.unwrap().file_name().to_string_lossy().into_owned();
            n.starts_with('.').then_some(n)
        })
        .collect();
    assert!(stray.is_empty(), "temporary files left: {stray:?}");
    for bits in ["3", "5", "8"] {
        let (out, err) = ok(&[
            "perplexity",
            s(&q),
            "--bits",
            bits,
            "--text",
            s(&text),
            "--ctx",
            "32",
            "--max-chunks",
            "2",
        ]);
        assert!(out.contains("perplexity"), "{out}");
        assert!(
            err.contains(&format!("any-precision at {bits} bits")),
            "{err}"
        );
    }
    let (out, _) = ok(&[
        "generate",
        s(&q2),
        "--bits",
        "4",
        "--prompt",
        "the",
        "--max-tokens",
        "3",
        "--ignore-eos",
    ]);
    assert!(out.starts_with("the"), "{out}");
    ok(&[
        "bench",
        "decode",
        s(&q),
        "--bits",
        "3",
        "--tokens",
        "2",
        "--prompt-tokens",
        "4",
    ]);

    fails(
        &["perplexity", s(&q), "--bits", "9", "--text", s(&text)],
        &["--bits 9", "out of range"],
    );
    fails(
        &["perplexity", s(&q), "--bits", "2", "--text", s(&text)],
        &["--bits 2", "out of range"],
    );
    fails(
        &["generate", s(&m), "--bits", "4", "--prompt", "x"],
        &["not a dpllm any-precision model"],
    );
    fails(
        &["quantize", s(&m), "--out", s(&q)],
        &["already exists", "--force"],
    );
    fails(
        &["quantize", s(&q), "--out", s(&t.path().join("q3"))],
        &["already an any-precision model"],
    );
    fails(
        &["sensitivity", s(&q), "--calib", s(&text), "--out", s(&sens)],
        &["already quantized"],
    );
    fails(&["sensitivity", s(&m)], &["--calib FILE is required"]);
    fails(
        &[
            "sensitivity",
            s(&m),
            "--calib",
            s(&t.path().join("none.txt")),
        ],
        &["cannot read --calib"],
    );
    // Windows beyond the model's context (256), and a text shorter than one window.
    fails(
        &[
            "sensitivity",
            s(&m),
            "--calib",
            s(&text),
            "--seq-len",
            "5000",
        ],
        &["--seq-len 5000 is out of range", "context"],
    );
    let short = t.path().join("short.txt");
    std::fs::write(&short, "only a few words").unwrap();
    fails(
        &[
            "sensitivity",
            s(&m),
            "--calib",
            s(&short),
            "--seq-len",
            "128",
        ],
        &["fewer than one sequence"],
    );
    let o = dpllm(&[
        "quantize",
        s(&m),
        "--out",
        s(&t.path().join("q4")),
        "--sensitivity",
        s(&sens),
        "--calib",
        s(&text),
    ]);
    assert!(
        !o.status.success() && stderr(&o).contains("cannot be used with"),
        "{}",
        stderr(&o)
    );
}

/// Perplexity of `model` (at `bits` when given) on the first `chunks` chunks of 1024 tokens of `text`.
fn real_perplexity(
    model: &Path,
    bits: Option<u32>,
    text: &Path,
    chunks: usize,
    json: &Path,
) -> f64 {
    let b = bits.map(|b| b.to_string());
    let mut args = vec![
        "perplexity",
        s(model),
        "--text",
        s(text),
        "--ctx",
        "1024",
        "--max-chunks",
    ];
    let c = chunks.to_string();
    args.extend([c.as_str(), "--json", s(json)]);
    if let Some(b) = &b {
        args.extend(["--bits", b.as_str()]);
    }
    ok(&args);
    json_file(json)["perplexity"].as_f64().unwrap()
}

/// docs-llama-12m quantized with 16-sequence sensitivities into a temporary directory.
struct RealModel {
    dir: TempDir,
    model: PathBuf,
    q: PathBuf,
    test: PathBuf,
    calib: PathBuf,
}

impl RealModel {
    /// None (with a SKIP message) when ../shared lacks the model or its text.
    fn quantized() -> Option<RealModel> {
        let model = shared().join("models/docs-llama-12m");
        let (test, calib) = (
            shared().join("data/docs/test.txt"),
            shared().join("data/docs/calib.txt"),
        );
        if !model.join("config.json").is_file() || !test.is_file() || !calib.is_file() {
            eprintln!(
                "SKIP: docs-llama-12m or its text in {} is missing",
                shared().display()
            );
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let q = dir.path().join("q");
        ok(&[
            "quantize",
            s(&model),
            "--out",
            s(&q),
            "--calib",
            s(&calib),
            "--samples",
            "16",
            "--seq-len",
            "512",
        ]);
        Some(RealModel {
            dir,
            model,
            q,
            test,
            calib,
        })
    }
}

#[test]
fn real_model_quantized_perplexity_falls_with_bits() {
    let Some(r) = RealModel::quantized() else {
        return;
    };
    let json = r.dir.path().join("p.json");
    let full = real_perplexity(&r.model, None, &r.test, 24, &json);
    let ppl: Vec<f64> = (3..=8)
        .map(|b| real_perplexity(&r.q, Some(b), &r.test, 24, &json))
        .collect();
    eprintln!("docs-llama-12m, 24 x 1024 tokens of test.txt: full precision {full:.4}, 3..8 bits {ppl:.4?}");
    assert!(
        ppl.windows(2).all(|p| p[1] < p[0]),
        "perplexity does not fall with every added bit: {ppl:?}"
    );
    assert!(
        ppl[5] < full * 1.01,
        "8-bit perplexity {} is not within 1% of full precision {full}",
        ppl[5]
    );
    assert!(
        ppl[0] < full * 1.6,
        "3-bit perplexity {} is implausibly far from {full}",
        ppl[0]
    );
}

// ---------------------------------------------------------------- calibrate

#[test]
fn calibrate_then_run_targets_and_baselines() {
    let common::Quantized {
        dir: t,
        model: m,
        text,
        q,
    } = common::tiny_quantized(31);
    let small = common::small_calibration(&text);
    let (out, _) = ok(&[
        &[
            "calibrate",
            s(&q),
            "--budget",
            "4.5",
            "--max-bits",
            "5",
            "--targets",
            "3.5,4.25",
        ][..],
        &small,
    ]
    .concat());
    assert!(
        out.contains("budget 4.50 bits") && out.contains("3.50") && out.contains("4.25"),
        "{out}"
    );
    // The GPU memory the model needs: less at its budget than at 8 bits.
    if cfg!(feature = "cuda") {
        let (out, _) = ok(&["inspect", s(&q)]);
        let mb = |line: &str| -> f64 {
            let l = out.lines().find(|l| l.contains(line)).expect(line);
            let v: Vec<&str> = l.split_whitespace().collect();
            let i = v.iter().position(|w| w.ends_with("B")).unwrap();
            let scale = match v[i] {
                "kB" => 1e-3,
                "MB" => 1.0,
                _ => 1e3,
            };
            v[i - 1].parse::<f64>().unwrap() * scale
        };
        assert!(mb("at budget 4.50 bits") < mb("gpu memory"), "{out}");
    }
    for target in ["3.5", "4.25"] {
        let json = t.path().join("p.json");
        let (out, _) = ok(&[
            "perplexity",
            s(&q),
            "--target",
            target,
            "--text",
            s(&text),
            "--ctx",
            "32",
            "--max-chunks",
            "2",
            "--json",
            s(&json),
        ]);
        assert!(out.contains("effective bits"), "{out}");
        let v = json_file(&json);
        let eff = v["effective_bits"].as_f64().unwrap();
        assert!((3.0..=5.0).contains(&eff), "{eff}");
        assert!(v["estimator_overhead"].as_f64().is_some());
        let (out, _) = ok(&[
            "perplexity",
            s(&q),
            "--target",
            target,
            "--static",
            "--text",
            s(&text),
            "--ctx",
            "32",
            "--max-chunks",
            "2",
            "--json",
            s(&json),
        ]);
        let eff = json_file(&json)["effective_bits"].as_f64().unwrap();
        assert!(
            eff <= target.parse::<f64>().unwrap() + 1e-9,
            "static plan above its target: {eff}\n{out}"
        );
    }
    let (_, err) = ok(&[
        "generate",
        s(&q),
        "--target",
        "3.5",
        "--prompt",
        "the",
        "--max-tokens",
        "4",
        "--ignore-eos",
    ]);
    assert!(
        err.contains("DP-LLM plan: target 3.50") && err.contains("decode effective bits"),
        "{err}"
    );
    let (out, _) = ok(&[
        "bench",
        "decode",
        s(&q),
        "--target",
        "4.25",
        "--tokens",
        "3",
        "--prompt-tokens",
        "4",
        "--bandwidth-mib",
        "8",
    ]);
    assert!(out.contains("effective bits (decode)"), "{out}");
    let plan = q.join("plans/budget-4.50/target-3.50.json");
    ok(&[
        "perplexity",
        s(&q),
        "--plan",
        s(&plan),
        "--exact-estimator-input",
        "--text",
        s(&text),
        "--ctx",
        "32",
        "--max-chunks",
        "1",
    ]);
    // The bounds of per-token selection: the oracle reports each estimator against the true error.
    let json = t.path().join("o.json");
    let (out, _) = ok(&[
        "perplexity",
        s(&q),
        "--target",
        "3.5",
        "--select",
        "oracle",
        "--text",
        s(&text),
        "--ctx",
        "32",
        "--max-chunks",
        "2",
        "--json",
        s(&json),
    ]);
    assert!(
        out.contains("estimator vs true error") && out.contains("correlation"),
        "{out}"
    );
    let v = json_file(&json);
    assert_eq!(
        (&v["method"], &v["budget"]),
        (&"oracle".into(), &4.5.into())
    );
    assert!(
        v["selection"]
            .as_array()
            .is_some_and(|a| !a.is_empty() && a[0]["agreement"].as_f64().is_some()),
        "{v}"
    );
    ok(&[
        "perplexity",
        s(&q),
        "--target",
        "3.5",
        "--select",
        "random",
        "--text",
        s(&text),
        "--ctx",
        "32",
        "--max-chunks",
        "2",
        "--json",
        s(&json),
    ]);
    assert_eq!(json_file(&json)["method"], "random");
    fails(
        &[
            "perplexity",
            s(&q),
            "--target",
            "3.5",
            "--static",
            "--select",
            "oracle",
            "--text",
            s(&text),
        ],
        &["--select oracle needs a DP-LLM plan", "static"],
    );
    fails(
        &[
            "perplexity",
            s(&q),
            "--bits",
            "4",
            "--select",
            "random",
            "--text",
            s(&text),
        ],
        &["--select random needs a DP-LLM plan"],
    );

    fails(
        &["perplexity", s(&q), "--target", "4.0", "--text", s(&text)],
        &["no DP-LLM plan for target 4", "[3.5, 4.25]"],
    );
    fails(
        &[
            "perplexity",
            s(&q),
            "--target",
            "3.5",
            "--budget",
            "5",
            "--text",
            s(&text),
        ],
        &["budget 5"],
    );
    fails(
        &["perplexity", s(&m), "--target", "3.5", "--text", s(&text)],
        &["has no plans", "dpllm calibrate"],
    );
    let o = dpllm(&[
        "perplexity",
        s(&q),
        "--target",
        "3.5",
        "--bits",
        "4",
        "--text",
        s(&text),
    ]);
    assert!(
        !o.status.success() && stderr(&o).contains("cannot be used with"),
        "{}",
        stderr(&o)
    );
    fails(
        &[
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
        .concat(),
        &["already exists", "--force"],
    );
    fails(
        &[
            &[
                "calibrate",
                s(&q),
                "--budget",
                "4.5",
                "--max-bits",
                "5",
                "--targets",
                "4.75",
                "--force",
            ][..],
            &small,
        ]
        .concat(),
        &["target 4.75"],
    );
    fails(
        &[&["calibrate", s(&m), "--targets", "3.5"][..], &small].concat(),
        &["not a dpllm any-precision model"],
    );
    fails(
        &["calibrate", s(&q), "--targets", "3.5"],
        &["--calib FILE is required"],
    );
    fails(
        &[
            &["calibrate", s(&q), "--targets", "3.5", "--lanes", "9"][..],
            &small,
        ]
        .concat(),
        &["--lanes 9 must be within 0..=8"],
    );
    // No driver (CI) or no such GPU for the projections: refused before
    // fine-tuning, nothing written.
    fails(
        &[
            &[
                "calibrate",
                s(&q),
                "--targets",
                "3.5",
                "--force",
                "--jl-device",
                "cuda:7",
            ][..],
            &small,
        ]
        .concat(),
        &["--jl-device cuda:7"],
    );
    // A corrupt plan file is named in the error.
    std::fs::write(&plan, "{ not json").unwrap();
    fails(
        &["perplexity", s(&q), "--target", "3.5", "--text", s(&text)],
        &["target-3.50.json", "not a plan"],
    );
}

#[test]
fn pipeline_runs_every_stage_and_reports_every_method() {
    let (t, m) = tiny(&TinySpec::default(), 32);
    let text = t.path().join("text.txt");
    std::fs::write(&text, sample_text()).unwrap();
    let work = t.path().join("work");
    let (md, json) = (t.path().join("r.md"), t.path().join("r.json"));
    let args = [
        "pipeline",
        s(&m),
        "--work",
        s(&work),
        "--text",
        s(&text),
        "--calib",
        s(&text),
        "--ctx",
        "32",
        "--max-chunks",
        "2",
        "--sensitivity-samples",
        "2",
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
        "3.5,4",
        "--markdown",
        s(&md),
        "--json",
        s(&json),
    ];
    let (out, err) = ok(&args);
    assert!(
        err.contains("[1/3]") && err.contains("[2/3]") && err.contains("[3/3]"),
        "{err}"
    );
    for method in ["full precision", "uniform", "static", "dp-llm"] {
        assert!(
            out.contains(&format!("| {method} |")),
            "{method} missing:\n{out}"
        );
    }
    // The file is the printed table plus the marker line that lets a later run replace it.
    let file = std::fs::read_to_string(&md).unwrap();
    assert!(
        file.starts_with(&out) && file[out.len()..].starts_with("<!-- written by dpllm"),
        "{file}"
    );
    let rows = json_file(&json)["rows"].as_array().unwrap().len();
    assert_eq!(
        json_file(&json)["text_sha256"].as_str().map(str::len),
        Some(64),
        "the text's sha256 is recorded"
    );
    assert_eq!(
        rows,
        1 + 3 + 2 * 2,
        "full + uniform 3..5 + (static, dp-llm) x 2 targets"
    );
    // A second run reuses every stage.
    let (_, err) = ok(&args);
    assert!(!err.contains("[1/3]") && !err.contains("[3/3]"), "{err}");
    fails(
        &["pipeline", s(&m), "--work", s(&work), "--text", s(&text)],
        &["--calib FILE is required"],
    );
}

#[test]
fn real_model_dp_llm_runs_at_its_targets() {
    let Some(r) = RealModel::quantized() else {
        return;
    };
    let (q, test, calib) = (&r.q, &r.test, &r.calib);
    let (out, _) = ok(&[
        "calibrate",
        s(q),
        "--budget",
        "5.0",
        "--targets",
        "3.5,4.5",
        "--calib",
        s(calib),
        "--samples",
        "24",
        "--seq-len",
        "256",
        "--epochs",
        "1",
        "--estimator-samples",
        "8",
        "--jl-steps",
        "300",
    ]);
    eprintln!("{out}");
    let json = r.dir.path().join("p.json");
    for target in [3.5, 4.5] {
        let ts = target.to_string();
        ok(&[
            "perplexity",
            s(q),
            "--target",
            &ts,
            "--text",
            s(test),
            "--ctx",
            "1024",
            "--max-chunks",
            "8",
            "--json",
            s(&json),
        ]);
        let v = json_file(&json);
        let (eff, ppl) = (
            v["effective_bits"].as_f64().unwrap(),
            v["perplexity"].as_f64().unwrap(),
        );
        eprintln!("target {target}: effective bits {eff:.3}, perplexity {ppl:.3}");
        assert!(
            (eff - target).abs() < 0.1,
            "target {target}: effective bits {eff} on held-out text"
        );
        assert!((10.0..30.0).contains(&ppl), "perplexity {ppl}");
    }
}
