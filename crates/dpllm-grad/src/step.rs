//! What a fine-tuning step reads from the backend's memory rather than from
//! the host, so that its ops can be recorded once and replayed (a CUDA graph)
//! with new values: each linear's precision pair ([`Pair`]), beside the token
//! ids (`GradBackend::Ids`) and the loss and dot products (`GradBackend::Sums`).

use anyhow::{ensure, Result};

/// One linear's two precisions in a step and their weights in the mix
/// `a·W_lo + b·W_hi` (lo ≤ hi).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pair {
    /// The lower precision.
    pub lo: u32,
    /// The higher precision.
    pub hi: u32,
    /// The weight of W_lo.
    pub a: f32,
    /// The weight of W_hi.
    pub b: f32,
}

impl Pair {
    /// W_lo and W_hi within `levels`, which holds a weight of `len` values at
    /// precisions `min_bits`, `min_bits + 1`, ... one after another.
    pub fn levels<'a>(
        &self,
        levels: &'a [f32],
        min_bits: u32,
        len: usize,
    ) -> Result<(&'a [f32], &'a [f32])> {
        let count = levels.len().checked_div(len).unwrap_or(0);
        ensure!(
            len > 0 && levels.len() == count * len,
            "{} level values are not whole weights of {len}",
            levels.len()
        );
        let held = min_bits..min_bits + count as u32;
        ensure!(
            self.lo <= self.hi && held.contains(&self.lo) && held.contains(&self.hi),
            "precisions {}..{} are not within the {count} held from {min_bits} bits",
            self.lo,
            self.hi
        );
        let at = |b: u32| &levels[(b - min_bits) as usize * len..][..len];
        Ok((at(self.lo), at(self.hi)))
    }
}

/// Records a closure's ops once ([`Recorder::record`]) as something that
/// replays them ([`Replay`]) without running the closure again: every buffer
/// it touches must stay where it is, and what changes between replays must be
/// written to the backend's memory (ids, pairs) before each.
pub trait Recorder {
    /// The ops `f` queues, recorded and not run.
    fn record(&self, f: &mut dyn FnMut() -> Result<()>) -> Result<Box<dyn Replay>>;
}

/// Recorded ops ([`Recorder::record`]).
pub trait Replay {
    /// Queue the recorded ops once more.
    fn replay(&self) -> Result<()>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pair_levels_are_found_and_checked() {
        let levels: Vec<f32> = (0..12).map(|v| v as f32).collect();
        let p = Pair {
            lo: 4,
            hi: 5,
            a: 0.25,
            b: 0.75,
        };
        let (lo, hi) = p.levels(&levels, 3, 4).unwrap();
        assert_eq!((lo, hi), (&levels[4..8], &levels[8..12]));
        // Out of the held precisions, reversed, or not whole weights.
        assert!(Pair { hi: 6, ..p }.levels(&levels, 3, 4).is_err());
        assert!(Pair { lo: 2, ..p }.levels(&levels, 3, 4).is_err());
        assert!(Pair { lo: 5, hi: 4, ..p }.levels(&levels, 3, 4).is_err());
        assert!(p.levels(&levels, 3, 5).is_err());
        assert!(p.levels(&levels, 3, 0).is_err());
    }
}
