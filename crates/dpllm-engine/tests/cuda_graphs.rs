//! Decode steps recorded as CUDA graphs and replayed give exactly what the
//! same steps give op by op: logits and precision counts, across KV growth
//! (the storage moves, so the step is recorded anew), a truncated cache, and
//! precisions changing between steps. Skips with a message where there is no GPU.
#![cfg(feature = "cuda")]

use std::sync::Arc;

use dpllm_engine::backend::cuda::{test_device, CudaBackend};
use dpllm_engine::model::synthetic::{synthetic_config, SyntheticWeights};
use dpllm_engine::model::{Next, Readout};
use dpllm_engine::sampler::Draw;
use dpllm_engine::select::Precision;
use dpllm_engine::Model;

fn model(be: CudaBackend) -> Model<CudaBackend> {
    let mut c = synthetic_config("smollm2-135m").unwrap();
    c.num_layers = 3;
    Model::synthetic(
        be,
        "graphs",
        c,
        SyntheticWeights::AnyPrec { max_bits: 5 },
        11,
    )
    .unwrap()
}

fn argmax(v: &[f32]) -> u32 {
    v.iter()
        .enumerate()
        .fold((0, f32::MIN), |m, (i, &x)| if x > m.1 { (i, x) } else { m })
        .0 as u32
}

#[test]
fn replayed_decode_steps_match_op_by_op_steps() {
    let Some(dev) = test_device(0) else { return };
    let be = CudaBackend::on(dev).unwrap();
    let (graphed, plain) = (
        Arc::new(model(be.clone().with_graphs(true))),
        Arc::new(model(be.with_graphs(false))),
    );
    let (mut gc, mut pc) = (graphed.new_cache(512), plain.new_cache(512));
    let (mut gs, mut ps) = (graphed.new_bit_stats(), plain.new_bit_stats());
    let prompt = [1u32, 5, 9, 200, 4000];
    let g0 = graphed.forward_last(&prompt, &mut gc).unwrap();
    let p0 = plain.forward_last(&prompt, &mut pc).unwrap();
    assert_eq!(g0, p0, "the prompt runs op by op on both");
    let mut token = argmax(&p0);
    // 150 steps cross the KV storage's growth at 64 and 128 positions; the
    // precision changes every 40 steps, and the cache is cut back once.
    let precisions = [
        Precision::Uniform(4),
        Precision::Highest,
        Precision::Uniform(3),
        Precision::Uniform(4),
    ];
    for step in 0..150 {
        if step == 100 {
            gc.truncate(30);
            pc.truncate(30);
        }
        let prec = precisions[step / 40];
        let g = graphed
            .forward_last_with(&[token], &mut gc, prec, Some(&mut gs))
            .unwrap();
        let p = plain
            .forward_last_with(&[token], &mut pc, prec, Some(&mut ps))
            .unwrap();
        assert!(gc.holds_recorded_step(), "step {step} was recorded");
        assert!(!pc.holds_recorded_step());
        assert_eq!(gc.len(), pc.len());
        let diff = g
            .iter()
            .zip(&p)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(diff <= 1e-5, "step {step}: logits differ by {diff}");
        token = argmax(&p);
    }
    assert_eq!(gs.counts, ps.counts, "precision counts");
    assert_eq!(gs.effective_bits(), ps.effective_bits());
}

/// The linears of a decode read their input split by the op that made it
/// (norms, attention, SwiGLU): the logits equal those of the same model whose
/// every GEMV splits its input itself, for a prompt of 5 tokens and 30 steps
/// at 3, 4 and 5 bits.
#[test]
fn decode_on_split_inputs_matches_decode_splitting_in_the_gemv() {
    let Some(dev) = test_device(0) else { return };
    let be = CudaBackend::on(dev).unwrap();
    let (split, own) = (
        model(be.clone().with_op_halves(true)),
        model(be.with_op_halves(false)),
    );
    side_by_side(&split, &own, |s, o, step| {
        let diff = (s.iter().zip(o))
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            diff <= 1e-5,
            "step {step} at {} bits: logits differ by {diff}",
            3 + step % 3
        );
    });
}

/// A prompt of 5 tokens, then 29 steps, at 3, 4 and 5 bits in turn, on `a`
/// and `b` alike (each step feeding `b`'s greedy token to both), `check(a's
/// logits, b's, step)` at each.
fn side_by_side(
    a: &Model<CudaBackend>,
    b: &Model<CudaBackend>,
    check: impl Fn(&[f32], &[f32], usize),
) {
    let (mut ac, mut bc) = (a.new_cache(64), b.new_cache(64));
    let precisions = [
        Precision::Uniform(3),
        Precision::Uniform(4),
        Precision::Highest,
    ];
    let mut tokens = vec![1u32, 5, 9, 200, 4000];
    for step in 0..30 {
        let prec = precisions[step % 3];
        let x = a.forward_last_with(&tokens, &mut ac, prec, None).unwrap();
        let y = b.forward_last_with(&tokens, &mut bc, prec, None).unwrap();
        check(&x, &y, step);
        tokens = vec![argmax(&y)];
    }
}

/// The launch options give the logits of plain launches, replayed as graphs
/// and op by op, 30 steps at 3, 4 and 5 bits: programmatic dependent launch
/// (each kernel may start before the one it follows ends, and waits in the
/// kernel for its inputs), half-copy 4-bit pair tables and the GEMV's L2
/// prefetch exactly; split-K (every layer of this model has fewer tiles
/// than multiprocessors, so each tile is split over blocks whose last adds
/// their sums, a counter per tile reset for the next replay) within f32
/// rounding. Where the GPU has no PDL (before sm_90) its runs launch
/// plainly, and the test says so.
#[test]
fn decode_with_launch_options_matches_plain_launches() {
    let Some(plain) = test_device(0) else { return };
    plain.set_pdl(false);
    plain.set_split_k(false);
    plain.set_half_pairs(false);
    plain.set_prefetch(false);
    for (pdl, split_k, other) in [
        (true, false, false),
        (false, true, false),
        (true, true, false),
        (true, false, true),
    ] {
        let Some(opt) = test_device(0) else { return };
        if pdl && !opt.set_pdl(true) {
            eprintln!("{}: no programmatic dependent launch", opt.describe());
        }
        opt.set_split_k(split_k);
        opt.set_half_pairs(other);
        opt.set_prefetch(other);
        for graphs in [true, false] {
            let (a, b) = (
                model(CudaBackend::on(opt.clone()).unwrap().with_graphs(graphs)),
                model(CudaBackend::on(plain.clone()).unwrap().with_graphs(graphs)),
            );
            side_by_side(&a, &b, |x, y, step| {
                let what = format!("{}, graphs {graphs}, step {step}", opt.describe());
                if split_k {
                    let diff = (x.iter().zip(y))
                        .map(|(a, b)| (a - b).abs() / (1.0 + b.abs()))
                        .fold(0f32, f32::max);
                    assert!(diff <= 1e-4, "{what}: the logits differ by {diff}");
                } else {
                    assert_eq!(x, y, "{what}: the logits differ");
                }
            });
        }
    }
}

/// Forty steps of a sequence, replayed and op by op, each choosing its
/// token on the GPU as `readout(step)` asks, checked by `check(logits,
/// readout, token)` against the logits of the same step on a second cache;
/// the tokens chosen with graphs on, then off (None: no GPU).
fn tokens_chosen_on_the_gpu(
    readout: impl Fn(usize) -> Readout,
    check: impl Fn(&[f32], Readout, u32) -> Result<(), String>,
) -> Option<Vec<u32>> {
    let dev = test_device(0)?;
    let be = CudaBackend::on(dev).unwrap();
    let mut chosen = Vec::new();
    for graphs in [true, false] {
        let m = model(be.clone().with_graphs(graphs));
        let (mut by_id, mut by_logits) = (m.new_cache(256), m.new_cache(256));
        let prompt = [3u32, 77, 1200, 9];
        let prec = Precision::Uniform(4);
        let mut token = 0;
        for step in 0..40 {
            let tokens: &[u32] = if step == 0 { &prompt } else { &[token] };
            let r = readout(step);
            let Next::Token(t) = m
                .forward_next_with(tokens, &mut by_id, prec, None, r)
                .unwrap()
            else {
                panic!("a token, not logits, for {r:?}");
            };
            let logits = m
                .forward_last_with(tokens, &mut by_logits, prec, None)
                .unwrap();
            check(&logits, r, t).unwrap_or_else(|e| panic!("graphs {graphs}, step {step}: {e}"));
            chosen.push(t);
            token = t;
        }
        assert_eq!(by_id.len(), by_logits.len());
        assert_eq!(by_id.holds_recorded_step(), graphs);
    }
    Some(chosen)
}

/// Greedy decoding picks its token on the GPU (`Readout::Argmax`), replayed
/// or op by op, and that token is the host's argmax of the same step's logits.
#[test]
fn greedy_tokens_picked_on_the_gpu_are_the_argmax_of_the_logits() {
    tokens_chosen_on_the_gpu(
        |_| Readout::Argmax,
        |logits, _, t| match argmax(logits) {
            want if want == t => Ok(()),
            want => Err(format!("picked {t}, the argmax is {want}")),
        },
    );
}

/// Random sampling (temperature, top-k, top-p) draws its token on the GPU
/// (`Readout::Sample`), replayed or op by op: the token whose span of the
/// same step's softmax over the candidates holds the draw's uniform (up to
/// the rounding of the GPU's sums).
#[test]
fn random_draws_on_the_gpu_follow_the_softmax_of_the_logits() {
    use dpllm_engine::backend::conformance::drawn_within_rounding;
    let draw = |step: usize| Draw {
        inv_temperature: 1.0 / (0.5 + 0.05 * step as f32),
        top_k: [0, 40, 0, 3][step % 4],
        top_p: [1.0, 1.0, 0.9, 0.5][step % 4],
        uniform: (step as f32 * 0.618).fract(),
    };
    let Some(chosen) = tokens_chosen_on_the_gpu(
        |step| Readout::Sample(draw(step)),
        |logits, r, t| match r {
            Readout::Sample(d) => drawn_within_rounding(logits, d, t),
            _ => unreachable!(),
        },
    ) else {
        return;
    };
    let seen: std::collections::HashSet<u32> = chosen.into_iter().collect();
    assert!(seen.len() > 1, "the draws must not all pick one token");
}
