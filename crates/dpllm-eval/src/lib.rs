//! Measurements of a model: perplexity on real text, memory bandwidth, decode speed.

pub mod bandwidth;
pub mod bench_decode;
pub mod bench_gemv;
#[cfg(feature = "cuda")]
pub mod bench_gemv_cuda;
pub mod fidelity;
pub mod memory;
pub mod perplexity;
pub mod plots;
pub mod report;
