//! A bit-plane weight read at two of its precisions at once, straight from
//! the planes (`kernels/bitplane_levels.cu`): what calibration (issue #11)
//! needs of a layer without holding each precision dequantized as f32. The
//! pair is read from a table in device memory, so a recorded CUDA graph of
//! these launches serves every fine-tuning step.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig};

use super::bitplane::CudaAnyPrec;
use super::device_err;
use crate::error::{EngineError, Result};

/// Most warps a block: a warp takes a row's 128-column blocks in turn.
const MAX_WARPS: usize = 8;

impl CudaAnyPrec {
    /// One launch's grid: a block a row (the kernels loop over more rows
    /// than blocks), a warp a 128-column block of it, up to [`MAX_WARPS`],
    /// and as many blocks as fill every SM's 2048 threads.
    fn row_grid(&self, kbs: i32) -> LaunchConfig {
        let warps = (kbs as usize).clamp(1, MAX_WARPS);
        let most = 2048 / (32 * warps) * self.device().multiprocessors();
        LaunchConfig {
            grid_dim: (self.rows().clamp(1, most) as u32, 1, 1),
            block_dim: (32 * warps as u32, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// `out` = a·W_lo + b·W_hi as f32 [rows × cols] (lo ≤ hi, both held).
    /// The pair goes to the device first: for one-off use; a step reads
    /// its pairs from a table ([`CudaAnyPrec::mix_pair`]).
    pub fn mix_into(
        &self,
        lo: u32,
        a: f32,
        hi: u32,
        b: f32,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        self.check_pair("mix", lo, hi)?;
        let stream = self.device().stream();
        self.mix_pair(stream, &self.one_pair(lo, hi, a, b)?, 0, out)
    }

    /// `out` = a·W_lo + b·W_hi of pair `slot` of `pairs` ([`PAIR_WORDS`]
    /// f32 a pair: lo, hi, a, b), read on the device: NaN where the pair is
    /// not one this weight holds (lo ≤ hi). Queued on `stream` (of this
    /// weight's device), which must see `pairs` and `out` ready.
    pub fn mix_pair(
        &self,
        stream: &Arc<CudaStream>,
        pairs: &CudaSlice<f32>,
        slot: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        self.check_len("mix", out.len())?;
        let pair = self.pair_at(stream, "mix", pairs, slot)?;
        self.launch_pair(stream, pair, PairOp::Mix(out))
    }

    /// `sums[slot]` += Σ g·(W_hi − W_lo) over the weight, summed in f64
    /// (g: f32 [rows × cols]; lo ≤ hi, both held); for one-off use as
    /// [`CudaAnyPrec::mix_into`].
    pub fn dot_diff(
        &self,
        g: &CudaSlice<f32>,
        hi: u32,
        lo: u32,
        sums: &mut CudaSlice<f64>,
        slot: usize,
    ) -> Result<()> {
        self.check_pair("dot_diff", lo, hi)?;
        let stream = self.device().stream();
        self.dot_diff_pair(stream, g, &self.one_pair(lo, hi, 0.0, 0.0)?, 0, sums, slot)
    }

    /// `sums[sum_slot]` += Σ g·(W_hi − W_lo) of pair `slot` of `pairs`
    /// (as [`CudaAnyPrec::mix_pair`]; NaN where it is not held).
    pub fn dot_diff_pair(
        &self,
        stream: &Arc<CudaStream>,
        g: &CudaSlice<f32>,
        pairs: &CudaSlice<f32>,
        slot: usize,
        sums: &mut CudaSlice<f64>,
        sum_slot: usize,
    ) -> Result<()> {
        self.check_len("dot_diff", g.len())?;
        let pair = self.pair_at(stream, "dot_diff", pairs, slot)?;
        if sum_slot >= sums.len() {
            return Err(EngineError::Device(format!(
                "dot_diff: sum {sum_slot} of {}",
                sums.len()
            )));
        }
        let (at, _record) = sums.device_ptr_mut(stream);
        let out = at + (sum_slot * std::mem::size_of::<f64>()) as u64;
        self.launch_pair(stream, pair, PairOp::DotDiff(g, out))
    }

    fn check_pair(&self, what: &str, lo: u32, hi: u32) -> Result<()> {
        if lo > hi {
            return Err(EngineError::Device(format!(
                "{what}: the lower precision {lo} is above the higher {hi}"
            )));
        }
        self.level_args(lo)?;
        self.level_args(hi).map(|_| ())
    }

    fn check_len(&self, what: &str, len: usize) -> Result<()> {
        if len != self.rows() * self.cols() {
            return Err(EngineError::Device(format!(
                "{what}: {len} values for a {}x{} weight",
                self.rows(),
                self.cols()
            )));
        }
        Ok(())
    }

    /// A table of one pair, on the device.
    fn one_pair(&self, lo: u32, hi: u32, a: f32, b: f32) -> Result<CudaSlice<f32>> {
        (self
            .device()
            .stream()
            .clone_htod(&pair_words(lo, hi, a, b)[..]))
        .map_err(device_err("copying a precision pair"))
    }

    /// The device address of pair `slot` of `pairs`, checked.
    fn pair_at(
        &self,
        stream: &Arc<CudaStream>,
        what: &str,
        pairs: &CudaSlice<f32>,
        slot: usize,
    ) -> Result<u64> {
        if PAIR_WORDS * (slot + 1) > pairs.len() {
            return Err(EngineError::Device(format!(
                "{what}: precision pair {slot} of {}",
                pairs.len() / PAIR_WORDS
            )));
        }
        let (at, _record) = pairs.device_ptr(stream);
        Ok(at + (PAIR_WORDS * 4 * slot) as u64)
    }

    /// Launch `op`'s kernel on the pair at device address `pair`.
    fn launch_pair(&self, stream: &Arc<CudaStream>, pair: u64, mut op: PairOp<'_>) -> Result<()> {
        let (planes, stride, _, kbs) = self.level_args(self.max_bits())?;
        // The LUT at 3..=8 bits, 0 where not held.
        let luts: Vec<u64> = (3..=8)
            .map(|b| match self.level_args(b) {
                Ok((_, _, lut, _)) => lut.device_ptr(stream).0,
                Err(_) => 0,
            })
            .collect();
        let name = match op {
            PairOp::Mix(..) => "bitplane_mix",
            PairOp::DotDiff(..) => "bitplane_dot_diff",
        };
        let f = self.device().bitplane_kernels()?.get(name)?;
        let (r, c) = (self.rows() as i32, self.cols() as i32);
        let mut launch = super::launch::Launch::new(&f, stream, self.device().pdl());
        launch.arg(planes).arg(&stride);
        for l in &luts {
            launch.arg(l);
        }
        launch.arg(&r).arg(&c).arg(&kbs).arg(&pair);
        match &mut op {
            PairOp::Mix(out) => launch.arg(&**out),
            PairOp::DotDiff(g, out) => launch.arg(*g).arg(&*out),
        };
        // SAFETY: the arguments match the kernels' signatures
        // (`kernels/bitplane_levels.cu`): the planes, the LUTs this weight
        // holds (null for the others, which the kernels refuse), a pair
        // within its table (pair_at), and rows × cols values of `out` / `g`
        // (checked by the callers); the dot product adds to one f64 within
        // its sums (checked).
        unsafe { launch.launch(self.row_grid(kbs)) }
            .map_err(device_err("launching a two-precision kernel"))?;
        Ok(())
    }
}

/// f32 a precision pair takes in the tables the two-precision kernels read
/// ([`pair_words`]).
pub const PAIR_WORDS: usize = 4;

/// A precision pair as the two-precision kernels read it, here and in the
/// gradient crate's `grad.cu`: lo, hi (exact in f32), a, b.
pub fn pair_words(lo: u32, hi: u32, a: f32, b: f32) -> [f32; PAIR_WORDS] {
    [lo as f32, hi as f32, a, b]
}

/// What a two-precision kernel does with the weights.
enum PairOp<'a> {
    /// a·W_lo + b·W_hi into the buffer.
    Mix(&'a mut CudaSlice<f32>),
    /// Σ g·(W_hi − W_lo) added to the f64 at this device address.
    DotDiff(&'a CudaSlice<f32>, u64),
}

#[cfg(test)]
mod tests {
    #[test]
    fn pair_words_are_lo_hi_a_b() {
        assert_eq!(super::pair_words(4, 5, 0.25, 0.75), [4.0, 5.0, 0.25, 0.75]);
    }
}
