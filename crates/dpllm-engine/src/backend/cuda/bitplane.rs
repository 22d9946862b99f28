//! Bit-plane weights on the GPU and their GEMV (`kernels/bitplane_gemv.cu`):
//! 1 to 8 tokens at any precision from the seed to the highest held, reading
//! only that many planes and the LUTs of that precision.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, LaunchConfig, PushKernelArg};
use rayon::prelude::*;

use super::{device_err, CudaDevice};
use crate::backend::AnyPrecHost;
use crate::error::{EngineError, Result};

/// The kernels' source.
pub const SOURCE: &str = concat!(
    include_str!("kernels/common.cuh"),
    include_str!("kernels/bitplane_gemv.cu")
);
/// Threads per block.
const BLOCK: u32 = 256;
/// Most tokens one launch takes.
pub const MAX_TOKENS: usize = 8;

/// One row of one plane in the device order: device word w holds the columns
/// (8k + i)·W + w at bit 4i + k (W = words a row), so lanes taking consecutive
/// words read consecutive activations and the kernel's nibble transpose yields,
/// for each k, the column slots 8k..8k+7.
pub fn device_row(stored: &[u32], cols: usize, out: &mut [u32]) {
    let words = out.len();
    for (w, o) in out.iter_mut().enumerate() {
        *o = (0..32).fold(0u32, |d, b| {
            let c = b * words + w;
            let bit = if c < cols {
                (stored[c / 32] >> (c % 32)) & 1
            } else {
                0
            };
            d | bit << (4 * (b % 8) + b / 8)
        });
    }
}

/// Bytes a `rows × cols` layer holding precisions `seed..=keep` takes in GPU
/// memory: `keep` planes in the kernel's layout (rows padded to 4) and one f16
/// LUT per precision.
pub fn device_bytes(rows: usize, cols: usize, seed: u32, keep: u32) -> usize {
    let (words, padded) = (cols.div_ceil(32), rows.div_ceil(4) * 4);
    let luts: usize = (seed..=keep).map(|b| padded * (2usize << b)).sum();
    padded * words * 4 * keep as usize + luts
}

/// How a GEMV launch splits the work: `row_groups` groups of 4 rows a thread
/// (more reuse each activation load, fewer threads) and the threads that share
/// a set of row groups (`None`: about 1024 threads per multiprocessor,
/// at most one per word).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GemvVariant {
    /// Row groups of 4 rows a thread takes.
    pub row_groups: usize,
    /// Threads per set of row groups (32..=256, a power of two), or the default.
    pub threads_per_set: Option<u32>,
}

impl GemvVariant {
    /// The default for `n` tokens at `bits` on a layer of `rows` rows, from
    /// measurements on an H100 (docs/benchmarks.md): two row groups a thread
    /// at 1-2 tokens and up to 4 bits on layers of 2048 rows or more, else one
    /// (above 4 bits the high nibbles double the registers a row group takes).
    pub fn default_for(n: usize, bits: u32, rows: usize) -> GemvVariant {
        GemvVariant {
            row_groups: if n <= 2 && bits <= 4 && rows >= 2048 {
                2
            } else {
                1
            },
            threads_per_set: None,
        }
    }

    /// Every variant compiled for `n` tokens, with the default threads per set.
    pub fn all(n: usize) -> Vec<GemvVariant> {
        let groups: &[usize] = match n {
            1 => &[1, 2, 4],
            2 => &[1, 2],
            _ => &[1],
        };
        groups
            .iter()
            .map(|&row_groups| GemvVariant {
                row_groups,
                threads_per_set: None,
            })
            .collect()
    }

    /// "g2", "g2 t64".
    pub fn name(&self) -> String {
        match self.threads_per_set {
            Some(t) => format!("g{} t{t}", self.row_groups),
            None => format!("g{}", self.row_groups),
        }
    }

    /// The kernel's name at `bits` and `n` tokens.
    fn kernel(&self, bits: u32, n: usize) -> String {
        format!("bitplane_gemv_b{bits}_t{n}_g{}", self.row_groups)
    }
}

/// Threads per set of row groups, a power of two from 32 to 256: as few as
/// still give the GPU about 1024 threads per multiprocessor (each then takes
/// several words of its rows), and no more than one per word.
fn threads_per_group(groups: usize, words: usize, sms: usize) -> u32 {
    let want = (sms * 1024).div_ceil(groups.max(1)).next_power_of_two();
    want.min(words.next_power_of_two())
        .clamp(32, BLOCK as usize) as u32
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
        let luts_fit = w.luts.len() == (w.max_bits + 1).saturating_sub(w.seed_bits) as usize
            && w.luts
                .iter()
                .zip(w.seed_bits..)
                .all(|(l, b)| l.len() == rows << b);
        if rows == 0
            || w.cols == 0
            || !(3..=8).contains(&w.seed_bits)
            || w.seed_bits > w.max_bits
            || w.max_bits > 8
            || w.planes.len() != planes_n * rows * words
            || !luts_fit
        {
            return Err(EngineError::Device(format!(
                "a {rows}x{} weight with precisions {}..={}, {} plane words and {} LUTs \
                 does not hold together",
                w.cols,
                w.seed_bits,
                w.max_bits,
                w.planes.len(),
                w.luts.len()
            )));
        }
        let mut host = vec![0u32; planes_n * groups * words * 4];
        host.par_chunks_mut(words * 4)
            .enumerate()
            .for_each(|(jg, out)| {
                let (j, g) = (jg / groups, jg % groups);
                let mut row = vec![0u32; words];
                for q in 0..4.min(rows - 4 * g) {
                    let src = &w.planes[(j * rows + 4 * g + q) * words..][..words];
                    device_row(src, w.cols, &mut row);
                    for (wi, &v) in row.iter().enumerate() {
                        out[wi * 4 + q] = v;
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

    /// A layer of `rows × cols` at precisions 3..=`max_bits` whose planes and
    /// LUTs are left for the caller to fill (in the kernel's layout), with the
    /// buffers to fill: (planes, LUTs at 3..=max_bits).
    pub(crate) fn uninit(
        device: &Arc<CudaDevice>,
        rows: usize,
        cols: usize,
        max_bits: u32,
    ) -> Result<CudaAnyPrec> {
        if rows == 0 || cols == 0 || !(3..=8).contains(&max_bits) {
            return Err(EngineError::Device(format!(
                "a {rows}x{cols} weight at 3..={max_bits} bits"
            )));
        }
        let (words, groups) = (cols.div_ceil(32), rows.div_ceil(4));
        let s = device.stream();
        let oom = |bytes: usize| {
            move |_| EngineError::OutOfMemory {
                what: "bit-planes (GPU)",
                bytes,
            }
        };
        let n = max_bits as usize * groups * words * 4;
        // SAFETY: filled by the caller before any read.
        let planes = unsafe { s.alloc::<u32>(n) }.map_err(oom(4 * n))?;
        let luts = (3..=max_bits)
            .map(|b| {
                let n = (groups * 4) << b;
                // SAFETY: as above.
                unsafe { s.alloc::<u16>(n) }.map_err(oom(2 * n))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(CudaAnyPrec {
            rows,
            cols,
            words,
            seed_bits: 3,
            max_bits,
            planes,
            luts,
            device: device.clone(),
        })
    }

    /// The planes and LUTs, to fill ([`CudaAnyPrec::uninit`]).
    pub(crate) fn buffers_mut(&mut self) -> (&mut CudaSlice<u32>, &mut [CudaSlice<u16>]) {
        (&mut self.planes, &mut self.luts)
    }

    /// The weight at `bits` as f32 [rows × cols] into `out` (long batches run
    /// as one GEMM on it).
    pub fn dequantize_into(&self, bits: u32, out: &mut CudaSlice<f32>) -> Result<()> {
        crate::backend::check_bits_in(bits, self.seed_bits, self.max_bits)
            .map_err(EngineError::Bits)?;
        if out.len() < self.rows * self.cols {
            return Err(EngineError::Device(format!(
                "dequantize: {} floats for a {}x{} weight",
                out.len(),
                self.rows,
                self.cols
            )));
        }
        let f = self.device.bitplane_kernels()?.get("bitplane_dequant")?;
        let plane_stride = (self.rows.div_ceil(4) * self.words) as i64;
        let (b, r, c, w) = (
            bits as i32,
            self.rows as i32,
            self.cols as i32,
            self.words as i32,
        );
        let total = self.rows * self.words;
        let cfg = LaunchConfig {
            grid_dim: (total.div_ceil(BLOCK as usize).clamp(1, 65535) as u32, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let luts = &self.luts[(bits - self.seed_bits) as usize];
        let mut l = self.device.stream().launch_builder(&f);
        l.arg(&self.planes)
            .arg(&plane_stride)
            .arg(luts)
            .arg(&b)
            .arg(out)
            .arg(&r)
            .arg(&c)
            .arg(&w);
        // SAFETY: the arguments match bitplane_dequant's signature; it writes
        // rows × cols floats (checked above) and reads the planes and LUT of
        // `bits` (held: checked above).
        unsafe { l.launch(cfg) }.map_err(device_err("launching the bit-plane dequantization"))?;
        Ok(())
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
        groups * 4 * (self.words * 4 * bits as usize + (2 << bits))
    }

    /// Threads per set of row groups of a launch.
    fn threads(&self, v: GemvVariant) -> u32 {
        let sets = self.rows.div_ceil(4).div_ceil(v.row_groups);
        v.threads_per_set
            .unwrap_or_else(|| threads_per_group(sets, self.words, self.device.multiprocessors()))
    }

    /// Bytes of shared memory a launch takes: up to 63 floats to align the
    /// tables to 256 bytes, the block's tables (16 floats a row up to 4 bits,
    /// 2^bits above) and the warps' partial sums.
    fn shared_bytes(&self, bits: u32, n: usize, v: GemvVariant) -> usize {
        let spb = (BLOCK / self.threads(v)) as usize;
        let row = if bits <= 4 { 16 } else { 1usize << bits };
        let sums = (4 * v.row_groups * n).next_power_of_two();
        (63 + spb * v.row_groups * 4 * row + (BLOCK as usize / 32) * sums) * 4
    }

    /// True when variant `v` is compiled for `n` tokens and its shared memory
    /// fits at `bits`.
    pub fn supports(&self, bits: u32, n: usize, v: GemvVariant) -> bool {
        let tpr_ok = v
            .threads_per_set
            .is_none_or(|t| t.is_power_of_two() && (32..=BLOCK).contains(&t));
        let base = GemvVariant {
            threads_per_set: None,
            ..v
        };
        tpr_ok && GemvVariant::all(n).contains(&base) && self.shared_bytes(bits, n, v) <= 48 << 10
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
        self.gemv_with(x, n, bits, y, GemvVariant::default_for(n, bits, self.rows))
    }

    /// [`CudaAnyPrec::gemv`] with a chosen [`GemvVariant`] (benchmarks, tests).
    pub fn gemv_with(
        &self,
        x: &CudaSlice<f32>,
        n: usize,
        bits: u32,
        y: &mut CudaSlice<f32>,
        v: GemvVariant,
    ) -> Result<()> {
        self.gemv_view(&x.slice(..), n, bits, &mut y.slice_mut(..), v, None)
    }

    /// [`CudaAnyPrec::gemv_with`] on views (a range of tokens of larger
    /// buffers); with `select = (mask, want)` only the tokens whose decision in
    /// `mask` (n values, 1 = high) equals `want` are computed and written.
    pub fn gemv_view(
        &self,
        x: &CudaView<f32>,
        n: usize,
        bits: u32,
        y: &mut CudaViewMut<f32>,
        v: GemvVariant,
        select: Option<(&CudaView<u32>, bool)>,
    ) -> Result<()> {
        crate::backend::check_bits_in(bits, self.seed_bits, self.max_bits)
            .map_err(EngineError::Bits)?;
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
        if !self.supports(bits, n, v) {
            return Err(EngineError::Device(format!(
                "bit-plane GEMV: no kernel {} for {n} tokens at {bits} bits",
                v.name()
            )));
        }
        let l = self.launch_shape(bits, n, v);
        let f = self.device.bitplane_kernels()?.get(&v.kernel(bits, n))?;
        let (xs, ys) = (self.cols as i32, self.rows as i32);
        if select.is_some_and(|(m, _)| m.len() < n) {
            return Err(EngineError::Device(format!(
                "bit-plane GEMV: fewer decisions than {n} tokens"
            )));
        }
        let luts = &self.luts[(bits - self.seed_bits) as usize];
        let (no_mask, want) = (0u64, select.map_or(0u32, |(_, w)| w as u32));
        let mut b = self.device.stream().launch_builder(&f);
        b.arg(&self.planes)
            .arg(&l.plane_stride)
            .arg(luts)
            .arg(x)
            .arg(&xs)
            .arg(y)
            .arg(&ys)
            .arg(&l.rows)
            .arg(&l.cols)
            .arg(&l.words)
            .arg(&l.tpr);
        match select {
            Some((m, _)) => b.arg(m),
            None => b.arg(&no_mask),
        };
        b.arg(&want);
        // SAFETY: the arguments match the kernel's signature in order and type;
        // the buffers hold what the kernel reads and writes (checked above and
        // by the upload's layout).
        unsafe { b.launch(l.cfg) }.map_err(device_err("launching the bit-plane GEMV"))?;
        Ok(())
    }

    /// True when [`CudaAnyPrec::gemv_select`] runs `low` and `low + 1` bits in one kernel.
    pub fn selects_in_kernel(&self, low: u32) -> bool {
        (3..=7).contains(&low) && self.seed_bits <= low && low < self.max_bits
    }

    /// `y = x · W_bᵀ` for one token, with b = `low + 1` when `a·||e|| + c >
    /// thr` and `low` otherwise, decided inside the kernel (DP-LLM's decision
    /// of the token, `e` the estimator's input); with `count = (c, slot)`,
    /// `c[slot]` gains 1 when the token goes high.
    #[allow(clippy::too_many_arguments)]
    pub fn gemv_select(
        &self,
        x: &CudaView<f32>,
        low: u32,
        e: &CudaView<f32>,
        (a, c, thr): (f32, f32, f32),
        count: Option<(&mut CudaViewMut<f32>, usize)>,
        y: &mut CudaViewMut<f32>,
    ) -> Result<()> {
        if !self.selects_in_kernel(low) || x.len() < self.cols || y.len() < self.rows {
            return Err(EngineError::Device(format!(
                "bit-plane GEMV: no in-kernel choice of {low} or {} bits for a {}x{} weight \
                 holding {}..={} bits, {} inputs and {} outputs",
                low + 1,
                self.rows,
                self.cols,
                self.seed_bits,
                self.max_bits,
                x.len(),
                y.len()
            )));
        }
        // One split for both precisions: the one the higher takes.
        let v = GemvVariant::default_for(1, low + 1, self.rows);
        if !self.supports(low + 1, 1, v) {
            return Err(EngineError::Device(format!(
                "bit-plane GEMV: no kernel {} at {} bits",
                v.name(),
                low + 1
            )));
        }
        let mut l = self.launch_shape(low + 1, 1, v);
        l.cfg.shared_mem_bytes = l
            .cfg
            .shared_mem_bytes
            .max(self.shared_bytes(low, 1, v) as u32);
        let name = format!("bitplane_gemv_select_b{low}_g{}", v.row_groups);
        let f = self.device.bitplane_kernels()?.get(&name)?;
        let lut = |b: u32| &self.luts[(b - self.seed_bits) as usize];
        let (ne, no_count) = (e.len() as i32, 0u64);
        let slot = count.as_ref().map_or(0, |c| c.1) as i32;
        let mut b = self.device.stream().launch_builder(&f);
        b.arg(&self.planes)
            .arg(&l.plane_stride)
            .arg(lut(low))
            .arg(lut(low + 1))
            .arg(x)
            .arg(y)
            .arg(&l.rows)
            .arg(&l.cols)
            .arg(&l.words)
            .arg(&l.tpr)
            .arg(e)
            .arg(&ne)
            .arg(&a)
            .arg(&c)
            .arg(&thr);
        match count {
            Some((counts, _)) => b.arg(counts),
            None => b.arg(&no_count),
        };
        b.arg(&slot);
        // SAFETY: as in `gemv_view`; `e` holds `ne` floats and `count` (when
        // given) at least `slot + 1`.
        unsafe { b.launch(l.cfg) }.map_err(device_err("launching the bit-plane GEMV"))?;
        Ok(())
    }

    /// The grid, shared memory and shape arguments of a GEMV launch.
    fn launch_shape(&self, bits: u32, n: usize, v: GemvVariant) -> LaunchShape {
        let sets = self.rows.div_ceil(4).div_ceil(v.row_groups);
        let tpr = self.threads(v);
        let spb = (BLOCK / tpr) as usize;
        LaunchShape {
            cfg: LaunchConfig {
                grid_dim: (sets.div_ceil(spb) as u32, 1, 1),
                block_dim: (BLOCK, 1, 1),
                shared_mem_bytes: self.shared_bytes(bits, n, v) as u32,
            },
            plane_stride: (self.rows.div_ceil(4) * self.words) as i64,
            rows: self.rows as i32,
            cols: self.cols as i32,
            words: self.words as i32,
            tpr: tpr as i32,
        }
    }
}

/// How one GEMV launch is shaped, with the arguments that say so.
struct LaunchShape {
    cfg: LaunchConfig,
    plane_stride: i64,
    rows: i32,
    cols: i32,
    words: i32,
    tpr: i32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_bytes_count_padded_rows_planes_and_every_lut() {
        // 6 rows pad to 8; 40 columns are 2 words; 3..=4 bits: 4 planes.
        assert_eq!(device_bytes(6, 40, 3, 4), 8 * 2 * 4 * 4 + 8 * 16 + 8 * 32);
        let w = AnyPrecHost::random(6, 40, 4, 1);
        let gpu = device_bytes(w.rows, w.cols, w.seed_bits, w.max_bits);
        assert!(gpu >= dpllm_format::anyprec::bytes_at(6, 40, 4));
    }

    #[test]
    fn defaults_follow_the_measurements() {
        assert_eq!(GemvVariant::default_for(1, 4, 14336).row_groups, 2);
        assert_eq!(GemvVariant::default_for(2, 3, 4096).row_groups, 2);
        assert_eq!(GemvVariant::default_for(1, 4, 1024).row_groups, 1);
        assert_eq!(GemvVariant::default_for(1, 6, 14336).row_groups, 1);
        assert_eq!(GemvVariant::default_for(8, 3, 14336).row_groups, 1);
        for n in 1..=MAX_TOKENS {
            for bits in 3..=8 {
                assert!(GemvVariant::all(n).contains(&GemvVariant::default_for(n, bits, 4096)));
            }
        }
    }

    #[test]
    fn threads_per_group_fill_the_gpu_without_idle_words() {
        // 132 multiprocessors (H100): 14336x4096 has 3584 groups of 128 words.
        assert_eq!(threads_per_group(3584, 128, 132), 64);
        assert_eq!(threads_per_group(1024, 128, 132), 128);
        assert_eq!(threads_per_group(1024, 448, 132), 256);
        assert_eq!(threads_per_group(256, 18, 132), 32);
        assert_eq!(threads_per_group(100_000, 128, 132), 32);
    }

    #[test]
    fn device_rows_interleave_columns_across_words() {
        // 3 words, 70 columns: column c sits in word c mod 3, slot c / 3.
        let cols = 70;
        for c in 0..cols {
            let mut stored = [0u32; 3];
            stored[c / 32] = 1 << (c % 32);
            let mut out = [0u32; 3];
            device_row(&stored, cols, &mut out);
            let (w, b) = (c % 3, c / 3);
            let mut want = [0u32; 3];
            want[w] = 1 << (4 * (b % 8) + b / 8);
            assert_eq!(out, want, "column {c}");
        }
    }
}
