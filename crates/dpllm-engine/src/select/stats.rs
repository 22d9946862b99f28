//! Counting the precision every quantized linear ran at, per token: effective bits.

use serde::Serialize;

/// Tokens processed at each precision, per quantized linear.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BitStats {
    /// Per linear (model order): parameter count.
    pub sizes: Vec<usize>,
    /// Per linear: tokens run at 0..=8 bits.
    pub counts: Vec<[u64; 9]>,
    /// Estimator multiply-adds spent (all linears, all tokens).
    pub estimator_flops: u64,
    /// Linear multiply-adds (all linears, all tokens).
    pub linear_flops: u64,
    /// Per linear: the estimator against the true error, recorded by oracle
    /// runs ([`crate::select::Selector::Oracle`]); empty otherwise.
    pub selection: Vec<SelectionDiag>,
}

/// How one linear's estimator compares with the true error on the tokens seen:
/// sums for the correlation, and how often the two make the same decision.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct SelectionDiag {
    /// Tokens compared.
    pub tokens: u64,
    sum_e: f64,
    sum_t: f64,
    sum_ee: f64,
    sum_tt: f64,
    sum_et: f64,
    /// Tokens whose estimate is above the threshold.
    pub estimate_high: u64,
    /// Tokens whose true error is above the threshold.
    pub true_high: u64,
    /// Tokens where both agree.
    pub agree: u64,
}

impl SelectionDiag {
    /// Pearson correlation of estimate and true error (None below 2 tokens or with no spread).
    pub fn correlation(&self) -> Option<f64> {
        let n = self.tokens as f64;
        let cov = self.sum_et / n - (self.sum_e / n) * (self.sum_t / n);
        let ve = self.sum_ee / n - (self.sum_e / n).powi(2);
        let vt = self.sum_tt / n - (self.sum_t / n).powi(2);
        (self.tokens >= 2 && ve > 0.0 && vt > 0.0).then(|| cov / (ve * vt).sqrt())
    }

    /// Share of tokens where the estimator decides as the true error would.
    pub fn agreement(&self) -> Option<f64> {
        (self.tokens > 0).then(|| self.agree as f64 / self.tokens as f64)
    }

    fn merge(&mut self, o: &SelectionDiag) {
        self.tokens += o.tokens;
        self.sum_e += o.sum_e;
        self.sum_t += o.sum_t;
        self.sum_ee += o.sum_ee;
        self.sum_tt += o.sum_tt;
        self.sum_et += o.sum_et;
        self.estimate_high += o.estimate_high;
        self.true_high += o.true_high;
        self.agree += o.agree;
    }
}

impl BitStats {
    /// Empty counters for linears of these sizes.
    pub fn new(sizes: Vec<usize>) -> BitStats {
        let n = sizes.len();
        BitStats {
            sizes,
            counts: vec![[0; 9]; n],
            estimator_flops: 0,
            linear_flops: 0,
            selection: Vec::new(),
        }
    }

    /// Record `tokens` tokens of linear `idx` at `bits`.
    pub fn add(&mut self, idx: usize, bits: u32, tokens: usize) {
        self.counts[idx][bits as usize] += tokens as u64;
        self.linear_flops += (self.sizes[idx] * tokens) as u64;
    }

    /// Record linear `idx`'s estimates and true errors of some tokens against its threshold.
    pub fn add_selection(&mut self, idx: usize, estimates: &[f32], errors: &[f32], threshold: f32) {
        if self.selection.len() < self.sizes.len() {
            self.selection
                .resize(self.sizes.len(), SelectionDiag::default());
        }
        let d = &mut self.selection[idx];
        for (&e, &t) in estimates.iter().zip(errors) {
            let (e64, t64) = (e as f64, t as f64);
            d.tokens += 1;
            d.sum_e += e64;
            d.sum_t += t64;
            d.sum_ee += e64 * e64;
            d.sum_tt += t64 * t64;
            d.sum_et += e64 * t64;
            let (eh, th) = (e > threshold, t > threshold);
            d.estimate_high += eh as u64;
            d.true_high += th as u64;
            d.agree += (eh == th) as u64;
        }
    }

    /// Σ bits·size·tokens / Σ size·tokens over every linear; None before any token.
    pub fn effective_bits(&self) -> Option<f64> {
        let (mut num, mut den) = (0f64, 0f64);
        for (s, c) in self.sizes.iter().zip(&self.counts) {
            for (b, &n) in c.iter().enumerate() {
                num += (b * s) as f64 * n as f64;
                den += *s as f64 * n as f64;
            }
        }
        (den > 0.0).then(|| num / den)
    }

    /// Average precision of linear `idx` over its tokens.
    pub fn linear_bits(&self, idx: usize) -> Option<f64> {
        let c = &self.counts[idx];
        let n: u64 = c.iter().sum();
        (n > 0).then(|| {
            c.iter()
                .enumerate()
                .map(|(b, &k)| b as f64 * k as f64)
                .sum::<f64>()
                / n as f64
        })
    }

    /// Estimator work as a fraction of the linear layers' work.
    pub fn estimator_overhead(&self) -> f64 {
        if self.linear_flops == 0 {
            0.0
        } else {
            self.estimator_flops as f64 / self.linear_flops as f64
        }
    }

    /// Add another run's counts (same model).
    pub fn merge(&mut self, other: &BitStats) {
        assert_eq!(self.sizes, other.sizes, "stats of different models");
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            for (x, y) in a.iter_mut().zip(b) {
                *x += y;
            }
        }
        self.estimator_flops += other.estimator_flops;
        self.linear_flops += other.linear_flops;
        if self.selection.len() < other.selection.len() {
            self.selection
                .resize(other.selection.len(), SelectionDiag::default());
        }
        for (a, b) in self.selection.iter_mut().zip(&other.selection) {
            a.merge(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn effective_bits_weighs_by_size_and_tokens() {
        let mut s = BitStats::new(vec![100, 300]);
        assert_eq!(s.effective_bits(), None);
        s.add(0, 3, 2);
        s.add(0, 4, 2);
        s.add(1, 5, 4);
        // (100·(3·2 + 4·2) + 300·5·4) / (100·4 + 300·4)
        let want = (100.0 * 14.0 + 300.0 * 20.0) / 1600.0;
        assert!((s.effective_bits().unwrap() - want).abs() < 1e-12);
        assert_eq!(s.linear_bits(0), Some(3.5));
        let mut t = s.clone();
        t.merge(&s);
        assert!((t.effective_bits().unwrap() - want).abs() < 1e-12);
        assert_eq!(t.linear_flops, 2 * (100 * 4 + 300 * 4));
    }

    #[test]
    fn selection_diagnostics_correlate_and_count_agreements() {
        let mut s = BitStats::new(vec![10, 10]);
        // True errors 1..=4; estimates a perfect line of them, then one swapped pair.
        s.add_selection(1, &[2.0, 4.0, 6.0, 8.0], &[1.0, 2.0, 3.0, 4.0], 2.5);
        let d = s.selection[1];
        assert!((d.correlation().unwrap() - 1.0).abs() < 1e-12);
        // Estimates above 2.5: 3 tokens; true errors above 2.5: 2 tokens; they agree on 3 of 4.
        assert_eq!(
            (d.tokens, d.estimate_high, d.true_high, d.agree),
            (4, 3, 2, 3)
        );
        assert_eq!(d.agreement(), Some(0.75));
        assert_eq!(s.selection[0].correlation(), None);
        let mut t = BitStats::new(vec![10, 10]);
        t.add_selection(1, &[4.0, 2.0], &[1.0, 2.0], 3.0);
        t.merge(&s);
        let m = t.selection[1];
        assert_eq!(m.tokens, 6);
        let r = m.correlation().unwrap();
        assert!(r > 0.0 && r < 1.0, "{r}");
    }
}
