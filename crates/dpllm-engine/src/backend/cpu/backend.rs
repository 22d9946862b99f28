//! [`Backend`] for the CPU: each op calls the kernel of its module.

use super::{
    activation, attention, bitplane, estimate, norm, rope, rows, AnyPrecLinear, CpuBackend, CpuKv,
    DenseLinear,
};
use crate::backend::{
    needs_rows, AnyPrecHost, AttnShape, Backend, DenseHost, EstInput, Estimator, Step,
};
use crate::error::{EngineError, Result};

impl Backend for CpuBackend {
    type Buf = Vec<f32>;
    type Dense = DenseLinear;
    type AnyPrec = AnyPrecLinear;
    type Kv = CpuKv;
    type Mask = Vec<bool>;
    type StepData = ();
    type Graph = ();

    fn name(&self) -> String {
        format!("cpu ({})", bitplane::BitplaneKernel::best().name())
    }

    fn zeros(&self, len: usize) -> Result<Vec<f32>> {
        let mut v = Vec::new();
        v.try_reserve_exact(len)
            .map_err(|_| EngineError::OutOfMemory {
                what: "activations",
                bytes: len.saturating_mul(4),
            })?;
        v.resize(len, 0.0);
        Ok(v)
    }

    fn upload(&self, host: &[f32]) -> Result<Vec<f32>> {
        Ok(host.to_vec())
    }

    fn download(&self, buf: Vec<f32>) -> Result<Vec<f32>> {
        Ok(buf)
    }

    fn read(&self, buf: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(buf.clone())
    }

    fn fill(&self, buf: &mut Vec<f32>, value: f32) {
        buf.fill(value)
    }

    fn len(&self, buf: &Vec<f32>) -> usize {
        buf.len()
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    fn dense(
        &self,
        w: DenseHost,
        rows: usize,
        cols: usize,
        bias: Option<Vec<f32>>,
    ) -> Result<DenseLinear> {
        Ok(DenseLinear::from_host(w, rows, cols, bias))
    }

    fn anyprec(&self, w: AnyPrecHost) -> Result<AnyPrecLinear> {
        Ok(AnyPrecLinear::from_host(w))
    }

    fn kv_new(&self, layers: usize, kv_dim: usize) -> CpuKv {
        CpuKv {
            keys: vec![Vec::new(); layers],
            values: vec![Vec::new(); layers],
            kv_dim,
        }
    }

    fn kv_append(
        &self,
        kv: &mut CpuKv,
        layer: usize,
        k: &Vec<f32>,
        v: &Vec<f32>,
        step: &Step<()>,
    ) -> Result<()> {
        let held = kv.keys.get(layer).map(|k| k.len() / kv.kv_dim.max(1));
        if held != Some(step.pos0) {
            return Err(EngineError::Device(format!(
                "KV cache: layer {layer} holds {held:?} positions; appending at {}",
                step.pos0
            )));
        }
        for (buf, x) in [(&mut kv.keys[layer], k), (&mut kv.values[layer], v)] {
            buf.try_reserve(x.len())
                .map_err(|_| EngineError::OutOfMemory {
                    what: "the KV cache",
                    bytes: 4 * (buf.len() + x.len()),
                })?;
            buf.extend_from_slice(x);
        }
        Ok(())
    }

    fn kv_truncate(&self, kv: &mut CpuKv, positions: usize) {
        for (k, v) in kv.keys.iter_mut().zip(kv.values.iter_mut()) {
            k.truncate(positions * kv.kv_dim);
            v.truncate(positions * kv.kv_dim);
        }
    }

    fn kv_bytes(&self, kv: &CpuKv) -> usize {
        kv.keys.iter().chain(&kv.values).map(|v| v.len() * 4).sum()
    }

    fn step(&self, tokens: &[u32], pos0: usize) -> Result<Step<()>> {
        Ok(Step {
            tokens: tokens.to_vec(),
            pos0,
            data: (),
        })
    }

    fn embed(&self, table: &DenseLinear, step: &Step<()>, out: &mut Vec<f32>) {
        let d = table.in_features();
        for (t, &tok) in step.tokens.iter().enumerate() {
            table.row_f32(tok as usize, &mut out[t * d..(t + 1) * d]);
        }
    }

    fn rms_norm(&self, x: &Vec<f32>, w: &Vec<f32>, eps: f32, out: &mut Vec<f32>) {
        norm::rms_norm(x, w, eps, out)
    }

    fn rms_norm_inplace(&self, x: &mut Vec<f32>, w: &Vec<f32>, eps: f32) {
        norm::rms_norm_inplace(x, w, eps)
    }

    fn rope(
        &self,
        x: &mut Vec<f32>,
        heads: usize,
        head_dim: usize,
        rot_dim: usize,
        step: &Step<()>,
        table: &Vec<f32>,
    ) {
        rope::rope_apply(x, heads, head_dim, rot_dim, step.pos0, table, false)
    }

    fn attention(
        &self,
        q: &Vec<f32>,
        kv: &CpuKv,
        layer: usize,
        step: &Step<()>,
        shape: AttnShape,
        out: &mut Vec<f32>,
    ) {
        attention::attention(q, &kv.keys[layer], &kv.values[layer], step.pos0, shape, out)
    }

    fn swiglu(&self, gate: &mut Vec<f32>, up: &Vec<f32>, _n: usize) {
        activation::swiglu_inplace(gate, up)
    }

    fn add(&self, h: &mut Vec<f32>, x: &Vec<f32>) {
        for (a, b) in h.iter_mut().zip(x) {
            *a += b;
        }
    }

    fn copy(&self, src: &Vec<f32>, dst: &mut Vec<f32>) {
        dst.clear();
        dst.extend_from_slice(src);
    }

    fn rows(&self, x: &Vec<f32>, width: usize, row0: usize, n: usize) -> Result<Vec<f32>> {
        Ok(x[row0 * width..(row0 + n) * width].to_vec())
    }

    fn split_columns(&self, x: &Vec<f32>, n: usize, parts: &mut [&mut Vec<f32>]) {
        let mut slices: Vec<&mut [f32]> = parts.iter_mut().map(|p| p.as_mut_slice()).collect();
        rows::split_columns(x, n, &mut slices)
    }

    fn dense_linear(&self, w: &DenseLinear, x: &Vec<f32>, n: usize, y: &mut Vec<f32>) {
        w.forward(x, n, y)
    }

    fn anyprec_linear(
        &self,
        w: &AnyPrecLinear,
        x: &Vec<f32>,
        n: usize,
        bits: u32,
        y: &mut Vec<f32>,
    ) {
        w.forward_bits(x, n, y, bits)
    }

    fn estimates(
        &self,
        est: &Estimator<CpuBackend>,
        input: EstInput<'_, Self>,
        n: usize,
    ) -> Result<Vec<f32>> {
        let norms: Vec<f32> = match input {
            EstInput::Rows(x) => return Ok(estimate::estimate(est, x, n)),
            EstInput::Norms(v) if v.len() == n => v.clone(),
            EstInput::SumSq { sums, parts } if parts > 0 && sums.len() == n * parts => (sums
                .chunks(parts))
            .map(|p| p.iter().map(|&v| v as f64).sum::<f64>().sqrt() as f32)
            .collect(),
            other => {
                return Err(EngineError::Device(format!(
                    "{} estimator input values for {n} tokens of {} each",
                    other.buf().len(),
                    other.per_token(0)
                )))
            }
        };
        match est {
            Estimator::Linear { a, c } => Ok(norms.iter().map(|v| a * v + c).collect()),
            Estimator::None => Ok(vec![0.0; n]),
            Estimator::Jl { .. } => Err(needs_rows(est)),
        }
    }

    fn threshold_mask(&self, values: &Vec<f32>, threshold: f32) -> Result<Vec<bool>> {
        Ok(values.iter().map(|&e| e > threshold).collect())
    }

    fn mask_count(&self, mask: &Vec<bool>) -> Result<usize> {
        Ok(mask.iter().filter(|&&h| h).count())
    }

    fn mask_from(&self, high: &[bool]) -> Result<Vec<bool>> {
        Ok(high.to_vec())
    }

    fn mask_count_into(&self, mask: &Vec<bool>, out: &mut Vec<f32>, slot: usize) {
        out[slot] = mask.iter().filter(|&&h| h).count() as f32;
    }

    fn mask_store_into(&self, mask: &Vec<bool>, out: &mut Vec<f32>, offset: usize, stride: usize) {
        for (t, &h) in mask.iter().enumerate() {
            out[offset + t * stride] = if h { 1.0 } else { 0.0 };
        }
    }

    fn gather_rows(
        &self,
        x: &Vec<f32>,
        width: usize,
        mask: &Vec<bool>,
        high: bool,
    ) -> Result<Vec<f32>> {
        Ok(rows::gather(x, width, |t| mask[t] == high))
    }

    fn scatter_rows(
        &self,
        src: &Vec<f32>,
        width: usize,
        mask: &Vec<bool>,
        high: bool,
        dst: &mut Vec<f32>,
    ) {
        rows::scatter(src, width, |t| mask[t] == high, dst)
    }

    fn flag_non_finite(&self, x: &Vec<f32>, width: usize, flags: &mut Vec<f32>, slot: usize) {
        if let Some(i) = x.iter().position(|v| !v.is_finite()) {
            flags[slot] = flags[slot].min((i / width.max(1)) as f32);
        }
    }
}
