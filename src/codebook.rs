//! Lloyd-Max codebooks for N(0, 1): the generator and the tables it produced.
//!
//! A b-bit codebook has `n = 2^b` centroids, ascending and symmetric (`c[n-1-i] = -c[i]`).
//! Decision boundaries are the midpoints `t[i] = (c[i] + c[i+1]) / 2`; a value equal to a
//! boundary takes the lower index. The generator solves the Lloyd fixed point (every centroid is
//! the conditional mean of its cell) in f64: plain Lloyd steps to get close, then Newton steps on
//! the tridiagonal fixed-point system until the residual is at rounding level.

use crate::error::{invalid, Result};

mod tables;
pub use tables::{CODEBOOK_2, CODEBOOK_3, CODEBOOK_4, CODEBOOK_5, CODEBOOK_6, CODEBOOK_8};

/// The bit widths tqkv supports.
pub const SUPPORTED_BITS: [u32; 6] = [2, 3, 4, 5, 6, 8];

/// Checks that `bits` is one of [`SUPPORTED_BITS`]; `op` names the caller in the error.
pub fn check_bits(op: &str, bits: u32) -> Result<()> {
    if !SUPPORTED_BITS.contains(&bits) {
        invalid!("{op}: bits must be one of 2, 3, 4, 5, 6, 8, got {bits}");
    }
    Ok(())
}

/// The embedded f64 centroids of a b-bit codebook (ascending, `2^bits` entries).
pub fn centroids_f64(bits: u32) -> Result<&'static [f64]> {
    Ok(match bits {
        2 => &CODEBOOK_2,
        3 => &CODEBOOK_3,
        4 => &CODEBOOK_4,
        5 => &CODEBOOK_5,
        6 => &CODEBOOK_6,
        8 => &CODEBOOK_8,
        _ => invalid!("codebook: bits must be one of 2, 3, 4, 5, 6, 8, got {bits}"),
    })
}

/// A codebook as the quantizer and the kernels use it: f32 centroids and f32 boundaries.
#[derive(Debug, Clone, PartialEq)]
pub struct Codebook {
    /// Bits per index.
    pub bits: u32,
    /// `2^bits` centroids, ascending: `centroids[i] = c[i] as f32`.
    pub centroids: Vec<f32>,
    /// `2^bits - 1` boundaries: `boundaries[i] = ((c[i] + c[i+1]) / 2) as f32`, computed in f64.
    pub boundaries: Vec<f32>,
}

impl Codebook {
    /// The codebook for `bits` (2, 3, 4, 5, 6 or 8) from the embedded tables.
    pub fn new(bits: u32) -> Result<Self> {
        let c = centroids_f64(bits)?;
        Ok(Self {
            bits,
            centroids: c.iter().map(|&x| x as f32).collect(),
            boundaries: c.windows(2).map(|w| ((w[0] + w[1]) / 2.0) as f32).collect(),
        })
    }

    /// Index of the nearest centroid: the number of boundaries strictly below `u`
    /// (ties go to the lower index). NaN maps to index 0.
    #[inline]
    pub fn index_of(&self, u: f32) -> u8 {
        // Branch-free count; the compiler vectorizes it for the small tables.
        self.boundaries.iter().map(|&t| (t < u) as u8).sum()
    }
}

const INV_SQRT_2PI: f64 = 0.398_942_280_401_432_7;

fn pdf(x: f64) -> f64 {
    if x.is_infinite() {
        0.0
    } else {
        INV_SQRT_2PI * (-0.5 * x * x).exp()
    }
}

/// x·φ(x), 0 at ±∞.
fn x_pdf(x: f64) -> f64 {
    if x.is_infinite() {
        0.0
    } else {
        x * pdf(x)
    }
}

/// Upper tail P(X > x), accurate far into the tail.
fn tail(x: f64) -> f64 {
    0.5 * libm::erfc(x / std::f64::consts::SQRT_2)
}

/// P(a < X < b) without cancellation in either tail.
fn mass(a: f64, b: f64) -> f64 {
    if a >= 0.0 {
        tail(a) - tail(b)
    } else if b <= 0.0 {
        tail(-b) - tail(-a)
    } else {
        1.0 - tail(-a) - tail(b)
    }
}

/// Cell edges of centroid i: (-∞ or midpoint, midpoint or +∞).
fn edges(c: &[f64], i: usize) -> (f64, f64) {
    let a = if i == 0 {
        f64::NEG_INFINITY
    } else {
        0.5 * (c[i - 1] + c[i])
    };
    let b = if i + 1 == c.len() {
        f64::INFINITY
    } else {
        0.5 * (c[i] + c[i + 1])
    };
    (a, b)
}

/// One Lloyd map: the conditional mean of every cell.
fn lloyd_map(c: &[f64]) -> Vec<f64> {
    (0..c.len())
        .map(|i| {
            let (a, b) = edges(c, i);
            (pdf(a) - pdf(b)) / mass(a, b)
        })
        .collect()
}

/// Solves the tridiagonal system `lo[i] x[i-1] + d[i] x[i] + up[i] x[i+1] = r[i]` (Thomas).
fn solve_tridiagonal(lo: &[f64], d: &[f64], up: &[f64], r: &[f64]) -> Vec<f64> {
    let n = d.len();
    let mut cp = vec![0.0; n];
    let mut rp = vec![0.0; n];
    cp[0] = up[0] / d[0];
    rp[0] = r[0] / d[0];
    for i in 1..n {
        let m = d[i] - lo[i] * cp[i - 1];
        cp[i] = up[i] / m;
        rp[i] = (r[i] - lo[i] * rp[i - 1]) / m;
    }
    let mut x = vec![0.0; n];
    x[n - 1] = rp[n - 1];
    for i in (0..n - 1).rev() {
        x[i] = rp[i] - cp[i] * x[i + 1];
    }
    x
}

/// One Newton step on `F(c) - c = 0`, where F is the Lloyd map. With cell [a, b], mass P and
/// mean m: dm/da = φ(a)(m - a)/P, dm/db = φ(b)(b - m)/P, and a, b are midpoints of neighbours.
fn newton_step(c: &[f64]) -> Vec<f64> {
    let n = c.len();
    let (mut lo, mut d, mut up, mut r) = (vec![0.0; n], vec![0.0; n], vec![0.0; n], vec![0.0; n]);
    for i in 0..n {
        let (a, b) = edges(c, i);
        let p = mass(a, b);
        let m = (pdf(a) - pdf(b)) / p;
        let dm_da = if a.is_finite() {
            pdf(a) * (m - a) / p
        } else {
            0.0
        };
        let dm_db = if b.is_finite() {
            pdf(b) * (b - m) / p
        } else {
            0.0
        };
        lo[i] = 0.5 * dm_da;
        up[i] = 0.5 * dm_db;
        d[i] = 0.5 * (dm_da + dm_db) - 1.0;
        r[i] = c[i] - m;
    }
    let delta = solve_tridiagonal(&lo, &d, &up, &r);
    c.iter().zip(&delta).map(|(x, dx)| x + dx).collect()
}

/// Φ^{-1}(p) for p in (0, 1), by bisection on the tail (only used for starting points).
fn normal_quantile(p: f64) -> f64 {
    let (mut lo, mut hi) = (-40.0f64, 40.0f64);
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if 1.0 - tail(mid) < p {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

fn residual(c: &[f64]) -> f64 {
    lloyd_map(c)
        .iter()
        .zip(c)
        .map(|(m, x)| (m - x).abs())
        .fold(0.0, f64::max)
}

fn symmetrize(c: &mut [f64]) {
    let n = c.len();
    for i in 0..n / 2 {
        let v = 0.5 * (c[n - 1 - i] - c[i]);
        c[i] = -v;
        c[n - 1 - i] = v;
    }
}

/// Computes the b-bit Lloyd-Max codebook for N(0, 1) in f64, to a true fixed point
/// (max |F(c) - c| below 1e-14).
pub fn lloyd_max(bits: u32) -> Result<Vec<f64>> {
    check_bits("lloyd_max", bits)?;
    let n = 1usize << bits;
    // Start from the companding (Panter-Dite) approximation: point density ∝ φ^(1/3), i.e. the
    // quantiles of N(0, 3); a few plain Lloyd steps, then damped Newton.
    let mut c: Vec<f64> = (0..n)
        .map(|i| 3f64.sqrt() * normal_quantile((i as f64 + 0.5) / n as f64))
        .collect();
    for _ in 0..20 {
        c = lloyd_map(&c);
        symmetrize(&mut c);
    }
    let mut res = residual(&c);
    for _ in 0..200 {
        if res < 1e-14 {
            break;
        }
        let full = newton_step(&c);
        // Damping: halve the step until the residual drops and the order is kept.
        let mut step = 1.0;
        let mut accepted = false;
        while step > 1e-4 {
            let mut next: Vec<f64> = c
                .iter()
                .zip(&full)
                .map(|(x, f)| x + step * (f - x))
                .collect();
            symmetrize(&mut next);
            let next_res = residual(&next);
            if next.windows(2).all(|w| w[0] < w[1]) && next_res < res {
                c = next;
                res = next_res;
                accepted = true;
                break;
            }
            step *= 0.5;
        }
        if !accepted {
            break;
        }
    }
    if res >= 1e-12 {
        invalid!("lloyd_max: {bits}-bit iteration did not converge (residual {res:e})");
    }
    Ok(c)
}

/// Mean squared error E[(X - Q(X))^2] of the codebook `c` for X ~ N(0, 1).
pub fn gaussian_distortion(c: &[f64]) -> f64 {
    (0..c.len())
        .map(|i| {
            let (a, b) = edges(c, i);
            let p = mass(a, b);
            // ∫ x² φ = P + aφ(a) - bφ(b); ∫ x φ = φ(a) - φ(b)
            let second = p + x_pdf(a) - x_pdf(b);
            let first = pdf(a) - pdf(b);
            second - 2.0 * c[i] * first + c[i] * c[i] * p
        })
        .sum()
}

/// Rust source of the embedded tables (`src/codebook/tables.rs`), from a fresh computation.
pub fn tables_source() -> Result<String> {
    let mut s = String::from(
        "//! Generated by `codebook::tables_source()`; do not edit. A test recomputes and compares.\n",
    );
    for bits in SUPPORTED_BITS {
        let c = lloyd_max(bits)?;
        s.push_str(&format!(
            "\n/// {bits}-bit Lloyd-Max centroids for N(0, 1), ascending.\npub const CODEBOOK_{bits}: [f64; {}] = [\n",
            c.len()
        ));
        for x in c {
            s.push_str(&format!("    {x:e},\n"));
        }
        s.push_str("];\n");
    }
    Ok(s)
}
