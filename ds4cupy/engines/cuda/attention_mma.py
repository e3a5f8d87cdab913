"""Prefill attention on tensor cores: the launcher of kernels/attention_mma.cu and the engine's choice of it.

ops.attention (kernels/attention.cu) was written for decode: one warp per head walks the key list row by row on CUDA
cores, so a prefill chunk reads every key row once per 8 heads and does all of QK^T and PV in float32 FMAs.
prefill_attention computes the same thing (same key lists, masks, sinks and inverse rope; the kernel's header has
the exact rules) with a block per (query, 32 heads): the query's key list streams through shared memory in tiles of
16 rows, read once for the block's 32 heads (MQA: one row is K and V for every head), and QK^T and PV run on
mma.sync.m16n8k16 with an online softmax.

    prefill_attention(q, ring, cur, comp, idx, d_pos, window, ratio, mode, sinks, n_rot, freqs, out)

Arguments as ops.attention's minus the split scratch: q [S, H, d], ring [W, d], cur [S, d], comp [N, d] or None,
idx int32 [S, K] or None, d_pos int32 [1] (device), sinks [H], freqs float64 [n_rot / 2], out [S, H, d]; d % 32 == 0
and d <= 512. No host sync, nothing allocated: graph-capturable.

Precision: float32-accurate, not fp16-accurate. Every mma operand (queries, key / value rows, probabilities) is split
into hi + lo fp16 terms under a power-of-two scale (kernels/mma_f16.cuh: 2^-21 relative, any range); the products
q_hi k_hi, q_hi k_lo, q_lo k_hi (and the same for p and v) are summed in float32. The result differs from
ops.attention by float32 summation-order effects; tests/test_gpu_attention_mma.py states the measured bound, and
tests/test_attention_mma_layout.py runs a NumPy emulation of the kernel's tiles, swizzle and fragments.

Switch PREFILL_ATTN_MMA (engines/cuda/switches.py; off by default until it has run on a GPU): CudaModel reads it
once (`enabled`), and CudaSession sends a chunk of S >= MIN_TOKENS tokens here; decode (S = 1) and shorter chunks keep
ops.attention.
"""
from __future__ import annotations

import numpy as np

from . import switches
from .compile import get_kernel

HEADS_PER_BLOCK = 32      # AM_HG
TILE_KEYS = 16            # AM_TK
THREADS = 256
MIN_CAPABILITY = 80       # mma.sync.m16n8k16 f16, ldmatrix, cp.async: sm_80 and later
# A chunk of at least MIN_TOKENS queries takes the tensor-core kernel. Either kernel reads each query's key list once
# per block, so the work per query does not depend on S; below ~16 queries both leave most of the GPU idle (grid
# ceil(H / 32) x S here, H / 8 x S blocks there). To be re-measured on the H200
# (scripts/bench_attention_prefill.py --tokens 16,64,2048).
MIN_TOKENS = 16
MAX_HEAD_DIM = 512


def enabled(device_id: int | None = None) -> bool:
    """Switch PREFILL_ATTN_MMA is on and the device (the current one when None) has mma.sync (sm_80+)."""
    if not switches.enabled("PREFILL_ATTN_MMA"):
        return False
    import cupy
    dev = cupy.cuda.Device(device_id)
    return int(dev.compute_capability) >= MIN_CAPABILITY


def shared_bytes(d: int) -> int:
    """Dynamic shared memory of a launch: two stages of TILE_KEYS rows of d float32."""
    return 2 * TILE_KEYS * 4 * int(d)


def _check(op: str, a, dtype, name: str, shape=None) -> None:
    import cupy
    if not isinstance(a, cupy.ndarray):
        raise TypeError(f"{op}: {name} must be a cupy.ndarray, got {type(a).__name__}")
    if a.dtype != dtype:
        raise TypeError(f"{op}: {name} must be {np.dtype(dtype).name}, got {a.dtype}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{op}: {name} must be C-contiguous")
    if shape is not None and tuple(a.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} has shape {tuple(a.shape)}, expected {tuple(shape)}")


def check_args(op: str, q, ring, cur, comp, idx, d_pos, window: int, ratio: int, mode: int, sinks, n_rot: int, freqs,
               out) -> tuple[int, int, int, int]:
    """The checks every tensor-core attention launch makes (`op` names the caller in the errors); returns S, H, d and
    K (the indexer's picks per query, 0 unless mode 2)."""
    if q.ndim != 3:
        raise ValueError(f"{op}: q must be [S, H, d], got shape {tuple(q.shape)}")
    S, H, d = q.shape
    if d % 32 or not 0 < d <= MAX_HEAD_DIM:
        raise ValueError(f"{op}: head_dim {d} must be a positive multiple of 32 and <= {MAX_HEAD_DIM}")
    if not 0 < S <= 65535:
        raise ValueError(f"{op}: {S} queries; the grid takes 1 to 65535")
    if mode not in (0, 1, 2):
        raise ValueError(f"{op}: mode {mode} must be 0 (window), 1 (dense compressed) or 2 (indexed)")
    if mode and ratio <= 0:
        raise ValueError(f"{op}: mode {mode} needs a compression ratio > 0, got {ratio}")
    if n_rot % 2 or not 0 <= n_rot <= d:
        raise ValueError(f"{op}: n_rot {n_rot} must be even and in [0, {d}]")
    _check(op, q, np.float32, "q")
    _check(op, ring, np.float32, "ring", (window, d))
    _check(op, cur, np.float32, "cur", (S, d))
    _check(op, sinks, np.float32, "sinks", (H,))
    _check(op, freqs, np.float64, "freqs", (n_rot // 2,))
    _check(op, out, np.float32, "out", (S, H, d))
    _check(op, d_pos, np.int32, "d_pos")
    K = 0
    if mode:
        if comp is None:
            raise ValueError(f"{op}: mode {mode} needs comp")
        _check(op, comp, np.float32, "comp")
        if comp.ndim != 2 or comp.shape[1] != d:
            raise ValueError(f"{op}: comp must be [N, {d}], got shape {tuple(comp.shape)}")
    if mode == 2:
        if idx is None:
            raise ValueError(f"{op}: mode 2 needs idx")
        _check(op, idx, np.int32, "idx")
        if idx.ndim != 2 or idx.shape[0] != S:
            raise ValueError(f"{op}: idx must be [{S}, K], got shape {tuple(idx.shape)}")
        K = idx.shape[1]
    return S, H, d, K


def kernel(family: str, name: str, d: int):
    """The kernel with its dynamic shared memory (shared_bytes(d)) allowed: above 48 KiB needs the opt-in (d > 384)."""
    kern = get_kernel(family, name)
    if kern.max_dynamic_shared_size_bytes < shared_bytes(d):
        kern.max_dynamic_shared_size_bytes = shared_bytes(d)
    return kern


def prefill_attention(q, ring, cur, comp, idx, d_pos, window: int, ratio: int, mode: int, sinks, n_rot: int, freqs,
                      out) -> None:
    """out[t, h] = attention of query q[t, h] over its key list, with the sink, then the inverse rope (module
    docstring; kernels/attention_mma.cu for the list and the numerics)."""
    S, H, d, K = check_args("prefill_attention", q, ring, cur, comp, idx, d_pos, window, ratio, mode, sinks, n_rot,
                            freqs, out)
    null = np.uint64(0)
    kernel("attention_mma", "attn_prefill_mma", d)(
        ((H + HEADS_PER_BLOCK - 1) // HEADS_PER_BLOCK, S), (THREADS,),
        (q, ring, cur, comp if mode else null, idx if mode == 2 else null, np.int32(K), d_pos, np.int32(H),
         np.int32(d), np.int32(window), np.int32(ratio if mode else 0), np.int32(mode), np.float32(d ** -0.5),
         sinks, np.int32(n_rot), freqs, out),
        shared_mem=shared_bytes(d))


__all__ = ["HEADS_PER_BLOCK", "TILE_KEYS", "MIN_TOKENS", "MIN_CAPABILITY", "MAX_HEAD_DIM", "enabled", "shared_bytes",
           "check_args", "kernel", "prefill_attention"]
