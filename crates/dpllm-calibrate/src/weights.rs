//! Every quantized linear's weights at each precision a plan may use, shared
//! by precision fine-tuning and estimator calibration: held as the file's bit
//! planes and LUTs, dequantized on the host only where a pass asks
//! ([`LinearWeights::at`]), and read by the gradient backends through
//! [`WeightLevels`]: f32 copies of every precision ([`LevelsOn`], and the
//! CPU's cache), or on a GPU the planes themselves ([`PlanesOn`]), which an
//! 8B model needs (six f32 copies of its weights would take 170 GB).

use std::borrow::Cow;
use std::sync::OnceLock;

use anyhow::{ensure, Result};
use dpllm_engine::backend::AnyPrecHost;
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
    /// The planes and LUTs (up to the file's precisions).
    q: AnyPrecHost,
    /// W_b [rows × cols] as f32 for b = min_bits..=max_bits, one after
    /// another, made on first use by the CPU gradient backend
    /// ([`LinearWeights::levels`]).
    levels: OnceLock<Vec<f32>>,
}

impl LinearWeights {
    /// Parameter count.
    pub fn size(&self) -> usize {
        self.rows * self.cols
    }

    /// W at `bits`: the held f32 copy, or dequantized now.
    pub fn at(&self, bits: u32) -> Cow<'_, [f32]> {
        assert!(
            (self.min_bits..=self.max_bits).contains(&bits),
            "bits out of range"
        );
        match self.levels.get() {
            Some(l) => {
                Cow::Borrowed(&l[(bits - self.min_bits) as usize * self.size()..][..self.size()])
            }
            None => Cow::Owned(self.q.dequantize(bits)),
        }
    }

    /// W at every precision min_bits..=max_bits, one after another, as the
    /// CPU gradient backend reads them: dequantized and held on the first call.
    pub fn levels(&self) -> &Vec<f32> {
        self.levels.get_or_init(|| self.all_levels())
    }

    /// W at every precision, one after another, dequantized now.
    fn all_levels(&self) -> Vec<f32> {
        (self.min_bits..=self.max_bits)
            .flat_map(|b| self.q.dequantize(b))
            .collect()
    }

    /// W_{b+1} − W_b.
    pub fn delta(&self, b: u32) -> Vec<f32> {
        let (hi, lo) = (self.at(b + 1), self.at(b));
        hi.iter().zip(lo.iter()).map(|(h, l)| h - l).collect()
    }
}

/// How a gradient backend reads each linear's weight at a precision pair
/// ([`dpllm_grad::Pair`]: lo ≤ hi, both within the linear's `min_bits..=max_bits`),
/// the pair read from the backend's memory (so a recorded step replays with
/// new pairs).
pub trait WeightLevels<G: GradBackend> {
    /// `dst` = a·W_lo + b·W_hi of linear `g` (model order), pair `slot` of `pairs`.
    fn mix(&self, be: &G, g: usize, dst: &mut G::Buf, pairs: &G::Pairs, slot: usize) -> Result<()>;

    /// `sums[sum_slot]` += ⟨dw, W_hi − W_lo⟩ of linear `g`, pair `slot` of `pairs`.
    #[allow(clippy::too_many_arguments)]
    fn dot_diff(
        &self,
        be: &G,
        g: usize,
        dw: &G::Buf,
        pairs: &G::Pairs,
        slot: usize,
        sums: &mut G::Sums,
        sum_slot: usize,
    ) -> Result<()>;
}

/// Weights held as one buffer a linear, its precisions one after another,
/// read by the backend's own ops.
pub trait HeldLevels<B> {
    /// Every precision of linear `g`, and the lowest.
    fn held(&self, g: usize) -> (&B, u32);
}

impl<G: GradBackend, L: HeldLevels<G::Buf> + ?Sized> WeightLevels<G> for L {
    fn mix(&self, be: &G, g: usize, dst: &mut G::Buf, pairs: &G::Pairs, slot: usize) -> Result<()> {
        let (levels, min_bits) = self.held(g);
        be.mix(dst, levels, min_bits, pairs, slot)
    }

    fn dot_diff(
        &self,
        be: &G,
        g: usize,
        dw: &G::Buf,
        pairs: &G::Pairs,
        slot: usize,
        sums: &mut G::Sums,
        sum_slot: usize,
    ) -> Result<()> {
        let (levels, min_bits) = self.held(g);
        be.dot_diff(dw, levels, min_bits, pairs, slot, sums, sum_slot)
    }
}

/// On the CPU: each linear's f32 copies, made on first use.
impl HeldLevels<Vec<f32>> for [LinearWeights] {
    fn held(&self, g: usize) -> (&Vec<f32>, u32) {
        (self[g].levels(), self[g].min_bits)
    }
}

/// Every linear's weights at its precisions as f32, copied to a gradient
/// backend (a GPU): the fastest to read, six times the f32 model at 3..=8 bits.
pub struct LevelsOn<B> {
    min_bits: Vec<u32>,
    /// A buffer a linear: its precisions one after another.
    w: Vec<B>,
}

impl<B> LevelsOn<B> {
    /// The levels of `w` on `be` (dequantized on the host, a linear at a time).
    pub fn upload<G: GradBackend<Buf = B>>(be: &G, w: &[LinearWeights]) -> Result<LevelsOn<B>> {
        Ok(LevelsOn {
            min_bits: w.iter().map(|l| l.min_bits).collect(),
            w: (w.iter())
                .map(|l| match l.levels.get() {
                    Some(held) => be.upload(held),
                    None => be.upload(&l.all_levels()),
                })
                .collect::<Result<_>>()?,
        })
    }
}

/// Bytes [`LevelsOn`] takes for `w`: 4 a weight a precision.
pub fn f32_level_bytes(w: &[LinearWeights]) -> usize {
    (w.iter())
        .map(|l| 4 * l.size() * (l.max_bits - l.min_bits + 1) as usize)
        .sum()
}

impl<B> HeldLevels<B> for LevelsOn<B> {
    fn held(&self, g: usize) -> (&B, u32) {
        (&self.w[g], self.min_bits[g])
    }
}

/// Every linear's planes and LUTs on a GPU, each precision pair read from
/// them by the engine's kernels (`CudaAnyPrec::mix_pair`, `dot_diff_pair`): about
/// max_bits / 8 bytes a weight instead of [`LevelsOn`]'s 4 a weight a precision.
#[cfg(feature = "cuda")]
pub struct PlanesOn {
    w: Vec<dpllm_engine::backend::cuda::bitplane::CudaAnyPrec>,
}

#[cfg(feature = "cuda")]
impl PlanesOn {
    /// The planes of `w`'s linears on `be`'s GPU.
    pub fn upload(be: &dpllm_grad::cuda::CudaGrad, w: &[LinearWeights]) -> Result<PlanesOn> {
        use dpllm_engine::backend::cuda::bitplane::CudaAnyPrec;
        Ok(PlanesOn {
            w: (w.iter())
                .map(|l| CudaAnyPrec::upload(be.device(), &l.q))
                .collect::<std::result::Result<_, _>>()?,
        })
    }
}

#[cfg(feature = "cuda")]
impl WeightLevels<dpllm_grad::cuda::CudaGrad> for PlanesOn {
    fn mix(
        &self,
        be: &dpllm_grad::cuda::CudaGrad,
        g: usize,
        dst: &mut dpllm_engine::backend::cuda::cudarc::driver::CudaSlice<f32>,
        pairs: &dpllm_engine::backend::cuda::cudarc::driver::CudaSlice<f32>,
        slot: usize,
    ) -> Result<()> {
        let _p = be.span("planes_mix");
        Ok(self.w[g].mix_pair(be.stream(), pairs, slot, dst)?)
    }

    fn dot_diff(
        &self,
        be: &dpllm_grad::cuda::CudaGrad,
        g: usize,
        dw: &dpllm_engine::backend::cuda::cudarc::driver::CudaSlice<f32>,
        pairs: &dpllm_engine::backend::cuda::cudarc::driver::CudaSlice<f32>,
        slot: usize,
        sums: &mut dpllm_engine::backend::cuda::cudarc::driver::CudaSlice<f64>,
        sum_slot: usize,
    ) -> Result<()> {
        let _p = be.span("planes_dot_diff");
        Ok(self.w[g].dot_diff_pair(be.stream(), dw, pairs, slot, sums, sum_slot)?)
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

/// Every quantized linear of `model` (g in model order) with the precisions
/// `min_bits..=max_bits[g]` calibration uses; nothing is dequantized yet.
pub fn quantized_linears(
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
            q: q.to_host(),
            levels: OnceLock::new(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dpllm_grad::Pair;

    /// A linear of random planes holding 3..=6 bits (its file: up to 7).
    fn random_linear(rows: usize, cols: usize, seed: u64) -> LinearWeights {
        LinearWeights {
            name: "l".into(),
            layer: 0,
            index: 0,
            kind: LinearKind::Q,
            rows,
            cols,
            min_bits: 3,
            max_bits: 6,
            q: AnyPrecHost::random(rows, cols, 7, seed),
            levels: OnceLock::new(),
        }
    }

    /// The levels dequantized on demand, the ones held after the CPU's first
    /// read, and the ops the CPU backend runs on them agree with the
    /// engine's dequantization.
    #[test]
    fn levels_on_demand_held_and_mixed_agree() {
        use dpllm_engine::backend::cpu::AnyPrecLinear;
        let w = [random_linear(9, 70, 5), random_linear(4, 33, 6)];
        let engine = AnyPrecLinear::from_host(w[0].q.clone());
        let fresh: Vec<Vec<f32>> = (3..=6).map(|b| w[0].at(b).into_owned()).collect();
        for (b, f) in (3..=6).zip(&fresh) {
            assert_eq!(f, &engine.dequantize(b), "{b} bits on demand");
        }
        assert!(w[0].levels.get().is_none(), "at() holds nothing");
        assert_eq!(w[0].levels(), &fresh.concat());
        assert!(
            w[0].levels.get().is_some(),
            "levels() holds every precision"
        );
        assert_eq!(&*w[0].at(5), &fresh[2][..]);
        let d: Vec<f32> = fresh[1].iter().zip(&fresh[0]).map(|(h, l)| h - l).collect();
        assert_eq!(w[0].delta(3), d);
        let be = dpllm_grad::CpuGrad;
        let mut dst = vec![f32::NAN; 4 * 33];
        let p = |lo, hi, a, b| Pair { lo, hi, a, b };
        let pairs = vec![p(3, 4, 1.0, 0.0), p(3, 5, 0.25, 0.75), p(5, 7, 1.0, 1.0)];
        w.mix(&be, 1, &mut dst, &pairs, 1).unwrap();
        let (lo, hi) = (w[1].q.dequantize(3), w[1].q.dequantize(5));
        for (i, v) in dst.iter().enumerate() {
            assert!(
                (v - (0.25 * lo[i] + 0.75 * hi[i])).abs() <= 1e-6,
                "mix at {i}"
            );
        }
        let g: Vec<f32> = (0..4 * 33).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut sums = vec![0f64; 2];
        w.dot_diff(&be, 1, &g, &pairs, 1, &mut sums, 1).unwrap();
        let want: f64 = (0..g.len())
            .map(|i| g[i] as f64 * (hi[i] - lo[i]) as f64)
            .sum();
        assert!(sums[0] == 0.0 && (sums[1] - want).abs() <= 1e-9 * (1.0 + want.abs()));
        // A pair the linear does not hold (7 bits), or no such pair: errors.
        assert!(w.mix(&be, 1, &mut dst, &pairs, 2).is_err());
        assert!(w.dot_diff(&be, 1, &g, &pairs, 3, &mut sums, 1).is_err());
    }

    #[test]
    fn split_precision_brackets_p() {
        assert_eq!(split_precision(3.25, 3, 6), (3, 4, 0.75));
        assert_eq!(split_precision(4.0, 3, 6), (4, 5, 1.0));
        assert_eq!(split_precision(6.0, 3, 6), (5, 6, 0.0));
        assert_eq!(split_precision(3.0, 3, 3), (3, 3, 1.0));
        assert_eq!(split_precision(2.5, 3, 5), (3, 4, 1.0));
    }
}
