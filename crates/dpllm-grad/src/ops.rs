//! Forward and backward of every op of the decoder, on plain f32 slices.
//!
//! This is the whole op set the gradient pass needs; a GPU backend would supply
//! the same functions. Conventions: activations are row-major `[n × width]`
//! (one row per token), weights are row-major `[out × in]` as in Hugging Face,
//! and the sequence starts at position 0 (no KV cache). Forward kernels that the
//! engine already has are reused so the forward pass matches it bit for bit.

use dpllm_engine::backend::cpu::activation::{silu, swiglu_inplace};
use dpllm_engine::backend::cpu::attention::{attention, attention_probs, AttnShape};
use dpllm_engine::backend::cpu::dot::dot_f32;
use dpllm_engine::backend::cpu::norm::{rms_norm, rms_norm_inplace};
use dpllm_engine::model::rope::Rope;
use rayon::prelude::*;

/// `dst [m × n] = (accumulate ? dst : 0) + lhs · rhs`, all through explicit strides
/// (`*_cs` column stride, `*_rs` row stride), multi-threaded with rayon.
#[allow(clippy::too_many_arguments)]
fn gemm_f32(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_cs: isize,
    dst_rs: isize,
    accumulate: bool,
    lhs: &[f32],
    lhs_cs: isize,
    lhs_rs: isize,
    rhs: &[f32],
    rhs_cs: isize,
    rhs_rs: isize,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst.fill(0.0);
        }
        return;
    }
    let par = if m * n * k >= 1 << 16 {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: callers pass buffers whose sizes match the shapes and strides (asserted by the callers).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dst_cs,
            dst_rs,
            accumulate,
            lhs.as_ptr(),
            lhs_cs,
            lhs_rs,
            rhs.as_ptr(),
            rhs_cs,
            rhs_rs,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            par,
        );
    }
}

/// `y [n × out] = x [n × in] · Wᵀ (+ b)` with W [out × in].
pub fn linear_forward(
    x: &[f32],
    n: usize,
    w: &[f32],
    out_f: usize,
    in_f: usize,
    bias: Option<&[f32]>,
    y: &mut [f32],
) {
    assert_eq!(x.len(), n * in_f);
    assert_eq!(w.len(), out_f * in_f);
    assert_eq!(y.len(), n * out_f);
    gemm_f32(
        n,
        out_f,
        in_f,
        y,
        1,
        out_f as isize,
        false,
        x,
        1,
        in_f as isize,
        w,
        in_f as isize,
        1,
    );
    if let Some(b) = bias {
        assert_eq!(b.len(), out_f);
        y.par_chunks_mut(out_f)
            .for_each(|row| row.iter_mut().zip(b).for_each(|(a, c)| *a += c));
    }
}

/// Input gradient of a linear: `dx [n × in] (+)= dy [n × out] · W`.
pub fn linear_backward_input(
    dy: &[f32],
    n: usize,
    w: &[f32],
    out_f: usize,
    in_f: usize,
    dx: &mut [f32],
    accumulate: bool,
) {
    assert_eq!(dy.len(), n * out_f);
    assert_eq!(w.len(), out_f * in_f);
    assert_eq!(dx.len(), n * in_f);
    gemm_f32(
        n,
        in_f,
        out_f,
        dx,
        1,
        in_f as isize,
        accumulate,
        dy,
        1,
        out_f as isize,
        w,
        1,
        in_f as isize,
    );
}

/// Weight gradient of a linear: `dw [out × in] = dyᵀ · x` (summed over the n tokens).
pub fn linear_backward_weight(
    dy: &[f32],
    x: &[f32],
    n: usize,
    out_f: usize,
    in_f: usize,
    dw: &mut [f32],
) {
    assert_eq!(dy.len(), n * out_f);
    assert_eq!(x.len(), n * in_f);
    assert_eq!(dw.len(), out_f * in_f);
    gemm_f32(
        out_f,
        in_f,
        n,
        dw,
        1,
        in_f as isize,
        false,
        dy,
        out_f as isize,
        1,
        x,
        1,
        in_f as isize,
    );
}

/// RMSNorm of every `w.len()`-sized row of `x` (the engine's kernel).
pub fn rms_norm_forward(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    rms_norm(x, w, eps, out);
}

/// In-place RMSNorm of every `w.len()`-sized segment (per-head q/k norm; the engine's kernel).
pub fn rms_norm_forward_inplace(x: &mut [f32], w: &[f32], eps: f32) {
    rms_norm_inplace(x, w, eps);
}

/// RMSNorm backward: `dx += ∂/∂x` of `y = x·r·w`, `r = (mean(x²) + eps)^-½`, per
/// `w.len()`-sized row: `dx_j += r·w_j·dy_j − r³/d · x_j · Σ_i dy_i·w_i·x_i`.
pub fn rms_norm_backward_add(x: &[f32], w: &[f32], eps: f32, dy: &[f32], dx: &mut [f32]) {
    let d = w.len();
    assert_eq!(x.len(), dy.len());
    assert_eq!(x.len(), dx.len());
    assert_eq!(x.len() % d, 0);
    dx.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .zip(dy.par_chunks(d))
        .for_each(|((dxr, xr), dyr)| {
            let ss: f64 = xr.iter().map(|v| (*v as f64) * (*v as f64)).sum();
            let r = 1.0 / (ss / d as f64 + eps as f64).sqrt();
            let s: f64 = xr
                .iter()
                .zip(dyr)
                .zip(w)
                .map(|((a, b), c)| *a as f64 * *b as f64 * *c as f64)
                .sum();
            let k = (r * r * r * s / d as f64) as f32;
            let r = r as f32;
            for j in 0..d {
                dxr[j] += r * w[j] * dyr[j] - k * xr[j];
            }
        });
}

/// RoPE forward on `x` [n × heads × head_dim], positions 0..n (the engine's kernel).
pub fn rope_forward(rope: &Rope, x: &mut [f32], heads: usize) {
    rope.apply(x, heads, 0);
}

/// RoPE backward: the rotation is orthogonal, so the gradient rotates back by −angle.
pub fn rope_backward(rope: &Rope, dx: &mut [f32], heads: usize) {
    rope.apply_inverse(dx, heads, 0);
}

/// Causal (optionally sliding-window) GQA attention over positions 0..n:
/// `out [n × heads·hd]` from q [n × heads·hd], k, v [n × kv_heads·hd] (the engine's kernel).
pub fn attention_forward(q: &[f32], k: &[f32], v: &[f32], shape: AttnShape, out: &mut [f32]) {
    attention(q, k, v, 0, shape, out);
}

/// Attention backward: from `dout` compute `dq`, `dk`, `dv` (overwritten). The
/// probabilities are recomputed (nothing but q, k, v is stored). Parallel over
/// query heads; each head accumulates its own dk/dv, summed per KV group at the end.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dout: &[f32],
    shape: AttnShape,
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    let (nh, nkv, hd) = (shape.num_heads, shape.num_kv_heads, shape.head_dim);
    let (qd, kvd) = (nh * hd, nkv * hd);
    let n = q.len() / qd;
    assert_eq!(q.len(), n * qd);
    assert_eq!(dout.len(), q.len());
    assert_eq!(dq.len(), q.len());
    assert!(k.len() == n * kvd && v.len() == n * kvd && dk.len() == n * kvd && dv.len() == n * kvd);
    let group = nh / nkv;
    let scale = 1.0 / (hd as f32).sqrt();
    // Per query head: (dq of that head [n × hd], dk [n × hd], dv [n × hd]).
    let per_head: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = (0..nh)
        .into_par_iter()
        .map(|h| {
            let kvh = h / group;
            let mut dqh = vec![0f32; n * hd];
            let mut dkh = vec![0f32; n * hd];
            let mut dvh = vec![0f32; n * hd];
            let mut p = Vec::with_capacity(n);
            let mut dp = Vec::with_capacity(n);
            for t in 0..n {
                let lo = shape.window.map_or(0, |w| (t + 1).saturating_sub(w));
                let qt = &q[t * qd + h * hd..t * qd + (h + 1) * hd];
                let dot_ = &dout[t * qd + h * hd..t * qd + (h + 1) * hd];
                attention_probs(qt, k, kvd, kvh, lo, t, scale, &mut p);
                dp.clear();
                let mut pdp = 0f32;
                for (idx, j) in (lo..=t).enumerate() {
                    let vj = &v[j * kvd + kvh * hd..j * kvd + (kvh + 1) * hd];
                    let g = dot_f32(dot_, vj);
                    dp.push(g);
                    pdp += p[idx] * g;
                }
                let dqt = &mut dqh[t * hd..(t + 1) * hd];
                for (idx, j) in (lo..=t).enumerate() {
                    let ds = p[idx] * (dp[idx] - pdp) * scale;
                    let kj = &k[j * kvd + kvh * hd..j * kvd + (kvh + 1) * hd];
                    for (a, b) in dqt.iter_mut().zip(kj) {
                        *a += ds * b;
                    }
                    let dkj = &mut dkh[j * hd..(j + 1) * hd];
                    for (a, b) in dkj.iter_mut().zip(qt) {
                        *a += ds * b;
                    }
                    let pj = p[idx];
                    let dvj = &mut dvh[j * hd..(j + 1) * hd];
                    for (a, b) in dvj.iter_mut().zip(dot_) {
                        *a += pj * b;
                    }
                }
            }
            (dqh, dkh, dvh)
        })
        .collect();
    dk.fill(0.0);
    dv.fill(0.0);
    for (h, (dqh, dkh, dvh)) in per_head.iter().enumerate() {
        let kvh = h / group;
        for t in 0..n {
            dq[t * qd + h * hd..t * qd + (h + 1) * hd].copy_from_slice(&dqh[t * hd..(t + 1) * hd]);
            for (a, b) in dk[t * kvd + kvh * hd..t * kvd + (kvh + 1) * hd]
                .iter_mut()
                .zip(&dkh[t * hd..(t + 1) * hd])
            {
                *a += b;
            }
            for (a, b) in dv[t * kvd + kvh * hd..t * kvd + (kvh + 1) * hd]
                .iter_mut()
                .zip(&dvh[t * hd..(t + 1) * hd])
            {
                *a += b;
            }
        }
    }
}

/// SwiGLU forward: `act = silu(gate) · up` (the engine's kernel).
pub fn swiglu_forward(gate: &[f32], up: &[f32], act: &mut [f32]) {
    act.copy_from_slice(gate);
    swiglu_inplace(act, up);
}

/// SwiGLU backward: `dgate = dact·up·silu'(gate)`, `dup = dact·silu(gate)`,
/// with `silu'(g) = σ(g)·(1 + g·(1 − σ(g)))`.
pub fn swiglu_backward(gate: &[f32], up: &[f32], dact: &[f32], dgate: &mut [f32], dup: &mut [f32]) {
    assert!(
        gate.len() == up.len()
            && gate.len() == dact.len()
            && gate.len() == dgate.len()
            && gate.len() == dup.len()
    );
    const C: usize = 4096;
    dgate
        .par_chunks_mut(C)
        .zip(dup.par_chunks_mut(C))
        .zip(
            gate.par_chunks(C)
                .zip(up.par_chunks(C))
                .zip(dact.par_chunks(C)),
        )
        .for_each(|((dg, du), ((g, u), da))| {
            for i in 0..g.len() {
                let sig = 1.0 / (1.0 + (-g[i]).exp());
                du[i] = da[i] * silu(g[i]);
                dg[i] = da[i] * u[i] * sig * (1.0 + g[i] * (1.0 - sig));
            }
        });
}

/// Softmax cross-entropy of logit rows [targets.len() × vocab]. Returns the sum of
/// the per-row losses (f64) and overwrites `logits` with `scale · (softmax − onehot)`,
/// the gradient of `scale · Σ losses`.
pub fn cross_entropy_backward(
    logits: &mut [f32],
    vocab: usize,
    targets: &[u32],
    scale: f32,
) -> f64 {
    assert_eq!(logits.len(), targets.len() * vocab);
    logits
        .par_chunks_mut(vocab)
        .zip(targets.par_iter())
        .map(|(row, &tgt)| {
            let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let shifted_target = (row[tgt as usize] - max) as f64;
            let mut sum = 0f64;
            for x in row.iter_mut() {
                *x = (*x - max).exp();
                sum += *x as f64;
            }
            let loss = sum.ln() - shifted_target;
            let inv = (1.0 / sum) as f32 * scale;
            for x in row.iter_mut() {
                *x *= inv;
            }
            row[tgt as usize] -= scale;
            loss
        })
        .sum()
}

/// Rows per lm_head chunk (bounds the logits buffer to chunk × vocab).
const LM_CHUNK: usize = 64;

/// Mean next-token cross-entropy of final hidden states `h` [n × d] through the
/// lm_head W [vocab × d]: row t predicts `targets[t]` for t < targets.len().
/// Returns the loss and, when `dh` is given, writes ∂loss/∂h into it (rows without
/// a target get zero). The logits are produced chunk by chunk.
pub fn lm_head_cross_entropy(
    h: &[f32],
    d: usize,
    w: &[f32],
    vocab: usize,
    targets: &[u32],
    dh: Option<&mut [f32]>,
) -> f64 {
    let n = h.len() / d;
    let m = targets.len();
    assert!(m <= n && m > 0);
    let scale = 1.0 / m as f32;
    let mut dh = dh;
    if let Some(g) = dh.as_deref_mut() {
        assert_eq!(g.len(), n * d);
        g.fill(0.0);
    }
    let mut logits = Vec::new();
    let mut total = 0f64;
    for r0 in (0..m).step_by(LM_CHUNK) {
        let rows = LM_CHUNK.min(m - r0);
        logits.resize(rows * vocab, 0.0);
        linear_forward(
            &h[r0 * d..(r0 + rows) * d],
            rows,
            w,
            vocab,
            d,
            None,
            &mut logits,
        );
        total += cross_entropy_backward(&mut logits, vocab, &targets[r0..r0 + rows], scale);
        if let Some(g) = dh.as_deref_mut() {
            linear_backward_input(
                &logits,
                rows,
                w,
                vocab,
                d,
                &mut g[r0 * d..(r0 + rows) * d],
                false,
            );
        }
    }
    total / m as f64
}

/// `out[i] += g[i]²` (the per-sequence squared gradient added to the Fisher sum).
pub fn add_squared(out: &mut [f32], g: &[f32]) {
    assert_eq!(out.len(), g.len());
    out.par_chunks_mut(1 << 14)
        .zip(g.par_chunks(1 << 14))
        .for_each(|(o, g)| {
            for (a, b) in o.iter_mut().zip(g) {
                *a += b * b;
            }
        });
}

/// Adam's decay rates (β₁, β₂), for the estimators' projections.
pub const ADAM_BETAS: (f32, f32) = (0.9, 0.999);
/// Adam's ε (added to the root of the second moment).
pub const ADAM_EPS: f32 = 1e-12;

/// The gradient of mean_r (‖y_r‖ − e_r)² with respect to `y` [n × k], in
/// place: each row r times 2(‖y_r‖ − e_r) / (‖y_r‖ · n), ‖y_r‖ at least 1e-12
/// (the projection estimators' fine-tuning, METHOD.md 2c; n = `e.len()`).
pub fn norm_error_scale(y: &mut [f32], k: usize, e: &[f32]) {
    assert_eq!(y.len(), k * e.len());
    if k == 0 {
        return; // rows of no values: nothing to scale (chunks of 0 would panic)
    }
    let n = e.len() as f32;
    for (row, &er) in y.chunks_mut(k).zip(e) {
        let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
        let c = 2.0 * (norm - er) / (norm * n);
        row.iter_mut().for_each(|v| *v *= c);
    }
}

/// Adam's bias corrections 1 − β₁ᵗ and 1 − β₂ᵗ at step `t` (from 1).
pub fn adam_corrections(t: i32) -> (f32, f32) {
    let (b1, b2) = ADAM_BETAS;
    (1.0 - b1.powi(t), 1.0 - b2.powi(t))
}

/// One Adam step of `w` along `g` with moments `m` and `v`, step `t` (from 1)
/// and step size `lr`.
pub fn adam_step(w: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], lr: f32, t: i32) {
    assert!(g.len() == w.len() && m.len() == w.len() && v.len() == w.len());
    let (b1, b2) = ADAM_BETAS;
    let (c1, c2) = adam_corrections(t);
    for (((w, g), m), v) in w.iter_mut().zip(g).zip(m).zip(v) {
        *m = b1 * *m + (1.0 - b1) * g;
        *v = b2 * *v + (1.0 - b2) * g * g;
        *w -= lr * (*m / c1) / ((*v / c2).sqrt() + ADAM_EPS);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dpllm_format::ModelConfig;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use std::path::Path;

    fn rand_vec(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-scale..scale)).collect()
    }

    /// Σ r·y in f64 (a random linear read-out of an op's output: its gradient is r).
    fn readout(y: &[f32], r: &[f32]) -> f64 {
        y.iter().zip(r).map(|(a, b)| *a as f64 * *b as f64).sum()
    }

    /// Compare an analytic gradient `g` of scalar `f` at `x` against central differences, on every element.
    fn check_grad(name: &str, x: &[f32], g: &[f32], eps: f32, tol: f64, f: impl Fn(&[f32]) -> f64) {
        assert_eq!(x.len(), g.len());
        let gmax = g.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
        assert!(gmax > 0.0, "{name}: gradient is identically zero");
        let mut xp = x.to_vec();
        let mut worst = 0f64;
        for i in 0..x.len() {
            xp[i] = x[i] + eps;
            let fp = f(&xp);
            xp[i] = x[i] - eps;
            let fm = f(&xp);
            xp[i] = x[i];
            let fd = (fp - fm) / (2.0 * eps as f64);
            let err = (fd - g[i] as f64).abs() / (gmax + 1e-6);
            worst = worst.max(err);
            assert!(
                err < tol,
                "{name}[{i}]: analytic {} vs finite difference {fd} (rel. err {err:.2e})",
                g[i]
            );
        }
        eprintln!(
            "{name}: worst relative error {worst:.2e} over {} elements",
            x.len()
        );
    }

    #[test]
    fn linear_with_bias_backward() {
        let mut rng = StdRng::seed_from_u64(1);
        let (n, i, o) = (5, 7, 6);
        let x = rand_vec(&mut rng, n * i, 1.0);
        let w = rand_vec(&mut rng, o * i, 1.0);
        let b = rand_vec(&mut rng, o, 1.0);
        let r = rand_vec(&mut rng, n * o, 1.0);
        let f = |x: &[f32], w: &[f32]| {
            let mut y = vec![0f32; n * o];
            linear_forward(x, n, w, o, i, Some(&b), &mut y);
            readout(&y, &r)
        };
        // Forward against a naive f64 reference.
        let mut y = vec![0f32; n * o];
        linear_forward(&x, n, &w, o, i, Some(&b), &mut y);
        for t in 0..n {
            for c in 0..o {
                let want: f64 = (0..i)
                    .map(|k| x[t * i + k] as f64 * w[c * i + k] as f64)
                    .sum::<f64>()
                    + b[c] as f64;
                assert!((y[t * o + c] as f64 - want).abs() < 1e-5);
            }
        }
        let mut dx = vec![7f32; n * i];
        linear_backward_input(&r, n, &w, o, i, &mut dx, false);
        let mut dw = vec![7f32; o * i];
        linear_backward_weight(&r, &x, n, o, i, &mut dw);
        check_grad("linear dx", &x, &dx, 1e-2, 2e-3, |xx| f(xx, &w));
        check_grad("linear dW", &w, &dw, 1e-2, 2e-3, |ww| f(&x, ww));
        // Accumulating variant adds.
        let mut dx2 = dx.clone();
        linear_backward_input(&r, n, &w, o, i, &mut dx2, true);
        for (a, b) in dx2.iter().zip(&dx) {
            assert!((a - 2.0 * b).abs() < 1e-5);
        }
    }

    #[test]
    fn larger_gemm_paths_match_reference() {
        // Big enough for the threaded gemm path.
        let mut rng = StdRng::seed_from_u64(9);
        let (n, i, o) = (37, 130, 70);
        let x = rand_vec(&mut rng, n * i, 1.0);
        let w = rand_vec(&mut rng, o * i, 1.0);
        let dy = rand_vec(&mut rng, n * o, 1.0);
        let mut dw = vec![0f32; o * i];
        linear_backward_weight(&dy, &x, n, o, i, &mut dw);
        let mut dx = vec![0f32; n * i];
        linear_backward_input(&dy, n, &w, o, i, &mut dx, false);
        for r in 0..o {
            for c in 0..i {
                let want: f64 = (0..n)
                    .map(|t| dy[t * o + r] as f64 * x[t * i + c] as f64)
                    .sum();
                assert!((dw[r * i + c] as f64 - want).abs() < 1e-4, "dw");
            }
        }
        for t in 0..n {
            for c in 0..i {
                let want: f64 = (0..o)
                    .map(|r| dy[t * o + r] as f64 * w[r * i + c] as f64)
                    .sum();
                assert!((dx[t * i + c] as f64 - want).abs() < 1e-4, "dx");
            }
        }
    }

    #[test]
    fn rms_norm_backward() {
        let mut rng = StdRng::seed_from_u64(2);
        let (n, d) = (3, 8);
        let x = rand_vec(&mut rng, n * d, 2.0);
        let w = rand_vec(&mut rng, d, 1.5);
        let r = rand_vec(&mut rng, n * d, 1.0);
        let f = |x: &[f32]| {
            let mut y = vec![0f32; n * d];
            rms_norm_forward(x, &w, 1e-5, &mut y);
            readout(&y, &r)
        };
        let mut dx = vec![0.5f32; n * d];
        rms_norm_backward_add(&x, &w, 1e-5, &r, &mut dx);
        dx.iter_mut().for_each(|v| *v -= 0.5); // it adds
        check_grad("rmsnorm", &x, &dx, 1e-3, 5e-3, f);
    }

    fn rope_cfg(partial: f64) -> ModelConfig {
        let s = format!(
            r#"{{"architectures":["LlamaForCausalLM"],"hidden_size":24,"intermediate_size":8,"num_hidden_layers":1,
            "num_attention_heads":2,"num_key_value_heads":2,"vocab_size":10,"rope_theta":50.0,"partial_rotary_factor":{partial}}}"#
        );
        ModelConfig::from_json_str(&s, Path::new("c")).unwrap()
    }

    #[test]
    fn rope_backward_is_the_transpose() {
        let mut rng = StdRng::seed_from_u64(3);
        for partial in [1.0, 0.5] {
            let cfg = rope_cfg(partial);
            let rope = Rope::new(&cfg);
            let (n, heads, hd) = (5, 2, cfg.head_dim);
            let x = rand_vec(&mut rng, n * heads * hd, 1.0);
            let r = rand_vec(&mut rng, n * heads * hd, 1.0);
            let f = |x: &[f32]| {
                let mut y = x.to_vec();
                rope_forward(&rope, &mut y, heads);
                readout(&y, &r)
            };
            let mut g = r.clone();
            rope_backward(&rope, &mut g, heads);
            check_grad("rope", &x, &g, 1e-2, 2e-3, f);
            // Inverse undoes the forward.
            let mut y = x.clone();
            rope_forward(&rope, &mut y, heads);
            rope_backward(&rope, &mut y, heads);
            for (a, b) in y.iter().zip(&x) {
                assert!((a - b).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn attention_backward_gqa_window_causal() {
        let mut rng = StdRng::seed_from_u64(4);
        for window in [None, Some(3)] {
            let s = AttnShape {
                num_heads: 4,
                num_kv_heads: 2,
                head_dim: 4,
                window,
            };
            let n = 6;
            let (qd, kvd) = (16, 8);
            let q = rand_vec(&mut rng, n * qd, 1.5);
            let k = rand_vec(&mut rng, n * kvd, 1.5);
            let v = rand_vec(&mut rng, n * kvd, 1.0);
            let r = rand_vec(&mut rng, n * qd, 1.0);
            let f = |q: &[f32], k: &[f32], v: &[f32]| {
                let mut o = vec![0f32; n * qd];
                attention_forward(q, k, v, s, &mut o);
                readout(&o, &r)
            };
            let (mut dq, mut dk, mut dv) =
                (vec![9f32; n * qd], vec![9f32; n * kvd], vec![9f32; n * kvd]);
            attention_backward(&q, &k, &v, &r, s, &mut dq, &mut dk, &mut dv);
            check_grad("attn dq", &q, &dq, 1e-2, 5e-3, |x| f(x, &k, &v));
            check_grad("attn dk", &k, &dk, 1e-2, 5e-3, |x| f(&q, x, &v));
            check_grad("attn dv", &v, &dv, 1e-2, 5e-3, |x| f(&q, &k, x));
            if window.is_some() {
                // Keys outside every window of later queries still get gradient only from queries that see them:
                // key 0 is seen by queries 0..3 only; changing it must not change later outputs (checked by FD above).
                assert!(dk[..kvd].iter().any(|x| *x != 0.0));
            }
        }
    }

    #[test]
    fn swiglu_backward_matches_fd() {
        let mut rng = StdRng::seed_from_u64(5);
        let n = 40;
        let g = rand_vec(&mut rng, n, 4.0);
        let u = rand_vec(&mut rng, n, 2.0);
        let r = rand_vec(&mut rng, n, 1.0);
        let f = |g: &[f32], u: &[f32]| {
            let mut a = vec![0f32; n];
            swiglu_forward(g, u, &mut a);
            readout(&a, &r)
        };
        let (mut dg, mut du) = (vec![0f32; n], vec![0f32; n]);
        swiglu_backward(&g, &u, &r, &mut dg, &mut du);
        check_grad("swiglu dgate", &g, &dg, 1e-2, 2e-3, |x| f(x, &u));
        check_grad("swiglu dup", &u, &du, 1e-2, 2e-3, |x| f(&g, x));
    }

    #[test]
    fn cross_entropy_and_lm_head_backward() {
        let mut rng = StdRng::seed_from_u64(6);
        let (n, vocab, d) = (5, 11, 6);
        let logits = rand_vec(&mut rng, n * vocab, 3.0);
        let targets: Vec<u32> = (0..n).map(|_| rng.random_range(0..vocab as u32)).collect();
        let f = |l: &[f32]| {
            let mut c = l.to_vec();
            cross_entropy_backward(&mut c, vocab, &targets, 1.0) / n as f64
        };
        // Loss against the definition.
        let want: f64 = (0..n)
            .map(|t| {
                let row = &logits[t * vocab..(t + 1) * vocab];
                let lse = row.iter().map(|x| (*x as f64).exp()).sum::<f64>().ln();
                lse - row[targets[t] as usize] as f64
            })
            .sum::<f64>()
            / n as f64;
        assert!((f(&logits) - want).abs() < 1e-5);
        let mut g = logits.clone();
        cross_entropy_backward(&mut g, vocab, &targets, 1.0 / n as f32);
        check_grad("cross-entropy", &logits, &g, 1e-2, 2e-3, f);

        // Chunked lm_head + CE: one row more than targets (last row has no target).
        let rows = 70; // more than one chunk
        let h = rand_vec(&mut rng, rows * d, 1.0);
        let w = rand_vec(&mut rng, vocab * d, 1.0);
        let tg: Vec<u32> = (0..rows - 1)
            .map(|_| rng.random_range(0..vocab as u32))
            .collect();
        let mut dh = vec![3f32; rows * d];
        let loss = lm_head_cross_entropy(&h, d, &w, vocab, &tg, Some(&mut dh));
        assert!((loss - lm_head_cross_entropy(&h, d, &w, vocab, &tg, None)).abs() < 1e-12);
        assert!(dh[(rows - 1) * d..].iter().all(|x| *x == 0.0));
        check_grad("lm_head+CE", &h, &dh, 1e-2, 5e-3, |x| {
            lm_head_cross_entropy(x, d, &w, vocab, &tg, None)
        });
    }
    #[test]
    fn norm_error_scale_is_the_gradient_of_the_squared_error() {
        let (n, k) = (5, 7);
        let mut rng = StdRng::seed_from_u64(9);
        let y = rand_vec(&mut rng, n * k, 1.0);
        let e = rand_vec(&mut rng, n, 2.0);
        let loss = |y: &[f32]| -> f64 {
            (y.chunks(k).zip(&e))
                .map(|(r, &er)| {
                    let norm = r.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
                    (norm - er as f64).powi(2)
                })
                .sum::<f64>()
                / n as f64
        };
        let mut g = y.clone();
        norm_error_scale(&mut g, k, &e);
        check_grad("norm_error_scale", &y, &g, 1e-3, 1e-3, loss);
        // Rows of no values (k = 0): nothing to scale, and no panic.
        let mut empty: Vec<f32> = Vec::new();
        norm_error_scale(&mut empty, 0, &e);
        assert!(empty.is_empty());
    }

    #[test]
    fn adam_moves_against_the_gradient_by_the_step_size() {
        // The first step of Adam is −lr·sign(g) (up to ε), whatever |g| is.
        let g = vec![3.0f32, -1e-4, 0.5, -200.0];
        let mut w = vec![0f32; 4];
        let (mut m, mut v) = (vec![0f32; 4], vec![0f32; 4]);
        adam_step(&mut w, &g, &mut m, &mut v, 0.01, 1);
        for (wi, gi) in w.iter().zip(&g) {
            assert!((wi + 0.01 * gi.signum()).abs() < 1e-6, "{w:?}");
        }
        // A second step along the same gradient moves as far again.
        adam_step(&mut w, &g, &mut m, &mut v, 0.01, 2);
        for (wi, gi) in w.iter().zip(&g) {
            assert!((wi + 0.02 * gi.signum()).abs() < 1e-5, "{w:?}");
        }
    }
}
