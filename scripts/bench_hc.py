"""Microseconds per launch of the mHC kernels (kernels/hc.cu) at the flash decode shape, graph-captured:

    python3 scripts/bench_hc.py [--tokens 1] [--replays 20]

Flash: 4 streams x 4,096 columns, 24 mix rows of an F16 fn [24, 16384]. Rows: hc_step as the engine launches it
(post + mix + Sinkhorn (20 iterations) + collapse + norm) and variants that drop one piece, to see which part of the
launch costs what: iters 0 (no Sinkhorn), head mode, no norm, other split counts; then the three launches hc_step
replaced (hc_post, hc_mix, hc_split_collapse). Each launch's inputs are its own (n_launch copies rotate), so the
weight read is not served from L2 more than in the engine (the fn matrix is 786 KB: it stays in L2 across launches in
the engine too, since each layer's is read once per step).
"""
from __future__ import annotations

import argparse

from bench_matvec import time_graph   # scripts/ is on sys.path when a script runs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=1, help="tokens T a launch (1 = decode)")
    p.add_argument("--replays", type=int, default=20)
    p.add_argument("--launches", type=int, default=86, help="launches a graph (a flash step has 86 + the head)")
    a = p.parse_args(argv)
    import cupy as cp
    import numpy as np

    from ds4cupy.engines.cuda import ops
    n, D, rows, T, L = 4, 4096, 24, a.tokens, a.launches
    rng = np.random.default_rng(0)
    f16 = 1                                  # ops.dtype_code of F16
    fns = [cp.asarray((rng.standard_normal((rows, n * D)) * 0.02).astype(np.float16)) for _ in range(L)]
    Xs = [cp.asarray(rng.standard_normal((T, n, D)).astype(np.float32)) for _ in range(L)]
    y = cp.asarray(rng.standard_normal((T, D)).astype(np.float32))
    coef_in = cp.asarray(rng.uniform(0.1, 0.4, (T, n + n * n)).astype(np.float32))
    scale = cp.asarray(np.array([0.5, 0.5, 0.5], np.float32))
    base = cp.asarray(rng.standard_normal(rows).astype(np.float32) * 0.1)
    norm_w = cp.asarray(rng.uniform(0.5, 1.5, D).astype(np.float32))
    u = cp.empty((T, D), cp.float32)
    xn = cp.empty((T, D), cp.float32)
    coef = cp.empty((T, n + n * n), cp.float32)
    counter = cp.zeros(max(T, 1), cp.uint32)

    def step(ns, iters=20, head=False, post=True, norm=True):
        r = n if head else rows
        part = cp.empty((T, ns, r + 1), cp.float32)

        def launch(i):
            ops.hc_step(Xs[i], y if post else None, coef_in if post else None, fns[i], f16, r, part, ns, counter,
                        scale, base, 0 if head else iters, 1e-6, 1e-6, head, u, None if head else coef,
                        norm_w if norm else None, xn if norm else None)
        return launch

    ns0 = ops.hc_step_nsplit(n, D, T)
    rows_out = [(f"hc_step (engine: nsplit {ns0}, 20 iters, post, norm)", step(ns0))]
    rows_out += [("hc_step iters 0 (no Sinkhorn)", step(ns0, iters=0)),
                 ("hc_step iters 1", step(ns0, iters=1)),
                 ("hc_step head mode (4 rows, no Sinkhorn)", step(ns0, head=True)),
                 ("hc_step no post", step(ns0, post=False)),
                 ("hc_step no norm", step(ns0, norm=False))]
    for ns in (8, 16, 32, 128):
        if n * -(-D // ns) <= ops.HC_STEP_TILE:
            rows_out.append((f"hc_step nsplit {ns}", step(ns)))

    ns1 = ops.hc_nsplit(n * D, T)
    part1 = cp.empty((T, ns1, rows + 1), cp.float32)
    rows_out += [
        ("hc_post alone", lambda i: ops.hc_post(Xs[i], y, coef_in)),
        (f"hc_mix alone (nsplit {ns1})", lambda i: ops.hc_mix(Xs[i], fns[i], f16, rows, part1, ns1)),
        ("hc_split_collapse alone (+ norm)", lambda i: ops.hc_split_collapse(
            Xs[i], part1, ns1, rows, scale, base, 20, 1e-6, 1e-6, False, u, coef, norm_w, xn)),
        ("hc_split_collapse iters 0", lambda i: ops.hc_split_collapse(
            Xs[i], part1, ns1, rows, scale, base, 0, 1e-6, 1e-6, False, u, coef, norm_w, xn)),
    ]
    print(f"mHC kernels, T={T}, n={n}, D={D}, rows={rows}, fn F16; us per launch (median of {a.replays} replays of "
          f"{L} launches)")
    for name, launch in rows_out:
        print(f"{name:55s} {time_graph(cp, launch, L, a.replays):8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
