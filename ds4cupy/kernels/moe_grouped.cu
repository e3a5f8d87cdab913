// moe_grouped.cu: the routed (and shared) expert FFN of a prefill chunk (model.md §2.8) as grouped GEMMs on tensor
// cores: (token, expert) pairs sorted by expert on the device, then per expert the tokens routed to it times its
// matrices, so each expert's weights are read once per (row tile, token tile) of the chunk instead of once per pair
// (moe.cu, the decode kernels, reads them once per pair).
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
//   Reference: moe_gate_up_<type> of moe.cu (float32), within the fp16 tolerance below.
// moe_grouped_down_<type>(down, expert_stride, row_stride, tiles, n_tiles, sorted, n_expert, n_pairs, mid, cols,
//                         out, rows, accumulate)
//   down: uint8 [n_expert, rows, row_stride] (rows = D outputs of cols = ff inputs); mid as above;
//   out: float32 [n_pairs, rows]:  out[p, d] (+)= down[e][d] . mid[p]   (NaN in the bad-id bucket)
//   Routed experts write one row per pair (plain stores) and moe_grouped_sum adds the k rows of a token; the shared
//   expert (tiles = sorted = nullptr, out = Y [n, D], accumulate = 1) adds straight onto Y.
//   Launch: 256 threads, grid (ceil(rows / 256), max_tiles) (shared expert: ceil(n / 64)).
//   Reference: moe_down_<type> of moe.cu, within the fp16 tolerance below.
// moe_grouped_sum(Yp, k, Y, n, D)
//   Y[t, d] = ((Yp[t k, d] + Yp[t k + 1, d]) + ...) + Yp[t k + k - 1, d]: slots in order j = 0 .. k-1, so the result
//   does not depend on scheduling (no float atomics anywhere: bit-identical run to run). Any grid; D % 4 == 0.
//
// GEMM tiles. A CTA (8 warps) holds 256 weight rows x 64 tokens: gate/up = 128 rows of gate and the same 128 rows of
// up (so a thread holds g and u of the same (f, token) and the SwiGLU epilogue needs no exchange), down = 256 rows.
// Per k-step of 64 columns: thread tid decodes columns [k0, k0 + 64) of weight row tid (the format's block layout,
// decoders below on quant_blocks.cuh helpers) into fp16 in shared memory, and 4 threads per token convert 64 floats
// of its activation row (X[t] or mid[p], gathered through the sorted pair table) to fp16. Warp (wm = warp & 3,
// wn = warp >> 2) computes rows {32 wm .. +32} of each 128-row half and tokens 32 wn .. +32 with
// mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 (fragments by ldmatrix; shared rows padded to 72 halves so the
// 8 rows of an 8x8 matrix fall in distinct banks): 4 m16 x 4 n8 tiles, 64 fp32 accumulators per thread.
// Portable sm_80+ (sm_90a, sm_100a, sm_120, sm_121a): no wgmma / tcgen05.
//
// Precision: weights and activations are rounded to fp16 (11-bit significand, relative rounding <= 2^-11, rms
// ~2^-11 / sqrt(3) per operand for random mantissas) and multiplied-accumulated in fp32. For a dot product of
// independent rounding errors the error relative to the norm of the result stays ~sqrt(2/3) 2^-11 ~ 4e-4 whatever the
// length (errors and terms both grow like sqrt(n)); gate/up -> SwiGLU -> down compounds it to ~1e-3 at most.
// tests/test_gpu_moe_grouped.py holds the outputs to 3e-3 of a float64 reference (norm-wise).
// fp16 range (max 65504): the gate/up activations are RMS-normalised rows times ffn_norm's weights: |x_i| <=
// sqrt(D) max|w_norm| (64 max|w_norm| at D = 4096); the down activations are clamped SwiGLU outputs times the routing
// weight: |mid| <= clamp^2 * max weight (10^2 * 1.5 on DeepSeek-V4-Flash, 1 for the shared expert). The engine uses
// this path only where both bounds are far below 65504 (engines/cuda/moe_grouped.py, fp16_range_ok); weights decode to
// |w| <= 127 d (Q8_0) or ~ d * 15 * 3 (K-quants) with f16 scales d of trained weights, also far inside the range.
#include "q8_0r.cuh"

#define MG_BN 64          // tokens (pairs) per tile
#define MG_BM 256         // weight rows per CTA (gate/up: 128 + 128)
#define MG_BK 64          // columns per k-step
#define MG_LD 72          // shared row stride in halves (144 bytes: 16-byte aligned, ldmatrix conflict-free)
#define MG_MAX_EXPERT 512 // buckets of moe_grouped_route: experts + the bad-id bucket
#define MG_RT_WARPS 16

// ---- fp16 staging, ldmatrix, mma ---------------------------------------------------------------------------------
__device__ __forceinline__ u32 pack_h2(float lo, float hi) {  // lo -> bits 0..15, hi -> bits 16..31
    u32 r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

__device__ __forceinline__ void st8(u16* dst, float v0, float v1, float v2, float v3, float v4, float v5, float v6,
                                    float v7) {
    *reinterpret_cast<uint4*>(dst) = make_uint4(pack_h2(v0, v1), pack_h2(v2, v3), pack_h2(v4, v5), pack_h2(v6, v7));
}

__device__ __forceinline__ u32 smem_u32(const void* p) {
    u32 r;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(r) : "l"(p));
    return r;
}

__device__ __forceinline__ void ldsm_x4(u32* r, u32 addr) {  // addr: shared-window byte address
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

__device__ __forceinline__ void mma16816(float* c, const u32* a, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ float mg_silu(float g) { return g / (1.f + expf(-g)); }

// ---- tile decoders: columns [k0, k0 + 64) of one weight row (k0 % 64 == 0) -> dst[0 .. 64) as fp16 ----------------
// Values are those of quant_blocks.cuh's BT::value (== gguf dequantize) up to one float32 rounding (an FMA), then
// rounded to fp16 once. row(matrix, r, stride, cols) locates row r of one matrix: GGUF rows are `stride` bytes apart;
// Q8_0R (q8_0r.cuh planes) takes stride = slab rows.
struct MgGgufRow {
    typedef const u8* Row;
    static __device__ __forceinline__ Row row(const u8* m, int r, long long stride, int) {
        return m + (size_t)r * stride;
    }
};
struct MgQ8_0 : MgGgufRow {  // two 34-byte blocks: f16 d | int8 q[32]
    static constexpr int QK = 32;
    static constexpr bool GRID = false;
    static __device__ __forceinline__ void decode64(const u8* row, int k0, const u64*, u16* dst) {
#pragma unroll
        for (int b = 0; b < 2; ++b) {
            const u8* blk = row + (size_t)((k0 >> 5) + b) * 34;
            const float d = f16_to_f32(ld_u16(blk));
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                const u32 w0 = ld_u32_a2(blk + 2 + 8 * q) ^ 0x80808080u, w1 = ld_u32_a2(blk + 6 + 8 * q) ^ 0x80808080u;
                st8(dst + 32 * b + 8 * q, sbyte_f32(w0, 0) * d, sbyte_f32(w0, 1) * d, sbyte_f32(w0, 2) * d,
                    sbyte_f32(w0, 3) * d, sbyte_f32(w1, 0) * d, sbyte_f32(w1, 1) * d, sbyte_f32(w1, 2) * d,
                    sbyte_f32(w1, 3) * d);
            }
        }
    }
};

struct MgQ2_K : MgGgufRow {  // u8 scales[16] | u8 qs[64] | f16 d | f16 dmin; element 128h + 32s + l = (qs[32h + l] >> 2s) & 3
    static constexpr int QK = 256;
    static constexpr bool GRID = false;
    static __device__ __forceinline__ void decode64(const u8* row, int k0, const u64*, u16* dst) {
        const u8* blk = row + (size_t)(k0 >> 8) * 84;
        const int h = (k0 >> 7) & 1, s0 = ((k0 >> 6) & 1) * 2;  // elements 128h + 32s + l, s = s0, s0 + 1
        const u32 dm = ld_u32(blk + 80);
        const float d = f16_to_f32((u16)dm), dmin = f16_to_f32((u16)(dm >> 16));
        const u32 sc4 = ld_u32(blk + 8 * h + 2 * s0);  // scale bytes of sub-blocks 8h + 2s0 .. 8h + 2s0 + 3
#pragma unroll
        for (int half = 0; half < 2; ++half) {  // l in [16 half, 16 half + 16): qs words 4 half .. 4 half + 3
            const uint4 q = *reinterpret_cast<const uint4*>(blk + 16 + 32 * h + 16 * half);
#pragma unroll
            for (int si = 0; si < 2; ++si) {  // s = s0 + si: sub-block 8h + 2s + half
                const int sh = 2 * (s0 + si);
                const u32 sc = (sc4 >> (8 * (2 * si + half))) & 0xFFu;
                const float a = d * small_f32(sc & 15u), m = dmin * small_f32(sc >> 4);
#pragma unroll
                for (int g = 0; g < 2; ++g) {
                    const u32 v0 = ((g ? q.z : q.x) >> sh) & 0x03030303u, v1 = ((g ? q.w : q.y) >> sh) & 0x03030303u;
                    st8(dst + 32 * si + 16 * half + 8 * g, fmaf(a, byte_f32(v0, 0), -m), fmaf(a, byte_f32(v0, 1), -m),
                        fmaf(a, byte_f32(v0, 2), -m), fmaf(a, byte_f32(v0, 3), -m), fmaf(a, byte_f32(v1, 0), -m),
                        fmaf(a, byte_f32(v1, 1), -m), fmaf(a, byte_f32(v1, 2), -m), fmaf(a, byte_f32(v1, 3), -m));
                }
            }
        }
    }
};

struct MgQ4_K : MgGgufRow {  // f16 d | f16 dmin | u8 scales[12] | u8 qs[128]; element 64i + l = qs[32i + l%32] lo (l<32) / hi
    static constexpr int QK = 256;
    static constexpr bool GRID = false;
    static __device__ __forceinline__ void decode64(const u8* row, int k0, const u64*, u16* dst) {
        const u8* blk = row + (size_t)(k0 >> 8) * 144;
        const int i = (k0 >> 6) & 3;
        const u32 dm = ld_u32(blk);
        const float d = f16_to_f32((u16)dm), dmin = f16_to_f32((u16)(dm >> 16));
        u32 sc, mn;
        q4_k_scale_min(blk + 4, 2 * i, sc, mn);
        const float a0 = d * small_f32(sc), m0 = dmin * small_f32(mn);
        q4_k_scale_min(blk + 4, 2 * i + 1, sc, mn);
        const float a1 = d * small_f32(sc), m1 = dmin * small_f32(mn);
#pragma unroll
        for (int g = 0; g < 4; ++g) {  // qs bytes 32i + 8g .. +8: elements 64i + 8g + l (lo) and 64i + 32 + 8g + l (hi)
            const uint2 q = *reinterpret_cast<const uint2*>(blk + 16 + 32 * i + 8 * g);
#pragma unroll
            for (int hi = 0; hi < 2; ++hi) {
                const float a = hi ? a1 : a0, m = hi ? m1 : m0;
                const u32 v0 = (q.x >> (4 * hi)) & 0x0F0F0F0Fu, v1 = (q.y >> (4 * hi)) & 0x0F0F0F0Fu;
                st8(dst + 32 * hi + 8 * g, fmaf(a, byte_f32(v0, 0), -m), fmaf(a, byte_f32(v0, 1), -m),
                    fmaf(a, byte_f32(v0, 2), -m), fmaf(a, byte_f32(v0, 3), -m), fmaf(a, byte_f32(v1, 0), -m),
                    fmaf(a, byte_f32(v1, 1), -m), fmaf(a, byte_f32(v1, 2), -m), fmaf(a, byte_f32(v1, 3), -m));
            }
        }
    }
};

struct MgIQ2_XXS : MgGgufRow {  // f16 d | 8 x (u32 aux0: 4 grid indices, u32 aux1: 4 x 7-bit sign indices + 4-bit scale)
    static constexpr int QK = 256;
    static constexpr bool GRID = true;
    static __device__ __forceinline__ float sgn(float v, u32 s8, int k) {
        return __uint_as_float(__float_as_uint(v) ^ (((s8 >> k) & 1u) << 31));
    }
    static __device__ __forceinline__ void decode64(const u8* row, int k0, const u64* grid, u16* dst) {
        const u8* blk = row + (size_t)(k0 >> 8) * 66;
        const int ib0 = (k0 >> 5) & 7;  // sub-blocks ib0, ib0 + 1 of 32 elements
        const float d = f16_to_f32(ld_u16(blk));
#pragma unroll
        for (int b = 0; b < 2; ++b) {
            const u8* sb = blk + 2 + 8 * (ib0 + b);
            const u32 aux0 = ld_u32_a2(sb), aux1 = ld_u32_a2(sb + 4);
            const float db = __fmul_rn(__fmul_rn(d, 0.5f + small_f32(aux1 >> 28)), 0.25f);
#pragma unroll
            for (int l = 0; l < 4; ++l) {
                const u64 g = grid[(aux0 >> (8 * l)) & 0xFFu];
                const u32 glo = (u32)g, ghi = (u32)(g >> 32);
                const u32 s8 = iq2_signs((aux1 >> (7 * l)) & 127u);
                st8(dst + 32 * b + 8 * l, sgn(db * byte_f32(glo, 0), s8, 0), sgn(db * byte_f32(glo, 1), s8, 1),
                    sgn(db * byte_f32(glo, 2), s8, 2), sgn(db * byte_f32(glo, 3), s8, 3),
                    sgn(db * byte_f32(ghi, 0), s8, 4), sgn(db * byte_f32(ghi, 1), s8, 5),
                    sgn(db * byte_f32(ghi, 2), s8, 6), sgn(db * byte_f32(ghi, 3), s8, 7));
            }
        }
    }
};

struct MgQ8_0R {  // Q8_0 repacked into planes (q8_0r.cuh): the row's int8 qs contiguous, its f16 scales apart
    static constexpr int QK = 32;
    static constexpr bool GRID = false;
    typedef Q8RRow Row;
    static __device__ __forceinline__ Row row(const u8* m, int r, long long slab_rows, int cols) {
        return q8r_row(m, r, cols >> 5, (int)slab_rows);
    }
    static __device__ __forceinline__ void decode64(const Row& row, int k0, const u64*, u16* dst) {
#pragma unroll
        for (int b = 0; b < 2; ++b) {
            const float d = f16_to_f32(row.d[(k0 >> 5) + b]);
#pragma unroll
            for (int c = 0; c < 2; ++c) {
                const uint4 q = row.qs[(k0 >> 4) + 2 * b + c];
                const u32 w[4] = {q.x ^ 0x80808080u, q.y ^ 0x80808080u, q.z ^ 0x80808080u, q.w ^ 0x80808080u};
#pragma unroll
                for (int h = 0; h < 2; ++h)
                    st8(dst + 32 * b + 16 * c + 8 * h, sbyte_f32(w[2 * h], 0) * d, sbyte_f32(w[2 * h], 1) * d,
                        sbyte_f32(w[2 * h], 2) * d, sbyte_f32(w[2 * h], 3) * d, sbyte_f32(w[2 * h + 1], 0) * d,
                        sbyte_f32(w[2 * h + 1], 1) * d, sbyte_f32(w[2 * h + 1], 2) * d, sbyte_f32(w[2 * h + 1], 3) * d);
            }
        }
    }
};

// ---- the grouped GEMM --------------------------------------------------------------------------------------------
// GATE_UP: A0 = gate, A1 = up, Xin = X [n, cols] (token p / k), epilogue SwiGLU into out = mid [n_pairs, rows].
// !GATE_UP: A0 = down, Xin = mid [n_pairs, cols] (row p), epilogue out[p, d] (+)= acc.
template <class DEC, bool GATE_UP>
__device__ __forceinline__ void mg_gemm(const u8* A0, const u8* A1, long long expert_stride, long long row_stride,
                                        const int* tiles, const int* n_tiles, const int* sorted,
                                        const float* weights, int k, int n_expert, int n_pairs, const float* Xin,
                                        int cols, float* out, int rows, float clamp, int accumulate) {
    __shared__ __align__(16) u16 sA[MG_BM * MG_LD];
    __shared__ __align__(16) u16 sB[MG_BN * MG_LD];
    __shared__ int s_pair[MG_BN];
    __shared__ u64 s_grid[DEC::GRID ? 256 : 1];

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, wm = warp & 3, wn = warp >> 2;
    int e, first, n;
    if (tiles != nullptr) {
        if ((int)blockIdx.y >= *n_tiles) return;
        e = tiles[3 * blockIdx.y];
        first = tiles[3 * blockIdx.y + 1];
        n = tiles[3 * blockIdx.y + 2];
    } else {
        e = 0;
        first = (int)blockIdx.y * MG_BN;
        n = min(MG_BN, n_pairs - first);
        if (n <= 0) return;
    }
    const int cta_rows = GATE_UP ? MG_BM / 2 : MG_BM;
    const int r0 = (int)blockIdx.x * cta_rows;
    if (tid < MG_BN) s_pair[tid] = tid < n ? (sorted != nullptr ? sorted[first + tid] : first + tid) : -1;
    if (DEC::GRID)
        for (int i = tid; i < 256; i += blockDim.x) s_grid[i] = IQ2XXS_GRID[i];
    __syncthreads();

    if (e < 0 || e >= n_expert) {  // bad-id bucket: NaN rows, no weight read (e is uniform over the CTA)
        const int nr = min(cta_rows, rows - r0);
        for (int idx = tid; idx < n * nr; idx += blockDim.x)
            out[(size_t)s_pair[idx / nr] * rows + r0 + idx % nr] = __int_as_float(0x7fc00000);
        return;
    }

    // this thread's weight row (decoded into shared row tid) and activation quarter-row (token tid / 4, 16 columns)
    const int ar = GATE_UP ? r0 + (tid & 127) : r0 + tid;
    const bool a_ok = ar < rows;
    const typename DEC::Row arow =
        DEC::row(((GATE_UP && tid >= 128) ? A1 : A0) + (size_t)e * expert_stride, a_ok ? ar : 0, row_stride, cols);
    const int bp = s_pair[tid >> 2];
    const float* brow = bp >= 0 ? Xin + (size_t)(GATE_UP ? bp / k : bp) * cols + 16 * (tid & 3) : nullptr;
    u16* a_dst = sA + tid * MG_LD;
    u16* b_dst = sB + (tid >> 2) * MG_LD + 16 * (tid & 3);

    // ldmatrix lane addresses: A x4 = (rows 0-7 | 8-15) x (k 0-7 | 8-15) -> a0..a3; B x4 = two n8 tiles x (k 0-7 | 8-15)
    const u32 a_addr = smem_u32(sA) + 2u * (u32)((wm * 32 + (lane & 15)) * MG_LD + (lane >> 4) * 8);
    const u32 b_addr = smem_u32(sB) + 2u * (u32)((wn * 32 + ((lane >> 4) << 3) + (lane & 7)) * MG_LD + ((lane >> 3) & 1) * 8);

    float acc[4][4][4];
#pragma unroll
    for (int mt = 0; mt < 4; ++mt)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt)
#pragma unroll
            for (int q = 0; q < 4; ++q) acc[mt][nt][q] = 0.f;

    for (int k0 = 0; k0 < cols; k0 += MG_BK) {
        if (a_ok) {
            DEC::decode64(arow, k0, s_grid, a_dst);
        } else {
#pragma unroll
            for (int c = 0; c < MG_BK; c += 8) *reinterpret_cast<uint4*>(a_dst + c) = make_uint4(0u, 0u, 0u, 0u);
        }
        if (brow != nullptr) {
            const float4 x0 = ld_x4(brow + k0), x1 = ld_x4(brow + k0 + 4), x2 = ld_x4(brow + k0 + 8),
                         x3 = ld_x4(brow + k0 + 12);
            st8(b_dst, x0.x, x0.y, x0.z, x0.w, x1.x, x1.y, x1.z, x1.w);
            st8(b_dst + 8, x2.x, x2.y, x2.z, x2.w, x3.x, x3.y, x3.z, x3.w);
        } else {
            *reinterpret_cast<uint4*>(b_dst) = make_uint4(0u, 0u, 0u, 0u);
            *reinterpret_cast<uint4*>(b_dst + 8) = make_uint4(0u, 0u, 0u, 0u);
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < MG_BK; kk += 16) {
            u32 bf[4][2];
#pragma unroll
            for (int np = 0; np < 2; ++np) {
                u32 r[4];
                ldsm_x4(r, b_addr + 2u * (u32)(np * 16 * MG_LD + kk));
                bf[2 * np][0] = r[0];
                bf[2 * np][1] = r[1];
                bf[2 * np + 1][0] = r[2];
                bf[2 * np + 1][1] = r[3];
            }
#pragma unroll
            for (int mt = 0; mt < 4; ++mt) {
                u32 af[4];
                ldsm_x4(af, a_addr + 2u * (u32)(((mt >> 1) * 128 + (mt & 1) * 16) * MG_LD + kk));
#pragma unroll
                for (int nt = 0; nt < 4; ++nt) mma16816(acc[mt][nt], af, bf[nt][0], bf[nt][1]);
            }
        }
        __syncthreads();
    }

    // epilogue: acc[mt][nt][q] = row (mt >> 1) * 128 + 32 wm + 16 (mt & 1) + lane / 4 + 8 (q >> 1) of the CTA,
    // token slot 32 wn + 8 nt + 2 (lane % 4) + (q & 1)
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

#define DS4_MOE_GROUPED(suffix, DEC)                                                                               \
    extern "C" __global__ void __launch_bounds__(256, 2) moe_grouped_gate_up_##suffix(                             \
        const u8* gate, const u8* up, long long expert_stride, long long row_stride, const int* tiles,             \
        const int* n_tiles, const int* sorted, const float* weights, int k, int n_expert, int n_pairs,             \
        const float* X, int cols, float* mid, int ff, float clamp) {                                               \
        mg_gemm<DEC, true>(gate, up, expert_stride, row_stride, tiles, n_tiles, sorted, weights, k, n_expert,      \
                           n_pairs, X, cols, mid, ff, clamp, 0);                                                   \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(256, 2) moe_grouped_down_##suffix(                                \
        const u8* down, long long expert_stride, long long row_stride, const int* tiles, const int* n_tiles,       \
        const int* sorted, int n_expert, int n_pairs, const float* mid, int cols, float* out, int rows,            \
        int accumulate) {                                                                                          \
        mg_gemm<DEC, false>(down, nullptr, expert_stride, row_stride, tiles, n_tiles, sorted, nullptr, 1,          \
                            n_expert, n_pairs, mid, cols, out, rows, 0.f, accumulate);                             \
    }

DS4_MOE_GROUPED(q8_0, MgQ8_0)
DS4_MOE_GROUPED(q2_k, MgQ2_K)
DS4_MOE_GROUPED(q4_k, MgQ4_K)
DS4_MOE_GROUPED(iq2_xxs, MgIQ2_XXS)
DS4_MOE_GROUPED(q8_0r, MgQ8_0R)

// ---- routing: stable counting sort of the pairs by expert, tile table ----------------------------------------------
__device__ __forceinline__ int mg_bucket(int e, int n_expert) { return (e >= 0 && e < n_expert) ? e : n_expert; }

extern "C" __global__ void __launch_bounds__(MG_RT_WARPS * 32) moe_grouped_route(
    const int* ids, int n_pairs, int n_expert, int tile_n, int* offsets, int* sorted, int* tiles, int* n_tiles) {
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
