"""CPU checks of the tensor-core prefill kernel (kernels/matmul_mma.cu) that need no GPU: quant_ops.use_mma's
dispatch rule, and a NumPy emulation of the kernel's arithmetic and lane mapping: the int8 -> fp16 byte trick,
the activations' power-of-two scale and hi + lo fp16 split, and the ldmatrix addresses / mma.m16n8k16 fragments /
epilogue indices of all 8 warps of a CTA over one 32-column step, with fragment layouts as the PTX ISA defines them
(not as the kernel uses them). The formulas mirrored here are the kernel's; a change there must change them here.
"""
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from ds4cupy.engines.cuda import quant_ops as qo
from ds4cupy.engines.cuda.q8_0r import Q8_0R


# ---- dispatch ----------------------------------------------------------------------------------------------------
def test_use_mma_rule(monkeypatch):
    assert qo.MMA_MIN_TOKENS == 16
    monkeypatch.delenv("DS4CUPY_PREFILL_MMA", raising=False)   # on by default since its H200 run (switches.py)
    assert qo.use_mma(T.Q8_0, 2048, capability=90)
    monkeypatch.setenv("DS4CUPY_PREFILL_MMA", "0")
    assert not qo.use_mma(T.Q8_0, 2048, capability=90)
    monkeypatch.setenv("DS4CUPY_PREFILL_MMA", "1")            # switched on: the rule below
    for t in (T.Q8_0, T.F16, Q8_0R(64), "Q8_0", "F16"):
        assert qo.use_mma(t, 16, capability=90)
        assert qo.use_mma(t, 2048, capability=121)
        assert not qo.use_mma(t, 15, capability=90)        # few tokens: matmul.cu
        assert not qo.use_mma(t, 512, capability=75)       # no mma.sync f16 m16n8k16 before sm_80
    for t in (T.BF16, T.F32, T.Q4_K, T.Q2_K, T.IQ2_XXS):
        assert not qo.use_mma(t, 2048, capability=90), t.name


# ---- element conversions ------------------------------------------------------------------------------------------
def byte_perm(x: int, y: int, sel: int) -> int:
    """CUDA __byte_perm (selector nibbles 0..7, no sign replication)."""
    src = [(x >> (8 * i)) & 255 for i in range(4)] + [(y >> (8 * i)) & 255 for i in range(4)]
    return sum(src[(sel >> (4 * k)) & 7] << (8 * k) for k in range(4))


def s8x2_to_f16x2(w: int, sel: int) -> np.ndarray:
    """matmul_mma.cu s8x2_to_f16x2 on w ^ 0x80808080: two fp16 (low half first)."""
    h = byte_perm(w ^ 0x80808080, 0x64646464, sel)
    pair = np.array([h & 0xFFFF, h >> 16], np.uint16).view(np.float16)
    return pair - np.float16(1152.0)      # sub.f16x2 (exact here: integer results)


def test_int8_to_fp16_is_exact_and_in_order():
    vals = np.arange(-128, 128, dtype=np.int8)
    for k in range(0, 256, 4):
        b = vals[k:k + 4]
        w = int(b.view(np.uint8).astype(np.uint32) @ (1 << (8 * np.arange(4, dtype=np.uint32))))
        got = np.concatenate([s8x2_to_f16x2(w, 0x4140), s8x2_to_f16x2(w, 0x4342)])
        np.testing.assert_array_equal(got.astype(np.float64), b.astype(np.float64))


def split_block(xb: np.ndarray):
    """matmul_mma.cu mma_store_x for one 32-column block of one token: (s, hi fp16, lo fp16)."""
    xb = xb.astype(np.float32)
    amax = np.float32(np.abs(xb).max())
    e = int((amax.view(np.uint32) >> 23) & 0xFF)
    e = min(max(e, 15), 254)
    inv = np.uint32((268 - e) << 23).view(np.float32)
    s = np.uint32((e - 14) << 23).view(np.float32)
    v = (xb * inv).astype(np.float32)
    hi = (v.view(np.uint32) & np.uint32(0xFFFFE000)).view(np.float32)
    lo = (v - hi).astype(np.float32)
    return s, hi.astype(np.float16), lo.astype(np.float16), hi


@pytest.mark.parametrize("scale", [1.0, 1e6, 1e30, 1e-7, 1e-30])
def test_activation_split_is_exact_to_2_21(scale, rng):
    x = (rng.standard_normal((64, 32)) * scale).astype(np.float32)
    x[3] = 0.0
    x[5, :31] = 0.0                      # one nonzero element
    x[7] *= np.float32(1e-20)            # a block far below the others (own scale)
    for row in x:
        s, hi, lo, hi32 = split_block(row)
        assert np.isfinite(hi).all() and np.isfinite(lo).all()
        assert np.abs(hi.astype(np.float32)).max() < 2 ** 15 + 1        # far from 65504
        small = np.abs(hi32) < 2.0 ** -14                                # fp16 subnormals: not exact, negligible
        np.testing.assert_array_equal(hi.astype(np.float32)[~small], hi32[~small])
        back = (hi.astype(np.float64) + lo.astype(np.float64)) * float(s)
        amax = float(np.abs(row).max())
        assert np.abs(back - row).max() <= 2.0 ** -21 * amax, (scale, amax)


# ---- ldmatrix / mma fragments / epilogue of one CTA step ----------------------------------------------------------
def ldsm_x4(M: np.ndarray, addr) -> np.ndarray:
    """ldmatrix.x4 on a 2-D array of 16-bit values: lane 8 i + r supplies row r of matrix i (addr(lane) = (row, col));
    register i of lane l = the pair at matrix i's row l / 4, columns 2 (l % 4), +1. Returns [32 lanes, 4 regs, 2]."""
    out = np.empty((32, 4, 2))
    for lane in range(32):
        for i in range(4):
            r, c = addr(8 * i + (lane >> 2))
            c += 2 * (lane & 3)
            out[lane, i] = M[r, c:c + 2]
    return out


def mma_16816(a: np.ndarray, b0: np.ndarray, b1: np.ndarray) -> np.ndarray:
    """mma.m16n8k16.row.col per the PTX ISA fragment layouts: a [32, 4, 2], b0/b1 [32, 2] -> c [32, 4]."""
    A, B = np.zeros((16, 16)), np.zeros((16, 8))
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        A[g, 2 * t:2 * t + 2] = a[lane, 0]
        A[g + 8, 2 * t:2 * t + 2] = a[lane, 1]
        A[g, 2 * t + 8:2 * t + 10] = a[lane, 2]
        A[g + 8, 2 * t + 8:2 * t + 10] = a[lane, 3]
        B[2 * t:2 * t + 2, g] = b0[lane]
        B[2 * t + 8:2 * t + 10, g] = b1[lane]
    C = A @ B
    c = np.empty((32, 4))
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        c[lane] = [C[g, 2 * t], C[g, 2 * t + 1], C[g + 8, 2 * t], C[g + 8, 2 * t + 1]]
    return c


def cta_step(Xh, Xl, Ws, xsc, dsc) -> np.ndarray:
    """One 32-column step of mma_matmul_body for the whole CTA (8 warps), as the kernel indexes it; returns the
    [128 tokens, 128 rows] tile the epilogue writes."""
    Y = np.full((128, 128), np.nan)
    for warp in range(8):
        wm, wn = (warp & 1) * 64, (warp >> 1) * 32

        def a_addr(i, k):
            def f(lane):
                q, qr = lane >> 3, lane & 7
                return wm + qr + 8 * (q & 1) + 16 * i, 8 * (q >> 1) + k
            return f

        b = [ldsm_x4(Ws, lambda lane, j=j: (wn + 8 * j + (lane & 7), 8 * (lane >> 3))) for j in range(4)]
        acc = np.zeros((4, 4, 32, 4))
        for i in range(4):
            ah0, ah1 = ldsm_x4(Xh, a_addr(i, 0)), ldsm_x4(Xh, a_addr(i, 16))
            al0, al1 = ldsm_x4(Xl, a_addr(i, 0)), ldsm_x4(Xl, a_addr(i, 16))
            for j in range(4):
                p = (mma_16816(ah0, b[j][:, 0], b[j][:, 1]) + mma_16816(al0, b[j][:, 0], b[j][:, 1])
                     + mma_16816(ah1, b[j][:, 2], b[j][:, 3]) + mma_16816(al1, b[j][:, 2], b[j][:, 3]))
                for lane in range(32):
                    gq, tq = lane >> 2, lane & 3
                    s0, s1 = xsc[wm + 16 * i + gq], xsc[wm + 16 * i + gq + 8]
                    d0, d1 = dsc[wn + 8 * j + 2 * tq], dsc[wn + 8 * j + 2 * tq + 1]
                    acc[i, j, lane] += [s0 * d0 * p[lane, 0], s0 * d1 * p[lane, 1], s1 * d0 * p[lane, 2],
                                        s1 * d1 * p[lane, 3]]
        for i in range(4):
            for hh in range(2):
                for j in range(4):
                    for lane in range(32):
                        gq, tq = lane >> 2, lane & 3
                        t, r = wm + 16 * i + gq + 8 * hh, wn + 8 * j + 2 * tq
                        Y[t, r] = acc[i, j, lane, 2 * hh]
                        Y[t, r + 1] = acc[i, j, lane, 2 * hh + 1]
    return Y


def test_fragment_mapping_covers_the_tile(rng):
    """Every (token, row) of the 128 x 128 tile is written exactly with sum_k s_t (hi + lo)[t, k] d_r q[r, k]."""
    x = rng.standard_normal((128, 32)).astype(np.float32) * rng.choice([1e-3, 1.0, 1e4], size=(128, 1))
    q = rng.integers(-127, 128, (128, 32)).astype(np.float64)
    d = rng.uniform(0.001, 0.01, 128)
    Xh, Xl, xsc = np.zeros((128, 40)), np.zeros((128, 40)), np.zeros(128)
    for t in range(128):
        s, hi, lo, _ = split_block(x[t])
        Xh[t, :32], Xl[t, :32], xsc[t] = hi, lo, s
    Ws = np.zeros((128, 40))
    Ws[:, :32] = q
    Y = cta_step(Xh, Xl, Ws, xsc, d)
    ref = x.astype(np.float64) @ (q * d[:, None]).T
    assert not np.isnan(Y).any()
    np.testing.assert_allclose(Y, ref, rtol=0, atol=2.0 ** -20 * np.abs(ref).max())
