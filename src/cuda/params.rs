//! Kernel parameter structs, mirrored field by field in `kernels/*.cu`.

use bytemuck::{Pod, Zeroable};

/// Parameters of `tq_quantize` (`struct QuantizeParams` in kernels/quantize.cu).
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct QuantizeParams {
    /// `n_write * num_kv_heads`.
    pub n_vectors: u64,
    /// Source tokens before the first written one.
    pub skip: u64,
    pub num_kv_heads: u32,
    pub capacity: u32,
    /// Slot of source token `skip`; later tokens wrap at `capacity`.
    pub first_slot: u32,
    /// `sqrt(head_dim)` as f32.
    pub sqrt_d: f32,
    /// `(1 / sqrt(head_dim) as f64) as f32`.
    pub inv_sqrt_d: f32,
    /// `scale_factor_d512` (head_dim > 256).
    pub scale_factor: f32,
}

/// Parameters of `tq_dequantize` (`struct DequantizeParams` in kernels/dequantize.cu).
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct DequantizeParams {
    /// `num_kv_heads * n_tokens`.
    pub n_vectors: u64,
    pub num_kv_heads: u32,
    pub capacity: u32,
    /// First slot read.
    pub start_pos: u32,
    pub n_tokens: u32,
    pub sqrt_d: f32,
    pub inv_sqrt_d: f32,
    pub scale_factor: f32,
    pub pad: u32,
}

// SAFETY: plain-old-data structs with the C layout of their CUDA mirrors.
unsafe impl cudarc::driver::DeviceRepr for QuantizeParams {}
unsafe impl cudarc::driver::DeviceRepr for DequantizeParams {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn param_structs_have_the_size_of_their_cuda_mirrors() {
        assert_eq!(std::mem::size_of::<QuantizeParams>(), 40);
        assert_eq!(std::mem::align_of::<QuantizeParams>(), 8);
        assert_eq!(std::mem::size_of::<DequantizeParams>(), 40);
        assert_eq!(std::mem::align_of::<DequantizeParams>(), 8);
    }
}
