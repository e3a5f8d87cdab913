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
// attn_combine: merges the splits that hold keys at the query's position with the sink (sink logit in the denominator,
// zero value), then applies the inverse rope on the last n_rot dims at the query position. out: [S, H, d].
// grid = (H, S), block = 256, dynamic smem (d + NS_alloc) floats.
//
// attn_partial: flash-decoding style split over the key list. A block serves HPB heads (one warp each) of one query;
// split s covers key-list entries [s*rps, min(R, (s+1)*rps)). The block stages its keys in shared memory, ATT_TR rows
// at a time (each row read from memory once for all HPB heads: MQA, K = V), and each warp walks the tile four rows at
// a time (four independent dot products and warp reductions in flight). Lane l holds dims l, l + 32, ... of q and of
// the running output (d <= 512, d % 32 == 0); online softmax in float.
//   part_ml[(t*H + h)*NS + s] = (running max m, running sum l), part_o[...*d + i] = unnormalised output.
// A split with no valid key writes m = -inf, l = 0. grid = (ceil(H / HPB), NS, S), block = HPB * 32. The caller sizes
// NS * rps from the session's ctx (the longest key list any position can have), so a decode graph captured at one
// depth is right at every depth; splits past the current list end at once.
#include "common.cuh"
#include "pdl.cuh"

#define ATT_MAXC 16    // d / 32 <= 16
#define ATT_TR 16

// Length of query t's key list (window rows, then compressed rows) at absolute position P.
__device__ __forceinline__ int att_list_len(long long P, int W, int ratio, int mode, int K) {
    const long long lo = P - W + 1 > 0 ? P - W + 1 : 0;
    const int nwin = (int)(P - lo + 1);
    const int nvis = ratio > 0 ? (int)((P + 1) / ratio) : 0;
    return nwin + (mode == 1 ? nvis : (mode == 2 ? K : 0));
}

extern "C" __global__ void attn_partial(const float* q, const float* ring, const float* cur, const float* comp,
                                        const int* idx, int K, const int* d_pos, int H, int d, int W, int ratio,
                                        int mode, float scale, int rps, float* part_ml, float* part_o) {
    DS4_PDL_ENTRY();
    __shared__ __align__(16) float ks[ATT_TR * 512];
    __shared__ long long row_off[ATT_TR];   // element offset of the row in its buffer, or -1 (skipped key)
    __shared__ int row_src[ATT_TR];         // 0 ring, 1 cur, 2 comp
    const int HPB = blockDim.x >> 5;
    const int lane = threadIdx.x & 31;
    const int h = blockIdx.x * HPB + (threadIdx.x >> 5);
    const int s = blockIdx.y, NS = gridDim.y, t = blockIdx.z;
    const long long pos0 = d_pos[0];
    const long long P = pos0 + t;
    const long long lo = P - W + 1 > 0 ? P - W + 1 : 0;
    const int nwin = (int)(P - lo + 1);
    const int nvis = ratio > 0 ? (int)((P + 1) / ratio) : 0;
    int ncomp = 0;
    if (mode == 1) ncomp = nvis;
    else if (mode == 2) ncomp = K;
    const int R = nwin + ncomp;
    const int j0 = s * rps, j1 = min(R, j0 + rps);
    if (s > 0 && j0 >= R) return;     // past the list end: attn_combine reads only the splits that hold keys
    const int nc = d >> 5, d4 = d >> 2;

    float qv[ATT_MAXC], acc[ATT_MAXC];
    const float* qr = q + ((long long)t * H + (h < H ? h : 0)) * d;
#pragma unroll
    for (int c = 0; c < ATT_MAXC; ++c) {
        qv[c] = c < nc ? qr[lane + 32 * c] : 0.0f;
        acc[c] = 0.0f;
    }
    float m = -DS4_INF, l = 0.0f;
    for (int jt = j0; jt < j1; jt += ATT_TR) {
        const int n = min(ATT_TR, j1 - jt);
        __syncthreads();                                   // the previous tile is consumed
        if (threadIdx.x < ATT_TR) {
            const int j = jt + threadIdx.x;
            long long off = -1;
            int src = 2;
            if (threadIdx.x < n) {
                if (j < nwin) {
                    const long long p = lo + j;
                    src = p >= pos0 ? 1 : 0;
                    off = (p >= pos0 ? p - pos0 : p % W) * d;
                } else {
                    int w = j - nwin;
                    if (mode == 2) w = idx[(long long)t * K + w];
                    if (w >= 0 && w < nvis) off = (long long)w * d;
                }
            }
            row_off[threadIdx.x] = off;
            row_src[threadIdx.x] = src;
        }
        __syncthreads();
        for (int i = threadIdx.x; i < n * d4; i += blockDim.x) {
            const int r = i / d4, f = i % d4;
            const long long off = row_off[r];
            const float* base = row_src[r] == 0 ? ring : (row_src[r] == 1 ? cur : comp);
            reinterpret_cast<float4*>(ks)[r * d4 + f] =          // a skipped key is zeros: weight 0, no NaN
                off < 0 ? make_float4(0.f, 0.f, 0.f, 0.f) : reinterpret_cast<const float4*>(base + off)[f];
        }
        __syncthreads();
        if (h >= H) continue;
        for (int r0 = 0; r0 < n; r0 += 4) {
            float sc[4];
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                float dot = 0.0f;
                if (r0 + u < n) {
                    const float* kr = ks + (r0 + u) * d;
#pragma unroll
                    for (int c = 0; c < ATT_MAXC; ++c)
                        if (c < nc) dot = fmaf(qv[c], kr[lane + 32 * c], dot);
                }
                sc[u] = dot;
            }
#pragma unroll
            for (int o = 16; o > 0; o >>= 1)
#pragma unroll
                for (int u = 0; u < 4; ++u) sc[u] += __shfl_xor_sync(0xffffffffu, sc[u], o);
            float mn = m;
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                sc[u] = (r0 + u < n && row_off[r0 + u] >= 0) ? sc[u] * scale : -DS4_INF;
                mn = fmaxf(mn, sc[u]);
            }
            if (mn == -DS4_INF) continue;                  // no valid key yet
            const float corr = __expf(m - mn);             // m = -inf -> 0
            float pu[4];
#pragma unroll
            for (int u = 0; u < 4; ++u) pu[u] = __expf(sc[u] - mn);   // skipped keys -> 0
            l = l * corr + (pu[0] + pu[1]) + (pu[2] + pu[3]);
#pragma unroll
            for (int c = 0; c < ATT_MAXC; ++c) {
                if (c >= nc) continue;
                float a = acc[c] * corr;
#pragma unroll
                for (int u = 0; u < 4; ++u)
                    if (r0 + u < n) a = fmaf(pu[u], ks[(r0 + u) * d + lane + 32 * c], a);
                acc[c] = a;
            }
            m = mn;
        }
    }
    if (h >= H) return;
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
                                        int NS_alloc, int n_rot, const double* freqs, const int* d_pos, int W,
                                        int ratio, int mode, int K, int rps, float* out) {
    DS4_PDL_ENTRY();
    extern __shared__ float o_s[];           // d floats of output, then one weight per split
    __shared__ float red[32];
    float* w_s = o_s + d;
    const int h = blockIdx.x, t = blockIdx.y;
    const long long P0 = (long long)d_pos[0] + t;
    // splits that hold keys at this position (attn_partial wrote those; split 0 always)
    const int NS = max(1, min(NS_alloc, (att_list_len(P0, W, ratio, mode, K) + rps - 1) / rps));
    const long long base = ((long long)t * H + h) * NS_alloc;
    const float sink = sinks[h];
    // M = max(sink, m_s); w_s[s] = exp(m_s - M) (0 for an empty split); L = exp(sink - M) + sum_s l_s w_s.
    // The splits are spread over the threads (fixed-order block reductions), every load in flight at once.
    float mx = sink;
    for (int s = threadIdx.x; s < NS; s += blockDim.x) mx = fmaxf(mx, part_ml[(base + s) * 2]);
    const float M = block_max(mx, red);
    float lsum = 0.f;
    for (int s = threadIdx.x; s < NS; s += blockDim.x) {
        const float ms = part_ml[(base + s) * 2];
        const float w = ms > -DS4_INF ? __expf(ms - M) : 0.f;
        w_s[s] = w;
        lsum += w > 0.f ? part_ml[(base + s) * 2 + 1] * w : 0.f;
    }
    const float invL = 1.0f / (__expf(sink - M) + block_sum(lsum, red));   // block_sum's barriers publish w_s
    // every split s < NS was written by attn_partial (zeros for a split without a valid key), so the loads need no
    // guard and go out 8 at a time; a split of weight 0 adds 0 * (a finite value): the sum is the guarded one's
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float acc = 0.0f;
#pragma unroll 8
        for (int s = 0; s < NS; ++s) acc = fmaf(part_o[(base + s) * d + i], w_s[s], acc);
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
    DS4_PDL_ENTRY();
    const int n = S < W ? S : W;
    const int t = S - n + blockIdx.x;
    const long long p = (long long)d_pos[0] + t;
    const float* src = cur + (long long)t * d;
    float* dst = ring + (p % W) * d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) dst[i] = src[i];
}
