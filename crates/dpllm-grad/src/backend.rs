//! Where the gradient model's ops run: one trait, [`GradBackend`], so the
//! forward and backward pass of [`crate::GradModel`] is written once and runs
//! on the CPU ([`CpuGrad`], the functions of [`crate::ops`]) or on a GPU
//! (`crate::cuda::CudaGrad`).
//!
//! Conventions are those of [`crate::ops`]: activations row-major `[n × width]`,
//! weights row-major `[out × in]`, sequences starting at position 0.

use anyhow::Result;
use dpllm_engine::backend::cpu::attention::AttnShape;
use dpllm_engine::backend::cpu::rows::{join_columns, split_columns};
use dpllm_engine::model::rope::Rope;
use dpllm_engine::select::estimator::row_norms;

use crate::ops;
pub use crate::step::{Pair, Recorder, Replay};

/// The op set of the gradient pass on one kind of device.
#[allow(clippy::too_many_arguments)]
pub trait GradBackend {
    /// A buffer of f32 values where this backend computes.
    type Buf;
    /// f64 accumulators where this backend computes (fine-tuning's per-linear
    /// dot products and the loss, read once a step).
    type Sums;
    /// Token ids where this backend computes.
    type Ids;
    /// Precision pairs ([`Pair`]) where this backend's ops read them.
    type Pairs;

    /// "cpu", or the GPU's description.
    fn name(&self) -> String;
    /// A buffer holding `host`.
    fn upload(&self, host: &[f32]) -> Result<Self::Buf>;
    /// A buffer of `len` zeros.
    fn zeros(&self, len: usize) -> Result<Self::Buf>;
    /// A buffer of `len` values for an op that overwrites every one of them:
    /// what it holds before is unspecified (a GPU skips clearing it; these
    /// zeros by default).
    fn scratch(&self, len: usize) -> Result<Self::Buf> {
        self.zeros(len)
    }
    /// The values of `buf`, on the host.
    fn download(&self, buf: &Self::Buf) -> Result<Vec<f32>>;
    /// Values in `buf`.
    fn len(&self, buf: &Self::Buf) -> usize;
    /// A copy of `buf`.
    fn copy(&self, buf: &Self::Buf) -> Result<Self::Buf>;
    /// `tokens` as ids on this backend (checked against the vocabulary by the caller).
    fn ids(&self, tokens: &[u32]) -> Result<Self::Ids>;
    /// Overwrite `ids` with as many `tokens`.
    fn set_ids(&self, ids: &mut Self::Ids, tokens: &[u32]) -> Result<()>;
    /// How many ids `ids` holds.
    fn ids_len(&self, ids: &Self::Ids) -> usize;
    /// Rows `ids` of `table` [vocab × d] into `out` [ids × d].
    fn embed(
        &self,
        table: &Self::Buf,
        d: usize,
        ids: &Self::Ids,
        out: &mut Self::Buf,
    ) -> Result<()>;
    /// `h += x`.
    fn add(&self, h: &mut Self::Buf, x: &Self::Buf) -> Result<()>;
    /// `y [n × out] = x [n × in] · Wᵀ (+ bias)`.
    fn linear_forward(
        &self,
        x: &Self::Buf,
        n: usize,
        w: &Self::Buf,
        out_f: usize,
        in_f: usize,
        bias: Option<&Self::Buf>,
        y: &mut Self::Buf,
    ) -> Result<()>;
    /// `dx [n × in] (+)= dy [n × out] · W`.
    fn linear_backward_input(
        &self,
        dy: &Self::Buf,
        n: usize,
        w: &Self::Buf,
        out_f: usize,
        in_f: usize,
        dx: &mut Self::Buf,
        accumulate: bool,
    ) -> Result<()>;
    /// `dw [out × in] = dyᵀ · x`.
    fn linear_backward_weight(
        &self,
        dy: &Self::Buf,
        x: &Self::Buf,
        n: usize,
        out_f: usize,
        in_f: usize,
        dw: &mut Self::Buf,
    ) -> Result<()>;
    /// RMSNorm of each row of `x` (width `w.len()`) into `out`.
    fn rms_norm_forward(
        &self,
        x: &Self::Buf,
        w: &Self::Buf,
        eps: f32,
        out: &mut Self::Buf,
    ) -> Result<()>;
    /// RMSNorm of each row of `x` in place.
    fn rms_norm_forward_inplace(&self, x: &mut Self::Buf, w: &Self::Buf, eps: f32) -> Result<()>;
    /// `dx += ∂/∂x` of RMSNorm(x) given `dy`.
    fn rms_norm_backward_add(
        &self,
        x: &Self::Buf,
        w: &Self::Buf,
        eps: f32,
        dy: &Self::Buf,
        dx: &mut Self::Buf,
    ) -> Result<()>;
    /// RoPE of `x` [n × heads × head_dim] at positions 0..n, or its inverse
    /// (the backward pass: the transpose of a rotation is its inverse).
    fn rope(&self, rope: &Rope, x: &mut Self::Buf, heads: usize, inverse: bool) -> Result<()>;
    /// Causal attention (GQA, optional sliding window) of q, k, v into `out`.
    fn attention_forward(
        &self,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        shape: AttnShape,
        out: &mut Self::Buf,
    ) -> Result<()>;
    /// Gradients of q, k, v (overwritten) given the output gradient `dout`.
    fn attention_backward(
        &self,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        dout: &Self::Buf,
        shape: AttnShape,
        dq: &mut Self::Buf,
        dk: &mut Self::Buf,
        dv: &mut Self::Buf,
    ) -> Result<()>;
    /// `act = silu(gate) · up`.
    fn swiglu_forward(&self, gate: &Self::Buf, up: &Self::Buf, act: &mut Self::Buf) -> Result<()>;
    /// Gradients of gate and up (overwritten) given `dact`.
    fn swiglu_backward(
        &self,
        gate: &Self::Buf,
        up: &Self::Buf,
        dact: &Self::Buf,
        dgate: &mut Self::Buf,
        dup: &mut Self::Buf,
    ) -> Result<()>;
    /// Each token's row of `x` [n × Σ widths] into consecutive parts [n × width_i].
    fn split_columns(&self, x: &Self::Buf, n: usize, parts: &mut [&mut Self::Buf]) -> Result<()>;
    /// The inverse of [`GradBackend::split_columns`].
    fn join_columns(&self, parts: &[&Self::Buf], n: usize, out: &mut Self::Buf) -> Result<()>;
    /// Mean next-token cross-entropy of `h` [n × d] through the lm_head `w`
    /// [vocab × d] (row t < n − 1 predicts `ids[t + 1]`, n = the ids) added to
    /// `loss[slot]`, and ∂loss/∂h into `dh` (its last row 0).
    #[allow(clippy::too_many_arguments)]
    fn lm_head_cross_entropy(
        &self,
        h: &Self::Buf,
        d: usize,
        w: &Self::Buf,
        vocab: usize,
        ids: &Self::Ids,
        dh: Option<&mut Self::Buf>,
        loss: &mut Self::Sums,
        slot: usize,
    ) -> Result<()>;
    /// `out[i] += g[i]²`.
    fn add_squared(&self, out: &mut Self::Buf, g: &Self::Buf) -> Result<()>;
    /// `pairs` where this backend's ops read them.
    fn pairs(&self, pairs: &[Pair]) -> Result<Self::Pairs>;
    /// Overwrite `dst` with as many `pairs`.
    fn set_pairs(&self, dst: &mut Self::Pairs, pairs: &[Pair]) -> Result<()>;
    /// `dst = a·W_lo + b·W_hi` of pair `slot` of `pairs` (the interpolated
    /// weight of precision fine-tuning), where `levels` holds a weight of
    /// `dst.len()` values at precisions `min_bits`, `min_bits + 1`, ... one after another.
    #[allow(clippy::too_many_arguments)]
    fn mix(
        &self,
        dst: &mut Self::Buf,
        levels: &Self::Buf,
        min_bits: u32,
        pairs: &Self::Pairs,
        slot: usize,
    ) -> Result<()>;
    /// `len` accumulators holding 0.
    fn sums(&self, len: usize) -> Result<Self::Sums>;
    /// Every accumulator back to 0.
    fn clear_sums(&self, sums: &mut Self::Sums) -> Result<()>;
    /// The accumulators' values, on the host.
    fn read_sums(&self, sums: &Self::Sums) -> Result<Vec<f64>>;
    /// `sums[sum_slot] += Σ g·(W_hi − W_lo)`, summed in f64, of pair `slot`
    /// of `pairs` and `levels` as in [`GradBackend::mix`].
    #[allow(clippy::too_many_arguments)]
    fn dot_diff(
        &self,
        g: &Self::Buf,
        levels: &Self::Buf,
        min_bits: u32,
        pairs: &Self::Pairs,
        slot: usize,
        sums: &mut Self::Sums,
        sum_slot: usize,
    ) -> Result<()>;
    /// What records this backend's ops once and replays them without the
    /// host (a CUDA graph), or None where it cannot (the CPU; a GPU while
    /// profiling).
    fn recorder(&self) -> Option<Box<dyn Recorder>> {
        None
    }
    /// `out[r]` = the L2 norm of row r of `x` (rows of `width` values).
    fn row_norms(&self, x: &Self::Buf, width: usize, out: &mut Self::Buf) -> Result<()>;
    /// The gradient of mean_r (‖y_r‖ − e_r)² with respect to `y` [n × k], in
    /// place ([`ops::norm_error_scale`]; n = the length of `e`).
    fn norm_error_scale(&self, y: &mut Self::Buf, k: usize, e: &Self::Buf) -> Result<()>;
    /// One Adam step of `w` along `g` with moments `m`, `v` ([`ops::adam_step`]).
    fn adam_step(
        &self,
        w: &mut Self::Buf,
        g: &Self::Buf,
        m: &mut Self::Buf,
        v: &mut Self::Buf,
        lr: f32,
        t: i32,
    ) -> Result<()>;
}

/// The CPU: buffers are `Vec<f32>`, the ops those of [`crate::ops`] (rayon threads).
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuGrad;

impl GradBackend for CpuGrad {
    type Buf = Vec<f32>;
    type Sums = Vec<f64>;
    type Ids = Vec<u32>;
    type Pairs = Vec<Pair>;

    fn name(&self) -> String {
        "cpu".into()
    }
    fn upload(&self, host: &[f32]) -> Result<Vec<f32>> {
        Ok(host.to_vec())
    }
    fn zeros(&self, len: usize) -> Result<Vec<f32>> {
        Ok(vec![0f32; len])
    }
    fn download(&self, buf: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(buf.clone())
    }
    fn len(&self, buf: &Vec<f32>) -> usize {
        buf.len()
    }
    fn copy(&self, buf: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(buf.clone())
    }
    fn ids(&self, tokens: &[u32]) -> Result<Vec<u32>> {
        Ok(tokens.to_vec())
    }
    fn set_ids(&self, ids: &mut Vec<u32>, tokens: &[u32]) -> Result<()> {
        overwrite(ids, tokens, "token ids")
    }
    fn ids_len(&self, ids: &Vec<u32>) -> usize {
        ids.len()
    }
    fn embed(&self, table: &Vec<f32>, d: usize, ids: &Vec<u32>, out: &mut Vec<f32>) -> Result<()> {
        anyhow::ensure!(
            out.len() == ids.len() * d,
            "embedding: {} values for {} rows of {d}",
            out.len(),
            ids.len()
        );
        for (row, &t) in out.chunks_mut(d).zip(ids) {
            let src = table.get(t as usize * d..(t as usize + 1) * d);
            let src = src.ok_or_else(|| anyhow::anyhow!("token id {t} is past the embedding"))?;
            row.copy_from_slice(src);
        }
        Ok(())
    }
    fn add(&self, h: &mut Vec<f32>, x: &Vec<f32>) -> Result<()> {
        h.iter_mut().zip(x).for_each(|(a, b)| *a += b);
        Ok(())
    }
    fn linear_forward(
        &self,
        x: &Vec<f32>,
        n: usize,
        w: &Vec<f32>,
        out_f: usize,
        in_f: usize,
        bias: Option<&Vec<f32>>,
        y: &mut Vec<f32>,
    ) -> Result<()> {
        ops::linear_forward(x, n, w, out_f, in_f, bias.map(|b| b.as_slice()), y);
        Ok(())
    }
    fn linear_backward_input(
        &self,
        dy: &Vec<f32>,
        n: usize,
        w: &Vec<f32>,
        out_f: usize,
        in_f: usize,
        dx: &mut Vec<f32>,
        accumulate: bool,
    ) -> Result<()> {
        ops::linear_backward_input(dy, n, w, out_f, in_f, dx, accumulate);
        Ok(())
    }
    fn linear_backward_weight(
        &self,
        dy: &Vec<f32>,
        x: &Vec<f32>,
        n: usize,
        out_f: usize,
        in_f: usize,
        dw: &mut Vec<f32>,
    ) -> Result<()> {
        ops::linear_backward_weight(dy, x, n, out_f, in_f, dw);
        Ok(())
    }
    fn rms_norm_forward(
        &self,
        x: &Vec<f32>,
        w: &Vec<f32>,
        eps: f32,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        ops::rms_norm_forward(x, w, eps, out);
        Ok(())
    }
    fn rms_norm_forward_inplace(&self, x: &mut Vec<f32>, w: &Vec<f32>, eps: f32) -> Result<()> {
        ops::rms_norm_forward_inplace(x, w, eps);
        Ok(())
    }
    fn rms_norm_backward_add(
        &self,
        x: &Vec<f32>,
        w: &Vec<f32>,
        eps: f32,
        dy: &Vec<f32>,
        dx: &mut Vec<f32>,
    ) -> Result<()> {
        ops::rms_norm_backward_add(x, w, eps, dy, dx);
        Ok(())
    }
    fn rope(&self, rope: &Rope, x: &mut Vec<f32>, heads: usize, inverse: bool) -> Result<()> {
        match inverse {
            false => ops::rope_forward(rope, x, heads),
            true => ops::rope_backward(rope, x, heads),
        }
        Ok(())
    }
    fn attention_forward(
        &self,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        shape: AttnShape,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        ops::attention_forward(q, k, v, shape, out);
        Ok(())
    }
    fn attention_backward(
        &self,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        dout: &Vec<f32>,
        shape: AttnShape,
        dq: &mut Vec<f32>,
        dk: &mut Vec<f32>,
        dv: &mut Vec<f32>,
    ) -> Result<()> {
        ops::attention_backward(q, k, v, dout, shape, dq, dk, dv);
        Ok(())
    }
    fn swiglu_forward(&self, gate: &Vec<f32>, up: &Vec<f32>, act: &mut Vec<f32>) -> Result<()> {
        ops::swiglu_forward(gate, up, act);
        Ok(())
    }
    fn swiglu_backward(
        &self,
        gate: &Vec<f32>,
        up: &Vec<f32>,
        dact: &Vec<f32>,
        dgate: &mut Vec<f32>,
        dup: &mut Vec<f32>,
    ) -> Result<()> {
        ops::swiglu_backward(gate, up, dact, dgate, dup);
        Ok(())
    }
    fn split_columns(&self, x: &Vec<f32>, n: usize, parts: &mut [&mut Vec<f32>]) -> Result<()> {
        let mut views: Vec<&mut [f32]> = parts.iter_mut().map(|p| p.as_mut_slice()).collect();
        split_columns(x, n, &mut views);
        Ok(())
    }
    fn join_columns(&self, parts: &[&Vec<f32>], n: usize, out: &mut Vec<f32>) -> Result<()> {
        let views: Vec<&[f32]> = parts.iter().map(|p| p.as_slice()).collect();
        join_columns(&views, n, out);
        Ok(())
    }
    fn lm_head_cross_entropy(
        &self,
        h: &Vec<f32>,
        d: usize,
        w: &Vec<f32>,
        vocab: usize,
        ids: &Vec<u32>,
        dh: Option<&mut Vec<f32>>,
        loss: &mut Vec<f64>,
        slot: usize,
    ) -> Result<()> {
        let n = h.len() / d.max(1);
        anyhow::ensure!(
            ids.len() >= 2 && ids.len() == n && h.len() == n * d,
            "cross-entropy: {} ids for {} values of width {d}",
            ids.len(),
            h.len()
        );
        anyhow::ensure!(
            slot < loss.len(),
            "cross-entropy: sum {slot} of {}",
            loss.len()
        );
        let targets = &ids[1..];
        if let Some(&t) = targets.iter().find(|&&t| t as usize >= vocab) {
            anyhow::bail!("target id {t} is out of range for a vocabulary of {vocab}");
        }
        if let Some(g) = &dh {
            anyhow::ensure!(
                g.len() == n * d,
                "cross-entropy: a gradient of {} values",
                g.len()
            );
        }
        let dh = dh.map(|g| g.as_mut_slice());
        loss[slot] += ops::lm_head_cross_entropy(h, d, w, vocab, targets, dh);
        Ok(())
    }
    fn add_squared(&self, out: &mut Vec<f32>, g: &Vec<f32>) -> Result<()> {
        ops::add_squared(out, g);
        Ok(())
    }
    fn pairs(&self, pairs: &[Pair]) -> Result<Vec<Pair>> {
        Ok(pairs.to_vec())
    }
    fn set_pairs(&self, dst: &mut Vec<Pair>, pairs: &[Pair]) -> Result<()> {
        overwrite(dst, pairs, "pairs")
    }
    fn mix(
        &self,
        dst: &mut Vec<f32>,
        levels: &Vec<f32>,
        min_bits: u32,
        pairs: &Vec<Pair>,
        slot: usize,
    ) -> Result<()> {
        let p = pair_at(pairs, slot)?;
        let (lo, hi) = p.levels(levels, min_bits, dst.len())?;
        for ((d, x), y) in dst.iter_mut().zip(lo).zip(hi) {
            *d = p.a * x + p.b * y;
        }
        Ok(())
    }
    fn sums(&self, len: usize) -> Result<Vec<f64>> {
        Ok(vec![0.0; len])
    }
    fn clear_sums(&self, sums: &mut Vec<f64>) -> Result<()> {
        sums.fill(0.0);
        Ok(())
    }
    fn read_sums(&self, sums: &Vec<f64>) -> Result<Vec<f64>> {
        Ok(sums.clone())
    }
    fn dot_diff(
        &self,
        g: &Vec<f32>,
        levels: &Vec<f32>,
        min_bits: u32,
        pairs: &Vec<Pair>,
        slot: usize,
        sums: &mut Vec<f64>,
        sum_slot: usize,
    ) -> Result<()> {
        let (lo, hi) = pair_at(pairs, slot)?.levels(levels, min_bits, g.len())?;
        let acc = (sums.get_mut(sum_slot))
            .ok_or_else(|| anyhow::anyhow!("dot_diff: no sum {sum_slot}"))?;
        *acc += g
            .iter()
            .zip(hi)
            .zip(lo)
            .map(|((d, h), l)| *d as f64 * (*h - *l) as f64)
            .sum::<f64>();
        Ok(())
    }
    fn row_norms(&self, x: &Vec<f32>, width: usize, out: &mut Vec<f32>) -> Result<()> {
        anyhow::ensure!(
            width > 0 && x.len() == out.len() * width,
            "row_norms: {} values are not {} rows of {width}",
            x.len(),
            out.len()
        );
        out.iter_mut()
            .zip(row_norms(x, width))
            .for_each(|(o, v)| *o = v);
        Ok(())
    }
    fn norm_error_scale(&self, y: &mut Vec<f32>, k: usize, e: &Vec<f32>) -> Result<()> {
        check_lengths("norm_error_scale", y.len(), &[k * e.len()])?;
        ops::norm_error_scale(y, k, e);
        Ok(())
    }
    fn adam_step(
        &self,
        w: &mut Vec<f32>,
        g: &Vec<f32>,
        m: &mut Vec<f32>,
        v: &mut Vec<f32>,
        lr: f32,
        t: i32,
    ) -> Result<()> {
        check_adam([w.len(), g.len(), m.len(), v.len()], t)?;
        ops::adam_step(w, g, m, v, lr, t);
        Ok(())
    }
}

/// That every length in `others` is `len` (for op `what`'s error).
pub fn check_lengths(what: &str, len: usize, others: &[usize]) -> Result<()> {
    anyhow::ensure!(
        others.iter().all(|&o| o == len),
        "{what}: buffers of {len} and {others:?} values"
    );
    Ok(())
}

/// An Adam step's arguments: w, g, m and v of one length (`lens`), step `t` from 1.
pub fn check_adam(lens: [usize; 4], t: i32) -> Result<()> {
    check_lengths("adam_step", lens[0], &lens[1..])?;
    anyhow::ensure!(t >= 1, "adam_step: step {t} (steps count from 1)");
    Ok(())
}

/// `dst` overwritten with as many `src` values (`what` they are, for the error).
fn overwrite<T: Copy>(dst: &mut [T], src: &[T], what: &str) -> Result<()> {
    anyhow::ensure!(
        dst.len() == src.len(),
        "{} {what} into room for {}",
        src.len(),
        dst.len()
    );
    dst.copy_from_slice(src);
    Ok(())
}

/// Pair `slot` of `pairs`, or an error naming it.
fn pair_at(pairs: &[Pair], slot: usize) -> Result<Pair> {
    (pairs.get(slot).copied())
        .ok_or_else(|| anyhow::anyhow!("precision pair {slot} of {}", pairs.len()))
}
