//! Dot products of f32 activations with f32 / f16 / bf16 weight rows.
//!
//! x86-64 with AVX2+FMA(+F16C) uses explicit intrinsics chosen at run time; other
//! machines use a portable version written so the compiler can vectorize it.

use half::{bf16, f16};

/// A weight row element type the engine can multiply with f32 activations.
pub trait WeightElem: Copy + Send + Sync + 'static {
    /// Σ w[i]·x[i] with f32 accumulation.
    fn dot(w: &[Self], x: &[f32]) -> f32;
    /// Convert a slice to f32.
    fn to_f32_slice(w: &[Self], out: &mut [f32]);
}

#[inline(always)]
fn dot_portable<T: Copy>(w: &[T], x: &[f32], cvt: impl Fn(T) -> f32) -> f32 {
    const L: usize = 16;
    let n = w.len().min(x.len());
    let mut acc = [0f32; L];
    let chunks = n / L;
    for c in 0..chunks {
        let wb = &w[c * L..c * L + L];
        let xb = &x[c * L..c * L + L];
        for i in 0..L {
            acc[i] += cvt(wb[i]) * xb[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for i in chunks * L..n {
        s += cvt(w[i]) * x[i];
    }
    s
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// Dot product with a loader that turns 8 elements at `i` into f32 lanes.
    #[inline(always)]
    unsafe fn dot_with(
        n: usize,
        x: *const f32,
        load: impl Fn(usize) -> __m256,
        tail: impl Fn(usize) -> f32,
    ) -> f32 {
        let mut a0 = _mm256_setzero_ps();
        let mut a1 = _mm256_setzero_ps();
        let mut a2 = _mm256_setzero_ps();
        let mut a3 = _mm256_setzero_ps();
        let mut i = 0;
        while i + 32 <= n {
            a0 = _mm256_fmadd_ps(load(i), _mm256_loadu_ps(x.add(i)), a0);
            a1 = _mm256_fmadd_ps(load(i + 8), _mm256_loadu_ps(x.add(i + 8)), a1);
            a2 = _mm256_fmadd_ps(load(i + 16), _mm256_loadu_ps(x.add(i + 16)), a2);
            a3 = _mm256_fmadd_ps(load(i + 24), _mm256_loadu_ps(x.add(i + 24)), a3);
            i += 32;
        }
        while i + 8 <= n {
            a0 = _mm256_fmadd_ps(load(i), _mm256_loadu_ps(x.add(i)), a0);
            i += 8;
        }
        let mut s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
        while i < n {
            s += tail(i) * *x.add(i);
            i += 1;
        }
        s
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_f32(w: &[f32], x: &[f32]) -> f32 {
        let p = w.as_ptr();
        dot_with(
            w.len(),
            x.as_ptr(),
            |i| _mm256_loadu_ps(p.add(i)),
            |i| *p.add(i),
        )
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_bf16(w: &[u16], x: &[f32]) -> f32 {
        let p = w.as_ptr();
        dot_with(
            w.len(),
            x.as_ptr(),
            |i| {
                let h = _mm_loadu_si128(p.add(i) as *const __m128i);
                _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
            },
            |i| f32::from_bits((*p.add(i) as u32) << 16),
        )
    }

    /// out[j] = q · rows[j·stride .. j·stride + q.len()] for j < out.len().
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dots_strided(q: &[f32], rows: &[f32], stride: usize, out: &mut [f32]) {
        let (n, qp) = (q.len(), q.as_ptr());
        for (j, o) in out.iter_mut().enumerate() {
            let r = rows.as_ptr().add(j * stride);
            let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            let mut i = 0;
            while i + 16 <= n {
                a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(i)), _mm256_loadu_ps(r.add(i)), a0);
                a1 = _mm256_fmadd_ps(
                    _mm256_loadu_ps(qp.add(i + 8)),
                    _mm256_loadu_ps(r.add(i + 8)),
                    a1,
                );
                i += 16;
            }
            let mut s = hsum(_mm256_add_ps(a0, a1));
            for k in i..n {
                s += *qp.add(k) * *r.add(k);
            }
            *o = s;
        }
    }

    /// out = Σ_j p[j] · rows[j·stride .. j·stride + out.len()], 64 columns at a
    /// time held in registers across all j.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn weighted_rows(p: &[f32], rows: &[f32], stride: usize, out: &mut [f32]) {
        let n = out.len();
        let mut c0 = 0;
        while c0 + 64 <= n {
            let mut acc = [_mm256_setzero_ps(); 8];
            for (j, &pj) in p.iter().enumerate() {
                let r = rows.as_ptr().add(j * stride + c0);
                let w = _mm256_set1_ps(pj);
                for (k, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(w, _mm256_loadu_ps(r.add(8 * k)), *a);
                }
            }
            for (k, a) in acc.iter().enumerate() {
                _mm256_storeu_ps(out.as_mut_ptr().add(c0 + 8 * k), *a);
            }
            c0 += 64;
        }
        out[c0..].fill(0.0);
        for (j, &pj) in p.iter().enumerate() {
            let r = &rows[j * stride..];
            for c in c0..n {
                out[c] += pj * r[c];
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_f16(w: &[u16], x: &[f32]) -> f32 {
        let p = w.as_ptr();
        dot_with(
            w.len(),
            x.as_ptr(),
            |i| _mm256_cvtph_ps(_mm_loadu_si128(p.add(i) as *const __m128i)),
            |i| half::f16::from_bits(*p.add(i)).to_f32(),
        )
    }
}

#[cfg(target_arch = "x86_64")]
fn has_avx2() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

impl WeightElem for f32 {
    #[inline]
    fn dot(w: &[f32], x: &[f32]) -> f32 {
        assert_eq!(w.len(), x.len());
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // SAFETY: features checked above; lengths equal.
            return unsafe { avx2::dot_f32(w, x) };
        }
        dot_portable(w, x, |v| v)
    }
    fn to_f32_slice(w: &[f32], out: &mut [f32]) {
        out.copy_from_slice(w)
    }
}

impl WeightElem for bf16 {
    #[inline]
    fn dot(w: &[bf16], x: &[f32]) -> f32 {
        assert_eq!(w.len(), x.len());
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            let bits: &[u16] = bytemuck_u16(w);
            // SAFETY: features checked above; lengths equal.
            return unsafe { avx2::dot_bf16(bits, x) };
        }
        dot_portable(w, x, |v| v.to_f32())
    }
    fn to_f32_slice(w: &[bf16], out: &mut [f32]) {
        use half::slice::HalfFloatSliceExt;
        w.convert_to_f32_slice(out)
    }
}

impl WeightElem for f16 {
    #[inline]
    fn dot(w: &[f16], x: &[f32]) -> f32 {
        assert_eq!(w.len(), x.len());
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            let bits: &[u16] = bytemuck_u16(w);
            // SAFETY: features checked above; lengths equal.
            return unsafe { avx2::dot_f16(bits, x) };
        }
        dot_portable(w, x, |v| v.to_f32())
    }
    fn to_f32_slice(w: &[f16], out: &mut [f32]) {
        use half::slice::HalfFloatSliceExt;
        w.convert_to_f32_slice(out)
    }
}

/// View 16-bit floats as their bit patterns.
fn bytemuck_u16<T: Copy>(w: &[T]) -> &[u16] {
    debug_assert_eq!(std::mem::size_of::<T>(), 2);
    // SAFETY: f16/bf16 are repr(transparent) over u16.
    unsafe { std::slice::from_raw_parts(w.as_ptr() as *const u16, w.len()) }
}

/// Plain f32 dot product (activations with activations).
#[inline]
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    <f32 as WeightElem>::dot(a, b)
}

/// out[j] = q · rows[j·stride ..][..q.len()] for each j < out.len() (the
/// scores of one query against strided keys).
pub fn dots_strided(q: &[f32], rows: &[f32], stride: usize, out: &mut [f32]) {
    if let Some(last) = out.len().checked_sub(1) {
        assert!(rows.len() >= last * stride + q.len());
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: features checked above; every row lies inside `rows` (asserted).
        return unsafe { avx2::dots_strided(q, rows, stride, out) };
    }
    for (j, o) in out.iter_mut().enumerate() {
        *o = dot_portable(q, &rows[j * stride..j * stride + q.len()], |v| v);
    }
}

/// out = Σ_j p[j] · rows[j·stride ..][..out.len()] (the probability-weighted
/// sum of strided values).
pub fn weighted_rows(p: &[f32], rows: &[f32], stride: usize, out: &mut [f32]) {
    if let Some(last) = p.len().checked_sub(1) {
        assert!(rows.len() >= last * stride + out.len());
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: features checked above; every row lies inside `rows` (asserted).
        return unsafe { avx2::weighted_rows(p, rows, stride, out) };
    }
    out.fill(0.0);
    for (j, &pj) in p.iter().enumerate() {
        for (o, v) in out.iter_mut().zip(&rows[j * stride..]) {
            *o += pj * v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn reference(w: &[f32], x: &[f32]) -> f64 {
        w.iter().zip(x).map(|(a, b)| *a as f64 * *b as f64).sum()
    }

    #[test]
    fn dots_match_f64_reference_for_odd_lengths() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for n in [1usize, 7, 8, 31, 33, 64, 100, 1027] {
            let w: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
            let x: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
            let tol = 1e-5 * (n as f64).sqrt() + 1e-6;
            assert!(
                (f32::dot(&w, &x) as f64 - reference(&w, &x)).abs() < tol,
                "f32 n={n}"
            );
            let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            let wbf: Vec<f32> = wb.iter().map(|v| v.to_f32()).collect();
            assert!(
                (bf16::dot(&wb, &x) as f64 - reference(&wbf, &x)).abs() < tol,
                "bf16 n={n}"
            );
            let wh: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
            let whf: Vec<f32> = wh.iter().map(|v| v.to_f32()).collect();
            assert!(
                (f16::dot(&wh, &x) as f64 - reference(&whf, &x)).abs() < tol,
                "f16 n={n}"
            );
            assert!(
                (dot_portable(&wb, &x, |v| v.to_f32()) as f64 - reference(&wbf, &x)).abs() < tol
            );
        }
    }

    #[test]
    fn strided_dots_and_weighted_rows_match_scalar() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(10);
        for (hd, stride, n) in [
            (64usize, 192usize, 5usize),
            (72, 80, 3),
            (7, 9, 1),
            (128, 128, 4),
        ] {
            let rows: Vec<f32> = (0..stride * n)
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            let q: Vec<f32> = (0..hd).map(|_| rng.random_range(-1.0..1.0)).collect();
            let mut s = vec![0f32; n];
            dots_strided(&q, &rows, stride, &mut s);
            let mut o = vec![9f32; hd];
            weighted_rows(&s, &rows, stride, &mut o);
            for j in 0..n {
                let want = reference(&q, &rows[j * stride..j * stride + hd]);
                assert!(
                    (s[j] as f64 - want).abs() < 1e-5 * (hd as f64).sqrt(),
                    "dot hd={hd} j={j}"
                );
            }
            for c in 0..hd {
                let want: f64 = (0..n)
                    .map(|j| s[j] as f64 * rows[j * stride + c] as f64)
                    .sum();
                assert!((o[c] as f64 - want).abs() < 1e-5, "weighted hd={hd} c={c}");
            }
        }
    }
}
