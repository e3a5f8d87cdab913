"""Put a model file's tensors on the GPU, byte for byte, in device or managed memory.

`place_weights(path, tensors, placement, memory)` takes the tensor table as (name, file_offset, nbytes, np_dtype,
shape) and returns {name: cupy.ndarray} holding exactly the file's bytes, with the dtype/shape of
`ModelFile.raw(name)` (uint8 [..., row_bytes] for block types, typed for F32/F16/BF16/I32). Tensors go into one arena
per weight category (experts / dense / embed_head / small), each tensor 256-byte aligned.

- device: cudaMalloc arenas filled by chunked preads into two pinned staging buffers; while the GPU copies one
  (cudaMemcpyAsync on a side stream, an event per buffer) the CPU reads the next. The file's pages are dropped from
  the page cache behind the reads (posix_fadvise DONTNEED) so RAM does not keep a second copy.
- managed: cudaMallocManaged arenas, preads straight into them (no staging, no second copy), DONTNEED behind, then
  ReadMostly + PreferredLocation(device) + prefetch to the device.
"""
from __future__ import annotations

import math
import os
import time
from typing import Iterable, NamedTuple

import numpy as np

from .budget import WEIGHT_CATEGORIES, weight_category
from .progress import Progress

CHUNK = 64 << 20
_ALIGN = 256
_MAX_GAP = 1 << 20  # file gap between tensors still read in one pread (alignment padding is <= 32 B)


class PlacedWeights(dict):
    """{name: cupy.ndarray}, plus how the load went."""
    mode: str = ""
    seconds: float = 0.0
    nbytes: int = 0
    hints_api: str = ""

    @property
    def gbps(self) -> float:
        return self.nbytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


class _Piece(NamedTuple):
    file_off: int
    nbytes: int
    category: str
    arena_off: int


def _layout(tensors, chunk: int = CHUNK) -> tuple[dict[str, int], list[tuple], list[_Piece]]:
    """Arena sizes per category, (name, category, arena_off, dtype, shape) per tensor, file pieces <= CHUNK."""
    sizes = {c: 0 for c in WEIGHT_CATEGORIES}
    entries, pieces = [], []
    for name, off, nbytes, dtype, shape in tensors:
        dtype = np.dtype(dtype)
        shape = tuple(int(s) for s in shape)
        off, nbytes = int(off), int(nbytes)
        if math.prod(shape) * dtype.itemsize != nbytes:
            raise ValueError(f"{name}: shape {shape} of {dtype} is {math.prod(shape) * dtype.itemsize} bytes, "
                             f"the table says {nbytes}")
        if off < 0:
            raise ValueError(f"{name}: negative file offset {off}")
        c = weight_category(name)
        a = sizes[c]
        entries.append((name, c, a, dtype, shape))
        for p in range(0, nbytes, chunk):
            pieces.append(_Piece(off + p, min(chunk, nbytes - p), c, a + p))
        sizes[c] = (a + nbytes + _ALIGN - 1) // _ALIGN * _ALIGN
    pieces.sort(key=lambda p: p.file_off)
    return sizes, entries, pieces


def _batches(pieces: list[_Piece], chunk: int) -> list[tuple[int, int, list[_Piece]]]:
    """Group file-ordered pieces into (start, span, pieces) reads of at most `chunk` bytes."""
    out: list[tuple[int, int, list[_Piece]]] = []
    cur: list[_Piece] = []
    start = end = 0
    for p in pieces:
        p_end = p.file_off + p.nbytes
        if cur and (p_end - start > chunk or p.file_off - end > _MAX_GAP or p.file_off < end):
            out.append((start, end - start, cur))
            cur = []
        if not cur:
            start, end = p.file_off, p_end
        cur.append(p)
        end = max(end, p_end)
    if cur:
        out.append((start, end - start, cur))
    return out


def _pread_into(fd: int, view: memoryview, offset: int, path: str) -> None:
    got = 0
    n = len(view)
    while got < n:
        k = os.preadv(fd, [view[got:]], offset + got)
        if k <= 0:
            raise EOFError(f"{path}: file ends at byte {offset + got}, needed {n - got} more bytes from offset "
                           f"{offset} ({os.fstat(fd).st_size} bytes in the file)")
        got += k


def _drop_cache(fd: int, off: int, n: int) -> None:
    if hasattr(os, "posix_fadvise"):
        try:
            os.posix_fadvise(fd, off, n, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass


def _host_view(ptr: int, nbytes: int) -> memoryview:
    import ctypes
    return memoryview((ctypes.c_uint8 * nbytes).from_address(ptr)).cast("B")


def place_weights(path: str, tensors: Iterable[tuple], placement, memory, progress: bool = True,
                  chunk: int = CHUNK, label: str = "weights") -> PlacedWeights:
    """Load `tensors` from `path` into GPU memory as `placement.weights_mode` ("device" | "managed") says."""
    import cupy as cp

    mode = placement if isinstance(placement, str) else placement.weights_mode
    if mode not in ("device", "managed"):
        raise ValueError(f"weights mode must be 'device' or 'managed', got {mode!r}")
    if chunk > CHUNK or chunk <= 0:
        raise ValueError(f"chunk must be in (0, {CHUNK}], got {chunk}")
    tensors = list(tensors)
    sizes, entries, pieces = _layout(tensors, chunk)
    fsize = os.path.getsize(path)
    for p in pieces:
        if p.file_off + p.nbytes > fsize:
            name = next(t[0] for t in tensors if t[1] <= p.file_off < t[1] + t[2])
            raise ValueError(f"{name}: bytes {p.file_off}..{p.file_off + p.nbytes} lie past the end of {path} "
                             f"({fsize} bytes)")
    total = sum(p.nbytes for p in pieces)
    managed = mode == "managed"

    t0 = time.perf_counter()
    arenas = {c: memory.alloc(f"weights.{c}", (n,), np.uint8, managed=managed) for c, n in sizes.items() if n}
    bar = Progress(total, f"{label} ({mode})", enabled=None if progress else False)
    fd = os.open(path, os.O_RDONLY)
    stream = cp.cuda.Stream(non_blocking=True)
    try:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        if managed:
            views = {c: _host_view(int(a.data.ptr), int(a.nbytes)) for c, a in arenas.items()}
            for p in pieces:
                _pread_into(fd, views[p.category][p.arena_off:p.arena_off + p.nbytes], p.file_off, path)
                _drop_cache(fd, p.file_off, p.nbytes)
                bar.update(p.nbytes)
            for a in arenas.values():
                memory.advise_read_mostly(a, prefetch=True, stream=stream)
        else:
            batches = _batches(pieces, chunk)
            nbuf = 2 if len(batches) > 1 else 1
            span_max = max(s for _, s, _ in batches)
            staging = [cp.cuda.alloc_pinned_memory(span_max) for _ in range(nbuf)]
            views = [memoryview(np.frombuffer(s, np.uint8, span_max)) for s in staging]
            events = [None] * nbuf
            h2d = cp.cuda.runtime.memcpyHostToDevice
            for i, (start, span, group) in enumerate(batches):
                k = i % nbuf
                if events[k] is not None:
                    events[k].synchronize()  # the copy out of this buffer is done
                _pread_into(fd, views[k][:span], start, path)
                base = staging[k].ptr
                for p in group:
                    dst = int(arenas[p.category].data.ptr) + p.arena_off
                    cp.cuda.runtime.memcpyAsync(dst, base + (p.file_off - start), p.nbytes, h2d, stream.ptr)
                events[k] = stream.record()
                _drop_cache(fd, start, span)
                bar.update(sum(p.nbytes for p in group))
        stream.synchronize()
    finally:
        os.close(fd)
        bar.close()

    out = PlacedWeights()
    for name, c, off, dtype, shape in entries:
        a = arenas.get(c)
        out[name] = cp.ndarray(shape, dtype, memptr=a.data + off) if a is not None else cp.empty(shape, dtype)
    out.mode = mode
    out.seconds = time.perf_counter() - t0
    out.nbytes = total
    out.hints_api = memory.hints_api if managed else "n/a"
    return out


def place_model(path: str, tensors: Iterable[tuple], budget, memory, machine, mode: str = "auto",
                progress: bool = True):
    """Plan, then allocate: (Placement, PlacedWeights, KV buffers). A refusal (MemoryFitError) comes before any
    allocation; the reason line is the Placement's."""
    from .arena import alloc_kv
    from .plan import choose_placement
    placement = choose_placement(machine, budget, mode)
    weights = place_weights(path, tensors, placement, memory, progress=progress)
    kv = alloc_kv(memory, budget.cfg, budget.ctx, placement.kv_mode, budget.chunk)
    return placement, weights, kv
