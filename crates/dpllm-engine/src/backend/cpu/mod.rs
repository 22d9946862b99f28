//! The CPU backend: hand-written kernels on host memory (SIMD dot products and
//! bit-plane GEMV chosen at run time beside portable references, dense matmul
//! through `gemm`, norms, RoPE, attention, activations), behind [`CpuBackend`].

pub mod activation;
pub mod anyprec;
pub mod attention;
mod backend;
pub mod bitplane;
pub mod dense;
pub mod dot;
pub mod estimate;
pub mod fixed16;
pub mod matmul;
pub mod norm;
pub mod q8;
pub mod rope;
pub mod rows;

pub use anyprec::AnyPrecLinear;
pub use dense::DenseLinear;

/// The CPU backend: buffers are `Vec<f32>`, threads come from rayon's pool.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuBackend;

/// Keys and values of every layer of one sequence, [positions × kv_dim] each.
#[derive(Debug, Clone, Default)]
pub struct CpuKv {
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    kv_dim: usize,
}

/// Add a bias to every row of `y` [n × out].
pub(crate) fn add_bias(y: &mut [f32], bias: Option<&[f32]>) {
    if let Some(b) = bias {
        for row in y.chunks_mut(b.len()) {
            for (a, c) in row.iter_mut().zip(b) {
                *a += c;
            }
        }
    }
}

/// Raw pointer that may cross rayon task boundaries; each task writes a disjoint part.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr<T>(pub *mut T);
// SAFETY: users only write disjoint index ranges from different tasks.
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    /// The pointer. A closure that calls this captures the whole `SendPtr`
    /// (which is `Send`), where naming the field would capture the bare
    /// pointer (which is not).
    pub(crate) fn ptr(self) -> *mut T {
        self.0
    }
}
