//! Bit-plane kernels: a b-bit row of an any-precision weight is b bit-planes
//! (planes 0..b−1 of the stored 8, most significant first) plus a per-row table
//! of 2^b centroids. These kernels read only those b planes.
//!
//! Plane layout: a row's plane j starts `j * stride` words after its plane 0, and
//! word w of it holds bit (b−1−j) of the b-bit index of columns 32w..32w+31 (bit
//! t ↔ column 32w+t). Weights are stored plane-major ([plane][row][word]), so the
//! stride is rows × words and a b-bit pass streams b contiguous slabs. LUTs are
//! f16, as stored.

use half::f16;
use half::slice::HalfFloatSliceExt;

/// Indices of columns 32w..32w+31 (portable).
#[inline(always)]
fn word_indices(planes: &[u32], stride: usize, bits: u32, w: usize, out: &mut [u8; 32]) {
    *out = [0; 32];
    for j in 0..bits as usize {
        let word = planes[j * stride + w];
        let shift = bits as usize - 1 - j;
        for (t, o) in out.iter_mut().enumerate() {
            *o |= (((word >> t) & 1) as u8) << shift;
        }
    }
}

/// Run `f` on a row's f16 LUT widened to f32, in a stack buffer no larger than
/// the LUT's size class: a decode pass widens one LUT per row, so a fixed
/// 256-entry buffer (1 KiB zeroed, then copied) cost more than a 4-bit row's
/// dot product on rows of a few hundred columns.
#[inline(always)]
fn with_lut_f32<R>(lut: &[f16], f: impl FnOnce(&[f32]) -> R) -> R {
    #[inline(always)]
    fn run<const N: usize, R>(lut: &[f16], f: impl FnOnce(&[f32]) -> R) -> R {
        let mut t = [0f32; N];
        let t = &mut t[..lut.len()];
        t.iter_mut().zip(lut).for_each(|(d, s)| *d = s.to_f32());
        f(t)
    }
    match lut.len() {
        0..=16 => run::<16, R>(lut, f),
        17..=64 => run::<64, R>(lut, f),
        _ => run::<256, R>(lut, f),
    }
}

/// Dequantize one row at `bits` into `out` (len = cols).
pub fn dequantize_row(planes: &[u32], stride: usize, bits: u32, lut: &[f16], out: &mut [f32]) {
    with_lut_f32(lut, |lut| {
        let cols = out.len();
        let mut idx = [0u8; 32];
        for w in 0..cols.div_ceil(32) {
            word_indices(planes, stride, bits, w, &mut idx);
            let c0 = w * 32;
            let n = (cols - c0).min(32);
            for t in 0..n {
                out[c0 + t] = lut[idx[t] as usize];
            }
        }
    })
}

/// Portable Σ_c lut[idx_c]·x_c over one row (f32 LUT).
fn dot_row_portable(planes: &[u32], stride: usize, bits: u32, lut: &[f32], x: &[f32]) -> f32 {
    let cols = x.len();
    let mut idx = [0u8; 32];
    let mut acc = [0f32; 8];
    let mut tail = 0f32;
    for w in 0..cols.div_ceil(32) {
        word_indices(planes, stride, bits, w, &mut idx);
        let c0 = w * 32;
        if c0 + 32 <= cols {
            let xs = &x[c0..c0 + 32];
            for t in 0..32 {
                acc[t % 8] += lut[idx[t] as usize] * xs[t];
            }
        } else {
            for t in 0..cols - c0 {
                tail += lut[idx[t] as usize] * x[c0 + t];
            }
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Rows ahead of the one computed whose planes and tables the x86 integer
/// kernels prefetch.
#[cfg(target_arch = "x86_64")]
const PREFETCH_ROWS: usize = 2;

/// Ask for row `r`'s `bits` plane words (plane-major, `stride` words apart,
/// `words` a row) and its kernel tables ahead of use. A row streams from
/// bits + 1 places at once (each plane's slab and the tables), more streams
/// than the hardware prefetchers follow: on the dev VM this made the 8-bit
/// AVX-512 VBMI GEMV 1.4-1.9x faster and the 4-bit one about 10 %.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch_row(planes: &[u32], stride: usize, words: usize, bits: usize, tables: &[u8], r: usize) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
    let lines = |p: *const u8, bytes: usize| {
        for o in (0..bytes).step_by(64) {
            // SAFETY: prefetching is a hint; any address is allowed.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(o) as *const i8) };
        }
    };
    for j in 0..bits {
        lines(
            planes.as_ptr().wrapping_add(j * stride + r * words) as *const u8,
            4 * words,
        );
    }
    lines(tables.as_ptr(), tables.len());
}

/// A layer's rows as the 16-bit integer kernels (AVX2-i16, AVX-512 VBMI) read
/// them: plane-major planes (`stride` words apart, `words` a row), the
/// kernel's LUT tables (`table_bytes` a row) and scales, and one token's
/// prepared activations and their scales.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct I16Rows<'a> {
    planes: &'a [u32],
    stride: usize,
    words: usize,
    tables: &'a [u8],
    table_bytes: usize,
    scales: &'a [f32],
    xq: &'a [i16],
    xs: &'a [f32],
}

#[cfg(target_arch = "x86_64")]
impl I16Rows<'_> {
    /// `out[i] = dot(row planes, row tables, row scale)` for the i-th row of
    /// `rows` at `bits`, prefetching the row [`PREFETCH_ROWS`] ahead.
    ///
    /// # Safety
    /// The planes, tables and scales cover `rows` (the caller checked).
    #[inline(always)]
    unsafe fn each_row(
        &self,
        bits: usize,
        rows: std::ops::Range<usize>,
        out: &mut [f32],
        mut dot: impl FnMut(&[u32], *const u8, f32) -> f32,
    ) {
        let (end, tb) = (rows.end, self.table_bytes);
        for (o, r) in out.iter_mut().zip(rows) {
            if r + PREFETCH_ROWS < end {
                let next = r + PREFETCH_ROWS;
                let t = &self.tables[next * tb..][..tb];
                prefetch_row(self.planes, self.stride, self.words, bits, t, next);
            }
            *o = dot(
                self.planes.get_unchecked(r * self.words..),
                self.tables.as_ptr().add(r * tb),
                *self.scales.get_unchecked(r),
            );
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx2_i16;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
mod avx512_vbmi;

/// An implementation of the bit-plane dot product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BitplaneKernel {
    /// Plain Rust, any CPU.
    Portable,
    /// AVX2 + FMA + F16C (x86-64), f16 LUT and f32 activations as they are.
    Avx2,
    /// AVX2 + FMA + F16C on 16-bit fixed-point operands: the LUT rounded to 14
    /// bits of its row's largest entry, the activations to 15 bits of the
    /// largest in their group of 32.
    Avx2I16,
    /// AVX-512F + AVX-512BW (x86-64), f16 LUT and f32 activations as they are.
    Avx512,
    /// AVX-512F/BW + VBMI + VNNI + GFNI (x86-64) on the 16-bit fixed-point
    /// operands of AVX2-i16, except one activation scale per block of 64
    /// columns; indices by a GFNI bit transpose of 512 columns at a time, the
    /// LUT as byte tables looked up in registers (`vpermb`/`vpermi2b`).
    Avx512Vbmi,
}

impl BitplaneKernel {
    /// Every kernel, slowest first.
    pub const ALL: [BitplaneKernel; 5] = [
        BitplaneKernel::Portable,
        BitplaneKernel::Avx2,
        BitplaneKernel::Avx2I16,
        BitplaneKernel::Avx512,
        BitplaneKernel::Avx512Vbmi,
    ];

    /// Short name for tables and `--kernels`.
    pub fn name(self) -> &'static str {
        match self {
            BitplaneKernel::Portable => "portable",
            BitplaneKernel::Avx2 => "avx2",
            BitplaneKernel::Avx2I16 => "avx2-i16",
            BitplaneKernel::Avx512 => "avx512",
            BitplaneKernel::Avx512Vbmi => "avx512-vbmi",
        }
    }

    /// The kernel called `name` (see [`BitplaneKernel::name`]).
    pub fn by_name(name: &str) -> Option<BitplaneKernel> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }

    /// True when this CPU can run the kernel.
    pub fn is_available(self) -> bool {
        // Detected once: the per-row kernels ask for every row.
        static DETECTED: std::sync::OnceLock<[bool; 3]> = std::sync::OnceLock::new();
        #[cfg(target_arch = "x86_64")]
        let detect = || {
            [
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c"),
                is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw"),
                is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vbmi")
                    && is_x86_feature_detected!("avx512vnni")
                    && is_x86_feature_detected!("gfni"),
            ]
        };
        #[cfg(not(target_arch = "x86_64"))]
        let detect = || [false; 3];
        let [avx2, avx512, vbmi] = *DETECTED.get_or_init(detect);
        match self {
            BitplaneKernel::Portable => true,
            BitplaneKernel::Avx2 | BitplaneKernel::Avx2I16 => avx2,
            BitplaneKernel::Avx512 => avx512,
            BitplaneKernel::Avx512Vbmi => vbmi,
        }
    }

    /// Every kernel this CPU can run, slowest first.
    pub fn available() -> Vec<BitplaneKernel> {
        Self::ALL.into_iter().filter(|k| k.is_available()).collect()
    }

    /// The kernel runs use (decided once): the one `DPLLM_BITPLANE_KERNEL`
    /// names where this CPU has it (for comparisons; a warning otherwise),
    /// else the fastest this CPU can run.
    pub fn best() -> BitplaneKernel {
        static BEST: std::sync::OnceLock<BitplaneKernel> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| {
            let fastest = *Self::available()
                .last()
                .unwrap_or(&BitplaneKernel::Portable);
            match std::env::var("DPLLM_BITPLANE_KERNEL") {
                Ok(name) => match Self::by_name(&name) {
                    Some(k) if k.is_available() => k,
                    _ => {
                        tracing::warn!(
                            "DPLLM_BITPLANE_KERNEL={name}: not a kernel this CPU runs ({}); using {}",
                            Self::available().iter().map(|k| k.name()).collect::<Vec<_>>().join(", "),
                            fastest.name()
                        );
                        fastest
                    }
                },
                Err(_) => fastest,
            }
        })
    }

    /// The kernel that runs when this one is asked for: itself where the CPU has
    /// it, else the portable one.
    fn effective(self) -> BitplaneKernel {
        if self.is_available() {
            self
        } else {
            BitplaneKernel::Portable
        }
    }
}

/// Columns per block of the AVX2 kernel's activation layout.
pub const BLOCK: usize = 256;
/// Plane words per block.
const WORDS_PER_BLOCK: usize = BLOCK / 32;

/// Activations of `n` tokens laid out for one kernel ([`BitplaneKernel::prepare`]).
pub struct PreparedX {
    kernel: BitplaneKernel,
    cols: usize,
    /// f32 activations, `f_len` per token (every kernel but AVX2-i16).
    f: Vec<f32>,
    f_len: usize,
    /// 16-bit activations, `q_len` per token, and their group scales, `s_len` per token (AVX2-i16).
    q: Vec<i16>,
    q_len: usize,
    s: Vec<f32>,
    s_len: usize,
}

impl BitplaneKernel {
    /// Lay out the activations `x` [n × cols] in the order and form this kernel
    /// reads them: as they are (portable, AVX-512); for AVX2, per block of 256
    /// columns, x[8i + s] at position 32s + i, zero-padded to whole blocks; for
    /// AVX2-i16 and AVX-512 VBMI, rounded to 16 bits as their `prepare` describes.
    pub fn prepare(self, x: &[f32], cols: usize) -> PreparedX {
        let kernel = self.effective();
        let n = x.len() / cols.max(1);
        assert_eq!(
            x.len(),
            n * cols,
            "activations are not whole rows of {cols}"
        );
        let mut p = PreparedX {
            kernel,
            cols,
            f: Vec::new(),
            f_len: 0,
            q: Vec::new(),
            q_len: 0,
            s: Vec::new(),
            s_len: 0,
        };
        match kernel {
            #[cfg(target_arch = "x86_64")]
            BitplaneKernel::Avx2I16 | BitplaneKernel::Avx512Vbmi => {
                type Lens = fn(usize) -> (usize, usize);
                type Prepare = fn(&[f32], &mut Vec<i16>, &mut Vec<f32>);
                let (lens, prepare): (Lens, Prepare) = if kernel == BitplaneKernel::Avx2I16 {
                    (avx2_i16::prepared_lens, avx2_i16::prepare)
                } else {
                    (avx512_vbmi::prepared_lens, avx512_vbmi::prepare)
                };
                (p.q_len, p.s_len) = lens(cols);
                p.q.reserve(n * p.q_len);
                p.s.reserve(n * p.s_len);
                for t in x.chunks(cols) {
                    prepare(t, &mut p.q, &mut p.s);
                }
            }
            BitplaneKernel::Avx2 => {
                p.f_len = cols.div_ceil(BLOCK) * BLOCK;
                p.f.resize(n * p.f_len, 0.0);
                for (t, xt) in x.chunks(cols).enumerate() {
                    let out = &mut p.f[t * p.f_len..(t + 1) * p.f_len];
                    for (c, &v) in xt.iter().enumerate() {
                        let o = (c / BLOCK) * BLOCK;
                        let c = c % BLOCK;
                        out[o + 32 * (c % 8) + c / 8] = v;
                    }
                }
            }
            _ => {
                p.f_len = cols;
                p.f.extend_from_slice(x);
            }
        }
        p
    }
}

/// A layer's LUTs at one precision in the form one kernel reads them, made once
/// by [`BitplaneKernel::kernel_luts`] and kept beside the f16 LUTs: for AVX2-i16
/// each row's 14-bit byte tables and scale. Building them per call cost about a
/// fifth of a 4-bit GEMV on 576-column rows.
pub struct KernelLuts {
    kernel: BitplaneKernel,
    bits: u32,
    tables: Vec<u8>,
    scales: Vec<f32>,
}

impl KernelLuts {
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.tables.len() + 4 * self.scales.len()
    }
}

impl BitplaneKernel {
    /// True when the kernel reads LUTs in a form of its own ([`KernelLuts`]).
    pub fn has_own_luts(self) -> bool {
        matches!(
            self.effective(),
            BitplaneKernel::Avx2I16 | BitplaneKernel::Avx512Vbmi
        )
    }

    /// The LUTs `luts` [rows × 2^bits] of a layer at `bits` in this kernel's
    /// form, or `None` when it reads the f16 LUTs as they are.
    pub fn kernel_luts(self, bits: u32, luts: &[f16]) -> Option<KernelLuts> {
        assert!(
            (3..=8).contains(&bits),
            "bit-plane kernels run 3..=8 bits, not {bits}"
        );
        let kernel = self.effective();
        match kernel {
            #[cfg(target_arch = "x86_64")]
            BitplaneKernel::Avx2I16 => {
                // SAFETY: `effective` checked the CPU features.
                let (tables, scales) = unsafe { avx2_i16::tables(bits, luts) };
                Some(KernelLuts {
                    kernel,
                    bits,
                    tables,
                    scales,
                })
            }
            #[cfg(target_arch = "x86_64")]
            BitplaneKernel::Avx512Vbmi => {
                let (tables, scales) = avx512_vbmi::tables(bits, luts);
                Some(KernelLuts {
                    kernel,
                    bits,
                    tables,
                    scales,
                })
            }
            _ => None,
        }
    }
}

impl PreparedX {
    /// Token `t`'s 16-bit activations and their scales (AVX2-i16, AVX-512 VBMI).
    fn i16_input(&self, t: usize) -> (&[i16], &[f32]) {
        (
            &self.q[t * self.q_len..(t + 1) * self.q_len],
            &self.s[t * self.s_len..(t + 1) * self.s_len],
        )
    }

    /// [`PreparedX::dot_row`] of token `t` for each row in `rows` of a layer
    /// whose planes are plane-major ([plane][row][word], `stride` = rows × words
    /// words apart) and whose LUTs at `bits` are `luts` [rows × 2^bits], into
    /// `out`. A kernel with LUTs of its own form reads `own` when it holds them
    /// (the layer's, from [`BitplaneKernel::kernel_luts`]) and otherwise makes
    /// them for these rows.
    #[allow(clippy::too_many_arguments)]
    pub fn dot_rows(
        &self,
        t: usize,
        planes: &[u32],
        stride: usize,
        bits: u32,
        luts: &[f16],
        own: Option<&KernelLuts>,
        rows: std::ops::Range<usize>,
        out: &mut [f32],
    ) {
        let words = self.cols.div_ceil(32);
        assert!(
            (3..=8).contains(&bits)
                && out.len() == rows.len()
                && rows.end * words <= stride
                && planes.len() >= (bits as usize - 1) * stride + rows.end * words
                && luts.len() >= rows.end << bits,
            "rows {rows:?} at {bits} bits do not fit the layer"
        );
        #[cfg(target_arch = "x86_64")]
        if self.kernel.has_own_luts() {
            let (xq, xs) = self.i16_input(t);
            let made;
            let (kl, rows, planes) = match own {
                Some(k)
                    if k.kernel == self.kernel && k.bits == bits && k.scales.len() >= rows.end =>
                {
                    (k, rows, planes)
                }
                _ => {
                    let lut = &luts[rows.start << bits..rows.end << bits];
                    made = self
                        .kernel
                        .kernel_luts(bits, lut)
                        .expect("the kernel has own LUTs");
                    (&made, 0..rows.len(), &planes[rows.start * words..])
                }
            };
            let vbmi = self.kernel == BitplaneKernel::Avx512Vbmi;
            let layer = I16Rows {
                planes,
                stride,
                words,
                tables: &kl.tables,
                table_bytes: if vbmi {
                    avx512_vbmi::table_bytes(bits)
                } else {
                    avx2_i16::table_bytes(bits)
                },
                scales: &kl.scales,
                xq,
                xs,
            };
            // SAFETY: `effective` checked the CPU features, the planes, tables
            // and scales cover the rows (asserted above; `tables` made one
            // entry per row) and `prepare` laid out the activations.
            return unsafe {
                if vbmi {
                    avx512_vbmi::dot_rows(&layer, bits, rows, out)
                } else {
                    avx2_i16::dot_rows(&layer, bits, rows, out)
                }
            };
        }
        let k = 1usize << bits;
        for (o, r) in out.iter_mut().zip(rows) {
            *o = self.dot_row(
                t,
                &planes[r * words..],
                stride,
                bits,
                &luts[r * k..(r + 1) * k],
            );
        }
    }

    /// Σ_c lut[idx_c]·x_c of token `t` over one row at `bits` (3..=8): the row's
    /// plane 0 at the start of `planes`, plane j `j · stride` words later.
    #[inline]
    pub fn dot_row(&self, t: usize, planes: &[u32], stride: usize, bits: u32, lut: &[f16]) -> f32 {
        assert!(
            (3..=8).contains(&bits),
            "bit-plane kernels run 3..=8 bits, not {bits}"
        );
        let cols = self.cols;
        let words = cols.div_ceil(32);
        assert!(
            stride >= words
                && planes.len() >= (bits as usize - 1) * stride + words
                && lut.len() == 1 << bits
        );
        let f = || &self.f[t * self.f_len..(t + 1) * self.f_len];
        match self.kernel {
            // SAFETY (all three): `effective` checked the CPU features, the
            // slices cover the row (asserted above) and `prepare` laid out the
            // activations for this kernel.
            #[cfg(target_arch = "x86_64")]
            BitplaneKernel::Avx512 => unsafe {
                avx512::dot_row(planes, stride, bits, lut.reinterpret_cast(), f())
            },
            #[cfg(target_arch = "x86_64")]
            BitplaneKernel::Avx2 => unsafe { avx2::dot_row(planes, stride, words, bits, lut, f()) },
            BitplaneKernel::Avx2I16 | BitplaneKernel::Avx512Vbmi => {
                let mut out = [0f32];
                self.dot_rows(t, planes, stride, bits, lut, None, 0..1, &mut out);
                out[0]
            }
            _ => with_lut_f32(lut, |l| dot_row_portable(planes, stride, bits, l, f())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Pack b-bit indices into b planes `stride` words apart, other words filled
    /// with garbage (reference packer, independent of the kernels).
    fn pack(idx: &[u8], bits: u32, extra: usize) -> (Vec<u32>, usize) {
        let stride = idx.len().div_ceil(32) + extra;
        let mut p = vec![0xdead_beefu32; bits as usize * stride];
        for j in 0..bits as usize {
            p[j * stride..j * stride + idx.len().div_ceil(32)].fill(0);
        }
        for (c, &v) in idx.iter().enumerate() {
            for j in 0..bits as usize {
                if (v >> (bits as usize - 1 - j)) & 1 == 1 {
                    p[j * stride + c / 32] |= 1 << (c % 32);
                }
            }
        }
        (p, stride)
    }

    /// How far kernel `k` may be from the exact Σ w·x: f32 rounding, plus for
    /// AVX2-i16 the rounding of each operand to half a step of its group's
    /// largest magnitude over 32767 (activations: groups (c / 256, c mod 8)) or
    /// 16383 (the LUT).
    fn tolerance(k: BitplaneKernel, w: &[f32], x: &[f32], lut: &[f16]) -> f64 {
        let f32_tol = 1e-5 * (x.len() as f64).sqrt();
        if !k.has_own_luts() {
            return f32_tol;
        }
        let half_step = |m: f64| m / (2.0 * 32767.0);
        // The LUT keeps 14 bits (16383) so that four products fit in 31.
        let lut_step = lut
            .iter()
            .map(|v| v.to_f32().abs() as f64)
            .fold(0.0, f64::max)
            / (2.0 * 16383.0);
        // AVX2-i16 groups columns (c / 256, c mod 8), AVX-512 VBMI by the
        // blocks of 64 its `prepare` fills, four runs of 16 columns each.
        let n = x.len();
        let mut group: Vec<usize> = (0..n).map(|c| c / 256 * 8 + c % 8).collect();
        #[cfg(target_arch = "x86_64")]
        if k.effective() == BitplaneKernel::Avx512Vbmi {
            for blk in 0..n.div_ceil(64) {
                for l in 0..4 {
                    let s = avx512_vbmi::run_start(blk, l, n);
                    group[s.min(n)..(s + 16).min(n)].fill(blk);
                }
            }
        }
        let mut group_max = vec![0f64; n];
        for (c, &g) in group.iter().enumerate() {
            group_max[g] = group_max[g].max(x[c].abs() as f64);
        }
        let group_step = |c: usize| half_step(group_max[group[c]]);
        f32_tol
            + (0..x.len())
                .map(|c| {
                    let xs = group_step(c);
                    w[c].abs() as f64 * xs + x[c].abs() as f64 * lut_step + xs * lut_step
                })
                .sum::<f64>()
    }

    #[test]
    fn kernels_match_dequantize_then_multiply() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(21);
        for bits in 3..=8u32 {
            // Word counts modulo 8 of 0..=7: whole, folded (1..=4) and padded (5..=7) last blocks.
            for cols in [
                1usize, 31, 32, 33, 64, 100, 200, 257, 500, 576, 700, 1000, 1024, 1536,
            ] {
                let idx: Vec<u8> = (0..cols)
                    .map(|_| rng.random_range(0..(1u32 << bits)) as u8)
                    .collect();
                let lut: Vec<f16> = (0..1 << bits)
                    .map(|_| f16::from_f32(rng.random_range(-1.0..1.0)))
                    .collect();
                // Magnitudes over four decades, as activations with outliers have.
                let x: Vec<f32> = (0..cols)
                    .map(|_| rng.random_range(-1.0..1.0) * 10f32.powi(rng.random_range(-2..2)))
                    .collect();
                let (planes, words) = pack(&idx, bits, cols % 3);
                let mut deq = vec![0f32; cols];
                dequantize_row(&planes, words, bits, &lut, &mut deq);
                let want: Vec<f32> = idx.iter().map(|&i| lut[i as usize].to_f32()).collect();
                assert_eq!(deq, want, "dequantize b={bits} cols={cols}");
                let r: f64 = want
                    .iter()
                    .zip(&x)
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum();
                for k in BitplaneKernel::available() {
                    let v = k.prepare(&x, cols).dot_row(0, &planes, words, bits, &lut);
                    let tol = tolerance(k, &want, &x, &lut);
                    assert!(
                        (v as f64 - r).abs() < tol,
                        "{} b={bits} cols={cols}: {v} vs {r} (tolerance {tol})",
                        k.name()
                    );
                }
            }
        }
        for k in BitplaneKernel::ALL {
            if !k.is_available() {
                eprintln!("SKIP {} kernel check: this CPU lacks it", k.name());
            }
        }
    }

    #[test]
    fn every_kernel_sits_at_its_discriminant_in_all() {
        // Layers keep one LUT cache per kernel, indexed by `kernel as usize`.
        for (i, k) in BitplaneKernel::ALL.into_iter().enumerate() {
            assert_eq!(k as usize, i, "{}", k.name());
        }
    }

    #[test]
    fn non_finite_activations_give_non_finite_results() {
        let lut: Vec<f16> = (0..16).map(|i| f16::from_f32(i as f32 / 16.0)).collect();
        // A short row and one with whole, SIMD-quantized blocks; the bad value
        // first, last and mid-row, with finite values of its group after it.
        for cols in [40usize, 600] {
            let (planes, words) = pack(&vec![1u8; cols], 4, 0);
            for at in [0, 3, cols / 2, cols - 1] {
                for k in BitplaneKernel::available() {
                    for bad in [f32::NAN, f32::INFINITY] {
                        let mut x = vec![0.5f32; cols];
                        x[at] = bad;
                        let v = k.prepare(&x, cols).dot_row(0, &planes, words, 4, &lut);
                        assert!(
                            !v.is_finite(),
                            "{}: {bad} at {at} of {cols} gave {v}",
                            k.name()
                        );
                    }
                }
            }
        }
    }
}
