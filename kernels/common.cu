// Shared device helpers, prepended by the registry to every kernel source (no headers needed).
//
// Compile-time constants (set by the registry with -D): HEAD_DIM (a power of two, 32..1024),
// BITS (2, 3, 4, 5, 6, 8). One warp handles one vector; lane l holds the E = HEAD_DIM / 32
// consecutive coordinates l*E .. l*E+E-1.

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define FULL_MASK 0xffffffffu
#define E (HEAD_DIM / 32)
// Storage bits per index: 2, 3, 4 packed as a little-endian bit stream; 5, 6, 8 one byte each.
#define SB (BITS <= 4 ? BITS : 8)
#define N_CENTROIDS (1 << BITS)
#define N_BOUNDARIES (N_CENTROIDS - 1)
// Words (u32) of one packed row; row_bytes is always a multiple of 4.
#define ROW_WORDS (HEAD_DIM * SB / 32)
// Lanes sharing one f32 norm: all 32 for HEAD_DIM <= 256, else one 256-block each.
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

// Loads N bytes into words w[0 .. max(1, N/4)): N is 1, 2 or a multiple of 4, and p is aligned
// to the widest chunk (16, 8 or 4 bytes) that divides N.
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
    } else if constexpr (N == 2) {
        w[0] = __ldg(reinterpret_cast<const u16*>(p));
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
    } else if constexpr (N == 2) {
        *reinterpret_cast<u16*>(p) = (u16)w[0];
    } else {
        *p = (u8)w[0];
    }
}

__device__ __forceinline__ bool is_finite(float f) { return (__float_as_uint(f) & 0x7f800000u) != 0x7f800000u; }

// Words needed to hold N bytes.
#define WORDS_OF(n) ((n) < 4 ? 1 : (n) / 4)

// Unnormalized FWHT of the warp's vector, stages h = 1, 2, 4, ... in order (the CPU's order):
// stages h < E inside each lane, then h = E * m across lanes m = 1, 2, 4, 8, 16 by xor-shuffle.
// Each output is one rounding of a + b or a - b (a the lower index), as on the CPU.
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
    for (int m = 1; m < 32; m <<= 1) {
        const bool upper = (lane & m) != 0;
#pragma unroll
        for (int i = 0; i < E; ++i) {
            float p = __shfl_xor_sync(FULL_MASK, x[i], m);
            x[i] = upper ? __fsub_rn(p, x[i]) : __fadd_rn(x[i], p);
        }
    }
}

// Sum of squares of each norm block (the whole vector for HEAD_DIM <= 256, else its 256-block)
// by the CPU's adjacent-pair tree: the lane's E squares pairwise, then xor-shuffles 1, 2, 4, ...
// pair adjacent lane sums (f32 addition is commutative, so a + b == b + a bit for bit).
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
