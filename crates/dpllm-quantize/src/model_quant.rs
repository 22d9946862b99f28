//! Quantize a Hugging Face checkpoint into a dpllm any-precision model directory.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use dpllm_format::anyprec::{self, AnyPrecInfo, STORED_BITS};
use dpllm_format::st_writer::{write_safetensors, TensorSpec};
use dpllm_format::{check_output, Checkpoint, LinearSpec, ModelConfig, OutputKind, StagingDir};
use half::f16;
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;

use crate::bitplane::pack_row;
use crate::upscale::{quantize_row, weighted_error};

/// Files copied unchanged from the source directory when present.
const SIDE_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
];

/// Settings of a quantization run.
#[derive(Debug, Clone)]
pub struct QuantizeOptions {
    /// Seed precision (the k-means step), default 3.
    pub seed_bits: u32,
    /// Sensitivity file (from `dpllm sensitivity`); uniform weights when absent.
    pub sensitivity: Option<PathBuf>,
    /// Show a progress bar.
    pub progress: bool,
    /// Replace an existing output directory (only one dpllm wrote: see `dpllm_format::output`).
    pub overwrite: bool,
    /// How the sensitivities were obtained, for the provenance metadata (default: the file's path).
    pub sensitivity_source: Option<String>,
    /// What produced this model (stored in its manifest; caches compare it).
    pub inputs: serde_json::Value,
}

impl Default for QuantizeOptions {
    fn default() -> Self {
        QuantizeOptions {
            seed_bits: 3,
            sensitivity: None,
            progress: false,
            overwrite: false,
            sensitivity_source: None,
            inputs: serde_json::Value::Null,
        }
    }
}

/// Summary of a quantization run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct QuantizeReport {
    /// Quantized linears.
    pub linears: usize,
    /// Quantized parameters.
    pub params: usize,
    /// Wall time.
    pub seconds: f64,
    /// Size of the weights file.
    pub bytes: u64,
    /// Per linear: Σ F·(W − Q_b(W))² for b = seed..=8.
    pub errors: Vec<(String, Vec<f64>)>,
}

/// One quantized linear, held while its tensors are written.
struct Quantized {
    planes: Vec<u32>,
    luts: Vec<Vec<f16>>,
    errors: Vec<f64>,
}

fn quantize_linear(
    ck: &Checkpoint,
    sens: Option<&Checkpoint>,
    s: &LinearSpec,
    seed_bits: u32,
    bar: &ProgressBar,
) -> Result<Quantized> {
    // Finite: Checkpoint::tensor refuses NaN / inf, naming the element.
    let w = ck.tensor_f32(&s.weight_name(), &[s.rows, s.cols])?;
    let f = match sens {
        Some(sc) => sc
            .tensor_f32(&s.weight_name(), &[s.rows, s.cols])
            .context("sensitivity file does not match the model")?,
        None => vec![1.0; s.rows * s.cols],
    };
    let words = anyprec::words_per_row(s.cols);
    let nb = (STORED_BITS - seed_bits + 1) as usize;
    // Per row: its planes' words, its LUT at every precision, its errors.
    type Row = (Vec<u32>, Vec<Vec<f16>>, Vec<f64>);
    let rows: Vec<Row> = (0..s.rows)
        .into_par_iter()
        .map(|r| {
            let (wr, fr) = (
                &w[r * s.cols..(r + 1) * s.cols],
                &f[r * s.cols..(r + 1) * s.cols],
            );
            let q = quantize_row(wr, fr, seed_bits);
            let mut planes = vec![0u32; 8 * words];
            pack_row(&q.indices, &mut planes);
            let luts: Vec<Vec<f16>> = q
                .luts
                .iter()
                .map(|l| l.iter().map(|&v| f16::from_f32(v)).collect())
                .collect();
            // Errors of what is deployed: the f16-rounded centroids.
            let errs = (0..nb)
                .map(|i| {
                    let b = seed_bits + i as u32;
                    let deq: Vec<f32> = q
                        .indices
                        .iter()
                        .map(|&ix| luts[i][(ix >> (8 - b)) as usize].to_f32())
                        .collect();
                    weighted_error(wr, fr, &deq)
                })
                .collect();
            bar.inc(1);
            (planes, luts, errs)
        })
        .collect();
    // Plane-major: plane j of every row, then plane j+1 (docs/format.md).
    let mut out = Quantized {
        planes: vec![0; 8 * s.rows * words],
        luts: vec![Vec::new(); nb],
        errors: vec![0.0; nb],
    };
    for (r, (p, l, e)) in rows.into_iter().enumerate() {
        for (j, plane) in p.chunks(words).enumerate() {
            out.planes[(j * s.rows + r) * words..(j * s.rows + r + 1) * words]
                .copy_from_slice(plane);
        }
        for i in 0..nb {
            out.luts[i].extend(&l[i]);
            out.errors[i] += e[i];
        }
    }
    Ok(out)
}

/// What the i-th output tensor is.
enum Source {
    Copy(String),
    Planes(usize),
    Lut(usize, usize),
    Errors(usize),
    /// The bytes of a matrix kept in 8-bit blocks.
    Q8Quants(std::sync::Arc<dpllm_format::Q8Matrix>),
    /// Its block scales.
    Q8Scales(std::sync::Arc<dpllm_format::Q8Matrix>),
}

fn dtype_name(d: safetensors::Dtype) -> Result<&'static str> {
    Ok(match d {
        safetensors::Dtype::F32 => "F32",
        safetensors::Dtype::F16 => "F16",
        safetensors::Dtype::BF16 => "BF16",
        safetensors::Dtype::I64 => "I64",
        safetensors::Dtype::I32 => "I32",
        safetensors::Dtype::U8 => "U8",
        other => bail!("cannot copy tensor dtype {other:?}"),
    })
}

/// Largest magnitude an f16 centroid table can hold.
const LUT_MAX: f32 = 65504.0;

/// A source checkpoint that passed [`check_source`].
pub struct CheckedSource {
    dir: PathBuf,
    cfg: ModelConfig,
    ck: Checkpoint,
    seed_bits: u32,
}

/// Check the source before any long work: a supported config, no blocks beyond
/// its layer count, every float tensor finite, and every quantized weight within
/// the range of the f16 centroid tables (a centroid is a weighted mean of
/// weights, so it is within range when every weight is).
pub fn check_source(src: &Path, opts: &QuantizeOptions) -> Result<CheckedSource> {
    if !(3..=4).contains(&opts.seed_bits) {
        bail!("--seed-bits {} is out of range: the seed precision must be 3 or 4 bits (models run at 3..=8 bits)", opts.seed_bits);
    }
    if anyprec::is_anyprec_dir(src) {
        bail!("{} is already an any-precision model", src.display());
    }
    let cfg = ModelConfig::from_dir(src)?;
    let ck = Checkpoint::open(src)?;
    cfg.check_layer_count(&ck)?;
    let linears: BTreeMap<String, ()> = cfg
        .linears()
        .iter()
        .map(|s| (s.weight_name(), ()))
        .collect();
    for (name, info) in ck.tensors() {
        if dpllm_format::checkpoint::float_dtype(info.dtype).is_none() {
            continue;
        }
        let t = ck.tensor(name, &info.shape)?;
        if linears.contains_key(name) {
            let max = t.to_f32().iter().fold(0f32, |m, v| m.max(v.abs()));
            if max > LUT_MAX {
                bail!(
                    "{name}: a weight of magnitude {max:e} is beyond the range of the f16 centroid tables (±{LUT_MAX}); dpllm cannot quantize this checkpoint"
                );
            }
        }
    }
    Ok(CheckedSource {
        dir: src.to_path_buf(),
        cfg,
        ck,
        seed_bits: opts.seed_bits,
    })
}

/// Quantize the checkpoint in `src` into a new any-precision model directory `out`
/// (checked first: never an input, replaced only when dpllm wrote it and `overwrite`).
pub fn quantize_model(src: &Path, out: &Path, opts: &QuantizeOptions) -> Result<QuantizeReport> {
    let mut inputs: Vec<&Path> = vec![src];
    inputs.extend(opts.sensitivity.as_deref());
    check_output(out, OutputKind::AnyPrecModel, &inputs, opts.overwrite)?;
    let source = check_source(src, opts)?;
    let mut staging = StagingDir::new(out, OutputKind::AnyPrecModel, opts.overwrite)?;
    let report = quantize_into(&source, &staging, opts)?;
    staging.set_inputs(opts.inputs.clone());
    staging
        .publish()
        .with_context(|| format!("cannot move the result to {}", out.display()))?;
    Ok(report)
}

/// Quantize the checked `source` into `staging` (with `opts.seed_bits`, which must
/// be the seed it was checked for) and load the result back (the same loader every
/// later run uses) before it may be published.
pub fn quantize_into(
    source: &CheckedSource,
    staging: &StagingDir,
    opts: &QuantizeOptions,
) -> Result<QuantizeReport> {
    ensure!(
        opts.seed_bits == source.seed_bits,
        "the source was checked for a {}-bit seed, not {}",
        source.seed_bits,
        opts.seed_bits
    );
    let (src, cfg, ck) = (source.dir.as_path(), &source.cfg, &source.ck);
    let sens = opts
        .sensitivity
        .as_deref()
        .map(Checkpoint::open_file)
        .transpose()
        .context("cannot open the sensitivity file")?;
    let linears = cfg.linears();
    if let Some(sc) = &sens {
        for s in &linears {
            let info = sc
                .info(&s.weight_name())
                .with_context(|| format!("sensitivity file has no {}", s.weight_name()))?;
            if info.shape != [s.rows, s.cols] {
                bail!(
                    "sensitivity {} has shape {:?}, the model {:?}",
                    s.weight_name(),
                    info.shape,
                    [s.rows, s.cols]
                );
            }
        }
    }
    let seed = opts.seed_bits;
    let mut specs = Vec::new();
    let mut sources = Vec::new();
    let quantized: BTreeMap<String, usize> = linears
        .iter()
        .enumerate()
        .map(|(i, s)| (s.weight_name(), i))
        .collect();
    for (name, info) in ck.tensors() {
        match quantized.get(name) {
            Some(&li) => {
                let s = &linears[li];
                specs.push(TensorSpec {
                    name: anyprec::planes_name(&s.prefix),
                    dtype: "U32",
                    shape: vec![8, s.rows, anyprec::words_per_row(s.cols)],
                });
                sources.push(Source::Planes(li));
                for b in seed..=STORED_BITS {
                    specs.push(TensorSpec {
                        name: anyprec::lut_name(&s.prefix, b),
                        dtype: "F16",
                        shape: vec![s.rows, 1 << b],
                    });
                    sources.push(Source::Lut(li, (b - seed) as usize));
                }
                specs.push(TensorSpec {
                    name: anyprec::sq_err_name(&s.prefix),
                    dtype: "F32",
                    shape: vec![(STORED_BITS - seed + 1) as usize],
                });
                sources.push(Source::Errors(li));
            }
            None => {
                // A matrix stored in 8-bit blocks (a GGUF Q8_0 output layer) stays so, exactly.
                let q8 = match info.shape[..] {
                    [r, c] => ck.tensor_q8_0(name, r, c)?,
                    _ => None,
                };
                match q8 {
                    Some(q) => {
                        let q = std::sync::Arc::new(q);
                        specs.push(TensorSpec {
                            name: format!("{name}.q8_0"),
                            dtype: "I8",
                            shape: vec![q.rows, q.cols],
                        });
                        sources.push(Source::Q8Quants(q.clone()));
                        specs.push(TensorSpec {
                            name: format!("{name}.q8_0_scales"),
                            dtype: "F16",
                            shape: vec![q.rows, q.cols / dpllm_format::q8::Q8_BLOCK],
                        });
                        sources.push(Source::Q8Scales(q));
                    }
                    None => {
                        specs.push(TensorSpec {
                            name: name.to_string(),
                            dtype: dtype_name(info.dtype)?,
                            shape: info.shape.clone(),
                        });
                        sources.push(Source::Copy(name.to_string()));
                    }
                }
            }
        }
    }
    let missing: Vec<&str> = linears
        .iter()
        .filter(|s| !ck.contains(&s.weight_name()))
        .map(|s| s.prefix.as_str())
        .collect();
    if let Some(m) = missing.first() {
        bail!("checkpoint {} has no weight for {m}", src.display());
    }
    let mut provenance = BTreeMap::new();
    provenance.insert("source".to_string(), src.display().to_string());
    provenance.insert(
        "sensitivity".to_string(),
        opts.sensitivity_source.clone().unwrap_or_else(|| {
            opts.sensitivity
                .as_ref()
                .map_or("none (uniform weights)".into(), |p| p.display().to_string())
        }),
    );
    let info = AnyPrecInfo {
        version: anyprec::FORMAT_VERSION,
        seed_bits: seed,
        max_bits: STORED_BITS,
        architecture: cfg.arch.hf_name().into(),
        provenance,
    };

    // Everything goes to the staging directory, published by the caller.
    let tmp = staging.path();
    let report = {
        match ck.gguf() {
            // A GGUF source carries its config and tokenizer as metadata: write them out as files.
            Some(g) => {
                let (config, _) = dpllm_format::gguf::model::config(g)?;
                let (tokenizer, tokenizer_config) = dpllm_format::gguf::model::tokenizer_files(g)?;
                for (name, v) in [
                    ("config.json", config),
                    ("tokenizer.json", tokenizer),
                    ("tokenizer_config.json", tokenizer_config),
                ] {
                    let p = tmp.join(name);
                    std::fs::write(&p, serde_json::to_string_pretty(&v)?)
                        .with_context(|| format!("cannot write {}", p.display()))?;
                }
            }
            None => {
                for f in SIDE_FILES {
                    let p = src.join(f);
                    if p.exists() {
                        std::fs::copy(&p, tmp.join(f))
                            .with_context(|| format!("cannot copy {}", p.display()))?;
                    }
                }
            }
        }
        let total_rows: usize = linears.iter().map(|s| s.rows).sum();
        let bar = if opts.progress {
            ProgressBar::new(total_rows as u64)
        } else {
            ProgressBar::hidden()
        };
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} quantize [{bar:30}] {pos}/{len} rows {msg} ({eta} left)",
            )
            .unwrap()
            .progress_chars("=> "),
        );
        let t0 = Instant::now();
        let mut current: Option<(usize, Quantized)> = None;
        let mut errors = Vec::new();
        let weights = tmp.join(anyprec::ANYPREC_WEIGHTS);
        write_safetensors(
            &weights,
            &specs,
            &info.to_metadata(),
            |i, w: &mut dyn Write| {
                let q = |li: usize, cur: &mut Option<(usize, Quantized)>| -> std::io::Result<()> {
                    if cur.as_ref().map(|c| c.0) != Some(li) {
                        bar.set_message(linears[li].prefix.clone());
                        let qz = quantize_linear(ck, sens.as_ref(), &linears[li], seed, &bar)
                            .map_err(|e| std::io::Error::other(format!("{e:#}")))?;
                        *cur = Some((li, qz));
                    }
                    Ok(())
                };
                match &sources[i] {
                    Source::Copy(name) => {
                        w.write_all(ck.raw(name).map_err(std::io::Error::other)?.1)
                    }
                    Source::Q8Quants(q) => {
                        w.write_all(&q.quants.iter().map(|&v| v as u8).collect::<Vec<u8>>())
                    }
                    Source::Q8Scales(q) => w.write_all(
                        &q.scales
                            .iter()
                            .flat_map(|v| v.to_bits().to_le_bytes())
                            .collect::<Vec<u8>>(),
                    ),
                    Source::Planes(li) => {
                        q(*li, &mut current)?;
                        let qz = &current.as_ref().unwrap().1;
                        let bytes: Vec<u8> =
                            qz.planes.iter().flat_map(|v| v.to_le_bytes()).collect();
                        w.write_all(&bytes)
                    }
                    Source::Lut(li, k) => {
                        q(*li, &mut current)?;
                        let bytes: Vec<u8> = current.as_ref().unwrap().1.luts[*k]
                            .iter()
                            .flat_map(|v| v.to_bits().to_le_bytes())
                            .collect();
                        w.write_all(&bytes)
                    }
                    Source::Errors(li) => {
                        q(*li, &mut current)?;
                        let e = &current.as_ref().unwrap().1.errors;
                        errors.push((linears[*li].prefix.clone(), e.clone()));
                        let bytes: Vec<u8> =
                            e.iter().flat_map(|v| (*v as f32).to_le_bytes()).collect();
                        w.write_all(&bytes)
                    }
                }
            },
        )?;
        bar.finish_and_clear();
        QuantizeReport {
            linears: linears.len(),
            params: linears.iter().map(LinearSpec::size).sum(),
            seconds: t0.elapsed().as_secs_f64(),
            bytes: std::fs::metadata(&weights)?.len(),
            errors,
        }
    };
    verify_written(src, tmp)?;
    Ok(report)
}

/// Load the written model back at its highest precision (and its tokenizer), as any later run would.
fn verify_written(src: &Path, dir: &Path) -> Result<()> {
    dpllm_engine::Model::load(dir)
        .context("the quantized model does not load back (nothing was published)")?;
    if src.join("tokenizer.json").is_file() || dpllm_format::gguf::is_gguf(src) {
        let cfg = ModelConfig::from_dir(dir)?;
        dpllm_engine::tokenizer::TextTokenizer::from_dir(dir, cfg.bos_token_id, &cfg.eos_token_ids)
            .context("the quantized model's tokenizer does not load back")?;
    }
    Ok(())
}
