//! The KV cache of one sequence in GPU memory: f32 [positions × kv_dim] per
//! layer, grown by doubling (copied on the device) as positions arrive.

use cudarc::driver::CudaSlice;

use super::{device_err, CudaDevice};
use crate::error::{EngineError, Result};

/// Positions a layer's first allocation holds.
const FIRST_POSITIONS: usize = 64;

/// Keys and values of every layer of one sequence.
pub struct CudaKv {
    keys: Vec<Option<CudaSlice<f32>>>,
    values: Vec<Option<CudaSlice<f32>>>,
    /// Positions stored per layer.
    len: Vec<usize>,
    kv_dim: usize,
}

impl CudaKv {
    /// An empty cache (nothing allocated until the first append).
    pub(crate) fn new(layers: usize, kv_dim: usize) -> CudaKv {
        CudaKv {
            keys: vec![None; layers],
            values: vec![None; layers],
            len: vec![0; layers],
            kv_dim,
        }
    }

    /// Width of a position.
    pub fn kv_dim(&self) -> usize {
        self.kv_dim
    }

    /// Keys and values of `layer` (None before its first append).
    pub(crate) fn layer(&self, layer: usize) -> Option<(&CudaSlice<f32>, &CudaSlice<f32>)> {
        Some((
            self.keys.get(layer)?.as_ref()?,
            self.values.get(layer)?.as_ref()?,
        ))
    }

    /// Positions stored in `layer`.
    pub(crate) fn positions(&self, layer: usize) -> usize {
        self.len.get(layer).copied().unwrap_or(0)
    }

    /// Append `n` positions of keys `k` and values `v` ([n × kv_dim] each) to `layer`.
    pub(crate) fn append(
        &mut self,
        dev: &CudaDevice,
        layer: usize,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        n: usize,
    ) -> Result<()> {
        if layer >= self.len.len() {
            return Err(EngineError::Device(format!(
                "KV cache: layer {layer} of {}",
                self.len.len()
            )));
        }
        let (d, old) = (self.kv_dim, self.len[layer]);
        let need = (old + n) * d;
        for (store, src) in [(&mut self.keys[layer], k), (&mut self.values[layer], v)] {
            let dst = grow(dev, store, old * d, need.max(FIRST_POSITIONS * d))?;
            dev.stream()
                .memcpy_dtod(&src.slice(..n * d), &mut dst.slice_mut(old * d..need))
                .map_err(device_err("appending to the KV cache"))?;
        }
        self.len[layer] = old + n;
        Ok(())
    }

    /// Keep the first `positions` positions of every layer.
    pub(crate) fn truncate(&mut self, positions: usize) {
        for l in &mut self.len {
            *l = (*l).min(positions);
        }
    }

    /// Bytes of the positions stored.
    pub(crate) fn bytes(&self) -> usize {
        self.len.iter().map(|l| 2 * l * self.kv_dim * 4).sum()
    }
}

/// Make `store` hold at least `need` floats, keeping its first `used`: a new
/// allocation of at least twice the size with the old contents copied in.
/// Returns the storage.
fn grow<'a>(
    dev: &CudaDevice,
    store: &'a mut Option<CudaSlice<f32>>,
    used: usize,
    need: usize,
) -> Result<&'a mut CudaSlice<f32>> {
    let have = store.as_ref().map_or(0, |s| s.len());
    if have >= need {
        if let Some(s) = store {
            return Ok(s);
        }
    }
    let size = need.max(2 * have);
    let oom = |_| EngineError::OutOfMemory {
        what: "the KV cache (GPU)",
        bytes: size.saturating_mul(4),
    };
    let s = dev.stream();
    // SAFETY: the first `used` floats are written below, the rest before any read
    // (appends write positions before attention reads them).
    let mut fresh = unsafe { s.alloc::<f32>(size) }.map_err(oom)?;
    if let Some(old) = store.as_ref().filter(|_| used > 0) {
        s.memcpy_dtod(&old.slice(..used), &mut fresh.slice_mut(..used))
            .map_err(device_err("growing the KV cache"))?;
    }
    Ok(store.insert(fresh))
}
