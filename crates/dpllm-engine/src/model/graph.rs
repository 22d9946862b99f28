//! Decode steps as recorded graphs: on a backend that records them (CUDA), the
//! first decode step of a session is recorded op by op into a graph, and every
//! later step with the same shape runs that graph as one launch. A decode step
//! is several hundred kernels, many of a few microseconds; launched one by one
//! on an H100 they took 1.1-1.5x longer (docs/benchmarks.md).
//!
//! What makes a step replayable: every op is queued on the backend with no
//! host wait (precision decisions stay in device buffers, METHOD.md 2e); the
//! token and position are read from the step's device copy
//! ([`crate::backend::Step`]), rewritten before each replay; the KV storage
//! stays where it is while its capacity holds; the output, the checks and the
//! counts live in buffers the graph owns. The host-side effects of a call (KV
//! positions, fixed-precision counts) are redone per replay.
//!
//! A recording is kept per cache for one key (tokens, precision, counting,
//! KV capacity); a new key records anew. Precisions that read back mid-call
//! (oracle and random selection) never record.

use std::sync::Arc;

use crate::backend::{Backend, Step};
use crate::error::{EngineError, Result};
use crate::kv_cache::KvCache;
use crate::select::{BitStats, LinearSelect, Precision, Selector};

use super::forward::{Deferred, Next, Readout};
use super::Model;

/// The recorded decode step of one cache, if any.
#[derive(Default)]
pub(crate) enum GraphSlot<B: Backend> {
    /// Nothing recorded yet.
    #[default]
    Empty,
    /// A recorded step.
    Ready(Box<StepGraph<B>>),
    /// Recording failed once: this cache runs its steps op by op.
    Failed,
}

/// A plan's selection rules, per block (held by address: see [`GraphKey`]).
type Rules<B> = Arc<Vec<Vec<LinearSelect<B>>>>;

/// A precision in a key: (kind, the plan's rules by address, bits or the
/// asynchronous-estimation flag).
type PrecisionKey = (u8, usize, u32);

/// What a recorded step was recorded for; a step with another key records anew.
#[derive(Debug, Clone, PartialEq, Eq)]
struct GraphKey {
    tokens: usize,
    precision: PrecisionKey,
    counting: bool,
    kv_capacity: usize,
}

/// A recorded decode step and the buffers it runs on.
pub(crate) struct StepGraph<B: Backend> {
    key: GraphKey,
    graph: B::Graph,
    step: Step<B::StepData>,
    logits: B::Buf,
    deferred: Deferred<B>,
    /// The host-side counts of one call (fixed precisions, estimator work).
    host_counts: Option<BitStats>,
    /// The plan's selection rules: the graph holds their buffers and
    /// thresholds, and the key their address.
    _plan: Option<Rules<B>>,
}

/// The key's precision part, None when the precision cannot be recorded.
fn precision_key<B: Backend>(prec: Precision<'_, B>) -> Option<(PrecisionKey, Option<Rules<B>>)> {
    let addr = |p: &Rules<B>| Arc::as_ptr(p) as usize;
    Some(match prec {
        Precision::Highest => ((0, 0, 0), None),
        Precision::Uniform(b) => ((1, 0, b), None),
        Precision::Max(p) => ((2, addr(&p.blocks), 0), Some(p.blocks.clone())),
        Precision::Dynamic(p) => match p.selector {
            Selector::Estimator => (
                (3, addr(&p.blocks), p.async_estimation as u32),
                Some(p.blocks.clone()),
            ),
            Selector::Oracle | Selector::Random { .. } => return None,
        },
    })
}

impl<B: Backend> Model<B> {
    /// A decode step (one token) through the cache's recorded graph: recorded
    /// first when there is none for this key. None when this call does not
    /// run so (the backend records no graphs, several tokens, a precision that
    /// reads back mid-call, a recording that failed before): the caller runs
    /// it op by op.
    pub(super) fn forward_graphed(
        &self,
        tokens: &[u32],
        cache: &mut KvCache<B>,
        prec: Precision<'_, B>,
        stats: Option<&mut BitStats>,
        readout: Readout,
    ) -> Option<Result<Next>> {
        if tokens.len() != 1
            || !self.backend.captures_graphs()
            || matches!(cache.graph, GraphSlot::Failed)
        {
            return None;
        }
        let (precision, plan) = precision_key(prec)?;
        let before = cache.len();
        let r = (|| {
            self.check_input(tokens, cache)?;
            self.check_precision(prec)?;
            let key = GraphKey {
                tokens: tokens.len(),
                precision,
                counting: stats.is_some(),
                kv_capacity: cache.reserve(before + tokens.len())?,
            };
            let n = tokens.len();
            let fresh = match &cache.graph {
                GraphSlot::Ready(g) if g.key == key => None,
                _ => match self.record_step(tokens, cache, prec, key, plan)? {
                    Some(g) => Some(g),
                    None => return Ok(None),
                },
            };
            let recorded = fresh.is_some();
            match fresh {
                Some(g) => cache.graph = GraphSlot::Ready(Box::new(g)),
                // What the recorded call does on the host: store its positions.
                None => cache.commit(n),
            }
            let GraphSlot::Ready(g) = &mut cache.graph else {
                return Err(EngineError::Device("no recorded decode step to run".into()));
            };
            if !recorded {
                self.backend.step_update(&mut g.step, tokens, before)?;
            }
            self.backend.graph_launch(&mut g.graph)?;
            let mut stats = stats;
            if let (Some(s), Some(h)) = (stats.as_deref_mut(), &g.host_counts) {
                s.merge(h);
            }
            self.read_next(&g.logits, Some(&g.deferred), stats, readout)
                .map(Some)
        })();
        match Self::keep_or_undo(cache, before, r) {
            Ok(Some(next)) => Some(Ok(next)),
            Ok(None) => None,
            Err(e) => Some(Err(e)),
        }
    }

    /// Record the forward call of `tokens` (with the output layer) as a graph;
    /// None, with the cache as it was and its slot marked failed, when the
    /// backend cannot record it (the caller then runs it op by op). The
    /// recording stores the call's KV positions on the host side; the graph
    /// has not run yet.
    fn record_step(
        &self,
        tokens: &[u32],
        cache: &mut KvCache<B>,
        prec: Precision<'_, B>,
        key: GraphKey,
        plan: Option<Rules<B>>,
    ) -> Result<Option<StepGraph<B>>> {
        let be = &self.backend;
        // The old recording's buffers go first.
        cache.graph = GraphSlot::Empty;
        let before = cache.len();
        let step = be.step(tokens, before)?;
        let mut logits = be.zeros(self.config.vocab_size)?;
        let mut deferred = self.new_deferred(prec, key.counting)?;
        let mut host_counts = key.counting.then(|| self.new_bit_stats());
        let recorded = be.capture_begin().and_then(|()| {
            let queued = (|| {
                let h =
                    self.forward_device(&step, cache, prec, host_counts.as_mut(), &mut deferred)?;
                self.logits_into(&h, 1, &mut logits);
                Ok(())
            })();
            // Always ended, so the stream leaves capture mode.
            let graph = be.capture_end();
            queued.and(graph)
        });
        match recorded {
            Ok(graph) => Ok(Some(StepGraph {
                key,
                graph,
                step,
                logits,
                deferred,
                host_counts,
                _plan: plan,
            })),
            Err(e) => {
                tracing::warn!("recording a decode step as a graph failed ({e}); running op by op");
                cache.truncate(before);
                cache.graph = GraphSlot::Failed;
                Ok(None)
            }
        }
    }
}
