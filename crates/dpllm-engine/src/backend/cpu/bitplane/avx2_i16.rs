//! AVX2 bit-plane dot product on 16-bit fixed-point operands.
//!
//! Planes are read as in [`super::avx2`] (8 words of a plane per register, byte
//! i holding columns 8i..8i+7), but one shift, mask and or per plane builds the
//! indices of 64 columns at once: column 8i + σ in the low nibble of byte i and
//! column 8i + σ + 4 in the high one. The row's LUT is rounded to 16-bit
//! integers with one scale per row, looked up as byte tables by `pshufb`, and
//! multiplied by the activations, rounded to 16-bit integers with one scale per
//! 32 columns, with `pmaddwd`; every pair sum is widened to f32 before it is
//! scaled and accumulated, so nothing overflows. Each operand keeps 15
//! significant bits of its group's largest magnitude: more than the f16 LUT's
//! 11 for its largest entries, and far finer than the 8-bit activations of
//! llama.cpp's integer kernels.
//!
//! A last block of at most 4 words is folded: its second lane holds the first
//! shifted right by two bits, so the 2 steps of σ cover the 128 columns
//! instead of 4 steps over a half-empty register.

use std::arch::x86_64::*;

use half::f16;

use super::avx2::{bit_to, hsum, split_bytes};
use crate::backend::cpu::fixed16::{self, Q_MAX};

/// Columns of a full block.
const BLOCK: usize = 256;
/// Plane words of a full block.
const BLOCK_WORDS: usize = BLOCK / 32;
/// A last block of at most this many words is folded into 128 columns.
const FOLD_WORDS: usize = 4;

/// Prepared int16 activations and f32 scales of one token's row of `cols` columns.
pub fn prepared_lens(cols: usize) -> (usize, usize) {
    let words = cols.div_ceil(32);
    let (full, rem) = (words / BLOCK_WORDS, words % BLOCK_WORDS);
    match rem {
        0 => (full * BLOCK, full * 64),
        1..=FOLD_WORDS => (full * BLOCK + BLOCK / 2, full * 64 + 32),
        _ => ((full + 1) * BLOCK, (full + 1) * 64),
    }
}

/// Position of column c of a block in the prepared layout, for full (`false`)
/// and folded (`true`) blocks; see [`prepare`].
fn position(c: usize, folded: bool) -> usize {
    let (i, r) = (c / 8, c % 8);
    if folded {
        let (sigma, lane, h) = (r % 2, (r / 2) % 2, r / 4);
        64 * sigma + 32 * h + 16 * (i / 8) + i % 8 + 8 * lane
    } else {
        let (sigma, h) = (r % 4, r / 4);
        64 * sigma + 32 * h + 16 * ((i / 8) % 2) + i % 8 + 8 * (i / 16)
    }
}

/// [`position`] of every column of a full block, then of a folded one.
fn positions() -> &'static ([u8; BLOCK], [u8; BLOCK / 2]) {
    static P: std::sync::OnceLock<([u8; BLOCK], [u8; BLOCK / 2])> = std::sync::OnceLock::new();
    P.get_or_init(|| {
        (
            std::array::from_fn(|c| position(c, false) as u8),
            std::array::from_fn(|c| position(c, true) as u8),
        )
    })
}

/// Quantize one token's activations `x` into the order the kernel reads them:
/// `q` gets [`prepared_lens`]`.0` values, `scales` `.1` (appended).
///
/// Column c = 256·blk + 8i + r has the scale of its group (blk, r): the largest
/// |x| of the group over 32767. In a full block it sits at
/// 64σ + 32h + 16·((i/8) mod 2) + i mod 8 + 8·(i/16) with r = σ + 4h; in a
/// folded last block at 64σ + 32h + 16·(i/8) + i mod 8 + 8l with r = σ + 2l + 4h.
/// Each (σ, h) has 8 scales, one per f32 lane of the kernel's products.
pub fn prepare(x: &[f32], q: &mut Vec<i16>, scales: &mut Vec<f32>) {
    let cols = x.len();
    let (qn, sn) = prepared_lens(cols);
    let (q0, s0) = (q.len(), scales.len());
    q.resize(q0 + qn, 0);
    scales.resize(s0 + sn, 0.0);
    let (q, scales) = (&mut q[q0..], &mut scales[s0..]);
    let words = cols.div_ceil(32);
    let (full, rem) = (words / BLOCK_WORDS, words % BLOCK_WORDS);
    let (pos_full, pos_folded) = positions();
    for (blk, xb) in x.chunks(BLOCK).enumerate() {
        let folded = blk == full && (1..=FOLD_WORDS).contains(&rem);
        let mut top = [0f32; 8];
        for (c, &v) in xb.iter().enumerate() {
            top[c % 8] = fixed16::track_max(top[c % 8], v);
        }
        let (inv, step) = (
            top.map(|m| fixed16::scales(m).0),
            top.map(|m| fixed16::scales(m).1),
        );
        let qb = &mut q[blk * BLOCK..];
        let pos: &[u8] = if folded { pos_folded } else { pos_full };
        for (c, (&v, &p)) in xb.iter().zip(pos).enumerate() {
            qb[p as usize] = fixed16::quantize(v, inv[c % 8]);
        }
        let sb = &mut scales[blk * 64..];
        let sigmas = if folded { 2 } else { 4 };
        for sigma in 0..sigmas {
            for h in 0..2 {
                let o = (2 * sigma + h) * 8;
                for lane in 0..8 {
                    let r = if folded {
                        sigma + 2 * (lane / 4) + 4 * h
                    } else {
                        sigma + 4 * h
                    };
                    sb[o + lane] = step[r];
                }
            }
        }
    }
}

/// Index bits of columns 8i + σ (low nibble) and 8i + σ + 4 (high nibble): the
/// low min(B, 4) bits, from planes B−4..B−1 (plane 0 is the most significant).
#[inline(always)]
unsafe fn pair_indices<const B: usize>(p: &[__m256i; B], sigma: u32) -> __m256i {
    let mut v = _mm256_setzero_si256();
    for (j, &pj) in p.iter().enumerate().skip(B.saturating_sub(4)) {
        let k = (B - 1 - j) as u32;
        let m = _mm256_set1_epi8(((1u32 << k) | (1 << (k + 4))) as i8);
        v = _mm256_or_si256(v, _mm256_and_si256(bit_to(pj, sigma, k), m));
    }
    v
}

/// The 16-bit LUT values of the 32 columns whose low index bits are `idx`
/// (bit 7 clear), as [i 0..7 | i 16..23] and [i 8..15 | i 24..31]; above 4 bits
/// the tables are merged by blends on plane bit `pos` (the columns' bit position).
#[inline(always)]
unsafe fn lookup<const B: usize, const T: usize>(
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
    // Level l merges runs that differ in index bit 4 + l, held by plane B − 5 − l.
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

/// One block: `SIGMAS` steps of 64 columns (4 for a full block, 2 folded).
#[inline(always)]
unsafe fn block<const B: usize, const T: usize, const SIGMAS: u32>(
    p: &[__m256i; B],
    tlo: &[__m256i; T],
    thi: &[__m256i; T],
    xq: *const i16,
    xs: *const f32,
    acc: &mut [__m256; 4],
) {
    let nib = _mm256_set1_epi8(0x0f);
    for sigma in 0..SIGMAS {
        let v = pair_indices::<B>(p, sigma);
        // `pshufb` ignores bits 4..6; bit 7 (index bit 3 of the high column) must be clear.
        let low = if B >= 4 { _mm256_and_si256(v, nib) } else { v };
        let high = _mm256_and_si256(_mm256_srli_epi16(v, 4), nib);
        for (h, idx) in [low, high].into_iter().enumerate() {
            let (a, b) = lookup::<B, T>(tlo, thi, p, idx, sigma + 4 * h as u32);
            let o = 2 * sigma as usize + h;
            let xo = xq.add(32 * o);
            let sc = _mm256_loadu_ps(xs.add(8 * o));
            let pa = _mm256_madd_epi16(a, _mm256_loadu_si256(xo as *const __m256i));
            let pb = _mm256_madd_epi16(b, _mm256_loadu_si256(xo.add(16) as *const __m256i));
            acc[2 * h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(pa), sc, acc[2 * h]);
            acc[2 * h + 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(pb), sc, acc[2 * h + 1]);
        }
    }
}

/// The row's LUT as 16-bit integers (byte tables of 16 entries each, `T` of
/// them) and the scale that turns them back into values.
#[inline(always)]
unsafe fn q16_tables<const T: usize>(lut: &[f16]) -> ([__m256i; T], [__m256i; T], f32) {
    let ptr = lut.as_ptr() as *const __m128i;
    let eight = |k: usize| {
        if 8 * k < lut.len() {
            _mm256_cvtph_ps(_mm_loadu_si128(ptr.add(k)))
        } else {
            _mm256_setzero_ps()
        }
    };
    let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    let mut m = _mm256_setzero_ps();
    for k in 0..lut.len().div_ceil(8) {
        m = _mm256_max_ps(m, _mm256_and_ps(eight(k), abs));
    }
    let h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    let h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    let mx = _mm_cvtss_f32(_mm_max_ss(h, _mm_shuffle_ps(h, h, 1)));
    let inv = _mm256_set1_ps(if mx > 0.0 { Q_MAX / mx } else { 0.0 });
    let mut tlo = [_mm256_setzero_si256(); T];
    let mut thi = [_mm256_setzero_si256(); T];
    for t in 0..T {
        let q0 = _mm256_cvtps_epi32(_mm256_mul_ps(eight(2 * t), inv));
        let q1 = _mm256_cvtps_epi32(_mm256_mul_ps(eight(2 * t + 1), inv));
        // packs works per lane: [0..3, 8..11 | 4..7, 12..15] → in order.
        let q = _mm256_permute4x64_epi64(_mm256_packs_epi32(q0, q1), 0b11_01_10_00);
        (tlo[t], thi[t]) = split_bytes(q);
    }
    (tlo, thi, mx / Q_MAX)
}

/// Words `w0..w0 + n` (n ≤ 8) of every plane, zero beyond n.
#[inline(always)]
unsafe fn load_planes<const B: usize>(
    planes: &[u32],
    stride: usize,
    w0: usize,
    n: usize,
) -> [__m256i; B] {
    let mut p = [_mm256_setzero_si256(); B];
    if n == BLOCK_WORDS {
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

/// Σ lut[idx_c]·x_c over one row at `B` bits from `T` = 2^(B−4) (at least 1)
/// byte tables.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot<const B: usize, const T: usize>(
    planes: &[u32],
    stride: usize,
    words: usize,
    lut: &[f16],
    xq: &[i16],
    xs: &[f32],
) -> f32 {
    let (tlo, thi, lut_scale) = q16_tables::<T>(lut);
    let mut acc = [_mm256_setzero_ps(); 4];
    let (full, rem) = (words / BLOCK_WORDS, words % BLOCK_WORDS);
    let (xq, xs) = (xq.as_ptr(), xs.as_ptr());
    for blk in 0..full {
        let p = load_planes::<B>(planes, stride, blk * BLOCK_WORDS, BLOCK_WORDS);
        block::<B, T, 4>(
            &p,
            &tlo,
            &thi,
            xq.add(blk * BLOCK),
            xs.add(blk * 64),
            &mut acc,
        );
    }
    let (xq, xs) = (xq.add(full * BLOCK), xs.add(full * 64));
    if rem > FOLD_WORDS {
        let p = load_planes::<B>(planes, stride, full * BLOCK_WORDS, rem);
        block::<B, T, 4>(&p, &tlo, &thi, xq, xs, &mut acc);
    } else if rem > 0 {
        let mut p = load_planes::<B>(planes, stride, full * BLOCK_WORDS, rem);
        for pj in p.iter_mut() {
            let lane0 = _mm256_castsi256_si128(*pj);
            *pj = _mm256_set_m128i(_mm_srli_epi16(lane0, 2), lane0);
        }
        block::<B, T, 2>(&p, &tlo, &thi, xq, xs, &mut acc);
    }
    hsum(acc) * lut_scale
}

/// Σ_c lut[idx_c]·x_c over one row at `bits` (3..=8), from activations
/// [`prepare`]d for the row's `words` words.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; `planes` holds `bits` planes
/// `stride` words apart, each of `words` words; `lut` has 2^bits entries; `xq`
/// and `xs` are at least [`prepared_lens`] long.
pub unsafe fn dot_row(
    planes: &[u32],
    stride: usize,
    words: usize,
    bits: u32,
    lut: &[f16],
    xq: &[i16],
    xs: &[f32],
) -> f32 {
    match bits {
        3 => dot::<3, 1>(planes, stride, words, lut, xq, xs),
        4 => dot::<4, 1>(planes, stride, words, lut, xq, xs),
        5 => dot::<5, 2>(planes, stride, words, lut, xq, xs),
        6 => dot::<6, 4>(planes, stride, words, lut, xq, xs),
        7 => dot::<7, 8>(planes, stride, words, lut, xq, xs),
        _ => dot::<8, 16>(planes, stride, words, lut, xq, xs),
    }
}
