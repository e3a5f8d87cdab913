// q8_0r.cuh: Q8_0 weights repacked into planes ("Q8_0R"): the layout, its row addressing and the warp-level dot
// products shared by matvec.cu, matmul.cu, moe.cu (readers) and repack.cu (the repack itself).
//
// Layout. A Q8_0 tensor whose rows hold nblk GGUF blocks (34 bytes each: f16 d | int8 q[32]) is cut into slabs of
// S = slab_rows consecutive rows; slab k occupies its own original bytes, 34 * nblk * S of them from byte
// k * 34 * nblk * S, and holds
//   qs plane  int8 [S, 32 * nblk]  from slab byte 0                 row r, element c: byte 32 * nblk * r + c
//   d plane   f16  [S, nblk]       from slab byte 32 * nblk * S     row r, block b:   bytes 32 * nblk * S + 2 * (nblk * r + b)
// so element (r, c) = d[r, c / 32] * q[r, c], bit for bit the GGUF block's value. The byte count is unchanged and the
// array keeps its GGUF shape, uint8 [..., rows, 34 * nblk] (placement code and memory accounting are unchanged).
// S divides the rows of every matrix a kernel addresses: a whole 2-D matrix (S = rows), one expert of a stack
// (S = rows of an expert) or one row group of the grouped output projection (S = rows / groups), so a row slice on
// slab boundaries is itself a repacked matrix. The wrappers (ds4cupy.engines.cuda.q8_0r) require a 16-byte aligned
// array and S * nblk % 8 == 0: then every slab, every qs row (32 * nblk bytes) and every qs chunk of 16 bytes
// starts 16-byte aligned, and d rows 2-byte aligned.
// Reference: ds4cupy.engines.cuda.q8_0r.repack_q8_0_np (the NumPy definition of the layout).
//
// Dot products. A qs row is 2 * nblk "chunks" of 16 int8 (chunk c = half c % 2 of block c / 2). The lanes of a warp
// take consecutive chunks, so each 16-byte load instruction of a warp reads 512 contiguous bytes (LDG.E.128). Two
// kinds of activations (Q8RXf32, Q8RXq8 below):
//   float32 x (the exact path): a lane converts int8 to float exactly with a byte permute + FADD (sbyte_f32, no
//     I2F), multiplies with x in float32 FMAs (16 per chunk, in element order) and adds d * (chunk sum) into its row
//     total: the float32 math of BlockQ8_0::dot_slice with another summation order;
//   int8 x blocks with a float32 scale each (quantize_q8x in matvec.cu; q8_1-like, no block sums): 4 dp4a per
//     chunk give the exact integer sum, the lane adds (d * xd) * sum; the only error beyond float32 accumulation is
//     the activations' own rounding, |x - xq xd| <= xd / 2.
#pragma once
#include "quant_blocks.cuh"

// 16-byte chunks per row in one pipeline stage of q8r_rows_dot: Q8R_INFLIGHT / NR for NR rows, so a lane keeps
// 2 * Q8R_INFLIGHT weight loads in flight (the stage in use and the next one) whatever NR is
#ifndef Q8R_INFLIGHT
#define Q8R_INFLIGHT 4
#endif

struct Q8RRow {
    const uint4* qs;  // the row's qs chunks
    const u16* d;     // the row's block scales
};

// Row `row` of a repacked tensor starting at `base` (rows counted from base; slab = row / slab_rows).
__device__ __forceinline__ Q8RRow q8r_row(const u8* base, long long row, int nblk, int slab_rows) {
    const long long slab = row / slab_rows, lr = row - slab * slab_rows;
    const u8* sb = base + slab * slab_rows * 34LL * nblk;
    Q8RRow r;
    r.qs = reinterpret_cast<const uint4*>(sb + lr * 32LL * nblk);
    r.d = reinterpret_cast<const u16*>(sb + (long long)slab_rows * 32 * nblk) + lr * nblk;
    return r;
}

// 16 weight bytes through the read-only path without allocating in L1 (weights stream through once per step; L1
// keeps the activations every warp of the SM re-reads)
__device__ __forceinline__ uint4 ld_stream_u4(const uint4* p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "l"(p));
    return v;
}
__device__ __forceinline__ u16 ld_nc_u16(const u16* p) {
    u16 v;
    asm volatile("ld.global.nc.u16 %0, [%1];" : "=h"(v) : "l"(p));
    return v;
}
// activations: read-only path, cached in L1 (all warps of a CTA read the same x)
__device__ __forceinline__ float4 ld_nc_f4(const float* p) {
    float4 v;
    asm("ld.global.nc.v4.f32 {%0, %1, %2, %3}, [%4];" : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w) : "l"(p));
    return v;
}

// sum_{i<4} int8 byte i of w * x[i], continuing acc (float32 FMAs in element order)
__device__ __forceinline__ float q8_dot4(u32 w, float4 x, float acc) {
    w ^= 0x80808080u;  // int8 v -> byte 0x80 + v
    acc = fmaf(sbyte_f32(w, 0), x.x, acc);
    acc = fmaf(sbyte_f32(w, 1), x.y, acc);
    acc = fmaf(sbyte_f32(w, 2), x.z, acc);
    return fmaf(sbyte_f32(w, 3), x.w, acc);
}

// sum over one chunk: 16 int8 weights q times x[0..16)
__device__ __forceinline__ float q8_dot16(uint4 q, const float4* x) {
    float a = q8_dot4(q.x, x[0], 0.f);
    a = q8_dot4(q.y, x[1], a);
    a = q8_dot4(q.z, x[2], a);
    return q8_dot4(q.w, x[3], a);
}

__device__ __forceinline__ void ld_x16(const float* xc, float4* xv) {
    xv[0] = ld_nc_f4(xc);
    xv[1] = ld_nc_f4(xc + 4);
    xv[2] = ld_nc_f4(xc + 8);
    xv[3] = ld_nc_f4(xc + 12);
}

// c + the dot product of the 4 signed bytes of a and b (exact, int32)
__device__ __forceinline__ int dp4a_s8(u32 a, u32 b, int c) {
    int r;
    asm("dp4a.s32.s32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
    return r;
}
__device__ __forceinline__ uint4 ld_nc_u4(const uint4* p) {  // activations: read-only path, cached in L1
    uint4 v;
    asm("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}
__device__ __forceinline__ float ld_nc_f32(const float* p) {
    float v;
    asm("ld.global.nc.f32 %0, [%1];" : "=f"(v) : "l"(p));
    return v;
}

// Activation policies of q8r_rows_dot: where the lane's chunk `off` chunks ahead lies (load), its dot with 16
// weights (dot) and the factor on top of the weight scale (scale); advance / skip move by chunks / elements.
struct Q8RXf32 {  // x: float32 [16 * nch], 16-byte aligned
    const float* p;
    struct Chunk {
        float4 v[4];
    };
    __device__ __forceinline__ void load(int off, Chunk& a) const { ld_x16(p + 16 * (size_t)off, a.v); }
    __device__ __forceinline__ void advance(int chunks) { p += 16 * (size_t)chunks; }
    __device__ __forceinline__ void skip(size_t elems) { p += elems; }
    static __device__ __forceinline__ float scale(const Chunk&) { return 1.f; }  // folded: d * 1 is d
    static __device__ __forceinline__ float dot(uint4 q, const Chunk& a) { return q8_dot16(q, a.v); }
};

struct Q8RXq8 {  // x[i] ~ xq[i] * xd[i / 32]: xq int8 [16 * nch] (16-byte aligned), xd float32 [nch / 2]
    const uint4* q;
    const float* d;
    struct Chunk {
        uint4 v;
        float s;
    };
    __device__ __forceinline__ void load(int off, Chunk& a) const {  // off even (a multiple of 32)
        a.v = ld_nc_u4(q + off);
        a.s = ld_nc_f32(d + (off >> 1));
    }
    __device__ __forceinline__ void advance(int chunks) {  // chunks even
        q += chunks;
        d += chunks >> 1;
    }
    __device__ __forceinline__ void skip(size_t elems) {  // elems a multiple of 32
        q += elems >> 4;
        d += elems >> 5;
    }
    static __device__ __forceinline__ float scale(const Chunk& a) { return a.s; }
    static __device__ __forceinline__ float dot(uint4 w, const Chunk& a) {
        int s = dp4a_s8(w.x, a.v.x, 0);
        s = dp4a_s8(w.y, a.v.y, s);
        s = dp4a_s8(w.z, a.v.z, s);
        return (float)dp4a_s8(w.w, a.v.w, s);  // |s| <= 16 * 128 * 128 < 2^24: exact in float
    }
};

// acc[r] += sum over the 16-byte chunks of row r (0 <= r < NR) times x, for the part of the rows that thread t of a
// group of nt = 32 * wpr threads takes; all NR rows read the same x (an activation policy at chunk 0 of the rows).
//
// Chunk order: stage k covers chunks [k U nt, (k + 1) U nt) (U = Q8R_INFLIGHT / NR chunks per row and lane); warp w
// of the group takes U * 32 consecutive chunks of it, lane l the chunks w U 32 + u 32 + l (u < U), so every load
// instruction of a warp reads 512 contiguous bytes and all per-stage offsets are immediates. Full stages run
// software-pipelined: the loads of stage k + 1 (U * NR qs chunks and scales) are issued before stage k is used; the
// registers are carried around the loop, so ptxas cannot sink them next to their uses (it does that to loads and
// uses of the same iteration). The chunks after the last full stage (< U nt of them) follow, loaded and used
// directly.
template <int NR, int U>
struct Q8RStage {
    uint4 q[U][NR];
    u16 d[U][NR];
    __device__ __forceinline__ void load(const uint4* const* qp, const u16* const* dp) {
#pragma unroll
        for (int u = 0; u < U; ++u)
#pragma unroll
            for (int r = 0; r < NR; ++r) {
                q[u][r] = ld_stream_u4(qp[r] + 32 * u);
                d[u][r] = ld_nc_u16(dp[r] + 16 * u);
            }
    }
};

template <int NR, class XA>
__device__ __forceinline__ void q8r_rows_dot(const Q8RRow* rows, XA xa, int nch, int t, int nt, float* acc) {
    constexpr int U = NR >= Q8R_INFLIGHT ? 1 : Q8R_INFLIGHT / NR;
    const int step = U * nt;                     // chunks per stage
    const int full = nch / step;                 // full stages
    const int c0 = (t >> 5) * (U * 32) + (t & 31);  // this lane's first chunk of stage 0
    const uint4* qp[NR];
    const u16* dp[NR];
#pragma unroll
    for (int r = 0; r < NR; ++r) {
        qp[r] = rows[r].qs + c0;
        dp[r] = rows[r].d + (c0 >> 1);           // (c0 + 32 u) >> 1 = (c0 >> 1) + 16 u: c0's other terms are even
    }
    xa.advance(c0);
    if (full > 0) {
        Q8RStage<NR, U> cur;
        cur.load(qp, dp);
        for (int k = 0; k < full; ++k) {
            Q8RStage<NR, U> nxt;
            if (k + 1 < full) {
#pragma unroll
                for (int r = 0; r < NR; ++r) {
                    qp[r] += step;
                    dp[r] += step >> 1;
                }
                nxt.load(qp, dp);
            }
#pragma unroll
            for (int u = 0; u < U; ++u) {
                typename XA::Chunk a;
                xa.load(32 * u, a);
#pragma unroll
                for (int r = 0; r < NR; ++r)
                    acc[r] = fmaf(f16_to_f32(cur.d[u][r]) * XA::scale(a), XA::dot(cur.q[u][r], a), acc[r]);
            }
            xa.advance(step);
            cur = nxt;
        }
#pragma unroll
        for (int r = 0; r < NR; ++r) {  // the tail starts one stage after the last loaded one
            qp[r] += step;
            dp[r] += step >> 1;
        }
    }
    // tail: chunks full * step + c0 + 32 u, u < U (those < nch)
    const int ct = full * step + c0;
#pragma unroll
    for (int u = 0; u < U; ++u) {
        if (ct + 32 * u < nch) {
            typename XA::Chunk a;
            xa.load(32 * u, a);
#pragma unroll
            for (int r = 0; r < NR; ++r)
                acc[r] = fmaf(f16_to_f32(ld_nc_u16(dp[r] + 16 * u)) * XA::scale(a),
                              XA::dot(ld_stream_u4(qp[r] + 32 * u), a), acc[r]);
        }
    }
}

// One element of a repacked tensor (bit-exact with the GGUF block's value()).
__device__ __forceinline__ float q8r_value(const u8* base, long long row, int col, int nblk, int slab_rows) {
    const Q8RRow r = q8r_row(base, row, nblk, slab_rows);
    const signed char q = reinterpret_cast<const signed char*>(r.qs)[col];
    return __fmul_rn((float)q, f16_to_f32(r.d[col >> 5]));
}
