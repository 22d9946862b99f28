//! The CUDA bit-plane GEMV against the CPU's dequantized weights, on fresh
//! random layers: every precision 3..=8, 1..=8 tokens, shapes with partial
//! tiles and column blocks, every split of a tile's columns over warps or
//! blocks (split-K) and every kind of lookup table. Skips with a message where there is no GPU.
#![cfg(feature = "cuda")]

use dpllm_engine::backend::cpu::AnyPrecLinear;
use dpllm_engine::backend::cuda::bitplane::{CudaAnyPrec, EstForm, GemvInput, GemvVariant};
use dpllm_engine::backend::cuda::test_device;
use dpllm_engine::backend::AnyPrecHost;
use rand::{Rng, SeedableRng};

#[test]
fn gemv_matches_the_dequantized_reference() {
    let Some(dev) = test_device(0) else { return };
    let mut rng = rand::rngs::StdRng::seed_from_u64(rand::random());
    let stream = dev.stream().clone();
    // (rows, cols): one partial tile and column block; several tiles with a
    // partial last one; column blocks 5 (the last half full), 16, 32 and 75
    // (partial); 8464 rows, at least 4 tiles a multiprocessor up to 132 of
    // them, where 1..4 tokens at 4 bits take entry tables instead of pairs.
    for (rows, cols) in [
        (5, 20),
        (7, 40),
        (130, 576),
        (64, 2048),
        (33, 4096),
        (19, 9600),
        (8464, 256),
    ] {
        let host = AnyPrecHost::random(rows, cols, 8, rng.random());
        let gpu = CudaAnyPrec::upload(&dev, &host).expect("upload");
        let cpu = AnyPrecLinear::from_host(host);
        for bits in 3..=8u32 {
            let w = cpu.dequantize(bits);
            for n in [1usize, 2, 3, 4, 5, 8] {
                // Activations over several magnitudes: the kernel splits them into f16 halves.
                let x: Vec<f32> = (0..n * cols)
                    .map(|_| rng.random_range(-1.0..1.0) * 10f32.powi(rng.random_range(-3..3)))
                    .collect();
                let xd = stream.clone_htod(&x).unwrap();
                let check = |y: &[f32], name: &str| {
                    for t in 0..n {
                        for r in 0..rows {
                            let (wr, xt) =
                                (&w[r * cols..(r + 1) * cols], &x[t * cols..(t + 1) * cols]);
                            let want: f64 =
                                wr.iter().zip(xt).map(|(&a, &b)| a as f64 * b as f64).sum();
                            let scale: f64 =
                                wr.iter().zip(xt).map(|(&a, &b)| (a * b).abs() as f64).sum();
                            let got = y[t * rows + r] as f64;
                            assert!(
                                (got - want).abs() <= 1e-5 * scale + 1e-6,
                                "{rows}x{cols} b={bits} n={n} {name} token {t} row {r}: {got} vs {want}",
                            );
                        }
                    }
                };
                // Poisoned outputs: every element must be written.
                let poisoned = || stream.clone_htod(&vec![f32::NAN; n * rows]).unwrap();
                for v in GemvVariant::all() {
                    let mut yd = poisoned();
                    // Split-K runs on layers of fewer tiles than multiprocessors only.
                    let split_k = v.splits.is_some_and(|k| k > 1) && cols > 128;
                    if !v.available_at(bits) || (split_k && !gpu.can_split()) {
                        let e = gpu.gemv_with(&xd, n, bits, &mut yd, v);
                        assert!(e.is_err(), "{} at {bits} bits was not refused", v.name());
                        continue;
                    }
                    if let Err(e) = gpu.gemv_with(&xd, n, bits, &mut yd, v) {
                        // Several tiles' tables may not fit a smaller GPU's block.
                        let tiles = v.tiles_per_block.is_some_and(|t| t > 1);
                        if tiles && e.to_string().contains("shared memory") {
                            continue;
                        }
                        panic!("{rows}x{cols} b={bits} n={n} {}: {e}", v.name());
                    }
                    check(&stream.clone_dtoh(&yd).unwrap(), &v.name());
                }
                // The activations split beforehand (as the ops that make a
                // linear's input leave them), read as they are.
                let xs = gpu.split(&xd.slice(..), n).expect("split");
                let mut yd = poisoned();
                let input = GemvInput::Halves(&xs.slice(..));
                (gpu.gemv_input(
                    input,
                    n,
                    bits,
                    &mut yd.slice_mut(..),
                    GemvVariant::default(),
                    None,
                ))
                .expect("gemv on halves");
                check(&stream.clone_dtoh(&yd).unwrap(), "halves");
            }
        }
    }
}

/// Calibration's reads of two precisions from the planes: a·W_lo + b·W_hi
/// and Σ g·(W_hi − W_lo), against the CPU's dequantized levels, on shapes
/// with partial tiles, words and column blocks; every pair lo ≤ hi of a 3..=8
/// layer; the sums land in their slot only; pairs read from device memory
/// that the layer does not hold give NaN.
#[test]
fn mix_and_dot_diff_match_the_dequantized_levels() {
    let Some(dev) = test_device(0) else { return };
    let mut rng = rand::rngs::StdRng::seed_from_u64(rand::random());
    let s = dev.stream().clone();
    // 1500 rows of 8 column blocks: more rows than blocks, so blocks loop.
    for (rows, cols) in [(5, 20), (7, 41), (130, 576), (33, 4100), (1500, 1024)] {
        let host = AnyPrecHost::random(rows, cols, 8, rng.random());
        let gpu = CudaAnyPrec::upload(&dev, &host).expect("upload");
        let w: Vec<Vec<f32>> = (3..=8).map(|b| host.dequantize(b)).collect();
        let g: Vec<f32> = (0..rows * cols)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let gd = s.clone_htod(&g).unwrap();
        for lo in 3..=8u32 {
            for hi in lo..=8 {
                let (wl, wh) = (&w[lo as usize - 3], &w[hi as usize - 3]);
                let (a, b) = (
                    rng.random_range(-1.0..1.0f32),
                    rng.random_range(-1.0..1.0f32),
                );
                let mut out = s.clone_htod(&vec![f32::NAN; rows * cols]).unwrap();
                gpu.mix_into(lo, a, hi, b, &mut out).expect("mix");
                let got = s.clone_dtoh(&out).unwrap();
                for (i, &v) in got.iter().enumerate() {
                    let want = a * wl[i] + b * wh[i];
                    assert!(
                        (v - want).abs() <= 1e-6 * (1.0 + want.abs()),
                        "mix {rows}x{cols} {lo}/{hi} at {i}: {v} vs {want}"
                    );
                }
                let mut sums = s.alloc_zeros::<f64>(3).unwrap();
                gpu.dot_diff(&gd, hi, lo, &mut sums, 1).expect("dot_diff");
                let got = s.clone_dtoh(&sums).unwrap();
                let terms =
                    (g.iter().zip(wh).zip(wl)).map(|((&g, &h), &l)| g as f64 * (h - l) as f64);
                let want: f64 = terms.clone().sum();
                // The kernel sums 4 products in f32, the quads in f64: within
                // 4 f32 roundings of the terms' absolute sum.
                let bound = 3e-7 * terms.map(f64::abs).sum::<f64>() + 1e-12;
                assert!(
                    got[0] == 0.0 && got[2] == 0.0 && (got[1] - want).abs() <= bound,
                    "dot_diff {rows}x{cols} {lo}/{hi}: {got:?} vs {want}"
                );
            }
        }
    }
    // Refused: a precision not held, lo above hi, wrong lengths, a slot out of range.
    let host = AnyPrecHost::random(8, 64, 6, 4);
    let gpu = CudaAnyPrec::upload(&dev, &host).unwrap();
    let mut out = s.alloc_zeros::<f32>(8 * 64).unwrap();
    let mut sums = s.alloc_zeros::<f64>(2).unwrap();
    assert!(
        gpu.mix_into(3, 1.0, 7, 0.0, &mut out).is_err(),
        "7 bits of a 6-bit layer"
    );
    assert!(
        gpu.mix_into(5, 1.0, 4, 0.0, &mut out).is_err(),
        "lo above hi"
    );
    let mut short = s.alloc_zeros::<f32>(8 * 64 - 1).unwrap();
    assert!(
        gpu.mix_into(3, 1.0, 4, 0.0, &mut short).is_err(),
        "output too short"
    );
    assert!(
        gpu.dot_diff(&short, 4, 3, &mut sums, 0).is_err(),
        "g too short"
    );
    assert!(
        gpu.dot_diff(&out, 4, 3, &mut sums, 2).is_err(),
        "slot 2 of 2"
    );
    // Pairs read on the device: one not held and one reversed give NaN; a
    // pair past the table is refused.
    let pairs = s
        .clone_htod(&[
            3.0f32, 7.0, 1.0, 0.0, 5.0, 4.0, 1.0, 0.0, 3.0, 4.0, 1.0, 0.0,
        ])
        .unwrap();
    for slot in [0, 1] {
        gpu.mix_pair(&s, &pairs, slot, &mut out).expect("queued");
        let got = s.clone_dtoh(&out).unwrap();
        assert!(got.iter().all(|v| v.is_nan()), "mix of pair {slot}");
        let mut sums = s.alloc_zeros::<f64>(1).unwrap();
        gpu.dot_diff_pair(&s, &out, &pairs, slot, &mut sums, 0)
            .expect("queued");
        assert!(
            s.clone_dtoh(&sums).unwrap()[0].is_nan(),
            "dot_diff of pair {slot}"
        );
    }
    gpu.mix_pair(&s, &pairs, 2, &mut out).expect("a held pair");
    assert!(s.clone_dtoh(&out).unwrap().iter().all(|v| v.is_finite()));
    assert!(
        gpu.mix_pair(&s, &pairs, 3, &mut out).is_err(),
        "pair 3 of 3"
    );
}

#[test]
fn bad_calls_are_refused() {
    let Some(dev) = test_device(0) else { return };
    let host = AnyPrecHost::random(8, 64, 6, 1);
    let gpu = CudaAnyPrec::upload(&dev, &host).unwrap();
    let s = dev.stream();
    let x = s.alloc_zeros::<f32>(64 * 9).unwrap();
    let mut y = s.alloc_zeros::<f32>(8 * 9).unwrap();
    assert!(
        gpu.gemv(&x, 1, 7, &mut y).is_err(),
        "7 bits of a 6-bit layer"
    );
    assert!(gpu.gemv(&x, 1, 2, &mut y).is_err(), "2 bits");
    assert!(gpu.gemv(&x, 9, 4, &mut y).is_err(), "9 tokens");
    assert!(gpu.gemv(&x, 0, 4, &mut y).is_err(), "no tokens");
    let d = GemvVariant::default();
    for (v, what) in [
        (
            GemvVariant {
                warps: Some(17),
                ..d
            },
            "17 warps",
        ),
        (
            GemvVariant {
                splits: Some(5),
                ..d
            },
            "5 blocks a tile",
        ),
        (
            GemvVariant {
                tiles_per_block: Some(5),
                ..d
            },
            "5 tiles a block",
        ),
    ] {
        assert!(gpu.gemv_with(&x, 1, 4, &mut y, v).is_err(), "{what}");
    }
    // Tiles a block and split-K do not go together (a layer of one tile and
    // 4 column blocks has split-K's scratch).
    let wide = CudaAnyPrec::upload(&dev, &AnyPrecHost::random(8, 512, 6, 1)).unwrap();
    let x512 = s.alloc_zeros::<f32>(512).unwrap();
    let t2k2 = GemvVariant {
        tiles_per_block: Some(2),
        splits: Some(2),
        ..Default::default()
    };
    let e = wide.gemv_with(&x512, 1, 4, &mut y, t2k2).unwrap_err();
    assert!(e.to_string().contains("split-K"), "{e}");
    // Split halves must hold the launch's tokens (2 · n · 128 here).
    let halves = s.alloc_zeros::<u16>(2 * 128).unwrap();
    let on_halves =
        |n: usize, y: &mut dpllm_engine::backend::cuda::cudarc::driver::CudaSlice<f32>| {
            let h = halves.slice(..);
            let v = GemvVariant::default();
            gpu.gemv_input(GemvInput::Halves(&h), n, 4, &mut y.slice_mut(..), v, None)
        };
    assert!(on_halves(1, &mut y).is_ok(), "one token's halves");
    assert!(
        on_halves(2, &mut y).is_err(),
        "two tokens on one token's halves"
    );
    let mut small = s.alloc_zeros::<f32>(4).unwrap();
    assert!(gpu.gemv(&x, 1, 4, &mut small).is_err(), "output too small");
    // The in-kernel choice refuses estimator inputs shorter than their form
    // says, or of no values (n_e = 0 would read a norm); four sums are fine.
    let e = s.alloc_zeros::<f32>(4).unwrap();
    let select =
        |form: EstForm, y: &mut dpllm_engine::backend::cuda::cudarc::driver::CudaSlice<f32>| {
            let (x, e) = (x.slice(..64), e.slice(..));
            gpu.gemv_select(
                GemvInput::Rows(&x),
                3,
                (&e, form),
                (1.0, 0.0, 0.5),
                None,
                &mut y.slice_mut(..8),
            )
        };
    for form in [
        EstForm::Rows(0),
        EstForm::SumSq(0),
        EstForm::SumSq(5),
        EstForm::Rows(64),
    ] {
        assert!(
            select(form, &mut y).is_err(),
            "estimator input {form:?} of 4 values"
        );
    }
    assert!(
        select(EstForm::SumSq(4), &mut y).is_ok(),
        "four sums of squares"
    );
    let mut short = AnyPrecHost::random(8, 64, 6, 2);
    short.planes.pop();
    assert!(
        CudaAnyPrec::upload(&dev, &short).is_err(),
        "truncated planes"
    );
    let mut no_lut = AnyPrecHost::random(8, 64, 6, 3);
    no_lut.luts.pop();
    assert!(CudaAnyPrec::upload(&dev, &no_lut).is_err(), "a LUT missing");
}

/// The kernels compile for the paper's edge and consumer GPUs (sm_87, sm_89)
/// and for Hopper, wherever NVRTC is found (no GPU needed).
#[test]
fn kernels_compile_for_every_target() {
    let loaded = dpllm_engine::backend::cuda::compile::nvrtc_present();
    if dpllm_testkit::rerun_with_cached_nvrtc("kernels_compile_for_every_target", loaded) {
        return;
    }
    use dpllm_engine::backend::cuda::{bitplane, compile, ops};
    let dir = tempfile::tempdir().unwrap();
    std::env::set_var("DPLLM_CACHE_DIR", dir.path());
    let sources = [
        (
            "bitplane_gemv",
            bitplane::SOURCE,
            &[
                "bitplane_gemv_b4_t4",
                "bitplane_gemv_b3_t4sp",
                "bitplane_mix",
                "bitplane_dot_diff",
            ][..],
        ),
        (
            "ops",
            ops::SOURCE,
            &[
                "dense_q8_0_t8",
                "attention_h",
                "rope_store_h",
                "kv_store_h",
                "swiglu_sumsq",
                "sample_rows",
            ],
        ),
    ];
    if !compile::check_compiles(&sources).expect("compiles") {
        return;
    }
    // The cache now holds one file per source and target, read back on the next call.
    assert_eq!(
        std::fs::read_dir(dir.path().join("ptx")).unwrap().count(),
        6
    );
    assert!(compile::ptx("bitplane_gemv", bitplane::SOURCE, (9, 0)).is_ok());
}
