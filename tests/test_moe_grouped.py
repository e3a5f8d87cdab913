"""CPU checks of the grouped prefill MoE (kernels/moe_grouped.cu, engines/cuda/moe_grouped.py) that need no GPU:

- a NumPy emulation of the GEMM's tile/lane mapping (ldmatrix lane addresses, the m16n8k16 fragment layouts of the PTX
  ISA, the per-sub-block partials folded with the row's scale / min and the token's scale / sum, the epilogue's
  (row, token) of every accumulator) computes exactly the CTA's k-step, each output once, for 16- and 32-column
  sub-blocks;
- NumPy transcriptions of the tile decoders' index math (which bytes, scales and shifts give the codes, scales and
  mins of columns [k0, k0 + 32)) equal the exact split of tests/moe_grouped_emul.py, and codes * a - m equals
  ds4cupy.format.quants.dequantize, on random blocks, for every k-step;
- the kernels' numerics (tests/moe_grouped_emul.py: integer codes, hi + lo activations, float32 scale application)
  against float64 products: float32-level, while the old fp16 operands or a lost lo term are far outside that bound;
- the tile-table bound max_tiles and the argument checks that run before any device work.
The GPU tests (tests/test_gpu_moe_grouped.py) check the kernels themselves.
"""
from __future__ import annotations


import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

import moe_grouped_emul as emul
from ds4cupy.engines.cuda import moe_grouped as mg
from ds4cupy.format import quants as Q

LD = 40  # MG_LD
BK = 32  # MG_BK


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


def _acc_tok(nt, wn, lane, q):
    return wn * 32 + nt * 8 + 2 * (lane & 3) + (q & 1)


@pytest.mark.parametrize("sb", [32, 16])
def test_gemm_lane_mapping_computes_the_cta_k_step(sb, rng):
    """One k-step of mg_gemm's inner loop (sub-blocks j, ldmatrix of hi / lo / codes, 2 mma per 16 columns into a fresh
    partial, the fold acc = fma(a s, P, acc) then fma(-m, SX, acc)) and its epilogue mapping, lane by lane, with the
    index formulas of moe_grouped.cu."""
    nsb, ks_n = BK // sb, sb // 16
    sA = rng.integers(-8, 8, (256, LD)).astype(np.float64)       # codes: small integers, products exact
    sXh = rng.integers(-8, 8, (64, LD)).astype(np.float64)
    sXl = rng.integers(-8, 8, (64, LD)) / 1024.0
    s_a, s_m = rng.integers(1, 9, (nsb, 256)) / 8.0, rng.integers(0, 9, (nsb, 256)) / 4.0
    s_s, s_sx = 2.0 ** rng.integers(-3, 4, 64), rng.integers(-20, 20, (nsb, 64)) / 2.0
    X = sXh + sXl
    want = np.zeros((256, 64))
    for j in range(nsb):
        c = slice(j * sb, j * sb + sb)
        want += s_a[j][:, None] * s_s[None, :] * (sA[:, c] @ X[:, c].T) - s_m[j][:, None] * s_sx[j][None, :]
    got = np.full((256, 64), np.nan)
    for warp in range(8):
        wm, wn = warp & 3, warp >> 2
        acc = np.zeros((4, 4, 32, 4))
        a_lane = [(wm * 32 + (lane & 15), (lane >> 4) * 8) for lane in range(32)]
        b_lane = [(wn * 32 + ((lane >> 4) << 3) + (lane & 7), ((lane >> 3) & 1) * 8) for lane in range(32)]
        for j in range(nsb):
            bh, bl = {}, {}
            for ks in range(ks_n):
                for np_ in range(2):
                    addrs = [(r + np_ * 16, c + j * sb + 16 * ks) for r, c in b_lane]
                    for store, mat in ((bh, sXh), (bl, sXl)):
                        r = ldmatrix_x4(mat, addrs)
                        store[ks, 2 * np_] = [[r[lane][0], r[lane][1]] for lane in range(32)]
                        store[ks, 2 * np_ + 1] = [[r[lane][2], r[lane][3]] for lane in range(32)]
            for mt in range(4):
                af = [ldmatrix_x4(sA, [(r + (mt >> 1) * 128 + (mt & 1) * 16, c + j * sb + 16 * ks) for r, c in a_lane])
                      for ks in range(ks_n)]
                for nt in range(4):
                    p = np.zeros((32, 4))
                    for ks in range(ks_n):
                        p += np.array(mma_m16n8k16(af[ks], bh[ks, nt])) + np.array(mma_m16n8k16(af[ks], bl[ks, nt]))
                    for lane in range(32):
                        ra = (mt >> 1) * 128 + wm * 32 + (mt & 1) * 16 + (lane >> 2)
                        tk = wn * 32 + nt * 8 + 2 * (lane & 3)
                        for q in range(4):
                            r, t = ra + 8 * (q >> 1), tk + (q & 1)
                            acc[mt, nt, lane, q] += s_a[j][r] * s_s[t] * p[lane, q] - s_m[j][r] * s_sx[j][t]
        for mt in range(4):
            for nt in range(4):
                for lane in range(32):
                    for q in range(4):
                        row, tok = _acc_row(mt, wm, lane, q), _acc_tok(nt, wn, lane, q)
                        assert np.isnan(got[row, tok]), f"output ({row}, {tok}) written twice"
                        got[row, tok] = acc[mt, nt, lane, q]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-9)
    # gate/up's epilogue pairs accumulator mt (gate row f) with mt + 2 of the same lane: up row f, 128 rows below
    assert all(_acc_row(mt + 2, wm, lane, q) == _acc_row(mt, wm, lane, q) + 128
               for wm in range(4) for mt in range(2) for lane in range(32) for q in range(4))


def test_shared_tile_stores_are_16_byte_aligned_and_conflict_free():
    """Each thread stores 16-byte chunks: its weight row's 32 codes (row stride 40 halves) and its token's 8 hi / lo
    halves. Aligned; the 8 threads of a quarter warp (one 128-bit store phase) hit distinct 4-bank groups for the
    weight rows; the activation stores (2 tokens x 4 chunks a phase) at most 2-way."""
    for tid0 in range(0, 256, 8):
        for c in range(0, BK, 8):
            a_words = [((tid * LD + c) * 2) // 4 for tid in range(tid0, tid0 + 8)]
            assert all((tid * LD + c) * 2 % 16 == 0 for tid in range(tid0, tid0 + 8))
            assert len({(w % 32) // 4 for w in a_words}) == 8
        b = [((tid >> 2) * LD + 8 * (tid & 3)) * 2 for tid in range(tid0, tid0 + 8)]
        assert all(o % 16 == 0 for o in b)
        groups = [(o // 4 % 32) // 4 for o in b]
        assert max(groups.count(g) for g in groups) <= 2


# ---- tile decoders -------------------------------------------------------------------------------------------------
# Transcriptions of the decode32 functions: (codes [32], a [32 / SB], m [32 / SB] or None) of columns [k0, k0 + 32).
def _u16(b, o):
    return int(b[o]) | int(b[o + 1]) << 8


def _u32(b, o):
    return _u16(b, o) | _u16(b, o + 2) << 16


def _h(bits):
    return float(np.array([bits], np.uint16).view(np.float16)[0])


def _s8(w, i):
    return float(np.int8(np.uint8((w >> (8 * i)) & 255)))


def decode32_q8_0(row, k0):
    blk = row[(k0 >> 5) * 34:]
    codes = [_s8(_u32(blk, 2 + 4 * w), i) for w in range(8) for i in range(4)]
    return codes, [_h(_u16(blk, 0))], None


def decode32_q2_k(row, k0):
    blk = row[(k0 >> 8) * 84:]
    j = (k0 >> 5) & 7
    h, sh = j >> 2, 2 * (j & 3)
    dm = _u32(blk, 80)
    d, dmin = _h(dm & 0xFFFF), _h(dm >> 16)
    sc2 = _u16(blk, 2 * j)
    a = [d * (((sc2 >> (8 * half)) & 0xFF) & 15) for half in range(2)]
    m = [dmin * (((sc2 >> (8 * half)) & 0xFF) >> 4) for half in range(2)]
    codes = [float(((_u32(blk, 16 + 32 * h + 4 * w) >> sh) >> (8 * i)) & 3) for w in range(8) for i in range(4)]
    return codes, a, m


def _q4k_scale_min(s, j):
    if j < 4:
        return s[j] & 63, s[j + 4] & 63
    return (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4)


def decode32_q4_k(row, k0):
    blk = row[(k0 >> 8) * 144:]
    j = (k0 >> 5) & 7
    i, sh = j >> 1, 4 * (j & 1)
    dm = _u32(blk, 0)
    sc, mn = _q4k_scale_min(blk[4:16], j)
    codes = [float(((_u32(blk, 16 + 32 * i + 4 * w) >> sh) >> (8 * b)) & 15) for w in range(8) for b in range(4)]
    return codes, [_h(dm & 0xFFFF) * sc], [_h(dm >> 16) * mn]


def decode32_iq2_xxs(row, k0):
    grid = Q.iq2xxs_grid()
    blk = row[(k0 >> 8) * 66:]
    o = 2 + 8 * ((k0 >> 5) & 7)
    aux0, aux1 = _u32(blk, o), _u32(blk, o + 4)
    a = _h(_u16(blk, 0)) * (0.5 + (aux1 >> 28)) * 0.25
    codes = []
    for l in range(4):
        g = grid[(aux0 >> (8 * l)) & 255]
        s7 = (aux1 >> (7 * l)) & 127
        s8 = s7 | ((bin(s7).count("1") & 1) << 7)
        codes += [(-1.0 if (s8 >> kk) & 1 else 1.0) * float(g[kk]) for kk in range(8)]
    return codes, [a], None


def decode32_q8_0r(planes, r, k0, slab_rows, cols):
    """MgQ8_0R: q8r_row (slab r // slab_rows: qs int8 [S, cols] then d f16 [S, cols / 32]), 2 chunks of 16."""
    nblk = cols // 32
    flat = planes.reshape(-1)
    slab, lr = divmod(r, slab_rows)
    sb = slab * slab_rows * 34 * nblk
    qs = sb + lr * 32 * nblk
    d_at = sb + slab_rows * 32 * nblk + 2 * lr * nblk
    codes = []
    for c in range(2):
        codes += [float(np.int8(v)) for v in flat[qs + 16 * ((k0 >> 4) + c):][:16]]
    return codes, [_h(_u16(flat, d_at + 2 * (k0 >> 5)))], None


DECODERS = {T.Q8_0: decode32_q8_0, T.Q2_K: decode32_q2_k, T.Q4_K: decode32_q4_k, T.IQ2_XXS: decode32_iq2_xxs}


def _check_row(got, sp, r, tag):
    """got: decode32 results for k0 = 0, 32, ...; sp: emul.split of the matrix; equal codes, scales and mins."""
    codes, a, m, sb = sp
    nsb = BK // sb
    np.testing.assert_array_equal(np.concatenate([g[0] for g in got]), codes[r], err_msg=tag)
    np.testing.assert_array_equal(np.concatenate([g[1] for g in got]), a[r], err_msg=tag)
    if m is None:
        assert all(g[2] is None for g in got), tag
    else:
        np.testing.assert_array_equal(np.concatenate([g[2] for g in got]), m[r], err_msg=tag)
    assert all(len(g[1]) == nsb for g in got), tag


@pytest.mark.parametrize("qtype", list(DECODERS), ids=lambda t: t.name)
def test_tile_decoder_index_math(qtype, rng):
    cols = 512
    raw = Q.random_blocks(qtype, (3, cols), rng, 0.3)
    sp = emul.split(raw, qtype, 3, cols)
    for r in range(3):
        row = raw[r].view(np.uint8)
        _check_row([DECODERS[qtype](row, k0) for k0 in range(0, cols, BK)], sp, r, f"{qtype.name} row {r}")
    assert np.abs(sp[0]).max() <= 128 and np.array_equal(sp[0], np.round(sp[0]))   # integers, exact in fp16


@pytest.mark.parametrize("slab_rows", [6, 2])
def test_q8_0r_tile_decoder_index_math(slab_rows, rng):
    from ds4cupy.engines.cuda.q8_0r import repack_q8_0_np
    rows, cols = 6, 256
    raw = Q.random_blocks(T.Q8_0, (rows, cols), rng, 0.3)
    sp = emul.split(raw, T.Q8_0, rows, cols)
    planes = repack_q8_0_np(raw, slab_rows)
    for r in range(rows):
        _check_row([decode32_q8_0r(planes, r, k0, slab_rows, cols) for k0 in range(0, cols, BK)], sp, r, f"row {r}")


@pytest.mark.parametrize("qtype", list(DECODERS), ids=lambda t: t.name)
def test_split_is_the_dequantized_matrix(qtype, rng):
    """codes * a - m (float32 FMA-free products: a and m exact, codes small integers) == quants.dequantize."""
    raw = Q.random_blocks(qtype, (4, 512), rng, 0.3)
    np.testing.assert_allclose(emul.dequantized(emul.split(raw, qtype, 4, 512)),
                               Q.dequantize(raw, qtype, (4, 512)).astype(np.float64), rtol=2 ** -23, atol=0)


def test_iq2_grid_bytes_are_what_the_decoder_reads():
    g = Q.iq2xxs_grid()
    assert g.shape == (256, 8) and set(np.unique(g)) <= {8, 25, 43}


# ---- numerics ------------------------------------------------------------------------------------------------------
# float32-level: the kernels' products (moe_grouped_emul.product) against float64 products of the dequantized
# weights. What remains is float32 accumulation over cols / SB sub-blocks plus 2^-21 of the activations: ~1e-7..1e-6
# of the norm; RTOL = 2e-5 is the bound tests/test_gpu_moe_grouped.py holds the kernels to. The old fp16 operands
# (~4e-4) and a lost lo term (hi alone: 11 bits truncated, ~3e-4) must exceed it 4x (a tolerance that tells them apart).
RTOL = 2e-5


def _rel(y, ref):
    return float(np.linalg.norm(np.asarray(y, np.float64) - ref) / np.linalg.norm(ref))


@pytest.mark.parametrize("qtype", list(DECODERS), ids=lambda t: t.name)
@pytest.mark.parametrize("scale", [1.0, 1e6, 1e-7])
def test_emulated_numerics_are_float32_level(qtype, scale, rng):
    rows, cols, n = 48, 1024, 40
    raw = Q.random_blocks(qtype, (rows, cols), rng, 0.05)
    sp = emul.split(raw, qtype, rows, cols)
    w = Q.dequantize(raw, qtype, (rows, cols)).astype(np.float64)
    x = (rng.standard_normal((n, cols)) * scale).astype(np.float32)
    x[0, :32] = 0.0                                     # an all-zero block: scale clamp, no NaN
    ref = x.astype(np.float64) @ w.T
    err = _rel(emul.product(x, sp), ref)
    assert err <= RTOL / 4, f"{qtype.name} scale {scale}: {err:.1e}"
    if scale == 1.0:                                    # fp16 range: the old path and a lost lo term are visible
        assert _rel(emul.product(x, sp, "fp16"), ref) > 4 * RTOL
        assert _rel(emul.product(x, sp, "hi"), ref) > 4 * RTOL


# ---- tile table, argument checks ----------------------------------------------------------------------
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
    with pytest.raises(ValueError, match="multiple of 32, got 80"):
        mg._check_reduction(T.Q8_0, 80, "x")
    mg._check_reduction(T.Q8_0, 96, "x")
    mg._check_reduction(Q8_0R(64), 96, "x")
