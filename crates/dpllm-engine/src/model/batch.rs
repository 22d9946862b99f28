//! Decode steps of several sequences in one forward call (continuous
//! batching): each sequence brings its own KV cache, precision and counters;
//! every linear runs once for all the tokens that share a precision, each
//! token deciding its own precision under its own plan, and attention runs
//! per sequence on its own cache.

use crate::backend::Backend;
use crate::error::{EngineError, Result};
use crate::kv_cache::KvCache;
use crate::select::{BitStats, Precision, RowTally, Selector};

use super::forward::{Counting, Group, Next, Readout, Seq};
use super::Model;

/// One sequence's decode step in [`Model::decode_batch`].
pub struct BatchStep<'a, 'c, B: Backend> {
    /// The token to run (the sequence's last sampled token).
    pub token: u32,
    /// The sequence's cache; the token is appended to it.
    pub cache: &'c mut KvCache<B>,
    /// Its precision (a decode step: per token under a plan).
    pub prec: Precision<'a, B>,
    /// Its precision counters.
    pub stats: Option<&'c mut BitStats>,
    /// What comes back for it: its logits, or its next token chosen on the backend.
    pub readout: Readout,
}

/// Which precisions share a call's linears: the same fixed bits, or the same
/// loaded plan (by address) in the same mode.
fn same_precision<B: Backend>(a: Precision<'_, B>, b: Precision<'_, B>) -> bool {
    match (a, b) {
        (Precision::Highest, Precision::Highest) => true,
        (Precision::Uniform(x), Precision::Uniform(y)) => x == y,
        (Precision::Max(p), Precision::Max(q)) | (Precision::Dynamic(p), Precision::Dynamic(q)) => {
            std::ptr::eq(p, q)
        }
        _ => false,
    }
}

impl<B: Backend> Model<B> {
    /// One decode step of each of `steps`' sequences in one forward call;
    /// each sequence's logits or token (as its readout asks), in order. Tokens at the same precision share
    /// each linear's weight reads; per-token decisions follow each sequence's
    /// own plan; attention reads each sequence's own cache. A sequence's
    /// logits equal those of its step run alone up to the backend's rounding
    /// of a longer batch (equal on the CPU up to `GEMV_MAX_TOKENS`, 8, a call).
    /// Tokens are chosen on the backend, one id a sequence read back, unless
    /// a sequence wants its logits.
    /// On an error every cache is left as it was (run the steps one by one to
    /// learn which sequence failed). Oracle and random selection, which read
    /// back mid-call, run one sequence at a time: they are refused here.
    pub fn decode_batch(&self, steps: &mut [BatchStep<'_, '_, B>]) -> Result<Vec<Next>> {
        if let [one] = steps {
            let next = self.forward_next_with(
                &[one.token],
                one.cache,
                one.prec,
                one.stats.as_deref_mut(),
                one.readout,
            )?;
            return Ok(vec![next]);
        }
        for s in steps.iter() {
            self.check_input(&[s.token], s.cache)?;
            self.check_precision(s.prec)?;
            if let Precision::Dynamic(p) = s.prec {
                if p.selector != Selector::Estimator {
                    return Err(EngineError::Plan(format!(
                        "selection by {:?} runs one sequence at a time, not in a batch",
                        p.selector
                    )));
                }
            }
        }
        let before: Vec<usize> = steps.iter().map(|s| s.cache.len()).collect();
        let r = self.decode_batch_queued(steps);
        if r.is_err() {
            for (s, &len) in steps.iter_mut().zip(&before) {
                s.cache.truncate(len);
            }
        }
        r
    }

    /// [`Model::decode_batch`] of checked steps (two or more).
    fn decode_batch_queued(&self, steps: &mut [BatchStep<'_, '_, B>]) -> Result<Vec<Next>> {
        let be = &self.backend;
        let n = steps.len();
        // The mask picking `rows` out of the call's n (known on the host: a
        // device backend gathers and scatters by it without waiting).
        let pick = |rows: &[usize]| -> Result<B::Mask> {
            let mut on = vec![false; n];
            for &r in rows {
                on[r] = true;
            }
            be.mask_from(&on)
        };
        let mut groups: Vec<Group<'_, B>> = Vec::new();
        for (r, s) in steps.iter().enumerate() {
            match groups.iter_mut().find(|g| same_precision(g.prec, s.prec)) {
                Some(g) => g.rows.push(r),
                None => groups.push(Group {
                    prec: s.prec,
                    pick: None,
                    rows: vec![r],
                }),
            }
        }
        if groups.len() > 1 {
            for g in &mut groups {
                g.pick = Some(pick(&g.rows)?);
            }
        }
        let tokens: Vec<u32> = steps.iter().map(|s| s.token).collect();
        let all = be.step(&tokens, 0)?;
        let own: Vec<_> = (steps.iter())
            .map(|s| be.step(&[s.token], s.cache.len()))
            .collect::<Result<_>>()?;
        let picks: Vec<B::Mask> = (0..n).map(|r| pick(&[r])).collect::<Result<_>>()?;
        let mut seqs: Vec<Seq<'_, '_, B>> = (steps.iter_mut())
            .zip(own.iter().zip(picks))
            .enumerate()
            .map(|(r, (s, (step, mask)))| Seq {
                cache: &mut *s.cache,
                step,
                row0: r,
                pick: Some(mask),
            })
            .collect();
        let mut counts: Vec<BitStats> = (0..n).map(|_| self.new_bit_stats()).collect();
        let linears = self.config.linears().len();
        let mut tallies: Vec<RowTally<B>> = (groups.iter())
            .map(|g| RowTally::new(be, g.rows.len(), linears))
            .collect::<Result<_>>()?;
        let mut deferred = self.new_deferred(Precision::Highest, false)?;
        let h = self.forward_rows(
            &all,
            &mut seqs,
            &groups,
            Counting::PerRow(&mut counts, &mut tallies),
            &mut deferred,
        )?;
        drop(seqs);
        let vocab = self.config.vocab_size;
        let mut out = be.zeros(n * vocab)?;
        self.logits_into(&h, n, &mut out);
        let readouts: Vec<Readout> = steps.iter().map(|s| s.readout).collect();
        let next = self.read_next_rows(&out, Some(&deferred), None, &readouts)?;
        for (g, t) in groups.iter().zip(&tallies) {
            t.finish(be, &g.rows, &mut counts)?;
        }
        for (s, c) in steps.iter_mut().zip(&counts) {
            if let Some(st) = s.stats.as_deref_mut() {
                st.merge(c);
            }
        }
        Ok(next)
    }
}
