//! The next-token loss of logits, in f64: what perplexity and the training
//! model's checks are computed from.

/// Σ −log softmax(logits)[target] for rows of logits [rows × vocab].
pub fn nll_sum(logits: &[f32], vocab: usize, targets: &[u32]) -> f64 {
    use rayon::prelude::*;
    // Rows in parallel (a 2048-token chunk of a 49k vocabulary is 10^8 exps),
    // summed in order, so the result does not depend on the thread count.
    let per_row: Vec<f64> = logits
        .par_chunks(vocab.max(1))
        .zip(targets.par_iter())
        .map(|(row, &t)| {
            let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let z: f64 = row.iter().map(|&x| (x as f64 - m).exp()).sum();
            m + z.ln() - row[t as usize] as f64
        })
        .collect();
    per_row.iter().sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nll_of_uniform_and_peaked_rows() {
        let v = 4;
        let uniform = vec![0.0f32; v];
        assert!((nll_sum(&uniform, v, &[2]) - (4f64).ln()).abs() < 1e-12);
        let peaked = vec![0.0f32, 0.0, 100.0, 0.0];
        assert!(nll_sum(&peaked, v, &[2]) < 1e-12);
        assert!((nll_sum(&peaked, v, &[0]) - 100.0).abs() < 1e-9);
    }
}
