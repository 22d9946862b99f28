//! The DP-LLM error estimators on the CPU: ê = a·||x|| + c, or ||G x|| + bias.

use super::dot::dot_f32;
use super::CpuBackend;
use crate::backend::Estimator;

/// Below this many multiply-adds a projection runs on the calling thread: one
/// decode token's estimate (k × in) costs microseconds, less than a parallel dispatch.
const SERIAL_MACS: usize = 1 << 20;

/// Euclidean norm of each row of `x` [n × d] (accumulated in f64).
pub fn row_norms(x: &[f32], d: usize) -> impl Iterator<Item = f32> + '_ {
    x.chunks(d).map(|r| {
        r.iter()
            .map(|v| (*v as f64) * (*v as f64))
            .sum::<f64>()
            .sqrt() as f32
    })
}

/// Estimates for the `n` rows of `x` [n × in].
pub fn estimate(est: &Estimator<CpuBackend>, x: &[f32], n: usize) -> Vec<f32> {
    let d = x.len() / n.max(1);
    match est {
        Estimator::None => vec![0.0; n],
        Estimator::Linear { a, c } => row_norms(x, d).map(|v| a * v + c).collect(),
        Estimator::Jl { k, g, bias } => {
            let mut gx = vec![0f32; n * k];
            match g.as_f32() {
                Some(gw) if n * k * d <= SERIAL_MACS => {
                    for (xt, out) in x.chunks(d).zip(gx.chunks_mut(*k)) {
                        for (o, row) in out.iter_mut().zip(gw.chunks(d)) {
                            *o = dot_f32(row, xt);
                        }
                    }
                }
                _ => g.forward(x, n, &mut gx),
            }
            row_norms(&gx, *k).map(|v| v + bias).collect()
        }
    }
}
