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
#include "quant_blocks.cuh"

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
