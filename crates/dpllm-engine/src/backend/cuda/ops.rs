//! The kernels of the forward pass besides the bit-plane GEMV
//! (`kernels/ops.cu`, and `kernels/sample.cu` that picks the token): their source, functions looked up once by name, and
//! the launch shapes the backend uses.

use std::sync::Arc;

use cudarc::driver::{CudaFunction, LaunchConfig};

use super::{CudaDevice, Kernels};
use crate::error::Result;

/// The kernels' source.
pub const SOURCE: &str = concat!(
    include_str!("kernels/common.cuh"),
    include_str!("kernels/ops.cu"),
    include_str!("kernels/sample.cu")
);

/// Threads per block of the grid-stride kernels.
const THREADS: u32 = 256;

/// float4s of a row each thread of `rms_norm` holds in registers (`NORM_V` in the source).
const NORM_VECS: usize = 4;

/// Most positions' worth of head dimension the attention kernel keeps in registers.
pub const ATT_MAX_HEAD_DIM: usize = 256;

/// Values of a row whose sum of squares `swiglu_sumsq` leaves as one part
/// (`SWIGLU_PART` in the source).
pub const SWIGLU_PART: usize = 1024;

/// Warps per attention block (`ATT_WARPS` in the source).
const ATT_THREADS: u32 = 8 * 32;

/// Cache positions per span of attention: a block over fewer than this keeps
/// the whole sequence (a span of its own costs a merge launch).
const ATT_SPAN: usize = 256;

/// The ops kernels of one GPU and the launch shapes they take.
pub(crate) struct OpsKernels {
    kernels: Arc<Kernels>,
    sms: usize,
}

impl OpsKernels {
    /// Compile (or read from the PTX cache) and load the ops of `dev`.
    pub(crate) fn new(dev: &CudaDevice) -> Result<OpsKernels> {
        Ok(OpsKernels {
            kernels: dev.ops_kernels()?,
            sms: dev.multiprocessors(),
        })
    }

    /// The kernel `name`.
    pub(crate) fn get(&self, name: &str) -> Result<CudaFunction> {
        self.kernels.get(name)
    }

    /// A grid-stride launch over `n` elements: enough blocks to fill the GPU, no more.
    pub(crate) fn stride(&self, n: usize) -> LaunchConfig {
        let blocks = n.div_ceil(THREADS as usize).clamp(1, self.sms * 16);
        LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// One block per row of `width` values (norms): a warp per 32 values, at most 8 warps.
    pub(crate) fn per_row(&self, rows: usize, width: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (rows.max(1) as u32, 1, 1),
            block_dim: (width.next_multiple_of(32).clamp(32, 256) as u32, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// One block per segment of `width` values for `rms_norm`: threads enough
    /// to hold the segment in registers (`NORM_VECS` float4s each), 32 to 1024.
    pub(crate) fn norm_rows(&self, rows: usize, width: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (rows.max(1) as u32, 1, 1),
            block_dim: (
                width
                    .div_ceil(4 * NORM_VECS)
                    .next_multiple_of(32)
                    .clamp(32, 1024) as u32,
                1,
                1,
            ),
            shared_mem_bytes: 0,
        }
    }

    /// One warp per output row (dense GEMV).
    pub(crate) fn warp_per_row(&self, rows: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: ((rows * 32).div_ceil(THREADS as usize).max(1) as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// Attention over the sequence in `spans` spans: one block per (head,
    /// query token, span).
    pub(crate) fn attention(&self, heads: usize, tokens: usize, spans: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (heads as u32, tokens as u32, spans as u32),
            block_dim: (ATT_THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// The spans attention cuts a cache of `capacity` positions into, for
    /// `blocks` (head, query token) pairs: one per `ATT_SPAN` positions, as
    /// many as fill the GPU twice over. It depends on the capacity, not the
    /// positions held, so a recorded decode step keeps its shape while the
    /// cache fills (the kernel cuts the positions actually held).
    pub(crate) fn attention_spans(&self, capacity: usize, blocks: usize) -> usize {
        let fill = (2 * self.sms).div_ceil(blocks.max(1));
        capacity.div_ceil(ATT_SPAN).clamp(1, fill.max(1))
    }

    /// One block of `THREADS` per (part, row): `swiglu_sumsq`.
    pub(crate) fn parts(&self, parts: usize, rows: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (parts.max(1) as u32, rows.max(1) as u32, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// One block per (head, query token), the merge of attention's spans.
    pub(crate) fn attention_merge(
        &self,
        heads: usize,
        tokens: usize,
        head_dim: usize,
    ) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (heads as u32, tokens as u32, 1),
            block_dim: (head_dim.next_multiple_of(32).clamp(32, 256) as u32, 1, 1),
            shared_mem_bytes: 0,
        }
    }
}
