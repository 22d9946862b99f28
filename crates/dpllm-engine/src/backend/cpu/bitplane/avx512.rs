//! AVX-512 bit-plane dot product on f16 LUTs, 32 columns per step.
//!
//! A plane word is already a lane mask: bit t of the word for columns 32w..32w+31
//! is lane t of a 32 × 16-bit vector, so a b-bit index vector costs one masked
//! add per plane. The row's f16 LUT sits in registers (32 entries each):
//! ≤ 5 bits is one `vpermw`, 6 bits one `vpermt2w` over 64 entries, and 7..8 bits
//! 2..4 such lookups merged by masked blends whose masks are the top planes
//! themselves (no gathers). Two `vcvtph2ps` and two FMAs finish the step.

use std::arch::x86_64::*;

/// f16 values (as u16) of the 32 columns whose plane words are `word(j)`.
#[inline(always)]
unsafe fn lookup32<const B: usize>(tables: &[__m512i; 8], word: impl Fn(usize) -> u32) -> __m512i {
    // The low min(B, 6) index bits: planes B-6..B-1 (plane B-1 is the least significant bit).
    let mut idx = _mm512_setzero_si512();
    for k in 0..B.min(6) {
        idx = _mm512_mask_add_epi16(idx, word(B - 1 - k), idx, _mm512_set1_epi16(1 << k));
    }
    if B <= 5 {
        return _mm512_permutexvar_epi16(idx, tables[0]);
    }
    // One 64-entry lookup per value of the top B-6 bits, then a blend tree.
    let n = 1usize << (B - 6);
    let mut vals = [_mm512_setzero_si512(); 4];
    for (t, v) in vals.iter_mut().enumerate().take(n) {
        *v = _mm512_permutex2var_epi16(tables[2 * t], idx, tables[2 * t + 1]);
    }
    // Level l merges pairs that differ in index bit 6+l, held by plane B-7-l.
    let mut width = n;
    let mut level = 0;
    while width > 1 {
        let m = word(B - 7 - level);
        for t in 0..width / 2 {
            vals[t] = _mm512_mask_blend_epi16(m, vals[2 * t], vals[2 * t + 1]);
        }
        width /= 2;
        level += 1;
    }
    vals[0]
}

#[inline(always)]
unsafe fn dot_row_b<const B: usize>(planes: &[u32], stride: usize, lut: &[u16], x: &[f32]) -> f32 {
    let cols = x.len();
    let full = cols / 32;
    let lp = lut.as_ptr();
    let mut tables = [_mm512_setzero_si512(); 8];
    if B < 5 {
        tables[0] = _mm512_maskz_loadu_epi16((1u32 << (1 << B)) - 1, lp as *const i16);
    } else {
        for (i, t) in tables.iter_mut().enumerate().take((1 << B) / 32) {
            *t = _mm512_loadu_si512(lp.add(32 * i) as *const __m512i);
        }
    }
    let pp = planes.as_ptr();
    let xp = x.as_ptr();
    let mut acc0 = _mm512_setzero_ps();
    let mut acc1 = _mm512_setzero_ps();
    for w in 0..full {
        let v = lookup32::<B>(&tables, |j| *pp.add(j * stride + w));
        let xb = xp.add(w * 32);
        let lo = _mm512_cvtph_ps(_mm512_castsi512_si256(v));
        let hi = _mm512_cvtph_ps(_mm512_extracti64x4_epi64::<1>(v));
        acc0 = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xb), acc0);
        acc1 = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xb.add(16)), acc1);
    }
    let mut s = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
    if full * 32 < cols {
        let mut idx = [0u8; 32];
        super::word_indices(planes, stride, B as u32, full, &mut idx);
        for t in 0..cols - full * 32 {
            s += half::f16::from_bits(lut[idx[t] as usize]).to_f32() * x[full * 32 + t];
        }
    }
    s
}

/// Σ_c lut[idx_c]·x_c over one row at `bits` (3..=8), LUT as f16 bit patterns.
///
/// # Safety
/// The CPU must support AVX-512F and AVX-512BW; `planes` holds `bits` planes
/// `stride` words apart, each of ceil(x.len()/32) words, and `lut` 2^bits entries.
#[target_feature(enable = "avx512f,avx512bw")]
pub unsafe fn dot_row(planes: &[u32], stride: usize, bits: u32, lut: &[u16], x: &[f32]) -> f32 {
    match bits {
        3 => dot_row_b::<3>(planes, stride, lut, x),
        4 => dot_row_b::<4>(planes, stride, lut, x),
        5 => dot_row_b::<5>(planes, stride, lut, x),
        6 => dot_row_b::<6>(planes, stride, lut, x),
        7 => dot_row_b::<7>(planes, stride, lut, x),
        8 => dot_row_b::<8>(planes, stride, lut, x),
        _ => unreachable!("bits {bits} outside 3..=8"),
    }
}
