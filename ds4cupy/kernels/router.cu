// router.cu: MoE expert selection (model.md §2.8; reference: ReferenceModel.moe, the gate part).
//   sc = sqrt(softplus(logits))                        softplus in double rounded to float, sqrt in float
//   hash layers (tid2eid != nullptr): sel = tid2eid[token_id]                     (no bias)
//   otherwise: sel = top-k of sc + bias (bias may be nullptr), ties -> lower expert index
//   w = sc[sel] / sum(sc[sel]) (when norm != 0), times scale, in double, rounded to float
// logits: [T, E] float32 (the router projection, computed by a weight-product kernel); bias: [E] float32;
// tid2eid: int32 [V, k]; ids: int32 [T] token ids in device memory.
// out_ids: int32 [T, k], out_w: float32 [T, k] in device memory, read by the MoE kernels (no host round trip).
// grid = T, block = 256 (E <= 256 * 8): all threads compute sc, warp 0 selects.
#include "common.cuh"
#include "pdl.cuh"

#define ROUTER_PER_THREAD 8

extern "C" __global__ void router_select(const float* logits, const float* bias, const int* tid2eid, const int* ids,
                                         int E, int k, int norm, float scale, int* out_ids, float* out_w) {
    DS4_PDL_ENTRY();
    __shared__ float sc_s[256 * ROUTER_PER_THREAD];
    __shared__ double vb[256 * ROUTER_PER_THREAD];     // sc + bias, -inf once picked
    __shared__ int sel_s[64];
    const int t = blockIdx.x;
    const float* lg = logits + (long long)t * E;
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
        double x = (double)lg[e];
        double sp = fmax(x, 0.0) + log1p(exp(-fabs(x)));
        sc_s[e] = __fsqrt_rn((float)sp);
        vb[e] = (double)sc_s[e] + (bias ? (double)bias[e] : 0.0);
    }
    __syncthreads();
    const int lane = threadIdx.x & 31;
    if (tid2eid) {
        if (threadIdx.x < k) sel_s[threadIdx.x] = tid2eid[(long long)ids[t] * k + threadIdx.x];
    } else if (threadIdx.x < 32) {
        // warp 0 alone: k rounds of a warp argmax (ties -> lower expert index), no block barriers; the pick's owner
        // lane marks it taken
        for (int j = 0; j < k; ++j) {
            double best = -1e300;
            int besti = 0x7fffffff;
            for (int e = lane; e < E; e += 32) {
                const double v = vb[e];
                if (v > best) { best = v; besti = e; }     // e increases: the first of equal values is kept
            }
            for (int o = 16; o > 0; o >>= 1) {
                double ov = __shfl_xor_sync(0xffffffffu, best, o);
                int oi = __shfl_xor_sync(0xffffffffu, besti, o);
                if (ov > best || (ov == best && oi < besti)) { best = ov; besti = oi; }
            }
            if (lane == 0) sel_s[j] = besti;
            if (besti < E && (besti & 31) == lane) vb[besti] = -DS4_INF;
            __syncwarp();
        }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        double sum = 0.0;
        for (int j = 0; j < k; ++j) sum += (double)sc_s[sel_s[j]];
        for (int j = 0; j < k; ++j) {
            double w = (double)sc_s[sel_s[j]];
            if (norm) w = w / sum;
            out_ids[(long long)t * k + j] = sel_s[j];
            out_w[(long long)t * k + j] = (float)(w * (double)scale);
        }
    }
}
