// attention_mma.cu: prefill attention on tensor cores (mma.sync.m16n8k16 f16 x f16 -> f32; sm_80 and later: sm_90a,
// sm_100a, sm_120, sm_121a; no wgmma / TMA). Same operation as attention.cu's attn_partial + attn_combine with one
// split (model.md §2.4; reference: ReferenceModel.attention, from the scores to the output de-rotation): sparse MQA
// attention with sinks over each query's key list, then the inverse rope on the last n_rot dims.
//
// attn_prefill_mma(q, ring, cur, comp, idx, K, d_pos, H, d, W, ratio, mode, scale, sinks, n_rot, freqs, out)
//   q [S, H, d], ring [W, d], cur [S, d], comp [N, d] (mode 1 / 2), idx int32 [S, K] (mode 2), sinks [H],
//   freqs float64 [n_rot / 2], out [S, H, d]; d % 32 == 0, d <= 512. One 512-wide (head_dim) row is K and V.
//   The key list of query t (absolute position P = d_pos[0] + t) is attn_partial's, entry for entry:
//     window: positions max(0, P - W + 1) .. P: a position p >= d_pos[0] is row p - d_pos[0] of cur, an older one
//             ring[p % W];
//     mode 1: rows w = 0 .. (P + 1) / ratio - 1 of comp;  mode 2: rows idx[t, j], j < K, an entry < 0 or
//             >= (P + 1) / ratio skipped (score -inf, zero value); duplicates count as often as they occur.
//   out[t, h] = rope^-1_P( sum_j exp(s_j - M) v_j / (exp(sink_h - M) + sum_j exp(s_j - M)) ),
//   s_j = scale * q[t, h] . k_j, M = max(sink_h, max_j s_j).
//
// Launch: grid (ceil(H / 32), S), 256 threads (8 warps), dynamic shared memory 2 * 16 * 4 d bytes (the two key
// stages; 64 KiB at d = 512) plus ~12.4 KiB static: fits sm_120 / sm_121a's 99 KiB. A block owns one query t and
// heads h0 = 32 blockIdx.x .. h0 + 31 (rows past H compute on zero queries and are not written). MQA: every key row
// is read from memory once per block for its 32 heads.
// Warp w: head group hg = w & 1 (heads h0 + 16 hg .. + 16: the M = 16 rows of its mma tiles) and dim slice
// ds = w >> 1: the 16-dim blocks b = ds + 4 i (i < 8, b < d / 16) of the query (QK^T: A operand, in registers for the
// whole key loop) and of the output (PV: 2 n8 tiles per block, 64 float32 accumulators a thread at d = 512).
// The key list streams in tiles of 16 entries:
//   1. cp.async (issued one tile ahead): the 16 rows as float32 into a stage, 16-byte chunk c of row r at chunk
//      (c & ~7) | ((c & 7) ^ (r & 7)) (an XOR swizzle inside each 128-byte group of 32 dims); skipped / past-the-end
//      entries zero-filled.
//   2. in place: thread (row r = tid & 15, group g = tid >> 4 < d / 32) reads its group's 8 chunks, the row's max |x|
//      (shared atomicMax over the row's groups), then writes the group back as fp16 hi and lo halves: hi of dims
//      8 m .. 8 m + 7 of the group at chunk 2 m, lo at 2 m + 1 (same XOR swizzle). Each 8x8 ldmatrix tile (8 rows,
//      one chunk each) then touches 8 distinct 16-byte bank groups (conflict-free), for K^T (ldmatrix) and for V
//      (ldmatrix.trans) alike.
//   3. QK^T: each warp multiplies its dim blocks (3 mma per 16 dims and n8 tile: qlo khi, qhi klo, qhi khi, into a
//      fresh partial added to the tile's sum in float32) and writes the partial scores, in true units, to shared
//      memory; the 4 dim-slice warps of a head group add the 4 partials in the same order (identical scores).
//   4. online softmax over the tile (running max m, per-lane partial sums l, __expf as attn_partial), then PV with the
//      probabilities as the A operand straight from the score fragments (C layout of two n8 tiles = A layout of one
//      k16 step): 3 mma per n8 tile into a fresh partial, then o = o * corr + partial (one fma).
//   After the last tile: the sink (attn_combine's formula for one split), the inverse rope, float2 stores.
//
// Numerics (float32-accurate; tests/test_gpu_attention_mma.py states the measured bound):
// - Operands are split as mma_f16.cuh says (x / s = hi + lo to 2^-21): q per (head, dim slice) with its own
//   power-of-two scale s_q; each key row j with its own s_j = 2^(e_j - 141) (e_j = the row's exponent, mma_split_exp).
//   A partial score is ((c * s_q) * s_j) * scale, c the mma sum: power-of-two factors are exact, so the only
//   roundings are the products' hi / lo terms (2^-21), the dropped lo * lo term (2^-20), the tensor cores' float32
//   accumulation inside each mma and the float32 adds.
// - V = the same hi + lo rows. sum_j p_j v_j = sum_j p_j s_j v'_j: the row scale goes into the probability,
//   P'_j = p_j 2^(e_j - E + 14) (E = the largest row exponent seen so far; P' <= 2^14, hi + lo split like the others),
//   and the accumulator holds the output times 2^(155 - E) (rescaled by 2^(E_old - E_new) with the softmax
//   correction when E grows; a row more than 2^126 below the largest one is dropped: far below float32 resolution).
// - The sum over the key list is l (float32, in true units); the result is ldexpf(o * w / L, E - 155).
// - Range: each q slice and each key row has its own power-of-two scale, so no fp16 overflow and no lost term
//   whatever the rows' magnitudes. Inside one q slice or key row, an element below ~2^-28 of its max falls into fp16
//   subnormals (absolute error <= ~2^-40 of the max), and a key whose p times its row's magnitude is below ~2^-28 of
//   the largest row's does likewise in P': far below float32 resolution normwise (relative to max |q| max |k| for a
//   score, to max |v| for an output), though not element by element for vectors spanning more than 2^28.
// - Measured: a NumPy emulation of this kernel (tests/attention_mma_emul.py) is within 8e-7 of max |out| of a float64
//   evaluation; tests/test_gpu_attention_mma.py holds the kernel to 1e-5 (ops.attention's own bound) and prints the
//   measured values.
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

extern "C" __global__ void __launch_bounds__(256, 1) attn_prefill_mma(
    const float* __restrict__ q, const float* ring, const float* cur, const float* comp, const int* idx, int K,
    const int* d_pos, int H, int d, int W, int ratio, int mode, float scale, const float* sinks, int n_rot,
    const double* freqs, float* __restrict__ out) {
    extern __shared__ __align__(16) float am_stage[];           // [2][AM_TK][d]
    __shared__ __align__(16) float part[AM_NS][2][16][AM_PLD];  // partial scores [slice][head group][row][key]
    __shared__ u32 rmax[2][AM_TK];                              // per stage: the rows' max |x| (float bits)
    __shared__ int kval[2][AM_TK];                              // per stage: entry holds a key

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int hg = warp & 1, ds = warp >> 1;
    const int gq = lane >> 2, tq = lane & 3;
    const int t = blockIdx.y;
    const int hA = blockIdx.x * AM_HG + 16 * hg + gq, hB = hA + 8;   // the rows gq, gq + 8 of the warp's tiles
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
    const int ntiles = (L.R + AM_TK - 1) / AM_TK;
    const int nb = d >> 4;

    // ---- the query: A fragments (hi, lo) of the warp's dim blocks, one power-of-two scale per row ----------------
    u32 qh[AM_MAXB][4], ql[AM_MAXB][4];
    float sq[2];
    {
        float x[AM_MAXB][8];
        float ma = 0.f, mb = 0.f;
        const float* qa = q + ((long long)t * H + (hA < H ? hA : 0)) * d;
        const float* qb = q + ((long long)t * H + (hB < H ? hB : 0)) * d;
#pragma unroll
        for (int i = 0; i < AM_MAXB; ++i) {
            const int b = ds + AM_NS * i;
            float2 a0 = make_float2(0.f, 0.f), a1 = a0, a2 = a0, a3 = a0;
            if (b < nb) {
                const int c = 16 * b + 2 * tq;
                if (hA < H) {
                    a0 = *reinterpret_cast<const float2*>(qa + c);
                    a2 = *reinterpret_cast<const float2*>(qa + c + 8);
                }
                if (hB < H) {
                    a1 = *reinterpret_cast<const float2*>(qb + c);
                    a3 = *reinterpret_cast<const float2*>(qb + c + 8);
                }
            }
            x[i][0] = a0.x; x[i][1] = a0.y; x[i][2] = a1.x; x[i][3] = a1.y;
            x[i][4] = a2.x; x[i][5] = a2.y; x[i][6] = a3.x; x[i][7] = a3.y;
            ma = fmaxf(ma, fmaxf(fmaxf(fabsf(a0.x), fabsf(a0.y)), fmaxf(fabsf(a2.x), fabsf(a2.y))));
            mb = fmaxf(mb, fmaxf(fmaxf(fabsf(a1.x), fabsf(a1.y)), fmaxf(fabsf(a3.x), fabsf(a3.y))));
        }
#pragma unroll
        for (int o = 1; o <= 2; o <<= 1) {
            ma = fmaxf(ma, __shfl_xor_sync(0xffffffffu, ma, o));
            mb = fmaxf(mb, __shfl_xor_sync(0xffffffffu, mb, o));
        }
        const int ea = mma_split_exp(ma), eb = mma_split_exp(mb);
        const float ia = mma_split_inv(ea), ib = mma_split_inv(eb);
        sq[0] = mma_split_scale(ea);
        sq[1] = mma_split_scale(eb);
#pragma unroll
        for (int i = 0; i < AM_MAXB; ++i) {
            float h[8], l[8];
#pragma unroll
            for (int k = 0; k < 8; ++k) mma_split(x[i][k] * ((k & 2) ? ib : ia), h[k], l[k]);
#pragma unroll
            for (int k = 0; k < 4; ++k) {   // reg k = halves 2k, 2k+1: (row gq | gq+8 for k odd, cols +8 for k >= 2)
                qh[i][k] = pack_f16x2(h[2 * k], h[2 * k + 1]);
                ql[i][k] = pack_f16x2(l[2 * k], l[2 * k + 1]);
            }
        }
    }

    float o[AM_MAXB][2][4];
#pragma unroll
    for (int i = 0; i < AM_MAXB; ++i)
#pragma unroll
        for (int n = 0; n < 2; ++n)
#pragma unroll
            for (int c = 0; c < 4; ++c) o[i][n][c] = 0.f;
    float m_r[2] = {-DS4_INF, -DS4_INF}, l_r[2] = {0.f, 0.f};
    int E_run = 15;

    // conversion roles: row cr = tid & 15, 32-dim group cg = tid >> 4
    const int cr = tid & 15, cg = tid >> 4;
    const bool conv = cg < (d >> 5);
    // ldmatrix roles: matrix kq = lane >> 3, its row kr = lane & 7
    const int kq = lane >> 3, kr = lane & 7;
    const u32 stage0 = smem_u32(am_stage);
    const u32 row_bytes = 4u * (u32)d;

    am_issue(L, 0, 0, stage0, kval, rmax);
    for (int it = 0; it < ntiles; ++it) {
        const int st = it & 1;
        cp_async_wait_all();
        __syncthreads();                         // tile `it` landed; every warp is done with the other stage
        if (it + 1 < ntiles) am_issue(L, it + 1, st ^ 1, stage0, kval, rmax);
        const u32 tile = stage0 + (u32)st * AM_TK * row_bytes;
        float* tilef = am_stage + st * AM_TK * d;

        // ---- in place: float32 -> hi, lo fp16 with the row's power-of-two scale ------------------------------
        float4 v[8];
        if (conv) {
            const float4* g4 = reinterpret_cast<const float4*>(tilef + cr * d) + 8 * cg;
            float amax = 0.f;
#pragma unroll
            for (int k = 0; k < 8; ++k) {
                v[k] = g4[k ^ (cr & 7)];
                amax = fmaxf(amax, fmaxf(fmaxf(fabsf(v[k].x), fabsf(v[k].y)), fmaxf(fabsf(v[k].z), fabsf(v[k].w))));
            }
            atomicMax(&rmax[st][cr], __float_as_uint(amax));
        }
        __syncthreads();
        if (conv) {
            const float inv = mma_split_inv(mma_split_exp(__uint_as_float(rmax[st][cr])));
            uint4* g4 = reinterpret_cast<uint4*>(tilef + cr * d) + 8 * cg;
#pragma unroll
            for (int m = 0; m < 4; ++m) {
                const float xs[8] = {v[2 * m].x, v[2 * m].y, v[2 * m].z, v[2 * m].w,
                                     v[2 * m + 1].x, v[2 * m + 1].y, v[2 * m + 1].z, v[2 * m + 1].w};
                float h[8], l[8];
#pragma unroll
                for (int k = 0; k < 8; ++k) mma_split(xs[k] * inv, h[k], l[k]);
                g4[(2 * m) ^ (cr & 7)] = make_uint4(pack_f16x2(h[0], h[1]), pack_f16x2(h[2], h[3]),
                                                    pack_f16x2(h[4], h[5]), pack_f16x2(h[6], h[7]));
                g4[(2 * m + 1) ^ (cr & 7)] = make_uint4(pack_f16x2(l[0], l[1]), pack_f16x2(l[2], l[3]),
                                                        pack_f16x2(l[4], l[5]), pack_f16x2(l[6], l[7]));
            }
        }
        __syncthreads();

        // ---- QK^T over the warp's dim blocks: two n8 tiles (keys 0-7, 8-15) --------------------------------
        // ldmatrix x4: matrices (keys 0-7 | 8-15 for kq >= 2) x (dims +0 | +8 for kq odd) -> b0, b1 of tile 0, 1
        float sc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
        {
            const u32 rowk = tile + (u32)(kr + 8 * (kq >> 1)) * row_bytes;
#pragma unroll
            for (int i = 0; i < AM_MAXB; ++i) {
                const int b = ds + AM_NS * i;
                if (b < nb) {
                    const int ch = 2 * (2 * b + (kq & 1));        // the hi chunk of the dim group
                    u32 kh[4], kl[4];
                    ldsm_x4(kh, rowk + 16u * (u32)((ch & ~7) | ((ch & 7) ^ kr)));
                    ldsm_x4(kl, rowk + 16u * (u32)(((ch + 1) & ~7) | (((ch + 1) & 7) ^ kr)));
#pragma unroll
                    for (int n = 0; n < 2; ++n) {
                        float p[4] = {0.f, 0.f, 0.f, 0.f};
                        mma_16816(p, ql[i], kh[2 * n], kh[2 * n + 1]);
                        mma_16816(p, qh[i], kl[2 * n], kl[2 * n + 1]);
                        mma_16816(p, qh[i], kh[2 * n], kh[2 * n + 1]);
#pragma unroll
                        for (int c = 0; c < 4; ++c) sc[n][c] += p[c];
                    }
                }
            }
        }
        // my columns: keys 8 n + 2 tq + (c & 1); their row exponents
        int ej[2][2];
#pragma unroll
        for (int n = 0; n < 2; ++n)
#pragma unroll
            for (int c = 0; c < 2; ++c) ej[n][c] = mma_split_exp(__uint_as_float(rmax[st][8 * n + 2 * tq + c]));
#pragma unroll
        for (int n = 0; n < 2; ++n) {
            float w[4];
#pragma unroll
            for (int c = 0; c < 4; ++c) w[c] = (sc[n][c] * sq[c >> 1]) * mma_split_scale(ej[n][c & 1]) * scale;
            *reinterpret_cast<float2*>(&part[ds][hg][gq][8 * n + 2 * tq]) = make_float2(w[0], w[1]);
            *reinterpret_cast<float2*>(&part[ds][hg][gq + 8][8 * n + 2 * tq]) = make_float2(w[2], w[3]);
        }
        __syncthreads();

        // ---- online softmax over the tile ------------------------------------------------------------------
        float s[2][4];
#pragma unroll
        for (int n = 0; n < 2; ++n)
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
                float2 a = *reinterpret_cast<const float2*>(&part[0][hg][gq + 8 * hh][8 * n + 2 * tq]);
#pragma unroll
                for (int z = 1; z < AM_NS; ++z) {
                    const float2 b2 = *reinterpret_cast<const float2*>(&part[z][hg][gq + 8 * hh][8 * n + 2 * tq]);
                    a.x += b2.x;
                    a.y += b2.y;
                }
                s[n][2 * hh] = kval[st][8 * n + 2 * tq] ? a.x : -DS4_INF;
                s[n][2 * hh + 1] = kval[st][8 * n + 2 * tq + 1] ? a.y : -DS4_INF;
            }
        float mx[2];
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            mx[hh] = fmaxf(fmaxf(s[0][2 * hh], s[0][2 * hh + 1]), fmaxf(s[1][2 * hh], s[1][2 * hh + 1]));
            mx[hh] = fmaxf(mx[hh], __shfl_xor_sync(0xffffffffu, mx[hh], 1));
            mx[hh] = fmaxf(mx[hh], __shfl_xor_sync(0xffffffffu, mx[hh], 2));
            mx[hh] = fmaxf(mx[hh], m_r[hh]);
        }
        if (mx[0] == -DS4_INF) continue;          // no key yet (the same for every row and warp: keys are per entry)
        u32 tmax = 0u;
#pragma unroll
        for (int j = 0; j < AM_TK; ++j) tmax = max(tmax, rmax[st][j]);
        const int E_new = max(E_run, mma_split_exp(__uint_as_float(tmax)));
        const float ef = am_pow2(E_run - E_new);
        float corr[2];
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            const float ce = __expf(m_r[hh] - mx[hh]);          // m = -inf -> 0
            l_r[hh] *= ce;
            corr[hh] = ce * ef;
            m_r[hh] = mx[hh];
        }
        E_run = E_new;
        u32 ph[4], pl[4];     // A fragments: reg 2 n + hh = (row gq + 8 hh, keys 8 n + 2 tq, + 1)
#pragma unroll
        for (int n = 0; n < 2; ++n) {
            const float f0 = am_pow2(ej[n][0] - E_new + 14), f1 = am_pow2(ej[n][1] - E_new + 14);
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
                const float p0 = __expf(s[n][2 * hh] - m_r[hh]), p1 = __expf(s[n][2 * hh + 1] - m_r[hh]);
                l_r[hh] += p0 + p1;
                float h0, l0, h1, l1;
                mma_split(p0 * f0, h0, l0);
                mma_split(p1 * f1, h1, l1);
                ph[2 * n + hh] = pack_f16x2(h0, h1);
                pl[2 * n + hh] = pack_f16x2(l0, l1);
            }
        }

        // ---- PV over the warp's dim blocks: ldmatrix.trans x4: (keys 0-7 | 8-15 for kq odd) x (dims +0 | +8 for
        // kq >= 2) -> b0, b1 of n8 tile 0, 1 ---------------------------------------------------------------------
        {
            const u32 rowv = tile + (u32)(kr + 8 * (kq & 1)) * row_bytes;
#pragma unroll
            for (int i = 0; i < AM_MAXB; ++i) {
                const int b = ds + AM_NS * i;
                if (b < nb) {
                    const int ch = 2 * (2 * b + (kq >> 1));
                    u32 vh[4], vl[4];
                    ldsm_x4_trans(vh, rowv + 16u * (u32)((ch & ~7) | ((ch & 7) ^ kr)));
                    ldsm_x4_trans(vl, rowv + 16u * (u32)(((ch + 1) & ~7) | (((ch + 1) & 7) ^ kr)));
#pragma unroll
                    for (int n = 0; n < 2; ++n) {
                        float p[4] = {0.f, 0.f, 0.f, 0.f};
                        mma_16816(p, pl, vh[2 * n], vh[2 * n + 1]);
                        mma_16816(p, ph, vl[2 * n], vl[2 * n + 1]);
                        mma_16816(p, ph, vh[2 * n], vh[2 * n + 1]);
#pragma unroll
                        for (int c = 0; c < 4; ++c) o[i][n][c] = fmaf(o[i][n][c], corr[c >> 1], p[c]);
                    }
                }
            }
        }
    }

    // ---- the sink, the normalisation, the inverse rope, the stores ---------------------------------------------
    float fac[2];
    const int hrow[2] = {hA, hB};
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
        float l = l_r[hh];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        const float sink = hrow[hh] < H ? sinks[hrow[hh]] : 0.f;
        const float M = fmaxf(sink, m_r[hh]);
        const float w = m_r[hh] > -DS4_INF ? __expf(m_r[hh] - M) : 0.f;
        const float invL = 1.0f / (__expf(sink - M) + l * w);
        fac[hh] = w * invL;
    }
    const int b0 = d - n_rot;
#pragma unroll
    for (int i = 0; i < AM_MAXB; ++i) {
        const int b = ds + AM_NS * i;
        if (b >= nb) continue;
#pragma unroll
        for (int n = 0; n < 2; ++n) {
            const int col = 16 * b + 8 * n + 2 * tq;
            float cs = 1.f, sn = 0.f;
            const bool rot = col >= b0;
            if (rot) rope_cs(freqs, (col - b0) >> 1, P, &cs, &sn);
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
                float a = ldexpf(o[i][n][2 * hh] * fac[hh], E_run - 155);
                float c2 = ldexpf(o[i][n][2 * hh + 1] * fac[hh], E_run - 155);
                if (rot) rope_pair(a, c2, cs, sn, true);
                if (hrow[hh] < H)
                    *reinterpret_cast<float2*>(out + ((long long)t * H + hrow[hh]) * d + col) = make_float2(a, c2);
            }
        }
    }
}
