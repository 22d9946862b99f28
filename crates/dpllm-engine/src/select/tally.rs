//! Per-token precision counts kept where the decisions are: each selecting
//! linear writes its count of high-precision tokens into one slot of a backend
//! buffer, read once at the end of a forward call (on a GPU: no wait per linear).

use super::BitStats;
use crate::backend::Backend;
use crate::error::Result;

/// The counts of one forward call, one slot per quantized linear.
pub(crate) struct Tally<B: Backend> {
    high: B::Buf,
    /// Linears whose counts are in `high`: (index, low bits, high bits, tokens).
    selected: Vec<(usize, u32, u32, usize)>,
}

impl<B: Backend> Tally<B> {
    /// Empty counts for `linears` linears.
    pub(crate) fn new(be: &B, linears: usize) -> Result<Tally<B>> {
        Ok(Tally {
            high: be.zeros(linears)?,
            selected: Vec::new(),
        })
    }

    /// Queue zeroing the counts (the linears recorded are kept: a replayed
    /// graph of the call records the same ones).
    pub(crate) fn reset(&mut self, be: &B) {
        be.fill(&mut self.high, 0.0);
    }

    /// Linear `idx` runs `n` tokens at `low` or `high` bits: the slot its
    /// count of high tokens goes to ([`Backend::estimate_counted`]).
    pub(crate) fn slot(
        &mut self,
        idx: usize,
        (low, high): (u32, u32),
        n: usize,
    ) -> (&mut B::Buf, usize) {
        self.selected.push((idx, low, high, n));
        (&mut self.high, idx)
    }

    /// Linear `idx` ran `n` tokens at `low` or `high` bits as `mask` decided.
    pub(crate) fn record(
        &mut self,
        be: &B,
        idx: usize,
        (low, high): (u32, u32),
        n: usize,
        mask: &B::Mask,
    ) {
        let (counts, slot) = self.slot(idx, (low, high), n);
        be.mask_count_into(mask, counts, slot);
    }

    /// Read the counts (one wait) into `stats`.
    pub(crate) fn finish(&self, be: &B, stats: &mut BitStats) -> Result<()> {
        if self.selected.is_empty() {
            return Ok(());
        }
        let high = be.read(&self.high)?;
        for &(idx, low_bits, high_bits, n) in &self.selected {
            let h = (high[idx] as usize).min(n);
            stats.add(idx, low_bits, n - h);
            stats.add(idx, high_bits, h);
        }
        Ok(())
    }
}

/// The decisions of one group of tokens that share a forward call's linears
/// but count separately (a batch of sessions' decode steps): one slot per
/// token and linear, read once at the end of the call.
pub(crate) struct RowTally<B: Backend> {
    /// `high[t · linears + idx]`: 1 when token t ran linear idx high.
    high: B::Buf,
    linears: usize,
    /// Linears whose decisions are in `high`: (index, low bits, high bits).
    selected: Vec<(usize, u32, u32)>,
}

impl<B: Backend> RowTally<B> {
    /// Empty decisions of `tokens` tokens over `linears` linears.
    pub(crate) fn new(be: &B, tokens: usize, linears: usize) -> Result<RowTally<B>> {
        Ok(RowTally {
            high: be.zeros(tokens * linears)?,
            linears,
            selected: Vec::new(),
        })
    }

    /// Linear `idx` ran the group's tokens at `low` or `high` bits as `mask`
    /// (one decision per token, in order) decided.
    pub(crate) fn record(&mut self, be: &B, idx: usize, (low, high): (u32, u32), mask: &B::Mask) {
        self.selected.push((idx, low, high));
        be.mask_store_into(mask, &mut self.high, idx, self.linears);
    }

    /// Read the decisions (one wait) and count token t's into `stats[rows[t]]`.
    pub(crate) fn finish(&self, be: &B, rows: &[usize], stats: &mut [BitStats]) -> Result<()> {
        if self.selected.is_empty() {
            return Ok(());
        }
        let high = be.read(&self.high)?;
        for (t, &r) in rows.iter().enumerate() {
            let token = &high[t * self.linears..(t + 1) * self.linears];
            for &(idx, low_bits, high_bits) in &self.selected {
                let bits = if token[idx] > 0.5 {
                    high_bits
                } else {
                    low_bits
                };
                stats[r].add(idx, bits, 1);
            }
        }
        Ok(())
    }
}
