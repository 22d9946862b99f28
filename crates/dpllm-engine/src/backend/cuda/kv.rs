//! The KV cache of one sequence in GPU memory: [positions × kv_dim] per
//! layer of f16 or f32 values ([`KvDtype`]), grown by doubling (copied on the
//! device) as positions arrive. The backend writes new positions with a kernel
//! that reads their position from the step's device copy, so a recorded
//! decode step replays on it.
//!
//! Storage is counted in 16-bit words whatever the type (an f32 is two), so
//! one slice type serves both; the kernels see `float*` or f16 bits.

use cudarc::driver::CudaSlice;

use super::{device_err, CudaDevice};
use crate::backend::KvDtype;
use crate::error::{EngineError, Result};

/// Positions a layer's first allocation holds.
const FIRST_POSITIONS: usize = 64;

/// Keys and values of every layer of one sequence.
pub struct CudaKv {
    keys: Vec<Option<CudaSlice<u16>>>,
    values: Vec<Option<CudaSlice<u16>>>,
    /// Positions stored per layer.
    len: Vec<usize>,
    kv_dim: usize,
    dtype: KvDtype,
}

impl CudaKv {
    /// An empty cache (nothing allocated until the first append).
    pub(crate) fn new(layers: usize, kv_dim: usize, dtype: KvDtype) -> CudaKv {
        CudaKv {
            keys: vec![None; layers],
            values: vec![None; layers],
            len: vec![0; layers],
            kv_dim,
            dtype,
        }
    }

    /// Width of a position.
    pub fn kv_dim(&self) -> usize {
        self.kv_dim
    }

    /// How keys and values are stored.
    pub fn dtype(&self) -> KvDtype {
        self.dtype
    }

    /// The name of kernel `base` for this cache's type (`attention`, `attention_h`).
    pub(crate) fn kernel(&self, base: &str) -> String {
        match self.dtype {
            KvDtype::F32 => base.to_string(),
            KvDtype::F16 => format!("{base}_h"),
        }
    }

    /// 16-bit words of one position.
    fn words(&self) -> usize {
        self.kv_dim.max(1) * self.dtype.bytes() / 2
    }

    /// Keys and values of `layer` (None before its first append).
    pub(crate) fn layer(&self, layer: usize) -> Option<(&CudaSlice<u16>, &CudaSlice<u16>)> {
        Some((
            self.keys.get(layer)?.as_ref()?,
            self.values.get(layer)?.as_ref()?,
        ))
    }

    /// Positions `layer`'s storage holds (0 before its first append).
    pub(crate) fn capacity(&self, layer: usize) -> usize {
        let d = self.words();
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
    ) -> Result<(&mut CudaSlice<u16>, &mut CudaSlice<u16>)> {
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
        let d = self.words();
        let need = (pos0 + n) * d;
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
        let d = self.words();
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
        let d = self.words();
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
        let per = 2 * self.kv_dim * self.dtype.bytes();
        self.len.iter().map(|l| l * per).sum()
    }
}

/// Make `store` hold at least `need` words, keeping its first `used`: a new
/// allocation of at least twice the size with the old contents copied in.
/// Returns the storage.
fn grow<'a>(
    dev: &CudaDevice,
    store: &'a mut Option<CudaSlice<u16>>,
    used: usize,
    need: usize,
) -> Result<&'a mut CudaSlice<u16>> {
    let have = store.as_ref().map_or(0, |s| s.len());
    if have >= need {
        if let Some(s) = store {
            return Ok(s);
        }
    }
    let size = need.max(2 * have);
    let oom = |_| EngineError::OutOfMemory {
        what: "the KV cache (GPU)",
        bytes: size.saturating_mul(2),
    };
    let s = dev.stream();
    // SAFETY: the first `used` words are written below, the rest before any read
    // (appends write positions before attention reads them).
    let mut fresh = unsafe { s.alloc::<u16>(size) }.map_err(oom)?;
    if let Some(old) = store.as_ref().filter(|_| used > 0) {
        s.memcpy_dtod(&old.slice(..used), &mut fresh.slice_mut(..used))
            .map_err(device_err("growing the KV cache"))?;
    }
    Ok(store.insert(fresh))
}
