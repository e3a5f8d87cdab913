// hc.cu: manifold hyper-connections (mHC, model.md §2.2): the mix projection, the Sinkhorn split + weighted collapse
// (hc_pre and hc_head), and hc_post. X is the HC state [T, n, D] float32 (n = hc_mult streams).
// reference: ReferenceModel.hc_pre / hc_post / hc_head, numerics.hc_split_sinkhorn.
#include "common.cuh"

#define HC_MAX_ROWS 32      // 2n + n*n for n = 4 is 24

// Split-K partial products of the mix projection plus the sum of squares of the flattened state:
//   part[t, s, r]    = sum_{k in chunk s} fn[r, k] * X[t, k]       r < rows
//   part[t, s, rows] = sum_{k in chunk s} X[t, k]^2
// fn: [rows, K] with dtype 0 = F32, 1 = F16, 2 = BF16 (raw GGUF rows); X: [T, K] (K = n*D); part: [T, nsplit, rows+1].
// grid = (nsplit, T), block = 256. Deterministic (no atomics): hc_split_collapse sums the splits in order.
extern "C" __global__ void hc_mix(const float* X, long long K, const void* fn, int dtype, int rows, int nsplit,
                                  float* part) {
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
// The Sinkhorn runs in double on one thread (n*n = 16 values). grid = T, block = 256.
extern "C" __global__ void hc_split_collapse(const float* X, const float* part, int n, int D, int rows, int nsplit,
                                             const float* scale, const float* base, int iters, float eps_hc,
                                             float eps_rms, int mode, float* u, float* coef) {
    __shared__ float pre_s[8];
    const int t = blockIdx.x;
    const long long K = (long long)n * D;
    if (threadIdx.x == 0) {
        double mix[HC_MAX_ROWS];
        double ss = 0.0;
        for (int s = 0; s < nsplit; ++s) ss += part[((long long)t * nsplit + s) * (rows + 1) + rows];
        double rs = 1.0 / sqrt(ss / (double)K + (double)eps_rms);
        for (int r = 0; r < rows; ++r) {
            double m = 0.0;
            for (int s = 0; s < nsplit; ++s) m += part[((long long)t * nsplit + s) * (rows + 1) + r];
            mix[r] = m * rs;
        }
        if (mode == 1) {
            for (int i = 0; i < n; ++i)
                pre_s[i] = (float)(1.0 / (1.0 + exp(-(mix[i] * (double)scale[0] + (double)base[i]))) + eps_hc);
        } else {
            const double s0 = scale[0], s1 = scale[1], s2 = scale[2], eps = eps_hc;
            float* cf = coef + (long long)t * (n + n * n);
            for (int i = 0; i < n; ++i) {
                pre_s[i] = (float)(1.0 / (1.0 + exp(-(mix[i] * s0 + (double)base[i]))) + eps);
                cf[i] = (float)(2.0 / (1.0 + exp(-(mix[n + i] * s1 + (double)base[n + i]))));
            }
            double c[16];
            for (int j = 0; j < n; ++j) {
                double mx = -1e300;
                for (int k = 0; k < n; ++k) {
                    c[j * n + k] = mix[2 * n + j * n + k] * s2 + (double)base[2 * n + j * n + k];
                    mx = fmax(mx, c[j * n + k]);
                }
                double sum = 0.0;
                for (int k = 0; k < n; ++k) { c[j * n + k] = exp(c[j * n + k] - mx); sum += c[j * n + k]; }
                for (int k = 0; k < n; ++k) c[j * n + k] = c[j * n + k] / sum + eps;
            }
            for (int it = 0; it < iters; ++it) {
                if (it > 0) {
                    for (int j = 0; j < n; ++j) {
                        double sum = 0.0;
                        for (int k = 0; k < n; ++k) sum += c[j * n + k];
                        for (int k = 0; k < n; ++k) c[j * n + k] /= (sum + eps);
                    }
                }
                for (int k = 0; k < n; ++k) {
                    double sum = 0.0;
                    for (int j = 0; j < n; ++j) sum += c[j * n + k];
                    for (int j = 0; j < n; ++j) c[j * n + k] /= (sum + eps);
                }
            }
            for (int i = 0; i < n * n; ++i) cf[n + i] = (float)c[i];
        }
    }
    __syncthreads();
    const float* x = X + (long long)t * K;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float acc = 0.0f;
        for (int i = 0; i < n; ++i) acc += pre_s[i] * x[(long long)i * D + d];
        u[(long long)t * D + d] = acc;
    }
}

// hc_post, in place: X'[t, k, d] = post[k] * y[t, d] + sum_j comb[j, k] * X[t, j, d]   (comb transposed: model.md §7.1)
// coef: [T, n + n*n] from hc_split_collapse. grid = (ceil(D/256), T), block = 256.
extern "C" __global__ void hc_post(float* X, const float* y, const float* coef, int n, int D) {
    const int t = blockIdx.y;
    const int d = blockIdx.x * blockDim.x + threadIdx.x;
    if (d >= D) return;
    const float* cf = coef + (long long)t * (n + n * n);
    float* x = X + (long long)t * n * D;
    float xs[8];
    for (int j = 0; j < n; ++j) xs[j] = x[(long long)j * D + d];
    const float yv = y[(long long)t * D + d];
    for (int k = 0; k < n; ++k) {
        float acc = cf[k] * yv;
        for (int j = 0; j < n; ++j) acc += cf[n + j * n + k] * xs[j];
        x[(long long)k * D + d] = acc;
    }
}
