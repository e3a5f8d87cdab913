"""Decode attention on tensor cores: the launcher of kernels/attention_decode_mma.cu and the engine's choice of it.

ops.attention runs decode attention as attention.cu's attn_partial (one warp per head walks its split's key rows
serially on CUDA cores, each row staged once per block of 8 heads) and attn_combine (merges the splits with the sink,
inverse rope). decode_attention computes the same thing with the same splits: attn_partial_mma (a block per split,
query and 32 heads; its key rows stream through shared memory in tiles of 16, read once for the block's 32 heads, and
QK^T and PV run on mma.sync.m16n8k16 with hi + lo fp16 operands, as attention_mma.cu's prefill kernel, whose body it
shares) writes attn_partial's partials, and attention.cu's attn_combine merges them unchanged.

    decode_attention(q, ring, cur, comp, idx, d_pos, window, ratio, mode, sinks, n_rot, freqs, part_ml, part_o, out,
                     nsplit, rows_per_split)

Arguments as ops.attention's: part_ml [S, H, nsplit, 2] and part_o [S, H, nsplit, d] scratch, nsplit * rows_per_split
covering the longest key list of any position (CudaSession sizes them from its ctx, so a captured decode graph serves
any depth). No host sync, nothing allocated: graph-capturable. Precision: float32-accurate (attention_mma.cu's header);
tests/test_gpu_attention_decode_mma.py states the bound.

Switch DECODE_ATTN_MMA (engines/cuda/switches.py; off by default until it has run on a GPU): CudaModel reads it once
(`enabled`), and CudaSession sends decode steps and chunks shorter than attention_mma.MIN_TOKENS here.
"""
from __future__ import annotations

import numpy as np

from . import switches
from .attention_mma import HEADS_PER_BLOCK, MAX_HEAD_DIM, MIN_CAPABILITY, THREADS, _check, shared_bytes
from .compile import get_kernel


def enabled(device_id: int | None = None) -> bool:
    """Switch DECODE_ATTN_MMA is on and the device (the current one when None) has mma.sync (sm_80+)."""
    if not switches.enabled("DECODE_ATTN_MMA"):
        return False
    import cupy
    return int(cupy.cuda.Device(device_id).compute_capability) >= MIN_CAPABILITY


def decode_attention(q, ring, cur, comp, idx, d_pos, window: int, ratio: int, mode: int, sinks, n_rot: int, freqs,
                     part_ml, part_o, out, nsplit: int, rows_per_split: int) -> None:
    """out[t, h] = attention of q[t, h] over its key list with the sink, then the inverse rope (module docstring):
    attn_partial_mma over nsplit splits of rows_per_split entries, then attention.cu's attn_combine."""
    if q.ndim != 3:
        raise ValueError(f"decode_attention: q must be [S, H, d], got shape {tuple(q.shape)}")
    S, H, d = q.shape
    if d % 32 or not 0 < d <= MAX_HEAD_DIM:
        raise ValueError(f"decode_attention: head_dim {d} must be a positive multiple of 32 and <= {MAX_HEAD_DIM}")
    if not 0 < S <= 65535:
        raise ValueError(f"decode_attention: {S} queries; the grid takes 1 to 65535")
    if not 0 < nsplit <= 65535:
        raise ValueError(f"decode_attention: nsplit {nsplit} must be in [1, 65535]")
    if rows_per_split <= 0:
        raise ValueError(f"decode_attention: rows_per_split {rows_per_split} must be > 0")
    if 4 * (d + nsplit) > 48 * 1024:
        raise ValueError(f"decode_attention: {nsplit} splits do not fit attn_combine's shared memory "
                         f"(at most {12 * 1024 - d}); use more rows per split")
    if mode not in (0, 1, 2):
        raise ValueError(f"decode_attention: mode {mode} must be 0 (window), 1 (dense compressed) or 2 (indexed)")
    if mode and ratio <= 0:
        raise ValueError(f"decode_attention: mode {mode} needs a compression ratio > 0, got {ratio}")
    if n_rot % 2 or not 0 <= n_rot <= d:
        raise ValueError(f"decode_attention: n_rot {n_rot} must be even and in [0, {d}]")
    _check(q, np.float32, "q")
    _check(ring, np.float32, "ring", (window, d))
    _check(cur, np.float32, "cur", (S, d))
    _check(sinks, np.float32, "sinks", (H,))
    _check(freqs, np.float64, "freqs", (n_rot // 2,))
    _check(out, np.float32, "out", (S, H, d))
    _check(d_pos, np.int32, "d_pos")
    _check(part_ml, np.float32, "part_ml", (S, H, nsplit, 2))
    _check(part_o, np.float32, "part_o", (S, H, nsplit, d))
    K = 0
    if mode:
        if comp is None:
            raise ValueError(f"decode_attention: mode {mode} needs comp")
        _check(comp, np.float32, "comp")
        if comp.ndim != 2 or comp.shape[1] != d:
            raise ValueError(f"decode_attention: comp must be [N, {d}], got shape {tuple(comp.shape)}")
    if mode == 2:
        if idx is None:
            raise ValueError("decode_attention: mode 2 needs idx")
        _check(idx, np.int32, "idx")
        if idx.ndim != 2 or idx.shape[0] != S:
            raise ValueError(f"decode_attention: idx must be [{S}, K], got shape {tuple(idx.shape)}")
        K = idx.shape[1]
    kern = get_kernel("attention_decode_mma", "attn_partial_mma")
    smem = shared_bytes(d)
    if kern.max_dynamic_shared_size_bytes < smem:       # above 48 KiB needs the opt-in (d > 384)
        kern.max_dynamic_shared_size_bytes = smem
    null = np.uint64(0)
    i32 = np.int32
    kern(((H + HEADS_PER_BLOCK - 1) // HEADS_PER_BLOCK, nsplit, S), (THREADS,),
         (q, ring, cur, comp if mode else null, idx if mode == 2 else null, i32(K), d_pos, i32(H), i32(d), i32(window),
          i32(ratio if mode else 0), i32(mode), np.float32(d ** -0.5), i32(rows_per_split), part_ml, part_o),
         shared_mem=smem)
    get_kernel("attention", "attn_combine")(
        (H, S), (256,), (part_ml, part_o, sinks, i32(H), i32(d), i32(nsplit), i32(n_rot), freqs, d_pos, i32(window),
                         i32(ratio if mode else 0), i32(mode), i32(K), i32(rows_per_split), out),
        shared_mem=4 * (d + nsplit))


__all__ = ["enabled", "decode_attention"]
