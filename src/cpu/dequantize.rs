//! Dequantize: packed indices + norms → vectors in the rotated or the original domain.
//!
//! Per vector: head_dim ≤ 256: g = n / sqrt_d; above: g_b = r_b / sf per 256-block;
//! `y_i = C[idx_i] · g` (one rounding). Original domain: x = D(H y) ([`crate::rotation`]).

use crate::codec::{Codec, Domain};
use crate::dtype::Dst;
use crate::error::Result;
use crate::layout::Side;
use crate::pack::unpack_row;

/// Dequantizes one packed `row` with its `norms` into `out` (`head_dim` values).
/// `idx` is scratch of `head_dim` bytes.
#[inline]
pub(crate) fn dequantize_vector(
    codec: &Codec,
    side: Side,
    row: &[u8],
    norms: &[f32],
    domain: Domain,
    idx: &mut [u8],
    out: &mut [f32],
) {
    let cb = codec.codebook(side);
    unpack_row(cb.bits, row, idx);
    let c = &cb.centroids;
    let d = out.len();
    if d <= 256 {
        let g = norms[0] / codec.sqrt_d();
        for (o, &i) in out.iter_mut().zip(idx.iter()) {
            *o = c[i as usize] * g;
        }
    } else {
        let sf = codec.layout().scale_factor_d512;
        for ((ob, ib), &r) in out
            .chunks_exact_mut(256)
            .zip(idx.chunks_exact(256))
            .zip(norms)
        {
            let g = r / sf;
            for (o, &i) in ob.iter_mut().zip(ib) {
                *o = c[i as usize] * g;
            }
        }
    }
    if domain == Domain::Original {
        codec.rotation().inverse(out);
    }
}

/// Dequantizes slots `start_pos..start_pos + n_tokens` of one side into
/// `dst: [num_kv_heads, n_tokens, head_dim]`. Positions are slots (`< capacity`): a ring cache's
/// caller maps logical positions first.
#[allow(clippy::too_many_arguments)]
pub fn dequantize_seq(
    codec: &Codec,
    side: Side,
    packed: &[u8],
    norms: &[f32],
    start_pos: usize,
    n_tokens: usize,
    domain: Domain,
    mut dst: Dst<'_>,
) -> Result<()> {
    if !codec.check_dequantize(
        "dequantize_seq",
        side,
        start_pos,
        n_tokens,
        packed.len(),
        norms.len(),
        dst.len(),
    )? {
        return Ok(());
    }
    dequantize_unchecked(
        codec, side, packed, norms, start_pos, n_tokens, domain, &mut dst,
    );
    Ok(())
}

/// Dequantizes slot `read_pos` of one side into `dst: [num_kv_heads, head_dim]`.
pub fn dequantize_pos(
    codec: &Codec,
    side: Side,
    packed: &[u8],
    norms: &[f32],
    read_pos: usize,
    domain: Domain,
    mut dst: Dst<'_>,
) -> Result<()> {
    if !codec.check_dequantize(
        "dequantize_pos",
        side,
        read_pos,
        1,
        packed.len(),
        norms.len(),
        dst.len(),
    )? {
        return Ok(());
    }
    dequantize_unchecked(codec, side, packed, norms, read_pos, 1, domain, &mut dst);
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn dequantize_unchecked(
    codec: &Codec,
    side: Side,
    packed: &[u8],
    norms: &[f32],
    start_pos: usize,
    n_tokens: usize,
    domain: Domain,
    dst: &mut Dst<'_>,
) {
    let l = codec.layout();
    let (d, cap) = (l.head_dim, l.capacity);
    let (row_bytes, npp) = (l.row_bytes(side), l.norms_per_pos());
    let mut out = [0f32; 1024];
    let mut idx = [0u8; 1024];
    for h in 0..l.num_kv_heads {
        for t in 0..n_tokens {
            let slot = h * cap + start_pos + t;
            dequantize_vector(
                codec,
                side,
                &packed[slot * row_bytes..(slot + 1) * row_bytes],
                &norms[slot * npp..(slot + 1) * npp],
                domain,
                &mut idx[..d],
                &mut out[..d],
            );
            dst.write_f32((h * n_tokens + t) * d, &out[..d]);
        }
    }
}
