//! `y = x · Wᵀ` for a weight matrix W [rows × cols] and activations x [n × cols].
//!
//! Decode (few tokens) runs a multi-threaded GEMV that streams each weight row
//! once; prefill converts row tiles of W to f32 and hands them to the `gemm`
//! crate. [`matmul_tiled`] is shared by every weight format that can fill an
//! f32 tile (dense here, bit-plane quantized weights later).

use dpllm_format::TensorData;
use rayon::prelude::*;

use super::dot::WeightElem;
use super::SendPtr;

/// Up to this many tokens the GEMV path is used (weights stay in cache across
/// tokens). 8 covers a server's batch of decode steps: at 8 tokens the GEMV
/// beat the tiled GEMM on the 2-core dev VM by 1.4x (SmolLM2, f32), 2.6x
/// (docs-llama-12m, f32) and 4x (docs-llama-12m, bit-planes: the tiles are
/// dequantized to f32 every call); at 16 the GEMM won on SmolLM2.
pub const GEMV_MAX_TOKENS: usize = 8;

/// Rows per parallel GEMV task.
pub const GEMV_ROWS_PER_TASK: usize = 16;

/// Weight-row tile height for the prefill path.
fn tile_rows(cols: usize) -> usize {
    // Keep one f32 tile around 256 KiB (L2-resident), 16..=256 rows.
    ((256 * 1024 / 4) / cols.max(1)).clamp(16, 256)
}

/// `y[t, r] = Σ_c w(r, c) · x[t, c]` using a per-row dot product `dot(r, x_t)`.
pub fn gemv_rows(
    rows: usize,
    n: usize,
    cols: usize,
    x: &[f32],
    y: &mut [f32],
    dot: impl Fn(usize, &[f32]) -> f32 + Sync,
) {
    assert_eq!(x.len(), n * cols);
    gemv_rows_by(rows, n, y, |r, t| dot(r, &x[t * cols..(t + 1) * cols]))
}

/// `y[t, r] = dot(r, t)` for `n` tokens [n × rows], rows split across threads.
pub fn gemv_rows_by(
    rows: usize,
    n: usize,
    y: &mut [f32],
    dot: impl Fn(usize, usize) -> f32 + Sync,
) {
    gemv_row_ranges(rows, n, y, |t, range, out| {
        for (o, r) in out.iter_mut().zip(range) {
            *o = dot(r, t);
        }
    })
}

/// `y [n × rows]` from `fill(t, r0..r1, out)`, which writes y[t, r0..r1] into
/// `out`, for ranges of [`GEMV_ROWS_PER_TASK`] rows split across threads: a
/// kernel called once per range instead of once per row.
pub fn gemv_row_ranges(
    rows: usize,
    n: usize,
    y: &mut [f32],
    fill: impl Fn(usize, std::ops::Range<usize>, &mut [f32]) + Sync,
) {
    assert_eq!(y.len(), n * rows);
    let yp = SendPtr(y.as_mut_ptr());
    (0..rows.div_ceil(GEMV_ROWS_PER_TASK))
        .into_par_iter()
        .for_each(|task| {
            let r0 = task * GEMV_ROWS_PER_TASK;
            let r1 = (r0 + GEMV_ROWS_PER_TASK).min(rows);
            for t in 0..n {
                // SAFETY: y[t, r0..r1] lies inside y (t < n, r1 ≤ rows) and
                // belongs to this task alone.
                let out =
                    unsafe { std::slice::from_raw_parts_mut(yp.ptr().add(t * rows + r0), r1 - r0) };
                fill(t, r0..r1, out);
            }
        });
}

/// Prefill matmul through f32 tiles: `fill(row0, tile)` writes rows
/// `row0..row0 + tile.len()/cols` of W as f32 into `tile`.
pub fn matmul_tiled(
    rows: usize,
    cols: usize,
    x: &[f32],
    n: usize,
    y: &mut [f32],
    fill: impl Fn(usize, &mut [f32]) + Sync,
) {
    assert_eq!(x.len(), n * cols);
    assert_eq!(y.len(), n * rows);
    let th = tile_rows(cols);
    let yp = SendPtr(y.as_mut_ptr());
    (0..rows.div_ceil(th))
        .into_par_iter()
        .for_each_init(Vec::<f32>::new, |tile, ti| {
            let r0 = ti * th;
            let nr = th.min(rows - r0);
            tile.resize(nr * cols, 0.0);
            fill(r0, tile);
            // SAFETY: dst covers columns r0..r0+nr of every row of y, disjoint per task;
            // strides describe y [n × rows], x [n × cols] and the tile [nr × cols] used transposed.
            unsafe {
                gemm_view(
                    n,
                    nr,
                    cols,
                    yp.ptr().add(r0),
                    rows,
                    x.as_ptr(),
                    cols,
                    1,
                    tile.as_ptr(),
                    1,
                    cols,
                )
            }
        });
}

/// `gemm` on strided row-major views: `dst [m × n] = lhs [m × k] · rhs [k × n]`, each
/// given as (pointer offset already applied, row stride, column stride).
///
/// # Safety
/// The views must lie inside their buffers; `dst` must not overlap the inputs.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_view(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    lhs: *const f32,
    lhs_rs: usize,
    lhs_cs: usize,
    rhs: *const f32,
    rhs_rs: usize,
    rhs_cs: usize,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        false,
        lhs,
        lhs_cs as isize,
        lhs_rs as isize,
        rhs,
        rhs_cs as isize,
        rhs_rs as isize,
        0.0f32,
        1.0f32,
        false,
        false,
        false,
        gemm::Parallelism::None,
    )
}

fn matmul_elems<T: WeightElem>(
    w: &[T],
    rows: usize,
    cols: usize,
    x: &[f32],
    n: usize,
    y: &mut [f32],
) {
    if n <= GEMV_MAX_TOKENS {
        gemv_rows(rows, n, cols, x, y, |r, xt| {
            T::dot(&w[r * cols..(r + 1) * cols], xt)
        });
    } else {
        matmul_tiled(rows, cols, x, n, y, |r0, tile| {
            T::to_f32_slice(&w[r0 * cols..r0 * cols + tile.len()], tile)
        });
    }
}

/// `y [n × rows] = x [n × cols] · Wᵀ` for a dense stored matrix W [rows × cols].
pub fn matmul_dense(w: &TensorData, rows: usize, cols: usize, x: &[f32], n: usize, y: &mut [f32]) {
    assert_eq!(w.len(), rows * cols, "weight size mismatch");
    match w {
        TensorData::F32(v) => matmul_elems(v, rows, cols, x, n, y),
        TensorData::F16(v) => matmul_elems(v, rows, cols, x, n, y),
        TensorData::BF16(v) => matmul_elems(v, rows, cols, x, n, y),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};
    use rand::{Rng, SeedableRng};

    fn reference(w: &[f32], rows: usize, cols: usize, x: &[f32], n: usize) -> Vec<f64> {
        let mut y = vec![0f64; n * rows];
        for t in 0..n {
            for r in 0..rows {
                y[t * rows + r] = (0..cols)
                    .map(|c| w[r * cols + c] as f64 * x[t * cols + c] as f64)
                    .sum();
            }
        }
        y
    }

    #[test]
    fn dense_matmul_matches_reference_all_dtypes_and_paths() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for &(rows, cols) in &[(1usize, 1usize), (3, 5), (17, 33), (70, 129), (300, 64)] {
            for &n in &[1usize, 2, 4, 5, 9, 40] {
                let wf: Vec<f32> = (0..rows * cols)
                    .map(|_| rng.random_range(-1.0..1.0))
                    .collect();
                let x: Vec<f32> = (0..n * cols).map(|_| rng.random_range(-1.0..1.0)).collect();
                let variants = [
                    TensorData::F32(wf.clone()),
                    TensorData::F16(wf.iter().map(|&v| f16::from_f32(v)).collect()),
                    TensorData::BF16(wf.iter().map(|&v| bf16::from_f32(v)).collect()),
                ];
                for w in variants {
                    let wr = w.to_f32();
                    let want = reference(&wr, rows, cols, &x, n);
                    let mut y = vec![f32::NAN; n * rows];
                    matmul_dense(&w, rows, cols, &x, n, &mut y);
                    let tol = 2e-5 * (cols as f64).sqrt() + 1e-6;
                    for (a, b) in y.iter().zip(&want) {
                        assert!(
                            (*a as f64 - b).abs() < tol,
                            "{:?} {rows}x{cols} n={n}: {a} vs {b}",
                            w.dtype()
                        );
                    }
                }
            }
        }
    }
}
