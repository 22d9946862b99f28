//! Measure this machine's memory bandwidth with a large multi-threaded copy.

use std::time::Instant;

use rayon::prelude::*;
use serde::Serialize;

/// Measured memory bandwidth.
#[derive(Debug, Clone, Serialize)]
pub struct Bandwidth {
    /// Bytes per buffer.
    pub buffer_bytes: usize,
    /// Copy bandwidth, counting bytes read plus bytes written (GB/s, 1e9).
    pub copy_gbs: f64,
    /// Read-only bandwidth (a parallel sum), GB/s.
    pub read_gbs: f64,
    /// CPU threads used (0: a GPU's bandwidth).
    pub threads: usize,
}

/// Copy and read `bytes`-sized buffers (well beyond the caches) a few times; best of `reps`.
pub fn measure(bytes: usize, reps: usize) -> Bandwidth {
    let n = bytes / 8;
    let src: Vec<u64> = (0..n as u64)
        .into_par_iter()
        .map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .collect();
    let mut dst = vec![0u64; n];
    dst.par_chunks_mut(1 << 16).for_each(|c| c.fill(1)); // fault pages in
    let chunk = (n / (rayon::current_num_threads() * 8)).max(1 << 14);
    let mut best_copy = f64::MAX;
    let mut best_read = f64::MAX;
    let mut sink = 0u64;
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        dst.par_chunks_mut(chunk)
            .zip(src.par_chunks(chunk))
            .for_each(|(d, s)| d.copy_from_slice(s));
        best_copy = best_copy.min(t.elapsed().as_secs_f64());
        let t = Instant::now();
        sink ^= src
            .par_chunks(chunk)
            .map(|c| c.iter().fold(0u64, |a, b| a.wrapping_add(*b)))
            .reduce(|| 0, u64::wrapping_add);
        best_read = best_read.min(t.elapsed().as_secs_f64());
    }
    std::hint::black_box((sink, &dst));
    let b = (n * 8) as f64;
    Bandwidth {
        buffer_bytes: n * 8,
        copy_gbs: 2.0 * b / best_copy / 1e9,
        read_gbs: b / best_read / 1e9,
        threads: rayon::current_num_threads(),
    }
}

/// The bandwidth of the GPU `be` runs on, on `bytes`-sized buffers; best of `reps`.
#[cfg(feature = "cuda")]
pub fn measure_cuda(
    be: &dpllm_engine::backend::cuda::CudaBackend,
    bytes: usize,
    reps: usize,
) -> anyhow::Result<Bandwidth> {
    let (copy_gbs, read_gbs) = be.bandwidth(bytes, reps)?;
    Ok(Bandwidth {
        buffer_bytes: bytes,
        copy_gbs,
        read_gbs,
        threads: 0,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn produces_positive_finite_numbers() {
        let bw = super::measure(8 << 20, 2);
        assert!(bw.copy_gbs.is_finite() && bw.copy_gbs > 0.0);
        assert!(bw.read_gbs.is_finite() && bw.read_gbs > 0.0);
        assert_eq!(bw.buffer_bytes, 8 << 20);
    }
}
