//! A GGUF file as a model source: a tiny Llama written as llama.cpp's converter
//! writes it (dpllm-testkit, independently of dpllm's reader: its own names and
//! q/k permutation) must give the same logits, tokens and chat template as the
//! Hugging Face checkpoint it was made from.

use dpllm_engine::tokenizer::TextTokenizer;
use dpllm_engine::Model;
use dpllm_testkit::{write_tiny_gguf, write_tiny_gguf_with, write_tiny_model, TinySpec};
use safetensors::Dtype;

const TEMPLATE: &str = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}";

fn pair(spec: &TinySpec) -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let t = tempfile::tempdir().unwrap();
    let hf = t.path().join("hf");
    write_tiny_model(&hf, spec, 5).unwrap();
    let gguf = t.path().join("tiny.gguf");
    write_tiny_gguf(&gguf, spec, 5, Some(TEMPLATE)).unwrap();
    (t, hf, gguf)
}

#[test]
fn gguf_gives_the_logits_of_the_checkpoint_it_was_made_from() {
    // F32 weights: both files hold the same numbers, so the logits must agree to rounding.
    for spec in [
        TinySpec {
            dtype: Dtype::F32,
            ..TinySpec::default()
        },
        TinySpec {
            dtype: Dtype::F32,
            heads: 8,
            kv_heads: 2,
            hidden: 64,
            layers: 3,
            ..TinySpec::default()
        },
    ] {
        let (_t, hf, gguf) = pair(&spec);
        let (a, b) = (Model::load(&hf).unwrap(), Model::load(&gguf).unwrap());
        assert_eq!(b.config.num_kv_heads, spec.kv_heads);
        assert!(b.config.tie_word_embeddings == spec.tie_embeddings);
        let ids = [256u32, 72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100];
        let la = a.forward_all(&ids, &mut a.new_cache(16)).unwrap();
        let lb = b.forward_all(&ids, &mut b.new_cache(16)).unwrap();
        let max = la
            .iter()
            .zip(&lb)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(
            max < 1e-5,
            "max |Δlogit| {max} between the checkpoint and its GGUF"
        );
    }
}

#[test]
fn gguf_tokenizer_matches_the_checkpoint_tokenizer() {
    let (_t, hf, gguf) = pair(&TinySpec::default());
    let cfg = dpllm_format::ModelConfig::from_dir(&gguf).unwrap();
    let a = TextTokenizer::from_dir(&hf, Some(256), &[257]).unwrap();
    let b = TextTokenizer::from_dir(&gguf, cfg.bos_token_id, &cfg.eos_token_ids).unwrap();
    for text in [
        "hello world",
        "  two  spaces\nand a newline",
        "unicode: héllo ✓",
        "12345 digits",
    ] {
        assert_eq!(
            a.encode(text, true).unwrap(),
            b.encode(text, true).unwrap(),
            "{text:?}"
        );
        let ids = b.encode(text, false).unwrap();
        assert_eq!(b.decode(&ids, true).unwrap(), text);
    }
    assert_eq!(b.bos_id(), Some(256));
    assert!(b.is_eos(257));
    let msgs = [dpllm_engine::chat_template::ChatMessage {
        role: "user".into(),
        content: "hi".into(),
    }];
    assert_eq!(
        b.chat_template()
            .expect("template from the metadata")
            .render(&msgs, false)
            .unwrap(),
        "<|user|>hi"
    );
}

#[test]
fn a_q8_0_embedding_stays_8_bit_and_gives_the_logits_of_its_values() {
    let spec = TinySpec {
        dtype: Dtype::F32,
        tie_embeddings: true,
        hidden: 64,
        heads: 4,
        kv_heads: 2,
        ..TinySpec::default()
    };
    let t = tempfile::tempdir().unwrap();
    let (hf, gguf) = (t.path().join("hf"), t.path().join("q8.gguf"));
    write_tiny_model(&hf, &spec, 5).unwrap();
    let emb = write_tiny_gguf_with(&gguf, &spec, 5, None, true).unwrap();
    // The checkpoint with its embedding replaced by the values the Q8_0 blocks stand for.
    dpllm_testkit::edit_tensor(&hf, "model.embed_tokens.weight", |w| {
        w.copy_from_slice(&emb)
    })
    .unwrap();
    let (a, b) = (Model::load(&hf).unwrap(), Model::load(&gguf).unwrap());
    assert_eq!(b.lm_head().storage(), "q8_0");
    assert!(
        b.lm_head().weight_bytes() * 3 < a.lm_head().weight_bytes(),
        "{} vs {} bytes",
        b.lm_head().weight_bytes(),
        a.lm_head().weight_bytes()
    );
    assert_eq!(b.embedding_f32(), emb);
    let ids = [256u32, 72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100];
    let la = a.forward_all(&ids, &mut a.new_cache(16)).unwrap();
    let lb = b.forward_all(&ids, &mut b.new_cache(16)).unwrap();
    let max = la
        .iter()
        .zip(&lb)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(max < 1e-5, "prefill: max |Δlogit| {max}");
    // Token by token: the 8-bit GEMV kernel of the output layer.
    let mut cache = b.new_cache(16);
    let vocab = b.config.vocab_size;
    for (t, &id) in ids.iter().enumerate() {
        let row = b.forward_last(&[id], &mut cache).unwrap();
        let max = row
            .iter()
            .zip(&la[t * vocab..(t + 1) * vocab])
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(max < 1e-4, "decode step {t}: max |Δlogit| {max}");
    }
}

#[test]
fn a_sentencepiece_gguf_tokenizer_matches_sentencepiece() {
    // tools/make_spm_gguf_fixture.py: a SentencePiece BPE model (byte fallback, no
    // normalization, as Llama 2's) written as llama.cpp writes a "llama" tokenizer,
    // with the ids sentencepiece itself gives.
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/gguf");
    let tok = TextTokenizer::from_gguf(&dir.join("spm-tokenizer.gguf"), None, &[]).unwrap();
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("spm-reference.json")).unwrap())
            .unwrap();
    for s in reference["samples"].as_array().unwrap() {
        let text = s["text"].as_str().unwrap();
        let want: Vec<u32> = s["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(tok.encode(text, false).unwrap(), want, "{text:?}");
        assert_eq!(tok.decode(&want, true).unwrap(), text, "decoding {text:?}");
    }
    // With special tokens: the GGUF asks for a BOS.
    assert_eq!(tok.encode("Hello", true).unwrap()[0], 1);
}
