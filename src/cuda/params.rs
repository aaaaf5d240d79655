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
    /// u32 `[num_seqs]`: positions `[sinks, frontier)` are packed; 0 (null) = the length.
    pub frontiers: u64,
    /// f32 `[num_seqs, num_kv_heads, head_dim]` key mean μ (original domain); 0 = no centering.
    pub key_mean: u64,
    /// u16 `[num_seqs, num_kv_heads, sinks, head_dim]` f16/bf16 bits.
    pub k_sinks: u64,
    pub v_sinks: u64,
    /// u16 `[num_seqs, num_kv_heads, window_len, head_dim]`, position p at slot `p % window_len`.
    pub k_window: u64,
    pub v_window: u64,
    /// Exact sink positions `0..sinks`.
    pub sinks: u32,
    /// Exact recent-window slots.
    pub window_len: u32,
    /// 0: no exact segments; 1, 2: slot `num_splits - 1` of each (sequence, kv head) holds the
    /// partial of its exact sinks and window, written by 1: exact blocks (the grid's z-slices
    /// past `num_seqs`), 2: the pair's last packed split, before its packed tiles; 3: every
    /// packed split scores a share of its pair's exact slots (no extra slot; launched with
    /// `tq_decode_smem_bytes_spread` of shared memory).
    pub exact: u32,
    /// 1: the exact planes hold bf16, 0: f16.
    pub exact_bf16: u32,
    /// u32 `[num_seqs, num_kv_heads]` split counters of the last-block merge, zero between
    /// launches (the last block of each pair resets its counter); unused without `MERGE_LAST`.
    pub counters: u64,
    /// `exact == 2`: tiles the last packed split of a pair streams fewer than the others (the
    /// time its exact work takes).
    pub exact_credit: u32,
    /// `exact == 1`: exact blocks in the launch; block `e` serves pairs `e`, `e + exact_blocks`, ...
    pub exact_blocks: u32,
    /// 1: the packed rows and norms stream under the L2 evict-first policy (the lines they would
    /// evict stay: fewer write-backs of dirty lines, more of L2 kept for the step's other kernels).
    pub l2_evict_first: u32,
    /// 1: one packed split per pair and no exact slot: the block writes the output itself (no
    /// partial, counter or merge); 0: the splits merge (the last block of a pair, or
    /// `tq_decode_merge`).
    pub direct_out: u32,
}

/// Parameters of `tq_append_kv` / `tq_append_kv_mixed` (`struct AppendParams` in
/// kernels/quantize.cu). Pointers are device addresses.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct AppendParams {
    /// `[num_seqs, num_kv_heads, head_dim]` new tokens, the kernel's `NEW_DTYPE`.
    pub k_new: u64,
    pub v_new: u64,
    /// u32 `[num_seqs]`: lengths before the append.
    pub seq_lens: u64,
    /// u32 `[num_seqs]`: positions `[sinks, frontier)` are packed.
    pub frontiers: u64,
    /// f32 `[num_seqs, num_kv_heads, head_dim]` key mean, or 0 (no centering).
    pub key_mean: u64,
    /// u16 `[num_seqs, num_kv_heads, sinks, head_dim]` exact dtype bits.
    pub k_sinks: u64,
    pub v_sinks: u64,
    /// u16 `[num_seqs, num_kv_heads, window, head_dim]`, position p at slot `p % window`.
    pub k_window: u64,
    pub v_window: u64,
    /// u32 `[num_seqs]` (written): the lengths after the append (`seq_lens + 1`).
    pub next_lens: u64,
    /// u32 `[num_seqs]` (written): the frontiers after the append.
    pub next_frontiers: u64,
    pub num_kv_heads: u32,
    pub sinks: u32,
    pub window: u32,
    /// 1: the exact planes hold bf16, 0: f16.
    pub exact_bf16: u32,
}

// SAFETY: plain-old-data structs with the C layout of their CUDA mirrors.
unsafe impl cudarc::driver::DeviceRepr for QuantizeParams {}
unsafe impl cudarc::driver::DeviceRepr for DequantizeParams {}
unsafe impl cudarc::driver::DeviceRepr for DecodeParams {}
unsafe impl cudarc::driver::DeviceRepr for AppendParams {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn param_structs_have_the_size_of_their_cuda_mirrors() {
        assert_eq!(std::mem::size_of::<QuantizeParams>(), 48);
        assert_eq!(std::mem::align_of::<QuantizeParams>(), 8);
        assert_eq!(std::mem::size_of::<DequantizeParams>(), 40);
        assert_eq!(std::mem::align_of::<DequantizeParams>(), 8);
        // kernels/decode_attention.cu: 20 u64, 12 u32, 4 f32 (its tq_decode_params_bytes).
        assert_eq!(std::mem::size_of::<DecodeParams>(), 232);
        assert_eq!(std::mem::align_of::<DecodeParams>(), 8);
        // kernels/quantize.cu: 11 u64, 4 u32.
        assert_eq!(std::mem::size_of::<AppendParams>(), 104);
    }
}
