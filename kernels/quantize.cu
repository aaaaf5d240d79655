// Quantize: n_write x num_kv_heads vectors -> packed rows + f32 norms (src/cpu/quantize.rs).
//
// Compile-time constants: HEAD_DIM, BITS, IN_DTYPE (0 f32, 1 f16, 2 bf16), VPW (vectors per lane
// group per step, loaded before any is processed). Block: WARPS warps; LPV lanes per vector.
// Grid-stride over vectors v = j * num_kv_heads + h (source token skip + j, head h).

#define WARPS 8
#define IN_SIZE DT_SIZE(IN_DTYPE)

// Mirrors QuantizeParams in src/cuda/params.rs field by field.
struct QuantizeParams {
    u64 n_vectors;        // n_write * num_kv_heads
    u64 skip;             // source tokens before the first written one
    u32 num_kv_heads;
    u32 capacity;
    u32 first_slot;       // slot of source token `skip`; later tokens wrap at capacity
    float sqrt_d;         // sqrt(HEAD_DIM) as f32
    float inv_sqrt_d;     // (1 / sqrt(HEAD_DIM) as f64) as f32
    float scale_factor;   // scale_factor_d512 (HEAD_DIM > 256)
};

// Number of boundaries strictly below u (NaN -> 0), exactly the CPU's index: a branch-free
// search of the boundaries in Eytzinger order (s_eyt[1..2^BITS), node k's children 2k, 2k+1),
// so the lanes of one step read neighbouring words.
__device__ __forceinline__ u32 nearest_index(const float* s_eyt, float u) {
    // Byte offset of node k, advanced as 4k -> 8k + 4 * (s_eyt[k] < u): a compare, a select and
    // a shift-add per level.
    u32 a = 4;
#pragma unroll
    for (int level = 0; level < BITS; ++level) {
        const float b = *reinterpret_cast<const float*>(reinterpret_cast<const u8*>(s_eyt) + a);
        a = 2 * a + (b < u ? 4u : 0u);
    }
    return (a >> 2) - N_CENTROIDS;
}

extern "C" __global__ void __launch_bounds__(WARPS * 32)
tq_quantize(const u8* __restrict__ src, u8* __restrict__ packed, float* __restrict__ norms,
            u64* __restrict__ status, const float* __restrict__ signs,
            const float* __restrict__ eytzinger, const QuantizeParams p) {
    // [0] unused; [1..2^BITS) the boundaries in Eytzinger order.
    __shared__ float s_eyt[N_CENTROIDS];
    for (int i = threadIdx.x; i < N_CENTROIDS; i += blockDim.x) s_eyt[i] = eytzinger[i];
    __syncthreads();

    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int sub = lane % LPV;
    const int group = lane / LPV;
    float sg[E];
#pragma unroll
    for (int i = 0; i < E; ++i) sg[i] = __ldg(signs + sub * E + i);

    constexpr int IN_BYTES = E * IN_SIZE;
    constexpr u64 PER_WARP = (u64)GROUPS * VPW;
    const u64 stride = (u64)gridDim.x * WARPS * PER_WARP;
    for (u64 base = ((u64)blockIdx.x * WARPS + warp) * PER_WARP; base < p.n_vectors; base += stride) {
        // Load phase: group g takes vectors base + k * GROUPS + g (a warp reads contiguous rows).
        // Past the end, a group recomputes the last vector and stores nothing (shuffles need
        // every lane).
        u32 raw[VPW][WORDS_OF(IN_BYTES)];
        u64 jv[VPW], hv[VPW];
        bool valid[VPW];
#pragma unroll
        for (int k = 0; k < VPW; ++k) {
            const u64 v0 = base + (u64)k * GROUPS + group;
            valid[k] = v0 < p.n_vectors;
            const u64 v = valid[k] ? v0 : p.n_vectors - 1;
            divmod(v, p.num_kv_heads, jv[k], hv[k]);
            const u64 t = p.skip + jv[k];
            const u8* row = src + ((t * p.num_kv_heads + hv[k]) * HEAD_DIM + sub * E) * IN_SIZE;
            load_bytes<IN_BYTES>(row, raw[k]);
        }
#pragma unroll
        for (int k = 0; k < VPW; ++k) {
            // 1. y = H(D x): signs, butterflies, then inv_sqrt_d.
            float x[E];
#pragma unroll
            for (int i = 0; i < E; ++i) {
#if IN_DTYPE == DT_F32
                x[i] = __uint_as_float(raw[k][i]);
#else
                const u16 bits16 = (u16)(raw[k][i / 2] >> (16 * (i & 1)));
#if IN_DTYPE == DT_F16
                x[i] = f16_to_f32(bits16);
#else
                x[i] = bf16_to_f32(bits16);
#endif
#endif
                x[i] = __fmul_rn(x[i], sg[i]);
            }
            fwht_warp(x, lane);
#pragma unroll
            for (int i = 0; i < E; ++i) x[i] = __fmul_rn(x[i], p.inv_sqrt_d);

            // 2. Norm (or the block RMS) and the codebook-input scale.
            float nrm = __fsqrt_rn(block_sum_squares(x));
#if HEAD_DIM > 256
            nrm = __fdiv_rn(nrm, 16.0f);
            const float scale = nrm > 1e-10f ? __fdiv_rn(p.scale_factor, nrm) : 0.0f;
            // One vector per warp here: any bad block fails the vector.
            const bool bad = __any_sync(FULL_MASK, !is_finite(nrm));
#else
            const float scale = nrm > 1e-10f ? __fdiv_rn(p.sqrt_d, nrm) : 0.0f;
            const bool bad = !is_finite(nrm);
#endif
            // No early exit: the next vector's shuffles must see a converged warp.
            const u64 j = jv[k], h = hv[k];
            if (valid[k] && bad && sub == 0) {
                // Leave the slot unwritten; report the first bad (token, head) as t * heads + h.
                atomicMin(status, (p.skip + j) * p.num_kv_heads + h);
            }
            if (valid[k] && !bad) {
                u64 slot = (u64)p.first_slot + j;
                if (slot >= p.capacity) slot -= p.capacity;
                const u64 pos = h * p.capacity + slot;
                if (sub % LANES_PER_NORM == 0) norms[pos * NORMS_PER_POS + sub / LANES_PER_NORM] = nrm;

                // 3. Indices, packed in registers into the lane's stream bits, and 4. stored.
                u32 lw[LANE_WORDS + 1];
#pragma unroll
                for (int q = 0; q <= LANE_WORDS; ++q) lw[q] = 0;
#pragma unroll
                for (int i = 0; i < E; ++i) {
                    const u32 idx = nearest_index(s_eyt, __fmul_rn(x[i], scale));
                    const int bp = i * SB;
                    lw[bp >> 5] |= idx << (bp & 31);
                    if ((bp & 31) + SB > 32) lw[(bp >> 5) + 1] |= idx >> (32 - (bp & 31));
                }
                store_bytes<LANE_BYTES>(packed + pos * (u64)ROW_BYTES + sub * LANE_BYTES, lw);
            }
        }
    }
}
