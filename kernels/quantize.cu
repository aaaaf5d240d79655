// Quantize: n_write x num_kv_heads vectors -> packed rows + f32 norms (src/cpu/quantize.rs).
//
// Compile-time constants: HEAD_DIM, BITS, IN_DTYPE (0 f32, 1 f16, 2 bf16), VPW (vectors per warp
// per step, loaded before any is processed). Block: WARPS warps; one warp per vector.
// Grid-stride over vectors v = j * num_kv_heads + h (source token skip + j, head h).

#define WARPS 8
#define IN_SIZE DT_SIZE(IN_DTYPE)
// Cells of the index-guess table for BITS >= 5 (see nearest_index).
#define GUESS_CELLS 1024
#define TABLE_SEARCH (BITS >= 5)

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
    float table_lo;       // guess table: cell = (u - table_lo) * table_inv_width
    float table_inv_width;
};

// Number of boundaries strictly below u (NaN -> 0), exactly the CPU's index.
__device__ __forceinline__ int nearest_index(const float* s_b, const u8* s_tab, float u,
                                             const QuantizeParams& p) {
#if TABLE_SEARCH
    // Any guess in 0..=N_BOUNDARIES gives the exact count; the table only makes it close.
    float f = __fmul_rn(__fsub_rn(u, p.table_lo), p.table_inv_width);
    f = fminf(fmaxf(f, 0.0f), (float)(GUESS_CELLS - 1));
    int t = s_tab[(int)f];
    while (t < N_BOUNDARIES && s_b[t] < u) ++t;
    while (t > 0 && !(s_b[t - 1] < u)) --t;
    return t;
#else
    // The CPU's branch-free binary search.
    int idx = 0;
#pragma unroll
    for (int step = (N_BOUNDARIES + 1) / 2; step > 0; step /= 2) {
        if (s_b[idx + step - 1] < u) idx += step;
    }
    return idx;
#endif
}

extern "C" __global__ void __launch_bounds__(WARPS * 32)
tq_quantize(const u8* __restrict__ src, u8* __restrict__ packed, float* __restrict__ norms,
            u64* __restrict__ status, const float* __restrict__ signs,
            const float* __restrict__ boundaries, const u8* __restrict__ guess,
            const QuantizeParams p) {
    __shared__ float s_b[N_BOUNDARIES];
#if TABLE_SEARCH
    __shared__ u8 s_tab[GUESS_CELLS];
    for (int i = threadIdx.x; i < GUESS_CELLS; i += blockDim.x) s_tab[i] = guess[i];
#else
    const u8* s_tab = nullptr;
#endif
    __shared__ __align__(16) u8 s_idx[WARPS][HEAD_DIM];
    for (int i = threadIdx.x; i < N_BOUNDARIES; i += blockDim.x) s_b[i] = boundaries[i];
    __syncthreads();

    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    u8* my_idx = s_idx[warp];
    float sg[E];
#pragma unroll
    for (int i = 0; i < E; ++i) sg[i] = __ldg(signs + lane * E + i);

    constexpr int IN_BYTES = E * IN_SIZE;
    const u64 stride = (u64)gridDim.x * WARPS * VPW;
    for (u64 base = ((u64)blockIdx.x * WARPS + warp) * VPW; base < p.n_vectors; base += stride) {
        u32 raw[VPW][WORDS_OF(IN_BYTES)];
        u64 jv[VPW], hv[VPW];
#pragma unroll
        for (int k = 0; k < VPW; ++k) {
            const u64 v = base + k;
            if (v < p.n_vectors) {
                divmod(v, p.num_kv_heads, jv[k], hv[k]);
                const u64 j = jv[k], h = hv[k];
                const u64 t = p.skip + j;
                const u8* row = src + ((t * p.num_kv_heads + h) * HEAD_DIM + lane * E) * IN_SIZE;
                load_bytes<IN_BYTES>(row, raw[k]);
            }
        }
#pragma unroll
        for (int k = 0; k < VPW; ++k) {
            const u64 v = base + k;
            if (v >= p.n_vectors) break;
            const u64 j = jv[k], h = hv[k];
            u64 slot = (u64)p.first_slot + j;
            if (slot >= p.capacity) slot -= p.capacity;
            const u64 pos = h * p.capacity + slot;

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
#else
            const float scale = nrm > 1e-10f ? __fdiv_rn(p.sqrt_d, nrm) : 0.0f;
#endif
            if (__any_sync(FULL_MASK, !is_finite(nrm))) {
                // Leave the slot unwritten; report the first bad (token, head) as t * heads + h.
                if (lane == 0) atomicMin(status, (p.skip + j) * p.num_kv_heads + h);
                continue;
            }
            if (lane % LANES_PER_NORM == 0) norms[pos * NORMS_PER_POS + lane / LANES_PER_NORM] = nrm;

            // 3. Indices, staged per warp in shared memory as one byte each.
            u32 iw[WORDS_OF(E)];
#pragma unroll
            for (int q = 0; q < WORDS_OF(E); ++q) iw[q] = 0;
#pragma unroll
            for (int i = 0; i < E; ++i) {
                const u32 idx = (u32)nearest_index(s_b, s_tab, __fmul_rn(x[i], scale), p);
                iw[i / 4] |= idx << (8 * (i % 4));
            }
            __syncwarp();
            store_bytes<E>(my_idx + lane * E, iw);
            __syncwarp();

            // 4. Pack: word w of the row holds stream bits 32w .. 32w + 31.
            u32* row = reinterpret_cast<u32*>(packed + pos * (u64)(ROW_WORDS * 4));
            for (int w = lane; w < ROW_WORDS; w += 32) {
                u32 word = 0;
#if SB == 3
                const int j0 = (32 * w) / 3;
#pragma unroll
                for (int q = 0; q < 12; ++q) {
                    const int jj = j0 + q;
                    const int bp = 3 * jj - 32 * w;
                    if (jj < HEAD_DIM && bp < 32) {
                        const u32 id = my_idx[jj];
                        word |= bp >= 0 ? (id << bp) : (id >> -bp);
                    }
                }
#else
                constexpr int IPW = 32 / SB;  // indices per word: 4, 8 or 16
                u32 b[IPW / 4];
#pragma unroll
                for (int q = 0; q < IPW / 4; ++q) b[q] = reinterpret_cast<const u32*>(my_idx + w * IPW)[q];
#pragma unroll
                for (int q = 0; q < IPW; ++q) word |= ((b[q / 4] >> (8 * (q % 4))) & 0xffu) << (SB * q);
#endif
                row[w] = word;
            }
        }
    }
}
