// indexer.cu: the lightning indexer's scores and causal top-k (model.md §2.6; reference:
// ReferenceModel.indexer_select).
//   score[t, s] = sum_h wscale * wts[t, h] * relu(q[t, h] . k[s])     for s < nvis(t) = (P + 1) / ratio
// q: [S, HI, c] (roped, Hadamard+FP4 rounded by heads_prep), wts: [S, HI] (the raw weights_proj output; wscale =
// c^-1/2 * HI^-1/2 folded in here), k: [Ncap, c] indexer-compressed rows. scores: [S, stride] float32 (only s < nvis
// written). P = d_pos[0] + t.
#include "common.cuh"

// grid = (nblk, S), block = 256 (8 warps; warp j handles rows s = blockIdx.x*8 + j, += gridDim.x*8),
// dynamic smem = (HI*(c+1) + HI + 8*c) floats.
extern "C" __global__ void indexer_scores(const float* q, const float* wts, const float* k, const int* d_pos, int HI,
                                          int c, int ratio, float wscale, float* scores, long long stride) {
    extern __shared__ float sm[];
    float* qs = sm;                         // [HI][c+1]
    float* ws = qs + HI * (c + 1);          // [HI]
    float* ks = ws + HI;                    // [8][c]
    const int t = blockIdx.y;
    const long long P = (long long)d_pos[0] + t;
    const long long nvis = (P + 1) / ratio;
    const float* qt = q + (long long)t * HI * c;
    for (int i = threadIdx.x; i < HI * c; i += blockDim.x) qs[(i / c) * (c + 1) + (i % c)] = qt[i];
    for (int i = threadIdx.x; i < HI; i += blockDim.x) ws[i] = wts[(long long)t * HI + i] * wscale;
    __syncthreads();
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    float* kw = ks + wid * c;
    for (long long s = (long long)blockIdx.x * 8 + wid; s < nvis; s += (long long)gridDim.x * 8) {
        for (int i = lane; i < c; i += 32) kw[i] = k[s * c + i];
        __syncwarp();
        float tot = 0.0f;
        for (int h = lane; h < HI; h += 32) {
            const float* qh = qs + h * (c + 1);
            float dot = 0.0f;
            for (int i = 0; i < c; ++i) dot += qh[i] * kw[i];
            tot += ws[h] * fmaxf(dot, 0.0f);
        }
        tot = warp_sum(tot);
        if (lane == 0) scores[(long long)t * stride + s] = tot;
        __syncwarp();
    }
}

__device__ __forceinline__ unsigned int ord_key(float f) {
    unsigned int u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);   // larger float -> larger key
}

// Exclusive block scan of small non-negative ints (blockDim.x a multiple of 32, <= 1024); *total gets the sum.
__device__ __forceinline__ int block_scan_excl(int v, int* wsum, int* total) {
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
    int x = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        int y = __shfl_up_sync(0xffffffffu, x, o);
        if (lane >= o) x += y;
    }
    __syncthreads();
    if (lane == 31) wsum[wid] = x;
    __syncthreads();
    if (wid == 0) {
        int a = lane < nw ? wsum[lane] : 0;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            int y = __shfl_up_sync(0xffffffffu, a, o);
            if (lane >= o) a += y;
        }
        if (lane < nw) wsum[lane] = a;       // inclusive warp totals
    }
    __syncthreads();
    const int before = wid > 0 ? wsum[wid - 1] : 0;
    *total = wsum[nw - 1];
    return before + x - v;
}

// Top-K of scores[t, 0:nvis(t)] -> out[t, 0:K] (row indices in ascending index order, then -1 padding).
// nvis <= K: every visible row. Otherwise the K largest, ties -> lower index (as argsort(-score, stable)); the K-th
// largest key is found by an 8-bit radix select, then a deterministic in-order compaction.
// grid = S, block = 256.
extern "C" __global__ void indexer_topk(const float* scores, long long stride, const int* d_pos, int ratio, int K,
                                        int* out) {
    __shared__ unsigned int hist[256];
    __shared__ int wsum[32];
    __shared__ unsigned int s_prefix;
    __shared__ int s_need;
    const int t = blockIdx.x;
    const long long P = (long long)d_pos[0] + t;
    const int nvis = (int)((P + 1) / ratio);
    int* o = out + (long long)t * K;
    if (nvis <= K) {
        for (int j = threadIdx.x; j < K; j += blockDim.x) o[j] = j < nvis ? j : -1;
        return;
    }
    const float* sc = scores + (long long)t * stride;
    unsigned int prefix = 0, mask = 0;
    int need = K;                       // rank (1-based) of the wanted key among those matching prefix
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
        __syncthreads();
        for (int i = threadIdx.x; i < nvis; i += blockDim.x) {
            unsigned int key = ord_key(sc[i]);
            if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 255u], 1u);
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            int cum = 0, dsel = 0;
            for (int dgt = 255; dgt >= 0; --dgt) {
                if (cum + (int)hist[dgt] >= need) { dsel = dgt; break; }
                cum += hist[dgt];
            }
            s_prefix = prefix | ((unsigned int)dsel << shift);
            s_need = need - cum;
        }
        __syncthreads();
        prefix = s_prefix;
        need = s_need;
        mask |= 255u << shift;
        __syncthreads();
    }
    // prefix = the K-th largest key; take every key > prefix and the first `need` keys == prefix, in index order.
    int written = 0, eq_seen = 0;
    for (int base = 0; base < nvis; base += blockDim.x) {
        const int i = base + threadIdx.x;
        unsigned int key = i < nvis ? ord_key(sc[i]) : 0u;
        const int is_eq = (i < nvis && key == prefix) ? 1 : 0;
        int eq_tot;
        const int eq_rank = eq_seen + block_scan_excl(is_eq, wsum, &eq_tot);
        const int take = (i < nvis && (key > prefix || (is_eq && eq_rank < need))) ? 1 : 0;
        int tk_tot;
        const int at = written + block_scan_excl(take, wsum, &tk_tot);
        if (take) o[at] = i;
        written += tk_tot;
        eq_seen += eq_tot;
    }
    for (int j = written + threadIdx.x; j < K; j += blockDim.x) o[j] = -1;
}
