//! Calibration inputs of every linear (METHOD.md 2c, 2d): the true relative error
//! e_b(x) = ||(W_{b+1} − W_b)x|| of each precision pair on every calibration
//! token, the norm of the estimator's input, and a sample of estimator inputs
//! for fitting random projections. The model runs at each linear's m_l.

use anyhow::Result;
use dpllm_engine::select::estimator::row_norms;
use dpllm_format::LinearKind;
use dpllm_grad::ops::{linear_forward, rms_norm_forward};
use dpllm_grad::BlockActs;
use dpllm_grad::GradModel;
use indicatif::{ProgressBar, ProgressStyle};

use crate::weights::LinearWeights;

/// What estimator calibration knows about one linear.
pub struct LinearCalib {
    /// Input features.
    pub cols: usize,
    /// `e[b - min_bits]`: true error of pair (b, b+1) per calibration token, b in min..m.
    pub e: Vec<Vec<f32>>,
    /// ||x_est|| per calibration token.
    pub est_norm: Vec<f32>,
    /// Sampled estimator inputs [samples × cols].
    pub sample: Vec<f32>,
    /// Token index (into `e`) of each sampled row.
    pub sample_idx: Vec<usize>,
}

impl LinearCalib {
    /// Sampled rows.
    pub fn samples(&self) -> usize {
        self.sample_idx.len()
    }
}

/// Which input a linear reads: q/k/v read the attention-normed residual, o the
/// attention output, gate/up the MLP-normed residual, down the SwiGLU product.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Input {
    Attn,
    AttnOut,
    Mlp,
    Act,
}

fn input_of(kind: LinearKind) -> Input {
    match kind {
        LinearKind::Q | LinearKind::K | LinearKind::V | LinearKind::Qkv => Input::Attn,
        LinearKind::O => Input::AttnOut,
        LinearKind::Gate | LinearKind::Up | LinearKind::GateUp => Input::Mlp,
        LinearKind::Down => Input::Act,
    }
}

/// Estimator input of a linear: the exact input, or (async) the residual stream
/// before the previous sub-block's output, normed with this sub-block's norm.
fn estimator_input(
    gm: &GradModel,
    acts: &[BlockActs],
    layer: usize,
    input: Input,
    async_est: bool,
) -> Option<Vec<f32>> {
    if !async_est {
        return None;
    }
    let eps = gm.config.rms_norm_eps;
    let (resid, norm) = match input {
        Input::Attn if layer > 0 => (&acts[layer - 1].h_mid, &gm.blocks[layer].attn_norm),
        Input::Mlp => (&acts[layer].h_in, &gm.blocks[layer].mlp_norm),
        _ => return None,
    };
    let mut out = vec![0f32; resid.len()];
    rms_norm_forward(resid, norm, eps, &mut out);
    Some(out)
}

/// Run `seqs` through `gm` (weights already at each linear's m_l) and gather the
/// calibration data of every linear; at most `max_samples` sampled rows per linear.
pub fn collect(
    gm: &GradModel,
    w: &[LinearWeights],
    seqs: &[Vec<u32>],
    async_est: bool,
    max_samples: usize,
    progress: bool,
) -> Result<Vec<LinearCalib>> {
    let total: usize = seqs.iter().map(Vec::len).sum();
    let stride = total.div_ceil(max_samples.max(1)).max(1);
    let deltas: Vec<Vec<Vec<f32>>> = w
        .iter()
        .map(|l| (l.min_bits..l.max_bits).map(|b| l.delta(b)).collect())
        .collect();
    let mut out: Vec<LinearCalib> = w
        .iter()
        .map(|l| LinearCalib {
            cols: l.cols,
            e: vec![Vec::with_capacity(total); (l.max_bits - l.min_bits) as usize],
            est_norm: Vec::with_capacity(total),
            sample: Vec::new(),
            sample_idx: Vec::new(),
        })
        .collect();
    let bar = if progress {
        ProgressBar::new(seqs.len() as u64)
    } else {
        ProgressBar::hidden()
    };
    if let Ok(style) =
        ProgressStyle::with_template("estimator inputs [{bar:30}] {pos}/{len} seq ({eta} left)")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    let mut seen = 0usize;
    for seq in seqs {
        let acts = gm.activations(seq)?;
        let n = seq.len();
        for (g, l) in w.iter().enumerate() {
            let a = &acts[l.layer];
            let input = input_of(l.kind);
            let x: &[f32] = match input {
                Input::Attn => &a.xn1,
                Input::AttnOut => &a.att,
                Input::Mlp => &a.xn2,
                Input::Act => &a.act,
            };
            let est = estimator_input(gm, &acts, l.layer, input, async_est);
            let xe: &[f32] = est.as_deref().unwrap_or(x);
            let c = &mut out[g];
            let mut y = vec![0f32; n * l.rows];
            for (k, d) in deltas[g].iter().enumerate() {
                linear_forward(x, n, d, l.rows, l.cols, None, &mut y);
                c.e[k].extend(row_norms(&y, l.rows));
            }
            c.est_norm.extend(row_norms(xe, l.cols));
            for t in 0..n {
                if (seen + t).is_multiple_of(stride) {
                    c.sample
                        .extend_from_slice(&xe[t * l.cols..(t + 1) * l.cols]);
                    c.sample_idx.push(seen + t);
                }
            }
        }
        seen += n;
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(out)
}
