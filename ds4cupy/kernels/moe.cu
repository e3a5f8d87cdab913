// moe.cu: routed (and shared) expert FFN for decode and prefill, model.md §2.8, in two launches.
//
// moe_gate_up_<type>(gate, up, expert_stride, row_stride, ids, weights, k, n_expert, X, cols, mid, ff, clamp, wpr)
//   gate, up: uint8 [n_expert, ff, row_stride] raw GGUF expert stacks (one type for both); expert_stride =
//             ff * row_stride bytes. X: float32 [n, cols]. ids: int32 [n, k], weights: float32 [n, k] (token-major,
//             device memory; nullptr for the shared expert: expert 0, weight 1). mid: float32 [n, k, ff].
//   For pair p = t*k + j with e = ids[p]:  g = gate[e] . X[t],  u = up[e] . X[t]  (per row f)
//       mid[p, f] = silu(min(g, clamp)) * min(max(u, -clamp), clamp) * weights[p]
//   An id outside [0, n_expert) writes NaN (visible, never a wild read).
//   Launch: 256 threads, grid (ceil(ff / (8 / wpr)), n * k); rows summed by groups of wpr warps as in matvec.cu.
// moe_down_<type>(down, expert_stride, row_stride, ids, k, n_expert, mid, ff, Y, D, accumulate, wpr)
//   down: uint8 [n_expert, D, row_stride] (rows of ff inputs); mid as above; Y: float32 [n, D]
//   Y[t, d] (+)= sum_j down[ids[t, j]][d] . mid[t, j]   (routing weights were applied in mid; no atomics)
//   accumulate != 0 adds to Y (e.g. the shared expert onto the routed sum). ids nullptr: expert 0, k = 1.
//   Launch: 256 threads, grid (ceil(D / (8 / wpr)), n).
// moe_gate_up_q8_0r_r<RF>(gate, up, expert_stride, slab_rows, ids, weights, k, n_expert, X, cols, mid, ff, clamp, wpr)
// moe_down_q8_0r_r<RD>(down, expert_stride, slab_rows, ids, k, n_expert, mid, ff, Y, D, accumulate, wpr)
//   The same two steps on Q8_0 weights repacked into planes (q8_0r.cuh): each expert's matrix (expert_stride bytes
//   apart) is made of slabs of slab_rows rows. A group of wpr warps takes RF rows f (gate and up rows: 2 RF dot
//   products) or RD output rows d (all k experts) with the chunked, pipelined row dot of q8_0r.cuh; a CTA holds
//   (8 / wpr) * RF (RD) rows: grid (ceil(ff / ((8 / wpr) RF)), n * k) or (ceil(D / ((8 / wpr) RD)), n).
// moe_gate_up_i8_iq2_xxs: moe_gate_up_fast_iq2_xxs's arguments and results (to float32 rounding) with integer dot
//   products on three int8 planes of the activations (below; switch MOE_I8, quant_ops picks it).
// moe_gate_up_i8s_iq2_xxs / moe_down_xs_q2_k: one token (decode); the two kernels above (i8, fast Q2_K down) staging
//   weights, respectively activations, through shared memory, bit-identical to them (below; switch MOE_STAGED).
// Reference: the float64 NumPy expert of tests/test_gpu_quant_ops.py, following model.md §2.8.
#include "q8_0r.cuh"
#include "mma_f16.cuh"
#include "pdl.cuh"

__device__ __forceinline__ float silu_f32(float g) { return g / (1.f + expf(-g)); }

template <class BT>
__device__ __forceinline__ void moe_gate_up_body(const u8* gate, const u8* up, long long expert_stride,
                                                 long long row_stride, const int* ids, const float* weights, int k,
                                                 int n_expert, const float* X, int cols, float* mid, int ff,
                                                 float clamp, int wpr) {
    __shared__ u64 s_grid[needs_grid<BT>::value ? 256 : 1];
    __shared__ float s_red[8];
    const u64* grid = stage_grid<BT>(s_grid);
    const int pair = blockIdx.y, tok = pair / k;
    const int warp = threadIdx.x >> 5;
    const int f = blockIdx.x * (8 / wpr) + warp / wpr;
    const int t = (warp % wpr) * 32 + (threadIdx.x & 31);
    const int e = ids ? ids[pair] : 0;
    const bool bad = e < 0 || e >= n_expert;
    float g = 0.f, u = 0.f;
    if (f < ff && !bad) {
        const size_t off = (size_t)e * expert_stride + (size_t)f * row_stride;
        const float* x = X + (size_t)tok * cols;
        g = row_dot<BT>(gate + off, x, cols / BT::QK, t, wpr * 32, grid);
        u = row_dot<BT>(up + off, x, cols / BT::QK, t, wpr * 32, grid);
    }
    g = group_sum(g, wpr, s_red);
    u = group_sum(u, wpr, s_red);
    if (f < ff && t == 0) {
        const float w = weights ? weights[pair] : 1.f;
        g = fminf(g, clamp);
        u = fminf(fmaxf(u, -clamp), clamp);
        mid[(size_t)pair * ff + f] = bad ? __int_as_float(0x7fc00000) : silu_f32(g) * u * w;
    }
}

template <class BT>
__device__ __forceinline__ void moe_down_body(const u8* down, long long expert_stride, long long row_stride,
                                              const int* ids, int k, int n_expert, const float* mid, int ff, float* Y,
                                              int D, int accumulate, int wpr) {
    __shared__ u64 s_grid[needs_grid<BT>::value ? 256 : 1];
    __shared__ float s_red[8];
    const u64* grid = stage_grid<BT>(s_grid);
    const int tok = blockIdx.y;
    const int warp = threadIdx.x >> 5;
    const int d = blockIdx.x * (8 / wpr) + warp / wpr;
    const int t = (warp % wpr) * 32 + (threadIdx.x & 31);
    float acc = 0.f;
    bool bad = false;
    if (d < D) {
        for (int j = 0; j < k; ++j) {
            const int e = ids ? ids[tok * k + j] : 0;
            if (e < 0 || e >= n_expert) {
                bad = true;
                continue;
            }
            acc += row_dot<BT>(down + (size_t)e * expert_stride + (size_t)d * row_stride,
                               mid + ((size_t)tok * k + j) * ff, ff / BT::QK, t, wpr * 32, grid);
        }
    }
    acc = group_sum(acc, wpr, s_red);
    if (d < D && t == 0) {
        float* y = Y + (size_t)tok * D + d;
        const float v = bad ? __int_as_float(0x7fc00000) : acc;
        *y = accumulate ? *y + v : v;
    }
}

#define DS4_MOE(suffix, BT)                                                                                       \
    extern "C" __global__ void __launch_bounds__(256) moe_gate_up_##suffix(                                       \
        const u8* gate, const u8* up, long long expert_stride, long long row_stride, const int* ids,              \
        const float* weights, int k, int n_expert, const float* X, int cols, float* mid, int ff, float clamp,     \
        int wpr) {                                                                                                \
        DS4_PDL_ENTRY();                                                                                          \
        moe_gate_up_body<BT>(gate, up, expert_stride, row_stride, ids, weights, k, n_expert, X, cols, mid, ff,    \
                             clamp, wpr);                                                                         \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(256) moe_down_##suffix(                                          \
        const u8* down, long long expert_stride, long long row_stride, const int* ids, int k, int n_expert,       \
        const float* mid, int ff, float* Y, int D, int accumulate, int wpr) {                                     \
        DS4_PDL_ENTRY();                                                                                          \
        moe_down_body<BT>(down, expert_stride, row_stride, ids, k, n_expert, mid, ff, Y, D, accumulate, wpr);     \
    }

DS4_FOR_EACH_QTYPE(DS4_MOE)

// ---------------------------------------------------------------------------------------------------------------------
// Decode-fast MoE kernels (same arguments and results as above, up to float32 summation order), for the formats of the
// flash models: moe_gate_up_fast_{iq2_xxs,q4_k}(..., n_pairs), moe_down_fast_{q2_k,q4_k}(..., n).
//   Work unit = one warp: RF rows f (gate and up rows of the same expert: 2*RF dot products) or RD output rows d (all k
//   experts). A lane loads each activation once for all the rows of its unit (x reuse), decodes weights without
//   int->float conversion instructions (a byte b becomes the float 2^23 + b by a byte permute, one FADD removes 2^23),
//   and the grid is persistent over units: launch 256 threads, grid = min(ceil(units / 8), resident CTAs).
//   IQ2_XXS: one lane per 8-weight group (a warp = one 256-weight block, activation loads coalesced), grid rows and
//   sign masks from shared tables replicated per lane (bank-conflict-free lookups), signed bytes 0x80 + s*g built with
//   two integer ops per 4 weights.

// byte_f32 / sbyte_f32 / small_f32 (exact byte -> float without I2F): quant_blocks.cuh

#define IQ2_GRID_COPIES 16
#define IQ2_SIGN_COPIES 8

// IQ2_XXS, lane = 8-weight group g (sub-block g >> 2, group g & 3) of each block; a warp covers one block a step.
struct MoeIQ2 {
    static constexpr int QK = 256, BYTES = 66, SL = 32, TABLES = 1;
    template <int NR>
    static __device__ __forceinline__ void dot_rows(const u8* const* rows, size_t boff, int s, const float* x,
                                                    float* acc, const u64* gtab, const u64* stab) {
        const int ib = s >> 2, l = s & 3;
        const float4 x0 = ld_x4(x + 8 * s), x1 = ld_x4(x + 8 * s + 4);
        u32 dd[NR], gi[NR], a1[NR];
#pragma unroll
        for (int r = 0; r < NR; ++r) {
            const u8* b = rows[r] + boff;
            dd[r] = ld_u16(b);
            gi[r] = b[2 + 8 * ib + l];
            a1[r] = ld_u32_a2(b + 6 + 8 * ib);
        }
#pragma unroll
        for (int r = 0; r < NR; ++r) {
            const u64 P = gtab[gi[r] * IQ2_GRID_COPIES];
            const u64 M = stab[((a1[r] >> (7 * l)) & 127u) * IQ2_SIGN_COPIES];
            const u32 plo = (u32)P, phi = (u32)(P >> 32), mlo = (u32)M, mhi = (u32)(M >> 32);
            const u32 ulo = plo - 2u * (plo & mlo), uhi = phi - 2u * (phi & mhi);  // bytes 0x80 + s*g
            float a = sbyte_f32(ulo, 0) * x0.x;
            a = fmaf(sbyte_f32(ulo, 1), x0.y, a);
            a = fmaf(sbyte_f32(ulo, 2), x0.z, a);
            a = fmaf(sbyte_f32(ulo, 3), x0.w, a);
            a = fmaf(sbyte_f32(uhi, 0), x1.x, a);
            a = fmaf(sbyte_f32(uhi, 1), x1.y, a);
            a = fmaf(sbyte_f32(uhi, 2), x1.z, a);
            a = fmaf(sbyte_f32(uhi, 3), x1.w, a);
            const float db = f16_to_f32((u16)dd[r]) * (__uint_as_float(0x4B000000u | (a1[r] >> 28)) - 8388607.5f);
            acc[r] = fmaf(db * 0.25f, a, acc[r]);
        }
    }
};

// Q4_K, slices as BlockQ4_K (16 per block: 8 quant bytes, 16 weights); scales and d/dmin read as 32-bit words.
struct MoeQ4K {
    static constexpr int QK = 256, BYTES = 144, SL = 16, TABLES = 0;
    template <int NR>
    static __device__ __forceinline__ void dot_rows(const u8* const* rows, size_t boff, int s, const float* x,
                                                    float* acc, const u64*, const u64*) {
        const int i = s >> 2, part = s & 3;
        uint2 q[NR];
        u32 dm[NR], s0[NR], s1[NR], s2[NR];
#pragma unroll
        for (int r = 0; r < NR; ++r) {
            const u8* b = rows[r] + boff;
            q[r] = *reinterpret_cast<const uint2*>(b + 16 + 32 * i + 8 * part);
            dm[r] = ld_u32(b);
            s0[r] = ld_u32(b + 4);
            s1[r] = ld_u32(b + 8);
            s2[r] = ld_u32(b + 12);
        }
#pragma unroll
        for (int hi = 0; hi < 2; ++hi) {
            const float* xs = x + 64 * i + 32 * hi + 8 * part;
            const float4 x0 = ld_x4(xs), x1 = ld_x4(xs + 4);
            const float sum = ((x0.x + x0.y) + (x0.z + x0.w)) + ((x1.x + x1.y) + (x1.z + x1.w));
            const u32 sh = 8u * (u32)((2 * i + hi) & 3);
#pragma unroll
            for (int r = 0; r < NR; ++r) {
                u32 sc, m;
                if (i < 2) {
                    sc = (s0[r] >> sh) & 63u;
                    m = (s1[r] >> sh) & 63u;
                } else {
                    sc = ((s2[r] >> sh) & 15u) | (((s0[r] >> sh) >> 6 & 3u) << 4);
                    m = ((s2[r] >> sh) >> 4 & 15u) | (((s1[r] >> sh) >> 6 & 3u) << 4);
                }
                const u32 v0 = (q[r].x >> (4 * hi)) & 0x0F0F0F0Fu, v1 = (q[r].y >> (4 * hi)) & 0x0F0F0F0Fu;
                float dot = byte_f32(v0, 0) * x0.x;
                dot = fmaf(byte_f32(v0, 1), x0.y, dot);
                dot = fmaf(byte_f32(v0, 2), x0.z, dot);
                dot = fmaf(byte_f32(v0, 3), x0.w, dot);
                dot = fmaf(byte_f32(v1, 0), x1.x, dot);
                dot = fmaf(byte_f32(v1, 1), x1.y, dot);
                dot = fmaf(byte_f32(v1, 2), x1.z, dot);
                dot = fmaf(byte_f32(v1, 3), x1.w, dot);
                const float d = f16_to_f32((u16)dm[r]), dmin = f16_to_f32((u16)(dm[r] >> 16));
                acc[r] = fmaf(d * small_f32(sc), dot, acc[r]);
                acc[r] = fmaf(-dmin * small_f32(m), sum, acc[r]);
            }
        }
    }
};

// Q2_K, slices as BlockQ2_K (4 per block: 16 quant bytes, 64 weights); scales and d/dmin read as 32-bit words.
// dot_rows_x reads the block's activations through xv(i) = float4 i of the block's 256 (64 of them): from global
// memory (dot_rows) or from moe_down_xs_q2_k's shared copy.
struct MoeQ2K {
    static constexpr int QK = 256, BYTES = 84, SL = 4, TABLES = 0;
    template <int NR>
    static __device__ __forceinline__ void dot_rows(const u8* const* rows, size_t boff, int s, const float* x,
                                                    float* acc, const u64*, const u64*) {
        dot_rows_x<NR>(rows, boff, s, [x](int i) { return ld_x4(x + 4 * i); }, acc);
    }
    template <int NR, class XV>
    static __device__ __forceinline__ void dot_rows_x(const u8* const* rows, size_t boff, int s, XV xv4, float* acc) {
        const int h = s >> 1, half = s & 1;
        u32 qw[NR][4], sc[NR][2], dm[NR];
#pragma unroll
        for (int r = 0; r < NR; ++r) {
            const u8* b = rows[r] + boff;
            const u8* qp = b + 16 + 32 * h + 16 * half;
#pragma unroll
            for (int w = 0; w < 4; ++w) qw[r][w] = ld_u32(qp + 4 * w);
            sc[r][0] = ld_u32(b + 8 * h);
            sc[r][1] = ld_u32(b + 8 * h + 4);
            dm[r] = ld_u32(b + 80);
        }
#pragma unroll
        for (int sh = 0; sh < 4; ++sh) {
            const int xs = 32 * h + 8 * sh + 4 * half;                 // float4 index of weight 128 h + 32 sh + 16 half
            float4 xv[4];
            float sum = 0.f;
#pragma unroll
            for (int w = 0; w < 4; ++w) {
                xv[w] = xv4(xs + w);
                sum += (xv[w].x + xv[w].y) + (xv[w].z + xv[w].w);
            }
            const u32 bsh = 8u * (u32)((2 * sh + half) & 3);
#pragma unroll
            for (int r = 0; r < NR; ++r) {
                float dot = 0.f;
#pragma unroll
                for (int w = 0; w < 4; ++w) {
                    const u32 v = (qw[r][w] >> (2 * sh)) & 0x03030303u;
                    dot = fmaf(byte_f32(v, 0), xv[w].x, dot);
                    dot = fmaf(byte_f32(v, 1), xv[w].y, dot);
                    dot = fmaf(byte_f32(v, 2), xv[w].z, dot);
                    dot = fmaf(byte_f32(v, 3), xv[w].w, dot);
                }
                const u32 scb = (sc[r][sh >> 1] >> bsh) & 0xFFu;
                const float d = f16_to_f32((u16)dm[r]), dmin = f16_to_f32((u16)(dm[r] >> 16));
                acc[r] = fmaf(d * small_f32(scb & 15u), dot, acc[r]);
                acc[r] = fmaf(-dmin * small_f32(scb >> 4), sum, acc[r]);
            }
        }
    }
};

// shared tables of the IQ2_XXS grid (bytes 0x80 | g) and sign masks (byte 0x7F where the weight is negative),
// IQ2_GRID_COPIES / IQ2_SIGN_COPIES copies interleaved so that the lanes of a half warp hit distinct banks
template <class P>
__device__ __forceinline__ void stage_iq2_tables(u64* gtab, u64* stab) {
    if constexpr (P::TABLES != 0) {
        for (int i = threadIdx.x; i < 256 * IQ2_GRID_COPIES; i += blockDim.x)
            gtab[i] = IQ2XXS_GRID[i / IQ2_GRID_COPIES] | 0x8080808080808080ull;
        for (int i = threadIdx.x; i < 128 * IQ2_SIGN_COPIES; i += blockDim.x) {
            const u32 s8 = iq2_signs((u32)(i / IQ2_SIGN_COPIES));
            u64 m = 0;
#pragma unroll
            for (int k = 0; k < 8; ++k)
                if ((s8 >> k) & 1u) m |= 0x7Full << (8 * k);
            stab[i] = m;
        }
        __syncthreads();
    }
}

#ifndef DS4_MOE_UNROLL
#define DS4_MOE_UNROLL 2
#endif
#ifndef DS4_MOE_MINB
#define DS4_MOE_MINB 3
#endif

template <class P, int NR, int UNROLL = DS4_MOE_UNROLL>
__device__ __forceinline__ void rows_dot(const u8* const* rows, const float* x, int nblocks, int lane, float* acc,
                                         const u64* gtab, const u64* stab) {
#pragma unroll UNROLL
    for (int s = lane; s < nblocks * P::SL; s += 32) {
        const int blk = s / P::SL;
        P::template dot_rows<NR>(rows, (size_t)blk * P::BYTES, s % P::SL, x + (size_t)blk * P::QK, acc, gtab, stab);
    }
}

// A gate/up warp unit's rows: gate rows f0 .. f0 + RF - 1 of expert e, then the same rows of up (rows past ff repeat
// the last one; their results are not stored).
template <int RF>
__device__ __forceinline__ void moe_unit_rows(const u8* gate, const u8* up, long long expert_stride,
                                              long long row_stride, int e, int f0, int ff, const u8** rows) {
#pragma unroll
    for (int r = 0; r < RF; ++r) {
        const size_t off = (size_t)e * expert_stride + (size_t)min(f0 + r, ff - 1) * row_stride;
        rows[r] = gate + off;
        rows[RF + r] = up + off;
    }
}

// A gate/up warp unit's epilogue: warp sums of its 2 RF lane partials, then lane r stores
// mid[pair, f0 + r] = silu(min(g, clamp)) * clamp(u, -clamp, clamp) * weight (NaN for a bad expert id).
template <int RF>
__device__ __forceinline__ void moe_swiglu_store(float* acc, int lane, int pair, int f0, int ff, float clamp,
                                                 const float* weights, bool bad, float* mid) {
#pragma unroll
    for (int r = 0; r < 2 * RF; ++r) acc[r] = warp_sum(acc[r]);
    const float w = (weights && !bad) ? weights[pair] : 1.f;
#pragma unroll
    for (int r = 0; r < RF; ++r) {
        if (lane == r && f0 + r < ff) {
            const float g = fminf(acc[r], clamp);
            const float uu = fminf(fmaxf(acc[RF + r], -clamp), clamp);
            mid[(size_t)pair * ff + f0 + r] = bad ? __int_as_float(0x7fc00000) : silu_f32(g) * uu * w;
        }
    }
}

template <class P, int RF>
__device__ __forceinline__ void moe_gate_up_fast_body(const u8* gate, const u8* up, long long expert_stride,
                                                      long long row_stride, const int* ids, const float* weights,
                                                      int k, int n_expert, const float* X, int cols, float* mid,
                                                      int ff, float clamp, int n_pairs) {
    __shared__ u64 s_grid[P::TABLES ? 256 * IQ2_GRID_COPIES : 1];
    __shared__ u64 s_sign[P::TABLES ? 128 * IQ2_SIGN_COPIES : 1];
    stage_iq2_tables<P>(s_grid, s_sign);
    const int lane = threadIdx.x & 31;
    const u64* gtab = s_grid + (P::TABLES ? (lane & (IQ2_GRID_COPIES - 1)) : 0);
    const u64* stab = s_sign + (P::TABLES ? (lane & (IQ2_SIGN_COPIES - 1)) : 0);
    const int fgroups = (ff + RF - 1) / RF;
    const int units = n_pairs * fgroups;
    const int nblocks = cols / P::QK;
    for (int u = blockIdx.x * 8 + (threadIdx.x >> 5); u < units; u += gridDim.x * 8) {
        const int pair = u / fgroups, f0 = (u % fgroups) * RF, tok = pair / k;
        const int e = ids ? ids[pair] : 0;
        const bool bad = e < 0 || e >= n_expert;
        float acc[2 * RF];
#pragma unroll
        for (int r = 0; r < 2 * RF; ++r) acc[r] = 0.f;
        if (!bad) {
            const u8* rows[2 * RF];
            moe_unit_rows<RF>(gate, up, expert_stride, row_stride, e, f0, ff, rows);
            rows_dot<P, 2 * RF>(rows, X + (size_t)tok * cols, nblocks, lane, acc, gtab, stab);
        }
        moe_swiglu_store<RF>(acc, lane, pair, f0, ff, clamp, weights, bad, mid);
    }
}

// A down warp unit's epilogue: warp sums of its RD lane partials, then lane r stores y[d0 + r] (+)= the sum (NaN for a
// bad expert id among the token's). y: the token's output row.
template <int RD>
__device__ __forceinline__ void moe_down_store(float* acc, int lane, int d0, int D, bool bad, float* y,
                                               int accumulate) {
#pragma unroll
    for (int r = 0; r < RD; ++r) acc[r] = warp_sum(acc[r]);
#pragma unroll
    for (int r = 0; r < RD; ++r) {
        if (lane == r && d0 + r < D) {
            const float v = bad ? __int_as_float(0x7fc00000) : acc[r];
            y[d0 + r] = accumulate ? y[d0 + r] + v : v;
        }
    }
}

template <class P, int RD>
__device__ __forceinline__ void moe_down_fast_body(const u8* down, long long expert_stride, long long row_stride,
                                                   const int* ids, int k, int n_expert, const float* mid, int ff,
                                                   float* Y, int D, int accumulate, int n) {
    const int lane = threadIdx.x & 31;
    const int dgroups = (D + RD - 1) / RD;
    const int units = n * dgroups;
    const int nblocks = ff / P::QK;
    for (int u = blockIdx.x * 8 + (threadIdx.x >> 5); u < units; u += gridDim.x * 8) {
        const int tok = u / dgroups, d0 = (u % dgroups) * RD;
        float acc[RD];
#pragma unroll
        for (int r = 0; r < RD; ++r) acc[r] = 0.f;
        bool bad = false;
#pragma unroll 2
        for (int j = 0; j < k; ++j) {
            const int e = ids ? ids[tok * k + j] : 0;
            if (e < 0 || e >= n_expert) {
                bad = true;
                continue;
            }
            const u8* rows[RD];
#pragma unroll
            for (int r = 0; r < RD; ++r)
                rows[r] = down + (size_t)e * expert_stride + (size_t)min(d0 + r, D - 1) * row_stride;
            rows_dot<P, RD>(rows, mid + ((size_t)tok * k + j) * ff, nblocks, lane, acc, nullptr, nullptr);
        }
        moe_down_store<RD>(acc, lane, d0, D, bad, Y + (size_t)tok * D, accumulate);
    }
}

#ifndef DS4_MOE_RF
#define DS4_MOE_RF 2
#endif
#ifndef DS4_MOE_RD
#define DS4_MOE_RD 2
#endif

#define DS4_MOE_FAST_GATE_UP(suffix, P)                                                                           \
    extern "C" __global__ void __launch_bounds__(256, DS4_MOE_MINB) moe_gate_up_fast_##suffix(                                  \
        const u8* gate, const u8* up, long long expert_stride, long long row_stride, const int* ids,              \
        const float* weights, int k, int n_expert, const float* X, int cols, float* mid, int ff, float clamp,     \
        int n_pairs) {                                                                                            \
        DS4_PDL_ENTRY();                                                                                          \
        moe_gate_up_fast_body<P, DS4_MOE_RF>(gate, up, expert_stride, row_stride, ids, weights, k, n_expert, X,   \
                                             cols, mid, ff, clamp, n_pairs);                                      \
    }
#define DS4_MOE_FAST_DOWN(suffix, P)                                                                              \
    extern "C" __global__ void __launch_bounds__(256, DS4_MOE_MINB) moe_down_fast_##suffix(                                     \
        const u8* down, long long expert_stride, long long row_stride, const int* ids, int k, int n_expert,       \
        const float* mid, int ff, float* Y, int D, int accumulate, int n) {                                       \
        DS4_PDL_ENTRY();                                                                                          \
        moe_down_fast_body<P, DS4_MOE_RD>(down, expert_stride, row_stride, ids, k, n_expert, mid, ff, Y, D,       \
                                          accumulate, n);                                                         \
    }

DS4_MOE_FAST_GATE_UP(iq2_xxs, MoeIQ2)
DS4_MOE_FAST_GATE_UP(q4_k, MoeQ4K)
DS4_MOE_FAST_DOWN(q2_k, MoeQ2K)
DS4_MOE_FAST_DOWN(q4_k, MoeQ4K)

// ---------------------------------------------------------------------------------------------------------------------
// moe_gate_up_i8_iq2_xxs: moe_gate_up_fast_iq2_xxs's arguments and results (to float32 rounding), with integer dot
// products. Launch: 256 threads, grid = min(ceil(units / 8), resident CTAs), units = n_pairs * ceil(ff / I8_RF).
// The float kernel spends ~7 instructions a weight (byte -> float conversions, an FMA each, per-lane addressing of
// 8-weight groups: H200 SASS count); this one ~3: a lane owns whole 32-weight sub-blocks (sb = lane + 32 i) of a warp
// unit's I8_RF gate rows and I8_RF up rows (= the same rows of up), and
//   - splits its 32 activations once for the unit's 2 I8_RF rows into three int8 planes on a power-of-two grid
//     (i8_x_planes): x_j = 2^(e - 23) m_j, m_j = rint(x_j 2^(23 - e)) with 2^e > max |x| of the sub-block, so
//     |m_j| <= 2^23 - 1 and m_j = 65536 h_j + 256 c_j + l_j (h signed, c and l unsigned bytes): m_j carries 23 bits
//     below the sub-block's top bit, an error <= 2^-24 * 2^e (float32's own relative rounding is 2^-24);
//   - forms the signed weight bytes s g of each 8-weight group from the grid and sign tables (two integer ops per 4),
//   - and sums s g h, s g c, s g l with dp4a: exact integers; the sub-block's dot is then
//     2^(e - 23) (65536 S_h + 256 S_c + S_l) (two float roundings) times d (0.5 + s4) / 4 as in the float kernel.
// Sub-blocks whose max |x| is below 2^-103 use the grid of 2^-126 (absolute error <= 2^-127).
// Reference: moe_gate_up_fast_iq2_xxs (float32 FMAs) and the float64 expert of tests/test_gpu_quant_ops.py.
#define I8_RF 4
#ifndef I8_STAGE_COLS
#define I8_STAGE_COLS 4096
#endif
#ifndef I8_GRID_COPIES
#define I8_GRID_COPIES 8      // 8 copies of the grid (16 KB) leave room for the staged planes under 48 KB of static smem
#endif
// the sign table keeps the float kernel's IQ2_SIGN_COPIES (8): 16 copies (conflict-free, 16 KB) measured slower on
// the H200, 35.4 us against 33.6 a layer


struct I8XPlanes {
    u32 h[8], c[8], l[8];
    float p2;                      // 2^(e - 23)
};

__device__ __forceinline__ float max_nan(float a, float b) {     // max that returns NaN if either is NaN
    float d;
    asm("max.NaN.f32 %0, %1, %2;" : "=f"(d) : "f"(a), "f"(b));
    return d;
}

__device__ __forceinline__ void i8_x_planes(const float* x, I8XPlanes& q) {
    float4 v[8];
#pragma unroll
    for (int w = 0; w < 8; ++w) v[w] = ld_x4(x + 4 * w);
    float amax = 0.f;
#pragma unroll
    for (int w = 0; w < 8; ++w) amax = max_nan(amax, max_nan(max_nan(fabsf(v[w].x), fabsf(v[w].y)),
                                                             max_nan(fabsf(v[w].z), fabsf(v[w].w))));
    // e: 2^e > amax (amax's exponent + 1), at least -103 so that 2^(23 - e) and 2^(e - 23) are normal floats; an inf
    // or NaN among the 32 makes p2 (and so the row's dot) NaN, as the float kernel's products would
    const u32 E = (__float_as_uint(amax) >> 23) & 255u;
    const int e = max((int)E - 126, -103);
    const float s = __uint_as_float((u32)(127 + 23 - e) << 23);
    q.p2 = E == 255u ? __int_as_float(0x7fc00000) : __uint_as_float((u32)(127 - 23 + e) << 23);
#pragma unroll
    for (int w = 0; w < 8; ++w) {
        const int m0 = min(__float2int_rn(v[w].x * s), 8388607), m1 = min(__float2int_rn(v[w].y * s), 8388607);
        const int m2 = min(__float2int_rn(v[w].z * s), 8388607), m3 = min(__float2int_rn(v[w].w * s), 8388607);
        q.l[w] = __byte_perm(__byte_perm(m0, m1, 0x0040), __byte_perm(m2, m3, 0x0040), 0x5410);
        q.c[w] = __byte_perm(__byte_perm(m0, m1, 0x0051), __byte_perm(m2, m3, 0x0051), 0x5410);
        q.h[w] = __byte_perm(__byte_perm(m0, m1, 0x0062), __byte_perm(m2, m3, 0x0062), 0x5410);
    }
}

__device__ __forceinline__ int dp4a_ss(u32 a, u32 b, int c) {
    int d;
    asm("dp4a.s32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}
__device__ __forceinline__ int dp4a_su(u32 a, u32 b, int c) {
    int d;
    asm("dp4a.s32.u32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}
// exact int -> float for |v| < 2^22 without I2F: the float 1.5 * 2^23 + v minus 1.5 * 2^23
__device__ __forceinline__ float small_int_f32(int v) { return __int_as_float(0x4B400000 + v) - 12582912.0f; }

// one IQ2_XXS sub-block (8 bytes at q: 4 grid indices, then 4 x 7 sign bits and the 4-bit scale) of a row against
// the planes: returns 2^(e - 23) * sum_j s_j g_j m_j (without the scale d (0.5 + s4) / 4)
// the signed weight bytes w0, w1 of 8-weight group gi against the three planes: S_h, S_c, S_l += (exact integers)
__device__ __forceinline__ void i8_group_dots(u32 w0, u32 w1, const I8XPlanes& x, int gi, int& sh, int& sc, int& sl) {
    sh = dp4a_ss(w0, x.h[2 * gi], sh);
    sh = dp4a_ss(w1, x.h[2 * gi + 1], sh);
    sc = dp4a_su(w0, x.c[2 * gi], sc);
    sc = dp4a_su(w1, x.c[2 * gi + 1], sc);
    sl = dp4a_su(w0, x.l[2 * gi], sl);
    sl = dp4a_su(w1, x.l[2 * gi + 1], sl);
}
// the sub-block's 2^(e - 23) (65536 S_h + 256 S_c + S_l): |S_h| <= 43 * 128 * 32, |S_c|, |S_l| <= 43 * 255 * 32 < 2^22
__device__ __forceinline__ float i8_planes_value(int sh, int sc, int sl, float p2) {
    return fmaf(small_int_f32(sh), 65536.0f, fmaf(small_int_f32(sc), 256.0f, small_int_f32(sl))) * p2;
}

__device__ __forceinline__ float i8_iq2_subblock(u32 g4, u32 aux, const I8XPlanes& x, const u64* gtab,
                                                 const u64* stab) {
    int sh = 0, sc = 0, sl = 0;
#pragma unroll
    for (int gi = 0; gi < 4; ++gi) {
        const u64 P = gtab[((g4 >> (8 * gi)) & 255u) * I8_GRID_COPIES];
        const u64 M = stab[((aux >> (7 * gi)) & 127u) * IQ2_SIGN_COPIES];
        const u32 mlo = (u32)M, mhi = (u32)(M >> 32);
        const u32 w0 = (((u32)P) ^ mlo) + (mlo & 0x01010101u);           // bytes s g (two's complement, no carry:
        const u32 w1 = (((u32)(P >> 32)) ^ mhi) + (mhi & 0x01010101u);   // 255 - g + 1 <= 248)
        i8_group_dots(w0, w1, x, gi, sh, sc, sl);
    }
    return i8_planes_value(sh, sc, sl, x.p2);
}

// shared tables for the integer kernel: raw grid bytes (8 / 25 / 43) and sign masks (byte 0xFF where negative)
__device__ __forceinline__ void stage_iq2_tables_i8(u64* gtab, u64* stab) {
    for (int i = threadIdx.x; i < 256 * I8_GRID_COPIES; i += blockDim.x) gtab[i] = IQ2XXS_GRID[i / I8_GRID_COPIES];
    for (int i = threadIdx.x; i < 128 * IQ2_SIGN_COPIES; i += blockDim.x) {
        const u32 s8 = iq2_signs((u32)(i / IQ2_SIGN_COPIES));
        u64 m = 0;
#pragma unroll
        for (int k = 0; k < 8; ++k)
            if ((s8 >> k) & 1u) m |= 0xFFull << (8 * k);
        stab[i] = m;
    }
    __syncthreads();
}

// One token (decode): the CTA splits the token's activations into the planes once, in shared memory, plane-major
// (word w of plane P of sub-block sb at [(8 P + w) pstride + sb], pstride >= nsub: a warp's lanes read consecutive
// words), so a lane's
// 24 plane words cost 24 conflict-free shared loads instead of 8 float4 global loads spread over 32 cache lines per
// warp instruction. Same m_j and e as i8_x_planes (the same arithmetic on the same values), so the results do not
// depend on the path. Several tokens, or cols > I8_STAGE_COLS: i8_x_planes per lane and sub-block.
__device__ __forceinline__ void i8_stage_planes(const float* x, int nsub, u32* s_xq, float* s_p2, int pstride) {
    const int lane = threadIdx.x & 31;
    u8* b = reinterpret_cast<u8*>(s_xq);
    for (int sb = threadIdx.x >> 5; sb < nsub; sb += blockDim.x >> 5) {
        const float v = x[32 * sb + lane];
        float amax = fabsf(v);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) amax = max_nan(amax, __shfl_xor_sync(0xffffffffu, amax, o));
        const u32 E = (__float_as_uint(amax) >> 23) & 255u;
        const int e = max((int)E - 126, -103);
        const int m = min(__float2int_rn(v * __uint_as_float((u32)(127 + 23 - e) << 23)), 8388607);
        const int at = ((lane >> 2) * pstride + sb) * 4 + (lane & 3);
        b[at] = (u8)(m >> 16);
        b[at + 8 * pstride * 4] = (u8)(m >> 8);
        b[at + 16 * pstride * 4] = (u8)m;
        if (lane == 0) s_p2[sb] = E == 255u ? __int_as_float(0x7fc00000) : __uint_as_float((u32)(127 - 23 + e) << 23);
    }
}

extern "C" __global__ void __launch_bounds__(256, DS4_MOE_MINB) moe_gate_up_i8_iq2_xxs(
    const u8* gate, const u8* up, long long expert_stride, long long row_stride, const int* ids, const float* weights,
    int k, int n_expert, const float* X, int cols, float* mid, int ff, float clamp, int n_pairs) {
    DS4_PDL_ENTRY();
    __shared__ u64 s_grid[256 * I8_GRID_COPIES];
    __shared__ u64 s_sign[128 * IQ2_SIGN_COPIES];
    __shared__ u32 s_xq[24 * (I8_STAGE_COLS / 32)];
    __shared__ float s_p2[I8_STAGE_COLS / 32];
    const int nsub = cols >> 5;                                   // 32-weight sub-blocks a row
    const bool staged = n_pairs == k && cols <= I8_STAGE_COLS;
    if (staged) i8_stage_planes(X, nsub, s_xq, s_p2, nsub);
    stage_iq2_tables_i8(s_grid, s_sign);                          // its barrier also publishes the planes
    const int lane = threadIdx.x & 31;
    const u64* gtab = s_grid + (lane & (I8_GRID_COPIES - 1));
    const u64* stab = s_sign + (lane & (IQ2_SIGN_COPIES - 1));
    const int fgroups = (ff + I8_RF - 1) / I8_RF;
    const int units = n_pairs * fgroups;
    for (int u = blockIdx.x * 8 + (threadIdx.x >> 5); u < units; u += gridDim.x * 8) {
        const int pair = u / fgroups, f0 = (u % fgroups) * I8_RF, tok = pair / k;
        const int e = ids ? ids[pair] : 0;
        const bool bad = e < 0 || e >= n_expert;
        float acc[2 * I8_RF];
#pragma unroll
        for (int r = 0; r < 2 * I8_RF; ++r) acc[r] = 0.f;
        if (!bad) {
            const u8* rows[2 * I8_RF];
            moe_unit_rows<I8_RF>(gate, up, expert_stride, row_stride, e, f0, ff, rows);
            const float* x = X + (size_t)tok * cols;
            for (int sb = lane; sb < nsub; sb += 32) {
                I8XPlanes xq;
                if (staged) {
#pragma unroll
                    for (int w = 0; w < 8; ++w) {
                        xq.h[w] = s_xq[w * nsub + sb];
                        xq.c[w] = s_xq[(8 + w) * nsub + sb];
                        xq.l[w] = s_xq[(16 + w) * nsub + sb];
                    }
                    xq.p2 = s_p2[sb];
                } else {
                    i8_x_planes(x + 32 * sb, xq);
                }
                const size_t boff = (size_t)(sb >> 3) * 66, qoff = boff + 2 + 8 * (sb & 7);
                u32 g4[2 * I8_RF], aux[2 * I8_RF], dd[2 * I8_RF];
#pragma unroll
                for (int r = 0; r < 2 * I8_RF; ++r) {
                    dd[r] = ld_u16(rows[r] + boff);
                    g4[r] = ld_u32_a2(rows[r] + qoff);
                    aux[r] = ld_u32_a2(rows[r] + qoff + 4);
                }
#pragma unroll
                for (int r = 0; r < 2 * I8_RF; ++r) {
                    const float v = i8_iq2_subblock(g4[r], aux[r], xq, gtab, stab);
                    const float db = f16_to_f32((u16)dd[r]) *
                                     (__uint_as_float(0x4B000000u | (aux[r] >> 28)) - 8388607.5f);
                    acc[r] = fmaf(db * 0.25f, v, acc[r]);
                }
            }
        }
        moe_swiglu_store<I8_RF>(acc, lane, pair, f0, ff, clamp, weights, bad, mid);
    }
}

// ---------------------------------------------------------------------------------------------------------------------
// moe_gate_up_i8s_iq2_xxs: moe_gate_up_i8_iq2_xxs for one token (n_pairs == k, cols <= I8_STAGE_COLS), bit-identical
// to it (switch MOE_STAGED, quant_ops picks it), with the weights staged through shared memory. H200 ncu at eadf732:
// the per-lane kernel above keeps L1 77 % busy at 13 % of DRAM bandwidth (two-byte loads from 66-byte blocks, two
// 64-bit table lookups a weight group). Here
//   - a warp's unit (I8S_RF gate rows and the same up rows, rows of cols / 256 blocks of 66 bytes: row_stride must be
//     a multiple of 16, e.g. cols = 4096: 1056 bytes) is copied whole into the warp's own shared buffer by 16-byte
//     cp.async, the next unit's copy in flight while this one is computed (two buffers a warp, dynamic shared
//     memory: i8s_smem_bytes below);
//   - a lane reads its sub-block (d, 4 grid indices, signs and scale) as aligned 32-bit shared words and funnel
//     shifts;
//   - the signed weight bytes s g of 4 weights come from one PRMT: selector nibble = grid code (0, 1, 2 for 8, 25,
//     43) | 4 for a negative weight, picking from the bytes {8, 25, 43, 0, -8, -25, -43, 0}; the grid codes (256 x 8
//     nibbles) and the sign nibbles (128 x 8) are 32-bit tables in shared memory, I8S_TAB_COPIES copies.
// Measured (H200, scripts/bench_moe.py, flash shapes): 30.8 us a layer against the per-lane kernel's 34.8; SASS: 450
// instructions a loop iteration (4 rows x one 32-weight sub-block a lane): instruction-bound (docs/PERF_NOTES.md).
// Lane sb-order, the three dp4a sums, the float steps and the warp sums are i8_iq2_subblock's / the kernel above's,
// so the results are the same bits. Launch: 256 threads, dynamic shared memory i8s_smem_bytes(row_stride), grid =
// min(ceil(units / 8), resident CTAs), units = k * ceil(ff / I8S_RF).
// Reference: moe_gate_up_i8_iq2_xxs (bit for bit; tests/test_gpu_moe_staged.py).
#ifndef I8S_RF
#define I8S_RF 2
#endif
#ifndef I8S_UNROLL
#define I8S_UNROLL 1             // sub-blocks of a unit's rows in flight (unrolled sub-block loop)
#endif
#ifndef I8S_TAB_COPIES
#define I8S_TAB_COPIES 16
#endif
#define I8S_LUT_LO 0x002B1908u   // bytes 8, 25, 43, 0
#define I8S_LUT_HI 0x00D5E7F8u   // bytes -8, -25, -43, 0
#define I8S_PAD 16               // a lane's last funnel-shift word may read 4 bytes past a row: padding after a unit
#define I8S_PSTRIDE (I8_STAGE_COLS / 32)   // plane stride of the staged activations (constant: immediate offsets)

// one warp's buffer: 2 I8S_RF rows + padding; two a warp, 8 warps (the host computes the same: i8s_smem_bytes)
__device__ __forceinline__ int i8s_unit_bytes(long long row_stride) { return 2 * I8S_RF * (int)row_stride + I8S_PAD; }

__device__ __forceinline__ void stage_iq2_nibble_tables(u32* gnib, u32* snib) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) {
        const u64 g = IQ2XXS_GRID[i];
        u32 v = 0;
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            const u32 b = (u32)(g >> (8 * k)) & 255u;
            v |= ((u32)(b > 8u) + (u32)(b > 25u)) << (4 * k);
        }
#pragma unroll
        for (int c = 0; c < I8S_TAB_COPIES; ++c) gnib[i * I8S_TAB_COPIES + c] = v;
    }
    for (int i = threadIdx.x; i < 128; i += blockDim.x) {
        const u32 s8 = iq2_signs((u32)i);
        u32 v = 0;
#pragma unroll
        for (int k = 0; k < 8; ++k) v |= ((s8 >> k) & 1u) << (4 * k + 2);
#pragma unroll
        for (int c = 0; c < I8S_TAB_COPIES; ++c) snib[i * I8S_TAB_COPIES + c] = v;
    }
}

// a unit's rows -> the warp's buffer (16-byte cp.async; one commit group a unit, empty for a bad id or no unit)
__device__ __forceinline__ void i8s_issue(const u8* const* rows, int nch, long long row_stride, u8* buf, int lane) {
#pragma unroll
    for (int r = 0; r < 2 * I8S_RF; ++r)
        for (int j = lane; j < nch; j += 32)
            cp_async16(smem_u32(buf + r * row_stride + 16 * j), rows[r] + 16 * j, 16);
}

__device__ __forceinline__ u32 prmt_var(u32 a, u32 b, u32 sel) {      // prmt without __byte_perm's selector mask
    u32 d;                                                             // (our selector nibbles never set bit 3)
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
    return d;
}
__device__ __forceinline__ u32 lds_u32(u32 addr) {
    u32 v;
    asm volatile("ld.shared.u32 %0, [%1];" : "=r"(v) : "r"(addr));
    return v;
}

// i8_iq2_subblock with the weight bytes from the nibble tables (same integers, same float steps). gtab, stab: this
// lane's copy of the grid / sign nibble tables as shared addresses (entry i of copy c at word I8S_TAB_COPIES i + c).
__device__ __forceinline__ float i8s_subblock(u32 g4, u32 aux, const I8XPlanes& x, u32 gtab, u32 stab) {
    int sh = 0, sc = 0, sl = 0;
#pragma unroll
    for (int gi = 0; gi < 4; ++gi) {
        const u32 gidx = __byte_perm(g4, 0u, 0x4440u | (u32)gi);                         // grid index byte gi
        const u32 sidx = (aux >> (7 * gi)) & 127u;
        const u32 sel = lds_u32(gtab + gidx * (4u * I8S_TAB_COPIES)) | lds_u32(stab + sidx * (4u * I8S_TAB_COPIES));
        const u32 w0 = prmt_var(I8S_LUT_LO, I8S_LUT_HI, sel), w1 = prmt_var(I8S_LUT_LO, I8S_LUT_HI, sel >> 16);
        i8_group_dots(w0, w1, x, gi, sh, sc, sl);
    }
    return i8_planes_value(sh, sc, sl, x.p2);
}

extern "C" __global__ void __launch_bounds__(256, 2) moe_gate_up_i8s_iq2_xxs(
    const u8* gate, const u8* up, long long expert_stride, long long row_stride, const int* ids, const float* weights,
    int k, int n_expert, const float* X, int cols, float* mid, int ff, float clamp, int n_pairs) {
    DS4_PDL_ENTRY();
    extern __shared__ __align__(16) u8 s_units[];                 // [8 warps][2][i8s_unit_bytes]
    __shared__ u32 s_gnib[256 * I8S_TAB_COPIES];
    __shared__ u32 s_snib[128 * I8S_TAB_COPIES];
    __shared__ u32 s_xq[24 * (I8_STAGE_COLS / 32)];
    __shared__ float s_p2[I8_STAGE_COLS / 32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int nsub = cols >> 5, nch = (int)(row_stride >> 4);
    const int fgroups = (ff + I8S_RF - 1) / I8S_RF;
    const int units = n_pairs * fgroups, stride = gridDim.x * 8;
    const int ub = i8s_unit_bytes(row_stride);
    u8* bufs = s_units + (size_t)warp * 2 * ub;
    // the first unit's copy goes out before the tables and planes are built
    int u = blockIdx.x * 8 + warp;
    const u8* rows[2 * I8S_RF];
    if (u < units) {
        const int e = ids ? ids[u / fgroups] : 0;
        if (e >= 0 && e < n_expert) {
            moe_unit_rows<I8S_RF>(gate, up, expert_stride, row_stride, e, (u % fgroups) * I8S_RF, ff, rows);
            i8s_issue(rows, nch, row_stride, bufs, lane);
        }
    }
    cp_async_commit();
    i8_stage_planes(X, nsub, s_xq, s_p2, I8S_PSTRIDE);
    stage_iq2_nibble_tables(s_gnib, s_snib);
    __syncthreads();
    const u32 gtab = smem_u32(s_gnib) + 4u * (u32)(lane & (I8S_TAB_COPIES - 1));
    const u32 stab = smem_u32(s_snib) + 4u * (u32)(lane & (I8S_TAB_COPIES - 1));
    for (int it = 0; u < units; u += stride, ++it) {
        const int pair = u / fgroups, f0 = (u % fgroups) * I8S_RF;
        const int e = ids ? ids[pair] : 0;
        const bool bad = e < 0 || e >= n_expert;
        {                                                          // the next unit's copy into the other buffer
            const int un = u + stride;
            if (un < units) {
                const int en = ids ? ids[un / fgroups] : 0;
                if (en >= 0 && en < n_expert) {
                    moe_unit_rows<I8S_RF>(gate, up, expert_stride, row_stride, en, (un % fgroups) * I8S_RF, ff, rows);
                    i8s_issue(rows, nch, row_stride, bufs + ((it + 1) & 1) * ub, lane);
                }
            }
            cp_async_commit();
        }
        asm volatile("cp.async.wait_group 1;" ::: "memory");      // this unit's copy (the older group) landed
        __syncwarp();
        const u8* buf = bufs + (it & 1) * ub;
        float acc[2 * I8S_RF];
#pragma unroll
        for (int r = 0; r < 2 * I8S_RF; ++r) acc[r] = 0.f;
        if (!bad) {
            constexpr int sunroll = I8S_UNROLL;
#pragma unroll sunroll
            for (int sb = lane; sb < nsub; sb += 32) {
                I8XPlanes xq;
#pragma unroll
                for (int w = 0; w < 8; ++w) {
                    xq.h[w] = s_xq[w * I8S_PSTRIDE + sb];
                    xq.c[w] = s_xq[(8 + w) * I8S_PSTRIDE + sb];
                    xq.l[w] = s_xq[(16 + w) * I8S_PSTRIDE + sb];
                }
                xq.p2 = s_p2[sb];
                const int bo = (sb >> 3) * 66, qo = bo + 2 + 8 * (sb & 7);
                const u32 dsh = 8u * (u32)(bo & 2), qsh = 8u * (u32)(qo & 2);
#pragma unroll
                for (int r = 0; r < 2 * I8S_RF; ++r) {
                    const u32* w32 = reinterpret_cast<const u32*>(buf + r * row_stride);
                    const u32 d = (w32[bo >> 2] >> dsh) & 0xFFFFu;
                    const u32 q0 = w32[qo >> 2], q1 = w32[(qo >> 2) + 1], q2 = w32[(qo >> 2) + 2];
                    const u32 g4 = __funnelshift_r(q0, q1, qsh), aux = __funnelshift_r(q1, q2, qsh);
                    const float v = i8s_subblock(g4, aux, xq, gtab, stab);
                    const float db = f16_to_f32((u16)d) * (__uint_as_float(0x4B000000u | (aux >> 28)) - 8388607.5f);
                    acc[r] = fmaf(db * 0.25f, v, acc[r]);
                }
            }
        }
        __syncwarp();                                              // buffer free before the copy after next
        moe_swiglu_store<I8S_RF>(acc, lane, pair, f0, ff, clamp, weights, bad, mid);
    }
    cp_async_wait_all();
}

// ---------------------------------------------------------------------------------------------------------------------
// moe_down_xs_q2_k: moe_down_fast_q2_k for one token (n == 1), bit-identical to it (switch MOE_STAGED, quant_ops picks
// it), with the token's k x ff mid values copied once per CTA into shared memory. H200 ncu at eadf732: the per-lane
// kernel keeps L1 72 % busy at 13 % of DRAM bandwidth, mostly on its activation loads: a lane's float4 loads of one
// slice touch 16 cache lines per warp instruction, for every expert and every RD rows. Here those loads come from
// shared memory, 16-byte chunk c stored at slot c ^ ((c >> 5) & 7) so that the 32 lanes of one float4 load spread
// over all 8 bank groups (4 wavefronts, the minimum for 512 bytes). Same slices per lane, same expert order, same
// float steps (MoeQ2K::dot_rows_x) and warp sums as the kernel above. mid: float32 [1, k, ff], 16-byte aligned, k ff
// <= 12,288 (48 KB: dynamic shared memory 4 k ff bytes). Launch: 256 threads, grid = min(ceil(units / 8), resident
// CTAs), units = ceil(D / XS_RD).
// Reference: moe_down_fast_q2_k (bit for bit; tests/test_gpu_moe_staged.py).
#ifndef XS_RD
#define XS_RD 4
#endif
#ifndef XS_JUNROLL
#define XS_JUNROLL 1             // experts whose rows are loaded together (unrolled expert loop)
#endif

__device__ __forceinline__ int xs_slot(int c) { return c ^ ((c >> 5) & 7); }

// the token's k x ff mid values into shared memory, float4 c at slot xs_slot(c) (the caller syncs)
__device__ __forceinline__ void xs_stage_mid(const float* mid, int nchunk, float4* s_mid) {
    for (int c = threadIdx.x; c < nchunk; c += blockDim.x) s_mid[xs_slot(c)] = ld_x4(mid + 4 * c);
}

// acc[r] += rows[r] . mid[j] over the lane's Q2_K slices (rows_dot's order and unrolling), mid from the staged copy
template <int RD>
__device__ __forceinline__ void xs_rows_dot(const u8* const* rows, const float4* s_mid, int j, int ff, int lane,
                                            float* acc) {
    constexpr int unroll = DS4_MOE_UNROLL;
#pragma unroll unroll
    for (int s = lane; s < ff / MoeQ2K::QK * MoeQ2K::SL; s += 32) {
        const int blk = s / MoeQ2K::SL, cb = (j * ff + blk * MoeQ2K::QK) / 4;
        MoeQ2K::dot_rows_x<RD>(rows, (size_t)blk * MoeQ2K::BYTES, s % MoeQ2K::SL,
                               [s_mid, cb](int i) { return s_mid[xs_slot(cb + i)]; }, acc);
    }
}

extern "C" __global__ void __launch_bounds__(256, 2) moe_down_xs_q2_k(
    const u8* down, long long expert_stride, long long row_stride, const int* ids, int k, int n_expert,
    const float* mid, int ff, float* Y, int D, int accumulate) {
    DS4_PDL_ENTRY();
    extern __shared__ __align__(16) float4 s_mid[];
    const int nchunk = k * ff / 4;
    xs_stage_mid(mid, nchunk, s_mid);
    __syncthreads();
    const int lane = threadIdx.x & 31;
    const int units = (D + XS_RD - 1) / XS_RD;
    for (int u = blockIdx.x * 8 + (threadIdx.x >> 5); u < units; u += gridDim.x * 8) {
        const int d0 = u * XS_RD;
        float acc[XS_RD];
#pragma unroll
        for (int r = 0; r < XS_RD; ++r) acc[r] = 0.f;
        bool bad = false;
        constexpr int junroll = XS_JUNROLL;
#pragma unroll junroll
        for (int j = 0; j < k; ++j) {
            const int e = ids ? ids[j] : 0;
            if (e < 0 || e >= n_expert) {
                bad = true;
                continue;
            }
            const u8* rows[XS_RD];
#pragma unroll
            for (int r = 0; r < XS_RD; ++r)
                rows[r] = down + (size_t)e * expert_stride + (size_t)min(d0 + r, D - 1) * row_stride;
            xs_rows_dot<XS_RD>(rows, s_mid, j, ff, lane, acc);
        }
        moe_down_store<XS_RD>(acc, lane, d0, D, bad, Y, accumulate);
    }
}

// ---------------------------------------------------------------------------------------------------------------------
// moe_down_xsw_q2_k: moe_down_xs_q2_k with the weights staged too (switch MOE_DOWN_STAGED), bit-identical to it and so
// to moe_down_fast_q2_k. H200 (0970b1b, -DXS_RD=4): moe_down_xs_q2_k takes 20.7 us a layer for 16.5 MB,
// latency-bound: a warp loads one expert's rows, computes, then loads the next expert's (six round trips a unit).
// Measured (36b50d1): 22.7 us alone (bench_moe.py), yet 1.6 % less a decode step (profile_decode.py --ab; see
// docs/PERF_NOTES.md). Here a warp's unit (XSW_RD
// output rows x all k experts: k XSW_RD rows of row_stride bytes, row (j, r) at (j XSW_RD + r) row_stride) is copied
// into the warp's shared buffer by 16-byte cp.async in one go, then computed from shared memory with the same slices,
// expert order, float steps (MoeQ2K::dot_rows_x) and warp sums. row_stride % 16 == 0 (ff % 1024 == 0). Dynamic shared
// memory: 4 k ff (mid, swizzled as moe_down_xs_q2_k) + 8 (k XSW_RD row_stride + 16) bytes (quant_ops.xsw_smem_bytes).
// Launch: 256 threads, grid = min(ceil(units / 8), resident CTAs), units = ceil(D / XSW_RD).
// Reference: moe_down_xs_q2_k / moe_down_fast_q2_k (bit for bit; tests/test_gpu_moe_down_staged.py).
#ifndef XSW_RD
#define XSW_RD 2
#endif

extern "C" __global__ void __launch_bounds__(256, 2) moe_down_xsw_q2_k(
    const u8* down, long long expert_stride, long long row_stride, const int* ids, int k, int n_expert,
    const float* mid, int ff, float* Y, int D, int accumulate) {
    DS4_PDL_ENTRY();
    extern __shared__ __align__(16) float4 s_mid[];             // [k ff / 4] swizzled, then the warps' weight buffers
    const int nchunk = k * ff / 4;
    xs_stage_mid(mid, nchunk, s_mid);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int ub = k * XSW_RD * (int)row_stride + 16, nch = (int)(row_stride >> 4);
    u8* wbuf = reinterpret_cast<u8*>(s_mid + nchunk) + (size_t)warp * ub;
    const int units = (D + XSW_RD - 1) / XSW_RD;
    bool first = true;
    for (int u = blockIdx.x * 8 + warp; u < units; u += gridDim.x * 8) {
        const int d0 = u * XSW_RD;
        bool bad = false;
        for (int j = 0; j < k; ++j) {                             // the unit's rows, all experts, in one go
            const int e = ids ? ids[j] : 0;
            if (e < 0 || e >= n_expert) {
                bad = true;
                continue;
            }
#pragma unroll
            for (int r = 0; r < XSW_RD; ++r) {
                const u8* src = down + (size_t)e * expert_stride + (size_t)min(d0 + r, D - 1) * row_stride;
                u8* dst = wbuf + (size_t)(j * XSW_RD + r) * row_stride;
                for (int c = lane; c < nch; c += 32) cp_async16(smem_u32(dst + 16 * c), src + 16 * c, 16);
            }
        }
        cp_async_commit();
        if (first) {
            __syncthreads();                                      // mid staged by the whole CTA
            first = false;
        }
        cp_async_wait_all();
        __syncwarp();
        float acc[XSW_RD];
#pragma unroll
        for (int r = 0; r < XSW_RD; ++r) acc[r] = 0.f;
        for (int j = 0; j < k; ++j) {
            const int e = ids ? ids[j] : 0;
            if (e < 0 || e >= n_expert) continue;
            const u8* rows[XSW_RD];
#pragma unroll
            for (int r = 0; r < XSW_RD; ++r) rows[r] = wbuf + (size_t)(j * XSW_RD + r) * row_stride;
            xs_rows_dot<XSW_RD>(rows, s_mid, j, ff, lane, acc);
        }
        __syncwarp();                                             // buffer read before the next unit's copy
        moe_down_store<XSW_RD>(acc, lane, d0, D, bad, Y, accumulate);
    }
    if (first) __syncthreads();                                   // a CTA without units still joins the barrier
}

// ---- Q8_0R (q8_0r.cuh) ----------------------------------------------------------------------------------------------
template <int RF>
__device__ __forceinline__ void moe_gate_up_q8r_body(const u8* gate, const u8* up, long long expert_stride,
                                                     int slab_rows, const int* ids, const float* weights, int k,
                                                     int n_expert, const float* X, int cols, float* mid, int ff,
                                                     float clamp, int wpr) {
    __shared__ float s_red[8];
    const int pair = blockIdx.y, tok = pair / k;
    const int warp = threadIdx.x >> 5;
    const int f0 = (blockIdx.x * (8 / wpr) + warp / wpr) * RF;
    const int t = (warp % wpr) * 32 + (threadIdx.x & 31);
    const int e = ids ? ids[pair] : 0;
    const bool bad = e < 0 || e >= n_expert;
    const int nblk = cols >> 5;
    float acc[2 * RF];
#pragma unroll
    for (int r = 0; r < 2 * RF; ++r) acc[r] = 0.f;
    if (f0 < ff && !bad) {
        Q8RRow rr[2 * RF];
#pragma unroll
        for (int r = 0; r < RF; ++r) {
            const int f = min(f0 + r, ff - 1);
            rr[r] = q8r_row(gate + (size_t)e * expert_stride, f, nblk, slab_rows);
            rr[RF + r] = q8r_row(up + (size_t)e * expert_stride, f, nblk, slab_rows);
        }
        q8r_rows_dot<2 * RF>(rr, Q8RXf32{X + (size_t)tok * cols}, 2 * nblk, t, wpr * 32, acc);
    }
#pragma unroll
    for (int r = 0; r < 2 * RF; ++r) acc[r] = group_sum(acc[r], wpr, s_red);
    if (t == 0) {
        const float w = (weights && !bad) ? weights[pair] : 1.f;
#pragma unroll
        for (int r = 0; r < RF; ++r) {
            if (f0 + r < ff) {
                const float g = fminf(acc[r], clamp);
                const float u = fminf(fmaxf(acc[RF + r], -clamp), clamp);
                mid[(size_t)pair * ff + f0 + r] = bad ? __int_as_float(0x7fc00000) : silu_f32(g) * u * w;
            }
        }
    }
}

template <int RD>
__device__ __forceinline__ void moe_down_q8r_body(const u8* down, long long expert_stride, int slab_rows,
                                                  const int* ids, int k, int n_expert, const float* mid, int ff,
                                                  float* Y, int D, int accumulate, int wpr) {
    __shared__ float s_red[8];
    const int tok = blockIdx.y;
    const int warp = threadIdx.x >> 5;
    const int d0 = (blockIdx.x * (8 / wpr) + warp / wpr) * RD;
    const int t = (warp % wpr) * 32 + (threadIdx.x & 31);
    const int nblk = ff >> 5;
    float acc[RD];
#pragma unroll
    for (int r = 0; r < RD; ++r) acc[r] = 0.f;
    bool bad = false;
    if (d0 < D) {
        for (int j = 0; j < k; ++j) {
            const int e = ids ? ids[tok * k + j] : 0;
            if (e < 0 || e >= n_expert) {
                bad = true;
                continue;
            }
            Q8RRow rr[RD];
#pragma unroll
            for (int r = 0; r < RD; ++r)
                rr[r] = q8r_row(down + (size_t)e * expert_stride, min(d0 + r, D - 1), nblk, slab_rows);
            q8r_rows_dot<RD>(rr, Q8RXf32{mid + ((size_t)tok * k + j) * ff}, 2 * nblk, t, wpr * 32, acc);
        }
    }
#pragma unroll
    for (int r = 0; r < RD; ++r) acc[r] = group_sum(acc[r], wpr, s_red);
    if (t == 0) {
#pragma unroll
        for (int r = 0; r < RD; ++r) {
            if (d0 + r < D) {
                float* y = Y + (size_t)tok * D + d0 + r;
                const float v = bad ? __int_as_float(0x7fc00000) : acc[r];
                *y = accumulate ? *y + v : v;
            }
        }
    }
}

// the second __launch_bounds__ argument: CTAs per SM the register allocation aims at (see matvec.cu)
#define DS4_MOE_Q8R(R, MINB)                                                                                      \
    extern "C" __global__ void __launch_bounds__(256, MINB) moe_gate_up_q8_0r_r##R(                              \
        const u8* gate, const u8* up, long long expert_stride, int slab_rows, const int* ids,                    \
        const float* weights, int k, int n_expert, const float* X, int cols, float* mid, int ff, float clamp,    \
        int wpr) {                                                                                               \
        DS4_PDL_ENTRY();                                                                                         \
        moe_gate_up_q8r_body<R>(gate, up, expert_stride, slab_rows, ids, weights, k, n_expert, X, cols, mid, ff, \
                                clamp, wpr);                                                                     \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(256, MINB) moe_down_q8_0r_r##R(                                 \
        const u8* down, long long expert_stride, int slab_rows, const int* ids, int k, int n_expert,             \
        const float* mid, int ff, float* Y, int D, int accumulate, int wpr) {                                    \
        DS4_PDL_ENTRY();                                                                                         \
        moe_down_q8r_body<R>(down, expert_stride, slab_rows, ids, k, n_expert, mid, ff, Y, D, accumulate, wpr);  \
    }

DS4_MOE_Q8R(1, 2)
DS4_MOE_Q8R(2, 2)
