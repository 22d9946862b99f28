//! Running one linear under a [`Precision`]: per-token selection splits the
//! tokens into a low- and a high-precision group, each one matmul. The decisions
//! stay in a backend buffer; only their count comes back.

use super::{BitStats, LinearSelect, Precision};
use crate::backend::Backend;
use crate::error::Result;
use crate::linear::Linear;

/// `y [n × out] = x [n × in] · Wᵀ` at the precision `prec` chooses for this linear.
///
/// `sel` is this linear's rule under the plan (None without a plan),
/// `x_est` the estimator's input (the exact or the asynchronous input), and
/// `stats` the counters with this linear's index.
#[allow(clippy::too_many_arguments)]
pub(crate) fn run_linear<B: Backend>(
    be: &B,
    lin: &Linear<B>,
    prec: Precision<'_, B>,
    sel: Option<&LinearSelect<B>>,
    x: &B::Buf,
    x_est: &B::Buf,
    n: usize,
    y: &mut B::Buf,
    stats: Option<(&mut BitStats, usize)>,
) -> Result<()> {
    let fixed = |bits: u32, y: &mut B::Buf, stats: Option<(&mut BitStats, usize)>| {
        lin.forward(be, x, n, Some(bits), y);
        if let Some((s, i)) = stats {
            s.add(i, bits, n);
        }
        Ok(())
    };
    let sel = match (prec, sel, lin.bits_range()) {
        (_, _, None) => {
            lin.forward(be, x, n, None, y);
            return Ok(());
        }
        (Precision::Uniform(b), _, Some(_)) => return fixed(b, y, stats),
        (Precision::Highest, _, Some((_, max))) | (_, None, Some((_, max))) => return fixed(max, y, stats),
        (Precision::Max(_), Some(s), _) => return fixed(s.max_bits, y, stats),
        (Precision::Dynamic(_), Some(s), _) => s,
    };
    if !sel.selects() {
        return fixed(sel.low, y, stats);
    }
    let mask = be.estimate(&sel.estimator, x_est, n, sel.threshold)?;
    let high = be.mask_count(&mask)?;
    let (cols, rows) = (lin.in_features(), lin.out_features());
    let mut stats = stats;
    if let Some((s, _)) = stats.as_mut() {
        s.estimator_flops += (sel.estimator.flops_per_token(cols) * n) as u64;
    }
    if high == 0 {
        return fixed(sel.low, y, stats);
    }
    if high == n {
        return fixed(sel.high, y, stats);
    }
    for (is_high, count, bits) in [(false, n - high, sel.low), (true, high, sel.high)] {
        let xg = be.gather_rows(x, cols, &mask, is_high)?;
        let mut yg = be.zeros(count * rows)?;
        lin.forward(be, &xg, count, Some(bits), &mut yg);
        be.scatter_rows(&yg, rows, &mask, is_high, y);
        if let Some((s, i)) = stats.as_mut() {
            s.add(*i, bits, count);
        }
    }
    Ok(())
}
