// common.cuh: helpers shared by the non-quantized kernel families (norm_rope, hc, attention, compressor, indexer,
// router, embed). Device functions only; no kernels. Everything here is plain CUDA C (no library headers besides
// toolkit headers: NVRTC's include path differs between machines, see cuda/compile.py) so it compiles anywhere.
//
// Numerics contract: the FP8 / FP4 rounding helpers below reproduce ds4cupy.engines.numerics.fp8_sim / fp4_sim bit for bit.
// They take the power-of-two scale from the exponent (frexp) instead of log2, and do the scaling with ldexp in
// double, so they stay exact under --use_fast_math / -ftz (the only exception: FP4 outputs below 2^-126, i.e. blocks
// whose amax is under ~1e-37, which -ftz flushes to zero).
#pragma once

#ifndef DS4_INF
#define DS4_INF __int_as_float(0x7f800000)
#endif

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__device__ __forceinline__ double warp_sum_d(double v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Sum over the whole block (blockDim.x a multiple of 32, <= 1024). `red` is shared scratch of >= 32 floats.
// Every thread gets the result. Deterministic order.
__device__ __forceinline__ float block_sum(float v, float* red) {
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) red[wid] = v;
    __syncthreads();
    float t = lane < nw ? red[lane] : 0.0f;
    return warp_sum(t);
}

__device__ __forceinline__ double block_sum_d(double v, double* red) {
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum_d(v);
    __syncthreads();
    if (lane == 0) red[wid] = v;
    __syncthreads();
    double t = lane < nw ? red[lane] : 0.0;
    return warp_sum_d(t);
}

// "Last block done", the one-launch form of a many-block phase followed by a one-block phase. Every block calls it
// once, with every thread, after writing its results; it returns true in exactly one block (the last to arrive). The
// block's writes are ordered before thread 0's arrival by the barrier, and the arrival is an acq_rel atomic at GPU
// scope (release: the block's writes, by cumulativity; acquire: every earlier arrival's writes), so the last block,
// after the second barrier, sees every block's writes (it reads them with ldcg_f32 / __ldcg: L2, never a stale L1
// line). One thread's atomic replaces a __threadfence (MEMBAR.SC.GPU + L1 invalidation) in every thread. The last
// block resets *counter to 0, so the next launch (a graph replay) finds it ready.
__device__ __forceinline__ bool last_block_done(unsigned* counter, unsigned nblocks) {
    __shared__ unsigned s_last;
    __syncthreads();
    if (threadIdx.x == 0) {
        unsigned ticket;
        asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], 1;" : "=r"(ticket) : "l"(counter) : "memory");
        s_last = ticket == nblocks - 1;
        if (s_last) *counter = 0u;
    }
    __syncthreads();
    return s_last != 0u;
}

__device__ __forceinline__ float ldcg_f32(const float* p) {
    float v;
    asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(v) : "l"(p));
    return v;
}

__device__ __forceinline__ float block_max(float v, float* red) {
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) red[wid] = v;
    __syncthreads();
    float t = lane < nw ? red[lane] : -DS4_INF;
    return warp_max(t);
}

// ---- QAT rounding (ds4cupy.engines.numerics, model.md §2.7) -----------------------------------------------------------------

// Exponent k of the power-of-two scale 2^ceil(log2(r)), r > 0: frexp gives r = m * 2^e, m in [0.5, 1).
__device__ __forceinline__ int pow2_ceil_exp(double r) {
    int e;
    double m = frexp(r, &e);
    return (m == 0.5) ? e - 1 : e;
}

// numerics.e4m3_round of v (|v| <= 448): nearest e4m3fn value, ties to even. Exact in double.
__device__ __forceinline__ double e4m3_round_d(double v) {
    double a = fabs(v);
    if (a == 0.0) return v;
    int e;
    frexp(a, &e);              // a = m * 2^e, m in [0.5,1) -> floor(log2 a) = e - 1
    int fe = e - 1;
    if (fe < -6) fe = -6;      // subnormals share the 2^-6 binade step
    double q = rint(ldexp(v, 3 - fe));   // round half to even
    return ldexp(q, fe - 3);
}

// numerics.fp8_sim scale exponent for a block with max |x| = amax.
__device__ __forceinline__ int fp8_scale_exp(float amax) {
    double a = fmax((double)amax, 1e-4);
    return pow2_ceil_exp(a / 448.0);
}

// One element of numerics.fp8_sim given its block's scale exponent k.
__device__ __forceinline__ float fp8_apply(float x, int k) {
    double v = ldexp((double)x, -k);
    v = fmin(fmax(v, -448.0), 448.0);
    return (float)ldexp(e4m3_round_d(v), k);
}

// numerics.e2m1_round of v (|v| <= 6): grid {0,.5,1,1.5,2,3,4,6}, ties to the even code.
__device__ __forceinline__ double e2m1_round_d(double v) {
    const double g[8] = {0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0};
    double a = fabs(v);
    int hi = 7;
#pragma unroll
    for (int i = 7; i >= 0; --i)
        if (g[i] >= a) hi = i;               // first grid point >= a (searchsorted left)
    if (hi < 1) hi = 1;
    int lo = hi - 1;
    double dl = a - g[lo], dh = g[hi] - a;
    bool pick_hi = (dh < dl) || (dh == dl && (hi % 2) == 0);
    double r = pick_hi ? g[hi] : g[lo];
    return v < 0.0 ? -r : (v > 0.0 ? r : 0.0);
}

__device__ __forceinline__ int fp4_scale_exp(float amax) {
    double a = fmax((double)amax, 6.0 * 1.1754943508222875e-38);   // 6 * 2^-126
    return pow2_ceil_exp(a / 6.0);
}

__device__ __forceinline__ float fp4_apply(float x, int k) {
    double v = ldexp((double)x, -k);
    v = fmin(fmax(v, -6.0), 6.0);
    return (float)ldexp(e2m1_round_d(v), k);
}

// ---- RoPE (numerics.rope_cos_sin / rope_apply) ----------------------------------------------------------------------
// freqs: float64 [n_rot/2] from numerics.rope_freqs (YaRN folded in). The angle pos*f is formed in double and cos/sin
// rounded to float, as rope_cos_sin does; the rotation itself is in float like rope_apply.
__device__ __forceinline__ void rope_cs(const double* freqs, int i, long long pos, float* c, float* s) {
    double ang = (double)pos * freqs[i];
    double sd, cd;
    sincos(ang, &sd, &cd);
    *c = (float)cd;
    *s = (float)sd;
}

// Rotate the pair (a, b) = (x[2i], x[2i+1]); inverse rotates by -angle.
__device__ __forceinline__ void rope_pair(float& a, float& b, float c, float s, bool inverse) {
    if (inverse) s = -s;
    // explicit roundings (no FMA contraction) so the result equals NumPy's float32 a*c - b*s bit for bit
    float ya = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
    float yb = __fadd_rn(__fmul_rn(a, s), __fmul_rn(b, c));
    a = ya;
    b = yb;
}

// IEEE half bits -> float (exact), as a PTX one-liner.
__device__ __forceinline__ float f16_bits_to_float(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

// ---- weight element loads (F32 / F16 / BF16 rows) --------------------------------------------------------------------
// dtype codes shared with ops.py: 0 = F32, 1 = F16, 2 = BF16, 8 = Q8_0 (34-byte blocks of 32).
__device__ __forceinline__ float load_w(const void* p, int dtype, long long i) {
    if (dtype == 1) return f16_bits_to_float(((const unsigned short*)p)[i]);
    if (dtype == 2) return __uint_as_float(((unsigned int)((const unsigned short*)p)[i]) << 16);
    return ((const float*)p)[i];
}

// Sylvester-order Walsh-Hadamard transform of v[0..n) in shared memory (double), orthonormal (/sqrt(n)),
// the same butterfly order as numerics.hadamard, so the double results are identical. Block-cooperative:
// all threads of the block must call it.
__device__ __forceinline__ void hadamard_smem(double* v, int n) {
    for (int h = 1; h < n; h <<= 1) {
        __syncthreads();
        for (int i = threadIdx.x; i < n / 2; i += blockDim.x) {
            int blk = i / h, j = i % h;
            int i0 = blk * 2 * h + j, i1 = i0 + h;
            double a = v[i0], b = v[i1];
            v[i0] = a + b;
            v[i1] = a - b;
        }
    }
    __syncthreads();
    double sc = sqrt((double)n);
    for (int i = threadIdx.x; i < n; i += blockDim.x) v[i] = v[i] / sc;
    __syncthreads();
}

// ---- the per-row epilogue shared by KV rows, compressed rows and q / indexer-q heads ------------------------------
// v: shared float[n] holding one row; on return v holds the finished row. All threads of the block call it.
//   norm:   v = rms(v) (numerics.rms_norm: mean of squares in double, x * (ms+eps)^-1/2 rounded to float), then * w
//           when w != nullptr (float32 weights)
//   rope:   rotate the interleaved pairs of the last n_rot dims at position pos (freqs == nullptr: no rope; n_rot
//           still marks the dims that fp8 leaves alone)
//   qat:    0 none; 1 numerics.fp8_sim(block 64) on the first n - n_rot dims; 2 numerics.fp4_sim(hadamard(v), 32)
// dsm: shared double[n] (qat 2 only), redd: shared double[32].
__device__ void row_finish(float* v, int n, bool norm, const float* w, float eps, int n_rot, const double* freqs,
                           long long pos, int qat, double* dsm, double* redd) {
    __syncthreads();
    if (norm) {
        double ss = 0.0;
        for (int i = threadIdx.x; i < n; i += blockDim.x) ss += (double)v[i] * (double)v[i];
        ss = block_sum_d(ss, redd);
        double inv = 1.0 / sqrt(ss / n + (double)eps);
        for (int i = threadIdx.x; i < n; i += blockDim.x) {
            float y = (float)((double)v[i] * inv);
            v[i] = w ? __fmul_rn(y, w[i]) : y;
        }
        __syncthreads();
    }
    if (freqs != nullptr && n_rot > 0) {
        const int base = n - n_rot;
        for (int i = threadIdx.x; i < n_rot / 2; i += blockDim.x) {
            float c, s;
            rope_cs(freqs, i, pos, &c, &s);
            float a = v[base + 2 * i], b = v[base + 2 * i + 1];
            rope_pair(a, b, c, s, false);
            v[base + 2 * i] = a;
            v[base + 2 * i + 1] = b;
        }
        __syncthreads();
    }
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
    if (qat == 1) {
        const int nq = n - n_rot;               // a multiple of 64
        for (int b = wid; b < nq / 64; b += nw) {
            float x0 = v[b * 64 + lane], x1 = v[b * 64 + 32 + lane];
            float amax = warp_max(fmaxf(fabsf(x0), fabsf(x1)));
            int k = fp8_scale_exp(amax);
            v[b * 64 + lane] = fp8_apply(x0, k);
            v[b * 64 + 32 + lane] = fp8_apply(x1, k);
        }
        __syncthreads();
    } else if (qat == 2) {
        for (int i = threadIdx.x; i < n; i += blockDim.x) dsm[i] = (double)v[i];
        hadamard_smem(dsm, n);
        for (int i = threadIdx.x; i < n; i += blockDim.x) v[i] = (float)dsm[i];
        __syncthreads();
        for (int b = wid; b < n / 32; b += nw) {
            float x = v[b * 32 + lane];
            float amax = warp_max(fabsf(x));
            v[b * 32 + lane] = fp4_apply(x, fp4_scale_exp(amax));
        }
        __syncthreads();
    }
}

// ---- packed FP4 rows (switch INDEXER_FP4: compressor_emit_fp4, indexer_scores_fp4; NumPy model: numerics.fp4_pack)
// A fp4_sim'd block of 32 values (model.md §2.7) is exactly g_i * 2^e, g_i in the e2m1 grid {0,.5,1,1.5,2,3,4,6}
// (signed), e = fp4_scale_exp(amax of the block): recomputing e from the already rounded values gives either fp4_sim's
// own exponent or a smaller one under which every g_i is still on the grid (amax = 3 * 2^k -> k - 1, ...), and
// fp4_sim(fp4_sim(x)) == fp4_sim(x): so (codes, e) is an exact, lossless representation of the block.
// Code of one value: bit 3 = its sign bit (-0.0 -> 8, so rows round-trip bit for bit), bits 0-2 = the index of |g|
// in the grid. 2 * |g| = {0, 1, 2, 3, 4, 6, 8, 12}[index]: FP4_MAG2_LO / FP4_MAG2_HI, the bytes prmt selects.
// Packed row of c values (c % 32 == 0): c / 2 bytes of codes (element i in byte i / 2, low nibble for even i), then
// c / 32 int8 block exponents e (fp4_scale_exp gives e in [-126, 126]), zero-padded to a multiple of 4 bytes:
// FP4_ROW_BYTES(c) bytes (68 for c = 128; 36 for 64, 20 for 32), so every row starts on a 4-byte boundary.
#define FP4_ROW_BYTES(c) ((c) / 2 + ((((c) / 32) + 3) & ~3))
#define FP4_MAG2_LO 0x03020100u
#define FP4_MAG2_HI 0x0C080604u

// The 4-bit code of x under block exponent e: x * 2^-e rounded to the e2m1 grid (exact when x is representable).
__device__ __forceinline__ unsigned int fp4_code(float x, int e) {
    const double a = e2m1_round_d(fmin(fabs(ldexp((double)x, -e)), 6.0));
    const int m2 = (int)(2.0 * a);                                  // 0, 1, 2, 3, 4, 6, 8, 12
    const unsigned int idx = m2 <= 4 ? (unsigned int)m2 : (m2 == 6 ? 5u : (m2 == 8 ? 6u : 7u));
    return idx | (signbit(x) ? 8u : 0u);
}

// Lane i of a full warp holds element i of one block of 32: its code (fp4_sim's rounding of x under the block's
// fp4_sim exponent; the exact code when the block is already fp4_sim'd), *e = that exponent (the same in every lane).
__device__ __forceinline__ unsigned int fp4_pack_lane(float x, int* e) {
    *e = fp4_scale_exp(warp_max(fabsf(x)));
    return fp4_code(x, *e);
}

// Eight codes (one 32-bit word of a packed row, element 8j + n in nibble n) -> eight signed int8 2 * g (two words,
// byte n = element n, for dp4a). prmt's default mode copies the byte its selector's low 3 bits pick when the
// selector's bit 3 (here the sign) is 0 and writes the picked byte's sign (0x00 here) when it is 1: pos holds the
// magnitudes of the positive codes, neg (selectors with the sign flipped) those of the negative ones, bytewise
// disjoint; ((pos | 0x80) - neg) ^ 0x80 per byte is pos - neg in two's complement with no borrow between bytes.
__device__ __forceinline__ unsigned int fp4_prmt(unsigned int sel) {
    unsigned int d;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(FP4_MAG2_LO), "r"(FP4_MAG2_HI), "r"(sel));
    return d;
}

__device__ __forceinline__ void fp4_expand8(unsigned int w, unsigned int* lo, unsigned int* hi) {
    const unsigned int wl = w & 0xFFFFu, wh = w >> 16;
    *lo = ((fp4_prmt(wl) | 0x80808080u) - fp4_prmt(wl ^ 0x8888u)) ^ 0x80808080u;
    *hi = ((fp4_prmt(wh) | 0x80808080u) - fp4_prmt(wh ^ 0x8888u)) ^ 0x80808080u;
}
