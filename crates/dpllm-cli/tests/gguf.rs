//! GGUF files wherever a model directory is accepted: a tiny GGUF written by the
//! testkit in CI, and the real SmolLM2-135M-Instruct (Q4_1) when
//! `tools/fetch-smollm2.sh` has fetched it.

mod common;

use std::path::Path;

use common::{fails, json_file, ok, s, sample_text};
use dpllm_testkit::{write_tiny_gguf, TinySpec};

const TEMPLATE: &str = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}";

#[test]
fn a_gguf_file_is_a_model_for_every_command() {
    let t = tempfile::tempdir().unwrap();
    let g = t.path().join("tiny.gguf");
    write_tiny_gguf(&g, &TinySpec::default(), 3, Some(TEMPLATE)).unwrap();
    let (out, _) = ok(&["inspect", s(&g)]);
    assert!(
        out.contains("LlamaForCausalLM") && out.contains("F32"),
        "{out}"
    );
    let (_, err) = ok(&[
        "generate",
        s(&g),
        "--chat",
        "--prompt",
        "hi",
        "--max-tokens",
        "3",
        "--ignore-eos",
    ]);
    assert!(
        err.contains(&format!(
            "prompt {} tokens",
            "<|user|>hi<|assistant|>".len()
        )),
        "{err}"
    );
    let text = t.path().join("text.txt");
    std::fs::write(&text, sample_text()).unwrap();
    let json = t.path().join("p.json");
    ok(&[
        "perplexity",
        s(&g),
        "--text",
        s(&text),
        "--ctx",
        "32",
        "--max-chunks",
        "2",
        "--json",
        s(&json),
    ]);
    let full = json_file(&json)["perplexity"].as_f64().unwrap();
    // Quantized from the GGUF, the model carries the config and tokenizer the GGUF held.
    let q = t.path().join("q");
    ok(&[
        "quantize",
        s(&g),
        "--out",
        s(&q),
        "--calib",
        s(&text),
        "--samples",
        "2",
        "--seq-len",
        "32",
    ]);
    assert!(q.join("config.json").is_file() && q.join("tokenizer.json").is_file());
    ok(&[
        "perplexity",
        s(&q),
        "--bits",
        "8",
        "--text",
        s(&text),
        "--ctx",
        "32",
        "--max-chunks",
        "2",
        "--json",
        s(&json),
    ]);
    let q8 = json_file(&json)["perplexity"].as_f64().unwrap();
    assert!(
        (q8 / full - 1.0).abs() < 0.02,
        "8-bit perplexity {q8} vs the GGUF's {full}"
    );
    // A corrupt GGUF is a clear error naming the file.
    let bytes = std::fs::read(&g).unwrap();
    std::fs::write(&g, &bytes[..bytes.len() / 2]).unwrap();
    fails(&["generate", s(&g), "--prompt", "x"], &["tiny.gguf"]);
}

use dpllm_testkit::smollm2_gguf as smollm2;

#[test]
fn smollm2_answers_a_chat_question() {
    let Some(g) = smollm2() else { return };
    let (out, err) = ok(&[
        "generate",
        s(&g),
        "--chat",
        "--prompt",
        "What is the capital of France?",
        "--max-tokens",
        "24",
    ]);
    assert!(out.contains("Paris"), "{out}\n{err}");
    let (out, _) = ok(&["inspect", s(&g)]);
    assert!(
        out.contains("Q4_1") && out.contains("Q8_0") && out.contains("30"),
        "{out}"
    );
}

#[test]
fn smollm2_perplexity_on_real_text_is_plausible() {
    let Some(g) = smollm2() else { return };
    let text =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/wikitext-2/test.txt");
    if !text.is_file() {
        eprintln!("SKIP: {} is missing", text.display());
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let json = t.path().join("p.json");
    ok(&[
        "perplexity",
        s(&g),
        "--text",
        s(&text),
        "--ctx",
        "512",
        "--max-chunks",
        "2",
        "--json",
        s(&json),
    ]);
    let ppl = json_file(&json)["perplexity"].as_f64().unwrap();
    // SmolLM2-135M scores roughly 15-30 on WikiText-2 at short contexts.
    assert!((8.0..40.0).contains(&ppl), "WikiText-2 perplexity {ppl}");
}
