//! Bit-plane weights on the GPU and their GEMV (`kernels/bitplane_gemv.cu`):
//! 1 to 8 tokens at any precision from the seed to the highest held, reading
//! only that many planes and the LUTs of that precision.

use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaSlice, LaunchConfig, PushKernelArg};
use rayon::prelude::*;

use super::{device_err, CudaDevice};
use crate::backend::AnyPrecHost;
use crate::error::{EngineError, Result};

/// The kernels' source.
const SOURCE: &str = include_str!("kernels/bitplane_gemv.cu");
/// Threads per block.
const BLOCK: u32 = 256;
/// Most tokens one launch takes.
pub const MAX_TOKENS: usize = 8;

/// `SPREAD[b]` has bit i of `b` at bit 4i.
const SPREAD: [u32; 256] = {
    let mut t = [0u32; 256];
    let mut b = 0;
    while b < 256 {
        let mut i = 0;
        while i < 8 {
            t[b] |= ((b as u32 >> i) & 1) << (4 * i);
            i += 1;
        }
        b += 1;
    }
    t
};

/// A stored plane word (bit t = column t) in the device order: bit 4i + k holds
/// column 8k + i, so the kernel's nibble transpose yields 8 consecutive columns
/// for each k.
pub fn device_word(w: u32) -> u32 {
    (0..4).fold(0, |r, k| r | SPREAD[((w >> (8 * k)) & 0xff) as usize] << k)
}

/// An any-precision weight in GPU memory.
pub struct CudaAnyPrec {
    rows: usize,
    cols: usize,
    words: usize,
    seed_bits: u32,
    max_bits: u32,
    /// [max_bits][rows / 4][words][4] device words, rows padded to a multiple of 4.
    planes: CudaSlice<u32>,
    /// luts[b − seed_bits]: [rows padded][2^b] f16 bits.
    luts: Vec<CudaSlice<u16>>,
    device: Arc<CudaDevice>,
}

impl CudaAnyPrec {
    /// Copy `w` to the GPU in the kernel's layout.
    pub fn upload(device: &Arc<CudaDevice>, w: &AnyPrecHost) -> Result<CudaAnyPrec> {
        let (rows, words) = (w.rows, w.cols.div_ceil(32));
        let groups = rows.div_ceil(4);
        let planes_n = w.max_bits as usize;
        let mut host = vec![0u32; planes_n * groups * words * 4];
        host.par_chunks_mut(words * 4)
            .enumerate()
            .for_each(|(jg, out)| {
                let (j, g) = (jg / groups, jg % groups);
                for q in 0..4.min(rows - 4 * g) {
                    let src = &w.planes[(j * rows + 4 * g + q) * words..][..words];
                    for (wi, &v) in src.iter().enumerate() {
                        out[wi * 4 + q] = device_word(v);
                    }
                }
            });
        let stream = device.stream();
        let planes = stream
            .clone_htod(&host)
            .map_err(device_err("copying bit-planes to the GPU"))?;
        let luts = w
            .luts
            .iter()
            .map(|l| {
                let mut bits: Vec<u16> = l.iter().map(|v| v.to_bits()).collect();
                bits.resize(groups * 4 * (l.len() / rows.max(1)), 0);
                stream
                    .clone_htod(&bits)
                    .map_err(device_err("copying LUTs to the GPU"))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(CudaAnyPrec {
            rows,
            cols: w.cols,
            words,
            seed_bits: w.seed_bits,
            max_bits: w.max_bits,
            planes,
            luts,
            device: device.clone(),
        })
    }

    /// A second copy in GPU memory (benchmarks cycle through copies so the L2
    /// cache cannot hold the weights).
    pub fn replicate(&self) -> Result<CudaAnyPrec> {
        let s = self.device.stream();
        let copy_err = device_err("copying a weight on the GPU");
        Ok(CudaAnyPrec {
            planes: s.clone_dtod(&self.planes).map_err(copy_err)?,
            luts: self
                .luts
                .iter()
                .map(|l| {
                    s.clone_dtod(l)
                        .map_err(device_err("copying LUTs on the GPU"))
                })
                .collect::<Result<_>>()?,
            device: self.device.clone(),
            ..*self
        })
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes one GEMV at `bits` reads: `bits` planes and that precision's LUTs.
    pub fn bytes_at(&self, bits: u32) -> usize {
        let groups = self.rows.div_ceil(4);
        groups * 4 * (self.words * 4 * bits as usize + 2 << bits)
    }

    /// The kernel for `bits` and `tokens`.
    fn kernel(&self, bits: u32, tokens: usize) -> Result<CudaFunction> {
        let d = &self.device;
        let m = d.module(&d.bitplane, "bitplane_gemv", SOURCE)?;
        m.load_function(&format!("bitplane_gemv_b{bits}_t{tokens}"))
            .map_err(device_err("finding the bit-plane GEMV kernel"))
    }

    /// `y [n × rows] = x [n × cols] · W_bᵀ` at `bits`, for n ≤ [`MAX_TOKENS`],
    /// queued on the device's stream.
    pub fn gemv(
        &self,
        x: &CudaSlice<f32>,
        n: usize,
        bits: u32,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        if bits < self.seed_bits || bits > self.max_bits {
            return Err(EngineError::Bits(format!(
                "{bits} bits is outside the loaded range {}..={}",
                self.seed_bits, self.max_bits
            )));
        }
        if n == 0 || n > MAX_TOKENS || x.len() < n * self.cols || y.len() < n * self.rows {
            return Err(EngineError::Device(format!(
                "bit-plane GEMV: {n} tokens (1..={MAX_TOKENS}) with {} inputs and {} outputs \
                 do not fit a {}x{} weight",
                x.len(),
                y.len(),
                self.rows,
                self.cols
            )));
        }
        let f = self.kernel(bits, n)?;
        // Threads per row group: a power of two from 32 to 256, about one word each.
        let tpr = self.words.next_power_of_two().clamp(32, BLOCK as usize) as u32;
        let gpb = BLOCK / tpr;
        let groups = self.rows.div_ceil(4) as u32;
        let smem = (gpb as usize * 4 << bits) * 4 + (BLOCK as usize / 32) * 4 * n * 4;
        let cfg = LaunchConfig {
            grid_dim: (groups.div_ceil(gpb), 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let plane_stride = (self.rows.div_ceil(4) * self.words) as i64;
        let (xs, ys) = (self.cols as i32, self.rows as i32);
        let (rows, cols, words, tpr) = (
            self.rows as i32,
            self.cols as i32,
            self.words as i32,
            tpr as i32,
        );
        let luts = &self.luts[(bits - self.seed_bits) as usize];
        let mut b = self.device.stream().launch_builder(&f);
        b.arg(&self.planes)
            .arg(&plane_stride)
            .arg(luts)
            .arg(x)
            .arg(&xs)
            .arg(y)
            .arg(&ys)
            .arg(&rows)
            .arg(&cols)
            .arg(&words)
            .arg(&tpr);
        // SAFETY: the arguments match the kernel's signature in order and type;
        // the buffers hold what the kernel reads and writes (checked above and
        // by the upload's layout).
        unsafe { b.launch(cfg) }.map_err(device_err("launching the bit-plane GEMV"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_words_put_eight_consecutive_columns_on_each_residue() {
        for c in 0..32 {
            let d = device_word(1 << c);
            let (k, i) = (c / 8, c % 8);
            assert_eq!(d, 1 << (4 * i + k), "column {c}");
        }
        assert_eq!(device_word(u32::MAX), u32::MAX);
    }
}
