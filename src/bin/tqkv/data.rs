//! The data sets `tqkv eval` measures: the SmolLM2-135M KV sample shipped in `data/` (embedded
//! in the binary), a synthetic Gaussian set with outlier channels, or a user's file.

use std::path::Path;

use tqkv::io::{load_kv_layers, read_kv_layers, KvLayer, KvTensor};
use tqkv::rotation::splitmix64;
use tqkv::{DType, Result};

/// `data/kv-sample-a-small.safetensors`: real post-RoPE Q/K/V of SmolLM2-135M-Instruct
/// (layers 0, 6, 12, 18, 24, 29; 256 tokens; f16). Provenance in `data/README.md`.
const SAMPLE: &[u8] = include_bytes!("../../../data/kv-sample-a-small.safetensors");

/// Named layers to evaluate.
pub struct Dataset {
    pub name: String,
    pub description: String,
    pub layers: Vec<KvLayer>,
}

/// The shipped SmolLM2-135M sample.
pub fn shipped_sample() -> Result<Dataset> {
    Ok(Dataset {
        name: "smollm2-135m".into(),
        description: "real KV of SmolLM2-135M-Instruct (data/kv-sample-a-small.safetensors)".into(),
        layers: read_kv_layers(SAMPLE, "embedded kv-sample-a-small.safetensors")?,
    })
}

/// A user's safetensors file.
pub fn from_file(path: &Path) -> Result<Dataset> {
    Ok(Dataset {
        name: path.file_name().map_or_else(
            || path.display().to_string(),
            |n| n.to_string_lossy().into(),
        ),
        description: path.display().to_string(),
        layers: load_kv_layers(path)?,
    })
}

const SYN_LAYERS: usize = 2;
const SYN_TOKENS: usize = 512;
const SYN_KV_HEADS: usize = 2;
const SYN_Q_HEADS: usize = 8;
const SYN_HEAD_DIM: usize = 128;
const SYN_SEED: u64 = 0x5359_4E54_4845_5449; // "SYNTHETI"
/// (channel, standard deviation) of the key outlier channels; every other channel has 1.
const SYN_K_OUTLIERS: [(usize, f32); 4] = [(5, 3.0), (38, 5.0), (77, 7.0), (120, 10.0)];
/// (channel, standard deviation) of the value outlier channels.
const SYN_V_OUTLIERS: [(usize, f32); 2] = [(17, 3.0), (94, 6.0)];

/// Deterministic N(0, 1) samples: Box-Muller over splitmix64.
struct Gauss(u64);

impl Gauss {
    fn uniform(&mut self) -> f64 {
        ((splitmix64(&mut self.0) >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    fn next(&mut self) -> f32 {
        let (u1, u2) = (self.uniform(), self.uniform());
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }

    /// `[tokens, heads, head_dim]` samples; channel c has the standard deviation given in
    /// `outliers` (1 otherwise), shifted by `shift` channels per layer.
    fn tensor(
        &mut self,
        name: String,
        heads: usize,
        outliers: &[(usize, f32)],
        shift: usize,
    ) -> KvTensor {
        let d = SYN_HEAD_DIM;
        let mut sd = vec![1f32; d];
        for &(c, s) in outliers {
            sd[(c + shift) % d] = s;
        }
        let data = (0..SYN_TOKENS * heads * d)
            .map(|i| self.next() * sd[i % d])
            .collect();
        KvTensor {
            name,
            tokens: SYN_TOKENS,
            heads,
            head_dim: d,
            dtype: DType::F32,
            data,
        }
    }
}

/// Gaussian keys and values with a few channels scaled 3-10x (the structure the rotation must
/// spread), Gaussian queries; generated from a fixed seed.
pub fn synthetic() -> Dataset {
    let mut g = Gauss(SYN_SEED);
    let layers = (0..SYN_LAYERS)
        .map(|i| {
            let shift = 11 * i;
            KvLayer {
                name: format!("layer.{i}"),
                q: Some(g.tensor(format!("layer.{i}.q"), SYN_Q_HEADS, &[], 0)),
                k: g.tensor(format!("layer.{i}.k"), SYN_KV_HEADS, &SYN_K_OUTLIERS, shift),
                v: g.tensor(format!("layer.{i}.v"), SYN_KV_HEADS, &SYN_V_OUTLIERS, shift),
            }
        })
        .collect();
    Dataset {
        name: "synthetic".into(),
        description: format!(
            "Gaussian K/V with outlier channels (K sd 3-10x on 4 channels, V 3-6x on 2), \
             Gaussian Q; seed {SYN_SEED:#x}"
        ),
        layers,
    }
}
