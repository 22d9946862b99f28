//! Tiny GGUF models for tests, written the way llama.cpp's converter
//! (`convert_hf_to_gguf.py`) writes a Llama checkpoint: llama.cpp tensor names,
//! q/k rows permuted for interleaved RoPE, `llama.*` hyper-parameters and a
//! GPT-2 byte-level tokenizer in the metadata. Written independently of dpllm's
//! GGUF reader (its own name table and permutation), so a test that loads both
//! the Hugging Face original and this file checks the reader.

use std::io::{self, Write};
use std::path::Path;

use safetensors::{Dtype, SafeTensors};

use crate::{bytes_to_unicode, write_tiny_model, TinySpec, BOS_ID, EOS_ID, TINY_VOCAB};

/// Hugging Face block tensor suffix → llama.cpp's.
const NAMES: &[(&str, &str)] = &[
    ("self_attn.q_proj.weight", "attn_q.weight"),
    ("self_attn.k_proj.weight", "attn_k.weight"),
    ("self_attn.v_proj.weight", "attn_v.weight"),
    ("self_attn.o_proj.weight", "attn_output.weight"),
    ("mlp.gate_proj.weight", "ffn_gate.weight"),
    ("mlp.up_proj.weight", "ffn_up.weight"),
    ("mlp.down_proj.weight", "ffn_down.weight"),
    ("input_layernorm.weight", "attn_norm.weight"),
    ("post_attention_layernorm.weight", "ffn_norm.weight"),
];

fn gguf_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight".into()),
        "model.norm.weight" => Some("output_norm.weight".into()),
        "lm_head.weight" => Some("output.weight".into()),
        _ => {
            let rest = hf.strip_prefix("model.layers.")?;
            let (layer, suffix) = rest.split_once('.')?;
            NAMES
                .iter()
                .find(|(h, _)| *h == suffix)
                .map(|(_, g)| format!("blk.{layer}.{g}"))
        }
    }
}

/// llama.cpp's `permute`: w.reshape(n_head, 2, hd/2, cols).swapaxes(1, 2).reshape(rows, cols).
fn permute(w: &[f32], rows: usize, n_head: usize) -> Vec<f32> {
    let cols = w.len() / rows;
    let hd = rows / n_head;
    let mut out = vec![0f32; w.len()];
    for h in 0..n_head {
        for two in 0..2 {
            for i in 0..hd / 2 {
                let src = (h * hd + two * hd / 2 + i) * cols;
                let dst = (h * hd + 2 * i + two) * cols;
                out[dst..dst + cols].copy_from_slice(&w[src..src + cols]);
            }
        }
    }
    out
}

enum Meta {
    U32(u32),
    F32(f32),
    Bool(bool),
    Str(String),
    Strs(Vec<String>),
    I32s(Vec<i32>),
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    b.extend((s.len() as u64).to_le_bytes());
    b.extend(s.as_bytes());
}

fn put_meta(b: &mut Vec<u8>, key: &str, v: &Meta) {
    put_str(b, key);
    match v {
        Meta::U32(x) => {
            b.extend(4u32.to_le_bytes());
            b.extend(x.to_le_bytes());
        }
        Meta::F32(x) => {
            b.extend(6u32.to_le_bytes());
            b.extend(x.to_le_bytes());
        }
        Meta::Bool(x) => {
            b.extend(7u32.to_le_bytes());
            b.push(*x as u8);
        }
        Meta::Str(s) => {
            b.extend(8u32.to_le_bytes());
            put_str(b, s);
        }
        Meta::Strs(v) => {
            b.extend(9u32.to_le_bytes());
            b.extend(8u32.to_le_bytes());
            b.extend((v.len() as u64).to_le_bytes());
            for s in v {
                put_str(b, s);
            }
        }
        Meta::I32s(v) => {
            b.extend(9u32.to_le_bytes());
            b.extend(5u32.to_le_bytes());
            b.extend((v.len() as u64).to_le_bytes());
            for x in v {
                b.extend(x.to_le_bytes());
            }
        }
    }
}

/// Write the tiny Llama model of `spec` and `seed` (the same weights
/// [`write_tiny_model`] writes) as an F32 GGUF file at `path`, with `chat_template` in its metadata.
pub fn write_tiny_gguf(
    path: &Path,
    spec: &TinySpec,
    seed: u64,
    chat_template: Option<&str>,
) -> io::Result<()> {
    write_tiny_gguf_with(path, spec, seed, chat_template, false).map(|_| ())
}

/// Q8_0 blocks of rows of `cols` values, as llama.cpp quantizes them: per 32
/// values d = max|x| / 127 (stored f16), q = round(x / d). Returns the bytes and
/// the values they stand for (f16(d) · q).
fn q8_0(values: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let (mut bytes, mut deq) = (Vec::new(), Vec::new());
    for block in values.chunks(32) {
        let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        let dh = half::f16::from_f32(d);
        bytes.extend(dh.to_bits().to_le_bytes());
        for &v in block {
            let q = (v * id).round().clamp(-127.0, 127.0) as i8;
            bytes.push(q as u8);
            deq.push(q as f32 * dh.to_f32());
        }
    }
    (bytes, deq)
}

/// [`write_tiny_gguf`], with the token embedding in Q8_0 blocks when `q8_embedding`
/// (the hidden size must be a multiple of 32); returns the embedding's values
/// as the file stores them (row-major [vocab × hidden]).
pub fn write_tiny_gguf_with(
    path: &Path,
    spec: &TinySpec,
    seed: u64,
    chat_template: Option<&str>,
    q8_embedding: bool,
) -> io::Result<Vec<f32>> {
    if spec.arch != "LlamaForCausalLM" || spec.shards != 1 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "tiny GGUF models are single-file Llama models",
        ));
    }
    let src = path.with_extension("hf-src");
    write_tiny_model(&src, spec, seed)?;
    let bytes = std::fs::read(src.join("model.safetensors"))?;
    std::fs::remove_dir_all(&src)?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| io::Error::other(e.to_string()))?;
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    for (name, view) in st.tensors() {
        let values: Vec<f32> = match view.dtype() {
            Dtype::F32 => view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F16 => view
                .data()
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            _ => view
                .data()
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
        };
        let shape = view.shape().to_vec();
        let values = if name.ends_with("q_proj.weight") {
            permute(&values, shape[0], spec.heads)
        } else if name.ends_with("k_proj.weight") {
            permute(&values, shape[0], spec.kv_heads)
        } else {
            values
        };
        let g =
            gguf_name(&name).ok_or_else(|| io::Error::other(format!("no GGUF name for {name}")))?;
        tensors.push((g, shape, values));
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    // Per tensor: (ggml type, bytes).
    let mut embedding = Vec::new();
    let data: Vec<(u32, Vec<u8>)> = tensors
        .iter()
        .map(|(name, _, values)| {
            if q8_embedding && name == "token_embd.weight" {
                let (bytes, deq) = q8_0(values);
                embedding = deq;
                (8, bytes)
            } else {
                if name == "token_embd.weight" {
                    embedding = values.clone();
                }
                (0, values.iter().flat_map(|v| v.to_le_bytes()).collect())
            }
        })
        .collect();

    let mut tokens: Vec<String> = bytes_to_unicode().iter().map(|c| c.to_string()).collect();
    tokens.extend(["<s>".to_string(), "</s>".to_string()]);
    assert_eq!(tokens.len(), TINY_VOCAB);
    let types: Vec<i32> = (0..TINY_VOCAB)
        .map(|i| if i < 256 { 1 } else { 3 })
        .collect();
    let mut meta = vec![
        ("general.architecture", Meta::Str("llama".into())),
        ("general.name", Meta::Str("tiny".into())),
        ("llama.block_count", Meta::U32(spec.layers as u32)),
        ("llama.context_length", Meta::U32(spec.max_positions as u32)),
        ("llama.embedding_length", Meta::U32(spec.hidden as u32)),
        (
            "llama.feed_forward_length",
            Meta::U32(spec.intermediate as u32),
        ),
        ("llama.attention.head_count", Meta::U32(spec.heads as u32)),
        (
            "llama.attention.head_count_kv",
            Meta::U32(spec.kv_heads as u32),
        ),
        ("llama.rope.freq_base", Meta::F32(10000.0)),
        ("llama.attention.layer_norm_rms_epsilon", Meta::F32(1e-5)),
        (
            "llama.rope.dimension_count",
            Meta::U32(spec.head_dim() as u32),
        ),
        ("tokenizer.ggml.model", Meta::Str("gpt2".into())),
        ("tokenizer.ggml.pre", Meta::Str("default".into())),
        ("tokenizer.ggml.tokens", Meta::Strs(tokens)),
        ("tokenizer.ggml.token_type", Meta::I32s(types)),
        ("tokenizer.ggml.merges", Meta::Strs(Vec::new())),
        ("tokenizer.ggml.bos_token_id", Meta::U32(BOS_ID)),
        ("tokenizer.ggml.eos_token_id", Meta::U32(EOS_ID)),
        ("tokenizer.ggml.add_bos_token", Meta::Bool(true)),
    ];
    if let Some(t) = chat_template {
        meta.push(("tokenizer.chat_template", Meta::Str(t.into())));
    }

    let mut b = Vec::new();
    b.extend(b"GGUF");
    b.extend(3u32.to_le_bytes());
    b.extend((tensors.len() as u64).to_le_bytes());
    b.extend((meta.len() as u64).to_le_bytes());
    for (k, v) in &meta {
        put_meta(&mut b, k, v);
    }
    let mut offset = 0u64;
    for ((name, shape, _), (ty, bytes)) in tensors.iter().zip(&data) {
        put_str(&mut b, name);
        b.extend((shape.len() as u32).to_le_bytes());
        for d in shape.iter().rev() {
            b.extend((*d as u64).to_le_bytes());
        }
        b.extend(ty.to_le_bytes());
        b.extend(offset.to_le_bytes());
        offset += bytes.len().next_multiple_of(32) as u64;
    }
    b.resize(b.len().next_multiple_of(32), 0);
    for (_, bytes) in &data {
        b.extend(bytes);
        b.resize(b.len().next_multiple_of(32), 0);
    }
    std::fs::File::create(path)?.write_all(&b)?;
    Ok(embedding)
}
