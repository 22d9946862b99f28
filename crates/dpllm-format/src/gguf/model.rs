//! A GGUF file seen as a Hugging Face checkpoint: llama.cpp's tensor names mapped
//! to the Hugging Face ones, the q/k row permutation of llama.cpp's converter
//! undone, `config.json` and the tokenizer files rebuilt from the metadata.

use serde_json::{json, Map, Value as Json};

use super::{GgufFile, Value};
use crate::{FormatError, ModelConfig, Result};

/// llama.cpp architecture name → Hugging Face class and `model_type`.
const ARCHS: &[(&str, &str, &str)] = &[
    ("llama", "LlamaForCausalLM", "llama"),
    ("qwen2", "Qwen2ForCausalLM", "qwen2"),
    ("qwen3", "Qwen3ForCausalLM", "qwen3"),
    ("phi3", "Phi3ForCausalLM", "phi3"),
];

/// Per-block tensor names: llama.cpp's suffix → Hugging Face's.
const BLOCK_NAMES: &[(&str, &str)] = &[
    ("attn_norm.weight", "input_layernorm.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
    ("attn_q.weight", "self_attn.q_proj.weight"),
    ("attn_k.weight", "self_attn.k_proj.weight"),
    ("attn_v.weight", "self_attn.v_proj.weight"),
    ("attn_q.bias", "self_attn.q_proj.bias"),
    ("attn_k.bias", "self_attn.k_proj.bias"),
    ("attn_v.bias", "self_attn.v_proj.bias"),
    ("attn_qkv.weight", "self_attn.qkv_proj.weight"),
    ("attn_output.weight", "self_attn.o_proj.weight"),
    ("attn_q_norm.weight", "self_attn.q_norm.weight"),
    ("attn_k_norm.weight", "self_attn.k_norm.weight"),
    ("ffn_gate.weight", "mlp.gate_proj.weight"),
    ("ffn_up.weight", "mlp.up_proj.weight"),
    ("ffn_down.weight", "mlp.down_proj.weight"),
];

/// The Hugging Face name of GGUF tensor `name` of a file of llama.cpp
/// architecture `arch`, if it is one dpllm uses.
pub fn hf_name(name: &str, arch: &str) -> Option<String> {
    match name {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, suffix) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    // Phi-3's ffn_up holds the fused gate and up projections.
    let hf = match (arch, suffix) {
        ("phi3", "ffn_up.weight") => "mlp.gate_up_proj.weight",
        _ => BLOCK_NAMES.iter().find(|(g, _)| *g == suffix)?.1,
    };
    Some(format!("model.layers.{layer}.{hf}"))
}

/// llama.cpp's architecture name of the file.
pub fn arch(f: &GgufFile) -> Result<&str> {
    f.get("general.architecture")
        .and_then(Value::as_str)
        .ok_or_else(|| FormatError::invalid(f.path(), "metadata has no general.architecture"))
}

/// Whether llama.cpp's converter permuted the q/k rows of this architecture
/// (for interleaved RoPE kernels), and so whether dpllm must undo it.
pub fn permutes_qk(f: &GgufFile) -> bool {
    arch(f).is_ok_and(|a| a == "llama")
}

/// Undo llama.cpp's `permute(w, n_head)` on the rows of a [rows × cols] q or k
/// weight (or bias, cols = 1): GGUF row h·hd + 2i + j is Hugging Face row
/// h·hd + j·hd/2 + i.
pub fn unpermute_rows(w: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
    let hd = rows / n_head.max(1);
    let mut out = vec![0f32; w.len()];
    for h in 0..n_head {
        for i in 0..hd / 2 {
            for j in 0..2 {
                let src = (h * hd + 2 * i + j) * cols;
                let dst = (h * hd + j * (hd / 2) + i) * cols;
                out[dst..dst + cols].copy_from_slice(&w[src..src + cols]);
            }
        }
    }
    out
}

/// `config.json` of the model, rebuilt from the metadata, and the parsed config.
pub fn config(f: &GgufFile) -> Result<(Json, ModelConfig)> {
    let a = arch(f)?;
    let (_, class, model_type) = ARCHS.iter().find(|(g, ..)| *g == a).ok_or_else(|| {
        FormatError::UnsupportedArchitecture {
            path: f.path().into(),
            name: a.to_string(),
            supported: ARCHS
                .iter()
                .map(|(g, ..)| *g)
                .collect::<Vec<_>>()
                .join(", "),
        }
    })?;
    let key = |k: &str| format!("{a}.{k}");
    let num = |k: &str| f.get(&key(k)).and_then(Value::as_f64);
    let int = |k: &str| f.get(&key(k)).and_then(Value::as_u64);
    let need = |k: &str| {
        int(k).ok_or_else(|| {
            FormatError::invalid(f.path(), format!("metadata has no integer {}", key(k)))
        })
    };
    let heads = need("attention.head_count")?;
    let hidden = need("embedding_length")?;
    let vocab = match f.get("tokenizer.ggml.tokens").and_then(Value::as_array) {
        Some(t) => t.len() as u64,
        None => f
            .tensor("token_embd.weight")
            .map(|t| t.shape[0] as u64)
            .ok_or_else(|| {
                FormatError::invalid(
                    f.path(),
                    "no vocabulary (tokenizer.ggml.tokens or token_embd.weight)",
                )
            })?,
    };
    let mut c = Map::new();
    c.insert("architectures".into(), json!([class]));
    c.insert("model_type".into(), json!(model_type));
    c.insert("hidden_size".into(), json!(hidden));
    c.insert(
        "intermediate_size".into(),
        json!(need("feed_forward_length")?),
    );
    c.insert("num_hidden_layers".into(), json!(need("block_count")?));
    c.insert("num_attention_heads".into(), json!(heads));
    c.insert(
        "num_key_value_heads".into(),
        json!(int("attention.head_count_kv").unwrap_or(heads)),
    );
    if let Some(hd) = int("attention.key_length") {
        c.insert("head_dim".into(), json!(hd));
    }
    c.insert("vocab_size".into(), json!(vocab));
    c.insert(
        "rms_norm_eps".into(),
        json!(num("attention.layer_norm_rms_epsilon").unwrap_or(1e-6)),
    );
    c.insert(
        "rope_theta".into(),
        json!(num("rope.freq_base").unwrap_or(10000.0)),
    );
    c.insert(
        "max_position_embeddings".into(),
        json!(int("context_length").unwrap_or(4096)),
    );
    c.insert(
        "tie_word_embeddings".into(),
        json!(f.tensor("output.weight").is_none()),
    );
    c.insert("hidden_act".into(), json!("silu"));
    if let (Some(rot), Some(hd)) = (
        int("rope.dimension_count"),
        int("attention.key_length").or(Some(hidden / heads.max(1))),
    ) {
        if rot != hd && hd > 0 {
            c.insert(
                "partial_rotary_factor".into(),
                json!(rot as f64 / hd as f64),
            );
        }
    }
    if let Some(w) = int("attention.sliding_window") {
        c.insert("sliding_window".into(), json!(w));
    }
    if let Some(factor) = num("rope.scaling.factor") {
        let kind = f
            .get(&key("rope.scaling.type"))
            .and_then(Value::as_str)
            .unwrap_or("linear");
        c.insert(
            "rope_scaling".into(),
            json!({"type": kind, "factor": factor}),
        );
    }
    let tok_id = |k: &str| {
        f.get(&format!("tokenizer.ggml.{k}"))
            .and_then(Value::as_u64)
    };
    if let Some(b) = tok_id("bos_token_id") {
        c.insert("bos_token_id".into(), json!(b));
    }
    if let Some(e) = tok_id("eos_token_id") {
        c.insert("eos_token_id".into(), json!(e));
    }
    let config = Json::Object(c);
    let parsed = ModelConfig::from_json_str(&config.to_string(), f.path())?;
    Ok((config, parsed))
}

/// Split patterns of the GPT-2 byte-level pre-tokenizers llama.cpp names in `tokenizer.ggml.pre`.
fn pre_tokenizer(pre: &str, path: &std::path::Path) -> Result<Json> {
    let byte_level = |regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": regex});
    let split = |pattern: &str| json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false});
    Ok(match pre {
        "default" | "gpt2" => byte_level(true),
        "smollm" => {
            json!({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level(true)]})
        }
        "llama-bpe" | "llama3" => json!({"type": "Sequence", "pretokenizers": [
            split(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
            byte_level(false)]}),
        "qwen2" => json!({"type": "Sequence", "pretokenizers": [
            split(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
            byte_level(false)]}),
        other => {
            return Err(FormatError::invalid(
                path,
                format!(
                "tokenizer.ggml.pre {other:?} is not supported (smollm, llama-bpe, qwen2, default)"
            ),
            ))
        }
    })
}

/// `tokenizer.json` and `tokenizer_config.json` rebuilt from the `tokenizer.*`
/// metadata (GPT-2 byte-level BPE with the pre-tokenizer `tokenizer.ggml.pre` names).
pub fn tokenizer_files(f: &GgufFile) -> Result<(Json, Json)> {
    let path = f.path();
    let strings = |k: &str| -> Result<Vec<&str>> {
        f.get(k)
            .and_then(Value::as_array)
            .ok_or_else(|| FormatError::invalid(path, format!("metadata has no {k}")))?
            .iter()
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| FormatError::invalid(path, format!("{k} holds a non-string")))
            })
            .collect()
    };
    let model = f
        .get("tokenizer.ggml.model")
        .and_then(Value::as_str)
        .unwrap_or("");
    let tokens = strings("tokenizer.ggml.tokens")?;
    let types: Vec<u64> = f
        .get("tokenizer.ggml.token_type")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default();
    let vocab: Map<String, Json> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.to_string(), json!(i)))
        .collect();
    // Token types 3 (control) and 4 (user defined) are added tokens, matched before the model.
    let added: Vec<Json> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| matches!(types.get(*i), Some(3 | 4)))
        .map(|(i, t)| json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": types[i] == 3}))
        .collect();
    let tokenizer = match model {
        "gpt2" => {
            let merges = strings("tokenizer.ggml.merges")?;
            let pre = f.get("tokenizer.ggml.pre").and_then(Value::as_str).unwrap_or("default");
            json!({
                "version": "1.0",
                "truncation": null,
                "padding": null,
                "added_tokens": added,
                "normalizer": null,
                "pre_tokenizer": pre_tokenizer(pre, path)?,
                "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
                "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
                "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null, "end_of_word_suffix": null,
                          "fuse_unk": false, "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": merges},
            })
        }
        "llama" => spm_tokenizer(f, &tokens, &types, vocab, added)?,
        other => return Err(FormatError::invalid(path, format!("tokenizer.ggml.model {other:?} is not supported (gpt2 byte-level BPE and llama SentencePiece are)"))),
    };
    let token = |k: &str| {
        f.get(&format!("tokenizer.ggml.{k}_token_id"))
            .and_then(Value::as_u64)
            .and_then(|i| tokens.get(i as usize))
            .map(|s| s.to_string())
    };
    let mut tc = Map::new();
    tc.insert(
        "add_bos_token".into(),
        json!(f
            .get("tokenizer.ggml.add_bos_token")
            .and_then(Value::as_bool)
            .unwrap_or(false)),
    );
    if let Some(b) = token("bos") {
        tc.insert("bos_token".into(), json!(b));
    }
    if let Some(e) = token("eos") {
        tc.insert("eos_token".into(), json!(e));
    }
    if let Some(t) = f.get("tokenizer.chat_template").and_then(Value::as_str) {
        tc.insert("chat_template".into(), json!(t));
    }
    Ok((tokenizer, Json::Object(tc)))
}

/// A SentencePiece BPE tokenizer (llama.cpp's "llama" model: Llama 2, Mistral,
/// TinyLlama...) as a `tokenizers` BPE: SentencePiece merges the adjacent pair
/// whose joined piece scores highest, so every split of a normal piece into two
/// vocabulary pieces is a merge ranked by that piece's score. Characters outside
/// the vocabulary fall back to byte pieces `<0xXX>`; spaces become `▁`, with one
/// prepended unless `tokenizer.ggml.add_space_prefix` is false.
fn spm_tokenizer(
    f: &GgufFile,
    tokens: &[&str],
    types: &[u64],
    vocab: Map<String, Json>,
    added: Vec<Json>,
) -> Result<Json> {
    let path = f.path();
    let scores: Vec<f64> = f
        .get("tokenizer.ggml.scores")
        .and_then(Value::as_array)
        .ok_or_else(|| {
            FormatError::invalid(
                path,
                "metadata has no tokenizer.ggml.scores (a llama tokenizer needs them)",
            )
        })?
        .iter()
        .map(|v| {
            v.as_f64().ok_or_else(|| {
                FormatError::invalid(path, "tokenizer.ggml.scores holds a non-number")
            })
        })
        .collect::<Result<_>>()?;
    if scores.len() != tokens.len() {
        return Err(FormatError::invalid(
            path,
            format!("{} scores for {} tokens", scores.len(), tokens.len()),
        ));
    }
    let mut merges: Vec<(f64, usize, String)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        if types.get(id).is_some_and(|&t| t != 1) {
            continue;
        }
        for (b, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(b);
            if vocab.contains_key(l) && vocab.contains_key(r) {
                merges.push((scores[id], id, format!("{l} {r}")));
            }
        }
    }
    merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let merges: Vec<String> = merges.into_iter().map(|m| m.2).collect();
    let unk = f
        .get("tokenizer.ggml.unknown_token_id")
        .and_then(Value::as_u64)
        .and_then(|i| tokens.get(i as usize))
        .map(|s| s.to_string());
    let prefix = f
        .get("tokenizer.ggml.add_space_prefix")
        .and_then(Value::as_bool)
        .unwrap_or(true);
    let mut normalizers = Vec::new();
    if prefix {
        normalizers.push(json!({"type": "Prepend", "prepend": "\u{2581}"}));
    }
    normalizers.push(json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}));
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if prefix {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": null,
        "post_processor": null,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": true, "byte_fallback": true, "ignore_merges": false, "vocab": vocab, "merges": merges},
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_hugging_face() {
        assert_eq!(
            hf_name("blk.11.attn_q.weight", "llama").as_deref(),
            Some("model.layers.11.self_attn.q_proj.weight")
        );
        assert_eq!(
            hf_name("blk.0.ffn_down.weight", "llama").as_deref(),
            Some("model.layers.0.mlp.down_proj.weight")
        );
        assert_eq!(
            hf_name("blk.0.ffn_up.weight", "llama").as_deref(),
            Some("model.layers.0.mlp.up_proj.weight")
        );
        assert_eq!(
            hf_name("blk.0.ffn_up.weight", "phi3").as_deref(),
            Some("model.layers.0.mlp.gate_up_proj.weight")
        );
        assert_eq!(
            hf_name("blk.2.attn_qkv.weight", "phi3").as_deref(),
            Some("model.layers.2.self_attn.qkv_proj.weight")
        );
        assert_eq!(
            hf_name("token_embd.weight", "qwen2").as_deref(),
            Some("model.embed_tokens.weight")
        );
        assert_eq!(hf_name("rope_freqs.weight", "llama"), None);
        assert_eq!(hf_name("blk.x.attn_q.weight", "llama"), None);
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // llama.cpp: w.reshape(n_head, 2, hd/2, cols).swapaxes(1, 2).reshape(rows, cols).
        let (n_head, hd, cols) = (3usize, 8usize, 2usize);
        let rows = n_head * hd;
        let hf: Vec<f32> = (0..rows * cols).map(|x| x as f32).collect();
        let mut permuted = vec![0f32; hf.len()];
        for h in 0..n_head {
            for j in 0..2 {
                for i in 0..hd / 2 {
                    let src = (h * hd + j * hd / 2 + i) * cols;
                    let dst = (h * hd + i * 2 + j) * cols;
                    permuted[dst..dst + cols].copy_from_slice(&hf[src..src + cols]);
                }
            }
        }
        assert_ne!(permuted, hf);
        assert_eq!(unpermute_rows(&permuted, rows, cols, n_head), hf);
    }
}
