// Dequantize: slots start_pos .. start_pos + n_tokens of every head -> dst [heads, n_tokens, d]
// (src/cpu/dequantize.rs).
//
// Compile-time constants: HEAD_DIM, BITS, OUT_DTYPE (0 f32, 1 f16, 2 bf16), ORIGINAL (1: apply
// the inverse rotation), VPW (vectors per lane group per step, loaded before any is processed).
// Block: WARPS warps; LPV lanes per vector v = h * n_tokens + t.

#define WARPS 8
#define OUT_SIZE DT_SIZE(OUT_DTYPE)
// The lane's index bits as whole aligned words, or else a 64-bit window of two row words shifted
// to the lane's first bit (3-bit rows with E = 16: 48 bits at a 0- or 16-bit offset).
#define LANE_ALIGNED (LANE_BITS % 32 == 0)

// Mirrors DequantizeParams in src/cuda/params.rs field by field.
struct DequantizeParams {
    u64 n_vectors;        // num_kv_heads * n_tokens
    u32 num_kv_heads;
    u32 capacity;
    u32 start_pos;        // first slot read
    u32 n_tokens;
    float sqrt_d;         // sqrt(HEAD_DIM) as f32
    float inv_sqrt_d;     // (1 / sqrt(HEAD_DIM) as f64) as f32
    float scale_factor;   // scale_factor_d512 (HEAD_DIM > 256)
    u32 pad;
};

// Loads the lane's index bits of one packed row into lw, bit 0 = its first index.
__device__ __forceinline__ void load_lane_bits(const u8* __restrict__ row, int sub, u32 (&lw)[LANE_WORDS + 1]) {
    lw[LANE_WORDS] = 0;
#if LANE_ALIGNED
    load_bytes<LANE_BYTES>(row + sub * LANE_BYTES, lw);
#else
    const u32* row32 = reinterpret_cast<const u32*>(row);
    const int b0 = sub * LANE_BITS;
    const int wi = b0 >> 5;
    const u64 lo = __ldg(row32 + wi);
    const u64 hi = (LANE_BITS + (b0 & 31) > 32 && wi + 1 < ROW_WORDS) ? __ldg(row32 + wi + 1) : 0u;
    const u64 win = (lo | (hi << 32)) >> (b0 & 31);
    lw[0] = (u32)win;
    lw[1] = (u32)(win >> 32);
#endif
}

extern "C" __global__ void __launch_bounds__(WARPS * 32)
tq_dequantize(const u8* __restrict__ packed, const float* __restrict__ norms, u8* __restrict__ dst,
              const float* __restrict__ signs, const float* __restrict__ centroids,
              const DequantizeParams p) {
    __shared__ float s_c[N_CENTROIDS];
    for (int i = threadIdx.x; i < N_CENTROIDS; i += blockDim.x) s_c[i] = centroids[i];
    __syncthreads();

    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int sub = lane % LPV;
    const int group = lane / LPV;
#if ORIGINAL
    // inv_sqrt_d * s_i is exactly +-inv_sqrt_d, and (y * inv) * s == y * (inv * s) bit for bit.
    float sinv[E];
#pragma unroll
    for (int i = 0; i < E; ++i) sinv[i] = __fmul_rn(p.inv_sqrt_d, __ldg(signs + sub * E + i));
#endif
    constexpr int OUT_BYTES = E * OUT_SIZE;
    constexpr u64 PER_WARP = (u64)GROUPS * VPW;
    const u64 stride = (u64)gridDim.x * WARPS * PER_WARP;
    for (u64 base = ((u64)blockIdx.x * WARPS + warp) * PER_WARP; base < p.n_vectors; base += stride) {
        // Group g takes vectors base + k * GROUPS + g; past the end it recomputes the last vector
        // and stores nothing (shuffles need every lane).
        u32 lw[VPW][LANE_WORDS + 1];
        float nr[VPW];
        u64 vv[VPW];
        bool valid[VPW];
#pragma unroll
        for (int k = 0; k < VPW; ++k) {
            const u64 v0 = base + (u64)k * GROUPS + group;
            valid[k] = v0 < p.n_vectors;
            vv[k] = valid[k] ? v0 : p.n_vectors - 1;
            u64 h, t;
            divmod(vv[k], p.n_tokens, h, t);
            const u64 pos = h * p.capacity + p.start_pos + t;
            load_lane_bits(packed + pos * (u64)ROW_BYTES, sub, lw[k]);
            nr[k] = __ldg(norms + pos * NORMS_PER_POS + sub / LANES_PER_NORM);
        }
#pragma unroll
        for (int k = 0; k < VPW; ++k) {
#if HEAD_DIM > 256
            const float g = __fdiv_rn(nr[k], p.scale_factor);
#else
            const float g = __fdiv_rn(nr[k], p.sqrt_d);
#endif
            float y[E];
#pragma unroll
            for (int i = 0; i < E; ++i) y[i] = __fmul_rn(s_c[lane_index(lw[k], i)], g);
#if ORIGINAL
            fwht_warp(y, lane);
#pragma unroll
            for (int i = 0; i < E; ++i) y[i] = __fmul_rn(y[i], sinv[i]);
#endif
            if (valid[k]) {  // no early exit: later shuffles need a converged warp
                u32 ow[WORDS_OF(OUT_BYTES)];
#if OUT_DTYPE == DT_F32
#pragma unroll
                for (int i = 0; i < E; ++i) ow[i] = __float_as_uint(y[i]);
#else
#pragma unroll
                for (int q = 0; q < WORDS_OF(OUT_BYTES); ++q) ow[q] = 0;
#pragma unroll
                for (int i = 0; i < E; ++i) {
#if OUT_DTYPE == DT_F16
                    const u32 b16 = f32_to_f16_rn(y[i]);
#else
                    const u32 b16 = f32_to_bf16_rn(y[i]);
#endif
                    ow[i / 2] |= b16 << (16 * (i & 1));
                }
#endif
                store_bytes<OUT_BYTES>(dst + (vv[k] * HEAD_DIM + sub * E) * OUT_SIZE, ow);
            }
        }
    }
}
