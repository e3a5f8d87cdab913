// topk_multi.cu (switch TOPK_MULTI): indexer_topk's selection (kernels/indexer.cu) spread over G blocks per query.
// Contract, identical to indexer_topk for every input (the same int32 output, bit for bit):
//   out[t, 0:K] = the row indices of the K largest keys ord_key(scores[t, s]), s < nvis(t) = (d_pos[0] + t + 1) /
//   ratio, ties between equal keys -> lower index, written in ascending index order, then -1 padding; nvis <= K:
//   0..nvis-1 then -1. ord_key maps the float's bits to a uint32 that orders like the float (larger float -> larger key), and
//   is a total order on bit patterns: +NaN above +inf, -NaN below -inf, -0 just below +0, equal keys = equal bits.
//   scores: float32 [S, stride] (only s < nvis read); out: int32 [S, K].
// Why it is the same selection: (1) three radix levels (digits of 11, 11 and 10 bits of the key, high to low) find
// the K-th largest key kth exactly: level L counts the keys whose higher bits equal the prefix found so far, per
// digit value, and picks the digit where the running count from the top first reaches `need` (the rank still
// wanted), need -= the keys of the higher digits. After level 2 the prefix is all 32 bits: kth, the unique value of
// the K-th largest key, and need = K - #{key > kth} >= 1, the number of keys equal to kth to take (indexer_topk ends
// with the same kth and need: its four 8-bit levels are the same radix select with other digit widths). (2) The
// output is {s: key > kth} plus the first `need` indices with key == kth in index order, written in ascending index
// order: block g owns the contiguous slice [g * L, (g+1) * L) (L = ceil(nvis / G)), thread i of a block the
// contiguous sub-range i of its slice; blocks before g hold gt_b / eq_b keys above / equal to kth, so block g's
// first output slot is sum_{b<g} gt_b + min(need, sum_{b<g} eq_b), and inside the block two block scans give each
// thread its slot and how many of its equal keys it takes, exactly as indexer_topk's compaction does with one block.
// Since nvis > K implies sum gt + need = K, every slot 0..K-1 is written once; nvis <= K writes 0..nvis-1 then -1.
// Launches (ops.indexer_topk_multi), grid (G, S) unless said, G from ctx (ops.topk_multi_blocks, never the
// position: a captured decode graph serves any depth), all fixed-size, no host sync:
//   topkm_hist(level 0), topkm_scan(0), topkm_hist(1), topkm_scan(1), topkm_hist(2), topkm_scan(2), topkm_count,
//   topkm_write. topkm_scan is grid (S), block 1024; the others block 256.
// Scratch: hist uint32 [>= S, 2048] (one histogram per query, integer atomics only: counts are order-free), ALL ZERO
// before the first launch; every topkm_scan zeroes the bins it read, so each call leaves it zero again.
// meta int32 [>= S * (2 + 2 * G)]: state[t] = (kth prefix, need) at meta[2t], per-block (gt, eq) counts at
// meta[2S + 2(tG + g)] (no initial value needed).
// Bytes read at nvis = 262,144 (1 MiB of float32 scores per query, L2-resident: indexer_scores just wrote them):
// each topkm_hist 1 MiB spread over G blocks (+ at most 2048 global integer atomics a block, in practice the few
// nonzero bins of its slice), each topkm_scan 8 KiB (2048 counts) by one block, topkm_count 1 MiB over G blocks,
// topkm_write 1 MiB over G blocks (+ its slice read once more from L1/L2, and 8 bytes of counts per earlier block):
// ~5 MiB in all, over G blocks (264 on an H200: two waves of 132 SMs), instead of indexer_topk's 6 MiB (four radix
// passes and two compaction passes) read by one SM. Expected, not measured yet: 8 launches of ~2-4 us each (each
// block reads ~1,000 scores), ~20-30 us a CSA layer and query at 262K rows, against ~60-100 us for one SM's six
// passes (one SM streams roughly 60-100 GB/s from L2). At small nvis the 8 launches cost more than indexer_topk's one.
#include "common.cuh"
#include "pdl.cuh"

#define TOPKM_BINS 2048
#define TOPKM_THREADS 256
#define TOPKM_SCAN_THREADS 1024

__device__ __forceinline__ unsigned int topkm_key(float f) {     // indexer.cu's ord_key
    unsigned int u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ long long topkm_nvis(const int* d_pos, int t, int ratio) {
    return ((long long)d_pos[0] + t + 1) / ratio;
}

// level 0: bits 31..21 (11), level 1: bits 20..10 (11), level 2: bits 9..0 (10).
__device__ __forceinline__ int topkm_shift(int level) { return level == 0 ? 21 : (level == 1 ? 10 : 0); }
__device__ __forceinline__ int topkm_bits(int level) { return level == 2 ? 10 : 11; }

// Exclusive block scan of non-negative ints (blockDim.x a multiple of 32, <= 1024); *total gets the sum. Every
// thread of the block must call it.
__device__ __forceinline__ int topkm_scan_excl(int v, int* wsum, int* total) {
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
    int x = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const int y = __shfl_up_sync(0xffffffffu, x, o);
        if (lane >= o) x += y;
    }
    __syncthreads();
    if (lane == 31) wsum[wid] = x;
    __syncthreads();
    if (wid == 0) {
        int a = lane < nw ? wsum[lane] : 0;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const int y = __shfl_up_sync(0xffffffffu, a, o);
            if (lane >= o) a += y;
        }
        if (lane < nw) wsum[lane] = a;
    }
    __syncthreads();
    const int before = wid > 0 ? wsum[wid - 1] : 0;
    *total = wsum[nw - 1];
    return before + x - v;
}

// Block (g, t): the digit histogram of the keys of its slice whose bits above this level equal state[t]'s prefix
// (level 0: every key), added into hist[t] (global integer atomics of its nonzero bins).
extern "C" __global__ void __launch_bounds__(TOPKM_THREADS) topkm_hist(const float* scores, long long stride,
                                                                       const int* d_pos, int ratio, int K, int level,
                                                                       const int* meta, unsigned int* hist) {
    DS4_PDL_ENTRY();
    __shared__ unsigned int h[TOPKM_BINS];
    const int t = blockIdx.y, g = blockIdx.x, G = gridDim.x, tid = threadIdx.x;
    const long long nvis = topkm_nvis(d_pos, t, ratio);
    if (nvis <= K) return;
    const long long L = (nvis + G - 1) / G, s0 = (long long)g * L, s1 = min(nvis, s0 + L);
    if (s0 >= s1) return;
    const int shift = topkm_shift(level);
    const unsigned int dmask = (1u << topkm_bits(level)) - 1u;
    const unsigned int hmask = level == 0 ? 0u : (0xffffffffu << (shift + topkm_bits(level)));
    const unsigned int prefix = level == 0 ? 0u : (unsigned int)meta[2 * t];
    for (int b = tid; b < TOPKM_BINS; b += blockDim.x) h[b] = 0u;
    __syncthreads();
    const float* sc = scores + (long long)t * stride;
    for (long long i = s0 + tid; i < s1; i += blockDim.x) {
        const unsigned int key = topkm_key(sc[i]);
        if ((key & hmask) == prefix) atomicAdd(&h[(key >> shift) & dmask], 1u);
    }
    __syncthreads();
    unsigned int* gh = hist + (long long)t * TOPKM_BINS;
    for (int b = tid; b < TOPKM_BINS; b += blockDim.x)
        if (h[b]) atomicAdd(&gh[b], h[b]);
}

// Block t (1024 threads): the digit of this level holding the need-th largest matching key; state[t] = (prefix with
// that digit, need - the keys of the higher digits). Zeroes hist[t] (the bins it read) for the next level / call.
extern "C" __global__ void __launch_bounds__(TOPKM_SCAN_THREADS) topkm_scan(const int* d_pos, int ratio, int K,
                                                                            int level, int* meta,
                                                                            unsigned int* hist) {
    DS4_PDL_ENTRY();
    __shared__ int wsum[32];
    const int t = blockIdx.x, tid = threadIdx.x;
    const long long nvis = topkm_nvis(d_pos, t, ratio);
    if (nvis <= K) return;                          // no topkm_hist block counted anything: hist[t] is still zero
    const int need = level == 0 ? K : meta[2 * t + 1];
    const unsigned int prefix = level == 0 ? 0u : (unsigned int)meta[2 * t];
    const int shift = topkm_shift(level), nb = 1 << topkm_bits(level);
    // thread tid: digits hi = nb - 1 - 2 tid and hi - 1 (counting from the top)
    unsigned int* gh = hist + (long long)t * TOPKM_BINS;
    const bool active = 2 * tid < nb;
    const int dhi = nb - 1 - 2 * tid;
    int chi = 0, clo = 0;
    if (active) {
        chi = (int)gh[dhi];
        clo = (int)gh[dhi - 1];
        gh[dhi] = 0u;
        gh[dhi - 1] = 0u;
    }
    int tot;
    const int excl = topkm_scan_excl(chi + clo, wsum, &tot);
    __syncthreads();                                // every thread has read state[t] before it is overwritten
    if (active) {
        int digit = -1, rest = 0;
        if (excl < need && excl + chi >= need) {
            digit = dhi;
            rest = need - excl;
        } else if (excl + chi < need && excl + chi + clo >= need) {
            digit = dhi - 1;
            rest = need - excl - chi;
        }
        if (digit >= 0) {
            meta[2 * t] = (int)(prefix | ((unsigned int)digit << shift));
            meta[2 * t + 1] = rest;
        }
    }
}

// Block (g, t): (#keys > kth, #keys == kth) of its slice -> meta[2S + 2(tG + g)].
extern "C" __global__ void __launch_bounds__(TOPKM_THREADS) topkm_count(const float* scores, long long stride,
                                                                        const int* d_pos, int ratio, int K, int S,
                                                                        int* meta) {
    DS4_PDL_ENTRY();
    __shared__ int wsum[32];
    const int t = blockIdx.y, g = blockIdx.x, G = gridDim.x, tid = threadIdx.x;
    const long long nvis = topkm_nvis(d_pos, t, ratio);
    if (nvis <= K) return;
    const long long L = (nvis + G - 1) / G, s0 = (long long)g * L, s1 = min(nvis, s0 + L);
    const unsigned int kth = (unsigned int)meta[2 * t];
    const float* sc = scores + (long long)t * stride;
    int gt = 0, eq = 0;
    for (long long i = s0 + tid; i < s1; i += blockDim.x) {
        const unsigned int key = topkm_key(sc[i]);
        gt += key > kth;
        eq += key == kth;
    }
    int tgt, teq;
    topkm_scan_excl(gt, wsum, &tgt);
    topkm_scan_excl(eq, wsum, &teq);
    if (tid == 0) {
        int* c = meta + 2 * S + 2 * ((long long)t * G + g);
        c[0] = tgt;
        c[1] = teq;
    }
}

// Block (g, t): its slice's selected indices in ascending order at their global slots; nvis <= K: out[t, j] = j for
// j < nvis, else -1 (slots g * 256 + tid, strided by G * 256).
extern "C" __global__ void __launch_bounds__(TOPKM_THREADS) topkm_write(const float* scores, long long stride,
                                                                        const int* d_pos, int ratio, int K, int S,
                                                                        const int* meta, int* out) {
    DS4_PDL_ENTRY();
    __shared__ int wsum[32];
    const int t = blockIdx.y, g = blockIdx.x, G = gridDim.x, tid = threadIdx.x;
    const long long nvis = topkm_nvis(d_pos, t, ratio);
    int* o = out + (long long)t * K;
    if (nvis <= K) {
        for (long long j = (long long)g * blockDim.x + tid; j < K; j += (long long)G * blockDim.x)
            o[j] = j < nvis ? (int)j : -1;
        return;
    }
    const long long L = (nvis + G - 1) / G, s0 = (long long)g * L, s1 = min(nvis, s0 + L);
    if (s0 >= s1) return;                           // block-uniform
    const unsigned int kth = (unsigned int)meta[2 * t];
    const int need = meta[2 * t + 1];
    const int* c = meta + 2 * S + 2 * (long long)t * G;
    int gtb = 0, eqb = 0;                           // blocks before g
    for (int b = tid; b < g; b += blockDim.x) {
        gtb += c[2 * b];
        eqb += c[2 * b + 1];
    }
    int gt_before, eq_before;
    topkm_scan_excl(gtb, wsum, &gt_before);
    topkm_scan_excl(eqb, wsum, &eq_before);
    const long long n = s1 - s0;
    const long long chunk = (n + blockDim.x - 1) / blockDim.x;
    const long long i0 = s0 + (long long)tid * chunk, i1 = min(s1, i0 + chunk);
    const float* sc = scores + (long long)t * stride;
    int gt = 0, eq = 0;
    for (long long i = i0; i < i1; ++i) {
        const unsigned int key = topkm_key(sc[i]);
        gt += key > kth;
        eq += key == kth;
    }
    int tot;
    const int eq_thr = eq_before + topkm_scan_excl(eq, wsum, &tot);
    const int eq_take = max(0, min(eq, need - eq_thr));
    int at = gt_before + min(need, eq_before) + topkm_scan_excl(gt + eq_take, wsum, &tot);
    int eq_seen = 0;
    for (long long i = i0; i < i1; ++i) {
        const unsigned int key = topkm_key(sc[i]);
        if (key > kth || (key == kth && eq_seen++ < eq_take)) o[at++] = (int)i;
    }
}
