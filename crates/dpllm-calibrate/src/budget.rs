//! Memory budget → per-linear maximum precision (METHOD.md 2a), and the static
//! layer-wise baseline: a multiple-choice knapsack solved exactly by dynamic
//! programming over the extra bits.
//!
//! Each linear l picks a precision b in `min_bits..=max_bits` costing
//! `size_l · b` bits of memory and `cost_l(b)` estimated loss; the total memory
//! may not exceed `budget · Σ size_l`. Sizes are divided by their greatest common
//! divisor (for real models 64Ki or more: every projection is a multiple of the
//! hidden size), so the DP over capacity is small and exact. When the table would
//! exceed [`MAX_CELLS`], sizes are rounded *up* to a coarser unit: the result then
//! still respects the budget but may be slightly suboptimal (`exact = false`).

use anyhow::{bail, ensure, Result};

/// Largest DP table (linears × capacity cells) before sizes are coarsened.
pub const MAX_CELLS: usize = 50_000_000;

/// One linear's choices.
#[derive(Debug, Clone)]
pub struct Item {
    /// Parameter count.
    pub size: usize,
    /// `cost[i]` = estimated loss at precision `min_bits + i` (items may offer
    /// different numbers of precisions, e.g. up to their own maximum).
    pub cost: Vec<f64>,
}

/// A solved assignment.
#[derive(Debug, Clone, PartialEq)]
pub struct Assignment {
    /// Precision of each item.
    pub bits: Vec<u32>,
    /// Σ cost at those precisions.
    pub cost: f64,
    /// Σ size·bits / Σ size.
    pub avg_bits: f64,
    /// False when sizes had to be coarsened (see module docs).
    pub exact: bool,
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Minimize Σ cost subject to Σ size·bits ≤ budget·Σ size, bits in `min_bits..min_bits+cost.len()`.
pub fn solve(items: &[Item], min_bits: u32, budget: f64) -> Result<Assignment> {
    ensure!(!items.is_empty(), "no linears to assign precisions to");
    let choices = items.iter().map(|i| i.cost.len()).max().unwrap_or(0);
    ensure!(choices <= 256, "at most 256 precisions per linear");
    for (i, it) in items.iter().enumerate() {
        ensure!(it.size > 0, "linear {i} has size 0");
        ensure!(!it.cost.is_empty(), "linear {i} offers no precision");
        ensure!(
            it.cost.iter().all(|c| c.is_finite()),
            "linear {i} has a non-finite cost"
        );
    }
    let max_bits = min_bits + choices as u32 - 1;
    if budget.is_nan() || budget < min_bits as f64 {
        bail!("budget {budget} bits is below the lowest precision {min_bits}");
    }
    let total: usize = items.iter().map(|i| i.size).sum();
    // Capacity in extra bits over min_bits, in units of `unit` parameters.
    let extra = ((budget.min(max_bits as f64) - min_bits as f64) * total as f64)
        .floor()
        .max(0.0) as usize;
    let mut unit = items.iter().fold(0, |g, i| gcd(g, i.size));
    let mut exact = true;
    while items.len() * (extra / unit + 1) > MAX_CELLS {
        unit *= 2;
        exact = false;
    }
    let units: Vec<usize> = items.iter().map(|i| i.size.div_ceil(unit)).collect();
    let cap = extra / unit;
    // dp[c] = least cost of the items so far using exactly ≤ c extra units; choice[l][c] the pick.
    let inf = f64::INFINITY;
    let mut dp = vec![0f64; cap + 1];
    let mut choice = vec![vec![0u8; cap + 1]; items.len()];
    for (l, it) in items.iter().enumerate() {
        let mut next = vec![inf; cap + 1];
        for c in 0..=cap {
            for (k, &cost) in it.cost.iter().enumerate() {
                let w = units[l] * k;
                if w > c || dp[c - w] == inf {
                    continue;
                }
                let v = dp[c - w] + cost;
                if v < next[c] {
                    next[c] = v;
                    choice[l][c] = k as u8;
                }
            }
        }
        dp = next;
    }
    let (mut c, _) = dp
        .iter()
        .enumerate()
        .fold((0, inf), |b, (c, &v)| if v < b.1 { (c, v) } else { b });
    ensure!(
        dp[c].is_finite(),
        "no assignment fits the budget of {budget} bits"
    );
    let mut bits = vec![0u32; items.len()];
    for l in (0..items.len()).rev() {
        let k = choice[l][c] as usize;
        bits[l] = min_bits + k as u32;
        c -= units[l] * k;
    }
    let cost = items
        .iter()
        .zip(&bits)
        .map(|(it, &b)| it.cost[(b - min_bits) as usize])
        .sum();
    let avg_bits = items
        .iter()
        .zip(&bits)
        .map(|(it, &b)| it.size as f64 * b as f64)
        .sum::<f64>()
        / total as f64;
    Ok(Assignment {
        bits,
        cost,
        avg_bits,
        exact,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn brute(items: &[Item], min_bits: u32, budget: f64) -> f64 {
        let k = items[0].cost.len();
        let total: usize = items.iter().map(|i| i.size).sum();
        let mut best = f64::INFINITY;
        for code in 0..k.pow(items.len() as u32) {
            let (mut c, mut mem, mut cost) = (code, 0usize, 0f64);
            for it in items {
                let pick = c % k;
                c /= k;
                mem += it.size * (min_bits as usize + pick);
                cost += it.cost[pick];
            }
            if mem as f64 <= budget * total as f64 + 1e-9 && cost < best {
                best = cost;
            }
        }
        best
    }

    #[test]
    fn matches_brute_force_on_random_instances() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        for _ in 0..300 {
            let n = rng.random_range(1..=6);
            let items: Vec<Item> = (0..n)
                .map(|_| {
                    let size = [128usize, 384, 1024, 3 * 128][rng.random_range(0..4)]
                        * rng.random_range(1..4);
                    // Costs fall with bits, as quantization errors do, but not always convexly.
                    let mut c = rng.random_range(1.0..100.0);
                    let cost = (0..4)
                        .map(|_| {
                            let v = c;
                            c *= rng.random_range(0.1..0.9);
                            v
                        })
                        .collect();
                    Item { size, cost }
                })
                .collect();
            let budget = rng.random_range(3.0..6.5);
            let a = solve(&items, 3, budget).unwrap();
            assert!(a.exact);
            let want = brute(&items, 3, budget);
            assert!(
                (a.cost - want).abs() <= 1e-9 * want.abs(),
                "dp {} vs brute {want}",
                a.cost
            );
            assert!(a.avg_bits <= budget + 1e-12);
        }
    }

    #[test]
    fn items_may_offer_fewer_precisions() {
        let items = vec![
            Item {
                size: 10,
                cost: vec![5.0, 1.0],
            },
            Item {
                size: 10,
                cost: vec![5.0, 4.0, 3.0, 0.0],
            },
        ];
        let a = solve(&items, 3, 6.0).unwrap();
        assert_eq!(a.bits, vec![4, 6]);
        assert!(solve(
            &[Item {
                size: 3,
                cost: vec![]
            }],
            3,
            4.0
        )
        .is_err());
    }

    #[test]
    fn uses_the_budget_and_rejects_bad_input() {
        let items: Vec<Item> = (0..10)
            .map(|i| Item {
                size: 1000 + i * 10,
                cost: vec![8.0, 4.0, 2.0, 1.0],
            })
            .collect();
        let a = solve(&items, 3, 5.0).unwrap();
        assert!(a.avg_bits <= 5.0 && a.avg_bits > 4.9, "{}", a.avg_bits);
        assert_eq!(solve(&items, 3, 9.0).unwrap().bits, vec![6; 10]);
        assert_eq!(solve(&items, 3, 3.0).unwrap().bits, vec![3; 10]);
        assert!(solve(&items, 3, 2.5).is_err());
        assert!(solve(&[], 3, 4.0).is_err());
        assert!(solve(
            &[Item {
                size: 0,
                cost: vec![1.0]
            }],
            3,
            4.0
        )
        .is_err());
        assert!(solve(
            &[Item {
                size: 4,
                cost: vec![f64::NAN]
            }],
            3,
            4.0
        )
        .is_err());
    }

    #[test]
    fn coarsened_sizes_still_respect_the_budget() {
        // Coprime sizes and a large model force coarsening.
        let items: Vec<Item> = (0..200)
            .map(|i| Item {
                size: 1_000_003 + 2 * i,
                cost: vec![4.0, 2.0, 1.0, 0.5],
            })
            .collect();
        let a = solve(&items, 3, 4.5).unwrap();
        assert!(!a.exact);
        assert!(a.avg_bits <= 4.5 && a.avg_bits > 4.45, "{}", a.avg_bits);
    }
}
