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
    /// Index lookup: the bucket of u is `floor(fma(u, bucket_scale, bucket_offset))`.
    pub bucket_scale: f32,
    pub bucket_offset: f32,
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

/// Parameters of `tq_decode_split` and `tq_decode_merge` (`struct DecodeParams` in
/// kernels/decode_attention.cu), passed by value. Pointers are device addresses.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct DecodeParams {
    /// `[num_seqs, num_heads, head_dim]`, the kernel's dtype.
    pub q: u64,
    /// Same shape and dtype as `q`.
    pub out: u64,
    /// u8 `[num_seqs, num_kv_heads, capacity, row_bytes(k_bits)]`.
    pub k_packed: u64,
    /// f32 `[num_seqs, num_kv_heads, capacity, norms_per_pos]`.
    pub k_norms: u64,
    /// u8 `[num_seqs, num_kv_heads, capacity, row_bytes(v_bits)]`.
    pub v_packed: u64,
    pub v_norms: u64,
    /// f32 `[2^k_bits]` centroids.
    pub k_codebook: u64,
    pub v_codebook: u64,
    /// f32 `[head_dim]` rotation signs.
    pub signs: u64,
    /// u32 `[num_seqs]` logical lengths.
    pub seq_lens: u64,
    /// u32 `[num_seqs]`, nonzero = ring; 0 (null) = `ring` for every sequence.
    pub ring_flags: u64,
    /// f32 `[num_seqs, num_kv_heads, num_splits, gqa, head_dim]` workspace.
    pub part_o: u64,
    /// f32 `[num_seqs, num_kv_heads, num_splits, gqa, 2]` workspace (max, sum).
    pub part_ml: u64,
    pub num_seqs: u32,
    pub num_kv_heads: u32,
    pub capacity: u32,
    /// Blocks per (sequence, kv head) along the sequence.
    pub num_splits: u32,
    /// 1 = every sequence is a ring (when `ring_flags` is null).
    pub ring: u32,
    /// Sliding window in tokens, 0 = none.
    pub window: u32,
    pub scale: f32,
    /// 0 = none.
    pub softcap: f32,
    /// Multiplies the f16 softmax weights; the merge divides it out.
    pub pv_scale: f32,
    /// `1 / scale_factor_d512` (head_dim > 256).
    pub inv_sf: f32,
    /// u32 `[num_seqs, num_kv_heads]` split counters of the last-block merge, zero between
    /// launches (the last block of each pair resets its counter); unused without `MERGE_LAST`.
    pub counters: u64,
}

// SAFETY: plain-old-data structs with the C layout of their CUDA mirrors.
unsafe impl cudarc::driver::DeviceRepr for QuantizeParams {}
unsafe impl cudarc::driver::DeviceRepr for DequantizeParams {}
unsafe impl cudarc::driver::DeviceRepr for DecodeParams {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn param_structs_have_the_size_of_their_cuda_mirrors() {
        assert_eq!(std::mem::size_of::<QuantizeParams>(), 48);
        assert_eq!(std::mem::align_of::<QuantizeParams>(), 8);
        assert_eq!(std::mem::size_of::<DequantizeParams>(), 40);
        assert_eq!(std::mem::align_of::<DequantizeParams>(), 8);
        // kernels/decode_attention.cu: 13 u64, 6 u32, 4 f32, 1 u64 (its tq_decode_params_bytes).
        assert_eq!(std::mem::size_of::<DecodeParams>(), 152);
        assert_eq!(std::mem::align_of::<DecodeParams>(), 8);
    }
}
