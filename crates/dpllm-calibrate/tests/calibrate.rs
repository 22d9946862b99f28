//! Calibration end to end on tiny quantized models: the fine-tuning gradient
//! against finite differences, the written plans, and bad options.

use std::path::{Path, PathBuf};

use dpllm_calibrate::estimators::FitOptions;
use dpllm_calibrate::finetune::{ce_and_gradient, finetune, linear_index, FinetuneOptions};
use dpllm_calibrate::pipeline::{calibrate, CalibrateOptions, CalibrationData};
use dpllm_calibrate::weights::quantized_linears;
use dpllm_engine::{LoadOptions, Model, Precision, RuntimePlan};
use dpllm_format::plan::{self, EstimatorSpec, Plan, PlanKind};
use dpllm_grad::GradModel;
use dpllm_quantize::model_quant::{quantize_model, QuantizeOptions};
use dpllm_testkit::{write_tiny_model, TinySpec, TINY_VOCAB};

fn quantized(dir: &Path, spec: &TinySpec) -> PathBuf {
    let src = dir.join("src");
    write_tiny_model(&src, spec, 23).unwrap();
    let q = dir.join("q");
    quantize_model(&src, &q, &QuantizeOptions::default()).unwrap();
    q
}

fn seqs(n: usize, len: usize, seed: u64) -> Vec<Vec<u32>> {
    (0..n as u64)
        .map(|s| {
            (0..len as u64)
                .map(|i| ((i * 7919 + (s + seed) * 104729) % TINY_VOCAB as u64) as u32)
                .collect()
        })
        .collect()
}

#[test]
fn fine_tuning_gradient_matches_finite_differences() {
    let t = tempfile::tempdir().unwrap();
    let q = quantized(
        t.path(),
        &TinySpec {
            dtype: safetensors::Dtype::F32,
            ..TinySpec::default()
        },
    );
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
    let mut gm = GradModel::from_model(&model);
    let index = linear_index(&w);
    let seq = &seqs(1, 20, 0)[0];
    // p inside (b, b+1) for every linear, so CE is smooth around it.
    let p: Vec<f64> = (0..n)
        .map(|g| 3.3 + (g % 3) as f64 + 0.05 * g as f64 / n as f64)
        .collect();
    let (_, grad) = ce_and_gradient(&mut gm, &w, &index, &p, seq).unwrap();
    let h = 0.01;
    for g in [0, 3, 5, n - 1] {
        let mut pp = p.clone();
        pp[g] += h;
        let (up, _) = ce_and_gradient(&mut gm, &w, &index, &pp, seq).unwrap();
        pp[g] -= 2.0 * h;
        let (down, _) = ce_and_gradient(&mut gm, &w, &index, &pp, seq).unwrap();
        let fd = (up - down) / (2.0 * h);
        assert!(
            (fd - grad[g]).abs() <= 0.02 * fd.abs().max(grad[g].abs()) + 1e-5,
            "linear {g}: analytic {} vs finite difference {fd}",
            grad[g]
        );
    }
    assert!(grad.iter().any(|g| g.abs() > 1e-6), "all gradients vanish");
}

#[test]
fn fine_tuning_lowers_the_loss_and_lands_on_the_target() {
    let t = tempfile::tempdir().unwrap();
    let q = quantized(t.path(), &TinySpec::default());
    let model = Model::load_with(
        &q,
        &LoadOptions {
            max_bits: Some(5),
            ..Default::default()
        },
    )
    .unwrap();
    let n = model.config.linears().len();
    let w = quantized_linears(&model, 3, &vec![5; n]).unwrap();
    let mut gm = GradModel::from_model(&model);
    let data = seqs(6, 24, 1);
    let opts = FinetuneOptions {
        epochs: 6,
        lr: 0.05,
        ..Default::default()
    };
    let r = finetune(&mut gm, &w, 4.0, None, &data, &opts).unwrap();
    assert!((r.mean_bits - 4.0).abs() < 1e-6, "{}", r.mean_bits);
    assert!(r
        .p
        .iter()
        .zip(&w)
        .all(|(p, l)| *p >= l.min_bits as f64 && *p <= l.max_bits as f64));
    assert!(
        r.p.iter().any(|p| (p - 4.0).abs() > 0.05),
        "precisions never moved: {:?}",
        r.p
    );
    assert_eq!(r.steps, 36);
    let bad = finetune(&mut gm, &w, 5.5, None, &data, &opts)
        .unwrap_err()
        .to_string();
    assert!(bad.contains("target 5.5"), "{bad}");
}

fn small_options(targets: Vec<f64>) -> CalibrateOptions {
    CalibrateOptions {
        budget: 4.5,
        targets,
        max_bits: 5,
        finetune: FinetuneOptions {
            epochs: 1,
            ..Default::default()
        },
        fit: FitOptions {
            steps: 50,
            k: 8,
            ..Default::default()
        },
        max_samples: 64,
        ..Default::default()
    }
}

#[test]
fn calibrate_writes_plans_that_run_at_their_targets() {
    let t = tempfile::tempdir().unwrap();
    let q = quantized(
        t.path(),
        &TinySpec {
            layers: 3,
            ..TinySpec::default()
        },
    );
    let data = CalibrationData {
        finetune: seqs(4, 32, 2),
        estimator: seqs(6, 32, 3),
    };
    let r = calibrate(&q, &data, &small_options(vec![3.5, 4.0])).unwrap();
    assert!(
        r.memory_bits <= 4.5 && r.memory_bits > 4.3,
        "{}",
        r.memory_bits
    );
    let bdir = plan::budget_dir(&q, 4.5);
    assert_eq!(r.budget_dir, bdir);
    assert_eq!(
        plan::available_targets(&bdir, PlanKind::Dynamic),
        vec![3.5, 4.0]
    );
    assert_eq!(
        plan::available_targets(&bdir, PlanKind::Static),
        vec![3.5, 4.0]
    );
    let leftovers: Vec<_> = std::fs::read_dir(q.join("plans"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        leftovers.len(),
        1,
        "temporary directories left: {leftovers:?}"
    );
    for tr in &r.targets {
        let p = Plan::load(&tr.plan).unwrap();
        assert_eq!(p.kind, PlanKind::Dynamic);
        // Linears with r > 0.99 or < 0.01 round to one precision (METHOD.md 2d): P moves a little.
        assert!(
            (p.mean_bits() - tr.target).abs() < 0.01,
            "plan mean {} vs target {}",
            p.mean_bits(),
            tr.target
        );
        assert!((p.memory_bits() - r.memory_bits).abs() < 1e-9);
        assert!(
            (tr.calibration_effective_bits - tr.target).abs() < 0.35,
            "{tr:?}"
        );
        for l in &p.linears {
            assert!(l.low_bits <= l.high_bits && l.high_bits <= l.max_bits && l.max_bits <= 5);
            assert_eq!(
                l.low_bits == l.high_bits,
                l.estimator == EstimatorSpec::None,
                "{l:?}"
            );
        }
        let s = Plan::load(&plan::plan_path(&bdir, PlanKind::Static, tr.target)).unwrap();
        assert!(
            s.mean_bits() <= tr.target + 1e-9
                && s.linears.iter().all(|l| l.low_bits == l.high_bits)
        );
        // The model loaded for the budget runs both plans; no weights reload between them.
        let model = Model::load_with(&q, &LoadOptions::for_plan(&p)).unwrap();
        for plan_file in [
            tr.plan.clone(),
            plan::plan_path(&bdir, PlanKind::Static, tr.target),
        ] {
            let rp = RuntimePlan::load(&plan_file, &model).unwrap();
            let ids = &data.estimator[0];
            let mut stats = model.new_bit_stats();
            let mut cache = model.new_cache(ids.len());
            model
                .forward_hidden_with(ids, &mut cache, Precision::Dynamic(&rp), Some(&mut stats))
                .unwrap();
            let eff = stats.effective_bits().unwrap();
            assert!((3.0..=5.0).contains(&eff), "{eff}");
        }
    }
    // The budget directory is one run's output: a second run needs overwrite.
    let e = calibrate(&q, &data, &small_options(vec![4.0]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("already exists"), "{e}");
    calibrate(
        &q,
        &data,
        &CalibrateOptions {
            overwrite: true,
            ..small_options(vec![4.0])
        },
    )
    .unwrap();
    assert_eq!(plan::available_targets(&bdir, PlanKind::Dynamic), vec![4.0]);
}

#[test]
fn bad_calibration_requests_are_rejected() {
    let t = tempfile::tempdir().unwrap();
    let q = quantized(t.path(), &TinySpec::default());
    let data = CalibrationData {
        finetune: seqs(1, 16, 0),
        estimator: seqs(1, 16, 1),
    };
    let cases: Vec<(CalibrateOptions, &str)> = vec![
        (small_options(vec![4.75]), "target 4.75"),
        (small_options(vec![2.5]), "target 2.5"),
        (small_options(vec![]), "no --targets"),
        (
            CalibrateOptions {
                budget: 5.5,
                ..small_options(vec![4.0])
            },
            "--budget 5.5",
        ),
        (
            CalibrateOptions {
                min_bits: 2,
                ..small_options(vec![4.0])
            },
            "--min-bits 2",
        ),
        (
            CalibrateOptions {
                max_bits: 9,
                ..small_options(vec![4.0])
            },
            "--max-bits 9",
        ),
    ];
    for (o, want) in cases {
        let e = calibrate(&q, &data, &o).unwrap_err().to_string();
        assert!(e.contains(want), "{want}: {e}");
    }
    let e = calibrate(&t.path().join("src"), &data, &small_options(vec![4.0]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a dpllm any-precision model"), "{e}");
    let empty = CalibrationData {
        finetune: vec![],
        estimator: vec![],
    };
    assert!(calibrate(&q, &empty, &small_options(vec![4.0])).is_err());
    assert!(!q.join("plans").join("budget-4.50").exists());
}

/// The estimator data against a direct computation from the model's
/// activations at m_l: each true error is ||(W_{b+1} − W_b) x|| of the
/// linear's input, each input norm ||x|| (exact inputs) or the norm of the
/// previous residual normed by this sub-block's norm (asynchronous), and the
/// sampled rows are every stride-th token's input.
#[test]
fn estimator_data_matches_a_direct_computation() {
    use dpllm_calibrate::tuner::{CollectOptions, Tuner};
    use dpllm_engine::select::estimator::row_norms;
    use dpllm_format::LinearKind;
    use dpllm_grad::ops::{linear_forward, rms_norm_forward};

    let t = tempfile::tempdir().unwrap();
    let spec = TinySpec {
        dtype: safetensors::Dtype::F32,
        ..TinySpec::default()
    };
    let q = quantized(t.path(), &spec);
    let load = LoadOptions {
        max_bits: Some(6),
        ..Default::default()
    };
    let model = Model::load_with(&q, &load).unwrap();
    let n = model.config.linears().len();
    let w = quantized_linears(&model, 3, &vec![6; n]).unwrap();
    let gm = GradModel::from_model(&model);
    let data = seqs(3, 17, 5);
    let eps = model.config.rms_norm_eps;
    let close = |what: &str, got: f32, want: f64| {
        assert!(
            (got as f64 - want).abs() <= 1e-4 * (1.0 + want.abs()),
            "{what}: {got} collected, {want} direct"
        );
    };
    for async_estimation in [false, true] {
        let opts = CollectOptions {
            async_estimation,
            max_samples: 10,
            progress: false,
        };
        let mut tuner = Tuner::open(
            dpllm_engine::Device::Cpu,
            &model,
            &w,
            false,
            Default::default(),
        )
        .unwrap();
        let calib = tuner.collect(&w, &data, opts).unwrap();
        // 51 tokens, at most 10 samples: every 6th token.
        let stride = 6;
        let mut seen = 0;
        for seq in &data {
            let acts = gm.activations(seq).unwrap();
            for (g, l) in w.iter().enumerate() {
                let a = &acts[l.layer];
                let (x, resid) = match l.kind {
                    LinearKind::Q | LinearKind::K | LinearKind::V | LinearKind::Qkv => (
                        &a.xn1,
                        (l.layer > 0)
                            .then(|| (&acts[l.layer - 1].h_mid, &gm.blocks[l.layer].attn_norm)),
                    ),
                    LinearKind::O => (&a.att, None),
                    LinearKind::Gate | LinearKind::Up | LinearKind::GateUp => {
                        (&a.xn2, Some((&a.h_in, &gm.blocks[l.layer].mlp_norm)))
                    }
                    LinearKind::Down => (&a.act, None),
                };
                let est: Vec<f32> = match resid.filter(|_| async_estimation) {
                    Some((h, norm)) => {
                        let mut o = vec![0f32; h.len()];
                        rms_norm_forward(h, norm, eps, &mut o);
                        o
                    }
                    None => x.clone(),
                };
                let c = &calib[g];
                for (k, b) in (3..6).enumerate() {
                    let mut y = vec![0f32; seq.len() * l.rows];
                    linear_forward(x, seq.len(), &l.delta(b), l.rows, l.cols, None, &mut y);
                    for (tok, e) in row_norms(&y, l.rows).enumerate() {
                        close(
                            &format!("{} e[{k}][{}]", l.name, seen + tok),
                            c.e[k][seen + tok],
                            e as f64,
                        );
                    }
                }
                for (tok, v) in row_norms(&est, l.cols).enumerate() {
                    close(
                        &format!("{} input norm {}", l.name, seen + tok),
                        c.est_norm[seen + tok],
                        v as f64,
                    );
                    let global = seen + tok;
                    if let Some(i) = c.sample_idx.iter().position(|&s| s == global) {
                        assert_eq!(global % stride, 0, "{}: token {global} sampled", l.name);
                        let row = &c.sample[i * l.cols..(i + 1) * l.cols];
                        assert_eq!(
                            row,
                            &est[tok * l.cols..(tok + 1) * l.cols],
                            "{}: sampled row",
                            l.name
                        );
                    }
                }
            }
            seen += seq.len();
        }
        for c in &calib {
            assert_eq!(c.sample_idx, (0..51).step_by(stride).collect::<Vec<_>>());
            assert_eq!(c.est_norm.len(), 51);
        }
    }
}
