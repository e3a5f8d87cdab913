"""The sampler's candidate set on the GPU (ds4cupy/kernels/sample.cu): DeviceCandidates holds the buffers of one
session and launches the kernel chain over a device logits row; the host gets the result (~8 KB) with one async copy
into pinned memory, as a text.candidates.TopCandidates.

    dc = DeviceCandidates(n_vocab, alloc)          # alloc(shape, dtype) -> cupy array (the session's scratch)
    dc.set_temperature(T, stream)                  # before the step: T lives in device memory, not in the graph
    dc.launch(logits_row)                          # current stream; capturable (no host sync, no allocation)
    dc.copy_to_host(stream); stream.synchronize(); top = dc.result(fetch_logits)

`launch_plan(n_vocab)` lists the launches: sample_runs over ceil(V / 1024) blocks, then sample_merge levels of 4 runs
per block until one block is left (the one-block launch writes the result). For V = 129,280: 127, 32, 8, 2, 1.
"""
from __future__ import annotations

import numpy as np

from ...text.candidates import N_CANDIDATES, TopCandidates
from .compile import get_kernel

RUN = 1024                 # SAMPLE_RUN in sample.cu (== N_CANDIDATES)
MERGE_RUNS = 4             # SAMPLE_MERGE_RUNS
THREADS = 512              # SAMPLE_THREADS
RESULT_BYTES = RUN * 4 + RUN * 4 + 16          # ids int32, vals float32, (total, T) float64
_IDS, _VALS, _TD = 0, RUN * 4, RUN * 8
assert RUN == N_CANDIDATES


def launch_plan(n_vocab: int) -> list[tuple[str, int]]:
    """[(kernel, grid), ...] for a vocabulary of n_vocab: sample_runs, then sample_merge levels; the last has grid 1."""
    if n_vocab < 1:
        raise ValueError(f"n_vocab={n_vocab} must be >= 1")
    runs = -(-n_vocab // RUN)
    plan = [("sample_runs", runs)]
    while runs > 1:
        runs = -(-runs // MERGE_RUNS)
        plan.append(("sample_merge", runs))
    return plan


class DeviceCandidates:
    """Buffers and launches of the candidate kernels for one logits row of n_vocab (see the module docstring)."""

    def __init__(self, n_vocab: int, alloc):
        import cupy as cp
        self.n_vocab = int(n_vocab)
        self.plan = launch_plan(self.n_vocab)
        nb0 = self.plan[0][1]
        nb1 = self.plan[1][1] if len(self.plan) > 1 else 1
        self.runs = (alloc((nb0 * RUN,), np.uint64), alloc((max(nb1, 1) * RUN,), np.uint64))
        self.bmax = alloc((nb0,), np.float32)
        self.bsum = alloc((nb0,), np.float64)
        self.d_temp = alloc((1,), np.float64)
        self.d_result = alloc((RESULT_BYTES,), np.uint8)
        self.d_temp.fill(1.0)
        self.d_result.fill(0)
        self._temp = 1.0                                 # the value d_temp holds (after the queued copies)
        self._pin_result = cp.cuda.alloc_pinned_memory(RESULT_BYTES)
        self._pin_temp = cp.cuda.alloc_pinned_memory(8)
        self.h_result = np.frombuffer(self._pin_result, np.uint8, RESULT_BYTES)
        self.h_temp = np.frombuffer(self._pin_temp, np.float64, 1)
        r = self.d_result
        self._ids = r[_IDS:_VALS].view(np.int32)
        self._vals = r[_VALS:_TD].view(np.float32)
        self._td = r[_TD:].view(np.float64)

    def set_temperature(self, temperature: float | None, stream) -> None:
        """Queue the upload of the step's temperature on `stream` (only when it changed). None or <= 0 (greedy: the
        mass is not used) keeps the value there."""
        import cupy as cp
        if temperature is None or temperature <= 0:
            return
        t = float(temperature)
        if not np.isfinite(t):
            raise ValueError(f"temperature={temperature!r} must be finite")
        if t == self._temp:
            return
        self.h_temp[0] = t                  # pinned: the copy reads it when the stream gets there (see copy_to_host)
        cp.cuda.runtime.memcpyAsync(self.d_temp.data.ptr, self.h_temp.ctypes.data, 8,
                                    cp.cuda.runtime.memcpyHostToDevice, stream.ptr)
        self._temp = t

    def launch(self, logits) -> None:
        """Queue the kernel chain over the device row `logits` (float32 [n_vocab]) on the current stream."""
        if logits.dtype != np.float32 or logits.size != self.n_vocab or not logits.flags.c_contiguous:
            raise ValueError(f"logits must be a contiguous float32 row of {self.n_vocab}, got {logits.dtype} "
                             f"{logits.shape}")
        i32 = np.int32
        nb0 = self.plan[0][1]
        final = len(self.plan) == 1
        out = (self._ids, self._vals, self._td)
        get_kernel("sample", "sample_runs")(
            (nb0,), (THREADS,), (logits, i32(self.n_vocab), self.d_temp, self.runs[0], self.bmax, self.bsum,
                                 i32(final), *out))
        src, n_runs = 0, nb0
        for level, (_, grid) in enumerate(self.plan[1:], start=1):
            final = level == len(self.plan) - 1
            get_kernel("sample", "sample_merge")(
                (grid,), (THREADS,), (self.runs[src], i32(n_runs), self.runs[1 - src], self.bmax, self.bsum, i32(nb0),
                                      self.d_temp, i32(final), *out))
            src, n_runs = 1 - src, grid

    def copy_to_host(self, stream) -> None:
        """Queue the one copy of the result into pinned memory on `stream` (read it after stream.synchronize())."""
        import cupy as cp
        cp.cuda.runtime.memcpyAsync(self.h_result.ctypes.data, self.d_result.data.ptr, RESULT_BYTES,
                                    cp.cuda.runtime.memcpyDeviceToHost, stream.ptr)

    def result(self, fetch_logits=None) -> TopCandidates:
        """The copied result (after copy_to_host and a synchronize) as TopCandidates (copies out of pinned memory)."""
        n = min(RUN, self.n_vocab)
        h = self.h_result
        ids = h[_IDS:_VALS].view(np.int32)[:n].astype(np.int64)
        vals = h[_VALS:_TD].view(np.float32)[:n].copy()
        total, temp = (float(v) for v in h[_TD:].view(np.float64))
        return TopCandidates(ids, vals, self.n_vocab, temp, total, fetch_logits)
