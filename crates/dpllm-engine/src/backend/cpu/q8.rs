//! 8-bit block (Q8_0) rows: per block of 32, Σ q·x in f32 times the block's
//! scale. A portable reference beside an AVX2 kernel, chosen at run time.

use dpllm_format::q8::{Q8Matrix, Q8_BLOCK};
use half::f16;

use super::matmul::{gemv_rows, matmul_tiled, GEMV_MAX_TOKENS};

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
        let hi = _mm256_extractf128_ps(acc, 1);
        let s4 = _mm_add_ps(_mm256_castps256_ps128(acc), hi);
        let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)))
    }
}

/// A Q8_0 row kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Q8Kernel {
    /// Plain Rust.
    Portable,
    /// AVX2 + FMA + F16C.
    Avx2,
}

impl Q8Kernel {
    /// The fastest kernel this CPU runs.
    pub fn best() -> Q8Kernel {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
        {
            return Q8Kernel::Avx2;
        }
        Q8Kernel::Portable
    }

    /// Σ w·x of row `r` of `w`.
    pub fn dot_row(self, w: &Q8Matrix, r: usize, x: &[f32]) -> f32 {
        let nb = w.cols / Q8_BLOCK;
        let (s, q) = (
            &w.scales[r * nb..(r + 1) * nb],
            &w.quants[r * w.cols..(r + 1) * w.cols],
        );
        assert_eq!(x.len(), w.cols);
        match self {
            Q8Kernel::Portable => dot_q8_portable(s, q, x),
            // SAFETY: `best()` returns Avx2 only when the CPU has the features; lengths checked.
            #[cfg(target_arch = "x86_64")]
            Q8Kernel::Avx2 => unsafe { avx2::dot_q8(s, q, x) },
            #[cfg(not(target_arch = "x86_64"))]
            Q8Kernel::Avx2 => dot_q8_portable(s, q, x),
        }
    }
}

/// `y [n × rows] = x [n × cols] · Wᵀ` for Q8_0 weights: a GEMV streaming the
/// bytes for a few tokens, f32 tiles through `gemm` for more.
pub fn matmul_q8(w: &Q8Matrix, x: &[f32], n: usize, y: &mut [f32]) {
    let k = Q8Kernel::best();
    if n <= GEMV_MAX_TOKENS {
        gemv_rows(w.rows, n, w.cols, x, y, |r, xt| k.dot_row(w, r, xt));
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
        let (rows, cols) = (19, 160);
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
            let mut y = vec![0f32; n * rows];
            matmul_q8(&w, &x, n, &mut y);
            for t in 0..n {
                for r in 0..rows {
                    let want: f64 = (0..cols)
                        .map(|c| wf[r * cols + c] as f64 * x[t * cols + c] as f64)
                        .sum();
                    for got in [
                        y[t * rows + r],
                        Q8Kernel::Portable.dot_row(&w, r, &x[t * cols..(t + 1) * cols]),
                        Q8Kernel::best().dot_row(&w, r, &x[t * cols..(t + 1) * cols]),
                    ] {
                        assert!(
                            (got as f64 - want).abs() < 1e-4,
                            "n={n} row {r}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
