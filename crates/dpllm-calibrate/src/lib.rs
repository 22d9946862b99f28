//! DP-LLM calibration (METHOD.md section 2): from an any-precision model and
//! calibration text to precision plans.
//!
//! - [`bench`]: the fine-tuning step timed on random weights of known shapes.
//! - [`budget`]: memory budget → per-linear maximum precision (exact knapsack), and the static baseline.
//! - [`weights`]: dequantized weights at every precision a plan may use.
//! - [`finetune`]: learning each linear's average precision for a target;
//!   [`step`]: one step of it, recorded once and replayed on a GPU;
//!   [`tuner`]: on the CPU or a GPU.
//! - [`collect`]: true relative errors and estimator inputs on calibration tokens.
//! - [`estimators`]: regression / random-projection error estimators.
//! - [`threshold`]: thresholds from error quantiles.
//! - [`pipeline`]: the whole calibration for one budget and several targets, writing plan files.

pub mod bench;
pub mod budget;
pub mod collect;
pub mod estimators;
pub mod finetune;
pub mod pipeline;
pub mod step;
pub mod threshold;
pub mod tuner;
pub mod weights;
