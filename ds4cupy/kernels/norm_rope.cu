// norm_rope.cu: RMSNorm variants, interleaved RoPE on the trailing dims (forward / inverse), and the FP8 / Hadamard+FP4
// QAT rounding of KV and indexer rows. Activations are float32, row-major. Positions come from device memory
// (d_pos[0] = position of row 0 of this call) so decode steps can be graph-captured.
// RoPE frequencies: float64 [n_rot/2] from ds4cupy.engines.numerics.rope_freqs (per layer, YaRN folded in); cos/sin are
// formed per element in double exactly like numerics.rope_cos_sin.
#include "common.cuh"
#include "pdl.cuh"

// y[r, :n] = rms_norm(x[r, :n], w)            (numerics.rms_norm; w == nullptr: no weight)
// x: [rows, xs] float, y: [rows, ys] float (may alias x). grid = rows, block = 256.
extern "C" __global__ void rms_norm_rows(const float* x, long long xs, const float* w, float* y, long long ys, int n,
                                         float eps) {
    DS4_PDL_ENTRY();
    __shared__ double redd[32];
    const float* xr = x + (long long)blockIdx.x * xs;
    float* yr = y + (long long)blockIdx.x * ys;
    double ss = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) ss += (double)xr[i] * (double)xr[i];
    ss = block_sum_d(ss, redd);
    double inv = 1.0 / sqrt(ss / n + (double)eps);
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float v = (float)((double)xr[i] * inv);
        yr[i] = w ? __fmul_rn(v, w[i]) : v;
    }
}

// The q_a / kv pair of the attention input (reference.attention, model.md §2.4), both in one launch:
//   blockIdx.y == 0: qr[t] = rms_norm(xq[t, :nq], wq)
//   blockIdx.y == 1: kv[t] = qat_kv(rope(rms_norm(xkv[t, :nkv], wkv), pos0 + t)); qat: 1 = fp8_sim(64) on the nope dims
// xq: [S, xqs], qr: [S, nq]; xkv: [S, xkvs], kv: [S, nkv]. grid = (S, 2), block = 256, dynamic smem = max(nq, nkv)*4.
extern "C" __global__ void rms_norm_qkv(const float* xq, long long xqs, const float* wq, float* qr, int nq,
                                        const float* xkv, long long xkvs, const float* wkv, float* kv, int nkv,
                                        int n_rot, const double* freqs, const int* d_pos, int qat, float eps) {
    DS4_PDL_ENTRY();
    extern __shared__ float v[];
    __shared__ double redd[32];
    const int t = blockIdx.x;
    if (blockIdx.y == 0) {
        for (int i = threadIdx.x; i < nq; i += blockDim.x) v[i] = xq[(long long)t * xqs + i];
        row_finish(v, nq, true, wq, eps, 0, freqs, 0, 0, nullptr, redd);
        for (int i = threadIdx.x; i < nq; i += blockDim.x) qr[(long long)t * nq + i] = v[i];
    } else {
        for (int i = threadIdx.x; i < nkv; i += blockDim.x) v[i] = xkv[(long long)t * xkvs + i];
        row_finish(v, nkv, true, wkv, eps, n_rot, freqs, (long long)d_pos[0] + t, qat ? 1 : 0, nullptr, redd);
        for (int i = threadIdx.x; i < nkv; i += blockDim.x) kv[(long long)t * nkv + i] = v[i];
    }
}

// Per-head preparation of q and indexer q, in place. x: [S, H, d] float (row t*H + h).
//   norm != 0: weightless rms over d (model.md §2.4 per-head q norm); then rope on the last n_rot dims at pos0 + t;
//   qat == 2: numerics.fp4_sim(numerics.hadamard(.), 32) (indexer q, d a power of two); qat == 1: fp8 on nope dims.
// reference: ReferenceModel.attention (q) / indexer_select (qi). grid = S*H, block = 128, dynamic smem = d*12 bytes.
extern "C" __global__ void heads_prep(float* x, int H, int d, int norm, int n_rot, const double* freqs,
                                      const int* d_pos, int qat, float eps) {
    DS4_PDL_ENTRY();
    extern __shared__ double dsm[];              // d doubles, then d floats
    float* v = (float*)(dsm + d);
    __shared__ double redd[32];
    const long long row = blockIdx.x;
    const int t = (int)(row / H);
    float* xr = x + row * d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) v[i] = xr[i];
    row_finish(v, d, norm != 0, nullptr, eps, n_rot, freqs, (long long)d_pos[0] + t, qat, dsm, redd);
    for (int i = threadIdx.x; i < d; i += blockDim.x) xr[i] = v[i];
}

// numerics.rope_apply on the last n_rot dims of each row, in place. x: [S, per_tok, d]; row r has position
// d_pos[0] + r / per_tok. inverse != 0: conjugate rotation. grid = S*per_tok, block = 32..256.
extern "C" __global__ void rope_rows(float* x, int per_tok, int d, int n_rot, const double* freqs, const int* d_pos,
                                     int inverse) {
    DS4_PDL_ENTRY();
    const long long row = blockIdx.x;
    const long long pos = (long long)d_pos[0] + row / per_tok;
    float* xr = x + row * d + (d - n_rot);
    for (int i = threadIdx.x; i < n_rot / 2; i += blockDim.x) {
        float c, s;
        rope_cs(freqs, i, pos, &c, &s);
        float a = xr[2 * i], b = xr[2 * i + 1];
        rope_pair(a, b, c, s, inverse != 0);
        xr[2 * i] = a;
        xr[2 * i + 1] = b;
    }
}

// QAT rounding of rows, in place. x: [rows, d].
//   mode 1: numerics.fp8_sim(x[:, :nq], 64)  (nq a multiple of 64; dims >= nq untouched)
//   mode 2: numerics.fp4_sim(numerics.hadamard(x), 32)   (d a power of two <= 4096)
//   mode 3: numerics.fp4_sim(x, 32) (no Hadamard)
// Bit-exact to the NumPy functions (the Hadamard runs in double in NumPy's butterfly order).
// grid = rows, block = 128, dynamic smem = d*12 bytes.
extern "C" __global__ void qat_rows(float* x, int d, int nq, int mode) {
    DS4_PDL_ENTRY();
    extern __shared__ double dsm[];
    float* v = (float*)(dsm + d);
    __shared__ double redd[32];
    float* xr = x + (long long)blockIdx.x * d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) v[i] = xr[i];
    if (mode == 3) {
        __syncthreads();
        const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
        for (int b = wid; b < d / 32; b += nw) {
            float e = v[b * 32 + lane];
            float amax = warp_max(fabsf(e));
            v[b * 32 + lane] = fp4_apply(e, fp4_scale_exp(amax));
        }
        __syncthreads();
    } else {
        row_finish(v, d, false, nullptr, 0.0f, mode == 1 ? d - nq : 0, nullptr, 0, mode, dsm, redd);
    }
    for (int i = threadIdx.x; i < d; i += blockDim.x) xr[i] = v[i];
}
