//! The CUDA backend's ops against the references (`backend::conformance`) and
//! against the CPU backend on larger, odd shapes (long attention windows, wide
//! norms, every dense storage, prefill-sized batches), plus its error paths.
//! Skips with a message where there is no GPU.
#![cfg(feature = "cuda")]

use std::sync::Arc;

use dpllm_engine::backend::cuda::{test_device, CudaBackend};
use dpllm_engine::backend::{
    conformance, decided_by_mask, AnyPrecHost, AttnShape, Decide, DenseHost, EstInput, Estimator,
    InputNorms, RopeArgs,
};
use dpllm_engine::{Backend, CpuBackend, KvDtype};
use dpllm_format::{Q8Matrix, TensorData};
use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn backend() -> Option<CudaBackend> {
    test_device(0).map(|d| CudaBackend::on(d).expect("the CUDA backend starts"))
}

fn rand_vec(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// Max |a − b| / (1 + |b|), and fail above `tol` naming `what`.
fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let (i, err) = got
        .iter()
        .zip(want)
        .map(|(a, b)| {
            if a.is_nan() != b.is_nan() {
                f32::INFINITY
            } else {
                (a - b).abs() / (1.0 + b.abs())
            }
        })
        .enumerate()
        .fold((0, 0f32), |m, (i, e)| if e > m.1 { (i, e) } else { m });
    assert!(
        err <= tol,
        "{what}: element {i} is {} on the GPU, {} on the CPU",
        got[i],
        want[i]
    );
}

/// `rows` rows of `width` values as the bit-plane GEMV's f16 halves hi and lo
/// (`[2][rows][width padded to 128]`, column c at c ^ 8 where bit 6 of c is
/// set, zero padding), as bits.
fn split_host(x: &[f32], rows: usize, width: usize) -> Vec<u16> {
    let cp = width.div_ceil(128) * 128;
    let mut out = vec![0u16; 2 * rows * cp];
    for t in 0..rows {
        for c in 0..width {
            let v = x[t * width + c];
            let hi = f16::from_f32(v);
            let lo = f16::from_f32(v - hi.to_f32());
            let slot = c ^ (((c >> 6) & 1) << 3);
            out[t * cp + slot] = hi.to_bits();
            out[(rows + t) * cp + slot] = lo.to_bits();
        }
    }
    out
}

/// The halves the GPU op that wrote `buf` left beside it equal `split_host`
/// of its values (any NaN matching any NaN).
fn assert_halves(
    what: &str,
    be: &CudaBackend,
    buf: &dpllm_engine::backend::cuda::CudaBuf,
    rows: usize,
    width: usize,
) {
    let got =
        (be.halves_of(buf, rows, width).unwrap()).unwrap_or_else(|| panic!("{what}: no halves"));
    let want = split_host(&be.read(buf).unwrap(), rows, width);
    assert_eq!(got.len(), want.len(), "{what}: halves");
    let nan = |h: u16| f16::from_bits(h).is_nan();
    if let Some(i) = (0..want.len()).find(|&i| got[i] != want[i] && !(nan(got[i]) && nan(want[i])))
    {
        panic!("{what}: half {i} is {:#06x}, not {:#06x}", got[i], want[i]);
    }
}

/// Both kinds of KV cache: f16 (the default) and f32.
const KV_TYPES: [KvDtype; 2] = [KvDtype::F16, KvDtype::F32];

#[test]
fn ops_match_the_references() {
    let Some(be) = backend() else { return };
    assert_eq!(be.kv_dtype(), KvDtype::F16, "the default KV cache");
    for kvt in KV_TYPES {
        let be = be.clone().with_kv(kvt);
        for seed in 0..4 {
            conformance::check(&be, seed).unwrap_or_else(|e| panic!("{kvt} KV, seed {seed}: {e}"));
        }
    }
}

#[test]
fn attention_matches_the_cpu_over_long_contexts() {
    let Some(gpu) = backend() else { return };
    let mut rng = StdRng::seed_from_u64(rand::random());
    // (heads, kv heads, head dim, window, cached positions, new queries)
    for (nh, nkv, hd, window, pos0, m) in [
        (9, 3, 64, None, 700, 1),
        (32, 8, 128, None, 2000, 1),
        (4, 4, 96, Some(300), 900, 5),
        (6, 2, 256, None, 40, 70),
        (2, 1, 20, Some(7), 0, 33),
        // A window far shorter than the spans the cache is cut into: most spans empty.
        (8, 2, 128, Some(5), 1500, 2),
    ] {
        let shape = AttnShape {
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: hd,
            window,
        };
        let kvd = nkv * hd;
        let (keys, values) = (
            rand_vec(&mut rng, (pos0 + m) * kvd),
            rand_vec(&mut rng, (pos0 + m) * kvd),
        );
        // Scaled queries make peaked softmaxes, where a wrong merge would show.
        let q: Vec<f32> = rand_vec(&mut rng, m * nh * hd)
            .iter()
            .map(|v| v * 4.0)
            .collect();
        for kvt in KV_TYPES {
            // The CPU sees the keys and values as the GPU's cache stores them.
            let round = |x: &[f32]| x.iter().map(|&v| kvt.round(v)).collect::<Vec<_>>();
            let (kr, vr) = (round(&keys), round(&values));
            let what =
                format!("attention {nh}/{nkv}x{hd} window {window:?} at {pos0}+{m}, {kvt} KV");
            // Up to 8 queries, the output is split for the o projection too.
            let halves = |be: &CudaBackend, out: &_| {
                if m <= 8 {
                    assert_halves(&what, be, out, m, nh * hd);
                }
            };
            let gpu = gpu.clone().with_kv(kvt);
            assert_close(
                &what,
                &attend(&gpu, &q, (&keys, &values), pos0, kvd, shape, halves),
                &attend(&CpuBackend, &q, (&kr, &vr), pos0, kvd, shape, |_, _| {}),
                1e-5,
            );
        }
    }
}

/// Attention of `q` over keys/values appended in two steps (the prefix, then
/// the new positions); `check` sees the output buffer (each kind of call).
fn attend<B: Backend>(
    be: &B,
    q: &[f32],
    (k, v): (&[f32], &[f32]),
    pos0: usize,
    kvd: usize,
    shape: AttnShape,
    check: impl Fn(&B, &B::Buf),
) -> Vec<f32> {
    let mut kv = be.kv_new(2, kvd);
    let total = k.len() / kvd;
    for (a, b) in [(0, pos0), (pos0, total)] {
        if b > a {
            be.kv_append(
                &mut kv,
                1,
                &be.upload(&k[a * kvd..b * kvd]).unwrap(),
                &be.upload(&v[a * kvd..b * kvd]).unwrap(),
                &be.step(&[], a).unwrap(),
            )
            .unwrap();
        }
    }
    let mut out = be.zeros(q.len()).unwrap();
    let step = be.step(&[], pos0).unwrap();
    be.attention(&be.upload(q).unwrap(), &kv, 1, &step, shape, &mut out);
    check(be, &out);
    let out = be.download(out).unwrap();
    // The same with the sums of squares of each head's output, where the
    // backend leaves them: the output unchanged, a sum for each head.
    let mut again = be.zeros(q.len()).unwrap();
    let sums =
        (be.attention_sumsq(&be.upload(q).unwrap(), &kv, 1, &step, shape, &mut again)).unwrap();
    check(be, &again);
    assert_eq!(be.download(again).unwrap(), out, "attention_sumsq's output");
    if let Some(sums) = sums {
        assert_eq!(sums.parts, shape.num_heads, "a part a head");
        let want: Vec<f32> = (out.chunks(shape.head_dim))
            .map(|h| h.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() as f32)
            .collect();
        assert_close(
            "attention_sumsq",
            &be.download(sums.sums).unwrap(),
            &want,
            1e-5,
        );
    }
    out
}

#[test]
fn swiglu_sums_of_squares_match_the_rows() {
    let Some(be) = backend() else { return };
    let mut rng = StdRng::seed_from_u64(rand::random());
    // Llama-3-8B's and SmolLM2's widths, one a part and a bit, and widths not
    // a multiple of 4 (no float4 path).
    for (n, width) in [
        (1usize, 14336usize),
        (3, 1536),
        (2, 1025),
        (4, 6),
        (1, 1023),
    ] {
        let (g, u) = (rand_vec(&mut rng, n * width), rand_vec(&mut rng, n * width));
        let mut want = be.upload(&g).unwrap();
        be.swiglu(&mut want, &be.upload(&u).unwrap(), n);
        assert_halves(&format!("swiglu {n}x{width}"), &be, &want, n, width);
        let want = be.download(want).unwrap();
        let mut got = be.upload(&g).unwrap();
        let sums = (be.swiglu_sumsq(&mut got, &be.upload(&u).unwrap(), n))
            .unwrap()
            .expect("the CUDA backend leaves the sums");
        assert_halves(&format!("swiglu_sumsq {n}x{width}"), &be, &got, n, width);
        assert_eq!(be.download(got).unwrap(), want, "{n}x{width}: output");
        let parts = width.div_ceil(1024);
        assert_eq!(sums.parts, parts, "{n}x{width}: parts of 1024");
        let part_sums: Vec<f32> = (want.chunks(width))
            .flat_map(|r| {
                r.chunks(1024)
                    .map(|p| p.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() as f32)
            })
            .collect();
        assert_close(
            &format!("{n}x{width}: sums of squares"),
            &be.download(sums.sums).unwrap(),
            &part_sums,
            1e-5,
        );
    }
    // Rows that do not divide the buffer are an error, not a wrong answer.
    let mut g = be.zeros(10).unwrap();
    assert!(be.swiglu_sumsq(&mut g, &be.zeros(10).unwrap(), 3).is_err());
    assert!(be.swiglu_sumsq(&mut g, &be.zeros(10).unwrap(), 0).is_err());
}

#[test]
fn rope_append_matches_the_cpu() {
    let Some(gpu) = backend() else { return };
    let mut rng = StdRng::seed_from_u64(rand::random());
    // (heads, kv heads, head dim, rotated dims, cached positions, new tokens)
    for (nh, nkv, hd, rot, pos0, n) in [
        (32, 8, 128, 128, 37, 1),
        (9, 3, 64, 64, 0, 6),
        (4, 2, 96, 32, 70, 3),
    ] {
        let (qd, kvd) = (nh * hd, nkv * hd);
        let total = pos0 + n;
        let table = rand_vec(&mut rng, total * rot);
        let (keys, values) = (
            rand_vec(&mut rng, total * kvd),
            rand_vec(&mut rng, total * kvd),
        );
        let q = rand_vec(&mut rng, n * qd);
        let shape = AttnShape {
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: hd,
            window: None,
        };
        let (cq, ca) = rope_then_attend(&CpuBackend, &q, &keys, &values, pos0, &table, rot, shape);
        // An f16 cache rounds the rotated keys and the values (relative
        // error at most 2^-11 each), which moves the output by about that much.
        for (kvt, tol) in [(KvDtype::F32, 1e-5), (KvDtype::F16, 4e-3)] {
            let gpu = gpu.clone().with_kv(kvt);
            let (gq, ga) = rope_then_attend(&gpu, &q, &keys, &values, pos0, &table, rot, shape);
            let what = format!("rope_append {nh}/{nkv}x{hd} rot {rot} at {pos0}+{n}, {kvt} KV");
            assert_close(&format!("{what}: q"), &gq, &cq, 1e-6);
            // Attention over the cache sees the stored keys (rotated) and values.
            assert_close(&format!("{what}: attention"), &ga, &ca, tol);
        }
    }
}

/// Queries after [`Backend::rope_append`] of the last `q.len() / qd` positions
/// (the earlier ones appended as they are), and attention over the cache then.
#[allow(clippy::too_many_arguments)]
fn rope_then_attend<B: Backend>(
    be: &B,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    pos0: usize,
    table: &[f32],
    rot: usize,
    shape: AttnShape,
) -> (Vec<f32>, Vec<f32>) {
    let kvd = shape.num_kv_heads * shape.head_dim;
    let mut kv = be.kv_new(2, kvd);
    if pos0 > 0 {
        let (k0, v0) = (&k[..pos0 * kvd], &v[..pos0 * kvd]);
        be.kv_append(
            &mut kv,
            1,
            &be.upload(k0).unwrap(),
            &be.upload(v0).unwrap(),
            &be.step(&[], 0).unwrap(),
        )
        .unwrap();
    }
    let step = be.step(&[], pos0).unwrap();
    let (mut bq, mut bk) = (be.upload(q).unwrap(), be.upload(&k[pos0 * kvd..]).unwrap());
    let rope = RopeArgs {
        heads: shape.num_heads,
        kv_heads: shape.num_kv_heads,
        head_dim: shape.head_dim,
        rot_dim: rot,
        table: &be.upload(table).unwrap(),
    };
    be.rope_append(
        &mut bq,
        &mut bk,
        &be.upload(&v[pos0 * kvd..]).unwrap(),
        &mut kv,
        1,
        &step,
        rope,
    )
    .unwrap();
    let mut out = be.zeros(q.len()).unwrap();
    be.attention(&bq, &kv, 1, &step, shape, &mut out);
    (be.read(&bq).unwrap(), be.download(out).unwrap())
}

#[test]
fn rms_norm_matches_the_cpu_at_every_width() {
    let Some(gpu) = backend() else { return };
    let mut rng = StdRng::seed_from_u64(rand::random());
    // Rows held in registers (multiples of 4 up to 16384), and the two-pass
    // path: odd widths, and rows wider than the registers hold.
    for d in [4usize, 128, 576, 4096, 16384, 3, 4099, 20000] {
        for n in [1usize, 3] {
            let x = rand_vec(&mut rng, n * d);
            let g: Vec<f32> = (0..d).map(|_| rng.random_range(0.5..1.5)).collect();
            let (mut gy, mut cy) = (gpu.zeros(n * d).unwrap(), vec![0f32; n * d]);
            gpu.rms_norm(
                &gpu.upload(&x).unwrap(),
                &gpu.upload(&g).unwrap(),
                1e-6,
                &mut gy,
            );
            CpuBackend.rms_norm(&x, &g, 1e-6, &mut cy);
            assert_halves(&format!("rms_norm {n}x{d}"), &gpu, &gy, n, d);
            assert_close(
                &format!("rms_norm {n}x{d}"),
                &gpu.download(gy).unwrap(),
                &cy,
                1e-5,
            );
            let mut gx = gpu.upload(&x).unwrap();
            gpu.rms_norm_inplace(&mut gx, &gpu.upload(&g).unwrap(), 1e-6);
            assert_close(
                &format!("rms_norm_inplace {n}x{d}"),
                &gpu.download(gx).unwrap(),
                &cy,
                1e-5,
            );
            // The residual add with the norm of the sum, a bad value in the last token.
            let mut y = rand_vec(&mut rng, n * d);
            y[n * d - 1] = f32::NAN;
            let (mut gh, mut ch) = (gpu.upload(&x).unwrap(), x.clone());
            let (mut gflags, mut cflags) =
                (gpu.upload(&[f32::INFINITY]).unwrap(), vec![f32::INFINITY]);
            let (gw, mut gy) = (gpu.upload(&g).unwrap(), gpu.zeros(n * d).unwrap());
            let (mut ga, mut gb, mut ca, mut cb) = (
                gpu.zeros(0).unwrap(),
                gpu.zeros(0).unwrap(),
                Vec::new(),
                Vec::new(),
            );
            gpu.add_checked_norm(
                &mut gh,
                &gpu.upload(&y).unwrap(),
                (&mut gflags, 0),
                &gw,
                1e-6,
                &mut gy,
                Some(InputNorms {
                    after: &mut ga,
                    before: &mut gb,
                }),
            )
            .unwrap();
            CpuBackend
                .add_checked_norm(
                    &mut ch,
                    &y,
                    (&mut cflags, 0),
                    &g,
                    1e-6,
                    &mut cy,
                    Some(InputNorms {
                        after: &mut ca,
                        before: &mut cb,
                    }),
                )
                .unwrap();
            let what = format!("add_checked_norm {n}x{d}");
            assert_halves(&what, &gpu, &gy, n, d);
            assert_close(&what, &gpu.download(gh).unwrap(), &ch, 1e-6);
            assert_close(&what, &gpu.read(&gy).unwrap(), &cy, 1e-5);
            // Rows of another shape never see the halves; any write drops them.
            if n > 1 {
                assert!(
                    gpu.halves_of(&gy, 1, n * d).unwrap().is_none(),
                    "{what}: other rows"
                );
            }
            gpu.rms_norm_inplace(&mut gy, &gw, 1e-6);
            assert!(
                gpu.halves_of(&gy, n, d).unwrap().is_none(),
                "{what}: after a write"
            );
            // The estimator inputs' norms (the last token's is NaN on both).
            assert_close(
                &format!("{what}: norms after"),
                &gpu.download(ga).unwrap(),
                &ca,
                1e-5,
            );
            assert_close(
                &format!("{what}: norms before"),
                &gpu.download(gb).unwrap(),
                &cb,
                1e-5,
            );
            assert_eq!(gpu.download(gflags).unwrap(), [(n - 1) as f32], "{what}");
            assert_eq!(cflags, [(n - 1) as f32], "{what}");
        }
    }
}

#[test]
fn linears_norms_and_rope_match_the_cpu_on_model_shapes() {
    let Some(gpu) = backend() else { return };
    let mut rng = StdRng::seed_from_u64(rand::random());
    let (rows, cols) = (1536usize, 576usize);
    let w = rand_vec(&mut rng, rows * cols);
    let bias = rand_vec(&mut rng, rows);
    let q8 = Arc::new(Q8Matrix {
        rows,
        cols,
        scales: (0..rows * cols / 32)
            .map(|_| f16::from_f32(rng.random_range(-0.05..0.05)))
            .collect(),
        quants: (0..rows * cols).map(|_| rng.random()).collect(),
    });
    let stored = [
        DenseHost::Float(Arc::new(TensorData::F32(w.clone()))),
        DenseHost::Float(Arc::new(TensorData::F16(
            w.iter().map(|&v| f16::from_f32(v)).collect(),
        ))),
        DenseHost::Float(Arc::new(TensorData::BF16(
            w.iter().map(|&v| bf16::from_f32(v)).collect(),
        ))),
        DenseHost::Q8_0(q8),
    ];
    let ap = AnyPrecHost::random(rows, cols, 8, rng.random());
    let (gpu_ap, cpu_ap) = (
        gpu.anyprec(ap.clone()).unwrap(),
        CpuBackend.anyprec(ap).unwrap(),
    );
    // 1 token (decode), 8 (one launch), 45 (prefill: several launches and a tail).
    for n in [1usize, 8, 45] {
        let x = rand_vec(&mut rng, n * cols);
        let (gx, cx) = (gpu.upload(&x).unwrap(), x.clone());
        for s in &stored {
            let (gd, cd) = (
                gpu.dense(s.clone(), rows, cols, Some(bias.clone()))
                    .unwrap(),
                CpuBackend
                    .dense(s.clone(), rows, cols, Some(bias.clone()))
                    .unwrap(),
            );
            let (mut gy, mut cy) = (gpu.zeros(n * rows).unwrap(), vec![0f32; n * rows]);
            gpu.dense_linear(&gd, &gx, n, &mut gy);
            CpuBackend.dense_linear(&cd, &cx, n, &mut cy);
            // The CPU's Q8_0 path rounds activations to 8 bits; allow for it there.
            let tol = if s.storage() == "q8_0" { 2e-2 } else { 1e-4 };
            assert_close(
                &format!("dense {} n={n}", s.storage()),
                &gpu.download(gy).unwrap(),
                &cy,
                tol,
            );
        }
        for bits in [3u32, 4, 6, 8] {
            let (mut gy, mut cy) = (gpu.zeros(n * rows).unwrap(), vec![0f32; n * rows]);
            gpu.anyprec_linear(&gpu_ap, &gx, n, bits, &mut gy);
            CpuBackend.anyprec_linear(&cpu_ap, &cx, n, bits, &mut cy);
            // The CPU's kernels round activations to 16-bit fixed point.
            assert_close(
                &format!("anyprec {bits} bits n={n}"),
                &gpu.download(gy).unwrap(),
                &cy,
                2e-3,
            );
        }
        // A wide norm (one block per row, several warps) and RoPE with a partial rotation.
        let g: Vec<f32> = (0..cols).map(|_| rng.random_range(0.5..1.5)).collect();
        let (mut gy, mut cy) = (gpu.zeros(n * cols).unwrap(), vec![0f32; n * cols]);
        gpu.rms_norm(&gx, &gpu.upload(&g).unwrap(), 1e-6, &mut gy);
        CpuBackend.rms_norm(&cx, &g, 1e-6, &mut cy);
        assert_close("rms_norm", &gpu.download(gy).unwrap(), &cy, 1e-5);
        let (heads, hd, rot, pos0) = (9usize, 64usize, 32usize, 100usize);
        let table = rand_vec(&mut rng, (pos0 + n) * rot);
        let (mut gq, mut cq) = (gpu.upload(&x).unwrap(), x.clone());
        let (gs, cs) = (
            gpu.step(&[], pos0).unwrap(),
            CpuBackend.step(&[], pos0).unwrap(),
        );
        gpu.rope(&mut gq, heads, hd, rot, &gs, &gpu.upload(&table).unwrap());
        CpuBackend.rope(&mut cq, heads, hd, rot, &cs, &table);
        assert_close("rope", &gpu.download(gq).unwrap(), &cq, 1e-6);
    }
}

#[test]
fn a_failed_op_is_reported_by_the_next_result_and_only_once() {
    let Some(be) = backend() else { return };
    let x = be.upload(&[1.0; 12]).unwrap();
    let mut small = be.zeros(5).unwrap();
    // Wrong shapes: nothing is launched, the error waits for the next result.
    be.add(&mut small, &x);
    let e = be.zeros(3).unwrap_err().to_string();
    assert!(e.contains("add") && e.contains("12"), "{e}");
    // Reported once: the backend works again.
    let mut h = be.upload(&[1.0; 12]).unwrap();
    be.add(&mut h, &x);
    assert_eq!(be.download(h).unwrap(), vec![2.0; 12]);
    // Bad attention shapes and an empty cache layer.
    let kv = be.kv_new(1, 8);
    let mut out = be.zeros(16).unwrap();
    let shape = AttnShape {
        num_heads: 2,
        num_kv_heads: 1,
        head_dim: 8,
        window: None,
    };
    let step = be.step(&[], 0).unwrap();
    be.attention(
        &be.upload(&[0.0; 16]).unwrap(),
        &kv,
        0,
        &step,
        shape,
        &mut out,
    );
    let e = be.synchronize().unwrap_err().to_string();
    assert!(e.contains("KV cache holds 0 positions"), "{e}");
    // Out-of-range bits and token ids.
    let ap = be.anyprec(AnyPrecHost::random(8, 64, 5, 1)).unwrap();
    let mut y = be.zeros(8).unwrap();
    be.anyprec_linear(&ap, &be.upload(&[0.5; 64]).unwrap(), 1, 6, &mut y);
    let e = be.synchronize().unwrap_err().to_string();
    assert!(e.contains("6 bits"), "{e}");
    let table = be
        .dense(
            DenseHost::Float(Arc::new(TensorData::F32(vec![0.0; 4 * 3]))),
            4,
            3,
            None,
        )
        .unwrap();
    let mut emb = be.zeros(3).unwrap();
    be.embed(&table, &be.step(&[4], 0).unwrap(), &mut emb);
    assert!(be.synchronize().is_err(), "token 4 of a 4-row table");
    // Mismatched weights are refused at upload.
    let mut bad = AnyPrecHost::random(8, 64, 5, 1);
    bad.planes.pop();
    assert!(be.anyprec(bad).is_err());
    let q8 = Q8Matrix {
        rows: 2,
        cols: 40,
        scales: vec![f16::ONE; 2],
        quants: vec![0; 80],
    };
    assert!(be
        .dense(DenseHost::Q8_0(Arc::new(q8)), 2, 40, None)
        .is_err());
}

/// With PDL, split-K (layers of fewer tiles than multiprocessors split
/// each tile over blocks), half-copy 4-bit pair tables and the GEMV's L2
/// prefetch each on and off.
#[test]
fn one_kernel_dp_llm_linears_match_the_two_step_path() {
    let Some(be) = backend() else { return };
    let d = be.device();
    let was = (d.pdl(), d.split_k(), d.half_pairs(), d.prefetch());
    for c in 0..16 {
        let (pdl, split_k) = (c & 1 != 0, c & 2 != 0);
        d.set_pdl(pdl);
        d.set_split_k(split_k);
        d.set_half_pairs(c & 4 != 0);
        d.set_prefetch(c & 8 != 0);
        dp_llm_linears_match(&be, split_k);
    }
    d.set_pdl(was.0);
    d.set_split_k(was.1);
    d.set_half_pairs(was.2);
    d.set_prefetch(was.3);
}

fn dp_llm_linears_match(be: &CudaBackend, split_k: bool) {
    let be = be.clone();
    let mut rng = StdRng::seed_from_u64(5);
    // 300 rows: a partial 16-row tile; 200 and 576 columns: partial column
    // blocks (2 and 5 of them, so as many warps a block); 4608 columns: too
    // wide to split the activations in the block (split_x first); 8464 rows:
    // 529 tiles, enough for the 4-bit side's entry tables (kernels _e).
    for (rows, cols) in [(300usize, 200usize), (2048, 576), (64, 4608), (8464, 256)] {
        let w = be.anyprec(AnyPrecHost::random(rows, cols, 8, 3)).unwrap();
        let x_up = be.upload(&rand_vec(&mut rng, cols)).unwrap();
        // An input as a norm leaves it, split for the GEMV beside its rows,
        // and a copy of its rows alone.
        let mut x_n = be.zeros(cols).unwrap();
        be.rms_norm(&x_up, &be.upload(&vec![1.0; cols]).unwrap(), 1e-6, &mut x_n);
        assert!(be.halves_of(&x_n, 1, cols).unwrap().is_some(), "halves");
        let mut x_n_rows = be.zeros(cols).unwrap();
        be.copy(&x_n, &mut x_n_rows);
        assert!(
            be.halves_of(&x_n_rows, 1, cols).unwrap().is_none(),
            "a copy's halves"
        );
        let xe_host = rand_vec(&mut rng, cols);
        let norm = xe_host.iter().map(|v| v * v).sum::<f32>().sqrt();
        let xe = be.upload(&xe_host).unwrap();
        let k = 16;
        let g = DenseHost::Float(Arc::new(TensorData::F32(rand_vec(&mut rng, k * cols))));
        let jl = Estimator::Jl {
            k,
            g: be.dense(g, k, cols, None).unwrap(),
            bias: 0.25,
        };
        let lin = Estimator::Linear { a: 0.5, c: 0.1 };
        let at = 0.5 * norm + 0.1;
        // (estimator, threshold, goes high)
        let cases = [
            (&lin, at - 0.01, true),
            (&lin, at + 0.01, false),
            (&jl, 0.0, true),
            (&jl, 1e9, false),
            (&Estimator::None, -1.0, true),
            (&Estimator::None, 1.0, false),
        ];
        // The input's rows, or (but for JL) its norm alone, as a residual add
        // leaves it, or its sum of squares in 37 parts or fewer (as SwiGLU and
        // attention leave them; more than a warp's lanes).
        let xe_norm = be.upload(&[norm]).unwrap();
        let part = cols.div_ceil(37);
        let sums: Vec<f32> = (xe_host.chunks(part))
            .map(|p| p.iter().map(|v| v * v).sum())
            .collect();
        let xe_sums = be.upload(&sums).unwrap();
        let inputs = [
            EstInput::Rows(&xe),
            EstInput::Norms(&xe_norm),
            EstInput::SumSq {
                sums: &xe_sums,
                parts: sums.len(),
            },
        ];
        for ((x, plain, x_kind), low) in [(&x_up, &x_up, "rows"), (&x_n, &x_n_rows, "halves")]
            .into_iter()
            .flat_map(|x| (3..=7u32).map(move |low| (x, low)))
        {
            for ((i, &(est, threshold, high)), input) in cases
                .iter()
                .enumerate()
                .flat_map(|c| inputs.iter().map(move |i| (c, *i)))
                .filter(|(c, i)| {
                    matches!(i, EstInput::Rows(_)) || !matches!(c.1 .0, Estimator::Jl { .. })
                })
            {
                let decide = || Decide {
                    estimator: est,
                    input,
                    threshold,
                };
                let (mut y1, mut c1) = (be.zeros(rows).unwrap(), be.zeros(2).unwrap());
                be.anyprec_linear_decided(
                    &w,
                    (rows, cols),
                    x,
                    1,
                    (low, low + 1),
                    decide(),
                    Some((&mut c1, 1)),
                    &mut y1,
                )
                .unwrap();
                let (mut y2, mut c2) = (be.zeros(rows).unwrap(), be.zeros(2).unwrap());
                decided_by_mask(
                    &be,
                    &w,
                    (rows, cols),
                    x,
                    1,
                    (low, low + 1),
                    decide(),
                    Some((&mut c2, 1)),
                    &mut y2,
                )
                .unwrap();
                let kind = match input {
                    EstInput::Rows(_) => "rows",
                    EstInput::Norms(_) => "norm",
                    EstInput::SumSq { .. } => "sums of squares",
                };
                let what = format!(
                    "{rows}x{cols} on {x_kind}, {low} or {} bits, case {i} ({kind}), \
                     split-K {split_k}",
                    low + 1
                );
                let counts = be.download(c1).unwrap();
                assert_eq!(counts, be.download(c2).unwrap(), "{what}: counts");
                assert_eq!(counts, [0.0, high as u32 as f32], "{what}: decision");
                let mut want = be.zeros(rows).unwrap();
                be.anyprec_linear(&w, plain, 1, low + high as u32, &mut want);
                let want = be.download(want).unwrap();
                assert_close(&what, &be.download(y1).unwrap(), &want, 1e-5);
                assert_close(&what, &be.download(y2).unwrap(), &want, 1e-5);
            }
        }
    }
}
