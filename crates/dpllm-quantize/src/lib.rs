//! Any-Precision quantization (METHOD.md section 1).
//!
//! - [`sorted_row`]: one weight row sorted, with prefix sums for O(1) interval statistics.
//! - [`kmeans`]: exact sensitivity-weighted 1-D k-means (the 3-bit seed).
//! - [`upscale`]: incremental upscaling by optimal weighted 2-way splits, giving
//!   nested indices: the top b bits of the 8-bit index are the b-bit index.
//! - [`bitplane`]: packing 8-bit indices into bit-planes.
//! - [`model_quant`]: quantizing a whole checkpoint into the any-precision format.
//! - [`sensitivity`]: the diagonal Fisher (squared LM-loss gradients) of every quantized weight.

pub mod bitplane;
pub mod kmeans;
pub mod model_quant;
pub mod sensitivity;
pub mod sorted_row;
pub mod upscale;
