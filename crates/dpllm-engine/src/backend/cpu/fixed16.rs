//! 16-bit fixed-point operands for the integer GEMV kernels (`pmaddwd`): a
//! group of values shares one scale, its largest magnitude over [`Q_MAX`], so
//! each value keeps 15 significant bits of the group's largest. A pair of
//! products of two such operands stays below 2^31.

/// Largest magnitude of a 16-bit operand.
pub const Q_MAX: f32 = 32767.0;

/// Round to the nearest integer (ties to even) for |v| < 2^22, without a libm call.
#[inline(always)]
pub fn round(v: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2^23
    (v + MAGIC) - MAGIC
}

/// Running largest magnitude of a group; NaN or inf make it NaN for good
/// (`f32::max` would drop a NaN at the next finite value), so the group's
/// results come out non-finite instead of silently zero.
#[inline(always)]
pub fn track_max(m: f32, v: f32) -> f32 {
    if v.is_finite() && !m.is_nan() {
        m.max(v.abs())
    } else {
        f32::NAN
    }
}

/// (multiplier to the integers, scale back) of a group whose largest magnitude is `m`.
#[inline(always)]
pub fn scales(m: f32) -> (f32, f32) {
    (if m > 0.0 { Q_MAX / m } else { 0.0 }, m / Q_MAX)
}

/// `v` as an integer operand with multiplier `inv` (from [`scales`]).
#[inline(always)]
pub fn quantize(v: f32, inv: f32) -> i16 {
    round(v * inv) as i16
}

/// Quantize `x` in consecutive groups of `group` values (the last may be
/// shorter), appending the integers to `q` and one scale per group to `s`.
pub fn quantize_groups(x: &[f32], group: usize, q: &mut Vec<i16>, s: &mut Vec<f32>) {
    for g in x.chunks(group) {
        let (inv, step) = scales(g.iter().fold(0f32, |m, &v| track_max(m, v)));
        q.extend(g.iter().map(|&v| quantize(v, inv)));
        s.push(step);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_round_trip_within_half_a_step() {
        let x: Vec<f32> = (0..70).map(|i| ((i * 37) % 23) as f32 - 11.5).collect();
        let (mut q, mut s) = (Vec::new(), Vec::new());
        quantize_groups(&x, 32, &mut q, &mut s);
        assert_eq!((q.len(), s.len()), (70, 3));
        for (c, &v) in x.iter().enumerate() {
            let back = q[c] as f32 * s[c / 32];
            assert!(
                (back - v).abs() <= s[c / 32] / 2.0 * 1.0001,
                "{c}: {back} vs {v}"
            );
        }
        assert_eq!(q.iter().map(|v| v.unsigned_abs()).max(), Some(32767));
        assert_eq!(round(2.5), 2.0);
        assert_eq!(round(-3.5), -4.0);
    }

    #[test]
    fn zero_and_non_finite_groups() {
        let (mut q, mut s) = (Vec::new(), Vec::new());
        quantize_groups(&[0.0; 4], 4, &mut q, &mut s);
        quantize_groups(&[1.0, f32::NAN, 2.0, f32::INFINITY], 4, &mut q, &mut s);
        // A finite value after the NaN must not clear it.
        quantize_groups(&[f32::INFINITY, 1.0, 2.0], 3, &mut q, &mut s);
        quantize_groups(&[1.0, f32::NAN, 2.0], 3, &mut q, &mut s);
        assert_eq!(&q[..4], &[0; 4]);
        assert_eq!(s[0], 0.0);
        assert!(s[1..].iter().all(|s| s.is_nan()), "{s:?}");
    }
}
