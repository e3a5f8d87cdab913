"""The small numerical building blocks of DeepSeek-V4, in NumPy: norms, RoPE tables, FP8/FP4 rounding, Hadamard,
the mHC Sinkhorn split. The reference forward (`ds4cupy.engines.reference`) is written with these, and the CUDA kernel tests
compare against them. Every function follows docs/model.md (sections cited per function) and works on float32
arrays of any leading shape unless it says otherwise.
"""
from __future__ import annotations

import math

import numpy as np

F32 = np.float32


def rms_norm(x: np.ndarray, weight: np.ndarray | None = None, eps: float = 1e-6) -> np.ndarray:
    """x * (mean(x^2) + eps)^-1/2 over the last axis, then * weight (model.md §2, RMSNorm)."""
    x = np.asarray(x, dtype=F32)
    ms = np.mean(np.square(x, dtype=np.float64), axis=-1, keepdims=True)
    y = (x * (1.0 / np.sqrt(ms + eps))).astype(F32)
    return y if weight is None else (y * weight).astype(F32)


def silu(x: np.ndarray) -> np.ndarray:
    return (x / (1.0 + np.exp(-x.astype(np.float64)))).astype(F32)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))).astype(F32)


def softplus(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return (np.maximum(x, 0) + np.log1p(np.exp(-np.abs(x)))).astype(F32)


# ---- RoPE (model.md §2.3) --------------------------------------------------------------------------------------------
def rope_freqs(n_rot: int, base: float, yarn: tuple[float, int, float, float] | None = None) -> np.ndarray:
    """Per-pair angular frequencies [n_rot/2] (float64). yarn = (factor, original_ctx, beta_fast, beta_slow) or None.

    YaRN blends f/factor and f with a linear ramp between the correction dims of beta_fast and beta_slow; there is no
    magnitude scaling (cos and sin stay unit).
    """
    half = n_rot // 2
    f = base ** (-np.arange(0, n_rot, 2, dtype=np.float64) / n_rot)
    if yarn is None:
        return f
    factor, orig, beta_fast, beta_slow = yarn

    def corr_dim(rot: float) -> float:
        return n_rot * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(corr_dim(beta_fast)), 0)
    high = min(math.ceil(corr_dim(beta_slow)), n_rot - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(half, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    return f / factor * ramp + f * (1.0 - ramp)


def rope_cos_sin(freqs: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin of positions[:, None] * freqs[None, :], float32 [len(positions), n_rot/2]."""
    ang = np.asarray(positions, dtype=np.float64)[:, None] * freqs[None, :]
    return np.cos(ang).astype(F32), np.sin(ang).astype(F32)


def rope_apply(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, inverse: bool = False) -> np.ndarray:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of the LAST 2*len(cos[-1]) dims of x.

    x: [S, ..., d]; cos/sin: [S, n_rot/2], broadcast over the middle axes. inverse=True rotates by -angle
    (the conjugate rotation applied to the attention output). Returns a new array.
    """
    n_rot = 2 * cos.shape[-1]
    y = np.array(x, dtype=F32, copy=True)
    shape = (cos.shape[0],) + (1,) * (x.ndim - 2) + (cos.shape[-1],)
    c, s = cos.reshape(shape), sin.reshape(shape)
    if inverse:
        s = -s
    a = x[..., -n_rot::2].astype(F32)
    b = x[..., -n_rot + 1::2].astype(F32)
    y[..., -n_rot::2] = a * c - b * s
    y[..., -n_rot + 1::2] = a * s + b * c
    return y


# ---- QAT simulation (model.md §2.7) ---------------------------------------------------------------------------------
def e4m3_round(x: np.ndarray) -> np.ndarray:
    """Round to the nearest FP8 e4m3fn value (ties to even), x already within [-448, 448]."""
    x = np.asarray(x, dtype=np.float64)
    a = np.abs(x)
    e = np.floor(np.log2(np.where(a > 0, a, 1.0)))
    e = np.maximum(e, -6.0)                        # subnormals share the 2^-6 binade's step
    step = np.exp2(e - 3.0)                        # 3 mantissa bits
    return np.round(x / step) * step               # np.round: half to even


def fp8_sim(x: np.ndarray, block: int = 64) -> np.ndarray:
    """Per block of `block` along the last axis: s = 2^ceil(log2(max(amax, 1e-4)/448)), y = e4m3(x/s)*s."""
    x = np.asarray(x, dtype=F32)
    xb = x.reshape(x.shape[:-1] + (x.shape[-1] // block, block)).astype(np.float64)
    amax = np.maximum(np.max(np.abs(xb), axis=-1, keepdims=True), 1e-4)
    s = np.exp2(np.ceil(np.log2(amax / 448.0)))
    y = e4m3_round(np.clip(xb / s, -448.0, 448.0)) * s
    return y.reshape(x.shape).astype(F32)


_E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def e2m1_round(x: np.ndarray) -> np.ndarray:
    """Round to the nearest FP4 e2m1 value {0,.5,1,1.5,2,3,4,6} (ties to the even code), x within [-6, 6]."""
    x = np.asarray(x, dtype=np.float64)
    a = np.abs(x)
    hi = np.clip(np.searchsorted(_E2M1, a, side="left"), 1, 7)   # first grid point >= a
    lo = hi - 1
    dl, dh = a - _E2M1[lo], _E2M1[hi] - a
    pick_hi = (dh < dl) | ((dh == dl) & (hi % 2 == 0))
    return np.sign(x) * np.where(pick_hi, _E2M1[hi], _E2M1[lo])


def fp4_sim(x: np.ndarray, block: int = 32) -> np.ndarray:
    """Per block: s = 2^ceil(log2(max(amax, 6*2^-126)/6)), y = e2m1(x/s)*s."""
    x = np.asarray(x, dtype=F32)
    xb = x.reshape(x.shape[:-1] + (x.shape[-1] // block, block)).astype(np.float64)
    amax = np.maximum(np.max(np.abs(xb), axis=-1, keepdims=True), 6.0 * 2.0 ** -126)
    s = np.exp2(np.ceil(np.log2(amax / 6.0)))
    y = e2m1_round(np.clip(xb / s, -6.0, 6.0)) * s
    return y.reshape(x.shape).astype(F32)


def fp4_row_bytes(c: int) -> int:
    """Bytes of one packed FP4 row of c values (fp4_pack; kernels/common.cuh FP4_ROW_BYTES): c/2 code bytes, c/32
    int8 block exponents, zero padding to a multiple of 4 (68 for c = 128)."""
    return c // 2 + (c // 32 + 3) // 4 * 4


def fp4_pack(x: np.ndarray) -> np.ndarray:
    """Lossless packed form of fp4_sim'd rows x [..., c] (c % 32 == 0) -> uint8 [..., fp4_row_bytes(c)], the layout of
    switch INDEXER_FP4's indexer cache (kernels/common.cuh "packed FP4 rows"). Per block of 32: e = the fp4_sim scale
    exponent of the block's (already rounded) amax, code = sign bit << 3 | index of |x| * 2^-e in the e2m1 grid. x must
    be fp4_sim output (ValueError otherwise): then fp4_unpack(fp4_pack(x)) == x bit for bit, -0.0 included."""
    x = np.asarray(x, dtype=F32)
    c = x.shape[-1]
    if c % 32:
        raise ValueError(f"fp4_pack: the last axis ({c}) must be a multiple of 32")
    xb = x.reshape(-1, c // 32, 32).astype(np.float64)
    amax = np.maximum(np.max(np.abs(xb), axis=-1, keepdims=True), 6.0 * 2.0 ** -126)
    e = np.ceil(np.log2(amax / 6.0)).astype(np.int64)              # [rows, nb, 1], within [-126, 126]
    g = np.abs(xb) * np.exp2(-e.astype(np.float64))
    idx = np.searchsorted(_E2M1, g)                                  # exact grid points: their index
    if np.any(idx > 7) or np.any(_E2M1[np.minimum(idx, 7)] != g):
        raise ValueError("fp4_pack: the rows are not fp4_sim output (a value is off the e2m1 grid of its block)")
    code = (idx | (np.signbit(xb) << 3)).astype(np.uint8).reshape(-1, c)
    out = np.zeros((code.shape[0], fp4_row_bytes(c)), np.uint8)
    out[:, : c // 2] = code[:, 0::2] | (code[:, 1::2] << 4)
    out[:, c // 2: c // 2 + c // 32] = e[..., 0].astype(np.int8).view(np.uint8)
    return out.reshape(x.shape[:-1] + (fp4_row_bytes(c),))


def fp4_unpack(p: np.ndarray, c: int) -> np.ndarray:
    """Inverse of fp4_pack: uint8 [..., fp4_row_bytes(c)] -> float32 [..., c]."""
    p = np.asarray(p, dtype=np.uint8)
    flat = p.reshape(-1, p.shape[-1])
    code = np.empty((flat.shape[0], c), np.uint8)
    code[:, 0::2] = flat[:, : c // 2] & 15
    code[:, 1::2] = flat[:, : c // 2] >> 4
    e = flat[:, c // 2: c // 2 + c // 32].view(np.int8).astype(np.float64)
    g = _E2M1[code & 7].reshape(-1, c // 32, 32) * np.exp2(e)[..., None]
    y = np.where((code & 8).reshape(g.shape) != 0, -g, g)
    return y.reshape(p.shape[:-1] + (c,)).astype(F32)


def hadamard(x: np.ndarray) -> np.ndarray:
    """Orthonormal Walsh-Hadamard transform (Sylvester order) over the last axis: H_n x / sqrt(n)."""
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[-1]
    y = x.reshape(-1, n).copy()
    h = 1
    while h < n:
        y = y.reshape(-1, n // (2 * h), 2, h)
        a, b = y[:, :, 0, :].copy(), y[:, :, 1, :].copy()
        y[:, :, 0, :], y[:, :, 1, :] = a + b, a - b
        h *= 2
    return (y.reshape(x.shape) / math.sqrt(n)).astype(F32)


# ---- mHC (model.md §2.2) ---------------------------------------------------------------------------------------------
def hc_split_sinkhorn(mix: np.ndarray, scale: np.ndarray, base: np.ndarray, n: int, iters: int, eps: float
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """mix [..., 2n+n*n] (already RMS-scaled) -> pre [..., n], post [..., n], comb [..., n, n] (comb[j, k]: j -> k)."""
    mix = np.asarray(mix, dtype=np.float64)
    scale = np.asarray(scale, dtype=np.float64)
    base = np.asarray(base, dtype=np.float64)
    pre = 1.0 / (1.0 + np.exp(-(mix[..., :n] * scale[0] + base[:n]))) + eps
    post = 2.0 / (1.0 + np.exp(-(mix[..., n:2 * n] * scale[1] + base[n:2 * n])))
    c = mix[..., 2 * n:].reshape(mix.shape[:-1] + (n, n)) * scale[2] + base[2 * n:].reshape(n, n)
    c = np.exp(c - c.max(axis=-1, keepdims=True))
    c = c / c.sum(axis=-1, keepdims=True) + eps
    c = c / (c.sum(axis=-2, keepdims=True) + eps)
    for _ in range(iters - 1):
        c = c / (c.sum(axis=-1, keepdims=True) + eps)
        c = c / (c.sum(axis=-2, keepdims=True) + eps)
    return pre.astype(F32), post.astype(F32), c.astype(F32)
