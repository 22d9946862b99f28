//! Thresholds (METHOD.md 2d): with r the fraction of tokens that should run at
//! the lower precision, τ is the r-quantile of the error on calibration inputs.

/// The r-quantile of `v` (linear interpolation between order statistics).
pub fn quantile(v: &[f32], r: f64) -> f32 {
    assert!(!v.is_empty(), "quantile of nothing");
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let pos = r.clamp(0.0, 1.0) * (s.len() - 1) as f64;
    let (i, f) = (pos.floor() as usize, pos - pos.floor());
    if i + 1 < s.len() {
        (s[i] as f64 * (1.0 - f) + s[i + 1] as f64 * f) as f32
    } else {
        s[i]
    }
}

/// How one linear decides.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decision {
    /// r > 0.99: always the lower precision (τ = +∞).
    AlwaysLow,
    /// r < 0.01: always the higher precision (τ = −∞).
    AlwaysHigh,
    /// Higher precision when the estimate exceeds τ.
    Threshold(f32),
}

/// Decision for low-precision fraction `r` given calibration errors `e`.
pub fn decide(e: &[f32], r: f64) -> Decision {
    if r > 0.99 {
        Decision::AlwaysLow
    } else if r < 0.01 {
        Decision::AlwaysHigh
    } else {
        Decision::Threshold(quantile(e, r))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_split_the_tokens() {
        let v: Vec<f32> = (0..101).map(|i| i as f32).collect();
        assert_eq!(quantile(&v, 0.25), 25.0);
        assert_eq!(quantile(&v, 1.0), 100.0);
        assert_eq!(quantile(&[5.0, 1.0, 3.0], 0.5), 3.0);
        assert!((quantile(&[0.0, 1.0], 0.3) - 0.3).abs() < 1e-6);
        let shuffled: Vec<f32> = (0..1000).map(|i| ((i * 7919) % 1000) as f32).collect();
        match decide(&shuffled, 0.7) {
            Decision::Threshold(t) => {
                let below = shuffled.iter().filter(|&&x| x <= t).count();
                assert!((below as f64 / 1000.0 - 0.7).abs() < 0.002, "{below}");
            }
            d => panic!("{d:?}"),
        }
        assert_eq!(decide(&shuffled, 0.995), Decision::AlwaysLow);
        assert_eq!(decide(&shuffled, 0.005), Decision::AlwaysHigh);
    }
}
