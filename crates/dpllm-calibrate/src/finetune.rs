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
    /// On a GPU, targets fine-tuned at once, each on a lane with a stream
    /// and a copy of the model of its own; 0: as many as fit (at most 8).
    pub lanes: usize,
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
            lanes: 0,
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
    let mut lanes = [Lane {
        gm,
        step: &mut step,
    }];
    let mut r = finetune_lanes(&mut lanes, w, levels, &[(target, init)], seqs, opts)?;
    Ok(r.pop().expect("one result a target"))
}

/// Where fine-tuning steps of one target run: a gradient model (on a GPU,
/// with a stream of its own) and its step's buffers.
pub struct Lane<'a, G: GradBackend> {
    /// The model whose linears hold this target's mixed weights.
    pub gm: &'a mut GradModel<G>,
    /// The step's buffers and recording.
    pub step: &'a mut Step<G>,
}

/// Fine-tune several targets at once, target i on lane i: each sequence's
/// step is queued on every lane, then their results are read, so on a GPU
/// with a stream a lane the small kernels of several targets overlap.
/// `targets`: each target and its start (as [`finetune`]'s `init`). Every
/// result's `seconds` is the wall time of the whole run.
pub fn finetune_lanes<G: GradBackend>(
    lanes: &mut [Lane<'_, G>],
    w: &[LinearWeights],
    levels: &(impl WeightLevels<G> + ?Sized),
    targets: &[(f64, Option<&[f64]>)],
    seqs: &[Vec<u32>],
    opts: &FinetuneOptions,
) -> Result<Vec<FinetuneResult>> {
    ensure!(!seqs.is_empty(), "fine-tuning needs calibration sequences");
    ensure!(
        !targets.is_empty() && targets.len() <= lanes.len(),
        "{} targets on {} lanes",
        targets.len(),
        lanes.len()
    );
    let t0 = std::time::Instant::now();
    let mut runs = (targets.iter())
        .map(|&(t, init)| Run::new(w, t, init, opts))
        .collect::<Result<Vec<_>>>()?;
    let bar = if opts.progress {
        ProgressBar::new((opts.epochs * seqs.len()) as u64)
    } else {
        ProgressBar::hidden()
    };
    if let Ok(style) = ProgressStyle::with_template(
        "fine-tune T={prefix} [{bar:30}] {pos}/{len} steps {msg} ({eta} left)",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    let names: Vec<String> = runs.iter().map(|r| format!("{:.2}", r.target)).collect();
    bar.set_prefix(names.join(","));
    let index = linear_index(w);
    for _epoch in 0..opts.epochs {
        for seq in seqs {
            let ps: Vec<Vec<f64>> = runs.iter().map(|r| precisions(&r.z, w)).collect();
            for (lane, p) in lanes.iter_mut().zip(&ps) {
                lane.step.queue(lane.gm, w, levels, &index, p, seq)?;
            }
            for ((lane, run), p) in lanes.iter_mut().zip(&mut runs).zip(&ps) {
                let (ce, dce_dp) = lane.step.results(lane.gm)?;
                run.update(w, p, ce, &dce_dp, opts)?;
            }
            bar.inc(1);
            let first = &runs[0];
            bar.set_message(format!("ce {:.4} P {:.3}", first.ce, first.mean_bits));
        }
        runs.iter_mut().for_each(|r| r.end_epoch(seqs.len()));
    }
    bar.finish_and_clear();
    let seconds = t0.elapsed().as_secs_f64();
    Ok(runs
        .into_iter()
        .map(|r| r.finish(w, opts, seconds))
        .collect())
}

/// One target's fine-tuning state: z, AdamW's moments, the loss so far.
struct Run {
    target: f64,
    alpha: f64,
    /// Parameters of all linears.
    total: f64,
    z: Vec<f64>,
    m1: Vec<f64>,
    m2: Vec<f64>,
    steps: usize,
    /// The last step's CE and P.
    ce: f64,
    mean_bits: f64,
    ce_sum: f64,
    last_epoch_ce: f64,
}

impl Run {
    /// z at `init` (per-linear precisions) or, when None, at p = `target` everywhere.
    fn new(
        w: &[LinearWeights],
        target: f64,
        init: Option<&[f64]>,
        opts: &FinetuneOptions,
    ) -> Result<Run> {
        let min_bits = w.iter().map(|l| l.min_bits).min().unwrap_or(0) as f64;
        let max_mem = mean_bits(&w.iter().map(|l| l.max_bits as f64).collect::<Vec<_>>(), w);
        ensure!(target >= min_bits && target <= max_mem + 1e-9, "target {target} bits is outside {min_bits}..={max_mem:.3} (the lowest precision and the budget's memory)");
        if let Some(i) = init {
            ensure!(
                i.len() == w.len(),
                "{} initial precisions for {} linears",
                i.len(),
                w.len()
            );
        }
        // z starts at p0 (the target, or the given start): sigmoid(z) = (p0 − b_min)/(m − b_min), inside (0.01, 0.99).
        let z: Vec<f64> = (w.iter().enumerate())
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
        Ok(Run {
            target,
            alpha: (opts.alpha).unwrap_or(if target <= 3.25 { 10.0 } else { 1.0 }),
            total: w.iter().map(|l| l.size() as f64).sum(),
            m1: vec![0f64; z.len()],
            m2: vec![0f64; z.len()],
            z,
            steps: 0,
            ce: 0.0,
            mean_bits: target,
            ce_sum: 0.0,
            last_epoch_ce: 0.0,
        })
    }

    /// One AdamW step on z from the CE and ∂CE/∂p at precisions `p`, with
    /// the penalty α·(P − T)².
    fn update(
        &mut self,
        w: &[LinearWeights],
        p: &[f64],
        ce: f64,
        dce_dp: &[f64],
        opts: &FinetuneOptions,
    ) -> Result<()> {
        ensure!(
            ce.is_finite(),
            "the loss diverged ({ce}) at step {} of target {}",
            self.steps,
            self.target
        );
        let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8);
        self.ce = ce;
        self.ce_sum += ce;
        let pm = mean_bits(p, w);
        self.mean_bits = pm;
        self.steps += 1;
        let step = self.steps as i32;
        let (c1, c2) = (1.0 - b1.powi(step), 1.0 - b2.powi(step));
        for (g, l) in w.iter().enumerate() {
            let span = (l.max_bits - l.min_bits) as f64;
            if span == 0.0 {
                continue;
            }
            let s = sigmoid(self.z[g]);
            let dp_dz = s * (1.0 - s) * span;
            let penalty = 2.0 * self.alpha * (pm - self.target) * l.size() as f64 / self.total;
            let grad = (dce_dp[g] + penalty) * dp_dz;
            self.m1[g] = b1 * self.m1[g] + (1.0 - b1) * grad;
            self.m2[g] = b2 * self.m2[g] + (1.0 - b2) * grad * grad;
            self.z[g] -= opts.lr * opts.weight_decay * self.z[g];
            self.z[g] -= opts.lr * (self.m1[g] / c1) / ((self.m2[g] / c2).sqrt() + eps);
        }
        Ok(())
    }

    /// An epoch of `len` steps ended.
    fn end_epoch(&mut self, len: usize) {
        self.last_epoch_ce = self.ce_sum / len as f64;
        self.ce_sum = 0.0;
    }

    /// The learned precisions (shifted to the target when the options say).
    fn finish(self, w: &[LinearWeights], opts: &FinetuneOptions, seconds: f64) -> FinetuneResult {
        let trained_mean_bits = mean_bits(&precisions(&self.z, w), w);
        let z = match opts.exact_target {
            true => shift_to_target(&self.z, w, self.target),
            false => self.z,
        };
        let p = precisions(&z, w);
        FinetuneResult {
            mean_bits: mean_bits(&p, w),
            p,
            trained_mean_bits,
            last_epoch_ce: self.last_epoch_ce,
            steps: self.steps,
            seconds,
        }
    }
}
