//! Bit-plane weights on the GPU and their GEMV (`kernels/bitplane_gemv.cu`):
//! 1 to 8 tokens at any precision from the seed to the highest held, reading
//! only that many planes and the LUTs of that precision.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, LaunchConfig};
use rayon::prelude::*;

use super::launch::Launch;
use super::{device_err, CudaDevice};
use crate::backend::AnyPrecHost;
use crate::error::{EngineError, Result};

/// The kernels' source.
pub const SOURCE: &str = concat!(
    include_str!("kernels/common.cuh"),
    include_str!("kernels/bitplane_gemv.cu"),
    include_str!("kernels/bitplane_levels.cu")
);
/// Most warps a GEMV block takes (its warps split the columns of one row tile).
const MAX_WARPS: u32 = 16;
/// Most blocks one row tile is split over (split-K, [`GemvVariant::splits`]).
pub const MAX_SPLITS: u32 = 4;
/// Most row tiles a GEMV block takes ([`GemvVariant::tiles_per_block`]).
pub const MAX_TILES_PER_BLOCK: u32 = 4;
/// Most tokens one launch takes.
pub const MAX_TOKENS: usize = 8;
/// Most bytes of split activations a block holds in shared memory: more
/// costs occupancy more than the `split_x` launch costs (H100, 4096x14336 at
/// 4 bits: one token split in the block, 56 KiB, 21.1 µs; four tokens split
/// by `split_x`, 16.8 µs).
const SPLIT_IN_BLOCK_MAX: usize = 16 << 10;
/// Rows of a tile: one mma's M.
const TILE_ROWS: usize = 16;
/// Columns of a column block: one 32-bit word of each of a lane's 4 column groups.
const BLOCK_COLS: usize = 128;

/// Bit of a lane's device word that holds column `c` (< 32) of its 32: the
/// kernel's nibble transpose then yields each mma k tile's four columns in
/// fragment order (see `kernels/bitplane_gemv.cu`).
pub fn column_bit(c: usize) -> usize {
    16 * ((c >> 2) & 1) + 4 * (c & 3) + (c >> 3)
}

/// A stored plane word (bit c = column c of a 32-column group) in the device order.
pub fn device_word(stored: u32) -> u32 {
    (0..32).fold(0, |d, c| d | ((stored >> c) & 1) << column_bit(c))
}

/// Bytes a `rows × cols` layer holding precisions `seed..=keep` takes in GPU
/// memory: `keep` planes in the kernel's layout (rows padded to 16, columns
/// to 128) and one f16 LUT per precision.
pub fn device_bytes(rows: usize, cols: usize, seed: u32, keep: u32) -> usize {
    let (rows_p, cols_p) = (padded_rows(rows), padded_cols(cols));
    let luts: usize = (seed..=keep).map(|b| rows_p * (2usize << b)).sum();
    rows_p * cols_p / 8 * keep as usize + luts
}

fn padded_rows(rows: usize) -> usize {
    rows.div_ceil(TILE_ROWS) * TILE_ROWS
}

/// Columns padded to a whole column block (the split activations' row length).
pub(super) fn padded_cols(cols: usize) -> usize {
    cols.div_ceil(BLOCK_COLS) * BLOCK_COLS
}

/// What a DP-LLM estimate reads of each token in the kernels (their `n_e`):
/// a row of its input, a norm left by the input's producer, or the parts of
/// its sum of squares left so (`EstInput::SumSq`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EstForm {
    /// A row of this many values (n_e > 0).
    Rows(usize),
    /// The row's norm (n_e = 0).
    Norm,
    /// This many parts of the row's sum of squares (n_e < 0).
    SumSq(usize),
}

impl EstForm {
    /// The kernels' `n_e`.
    pub fn n_e(self) -> i32 {
        match self {
            EstForm::Rows(w) => w as i32,
            EstForm::Norm => 0,
            EstForm::SumSq(p) => -(p as i32),
        }
    }

    /// Values a token.
    pub fn per_token(self) -> usize {
        match self {
            EstForm::Rows(w) | EstForm::SumSq(w) => w,
            EstForm::Norm => 1,
        }
    }
}

/// A GEMV's activations: f32 rows (`n × cols`), or the same already split
/// into f16 halves (`[2][n][cols padded to 128]`, as `split_x` and the ops
/// that make a linear's input leave them), which the kernel reads as they are.
#[derive(Clone, Copy)]
pub enum GemvInput<'a> {
    /// f32 rows.
    Rows(&'a CudaView<'a, f32>),
    /// Split halves of exactly the launch's tokens.
    Halves(&'a CudaView<'a, u16>),
}

impl GemvInput<'_> {
    /// "N f32" or "N split" values, for errors.
    fn describe(&self) -> String {
        match self {
            GemvInput::Rows(x) => format!("{} f32", x.len()),
            GemvInput::Halves(xs) => format!("{} split", xs.len()),
        }
    }
}

/// How a GEMV launch splits the work and looks its weights up: the warps of
/// a block, which split the column blocks of one 16-row tile (`None`: 8, or
/// 16 when the tiles do not fill the GPU twice over; never more than the
/// column blocks), and the tables (`None`: the built-in choice).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GemvVariant {
    /// Warps a block (1..=16), or the default.
    pub warps: Option<u32>,
    /// Lookup tables, or the default for the precision and layer.
    pub tables: Option<Tables>,
    /// Split the activations by a `split_x` launch even where the block
    /// could split them itself (to time the GEMV kernel that reads them
    /// split from device memory).
    pub split_launch: bool,
    /// Blocks a row tile is split over (split-K, 1..=[`MAX_SPLITS`], at most
    /// one a column block), or the default: 1, or with split-K on
    /// ([`CudaDevice::split_k`]) on a layer of fewer tiles than
    /// multiprocessors as many as give each one block.
    pub splits: Option<u32>,
    /// Row tiles a block takes (1..=[`MAX_TILES_PER_BLOCK`], no split-K
    /// then), or 1: its warps split between the tiles, those of one column
    /// block reading the same activations together.
    pub tiles_per_block: Option<u32>,
}

impl GemvVariant {
    /// The default, every fixed split worth timing, and every kind of table
    /// (each where its precision has it: [`Tables::available_at`]).
    pub fn all() -> Vec<GemvVariant> {
        let splits = [None, Some(4), Some(8), Some(16)].map(|warps| GemvVariant {
            warps,
            ..Default::default()
        });
        let tables = Tables::ALL.map(|t| GemvVariant {
            tables: Some(t),
            ..Default::default()
        });
        let launch = GemvVariant {
            split_launch: true,
            ..Default::default()
        };
        let split_k = [2, MAX_SPLITS].map(|s| GemvVariant {
            splits: Some(s),
            ..Default::default()
        });
        let tiles = GemvVariant {
            tiles_per_block: Some(2),
            ..Default::default()
        };
        (splits.into_iter().chain(tables).chain([launch]))
            .chain(split_k)
            .chain([tiles])
            .collect()
    }

    /// "auto", "w8", "pairs", "w8-pairs", "auto-xs" (split by a launch),
    /// "auto-k2" (split-K over 2 blocks a tile), "auto-t2" (2 tiles a block).
    pub fn name(&self) -> String {
        let base = match (self.warps, self.tables) {
            (None, None) => "auto".into(),
            (Some(w), None) => format!("w{w}"),
            (None, Some(t)) => t.name().into(),
            (Some(w), Some(t)) => format!("w{w}-{}", t.name()),
        };
        let xs = if self.split_launch { "-xs" } else { "" };
        let tiles = self
            .tiles_per_block
            .map_or(String::new(), |t| format!("-t{t}"));
        match self.splits {
            Some(k) => format!("{base}{xs}-k{k}{tiles}"),
            None => format!("{base}{xs}{tiles}"),
        }
    }

    /// Row tiles a block of this variant takes (1 unless asked for).
    fn tiles(&self) -> u32 {
        self.tiles_per_block.unwrap_or(1)
    }

    /// True when this variant has a kernel at `bits`.
    pub fn available_at(&self, bits: u32) -> bool {
        self.tables.is_none_or(|t| t.available_at(bits))
    }
}

/// The kernel for `n` tokens at `bits` (up to 4 tokens one mma a k tile, up to 8 two).
fn kernel_name(bits: u32, n: usize) -> String {
    format!("bitplane_gemv_b{bits}_t{}", if n <= 4 { 4 } else { 8 })
}

/// Where a GEMV kernel looks its weights up (`kernels/bitplane_gemv.cu`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tables {
    /// Byte tables in registers (3 bits).
    Regs,
    /// Pair tables in shared memory, one load giving two weights: 32 KiB a
    /// block at 3 bits, 64 KiB at 4.
    Pairs,
    /// Entry tables in shared memory, 2^bits · 128 bytes a block (above 4
    /// bits, and 4 bits in DP-LLM's in-kernel choice on layers of many tiles).
    Entries,
    /// Pair tables with one copy for two lanes: half of [`Tables::Pairs`]'
    /// shared memory and stores, some bank conflicts on the lookups.
    HalfPairs,
}

impl Tables {
    /// Every kind.
    pub const ALL: [Tables; 4] = [
        Tables::Regs,
        Tables::Pairs,
        Tables::Entries,
        Tables::HalfPairs,
    ];

    /// The tables a kernel without a table suffix takes at `bits`.
    fn default_at(bits: u32) -> Tables {
        match bits {
            3 => Tables::Regs,
            4 => Tables::Pairs,
            _ => Tables::Entries,
        }
    }

    /// True when GEMV kernels with these tables exist at `bits`.
    pub fn available_at(self, bits: u32) -> bool {
        match self {
            Tables::Regs => bits == 3,
            Tables::Pairs | Tables::HalfPairs => (3..=4).contains(&bits),
            Tables::Entries => bits >= 4,
        }
    }

    /// "regs", "pairs", "entries", "half-pairs".
    pub fn name(self) -> &'static str {
        match self {
            Tables::Regs => "regs",
            Tables::Pairs => "pairs",
            Tables::Entries => "entries",
            Tables::HalfPairs => "half-pairs",
        }
    }

    /// The kernel name's suffix at `bits`: none for the default tables, else
    /// `p` (pairs at 3 bits), `e` (entries at 4 bits) or `h` (half pairs);
    /// registers are the default wherever they exist.
    fn suffix(self, bits: u32) -> &'static str {
        match self {
            _ if self == Tables::default_at(bits) => "",
            Tables::Pairs => "p",
            Tables::Entries => "e",
            Tables::HalfPairs => "h",
            Tables::Regs => "r",
        }
    }

    /// Bytes of shared memory the tables take at `bits` (the lanes' copies).
    fn shared_bytes(self, bits: u32) -> u32 {
        match self {
            Tables::Regs => 0,
            // 2 regions of (16 · 2^bits-entry pairs) words for 32 lanes.
            Tables::Pairs => 2 * (16 << bits) * 32 * 4,
            Tables::HalfPairs => 2 * (16 << bits) * 16 * 4,
            Tables::Entries => 128u32 << bits,
        }
    }
}

impl std::str::FromStr for Tables {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Tables, String> {
        Tables::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| format!("unknown tables {s:?} (regs, pairs, entries, half-pairs)"))
    }
}

/// How a layer's work is spread: its 16-row tiles and 128-column blocks, the
/// GPU's multiprocessors, and whether it has split-K's scratch (fewer tiles
/// than multiprocessors).
#[derive(Debug, Clone, Copy)]
struct Split {
    tiles: usize,
    kbs: usize,
    sms: usize,
    scratch: bool,
}

impl Split {
    /// Blocks a row tile is split over: `forced`, else with split-K on (`auto`)
    /// and a scratch as many as give each multiprocessor one block, else 1;
    /// within 1..=[`MAX_SPLITS`] and at most one a column block.
    fn splits(self, forced: Option<u32>, auto: bool) -> u32 {
        let auto = match auto && self.scratch {
            true => (self.sms / self.tiles.max(1)) as u32,
            false => 1,
        };
        (forced.unwrap_or(auto).clamp(1, MAX_SPLITS)).min(self.kbs.max(1) as u32)
    }

    /// Warps a block of `tiles` row tiles takes: `forced`, else 16 where the
    /// blocks (`splits` a tile) do not fill the GPU twice over and 8 where
    /// they do; the same number a tile (at least one), never more a tile than
    /// the block's column blocks.
    fn warps(self, forced: Option<u32>, splits: u32, tiles: u32) -> u32 {
        let tiles = tiles.max(1);
        let blocks = self.tiles.div_ceil(tiles as usize) * splits as usize;
        let auto = if blocks < 2 * self.sms { MAX_WARPS } else { 8 };
        let columns = self.kbs.div_ceil(splits.max(1) as usize) as u32;
        (forced.unwrap_or(auto) / tiles).min(columns).max(1) * tiles
    }
}

/// An any-precision weight in GPU memory.
pub struct CudaAnyPrec {
    rows: usize,
    cols: usize,
    /// 16-row tiles.
    tiles: usize,
    /// 128-column blocks a row.
    kbs: usize,
    seed_bits: u32,
    max_bits: u32,
    /// [max_bits][tiles][kbs][32 lanes][2] device words (`kernels/bitplane_gemv.cu`).
    planes: CudaSlice<u32>,
    /// luts[b − seed_bits]: [rows padded to 16][2^b] f16 bits.
    luts: Vec<CudaSlice<u16>>,
    /// Split-K's scratch, on layers of fewer tiles than multiprocessors.
    split_k: Option<SplitScratch>,
    device: Arc<CudaDevice>,
}

/// What split-K's blocks share: each block's sums of its tile, [tiles]
/// [`MAX_SPLITS`] [128] floats, and per tile the count of blocks done (0
/// between launches: the last block resets it). One launch at a time may use
/// it, as one stream queues them.
struct SplitScratch {
    part: CudaSlice<f32>,
    done: CudaSlice<u32>,
}

impl SplitScratch {
    /// The scratch for a layer of `tiles` tiles on `device`, where split-K may
    /// run (fewer tiles than multiprocessors).
    fn new(device: &CudaDevice, tiles: usize) -> Result<Option<SplitScratch>> {
        if tiles >= device.multiprocessors() {
            return Ok(None);
        }
        let s = device.stream();
        let n = tiles * MAX_SPLITS as usize * 128;
        let oom = |bytes| {
            move |_| EngineError::OutOfMemory {
                what: "split-K scratch (GPU)",
                bytes,
            }
        };
        Ok(Some(SplitScratch {
            part: s.alloc_zeros::<f32>(n).map_err(oom(4 * n))?,
            done: s.alloc_zeros::<u32>(tiles).map_err(oom(4 * tiles))?,
        }))
    }
}

impl CudaAnyPrec {
    /// Copy `w` to the GPU in the kernel's layout.
    pub fn upload(device: &Arc<CudaDevice>, w: &AnyPrecHost) -> Result<CudaAnyPrec> {
        let (rows, words) = (w.rows, w.cols.div_ceil(32));
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
        let (tiles, kbs) = (rows.div_ceil(TILE_ROWS), w.cols.div_ceil(BLOCK_COLS));
        // One chunk per (plane, tile): [kb][lane][2].
        let mut host = vec![0u32; planes_n * tiles * kbs * 64];
        host.par_chunks_mut(kbs * 64)
            .enumerate()
            .for_each(|(jt, out)| {
                let (j, tile) = (jt / tiles, jt % tiles);
                for (i, o) in out.iter_mut().enumerate() {
                    let (kb, lane, half) = (i / 64, i / 2 % 32, i % 2);
                    let r = TILE_ROWS * tile + lane / 4 + 8 * half;
                    let word = 4 * kb + lane % 4;
                    if r < rows && word < words {
                        *o = device_word(w.planes[(j * rows + r) * words + word]);
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
                bits.resize(padded_rows(rows) * (l.len() / rows.max(1)), 0);
                stream
                    .clone_htod(&bits)
                    .map_err(device_err("copying LUTs to the GPU"))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(CudaAnyPrec {
            rows,
            cols: w.cols,
            tiles,
            kbs,
            seed_bits: w.seed_bits,
            max_bits: w.max_bits,
            planes,
            luts,
            split_k: SplitScratch::new(device, tiles)?,
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
        let (tiles, kbs) = (rows.div_ceil(TILE_ROWS), cols.div_ceil(BLOCK_COLS));
        let s = device.stream();
        let oom = |bytes: usize| {
            move |_| EngineError::OutOfMemory {
                what: "bit-planes (GPU)",
                bytes,
            }
        };
        let n = max_bits as usize * tiles * kbs * 64;
        // SAFETY: filled by the caller before any read.
        let planes = unsafe { s.alloc::<u32>(n) }.map_err(oom(4 * n))?;
        let luts = (3..=max_bits)
            .map(|b| {
                let n = padded_rows(rows) << b;
                // SAFETY: as above.
                unsafe { s.alloc::<u16>(n) }.map_err(oom(2 * n))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(CudaAnyPrec {
            rows,
            cols,
            tiles,
            kbs,
            seed_bits: 3,
            max_bits,
            planes,
            luts,
            split_k: SplitScratch::new(device, tiles)?,
            device: device.clone(),
        })
    }

    /// The planes and LUTs, to fill ([`CudaAnyPrec::uninit`]).
    pub(crate) fn buffers_mut(&mut self) -> (&mut CudaSlice<u32>, &mut [CudaSlice<u16>]) {
        (&mut self.planes, &mut self.luts)
    }

    /// One plane's length in 64-bit (uint2) units, as the kernels take it.
    fn plane_stride(&self) -> i64 {
        (self.tiles * self.kbs * 32) as i64
    }

    /// What a kernel reading the weight at `bits` takes: the planes, one
    /// plane's length (uint2 units), the LUTs at `bits`, and the 128-column
    /// blocks of a row; an error when `bits` is not held.
    pub(crate) fn level_args(
        &self,
        bits: u32,
    ) -> Result<(&CudaSlice<u32>, i64, &CudaSlice<u16>, i32)> {
        crate::backend::check_bits_in(bits, self.seed_bits, self.max_bits)
            .map_err(EngineError::Bits)?;
        Ok((
            &self.planes,
            self.plane_stride(),
            &self.luts[(bits - self.seed_bits) as usize],
            self.kbs as i32,
        ))
    }

    /// The device it lives on.
    pub(crate) fn device(&self) -> &Arc<CudaDevice> {
        &self.device
    }

    /// The weight at `bits` as f16 [rows × cols] into `out` (exact: its values
    /// are LUT entries; long batches run as one GEMM on it).
    pub fn dequantize_into(&self, bits: u32, out: &mut CudaSlice<u16>) -> Result<()> {
        let (planes, stride, luts, k) = self.level_args(bits)?;
        if out.len() < self.rows * self.cols {
            return Err(EngineError::Device(format!(
                "dequantize: {} values for a {}x{} weight",
                out.len(),
                self.rows,
                self.cols
            )));
        }
        let f = self.device.bitplane_kernels()?.get("bitplane_dequant")?;
        let (b, r, c) = (bits as i32, self.rows as i32, self.cols as i32);
        let total = self.rows * self.kbs * 4;
        let cfg = LaunchConfig {
            grid_dim: (total.div_ceil(256).clamp(1, 65535) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut l = self.device.launch(&f);
        l.arg(planes)
            .arg(&stride)
            .arg(luts)
            .arg(&b)
            .arg(out)
            .arg(&r)
            .arg(&c)
            .arg(&k);
        // SAFETY: the arguments match bitplane_dequant's signature; it writes
        // rows × cols f16 values (checked above) and reads the planes and LUT of
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
            split_k: SplitScratch::new(&self.device, self.tiles)?,
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

    /// The highest precision held.
    pub fn max_bits(&self) -> u32 {
        self.max_bits
    }

    /// Bytes one GEMV at `bits` reads: `bits` planes and that precision's LUTs.
    pub fn bytes_at(&self, bits: u32) -> usize {
        padded_rows(self.rows) * (padded_cols(self.cols) / 8 * bits as usize + (2 << bits))
    }

    /// Blocks a row tile of variant `v` is split over ([`Split::splits`]).
    fn splits(&self, v: GemvVariant) -> u32 {
        self.split_shape().splits(v.splits, self.device.split_k())
    }

    /// This layer's shape on this GPU, for choosing the split of its work.
    fn split_shape(&self) -> Split {
        Split {
            tiles: self.tiles,
            kbs: self.kbs,
            sms: self.device.multiprocessors(),
            scratch: self.split_k.is_some(),
        }
    }

    /// True when this layer can split its tiles over blocks (it has split-K's
    /// scratch: fewer tiles than multiprocessors).
    pub fn can_split(&self) -> bool {
        self.split_k.is_some()
    }

    /// Warps a block of variant `v` takes ([`Split::warps`]).
    fn warps(&self, v: GemvVariant) -> u32 {
        (self.split_shape()).warps(v.warps, self.splits(v), v.tiles())
    }

    /// An error when a launch of `splits` blocks a tile has no scratch.
    fn check_splits(&self, splits: u32) -> Result<()> {
        if splits > 1 && self.split_k.is_none() {
            return Err(EngineError::Device(format!(
                "bit-plane GEMV: split-K on a layer of {} row tiles (only layers of fewer \
                 tiles than the GPU's {} multiprocessors have its scratch)",
                self.tiles,
                self.device.multiprocessors()
            )));
        }
        Ok(())
    }

    /// Push split-K's arguments: the scratch, or nulls without a split
    /// (checked by [`CudaAnyPrec::check_splits`]).
    fn split_args(&self, b: &mut Launch<'_>, splits: u32) {
        match (&self.split_k, splits) {
            (Some(k), 2..) => b.arg(&k.part).arg(&k.done),
            _ => b.arg(&0u64).arg(&0u64),
        };
    }

    /// The tables of a GEMV of `n` tokens at `bits`: the default (pairs at 4
    /// bits, see [`CudaAnyPrec::split_in_block`] for the layers of many
    /// tiles), except that at 3 bits one token takes pair tables too (H100:
    /// 2-5 % faster than tables in registers on the 8B's shapes, 8B decode
    /// 2-4 %), where more tokens keep the registers (pairs lost 2-28 % at 4
    /// and 8 tokens). Where the device says so ([`CudaDevice::half_pairs`]),
    /// 4-bit pair tables take half the copies.
    fn tables(&self, bits: u32, n: usize, v: GemvVariant) -> Tables {
        if let Some(t) = v.tables {
            t
        } else if bits == 3 && n == 1 {
            Tables::Pairs
        } else if bits == 4 && self.device.half_pairs() {
            Tables::HalfPairs
        } else {
            Tables::default_at(bits)
        }
    }

    /// True on layers of at least 4 row tiles a multiprocessor, where several
    /// blocks a multiprocessor hide each other's start, and the shared memory
    /// a block takes decides how many fit.
    fn many_tiles(&self) -> bool {
        self.tiles >= 4 * self.device.multiprocessors()
    }

    /// Bytes of shared memory a launch at `bits` with `warps` warps and
    /// `tiles` row tiles a block takes: the lanes' table copies of each tile
    /// ([`Tables::shared_bytes`]), the activations of `split_in_block` tokens
    /// split (2 halves of each padded column), then the warps' sums (4 values
    /// of 32 lanes each).
    fn shared_bytes(
        &self,
        bits: u32,
        tables: Tables,
        warps: u32,
        split_in_block: usize,
        tiles: u32,
    ) -> u32 {
        tables.shared_bytes(bits) * tiles
            + (4 * split_in_block * padded_cols(self.cols)) as u32
            + warps * 4 * 32 * 4
    }

    /// True when a block of `warps` warps at `bits` splits the activations of
    /// `n` tokens into its own shared memory: when they take at most
    /// [`SPLIT_IN_BLOCK_MAX`] and the block's total fits the GPU, except for
    /// the 64 KiB of 4-bit pair tables on layers of many tiles, where the
    /// activations beside them cost a block a multiprocessor (H100,
    /// 14336x4096, one token: 19.98 µs split by `split_x` against 23.66 split
    /// in the block, and 22.76 for the entry tables split in the block that
    /// were taken before). Else `split_x` splits them first (a second launch).
    fn split_in_block(&self, bits: u32, tables: Tables, warps: u32, n: usize, tiles: u32) -> bool {
        4 * n * padded_cols(self.cols) <= SPLIT_IN_BLOCK_MAX
            && !(bits == 4 && tables == Tables::Pairs && self.many_tiles())
            && self.shared_bytes(bits, tables, warps, n, tiles) as usize <= self.device.max_shared()
    }

    /// True when variant `v` can run `n` tokens.
    pub fn supports(&self, n: usize, v: GemvVariant) -> bool {
        (1..=MAX_TOKENS).contains(&n)
            && v.warps.is_none_or(|w| (1..=MAX_WARPS).contains(&w))
            && v.splits.is_none_or(|k| (1..=MAX_SPLITS).contains(&k))
            && (v.tiles_per_block).is_none_or(|t| (1..=MAX_TILES_PER_BLOCK).contains(&t))
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
        self.gemv_with(x, n, bits, y, GemvVariant::default())
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

    /// The activations of `n` tokens split for a kernel that does not split
    /// them itself: f16 halves hi and lo ([2][n][columns padded to 128]).
    pub fn split(&self, x: &CudaView<f32>, n: usize) -> Result<CudaSlice<u16>> {
        let cols_p = padded_cols(self.cols);
        let len = 2 * n * cols_p;
        let s = self.device.stream();
        // SAFETY: split_x writes every element before the GEMV reads it.
        let xs = unsafe { s.alloc::<u16>(len) }.map_err(|_| EngineError::OutOfMemory {
            what: "GEMV activations (GPU)",
            bytes: 2 * len,
        })?;
        let f = self.device.bitplane_kernels()?.get("split_x")?;
        let (stride, ni, c, cp) = (self.cols as i32, n as i32, self.cols as i32, cols_p as i32);
        let cfg = LaunchConfig {
            // Eight columns a thread.
            grid_dim: ((n * cols_p / 8).div_ceil(256) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.device.launch(&f);
        b.arg(x).arg(&stride).arg(&ni).arg(&c).arg(&cp).arg(&xs);
        // SAFETY: x holds n rows of cols floats (checked by the callers), xs
        // 2 · n · cols_p halves.
        unsafe { b.launch(cfg) }.map_err(device_err("launching the activation split"))?;
        Ok(xs)
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
        self.gemv_input(GemvInput::Rows(x), n, bits, y, v, select)
    }

    /// True when `x` holds the activations of `n` tokens for this layer.
    fn input_fits(&self, x: GemvInput<'_>, n: usize) -> bool {
        match x {
            GemvInput::Rows(x) => x.len() >= n * self.cols,
            GemvInput::Halves(xs) => xs.len() >= 2 * n * padded_cols(self.cols),
        }
    }

    /// [`CudaAnyPrec::gemv_view`] on activations in either form: halves are
    /// read as they are (no split in the block nor by `split_x`).
    pub fn gemv_input(
        &self,
        x: GemvInput<'_>,
        n: usize,
        bits: u32,
        y: &mut CudaViewMut<f32>,
        v: GemvVariant,
        select: Option<(&CudaView<u32>, bool)>,
    ) -> Result<()> {
        crate::backend::check_bits_in(bits, self.seed_bits, self.max_bits)
            .map_err(EngineError::Bits)?;
        if n == 0 || n > MAX_TOKENS || !self.input_fits(x, n) || y.len() < n * self.rows {
            return Err(EngineError::Device(format!(
                "bit-plane GEMV: {n} tokens (1..={MAX_TOKENS}) with {} inputs and {} outputs \
                 do not fit a {}x{} weight",
                x.describe(),
                y.len(),
                self.rows,
                self.cols
            )));
        }
        if !self.supports(n, v) {
            return Err(EngineError::Device(format!(
                "bit-plane GEMV: no split {} (1..={MAX_WARPS} warps, 1..={MAX_SPLITS} blocks a tile)",
                v.name()
            )));
        }
        if !v.available_at(bits) {
            return Err(EngineError::Device(format!(
                "bit-plane GEMV: no kernel {} at {bits} bits",
                v.name()
            )));
        }
        if select.is_some_and(|(m, _)| m.len() < n) {
            return Err(EngineError::Device(format!(
                "bit-plane GEMV: fewer decisions than {n} tokens"
            )));
        }
        let (warps, tables, splits) = (self.warps(v), self.tables(bits, n, v), self.splits(v));
        self.check_splits(splits)?;
        let tiles = v.tiles();
        if tiles > 1 && splits > 1 {
            return Err(EngineError::Device(format!(
                "bit-plane GEMV: {tiles} tiles a block with split-K ({})",
                v.name()
            )));
        }
        // Rows are split in the block where that pays, else by split_x first.
        let in_block = matches!(x, GemvInput::Rows(_))
            && !v.split_launch
            && self.split_in_block(bits, tables, warps, n, tiles);
        let split = if in_block { n } else { 0 };
        let shared = self.shared_bytes(bits, tables, warps, split, tiles);
        if shared as usize > self.device.max_shared() {
            return Err(EngineError::Device(format!(
                "bit-plane GEMV: {} takes {shared} bytes of shared memory at {bits} bits, \
                 more than the GPU's {}",
                v.name(),
                self.device.max_shared()
            )));
        }
        let made = match x {
            GemvInput::Rows(x) if !in_block => Some(self.split(x, n)?),
            _ => None,
        };
        let cfg = self.launch_config(warps, shared, splits, tiles);
        // The kernel: `s` where the block splits x, then the tables' suffix.
        let e = tables.suffix(bits);
        let s = if in_block { "s" } else { "" };
        let f = self
            .device
            .bitplane_kernels()?
            .get(&format!("{}{s}{e}", kernel_name(bits, n)))?;
        self.device.allow_shared(&f, cfg.shared_mem_bytes)?;
        let (ni, cols, ys, rows, kbs) = (
            n as i32,
            self.cols as i32,
            self.rows as i32,
            self.rows as i32,
            self.kbs as i32,
        );
        let luts = &self.luts[(bits - self.seed_bits) as usize];
        let (no_mask, want) = (0u64, select.map_or(0u32, |(_, w)| w as u32));
        let stride = self.plane_stride();
        let mut b = self.device.launch(&f);
        b.arg(&self.planes).arg(&stride).arg(luts);
        match (x, &made) {
            (GemvInput::Halves(xs), _) => b.arg(xs),
            (GemvInput::Rows(_), Some(xs)) => b.arg(xs),
            (GemvInput::Rows(x), None) => b.arg(x).arg(&cols),
        };
        b.arg(&ni).arg(y).arg(&ys).arg(&rows).arg(&kbs);
        match select {
            Some((m, _)) => b.arg(m),
            None => b.arg(&no_mask),
        };
        b.arg(&want);
        self.split_args(&mut b, splits);
        let (prefetch, tiles) = (self.device.prefetch() as i32, tiles as i32);
        b.arg(&prefetch).arg(&tiles);
        // SAFETY: the arguments match the kernel's signature in order and type
        // (the `s` kernels take x and its columns where the others take xs);
        // the buffers hold what the kernel reads and writes (checked above and
        // by the upload's layout), and the shared memory was allowed.
        unsafe { b.launch(cfg) }.map_err(device_err("launching the bit-plane GEMV"))?;
        Ok(())
    }

    /// True when [`CudaAnyPrec::gemv_select`] runs `low` and `low + 1` bits in one kernel.
    pub fn selects_in_kernel(&self, low: u32) -> bool {
        (3..=7).contains(&low)
            && self.seed_bits <= low
            && low < self.max_bits
            && [self.select_splits_in_block(), false]
                .into_iter()
                .all(|in_block| {
                    let warps = self.warps(GemvVariant::default());
                    self.select_shared_bytes(low, warps, in_block) as usize
                        <= self.device.max_shared()
                })
    }

    /// True when the in-kernel choice splits its token's activations in the
    /// block (else `split_x` does first).
    fn select_splits_in_block(&self) -> bool {
        4 * padded_cols(self.cols) <= SPLIT_IN_BLOCK_MAX
    }

    /// Shared memory of the in-kernel choice between `low` and `low + 1` bits
    /// (one token, each with the tables the plain GEMV takes, its activations
    /// split in the block or not): what the hungrier precision takes.
    fn select_shared_bytes(&self, low: u32, warps: u32, in_block: bool) -> u32 {
        let split = in_block as usize;
        let at = |b: u32| self.shared_bytes(b, self.select_tables(b, in_block), warps, split, 1);
        at(low).max(at(low + 1))
    }

    /// The tables of the in-kernel choice's side at `bits`: the plain GEMV's
    /// for one token, but entry tables at 4 bits on layers of many tiles
    /// where the block splits its token (the pairs' 64 KiB beside the split
    /// would cost occupancy: H100, 14336x4096, 22.5 against 26.0 µs).
    fn select_tables(&self, bits: u32, in_block: bool) -> Tables {
        if bits == 4 && self.many_tiles() && in_block {
            Tables::Entries
        } else {
            self.tables(bits, 1, GemvVariant::default())
        }
    }

    /// The suffix of the in-kernel choice between `low` and `low + 1` bits:
    /// `p` where its 3-bit side takes pair tables, then `e` or `h` where its
    /// 4-bit side takes entry tables or half-copy pair tables
    /// ([`CudaAnyPrec::select_tables`]).
    fn select_suffix(&self, low: u32, in_block: bool) -> String {
        let p = low == 3 && self.select_tables(3, in_block) == Tables::Pairs;
        let four = match self.select_tables(4, in_block) {
            _ if !(3..=4).contains(&low) => "",
            Tables::Entries => "e",
            Tables::HalfPairs => "h",
            _ => "",
        };
        format!("{}{four}", if p { "p" } else { "" })
    }

    /// `y = x · W_bᵀ` for one token, with b = `low + 1` when `a·||e|| + c >
    /// thr` and `low` otherwise, decided inside the kernel (DP-LLM's decision
    /// of the token, `e` the estimator's input in the form `form`); with
    /// `count = (c, slot)`, `c[slot]` gains 1 when
    /// the token goes high.
    #[allow(clippy::too_many_arguments)]
    pub fn gemv_select(
        &self,
        x: GemvInput<'_>,
        low: u32,
        (e, form): (&CudaView<f32>, EstForm),
        (a, c, thr): (f32, f32, f32),
        count: Option<(&mut CudaViewMut<f32>, usize)>,
        y: &mut CudaViewMut<f32>,
    ) -> Result<()> {
        if !self.selects_in_kernel(low) || !self.input_fits(x, 1) || y.len() < self.rows {
            return Err(EngineError::Device(format!(
                "bit-plane GEMV: no in-kernel choice of {low} or {} bits for a {}x{} weight \
                 holding {}..={} bits, {} inputs and {} outputs",
                low + 1,
                self.rows,
                self.cols,
                self.seed_bits,
                self.max_bits,
                x.describe(),
                y.len()
            )));
        }
        // Rows are split in the block where they fit, else by split_x first.
        let in_block = matches!(x, GemvInput::Rows(_)) && self.select_splits_in_block();
        // Shared memory for whichever precision needs more (4 bits takes the most).
        let (warps, splits) = (
            self.warps(GemvVariant::default()),
            self.splits(GemvVariant::default()),
        );
        self.check_splits(splits)?;
        let shared = self.select_shared_bytes(low, warps, in_block);
        let cfg = self.launch_config(warps, shared, splits, 1);
        let made = match x {
            GemvInput::Rows(x) if !in_block => Some(self.split(x, 1)?),
            _ => None,
        };
        let f = self.device.bitplane_kernels()?.get(&format!(
            "bitplane_gemv_select_b{low}{}{}",
            if in_block { "" } else { "x" },
            self.select_suffix(low, in_block)
        ))?;
        self.device.allow_shared(&f, cfg.shared_mem_bytes)?;
        let lut = |b: u32| &self.luts[(b - self.seed_bits) as usize];
        let (cols, rows, kbs) = (self.cols as i32, self.rows as i32, self.kbs as i32);
        // No values (n_e = 0 would read a norm that is not there) is refused too.
        let empty = matches!(form, EstForm::Rows(0) | EstForm::SumSq(0));
        if empty || e.len() < form.per_token() {
            return Err(EngineError::Device(format!(
                "bit-plane GEMV: an estimator input of {} values where {form:?} is needed",
                e.len(),
            )));
        }
        let (ne, no_count) = (form.n_e(), 0u64);
        let (slot, stride) = (
            count.as_ref().map_or(0, |c| c.1) as i32,
            self.plane_stride(),
        );
        let mut b = self.device.launch(&f);
        b.arg(&self.planes)
            .arg(&stride)
            .arg(lut(low))
            .arg(lut(low + 1));
        match (x, &made) {
            (GemvInput::Halves(xs), _) => b.arg(xs),
            (GemvInput::Rows(_), Some(xs)) => b.arg(xs),
            (GemvInput::Rows(x), None) => b.arg(x),
        };
        b.arg(&cols)
            .arg(y)
            .arg(&rows)
            .arg(&kbs)
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
        self.split_args(&mut b, splits);
        // SAFETY: as in `gemv_view`; `e` holds `ne` floats and `count` (when
        // given) at least `slot + 1`.
        unsafe { b.launch(cfg) }.map_err(device_err("launching the bit-plane GEMV"))?;
        Ok(())
    }

    /// `splits` blocks of `warps` warps per row tile (or one block per
    /// `tiles` row tiles), with `shared` bytes of shared memory each.
    fn launch_config(&self, warps: u32, shared: u32, splits: u32, tiles: u32) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (self.tiles.div_ceil(tiles.max(1) as usize) as u32, splits, 1),
            block_dim: (32 * warps, 1, 1),
            shared_mem_bytes: shared,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_bytes_count_padded_rows_planes_and_every_lut() {
        // 6 rows pad to 16; 40 columns to 128; 3..=4 bits: 4 planes.
        assert_eq!(device_bytes(6, 40, 3, 4), 16 * 16 * 4 + 16 * 16 + 16 * 32);
        let w = AnyPrecHost::random(6, 40, 4, 1);
        let gpu = device_bytes(w.rows, w.cols, w.seed_bits, w.max_bits);
        assert!(gpu >= dpllm_format::anyprec::bytes_at(6, 40, 4));
    }

    #[test]
    fn split_k_fills_the_gpu_once_within_its_limits() {
        let layer = |tiles, kbs| Split {
            tiles,
            kbs,
            sms: 132,
            scratch: tiles < 132,
        };
        // The 8B's k/v on an H100: 64 tiles, 32 column blocks, two blocks a
        // tile of 16 warps, one column block a warp.
        let kv = layer(64, 32);
        assert_eq!(kv.splits(None, true), 2);
        assert_eq!(kv.warps(None, 2, 1), 16);
        assert_eq!(kv.splits(None, false), 1, "split-K off");
        // SmolLM2's k/v: 12 tiles of 5 column blocks; at most 4 splits, and
        // the blocks of a 4-way split hold 1-2 column blocks (2 warps).
        let small = layer(12, 5);
        assert_eq!(small.splits(None, true), 4);
        assert_eq!(small.warps(None, 4, 1), 2);
        // Forced splits stay within 1..=4 and one a column block.
        assert_eq!(layer(3, 2).splits(Some(4), false), 2);
        assert_eq!(layer(3, 32).splits(Some(3), false), 3);
        assert_eq!(layer(1, 1).splits(Some(4), true), 1);
        // No scratch (as many tiles as multiprocessors or more): no auto split.
        let gate = layer(896, 32);
        assert_eq!(gate.splits(None, true), 1);
        assert_eq!(
            gate.warps(None, 1, 1),
            8,
            "896 blocks fill the GPU twice over"
        );
        assert_eq!(layer(256, 32).warps(Some(4), 1, 1), 4, "forced warps");
        assert_eq!(
            layer(2, 3).warps(None, 1, 1),
            3,
            "no more warps than column blocks"
        );
        // Tiles a block: the same warps a tile, and the blocks counted as
        // launched (448 blocks of 2 tiles still fill the GPU twice over).
        assert_eq!(gate.warps(None, 1, 2), 8);
        assert_eq!(layer(200, 32).warps(None, 1, 2), 16, "100 blocks");
        assert_eq!(
            layer(2, 3).warps(None, 1, 2),
            6,
            "3 column blocks, 3 warps a tile"
        );
        assert_eq!(layer(8, 1).warps(None, 1, 4), 4, "one warp a tile at least");
        assert_eq!(
            layer(8, 32).warps(Some(6), 1, 4),
            4,
            "forced warps rounded down"
        );
    }

    #[test]
    fn column_bits_are_a_permutation_in_fragment_order() {
        let mut seen = [false; 32];
        for c in 0..32 {
            let b = column_bit(c);
            assert!(!seen[b], "bit {b} twice");
            seen[b] = true;
            // The transpose puts bit 4i + k of each plane in nibble i of word
            // k: columns 4j..4j + 3 (k tile j) must land in word j / 2,
            // nibbles 4 (j % 2) + 0..3.
            let (j, s) = (c / 4, c % 4);
            assert_eq!((b % 4, b / 4), (j / 2, 4 * (j % 2) + s), "column {c}");
        }
        assert_eq!(device_word(1), 1);
        assert_eq!(device_word(1 << 4), 1 << 16);
        assert_eq!(device_word(u32::MAX), u32::MAX);
    }
}
