// attention_mma.cuh: file-scope pieces of the tensor-core attention kernels attn_prefill_mma (attention_mma.cu) and
// attn_partial_mma (attention_decode_mma.cu): tile constants, the key list of a query (AmKeys) and the cp.async
// issue of a tile of it (am_issue). attention_mma.cu's header describes the layout and the numerics.
#pragma once
#include "mma_f16.cuh"

#define AM_TK 16        // key-list entries per tile
#define AM_HG 32        // heads per block
#define AM_NS 4         // dim slices (warps per head group)
#define AM_MAXB 8       // 16-dim blocks per slice (d <= 512)
#define AM_PLD 24       // row stride of the partial scores (floats): float2 accesses conflict-free

__device__ __forceinline__ float am_pow2(int k) {  // 2^k for k in [-126, 127]; 0 below
    return k < -126 ? 0.f : __uint_as_float((u32)(k + 127) << 23);
}

// The key list of one query (attention.cu's attn_partial builds the same one).
struct AmKeys {
    const float *ring, *cur, *comp;
    const int* idx_t;            // idx row of the query (mode 2)
    long long lo, pos0;          // first window position, position of cur's row 0
    int W, d, mode, nwin, nvis, R;
    // row of entry j, or nullptr for a skipped entry or one past the end
    __device__ __forceinline__ const float* row(int j) const {
        if (j >= R) return nullptr;
        if (j < nwin) {
            const long long p = lo + j;
            return p >= pos0 ? cur + (p - pos0) * d : ring + (p % W) * d;
        }
        int w = j - nwin;
        if (mode == 2) w = idx_t[w];
        return (w >= 0 && w < nvis) ? comp + (long long)w * d : nullptr;
    }
};

// The key list of query t (position P = d_pos[0] + t): its window rows, then the compressed rows (mode 1: all visible;
// mode 2: its K indexer picks), R entries in all.
__device__ __forceinline__ AmKeys am_keys(const float* ring, const float* cur, const float* comp, const int* idx, int K,
                                          const int* d_pos, int t, int W, int d, int ratio, int mode) {
    const long long P = (long long)d_pos[0] + t;
    AmKeys L;
    L.ring = ring;
    L.cur = cur;
    L.comp = comp;
    L.idx_t = mode == 2 ? idx + (long long)t * K : nullptr;
    L.pos0 = d_pos[0];
    L.lo = P - W + 1 > 0 ? P - W + 1 : 0;
    L.W = W;
    L.d = d;
    L.mode = mode;
    L.nwin = (int)(P - L.lo + 1);
    L.nvis = ratio > 0 ? (int)((P + 1) / ratio) : 0;
    L.R = L.nwin + (mode == 1 ? L.nvis : (mode == 2 ? K : 0));
    return L;
}

// Tile `it` of the list into stage st (cp.async): row r = tid / 16 of the tile, 16-byte chunks c = tid % 16 + 16 k
// at the swizzled chunk (c & ~7) | ((c & 7) ^ (r & 7)); zero-filled for a skipped / past-the-end entry. Thread
// (r, 0) also sets the entry's key flag and clears the row's max for the conversion.
__device__ __forceinline__ void am_issue(const AmKeys& L, int it, int st, u32 stage0, int (*kval)[AM_TK],
                                         u32 (*rmax)[AM_TK]) {
    const int r = threadIdx.x >> 4, sub = threadIdx.x & 15;
    const float* src = L.row(it * AM_TK + r);
    const u32 dst = stage0 + (u32)((st * AM_TK + r) * 4 * L.d);
    for (int c = sub; c < (L.d >> 2); c += 16)
        cp_async16(dst + 16u * (u32)((c & ~7) | ((c & 7) ^ (r & 7))), src ? src + 4 * c : L.cur, src ? 16 : 0);
    if (sub == 0) {
        kval[st][r] = src != nullptr;
        rmax[st][r] = 0u;
    }
    cp_async_commit();
}
