//! GEMV benchmark: one token through one linear layer, for bit-plane weights at
//! every precision and the dense f16 / f32 references, against the machine's
//! measured memory bandwidth.

use std::sync::Arc;
use std::time::Instant;

use dpllm_engine::backend::cpu::bitplane::BitplaneKernel;
use dpllm_engine::backend::cpu::{AnyPrecLinear, DenseLinear};
use dpllm_format::TensorData;
use half::f16;
use serde::Serialize;

use crate::bandwidth::{self, Bandwidth};

/// Settings of a GEMV benchmark.
#[derive(Debug, Clone, Serialize)]
pub struct GemvBenchConfig {
    /// (rows, cols) of each weight matrix.
    pub shapes: Vec<(usize, usize)>,
    /// Precisions of the bit-plane weights.
    pub bits: Vec<u32>,
    /// Bit-plane kernels to time (default: the fastest this CPU has).
    pub kernels: Vec<String>,
    /// Minimum timed wall time per case, seconds.
    pub min_seconds: f64,
    /// Size of each bandwidth-test buffer in bytes.
    pub bandwidth_bytes: usize,
    /// Each case cycles through enough copies of its weights to read at least
    /// this many bytes per round, so the last-level cache cannot hold them (0 = one copy).
    pub working_set_bytes: usize,
}

/// One timed case.
#[derive(Debug, Clone, Serialize)]
pub struct GemvCase {
    /// Output features.
    pub rows: usize,
    /// Input features.
    pub cols: usize,
    /// "anyprec-4b", "f16", "f32".
    pub weights: String,
    /// Kernel name ("avx512", "avx2", "portable", or "dense").
    pub kernel: String,
    /// Median time per call, microseconds.
    pub us_per_call: f64,
    /// Weight bytes read per call.
    pub bytes: usize,
    /// Copies of the weights cycled through.
    pub copies: usize,
    /// bytes / time, GB/s.
    pub gbs: f64,
    /// gbs / measured read bandwidth.
    pub fraction_of_read_bandwidth: f64,
    /// f16 time / this time (same shape).
    pub speedup_vs_f16: f64,
}

/// Results of a GEMV benchmark.
#[derive(Debug, Clone, Serialize)]
pub struct GemvBench {
    /// Settings used.
    pub config: GemvBenchConfig,
    /// Measured machine bandwidth.
    pub bandwidth: Bandwidth,
    /// Threads.
    pub threads: usize,
    /// Every case, shape by shape.
    pub cases: Vec<GemvCase>,
}

/// Median seconds per call of `f`, run for at least `min_seconds` (and 5 calls) after a warm-up call.
fn time_calls(min_seconds: f64, mut f: impl FnMut()) -> f64 {
    f();
    let mut times = Vec::new();
    let start = Instant::now();
    while times.len() < 5 || start.elapsed().as_secs_f64() < min_seconds {
        let t = Instant::now();
        f();
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(|a, b| a.total_cmp(b));
    times[times.len() / 2]
}

/// Parse a kernel name.
pub fn kernel_by_name(name: &str) -> anyhow::Result<BitplaneKernel> {
    let Some(k) = BitplaneKernel::by_name(name) else {
        let names: Vec<_> = BitplaneKernel::ALL.iter().map(|k| k.name()).collect();
        anyhow::bail!("unknown kernel {name:?} ({})", names.join(", "));
    };
    if !k.is_available() {
        anyhow::bail!("this CPU cannot run the {name} kernel");
    }
    Ok(k)
}

/// Run the benchmark.
pub fn run(cfg: &GemvBenchConfig) -> anyhow::Result<GemvBench> {
    if let Some(b) = cfg.bits.iter().find(|b| !(3..=8).contains(*b)) {
        anyhow::bail!("--bits {b} is out of range 3..=8");
    }
    if let Some((r, c)) = cfg.shapes.iter().find(|(r, c)| *r == 0 || *c == 0) {
        anyhow::bail!("shape {r}x{c} is empty");
    }
    if !(cfg.min_seconds.is_finite() && (0.0..=3600.0).contains(&cfg.min_seconds)) {
        anyhow::bail!("--seconds {} is out of range 0..=3600", cfg.min_seconds);
    }
    if cfg.bits.is_empty() {
        anyhow::bail!("--bits lists no precision");
    }
    crate::memory::ensure_fits(
        crate::memory::product(&[cfg.bandwidth_bytes as u128, 2]),
        "the bandwidth test buffers (--bandwidth-mib)",
    )?;
    for &(rows, cols) in &cfg.shapes {
        // The f32 source, then at a time one kind of weights cycled over the working set (plus one copy).
        let one = crate::memory::product(&[rows as u128, cols as u128, 4]);
        let peak = one.and_then(|b| {
            b.checked_mul(2)?
                .checked_add(cfg.working_set_bytes as u128)?
                .checked_add(b)
        });
        crate::memory::ensure_fits(
            peak,
            &format!("shape {rows}x{cols} (with --working-set-mib)"),
        )?;
    }
    let kernels = cfg
        .kernels
        .iter()
        .map(|k| kernel_by_name(k))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let bw = bandwidth::measure(cfg.bandwidth_bytes, 5);
    let mut cases = Vec::new();
    for &(rows, cols) in &cfg.shapes {
        let x: Vec<f32> = (0..cols)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
            .collect();
        let mut y = vec![0f32; rows];
        let mut shape_cases = Vec::new();
        let wf: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 % 2003) as f32 - 1001.0) / 1001.0)
            .collect();
        let copies_for = |bytes: usize| cfg.working_set_bytes.div_ceil(bytes.max(1)).max(1);
        for name in ["f16", "f32"] {
            let make = || match name {
                "f16" => TensorData::F16(wf.iter().map(|&v| f16::from_f32(v)).collect()),
                _ => TensorData::F32(wf.clone()),
            };
            let first = DenseLinear::new(Arc::new(make()), rows, cols, None);
            let n = copies_for(first.weight_bytes());
            let mut ls = vec![first];
            ls.extend((1..n).map(|_| DenseLinear::new(Arc::new(make()), rows, cols, None)));
            let mut i = 0;
            let s = time_calls(cfg.min_seconds, || {
                ls[i % n].forward(&x, 1, &mut y);
                i += 1;
            });
            shape_cases.push((
                name.to_string(),
                "dense".to_string(),
                s,
                ls[0].weight_bytes(),
                n,
            ));
        }
        let max_bits = *cfg.bits.iter().max().unwrap_or(&8);
        let first = AnyPrecLinear::random(rows, cols, max_bits, 7);
        let n = copies_for(first.bytes_at(max_bits));
        let mut qs = vec![first];
        qs.extend((1..n).map(|c| AnyPrecLinear::random(rows, cols, max_bits, 7 + c as u64)));
        for &b in &cfg.bits {
            // Fewer bits read less: cycle through as many copies as that working set needs.
            let nb = copies_for(qs[0].bytes_at(b)).min(n);
            for &k in &kernels {
                // One call on every copy first: a kernel with LUTs of its own
                // form makes them there, as a decode does at its first token.
                for q in &qs[..nb] {
                    q.forward_bits_with(&x, 1, &mut y, b, k);
                }
                let mut i = 0;
                let s = time_calls(cfg.min_seconds, || {
                    qs[i % nb].forward_bits_with(&x, 1, &mut y, b, k);
                    i += 1;
                });
                shape_cases.push((
                    format!("anyprec-{b}b"),
                    k.name().to_string(),
                    s,
                    qs[0].bytes_at(b),
                    nb,
                ));
            }
        }
        let f16_time = shape_cases[0].2;
        for (weights, kernel, s, bytes, copies) in shape_cases {
            let gbs = bytes as f64 / s / 1e9;
            cases.push(GemvCase {
                rows,
                cols,
                weights,
                kernel,
                us_per_call: s * 1e6,
                bytes,
                copies,
                gbs,
                fraction_of_read_bandwidth: gbs / bw.read_gbs,
                speedup_vs_f16: f16_time / s,
            });
        }
    }
    Ok(GemvBench {
        config: cfg.clone(),
        threads: rayon::current_num_threads(),
        bandwidth: bw,
        cases,
    })
}

impl GemvBench {
    /// A human-readable table with units.
    pub fn table(&self) -> String {
        let mut out = format!(
            "machine read bandwidth {:.2} GB/s, copy {:.2} GB/s (r+w), {} threads, weights cycled over >= {:.0} MB\n",
            self.bandwidth.read_gbs,
            self.bandwidth.copy_gbs,
            self.threads,
            self.config.working_set_bytes as f64 / 1e6
        );
        out.push_str(&format!(
            "{:>13}  {:<12} {:<9} {:>12} {:>11} {:>9} {:>8} {:>9}\n",
            "shape", "weights", "kernel", "time (us)", "bytes (MB)", "GB/s", "% of BW", "vs f16"
        ));
        for c in &self.cases {
            out.push_str(&format!(
                "{:>13}  {:<12} {:<9} {:>12.1} {:>11.3} {:>9.2} {:>7.1}% {:>8.2}x\n",
                format!("{}x{}", c.rows, c.cols),
                c.weights,
                c.kernel,
                c.us_per_call,
                c.bytes as f64 / 1e6,
                c.gbs,
                100.0 * c.fraction_of_read_bandwidth,
                c.speedup_vs_f16
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_every_case_and_rejects_bad_settings() {
        let cfg = GemvBenchConfig {
            shapes: vec![(64, 96)],
            bits: vec![3, 8],
            kernels: vec!["portable".into()],
            min_seconds: 0.0,
            bandwidth_bytes: 1 << 20,
            working_set_bytes: 1 << 20,
        };
        let r = run(&cfg).unwrap();
        let names: Vec<&str> = r.cases.iter().map(|c| c.weights.as_str()).collect();
        assert_eq!(names, ["f16", "f32", "anyprec-3b", "anyprec-8b"]);
        assert!(r
            .cases
            .iter()
            .all(|c| c.us_per_call > 0.0 && c.gbs.is_finite()));
        assert_eq!(r.cases[2].bytes, 64 * (3 * 3 * 4 + 2 * 8));
        // 1 MiB working set: f16 weights of 12 KiB need 86 copies; 3-bit ones of 3.3 KiB get the 8-bit count (cap).
        assert_eq!(r.cases[0].copies, (1usize << 20).div_ceil(64 * 96 * 2));
        assert!(r.cases.iter().all(|c| c.copies >= 1));
        assert!(r.table().contains("anyprec-8b"));
        assert!(run(&GemvBenchConfig {
            bits: vec![9],
            ..cfg.clone()
        })
        .is_err());
        assert!(run(&GemvBenchConfig {
            shapes: vec![(0, 4)],
            ..cfg.clone()
        })
        .is_err());
        assert!(run(&GemvBenchConfig {
            kernels: vec!["sse9".into()],
            ..cfg
        })
        .is_err());
    }
}
