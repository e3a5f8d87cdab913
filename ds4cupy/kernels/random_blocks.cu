// random_blocks.cu: random VALID weight data generated on the GPU (benchmark models that never touch the host).
//
// random_<type>(out, n, seed, base)
//   block types: out uint8 [n blocks * BYTES], one thread per block; base = the f16 block scale before jitter,
//                chosen by ds4cupy.engines.cuda.random_weights so that the decoded RMS is the asked std
//   F32 / F16 / BF16: out float32 / uint16 [n elements], normal values with std = base
// Same recipes and layout as ds4cupy.format.quants.random_blocks (the CPU version; a different random stream):
//   every quant bit uniformly random, per-block scale jitter uniform in [0.9, 1.1], Q2_K sc 8..15 with
//   m = round(0.75 sc), dmin = 2 d; Q4_K sc 8..23 with m = round(15 sc / 16), dmin = 8 d; IQ2_XXS scales 4..15;
//   MXFP4 / NVFP4 scales: the neighbouring representable values below/above the target, drawn so E[scale^2] is exact.
// Randomness: a counter-based hash of (seed, block, word), so any launch shape gives the same bytes.
#include "quant_blocks.cuh"
#include "pdl.cuh"

__device__ __forceinline__ u64 mix64(u64 z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
__device__ __forceinline__ u64 rand64(u64 seed, u64 blk, u32 ctr) { return mix64(seed ^ mix64(blk * 1024ull + ctr)); }
__device__ __forceinline__ float uniform01(u64 r) { return (float)(r >> 40) * 5.9604644775390625e-08f; }  // [0, 1)
__device__ __forceinline__ float jitter(u64 r) { return 0.9f + 0.2f * uniform01(r); }

// write `nbytes` random bytes starting at word counter ctr0
__device__ __forceinline__ void random_bytes(u8* p, int nbytes, u64 seed, u64 blk, u32 ctr0) {
    for (int i = 0; i < nbytes; i += 8) {
        u64 r = rand64(seed, blk, ctr0 + i / 8);
        for (int b = 0; b < 8 && i + b < nbytes; ++b) p[i + b] = (u8)(r >> (8 * b));
    }
}
__device__ __forceinline__ void put_u16(u8* p, u16 v) { p[0] = (u8)v; p[1] = (u8)(v >> 8); }

// choose between the representable neighbours a <= t <= b so that E[choice^2] = t^2
__device__ __forceinline__ bool pick_upper(float t, float a, float b, u64 r) {
    const float p = fminf(fmaxf((t * t - a * a) / (b * b - a * a), 0.f), 1.f);
    return uniform01(r) < p;
}

extern "C" __global__ void random_q8_0(u8* out, long long n, unsigned long long seed, float base) {
    DS4_PDL_ENTRY();
    for (long long blk = blockIdx.x * (long long)blockDim.x + threadIdx.x; blk < n; blk += (long long)gridDim.x * blockDim.x) {
        u8* p = out + blk * 34;
        put_u16(p, f32_to_f16_rn(base * jitter(rand64(seed, blk, 0))));
        for (int i = 0; i < 32; i += 4) {
            const u64 r = rand64(seed, blk, 1 + i / 4);
            for (int b = 0; b < 4; ++b) {
                const int a = (int)((r >> (16 * b)) & 0xFF) >> 1, c = (int)((r >> (16 * b + 8)) & 0xFF) >> 1;
                p[2 + i + b] = (u8)(signed char)(a + c - 127);
            }
        }
    }
}

extern "C" __global__ void random_q2_k(u8* out, long long n, unsigned long long seed, float base) {
    DS4_PDL_ENTRY();
    for (long long blk = blockIdx.x * (long long)blockDim.x + threadIdx.x; blk < n; blk += (long long)gridDim.x * blockDim.x) {
        u8* p = out + blk * 84;
        const u64 rs = rand64(seed, blk, 1);
        for (int j = 0; j < 16; ++j) {
            const u32 sc = 8u + (u32)((rs >> (4 * j)) & 7u);
            const u32 m = (u32)floorf(0.75f * (float)sc + 0.5f);
            p[j] = (u8)(sc | (m << 4));
        }
        random_bytes(p + 16, 64, seed, blk, 2);
        const u16 d = f32_to_f16_rn(base * jitter(rand64(seed, blk, 0)));
        put_u16(p + 80, d);
        put_u16(p + 82, f32_to_f16_rn(2.f * f16_to_f32(d)));
    }
}

extern "C" __global__ void random_q4_k(u8* out, long long n, unsigned long long seed, float base) {
    DS4_PDL_ENTRY();
    for (long long blk = blockIdx.x * (long long)blockDim.x + threadIdx.x; blk < n; blk += (long long)gridDim.x * blockDim.x) {
        u8* p = out + blk * 144;
        const u16 d = f32_to_f16_rn(base * jitter(rand64(seed, blk, 0)));
        put_u16(p, d);
        put_u16(p + 2, f32_to_f16_rn(8.f * f16_to_f32(d)));
        const u64 rs = rand64(seed, blk, 1);
        u32 sc[8], m[8];
        for (int j = 0; j < 8; ++j) {
            sc[j] = 8u + (u32)((rs >> (4 * j)) & 15u);
            m[j] = (u32)floorf(15.f * (float)sc[j] / 16.f + 0.5f);
        }
        for (int j = 0; j < 4; ++j) {
            p[4 + j] = (u8)((sc[j] & 63u) | ((sc[j + 4] >> 4) << 6));
            p[8 + j] = (u8)((m[j] & 63u) | ((m[j + 4] >> 4) << 6));
            p[12 + j] = (u8)((sc[j + 4] & 15u) | ((m[j + 4] & 15u) << 4));
        }
        random_bytes(p + 16, 128, seed, blk, 2);
    }
}

extern "C" __global__ void random_iq2_xxs(u8* out, long long n, unsigned long long seed, float base) {
    DS4_PDL_ENTRY();
    for (long long blk = blockIdx.x * (long long)blockDim.x + threadIdx.x; blk < n; blk += (long long)gridDim.x * blockDim.x) {
        u8* p = out + blk * 66;
        put_u16(p, f32_to_f16_rn(base * jitter(rand64(seed, blk, 0))));
        for (int ib = 0; ib < 8; ++ib) {
            const u64 r = rand64(seed, blk, 1 + ib);
            const u32 s = 4u + (u32)(rand64(seed, blk, 9 + ib) % 12u);
            const u32 aux0 = (u32)r, aux1 = ((u32)(r >> 32) & 0x0FFFFFFFu) | (s << 28);
            for (int b = 0; b < 4; ++b) {
                p[2 + 8 * ib + b] = (u8)(aux0 >> (8 * b));
                p[6 + 8 * ib + b] = (u8)(aux1 >> (8 * b));
            }
        }
    }
}

extern "C" __global__ void random_mxfp4(u8* out, long long n, unsigned long long seed, float base) {
    DS4_PDL_ENTRY();
    for (long long blk = blockIdx.x * (long long)blockDim.x + threadIdx.x; blk < n; blk += (long long)gridDim.x * blockDim.x) {
        u8* p = out + blk * 17;
        const float t = base * jitter(rand64(seed, blk, 0));
        int ex;
        const float m = frexpf(t, &ex);          // t = m * 2^ex, m in [0.5, 1)
        int e_hi = (m == 0.5f ? ex - 1 : ex) + 128;  // 2^(e_hi - 128) = smallest power of two >= t
        e_hi = max(3, min(254, e_hi));
        const float b = e8m0_half((u32)e_hi), a = e8m0_half((u32)(e_hi - 1));
        p[0] = (u8)(pick_upper(t, a, b, rand64(seed, blk, 1)) ? e_hi : e_hi - 1);
        random_bytes(p + 1, 16, seed, blk, 2);
    }
}

extern "C" __global__ void random_nvfp4(u8* out, long long n, unsigned long long seed, float base) {
    DS4_PDL_ENTRY();
    for (long long blk = blockIdx.x * (long long)blockDim.x + threadIdx.x; blk < n; blk += (long long)gridDim.x * blockDim.x) {
        u8* p = out + blk * 36;
        for (int s = 0; s < 4; ++s) {
            const float t = base * jitter(rand64(seed, blk, 2 * s));
            int lo = 1, hi = 0x7E;               // first code in [2, 0x7E] whose value >= t (codes increase)
            if (t <= ue4m3_half(2)) hi = 2;
            else {
                while (hi - lo > 1) {
                    const int mid = (lo + hi) / 2;
                    if (ue4m3_half((u32)mid) >= t) hi = mid; else lo = mid;
                }
            }
            const u32 code = pick_upper(t, ue4m3_half(hi - 1), ue4m3_half(hi), rand64(seed, blk, 2 * s + 1)) ? hi : hi - 1;
            p[s] = (u8)code;
        }
        random_bytes(p + 4, 32, seed, blk, 8);
    }
}

__device__ __forceinline__ float normal01(u64 seed, u64 i) {
    const u64 r = rand64(seed, i, 0);
    const float u1 = ((float)(r >> 40) + 1.f) * 5.9604644775390625e-08f;   // (0, 1]
    const float u2 = (float)(r & 0xFFFFFFu) * 5.9604644775390625e-08f;
    return sqrtf(-2.f * logf(u1)) * cospif(2.f * u2);
}

extern "C" __global__ void random_f32(float* out, long long n, unsigned long long seed, float std) {
    DS4_PDL_ENTRY();
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        out[i] = std * normal01(seed, i);
}

extern "C" __global__ void random_f16(u16* out, long long n, unsigned long long seed, float std) {
    DS4_PDL_ENTRY();
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        out[i] = f32_to_f16_rn(std * normal01(seed, i));
}

extern "C" __global__ void random_bf16(u16* out, long long n, unsigned long long seed, float std) {
    DS4_PDL_ENTRY();
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const u32 b = __float_as_uint(std * normal01(seed, i));
        out[i] = (u16)((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);   // round to nearest even (values are finite)
    }
}
