//! DP-LLM calibration (METHOD.md section 2): from an any-precision model and
//! calibration text to precision plans.
//!
//! - [`budget`]: memory budget → per-linear maximum precision (exact knapsack), and the static baseline.

pub mod budget;
