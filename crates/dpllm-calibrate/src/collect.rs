//! Calibration inputs of every linear (METHOD.md 2c, 2d): the true relative error
//! e_b(x) = ||(W_{b+1} − W_b)x|| of each precision pair on every calibration
//! token, the norm of the estimator's input, and a sample of estimator inputs
//! for fitting random projections. The model runs at each linear's m_l, on
//! the gradient model's backend (the products and norms stay on a GPU; only
//! the norms and the sampled rows come back).

use std::collections::hash_map::Entry;
use std::collections::HashMap;

use anyhow::Result;
use dpllm_format::LinearKind;
use dpllm_grad::{BlockActs, GradBackend, GradModel, Pair};
use indicatif::{ProgressBar, ProgressStyle};

use crate::weights::{LinearWeights, WeightLevels};

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
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
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
fn estimator_input<G: GradBackend>(
    gm: &GradModel<G>,
    acts: &[BlockActs<G::Buf>],
    layer: usize,
    input: Input,
    async_est: bool,
) -> Result<Option<G::Buf>> {
    if !async_est {
        return Ok(None);
    }
    let eps = gm.config.rms_norm_eps;
    let (resid, norm) = match input {
        Input::Attn if layer > 0 => (&acts[layer - 1].h_mid, &gm.blocks[layer].attn_norm),
        Input::Mlp => (&acts[layer].h_in, &gm.blocks[layer].mlp_norm),
        _ => return Ok(None),
    };
    let be = gm.backend();
    let mut out = be.zeros(be.len(resid))?;
    be.rms_norm_forward(resid, norm, eps, &mut out)?;
    Ok(Some(out))
}

/// A buffer of `len` values from `pool`, made on first use (contents undefined).
fn scratch<'p, G: GradBackend>(
    be: &G,
    pool: &'p mut HashMap<usize, G::Buf>,
    len: usize,
) -> Result<&'p mut G::Buf> {
    Ok(match pool.entry(len) {
        Entry::Occupied(e) => e.into_mut(),
        Entry::Vacant(e) => e.insert(be.zeros(len)?),
    })
}

/// What a row of norms measured: error pair k of linear g, or its estimator input.
enum Norms {
    Error(usize, usize),
    Input(usize),
}

/// Run `seqs` through `gm` (weights already at each linear's m_l; `levels`
/// holds every linear's weights at its precisions on the same backend) and
/// gather the calibration data of every linear; at most `max_samples`
/// sampled rows per linear.
pub fn collect<G: GradBackend>(
    gm: &GradModel<G>,
    w: &[LinearWeights],
    levels: &(impl WeightLevels<G> + ?Sized),
    seqs: &[Vec<u32>],
    async_est: bool,
    max_samples: usize,
    progress: bool,
) -> Result<Vec<LinearCalib>> {
    let be = gm.backend();
    let total: usize = seqs.iter().map(Vec::len).sum();
    let stride = total.div_ceil(max_samples.max(1)).max(1);
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
    // W_{b+1} − W_b and its product with the inputs, by size; the pairs
    // (b, b + 1) of every linear, a linear's from `first[g]` on.
    let (mut deltas, mut products) = (HashMap::new(), HashMap::new());
    let (mut delta_pairs, mut first) = (Vec::new(), Vec::with_capacity(w.len()));
    for l in w {
        first.push(delta_pairs.len());
        delta_pairs.extend((l.min_bits..l.max_bits).map(|b| Pair {
            lo: b,
            hi: b + 1,
            a: -1.0,
            b: 1.0,
        }));
    }
    let delta_pairs = be.pairs(&delta_pairs)?;
    let mut seen = 0usize;
    for seq in seqs {
        let acts = gm.activations(seq)?;
        let n = seq.len();
        let sampled: Vec<usize> = (0..n)
            .filter(|t| (seen + t).is_multiple_of(stride))
            .collect();
        // Per (layer, input): the estimator input when it is not the linear's
        // input, and its sampled rows on the host.
        let mut est_inputs: HashMap<(usize, Input), Option<G::Buf>> = HashMap::new();
        let mut host_rows: HashMap<(usize, Input), Vec<f32>> = HashMap::new();
        let mut norms: Vec<(Norms, G::Buf)> = Vec::new();
        for (g, l) in w.iter().enumerate() {
            let a = &acts[l.layer];
            let input = input_of(l.kind);
            let x = match input {
                Input::Attn => &a.xn1,
                Input::AttnOut => &a.att,
                Input::Mlp => &a.xn2,
                Input::Act => &a.act,
            };
            let key = (l.layer, input);
            if let Entry::Vacant(v) = est_inputs.entry(key) {
                v.insert(estimator_input(gm, &acts, l.layer, input, async_est)?);
            }
            let xe = est_inputs[&key].as_ref().unwrap_or(x);
            for k in 0..(l.max_bits - l.min_bits) as usize {
                let d = scratch(be, &mut deltas, l.size())?;
                levels.mix(be, g, d, &delta_pairs, first[g] + k)?;
                let y = scratch(be, &mut products, n * l.rows)?;
                be.linear_forward(x, n, d, l.rows, l.cols, None, y)?;
                let mut e = be.zeros(n)?;
                be.row_norms(y, l.rows, &mut e)?;
                norms.push((Norms::Error(g, k), e));
            }
            let mut en = be.zeros(n)?;
            be.row_norms(xe, l.cols, &mut en)?;
            norms.push((Norms::Input(g), en));
            if !sampled.is_empty() {
                if let Entry::Vacant(v) = host_rows.entry(key) {
                    v.insert(be.download(xe)?);
                }
                let rows = &host_rows[&key];
                let c = &mut out[g];
                for &t in &sampled {
                    c.sample
                        .extend_from_slice(&rows[t * l.cols..(t + 1) * l.cols]);
                    c.sample_idx.push(seen + t);
                }
            }
        }
        for (what, buf) in norms {
            let v = be.download(&buf)?;
            match what {
                Norms::Error(g, k) => out[g].e[k].extend(v),
                Norms::Input(g) => out[g].est_norm.extend(v),
            }
        }
        seen += n;
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(out)
}
