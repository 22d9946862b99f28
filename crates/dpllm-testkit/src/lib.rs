//! Test support for dpllm: tiny random-weight checkpoints in the real Hugging Face layout.
//!
//! [`write_tiny_model`] writes a complete model directory — `config.json`,
//! `generation_config.json`, `tokenizer.json`, `tokenizer_config.json` and the
//! safetensors weights (one file, or several shards plus
//! `model.safetensors.index.json`) — with exactly the tensor names and shapes
//! that `transformers` uses for each supported family. The weights are random
//! (seeded, so a given seed always gives the same files) and the tokenizer is a
//! byte-level BPE without merges ([`byte_level_tokenizer_json`]): every byte is
//! one token, plus `<s>` and `</s>`.
//!
//! ```no_run
//! use dpllm_testkit::{write_tiny_model, TinySpec};
//! let dir = std::env::temp_dir().join("tiny-llama");
//! write_tiny_model(&dir, &TinySpec::default(), 0).unwrap();
//! ```

mod gguf;

pub use gguf::{write_tiny_gguf, write_tiny_gguf_with};

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::Path;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::{json, Value};

/// Vocabulary size of every tiny model: 256 byte-level tokens, `<s>` (id 256) and `</s>` (id 257).
pub const TINY_VOCAB: usize = 258;

/// Every architecture the tiny checkpoints come in.
pub const TINY_ARCHS: [&str; 5] = [
    "LlamaForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Phi3ForCausalLM",
    "MistralForCausalLM",
];

/// Id of `<s>` (beginning of sequence).
pub const BOS_ID: u32 = 256;

/// Id of `</s>` (end of sequence).
pub const EOS_ID: u32 = 257;

/// Shape and storage of a tiny model.
#[derive(Debug, Clone)]
pub struct TinySpec {
    /// Hugging Face class name: `"LlamaForCausalLM"`, `"MistralForCausalLM"`,
    /// `"Qwen2ForCausalLM"`, `"Qwen3ForCausalLM"` or `"Phi3ForCausalLM"`.
    pub arch: &'static str,
    /// Model width (`hidden_size`).
    pub hidden: usize,
    /// Number of transformer blocks.
    pub layers: usize,
    /// Query heads; `head_dim = hidden / heads`.
    pub heads: usize,
    /// Key/value heads (must divide `heads`).
    pub kv_heads: usize,
    /// MLP width (`intermediate_size`).
    pub intermediate: usize,
    /// Storage type of every tensor: `F32`, `F16` or `BF16`.
    pub dtype: Dtype,
    /// `tie_word_embeddings`: when true no `lm_head.weight` is written.
    pub tie_embeddings: bool,
    /// 1 writes `model.safetensors`; n > 1 writes `model-0000i-of-0000n.safetensors`
    /// plus `model.safetensors.index.json`.
    pub shards: usize,
    /// Jinja chat template stored in `tokenizer_config.json`, if any.
    pub chat_template: Option<String>,
    /// `max_position_embeddings` of the config.
    pub max_positions: usize,
}

impl Default for TinySpec {
    /// Llama, hidden 32, 2 layers, 4 heads, 2 kv heads, intermediate 64, BF16,
    /// untied, 1 shard, no chat template, 256 positions.
    fn default() -> Self {
        TinySpec {
            arch: "LlamaForCausalLM",
            hidden: 32,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            intermediate: 64,
            dtype: Dtype::BF16,
            tie_embeddings: false,
            shards: 1,
            chat_template: None,
            max_positions: 256,
        }
    }
}

impl TinySpec {
    /// The same spec with another architecture.
    pub fn with_arch(arch: &'static str) -> TinySpec {
        TinySpec {
            arch,
            ..TinySpec::default()
        }
    }

    /// Per-head dimension (`hidden / heads`).
    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }

    /// The `model_type` that goes with [`TinySpec::arch`].
    pub fn model_type(&self) -> &'static str {
        match self.arch {
            "MistralForCausalLM" => "mistral",
            "Qwen2ForCausalLM" => "qwen2",
            "Qwen3ForCausalLM" => "qwen3",
            "Phi3ForCausalLM" => "phi3",
            _ => "llama",
        }
    }

    /// Every tensor of the checkpoint as (name, shape), sorted by name.
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (d, v, inter) = (self.hidden, TINY_VOCAB, self.intermediate);
        let hd = self.head_dim();
        let (qd, kvd) = (self.heads * hd, self.kv_heads * hd);
        let mut t: Vec<(String, Vec<usize>)> = vec![
            ("model.embed_tokens.weight".into(), vec![v, d]),
            ("model.norm.weight".into(), vec![d]),
        ];
        if !self.tie_embeddings {
            t.push(("lm_head.weight".into(), vec![v, d]));
        }
        for i in 0..self.layers {
            let p = format!("model.layers.{i}.");
            let mut add = |s: &str, shape: Vec<usize>| t.push((format!("{p}{s}"), shape));
            add("input_layernorm.weight", vec![d]);
            add("post_attention_layernorm.weight", vec![d]);
            if self.arch == "Phi3ForCausalLM" {
                add("self_attn.qkv_proj.weight", vec![qd + 2 * kvd, d]);
            } else {
                add("self_attn.q_proj.weight", vec![qd, d]);
                add("self_attn.k_proj.weight", vec![kvd, d]);
                add("self_attn.v_proj.weight", vec![kvd, d]);
            }
            if self.arch == "Qwen2ForCausalLM" {
                add("self_attn.q_proj.bias", vec![qd]);
                add("self_attn.k_proj.bias", vec![kvd]);
                add("self_attn.v_proj.bias", vec![kvd]);
            }
            if self.arch == "Qwen3ForCausalLM" {
                add("self_attn.q_norm.weight", vec![hd]);
                add("self_attn.k_norm.weight", vec![hd]);
            }
            add("self_attn.o_proj.weight", vec![d, qd]);
            if self.arch == "Phi3ForCausalLM" {
                add("mlp.gate_up_proj.weight", vec![2 * inter, d]);
            } else {
                add("mlp.gate_proj.weight", vec![inter, d]);
                add("mlp.up_proj.weight", vec![inter, d]);
            }
            add("mlp.down_proj.weight", vec![d, inter]);
        }
        t.sort();
        t
    }

    /// Total number of parameters (sum of the elements of every tensor written).
    pub fn param_count(&self) -> usize {
        self.tensor_shapes()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }

    /// The `config.json` content.
    pub fn config_json(&self) -> Value {
        json!({
            "architectures": [self.arch],
            "model_type": self.model_type(),
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim(),
            "vocab_size": TINY_VOCAB,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "max_position_embeddings": self.max_positions,
            "tie_word_embeddings": self.tie_embeddings,
            "bos_token_id": BOS_ID,
            "eos_token_id": EOS_ID,
            "hidden_act": "silu",
            "torch_dtype": dtype_name(self.dtype),
        })
    }
}

fn dtype_name(d: Dtype) -> &'static str {
    match d {
        Dtype::F16 => "float16",
        Dtype::BF16 => "bfloat16",
        _ => "float32",
    }
}

/// Bytes per element of a float dtype.
fn dtype_size(d: Dtype) -> usize {
    match d {
        Dtype::F16 | Dtype::BF16 => 2,
        _ => 4,
    }
}

/// Little-endian bytes of `values` in storage type `dtype`.
fn to_le_bytes(dtype: Dtype, values: &[f32]) -> io::Result<Vec<u8>> {
    Ok(match dtype {
        Dtype::F32 => values.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Dtype::F16 => values
            .iter()
            .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
            .collect(),
        Dtype::BF16 => values
            .iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
            .collect(),
        other => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("tiny models are F32, F16 or BF16, not {other:?}"),
            ))
        }
    })
}

/// One standard normal sample (Box–Muller).
fn normal(rng: &mut StdRng) -> f32 {
    let u1: f64 = rng.random::<f64>().max(1e-12);
    let u2: f64 = rng.random::<f64>();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

fn write_json(path: &Path, v: &Value) -> io::Result<()> {
    let text = serde_json::to_string_pretty(v).map_err(io::Error::other)?;
    std::fs::write(path, text)
}

fn check_spec(spec: &TinySpec) -> io::Result<()> {
    let bad = |m: String| Err(io::Error::new(io::ErrorKind::InvalidInput, m));
    if !TINY_ARCHS.contains(&spec.arch) {
        return bad(format!("unknown architecture {:?}", spec.arch));
    }
    if spec.heads == 0
        || spec.kv_heads == 0
        || !spec.hidden.is_multiple_of(spec.heads)
        || !spec.heads.is_multiple_of(spec.kv_heads)
    {
        return bad(format!(
            "hidden {} / heads {} / kv_heads {} are inconsistent",
            spec.hidden, spec.heads, spec.kv_heads
        ));
    }
    if spec.shards == 0 || spec.shards > 9999 {
        return bad(format!("shards must be in 1..=9999, got {}", spec.shards));
    }
    Ok(())
}

/// `path` inside the repository's git-ignored cache `models/` (filled by `tools/fetch-*.sh`).
fn models_cache(path: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../models")
        .join(path)
}

/// SmolLM2-135M-Instruct's GGUF as `tools/fetch-smollm2.sh` caches it in the
/// repository, or None (after printing a SKIP line) when it has not been fetched.
pub fn smollm2_gguf() -> Option<std::path::PathBuf> {
    let p = models_cache("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    if p.is_file() {
        Some(p)
    } else {
        eprintln!(
            "SKIP: {} is missing (run tools/fetch-smollm2.sh)",
            p.display()
        );
        None
    }
}

/// For a test that compiles CUDA kernels with NVRTC and no GPU: when NVRTC
/// does not load in this process (`nvrtc_loaded` false) but
/// `tools/fetch-nvrtc.sh` has cached one in the repository, run `test` (this
/// binary's test of that exact name) again in a child process with that
/// cache on `LD_LIBRARY_PATH`, panic if it fails, and return true: the
/// caller is done. False: go on in this process (NVRTC loads, or none is
/// cached and the test skips). The child panics when the cached NVRTC does
/// not load.
pub fn rerun_with_cached_nvrtc(test: &str, nvrtc_loaded: bool) -> bool {
    const CHILD: &str = "DPLLM_NVRTC_CHILD";
    if std::env::var_os(CHILD).is_some() {
        assert!(
            nvrtc_loaded,
            "the NVRTC cached in models/nvrtc did not load"
        );
        return false;
    }
    let dir = models_cache("nvrtc");
    if nvrtc_loaded || !dir.join("libnvrtc.so").exists() {
        return false;
    }
    let path = match std::env::var("LD_LIBRARY_PATH") {
        Ok(p) if !p.is_empty() => format!("{}:{p}", dir.display()),
        _ => dir.display().to_string(),
    };
    eprintln!("NVRTC from {}: running {test} again with it", dir.display());
    let exe = std::env::current_exe().expect("the test executable's path");
    let status = std::process::Command::new(exe)
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env("LD_LIBRARY_PATH", path)
        .env(CHILD, "1")
        .status()
        .expect("running the test again");
    assert!(
        status.success(),
        "{test} failed with the NVRTC cached in {}",
        dir.display()
    );
    true
}

/// An f32 tiny model of `arch` for gradient tests: tied embeddings for Qwen3,
/// a sliding window of 5 positions for Mistral.
pub fn write_tiny_f32(dir: &Path, arch: &'static str, seed: u64) -> io::Result<()> {
    let spec = TinySpec {
        dtype: Dtype::F32,
        tie_embeddings: arch == "Qwen3ForCausalLM",
        ..TinySpec::with_arch(arch)
    };
    write_tiny_model(dir, &spec, seed)?;
    if arch == "MistralForCausalLM" {
        let p = dir.join("config.json");
        let mut v: Value =
            serde_json::from_str(&std::fs::read_to_string(&p)?).map_err(io::Error::other)?;
        v["sliding_window"] = json!(5);
        std::fs::write(&p, v.to_string())?;
    }
    Ok(())
}

/// Write a tiny random-weight model in the Hugging Face layout into `dir` (created if needed).
///
/// Linear weights and biases are drawn from N(0, 0.1²), norm weights are
/// 1 + N(0, 0.01²), all from a `StdRng` seeded with `seed`, so the same
/// `(spec, seed)` always produces byte-identical files.
pub fn write_tiny_model(dir: &Path, spec: &TinySpec, seed: u64) -> io::Result<()> {
    check_spec(spec)?;
    std::fs::create_dir_all(dir)?;
    write_json(&dir.join("config.json"), &spec.config_json())?;
    write_json(
        &dir.join("generation_config.json"),
        &json!({"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "do_sample": false}),
    )?;
    std::fs::write(dir.join("tokenizer.json"), byte_level_tokenizer_json())?;
    let mut tc = json!({
        "add_bos_token": true,
        "add_eos_token": false,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "model_max_length": spec.max_positions,
        "tokenizer_class": "PreTrainedTokenizerFast",
    });
    if let Some(t) = &spec.chat_template {
        tc["chat_template"] = Value::String(t.clone());
    }
    write_json(&dir.join("tokenizer_config.json"), &tc)?;

    // Generate every tensor in sorted-name order so the values do not depend on sharding.
    let mut rng = StdRng::seed_from_u64(seed);
    let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = spec
        .tensor_shapes()
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let is_norm = name.ends_with("norm.weight");
            let values: Vec<f32> = (0..n)
                .map(|_| {
                    if is_norm {
                        1.0 + 0.01 * normal(&mut rng)
                    } else {
                        0.1 * normal(&mut rng)
                    }
                })
                .collect();
            Ok((name, shape, to_le_bytes(spec.dtype, &values)?))
        })
        .collect::<io::Result<_>>()?;

    let write_file = |path: &Path, group: &[(String, Vec<usize>, Vec<u8>)]| -> io::Result<()> {
        let views = group
            .iter()
            .map(|(n, s, b)| {
                TensorView::new(spec.dtype, s.clone(), b)
                    .map(|v| (n.clone(), v))
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{n}: {e}")))
            })
            .collect::<io::Result<HashMap<String, TensorView>>>()?;
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        safetensors::serialize_to_file(views, Some(meta), path)
            .map_err(|e| io::Error::other(format!("{}: {e}", path.display())))
    };

    if spec.shards == 1 {
        return write_file(&dir.join("model.safetensors"), &tensors);
    }
    let n = spec.shards;
    let per = tensors.len().div_ceil(n);
    let mut weight_map = BTreeMap::new();
    let mut total_size = 0usize;
    for s in 0..n {
        let group = &tensors[(s * per).min(tensors.len())..((s + 1) * per).min(tensors.len())];
        let file = format!("model-{:05}-of-{:05}.safetensors", s + 1, n);
        for (name, shape, _) in group {
            weight_map.insert(name.clone(), Value::String(file.clone()));
            total_size += shape.iter().product::<usize>() * dtype_size(spec.dtype);
        }
        write_file(&dir.join(&file), group)?;
    }
    write_json(
        &dir.join("model.safetensors.index.json"),
        &json!({"metadata": {"total_size": total_size}, "weight_map": weight_map}),
    )
}

/// Attention inputs for `n` tokens, uniform in [-1, 1): q and the output
/// gradient [n × heads × head_dim], k and v [n × kv_heads × head_dim].
pub fn random_attention_inputs(
    rng: &mut impl Rng,
    n: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
) -> [Vec<f32>; 4] {
    let mut r =
        |len: usize| -> Vec<f32> { (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect() };
    let (q, k) = (n * heads * head_dim, n * kv_heads * head_dim);
    [r(q), r(k), r(k), r(q)]
}

/// GPT-2's reversible byte → printable-unicode mapping (`bytes_to_unicode`), indexed by byte.
pub fn bytes_to_unicode() -> [char; 256] {
    let mut out = ['\0'; 256];
    let mut extra = 0u32;
    for b in 0..256u32 {
        let printable = (b'!' as u32..=b'~' as u32).contains(&b)
            || (0xA1..=0xAC).contains(&b)
            || (0xAE..=0xFF).contains(&b);
        out[b as usize] = if printable {
            char::from_u32(b).unwrap()
        } else {
            let c = char::from_u32(256 + extra).unwrap();
            extra += 1;
            c
        };
    }
    out
}

/// A `tokenizers`-format `tokenizer.json`: byte-level BPE whose vocabulary is the
/// 256 GPT-2 byte symbols (id = byte value), no merges, and the special added
/// tokens `<s>` = 256 and `</s>` = 257.
pub fn byte_level_tokenizer_json() -> String {
    let mut vocab = serde_json::Map::new();
    for (b, c) in bytes_to_unicode().iter().enumerate() {
        vocab.insert(c.to_string(), json!(b));
    }
    let added = |id: u32, content: &str| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
               "normalized": false, "special": true})
    };
    let v = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [added(BOS_ID, "<s>"), added(EOS_ID, "</s>")],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": false,
            "vocab": vocab,
            "merges": []
        }
    });
    serde_json::to_string_pretty(&v).expect("JSON serialization of a Value cannot fail")
}

/// Rewrite tensor `name` of the single-file model in `dir` (`model.safetensors`):
/// `edit` gets its values as f32 and may change them; they are stored back in the
/// tensor's own dtype. For tests of corrupt or extreme weights.
pub fn edit_tensor(dir: &Path, name: &str, edit: impl FnOnce(&mut Vec<f32>)) -> io::Result<()> {
    let mut edit = Some(edit);
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path)?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
    let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut found = false;
    for (n, v) in st.tensors() {
        let mut data = v.data().to_vec();
        if n == name && !found {
            found = true;
            let mut values: Vec<f32> = match v.dtype() {
                Dtype::F32 => data
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
                Dtype::F16 => data
                    .chunks_exact(2)
                    .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
                Dtype::BF16 => data
                    .chunks_exact(2)
                    .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
                other => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("{name} is {other:?}"),
                    ))
                }
            };
            if let Some(f) = edit.take() {
                f(&mut values);
            }
            data = to_le_bytes(v.dtype(), &values)?;
        }
        tensors.push((n, v.dtype(), v.shape().to_vec(), data));
    }
    if !found {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no tensor {name} in {}", path.display()),
        ));
    }
    let views = tensors
        .iter()
        .map(|(n, d, s, b)| {
            TensorView::new(*d, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| io::Error::other(e.to_string()))
        })
        .collect::<io::Result<HashMap<String, TensorView>>>()?;
    safetensors::serialize_to_file(views, None, &path).map_err(|e| io::Error::other(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ARCHS: [&str; 5] = [
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
        "Phi3ForCausalLM",
    ];

    fn tmpdir(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("dpllm-testkit-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn writes_every_family() {
        for (i, arch) in ARCHS.iter().enumerate() {
            let spec = TinySpec {
                dtype: [Dtype::BF16, Dtype::F16, Dtype::F32][i % 3],
                tie_embeddings: i % 2 == 1,
                ..TinySpec::with_arch(arch)
            };
            let d = tmpdir(arch);
            write_tiny_model(&d, &spec, 7).unwrap();
            for f in [
                "config.json",
                "generation_config.json",
                "tokenizer.json",
                "tokenizer_config.json",
                "model.safetensors",
            ] {
                assert!(d.join(f).is_file(), "{arch}: {f} missing");
            }
            let cfg: Value =
                serde_json::from_str(&std::fs::read_to_string(d.join("config.json")).unwrap())
                    .unwrap();
            assert_eq!(cfg["architectures"][0], *arch);
            assert_eq!(cfg["vocab_size"], TINY_VOCAB);
            assert_eq!(cfg["head_dim"], 8);
            let bytes = std::fs::read(d.join("model.safetensors")).unwrap();
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            let expect = spec.tensor_shapes();
            assert_eq!(st.len(), expect.len(), "{arch}");
            let mut params = 0;
            for (name, shape) in &expect {
                let t = st
                    .tensor(name)
                    .unwrap_or_else(|_| panic!("{arch}: {name} missing"));
                assert_eq!(t.shape(), shape.as_slice(), "{name}");
                assert_eq!(t.dtype(), spec.dtype);
                params += t.shape().iter().product::<usize>();
            }
            assert_eq!(params, spec.param_count());
            assert_eq!(st.tensor("lm_head.weight").is_ok(), !spec.tie_embeddings);
            std::fs::remove_dir_all(&d).unwrap();
        }
    }

    #[test]
    fn family_specific_tensors() {
        let names = |arch| {
            TinySpec::with_arch(arch)
                .tensor_shapes()
                .into_iter()
                .map(|(n, _)| n)
                .collect::<Vec<_>>()
        };
        let phi = names("Phi3ForCausalLM");
        assert!(phi.contains(&"model.layers.0.self_attn.qkv_proj.weight".to_string()));
        assert!(phi.contains(&"model.layers.1.mlp.gate_up_proj.weight".to_string()));
        assert!(!phi
            .iter()
            .any(|n| n.contains("q_proj") || n.contains("gate_proj")));
        assert!(
            names("Qwen2ForCausalLM").contains(&"model.layers.0.self_attn.k_proj.bias".to_string())
        );
        assert!(names("Qwen3ForCausalLM")
            .contains(&"model.layers.1.self_attn.q_norm.weight".to_string()));
        // Phi3 qkv: (4 + 2*2) heads * 8 = 64 rows.
        let s = TinySpec::with_arch("Phi3ForCausalLM").tensor_shapes();
        assert!(s.contains(&(
            "model.layers.0.self_attn.qkv_proj.weight".to_string(),
            vec![64, 32]
        )));
    }

    #[test]
    fn sharded_layout_and_determinism() {
        let spec = TinySpec {
            shards: 3,
            chat_template: Some("{{ bos_token }}".into()),
            ..TinySpec::default()
        };
        let d = tmpdir("sharded");
        write_tiny_model(&d, &spec, 1).unwrap();
        let idx: Value = serde_json::from_str(
            &std::fs::read_to_string(d.join("model.safetensors.index.json")).unwrap(),
        )
        .unwrap();
        let map = idx["weight_map"].as_object().unwrap();
        assert_eq!(map.len(), spec.tensor_shapes().len());
        for s in 1..=3 {
            let f = format!("model-{s:05}-of-00003.safetensors");
            assert!(d.join(&f).is_file(), "{f}");
            assert!(map.values().any(|v| v == &Value::String(f.clone())));
        }
        assert!(!d.join("model.safetensors").exists());
        let tc: Value = serde_json::from_str(
            &std::fs::read_to_string(d.join("tokenizer_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(tc["chat_template"], "{{ bos_token }}");
        // Same seed, same bytes.
        let d2 = tmpdir("sharded2");
        write_tiny_model(&d2, &spec, 1).unwrap();
        let f = "model-00002-of-00003.safetensors";
        assert_eq!(
            std::fs::read(d.join(f)).unwrap(),
            std::fs::read(d2.join(f)).unwrap()
        );
        std::fs::remove_dir_all(&d).unwrap();
        std::fs::remove_dir_all(&d2).unwrap();
    }

    #[test]
    fn tokenizer_json_shape() {
        let v: Value = serde_json::from_str(&byte_level_tokenizer_json()).unwrap();
        let vocab = v["model"]["vocab"].as_object().unwrap();
        assert_eq!(vocab.len(), 256);
        assert_eq!(vocab["A"], 65);
        assert_eq!(vocab["Ġ"], 32); // space
        assert_eq!(vocab["Ċ"], 10); // newline
        assert_eq!(v["added_tokens"][1]["content"], "</s>");
        assert_eq!(v["added_tokens"][1]["id"], 257);
        let m = bytes_to_unicode();
        let mut sorted = m.to_vec();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 256, "mapping must be injective");
    }

    #[test]
    fn bad_spec_is_an_error() {
        let d = tmpdir("bad");
        assert!(write_tiny_model(&d, &TinySpec::with_arch("GPT2LMHeadModel"), 0).is_err());
        assert!(write_tiny_model(
            &d,
            &TinySpec {
                kv_heads: 3,
                ..TinySpec::default()
            },
            0
        )
        .is_err());
        let _ = std::fs::remove_dir_all(&d);
    }
}
