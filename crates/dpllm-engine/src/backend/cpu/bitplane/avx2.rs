//! AVX2 bit-plane dot product, 256 columns per block.
//!
//! A block reads 8 words (256 columns) of each plane into one register: byte i
//! holds columns 8i..8i+7. For each bit position s the b-bit indices of the 32
//! columns 8i+s (i = 0..31) are one shift, mask and or per plane, with no
//! per-column shuffles; the activations are permuted to that order once per
//! token ([`super::BitplaneKernel::prepare`]). The row's f16 LUT becomes byte tables of 16
//! entries (low and high bytes) looked up by `pshufb`; above 4 bits the lookups
//! of the 2^(b−4) runs are merged by byte blends whose masks are the top planes
//! themselves (no gathers), and `vcvtph2ps` widens the result.

use std::arch::x86_64::*;

use half::f16;

use super::{BLOCK, WORDS_PER_BLOCK};

/// Plane `pj` shifted so that bit `s` of every byte lands on bit `k` of the
/// same byte (other bits are garbage; 16-bit shifts keep the bit in its byte).
#[inline(always)]
pub(super) unsafe fn bit_to(pj: __m256i, s: u32, k: u32) -> __m256i {
    if s >= k {
        _mm256_srl_epi16(pj, _mm_cvtsi32_si128((s - k) as i32))
    } else {
        _mm256_sll_epi16(pj, _mm_cvtsi32_si128((k - s) as i32))
    }
}

/// The low min(B, 4) index bits (a byte each) of columns 8i + s, i = 0..31,
/// of a block whose planes are `p` (plane 0, the most significant bit, first).
#[inline(always)]
unsafe fn low_indices<const B: usize>(p: &[__m256i; B], s: u32) -> __m256i {
    let mut idx = _mm256_setzero_si256();
    for (j, &pj) in p.iter().enumerate().skip(B.saturating_sub(4)) {
        let k = (B - 1 - j) as u32;
        idx = _mm256_or_si256(
            idx,
            _mm256_and_si256(bit_to(pj, s, k), _mm256_set1_epi8(1 << k)),
        );
    }
    idx
}

/// Words `w0..w0 + n` (n ≤ 8) of every plane, zero beyond n (masked loads,
/// so a short last block reads nothing past the row).
#[inline(always)]
pub(super) unsafe fn load_planes<const B: usize>(
    planes: &[u32],
    stride: usize,
    w0: usize,
    n: usize,
) -> [__m256i; B] {
    let mut p = [_mm256_setzero_si256(); B];
    if n == WORDS_PER_BLOCK {
        for (j, pj) in p.iter_mut().enumerate() {
            *pj = _mm256_loadu_si256(planes.as_ptr().add(j * stride + w0) as *const __m256i);
        }
    } else {
        let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), lanes);
        for (j, pj) in p.iter_mut().enumerate() {
            *pj = _mm256_maskload_epi32(planes.as_ptr().add(j * stride + w0) as *const i32, mask);
        }
    }
    p
}

/// Horizontal sum of four accumulators.
#[inline(always)]
pub(super) unsafe fn hsum(a: [__m256; 4]) -> f32 {
    let v = _mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3]));
    let h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    let h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
    _mm_cvtss_f32(h)
}

/// The low and high bytes of the first 16 LUT entries, each table in both lanes.
#[inline(always)]
unsafe fn byte_tables(lut: &[f16]) -> (__m256i, __m256i) {
    let v = if lut.len() >= 16 {
        _mm256_loadu_si256(lut.as_ptr() as *const __m256i)
    } else {
        _mm256_castsi128_si256(_mm_loadu_si128(lut.as_ptr() as *const __m128i))
    };
    split_bytes(v)
}

/// Sixteen 16-bit values (in order) as two `pshufb` tables of their low and
/// high bytes, each table in both lanes.
#[inline(always)]
pub(super) unsafe fn split_bytes(v: __m256i) -> (__m256i, __m256i) {
    // Per lane: the 8 low bytes, then the 8 high bytes.
    let split = _mm256_setr_epi8(
        0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15, 0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5,
        7, 9, 11, 13, 15,
    );
    // [lo 0..7, lo 8..15, hi 0..7, hi 8..15].
    let v = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(v, split), 0b11_01_10_00);
    (
        _mm256_permute2x128_si256(v, v, 0x00),
        _mm256_permute2x128_si256(v, v, 0x11),
    )
}

/// The 16-bit LUT values (two byte tables each of `T` runs of 16 entries) of
/// the 32 columns whose low index bits are `idx` (bit 7 clear), as
/// [i 0..7 | i 16..23] and [i 8..15 | i 24..31]. Above 4 bits the runs are
/// merged by byte blends: level l merges runs that differ in index bit 4 + l,
/// held by plane B − 5 − l at bit position `pos` (the blend reads bit 7 of each
/// byte, so no mask is needed).
#[inline(always)]
pub(super) unsafe fn lookup<const B: usize, const T: usize>(
    tlo: &[__m256i; T],
    thi: &[__m256i; T],
    p: &[__m256i; B],
    idx: __m256i,
    pos: u32,
) -> (__m256i, __m256i) {
    let mut lo = [_mm256_setzero_si256(); T];
    let mut hi = [_mm256_setzero_si256(); T];
    for t in 0..T {
        lo[t] = _mm256_shuffle_epi8(tlo[t], idx);
        hi[t] = _mm256_shuffle_epi8(thi[t], idx);
    }
    let mut width = T;
    let mut l = 0;
    while width > 1 {
        let sel = bit_to(p[B - 5 - l], pos, 7);
        for m in 0..width / 2 {
            lo[m] = _mm256_blendv_epi8(lo[2 * m], lo[2 * m + 1], sel);
            hi[m] = _mm256_blendv_epi8(hi[2 * m], hi[2 * m + 1], sel);
        }
        width /= 2;
        l += 1;
    }
    (
        _mm256_unpacklo_epi8(lo[0], hi[0]),
        _mm256_unpackhi_epi8(lo[0], hi[0]),
    )
}

/// One block of [`dot_tables`]: the 8 bit positions, 32 columns each (16 when `HALF`).
#[inline(always)]
unsafe fn table_block<const B: usize, const T: usize, const HALF: bool>(
    p: &[__m256i; B],
    tlo: &[__m256i; T],
    thi: &[__m256i; T],
    xb: *const f32,
    acc: &mut [__m256; 4],
) {
    for s in 0..8u32 {
        // f16 of i = 0..7 | 16..23, and of i = 8..15 | 24..31.
        let (a, b) = lookup::<B, T>(tlo, thi, p, low_indices::<B>(p, s), s);
        let xs = xb.add(s as usize * 32);
        acc[0] = _mm256_fmadd_ps(
            _mm256_cvtph_ps(_mm256_castsi256_si128(a)),
            _mm256_loadu_ps(xs),
            acc[0],
        );
        acc[1] = _mm256_fmadd_ps(
            _mm256_cvtph_ps(_mm256_castsi256_si128(b)),
            _mm256_loadu_ps(xs.add(8)),
            acc[1],
        );
        if !HALF {
            acc[2] = _mm256_fmadd_ps(
                _mm256_cvtph_ps(_mm256_extracti128_si256(a, 1)),
                _mm256_loadu_ps(xs.add(16)),
                acc[2],
            );
            acc[3] = _mm256_fmadd_ps(
                _mm256_cvtph_ps(_mm256_extracti128_si256(b, 1)),
                _mm256_loadu_ps(xs.add(24)),
                acc[3],
            );
        }
    }
}

/// Σ lut[idx_c]·x_c over one row at `B` bits from `T` = 2^(B−4) (at least 1)
/// runs of 16 LUT entries: `pshufb` lookups in each run's byte tables, merged by
/// byte blends on the index bits above the fourth (the top planes themselves).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_tables<const B: usize, const T: usize>(
    planes: &[u32],
    stride: usize,
    words: usize,
    lut: &[f16],
    xp: &[f32],
) -> f32 {
    let mut tlo = [_mm256_setzero_si256(); T];
    let mut thi = [_mm256_setzero_si256(); T];
    for t in 0..T {
        (tlo[t], thi[t]) = byte_tables(&lut[16 * t..]);
    }
    let mut acc = [_mm256_setzero_ps(); 4];
    for blk in 0..words.div_ceil(WORDS_PER_BLOCK) {
        let w0 = blk * WORDS_PER_BLOCK;
        let p = load_planes::<B>(planes, stride, w0, (words - w0).min(WORDS_PER_BLOCK));
        let xb = xp.as_ptr().add(blk * BLOCK);
        // A last block of at most 4 words (128 columns) has nothing in i = 16..31.
        if words - blk * WORDS_PER_BLOCK <= WORDS_PER_BLOCK / 2 {
            table_block::<B, T, true>(&p, &tlo, &thi, xb, &mut acc);
        } else {
            table_block::<B, T, false>(&p, &tlo, &thi, xb, &mut acc);
        }
    }
    hsum(acc)
}

/// Σ_c lut[idx_c]·x_c over one row at `bits` (3..=8), `xp` prepared by
/// [`super::BitplaneKernel::prepare`] for the row's `words` words.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; `planes` holds `bits` planes
/// `stride` words apart, each of `words` words; `lut` has 2^bits entries and
/// `xp` covers ceil(words / 8) blocks of 256 floats.
pub unsafe fn dot_row(
    planes: &[u32],
    stride: usize,
    words: usize,
    bits: u32,
    lut: &[f16],
    xp: &[f32],
) -> f32 {
    match bits {
        3 => dot_tables::<3, 1>(planes, stride, words, lut, xp),
        4 => dot_tables::<4, 1>(planes, stride, words, lut, xp),
        5 => dot_tables::<5, 2>(planes, stride, words, lut, xp),
        6 => dot_tables::<6, 4>(planes, stride, words, lut, xp),
        7 => dot_tables::<7, 8>(planes, stride, words, lut, xp),
        _ => dot_tables::<8, 16>(planes, stride, words, lut, xp),
    }
}
