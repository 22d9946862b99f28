//! The KV cache of one sequence in GPU memory: f32 [positions × kv_dim] per
//! layer, grown by doubling (copied on the device) as positions arrive. The
//! backend writes new positions with a kernel that reads their position from
//! the step's device copy, so a recorded decode step replays on it.

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

    /// Positions `layer`'s storage holds (0 before its first append).
    pub(crate) fn capacity(&self, layer: usize) -> usize {
        let d = self.kv_dim.max(1);
        self.keys
            .get(layer)
            .and_then(Option::as_ref)
            .map_or(0, |s| s.len() / d)
    }

    /// Positions stored in `layer`.
    pub(crate) fn positions(&self, layer: usize) -> usize {
        self.len.get(layer).copied().unwrap_or(0)
    }

    /// The storage of `layer` made ready for positions `pos0..pos0 + n` (the
    /// next ones): grown when it must be, keys and values to write them to.
    pub(crate) fn slots(
        &mut self,
        dev: &CudaDevice,
        layer: usize,
        pos0: usize,
        n: usize,
    ) -> Result<(&mut CudaSlice<f32>, &mut CudaSlice<f32>)> {
        let Some(&held) = self.len.get(layer) else {
            return Err(EngineError::Device(format!(
                "KV cache: layer {layer} of {}",
                self.len.len()
            )));
        };
        if held != pos0 {
            return Err(EngineError::Device(format!(
                "KV cache: layer {layer} holds {held} positions; appending at {pos0}"
            )));
        }
        let (d, need) = (self.kv_dim, (pos0 + n) * self.kv_dim);
        let used = held * d;
        let keys = grow(
            dev,
            &mut self.keys[layer],
            used,
            need.max(FIRST_POSITIONS * d),
        )?;
        let values = grow(
            dev,
            &mut self.values[layer],
            used,
            need.max(FIRST_POSITIONS * d),
        )?;
        self.len[layer] = pos0 + n;
        Ok((keys, values))
    }

    /// Make room for `positions` positions in every layer; the positions every
    /// layer's storage now holds (the storage moves only when this grows).
    pub(crate) fn reserve(&mut self, dev: &CudaDevice, positions: usize) -> Result<usize> {
        let d = self.kv_dim.max(1);
        let mut held = usize::MAX;
        for (l, &len) in self.len.iter().enumerate() {
            for store in [&mut self.keys[l], &mut self.values[l]] {
                let s = grow(dev, store, len * d, positions.max(FIRST_POSITIONS) * d)?;
                held = held.min(s.len() / d);
            }
        }
        Ok(held)
    }

    /// Mark `positions` positions as stored in every layer (as far as the
    /// storage holds): a replayed graph wrote them.
    pub(crate) fn commit(&mut self, positions: usize) {
        let d = self.kv_dim.max(1);
        for (l, len) in self.len.iter_mut().enumerate() {
            let room = self.keys[l].as_ref().map_or(0, |s| s.len() / d);
            *len = positions.min(room);
        }
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
