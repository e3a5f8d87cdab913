#!/usr/bin/env python3
"""Weight placement bench: load time (cold file) and streaming read bandwidth of each placement.

Writes a SIZE GiB file of pseudo-random bytes, drops it from the page cache, then:
  raw        cudaMalloc buffer filled by cupy (device memory's read bandwidth, the roofline here)
  device     place_weights(..., "device")   cudaMalloc + pinned staging, reads overlapped with copies
  managed    place_weights(..., "managed")  cudaMallocManaged + ReadMostly + PreferredLocation + prefetch
  unhinted   cudaMallocManaged filled by the CPU, no advice, no prefetch (pages migrate on first GPU touch)
Bandwidth = a uint4 streaming-sum kernel over the whole buffer (ds4cupy.memory.arena.stream_read); its checksum is
checked against every placement. GB10 anchors from ds4: device cache 118 GB/s, managed + hints 97, unhinted 68.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np


def write_file(path: str, nbytes: int, block: int = 64 << 20) -> None:
    rng = np.random.default_rng(7)
    base = rng.integers(0, 256, block, dtype=np.uint8)
    with open(path, "wb") as f:
        done = 0
        i = 0
        while done < nbytes:
            n = min(block, nbytes - done)
            b = base[:n].copy()
            b[:8] = np.frombuffer(np.uint64(i).tobytes(), np.uint8)
            f.write(b.tobytes())
            done += n
            i += 1
        f.flush()
        os.fsync(f.fileno())


def drop_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=4.0, help="file size in GiB (default 4)")
    ap.add_argument("--path", default="/tmp/ds4cupy_bench_weights.bin")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--keep", action="store_true", help="keep the file")
    args = ap.parse_args(argv)

    import cupy as cp

    from ds4cupy.memory import DeviceMemory, detect, place_weights
    from ds4cupy.memory.arena import stream_read
    from ds4cupy.memory.weights import _host_view, _pread_into

    m = detect()
    nbytes = int(args.gib * (1 << 30)) // (1 << 20) * (1 << 20)
    need = 2 * nbytes + (256 << 20)   # at most two buffers on the GPU at once
    if need > m.device_free:
        print(f"{args.gib} GiB needs {need / 2**30:.1f} GiB free on the GPU, {m.device_free / 2**30:.1f} free",
              file=sys.stderr)
        return 2
    print(f"machine: {m}")
    t = time.perf_counter()
    write_file(args.path, nbytes)
    print(f"wrote {nbytes / 1e9:.2f} GB in {time.perf_counter() - t:.1f} s")
    table = [("blk.0.ffn_up_exps.weight", 0, nbytes, np.uint8, (nbytes // (1 << 20), 1 << 20))]
    rows = []
    try:
        mem = DeviceMemory()
        raw = mem.alloc("bench.raw", (nbytes,), np.uint8)
        with open(args.path, "rb") as f:     # raw: the same bytes, filled through cupy in 256 MiB pieces
            step = 256 << 20
            for off in range(0, nbytes, step):
                raw[off:off + step].set(np.frombuffer(f.read(step), np.uint8))
        gbps, ref, first = stream_read(raw, args.reps)
        rows.append(("raw cudaMalloc", gbps, first, None))
        mem.release("bench.raw")
        del raw

        for mode in ("device", "managed"):
            drop_cache(args.path)
            mem = DeviceMemory()
            w = place_weights(args.path, table, mode, mem, progress=True)
            a = w["blk.0.ffn_up_exps.weight"]
            gbps, s, first = stream_read(a, args.reps)
            if s != ref:
                raise SystemExit(f"{mode}: checksum {s:#x} != raw {ref:#x}")
            rows.append((f"{mode} ({w.hints_api})" if mode == "managed" else mode, gbps, first,
                         (w.seconds, w.gbps)))
            del w, a
            mem.release("weights.experts")

        drop_cache(args.path)
        mem = DeviceMemory()
        a = mem.alloc("bench.unhinted", (nbytes,), np.uint8, managed=True)
        t = time.perf_counter()
        fd = os.open(args.path, os.O_RDONLY)
        view = _host_view(int(a.data.ptr), nbytes)
        for off in range(0, nbytes, 64 << 20):
            _pread_into(fd, view[off:off + (64 << 20)], off, args.path)
        os.close(fd)
        load = time.perf_counter() - t
        gbps, s, first = stream_read(a, args.reps)
        if s != ref:
            raise SystemExit(f"unhinted: checksum {s:#x} != raw {ref:#x}")
        rows.append(("managed, no hints", gbps, first, (load, nbytes / load / 1e9)))
        del a, view
        mem.release("bench.unhinted")
        cp.get_default_memory_pool().free_all_blocks()
    finally:
        if not args.keep:
            os.unlink(args.path)

    print(f"\n{nbytes / 1e9:.2f} GB, streaming uint4 sum, {args.reps} reps on {m.name}")
    print(f"{'placement':<28}{'read GB/s':>10}{'first pass ms':>15}{'load s':>9}{'load GB/s':>11}")
    for name, gbps, first, load in rows:
        ls = f"{load[0]:>9.2f}{load[1]:>11.2f}" if load else f"{'-':>9}{'-':>11}"
        print(f"{name:<28}{gbps:>10.1f}{first:>15.2f}{ls}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
