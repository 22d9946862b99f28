//! Activations in GPU memory ([`CudaBuf`]): f32 rows, and beside them, where
//! the op that wrote them made it, the same rows split into the bit-plane
//! GEMV's f16 halves, so the linears that read them (q/k/v and gate/up
//! after a norm, o after attention, down after SwiGLU) do not split them
//! again, each in its own block or by a `split_x` launch.
//!
//! The halves are valid only until the floats change: every way of writing
//! the floats goes through `&mut self` here and drops them, so a buffer
//! never hands out halves of older values.

use std::ops::Range;
use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut};

use super::bitplane::{padded_cols, GemvInput, MAX_TOKENS};
use crate::error::{EngineError, Result};

/// f32 activations in GPU memory (never an empty allocation: `len` may be 0).
pub struct CudaBuf {
    data: CudaSlice<f32>,
    pub(super) len: usize,
    halves: Option<Halves>,
}

/// The first `rows × width` floats of a buffer as the GEMV's halves,
/// `[2][rows][width padded to 128]` (`split_x`'s layout); `fresh` while the
/// floats have not changed since they were written.
struct Halves {
    data: CudaSlice<u16>,
    rows: usize,
    width: usize,
    fresh: bool,
}

impl std::fmt::Debug for CudaBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaBuf({} floats)", self.len)
    }
}

impl CudaBuf {
    /// The first `len` floats of `data` (which holds at least that many).
    pub(super) fn new(data: CudaSlice<f32>, len: usize) -> CudaBuf {
        CudaBuf {
            data,
            len,
            halves: None,
        }
    }

    /// The first `len` floats.
    pub(super) fn view(&self) -> CudaView<'_, f32> {
        self.data.slice(..self.len)
    }

    /// Floats `r` of the allocation.
    pub(super) fn slice(&self, r: Range<usize>) -> CudaView<'_, f32> {
        self.data.slice(r)
    }

    /// The whole allocation, for a copy to the host.
    pub(super) fn data(&self) -> &CudaSlice<f32> {
        &self.data
    }

    /// The allocation, the buffer given up.
    pub(super) fn into_data(self) -> CudaSlice<f32> {
        self.data
    }

    /// The first `len` floats, writable (the halves go stale).
    pub(super) fn view_mut(&mut self) -> CudaViewMut<'_, f32> {
        self.stale();
        self.data.slice_mut(..self.len)
    }

    /// Floats `r` of the allocation, writable (the halves go stale).
    pub(super) fn slice_mut(&mut self, r: Range<usize>) -> CudaViewMut<'_, f32> {
        self.stale();
        self.data.slice_mut(r)
    }

    /// The first `len` floats for a kernel that writes them in place through
    /// the same pointer it reads (the halves go stale).
    pub(super) fn in_place(&mut self) -> CudaView<'_, f32> {
        self.stale();
        self.data.slice(..self.len)
    }

    /// `len` floats from now on, the allocation replaced by `alloc(len)`
    /// where it is smaller (the halves go stale).
    pub(super) fn resize_with(
        &mut self,
        len: usize,
        alloc: impl FnOnce(usize) -> Result<CudaSlice<f32>>,
    ) -> Result<()> {
        self.stale();
        if self.data.len() < len {
            self.data = alloc(len)?;
        }
        self.len = len;
        Ok(())
    }

    fn stale(&mut self) {
        if let Some(h) = &mut self.halves {
            h.fresh = false;
        }
    }

    /// The halves of the first `rows × width` floats, when the op that wrote
    /// them made them in that shape.
    pub(super) fn halves(&self, rows: usize, width: usize) -> Option<CudaView<'_, u16>> {
        let h = self.halves.as_ref()?;
        (h.fresh && h.rows == rows && h.width == width).then(|| h.data.slice(..))
    }

    /// `f` on what a bit-plane GEMV reads of tokens `tokens` of these `n`
    /// rows of `width`: the halves the op that wrote them left, where they
    /// cover exactly those tokens, else the f32 rows (which the GEMV splits).
    pub(super) fn with_gemv_input<R>(
        &self,
        (n, width): (usize, usize),
        tokens: Range<usize>,
        f: impl FnOnce(GemvInput<'_>) -> R,
    ) -> R {
        let whole = tokens.start == 0 && tokens.end == n;
        let halves = whole.then(|| self.halves(n, width)).flatten();
        let rows = self.slice(tokens.start * width..tokens.end * width);
        f(match &halves {
            Some(h) => GemvInput::Halves(h),
            None => GemvInput::Rows(&rows),
        })
    }

    /// The first `len` floats writable, for an op writing them as `rows` rows
    /// of `width`, and with `want`, room for their halves where a GEMV can
    /// take them (1 to [`MAX_TOKENS`] rows): the op's kernel must write both,
    /// which then count as fresh.
    pub(super) fn write_with_halves(
        &mut self,
        stream: &Arc<CudaStream>,
        rows: usize,
        width: usize,
        want: bool,
    ) -> Result<(CudaViewMut<'_, f32>, Option<CudaViewMut<'_, u16>>)> {
        self.stale();
        let wanted =
            want && width > 0 && (1..=MAX_TOKENS).contains(&rows) && rows * width == self.len;
        if !wanted {
            return Ok((self.data.slice_mut(..self.len), None));
        }
        let need = 2 * rows * padded_cols(width);
        let h = match self.halves.take().filter(|h| h.data.len() >= need) {
            Some(h) => h,
            // SAFETY: plain u16s; the caller's kernel writes all `need` of
            // them (fresh only from that write on).
            None => Halves {
                data: unsafe { stream.alloc::<u16>(need) }.map_err(|_| {
                    EngineError::OutOfMemory {
                        what: "split activations (GPU)",
                        bytes: 2 * need,
                    }
                })?,
                rows,
                width,
                fresh: false,
            },
        };
        let h = self.halves.insert(h);
        (h.rows, h.width, h.fresh) = (rows, width, true);
        Ok((
            self.data.slice_mut(..self.len),
            Some(h.data.slice_mut(..need)),
        ))
    }
}
