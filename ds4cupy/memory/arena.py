"""DeviceMemory: the one owner of large GPU allocations, with per-category accounting.

Device allocations are plain cudaMalloc (cupy.cuda.Memory, outside CuPy's pool, so freeing returns memory to the
driver); managed ones are cudaMallocManaged (cupy.cuda.malloc_managed). Hints:
- weights: `advise_read_mostly(arr)` = SetReadMostly + SetPreferredLocation(device) + prefetch to the device;
- KV and other written buffers: `advise_device(arr)` = SetPreferredLocation(device) + prefetch.
CUDA 13 changed cudaMemAdvise / cudaMemPrefetchAsync to take a cudaMemLocation. CuPy's runtime wrappers are tried
first (int device), then cuda-bindings (cudaMemLocation); `hints_api` records which one worked ("none" if neither).
"""
from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from .budget import GiB

_ALIGN = 256


def _cupy():
    import cupy
    return cupy


class _Hints:
    """cudaMemAdvise / cudaMemPrefetchAsync through whichever binding this install has (chosen per call kind)."""

    def __init__(self) -> None:
        self.used: dict[str, str] = {}    # "advise" | "prefetch" -> "cupy" | "cuda-bindings" | "none"
        self.errors: list[str] = []

    @property
    def api(self) -> str | None:
        return "+".join(sorted(set(self.used.values()))) if self.used else None

    @staticmethod
    def _bindings():
        try:
            from cuda.bindings import runtime as cr
        except ImportError:
            try:
                from cuda import cudart as cr  # older cuda-python
            except ImportError:
                return None
        return cr

    @staticmethod
    def _loc(cr, device: int):
        loc = cr.cudaMemLocation()
        loc.type = cr.cudaMemLocationType.cudaMemLocationTypeDevice
        loc.id = device
        return loc

    def _call(self, kind: str, via_cupy, via_bindings, what: str) -> None:
        how = self.used.get(kind)
        if how in (None, "cupy"):
            try:
                via_cupy(_cupy().cuda.runtime)
                self.used[kind] = "cupy"
                return
            except Exception as e:  # noqa: BLE001 - record, then try cuda-bindings
                if how == "cupy":
                    raise
                self.errors.append(f"cupy {kind}: {type(e).__name__}: {e}")
        if how == "none":
            return
        cr = self._bindings()
        if cr is None:
            import warnings
            self.used[kind] = "none"
            warnings.warn(f"{what}: no working binding ({'; '.join(self.errors)}); managed memory is used without "
                          f"this hint (correct, slower)", RuntimeWarning, stacklevel=4)
            return
        err = via_bindings(cr)[0]
        if err != cr.cudaError_t.cudaSuccess:
            raise RuntimeError(f"{what} failed: {err}")
        self.used[kind] = "cuda-bindings"

    def advise(self, ptr: int, nbytes: int, advice: str, device: int) -> None:
        self._call("advise", lambda rt: rt.memAdvise(ptr, nbytes, getattr(rt, advice), device),
                   lambda cr: cr.cudaMemAdvise(ptr, nbytes, getattr(cr.cudaMemoryAdvise, advice),
                                               self._loc(cr, device)),
                   f"cudaMemAdvise({advice}, {nbytes} bytes, device {device})")

    def prefetch(self, ptr: int, nbytes: int, device: int, stream_ptr: int) -> None:
        self._call("prefetch", lambda rt: rt.memPrefetchAsync(ptr, nbytes, device, stream_ptr),
                   lambda cr: cr.cudaMemPrefetchAsync(ptr, nbytes, self._loc(cr, device), 0, stream_ptr),
                   f"cudaMemPrefetchAsync({nbytes} bytes -> device {device})")


class DeviceMemory:
    """Allocates, accounts and hints every large buffer. `limit` (bytes, optional) refuses allocations beyond it."""

    def __init__(self, device: int = 0, limit: int | None = None):
        self.device = device
        self.limit = limit
        self._blocks: dict[str, list] = defaultdict(list)   # category -> [(memory object, nbytes, managed)]
        self._bytes: dict[tuple[str, bool], int] = defaultdict(int)
        self._count: dict[str, int] = defaultdict(int)
        self._hints = _Hints()

    # ---- allocation -------------------------------------------------------------------------------------------------
    def alloc(self, category: str, shape, dtype, managed: bool = False):
        """A new uninitialised cupy.ndarray of `shape`/`dtype`, accounted under `category`."""
        cp = _cupy()
        shape = tuple(int(s) for s in (shape if isinstance(shape, (tuple, list)) else (shape,)))
        dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        size = max(_ALIGN, (nbytes + _ALIGN - 1) // _ALIGN * _ALIGN)
        if self.limit is not None and self.total() + size > self.limit:
            from .plan import MemoryFitError
            raise MemoryFitError(
                f"{category}: allocating {size / GiB:.3f} GiB would pass the planned {self.limit / GiB:.3f} GiB "
                f"(already {self.total() / GiB:.3f} GiB)", self.total() + size, self.limit, self.by_category(), [])
        with cp.cuda.Device(self.device):
            if managed:
                ptr = cp.cuda.malloc_managed(size)
                owner = ptr.mem
            else:
                owner = cp.cuda.memory.Memory(size)
                ptr = cp.cuda.MemoryPointer(owner, 0)
            arr = cp.ndarray(shape, dtype, memptr=ptr)
        self._blocks[category].append((owner, size, managed))
        self._bytes[(category, managed)] += size
        self._count[category] += 1
        return arr

    def release(self, category: str) -> None:
        """Forget `category`'s allocations (memory returns once no array views them any more)."""
        for _, size, managed in self._blocks.pop(category, []):
            self._bytes[(category, managed)] -= size
        self._count.pop(category, None)

    # ---- hints ------------------------------------------------------------------------------------------------------
    @property
    def hints_api(self) -> str:
        return self._hints.api or "none"

    def advise_read_mostly(self, arr, prefetch: bool = True, stream=None) -> None:
        """Weights: ReadMostly + PreferredLocation(device), then prefetch to the device (on `stream`, not waited)."""
        ptr, n = int(arr.data.ptr), int(arr.nbytes)
        self._hints.advise(ptr, n, "cudaMemAdviseSetReadMostly", self.device)
        self._hints.advise(ptr, n, "cudaMemAdviseSetPreferredLocation", self.device)
        if prefetch:
            self.prefetch(arr, stream)

    def advise_device(self, arr, prefetch: bool = True, stream=None) -> None:
        """Written buffers (KV): PreferredLocation(device), then prefetch."""
        self._hints.advise(int(arr.data.ptr), int(arr.nbytes), "cudaMemAdviseSetPreferredLocation", self.device)
        if prefetch:
            self.prefetch(arr, stream)

    def prefetch(self, arr, stream=None) -> None:
        cp = _cupy()
        s = stream if stream is not None else cp.cuda.get_current_stream()
        self._hints.prefetch(int(arr.data.ptr), int(arr.nbytes), self.device, int(s.ptr))

    # ---- accounting -------------------------------------------------------------------------------------------------
    def total(self, managed: bool | None = None) -> int:
        return sum(v for (c, m), v in self._bytes.items() if managed is None or m == managed)

    def by_category(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for (c, _), v in self._bytes.items():
            out[c] += v
        return dict(out)

    def report(self) -> str:
        cats = sorted({c for c, _ in self._bytes})
        lines = [f"{'category':<24}{'device GiB':>12}{'managed GiB':>13}{'buffers':>9}"]
        for c in cats:
            lines.append(f"{c:<24}{self._bytes[(c, False)] / GiB:>12.3f}{self._bytes[(c, True)] / GiB:>13.3f}"
                         f"{self._count[c]:>9}")
        lines.append(f"{'total':<24}{self.total(False) / GiB:>12.3f}{self.total(True) / GiB:>13.3f}"
                     f"{sum(self._count.values()):>9}")
        lines.append(f"hints: {self.hints_api}")
        return "\n".join(lines)


def alloc_kv(memory: DeviceMemory, cfg, ctx: int, kv_mode: str = "device", chunk: int | None = None,
             index_fp4: bool = False) -> dict:
    """Every KV buffer of `kv_layout(cfg, ctx, chunk, index_fp4)`, zero-filled: {(layer, name): cupy.ndarray},
    categories kv.<kind>. index_fp4: the indexer rows packed (uint8, switch INDEXER_FP4 with QAT on).

    kv_mode "managed": cudaMallocManaged + PreferredLocation(device) + prefetch (unified-memory GPUs, large KV).
    """
    from .budget import DEFAULT_CHUNK, kv_layout
    if kv_mode not in ("device", "managed"):
        raise ValueError(f"kv mode must be 'device' or 'managed', got {kv_mode!r}")
    managed = kv_mode == "managed"
    out = {}
    for b in kv_layout(cfg, ctx, DEFAULT_CHUNK if chunk is None else chunk, index_fp4):
        a = memory.alloc(f"kv.{b.category}", b.shape, b.dtype, managed=managed)
        if managed:
            memory.advise_device(a)
        a.fill(0)
        out[(b.layer, b.name)] = a
    return out


_READ_SRC = r"""
extern "C" __global__ void stream_read_sum(const uint4* __restrict__ p, unsigned long long n,
                                           unsigned long long* __restrict__ out) {
    // Sum of every 32-bit word of p[0..n) (uint4 loads, grid-stride), one atomic per thread.
    unsigned long long acc = 0;
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        uint4 v = p[i];
        acc += (unsigned long long)v.x + v.y + v.z + v.w;
    }
    atomicAdd(out, acc);
}
"""
_read_kernel = None


def stream_read(arr, reps: int = 10, stream=None) -> tuple[float, int, float]:
    """Read every byte of `arr` (nbytes a multiple of 16, 16-byte aligned) with uint4 loads `reps` times.

    Returns (GB/s over the timed reps, sum of the 32-bit words mod 2**64, milliseconds of the first, untimed pass).
    The first pass also faults in / migrates pages of managed memory; it is timed separately.
    """
    global _read_kernel
    cp = _cupy()
    n = int(arr.nbytes)
    if n % 16 or int(arr.data.ptr) % 16:
        raise ValueError(f"stream_read needs 16-byte multiples: {n} bytes at {int(arr.data.ptr):#x}")
    if _read_kernel is None:
        _read_kernel = cp.RawKernel(_READ_SRC, "stream_read_sum")
    s = stream if stream is not None else cp.cuda.get_current_stream()
    dev = cp.cuda.Device()
    blocks = dev.attributes["MultiProcessorCount"] * 8
    first = cp.zeros(1, cp.uint64)
    sink = cp.zeros(1, cp.uint64)
    e0, e1, e2 = cp.cuda.Event(), cp.cuda.Event(), cp.cuda.Event()
    args_n = cp.uint64(n // 16)
    with s:
        e0.record(s)
        _read_kernel((blocks,), (256,), (arr, args_n, first))
        e1.record(s)
        for _ in range(reps):
            _read_kernel((blocks,), (256,), (arr, args_n, sink))
        e2.record(s)
    e2.synchronize()
    first_ms = cp.cuda.get_elapsed_time(e0, e1)
    ms = cp.cuda.get_elapsed_time(e1, e2)
    gbps = n * reps / (ms / 1e3) / 1e9 if reps else 0.0
    return gbps, int(first.get()[0]), first_ms
