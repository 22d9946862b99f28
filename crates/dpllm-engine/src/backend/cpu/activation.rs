//! SwiGLU activation.

use rayon::prelude::*;

/// SiLU(x) = x · σ(x).
#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// `gate[i] = silu(gate[i]) * up[i]` in place.
pub fn swiglu_inplace(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len());
    gate.par_chunks_mut(4096)
        .zip(up.par_chunks(4096))
        .for_each(|(g, u)| {
            for (a, b) in g.iter_mut().zip(u) {
                *a = silu(*a) * b;
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silu_values() {
        assert_eq!(silu(0.0), 0.0);
        assert!((silu(1.0) - 0.731_058_6).abs() < 1e-6);
        assert!((silu(-20.0)).abs() < 1e-7);
        let mut g = vec![1.0, -1.0];
        swiglu_inplace(&mut g, &[2.0, 3.0]);
        assert!((g[0] - 2.0 * 0.731_058_6).abs() < 1e-6 && (g[1] + 3.0 * 0.268_941_4).abs() < 1e-6);
    }
}
