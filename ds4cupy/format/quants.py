"""GGUF block formats on the CPU: sizes, decoders, random valid blocks, and a few quantizers.

Every decoder here is our own vectorised NumPy code and equals `gguf.quants.dequantize` bit for bit (tests/test_quants.py
checks each type on random blocks). The GPU kernels (`ds4cupy/kernels/quant_blocks.cuh`) decode the same bytes.

Raw layouts (what `ModelFile.raw` returns, what the GPU kernels read):
- block types (Q8_0, Q2_K, Q4_K, IQ2_XXS, MXFP4, NVFP4): uint8 [*shape[:-1], row_bytes], a row being
  n_cols / elements_per_block consecutive blocks;
- F32: float32 [*shape]; F16: float16 [*shape]; BF16: uint16 [*shape] (the raw bfloat16 bits); I32: int32 [*shape].
`dequantize` also accepts any array holding the same bytes (e.g. uint8 [*shape[:-1], 2 * n_cols] for BF16).

Block structs (little endian, sizes in bytes, element order inside a block as gguf/ggml define it):
- Q8_0    (32, 34):  f16 d | int8 q[32];                          x = d * q
- Q2_K   (256, 84):  u8 scales[16] | u8 qs[64] | f16 d | f16 dmin; 16 sub-blocks of 16 elements,
                     scale byte = (m << 4) | sc, 2-bit q: element 128*h + 32*s + l is (qs[32*h + l] >> 2*s) & 3,
                     x = d*sc[e//16] * q - dmin*m[e//16]
- Q4_K  (256, 144):  f16 d | f16 dmin | u8 scales[12] (8 six-bit sc and m, packed) | u8 qs[128];
                     8 sub-blocks of 32, element 64*i + l is qs[32*i + l] & 15 (l < 32) or >> 4 (l >= 32),
                     x = d*sc[e//32] * q - dmin*m[e//32]
- IQ2_XXS (256, 66): f16 d | 8 x (u32 aux0, u32 aux1) for 8 sub-blocks of 32; aux0's bytes index an 8-value grid
                     (values 8, 25, 43), aux1 bits 7l..7l+6 index the sign pattern of group l (even parity: bit 7 =
                     popcount of the 7 bits), aux1 >> 28 = s; x = d * (0.5 + s) * 0.25 * grid * sign
- MXFP4   (32, 17):  u8 e (E8M0) | u8 qs[16]; element j is qs[j] & 15, element j + 16 is qs[j] >> 4;
                     x = e8m0_half(e) * kvalue[nibble], kvalue = doubled E2M1 {0, 1, 2, 3, 4, 6, 8, 12, -0, -1, ...}
- NVFP4   (64, 36):  u8 scales[4] (unsigned E4M3, one per 16 elements) | u8 qs[32]; sub-block s element j is
                     qs[8*s + j] & 15 (j < 8) or qs[8*s + j - 8] >> 4; x = ue4m3(scale) * 0.5 * kvalue[nibble]
"""
from __future__ import annotations

import functools
import math

import numpy as np
from gguf import GGMLQuantizationType as T

# qtype -> (elements per block, bytes per block)
BLOCK_SIZES: dict[T, tuple[int, int]] = {
    T.F32: (1, 4),
    T.F16: (1, 2),
    T.BF16: (1, 2),
    T.I32: (1, 4),
    T.Q8_0: (32, 34),
    T.Q2_K: (256, 84),
    T.Q4_K: (256, 144),
    T.IQ2_XXS: (256, 66),
    T.MXFP4: (32, 17),
    T.NVFP4: (64, 36),
}

# numpy dtype of the plain (one element per "block") types, as raw arrays hold them
PLAIN_DTYPES: dict[T, np.dtype] = {
    T.F32: np.dtype(np.float32),
    T.F16: np.dtype(np.float16),
    T.BF16: np.dtype(np.uint16),
    T.I32: np.dtype(np.int32),
}

_F16_MIN_NORMAL = 2.0 ** -14
_F16_MAX = 65504.0
_JITTER = 0.1            # per-block scale jitter: factor uniform in [1 - _JITTER, 1 + _JITTER]
_CHUNK_BLOCKS = 1 << 18  # blocks generated per step (bounds temporaries, fixes the random stream)

# doubled E2M1 values for a nibble (MXFP4, NVFP4)
FP4_KVALUES = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], dtype=np.float32)


def qtype_of(qtype) -> T:
    """GGMLQuantizationType from an enum, int or name ('Q8_0', 'q8_0'); ValueError for a type we do not handle."""
    try:
        if isinstance(qtype, str):
            t = T[qtype.upper()]
        else:
            t = T(int(qtype))
    except (KeyError, ValueError):
        raise ValueError(f"unknown GGML type {qtype!r}") from None
    if t not in BLOCK_SIZES:
        supported = ", ".join(x.name for x in BLOCK_SIZES)
        raise ValueError(f"GGML type {t.name} is not supported (supported: {supported})")
    return t


def row_bytes(qtype, n_cols: int) -> int:
    """Bytes of one row of `n_cols` elements; ValueError when n_cols is not a whole number of blocks."""
    t = qtype_of(qtype)
    block, size = BLOCK_SIZES[t]
    if n_cols <= 0 or n_cols % block:
        raise ValueError(f"{t.name}: a row of {n_cols} elements is not a positive multiple of the block of {block}")
    return n_cols // block * size


def raw_shape(qtype, shape) -> tuple[int, ...]:
    """Shape of the raw array holding a tensor of `shape` (see the module docstring)."""
    t = qtype_of(qtype)
    shape = tuple(int(s) for s in shape)
    if not shape:
        raise ValueError("a tensor shape needs at least one dimension")
    if t in PLAIN_DTYPES:
        return shape
    return shape[:-1] + (row_bytes(t, shape[-1]),)


# ---- small format helpers ------------------------------------------------------------------------------------------
def _f16(b: np.ndarray) -> np.ndarray:
    """[..., 2] uint8 -> float32 [...] through float16."""
    return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32)


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    """float values [...] -> [..., 2] uint8 of their float16."""
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32).astype(np.float16)[..., None]).view(np.uint8)


@functools.cache
def iq2xxs_grid() -> np.ndarray:
    """The IQ2_XXS grid: uint8 [256, 8] with values 8, 25 or 43 (taken from gguf.quants, the format's definition)."""
    from gguf import quants as gq
    gq.IQ2_XXS.init_grid()
    grid = np.asarray(gq.IQ2_XXS.grid, dtype=np.float32).reshape(256, 8).astype(np.uint8)
    grid.setflags(write=False)
    return grid


@functools.cache
def _ksigns() -> np.ndarray:
    """Sign byte for a 7-bit index: the 7 bits plus an 8th that makes the popcount even. uint8 [128]."""
    i = np.arange(128, dtype=np.uint8)
    parity = np.unpackbits(i[:, None], axis=1).sum(axis=1) & 1
    return (i | (parity.astype(np.uint8) << 7)).astype(np.uint8)


@functools.cache
def _ue4m3_table() -> np.ndarray:
    """float32 [256]: the NVFP4 scale byte decoded, with the 0.5 factor of the doubled kvalues (gguf convention)."""
    x = np.arange(256)
    exp = (x >> 3) & 0xF
    man = (x & 7).astype(np.float64)
    val = np.where(exp == 0, man * 2.0 ** -9, (1.0 + man / 8.0) * 2.0 ** (exp - 7.0))
    val = np.where((x == 0) | (x == 0x7F), 0.0, val * 0.5)
    return val.astype(np.float32)


def _e8m0_half(e: np.ndarray) -> np.ndarray:
    """MXFP4 shared exponent byte -> float32 2^(e - 128) (the half is folded in for the doubled kvalues)."""
    e = e.astype(np.uint32)
    bits = np.where(e < 2, np.uint32(0x00200000) << e, (e - np.uint32(1)) << np.uint32(23)).astype(np.uint32)
    return bits.view(np.float32)


# ---- decoders: blocks uint8 [n, bytes] -> float32 [n, elements] ---------------------------------------------------
def _dec_q8_0(b):
    return b[:, 2:].view(np.int8).astype(np.float32) * _f16(b[:, :2])[:, None]


def _dec_q2_k(b):
    n = b.shape[0]
    sc, qs = b[:, :16], b[:, 16:80]
    d, dmin = _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = (d[:, None] * (sc & 0xF).astype(np.float32))[:, :, None]
    ml = (dmin[:, None] * (sc >> 4).astype(np.float32))[:, :, None]
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8)[None, None, :, None]
    q = ((qs.reshape(n, 2, 1, 32) >> shifts) & 3).reshape(n, 16, 16).astype(np.float32)
    return (dl * q - ml).reshape(n, 256)


def _q4_k_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K's 12 packed bytes [n, 12] -> (sc, m), uint8 [n, 8] each (6-bit values)."""
    lo, mid, hi = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([lo & 63, (hi & 0xF) | ((lo >> 6) << 4)], axis=1)
    m = np.concatenate([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], axis=1)
    return sc, m


def _pack_q4_k_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Inverse of _q4_k_scales: sc, m uint8 [n, 8] (< 64) -> [n, 12]."""
    lo = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    mid = (m[:, :4] & 63) | ((m[:, 4:] >> 4) << 6)
    hi = (sc[:, 4:] & 0xF) | ((m[:, 4:] & 0xF) << 4)
    return np.concatenate([lo, mid, hi], axis=1).astype(np.uint8)


def _dec_q4_k(b):
    n = b.shape[0]
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, m = _q4_k_scales(b[:, 4:16])
    ds = (d[:, None] * sc.astype(np.float32))[:, :, None]
    dm = (dmin[:, None] * m.astype(np.float32))[:, :, None]
    qs = b[:, 16:144].reshape(n, 4, 1, 32)
    q = np.concatenate([qs & 0xF, qs >> 4], axis=2).reshape(n, 8, 32).astype(np.float32)
    return (ds * q - dm).reshape(n, 256)


def _dec_iq2_xxs(b):
    n = b.shape[0]
    d = _f16(b[:, 0:2])
    aux = np.ascontiguousarray(b[:, 2:66]).view("<u4").reshape(n, 8, 2)
    aux0, aux1 = aux[..., 0], aux[..., 1]
    db = (d[:, None] * (np.float32(0.5) + (aux1 >> 28).astype(np.float32)) * np.float32(0.25))[:, :, None, None]
    idx = np.ascontiguousarray(aux0).view(np.uint8).reshape(n, 8, 4)
    grid = iq2xxs_grid()[idx].astype(np.float32)                                      # [n, 8, 4, 8]
    sidx = (aux1[:, :, None] >> np.array([0, 7, 14, 21], dtype=np.uint32)) & 127      # [n, 8, 4]
    sbyte = _ksigns()[sidx]
    neg = (sbyte[..., None] >> np.arange(8, dtype=np.uint8)) & 1                      # [n, 8, 4, 8]
    sign = np.where(neg == 1, np.float32(-1), np.float32(1))
    return (db * grid * sign).reshape(n, 256)


def _dec_mxfp4(b):
    d = _e8m0_half(b[:, 0])[:, None]
    qs = b[:, 1:17]
    nib = np.concatenate([qs & 0xF, qs >> 4], axis=1)
    return d * FP4_KVALUES[nib]


def _dec_nvfp4(b):
    n = b.shape[0]
    d = _ue4m3_table()[b[:, 0:4]][:, :, None]                                         # [n, 4, 1]
    qs = b[:, 4:36].reshape(n, 4, 8)
    nib = np.concatenate([qs & 0xF, qs >> 4], axis=2)                                 # [n, 4, 16]
    return (d * FP4_KVALUES[nib]).reshape(n, 64)


_DECODERS = {T.Q8_0: _dec_q8_0, T.Q2_K: _dec_q2_k, T.Q4_K: _dec_q4_k, T.IQ2_XXS: _dec_iq2_xxs,
             T.MXFP4: _dec_mxfp4, T.NVFP4: _dec_nvfp4}


def dequantize(raw: np.ndarray, qtype, shape) -> np.ndarray:
    """Decode a tensor's raw bytes to float32[shape] (bit for bit as gguf.quants.dequantize).

    raw: any C-ordered array holding exactly the tensor's bytes (typically the raw layout of the module docstring).
    """
    t = qtype_of(qtype)
    shape = tuple(int(s) for s in shape)
    rshape = raw_shape(t, shape)
    n_bytes = math.prod(rshape) * (PLAIN_DTYPES[t].itemsize if t in PLAIN_DTYPES else 1)
    raw = np.ascontiguousarray(raw)
    if raw.nbytes != n_bytes:
        raise ValueError(f"{t.name} tensor of shape {shape} needs {n_bytes} bytes, got {raw.nbytes} "
                         f"(array of shape {raw.shape}, dtype {raw.dtype})")
    flat = raw.reshape(-1).view(np.uint8)
    if t == T.F32:
        return flat.view(np.float32).reshape(shape).copy()
    if t == T.F16:
        return flat.view(np.float16).astype(np.float32).reshape(shape)
    if t == T.BF16:
        return (flat.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape)
    if t == T.I32:
        return flat.view(np.int32).astype(np.float32).reshape(shape)
    block, size = BLOCK_SIZES[t]
    blocks = flat.reshape(-1, size)
    out = np.empty((blocks.shape[0], block), dtype=np.float32)
    for s in range(0, blocks.shape[0], _CHUNK_BLOCKS):
        out[s:s + _CHUNK_BLOCKS] = _DECODERS[t](blocks[s:s + _CHUNK_BLOCKS])
    return out.reshape(shape)


# ---- quantizers ----------------------------------------------------------------------------------------------------
def _round_half_away(v: np.ndarray) -> np.ndarray:
    """Round to nearest, ties away from zero (C roundf), exactly as ggml's reference Q8_0 quantizer."""
    a = np.abs(v)
    fl = np.floor(a)
    return np.sign(v) * (fl + np.floor(2 * (a - fl)))


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> uint16 bfloat16 bits, round to nearest even, NaN kept quiet (ggml_compute_fp32_to_bf16)."""
    n = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    nan = (n & 0x7FFFFFFF) > 0x7F800000
    rne = (n + 0x7FFF + ((n >> 16) & 1)) >> 16
    return np.where(nan, (n >> 16) | 64, rne).astype(np.uint16)


def quantize(x: np.ndarray, qtype) -> np.ndarray:
    """float32 [*shape] -> raw array (module docstring layout) for F32, F16, BF16 and Q8_0.

    Q8_0 equals gguf.quants.quantize (ggml's reference quantizer: d = amax / 127, q = roundf(x / d)).
    """
    t = qtype_of(qtype)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim == 0:
        raise ValueError("quantize needs an array with at least one dimension")
    if t == T.F32:
        return x.copy()
    if t == T.F16:
        return x.astype(np.float16)
    if t == T.BF16:
        return bf16_bits(x)
    if t == T.Q8_0:
        rshape = raw_shape(t, x.shape)
        blocks = x.reshape(-1, 32)
        d = np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)
        with np.errstate(divide="ignore"):
            inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
        q = _round_half_away(blocks * inv).astype(np.int8)
        out = np.concatenate([_f16_bytes(d[:, 0]), q.view(np.uint8)], axis=1)
        return out.reshape(rshape)
    raise ValueError(f"quantize does not handle {t.name} (F32, F16, BF16 and Q8_0 only)")


# ---- random valid blocks -------------------------------------------------------------------------------------------
# Each block type draws its integer parts uniformly (so every bit pattern of the quants occurs) and sets the block
# scale so that E[x^2] = std^2 exactly in expectation; the second moments below are computed from the same discrete
# distributions the generator uses. ds4cupy/kernels/random_blocks.cu follows the same recipes on the GPU.
Q8_0_Q_RMS = math.sqrt(2 * (128 ** 2 - 1) / 12)     # q = (a >> 1) + (b >> 1) - 127 for random bytes a, b
Q2_K_SC = np.arange(8, 16)                           # sub-block scales; m = round(0.75 sc), dmin = 2 d
Q4_K_SC = np.arange(8, 24)                           # sub-block scales; m = round(15 sc / 16), dmin = 8 d
IQ2_XXS_S = np.arange(4, 16)                         # 4-bit sub-block scales
JITTER_MS = 1 + _JITTER ** 2 / 3                    # E[j^2] for j uniform in [1 - J, 1 + J]


def _q2_k_m(sc):
    return np.floor(0.75 * sc + 0.5).astype(np.int64)


def _q4_k_m(sc):
    return np.floor(15 * sc / 16 + 0.5).astype(np.int64)


@functools.cache
def block_unit_rms(t: T) -> float:
    """RMS of the decoded values of a random block of type t whose f16 base scale d is 1 (no jitter)."""
    if t == T.Q8_0:
        return Q8_0_Q_RMS
    if t == T.Q2_K:   # q uniform in 0..3: E[q] = 1.5, E[q^2] = 3.5; x = sc q - 2 m
        sc, m = Q2_K_SC, _q2_k_m(Q2_K_SC)
        return math.sqrt(np.mean(sc ** 2 * 3.5 - 2 * sc * 2 * m * 1.5 + (2 * m) ** 2))
    if t == T.Q4_K:   # q uniform in 0..15: E[q] = 7.5, E[q^2] = 77.5; x = sc q - 8 m
        sc, m = Q4_K_SC, _q4_k_m(Q4_K_SC)
        return math.sqrt(np.mean(sc ** 2 * 77.5 - 2 * sc * 8 * m * 7.5 + (8 * m) ** 2))
    if t == T.IQ2_XXS:
        g2 = float(np.mean(iq2xxs_grid().astype(np.float64) ** 2))
        return math.sqrt(np.mean(((0.5 + IQ2_XXS_S) * 0.25) ** 2) * g2)
    if t in (T.MXFP4, T.NVFP4):  # scale 1 times a uniformly random doubled-E2M1 code (NVFP4's 0.5 folded in scale)
        return math.sqrt(float(np.mean(FP4_KVALUES.astype(np.float64) ** 2)))
    raise ValueError(f"{t.name} has no block scale")


def min_std(qtype) -> float:
    """Smallest std random_blocks accepts for a type (its smallest block scale must stay a normal f16 / > 0)."""
    t = qtype_of(qtype)
    if t in (T.Q8_0, T.Q2_K, T.Q4_K, T.IQ2_XXS):
        return _F16_MIN_NORMAL * block_unit_rms(t) * math.sqrt(JITTER_MS) / (1 - _JITTER)
    if t == T.NVFP4:
        return float(_ue4m3_table()[1]) * block_unit_rms(t)
    if t == T.MXFP4:
        return 2.0 ** -100 * block_unit_rms(t)
    return 0.0


def max_std(qtype) -> float:
    """Largest std random_blocks accepts for a type (no block scale may overflow its format)."""
    t = qtype_of(qtype)
    if t in (T.Q8_0, T.Q2_K, T.Q4_K, T.IQ2_XXS):
        dmul = {T.Q2_K: 2, T.Q4_K: 8}.get(t, 1)   # dmin = dmul * d must stay finite too
        return _F16_MAX / dmul / 2 * block_unit_rms(t) * math.sqrt(JITTER_MS) / (1 + _JITTER)
    if t == T.NVFP4:
        return float(_ue4m3_table()[0x7E]) / 2 * block_unit_rms(t)
    if t == T.MXFP4:
        return 2.0 ** 100 * block_unit_rms(t)
    if t == T.F16:
        return 1000.0
    return 1e30


def _mix_round(t: np.ndarray, values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Index into sorted `values` per target in t: the lower or upper neighbour, chosen at random so that
    E[value^2] = t^2 (keeps the asked RMS when the representable scales are coarse)."""
    hi = np.clip(np.searchsorted(values, t, side="left"), 1, len(values) - 1)
    lo = hi - 1
    a, b = values[lo].astype(np.float64), values[hi].astype(np.float64)
    p = np.clip((t.astype(np.float64) ** 2 - a ** 2) / (b ** 2 - a ** 2), 0.0, 1.0)
    return np.where(rng.random(t.shape) < p, hi, lo)


def _gen_blocks(t: T, n: int, rng: np.random.Generator, std: float) -> np.ndarray:
    """n random valid blocks of type t: uint8 [n, bytes]."""
    jit = rng.uniform(1 - _JITTER, 1 + _JITTER, size=n)
    base = std / (block_unit_rms(t) * math.sqrt(JITTER_MS))
    if t == T.Q8_0:
        ab = rng.integers(0, 1 << 16, size=(n, 32), dtype=np.uint16)
        q = ((ab & 0xFF) >> 1).astype(np.int16) + (ab >> 9).astype(np.int16) - 127
        return np.concatenate([_f16_bytes(base * jit), q.astype(np.int8).view(np.uint8)], axis=1)
    if t == T.Q2_K:
        sc = rng.integers(Q2_K_SC[0], Q2_K_SC[-1] + 1, size=(n, 16))
        scales = (sc | (_q2_k_m(sc) << 4)).astype(np.uint8)
        qs = rng.integers(0, 256, size=(n, 64), dtype=np.uint8)
        d = (base * jit).astype(np.float16)
        dmin = d * np.float16(2)
        return np.concatenate([scales, qs, _f16_bytes(d), _f16_bytes(dmin)], axis=1)
    if t == T.Q4_K:
        sc = rng.integers(Q4_K_SC[0], Q4_K_SC[-1] + 1, size=(n, 8))
        packed = _pack_q4_k_scales(sc.astype(np.uint8), _q4_k_m(sc).astype(np.uint8))
        qs = rng.integers(0, 256, size=(n, 128), dtype=np.uint8)
        d = (base * jit).astype(np.float16)
        dmin = d * np.float16(8)
        return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), packed, qs], axis=1)
    if t == T.IQ2_XXS:
        aux = rng.integers(0, 1 << 32, size=(n, 8, 2), dtype=np.uint32)
        s = rng.integers(IQ2_XXS_S[0], IQ2_XXS_S[-1] + 1, size=(n, 8)).astype(np.uint32)
        aux[..., 1] = (aux[..., 1] & np.uint32(0x0FFFFFFF)) | (s << np.uint32(28))
        return np.concatenate([_f16_bytes(base * jit), aux.reshape(n, 16).view(np.uint8)], axis=1)
    if t == T.MXFP4:
        e_values = _e8m0_half(np.arange(2, 255, dtype=np.uint8))           # 2^(e - 128), e = 2..254
        e = (_mix_round(base * jit, e_values, rng) + 2).astype(np.uint8)
        qs = rng.integers(0, 256, size=(n, 16), dtype=np.uint8)
        return np.concatenate([e[:, None], qs], axis=1)
    if t == T.NVFP4:
        codes = np.arange(1, 0x7F)                                             # 0x01..0x7E, increasing values
        values = _ue4m3_table()[codes]
        jit4 = rng.uniform(1 - _JITTER, 1 + _JITTER, size=(n, 4))
        sc = codes[_mix_round(base * jit4, values, rng)].astype(np.uint8)
        qs = rng.integers(0, 256, size=(n, 32), dtype=np.uint8)
        return np.concatenate([sc, qs], axis=1)
    raise AssertionError(t)


def random_blocks(qtype, shape, rng: np.random.Generator, std: float) -> np.ndarray:
    """Random valid tensor data of `shape` (NumPy order) whose decoded values have RMS ~= std (zero mean roughly).

    Returns the raw layout of the module docstring: uint8 [*shape[:-1], row_bytes] for block types, float32 / float16 /
    uint16 (bfloat16 bits) [*shape] for F32 / F16 / BF16 (normal values). Block scales vary per block by +-10 %,
    are finite normal f16 (or valid E8M0 / E4M3) values; ValueError when std is outside [min_std, max_std] of the
    type. Vectorised and chunked: a flash expert tensor (256 x 2048 x 4096) takes seconds, not minutes.
    """
    t = qtype_of(qtype)
    shape = tuple(int(s) for s in shape)
    rshape = raw_shape(t, shape)
    if t == T.I32:
        raise ValueError("I32 tensors hold indices (tid2eid), not weights: random_blocks does not make them")
    if not (math.isfinite(std) and std > 0):
        raise ValueError(f"std must be a positive finite number, got {std!r}")
    lo, hi = min_std(t), max_std(t)
    if not lo <= std <= hi:
        raise ValueError(f"std={std!r} is outside the range {t.name} blocks can represent with normal scales "
                         f"[{lo:.3g}, {hi:.3g}]")
    n_elem = math.prod(shape)
    if t in PLAIN_DTYPES:
        out = np.empty(n_elem, dtype=PLAIN_DTYPES[t])
        step = _CHUNK_BLOCKS * 32
        for s in range(0, n_elem, step):
            x = rng.standard_normal(min(step, n_elem - s), dtype=np.float32) * np.float32(std)
            out[s:s + step] = bf16_bits(x) if t == T.BF16 else x
        return out.reshape(shape)
    block, size = BLOCK_SIZES[t]
    n_blocks = n_elem // block
    out = np.empty((n_blocks, size), dtype=np.uint8)
    for s in range(0, n_blocks, _CHUNK_BLOCKS):
        out[s:s + _CHUNK_BLOCKS] = _gen_blocks(t, min(_CHUNK_BLOCKS, n_blocks - s), rng, std)
    return out.reshape(rshape)


__all__ = ["BLOCK_SIZES", "PLAIN_DTYPES", "FP4_KVALUES", "qtype_of", "row_bytes", "raw_shape", "dequantize",
           "quantize", "bf16_bits", "random_blocks", "min_std", "max_std", "iq2xxs_grid", "block_unit_rms"]
