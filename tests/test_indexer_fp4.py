"""Switch INDEXER_FP4 on the CPU: the packed FP4 row format (numerics.fp4_pack / fp4_unpack, the NumPy model of
kernels/common.cuh "packed FP4 rows"), the prmt expansion of the codes to int8 that indexer_scores_fp4 does (emulated
bit by bit), the exact integer block dot product it builds on, and the KV layout's packed indexer rows. The kernels'
compilation for every target is tests/test_kernel_compile.py's; their GPU tests are tests/test_gpu_indexer_fp4.py."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from ds4cupy.engines import numerics as nm

KERNELS = Path(__file__).resolve().parents[1] / "ds4cupy" / "kernels"


def _fp4_rows(rng, rows, c, spread=20):
    """fp4_sim'd Hadamard-rotated Gaussian rows at per-row scales 2^[-spread, spread), plus special rows."""
    x = rng.standard_normal((rows, c)).astype(np.float32) * np.exp2(rng.integers(-spread, spread, (rows, 1)))
    x = nm.fp4_sim(nm.hadamard(x.astype(np.float32)))
    x[0] = 0.0                                     # all-zero blocks (exponent -126)
    x[1, :7] = -0.0                                # negative zeros must survive
    x[2] = nm.fp4_sim(rng.standard_normal(c).astype(np.float32) * np.float32(2.0 ** -125))   # subnormal values
    x[3] = nm.fp4_sim(rng.standard_normal(c).astype(np.float32) * np.float32(2.0 ** 120))
    return x


@pytest.mark.parametrize("c", [32, 64, 128])
def test_pack_round_trips_fp4_sim_rows_bit_exactly(rng, c):
    x = _fp4_rows(rng, 257, c)
    p = nm.fp4_pack(x)
    assert p.dtype == np.uint8 and p.shape == (257, nm.fp4_row_bytes(c))
    y = nm.fp4_unpack(p, c)
    np.testing.assert_array_equal(y.view(np.uint32), x.view(np.uint32))      # bits: -0.0 and subnormals included
    assert np.all(p[:, c // 2 + c // 32:] == 0)                               # the padding
    e = p[:, c // 2: c // 2 + c // 32].view(np.int8)
    assert e.min() >= -126 and e.max() <= 126
    # a leading batch axis is kept
    np.testing.assert_array_equal(nm.fp4_unpack(nm.fp4_pack(x.reshape(1, 257, c)), c)[0], x)


def test_pack_rejects_rows_that_are_not_fp4_sim_output(rng):
    x = rng.standard_normal((4, 128)).astype(np.float32)
    with pytest.raises(ValueError, match="not fp4_sim output"):
        nm.fp4_pack(x)
    with pytest.raises(ValueError, match="multiple of 32"):
        nm.fp4_pack(np.zeros((2, 48), np.float32))


def test_pack_is_fp4_sims_own_exponent_or_an_equivalent_one(rng):
    """The block exponent the pack stores is recomputed from the rounded values: it is fp4_sim's or smaller, and the
    codes under it are the same values (fp4_sim is idempotent)."""
    x = _fp4_rows(rng, 500, 128, spread=4)
    np.testing.assert_array_equal(nm.fp4_sim(x), x)
    raw = rng.standard_normal((500, 128)).astype(np.float32)
    xb = raw.reshape(500, 4, 32).astype(np.float64)
    e_sim = np.ceil(np.log2(np.maximum(np.abs(xb).max(-1), 6 * 2.0 ** -126) / 6))
    e_pack = nm.fp4_pack(nm.fp4_sim(raw))[:, 64:68].view(np.int8)
    assert np.all(e_pack <= e_sim) and np.all(e_pack >= e_sim - 2)


def test_row_bytes_agree_everywhere():
    from ds4cupy.memory import budget
    text = (KERNELS / "common.cuh").read_text()
    m = re.search(r"#define FP4_ROW_BYTES\(c\) (.+)", text)
    macro = m.group(1).replace("(c)", "c").replace("& ~3", "& -4").replace("/", "//")
    for c in (32, 64, 128, 256):
        assert nm.fp4_row_bytes(c) == budget.fp4_row_bytes(c) == eval(macro, {"c": c}), c   # noqa: S307
        assert nm.fp4_row_bytes(c) % 4 == 0 and 32 * nm.fp4_row_bytes(c) % 16 == 0
    assert nm.fp4_row_bytes(128) == 68


def _prmt(a: int, b: int, sel: int) -> int:
    """PTX prmt.b32 default mode: byte n of the result = byte (sel nibble n & 7) of {b, a}; nibble bit 3 set: that
    byte's sign bit replicated."""
    src = (b << 32) | a
    out = 0
    for n in range(4):
        s = (sel >> (4 * n)) & 15
        byte = (src >> (8 * (s & 7))) & 255
        if s & 8:
            byte = 255 if byte & 128 else 0
        out |= byte << (8 * n)
    return out


def _expand8(w: int) -> list[int]:
    """common.cuh fp4_expand8, step by step: eight codes -> eight signed int8."""
    text = (KERNELS / "common.cuh").read_text()
    lo_t = int(re.search(r"#define FP4_MAG2_LO 0x([0-9a-fA-F]{8})u", text).group(1), 16)
    hi_t = int(re.search(r"#define FP4_MAG2_HI 0x([0-9a-fA-F]{8})u", text).group(1), 16)
    out = []
    for half in (w & 0xFFFF, w >> 16):
        pos, neg = _prmt(lo_t, hi_t, half), _prmt(lo_t, hi_t, half ^ 0x8888)
        r = (((pos | 0x80808080) - neg) & 0xFFFFFFFF) ^ 0x80808080
        out += [int(np.int8(np.uint8((r >> (8 * n)) & 255))) for n in range(4)]
    return out


def test_prmt_expansion_gives_twice_the_e2m1_value(rng):
    """Every code in every nibble position, and random words: byte n = 2 * e2m1 value of code n (signed)."""
    want = [int(2 * v) for v in nm._E2M1] + [int(-2 * v) for v in nm._E2M1]
    words = [sum(((code + n) % 16) << (4 * n) for n in range(8)) for code in range(16)]
    words += [int(w) for w in rng.integers(0, 2 ** 32, 200, dtype=np.uint64)]
    for w in words:
        got = _expand8(w)
        assert got == [want[(w >> (4 * n)) & 15] for n in range(8)], hex(w)


def test_block_integer_dot_is_the_exact_dot(rng):
    """The arithmetic of indexer_scores_fp4 on packed q and k: per block the int32 sum of (2g_q)(2g_k) times
    2^(eq + ek - 2) equals the float64 dot of the blocks exactly; within a block |sum| <= 32 * 144."""
    c = 128
    q, k = _fp4_rows(rng, 64, c, 6), _fp4_rows(rng, 64, c, 6)
    pq, pk = nm.fp4_pack(q), nm.fp4_pack(k)

    def ints(p):
        code = np.empty((p.shape[0], c), np.uint8)
        code[:, 0::2], code[:, 1::2] = p[:, :64] & 15, p[:, :64] >> 4
        m2 = np.array([0, 1, 2, 3, 4, 6, 8, 12], np.int64)[code & 7]
        return np.where(code & 8, -m2, m2).reshape(-1, 4, 32), p[:, 64:68].view(np.int8).astype(np.int64)
    iq, eq = ints(pq)
    ik, ek = ints(pk)
    s = np.einsum("hbi,sbi->hsb", iq, ik)
    assert np.abs(s).max() <= 32 * 144
    terms = s * np.exp2(eq[:, None, :] + ek[None, :, :] - 2.0)
    exact = np.einsum("hbi,sbi->hsb", q.astype(np.float64).reshape(-1, 4, 32), k.astype(np.float64).reshape(-1, 4, 32))
    np.testing.assert_array_equal(terms, exact)


def test_kv_layout_packs_the_indexer_rows_only_when_asked():
    from ds4cupy.format.config import ModelConfig
    from ds4cupy.memory.budget import kv_bytes_per_token, kv_fixed_bytes, kv_layout
    cfg = ModelConfig.flash()
    ctx = 1 << 20
    plain = {(b.layer, b.name): b for b in kv_layout(cfg, ctx)}
    packed = {(b.layer, b.name): b for b in kv_layout(cfg, ctx, index_fp4=True)}
    assert plain.keys() == packed.keys()
    n_csa = 0
    for key, b in plain.items():
        if key[1] == "index":
            n_csa += 1
            assert b.shape == (ctx // 4 + 2, 128) and b.dtype == np.float32
            assert packed[key].shape == (ctx // 4 + 2, 68) and packed[key].dtype == np.uint8
        else:
            assert packed[key] == b
    assert n_csa == 21
    assert kv_bytes_per_token(cfg) == 13760 and kv_bytes_per_token(cfg, True) == 13760 - 21 * (128 - 17)
    total = sum(b.nbytes for b in packed.values())
    assert abs(kv_fixed_bytes(cfg, ctx, index_fp4=True) + kv_bytes_per_token(cfg, True) * ctx - total) <= 1
    assert sum(b.nbytes for b in plain.values()) - total == 21 * (ctx // 4 + 2) * (512 - 68)


# ---- indexer_scores_fp4, emulated statement by statement (thread loops between barriers, the same shared-memory byte
# addresses, swizzle, tail fetch, prmt expansion, integer block sums, float32 combine and head sum). Slow: tiny sizes.
F32 = np.float32
IDX_TR, IDX_MAXH = 32, 64


def fp4_scale_exp(amax):
    a = max(float(amax), 6.0 * 2.0 ** -126)
    m, e = np.frexp(a / 6.0)
    return int(e - 1 if m == 0.5 else e)

def fp4_code(x, e):
    v = min(abs(np.ldexp(float(x), -e)), 6.0)
    a = float(nm.e2m1_round(np.array([v]))[0])
    m2 = int(2.0 * a)
    idx = m2 if m2 <= 4 else (5 if m2 == 6 else (6 if m2 == 8 else 7))
    return idx | (8 if np.signbit(x) else 0)

def rowbytes(c): return c // 2 + ((c // 32 + 3) & ~3)

def fp4_term(s, e):
    if -126 <= e <= 127:
        return F32(F32(s) * F32(np.ldexp(1.0, e)))
    return F32(np.ldexp(np.float64(F32(s)), e))

def _emulate_scores_fp4(q, wts, kbytes, pos0, HI, c, ratio, wscale, scores, stride, nblk):
    S = q.shape[0]
    kflat = kbytes.reshape(-1)
    for t in range(S):
        P = pos0 + t; nvis = (P + 1) // ratio; ntiles = (nvis + IDX_TR - 1) // IDX_TR
        for bx in range(nblk):
            if bx >= ntiles: continue
            nb, nslot = c >> 5, c >> 4; smask = nslot - 1; rb_ = rowbytes(c); tile16 = IDX_TR * rb_ // 16
            qs8 = np.zeros(IDX_MAXH * 8 * 16, np.int8); qe = np.zeros((64, 4), np.int64)
            for hb in range(IDX_MAXH * nb):
                h, b = hb // nb, hb % nb
                xs = [q[t, h, b * 32 + l] if h < HI else F32(0) for l in range(32)]
                e = fp4_scale_exp(max(abs(x) for x in xs))
                for lane in range(32):
                    code = fp4_code(xs[lane], e)
                    m2 = [0, 1, 2, 3, 4, 6, 8, 12][code & 7]
                    i = b * 32 + lane
                    qs8[(h * nslot + ((i >> 4) ^ (h & smask))) * 16 + (i & 15)] = -m2 if code & 8 else m2
                qe[h, b] = e - 1 if h < HI else 0
            w = np.zeros((16, 4), F32)
            for th in range(16):
                for j in range(4):
                    h = th + 16 * j
                    w[th, j] = F32(wts[t, h] * F32(wscale)) if h < HI else F32(0)
            def fetch(tile):
                out = np.zeros((256, 16), np.uint8)
                if tile >= ntiles: return out
                r0 = tile * IDX_TR; nbytes = min(IDX_TR, nvis - r0) * rb_
                for tid in range(tile16):
                    at = r0 * rb_ // 16 + tid
                    if (tid + 1) * 16 <= nbytes: out[tid] = kflat[16 * at: 16 * at + 16]
                    elif tid * 16 < nbytes:
                        nw = (nbytes - tid * 16) >> 2
                        out[tid, :4 * nw] = kflat[16 * at: 16 * at + 4 * nw]
                return out
            nxt = fetch(bx)
            tile = bx
            while tile < ntiles:
                r0 = tile * IDX_TR
                kraw = nxt[:tile16].reshape(-1).copy()
                nxt = fetch(tile + nblk)
                ks8 = np.zeros(IDX_TR * 8 * 16, np.int8)
                for i in range(IDX_TR * (c >> 3)):
                    r, j = i // (c >> 3), i % (c >> 3)
                    wd = int(kraw[r * rb_ + 4 * j: r * rb_ + 4 * j + 4].view(np.uint32)[0])
                    vals = _expand8(wd)
                    base = (r * nslot + (((8 * j) >> 4) ^ (r & smask))) * 16 + (j & 1) * 8
                    ks8[base: base + 8] = vals
                ke = np.zeros((32, 4), np.int64)
                for i in range(IDX_TR * nb):
                    r, b = i // nb, i % nb
                    ke[r, b] = int(kraw[r * rb_ + c // 2 + b].view(np.int8)) - 1
                sa_all = np.zeros((16, 16), F32); sb_all = np.zeros((16, 16), F32)
                for tr in range(16):
                    for th in range(16):
                        ra, rb = 2 * tr, 2 * tr + 1
                        acc = np.zeros((2, 4), F32)
                        for b in range(nb):
                            isum = np.zeros((2, 4), np.int64)
                            for hh in range(2):
                                f = 2 * b + hh
                                ka = ks8[(ra * nslot + (f ^ (ra & smask))) * 16:][:16].astype(np.int64)
                                kb = ks8[(rb * nslot + (f ^ (rb & smask))) * 16:][:16].astype(np.int64)
                                for j in range(4):
                                    h = th + 16 * j
                                    qv = qs8[(h * nslot + (f ^ (h & smask))) * 16:][:16].astype(np.int64)
                                    isum[0, j] += int(qv @ ka); isum[1, j] += int(qv @ kb)
                            for j in range(4):
                                eq = qe[th + 16 * j, b]
                                acc[0, j] = F32(acc[0, j] + fp4_term(isum[0, j], eq + ke[ra, b]))
                                acc[1, j] = F32(acc[1, j] + fp4_term(isum[1, j], eq + ke[rb, b]))
                        sa = F32(0); sb = F32(0)
                        for j in range(4):
                            sa = F32(np.float64(w[th, j]) * max(acc[0, j], F32(0)) + np.float64(sa))
                            sb = F32(np.float64(w[th, j]) * max(acc[1, j], F32(0)) + np.float64(sb))
                        sa_all[tr, th] = sa; sb_all[tr, th] = sb
                for o in (8, 4, 2, 1):
                    sa_all = (sa_all + sa_all[:, np.arange(16) ^ o]).astype(F32)
                    sb_all = (sb_all + sb_all[:, np.arange(16) ^ o]).astype(F32)
                for tr in range(16):
                    if r0 + 2 * tr < nvis: scores[t, r0 + 2 * tr] = sa_all[tr, 0]
                    if r0 + 2 * tr + 1 < nvis: scores[t, r0 + 2 * tr + 1] = sb_all[tr, 0]
                tile += nblk


@pytest.mark.parametrize("HI,c,S,p0,N,nblk,fp4_q", [(4, 64, 2, 205, 60, 2, True), (64, 128, 1, 150, 40, 1, True),
                                                     (5, 32, 1, 99, 26, 3, False)])
def test_emulated_kernel_matches_float64(rng, HI, c, S, p0, N, nblk, fp4_q):
    """The emulated kernel on packed keys: every visible score within 16 roundings of float64 of the exact
    fp4_sim(q) . k sums (tests/test_gpu_indexer_fp4.py's bound), nothing written past nvis; a q that is not fp4_sim
    output is scored as fp4_sim(q)."""
    q = nm.hadamard(rng.standard_normal((S, HI, c)).astype(F32))
    if fp4_q:
        q = nm.fp4_sim(q)
    k = nm.fp4_sim(nm.hadamard(rng.standard_normal((N, c)).astype(F32)))
    wts = rng.standard_normal((S, HI)).astype(F32)
    wscale = c ** -0.5 * HI ** -0.5
    sc = np.full((S, N), np.nan, F32)
    _emulate_scores_fp4(q, wts, nm.fp4_pack(k), p0, HI, c, 4, wscale, sc, N, nblk)
    w = (wts * F32(wscale)).astype(np.float64)
    terms = np.einsum("shbi,nbi->shnb", nm.fp4_sim(q).astype(np.float64).reshape(S, HI, c // 32, 32),
                      k.astype(np.float64).reshape(N, c // 32, 32))
    ref = np.einsum("sh,shn->sn", w, np.maximum(terms.sum(-1), 0.0))
    scale = np.einsum("sh,shn->sn", np.abs(w), np.abs(terms).sum(-1))
    for t in range(S):
        nv = (p0 + t + 1) // 4
        assert np.isnan(sc[t, nv:]).all()
        assert np.all(np.abs(sc[t, :nv] - ref[t, :nv]) <= 16 * 2.0 ** -24 * scale[t, :nv] + 1e-45)
