"""Prefill chunk sizes for the engine worker: a fixed count, or paced so that one chunk takes about `target_s`.

The worker checks a request's cancel flag, sends its progress and (with --max-batch) lets the running streams take
their next token between prefill chunks, so a chunk's duration is how long a cancel, a keepalive's progress or a
running stream can wait. A fixed token count gives very different waits on a GB10 and an H200, and at different
depths; the pacer instead measures the engine's prefill rate on the chunks it runs (an exponential average of
tokens / second, from chunks of at least half the current size: the short tail of a prompt says little about the
rate) and sizes the next chunk to `target_s` of it, a multiple of `multiple` tokens between `smallest` and `largest`.
Larger chunks are also faster per token on the GPU (grouped MoE and tensor-core GEMMs fill up), so on a fast GPU the
pacer grows the chunk, on a slow one it shrinks it.
"""
from __future__ import annotations

DEFAULT_TARGET_S = 0.4        # issue 13: a cancel lands within ~0.5 s
DEFAULT_INITIAL = 512


class PrefillPacer:
    """size() tokens for the next prefill call; observe(tokens, seconds) after each call."""

    def __init__(self, fixed: int | None = None, *, target_s: float = DEFAULT_TARGET_S,
                 initial: int = DEFAULT_INITIAL, smallest: int = 64, largest: int = 8192, multiple: int = 64,
                 smoothing: float = 0.5):
        if fixed is not None and int(fixed) < 1:
            raise ValueError(f"prefill chunk must be at least 1 token, got {fixed}")
        if not target_s > 0:
            raise ValueError(f"prefill chunk target must be > 0 seconds, got {target_s}")
        if not 1 <= multiple <= smallest <= initial <= largest:
            raise ValueError(f"prefill pacing needs 1 <= multiple <= smallest <= initial <= largest, got {multiple}, "
                             f"{smallest}, {initial}, {largest}")
        if not 0 < smoothing <= 1:
            raise ValueError(f"prefill pacing smoothing must be in (0, 1], got {smoothing}")
        self.fixed = None if fixed is None else int(fixed)
        self.target_s, self.smallest, self.largest, self.multiple = target_s, smallest, largest, multiple
        self.smoothing = smoothing
        self.rate: float | None = None             # tokens per second, averaged
        self._size = self.fixed if self.fixed is not None else initial

    @property
    def adaptive(self) -> bool:
        return self.fixed is None

    def size(self) -> int:
        return self._size

    def observe(self, tokens: int, seconds: float) -> None:
        if self.fixed is not None or tokens < self._size // 2 or not seconds > 0:
            return
        r = tokens / seconds
        self.rate = r if self.rate is None else (1 - self.smoothing) * self.rate + self.smoothing * r
        want = int(self.rate * self.target_s) // self.multiple * self.multiple
        self._size = min(self.largest, max(self.smallest, want))

    def describe(self) -> str:
        if self.fixed is not None:
            return f"{self.fixed} tokens a chunk"
        return f"chunks paced to ~{self.target_s:g} s ({self.smallest}-{self.largest} tokens, now {self._size})"


__all__ = ["DEFAULT_INITIAL", "DEFAULT_TARGET_S", "PrefillPacer"]
