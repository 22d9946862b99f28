//! A backend's ops against plain reference implementations on fresh random
//! inputs: every backend's tests call [`check`] (the CPU backend's below, the
//! CUDA backend's on a GPU machine).

use std::sync::Arc;

use dpllm_format::{Q8Matrix, TensorData};
use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{AnyPrecHost, AttnShape, Backend, DenseHost, EstInput, Estimator, InputNorms, SumSq};
use crate::sampler::Draw;

fn rand_vec(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// Max |a − b| over two equal-length slices, or an error naming `what`.
fn close(what: &str, got: &[f32], want: &[f64], tol: f64) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!("{what}: {} values, want {}", got.len(), want.len()));
    }
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let within = (*g as f64 - w)
            .abs()
            .partial_cmp(&(tol * (1.0 + w.abs())))
            .is_some_and(|o| o.is_le());
        if !within {
            return Err(format!("{what}: element {i} is {g}, want {w}"));
        }
    }
    Ok(())
}

/// Sums of squares a kernel left (`sums`, for `n` tokens) against the rows
/// they stand for (`rows`, [n × width] as computed by the reference): each
/// token's parts total its row's squared norm.
fn sums_match<B: Backend>(
    be: &B,
    what: &str,
    sums: SumSq<B>,
    rows: &[f64],
    n: usize,
) -> Result<(), String> {
    let got = be.download(sums.sums).map_err(|e| e.to_string())?;
    if sums.parts == 0 || got.len() != n * sums.parts {
        return Err(format!(
            "{what}: {} sums in parts of {}",
            got.len(),
            sums.parts
        ));
    }
    let totals: Vec<f32> = (got.chunks(sums.parts))
        .map(|p| p.iter().map(|&v| v as f64).sum::<f64>() as f32)
        .collect();
    let want: Vec<f64> = (rows.chunks(rows.len() / n))
        .map(|r| r.iter().map(|v| v * v).sum())
        .collect();
    close(what, &totals, &want, 1e-5)
}

/// Whether token `t` is the draw `d` of [`Backend::sample_rows`] from `row`:
/// on the host's candidates (every token in index order, or the top-k and
/// top-p ones in descending order of logit), in exact (f64) arithmetic, the
/// token's span of the cumulative mass holds u · total within 1e-5 of the
/// total (the rounding of f32 sums in any order), for a top-p cut anywhere
/// within that rounding of its share.
pub fn drawn_within_rounding(row: &[f32], d: Draw, t: u32) -> Result<(), String> {
    let n = row.len();
    let scaled: Vec<f32> = row.iter().map(|&l| l * d.inv_temperature).collect();
    let mut order: Vec<usize> = (0..n).collect();
    if d.filters(n) {
        order.sort_by(|&a, &b| scaled[b].total_cmp(&scaled[a]).then(a.cmp(&b)));
        if d.top_k > 0 {
            order.truncate(d.top_k as usize);
        }
    }
    let max = scaled.iter().map(|&s| s as f64).fold(f64::MIN, f64::max);
    let cum: Vec<f64> = order
        .iter()
        .scan(0.0, |c, &i| {
            *c += (scaled[i] as f64 - max).exp();
            Some(*c)
        })
        .collect();
    let Some(q) = order.iter().position(|&i| i == t as usize) else {
        return Err(format!("drew {t}, not one of {} candidates", order.len()));
    };
    // Top-p alone: the candidates are every token, so the total is the vocabulary's.
    let total = cum.last().copied().unwrap_or(0.0);
    let slack = 1e-5 * total;
    let first_reaching = |x: f64| {
        cum.iter()
            .position(|&c| c >= x)
            .map_or(cum.len(), |j| j + 1)
    };
    let keeps = match d.top_p < 1.0 {
        true => {
            let share = d.top_p as f64 * total;
            first_reaching(share - slack).max(1)..=first_reaching(share + slack)
        }
        false => cum.len()..=cum.len(),
    };
    let before = if q == 0 { 0.0 } else { cum[q - 1] };
    let fits = |keep: usize| {
        let x = d.uniform as f64 * cum[keep - 1];
        q < keep && before <= x + slack && cum[q] >= x - slack
    };
    if keeps.clone().any(fits) {
        return Ok(());
    }
    Err(format!(
        "drew {t} (mass {before}..{} of {total}), want the draw at {} of the first {keeps:?} candidates",
        cum[q], d.uniform
    ))
}

/// Quantized GEMVs may round their operands: each weight and activation to
/// within this fraction of the largest magnitude in its row (f16 activations
/// round to 2^-12 of their own magnitude; the CPU's 16-bit fixed point to 2^-16
/// of its group's largest).
const OPERAND_ROUNDING: f64 = 1.0 / 4096.0;

/// Like [`close`] for y = x·Wᵀ, allowing on top the error of operands rounded
/// by [`OPERAND_ROUNDING`]: Σ_c |w|·δx + |x|·δw + δw·δx per output.
fn close_rounded(
    what: &str,
    got: &[f32],
    w: &[f32],
    x: &[f32],
    (rows, cols, n): (usize, usize, usize),
    bias: Option<&[f32]>,
) -> Result<(), String> {
    let want = matmul_ref(w, rows, cols, x, n, bias);
    if got.len() != want.len() {
        return Err(format!("{what}: {} values, want {}", got.len(), want.len()));
    }
    let max_abs = |v: &[f32]| v.iter().fold(0f64, |m, a| m.max(a.abs() as f64));
    for t in 0..n {
        let xt = &x[t * cols..(t + 1) * cols];
        let dx = OPERAND_ROUNDING * max_abs(xt);
        for r in 0..rows {
            let wr = &w[r * cols..(r + 1) * cols];
            let dw = OPERAND_ROUNDING * max_abs(wr);
            let bound: f64 = wr
                .iter()
                .zip(xt)
                .map(|(&w, &x)| w.abs() as f64 * dx + x.abs() as f64 * dw + dw * dx)
                .sum();
            let (g, wv) = (got[t * rows + r] as f64, want[t * rows + r]);
            if (g - wv).abs() > 1e-4 * (1.0 + wv.abs()) + bound || g.is_nan() {
                return Err(format!(
                    "{what}: token {t} row {r} is {g}, want {wv} (allowing {bound:.2e} for rounded operands)"
                ));
            }
        }
    }
    Ok(())
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// y = x·Wᵀ (+ b) in f64.
fn matmul_ref(
    w: &[f32],
    rows: usize,
    cols: usize,
    x: &[f32],
    n: usize,
    bias: Option<&[f32]>,
) -> Vec<f64> {
    let mut y = vec![0f64; n * rows];
    for t in 0..n {
        for r in 0..rows {
            let dot: f64 = (0..cols)
                .map(|c| w[r * cols + c] as f64 * x[t * cols + c] as f64)
                .sum();
            y[t * rows + r] = dot + bias.map_or(0.0, |b| b[r] as f64);
        }
    }
    y
}

/// The weight an any-precision layer means at `bits`, read bit by bit.
fn dequant_ref(h: &AnyPrecHost, bits: u32) -> Vec<f32> {
    let words = h.cols.div_ceil(32);
    let stride = h.rows * words;
    let lut = &h.luts[(bits - h.seed_bits) as usize];
    let mut w = vec![0f32; h.rows * h.cols];
    for r in 0..h.rows {
        for c in 0..h.cols {
            let mut idx = 0usize;
            for j in 0..bits as usize {
                let word = h.planes[j * stride + r * words + c / 32];
                idx |= (((word >> (c % 32)) & 1) as usize) << (bits as usize - 1 - j);
            }
            w[r * h.cols + c] = lut[(r << bits) + idx].to_f32();
        }
    }
    w
}

/// [`AnyPrecHost::random`] at precisions 3..=8, with a random bias when asked.
fn random_anyprec(rng: &mut StdRng, rows: usize, cols: usize, bias: bool) -> AnyPrecHost {
    let mut h = AnyPrecHost::random(rows, cols, 8, rng.random());
    h.bias = bias.then(|| rand_vec(rng, rows));
    h
}

/// Run every op of `be` on random inputs and compare with the references;
/// the error names the op and the first wrong element.
pub fn check<B: Backend>(be: &B, seed: u64) -> Result<(), String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let e = |x: crate::EngineError| x.to_string();
    let (n, d) = (5usize, 48usize);

    // Elementwise ops, norms, copies.
    let (x, y) = (rand_vec(&mut rng, n * d), rand_vec(&mut rng, n * d));
    let w: Vec<f32> = (0..d).map(|_| rng.random_range(0.5..1.5)).collect();
    let (bx, by, bw) = (
        be.upload(&x).map_err(e)?,
        be.upload(&y).map_err(e)?,
        be.upload(&w).map_err(e)?,
    );
    let norm_ref = |x: &[f32], w: &[f32]| -> Vec<f64> {
        x.chunks(w.len())
            .flat_map(|r| {
                let inv = 1.0
                    / (r.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / r.len() as f64 + 1e-5)
                        .sqrt();
                r.iter()
                    .zip(w)
                    .map(move |(v, g)| *v as f64 * inv * *g as f64)
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    let mut out = be.zeros(n * d).map_err(e)?;
    be.rms_norm(&bx, &bw, 1e-5, &mut out);
    close(
        "rms_norm",
        &be.download(out).map_err(e)?,
        &norm_ref(&x, &w),
        1e-5,
    )?;
    let mut inplace = be.upload(&x).map_err(e)?;
    be.rms_norm_inplace(&mut inplace, &be.upload(&w[..8]).map_err(e)?, 1e-5);
    close(
        "rms_norm_inplace",
        &be.download(inplace).map_err(e)?,
        &norm_ref(&x, &w[..8]),
        1e-5,
    )?;
    let mut h = be.upload(&x).map_err(e)?;
    be.add(&mut h, &by);
    close(
        "add",
        &be.download(h).map_err(e)?,
        &x.iter()
            .zip(&y)
            .map(|(a, b)| *a as f64 + *b as f64)
            .collect::<Vec<_>>(),
        1e-6,
    )?;
    let mut g = be.upload(&x).map_err(e)?;
    be.swiglu(&mut g, &by, n);
    let silu = |v: f64| v / (1.0 + (-v).exp());
    let swiglu_ref: Vec<f64> = (x.iter().zip(&y))
        .map(|(a, b)| silu(*a as f64) * *b as f64)
        .collect();
    close("swiglu", &be.download(g).map_err(e)?, &swiglu_ref, 1e-5)?;
    // The same with the output rows' sums of squares where the backend leaves them.
    let mut g = be.upload(&x).map_err(e)?;
    let sums = be.swiglu_sumsq(&mut g, &by, n).map_err(e)?;
    close(
        "swiglu_sumsq",
        &be.download(g).map_err(e)?,
        &swiglu_ref,
        1e-5,
    )?;
    if let Some(sums) = sums {
        sums_match(be, "swiglu_sumsq: sums of squares", sums, &swiglu_ref, n)?;
    }
    let mut c = be.zeros(0).map_err(e)?;
    be.copy(&bx, &mut c);
    close("copy", &be.download(c).map_err(e)?, &f64s(&x), 0.0)?;
    close(
        "rows",
        &be.download(be.rows(&bx, d, 2, 2).map_err(e)?).map_err(e)?,
        &f64s(&x[2 * d..4 * d]),
        0.0,
    )?;
    let (mut p1, mut p2) = (be.zeros(n * 16).map_err(e)?, be.zeros(n * 32).map_err(e)?);
    be.split_columns(&bx, n, &mut [&mut p1, &mut p2]);
    let want: Vec<f64> = x.chunks(d).flat_map(|r| f64s(&r[16..])).collect();
    close("split_columns", &be.download(p2).map_err(e)?, &want, 0.0)?;
    // Deferred checks: each slot keeps the first bad token it was shown.
    let (mut at3, mut at1) = (x.clone(), x.clone());
    at3[3 * d + 5] = f32::INFINITY;
    at1[d + 40] = f32::NEG_INFINITY;
    let (at3, at1) = (be.upload(&at3).map_err(e)?, be.upload(&at1).map_err(e)?);
    let mut flags = be.upload(&[f32::INFINITY; 3]).map_err(e)?;
    be.flag_non_finite(&at3, d, &mut flags, 0);
    be.flag_non_finite(&bx, d, &mut flags, 0);
    be.flag_non_finite(&at3, d, &mut flags, 1);
    be.flag_non_finite(&at1, d, &mut flags, 1);
    be.flag_non_finite(&bx, d, &mut flags, 2);
    if be.download(flags).map_err(e)? != [3.0, 1.0, f32::INFINITY] {
        return Err("flag_non_finite: want tokens 3, 1 and none".into());
    }
    // The sum checked in the same call: token 3 of at3 + x goes non-finite.
    let mut flags = be.upload(&[f32::INFINITY; 2]).map_err(e)?;
    let mut sum = be.upload(&x).map_err(e)?;
    be.add_checked(&mut sum, &at3, d, &mut flags, 1);
    let mut got = be.download(sum).map_err(e)?;
    if got[3 * d + 5] != f32::INFINITY {
        return Err("add_checked: the sum of x and +inf must be +inf".into());
    }
    got[3 * d + 5] = 2.0 * x[3 * d + 5];
    let want: Vec<f64> = x.iter().map(|v| 2.0 * *v as f64).collect();
    close("add_checked", &got, &want, 0.0)?;
    if be.download(flags).map_err(e)? != [f32::INFINITY, 3.0] {
        return Err("add_checked: want token 3 in slot 1 only".into());
    }
    // The same add and check, then the norm of the sum.
    let mut flags = be.upload(&[f32::INFINITY; 2]).map_err(e)?;
    let (mut sum, mut normed) = (be.upload(&x).map_err(e)?, be.zeros(n * d).map_err(e)?);
    be.add_checked_norm(&mut sum, &by, (&mut flags, 0), &bw, 1e-5, &mut normed, None)
        .map_err(e)?;
    let xy: Vec<f32> = x.iter().zip(&y).map(|(a, b)| a + b).collect();
    close(
        "add_checked_norm: sum",
        &be.download(sum).map_err(e)?,
        &f64s(&xy),
        1e-6,
    )?;
    close(
        "add_checked_norm: norm",
        &be.download(normed).map_err(e)?,
        &norm_ref(&xy, &w),
        1e-5,
    )?;
    // With the norms of the estimator inputs: ||normed|| and ||RMSNorm(x)||.
    let (mut after, mut before) = (be.zeros(0).map_err(e)?, be.zeros(0).map_err(e)?);
    let (mut sum, mut normed) = (be.upload(&x).map_err(e)?, be.zeros(n * d).map_err(e)?);
    let norms = Some(InputNorms {
        after: &mut after,
        before: &mut before,
    });
    be.add_checked_norm(
        &mut sum,
        &by,
        (&mut flags, 0),
        &bw,
        1e-5,
        &mut normed,
        norms,
    )
    .map_err(e)?;
    let row_norms = |v: Vec<f64>| -> Vec<f64> {
        v.chunks(d)
            .map(|r| r.iter().map(|v| v * v).sum::<f64>().sqrt())
            .collect()
    };
    close(
        "add_checked_norm: norm after",
        &be.download(after).map_err(e)?,
        &row_norms(norm_ref(&xy, &w)),
        1e-5,
    )?;
    close(
        "add_checked_norm: norm before",
        &be.download(before).map_err(e)?,
        &row_norms(norm_ref(&x, &w)),
        1e-5,
    )?;
    let mut sum = be.upload(&x).map_err(e)?;
    let mut normed = be.zeros(n * d).map_err(e)?;
    be.add_checked_norm(
        &mut sum,
        &at3,
        (&mut flags, 1),
        &bw,
        1e-5,
        &mut normed,
        None,
    )
    .map_err(e)?;
    if be.download(flags).map_err(e)? != [f32::INFINITY, 3.0] {
        return Err("add_checked_norm: want token 3 in slot 1 only".into());
    }

    // Linears: dense in every stored type, any-precision at every width, embedding rows.
    let (rows, cols) = (37usize, 70usize);
    let wf = rand_vec(&mut rng, rows * cols);
    let bias = rand_vec(&mut rng, rows);
    for m in [1usize, 3, 9, 17] {
        let xm = rand_vec(&mut rng, m * cols);
        let bxm = be.upload(&xm).map_err(e)?;
        let stored = [
            TensorData::F32(wf.clone()),
            TensorData::F16(wf.iter().map(|&v| f16::from_f32(v)).collect()),
            TensorData::BF16(wf.iter().map(|&v| bf16::from_f32(v)).collect()),
        ];
        for t in stored {
            let wr = t.to_f32();
            let dense = be
                .dense(
                    DenseHost::Float(Arc::new(t)),
                    rows,
                    cols,
                    Some(bias.clone()),
                )
                .map_err(e)?;
            let mut ym = be.zeros(m * rows).map_err(e)?;
            be.dense_linear(&dense, &bxm, m, &mut ym);
            close(
                "dense_linear",
                &be.download(ym).map_err(e)?,
                &matmul_ref(&wr, rows, cols, &xm, m, Some(&bias)),
                1e-4,
            )?;
        }
        // 8-bit blocks: columns a multiple of 32.
        let q8 = Q8Matrix {
            rows,
            cols: 64,
            scales: (0..rows * 2)
                .map(|_| f16::from_f32(rng.random_range(-0.05..0.05)))
                .collect(),
            quants: (0..rows * 64).map(|_| rng.random()).collect(),
        };
        let (wq8, x64) = (q8.to_f32(), rand_vec(&mut rng, m * 64));
        let dense = be
            .dense(DenseHost::Q8_0(Arc::new(q8)), rows, 64, None)
            .map_err(e)?;
        let mut ym = be.zeros(m * rows).map_err(e)?;
        be.dense_linear(&dense, &be.upload(&x64).map_err(e)?, m, &mut ym);
        close_rounded(
            "dense_linear (q8_0)",
            &be.download(ym).map_err(e)?,
            &wq8,
            &x64,
            (rows, 64, m),
            None,
        )?;
        let host = random_anyprec(&mut rng, rows, cols, true);
        let refs: Vec<(u32, Vec<f32>)> = (3..=8).map(|b| (b, dequant_ref(&host, b))).collect();
        let hb = host.bias.clone();
        let q = be.anyprec(host).map_err(e)?;
        for (b, wq) in &refs {
            let mut ym = be.zeros(m * rows).map_err(e)?;
            be.anyprec_linear(&q, &bxm, m, *b, &mut ym);
            close_rounded(
                &format!("anyprec_linear at {b} bits"),
                &be.download(ym).map_err(e)?,
                wq,
                &xm,
                (rows, cols, m),
                hb.as_deref(),
            )?;
        }
        // Per-token precision: each token at 3 or 6 bits as its decision says.
        let u = rand_vec(&mut rng, m);
        let mask = be
            .threshold_mask(&be.upload(&u).map_err(e)?, 0.0)
            .map_err(e)?;
        let mut ym = be.upload(&vec![f32::NAN; m * rows]).map_err(e)?;
        be.anyprec_linear_select(&q, (rows, cols), &bxm, m, (3, 6), &mask, &mut ym)
            .map_err(e)?;
        let got = be.download(ym).map_err(e)?;
        for t in 0..m {
            let bits = if u[t] > 0.0 { 6 } else { 3 };
            close_rounded(
                &format!("anyprec_linear_select, token {t} at {bits} bits"),
                &got[t * rows..(t + 1) * rows],
                &refs[bits as usize - 3].1,
                &xm[t * cols..(t + 1) * cols],
                (rows, cols, 1),
                hb.as_deref(),
            )?;
        }
    }
    let table = be
        .dense(
            DenseHost::Float(Arc::new(TensorData::F32(wf.clone()))),
            rows,
            cols,
            None,
        )
        .map_err(e)?;
    let mut emb = be.zeros(2 * cols).map_err(e)?;
    be.embed(&table, &be.step(&[4, 36], 0).map_err(e)?, &mut emb);
    let want: Vec<f64> = f64s(&wf[4 * cols..5 * cols])
        .into_iter()
        .chain(f64s(&wf[36 * cols..]))
        .collect();
    close("embed", &be.download(emb).map_err(e)?, &want, 0.0)?;

    // Estimators, decisions, gather/scatter.
    let k = 6;
    let gw = rand_vec(&mut rng, k * d);
    let jl = Estimator::<B>::Jl {
        k,
        g: be
            .dense(
                DenseHost::Float(Arc::new(TensorData::F32(gw.clone()))),
                k,
                d,
                None,
            )
            .map_err(e)?,
        bias: 0.1,
    };
    let est_ref: Vec<f64> = matmul_ref(&gw, k, d, &x, n, None)
        .chunks(k)
        .map(|r| r.iter().map(|v| v * v).sum::<f64>().sqrt() + 0.1)
        .collect();
    let mut sorted = est_ref.clone();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let tau = ((sorted[1] + sorted[2]) / 2.0) as f32;
    close(
        "estimates (projection)",
        &be.download(be.estimates(&jl, EstInput::Rows(&bx), n).map_err(e)?)
            .map_err(e)?,
        &est_ref,
        1e-4,
    )?;
    let mask = be.estimate(&jl, EstInput::Rows(&bx), n, tau).map_err(e)?;
    let from_values = be
        .threshold_mask(&be.upload(&[0.5, -1.0, 2.0]).map_err(e)?, 0.5)
        .map_err(e)?;
    if be.mask_count(&from_values).map_err(e)? != 1 {
        return Err("threshold_mask: of 0.5, -1 and 2 only 2 is above 0.5".into());
    }
    if be.mask_count(&mask).map_err(e)? != n - 2 {
        return Err(format!(
            "estimate (projection): {} tokens above the threshold, want {}",
            be.mask_count(&mask).map_err(e)?,
            n - 2
        ));
    }
    let mut counts = be.zeros(3).map_err(e)?;
    be.mask_count_into(&mask, &mut counts, 2);
    if be.download(counts).map_err(e)? != [0.0, 0.0, (n - 2) as f32] {
        return Err("mask_count_into: the count belongs in slot 2 only".into());
    }
    // Each decision to slot 1 of its token's 3 (the others keep their poison).
    let mut stored = be.upload(&vec![-7.0; 3 * n]).map_err(e)?;
    be.mask_store_into(&mask, &mut stored, 1, 3);
    let want: Vec<f32> = (0..3 * n)
        .map(|i| match (i % 3, est_ref[i / 3] > tau as f64) {
            (1, high) => high as u8 as f32,
            _ => -7.0,
        })
        .collect();
    if be.download(stored).map_err(e)? != want {
        return Err("mask_store_into: token t's decision (1 high) in slot 1 + 3t only".into());
    }
    let mut counts = be.zeros(3).map_err(e)?;
    let counted = be
        .estimate_counted(&jl, EstInput::Rows(&bx), n, tau, (&mut counts, 1))
        .map_err(e)?;
    if be.mask_count(&counted).map_err(e)? != n - 2
        || be.download(counts).map_err(e)? != [0.0, (n - 2) as f32, 0.0]
    {
        return Err(
            "estimate_counted (projection): estimate's decisions, their count in slot 1 only"
                .into(),
        );
    }
    // Norm regression: a·||x|| + c, the threshold between the two lowest rows.
    let (a, c) = (0.5f32, -0.1f32);
    let mut norms: Vec<f64> = x
        .chunks(d)
        .map(|r| r.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt())
        .collect();
    norms.sort_by(|p, q| p.total_cmp(q));
    let tau_lin = (a as f64 * (norms[0] + norms[1]) / 2.0 + c as f64) as f32;
    let mut counts = be.zeros(1).map_err(e)?;
    let regression = Estimator::<B>::Linear { a, c };
    let m = be
        .estimate_counted(
            &regression,
            EstInput::Rows(&bx),
            n,
            tau_lin,
            (&mut counts, 0),
        )
        .map_err(e)?;
    if be.mask_count(&m).map_err(e)? != n - 1 || be.download(counts).map_err(e)? != [(n - 1) as f32]
    {
        return Err(
            "estimate_counted (norm regression): every row but the one of least norm goes high"
                .into(),
        );
    }
    // The same decisions from the rows' norms alone, and a JL estimator refused them.
    let bnorms = be
        .estimates(
            &Estimator::Linear { a: 1.0, c: 0.0 },
            EstInput::Rows(&bx),
            n,
        )
        .map_err(e)?;
    let from_norms = be
        .estimate(&regression, EstInput::Norms(&bnorms), n, tau_lin)
        .map_err(e)?;
    if be.mask_count(&from_norms).map_err(e)? != n - 1 {
        return Err("estimate (norm regression, from norms): want every row but one high".into());
    }
    if be.estimate(&jl, EstInput::Norms(&bnorms), n, tau).is_ok() {
        return Err("estimate: a JL estimator given only norms must be an error".into());
    }
    // And from their sums of squares in parts (of 5 values; the last shorter).
    let parts = d.div_ceil(5);
    let sumsq: Vec<f32> = (x.chunks(d))
        .flat_map(|r| r.chunks(5).map(|p| p.iter().map(|v| v * v).sum::<f32>()))
        .collect();
    let bsums = be.upload(&sumsq).map_err(e)?;
    let from_sums = EstInput::SumSq {
        sums: &bsums,
        parts,
    };
    let est_lin: Vec<f64> = (x.chunks(d))
        .map(|r| a as f64 * r.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt() + c as f64)
        .collect();
    close(
        "estimates (norm regression, from sums of squares)",
        &be.download(be.estimates(&regression, from_sums, n).map_err(e)?)
            .map_err(e)?,
        &est_lin,
        1e-5,
    )?;
    let m = be.estimate(&regression, from_sums, n, tau_lin).map_err(e)?;
    if be.mask_count(&m).map_err(e)? != n - 1 {
        return Err(
            "estimate (norm regression, from sums of squares): want every row but one high".into(),
        );
    }
    let short = EstInput::SumSq {
        sums: &bsums,
        parts: parts + 1,
    };
    let no_parts = EstInput::SumSq {
        sums: &bsums,
        parts: 0,
    };
    for (what, bad) in [("too few sums", short), ("no parts", no_parts)] {
        if be.estimate(&regression, bad, n, tau_lin).is_ok() {
            return Err(format!(
                "estimate: sums of squares with {what} must be an error"
            ));
        }
    }
    if be.estimate(&jl, from_sums, n, tau).is_ok() {
        return Err("estimate: a JL estimator given only sums of squares must be an error".into());
    }
    let lin = Estimator::<B>::Linear { a: 0.0, c: 1.0 };
    if be
        .mask_count(&be.estimate(&lin, EstInput::Rows(&bx), n, 0.5).map_err(e)?)
        .map_err(e)?
        != n
    {
        return Err("estimate (norm regression): a constant estimate above the threshold must select every token".into());
    }
    // Rows gathered and scattered by the device's decisions and by the same
    // decisions made on the host, on either side.
    let decided: Vec<bool> = (0..n).map(|t| est_ref[t] > tau as f64).collect();
    let from_host = be.mask_from(&decided).map_err(e)?;
    if be.mask_count(&from_host).map_err(e)? != n - 2 {
        return Err(format!(
            "mask_from: {} tokens high, want {}",
            be.mask_count(&from_host).map_err(e)?,
            n - 2
        ));
    }
    for (what, m) in [("estimate", &mask), ("mask_from", &from_host)] {
        for high in [true, false] {
            let picked: Vec<usize> = (0..n).filter(|&t| decided[t] == high).collect();
            let gathered = be
                .download(be.gather_rows(&bx, d, m, high).map_err(e)?)
                .map_err(e)?;
            let want: Vec<f64> = (picked.iter())
                .flat_map(|&t| f64s(&x[t * d..(t + 1) * d]))
                .collect();
            close(
                &format!("gather_rows ({what}, high {high})"),
                &gathered,
                &want,
                0.0,
            )?;
            let mut dst = be.upload(&y).map_err(e)?;
            be.scatter_rows(&be.upload(&gathered).map_err(e)?, d, m, high, &mut dst);
            let mut want = f64s(&y);
            for &t in &picked {
                want[t * d..(t + 1) * d].copy_from_slice(&f64s(&x[t * d..(t + 1) * d]));
            }
            let got = be.download(dst).map_err(e)?;
            close(
                &format!("scatter_rows ({what}, high {high})"),
                &got,
                &want,
                0.0,
            )?;
        }
    }

    // Greedy choice per row: the largest value, the lowest index on ties,
    // None for a row holding a NaN or an infinity (rows wider than a block's
    // threads, ties planted far apart).
    let width = 3000;
    let mut rows = rand_vec(&mut rng, 5 * width);
    let top = rng.random_range(0..width);
    rows[top] = 2.0;
    rows[width - 1] = 2.0;
    rows[width + 17] = 3.0;
    rows[width + top] = 3.0;
    rows[2 * width + rng.random_range(0..width)] = f32::NAN;
    rows[3 * width + rng.random_range(0..width)] = f32::INFINITY;
    let want: Vec<Option<u32>> = vec![
        Some(top.min(width - 1) as u32),
        Some(top.min(17) as u32),
        None,
        None,
        Some(crate::sampler::argmax(&rows[4 * width..])),
    ];
    let got = be
        .argmax_rows(&be.upload(&rows).map_err(e)?, width)
        .map_err(e)?;
    if got != want || crate::backend::argmax_rows_host(&rows, width) != want {
        return Err(format!("argmax_rows: {got:?}, want {want:?}"));
    }

    // Random draws per row: the token whose span of the cumulative softmax
    // (in index order, or of the top-k / top-p candidates in descending
    // order) holds u · total, up to the rounding of a sum in another order;
    // None for the rows holding a NaN or an infinity. Row 1 holds a tie at
    // its top; the flat rows' nucleus and a top-k over 2048 tokens are more
    // than a device sorts itself.
    for v in &mut rows[4 * width..] {
        *v *= 8.0; // a peaked row: most of the mass on few tokens
    }
    rows.extend(rand_vec(&mut rng, 5 * width));
    let filtered = |inv_temperature, top_k, top_p, uniform| Draw {
        inv_temperature,
        top_k,
        top_p,
        uniform,
    };
    let draws = [
        Draw::tempered(1.0, 0.37),
        filtered(2.0, 50, 1.0, 0.999),
        filtered(1.0, 0, 0.9, 0.5),
        filtered(0.5, 5, 1.0, 0.1),
        filtered(1.25, 0, 0.3, 0.6),
        filtered(1.0, 2000, 0.95, 0.73),
        filtered(0.8, 0, 0.9, 0.02),
        filtered(1.0, 2500, 1.0, 0.41),
        Draw::tempered(0.8, 0.5),
        filtered(1.0, 1, 0.5, 0.9),
    ];
    let got = be
        .sample_rows(&be.upload(&rows).map_err(e)?, width, &draws)
        .map_err(e)?;
    let host = crate::backend::sample_rows_host(&rows, width, &draws);
    if got.len() != draws.len()
        || got
            .iter()
            .map(Option::is_some)
            .ne(host.iter().map(Option::is_some))
    {
        return Err(format!(
            "sample_rows: {got:?}, want a token for each finite row: {host:?}"
        ));
    }
    for (r, ((row, &d), g)) in rows.chunks(width).zip(&draws).zip(&got).enumerate() {
        if let Some(t) = *g {
            drawn_within_rounding(row, d, t).map_err(|m| format!("sample_rows: row {r}: {m}"))?;
        }
    }
    // The same draws over rows of an odd width (rows after the first start
    // off 16-byte boundaries and end in a partial group of four).
    let odd = 3001;
    let mut rows: Vec<f32> = rand_vec(&mut rng, draws.len() * odd);
    for v in &mut rows[..odd] {
        *v *= 8.0;
    }
    let got = be
        .sample_rows(&be.upload(&rows).map_err(e)?, odd, &draws)
        .map_err(e)?;
    for (r, ((row, &d), g)) in rows.chunks(odd).zip(&draws).zip(&got).enumerate() {
        let t = g.ok_or_else(|| format!("sample_rows: no token for finite row {r} of {odd}"))?;
        drawn_within_rounding(row, d, t)
            .map_err(|m| format!("sample_rows: row {r} of {odd}: {m}"))?;
    }

    // RoPE and attention over the backend's KV cache.
    let shape = AttnShape {
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 8,
        window: Some(6),
    };
    let (pos0, m) = (5usize, 3usize);
    let (qd, kvd, rot) = (32usize, 16usize, 8usize);
    let table: Vec<f32> = (0..pos0 + m)
        .flat_map(|p| {
            (0..rot / 2)
                .map(move |i| (p as f64 * 0.3f64.powi(i as i32)).cos() as f32)
                .chain((0..rot / 2).map(move |i| (p as f64 * 0.3f64.powi(i as i32)).sin() as f32))
        })
        .collect();
    let q = rand_vec(&mut rng, m * qd);
    let mut bq = be.upload(&q).map_err(e)?;
    let step = be.step(&[], pos0).map_err(e)?;
    be.rope(&mut bq, 4, 8, rot, &step, &be.upload(&table).map_err(e)?);
    let mut q_ref = f64s(&q);
    for t in 0..m {
        let row = &table[(pos0 + t) * rot..(pos0 + t + 1) * rot];
        for hh in 0..4 {
            let o = t * qd + hh * 8;
            for i in 0..rot / 2 {
                let (a, b) = (q[o + i] as f64, q[o + i + rot / 2] as f64);
                let (cs, sn) = (row[i] as f64, row[rot / 2 + i] as f64);
                q_ref[o + i] = a * cs - b * sn;
                q_ref[o + i + rot / 2] = b * cs + a * sn;
            }
        }
    }
    let q_rot = be.download(bq).map_err(e)?;
    close("rope", &q_rot, &q_ref, 1e-6)?;
    let (keys, values) = (
        rand_vec(&mut rng, (pos0 + m) * kvd),
        rand_vec(&mut rng, (pos0 + m) * kvd),
    );
    let mut kv = be.kv_new(2, kvd);
    for (a, b) in [(0, pos0), (pos0, pos0 + m)] {
        be.kv_append(
            &mut kv,
            1,
            &be.upload(&keys[a * kvd..b * kvd]).map_err(e)?,
            &be.upload(&values[a * kvd..b * kvd]).map_err(e)?,
            &be.step(&[], a).map_err(e)?,
        )
        .map_err(e)?;
    }
    let mut att = be.zeros(m * qd).map_err(e)?;
    be.attention(
        &be.upload(&q_rot).map_err(e)?,
        &kv,
        1,
        &step,
        shape,
        &mut att,
    );
    // The reference reads keys and values as the cache stores them (an f16
    // cache rounds each to nearest), so the tolerance stays f32's.
    let kvt = be.kv_dtype();
    let (keys, values): (Vec<f32>, Vec<f32>) = (
        keys.iter().map(|&x| kvt.round(x)).collect(),
        values.iter().map(|&x| kvt.round(x)).collect(),
    );
    let mut att_ref = vec![0f64; m * qd];
    for t in 0..m {
        let pos = pos0 + t;
        for hh in 0..4 {
            let kvh = hh / 2;
            let js: Vec<usize> = (0..=pos).filter(|&j| pos - j < 6).collect();
            let sc: Vec<f64> = js
                .iter()
                .map(|&j| {
                    (0..8)
                        .map(|i| {
                            q_rot[t * qd + hh * 8 + i] as f64 * keys[j * kvd + kvh * 8 + i] as f64
                        })
                        .sum::<f64>()
                        / 8f64.sqrt()
                })
                .collect();
            let mx = sc.iter().cloned().fold(f64::MIN, f64::max);
            let z: f64 = sc.iter().map(|s| (s - mx).exp()).sum();
            for (s, &j) in sc.iter().zip(&js) {
                for i in 0..8 {
                    att_ref[t * qd + hh * 8 + i] +=
                        (s - mx).exp() / z * values[j * kvd + kvh * 8 + i] as f64;
                }
            }
        }
    }
    close("attention", &be.download(att).map_err(e)?, &att_ref, 1e-5)?;
    let mut att = be.zeros(m * qd).map_err(e)?;
    let sums = (be.attention_sumsq(
        &be.upload(&q_rot).map_err(e)?,
        &kv,
        1,
        &step,
        shape,
        &mut att,
    ))
    .map_err(e)?;
    close(
        "attention_sumsq",
        &be.download(att).map_err(e)?,
        &att_ref,
        1e-5,
    )?;
    if let Some(sums) = sums {
        sums_match(be, "attention_sumsq: sums of squares", sums, &att_ref, m)?;
    }
    if be.kv_bytes(&kv) != 2 * (pos0 + m) * kvd * kvt.bytes() {
        return Err(format!(
            "kv_bytes: {} after {} positions of width {kvd}",
            be.kv_bytes(&kv),
            pos0 + m
        ));
    }
    be.kv_truncate(&mut kv, 2);
    if be.kv_bytes(&kv) != 2 * 2 * kvd * kvt.bytes() {
        return Err("kv_truncate: wrong size after truncation".into());
    }
    be.synchronize().map_err(e)
}

#[cfg(test)]
mod tests {
    use crate::backend::CpuBackend;

    #[test]
    fn cpu_backend_matches_the_references() {
        for seed in 0..3 {
            super::check(&CpuBackend, seed).unwrap();
        }
    }

    /// The draw check accepts the host's token and, beyond it, only tokens
    /// within rounding of the draw: at most a neighbour or two of a row.
    #[test]
    fn the_draw_check_accepts_the_draw_and_little_else() {
        use super::{drawn_within_rounding, Draw};
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        for i in 0..40 {
            let row: Vec<f32> = (0..500).map(|_| rng.random_range(-4.0f32..4.0)).collect();
            let d = Draw {
                inv_temperature: rng.random_range(0.5f32..2.0),
                top_k: [0, 1, 7, 300][i % 4],
                top_p: [1.0, 0.9, 0.5, 1.0, 0.2][i % 5],
                uniform: rng.random(),
            };
            let t = crate::sampler::draw(&row, d);
            let accepted: Vec<u32> = (0..row.len() as u32)
                .filter(|&c| drawn_within_rounding(&row, d, c).is_ok())
                .collect();
            assert!(
                accepted.contains(&t) && accepted.len() <= 2,
                "{d:?}: drew {t}, the check accepts {accepted:?}"
            );
        }
    }
}
