"""CPU checks of the grouped prefill MoE (kernels/moe_grouped.cu, engines/cuda/moe_grouped.py) that need no GPU:

- a NumPy emulation of the GEMM's tile/lane mapping (ldmatrix lane addresses, the m16n8k16 fragment layouts of the PTX
  ISA, the epilogue's (row, token) of every accumulator) computes exactly the CTA's product, each output once;
- NumPy transcriptions of the tile decoders' index math (which bytes, scales and shifts give columns [k0, k0 + 64))
  equal ds4cupy.format.quants.dequantize on random blocks, for every k-step;
- the tile-table bound max_tiles, the fp16 range rule and the argument checks that run before any device work.
The GPU tests (tests/test_gpu_moe_grouped.py) check the kernels themselves.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from ds4cupy.engines.cuda import moe_grouped as mg
from ds4cupy.format import quants as Q

LD = 72  # MG_LD


# ---- PTX semantics (ISA "Matrix fragments for mma.m16n8k16", "ldmatrix") -----------------------------------------
def ldmatrix_x4(smem, addrs):
    """addrs[lane] = (row, col) of the 8 halves lane supplies (row lane % 8 of matrix lane // 8). Returns
    regs[lane][i] = (lo, hi) halves: matrix i, row lane // 4, columns 2 (lane % 4) and 2 (lane % 4) + 1."""
    mats = [np.array([smem[r, c: c + 8] for r, c in addrs[8 * i: 8 * i + 8]]) for i in range(4)]
    return [[(mats[i][lane // 4, 2 * (lane % 4)], mats[i][lane // 4, 2 * (lane % 4) + 1]) for i in range(4)]
            for lane in range(32)]


def mma_m16n8k16(a_regs, b_regs):
    """D = A (16 x 16) @ B (16 x 8) from per-lane fragments; returns d[lane] = 4 floats (c0..c3 layout)."""
    A = np.zeros((16, 16))
    B = np.zeros((16, 8))
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for i, (r, c) in enumerate([(g, 2 * t), (g + 8, 2 * t), (g, 2 * t + 8), (g + 8, 2 * t + 8)]):
            A[r, c], A[r, c + 1] = a_regs[lane][i]
        for i, kk in enumerate([2 * t, 2 * t + 8]):
            B[kk, g], B[kk + 1, g] = b_regs[lane][i]
    D = A @ B
    return [[D[lane // 4, 2 * (lane % 4)], D[lane // 4, 2 * (lane % 4) + 1], D[lane // 4 + 8, 2 * (lane % 4)],
             D[lane // 4 + 8, 2 * (lane % 4) + 1]] for lane in range(32)]


def _acc_row(mt, wm, lane, q):
    """CTA row of accumulator acc[mt][.][q] of a lane of warp (wm, .) (mg_gemm's epilogue)."""
    return (mt >> 1) * 128 + wm * 32 + (mt & 1) * 16 + (lane >> 2) + 8 * (q >> 1)


def test_gemm_lane_mapping_computes_the_cta_product(rng):
    """One k-step of mg_gemm's inner loop and its epilogue mapping, lane by lane (formulas as in moe_grouped.cu)."""
    sA = rng.integers(-8, 8, (256, LD)).astype(np.float64)   # small integers: the products are exact
    sB = rng.integers(-8, 8, (64, LD)).astype(np.float64)
    want = sA[:, :64] @ sB[:, :64].T                          # [row of CTA, token slot]
    got = np.full((256, 64), np.nan)
    for warp in range(8):
        wm, wn = warp & 3, warp >> 2
        acc = np.zeros((4, 4, 32, 4))
        for kk in range(0, 64, 16):
            per_lane_b = {}
            for np_ in range(2):
                addrs = [(wn * 32 + ((lane >> 4) << 3) + (lane & 7) + np_ * 16, ((lane >> 3) & 1) * 8 + kk)
                         for lane in range(32)]
                r = ldmatrix_x4(sB, addrs)
                per_lane_b[2 * np_] = [[r[lane][0], r[lane][1]] for lane in range(32)]
                per_lane_b[2 * np_ + 1] = [[r[lane][2], r[lane][3]] for lane in range(32)]
            for mt in range(4):
                addrs = [(wm * 32 + (lane & 15) + (mt >> 1) * 128 + (mt & 1) * 16, (lane >> 4) * 8 + kk)
                         for lane in range(32)]
                af = ldmatrix_x4(sA, addrs)
                for nt in range(4):
                    d = mma_m16n8k16(af, per_lane_b[nt])
                    acc[mt, nt] += np.array(d)
        for mt in range(4):
            for nt in range(4):
                for lane in range(32):
                    for q in range(4):
                        row = _acc_row(mt, wm, lane, q)
                        tok = wn * 32 + nt * 8 + 2 * (lane & 3) + (q & 1)
                        assert np.isnan(got[row, tok]), f"output ({row}, {tok}) written twice"
                        got[row, tok] = acc[mt, nt, lane, q]
    np.testing.assert_array_equal(got, want)
    # gate/up's epilogue pairs accumulator mt (gate row f) with mt + 2 of the same lane: up row f, 128 rows below
    assert all(_acc_row(mt + 2, wm, lane, q) == _acc_row(mt, wm, lane, q) + 128
               for wm in range(4) for mt in range(2) for lane in range(32) for q in range(4))


def test_shared_tile_stores_are_16_byte_aligned_and_conflict_free():
    """Each thread stores 16-byte chunks of its shared row (row stride 72 halves): aligned, and the 8 threads of a
    quarter warp (one 128-bit store phase) hit distinct 4-bank groups, for the A rows and for the B quarter-rows."""
    for tid0 in range(0, 256, 8):
        for c in range(0, 64, 8):
            a_words = [((tid * LD + c) * 2) // 4 for tid in range(tid0, tid0 + 8)]
            assert all((tid * LD + c) * 2 % 16 == 0 for tid in range(tid0, tid0 + 8))
            assert len({(w % 32) // 4 for w in a_words}) == 8
        for h in (0, 8):
            b_words = [(((tid >> 2) * LD + 16 * (tid & 3) + h) * 2) // 4 for tid in range(tid0, tid0 + 8)]
            assert len({(w % 32) // 4 for w in b_words}) == 8


# ---- tile decoders -------------------------------------------------------------------------------------------------
def _u16(b, o):
    return int(b[o]) | int(b[o + 1]) << 8


def _u32(b, o):
    return _u16(b, o) | _u16(b, o + 2) << 16


def _h(bits):
    return float(np.array([bits], np.uint16).view(np.float16)[0])


def decode64_q8_0(row, k0):
    out = []
    for b in range(2):
        blk = row[((k0 >> 5) + b) * 34:]
        d = _h(_u16(blk, 0))
        for q in range(4):
            for w in (_u32(blk, 2 + 8 * q), _u32(blk, 6 + 8 * q)):
                out += [float(np.int8(np.uint8((w >> (8 * i)) & 255))) * d for i in range(4)]
    return out


def decode64_q2_k(row, k0):
    blk = row[(k0 >> 8) * 84:]
    h, s0 = (k0 >> 7) & 1, ((k0 >> 6) & 1) * 2
    dm = _u32(blk, 80)
    d, dmin = _h(dm & 0xFFFF), _h(dm >> 16)
    sc4 = _u32(blk, 8 * h + 2 * s0)
    out = [0.0] * 64
    for half in range(2):
        q = [_u32(blk, 16 + 32 * h + 16 * half + 4 * w) for w in range(4)]
        for si in range(2):
            sh = 2 * (s0 + si)
            sc = (sc4 >> (8 * (2 * si + half))) & 0xFF
            a, m = d * (sc & 15), dmin * (sc >> 4)
            for g in range(2):
                for wi, w in enumerate((q[2 * g], q[2 * g + 1])):
                    for i in range(4):
                        out[32 * si + 16 * half + 8 * g + 4 * wi + i] = a * (((w >> sh) >> (8 * i)) & 3) - m
    return out


def _q4k_scale_min(s, j):
    if j < 4:
        return s[j] & 63, s[j + 4] & 63
    return (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4)


def decode64_q4_k(row, k0):
    blk = row[(k0 >> 8) * 144:]
    i = (k0 >> 6) & 3
    dm = _u32(blk, 0)
    d, dmin = _h(dm & 0xFFFF), _h(dm >> 16)
    am = [(d * sc, dmin * mn) for sc, mn in (_q4k_scale_min(blk[4:16], 2 * i), _q4k_scale_min(blk[4:16], 2 * i + 1))]
    out = [0.0] * 64
    for g in range(4):
        qx, qy = _u32(blk, 16 + 32 * i + 8 * g), _u32(blk, 20 + 32 * i + 8 * g)
        for hi in range(2):
            a, m = am[hi]
            for wi, w in enumerate((qx, qy)):
                for j in range(4):
                    out[32 * hi + 8 * g + 4 * wi + j] = a * (((w >> (4 * hi)) >> (8 * j)) & 15) - m
    return out


def decode64_iq2_xxs(row, k0):
    grid = Q.iq2xxs_grid()
    blk = row[(k0 >> 8) * 66:]
    ib0 = (k0 >> 5) & 7
    d = _h(_u16(blk, 0))
    out = []
    for b in range(2):
        o = 2 + 8 * (ib0 + b)
        aux0, aux1 = _u32(blk, o), _u32(blk, o + 4)
        db = d * (0.5 + (aux1 >> 28)) * 0.25
        for l in range(4):
            g = grid[(aux0 >> (8 * l)) & 255]
            s7 = (aux1 >> (7 * l)) & 127
            s8 = s7 | ((bin(s7).count("1") & 1) << 7)
            out += [(-1.0 if (s8 >> kk) & 1 else 1.0) * db * float(g[kk]) for kk in range(8)]
    return out


def decode64_q8_0r(planes, r, k0, slab_rows, cols):
    """MgQ8_0R: q8r_row (slab r // slab_rows: qs int8 [S, cols] then d f16 [S, cols / 32]) and 4 chunks of 16."""
    nblk = cols // 32
    flat = planes.reshape(-1)
    slab, lr = divmod(r, slab_rows)
    sb = slab * slab_rows * 34 * nblk
    qs = sb + lr * 32 * nblk
    d_at = sb + slab_rows * 32 * nblk + 2 * lr * nblk
    out = []
    for b in range(2):
        d = _h(_u16(flat, d_at + 2 * ((k0 >> 5) + b)))
        for c in range(2):
            chunk = flat[qs + 16 * ((k0 >> 4) + 2 * b + c):][:16]
            out += [float(np.int8(v)) * d for v in chunk]
    return out


DECODERS = {T.Q8_0: decode64_q8_0, T.Q2_K: decode64_q2_k, T.Q4_K: decode64_q4_k, T.IQ2_XXS: decode64_iq2_xxs}


@pytest.mark.parametrize("slab_rows", [6, 2])
def test_q8_0r_tile_decoder_index_math(slab_rows, rng):
    from ds4cupy.engines.cuda.q8_0r import repack_q8_0_np
    rows, cols = 6, 256
    raw = Q.random_blocks(T.Q8_0, (rows, cols), rng, 0.3)
    ref = Q.dequantize(raw, T.Q8_0, (rows, cols)).astype(np.float64)
    planes = repack_q8_0_np(raw, slab_rows)
    for r in range(rows):
        got = np.concatenate([decode64_q8_0r(planes, r, k0, slab_rows, cols) for k0 in range(0, cols, 64)])
        np.testing.assert_array_equal(got, ref[r], err_msg=f"row {r}")


@pytest.mark.parametrize("qtype", list(DECODERS), ids=lambda t: t.name)
def test_tile_decoder_index_math(qtype, rng):
    cols = 512
    raw = Q.random_blocks(qtype, (3, cols), rng, 0.3)
    ref = Q.dequantize(raw, qtype, (3, cols)).astype(np.float64)
    for r in range(3):
        row = raw[r].view(np.uint8)
        got = np.concatenate([DECODERS[qtype](row, k0) for k0 in range(0, cols, 64)])
        # float64 here vs float32 (an FMA) in the kernel and in quants: equal to float32 rounding
        np.testing.assert_allclose(got, ref[r], rtol=2e-7, atol=1e-12 * np.abs(ref).max(),
                                   err_msg=f"{qtype.name} row {r}")


def test_iq2_grid_bytes_are_what_the_decoder_reads():
    g = Q.iq2xxs_grid()
    assert g.shape == (256, 8) and set(np.unique(g)) <= {8, 25, 43}


# ---- tile table, fp16 rule, argument checks ----------------------------------------------------------------------
def _tiles(counts):
    return sum(-(-c // mg.TILE_TOKENS) for c in counts)


def test_max_tiles_bounds_every_load(rng):
    for n_pairs, E in [(1, 256), (63, 8), (64, 8), (12288, 256), (5000, 512), (200, 3)]:
        bound = mg.max_tiles(n_pairs, E)
        worst = 0
        for trial in range(200):
            # random loads, and adversarial ones: 65-pair buckets (two tiles each) or one pair per bucket
            kind = trial % 3
            if kind == 0:
                counts = np.bincount(rng.integers(0, E + 1, n_pairs), minlength=E + 1)
            elif kind == 1:
                counts = np.zeros(E + 1, int)
                left = n_pairs
                for b in range(E + 1):
                    counts[b] = min(left, mg.TILE_TOKENS + 1)
                    left -= counts[b]
                counts[-1] += left
            else:
                counts = np.zeros(E + 1, int)
                counts[: min(E + 1, n_pairs)] = 1
                counts[0] += n_pairs - counts.sum()
            assert counts.sum() == n_pairs
            worst = max(worst, _tiles(counts))
        assert worst <= bound, (n_pairs, E, worst, bound)
        assert bound <= n_pairs // mg.TILE_TOKENS + E + 1
    assert mg.max_tiles(0, 8) == 0


def test_fp16_range_rule():
    # DeepSeek-V4-Flash: clamp 10, normalised routing weights times 1.5, norm weights O(1): 150 and 64 * |w|
    assert mg.fp16_range_ok(10.0, 1.5, 3.0, 4096)
    assert mg.fp16_range_ok(10.0, 1.0, 3.0, 4096)
    assert not mg.fp16_range_ok(200.0, 1.5, 3.0, 4096)        # 200^2 * 1.5 = 6e4: the SwiGLU output could overflow
    assert not mg.fp16_range_ok(10.0, 1.5, 300.0, 4096)       # 64 * 300 > 2^14: a normalised row could
    assert not mg.fp16_range_ok(10.0, math.inf, 1.0, 4096)    # unnormalised routing weights: no bound
    assert not mg.fp16_range_ok(float("nan"), 1.0, 1.0, 4096)
    assert mg.fp16_range_ok(np.float32(10.0), np.float32(1.5), np.float32(2.0), 4096)

    class Cfg:
        expert_weights_scale, expert_weights_norm = 2.5, True
    assert mg.routing_weight_bound(Cfg) == 2.5
    Cfg.expert_weights_norm = False
    assert mg.routing_weight_bound(Cfg) == math.inf


def test_supported_types_and_errors_before_device_work():
    from ds4cupy.engines.cuda.q8_0r import Q8_0R
    assert all(mg.grouped_supported(t) for t in (T.IQ2_XXS, T.Q2_K, T.Q4_K, T.Q8_0, Q8_0R(64)))
    assert mg._suffix(Q8_0R(64)) == "q8_0r" and mg._row_arg(Q8_0R(64), 1088) == 64 and mg._row_arg(T.Q8_0, 1088) == 1088
    assert not any(mg.grouped_supported(t) for t in (T.MXFP4, T.F16, "no-such-type"))
    with pytest.raises(ValueError, match="n_expert=600"):
        mg.alloc_routing(10, 600)
    with pytest.raises(ValueError, match="max_pairs must be positive, got 0"):
        mg.alloc_routing(0, 8)
    with pytest.raises(ValueError, match="MXFP4"):
        mg._gtype(T.MXFP4)
    with pytest.raises(ValueError, match="multiple of 256, got 320"):
        mg._check_reduction(T.Q2_K, 320, "x")
    with pytest.raises(ValueError, match="multiple of 64, got 96"):
        mg._check_reduction(T.Q8_0, 96, "x")
