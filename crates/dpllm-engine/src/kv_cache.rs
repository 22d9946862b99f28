//! Per-sequence key/value cache, held by the backend.

use crate::backend::cpu::CpuBackend;
use crate::backend::{Backend, RopeArgs, Step};
use crate::model::GraphSlot;

/// Keys and values of every layer for the positions processed so far, and the
/// recorded decode step that replays on them (a graph-capturing backend).
pub struct KvCache<B: Backend = CpuBackend> {
    backend: B,
    store: B::Kv,
    len: usize,
    capacity: usize,
    pub(crate) graph: GraphSlot<B>,
}

impl<B: Backend> KvCache<B> {
    /// An empty cache for `layers` layers of width `kv_dim`, holding at most `capacity` positions.
    pub fn new(backend: B, layers: usize, kv_dim: usize, capacity: usize) -> KvCache<B> {
        let store = backend.kv_new(layers, kv_dim);
        KvCache {
            backend,
            store,
            len: 0,
            capacity,
            graph: GraphSlot::default(),
        }
    }

    /// Positions stored.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no position is stored.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Maximum positions.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Forget everything (keeps the allocations).
    pub fn clear(&mut self) {
        self.truncate(0);
    }

    /// Keep only the first `len` positions.
    pub fn truncate(&mut self, len: usize) {
        let len = len.min(self.len);
        self.backend.kv_truncate(&mut self.store, len);
        self.len = len;
    }

    /// Append the keys and values of the positions of `step` (the next ones) to
    /// `layer` (call for every layer, then [`KvCache::advance`]). The cache grows
    /// as positions arrive; memory it cannot get is an error, not an abort.
    pub fn append(
        &mut self,
        layer: usize,
        k: &B::Buf,
        v: &B::Buf,
        step: &Step<B::StepData>,
    ) -> Result<(), crate::EngineError> {
        self.backend.kv_append(&mut self.store, layer, k, v, step)
    }

    /// [`KvCache::append`] of the keys and values after RoPE has turned `k` and
    /// `q` (in place) for the positions of `step` ([`Backend::rope_append`]);
    /// `k` is left rotated or as it was.
    pub fn append_rotated(
        &mut self,
        layer: usize,
        (q, k, v): (&mut B::Buf, &mut B::Buf, &B::Buf),
        step: &Step<B::StepData>,
        rope: RopeArgs<'_, B>,
    ) -> Result<(), crate::EngineError> {
        self.backend
            .rope_append(q, k, v, &mut self.store, layer, step, rope)
    }

    /// Make room for `positions` positions; the positions the storage holds.
    pub(crate) fn reserve(&mut self, positions: usize) -> Result<usize, crate::EngineError> {
        self.backend.kv_reserve(&mut self.store, positions)
    }

    /// Mark `n` positions written by a replayed graph as stored, in every layer.
    pub(crate) fn commit(&mut self, n: usize) {
        self.backend.kv_commit(&mut self.store, self.len + n);
        self.len += n;
    }

    /// Mark `n` appended positions as stored.
    pub fn advance(&mut self, n: usize) {
        self.len += n;
    }

    /// The backend's storage (including appended-but-not-advanced positions).
    pub fn store(&self) -> &B::Kv {
        &self.store
    }

    /// True when a recorded decode step is held for replay (a backend that
    /// records graphs, after the first decode step).
    pub fn holds_recorded_step(&self) -> bool {
        matches!(self.graph, GraphSlot::Ready(_))
    }

    /// Bytes in use.
    pub fn bytes(&self) -> usize {
        self.backend.kv_bytes(&self.store)
    }
}
