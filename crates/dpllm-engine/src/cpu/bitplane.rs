//! Bit-plane kernels: a b-bit row of an any-precision weight is b bit-planes
//! (planes 0..b−1 of the stored 8, most significant first) plus a per-row table
//! of 2^b centroids. These kernels read only those b planes.
//!
//! Plane layout per row: `planes[j * words + w]` holds bit (b−1−j) of the b-bit
//! index of columns 32w..32w+31 (bit t ↔ column 32w+t).

/// Indices of columns 32w..32w+31 (portable).
#[inline(always)]
fn word_indices(planes: &[u32], words: usize, bits: u32, w: usize, out: &mut [u8; 32]) {
    *out = [0; 32];
    for j in 0..bits as usize {
        let word = planes[j * words + w];
        let shift = bits as usize - 1 - j;
        for (t, o) in out.iter_mut().enumerate() {
            *o |= (((word >> t) & 1) as u8) << shift;
        }
    }
}

/// Dequantize one row at `bits` into `out` (len = cols).
pub fn dequantize_row(planes: &[u32], words: usize, bits: u32, lut: &[f32], out: &mut [f32]) {
    let cols = out.len();
    let mut idx = [0u8; 32];
    for w in 0..words {
        word_indices(planes, words, bits, w, &mut idx);
        let c0 = w * 32;
        let n = (cols - c0).min(32);
        for t in 0..n {
            out[c0 + t] = lut[idx[t] as usize];
        }
    }
}

/// Portable Σ_c lut[idx_c]·x_c over one row.
pub fn dot_row_portable(planes: &[u32], words: usize, bits: u32, lut: &[f32], x: &[f32]) -> f32 {
    let cols = x.len();
    let mut idx = [0u8; 32];
    let mut acc = [0f32; 8];
    let mut tail = 0f32;
    for w in 0..words {
        word_indices(planes, words, bits, w, &mut idx);
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
mod avx2 {
    use std::arch::x86_64::*;

    /// 32 byte-indices of one word column group, built from `bits` planes.
    #[inline(always)]
    unsafe fn indices(planes: *const u32, words: usize, bits: u32, w: usize) -> __m256i {
        let shuf = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
        let sel = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
        let mut idx = _mm256_setzero_si256();
        for j in 0..bits as usize {
            let word = *planes.add(j * words + w);
            let v = _mm256_shuffle_epi8(_mm256_set1_epi32(word as i32), shuf);
            let hit = _mm256_cmpeq_epi8(_mm256_and_si256(v, sel), sel);
            let bit = _mm256_set1_epi8((1u32 << (bits as usize - 1 - j)) as u8 as i8);
            idx = _mm256_or_si256(idx, _mm256_and_si256(hit, bit));
        }
        idx
    }

    /// Look up 8 indices (i32 lanes) in the row's table.
    #[inline(always)]
    unsafe fn lookup(lut: *const f32, bits: u32, lo: __m256, hi: __m256, i: __m256i) -> __m256 {
        match bits {
            3 => _mm256_permutevar8x32_ps(lo, i),
            4 => {
                let a = _mm256_permutevar8x32_ps(lo, i);
                let b = _mm256_permutevar8x32_ps(hi, i);
                let m = _mm256_castsi256_ps(_mm256_slli_epi32(i, 28));
                _mm256_blendv_ps(a, b, m)
            }
            _ => _mm256_i32gather_ps::<4>(lut, i),
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_row(planes: &[u32], words: usize, bits: u32, lut: &[f32], x: &[f32]) -> f32 {
        let cols = x.len();
        let full = cols / 32;
        let lp = lut.as_ptr();
        let lo = _mm256_loadu_ps(lp);
        let hi = if bits >= 4 { _mm256_loadu_ps(lp.add(8)) } else { lo };
        let mut acc0 = _mm256_setzero_ps();
        let mut acc1 = _mm256_setzero_ps();
        let xp = x.as_ptr();
        let pp = planes.as_ptr();
        for w in 0..full {
            let idx = indices(pp, words, bits, w);
            let l128 = _mm256_castsi256_si128(idx);
            let h128 = _mm256_extracti128_si256(idx, 1);
            let i0 = _mm256_cvtepu8_epi32(l128);
            let i1 = _mm256_cvtepu8_epi32(_mm_srli_si128(l128, 8));
            let i2 = _mm256_cvtepu8_epi32(h128);
            let i3 = _mm256_cvtepu8_epi32(_mm_srli_si128(h128, 8));
            let xb = xp.add(w * 32);
            acc0 = _mm256_fmadd_ps(lookup(lp, bits, lo, hi, i0), _mm256_loadu_ps(xb), acc0);
            acc1 = _mm256_fmadd_ps(lookup(lp, bits, lo, hi, i1), _mm256_loadu_ps(xb.add(8)), acc1);
            acc0 = _mm256_fmadd_ps(lookup(lp, bits, lo, hi, i2), _mm256_loadu_ps(xb.add(16)), acc0);
            acc1 = _mm256_fmadd_ps(lookup(lp, bits, lo, hi, i3), _mm256_loadu_ps(xb.add(24)), acc1);
        }
        let v = _mm256_add_ps(acc0, acc1);
        let mut buf = [0f32; 8];
        _mm256_storeu_ps(buf.as_mut_ptr(), v);
        let mut s: f32 = buf.iter().sum();
        if full * 32 < cols {
            let mut idx = [0u8; 32];
            super::word_indices(planes, words, bits, full, &mut idx);
            for t in 0..cols - full * 32 {
                s += lut[idx[t] as usize] * x[full * 32 + t];
            }
        }
        s
    }
}

/// Σ_c lut[idx_c]·x_c over one row at `bits` (SIMD when available).
#[inline]
pub fn dot_row(planes: &[u32], words: usize, bits: u32, lut: &[f32], x: &[f32]) -> f32 {
    debug_assert!(planes.len() >= bits as usize * words && lut.len() == 1 << bits);
    #[cfg(target_arch = "x86_64")]
    if bits >= 3 && is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // SAFETY: features checked; the plane, LUT and x slices cover the row.
        return unsafe { avx2::dot_row(planes, words, bits, lut, x) };
    }
    dot_row_portable(planes, words, bits, lut, x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Pack b-bit indices into b planes (reference packer, independent of the kernels).
    fn pack(idx: &[u8], bits: u32) -> (Vec<u32>, usize) {
        let words = idx.len().div_ceil(32);
        let mut p = vec![0u32; bits as usize * words];
        for (c, &v) in idx.iter().enumerate() {
            for j in 0..bits as usize {
                if (v >> (bits as usize - 1 - j)) & 1 == 1 {
                    p[j * words + c / 32] |= 1 << (c % 32);
                }
            }
        }
        (p, words)
    }

    #[test]
    fn kernels_match_dequantize_then_multiply() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(21);
        for bits in 3..=8u32 {
            for cols in [1usize, 31, 32, 33, 64, 100, 257, 1024] {
                let idx: Vec<u8> = (0..cols).map(|_| rng.random_range(0..(1u32 << bits)) as u8).collect();
                let lut: Vec<f32> = (0..1 << bits).map(|_| rng.random_range(-1.0..1.0)).collect();
                let x: Vec<f32> = (0..cols).map(|_| rng.random_range(-1.0..1.0)).collect();
                let (planes, words) = pack(&idx, bits);
                let mut deq = vec![0f32; cols];
                dequantize_row(&planes, words, bits, &lut, &mut deq);
                let want: Vec<f32> = idx.iter().map(|&i| lut[i as usize]).collect();
                assert_eq!(deq, want, "dequantize b={bits} cols={cols}");
                let r: f64 = want.iter().zip(&x).map(|(a, b)| *a as f64 * *b as f64).sum();
                let tol = 1e-5 * (cols as f64).sqrt();
                assert!((dot_row(&planes, words, bits, &lut, &x) as f64 - r).abs() < tol, "simd b={bits} cols={cols}");
                assert!((dot_row_portable(&planes, words, bits, &lut, &x) as f64 - r).abs() < tol, "portable b={bits} cols={cols}");
            }
        }
    }
}
