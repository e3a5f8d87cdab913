"""NumPy emulation of the arithmetic of kernels/moe_grouped.cu's exact path (helpers for tests/test_moe_grouped.py and
scripts/emulate_moe_grouped.py; no GPU):

- split(raw, qtype, rows, cols): a block-quantized matrix as integer codes (exact in fp16: the mma operands), a scale
  a and a min m per (row, sub-block of SB columns): dequantize == codes * a - m (SB = 16 for Q2_K, 32 otherwise);
- hilo(x): the activations' power-of-two scale per (token, 32-column k-step) and hi + lo fp16 terms;
- product(x, sp): y[t, r] as the kernel forms it: per sub-block the partial P = codes . (hi + lo) (exact products,
  float32 sum), acc = fma(a * s, P, acc), acc = fma(-m, SX, acc) with SX the float32 sum of the sub-block's x,
  sub-blocks in column order, acc in float32;
- variants "fp16" (both operands rounded to fp16, the old path) and "hi" (the lo term lost) as controls.
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T

from ds4cupy.format import quants as Q

F32, F64 = np.float32, np.float64
SUB = {T.IQ2_XXS: 32, T.Q8_0: 32, T.Q4_K: 32, T.Q2_K: 16}


def _f16(b2):
    return np.ascontiguousarray(b2).view(np.float16)[:, 0].astype(F32)


def split(raw, qtype, rows: int, cols: int):
    """(codes float64 [rows, cols], a float32 [rows, cols / SB], m float32 [rows, cols / SB] or None, SB)."""
    t = Q.qtype_of(qtype)
    block, size = Q.BLOCK_SIZES[t]
    b = np.ascontiguousarray(raw).reshape(-1).view(np.uint8).reshape(rows * cols // block, size)
    n = b.shape[0]
    m = None
    if t == T.Q8_0:
        codes = b[:, 2:].view(np.int8).astype(F64)
        a = _f16(b[:, :2])[:, None]
    elif t == T.IQ2_XXS:
        d = _f16(b[:, 0:2])
        aux = np.ascontiguousarray(b[:, 2:66]).view("<u4").reshape(n, 8, 2)
        aux0, aux1 = aux[..., 0], aux[..., 1]
        a = d[:, None] * (F32(0.5) + (aux1 >> 28).astype(F32)) * F32(0.25)              # [n, 8] (exact)
        idx = np.ascontiguousarray(aux0).view(np.uint8).reshape(n, 8, 4)
        grid = Q.iq2xxs_grid()[idx].astype(F64)
        sidx = (aux1[:, :, None] >> np.array([0, 7, 14, 21], dtype=np.uint32)) & 127
        neg = (Q._ksigns()[sidx][..., None] >> np.arange(8, dtype=np.uint8)) & 1
        codes = np.where(neg == 1, -grid, grid).reshape(n, 256)
    elif t == T.Q2_K:
        sc, qs = b[:, :16], b[:, 16:80]
        d, dmin = _f16(b[:, 80:82]), _f16(b[:, 82:84])
        a = d[:, None] * (sc & 0xF).astype(F32)
        m = dmin[:, None] * (sc >> 4).astype(F32)
        shifts = np.array([0, 2, 4, 6], dtype=np.uint8)[None, None, :, None]
        codes = ((qs.reshape(n, 2, 1, 32) >> shifts) & 3).reshape(n, 256).astype(F64)
    elif t == T.Q4_K:
        d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
        sc, mn = Q._q4_k_scales(b[:, 4:16])
        a = d[:, None] * sc.astype(F32)
        m = dmin[:, None] * mn.astype(F32)
        qs = b[:, 16:144].reshape(n, 4, 1, 32)
        codes = np.concatenate([qs & 0xF, qs >> 4], axis=2).reshape(n, 256).astype(F64)
    else:
        raise ValueError(f"no exact split for {t.name}")
    sb = SUB[t]
    a = a.reshape(rows, cols // sb)
    if m is not None:
        m = m.reshape(rows, cols // sb)
    return codes.reshape(rows, cols), a, m, sb


def dequantized(sp) -> np.ndarray:
    codes, a, m, sb = sp
    w = codes * np.repeat(a, sb, axis=1)
    return w - np.repeat(m, sb, axis=1) if m is not None else w


def hilo(x):
    """x float32 [n, cols] -> (s float32 [n, cols / 32], hi float64, lo float64): x = s * (hi + lo) to 2^-21."""
    x = np.asarray(x, F32)
    n, cols = x.shape
    xb = x.reshape(n, cols // 32, 32)
    amax = np.abs(xb).max(axis=2)
    e = np.clip((amax.view(np.uint32) >> 23) & 0xFF, 15, 254).astype(np.uint32)
    s = ((e - 14) << 23).astype(np.uint32).view(F32)                                     # 2^(E - 14)
    inv = ((268 - e) << 23).astype(np.uint32).view(F32)
    v = (xb * inv[:, :, None]).astype(F32)
    vh = (v.view(np.uint32) & np.uint32(0xFFFFE000)).view(F32)
    vl = (v - vh).astype(F32)
    hi = vh.astype(np.float16).astype(F64).reshape(n, cols)
    lo = vl.astype(np.float16).astype(F64).reshape(n, cols)
    return s, hi, lo


def product(x, sp, variant: str = "exact") -> np.ndarray:
    """float32 [n, rows] = x [n, cols] times the split matrix, as the kernel computes it (module docstring)."""
    codes, a, m, sb = sp
    x = np.asarray(x, F32)
    n, cols = x.shape
    if variant == "fp16":    # the old path: fp16(x) . fp16(w) summed in float32 (per 64 columns, as one chain)
        w16 = dequantized(sp).astype(F32).astype(np.float16).astype(F64)
        x16 = x.astype(np.float16).astype(F64)
        acc = np.zeros((n, codes.shape[0]), F32)
        for k0 in range(0, cols, 64):
            acc = (acc + x16[:, k0:k0 + 64] @ w16[:, k0:k0 + 64].T).astype(F32)
        return acc
    s, hi, lo = hilo(x)
    xr = hi + (lo if variant == "exact" else 0.0)
    acc = np.zeros((n, codes.shape[0]), F32)
    for j in range(cols // sb):
        c = slice(j * sb, j * sb + sb)
        P = (xr[:, c] @ codes[:, c].T).astype(F32)
        scale = (s[:, (j * sb) // 32][:, None] * a[None, :, j]).astype(F32)             # exact: s is a power of 2
        acc = (acc.astype(F64) + scale.astype(F64) * P.astype(F64)).astype(F32)         # fma
        if m is not None:
            SX = x[:, c].astype(F64).sum(axis=1).astype(F32)
            acc = (acc.astype(F64) - m[None, :, j].astype(F64) * SX[:, None].astype(F64)).astype(F32)
    return acc
