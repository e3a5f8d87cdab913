// hc.cu: manifold hyper-connections (mHC, model.md §2.2): the mix projection, the Sinkhorn split + weighted collapse
// (hc_pre and hc_head), and hc_post. X is the HC state [T, n, D] float32 (n = hc_mult streams).
// reference: ReferenceModel.hc_pre / hc_post / hc_head, numerics.hc_split_sinkhorn.
#include "common.cuh"
#include "pdl.cuh"

#define HC_MAX_ROWS 32      // 2n + n*n for n = 4 is 24
#define HC_MAX_STREAMS 5    // n*n <= 32 (hc_split_collapse: one lane per comb entry)

// Split-K partial products of the mix projection plus the sum of squares of the flattened state:
//   part[t, s, r]    = sum_{k in chunk s} fn[r, k] * X[t, k]       r < rows
//   part[t, s, rows] = sum_{k in chunk s} X[t, k]^2
// fn: [rows, K] with dtype 0 = F32, 1 = F16, 2 = BF16 (raw GGUF rows); X: [T, K] (K = n*D); part: [T, nsplit, rows+1].
// grid = (nsplit, T), block = 256. Deterministic (no atomics): hc_split_collapse sums the splits in order.
extern "C" __global__ void hc_mix(const float* X, long long K, const void* fn, int dtype, int rows, int nsplit,
                                  float* part) {
    DS4_PDL_ENTRY();
    __shared__ float red[8][HC_MAX_ROWS + 1];
    const int t = blockIdx.y, s = blockIdx.x;
    const long long chunk = ((K + nsplit - 1) / nsplit + 255) / 256 * 256;
    const long long k0 = (long long)s * chunk, k1 = min(K, k0 + chunk);
    const float* x = X + (long long)t * K;
    float acc[HC_MAX_ROWS + 1];
#pragma unroll
    for (int r = 0; r <= HC_MAX_ROWS; ++r) acc[r] = 0.0f;
    for (long long k = k0 + threadIdx.x; k < k1; k += blockDim.x) {
        float xv = x[k];
        acc[HC_MAX_ROWS] += xv * xv;
#pragma unroll
        for (int r = 0; r < HC_MAX_ROWS; ++r)
            if (r < rows) acc[r] += load_w(fn, dtype, (long long)r * K + k) * xv;
    }
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
#pragma unroll
    for (int r = 0; r <= HC_MAX_ROWS; ++r) {
        if (r < rows || r == HC_MAX_ROWS) {
            float v = warp_sum(acc[r]);
            if (lane == 0) red[wid][r < rows ? r : rows] = v;
        }
    }
    __syncthreads();
    if (threadIdx.x <= rows) {
        float v = 0.0f;
        for (int w = 0; w < (int)(blockDim.x >> 5); ++w) v += red[w][threadIdx.x];
        part[((long long)t * nsplit + s) * (rows + 1) + threadIdx.x] = v;
    }
}

// Sinkhorn split + collapse (hc_pre) or the head's sigmoid collapse (hc_head).
//   mix[r] = (sum_s part[t, s, r]) * (sum_s part[t, s, rows] / K + eps_rms)^-1/2
//   mode 0 (hc_pre, rows = 2n + n*n): pre, post, comb = numerics.hc_split_sinkhorn(mix, scale, base, n, iters, eps_hc)
//          coef[t] = [post (n), comb (n*n, comb[j*n + k])]
//   mode 1 (hc_head, rows = n): pre = sigmoid(mix * scale[0] + base) + eps_hc; coef unused
//   u[t, d] = sum_i pre[i] * X[t, i, d]
// The split sums are warp-parallel (fixed order). The coefficients are computed in double (as the reference) by warp 0
// of every block, one lane per comb entry (n*n <= 32), each lane summing its row / column in the serial order, so the
// result does not depend on the launch shape; block (0, t) writes coef. The collapse is spread over grid.x blocks. grid = (nblk, T), block = 256.
// With xn != nullptr (grid.x must be 1) the block then writes xn[t] = rms_norm(u[t], norm_w) (norm_w may be null), the
// rms_norm_rows that follows every collapse, with eps_rms as its epsilon and bit-identical results.
// The pieces, shared by hc_split_collapse and hc_step (L2 = read X and part through L2 with ldcg_f32: hc_step's last
// block reads what the other blocks of its launch wrote):
//   hc_mix_sums      every thread: sums[r] = sum over splits of part[t, :, r] (double, fixed order)
//   hc_pre_post      warp 0: pre_s (n floats) and, mode 0, post into coef[t, :n] (when write)
//   hc_sinkhorn      warp 0, mode 0: comb into coef[t, n:] (when write)
//   hc_collapse_norm block `blk` of `nblk`: u = sum_q pre[q] X[q]; then, xn != nullptr, the fused rms_norm_rows
template <bool L2>
__device__ __forceinline__ float hc_ld(const float* p) {
    if constexpr (L2) return ldcg_f32(p);
    else return *p;
}

template <bool L2>
__device__ __forceinline__ void hc_mix_sums(int t, const float* part, int rows, int nsplit, double* sums) {
    // warp w sums rows w, w + 8, ...: lane l takes splits l, l + 32, ..., then a fixed-order butterfly
    const int lane = threadIdx.x & 31, nw = blockDim.x >> 5;
    for (int r = threadIdx.x >> 5; r <= rows; r += nw) {
        double m = 0.0;
        for (int s = lane; s < nsplit; s += 32) m += hc_ld<L2>(part + ((long long)t * nsplit + s) * (rows + 1) + r);
        m = warp_sum_d(m);
        if (lane == 0) sums[r] = m;
    }
}

// warp 0 only. Returns rs (the mix's 1 / rms) for hc_sinkhorn.
__device__ __forceinline__ double hc_pre_post(const double* sums, int n, long long K, int rows, const float* scale,
                                              const float* base, float eps_hc, float eps_rms, int mode, bool write,
                                              float* cf, float* pre_s) {
    const int i = threadIdx.x;
    const double rs = 1.0 / sqrt(sums[rows] / (double)K + (double)eps_rms);
    if (i < n) {
        pre_s[i] = (float)(1.0 / (1.0 + exp(-(sums[i] * rs * (double)scale[0] + (double)base[i]))) + eps_hc);
        if (mode == 0 && write)
            cf[i] = (float)(2.0 / (1.0 + exp(-(sums[n + i] * rs * (double)scale[1] + (double)base[n + i]))));
    }
    return rs;
}

// warp 0 only, one lane per comb entry (n*n <= 32), each lane summing its row / column in the serial order. The
// other entries of a row or column come by shuffles (no shared memory, no barriers: the 2 x iters normalisations are
// the serial part of hc_step); the sums add the same doubles in the same order as a loop over the matrix would, so the
// result is bit-identical to that loop (and to numerics.hc_split_sinkhorn's float64 arithmetic).
__device__ __forceinline__ double hc_row_sum(double v, int j, int n) {      // sum_q M[j, q], q = 0..n-1 in order
    double sum = 0.0;
    for (int q = 0; q < n; ++q) sum += __shfl_sync(0xffffffffu, v, j * n + q);
    return sum;
}
__device__ __forceinline__ double hc_col_sum(double v, int k, int n) {      // sum_q M[q, k]
    double sum = 0.0;
    for (int q = 0; q < n; ++q) sum += __shfl_sync(0xffffffffu, v, q * n + k);
    return sum;
}
__device__ __forceinline__ void hc_sinkhorn(const double* sums, double rs, int n, const float* scale,
                                            const float* base, int iters, float eps_hc, bool write, float* cf) {
    const int i = threadIdx.x;
    const double s2 = scale[2], eps = eps_hc;
    const int nn = n * n, j = i / n, k = i % n;
    double v = i < nn ? sums[2 * n + i] * rs * s2 + (double)base[2 * n + i] : -1e300;
    // softmax over row j, then + eps (lanes past nn carry values no real entry reads)
    double mx = -1e300;
    for (int q = 0; q < n; ++q) mx = fmax(mx, __shfl_sync(0xffffffffu, v, j * n + q));
    v = exp(v - mx);
    v = v / hc_row_sum(v, j, n) + eps;
    for (int it = 0; it < iters; ++it) {
        if (it > 0) v /= (hc_row_sum(v, j, n) + eps);
        v /= (hc_col_sum(v, k, n) + eps);
    }
    if (write && i < nn) cf[n + i] = (float)v;
}

extern "C" __global__ void hc_split_collapse(const float* X, const float* part, int n, int D, int rows, int nsplit,
                                             const float* scale, const float* base, int iters, float eps_hc,
                                             float eps_rms, int mode, float* u, float* coef,
                                             const float* norm_w, float* xn) {
    DS4_PDL_ENTRY();
    __shared__ double sums[HC_MAX_ROWS + 1];
    __shared__ double redd[32];
    __shared__ float pre_s[8];
    const int t = blockIdx.y, i = threadIdx.x;
    const long long K = (long long)n * D;
    hc_mix_sums<false>(t, part, rows, nsplit, sums);
    __syncthreads();
    if (i < 32) {
        const bool write = blockIdx.x == 0;
        float* cf = mode == 0 ? coef + (long long)t * (n + n * n) : nullptr;
        const double rs = hc_pre_post(sums, n, K, rows, scale, base, eps_hc, eps_rms, mode, write, cf, pre_s);
        if (mode == 0) hc_sinkhorn(sums, rs, n, scale, base, iters, eps_hc, write, cf);
    }
    __syncthreads();
    const float* x = X + (long long)t * K;
    for (int d = blockIdx.x * blockDim.x + i; d < D; d += gridDim.x * blockDim.x) {
        float acc = 0.0f;
        for (int q = 0; q < n; ++q) acc += pre_s[q] * x[(long long)q * D + d];
        u[(long long)t * D + d] = acc;
    }
    if (xn == nullptr) return;
    // fused rms_norm_rows (norm_rope.cu) of u[t] into xn[t], same arithmetic and order: needs grid.x == 1
    __syncthreads();
    const float* ur = u + (long long)t * D;
    double ss = 0.0;
    for (int d = i; d < D; d += blockDim.x) ss += (double)ur[d] * (double)ur[d];
    ss = block_sum_d(ss, redd);
    const double inv = 1.0 / sqrt(ss / D + (double)eps_rms);
    for (int d = i; d < D; d += blockDim.x) {
        const float v = (float)((double)ur[d] * inv);
        xn[(long long)t * D + d] = norm_w ? __fmul_rn(v, norm_w[d]) : v;
    }
}

// the tail threads' (warps 1.., named barrier 1) sum of their sums of squares, in warp order: 1 / rms of the row
__device__ __forceinline__ double hc_tail_inv_rms(double ss, int D, float eps_rms, double* redd) {
    const int NT = blockDim.x - 32, j = threadIdx.x - 32;
    ss = warp_sum_d(ss);
    if ((j & 31) == 0) redd[j >> 5] = ss;
    asm volatile("bar.sync 1, %0;" ::"r"(NT) : "memory");
    ss = 0.0;
    for (int w = 0; w < NT / 32; ++w) ss += redd[w];
    return 1.0 / sqrt(ss / D + (double)eps_rms);
}

// hc_step's tail: collapse + norm of token t by the NT = blockDim.x - 32 threads of warps 1.. (warp 0 runs the
// Sinkhorn meanwhile), named barrier 1. A thread keeps its HC_TAIL_PER columns d = j + m * NT in registers and issues
// all their loads at once (the latency-bound part of the old kernels: three passes over global memory, one load in
// flight per thread); columns past HC_TAIL_PER * NT (D > 5376 with 256 threads) go through u in global memory.
// Same arithmetic per column as hc_split_collapse; the double sum of squares is grouped by the NT threads.
#define HC_TAIL_PER 24
__device__ __forceinline__ void hc_collapse_norm_tail(int t, const float* X, int n, int D, const float* pre_s,
                                                      float eps_rms, float* u, const float* norm_w, float* xn,
                                                      double* redd) {
    const int NT = blockDim.x - 32, j = threadIdx.x - 32;
    const float* x = X + (long long)t * n * D;
    float* ut = u + (long long)t * D;
    float pre[HC_MAX_STREAMS];
#pragma unroll
    for (int q = 0; q < HC_MAX_STREAMS; ++q) pre[q] = q < n ? pre_s[q] : 0.f;
    float uv[HC_TAIL_PER];
    double ss = 0.0;
#pragma unroll
    for (int m = 0; m < HC_TAIL_PER; ++m) {
        const int d = j + m * NT;
        float acc = 0.0f;
#pragma unroll
        for (int q = 0; q < HC_MAX_STREAMS; ++q)
            if (q < n && d < D) acc += pre[q] * ldcg_f32(x + (long long)q * D + d);
        uv[m] = acc;
    }
#pragma unroll
    for (int m = 0; m < HC_TAIL_PER; ++m) {
        const int d = j + m * NT;
        if (d < D) {
            ut[d] = uv[m];
            ss += (double)uv[m] * (double)uv[m];
        }
    }
    for (int d = j + HC_TAIL_PER * NT; d < D; d += NT) {       // wide rows only
        float acc = 0.0f;
        for (int q = 0; q < n; ++q) acc += pre[q] * ldcg_f32(x + (long long)q * D + d);
        ut[d] = acc;
        ss += (double)acc * (double)acc;
    }
    if (xn == nullptr) return;
    const double inv = hc_tail_inv_rms(ss, D, eps_rms, redd);
    float* xt = xn + (long long)t * D;
#pragma unroll
    for (int m = 0; m < HC_TAIL_PER; ++m) {
        const int d = j + m * NT;
        if (d < D) {
            const float v = (float)((double)uv[m] * inv);
            xt[d] = norm_w ? __fmul_rn(v, norm_w[d]) : v;
        }
    }
    asm volatile("bar.sync 1, %0;" ::"r"(NT) : "memory");      // the wide-row columns below read ut written above
    for (int d = j + HC_TAIL_PER * NT; d < D; d += NT) {
        const float v = (float)((double)ut[d] * inv);
        xt[d] = norm_w ? __fmul_rn(v, norm_w[d]) : v;
    }
}

// hc_step's tail for n = 4 streams (the flash and tiny models), D % 4 == 0 and D <= 4 * HC_TAIL_V * 224: thread
// j of warps 1.. keeps the float4 column groups g = j + m * NT (m < HC_TAIL_V) of the 4 streams in registers. The
// loads are issued as soon as the block knows it is last (hc_tail4_load), so they travel while the split sums and the
// coefficients are computed; the collapse is then register arithmetic. Same arithmetic per column as
// hc_collapse_norm_tail; the double sum of squares is grouped by thread (4 * HC_TAIL_V columns each) instead.
#define HC_TAIL_V 5
struct HcTail4 {
    float4 x[4][HC_TAIL_V];
};

__device__ __forceinline__ void hc_tail4_load(int t, const float* X, int D, HcTail4& r) {
    const int NT = blockDim.x - 32, j = threadIdx.x - 32, G = D >> 2;
    const float4* x = reinterpret_cast<const float4*>(X + (long long)t * 4 * D);
#pragma unroll
    for (int q = 0; q < 4; ++q)
#pragma unroll
        for (int m = 0; m < HC_TAIL_V; ++m) {
            const int g = j + m * NT;
            r.x[q][m] = g < G ? __ldcg(x + q * G + g) : make_float4(0.f, 0.f, 0.f, 0.f);
        }
}

__device__ __forceinline__ float4 hc_tail4_col(const HcTail4& r, int m, const float* pre) {
    float4 a = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        a.x += pre[q] * r.x[q][m].x;
        a.y += pre[q] * r.x[q][m].y;
        a.z += pre[q] * r.x[q][m].z;
        a.w += pre[q] * r.x[q][m].w;
    }
    return a;
}

__device__ __forceinline__ float hc_norm_one(float v, double inv, float w, bool has_w) {
    const float o = (float)((double)v * inv);
    return has_w ? __fmul_rn(o, w) : o;
}

__device__ __forceinline__ void hc_tail4_collapse_norm(int t, const HcTail4& r, int D, const float* pre_s,
                                                       float eps_rms, float* u, const float* norm_w, float* xn,
                                                       double* redd) {
    const int NT = blockDim.x - 32, j = threadIdx.x - 32, G = D >> 2;
    float pre[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) pre[q] = pre_s[q];
    float4* ut = reinterpret_cast<float4*>(u + (long long)t * D);
    float4 uv[HC_TAIL_V];
    double ss = 0.0;
#pragma unroll
    for (int m = 0; m < HC_TAIL_V; ++m) {
        const int g = j + m * NT;
        uv[m] = hc_tail4_col(r, m, pre);
        if (g < G) {
            ut[g] = uv[m];
            ss += (double)uv[m].x * (double)uv[m].x;
            ss += (double)uv[m].y * (double)uv[m].y;
            ss += (double)uv[m].z * (double)uv[m].z;
            ss += (double)uv[m].w * (double)uv[m].w;
        }
    }
    if (xn == nullptr) return;
    const bool has_w = norm_w != nullptr;
    float4 wv[HC_TAIL_V];
#pragma unroll
    for (int m = 0; m < HC_TAIL_V; ++m) {          // in flight during the reduction below
        const int g = j + m * NT;
        wv[m] = has_w && g < G ? __ldg(reinterpret_cast<const float4*>(norm_w) + g) : make_float4(1.f, 1.f, 1.f, 1.f);
    }
    const double inv = hc_tail_inv_rms(ss, D, eps_rms, redd);
    float4* xt = reinterpret_cast<float4*>(xn + (long long)t * D);
#pragma unroll
    for (int m = 0; m < HC_TAIL_V; ++m) {
        const int g = j + m * NT;
        if (g < G)
            xt[g] = make_float4(hc_norm_one(uv[m].x, inv, wv[m].x, has_w), hc_norm_one(uv[m].y, inv, wv[m].y, has_w),
                                hc_norm_one(uv[m].z, inv, wv[m].z, has_w), hc_norm_one(uv[m].w, inv, wv[m].w, has_w));
    }
}

// one element of an F32 / F16 / BF16 weight row; DT = -1: the dtype given at run time (load_w)
template <int DT>
__device__ __forceinline__ float hc_load_w(const void* p, int dtype, long long i) {
    if constexpr (DT == 1) return f16_bits_to_float(((const unsigned short*)p)[i]);
    else if constexpr (DT == 2) return __uint_as_float(((unsigned int)((const unsigned short*)p)[i]) << 16);
    else if constexpr (DT == 0) return ((const float*)p)[i];
    else return load_w(p, dtype, i);
}

// hc_step: hc_post of the previous sub-block, the mix projection and the split + collapse + block norm in one launch
// (decode and prefill), = hc_post(X, y, coef_in); hc_mix(X, fn) -> part; hc_split_collapse(..., u, coef_out, norm_w, xn).
//   X: [T, n, D] float32, updated in place when y != nullptr (y: [T, D], coef_in: [T, n + n*n] from the previous
//   step; y == nullptr: X is used as it is, e.g. right after the embedding). fn, dtype, rows, part, mode, scale, base,
//   iters, eps_*, u, coef_out, norm_w, xn: as hc_mix / hc_split_collapse (mode 1 = the head; xn may alias u).
//   counter: unsigned [T], zero before the launch and after it.
// grid = (nsplit, T), block = 256, n * ceil(D / nsplit) <= HC_STEP_TILE. Block s owns the columns
// d in [s*cd, s*cd + cd) of every stream (cd = ceil(D / nsplit)): it applies hc_post to them (all n streams of a column
// are in the block, so no other block reads what it writes), stages them in shared memory, and writes the partial mix
// sums of its n*cd elements to part[t, s]. The last block of token t to finish (last_block_done) then sums the splits;
// its warp 0 runs the Sinkhorn while warps 1.. collapse and normalise. Differences from the three launches: the mix's
// split sums run over other element subsets and the norm's double sum of squares is grouped by other threads (float32
// summation order only); hc_post and the Sinkhorn are the same arithmetic.
// Kernels: hc_step (n, rows, dtype at run time) and, for the models' shape, hc_step_n4_r24_f16 (the mix: 4 streams,
// 24 rows, F16 fn) and hc_step_n4_r4_f16 (the head): the rows are a compile-time count, so a thread's weight loads
// are all in flight at once (the run-time `r < rows` guards cost one predicate each and held ~7 loads in flight),
// and the tail is hc_tail4 (ops.hc_step picks the kernel; same results as hc_step up to the norm's summation order).
// sk (double [T, rows + 2], or nullptr): with sk and mode 0 the last block's warp 0 writes post into coef_out and the
// Sinkhorn's inputs (sums[0..rows], rs) into sk[t] instead of running it; hc_sinkhorn_deferred then writes comb
// (switch HC_SIDE_SINKHORN: the launch ends without the Sinkhorn's serial double divisions).
#define HC_STEP_TILE 4096
template <int N, int RT, int DT>
__device__ __forceinline__ void hc_step_body(float* X, const float* y, const float* coef_in, int n_arg, int D,
                                             const void* fn, int dtype, int rows_arg, int nsplit, float* part,
                                             unsigned* counter, const float* scale, const float* base, int iters,
                                             float eps_hc, float eps_rms, int mode, float* u, float* coef_out,
                                             const float* norm_w, float* xn, double* sk) {
    __shared__ float xs[HC_STEP_TILE];
    __shared__ float red[8][HC_MAX_ROWS + 1];
    const int n = N ? N : n_arg, rows = RT ? RT : rows_arg;
    const int t = blockIdx.y, s = blockIdx.x, tid = threadIdx.x;
    const long long K = (long long)n * D;
    const int cd = (D + nsplit - 1) / nsplit, d0 = s * cd, nd = max(0, min(D, d0 + cd) - d0);
    float* x = X + (long long)t * K;
    if (y != nullptr) {                       // hc_post on this block's columns (the arithmetic of hc_post)
        const float* cf = coef_in + (long long)t * (n + n * n);
        const float* yt = y + (long long)t * D;
        for (int dd = tid; dd < nd; dd += blockDim.x) {
            const int d = d0 + dd;
            float xo[HC_MAX_STREAMS];                // registers: loops over the fixed bound, guarded by n
#pragma unroll
            for (int j = 0; j < HC_MAX_STREAMS; ++j) xo[j] = j < n ? x[(long long)j * D + d] : 0.f;
            const float yv = yt[d];
            for (int k = 0; k < n; ++k) {
                float acc = cf[k] * yv;
#pragma unroll
                for (int j = 0; j < HC_MAX_STREAMS; ++j)
                    if (j < n) acc += cf[n + j * n + k] * xo[j];
                x[(long long)k * D + d] = acc;
                xs[k * cd + dd] = acc;
            }
        }
    } else {
        for (int e = tid; e < n * nd; e += blockDim.x) {
            const int k = e / nd, dd = e % nd;
            xs[k * cd + dd] = x[(long long)k * D + d0 + dd];
        }
    }
    __syncthreads();
    float acc[HC_MAX_ROWS + 1];
#pragma unroll
    for (int r = 0; r <= HC_MAX_ROWS; ++r) acc[r] = 0.0f;
    for (int e = tid; e < n * nd; e += blockDim.x) {
        const int k = e / nd, dd = e % nd;
        const float xv = xs[k * cd + dd];
        const long long col = (long long)k * D + d0 + dd;
        acc[HC_MAX_ROWS] += xv * xv;
        if constexpr (RT > 0) {
            float w[RT];
#pragma unroll
            for (int r = 0; r < RT; ++r) w[r] = hc_load_w<DT>(fn, dtype, (long long)r * K + col);
#pragma unroll
            for (int r = 0; r < RT; ++r) acc[r] += w[r] * xv;
        } else {
#pragma unroll
            for (int r = 0; r < HC_MAX_ROWS; ++r)
                if (r < rows) acc[r] += hc_load_w<DT>(fn, dtype, (long long)r * K + col) * xv;
        }
    }
    const int lane = tid & 31, wid = tid >> 5;
#pragma unroll
    for (int r = 0; r <= HC_MAX_ROWS; ++r) {
        if (r < rows || r == HC_MAX_ROWS) {
            float v = warp_sum(acc[r]);
            if (lane == 0) red[wid][r < rows ? r : rows] = v;
        }
    }
    __syncthreads();
    if (tid <= rows) {
        float v = 0.0f;
        for (int w = 0; w < (int)(blockDim.x >> 5); ++w) v += red[w][tid];
        part[((long long)t * nsplit + s) * (rows + 1) + tid] = v;
    }
    if (!last_block_done(counter + t, nsplit)) return;
    __shared__ double sums[HC_MAX_ROWS + 1];
    __shared__ double redd[32];
    __shared__ float pre_s[8];
    HcTail4 tail;
    if constexpr (N == 4) {
        if (tid >= 32) hc_tail4_load(t, X, D, tail);
    }
    hc_mix_sums<true>(t, part, rows, nsplit, sums);
    __syncthreads();
    float* cf = mode == 0 ? coef_out + (long long)t * (n + n * n) : nullptr;
    double rs = 0.0;
    if (tid < 32) rs = hc_pre_post(sums, n, K, rows, scale, base, eps_hc, eps_rms, mode, true, cf, pre_s);
    __syncthreads();
    if (tid < 32) {
        if (mode == 0 && sk != nullptr) {         // deferred: the Sinkhorn's inputs for hc_sinkhorn_deferred
            double* st = sk + (long long)t * (rows + 2);
            for (int r = tid; r <= rows; r += 32) st[r] = sums[r];
            if (tid == 0) st[rows + 1] = rs;
        } else if (mode == 0) {
            hc_sinkhorn(sums, rs, n, scale, base, iters, eps_hc, true, cf);
        }
    } else if constexpr (N == 4) {
        hc_tail4_collapse_norm(t, tail, D, pre_s, eps_rms, u, norm_w, xn, redd);
    } else {
        hc_collapse_norm_tail(t, X, n, D, pre_s, eps_rms, u, norm_w, xn, redd);
    }
}

#define HC_STEP_PARAMS                                                                                                \
    float *X, const float *y, const float *coef_in, int n, int D, const void *fn, int dtype, int rows, int nsplit,    \
        float *part, unsigned *counter, const float *scale, const float *base, int iters, float eps_hc,              \
        float eps_rms, int mode, float *u, float *coef_out, const float *norm_w, float *xn, double *sk
#define HC_STEP_ARGS X, y, coef_in, n, D, fn, dtype, rows, nsplit, part, counter, scale, base, iters, eps_hc, eps_rms, \
                     mode, u, coef_out, norm_w, xn, sk
extern "C" __global__ void hc_step(HC_STEP_PARAMS) { DS4_PDL_ENTRY(); hc_step_body<0, 0, -1>(HC_STEP_ARGS); }
extern "C" __global__ void hc_step_n4_r24_f16(HC_STEP_PARAMS) { DS4_PDL_ENTRY(); hc_step_body<4, 24, 1>(HC_STEP_ARGS); }
extern "C" __global__ void hc_step_n4_r4_f16(HC_STEP_PARAMS) { DS4_PDL_ENTRY(); hc_step_body<4, 4, 1>(HC_STEP_ARGS); }

// hc_sinkhorn_deferred: the Sinkhorn of an hc_step launched with sk (switch HC_SIDE_SINKHORN), on a side branch.
//   sk: [T, rows + 2] double from that hc_step: the split sums sums[0..rows] and rs (the mix's 1 / rms) at rows + 1.
//   coef: [T, n + n*n]; writes comb into coef[t, n:] (hc_step wrote post into coef[t, :n]).
// grid = T, block = 32 (one warp a token): hc_sinkhorn on the same doubles, so coef is bit-identical to hc_step's
// fused Sinkhorn (reference: numerics.hc_split_sinkhorn, as hc_split_collapse).
extern "C" __global__ void hc_sinkhorn_deferred(const double* sk, int rows, int n, const float* scale,
                                                const float* base, int iters, float eps_hc, float* coef, int T) {
    DS4_PDL_ENTRY();
    const int t = blockIdx.x;
    if (t >= T) return;
    const double* st = sk + (long long)t * (rows + 2);
    hc_sinkhorn(st, st[rows + 1], n, scale, base, iters, eps_hc, true, coef + (long long)t * (n + n * n));
}

// hc_post, in place: X'[t, k, d] = post[k] * y[t, d] + sum_j comb[j, k] * X[t, j, d]   (comb transposed: model.md §7.1)
// coef: [T, n + n*n] from hc_split_collapse. grid = (ceil(D/256), T), block = 256.
extern "C" __global__ void hc_post(float* X, const float* y, const float* coef, int n, int D) {
    DS4_PDL_ENTRY();
    const int t = blockIdx.y;
    const int d = blockIdx.x * blockDim.x + threadIdx.x;
    if (d >= D) return;
    const float* cf = coef + (long long)t * (n + n * n);
    float* x = X + (long long)t * n * D;
    float xs[HC_MAX_STREAMS];
#pragma unroll
    for (int j = 0; j < HC_MAX_STREAMS; ++j) xs[j] = j < n ? x[(long long)j * D + d] : 0.f;
    const float yv = y[(long long)t * D + d];
    for (int k = 0; k < n; ++k) {
        float acc = cf[k] * yv;
#pragma unroll
        for (int j = 0; j < HC_MAX_STREAMS; ++j)
            if (j < n) acc += cf[n + j * n + k] * xs[j];
        x[(long long)k * D + d] = acc;
    }
}
