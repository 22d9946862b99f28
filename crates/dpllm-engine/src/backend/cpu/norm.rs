//! RMSNorm.

use rayon::prelude::*;

/// RMSNorm of each row of `x` [n × d] into `out`: x / sqrt(mean(x²) + eps) · w.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let d = w.len();
    assert_eq!(x.len(), out.len());
    assert_eq!(x.len() % d, 0);
    out.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .for_each(|(o, r)| rms_norm_row(r, w, eps, o));
}

/// RMSNorm of one row (f64 sum of squares for stability).
pub fn rms_norm_row(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let ss: f64 = x.iter().map(|v| (*v as f64) * (*v as f64)).sum();
    let inv = (1.0 / ((ss / x.len() as f64) + eps as f64).sqrt()) as f32;
    for ((o, v), g) in out.iter_mut().zip(x).zip(w) {
        *o = v * inv * g;
    }
}

/// In-place RMSNorm of every `d`-sized segment (per-head q/k norm).
pub fn rms_norm_inplace(x: &mut [f32], w: &[f32], eps: f32) {
    let d = w.len();
    x.par_chunks_mut(d).for_each(|seg| {
        let tmp = seg.to_vec();
        rms_norm_row(&tmp, w, eps, seg);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_definition() {
        let x = [1.0f32, -2.0, 3.0, 0.5, 0.0, 4.0];
        let w = [1.0f32, 2.0, 0.5];
        let mut o = [0f32; 6];
        rms_norm(&x, &w, 1e-5, &mut o);
        for r in 0..2 {
            let row = &x[r * 3..r * 3 + 3];
            let rms = (row.iter().map(|v| v * v).sum::<f32>() / 3.0 + 1e-5).sqrt();
            for c in 0..3 {
                assert!((o[r * 3 + c] - row[c] / rms * w[c]).abs() < 1e-6);
            }
        }
        let mut y = x;
        rms_norm_inplace(&mut y, &w, 1e-5);
        assert_eq!(y, o);
    }
}
