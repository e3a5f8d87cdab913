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

// The weighted relu sum over a thread's 4 heads of its two rows, then over the 16 head-group lanes of the row pair
// (fixed shuffle order), stored by lane th == 0 for the visible rows: shared by indexer_scores and indexer_scores_fp4.
__device__ __forceinline__ void idx_store_pair(const float (&acc)[2][4], const float* w, int th, long long ra,
                                               long long rb, long long nvis, float* row) {
    float sa = 0.0f, sb = 0.0f;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        sa = fmaf(w[j], fmaxf(acc[0][j], 0.0f), sa);
        sb = fmaf(w[j], fmaxf(acc[1][j], 0.0f), sb);
    }
#pragma unroll
    for (int o = 8; o > 0; o >>= 1) {
        sa += __shfl_xor_sync(0xffffffffu, sa, o);
        sb += __shfl_xor_sync(0xffffffffu, sb, o);
    }
    if (th == 0) {
        if (ra < nvis) row[ra] = sa;
        if (rb < nvis) row[rb] = sb;
    }
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
        idx_store_pair(acc, w, th, r0 + ra, r0 + rb, nvis, scores + (long long)t * stride);
    }
}

// indexer_scores_fp4 (switch INDEXER_FP4; the session uses it only with QAT on): indexer_scores' contract, the keys
// read packed. k: uint8 [Ncap, FP4_ROW_BYTES(c)], row = c/2 bytes of e2m1 codes + c/32 int8 block exponents + zero
// padding to 4 bytes (common.cuh "packed FP4 rows"; written by compressor.cu's compressor_emit_fp4; 68 bytes for
// c = 128 instead of 512).
// Layout choice: rows interleaved (codes then exponents, one row after the other) rather than separate code / exponent
// planes: a tile of IDX_TR = 32 rows is one contiguous, 16-byte aligned run of 32 * FP4_ROW_BYTES(c) bytes (2,176 for
// c = 128), read with coalesced uint4 loads (the exponents come in the same transactions; every visible row is read
// exactly once a step, so there is no reuse that planes could serve better), and the cache stays a [rows, bytes]
// array that snapshot / restore slice by rows like the float cache.
// q: float [S, HI, c], already fp4_sim'd (heads_prep QAT mode 2). Each CTA packs it on the fly: per block of 32,
// e = fp4_scale_exp(amax), codes = e2m1 rounding of q * 2^-e: for an fp4_sim'd q that recovers its values exactly
// (common.cuh). A q that is not representable (QAT off, never sent here by the session) is silently rounded: the
// scores are then exactly those of fp4_sim(q, 32), not NaN.
// Arithmetic: per (query head h, key row s, block b of 32) the sum of the 32 products of the integers 2g (|2g| <= 12)
// by dp4a on int8: an exact int32 (|sum| <= 32 * 144). term_b = sum * 2^(eq + ek - 2), exact in float32 (13-bit
// integer, power-of-two scale, while 2^-126 <= |term| < 2^128; otherwise ldexpf rounds it once). dot = ((term_0 +
// term_1) + term_2) + term_3 in float32, then relu and the weighted head sum exactly as indexer_scores (thread
// (tr, th): rows 2tr, 2tr+1, heads th + 16j; sa = fmaf(w_j, relu(dot_j), sa) for j = 0..3; xor-shuffle sum 8, 4, 2, 1).
// Difference to indexer_scores: there each dot is a chain of c float32 FMAs, and every product of two fp4 values is
// exact (2-bit mantissas), every partial sum a multiple of 2^(min_b(eq+ek) - 2) bounded by sum|products|: if that
// bound is below 2^24 units of the smallest block's scale (e.g. c = 128 and the four blocks' eq + ek within 9 of each
// other: 128 * 144 * 2^9 < 2^24), both kernels compute the same exact dot product and, with the same head-sum order,
// bit-identical scores. (RMS-normalised, Hadamard-rotated rows have block exponents within 1-2 of each other.) Beyond
// that both round: here at most 3 roundings of the block combine (|error| <= 3 * 2^-24 * sum_b |term_b|), there up
// to c (one per FMA whose partial sum is not representable).
// Limits (checked by ops.indexer_scores_fp4): HI <= 64, c in {32, 64, 128}, k 16-byte aligned. Static shared memory:
// 15.6 KiB. Tiles are as in indexer_scores; each thread prefetches its part of the CTA's next tile into registers
// before computing the current one.
#define IDXF_MAXSLOT (IDX_MAXC / 16)                   // 16-byte slots of an int8 row (8 for c = 128)

__device__ __forceinline__ int dp4a_s8(unsigned int a, unsigned int b, int c) {
    int d;
    asm("dp4a.s32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}

// s * 2^e: exact while the result is a normal float (see the header), else one ldexpf rounding.
__device__ __forceinline__ float fp4_term(int s, int e) {
    return (e >= -126 && e <= 127) ? (float)s * __int_as_float((e + 127) << 23) : ldexpf((float)s, e);
}

extern "C" __global__ void __launch_bounds__(256) indexer_scores_fp4(const float* q, const float* wts,
                                                                     const unsigned char* k, const int* d_pos, int HI,
                                                                     int c, int ratio, float wscale, float* scores,
                                                                     long long stride) {
    DS4_PDL_ENTRY();
    __shared__ uint4 qs[IDX_MAXH * IDXF_MAXSLOT];      // int8 2g [64][c], 16-byte slot f of head h at f ^ (h & smask)
    __shared__ uint4 ks[IDX_TR * IDXF_MAXSLOT];        // int8 2g [32][c], the same swizzle
    __shared__ int qe[IDX_MAXH][IDX_MAXC / 32];        // block exponent - 1
    __shared__ int ke[IDX_TR][IDX_MAXC / 32];          // block exponent - 1
    __shared__ uint4 kraw[IDX_TR * FP4_ROW_BYTES(IDX_MAXC) / 16];   // one packed tile
    const int t = blockIdx.y;
    const long long P = (long long)d_pos[0] + t;
    const long long nvis = (P + 1) / ratio;
    const long long ntiles = (nvis + IDX_TR - 1) / IDX_TR;
    if ((long long)blockIdx.x >= ntiles) return;       // before any shared-memory work: idle blocks cost nothing
    const int tid = threadIdx.x, th = tid & 15, tr = tid >> 4;
    const int lane = tid & 31, wid = tid >> 5;
    const int nb = c >> 5, nslot = c >> 4, smask = nslot - 1;
    const int rowb = FP4_ROW_BYTES(c);                 // packed row bytes, a multiple of 4
    const int tile16 = IDX_TR * rowb / 16;             // uint4 of a packed tile (136 for c = 128)
    // q -> int8 codes: warp wid packs blocks wid, wid + 8, ... of the 64 x nb (head, block) pairs
    signed char* qs8 = reinterpret_cast<signed char*>(qs);
    for (int hb = wid; hb < IDX_MAXH * nb; hb += 8) {
        const int h = hb / nb, b = hb % nb;
        const float x = h < HI ? q[((long long)t * HI + h) * c + b * 32 + lane] : 0.0f;
        int e;
        const unsigned int code = fp4_pack_lane(x, &e);
        const int m2 = (int)((((unsigned long long)FP4_MAG2_HI << 32 | FP4_MAG2_LO) >> (8 * (code & 7u))) & 0xFFu);
        const int i = b * 32 + lane;                   // element, slot i / 16, byte i % 16
        qs8[(h * nslot + ((i >> 4) ^ (h & smask))) * 16 + (i & 15)] = (signed char)((code & 8u) ? -m2 : m2);
        if (lane == 0) qe[h][b] = h < HI ? e - 1 : 0;  // absent heads: codes 0, a harmless exponent
    }
    float w[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const int h = th + 16 * j;
        w[j] = h < HI ? wts[(long long)t * HI + h] * wscale : 0.0f;
    }
    const uint4* k16 = reinterpret_cast<const uint4*>(k);
    const unsigned int* kraw32 = reinterpret_cast<const unsigned int*>(kraw);
    const signed char* kraw8 = reinterpret_cast<const signed char*>(kraw);
    // a tile's bytes [r0 * rowb, min(nvis, r0 + 32) * rowb): thread tid holds uint4 tid (tile16 <= 136 < 256); the
    // uint4 that straddles the end of row nvis - 1 is read word by word (rowb % 4 == 0), nothing past it is read.
    const unsigned int* k32 = reinterpret_cast<const unsigned int*>(k);
    auto fetch = [&](long long tile) -> uint4 {
        uint4 v = make_uint4(0u, 0u, 0u, 0u);
        if (tile >= ntiles || tid >= tile16) return v;
        const long long r0 = tile * IDX_TR;
        const long long nbytes = min((long long)IDX_TR, nvis - r0) * rowb;
        const long long at = r0 * rowb / 16 + tid;
        if ((long long)(tid + 1) * 16 <= nbytes) {
            v = k16[at];
        } else if ((long long)tid * 16 < nbytes) {
            const int nw = (int)((nbytes - (long long)tid * 16) >> 2);    // 1..3 words in range
            v.x = k32[4 * at];
            if (nw > 1) v.y = k32[4 * at + 1];
            if (nw > 2) v.z = k32[4 * at + 2];
        }
        return v;
    };
    uint4 next = fetch(blockIdx.x);
    for (long long tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
        const long long r0 = tile * IDX_TR;
        __syncthreads();                               // previous tile fully consumed (and q stored, first time)
        if (tid < tile16) kraw[tid] = next;
        next = fetch(tile + gridDim.x);                // in flight while this tile is expanded and computed
        __syncthreads();
        // expand: 32 rows x c/8 code words -> int8 rows; 32 x nb exponents
        for (int i = tid; i < IDX_TR * (c >> 3); i += blockDim.x) {
            const int r = i / (c >> 3), j = i % (c >> 3);          // word j: elements 8j .. 8j+7
            unsigned int lo, hi;
            fp4_expand8(kraw32[(r * rowb >> 2) + j], &lo, &hi);
            unsigned int* dst = reinterpret_cast<unsigned int*>(ks + r * nslot + (((8 * j) >> 4) ^ (r & smask)));
            dst[(j & 1) * 2] = lo;
            dst[(j & 1) * 2 + 1] = hi;
        }
        for (int i = tid; i < IDX_TR * nb; i += blockDim.x) {
            const int r = i / nb, b = i % nb;
            ke[r][b] = (int)kraw8[r * rowb + c / 2 + b] - 1;
        }
        __syncthreads();
        const int ra = 2 * tr, rb = 2 * tr + 1;
        float acc[2][4];
#pragma unroll
        for (int a = 0; a < 2; ++a)
#pragma unroll
            for (int j = 0; j < 4; ++j) acc[a][j] = 0.0f;
        for (int b = 0; b < nb; ++b) {
            int is[2][4];
#pragma unroll
            for (int a = 0; a < 2; ++a)
#pragma unroll
                for (int j = 0; j < 4; ++j) is[a][j] = 0;
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
                const int f = 2 * b + hh;
                const uint4 ka = ks[ra * nslot + (f ^ (ra & smask))], kb = ks[rb * nslot + (f ^ (rb & smask))];
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const int h = th + 16 * j;
                    const uint4 qv = qs[h * nslot + (f ^ (h & smask))];
                    is[0][j] = dp4a_s8(qv.x, ka.x, is[0][j]); is[0][j] = dp4a_s8(qv.y, ka.y, is[0][j]);
                    is[0][j] = dp4a_s8(qv.z, ka.z, is[0][j]); is[0][j] = dp4a_s8(qv.w, ka.w, is[0][j]);
                    is[1][j] = dp4a_s8(qv.x, kb.x, is[1][j]); is[1][j] = dp4a_s8(qv.y, kb.y, is[1][j]);
                    is[1][j] = dp4a_s8(qv.z, kb.z, is[1][j]); is[1][j] = dp4a_s8(qv.w, kb.w, is[1][j]);
                }
            }
            const int ea = ke[ra][b], eb = ke[rb][b];
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int eq = qe[th + 16 * j][b];
                acc[0][j] = __fadd_rn(acc[0][j], fp4_term(is[0][j], eq + ea));
                acc[1][j] = __fadd_rn(acc[1][j], fp4_term(is[1][j], eq + eb));
            }
        }
        idx_store_pair(acc, w, th, r0 + ra, r0 + rb, nvis, scores + (long long)t * stride);
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
