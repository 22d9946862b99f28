//! Any-precision weights: bit-planes + per-row centroid tables, run at any
//! bit-width from the seed precision up to the loaded maximum.

use std::sync::OnceLock;

use half::f16;

use super::add_bias;
use super::bitplane::{dequantize_row, BitplaneKernel, KernelLuts};
use super::matmul::{gemv_row_ranges, matmul_tiled, GEMV_MAX_TOKENS};
use crate::backend::AnyPrecHost;

/// A quantized linear holding planes 0..max_bits and LUTs seed_bits..=max_bits.
pub struct AnyPrecLinear {
    rows: usize,
    cols: usize,
    words: usize,
    seed_bits: u32,
    max_bits: u32,
    /// Plane-major: [max_bits][rows][words].
    planes: Vec<u32>,
    /// luts[b - seed_bits]: [rows × 2^b].
    luts: Vec<Vec<f16>>,
    /// own_luts[k][b]: the LUTs at b bits in the form of kernel k (by its
    /// place in [`BitplaneKernel::ALL`]) where it has one
    /// ([`BitplaneKernel::has_own_luts`]), made on its first GEMV at b bits.
    /// Only the kernel a run uses makes any; benchmarks compare several.
    #[allow(clippy::type_complexity)]
    own_luts: [[OnceLock<Option<KernelLuts>>; 9]; BitplaneKernel::ALL.len()],
    bias: Option<Vec<f32>>,
}

impl AnyPrecLinear {
    /// Build from planes laid out plane-major, [max_bits][rows][ceil(cols/32)], and LUTs for seed..=max bits.
    pub fn new(
        rows: usize,
        cols: usize,
        seed_bits: u32,
        max_bits: u32,
        planes: Vec<u32>,
        luts: Vec<Vec<f16>>,
        bias: Option<Vec<f32>>,
    ) -> AnyPrecLinear {
        let words = cols.div_ceil(32);
        assert!(seed_bits <= max_bits && max_bits <= 8);
        assert_eq!(
            planes.len(),
            rows * max_bits as usize * words,
            "planes size"
        );
        assert_eq!(
            luts.len(),
            (max_bits - seed_bits + 1) as usize,
            "one LUT per bit-width"
        );
        for (i, l) in luts.iter().enumerate() {
            assert_eq!(l.len(), rows << (seed_bits as usize + i), "LUT size");
        }
        AnyPrecLinear {
            rows,
            cols,
            words,
            seed_bits,
            max_bits,
            planes,
            luts,
            own_luts: Default::default(),
            bias,
        }
    }

    /// [`AnyPrecHost::random`] as a CPU layer: for tests and benchmarks.
    pub fn random(rows: usize, cols: usize, max_bits: u32, seed: u64) -> AnyPrecLinear {
        AnyPrecLinear::from_host(AnyPrecHost::random(rows, cols, max_bits, seed))
    }

    /// Lowest runnable precision.
    pub fn seed_bits(&self) -> u32 {
        self.seed_bits
    }

    /// Highest loaded precision.
    pub fn max_bits(&self) -> u32 {
        self.max_bits
    }

    /// Ok when the layer can run at `bits` (seed..=max loaded), else why not.
    pub fn check_bits(&self, bits: u32) -> Result<(), String> {
        crate::backend::check_bits_in(bits, self.seed_bits, self.max_bits)
    }

    /// Row r's words of plane 0 onwards; plane j of the row starts `plane_stride()` words later each.
    fn row_planes(&self, r: usize) -> &[u32] {
        &self.planes[r * self.words..]
    }

    /// Words between consecutive planes of one row.
    fn plane_stride(&self) -> usize {
        self.rows * self.words
    }

    fn lut(&self, bits: u32, r: usize) -> &[f16] {
        let k = 1usize << bits;
        &self.luts[(bits - self.seed_bits) as usize][r * k..(r + 1) * k]
    }

    /// `y = x·W_bᵀ (+ b)` at an explicit precision.
    pub fn forward_bits(&self, x: &[f32], n: usize, y: &mut [f32], bits: u32) {
        self.forward_bits_with(x, n, y, bits, BitplaneKernel::best())
    }

    /// [`AnyPrecLinear::forward_bits`] with a chosen GEMV kernel (for benchmarks and tests).
    pub fn forward_bits_with(
        &self,
        x: &[f32],
        n: usize,
        y: &mut [f32],
        bits: u32,
        kernel: BitplaneKernel,
    ) {
        assert!(self.check_bits(bits).is_ok(), "bits out of range");
        let (rows, cols, stride) = (self.rows, self.cols, self.plane_stride());
        if n <= GEMV_MAX_TOKENS {
            let xp = kernel.prepare(x, cols);
            let luts = &self.luts[(bits - self.seed_bits) as usize];
            let own = kernel
                .has_own_luts()
                .then(|| {
                    self.own_luts[kernel as usize][bits as usize]
                        .get_or_init(|| kernel.kernel_luts(bits, luts))
                        .as_ref()
                })
                .flatten();
            gemv_row_ranges(rows, n, y, |t, range, out| {
                xp.dot_rows(t, &self.planes, stride, bits, luts, own, range, out)
            });
        } else {
            matmul_tiled(rows, cols, x, n, y, |r0, tile| {
                for (i, out) in tile.chunks_mut(cols).enumerate() {
                    dequantize_row(
                        self.row_planes(r0 + i),
                        stride,
                        bits,
                        self.lut(bits, r0 + i),
                        out,
                    );
                }
            });
        }
        add_bias(y, self.bias.as_deref());
    }

    /// The weight dequantized at `bits`, [rows × cols].
    pub fn dequantize(&self, bits: u32) -> Vec<f32> {
        dequantize_planes(
            &self.planes,
            self.rows,
            self.cols,
            bits,
            &self.luts[(bits - self.seed_bits) as usize],
        )
    }

    /// A copy of the planes, LUTs and bias in the file's form (for a backend
    /// or a pass that keeps the weight apart from this model).
    pub fn to_host(&self) -> AnyPrecHost {
        AnyPrecHost {
            rows: self.rows,
            cols: self.cols,
            seed_bits: self.seed_bits,
            max_bits: self.max_bits,
            planes: self.planes.clone(),
            luts: self.luts.clone(),
            bias: self.bias.clone(),
        }
    }

    /// Bytes read by one forward at `bits`: b planes + the f16 LUT of each row.
    pub fn bytes_at(&self, bits: u32) -> usize {
        dpllm_format::anyprec::bytes_at(self.rows, self.cols, bits)
    }
}

impl AnyPrecLinear {
    /// Take a weight as read from the file.
    pub fn from_host(w: AnyPrecHost) -> AnyPrecLinear {
        AnyPrecLinear::new(
            w.rows,
            w.cols,
            w.seed_bits,
            w.max_bits,
            w.planes,
            w.luts,
            w.bias,
        )
    }

    /// Output features.
    pub fn out_features(&self) -> usize {
        self.rows
    }

    /// Input features.
    pub fn in_features(&self) -> usize {
        self.cols
    }

    /// The bias, if any.
    pub fn bias(&self) -> Option<&[f32]> {
        self.bias.as_deref()
    }
}

/// Plane-major weights (`[bits…][rows][ceil(cols/32)]` words, as
/// [`AnyPrecHost::planes`]) dequantized at `bits` through `lut` ([rows × 2^bits]),
/// [rows × cols], rows in parallel.
pub fn dequantize_planes(
    planes: &[u32],
    rows: usize,
    cols: usize,
    bits: u32,
    lut: &[f16],
) -> Vec<f32> {
    use rayon::prelude::*;
    let (words, k) = (cols.div_ceil(32), 1usize << bits);
    let mut out = vec![0f32; rows * cols];
    out.par_chunks_mut(cols.max(1))
        .enumerate()
        .for_each(|(r, row)| {
            dequantize_row(
                &planes[r * words..],
                rows * words,
                bits,
                &lut[r * k..(r + 1) * k],
                row,
            );
        });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random_layer(rng: &mut impl Rng, rows: usize, cols: usize, max_bits: u32) -> AnyPrecLinear {
        let mut l = AnyPrecLinear::random(rows, cols, max_bits, rng.random());
        l.bias = Some((0..rows).map(|_| rng.random_range(-1.0..1.0)).collect());
        l
    }

    #[test]
    fn forward_matches_dequantized_reference_every_bits_and_path() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        for &(rows, cols) in &[(5usize, 33usize), (40, 64), (17, 300)] {
            let layer = random_layer(&mut rng, rows, cols, 8);
            for bits in 3..=8 {
                let w = layer.dequantize(bits);
                // Every kernel this CPU has, each with its own LUT form made once.
                for (n, kernel) in [1usize, 3, 9]
                    .into_iter()
                    .flat_map(|n| BitplaneKernel::available().into_iter().map(move |k| (n, k)))
                {
                    let x: Vec<f32> = (0..n * cols).map(|_| rng.random_range(-1.0..1.0)).collect();
                    let mut y = vec![0f32; n * rows];
                    layer.forward_bits_with(&x, n, &mut y, bits, kernel);
                    for t in 0..n {
                        for r in 0..rows {
                            let (wr, xt) = (&w[r * cols..][..cols], &x[t * cols..][..cols]);
                            let want: f64 = wr
                                .iter()
                                .zip(xt)
                                .map(|(&w, &x)| w as f64 * x as f64)
                                .sum::<f64>()
                                + layer.bias.as_ref().unwrap()[r] as f64;
                            // The fastest kernel may round both operands, which lie in
                            // [-1, 1]: activations to half of 1/32767, LUTs of 1/16383.
                            let rounding: f64 = wr
                                .iter()
                                .zip(xt)
                                .map(|(&w, &x)| w.abs() as f64 / 65534.0 + x.abs() as f64 / 32766.0)
                                .sum();
                            let got = y[t * rows + r] as f64;
                            assert!(
                                (got - want).abs() < 1e-4 + rounding,
                                "{} bits={bits} n={n} {rows}x{cols}: {got} vs {want}",
                                kernel.name()
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn bits_outside_loaded_range_are_rejected() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let layer = random_layer(&mut rng, 4, 32, 5);
        assert!(layer.check_bits(6).is_err());
        assert!(layer.check_bits(2).is_err());
        layer.check_bits(4).unwrap();
        assert_eq!(layer.bytes_at(4), 4 * (4 * 4 + 32));
    }
}
