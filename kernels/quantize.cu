// Quantize: n_write x num_kv_heads vectors -> packed rows + f32 norms (src/cpu/quantize.rs).
//
// Compile-time constants: HEAD_DIM, BITS, IN_DTYPE (0 f32, 1 f16, 2 bf16), VPW (vectors per lane
// group per step, loaded before any is processed). Block: WARPS warps; LPV lanes per vector.
// Grid-stride over vectors v = j * num_kv_heads + h (source token skip + j, head h).

#define WARPS 8
// Resident blocks per SM the register allocation must allow at 16 coordinates per lane: 4 (64
// registers) for 16-bit inputs, 3 (80) for f32; a few words spill, outside the per-coordinate
// work. The compiler's choice otherwise.
#define MIN_BLOCKS (E != 16 ? 1 : IN_DTYPE == DT_F32 ? 3 : 4)
#define IN_SIZE DT_SIZE(IN_DTYPE)
// Dtype of the new tokens a preset batch's append stages (tq_append_kv, compiled with IN_DTYPE
// f32: the staged vectors are f32).
#ifndef NEW_DTYPE
#define NEW_DTYPE IN_DTYPE
#endif
// One lane's input words of a vector row (E coordinates of IN_DTYPE).
#define QIN_BYTES (E * IN_SIZE)
#define QIN_WORDS WORDS_OF(QIN_BYTES)

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
    float bucket_scale;   // index lookup: bucket of u = floor(fma(u, bucket_scale, bucket_offset))
    float bucket_offset;
};

// "Nothing to write for this sequence" in a position array.
#define NO_POS 0xffffffffu

// Buckets of the index lookup (the table: `BucketTable` in src/cuda/codec.rs).
#define BUCKETS (4 << BITS)

// Adds the index of u at stream bit i * SB of the lane's words lw (zero there before): the number
// of boundaries strictly below u (NaN -> 0), exactly the CPU's index. Bucket
// c = min(floor(fma(u, bucket_scale, bucket_offset)), BUCKETS - 1) (as u32: negatives and NaN
// -> 0) is monotone in u and holds at most one boundary, so the index is s_tab[c].y (the
// boundaries in lower buckets) + (s_tab[c].x < u) (s_tab[c].x: the bucket's boundary as f32 bits,
// +inf if none). The fma only picks the bucket; the host mirrors it bit for bit.
__device__ __forceinline__ void pack_index(const uint2* s_tab, float u, float bucket_scale, float bucket_offset,
                                           u32 (&lw)[LANE_WORDS + 1], int i) {
    const u32 c = min(__float2uint_rd(__fmaf_rn(u, bucket_scale, bucket_offset)), (u32)(BUCKETS - 1));
    const uint2 e = s_tab[c];
    const int bp = i * SB;
    const int off = bp & 31;
    if (off + SB <= 32) {
        // The index's bits stay inside one word: a shift-add of the base, then a predicated add.
        u32 w = lw[bp >> 5] + (e.y << off);
        asm("{\n\t.reg .pred a;\n\tsetp.lt.f32 a, %1, %2;\n\t@a add.u32 %0, %0, %3;\n\t}"
            : "+r"(w)
            : "f"(__uint_as_float(e.x)), "f"(u), "r"(1u << off));
        lw[bp >> 5] = w;
    } else {
        const u32 idx = e.y + (__uint_as_float(e.x) < u ? 1u : 0u);
        lw[bp >> 5] += idx << off;
        lw[(bp >> 5) + 1] += idx >> (32 - off);
    }
}

// Loads N words from 16-byte aligned shared memory.
template <int N>
__device__ __forceinline__ void load_shared_words(const u32* p, u32* w) {
    static_assert(N % 4 == 0, "whole 16-byte chunks");
#pragma unroll
    for (int i = 0; i < N / 4; ++i) {
        const uint4 q = reinterpret_cast<const uint4*>(p)[i];
        w[4 * i] = q.x;
        w[4 * i + 1] = q.y;
        w[4 * i + 2] = q.z;
        w[4 * i + 3] = q.w;
    }
}

// An advance of vector v by d = q * num_kv_heads + r (r < num_kv_heads) on (j, h) = (v / nkv,
// v % nkv), without division: h wraps at most once.
struct Step {
    u64 q;
    u32 r, wrap;  // wrap = num_kv_heads - r (>= 1): h >= wrap means h + r wraps
    __device__ __forceinline__ void advance(u64& j, u32& h) const {
        const bool carry = h >= wrap;
        h = carry ? h - wrap : h + r;
        j += q + (carry ? 1 : 0);
    }
};

__device__ __forceinline__ Step make_step(u64 d, u32 num_kv_heads) {
    u64 q, r;
    divmod(d, num_kv_heads, q, r);
    return Step{q, (u32)r, num_kv_heads - (u32)r};
}

// Lane `sub`'s input words of source row `row` ([rows, HEAD_DIM] of IN_DTYPE); true (the maps'
// "quantize it").
__device__ __forceinline__ bool load_row(const u8* __restrict__ src, u64 row, int sub, u32 (&raw)[QIN_WORDS]) {
    load_bytes<QIN_BYTES>(src + (row * HEAD_DIM + sub * E) * IN_SIZE, raw);
    return true;
}

// Where vector (j, h) of tq_quantize comes from and goes: source token skip + j, logical
// position skip + j at slot first_slot + j (wrapping at capacity).
struct RangeMap {
    u64 skip;
    u32 num_kv_heads, capacity, first_slot;
    // Row of the source vector ([tokens, num_kv_heads, HEAD_DIM]); also the status report value.
    __device__ __forceinline__ u64 src_row(u64 j, u64 h) const { return (skip + j) * num_kv_heads + h; }
    __device__ __forceinline__ bool writes(u64) const { return true; }
    // Loads lane `sub`'s words of vector (j, h) from src; true: quantize it.
    __device__ __forceinline__ bool load(const u8* __restrict__ src, u64 j, u64 h, int sub, u32 (&raw)[QIN_WORDS], bool) const {
        return load_row(src, src_row(j, h), sub, raw);
    }
    // Destination row of the packed plane ([num_kv_heads, capacity, ROW_BYTES]).
    __device__ __forceinline__ u64 dst_row(u64 j, u64 h) const {
        u64 slot = (u64)first_slot + j;
        if (slot >= capacity) slot -= capacity;
        return h * capacity + slot;
    }
};

// Where vector (j, h) of tq_quantize_batch comes from and goes: sequence j's token at logical
// position seq_lens[j] (slot seq_lens[j] % capacity in a ring sequence); NO_POS = none.
struct BatchMap {
    const u32* __restrict__ seq_lens;
    const u32* __restrict__ ring_flags;
    u32 num_kv_heads, capacity;
    // Row of the source vector ([num_seqs, num_kv_heads, HEAD_DIM]); also the status report value.
    __device__ __forceinline__ u64 src_row(u64 j, u64 h) const { return j * num_kv_heads + h; }
    __device__ __forceinline__ bool writes(u64 j) const { return seq_lens[j] != NO_POS; }
    __device__ __forceinline__ bool load(const u8* __restrict__ src, u64 j, u64 h, int sub, u32 (&raw)[QIN_WORDS], bool) const {
        return load_row(src, src_row(j, h), sub, raw);
    }
    // Destination row of the batch plane ([num_seqs, num_kv_heads, capacity, ROW_BYTES]).
    __device__ __forceinline__ u64 dst_row(u64 j, u64 h) const {
        const u32 len = seq_lens[j];
        const u32 slot = ring_flags[j] != 0 ? len % capacity : len;
        return (j * num_kv_heads + h) * capacity + slot;
    }
};

// The quantize loop shared by the entries: p.n_vectors vectors v = j * num_kv_heads + h, over
// blocks `block` of `nblocks` (the launch's blocks, or one side's share of them). The map loads
// each lane's input words (map.load; false: visit the vector, quantize nothing) and places rows.
template <class Map>
__device__ __forceinline__ void quantize_vectors(const u8* __restrict__ src, u8* __restrict__ packed,
                                                 float* __restrict__ norms, u64* __restrict__ status,
                                                 const float* __restrict__ signs,
                                                 const uint2* __restrict__ buckets, const QuantizeParams& p,
                                                 const Map& map, u32 block, u32 nblocks) {
    // The index lookup table (pack_index).
    __shared__ uint2 s_tab[BUCKETS];
    for (int i = threadIdx.x; i < BUCKETS; i += blockDim.x) s_tab[i] = buckets[i];

    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int sub = lane % LPV;
    const int group = lane / LPV;
    constexpr int IN_WORDS = QIN_WORDS;
    // D as sign-bit masks over the raw input words of a row: x * (+-1) is exactly x with its
    // sign bit flipped where the sign is -1 (NaN payloads aside, which fail the vector anyway).
    __shared__ __align__(16) u32 s_sign[LPV * IN_WORDS];
    for (int w = threadIdx.x; w < LPV * IN_WORDS; w += blockDim.x) {
#if IN_DTYPE == DT_F32
        s_sign[w] = __ldg(signs + w) < 0.0f ? 0x80000000u : 0u;
#else
        s_sign[w] = (__ldg(signs + 2 * w) < 0.0f ? 0x8000u : 0u) | (__ldg(signs + 2 * w + 1) < 0.0f ? 0x80000000u : 0u);
#endif
    }
    __syncthreads();

    // Vector v = j * num_kv_heads + h is tracked as (j, h) and advanced without division.
    const u32 nkv = p.num_kv_heads;
    constexpr u64 PER_WARP = (u64)GROUPS * VPW;
    const u64 stride = (u64)nblocks * WARPS * PER_WARP;
    const Step step_next = make_step(stride, nkv);
    const Step step_group = make_step(GROUPS, nkv);
    const u64 first = ((u64)block * WARPS + warp) * PER_WARP;
    u64 j_base;
    u32 h_base;
    {
        u64 h;
        divmod(first + group, nkv, j_base, h);
        h_base = (u32)h;
    }
    for (u64 base = first; base < p.n_vectors; base += stride, step_next.advance(j_base, h_base)) {
        // Load phase: group g takes vectors base + k * GROUPS + g (a warp reads contiguous rows).
        // Past the end, a group computes vector 0 and stores nothing (shuffles need every lane).
        u32 raw[VPW][IN_WORDS];
        u64 jv[VPW], hv[VPW];
        bool valid[VPW], quant[VPW];
        u64 j = j_base;
        u32 h = h_base;
#pragma unroll
        for (int k = 0; k < VPW; ++k) {
            if (k > 0) step_group.advance(j, h);
            valid[k] = base + (u64)k * GROUPS + group < p.n_vectors && map.writes(j);
            jv[k] = valid[k] ? j : 0;
            hv[k] = valid[k] ? h : 0;
            quant[k] = map.load(src, jv[k], hv[k], sub, raw[k], valid[k]);
            u32 sign_mask[IN_WORDS];
            load_shared_words<IN_WORDS>(s_sign + sub * IN_WORDS, sign_mask);
#pragma unroll
            for (int w = 0; w < IN_WORDS; ++w) raw[k][w] ^= sign_mask[w];
        }
#pragma unroll
        for (int k = 0; k < VPW; ++k) {
            // 1. y = H(D x): (signs applied at load) butterflies, then inv_sqrt_d.
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
            if (valid[k] && quant[k] && bad && sub == 0) {
                // Leave the slot unwritten; report the first bad vector by its source row.
                atomicMin(status, map.src_row(j, h));
            }
            if (valid[k] && quant[k] && !bad) {
                const u64 pos = map.dst_row(j, h);
                if (sub % LANES_PER_NORM == 0) norms[pos * NORMS_PER_POS + sub / LANES_PER_NORM] = nrm;

                // 3. Indices, packed in registers into the lane's stream bits, and 4. stored.
                u32 lw[LANE_WORDS + 1];
#pragma unroll
                for (int q = 0; q <= LANE_WORDS; ++q) lw[q] = 0;
#pragma unroll
                for (int i = 0; i < E; ++i) {
                    pack_index(s_tab, __fmul_rn(x[i], scale), p.bucket_scale, p.bucket_offset, lw, i);
                }
                store_bytes<LANE_BYTES>(packed + pos * (u64)ROW_BYTES + sub * LANE_BYTES, lw);
            }
        }
    }
}

// The entry points below are left out where this file is compiled as one side of
// kernels/quantize_mixed.cu (TQ_SIDE_ONLY: inside a namespace, twice).
#ifndef TQ_SIDE_ONLY
extern "C" __global__ void __launch_bounds__(WARPS * 32, MIN_BLOCKS)
tq_quantize(const u8* __restrict__ src, u8* __restrict__ packed, float* __restrict__ norms,
            u64* __restrict__ status, const float* __restrict__ signs,
            const uint2* __restrict__ buckets, const QuantizeParams p) {
    const RangeMap map = {p.skip, p.num_kv_heads, p.capacity, p.first_slot};
    quantize_vectors(src, packed, norms, status, signs, buckets, p, map, blockIdx.x, gridDim.x);
}
#endif

// Batch appends: next_lens[j] = seq_lens[j] + 1 for the num_seqs sequences (block 0), the lengths
// after this append in a second buffer that the host swaps in (no upload after the launch); a
// null next_lens leaves them to the caller.
__device__ __forceinline__ void advance_lens(const u32* __restrict__ seq_lens, u32* __restrict__ next_lens, u64 num_seqs) {
    if (next_lens == nullptr || blockIdx.x != 0) return;
    for (u64 j = threadIdx.x; j < num_seqs; j += blockDim.x) next_lens[j] = seq_lens[j] + 1;
}

#ifndef TQ_SIDE_ONLY
// One token per sequence ([num_seqs, num_kv_heads, HEAD_DIM]) into the batch planes, each at its
// sequence's position seq_lens[j] (u32 [num_seqs], NO_POS: none; ring_flags u32 [num_seqs],
// nonzero = ring), and with next_lens the lengths after it (advance_lens).
// p.n_vectors = num_seqs * num_kv_heads; p.skip and p.first_slot are unused. The host checks
// that a global sequence has room (seq_lens[j] < capacity).
extern "C" __global__ void __launch_bounds__(WARPS * 32, MIN_BLOCKS)
tq_quantize_batch(const u8* __restrict__ src, u8* __restrict__ packed, float* __restrict__ norms,
                  u64* __restrict__ status, const float* __restrict__ signs,
                  const uint2* __restrict__ buckets, const u32* __restrict__ seq_lens,
                  const u32* __restrict__ ring_flags, u32* __restrict__ next_lens, const QuantizeParams p) {
    advance_lens(seq_lens, next_lens, p.n_vectors / p.num_kv_heads);
    const BatchMap map = {seq_lens, ring_flags, p.num_kv_heads, p.capacity};
    quantize_vectors(src, packed, norms, status, signs, buckets, p, map, blockIdx.x, gridDim.x);
}

// tq_quantize_batch for keys and values in one launch (both sides have BITS bits and IN_DTYPE
// inputs): blocks [0, gridDim.x / 2) write the keys (pk), the others the values (pv).
extern "C" __global__ void __launch_bounds__(WARPS * 32, MIN_BLOCKS)
tq_quantize_batch_kv(const u8* __restrict__ k_src, const u8* __restrict__ v_src, u8* __restrict__ k_packed,
                     float* __restrict__ k_norms, u8* __restrict__ v_packed, float* __restrict__ v_norms,
                     u64* __restrict__ status, const float* __restrict__ signs,
                     const uint2* __restrict__ k_buckets, const uint2* __restrict__ v_buckets,
                     const u32* __restrict__ seq_lens, const u32* __restrict__ ring_flags,
                     u32* __restrict__ next_lens, const QuantizeParams pk, const QuantizeParams pv) {
    advance_lens(seq_lens, next_lens, pk.n_vectors / pk.num_kv_heads);
    const BatchMap map = {seq_lens, ring_flags, pk.num_kv_heads, pk.capacity};
    const u32 half = gridDim.x / 2;
    if (blockIdx.x < half)
        quantize_vectors(k_src, k_packed, k_norms, status, signs, k_buckets, pk, map, blockIdx.x, half);
    else
        quantize_vectors(v_src, v_packed, v_norms, status, signs, v_buckets, pv, map, blockIdx.x - half,
                         gridDim.x - half);
}

#endif

// Mirrors AppendParams in src/cuda/params.rs field by field.
struct AppendParams {
    u64 k_new, v_new;       // NEW_DTYPE [num_seqs][num_kv_heads][HEAD_DIM]: one token per sequence
    u64 seq_lens;           // u32 [num_seqs]: lengths before this append
    u64 frontiers;          // u32 [num_seqs]: positions [sinks, frontier) are packed
    u64 key_mean;           // f32 [num_seqs][num_kv_heads][HEAD_DIM] mu, or 0 (no centering)
    u64 k_sinks, v_sinks;   // u16 [num_seqs][num_kv_heads][sinks][HEAD_DIM], exact dtype bits
    u64 k_window, v_window; // u16 [num_seqs][num_kv_heads][window][HEAD_DIM], position p at p % window
    u64 next_lens;          // u32 [num_seqs] (out): seq_lens + 1
    u64 next_frontiers;     // u32 [num_seqs] (out): the frontiers after this append
    u32 num_kv_heads;
    u32 sinks;
    u32 window;
    u32 exact_bf16;         // exact planes hold bf16 (1) or f16 (0)
};

#if IN_DTYPE == DT_F32
// One side of a one-token append to sequences with exact sinks/window or centered keys
// (KvCache::append's rule), as quantize_vectors' map (IN_DTYPE f32): vector (j, h) with P =
// seq_lens[j] and a = max(frontier, sinks): position a leaves the exact segments when P + 1 > a +
// window, and its vector (the window slot a % window, or the new token when a == P; keys minus mu)
// is quantized into slot a (a % capacity in a ring). The new token, rounded to the exact dtype
// (when anything is kept exact), goes to sink slot P (P < sinks) or window slot P % window after
// the leaving slot was read (the same lanes read and write the same coordinates). A non-finite
// input, or one the exact dtype cannot hold, is reported in `status` as row j * num_kv_heads + h.
// The key side also writes the lengths and frontiers after the append (next_lens,
// next_frontiers: the buffers the host swaps in).
struct StageMap {
    const u8* new_tok;    // NEW_DTYPE rows
    u16* sinks_plane;
    u16* window_plane;    // read (the leaving slot) and written (the new token)
    const float* mu;      // keys with centering, else null
    const u32* seq_lens;
    const u32* frontiers;
    const u32* ring_flags;
    u32* next_lens;       // key side only, else null
    u32* next_frontiers;
    u64* status;
    u32 num_kv_heads, capacity, sinks, window;
    bool bf;
    __device__ __forceinline__ u32 leaving(u64 j) const {
        const u32 fr = frontiers[j];
        return fr > sinks ? fr : sinks;
    }
    __device__ __forceinline__ u64 src_row(u64 j, u64 h) const { return j * num_kv_heads + h; }
    __device__ __forceinline__ bool writes(u64) const { return true; }
    __device__ __forceinline__ u64 dst_row(u64 j, u64 h) const {
        const u32 a = leaving(j);
        const u32 slot = ring_flags[j] != 0 ? a % capacity : a;
        return (j * num_kv_heads + h) * capacity + slot;
    }
    // Stages lane `sub`'s coordinates of vector (j, h) (side effects only for a valid vector);
    // true when position a leaves, raw then holds its f32 coordinates. Rows move in 16-byte
    // pieces (every lane's E coordinates start on a 32-byte boundary); the window is read with
    // coherent loads, before this lane overwrites the same coordinates of its slot.
    __device__ __forceinline__ bool load(const u8*, u64 j, u64 h, int sub, u32 (&raw)[QIN_WORDS], bool valid) const {
        static_assert(E % 8 == 0, "16-byte pieces of E 16-bit coordinates");
        const u32 len = seq_lens[j], fr = frontiers[j];
        const u32 a = fr > sinks ? fr : sinks;
        const bool leave = (u64)len + 1 > (u64)a + window;
        const bool exact = sinks + window > 0;
        const u64 row = j * num_kv_heads + h;
        const u64 at = row * HEAD_DIM + sub * E;
        constexpr int NEW_BYTES = E * DT_SIZE(NEW_DTYPE);
        u32 nw[WORDS_OF(NEW_BYTES)];
        load_bytes<NEW_BYTES>(new_tok + at * DT_SIZE(NEW_DTYPE), nw);
        float x[E];
        u32 xb[E / 2]; // the new token's exact bits, two coordinates a word
        bool bad = false;
#pragma unroll
        for (int i = 0; i < E; ++i) {
#if NEW_DTYPE == DT_F32
            float v = __uint_as_float(nw[i]);
#elif NEW_DTYPE == DT_F16
            float v = f16_to_f32((u16)(nw[i / 2] >> (16 * (i & 1))));
#else
            float v = bf16_to_f32((u16)(nw[i / 2] >> (16 * (i & 1))));
#endif
            bad = bad || !is_finite(v);
            u16 b = 0;
            if (exact) {
                b = bf ? f32_to_bf16_rn(v) : f32_to_f16_rn(v);
                v = bf ? bf16_to_f32(b) : f16_to_f32(b);
                bad = bad || !is_finite(v);
            }
            if (i % 2 == 0) xb[i / 2] = b;
            else xb[i / 2] |= (u32)b << 16;
            x[i] = v;
        }
        if (leave && a < len) {
            const uint4* w = reinterpret_cast<const uint4*>(window_plane + (row * window + a % window) * HEAD_DIM + sub * E);
#pragma unroll
            for (int q = 0; q < E / 8; ++q) {
                const uint4 t = w[q];
                const u32 ws[4] = {t.x, t.y, t.z, t.w};
#pragma unroll
                for (int i = 0; i < 8; ++i) {
                    const u16 b = (u16)(ws[i / 2] >> (16 * (i & 1)));
                    x[8 * q + i] = bf ? bf16_to_f32(b) : f16_to_f32(b);
                }
            }
        }
        if (mu != nullptr) {
            u32 mw[E];
            load_bytes<E * 4>((const u8*)(mu + at), mw);
#pragma unroll
            for (int i = 0; i < E; ++i) x[i] = __fsub_rn(x[i], __uint_as_float(mw[i]));
        }
#pragma unroll
        for (int i = 0; i < E; ++i) raw[i] = leave ? __float_as_uint(x[i]) : 0u;
        if (valid) {
            u16* d = nullptr;
            if (exact && len < sinks) d = sinks_plane + (row * sinks + len) * HEAD_DIM + sub * E;
            else if (exact && window > 0) d = window_plane + (row * window + len % window) * HEAD_DIM + sub * E;
            if (d != nullptr) {
                // plain stores (no __restrict__: the same slot may have been read above)
#pragma unroll
                for (int q = 0; q < E / 8; ++q)
                    reinterpret_cast<uint4*>(d)[q] = make_uint4(xb[4 * q], xb[4 * q + 1], xb[4 * q + 2], xb[4 * q + 3]);
            }
            if (bad) atomicMin(status, row);
            if (next_lens != nullptr && h == 0 && sub == 0) {
                // every position below len + 1 - window is packed (or a sink)
                next_lens[j] = len + 1;
                next_frontiers[j] = len + 1 > window && len + 1 - window > fr ? len + 1 - window : fr;
            }
        }
        return leave;
    }
};

// The StageMap of one side of p (keys: k_*, mu and the lengths' outputs; values: v_*). A template
// on the parameters' type: kernels/quantize_mixed.cu passes one side's AppendParams to the other
// side's copy of this function (the two namespaces declare the same layout as two types).
template <class Params>
__device__ __forceinline__ StageMap stage_map(const Params& p, bool keys, const u32* ring_flags, u32 capacity,
                                              u64* status) {
    return StageMap{(const u8*)(keys ? p.k_new : p.v_new),
                    (u16*)(keys ? p.k_sinks : p.v_sinks),
                    (u16*)(keys ? p.k_window : p.v_window),
                    keys ? (const float*)p.key_mean : nullptr,
                    (const u32*)p.seq_lens,
                    (const u32*)p.frontiers,
                    ring_flags,
                    keys ? (u32*)p.next_lens : nullptr,
                    keys ? (u32*)p.next_frontiers : nullptr,
                    status,
                    p.num_kv_heads,
                    capacity,
                    p.sinks,
                    p.window,
                    p.exact_bf16 != 0};
}
#endif

#if !defined(TQ_SIDE_ONLY) && IN_DTYPE == DT_F32
// One decode step of a batch with exact segments or centered keys, keys and values in one launch
// (both sides BITS bits; IN_DTYPE f32, the new tokens NEW_DTYPE): blocks [0, gridDim.x / 2) stage
// and quantize the keys, the others the values (StageMap). pk.n_vectors = pv.n_vectors = num_seqs
// * num_kv_heads.
extern "C" __global__ void __launch_bounds__(WARPS * 32, MIN_BLOCKS)
tq_append_kv(const AppendParams p, u8* __restrict__ k_packed, float* __restrict__ k_norms, u8* __restrict__ v_packed,
             float* __restrict__ v_norms, u64* __restrict__ status, const float* __restrict__ signs,
             const uint2* __restrict__ k_buckets, const uint2* __restrict__ v_buckets,
             const u32* __restrict__ ring_flags, const QuantizeParams pk, const QuantizeParams pv) {
    const u32 half = gridDim.x / 2;
    if (blockIdx.x < half)
        quantize_vectors(nullptr, k_packed, k_norms, status, signs, k_buckets, pk,
                         stage_map(p, true, ring_flags, pk.capacity, status), blockIdx.x, half);
    else
        quantize_vectors(nullptr, v_packed, v_norms, status, signs, v_buckets, pv,
                         stage_map(p, false, ring_flags, pv.capacity, status), blockIdx.x - half, gridDim.x - half);
}
#endif
