// moe_grouped.cu: the routed (and shared) expert FFN of a prefill chunk (model.md §2.8) as grouped GEMMs on tensor
// cores: (token, expert) pairs sorted by expert on the device, then per expert the tokens routed to it times its
// matrices, so each expert's weights are read once per (row tile, token tile) of the chunk instead of once per pair
// (moe.cu, the decode kernels, reads them once per pair). float32-accurate (Numerics below), like matmul_mma.cu.
//
// Pairs: p = t * k + j for token t and slot j of ids [n, k] (token-major, as moe.cu); n_pairs = n * k.
//
// moe_grouped_route(ids, n_pairs, n_expert, tile_n, offsets, sorted, tiles, n_tiles)     one CTA of 512 threads
//   ids: int32 [n_pairs]. Bucket of pair p: ids[p] when 0 <= ids[p] < n_expert, else n_expert (the "bad id" bucket,
//   whose rows the GEMMs fill with NaN without reading any weight). A stable counting sort:
//     offsets int32 [n_expert + 2]: offsets[b] = first position of bucket b, offsets[n_expert + 1] = n_pairs
//     sorted  int32 [n_pairs]: pair indices by bucket, increasing p within a bucket (== numpy argsort(kind="stable")
//             of the bucket array)
//     tiles   int32 [max_tiles, 3]: (bucket, first position in sorted, count <= tile_n) for every run of tile_n
//             sorted pairs of one bucket, buckets in order; max_tiles = n_pairs / tile_n + min(n_expert + 1, n_pairs)
//     n_tiles int32 [1]: the number of tiles written (the GEMM grids are sized for max_tiles; extra CTAs exit)
//   Deterministic: counts are integer atomics (order-free), positions come from per-warp segment counts.
//   n_expert <= MG_MAX_EXPERT; no host sync, nothing allocated.
//
// moe_grouped_gate_up_<type>(gate, up, expert_stride, row_stride, tiles, n_tiles, sorted, weights, k, n_expert,
//                            n_pairs, X, cols, mid, ff, clamp)
//   gate, up: uint8 [n_expert, ff, row_stride] raw GGUF expert stacks (expert_stride = ff * row_stride bytes; for
//   moe_grouped_*_q8_0r, Q8_0 stacks repacked into planes (q8_0r.cuh) and row_stride = their slab rows);
//   X: float32 [n, cols]; weights: float32 [n_pairs] (nullptr: 1); mid: float32 [n_pairs, ff] (moe.cu's [n, k, ff]).
//   For the pairs p of each tile (expert e):  g = gate[e] . X[p / k],  u = up[e] . X[p / k]  (per row f)
//       mid[p, f] = silu(min(g, clamp)) * min(max(u, -clamp), clamp) * weights[p]      (NaN in the bad-id bucket)
//   Shared expert: tiles = sorted = nullptr: expert 0, pairs = tokens (k = 1), tile y = tokens [64 y, 64 y + 64).
//   Launch: 256 threads, grid (ceil(ff / 128), max_tiles) (shared expert: ceil(n / 64)).
//   Reference: moe_gate_up_<type> of moe.cu (float32), to float32 summation level.
// moe_grouped_down_<type>(down, expert_stride, row_stride, tiles, n_tiles, sorted, n_expert, n_pairs, mid, cols,
//                         out, rows, accumulate)
//   down: uint8 [n_expert, rows, row_stride] (rows = D outputs of cols = ff inputs); mid as above;
//   out: float32 [n_pairs, rows]:  out[p, d] (+)= down[e][d] . mid[p]   (NaN in the bad-id bucket)
//   Routed experts write one row per pair (plain stores) and moe_grouped_sum adds the k rows of a token; the shared
//   expert (tiles = sorted = nullptr, out = Y [n, D], accumulate = 1) adds straight onto Y.
//   Launch: 256 threads, grid (ceil(rows / 256), max_tiles) (shared expert: ceil(n / 64)).
//   Reference: moe_down_<type> of moe.cu, to float32 summation level.
// moe_grouped_pipe_gate_up_<type>, moe_grouped_pipe_down_<type>: the same arguments, launch and results, bit for bit
//   (switch MOE_GROUPED_PIPE): the k-loop software-pipelined (mg_gemm, PIPE; the weight bytes and activations of
//   k-step i + MG_PIPE_DEPTH are loaded into registers while step i is multiplied) over two shared tiles in dynamic
//   shared memory, 2 * sizeof(MgTile<DEC>) bytes (moe_grouped.pipe_smem_bytes; 66,560 .. 71,168, so launched with
//   the > 48 KiB opt-in; a launch with less traps).
// moe_grouped_sum(Yp, k, Y, n, D)
//   Y[t, d] = ((Yp[t k, d] + Yp[t k + 1, d]) + ...) + Yp[t k + k - 1, d]: slots in order j = 0 .. k-1, so the result
//   does not depend on scheduling (no float atomics anywhere: bit-identical run to run). Any grid; D % 4 == 0.
//
// GEMM tiles. A CTA (8 warps) holds 256 weight rows x 64 tokens: gate/up = 128 rows of gate and the same 128 rows of
// up (so a thread holds g and u of the same (f, token) and the SwiGLU epilogue needs no exchange), down = 256 rows.
// Per k-step of 32 columns: thread tid decodes columns [k0, k0 + 32) of weight row tid into its integer codes (fp16,
// shared) and the scale a and min m of each sub-block (decoders below, on quant_blocks.cuh helpers), and 4 threads
// per token split 8 floats each of its activation row (X[t] or mid[p], gathered through the sorted pair table) into
// hi + lo fp16 with the token's power-of-two scale s for the 32 columns (mma_f16.cuh), and sum the sub-block's
// floats (SX, formats with a min). Warp (wm = warp & 3, wn = warp >> 2) computes rows {32 wm .. +32} of each 128-row
// half and tokens 32 wn .. +32 with mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 (fragments by ldmatrix;
// shared rows padded to 40 halves so the 8 rows of an 8x8 matrix fall in distinct banks): 4 m16 x 4 n8 tiles, 64
// fp32 accumulators per thread, plus a 4-register partial per (m16, n8) tile and sub-block and the hi + lo B
// fragments: ~200 registers (ptxas -v, sm_90a / sm_121a, no spills), so one CTA of 256 threads per SM
// (__launch_bounds__(256, 1); two would cap a thread at 128 registers and spill).
// Portable sm_80+ (sm_90a, sm_100a, sm_120, sm_121a): no wgmma / tcgen05.
//
// Numerics (float32-accurate, as matmul_mma.cu): a weight is w = a * code - m per sub-block of SB columns
// (IQ2_XXS: SB = 32, a = d (0.5 + s4) / 4, code = +/- grid byte, m = 0; Q8_0 / Q8_0R: SB = 32, a = d, code = int8,
// m = 0; Q2_K: SB = 16, a = d sc, m = dmin mn, code 0..3; Q4_K: SB = 32, 6-bit sc / mn, code 0..15). The codes are
// exact in fp16 (|code| <= 128) and are the mma operands; a and m are exact in float32 (an f16 times a small
// integer). Per (m16, n8) tile and sub-block the partial P = sum code * (hi + lo) (2 mma per 16 columns: products
// exact, summed in float32) is folded in float32: acc = fma(a * s, P, acc), then acc = fma(-m, SX, acc) (SX = the
// float32 sum of the sub-block's activations). So the weight side carries no rounding, the activations carry 2^-21,
// and the result differs from moe.cu's float32 dot products by float32 summation-level errors (~1e-6 relative), not
// by fp16 rounding (~4e-4; tests/test_gpu_moe_grouped.py, tests/test_moe_grouped.py's NumPy emulation). No range
// condition: the scale s keeps every fp16 operand below 2^15 whatever the activations.
#include "mma_f16.cuh"
#include "pdl.cuh"
#include "q8_0r.cuh"

#define MG_BN 64          // tokens (pairs) per tile
#define MG_BM 256         // weight rows per CTA (gate/up: 128 + 128)
#define MG_BK 32          // columns per k-step
#define MG_LD 40          // shared row stride in halves (80 bytes: 16-byte aligned, ldmatrix conflict-free)
#define MG_MAX_EXPERT 512 // buckets of moe_grouped_route: experts + the bad-id bucket
#define MG_RT_WARPS 16
// k-steps ahead whose global loads the moe_grouped_pipe_* kernels keep in flight (register slots): 1 or 2 (an
// experiment knob: DS4_NVRTC_OPTIONS="-DMG_PIPE_DEPTH=1", engines/cuda/compile.py). ptxas -v (CUDA 13.0), sm_90a,
// registers of gate_up / down: depth 2: IQ2_XXS 222 / 222, Q2_K 255 / 255, Q4_K 240 / 240, Q8_0 230 / 232, Q8_0R
// 236 / 238; depth 1: 210 / 212, 252 / 254, 216 / 218, 214 / 216, 218 / 220; no spills, no stack frame (sm_121a
// within 4 of those); one CTA per SM either way, as the plain kernels.
#ifndef MG_PIPE_DEPTH
#define MG_PIPE_DEPTH 2
#endif
static_assert(MG_PIPE_DEPTH == 1 || MG_PIPE_DEPTH == 2, "MG_PIPE_DEPTH must be 1 or 2");

__device__ __forceinline__ void st8(u16* dst, float v0, float v1, float v2, float v3, float v4, float v5, float v6,
                                    float v7) {
    *reinterpret_cast<uint4*>(dst) =
        make_uint4(pack_f16x2(v0, v1), pack_f16x2(v2, v3), pack_f16x2(v4, v5), pack_f16x2(v6, v7));
}

// 4 bytes (4 x 2 bits or 4 x 4 bits already masked) of v -> 8 codes' worth: 4 exact fp16 of bytes of v0, then v1
__device__ __forceinline__ void st8_bytes(u16* dst, u32 v0, u32 v1) {
    st8(dst, byte_f32(v0, 0), byte_f32(v0, 1), byte_f32(v0, 2), byte_f32(v0, 3), byte_f32(v1, 0), byte_f32(v1, 1),
        byte_f32(v1, 2), byte_f32(v1, 3));
}

// 16 int8 (4 words) -> 16 exact fp16 at dst
__device__ __forceinline__ void st16_s8(u16* dst, u32 w0, u32 w1, u32 w2, u32 w3) {
    w0 ^= 0x80808080u; w1 ^= 0x80808080u; w2 ^= 0x80808080u; w3 ^= 0x80808080u;
    *reinterpret_cast<uint4*>(dst) = make_uint4(s8x2_to_f16x2(w0, 0x4140u), s8x2_to_f16x2(w0, 0x4342u),
                                                s8x2_to_f16x2(w1, 0x4140u), s8x2_to_f16x2(w1, 0x4342u));
    *reinterpret_cast<uint4*>(dst + 8) = make_uint4(s8x2_to_f16x2(w2, 0x4140u), s8x2_to_f16x2(w2, 0x4342u),
                                                    s8x2_to_f16x2(w3, 0x4140u), s8x2_to_f16x2(w3, 0x4342u));
}

__device__ __forceinline__ float mg_silu(float g) { return g / (1.f + expf(-g)); }

// ---- tile decoders: columns [k0, k0 + 32) of one weight row (k0 % 32 == 0) -> codes dst[0 .. 32) (exact fp16) and
// the scale a[j] / min m[j] of the 32 / SB sub-blocks (w = a * code - m; header). row(matrix, r, stride, cols) locates
// row r of one matrix: GGUF rows are `stride` bytes apart; Q8_0R (q8_0r.cuh planes) takes stride = slab rows.
// Loads: 2-byte aligned for Q8_0 (34-byte blocks) and IQ2_XXS (66), 4-byte aligned for Q2_K (84) and Q4_K (144).
struct MgGgufRow {
    typedef const u8* Row;
    static __device__ __forceinline__ Row row(const u8* m, int r, long long stride, int) {
        return m + (size_t)r * stride;
    }
};

struct MgQ8_0 : MgGgufRow {  // 34-byte blocks: f16 d | int8 q[32]
    static constexpr int QK = 32, SB = 32;
    static constexpr bool GRID = false, MIN = false;
    struct Raw {
        u16 d;
        u32 q[8];
    };
    static __device__ __forceinline__ void load(const u8* row, int k0, Raw& r) {
        const u8* blk = row + (size_t)(k0 >> 5) * 34;
        r.d = ld_u16(blk);
#pragma unroll
        for (int w = 0; w < 8; ++w) r.q[w] = ld_u32_a2(blk + 2 + 4 * w);
    }
    static __device__ __forceinline__ void decode(const Raw& r, int, const u64*, u16* dst, float* a, float*) {
        a[0] = f16_to_f32(r.d);
        st16_s8(dst, r.q[0], r.q[1], r.q[2], r.q[3]);
        st16_s8(dst + 16, r.q[4], r.q[5], r.q[6], r.q[7]);
    }
};

struct MgQ8_0R {  // Q8_0 repacked into planes (q8_0r.cuh): the row's int8 qs contiguous, its f16 scales apart
    static constexpr int QK = 32, SB = 32;
    static constexpr bool GRID = false, MIN = false;
    typedef Q8RRow Row;
    static __device__ __forceinline__ Row row(const u8* m, int r, long long slab_rows, int cols) {
        return q8r_row(m, r, cols >> 5, (int)slab_rows);
    }
    struct Raw {
        u16 d;
        uint4 q0, q1;
    };
    static __device__ __forceinline__ void load(const Row& row, int k0, Raw& r) {
        r.d = row.d[k0 >> 5];
        r.q0 = row.qs[k0 >> 4];
        r.q1 = row.qs[(k0 >> 4) + 1];
    }
    static __device__ __forceinline__ void decode(const Raw& r, int, const u64*, u16* dst, float* a, float*) {
        a[0] = f16_to_f32(r.d);
        st16_s8(dst, r.q0.x, r.q0.y, r.q0.z, r.q0.w);
        st16_s8(dst + 16, r.q1.x, r.q1.y, r.q1.z, r.q1.w);
    }
};

// u8 scales[16] | u8 qs[64] | f16 d | f16 dmin; element 128h + 32s + l = (qs[32h + l] >> 2s) & 3, sub-block of 16
// (element / 16 = 8h + 2s + l / 16) with scale byte scales[8h + 2s + l / 16]: a = d (sc & 15), m = dmin (sc >> 4)
struct MgQ2_K : MgGgufRow {
    static constexpr int QK = 256, SB = 16;
    static constexpr bool GRID = false, MIN = true;
    struct Raw {
        u32 dm, sc2, q[8];
    };
    static __device__ __forceinline__ void load(const u8* row, int k0, Raw& r) {
        const u8* blk = row + (size_t)(k0 >> 8) * 84;
        const int j = (k0 >> 5) & 7, h = j >> 2;  // columns = elements 128h + 32s + l, s = j & 3
        r.dm = ld_u32(blk + 80);
        r.sc2 = ld_u16(blk + 2 * j);  // scale bytes 8h + 2s, 8h + 2s + 1 (= 2j, 2j + 1)
#pragma unroll
        for (int w = 0; w < 8; ++w) r.q[w] = ld_u32(blk + 16 + 32 * h + 4 * w);  // qs words: l = 4w .. 4w + 3
    }
    static __device__ __forceinline__ void decode(const Raw& r, int k0, const u64*, u16* dst, float* a, float* m) {
        const int sh = 2 * ((k0 >> 5) & 3);
        const float d = f16_to_f32((u16)r.dm), dmin = f16_to_f32((u16)(r.dm >> 16));
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const u32 sc = (r.sc2 >> (8 * half)) & 0xFFu;
            a[half] = d * small_f32(sc & 15u);
            m[half] = dmin * small_f32(sc >> 4);
        }
#pragma unroll
        for (int w = 0; w < 8; w += 2)
            st8_bytes(dst + 4 * w, (r.q[w] >> sh) & 0x03030303u, (r.q[w + 1] >> sh) & 0x03030303u);
    }
};

// f16 d | f16 dmin | u8 scales[12] | u8 qs[128]; element 64i + 32hi + l = (qs[32i + l] >> 4hi) & 15, sub-block 2i + hi
struct MgQ4_K : MgGgufRow {
    static constexpr int QK = 256, SB = 32;
    static constexpr bool GRID = false, MIN = true;
    struct Raw {
        u32 dm, sb, q[8];  // sb: scale bytes j % 4, j % 4 + 4, j % 4 + 8 in bytes 0, 1, 2 (all q4_k_scale_min reads)
    };
    static __device__ __forceinline__ void load(const u8* row, int k0, Raw& r) {
        const u8* blk = row + (size_t)(k0 >> 8) * 144;
        const int j = (k0 >> 5) & 7, i = j >> 1;
        r.dm = ld_u32(blk);
        const u8* s = blk + 4 + (j & 3);
        r.sb = (u32)s[0] | ((u32)s[4] << 8) | ((u32)s[8] << 16);
#pragma unroll
        for (int w = 0; w < 8; ++w) r.q[w] = ld_u32(blk + 16 + 32 * i + 4 * w);
    }
    static __device__ __forceinline__ void decode(const Raw& r, int k0, const u64*, u16* dst, float* a, float* m) {
        const int j = (k0 >> 5) & 7, sh = 4 * (j & 1);
        // q4_k_scale_min(scales, j) on the three bytes: s[j], s[j + 4] (j < 4); s[j - 4], s[j], s[j + 4] (j >= 4)
        const u32 b0 = r.sb & 0xFFu, b1 = (r.sb >> 8) & 0xFFu, b2 = r.sb >> 16;
        const u32 sc = j < 4 ? (b0 & 63u) : ((b2 & 15u) | ((b0 >> 6) << 4));
        const u32 mn = j < 4 ? (b1 & 63u) : ((b2 >> 4) | ((b1 >> 6) << 4));
        a[0] = f16_to_f32((u16)r.dm) * small_f32(sc);
        m[0] = f16_to_f32((u16)(r.dm >> 16)) * small_f32(mn);
#pragma unroll
        for (int w = 0; w < 8; w += 2)
            st8_bytes(dst + 4 * w, (r.q[w] >> sh) & 0x0F0F0F0Fu, (r.q[w + 1] >> sh) & 0x0F0F0F0Fu);
    }
};

// f16 d | 8 x (u32 aux0: 4 grid indices, u32 aux1: 4 x 7-bit sign indices + 4-bit scale); sub-block ib = 32 elements
struct MgIQ2_XXS : MgGgufRow {
    static constexpr int QK = 256, SB = 32;
    static constexpr bool GRID = true, MIN = false;
    static __device__ __forceinline__ float sgn(float v, u32 s8, int k) {
        return __uint_as_float(__float_as_uint(v) ^ (((s8 >> k) & 1u) << 31));
    }
    struct Raw {
        u16 d;
        u32 aux0, aux1;
    };
    static __device__ __forceinline__ void load(const u8* row, int k0, Raw& r) {
        const u8* blk = row + (size_t)(k0 >> 8) * 66;
        const u8* sb = blk + 2 + 8 * ((k0 >> 5) & 7);
        r.d = ld_u16(blk);
        r.aux0 = ld_u32_a2(sb);
        r.aux1 = ld_u32_a2(sb + 4);
    }
    static __device__ __forceinline__ void decode(const Raw& r, int, const u64* grid, u16* dst, float* a, float*) {
        a[0] = __fmul_rn(__fmul_rn(f16_to_f32(r.d), 0.5f + small_f32(r.aux1 >> 28)), 0.25f);
#pragma unroll
        for (int l = 0; l < 4; ++l) {
            const u64 g = grid[(r.aux0 >> (8 * l)) & 0xFFu];
            const u32 glo = (u32)g, ghi = (u32)(g >> 32);
            const u32 s8 = iq2_signs((r.aux1 >> (7 * l)) & 127u);
            st8(dst + 8 * l, sgn(byte_f32(glo, 0), s8, 0), sgn(byte_f32(glo, 1), s8, 1), sgn(byte_f32(glo, 2), s8, 2),
                sgn(byte_f32(glo, 3), s8, 3), sgn(byte_f32(ghi, 0), s8, 4), sgn(byte_f32(ghi, 1), s8, 5),
                sgn(byte_f32(ghi, 2), s8, 6), sgn(byte_f32(ghi, 3), s8, 7));
        }
    }
};

// ---- the grouped GEMM --------------------------------------------------------------------------------------------
// One k-step's shared tile: codes, activations hi / lo, per sub-block scale and min of each row, per token scale s
// and sub-block sums SX. mg_gemm holds one; mg_gemm_pipe two (double buffer, in dynamic shared memory).
template <class DEC>
struct MgTile {
    static constexpr int NSB = MG_BK / DEC::SB;        // sub-blocks per k-step (1 or 2)
    static constexpr int NSBM = DEC::MIN ? NSB : 1;
    u16 A[MG_BM * MG_LD];   // codes
    u16 Xh[MG_BN * MG_LD];  // activations / s: hi
    u16 Xl[MG_BN * MG_LD];  // and lo
    float a[NSB][MG_BM], m[NSBM][MG_BM];  // per sub-block: scale, min of each row
    float s[MG_BN], sx[NSBM][MG_BN];      // per token: scale s, sub-block sums SX
};

// The CTA's tile: expert e, n pairs (s_pair, -1 past n), first row r0; the IQ2_XXS grid into s_grid; bad-id bucket:
// NaN rows written here. false: nothing (more) to do.
template <class DEC, bool GATE_UP>
__device__ __forceinline__ bool mg_begin(const int* tiles, const int* n_tiles, const int* sorted, int n_expert,
                                         int n_pairs, float* out, int rows, int* s_pair, u64* s_grid, int& e, int& r0) {
    const int tid = threadIdx.x;
    int first, n;
    if (tiles != nullptr) {
        if ((int)blockIdx.y >= *n_tiles) return false;
        e = tiles[3 * blockIdx.y];
        first = tiles[3 * blockIdx.y + 1];
        n = tiles[3 * blockIdx.y + 2];
    } else {
        e = 0;
        first = (int)blockIdx.y * MG_BN;
        n = min(MG_BN, n_pairs - first);
        if (n <= 0) return false;
    }
    const int cta_rows = GATE_UP ? MG_BM / 2 : MG_BM;
    r0 = (int)blockIdx.x * cta_rows;
    if (tid < MG_BN) s_pair[tid] = tid < n ? (sorted != nullptr ? sorted[first + tid] : first + tid) : -1;
    if (DEC::GRID)
        for (int i = tid; i < 256; i += blockDim.x) s_grid[i] = IQ2XXS_GRID[i];
    __syncthreads();

    if (e < 0 || e >= n_expert) {  // bad-id bucket: NaN rows, no weight read (e is uniform over the CTA)
        const int nr = min(cta_rows, rows - r0);
        for (int idx = tid; idx < n * nr; idx += blockDim.x)
            out[(size_t)s_pair[idx / nr] * rows + r0 + idx % nr] = __int_as_float(0x7fc00000);
        return false;
    }
    return true;
}

// the 8 activations of this thread (token slot tid / 4, columns k0 + 8 (tid % 4) ..) or zeros past the tile
__device__ __forceinline__ void mg_load_x(const float* brow, int k0, float* x) {
    if (brow != nullptr) {
        const float4 x0 = ld_x4(brow + k0), x1 = ld_x4(brow + k0 + 4);
        x[0] = x0.x; x[1] = x0.y; x[2] = x0.z; x[3] = x0.w; x[4] = x1.x; x[5] = x1.y; x[6] = x1.z; x[7] = x1.w;
    } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) x[i] = 0.f;
    }
}

// weights: codes and sub-block scales of row tid (decoded from raw), or zeros past the matrix
template <class DEC>
__device__ __forceinline__ void mg_store_w(MgTile<DEC>& T, bool a_ok, const typename DEC::Raw& raw, int k0,
                                           const u64* s_grid) {
    constexpr int NSB = MgTile<DEC>::NSB;
    const int tid = threadIdx.x;
    u16* a_dst = T.A + tid * MG_LD;
    if (a_ok) {
        float a[NSB], m[NSB];
        DEC::decode(raw, k0, s_grid, a_dst, a, m);
#pragma unroll
        for (int j = 0; j < NSB; ++j) {
            T.a[j][tid] = a[j];
            if (DEC::MIN) T.m[DEC::MIN ? j : 0][tid] = m[j];
        }
    } else {
#pragma unroll
        for (int c = 0; c < MG_BK; c += 8) *reinterpret_cast<uint4*>(a_dst + c) = make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
        for (int j = 0; j < NSB; ++j) {
            T.a[j][tid] = 0.f;
            if (DEC::MIN) T.m[DEC::MIN ? j : 0][tid] = 0.f;
        }
    }
}

// activations: the 4 threads of a token agree on s (max over its 32 columns), each splits its 8 floats
template <class DEC>
__device__ __forceinline__ void mg_store_x(MgTile<DEC>& T, const float* x) {
    constexpr int NSB = MgTile<DEC>::NSB;
    const int tid = threadIdx.x, bt = tid >> 2, bq = tid & 3, b_off = bt * MG_LD + 8 * bq;
    float amax = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) amax = fmaxf(amax, fabsf(x[i]));
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 2));
    const int ex = mma_split_exp(amax);
    const float inv = mma_split_inv(ex);
    {
        float vh[8], vl[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) mma_split(x[i] * inv, vh[i], vl[i]);
        st8(T.Xh + b_off, vh[0], vh[1], vh[2], vh[3], vh[4], vh[5], vh[6], vh[7]);
        st8(T.Xl + b_off, vl[0], vl[1], vl[2], vl[3], vl[4], vl[5], vl[6], vl[7]);
    }
    if (bq == 0) T.s[bt] = mma_split_scale(ex);
    if (DEC::MIN) {  // SX: float32 sum of the sub-block's activations (8 per thread, then across threads)
        float sx = ((x[0] + x[1]) + (x[2] + x[3])) + ((x[4] + x[5]) + (x[6] + x[7]));
        sx += __shfl_xor_sync(0xffffffffu, sx, 1);
        if (NSB == 1) sx += __shfl_xor_sync(0xffffffffu, sx, 2);
        if ((bq & (NSB == 1 ? 3 : 1)) == 0) T.sx[DEC::MIN ? (NSB == 1 ? 0 : bq >> 1) : 0][bt] = sx;
    }
}

// the k-step's mma and float32 folds into acc from tile T (a_addr, bh_addr, bl_addr: this lane's ldmatrix addresses
// in T.A, T.Xh, T.Xl)
template <class DEC>
__device__ __forceinline__ void mg_mma(const MgTile<DEC>& T, u32 a_addr, u32 bh_addr, u32 bl_addr,
                                       float (&acc)[4][4][4]) {
    constexpr int NSB = MgTile<DEC>::NSB;
    constexpr int KS = DEC::SB / 16;  // m16n8k16 steps per sub-block (2 or 1)
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, wm = warp & 3, wn = warp >> 2;
#pragma unroll
    for (int j = 0; j < NSB; ++j) {
        u32 bh[KS][4][2], bl[KS][4][2];  // [k16 step][n8 tile][reg]
#pragma unroll
        for (int ks = 0; ks < KS; ++ks) {
            const u32 kk = 2u * (u32)(j * DEC::SB + 16 * ks);
#pragma unroll
            for (int np = 0; np < 2; ++np) {
                u32 r[4];
                ldsm_x4(r, bh_addr + 2u * (u32)(np * 16 * MG_LD) + kk);
                bh[ks][2 * np][0] = r[0]; bh[ks][2 * np][1] = r[1];
                bh[ks][2 * np + 1][0] = r[2]; bh[ks][2 * np + 1][1] = r[3];
                ldsm_x4(r, bl_addr + 2u * (u32)(np * 16 * MG_LD) + kk);
                bl[ks][2 * np][0] = r[0]; bl[ks][2 * np][1] = r[1];
                bl[ks][2 * np + 1][0] = r[2]; bl[ks][2 * np + 1][1] = r[3];
            }
        }
#pragma unroll
        for (int mt = 0; mt < 4; ++mt) {
            const int ra = (mt >> 1) * 128 + wm * 32 + (mt & 1) * 16 + (lane >> 2);  // rows ra, ra + 8
            u32 af[KS][4];
#pragma unroll
            for (int ks = 0; ks < KS; ++ks)
                ldsm_x4(af[ks], a_addr + 2u * (u32)(((mt >> 1) * 128 + (mt & 1) * 16) * MG_LD + j * DEC::SB +
                                                    16 * ks));
            const float a0 = T.a[j][ra], a1 = T.a[j][ra + 8];
#pragma unroll
            for (int nt = 0; nt < 4; ++nt) {
                const int tk = wn * 32 + nt * 8 + 2 * (lane & 3);  // tokens tk, tk + 1
                float p[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
                for (int ks = 0; ks < KS; ++ks) {
                    mma_16816(p, af[ks], bh[ks][nt][0], bh[ks][nt][1]);
                    mma_16816(p, af[ks], bl[ks][nt][0], bl[ks][nt][1]);
                }
                const float s0 = T.s[tk], s1 = T.s[tk + 1];
                acc[mt][nt][0] = fmaf(a0 * s0, p[0], acc[mt][nt][0]);
                acc[mt][nt][1] = fmaf(a0 * s1, p[1], acc[mt][nt][1]);
                acc[mt][nt][2] = fmaf(a1 * s0, p[2], acc[mt][nt][2]);
                acc[mt][nt][3] = fmaf(a1 * s1, p[3], acc[mt][nt][3]);
                if (DEC::MIN) {
                    const int jm = DEC::MIN ? j : 0;
                    const float m0 = T.m[jm][ra], m1 = T.m[jm][ra + 8];
                    const float x0 = T.sx[jm][tk], x1 = T.sx[jm][tk + 1];
                    acc[mt][nt][0] = fmaf(-m0, x0, acc[mt][nt][0]);
                    acc[mt][nt][1] = fmaf(-m0, x1, acc[mt][nt][1]);
                    acc[mt][nt][2] = fmaf(-m1, x0, acc[mt][nt][2]);
                    acc[mt][nt][3] = fmaf(-m1, x1, acc[mt][nt][3]);
                }
            }
        }
    }
}

// epilogue: acc[mt][nt][q] = row (mt >> 1) * 128 + 32 wm + 16 (mt & 1) + lane / 4 + 8 (q >> 1) of the CTA,
// token slot 32 wn + 8 nt + 2 (lane % 4) + (q & 1)
template <bool GATE_UP>
__device__ __forceinline__ void mg_epilogue(const float (&acc)[4][4][4], int r0, const int* s_pair,
                                            const float* weights, float* out, int rows, float clamp, int accumulate) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, wm = warp & 3, wn = warp >> 2;
    if (GATE_UP) {
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
#pragma unroll
            for (int nt = 0; nt < 4; ++nt)
#pragma unroll
                for (int q = 0; q < 4; ++q) {
                    const int f = r0 + wm * 32 + mt * 16 + (lane >> 2) + 8 * (q >> 1);
                    const int p = s_pair[wn * 32 + nt * 8 + 2 * (lane & 3) + (q & 1)];
                    if (p < 0 || f >= rows) continue;
                    const float g = fminf(acc[mt][nt][q], clamp);
                    const float u = fminf(fmaxf(acc[mt + 2][nt][q], -clamp), clamp);
                    const float w = weights != nullptr ? weights[p] : 1.f;
                    out[(size_t)p * rows + f] = mg_silu(g) * u * w;
                }
    } else {
#pragma unroll
        for (int mt = 0; mt < 4; ++mt)
#pragma unroll
            for (int nt = 0; nt < 4; ++nt)
#pragma unroll
                for (int q = 0; q < 4; ++q) {
                    const int d = r0 + (mt >> 1) * 128 + wm * 32 + (mt & 1) * 16 + (lane >> 2) + 8 * (q >> 1);
                    const int p = s_pair[wn * 32 + nt * 8 + 2 * (lane & 3) + (q & 1)];
                    if (p < 0 || d >= rows) continue;
                    float* y = out + (size_t)p * rows + d;
                    *y = accumulate ? *y + acc[mt][nt][q] : acc[mt][nt][q];
                }
    }
}

// GATE_UP: A0 = gate, A1 = up, Xin = X [n, cols] (token p / k), epilogue SwiGLU into out = mid [n_pairs, rows].
// !GATE_UP: A0 = down, Xin = mid [n_pairs, cols] (row p), epilogue out[p, d] (+)= acc.
// PIPE false (the moe_grouped_* kernels): one shared tile; per k-step: load, decode + split into the tile,
// __syncthreads, mma, __syncthreads. PIPE true (moe_grouped_pipe_*): two tiles in dynamic shared memory
// (MgTile<DEC> x 2, the launcher's byte count); the raw weight bytes and activations of k-step i + MG_PIPE_DEPTH are
// loaded into register slot i % MG_PIPE_DEPTH right after step i's are decoded from it into tile i % 2, so those
// global loads are in flight during the __syncthreads and the mma of step i (and of i + 1 at depth 2); one
// __syncthreads per k-step: writing tile i % 2 at step i follows step i - 1's barrier, which every thread reaches
// after its mma of step i - 2 on that tile. Same decode, split, mma and folds in the same order: bit-identical.
template <class DEC, bool GATE_UP, bool PIPE>
__device__ __forceinline__ void mg_gemm(const u8* A0, const u8* A1, long long expert_stride, long long row_stride,
                                        const int* tiles, const int* n_tiles, const int* sorted,
                                        const float* weights, int k, int n_expert, int n_pairs, const float* Xin,
                                        int cols, float* out, int rows, float clamp, int accumulate) {
    __shared__ int s_pair[MG_BN];
    __shared__ u64 s_grid[DEC::GRID ? 256 : 1];
    extern __shared__ __align__(16) u8 mg_dyn[];
    __shared__ __align__(16) MgTile<DEC> s_tile[PIPE ? 1 : 1];
    MgTile<DEC>* tile = PIPE ? reinterpret_cast<MgTile<DEC>*>(mg_dyn) : s_tile;
    if (PIPE) {  // the launcher's dynamic shared memory must hold both tiles
        u32 dyn;
        asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dyn));
        if (dyn < 2u * (u32)sizeof(MgTile<DEC>)) __trap();
    }

    int e, r0;
    if (!mg_begin<DEC, GATE_UP>(tiles, n_tiles, sorted, n_expert, n_pairs, out, rows, s_pair, s_grid, e, r0)) return;

    // this thread's weight row (decoded into shared row tid) and activation slice (token tid / 4, 8 columns)
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, wm = warp & 3, wn = warp >> 2;
    const int ar = GATE_UP ? r0 + (tid & 127) : r0 + tid;
    const bool a_ok = ar < rows;
    const typename DEC::Row arow =
        DEC::row(((GATE_UP && tid >= 128) ? A1 : A0) + (size_t)e * expert_stride, a_ok ? ar : 0, row_stride, cols);
    const int bt = tid >> 2, bq = tid & 3;
    const int bp = s_pair[bt];
    const float* brow = bp >= 0 ? Xin + (size_t)(GATE_UP ? bp / k : bp) * cols + 8 * bq : nullptr;

    // ldmatrix lane addresses: A x4 = (rows 0-7 | 8-15) x (k 0-7 | 8-15) -> a0..a3; B x4 = two n8 tiles x (k 0-7 | 8-15)
    const u32 a_lane = 2u * (u32)((wm * 32 + (lane & 15)) * MG_LD + (lane >> 4) * 8);
    const u32 b_lane = 2u * (u32)((wn * 32 + ((lane >> 4) << 3) + (lane & 7)) * MG_LD + ((lane >> 3) & 1) * 8);

    float acc[4][4][4];
#pragma unroll
    for (int mt = 0; mt < 4; ++mt)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt)
#pragma unroll
            for (int q = 0; q < 4; ++q) acc[mt][nt][q] = 0.f;

    if (!PIPE) {
        typename DEC::Raw raw;
        float x[8];
        for (int k0 = 0; k0 < cols; k0 += MG_BK) {
            MgTile<DEC>& T = tile[0];
            if (a_ok) DEC::load(arow, k0, raw);
            mg_store_w<DEC>(T, a_ok, raw, k0, s_grid);
            mg_load_x(brow, k0, x);
            mg_store_x<DEC>(T, x);
            __syncthreads();
            mg_mma<DEC>(T, smem_u32(T.A) + a_lane, smem_u32(T.Xh) + b_lane, smem_u32(T.Xl) + b_lane, acc);
            __syncthreads();
        }
    } else {
        // register slots of the raw weight bytes and activations of the next MG_PIPE_DEPTH k-steps; k-steps two at a
        // time so that tile (step % 2) and slot (step % MG_PIPE_DEPTH) are compile-time indices (registers)
        typename DEC::Raw raw[MG_PIPE_DEPTH];
        float x[MG_PIPE_DEPTH][8];
#pragma unroll
        for (int s = 0; s < MG_PIPE_DEPTH; ++s)
            if (s * MG_BK < cols) {
                if (a_ok) DEC::load(arow, s * MG_BK, raw[s]);
                mg_load_x(brow, s * MG_BK, x[s]);
            }
        for (int k0 = 0; k0 < cols; k0 += 2 * MG_BK) {
#pragma unroll
            for (int s = 0; s < 2; ++s) {
                const int kk = k0 + s * MG_BK, slot = s % MG_PIPE_DEPTH;
                if (kk >= cols) break;  // uniform: an odd number of k-steps
                MgTile<DEC>& T = tile[s];
                mg_store_w<DEC>(T, a_ok, raw[slot], kk, s_grid);
                mg_store_x<DEC>(T, x[slot]);
                const int kn = kk + MG_PIPE_DEPTH * MG_BK;  // its global loads in flight during the next mma(s)
                if (kn < cols) {
                    if (a_ok) DEC::load(arow, kn, raw[slot]);
                    mg_load_x(brow, kn, x[slot]);
                }
                __syncthreads();
                mg_mma<DEC>(T, smem_u32(T.A) + a_lane, smem_u32(T.Xh) + b_lane, smem_u32(T.Xl) + b_lane, acc);
            }
        }
    }
    mg_epilogue<GATE_UP>(acc, r0, s_pair, weights, out, rows, clamp, accumulate);
}

// the pipelined kernels' dynamic shared memory, 2 * sizeof(MgTile<DEC>): moe_grouped.pipe_smem_bytes(type) gives the
// launch the same numbers (tests/test_moe_grouped_pipe_smem.py reads these lines)
#define MG_PIPE_SMEM(DEC, bytes) static_assert(2 * sizeof(MgTile<DEC>) == (bytes), "pipe_smem_bytes of " #DEC)
MG_PIPE_SMEM(MgQ8_0, 66560);
MG_PIPE_SMEM(MgQ2_K, 71168);
MG_PIPE_SMEM(MgQ4_K, 66560);
MG_PIPE_SMEM(MgIQ2_XXS, 66560);
MG_PIPE_SMEM(MgQ8_0R, 66560);

#define DS4_MOE_GROUPED_KERNELS(prefix, suffix, DEC, PIPE)                                                         \
    extern "C" __global__ void __launch_bounds__(256, 1) prefix##gate_up_##suffix(                                 \
        const u8* gate, const u8* up, long long expert_stride, long long row_stride, const int* tiles,             \
        const int* n_tiles, const int* sorted, const float* weights, int k, int n_expert, int n_pairs,             \
        const float* X, int cols, float* mid, int ff, float clamp) {                                               \
        DS4_PDL_ENTRY();                                                                                           \
        mg_gemm<DEC, true, PIPE>(gate, up, expert_stride, row_stride, tiles, n_tiles, sorted, weights, k,          \
                                 n_expert, n_pairs, X, cols, mid, ff, clamp, 0);                                   \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(256, 1) prefix##down_##suffix(                                    \
        const u8* down, long long expert_stride, long long row_stride, const int* tiles, const int* n_tiles,       \
        const int* sorted, int n_expert, int n_pairs, const float* mid, int cols, float* out, int rows,            \
        int accumulate) {                                                                                          \
        DS4_PDL_ENTRY();                                                                                           \
        mg_gemm<DEC, false, PIPE>(down, nullptr, expert_stride, row_stride, tiles, n_tiles, sorted, nullptr, 1,    \
                                  n_expert, n_pairs, mid, cols, out, rows, 0.f, accumulate);                       \
    }
#define DS4_MOE_GROUPED(suffix, DEC)                                                                               \
    DS4_MOE_GROUPED_KERNELS(moe_grouped_, suffix, DEC, false)                                                      \
    DS4_MOE_GROUPED_KERNELS(moe_grouped_pipe_, suffix, DEC, true)

DS4_MOE_GROUPED(q8_0, MgQ8_0)
DS4_MOE_GROUPED(q2_k, MgQ2_K)
DS4_MOE_GROUPED(q4_k, MgQ4_K)
DS4_MOE_GROUPED(iq2_xxs, MgIQ2_XXS)
DS4_MOE_GROUPED(q8_0r, MgQ8_0R)

// ---- routing: stable counting sort of the pairs by expert, tile table ----------------------------------------------
__device__ __forceinline__ int mg_bucket(int e, int n_expert) { return (e >= 0 && e < n_expert) ? e : n_expert; }

extern "C" __global__ void __launch_bounds__(MG_RT_WARPS * 32) moe_grouped_route(
    const int* ids, int n_pairs, int n_expert, int tile_n, int* offsets, int* sorted, int* tiles, int* n_tiles) {
    DS4_PDL_ENTRY();
    __shared__ int cnt[MG_RT_WARPS][MG_MAX_EXPERT + 1];  // per warp segment and bucket: count, then next position
    __shared__ int s_tot[MG_MAX_EXPERT + 1], s_base[MG_MAX_EXPERT + 1], s_tbase[MG_MAX_EXPERT + 1];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int nb = n_expert + 1;
    const int seg = (n_pairs + MG_RT_WARPS - 1) / MG_RT_WARPS;
    const int s_begin = min(warp * seg, n_pairs), s_end = min(s_begin + seg, n_pairs);

    for (int i = tid; i < MG_RT_WARPS * nb; i += blockDim.x) cnt[i / nb][i % nb] = 0;
    __syncthreads();
    for (int i = s_begin + lane; i < s_end; i += 32) atomicAdd(&cnt[warp][mg_bucket(ids[i], n_expert)], 1);
    __syncthreads();
    // per bucket: total, and each warp segment's start relative to the bucket
    for (int b = tid; b < nb; b += blockDim.x) {
        int run = 0;
        for (int w = 0; w < MG_RT_WARPS; ++w) {
            const int c = cnt[w][b];
            cnt[w][b] = run;
            run += c;
        }
        s_tot[b] = run;
    }
    __syncthreads();
    // exclusive scans over the buckets of the pair counts and the tile counts (warp 0, 32 buckets a step)
    if (warp == 0) {
        int carry = 0, tcarry = 0;
        for (int b0 = 0; b0 < nb; b0 += 32) {
            const int b = b0 + lane;
            const int c = b < nb ? s_tot[b] : 0;
            const int tc = (c + tile_n - 1) / tile_n;
            int inc = c, tinc = tc;
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                const int v = __shfl_up_sync(0xffffffffu, inc, o), tv = __shfl_up_sync(0xffffffffu, tinc, o);
                if (lane >= o) {
                    inc += v;
                    tinc += tv;
                }
            }
            if (b < nb) {
                s_base[b] = carry + inc - c;
                s_tbase[b] = tcarry + tinc - tc;
            }
            carry += __shfl_sync(0xffffffffu, inc, 31);
            tcarry += __shfl_sync(0xffffffffu, tinc, 31);
        }
        if (lane == 0) *n_tiles = tcarry;
    }
    __syncthreads();
    for (int b = tid; b < nb; b += blockDim.x) offsets[b] = s_base[b];
    if (tid == 0) offsets[nb] = n_pairs;
    for (int i = tid; i < MG_RT_WARPS * nb; i += blockDim.x) cnt[i / nb][i % nb] += s_base[i % nb];
    __syncthreads();
    // scatter: each warp walks its segment in order, 32 pairs a step; equal buckets in a step ranked by lane
    const u32 lt = (1u << lane) - 1u;
    for (int c0 = s_begin; c0 < s_end; c0 += 32) {
        const int i = c0 + lane;
        const bool valid = i < s_end;
        const int b = valid ? mg_bucket(ids[i], n_expert) : -1;
        const u32 same = __match_any_sync(0xffffffffu, b);
        if (valid) sorted[cnt[warp][b] + __popc(same & lt)] = i;
        __syncwarp();
        if (valid && (same & lt) == 0u) cnt[warp][b] += __popc(same);
        __syncwarp();
    }
    // tile table
    for (int b = tid; b < nb; b += blockDim.x) {
        const int c = s_tot[b];
        for (int q = 0; q * tile_n < c; ++q) {
            int* t = tiles + 3 * (s_tbase[b] + q);
            t[0] = b;
            t[1] = s_base[b] + q * tile_n;
            t[2] = min(tile_n, c - q * tile_n);
        }
    }
}

// ---- the k slots of a token, in order --------------------------------------------------------------------------------
extern "C" __global__ void moe_grouped_sum(const float* Yp, int k, float* Y, int n, int D) {
    DS4_PDL_ENTRY();
    const long long total = (long long)n * (D / 4);
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const long long t = i / (D / 4), c = i % (D / 4);
        const float4* src = reinterpret_cast<const float4*>(Yp + (size_t)t * k * D) + c;
        float4 s = src[0];
        for (int j = 1; j < k; ++j) {
            const float4 v = src[(size_t)j * (D / 4)];
            s.x = __fadd_rn(s.x, v.x);
            s.y = __fadd_rn(s.y, v.y);
            s.z = __fadd_rn(s.z, v.z);
            s.w = __fadd_rn(s.w, v.w);
        }
        reinterpret_cast<float4*>(Y)[i] = s;
    }
}
