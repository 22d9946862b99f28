//! Exact sensitivity-weighted 1-D k-means over a sorted row.
//!
//! In one dimension optimal clusters are contiguous intervals of the sorted
//! values, so k-means is a partition problem solved exactly by dynamic
//! programming: D[j][i] = min_m D[j-1][m] + cost(m, i), with cost(m, i) the
//! weighted squared error of interval [m, i), O(1) from prefix sums. The optimal
//! m is monotone in i (the cost satisfies the quadrangle inequality), so each DP
//! row is filled by divide and conquer in O(n log n): O(k·n·log n) in total.

use crate::sorted_row::SortedRow;

/// Optimal boundaries: `k + 1` sorted indices, cluster c = [b[c], b[c+1]).
/// Clusters may be empty when the row has fewer than `k` elements.
pub fn optimal_partition(row: &SortedRow, k: usize) -> Vec<usize> {
    let n = row.len();
    assert!(k >= 1);
    if n <= k {
        // One element per cluster, the rest empty at the end.
        let mut b: Vec<usize> = (0..=n).collect();
        b.resize(k + 1, n);
        return b;
    }
    let mut prev: Vec<f64> = (0..=n).map(|i| row.cost(0, i)).collect();
    let mut arg: Vec<Vec<u32>> = Vec::with_capacity(k);
    arg.push(vec![0; n + 1]);
    let mut cur = vec![f64::INFINITY; n + 1];
    for _j in 1..k {
        let mut a = vec![0u32; n + 1];
        fill_row(row, &prev, &mut cur, &mut a, 0, n, 0, n);
        arg.push(a);
        std::mem::swap(&mut prev, &mut cur);
    }
    let mut b = vec![0usize; k + 1];
    b[k] = n;
    for j in (1..k).rev() {
        b[j] = arg[j][b[j + 1]] as usize;
    }
    b
}

/// Fill cur[lo..=hi] given that the optimal split of each lies in [opt_lo, opt_hi].
#[allow(clippy::too_many_arguments)]
fn fill_row(
    row: &SortedRow,
    prev: &[f64],
    cur: &mut [f64],
    arg: &mut [u32],
    lo: usize,
    hi: usize,
    opt_lo: usize,
    opt_hi: usize,
) {
    if lo > hi {
        return;
    }
    let mid = (lo + hi) / 2;
    let mut best = f64::INFINITY;
    let mut best_m = opt_lo;
    for (m, &p) in prev
        .iter()
        .enumerate()
        .take(opt_hi.min(mid) + 1)
        .skip(opt_lo)
    {
        let v = p + row.cost(m, mid);
        if v < best {
            best = v;
            best_m = m;
        }
    }
    cur[mid] = best;
    arg[mid] = best_m as u32;
    if mid > lo {
        fill_row(row, prev, cur, arg, lo, mid - 1, opt_lo, best_m);
    }
    fill_row(row, prev, cur, arg, mid + 1, hi, best_m, opt_hi);
}

/// Total weighted error of a partition.
pub fn partition_cost(row: &SortedRow, bounds: &[usize]) -> f64 {
    bounds.windows(2).map(|w| row.cost(w[0], w[1])).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Best cost over every way to cut n sorted points into k contiguous (possibly empty) intervals.
    fn brute(row: &SortedRow, k: usize, start: usize) -> f64 {
        if k == 1 {
            return row.cost(start, row.len());
        }
        (start..=row.len())
            .map(|m| row.cost(start, m) + brute(row, k - 1, m))
            .fold(f64::INFINITY, f64::min)
    }

    #[test]
    fn dp_matches_brute_force_on_small_rows() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        for trial in 0..200 {
            let n = rng.random_range(1..13);
            let k = rng.random_range(1..6);
            let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            let w: Vec<f32> = (0..n)
                .map(|_| {
                    if rng.random_bool(0.2) {
                        0.0
                    } else {
                        rng.random_range(0.0f32..3.0)
                    }
                })
                .collect();
            let row = SortedRow::new(&v, &w);
            let b = optimal_partition(&row, k);
            assert_eq!(b.len(), k + 1);
            assert!(b.windows(2).all(|p| p[0] <= p[1]) && b[0] == 0 && b[k] == n);
            let got = partition_cost(&row, &b);
            let want = brute(&row, k, 0);
            assert!(
                (got - want).abs() <= 1e-9 * (1.0 + want),
                "trial {trial}: n={n} k={k} got {got} want {want}"
            );
        }
    }

    #[test]
    fn separated_groups_are_found() {
        let v = [0.0f32, 0.01, 0.02, 5.0, 5.01, 10.0, 10.02, 10.01];
        let row = SortedRow::new(&v, &[1.0; 8]);
        let b = optimal_partition(&row, 3);
        assert_eq!(b, vec![0, 3, 5, 8]);
        // The zero-valued element has zero weight and joins the first cluster for free.
    }
}
