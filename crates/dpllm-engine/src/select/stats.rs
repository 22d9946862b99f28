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
}

impl BitStats {
    /// Empty counters for linears of these sizes.
    pub fn new(sizes: Vec<usize>) -> BitStats {
        let n = sizes.len();
        BitStats { sizes, counts: vec![[0; 9]; n], estimator_flops: 0, linear_flops: 0 }
    }

    /// Record `tokens` tokens of linear `idx` at `bits`.
    pub fn add(&mut self, idx: usize, bits: u32, tokens: usize) {
        self.counts[idx][bits as usize] += tokens as u64;
        self.linear_flops += (self.sizes[idx] * tokens) as u64;
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
        (n > 0).then(|| c.iter().enumerate().map(|(b, &k)| b as f64 * k as f64).sum::<f64>() / n as f64)
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
}
