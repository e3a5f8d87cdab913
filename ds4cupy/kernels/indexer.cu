// indexer.cu: the lightning indexer's scores and causal top-k (model.md §2.6; reference:
// ReferenceModel.indexer_select).
//   score[t, s] = sum_h wscale * wts[t, h] * relu(q[t, h] . k[s])     for s < nvis(t) = (P + 1) / ratio
// q: [S, HI, c] (roped, Hadamard+FP4 rounded by heads_prep), wts: [S, HI] (the raw weights_proj output; wscale =
// c^-1/2 * HI^-1/2 folded in here), k: [Ncap, c] indexer-compressed rows. scores: [S, stride] float32 (only s < nvis
// written). P = d_pos[0] + t.
#include "common.cuh"
#include "pdl.cuh"

// indexer_scores: tiles of IDX_TR = 32 rows x all heads, register-tiled on CUDA cores in float32.
// grid = (nblk, S), block = 256. Block (b, t) takes row tiles b, b + nblk, ... below nvis(t): the grid is fixed by the
// caller (sized from the session's ctx, never from the position), the work follows the device position.
// Thread (tr = tid / 16, th = tid % 16) computes rows 2*tr, 2*tr + 1 of the tile against heads th, th+16, th+32, th+48:
// 8 dot products of length c, float4 loads from shared memory. q (all heads, zero beyond HI) and the k tile live in
// shared memory with an XOR swizzle of the float4 slot (slot ^ (row & 7)) so a quarter-warp's 16-byte loads hit 8
// distinct bank groups. The head sum is a shuffle reduction over the 16 `th` lanes.
// Limits (checked by ops.indexer_scores): HI <= 64, c <= 128, c % 32 == 0. Static shared memory: 48 KiB.
#define IDX_TR 32
#define IDX_MAXH 64
#define IDX_MAXC 128

__device__ __forceinline__ float4* idx_slot(float4* base, int row, int f, int c4) {
    return base + row * c4 + (f ^ (row & 7));
}

extern "C" __global__ void __launch_bounds__(256) indexer_scores(const float* q, const float* wts, const float* k,
                                                                 const int* d_pos, int HI, int c, int ratio,
                                                                 float wscale, float* scores, long long stride) {
    DS4_PDL_ENTRY();
    __shared__ float4 qs[IDX_MAXH * IDX_MAXC / 4];     // [64][c/4] swizzled
    __shared__ float4 ks[IDX_TR * IDX_MAXC / 4];       // [32][c/4] swizzled
    const int t = blockIdx.y;
    const long long P = (long long)d_pos[0] + t;
    const long long nvis = (P + 1) / ratio;
    const long long ntiles = (nvis + IDX_TR - 1) / IDX_TR;
    if ((long long)blockIdx.x >= ntiles) return;       // before any shared-memory work: idle blocks cost nothing
    const int c4 = c >> 2;
    const int tid = threadIdx.x, th = tid & 15, tr = tid >> 4;
    const float4* q4 = reinterpret_cast<const float4*>(q + (long long)t * HI * c);
    for (int i = tid; i < IDX_MAXH * c4; i += blockDim.x) {
        const int h = i / c4, f = i % c4;
        *idx_slot(qs, h, f, c4) = h < HI ? q4[h * c4 + f] : make_float4(0.f, 0.f, 0.f, 0.f);
    }
    float w[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const int h = th + 16 * j;
        w[j] = h < HI ? wts[(long long)t * HI + h] * wscale : 0.0f;
    }
    const float4* k4 = reinterpret_cast<const float4*>(k);
    for (long long tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
        const long long r0 = tile * IDX_TR;
        __syncthreads();                               // previous tile fully consumed (and q stored, first time)
        for (int i = tid; i < IDX_TR * c4; i += blockDim.x) {
            const int r = i / c4, f = i % c4;
            if (r0 + r < nvis) *idx_slot(ks, r, f, c4) = k4[(r0 + r) * c4 + f];
        }
        __syncthreads();
        float acc[2][4];
#pragma unroll
        for (int a = 0; a < 2; ++a)
#pragma unroll
            for (int j = 0; j < 4; ++j) acc[a][j] = 0.0f;
        const int ra = 2 * tr, rb = 2 * tr + 1;
        for (int f = 0; f < c4; ++f) {
            const float4 ka = *idx_slot(ks, ra, f, c4), kb = *idx_slot(ks, rb, f, c4);
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const float4 qv = *idx_slot(qs, th + 16 * j, f, c4);
                acc[0][j] = fmaf(qv.x, ka.x, acc[0][j]); acc[0][j] = fmaf(qv.y, ka.y, acc[0][j]);
                acc[0][j] = fmaf(qv.z, ka.z, acc[0][j]); acc[0][j] = fmaf(qv.w, ka.w, acc[0][j]);
                acc[1][j] = fmaf(qv.x, kb.x, acc[1][j]); acc[1][j] = fmaf(qv.y, kb.y, acc[1][j]);
                acc[1][j] = fmaf(qv.z, kb.z, acc[1][j]); acc[1][j] = fmaf(qv.w, kb.w, acc[1][j]);
            }
        }
        float sa = 0.0f, sb = 0.0f;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            sa = fmaf(w[j], fmaxf(acc[0][j], 0.0f), sa);
            sb = fmaf(w[j], fmaxf(acc[1][j], 0.0f), sb);
        }
#pragma unroll
        for (int o = 8; o > 0; o >>= 1) {              // the 16 head-group lanes of this row pair
            sa += __shfl_xor_sync(0xffffffffu, sa, o);
            sb += __shfl_xor_sync(0xffffffffu, sb, o);
        }
        if (th == 0) {
            if (r0 + ra < nvis) scores[(long long)t * stride + r0 + ra] = sa;
            if (r0 + rb < nvis) scores[(long long)t * stride + r0 + rb] = sb;
        }
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
// nvis <= K: every visible row. Otherwise the K largest, ties -> lower index (as argsort(-score, stable)).
// One block of 1024 threads per query: the K-th largest key by an 8-bit radix select (4 passes over the scores, one
// shared histogram per warp so the atomics of a warp do not contend with the other 31 warps), then a deterministic
// compaction: thread i owns the contiguous range [i*chunk, (i+1)*chunk), counts, two block scans give its output
// offset and how many of the keys equal to the K-th it takes, and it writes its indices in order.
// grid = S, block = 1024 (TOPK_THREADS). Shared memory: 33 KiB.
#define TOPK_THREADS 1024

extern "C" __global__ void __launch_bounds__(TOPK_THREADS) indexer_topk(const float* scores, long long stride,
                                                                        const int* d_pos, int ratio, int K, int* out) {
    DS4_PDL_ENTRY();
    __shared__ unsigned int hist[TOPK_THREADS / 32][256];
    __shared__ int wsum[32];
    __shared__ unsigned int s_prefix;
    __shared__ int s_need;
    const int t = blockIdx.x, tid = threadIdx.x, lane = tid & 31, wid = tid >> 5;
    const long long P = (long long)d_pos[0] + t;
    const long long nvis = (P + 1) / ratio;
    int* o = out + (long long)t * K;
    if (nvis <= K) {
        for (int j = tid; j < K; j += blockDim.x) o[j] = j < nvis ? j : -1;
        return;
    }
    const float* sc = scores + (long long)t * stride;
    unsigned int prefix = 0, mask = 0;
    int need = K;                       // rank (1-based) of the wanted key among those matching prefix
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int i = tid; i < (TOPK_THREADS / 32) * 256; i += blockDim.x) (&hist[0][0])[i] = 0u;
        __syncthreads();
        for (long long i = tid; i < nvis; i += blockDim.x) {
            const unsigned int key = ord_key(sc[i]);
            if ((key & mask) == prefix) atomicAdd(&hist[wid][(key >> shift) & 255u], 1u);
        }
        __syncthreads();
        // threads 0..255: b -> digit 255 - b; inclusive scan over b = keys with digit >= 255 - b
        int cnt = 0;
        if (tid < 256)
            for (int w = 0; w < TOPK_THREADS / 32; ++w) cnt += (int)hist[w][255 - tid];
        int incl = cnt;
#pragma unroll
        for (int off = 1; off < 32; off <<= 1) {
            const int y = __shfl_up_sync(0xffffffffu, incl, off);
            if (lane >= off) incl += y;
        }
        if (tid < 256 && lane == 31) wsum[wid] = incl;
        __syncthreads();
        if (tid < 256) {
            for (int w = 0; w < wid; ++w) incl += wsum[w];
            const int excl = incl - cnt;
            if (excl < need && incl >= need) {
                s_prefix = prefix | ((unsigned int)(255 - tid) << shift);
                s_need = need - excl;
            }
        }
        __syncthreads();
        prefix = s_prefix;
        need = s_need;
        mask |= 255u << shift;
    }
    // prefix = the K-th largest key; take every key > prefix and the first `need` keys == prefix, in index order.
    const long long chunk = (nvis + blockDim.x - 1) / blockDim.x;
    const long long i0 = (long long)tid * chunk, i1 = min(nvis, i0 + chunk);
    int gt = 0, eq = 0;
    for (long long i = i0; i < i1; ++i) {
        const unsigned int key = ord_key(sc[i]);
        gt += key > prefix;
        eq += key == prefix;
    }
    int tot;
    const int eq_before = block_scan_excl(eq, wsum, &tot);
    const int eq_take = max(0, min(eq, need - eq_before));
    const int at0 = block_scan_excl(gt + eq_take, wsum, &tot);
    int at = at0, eq_seen = 0;
    for (long long i = i0; i < i1; ++i) {
        const unsigned int key = ord_key(sc[i]);
        if (key > prefix || (key == prefix && eq_seen++ < eq_take)) o[at++] = (int)i;
    }
    for (int j = tot + tid; j < K; j += blockDim.x) o[j] = -1;
}
