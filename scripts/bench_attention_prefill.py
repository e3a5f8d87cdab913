"""Time the attention of one prefill chunk at DeepSeek-V4-Flash shapes: ops.attention (kernels/attention.cu, one
split, as CudaSession's prefill ran it) against attention_mma.prefill_attention (kernels/attention_mma.cu).

    python scripts/bench_attention_prefill.py [--tokens 2048] [--ctx 4096,32768] [--modes 0,1,2] [--reps 5]

Shapes: 64 heads, head_dim 512 (64 rope dims), window 128; the chunk is the last S positions of a ctx-token prompt
(pos0 = ctx - S). Modes as the model's layers: 0 window only (layers 0-1), 1 dense compressed rows at ratio 128 (HCA:
ctx / 128 rows), 2 the indexer's top 512 of the ratio-4 rows (CSA; picks from random scores through the engine's
indexer_topk kernel, ascending, -1 padded). Inputs are random (rms-scale rows). Each kernel runs `reps` times after a
warm-up, timed by CUDA events around each launch; the median is shown.

Columns: us = microseconds per layer call; keys = mean key-list length per query; TFLOP/s = 4 * S * H * keys * d /
time (QK^T and PV multiply-adds, the useful work; the new kernel does 3 fp16 mma per product for its hi + lo split);
speedup = old / new. Also prints max |new - old| / max |old| (float32-accurate: ~1e-6 expected).
"""
from __future__ import annotations

import argparse

import cupy
import numpy as np

from ds4cupy.engines import numerics as nm
from ds4cupy.engines.cuda import attention_mma as am
from ds4cupy.engines.cuda import ops

from bench_moe_prefill import timed   # scripts/ is on sys.path when a script runs

H, D, W, N_ROT, TOP_K = 64, 512, 128, 64, 512
RATIO = {0: 0, 1: 128, 2: 4}
NAME = {0: "window", 1: "HCA r128", 2: "CSA top512"}


def mean_keys(pos0, S, mode, ratio, K):
    pos = np.arange(pos0, pos0 + S)
    nwin = np.minimum(pos + 1, W)
    if mode == 1:
        return float(np.mean(nwin + (pos + 1) // ratio))
    if mode == 2:
        return float(np.mean(nwin + np.minimum(K, (pos + 1) // ratio)))   # -1 entries skipped (still walked)
    return float(np.mean(nwin))


def bench(S, ctx, mode, reps, gen):
    ratio = RATIO[mode]
    pos0 = ctx - S
    if pos0 < 0:
        print(f"{NAME[mode]:11} ctx {ctx:6d} S {S:5d}: skipped (S > ctx)")
        return
    q = gen.standard_normal((S, H, D), dtype=cupy.float32)
    ring = gen.standard_normal((W, D), dtype=cupy.float32)
    cur = gen.standard_normal((S, D), dtype=cupy.float32)
    sinks = gen.standard_normal(H, dtype=cupy.float32)
    freqs = cupy.asarray(nm.rope_freqs(N_ROT, 160000.0, (16.0, 65536, 32.0, 1.0)))
    d_pos = cupy.asarray(np.array([pos0], np.int32))
    comp = idx = None
    K = 0
    if mode:
        comp = gen.standard_normal((max(ctx // ratio, 1), D), dtype=cupy.float32)
    if mode == 2:
        K = TOP_K
        scores = gen.standard_normal((S, ctx // ratio + 2), dtype=cupy.float32)
        idx = cupy.empty((S, K), cupy.int32)
        ops.indexer_topk(scores, d_pos, ratio, idx)
    rows = ops.attention_rows(W, ratio, mode, TOP_K, ctx)
    part_ml = cupy.empty((S, H, 1, 2), cupy.float32)
    part_o = cupy.empty((S, H, 1, D), cupy.float32)
    out_old = cupy.empty((S, H, D), cupy.float32)
    out_new = cupy.empty((S, H, D), cupy.float32)

    def old():
        ops.attention(q, ring, cur, comp, idx, d_pos, W, ratio, mode, sinks, N_ROT, freqs, part_ml, part_o, out_old,
                      1, rows)

    def new():
        am.prefill_attention(q, ring, cur, comp, idx, d_pos, W, ratio, mode, sinks, N_ROT, freqs, out_new)

    t_old, t_new = timed(old, reps), timed(new, reps)
    keys = mean_keys(pos0, S, mode, ratio, K)
    flops = 4.0 * S * H * keys * D
    diff = float(cupy.abs(out_new - out_old).max() / cupy.abs(out_old).max())
    print(f"{NAME[mode]:11} {ctx:6d} {S:5d} {keys:7.1f} {t_old:10.1f} {flops / t_old / 1e6:8.2f} {t_new:10.1f} "
          f"{flops / t_new / 1e6:8.2f} {t_old / t_new:7.1f}x  {diff:.1e}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="2048", help="chunk sizes S, comma separated")
    ap.add_argument("--ctx", default="4096,32768", help="prompt lengths (the chunk is their last S tokens)")
    ap.add_argument("--modes", default="0,1,2")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    dev = cupy.cuda.Device()
    props = cupy.cuda.runtime.getDeviceProperties(dev.id)
    print(f"device: {props['name'].decode()}; H={H} head_dim={D} window={W} rope={N_ROT} top_k={TOP_K}; "
          f"reps {args.reps}, median of CUDA-event times")
    print(f"{'layer':11} {'ctx':>6} {'S':>5} {'keys':>7} {'old us':>10} {'TFLOP/s':>8} {'new us':>10} {'TFLOP/s':>8} "
          f"{'speedup':>8}  max|new-old|/max|old|")
    gen = cupy.random.default_rng(0)
    for S in (int(s) for s in args.tokens.split(",")):
        for ctx in (int(c) for c in args.ctx.split(",")):
            for mode in (int(m) for m in args.modes.split(",")):
                bench(S, ctx, mode, args.reps, gen)
                cupy.get_default_memory_pool().free_all_blocks()


if __name__ == "__main__":
    main()
