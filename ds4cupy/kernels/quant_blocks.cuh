// quant_blocks.cuh: GGUF block formats on the GPU (decode in registers), shared by matvec.cu, matmul.cu, moe.cu,
// random_blocks.cu.
//
// Every format is a traits struct:
//   QK      elements per block             BYTES   bytes per block (the raw GGUF block, ds4cupy/format/quants.py docstring)
//   SLICES  threads that share one block in the dot products (each thread reads a contiguous part of the block, so
//           consecutive lanes read consecutive bytes and a warp's loads coalesce)
//   value(blk, i)                          element i (0 <= i < QK) of the block, float32, rounded exactly as
//                                          ds4cupy.format.quants.dequantize / gguf.quants.dequantize (bit-exact: __fmul_rn
//                                          and friends keep the compiler from contracting into FMAs)
//   dot_slice(blk, s, x, grid)             sum over the elements of slice s of value * x[element]; x points at the
//                                          block's first activation (16-byte aligned: QK is a multiple of 4 floats)
// Weights are read as stored: 2-byte loads where the block size only guarantees 2-byte alignment (Q8_0 34,
// IQ2_XXS 66), 4/8/16-byte loads where it allows more (Q2_K 84, NVFP4 36, Q4_K 144, plain types).
// No host headers: f16 conversions are single PTX instructions. Warp reductions come from common.cuh.
#pragma once
#include "common.cuh"

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

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

__device__ __forceinline__ float bf16_to_f32(u16 b) { return __uint_as_float(((u32)b) << 16); }

__device__ __forceinline__ u16 ld_u16(const u8* p) { return *reinterpret_cast<const u16*>(p); }
__device__ __forceinline__ u32 ld_u32(const u8* p) { return *reinterpret_cast<const u32*>(p); }
// a 32-bit word at a 2-byte aligned address
__device__ __forceinline__ u32 ld_u32_a2(const u8* p) { return (u32)ld_u16(p) | ((u32)ld_u16(p + 2) << 16); }

__device__ __forceinline__ float4 ld_x4(const float* x) { return *reinterpret_cast<const float4*>(x); }

// Exact int -> float without I2F (a quarter-rate instruction on sm_90): a byte permute builds the float 2^23 + b,
// one FADD removes 2^23. k (0..3) must be a compile-time constant after unrolling.
// float value of byte k of w (unsigned)
__device__ __forceinline__ float byte_f32(u32 w, int k) {
    return __uint_as_float(__byte_perm(w, 0x4B00u, 0x5440u | (u32)k)) - 8388608.f;
}
// byte k of w read as 0x80 + v with v a signed value in [-128, 127]: returns v (int8 bytes: pass w ^ 0x80808080)
__device__ __forceinline__ float sbyte_f32(u32 w, int k) {
    return __uint_as_float(__byte_perm(w, 0x4B00u, 0x5440u | (u32)k)) - 8388736.f;
}
__device__ __forceinline__ float small_f32(u32 v) { return __uint_as_float(0x4B000000u | v) - 8388608.f; }  // v < 2^23

// doubled E2M1 values of a nibble (MXFP4, NVFP4)
__device__ __forceinline__ float fp4_kvalue(u32 nib) {
    const float mag[8] = {0.f, 1.f, 2.f, 3.f, 4.f, 6.f, 8.f, 12.f};
    const float v = mag[nib & 7];
    return (nib & 8) ? -v : v;
}

// MXFP4 shared exponent byte -> 2^(e - 128) (gguf's e8m0_to_fp32_half)
__device__ __forceinline__ float e8m0_half(u32 e) {
    return __uint_as_float(e < 2 ? (0x00200000u << e) : ((e - 1u) << 23));
}

// NVFP4 scale byte (unsigned E4M3) * 0.5 (gguf's ue4m3_to_fp32); 0x00 and 0x7F decode to 0
__device__ __forceinline__ float ue4m3_half(u32 x) {
    const u32 ex = (x >> 3) & 15u, man = x & 7u;
    if (x == 0u || x == 0x7Fu) return 0.f;
    const float v = ex == 0u ? (float)man * 0.001953125f               // man * 2^-9
                             : (float)(8u + man) * __uint_as_float((ex + 117u) << 23);  // (8+man) * 2^(ex-10)
    return v * 0.5f;
}

// IQ2_XXS: 256 grid entries of 8 magnitudes (bytes 0x08, 0x19, 0x2b = 8, 25, 43); equal to gguf's IQ2_XXS grid
// (tests/test_kernel_compile.py checks this table against ds4cupy.format.quants.iq2xxs_grid()).
__device__ const u64 IQ2XXS_GRID[256] = {
    0x0808080808080808ull, 0x080808080808082bull, 0x0808080808081919ull, 0x0808080808082b08ull,
    0x0808080808082b2bull, 0x0808080808190819ull, 0x0808080808191908ull, 0x08080808082b0808ull,
    0x08080808082b082bull, 0x08080808082b2b08ull, 0x08080808082b2b2bull, 0x0808080819080819ull,
    0x0808080819081908ull, 0x0808080819190808ull, 0x0808080819192b08ull, 0x08080808192b0819ull,
    0x08080808192b1908ull, 0x080808082b080808ull, 0x080808082b08082bull, 0x080808082b082b2bull,
    0x080808082b2b082bull, 0x0808081908080819ull, 0x0808081908081908ull, 0x0808081908190808ull,
    0x0808081908191919ull, 0x0808081919080808ull, 0x080808192b081908ull, 0x080808192b192b08ull,
    0x0808082b08080808ull, 0x0808082b0808082bull, 0x0808082b082b082bull, 0x0808082b2b08082bull,
    0x0808190808080819ull, 0x0808190808081908ull, 0x0808190808190808ull, 0x08081908082b0819ull,
    0x08081908082b1908ull, 0x0808190819080808ull, 0x080819081908082bull, 0x0808190819082b08ull,
    0x08081908192b0808ull, 0x080819082b080819ull, 0x080819082b081908ull, 0x080819082b190808ull,
    0x080819082b2b1908ull, 0x0808191908080808ull, 0x080819190808082bull, 0x0808191908082b08ull,
    0x08081919082b0808ull, 0x080819191908192bull, 0x08081919192b2b19ull, 0x080819192b080808ull,
    0x080819192b190819ull, 0x0808192b08082b19ull, 0x0808192b08190808ull, 0x0808192b19080808ull,
    0x0808192b2b081908ull, 0x0808192b2b2b1908ull, 0x08082b0808080808ull, 0x08082b0808081919ull,
    0x08082b0808082b08ull, 0x08082b0808191908ull, 0x08082b08082b2b08ull, 0x08082b0819080819ull,
    0x08082b0819081908ull, 0x08082b0819190808ull, 0x08082b081919082bull, 0x08082b082b082b08ull,
    0x08082b1908081908ull, 0x08082b1919080808ull, 0x08082b2b0808082bull, 0x08082b2b08191908ull,
    0x0819080808080819ull, 0x0819080808081908ull, 0x0819080808190808ull, 0x08190808082b0819ull,
    0x0819080819080808ull, 0x08190808192b0808ull, 0x081908082b081908ull, 0x081908082b190808ull,
    0x081908082b191919ull, 0x0819081908080808ull, 0x0819081908082b08ull, 0x08190819082b0808ull,
    0x0819081919190808ull, 0x0819081919192b2bull, 0x081908192b080808ull, 0x0819082b082b1908ull,
    0x0819082b19081919ull, 0x0819190808080808ull, 0x0819190808082b08ull, 0x08191908082b0808ull,
    0x08191908082b1919ull, 0x0819190819082b19ull, 0x081919082b080808ull, 0x0819191908192b08ull,
    0x08191919192b082bull, 0x0819192b08080808ull, 0x0819192b0819192bull, 0x08192b0808080819ull,
    0x08192b0808081908ull, 0x08192b0808190808ull, 0x08192b0819080808ull, 0x08192b082b080819ull,
    0x08192b1908080808ull, 0x08192b1908081919ull, 0x08192b192b2b0808ull, 0x08192b2b19190819ull,
    0x082b080808080808ull, 0x082b08080808082bull, 0x082b080808082b2bull, 0x082b080819081908ull,
    0x082b0808192b0819ull, 0x082b08082b080808ull, 0x082b08082b08082bull, 0x082b0819082b2b19ull,
    0x082b081919082b08ull, 0x082b082b08080808ull, 0x082b082b0808082bull, 0x082b190808080819ull,
    0x082b190808081908ull, 0x082b190808190808ull, 0x082b190819080808ull, 0x082b19081919192bull,
    0x082b191908080808ull, 0x082b191919080819ull, 0x082b1919192b1908ull, 0x082b192b2b190808ull,
    0x082b2b0808082b08ull, 0x082b2b08082b0808ull, 0x082b2b082b191908ull, 0x082b2b2b19081908ull,
    0x1908080808080819ull, 0x1908080808081908ull, 0x1908080808190808ull, 0x1908080808192b08ull,
    0x19080808082b0819ull, 0x19080808082b1908ull, 0x1908080819080808ull, 0x1908080819082b08ull,
    0x190808081919192bull, 0x19080808192b0808ull, 0x190808082b080819ull, 0x190808082b081908ull,
    0x190808082b190808ull, 0x1908081908080808ull, 0x19080819082b0808ull, 0x19080819192b0819ull,
    0x190808192b080808ull, 0x190808192b081919ull, 0x1908082b08080819ull, 0x1908082b08190808ull,
    0x1908082b19082b08ull, 0x1908082b1919192bull, 0x1908082b192b2b08ull, 0x1908190808080808ull,
    0x1908190808082b08ull, 0x19081908082b0808ull, 0x190819082b080808ull, 0x190819082b192b19ull,
    0x190819190819082bull, 0x19081919082b1908ull, 0x1908192b08080808ull, 0x19082b0808080819ull,
    0x19082b0808081908ull, 0x19082b0808190808ull, 0x19082b0819080808ull, 0x19082b0819081919ull,
    0x19082b1908080808ull, 0x19082b1919192b08ull, 0x19082b19192b0819ull, 0x19082b192b08082bull,
    0x19082b2b19081919ull, 0x19082b2b2b190808ull, 0x1919080808080808ull, 0x1919080808082b08ull,
    0x1919080808190819ull, 0x1919080808192b19ull, 0x19190808082b0808ull, 0x191908082b080808ull,
    0x191908082b082b08ull, 0x1919081908081908ull, 0x191908191908082bull, 0x191908192b2b1908ull,
    0x1919082b2b190819ull, 0x191919082b190808ull, 0x191919082b19082bull, 0x1919191908082b2bull,
    0x1919192b08080819ull, 0x1919192b19191908ull, 0x19192b0808080808ull, 0x19192b0808190819ull,
    0x19192b0808192b19ull, 0x19192b08192b1908ull, 0x19192b1919080808ull, 0x19192b2b08082b08ull,
    0x192b080808081908ull, 0x192b080808190808ull, 0x192b080819080808ull, 0x192b0808192b2b08ull,
    0x192b081908080808ull, 0x192b081919191919ull, 0x192b082b08192b08ull, 0x192b082b192b0808ull,
    0x192b190808080808ull, 0x192b190808081919ull, 0x192b191908190808ull, 0x192b19190819082bull,
    0x192b19192b081908ull, 0x192b2b081908082bull, 0x2b08080808080808ull, 0x2b0808080808082bull,
    0x2b08080808082b2bull, 0x2b08080819080819ull, 0x2b0808082b08082bull, 0x2b08081908081908ull,
    0x2b08081908192b08ull, 0x2b08081919080808ull, 0x2b08082b08190819ull, 0x2b08190808080819ull,
    0x2b08190808081908ull, 0x2b08190808190808ull, 0x2b08190808191919ull, 0x2b08190819080808ull,
    0x2b081908192b0808ull, 0x2b08191908080808ull, 0x2b0819191908192bull, 0x2b0819192b191908ull,
    0x2b08192b08082b19ull, 0x2b08192b19080808ull, 0x2b08192b192b0808ull, 0x2b082b080808082bull,
    0x2b082b1908081908ull, 0x2b082b2b08190819ull, 0x2b19080808081908ull, 0x2b19080808190808ull,
    0x2b190808082b1908ull, 0x2b19080819080808ull, 0x2b1908082b2b0819ull, 0x2b1908190819192bull,
    0x2b1908192b080808ull, 0x2b19082b19081919ull, 0x2b19190808080808ull, 0x2b191908082b082bull,
    0x2b19190819081908ull, 0x2b19191919190819ull, 0x2b192b082b080819ull, 0x2b192b19082b0808ull,
    0x2b2b08080808082bull, 0x2b2b080819190808ull, 0x2b2b08082b081919ull, 0x2b2b081908082b19ull,
    0x2b2b082b08080808ull, 0x2b2b190808192b08ull, 0x2b2b2b0819190808ull, 0x2b2b2b1908081908ull,
};

// the sign byte of a 7-bit index: bit 7 makes the popcount even
__device__ __forceinline__ u32 iq2_signs(u32 idx7) { return idx7 | ((__popc(idx7) & 1u) << 7); }

// ---------------------------------------------------------------------------------------------------------------------
struct BlockQ8_0 {  // f16 d | int8 q[32]
    static constexpr int QK = 32, BYTES = 34, SLICES = 4;
    static __device__ __forceinline__ float value(const u8* b, int i) {
        return __fmul_rn((float)(signed char)b[2 + i], f16_to_f32(ld_u16(b)));
    }
    static __device__ __forceinline__ float dot_slice(const u8* b, int s, const float* x, const u64*) {
        const float d = f16_to_f32(ld_u16(b));
        const u8* q = b + 2 + 8 * s;
        const float4 x0 = ld_x4(x + 8 * s), x1 = ld_x4(x + 8 * s + 4);
        const u32 w0 = ld_u32_a2(q), w1 = ld_u32_a2(q + 4);
        float acc = (float)(signed char)(w0) * x0.x;
        acc = fmaf((float)(signed char)(w0 >> 8), x0.y, acc);
        acc = fmaf((float)(signed char)(w0 >> 16), x0.z, acc);
        acc = fmaf((float)(signed char)(w0 >> 24), x0.w, acc);
        acc = fmaf((float)(signed char)(w1), x1.x, acc);
        acc = fmaf((float)(signed char)(w1 >> 8), x1.y, acc);
        acc = fmaf((float)(signed char)(w1 >> 16), x1.z, acc);
        acc = fmaf((float)(signed char)(w1 >> 24), x1.w, acc);
        return d * acc;
    }
};

struct BlockQ2_K {  // u8 scales[16] | u8 qs[64] | f16 d | f16 dmin; element 128h + 32s + l = (qs[32h + l] >> 2s) & 3
    static constexpr int QK = 256, BYTES = 84, SLICES = 4;
    static __device__ __forceinline__ float value(const u8* b, int i) {
        const float d = f16_to_f32(ld_u16(b + 80)), dmin = f16_to_f32(ld_u16(b + 82));
        const u32 sc = b[i >> 4];
        const u32 q = (b[16 + 32 * (i >> 7) + (i & 31)] >> (2 * ((i >> 5) & 3))) & 3u;
        return __fsub_rn(__fmul_rn(__fmul_rn(d, (float)(sc & 15u)), (float)q), __fmul_rn(dmin, (float)(sc >> 4)));
    }
    // slice s = (h, half): qs bytes 32h + 16half .. +16, elements 128h + 32sh + 16half + l for the 4 shifts sh
    static __device__ __forceinline__ float dot_slice(const u8* b, int s, const float* x, const u64*) {
        const int h = s >> 1, half = s & 1;
        const float d = f16_to_f32(ld_u16(b + 80)), dmin = f16_to_f32(ld_u16(b + 82));
        const u8* qp = b + 16 + 32 * h + 16 * half;  // 4-byte aligned (84-byte blocks)
        const u32 qw[4] = {ld_u32(qp), ld_u32(qp + 4), ld_u32(qp + 8), ld_u32(qp + 12)};
        float acc = 0.f;
#pragma unroll
        for (int sh = 0; sh < 4; ++sh) {
            const int e0 = 128 * h + 32 * sh + 16 * half;
            const u32 sc = b[e0 >> 4];
            float dot = 0.f, sum = 0.f;
#pragma unroll
            for (int w = 0; w < 4; ++w) {
                const float4 xv = ld_x4(x + e0 + 4 * w);
                const u32 v = qw[w] >> (2 * sh);
                dot = fmaf((float)(v & 3u), xv.x, dot);
                dot = fmaf((float)((v >> 8) & 3u), xv.y, dot);
                dot = fmaf((float)((v >> 16) & 3u), xv.z, dot);
                dot = fmaf((float)((v >> 24) & 3u), xv.w, dot);
                sum += (xv.x + xv.y) + (xv.z + xv.w);
            }
            acc = fmaf(d * (float)(sc & 15u), dot, acc);
            acc = fmaf(-dmin * (float)(sc >> 4), sum, acc);
        }
        return acc;
    }
};

// Q4_K's packed 6-bit scale and min of sub-block j (0..7)
__device__ __forceinline__ void q4_k_scale_min(const u8* s, int j, u32& sc, u32& m) {
    if (j < 4) {
        sc = s[j] & 63u;
        m = s[j + 4] & 63u;
    } else {
        sc = (s[j + 4] & 15u) | ((s[j - 4] >> 6) << 4);
        m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

struct BlockQ4_K {  // f16 d | f16 dmin | u8 scales[12] | u8 qs[128]; element 64i + l = qs[32i + l%32] lo (l<32) / hi
    static constexpr int QK = 256, BYTES = 144, SLICES = 16;
    static __device__ __forceinline__ float value(const u8* b, int i) {
        const float d = f16_to_f32(ld_u16(b)), dmin = f16_to_f32(ld_u16(b + 2));
        const int j = i >> 5;
        u32 sc, m;
        q4_k_scale_min(b + 4, j, sc, m);
        const u32 q = (b[16 + 32 * (j >> 1) + (i & 31)] >> (4 * (j & 1))) & 15u;
        return __fsub_rn(__fmul_rn(__fmul_rn(d, (float)sc), (float)q), __fmul_rn(dmin, (float)m));
    }
    // slice s = (i, part): qs bytes 32i + 8part .. +8: elements 64i + 8part + l (lo) and 64i + 32 + 8part + l (hi)
    static __device__ __forceinline__ float dot_slice(const u8* b, int s, const float* x, const u64*) {
        const int i = s >> 2, part = s & 3;
        const float d = f16_to_f32(ld_u16(b)), dmin = f16_to_f32(ld_u16(b + 2));
        const uint2 q = *reinterpret_cast<const uint2*>(b + 16 + 32 * i + 8 * part);
        float acc = 0.f;
#pragma unroll
        for (int hi = 0; hi < 2; ++hi) {
            u32 sc, m;
            q4_k_scale_min(b + 4, 2 * i + hi, sc, m);
            const float* xs = x + 64 * i + 32 * hi + 8 * part;
            const float4 x0 = ld_x4(xs), x1 = ld_x4(xs + 4);
            const u32 v0 = q.x >> (4 * hi), v1 = q.y >> (4 * hi);
            float dot = (float)(v0 & 15u) * x0.x;
            dot = fmaf((float)((v0 >> 8) & 15u), x0.y, dot);
            dot = fmaf((float)((v0 >> 16) & 15u), x0.z, dot);
            dot = fmaf((float)((v0 >> 24) & 15u), x0.w, dot);
            dot = fmaf((float)(v1 & 15u), x1.x, dot);
            dot = fmaf((float)((v1 >> 8) & 15u), x1.y, dot);
            dot = fmaf((float)((v1 >> 16) & 15u), x1.z, dot);
            dot = fmaf((float)((v1 >> 24) & 15u), x1.w, dot);
            const float sum = ((x0.x + x0.y) + (x0.z + x0.w)) + ((x1.x + x1.y) + (x1.z + x1.w));
            acc = fmaf(d * (float)sc, dot, acc);
            acc = fmaf(-dmin * (float)m, sum, acc);
        }
        return acc;
    }
};

struct BlockIQ2_XXS {  // f16 d | 8 x (u32 aux0: 4 grid indices, u32 aux1: 4 x 7-bit sign indices + 4-bit scale)
    static constexpr int QK = 256, BYTES = 66, SLICES = 8;
    static __device__ __forceinline__ float value(const u8* b, int i) {
        const float d = f16_to_f32(ld_u16(b));
        const int ib = i >> 5, l = (i >> 3) & 3, k = i & 7;
        const u32 aux1 = ld_u32_a2(b + 2 + 8 * ib + 4);
        const u32 gidx = b[2 + 8 * ib + l];
        const float db = __fmul_rn(__fmul_rn(d, 0.5f + (float)(aux1 >> 28)), 0.25f);
        const float g = (float)((IQ2XXS_GRID[gidx] >> (8 * k)) & 0xFFu);
        const float v = __fmul_rn(db, g);
        return ((iq2_signs((aux1 >> (7 * l)) & 127u) >> k) & 1u) ? -v : v;
    }
    // slice = sub-block ib: 32 elements, grid rows from `grid` (shared memory copy of IQ2XXS_GRID)
    static __device__ __forceinline__ float dot_slice(const u8* b, int ib, const float* x, const u64* grid) {
        const float d = f16_to_f32(ld_u16(b));
        const u32 aux0 = ld_u32_a2(b + 2 + 8 * ib), aux1 = ld_u32_a2(b + 2 + 8 * ib + 4);
        const float* xs = x + 32 * ib;
        float acc = 0.f;
#pragma unroll
        for (int l = 0; l < 4; ++l) {
            const u64 g = grid[(aux0 >> (8 * l)) & 0xFFu];
            const u32 sg = iq2_signs((aux1 >> (7 * l)) & 127u);
            const float4 x0 = ld_x4(xs + 8 * l), x1 = ld_x4(xs + 8 * l + 4);
            const float xv[8] = {x0.x, x0.y, x0.z, x0.w, x1.x, x1.y, x1.z, x1.w};
#pragma unroll
            for (int k = 0; k < 8; ++k) {
                const float gv = (float)((u32)(g >> (8 * k)) & 0xFFu);
                acc = fmaf((sg >> k) & 1u ? -gv : gv, xv[k], acc);
            }
        }
        return d * (0.5f + (float)(aux1 >> 28)) * 0.25f * acc;
    }
};

struct BlockMXFP4 {  // u8 e | u8 qs[16]; element j = qs[j] & 15, element j + 16 = qs[j] >> 4
    static constexpr int QK = 32, BYTES = 17, SLICES = 2;
    static __device__ __forceinline__ float value(const u8* b, int i) {
        const u32 nib = (b[1 + (i & 15)] >> (4 * (i >> 4))) & 15u;
        return __fmul_rn(e8m0_half(b[0]), fp4_kvalue(nib));
    }
    // slice s: qs bytes 8s .. 8s+7: elements 8s + j and 16 + 8s + j
    static __device__ __forceinline__ float dot_slice(const u8* b, int s, const float* x, const u64*) {
        const float d = e8m0_half(b[0]);
        const float4 a0 = ld_x4(x + 8 * s), a1 = ld_x4(x + 8 * s + 4);
        const float4 c0 = ld_x4(x + 16 + 8 * s), c1 = ld_x4(x + 16 + 8 * s + 4);
        const float lo[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
        const float hi[8] = {c0.x, c0.y, c0.z, c0.w, c1.x, c1.y, c1.z, c1.w};
        float acc = 0.f;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const u32 q = b[1 + 8 * s + j];
            acc = fmaf(fp4_kvalue(q & 15u), lo[j], acc);
            acc = fmaf(fp4_kvalue(q >> 4), hi[j], acc);
        }
        return d * acc;
    }
};

struct BlockNVFP4 {  // u8 scales[4] (UE4M3) | u8 qs[32]; sub-block s element j = qs[8s + j%8] lo (j<8) / hi (j>=8)
    static constexpr int QK = 64, BYTES = 36, SLICES = 4;
    static __device__ __forceinline__ float value(const u8* b, int i) {
        const int s = i >> 4, j = i & 15;
        const u32 nib = (b[4 + 8 * s + (j & 7)] >> (4 * (j >> 3))) & 15u;
        return __fmul_rn(ue4m3_half(b[s]), fp4_kvalue(nib));
    }
    static __device__ __forceinline__ float dot_slice(const u8* b, int s, const float* x, const u64*) {
        const float d = ue4m3_half(b[s]);
        const u32 w0 = ld_u32(b + 4 + 8 * s), w1 = ld_u32(b + 8 + 8 * s);
        const float4 a0 = ld_x4(x + 16 * s), a1 = ld_x4(x + 16 * s + 4);
        const float4 c0 = ld_x4(x + 16 * s + 8), c1 = ld_x4(x + 16 * s + 12);
        const float lo[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
        const float hi[8] = {c0.x, c0.y, c0.z, c0.w, c1.x, c1.y, c1.z, c1.w};
        float acc = 0.f;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const u32 q = ((j < 4 ? w0 : w1) >> (8 * (j & 3))) & 0xFFu;
            acc = fmaf(fp4_kvalue(q & 15u), lo[j], acc);
            acc = fmaf(fp4_kvalue(q >> 4), hi[j], acc);
        }
        return d * acc;
    }
};

// plain types: a "block" is 16 bytes (4 float32 / 8 half / 8 bfloat16); rows must be whole such blocks
struct BlockF32 {
    static constexpr int QK = 4, BYTES = 16, SLICES = 1;
    static __device__ __forceinline__ float value(const u8* b, int i) { return reinterpret_cast<const float*>(b)[i]; }
    static __device__ __forceinline__ float dot_slice(const u8* b, int, const float* x, const u64*) {
        const float4 w = *reinterpret_cast<const float4*>(b);
        const float4 xv = ld_x4(x);
        return fmaf(w.w, xv.w, fmaf(w.z, xv.z, fmaf(w.y, xv.y, w.x * xv.x)));
    }
};

template <bool BF>
struct BlockHalf16 {
    static constexpr int QK = 8, BYTES = 16, SLICES = 1;
    static __device__ __forceinline__ float cvt(u32 h) { return BF ? bf16_to_f32((u16)h) : f16_to_f32((u16)h); }
    static __device__ __forceinline__ float value(const u8* b, int i) { return cvt(ld_u16(b + 2 * i)); }
    static __device__ __forceinline__ float dot_slice(const u8* b, int, const float* x, const u64*) {
        const uint4 w = *reinterpret_cast<const uint4*>(b);
        const u32 ws[4] = {w.x, w.y, w.z, w.w};
        const float4 x0 = ld_x4(x), x1 = ld_x4(x + 4);
        const float xv[8] = {x0.x, x0.y, x0.z, x0.w, x1.x, x1.y, x1.z, x1.w};
        float acc = 0.f;
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            acc = fmaf(cvt(ws[k] & 0xFFFFu), xv[2 * k], acc);
            acc = fmaf(cvt(ws[k] >> 16), xv[2 * k + 1], acc);
        }
        return acc;
    }
};
typedef BlockHalf16<false> BlockF16;
typedef BlockHalf16<true> BlockBF16;

// which formats use the IQ2_XXS grid (kernels stage it in shared memory)
template <class BT> struct needs_grid { static constexpr bool value = false; };
template <> struct needs_grid<BlockIQ2_XXS> { static constexpr bool value = true; };

// Stage the grid in shared memory when the format needs it (all threads of the CTA must call this).
template <class BT>
__device__ __forceinline__ const u64* stage_grid(u64* smem_grid) {
    if (needs_grid<BT>::value) {
        for (int i = threadIdx.x; i < 256; i += blockDim.x) smem_grid[i] = IQ2XXS_GRID[i];
        __syncthreads();
    }
    return smem_grid;
}

// Sum over one row: threads t = 0..nt-1 of a row group take slices t, t + nt, ... (block = slice / SLICES), so
// neighbouring threads read neighbouring bytes. row: the row's first block; x: the row's activations [QK * nblocks].
template <class BT>
__device__ __forceinline__ float row_dot(const u8* row, const float* x, int nblocks, int t, int nt, const u64* grid) {
    float acc = 0.f;
    const int total = nblocks * BT::SLICES;
#pragma unroll 4
    for (int s = t; s < total; s += nt) {
        const int blk = s / BT::SLICES, sl = s % BT::SLICES;
        acc += BT::dot_slice(row + (size_t)blk * BT::BYTES, sl, x + (size_t)blk * BT::QK, grid);
    }
    return acc;
}

// Sum v over the `wpr` warps of each row group of a 256-thread CTA (groups = consecutive warps). Every thread calls;
// the group's total is returned to its first thread (t == 0). scratch: shared float[8].
__device__ __forceinline__ float group_sum(float v, int wpr, float* scratch) {
    v = warp_sum(v);
    if (wpr == 1) return v;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float total = 0.f;
    if (lane == 0 && warp % wpr == 0)
        for (int w = 0; w < wpr; ++w) total += scratch[warp + w];
    __syncthreads();
    return total;
}

// Instantiate `MACRO(suffix, BlockType)` for every format (kernel names end in these suffixes).
#define DS4_FOR_EACH_QTYPE(MACRO) \
    MACRO(q8_0, BlockQ8_0)        \
    MACRO(q2_k, BlockQ2_K)        \
    MACRO(q4_k, BlockQ4_K)        \
    MACRO(iq2_xxs, BlockIQ2_XXS)  \
    MACRO(mxfp4, BlockMXFP4)      \
    MACRO(nvfp4, BlockNVFP4)      \
    MACRO(f32, BlockF32)          \
    MACRO(f16, BlockF16)          \
    MACRO(bf16, BlockBF16)
