//! 8-bit block (Q8_0) rows: per block of 32, Σ q·x in f32 times the block's
//! scale. A portable reference beside an AVX2 kernel, chosen at run time.

use dpllm_format::q8::{Q8Matrix, Q8_BLOCK};
use half::f16;

use super::matmul::{gemv_row_ranges, matmul_tiled};

/// Σ_j w_j·x_j of one row: `scales` (cols/32), `quants` (cols) (portable).
pub fn dot_q8_portable(scales: &[f16], quants: &[i8], x: &[f32]) -> f32 {
    let mut acc = 0f32;
    for ((q, xb), s) in quants.chunks(Q8_BLOCK).zip(x.chunks(Q8_BLOCK)).zip(scales) {
        let dot: f32 = q.iter().zip(xb).map(|(&q, &x)| q as f32 * x).sum();
        acc += dot * s.to_f32();
    }
    acc
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::*;

    /// [`super::dot_q8_portable`] with AVX2 + FMA: 32 bytes widened to 4×8 f32 per block.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q8(scales: &[f16], quants: &[i8], x: &[f32]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        let (q, xp) = (quants.as_ptr(), x.as_ptr());
        for (b, s) in scales.iter().enumerate() {
            let o = b * Q8_BLOCK;
            let mut blk = _mm256_setzero_ps();
            for part in 0..4 {
                let bytes = _mm_loadl_epi64(q.add(o + part * 8) as *const __m128i);
                let w = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
                blk = _mm256_fmadd_ps(w, _mm256_loadu_ps(xp.add(o + part * 8)), blk);
            }
            // The scale widened in-register (the `half` crate's portable conversion is branchy).
            let scale = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(s.to_bits() as i32)));
            acc = _mm256_fmadd_ps(blk, _mm256_set1_ps(scale), acc);
        }
        hsum(acc)
    }

    #[inline(always)]
    unsafe fn hsum(acc: __m256) -> f32 {
        let hi = _mm256_extractf128_ps(acc, 1);
        let s4 = _mm_add_ps(_mm256_castps256_ps128(acc), hi);
        let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)))
    }

    /// Σ_j w_j·x_j of one row on 16-bit activations `xq` with one scale per
    /// block in `xs`: per block, two `pmaddwd` of the sign-extended bytes, then
    /// one f32 FMA by the product of the two scales (made for 8 blocks at once).
    #[inline(always)]
    unsafe fn dot_q8_i16(scales: &[f16], quants: &[i8], xq: &[i16], xs: &[f32]) -> f32 {
        let mut acc = [_mm256_setzero_ps(); 2];
        let (q, x) = (quants.as_ptr(), xq.as_ptr());
        let nb = scales.len();
        let mut both = [0f32; 8];
        for g in (0..nb).step_by(8) {
            let n = (nb - g).min(8);
            let (w, sx) = if n == 8 {
                (
                    _mm_loadu_si128(scales.as_ptr().add(g) as *const __m128i),
                    _mm256_loadu_ps(xs.as_ptr().add(g)),
                )
            } else {
                let (mut ws, mut sx) = ([0u16; 8], [0f32; 8]);
                for k in 0..n {
                    ws[k] = scales[g + k].to_bits();
                    sx[k] = xs[g + k];
                }
                (
                    _mm_loadu_si128(ws.as_ptr() as *const __m128i),
                    _mm256_loadu_ps(sx.as_ptr()),
                )
            };
            _mm256_storeu_ps(both.as_mut_ptr(), _mm256_mul_ps(_mm256_cvtph_ps(w), sx));
            for (k, &sk) in both.iter().enumerate().take(n) {
                let o = (g + k) * Q8_BLOCK;
                let w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(q.add(o) as *const __m128i));
                let w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(q.add(o + 16) as *const __m128i));
                let p = _mm256_add_epi32(
                    _mm256_madd_epi16(w0, _mm256_loadu_si256(x.add(o) as *const __m256i)),
                    _mm256_madd_epi16(w1, _mm256_loadu_si256(x.add(o + 16) as *const __m256i)),
                );
                let a = &mut acc[k % 2];
                *a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(sk), *a);
            }
        }
        hsum(_mm256_add_ps(acc[0], acc[1]))
    }

    /// [`dot_q8_i16`] of rows `rows` of `w` into `out`, in one call.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C; `xq` holds `w.cols` values and
    /// `xs` `w.cols / 32`; `out` is as long as `rows`, which lie in `w`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_rows_q8_i16(
        w: &Q8Matrix,
        rows: std::ops::Range<usize>,
        xq: &[i16],
        xs: &[f32],
        out: &mut [f32],
    ) {
        let nb = w.cols / Q8_BLOCK;
        for (o, r) in out.iter_mut().zip(rows) {
            *o = dot_q8_i16(
                w.scales.get_unchecked(r * nb..(r + 1) * nb),
                w.quants.get_unchecked(r * w.cols..),
                xq,
                xs,
            );
        }
    }
}

/// A Q8_0 row kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Q8Kernel {
    /// Plain Rust.
    Portable,
    /// AVX2 + FMA + F16C on f32 activations.
    Avx2,
    /// AVX2 + FMA + F16C on activations rounded to 16 bits per block of 32
    /// ([`super::fixed16`]): integer products, half the instructions.
    Avx2I16,
}

/// One call's activations as a [`Q8Kernel`] reads them.
pub enum Q8Input<'a> {
    /// As they are, [n × cols].
    F32(&'a [f32], usize),
    /// 16-bit integers [n × cols] and one scale per block of 32 [n × cols/32].
    I16(Vec<i16>, Vec<f32>, usize),
}

impl Q8Kernel {
    /// Every kernel, slowest first.
    pub const ALL: [Q8Kernel; 3] = [Q8Kernel::Portable, Q8Kernel::Avx2, Q8Kernel::Avx2I16];

    /// True when this CPU runs the kernel.
    pub fn is_available(self) -> bool {
        match self {
            Q8Kernel::Portable => true,
            Q8Kernel::Avx2 | Q8Kernel::Avx2I16 => {
                super::bitplane::BitplaneKernel::Avx2.is_available()
            }
        }
    }

    /// The fastest kernel this CPU runs.
    pub fn best() -> Q8Kernel {
        if Q8Kernel::Avx2I16.is_available() {
            Q8Kernel::Avx2I16
        } else {
            Q8Kernel::Portable
        }
    }

    /// The activations `x` [n × cols] in the form this kernel reads.
    pub fn prepare(self, x: &[f32], cols: usize) -> Q8Input<'_> {
        match self {
            Q8Kernel::Avx2I16 if self.is_available() => {
                let (mut q, mut s) = (Vec::with_capacity(x.len()), Vec::new());
                for t in x.chunks(cols) {
                    super::fixed16::quantize_groups(t, Q8_BLOCK, &mut q, &mut s);
                }
                Q8Input::I16(q, s, cols)
            }
            _ => Q8Input::F32(x, cols),
        }
    }

    /// Σ w·x of rows `rows` of `w` and token `t` of `x` (prepared by this
    /// kernel) into `out`.
    pub fn dot_rows(
        self,
        w: &Q8Matrix,
        rows: std::ops::Range<usize>,
        x: &Q8Input,
        t: usize,
        out: &mut [f32],
    ) {
        let nb = w.cols / Q8_BLOCK;
        assert!(rows.end <= w.rows && out.len() == rows.len());
        match *x {
            Q8Input::I16(ref xq, ref xs, cols) => {
                assert!(cols == w.cols && self == Q8Kernel::Avx2I16);
                let (xq, xs) = (&xq[t * cols..(t + 1) * cols], &xs[t * nb..(t + 1) * nb]);
                // SAFETY: `prepare` made I16 input only where the CPU has AVX2;
                // lengths sliced and rows checked above.
                #[cfg(target_arch = "x86_64")]
                return unsafe { avx2::dot_rows_q8_i16(w, rows, xq, xs, out) };
                #[cfg(not(target_arch = "x86_64"))]
                unreachable!("no 16-bit input without AVX2: {xq:?} {xs:?}")
            }
            Q8Input::F32(x, cols) => {
                assert_eq!(cols, w.cols);
                let x = &x[t * cols..(t + 1) * cols];
                for (o, r) in out.iter_mut().zip(rows) {
                    let (s, q) = (
                        &w.scales[r * nb..(r + 1) * nb],
                        &w.quants[r * w.cols..(r + 1) * w.cols],
                    );
                    *o = match self {
                        // SAFETY: the CPU has the features (checked); lengths sliced above.
                        #[cfg(target_arch = "x86_64")]
                        Q8Kernel::Avx2 if self.is_available() => unsafe { avx2::dot_q8(s, q, x) },
                        _ => dot_q8_portable(s, q, x),
                    };
                }
            }
        }
    }
}

/// Up to this many tokens Q8_0 rows run as a GEMV. Its fast kernel rounds the
/// activations to 16 bits, which moves SmolLM2's logits (a Q8_0 output layer)
/// by about 1e-3 against float64; from 5 tokens the f32 tiles keep a prompt's
/// logits at f32 rounding (5e-4), so this stays at 4 where the f32 and
/// bit-plane layers take up to 8 (`GEMV_MAX_TOKENS`).
const Q8_GEMV_MAX_TOKENS: usize = 4;

/// `y [n × rows] = x [n × cols] · Wᵀ` for Q8_0 weights: a GEMV streaming the
/// bytes for a few tokens, f32 tiles through `gemm` for more.
pub fn matmul_q8(w: &Q8Matrix, x: &[f32], n: usize, y: &mut [f32]) {
    matmul_q8_with(Q8Kernel::best(), w, x, n, y)
}

/// [`matmul_q8`] with a chosen GEMV kernel.
pub fn matmul_q8_with(k: Q8Kernel, w: &Q8Matrix, x: &[f32], n: usize, y: &mut [f32]) {
    if n <= Q8_GEMV_MAX_TOKENS {
        let input = k.prepare(x, w.cols);
        gemv_row_ranges(w.rows, n, y, |t, range, out| {
            k.dot_rows(w, range, &input, t, out)
        });
    } else {
        matmul_tiled(w.rows, w.cols, x, n, y, |r0, tile| {
            for (i, row) in tile.chunks_mut(w.cols).enumerate() {
                w.row_f32(r0 + i, row);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn kernels_match_the_dequantized_reference() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(8);
        // Fewer than 8 blocks a row; 2 groups of 8 and 2 more.
        for (rows, cols) in [(19, 160), (21, 576)] {
            let w = Q8Matrix {
                rows,
                cols,
                scales: (0..rows * cols / 32)
                    .map(|_| f16::from_f32(rng.random_range(-0.05..0.05)))
                    .collect(),
                quants: (0..rows * cols).map(|_| rng.random()).collect(),
            };
            let wf = w.to_f32();
            for n in [1usize, 3, 7] {
                let x: Vec<f32> = (0..n * cols).map(|_| rng.random_range(-1.0..1.0)).collect();
                for k in Q8Kernel::ALL.into_iter().filter(|k| k.is_available()) {
                    let mut y = vec![0f32; n * rows];
                    matmul_q8_with(k, &w, &x, n, &mut y);
                    for t in 0..n {
                        let xt = &x[t * cols..(t + 1) * cols];
                        for r in 0..rows {
                            let wr = &wf[r * cols..(r + 1) * cols];
                            let want: f64 =
                                wr.iter().zip(xt).map(|(&w, &x)| w as f64 * x as f64).sum();
                            // 16-bit activations: within half a step of 1/32767 of |x| ≤ 1.
                            let rounding = if k == Q8Kernel::Avx2I16 {
                                wr.iter().map(|w| w.abs() as f64).sum::<f64>() / 65534.0
                            } else {
                                0.0
                            };
                            let got = y[t * rows + r];
                            assert!(
                                (got as f64 - want).abs() < 1e-4 + rounding,
                                "{k:?} n={n} row {r}: {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
        assert!(
            Q8Kernel::Avx2I16.is_available() || {
                eprintln!("SKIP the AVX2 Q8_0 kernels: this CPU lacks AVX2");
                true
            }
        );
    }
}
