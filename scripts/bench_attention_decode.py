"""Time decode attention (one query token) at DeepSeek-V4-Flash shapes: ops.attention (attention.cu's attn_partial +
attn_combine) against attention_decode_mma.decode_attention (attention_decode_mma.cu's attn_partial_mma +
attn_combine), both with the splits CudaSession uses for a layer at the given ctx.

    python scripts/bench_attention_decode.py [--depth 4096,65536] [--modes 0,1,2] [--rps N] [--calls 20] [--reps 5]

Shapes: 64 heads, head_dim 512 (64 rope dims), window 128; the query sits at position depth - 1 of a session of ctx =
depth (so the key list is the longest the splits were sized for). Modes as the model's layers: 0 window only, 1 dense
compressed rows at ratio 128 (HCA: depth / 128 rows), 2 the indexer's top 512 of the ratio-4 rows (CSA; picks from
random scores through the engine's indexer_topk kernel). Splits: CudaSession's (session.decode_rows_per_split)
unless --rps sets the entries per split (then NS = ceil(rows / rps)).
Timing: `calls` back-to-back calls captured in one CUDA graph (no host launch gaps, as in the decode graph), the
graph launched `reps` times after a warm-up, CUDA events around each launch; the median / calls is shown in us per
layer call (partial + combine). Also prints max |new - old| / max |old| (float32-accurate: ~1e-6 expected).
"""
from __future__ import annotations

import argparse

import cupy
import numpy as np

from ds4cupy.engines import numerics as nm
from ds4cupy.engines.cuda import attention_decode_mma as adm
from ds4cupy.engines.cuda import ops
from ds4cupy.engines.cuda.session import decode_rows_per_split

from bench_matvec import time_graph   # scripts/ is on sys.path when a script runs

H, D, W, N_ROT, TOP_K = 64, 512, 128, 64, 512
RATIO = {0: 0, 1: 128, 2: 4}
NAME = {0: "window", 1: "HCA r128", 2: "CSA top512"}


def bench(depth, mode, rps_opt, calls, reps, gen):
    ratio = RATIO[mode]
    pos = depth - 1
    q = gen.standard_normal((1, H, D), dtype=cupy.float32)
    ring = gen.standard_normal((W, D), dtype=cupy.float32)
    cur = gen.standard_normal((1, D), dtype=cupy.float32)
    sinks = gen.standard_normal(H, dtype=cupy.float32)
    freqs = cupy.asarray(nm.rope_freqs(N_ROT, 160000.0, (16.0, 65536, 32.0, 1.0)))
    d_pos = cupy.asarray(np.array([pos], np.int32))
    comp = idx = None
    K = 0
    if mode:
        comp = gen.standard_normal((max(depth // ratio, 1), D), dtype=cupy.float32)
    if mode == 2:
        K = TOP_K
        scores = gen.standard_normal((1, depth // ratio + 2), dtype=cupy.float32)
        idx = cupy.empty((1, K), cupy.int32)
        ops.indexer_topk(scores, d_pos, ratio, idx)
    rows = ops.attention_rows(W, ratio, mode, TOP_K, depth)
    rps = rps_opt or decode_rows_per_split(rows)
    ns = -(-rows // rps)
    part_ml = cupy.empty((1, H, ns, 2), cupy.float32)
    part_o = cupy.empty((1, H, ns, D), cupy.float32)
    out_old = cupy.empty((1, H, D), cupy.float32)
    out_new = cupy.empty((1, H, D), cupy.float32)

    def old():
        ops.attention(q, ring, cur, comp, idx, d_pos, W, ratio, mode, sinks, N_ROT, freqs, part_ml, part_o, out_old,
                      ns, rps)

    def new():
        adm.decode_attention(q, ring, cur, comp, idx, d_pos, W, ratio, mode, sinks, N_ROT, freqs, part_ml, part_o,
                             out_new, ns, rps)

    t_old, t_new = (time_graph(cupy, lambda i, f=f: f(), calls, reps) for f in (old, new))
    diff = float(cupy.abs(out_new - out_old).max() / cupy.abs(out_old).max())
    print(f"{NAME[mode]:11} {depth:6d} {rows:5d} {ns:3d} {rps:4d} {t_old:9.1f} {t_new:9.1f} {t_old / t_new:7.2f}x  "
          f"{diff:.1e}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--depth", default="4096,65536", help="session depths (ctx; the query at depth - 1)")
    ap.add_argument("--modes", default="0,1,2")
    ap.add_argument("--rps", type=int, default=0, help="entries per split (default: CudaSession's)")
    ap.add_argument("--calls", type=int, default=20, help="calls per CUDA graph")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    dev = cupy.cuda.Device()
    props = cupy.cuda.runtime.getDeviceProperties(dev.id)
    print(f"device: {props['name'].decode()}; H={H} head_dim={D} window={W} rope={N_ROT} top_k={TOP_K}; "
          f"{args.calls} calls a graph, median of {args.reps} graph launches")
    print(f"{'layer':11} {'depth':>6} {'rows':>5} {'NS':>3} {'rps':>4} {'old us':>9} {'new us':>9} {'speedup':>8}  "
          f"max|new-old|/max|old|")
    gen = cupy.random.default_rng(0)
    for depth in (int(c) for c in args.depth.split(",")):
        for mode in (int(m) for m in args.modes.split(",")):
            bench(depth, mode, args.rps, args.calls, args.reps, gen)
            cupy.get_default_memory_pool().free_all_blocks()


if __name__ == "__main__":
    main()
