//! AVX-512 VBMI + VNNI + GFNI bit-plane dot product on 16-bit fixed-point
//! operands, 64 columns per step.
//!
//! Indices: per group of 512 columns the b planes' 64-byte slabs are
//! transposed, bytes with three rounds of unpacks and bits with one
//! `vgf2p8affineqb` per 64 columns (an 8×8 bit-matrix transpose in each
//! 64-bit lane), so eight blocks of 64 indices cost 8 loads, 24 unpacks and 8
//! affine steps at any b instead of b mask loads and b masked adds a block.
//! The columns come out in a fixed shuffled order, which [`prepare`] gives the
//! activations too. A row's last columns short of a group take two plane
//! words as one 64-lane byte mask each, one masked byte add per plane.
//! The row's LUT, as 14-bit integers (as the AVX2-i16 kernel keeps it), is
//! split into a table of low bytes and one of high bytes held in registers:
//! up to 6 bits one `vpermb` each, 7 bits one `vpermi2b` over 128 entries, 8
//! bits two of them merged by a blend on index bit 7. Unpacking the byte pair
//! gives 16-bit weights, `vpdpwssd` multiplies them with the activations
//! (rounded to 15 bits of the largest in their block of 64) and sums four
//! products a lane exactly in 32 bits; one conversion and one FMA by the
//! block's scale finish the step. Llama.cpp's Q8_0 needs no lookup at all.

use std::arch::x86_64::*;

use half::f16;

use super::I16Rows;
use crate::backend::cpu::fixed16;

/// Columns per step and per activation scale.
pub const BLOCK: usize = 64;

/// Largest magnitude of a LUT entry as an integer: with activations up to
/// 32767, the four products a lane sums stay below 2^31.
const LUT_Q_MAX: f32 = 16383.0;

/// Lengths of one token's prepared activations and scales for rows of `cols`.
pub fn prepared_lens(cols: usize) -> (usize, usize) {
    let blocks = cols.div_ceil(BLOCK);
    (blocks * BLOCK, blocks)
}

/// Columns per group whose planes are transposed together: 16 plane words.
pub const GROUP: usize = 512;

/// Groups of a row of `words` plane words that go through [`group_indices`]:
/// those whose 16 words the row has. The last may end in padding columns,
/// whose activations are zero.
fn whole_groups(words: usize) -> usize {
    words / (GROUP / 32)
}

/// The first column of the run of 16 that block `blk` of a row of `cols`
/// takes as its 128-bit lane `l`: in [`whole_groups`], block 8·g + v holds
/// columns 512·g + 128·l + 16·v + 0..16 (the order [`group_indices`] makes),
/// in the rest 64 contiguous columns. Runs may start or end past `cols`.
pub(super) fn run_start(blk: usize, l: usize, cols: usize) -> usize {
    if blk / 8 < whole_groups(cols.div_ceil(32)) {
        blk / 8 * GROUP + 128 * l + 16 * (blk % 8)
    } else {
        blk * BLOCK + 16 * l
    }
}

/// Append token `x`'s activations in this kernel's form: per block of 64 (the
/// last zero-padded) the values rounded to 16-bit integers of one scale to
/// `q`, and the scale to `scales` (NaN when the block holds a NaN or an
/// infinity, so its results come out non-finite). Column e of a block's run
/// for lane l ([`run_start`]) goes to 16-bit activation 32·(e / 8) + 8·l +
/// e % 8, where unpacking the low and high bytes of 64 weights puts it (per
/// 128-bit lane, bytes 0..7 in the first vector, 8..15 in the second).
pub fn prepare(x: &[f32], q: &mut Vec<i16>, scales: &mut Vec<f32>) {
    let cols = x.len();
    let (len, blocks) = prepared_lens(cols);
    let at = q.len();
    q.resize(at + len, 0);
    for blk in 0..blocks {
        let run = |l: usize| {
            let s = run_start(blk, l, cols).min(cols);
            &x[s..(s + 16).min(cols)]
        };
        let max = (0..4)
            .flat_map(|l| run(l).iter())
            .fold(0f32, |m, &v| fixed16::track_max(m, v));
        let (inv, step) = fixed16::scales(max);
        let out = &mut q[at + blk * BLOCK..][..BLOCK];
        for l in 0..4 {
            for (e, &v) in run(l).iter().enumerate() {
                out[32 * (e / 8) + 8 * l + e % 8] = fixed16::quantize(v, inv);
            }
        }
        scales.push(step);
    }
}

/// Bytes of one row's tables at `bits`: 2^bits low bytes, then as many high bytes.
pub fn table_bytes(bits: u32) -> usize {
    2 << bits
}

/// Turn a layer's LUTs at `bits` ([rows × 2^bits]) into the byte tables the
/// kernel reads ([rows × [`table_bytes`]]: each entry rounded to a 14-bit
/// integer of the row's largest magnitude) and one scale per row.
pub fn tables(bits: u32, luts: &[f16]) -> (Vec<u8>, Vec<f32>) {
    use half::slice::HalfFloatSliceExt;
    let k = 1usize << bits;
    let rows = luts.len() / k;
    let mut tables = vec![0u8; rows * 2 * k];
    let mut scales = vec![0f32; rows];
    let mut f = [0f32; 256];
    let f = &mut f[..k];
    for ((lut, out), s) in luts
        .chunks_exact(k)
        .zip(tables.chunks_exact_mut(2 * k))
        .zip(&mut scales)
    {
        lut.convert_to_f32_slice(f);
        let mx = f.iter().fold(0f32, |m, v| m.max(v.abs()));
        let inv = if mx > 0.0 { LUT_Q_MAX / mx } else { 0.0 };
        let (lo, hi) = out.split_at_mut(k);
        for ((v, l), h) in f.iter().zip(lo).zip(hi) {
            [*l, *h] = (fixed16::round(v * inv) as i16).to_le_bytes();
        }
        *s = mx / LUT_Q_MAX;
    }
    (tables, scales)
}

/// Tables of one row in registers: up to four 64-byte vectors of low bytes, as many of high bytes.
struct RowTables {
    lo: [__m512i; 4],
    hi: [__m512i; 4],
}

#[inline(always)]
unsafe fn load_tables<const B: usize>(t: *const u8) -> RowTables {
    let k = 1usize << B;
    let part = |base: *const u8, v: usize| {
        if B < 6 {
            _mm512_maskz_loadu_epi8((1u64 << k) - 1, base as *const i8)
        } else if 64 * v < k {
            _mm512_loadu_si512(base.add(64 * v) as *const __m512i)
        } else {
            _mm512_setzero_si512()
        }
    };
    RowTables {
        lo: std::array::from_fn(|v| part(t, v)),
        hi: std::array::from_fn(|v| part(t.add(k), v)),
    }
}

/// Low or high bytes of the table entries of 64 indices (`idx`: the index,
/// of which a lookup reads the low min(B, 7) bits; `top`: index bit 7 as a
/// mask, at 8 bits).
#[inline(always)]
unsafe fn lookup<const B: usize>(t: &[__m512i; 4], idx: __m512i, top: __mmask64) -> __m512i {
    match B {
        0..=6 => _mm512_permutexvar_epi8(idx, t[0]),
        7 => _mm512_permutex2var_epi8(t[0], idx, t[1]),
        _ => _mm512_mask_blend_epi8(
            top,
            _mm512_permutex2var_epi8(t[0], idx, t[1]),
            _mm512_permutex2var_epi8(t[2], idx, t[3]),
        ),
    }
}

/// One block of 64 indices added to `acc`: their entries times the block's
/// activations `x`, scaled by `scale`.
#[inline(always)]
unsafe fn accumulate<const B: usize>(
    acc: __m512,
    t: &RowTables,
    idx: __m512i,
    top: __mmask64,
    x: *const __m512i,
    scale: f32,
) -> __m512 {
    let lo = lookup::<B>(&t.lo, idx, top);
    let hi = lookup::<B>(&t.hi, idx, top);
    let s = _mm512_dpwssd_epi32(
        _mm512_setzero_si512(),
        _mm512_unpacklo_epi8(lo, hi),
        _mm512_loadu_si512(x),
    );
    let s = _mm512_dpwssd_epi32(
        s,
        _mm512_unpackhi_epi8(lo, hi),
        _mm512_loadu_si512(x.add(1)),
    );
    _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_set1_ps(scale), acc)
}

/// One block of 64 contiguous columns added to `acc`: `mask(j)` is plane j's
/// 64-lane mask.
#[inline(always)]
unsafe fn step<const B: usize>(
    acc: __m512,
    t: &RowTables,
    x: *const __m512i,
    scale: f32,
    mask: impl Fn(usize) -> __mmask64,
) -> __m512 {
    // Index bit k comes from plane B−1−k; at 8 bits plane 0 picks the table half.
    // Two independent halves, so the dependent chain is half as long.
    let n = B.min(7);
    let (mut a, mut b) = (_mm512_setzero_si512(), _mm512_setzero_si512());
    for k in (0..n).step_by(2) {
        a = _mm512_mask_add_epi8(a, mask(B - 1 - k), a, _mm512_set1_epi8(1 << k));
        if k + 1 < n {
            b = _mm512_mask_add_epi8(b, mask(B - 2 - k), b, _mm512_set1_epi8(1 << (k + 1)));
        }
    }
    let idx = _mm512_or_si512(a, b);
    let top = if B == 8 { mask(0) } else { 0 };
    accumulate::<B>(acc, t, idx, top, x, scale)
}

/// The indices of one group of [`GROUP`] columns (16 words of each plane from
/// `w`), as 8 blocks of 64 in the order [`prepare`] gives the activations.
///
/// Plane p goes to slot p + 8 − B (lower slots stay zero). Three rounds of
/// unpacks (bytes, then pairs, then quads of slots) leave in 64-bit lane q of
/// block v = 4·h1 + 2·h2 + h3 the slots' bytes j = 16·l + 2·v + m (l = q / 2,
/// m = q % 2; byte j of a slab holds columns 8j..8j + 7), slot s in byte s.
/// Transposing each lane as an 8×8 bit matrix (`vgf2p8affineqb` with the
/// bytes 2^i as operand) makes its byte i the index of column 8j + i, bit k
/// from slot 7 − k, which is plane B − 1 − k.
#[inline(always)]
unsafe fn group_indices<const B: usize>(w: *const u32, stride: usize) -> [__m512i; 8] {
    let z: [__m512i; 8] = std::array::from_fn(|s| {
        if s + B < 8 {
            _mm512_setzero_si512()
        } else {
            _mm512_loadu_si512(w.add((s + B - 8) * stride) as *const __m512i)
        }
    });
    // a[2q + h1]: slots 2q, 2q + 1, bytes 8·h1.. of each lane.
    let a: [__m512i; 8] = std::array::from_fn(|k| {
        let (x, y) = (z[k / 2 * 2], z[k / 2 * 2 + 1]);
        if k % 2 == 0 {
            _mm512_unpacklo_epi8(x, y)
        } else {
            _mm512_unpackhi_epi8(x, y)
        }
    });
    // b[4r + 2h1 + h2]: slots 4r..4r + 3.
    let b: [__m512i; 8] = std::array::from_fn(|k| {
        let (r, h1, h2) = (k / 4, k / 2 % 2, k % 2);
        let (x, y) = (a[4 * r + h1], a[4 * r + 2 + h1]);
        if h2 == 0 {
            _mm512_unpacklo_epi16(x, y)
        } else {
            _mm512_unpackhi_epi16(x, y)
        }
    });
    let bits = _mm512_set1_epi64(0x8040_2010_0804_0201u64 as i64);
    std::array::from_fn(|v| {
        let (x, y) = (b[v / 2], b[4 + v / 2]);
        let c = if v % 2 == 0 {
            _mm512_unpacklo_epi32(x, y)
        } else {
            _mm512_unpackhi_epi32(x, y)
        };
        _mm512_gf2p8affine_epi64_epi8::<0>(bits, c)
    })
}

/// Σ lut[idx_c]·x_c over one row at `B` bits, from its tables and scale.
#[inline(always)]
unsafe fn dot<const B: usize>(
    planes: *const u32,
    stride: usize,
    words: usize,
    t: &RowTables,
    lut_scale: f32,
    xq: *const i16,
    xs: *const f32,
) -> f32 {
    let mut acc = _mm512_setzero_ps();
    let x = |blk: usize| xq.add(blk * BLOCK) as *const __m512i;
    let groups = whole_groups(words);
    for g in 0..groups {
        let idx = group_indices::<B>(planes.add(g * GROUP / 32), stride);
        for (v, &i) in idx.iter().enumerate() {
            let blk = 8 * g + v;
            let top = if B == 8 { _mm512_movepi8_mask(i) } else { 0 };
            acc = accumulate::<B>(acc, t, i, top, x(blk), *xs.add(blk));
        }
    }
    let full = words / 2;
    for blk in groups * GROUP / BLOCK..full {
        let w = planes.add(2 * blk);
        acc = step::<B>(acc, t, x(blk), *xs.add(blk), |j| {
            std::ptr::read_unaligned(w.add(j * stride) as *const u64)
        });
    }
    if words % 2 == 1 {
        // A last half block: one word per plane; the padded activations are zero.
        let w = planes.add(2 * full);
        acc = step::<B>(acc, t, x(full), *xs.add(full), |j| {
            *w.add(j * stride) as u64
        });
    }
    _mm512_reduce_add_ps(acc) * lut_scale
}

/// [`dot`] for rows `rows` of `layer` into `out`, in one call.
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vnni,gfni")]
unsafe fn dot_many<const B: usize>(layer: &I16Rows, rows: std::ops::Range<usize>, out: &mut [f32]) {
    let l = *layer;
    l.each_row(B, rows, out, |planes, tables, scale| {
        let t = load_tables::<B>(tables);
        dot::<B>(
            planes.as_ptr(),
            l.stride,
            l.words,
            &t,
            scale,
            l.xq.as_ptr(),
            l.xs.as_ptr(),
        )
    });
}

/// Σ_c lut[idx_c]·x_c at `bits` (3..=8) for rows `rows` of `layer` (its tables
/// and scales as [`tables`] made them, its activations [`prepare`]d), into `out`.
///
/// # Safety
/// The CPU must support AVX-512F, BW, VBMI and VNNI and GFNI; for every row in `rows`
/// the planes cover (bits − 1)·stride + rows.end·words words, `tables` rows.end
/// · [`table_bytes`] bytes and `scales` rows.end entries; `xq` and `xs` are at
/// least [`prepared_lens`] long.
pub(super) unsafe fn dot_rows(
    layer: &I16Rows,
    bits: u32,
    rows: std::ops::Range<usize>,
    out: &mut [f32],
) {
    match bits {
        3 => dot_many::<3>(layer, rows, out),
        4 => dot_many::<4>(layer, rows, out),
        5 => dot_many::<5>(layer, rows, out),
        6 => dot_many::<6>(layer, rows, out),
        7 => dot_many::<7>(layer, rows, out),
        8 => dot_many::<8>(layer, rows, out),
        _ => unreachable!("bits {bits} outside 3..=8"),
    }
}
