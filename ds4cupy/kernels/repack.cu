// repack.cu: GGUF Q8_0 rows <-> the Q8_0R plane layout of q8_0r.cuh (load-time weight repacking and its inverse).
//
// repack_q8_0(src, n_rows, nblk, slab_rows, qs_dst, d_dst)
//   src: uint8 [n_rows, 34 * nblk] GGUF Q8_0 rows (2-byte aligned). Row i is local row lr = i % slab_rows of slab
//   k = i / slab_rows; with SB = 34 * nblk * slab_rows (the slab's byte size):
//     qs_dst[k SB + 32 nblk lr + 32 b + j] = src[i, 34 b + 2 + j]       (j < 32)   when qs_dst != nullptr
//     d_dst[k SB + 2 (nblk lr + b) + 0, 1] = src[i, 34 b + 0, 1]                    when d_dst != nullptr
//   i.e. qs_dst = slab 0's qs plane and d_dst = slab 0's d plane of the destination (ds4cupy.engines.cuda.q8_0r
//   points them elsewhere to repack a slab in place, chunk by chunk; see repack_q8_0 there). qs_dst and SB must be
//   16-byte aligned (the wrappers require slab_rows * nblk % 8 == 0), d_dst 2-byte aligned. src must not overlap
//   the bytes written.
// unpack_q8_0(src, n_rows, nblk, slab_rows, dst)
//   The inverse: dst uint8 [n_rows, 34 * nblk] GGUF rows from the Q8_0R slabs at src (16-byte aligned).
// Reference: ds4cupy.engines.cuda.q8_0r.repack_q8_0_np / unpack_q8_0_np.
// Launch: 256 threads, any grid (grid-stride over the n_rows * nblk blocks, one block per thread).
#include "q8_0r.cuh"
#include "pdl.cuh"

extern "C" __global__ void repack_q8_0(const u8* src, long long n_rows, int nblk, int slab_rows, u8* qs_dst,
                                       u8* d_dst) {
    DS4_PDL_ENTRY();
    const long long total = n_rows * nblk;
    const long long sb = 34LL * nblk * slab_rows;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const long long row = i / nblk, slab = row / slab_rows, lr = row - slab * slab_rows;
        const int b = (int)(i - row * nblk);
        const u16* blk = reinterpret_cast<const u16*>(src + 34 * i);  // block i of the contiguous GGUF rows
        if (d_dst != nullptr)
            reinterpret_cast<u16*>(d_dst + slab * sb)[nblk * lr + b] = blk[0];
        if (qs_dst != nullptr) {
            u32 w[8];
#pragma unroll
            for (int j = 0; j < 8; ++j) w[j] = (u32)blk[1 + 2 * j] | ((u32)blk[2 + 2 * j] << 16);
            uint4* q = reinterpret_cast<uint4*>(qs_dst + slab * sb + 32LL * nblk * lr + 32LL * b);
            q[0] = make_uint4(w[0], w[1], w[2], w[3]);
            q[1] = make_uint4(w[4], w[5], w[6], w[7]);
        }
    }
}

extern "C" __global__ void unpack_q8_0(const u8* src, long long n_rows, int nblk, int slab_rows, u8* dst) {
    DS4_PDL_ENTRY();
    const long long total = n_rows * nblk;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const long long row = i / nblk;
        const int b = (int)(i - row * nblk);
        const Q8RRow r = q8r_row(src, row, nblk, slab_rows);
        const uint4 q0 = r.qs[2 * b], q1 = r.qs[2 * b + 1];
        const u32 w[8] = {q0.x, q0.y, q0.z, q0.w, q1.x, q1.y, q1.z, q1.w};
        u16* blk = reinterpret_cast<u16*>(dst + 34 * i);
        blk[0] = r.d[b];
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            blk[1 + 2 * j] = (u16)(w[j] & 0xFFFFu);
            blk[2 + 2 * j] = (u16)(w[j] >> 16);
        }
    }
}
