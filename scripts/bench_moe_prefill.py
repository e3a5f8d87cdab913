"""Time the prefill MoE of one layer at DeepSeek-V4-Flash shapes: per-pair decode kernels (moe.cu, what prefill ran
before) against the grouped tensor-core GEMMs (moe_grouped.cu), plain (moe_grouped_*) and software-pipelined
(moe_grouped_pipe_*, switch MOE_GROUPED_PIPE; --no-pipe leaves them out).

    python scripts/bench_moe_prefill.py [--tokens 512,2048] [--experts q2,q4] [--reps 5] [--old-max 2048] [--no-pipe]

Shapes: 256 experts, 6 selected per token, hidden 4096, expert ff 2048, plus the shared expert (Q8_0, ff 2048,
repacked into planes (Q8_0R) as the engine does by default).
q2: IQ2_XXS gate/up + Q2_K down (ds4's q2 files); q4: Q4_K. Weights are random valid blocks made on the GPU (no file);
routing is uniform random (distinct experts per token, weights uniform in [0.1, 1.5]). Each variant runs the whole
layer MoE (routed + shared) `reps` times after a warm-up, timed by CUDA events around each run; the median is shown.
Per kernel of the grouped path one more pass times each launch alone (route, gate/up, down, slot sum, shared).

Columns: us = microseconds per layer; TFLOP/s = 2 * (pairs * 3 * ff * D + tokens * 3 * ff * D) / time (the useful
multiply-adds, routed + shared); GB/s = the bytes of every distinct selected expert's three matrices + the shared
expert's, read once, / time (what an ideal grouped kernel must read: the old path reads far more). Also prints the
relative difference new vs old of the layer output (float32-accurate: ~1e-6 expected, kernels/moe_grouped.cu),
and whether the pipelined kernels' output is bit-identical to the plain grouped ones' (it must be).
"""
from __future__ import annotations

import argparse
import os
import statistics

import cupy
import numpy as np
from gguf import GGMLQuantizationType as T

from ds4cupy.engines.cuda import moe_grouped as mg
from ds4cupy.engines.cuda import quant_ops as qo
from ds4cupy.engines.cuda.q8_0r import Q8_0R, repack_q8_0
from ds4cupy.engines.cuda.random_weights import random_tensor
from ds4cupy.format import quants

E, K, D, FF = 256, 6, 4096, 2048
PRESETS = {"q2": (T.IQ2_XXS, T.Q2_K), "q4": (T.Q4_K, T.Q4_K)}
SHARED = T.Q8_0
CLAMP = 10.0


def timed(fn, reps):
    fn()
    cupy.cuda.Device().synchronize()
    out = []
    for _ in range(reps):
        a, b = cupy.cuda.Event(), cupy.cuda.Event()
        a.record()
        fn()
        b.record()
        b.synchronize()
        out.append(cupy.cuda.get_elapsed_time(a, b) * 1000.0)
    return statistics.median(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="512,2048")
    ap.add_argument("--experts", default="q2,q4")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--old-max", type=int, default=2048, help="skip the per-pair path above this many tokens")
    ap.add_argument("--no-pipe", action="store_true", help="leave out the pipelined grouped kernels")
    args = ap.parse_args()
    dev = cupy.cuda.Device()
    props = cupy.cuda.runtime.getDeviceProperties(dev.id)
    print(f"device: {props['name'].decode()}, {qo._sm_count(dev.id)} SMs; E={E} k={K} D={D} ff={FF}, "
          f"shared {SHARED.name}, reps {args.reps}; DS4_NVRTC_OPTIONS={os.environ.get('DS4_NVRTC_OPTIONS', '')!r} "
          f"(-DMG_PIPE_DEPTH=1 / 2: the pipelined kernels' depth, default 2)")
    print(f"{'experts':7} {'S':>5} {'variant':16} {'us':>10} {'TFLOP/s':>8} {'GB/s':>7}")
    rng = np.random.default_rng(0)
    for preset in args.experts.split(","):
        bench_preset(preset, args, rng)
        cupy.get_default_memory_pool().free_all_blocks()


def bench_preset(preset, args, rng):
    gu_t, dn_t = PRESETS[preset]
    gate = random_tensor(gu_t, (E, FF, D), seed=1, std=0.02)
    up = random_tensor(gu_t, (E, FF, D), seed=2, std=0.02)
    down = random_tensor(dn_t, (E, D, FF), seed=3, std=0.02)
    sg = random_tensor(SHARED, (FF, D), seed=4, std=0.02)
    su = random_tensor(SHARED, (FF, D), seed=5, std=0.02)
    sd = random_tensor(SHARED, (D, FF), seed=6, std=0.02)
    shared_t = {"gu": Q8_0R(FF), "dn": Q8_0R(D)}
    for w, cols in ((sg, D), (su, D), (sd, FF)):
        repack_q8_0(w, cols)
    rb = {gu_t: quants.row_bytes(gu_t, D), dn_t: quants.row_bytes(dn_t, FF)}
    for S in (int(s) for s in args.tokens.split(",")):
        ids_h = np.stack([rng.choice(E, size=K, replace=False) for _ in range(S)]).astype(np.int32)
        ids = cupy.asarray(ids_h)
        w = cupy.asarray(rng.uniform(0.1, 1.5, (S, K)).astype(np.float32))
        x = cupy.asarray(rng.standard_normal((S, D)).astype(np.float32))
        mid = cupy.empty((S, K, FF), np.float32)
        mids = cupy.empty((S, 1, FF), np.float32)
        yp = cupy.empty((S * K, D), np.float32)
        y_old = cupy.empty((S, D), np.float32)
        y_new = cupy.empty((S, D), np.float32)
        y_pipe = cupy.empty((S, D), np.float32)
        routing = mg.alloc_routing(S * K, E)

        def old():
            qo.moe_gate_up(gate, up, gu_t, x, ids, w, clamp=CLAMP, out=mid)
            qo.moe_down(down, dn_t, mid, ids, out=y_old)
            qo.moe_gate_up(sg, su, shared_t["gu"], x, clamp=CLAMP, out=mids)
            qo.moe_down(sd, shared_t["dn"], mids, out=y_old, accumulate=True)

        state = {"pipe": False, "y": y_new}

        def new_route():
            state["r"] = mg.route(ids, E, routing)

        def new_gate_up():
            mg.gate_up(gate, up, gu_t, x, state["r"], w, CLAMP, out=mid, pipe=state["pipe"])

        def new_down():
            mg.down(down, dn_t, mid, state["r"], out=yp, pipe=state["pipe"])

        def new_sum():
            mg.sum_slots(yp, K, out=state["y"])

        def new_shared():
            mg.gate_up(sg, su, shared_t["gu"], x, None, None, CLAMP, out=mids, pipe=state["pipe"])
            mg.down(sd, shared_t["dn"], mids, None, out=state["y"], accumulate=True, pipe=state["pipe"])

        def new():
            new_route()
            new_gate_up()
            new_down()
            new_sum()
            new_shared()

        n_distinct = len(np.unique(ids_h))
        nbytes = n_distinct * (2 * FF * rb[gu_t] + D * rb[dn_t]) + 2 * FF * quants.row_bytes(SHARED, D) \
            + D * quants.row_bytes(SHARED, FF)
        flops = 2.0 * 3 * FF * D * (S * K + S)
        rows = []
        if S <= args.old_max:
            rows.append(("old (per pair)", timed(old, args.reps)))
        for pipe in (False, True) if not args.no_pipe else (False,):
            state["pipe"], state["y"] = pipe, (y_pipe if pipe else y_new)
            rows.append(("new (pipelined)" if pipe else "new (grouped)", timed(new, args.reps)))
            new_route()
            for name, fn in (("  route", new_route), ("  gate/up", new_gate_up), ("  down", new_down),
                             ("  slot sum", new_sum), ("  shared", new_shared)):
                rows.append((name, timed(fn, args.reps)))
        for name, us in rows:
            whole = not name.startswith("  ")
            tf = f"{flops / us / 1e6:8.1f}" if whole else f"{'':8}"
            gb = f"{nbytes / us / 1e3:7.0f}" if whole else f"{'':7}"
            print(f"{preset:7} {S:5d} {name:16} {us:10.1f} {tf} {gb}")
        if not args.no_pipe:
            for pipe in (False, True):
                state["pipe"], state["y"] = pipe, (y_pipe if pipe else y_new)
                new()
            same = bool(np.array_equal(cupy.asnumpy(y_new), cupy.asnumpy(y_pipe), equal_nan=True))
            print(f"{preset:7} {S:5d} pipelined output bit-identical to grouped: {same}")
        if S <= args.old_max:
            old()
            state["pipe"], state["y"] = False, y_new
            new()
            a, b = cupy.asnumpy(y_old).astype(np.float64), cupy.asnumpy(y_new).astype(np.float64)
            print(f"{preset:7} {S:5d} rel diff new vs old |y_new - y_old| / |y_old| = "
                  f"{np.linalg.norm(b - a) / np.linalg.norm(a):.2e}; {n_distinct} distinct experts, "
                  f"{nbytes / 1e9:.2f} GB read once")


if __name__ == "__main__":
    main()
