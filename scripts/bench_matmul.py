#!/usr/bin/env python3
"""Prefill dense-projection bench: the float32 CUDA-core kernels (matmul.cu, quant_ops.matmul(precise=True)) against
the tensor-core kernels (matmul_mma.cu, the default for Q8_0 / Q8_0R / F16 at n >= 16) at the flash model's shapes.

For each shape and token count n (default 512 and 2048): random valid weights on the GPU
(ds4cupy.engines.cuda.random_weights), Q8_0 in the GGUF layout and repacked (Q8_0R, one slab per matrix or per
group as the loader repacks them), random float32 activations; each kernel is launched once to warm up, then timed
with CUDA events over --reps launches (median of 3 rounds). TFLOP/s = 2 n rows cols / time (the useful work; the mma
kernel does twice that on the tensor cores: hi + lo fp16 activations). err = relative Frobenius difference of the
mma output to the float32 kernel's (float32-level, ~1e-6; fp16-level would be ~2e-4).
The grouped attention output projection is timed three ways: one matmul_xgroup launch (mma), the same through the
fallback (8 float32 matmuls on per-group copies: what session.py did before), and 8 separate mma products.

    python scripts/bench_matmul.py                  # all shapes, n = 512, 2048
    python scripts/bench_matmul.py --n 2048 --only q_b
"""
from __future__ import annotations

import argparse
import statistics

import numpy as np
from gguf import GGMLQuantizationType as T

# (name, qtype, rows, cols, groups): groups > 1 is the grouped output projection (rows and cols of all groups)
SHAPES = [
    ("attn_q_a", T.Q8_0, 1024, 4096, 1),
    ("attn_kv", T.Q8_0, 512, 4096, 1),
    ("attn_q_b", T.Q8_0, 32768, 1024, 1),
    ("attn_out_a (8 groups)", T.Q8_0, 8192, 32768, 8),
    ("attn_out_b", T.Q8_0, 4096, 8192, 1),
    ("compressor kv (f16)", T.F16, 1024, 4096, 1),
    ("indexer q_b (f16)", T.F16, 8192, 1024, 1),
    ("router (f16)", T.F16, 256, 4096, 1),
]


def timed(cp, fn, reps: int) -> float:
    """Median seconds per call over 3 rounds of `reps` calls."""
    fn()
    e0, e1 = cp.cuda.Event(), cp.cuda.Event()
    times = []
    for _ in range(3):
        e0.record()
        for _ in range(reps):
            fn()
        e1.record()
        e1.synchronize()
        times.append(cp.cuda.get_elapsed_time(e0, e1) / 1e3 / reps)
    return statistics.median(times)


def rel(a, b) -> float:
    import cupy as cp
    return float(cp.linalg.norm(a - b) / cp.linalg.norm(b))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", default="512,2048", help="token counts, comma separated (default 512,2048)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--only", default="", help="run the shapes whose name contains this")
    args = ap.parse_args(argv)
    import cupy as cp

    from ds4cupy.engines.cuda import quant_ops as qo
    from ds4cupy.engines.cuda.random_weights import random_tensor

    dev = cp.cuda.Device()
    print(f"device {cp.cuda.runtime.getDeviceProperties(dev.id)['name'].decode()}, sm_{dev.compute_capability}")
    print(f"{'shape':<24} {'layout':<6} {'n':>5} {'fp32 us':>10} {'TF/s':>6} {'mma us':>10} {'TF/s':>6} "
          f"{'speedup':>7} {'err':>8}")
    for n in (int(v) for v in args.n.split(",")):
        for name, qt, rows, cols, groups in SHAPES:
            if args.only and args.only not in name:
                continue
            gin = cols // groups
            R = rows // groups
            w = random_tensor(qt, (rows, gin), seed=1, std=0.02)
            layouts = [("gguf", w, qt)]
            if qt == T.Q8_0:
                wr = w.copy()
                qo.repack_q8_0(wr, gin, R)
                layouts.append(("q8_0r", wr, qo.Q8_0R(R)))
            x = cp.asarray(np.random.default_rng(0).standard_normal((n, cols)).astype(np.float32))
            y0 = cp.empty((n, rows), cp.float32)
            y1 = cp.empty((n, rows), cp.float32)
            flops = 2.0 * n * rows * gin
            for lname, wl, t in layouts:
                if groups == 1:
                    slow = lambda: qo.matmul(wl, t, x, out=y0, precise=True)      # noqa: E731
                    fast = lambda: qo.matmul(wl, t, x, out=y1)                     # noqa: E731
                else:
                    slow = lambda: qo.matmul_xgroup(wl, t, x, groups, out=y0, precise=True)  # noqa: E731
                    fast = lambda: qo.matmul_xgroup(wl, t, x, groups, out=y1)                # noqa: E731
                ts, tf = timed(cp, slow, args.reps), timed(cp, fast, args.reps)
                print(f"{name:<24} {lname:<6} {n:>5} {ts * 1e6:>10.1f} {flops / ts / 1e12:>6.1f} "
                      f"{tf * 1e6:>10.1f} {flops / tf / 1e12:>6.1f} {ts / tf:>7.1f} {rel(y1, y0):>8.1e}")
                if groups > 1:
                    xs = [cp.ascontiguousarray(x[:, g * gin:(g + 1) * gin]) for g in range(groups)]
                    ys = [cp.empty((n, R), cp.float32) for _ in range(groups)]

                    def separate():
                        for g in range(groups):
                            qo.matmul(wl[g * R:(g + 1) * R], t, xs[g], out=ys[g])
                    tsep = timed(cp, separate, args.reps)
                    print(f"{'  8 separate mma':<24} {lname:<6} {n:>5} {'':>10} {'':>6} {tsep * 1e6:>10.1f} "
                          f"{flops / tsep / 1e12:>6.1f}   (inputs pre-split, no copies counted)")


if __name__ == "__main__":
    main()
