//! Whole-model tests: the f32 forward against the engine, analytic gradients against
//! finite differences on tiny random checkpoints, accumulation, and the file format.

use super::*;
use dpllm_testkit::{write_tiny_model, TinySpec};
use rand::Rng;
use safetensors::Dtype;

/// A tiny F32 model of `arch` in a temp dir; Mistral gets a sliding window of 5.
fn tiny(arch: &'static str, seed: u64) -> (tempfile::TempDir, Model) {
    let dir = tempfile::tempdir().unwrap();
    let spec = TinySpec { dtype: Dtype::F32, tie_embeddings: arch == "Qwen3ForCausalLM", ..TinySpec::with_arch(arch) };
    write_tiny_model(dir.path(), &spec, seed).unwrap();
    if arch == "MistralForCausalLM" {
        let p = dir.path().join("config.json");
        let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        v["sliding_window"] = serde_json::json!(5);
        std::fs::write(&p, serde_json::to_string(&v).unwrap()).unwrap();
    }
    let m = Model::load(dir.path()).unwrap();
    if arch == "MistralForCausalLM" {
        assert_eq!(m.config.sliding_window, Some(5));
    }
    (dir, m)
}

fn random_tokens(seed: u64, n: usize, vocab: usize) -> Vec<u32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(0..vocab as u32)).collect()
}

/// Mean next-token CE from the engine's logits (f64).
fn engine_loss(m: &Model, tokens: &[u32]) -> f64 {
    let mut cache = m.new_cache(tokens.len());
    let logits = m.forward_all(tokens, &mut cache).unwrap();
    let v = m.config.vocab_size;
    let n = tokens.len();
    (0..n - 1)
        .map(|t| {
            let row = &logits[t * v..(t + 1) * v];
            let mx = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = row.iter().map(|x| (*x as f64 - mx).exp()).sum::<f64>().ln() + mx;
            lse - row[tokens[t + 1] as usize] as f64
        })
        .sum::<f64>()
        / (n - 1) as f64
}

/// Collect every weight gradient of one sequence: grads[layer][idx] = dW.
fn grads_of(gm: &GradModel, tokens: &[u32]) -> (f64, Vec<Vec<Vec<f32>>>) {
    let mut g: Vec<Vec<Vec<f32>>> = gm.blocks.iter().map(|b| vec![Vec::new(); b.linears().len()]).collect();
    let loss = gm.gradient(tokens, &mut |l, i, dw| g[l][i] = dw.to_vec()).unwrap();
    for (l, b) in g.iter().enumerate() {
        for (i, w) in b.iter().enumerate() {
            let lin = gm.blocks[l].linears()[i];
            assert_eq!(w.len(), lin.out_f * lin.in_f, "layer {l} {} gradient missing or wrong size", lin.name);
        }
    }
    (loss, g)
}

const ARCHS: [&str; 5] =
    ["LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Phi3ForCausalLM", "MistralForCausalLM"];

#[test]
fn f32_forward_matches_engine_loss() {
    for (s, arch) in ARCHS.iter().enumerate() {
        let (_d, m) = tiny(arch, 10 + s as u64);
        let gm = GradModel::from_model(&m);
        for n in [2usize, 13] {
            let toks = random_tokens(s as u64 * 7 + n as u64, n, m.config.vocab_size);
            let (a, b) = (gm.loss(&toks).unwrap(), engine_loss(&m, &toks));
            assert!((a - b).abs() < 1e-4, "{arch} n={n}: f32 forward loss {a} vs engine {b}");
        }
    }
}

#[test]
#[allow(clippy::needless_range_loop)]
fn model_gradient_matches_finite_differences() {
    // eps 1e-2 on weights of scale 0.1; the loss is accumulated in f64 but the
    // activations are f32, so elements with tiny gradients only get an absolute check.
    let eps = 1e-2f32;
    for (s, arch) in ARCHS.iter().enumerate() {
        let (_d, m) = tiny(arch, 20 + s as u64);
        let mut gm = GradModel::from_model(&m);
        let toks = random_tokens(100 + s as u64, 12, m.config.vocab_size);
        let (loss, grads) = grads_of(&gm, &toks);
        assert!((loss - gm.loss(&toks).unwrap()).abs() < 1e-9);
        let mut rng = StdRng::seed_from_u64(s as u64);
        let mut checked = 0;
        let mut worst = 0f64;
        for l in 0..gm.blocks.len() {
            for i in 0..grads[l].len() {
                let g = &grads[l][i];
                let gmax_idx = (0..g.len()).max_by(|&a, &b| g[a].abs().total_cmp(&g[b].abs())).unwrap();
                let gmax = g[gmax_idx].abs() as f64;
                assert!(gmax > 0.0, "{arch} layer {l} linear {i}: zero gradient");
                let picks = [gmax_idx, rng.random_range(0..g.len()), rng.random_range(0..g.len())];
                for &e in &picks {
                    let orig = gm.blocks[l].linear_mut(i).w[e];
                    gm.blocks[l].linear_mut(i).w[e] = orig + eps;
                    let lp = gm.loss(&toks).unwrap();
                    gm.blocks[l].linear_mut(i).w[e] = orig - eps;
                    let lm = gm.loss(&toks).unwrap();
                    gm.blocks[l].linear_mut(i).w[e] = orig;
                    let fd = (lp - lm) / (2.0 * eps as f64);
                    let a = g[e] as f64;
                    let err = (fd - a).abs();
                    let tol = 1e-2 * a.abs() + 2e-3 * gmax + 2e-5;
                    let name = gm.blocks[l].linears()[i].name;
                    assert!(err <= tol, "{arch} layer {l} {name}[{e}]: analytic {a:e} vs finite difference {fd:e}");
                    if e == gmax_idx {
                        worst = worst.max(err / a.abs());
                    }
                    checked += 1;
                }
            }
        }
        eprintln!("{arch}: {checked} elements checked, worst relative error at the largest gradients {worst:.2e}");
    }
}

#[test]
fn accumulation_is_the_sum_of_squared_gradients() {
    let (_d, m) = tiny("Qwen2ForCausalLM", 3);
    let gm = GradModel::from_model(&m);
    let seqs = vec![random_tokens(1, 9, m.config.vocab_size), random_tokens(2, 14, m.config.vocab_size)];
    let s = accumulate_sensitivities(&m, &seqs, false).unwrap();
    let (_, g1) = grads_of(&gm, &seqs[0]);
    let (_, g2) = grads_of(&gm, &seqs[1]);
    assert_eq!(s.layers.len(), m.blocks.len());
    for (l, b) in m.blocks.iter().enumerate() {
        let names: Vec<&str> = b.linears().iter().map(|(n, _)| *n).collect();
        let got: Vec<&str> = s.layers[l].iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(got, names);
        for (i, (_, f)) in s.layers[l].iter().enumerate() {
            let (o, inp) = (b.linears()[i].1.out_features(), b.linears()[i].1.in_features());
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
    assert_eq!(st.tensor("model.layers.0.self_attn.o_proj.weight").unwrap().shape(), &[32, 32]);
    // Wrong shape, missing tensor.
    let e = f.get("model.layers.0.self_attn.o_proj.weight", 32, 33).unwrap_err();
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
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
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
    let n: usize = std::env::var("SENS_N").ok().and_then(|v| v.parse().ok()).unwrap_or(8);
    let seqs = calibration_sequences(&ids, n, 512, 0).unwrap();
    eprintln!("{} tokens in calib.txt; {} threads", ids.len(), rayon::current_num_threads());
    // Forward check against the engine on one sequence.
    let gm = GradModel::from_model(&m);
    let t0 = std::time::Instant::now();
    let (a, b) = (gm.loss(&seqs[0]).unwrap(), engine_loss(&m, &seqs[0]));
    eprintln!("loss seq0: f32 forward {a:.6}, engine {b:.6} ({:.2}s for both)", t0.elapsed().as_secs_f64());
    assert!((a - b).abs() < 1e-3);
    let t = std::time::Instant::now();
    gm.loss(&seqs[0]).unwrap();
    let fwd = t.elapsed().as_secs_f64();
    let t = std::time::Instant::now();
    gm.gradient(&seqs[0], &mut |_, _, _| {}).unwrap();
    eprintln!("one sequence: forward only {fwd:.3}s, forward+backward {:.3}s", t.elapsed().as_secs_f64());
    let t = std::time::Instant::now();
    let s = accumulate_sensitivities(&m, &seqs, true).unwrap();
    let el = t.elapsed().as_secs_f64();
    eprintln!("accumulate: {n} x 512 tokens in {el:.2}s = {:.3}s per sequence", el / n as f64);
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
    eprintln!("saved {} ({} bytes)", out.display(), std::fs::metadata(&out).unwrap().len());
}
