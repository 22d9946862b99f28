//! Causal multi-head attention with grouped KV heads and an optional sliding window.

use rayon::prelude::*;

use super::dot::{dots_strided, weighted_rows};
use super::matmul::gemm_view;
use super::SendPtr;

pub use crate::backend::AttnShape;

/// From this many queries in one call (prefill), attention runs as two matrix
/// products per head and query tile ([`attention_tiled`]); fewer (decode) take
/// one pass per query and head.
pub const TILED_MIN_QUERIES: usize = 16;

/// Queries per tile of [`attention_tiled`]: a tile's scores are TILE × keys floats.
const TILE: usize = 64;

/// `out [n × heads·hd]` = softmax(q·kᵀ/√hd)·v for queries at positions
/// `pos0..pos0+n`, over cached keys/values `k`, `v` [(pos0+n) × kv_heads·hd].
pub fn attention(q: &[f32], k: &[f32], v: &[f32], pos0: usize, s: AttnShape, out: &mut [f32]) {
    if q.len() / (s.num_heads * s.head_dim) >= TILED_MIN_QUERIES {
        attention_tiled(q, k, v, pos0, s, out)
    } else {
        attention_rows(q, k, v, pos0, s, out)
    }
}

/// [`attention`] one query and head at a time (the decode path).
pub fn attention_rows(q: &[f32], k: &[f32], v: &[f32], pos0: usize, s: AttnShape, out: &mut [f32]) {
    let (nh, hd) = (s.num_heads, s.head_dim);
    let kvd = s.num_kv_heads * hd;
    let group = nh / s.num_kv_heads;
    let n = q.len() / (nh * hd);
    assert_eq!(out.len(), q.len());
    assert!(k.len() >= (pos0 + n) * kvd && v.len() >= (pos0 + n) * kvd);
    let scale = 1.0 / (hd as f32).sqrt();
    let op = SendPtr(out.as_mut_ptr());
    (0..n * nh)
        .into_par_iter()
        .for_each_init(Vec::<f32>::new, |scores, job| {
            let (t, h) = (job / nh, job % nh);
            let pos = pos0 + t;
            let lo = s.window.map_or(0, |w| (pos + 1).saturating_sub(w));
            let kvh = h / group;
            let qh = &q[(t * nh + h) * hd..(t * nh + h + 1) * hd];
            attention_probs(qh, k, kvd, kvh, lo, pos, scale, scores);
            // SAFETY: each (t, h) job owns out[(t*nh+h)*hd .. +hd].
            let o = unsafe { std::slice::from_raw_parts_mut(op.ptr().add((t * nh + h) * hd), hd) };
            weighted_rows(scores, &v[lo * kvd + kvh * hd..], kvd, o);
        });
}

/// [`attention`] as matrix products: per head and tile of up to 64 queries,
/// S = Q·Kᵀ over the keys the tile can see (the `gemm` crate), a masked softmax
/// per row, then O = P·V. Tiles of different heads run in parallel.
pub fn attention_tiled(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    pos0: usize,
    s: AttnShape,
    out: &mut [f32],
) {
    let (nh, hd) = (s.num_heads, s.head_dim);
    let (qd, kvd) = (nh * hd, s.num_kv_heads * hd);
    let group = nh / s.num_kv_heads;
    let n = q.len() / qd;
    assert_eq!(out.len(), q.len());
    assert!(k.len() >= (pos0 + n) * kvd && v.len() >= (pos0 + n) * kvd);
    let scale = 1.0 / (hd as f32).sqrt();
    let tiles = n.div_ceil(TILE);
    let op = SendPtr(out.as_mut_ptr());
    (0..nh * tiles)
        .into_par_iter()
        .for_each_init(Vec::<f32>::new, |scores, job| {
            let (h, tile) = (job / tiles, job % tiles);
            let kvh = h / group;
            let (t0, t1) = (tile * TILE, ((tile + 1) * TILE).min(n));
            let rows = t1 - t0;
            // Keys visible to some query of the tile: lo of its first query ..= its last position.
            let lo = s.window.map_or(0, |w| (pos0 + t0 + 1).saturating_sub(w));
            let hi = pos0 + t1;
            let cols = hi - lo;
            scores.clear();
            scores.resize(rows * cols, 0.0);
            // SAFETY: Q rows t0..t1 of head h, K rows lo..hi of KV head kvh and the scores
            // tile are in bounds (asserted above); scores is this task's own buffer.
            unsafe {
                gemm_view(
                    rows,
                    cols,
                    hd,
                    scores.as_mut_ptr(),
                    cols,
                    q.as_ptr().add(t0 * qd + h * hd),
                    qd,
                    1,
                    k.as_ptr().add(lo * kvd + kvh * hd),
                    1,
                    kvd,
                );
            }
            for (r, row) in scores.chunks_mut(cols).enumerate() {
                let pos = pos0 + t0 + r;
                let first = s.window.map_or(0, |w| (pos + 1).saturating_sub(w)) - lo;
                let last = pos - lo;
                let mut max = f32::NEG_INFINITY;
                for x in &mut row[first..=last] {
                    *x *= scale;
                    max = max.max(*x);
                }
                let mut sum = 0f32;
                for x in &mut row[first..=last] {
                    *x = (*x - max).exp();
                    sum += *x;
                }
                let inv = 1.0 / sum;
                row[..first].fill(0.0);
                row[first..=last].iter_mut().for_each(|x| *x *= inv);
                row[last + 1..].fill(0.0);
            }
            // SAFETY: this (head, tile) job alone writes out rows t0..t1, columns h·hd..(h+1)·hd;
            // V rows lo..hi of KV head kvh are in bounds.
            unsafe {
                gemm_view(
                    rows,
                    hd,
                    cols,
                    op.ptr().add(t0 * qd + h * hd),
                    qd,
                    scores.as_ptr(),
                    cols,
                    1,
                    v.as_ptr().add(lo * kvd + kvh * hd),
                    kvd,
                    1,
                );
            }
        });
}

/// Softmax over positions lo..=pos of the scaled scores of query `qh` (hd values)
/// against the keys of KV head `kvh` in `k` [· × kvd], into `p` (one per position).
/// The forward pass and the attention backward both use it.
#[allow(clippy::too_many_arguments)]
pub fn attention_probs(
    qh: &[f32],
    k: &[f32],
    kvd: usize,
    kvh: usize,
    lo: usize,
    pos: usize,
    scale: f32,
    p: &mut Vec<f32>,
) {
    let hd = qh.len();
    p.clear();
    p.resize(pos + 1 - lo, 0.0);
    dots_strided(qh, &k[lo * kvd + kvh * hd..], kvd, p);
    let mut max = f32::NEG_INFINITY;
    for s in p.iter_mut() {
        *s *= scale;
        max = max.max(*s);
    }
    let mut sum = 0f32;
    for s in p.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    let inv = 1.0 / sum;
    for s in p.iter_mut() {
        *s *= inv;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn naive(q: &[f32], k: &[f32], v: &[f32], pos0: usize, s: AttnShape) -> Vec<f64> {
        let (nh, hd, kvd) = (s.num_heads, s.head_dim, s.num_kv_heads * s.head_dim);
        let n = q.len() / (nh * hd);
        let mut out = vec![0f64; q.len()];
        for t in 0..n {
            for h in 0..nh {
                let kvh = h * s.num_kv_heads / nh;
                let pos = pos0 + t;
                let js: Vec<usize> = (0..=pos)
                    .filter(|&j| s.window.is_none_or(|w| pos - j < w))
                    .collect();
                let sc: Vec<f64> = js
                    .iter()
                    .map(|&j| {
                        (0..hd)
                            .map(|d| {
                                q[(t * nh + h) * hd + d] as f64 * k[j * kvd + kvh * hd + d] as f64
                            })
                            .sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .collect();
                let m = sc.iter().cloned().fold(f64::MIN, f64::max);
                let z: f64 = sc.iter().map(|x| (x - m).exp()).sum();
                for (i, &j) in js.iter().enumerate() {
                    for d in 0..hd {
                        out[(t * nh + h) * hd + d] +=
                            (sc[i] - m).exp() / z * v[j * kvd + kvh * hd + d] as f64;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn matches_naive_with_gqa_window_and_offset() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        // A few queries, and more than two tiles of the tiled path, with windows
        // shorter and longer than a tile.
        for (window, pos0, n) in [
            (None, 5, 4),
            (Some(3), 5, 4),
            (None, 3, 150),
            (Some(3), 7, 150),
            (Some(70), 0, 150),
        ] {
            let s = AttnShape {
                num_heads: 6,
                num_kv_heads: 2,
                head_dim: 8,
                window,
            };
            let q: Vec<f32> = (0..n * 48).map(|_| rng.random_range(-1.0..1.0)).collect();
            let k: Vec<f32> = (0..(pos0 + n) * 16)
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            let v: Vec<f32> = (0..(pos0 + n) * 16)
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            let want = naive(&q, &k, &v, pos0, s);
            for kernel in [attention_rows, attention_tiled] {
                let mut out = vec![0f32; q.len()];
                kernel(&q, &k, &v, pos0, s, &mut out);
                for (a, b) in out.iter().zip(&want) {
                    assert!((*a as f64 - b).abs() < 1e-5);
                }
            }
        }
    }
}
