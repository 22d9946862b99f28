//! Run-time error estimators: a cheap guess of ||(W_h − W_l)x|| per token.

use dpllm_format::TensorData;

use crate::cpu::dot::dot_f32;
use crate::cpu::matmul::matmul_dense;

/// Below this many multiply-adds a projection runs on the calling thread: one
/// decode token's estimate (k × in) costs microseconds, less than a parallel dispatch.
const SERIAL_MACS: usize = 1 << 20;

/// An estimator of one linear's relative error (METHOD.md 2c).
#[derive(Debug, Clone)]
pub enum Estimator {
    /// No estimate: the linear always runs at one precision.
    None,
    /// ê = a·||x|| + c.
    Linear {
        /// Slope.
        a: f32,
        /// Intercept.
        c: f32,
    },
    /// ê = ||G x|| + bias with G [k × in], row-major.
    Jl {
        /// Rows of G.
        k: usize,
        /// G as f32.
        g: TensorData,
        /// Added to ||G x||.
        bias: f32,
    },
}

/// Euclidean norm of each row of `x` [n × d].
pub fn row_norms(x: &[f32], d: usize) -> impl Iterator<Item = f32> + '_ {
    x.chunks(d).map(|r| r.iter().map(|v| (*v as f64) * (*v as f64)).sum::<f64>().sqrt() as f32)
}

impl Estimator {
    /// Estimates for the `n` rows of `x` [n × in].
    pub fn estimate(&self, x: &[f32], n: usize) -> Vec<f32> {
        let d = x.len() / n.max(1);
        match self {
            Estimator::None => vec![0.0; n],
            Estimator::Linear { a, c } => row_norms(x, d).map(|v| a * v + c).collect(),
            Estimator::Jl { k, g, bias } => {
                let mut gx = vec![0f32; n * k];
                match g {
                    TensorData::F32(gw) if n * k * d <= SERIAL_MACS => {
                        for (xt, out) in x.chunks(d).zip(gx.chunks_mut(*k)) {
                            for (o, row) in out.iter_mut().zip(gw.chunks(d)) {
                                *o = dot_f32(row, xt);
                            }
                        }
                    }
                    _ => matmul_dense(g, *k, d, x, n, &mut gx),
                }
                row_norms(&gx, *k).map(|v| v + bias).collect()
            }
        }
    }

    /// Multiply-adds per token (for overhead accounting).
    pub fn flops_per_token(&self, in_features: usize) -> usize {
        match self {
            Estimator::None => 0,
            Estimator::Linear { .. } => in_features,
            Estimator::Jl { k, .. } => k * in_features + k,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimates_match_their_definitions() {
        let x = vec![3.0f32, 4.0, 0.0, 1.0, 0.0, 0.0];
        let lin = Estimator::Linear { a: 2.0, c: 0.5 };
        assert_eq!(lin.estimate(&x, 2), vec![10.5, 2.5]);
        // G = [[1,0,0],[0,2,0]]: ||Gx|| = sqrt(x0² + 4x1²).
        let g = TensorData::F32(vec![1.0, 0.0, 0.0, 0.0, 2.0, 0.0]);
        let jl = Estimator::Jl { k: 2, g, bias: 0.0 };
        let e = jl.estimate(&x, 2);
        assert!((e[0] - (9.0f32 + 64.0).sqrt()).abs() < 1e-5 && (e[1] - 1.0).abs() < 1e-6, "{e:?}");
        // The batched path (more than the GEMV token count) gives the same numbers.
        let many: Vec<f32> = x.iter().cycle().take(6 * 8).cloned().collect();
        let e8 = jl.estimate(&many, 16);
        assert!((e8[0] - e[0]).abs() < 1e-5 && (e8[15] - e[1]).abs() < 1e-5);
        // ... and so does the parallel path of large batches.
        let big: Vec<f32> = x.iter().cycle().take(3 * 2 * 200_000).cloned().collect();
        let eb = jl.estimate(&big, 400_000);
        assert!((eb[0] - e[0]).abs() < 1e-5 && (eb[399_999] - e[1]).abs() < 1e-5);
        assert_eq!(Estimator::None.estimate(&x, 2), vec![0.0, 0.0]);
        let shifted = Estimator::Jl { k: 2, g: TensorData::F32(vec![1.0, 0.0, 0.0, 0.0, 2.0, 0.0]), bias: -0.5 };
        assert!((shifted.estimate(&x, 2)[1] - 0.5).abs() < 1e-6);
    }
}
