//! Quantize: f32/f16/bf16 vectors → packed indices + f32 norms.
//!
//! Per vector (the order the CUDA kernel mirrors):
//! 1. y = H(D x) ([`crate::rotation`]);
//! 2. head_dim ≤ 256: n = sqrt(pairwise Σ y²), stored; scale = sqrt_d / n (0 if n ≤ 1e-10);
//!    head_dim > 256: per 256-block b, r_b = sqrt(pairwise Σ_b y²) / 16, stored;
//!    scale_b = sf / r_b (0 if r_b ≤ 1e-10);
//! 3. u_i = y_i · scale (one rounding); idx_i = number of codebook boundaries < u_i;
//! 4. pack ([`crate::pack`]).

use std::sync::OnceLock;

use rayon::prelude::*;

use super::PARALLEL_MIN_VECTORS;
use crate::codebook::Codebook;
use crate::codec::{Codec, NORM_EPS};
use crate::dtype::Src;
use crate::error::{invalid, Result};
use crate::layout::Side;
use crate::pack::pack_row;
use crate::rotation::sum_squares_pairwise;

/// A vector whose norm is not finite (NaN or ±inf in the input, or squares that overflow f32).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct NonFinite;

/// Index of the nearest centroid by branch-free binary search over the boundaries
/// (ties to the lower index; identical to counting boundaries `< u`).
#[inline(always)]
fn nearest(boundaries: &[f32], u: f32) -> u8 {
    let mut idx = 0usize;
    let mut step = boundaries.len().div_ceil(2);
    while step > 0 {
        if boundaries[idx + step - 1] < u {
            idx += step;
        }
        step /= 2;
    }
    idx as u8
}

/// Boundaries up to which counting (vectorized across coordinates) beats the binary search.
const COUNT_MAX_BOUNDARIES: usize = 63;

/// Cells of [`Grid`].
const GRID_CELLS: usize = 2048;

/// A uniform grid over the span of the 8-bit codebook's boundaries: `start[c]` is the number of
/// boundaries below the left edge of cell c. It only gives a starting guess; a short scan in
/// both directions then finds the exact count of boundaries `< u`.
struct Grid {
    boundaries: Vec<f32>,
    lo: f32,
    inv_width: f32,
    start: Vec<u8>,
}

/// The grid of the 8-bit codebook, built once.
fn grid_8() -> Option<&'static Grid> {
    static GRID: OnceLock<Option<Grid>> = OnceLock::new();
    GRID.get_or_init(|| {
        let boundaries = Codebook::new(8).ok()?.boundaries;
        let (lo, hi) = (*boundaries.first()?, *boundaries.last()?);
        let inv_width = GRID_CELLS as f32 / (hi - lo);
        let start = (0..GRID_CELLS)
            .map(|c| {
                let edge = lo + c as f32 / inv_width;
                boundaries.iter().filter(|&&t| t < edge).count() as u8
            })
            .collect();
        Some(Grid {
            boundaries,
            lo,
            inv_width,
            start,
        })
    })
    .as_ref()
}

/// The number of `g.boundaries` (sorted, ascending) `< u`: equal to [`nearest`].
#[inline(always)]
fn grid_index(g: &Grid, u: f32) -> u8 {
    if u.is_nan() {
        return 0;
    }
    let b = &g.boundaries;
    // Negative and NaN products cast to 0; the guess only needs to be close.
    let c = (((u - g.lo) * g.inv_width) as usize).min(GRID_CELLS - 1);
    let mut i = g.start[c] as usize;
    while i < b.len() && b[i] < u {
        i += 1;
    }
    while i > 0 && b[i - 1] >= u {
        i -= 1;
    }
    i as u8
}

/// `idx_i` = number of boundaries `< y_i · scale` (one rounding for the product).
#[inline(always)]
fn indices(boundaries: &[f32], y: &[f32], scale: f32, idx: &mut [u8]) {
    if boundaries.len() > COUNT_MAX_BOUNDARIES {
        match grid_8().filter(|g| g.boundaries == boundaries) {
            Some(g) => {
                for (i, v) in idx.iter_mut().zip(y) {
                    *i = grid_index(g, v * scale);
                }
            }
            None => {
                for (i, v) in idx.iter_mut().zip(y) {
                    *i = nearest(boundaries, v * scale);
                }
            }
        }
        return;
    }
    let whole = y.len() / 32 * 32;
    for (i, v) in idx[whole..].iter_mut().zip(&y[whole..]) {
        *i = nearest(boundaries, v * scale);
    }
    for (yc, ic) in y.chunks_exact(32).zip(idx.chunks_exact_mut(32)) {
        let mut u = [0f32; 32];
        for (u, v) in u.iter_mut().zip(yc) {
            *u = v * scale;
        }
        let mut count = [0u8; 32];
        for &t in boundaries {
            for (c, u) in count.iter_mut().zip(&u) {
                *c += (t < *u) as u8;
            }
        }
        ic.copy_from_slice(&count);
    }
}

/// Quantizes one vector held in `y` (input x, overwritten by its rotation) into `row` and
/// `norms` (`norms_per_pos` entries). `idx` is scratch of `head_dim` bytes.
#[inline]
pub(crate) fn quantize_vector(
    codec: &Codec,
    cb: &Codebook,
    y: &mut [f32],
    idx: &mut [u8],
    row: &mut [u8],
    norms: &mut [f32],
) -> std::result::Result<(), NonFinite> {
    codec.rotation().forward(y);
    let d = y.len();
    if d <= 256 {
        let n = sum_squares_pairwise(y).sqrt();
        if !n.is_finite() {
            return Err(NonFinite);
        }
        norms[0] = n;
        let scale = if n > NORM_EPS {
            codec.sqrt_d() / n
        } else {
            0.0
        };
        indices(&cb.boundaries, y, scale, idx);
    } else {
        let sf = codec.layout().scale_factor_d512;
        for ((yb, ib), nb) in y
            .chunks_exact(256)
            .zip(idx.chunks_exact_mut(256))
            .zip(norms)
        {
            let r = sum_squares_pairwise(yb).sqrt() / 16.0;
            if !r.is_finite() {
                return Err(NonFinite);
            }
            *nb = r;
            let scale = if r > NORM_EPS { sf / r } else { 0.0 };
            indices(&cb.boundaries, yb, scale, ib);
        }
    }
    pack_row(cb.bits, idx, row);
    Ok(())
}

/// Quantizes `n_tokens` vectors `src: [n_tokens, num_kv_heads, head_dim]` of one side into the
/// packed plane `[num_kv_heads, capacity, row_bytes]` and norms plane, token t at logical
/// position `write_pos + t`. A ring cache keeps only the last `capacity` tokens of a longer
/// request; a global cache rejects a request that ends past `capacity`. On a non-finite input
/// vector the call fails and the slots of that head from the failing token on are unwritten.
pub fn quantize(
    codec: &Codec,
    side: Side,
    src: Src<'_>,
    n_tokens: usize,
    write_pos: usize,
    packed: &mut [u8],
    norms: &mut [f32],
) -> Result<()> {
    let op = "quantize";
    let Some(plan) = codec.plan_quantize(
        op,
        side,
        src.len(),
        n_tokens,
        write_pos,
        packed.len(),
        norms.len(),
    )?
    else {
        return Ok(());
    };
    let l = *codec.layout();
    let (d, heads, cap) = (l.head_dim, l.num_kv_heads, l.capacity);
    let (row_bytes, npp) = (l.row_bytes(side), l.norms_per_pos());
    let cb = codec.codebook(side);
    let head_job = |(h, (packed_h, norms_h)): (usize, (&mut [u8], &mut [f32]))| {
        let mut y = [0f32; 1024];
        let mut idx = [0u8; 1024];
        for j in 0..plan.n_write {
            let t = plan.skip + j;
            let slot = l.slot(plan.first_pos + j);
            let y = &mut y[..d];
            src.read_f32((t * heads + h) * d, y);
            let row = &mut packed_h[slot * row_bytes..(slot + 1) * row_bytes];
            let nrm = &mut norms_h[slot * npp..(slot + 1) * npp];
            if quantize_vector(codec, cb, y, &mut idx[..d], row, nrm).is_err() {
                return Err((t, h));
            }
        }
        Ok(())
    };
    let planes = packed
        .chunks_mut(cap * row_bytes)
        .zip(norms.chunks_mut(cap * npp))
        .enumerate();
    let outcome: std::result::Result<(), (usize, usize)> =
        if plan.n_write * heads >= PARALLEL_MIN_VECTORS {
            planes
                .collect::<Vec<_>>()
                .into_par_iter()
                .map(head_job)
                .collect()
        } else {
            planes.map(head_job).try_for_each(|r| r)
        };
    if let Err((t, h)) = outcome {
        invalid!("{op}: input token {t}, head {h} has a non-finite value (or overflows f32 when squared)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_index_equals_the_binary_search_everywhere() {
        let g = grid_8().expect("8-bit grid");
        let b = &g.boundaries;
        let mut probes = vec![
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            0.0,
            -0.0,
            1e30,
            -1e30,
        ];
        for &t in b {
            probes.extend([t, t.next_up(), t.next_down()]);
        }
        // A dense sweep of [-6, 6] and every cell edge.
        probes.extend((0..200_000).map(|i| -6.0 + i as f32 * 6e-5));
        probes.extend((0..=GRID_CELLS).map(|c| g.lo + c as f32 / g.inv_width));
        for u in probes {
            assert_eq!(grid_index(g, u), nearest(b, u), "u = {u:e}");
        }
    }
}
