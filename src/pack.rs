//! Bit packing of codebook indices into one cache row.
//!
//! A row holds the `head_dim` indices of one vector:
//! - 2 bits: four per byte; coordinate `4i + k` in bits `2k..2k+2` of byte i (4i lowest);
//! - 3 bits: a dense little-endian bit stream; coordinate j in stream bits `3j..3j+3`, stream bit
//!   m is bit `m % 8` of byte `m / 8` (eight indices in three bytes);
//! - 4 bits: two per byte; even coordinate in the low nibble;
//! - 5, 6, 8 bits: one byte per index, in the low bits.

/// Bytes of one packed row: `head_dim * bits / 8` for 2/3/4 bits, `head_dim` for 5/6/8 bits.
/// `head_dim` must be a multiple of 8 (any supported head_dim is).
pub const fn row_bytes(bits: u32, head_dim: usize) -> usize {
    match bits {
        2..=4 => head_dim * bits as usize / 8,
        _ => head_dim,
    }
}

/// Packs `idx` (each `< 2^bits`) into `row` (`row_bytes(bits, idx.len())` bytes).
#[inline]
pub fn pack_row(bits: u32, idx: &[u8], row: &mut [u8]) {
    match bits {
        2 => {
            for (b, q) in row.iter_mut().zip(idx.chunks_exact(4)) {
                *b = q[0] | (q[1] << 2) | (q[2] << 4) | (q[3] << 6);
            }
        }
        3 => {
            for (b, q) in row.chunks_exact_mut(3).zip(idx.chunks_exact(8)) {
                let v = q
                    .iter()
                    .enumerate()
                    .fold(0u32, |acc, (k, &i)| acc | (i as u32) << (3 * k));
                b.copy_from_slice(&v.to_le_bytes()[..3]);
            }
        }
        4 => {
            for (b, q) in row.iter_mut().zip(idx.chunks_exact(2)) {
                *b = q[0] | (q[1] << 4);
            }
        }
        _ => row.copy_from_slice(idx),
    }
}

/// Unpacks `row` into `idx` (`idx.len()` indices), the inverse of [`pack_row`]; every index is
/// below `2^bits` whatever the bytes hold.
#[inline]
pub fn unpack_row(bits: u32, row: &[u8], idx: &mut [u8]) {
    match bits {
        2 => {
            for (q, &b) in idx.chunks_exact_mut(4).zip(row) {
                q[0] = b & 3;
                q[1] = (b >> 2) & 3;
                q[2] = (b >> 4) & 3;
                q[3] = b >> 6;
            }
        }
        3 => {
            for (q, b) in idx.chunks_exact_mut(8).zip(row.chunks_exact(3)) {
                let v = u32::from_le_bytes([b[0], b[1], b[2], 0]);
                for (k, i) in q.iter_mut().enumerate() {
                    *i = ((v >> (3 * k)) & 7) as u8;
                }
            }
        }
        4 => {
            for (q, &b) in idx.chunks_exact_mut(2).zip(row) {
                q[0] = b & 15;
                q[1] = b >> 4;
            }
        }
        8 => idx.copy_from_slice(&row[..idx.len()]),
        _ => {
            // 5 and 6 bits: the high bits of a byte are not part of the index (readers ignore
            // them, so a corrupt byte still indexes inside the codebook).
            let mask = ((1u32 << bits) - 1) as u8;
            for (i, &b) in idx.iter_mut().zip(row) {
                *i = b & mask;
            }
        }
    }
}
