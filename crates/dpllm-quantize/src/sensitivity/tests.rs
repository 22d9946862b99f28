//! Accumulation of sensitivities, the file format and calibration windows on tiny
//! random checkpoints (the gradients themselves are tested in `dpllm-grad`).

use super::*;
use dpllm_grad::engine_loss;
use dpllm_testkit::write_tiny_f32;

fn tiny(arch: &'static str, seed: u64) -> (tempfile::TempDir, Model) {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_f32(dir.path(), arch, seed).unwrap();
    let m = Model::load(dir.path()).unwrap();
    (dir, m)
}

fn random_tokens(seed: u64, n: usize, vocab: usize) -> Vec<u32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(0..vocab as u32)).collect()
}

#[test]
fn accumulation_is_the_sum_of_squared_gradients() {
    let (_d, m) = tiny("Qwen2ForCausalLM", 3);
    let gm = GradModel::from_model(&m);
    let seqs = vec![
        random_tokens(1, 9, m.config.vocab_size),
        random_tokens(2, 14, m.config.vocab_size),
    ];
    let s = accumulate_sensitivities(&m, &seqs, false).unwrap();
    let (_, g1) = gm.gradients(&seqs[0]).unwrap();
    let (_, g2) = gm.gradients(&seqs[1]).unwrap();
    assert_eq!(s.layers.len(), m.blocks.len());
    for (l, b) in m.blocks.iter().enumerate() {
        let names: Vec<&str> = b.linears().iter().map(|(n, _)| *n).collect();
        let got: Vec<&str> = s.layers[l].iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(got, names);
        for (i, (_, f)) in s.layers[l].iter().enumerate() {
            let (o, inp) = (
                b.linears()[i].1.out_features(),
                b.linears()[i].1.in_features(),
            );
            assert_eq!(s.shapes[l][i], [o, inp]);
            for e in 0..f.len() {
                let want = g1[l][i][e] * g1[l][i][e] + g2[l][i][e] * g2[l][i][e];
                assert!(
                    (f[e] - want).abs() <= 1e-6 * want.abs() + 1e-12,
                    "layer {l} linear {i} elem {e}: {} vs {want}",
                    f[e]
                );
            }
            assert!(f.iter().all(|x| x.is_finite() && *x >= 0.0));
        }
    }
    // Bad input is an error, not a panic.
    assert!(accumulate_sensitivities(&m, &[vec![1]], false).is_err());
    assert!(accumulate_sensitivities(&m, &[vec![1, 100_000]], false).is_err());
}

#[test]
fn save_load_round_trip_and_errors() {
    let (_d, m) = tiny("Phi3ForCausalLM", 4);
    let seqs = vec![random_tokens(5, 10, m.config.vocab_size)];
    let s = accumulate_sensitivities(&m, &seqs, false).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sens.safetensors");
    save(&s, &path, &serde_json::Value::Null).unwrap();
    let f = load(&path).unwrap();
    assert_eq!(f.for_model(&m).unwrap(), s);
    let names = f.names();
    assert!(names.contains(&"model.layers.1.self_attn.qkv_proj.weight".to_string()));
    assert!(names.contains(&"model.layers.0.mlp.gate_up_proj.weight".to_string()));
    assert_eq!(names.len(), 2 * 4);
    let all = f.all().unwrap();
    assert_eq!(all["model.layers.0.mlp.down_proj.weight"].0, vec![32, 64]);
    // Also readable by the safetensors crate directly.
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(
        st.tensor("model.layers.0.self_attn.o_proj.weight")
            .unwrap()
            .shape(),
        &[32, 32]
    );
    // Wrong shape, missing tensor.
    let e = f
        .get("model.layers.0.self_attn.o_proj.weight", 32, 33)
        .unwrap_err();
    assert!(format!("{e:#}").contains("shape"), "{e:#}");
    let e = f.get_linear(0, "q_proj", 32, 32).unwrap_err();
    assert!(format!("{e:#}").contains("no tensor"), "{e:#}");
    // A model with other linears does not match.
    let (_d2, llama) = tiny("LlamaForCausalLM", 4);
    assert!(f.for_model(&llama).is_err());
    // Truncated file.
    let trunc = dir.path().join("trunc.safetensors");
    std::fs::write(&trunc, &bytes[..bytes.len() - 10]).unwrap();
    let e = load(&trunc).err().expect("truncated file must not load");
    assert!(format!("{e:#}").contains("trunc.safetensors"), "{e:#}");
    std::fs::write(&trunc, &bytes[..5]).unwrap();
    assert!(load(&trunc).is_err());
    assert!(load(&dir.path().join("missing.safetensors")).is_err());
    // No temp files left next to the output.
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left.len(), 2, "{left:?}");
}

#[test]
fn calibration_windows() {
    let toks: Vec<u32> = (0..1000).collect();
    let a = calibration_sequences(&toks, 5, 100, 7).unwrap();
    let b = calibration_sequences(&toks, 5, 100, 7).unwrap();
    let c = calibration_sequences(&toks, 5, 100, 8).unwrap();
    assert_eq!(a, b);
    assert_ne!(a, c);
    assert_eq!(a.len(), 5);
    for s in &a {
        assert_eq!(s.len(), 100);
        // Consecutive tokens of the text.
        assert!(s.windows(2).all(|w| w[1] == w[0] + 1));
        assert!(*s.last().unwrap() < 1000);
    }
    assert_eq!(calibration_sequences(&toks, 2, 1000, 0).unwrap()[0], toks);
    assert!(calibration_sequences(&toks, 2, 1001, 0).is_err());
    assert!(calibration_sequences(&toks, 2, 1, 0).is_err());
}

/// The real model (run with `--ignored --nocapture`): timing and sanity facts.
#[test]
#[ignore]
fn real_model_docs_llama_12m() {
    let dir = Path::new("/work/shared/models/docs-llama-12m");
    let m = Model::load(dir).unwrap();
    let tok = dpllm_engine::tokenizer::TextTokenizer::from_dir(dir, None, &[]).unwrap();
    let text = std::fs::read_to_string("/work/shared/data/docs/calib.txt").unwrap();
    let ids = tok.encode(&text, true).unwrap();
    let n: usize = std::env::var("SENS_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let seqs = calibration_sequences(&ids, n, 512, 0).unwrap();
    eprintln!(
        "{} tokens in calib.txt; {} threads",
        ids.len(),
        rayon::current_num_threads()
    );
    // Forward check against the engine on one sequence.
    let gm = GradModel::from_model(&m);
    let t0 = std::time::Instant::now();
    let (a, b) = (
        gm.loss(&seqs[0]).unwrap(),
        engine_loss(&m, &seqs[0]).unwrap(),
    );
    eprintln!(
        "loss seq0: f32 forward {a:.6}, engine {b:.6} ({:.2}s for both)",
        t0.elapsed().as_secs_f64()
    );
    assert!((a - b).abs() < 1e-3);
    let t = std::time::Instant::now();
    gm.loss(&seqs[0]).unwrap();
    let fwd = t.elapsed().as_secs_f64();
    let t = std::time::Instant::now();
    gm.gradient(&seqs[0], &mut |_, _, _| Ok(())).unwrap();
    eprintln!(
        "one sequence: forward only {fwd:.3}s, forward+backward {:.3}s",
        t.elapsed().as_secs_f64()
    );
    let t = std::time::Instant::now();
    let s = accumulate_sensitivities(&m, &seqs, true).unwrap();
    let el = t.elapsed().as_secs_f64();
    eprintln!(
        "accumulate: {n} x 512 tokens in {el:.2}s = {:.3}s per sequence",
        el / n as f64
    );
    let mut rows = Vec::new();
    for (name, shape, f) in s.tensors() {
        assert!(f.iter().all(|x| x.is_finite() && *x >= 0.0), "{name}");
        let mean = f.iter().map(|x| *x as f64).sum::<f64>() / f.len() as f64;
        let max = f.iter().cloned().fold(0f32, f32::max);
        let zeros = f.iter().filter(|x| **x == 0.0).count();
        rows.push((mean, name, shape, max, zeros));
    }
    rows.sort_by(|a, b| b.0.total_cmp(&a.0));
    for (mean, name, shape, max, zeros) in &rows {
        eprintln!("{name:45} {shape:?} mean {mean:.3e} max {max:.3e} zeros {zeros}");
    }
    let out = std::env::temp_dir().join("docs-llama-12m.sens.safetensors");
    save(&s, &out, &serde_json::Value::Null).unwrap();
    assert_eq!(load(&out).unwrap().for_model(&m).unwrap(), s);
    eprintln!(
        "saved {} ({} bytes)",
        out.display(),
        std::fs::metadata(&out).unwrap().len()
    );
}
