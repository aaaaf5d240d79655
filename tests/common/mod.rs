//! Deterministic inputs for tests.
#![allow(dead_code)]

use std::sync::{Arc, OnceLock};

use tqkv::cuda::CudaDevice;
use tqkv::rotation::splitmix64;

/// True under `TQ_REQUIRE_GPU=1`: GPU tests then fail instead of skipping without a GPU.
pub fn require_gpu() -> bool {
    std::env::var("TQ_REQUIRE_GPU").as_deref() == Ok("1")
}

/// The shared device of this test binary, or `None` after printing `skipping: no CUDA device`
/// (a panic under `TQ_REQUIRE_GPU=1`).
pub fn device() -> Option<Arc<CudaDevice>> {
    static DEV: OnceLock<Result<Arc<CudaDevice>, String>> = OnceLock::new();
    match DEV.get_or_init(|| CudaDevice::new(0).map_err(|e| e.to_string())) {
        Ok(d) => Some(d.clone()),
        Err(e) if require_gpu() => panic!("TQ_REQUIRE_GPU=1 but no CUDA device: {e}"),
        Err(e) => {
            println!("skipping: no CUDA device ({e})");
            None
        }
    }
}

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
