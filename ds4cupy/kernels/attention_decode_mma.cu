// attention_decode_mma.cu: decode (and small-S) attention on tensor cores, split-K over the key list: the tensor-core
// replacement of attention.cu's attn_partial, writing the same split partials, which attention.cu's attn_combine then
// merges unchanged (with the sink and the inverse rope). model.md §2.4; reference: ReferenceModel.attention.
//
// attn_partial_mma(q, ring, cur, comp, idx, K, d_pos, H, d, W, ratio, mode, scale, rps, part_ml, part_o)
//   arguments as attn_partial's: q [S, H, d], ring [W, d], cur [S, d], comp [N, d] (mode 1 / 2), idx int32 [S, K]
//   (mode 2); d % 32 == 0, d <= 512. The key list of query t (absolute position P = d_pos[0] + t) is attn_partial's
//   (attention_mma.cu's header spells it out); split s covers its entries [s rps, min(R, (s + 1) rps)).
//   Writes, for every head h < H:
//     part_ml[(t H + h) NS + s] = (m, l): m = the largest score of the split's valid keys, l = sum exp(score - m);
//     part_o[((t H + h) NS + s) d + i] = sum over the split's valid keys of exp(score - m) v_i (unnormalised);
//   a split with no valid key writes m = -inf, l = 0, o = 0 (as attn_partial). NS = gridDim.y.
//
// Launch: grid (ceil(H / 32), NS, S), 256 threads, dynamic shared memory 2 * 16 * 4 d bytes (attention_mma.py's
// shared_bytes) plus ~12.4 KiB static. The caller sizes NS * rps from the session's ctx (the longest key list any
// position can have), so a decode graph captured at one depth is right at every depth: a split past the current
// list end returns at once (split 0 always writes; attn_combine reads only the splits that hold keys).
//
// A block owns one split of one query and 32 heads. MQA: every K = V row of the split is read from memory once per
// block for its 32 heads, which are the M dimension of the mma tiles. The body (query fragments, tile loop: cp.async,
// hi + lo fp16 conversion, QK^T, online softmax, PV) is attn_prefill_mma's, included as text
// (attention_mma_body.cuh); this kernel walks its split's entries through a key list shifted by s rps entries, and
// stores the running (m, l, o) instead of finishing the softmax. Numerics: attention_mma.cu's header (float32-accurate:
// hi + lo fp16 operands under power-of-two scales); o leaves in true units, ldexpf(o, E_run - 155).
#include "attention_mma.cuh"
#include "pdl.cuh"

extern "C" __global__ void __launch_bounds__(256, 1) attn_partial_mma(
    const float* __restrict__ q, const float* ring, const float* cur, const float* comp, const int* idx, int K,
    const int* d_pos, int H, int d, int W, int ratio, int mode, float scale, int rps, float* __restrict__ part_ml,
    float* __restrict__ part_o) {
    DS4_PDL_ENTRY();
    extern __shared__ __align__(16) float am_stage[];           // [2][AM_TK][d]
    __shared__ __align__(16) float part[AM_NS][2][16][AM_PLD];  // partial scores [slice][head group][row][key]
    __shared__ u32 rmax[2][AM_TK];                              // per stage: the rows' max |x| (float bits)
    __shared__ int kval[2][AM_TK];                              // per stage: entry holds a key

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int hg = warp & 1, ds = warp >> 1;
    const int gq = lane >> 2, tq = lane & 3;
    const int s = blockIdx.y, NS = gridDim.y, t = blockIdx.z;
    const int hA = blockIdx.x * AM_HG + 16 * hg + gq, hB = hA + 8;   // the rows gq, gq + 8 of the warp's tiles
    AmKeys L = am_keys(ring, cur, comp, idx, K, d_pos, t, W, d, ratio, mode);
    const int R = L.R;
    const int j0 = s * rps, j1 = min(R, j0 + rps);
    if (s > 0 && j0 >= R) return;     // past the list end (uniform over the block, before any barrier)
    // the split's entries j0 + j, j < j1 - j0, as entries j of a shifted list: window entry j0 + j is position
    // lo + j0 + j; compressed entry j0 + j is number (j0 + j) - nwin = j - (nwin - j0) (nwin - j0 < 0 past the window)
    L.lo += j0;
    L.nwin -= j0;
    L.R = j1 - j0;                    // >= 1: R >= 1 (the window holds P) and j0 < R
    const int ntiles = (L.R + AM_TK - 1) / AM_TK;
    const int nb = d >> 4;

#include "attention_mma_body.cuh"

    // ---- the split's partial: (m, l) of rows hA, hB from one lane a row, o in true units ------------------------
    const int hrow[2] = {hA, hB};
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
        float l = l_r[hh];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        if (ds == 0 && tq == 0 && hrow[hh] < H) {
            const long long slot = ((long long)t * H + hrow[hh]) * NS + s;
            part_ml[2 * slot] = m_r[hh];
            part_ml[2 * slot + 1] = l;
        }
    }
#pragma unroll
    for (int i = 0; i < AM_MAXB; ++i) {
        const int b = ds + AM_NS * i;
        if (b >= nb) continue;
#pragma unroll
        for (int n = 0; n < 2; ++n) {
            const int col = 16 * b + 8 * n + 2 * tq;
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
                if (hrow[hh] >= H) continue;
                const long long slot = ((long long)t * H + hrow[hh]) * NS + s;
                *reinterpret_cast<float2*>(part_o + slot * d + col) =
                    make_float2(ldexpf(o[i][n][2 * hh], E_run - 155), ldexpf(o[i][n][2 * hh + 1], E_run - 155));
            }
        }
    }
}
