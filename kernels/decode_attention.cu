// Fused decode attention over the TurboQuant compressed KV cache (docs/FORMAT.md).
//
// One query token per sequence (at logical position len-1) against packed keys/values:
//   q~ = H D q (rotated once), s_j = scale * <q~, k^_j> in the rotated domain (optional logit
//   softcap c*tanh(s/c), optional sliding window), online softmax (TRANS: its running max
//   raised only past LAZY_TAU), o~ = sum_j p_j v^_j,
//   o = D H o~ (un-rotated once). k^_j, v^_j are dequantized on the fly: C[idx] * g.
//
// Kernels (NVRTC, no toolkit headers; compile-time constants by -D):
//   tq_decode_split  grid (num_splits, num_kv_heads, num_seqs [+ exact slices]), block WARPS*32 threads,
//                    dynamic shared memory tq_decode_smem_bytes. Each block serves the GQA
//                    query heads of one KV head over one slice of the sequence (flash-decoding)
//                    and writes a partial state: part_o [num_seqs][num_kv_heads][num_splits][GQA]
//                    [HEAD_DIM] f32 (unnormalized, rotated domain, times pv_scale) and part_ml
//                    [...][GQA][2] f32 (running max in log2 units, sum of weights).
//                    With exact segments (p.exact = 1) the packed blocks are num_splits-1 per
//                    (sequence, KV head) and grid z-slices past num_seqs hold exact_blocks exact
//                    blocks, block e serving (sequence, KV head) pairs e, e + exact_blocks, ...
//                    (exact_block), each writing its pair's slot num_splits-1; with p.exact = 2
//                    each pair's last packed split scores them first (slot num_splits-1); with
//                    p.exact = 3 (dynamic shared memory tq_decode_smem_bytes_spread) every packed
//                    split also scores a share of its pair's exact slots (exact_items,
//                    exact_finish) and merges them with its warps' states: no extra slot.
//                    With MERGE_LAST the last block of each (sequence, KV head) to finish
//                    (an atomic counter per pair in p.counters) merges the pair's partials
//                    itself (merge_pair) and tq_decode_merge is not launched; with
//                    p.direct_out (one packed split, no exact slot) the block writes the
//                    output itself (finish_single).
//   tq_decode_merge  grid (num_kv_heads*GQA, num_seqs), block HEAD_DIM threads: log-sum-exp merge
//                    of the splits, normalization, inverse rotation, output in DTYPE.
//
// Work split inside a block: each warp takes 16-token tiles (tile, tile+WARPS, ...) through its own
// cp.async pipeline in shared memory (STAGES stages, STAGES-1 tiles of loads in flight; the first
// ones are issued before the prologue builds the tables and rotates the queries; the cache rows
// and norms go through the L2 under the policy p.l2_evict_first picks). Scores use
// tensor-core mma.m16n8k16 (f16 in, f32 accumulate), P' = p * g_v * pv_scale. Without TRANS:
// S[head][token] = Q^[head][dim] * C[dim][token] with the GQA heads on the M rows (rows 8..15
// zero), then O[head][dim] += P'[head][token] * C[token][dim]. With TRANS (transposed, no idle
// rows, half the mma): S^T[token][head] = C[token][dim] * Q^T[dim][head] (16 tokens on the rows),
// P'^T moved into the B operand by movmatrix.trans, O^T[dim][head] += C^T[dim][token] *
// P'^T[token][head] (16 head dims on the rows). Codebook lookups come from a lane-replicated table
// in shared memory (entry e of lane l at word e*32 + l: conflict-free; with LUT256 byte fields
// at byte e*256 + l*4, see K_P8, and 2-bit V's nibble fields too, see V_N8): for bits <= 4 one lookup decodes a pair of indices (one 2*bits
// field of the packed stream) into a half2 (2- and 4-bit V with TRANS: a key of two tokens'
// indices of one dim, V_KEYS); for 5/6/8 bits one lookup per index. Within an mma
// the k/n index -> head-dim mapping is a fixed permutation chosen so that each thread reads whole
// 16/8/4-byte chunks of a packed row (see kdim / vdim).
// Requires the packed and norm buffers 16-byte aligned (cudaMalloc'd base pointers).
//
// Defines: K_BITS, V_BITS (2,3,4,5,6,8), HEAD_DIM (64..512, power of two), GQA (1..8 query heads
// per KV head), DTYPE (0 f32, 1 f16, 2 bf16: queries and output), WARPS (warps per block),
// STAGES (tiles per warp in the shared-memory pipeline: STAGES-1 tiles of loads in flight),
// MIN_BLOCKS (resident blocks per SM the register allocation must allow), LUT256 (0/1: byte-field
// tables in 256-byte rows, offsets by one PRMT), TRANS (0/1: transposed tensor-core products),
// MERGE_LAST (0/1: the splits are merged by the last block of each pair, one launch), VROWS
// (0/1: the V stage in row order where it applies, see V_ROWS, V_ROWS64 and V_ROWS32).
// Ranges assumed: |g| = norm/sqrt(d) (or rms/sf) times pv_scale within f16 range (~6e-5..6e4;
// with TRANS up to ~4e3: its softmax weights before normalization reach 2^LAZY_TAU = 16).

#ifndef K_BITS
#define K_BITS 4
#endif
#ifndef V_BITS
#define V_BITS 4
#endif
#ifndef HEAD_DIM
#define HEAD_DIM 128
#endif
#ifndef GQA
#define GQA 4
#endif
#ifndef DTYPE
#define DTYPE 2
#endif
#ifndef WARPS
#define WARPS 4
#endif
#ifndef STAGES
#define STAGES 4
#endif
#ifndef MIN_BLOCKS
#define MIN_BLOCKS 1
#endif
#ifndef LUT256
#define LUT256 0
#endif
#ifndef TRANS
#define TRANS 0
#endif
#ifndef MERGE_LAST
#define MERGE_LAST 0
#endif
#ifndef VROWS
#define VROWS 0
#endif
#ifndef TIMELINE
#define TIMELINE 0
#endif

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

/// Kernel parameters, passed by value. Pointers are device addresses (u64); the Rust side mirrors
/// this struct field by field (#[repr(C)], 232 bytes).
struct DecodeParams {
    u64 q;          // [num_seqs][num_kv_heads*GQA][HEAD_DIM] DTYPE
    u64 out;        // same shape and dtype
    u64 k_packed;   // u8 [num_seqs][num_kv_heads][capacity][row_bytes_k]
    u64 k_norms;    // f32 [num_seqs][num_kv_heads][capacity][norms_per_pos]
    u64 v_packed;   // u8 [num_seqs][num_kv_heads][capacity][row_bytes_v]
    u64 v_norms;    // f32 [num_seqs][num_kv_heads][capacity][norms_per_pos]
    u64 k_codebook; // f32 [1 << K_BITS], ascending Lloyd-Max centroids
    u64 v_codebook; // f32 [1 << V_BITS]
    u64 signs;      // f32 [HEAD_DIM], the rotation's +-1 signs
    u64 seq_lens;   // u32 [num_seqs], tokens appended (logical length)
    u64 ring_flags; // u32 [num_seqs], nonzero = ring sequence; 0 (null) = use `ring` for all
    u64 part_o;     // f32 workspace, see above
    u64 part_ml;    // f32 workspace, see above
    u32 num_seqs;
    u32 num_kv_heads;
    u32 capacity;   // slots per (sequence, head)
    u32 num_splits; // blocks per (sequence, KV head) along the sequence
    u32 ring;       // 1 = every sequence is a ring (slot = pos % capacity), unless ring_flags
    u32 window;     // 0 = none; else only positions > len-1-window attend
    float scale;    // softmax scale (e.g. 1/sqrt(head_dim))
    float softcap;  // 0 = none; else s = softcap * tanh(s / softcap)
    float pv_scale; // multiplies P' before f16 rounding; the merge divides it out (1 by default)
    float inv_sf;   // 1 / scale_factor_d512 (used for HEAD_DIM > 256)
    // Exact segments and key centering (docs/FORMAT.md; all 0 for a plain TurboQuant cache).
    u64 frontiers;  // u32 [num_seqs]: positions [sinks, frontier) are packed; 0 (null) = len
    u64 key_mean;   // f32 [num_seqs][num_kv_heads][HEAD_DIM], mu (original domain); 0 = none
    u64 k_sinks;    // u16 [num_seqs][num_kv_heads][sinks][HEAD_DIM], f16/bf16 bits
    u64 v_sinks;
    u64 k_window;   // u16 [num_seqs][num_kv_heads][window_len][HEAD_DIM], position p at p % window_len
    u64 v_window;
    u32 sinks;      // exact sink positions 0..sinks
    u32 window_len; // exact recent-window slots
    u32 exact;      // slot num_splits-1 of each (sequence, KV head) holds its exact partial, written by
                    // 1: an exact block (grid z >= num_seqs); 2: the pair's last packed split, first;
                    // 3: no exact slot, each packed split also scores a slice of the exact slots
    u32 exact_bf16; // exact planes hold bf16 (1) or f16 (0)
    u64 counters;   // u32 [num_seqs][num_kv_heads], zero between launches (MERGE_LAST; else unused)
    u32 exact_credit; // exact = 2: tiles the last packed split gives up to the others for its exact work
    u32 exact_blocks; // exact = 1: exact blocks; block e serves pairs e, e + exact_blocks, ...
    u32 l2_evict_first; // 1: the packed rows and norms stream under the L2 evict-first policy
    u32 direct_out;     // 1: one packed split per pair and no exact slot: the block normalizes,
                        // un-rotates and writes the output itself (finish_single), no partial
};

// ---------------------------------------------------------------- compile-time geometry

constexpr int D = HEAD_DIM;
constexpr int D_BLK = D < 256 ? D : 256; // coordinates per norm block
constexpr int NB = D / D_BLK;            // norms per position
constexpr int KB = D_BLK / 16;           // score mma k-chunks per norm block
constexpr int NTB = D_BLK / 8;           // PV mma n-tiles per norm block
constexpr int THREADS = WARPS * 32;
constexpr int TILE = 16;                 // tokens per warp tile
constexpr int EL = D / 32;               // dims per lane of a warp-held D-vector: lane l holds [l * EL, l * EL + EL)
constexpr int HPW = (GQA + WARPS - 1) / WARPS; // query heads per warp (head h on warp h % WARPS)

static_assert(D >= 64 && D <= 512 && (D & (D - 1)) == 0, "HEAD_DIM must be 64..512, power of two");
static_assert(GQA >= 1 && GQA <= 8, "GQA must be 1..8 (heads on the mma rows 0..7)");

__host__ __device__ constexpr float inv_sqrt_pow2(int d) {
    // exact for even powers of two; sqrt(1/2) rounded for odd ones
    float r = 1.0f;
    int k = 0;
    while ((1 << k) < d) ++k;
    for (int i = 0; i < k / 2; ++i) r *= 0.5f;
    return (k & 1) ? r * 0.70710678118654752f : r;
}
constexpr float INV_SQRT_D = inv_sqrt_pow2(D);
constexpr float LOG2E = 1.4426950408889634f;
/// TRANS token loop: the running max (log2 units) is raised only past this margin, so a softmax
/// weight before normalization is at most 2^LAZY_TAU = 16 (P' = p * g_v stays in f16 range for
/// |g_v| up to ~4e3).
constexpr float LAZY_TAU = 4.0f;

__host__ __device__ constexpr int gcd_c(int a, int b) { return b == 0 ? a : gcd_c(b, a % b); }
__host__ __device__ constexpr int pow2_align(int n) { return (n & 15) == 0 ? 16 : (n & 7) == 0 ? 8 : (n & 3) == 0 ? 4 : (n & 1) == 0 ? 2 : 1; }

/// Per-side packing constants.
template <int BITS>
struct Side {
    static constexpr bool PAIR = BITS <= 4;                       // one lookup = two indices
    static constexpr int FIELD = PAIR ? 2 * BITS : 8;             // bits per lookup field
    static constexpr int ENTRIES = PAIR ? (1 << (2 * BITS)) : (1 << BITS);
    static constexpr int TAB_WORDS = ENTRIES * 32;                // lane-replicated
    __host__ __device__ static constexpr int bytes(int dims) { return PAIR ? dims * BITS / 8 : dims; }
    static constexpr int ROW = bytes(D);                           // row_bytes
    static constexpr int BLK = bytes(D_BLK);                       // bytes per norm block
    static constexpr int KBYTES = bytes(D_BLK / 4);                // score side: per thread, per block
    static constexpr int VBYTES = bytes(NTB);                      // PV side: per thread, per block
    static constexpr int KWORDS = (KBYTES + 3) / 4;
    static constexpr int VWORDS = (VBYTES + 3) / 4;
    static constexpr int KALIGN = pow2_align(gcd_c(gcd_c(KBYTES, ROW), BLK));
    static constexpr int VALIGN = pow2_align(gcd_c(gcd_c(VBYTES, ROW), BLK));
};
typedef Side<K_BITS> KS;
typedef Side<V_BITS> VS;
constexpr bool SHARED_TAB = K_BITS == V_BITS;
// Per-warp pipeline stage (bytes): each thread's raw bytes of one tile, chunk-interleaved across
// lanes (chunk k of lane l at (32k + l) * CHUNK: conflict-free), then the tile's norms.
// cp.async needs 4/8/16-byte chunks; rows whose per-thread slices are not 4-byte aligned (3-bit
// at small head_dim) go through registers instead (ASYNC = false), into the same layout.
constexpr bool ASYNC = KS::KALIGN >= 4 && VS::VALIGN >= 4;
constexpr int KCH = ASYNC ? KS::KALIGN : 4;                     // K chunk bytes
constexpr int VCH = ASYNC ? VS::VALIGN : 4;
constexpr int KNCH = KS::KWORDS * 4 / KCH;                      // chunks per (token, norm block)
constexpr int VNCH = VS::VWORDS * 4 / VCH;
// Chunk interleave: when a thread's slice has several chunks, chunk k of thread c (K) / g (V) sits
// at row offset (4k + c) * KCH / (8k + g) * VCH, so one cp.async instruction of the warp covers
// whole 32-byte sectors (contiguous slices would fetch every sector twice).
constexpr int KDPC = KS::PAIR ? KCH * 8 / K_BITS : KCH;        // dims per K chunk (if integral)
constexpr int VDPC = VS::PAIR ? VCH * 8 / V_BITS : VCH;
constexpr bool K_ILV = ASYNC && KNCH > 1 && (KCH * 8) % (KS::PAIR ? K_BITS : 8) == 0 && KDPC % 4 == 0;
constexpr bool V_ILV = ASYNC && VNCH > 1 && (VCH * 8) % (VS::PAIR ? V_BITS : 8) == 0 && VDPC % 2 == 0;
__device__ __forceinline__ u32 k_chunk_off(u32 c, int k) { return K_ILV ? (4 * k + c) * KCH : c * KS::KBYTES + k * KCH; }
__device__ __forceinline__ u32 v_chunk_off(u32 g, int k) { return V_ILV ? (8 * k + g) * VCH : g * VS::VBYTES + k * VCH; }
/// Head dim of local score-side dim t (0 .. D_BLK/4) of thread c in norm block b.
__device__ __forceinline__ u32 kdim(int b, u32 c, u32 t) {
    return b * 256 + (K_ILV ? ((t / KDPC) * 4 + c) * KDPC + t % KDPC : c * (D_BLK / 4) + t);
}
/// Head dim of local PV-side dim j (0 .. NTB) of column n in norm block b.
__device__ __forceinline__ u32 vdim(int b, u32 n, u32 j) {
    return b * 256 + (V_ILV ? ((j / VDPC) * 8 + n) * VDPC + j % VDPC : n * NTB + j);
}
constexpr int ST_K = 0;                                         // [2 tokens][NB][KNCH][32 lanes]
constexpr int ST_V = ST_K + 2 * NB * KNCH * 32 * KCH;           // [4 tokens][NB][VNCH][32 lanes]
constexpr int ST_N = ST_V + 4 * NB * VNCH * 32 * VCH;           // f32 [2 sides][16 tokens][NB]
constexpr int STAGE_BYTES = ST_N + 2 * TILE * NB * 4;
static_assert(STAGE_BYTES % 16 == 0, "stage alignment");
constexpr int PIPE_BYTES = WARPS * STAGES * STAGE_BYTES;
// Tables. A side whose lookup field is one byte (4-bit pairs, 5/6/8-bit singles) takes, with
// LUT256, rows of 256 bytes: entry e of lane l at byte e * 256 + l * 4, so its offset is one
// PRMT of the packed word and lane * 4 (byte_off). Such a table leaves the upper 128 bytes of each
// row free: there go the V table when both sides have byte fields and different tables (TWO_P8),
// else the warps' pipelines (HOLES: logical pipeline byte x at row x / 128, byte 128 + x % 128;
// every stage, chunk group and norm block starts on a multiple of 128, so an address is
// PSC * (multiple of 128) + a per-lane term). Other tables: entry e of lane l at word e * 32 + l.
constexpr bool K_P8 = LUT256 && KS::FIELD == 8;
constexpr bool V_P8 = LUT256 && VS::FIELD == 8;
// 2-bit V (4-bit pair fields) with LUT256: its 16-entry table in 256-byte rows too, each word's
// even and odd nibbles split into bytes (three instructions per 8 fields), then one PRMT per
// lookup as for P8 (was a shift and a mask per lookup).
constexpr bool V_N8 = LUT256 && VS::FIELD == 4 && !SHARED_TAB;
constexpr int V_TAB_WORDS = V_N8 ? VS::ENTRIES * 64 : VS::TAB_WORDS;
constexpr bool TWO_P8 = K_P8 && V_P8 && !SHARED_TAB;
constexpr bool HOLES = (K_P8 || V_P8) && !TWO_P8 && NB == 1;
constexpr int PSC = HOLES ? 2 : 1;                              // pipeline address scale
constexpr int P8_ROWS = (K_P8 ? KS::ENTRIES : 0) > (V_P8 ? VS::ENTRIES : 0) ? (K_P8 ? KS::ENTRIES : 0) : (V_P8 ? VS::ENTRIES : 0);
constexpr int REGION_ROWS = HOLES && PIPE_BYTES / 128 > P8_ROWS ? PIPE_BYTES / 128 : P8_ROWS;
constexpr int REGION_WORDS = REGION_ROWS * 64;
constexpr int TAB_K_OFF = K_P8 ? 0 : REGION_WORDS;              // words
constexpr int TAB_V_OFF = SHARED_TAB ? TAB_K_OFF : V_P8 ? (TWO_P8 ? 32 : 0) : REGION_WORDS + (K_P8 ? 0 : KS::TAB_WORDS);
constexpr int TAB_END = REGION_WORDS + (K_P8 ? 0 : KS::TAB_WORDS) + (V_P8 || SHARED_TAB ? 0 : V_TAB_WORDS);
constexpr int PIPE_OFF = HOLES ? 32 : TAB_END;                  // words: pipeline byte 0
constexpr int QS_OFF = HOLES ? TAB_END : TAB_END + PIPE_BYTES / 4; // f32 rows (qs_at) + amax [16]
static_assert(STAGE_BYTES % 128 == 0 && ST_V % 128 == 0 && ST_N % 128 == 0, "128-byte pipeline groups");
/// Physical byte offset from the pipeline base of logical pipeline byte x (identity without HOLES).
/// pofs(A + x) = PSC * A + pofs(x) for A a multiple of 128: only per-lane terms go through it.
__device__ __forceinline__ u32 pofs(u32 x) { return HOLES ? ((x >> 7) << 8) + (x & 127) : x; }
/// Rotated query rows: logical (h, d) at word h * QS_STRIDE + d + 2 * (d / 32) from QS_OFF, so
/// that the score fragments' loads (lanes over heads g and 32-dim groups c, LDS.64 each) fall in
/// distinct banks (without the padding, 16 lanes hit one bank pair at 4 bits: ncu counted ~240
/// excess shared wavefronts per warp in the prologue).
constexpr int QS_STRIDE = D + 2 * (D / 32) + 8;
__device__ __forceinline__ u32 qs_at(u32 h, u32 d) { return h * QS_STRIDE + d + 2 * (d / 32); }
/// The group's raw queries and the rotation's signs, copied in at block start (cp.async).
constexpr int QRAW_BYTES = GQA * D * (DTYPE == 0 ? 4 : 2);
constexpr int QRAW_OFF = QS_OFF + GQA * QS_STRIDE + 16; // words
constexpr int SG_OFF = QRAW_OFF + QRAW_BYTES / 4;
static_assert(QRAW_OFF % 4 == 0 && QRAW_BYTES % 16 == 0, "16-byte query staging");
constexpr int PROLOGUE_WORDS = SG_OFF + D; // qs, amax [8], qmu [8], raw queries, signs
/// Row stride (words) of the block merge's warp states (smo_at, below): >= D + 2 * (D / 32), = 4 mod 16.
constexpr int SMO_RS = (D + 2 * (D / 32) + 11) / 16 * 16 + 4;
constexpr int MERGE_WORDS = WARPS * GQA * SMO_RS + 2 * WARPS * 8; // aliases everything after the loop
/// Shared-memory words of the exact block: queries [GQA][D], per-warp value sums [WARPS][GQA][D],
/// per-warp running max, sum and scale * q.mu [WARPS][8] each.
constexpr int EXACT_WORDS = GQA * D + WARPS * GQA * D + 3 * WARPS * 8;

/// finish_single: the block's combined state past the warps' states: value sums [GQA][D], then
/// max and sum [GQA][2] (one word before the end stays merge_if_last's flag).
constexpr int CL_OFF = MERGE_WORDS;
constexpr int CL_WORDS = GQA * D + 2 * GQA;
constexpr int SMEM_WORDS0 = PROLOGUE_WORDS > CL_OFF + CL_WORDS + 1 ? PROLOGUE_WORDS : CL_OFF + CL_WORDS + 1;
constexpr int SMEM_WORDS = SMEM_WORDS0 > EXACT_WORDS ? SMEM_WORDS0 : EXACT_WORDS;
static_assert(SMEM_WORDS > GQA * D + GQA, "merge_pair's buffer and merge_if_last's flag");
// V stage in row order (VROWS, one-byte indices at HEAD_DIM 128: 128-byte rows of eight 16-byte
// chunks): token t's chunk q at ST_V + t * 128 + (q ^ (t & 6)) * 16, so the tile's loads copy
// whole rows (four rows per warp instruction, each 32-byte sector landing whole and aligned) and
// the readers (lanes g*4 + c read chunk g of token 2c + ...) stay conflict-free. The lane-chunk
// layout instead scatters every row's sectors into 16-byte pieces 64 bytes apart.
constexpr bool V_ROWS = VROWS && ASYNC && NB == 1 && !HOLES && VCH == 16 && VNCH == 1 && VS::ROW == 8 * VCH;
// The same for 64-byte rows of 8-byte slices (4-bit V at HEAD_DIM 128): token t's row at logical
// V-stage byte vslot(t) * 64, vslot(t) = t ^ ((t >> 1) & 1), so the tile's loads copy four whole
// rows per warp instruction (256 contiguous global bytes) and both those writes and the readers
// (lanes g*4 + c read chunk g of token 2c + ...: tokens 2c + k land in alternating bank halves)
// take the ideal two wavefronts. The lane-slice layout took eight per load (ncu: 6 excess
// wavefronts per LDGSTS, 4 per tile and warp).
constexpr bool V_ROWS64 = VROWS && ASYNC && NB == 1 && VCH == 8 && VNCH == 1 && VS::ROW == 8 * VCH;
// The same for 32-byte rows of 4-byte slices (2-bit V at HEAD_DIM 128): token t's row at V-stage
// byte vslot32(t) * 32, so one 16-byte cp.async per lane copies the tile's 16 rows (was four
// 4-byte ones) and the readers (lane g*4 + c reads slice g of token 2c + ..., rows c * 32 apart)
// hit 32 distinct banks.
constexpr bool V_ROWS32 = VROWS && ASYNC && NB == 1 && VCH == 4 && VNCH == 1 && VS::ROW == 8 * VCH;
__device__ __forceinline__ u32 vslot32(u32 t) { return ((t >> 1) & 3) | ((t & 1) << 2) | (t & 8); }
__device__ __forceinline__ u32 vslot(u32 t) { return t ^ ((t >> 1) & 1); }
// The block merge's warp states: f32 rows r = warp * GQA + head of SMO_RS words, head dim d at word
// smo_at(r, d) = r * SMO_RS + d + 2 * (d / 32). With SMO_RS = 4 mod 16 the mma-layout writes
// (lanes over 16-dim chunks g and head pairs c: 8-way conflicts in plain rows) hit distinct
// banks, reads of 32 consecutive dims stay conflict-free, and a chunk's words are contiguous (one
// base address, immediate offsets: the once-run code stays short, and its cold instruction
// fetch is what the merge costs).
__device__ __forceinline__ u32 smo_at(u32 r, u32 d) { return r * SMO_RS + d + 2 * (d >> 5); }
static_assert(V_ILV || NTB <= 32, "a V chunk's dims share d / 32");

// Spread exact slots (p.exact == 3), past SMEM_WORDS (never aliased): the group's queries (f32,
// original domain), scale * q.mu per head, the slice and the sequence's bounds, mu, the signs, the
// exact_items' running states, the final state (rotated value sum, max, sum per
// head: one more warp state for the block merge) and EXC slots' K and V rows (f16/bf16) at a time.
constexpr int EXC = 5120 / D;                          // exact slots per staged chunk (20 KB of rows)
// exact_items' items: (heads, slot group) pairs; with EX_HALF a warp's two halves score two heads
// of each slot (D / 16 dims a lane, four shuffles a score: half as many slots one after another
// per warp; H100, tq4 at batch 8 / 16384 ~0.4 µs faster, batch 32 / 4096 ~1.5), else a warp one
// head. Head h of slot group g keeps its state in row g * GQA + h. Not for 4-warp blocks (the 8/8
// variant: its token loop's register allocation came out 0.4-1.3% slower, NOTES-decode v9).
constexpr bool EX_HALF = GQA % 2 == 0 && D <= 256 && WARPS >= 8;
constexpr int EX_HPI = EX_HALF ? 2 : 1;                                       // heads per item
constexpr int EX_SG = WARPS * EX_HPI >= GQA ? WARPS * EX_HPI / GQA : 1;       // slot groups
constexpr int EX_NI = GQA / EX_HPI * EX_SG;                                   // items
constexpr int EX_ROWS = GQA * EX_SG;                                          // state rows
constexpr int EL_X = EX_HALF ? D / 16 : EL;                                   // dims a lane scores
constexpr int EXQ_OFF = (SMEM_WORDS + 3) / 4 * 4;      // f32 [GQA][D]
constexpr int EXQM_OFF = EXQ_OFF + GQA * D;            // f32 [8]
constexpr int EXI_OFF = EXQM_OFF + 8;                  // u32 [8]: e0, e1, len, start, w_begin, len % window_len
constexpr int EXMU_OFF = EXI_OFF + 8;                  // f32 [D]
constexpr int EXSG_OFF = EXMU_OFF + D;                 // f32 [D]
constexpr int EXST_OFF = EXSG_OFF + D;                 // f32 [EX_ROWS][D] value sums, [EX_ROWS][2] max, sum
constexpr int EXO_OFF = EXST_OFF + EX_ROWS * (D + 2);  // f32 [GQA][D] value sum, [8] max, [8] sum
constexpr int EXR_OFF = EXO_OFF + GQA * D + 16;        // u16 [EXC][2][D]
constexpr int SPREAD_WORDS = EXR_OFF + EXC * D;
static_assert(EXST_OFF % 4 == 0 && EXR_OFF % 4 == 0, "16-byte exact staging");

/// Dynamic shared memory bytes tq_decode_split needs (read by the host), and with spread exact
/// slots (p.exact == 3).
extern "C" __constant__ u32 tq_decode_smem_bytes = SMEM_WORDS * 4;
extern "C" __constant__ u32 tq_decode_smem_bytes_spread = SPREAD_WORDS * 4;
/// sizeof(DecodeParams), for the host to check its mirror.
extern "C" __constant__ u32 tq_decode_params_bytes = sizeof(DecodeParams);

// ---------------------------------------------------------------- timeline (diagnostics)

// TIMELINE=1 (bench/decode_timeline.py only; the library never sets it): thread 0 of each packed
// block stores %globaltimer (ns) at TL_MARKS points into tq_timeline[block][mark] (block =
// (z * gridDim.y + y) * gridDim.x + x, first TL_BLOCKS blocks): 0 entry, 1 length loaded,
// 2 prologue done, 3 warp 0's first tile landed, 4 warp 0's loop done, 5 every warp's loop done,
// 6 partial stored, 7 split counted, 8 pair merged (last block only), 9 the SM id, 10 tables
// filled, 11 queries and signs landed, 12 warp states in shared memory, 13 about to combine them,
// 14 merge_pair's maxima, 15 merge_pair's combined rows. Mark 3 only with TIMELINE=2 (it costs
// the token loop spills); with TIMELINE=3 it is the spread exact slots' first chunk scored.
#if TIMELINE
constexpr u32 TL_MARKS = 16, TL_BLOCKS = 16384;
extern "C" __device__ u64 tq_timeline[TL_BLOCKS * TL_MARKS];     // %globaltimer, ns
extern "C" __device__ u64 tq_timeline_clk[TL_BLOCKS * TL_MARKS]; // %clock64 of the block's SM
extern "C" __device__ u32 tq_timeline_sink;
/// Stamps mark k once `dep` is available (the compare consumes it before the timers are read).
__device__ __forceinline__ void tl_mark(u32 k, u32 dep = 0) {
    if (dep == 0x9e3779b9u) tq_timeline_sink = dep;
    u64 t, c;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)::"memory");
    asm volatile("mov.u64 %0, %%clock64;" : "=l"(c)::"memory");
    const u64 b = ((u64)blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
    if (threadIdx.x == 0 && b < TL_BLOCKS) {
        tq_timeline[b * TL_MARKS + k] = t;
        tq_timeline_clk[b * TL_MARKS + k] = c;
    }
}
#define TL(...) tl_mark(__VA_ARGS__)
#else
#define TL(...) ((void)0)
#endif

// ---------------------------------------------------------------- small device helpers

__device__ __forceinline__ u16 f32_to_f16(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
__device__ __forceinline__ float f16_to_f32(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ u16 f32_to_bf16(float f) {
    u16 h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
__device__ __forceinline__ float bf16_to_f32(u16 h) { return __uint_as_float(((u32)h) << 16); }
__device__ __forceinline__ u32 pack_h2(float lo, float hi) {
    return (u32)f32_to_f16(lo) | ((u32)f32_to_f16(hi) << 16);
}
__device__ __forceinline__ float ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
/// Logit softcap: c * tanh(s / c) for c = softcap > 0 (inv_cap = 1 / c), else s unchanged.
__device__ __forceinline__ float soft_cap(float s, float softcap, float inv_cap) {
    if (!(softcap > 0.0f)) return s;
    const float e = ex2(2.0f * LOG2E * s * inv_cap);
    return softcap * (1.0f - 2.0f / (e + 1.0f));
}

#if DTYPE == 0
typedef float qtype;
__device__ __forceinline__ float load_q(const qtype* p) { return *p; }
__device__ __forceinline__ void store_o(qtype* p, float v) { *p = v; }
#elif DTYPE == 1
typedef u16 qtype;
__device__ __forceinline__ float load_q(const qtype* p) { return f16_to_f32(*p); }
__device__ __forceinline__ void store_o(qtype* p, float v) { *p = f32_to_f16(v); }
#else
typedef u16 qtype;
__device__ __forceinline__ float load_q(const qtype* p) { return bf16_to_f32(*p); }
__device__ __forceinline__ void store_o(qtype* p, float v) { *p = f32_to_bf16(v); }
#endif

/// d = a * b + c, m16n8k16, f16 inputs, f32 accumulators; rows 8..15 of A are zero, so only
/// the first two accumulators are kept.
__device__ __forceinline__ void mma_rows8(float& c0, float& c1, u32 a0, u32 a2, u32 b0, u32 b1) {
    float z2 = 0.0f, z3 = 0.0f; // rows 8..15: unused
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c0), "+f"(c1), "+f"(z2), "+f"(z3)
        : "r"(a0), "r"(0u), "r"(a2), "r"(0u), "r"(b0), "r"(b1));
}

/// Streams NBYTES (aligned to ALIGN) into little-endian words; missing tail bytes are zero.
template <int NBYTES, int ALIGN>
__device__ __forceinline__ void load_bytes(const u8* __restrict__ p, u32 (&w)[(NBYTES + 3) / 4]) {
    if constexpr (ALIGN == 16) {
#pragma unroll
        for (int i = 0; i < NBYTES / 16; ++i) {
            u32 a, b, c, d;
            asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                         : "=r"(a), "=r"(b), "=r"(c), "=r"(d) : "l"(p + 16 * i));
            w[4 * i] = a; w[4 * i + 1] = b; w[4 * i + 2] = c; w[4 * i + 3] = d;
        }
    } else if constexpr (ALIGN == 8) {
#pragma unroll
        for (int i = 0; i < NBYTES / 8; ++i) {
            u32 a, b;
            asm("ld.global.nc.L1::no_allocate.v2.u32 {%0,%1}, [%2];"
                         : "=r"(a), "=r"(b) : "l"(p + 8 * i));
            w[2 * i] = a; w[2 * i + 1] = b;
        }
    } else if constexpr (ALIGN == 4) {
#pragma unroll
        for (int i = 0; i < NBYTES / 4; ++i) w[i] = *(const u32*)(p + 4 * i);
    } else if constexpr (ALIGN == 2) {
#pragma unroll
        for (int i = 0; i < (NBYTES + 3) / 4; ++i) w[i] = 0;
#pragma unroll
        for (int i = 0; i < NBYTES / 2; ++i) w[i / 2] |= (u32)(*(const u16*)(p + 2 * i)) << (16 * (i & 1));
    } else {
#pragma unroll
        for (int i = 0; i < (NBYTES + 3) / 4; ++i) w[i] = 0;
#pragma unroll
        for (int i = 0; i < NBYTES; ++i) w[i / 4] |= (u32)p[i] << (8 * (i & 3));
    }
}

/// Byte offset of the table entry held in field `i` (FIELD bits) of the stream `w`, for this lane:
/// field * 128 + lane * 4. `lane4` = lane * 4.
template <int FIELD, int I, int NW>
__device__ __forceinline__ u32 field_off(const u32 (&w)[NW], u32 lane4) {
    constexpr int bit = I * FIELD;
    constexpr int word = bit / 32;
    constexpr int sh = bit % 32;
    constexpr u32 mask = ((1u << FIELD) - 1) << 7;
    u32 x;
    if constexpr (sh + FIELD <= 32) {
        x = w[word];
    } else {
        x = (w[word] >> sh) | (w[word + 1] << (32 - sh));
        return ((x << 7) & mask) | lane4;
    }
    if constexpr (sh >= 7) return ((x >> (sh - 7)) & mask) | lane4;
    else return ((x << (7 - sh)) & mask) | lane4;
}

/// LUT256 table offset of byte I of the stream `w`: byte * 256 + lane * 4, one PRMT.
template <int I, int NW>
__device__ __forceinline__ u32 byte_off(const u32 (&w)[NW], u32 lane4) {
    return __byte_perm(w[I / 4], lane4, 0x5504 | ((I % 4) << 4));
}
/// Offset of 4-bit field I of the stream `w` in a table of 256-byte rows (V_N8): nibble * 256 +
/// lane * 4, from the word's even or odd nibbles split into bytes (shared by its 8 fields).
template <int I, int NW>
__device__ __forceinline__ u32 nib_off(const u32 (&w)[NW], u32 lane4) {
    const u32 x = w[I / 8];
    const u32 b = (I % 2) ? (x >> 4) & 0x0F0F0F0Fu : x & 0x0F0F0F0Fu;
    return __byte_perm(b, lane4, 0x5504 | (((I % 8) / 2) << 4));
}
/// Offset of lookup field I of a side (P8: LUT256 layout; N8: nibble fields in it).
template <bool P8, int FIELD, int I, int NW, bool N8 = false>
__device__ __forceinline__ u32 lut_off(const u32 (&w)[NW], u32 lane4) {
    if constexpr (P8) return byte_off<I>(w, lane4);
    else if constexpr (N8) return nib_off<I>(w, lane4);
    else return field_off<FIELD, I>(w, lane4);
}

__device__ __forceinline__ u32 lds(const u8* base, u32 off) { return *(const u32*)(base + off); }

__device__ __forceinline__ u32 smem_addr(const void* p) {
    u32 r;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(r) : "l"(p));
    return r;
}
template <int N>
__device__ __forceinline__ void cp_async(u32 dst, const void* src) {
    if constexpr (N == 16)
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src) : "memory");
    else
        asm volatile("cp.async.ca.shared.global [%0], [%1], %2;" ::"r"(dst), "l"(src), "n"(N) : "memory");
}
/// L2 policy of the streamed cache rows and norms: evict-first (`ef`) or evict-normal, the default
/// priority (createpolicy with an immediate fraction folds to a constant for the target).
__device__ __forceinline__ u64 stream_policy(bool ef) {
    u64 first, normal;
    asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(first));
    asm("createpolicy.fractional.L2::evict_normal.b64 %0, 1.0;" : "=l"(normal));
    return ef ? first : normal;
}

/// cp.async of N streamed cache bytes under the L2 policy `pol`.
template <int N>
__device__ __forceinline__ void cp_stream(u32 dst, const void* src, u64 pol) {
    if constexpr (N == 16)
        asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "l"(pol) : "memory");
    else
        asm volatile("cp.async.ca.shared.global.L2::cache_hint [%0], [%1], %2, %3;" ::"r"(dst), "l"(src), "n"(N), "l"(pol) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory"); }

struct alignas(16) U4 { u32 x, y, z, w; };
struct alignas(8) U2 { u32 x, y; };

/// Reads NCH chunks of CH bytes (chunk k of this lane at base + PSC * 32k * CH + h, h = the lane
/// term pofs(lane * CH)) into little-endian words.
template <int CH, int NCH, int NW>
__device__ __forceinline__ void read_chunks(const u8* base, u32 h, u32 (&w)[NW]) {
#pragma unroll
    for (int k = 0; k < NCH; ++k) {
        const u8* q = base + PSC * 32 * k * CH + h;
        if constexpr (CH == 16) {
            const U4 v = *(const U4*)q;
            w[4 * k] = v.x; w[4 * k + 1] = v.y; w[4 * k + 2] = v.z; w[4 * k + 3] = v.w;
        } else if constexpr (CH == 8) {
            const U2 v = *(const U2*)q;
            w[2 * k] = v.x; w[2 * k + 1] = v.y;
        } else {
            w[k] = *(const u32*)q;
        }
    }
}

// ---------------------------------------------------------------- the split kernel

/// Norms per thread and tile: tokens 2c, 2c+1, 2c+8, 2c+9, or with TRANS g, g+8.
constexpr int NRM = TRANS ? 2 : 4;

/// Raw bytes of one 16-token tile for this thread (prefetched a tile ahead).
struct Tile {
    u32 k[2][NB][KS::KWORDS]; // K rows of tokens g, g+8: this thread's dims of each norm block
    u32 v[4][NB][VS::VWORDS]; // V rows of tokens 2c, 2c+1, 2c+8, 2c+9: dims of column g
    float kn[NRM][NB];        // K norms of tokens 2c, 2c+1, 2c+8, 2c+9 (TRANS: g, g+8)
    float vn[NRM][NB];        // V norms of the same tokens
};

/// Per-lane pipeline address terms: pofs(lane * KCH), pofs(lane * VCH), pofs(lane * 4); with
/// V_ROWS64, v is the read offset of token 2c (token 2c + 1: v ^ 64) and vw the write offset of
/// the fast path's first instruction; with V_ROWS32, v the read offset of token 2c (slot c) and
/// vw the fast path's write offset.
struct PipeLane {
    u32 k, v, n, vw;
};
__device__ __forceinline__ PipeLane pipe_lane(u32 lane) {
    const u32 g = lane >> 2, c = lane & 3, tl = lane >> 3, q = lane & 7;
    if constexpr (V_ROWS64)
        return {pofs(lane * KCH), pofs(vslot(2 * c) * 64 + g * 8), pofs(lane * 4), pofs(vslot(tl) * 64 + q * 8)};
    else if constexpr (V_ROWS32)
        return {pofs(lane * KCH), pofs(c * 32 + g * 4), pofs(lane * 4), pofs(vslot32(lane >> 1) * 32 + (lane & 1) * 16)};
    else
        return {pofs(lane * KCH), pofs(lane * VCH), pofs(lane * 4), 0};
}

struct SeqCtx {
    const u8* kp;   // K packed rows of this (seq, head), slot 0
    const u8* vp;
    const float* kn;
    const float* vn;
    u32 begin, end, cap; // positions [begin, end) attend; tiles start at multiples of TILE
    bool ring;
};

__device__ __forceinline__ u32 slot_of(const SeqCtx& s, u32 pos, u32 pos0, u32 slot0) {
    if (!s.ring) return pos;
    u32 sl = slot0 + (pos - pos0);
    while (sl >= s.cap) sl -= s.cap;
    return sl;
}

/// Starts the loads of one 16-token tile into a pipeline stage (shared address `st`): K slices of
/// tokens g, g+8; V slices of tokens 2c, 2c+1, 2c+8, 2c+9; the 16 tokens' norms (by lanes).
/// Positions past the end are clamped to the last one (their scores are masked). Tiles wholly
/// inside the sequence whose slots do not wrap take the fast path: one slot for the tile.
__device__ __forceinline__ void issue_tile(const SeqCtx& s, u32 pos0, u32 lane, u32 g, u32 c, u32 st, const PipeLane& pl, u64 pol) {
    const u32 slot0 = s.ring ? pos0 % s.cap : pos0;
    const u32 last = s.end - 1;
    const bool fast = pos0 + TILE <= s.end && slot0 + TILE <= s.cap;
    if (ASYNC && fast) {
        const u8* kr = s.kp + (u64)(slot0 + g) * KS::ROW;
        const u8* vr = s.vp + (u64)(slot0 + 2 * c) * VS::ROW;
#pragma unroll
        for (int n = 0; n < 2; ++n)
#pragma unroll
            for (int b = 0; b < NB; ++b)
#pragma unroll
                for (int k = 0; k < KNCH; ++k)
                    cp_stream<KCH>(st + PSC * (ST_K + ((n * NB + b) * KNCH + k) * 32 * KCH) + pl.k,
                                  kr + 8 * n * KS::ROW + b * KS::BLK + k_chunk_off(c, k), pol);
        if constexpr (V_ROWS) {
            // instruction j: tokens 4j + (lane >> 3), chunk lane & 7
            const u32 tl = lane >> 3, q = lane & 7, sw = tl * 128 + ((q ^ (tl & 2)) * 16);
            const u8* vr0 = s.vp + (u64)(slot0 + tl) * VS::ROW + q * 16;
#pragma unroll
            for (int j = 0; j < 4; ++j) cp_stream<16>(st + ST_V + 512 * j + ((j & 1) ? sw ^ 64 : sw), vr0 + 4 * j * VS::ROW, pol);
        } else if constexpr (V_ROWS64) {
            // instruction j: token 4j + (lane >> 3), chunk lane & 7
            const u8* vr0 = s.vp + (u64)(slot0 + (lane >> 3)) * VS::ROW + (lane & 7) * 8;
#pragma unroll
            for (int j = 0; j < 4; ++j) cp_stream<8>(st + PSC * (ST_V + 256 * j) + pl.vw, vr0 + 4 * j * VS::ROW, pol);
        } else if constexpr (V_ROWS32) {
            // one instruction: token lane >> 1, 16-byte half lane & 1
            cp_stream<16>(st + PSC * ST_V + pl.vw, s.vp + (u64)(slot0 + (lane >> 1)) * VS::ROW + (lane & 1) * 16, pol);
        } else {
#pragma unroll
            for (int r = 0; r < 4; ++r)
#pragma unroll
                for (int b = 0; b < NB; ++b)
#pragma unroll
                    for (int k = 0; k < VNCH; ++k)
                        cp_stream<VCH>(st + PSC * (ST_V + ((r * NB + b) * VNCH + k) * 32 * VCH) + pl.v,
                                      vr + ((r & 1) + 8 * (r >> 1)) * VS::ROW + b * VS::BLK + v_chunk_off(g, k), pol);
        }
#pragma unroll
        for (int i0 = 0; i0 < 2 * TILE * NB; i0 += 32) {
            const u32 i = i0 + lane;
            const u32 side = i / (TILE * NB), rem = i % (TILE * NB);
            cp_stream<4>(st + PSC * (ST_N + i0 * 4) + pl.n, (side ? s.vn : s.kn) + (u64)slot0 * NB + rem, pol);
        }
        return;
    }
#pragma unroll
    for (int n = 0; n < 2; ++n) {
        u32 pos = pos0 + g + 8 * n;
        pos = pos < last ? pos : last;
        const u8* row = s.kp + (u64)slot_of(s, pos, pos0, slot0) * KS::ROW;
#pragma unroll
        for (int b = 0; b < NB; ++b) {
            const u32 dst = st + PSC * (ST_K + (n * NB + b) * KNCH * 32 * KCH) + pl.k;
            if constexpr (ASYNC) {
#pragma unroll
                for (int k = 0; k < KNCH; ++k) cp_stream<KCH>(dst + PSC * k * 32 * KCH, row + b * KS::BLK + k_chunk_off(c, k), pol);
            } else {
                u32 w[KS::KWORDS];
                load_bytes<KS::KBYTES, KS::KALIGN>(row + b * KS::BLK + c * KS::KBYTES, w);
#pragma unroll
                for (int k = 0; k < KNCH; ++k) asm volatile("st.shared.u32 [%0], %1;" ::"r"(dst + PSC * k * 32 * 4), "r"(w[k]) : "memory");
            }
        }
    }
#pragma unroll
    for (int r = 0; r < 4; ++r) {
        u32 pos = pos0 + 2 * c + (r & 1) + 8 * (r >> 1);
        pos = pos < last ? pos : last;
        const u8* row = s.vp + (u64)slot_of(s, pos, pos0, slot0) * VS::ROW;
        if constexpr (V_ROWS) {
            const u32 t = 2 * c + (r & 1) + 8 * (r >> 1);
            cp_stream<16>(st + ST_V + t * 128 + ((g ^ (2 * c)) * 16), row + g * 16, pol);
            continue;
        }
        if constexpr (V_ROWS64) {
            cp_stream<8>(st + PSC * (ST_V + 512 * (r >> 1)) + ((r & 1) ? pl.v ^ 64 : pl.v), row + g * 8, pol);
            continue;
        }
        if constexpr (V_ROWS32) { // vslot32 of token 2c + (r & 1) + 8 (r >> 1): c + 4 (r & 1) + 8 (r >> 1)
            cp_stream<4>(st + PSC * (ST_V + 128 * (r & 1) + 256 * (r >> 1)) + pl.v, row + g * 4, pol);
            continue;
        }
#pragma unroll
        for (int b = 0; b < NB; ++b) {
            const u32 dst = st + PSC * (ST_V + (r * NB + b) * VNCH * 32 * VCH) + pl.v;
            if constexpr (ASYNC) {
#pragma unroll
                for (int k = 0; k < VNCH; ++k) cp_stream<VCH>(dst + PSC * k * 32 * VCH, row + b * VS::BLK + v_chunk_off(g, k), pol);
            } else {
                u32 w[VS::VWORDS];
                load_bytes<VS::VBYTES, VS::VALIGN>(row + b * VS::BLK + g * VS::VBYTES, w);
#pragma unroll
                for (int k = 0; k < VNCH; ++k) asm volatile("st.shared.u32 [%0], %1;" ::"r"(dst + PSC * k * 32 * 4), "r"(w[k]) : "memory");
            }
        }
    }
    for (u32 i = lane; i < 2 * TILE * NB; i += 32) {
        const u32 side = i / (TILE * NB), t = (i / NB) % TILE, b = i % NB;
        u32 pos = pos0 + t;
        pos = pos < last ? pos : last;
        const float* src = (side ? s.vn : s.kn) + (u64)slot_of(s, pos, pos0, slot0) * NB + b;
        const u32 dst = st + PSC * (ST_N + (i - lane) * 4) + pl.n;
        if constexpr (ASYNC) {
            cp_stream<4>(dst, src, pol);
        } else {
            asm volatile("st.shared.f32 [%0], %1;" ::"r"(dst), "f"(__ldg(src)) : "memory");
        }
    }
}

/// Copies this thread's part of a landed stage (generic pointer `st`) into registers.
__device__ __forceinline__ void read_tile(const u8* st, const PipeLane& pl, u32 g, u32 c, Tile& t) {
#pragma unroll
    for (int n = 0; n < 2; ++n)
#pragma unroll
        for (int b = 0; b < NB; ++b) read_chunks<KCH, KNCH>(st + PSC * (ST_K + (n * NB + b) * KNCH * 32 * KCH), pl.k, t.k[n][b]);
    if constexpr (V_ROWS) {
        const u32 h = 2 * c * 128 + ((g ^ (2 * c)) * 16); // token 2c + (r & 1) + 8 (r >> 1), chunk g
#pragma unroll
        for (int r = 0; r < 4; ++r) read_chunks<16, 1>(st + ST_V + ((r & 1) + 8 * (r >> 1)) * 128, h, t.v[r][0]);
    } else if constexpr (V_ROWS64) {
#pragma unroll
        for (int r = 0; r < 4; ++r) read_chunks<8, 1>(st + PSC * (ST_V + 512 * (r >> 1)), (r & 1) ? pl.v ^ 64 : pl.v, t.v[r][0]);
    } else if constexpr (V_ROWS32) {
#pragma unroll
        for (int r = 0; r < 4; ++r) read_chunks<4, 1>(st + PSC * (ST_V + 128 * (r & 1) + 256 * (r >> 1)), pl.v, t.v[r][0]);
    } else {
#pragma unroll
        for (int r = 0; r < 4; ++r)
#pragma unroll
            for (int b = 0; b < NB; ++b) read_chunks<VCH, VNCH>(st + PSC * (ST_V + (r * NB + b) * VNCH * 32 * VCH), pl.v, t.v[r][b]);
    }
    const float* nrm = (const float*)(st + PSC * ST_N); // HOLES: NB == 1, the 128 norm bytes in one row
#pragma unroll
    for (int r = 0; r < NRM; ++r) {
        const u32 tok = TRANS ? g + 8 * r : 2 * c + (r & 1) + 8 * (r >> 1);
#pragma unroll
        for (int b = 0; b < NB; ++b) {
            t.kn[r][b] = nrm[tok * NB + b];
            t.vn[r][b] = nrm[(TILE + tok) * NB + b];
        }
    }
}

/// Half2 of score-side dims (4kb + 2h, 4kb + 2h + 1) of the thread's range in one norm block.
template <int KBI, int H>
__device__ __forceinline__ u32 k_pair(const u32 (&w)[KS::KWORDS], const u8* tab, u32 lane4) {
    if constexpr (KS::PAIR) {
        return lds(tab, lut_off<K_P8, KS::FIELD, 2 * KBI + H>(w, lane4));
    } else {
        const u32 lo = lds(tab, lut_off<K_P8, 8, 4 * KBI + 2 * H>(w, lane4));
        const u32 hi = lds(tab, lut_off<K_P8, 8, 4 * KBI + 2 * H + 1>(w, lane4));
        return __byte_perm(lo, hi, 0x5410);
    }
}

/// PRMT selector that takes dim 2jp+1 of two tokens' v_pair results into one half2: the high
/// halves in pair mode, the low halves in single mode (dim 2jp: the low halves, 0x5410).
constexpr u32 V_HI_SEL = VS::PAIR ? 0x7632 : 0x5410;

/// Values of PV-side dims (2jp, 2jp+1) of column g for one token: the half2 in both lo and hi
/// (pair mode) or two f16 in the low halves of lo / hi (single mode); see V_HI_SEL.
template <int JP>
__device__ __forceinline__ void v_pair(const u32 (&w)[VS::VWORDS], const u8* tab, u32 lane4, u32& lo, u32& hi) {
    if constexpr (VS::PAIR) {
        lo = hi = lds(tab, lut_off<V_P8, VS::FIELD, JP, VS::VWORDS, V_N8>(w, lane4));
    } else {
        lo = lds(tab, lut_off<V_P8, 8, 2 * JP>(w, lane4));
        hi = lds(tab, lut_off<V_P8, 8, 2 * JP + 1>(w, lane4));
    }
}

/// Score mma chunks KBI.. of one norm block: (a0, a1) += Q^ x K-centroids (8 tokens).
/// Two accumulator pairs (even / odd chunks) halve the dependent mma chain.
template <int KBI>
__device__ __forceinline__ void score_chunks(float (&a)[2][2], const u32 (&qa)[KB][2], const u32 (&w)[KS::KWORDS],
                                             const u8* tab, u32 lane4) {
    if constexpr (KBI < KB) {
        const u32 b0 = k_pair<KBI, 0>(w, tab, lane4);
        const u32 b1 = k_pair<KBI, 1>(w, tab, lane4);
        mma_rows8(a[KBI & 1][0], a[KBI & 1][1], qa[KBI][0], qa[KBI][1], b0, b1);
        score_chunks<KBI + 1>(a, qa, w, tab, lane4);
    }
}

/// PV mma n-tiles 2JP.. of one norm block: o += P' x V-centroids of tokens (2c, 2c+1 | 2c+8, 2c+9).
template <int JP>
__device__ __forceinline__ void pv_pairs(float (&o)[NTB][2], u32 pa0, u32 pa1, const u32 (&v0)[VS::VWORDS],
                                         const u32 (&v1)[VS::VWORDS], const u32 (&v2)[VS::VWORDS],
                                         const u32 (&v3)[VS::VWORDS], const u8* tab, u32 lane4) {
    if constexpr (JP < NTB / 2) {
        u32 lo[4], hi[4];
        v_pair<JP>(v0, tab, lane4, lo[0], hi[0]);
        v_pair<JP>(v1, tab, lane4, lo[1], hi[1]);
        v_pair<JP>(v2, tab, lane4, lo[2], hi[2]);
        v_pair<JP>(v3, tab, lane4, lo[3], hi[3]);
        mma_rows8(o[2 * JP][0], o[2 * JP][1], pa0, pa1, __byte_perm(lo[0], lo[1], 0x5410), __byte_perm(lo[2], lo[3], 0x5410));
        mma_rows8(o[2 * JP + 1][0], o[2 * JP + 1][1], pa0, pa1, __byte_perm(hi[0], hi[1], V_HI_SEL),
                  __byte_perm(hi[2], hi[3], V_HI_SEL));
        pv_pairs<JP + 1>(o, pa0, pa1, v0, v1, v2, v3, tab, lane4);
    }
}

/// d = a * b + d, m16n8k16, f16 inputs, f32 accumulators, all 16 rows used (TRANS).
__device__ __forceinline__ void mma_full(float (&d)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
/// Transpose of an 8x8 f16 matrix held as mma fragments (row lane/4, columns 2(lane%4), +1).
__device__ __forceinline__ u32 movm_trans(u32 x) {
    u32 y;
    asm("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(y) : "r"(x));
    return y;
}

/// TRANS score chunks KBI..: S^T[token][head] += K-centroids (tokens g, g+8 on the rows) x Q^T.
template <int KBI>
__device__ __forceinline__ void score_chunks_t(float (&a)[2][4], const u32 (&qa)[KB][2], const u32 (&w0)[KS::KWORDS],
                                               const u32 (&w1)[KS::KWORDS], const u8* tab, u32 lane4) {
    if constexpr (KBI < KB) {
        mma_full(a[KBI & 1], k_pair<KBI, 0>(w0, tab, lane4), k_pair<KBI, 0>(w1, tab, lane4), k_pair<KBI, 1>(w0, tab, lane4),
                 k_pair<KBI, 1>(w1, tab, lane4), qa[KBI][0], qa[KBI][1]);
        score_chunks_t<KBI + 1>(a, qa, w0, w1, tab, lane4);
    }
}

/// 2- and 4-bit V (pair tables, fields of 2 * V_BITS bits aligned in words), TRANS: the packed
/// words of two tokens x, y interleave into keys whose field i holds (x's index, y's index) of dim
/// 2i (ilv_even) or 2i + 1 (ilv_odd), so one lookup of the pair table gives the A operand's half2
/// (token x, token y) of one dim: no byte_perm per operand (4 per m-tile otherwise). The same
/// table entries in the same operands: bit-identical to the per-token lookups.
constexpr bool V_KEYS = TRANS && VS::PAIR && (V_BITS == 2 || V_BITS == 4);
constexpr u32 V_KEY_MASK = V_BITS == 2 ? 0x33333333u : 0x0F0F0F0Fu; // each field's low index
__device__ __forceinline__ u32 ilv_even(u32 x, u32 y) { return (x & V_KEY_MASK) | ((y << V_BITS) & ~V_KEY_MASK); }
__device__ __forceinline__ u32 ilv_odd(u32 x, u32 y) { return ((x >> V_BITS) & V_KEY_MASK) | (y & ~V_KEY_MASK); }

/// V_KEYS PV m-tiles JP..: a0 / a1 (dims 2JP, 2JP+1 of tokens 2c, 2c+1) from e01 / o01, a2 / a3
/// (tokens 2c+8, 2c+9) from e23 / o23.
template <int JP>
__device__ __forceinline__ void pv_keys_t(float (&o)[NTB / 2][4], u32 b0, u32 b1, const u32 (&e01)[VS::VWORDS],
                                          const u32 (&o01)[VS::VWORDS], const u32 (&e23)[VS::VWORDS],
                                          const u32 (&o23)[VS::VWORDS], const u8* tab, u32 lane4) {
    if constexpr (JP < NTB / 2) {
        constexpr int W = VS::VWORDS;
        mma_full(o[JP], lds(tab, lut_off<V_P8, VS::FIELD, JP, W, V_N8>(e01, lane4)),
                 lds(tab, lut_off<V_P8, VS::FIELD, JP, W, V_N8>(o01, lane4)),
                 lds(tab, lut_off<V_P8, VS::FIELD, JP, W, V_N8>(e23, lane4)),
                 lds(tab, lut_off<V_P8, VS::FIELD, JP, W, V_N8>(o23, lane4)), b0, b1);
        pv_keys_t<JP + 1>(o, b0, b1, e01, o01, e23, o23, tab, lane4);
    }
}

/// TRANS PV m-tiles JP..: O^T[dim][head] += V-centroids^T (dims (g, 2JP), (g, 2JP+1) on the rows,
/// tokens 2c, 2c+1 | 2c+8, 2c+9) x P'^T (b0, b1).
template <int JP>
__device__ __forceinline__ void pv_pairs_t(float (&o)[NTB / 2][4], u32 b0, u32 b1, const u32 (&v0)[VS::VWORDS],
                                           const u32 (&v1)[VS::VWORDS], const u32 (&v2)[VS::VWORDS],
                                           const u32 (&v3)[VS::VWORDS], const u8* tab, u32 lane4) {
    if constexpr (JP == 0 && V_KEYS) {
        u32 e01[VS::VWORDS], o01[VS::VWORDS], e23[VS::VWORDS], o23[VS::VWORDS];
#pragma unroll
        for (int w = 0; w < VS::VWORDS; ++w) {
            e01[w] = ilv_even(v0[w], v1[w]);
            o01[w] = ilv_odd(v0[w], v1[w]);
            e23[w] = ilv_even(v2[w], v3[w]);
            o23[w] = ilv_odd(v2[w], v3[w]);
        }
        pv_keys_t<0>(o, b0, b1, e01, o01, e23, o23, tab, lane4);
    } else if constexpr (JP < NTB / 2) {
        u32 lo[4], hi[4];
        v_pair<JP>(v0, tab, lane4, lo[0], hi[0]);
        v_pair<JP>(v1, tab, lane4, lo[1], hi[1]);
        v_pair<JP>(v2, tab, lane4, lo[2], hi[2]);
        v_pair<JP>(v3, tab, lane4, lo[3], hi[3]);
        mma_full(o[JP], __byte_perm(lo[0], lo[1], 0x5410), __byte_perm(hi[0], hi[1], V_HI_SEL),
                 __byte_perm(lo[2], lo[3], 0x5410), __byte_perm(hi[2], hi[3], V_HI_SEL), b0, b1);
        pv_pairs_t<JP + 1>(o, b0, b1, v0, v1, v2, v3, tab, lane4);
    }
}

/// Codebook entries a lane loads for fill_table: entry lane (pair tables) or 32j + lane.
template <int BITS>
struct CbRegs {
    static constexpr int N = Side<BITS>::PAIR ? 1 : Side<BITS>::ENTRIES / 32;
    float x[N];
};

/// Starts this lane's codebook loads (issued before anything that depends on the lengths, so that
/// after an L2 flush they do not queue behind the tile traffic).
template <int BITS>
__device__ __forceinline__ CbRegs<BITS> load_cb(const float* cb, u32 lane) {
    CbRegs<BITS> r;
    if constexpr (Side<BITS>::PAIR) {
        r.x[0] = cb[lane & ((1u << BITS) - 1)];
    } else {
#pragma unroll
        for (int j = 0; j < CbRegs<BITS>::N; ++j) r.x[j] = cb[32 * j + lane];
    }
    return r;
}

/// Fills a lane-replicated f16 codebook table (layout above: entry e of lane l at word e*32 + l,
/// or with P8 at word e*64 + l) from this lane's codebook loads (load_cb), the entries by
/// shuffles, warp w writing entries w, w + WARPS, ... (no barrier inside).
template <int BITS, bool P8>
__device__ __forceinline__ void fill_table(u32* tab, const CbRegs<BITS>& cb, u32 warp, u32 lane) {
    typedef Side<BITS> S;
    if constexpr (S::PAIR) {
        const float x = cb.x[0];
#pragma unroll 8 // independent shuffles in flight: the fill was a serial chain of them
        for (u32 e = warp; e < (u32)S::ENTRIES; e += WARPS) {
            const float lo = __shfl_sync(0xffffffffu, x, e & ((1u << BITS) - 1));
            const float hi = __shfl_sync(0xffffffffu, x, e >> BITS);
            tab[(P8 ? e * 64 : e * 32) + lane] = pack_h2(lo, hi);
        }
    } else {
#pragma unroll
        for (int j = 0; j < CbRegs<BITS>::N; ++j)
            for (u32 e = warp; e < 32; e += WARPS) {
                const u32 row = 32 * j + e;
                tab[(P8 ? row * 64 : row * 32) + lane] = (u32)f32_to_f16(__shfl_sync(0xffffffffu, cb.x[j], e));
            }
    }
}

/// In-place unnormalized FWHT of one D-vector held by a warp (lane l: elements [l * EL, l * EL +
/// EL)): butterflies x[j], x[j+h] <- x[j] + x[j+h], x[j] - x[j+h] for h = 1, 2, .., D/2, no barriers.
__device__ __forceinline__ void fwht_warp(float (&v)[EL], u32 lane) {
#pragma unroll
    for (int h = 1; h < EL; h <<= 1)
#pragma unroll
        for (int i = 0; i < EL; ++i)
            if (!(i & h)) {
                const float a = v[i], b = v[i + h];
                v[i] = a + b;
                v[i + h] = a - b;
            }
#pragma unroll
    for (u32 m = 1; m < 32; m <<= 1) {
        const bool hi = (lane & m) != 0;
#pragma unroll
        for (int i = 0; i < EL; ++i) {
            const float o = __shfl_xor_sync(0xffffffffu, v[i], m);
            v[i] = hi ? o - v[i] : v[i] + o;
        }
    }
}

__device__ __forceinline__ float ld_cg(const float* p) {
    float v;
    asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(v) : "l"(p) : "memory");
    return v;
}

/// Log-sum-exp merge of the num_splits partials of (seq, kvh) for its GQA query heads,
/// normalization, inverse rotation o = D H x / sqrt(d), output in DTYPE: the work of
/// tq_decode_merge for one (sequence, KV head), by one block, in the same order (bit-identical).
/// Partials are read through L2 (other blocks wrote them). `sm` holds GQA * D + GQA floats
/// (SMEM_WORDS > GQA * D + GQA: the last word stays free for merge_if_last's flag).
__device__ void merge_pair(const DecodeParams& p, u32 seq, u32 kvh, float* sm) {
    const u32 tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const u64 base = ((u64)seq * p.num_kv_heads + kvh) * p.num_splits * GQA; // + split * GQA + h
    const float* part_o = (const float*)p.part_o;
    const float* part_ml = (const float*)p.part_ml;
    const float ninf = -__int_as_float(0x7f800000);
    float* x = sm;             // [GQA][D]
    float* mx_h = sm + GQA * D; // [GQA] max over the splits
    float sg[EL];              // this lane's signs for the un-rotation
#pragma unroll
    for (int e = 0; e < EL; ++e) sg[e] = ((const float*)p.signs)[lane * EL + e];
    for (u32 h = warp; h < GQA; h += WARPS) {
        float m = ninf;
        for (u32 sp = lane; sp < p.num_splits; sp += 32) m = fmaxf(m, ld_cg(part_ml + 2 * (base + sp * GQA + h)));
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
        if (lane == 0) mx_h[h] = m;
    }
    __syncthreads();
    TL(14);
    if constexpr (THREADS >= 256) {
        // Blocks of 8 or more warps: one element at a time.
        for (u32 i = tid; i < GQA * D; i += THREADS) {
            const u32 h = i / D, d = i % D;
            const float mx = mx_h[h];
            float acc = 0.0f, l = 0.0f;
            if (mx != ninf) {
#pragma unroll 8
                for (u32 sp = 0; sp < p.num_splits; ++sp) {
                    const u64 k = base + sp * GQA + h;
                    const float ms = ld_cg(part_ml + 2 * k);
                    const float ls = ld_cg(part_ml + 2 * k + 1);
                    const float os = ld_cg(part_o + k * D + d);
                    if (ms == ninf) continue;
                    const float f = ex2(ms - mx);
                    l += f * ls;
                    acc += f * os;
                }
            }
            x[i] = l > 0.0f ? acc / (l * p.pv_scale) : 0.0f;
        }
    } else {
        // Smaller blocks: elements tid + e * THREADS in chunks of PER, the splits outermost within a
        // chunk so that the chunk's loads of a split are in flight together (each element still
        // sums over the splits in tq_decode_merge's order). Not used for larger blocks: the
        // arrays cost the token loop registers there (measured, bench/NOTES-decode.md v5).
        constexpr int ALL = (GQA * D + THREADS - 1) / THREADS;
        constexpr int PER = ALL < 4 ? ALL : 4;
#pragma unroll 1
        for (int e0 = 0; e0 < ALL; e0 += PER) {
            float acc[PER], l[PER], mx[PER];
            u64 at[PER];
            u32 col[PER];
#pragma unroll
            for (int e = 0; e < PER; ++e) {
                const u32 i0 = tid + (e0 + e) * THREADS, i = i0 < GQA * D ? i0 : 0;
                acc[e] = l[e] = 0.0f;
                mx[e] = mx_h[i / D];
                at[e] = base + i / D; // + sp * GQA: the (split, head) partial
                col[e] = i % D;
            }
#pragma unroll 2
            for (u32 sp = 0; sp < p.num_splits; ++sp) {
                float ms[PER], ls[PER], os[PER];
#pragma unroll
                for (int e = 0; e < PER; ++e) {
                    const u64 k = at[e] + (u64)sp * GQA;
                    ms[e] = ld_cg(part_ml + 2 * k);
                    ls[e] = ld_cg(part_ml + 2 * k + 1);
                    os[e] = ld_cg(part_o + k * D + col[e]);
                }
#pragma unroll
                for (int e = 0; e < PER; ++e) {
                    if (mx[e] == ninf || ms[e] == ninf) continue;
                    const float f = ex2(ms[e] - mx[e]);
                    l[e] += f * ls[e];
                    acc[e] += f * os[e];
                }
            }
#pragma unroll
            for (int e = 0; e < PER; ++e) {
                const u32 i = tid + (e0 + e) * THREADS;
                if (i < GQA * D) x[i] = l[e] > 0.0f ? acc[e] / (l[e] * p.pv_scale) : 0.0f;
            }
        }
    }
    __syncthreads();
    TL(15);
    // Un-rotate, a warp per head: o = D H x / sqrt(d).
    qtype* out = (qtype*)p.out + ((u64)seq * p.num_kv_heads + kvh) * GQA * D;
    for (u32 h = warp; h < GQA; h += WARPS) {
        float v[EL];
#pragma unroll
        for (int e = 0; e < EL; ++e) v[e] = x[h * D + lane * EL + e];
        fwht_warp(v, lane);
#pragma unroll
        for (int e = 0; e < EL; ++e) store_o(out + h * D + lane * EL + e, v[e] * INV_SQRT_D * sg[e]);
    }
}

/// p.direct_out (all threads of the pair's only packed block, after its combined state is in
/// shared memory at CL_OFF): normalizes, un-rotates (a warp per head) and writes the output, in
/// merge_pair's order (bit-identical): no partial, counter or reload through the L2.
__device__ __noinline__ void finish_single(const DecodeParams& p, u32 seq, u32 kvh, u32* smem) {
    __syncthreads();
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const float* st = (const float*)(smem + CL_OFF);
    qtype* out = (qtype*)p.out + ((u64)seq * p.num_kv_heads + kvh) * GQA * D;
    for (u32 h = warp; h < GQA; h += WARPS) {
        const float m = st[GQA * D + 2 * h], l = m == -__int_as_float(0x7f800000) ? 0.0f : st[GQA * D + 2 * h + 1];
        float v[EL];
#pragma unroll
        for (int e = 0; e < EL; ++e) v[e] = l > 0.0f ? st[h * D + lane * EL + e] / (l * p.pv_scale) : 0.0f;
        fwht_warp(v, lane);
#pragma unroll
        for (int e = 0; e < EL; ++e)
            store_o(out + h * D + lane * EL + e, v[e] * INV_SQRT_D * ((const float*)p.signs)[lane * EL + e]);
    }
}

/// End of every tq_decode_split block (all threads, after the block's partial is written): with
/// MERGE_LAST, the last block of its (sequence, KV head) to finish (a counter per pair, reset to 0
/// by that block for the next launch) merges the pair's partials (merge_pair); without it,
/// tq_decode_merge does that in a second launch.
/// The flag lives in the last word of the dynamic shared memory (no static shared memory: it
/// would move the dynamic base off its 128-byte alignment).
__device__ __forceinline__ void merge_if_last(const DecodeParams& p, u32 seq, u32 kvh, u32* smem) {
#if MERGE_LAST
    volatile u32* is_last = smem + SMEM_WORDS - 1;
    // The block's partial writes are ordered before thread 0's count by the barrier, and published
    // device-wide by the count's release (cumulative); its acquire orders the last block's reads
    // of the other partials after every other block's count (with the barrier after it).
    __syncthreads();
    if (threadIdx.x == 0) {
        u32* cnt = (u32*)p.counters + (u64)seq * p.num_kv_heads + kvh;
        u32 old;
        asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], 1;" : "=r"(old) : "l"(cnt) : "memory");
        // Blocks per pair: num_splits, less the exact slot when the last packed split writes it.
        const u32 last = old == p.num_splits - 1 - (p.exact == 2);
        if (last) *cnt = 0;
        *is_last = last;
    }
    __syncthreads();
    TL(7);
    if (!*is_last) return;
    merge_pair(p, seq, kvh, (float*)smem);
    TL(8);
#endif
}

// ---------------------------------------------------------------- the exact block

/// The first position the query at len - 1 attends to (ring flag `ring`, sliding window).
__device__ __forceinline__ u32 visible_start(bool ring, const DecodeParams& p, u32 len) {
    u32 start = 0;
    if (ring && len > p.capacity) start = len - p.capacity;
    if (p.window != 0 && len > p.window && len - p.window > start) start = len - p.window;
    return start;
}


constexpr int EX_CHUNK = (GQA > 4 ? 16 : 32) / EL; // exact slots per warp whose rows load together

/// The N f16/bf16 values [N * lane, N * lane + N) of `row` (16-byte aligned, HEAD_DIM long) as
/// f32: a lane's EL of a warp-held vector, or with N = D / 16 a half-warp lane's.
template <int N = EL>
__device__ __forceinline__ void load_exact(const u16* row, u32 lane, bool bf, float (&x)[N]) {
    u32 w[N / 2];
    const u32* src = (const u32*)row + lane * (N / 2);
    if constexpr (N >= 8) {
#pragma unroll
        for (int i = 0; i < N / 8; ++i) {
            const U4 q = ((const U4*)src)[i];
            w[4 * i] = q.x;
            w[4 * i + 1] = q.y;
            w[4 * i + 2] = q.z;
            w[4 * i + 3] = q.w;
        }
    } else if constexpr (N == 4) {
        const U2 q = *(const U2*)src;
        w[0] = q.x;
        w[1] = q.y;
    } else {
        w[0] = *src;
    }
#pragma unroll
    for (int i = 0; i < N; ++i) {
        const u16 h = (u16)(w[i / 2] >> (16 * (i & 1)));
        x[i] = bf ? bf16_to_f32(h) : f16_to_f32(h);
    }
}

/// Rows of the exact slots of one (sequence, KV head): slot t < S is sink position t, slot
/// t >= S window slot t - S (position p at p % W).
struct ExactRows {
    const u16 *ks, *vs, *kw, *vw;
    u32 S;
};

/// Starts loading the K and V rows of exact slots t0, t0 + WARPS, ... (EX_CHUNK of them; past
/// nslot, slot t0 again, unused) into this lane's registers. Every slot is allocated memory, so
/// this needs neither the frontier nor which slots are in use.
__device__ __forceinline__ void load_exact_slots(const ExactRows& r, u32 t0, u32 nslot, u32 lane, bool bf,
                                                 float (&kx)[EX_CHUNK][EL], float (&vx)[EX_CHUNK][EL]) {
#pragma unroll
    for (int j = 0; j < EX_CHUNK; ++j) {
        const u32 tj = t0 + j * WARPS;
        const u32 t = tj < nslot ? tj : t0;
        const bool sink = t < r.S;
        const u64 at = (u64)(sink ? t : t - r.S) * D;
        load_exact((sink ? r.ks : r.kw) + at, lane, bf, kx[j]);
        load_exact((sink ? r.vs : r.vw) + at, lane, bf, vx[j]);
    }
}

/// Whether exact slot t holds a position the query attends to: sinks [start, min(S, len)),
/// window positions [w_begin, len) (window slot i holds the newest position p < len with
/// p % W == i: len - r + i for i < r, else len - r - W + i, with r = len % W, computed once by
/// the caller: a division per slot sat on every exact slot's critical path).
__device__ __forceinline__ bool exact_slot_live(u32 t, u32 S, u32 W, u32 len, u32 start, u32 w_begin, u32 r) {
    if (t < S) return t >= start && t < len;
    const u32 i = t - S;
    if (i >= len) return false;
    const u32 pos = i < r ? len - r + i : len - r - W + i;
    return pos >= w_begin;
}

/// The exact segments of (seq, kvh) for its GQA query heads as one more partial, slot `slot`:
/// sink positions [start, min(sinks, len)) and window positions [max(start, sinks, frontier),
/// len), f16/bf16 as stored. s = scale * q.k in f32 in the original domain (uncentered keys),
/// softcap, online softmax in log2 units; the value sum is rotated (H D o / sqrt(d), times
/// pv_scale) so the merge treats it like a packed split. Centered packed keys miss scale * q.mu
/// in their scores: with a softcap the packed blocks add it, else the exact scores subtract it
/// (softmax is shift-invariant; the packed blocks then read no mu). Exact slot t goes to warp
/// t % WARPS, which scores it against every head of the group. One memory round trip: the
/// length, frontier, queries, mu and the rows of every slot (up to WARPS * EX_CHUNK of them) load
/// together, slots not in use are skipped after. The warps' states merge in shared memory (`sm`,
/// EXACT_WORDS).
__device__ __noinline__ void exact_block(const DecodeParams& p, u32 seq, u32 kvh, u32 slot, float* sm) {
    // Parameters read once into registers (the shared-memory stores below may alias `p` for the
    // compiler, which would otherwise reload them).
    const float scale = p.scale, softcap = p.softcap, pv_scale = p.pv_scale;
    const u32 tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const u64 pair = (u64)seq * p.num_kv_heads + kvh;
    const u32 S = p.sinks, W = p.window_len, nslot = S + W;
    const ExactRows rows = {(const u16*)p.k_sinks + pair * S * D, (const u16*)p.v_sinks + pair * S * D,
                            (const u16*)p.k_window + pair * W * D, (const u16*)p.v_window + pair * W * D, S};
    const bool bf = p.exact_bf16 != 0;
    const bool shift = p.key_mean != 0 && !(softcap > 0.0f);
    const float ninf = -__int_as_float(0x7f800000);
    const float inv_cap = softcap > 0.0f ? 1.0f / softcap : 0.0f;
    float* q_s = sm;                        // [GQA][D]
    float* o_s = q_s + GQA * D;             // [WARPS][GQA][D]
    float* m_s = o_s + WARPS * GQA * D;     // [WARPS][8]
    float* l_s = m_s + WARPS * 8;           // [WARPS][8]
    float* qmu_s = l_s + WARPS * 8;         // [WARPS][8]
    const qtype* q = (const qtype*)p.q + pair * GQA * D;
    // All loads first, in one round trip (the stores below may alias them for the compiler): the
    // rows' addresses depend on nothing loaded, so they go out with the length.
    float kx[EX_CHUNK][EL], vx[EX_CHUNK][EL];
    if (warp < nslot) load_exact_slots(rows, warp, nslot, lane, bf, kx, vx);
    const u32 len = ((const u32*)p.seq_lens)[seq];
    const u32 f_raw = p.frontiers ? ((const u32*)p.frontiers)[seq] : 0xffffffffu;
    const bool ring = p.ring_flags ? ((const u32*)p.ring_flags)[seq] != 0 : p.ring != 0;
    const float sg_t = ((const float*)p.signs)[tid % D];
    constexpr int QT = (GQA * D + THREADS - 1) / THREADS;
    float qv[QT];
#pragma unroll
    for (int k = 0; k < QT; ++k) qv[k] = tid + k * THREADS < GQA * D ? load_q(q + tid + k * THREADS) : 0.0f;
    float muv[EL];
#pragma unroll
    for (int e = 0; e < EL; ++e) muv[e] = shift ? ((const float*)p.key_mean)[pair * D + lane * EL + e] : 0.0f;
#pragma unroll
    for (int k = 0; k < QT; ++k)
        if (tid + k * THREADS < GQA * D) q_s[tid + k * THREADS] = qv[k];
    const u32 frontier = f_raw < len ? f_raw : len;
    const u32 start = visible_start(ring, p, len);
    float* o_w = o_s + warp * GQA * D;
#pragma unroll
    for (int h = 0; h < GQA; ++h)
#pragma unroll
        for (int e = 0; e < EL; ++e) o_w[h * D + lane * EL + e] = 0.0f;
    __syncthreads();
    u32 w_begin = start > S ? start : S;
    if (frontier > w_begin) w_begin = frontier;
    const u32 len_w = W ? len % W : 0;
    // The heads go through rolled loops and the running max, sum and scale * q.mu per (warp, head)
    // live in shared memory: this code runs once per launch and is fetched cold (the cache was
    // evicted since the last launch), so its size costs more than its instruction count
    // (unrolled over heads and slot groups it was instruction-fetch bound: NOTES-decode.md).
    float* m_w = m_s + warp * 8;
    float* l_w = l_s + warp * 8;
    float* qmu_w = qmu_s + warp * 8;
#pragma unroll 1
    for (u32 h = 0; h < GQA; ++h) {
        float a = 0.0f;
        if (shift) {
#pragma unroll
            for (int e = 0; e < EL; ++e) a += q_s[h * D + lane * EL + e] * muv[e];
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) a += __shfl_xor_sync(0xffffffffu, a, off);
        }
        if (lane == 0) {
            qmu_w[h] = shift ? scale * a : 0.0f;
            m_w[h] = ninf;
            l_w[h] = 0.0f;
        }
    }
    __syncwarp();
    // This warp's slots t = warp + WARPS * i, EX_CHUNK at a time (the first chunk loaded above):
    // per head, the chunk's dot products reduced together, then one online-softmax step.
#pragma unroll 1
    for (u32 t0 = warp; t0 < nslot; t0 += WARPS * EX_CHUNK) {
        if (t0 != warp) load_exact_slots(rows, t0, nslot, lane, bf, kx, vx);
        bool live[EX_CHUNK];
#pragma unroll
        for (int j = 0; j < EX_CHUNK; ++j) {
            const u32 t = t0 + j * WARPS;
            live[j] = t < nslot && exact_slot_live(t, S, W, len, start, w_begin, len_w);
        }
#pragma unroll 1
        for (u32 h = 0; h < GQA; ++h) {
            float qf[EL];
#pragma unroll
            for (int e = 0; e < EL; ++e) qf[e] = q_s[h * D + lane * EL + e];
            float x[EX_CHUNK];
#pragma unroll
            for (int j = 0; j < EX_CHUNK; ++j) {
                float dot = 0.0f;
#pragma unroll
                for (int e = 0; e < EL; ++e) dot += qf[e] * kx[j][e];
                x[j] = dot;
            }
#pragma unroll
            for (int off = 16; off > 0; off >>= 1)
#pragma unroll
                for (int j = 0; j < EX_CHUNK; ++j) x[j] += __shfl_xor_sync(0xffffffffu, x[j], off);
            const float qm = qmu_w[h], m_old = m_w[h], l_old = l_w[h];
            float m_new = m_old;
#pragma unroll
            for (int j = 0; j < EX_CHUNK; ++j) {
                float v = soft_cap(scale * x[j], softcap, inv_cap);
                v = (v - qm) * LOG2E;
                x[j] = v;
                if (live[j]) m_new = fmaxf(m_new, v);
            }
            if (m_new == ninf) continue; // no live slot yet (the same on every lane)
            const float corr = ex2(m_old - m_new);
            float* oh = o_w + h * D + lane * EL;
            float acc[EL], lsum = 0.0f;
#pragma unroll
            for (int e = 0; e < EL; ++e) acc[e] = oh[e] * corr;
#pragma unroll
            for (int j = 0; j < EX_CHUNK; ++j) {
                const float pj = live[j] ? ex2(x[j] - m_new) : 0.0f;
                lsum += pj;
#pragma unroll
                for (int e = 0; e < EL; ++e) acc[e] += pj * vx[j][e];
            }
#pragma unroll
            for (int e = 0; e < EL; ++e) oh[e] = acc[e];
            __syncwarp(); // every lane has read m_w[h], l_w[h]
            if (lane == 0) {
                m_w[h] = m_new;
                l_w[h] = l_old * corr + lsum;
            }
            __syncwarp();
        }
    }
    __syncthreads();
    // Merge the warps into q_s (the queries are dead): sum_w e^(m_w - M) o_w * pv_scale * signs.
    const float* signs = (const float*)p.signs;
    const float sg0 = sg_t * pv_scale; // i % D == tid % D below when THREADS % D == 0
    for (u32 i = tid; i < GQA * D; i += THREADS) {
        const u32 h = i / D;
        float mx = ninf;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) mx = fmaxf(mx, m_s[w * 8 + h]);
        float acc = 0.0f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) {
            const float mw = m_s[w * 8 + h];
            acc += mw == ninf ? 0.0f : ex2(mw - mx) * o_s[w * GQA * D + i];
        }
        q_s[i] = acc * (THREADS % D == 0 ? sg0 : signs[i % D] * pv_scale);
    }
    __syncthreads();
    // Rotate, a warp per head: FWHT of the head's row, then / sqrt(d).
    const u64 part_base = (pair * p.num_splits + slot) * GQA;
    float* part_o = (float*)p.part_o + part_base * D;
    float* part_ml = (float*)p.part_ml + part_base * 2;
    for (u32 h = warp; h < GQA; h += WARPS) {
        float v[EL];
#pragma unroll
        for (int e = 0; e < EL; ++e) v[e] = q_s[h * D + lane * EL + e];
        fwht_warp(v, lane);
#pragma unroll
        for (int e = 0; e < EL; ++e) part_o[h * D + lane * EL + e] = v[e] * INV_SQRT_D;
    }
    if (tid < GQA) {
        float mx = ninf, sum = 0.0f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) mx = fmaxf(mx, m_s[w * 8 + tid]);
#pragma unroll
        for (int w = 0; w < WARPS; ++w) {
            const float mw = m_s[w * 8 + tid];
            sum += mw == ninf ? 0.0f : ex2(mw - mx) * l_s[w * 8 + tid];
        }
        part_ml[2 * tid] = mx;
        part_ml[2 * tid + 1] = sum;
    }
}

// ---------------------------------------------------------------- spread exact slots (p.exact == 3)

/// Starts copying the K and V rows of exact slots t0 .. t0 + n of `pair` into shared memory at
/// `dst` (slot j's K row at u16 offset 2j * D, its V row at (2j + 1) * D).
__device__ __forceinline__ void stage_exact_rows(const DecodeParams& p, u64 pair, u32 t0, u32 n, u32 dst, u32 tid) {
    constexpr u32 CPR = D / 8; // 16-byte chunks per row
    const u32 S = p.sinks, W = p.window_len;
    for (u32 i = tid; i < n * 2 * CPR; i += THREADS) {
        const u32 j = i / (2 * CPR), r = (i / CPR) & 1, ch = i % CPR;
        const u32 t = t0 + j;
        const bool sink = t < S;
        const u16* base = (const u16*)(sink ? (r ? p.v_sinks : p.k_sinks) : (r ? p.v_window : p.k_window));
        const u64 row = sink ? pair * S + t : pair * W + (t - S);
        cp_async<16>(dst + ((2 * j + r) * D + ch * 8) * 2, base + row * D + ch * 8);
    }
}

/// This warp's (heads, slot group) items over exact slots [t0, t0 + n) staged in EXR: item
/// (heads, sg) scores slots sg, sg + EX_SG, ... for EX_HPI heads (one per half-warp with EX_HALF)
/// like exact_block (f32, original domain, uncentered keys, scale * q.mu subtracted in shift
/// mode) with an online softmax, from the states saved in EXST (or from empty ones, `fresh`), and
/// saves them there. No barrier: each warp touches only its items' states.
__device__ __noinline__ void exact_items(const DecodeParams& p, const u32* smem, u32 t0, u32 n, bool fresh) {
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const u32* exi = smem + EXI_OFF;
    const u32 len = exi[2], start = exi[3], w_begin = exi[4], len_w = exi[5];
    const float scale = p.scale, softcap = p.softcap;
    const float inv_cap = softcap > 0.0f ? 1.0f / softcap : 0.0f;
    const bool bf = p.exact_bf16 != 0;
    const u32 S = p.sinks, W = p.window_len;
    const float ninf = -__int_as_float(0x7f800000);
    const float* exq = (const float*)(smem + EXQ_OFF);
    const float* exqm = (const float*)(smem + EXQM_OFF);
    const u16* rows = (const u16*)(smem + EXR_OFF);
    float* st_o = (float*)(smem + EXST_OFF); // [EX_ROWS][D]
    float* st_ml = st_o + EX_ROWS * D;       // [EX_ROWS][2]
    const u32 half = EX_HALF ? lane >> 4 : 0, hl = EX_HALF ? lane & 15 : lane; // hl: dims hl * EL_X ..
#pragma unroll 1
    for (u32 it = warp; it < (u32)EX_NI; it += WARPS) {
        const u32 sg = it / (GQA / EX_HPI), h = it % (GQA / EX_HPI) * EX_HPI + half, r = sg * GQA + h;
        float m = fresh ? ninf : st_ml[2 * r], l = fresh ? 0.0f : st_ml[2 * r + 1];
        float o[EL_X], qf[EL_X];
#pragma unroll
        for (int e = 0; e < EL_X; ++e) {
            o[e] = fresh ? 0.0f : st_o[r * D + hl * EL_X + e];
            qf[e] = exq[h * D + hl * EL_X + e];
        }
        const float qm = exqm[h];
#pragma unroll 1
        for (u32 j = sg; j < n; j += EX_SG) {
            if (!exact_slot_live(t0 + j, S, W, len, start, w_begin, len_w)) continue; // the same on every lane
            float kx[EL_X], vx[EL_X];
            load_exact<EL_X>(rows + 2 * j * D, hl, bf, kx);
            load_exact<EL_X>(rows + (2 * j + 1) * D, hl, bf, vx);
            float dot = 0.0f;
#pragma unroll
            for (int e = 0; e < EL_X; ++e) dot += qf[e] * kx[e];
#pragma unroll
            for (int off = EX_HALF ? 8 : 16; off > 0; off >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, off);
            float v = soft_cap(scale * dot, softcap, inv_cap);
            v = (v - qm) * LOG2E;
            const float mn = fmaxf(m, v);
            const float corr = ex2(m - mn), pj = ex2(v - mn);
            l = l * corr + pj;
#pragma unroll
            for (int e = 0; e < EL_X; ++e) o[e] = o[e] * corr + pj * vx[e];
            m = mn;
        }
        __syncwarp(); // every lane has read the saved state
#pragma unroll
        for (int e = 0; e < EL_X; ++e) st_o[r * D + hl * EL_X + e] = o[e];
        if (hl == 0) {
            st_ml[2 * r] = m;
            st_ml[2 * r + 1] = l;
        }
    }
}

/// After the token loop (all threads, after a barrier; exact_items has scored the first chunk of
/// this split's exact slots [e0, e1) (EXI_OFF) in the prologue): the remaining chunks, each
/// staged and waited for here, then the heads' states merged (slot groups) and rotated into EXO:
/// value sum H D o / sqrt(d) * pv_scale, max (log2 units) and sum per head, one more warp state
/// for the block merge. Ends with a barrier.
__device__ __noinline__ void exact_finish(const DecodeParams& p, u64 pair, u32* smem) {
    const u32 tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const u32 e0 = smem[EXI_OFF], e1 = smem[EXI_OFF + 1];
#pragma unroll 1
    for (u32 t0 = e0 + EXC; t0 < e1; t0 += EXC) {
        const u32 n = e1 - t0 < (u32)EXC ? e1 - t0 : (u32)EXC;
        stage_exact_rows(p, pair, t0, n, smem_addr(smem + EXR_OFF), tid);
        cp_async_commit();
        cp_async_wait<0>();
        __syncthreads();
        exact_items(p, smem, t0, n, false);
        __syncthreads(); // every warp is done with the chunk's rows
    }
    const float ninf = -__int_as_float(0x7f800000);
    const float* st_o = (const float*)(smem + EXST_OFF);
    const float* st_ml = st_o + EX_ROWS * D;
    const float* sgn = (const float*)(smem + EXSG_OFF);
    const float pv_scale = p.pv_scale;
    float* o_x = (float*)(smem + EXO_OFF);
    for (u32 h = warp; h < GQA; h += WARPS) {
        float mx = ninf;
#pragma unroll
        for (int g = 0; g < EX_SG; ++g) mx = fmaxf(mx, st_ml[2 * (g * GQA + h)]);
        float v[EL], lsum = 0.0f;
#pragma unroll
        for (int e = 0; e < EL; ++e) v[e] = 0.0f;
#pragma unroll
        for (int g = 0; g < EX_SG; ++g) {
            const u32 it = g * GQA + h;
            const float mg = st_ml[2 * it];
            const float f = mg == ninf ? 0.0f : ex2(mg - mx);
            lsum += f * st_ml[2 * it + 1];
#pragma unroll
            for (int e = 0; e < EL; ++e) v[e] += f * st_o[it * D + lane * EL + e];
        }
#pragma unroll
        for (int e = 0; e < EL; ++e) v[e] *= sgn[lane * EL + e] * pv_scale;
        fwht_warp(v, lane);
#pragma unroll
        for (int e = 0; e < EL; ++e) o_x[h * D + lane * EL + e] = v[e] * INV_SQRT_D;
        if (lane == 0) {
            o_x[GQA * D + h] = mx;
            o_x[GQA * D + 8 + h] = lsum;
        }
    }
    __syncthreads();
}

/// exact = 3: the exact slots [ex0, ex1) split `split` of `splits` also scores (an even share of
/// the pair's); whether there are any.
__device__ __forceinline__ bool exact_share(const DecodeParams& p, u32 split, u32 splits, u32& ex0, u32& ex1) {
    ex0 = ex1 = 0;
    if (p.exact != 3) return false;
    const u32 nslot = p.sinks + p.window_len, share = (nslot + splits - 1) / splits;
    ex0 = split * share < nslot ? split * share : nslot;
    ex1 = ex0 + share < nslot ? ex0 + share : nslot;
    return ex0 < ex1;
}

// ---------------------------------------------------------------- the split kernel entry

extern "C" __global__ void __launch_bounds__(THREADS, MIN_BLOCKS) tq_decode_split(const __grid_constant__ DecodeParams p) {
    extern __shared__ u32 smem[];
    if (blockIdx.z >= p.num_seqs) {
        // Exact blocks (z-slices past the sequences, dispatched after every packed block so they
        // take the slots the packed wave leaves free): block e serves pairs e, e + exact_blocks,
        // ... (pair = seq * kv heads + kvh), one after another, while the wave streams.
        const u64 pairs = (u64)p.num_seqs * p.num_kv_heads;
        const u64 e0 = ((u64)(blockIdx.z - p.num_seqs) * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
        if (e0 >= p.exact_blocks) return;
#pragma unroll 1
        for (u64 e = e0; e < pairs; e += p.exact_blocks) {
            const u32 seq = (u32)(e / p.num_kv_heads), kvh = (u32)(e % p.num_kv_heads);
            exact_block(p, seq, kvh, p.num_splits - 1, (float*)smem);
            merge_if_last(p, seq, kvh, smem);
            __syncthreads(); // the next pair's shared memory is this one's merge buffer and flag
        }
        return;
    }
    const u32 split = blockIdx.x, kvh = blockIdx.y, seq = blockIdx.z;
    const u32 tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
#if TIMELINE
    TL(0);
    {
        u32 sm_id;
        asm volatile("mov.u32 %0, %%smid;" : "=r"(sm_id));
        const u64 b = ((u64)blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
        if (tid == 0 && b < TL_BLOCKS) tq_timeline[b * TL_MARKS + 9] = sm_id;
    }
#endif
    const u32 g = lane >> 2, c = lane & 3, lane4 = lane * 4;
    const u64 pair_idx = (u64)seq * p.num_kv_heads + kvh;

    // Loads that depend on nothing else go first: after an L2 flush they would otherwise queue
    // behind every block's tile traffic. This lane's codebook entries into registers; the
    // group's queries and the signs into shared memory (one cp.async group, older than the
    // tiles'; registers held this long would cost the token loop some).
    const CbRegs<K_BITS> cb_k = load_cb<K_BITS>((const float*)p.k_codebook, lane);
    CbRegs<V_BITS> cb_v;
    if constexpr (!SHARED_TAB) cb_v = load_cb<V_BITS>((const float*)p.v_codebook, lane);
    const qtype* q = (const qtype*)p.q + pair_idx * GQA * D;

    const u32 len = ((const u32*)p.seq_lens)[seq];
    // The frontier goes out with the length: loaded after the staging below, it queued behind
    // the exact rows there (a tq4 call's tiles started ~0.5 µs later, NOTES-decode v9).
    const u32 f_raw = p.frontiers ? ((const u32*)p.frontiers)[seq] : 0xffffffffu;
    const bool ring = p.ring_flags ? ((const u32*)p.ring_flags)[seq] != 0 : p.ring != 0;
    const u32 vis = visible_start(ring, p, len);
    u32 start = vis;
    const u32 packed_splits = p.num_splits - (p.exact == 1 || p.exact == 2); // == gridDim.x
    u32 ex0, ex1;
    const bool has_ex = exact_share(p, split, packed_splits, ex0, ex1);
    // exact = 2: this pair's last packed split first scores the exact sinks and window (slot
    // num_splits - 1) and streams exact_credit fewer tiles than the others.
    const bool folded = p.exact == 2 && split == packed_splits - 1;
    if (folded) {
        exact_block(p, seq, kvh, p.num_splits - 1, (float*)smem);
        __syncthreads(); // exact_block's shared memory is the tables', pipelines' and staging's
    }
    {
        constexpr u32 NQ = QRAW_BYTES / 16, NS = D * 4 / 16;
        for (u32 i = tid; i < NQ + NS; i += THREADS) {
            if (i < NQ)
                cp_async<16>(smem_addr(smem + QRAW_OFF) + 16 * i, (const u8*)q + 16 * i);
            else
                cp_async<16>(smem_addr(smem + SG_OFF) + 16 * (i - NQ), (const u8*)p.signs + 16 * (i - NQ));
        }
        if (has_ex) {
            const u32 n0 = ex1 - ex0 < (u32)EXC ? ex1 - ex0 : (u32)EXC;
            stage_exact_rows(p, pair_idx, ex0, n0, smem_addr(smem + EXR_OFF), tid);
            for (u32 i = tid; i < NS; i += THREADS) {
                cp_async<16>(smem_addr(smem + EXSG_OFF) + 16 * i, (const u8*)p.signs + 16 * i);
                if (p.key_mean)
                    cp_async<16>(smem_addr(smem + EXMU_OFF) + 16 * i, (const u8*)((const float*)p.key_mean + pair_idx * D) + 16 * i);
            }
        }
        cp_async_commit();
    }
    // Packed positions: [max(start, sinks), min(len, frontier)).
    const u32 end = f_raw < len ? f_raw : len;
    const u32 frontier = end;
    if (p.sinks > start) start = p.sinks;
    if (start > end) start = end;
    // Tiles start on TILE-position boundaries (whole sectors of rows and norms); the positions
    // before `begin` in the first tile are masked.
    const u32 begin = start;
    start -= start % TILE;
    const u32 ntiles = begin < end ? (end - start + TILE - 1) / TILE : 0;
    const u32 credit = p.exact == 2 ? p.exact_credit : 0;
    const u32 per = (ntiles + credit + packed_splits - 1) / packed_splits;
    const u32 t_begin = split * per < ntiles ? split * per : ntiles;
    const u32 t_end = t_begin + per < ntiles ? t_begin + per : ntiles;
    TL(1, len);

    const u64 part_base = (pair_idx * p.num_splits + split) * GQA;
    float* part_o = (float*)p.part_o + part_base * D;
    float* part_ml = (float*)p.part_ml + part_base * 2;

    if (has_ex && tid == 0) {
        // kept in shared memory through the token loop, not in registers
        u32 w_begin = vis > p.sinks ? vis : p.sinks;
        if (frontier > w_begin) w_begin = frontier;
        u32* exi = smem + EXI_OFF;
        exi[0] = ex0;
        exi[1] = ex1;
        exi[2] = len;
        exi[3] = vis;
        exi[4] = w_begin;
        exi[5] = p.window_len ? len % p.window_len : 0; // exact_slot_live's r
    }
    if (t_begin >= t_end && !has_ex) {
        cp_async_wait<0>(); // the staging lands before merge_if_last reuses shared memory
        float* dst_o = p.direct_out ? (float*)(smem + CL_OFF) : part_o;
        float* dst_ml = p.direct_out ? (float*)(smem + CL_OFF) + GQA * D : part_ml;
        for (u32 i = tid; i < GQA * D; i += THREADS) dst_o[i] = 0.0f;
        if (tid < GQA) {
            dst_ml[2 * tid] = -__int_as_float(0x7f800000);
            dst_ml[2 * tid + 1] = 0.0f;
        }
        if (p.direct_out) {
            finish_single(p, seq, kvh, smem);
            return;
        }
        merge_if_last(p, seq, kvh, smem);
        return;
    }

    SeqCtx s;
    {
        const u64 head_slot0 = pair_idx * p.capacity;
        s.kp = (const u8*)p.k_packed + head_slot0 * KS::ROW;
        s.vp = (const u8*)p.v_packed + head_slot0 * VS::ROW;
        s.kn = (const float*)p.k_norms + head_slot0 * NB;
        s.vn = (const float*)p.v_norms + head_slot0 * NB;
        s.begin = begin;
        s.end = end;
        s.cap = p.capacity;
        s.ring = ring;
    }

    const PipeLane pl = pipe_lane(lane);
    const u64 pol = stream_policy(p.l2_evict_first != 0);
    // This warp's tiles (tile0 + i * WARPS) and pipeline stages, shared address and generic pointer.
    const u32 tile0 = t_begin + warp;
    const int n_mine = tile0 < t_end ? (int)((t_end - tile0 + WARPS - 1) / WARPS) : 0;
    const u32 pipe = smem_addr(smem + PIPE_OFF) + PSC * warp * STAGES * STAGE_BYTES;
    const u8* pipe_g = (const u8*)(smem + PIPE_OFF) + PSC * warp * STAGES * STAGE_BYTES;
    // Start this warp's first STAGES-1 tiles before the prologue so their latency overlaps it.
#pragma unroll
    for (int i = 0; i < STAGES - 1; ++i) {
        if (i < n_mine) issue_tile(s, start + (tile0 + i * WARPS) * TILE, lane, g, c, pipe + PSC * i * STAGE_BYTES, pl, pol);
        cp_async_commit();
    }
    // Codebook tables (f16), lane-replicated.
    fill_table<K_BITS, K_P8>(smem + TAB_K_OFF, cb_k, warp, lane);
    if constexpr (!SHARED_TAB) fill_table<V_BITS, V_P8 || V_N8>(smem + TAB_V_OFF, cb_v, warp, lane);
    TL(10);
    // Rotate the group's queries, a warp per head: qs = FWHT(D q) (unnormalized), amax = max |qs|
    // per head; amax[8 + h] = scale * q.mu, what the centered packed keys miss, added to the
    // packed scores only before a softcap (else the exact scores subtract it: exact_block).
    float* qs = (float*)(smem + QS_OFF);
    float* amax = qs + GQA * QS_STRIDE;
    {
        cp_async_wait<STAGES - 1>(); // the staging group (older than the STAGES - 1 tiles')
        __syncthreads();
        TL(11);
        const qtype* qr = (const qtype*)(smem + QRAW_OFF);
        const float* sg = (const float*)(smem + SG_OFF);
        // q.mu: added to the packed scores before a softcap; with spread exact slots and no
        // softcap, subtracted from their scores (exqm).
        const float* mu = !p.key_mean ? nullptr
                          : has_ex    ? (const float*)(smem + EXMU_OFF)
                          : p.softcap > 0.0f ? (const float*)p.key_mean + pair_idx * D
                                             : nullptr;
        float* exq = (float*)(smem + EXQ_OFF);
#pragma unroll
        for (int j = 0; j < HPW; ++j) {
            const u32 h = warp + j * WARPS;
            if (h >= GQA) break;
            float v[EL], qm = 0.0f;
#pragma unroll
            for (int e = 0; e < EL; ++e) {
                const u32 i = lane * EL + e;
                const float x = load_q(qr + h * D + i);
                v[e] = x * sg[i];
                if (mu) qm += x * mu[i];
                if (has_ex) exq[h * D + i] = x;
            }
            fwht_warp(v, lane);
            float m = 0.0f;
#pragma unroll
            for (int e = 0; e < EL; ++e) {
                m = fmaxf(m, fabsf(v[e]));
                qs[qs_at(h, lane * EL + e)] = v[e];
            }
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) {
                m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
                qm += __shfl_xor_sync(0xffffffffu, qm, o);
            }
            if (lane == 0) {
                amax[h] = m;
                amax[8 + h] = p.softcap > 0.0f ? p.scale * qm : 0.0f;
                if (has_ex) ((float*)(smem + EXQM_OFF))[h] = p.softcap > 0.0f ? 0.0f : p.scale * qm;
            }
        }
        __syncthreads(); // tables, qs and amax
    }
    TL(2);
    // The first chunk of this split's exact slots, each warp its items, while its first tile loads.
    if (has_ex) exact_items(p, smem, ex0, ex1 - ex0 < (u32)EXC ? ex1 - ex0 : (u32)EXC, true);
    if (TIMELINE == 3) TL(3); // the spread exact slots' first chunk scored
    // Score-side A fragments: row g = query head, k slots (2c, 2c+1 | 2c+8, 2c+9) of chunk kb in
    // block b <-> dims b*256 + c*D_BLK/4 + 4kb + (0, 1 | 2, 3).
    u32 qa[NB][KB][2];
    float kq = 0.0f; // scale * inv_sqrt_d * amax: turns the mma sum into the logit
    {
        const float am = g < GQA ? amax[g] : 0.0f;
        const float inv = am > 0.0f ? 1.0f / am : 0.0f;
        kq = p.scale * INV_SQRT_D * am;
#pragma unroll
        for (int b = 0; b < NB; ++b)
#pragma unroll
            for (int kb = 0; kb < KB; ++kb) {
                const u32 h = g < GQA ? g : 0;
                const float* r0 = qs + qs_at(h, kdim(b, c, 4 * kb));
                const float* r2 = qs + qs_at(h, kdim(b, c, 4 * kb + 2));
                qa[b][kb][0] = g < GQA ? pack_h2(r0[0] * inv, r0[1] * inv) : 0u;
                qa[b][kb][1] = g < GQA ? pack_h2(r2[0] * inv, r2[1] * inv) : 0u;
            }
    }
    const float kg = NB == 1 ? INV_SQRT_D : p.inv_sf;       // norm -> per-coordinate scale
    const float vg = kg * p.pv_scale;
    const float softcap = p.softcap;
    const float inv_cap = softcap > 0.0f ? 1.0f / softcap : 0.0f;
    const u8* tab_k = (const u8*)(smem + TAB_K_OFF);
    const u8* tab_v = (const u8*)(smem + TAB_V_OFF);

#if TRANS
    float o[NB][NTB / 2][4]; // PV accumulators: m-tile (b, jp); rows dims (g, 2jp) | (g, 2jp+1), columns heads 2c, 2c+1
#pragma unroll
    for (int b = 0; b < NB; ++b)
#pragma unroll
        for (int j = 0; j < NTB / 2; ++j) o[b][j][0] = o[b][j][1] = o[b][j][2] = o[b][j][3] = 0.0f;
    float m_run[2] = {-__int_as_float(0x7f800000), -__int_as_float(0x7f800000)}, l_run[2] = {0.0f, 0.0f};
    float kqh[2]; // kq of heads 2c, 2c+1
#pragma unroll
    for (int h = 0; h < 2; ++h) kqh[h] = 2 * c + h < GQA ? p.scale * INV_SQRT_D * amax[2 * c + h] : 0.0f;
    float qmh[2]; // scale * q.mu of heads 2c, 2c+1
#pragma unroll
    for (int h = 0; h < 2; ++h) qmh[h] = 2 * c + h < GQA ? amax[8 + 2 * c + h] : 0.0f;

#pragma unroll 1
    for (int i = 0; i < n_mine; ++i) {
        __syncwarp(); // every lane is done with the stage refilled below (read in iteration i-1)
        const int ia = i + STAGES - 1;
        if (ia < n_mine) issue_tile(s, start + (tile0 + ia * WARPS) * TILE, lane, g, c, pipe + PSC * (ia % STAGES) * STAGE_BYTES, pl, pol);
        cp_async_commit();
        cp_async_wait<STAGES - 1>();
        __syncwarp();
        if (TIMELINE == 2 && i == 0) TL(3); // (spills: TIMELINE=2 only)
        Tile cur;
        read_tile(pipe_g + PSC * (i % STAGES) * STAGE_BYTES, pl, g, c, cur);
        const u32 pos0 = start + (tile0 + i * WARPS) * TILE;

        // Scores: sc[b][2r + h] for token g + 8r, head 2c + h.
        float sc[NB][4];
#pragma unroll
        for (int b = 0; b < NB; ++b) {
            float a[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
            score_chunks_t<0>(a, qa[b], cur.k[0][b], cur.k[1][b], tab_k, lane4);
#pragma unroll
            for (int e = 0; e < 4; ++e) sc[b][e] = a[0][e] + a[1][e];
        }
        float t[2][2];
        float mt[2] = {-__int_as_float(0x7f800000), -__int_as_float(0x7f800000)};
#pragma unroll
        for (int r = 0; r < 2; ++r)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                float acc = 0.0f;
#pragma unroll
                for (int b = 0; b < NB; ++b) acc += sc[b][2 * r + h] * cur.kn[r][b];
                float x = soft_cap(acc * kg * kqh[h] + qmh[h], softcap, inv_cap);
                x *= LOG2E;
                const u32 pos = pos0 + g + 8 * r;
                t[r][h] = pos >= s.begin && pos < s.end ? x : -__int_as_float(0x7f800000);
                mt[h] = fmaxf(mt[h], t[r][h]);
            }
        // The running max moves only when a score passes it by more than LAZY_TAU (log2 units):
        // the common tile needs no reduction over its tokens (three shuffle rounds on the critical
        // path), and p <= 2^LAZY_TAU. The max, sum and accumulators stay consistent either way.
        bool grow = false;
#pragma unroll
        for (int h = 0; h < 2; ++h) grow |= mt[h] > m_run[h] + LAZY_TAU;
        if (__any_sync(0xffffffffu, grow)) {
            float corr[2];
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                mt[h] = fmaxf(mt[h], __shfl_xor_sync(0xffffffffu, mt[h], 4));
                mt[h] = fmaxf(mt[h], __shfl_xor_sync(0xffffffffu, mt[h], 8));
                mt[h] = fmaxf(mt[h], __shfl_xor_sync(0xffffffffu, mt[h], 16));
                const float m_new = fmaxf(m_run[h], mt[h]);
                corr[h] = ex2(m_run[h] - m_new);
                m_run[h] = m_new;
                l_run[h] *= corr[h];
            }
#pragma unroll
            for (int b = 0; b < NB; ++b)
#pragma unroll
                for (int j = 0; j < NTB / 2; ++j) {
                    o[b][j][0] *= corr[0];
                    o[b][j][1] *= corr[1];
                    o[b][j][2] *= corr[0];
                    o[b][j][3] *= corr[1];
                }
        }
        float pr[2][2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            pr[0][h] = ex2(t[0][h] - m_run[h]);
            pr[1][h] = ex2(t[1][h] - m_run[h]);
            l_run[h] += pr[0][h] + pr[1][h];
        }
        // PV per norm block: P' (token g + 8r, heads 2c, 2c+1) transposed into the B fragments
        // (tokens 2c, 2c+1 | 2c+8, 2c+9; head g).
#pragma unroll
        for (int b = 0; b < NB; ++b) {
            const float w0 = cur.vn[0][b] * vg, w1 = cur.vn[1][b] * vg;
            const u32 b0 = movm_trans(pack_h2(pr[0][0] * w0, pr[0][1] * w0));
            const u32 b1 = movm_trans(pack_h2(pr[1][0] * w1, pr[1][1] * w1));
            pv_pairs_t<0>(o[b], b0, b1, cur.v[0][b], cur.v[1][b], cur.v[2][b], cur.v[3][b], tab_v, lane4);
        }
    }
    cp_async_wait<0>();
    TL(4);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        l_run[h] += __shfl_xor_sync(0xffffffffu, l_run[h], 4);
        l_run[h] += __shfl_xor_sync(0xffffffffu, l_run[h], 8);
        l_run[h] += __shfl_xor_sync(0xffffffffu, l_run[h], 16);
    }

    // Merge the warps' states in shared memory (the tables are dead now).
    __syncthreads();
    TL(5);
    float* sm_o = (float*)smem;                 // [WARPS][GQA] rows, words at smo_at
    float* sm_m = sm_o + WARPS * GQA * SMO_RS;  // [WARPS][8]
    float* sm_l = sm_m + WARPS * 8;             // [WARPS][8]
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const u32 hd = 2 * c + h;
        if (hd < GQA) {
            if (g == 0) {
                sm_m[warp * 8 + hd] = m_run[h];
                sm_l[warp * 8 + hd] = l_run[h];
            }
            const u32 r = warp * GQA + hd;
#pragma unroll
            for (int b = 0; b < NB; ++b) {
                if constexpr (!V_ILV) {
                    // dims vdim(b, g, 0) + 0 .. NTB: one chunk, contiguous words (pairs aligned)
                    float* w = sm_o + smo_at(r, vdim(b, g, 0));
#pragma unroll
                    for (int j = 0; j < NTB / 2; ++j) *(float2*)(w + 2 * j) = make_float2(o[b][j][h], o[b][j][2 + h]);
                } else {
#pragma unroll
                    for (int j = 0; j < NTB / 2; ++j) {
                        sm_o[smo_at(r, vdim(b, g, 2 * j))] = o[b][j][h];
                        sm_o[smo_at(r, vdim(b, g, 2 * j + 1))] = o[b][j][2 + h];
                    }
                }
            }
        }
    }
#else
    const float qm = g < GQA ? amax[8 + g] : 0.0f; // scale * q.mu of head g
    float o[NB][NTB][2]; // PV accumulators: n-tile (b, j), columns 2c, 2c+1; row g
#pragma unroll
    for (int b = 0; b < NB; ++b)
#pragma unroll
        for (int j = 0; j < NTB; ++j) o[b][j][0] = o[b][j][1] = 0.0f;
    float m_run = -__int_as_float(0x7f800000), l_run = 0.0f;

#pragma unroll 1
    for (int i = 0; i < n_mine; ++i) {
        __syncwarp(); // every lane is done with the stage refilled below (read in iteration i-1)
        const int ia = i + STAGES - 1;
        if (ia < n_mine) issue_tile(s, start + (tile0 + ia * WARPS) * TILE, lane, g, c, pipe + PSC * (ia % STAGES) * STAGE_BYTES, pl, pol);
        cp_async_commit();
        cp_async_wait<STAGES - 1>();
        __syncwarp();
        Tile cur;
        read_tile(pipe_g + PSC * (i % STAGES) * STAGE_BYTES, pl, g, c, cur);
        const u32 pos0 = start + (tile0 + i * WARPS) * TILE;

        // Scores: sc[n][j] for tokens 8n + 2c + j, head g.
        float sc[2][NB][2];
#pragma unroll
        for (int n = 0; n < 2; ++n)
#pragma unroll
            for (int b = 0; b < NB; ++b) {
                float a[2][2] = {{0.0f, 0.0f}, {0.0f, 0.0f}};
                score_chunks<0>(a, qa[b], cur.k[n][b], tab_k, lane4);
                sc[n][b][0] = a[0][0] + a[1][0];
                sc[n][b][1] = a[0][1] + a[1][1];
            }
        float t[4];
        float mt = -__int_as_float(0x7f800000);
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            const int n = r >> 1, j = r & 1;
            float acc = 0.0f;
#pragma unroll
            for (int b = 0; b < NB; ++b) acc += sc[n][b][j] * cur.kn[r][b];
            float x = soft_cap(acc * kg * kq + qm, softcap, inv_cap);
            x *= LOG2E;
            const u32 pos = pos0 + 8 * n + 2 * c + j;
            t[r] = pos >= s.begin && pos < s.end ? x : -__int_as_float(0x7f800000);
            mt = fmaxf(mt, t[r]);
        }
        mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, 1));
        mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, 2));
        const float m_new = fmaxf(m_run, mt);
        const float corr = ex2(m_run - m_new);
        m_run = m_new;
        float pr[4];
#pragma unroll
        for (int r = 0; r < 4; ++r) pr[r] = ex2(t[r] - m_new);
        l_run = l_run * corr + (pr[0] + pr[1]) + (pr[2] + pr[3]);
        if (__any_sync(0xffffffffu, corr != 1.0f)) {
#pragma unroll
            for (int b = 0; b < NB; ++b)
#pragma unroll
                for (int j = 0; j < NTB; ++j) {
                    o[b][j][0] *= corr;
                    o[b][j][1] *= corr;
                }
        }
        // PV per norm block: A = P' (row g, tokens 2c, 2c+1 | 2c+8, 2c+9), B = values of column g.
#pragma unroll
        for (int b = 0; b < NB; ++b) {
            const u32 pa0 = pack_h2(pr[0] * cur.vn[0][b] * vg, pr[1] * cur.vn[1][b] * vg);
            const u32 pa1 = pack_h2(pr[2] * cur.vn[2][b] * vg, pr[3] * cur.vn[3][b] * vg);
            pv_pairs<0>(o[b], pa0, pa1, cur.v[0][b], cur.v[1][b], cur.v[2][b], cur.v[3][b], tab_v, lane4);
        }
    }
    cp_async_wait<0>();
    l_run += __shfl_xor_sync(0xffffffffu, l_run, 1);
    l_run += __shfl_xor_sync(0xffffffffu, l_run, 2);

    // Merge the warps' states in shared memory (the tables are dead now).
    __syncthreads();
    float* sm_o = (float*)smem;                 // [WARPS][GQA] rows, words at smo_at
    float* sm_m = sm_o + WARPS * GQA * SMO_RS;  // [WARPS][8]
    float* sm_l = sm_m + WARPS * 8;             // [WARPS][8]
    if (g < GQA) {
        if (c == 0) {
            sm_m[warp * 8 + g] = m_run;
            sm_l[warp * 8 + g] = l_run;
        }
        const u32 r = warp * GQA + g;
#pragma unroll
        for (int b = 0; b < NB; ++b) {
            if constexpr (!V_ILV) {
                float* w0 = sm_o + smo_at(r, vdim(b, 2 * c, 0)); // chunks 2c, 2c + 1: contiguous words
                float* w1 = sm_o + smo_at(r, vdim(b, 2 * c + 1, 0));
#pragma unroll
                for (int j = 0; j < NTB; ++j) {
                    w0[j] = o[b][j][0];
                    w1[j] = o[b][j][1];
                }
            } else {
#pragma unroll
                for (int j = 0; j < NTB; ++j) {
                    sm_o[smo_at(r, vdim(b, 2 * c, j))] = o[b][j][0];
                    sm_o[smo_at(r, vdim(b, 2 * c + 1, j))] = o[b][j][1];
                }
            }
        }
    }
#endif
    __syncthreads();
    TL(12);
    // The exact slots' remaining chunks and state (one more warp state at EXO_OFF); whether this
    // split has any is recomputed rather than held in registers through the token loop.
    u32 ex0_end, ex1_end;
    const bool has_ex_end = exact_share(p, blockIdx.x, gridDim.x, ex0_end, ex1_end);
    if (has_ex_end) exact_finish(p, (u64)blockIdx.z * p.num_kv_heads + blockIdx.y, smem);
    const float* ex_o = (const float*)(smem + EXO_OFF);
    TL(13);
    // The block's combined state: a partial in global memory, or for a single split in this
    // block's shared memory (finish_single).
    float* dst_o = p.direct_out ? (float*)(smem + CL_OFF) : part_o;
    float* dst_ml = p.direct_out ? (float*)(smem + CL_OFF) + GQA * D : part_ml;
    // Loops over the warps rolled by 4: this code runs once per block, and its cold instruction
    // fetch (not its arithmetic) is what it costs (bench/NOTES-decode.md, v8).
    for (u32 i = tid; i < GQA * D; i += THREADS) {
        const u32 h = i / D;
        float mx = -__int_as_float(0x7f800000);
#pragma unroll 4
        for (int w = 0; w < WARPS; ++w) mx = fmaxf(mx, sm_m[w * 8 + h]);
        if (has_ex_end) mx = fmaxf(mx, ex_o[GQA * D + h]);
        float acc = 0.0f, l = 0.0f;
#pragma unroll 4
        for (int w = 0; w < WARPS; ++w) {
            const float mw = sm_m[w * 8 + h];
            const float f = mw == -__int_as_float(0x7f800000) ? 0.0f : ex2(mw - mx);
            acc += f * sm_o[smo_at(w * GQA + h, i % D)];
            l += f * sm_l[w * 8 + h];
        }
        if (has_ex_end) {
            const float mw = ex_o[GQA * D + h];
            const float f = mw == -__int_as_float(0x7f800000) ? 0.0f : ex2(mw - mx);
            acc += f * ex_o[i];
            l += f * ex_o[GQA * D + 8 + h];
        }
        dst_o[i] = acc;
        if (i % D == 0) {
            dst_ml[2 * h] = mx;
            dst_ml[2 * h + 1] = l;
        }
    }
    TL(6);
    if (p.direct_out) {
        finish_single(p, seq, kvh, smem);
        TL(8);
        return;
    }
    merge_if_last(p, seq, kvh, smem);
}

// ---------------------------------------------------------------- the merge kernel

extern "C" __global__ void __launch_bounds__(D) tq_decode_merge(const DecodeParams p) {
    __shared__ float x[D];
    const u32 hq = blockIdx.x, seq = blockIdx.y, i = threadIdx.x;
    const u32 kvh = hq / GQA, h = hq % GQA;
    const u64 base = ((u64)seq * p.num_kv_heads + kvh) * p.num_splits * GQA + h; // + split * GQA
    const float* part_o = (const float*)p.part_o;
    const float* part_ml = (const float*)p.part_ml;
    const float ninf = -__int_as_float(0x7f800000);
    float mx = ninf;
    for (u32 sp = 0; sp < p.num_splits; ++sp) mx = fmaxf(mx, part_ml[2 * (base + sp * GQA)]);
    float acc = 0.0f, l = 0.0f;
    if (mx != ninf) {
        for (u32 sp = 0; sp < p.num_splits; ++sp) {
            const u64 k = base + sp * GQA;
            const float ms = part_ml[2 * k];
            if (ms == ninf) continue;
            const float f = ex2(ms - mx);
            l += f * part_ml[2 * k + 1];
            acc += f * part_o[k * D + i];
        }
    }
    x[i] = l > 0.0f ? acc / (l * p.pv_scale) : 0.0f;
    __syncthreads();
    // Inverse rotation o = D H x: butterflies, * inv_sqrt_d, * signs.
#pragma unroll 1
    for (u32 hs = 1; hs < D; hs <<= 1) {
        float a = x[i], b = x[i ^ hs];
        __syncthreads();
        x[i] = (i & hs) ? b - a : a + b;
        __syncthreads();
    }
    const float y = x[i] * INV_SQRT_D * ((const float*)p.signs)[i];
    store_o((qtype*)p.out + ((u64)seq * p.num_kv_heads * GQA + hq) * D + i, y);
}
