// matmul_mma.cu: prefill products of n float32 token vectors with a Q8_0 / Q8_0R / F16 weight matrix on tensor cores
// (mma.sync.m16n8k16 f16 x f16 -> f32; sm_80 and later: sm_90a, sm_100a, sm_120, sm_121a; no wgmma / tcgen05).
//
// mma_matmul_<type>(W, wstride, X, ldx, xgoff, Y, ldy, ygoff, n, R, cols)
//   W: the weight rows of every group, G * R of them: Q8_0 raw GGUF rows (wstride = row bytes), Q8_0R planes
//      (q8_0r.cuh; wstride = slab rows), F16 [G * R, cols] (wstride = row bytes = 2 cols).
//   X: float32, token t's input of group g = X[t * ldx + g * xgoff + c], c < cols  (ldx, xgoff multiples of 4,
//      X 16-byte aligned)
//   Y: float32, Y[t * ldy + g * ygoff + r] = sum_c dequant(W)[g * R + r, c] * X[t * ldx + g * xgoff + c], r < R
//   Group g = blockIdx.z. One plain product: G = 1, ldx = cols, ldy = R = rows (xgoff, ygoff unused). The grouped
//   attention output projection (model.md §2.4): X = att [n, G, gin] (ldx = G gin, xgoff = gin), W = wo_a
//   [G R, gin], Y = low [n, G R] (ldy = G R, ygoff = R): one launch, no transposing copies.
//   Reference: X_g @ ds4cupy.format.quants.dequantize(W_g, type, (R, cols)).T for each group g.
//
// Launch: 256 threads (8 warps), grid (ceil(R / 128), ceil(n / 128), G). A CTA owns a 128-token x 128-row tile of
// Y; warp w owns tokens 64 (w % 2) .. +64 and rows 32 (w / 2) .. +32: 4 x 4 mma tiles of 16 x 8, 64 float32
// accumulators a thread. The k loop steps by one 32-column block (a Q8_0 block): the next step's X (4 float4) and W
// bytes (one 16-byte half block) are loaded into registers while the tensor cores work on the current step, then
// converted into the single shared stage (2 __syncthreads a step). mma operands come through ldmatrix.x4 from
// shared rows of 40 halfs (80 bytes: the 8 rows of an 8x8 matrix fall in distinct banks).
//
// Numerics (why the result is float32-accurate, not fp16-accurate; the helpers are in mma_f16.cuh):
// - W: the int8 quants of a Q8_0 block are exact in fp16 (|q| <= 128 < 2^11); the f16 block scale d is applied to
//   the block's float32 partial sums (acc += d * partial, per 32 columns), so the weight side carries no rounding at
//   all. F16 weights are fp16 already (d = 1).
// - X: each (token, 32-column block) is scaled by a power of two s = 2^(E - 14) (E = exponent of the block's max |x|,
//   so |x / s| < 2^15 < 65504: no fp16 overflow whatever the activations' range, and small blocks do not fall into
//   fp16 subnormals) and split into two fp16 terms, hi = x / s with its 13 low significand bits cleared (exact in
//   fp16) and lo = fp16(x / s - hi) (|lo| < 2^-10 |x / s|, rounded to 11 bits): x / s = hi + lo to within 2^-21
//   relative. Both terms go through the tensor cores (2 mma per 16 columns) into the same partial sum.
// - Products of an 11-bit and an 8-bit integer-valued significand are exact; the tensor cores accumulate in float32
//   (with truncation inside an mma); the block's partial is scaled by s * d (exact: s is a power of two) and added
//   to the float32 accumulator. The result differs from the FP32 CUDA-core kernel (matmul.cu) by float32
//   summation-level errors (~1e-6 relative), not by fp16 rounding (~3e-4; tests/test_gpu_matmul_mma.py).
#include "mma_f16.cuh"
#include "pdl.cuh"
#include "q8_0r.cuh"

#define MMA_BM 128   // tokens per CTA
#define MMA_BN 128   // weight rows per CTA
#define MMA_BK 32    // columns per k step (one Q8_0 block)
#define MMA_LDS 40   // shared row stride in halfs (80 bytes)

// ---- weight tiles: thread (row 0..127, half 0/1) holds 16 columns of one row in registers ---------------------------
// load(): global -> registers for the tile at (global row gr, column k0) (valid: the row exists);
// store(): registers -> 16 fp16 in shared (Ws row) and the block scale (dsc), zeros for a missing row.
struct MmaQ8Regs {
    u32 q[4];   // 16 int8
    u16 d;
};

struct MmaTilesQ8_0 {  // raw GGUF rows: 34-byte blocks, 2-byte aligned: 8 u16 loads of the half block
    const u8* W;
    long long row_stride;
    int nblk;
    __device__ __forceinline__ void load(MmaQ8Regs& r, long long gr, int k0, int half) const {
        const u8* blk = W + gr * row_stride + (size_t)(k0 >> 5) * 34;
        r.d = ld_nc_u16(reinterpret_cast<const u16*>(blk));
        const u16* qs = reinterpret_cast<const u16*>(blk + 2 + 16 * half);
#pragma unroll
        for (int j = 0; j < 4; ++j) r.q[j] = (u32)ld_nc_u16(qs + 2 * j) | ((u32)ld_nc_u16(qs + 2 * j + 1) << 16);
    }
};

struct MmaTilesQ8_0R {  // Q8_0R planes: one 16-byte chunk and the block's scale
    const u8* W;
    int slab_rows, nblk;
    __device__ __forceinline__ void load(MmaQ8Regs& r, long long gr, int k0, int half) const {
        const Q8RRow row = q8r_row(W, gr, nblk, slab_rows);
        const uint4 v = ld_stream_u4(row.qs + (k0 >> 4) + half);
        r.q[0] = v.x; r.q[1] = v.y; r.q[2] = v.z; r.q[3] = v.w;
        r.d = ld_nc_u16(row.d + (k0 >> 5));
    }
};

__device__ __forceinline__ void mma_store_q8(const MmaQ8Regs& r, bool valid, u16* ws, float* dsc, int half) {
    uint4 lo, hi;
    if (valid) {
        const u32 a = r.q[0] ^ 0x80808080u, b = r.q[1] ^ 0x80808080u, c = r.q[2] ^ 0x80808080u,
                  d = r.q[3] ^ 0x80808080u;
        lo = make_uint4(s8x2_to_f16x2(a, 0x4140u), s8x2_to_f16x2(a, 0x4342u), s8x2_to_f16x2(b, 0x4140u),
                        s8x2_to_f16x2(b, 0x4342u));
        hi = make_uint4(s8x2_to_f16x2(c, 0x4140u), s8x2_to_f16x2(c, 0x4342u), s8x2_to_f16x2(d, 0x4140u),
                        s8x2_to_f16x2(d, 0x4342u));
    } else {
        lo = hi = make_uint4(0u, 0u, 0u, 0u);
    }
    *reinterpret_cast<uint4*>(ws + 16 * half) = lo;
    *reinterpret_cast<uint4*>(ws + 16 * half + 8) = hi;
    if (half == 0) *dsc = valid ? f16_to_f32(r.d) : 0.f;
}

struct MmaF16Regs {
    uint4 v[2];  // 16 fp16
};

struct MmaTilesF16 {  // F16 [rows, cols], cols % 8 == 0: two 16-byte loads, zeros past the row's end
    const u8* W;
    long long row_stride;
    int cols;
    __device__ __forceinline__ void load(MmaF16Regs& r, long long gr, int k0, int half) const {
        const u16* p = reinterpret_cast<const u16*>(W + gr * row_stride) + k0 + 16 * half;
        const int c = k0 + 16 * half;
        r.v[0] = c < cols ? ld_stream_u4(reinterpret_cast<const uint4*>(p)) : make_uint4(0u, 0u, 0u, 0u);
        r.v[1] = c + 8 < cols ? ld_stream_u4(reinterpret_cast<const uint4*>(p + 8)) : make_uint4(0u, 0u, 0u, 0u);
    }
};

__device__ __forceinline__ void mma_store_w(const MmaQ8Regs& r, bool valid, u16* ws, float* dsc, int half) {
    mma_store_q8(r, valid, ws, dsc, half);
}
__device__ __forceinline__ void mma_store_w(const MmaF16Regs& r, bool valid, u16* ws, float* dsc, int half) {
    const uint4 z = make_uint4(0u, 0u, 0u, 0u);
    *reinterpret_cast<uint4*>(ws + 16 * half) = valid ? r.v[0] : z;
    *reinterpret_cast<uint4*>(ws + 16 * half + 8) = valid ? r.v[1] : z;
    if (half == 0) *dsc = valid ? 1.f : 0.f;
}

template <class Tiles> struct MmaRegsOf { typedef MmaQ8Regs type; };
template <> struct MmaRegsOf<MmaTilesF16> { typedef MmaF16Regs type; };

// ---- activations: thread (token 0..127, half 0/1) holds 16 floats of one token's 32-column block --------------------
__device__ __forceinline__ void mma_load_x(float4* xv, const float* xrow, bool valid, int k0, int half, int cols) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const int c = k0 + 16 * half + 4 * j;
        xv[j] = valid && c < cols ? ld_nc_f4(xrow + c) : make_float4(0.f, 0.f, 0.f, 0.f);
    }
}

// x / s split into hi + lo fp16 (see the header); the pair of lanes (token, half 0/1) agrees on s through a shuffle
__device__ __forceinline__ void mma_store_x(const float4* xv, u16* xh, u16* xl, float* xsc, int half) {
    float amax = 0.f;
#pragma unroll
    for (int j = 0; j < 4; ++j)
        amax = fmaxf(amax, fmaxf(fmaxf(fabsf(xv[j].x), fabsf(xv[j].y)), fmaxf(fabsf(xv[j].z), fabsf(xv[j].w))));
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
    const int e = mma_split_exp(amax);
    const float inv = mma_split_inv(e);
    u32 h[8], l[8];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const float v[4] = {xv[j].x * inv, xv[j].y * inv, xv[j].z * inv, xv[j].w * inv};
        float vh[4], vl[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) mma_split(v[i], vh[i], vl[i]);
        h[2 * j] = pack_f16x2(vh[0], vh[1]);
        h[2 * j + 1] = pack_f16x2(vh[2], vh[3]);
        l[2 * j] = pack_f16x2(vl[0], vl[1]);
        l[2 * j + 1] = pack_f16x2(vl[2], vl[3]);
    }
    *reinterpret_cast<uint4*>(xh + 16 * half) = make_uint4(h[0], h[1], h[2], h[3]);
    *reinterpret_cast<uint4*>(xh + 16 * half + 8) = make_uint4(h[4], h[5], h[6], h[7]);
    *reinterpret_cast<uint4*>(xl + 16 * half) = make_uint4(l[0], l[1], l[2], l[3]);
    *reinterpret_cast<uint4*>(xl + 16 * half + 8) = make_uint4(l[4], l[5], l[6], l[7]);
    if (half == 0) *xsc = mma_split_scale(e);
}

// ---- the kernel body ------------------------------------------------------------------------------------------------
template <class Tiles>
__device__ __forceinline__ void mma_matmul_body(const Tiles& tiles, const float* __restrict__ X, long long ldx,
                                                long long xgoff, float* __restrict__ Y, long long ldy,
                                                long long ygoff, int n, int R, int cols) {
    __shared__ __align__(16) u16 Xh[MMA_BM][MMA_LDS];
    __shared__ __align__(16) u16 Xl[MMA_BM][MMA_LDS];
    __shared__ __align__(16) u16 Ws[MMA_BN][MMA_LDS];
    __shared__ float xsc[MMA_BM];
    __shared__ float dsc[MMA_BN];

    const int g = blockIdx.z;
    const int r0 = blockIdx.x * MMA_BN, t0 = blockIdx.y * MMA_BM;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = (warp & 1) * 64, wn = (warp >> 1) * 32;   // the warp's tokens / rows in the tile

    // loader roles: thread = (row or token tid / 2, half tid % 2)
    const int lr = tid >> 1, half = tid & 1;
    const bool w_ok = r0 + lr < R, x_ok = t0 + lr < n;
    const long long gr = (long long)g * R + (w_ok ? r0 + lr : 0);
    const float* xrow = X + (long long)(t0 + (x_ok ? lr : 0)) * ldx + g * xgoff;

    float acc[4][4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int c = 0; c < 4; ++c) acc[i][j][c] = 0.f;

    typename MmaRegsOf<Tiles>::type wr;
    float4 xv[4];
    if (w_ok) tiles.load(wr, gr, 0, half);
    mma_load_x(xv, xrow, x_ok, 0, half, cols);

    // ldmatrix lane addresses: matrix q = lane / 8, row lane % 8
    const int q = lane >> 3, qr = lane & 7;
    const int a_row = wm + qr + 8 * (q & 1), a_col = 8 * (q >> 1);   // A (x4): rows +8 for q odd, k +8 for q >= 2
    const int b_col = 8 * q;                                          // B (x4): k 0, 8, 16, 24 of rows wn + 8 j + qr
    const int gq = lane >> 2, tq = lane & 3;                          // mma fragment coordinates

    for (int k0 = 0; k0 < cols; k0 += MMA_BK) {
        mma_store_w(wr, w_ok, &Ws[lr][0], &dsc[lr], half);
        mma_store_x(xv, &Xh[lr][0], &Xl[lr][0], &xsc[lr], half);
        __syncthreads();
        if (k0 + MMA_BK < cols) {   // next step's loads in flight during this step's mma
            if (w_ok) tiles.load(wr, gr, k0 + MMA_BK, half);
            mma_load_x(xv, xrow, x_ok, k0 + MMA_BK, half, cols);
        }
        u32 b[4][4];   // n tile j: {k 0-7, 8-15, 16-23, 24-31} of rows wn + 8 j ..
#pragma unroll
        for (int j = 0; j < 4; ++j) ldsm_x4(b[j], &Ws[wn + 8 * j + qr][b_col]);
        float d[4][2];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            d[j][0] = dsc[wn + 8 * j + 2 * tq];
            d[j][1] = dsc[wn + 8 * j + 2 * tq + 1];
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            u32 ah0[4], ah1[4], al0[4], al1[4];   // hi / lo, k 0-15 / 16-31
            ldsm_x4(ah0, &Xh[a_row + 16 * i][a_col]);
            ldsm_x4(ah1, &Xh[a_row + 16 * i][a_col + 16]);
            ldsm_x4(al0, &Xl[a_row + 16 * i][a_col]);
            ldsm_x4(al1, &Xl[a_row + 16 * i][a_col + 16]);
            const float s0 = xsc[wm + 16 * i + gq], s1 = xsc[wm + 16 * i + gq + 8];
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                float p[4] = {0.f, 0.f, 0.f, 0.f};
                mma_16816(p, ah0, b[j][0], b[j][1]);
                mma_16816(p, al0, b[j][0], b[j][1]);
                mma_16816(p, ah1, b[j][2], b[j][3]);
                mma_16816(p, al1, b[j][2], b[j][3]);
                acc[i][j][0] = fmaf(s0 * d[j][0], p[0], acc[i][j][0]);
                acc[i][j][1] = fmaf(s0 * d[j][1], p[1], acc[i][j][1]);
                acc[i][j][2] = fmaf(s1 * d[j][0], p[2], acc[i][j][2]);
                acc[i][j][3] = fmaf(s1 * d[j][1], p[3], acc[i][j][3]);
            }
        }
        __syncthreads();
    }

    // C fragment: c0, c1 = (token gq, rows 2 tq, 2 tq + 1), c2, c3 = token gq + 8
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            const int t = t0 + wm + 16 * i + gq + 8 * hh;
            if (t >= n) continue;
            float* yrow = Y + (long long)t * ldy + g * ygoff;
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int r = r0 + wn + 8 * j + 2 * tq;
                if (r < R) yrow[r] = acc[i][j][2 * hh];
                if (r + 1 < R) yrow[r + 1] = acc[i][j][2 * hh + 1];
            }
        }
}

extern "C" __global__ void __launch_bounds__(256, 1) mma_matmul_q8_0(
    const u8* W, long long row_stride, const float* X, long long ldx, long long xgoff, float* Y, long long ldy,
    long long ygoff, int n, int R, int cols) {
    DS4_PDL_ENTRY();
    mma_matmul_body(MmaTilesQ8_0{W, row_stride, cols >> 5}, X, ldx, xgoff, Y, ldy, ygoff, n, R, cols);
}

extern "C" __global__ void __launch_bounds__(256, 1) mma_matmul_q8_0r(
    const u8* W, long long slab_rows, const float* X, long long ldx, long long xgoff, float* Y, long long ldy,
    long long ygoff, int n, int R, int cols) {
    DS4_PDL_ENTRY();
    mma_matmul_body(MmaTilesQ8_0R{W, (int)slab_rows, cols >> 5}, X, ldx, xgoff, Y, ldy, ygoff, n, R, cols);
}

extern "C" __global__ void __launch_bounds__(256, 1) mma_matmul_f16(
    const u8* W, long long row_stride, const float* X, long long ldx, long long xgoff, float* Y, long long ldy,
    long long ygoff, int n, int R, int cols) {
    DS4_PDL_ENTRY();
    mma_matmul_body(MmaTilesF16{W, row_stride, cols}, X, ldx, xgoff, Y, ldy, ygoff, n, R, cols);
}
