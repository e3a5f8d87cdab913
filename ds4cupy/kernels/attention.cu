// attention.cu: sparse MQA attention with sinks (model.md §2.4; reference: ReferenceModel.attention, from the scores
// to the output de-rotation). One 512-wide (head_dim) KV row serves as K and V; scale head_dim^-1/2.
//
// Keys of query t (absolute position P = d_pos[0] + t):
//   window: positions max(0, P - W + 1) .. P. A position p >= d_pos[0] is row p - d_pos[0] of `cur` (this call's KV
//           rows); an older one is ring[p % W] (the window ring, written after attention by kv_ring_store).
//   compressed (mode 1, dense / HCA): rows w = 0 .. (P + 1) / ratio - 1 of `comp`
//   compressed (mode 2, indexed / CSA): rows idx[t, j], j < K, skipping -1 and any w >= (P + 1) / ratio
// Decode is S = 1; prefill any S (a chunk), causal by construction.
//
// attn_partial: flash-decoding style split over the key list. One warp per (query, head, split); lane l holds dims
// l, l + 32, ... of q and of the running output (d <= 512, d % 32 == 0); online softmax in float.
//   part_ml[(t*H + h)*NS + s] = (running max m, running sum l), part_o[...*d + i] = unnormalised output.
// grid = (ceil(H / HPB), NS, S), block = HPB * 32.
// attn_combine: merges the splits with the sink (sink logit in the denominator, zero value), then applies the inverse
// rope on the last n_rot dims at the query position. out: [S, H, d]. grid = (H, S), block = 128, smem d floats.
#include "common.cuh"

#define ATT_MAXC 16    // d / 32 <= 16

extern "C" __global__ void attn_partial(const float* q, const float* ring, const float* cur, const float* comp,
                                        const int* idx, int K, const int* d_pos, int H, int d, int W, int ratio,
                                        int mode, float scale, float* part_ml, float* part_o) {
    const int HPB = blockDim.x >> 5;
    const int lane = threadIdx.x & 31;
    const int h = blockIdx.x * HPB + (threadIdx.x >> 5);
    const int s = blockIdx.y, NS = gridDim.y, t = blockIdx.z;
    if (h >= H) return;
    const long long pos0 = d_pos[0];
    const long long P = pos0 + t;
    const long long lo = P - W + 1 > 0 ? P - W + 1 : 0;
    const int nwin = (int)(P - lo + 1);
    const int nvis = ratio > 0 ? (int)((P + 1) / ratio) : 0;
    int ncomp = 0;
    if (mode == 1) ncomp = nvis;
    else if (mode == 2) ncomp = K;
    const int R = nwin + ncomp;
    const int per = (R + NS - 1) / NS;
    const int j0 = s * per, j1 = min(R, j0 + per);
    const int nc = d >> 5;

    float qv[ATT_MAXC], acc[ATT_MAXC];
    const float* qr = q + ((long long)t * H + h) * d;
#pragma unroll
    for (int c = 0; c < ATT_MAXC; ++c) {
        qv[c] = c < nc ? qr[lane + 32 * c] : 0.0f;
        acc[c] = 0.0f;
    }
    float m = -DS4_INF, l = 0.0f;
    for (int j = j0; j < j1; ++j) {
        const float* kr;
        if (j < nwin) {
            long long p = lo + j;
            kr = p >= pos0 ? cur + (p - pos0) * d : ring + (p % W) * d;
        } else {
            int w = j - nwin;
            if (mode == 2) {
                w = idx[(long long)t * K + w];
                if (w < 0 || w >= nvis) continue;
            }
            kr = comp + (long long)w * d;
        }
        float kv[ATT_MAXC];
        float dot = 0.0f;
#pragma unroll
        for (int c = 0; c < ATT_MAXC; ++c) {
            kv[c] = c < nc ? kr[lane + 32 * c] : 0.0f;
            dot += qv[c] * kv[c];
        }
        const float sc = warp_sum(dot) * scale;
        if (sc > m) {
            const float corr = __expf(m - sc);      // m = -inf -> 0
            l = l * corr + 1.0f;
#pragma unroll
            for (int c = 0; c < ATT_MAXC; ++c) acc[c] = acc[c] * corr + kv[c];
            m = sc;
        } else {
            const float p = __expf(sc - m);
            l += p;
#pragma unroll
            for (int c = 0; c < ATT_MAXC; ++c) acc[c] += p * kv[c];
        }
    }
    const long long slot = ((long long)t * H + h) * NS + s;
    if (lane == 0) {
        part_ml[slot * 2] = m;
        part_ml[slot * 2 + 1] = l;
    }
#pragma unroll
    for (int c = 0; c < ATT_MAXC; ++c)
        if (c < nc) part_o[slot * d + lane + 32 * c] = acc[c];
}

extern "C" __global__ void attn_combine(const float* part_ml, const float* part_o, const float* sinks, int H, int d,
                                        int NS, int n_rot, const double* freqs, const int* d_pos, float* out) {
    extern __shared__ float o_s[];
    const int h = blockIdx.x, t = blockIdx.y;
    const long long base = ((long long)t * H + h) * NS;
    const float sink = sinks[h];
    float M = sink;
    for (int s = 0; s < NS; ++s) M = fmaxf(M, part_ml[(base + s) * 2]);
    float L = __expf(sink - M);
    for (int s = 0; s < NS; ++s) {
        const float ms = part_ml[(base + s) * 2];
        if (ms > -DS4_INF) L += part_ml[(base + s) * 2 + 1] * __expf(ms - M);
    }
    const float invL = 1.0f / L;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float acc = 0.0f;
        for (int s = 0; s < NS; ++s) {
            const float ms = part_ml[(base + s) * 2];
            if (ms > -DS4_INF) acc += part_o[(base + s) * d + i] * __expf(ms - M);
        }
        o_s[i] = acc * invL;
    }
    __syncthreads();
    const long long P = (long long)d_pos[0] + t;
    const int b0 = d - n_rot;
    for (int i = threadIdx.x; i < n_rot / 2; i += blockDim.x) {
        float c, sn;
        rope_cs(freqs, i, P, &c, &sn);
        float a = o_s[b0 + 2 * i], b = o_s[b0 + 2 * i + 1];
        rope_pair(a, b, c, sn, true);
        o_s[b0 + 2 * i] = a;
        o_s[b0 + 2 * i + 1] = b;
    }
    __syncthreads();
    float* orow = out + ((long long)t * H + h) * d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) orow[i] = o_s[i];
}

// After attention: the last min(S, W) rows of this call go into the window ring (slot = position % W).
// cur: [S, d]; ring: [W, d]. grid = min(S, W), block = 128.
extern "C" __global__ void kv_ring_store(const float* cur, float* ring, const int* d_pos, int S, int W, int d) {
    const int n = S < W ? S : W;
    const int t = S - n + blockIdx.x;
    const long long p = (long long)d_pos[0] + t;
    const float* src = cur + (long long)t * d;
    float* dst = ring + (p % W) * d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) dst[i] = src[i];
}
