//! The f32 model against the engine's forward pass, and its analytic gradients
//! against finite differences, on tiny random checkpoints of every family.

use dpllm_engine::Model;
use dpllm_testkit::{write_tiny_f32, TINY_ARCHS};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::{engine_loss, GradModel};

fn tiny(arch: &'static str, seed: u64) -> (tempfile::TempDir, Model) {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_f32(dir.path(), arch, seed).unwrap();
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

#[test]
fn f32_forward_matches_engine_loss() {
    for (s, arch) in TINY_ARCHS.iter().enumerate() {
        let (_d, m) = tiny(arch, 10 + s as u64);
        let gm = GradModel::from_model(&m);
        for n in [2usize, 13] {
            let toks = random_tokens(s as u64 * 7 + n as u64, n, m.config.vocab_size);
            let (a, b) = (gm.loss(&toks).unwrap(), engine_loss(&m, &toks).unwrap());
            assert!(
                (a - b).abs() < 1e-4,
                "{arch} n={n}: f32 forward loss {a} vs engine {b}"
            );
        }
    }
}

#[test]
#[allow(clippy::needless_range_loop)]
fn model_gradient_matches_finite_differences() {
    // eps 1e-2 on weights of scale 0.1; the loss is accumulated in f64 but the
    // activations are f32, so elements with tiny gradients only get an absolute check.
    let eps = 1e-2f32;
    for (s, arch) in TINY_ARCHS.iter().enumerate() {
        let (_d, m) = tiny(arch, 20 + s as u64);
        let mut gm = GradModel::from_model(&m);
        let toks = random_tokens(100 + s as u64, 12, m.config.vocab_size);
        let (loss, grads) = gm.gradients(&toks).unwrap();
        for (l, b) in grads.iter().enumerate() {
            for (i, w) in b.iter().enumerate() {
                let lin = gm.blocks[l].linears()[i];
                assert_eq!(
                    w.len(),
                    lin.out_f * lin.in_f,
                    "layer {l} {} gradient missing or wrong size",
                    lin.name
                );
            }
        }
        assert!((loss - gm.loss(&toks).unwrap()).abs() < 1e-9);
        let mut rng = StdRng::seed_from_u64(s as u64);
        let mut checked = 0;
        let mut worst = 0f64;
        for l in 0..gm.blocks.len() {
            for i in 0..grads[l].len() {
                let g = &grads[l][i];
                let gmax_idx = (0..g.len())
                    .max_by(|&a, &b| g[a].abs().total_cmp(&g[b].abs()))
                    .unwrap();
                let gmax = g[gmax_idx].abs() as f64;
                assert!(gmax > 0.0, "{arch} layer {l} linear {i}: zero gradient");
                let picks = [
                    gmax_idx,
                    rng.random_range(0..g.len()),
                    rng.random_range(0..g.len()),
                ];
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
                    assert!(
                        err <= tol,
                        "{arch} layer {l} {name}[{e}]: analytic {a:e} vs finite difference {fd:e}"
                    );
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
