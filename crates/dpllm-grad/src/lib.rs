//! The training-side model used by `quantize` (sensitivities) and `calibrate`
//! (precision fine-tuning, estimator data): every weight as f32, a forward pass
//! that keeps the activations, and the backward pass that yields ∂L/∂W of every
//! block linear.
//!
//! - [`ops`]: forward and backward of each op on f32 slices. Forward ops are the
//!   engine's CPU kernels, and ops that are the same in both directions (RoPE,
//!   attention probabilities, fused-output splits) are the engine's, written once.
//! - [`backend`]: the op set as a trait, [`GradBackend`], with the CPU's
//!   implementation ([`CpuGrad`]); `cuda::CudaGrad` runs it on a GPU.
//! - [`GradModel`]: the model built from a loaded engine model, on either.
//! - [`step`]: what a step reads from the backend's memory (precision pairs)
//!   and the recording of a step's ops for replay (a CUDA graph).

pub mod backend;
#[cfg(feature = "cuda")]
pub mod cuda;
mod model;
pub mod ops;
pub mod step;
#[cfg(test)]
mod tests;

pub use backend::{CpuGrad, GradBackend};
pub use model::{engine_loss, BlockActs, BlockF32, GradModel, GradSink, Group, LinearF32};
pub use step::{Pair, Recorder, Replay};
