//! Per-sequence key/value cache (f32).

/// Keys and values of every layer for the positions processed so far.
pub struct KvCache {
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    kv_dim: usize,
    len: usize,
    capacity: usize,
}

impl KvCache {
    /// An empty cache for `layers` layers of width `kv_dim`, holding at most `capacity` positions.
    pub fn new(layers: usize, kv_dim: usize, capacity: usize) -> KvCache {
        KvCache { keys: vec![Vec::new(); layers], values: vec![Vec::new(); layers], kv_dim, len: 0, capacity }
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
        for (k, v) in self.keys.iter_mut().zip(self.values.iter_mut()) {
            k.truncate(len * self.kv_dim);
            v.truncate(len * self.kv_dim);
        }
        self.len = len;
    }

    /// Append `n` positions to layer `layer` (call for every layer, then [`KvCache::advance`]).
    /// The cache grows as positions arrive; memory it cannot get is an error, not an abort.
    pub fn append(&mut self, layer: usize, k: &[f32], v: &[f32]) -> Result<(), crate::EngineError> {
        debug_assert_eq!(self.keys[layer].len(), self.len * self.kv_dim);
        for (buf, x) in [(&mut self.keys[layer], k), (&mut self.values[layer], v)] {
            buf.try_reserve(x.len()).map_err(|_| crate::EngineError::OutOfMemory { what: "the KV cache", bytes: 4 * (buf.len() + x.len()) })?;
            buf.extend_from_slice(x);
        }
        Ok(())
    }

    /// Mark `n` appended positions as stored.
    pub fn advance(&mut self, n: usize) {
        self.len += n;
    }

    /// Keys and values of `layer` including appended-but-not-advanced positions.
    pub fn layer(&self, layer: usize) -> (&[f32], &[f32]) {
        (&self.keys[layer], &self.values[layer])
    }

    /// Bytes in use.
    pub fn bytes(&self) -> usize {
        self.keys.iter().chain(&self.values).map(|v| v.len() * 4).sum()
    }
}
