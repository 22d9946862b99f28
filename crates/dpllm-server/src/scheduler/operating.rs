//! Operating points: what a request asks to run at (a DP-LLM target, uniform
//! bits, a latency budget), what the loaded model offers, and the decode
//! latency of each offer on this device, measured at start-up and kept
//! current from live decoding.

use std::sync::Mutex;

use serde::Serialize;

use crate::error::ApiError;

/// What a request asks to run at (serialized as the request's `"dpllm"`
/// object spells it: `{"target_bits": 3.5}`, `{"bits": 4}`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OperatingPoint {
    /// The server's default.
    Default,
    /// Every linear at the highest precision loaded.
    Highest,
    /// The DP-LLM plan for this target average bits (in the loaded budget).
    #[serde(rename = "target_bits")]
    Target(f64),
    /// Every quantized linear at this many bits.
    Bits(u32),
    /// The highest-quality point whose decode latency meets this many ms per token.
    #[serde(rename = "max_ms_per_token")]
    Latency(f64),
}

/// A precision a request runs at.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Point {
    /// The highest precision loaded.
    Highest,
    /// A DP-LLM plan, by target bits.
    Target(f64),
    /// Uniform bits.
    Bits(u32),
}

impl Point {
    /// How responses and metrics name it.
    pub fn label(&self) -> String {
        match self {
            Point::Highest => "highest".into(),
            Point::Target(t) => format!("target {t}"),
            Point::Bits(b) => format!("{b} bits"),
        }
    }

    /// The average bits it aims at (`highest`: of the highest point), its quality rank.
    fn bits(&self, highest: f64) -> f64 {
        match *self {
            Point::Highest => highest,
            Point::Target(t) => t,
            Point::Bits(b) => b as f64,
        }
    }

    /// Better than `o`: more bits; at equal bits a DP-LLM plan before uniform
    /// bits (its layer-wise allocation is worth more than uniform precision).
    fn better_than(&self, o: &Point, highest: f64) -> bool {
        let (a, b) = (self.bits(highest), o.bits(highest));
        a > b || (a == b && matches!(self, Point::Target(_)) && !matches!(o, Point::Target(_)))
    }
}

/// What the loaded model offers.
#[derive(Debug, Clone, Serialize)]
pub struct ModelInfo {
    /// Name in responses.
    pub name: String,
    /// Context window, tokens.
    pub context: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// Memory budget the model was loaded for (average bits), if any.
    pub budget: Option<f64>,
    /// Uniform bit-widths every linear can run at (any-precision models).
    pub bits: Vec<u32>,
    /// Average bits of the highest precision loaded (any-precision models).
    pub highest_bits: Option<f64>,
    /// DP-LLM targets calibrated for the budget.
    pub targets: Vec<f64>,
    /// Where requests that name no operating point run.
    pub default: OperatingPoint,
}

impl ModelInfo {
    /// Every point a request can run at.
    pub fn points(&self) -> Vec<Point> {
        let mut v = vec![Point::Highest];
        v.extend(self.bits.iter().map(|&b| Point::Bits(b)));
        v.extend(self.targets.iter().map(|&t| Point::Target(t)));
        v
    }

    /// A 400 when the model does not offer `op` (`profiled`: whether a latency
    /// profile exists).
    pub fn check(&self, op: OperatingPoint, profiled: bool) -> Result<(), ApiError> {
        match op {
            OperatingPoint::Default | OperatingPoint::Highest => Ok(()),
            OperatingPoint::Bits(b) if self.bits.contains(&b) => Ok(()),
            OperatingPoint::Bits(b) if self.bits.is_empty() => Err(ApiError::invalid(
                "dpllm.bits",
                format!("dpllm.bits {b}: this model is not an any-precision model"),
            )),
            OperatingPoint::Bits(b) => Err(ApiError::invalid(
                "dpllm.bits",
                format!(
                    "dpllm.bits {b} is not loaded (uniform bits on this server: {:?})",
                    self.bits
                ),
            )),
            OperatingPoint::Target(t) if self.targets.contains(&t) => Ok(()),
            OperatingPoint::Target(t) => Err(ApiError::invalid(
                "dpllm.target_bits",
                format!(
                    "no DP-LLM plan for target {t}{} (calibrated targets: {:?})",
                    self.budget
                        .map(|b| format!(" at budget {b}"))
                        .unwrap_or_default(),
                    self.targets
                ),
            )),
            OperatingPoint::Latency(_) if profiled => Ok(()),
            OperatingPoint::Latency(_) => Err(ApiError::invalid(
                "dpllm.max_ms_per_token",
                "this server has no latency profile (started with --profile-tokens 0)",
            )),
        }
    }
}

/// A point's measured decode latency.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Latency {
    /// The point.
    pub point: Point,
    /// Milliseconds per decoded token.
    pub ms_per_token: f64,
}

/// Weight of a new live measurement in the load factor.
const LIVE_WEIGHT: f64 = 0.2;

/// Decode latency of each point on this device: each point's latency alone
/// (measured at start-up) times one load factor, which live measurements
/// keep current (a request's ms per token over its point's latency alone).
/// Load slows every point alike, so one factor keeps the points in the order
/// the profile measured, where separate live figures would compare points
/// measured under different loads.
#[derive(Debug)]
pub struct LatencyProfile {
    state: Mutex<(Vec<Latency>, f64)>,
}

impl Default for LatencyProfile {
    fn default() -> Self {
        Self::new(Vec::new())
    }
}

impl LatencyProfile {
    /// A profile from measurements of each point alone.
    pub fn new(alone: Vec<Latency>) -> Self {
        LatencyProfile {
            state: Mutex::new((alone, 1.0)),
        }
    }

    /// True when it holds no measurement.
    pub fn is_empty(&self) -> bool {
        self.lock().0.is_empty()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (Vec<Latency>, f64)> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The best point that decodes within `ms` per token under the current
    /// load, and true; or, when none does, the fastest and false. None
    /// without measurements.
    pub fn best_within(&self, ms: f64, highest: f64) -> Option<(Point, bool)> {
        let g = self.lock();
        let (alone, load) = (&g.0, g.1);
        let best = (alone.iter())
            .filter(|l| l.ms_per_token * load <= ms)
            .map(|l| l.point)
            .reduce(|a, b| if b.better_than(&a, highest) { b } else { a });
        match best {
            Some(p) => Some((p, true)),
            None => (alone.iter())
                .min_by(|a, b| a.ms_per_token.total_cmp(&b.ms_per_token))
                .map(|l| (l.point, false)),
        }
    }

    /// A live measurement: a request at `point` decoded at `ms` per token.
    pub fn record(&self, point: Point, ms: f64) {
        if !(ms.is_finite() && ms > 0.0) {
            return;
        }
        let mut g = self.lock();
        let load = g.1;
        match g.0.iter().find(|l| l.point == point) {
            Some(l) => {
                let ratio = ms / l.ms_per_token;
                g.1 += LIVE_WEIGHT * (ratio - load);
            }
            None => g.0.push(Latency {
                point,
                ms_per_token: ms / load,
            }),
        }
    }

    /// Each point's latency alone.
    pub fn alone(&self) -> Vec<Latency> {
        self.lock().0.clone()
    }

    /// Each point's latency under the current load, and the load factor.
    pub fn snapshot(&self) -> (Vec<Latency>, f64) {
        let g = self.lock();
        let now = (g.0.iter())
            .map(|l| Latency {
                point: l.point,
                ms_per_token: l.ms_per_token * g.1,
            })
            .collect();
        (now, g.1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile() -> LatencyProfile {
        let l = |point, ms_per_token| Latency {
            point,
            ms_per_token,
        };
        LatencyProfile::new(vec![
            l(Point::Highest, 20.0),
            l(Point::Bits(3), 8.0),
            l(Point::Bits(4), 10.0),
            l(Point::Target(4.0), 11.0),
            l(Point::Target(3.5), 9.5),
        ])
    }

    #[test]
    fn a_latency_budget_picks_the_best_point_that_meets_it() {
        let p = profile();
        assert_eq!(p.best_within(100.0, 5.0), Some((Point::Highest, true)));
        assert_eq!(p.best_within(11.0, 5.0), Some((Point::Target(4.0), true)));
        assert_eq!(p.best_within(10.5, 5.0), Some((Point::Bits(4), true)));
        assert_eq!(p.best_within(9.6, 5.0), Some((Point::Target(3.5), true)));
        // None meets it: the fastest, flagged.
        assert_eq!(p.best_within(1.0, 5.0), Some((Point::Bits(3), false)));
        assert_eq!(LatencyProfile::default().best_within(1.0, 5.0), None);
    }

    #[test]
    fn live_measurements_scale_every_point_alike() {
        let p = profile();
        // Under load target 4.0 decodes at twice its latency alone: every
        // point is taken to be twice as slow, in the same order.
        for _ in 0..40 {
            p.record(Point::Target(4.0), 22.0);
        }
        let (now, load) = p.snapshot();
        assert!((load - 2.0).abs() < 1e-3, "{load}");
        assert_eq!(now[0].point, Point::Highest);
        assert!((now[0].ms_per_token - 40.0).abs() < 0.1);
        assert_eq!(p.best_within(22.1, 5.0), Some((Point::Target(4.0), true)));
        assert_eq!(p.best_within(21.0, 5.0), Some((Point::Bits(4), true)));
        assert_eq!(p.best_within(11.0, 5.0), Some((Point::Bits(3), false)));
        // A point measured only live enters at its latency alone.
        p.record(Point::Bits(5), 24.0);
        let b5 = p
            .alone()
            .into_iter()
            .find(|l| l.point == Point::Bits(5))
            .unwrap();
        assert!((b5.ms_per_token - 12.0).abs() < 0.1, "{b5:?}");
    }

    #[test]
    fn the_model_refuses_points_it_does_not_offer() {
        let info = ModelInfo {
            name: "m".into(),
            context: 64,
            vocab: 100,
            budget: Some(5.0),
            bits: vec![3, 4, 5],
            highest_bits: Some(5.0),
            targets: vec![3.5, 4.0],
            default: OperatingPoint::Default,
        };
        assert!(info.check(OperatingPoint::Bits(4), false).is_ok());
        assert!(info.check(OperatingPoint::Target(3.5), false).is_ok());
        let e = info.check(OperatingPoint::Bits(6), true).unwrap_err();
        assert!(e.message.contains("[3, 4, 5]"), "{e}");
        let e = info.check(OperatingPoint::Target(4.25), true).unwrap_err();
        assert!(e.message.contains("[3.5, 4.0]"), "{e}");
        assert!(info.check(OperatingPoint::Latency(5.0), false).is_err());
        assert_eq!(info.points().len(), 6);
    }
}
