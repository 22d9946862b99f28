//! Run-time error estimators: a cheap guess of ||(W_h − W_l)x|| per token.

use std::sync::Arc;

use dpllm_format::TensorData;

pub use crate::backend::cpu::estimate::row_norms;
use crate::backend::cpu::{estimate, CpuBackend, DenseLinear};
pub use crate::backend::Estimator;

impl Estimator<CpuBackend> {
    /// A random-projection estimator with G [k × in] given as f32 rows.
    pub fn jl(g: Vec<f32>, k: usize, bias: f32) -> Estimator<CpuBackend> {
        let cols = g.len() / k.max(1);
        Estimator::Jl {
            k,
            g: DenseLinear::new(Arc::new(TensorData::F32(g)), k, cols, None),
            bias,
        }
    }

    /// Estimates for the `n` rows of `x` [n × in], as the CPU backend computes them.
    pub fn estimate(&self, x: &[f32], n: usize) -> Vec<f32> {
        estimate::estimate(self, x, n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimates_match_their_definitions() {
        let x = vec![3.0f32, 4.0, 0.0, 1.0, 0.0, 0.0];
        let lin = Estimator::<CpuBackend>::Linear { a: 2.0, c: 0.5 };
        assert_eq!(lin.estimate(&x, 2), vec![10.5, 2.5]);
        // G = [[1,0,0],[0,2,0]]: ||Gx|| = sqrt(x0² + 4x1²).
        let jl = Estimator::jl(vec![1.0, 0.0, 0.0, 0.0, 2.0, 0.0], 2, 0.0);
        let e = jl.estimate(&x, 2);
        assert!(
            (e[0] - (9.0f32 + 64.0).sqrt()).abs() < 1e-5 && (e[1] - 1.0).abs() < 1e-6,
            "{e:?}"
        );
        // The batched path (more than the GEMV token count) gives the same numbers.
        let many: Vec<f32> = x.iter().cycle().take(6 * 8).cloned().collect();
        let e8 = jl.estimate(&many, 16);
        assert!((e8[0] - e[0]).abs() < 1e-5 && (e8[15] - e[1]).abs() < 1e-5);
        // ... and so does the parallel path of large batches.
        let big: Vec<f32> = x.iter().cycle().take(3 * 2 * 200_000).cloned().collect();
        let eb = jl.estimate(&big, 400_000);
        assert!((eb[0] - e[0]).abs() < 1e-5 && (eb[399_999] - e[1]).abs() < 1e-5);
        assert_eq!(
            Estimator::<CpuBackend>::None.estimate(&x, 2),
            vec![0.0, 0.0]
        );
        let shifted = Estimator::jl(vec![1.0, 0.0, 0.0, 0.0, 2.0, 0.0], 2, -0.5);
        assert!((shifted.estimate(&x, 2)[1] - 0.5).abs() < 1e-6);
    }
}
