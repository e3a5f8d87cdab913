// moe.cu: routed (and shared) expert FFN for decode and prefill, model.md §2.8, in two launches.
//
// moe_gate_up_<type>(gate, up, expert_stride, row_stride, ids, weights, k, n_expert, X, cols, mid, ff, clamp, wpr)
//   gate, up: uint8 [n_expert, ff, row_stride] raw GGUF expert stacks (one type for both); expert_stride =
//             ff * row_stride bytes. X: float32 [n, cols]. ids: int32 [n, k], weights: float32 [n, k] (token-major,
//             device memory; nullptr for the shared expert: expert 0, weight 1). mid: float32 [n, k, ff].
//   For pair p = t*k + j with e = ids[p]:  g = gate[e] . X[t],  u = up[e] . X[t]  (per row f)
//       mid[p, f] = silu(min(g, clamp)) * min(max(u, -clamp), clamp) * weights[p]
//   An id outside [0, n_expert) writes NaN (visible, never a wild read).
//   Launch: 256 threads, grid (ceil(ff / (8 / wpr)), n * k); rows summed by groups of wpr warps as in matvec.cu.
// moe_down_<type>(down, expert_stride, row_stride, ids, k, n_expert, mid, ff, Y, D, accumulate, wpr)
//   down: uint8 [n_expert, D, row_stride] (rows of ff inputs); mid as above; Y: float32 [n, D]
//   Y[t, d] (+)= sum_j down[ids[t, j]][d] . mid[t, j]   (routing weights were applied in mid; no atomics)
//   accumulate != 0 adds to Y (e.g. the shared expert onto the routed sum). ids nullptr: expert 0, k = 1.
//   Launch: 256 threads, grid (ceil(D / (8 / wpr)), n).
// Reference: the float64 NumPy expert of tests/test_gpu_quant_ops.py, following model.md §2.8.
#include "quant_blocks.cuh"

__device__ __forceinline__ float silu_f32(float g) { return g / (1.f + expf(-g)); }

template <class BT>
__device__ __forceinline__ void moe_gate_up_body(const u8* gate, const u8* up, long long expert_stride,
                                                 long long row_stride, const int* ids, const float* weights, int k,
                                                 int n_expert, const float* X, int cols, float* mid, int ff,
                                                 float clamp, int wpr) {
    __shared__ u64 s_grid[needs_grid<BT>::value ? 256 : 1];
    __shared__ float s_red[8];
    const u64* grid = stage_grid<BT>(s_grid);
    const int pair = blockIdx.y, tok = pair / k;
    const int warp = threadIdx.x >> 5;
    const int f = blockIdx.x * (8 / wpr) + warp / wpr;
    const int t = (warp % wpr) * 32 + (threadIdx.x & 31);
    const int e = ids ? ids[pair] : 0;
    const bool bad = e < 0 || e >= n_expert;
    float g = 0.f, u = 0.f;
    if (f < ff && !bad) {
        const size_t off = (size_t)e * expert_stride + (size_t)f * row_stride;
        const float* x = X + (size_t)tok * cols;
        g = row_dot<BT>(gate + off, x, cols / BT::QK, t, wpr * 32, grid);
        u = row_dot<BT>(up + off, x, cols / BT::QK, t, wpr * 32, grid);
    }
    g = group_sum(g, wpr, s_red);
    u = group_sum(u, wpr, s_red);
    if (f < ff && t == 0) {
        const float w = weights ? weights[pair] : 1.f;
        g = fminf(g, clamp);
        u = fminf(fmaxf(u, -clamp), clamp);
        mid[(size_t)pair * ff + f] = bad ? __int_as_float(0x7fc00000) : silu_f32(g) * u * w;
    }
}

template <class BT>
__device__ __forceinline__ void moe_down_body(const u8* down, long long expert_stride, long long row_stride,
                                              const int* ids, int k, int n_expert, const float* mid, int ff, float* Y,
                                              int D, int accumulate, int wpr) {
    __shared__ u64 s_grid[needs_grid<BT>::value ? 256 : 1];
    __shared__ float s_red[8];
    const u64* grid = stage_grid<BT>(s_grid);
    const int tok = blockIdx.y;
    const int warp = threadIdx.x >> 5;
    const int d = blockIdx.x * (8 / wpr) + warp / wpr;
    const int t = (warp % wpr) * 32 + (threadIdx.x & 31);
    float acc = 0.f;
    bool bad = false;
    if (d < D) {
        for (int j = 0; j < k; ++j) {
            const int e = ids ? ids[tok * k + j] : 0;
            if (e < 0 || e >= n_expert) {
                bad = true;
                continue;
            }
            acc += row_dot<BT>(down + (size_t)e * expert_stride + (size_t)d * row_stride,
                               mid + ((size_t)tok * k + j) * ff, ff / BT::QK, t, wpr * 32, grid);
        }
    }
    acc = group_sum(acc, wpr, s_red);
    if (d < D && t == 0) {
        float* y = Y + (size_t)tok * D + d;
        const float v = bad ? __int_as_float(0x7fc00000) : acc;
        *y = accumulate ? *y + v : v;
    }
}

#define DS4_MOE(suffix, BT)                                                                                       \
    extern "C" __global__ void __launch_bounds__(256) moe_gate_up_##suffix(                                       \
        const u8* gate, const u8* up, long long expert_stride, long long row_stride, const int* ids,              \
        const float* weights, int k, int n_expert, const float* X, int cols, float* mid, int ff, float clamp,     \
        int wpr) {                                                                                                \
        moe_gate_up_body<BT>(gate, up, expert_stride, row_stride, ids, weights, k, n_expert, X, cols, mid, ff,    \
                             clamp, wpr);                                                                         \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(256) moe_down_##suffix(                                          \
        const u8* down, long long expert_stride, long long row_stride, const int* ids, int k, int n_expert,       \
        const float* mid, int ff, float* Y, int D, int accumulate, int wpr) {                                     \
        moe_down_body<BT>(down, expert_stride, row_stride, ids, k, n_expert, mid, ff, Y, D, accumulate, wpr);     \
    }

DS4_FOR_EACH_QTYPE(DS4_MOE)
