//! tqkv: TurboQuant compression of the KV cache of LLM inference, with attention computed
//! directly over the compressed cache.
//!
//! ```
//! use tqkv::{cpu, CacheLayout, Codec, Domain, Dst, Side, Src};
//! let layout = CacheLayout::new(2, 128, 16, 4, 4)?; // 2 kv heads, head_dim 128, 16 slots, 4/4 bits
//! let codec = Codec::new(layout)?;
//! let mut packed = vec![0u8; layout.packed_len(Side::Keys)];
//! let mut norms = vec![0f32; layout.norms_len()];
//! let k: Vec<f32> = (0..3 * 2 * 128).map(|i| (i as f32 * 0.37).sin()).collect(); // [3 tokens, 2, 128]
//! cpu::quantize(&codec, Side::Keys, Src::F32(&k), 3, 0, &mut packed, &mut norms)?;
//! let mut out = vec![0f32; 2 * 3 * 128]; // [heads, tokens, head_dim]
//! cpu::dequantize_seq(&codec, Side::Keys, &packed, &norms, 0, 3, Domain::Original, Dst::F32(&mut out))?;
//! # Ok::<(), tqkv::TqError>(())
//! ```

pub mod cache;
pub mod codebook;
pub mod codec;
pub mod cpu;
pub mod cuda;
pub mod dtype;
pub mod error;
pub mod io;
pub mod layout;
pub mod options;
pub mod pack;
pub mod rotation;

pub use cache::{KvCache, Segment};
pub use codec::{Codec, Domain};
pub use dtype::{DType, Dst, Src};
pub use error::{Result, TqError};
pub use layout::{CacheLayout, CacheMode, Side};
pub use options::{CacheOptions, Preset};
