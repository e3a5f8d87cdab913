"""Per-kernel time of one decode step of a synthetic flash-shape model, for `ncu`:

    ncu --clock-control none --profile-from-start off --metrics gpu__time_duration.sum --csv \
        python3 scripts/profile_decode.py --layers 6 --depth 4096 > ncu.csv
    python3 scripts/profile_decode.py --summarize ncu.csv
    ncu --graph-profiling node ... python3 scripts/profile_decode.py --graph ...     (kernel nodes of a graph replay)
    python3 scripts/profile_decode.py --graph --time 50 ...                         (wall ms a step, no ncu)
    python3 scripts/profile_decode.py --ab DS4CUPY_PDL=0,1 --rounds 4 --time 50 ... (A/B of a switch, one model)
    ncu ... python3 scripts/profile_decode.py --prefill 2048 ...                     (the kernels of one prefill)

The script prefills `depth` tokens, runs two decode steps eagerly (kernels compiled and warm), then profiles exactly one
eager decode step between cudaProfilerStart/Stop. --summarize groups the ncu CSV by kernel name: launches, total us,
share of the step.
"""
from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict


def run(layers: int, depth: int, experts: str, fill: str = "prefill", graph: bool = False, time_steps: int = 0,
        prefill: int = 0) -> None:
    import cupy as cp
    import numpy as np

    from ds4cupy.tools.synthetic import load_synthetic
    model = load_synthetic(layers=layers, experts=experts, ctx=depth + 64 + time_steps + prefill)
    # eager launches, so ncu sees each kernel of the step; or the graph replay (ncu --graph-profiling node profiles
    # each kernel node of it, with the caches as the replay leaves them)
    model._impl.decode_graph = graph
    s = model.new_session(depth + 64 + time_steps + prefill)
    ids = np.random.default_rng(0).integers(0, 100000, max(depth, 1))
    if fill == "random":                      # the KV state of depth - 1 tokens (CudaSession.fill_random_state)
        s.fill_random_state(len(ids) - 1)
        ids = ids[-1:]
    s.prefill(ids)
    s.decode(5)
    s.decode(6)
    cp.cuda.runtime.deviceSynchronize()
    if time_steps:        # wall time of whole decode steps (no profiler attached: run this without ncu)
        print(f"decode step ({layers} layers, depth {depth}, graph={graph}): median {median_step_ms(s, time_steps):.3f} "
              f"ms over {time_steps} steps")
        return
    if prefill:           # one prefill of `prefill` new tokens after the depth (chunks as the engine cuts them)
        more = np.random.default_rng(1).integers(0, 100000, prefill)
        cp.cuda.profiler.start()
        s.prefill(more)
        cp.cuda.runtime.deviceSynchronize()
        cp.cuda.profiler.stop()
        return
    cp.cuda.profiler.start()
    s.decode(7)
    cp.cuda.runtime.deviceSynchronize()
    cp.cuda.profiler.stop()


def median_step_ms(s, steps: int) -> float:
    """The median wall time of `steps` decode steps of session s, in ms (token ids 8, 9, ...)."""
    import time

    import numpy as np
    t = []
    for i in range(steps):
        t0 = time.perf_counter()
        s.decode(8 + i)
        t.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(t))


def ab(layers: int, depth: int, experts: str, spec: str, rounds: int, time_steps: int) -> None:
    """A/B of one environment variable (VAR=a,b[,c..]) on one model: per round, a fresh session per value (order
    reversed every other round: a b b a ..., so a drift of the GPU over the run, e.g. its clocks warming up, falls on
    both sides), at the depth (random KV fill), decode graph captured, then the median wall time of time_steps
    steps. Switches the model holds are re-read per session (CudaModel.read_switches)."""
    import os

    import cupy as cp
    import numpy as np

    from ds4cupy.tools.synthetic import load_synthetic
    var, _, vals = spec.partition("=")
    values = vals.split(",")
    if not var or len(values) < 2:
        raise SystemExit(f"--ab {spec!r}: give VAR=a,b (two or more values)")
    steps = max(time_steps, 10)
    model = load_synthetic(layers=layers, experts=experts, ctx=depth + 64 + steps)
    model._impl.decode_graph = True
    ids = np.random.default_rng(0).integers(0, 100000, 1)
    res = {v: [] for v in values}
    for r in range(rounds):
        for v in (values if r % 2 == 0 else values[::-1]):
            os.environ[var] = v
            model._impl.read_switches()
            s = model.new_session(depth + 64 + steps)
            if depth > 1:
                s.fill_random_state(depth - 1)
            s.prefill(ids)
            s.decode(5)
            s.decode(6)                   # the decode graph is captured by now
            cp.cuda.runtime.deviceSynchronize()
            res[v].append(median_step_ms(s, steps))
            del s
    print(f"A/B {var} ({layers} layers, depth {depth}, {rounds} rounds of {steps} steps; ms a step, median per round)")
    base = float(np.median(res[values[0]]))
    for v in values:
        m = float(np.median(res[v]))
        print(f"  {var}={v}: median {m:.3f} ms ({100 * (m / base - 1):+.1f} % vs {values[0]}); rounds "
              + " ".join(f"{x:.3f}" for x in res[v]))


def summarize(path: str) -> None:
    per = defaultdict(lambda: [0, 0.0])
    with open(path, newline="") as f:
        lines = [ln for ln in f if ln.startswith('"')]
    for row in csv.DictReader(lines):
        if row.get("Metric Name") != "gpu__time_duration.sum":
            continue
        name = row["Kernel Name"].split("(")[0]
        v = float(row["Metric Value"].replace(",", ""))
        unit = row.get("Metric Unit", "nsecond")
        us = v / 1000 if unit.startswith("n") else (v if unit.startswith("u") else v * 1000)
        per[name][0] += 1
        per[name][1] += us
    total = sum(t for _, t in per.values())
    print(f"{'kernel':<48}{'launches':>9}{'total us':>11}{'share':>8}")
    for name, (n, t) in sorted(per.items(), key=lambda kv: -kv[1][1]):
        print(f"{name:<48}{n:>9}{t:>11.1f}{100 * t / total:>7.1f}%")
    print(f"{'all':<48}{sum(n for n, _ in per.values()):>9}{total:>11.1f}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--depth", type=int, default=4096)
    p.add_argument("--experts", default="q2")
    p.add_argument("--fill", choices=("prefill", "random"), default="prefill",
                   help="reach the depth by prefilling (default) or with random KV rows (fast at 64K and more)")
    p.add_argument("--graph", action="store_true",
                   help="profile a replay of the captured decode graph (with ncu --graph-profiling node)")
    p.add_argument("--time", type=int, default=0, metavar="N",
                   help="instead of profiling, print the median wall time of N decode steps (run without ncu)")
    p.add_argument("--prefill", type=int, default=0, metavar="N",
                   help="profile a prefill of N tokens (after the depth) instead of a decode step")
    p.add_argument("--att-max-splits", type=int, default=0, metavar="N",
                   help="decode attention: at most N splits a layer (session.DECODE_MAX_SPLITS; 0 = the engine's)")
    p.add_argument("--ab", metavar="VAR=a,b", help="A/B of an environment variable on one model (see ab())")
    p.add_argument("--rounds", type=int, default=4, help="--ab: rounds (each value once a round, order alternating)")
    p.add_argument("--summarize", metavar="NCU_CSV")
    a = p.parse_args()
    if a.att_max_splits:
        from ds4cupy.engines.cuda import session as _session
        _session.DECODE_MAX_SPLITS = a.att_max_splits
    if a.summarize:
        summarize(a.summarize)
    elif a.ab:
        ab(a.layers, a.depth, a.experts, a.ab, a.rounds, a.time)
    else:
        run(a.layers, a.depth, a.experts, a.fill, a.graph, a.time, a.prefill)
    sys.exit(0)
