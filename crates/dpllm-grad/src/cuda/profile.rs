//! Where a GPU gradient pass spends its time, op by op: with `DPLLM_PROFILE`
//! set, every op of [`super::CudaGrad`] waits for the GPU before and after
//! itself and adds its wall time to a table printed when the backend is
//! dropped. The waits cost throughput, so the totals are for finding the
//! expensive ops, not for timing a run.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use cudarc::driver::CudaStream;
use dpllm_engine::backend::cuda::cudarc;

/// Calls and seconds per op.
#[derive(Default)]
pub struct Profile {
    ops: Mutex<BTreeMap<&'static str, (u64, f64)>>,
}

/// One op being timed: the stream is synchronised again when it ends.
pub struct Span<'a> {
    profile: &'a Profile,
    stream: &'a Arc<CudaStream>,
    name: &'static str,
    t0: Instant,
}

impl Profile {
    /// A profile when the environment asks for one (`DPLLM_PROFILE` set).
    pub fn from_env() -> Option<Profile> {
        std::env::var_os("DPLLM_PROFILE").map(|_| Profile::default())
    }

    /// Start timing `name` once the work queued on `stream` so far is done.
    pub fn span<'a>(&'a self, stream: &'a Arc<CudaStream>, name: &'static str) -> Span<'a> {
        let _ = stream.synchronize();
        Span {
            profile: self,
            stream,
            name,
            t0: Instant::now(),
        }
    }

    /// The table: op, calls, total ms, share of the total, slowest first.
    pub fn report(&self) -> String {
        let ops = self.ops.lock().unwrap_or_else(|p| p.into_inner());
        let total: f64 = ops.values().map(|v| v.1).sum::<f64>().max(1e-12);
        let mut rows: Vec<_> = ops.iter().collect();
        rows.sort_by(|a, b| b.1 .1.total_cmp(&a.1 .1));
        let mut s = format!(
            "{:<24} {:>9} {:>11} {:>6}\n",
            "gradient op", "calls", "ms", "%"
        );
        for (name, (calls, secs)) in rows {
            s += &format!(
                "{name:<24} {calls:>9} {:>11.1} {:>6.1}\n",
                secs * 1e3,
                100.0 * secs / total
            );
        }
        s + &format!("{:<24} {:>9} {:>11.1}\n", "total", "", total * 1e3)
    }
}

impl Drop for Span<'_> {
    fn drop(&mut self) {
        let _ = self.stream.synchronize();
        let dt = self.t0.elapsed().as_secs_f64();
        let mut ops = (self.profile.ops.lock()).unwrap_or_else(|p| p.into_inner());
        let e = ops.entry(self.name).or_default();
        e.0 += 1;
        e.1 += dt;
    }
}
