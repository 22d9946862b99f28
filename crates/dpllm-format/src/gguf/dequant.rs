//! Dequantization of ggml tensor types to f32, block by block, following the
//! block layouts of ggml (`ggml-common.h`) and its reference decoders
//! (`dequantize_row_*` in `ggml-quants.c`). Checked against the independent
//! NumPy decoders of the `gguf` Python package (`tests/fixtures/gguf/`).

use half::{bf16, f16};
use rayon::prelude::*;

/// Elements per K-quant super-block.
const QK_K: usize = 256;

/// The ggml element types dpllm reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    /// f32.
    F32,
    /// f16.
    F16,
    /// bf16.
    BF16,
    /// 32 weights: f16 scale, 4-bit q − 8.
    Q4_0,
    /// 32 weights: f16 scale and min, 4-bit q.
    Q4_1,
    /// 32 weights: f16 scale, 5-bit q − 16.
    Q5_0,
    /// 32 weights: f16 scale and min, 5-bit q.
    Q5_1,
    /// 32 weights: f16 scale, 8-bit signed q.
    Q8_0,
    /// 256 weights: 16 groups with 4-bit scales and mins, 2-bit q.
    Q2K,
    /// 256 weights: 16 groups with 6-bit scales, 3-bit q.
    Q3K,
    /// 256 weights: 8 groups with 6-bit scales and mins, 4-bit q.
    Q4K,
    /// 256 weights: 8 groups with 6-bit scales and mins, 5-bit q.
    Q5K,
    /// 256 weights: 16 groups with 8-bit scales, 6-bit q − 32.
    Q6K,
}

impl GgmlType {
    /// The type of ggml type id `id` (`enum ggml_type`), if dpllm reads it.
    pub fn from_id(id: u32) -> Option<GgmlType> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            6 => GgmlType::Q5_0,
            7 => GgmlType::Q5_1,
            8 => GgmlType::Q8_0,
            10 => GgmlType::Q2K,
            11 => GgmlType::Q3K,
            12 => GgmlType::Q4K,
            13 => GgmlType::Q5K,
            14 => GgmlType::Q6K,
            30 => GgmlType::BF16,
            _ => return None,
        })
    }

    /// The names of the types dpllm reads, for messages.
    pub fn supported() -> &'static str {
        "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K"
    }

    /// Elements per block.
    pub fn block_size(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 => {
                32
            }
            GgmlType::Q2K | GgmlType::Q3K | GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K => QK_K,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => 18,
            GgmlType::Q4_1 => 20,
            GgmlType::Q5_0 => 22,
            GgmlType::Q5_1 => 24,
            GgmlType::Q8_0 => 34,
            GgmlType::Q2K => 84,
            GgmlType::Q3K => 110,
            GgmlType::Q4K => 144,
            GgmlType::Q5K => 176,
            GgmlType::Q6K => 210,
        }
    }

    /// Average bits per weight.
    pub fn bits_per_weight(self) -> f64 {
        8.0 * self.block_bytes() as f64 / self.block_size() as f64
    }
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Decode `data` (whole blocks of `ty`) into `out` (block_size elements per block).
pub fn dequantize(ty: GgmlType, data: &[u8], out: &mut [f32]) {
    let (bs, bb) = (ty.block_size(), ty.block_bytes());
    assert_eq!(
        data.len() / bb * bs,
        out.len(),
        "dequantize: {} bytes of {ty:?} for {} values",
        data.len(),
        out.len()
    );
    // Rows of blocks in parallel; each chunk a whole number of blocks.
    let per = (1 << 14) / bs.max(1) * bs.max(1);
    out.par_chunks_mut(per.max(bs))
        .zip(data.par_chunks(per.max(bs) / bs * bb))
        .for_each(|(o, d)| {
            for (y, b) in o.chunks_exact_mut(bs).zip(d.chunks_exact(bb)) {
                block(ty, b, y);
            }
        });
}

/// Decode one block `b` of `ty` into `y`.
fn block(ty: GgmlType, b: &[u8], y: &mut [f32]) {
    match ty {
        GgmlType::F32 => y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        GgmlType::F16 => y[0] = f16_at(b, 0),
        GgmlType::BF16 => y[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32(),
        GgmlType::Q4_0 => {
            let d = f16_at(b, 0);
            for j in 0..16 {
                y[j] = ((b[2 + j] & 0xF) as i32 - 8) as f32 * d;
                y[j + 16] = ((b[2 + j] >> 4) as i32 - 8) as f32 * d;
            }
        }
        GgmlType::Q4_1 => {
            let (d, m) = (f16_at(b, 0), f16_at(b, 2));
            for j in 0..16 {
                y[j] = (b[4 + j] & 0xF) as f32 * d + m;
                y[j + 16] = (b[4 + j] >> 4) as f32 * d + m;
            }
        }
        GgmlType::Q5_0 | GgmlType::Q5_1 => {
            let one = ty == GgmlType::Q5_1;
            let d = f16_at(b, 0);
            let (m, qh_at) = if one { (f16_at(b, 2), 4) } else { (0.0, 2) };
            let qh = u32::from_le_bytes([b[qh_at], b[qh_at + 1], b[qh_at + 2], b[qh_at + 3]]);
            let qs = &b[qh_at + 4..];
            let off = if one { 0 } else { 16 };
            for j in 0..16 {
                let h0 = ((qh >> j) << 4) & 0x10;
                let h1 = (qh >> (j + 12)) & 0x10;
                let x0 = ((qs[j] as u32 & 0xF) | h0) as i32 - off;
                let x1 = ((qs[j] as u32 >> 4) | h1) as i32 - off;
                y[j] = x0 as f32 * d + m;
                y[j + 16] = x1 as f32 * d + m;
            }
        }
        GgmlType::Q8_0 => {
            let d = f16_at(b, 0);
            for j in 0..32 {
                y[j] = (b[2 + j] as i8) as f32 * d;
            }
        }
        GgmlType::Q2K => q2k(b, y),
        GgmlType::Q3K => q3k(b, y),
        GgmlType::Q4K => q4k(b, y),
        GgmlType::Q5K => q5k(b, y),
        GgmlType::Q6K => q6k(b, y),
    }
}

/// block_q2_K: scales[16] (low nibble scale, high nibble min), qs[64], d, dmin.
fn q2k(b: &[u8], y: &mut [f32]) {
    let (scales, qs) = (&b[..16], &b[16..80]);
    let (d, dmin) = (f16_at(b, 80), f16_at(b, 82));
    let mut is = 0;
    for n in 0..2 {
        let q = &qs[32 * n..32 * n + 32];
        for j in 0..4 {
            let shift = 2 * j;
            for half in 0..2 {
                let sc = scales[is];
                is += 1;
                let (dl, ml) = (d * (sc & 0xF) as f32, dmin * (sc >> 4) as f32);
                for l in 0..16 {
                    y[128 * n + 32 * j + 16 * half + l] =
                        dl * ((q[16 * half + l] >> shift) & 3) as f32 - ml;
                }
            }
        }
    }
}

/// block_q3_K: hmask[32], qs[64], scales[12] (16 packed 6-bit scales), d.
fn q3k(b: &[u8], y: &mut [f32]) {
    let (hm, qs, packed) = (&b[..32], &b[32..96], &b[96..108]);
    let d = f16_at(b, 108);
    let a = |i: usize| {
        u32::from_le_bytes([
            packed[4 * i],
            packed[4 * i + 1],
            packed[4 * i + 2],
            packed[4 * i + 3],
        ])
    };
    let (a0, a1, tmp) = (a(0), a(1), a(2));
    let (k1, k2) = (0x0303_0303u32, 0x0f0f_0f0fu32);
    let words = [
        (a0 & k2) | ((tmp & k1) << 4),
        (a1 & k2) | (((tmp >> 2) & k1) << 4),
        ((a0 >> 4) & k2) | (((tmp >> 4) & k1) << 4),
        ((a1 >> 4) & k2) | (((tmp >> 6) & k1) << 4),
    ];
    let scales: Vec<i32> = words
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .map(|s| s as i8 as i32 - 32)
        .collect();
    let mut is = 0;
    let mut m = 1u8;
    for n in 0..2 {
        let q = &qs[32 * n..32 * n + 32];
        for j in 0..4 {
            let shift = 2 * j;
            for half in 0..2 {
                let dl = d * scales[is] as f32;
                is += 1;
                for l in 0..16 {
                    let i = 16 * half + l;
                    let v = ((q[i] >> shift) & 3) as i32 - if hm[i] & m != 0 { 0 } else { 4 };
                    y[128 * n + 32 * j + i] = dl * v as f32;
                }
            }
            m <<= 1;
        }
    }
}

/// The 6-bit scale and min of group `j` of a Q4_K / Q5_K block (`get_scale_min_k4`).
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// block_q4_K: d, dmin, scales[12], qs[128].
fn q4k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let (scales, qs) = (&b[4..16], &b[16..144]);
    for g in 0..4 {
        let q = &qs[32 * g..32 * g + 32];
        let (s1, m1) = scale_min_k4(2 * g, scales);
        let (s2, m2) = scale_min_k4(2 * g + 1, scales);
        let (d1, m1, d2, m2) = (
            d * s1 as f32,
            dmin * m1 as f32,
            d * s2 as f32,
            dmin * m2 as f32,
        );
        for l in 0..32 {
            y[64 * g + l] = d1 * (q[l] & 0xF) as f32 - m1;
            y[64 * g + 32 + l] = d2 * (q[l] >> 4) as f32 - m2;
        }
    }
}

/// block_q5_K: d, dmin, scales[12], qh[32], qs[128].
fn q5k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let (scales, qh, qs) = (&b[4..16], &b[16..48], &b[48..176]);
    for g in 0..4 {
        let ql = &qs[32 * g..32 * g + 32];
        let (u1, u2) = (1u8 << (2 * g), 2u8 << (2 * g));
        let (s1, m1) = scale_min_k4(2 * g, scales);
        let (s2, m2) = scale_min_k4(2 * g + 1, scales);
        let (d1, m1, d2, m2) = (
            d * s1 as f32,
            dmin * m1 as f32,
            d * s2 as f32,
            dmin * m2 as f32,
        );
        for l in 0..32 {
            let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
            let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
            y[64 * g + l] = d1 * ((ql[l] & 0xF) + h1) as f32 - m1;
            y[64 * g + 32 + l] = d2 * ((ql[l] >> 4) + h2) as f32 - m2;
        }
    }
}

/// block_q6_K: ql[128], qh[64], scales[16] (i8), d.
fn q6k(b: &[u8], y: &mut [f32]) {
    let (ql_all, qh_all, sc_all) = (&b[..128], &b[128..192], &b[192..208]);
    let d = f16_at(b, 208);
    for n in 0..2 {
        let (ql, qh, sc) = (&ql_all[64 * n..], &qh_all[32 * n..], &sc_all[8 * n..]);
        let out = &mut y[128 * n..128 * n + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            out[l] = d * (sc[is] as i8) as f32 * q1 as f32;
            out[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
            out[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
            out[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
        }
    }
}
