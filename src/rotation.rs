//! The randomized Hadamard rotation y = H(D x) and its inverse x = D(H y).
//!
//! D = diag(s_j): `s_j = -1` when bit 63 of the j-th output of splitmix64 seeded with the
//! rotation seed is set, else `+1` (j = 0, 1, ..., head_dim - 1; the first output is j = 0).
//! H = Sylvester Walsh-Hadamard matrix / sqrt(d).
//!
//! Operation order (the CUDA kernels reproduce it bit for bit):
//! - forward: `x_j * s_j` (exact), then the butterflies, then `* inv_sqrt_d`;
//! - inverse: the butterflies, then `* inv_sqrt_d`, then `* s_j` (exact);
//! - butterflies: stages h = 1, 2, 4, ..., d/2; each stage maps every pair (i, i + h) with
//!   `i & h == 0` to `(a + b, a - b)`. Within a stage the order does not matter (each output is
//!   one rounding of two previous-stage values), so any loop nest that keeps the stage order is
//!   bit-identical.
//! - `inv_sqrt_d = (1 / sqrt(d as f64)) as f32`; one multiply per coordinate, never fused.

use crate::error::{invalid, Result};

/// splitmix64: advances `state` by the golden-ratio increment and returns the mixed output.
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The rotation for one head dimension and seed. The same rotation serves every head, K and V.
#[derive(Debug, Clone, PartialEq)]
pub struct Rotation {
    signs: Vec<f32>,
    inv_sqrt_d: f32,
}

impl Rotation {
    /// Builds the rotation; `head_dim` must be a power of two (any, including 1).
    pub fn new(head_dim: usize, seed: u64) -> Result<Self> {
        if !head_dim.is_power_of_two() {
            invalid!("rotation: head_dim must be a power of two, got {head_dim}");
        }
        let mut state = seed;
        let signs = (0..head_dim)
            .map(|_| {
                if splitmix64(&mut state) >> 63 == 1 {
                    -1.0
                } else {
                    1.0
                }
            })
            .collect();
        Ok(Self {
            signs,
            inv_sqrt_d: (1.0 / (head_dim as f64).sqrt()) as f32,
        })
    }

    /// The head dimension d.
    pub fn head_dim(&self) -> usize {
        self.signs.len()
    }

    /// The signs s_j, each ±1.0.
    pub fn signs(&self) -> &[f32] {
        &self.signs
    }

    /// `(1 / sqrt(d)) as f32`, the normalization multiplier.
    pub fn inv_sqrt_d(&self) -> f32 {
        self.inv_sqrt_d
    }

    /// In place: x ← H(D x). `x.len()` must equal the head dimension (not checked: internal).
    #[inline]
    pub fn forward(&self, x: &mut [f32]) {
        for (v, s) in x.iter_mut().zip(&self.signs) {
            *v *= s;
        }
        fwht(x);
        for v in x.iter_mut() {
            *v *= self.inv_sqrt_d;
        }
    }

    /// In place: y ← D(H y), the inverse of [`Rotation::forward`].
    #[inline]
    pub fn inverse(&self, y: &mut [f32]) {
        fwht(y);
        for (v, s) in y.iter_mut().zip(&self.signs) {
            *v = *v * self.inv_sqrt_d * s;
        }
    }
}

/// Unnormalized fast Walsh-Hadamard transform in place, stages h = 1, 2, ..., len/2.
/// The first three stages run in registers on 8-element chunks (same results, fewer passes).
#[inline]
pub fn fwht(x: &mut [f32]) {
    let n = x.len();
    let mut h = 1;
    if n >= 8 {
        for c in x.chunks_exact_mut(8) {
            let (a0, a1, a2, a3) = (c[0] + c[1], c[0] - c[1], c[2] + c[3], c[2] - c[3]);
            let (a4, a5, a6, a7) = (c[4] + c[5], c[4] - c[5], c[6] + c[7], c[6] - c[7]);
            let (b0, b1, b2, b3) = (a0 + a2, a1 + a3, a0 - a2, a1 - a3);
            let (b4, b5, b6, b7) = (a4 + a6, a5 + a7, a4 - a6, a5 - a7);
            c[0] = b0 + b4;
            c[1] = b1 + b5;
            c[2] = b2 + b6;
            c[3] = b3 + b7;
            c[4] = b0 - b4;
            c[5] = b1 - b5;
            c[6] = b2 - b6;
            c[7] = b3 - b7;
        }
        h = 8;
    }
    while h < n {
        for block in x.chunks_exact_mut(2 * h) {
            let (lo, hi) = block.split_at_mut(h);
            for (a, b) in lo.iter_mut().zip(hi.iter_mut()) {
                let (u, v) = (*a, *b);
                *a = u + v;
                *b = u - v;
            }
        }
        h *= 2;
    }
}

/// Sum of squares by the fixed pairwise tree: level 0 is `x_i * x_i`, each next level adds
/// adjacent pairs `v[2i] + v[2i + 1]`. `x.len()` must be a power of two ≤ 1024.
#[inline]
pub fn sum_squares_pairwise(x: &[f32]) -> f32 {
    let mut buf = [0f32; 1024];
    let n = x.len();
    for (b, v) in buf.iter_mut().zip(x) {
        *b = v * v;
    }
    let mut len = n;
    while len > 1 {
        len /= 2;
        for i in 0..len {
            buf[i] = buf[2 * i] + buf[2 * i + 1];
        }
    }
    buf[0]
}
