//! AVX2 bit-plane dot product on 16-bit fixed-point operands.
//!
//! Planes are read as in [`super::avx2`] (8 words of a plane per register, byte
//! i holding columns 8i..8i+7). A two-stage bit-matrix transpose turns the low
//! four planes of a block into nibbles, 24 operations for 256 columns: step σ's
//! register holds column 8i + σ in the low nibble of byte i and column
//! 8i + σ + 4 in the high one. The row's LUT is rounded to 14-bit integers with
//! one scale per row, looked up as byte tables by `pshufb` (above 4 bits merged
//! by byte blends on the top planes), and multiplied with `pmaddwd` by the
//! activations, rounded to 16-bit integers with one scale per 32 columns; four
//! products are summed in 32 bits (below 2^31) before one conversion to f32, a
//! multiply by the activations' scale and an add. Each activation keeps 15
//! significant bits of its group's largest magnitude and each LUT entry 14 of
//! its row's largest: more than an f16's 11 for the largest, and far finer than
//! the 8-bit activations of llama.cpp's integer kernels.
//!
//! A last block of at most 4 words is folded: steps σ and σ + 2 share one
//! register (one per lane), so 2 steps cover its 128 columns instead of 4
//! steps over half-empty registers.

use std::arch::x86_64::*;

use half::f16;

use super::avx2::{hsum, load_planes, lookup, split_bytes};
use super::{BitplaneKernel, I16Rows, BLOCK, WORDS_PER_BLOCK};
use crate::backend::cpu::fixed16;

/// `$f::<B, T>(args)` for `$bits` in 3..=8 (8 for anything above 7), with
/// T = 2^max(0, B − 4) byte tables of 16 entries.
macro_rules! by_bits {
    ($bits:expr, $f:ident($($arg:expr),* $(,)?)) => {
        match $bits {
            3 => $f::<3, 1>($($arg),*),
            4 => $f::<4, 1>($($arg),*),
            5 => $f::<5, 2>($($arg),*),
            6 => $f::<6, 4>($($arg),*),
            7 => $f::<7, 8>($($arg),*),
            _ => $f::<8, 16>($($arg),*),
        }
    };
}

/// A last block of at most this many words is folded into 128 columns.
const FOLD_WORDS: usize = 4;

/// Lengths of one token's prepared 16-bit activations and of their scales, for `cols` columns.
pub fn prepared_lens(cols: usize) -> (usize, usize) {
    let words = cols.div_ceil(32);
    let (full, rem) = (words / WORDS_PER_BLOCK, words % WORDS_PER_BLOCK);
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
    let (full, rem) = (words / WORDS_PER_BLOCK, words % WORDS_PER_BLOCK);
    let (pos_full, pos_folded) = positions();
    for (blk, xb) in x.chunks(BLOCK).enumerate() {
        let folded = blk == full && (1..=FOLD_WORDS).contains(&rem);
        let qb = &mut q[blk * BLOCK..];
        let pos: &[u8] = if folded { pos_folded } else { pos_full };
        let step = match <&[f32; BLOCK]>::try_from(xb) {
            // SAFETY: this kernel runs only where the CPU has AVX2 (`effective`).
            Ok(xb) if BitplaneKernel::Avx2I16.is_available() => unsafe {
                quantize_block(xb, pos_full, qb)
            },
            _ => quantize_block_portable(xb, pos, qb),
        };
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

/// Quantize one block's columns `xb` (a whole block or the last, shorter one)
/// to `qb[pos[c]]`, one scale per group c mod 8: returns the groups' steps.
fn quantize_block_portable(xb: &[f32], pos: &[u8], qb: &mut [i16]) -> [f32; 8] {
    let mut top = [0f32; 8];
    for (c, &v) in xb.iter().enumerate() {
        top[c % 8] = fixed16::track_max(top[c % 8], v);
    }
    let inv = top.map(|m| fixed16::scales(m).0);
    for (c, (&v, &p)) in xb.iter().zip(pos).enumerate() {
        qb[p as usize] = fixed16::quantize(v, inv[c % 8]);
    }
    top.map(|m| fixed16::scales(m).1)
}

/// [`quantize_block_portable`] of a whole block with AVX2, to the same bits:
/// the groups are the 8 lanes of the block's 32 registers.
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_block(xb: &[f32; BLOCK], pos: &[u8; BLOCK], qb: &mut [i16]) -> [f32; 8] {
    let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    let inf = _mm256_set1_ps(f32::INFINITY);
    let (mut top, mut bad) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let x = |i: usize| _mm256_loadu_ps(xb.as_ptr().add(8 * i));
    for i in 0..BLOCK / 8 {
        let a = _mm256_and_ps(x(i), abs_mask);
        top = _mm256_max_ps(top, a);
        // NaN or ±inf: the group's scale becomes NaN, as `fixed16::track_max` makes it.
        bad = _mm256_or_ps(bad, _mm256_cmp_ps::<_CMP_NLT_UQ>(a, inf));
    }
    let top = _mm256_blendv_ps(top, _mm256_set1_ps(f32::NAN), bad);
    let q_max = _mm256_set1_ps(fixed16::Q_MAX);
    let inv = _mm256_and_ps(
        _mm256_div_ps(q_max, top),
        _mm256_cmp_ps::<_CMP_GT_OQ>(top, _mm256_setzero_ps()),
    );
    let mut q = [0i32; BLOCK];
    for i in 0..BLOCK / 8 {
        // Rounds to nearest even like `fixed16::round`; a NaN product becomes
        // i32::MIN, whose low 16 bits are 0 as `NaN as i16` is.
        let v = _mm256_cvtps_epi32(_mm256_mul_ps(x(i), inv));
        _mm256_storeu_si256(q.as_mut_ptr().add(8 * i) as *mut __m256i, v);
    }
    let qb: &mut [i16; BLOCK] = (&mut qb[..BLOCK]).try_into().expect("a whole block");
    for (&v, &p) in q.iter().zip(pos) {
        qb[p as usize] = v as i16;
    }
    let mut step = [0f32; 8];
    _mm256_storeu_ps(step.as_mut_ptr(), _mm256_div_ps(top, q_max));
    step
}

/// The low min(B, 4) index bits of a block's 256 columns, transposed from
/// planes into nibbles by a two-stage bit-matrix transpose (24 operations):
/// register σ holds column 8i + σ in the low nibble of byte i and column
/// 8i + σ + 4 in the high one. A nibble's bits are the index bits reversed
/// (the most significant of them in bit 0); the LUT tables are permuted to
/// match ([`reversed`]). For B = 3 bit 3 is zero.
#[inline(always)]
unsafe fn transpose_nibbles<const B: usize>(p: &[__m256i; B]) -> [__m256i; 4] {
    let m = B.min(4);
    let plane = |k: usize| {
        if k < m {
            p[B - m + k]
        } else {
            _mm256_setzero_si256()
        }
    };
    let (mut a, mut b, mut c, mut d) = (plane(0), plane(1), plane(2), plane(3));
    // Swap bit 2m+1 of the first with bit 2m of the second (then 2-bit fields).
    let m1 = _mm256_set1_epi8(0x55);
    let m2 = _mm256_set1_epi8(0x33);
    let t = _mm256_and_si256(_mm256_xor_si256(_mm256_srli_epi16(a, 1), b), m1);
    b = _mm256_xor_si256(b, t);
    a = _mm256_xor_si256(a, _mm256_slli_epi16(t, 1));
    let t = _mm256_and_si256(_mm256_xor_si256(_mm256_srli_epi16(c, 1), d), m1);
    d = _mm256_xor_si256(d, t);
    c = _mm256_xor_si256(c, _mm256_slli_epi16(t, 1));
    let t = _mm256_and_si256(_mm256_xor_si256(_mm256_srli_epi16(a, 2), c), m2);
    c = _mm256_xor_si256(c, t);
    a = _mm256_xor_si256(a, _mm256_slli_epi16(t, 2));
    let t = _mm256_and_si256(_mm256_xor_si256(_mm256_srli_epi16(b, 2), d), m2);
    d = _mm256_xor_si256(d, t);
    b = _mm256_xor_si256(b, _mm256_slli_epi16(t, 2));
    [a, b, c, d]
}

/// `pshufb` indices (both lanes) that put LUT entry rev_m(n) at table position
/// n, rev_m reversing the m low index bits as [`transpose_nibbles`] leaves
/// them (positions from 2^m on are unused and keep their own entry).
const fn reversed(m: usize) -> [i8; 32] {
    let mut t = [0i8; 32];
    let mut n = 0;
    while n < 16 {
        let mut r = n;
        if n < 1 << m {
            r = 0;
            let mut k = 0;
            while k < m {
                r |= ((n >> k) & 1) << (m - 1 - k);
                k += 1;
            }
        }
        t[n] = r as i8;
        t[n + 16] = r as i8;
        n += 1;
    }
    t
}

/// [`reversed`] for 3 and 4 low index bits.
static REVERSED: [[i8; 32]; 2] = [reversed(3), reversed(4)];

/// The table order for B bits (see [`reversed`]).
#[inline(always)]
unsafe fn reversed_order<const B: usize>() -> __m256i {
    let t = &REVERSED[usize::from(B >= 4)];
    _mm256_loadu_si256(t.as_ptr() as *const __m256i)
}

/// One block: `S` steps of 64 columns, step σ's nibble pairs in `nib[σ]` (4 for
/// a full block; 2 folded, lane 1 then holding step σ + 2); `p` are the planes
/// (only those above the low 4 bits are read, for the blends).
#[inline(always)]
unsafe fn block<const B: usize, const T: usize, const S: usize>(
    nib: &[__m256i; S],
    p: &[__m256i; B],
    tlo: &[__m256i; T],
    thi: &[__m256i; T],
    xq: *const i16,
    xs: *const f32,
    acc: &mut [__m256; 4],
) {
    let low4 = _mm256_set1_epi8(0x0f);
    for (sigma, &v) in nib.iter().enumerate() {
        // `pshufb` ignores bits 4..6; bit 7 (the high column's nibble bit 3) must be clear.
        let low = if B >= 4 { _mm256_and_si256(v, low4) } else { v };
        let high = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
        for (h, idx) in [low, high].into_iter().enumerate() {
            let (a, b) = lookup::<B, T>(tlo, thi, p, idx, (sigma + 4 * h) as u32);
            let o = 2 * sigma + h;
            let xo = xq.add(32 * o);
            // Four products of ≤ 32767 · 16383 per lane: below 2^31.
            let sum = _mm256_add_epi32(
                _mm256_madd_epi16(a, _mm256_loadu_si256(xo as *const __m256i)),
                _mm256_madd_epi16(b, _mm256_loadu_si256(xo.add(16) as *const __m256i)),
            );
            let k = 2 * (sigma % 2) + h;
            acc[k] = _mm256_fmadd_ps(
                _mm256_cvtepi32_ps(sum),
                _mm256_loadu_ps(xs.add(8 * o)),
                acc[k],
            );
        }
    }
}

/// Largest magnitude of a LUT entry as an integer: with activations up to
/// 32767, four products summed stay below 2^31.
const LUT_Q_MAX: f32 = 16383.0;

/// Bytes of one row's byte tables at `bits` (see [`write_tables`]).
pub fn table_bytes(bits: u32) -> usize {
    32 << bits.saturating_sub(4)
}

/// Write the row's LUT as 14-bit integers in `T` byte tables of 16 entries to
/// `out` (each the 16 low bytes then the 16 high bytes, in the order of
/// [`reversed`]) and return the scale that turns them back into values.
#[inline(always)]
unsafe fn write_tables<const B: usize, const T: usize>(lut: &[f16], out: *mut u8) -> f32 {
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
    let inv = _mm256_set1_ps(if mx > 0.0 { LUT_Q_MAX / mx } else { 0.0 });
    let order = reversed_order::<B>();
    for t in 0..T {
        let q0 = _mm256_cvtps_epi32(_mm256_mul_ps(eight(2 * t), inv));
        let q1 = _mm256_cvtps_epi32(_mm256_mul_ps(eight(2 * t + 1), inv));
        // packs works per lane: [0..3, 8..11 | 4..7, 12..15] → in order.
        let q = _mm256_permute4x64_epi64(_mm256_packs_epi32(q0, q1), 0b11_01_10_00);
        let (lo, hi) = split_bytes(q);
        let both = _mm256_permute2x128_si256(
            _mm256_shuffle_epi8(lo, order),
            _mm256_shuffle_epi8(hi, order),
            0x20,
        );
        _mm256_storeu_si256(out.add(32 * t) as *mut __m256i, both);
    }
    mx / LUT_Q_MAX
}

/// The `T` byte tables [`write_tables`] wrote at `tables`, each broadcast to both lanes.
#[inline(always)]
unsafe fn load_tables<const T: usize>(tables: *const u8) -> ([__m256i; T], [__m256i; T]) {
    let table =
        |o: usize| _mm256_broadcastsi128_si256(_mm_loadu_si128(tables.add(o) as *const __m128i));
    (
        std::array::from_fn(|t| table(32 * t)),
        std::array::from_fn(|t| table(32 * t + 16)),
    )
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn build_tables<const B: usize, const T: usize>(
    luts: &[f16],
    tables: &mut [u8],
    scales: &mut [f32],
) {
    for ((lut, out), s) in luts
        .chunks_exact(1 << B)
        .zip(tables.chunks_exact_mut(32 * T))
        .zip(scales)
    {
        *s = write_tables::<B, T>(lut, out.as_mut_ptr());
    }
}

/// Turn a layer's LUTs at `bits` ([rows × 2^bits]) into the byte tables the
/// kernel reads ([rows × [`table_bytes`]]) and one scale per row.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
pub unsafe fn tables(bits: u32, luts: &[f16]) -> (Vec<u8>, Vec<f32>) {
    let rows = luts.len() >> bits;
    let mut tables = vec![0u8; rows * table_bytes(bits)];
    let mut scales = vec![0f32; rows];
    by_bits!(bits, build_tables(luts, &mut tables, &mut scales));
    (tables, scales)
}

/// Σ lut[idx_c]·x_c over one row at `B` bits from its `T` = 2^(B−4) (at least
/// 1) byte tables at `tables` and their scale.
#[inline(always)]
unsafe fn dot<const B: usize, const T: usize>(
    planes: &[u32],
    stride: usize,
    words: usize,
    tables: *const u8,
    lut_scale: f32,
    xq: &[i16],
    xs: &[f32],
) -> f32 {
    let (tlo, thi) = load_tables::<T>(tables);
    let mut acc = [_mm256_setzero_ps(); 4];
    let (full, rem) = (words / WORDS_PER_BLOCK, words % WORDS_PER_BLOCK);
    let (xq, xs) = (xq.as_ptr(), xs.as_ptr());
    for blk in 0..full + usize::from(rem > FOLD_WORDS) {
        let p = load_planes::<B>(
            planes,
            stride,
            blk * WORDS_PER_BLOCK,
            (words - blk * WORDS_PER_BLOCK).min(WORDS_PER_BLOCK),
        );
        let nib = transpose_nibbles::<B>(&p);
        block::<B, T, 4>(
            &nib,
            &p,
            &tlo,
            &thi,
            xq.add(blk * BLOCK),
            xs.add(blk * 64),
            &mut acc,
        );
    }
    if (1..=FOLD_WORDS).contains(&rem) {
        let mut p = load_planes::<B>(planes, stride, full * WORDS_PER_BLOCK, rem);
        let n = transpose_nibbles::<B>(&p);
        let fold =
            |a: __m256i, b: __m256i| _mm256_inserti128_si256(a, _mm256_castsi256_si128(b), 1);
        let nib = [fold(n[0], n[2]), fold(n[1], n[3])];
        // The blends read plane bit σ + 4h: lane 1's planes shifted by two match step σ + 2.
        for pj in p.iter_mut().take(B.saturating_sub(4)) {
            let lane0 = _mm256_castsi256_si128(*pj);
            *pj = _mm256_set_m128i(_mm_srli_epi16(lane0, 2), lane0);
        }
        block::<B, T, 2>(
            &nib,
            &p,
            &tlo,
            &thi,
            xq.add(full * BLOCK),
            xs.add(full * 64),
            &mut acc,
        );
    }
    hsum(acc) * lut_scale
}

/// [`dot`] for rows `rows` of `layer` into `out`, in one call.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_many<const B: usize, const T: usize>(
    layer: &I16Rows,
    rows: std::ops::Range<usize>,
    out: &mut [f32],
) {
    let l = *layer;
    l.each_row(B, rows, out, |planes, tables, scale| {
        dot::<B, T>(planes, l.stride, l.words, tables, scale, l.xq, l.xs)
    });
}

/// Σ_c lut[idx_c]·x_c at `bits` (3..=8) for rows `rows` of `layer` (its tables
/// and scales as [`tables`] made them, its activations [`prepare`]d), into `out`.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; for every row in `rows` the planes
/// cover (bits − 1)·stride + rows.end·words words, `tables` rows.end ·
/// [`table_bytes`] bytes and `scales` rows.end entries; `xq` and `xs` are at
/// least [`prepared_lens`] long.
pub(super) unsafe fn dot_rows(
    layer: &I16Rows,
    bits: u32,
    rows: std::ops::Range<usize>,
    out: &mut [f32],
) {
    by_bits!(bits, dot_many(layer, rows, out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn simd_block_quantization_equals_the_portable_one() {
        if !BitplaneKernel::Avx2I16.is_available() {
            eprintln!("SKIP AVX2 block quantization check: this CPU lacks AVX2");
            return;
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let pos = &positions().0;
        for case in 0..40 {
            let mut x: [f32; BLOCK] = std::array::from_fn(|_| {
                rng.random_range(-1.0..1.0) * 10f32.powi(rng.random_range(-3..3))
            });
            // Ties at half steps, an all-zero group, and non-finite groups.
            x[8 * (case % 32)] = 0.5;
            if case % 4 == 1 {
                (0..BLOCK).step_by(8).for_each(|c| x[c + 3] = 0.0);
            }
            if case % 4 == 2 {
                x[rng.random_range(0..BLOCK)] =
                    [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][case % 3];
            }
            let (mut want, mut got) = ([0i16; BLOCK], [0i16; BLOCK]);
            let ws = quantize_block_portable(&x, pos, &mut want);
            // SAFETY: AVX2 checked above.
            let gs = unsafe { quantize_block(&x, pos, &mut got) };
            assert_eq!(want, got, "case {case}");
            for (a, b) in ws.iter().zip(&gs) {
                assert!(
                    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
                    "case {case}: {ws:?} vs {gs:?}"
                );
            }
        }
    }
}
