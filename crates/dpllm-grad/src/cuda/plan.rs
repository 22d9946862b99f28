//! The matrix products of the GPU gradient ops as data: [`blas_config`], the
//! cuBLAS (column-major) call for a row-major product, and
//! [`attention_plan`], attention's products per GQA position. Both are
//! checked on the host against cuBLAS's semantics and the CPU's attention.

use dpllm_engine::backend::cpu::attention::AttnShape;
use dpllm_engine::backend::cuda::cudarc::cublas::sys::cublasOperation_t;
use dpllm_engine::backend::cuda::cudarc::cublas::{GemmConfig, StridedBatchedConfig};

/// One row-major matrix operand of a (batched) product: where it starts in
/// its buffer, its row stride, and the stride between the batch's matrices.
#[derive(Clone, Copy, Debug)]
pub(super) struct Mat {
    pub(super) off: usize,
    pub(super) ld: usize,
    pub(super) stride: usize,
}

impl Mat {
    pub(super) fn new(off: usize, ld: usize, stride: usize) -> Mat {
        Mat { off, ld, stride }
    }
}

/// cuBLAS's (column-major) call for the row-major product `C [m × n] =
/// op(A) [m × k] · op(B) [k × n] + beta · C`, `batch` times: Cᵀ = op(B)ᵀ ·
/// op(A)ᵀ, so B (from `mb.off`) is cuBLAS's first operand and A its second.
pub(super) fn blas_config(
    (ta, tb): (bool, bool),
    (m, n, k): (usize, usize, usize),
    (ma, mb, mc): (Mat, Mat, Mat),
    beta: f32,
    batch: usize,
) -> StridedBatchedConfig<f32> {
    let op = |t: bool| match t {
        true => cublasOperation_t::CUBLAS_OP_T,
        false => cublasOperation_t::CUBLAS_OP_N,
    };
    StridedBatchedConfig {
        gemm: GemmConfig {
            transa: op(tb),
            transb: op(ta),
            m: n as i32,
            n: m as i32,
            k: k as i32,
            alpha: 1f32,
            lda: mb.ld as i32,
            ldb: ma.ld as i32,
            beta,
            ldc: mc.ld as i32,
        },
        batch_size: batch as i32,
        stride_a: mb.stride as i64,
        stride_b: ma.stride as i64,
        stride_c: mc.stride as i64,
    }
}

/// The operands of attention's products: inputs q, k, v and the output's
/// gradient, the probabilities P and score gradients dS [heads × n × n], and
/// the outputs.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub(super) enum Operand {
    Q,
    K,
    V,
    DOut,
    P,
    DS,
    Out,
    DQ,
    DK,
    DV,
}

/// One batched product `C = op(A) · op(B) + beta · C` of a plan (row-major, as [`CudaGrad::gemm`] takes it).
#[derive(Clone, Copy, Debug)]
pub(super) struct Product {
    pub(super) trans: (bool, bool),
    pub(super) dims: (usize, usize, usize),
    pub(super) a: (Operand, Mat),
    pub(super) b: (Operand, Mat),
    pub(super) beta: f32,
    pub(super) c: (Operand, Mat),
    pub(super) batch: usize,
}

/// The stages of attention made of products; the softmax and its backward
/// run between them.
#[derive(Clone, Copy, Debug)]
pub(super) enum Stage {
    /// P = Q · Kᵀ (scores; the softmax follows).
    Scores,
    /// Out = P · V.
    Output,
    /// dS = dOut · Vᵀ (the softmax backward follows).
    ScoreGrad,
    /// dQ = dS · K, dK = Σ dSᵀ · Q, dV = Σ Pᵀ · dOut (over each KV head's group).
    InputGrads,
}

/// The products of `stage` for attention of shape `s` over `n` tokens. Query
/// head h = kv·g + j of a group of g shares KV head kv: each product is
/// batched over the KV heads for one j, the j-th heads `g · head_dim` apart.
pub(super) fn attention_plan(s: AttnShape, n: usize, stage: Stage) -> Vec<Product> {
    use Operand::*;
    let (nh, nkv, hd) = (s.num_heads, s.num_kv_heads, s.head_dim);
    let (qd, kvd, g) = (nh * hd, nkv * hd, nh / nkv);
    // Where operand o of query position j starts and how it is laid out.
    let mat = |o: Operand, j: usize| match o {
        Q | DOut | Out | DQ => Mat::new(j * hd, qd, g * hd),
        K | V | DK | DV => Mat::new(0, kvd, hd),
        P | DS => Mat::new(j * n * n, n, g * n * n),
    };
    let (scores, rows) = ((n, n, hd), (n, hd, n));
    // (transposes, dims, A, B, C) of each product.
    let steps = match stage {
        Stage::Scores => vec![((false, true), scores, Q, K, P)],
        Stage::Output => vec![((false, false), rows, P, V, Out)],
        Stage::ScoreGrad => vec![((false, true), scores, DOut, V, DS)],
        Stage::InputGrads => vec![
            ((false, false), rows, DS, K, DQ),
            ((true, false), rows, DS, Q, DK),
            ((true, false), rows, P, DOut, DV),
        ],
    };
    let mut plan = Vec::new();
    for j in 0..g {
        for &(trans, dims, a, b, c) in &steps {
            plan.push(Product {
                trans,
                dims,
                a: (a, mat(a, j)),
                b: (b, mat(b, j)),
                // A KV head's gradients sum over its group's query heads.
                beta: if j > 0 && matches!(c, DK | DV) {
                    1.0
                } else {
                    0.0
                },
                c: (c, mat(c, j)),
                batch: nkv,
            });
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// cuBLAS's SGEMM strided-batched semantics (column-major) on the host.
    fn sgemm_host(cfg: &StridedBatchedConfig<f32>, a: &[f32], b: &[f32], c: &mut [f32]) {
        let g = cfg.gemm;
        let (m, n, k) = (g.m as usize, g.n as usize, g.k as usize);
        let (lda, ldb, ldc) = (g.lda as usize, g.ldb as usize, g.ldc as usize);
        let n_op = cublasOperation_t::CUBLAS_OP_N;
        for bi in 0..cfg.batch_size as usize {
            let (a, b) = (
                &a[bi * cfg.stride_a as usize..],
                &b[bi * cfg.stride_b as usize..],
            );
            let c = &mut c[bi * cfg.stride_c as usize..];
            for j in 0..n {
                for i in 0..m {
                    let s: f32 = (0..k)
                        .map(|p| {
                            let x = if g.transa == n_op {
                                a[i + p * lda]
                            } else {
                                a[p + i * lda]
                            };
                            let y = if g.transb == n_op {
                                b[p + j * ldb]
                            } else {
                                b[j + p * ldb]
                            };
                            x * y
                        })
                        .sum();
                    c[i + j * ldc] = g.alpha * s + g.beta * c[i + j * ldc];
                }
            }
        }
    }

    /// The call [`blas_config`] makes computes the row-major product, for every
    /// transposition, with offsets, padded rows and batches.
    #[test]
    fn blas_config_is_the_row_major_product() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
            let (m, n, k, batch, beta) = (5, 3, 4, 3, 0.5f32);
            let (ar, ac) = if ta { (k, m) } else { (m, k) };
            let (br, bc) = if tb { (n, k) } else { (k, n) };
            let ma = Mat::new(2, ac + 1, ar * (ac + 1) + 3);
            let mb = Mat::new(1, bc + 2, br * (bc + 2) + 1);
            let mc = Mat::new(3, n + 3, m * (n + 3) + 2);
            let len = |x: Mat, rows: usize| x.off + batch * x.stride + rows * x.ld;
            let mut r = |len: usize| {
                (0..len)
                    .map(|_| rng.random_range(-1.0f32..1.0))
                    .collect::<Vec<_>>()
            };
            let (a, b, c0) = (r(len(ma, ar)), r(len(mb, br)), r(len(mc, m)));
            let mut c = c0.clone();
            let cfg = blas_config((ta, tb), (m, n, k), (ma, mb, mc), beta, batch);
            sgemm_host(&cfg, &b[mb.off..], &a[ma.off..], &mut c[mc.off..]);
            for bi in 0..batch {
                for i in 0..m {
                    for j in 0..n {
                        let at =
                            |x: Mat, r: usize, cc: usize| x.off + bi * x.stride + r * x.ld + cc;
                        let want: f32 = (0..k)
                            .map(|p| {
                                let x = if ta { a[at(ma, p, i)] } else { a[at(ma, i, p)] };
                                let y = if tb { b[at(mb, j, p)] } else { b[at(mb, p, j)] };
                                x * y
                            })
                            .sum::<f32>()
                            + beta * c0[at(mc, i, j)];
                        let got = c[at(mc, i, j)];
                        assert!(
                            (got - want).abs() < 1e-5,
                            "{ta} {tb} batch {bi} ({i}, {j}): {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    /// Attention's plans, run on the host through [`blas_config`] and the
    /// kernels' softmax steps written out here, give the CPU's attention and
    /// its gradients (GQA groups, a sliding window).
    #[test]
    fn attention_plans_match_the_cpu() {
        use crate::backend::{CpuGrad, GradBackend};
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for (nh, nkv, hd, window, n) in [
            (6, 2, 4, None, 9),
            (4, 4, 3, Some(3), 7),
            (3, 1, 5, None, 1),
        ] {
            let s = AttnShape {
                num_heads: nh,
                num_kv_heads: nkv,
                head_dim: hd,
                window,
            };
            let [q, k, v, dout] = dpllm_testkit::random_attention_inputs(&mut rng, n, nh, nkv, hd);
            let run = |stage, bufs: &mut std::collections::HashMap<Operand, Vec<f32>>| {
                for p in attention_plan(s, n, stage) {
                    let cfg = blas_config(p.trans, p.dims, (p.a.1, p.b.1, p.c.1), p.beta, p.batch);
                    let (a, b) = (bufs[&p.a.0].clone(), bufs[&p.b.0].clone());
                    let c = bufs.get_mut(&p.c.0).unwrap();
                    sgemm_host(&cfg, &b[p.b.1.off..], &a[p.a.1.off..], &mut c[p.c.1.off..]);
                }
            };
            let scale = 1.0 / (hd as f32).sqrt();
            let mut bufs = std::collections::HashMap::from([
                (Operand::Q, q.clone()),
                (Operand::K, k.clone()),
                (Operand::V, v.clone()),
                (Operand::DOut, dout.clone()),
                (Operand::P, vec![0.0; nh * n * n]),
                (Operand::DS, vec![0.0; nh * n * n]),
                (Operand::Out, vec![0.0; q.len()]),
                (Operand::DQ, vec![0.0; q.len()]),
                (Operand::DK, vec![9.0; k.len()]),
                (Operand::DV, vec![9.0; v.len()]),
            ]);
            run(Stage::Scores, &mut bufs);
            // causal_softmax
            for (row, x) in bufs.get_mut(&Operand::P).unwrap().chunks_mut(n).enumerate() {
                let t = row % n;
                let lo = window.map_or(0, |w| (t + 1).saturating_sub(w));
                let m = (lo..=t).map(|j| x[j] * scale).fold(f32::MIN, f32::max);
                let sum: f32 = (lo..=t).map(|j| (x[j] * scale - m).exp()).sum();
                for (j, v) in x.iter_mut().enumerate() {
                    *v = if j >= lo && j <= t {
                        (*v * scale - m).exp() / sum
                    } else {
                        0.0
                    };
                }
            }
            run(Stage::Output, &mut bufs);
            run(Stage::ScoreGrad, &mut bufs);
            // softmax_backward
            let pr = bufs[&Operand::P].clone();
            for (x, p) in bufs
                .get_mut(&Operand::DS)
                .unwrap()
                .chunks_mut(n)
                .zip(pr.chunks(n))
            {
                let dot: f32 = x.iter().zip(p).map(|(a, b)| a * b).sum();
                x.iter_mut()
                    .zip(p)
                    .for_each(|(d, p)| *d = p * (*d - dot) * scale);
            }
            run(Stage::InputGrads, &mut bufs);
            let cpu = CpuGrad;
            let mut want = [
                vec![0f32; q.len()],
                vec![0f32; q.len()],
                vec![0f32; k.len()],
                vec![0f32; v.len()],
            ];
            let [o, dq, dk, dv] = &mut want;
            cpu.attention_forward(&q, &k, &v, s, o).unwrap();
            cpu.attention_backward(&q, &k, &v, &dout, s, dq, dk, dv)
                .unwrap();
            for (op, w) in [
                (Operand::Out, &want[0]),
                (Operand::DQ, &want[1]),
                (Operand::DK, &want[2]),
                (Operand::DV, &want[3]),
            ] {
                for (i, (a, b)) in bufs[&op].iter().zip(w.iter()).enumerate() {
                    assert!(
                        (a - b).abs() < 1e-4,
                        "{nh}/{nkv} heads, n={n}, {window:?}: {op:?}[{i}] {a} vs {b}"
                    );
                }
            }
        }
    }
}
