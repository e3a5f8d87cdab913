// sample.cu: the sampler's candidate set of a device logits row, inside the decode graph (reference:
// ds4cupy.text.candidates.top_candidates; launcher: ds4cupy/engines/cuda/sample_ops.py).
//
// Result (the launch with one block writes it; the host copies it in one piece, SAMPLE_RESULT_BYTES):
//   ids   int32   [1024]  the 1024 largest logits' ids, value descending then id ascending (padding past V: -1)
//   vals  float32 [1024]  their logits (NaN read as -inf; padding: -inf)
//   td    double  [2]     td[0] = total = sum over all V logits of exp((l - M) / T) in double, M the largest logit
//                         (0 when M is -inf); td[1] = the T it was computed for (*temp, a device scalar the host
//                         writes before the replay, so the graph does not depend on it; T > 0)
// The argmax is ids[0] (ties -> lowest id), the max logit vals[0].
//
// Keys. Logit i becomes the 64-bit key (ord(v) << 32) | (0xffffffff - i), where ord maps a float to an unsigned int
// in the same order (NaN read as -inf, -0 as +0): a larger key is a larger logit, equal logits -> the lower id. Keys are
// unique; key 0 is padding (a real key's low word is > 0xffffffff - 2^31, so it is never 0) and sorts last.
//
// Kernels (one stream, no host sync; every grid depends on V only):
//   sample_runs   grid ceil(V / 1024), block 512: block b sorts the keys of logits [1024 b, 1024 b + 1024) in
//                 descending order (bitonic network in shared memory) into run b of `runs` (padding at the end), and
//                 writes bmax[b] = its largest logit and bsum[b] = sum of exp((l - bmax[b]) / T) over its logits in
//                 double (0 when bmax[b] is -inf).
//   sample_merge  grid ceil(n_runs / 4), block 512: block b loads runs [4b, 4b + 4) (missing ones: padding) and keeps
//                 the 1024 largest keys of their union, sorted: run b of `out`. Two sorted runs A, B of 1024 are
//                 merged by C[i] = max(A[i], B[1023 - i]) (exactly the 1024 largest of A and B, as a bitonic sequence)
//                 and a bitonic merge of C (10 compare-exchange stages).
//   The launch with one block (sample_runs when V <= 1024, else the last sample_merge) writes the result; its total
//   combines the partial sums: total = sum_b bsum[b] * exp((bmax[b] - M) / T). That rescaling differs from summing
//   exp((l - M) / T) directly by a few float64 rounding steps (relative ~1e-15), as does any other summation order.
#include "common.cuh"
#include "pdl.cuh"

#define SAMPLE_RUN 1024          // keys per run == candidates kept (text.candidates.N_CANDIDATES)
#define SAMPLE_MERGE_RUNS 4      // runs merged per block by sample_merge
#define SAMPLE_THREADS 512

typedef unsigned long long u64;

__device__ __forceinline__ unsigned int sample_ord(float v) {
    unsigned int b = __float_as_uint(v);
    if ((b & 0x7fffffffu) > 0x7f800000u) b = 0xff800000u;     // NaN -> -inf
    if (b == 0x80000000u) b = 0u;                              // -0 -> +0: equal logits, equal order words
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ float sample_value(u64 key) {
    const unsigned int o = (unsigned int)(key >> 32);
    return __uint_as_float((o & 0x80000000u) ? (o & 0x7fffffffu) : ~o);
}

__device__ __forceinline__ int sample_id(u64 key) {
    return (int)(0xffffffffu - (unsigned int)key);
}

// Compare-exchange of s[i] and s[i + j] so that the larger key ends at i when `desc`, else at i + j.
__device__ __forceinline__ void sample_cmpx(u64* s, int i, int j, bool desc) {
    const u64 a = s[i], c = s[i + j];
    if (desc ? (a < c) : (a > c)) {
        s[i] = c;
        s[i + j] = a;
    }
}

// Pair p of a stage with distance j (a power of two): the lower index i (bit j clear); its partner is i + j.
__device__ __forceinline__ int sample_pair(int p, int j) {
    return ((p & ~(j - 1)) << 1) | (p & (j - 1));
}

// The result from the sorted keys s[0 .. 1023] (s[0] is a real key) and the level-0 partial sums. All threads call.
__device__ void sample_write_result(const u64* s, const float* bmax, const double* bsum, int nb0, double T,
                                    int* out_ids, float* out_vals, double* out_td, double* red) {
    for (int t = threadIdx.x; t < SAMPLE_RUN; t += blockDim.x) {
        const u64 key = s[t];
        out_ids[t] = key ? sample_id(key) : -1;
        out_vals[t] = key ? sample_value(key) : -DS4_INF;
    }
    const float M = sample_value(s[0]);
    double acc = 0.0;
    if (M != -DS4_INF) {
        for (int b = threadIdx.x; b < nb0; b += blockDim.x) {
            const float mb = bmax[b];
            if (mb != -DS4_INF) acc += bsum[b] * exp(((double)mb - (double)M) / T);
        }
    }
    const double total = block_sum_d(acc, red);
    if (threadIdx.x == 0) {
        out_td[0] = total;
        out_td[1] = T;
    }
}

extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
sample_runs(const float* __restrict__ logits, int V, const double* __restrict__ temp, u64* __restrict__ runs,
            float* __restrict__ bmax, double* __restrict__ bsum, int final_launch, int* __restrict__ out_ids,
            float* __restrict__ out_vals, double* __restrict__ out_td) {
    DS4_PDL_ENTRY();
    __shared__ u64 s[SAMPLE_RUN];
    __shared__ double red[32];
    const int tid = threadIdx.x, b = blockIdx.x;
    const double T = temp[0];
    for (int q = tid; q < SAMPLE_RUN; q += SAMPLE_THREADS) {
        const int i = b * SAMPLE_RUN + q;
        s[q] = i < V ? (((u64)sample_ord(logits[i]) << 32) | (u64)(0xffffffffu - (unsigned int)i)) : 0ull;
    }
    __syncthreads();
    // bitonic sort, descending: phase k merges runs of k / 2 into runs of k (descending where (i & k) == 0)
    for (int k = 2; k <= SAMPLE_RUN; k <<= 1) {
        for (int j = k >> 1; j > 0; j >>= 1) {
            for (int p = tid; p < SAMPLE_RUN / 2; p += SAMPLE_THREADS) {
                const int i = sample_pair(p, j);
                sample_cmpx(s, i, j, (i & k) == 0);
            }
            __syncthreads();
        }
    }
    // this block's largest logit and its float64 mass relative to it
    const float m = sample_value(s[0]);       // s[0] is real: the block holds >= 1 logit
    double acc = 0.0;
    if (m != -DS4_INF) {
        for (int q = tid; q < SAMPLE_RUN; q += SAMPLE_THREADS) {
            const u64 key = s[q];
            if (key) acc += exp(((double)sample_value(key) - (double)m) / T);
        }
    }
    const double sum = block_sum_d(acc, red);
    if (tid == 0) {
        bmax[b] = m;
        bsum[b] = sum;
    }
    if (final_launch) {
        __syncthreads();                      // bmax / bsum written above are read back by other threads
        sample_write_result(s, bmax, bsum, 1, T, out_ids, out_vals, out_td, red);
    } else {
        for (int q = tid; q < SAMPLE_RUN; q += SAMPLE_THREADS) runs[(size_t)b * SAMPLE_RUN + q] = s[q];
    }
}

extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
sample_merge(const u64* __restrict__ in, int n_runs, u64* __restrict__ out, const float* __restrict__ bmax,
             const double* __restrict__ bsum, int nb0, const double* __restrict__ temp, int final_launch,
             int* __restrict__ out_ids, float* __restrict__ out_vals, double* __restrict__ out_td) {
    DS4_PDL_ENTRY();
    __shared__ u64 s[SAMPLE_MERGE_RUNS * SAMPLE_RUN];
    __shared__ double red[32];
    const int tid = threadIdx.x, b = blockIdx.x;
    const long long n_keys = (long long)n_runs * SAMPLE_RUN;
    for (int q = tid; q < SAMPLE_MERGE_RUNS * SAMPLE_RUN; q += SAMPLE_THREADS) {
        const long long g = (long long)b * SAMPLE_MERGE_RUNS * SAMPLE_RUN + q;
        s[q] = g < n_keys ? in[g] : 0ull;
    }
    __syncthreads();
    // rounds: runs d apart are merged pairwise into the first of each pair (d = 1024, then 2048)
    for (int d = SAMPLE_RUN; d < SAMPLE_MERGE_RUNS * SAMPLE_RUN; d <<= 1) {
        const int merges = SAMPLE_MERGE_RUNS * SAMPLE_RUN / (2 * d);
        for (int x = tid; x < merges * SAMPLE_RUN; x += SAMPLE_THREADS) {
            const int base = (x / SAMPLE_RUN) * 2 * d, i = x % SAMPLE_RUN;
            const u64 a = s[base + i], c = s[base + d + SAMPLE_RUN - 1 - i];
            s[base + i] = a > c ? a : c;
        }
        __syncthreads();
        for (int j = SAMPLE_RUN / 2; j > 0; j >>= 1) {
            for (int x = tid; x < merges * (SAMPLE_RUN / 2); x += SAMPLE_THREADS) {
                const int base = (x / (SAMPLE_RUN / 2)) * 2 * d;
                sample_cmpx(s + base, sample_pair(x % (SAMPLE_RUN / 2), j), j, true);
            }
            __syncthreads();
        }
    }
    if (final_launch) {
        sample_write_result(s, bmax, bsum, nb0, temp[0], out_ids, out_vals, out_td, red);
    } else {
        for (int q = tid; q < SAMPLE_RUN; q += SAMPLE_THREADS) out[(size_t)b * SAMPLE_RUN + q] = s[q];
    }
}
