// matvec.cu: decode-time products of one float32 vector with quantized weight matrices.
//
// matvec_<type>(W, row_stride, x, y, rows, cols, wpr)
//   W: uint8 [rows, row_stride] raw GGUF rows (row_stride = row bytes; for F32/F16/BF16 the plain row bytes)
//   x: float32 [cols] (16-byte aligned), y: float32 [rows]
//   y[r] = sum_c dequant(W)[r, c] * x[c]  (float32 accumulation, weights decoded in registers)
//   Reference: ds4cupy.format.quants.dequantize(W, type, (rows, cols)) @ x.
// matvec_group_<type>(w_ptrs, row_start, n_mats, row_stride, x, y, total_rows, cols, wpr)
//   Several matrices of the same type and width that read the same x, in one launch: matrix m has rows
//   row_start[m] .. row_start[m+1]-1 of the concatenated y [total_rows]; w_ptrs[m] is its first byte (device tables).
// matvec_xgroup_<type>(W, row_stride, x, y, rows, cols, wpr, group_rows)
//   One matrix whose consecutive blocks of `group_rows` rows each read their own input: row r uses
//   x[(r / group_rows) * cols ..] (x: float32 [rows / group_rows, cols]). The grouped attention output projection
//   (model.md §2.4: wo_a row group g times the heads of group g) in one launch instead of one per group.
//
// Launch: 256 threads (8 warps); each row is summed by a group of `wpr` warps (1, 2, 4 or 8), a CTA holds 8/wpr rows:
// grid.x = ceil(rows / (8 / wpr)). Threads of a group walk the row's blocks slice by slice, so a warp's loads cover
// consecutive bytes of the row (see quant_blocks.cuh).
//
// Q8_0 repacked into planes (q8_0r.cuh), NR = 1, 2 or 4 rows per warp (the kernel name's _r<NR>):
// matvec_q8_0r_r<NR>(W, slab_rows, x, y, rows, cols, wpr)
// matvec_xgroup_q8_0r_r<NR>(W, slab_rows, x, y, rows, cols, wpr, group_rows)       group_rows % NR == 0
// matvec_group_q8_0r_r<NR>(w_ptrs, row_start, n_mats, slab_rows, x, y, total_rows, cols, wpr)
//   The same products as above on Q8_0R weights: W uint8 [rows, 34 * cols / 32] in the plane layout with slabs of
//   slab_rows rows (the group: rows counted from each matrix's own pointer; slab_rows 0 = each matrix one slab).
//   cols a multiple of 32.
//   Reference: ds4cupy.format.quants.dequantize(W_gguf, Q8_0, (rows, cols)) @ x, W_gguf = the rows before repacking.
//   Launch: 256 threads; a group of `wpr` warps sums NR consecutive rows (rows past the end are clamped and not
//   written), lane t of the group takes 16-byte qs chunks of the rows (coalesced; q8r_rows_dot: Q8R_INFLIGHT / NR
//   chunks per row a pipeline stage) and reads each activation chunk once for the NR rows; a CTA holds
//   (8 / wpr) * NR rows: grid.x = ceil(rows / ((8 / wpr) * NR)). quant_ops.q8r_launch_geometry picks NR and wpr.
// matvec_q8_0r_q8x_r<NR>, matvec_xgroup_q8_0r_q8x_r<NR>, matvec_group_q8_0r_q8x_r<NR> (NR = 1, 2): the same, float32 x
//   replaced by int8 activation blocks (xq int8 [.., cols], xd float32 [.., cols / 32]: x ~ xq * xd, from
//   quantize_q8x) and dp4a dot products; the arguments xq, xd take the place of x. Reference: dequant(W) @ (xq * xd).
//
// quantize_q8x(x, n_blocks, xq, xd): per block b of 32 floats (one warp each, grid-stride, 256 threads a CTA):
//   xd[b] = max |x[32b ..]| / 127 (IEEE division), xq[32b + i] = rint(x[32b + i] / xd[b]) (0 when xd[b] == 0), so
//   |x - xq xd| <= (1/2 + 127 * 2^-24) xd (rounding to the integer, plus the division's own rounding): llama.cpp's
//   q8_1 activations, the scale kept in float32, no block sums.
//   Reference: ds4cupy.engines.cuda.quant_ops.quantize_q8x_np.
#include "q8_0r.cuh"
#include "pdl.cuh"

template <class BT>
__device__ __forceinline__ void matvec_body(const u8* W, long long row_stride, const float* x, float* y, int rows,
                                            int cols, int wpr, const unsigned long long* w_ptrs, const int* row_start,
                                            int n_mats, int x_group_rows) {
    __shared__ u64 s_grid[needs_grid<BT>::value ? 256 : 1];
    __shared__ float s_red[8];
    const u64* grid = stage_grid<BT>(s_grid);
    const int warp = threadIdx.x >> 5;
    const int row = blockIdx.x * (8 / wpr) + warp / wpr;
    const int t = (warp % wpr) * 32 + (threadIdx.x & 31);
    float acc = 0.f;
    if (row < rows) {
        const u8* rowp;
        if (w_ptrs == nullptr) {
            rowp = W + (size_t)row * row_stride;
        } else {
            int m = 0;
            while (m + 1 < n_mats && row >= row_start[m + 1]) ++m;
            rowp = reinterpret_cast<const u8*>(w_ptrs[m]) + (size_t)(row - row_start[m]) * row_stride;
        }
        const float* xr = x_group_rows ? x + (size_t)(row / x_group_rows) * cols : x;
        acc = row_dot<BT>(rowp, xr, cols / BT::QK, t, wpr * 32, grid);
    }
    acc = group_sum(acc, wpr, s_red);
    if (row < rows && t == 0) y[row] = acc;
}

#define DS4_MATVEC(suffix, BT)                                                                                   \
    extern "C" __global__ void __launch_bounds__(256) matvec_##suffix(                                           \
        const u8* W, long long row_stride, const float* x, float* y, int rows, int cols, int wpr) {              \
        DS4_PDL_ENTRY();                                                                                         \
        matvec_body<BT>(W, row_stride, x, y, rows, cols, wpr, nullptr, nullptr, 0, 0);                           \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(256) matvec_xgroup_##suffix(                                    \
        const u8* W, long long row_stride, const float* x, float* y, int rows, int cols, int wpr, int group_rows) { \
        DS4_PDL_ENTRY();                                                                                            \
        matvec_body<BT>(W, row_stride, x, y, rows, cols, wpr, nullptr, nullptr, 0, group_rows);                  \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(256) matvec_group_##suffix(                                     \
        const unsigned long long* w_ptrs, const int* row_start, int n_mats, long long row_stride, const float* x, \
        float* y, int total_rows, int cols, int wpr) {                                                           \
        DS4_PDL_ENTRY();                                                                                         \
        matvec_body<BT>(nullptr, row_stride, x, y, total_rows, cols, wpr, w_ptrs, row_start, n_mats, 0);         \
    }

DS4_FOR_EACH_QTYPE(DS4_MATVEC)

// ---- Q8_0R (q8_0r.cuh) ----------------------------------------------------------------------------------------------
template <int NR, class XA>
__device__ __forceinline__ void matvec_q8r_body(const u8* W, int slab_rows, XA xa, float* y, int rows, int cols,
                                                int wpr, const unsigned long long* w_ptrs, const int* row_start,
                                                int n_mats, int x_group_rows) {
    __shared__ float s_red[8];
    const int warp = threadIdx.x >> 5;
    const int r0 = (blockIdx.x * (8 / wpr) + warp / wpr) * NR;
    const int t = (warp % wpr) * 32 + (threadIdx.x & 31);
    const int nblk = cols >> 5;
    float acc[NR];
#pragma unroll
    for (int r = 0; r < NR; ++r) acc[r] = 0.f;
    if (r0 < rows) {
        Q8RRow rr[NR];
#pragma unroll
        for (int r = 0; r < NR; ++r) {
            const int row = min(r0 + r, rows - 1);
            if (w_ptrs == nullptr) {
                rr[r] = q8r_row(W, row, nblk, slab_rows);
            } else {
                int m = 0;
                while (m + 1 < n_mats && row >= row_start[m + 1]) ++m;
                const int sr = slab_rows ? slab_rows : row_start[m + 1] - row_start[m];
                rr[r] = q8r_row(reinterpret_cast<const u8*>(w_ptrs[m]), row - row_start[m], nblk, sr);
            }
        }
        if (x_group_rows) xa.skip((size_t)(r0 / x_group_rows) * cols);
        q8r_rows_dot<NR>(rr, xa, 2 * nblk, t, wpr * 32, acc);
    }
#pragma unroll
    for (int r = 0; r < NR; ++r) acc[r] = group_sum(acc[r], wpr, s_red);
    if (t == 0) {
#pragma unroll
        for (int r = 0; r < NR; ++r)
            if (r0 + r < rows) y[r0 + r] = acc[r];
    }
}

// XARGS: the activation parameters, XA: their policy (q8_0r.cuh), SUF: the kernel name's activation suffix
#define DS4_MATVEC_Q8R(NR, MINB, SUF, XARGS, XA)                                                                 \
    extern "C" __global__ void __launch_bounds__(256, MINB) matvec_q8_0r##SUF##_r##NR(                           \
        const u8* W, int slab_rows, XARGS, float* y, int rows, int cols, int wpr) {                              \
        DS4_PDL_ENTRY();                                                                                         \
        matvec_q8r_body<NR>(W, slab_rows, XA, y, rows, cols, wpr, nullptr, nullptr, 0, 0);                       \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(256, MINB) matvec_xgroup_q8_0r##SUF##_r##NR(                    \
        const u8* W, int slab_rows, XARGS, float* y, int rows, int cols, int wpr, int group_rows) {              \
        DS4_PDL_ENTRY();                                                                                         \
        matvec_q8r_body<NR>(W, slab_rows, XA, y, rows, cols, wpr, nullptr, nullptr, 0, group_rows);              \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(256, MINB) matvec_group_q8_0r##SUF##_r##NR(                     \
        const unsigned long long* w_ptrs, const int* row_start, int n_mats, int slab_rows, XARGS, float* y,      \
        int total_rows, int cols, int wpr) {                                                                     \
        DS4_PDL_ENTRY();                                                                                         \
        matvec_q8r_body<NR>(nullptr, slab_rows, XA, y, total_rows, cols, wpr, w_ptrs, row_start, n_mats, 0);     \
    }

#define DS4_XF32_ARGS const float* x
#define DS4_XF32 (Q8RXf32{x})
#define DS4_XQ8_ARGS const signed char *xq, const float *xd
#define DS4_XQ8 (Q8RXq8{reinterpret_cast<const uint4*>(xq), xd})

// MINB: CTAs per SM the register allocation aims at (2: <= 128 registers; at 3, <= 80, the float kernels spill)
DS4_MATVEC_Q8R(1, 2, , DS4_XF32_ARGS, DS4_XF32)
DS4_MATVEC_Q8R(2, 2, , DS4_XF32_ARGS, DS4_XF32)
DS4_MATVEC_Q8R(4, 2, , DS4_XF32_ARGS, DS4_XF32)
DS4_MATVEC_Q8R(1, 2, _q8x, DS4_XQ8_ARGS, DS4_XQ8)
DS4_MATVEC_Q8R(2, 2, _q8x, DS4_XQ8_ARGS, DS4_XQ8)

extern "C" __global__ void __launch_bounds__(256) quantize_q8x(const float* x, long long n_blocks, signed char* xq,
                                                               float* xd) {
    DS4_PDL_ENTRY();
    const int lane = threadIdx.x & 31;
    for (long long b = blockIdx.x * 8LL + (threadIdx.x >> 5); b < n_blocks; b += gridDim.x * 8LL) {
        const float v = x[32 * b + lane];
        const float d = warp_max(fabsf(v)) / 127.f;
        xq[32 * b + lane] = (signed char)(d > 0.f ? rintf(v / d) : 0.f);
        if (lane == 0) xd[b] = d;
    }
}
