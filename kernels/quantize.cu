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

// Where vector (j, h) of tq_quantize comes from and goes: source token skip + j, logical
// position skip + j at slot first_slot + j (wrapping at capacity).
struct RangeMap {
    u64 skip;
    u32 num_kv_heads, capacity, first_slot;
    // Row of the source vector ([tokens, num_kv_heads, HEAD_DIM]); also the status report value.
    __device__ __forceinline__ u64 src_row(u64 j, u64 h) const { return (skip + j) * num_kv_heads + h; }
    // Destination row of the packed plane ([num_kv_heads, capacity, ROW_BYTES]).
    __device__ __forceinline__ u64 dst_row(u64 j, u64 h) const {
        u64 slot = (u64)first_slot + j;
        if (slot >= capacity) slot -= capacity;
        return h * capacity + slot;
    }
};

// Where vector (j, h) of tq_quantize_batch comes from and goes: sequence j's token at its own
// logical position seq_lens[j] (slot seq_lens[j] % capacity in a ring sequence).
struct BatchMap {
    const u32* __restrict__ seq_lens;
    const u32* __restrict__ ring_flags;
    u32 num_kv_heads, capacity;
    // Row of the source vector ([num_seqs, num_kv_heads, HEAD_DIM]); also the status report value.
    __device__ __forceinline__ u64 src_row(u64 j, u64 h) const { return j * num_kv_heads + h; }
    // Destination row of the batch plane ([num_seqs, num_kv_heads, capacity, ROW_BYTES]).
    __device__ __forceinline__ u64 dst_row(u64 j, u64 h) const {
        const u32 len = seq_lens[j];
        const u32 slot = ring_flags[j] != 0 ? len % capacity : len;
        return (j * num_kv_heads + h) * capacity + slot;
    }
};

// The quantize loop shared by both entries: p.n_vectors vectors v = j * num_kv_heads + h.
template <class Map>
__device__ __forceinline__ void quantize_vectors(const u8* __restrict__ src, u8* __restrict__ packed,
                                                 float* __restrict__ norms, u64* __restrict__ status,
                                                 const float* __restrict__ signs,
                                                 const float* __restrict__ eytzinger, const QuantizeParams& p,
                                                 const Map& map) {
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
            const u8* row = src + (map.src_row(jv[k], hv[k]) * HEAD_DIM + sub * E) * IN_SIZE;
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
                // Leave the slot unwritten; report the first bad vector by its source row.
                atomicMin(status, map.src_row(j, h));
            }
            if (valid[k] && !bad) {
                const u64 pos = map.dst_row(j, h);
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

extern "C" __global__ void __launch_bounds__(WARPS * 32)
tq_quantize(const u8* __restrict__ src, u8* __restrict__ packed, float* __restrict__ norms,
            u64* __restrict__ status, const float* __restrict__ signs,
            const float* __restrict__ eytzinger, const QuantizeParams p) {
    const RangeMap map = {p.skip, p.num_kv_heads, p.capacity, p.first_slot};
    quantize_vectors(src, packed, norms, status, signs, eytzinger, p, map);
}

// One token per sequence ([num_seqs, num_kv_heads, HEAD_DIM]) into the batch planes, each at its
// sequence's position seq_lens[j] (u32 [num_seqs]; ring_flags u32 [num_seqs], nonzero = ring).
// p.n_vectors = num_seqs * num_kv_heads; p.skip and p.first_slot are unused. The host checks
// that a global sequence has room (seq_lens[j] < capacity) and advances seq_lens afterwards.
extern "C" __global__ void __launch_bounds__(WARPS * 32)
tq_quantize_batch(const u8* __restrict__ src, u8* __restrict__ packed, float* __restrict__ norms,
                  u64* __restrict__ status, const float* __restrict__ signs,
                  const float* __restrict__ eytzinger, const u32* __restrict__ seq_lens,
                  const u32* __restrict__ ring_flags, const QuantizeParams p) {
    const BatchMap map = {seq_lens, ring_flags, p.num_kv_heads, p.capacity};
    quantize_vectors(src, packed, norms, status, signs, eytzinger, p, map);
}
