// mma_f16.cuh: device helpers of the fp16 tensor-core kernels (matmul_mma.cu, moe_grouped.cu, attention_mma.cu): fp16
// packing, exact int8 -> fp16, ldmatrix (plain and transposed), cp.async, mma.sync.m16n8k16 (f16 x f16 -> f32), and
// the split of float32 activations into a power-of-two scale and hi + lo fp16 terms that keeps those products
// float32-accurate:
//
//   per block of activations (a token's 32 columns): E = biased exponent of the block's max |x|, clamped to [15, 254];
//   s = 2^(E - 127 - 14) (mma_split_scale), 1 / s = mma_split_inv(E): |x / s| < 2^15 (no fp16 overflow whatever the
//   activations' range; small blocks do not fall into fp16 subnormals);
//   hi = x / s with its 13 low significand bits cleared (11 bits: exact in fp16), lo = x / s - hi (exact in float32,
//   |lo| < 2^-10 |x / s|), rounded to fp16 (11 bits) when packed: x / s = hi + lo to within 2^-21 relative.
// Products of hi or lo with an integer code of <= 11 bits are exact; the tensor cores accumulate them in float32.
#pragma once
#include "quant_blocks.cuh"

__device__ __forceinline__ u32 pack_f16x2(float lo, float hi) {  // {fp16(lo) in bits 0-15, fp16(hi) in 16-31}
    u32 r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// 2 int8 (bytes sel of w) -> 2 exact fp16: the half 1024 + (b ^ 0x80) minus 1152
__device__ __forceinline__ u32 s8x2_to_f16x2(u32 w_xor80, u32 sel) {
    const u32 h = __byte_perm(w_xor80, 0x64646464u, sel);
    u32 r;
    asm("sub.f16x2 %0, %1, %2;" : "=r"(r) : "r"(h), "r"(0x64806480u));
    return r;
}

__device__ __forceinline__ u32 smem_u32(const void* p) { return (u32)__cvta_generic_to_shared(p); }

__device__ __forceinline__ void ldsm_x4(u32* r, u32 addr) {  // addr: shared-window byte address
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

__device__ __forceinline__ void ldsm_x4(u32* r, const u16* p) { ldsm_x4(r, smem_u32(p)); }

// the same four 8x8 matrices, each transposed: lane l gets rows 2 (l % 4), 2 (l % 4) + 1 of column l / 4
__device__ __forceinline__ void ldsm_x4_trans(u32* r, u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

// 16 bytes global -> shared without registers (sm_80+); nbytes 0 fills the 16 bytes with zeros (src not read)
__device__ __forceinline__ void cp_async16(u32 dst, const void* src, int nbytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(nbytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;" ::: "memory"); }

// c += a (16x16, row) * b (16x8, col), f16 operands, f32 accumulators
__device__ __forceinline__ void mma_16816(float* c, const u32* a, u32 b0, u32 b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
                 "{%0, %1, %2, %3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// ---- activations: power-of-two scale and hi + lo split (header) ----------------------------------------------------
__device__ __forceinline__ int mma_split_exp(float amax) {  // E of the header (NaN / inf -> 254)
    const int e = (int)((__float_as_uint(amax) >> 23) & 0xffu);
    return min(max(e, 15), 254);
}
__device__ __forceinline__ float mma_split_inv(int e) { return __uint_as_float((u32)(268 - e) << 23); }   // 1 / s
__device__ __forceinline__ float mma_split_scale(int e) { return __uint_as_float((u32)(e - 14) << 23); }  // s
__device__ __forceinline__ void mma_split(float v, float& vh, float& vl) {  // v = x / s -> hi, lo (float32, exact)
    vh = __uint_as_float(__float_as_uint(v) & 0xffffe000u);
    vl = v - vh;
}
