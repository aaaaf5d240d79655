//! CPU operations: the reference every other backend must match bit for bit.

pub mod attention;
pub mod dequantize;
pub mod quantize;
pub(crate) mod segments;

pub use attention::{attention, attention_reference, attention_with, AttentionConfig, Simd};
pub use dequantize::{dequantize_pos, dequantize_seq, dequantize_vector};
pub use quantize::{quantize, quantize_vector, NonFinite};

/// Work (vectors) below which an op stays on the calling thread.
pub(crate) const PARALLEL_MIN_VECTORS: usize = 512;
