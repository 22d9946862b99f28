//! Dequantized weights of every quantized linear at each precision a plan may
//! use, shared by precision fine-tuning and estimator calibration.

use anyhow::{ensure, Result};
use dpllm_engine::Model;
use dpllm_format::LinearKind;
use dpllm_grad::GradBackend;

/// One linear's weights at precisions `min_bits..=max_bits`.
pub struct LinearWeights {
    /// Tensor-name prefix.
    pub name: String,
    /// Block index.
    pub layer: usize,
    /// Index in `Block::linears()` order.
    pub index: usize,
    /// Which projection it is.
    pub kind: LinearKind,
    /// Output features.
    pub rows: usize,
    /// Input features.
    pub cols: usize,
    /// Lowest precision held.
    pub min_bits: u32,
    /// Highest precision held (the linear's m_l).
    pub max_bits: u32,
    /// `w[b - min_bits]`: W_b [rows × cols] as f32.
    w: Vec<Vec<f32>>,
}

impl LinearWeights {
    /// Parameter count.
    pub fn size(&self) -> usize {
        self.rows * self.cols
    }

    /// W at `bits`.
    pub fn at(&self, bits: u32) -> &[f32] {
        &self.w[(bits - self.min_bits) as usize]
    }

    /// W at `bits`, as the CPU gradient backend's buffer.
    pub fn level(&self, bits: u32) -> &Vec<f32> {
        &self.w[(bits - self.min_bits) as usize]
    }

    /// W_{b+1} − W_b.
    pub fn delta(&self, b: u32) -> Vec<f32> {
        self.at(b + 1)
            .iter()
            .zip(self.at(b))
            .map(|(h, l)| h - l)
            .collect()
    }
}

/// Where precision fine-tuning finds each linear's weight at a precision, in
/// the buffers of a gradient backend.
pub trait WeightLevels<B> {
    /// W of linear `g` (model order) at `bits`.
    fn level(&self, g: usize, bits: u32) -> &B;
}

impl WeightLevels<Vec<f32>> for [LinearWeights] {
    fn level(&self, g: usize, bits: u32) -> &Vec<f32> {
        self[g].level(bits)
    }
}

/// Every linear's weights at its precisions, copied to a gradient backend (a GPU).
pub struct LevelsOn<B> {
    min_bits: Vec<u32>,
    w: Vec<Vec<B>>,
}

impl<B> LevelsOn<B> {
    /// The levels of `w` on `be`.
    pub fn upload<G: GradBackend<Buf = B>>(be: &G, w: &[LinearWeights]) -> Result<LevelsOn<B>> {
        Ok(LevelsOn {
            min_bits: w.iter().map(|l| l.min_bits).collect(),
            w: (w.iter())
                .map(|l| l.w.iter().map(|v| be.upload(v)).collect::<Result<Vec<B>>>())
                .collect::<Result<_>>()?,
        })
    }
}

impl<B> WeightLevels<B> for LevelsOn<B> {
    fn level(&self, g: usize, bits: u32) -> &B {
        &self.w[g][(bits - self.min_bits[g]) as usize]
    }
}

/// The two precisions around `p` and the weight of the lower one:
/// y = r·y(lo) + (1 − r)·y(hi), r = 1 − (p − lo). At p = max the pair is (max−1, max), r = 0.
pub fn split_precision(p: f64, min_bits: u32, max_bits: u32) -> (u32, u32, f64) {
    if max_bits <= min_bits {
        return (min_bits, min_bits, 1.0);
    }
    let lo = (p.floor().max(min_bits as f64) as u32).min(max_bits - 1);
    let r = (1.0 - (p - lo as f64)).clamp(0.0, 1.0);
    (lo, lo + 1, r)
}

/// Dequantize every quantized linear of `model` at `min_bits..=max_bits[g]` (g in model order).
pub fn dequantize_all(
    model: &Model,
    min_bits: u32,
    max_bits: &[u32],
) -> Result<Vec<LinearWeights>> {
    let specs = model.config.linears();
    ensure!(
        specs.len() == max_bits.len(),
        "{} linears but {} maximum precisions",
        specs.len(),
        max_bits.len()
    );
    let mut out = Vec::with_capacity(specs.len());
    let lins = model
        .blocks
        .iter()
        .flat_map(|b| b.linears().into_iter().enumerate());
    for ((spec, (index, (_, lin))), &m) in specs.iter().zip(lins).zip(max_bits) {
        let q = lin.as_anyprec().ok_or_else(|| {
            anyhow::anyhow!(
                "{} is not quantized: calibrate needs a dpllm any-precision model",
                spec.prefix
            )
        })?;
        ensure!(
            q.seed_bits() <= min_bits && m <= q.max_bits(),
            "{} holds {}..={} bits, calibration needs {min_bits}..={m}",
            spec.prefix,
            q.seed_bits(),
            q.max_bits()
        );
        out.push(LinearWeights {
            name: spec.prefix.clone(),
            layer: spec.layer,
            index,
            kind: spec.kind,
            rows: spec.rows,
            cols: spec.cols,
            min_bits,
            max_bits: m,
            w: (min_bits..=m).map(|b| q.dequantize(b)).collect(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_precision_brackets_p() {
        assert_eq!(split_precision(3.25, 3, 6), (3, 4, 0.75));
        assert_eq!(split_precision(4.0, 3, 6), (4, 5, 1.0));
        assert_eq!(split_precision(6.0, 3, 6), (5, 6, 0.0));
        assert_eq!(split_precision(3.0, 3, 3), (3, 3, 1.0));
        assert_eq!(split_precision(2.5, 3, 5), (3, 4, 1.0));
    }
}
