//! Run-time selection (METHOD.md 2e–2g) on a tiny quantized model with hand-made
//! plans: per-token decisions, the asynchronous estimator input, the batch split
//! against token-by-token decoding, effective-bit counting, plan validation.

use std::path::Path;

use dpllm_engine::select::estimator::row_norms;
use dpllm_engine::{LoadOptions, Model, Precision, RuntimePlan, Selector};
use dpllm_format::plan::{EstimatorSpec, LinearPlan, Plan, PlanKind, PLAN_FORMAT, PLAN_VERSION};
use dpllm_format::Checkpoint;
use dpllm_grad::ops::rms_norm_forward;
use dpllm_grad::GradModel;
use dpllm_quantize::model_quant::{quantize_model, QuantizeOptions};
use dpllm_testkit::{write_tiny_model, TinySpec, TINY_VOCAB};

fn quantized(dir: &Path, spec: &TinySpec) -> std::path::PathBuf {
    let src = dir.join("src");
    write_tiny_model(&src, spec, 17).unwrap();
    let q = dir.join("q");
    quantize_model(&src, &q, &QuantizeOptions::default()).unwrap();
    q
}

/// The tiny model of `spec`, quantized in a fresh directory and loaded with
/// planes up to `max_bits` (the directory lives as long as the returned guard).
fn quantized_model(spec: &TinySpec, max_bits: u32) -> (tempfile::TempDir, Model) {
    let t = tempfile::tempdir().unwrap();
    let q = quantized(t.path(), spec);
    let model = Model::load_with(
        &q,
        &LoadOptions {
            max_bits: Some(max_bits),
            ..Default::default()
        },
    )
    .unwrap();
    (t, model)
}

fn tokens(n: usize) -> Vec<u32> {
    (0..n as u64)
        .map(|i| ((i * 7919 + 11) % TINY_VOCAB as u64) as u32)
        .collect()
}

/// A plan where every linear runs `lo`/`hi` with a norm-regression estimator
/// ê = ||x|| and threshold `tau` (`edit` adjusts single linears).
fn plan_for(
    model: &Model,
    lo: u32,
    hi: u32,
    tau: f32,
    edit: impl Fn(usize, &mut LinearPlan),
) -> Plan {
    let linears = model
        .config
        .linears()
        .iter()
        .enumerate()
        .map(|(g, s)| {
            let mut l = LinearPlan {
                name: s.prefix.clone(),
                size: s.size(),
                max_bits: hi,
                avg_bits: (lo + hi) as f32 / 2.0,
                low_bits: lo,
                high_bits: hi,
                threshold: tau,
                estimator: if lo == hi {
                    EstimatorSpec::None
                } else {
                    EstimatorSpec::Linear {
                        a: 1.0,
                        c: 0.0,
                        r2: 1.0,
                    }
                },
            };
            edit(g, &mut l);
            l
        })
        .collect();
    Plan {
        format: PLAN_FORMAT.into(),
        version: PLAN_VERSION,
        kind: PlanKind::Dynamic,
        budget_bits: 6.0,
        target_bits: 4.5,
        min_bits: 3,
        max_bits: 6,
        async_estimation: false,
        calibration: Default::default(),
        linears,
    }
}

fn runtime(plan: Plan, model: &Model) -> RuntimePlan {
    RuntimePlan::from_plan(plan, None, model, Path::new("test-plan.json")).unwrap()
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn logits(model: &Model, ids: &[u32], prec: Precision<'_>) -> (Vec<f32>, dpllm_engine::BitStats) {
    let mut stats = model.new_bit_stats();
    let mut cache = model.new_cache(ids.len());
    let h = model
        .forward_hidden_with(ids, &mut cache, prec, Some(&mut stats))
        .unwrap();
    (model.logits(&h).unwrap(), stats)
}

#[test]
fn extreme_thresholds_equal_fixed_precisions() {
    let (_t, model) = quantized_model(&TinySpec::default(), 6);
    let ids = tokens(10);
    for (bits, tau) in [(4u32, f32::MAX), (5, f32::MIN)] {
        let rp = runtime(plan_for(&model, 4, 5, tau, |_, _| {}), &model);
        let (got, stats) = logits(&model, &ids, Precision::Dynamic(&rp));
        let (want, _) = logits(&model, &ids, Precision::Uniform(bits));
        assert!(
            max_abs(&got, &want) < 1e-5,
            "threshold {tau} should run everything at {bits} bits"
        );
        assert!((stats.effective_bits().unwrap() - bits as f64).abs() < 1e-12);
        assert!(stats.estimator_overhead() > 0.0);
    }
    // Precision::Max runs every linear at its m_l.
    let rp = runtime(
        plan_for(&model, 4, 5, 0.0, |g, l| {
            l.max_bits = if g % 2 == 0 { 5 } else { 6 }
        }),
        &model,
    );
    let (_, stats) = logits(&model, &ids, Precision::Max(&rp));
    for g in 0..stats.sizes.len() {
        assert_eq!(
            stats.linear_bits(g),
            Some(if g % 2 == 0 { 5.0 } else { 6.0 })
        );
    }
}

#[test]
fn per_token_selection_matches_token_by_token_decoding_and_the_rule() {
    for spec in [
        TinySpec::default(),
        TinySpec {
            hidden: 64,
            heads: 8,
            kv_heads: 4,
            intermediate: 40,
            ..TinySpec::with_arch("Phi3ForCausalLM")
        },
    ] {
        let (_t, model) = quantized_model(&spec, 6);
        let ids = tokens(24);
        let o_index = model.blocks[0]
            .linears()
            .iter()
            .position(|(n, _)| *n == "o_proj")
            .unwrap();
        // With every other linear at 3 bits, o_proj of block 0 reads the attention
        // output of the 3-bit model: put its threshold between the middle two input norms.
        let acts = GradModel::from_model_at(&model, Some(3))
            .activations(&ids)
            .unwrap();
        let mut norms: Vec<f32> = row_norms(&acts[0].att, model.config.q_dim()).collect();
        norms.sort_by(|a, b| a.total_cmp(b));
        let tau = 0.5 * (norms[11] + norms[12]);
        for async_est in [false, true] {
            let mut plan = plan_for(&model, 3, 5, f32::MAX, |_, _| {});
            plan.async_estimation = async_est;
            let rp0 = runtime(plan.clone(), &model);
            let (_, s0) = logits(&model, &ids, Precision::Dynamic(&rp0));
            assert_eq!(s0.effective_bits(), Some(3.0));
            plan.linears[o_index].threshold = tau;
            let rp = runtime(plan, &model);
            let (batched, stats) = logits(&model, &ids, Precision::Dynamic(&rp));
            // Token by token through the KV cache: the same decisions, so the same
            // logits up to the decode kernel's 16-bit operands (about 1e-4 here).
            let mut cache = model.new_cache(ids.len());
            let mut single = Vec::new();
            let mut s1 = model.new_bit_stats();
            for &tok in &ids {
                single.extend(
                    model
                        .forward_last_with(
                            &[tok],
                            &mut cache,
                            Precision::Dynamic(&rp),
                            Some(&mut s1),
                        )
                        .unwrap(),
                );
            }
            assert!(
                max_abs(&batched, &single) < 1e-3,
                "{} async={async_est}: batched and token-by-token differ by {} (largest logit {})",
                spec.arch,
                max_abs(&batched, &single),
                batched.iter().fold(0f32, |m, v| m.max(v.abs()))
            );
            assert_eq!(
                stats.counts, s1.counts,
                "{}: the same tokens must pick the same precisions",
                spec.arch
            );
            for c in &stats.counts {
                assert_eq!(c.iter().sum::<u64>(), ids.len() as u64);
            }
            // o_proj of block 0 split its tokens in half; nothing else left 3 bits.
            assert_eq!(
                stats.counts[o_index][5], 12,
                "{}: half the tokens exceed the median",
                spec.arch
            );
            let high: u64 = stats.counts.iter().map(|c| c[5]).sum();
            assert_eq!(high, 12);
        }
    }
}

#[test]
fn oracle_and_random_selectors_follow_their_rules() {
    let (_t, model) = quantized_model(&TinySpec::default(), 5);
    let ids = tokens(24);
    let with = |plan: Plan, selector: Selector| {
        let mut rp = runtime(plan, &model);
        rp.selector = selector;
        rp
    };
    let (low, _) = logits(&model, &ids, Precision::Uniform(3));
    let (high, _) = logits(&model, &ids, Precision::Uniform(5));
    // Thresholds beyond every error (or below every one) fix the precision.
    for (tau, want, bits) in [(f32::MAX, &low, 3.0), (-1.0, &high, 5.0)] {
        let rp = with(plan_for(&model, 3, 5, tau, |_, _| {}), Selector::Oracle);
        let (got, stats) = logits(&model, &ids, Precision::Dynamic(&rp));
        assert!(max_abs(&got, want) < 1e-5, "oracle with threshold {tau}");
        assert_eq!(stats.effective_bits(), Some(bits));
        assert_eq!(
            stats.selection.len(),
            stats.sizes.len(),
            "the oracle records every selecting linear"
        );
        assert!(stats.selection.iter().all(
            |d| d.tokens == ids.len() as u64 && d.true_high == if bits == 5.0 { 24 } else { 0 }
        ));
    }
    // q_proj of block 0 reads the normed embeddings whatever the other linears run
    // at: put its threshold at the median of its true errors ||(W_5 − W_3)x||.
    let q_index = model.blocks[0]
        .linears()
        .iter()
        .position(|(n, _)| *n == "q_proj")
        .unwrap();
    let lin = model.blocks[0].linears()[q_index].1;
    let x = GradModel::from_model_at(&model, Some(3))
        .activations(&ids)
        .unwrap()
        .remove(0)
        .xn1;
    let out = lin.out_features();
    let run = |bits| {
        let mut y = vec![0f32; ids.len() * out];
        lin.forward(&model.backend, &x, ids.len(), Some(bits), &mut y);
        y
    };
    let (y3, y5) = (run(3), run(5));
    let diff: Vec<f32> = y3.iter().zip(&y5).map(|(a, b)| b - a).collect();
    let mut errs: Vec<f32> = row_norms(&diff, out).collect();
    errs.sort_by(|a, b| a.total_cmp(b));
    let tau = 0.5 * (errs[11] + errs[12]);
    let rp = with(
        plan_for(&model, 3, 5, f32::MAX, |g, l| {
            if g == q_index {
                l.threshold = tau
            }
        }),
        Selector::Oracle,
    );
    let (_, stats) = logits(&model, &ids, Precision::Dynamic(&rp));
    assert_eq!(
        stats.counts[q_index][5], 12,
        "the oracle sends the tokens above the median error high"
    );
    assert_eq!(stats.selection[q_index].true_high, 12);
    // ê = ||x|| against the true error: a correlation is measured.
    assert!(stats.selection[q_index].correlation().is_some());
    // Random: the plan's fraction (p − b_l)/(b_h − b_l), the same draw every run.
    for (avg, bits) in [(3.0f32, 3.0), (5.0, 5.0)] {
        let rp = with(
            plan_for(&model, 3, 5, 0.0, |_, l| l.avg_bits = avg),
            Selector::Random { seed: 1 },
        );
        let (got, stats) = logits(&model, &ids, Precision::Dynamic(&rp));
        assert!(
            max_abs(&got, if bits == 3.0 { &low } else { &high }) < 1e-5,
            "random at fraction {}",
            (avg - 3.0) / 2.0
        );
        assert_eq!(stats.effective_bits(), Some(bits));
    }
    let rp = with(
        plan_for(&model, 3, 5, 0.0, |_, l| l.avg_bits = 4.0),
        Selector::Random { seed: 1 },
    );
    let (a, sa) = logits(&model, &ids, Precision::Dynamic(&rp));
    let (b, sb) = logits(&model, &ids, Precision::Dynamic(&rp));
    assert_eq!(
        (a, &sa.counts),
        (b, &sb.counts),
        "the same seed draws the same split"
    );
    let share = sa.counts.iter().map(|c| c[5]).sum::<u64>() as f64
        / sa.counts.iter().map(|c| c[3] + c[5]).sum::<u64>() as f64;
    assert!(
        (share - 0.5).abs() < 0.1,
        "half the tokens should run high, got {share}"
    );
    assert_eq!(sa.estimator_flops, 0);
}

#[test]
fn asynchronous_estimates_read_the_previous_residual() {
    let spec = TinySpec {
        dtype: safetensors::Dtype::F32,
        ..TinySpec::default()
    };
    let (_t, model) = quantized_model(&spec, 5);
    let ids = tokens(32);
    let nlin = model.blocks[0].linears().len();
    // Only block 1's q_proj (index nlin) and gate_proj (index nlin + 4) select, at 3 or 5 bits;
    // everything else runs at 5 bits. ê = ||x_est||, τ = the median of ||x_est||.
    let gm = GradModel::from_model_at(&model, Some(5));
    let acts = gm.activations(&ids).unwrap();
    let eps = model.config.rms_norm_eps;
    let d = model.config.hidden_size;
    let normed = |x: &[f32], w: &[f32]| {
        let mut o = vec![0f32; x.len()];
        rms_norm_forward(x, w, eps, &mut o);
        row_norms(&o, d).collect::<Vec<f32>>()
    };
    let median = |v: &[f32]| {
        let mut s = v.to_vec();
        s.sort_by(|a, b| a.total_cmp(b));
        s[s.len() / 2]
    };
    for async_est in [true, false] {
        // Expected estimator inputs (METHOD.md 2f): q/k/v of block 1 read block 0's residual
        // before its MLP output (h_mid), gate/up read block 1's input before its attention output.
        let (q_in, g_in) = if async_est {
            (
                normed(&acts[0].h_mid, &gm.blocks[1].attn_norm),
                normed(&acts[1].h_in, &gm.blocks[1].mlp_norm),
            )
        } else {
            (
                row_norms(&acts[1].xn1, d).collect(),
                row_norms(&acts[1].xn2, d).collect(),
            )
        };
        let (tq, tg) = (median(&q_in), median(&g_in));
        let mut plan = plan_for(&model, 5, 5, 0.0, |_, _| {});
        plan.async_estimation = async_est;
        for (g, tau) in [(nlin, tq), (nlin + 4, tg)] {
            let l = &mut plan.linears[g];
            (l.low_bits, l.high_bits, l.threshold, l.avg_bits) = (3, 5, tau, 4.0);
            l.estimator = EstimatorSpec::Linear {
                a: 1.0,
                c: 0.0,
                r2: 1.0,
            };
        }
        let rp = runtime(plan, &model);
        let (_, stats) = logits(&model, &ids, Precision::Dynamic(&rp));
        let want_q = q_in.iter().filter(|&&v| v > tq).count() as u64;
        let want_g = g_in.iter().filter(|&&v| v > tg).count() as u64;
        assert_eq!(
            stats.counts[nlin][5], want_q,
            "async={async_est}: q_proj high-precision tokens"
        );
        assert_eq!(
            stats.counts[nlin + 4][5],
            want_g,
            "async={async_est}: gate_proj high-precision tokens"
        );
        assert!(want_q > 0 && want_q < ids.len() as u64);
    }
}

#[test]
fn plans_that_do_not_fit_the_model_are_rejected() {
    let (t, model) = quantized_model(&TinySpec::default(), 5);
    let err = |plan: Plan| {
        RuntimePlan::from_plan(plan, None, &model, Path::new("p.json"))
            .unwrap_err()
            .to_string()
    };
    // Needs 6 bits, the model holds 5.
    assert!(err(plan_for(&model, 4, 6, 0.0, |_, _| {})).contains("the model holds 3..=5"));
    // A plan for another model is the request's mistake (a server answers 400), not a broken file.
    let kind = RuntimePlan::from_plan(
        plan_for(&model, 4, 6, 0.0, |_, _| {}),
        None,
        &model,
        Path::new("p.json"),
    )
    .unwrap_err()
    .kind();
    assert_eq!(kind, dpllm_engine::ErrorKind::User);
    let mut p = plan_for(&model, 4, 5, 0.0, |_, _| {});
    p.linears.pop();
    assert!(err(p).contains("linears"));
    let p = plan_for(&model, 4, 5, 0.0, |g, l| {
        if g == 3 {
            l.name = "model.layers.0.self_attn.x_proj".into()
        }
    });
    assert!(err(p).contains("does not match"));
    let p = plan_for(&model, 4, 5, 0.0, |g, l| {
        if g == 2 {
            l.estimator = EstimatorSpec::Jl {
                tensor: "t".into(),
                k: 4,
                bias: 0.0,
                r2: 0.5,
            };
        }
    });
    assert!(err(p).contains("estimators.safetensors is missing"));
    // A JL tensor of the wrong shape in the estimators file.
    let est = t.path().join("est.safetensors");
    let data = vec![0u8; 4 * 3 * 4];
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![4, 3], &data).unwrap();
    safetensors::serialize_to_file(vec![("t", view)], None, &est).unwrap();
    let ck = Checkpoint::open_file(&est).unwrap();
    let p = plan_for(&model, 4, 5, 0.0, |g, l| {
        if g == 2 {
            l.estimator = EstimatorSpec::Jl {
                tensor: "t".into(),
                k: 4,
                bias: 0.0,
                r2: 0.5,
            };
        }
    });
    let e = RuntimePlan::from_plan(p, Some(&ck), &model, Path::new("p.json"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("\"t\""), "{e}");
    // A dense model cannot run a plan.
    let dense = Model::load(&t.path().join("src")).unwrap();
    let e = RuntimePlan::from_plan(
        plan_for(&dense, 4, 5, 0.0, |_, _| {}),
        None,
        &dense,
        Path::new("p.json"),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("not quantized"), "{e}");
}

/// Logits of every step of a session: the prompt, then `ids` decoded one at a time.
fn session_logits(s: &mut dpllm_engine::Session, ids: &[u32]) -> Vec<f32> {
    let mut out = s.prefill(&ids[..4]).unwrap();
    for &t in &ids[4..] {
        out.extend(s.decode_step(t).unwrap());
    }
    out
}

#[test]
fn one_model_serves_concurrent_sessions_at_different_precisions() {
    use dpllm_engine::{RunPrecision, ServedModel};
    use std::sync::Arc;
    let (_t, model) = quantized_model(&TinySpec::default(), 6);
    let served = ServedModel::from_model(model);
    let ids = tokens(20);
    // Two DP-LLM targets (thresholds that split the tokens differently) and two uniform widths.
    let model = served.model().clone();
    let precisions = [
        RunPrecision::Plan(Arc::new(runtime(
            plan_for(&model, 3, 5, 9.0, |_, _| {}),
            &model,
        ))),
        RunPrecision::Plan(Arc::new(runtime(
            plan_for(&model, 4, 6, 12.0, |_, _| {}),
            &model,
        ))),
        RunPrecision::Uniform(3),
        RunPrecision::Uniform(6),
    ];
    let sequential: Vec<(Vec<f32>, Vec<[u64; 9]>)> = precisions
        .iter()
        .map(|p| {
            let mut s = served.session(p.clone(), ids.len()).unwrap();
            (session_logits(&mut s, &ids), s.stats().counts.clone())
        })
        .collect();
    assert_ne!(
        sequential[0].0, sequential[1].0,
        "the two targets must differ for the test to mean anything"
    );
    assert_ne!(sequential[2].0, sequential[3].0);
    std::thread::scope(|scope| {
        let handles: Vec<_> = precisions
            .iter()
            .map(|p| {
                let served = &served;
                let ids = &ids;
                scope.spawn(move || {
                    (0..3)
                        .map(|_| {
                            let mut s = served.session(p.clone(), ids.len()).unwrap();
                            (session_logits(&mut s, ids), s.stats().counts.clone())
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for (h, want) in handles.into_iter().zip(&sequential) {
            for got in h.join().unwrap() {
                assert_eq!(
                    &got, want,
                    "a concurrent session must give exactly its sequential result"
                );
            }
        }
    });
}

#[test]
fn sessions_check_their_precision_and_stop_when_cancelled() {
    use dpllm_engine::{ErrorKind, RunPrecision, ServedModel};
    let (_t, model) = quantized_model(&TinySpec::default(), 5);
    let served = ServedModel::from_model(model);
    for bad in [2, 6] {
        let e = served
            .session(RunPrecision::Uniform(bad), 8)
            .err()
            .expect("bits outside the loaded range");
        assert_eq!(e.kind(), ErrorKind::User, "{e}");
        assert!(e.to_string().contains("loaded range 3..=5"), "{e}");
    }
    // Loaded for a plan, linears hold different numbers of planes: uniform
    // bits must be held by every one of them, or the request is refused.
    let uneven = plan_for(served.model(), 3, 5, 1.0, |i, l| {
        if i % 2 == 1 {
            (l.max_bits, l.high_bits) = (4, 4);
        }
    });
    let dir = &served.model().dir;
    let partial = Model::load_with(dir, &LoadOptions::for_plan(&uneven)).unwrap();
    assert_eq!(partial.bits_range(), Some((3, 4)));
    let e = partial.check_precision(Precision::Uniform(5)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::User, "{e}");
    assert!(e.to_string().contains("loaded range 3..=4"), "{e}");
    let mut s = served.session(RunPrecision::Uniform(4), 8).unwrap();
    s.prefill(&tokens(3)).unwrap();
    let cancel = s.cancel_token();
    cancel.cancel();
    let e = s.decode_step(1).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Cancelled);
    // The cache is the session's own: a full one is a user error, not a panic.
    let mut s = served.session(RunPrecision::Highest, 4).unwrap();
    s.prefill(&tokens(4)).unwrap();
    assert_eq!(s.decode_step(1).unwrap_err().kind(), ErrorKind::User);
}

#[test]
fn sessions_decoding_in_one_batch_match_their_steps_alone() {
    use dpllm_engine::model::{Next, Readout};
    use dpllm_engine::sampler::Draw;
    use dpllm_engine::{ErrorKind, RunPrecision, ServedModel, Session};
    use std::sync::Arc;
    let (_t, model) = quantized_model(&TinySpec::default(), 6);
    let served = ServedModel::from_model(model);
    let model = served.model().clone();
    let plan_a = Arc::new(runtime(plan_for(&model, 3, 5, 5.6, |_, _| {}), &model));
    let mut async_plan = plan_for(&model, 4, 6, 12.0, |_, _| {});
    async_plan.async_estimation = true;
    let plan_b = Arc::new(runtime(async_plan, &model));
    // Two sessions share plan A (one group, counted per session), one runs
    // the asynchronous plan B, one a uniform width; prompts of different
    // lengths put the sessions at different positions. (Up to 8 tokens the
    // CPU runs the GEMV, whose rounding does not depend on the token count;
    // above, dense layers run as a tiled GEMM, which rounds otherwise.)
    let precisions = [
        RunPrecision::Plan(plan_a.clone()),
        RunPrecision::Plan(plan_b),
        RunPrecision::Uniform(3),
        RunPrecision::Plan(plan_a),
    ];
    let ids = tokens(40);
    let prompt = |i: usize| &ids[i..i + 3 + 2 * i];
    let steps = 6;
    let decoded = |i: usize, t: usize| ids[(7 * i + 3 * t + 1) % ids.len()];
    // Alone: each session's prompt, then its tokens one step at a time.
    // Per session: the logits of every step and the bit counts after it.
    type Steps = (Vec<Vec<f32>>, Vec<[u64; 9]>);
    let alone: Vec<Steps> = precisions
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let mut s = served.session(p.clone(), 32).unwrap();
            s.prefill(prompt(i)).unwrap();
            s.reset_stats();
            let logits = (0..steps)
                .map(|t| s.decode_step(decoded(i, t)).unwrap())
                .collect();
            (logits, s.stats().counts.clone())
        })
        .collect();
    // Together: the same steps, one batched call a step.
    let mut sessions: Vec<Session> = precisions
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let mut s = served.session(p.clone(), 32).unwrap();
            s.prefill(prompt(i)).unwrap();
            s.reset_stats();
            s
        })
        .collect();
    // What each step hands back: every session's logits; logits beside
    // tokens chosen from them; only tokens (greedy and drawn, on the backend).
    let readout = |i: usize, t: usize| {
        let draw = Readout::Sample(Draw {
            inv_temperature: 1.5,
            top_k: [0, 5][i % 2],
            top_p: 0.9,
            uniform: (0.1 + 0.13 * (i + t) as f32).fract(),
        });
        match (t % 3, i % 3) {
            (0, _) | (1, 0) => Readout::Logits,
            (_, 1) => Readout::Argmax,
            _ => draw,
        }
    };
    for t in 0..steps {
        let mut batch: Vec<(&mut Session, u32, Readout)> = sessions
            .iter_mut()
            .enumerate()
            .map(|(i, s)| (s, decoded(i, t), readout(i, t)))
            .collect();
        let got = Session::decode_batch(&mut batch).unwrap();
        for (i, g) in got.into_iter().enumerate() {
            let logits = &alone[i].0[t];
            let want = match readout(i, t) {
                Readout::Logits => Next::Logits(logits.clone()),
                Readout::Argmax => Next::Token(dpllm_engine::sampler::argmax(logits)),
                Readout::Sample(d) => Next::Token(dpllm_engine::sampler::draw(logits, d)),
            };
            assert_eq!(
                g, want,
                "session {i}, step {t}: a batched step must give what it gives alone"
            );
        }
    }
    for (i, s) in sessions.iter().enumerate() {
        assert_eq!(
            s.stats().counts,
            alone[i].1,
            "session {i}'s precision counts"
        );
    }
    let decisions = &alone[0].1;
    assert!(
        decisions.iter().any(|c| c[3] > 0) && decisions.iter().any(|c| c[5] > 0),
        "plan A must send tokens both ways for the test to mean anything: {decisions:?}"
    );
    // A batch that cannot run leaves every cache as it was.
    let lens: Vec<usize> = sessions.iter().map(|s| s.len()).collect();
    let mut batch: Vec<(&mut Session, u32, Readout)> = sessions
        .iter_mut()
        .map(|s| (s, TINY_VOCAB as u32, Readout::Argmax))
        .collect();
    let e = Session::decode_batch(&mut batch).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::User, "{e}");
    assert_eq!(sessions.iter().map(|s| s.len()).collect::<Vec<_>>(), lens);
    // Oracle selection reads back mid-call: refused in a batch.
    let mut oracle = runtime(plan_for(&model, 3, 5, 9.0, |_, _| {}), &model);
    oracle.selector = dpllm_engine::Selector::Oracle;
    let mut o = served
        .session(RunPrecision::Plan(Arc::new(oracle)), 8)
        .unwrap();
    o.prefill(&ids[..2]).unwrap();
    let mut batch: Vec<(&mut Session, u32, Readout)> = vec![
        (&mut sessions[0], 1, Readout::Logits),
        (&mut o, 1, Readout::Logits),
    ];
    let e = Session::decode_batch(&mut batch).unwrap_err();
    assert!(e.to_string().contains("one sequence at a time"), "{e}");
}
