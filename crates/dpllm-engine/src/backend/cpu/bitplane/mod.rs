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

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;

/// An implementation of the bit-plane dot product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BitplaneKernel {
    /// Plain Rust, any CPU.
    Portable,
    /// AVX2 + FMA + F16C (x86-64).
    Avx2,
    /// AVX-512F + AVX-512BW (x86-64).
    Avx512,
}

impl BitplaneKernel {
    /// Short name for tables.
    pub fn name(self) -> &'static str {
        match self {
            BitplaneKernel::Portable => "portable",
            BitplaneKernel::Avx2 => "avx2",
            BitplaneKernel::Avx512 => "avx512",
        }
    }

    /// True when this CPU can run the kernel.
    pub fn is_available(self) -> bool {
        // Detected once: the per-row kernels ask for every row.
        static DETECTED: std::sync::OnceLock<[bool; 2]> = std::sync::OnceLock::new();
        #[cfg(target_arch = "x86_64")]
        let detect = || {
            [
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c"),
                is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw"),
            ]
        };
        #[cfg(not(target_arch = "x86_64"))]
        let detect = || [false, false];
        let [avx2, avx512] = *DETECTED.get_or_init(detect);
        match self {
            BitplaneKernel::Portable => true,
            BitplaneKernel::Avx2 => avx2,
            BitplaneKernel::Avx512 => avx512,
        }
    }

    /// Every kernel this CPU can run, slowest first.
    pub fn available() -> Vec<BitplaneKernel> {
        [
            BitplaneKernel::Portable,
            BitplaneKernel::Avx2,
            BitplaneKernel::Avx512,
        ]
        .into_iter()
        .filter(|k| k.is_available())
        .collect()
    }

    /// The fastest kernel this CPU can run (detected once).
    pub fn best() -> BitplaneKernel {
        static BEST: std::sync::OnceLock<BitplaneKernel> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| {
            *Self::available()
                .last()
                .unwrap_or(&BitplaneKernel::Portable)
        })
    }
}

/// Columns per block of the AVX2 kernel's activation layout.
pub const BLOCK: usize = 256;
/// Plane words per block.
const WORDS_PER_BLOCK: usize = BLOCK / 32;

impl BitplaneKernel {
    /// Append one token's activations `x` to `out` in the order this kernel reads
    /// them ([`dot_row_with`] takes them so): as they are, or for AVX2, per block
    /// of 256 columns, x[8i + s] at position 32s + i, zero-padded to whole blocks.
    pub fn prepare_x(self, x: &[f32], out: &mut Vec<f32>) {
        if !self.permutes_x() {
            out.extend_from_slice(x);
            return;
        }
        let base = out.len();
        out.resize(base + x.len().div_ceil(BLOCK) * BLOCK, 0.0);
        for (b, block) in x.chunks(BLOCK).enumerate() {
            let o = &mut out[base + b * BLOCK..base + (b + 1) * BLOCK];
            for (c, &v) in block.iter().enumerate() {
                o[32 * (c % 8) + c / 8] = v;
            }
        }
    }

    /// True when this kernel runs and reads the activations in its block order.
    fn permutes_x(self) -> bool {
        self == BitplaneKernel::Avx2 && self.is_available()
    }

    /// Floats [`BitplaneKernel::prepare_x`] appends for a row of `cols` columns.
    pub fn prepared_len(self, cols: usize) -> usize {
        if self.permutes_x() {
            cols.div_ceil(BLOCK) * BLOCK
        } else {
            cols
        }
    }
}

/// Σ_c lut[idx_c]·x_c over one row of `cols` columns at `bits` with a chosen
/// kernel (the portable one when the CPU lacks it); `xp` is the token's
/// activations as `kernel.prepare_x` laid them out.
#[inline]
pub fn dot_row_with(
    kernel: BitplaneKernel,
    planes: &[u32],
    stride: usize,
    bits: u32,
    lut: &[f16],
    xp: &[f32],
    cols: usize,
) -> f32 {
    assert!(
        (3..=8).contains(&bits),
        "bit-plane kernels run 3..=8 bits, not {bits}"
    );
    let words = cols.div_ceil(32);
    assert!(
        stride >= words
            && planes.len() >= (bits as usize - 1) * stride + words
            && lut.len() == 1 << bits
    );
    assert_eq!(
        xp.len(),
        kernel.prepared_len(cols),
        "activations not prepared for the {} kernel",
        kernel.name()
    );
    #[cfg(target_arch = "x86_64")]
    if kernel.is_available() {
        match kernel {
            // SAFETY: the CPU features are checked and the slices cover the row (asserted above).
            BitplaneKernel::Avx512 => {
                return unsafe {
                    avx512::dot_row(planes, stride, bits, lut.reinterpret_cast(), xp)
                };
            }
            // SAFETY: as above; `xp` covers whole blocks (asserted above).
            BitplaneKernel::Avx2 => {
                return unsafe { avx2::dot_row(planes, stride, words, bits, lut, xp) }
            }
            BitplaneKernel::Portable => {}
        }
    }
    let _ = kernel;
    with_lut_f32(lut, |l| dot_row_portable(planes, stride, bits, l, xp))
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

    #[test]
    fn kernels_match_dequantize_then_multiply() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(21);
        for bits in 3..=8u32 {
            for cols in [1usize, 31, 32, 33, 64, 100, 257, 1024] {
                let idx: Vec<u8> = (0..cols)
                    .map(|_| rng.random_range(0..(1u32 << bits)) as u8)
                    .collect();
                let lut: Vec<f16> = (0..1 << bits)
                    .map(|_| f16::from_f32(rng.random_range(-1.0..1.0)))
                    .collect();
                let x: Vec<f32> = (0..cols).map(|_| rng.random_range(-1.0..1.0)).collect();
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
                let tol = 1e-5 * (cols as f64).sqrt();
                let run = |k: BitplaneKernel| {
                    let mut xp = Vec::new();
                    k.prepare_x(&x, &mut xp);
                    dot_row_with(k, &planes, words, bits, &lut, &xp, cols)
                };
                let best = run(BitplaneKernel::best());
                assert!(
                    (best as f64 - r).abs() < tol,
                    "best kernel b={bits} cols={cols}"
                );
                for k in BitplaneKernel::available() {
                    let v = run(k);
                    assert!(
                        (v as f64 - r).abs() < tol,
                        "{} b={bits} cols={cols}",
                        k.name()
                    );
                }
            }
        }
        for k in [BitplaneKernel::Avx2, BitplaneKernel::Avx512] {
            if !k.is_available() {
                eprintln!("SKIP {} kernel check: this CPU lacks it", k.name());
            }
        }
    }
}
