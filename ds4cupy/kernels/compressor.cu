// compressor.cu: gated per-channel softmax pooling of KV into compressed rows (model.md §2.5; reference:
// ReferenceModel.compress). Ratio m; overlap (two lanes) iff m == 4. hd = output row width, cw = lanes * hd.
//
// Inputs of one call (S tokens at positions pos0 = d_pos[0] ..): C, Z: [S, cw] float32, the kv and gate projections
// (before ape). ape: [m, cw] float32.
// State (per compressor, device memory): a ring of the last lanes*m tokens' rows, slot(p) = p % (lanes*m):
//   st_kv[slot] = C row, st_sc[slot] = Z row + ape[p % m]. Tokens of the current partial window and (overlap) of the
//   previous full window are always there; nothing needs shifting.
// Row w covers tokens [w*m, (w+1)*m); it is emitted by the call that contains its last token, into out[w]:
//   non-overlap: slots = tokens of window w, channels [0, hd)
//   overlap:     slots 0..m-1 = tokens of window w-1, channels [0, hd) (absent for w = 0: weight 0),
//                slots m..2m-1 = tokens of window w, channels [hd, 2hd)
//   c[ch] = sum_slot softmax_slot(score[slot, ch]) * kv[slot, ch]
//   then rms_norm(c, norm_w), rope on the last n_rot dims at position w*m, qat: 1 = fp8 nope (main compressor),
//   2 = Hadamard + fp4 (indexer compressor), 0 = none.
// compressor_emit runs before compressor_store (it reads the state left by earlier calls).
#include "common.cuh"
#include "pdl.cuh"

// The body of compressor_emit (PACK = false: float rows, out = float*) and compressor_emit_fp4 (PACK = true: packed
// rows, out = unsigned char*); forceinline, and the float instantiation is compressor_emit's code as it was before
// the packed variant existed.
template <bool PACK, typename OutT>
__device__ __forceinline__ void compressor_emit_body(const float* C, const float* Z, const float* ape,
                                                     const float* st_kv, const float* st_sc, const int* d_pos, int S,
                                                     int m, int hd, int overlap, const float* norm_w, float eps,
                                                     int n_rot, const double* freqs, int qat, OutT* out) {
    extern __shared__ double dsm[];
    float* v = (float*)(dsm + hd);
    __shared__ double redd[32];
    const long long pos0 = d_pos[0];
    const long long w = pos0 / m + blockIdx.x;
    const long long last = (w + 1) * m - 1;
    if (last < pos0 || last >= pos0 + S) return;          // uniform per block
    const int lanes = overlap ? 2 : 1;
    const int cw = lanes * hd;
    const int L = lanes * m;
    for (int ch = threadIdx.x; ch < hd; ch += blockDim.x) {
        // pass 1: max score; pass 2: weighted sum
        float mx = -DS4_INF;
        for (int pass = 0; pass < 2; ++pass) {
            float sum = 0.0f, acc = 0.0f;
            for (int lane = 0; lane < lanes; ++lane) {
                const long long win = overlap ? w - 1 + lane : w;
                if (win < 0) continue;
                const int c = overlap ? lane * hd + ch : ch;
                for (int i = 0; i < m; ++i) {
                    const long long p = win * m + i;
                    float sc, kv;
                    if (p >= pos0) {
                        sc = Z[(p - pos0) * cw + c] + ape[(long long)i * cw + c];
                        kv = C[(p - pos0) * cw + c];
                    } else {
                        const long long slot = p % L;
                        sc = st_sc[slot * cw + c];
                        kv = st_kv[slot * cw + c];
                    }
                    if (pass == 0) {
                        mx = fmaxf(mx, sc);
                    } else {
                        const float e = expf(sc - mx);
                        sum += e;
                        acc += e * kv;
                    }
                }
            }
            if (pass == 1) v[ch] = acc / sum;
        }
    }
    row_finish(v, hd, true, norm_w, eps, n_rot, freqs, w * m, qat, dsm, redd);
    if constexpr (!PACK) {
        for (int i = threadIdx.x; i < hd; i += blockDim.x) out[w * hd + i] = v[i];
    } else {
        const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
        unsigned char* row = out + w * (long long)FP4_ROW_BYTES(hd);
        for (int i = hd / 2 + hd / 32 + threadIdx.x; i < FP4_ROW_BYTES(hd); i += blockDim.x) row[i] = 0;
        for (int b = wid; b < hd / 32; b += nw) {       // row_finish ended with __syncthreads: v is complete
            int e;
            const unsigned int code = fp4_pack_lane(v[b * 32 + lane], &e);
            const unsigned int up = __shfl_down_sync(0xffffffffu, code, 1);
            if ((lane & 1) == 0) row[b * 16 + lane / 2] = (unsigned char)(code | (up << 4));
            if (lane == 0) row[hd / 2 + b] = (unsigned char)(signed char)e;
        }
    }
}

// grid = S / m + 2 (block b handles window floor(pos0/m) + b if it closes inside this call), block = 256,
// dynamic smem = hd * 12 bytes.
extern "C" __global__ void compressor_emit(const float* C, const float* Z, const float* ape, const float* st_kv,
                                           const float* st_sc, const int* d_pos, int S, int m, int hd, int overlap,
                                           const float* norm_w, float eps, int n_rot, const double* freqs, int qat,
                                           float* out) {
    DS4_PDL_ENTRY();
    compressor_emit_body<false>(C, Z, ape, st_kv, st_sc, d_pos, S, m, hd, overlap, norm_w, eps, n_rot, freqs, qat,
                                out);
}

// compressor_emit for the indexer compressor with QAT (qat 2: Hadamard + fp4_sim; switch INDEXER_FP4): the finished
// row v (fp4_sim'd, so exactly representable) is stored packed, out[w] = hd / 2 bytes of e2m1 codes + hd / 32 int8
// block exponents, zero-padded to FP4_ROW_BYTES(hd) (common.cuh "packed FP4 rows"; 68 bytes for hd = 128 instead of
// 512), bit-exact: unpacking it (numerics.fp4_unpack) gives compressor_emit's float row bit for bit. One warp per
// block of 32: the lane pair (2i, 2i + 1) makes byte i, lane 0 the exponent. hd % 32 == 0. Grid, block and shared
// memory as compressor_emit.
extern "C" __global__ void compressor_emit_fp4(const float* C, const float* Z, const float* ape, const float* st_kv,
                                               const float* st_sc, const int* d_pos, int S, int m, int hd,
                                               int overlap, const float* norm_w, float eps, int n_rot,
                                               const double* freqs, unsigned char* out) {
    DS4_PDL_ENTRY();
    compressor_emit_body<true>(C, Z, ape, st_kv, st_sc, d_pos, S, m, hd, overlap, norm_w, eps, n_rot, freqs, 2, out);
}

// Write this call's last min(S, lanes*m) tokens into the state ring. grid = min(S, lanes*m), block = 256.
extern "C" __global__ void compressor_store(const float* C, const float* Z, const float* ape, float* st_kv,
                                            float* st_sc, const int* d_pos, int S, int m, int cw, int lanes) {
    DS4_PDL_ENTRY();
    const int L = lanes * m;
    const int n = S < L ? S : L;
    const int t = S - n + blockIdx.x;
    const long long p = (long long)d_pos[0] + t;
    const long long slot = p % L;
    const int a = (int)(p % m);
    for (int c = threadIdx.x; c < cw; c += blockDim.x) {
        st_kv[slot * cw + c] = C[(long long)t * cw + c];
        st_sc[slot * cw + c] = Z[(long long)t * cw + c] + ape[(long long)a * cw + c];
    }
}
