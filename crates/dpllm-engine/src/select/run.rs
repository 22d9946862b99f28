//! Running one linear under a [`Precision`]: under per-token selection each
//! token runs at the low or the high precision as the backend's decisions say
//! (`Backend::anyprec_linear_select`). The decisions stay in a backend buffer;
//! only their counts come back, at the end of the forward call.

use super::{BitStats, LinearSelect, Precision, RowTally, Selector, Tally};
use crate::backend::{Backend, Decide, EstInput};
use crate::error::Result;
use crate::linear::Linear;

/// `y [n × out] = x [n × in] · Wᵀ` at the precision `prec` chooses for this linear.
///
/// `sel` is this linear's rule under the plan (None without a plan), `x_est`
/// the estimator's input (the exact or the asynchronous input, its rows or
/// their norms), `idx` the
/// linear's index in the model and `stats` the session's counters; with a
/// `tally`, per-token counts go there (read at the end of the call) instead of
/// being waited for.
#[allow(clippy::too_many_arguments)]
pub(crate) fn run_linear<B: Backend>(
    be: &B,
    lin: &Linear<B>,
    prec: Precision<'_, B>,
    sel: Option<&LinearSelect<B>>,
    x: &B::Buf,
    x_est: EstInput<'_, B>,
    n: usize,
    y: &mut B::Buf,
    idx: usize,
    mut stats: Option<&mut BitStats>,
    tally: Option<&mut Tally<B>>,
) -> Result<()> {
    let mut fixed = |bits: u32, y: &mut B::Buf| {
        lin.forward(be, x, n, Some(bits), y);
        if let Some(s) = stats.as_deref_mut() {
            s.add(idx, bits, n);
        }
        Ok(())
    };
    let (sel, selector) = match rule(lin, prec, sel) {
        Rule::Stored => {
            lin.forward(be, x, n, None, y);
            return Ok(());
        }
        Rule::Fixed(b) => return fixed(b, y),
        Rule::Select(sel, selector) => (sel, selector),
    };
    match selector {
        Selector::Estimator => {
            if let Some(s) = stats.as_deref_mut() {
                s.estimator_flops += (sel.estimator.flops_per_token(lin.in_features()) * n) as u64;
            }
            let bits = (sel.low, sel.high);
            let decide = Decide {
                estimator: &sel.estimator,
                input: x_est,
                threshold: sel.threshold,
            };
            match (tally, stats) {
                // Decided and counted on the backend, read at the end of the call.
                (Some(t), _) => {
                    let slot = t.slot(idx, bits, n);
                    lin.forward_decided(be, x, n, bits, decide, Some(slot), y)
                }
                (None, None) => lin.forward_decided(be, x, n, bits, decide, None, y),
                (None, stats) => {
                    let mask = be.estimate(decide.estimator, x_est, n, decide.threshold)?;
                    run_split(be, lin, sel, x, n, y, &mask, idx, stats, None)
                }
            }
        }
        Selector::Random { seed } => {
            let u = random_uniforms(
                &be.download(be.rows(x, lin.in_features(), 0, n)?)?,
                lin.in_features(),
                seed,
                idx,
            );
            // P(u > 1 − f) = f: the planned share of high-precision tokens.
            let mask = be.threshold_mask(&be.upload(&u)?, 1.0 - sel.high_fraction())?;
            run_split(be, lin, sel, x, n, y, &mask, idx, stats, tally)
        }
        Selector::Oracle => run_oracle(be, lin, sel, x, x_est, n, y, idx, stats),
    }
}

/// What decides one linear's precision in a call.
enum Rule<'s, B: Backend> {
    /// A dense weight: as stored.
    Stored,
    /// Every token at these bits.
    Fixed(u32),
    /// Per token, by this rule and selector.
    Select(&'s LinearSelect<B>, Selector),
}

/// The rule of `lin` under `prec`, `sel` being its plan's rule (None without a plan).
fn rule<'s, B: Backend>(
    lin: &Linear<B>,
    prec: Precision<'s, B>,
    sel: Option<&'s LinearSelect<B>>,
) -> Rule<'s, B> {
    match (prec, sel, lin.bits_range()) {
        (_, _, None) => Rule::Stored,
        (Precision::Uniform(b), _, Some(_)) => Rule::Fixed(b),
        (Precision::Highest, _, Some((_, max))) | (_, None, Some((_, max))) => Rule::Fixed(max),
        (Precision::Max(_), Some(s), _) => Rule::Fixed(s.max_bits),
        (Precision::Dynamic(_), Some(s), _) if !s.selects() => Rule::Fixed(s.low),
        (Precision::Dynamic(p), Some(s), _) => Rule::Select(s, p.selector),
    }
}

/// Count the precisions [`run_linear`] gives a group of tokens whose
/// estimator input is `x_est`, token t belonging to the session of row
/// `rows[t]` (a batch of sessions' decode steps runs a linear once for
/// several sessions, each counting its own tokens): fixed precisions into
/// `stats[rows[t]]`, the estimator's decisions into the group's device
/// `tally` (read once after the call). Decisions by the estimator only:
/// oracle and random selection never share a call.
#[allow(clippy::too_many_arguments)]
pub(crate) fn count_decisions<B: Backend>(
    be: &B,
    lin: &Linear<B>,
    prec: Precision<'_, B>,
    sel: Option<&LinearSelect<B>>,
    x_est: EstInput<'_, B>,
    idx: usize,
    rows: &[usize],
    stats: &mut [BitStats],
    tally: &mut RowTally<B>,
) -> Result<()> {
    match rule(lin, prec, sel) {
        Rule::Stored => {}
        Rule::Fixed(b) => rows.iter().for_each(|&r| stats[r].add(idx, b, 1)),
        Rule::Select(sel, Selector::Estimator) => {
            let flops = sel.estimator.flops_per_token(lin.in_features()) as u64;
            rows.iter().for_each(|&r| stats[r].estimator_flops += flops);
            let mask = be.estimate(&sel.estimator, x_est, rows.len(), sel.threshold)?;
            tally.record(be, idx, (sel.low, sel.high), &mask);
        }
        Rule::Select(_, selector) => {
            return Err(crate::EngineError::Device(format!(
                "selection by {selector:?} cannot count the tokens of a shared call"
            )))
        }
    }
    Ok(())
}

/// Run the tokens `mask` sends low at `sel.low` and the others at `sel.high`.
#[allow(clippy::too_many_arguments)]
fn run_split<B: Backend>(
    be: &B,
    lin: &Linear<B>,
    sel: &LinearSelect<B>,
    x: &B::Buf,
    n: usize,
    y: &mut B::Buf,
    mask: &B::Mask,
    idx: usize,
    stats: Option<&mut BitStats>,
    tally: Option<&mut Tally<B>>,
) -> Result<()> {
    lin.forward_select(be, x, n, (sel.low, sel.high), mask, y)?;
    match (tally, stats) {
        (Some(t), _) => t.record(be, idx, (sel.low, sel.high), n, mask),
        (None, Some(s)) => {
            let high = be.mask_count(mask)?;
            s.add(idx, sel.low, n - high);
            s.add(idx, sel.high, high);
        }
        (None, None) => {}
    }
    Ok(())
}

/// Decide by the true error ||(W_h − W_l)x|| against the threshold (both
/// precisions run on every token), and record how the estimator compares.
#[allow(clippy::too_many_arguments)]
fn run_oracle<B: Backend>(
    be: &B,
    lin: &Linear<B>,
    sel: &LinearSelect<B>,
    x: &B::Buf,
    x_est: EstInput<'_, B>,
    n: usize,
    y: &mut B::Buf,
    idx: usize,
    stats: Option<&mut BitStats>,
) -> Result<()> {
    let rows = lin.out_features();
    let mut y_high = be.zeros(n * rows)?;
    lin.forward(be, x, n, Some(sel.low), y);
    lin.forward(be, x, n, Some(sel.high), &mut y_high);
    let low = be.download(be.rows(y, rows, 0, n)?)?;
    let high = be.download(be.rows(&y_high, rows, 0, n)?)?;
    let err: Vec<f32> = low
        .chunks(rows)
        .zip(high.chunks(rows))
        .map(|(a, b)| {
            a.iter()
                .zip(b)
                .map(|(p, q)| ((q - p) as f64).powi(2))
                .sum::<f64>()
                .sqrt() as f32
        })
        .collect();
    let mask = be.threshold_mask(&be.upload(&err)?, sel.threshold)?;
    let picked = be.gather_rows(&y_high, rows, &mask, true)?;
    be.scatter_rows(&picked, rows, &mask, true, y);
    if let Some(s) = stats {
        let est = be.download(be.estimates(&sel.estimator, x_est, n)?)?;
        s.add_selection(idx, &est, &err, sel.threshold);
        let h = be.mask_count(&mask)?;
        s.add(idx, sel.low, n - h);
        s.add(idx, sel.high, h);
    }
    Ok(())
}

/// One uniform number in [0, 1) per row of `x` [n × cols], a hash of the row,
/// the linear and the seed: reproducible, independent of the error.
fn random_uniforms(x: &[f32], cols: usize, seed: u64, idx: usize) -> Vec<f32> {
    x.chunks(cols.max(1))
        .map(|row| {
            let mut h = seed ^ (idx as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            for v in row {
                h = (h ^ v.to_bits() as u64).wrapping_mul(0x1000_0000_01b3);
            }
            // splitmix64 finaliser, top 24 bits as the fraction.
            h ^= h >> 30;
            h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
            h ^= h >> 27;
            h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
            h ^= h >> 31;
            (h >> 40) as f32 / (1u64 << 24) as f32
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::random_uniforms;

    #[test]
    fn random_uniforms_are_uniform_and_reproducible() {
        let x: Vec<f32> = (0..4000 * 3).map(|i| (i as f32 * 0.37).sin()).collect();
        let u = random_uniforms(&x, 3, 7, 2);
        assert_eq!(u, random_uniforms(&x, 3, 7, 2));
        assert_ne!(
            u,
            random_uniforms(&x, 3, 7, 3),
            "another linear draws other numbers"
        );
        assert!(u.iter().all(|v| (0.0..1.0).contains(v)));
        let below = u.iter().filter(|&&v| v < 0.3).count() as f64 / u.len() as f64;
        assert!((below - 0.3).abs() < 0.03, "{below}");
    }
}
