//! Sensitivity (METHOD.md section 1 step 1): the diagonal Fisher of every quantized
//! linear weight, F = Σ over calibration sequences of (∂L/∂W)², where L is the mean
//! next-token cross-entropy of one sequence.
//!
//! The gradients come from `dpllm-grad` (the f32 model with its backward pass);
//! here: accumulation over sequences, calibration windows, and the safetensors file.
//!
//! File format: a safetensors file with one F32 tensor of shape [out, in] per
//! quantized linear, named like the Hugging Face weight
//! (`model.layers.{i}.self_attn.q_proj.weight`, `model.layers.{i}.mlp.down_proj.weight`, ...,
//! `qkv_proj` / `gate_up_proj` for Phi-3), metadata `format = dpllm-sensitivity`.

use std::collections::BTreeMap;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use dpllm_engine::Model;
use dpllm_format::Checkpoint;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub use dpllm_grad::GradModel;
use dpllm_grad::{CpuGrad, GradBackend};

/// Accumulated sensitivities of every quantized linear.
#[derive(Debug, Clone, PartialEq)]
pub struct Sensitivities {
    /// Per block: (linear name as in `Block::linears()`, F [out·in] row-major), in that order.
    pub layers: Vec<Vec<(String, Vec<f32>)>>,
    /// Per block and linear (same order as `layers`): [out, in].
    pub shapes: Vec<Vec<[usize; 2]>>,
}

impl Sensitivities {
    /// F of linear `name` of block `layer`, if present.
    pub fn get(&self, layer: usize, name: &str) -> Option<&[f32]> {
        self.layers
            .get(layer)?
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }

    /// Every tensor as (Hugging Face weight name, [out, in], F).
    pub fn tensors(&self) -> impl Iterator<Item = (String, [usize; 2], &[f32])> {
        self.layers
            .iter()
            .zip(&self.shapes)
            .enumerate()
            .flat_map(|(l, (lin, shapes))| {
                lin.iter()
                    .zip(shapes)
                    .map(move |((name, v), s)| (hf_weight_name(l, name), *s, v.as_slice()))
            })
    }
}

/// The Hugging Face name of linear `linear` ("q_proj", "gate_up_proj", ...) of block `layer`.
pub fn hf_weight_name(layer: usize, linear: &str) -> String {
    let part = if matches!(
        linear,
        "gate_proj" | "up_proj" | "down_proj" | "gate_up_proj"
    ) {
        "mlp"
    } else {
        "self_attn"
    };
    format!("model.layers.{layer}.{part}.{linear}.weight")
}

/// Σ over `sequences` of the squared gradient of each sequence's mean next-token
/// cross-entropy w.r.t. every block linear of `model` (computed in f32 on the CPU).
pub fn accumulate_sensitivities(
    model: &Model,
    sequences: &[Vec<u32>],
    progress: bool,
) -> Result<Sensitivities> {
    accumulate_sensitivities_on(CpuGrad, model, sequences, progress)
}

/// [`accumulate_sensitivities`] on backend `be`: the model's weights, the
/// gradients and the sums stay there; only the sums come back, once.
pub fn accumulate_sensitivities_on<G: GradBackend>(
    be: G,
    model: &Model,
    sequences: &[Vec<u32>],
    progress: bool,
) -> Result<Sensitivities> {
    for (i, s) in sequences.iter().enumerate() {
        ensure!(
            s.len() >= 2,
            "calibration sequence {i} has {} tokens; at least 2 are needed",
            s.len()
        );
        if let Some(&t) = s.iter().find(|&&t| t as usize >= model.config.vocab_size) {
            bail!(
                "calibration sequence {i}: token id {t} is out of range for a vocabulary of {}",
                model.config.vocab_size
            );
        }
    }
    let gm = GradModel::on(be, model, None)?;
    let be = gm.backend();
    let mut sums = Vec::with_capacity(gm.blocks.len());
    for b in &gm.blocks {
        let v = (b.linears().iter())
            .map(|l| be.zeros(l.out_f * l.in_f))
            .collect::<Result<Vec<_>>>()?;
        sums.push(v);
    }
    let bar = if progress {
        let b = indicatif::ProgressBar::new(sequences.len() as u64);
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "sensitivity {bar:30} {pos}/{len} seq [{elapsed_precise}<{eta_precise}] {msg}",
        ) {
            b.set_style(style);
        }
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut loss_sum = 0f64;
    for (i, seq) in sequences.iter().enumerate() {
        let loss = gm.gradient(seq, &mut |l, idx, g| be.add_squared(&mut sums[l][idx], g))?;
        ensure!(
            loss.is_finite(),
            "calibration sequence {i}: the loss is not finite ({loss})"
        );
        loss_sum += loss;
        bar.inc(1);
        bar.set_message(format!("mean loss {:.4}", loss_sum / (i + 1) as f64));
    }
    bar.finish_and_clear();
    let mut layers = Vec::with_capacity(gm.blocks.len());
    let mut shapes = Vec::with_capacity(gm.blocks.len());
    for (b, sums) in gm.blocks.iter().zip(&sums) {
        let lins = b.linears();
        layers.push(
            (lins.iter().zip(sums))
                .map(|(l, s)| Ok((l.name.to_string(), be.download(s)?)))
                .collect::<Result<Vec<_>>>()?,
        );
        shapes.push(lins.iter().map(|l| [l.out_f, l.in_f]).collect());
    }
    Ok(Sensitivities { layers, shapes })
}

/// Write `s` to `path` as safetensors (F32 [out, in] per linear), atomically and
/// streamed; `inputs` (what produced it) goes into the metadata. An existing file
/// is replaced only when it is a sensitivity file dpllm wrote.
pub fn save(s: &Sensitivities, path: &Path, inputs: &serde_json::Value) -> Result<()> {
    ensure!(
        s.layers.len() == s.shapes.len(),
        "sensitivities: {} layers but {} shape lists",
        s.layers.len(),
        s.shapes.len()
    );
    let mut header = serde_json::Map::new();
    header.insert(
        "__metadata__".into(),
        serde_json::json!({"format": dpllm_format::output::SENSITIVITY_FORMAT, "kind": "diagonal-fisher", "inputs": inputs.to_string()}),
    );
    let mut offset = 0usize;
    let mut order = Vec::new();
    for (name, shape, v) in s.tensors() {
        ensure!(
            v.len() == shape[0] * shape[1],
            "{name}: {} values for shape {:?}",
            v.len(),
            shape
        );
        let bytes = v.len() * 4;
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
        order.push(v);
    }
    let mut hdr = serde_json::to_vec(&serde_json::Value::Object(header))?;
    hdr.resize(hdr.len().next_multiple_of(8), b' ');
    dpllm_format::write_output_file(path, dpllm_format::OutputKind::Sensitivity, |f| {
        let mut w = BufWriter::with_capacity(1 << 20, f);
        w.write_all(&(hdr.len() as u64).to_le_bytes())?;
        w.write_all(&hdr)?;
        let mut buf = Vec::with_capacity(1 << 16);
        for v in order {
            for chunk in v.chunks(1 << 14) {
                buf.clear();
                buf.extend(chunk.iter().flat_map(|x| x.to_le_bytes()));
                w.write_all(&buf)?;
            }
        }
        w.flush()
    })
    .with_context(|| format!("writing sensitivities to {}", path.display()))
}

/// A tensor's shape and values.
pub type NamedTensor = (Vec<usize>, Vec<f32>);

/// A sensitivity file opened for lookups (memory-mapped; tensors are read on demand).
pub struct SensitivityFile {
    ck: Checkpoint,
    path: PathBuf,
}

impl SensitivityFile {
    /// Names of all tensors in the file, sorted.
    pub fn names(&self) -> Vec<String> {
        self.ck.tensors().keys().map(|k| k.to_string()).collect()
    }

    /// F of the Hugging Face weight `hf_name`, checked to have shape [out, in].
    pub fn get(&self, hf_name: &str, out: usize, inp: usize) -> Result<Vec<f32>> {
        ensure!(
            self.ck.contains(hf_name),
            "sensitivity file {} has no tensor {hf_name:?} (was it computed for another model?)",
            self.path.display()
        );
        self.ck.tensor_f32(hf_name, &[out, inp]).with_context(|| {
            format!(
                "sensitivity file {}: tensor {hf_name:?} expected shape [{out}, {inp}]",
                self.path.display()
            )
        })
    }

    /// F of linear `linear` ("q_proj", ...) of block `layer`, checked to have shape [out, in].
    pub fn get_linear(
        &self,
        layer: usize,
        linear: &str,
        out: usize,
        inp: usize,
    ) -> Result<Vec<f32>> {
        self.get(&hf_weight_name(layer, linear), out, inp)
    }

    /// All sensitivities of `model`'s linears (every one must be present with the right shape).
    pub fn for_model(&self, model: &Model) -> Result<Sensitivities> {
        let mut layers = Vec::new();
        let mut shapes = Vec::new();
        for (l, b) in model.blocks.iter().enumerate() {
            let mut lv = Vec::new();
            let mut ls = Vec::new();
            for (name, lin) in b.linears() {
                let (o, i) = (lin.out_features(), lin.in_features());
                lv.push((name.to_string(), self.get_linear(l, name, o, i)?));
                ls.push([o, i]);
            }
            layers.push(lv);
            shapes.push(ls);
        }
        Ok(Sensitivities { layers, shapes })
    }

    /// Every tensor of the file: name → (shape, F).
    pub fn all(&self) -> Result<BTreeMap<String, NamedTensor>> {
        let mut m = BTreeMap::new();
        for (name, info) in self.ck.tensors() {
            m.insert(
                name.to_string(),
                (info.shape.clone(), self.ck.tensor_f32(name, &info.shape)?),
            );
        }
        Ok(m)
    }
}

/// Open a sensitivity file written by [`save`] (truncated or corrupt files are an error).
pub fn load(path: &Path) -> Result<SensitivityFile> {
    let ck = Checkpoint::open_file(path)
        .with_context(|| format!("reading sensitivity file {}", path.display()))?;
    Ok(SensitivityFile {
        ck,
        path: path.into(),
    })
}

/// `n` windows of `seq_len` consecutive tokens of `tokens`, at start positions drawn
/// uniformly (with replacement) from a `StdRng` seeded with `seed`: deterministic.
pub fn calibration_sequences(
    tokens: &[u32],
    n: usize,
    seq_len: usize,
    seed: u64,
) -> Result<Vec<Vec<u32>>> {
    ensure!(
        seq_len >= 2,
        "calibration sequences need at least 2 tokens, got seq_len {seq_len}"
    );
    ensure!(
        tokens.len() >= seq_len,
        "the calibration text has {} tokens, fewer than one sequence of {seq_len}",
        tokens.len()
    );
    let mut rng = StdRng::seed_from_u64(seed);
    Ok((0..n)
        .map(|_| {
            let start = rng.random_range(0..=tokens.len() - seq_len);
            tokens[start..start + seq_len].to_vec()
        })
        .collect())
}

#[cfg(test)]
mod tests;
