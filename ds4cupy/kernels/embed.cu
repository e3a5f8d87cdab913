// embed.cu: token embedding lookup into the hyper-connection state (model.md §2.1; reference: forward_chunk's
// `X = repeat(token_embd[ids], hc_mult)`). The table is the raw GGUF tensor token_embd [V, D]:
// dtype 0 = F32, 1 = F16, 2 = BF16 (elements), 8 = Q8_0 (rows of D/32 blocks of 34 bytes: f16 scale + 32 int8).
// ids: int32 [T] in device memory (decode reads the token id the previous step left there).
// X: [T, n, D] float32, every stream a copy of the row. grid = (ceil(D/256), T), block = 256.
#include "common.cuh"
#include "pdl.cuh"

extern "C" __global__ void embed_hc(const int* ids, const unsigned char* table, int dtype, long long row_bytes, int D,
                                    int n, float* X) {
    DS4_PDL_ENTRY();
    const int t = blockIdx.y;
    const int d = blockIdx.x * blockDim.x + threadIdx.x;
    if (d >= D) return;
    const unsigned char* row = table + (long long)ids[t] * row_bytes;
    float v;
    if (dtype == 8) {
        const unsigned char* blk = row + (long long)(d / 32) * 34;
        const unsigned short s = *(const unsigned short*)blk;   // 34-byte blocks start at even offsets
        v = f16_bits_to_float(s) * (float)((const signed char*)(blk + 2))[d % 32];
    } else {
        v = load_w(row, dtype, d);
    }
    float* x = X + (long long)t * n * D;
    for (int i = 0; i < n; ++i) x[(long long)i * D + d] = v;
}

// The session's device position counter: d_pos[0] += n after a step (so a captured decode step needs no host write).
// grid = 1, block = 1.
extern "C" __global__ void pos_advance(int* d_pos, int n) {
    DS4_PDL_ENTRY();
    d_pos[0] += n;
}
