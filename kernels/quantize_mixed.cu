// Keys and values of different bit widths in one batch append: tq_quantize_batch_kv for
// K_BITS != V_BITS. The registry compiles kernels/common.cu + quantize.cu twice before this file
// (src/cuda/registry.rs, Family::QuantizeBatchMixed), in namespace tq_k with BITS = K_BITS and in
// tq_v with BITS = V_BITS, their entry points left out (TQ_SIDE_ONLY); the macros both copies
// define expand BITS where they are used. Both sides share HEAD_DIM, LANE_ELEMS, IN_DTYPE and
// VPW, so one launch geometry serves both: blocks [0, gridDim.x / 2) write the keys, the others
// the values; block 0 also writes the lengths after the append (next_lens, nullable). Also
// tq_append_kv_mixed (below).

using tq_k::u32;
using tq_k::u64;
using tq_k::u8;

extern "C" __global__ void __launch_bounds__(WARPS * 32, MIN_BLOCKS)
tq_quantize_batch_kv_mixed(const u8* __restrict__ k_src, const u8* __restrict__ v_src, u8* __restrict__ k_packed,
                           float* __restrict__ k_norms, u8* __restrict__ v_packed, float* __restrict__ v_norms,
                           u64* __restrict__ status, const float* __restrict__ signs,
                           const uint2* __restrict__ k_buckets, const uint2* __restrict__ v_buckets,
                           const u32* __restrict__ seq_lens, const u32* __restrict__ ring_flags,
                           u32* __restrict__ next_lens, const tq_k::QuantizeParams pk,
                           const tq_v::QuantizeParams pv) {
    tq_k::advance_lens(seq_lens, next_lens, pk.n_vectors / pk.num_kv_heads);
    const u32 half = gridDim.x / 2;
    if (blockIdx.x < half) {
        const tq_k::BatchMap map = {seq_lens, ring_flags, pk.num_kv_heads, pk.capacity};
        tq_k::quantize_vectors(k_src, k_packed, k_norms, status, signs, k_buckets, pk, map, blockIdx.x, half);
    } else {
        const tq_v::BatchMap map = {seq_lens, ring_flags, pv.num_kv_heads, pv.capacity};
        tq_v::quantize_vectors(v_src, v_packed, v_norms, status, signs, v_buckets, pv, map, blockIdx.x - half,
                               gridDim.x - half);
    }
}

#if IN_DTYPE == DT_F32
// tq_append_kv (kernels/quantize.cu) for keys and values of different bit widths: one decode
// step of a batch with exact segments or centered keys, each side staged and quantized by its
// namespace's StageMap (stage_map takes either namespace's AppendParams: the same layout).
extern "C" __global__ void __launch_bounds__(WARPS * 32, MIN_BLOCKS)
tq_append_kv_mixed(const tq_k::AppendParams p, u8* __restrict__ k_packed, float* __restrict__ k_norms,
                   u8* __restrict__ v_packed, float* __restrict__ v_norms, u64* __restrict__ status,
                   const float* __restrict__ signs, const uint2* __restrict__ k_buckets,
                   const uint2* __restrict__ v_buckets, const u32* __restrict__ ring_flags,
                   const tq_k::QuantizeParams pk, const tq_v::QuantizeParams pv) {
    const u32 half = gridDim.x / 2;
    if (blockIdx.x < half) {
        tq_k::quantize_vectors(nullptr, k_packed, k_norms, status, signs, k_buckets, pk,
                               tq_k::stage_map(p, true, ring_flags, pk.capacity, status), blockIdx.x, half);
    } else {
        tq_v::quantize_vectors(nullptr, v_packed, v_norms, status, signs, v_buckets, pv,
                               tq_v::stage_map(p, false, ring_flags, pv.capacity, status), blockIdx.x - half,
                               gridDim.x - half);
    }
}
#endif
