"""Random valid weight tensors generated on the GPU (kernels/random_blocks.cu), for flash-shape benchmark models that
must never pass through host memory.

random_tensor(qtype, shape, seed, std) returns a CuPy array in the raw layout of ds4cupy.format.quants (uint8
[*shape[:-1], row_bytes] for block types; float32 / float16 / uint16 bfloat16 bits [*shape] for plain types) whose
decoded values have RMS ~= std, made with the same recipes as quants.random_blocks (not the same random stream).
Deterministic in (seed, qtype, shape, std).
"""
from __future__ import annotations

import math

import numpy as np
from gguf import GGMLQuantizationType as T

from ...format import quants
from .compile import get_kernel

_KERNEL = {T.Q8_0: "random_q8_0", T.Q2_K: "random_q2_k", T.Q4_K: "random_q4_k", T.IQ2_XXS: "random_iq2_xxs",
           T.MXFP4: "random_mxfp4", T.NVFP4: "random_nvfp4", T.F32: "random_f32", T.F16: "random_f16",
           T.BF16: "random_bf16"}


def random_tensor(qtype, shape, seed: int, std: float, out=None, stream=None):
    """Random valid tensor data on the current device (see the module docstring). out: a preallocated array of the
    raw shape and dtype to fill instead of allocating."""
    import cupy
    t = quants.qtype_of(qtype)
    if t not in _KERNEL:
        raise ValueError(f"random_tensor does not make {t.name} tensors (types: {', '.join(x.name for x in _KERNEL)})")
    shape = tuple(int(s) for s in shape)
    rshape = quants.raw_shape(t, shape)
    if not (math.isfinite(std) and std > 0):
        raise ValueError(f"std must be a positive finite number, got {std!r}")
    lo, hi = quants.min_std(t), quants.max_std(t)
    if not lo <= std <= hi:
        raise ValueError(f"std={std!r} is outside the range {t.name} blocks can represent with normal scales "
                         f"[{lo:.3g}, {hi:.3g}]")
    dtype = quants.PLAIN_DTYPES.get(t, np.dtype(np.uint8))
    if out is None:
        out = cupy.empty(rshape, dtype=dtype)
    elif out.shape != rshape or out.dtype != dtype or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous {dtype} array of shape {rshape}, got {out.dtype} {out.shape}")
    if t in quants.PLAIN_DTYPES:
        n, base = math.prod(shape), std
    else:
        n = math.prod(shape) // quants.BLOCK_SIZES[t][0]
        base = std / (quants.block_unit_rms(t) * math.sqrt(quants.JITTER_MS))
    if n == 0:
        return out
    threads = 256
    blocks = min((n + threads - 1) // threads, 65535 * 8)
    kern = get_kernel("random_blocks", _KERNEL[t])
    args = (out, np.int64(n), np.uint64(seed & 0xFFFFFFFFFFFFFFFF), np.float32(base))
    if stream is not None:
        with stream:
            kern((blocks,), (threads,), args)
    else:
        kern((blocks,), (threads,), args)
    return out


__all__ = ["random_tensor"]
