//! The RoPE kernel: rotate pairs (i, i + rot/2) of every head by a tabled angle.

use rayon::prelude::*;

/// Rotate `x` [n × heads × head_dim] in place for positions pos0..pos0+n, reading
/// row `pos0 + t` of `table` ([position][cos 0..rot/2 | sin 0..rot/2]); with
/// `inverse` by −angle (the transpose, for back-propagation).
pub fn rope_apply(
    x: &mut [f32],
    heads: usize,
    head_dim: usize,
    rot_dim: usize,
    pos0: usize,
    table: &[f32],
    inverse: bool,
) {
    let half = rot_dim / 2;
    let s = if inverse { -1.0f32 } else { 1.0 };
    x.par_chunks_mut(heads * head_dim)
        .enumerate()
        .for_each(|(t, tok)| {
            let row = &table[(pos0 + t) * rot_dim..(pos0 + t + 1) * rot_dim];
            let (cos, sin) = row.split_at(half);
            for h in tok.chunks_mut(head_dim) {
                for i in 0..half {
                    let (a, b) = (h[i], h[i + half]);
                    let si = s * sin[i];
                    h[i] = a * cos[i] - b * si;
                    h[i + half] = b * cos[i] + a * si;
                }
            }
        });
}
