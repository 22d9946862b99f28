//! Building a [`Model`] from a checkpoint directory: a Hugging Face checkpoint
//! (dense weights) or a dpllm any-precision model (bit-plane weights).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use dpllm_format::anyprec::{self, AnyPrecInfo};
use dpllm_format::{Checkpoint, FormatError, LinearKind, LinearSpec, ModelConfig};

use super::rope::Rope;
use super::{Block, GateUpProj, Model, QkvProj};
use crate::backend::cpu::CpuBackend;
use crate::backend::{AnyPrecHost, Backend, DenseHost};
use crate::error::Result;
use crate::linear::{Linear, Weight};

/// How to load a model.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// For any-precision models: keep bit-planes and LUTs only up to this precision
    /// (default: every stored precision).
    pub max_bits: Option<u32>,
    /// Per linear (tensor-name prefix): keep planes only up to this precision,
    /// e.g. the m_l of a DP-LLM plan; overrides `max_bits` for the linears it names.
    pub linear_max_bits: Option<HashMap<String, u32>>,
}

impl LoadOptions {
    /// Keep for each linear exactly the planes a plan may use (its m_l): the plan's memory budget.
    pub fn for_plan(plan: &dpllm_format::plan::Plan) -> LoadOptions {
        LoadOptions {
            max_bits: None,
            linear_max_bits: Some(
                plan.linears
                    .iter()
                    .map(|l| (l.name.clone(), l.max_bits.max(l.high_bits)))
                    .collect(),
            ),
        }
    }
}

/// Where a model's weights come from while it is built: a checkpoint, or
/// random weights made on the backend (benchmarks, [`super::synthetic`]).
pub(super) trait WeightSource<B: Backend> {
    /// A linear layer of a block.
    fn linear(&self, s: &LinearSpec) -> Result<Linear<B>>;
    /// The embedding or output layer [rows × cols].
    fn table(&self, name: &str, rows: usize, cols: usize) -> Result<Linear<B>>;
    /// A norm's weights.
    fn vector(&self, name: &str, len: usize) -> Result<B::Buf>;
}

struct Loader<'a, B: Backend> {
    be: &'a B,
    ck: &'a Checkpoint,
    anyprec: Option<(AnyPrecInfo, u32)>,
    per_linear: Option<&'a HashMap<String, u32>>,
}

impl<B: Backend> WeightSource<B> for Loader<'_, B> {
    fn linear(&self, s: &LinearSpec) -> Result<Linear<B>> {
        let bias = s
            .has_bias
            .then(|| self.ck.tensor_f32(&s.bias_name(), &[s.rows]))
            .transpose()?;
        if let Some((info, keep)) = &self.anyprec {
            let keep = self
                .per_linear
                .and_then(|m| m.get(&s.prefix))
                .copied()
                .unwrap_or(*keep);
            if keep < info.seed_bits || keep > info.max_bits {
                return Err(FormatError::invalid(
                    self.ck.dir(),
                    format!(
                        "cannot load {} at {keep} bits: the file holds {}..={} bits",
                        s.prefix, info.seed_bits, info.max_bits
                    ),
                )
                .into());
            }
            let planes = anyprec::read_planes(self.ck, &s.prefix, s.rows, s.cols, keep)?;
            let luts = (info.seed_bits..=keep)
                .map(|b| anyprec::read_lut(self.ck, &s.prefix, s.rows, b))
                .collect::<Result<Vec<_>, _>>()?;
            let host = AnyPrecHost {
                rows: s.rows,
                cols: s.cols,
                seed_bits: info.seed_bits,
                max_bits: keep,
                planes,
                luts,
                bias,
            };
            return Ok(Linear::anyprec(
                self.be.anyprec(host)?,
                s.rows,
                s.cols,
                info.seed_bits,
                keep,
            ));
        }
        let w = self.ck.tensor(&s.weight_name(), &[s.rows, s.cols])?;
        dense_linear(self.be, DenseHost::Float(Arc::new(w)), s.rows, s.cols, bias)
    }

    /// The embedding or output layer [rows × cols], kept in 8-bit blocks when stored so.
    fn table(&self, name: &str, rows: usize, cols: usize) -> Result<Linear<B>> {
        let w = match self.ck.tensor_q8_0(name, rows, cols)? {
            Some(q) => DenseHost::Q8_0(Arc::new(q)),
            None => DenseHost::Float(Arc::new(self.ck.tensor(name, &[rows, cols])?)),
        };
        dense_linear(self.be, w, rows, cols, None)
    }

    fn vector(&self, name: &str, len: usize) -> Result<B::Buf> {
        self.be.upload(&self.ck.tensor_f32(name, &[len])?)
    }
}

/// A dense linear on `be` from a host weight (and bias).
fn dense_linear<B: Backend>(
    be: &B,
    w: DenseHost,
    rows: usize,
    cols: usize,
    bias: Option<Vec<f32>>,
) -> Result<Linear<B>> {
    let bytes = w.nbytes() + bias.as_ref().map_or(0, |b| b.len() * 4);
    let storage = w.storage();
    Ok(Linear::dense(
        Arc::new(be.dense(w, rows, cols, bias)?),
        rows,
        cols,
        bytes,
        storage,
    ))
}

/// The backend's copy of a dense linear's weight (to share it).
fn shared<B: Backend>(lin: &Linear<B>) -> Arc<B::Dense> {
    match lin.weight() {
        Weight::Dense(w) => w.clone(),
        Weight::AnyPrec { .. } => unreachable!("built dense"),
    }
}

impl Model<CpuBackend> {
    /// Load the model in `dir` on the CPU with default options.
    pub fn load(dir: &Path) -> Result<Model> {
        Self::load_with(dir, &LoadOptions::default())
    }

    /// Load the model in `dir` on the CPU (see [`Model::load_on`]).
    pub fn load_with(dir: &Path, opts: &LoadOptions) -> Result<Model> {
        Self::load_on(CpuBackend, dir, opts)
    }

    /// Build the model from an opened Hugging Face checkpoint, on the CPU.
    pub fn from_checkpoint(config: ModelConfig, ck: &Checkpoint) -> Result<Model> {
        Self::from_checkpoint_on(CpuBackend, config, ck, None, None)
    }
}

impl<B: Backend> Model<B> {
    /// Load the model in `dir` onto `backend`: `config.json` plus either the
    /// any-precision weights file or the Hugging Face safetensors shards (or a GGUF file).
    pub fn load_on(backend: B, dir: &Path, opts: &LoadOptions) -> Result<Model<B>> {
        let config = ModelConfig::from_dir(dir)?;
        if anyprec::is_anyprec_dir(dir) {
            let path = dir.join(anyprec::ANYPREC_WEIGHTS);
            let ck = Checkpoint::open_file(&path)?;
            let info = AnyPrecInfo::from_metadata(ck.metadata(), &path)?;
            if info.architecture != config.arch.hf_name() {
                return Err(FormatError::invalid(
                    &path,
                    format!(
                        "quantized a {}, but config.json says {}",
                        info.architecture,
                        config.arch.hf_name()
                    ),
                )
                .into());
            }
            let keep = opts.max_bits.unwrap_or(info.max_bits);
            if keep < info.seed_bits || keep > info.max_bits {
                return Err(FormatError::invalid(
                    &path,
                    format!(
                        "cannot load at {keep} bits: the file holds {}..={} bits",
                        info.seed_bits, info.max_bits
                    ),
                )
                .into());
            }
            Self::from_checkpoint_on(
                backend,
                config,
                &ck,
                Some((info, keep)),
                opts.linear_max_bits.as_ref(),
            )
        } else {
            if opts.max_bits.is_some() || opts.linear_max_bits.is_some() {
                return Err(FormatError::invalid(dir, "a bit-width was requested, but this is not a dpllm any-precision model (run `dpllm quantize` first)").into());
            }
            let ck = Checkpoint::open(dir)?;
            Self::from_checkpoint_on(backend, config, &ck, None, None)
        }
    }

    fn from_checkpoint_on(
        backend: B,
        config: ModelConfig,
        ck: &Checkpoint,
        anyprec: Option<(AnyPrecInfo, u32)>,
        per_linear: Option<&HashMap<String, u32>>,
    ) -> Result<Model<B>> {
        config.check_layer_count(ck)?;
        let info = anyprec.as_ref().map(|(i, _)| i.clone());
        let ld = Loader {
            be: &backend,
            ck,
            anyprec,
            per_linear,
        };
        Self::build(&ld, backend.clone(), config, ck.dir().into(), info)
    }

    /// Assemble the model from `src`'s weights.
    pub(super) fn build(
        src: &dyn WeightSource<B>,
        backend: B,
        config: ModelConfig,
        dir: PathBuf,
        anyprec: Option<AnyPrecInfo>,
    ) -> Result<Model<B>> {
        let c = &config;
        let ld = src;
        let d = c.hidden_size;
        let embed_lin = ld.table("model.embed_tokens.weight", c.vocab_size, d)?;
        let embed = shared(&embed_lin);
        let mut blocks = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let n = |s: &str| format!("model.layers.{i}.{s}");
            let mut lin: HashMap<LinearKind, Linear<B>> = HashMap::new();
            for spec in c.block_linears(i) {
                lin.insert(spec.kind, ld.linear(&spec)?);
            }
            let mut take = |k: LinearKind| {
                lin.remove(&k)
                    .expect("layout lists every linear of the block")
            };
            let qkv = match c.block_linears(i)[0].kind {
                LinearKind::Qkv => QkvProj::Fused(take(LinearKind::Qkv)),
                _ => QkvProj::Separate {
                    q: take(LinearKind::Q),
                    k: take(LinearKind::K),
                    v: take(LinearKind::V),
                },
            };
            let o_proj = take(LinearKind::O);
            let gate_up = if c
                .block_linears(i)
                .iter()
                .any(|s| s.kind == LinearKind::GateUp)
            {
                GateUpProj::Fused(take(LinearKind::GateUp))
            } else {
                GateUpProj::Separate {
                    gate: take(LinearKind::Gate),
                    up: take(LinearKind::Up),
                }
            };
            let down_proj = take(LinearKind::Down);
            let qk_norm = if c.qk_norm {
                Some((
                    ld.vector(&n("self_attn.q_norm.weight"), c.head_dim)?,
                    ld.vector(&n("self_attn.k_norm.weight"), c.head_dim)?,
                ))
            } else {
                None
            };
            blocks.push(Block {
                attn_norm: ld.vector(&n("input_layernorm.weight"), d)?,
                qkv,
                qk_norm,
                o_proj,
                mlp_norm: ld.vector(&n("post_attention_layernorm.weight"), d)?,
                gate_up,
                down_proj,
            });
        }
        let lm_head = if c.tie_word_embeddings {
            embed_lin
        } else {
            ld.table("lm_head.weight", c.vocab_size, d)?
        };
        let rope = Rope::new(c);
        let rope_table = backend.upload(&rope.table(0, c.max_position_embeddings))?;
        Ok(Model {
            rope,
            rope_table,
            final_norm: ld.vector("model.norm.weight", d)?,
            embed,
            blocks,
            lm_head,
            dir,
            anyprec,
            config,
            backend,
        })
    }
}
