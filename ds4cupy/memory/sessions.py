"""Room for more sessions beside a loaded model: the check `serve --max-batch N` makes before it opens N sessions.

Each stream of the batching server has its own session of `ctx` tokens. A CUDA session allocates its whole KV cache
(`kv_layout`, the buffers alloc_kv makes) and its prefill scratch (`scratch_bytes`, an estimate of the buffers the
session sizes for one chunk) when it is made; a reference session's NumPy state grows with its tokens up to the same
KV rows (no scratch kept). The check runs once the weights and the first session are placed, so `free` already
accounts for them: the N - 1 more sessions must fit in it, less the memory plan's reserve on the GPU.
"""
from __future__ import annotations

from ..format.config import ModelConfig
from .budget import DEFAULT_CHUNK, DEFAULT_RESERVE_BYTES, kv_layout, scratch_bytes
from .machine import read_meminfo
from .plan import gib


class SessionsFitError(RuntimeError):
    """N sessions do not fit; the message names the numbers and what fits instead."""


def session_bytes(cfg: ModelConfig, ctx: int, backend: str, chunk: int = DEFAULT_CHUNK, index_fp4: bool = False) -> int:
    """Bytes one session of `ctx` tokens needs at most: its KV cache (index_fp4: with the indexer rows packed, as the
    CUDA engine stores them with INDEXER_FP4 and QAT on), plus the prefill scratch on the GPU."""
    kv = sum(b.nbytes for b in kv_layout(cfg, ctx, chunk, index_fp4))
    return kv + (scratch_bytes(cfg, ctx, chunk) if backend == "cuda" else 0)


def reserve_bytes(backend: str) -> int:
    """What the check keeps free: the memory plan's reserve on the GPU (modules, workspace, slack), none on the host."""
    return DEFAULT_RESERVE_BYTES if backend == "cuda" else 0


def free_for_sessions(backend: str) -> int:
    """Bytes free now where the backend puts sessions: the GPU's usable memory (cuda), else the host's available RAM."""
    if backend == "cuda":
        from .machine import detect
        return detect().usable
    return read_meminfo()[1]


def check_sessions_fit(cfg: ModelConfig, ctx: int, n: int, backend: str, free: int,
                       chunk: int = DEFAULT_CHUNK, index_fp4: bool = False) -> int:
    """Check that n sessions of ctx tokens fit when one exists already and `free` bytes are left; returns the bytes
    the n - 1 more need. SessionsFitError names the numbers, the largest n that fits at this ctx and the largest ctx
    (a multiple of 1024 when >= 1024) at which n fit."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    per = session_bytes(cfg, ctx, backend, chunk, index_fp4)
    reserve = reserve_bytes(backend)
    usable = max(0, free - reserve)
    need = (n - 1) * per
    if need <= usable:
        return need
    where = "GPU memory" if backend == "cuda" else "host memory"
    fits_n = 1 + usable // per
    lo, hi = 0, ctx                      # the largest ctx whose n - 1 extra sessions fit (and the first, smaller)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if (n - 1) * session_bytes(cfg, mid, backend, chunk, index_fp4) <= usable:
            lo = mid
        else:
            hi = mid - 1
    fits_ctx = lo // 1024 * 1024 if lo >= 1024 else lo
    instead = f"--max-batch {fits_n} at this context" + (f", or --ctx {fits_ctx} for {n} streams" if fits_ctx else "")
    raise SessionsFitError(
        f"--max-batch {n} needs {n} sessions of {ctx} tokens, {gib(per)} each (KV cache"
        f"{' + prefill scratch' if backend == 'cuda' else ''}): {n - 1} more than the first need {gib(need)}, but "
        f"{gib(free)} of {where} is free after the weights and the first session"
        + (f" ({gib(reserve)} of it kept in reserve)" if reserve else "") + f". Fits: {instead}")
