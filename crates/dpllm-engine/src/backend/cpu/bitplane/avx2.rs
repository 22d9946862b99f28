//! AVX2 bit-plane dot product: indices from planes by byte shuffles, LUT lookups
//! by in-register permutes (3 and 4 bits) or gathers.

use std::arch::x86_64::*;

/// 32 byte-indices of one word column group, built from `bits` planes.
#[inline(always)]
unsafe fn indices(planes: *const u32, stride: usize, bits: u32, w: usize) -> __m256i {
    let shuf = _mm256_setr_epi8(
        0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3,
        3, 3,
    );
    let sel = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    let mut idx = _mm256_setzero_si256();
    for j in 0..bits as usize {
        let word = *planes.add(j * stride + w);
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

/// Σ_c lut[idx_c]·x_c over one row at `bits` (3..=8).
///
/// # Safety
/// The CPU must support AVX2 and FMA; `planes` holds `bits` planes `stride`
/// words apart, each of ceil(x.len()/32) words, and `lut` 2^bits entries.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dot_row(planes: &[u32], stride: usize, bits: u32, lut: &[f32], x: &[f32]) -> f32 {
    let cols = x.len();
    let full = cols / 32;
    let lp = lut.as_ptr();
    let lo = _mm256_loadu_ps(lp);
    let hi = if bits >= 4 {
        _mm256_loadu_ps(lp.add(8))
    } else {
        lo
    };
    let mut acc0 = _mm256_setzero_ps();
    let mut acc1 = _mm256_setzero_ps();
    let xp = x.as_ptr();
    let pp = planes.as_ptr();
    for w in 0..full {
        let idx = indices(pp, stride, bits, w);
        let l128 = _mm256_castsi256_si128(idx);
        let h128 = _mm256_extracti128_si256(idx, 1);
        let i0 = _mm256_cvtepu8_epi32(l128);
        let i1 = _mm256_cvtepu8_epi32(_mm_srli_si128(l128, 8));
        let i2 = _mm256_cvtepu8_epi32(h128);
        let i3 = _mm256_cvtepu8_epi32(_mm_srli_si128(h128, 8));
        let xb = xp.add(w * 32);
        acc0 = _mm256_fmadd_ps(lookup(lp, bits, lo, hi, i0), _mm256_loadu_ps(xb), acc0);
        acc1 = _mm256_fmadd_ps(
            lookup(lp, bits, lo, hi, i1),
            _mm256_loadu_ps(xb.add(8)),
            acc1,
        );
        acc0 = _mm256_fmadd_ps(
            lookup(lp, bits, lo, hi, i2),
            _mm256_loadu_ps(xb.add(16)),
            acc0,
        );
        acc1 = _mm256_fmadd_ps(
            lookup(lp, bits, lo, hi, i3),
            _mm256_loadu_ps(xb.add(24)),
            acc1,
        );
    }
    let v = _mm256_add_ps(acc0, acc1);
    let mut buf = [0f32; 8];
    _mm256_storeu_ps(buf.as_mut_ptr(), v);
    let mut s: f32 = buf.iter().sum();
    if full * 32 < cols {
        let mut idx = [0u8; 32];
        super::word_indices(planes, stride, bits, full, &mut idx);
        for t in 0..cols - full * 32 {
            s += lut[idx[t] as usize] * x[full * 32 + t];
        }
    }
    s
}
