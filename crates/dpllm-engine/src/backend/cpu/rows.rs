//! Moving rows and columns of row-major activations: fused-output splits and the
//! gather/scatter of the tokens a precision decision groups together.

/// Split each token's row of `x` [n × Σ widths] into consecutive parts, part i
/// [n × widths_i] (the widths are the parts' lengths / n).
pub fn split_columns(x: &[f32], n: usize, parts: &mut [&mut [f32]]) {
    let total = x.len() / n.max(1);
    let widths: Vec<usize> = parts.iter().map(|p| p.len() / n.max(1)).collect();
    for t in 0..n {
        let mut off = t * total;
        for (p, w) in parts.iter_mut().zip(&widths) {
            p[t * w..(t + 1) * w].copy_from_slice(&x[off..off + w]);
            off += w;
        }
    }
}

/// Join parts [n × widths_i] into rows of `out` [n × Σ widths] (the inverse of [`split_columns`]).
pub fn join_columns(parts: &[&[f32]], n: usize, out: &mut [f32]) {
    let total = out.len() / n.max(1);
    for t in 0..n {
        let mut off = t * total;
        for p in parts {
            let w = p.len() / n.max(1);
            out[off..off + w].copy_from_slice(&p[t * w..(t + 1) * w]);
            off += w;
        }
    }
}

/// The rows `t` of `x` [n × width] with `pick(t)`, in order.
pub fn gather(x: &[f32], width: usize, pick: impl Fn(usize) -> bool) -> Vec<f32> {
    let mut out = Vec::new();
    for (t, row) in x.chunks(width).enumerate() {
        if pick(t) {
            out.extend_from_slice(row);
        }
    }
    out
}

/// Write the rows of `src` to the rows `t` of `dst` [n × width] with `pick(t)`, in order.
pub fn scatter(src: &[f32], width: usize, pick: impl Fn(usize) -> bool, dst: &mut [f32]) {
    let mut k = 0;
    for (t, row) in dst.chunks_mut(width).enumerate() {
        if pick(t) {
            row.copy_from_slice(&src[k * width..(k + 1) * width]);
            k += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_join_gather_scatter_round_trip() {
        let x: Vec<f32> = (0..12).map(|v| v as f32).collect(); // 3 rows of 4
        let (mut a, mut b) = (vec![0f32; 3], vec![0f32; 9]);
        split_columns(&x, 3, &mut [&mut a, &mut b]);
        assert_eq!(a, [0.0, 4.0, 8.0]);
        assert_eq!(b, [1.0, 2.0, 3.0, 5.0, 6.0, 7.0, 9.0, 10.0, 11.0]);
        let mut back = vec![0f32; 12];
        join_columns(&[&a, &b], 3, &mut back);
        assert_eq!(back, x);
        let odd = gather(&x, 4, |t| t % 2 == 1);
        assert_eq!(odd, [4.0, 5.0, 6.0, 7.0]);
        let mut y = vec![-1f32; 12];
        scatter(&odd, 4, |t| t % 2 == 1, &mut y);
        assert_eq!(&y[4..8], &x[4..8]);
        assert!(y[..4].iter().chain(&y[8..]).all(|&v| v == -1.0));
    }
}
