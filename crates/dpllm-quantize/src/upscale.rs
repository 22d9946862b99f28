//! Incremental upscaling: from the k-means seed to 8 bits by optimal weighted
//! 2-way splits of every cluster, so cluster c at b bits becomes clusters 2c and
//! 2c+1 at b+1 bits and the top b bits of the 8-bit index are the b-bit index.

use crate::kmeans::optimal_partition;
use crate::sorted_row::SortedRow;

/// Highest precision stored.
pub const MAX_BITS: u32 = 8;

/// One quantized row: nested indices and a centroid table per bit-width.
#[derive(Debug, Clone)]
pub struct QuantRow {
    /// Seed precision (lowest bit-width with a LUT).
    pub seed_bits: u32,
    /// 8-bit index per original column; `idx >> (8 - b)` is the b-bit index.
    pub indices: Vec<u8>,
    /// `luts[b - seed_bits]` holds the 2^b centroids of the b-bit model.
    pub luts: Vec<Vec<f32>>,
}

impl QuantRow {
    /// Centroid table of bit-width `b`.
    pub fn lut(&self, b: u32) -> &[f32] {
        &self.luts[(b - self.seed_bits) as usize]
    }

    /// The row dequantized at `b` bits.
    pub fn dequantize(&self, b: u32) -> Vec<f32> {
        let lut = self.lut(b);
        self.indices
            .iter()
            .map(|&i| lut[(i >> (MAX_BITS - b)) as usize])
            .collect()
    }
}

/// Centroids of intervals; an empty interval takes `fallback(c)`.
fn centroids(row: &SortedRow, bounds: &[usize], fallback: impl Fn(usize) -> f64) -> Vec<f32> {
    bounds
        .windows(2)
        .enumerate()
        .map(|(c, w)| {
            let m = row.mean(w[0], w[1]);
            (if m.is_nan() { fallback(c) } else { m }) as f32
        })
        .collect()
}

/// Best split point s in [l, r] of interval [l, r) minimizing cost(l, s) + cost(s, r).
fn best_split(row: &SortedRow, l: usize, r: usize) -> usize {
    if r - l < 2 {
        return r;
    }
    let mut best = (f64::INFINITY, l + 1);
    for s in l + 1..r {
        let c = row.cost(l, s) + row.cost(s, r);
        if c < best.0 {
            best = (c, s);
        }
    }
    best.1
}

/// Quantize one row: exact weighted k-means with 2^`seed_bits` clusters, then
/// split up to 8 bits. `weights` are the sensitivities of the row's elements.
pub fn quantize_row(values: &[f32], weights: &[f32], seed_bits: u32) -> QuantRow {
    assert!((1..=MAX_BITS).contains(&seed_bits));
    let row = SortedRow::new(values, weights);
    let mut bounds = optimal_partition(&row, 1 << seed_bits);
    let first_nonempty = bounds
        .windows(2)
        .map(|w| row.mean(w[0], w[1]))
        .find(|m| !m.is_nan())
        .unwrap_or(0.0);
    let seed_lut = {
        // Empty seed clusters (rows shorter than 2^seed_bits) repeat the previous centroid.
        let means: Vec<f64> = bounds.windows(2).map(|w| row.mean(w[0], w[1])).collect();
        let mut last = first_nonempty;
        means
            .iter()
            .map(|&m| {
                if !m.is_nan() {
                    last = m;
                }
                last as f32
            })
            .collect::<Vec<f32>>()
    };
    let mut luts = vec![seed_lut];
    for _b in seed_bits..MAX_BITS {
        let parent = luts.last().unwrap().clone();
        let mut next = Vec::with_capacity(bounds.len() * 2 - 1);
        for w in bounds.windows(2) {
            next.push(w[0]);
            next.push(best_split(&row, w[0], w[1]));
        }
        next.push(row.len());
        luts.push(centroids(&row, &next, |c| parent[c / 2] as f64));
        bounds = next;
    }
    let mut indices = vec![0u8; values.len()];
    for (c, w) in bounds.windows(2).enumerate() {
        for &col in &row.order[w[0]..w[1]] {
            indices[col as usize] = c as u8;
        }
    }
    QuantRow {
        seed_bits,
        indices,
        luts,
    }
}

/// Σ w·(v − q)² of a dequantized row.
pub fn weighted_error(values: &[f32], weights: &[f32], deq: &[f32]) -> f64 {
    values
        .iter()
        .zip(weights)
        .zip(deq)
        .map(|((v, w), q)| *w as f64 * ((v - q) as f64).powi(2))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random_row(rng: &mut impl Rng, n: usize) -> (Vec<f32>, Vec<f32>) {
        let v: Vec<f32> = (0..n)
            .map(|_| rng.random_range(-1.0f32..1.0).powi(3))
            .collect();
        let w: Vec<f32> = (0..n)
            .map(|_| rng.random_range(0.0f32..1.0).powi(4))
            .collect();
        (v, w)
    }

    #[test]
    fn nesting_top_bits_are_lower_precision_index() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        for n in [1usize, 5, 8, 9, 300, 1000] {
            let (v, w) = random_row(&mut rng, n);
            let q = quantize_row(&v, &w, 3);
            assert_eq!(q.luts.len(), 6);
            for b in 3..=8u32 {
                assert_eq!(q.lut(b).len(), 1 << b);
                assert!(q.lut(b).iter().all(|c| c.is_finite()));
            }
            // Each b+1-bit cluster is a sub-interval of its b-bit parent: values in
            // cluster 2c or 2c+1 at b+1 bits are exactly those in cluster c at b bits.
            let mut sorted: Vec<usize> = (0..n).collect();
            sorted.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
            for b in 3..=8u32 {
                let idx: Vec<u8> = sorted.iter().map(|&i| q.indices[i] >> (8 - b)).collect();
                assert!(
                    idx.windows(2).all(|p| p[0] <= p[1]),
                    "b={b}: clusters are not sorted intervals"
                );
            }
        }
    }

    #[test]
    fn weighted_error_never_increases_with_bits() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(10);
        for _ in 0..20 {
            let (v, w) = random_row(&mut rng, 512);
            let q = quantize_row(&v, &w, 3);
            let errs: Vec<f64> = (3..=8)
                .map(|b| weighted_error(&v, &w, &q.dequantize(b)))
                .collect();
            for p in errs.windows(2) {
                assert!(p[1] <= p[0] * (1.0 + 1e-9) + 1e-15, "{errs:?}");
            }
            assert!(
                errs[5] < errs[0] * 0.05,
                "8-bit should be far better than 3-bit: {errs:?}"
            );
        }
    }

    #[test]
    fn split_is_optimal_among_all_cuts() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(12);
        let (v, w) = random_row(&mut rng, 40);
        let row = SortedRow::new(&v, &w);
        let s = best_split(&row, 3, 35);
        let c = row.cost(3, s) + row.cost(s, 35);
        for t in 3..=35 {
            assert!(c <= row.cost(3, t) + row.cost(t, 35) + 1e-12);
        }
    }

    #[test]
    fn zero_sensitivity_row_uses_uniform_weights() {
        let v: Vec<f32> = (0..64).map(|i| i as f32 / 64.0 - 0.5).collect();
        let q = quantize_row(&v, &vec![0.0; 64], 3);
        // Uniform data, uniform weights: 8 equal clusters of 8 consecutive values.
        let counts = (0..8)
            .map(|c| q.indices.iter().filter(|&&i| i >> 5 == c).count())
            .collect::<Vec<_>>();
        assert_eq!(counts, vec![8; 8]);
    }
}
