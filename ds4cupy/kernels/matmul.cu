// matmul.cu: prefill products of n float32 token vectors with a quantized weight matrix.
//
// matmul_<type>(W, row_stride, X, Y, n, rows, cols)
//   W: uint8 [rows, row_stride] raw GGUF rows, X: float32 [n, cols] row-major, Y: float32 [n, rows] row-major
//   Y[t, r] = sum_c dequant(W)[r, c] * X[t, c]
//   Reference: X @ ds4cupy.format.quants.dequantize(W, type, (rows, cols)).T
// Launch: 256 threads, grid (ceil(rows / 64), ceil(n / 64)). Each CTA decodes a 64-row x 32-column tile of W into
// shared memory (element decoders of quant_blocks.cuh: never a dense copy of the matrix), stages the matching
// 64-token x 32-column tile of X, and each thread accumulates a 4 x 4 block of Y in float32 FMAs.
// Correctness-first version: tensor cores (mma on bf16 tiles) are the next step.
//
// matmul_q8_0r(W, slab_rows, X, Y, n, rows, cols), dequantize_q8_0r(W, slab_rows, out, rows, cols)
//   The same on Q8_0 weights repacked into planes (q8_0r.cuh; slabs of slab_rows rows). The 64 x 32 weight tile is
//   exactly one block column: each of the 256 threads loads 8 int8 of one row (one 8-byte load) and its scale.
//   Reference: as above, with W's rows before repacking.
#include "q8_0r.cuh"
#include "pdl.cuh"

#define MM_TR 64  // rows of W per CTA
#define MM_TN 64  // tokens per CTA
#define MM_TK 32  // columns per step

// Tile loaders: Ws[k][r] = W[r0 + r, k0 + k] for the 64 x 32 tile at (r0, k0), 0 outside the matrix.
template <class BT>
struct GgufTiles {  // raw GGUF rows: the format's element decoder (quant_blocks.cuh)
    const u8* W;
    long long row_stride;
    __device__ __forceinline__ void load(float (*Ws)[MM_TR + 1], int r0, int k0, int rows, int cols) const {
        for (int idx = threadIdx.x; idx < MM_TR * MM_TK; idx += 256) {
            const int r = idx / MM_TK, k = idx % MM_TK, c = k0 + k;
            float v = 0.f;
            if (r0 + r < rows && c < cols) {
                const u8* row = W + (size_t)(r0 + r) * row_stride;
                v = BT::value(row + (size_t)(c / BT::QK) * BT::BYTES, c % BT::QK);
            }
            Ws[k][r] = v;
        }
    }
};

struct Q8RTiles {  // Q8_0R planes: the tile is block k0 / 32 of 64 rows; thread = (row r, 8-byte part)
    const u8* W;
    int slab_rows, nblk;
    __device__ __forceinline__ void load(float (*Ws)[MM_TR + 1], int r0, int k0, int rows, int) const {
        static_assert(MM_TK == 32 && MM_TR * 4 == 256, "one block column, one 8-byte part per thread");
        const int r = threadIdx.x % MM_TR, part = threadIdx.x / MM_TR;
        if (r0 + r < rows) {
            const Q8RRow row = q8r_row(W, r0 + r, nblk, slab_rows);
            const uint2 q = *reinterpret_cast<const uint2*>(
                reinterpret_cast<const u8*>(row.qs) + (size_t)k0 + 8 * part);
            const float d = f16_to_f32(row.d[k0 >> 5]);
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                const u32 w = j < 4 ? q.x : q.y;
                Ws[8 * part + j][r] = __fmul_rn((float)(signed char)(w >> (8 * (j & 3))), d);
            }
        } else {
#pragma unroll
            for (int j = 0; j < 8; ++j) Ws[8 * part + j][r] = 0.f;
        }
    }
};

template <class Tiles>
__device__ __forceinline__ void matmul_body(const Tiles& tiles, const float* X, float* Y, int n, int rows, int cols) {
    __shared__ float Ws[MM_TK][MM_TR + 1];
    __shared__ float Xs[MM_TK][MM_TN + 1];
    const int r0 = blockIdx.x * MM_TR, t0 = blockIdx.y * MM_TN;
    const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;  // rows tx*4.., tokens ty*4..
    float acc[4][4];
#pragma unroll
    for (int a = 0; a < 4; ++a)
#pragma unroll
        for (int b = 0; b < 4; ++b) acc[a][b] = 0.f;

    for (int k0 = 0; k0 < cols; k0 += MM_TK) {
        tiles.load(Ws, r0, k0, rows, cols);
        for (int idx = threadIdx.x; idx < MM_TN * MM_TK; idx += 256) {
            const int t = idx / MM_TK, k = idx % MM_TK, c = k0 + k;
            Xs[k][t] = (t0 + t < n && c < cols) ? X[(size_t)(t0 + t) * cols + c] : 0.f;
        }
        __syncthreads();
#pragma unroll 8
        for (int k = 0; k < MM_TK; ++k) {
            float wv[4], xv[4];
#pragma unroll
            for (int a = 0; a < 4; ++a) wv[a] = Ws[k][tx * 4 + a];
#pragma unroll
            for (int b = 0; b < 4; ++b) xv[b] = Xs[k][ty * 4 + b];
#pragma unroll
            for (int a = 0; a < 4; ++a)
#pragma unroll
                for (int b = 0; b < 4; ++b) acc[a][b] = fmaf(wv[a], xv[b], acc[a][b]);
        }
        __syncthreads();
    }
#pragma unroll
    for (int b = 0; b < 4; ++b) {
        const int t = t0 + ty * 4 + b;
        if (t >= n) continue;
#pragma unroll
        for (int a = 0; a < 4; ++a) {
            const int r = r0 + tx * 4 + a;
            if (r < rows) Y[(size_t)t * rows + r] = acc[a][b];
        }
    }
}

// dequantize_<type>(W, row_stride, out, rows, cols): out float32 [rows, cols] = dequant(W), bit-exact with
// ds4cupy.format.quants.dequantize. Grid-stride loop over elements; any launch shape works.
template <class BT>
__device__ __forceinline__ void dequantize_body(const u8* W, long long row_stride, float* out, int rows, int cols) {
    const long long total = (long long)rows * cols;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const int r = (int)(i / cols), c = (int)(i % cols);
        out[i] = BT::value(W + (size_t)r * row_stride + (size_t)(c / BT::QK) * BT::BYTES, c % BT::QK);
    }
}

#define DS4_MATMUL(suffix, BT)                                                                                  \
    extern "C" __global__ void __launch_bounds__(256) matmul_##suffix(                                          \
        const u8* W, long long row_stride, const float* X, float* Y, int n, int rows, int cols) {               \
        DS4_PDL_ENTRY();                                                                                        \
        matmul_body(GgufTiles<BT>{W, row_stride}, X, Y, n, rows, cols);                                        \
    }                                                                                                           \
    extern "C" __global__ void dequantize_##suffix(const u8* W, long long row_stride, float* out, int rows,      \
                                                   int cols) {                                                  \
        DS4_PDL_ENTRY();                                                                                        \
        dequantize_body<BT>(W, row_stride, out, rows, cols);                                                    \
    }

DS4_FOR_EACH_QTYPE(DS4_MATMUL)

// ---- Q8_0R (q8_0r.cuh) ----------------------------------------------------------------------------------------------
extern "C" __global__ void __launch_bounds__(256) matmul_q8_0r(const u8* W, int slab_rows, const float* X, float* Y,
                                                               int n, int rows, int cols) {
    DS4_PDL_ENTRY();
    matmul_body(Q8RTiles{W, slab_rows, cols >> 5}, X, Y, n, rows, cols);
}

extern "C" __global__ void dequantize_q8_0r(const u8* W, int slab_rows, float* out, int rows, int cols) {
    DS4_PDL_ENTRY();
    const long long total = (long long)rows * cols;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x)
        out[i] = q8r_value(W, i / cols, (int)(i % cols), cols >> 5, slab_rows);
}
