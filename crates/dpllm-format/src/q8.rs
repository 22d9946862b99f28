//! 8-bit block weights, as llama.cpp's Q8_0: each row in blocks of 32 signed
//! bytes sharing one f16 scale; an element is scale · q, exact in f32. The
//! engine keeps an output layer stored this way in this form (a quarter of f32).

use half::f16;

/// Elements per block.
pub const Q8_BLOCK: usize = 32;

/// A [rows × cols] matrix of Q8_0 blocks (cols a multiple of 32).
#[derive(Debug, Clone, PartialEq)]
pub struct Q8Matrix {
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// One scale per block, [rows × cols/32].
    pub scales: Vec<f16>,
    /// The signed bytes, [rows × cols].
    pub quants: Vec<i8>,
}

impl Q8Matrix {
    /// Parse GGUF Q8_0 blocks (2-byte f16 scale, then 32 bytes) of a [rows × cols] tensor;
    /// None when the sizes do not match.
    pub fn from_gguf_blocks(bytes: &[u8], rows: usize, cols: usize) -> Option<Q8Matrix> {
        let blocks = rows.checked_mul(cols)? / Q8_BLOCK;
        if !cols.is_multiple_of(Q8_BLOCK) || bytes.len() != blocks * (2 + Q8_BLOCK) {
            return None;
        }
        let mut scales = Vec::with_capacity(blocks);
        let mut quants = Vec::with_capacity(rows * cols);
        for b in bytes.chunks_exact(2 + Q8_BLOCK) {
            scales.push(f16::from_bits(u16::from_le_bytes([b[0], b[1]])));
            quants.extend(b[2..].iter().map(|&q| q as i8));
        }
        Some(Q8Matrix {
            rows,
            cols,
            scales,
            quants,
        })
    }

    /// Row `r` as f32 into `out` (len = cols).
    pub fn row_f32(&self, r: usize, out: &mut [f32]) {
        let nb = self.cols / Q8_BLOCK;
        let q = &self.quants[r * self.cols..(r + 1) * self.cols];
        for ((o, q), s) in out
            .chunks_mut(Q8_BLOCK)
            .zip(q.chunks(Q8_BLOCK))
            .zip(&self.scales[r * nb..(r + 1) * nb])
        {
            let d = s.to_f32();
            for (o, &q) in o.iter_mut().zip(q) {
                *o = q as f32 * d;
            }
        }
    }

    /// The whole matrix as f32.
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        for (r, row) in out.chunks_mut(self.cols.max(1)).enumerate() {
            self.row_f32(r, row);
        }
        out
    }

    /// Bytes held (what a pass over the matrix reads).
    pub fn nbytes(&self) -> usize {
        self.quants.len() + 2 * self.scales.len()
    }

    /// Index of the first block whose scale is not finite.
    pub fn first_non_finite_scale(&self) -> Option<usize> {
        self.scales.iter().position(|s| !s.is_finite())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_parse_and_dequantize_exactly() {
        let mut bytes = Vec::new();
        for (s, base) in [(0.5f32, 1i8), (-2.0, -3)] {
            bytes.extend(f16::from_f32(s).to_bits().to_le_bytes());
            bytes.extend((0..32).map(|j| (base.wrapping_add(j as i8)) as u8));
        }
        let m = Q8Matrix::from_gguf_blocks(&bytes, 2, 32).unwrap();
        let w = m.to_f32();
        assert_eq!(w[0], 0.5);
        assert_eq!(w[5], 0.5 * 6.0);
        assert_eq!(w[32], -2.0 * -3.0);
        assert_eq!(m.nbytes(), 64 + 4);
        assert!(Q8Matrix::from_gguf_blocks(&bytes, 2, 16).is_none());
        assert!(Q8Matrix::from_gguf_blocks(&bytes[1..], 2, 32).is_none());
    }
}
