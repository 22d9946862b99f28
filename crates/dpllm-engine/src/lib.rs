//! dpllm's inference engine.
//!
//! - [`backend`]: the seam to the hardware: the [`backend::Backend`] ops and the CPU backend
//!   (hand-written SIMD kernels); a CUDA backend plugs in beside it.
//! - [`linear`]: a linear layer on a backend, dense or any-precision.
//! - [`model`]: the transformer and its forward pass with a [`kv_cache::KvCache`].
//! - [`select`]: DP-LLM plans at run time: per-token precision selection and effective-bit counting.
//! - [`sampler`], [`tokenizer`], [`chat_template`]: turning logits and text into each other; [`loss`]: their next-token loss.
//! - [`session`]: a model served for a budget and one session per request: prefill, decode, cancellation.
//! - [`generate`]: text generation on a session.

pub mod backend;
pub mod chat_template;
pub mod error;
pub mod generate;
pub mod kv_cache;
pub mod linear;
pub mod loss;
pub mod model;
pub mod sampler;
pub mod select;
pub mod session;
pub mod tokenizer;

pub use backend::{Backend, CpuBackend, Device, KvDtype};
pub use kv_cache::KvCache;
pub use model::{LoadOptions, Model};
pub use select::{BitStats, Precision, RuntimePlan, Selector};
pub use session::{RunPrecision, ServedModel, Session};

pub use error::{EngineError, ErrorKind};
