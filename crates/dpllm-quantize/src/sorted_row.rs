//! A row of weights sorted by value, with prefix sums of w, w·x, w·x² and x.

/// Weighted values sorted ascending, with prefix sums for interval statistics.
pub struct SortedRow {
    /// Original column of each sorted position.
    pub order: Vec<u32>,
    /// Sorted values.
    pub x: Vec<f64>,
    pw: Vec<f64>,
    pwx: Vec<f64>,
    pwx2: Vec<f64>,
    px: Vec<f64>,
}

impl SortedRow {
    /// Sort `values` with their non-negative `weights` (sensitivities).
    ///
    /// Elements whose value is exactly zero get zero weight; if the total weight
    /// is zero (or not finite), every element gets weight 1 (METHOD.md 1.2).
    pub fn new(values: &[f32], weights: &[f32]) -> SortedRow {
        assert_eq!(values.len(), weights.len());
        let mut order: Vec<u32> = (0..values.len() as u32).collect();
        order.sort_by(|&a, &b| values[a as usize].total_cmp(&values[b as usize]));
        let clean = |i: usize| {
            let w = weights[i] as f64;
            if values[i] == 0.0 || !w.is_finite() || w < 0.0 {
                0.0
            } else {
                w
            }
        };
        let total: f64 = (0..values.len()).map(clean).sum();
        let uniform = !(total > 0.0 && total.is_finite());
        let n = values.len();
        let mut s = SortedRow {
            x: Vec::with_capacity(n),
            pw: vec![0.0; n + 1],
            pwx: vec![0.0; n + 1],
            pwx2: vec![0.0; n + 1],
            px: vec![0.0; n + 1],
            order,
        };
        for (i, &o) in s.order.iter().enumerate() {
            let x = values[o as usize] as f64;
            let w = if uniform { 1.0 } else { clean(o as usize) };
            s.x.push(x);
            s.pw[i + 1] = s.pw[i] + w;
            s.pwx[i + 1] = s.pwx[i] + w * x;
            s.pwx2[i + 1] = s.pwx2[i] + w * x * x;
            s.px[i + 1] = s.px[i] + x;
        }
        s
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.x.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.x.is_empty()
    }

    /// Weighted squared error of the interval [l, r) around its weighted mean.
    #[inline]
    pub fn cost(&self, l: usize, r: usize) -> f64 {
        let w = self.pw[r] - self.pw[l];
        if r <= l + 1 || w <= 0.0 {
            return 0.0;
        }
        let wx = self.pwx[r] - self.pwx[l];
        let c = (self.pwx2[r] - self.pwx2[l]) - wx * wx / w;
        c.max(0.0)
    }

    /// Weighted mean of [l, r) (plain mean when its weight is zero; NaN when empty).
    #[inline]
    pub fn mean(&self, l: usize, r: usize) -> f64 {
        let w = self.pw[r] - self.pw[l];
        if w > 0.0 {
            (self.pwx[r] - self.pwx[l]) / w
        } else if r > l {
            (self.px[r] - self.px[l]) / (r - l) as f64
        } else {
            f64::NAN
        }
    }
}
