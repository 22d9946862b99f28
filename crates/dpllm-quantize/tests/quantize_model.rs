//! End-to-end tests of `quantize_model` on tiny random-weight checkpoints of every
//! family: the written file, read back by an independent unpacker in this test,
//! must give the same logits as a dense model built from those dequantized
//! weights, at every bit-width; bad files and bad runs must fail cleanly.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use dpllm_engine::{LoadOptions, Model, Precision};
use dpllm_format::anyprec::{self, ANYPREC_WEIGHTS};
use dpllm_format::{Checkpoint, ModelConfig};
use dpllm_quantize::model_quant::{quantize_model, QuantizeOptions};
use dpllm_testkit::{write_tiny_model, TinySpec, TINY_VOCAB};
use half::f16;
use safetensors::{Dtype, View};

fn family_specs() -> Vec<TinySpec> {
    // intermediate 72 makes down_proj's rows 72 columns long: not a multiple of 32.
    vec![
        TinySpec {
            intermediate: 72,
            ..TinySpec::default()
        },
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
            layers: 3,
            ..TinySpec::with_arch("Qwen3ForCausalLM")
        },
        TinySpec {
            dtype: Dtype::F16,
            heads: 8,
            kv_heads: 4,
            hidden: 64,
            intermediate: 40,
            ..TinySpec::with_arch("Phi3ForCausalLM")
        },
    ]
}

/// An owned tensor for `safetensors::serialize_to_file`.
struct Owned {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl View for &Owned {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        (&self.data[..]).into()
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn f32_tensor(shape: Vec<usize>, v: &[f32]) -> Owned {
    Owned {
        dtype: Dtype::F32,
        shape,
        data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

/// Dequantize linear `prefix` at `bits` straight from the file bytes (independent of the engine's kernels).
fn dequantize_from_file(
    ck: &Checkpoint,
    prefix: &str,
    rows: usize,
    cols: usize,
    bits: u32,
) -> Vec<f32> {
    let (_, planes) = ck.raw(&anyprec::planes_name(prefix)).unwrap();
    let (_, lut) = ck.raw(&anyprec::lut_name(prefix, bits)).unwrap();
    let words = cols.div_ceil(32);
    // Plane-major: [8][rows][words].
    let word = |r: usize, j: usize, w: usize| {
        let o = ((j * rows + r) * words + w) * 4;
        u32::from_le_bytes(planes[o..o + 4].try_into().unwrap())
    };
    let mut out = vec![0f32; rows * cols];
    for r in 0..rows {
        for c in 0..cols {
            let mut idx = 0usize;
            for j in 0..bits as usize {
                idx = (idx << 1) | ((word(r, j, c / 32) >> (c % 32)) & 1) as usize;
            }
            let o = (r * (1 << bits) + idx) * 2;
            out[r * cols + c] = f16::from_bits(u16::from_le_bytes([lut[o], lut[o + 1]])).to_f32();
        }
    }
    out
}

/// A dense f32 Hugging Face checkpoint whose block linears are the `bits`-bit weights of `q_dir`.
fn dense_reference(src: &Path, q_dir: &Path, bits: u32, out: &Path) {
    std::fs::create_dir_all(out).unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(src.join(f), out.join(f)).unwrap();
    }
    let cfg = ModelConfig::from_dir(src).unwrap();
    let orig = Checkpoint::open(src).unwrap();
    let q = Checkpoint::open_file(&q_dir.join(ANYPREC_WEIGHTS)).unwrap();
    let mut tensors: HashMap<String, Owned> = HashMap::new();
    for (name, info) in orig.tensors() {
        tensors.insert(
            name.to_string(),
            f32_tensor(
                info.shape.clone(),
                &orig.tensor_f32(name, &info.shape).unwrap(),
            ),
        );
    }
    for s in cfg.linears() {
        let w = dequantize_from_file(&q, &s.prefix, s.rows, s.cols, bits);
        tensors.insert(s.weight_name(), f32_tensor(vec![s.rows, s.cols], &w));
    }
    let views: Vec<(String, &Owned)> = tensors.iter().map(|(k, v)| (k.clone(), v)).collect();
    safetensors::serialize_to_file(views, None, &out.join("model.safetensors")).unwrap();
}

fn logits(model: &Model, ids: &[u32]) -> Vec<f32> {
    let mut cache = model.new_cache(ids.len());
    model.forward_all(ids, &mut cache).unwrap()
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn tokens(n: usize, seed: u64) -> Vec<u32> {
    (0..n as u64)
        .map(|i| ((i * 7919 + seed * 104729) % TINY_VOCAB as u64) as u32)
        .collect()
}

#[test]
fn quantized_model_matches_dequantized_reference_at_every_bit_width() {
    for (fi, spec) in family_specs().into_iter().enumerate() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        write_tiny_model(&src, &spec, 40 + fi as u64).unwrap();
        let out = t.path().join("q");
        let report = quantize_model(&src, &out, &QuantizeOptions::default()).unwrap();
        let cfg = ModelConfig::from_dir(&src).unwrap();
        assert_eq!(report.linears, cfg.linears().len(), "{}", spec.arch);
        assert!(out.join("config.json").is_file() && out.join("tokenizer.json").is_file());
        // Prefill (GEMM path, 12 tokens) and single-token decode (GEMV path).
        let ids = tokens(12, fi as u64);
        let orig = logits(&Model::load(&src).unwrap(), &ids);
        let mut prev_err = f32::INFINITY;
        for bits in 3..=8u32 {
            let m = Model::load_with(
                &out,
                &LoadOptions {
                    max_bits: Some(bits),
                    ..Default::default()
                },
            )
            .unwrap();
            assert_eq!(m.bits_range(), Some((3, bits)));
            let ref_dir = t.path().join(format!("ref{bits}"));
            dense_reference(&src, &out, bits, &ref_dir);
            let want = logits(&Model::load(&ref_dir).unwrap(), &ids);
            let got = logits(&m, &ids);
            let err = max_abs(&got, &want);
            assert!(
                err < 1e-4,
                "{} at {bits} bits: logits differ from the dequantized reference by {err}",
                spec.arch
            );
            let mut cache = m.new_cache(ids.len());
            m.forward_all(&ids[..11], &mut cache).unwrap();
            let last = m.forward_last(&ids[11..], &mut cache).unwrap();
            let err = max_abs(&last, &want[11 * cfg.vocab_size..]);
            // The decode GEMV rounds its operands to 16-bit fixed point (about 1e-4 here).
            assert!(
                err < 1e-3,
                "{} at {bits} bits: decode step differs by {err}",
                spec.arch
            );
            // Quantization error shrinks as bits grow (random weights: a loose, monotone trend).
            let vs_orig = max_abs(&got, &orig);
            assert!(
                vs_orig < prev_err * 1.05 || vs_orig < 1e-3,
                "{}: {bits} bits is worse than {} bits",
                spec.arch,
                bits - 1
            );
            prev_err = vs_orig;
        }
        assert!(
            prev_err < 0.05,
            "{}: 8-bit logits are {prev_err} from the original",
            spec.arch
        );
        // Per-linear weighted errors never grow with bits.
        for (name, errs) in &report.errors {
            assert!(
                errs.windows(2).all(|p| p[1] <= p[0] * (1.0 + 1e-6)),
                "{name}: {errs:?}"
            );
        }
    }
}

/// Σ F·(W − Q₃(W))² over every linear, with Q₃ read from the quantized file.
fn weighted_error_3bit(src: &Path, q: &Path, f: &Checkpoint) -> f64 {
    let cfg = ModelConfig::from_dir(src).unwrap();
    let orig = Checkpoint::open(src).unwrap();
    let qc = Checkpoint::open_file(&q.join(ANYPREC_WEIGHTS)).unwrap();
    let mut total = 0.0;
    for s in cfg.linears() {
        let w = orig
            .tensor_f32(&s.weight_name(), &[s.rows, s.cols])
            .unwrap();
        let fw = f.tensor_f32(&s.weight_name(), &[s.rows, s.cols]).unwrap();
        let d = dequantize_from_file(&qc, &s.prefix, s.rows, s.cols, 3);
        total += w
            .iter()
            .zip(&fw)
            .zip(&d)
            .map(|((a, f), b)| *f as f64 * ((a - b) as f64).powi(2))
            .sum::<f64>();
    }
    total
}

#[test]
fn sensitivity_weighting_minimizes_the_weighted_error() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    write_tiny_model(
        &src,
        &TinySpec {
            dtype: Dtype::F32,
            ..TinySpec::default()
        },
        5,
    )
    .unwrap();
    let model = Model::load(&src).unwrap();
    let seqs = vec![tokens(24, 1), tokens(24, 2)];
    let s = dpllm_quantize::sensitivity::accumulate_sensitivities(&model, &seqs, false).unwrap();
    let sens = t.path().join("sens.safetensors");
    dpllm_quantize::sensitivity::save(&s, &sens, &serde_json::Value::Null).unwrap();
    let (plain, weighted) = (t.path().join("plain"), t.path().join("weighted"));
    quantize_model(&src, &plain, &QuantizeOptions::default()).unwrap();
    quantize_model(
        &src,
        &weighted,
        &QuantizeOptions {
            sensitivity: Some(sens.clone()),
            ..Default::default()
        },
    )
    .unwrap();
    let f = Checkpoint::open_file(&sens).unwrap();
    let (ep, ew) = (
        weighted_error_3bit(&src, &plain, &f),
        weighted_error_3bit(&src, &weighted, &f),
    );
    // The 3-bit seed is the exact weighted k-means optimum, so it can only beat plain k-means
    // on the weighted objective (up to f16 rounding of the centroids).
    assert!(
        ew <= ep * 1.001,
        "sensitivity-weighted 3-bit error {ew} exceeds plain k-means {ep}"
    );
    assert!(
        ew < ep * 0.99,
        "sensitivity weighting changed nothing ({ew} vs {ep})"
    );
    let info = Checkpoint::open_file(&weighted.join(ANYPREC_WEIGHTS))
        .unwrap()
        .metadata()
        .clone();
    assert_eq!(
        info.get("sensitivity").map(String::as_str),
        Some(sens.to_str().unwrap())
    );
}

/// Rewrite the any-precision file of `dir` through `edit(name, tensor)` and a metadata edit.
fn rewrite(
    dir: &Path,
    edit_meta: impl Fn(&mut HashMap<String, String>),
    edit: impl Fn(&str, &mut Owned),
) {
    let path = dir.join(ANYPREC_WEIGHTS);
    let ck = Checkpoint::open_file(&path).unwrap();
    let mut meta = ck.metadata().clone();
    edit_meta(&mut meta);
    let mut tensors = Vec::new();
    for (name, info) in ck.tensors() {
        let mut o = Owned {
            dtype: info.dtype,
            shape: info.shape.clone(),
            data: ck.raw(name).unwrap().1.to_vec(),
        };
        edit(name, &mut o);
        tensors.push((name.to_string(), o));
    }
    drop(ck);
    let views: Vec<(String, &Owned)> = tensors.iter().map(|(k, v)| (k.clone(), v)).collect();
    safetensors::serialize_to_file(views, Some(meta), &path).unwrap();
}

/// Rewrite the any-precision file of `dir` without tensor `name`.
fn rewrite_drop(dir: &Path, name: &str) {
    let path = dir.join(ANYPREC_WEIGHTS);
    let ck = Checkpoint::open_file(&path).unwrap();
    let meta = ck.metadata().clone();
    let tensors: Vec<(String, Owned)> = ck
        .tensors()
        .into_iter()
        .filter(|(n, _)| *n != name)
        .map(|(n, i)| {
            (
                n.to_string(),
                Owned {
                    dtype: i.dtype,
                    shape: i.shape.clone(),
                    data: ck.raw(n).unwrap().1.to_vec(),
                },
            )
        })
        .collect();
    drop(ck);
    let views: Vec<(String, &Owned)> = tensors.iter().map(|(k, v)| (k.clone(), v)).collect();
    safetensors::serialize_to_file(views, Some(meta), &path).unwrap();
}

fn load_err(dir: &Path, max_bits: Option<u32>) -> String {
    match Model::load_with(
        dir,
        &LoadOptions {
            max_bits,
            ..Default::default()
        },
    ) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn quantized_copy(t: &Path, name: &str) -> (PathBuf, PathBuf) {
    let src = t.join(format!("{name}-src"));
    write_tiny_model(&src, &TinySpec::default(), 3).unwrap();
    let q = t.join(name);
    quantize_model(&src, &q, &QuantizeOptions::default()).unwrap();
    (src, q)
}

#[test]
fn corrupt_or_mismatched_files_get_clear_errors() {
    let t = tempfile::tempdir().unwrap();
    let tp = t.path();

    let (_, q) = quantized_copy(tp, "trunc");
    let path = q.join(ANYPREC_WEIGHTS);
    let len = std::fs::metadata(&path).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(len - 100).unwrap();
    let e = load_err(&q, None);
    assert!(e.contains(ANYPREC_WEIGHTS), "truncated file: {e}");

    let (_, q) = quantized_copy(tp, "version");
    rewrite(
        &q,
        |m| drop(m.insert("version".into(), "99".into())),
        |_, _| {},
    );
    let e = load_err(&q, None);
    assert!(e.contains("format version 99"), "{e}");

    let (_, q) = quantized_copy(tp, "nometa");
    rewrite(&q, |m| drop(m.remove("format")), |_, _| {});
    assert!(load_err(&q, None).contains("not a dpllm any-precision file"));

    let (_, q) = quantized_copy(tp, "lut");
    rewrite(
        &q,
        |_| {},
        |name, o| {
            if name == "model.layers.1.mlp.up_proj.lut4" {
                o.shape = vec![o.shape[0] * 2, 8];
            }
        },
    );
    let e = load_err(&q, None);
    assert!(
        e.contains("model.layers.1.mlp.up_proj.lut4") && e.contains("expected F16"),
        "{e}"
    );

    let (_, q) = quantized_copy(tp, "nan");
    rewrite(
        &q,
        |_| {},
        |name, o| {
            if name == "model.layers.0.self_attn.q_proj.lut3" {
                o.data[0..2].copy_from_slice(&f16::NAN.to_bits().to_le_bytes());
            }
        },
    );
    assert!(load_err(&q, None).contains("not finite"));

    let (_, q) = quantized_copy(tp, "planes");
    rewrite(
        &q,
        |_| {},
        |name, o| {
            if name == "model.layers.0.self_attn.k_proj.planes" {
                o.dtype = Dtype::I32;
            }
        },
    );
    assert!(load_err(&q, None).contains("model.layers.0.self_attn.k_proj.planes"));

    let (_, q) = quantized_copy(tp, "arch");
    let cfg = std::fs::read_to_string(q.join("config.json"))
        .unwrap()
        .replace("LlamaForCausalLM", "MistralForCausalLM");
    std::fs::write(
        q.join("config.json"),
        cfg.replace("\"llama\"", "\"mistral\""),
    )
    .unwrap();
    assert!(load_err(&q, None).contains("quantized a LlamaForCausalLM"));

    let (src, q) = quantized_copy(tp, "bits");
    assert!(load_err(&q, Some(9)).contains("cannot load at 9 bits"));
    assert!(load_err(&q, Some(2)).contains("cannot load at 2 bits"));
    assert!(load_err(&src, Some(4)).contains("not a dpllm any-precision model"));
    let m = Model::load_with(
        &q,
        &LoadOptions {
            max_bits: Some(5),
            ..Default::default()
        },
    )
    .unwrap();
    let runs_at = |m: &Model, b: u32| m.check_precision(Precision::Uniform(b)).is_ok();
    assert!(!runs_at(&m, 6) && !runs_at(&m, 2) && runs_at(&m, 4));
    assert!(!runs_at(&Model::load(&src).unwrap(), 4));
}

/// Entries of `dir` whose name starts with `prefix`.
fn leftovers(dir: &Path, prefix: &str) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(prefix))
        .collect()
}

#[test]
fn failed_runs_leave_no_output_behind() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    write_tiny_model(&src, &TinySpec::default(), 8).unwrap();
    // A sensitivity file of another shape: rejected before anything is written.
    let other = t.path().join("other");
    write_tiny_model(
        &other,
        &TinySpec {
            hidden: 64,
            heads: 4,
            ..TinySpec::default()
        },
        9,
    )
    .unwrap();
    let om = Model::load(&other).unwrap();
    let s =
        dpllm_quantize::sensitivity::accumulate_sensitivities(&om, &[tokens(8, 0)], false).unwrap();
    let sens = t.path().join("sens.safetensors");
    dpllm_quantize::sensitivity::save(&s, &sens, &serde_json::Value::Null).unwrap();
    let out = t.path().join("q");
    let e = quantize_model(
        &src,
        &out,
        &QuantizeOptions {
            sensitivity: Some(sens),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(format!("{e:#}").contains("has shape"), "{e:#}");
    assert!(!out.exists());

    // A source tensor that is corrupt is only found while writing: the temporary
    // directory goes away and OUT never appears.
    let bad = t.path().join("bad");
    write_tiny_model(
        &bad,
        &TinySpec {
            dtype: Dtype::F32,
            ..TinySpec::default()
        },
        10,
    )
    .unwrap();
    let st = bad.join("model.safetensors");
    let mut bytes = std::fs::read(&st).unwrap();
    let start = data_start(&bytes, "model.layers.1.mlp.down_proj.weight");
    bytes[start + 8..start + 12].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(&st, &bytes).unwrap();
    let out = t.path().join("q2");
    let e = quantize_model(&bad, &out, &QuantizeOptions::default()).unwrap_err();
    assert!(
        format!("{e:#}").contains("model.layers.1.mlp.down_proj"),
        "{e:#}"
    );
    assert!(!out.exists(), "a failed run left {}", out.display());
    assert!(
        leftovers(t.path(), ".q2").is_empty(),
        "temporary files left: {:?}",
        leftovers(t.path(), ".q2")
    );

    // Existing output is kept unless --force; an any-precision source is refused.
    let good = t.path().join("good");
    quantize_model(&src, &good, &QuantizeOptions::default()).unwrap();
    let e = quantize_model(&src, &good, &QuantizeOptions::default()).unwrap_err();
    assert!(format!("{e:#}").contains("already exists"));
    quantize_model(
        &src,
        &good,
        &QuantizeOptions {
            overwrite: true,
            ..Default::default()
        },
    )
    .unwrap();
    let e = quantize_model(&good, &t.path().join("q3"), &QuantizeOptions::default()).unwrap_err();
    assert!(format!("{e:#}").contains("already an any-precision model"));
    let e = quantize_model(
        &src,
        &t.path().join("missing/q"),
        &QuantizeOptions::default(),
    )
    .unwrap_err();
    assert!(format!("{e:#}").contains("does not exist"), "{e:#}");
    for seed_bits in [0, 2, 5] {
        let e = quantize_model(
            &src,
            &t.path().join("q4"),
            &QuantizeOptions {
                seed_bits,
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("seed precision"));
    }
    // A quantized model missing one linear's planes names that tensor.
    rewrite_drop(&good, "model.layers.1.mlp.gate_proj.planes");
    let e = Model::load(&good)
        .err()
        .expect("loading must fail")
        .to_string();
    assert!(e.contains("model.layers.1.mlp.gate_proj.planes"), "{e}");
}

/// Byte offset in a safetensors `file` where tensor `name`'s data starts.
fn data_start(file: &[u8], name: &str) -> usize {
    let n = u64::from_le_bytes(file[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&file[8..8 + n]).unwrap();
    8 + n + header[name]["data_offsets"][0].as_u64().unwrap() as usize
}

#[test]
fn a_q8_0_output_layer_is_kept_in_8_bit_blocks() {
    let spec = TinySpec {
        dtype: Dtype::F32,
        tie_embeddings: true,
        hidden: 64,
        heads: 4,
        kv_heads: 2,
        ..TinySpec::default()
    };
    let t = tempfile::tempdir().unwrap();
    let (gguf, q) = (t.path().join("q8.gguf"), t.path().join("q"));
    let emb = dpllm_testkit::write_tiny_gguf_with(&gguf, &spec, 3, None, true).unwrap();
    quantize_model(&gguf, &q, &QuantizeOptions::default()).unwrap();
    let ck = dpllm_format::Checkpoint::open_file(&q.join(dpllm_format::anyprec::ANYPREC_WEIGHTS))
        .unwrap();
    assert!(
        ck.contains("model.embed_tokens.weight.q8_0") && !ck.contains("model.embed_tokens.weight")
    );
    let m = Model::load(&q).unwrap();
    assert_eq!(m.lm_head().storage(), "q8_0");
    assert_eq!(
        m.embedding_f32(),
        emb,
        "the blocks are copied, not re-rounded"
    );
    let ids: Vec<u32> = (0..10).collect();
    assert!(m
        .forward_all(&ids, &mut m.new_cache(10))
        .unwrap()
        .iter()
        .all(|v| v.is_finite()));
}
