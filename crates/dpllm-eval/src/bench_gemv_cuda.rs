//! GEMV benchmark on a GPU: the bit-plane kernel at each precision and token
//! count against cuBLAS on f16 weights (what PyTorch runs at batch 1..8), both
//! as a fraction of the GPU's read bandwidth measured in the same run.

use dpllm_engine::backend::cuda::bitplane::{
    CudaAnyPrec, EstForm, GemvInput, GemvVariant, Tables, MAX_SPLITS, MAX_TILES_PER_BLOCK,
    MAX_TOKENS,
};
use dpllm_engine::backend::cuda::dense::CudaDenseF16;
use dpllm_engine::backend::cuda::{CudaBackend, CudaDevice};
use dpllm_engine::backend::AnyPrecHost;
use half::f16;
use serde::Serialize;

/// Settings of a GPU GEMV benchmark.
#[derive(Debug, Clone, Serialize)]
pub struct CudaGemvConfig {
    /// (rows, cols) of each weight matrix.
    pub shapes: Vec<(usize, usize)>,
    /// Precisions of the bit-plane weights.
    pub bits: Vec<u32>,
    /// Token counts (1..=8).
    pub tokens: Vec<usize>,
    /// Each case cycles through copies of its weights reading at least this many
    /// bytes per round, so the L2 cache cannot hold them.
    pub working_set_bytes: usize,
    /// Timed calls per case.
    pub calls: usize,
    /// Also time the kernel with these warps a block (empty: the default split only).
    pub warps: Vec<u32>,
    /// Also time the kernel with each row tile split over this many blocks
    /// (split-K), on the layers that can (fewer tiles than multiprocessors).
    pub splits: Vec<u32>,
    /// Also time the kernel with this many row tiles a block.
    pub tiles_per_block: Vec<u32>,
    /// Also time the kernel with these lookup tables, at the precisions that
    /// have them (empty: the built-in choice only).
    #[serde(serialize_with = "table_names")]
    pub tables: Vec<Tables>,
    /// Also time each variant on f32 rows, as a GEMV whose input no op split
    /// (the block splits them where they fit, else `split_x` first); the
    /// default cases read halves split beforehand, as the forward pass's
    /// linears do.
    pub rows: bool,
    /// Also time each variant on f32 rows split by a `split_x` launch where
    /// the block would split them itself.
    pub split_launch: bool,
}

/// What a timed GEMV reads: halves split beforehand (the forward pass), or
/// f32 rows split in the block (or by `split_x`), or f32 rows always split
/// by `split_x`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Input {
    Halves,
    Rows,
    RowsSplitLaunch,
}

impl Input {
    /// The inputs `cfg` asks for, halves first.
    fn wanted(cfg: &CudaGemvConfig) -> Vec<Input> {
        let extra = [
            (cfg.rows, Input::Rows),
            (cfg.split_launch, Input::RowsSplitLaunch),
        ];
        std::iter::once(Input::Halves)
            .chain(extra.into_iter().filter(|e| e.0).map(|e| e.1))
            .collect()
    }

    /// Variant `v` as this input runs it: split by a launch for `RowsSplitLaunch`.
    fn variant(self, v: GemvVariant) -> GemvVariant {
        GemvVariant {
            split_launch: self == Input::RowsSplitLaunch,
            ..v
        }
    }

    /// The case name of variant `v` on this input: "auto", "auto-rows", "auto-xs".
    fn name(self, v: GemvVariant) -> String {
        let name = self.variant(v).name();
        match self {
            Input::Rows => name + "-rows",
            Input::Halves | Input::RowsSplitLaunch => name,
        }
    }
}

/// The tables' names in the JSON (`["regs", "pairs"]`).
fn table_names<S: serde::Serializer>(t: &[Tables], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(t.iter().map(|t| t.name()))
}

/// The variants to time at `bits`: the default, then one per given warp
/// count, split-K split and kind of table that `bits` has, then one per
/// given count of tiles a block.
fn variants(
    (warps, splits, tiles): (&[u32], &[u32], &[u32]),
    tables: &[Tables],
    bits: u32,
) -> Vec<GemvVariant> {
    let split = warps.iter().map(|&w| GemvVariant {
        warps: Some(w),
        ..Default::default()
    });
    let split_k = splits.iter().map(|&k| GemvVariant {
        splits: Some(k),
        ..Default::default()
    });
    let tables = tables
        .iter()
        .filter(|t| t.available_at(bits))
        .map(|&t| GemvVariant {
            tables: Some(t),
            ..Default::default()
        });
    let tiles = tiles.iter().map(|&t| GemvVariant {
        tiles_per_block: Some(t),
        ..Default::default()
    });
    std::iter::once(GemvVariant::default())
        .chain(split)
        .chain(split_k)
        .chain(tables)
        .chain(tiles)
        .collect()
}

/// One timed case.
#[derive(Debug, Clone, Serialize)]
pub struct CudaGemvCase {
    /// Output features.
    pub rows: usize,
    /// Input features.
    pub cols: usize,
    /// "anyprec-4b", "f16 (cuBLAS)", or "select-3/4" (DP-LLM's in-kernel
    /// choice between 3 and 4 bits, forced to the variant's bits).
    pub weights: String,
    /// Tokens per call.
    pub tokens: usize,
    /// The bit-plane kernel's variant ([`GemvVariant::name`]); for a select
    /// case, the bits chosen ("4b").
    pub variant: Option<String>,
    /// Mean time per call over the timed calls, microseconds.
    pub us_per_call: f64,
    /// Weight bytes read per call.
    pub bytes: usize,
    /// Copies of the weights cycled through.
    pub copies: usize,
    /// bytes / time, GB/s.
    pub gbs: f64,
    /// gbs / the measured read bandwidth.
    pub fraction_of_bandwidth: f64,
    /// f16 time / this time (same shape and tokens).
    pub speedup_vs_f16: f64,
}

/// Results of a GPU GEMV benchmark.
#[derive(Debug, Clone, Serialize)]
pub struct CudaGemvBench {
    /// Settings used.
    pub config: CudaGemvConfig,
    /// The GPU (also the JSON's `device`: [`crate::report::write_json`]).
    pub backend: String,
    /// Device-to-device copy, bytes read plus written per second, GB/s.
    pub copy_gbs: f64,
    /// Read-only bandwidth (a sum over 1 GiB), GB/s: the cases' reference.
    pub read_gbs: f64,
    /// Every case.
    pub cases: Vec<CudaGemvCase>,
    /// Variants asked for that a layer could not launch, and why (their
    /// tables do not fit a block, for example).
    pub not_timed: Vec<String>,
}

/// Run the benchmark on GPU `ordinal`.
pub fn run(ordinal: usize, cfg: &CudaGemvConfig) -> anyhow::Result<CudaGemvBench> {
    if let Some(b) = cfg.bits.iter().find(|b| !(3..=8).contains(*b)) {
        anyhow::bail!("--bits {b} is out of range 3..=8");
    }
    if let Some(t) = cfg.tokens.iter().find(|t| !(1..=MAX_TOKENS).contains(*t)) {
        anyhow::bail!("--tokens {t} is out of range 1..={MAX_TOKENS}");
    }
    if let Some(w) = cfg.warps.iter().find(|w| !(1..=16).contains(*w)) {
        anyhow::bail!("--warps {w} is out of range 1..=16");
    }
    if let Some(k) = (cfg.splits.iter()).find(|k| !(1..=MAX_SPLITS).contains(*k)) {
        anyhow::bail!("--splits {k} is out of range 1..={MAX_SPLITS}");
    }
    let tiles_range = 1..=MAX_TILES_PER_BLOCK;
    if let Some(t) = (cfg.tiles_per_block.iter()).find(|t| !tiles_range.contains(*t)) {
        anyhow::bail!("--tiles-per-block {t} is out of range 1..={MAX_TILES_PER_BLOCK}");
    }
    if cfg.bits.is_empty() || cfg.tokens.is_empty() || cfg.shapes.is_empty() {
        anyhow::bail!("no --bits, --tokens or --shapes to time");
    }
    let dev = CudaDevice::new(ordinal)?;
    let (copy, read) = CudaBackend::on(dev.clone())?.bandwidth(1 << 30, 3)?;
    let s = dev.stream().clone();
    let copies_for = |bytes: usize| cfg.working_set_bytes.div_ceil(bytes.max(1)).max(1);
    let max_t = *cfg.tokens.iter().max().unwrap_or(&1);
    let (mut cases, mut not_timed) = (Vec::new(), Vec::new());
    for &(rows, cols) in &cfg.shapes {
        let xf: Vec<f32> = (0..max_t * cols)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
            .collect();
        let x32 = s.clone_htod(&xf)?;
        let x16 = s.clone_htod(&xf.iter().map(|&v| f16::from_f32(v)).collect::<Vec<_>>())?;
        let mut y32 = s.alloc_zeros::<f32>(max_t * rows)?;
        let mut y16 = s.alloc_zeros::<f16>(max_t * rows)?;
        let wf: Vec<f16> = (0..rows * cols)
            .map(|i| f16::from_f32(((i * 7919 % 2003) as f32 - 1001.0) / 1001.0 * 0.05))
            .collect();
        let first = CudaDenseF16::upload(&dev, rows, cols, &wf)?;
        drop(wf);
        let mut dense = vec![first];
        for _ in 1..copies_for(dense[0].bytes()) {
            let c = dense[0].replicate(&dev)?;
            dense.push(c);
        }
        let mut f16_us = Vec::new();
        for &t in &cfg.tokens {
            let mut i = 0;
            let ms = dev.time_ms(cfg.calls, || {
                i += 1;
                dense[i % dense.len()].forward(&x16, t, &mut y16)
            })?;
            f16_us.push((t, ms * 1e3));
            cases.push(case(
                rows,
                cols,
                "f16 (cuBLAS)",
                t,
                ms * 1e3,
                dense[0].bytes(),
                dense.len(),
                read,
                ms * 1e3,
            ));
        }
        drop(dense);
        let max_bits = *cfg.bits.iter().max().unwrap_or(&8);
        let host = AnyPrecHost::random(rows, cols, max_bits, 7);
        let first = CudaAnyPrec::upload(&dev, &host)?;
        drop(host);
        let mut qs = vec![first];
        for _ in 1..copies_for(qs[0].bytes_at(3)) {
            let c = qs[0].replicate()?;
            qs.push(c);
        }
        // The activations of each token count split once, outside the timing.
        let halves = (f16_us.iter())
            .map(|&(t, _)| qs[0].split(&x32.slice(..t * cols), t))
            .collect::<Result<Vec<_>, _>>()?;
        for &b in &cfg.bits {
            let nb = copies_for(qs[0].bytes_at(b)).min(qs.len());
            for (&(t, f16), xs) in f16_us.iter().zip(&halves) {
                let split_k = |v: &GemvVariant| v.splits.is_some_and(|k| k > 1);
                let sizes = (&cfg.warps[..], &cfg.splits[..], &cfg.tiles_per_block[..]);
                let runs = variants(sizes, &cfg.tables, b).into_iter();
                for v in runs.filter(|v| !split_k(v) || qs[0].can_split()) {
                    for input in Input::wanted(cfg) {
                        let mut i = 0;
                        let run = input.variant(v);
                        let ms = dev.time_ms(cfg.calls, || {
                            i += 1;
                            let q = &qs[i % nb];
                            match input {
                                Input::Halves => {
                                    let (h, mut y) = (xs.slice(..), y32.slice_mut(..));
                                    q.gemv_input(GemvInput::Halves(&h), t, b, &mut y, run, None)
                                }
                                Input::Rows | Input::RowsSplitLaunch => {
                                    q.gemv_with(&x32, t, b, &mut y32, run)
                                }
                            }
                        });
                        // A variant asked for that this layer cannot launch (its
                        // tables do not fit a block) is left out, and said so.
                        let ms = match ms {
                            Err(e) if v != GemvVariant::default() => {
                                let v = input.name(v);
                                not_timed
                                    .push(format!("{rows}x{cols} {b} bits {t} tokens {v}: {e}"));
                                continue;
                            }
                            r => r?,
                        };
                        let bytes = qs[0].bytes_at(b);
                        let name = format!("anyprec-{b}b");
                        let mut c = case(rows, cols, &name, t, ms * 1e3, bytes, nb, read, f16);
                        c.variant = Some(input.name(v));
                        cases.push(c);
                    }
                }
            }
        }
        // DP-LLM's in-kernel choice between b - 1 and b bits for one token,
        // forced each way (the estimate from a norm, as decode passes it):
        // against the plain GEMV at the chosen bits above, its cost.
        let Some(&(_, f16)) = f16_us.iter().find(|(t, _)| *t == 1) else {
            continue;
        };
        let norm = s.clone_htod(&[1.0f32])?;
        let (e, x) = (norm.slice(..), x32.slice(..cols));
        let one = qs[0].split(&x, 1)?;
        let h = one.slice(..);
        // Halves as decode passes them; rows where asked for.
        let inputs = [(GemvInput::Halves(&h), ""), (GemvInput::Rows(&x), "-rows")];
        let inputs = &inputs[..if cfg.rows { 2 } else { 1 }];
        for &b in &cfg.bits {
            let low = b - 1;
            if !qs[0].selects_in_kernel(low) {
                continue;
            }
            let nb = copies_for(qs[0].bytes_at(b)).min(qs.len());
            for ((chosen, thr), &(input, suffix)) in [(low, 1.0f32), (b, -1.0)]
                .into_iter()
                .flat_map(|c| inputs.iter().map(move |i| (c, i)))
            {
                let mut i = 0;
                let ms = dev.time_ms(cfg.calls, || {
                    i += 1;
                    let mut y = y32.slice_mut(..rows);
                    qs[i % nb].gemv_select(
                        input,
                        low,
                        (&e, EstForm::Norm),
                        (0.0, 0.0, thr),
                        None,
                        &mut y,
                    )
                })?;
                let (bytes, name) = (qs[0].bytes_at(chosen), format!("select-{low}/{b}"));
                let mut c = case(rows, cols, &name, 1, ms * 1e3, bytes, nb, read, f16);
                c.variant = Some(format!("{chosen}b{suffix}"));
                cases.push(c);
            }
        }
    }
    Ok(CudaGemvBench {
        config: cfg.clone(),
        backend: dev.describe(),
        copy_gbs: copy,
        read_gbs: read,
        cases,
        not_timed,
    })
}

#[allow(clippy::too_many_arguments)]
fn case(
    rows: usize,
    cols: usize,
    weights: &str,
    tokens: usize,
    us: f64,
    bytes: usize,
    copies: usize,
    read_gbs: f64,
    f16_us: f64,
) -> CudaGemvCase {
    let gbs = bytes as f64 / (us * 1e-6) / 1e9;
    CudaGemvCase {
        rows,
        cols,
        weights: weights.to_string(),
        tokens,
        variant: None,
        us_per_call: us,
        bytes,
        copies,
        gbs,
        fraction_of_bandwidth: gbs / read_gbs,
        speedup_vs_f16: f16_us / us,
    }
}

impl CudaGemvBench {
    /// A human-readable table with units.
    pub fn table(&self) -> String {
        let mut out = format!(
            "{}: read {:.0} GB/s, device-to-device copy {:.0} GB/s (read + write), \
             weights cycled over >= {:.0} MB\n",
            self.backend,
            self.read_gbs,
            self.copy_gbs,
            self.config.working_set_bytes as f64 / 1e6
        );
        out.push_str(&format!(
            "{:>13}  {:<13} {:>6} {:<8} {:>11} {:>11} {:>9} {:>8} {:>8}\n",
            "shape",
            "weights",
            "tokens",
            "kernel",
            "time (us)",
            "bytes (MB)",
            "GB/s",
            "% of BW",
            "vs f16"
        ));
        for c in &self.cases {
            out.push_str(&format!(
                "{:>13}  {:<13} {:>6} {:<8} {:>11.2} {:>11.3} {:>9.1} {:>7.1}% {:>7.2}x\n",
                format!("{}x{}", c.rows, c.cols),
                c.weights,
                c.tokens,
                c.variant.as_deref().unwrap_or("-"),
                c.us_per_call,
                c.bytes as f64 / 1e6,
                c.gbs,
                100.0 * c.fraction_of_bandwidth,
                c.speedup_vs_f16
            ));
        }
        for n in &self.not_timed {
            out.push_str(&format!("not timed: {n}\n"));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variants_and_table() {
        let v = variants((&[4, 16], &[2], &[2]), &[], 3);
        assert_eq!(v.len(), 5);
        assert!(v.iter().any(|v| v.name() == "auto-t2"));
        assert!(v.iter().any(|v| v.name() == "auto-k2"));
        assert!(v.iter().any(|v| v.name() == "w16"));
        assert_eq!(
            variants((&[], &[], &[]), &[], 5),
            vec![GemvVariant::default()]
        );
        // Only the tables a precision has.
        let all = Tables::ALL;
        let names = |b| {
            variants((&[], &[], &[]), &all, b)
                .iter()
                .map(|v| v.name())
                .collect::<Vec<_>>()
        };
        assert_eq!(names(3), ["auto", "regs", "pairs", "half-pairs"]);
        assert_eq!(names(4), ["auto", "pairs", "entries", "half-pairs"]);
        assert_eq!(names(8), ["auto", "entries"]);
        let mut cfg = CudaGemvConfig {
            shapes: vec![(64, 128)],
            bits: vec![4],
            tokens: vec![1],
            working_set_bytes: 1 << 20,
            calls: 1,
            warps: vec![],
            splits: vec![],
            tiles_per_block: vec![],
            tables: vec![],
            rows: false,
            split_launch: false,
        };
        let names = |cfg: &CudaGemvConfig| {
            (Input::wanted(cfg).iter())
                .map(|i| i.name(GemvVariant::default()))
                .collect::<Vec<_>>()
        };
        assert_eq!(names(&cfg), ["auto"]);
        (cfg.rows, cfg.split_launch) = (true, true);
        assert_eq!(names(&cfg), ["auto", "auto-rows", "auto-xs"]);
        cfg.rows = false;
        assert_eq!(names(&cfg), ["auto", "auto-xs"]);
        let bench = CudaGemvBench {
            config: cfg,
            backend: "cuda:0 (test)".into(),
            copy_gbs: 1000.0,
            read_gbs: 1000.0,
            cases: vec![
                case(64, 128, "f16 (cuBLAS)", 1, 2.0, 16384, 1, 1000.0, 2.0),
                CudaGemvCase {
                    variant: Some("w8".into()),
                    ..case(64, 128, "anyprec-4b", 1, 1.0, 4096, 1, 1000.0, 2.0)
                },
            ],
            not_timed: vec!["64x128 4 bits 1 tokens auto-t4: too big".into()],
        };
        let t = bench.table();
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 5, "{t}");
        assert_eq!(
            lines[4],
            "not timed: 64x128 4 bits 1 tokens auto-t4: too big"
        );
        // Columns line up: every row as wide as the header.
        assert!(lines[2..4].iter().all(|l| l.len() == lines[1].len()), "{t}");
        // 4096 bytes in 1 us: 4.1 GB/s, 0.4 % of 1000 GB/s, 2x the f16 time.
        assert!(
            lines[3].contains("w8") && lines[3].contains("4.1") && lines[3].contains("2.00x"),
            "{t}"
        );
    }
}
