//! Property tests over the readers of untrusted bytes in this crate (plans: in
//! `plan.rs`'s tests, beside their fixture): any byte
//! string, and any small mutation of a valid file, gives `Ok` or a clear error,
//! never a panic. Bounded case counts keep the run to seconds on CI.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::Path;

use dpllm_format::anyprec::{self, AnyPrecInfo};
use dpllm_format::st_writer::{write_safetensors, TensorSpec};
use dpllm_format::{Checkpoint, ModelConfig};
use proptest::prelude::*;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 1024,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Byte edits (position, value) and an optional truncation, applied to `base`.
fn mutate(base: &[u8], edits: &[(usize, u8)], truncate: Option<usize>) -> Vec<u8> {
    let mut b = base.to_vec();
    for &(i, v) in edits {
        if !b.is_empty() {
            let n = b.len();
            b[i % n] = v;
        }
    }
    if let Some(t) = truncate {
        b.truncate(t % (base.len() + 1));
    }
    b
}

/// A small valid any-precision file: one linear of 3 rows x 40 columns, seed 3.
fn anyprec_file(dir: &Path) -> Vec<u8> {
    let (rows, cols) = (3usize, 40usize);
    let words = anyprec::words_per_row(cols);
    let mut specs = vec![TensorSpec {
        name: anyprec::planes_name("l"),
        dtype: "U32",
        shape: vec![8, rows, words],
    }];
    for b in 3..=8u32 {
        specs.push(TensorSpec {
            name: anyprec::lut_name("l", b),
            dtype: "F16",
            shape: vec![rows, 1 << b],
        });
    }
    let info = AnyPrecInfo {
        version: anyprec::FORMAT_VERSION,
        seed_bits: 3,
        max_bits: 8,
        architecture: "LlamaForCausalLM".into(),
        provenance: BTreeMap::new(),
    };
    let path = dir.join("a.safetensors");
    write_safetensors(
        &path,
        &specs,
        &info.to_metadata(),
        |i, w: &mut dyn Write| {
            let n = specs[i].nbytes();
            let bytes: Vec<u8> = (0..n)
                .map(|j| {
                    if i == 0 {
                        (j * 37) as u8
                    } else if j % 2 == 0 {
                        0x00
                    } else {
                        0x3c
                    }
                })
                .collect();
            w.write_all(&bytes)
        },
    )
    .unwrap();
    std::fs::read(&path).unwrap()
}

/// Open `bytes` as a safetensors file and read every tensor the way loaders do.
fn read_safetensors(dir: &Path, bytes: &[u8]) {
    let path = dir.join("f.safetensors");
    std::fs::write(&path, bytes).unwrap();
    let Ok(ck) = Checkpoint::open_file(&path) else {
        return;
    };
    for (name, info) in ck.tensors() {
        let _ = ck.raw(name);
        let _ = ck.tensor(name, &info.shape);
        let _ = ck.tensor_i64(name);
    }
    if let Ok(info) = AnyPrecInfo::from_metadata(ck.metadata(), &path) {
        let _ = anyprec::read_planes(&ck, "l", 3, 40, 8);
        for b in info.seed_bits..=info.max_bits {
            let _ = anyprec::read_lut(&ck, "l", 3, b);
        }
        let _ = anyprec::read_sq_err(&ck, "l", info.seed_bits);
    }
}

const CONFIG: &str = r#"{"architectures":["Qwen3ForCausalLM"],"hidden_size":64,"intermediate_size":128,"num_hidden_layers":2,
"num_attention_heads":4,"num_key_value_heads":2,"head_dim":16,"vocab_size":100,"rms_norm_eps":1e-6,"max_position_embeddings":512,
"rope_scaling":{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":64},
"sliding_window":32,"tie_word_embeddings":true,"bos_token_id":1,"eos_token_id":[2,3],"partial_rotary_factor":0.5}"#;

/// JSON values a corrupt or hostile config may hold.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<u64>().prop_map(serde_json::Value::from),
        any::<f64>()
            .prop_filter("JSON has no NaN or inf", |f| f.is_finite())
            .prop_map(serde_json::Value::from),
        "[a-zA-Z0-9_]{0,12}".prop_map(serde_json::Value::from),
        Just(serde_json::json!([])),
        Just(serde_json::json!({})),
    ]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn arbitrary_bytes_are_no_safetensors_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let d = tempfile::tempdir().unwrap();
        read_safetensors(d.path(), &bytes);
    }

    #[test]
    fn mutated_anyprec_files_read_or_fail_cleanly(
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        truncate in proptest::option::of(any::<usize>()),
    ) {
        let d = tempfile::tempdir().unwrap();
        let base = anyprec_file(d.path());
        read_safetensors(d.path(), &mutate(&base, &edits, truncate));
    }

    #[test]
    fn header_text_edits_read_or_fail_cleanly(edits in proptest::collection::vec((0usize..600, b' '..=b'~'), 1..6)) {
        // Edits inside the JSON header (printable bytes): shapes, dtypes, offsets, metadata.
        let d = tempfile::tempdir().unwrap();
        let base = anyprec_file(d.path());
        let header_len = u64::from_le_bytes(base[..8].try_into().unwrap()) as usize;
        let edits: Vec<(usize, u8)> = edits.into_iter().map(|(i, v)| (8 + i % header_len, v)).collect();
        read_safetensors(d.path(), &mutate(&base, &edits, None));
    }

    #[test]
    fn any_metadata_map_gives_info_or_error(m in proptest::collection::hash_map("[a-z_]{1,10}", "[0-9a-zA-Z-]{0,6}", 0..8)) {
        let mut m: HashMap<String, String> = m;
        let _ = AnyPrecInfo::from_metadata(&m, Path::new("x"));
        m.insert("format".into(), anyprec::FORMAT_NAME.into());
        let _ = AnyPrecInfo::from_metadata(&m, Path::new("x"));
    }

    #[test]
    fn arbitrary_text_is_no_config_panic(text in ".{0,300}") {
        let _ = ModelConfig::from_json_str(&text, Path::new("config.json"));
    }

    #[test]
    fn configs_with_hostile_field_values_parse_or_fail_cleanly(
        fields in proptest::collection::vec((prop::sample::select(vec![
            "architectures", "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "vocab_size", "rms_norm_eps", "max_position_embeddings", "rope_theta",
            "rope_scaling", "rope_parameters", "partial_rotary_factor", "sliding_window", "use_sliding_window",
            "tie_word_embeddings", "bos_token_id", "eos_token_id", "hidden_act", "mlp_bias", "attention_bias",
        ]), json_value()), 1..5),
        scaling_field in prop::sample::select(vec!["factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings", "rope_type"]),
        scaling_value in json_value(),
    ) {
        let mut v: serde_json::Value = serde_json::from_str(CONFIG).unwrap();
        for (k, val) in fields {
            v[k] = val;
        }
        if v["rope_scaling"].is_object() {
            v["rope_scaling"][scaling_field] = scaling_value;
        }
        if let Ok(cfg) = ModelConfig::from_json_str(&v.to_string(), Path::new("config.json")) {
            // Whatever parses must give usable, overflow-free sizes.
            let _ = (cfg.q_dim(), cfg.kv_dim(), cfg.rotary_dim(), cfg.linears());
            prop_assert!(cfg.rms_norm_eps > 0.0 && cfg.num_heads % cfg.num_kv_heads == 0);
        }
    }
}
