//! CPU operations: the reference every other backend must match bit for bit.

pub mod attention;
pub mod dequantize;
pub mod quantize;
pub(crate) mod segments;

pub use attention::{attention, attention_reference, attention_with, AttentionConfig, Simd};
pub(crate) use dequantize::dequantize_vector;
pub use dequantize::{dequantize_pos, dequantize_seq};
pub use quantize::quantize;

/// Work (vectors) below which an op stays on the calling thread.
pub(crate) const PARALLEL_MIN_VECTORS: usize = 512;
