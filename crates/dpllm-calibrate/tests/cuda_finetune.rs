//! Calibration on a GPU against the CPU on a tiny quantized model: the CE
//! and ∂CE/∂p of one fine-tuning step, a few AdamW steps ending at the same
//! precisions, steps replayed from a recording against steps run op by op,
//! targets fine-tuned at once on lanes against one at a time, and the
//! estimator data. Skips with a message where there is no GPU.
#![cfg(feature = "cuda")]

use dpllm_calibrate::finetune::{
    ce_and_gradient, ce_and_gradient_on, finetune, finetune_on, linear_index, FinetuneOptions,
};
use dpllm_calibrate::step::Step;
use dpllm_calibrate::tuner::{CollectOptions, LevelStore, Tuner};
use dpllm_calibrate::weights::{quantized_linears, LevelsOn, LinearWeights, PlanesOn};
use dpllm_engine::backend::cuda::test_device;
use dpllm_engine::{Device, LoadOptions, Model};
use dpllm_grad::cuda::CudaGrad;
use dpllm_grad::GradModel;
use dpllm_quantize::model_quant::{quantize_model, QuantizeOptions};
use dpllm_testkit::{write_tiny_model, TinySpec, TINY_VOCAB};

/// A tiny f32 model quantized, loaded up to 6 bits, with its linears at 3..=6 bits.
fn tiny_quantized(t: &tempfile::TempDir) -> (Model, Vec<LinearWeights>) {
    let src = t.path().join("src");
    let spec = TinySpec {
        dtype: safetensors::Dtype::F32,
        ..TinySpec::default()
    };
    write_tiny_model(&src, &spec, 23).unwrap();
    let q = t.path().join("q");
    quantize_model(&src, &q, &QuantizeOptions::default()).unwrap();
    let model = Model::load_with(
        &q,
        &LoadOptions {
            max_bits: Some(6),
            ..Default::default()
        },
    )
    .unwrap();
    let n = model.config.linears().len();
    let w = quantized_linears(&model, 3, &vec![6; n]).unwrap();
    (model, w)
}

/// `count` sequences of 40 token ids.
fn sequences(count: u64) -> Vec<Vec<u32>> {
    (0..count)
        .map(|s| {
            (0..40u64)
                .map(|i| ((i * 7919 + s * 104729) % TINY_VOCAB as u64) as u32)
                .collect()
        })
        .collect()
}

#[test]
fn gpu_fine_tuning_matches_the_cpu() {
    let Some(dev) = test_device(0) else { return };
    let t = tempfile::tempdir().unwrap();
    let (model, w) = tiny_quantized(&t);
    let n = w.len();
    let mut cpu = GradModel::from_model(&model);
    let mut gpu =
        GradModel::on(CudaGrad::new(dev.clone()).unwrap().poisoned(), &model, None).unwrap();
    let levels = LevelsOn::upload(gpu.backend(), &w).unwrap();
    let index = linear_index(&w);
    let seqs = sequences(4);
    let p: Vec<f64> = (0..n)
        .map(|g| 3.3 + (g % 3) as f64 + 0.05 * g as f64 / n as f64)
        .collect();
    let planes = PlanesOn::upload(gpu.backend(), &w).unwrap();
    let (ce, grad) = ce_and_gradient(&mut cpu, &w, &index, &p, &seqs[0]).unwrap();
    let scale = grad.iter().fold(0f64, |m, v| m.max(v.abs()));
    let check = |how: &str, (ce_g, grad_g): (f64, Vec<f64>)| {
        assert!(
            (ce - ce_g).abs() <= 1e-5 * ce.abs(),
            "CE {ce_g} on the GPU ({how}), {ce} on the CPU"
        );
        for (g, (a, b)) in grad_g.iter().zip(&grad).enumerate() {
            assert!(
                (a - b).abs() <= 1e-3 * scale,
                "linear {g}: ∂CE/∂p {a} on the GPU ({how}), {b} on the CPU"
            );
        }
    };
    check(
        "f32 levels",
        ce_and_gradient_on(&mut gpu, &w, &levels, &index, &p, &seqs[0]).unwrap(),
    );
    check(
        "planes",
        ce_and_gradient_on(&mut gpu, &w, &planes, &index, &p, &seqs[0]).unwrap(),
    );
    let opts = FinetuneOptions {
        epochs: 2,
        ..Default::default()
    };
    let want = finetune(&mut cpu, &w, 4.0, None, &seqs, &opts).unwrap();
    for (how, got) in [
        (
            "f32 levels",
            finetune_on(&mut gpu, &w, &levels, 4.0, None, &seqs, &opts).unwrap(),
        ),
        (
            "planes",
            finetune_on(&mut gpu, &w, &planes, 4.0, None, &seqs, &opts).unwrap(),
        ),
    ] {
        assert_eq!(got.steps, want.steps);
        assert!(
            (got.mean_bits - 4.0).abs() < 1e-6,
            "the exact-target shift on the GPU ({how})"
        );
        for (g, (a, b)) in got.p.iter().zip(&want.p).enumerate() {
            assert!(
                (a - b).abs() <= 1e-3,
                "linear {g}: p {a} on the GPU ({how}), {b} on the CPU"
            );
        }
    }
    // TF32 products: the same steps land within a hundredth of a bit.
    let tf32 = CudaGrad::new(dev).unwrap().poisoned().with_tf32().unwrap();
    let mut fast = GradModel::on(tf32, &model, None).unwrap();
    let levels = LevelsOn::upload(fast.backend(), &w).unwrap();
    let got = finetune_on(&mut fast, &w, &levels, 4.0, None, &seqs, &opts).unwrap();
    let worst = (got.p.iter().zip(&want.p)).fold(0f64, |m, (a, b)| m.max((a - b).abs()));
    eprintln!("TF32 fine-tuning: largest |p - p_cpu| = {worst:.2e} bits");
    assert!(
        worst <= 1e-2,
        "TF32 fine-tuning is {worst} bits off the CPU"
    );
}

/// Steps replayed from a recording (a CUDA graph) give what the same steps
/// run op by op give, with new precisions (pairs that change bits) and
/// token ids each step, and a new sequence length recorded anew.
#[test]
fn recorded_steps_match_steps_run_op_by_op() {
    let Some(dev) = test_device(0) else { return };
    let t = tempfile::tempdir().unwrap();
    let (model, w) = tiny_quantized(&t);
    let mut gpu = GradModel::on(CudaGrad::new(dev).unwrap().poisoned(), &model, None).unwrap();
    let index = linear_index(&w);
    let f32_levels = LevelsOn::upload(gpu.backend(), &w).unwrap();
    let planes = PlanesOn::upload(gpu.backend(), &w).unwrap();
    let mut seqs = sequences(3);
    seqs[2].truncate(25);
    let order = [0, 1, 2, 0, 1];
    for how in ["f32 levels", "planes"] {
        let mut recorded = Step::new(gpu.backend(), &w, true).unwrap();
        let mut eager = Step::new(gpu.backend(), &w, false).unwrap();
        for (i, &s) in order.iter().enumerate() {
            let p: Vec<f64> = (0..w.len())
                .map(|g| 3.2 + ((g + i) % 3) as f64 + 0.15 * i as f64)
                .collect();
            let mut run = |step: &mut Step<CudaGrad>| match how {
                "planes" => step.run(&mut gpu, &w, &planes, &index, &p, &seqs[s]),
                _ => step.run(&mut gpu, &w, &f32_levels, &index, &p, &seqs[s]),
            };
            let (ce_r, grad_r) = run(&mut recorded).unwrap();
            assert!(recorded.replays(), "{how}, step {i}: not replayed");
            let (ce, grad) = run(&mut eager).unwrap();
            assert!(!eager.replays());
            assert!(
                (ce_r - ce).abs() <= 1e-9 * ce.abs(),
                "{how}, step {i}: CE {ce_r} replayed, {ce} op by op"
            );
            let scale = grad.iter().fold(0f64, |m, v| m.max(v.abs()));
            for (g, (a, b)) in grad_r.iter().zip(&grad).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-7 * scale,
                    "{how}, step {i}, linear {g}: ∂CE/∂p {a} replayed, {b} op by op"
                );
            }
        }
    }
}

/// Three targets fine-tuned at once on three lanes (streams and model
/// copies of their own) end where one lane, a target at a time, ends.
#[test]
fn targets_on_lanes_match_one_at_a_time() {
    if test_device(0).is_none() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (model, w) = tiny_quantized(&t);
    let seqs = sequences(3);
    let init: Vec<f64> = (0..w.len()).map(|g| 3.5 + (g % 2) as f64).collect();
    let targets = [(3.5, None), (4.0, Some(&init[..])), (4.75, None)];
    for store in [LevelStore::F32, LevelStore::Planes] {
        let run = |lanes| {
            let mut tuner = Tuner::open(Device::Cuda(0), &model, &w, true, store).unwrap();
            let opts = FinetuneOptions {
                epochs: 2,
                lanes,
                ..Default::default()
            };
            let r = tuner.finetune_all(&w, &targets, &seqs, &opts).unwrap();
            assert_eq!(tuner.lanes(), lanes, "{}: lanes opened", store.name());
            r
        };
        let (together, alone) = (run(3), run(1));
        for (k, (a, b)) in together.iter().zip(&alone).enumerate() {
            assert_eq!(a.steps, b.steps);
            for (g, (x, y)) in a.p.iter().zip(&b.p).enumerate() {
                assert!(
                    (x - y).abs() <= 1e-6,
                    "{}: target {k}, linear {g}: p {x} on lanes, {y} alone",
                    store.name()
                );
            }
        }
    }
}

#[test]
fn gpu_estimator_data_matches_the_cpu() {
    if test_device(0).is_none() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (model, w) = tiny_quantized(&t);
    let seqs = sequences(3);
    let close = |what: String, got: &[f32], want: &[f32]| {
        assert_eq!(got.len(), want.len(), "{what}: lengths");
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())) + 1e-12;
        for (i, (a, b)) in got.iter().zip(want).enumerate() {
            assert!(
                (a - b).abs() <= 1e-4 * scale,
                "{what}[{i}]: {a} on the GPU, {b} on the CPU"
            );
        }
    };
    for async_estimation in [false, true] {
        let opts = CollectOptions {
            async_estimation,
            max_samples: 50,
            progress: false,
        };
        let run = |device, store| {
            let mut tuner = Tuner::open(device, &model, &w, false, store).unwrap();
            assert!(store == LevelStore::Auto || tuner.level_store() == store);
            tuner.collect(&w, &seqs, opts).unwrap()
        };
        let want = run(Device::Cpu, LevelStore::Auto);
        for store in [LevelStore::F32, LevelStore::Planes] {
            let got = run(Device::Cuda(0), store);
            for (g, (a, b)) in got.iter().zip(&want).enumerate() {
                let name = format!("{} ({})", w[g].name, store.name());
                assert_eq!(a.e.len(), 3, "{name}: one error row per precision pair");
                assert_eq!(a.e.len(), b.e.len());
                for (k, (x, y)) in a.e.iter().zip(&b.e).enumerate() {
                    close(format!("{name} e[{k}] async {async_estimation}"), x, y);
                }
                close(format!("{name} input norms"), &a.est_norm, &b.est_norm);
                assert_eq!(a.sample_idx, b.sample_idx, "{name}: sampled tokens");
                assert!(a.samples() > 0, "{name}: no sampled inputs");
                close(format!("{name} samples"), &a.sample, &b.sample);
            }
        }
    }
}

/// A projection estimator fine-tuned on the GPU (`--jl-device cuda`)
/// against the CPU: the same start (no steps) to f32 rounding, and after 500
/// steps from the same draws an estimator as good on the held-out rows.
#[test]
fn projection_fit_on_the_gpu_matches_the_cpu() {
    use dpllm_calibrate::estimators::{fit_projection_on, FitOptions};
    use rand::{Rng, SeedableRng};
    let Some(dev) = test_device(0) else { return };
    let be = CudaGrad::new(dev).unwrap().poisoned();
    // Rows whose direction varies, so that only a projection tracks ||Δx||.
    let (rows, cols, n) = (48, 32, 1500);
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let delta: Vec<f32> = (0..rows * cols)
        .map(|i| match i % cols < 4 {
            true => rng.random_range(-1.0..1.0),
            false => rng.random_range(-0.01..0.01),
        })
        .collect();
    let x: Vec<f32> = (0..n * cols).map(|_| rng.random_range(-1.0..1.0)).collect();
    let e: Vec<f32> = (x.chunks(cols))
        .map(|xr| {
            let y = delta
                .chunks(cols)
                .map(|d| d.iter().zip(xr).map(|(a, b)| a * b).sum::<f32>());
            y.map(|v| v * v).sum::<f32>().sqrt()
        })
        .collect();
    for steps in [0, 500] {
        let opts = FitOptions {
            k: 16,
            steps,
            ..Default::default()
        };
        let cpu =
            fit_projection_on(&dpllm_grad::CpuGrad, &delta, rows, cols, &x, &e, &opts, 7).unwrap();
        let gpu = fit_projection_on(&be, &delta, rows, cols, &x, &e, &opts, 7).unwrap();
        assert!(
            (cpu.r2 - gpu.r2).abs() <= 0.02,
            "{steps} steps: held-out R² {} on the CPU, {} on the GPU",
            cpu.r2,
            gpu.r2
        );
        if steps == 0 {
            let scale = cpu.g.iter().fold(0f32, |m, v| m.max(v.abs()));
            let worst = (cpu.g.iter().zip(&gpu.g)).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                worst <= 1e-4 * scale,
                "initial projection differs by {worst} (scale {scale})"
            );
            assert!((cpu.bias - gpu.bias).abs() <= 1e-3 * cpu.bias.abs().max(1.0));
        } else {
            assert!(gpu.r2 > 0.6, "GPU projection R² {}", gpu.r2);
        }
    }
}
