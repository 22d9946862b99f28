//! A bit-plane weight read at two of its precisions at once, straight from
//! the planes (`kernels/bitplane_levels.cu`): what calibration (issue #11)
//! needs of a layer without holding each precision dequantized as f32.

use cudarc::driver::{CudaSlice, DevicePtrMut, LaunchConfig, PushKernelArg};

use super::bitplane::CudaAnyPrec;
use super::device_err;
use crate::error::{EngineError, Result};

/// Threads of a block.
const THREADS: usize = 256;

impl CudaAnyPrec {
    /// One launch's grid: a thread per 4 columns of a row (32 a block of `kbs`
    /// 128-column blocks), at most 8 blocks an SM (the kernels loop over the rest).
    fn quad_grid(&self, kbs: i32) -> LaunchConfig {
        let quads = self.rows() * kbs as usize * 32;
        let most = 8 * self.device().multiprocessors();
        LaunchConfig {
            grid_dim: (quads.div_ceil(THREADS).clamp(1, most) as u32, 1, 1),
            block_dim: (THREADS as u32, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    fn check_pair(&self, what: &str, lo: u32, hi: u32, len: usize) -> Result<()> {
        if lo > hi {
            return Err(EngineError::Device(format!(
                "{what}: the lower precision {lo} is above the higher {hi}"
            )));
        }
        if len != self.rows() * self.cols() {
            return Err(EngineError::Device(format!(
                "{what}: {len} values for a {}x{} weight",
                self.rows(),
                self.cols()
            )));
        }
        Ok(())
    }

    /// `out` = a·W_lo + b·W_hi as f32 [rows × cols] (lo ≤ hi, both held).
    pub fn mix_into(
        &self,
        lo: u32,
        a: f32,
        hi: u32,
        b: f32,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        self.check_pair("mix", lo, hi, out.len())?;
        self.launch_pair(lo, hi, PairOp::Mix(a, b, out))
    }

    /// `sums[slot]` += Σ g·(W_hi − W_lo) over the weight, summed in f64
    /// (g: f32 [rows × cols]; lo ≤ hi, both held).
    pub fn dot_diff(
        &self,
        g: &CudaSlice<f32>,
        hi: u32,
        lo: u32,
        sums: &mut CudaSlice<f64>,
        slot: usize,
    ) -> Result<()> {
        self.check_pair("dot_diff", lo, hi, g.len())?;
        if slot >= sums.len() {
            return Err(EngineError::Device(format!(
                "dot_diff: sum {slot} of {}",
                sums.len()
            )));
        }
        let (at, _record) = sums.device_ptr_mut(self.device().stream());
        let out = at + (slot * std::mem::size_of::<f64>()) as u64;
        self.launch_pair(lo, hi, PairOp::DotDiff(g, out))
    }

    /// Launch `op`'s kernel on the pair (lo, hi), checked by the caller.
    fn launch_pair(&self, lo: u32, hi: u32, mut op: PairOp<'_>) -> Result<()> {
        let (planes, stride, lut_hi, kbs) = self.level_args(hi)?;
        let (_, _, lut_lo, _) = self.level_args(lo)?;
        let name = match op {
            PairOp::Mix(..) => "bitplane_mix",
            PairOp::DotDiff(..) => "bitplane_dot_diff",
        };
        let f = self.device().bitplane_kernels()?.get(name)?;
        let (l, h, r, c) = (lo as i32, hi as i32, self.rows() as i32, self.cols() as i32);
        let mut launch = self.device().stream().launch_builder(&f);
        launch
            .arg(planes)
            .arg(&stride)
            .arg(lut_lo)
            .arg(lut_hi)
            .arg(&l)
            .arg(&h)
            .arg(&r)
            .arg(&c)
            .arg(&kbs);
        match &mut op {
            PairOp::Mix(a, b, out) => launch.arg(&*a).arg(&*b).arg(&mut **out),
            PairOp::DotDiff(g, out) => launch.arg(*g).arg(&*out),
        };
        // SAFETY: the arguments match the kernels' signatures
        // (`kernels/bitplane_levels.cu`); they read the planes and LUTs of
        // precisions this weight holds (level_args checks), and rows × cols
        // values of `out` / `g` (their lengths, checked by the callers); the
        // dot product adds to one f64 within its sums (slot checked).
        unsafe { launch.launch(self.quad_grid(kbs)) }
            .map_err(device_err("launching a two-precision kernel"))?;
        Ok(())
    }
}

/// What a two-precision kernel does with the weights.
enum PairOp<'a> {
    /// a·W_lo + b·W_hi into the buffer.
    Mix(f32, f32, &'a mut CudaSlice<f32>),
    /// Σ g·(W_hi − W_lo) added to the f64 at this device address.
    DotDiff(&'a CudaSlice<f32>, u64),
}
