//! SmolLM2-135M-Instruct (GGUF) against an independent implementation:
//! transformers loading the same file (gguf-py dequantizes it), in float64
//! (tools/make_smollm2_fixtures.py, run on the device machine; the fixture holds
//! token ids, logits of three short sequences at 2k vocabulary columns plus every
//! row's log-sum-exp, and a 32-token greedy continuation of a chat prompt).
//! Skips when tools/fetch-smollm2.sh has not fetched the model.
//!
//! Tolerance: the same f32 weights, f32 arithmetic against float64 through 30
//! layers: measured max |Δlogit| 5.9e-5 (printed), tolerance 5e-4. A real bug (a wrong RoPE band, a
//! mis-permuted q/k, a wrong dequantization) moves logits by far more.

use std::path::Path;
use std::sync::Arc;

use dpllm_engine::chat_template::ChatMessage;
use dpllm_engine::sampler::argmax;
use dpllm_engine::tokenizer::TextTokenizer;
use dpllm_engine::{Model, RunPrecision, Session};
use dpllm_format::Checkpoint;

const LOGIT_TOL: f32 = 5e-4;

use dpllm_testkit::smollm2_gguf as smollm2;

fn ids(ck: &Checkpoint, name: &str) -> Vec<u32> {
    ck.tensor_i64(name)
        .unwrap()
        .0
        .iter()
        .map(|&v| v as u32)
        .collect()
}

#[test]
fn smollm2_matches_transformers_tokens_logits_and_greedy_continuation() {
    let Some(gguf) = smollm2() else { return };
    let fx = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/smollm2/reference.safetensors");
    let ck = Checkpoint::open_file(&fx).unwrap();
    let model = Arc::new(Model::load(&gguf).unwrap());
    let c = &model.config;
    let tok = TextTokenizer::from_dir(&gguf, c.bos_token_id, &c.eos_token_ids).unwrap();

    // Tokens of a text with digits, punctuation, accents, CJK, an emoji, tabs and code.
    let text = ck.metadata().get("text").unwrap().clone();
    assert_eq!(
        tok.encode(&text, false).unwrap(),
        ids(&ck, "text_ids"),
        "token ids of {text:?}"
    );

    // Logits of three short sequences (each from an empty cache).
    let seqs = ids(&ck, "seq_ids");
    let cols = ids(&ck, "columns");
    let want = ck.tensor_f32("logits", &[seqs.len(), cols.len()]).unwrap();
    let lse = ck.tensor_f32("logsumexp", &[seqs.len()]).unwrap();
    let vocab = c.vocab_size;
    let len = 6;
    let mut worst = 0f32;
    for (s, seq) in seqs.chunks(len).enumerate() {
        let logits = model.forward_all(seq, &mut model.new_cache(len)).unwrap();
        for (t, row) in logits.chunks(vocab).enumerate() {
            let r = s * len + t;
            for (k, &col) in cols.iter().enumerate() {
                worst = worst.max((row[col as usize] - want[r * cols.len() + k]).abs());
            }
            let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let got_lse = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
            worst = worst.max((got_lse as f32 - lse[r]).abs());
        }
    }
    eprintln!("max |Δlogit| against transformers (float64): {worst:.2e}");
    assert!(
        worst < LOGIT_TOL,
        "max |Δlogit| {worst} against transformers"
    );

    // The chat prompt and its greedy continuation: the first 32 tokens identical.
    let prompt = ck.metadata().get("prompt").unwrap();
    let tpl = tok
        .chat_template()
        .expect("SmolLM2's GGUF carries a chat template");
    let rendered = tpl
        .render(
            &[ChatMessage {
                role: "user".into(),
                content: prompt.clone(),
            }],
            true,
        )
        .unwrap();
    let prompt_ids = tok.encode(&rendered, false).unwrap();
    assert_eq!(
        prompt_ids,
        ids(&ck, "prompt_ids"),
        "chat prompt {rendered:?}"
    );
    let want = ids(&ck, "greedy_ids");
    // transformers generated with min_new_tokens = 32, which masks the
    // end-of-sequence ids until then: do the same, greedily, through a session.
    let mut session = Session::new(
        model.clone(),
        RunPrecision::Highest,
        prompt_ids.len() + want.len(),
    )
    .unwrap();
    let mut logits = session.prefill(&prompt_ids).unwrap();
    let mut got = Vec::new();
    for i in 0..want.len() {
        for &e in tok.eos_ids() {
            logits[e as usize] = f32::NEG_INFINITY;
        }
        let next = argmax(&logits);
        got.push(next);
        if i + 1 < want.len() {
            logits = session.decode_step(next).unwrap();
        }
    }
    assert_eq!(
        got,
        want,
        "greedy continuation: {:?} vs {:?}",
        tok.decode(&got, false).unwrap(),
        tok.decode(&want, false).unwrap()
    );
}
