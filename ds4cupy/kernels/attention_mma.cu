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
#include "attention_mma.cuh"
#include "pdl.cuh"

extern "C" __global__ void __launch_bounds__(256, 1) attn_prefill_mma(
    const float* __restrict__ q, const float* ring, const float* cur, const float* comp, const int* idx, int K,
    const int* d_pos, int H, int d, int W, int ratio, int mode, float scale, const float* sinks, int n_rot,
    const double* freqs, float* __restrict__ out) {
    DS4_PDL_ENTRY();
    extern __shared__ __align__(16) float am_stage[];           // [2][AM_TK][d]
    __shared__ __align__(16) float part[AM_NS][2][16][AM_PLD];  // partial scores [slice][head group][row][key]
    __shared__ u32 rmax[2][AM_TK];                              // per stage: the rows' max |x| (float bits)
    __shared__ int kval[2][AM_TK];                              // per stage: entry holds a key

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int hg = warp & 1, ds = warp >> 1;
    const int gq = lane >> 2, tq = lane & 3;
    const int t = blockIdx.y;
    const int hA = blockIdx.x * AM_HG + 16 * hg + gq, hB = hA + 8;   // the rows gq, gq + 8 of the warp's tiles
    const long long P = (long long)d_pos[0] + t;                     // the query's position (inverse rope)
    AmKeys L = am_keys(ring, cur, comp, idx, K, d_pos, t, W, d, ratio, mode);
    const int ntiles = (L.R + AM_TK - 1) / AM_TK;
    const int nb = d >> 4;

#include "attention_mma_body.cuh"

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
