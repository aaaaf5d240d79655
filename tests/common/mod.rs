//! Deterministic inputs for tests.
#![allow(dead_code)]

use tqkv::rotation::splitmix64;

/// Deterministic N(0, 1) samples (Box-Muller over splitmix64).
pub struct Gauss(u64);

impl Gauss {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn uniform(&mut self) -> f64 {
        ((splitmix64(&mut self.0) >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    pub fn next(&mut self) -> f32 {
        let (u1, u2) = (self.uniform(), self.uniform());
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }

    pub fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.next()).collect()
    }

    /// A random unit vector of length d.
    pub fn unit(&mut self, d: usize) -> Vec<f32> {
        let v = self.vec(d);
        let n = v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt() as f32;
        v.into_iter().map(|x| x / n).collect()
    }
}

pub const BITS: [u32; 6] = [2, 3, 4, 5, 6, 8];
