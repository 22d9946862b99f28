//! Running one linear under a [`Precision`]: per-token selection splits the
//! tokens into a low- and a high-precision group, each one matmul.

use super::{BitStats, LinearSelect, Precision};
use crate::linear::Linear;

/// Copy rows `idx` of `x` [n × d] into a new [idx.len() × d] buffer.
fn gather(x: &[f32], d: usize, idx: &[usize]) -> Vec<f32> {
    let mut out = Vec::with_capacity(idx.len() * d);
    for &t in idx {
        out.extend_from_slice(&x[t * d..(t + 1) * d]);
    }
    out
}

/// `y [n × out] = x [n × in] · Wᵀ` at the precision `prec` chooses for this linear.
///
/// `sel` is this linear's rule under the plan (None in [`Precision::Fixed`]),
/// `x_est` the estimator's input (the exact or the asynchronous input), and
/// `stats` the counters with this linear's index.
#[allow(clippy::too_many_arguments)]
pub(crate) fn run_linear(
    lin: &dyn Linear,
    prec: Precision<'_>,
    sel: Option<&LinearSelect>,
    x: &[f32],
    x_est: &[f32],
    n: usize,
    y: &mut [f32],
    stats: Option<(&mut BitStats, usize)>,
) {
    let fixed = |bits: u32, y: &mut [f32], stats: Option<(&mut BitStats, usize)>| {
        lin.forward_at(x, n, y, bits);
        if let Some((s, i)) = stats {
            s.add(i, bits, n);
        }
    };
    let sel = match (prec, sel) {
        (Precision::Fixed, _) | (_, None) => {
            let bits = lin.as_anyprec().map_or(0, |q| q.bits());
            lin.forward(x, n, y);
            if let (Some((s, i)), true) = (stats, bits > 0) {
                s.add(i, bits, n);
            }
            return;
        }
        (Precision::Max(_), Some(s)) => return fixed(s.max_bits, y, stats),
        (Precision::Dynamic(_), Some(s)) => s,
    };
    if !sel.selects() {
        return fixed(sel.low, y, stats);
    }
    let est = sel.estimator.estimate(x_est, n);
    let high: Vec<usize> = (0..n).filter(|&t| est[t] > sel.threshold).collect();
    let (cols, rows) = (lin.in_features(), lin.out_features());
    let mut stats = stats;
    if let Some((s, _)) = stats.as_mut() {
        s.estimator_flops += (sel.estimator.flops_per_token(cols) * n) as u64;
    }
    if high.is_empty() {
        return fixed(sel.low, y, stats);
    }
    if high.len() == n {
        return fixed(sel.high, y, stats);
    }
    let low: Vec<usize> = (0..n).filter(|&t| est[t] <= sel.threshold).collect();
    for (group, bits) in [(&low, sel.low), (&high, sel.high)] {
        let xg = gather(x, cols, group);
        let mut yg = vec![0f32; group.len() * rows];
        lin.forward_at(&xg, group.len(), &mut yg, bits);
        for (k, &t) in group.iter().enumerate() {
            y[t * rows..(t + 1) * rows].copy_from_slice(&yg[k * rows..(k + 1) * rows]);
        }
        if let Some((s, i)) = stats.as_mut() {
            s.add(*i, bits, group.len());
        }
    }
}
