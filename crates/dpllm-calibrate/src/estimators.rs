//! Fitting the run-time error estimators of METHOD.md 2c: linear regression on
//! ||x|| when it explains the error well (R² ≥ 0.9), otherwise a k-row random
//! projection G = A(W_h − W_l), A ~ N(0, 1/k), fine-tuned so that ||Gx||
//! matches the true error on calibration inputs. The paper fine-tunes with plain
//! SGD (lr 1e-3); its step size depends on the model's scale, so this uses Adam.

use anyhow::{ensure, Result};
use dpllm_grad::GradBackend;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use dpllm_engine::select::estimator::Estimator;

/// Settings of estimator fitting.
#[derive(Debug, Clone, Serialize)]
pub struct FitOptions {
    /// Use linear regression when its R² reaches this.
    pub r2_min: f64,
    /// Rows of the random projection.
    pub k: usize,
    /// Optimizer steps for the projection.
    pub steps: usize,
    /// Adam step size, relative to the RMS entry of the initial projection.
    pub lr: f64,
    /// Mini-batch size.
    pub batch: usize,
    /// Seed of A and of the mini-batches.
    pub seed: u64,
}

impl Default for FitOptions {
    fn default() -> Self {
        FitOptions {
            r2_min: 0.9,
            k: 64,
            steps: 2000,
            lr: 1e-3,
            batch: 32,
            seed: 0,
        }
    }
}

/// A fitted estimator.
#[derive(Debug, Clone)]
pub enum Fitted {
    /// ê = a·||x|| + c.
    Linear {
        /// Slope.
        a: f32,
        /// Intercept.
        c: f32,
        /// R² on every calibration token.
        r2: f32,
    },
    /// ê = ||G x|| + bias.
    Jl {
        /// G [k × in].
        g: Vec<f32>,
        /// Added to ||G x||.
        bias: f32,
        /// Rows.
        k: usize,
        /// R² on held-out sampled tokens.
        r2: f32,
        /// R² of the linear regression it replaced.
        linear_r2: f32,
    },
}

impl Fitted {
    /// R² of the chosen estimator.
    pub fn r2(&self) -> f32 {
        match self {
            Fitted::Linear { r2, .. } | Fitted::Jl { r2, .. } => *r2,
        }
    }

    /// Estimates for rows of `x` [n × cols] with norms `norms` (the engine's
    /// `row_norms` of the rows), computed as the engine's estimator computes
    /// them at inference, so thresholds are fitted with the numerics that run.
    pub fn estimate(&self, x: &[f32], norms: &[f32], cols: usize) -> Vec<f32> {
        match self {
            Fitted::Linear { a, c, .. } => norms.iter().map(|v| a * v + c).collect(),
            Fitted::Jl { g, k, bias, .. } => projected(g, *k, x, cols, *bias),
        }
    }
}

/// 1 − SS_res/SS_tot of predictions `pred` for `y` (1 when y is constant and matched).
pub fn r_squared(pred: &[f32], y: &[f32]) -> f64 {
    let mean = y.iter().map(|&v| v as f64).sum::<f64>() / y.len().max(1) as f64;
    let ss_tot: f64 = y.iter().map(|&v| (v as f64 - mean).powi(2)).sum();
    let ss_res: f64 = pred
        .iter()
        .zip(y)
        .map(|(&p, &v)| (p as f64 - v as f64).powi(2))
        .sum();
    if ss_tot == 0.0 {
        return if ss_res == 0.0 { 1.0 } else { 0.0 };
    }
    1.0 - ss_res / ss_tot
}

/// Least squares y ≈ a·x + c; returns (a, c, R²).
pub fn fit_linear(x: &[f32], y: &[f32]) -> (f32, f32, f64) {
    let n = x.len().max(1) as f64;
    let (mx, my) = (
        x.iter().map(|&v| v as f64).sum::<f64>() / n,
        y.iter().map(|&v| v as f64).sum::<f64>() / n,
    );
    let sxy: f64 = x
        .iter()
        .zip(y)
        .map(|(&a, &b)| (a as f64 - mx) * (b as f64 - my))
        .sum();
    let sxx: f64 = x.iter().map(|&a| (a as f64 - mx).powi(2)).sum();
    let a = if sxx > 0.0 { sxy / sxx } else { 0.0 };
    let c = my - a * mx;
    let pred: Vec<f32> = x.iter().map(|&v| (a * v as f64 + c) as f32).collect();
    (a as f32, c as f32, r_squared(&pred, y))
}

/// ||G·x|| + bias for rows of `x`, by the engine's estimator code.
fn projected(g: &[f32], k: usize, x: &[f32], cols: usize, bias: f32) -> Vec<f32> {
    Estimator::jl(g.to_vec(), k, bias).estimate(x, x.len() / cols)
}

/// A fitted projection: ê = ||G x|| + bias.
#[derive(Debug, Clone)]
pub struct Projection {
    /// G [k × cols].
    pub g: Vec<f32>,
    /// Added to ||G x||.
    pub bias: f32,
    /// R² on the held-out fifth of the rows (−∞ when the projection does not track the error at all).
    pub r2: f64,
}

/// Fit G = A·delta [k × cols] and fine-tune it on (x, e) rows by mini-batch
/// gradient descent with Adam (step size `opts.lr` relative to G's RMS
/// entry), on `be` (the CPU, or a GPU): ê = s·||Gx|| + b with (s, b) from
/// least squares on the training rows (s folded into G). Returns the iterate with the best R² on the held-out fifth. A
/// and the mini-batches come from `seed` on the host, so every backend sees
/// the same draws.
#[allow(clippy::too_many_arguments)]
pub fn fit_projection_on<G: GradBackend>(
    be: &G,
    delta: &[f32],
    rows: usize,
    cols: usize,
    x: &[f32],
    e: &[f32],
    opts: &FitOptions,
    seed: u64,
) -> Result<Projection> {
    let k = opts.k;
    ensure!(
        k > 0 && !e.is_empty() && x.len() == e.len() * cols && delta.len() == rows * cols,
        "projection fit: k {k}, {} inputs of {cols} for {} errors, delta of {} for {rows} x {cols}",
        x.len(),
        e.len(),
        delta.len()
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // A [k × rows], N(0, 1/k) by Box-Muller.
    let std = (1.0 / k as f64).sqrt();
    let a: Vec<f32> = (0..k * rows)
        .map(|_| {
            let (u1, u2): (f64, f64) = (rng.random::<f64>().max(1e-300), rng.random());
            ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos() * std) as f32
        })
        .collect();
    // G = A · delta [k × cols] on the backend, as the input gradient of a
    // linear with weight delta [rows × cols] for the output gradient A [k × rows].
    let mut gd = be.scratch(k * cols)?;
    be.linear_backward_input(
        &be.upload(&a)?,
        k,
        &be.upload(delta)?,
        rows,
        cols,
        &mut gd,
        false,
    )?;
    let g = be.download(&gd)?;
    let n = e.len();
    let n_train = (n * 4 / 5).max(1).min(n);
    let rms = (g.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / g.len().max(1) as f64).sqrt();
    let b = opts.batch.max(1).min(n_train);
    let mut train = Scorer::new(be, &x[..n_train * cols], &e[..n_train], cols, k)?;
    // The held-out fifth (the training rows again when there are too few).
    let mut held = match n_train < n {
        true => Some(Scorer::new(
            be,
            &x[n_train * cols..],
            &e[n_train..],
            cols,
            k,
        )?),
        false => None,
    };
    let et = be.upload(&e[..n_train])?;
    let (mut m, mut v) = (be.zeros(g.len())?, be.zeros(g.len())?);
    let mut grad = be.scratch(g.len())?;
    let (mut xb, mut eb, mut gx) = (be.scratch(b * cols)?, be.scratch(b)?, be.scratch(b * k)?);
    let mut ids = be.ids(&vec![0; b])?;
    let lr = (opts.lr * rms) as f32;
    // Early stopping: G has k·cols parameters and few rows to fit, so keep the
    // iterate whose calibrated estimate does best on the held-out rows.
    let mut best = (calibrated(be, &gd, &mut train, held.as_mut(), f64::NEG_INFINITY)?).unwrap_or(
        Projection {
            g,
            bias: 0.0,
            r2: f64::NEG_INFINITY,
        },
    );
    for step in 1..=opts.steps as i32 {
        let batch: Vec<u32> = (0..b)
            .map(|_| rng.random_range(0..n_train) as u32)
            .collect();
        be.set_ids(&mut ids, &batch)?;
        be.embed(&train.x, cols, &ids, &mut xb)?;
        be.embed(&et, 1, &ids, &mut eb)?;
        be.linear_forward(&xb, b, &gd, k, cols, None, &mut gx)?;
        // d/dG mean (||Gx|| − e)² = mean 2(||Gx|| − e)/||Gx|| · (Gx) xᵀ.
        be.norm_error_scale(&mut gx, k, &eb)?;
        be.linear_backward_weight(&gx, &xb, b, k, cols, &mut grad)?;
        be.adam_step(&mut gd, &grad, &mut m, &mut v, lr, step)?;
        if step % EVAL_EVERY == 0 || step == opts.steps as i32 {
            if let Some(p) = calibrated(be, &gd, &mut train, held.as_mut(), best.r2)? {
                best = p;
            }
        }
    }
    Ok(best)
}

/// Projection `gd` calibrated: (s, b) of ê = s·||Gx|| + b by least squares
/// on the training rows, s folded into G, with its R² on the held-out rows
/// (the training rows when there are none). None unless that R² beats
/// `beat`, or when s ≤ 0 (G does not track the error at all).
fn calibrated<'a, G: GradBackend>(
    be: &G,
    gd: &G::Buf,
    train: &mut Scorer<'a, G>,
    held: Option<&mut Scorer<'a, G>>,
    beat: f64,
) -> Result<Option<Projection>> {
    let (s, bias, _) = fit_linear(&train.norms(be, gd)?, train.e);
    if s.is_nan() || s <= 0.0 {
        return Ok(None);
    }
    let held = held.unwrap_or(train);
    let pred: Vec<f32> = (held.norms(be, gd)?.iter()).map(|v| s * v + bias).collect();
    let r2 = r_squared(&pred, held.e);
    if r2.is_nan() || r2 <= beat {
        return Ok(None);
    }
    Ok(Some(Projection {
        g: be.download(gd)?.iter().map(|v| v * s).collect(),
        bias,
        r2,
    }))
}

/// Rows of estimator inputs on a backend, and the norms ||Gx|| of a
/// projection G over them (for the least-squares fit and the R²).
struct Scorer<'a, G: GradBackend> {
    x: G::Buf,
    e: &'a [f32],
    cols: usize,
    k: usize,
    gx: G::Buf,
    norms: G::Buf,
}

impl<'a, G: GradBackend> Scorer<'a, G> {
    fn new(be: &G, x: &[f32], e: &'a [f32], cols: usize, k: usize) -> Result<Self> {
        Ok(Scorer {
            x: be.upload(x)?,
            e,
            cols,
            k,
            gx: be.scratch(e.len() * k)?,
            norms: be.scratch(e.len())?,
        })
    }

    /// ||G x|| for every row x.
    fn norms(&mut self, be: &G, g: &G::Buf) -> Result<Vec<f32>> {
        be.linear_forward(
            &self.x,
            self.e.len(),
            g,
            self.k,
            self.cols,
            None,
            &mut self.gx,
        )?;
        be.row_norms(&self.gx, self.k, &mut self.norms)?;
        be.download(&self.norms)
    }
}

/// Validation interval of projection fine-tuning, in steps.
const EVAL_EVERY: i32 = 100;

/// Choose and fit the estimator of one linear and precision pair: regression on
/// `norms`→`e` (all tokens) if R² ≥ r2_min, else a fine-tuned projection on the
/// sampled rows `x` with errors `e_sample`, unless the projection's held-out R²
/// is no better than the regression's. The projection is fine-tuned on `be`.
#[allow(clippy::too_many_arguments)]
pub fn fit<G: GradBackend>(
    be: &G,
    norms: &[f32],
    e: &[f32],
    delta: &[f32],
    rows: usize,
    cols: usize,
    x: &[f32],
    e_sample: &[f32],
    opts: &FitOptions,
    seed: u64,
) -> Result<Fitted> {
    let (a, c, r2) = fit_linear(norms, e);
    let linear = Fitted::Linear {
        a,
        c,
        r2: r2 as f32,
    };
    if r2 >= opts.r2_min || e_sample.is_empty() {
        return Ok(linear);
    }
    let p = fit_projection_on(be, delta, rows, cols, x, e_sample, opts, seed)?;
    // A projection that predicts worse than the norm regression (as happens when
    // the asynchronous input is far from the true one) is not worth its cost.
    if p.r2 <= r2 {
        return Ok(linear);
    }
    Ok(Fitted::Jl {
        g: p.g,
        bias: p.bias,
        k: opts.k,
        r2: p.r2 as f32,
        linear_r2: r2 as f32,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use dpllm_engine::select::estimator::row_norms;
    use dpllm_grad::ops::linear_forward;
    use dpllm_grad::CpuGrad;

    #[test]
    fn regression_recovers_a_line() {
        let x: Vec<f32> = (0..100).map(|i| i as f32 / 10.0).collect();
        let y: Vec<f32> = x.iter().map(|v| 3.0 * v - 2.0).collect();
        let (a, c, r2) = fit_linear(&x, &y);
        assert!(
            (a - 3.0).abs() < 1e-4 && (c + 2.0).abs() < 1e-3 && r2 > 0.9999,
            "{a} {c} {r2}"
        );
        let noise: Vec<f32> = (0..100).map(|i| ((i * 7919) % 13) as f32).collect();
        assert!(fit_linear(&x, &noise).2 < 0.5);
    }

    /// Rows of x with varying direction, so ||x|| alone predicts ||Δx|| badly.
    fn problem(rows: usize, cols: usize, n: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let delta: Vec<f32> = (0..rows * cols)
            .map(|i| {
                if i % cols < 4 {
                    rng.random_range(-1.0..1.0)
                } else {
                    rng.random_range(-0.01..0.01)
                }
            })
            .collect();
        let x: Vec<f32> = (0..n * cols).map(|_| rng.random_range(-1.0..1.0)).collect();
        let mut y = vec![0f32; n * rows];
        linear_forward(&x, n, &delta, rows, cols, None, &mut y);
        let e: Vec<f32> = row_norms(&y, rows).collect();
        let norms: Vec<f32> = row_norms(&x, cols).collect();
        (delta, x, e, norms)
    }

    #[test]
    fn projection_tracks_the_true_error_where_norms_cannot() {
        let (rows, cols, n) = (48, 32, 1500);
        let (delta, x, e, norms) = problem(rows, cols, n);
        let opts = FitOptions {
            k: 16,
            steps: 500,
            ..Default::default()
        };
        match fit(&CpuGrad, &norms, &e, &delta, rows, cols, &x, &e, &opts, 1).unwrap() {
            Fitted::Jl {
                r2, linear_r2, g, ..
            } => {
                assert!(
                    linear_r2 < 0.5,
                    "norm regression should fail here: {linear_r2}"
                );
                assert!(r2 > 0.6, "projection R² {r2}");
                assert_eq!(g.len(), 16 * cols);
            }
            f => panic!("expected a projection, got {f:?}"),
        }
    }

    #[test]
    fn fine_tuning_lowers_the_error_of_a_noisy_projection() {
        let (rows, cols, n) = (48, 32, 1500);
        let (delta, x, e, _) = problem(rows, cols, n);
        let base = FitOptions {
            k: 4,
            steps: 0,
            ..Default::default()
        };
        let p0 = fit_projection_on(&CpuGrad, &delta, rows, cols, &x, &e, &base, 3).unwrap();
        let p1 = fit_projection_on(
            &CpuGrad,
            &delta,
            rows,
            cols,
            &x,
            &e,
            &FitOptions {
                steps: 1000,
                ..base
            },
            3,
        )
        .unwrap();
        assert!(
            p1.r2 > p0.r2 + 0.02,
            "fine-tuning did not help: {} -> {}",
            p0.r2,
            p1.r2
        );
        assert_ne!(p0.g, p1.g);
    }
}
