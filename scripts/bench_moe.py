"""Time the decode MoE kernels at DeepSeek-V4-Flash shapes (256 experts, 6 selected, hidden 4096, ff 2048), old vs new.

    python scripts/bench_moe.py [--reps 200]

q2: IQ2_XXS gate/up + Q2_K down; q4: Q4_K gate/up + Q4_K down. Weights are random valid blocks made on the GPU
(ds4cupy.engines.cuda.random_weights, no file). "old" is the generic per-row kernel (moe_gate_up_<type> / moe_down_<type>, launched as quant_ops did before),
"new" is what ds4cupy.engines.cuda.quant_ops.moe_gate_up / moe_down launch now. Every timed launch gets a different set of 6
expert ids (so the weights come from HBM, not L2), each timed alone between two CUDA events while the GPU is kept busy
by a spin kernel (no launch gaps inside the timed region); median over the reps. GB/s counts the bytes of the 6
selected experts' matrices. Also checks new against old on the same inputs (relative error of the outputs).
"""
from __future__ import annotations

import argparse
import statistics

import cupy
import numpy as np
from gguf import GGMLQuantizationType as T

from ds4cupy.format import quants
from ds4cupy.engines.cuda import quant_ops as ops
from ds4cupy.engines.cuda.compile import get_kernel
from ds4cupy.engines.cuda.random_weights import random_tensor

E, K, D, FF = 256, 6, 4096, 2048
SUFFIX = {T.IQ2_XXS: "iq2_xxs", T.Q2_K: "q2_k", T.Q4_K: "q4_k"}

_SPIN = cupy.RawKernel(r"""
extern "C" __global__ void spin(long long cycles) {
    long long t0 = clock64();
    while (clock64() - t0 < cycles) { }
}""", "spin")


def random_stack(t, rows, cols, seed):
    w = random_tensor(t, (E, rows, cols), seed=seed, std=0.02)
    return w, quants.row_bytes(t, cols)


def old_gate_up(t, gate, up, rb, x, ids, wts, mid, clamp=10.0):
    wpr = ops.warps_per_row(FF * K)
    kern = get_kernel("moe", f"moe_gate_up_{SUFFIX[t]}")
    kern((ops.row_blocks(FF, wpr), K), (256,),
         (gate, up, np.int64(FF * rb), np.int64(rb), ids, wts, np.int32(K), np.int32(E), x, np.int32(D), mid,
          np.int32(FF), np.float32(clamp), np.int32(wpr)))


def old_down(t, down, rb, mid, ids, y):
    wpr = ops.warps_per_row(D)
    kern = get_kernel("moe", f"moe_down_{SUFFIX[t]}")
    kern((ops.row_blocks(D, wpr), 1), (256,),
         (down, np.int64(D * rb), np.int64(rb), ids, np.int32(K), np.int32(E), mid, np.int32(FF), y, np.int32(D),
          np.int32(0), np.int32(wpr)))


def time_launches(fn, n_ids, reps, batch=25):
    """fn(i) launches once with id set i; returns the median time of one launch in microseconds."""
    for i in range(5):
        fn(i % n_ids)
    cupy.cuda.Device().synchronize()
    times = []
    evs = [(cupy.cuda.Event(), cupy.cuda.Event()) for _ in range(batch)]
    done = 0
    while done < reps:
        _SPIN((1,), (1,), (np.int64(3_000_000),))  # ~2 ms: the launches below queue up behind it
        for j, (a, b) in enumerate(evs):
            a.record()
            fn((done + j) % n_ids)
            b.record()
        evs[-1][1].synchronize()
        times += [cupy.cuda.get_elapsed_time(a, b) * 1000.0 for a, b in evs]
        done += batch
    return statistics.median(times)


def rel(a, b):
    a, b = cupy.asnumpy(a).astype(np.float64), cupy.asnumpy(b).astype(np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=200)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    n_ids = 64
    ids_all = cupy.asarray(np.stack([rng.choice(E, size=K, replace=False) for _ in range(n_ids)])
                           .astype(np.int32).reshape(n_ids, 1, K))
    wts_all = cupy.asarray(rng.uniform(0.1, 1.5, size=(n_ids, 1, K)).astype(np.float32))
    x = cupy.asarray(rng.standard_normal((1, D)).astype(np.float32))
    dev = cupy.cuda.Device()
    import os
    switches = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("DS4CUPY_"))
    print(f"variant: DS4_NVRTC_OPTIONS={os.environ.get('DS4_NVRTC_OPTIONS', '')!r} {switches}")
    print(f"device: {cupy.cuda.runtime.getDeviceProperties(dev.id)['name'].decode()}, "
          f"{ops._sm_count(dev.id)} SMs; reps {args.reps}, {n_ids} id sets")
    rows = []
    for name, gu_t, dn_t in [("q2", T.IQ2_XXS, T.Q2_K), ("q4", T.Q4_K, T.Q4_K)]:
        gate, rb_gu = random_stack(gu_t, FF, D, 1)
        up, _ = random_stack(gu_t, FF, D, 2)
        down, rb_dn = random_stack(dn_t, D, FF, 3)
        mid_old = cupy.empty((1, K, FF), np.float32)
        mid_new = cupy.empty((1, K, FF), np.float32)
        y_old = cupy.empty((1, D), np.float32)
        y_new = cupy.empty((1, D), np.float32)
        # correctness at flash shape: new vs old on the same inputs (down on the same mid)
        old_gate_up(gu_t, gate, up, rb_gu, x, ids_all[0], wts_all[0], mid_old)
        ops.moe_gate_up(gate, up, gu_t, x, ids_all[0], wts_all[0], clamp=10.0, out=mid_new)
        old_down(dn_t, down, rb_dn, mid_old, ids_all[0], y_old)
        ops.moe_down(down, dn_t, mid_old, ids_all[0], out=y_new)
        err_gu, err_dn = rel(mid_new, mid_old), rel(y_new, y_old)
        gu_bytes = K * 2 * FF * rb_gu
        dn_bytes = K * D * rb_dn
        t = {
            "gate_up old": time_launches(lambda i: old_gate_up(gu_t, gate, up, rb_gu, x, ids_all[i], wts_all[i],
                                                               mid_old), n_ids, args.reps),
            "gate_up new": time_launches(lambda i: ops.moe_gate_up(gate, up, gu_t, x, ids_all[i], wts_all[i],
                                                                   clamp=10.0, out=mid_new), n_ids, args.reps),
            "down old": time_launches(lambda i: old_down(dn_t, down, rb_dn, mid_old, ids_all[i], y_old),
                                      n_ids, args.reps),
            "down new": time_launches(lambda i: ops.moe_down(down, dn_t, mid_old, ids_all[i], out=y_new),
                                      n_ids, args.reps),
        }
        # repeat "new" once more: the spread between two timings of the same kernel is the noise
        t["gate_up new (again)"] = time_launches(lambda i: ops.moe_gate_up(gate, up, gu_t, x, ids_all[i],
                                                                           wts_all[i], clamp=10.0, out=mid_new),
                                                 n_ids, args.reps)
        for key, us in t.items():
            nbytes = gu_bytes if key.startswith("gate_up") else dn_bytes
            ty = gu_t.name if key.startswith("gate_up") else dn_t.name
            rows.append((name, key, ty, nbytes / 1e6, us, nbytes / us / 1e3))
        rows.append((name, f"rel err new vs old: gate_up {err_gu:.2e}, down {err_dn:.2e}", "", 0, 0, 0))
        del gate, up, down
        cupy.get_default_memory_pool().free_all_blocks()
    print(f"{'model':5} {'kernel':22} {'type':8} {'MB':>7} {'us':>8} {'GB/s':>7}")
    for name, key, ty, mb, us, gbs in rows:
        if not ty:
            print(f"{name:5} {key}")
        else:
            print(f"{name:5} {key:22} {ty:8} {mb:7.2f} {us:8.1f} {gbs:7.0f}")


if __name__ == "__main__":
    main()
