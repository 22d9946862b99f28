//! Fidelity to a reference model on the same tokens, as llama.cpp's
//! `perplexity --kl-divergence` reports it: the KL divergence of the model's
//! next-token distribution from the reference's, per predicted token (mean, 99th
//! percentile, maximum), and how often both put the same token first.

use dpllm_engine::sampler::argmax;
use serde::Serialize;

/// Fidelity of a run to its reference.
#[derive(Debug, Clone, Serialize)]
pub struct Fidelity {
    /// Reference model.
    pub reference: String,
    /// Perplexity of the reference on the same predictions.
    pub reference_perplexity: f64,
    /// Mean over predicted tokens of KL(P_ref ‖ P_model), nats.
    pub mean_kl: f64,
    /// 99th percentile of the per-token KL, nats.
    pub p99_kl: f64,
    /// Largest per-token KL, nats.
    pub max_kl: f64,
    /// Fraction of predictions whose most likely token is the reference's.
    pub top1_agreement: f64,
}

/// Accumulates per-token comparisons of logits rows.
#[derive(Debug, Default)]
pub struct FidelityAcc {
    kl: Vec<f64>,
    agree: usize,
    ref_nll: f64,
}

/// log-softmax of one row, in f64.
fn log_softmax(row: &[f32]) -> Vec<f64> {
    let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
    row.iter().map(|&x| x as f64 - lse).collect()
}

impl FidelityAcc {
    /// Compare rows of `logits` with the reference's `ref_logits` [rows × vocab];
    /// `targets` are the true next tokens (for the reference's perplexity).
    pub fn add(&mut self, logits: &[f32], ref_logits: &[f32], vocab: usize, targets: &[u32]) {
        use rayon::prelude::*;
        // Rows in parallel, accumulated in order (results independent of threads).
        let rows: Vec<(f64, bool, f64)> = logits
            .par_chunks(vocab.max(1))
            .zip(ref_logits.par_chunks(vocab.max(1)))
            .zip(targets.par_iter())
            .map(|((row, rrow), &t)| {
                let (lp, lq) = (log_softmax(rrow), log_softmax(row));
                let kl: f64 = lp.iter().zip(&lq).map(|(&p, &q)| p.exp() * (p - q)).sum();
                (kl.max(0.0), argmax(row) == argmax(rrow), lp[t as usize])
            })
            .collect();
        for (kl, agree, ref_lp) in rows {
            self.kl.push(kl);
            self.agree += agree as usize;
            self.ref_nll -= ref_lp;
        }
    }

    /// The statistics over every token added.
    pub fn finish(mut self, reference: String) -> Fidelity {
        let n = self.kl.len().max(1) as f64;
        self.kl.sort_by(f64::total_cmp);
        let p99 = self
            .kl
            .get(((self.kl.len() as f64 * 0.99).ceil() as usize).saturating_sub(1))
            .copied()
            .unwrap_or(0.0);
        Fidelity {
            reference,
            reference_perplexity: (self.ref_nll / n).exp(),
            mean_kl: self.kl.iter().sum::<f64>() / n,
            p99_kl: p99,
            max_kl: self.kl.last().copied().unwrap_or(0.0),
            top1_agreement: self.agree as f64 / n,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kl_of_known_distributions() {
        let mut a = FidelityAcc::default();
        // Identical rows: KL 0, agreement.
        a.add(&[1.0, 2.0, 3.0], &[1.0, 2.0, 3.0], 3, &[2]);
        // P_ref = (1/2, 1/2), P = (e/(1+e), 1/(1+e)): KL = Σ ½ (ln ½ − ln P) = −ln 2 − ½ ln(e/(1+e)) − ½ ln(1/(1+e)).
        a.add(&[1.0, 0.0], &[0.0, 0.0], 2, &[0]);
        let f = a.finish("ref".into());
        let e = std::f64::consts::E;
        let want = -(2f64.ln()) - 0.5 * (e / (1.0 + e)).ln() - 0.5 * (1.0 / (1.0 + e)).ln();
        assert!((f.max_kl - want).abs() < 1e-12, "{} vs {want}", f.max_kl);
        assert!((f.mean_kl - want / 2.0).abs() < 1e-12);
        // Ties go to the first token, so [0, 0] and [1, 0] agree on token 0.
        assert_eq!(f.top1_agreement, 1.0);
        assert!(f.reference_perplexity > 1.0);
    }
}
