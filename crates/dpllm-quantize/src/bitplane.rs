//! Packing 8-bit indices into the bit-plane layout of `docs/format.md`.

/// Pack one row's 8-bit indices into 8 planes of `ceil(n/32)` words each:
/// `out[j * words + w]` bit t = bit (7 − j) of `indices[32w + t]`.
pub fn pack_row(indices: &[u8], out: &mut [u32]) {
    let words = indices.len().div_ceil(32);
    assert_eq!(out.len(), 8 * words);
    out.fill(0);
    for (c, &v) in indices.iter().enumerate() {
        let (w, t) = (c / 32, c % 32);
        for j in 0..8 {
            out[j * words + w] |= (((v >> (7 - j)) & 1) as u32) << t;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn planes_hold_bits_msb_first() {
        let idx: Vec<u8> = (0..40).map(|i| (i * 37 % 256) as u8).collect();
        let mut p = vec![0u32; 16];
        pack_row(&idx, &mut p);
        for (c, &v) in idx.iter().enumerate() {
            let mut back = 0u8;
            for j in 0..8 {
                back |= (((p[j * 2 + c / 32] >> (c % 32)) & 1) as u8) << (7 - j);
            }
            assert_eq!(back, v);
        }
        // Padding bits of the last word stay zero.
        assert!((0..8).all(|j| p[j * 2 + 1] >> 8 == 0));
    }
}
