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
//   written), lane t of the group takes the rows' 16-byte qs chunks t, t + 32 wpr, ... (coalesced, Q8R_UNROLL chunks
//   in flight per row) and reads each activation chunk once for the NR rows; a CTA holds (8 / wpr) * NR rows:
//   grid.x = ceil(rows / ((8 / wpr) * NR)). ds4cupy.engines.cuda.quant_ops picks NR and wpr (q8r_launch_geometry).
#include "q8_0r.cuh"

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
        matvec_body<BT>(W, row_stride, x, y, rows, cols, wpr, nullptr, nullptr, 0, 0);                           \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(256) matvec_xgroup_##suffix(                                    \
        const u8* W, long long row_stride, const float* x, float* y, int rows, int cols, int wpr, int group_rows) { \
        matvec_body<BT>(W, row_stride, x, y, rows, cols, wpr, nullptr, nullptr, 0, group_rows);                  \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(256) matvec_group_##suffix(                                     \
        const unsigned long long* w_ptrs, const int* row_start, int n_mats, long long row_stride, const float* x, \
        float* y, int total_rows, int cols, int wpr) {                                                           \
        matvec_body<BT>(nullptr, row_stride, x, y, total_rows, cols, wpr, w_ptrs, row_start, n_mats, 0);         \
    }

DS4_FOR_EACH_QTYPE(DS4_MATVEC)

// ---- Q8_0R (q8_0r.cuh) ----------------------------------------------------------------------------------------------
template <int NR>
__device__ __forceinline__ void matvec_q8r_body(const u8* W, int slab_rows, const float* x, float* y, int rows,
                                                int cols, int wpr, const unsigned long long* w_ptrs,
                                                const int* row_start, int n_mats, int x_group_rows) {
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
        const float* xr = x_group_rows ? x + (size_t)(r0 / x_group_rows) * cols : x;
        q8r_rows_dot<NR>(rr, xr, 2 * nblk, t, wpr * 32, acc);
    }
#pragma unroll
    for (int r = 0; r < NR; ++r) acc[r] = group_sum(acc[r], wpr, s_red);
    if (t == 0) {
#pragma unroll
        for (int r = 0; r < NR; ++r)
            if (r0 + r < rows) y[r0 + r] = acc[r];
    }
}

#define DS4_MATVEC_Q8R(NR, MINB)                                                                                     \
    extern "C" __global__ void __launch_bounds__(256, MINB) matvec_q8_0r_r##NR(                                       \
        const u8* W, int slab_rows, const float* x, float* y, int rows, int cols, int wpr) {                     \
        matvec_q8r_body<NR>(W, slab_rows, x, y, rows, cols, wpr, nullptr, nullptr, 0, 0);                        \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(256, MINB) matvec_xgroup_q8_0r_r##NR(                                \
        const u8* W, int slab_rows, const float* x, float* y, int rows, int cols, int wpr, int group_rows) {     \
        matvec_q8r_body<NR>(W, slab_rows, x, y, rows, cols, wpr, nullptr, nullptr, 0, group_rows);               \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(256, MINB) matvec_group_q8_0r_r##NR(                                 \
        const unsigned long long* w_ptrs, const int* row_start, int n_mats, int slab_rows, const float* x,       \
        float* y, int total_rows, int cols, int wpr) {                                                           \
        matvec_q8r_body<NR>(nullptr, slab_rows, x, y, total_rows, cols, wpr, w_ptrs, row_start, n_mats, 0);      \
    }

// MINB: CTAs per SM the register allocation aims at (3: <= 80 registers; NR = 4 would spill at 80)
DS4_MATVEC_Q8R(1, 2)
DS4_MATVEC_Q8R(2, 2)
DS4_MATVEC_Q8R(4, 2)
