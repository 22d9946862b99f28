//! CPU kernels: dot products, dense matmul, norms, RoPE, attention, activations.

pub mod activation;
pub mod attention;
pub mod bitplane;
pub mod dot;
pub mod matmul;
pub mod norm;
pub mod rope;

/// Raw pointer that may cross rayon task boundaries; each task writes a disjoint part.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr<T>(pub *mut T);
// SAFETY: users only write disjoint index ranges from different tasks.
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}
