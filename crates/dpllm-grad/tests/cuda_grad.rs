//! The gradient model on a GPU (`CudaGrad`) against the CPU's (`CpuGrad`): the
//! loss and every linear's weight gradient on tiny random checkpoints of every
//! family (GQA, biases, q/k norms, fused projections, a sliding window), over
//! sequences long enough for several lm_head chunks; bad input as errors. Skips
//! with a message where there is no GPU; the kernels' compile check needs only NVRTC.
#![cfg(feature = "cuda")]

use dpllm_engine::backend::cuda::cudarc::driver::CudaSlice;
use dpllm_engine::backend::cuda::test_device;
use dpllm_engine::Model;
use dpllm_grad::cuda::CudaGrad;
use dpllm_grad::{GradBackend, GradModel, Pair};
use dpllm_testkit::{write_tiny_f32, TINY_ARCHS};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn gpu() -> Option<CudaGrad> {
    test_device(0).map(|d| {
        CudaGrad::new(d)
            .expect("the gradient kernels load")
            .poisoned()
    })
}

fn tiny(arch: &'static str, seed: u64) -> (tempfile::TempDir, Model) {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_f32(dir.path(), arch, seed).unwrap();
    let m = Model::load(dir.path()).unwrap();
    (dir, m)
}

/// Max |a − b| / (scale + |b|) over the elements, where scale is the largest |b|
/// times `rel`: gradients near zero are compared against the tensor's scale.
fn max_err(got: &[f32], want: &[f32], rel: f32) -> (usize, f32) {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())) * rel + 1e-12;
    got.iter()
        .zip(want)
        .map(|(a, b)| {
            if a.is_finite() {
                (a - b).abs() / (scale + b.abs())
            } else {
                f32::INFINITY
            }
        })
        .enumerate()
        .fold((0, 0f32), |m, (i, e)| if e > m.1 { (i, e) } else { m })
}

#[test]
fn loss_and_gradients_match_the_cpu() {
    if gpu().is_none() {
        return;
    }
    let mut rng = StdRng::seed_from_u64(rand::random());
    let mut gpu_model = None;
    for (s, arch) in TINY_ARCHS.iter().enumerate() {
        let (_d, m) = tiny(arch, 40 + s as u64);
        let cpu = GradModel::from_model(&m);
        let on_gpu = GradModel::on(gpu().unwrap(), &m, None).unwrap();
        let g = on_gpu.backend();
        // 2 tokens, a few (inside Mistral's window of 5 and past it), and more
        // than one lm_head chunk of 256 rows.
        for n in [2usize, 13, 300] {
            let toks: Vec<u32> = (0..n)
                .map(|_| rng.random_range(0..m.config.vocab_size as u32))
                .collect();
            let (want_loss, want) = cpu.gradients(&toks).unwrap();
            let mut got: Vec<Vec<Vec<f32>>> =
                want.iter().map(|l| vec![Vec::new(); l.len()]).collect();
            let loss = on_gpu
                .gradient(&toks, &mut |l, i, dw| {
                    got[l][i] = g.download(dw)?;
                    Ok(())
                })
                .unwrap();
            assert!(
                (loss - want_loss).abs() <= 1e-5 * (1.0 + want_loss.abs()),
                "{arch} n={n}: loss {loss} on the GPU, {want_loss} on the CPU"
            );
            let fwd = on_gpu.loss(&toks).unwrap();
            assert!(
                (fwd - loss).abs() <= 1e-9 * (1.0 + loss.abs()),
                "{arch}: forward-only loss"
            );
            for (l, (gl, wl)) in got.iter().zip(&want).enumerate() {
                for (i, (a, b)) in gl.iter().zip(wl).enumerate() {
                    let (at, err) = max_err(a, b, 1e-2);
                    assert!(
                        err <= 2e-3,
                        "{arch} n={n} layer {l} linear {i}: element {at} is {} on the GPU, {} on the CPU",
                        a[at],
                        b[at]
                    );
                }
            }
        }
        if s == 0 {
            gpu_model = Some((m, _d));
        }
    }
    // Bad input is an error, not a panic or a wrong answer.
    let (m, _d) = gpu_model.unwrap();
    let on_gpu = GradModel::on(gpu().unwrap(), &m, None).unwrap();
    let v = m.config.vocab_size as u32;
    assert!(
        on_gpu.loss(&[1, v]).is_err(),
        "a token id past the vocabulary"
    );
    assert!(
        on_gpu.loss(&[1]).is_err(),
        "one token has no next-token loss"
    );
    let mut sink =
        |_: usize, _: usize, _: &CudaSlice<f32>| -> anyhow::Result<()> { anyhow::bail!("stop") };
    assert!(
        on_gpu.gradient(&[1, 2, 3], &mut sink).is_err(),
        "a sink's error comes back"
    );
}

/// The precision-pair ops (mix, dot products) against the CPU, with the
/// pairs read from device memory; pairs outside the levels give NaN there
/// (errors on the CPU); then row norms.
#[test]
fn pair_ops_and_row_norms_match_the_cpu() {
    let Some(be) = gpu() else { return };
    let cpu = dpllm_grad::CpuGrad;
    let mut rng = StdRng::seed_from_u64(77);
    let mut rand = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-1.0..1.0)).collect() };
    // An odd length, three levels (3..=5 bits), three sums: slot 1
    // untouched, slot 2 accumulated twice.
    let n = 100_003;
    let (g, levels, g2) = (rand(n), rand(3 * n), rand(n));
    let pair = |lo, hi, a, b| Pair { lo, hi, a, b };
    let host_pairs = vec![
        pair(3, 4, 0.3, 0.7),
        pair(4, 5, -1.0, 1.0),
        pair(5, 4, 1.0, 0.0),
        pair(5, 6, 1.0, 0.0),
    ];
    let up = |v: &Vec<f32>| be.upload(v).unwrap();
    let (dg, dlevels, dg2) = (up(&g), up(&levels), up(&g2));
    let pairs = be.pairs(&host_pairs).unwrap();
    let (mut want, mut got) = (cpu.sums(3).unwrap(), be.sums(3).unwrap());
    for (slot, (hg, dgr), p) in [(0, (&g, &dg), 1), (2, (&g, &dg), 0), (2, (&g2, &dg2), 1)] {
        cpu.dot_diff(hg, &levels, 3, &host_pairs, p, &mut want, slot)
            .unwrap();
        be.dot_diff(dgr, &dlevels, 3, &pairs, p, &mut got, slot)
            .unwrap();
    }
    let (want, got) = (cpu.read_sums(&want).unwrap(), be.read_sums(&got).unwrap());
    assert_eq!(got[1], 0.0, "an untouched slot");
    for (a, b) in got.iter().zip(&want) {
        assert!(
            (a - b).abs() <= 1e-9 * n as f64,
            "dot sums: {got:?} on the GPU, {want:?} on the CPU"
        );
    }
    for p in [0, 1] {
        let mut w = vec![0f32; n];
        cpu.mix(&mut w, &levels, 3, &host_pairs, p).unwrap();
        let mut out = up(&vec![f32::NAN; n]);
        be.mix(&mut out, &dlevels, 3, &pairs, p).unwrap();
        // Against the largest weight: a·lo + b·hi cancels where they are close.
        let (i, e) = max_err(&be.download(&out).unwrap(), &w, 1.0);
        assert!(e <= 1e-6, "mix of pair {p} at {i}: relative error {e}");
    }
    // Reversed or not held: NaN on the GPU, an error on the CPU.
    for p in [2, 3] {
        let mut out = up(&vec![0f32; n]);
        be.mix(&mut out, &dlevels, 3, &pairs, p).unwrap();
        assert!(
            be.download(&out).unwrap().iter().all(|v| v.is_nan()),
            "mix of pair {p}"
        );
        let mut sums = be.sums(1).unwrap();
        be.dot_diff(&dg, &dlevels, 3, &pairs, p, &mut sums, 0)
            .unwrap();
        assert!(
            be.read_sums(&sums).unwrap()[0].is_nan(),
            "dot sum of pair {p}"
        );
        assert!(cpu
            .mix(&mut vec![0f32; n], &levels, 3, &host_pairs, p)
            .is_err());
    }
    // No such pair or sum, levels that are not whole weights: errors.
    assert!(be
        .dot_diff(&dg, &dlevels, 3, &pairs, 0, &mut be.sums(2).unwrap(), 2)
        .is_err());
    assert!(be
        .dot_diff(&dg, &dlevels, 3, &pairs, 4, &mut be.sums(2).unwrap(), 0)
        .is_err());
    assert!(be
        .mix(&mut up(&g), &up(&rand(n + 1)), 3, &pairs, 0)
        .is_err());
    // Row norms of 37 rows of 129 values into a poisoned output.
    let x = rand(37 * 129);
    let mut want = vec![0f32; 37];
    cpu.row_norms(&x, 129, &mut want).unwrap();
    let mut out = be.upload(&[f32::NAN; 37]).unwrap();
    be.row_norms(&up(&x), 129, &mut out).unwrap();
    let (i, e) = max_err(&be.download(&out).unwrap(), &want, 0.0);
    assert!(e <= 1e-5, "row norm {i}: relative error {e}");
    assert!(
        be.row_norms(&up(&x), 128, &mut out).is_err(),
        "a width that does not divide"
    );
}

/// Attention with heads of 128 and a long sequence (the scores of one head
/// exceed a block's reach in every kernel) against the CPU.
#[test]
fn attention_matches_the_cpu_on_long_sequences() {
    use dpllm_engine::backend::cpu::attention::AttnShape;
    let Some(g) = gpu() else { return };
    let cpu = dpllm_grad::CpuGrad;
    let mut rng = StdRng::seed_from_u64(rand::random());
    for (nh, nkv, hd, window, n) in [
        (8, 2, 128, None, 700),
        (6, 6, 64, Some(100), 333),
        (4, 1, 32, None, 1),
    ] {
        let shape = AttnShape {
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: hd,
            window,
        };
        let [q, k, v, dout] = dpllm_testkit::random_attention_inputs(&mut rng, n, nh, nkv, hd);
        let mut want = [
            vec![0f32; q.len()],
            vec![0f32; q.len()],
            vec![0f32; k.len()],
            vec![0f32; v.len()],
        ];
        let [o, dq, dk, dv] = &mut want[..] else {
            unreachable!()
        };
        cpu.attention_forward(&q, &k, &v, shape, o).unwrap();
        cpu.attention_backward(&q, &k, &v, &dout, shape, dq, dk, dv)
            .unwrap();
        let up = |x: &[f32]| g.upload(x).unwrap();
        let (gq, gk, gv, gd) = (up(&q), up(&k), up(&v), up(&dout));
        let mut outs = [
            up(&vec![7.0; q.len()]),
            up(&vec![7.0; q.len()]),
            up(&vec![7.0; k.len()]),
            up(&vec![7.0; v.len()]),
        ];
        let [go, gdq, gdk, gdv] = &mut outs;
        g.attention_forward(&gq, &gk, &gv, shape, go).unwrap();
        g.attention_backward(&gq, &gk, &gv, &gd, shape, gdq, gdk, gdv)
            .unwrap();
        for (what, got, want) in [
            ("out", &*go, &want[0]),
            ("dq", gdq, &want[1]),
            ("dk", gdk, &want[2]),
            ("dv", gdv, &want[3]),
        ] {
            let (at, err) = max_err(&g.download(got).unwrap(), want, 1e-2);
            assert!(
                err <= 1e-3,
                "{nh}/{nkv} heads of {hd}, n={n}, window {window:?}: {what}[{at}] off by {err}"
            );
        }
    }
}

/// The projection estimators' fine-tuning ops (the norm-error gradient and
/// Adam) against the CPU, into poisoned buffers, with refusals.
#[test]
fn projection_ops_match_the_cpu() {
    let Some(be) = gpu() else { return };
    let cpu = dpllm_grad::CpuGrad;
    let mut rng = StdRng::seed_from_u64(31);
    let mut rand = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-1.0..1.0)).collect() };
    // 37 rows of 64 (the projection's k) and of 300 (more than a block's threads).
    for (n, k) in [(37, 64), (5, 300)] {
        let (y, e) = (rand(n * k), rand(n));
        let mut want = y.clone();
        cpu.norm_error_scale(&mut want, k, &e).unwrap();
        let mut got = be.upload(&y).unwrap();
        be.norm_error_scale(&mut got, k, &be.upload(&e).unwrap())
            .unwrap();
        let (i, err) = max_err(&be.download(&got).unwrap(), &want, 1.0);
        assert!(
            err <= 1e-5,
            "norm_error_scale {n}x{k} at {i}: relative error {err}"
        );
    }
    // Three Adam steps over an odd length, moments starting from the CPU's.
    let n = 100_003;
    let (w0, m0, v0) = (
        rand(n),
        rand(n),
        rand(n).iter().map(|v| v.abs()).collect::<Vec<_>>(),
    );
    let (mut w, mut m, mut v) = (w0.clone(), m0.clone(), v0.clone());
    let up = |x: &Vec<f32>| be.upload(x).unwrap();
    let (mut dw, mut dm, mut dv) = (up(&w0), up(&m0), up(&v0));
    for t in 1..=3 {
        let g = rand(n);
        cpu.adam_step(&mut w, &g, &mut m, &mut v, 0.01, t).unwrap();
        be.adam_step(&mut dw, &up(&g), &mut dm, &mut dv, 0.01, t)
            .unwrap();
    }
    for (what, got, want) in [("w", &dw, &w), ("m", &dm, &m), ("v", &dv, &v)] {
        let (i, err) = max_err(&be.download(got).unwrap(), want, 1.0);
        assert!(err <= 1e-5, "adam {what} at {i}: relative error {err}");
    }
    // Mismatched lengths and step 0 are refused.
    assert!(be
        .norm_error_scale(&mut up(&rand(10)), 3, &up(&rand(3)))
        .is_err());
    let mut adam = |g_len: usize, t: i32| {
        let (mut w, mut m, mut v) = (up(&rand(4)), up(&rand(4)), up(&rand(4)));
        be.adam_step(&mut w, &up(&rand(g_len)), &mut m, &mut v, 0.1, t)
    };
    assert!(adam(5, 1).is_err());
    assert!(adam(4, 0).is_err());
}

/// The kernels compile for the paper's edge and consumer GPUs (sm_87, sm_89)
/// and for Hopper, wherever NVRTC is found (no GPU needed).
#[test]
fn kernels_compile_for_every_target() {
    let loaded = dpllm_engine::backend::cuda::compile::nvrtc_present();
    if dpllm_testkit::rerun_with_cached_nvrtc("kernels_compile_for_every_target", loaded) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::env::set_var("DPLLM_CACHE_DIR", dir.path());
    let kernels = [
        "causal_softmax",
        "softmax_backward",
        "cross_entropy",
        "rms_norm_backward_add",
        "join_cols",
        "norm_error_scale",
        "adam_step",
    ];
    let sources = [("grad", dpllm_grad::cuda::SOURCE, &kernels[..])];
    dpllm_engine::backend::cuda::compile::check_compiles(&sources).expect("compiles");
}
