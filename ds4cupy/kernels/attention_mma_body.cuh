// attention_mma_body.cuh: the statements shared by attn_prefill_mma (attention_mma.cu) and attn_partial_mma
// (attention_decode_mma.cu), included as text inside each kernel's body (each family includes it once), so the
// compiler sees attn_prefill_mma's statements exactly as before the split (same SASS). It loads the query
// fragments and runs the key loop (attention_mma.cu's header, steps 1-4) over `ntiles` tiles of the key list L
// (L.row(16 it + r)). In scope before it: q, t, H, d, hA, hB, ds, tq, tid, lane, L, ntiles, nb, scale and the shared
// arrays am_stage, part, rmax, kval. It leaves: o[AM_MAXB][2][4] (the warp's unnormalised output in units of
// 2^(E_run - 155)), m_r[2] (running score max of rows gq, gq + 8), l_r[2] (the lane's part of the running sum
// exp(s - m_r): add over the quad) and E_run.
#pragma once
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
