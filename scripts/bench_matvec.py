#!/usr/bin/env python3
"""Decode matvec bench: every matvec shape of a flash-shape decode step, kernel variants side by side.

For each shape: random valid weights on the GPU (ds4cupy.engines.cuda.random_weights), enough copies that one pass over them
is several times the L2 cache (so every launch reads HBM), a CUDA graph of launches that cycles through the copies,
timed with CUDA events over many replays (median per launch, each variant timed twice; the spread is printed).
Bytes per launch = weight bytes + x + y.
  wrapper  ds4cupy.engines.cuda.quant_ops.matvec / MatvecGroup.run as they are now ("rule": its warps per row)
  wprN     matvec_<t> / matvec_group_<t> launched directly with N warps per row (1, 2, 4, 8)
Every variant's output (NaN-poisoned first) is compared with wpr1's (relative error; NaN = an unwritten element).
Roofline: a device-to-device copy (read + write bytes) and a streaming uint4 read of a 1 GiB buffer.

Second table (--section q8r or all): Q8_0 in the GGUF layout (quant_ops with T.Q8_0: matvec_q8_0 / matvec_xgroup_q8_0)
against the same weights repacked into planes (Q8_0R, engines/cuda/q8_0r.py) at the flash decode shapes, both through
quant_ops (the repacked one with its default geometry "auto" and every (rows per warp, warps per row) variant);
GB/s = (weights + x + y bytes) / time, % of the stream read; err = relative difference to the GGUF-layout output.
"q8r int8-x" is the optional int8-activation path (quantize_q8x once per step, dp4a kernels; its err is the q8_1
activation rounding, ~5e-3, not a bug); the quantize launch itself is timed apart ("quantize_q8x").
"""
from __future__ import annotations

import argparse
import statistics

import numpy as np
from gguf import GGMLQuantizationType as T

# (name, qtype, rows, cols, matrices sharing x (MatvecGroup) or 1 for a plain matvec)
SHAPES = [
    ("attn_q_a", T.Q8_0, 1024, 4096, 1),
    ("attn_q_b", T.Q8_0, 32768, 1024, 1),
    ("attn_kv", T.Q8_0, 512, 4096, 1),
    ("attn_out_a (1 of 8)", T.Q8_0, 1024, 4096, 1),
    ("attn_out_b", T.Q8_0, 4096, 8192, 1),
    ("shexp gate+up (group)", T.Q8_0, 2048, 4096, 2),
    ("shexp down", T.Q8_0, 4096, 2048, 1),
    ("lm_head", T.Q8_0, 129280, 4096, 1),
    ("square 4096", T.Q8_0, 4096, 4096, 1),
    ("f16 router 256x4096", T.F16, 256, 4096, 1),
    ("f16 1024x4096", T.F16, 1024, 4096, 1),
    ("f16 4096x4096", T.F16, 4096, 4096, 1),
    ("bf16 4096x4096", T.BF16, 4096, 4096, 1),
    ("f32 4096x4096", T.F32, 4096, 4096, 1),
]


def roofline(cp) -> tuple[float, float]:
    from ds4cupy.memory.arena import stream_read
    n = 1 << 30
    a = cp.empty(n, cp.uint8)
    a[:] = 1
    b = cp.empty_like(a)
    cp.copyto(b, a)
    e0, e1 = cp.cuda.Event(), cp.cuda.Event()
    times = []
    for _ in range(5):
        e0.record()
        for _ in range(5):
            cp.copyto(b, a)
        e1.record()
        e1.synchronize()
        times.append(cp.cuda.get_elapsed_time(e0, e1) / 5)
    copy_gbs = 2 * n / (statistics.median(times) * 1e-3) / 1e9
    read_gbs = stream_read(a, reps=20)[0]
    del a, b
    return copy_gbs, read_gbs


def time_graph(cp, launch, n_launch: int, replays: int) -> float:
    """Median microseconds per launch of `launch(i)`, i = 0..n_launch-1, captured in one graph."""
    s = cp.cuda.Stream(non_blocking=True)
    with s:
        for i in range(n_launch):  # warm-up (compile, module load) outside the capture
            launch(i)
        s.synchronize()
        s.begin_capture()
        for i in range(n_launch):
            launch(i)
        g = s.end_capture()
        g.launch(s)
        s.synchronize()
        e0, e1 = cp.cuda.Event(), cp.cuda.Event()
        times = []
        for _ in range(replays):
            e0.record(s)
            g.launch(s)
            e1.record(s)
            e1.synchronize()
            times.append(cp.cuda.get_elapsed_time(e0, e1) * 1e3 / n_launch)
    return statistics.median(times)


# (name, rows, cols, input groups): flash Q8_0 decode products; groups > 1 is matvec_xgroup (row block g reads x[g])
Q8R_SHAPES = [
    ("attn_q_a 4096->1024", 1024, 4096, 1),
    ("attn_q_b 1024->32768", 32768, 1024, 1),
    ("attn_kv 4096->512", 512, 4096, 1),
    ("attn_out_a 8x(4096->1024)", 8192, 4096, 8),
    ("attn_out_b 8192->4096", 4096, 8192, 1),
    ("shexp down 2048->4096", 4096, 2048, 1),
    ("lm_head 4096->129280", 129280, 4096, 1),
]


def bench_q8r(cp, args, read_gbs: float) -> None:
    """Old (GGUF layout) vs repacked Q8_0 at the flash shapes (see the module docstring)."""
    from ds4cupy.engines.cuda import quant_ops as qo
    from ds4cupy.engines.cuda.random_weights import random_tensor
    from ds4cupy.format import quants

    out = []
    for name, rows, cols, groups in Q8R_SHAPES:
        if args.only and args.only not in name:
            continue
        rb = quants.row_bytes(T.Q8_0, cols)
        wbytes = rows * rb
        copies = max(2, min(256, int(args.rotate_mb * 1e6 // wbytes) + 1))
        old = [random_tensor(T.Q8_0, (rows, cols), seed=7000 + c, std=0.05) for c in range(copies)]
        slab = rows // groups
        new = []
        for w in old:
            r = w.copy()
            qo.repack_q8_0(r, cols, slab)
            new.append(r)
        q8r = qo.Q8_0R(slab)
        xin = cp.asarray(np.random.default_rng(2).standard_normal((groups, cols)).astype(np.float32))
        x = xin[0] if groups == 1 else xin
        xa = qo.quantize_q8x(x)
        fn = qo.matvec if groups == 1 else qo.matvec_xgroup

        def launcher(ws, qt, geometry=None, xv=x):
            def make(y):
                def launch(i):
                    c = i % copies
                    fn(ws[c], qt, xv, out=y[c], geometry=geometry)    # geometry: Q8_0R only (quant_ops)
                return launch
            return make

        variants = [("gguf", launcher(old, T.Q8_0)), ("q8r auto", launcher(new, q8r)),
                    ("q8r int8-x", launcher(new, q8r, xv=xa))]
        for nr in (1, 2, 4):
            if groups > 1 and slab % nr:
                continue
            for wpr in (1, 2, 4, 8):
                variants.append((f"q8r nr{nr} w{wpr}", launcher(new, q8r, (nr, wpr))))
        n_launch = max(args.launches, copies)
        n_launch = (n_launch + copies - 1) // copies * copies
        res, ys = {}, {}
        for vname, mk in variants:
            y = cp.full((copies, rows), np.nan, np.float32)
            f = mk(y)
            a = time_graph(cp, f, n_launch, args.replays)
            b = time_graph(cp, f, n_launch, args.replays)
            res[vname] = min(a, b)
            ys[vname] = y
        cp.cuda.Device().synchronize()
        t_quant = time_graph(cp, lambda i: qo.quantize_q8x(x, out=xa), 16, args.replays)
        ref = cp.asnumpy(ys["gguf"]).astype(np.float64)
        nbytes = wbytes + groups * cols * 4 + rows * 4
        geo = qo.q8r_launch_geometry(rows, cols, slab if groups > 1 else 0)
        row = []
        for vname, us in res.items():
            yy = cp.asnumpy(ys[vname]).astype(np.float64)
            err = np.inf if np.isnan(yy).any() else float(np.linalg.norm(yy - ref) / np.linalg.norm(ref))
            row.append((vname, us, nbytes / us / 1e3, err))
        out.append((name, nbytes, geo, row, t_quant))
        best = min((r for r in row[1:] if "int8" not in r[0]), key=lambda r: r[1])
        print(f"  {name}: gguf {row[0][1]:.2f}us {row[0][2]:.0f} GB/s | q8r auto {row[1][1]:.2f}us {row[1][2]:.0f} GB/s "
              f"(nr, wpr) = {geo} | best {best[0]} {best[1]:.2f}us {best[2]:.0f} GB/s | quantize_q8x {t_quant:.2f}us "
              f"[{copies} copies]", flush=True)
        old = new = ys = xa = None
        cp.get_default_memory_pool().free_all_blocks()

    print(f"\nQ8_0: GGUF layout vs repacked (Q8_0R); stream read {read_gbs:.0f} GB/s; err vs the GGUF-layout output")
    print(f"{'shape':28s} {'MB':>7s} {'variant':>16s} {'us':>8s} {'GB/s':>6s} {'%read':>5s} {'err':>8s}")
    for name, nb, geo, row, t_quant in out:
        for i, (vname, us, gbs, err) in enumerate(row):
            if i > 2 and args.brief:
                continue
            tag = f"{vname} {geo}" if vname == "q8r auto" else vname
            bad = not err <= (2e-2 if "int8" in vname else 2e-5)
            mb = f"{nb / 1e6:7.2f}" if i == 0 else ""
            print(f"{name if i == 0 else '':28s} {mb:>7s} {tag:>16s} {us:8.2f} {gbs:6.0f} "
                  f"{100 * gbs / read_gbs:5.0f} {err:8.1e}" + (" BAD" if bad else ""))
        best = min((r for r in row[1:] if "int8" not in r[0]), key=lambda r: r[1])
        print(f"{'':28s} {'best':>7s} {best[0]:>16s} {best[1]:8.2f} {best[2]:6.0f} {100 * best[2] / read_gbs:5.0f}")
        print(f"{'':28s} {'':7s} {'quantize_q8x':>16s} {t_quant:8.2f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rotate-mb", type=float, default=400.0, help="bytes of weight copies cycled through (MB)")
    ap.add_argument("--launches", type=int, default=64, help="launches per graph (at least one pass over the copies)")
    ap.add_argument("--replays", type=int, default=25)
    ap.add_argument("--only", default="", help="substring filter on shape names")
    ap.add_argument("--section", choices=("all", "types", "q8r"), default="all",
                    help="types: the per-type table; q8r: Q8_0 GGUF layout vs repacked; all: both")
    ap.add_argument("--brief", action="store_true",
                    help="q8r table: only the GGUF, the default repacked and the int8-activation rows")
    args = ap.parse_args(argv)

    import cupy as cp

    from ds4cupy.format import quants
    from ds4cupy.engines.cuda import quant_ops as qo
    from ds4cupy.engines.cuda.compile import get_kernel
    from ds4cupy.engines.cuda.random_weights import random_tensor

    dev = cp.cuda.Device()
    props = cp.cuda.runtime.getDeviceProperties(dev.id)
    print(f"device: {props['name'].decode()}  SMs {dev.attributes['MultiProcessorCount']}  "
          f"L2 {dev.attributes['L2CacheSize'] / 2**20:.0f} MiB")
    copy_gbs, read_gbs = roofline(cp)
    print(f"roofline: copy {copy_gbs:.0f} GB/s (read+write), stream read {read_gbs:.0f} GB/s")

    if args.section in ("all", "q8r"):
        bench_q8r(cp, args, read_gbs)
    if args.section == "q8r":
        return 0

    rows_out = []
    for name, t, rows, cols, n_mat in SHAPES:
        if args.only and args.only not in name:
            continue
        rb = quants.row_bytes(t, cols)
        wbytes = rows * rb * n_mat
        copies = max(2, min(256, int(args.rotate_mb * 1e6 // wbytes) + 1))
        sets = [[random_tensor(t, (rows, cols), seed=1000 * c + m, std=0.05) for m in range(n_mat)]
                for c in range(copies)]
        x = cp.asarray(np.random.default_rng(1).standard_normal(cols).astype(np.float32))
        total_rows = rows * n_mat
        suffix = qo._SUFFIX[t]
        groups = [qo.MatvecGroup(s, t, cols) for s in sets] if n_mat > 1 else None
        k_old = get_kernel("matvec", f"matvec_{suffix}" if n_mat == 1 else f"matvec_group_{suffix}")

        def old_launcher(wpr, y):
            grid = (qo.row_blocks(total_rows, wpr),)

            def launch(i):
                c = i % copies
                if n_mat == 1:
                    k_old(grid, (256,), (sets[c][0], np.int64(rb), x, y[c], np.int32(rows), np.int32(cols),
                                         np.int32(wpr)))
                else:
                    gr = groups[c]
                    k_old(grid, (256,), (gr._ptrs, gr._row_start, np.int32(n_mat), np.int64(rb), x, y[c],
                                         np.int32(total_rows), np.int32(cols), np.int32(wpr)))
            return launch

        def wrapper_launcher(y):
            def launch(i):
                c = i % copies
                if n_mat == 1:
                    qo.matvec(sets[c][0], t, x, out=y[c])
                else:
                    groups[c].run(x, out=y[c])
            return launch

        variants = [("wrapper", wrapper_launcher)] + [(f"wpr{w}", (lambda w: lambda y: old_launcher(w, y))(w))
                                                       for w in (1, 2, 4, 8)]
        n_launch = max(args.launches, copies)
        n_launch = (n_launch + copies - 1) // copies * copies
        res = {}
        ys = {}
        for vname, mk in variants:
            y = cp.full((copies, total_rows), np.nan, np.float32)
            fn = mk(y)
            a = time_graph(cp, fn, n_launch, args.replays)
            b = time_graph(cp, fn, n_launch, args.replays)  # twice: the spread of one version
            res[vname] = (min(a, b), abs(a - b) / min(a, b))
            ys[vname] = y
        cp.cuda.Device().synchronize()
        ref = cp.asnumpy(ys["wpr1"]).astype(np.float64)
        errs = {}
        for vname, y in ys.items():
            yy = cp.asnumpy(y).astype(np.float64)
            errs[vname] = np.inf if np.isnan(yy).any() else float(np.linalg.norm(yy - ref) / np.linalg.norm(ref))
        nbytes = wbytes + cols * 4 + total_rows * 4
        rows_out.append((name, t.name, f"{total_rows}x{cols}", nbytes, res, errs, qo.warps_per_row(total_rows)))
        print(f"  {name}: " + "  ".join(f"{v} {us:.2f}us (spread {100 * sp:.1f}%, err {errs[v]:.1e})"
                                       for v, (us, sp) in res.items()) + f"  [{copies} copies]", flush=True)
        sets = groups = ys = None
        cp.get_default_memory_pool().free_all_blocks()

    print(f"\nroofline: copy {copy_gbs:.0f} GB/s (read+write), stream read {read_gbs:.0f} GB/s; % is of copy")
    names = ["wrapper", "wpr1", "wpr2", "wpr4", "wpr8"]
    print(f"{'shape':22s} {'type':5s} {'rows x cols':>12s} {'MB':>6s} {'rule':>4s} "
          + " ".join(f"{n + ' us':>9s}" for n in names) + f" {'wrap GB/s':>9s} {'%':>3s} {'best':>6s} {'GB/s':>5s}")
    for name, tn, shp, nb, res, errs, rule in rows_out:
        best = min(res, key=lambda v: res[v][0])
        gw, gb = nb / res["wrapper"][0] / 1e3, nb / res[best][0] / 1e3
        bad = [v for v, e in errs.items() if not e < 1e-5]
        print(f"{name:22s} {tn:5s} {shp:>12s} {nb / 1e6:6.2f} {rule:4d} "
              + " ".join(f"{res[n][0]:9.2f}" if n in res else f"{'-':>9s}" for n in names)
              + f" {gw:9.0f} {100 * gw / copy_gbs:3.0f} {best:>6s} {gb:5.0f}" + (f" BAD {bad}" if bad else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
