// Shared device helpers, prepended by the registry to every kernel source (no headers needed).
//
// Compile-time constants (set by the registry with -D): HEAD_DIM (a power of two, 32..1024),
// BITS (2, 3, 4, 5, 6, 8), LANE_ELEMS (coordinates per lane, E: a power of two with
// HEAD_DIM / 32 <= E <= HEAD_DIM, E >= 16). LPV lanes of a warp handle one vector; sub-lane s = lane % LPV holds
// the E consecutive coordinates s*E .. s*E+E-1, and the warp's 32 / LPV lane groups handle
// neighbouring vectors.

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define FULL_MASK 0xffffffffu
// E >= 16 keeps each lane's packed bits whole bytes at every bit width.
#define E LANE_ELEMS
#define LPV (HEAD_DIM / E)
#define GROUPS (32 / LPV)
// Storage bits per index: 2, 3, 4 packed as a little-endian bit stream; 5, 6, 8 one byte each.
#define SB (BITS <= 4 ? BITS : 8)
#define N_CENTROIDS (1 << BITS)
#define N_BOUNDARIES (N_CENTROIDS - 1)
// Bytes of one packed row (always a multiple of 4).
#define ROW_BYTES (HEAD_DIM * SB / 8)
#define ROW_WORDS (ROW_BYTES / 4)
// Stream bits of one lane's E indices: sub-lane s holds bits s*LANE_BITS .. (s+1)*LANE_BITS - 1.
#define LANE_BITS (E * SB)
#define LANE_BYTES (LANE_BITS / 8)
#define LANE_WORDS ((LANE_BITS + 31) / 32)
// Lanes sharing one f32 norm: the whole vector for HEAD_DIM <= 256, else one 256-block.
#define LANES_PER_NORM ((HEAD_DIM <= 256 ? HEAD_DIM : 256) / E)
#define NORMS_PER_POS (HEAD_DIM <= 256 ? 1 : HEAD_DIM / 256)

// dtype codes of IN_DTYPE / OUT_DTYPE: 0 = f32, 1 = f16, 2 = bf16.
#define DT_F32 0
#define DT_F16 1
#define DT_BF16 2

__device__ __forceinline__ float f16_to_f32(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ u16 f32_to_f16_rn(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

__device__ __forceinline__ float bf16_to_f32(u16 h) { return __uint_as_float(((u32)h) << 16); }

__device__ __forceinline__ u16 f32_to_bf16_rn(float f) {
    u16 h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

// Bytes of one element of a dtype code.
#define DT_SIZE(dt) ((dt) == DT_F32 ? 4 : 2)

// Loads N bytes into words w[0 .. (N+3)/4): N is 1 or even, and p is aligned to the widest chunk
// (16, 8, 4 or 2 bytes) that divides N.
template <int N>
__device__ __forceinline__ void load_bytes(const u8* __restrict__ p, u32* w) {
    if constexpr (N % 16 == 0) {
#pragma unroll
        for (int i = 0; i < N / 16; ++i) {
            uint4 q = __ldg(reinterpret_cast<const uint4*>(p) + i);
            w[4 * i] = q.x;
            w[4 * i + 1] = q.y;
            w[4 * i + 2] = q.z;
            w[4 * i + 3] = q.w;
        }
    } else if constexpr (N % 8 == 0) {
#pragma unroll
        for (int i = 0; i < N / 8; ++i) {
            uint2 q = __ldg(reinterpret_cast<const uint2*>(p) + i);
            w[2 * i] = q.x;
            w[2 * i + 1] = q.y;
        }
    } else if constexpr (N % 4 == 0) {
#pragma unroll
        for (int i = 0; i < N / 4; ++i) w[i] = __ldg(reinterpret_cast<const u32*>(p) + i);
    } else if constexpr (N % 2 == 0) {
#pragma unroll
        for (int i = 0; i < N / 2; ++i) {
            const u32 h = __ldg(reinterpret_cast<const u16*>(p) + i);
            if (i % 2 == 0) w[i / 2] = h;
            else w[i / 2] |= h << 16;
        }
    } else {
        w[0] = __ldg(p);
    }
}

// Stores N bytes from words w (the shapes and alignment of load_bytes).
template <int N>
__device__ __forceinline__ void store_bytes(u8* __restrict__ p, const u32* w) {
    if constexpr (N % 16 == 0) {
#pragma unroll
        for (int i = 0; i < N / 16; ++i) {
            reinterpret_cast<uint4*>(p)[i] = make_uint4(w[4 * i], w[4 * i + 1], w[4 * i + 2], w[4 * i + 3]);
        }
    } else if constexpr (N % 8 == 0) {
#pragma unroll
        for (int i = 0; i < N / 8; ++i) reinterpret_cast<uint2*>(p)[i] = make_uint2(w[2 * i], w[2 * i + 1]);
    } else if constexpr (N % 4 == 0) {
#pragma unroll
        for (int i = 0; i < N / 4; ++i) reinterpret_cast<u32*>(p)[i] = w[i];
    } else if constexpr (N % 2 == 0) {
#pragma unroll
        for (int i = 0; i < N / 2; ++i) reinterpret_cast<u16*>(p)[i] = (u16)(w[i / 2] >> (16 * (i % 2)));
    } else {
        *p = (u8)w[0];
    }
}

__device__ __forceinline__ bool is_finite(float f) { return (__float_as_uint(f) & 0x7f800000u) != 0x7f800000u; }

// Words needed to hold N bytes.
#define WORDS_OF(n) (((n) + 3) / 4)

// Unnormalized FWHT of the group's vector, stages h = 1, 2, 4, ... in order (the CPU's order):
// stages h < E inside each lane, then h = E * m across the group's lanes m = 1, 2, ..., LPV/2 by
// xor-shuffle. Each output is one rounding of a + b or a - b, as on the CPU: across lanes it is
// fma(x, sigma, p) with sigma = +1 (lower lane: x + p) or -1 (upper lane: p - x); x * sigma is
// exact, so the fused operation rounds exactly once, like the CPU's add or subtract.
__device__ __forceinline__ void fwht_warp(float (&x)[E], int lane) {
#pragma unroll
    for (int h = 1; h < E; h <<= 1) {
#pragma unroll
        for (int i = 0; i < E; ++i) {
            if ((i & h) == 0) {
                float a = x[i], b = x[i + h];
                x[i] = __fadd_rn(a, b);
                x[i + h] = __fsub_rn(a, b);
            }
        }
    }
#pragma unroll
    for (int m = 1; m < LPV; m <<= 1) {
        const float sigma = (lane & m) != 0 ? -1.0f : 1.0f;
#pragma unroll
        for (int i = 0; i < E; ++i) {
            const float p = __shfl_xor_sync(FULL_MASK, x[i], m);
            x[i] = __fmaf_rn(x[i], sigma, p);
        }
    }
}

// Sum of squares of each norm block (the whole vector for HEAD_DIM <= 256, else its 256-block)
// by the CPU's adjacent-pair tree: the lane's E squares pairwise, then xor-shuffles 1, 2, 4, ...
// within the block's lanes pair adjacent lane sums (f32 addition is commutative, so a + b == b + a bit for bit).
__device__ __forceinline__ float block_sum_squares(const float (&x)[E]) {
    float s[E];
#pragma unroll
    for (int i = 0; i < E; ++i) s[i] = __fmul_rn(x[i], x[i]);
    // Level k's node j lives in s[j << k].
#pragma unroll
    for (int step = 1; step < E; step <<= 1) {
#pragma unroll
        for (int i = 0; i < E; i += 2 * step) s[i] = __fadd_rn(s[i], s[i + step]);
    }
    float t = s[0];
#pragma unroll
    for (int m = 1; m < LANES_PER_NORM; m <<= 1) t = __fadd_rn(t, __shfl_xor_sync(FULL_MASK, t, m));
    return t;
}

// a / b and a % b, in 32 bits when a fits (64-bit division is a long instruction sequence).
__device__ __forceinline__ void divmod(u64 a, u64 b, u64& q, u64& r) {
    if ((a >> 32) == 0) {
        const u32 q32 = (u32)a / (u32)b;
        q = q32;
        r = (u32)a - q32 * (u32)b;
    } else {
        q = a / b;
        r = a - q * b;
    }
}

// Index i (0 <= i < E) of a lane's stream bits lw (bit 0 = the lane's first index).
__device__ __forceinline__ u32 lane_index(const u32 (&lw)[LANE_WORDS + 1], int i) {
    const int bp = i * SB;
    const int w = bp >> 5;
    const int off = bp & 31;
    u32 v = lw[w] >> off;
    if (off + SB > 32) v |= lw[w + 1] << (32 - off);
    return v & ((1u << BITS) - 1u);
}
