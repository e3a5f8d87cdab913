"""A byte progress bar on stderr (bytes done, GB/s, ETA), drawn only when stderr is a terminal."""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, label: str = "loading", enabled: bool | None = None, stream=None,
                 min_interval: float = 0.1):
        self.total = max(int(total), 0)
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        if enabled is None:
            isatty = getattr(self.stream, "isatty", None)
            enabled = bool(isatty and isatty())
        self.enabled = enabled
        self.done = 0
        self.t0 = time.perf_counter()
        self._last = 0.0
        self._min_interval = min_interval
        self._drawn = False

    def line(self) -> str:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        rate = self.done / dt
        frac = self.done / self.total if self.total else 1.0
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        width = 24
        fill = int(round(frac * width))
        eta_s = f"{eta:4.0f}s" if eta != float("inf") else "   ?s"
        return (f"{self.label} [{'#' * fill}{'.' * (width - fill)}] {self.done / 1e9:7.2f}/{self.total / 1e9:.2f} GB "
                f"{rate / 1e9:6.2f} GB/s ETA {eta_s}")

    def update(self, n: int) -> None:
        self.done += int(n)
        if not self.enabled:
            return
        now = time.perf_counter()
        if now - self._last >= self._min_interval or self.done >= self.total:
            self._last = now
            self.stream.write("\r" + self.line())
            self.stream.flush()
            self._drawn = True

    def close(self) -> None:
        if self.enabled and self._drawn:
            self.stream.write("\r" + self.line() + "\n")
            self.stream.flush()
            self._drawn = False

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
