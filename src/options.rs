//! What a [`crate::KvCache`] does beyond plain TurboQuant, and the named presets.
//!
//! - **Key centering**: one mean μ per (kv head, channel) is subtracted from every key before
//!   it is quantized (smaller, better spread vectors for the quantizer). Attention adds the
//!   constant `scale · q·μ` back to each packed score (one dot per query and head), so scores
//!   equal those of the keys as given; dequantize adds μ back. μ is one vector for every
//!   position (post-RoPE); a position-dependent mean (pre-RoPE μ rotated per position) is not
//!   implemented.
//! - **Exact segments**: the first `sinks` positions and the newest `window` positions stay in
//!   f16 (or bf16) beside the packed planes; a token is quantized once, when it leaves the
//!   window. On real text most attention mass sits on these tokens.
//!
//! [`CacheOptions::default`] (centering, window 32, 1 sink, f16) and the [`Preset`]s are the
//! recommended configurations; [`CacheOptions::plain`] is plain TurboQuant, what
//! [`crate::KvCache::new`] builds.

use std::fmt;
use std::str::FromStr;

use crate::dtype::DType;
use crate::error::{invalid, Result, TqError};
use crate::layout::CacheLayout;

/// Default exact recent window, in tokens.
pub const DEFAULT_WINDOW: usize = 32;
/// Default exact attention-sink tokens at the start of a sequence.
pub const DEFAULT_SINKS: usize = 1;

/// Options of a [`crate::KvCache`] beyond its [`CacheLayout`].
#[derive(Debug, Clone, PartialEq)]
pub struct CacheOptions {
    /// Subtract a per-(kv head, channel) key mean μ before quantizing.
    pub center_keys: bool,
    /// μ given by the caller (calibration), `[num_kv_heads, head_dim]` f32, original domain.
    /// `None`: estimated from the first append to an empty cache (the prefill). Only with
    /// `center_keys`.
    pub key_mean: Option<Vec<f32>>,
    /// The newest `window` positions stay exact (0 = none).
    pub window: usize,
    /// The first `sinks` positions of the sequence stay exact (0 = none).
    pub sinks: usize,
    /// Element type of the exact segments: `F16` or `Bf16`. Inputs are rounded to it
    /// (nearest-even); an f32 value outside its range is an error on append.
    pub exact_dtype: DType,
}

impl Default for CacheOptions {
    /// The recommended configuration: centered keys, exact window of 32, 1 exact sink, f16.
    fn default() -> Self {
        Self {
            center_keys: true,
            key_mean: None,
            window: DEFAULT_WINDOW,
            sinks: DEFAULT_SINKS,
            exact_dtype: DType::F16,
        }
    }
}

impl CacheOptions {
    /// Plain TurboQuant: no centering, no exact tokens.
    pub fn plain() -> Self {
        Self {
            center_keys: false,
            key_mean: None,
            window: 0,
            sinks: 0,
            exact_dtype: DType::F16,
        }
    }

    /// The same options with another exact window.
    pub fn with_window(self, window: usize) -> Self {
        Self { window, ..self }
    }

    /// The same options with another number of sinks.
    pub fn with_sinks(self, sinks: usize) -> Self {
        Self { sinks, ..self }
    }

    /// The same options with centering on or off (off also drops a given mean).
    pub fn with_center_keys(self, center_keys: bool) -> Self {
        Self {
            center_keys,
            key_mean: if center_keys { self.key_mean } else { None },
            ..self
        }
    }

    /// Centering with a calibrated mean `[num_kv_heads, head_dim]`, original domain.
    pub fn with_key_mean(self, key_mean: Vec<f32>) -> Self {
        Self {
            center_keys: true,
            key_mean: Some(key_mean),
            ..self
        }
    }

    /// The same options with another exact element type (`F16` or `Bf16`).
    pub fn with_exact_dtype(self, exact_dtype: DType) -> Self {
        Self {
            exact_dtype,
            ..self
        }
    }

    /// True when no token is ever kept exact.
    pub fn is_all_packed(&self) -> bool {
        self.window == 0 && self.sinks == 0
    }

    /// Checks the options against `layout`.
    pub fn check(&self, layout: &CacheLayout) -> Result<()> {
        let op = "cache options";
        if self.exact_dtype == DType::F32 {
            invalid!("{op}: exact_dtype must be F16 or Bf16, got F32");
        }
        if let Some(mu) = &self.key_mean {
            if !self.center_keys {
                invalid!("{op}: key_mean is given but center_keys is off");
            }
            let need = layout.num_kv_heads * layout.head_dim;
            if mu.len() != need {
                invalid!(
                    "{op}: key_mean has {} elements, need {need} (num_kv_heads={} × head_dim={})",
                    mu.len(),
                    layout.num_kv_heads,
                    layout.head_dim
                );
            }
            if let Some(i) = mu.iter().position(|x| !x.is_finite()) {
                invalid!("{op}: key_mean[{i}] is not finite ({})", mu[i]);
            }
        }
        Ok(())
    }

    /// Exact heap bytes of a cache with `layout` and these options: the four packed planes, the
    /// codec's rotation signs and codebooks, the exact sinks and window (K and V, 2 bytes per
    /// value, each at most `capacity` tokens) and, when centering, μ and its rotation.
    pub fn memory_bytes(&self, layout: &CacheLayout) -> usize {
        let (h, d) = (layout.num_kv_heads, layout.head_dim);
        let tables = |b: u32| (1usize << b) + (1usize << b) - 1;
        let codec = 4 * (tables(layout.k_bits) + tables(layout.v_bits) + d.max(1));
        let exact = self.exact_tokens(layout.capacity);
        let mean = if self.center_keys { 2 * 4 * h * d } else { 0 };
        layout.total_bytes() + codec + 2 * 2 * h * exact * d + mean
    }

    /// Exact tokens allocated per head for `capacity` slots: `min(sinks, capacity) +
    /// min(window, capacity)`.
    pub fn exact_tokens(&self, capacity: usize) -> usize {
        self.sinks.min(capacity) + self.window.min(capacity)
    }
}

/// Named configurations, like an inference engine's KV-cache dtype switch. Every preset uses
/// [`CacheOptions::default`] (centered keys, exact window 32, 1 exact sink, f16).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    /// 8-bit keys and values.
    Tq8,
    /// 6-bit keys and values.
    Tq6,
    /// 4-bit keys and values.
    Tq4,
    /// 3-bit keys and values.
    Tq3,
    /// 8-bit keys, 4-bit values.
    K8V4,
    /// 6-bit keys, 4-bit values.
    K6V4,
}

impl Preset {
    /// Every preset, from the most to the least bits.
    pub const ALL: [Preset; 6] = [
        Preset::Tq8,
        Preset::K8V4,
        Preset::Tq6,
        Preset::K6V4,
        Preset::Tq4,
        Preset::Tq3,
    ];

    /// The name `--preset` takes: `tq8`, `tq6`, `tq4`, `tq3`, `k8v4`, `k6v4`.
    pub fn name(self) -> &'static str {
        match self {
            Preset::Tq8 => "tq8",
            Preset::Tq6 => "tq6",
            Preset::Tq4 => "tq4",
            Preset::Tq3 => "tq3",
            Preset::K8V4 => "k8v4",
            Preset::K6V4 => "k6v4",
        }
    }

    /// Bits per key index and per value index.
    pub fn bits(self) -> (u32, u32) {
        match self {
            Preset::Tq8 => (8, 8),
            Preset::Tq6 => (6, 6),
            Preset::Tq4 => (4, 4),
            Preset::Tq3 => (3, 3),
            Preset::K8V4 => (8, 4),
            Preset::K6V4 => (6, 4),
        }
    }

    /// The cache options of every preset: [`CacheOptions::default`].
    pub fn options(self) -> CacheOptions {
        CacheOptions::default()
    }

    /// A global layout of this preset's bits.
    pub fn layout(
        self,
        num_kv_heads: usize,
        head_dim: usize,
        capacity: usize,
    ) -> Result<CacheLayout> {
        let (k, v) = self.bits();
        CacheLayout::new(num_kv_heads, head_dim, capacity, k, v)
    }

    /// True bits per cached value (K and V) of one layer at `context` tokens: every byte of
    /// [`CacheOptions::memory_bytes`] (indices, norms, μ, exact sinks and window, codec tables)
    /// of a cache of capacity `context`, × 8 / (2 · num_kv_heads · context · head_dim).
    pub fn bits_per_value(
        self,
        num_kv_heads: usize,
        head_dim: usize,
        context: usize,
    ) -> Result<f64> {
        if num_kv_heads == 0 || head_dim == 0 || context == 0 {
            invalid!(
                "preset {}: bits_per_value needs num_kv_heads ({num_kv_heads}), head_dim \
                 ({head_dim}) and context ({context}) > 0",
                self.name()
            );
        }
        let l = self.layout(num_kv_heads, head_dim, context)?;
        let bytes = self.options().memory_bytes(&l) as f64;
        Ok(bytes * 8.0 / (2 * num_kv_heads * context * head_dim) as f64)
    }
}

impl fmt::Display for Preset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Preset {
    type Err = TqError;

    /// Parses a preset name (case-insensitive).
    fn from_str(s: &str) -> Result<Self> {
        let t = s.trim().to_ascii_lowercase();
        match Preset::ALL.iter().find(|p| p.name() == t) {
            Some(&p) => Ok(p),
            None => {
                let names: Vec<&str> = Preset::ALL.iter().map(|p| p.name()).collect();
                invalid!("unknown preset `{s}`; one of {}", names.join(", "))
            }
        }
    }
}
