//! dpllm's inference engine.
//!
//! - [`cpu`]: hand-written CPU kernels (SIMD dot products, GEMV/GEMM, attention, ...).
//! - [`linear`]: the [`linear::Linear`] interface every weight format implements.
//! - [`model`]: the transformer and its forward pass with a [`kv_cache::KvCache`].
//! - [`select`]: DP-LLM plans at run time: per-token precision selection and effective-bit counting.
//! - [`sampler`], [`tokenizer`], [`chat_template`]: turning logits and text into each other.
//! - [`generate`]: the decoding loop used by the CLI and the server.

pub mod chat_template;
pub mod cpu;
pub mod generate;
pub mod kv_cache;
pub mod linear;
pub mod model;
pub mod sampler;
pub mod select;
pub mod tokenizer;

pub use kv_cache::KvCache;
pub use model::{LoadOptions, Model};
pub use select::{BitStats, Precision, RuntimePlan};

/// Errors of a forward pass on valid weights (bad requests, not bad files).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// No tokens given.
    #[error("empty input: at least one token is needed")]
    EmptyInput,
    /// A token id is not in the vocabulary.
    #[error("token id {token} is out of range for a vocabulary of {vocab}")]
    TokenOutOfRange {
        /// The id.
        token: u32,
        /// Vocabulary size.
        vocab: usize,
    },
    /// A bit-width was requested from a model that is not any-precision.
    #[error("this model is not a dpllm any-precision model; quantize it with `dpllm quantize` to choose bits")]
    NotAnyPrecision,
    /// A bit-width outside what the model holds.
    #[error("bad bit-width: {0}")]
    Bits(String),
    /// A NaN or infinity appeared in the activations (never silently passed on).
    #[error("non-finite activation (NaN or infinity) first appeared in {stage} at token {token} of the call; the weights or the input drive the model out of the f32 range")]
    NonFinite {
        /// Where: "layer 3 attention output", "the logits", ...
        stage: String,
        /// Index of the first affected token within the call.
        token: usize,
    },
    /// Memory for a buffer that grows with the request could not be had.
    #[error("out of memory: cannot allocate {bytes} bytes for {what}")]
    OutOfMemory {
        /// What the memory was for.
        what: &'static str,
        /// Bytes requested.
        bytes: usize,
    },
    /// The context window is full.
    #[error("context full: {have} positions cached + {add} new > capacity {capacity}")]
    ContextFull {
        /// Positions already cached.
        have: usize,
        /// Positions requested.
        add: usize,
        /// Cache capacity.
        capacity: usize,
    },
}
