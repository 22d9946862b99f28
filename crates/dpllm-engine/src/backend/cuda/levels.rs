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
    /// One launch's grid: a thread per 4 columns of a row, at most 8 blocks an SM
    /// (the kernels loop over the rest).
    fn quad_grid(&self) -> LaunchConfig {
        let quads = self.rows() * self.cols().div_ceil(128) * 32;
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
        let (planes, stride, lut_hi, kbs) = self.level_args(hi)?;
        let (_, _, lut_lo, _) = self.level_args(lo)?;
        let f = self.device().bitplane_kernels()?.get("bitplane_mix")?;
        let (l, h, r, c) = (lo as i32, hi as i32, self.rows() as i32, self.cols() as i32);
        let mut launch = self.device().stream().launch_builder(&f);
        launch
            .arg(planes)
            .arg(&stride)
            .arg(lut_lo)
            .arg(lut_hi)
            .arg(&l)
            .arg(&h)
            .arg(&a)
            .arg(&b)
            .arg(out)
            .arg(&r)
            .arg(&c)
            .arg(&kbs);
        // SAFETY: the arguments match bitplane_mix's signature; it writes
        // rows × cols values of `out` (its length, checked above) and reads the
        // planes and LUTs of precisions this weight holds (checked above).
        unsafe { launch.launch(self.quad_grid()) }.map_err(device_err("launching bitplane_mix"))?;
        Ok(())
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
        let (planes, stride, lut_hi, kbs) = self.level_args(hi)?;
        let (_, _, lut_lo, _) = self.level_args(lo)?;
        let f = self.device().bitplane_kernels()?.get("bitplane_dot_diff")?;
        let (l, h, r, c) = (lo as i32, hi as i32, self.rows() as i32, self.cols() as i32);
        let stream = self.device().stream();
        let (at, _record) = sums.device_ptr_mut(stream);
        let out = at + (slot * std::mem::size_of::<f64>()) as u64;
        let mut launch = stream.launch_builder(&f);
        launch
            .arg(planes)
            .arg(&stride)
            .arg(lut_lo)
            .arg(lut_hi)
            .arg(&l)
            .arg(&h)
            .arg(g)
            .arg(&r)
            .arg(&c)
            .arg(&kbs)
            .arg(&out);
        // SAFETY: the arguments match bitplane_dot_diff's signature; it reads
        // rows × cols values of `g` (its length, checked above) and the planes
        // and LUTs of held precisions, and adds to the one f64 at `out`, within
        // `sums` (slot checked above).
        unsafe { launch.launch(self.quad_grid()) }
            .map_err(device_err("launching bitplane_dot_diff"))?;
        Ok(())
    }
}
