//! One step of precision fine-tuning on a gradient backend: the model's
//! linears loaded with the interpolated weights of the step's precisions,
//! the loss and ∂CE/∂p per linear. Its inputs (token ids, precision pairs)
//! and outputs (loss, dot products) stay in the backend's memory between
//! steps, so on a GPU the step's ops (some 130 a block, most of a few
//! microseconds) are recorded once as a CUDA graph and replayed as one
//! launch. A recording is checked once against the same step run op by op;
//! where recording fails or disagrees, steps run op by op (with a warning).

use anyhow::{anyhow, Result};
use dpllm_grad::{GradBackend, GradModel, Pair, Recorder, Replay};

use crate::finetune::LinearIndex;
use crate::weights::{split_precision, LinearWeights, WeightLevels};

/// Each linear's precision pair at precisions `p`: the two around p and the
/// weights r, 1 − r of y = r·y(lo) + (1 − r)·y(hi).
pub fn step_pairs(w: &[LinearWeights], p: &[f64]) -> Vec<Pair> {
    (w.iter().zip(p))
        .map(|(l, &p)| {
            let (lo, hi, r) = split_precision(p, l.min_bits, l.max_bits);
            Pair {
                lo,
                hi,
                a: r as f32,
                b: (1.0 - r) as f32,
            }
        })
        .collect()
}

/// Load the interpolated weight of each linear's pair (`pairs`, one a
/// linear in model order) into `gm`.
pub(crate) fn load_mixed<G: GradBackend>(
    gm: &mut GradModel<G>,
    w: &[LinearWeights],
    levels: &(impl WeightLevels<G> + ?Sized),
    pairs: &G::Pairs,
) -> Result<()> {
    let (be, blocks) = gm.backend_and_blocks();
    for (g, l) in w.iter().enumerate() {
        levels.mix(be, g, &mut blocks[l.layer].linear_mut(l.index).w, pairs, g)?;
    }
    Ok(())
}

/// Whether a step's recording is in use.
enum Recording {
    /// None made for the current sequence length, model and levels yet.
    Pending,
    /// Replayed each step with the same key.
    Ready(Box<dyn Replay>, Key),
    /// Not available, or refused: steps run op by op.
    Off,
}

/// What a recording reads besides the step's own buffers: the model and the
/// levels (by address) and the sequence length; a step with another key
/// records anew.
type Key = (usize, usize, usize);

/// The buffers of fine-tuning steps on one backend, and their recording.
pub struct Step<G: GradBackend> {
    pairs: G::Pairs,
    ids: Option<G::Ids>,
    loss: G::Sums,
    dots: G::Sums,
    recorder: Option<Box<dyn Recorder>>,
    recording: Recording,
}

impl<G: GradBackend> Step<G> {
    /// Buffers for steps over `w`'s linears on `be`, recorded for replay when
    /// `record` and the backend can.
    pub fn new(be: &G, w: &[LinearWeights], record: bool) -> Result<Step<G>> {
        let recorder = if record { be.recorder() } else { None };
        let recording = match recorder {
            Some(_) => Recording::Pending,
            None => Recording::Off,
        };
        let full: Vec<f64> = w.iter().map(|l| l.max_bits as f64).collect();
        Ok(Step {
            pairs: be.pairs(&step_pairs(w, &full))?,
            ids: None,
            loss: be.sums(1)?,
            dots: be.sums(w.len())?,
            recorder,
            recording,
        })
    }

    /// Whether steps replay a recording now.
    pub fn replays(&self) -> bool {
        matches!(self.recording, Recording::Ready(..))
    }

    /// CE of `seq` through the model interpolated at precisions `p`, and
    /// ∂CE/∂p per linear: ⟨∂CE/∂W, W_hi − W_lo⟩ (0 for single-precision linears).
    pub fn run(
        &mut self,
        gm: &mut GradModel<G>,
        w: &[LinearWeights],
        levels: &(impl WeightLevels<G> + ?Sized),
        index: &LinearIndex,
        p: &[f64],
        seq: &[u32],
    ) -> Result<(f64, Vec<f64>)> {
        self.queue(gm, w, levels, index, p, seq)?;
        self.results(gm)
    }

    /// The results of the step last queued: the CE and ∂CE/∂p per linear
    /// (waits for it).
    pub fn results(&self, gm: &GradModel<G>) -> Result<(f64, Vec<f64>)> {
        let be = gm.backend();
        Ok((be.read_sums(&self.loss)?[0], be.read_sums(&self.dots)?))
    }

    /// Queue the step [`Step::run`] computes, without waiting for it (but
    /// for the first step of a recording, which is checked): steps of other
    /// targets on other lanes can be queued meanwhile.
    pub fn queue(
        &mut self,
        gm: &mut GradModel<G>,
        w: &[LinearWeights],
        levels: &(impl WeightLevels<G> + ?Sized),
        index: &LinearIndex,
        p: &[f64],
        seq: &[u32],
    ) -> Result<()> {
        gm.check(seq)?;
        let key = (
            gm as *const GradModel<G> as usize,
            levels as *const _ as *const () as usize,
            seq.len(),
        );
        let Step {
            pairs,
            ids,
            loss,
            dots,
            recorder,
            recording,
        } = self;
        if matches!(recording, Recording::Ready(_, k) if *k != key) {
            *recording = Recording::Pending;
        }
        let be = gm.backend();
        be.set_pairs(pairs, &step_pairs(w, p))?;
        let ids: &G::Ids = match ids {
            Some(ids) if be.ids_len(ids) == seq.len() => {
                be.set_ids(ids, seq)?;
                ids
            }
            slot => {
                // New ids live elsewhere: a recording made for the old ones is void.
                if !matches!(recording, Recording::Off) {
                    *recording = Recording::Pending;
                }
                slot.insert(be.ids(seq)?)
            }
        };
        let queue = |gm: &mut GradModel<G>, loss: &mut G::Sums, dots: &mut G::Sums| {
            queue_step(gm, w, levels, index, (ids, &*pairs), (loss, dots))
        };
        match recording {
            Recording::Ready(r, _) => r.replay()?,
            Recording::Off => queue(gm, loss, dots)?,
            Recording::Pending => {
                queue(gm, loss, dots)?;
                let be = gm.backend();
                let want = (be.read_sums(loss)?, be.read_sums(dots)?);
                let recorder = recorder.as_ref().expect("pending only with a recorder");
                let made = recorder.record(&mut || queue(gm, loss, dots));
                let checked = made.and_then(|r| {
                    r.replay()?;
                    let be = gm.backend();
                    same_results(&want, &(be.read_sums(loss)?, be.read_sums(dots)?))?;
                    Ok(r)
                });
                *recording = match checked {
                    Ok(r) => Recording::Ready(r, key),
                    Err(e) => {
                        tracing::warn!("fine-tuning steps run op by op: {e:#}");
                        // The step's own results again (a replay may have overwritten them).
                        queue(gm, loss, dots)?;
                        Recording::Off
                    }
                };
            }
        }
        Ok(())
    }
}

/// Queue one step's ops: clear the loss and dot products, load the mixed
/// weights of `pairs`, then the forward and backward pass over `ids` with
/// each linear's ⟨∂CE/∂W, W_hi − W_lo⟩ added to its dot product.
fn queue_step<G: GradBackend>(
    gm: &mut GradModel<G>,
    w: &[LinearWeights],
    levels: &(impl WeightLevels<G> + ?Sized),
    index: &LinearIndex,
    (ids, pairs): (&G::Ids, &G::Pairs),
    (loss, dots): (&mut G::Sums, &mut G::Sums),
) -> Result<()> {
    let be = gm.backend();
    be.clear_sums(loss)?;
    be.clear_sums(dots)?;
    load_mixed(gm, w, levels, pairs)?;
    let be = gm.backend();
    gm.gradient_on(ids, loss, 0, &mut |layer, idx, dw| {
        let g = *(index.get(&(layer, idx)))
            .ok_or_else(|| anyhow!("no linear {idx} in block {layer}"))?;
        if w[g].max_bits > w[g].min_bits {
            levels.dot_diff(be, g, dw, pairs, g, dots, g)?;
        }
        Ok(())
    })
}

/// Whether a replayed step's (loss, dot products) `got` are the step's own
/// `want` (up to the order of f64 atomic sums); why not.
fn same_results(want: &(Vec<f64>, Vec<f64>), got: &(Vec<f64>, Vec<f64>)) -> Result<()> {
    let scale = (want.1.iter()).fold(0f64, |m, v| m.max(v.abs()));
    let close = |a: f64, b: f64, s: f64| (a - b).abs() <= 1e-4 * (a.abs() + s) + 1e-12;
    if !close(want.0[0], got.0[0], 0.0) {
        return Err(anyhow!(
            "the recorded step's loss {} is not the step's {}",
            got.0[0],
            want.0[0]
        ));
    }
    match (want.1.iter().zip(&got.1)).position(|(&a, &b)| !close(a, b, scale)) {
        None if want.1.len() == got.1.len() => Ok(()),
        None => Err(anyhow!(
            "the recorded step gave {} dot products",
            got.1.len()
        )),
        Some(g) => Err(anyhow!(
            "the recorded step's ∂CE/∂p of linear {g} is {}, the step's {}",
            got.1[g],
            want.1[g]
        )),
    }
}
