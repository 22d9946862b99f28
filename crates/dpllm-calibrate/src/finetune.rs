//! Precision fine-tuning (METHOD.md 2b): one scalar z per linear,
//! p = b_min + sigmoid(z)·(m − b_min), trained through the interpolated forward
//! pass y = r·y(⌊p⌋) + (1 − r)·y(⌈p⌉) with loss CE + α·(P − T)².
//!
//! Because y is linear in W, the interpolated output is the output of the mixed
//! weight r·W_lo + (1 − r)·W_hi, so the full-precision backward pass of
//! [`GradModel`] serves unchanged, and ∂CE/∂r = ⟨∂CE/∂W, W_lo − W_hi⟩.

use anyhow::{ensure, Result};
use dpllm_grad::{GradBackend, GradModel};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::step::Step;
use crate::weights::{LinearWeights, WeightLevels};

/// Settings of precision fine-tuning.
#[derive(Debug, Clone, Serialize)]
pub struct FinetuneOptions {
    /// AdamW learning rate (paper: 0.01).
    pub lr: f64,
    /// AdamW weight decay (PyTorch default 0.01).
    pub weight_decay: f64,
    /// Passes over the calibration sequences.
    pub epochs: usize,
    /// Penalty weight α; None = the paper's default (1, or 10 when T ≤ 3.25).
    pub alpha: Option<f64>,
    /// After training, shift every z by one common offset so that P = T exactly.
    pub exact_target: bool,
    /// Show a progress bar.
    pub progress: bool,
    /// Record the step once and replay it where the backend can (a CUDA
    /// graph; checked against the step run op by op).
    pub record: bool,
}

impl Default for FinetuneOptions {
    fn default() -> Self {
        FinetuneOptions {
            lr: 0.01,
            weight_decay: 0.01,
            epochs: 5,
            alpha: None,
            exact_target: true,
            progress: false,
            record: true,
        }
    }
}

/// Result of fine-tuning for one target.
#[derive(Debug, Clone, Serialize)]
pub struct FinetuneResult {
    /// Learned average precision per linear (model order).
    pub p: Vec<f64>,
    /// P = Σ size·p / Σ size after training, before the exact-target shift.
    pub trained_mean_bits: f64,
    /// P of the returned `p`.
    pub mean_bits: f64,
    /// Mean CE over the last epoch.
    pub last_epoch_ce: f64,
    /// Optimizer steps taken.
    pub steps: usize,
    /// Wall time of the training loop.
    pub seconds: f64,
}

fn sigmoid(z: f64) -> f64 {
    1.0 / (1.0 + (-z).exp())
}

fn logit(s: f64) -> f64 {
    (s / (1.0 - s)).ln()
}

fn precisions(z: &[f64], w: &[LinearWeights]) -> Vec<f64> {
    z.iter()
        .zip(w)
        .map(|(&z, l)| l.min_bits as f64 + sigmoid(z) * (l.max_bits - l.min_bits) as f64)
        .collect()
}

fn mean_bits(p: &[f64], w: &[LinearWeights]) -> f64 {
    let total: f64 = w.iter().map(|l| l.size() as f64).sum();
    p.iter()
        .zip(w)
        .map(|(p, l)| p * l.size() as f64)
        .sum::<f64>()
        / total
}

/// Map (block, index in `Block::linears()`) → position in `w`.
pub type LinearIndex = std::collections::HashMap<(usize, usize), usize>;

/// The index of `w`.
pub fn linear_index(w: &[LinearWeights]) -> LinearIndex {
    w.iter()
        .enumerate()
        .map(|(g, l)| ((l.layer, l.index), g))
        .collect()
}

/// CE of `seq` through the model interpolated at precisions `p`, and ∂CE/∂p per
/// linear: ⟨∂CE/∂W, W_hi − W_lo⟩ (r falls as p rises; 0 for single-precision linears).
pub fn ce_and_gradient(
    gm: &mut GradModel,
    w: &[LinearWeights],
    index: &LinearIndex,
    p: &[f64],
    seq: &[u32],
) -> Result<(f64, Vec<f64>)> {
    ce_and_gradient_on(gm, w, w, index, p, seq)
}

/// [`ce_and_gradient`] on any gradient backend, the weights at each precision
/// in `levels` (one step, op by op: [`Step`] keeps its buffers for many).
pub fn ce_and_gradient_on<G: GradBackend>(
    gm: &mut GradModel<G>,
    w: &[LinearWeights],
    levels: &(impl WeightLevels<G> + ?Sized),
    index: &LinearIndex,
    p: &[f64],
    seq: &[u32],
) -> Result<(f64, Vec<f64>)> {
    Step::new(gm.backend(), w, false)?.run(gm, w, levels, index, p, seq)
}

/// The common shift δ of every trainable z that makes P(z + δ) = target (bisection).
fn shift_to_target(z: &[f64], w: &[LinearWeights], target: f64) -> Vec<f64> {
    let at = |d: f64| -> Vec<f64> {
        z.iter()
            .zip(w)
            .map(|(&z, l)| if l.max_bits > l.min_bits { z + d } else { z })
            .collect()
    };
    let (mut lo, mut hi) = (-40.0, 40.0);
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if mean_bits(&precisions(&at(mid), w), w) < target {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    at(0.5 * (lo + hi))
}

/// Learn per-linear average precisions for `target` on `seqs`, starting from
/// `init` (per-linear precisions, e.g. the static assignment) or, when None, from
/// p = T everywhere.
pub fn finetune(
    gm: &mut GradModel,
    w: &[LinearWeights],
    target: f64,
    init: Option<&[f64]>,
    seqs: &[Vec<u32>],
    opts: &FinetuneOptions,
) -> Result<FinetuneResult> {
    finetune_on(gm, w, w, target, init, seqs, opts)
}

/// [`finetune`] on any gradient backend, the weights at each precision in `levels`.
pub fn finetune_on<G: GradBackend>(
    gm: &mut GradModel<G>,
    w: &[LinearWeights],
    levels: &(impl WeightLevels<G> + ?Sized),
    target: f64,
    init: Option<&[f64]>,
    seqs: &[Vec<u32>],
    opts: &FinetuneOptions,
) -> Result<FinetuneResult> {
    let mut step = Step::new(gm.backend(), w, opts.record)?;
    finetune_with(&mut step, gm, w, levels, target, init, seqs, opts)
}

/// [`finetune_on`] with the step's buffers (and recording) of `step`, kept
/// from target to target.
#[allow(clippy::too_many_arguments)]
pub fn finetune_with<G: GradBackend>(
    buffers: &mut Step<G>,
    gm: &mut GradModel<G>,
    w: &[LinearWeights],
    levels: &(impl WeightLevels<G> + ?Sized),
    target: f64,
    init: Option<&[f64]>,
    seqs: &[Vec<u32>],
    opts: &FinetuneOptions,
) -> Result<FinetuneResult> {
    ensure!(!seqs.is_empty(), "fine-tuning needs calibration sequences");
    let t0 = std::time::Instant::now();
    let min_bits = w.iter().map(|l| l.min_bits).min().unwrap_or(0) as f64;
    let max_mem = mean_bits(&w.iter().map(|l| l.max_bits as f64).collect::<Vec<_>>(), w);
    ensure!(target >= min_bits && target <= max_mem + 1e-9, "target {target} bits is outside {min_bits}..={max_mem:.3} (the lowest precision and the budget's memory)");
    let alpha = opts
        .alpha
        .unwrap_or(if target <= 3.25 { 10.0 } else { 1.0 });
    let total: f64 = w.iter().map(|l| l.size() as f64).sum();
    if let Some(i) = init {
        ensure!(
            i.len() == w.len(),
            "{} initial precisions for {} linears",
            i.len(),
            w.len()
        );
    }
    // z starts at p0 (the target, or the given start): sigmoid(z) = (p0 − b_min)/(m − b_min), inside (0.01, 0.99).
    let mut z: Vec<f64> = w
        .iter()
        .enumerate()
        .map(|(g, l)| {
            let span = (l.max_bits - l.min_bits) as f64;
            let p0 = init.map_or(target, |i| i[g]);
            if span == 0.0 {
                0.0
            } else {
                logit(((p0 - l.min_bits as f64) / span).clamp(0.01, 0.99))
            }
        })
        .collect();
    let (mut m1, mut m2) = (vec![0f64; z.len()], vec![0f64; z.len()]);
    let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8);
    let steps_total = opts.epochs * seqs.len();
    let bar = if opts.progress {
        ProgressBar::new(steps_total as u64)
    } else {
        ProgressBar::hidden()
    };
    if let Ok(style) = ProgressStyle::with_template(
        "fine-tune T={prefix} [{bar:30}] {pos}/{len} steps {msg} ({eta} left)",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(format!("{target:.2}"));
    let index = linear_index(w);
    let mut step = 0usize;
    let mut last_epoch_ce = 0.0;
    for _epoch in 0..opts.epochs {
        let mut ce_sum = 0.0;
        for seq in seqs {
            let p = precisions(&z, w);
            let (ce, dce_dp) = buffers.run(gm, w, levels, &index, &p, seq)?;
            ensure!(ce.is_finite(), "the loss diverged ({ce}) at step {step}");
            ce_sum += ce;
            let pm = mean_bits(&p, w);
            step += 1;
            let (c1, c2) = (1.0 - b1.powi(step as i32), 1.0 - b2.powi(step as i32));
            for (g, l) in w.iter().enumerate() {
                let span = (l.max_bits - l.min_bits) as f64;
                if span == 0.0 {
                    continue;
                }
                let s = sigmoid(z[g]);
                let dp_dz = s * (1.0 - s) * span;
                let grad =
                    (dce_dp[g] + 2.0 * alpha * (pm - target) * l.size() as f64 / total) * dp_dz;
                m1[g] = b1 * m1[g] + (1.0 - b1) * grad;
                m2[g] = b2 * m2[g] + (1.0 - b2) * grad * grad;
                z[g] -= opts.lr * opts.weight_decay * z[g];
                z[g] -= opts.lr * (m1[g] / c1) / ((m2[g] / c2).sqrt() + eps);
            }
            bar.inc(1);
            bar.set_message(format!("ce {ce:.4} P {pm:.3}"));
        }
        last_epoch_ce = ce_sum / seqs.len() as f64;
    }
    bar.finish_and_clear();
    let trained_mean_bits = mean_bits(&precisions(&z, w), w);
    if opts.exact_target {
        z = shift_to_target(&z, w, target);
    }
    let p = precisions(&z, w);
    Ok(FinetuneResult {
        mean_bits: mean_bits(&p, w),
        p,
        trained_mean_bits,
        last_epoch_ce,
        steps: step,
        seconds: t0.elapsed().as_secs_f64(),
    })
}
