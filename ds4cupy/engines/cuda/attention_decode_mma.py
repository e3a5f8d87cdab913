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

Switch DECODE_ATTN_MMA (engines/cuda/switches.py): CudaModel reads it once (`enabled`), and CudaSession sends decode
steps and chunks shorter than attention_mma.MIN_TOKENS of layers whose longest key list has at least MIN_ROWS entries
here (`use_for`). H200, scripts/bench_attention_decode.py at eadf732, us a layer call (partial + combine), old -> new:
128 rows (window) 11.9 -> 13.9, 160 (HCA at 4K) 15.0 -> 16.1, 640 (CSA top 512; HCA at 64K) 23.6 -> 19.9. Short
lists leave the tensor-core block (32 heads, 16-key tiles) mostly idle; long ones pay off from its one staged read
of each key row for 32 heads.
"""
from __future__ import annotations

import numpy as np

from . import ops, switches
from .attention_mma import HEADS_PER_BLOCK, MIN_CAPABILITY, THREADS, _check, check_args, kernel, shared_bytes


def enabled(device_id: int | None = None) -> bool:
    """Switch DECODE_ATTN_MMA is on and the device (the current one when None) has mma.sync (sm_80+)."""
    if not switches.enabled("DECODE_ATTN_MMA"):
        return False
    import cupy
    return int(cupy.cuda.Device(device_id).compute_capability) >= MIN_CAPABILITY


MIN_ROWS = 512


def use_for(rows: int) -> bool:
    """Whether a layer whose longest decode key list has `rows` entries takes decode_attention (given the switch)."""
    return rows >= MIN_ROWS


def decode_attention(q, ring, cur, comp, idx, d_pos, window: int, ratio: int, mode: int, sinks, n_rot: int, freqs,
                     part_ml, part_o, out, nsplit: int, rows_per_split: int) -> None:
    """out[t, h] = attention of q[t, h] over its key list with the sink, then the inverse rope (module docstring):
    attn_partial_mma over nsplit splits of rows_per_split entries, then attention.cu's attn_combine."""
    op = "decode_attention"
    S, H, d, K = check_args(op, q, ring, cur, comp, idx, d_pos, window, ratio, mode, sinks, n_rot, freqs, out)
    if not 0 < nsplit <= 65535:
        raise ValueError(f"{op}: nsplit {nsplit} must be in [1, 65535]")
    if rows_per_split <= 0:
        raise ValueError(f"{op}: rows_per_split {rows_per_split} must be > 0")
    ops.check_combine_splits(op, d, nsplit)
    _check(op, part_ml, np.float32, "part_ml", (S, H, nsplit, 2))
    _check(op, part_o, np.float32, "part_o", (S, H, nsplit, d))
    null = np.uint64(0)
    i32 = np.int32
    ratio = ratio if mode else 0
    kernel("attention_decode_mma", "attn_partial_mma", d)(
        ((H + HEADS_PER_BLOCK - 1) // HEADS_PER_BLOCK, nsplit, S), (THREADS,),
        (q, ring, cur, comp if mode else null, idx if mode == 2 else null, i32(K), d_pos, i32(H), i32(d), i32(window),
         i32(ratio), i32(mode), np.float32(d ** -0.5), i32(rows_per_split), part_ml, part_o),
        shared_mem=shared_bytes(d))
    ops.attention_combine(part_ml, part_o, sinks, n_rot, freqs, d_pos, window, ratio, mode, K, nsplit, rows_per_split,
                          out)


__all__ = ["MIN_ROWS", "enabled", "use_for", "decode_attention"]
