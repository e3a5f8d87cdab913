"""Server counters and their Prometheus text exposition (GET /metrics).

Requests by endpoint and status, prompt / cached / generated tokens, prefill and decode speed (totals plus the last
request's rate), time to first token (sum and count, plus the last value), the live queue: waiting jobs and
whether the engine is busy, the batch (streams served at once, `--max-batch`, and the decode steps of the batching
scheduler with the streams each advanced), and the prefix cache: hits by source and misses, bytes and entries per
tier, evictions, disk traffic. The worker thread and the event loop both write here, so every update holds a lock.
"""
from __future__ import annotations

import collections
import threading
import time
from typing import Callable

PREFIX = "ds4cupy"


class ServerMetrics:
    """Thread-safe counters; `render()` gives the Prometheus text format (version 0.0.4)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.started_at = time.time()
        self.requests: collections.Counter[tuple[str, int]] = collections.Counter()
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.prefill_tokens = 0
        self.prefill_seconds = 0.0
        self.completion_tokens = 0
        self.decode_seconds = 0.0
        self.ttft_sum = 0.0
        self.ttft_count = 0
        self.last_ttft = 0.0
        self.last_prefill_tps = 0.0
        self.last_decode_tps = 0.0
        self.cancelled = 0
        self.decode_steps = 0           # decode steps of the batching scheduler (server.scheduler) ...
        self.decode_step_streams = 0    # ... and the streams they advanced (the ratio is the mean batch)
        self.max_batch = 1              # --max-batch (set by the app)
        # set by the app: live gauges read at render time
        self.queue_depth: Callable[[], int] = lambda: 0
        self.engine_busy: Callable[[], bool] = lambda: False
        self.batch_streams: Callable[[], int] = lambda: 0    # streams being served now
        self.cache_stats: Callable[[], dict] = dict          # PrefixCache.stats

    def record_request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, int(status))] += 1

    def record_cancel(self) -> None:
        with self._lock:
            self.cancelled += 1

    def record_prefill(self, new_tokens: int, seconds: float, cached_tokens: int) -> None:
        with self._lock:
            self.prompt_tokens += new_tokens + cached_tokens
            self.cached_tokens += cached_tokens
            self.prefill_tokens += new_tokens
            self.prefill_seconds += seconds
            if new_tokens and seconds > 0:
                self.last_prefill_tps = new_tokens / seconds

    def record_decode(self, tokens: int, seconds: float, ttft: float | None) -> None:
        with self._lock:
            self.completion_tokens += tokens
            self.decode_seconds += seconds
            if tokens and seconds > 0:
                self.last_decode_tps = tokens / seconds
            if ttft is not None:
                self.ttft_sum += ttft
                self.ttft_count += 1
                self.last_ttft = ttft

    def record_decode_step(self, streams: int) -> None:
        with self._lock:
            self.decode_steps += 1
            self.decode_step_streams += streams

    def snapshot(self) -> dict:
        """The counters as a plain dict (tests and /health)."""
        with self._lock:
            return {
                "requests": {f"{e} {s}": n for (e, s), n in sorted(self.requests.items())},
                "prompt_tokens": self.prompt_tokens, "cached_tokens": self.cached_tokens,
                "prefill_tokens": self.prefill_tokens, "completion_tokens": self.completion_tokens,
                "cancelled": self.cancelled, "queue_depth": self.queue_depth(), "engine_busy": self.engine_busy(),
            }

    def render(self) -> str:
        lines: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
            lines.append(f"# HELP {PREFIX}_{name} {help_}")
            lines.append(f"# TYPE {PREFIX}_{name} {kind}")
            for labels, value in samples:
                lines.append(f"{PREFIX}_{name}{labels} {value:.6g}" if isinstance(value, float)
                             else f"{PREFIX}_{name}{labels} {value}")

        with self._lock:
            requests = sorted(self.requests.items())
            metric("requests_total", "counter", "HTTP requests by endpoint and status code.",
                   [(f'{{endpoint="{e}",status="{s}"}}', n) for (e, s), n in requests])
            metric("requests_cancelled_total", "counter", "Generations stopped because the client went away.",
                   [("", self.cancelled)])
            metric("prompt_tokens_total", "counter", "Prompt tokens of served requests (cached ones included).",
                   [("", self.prompt_tokens)])
            metric("prompt_cached_tokens_total", "counter", "Prompt tokens reused from the live session KV.",
                   [("", self.cached_tokens)])
            metric("prefill_tokens_total", "counter", "Prompt tokens actually prefilled.", [("", self.prefill_tokens)])
            metric("prefill_seconds_total", "counter", "Time spent prefilling.", [("", float(self.prefill_seconds))])
            metric("completion_tokens_total", "counter", "Generated tokens.", [("", self.completion_tokens)])
            metric("decode_seconds_total", "counter", "Time spent generating.", [("", float(self.decode_seconds))])
            prefill_tps = self.prefill_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0
            decode_tps = self.completion_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0
            metric("prefill_tokens_per_second", "gauge", "Prefill speed: overall (scope=all) and of the last request.",
                   [('{scope="all"}', float(prefill_tps)), ('{scope="last"}', float(self.last_prefill_tps))])
            metric("decode_tokens_per_second", "gauge", "Decode speed: overall (scope=all) and of the last request.",
                   [('{scope="all"}', float(decode_tps)), ('{scope="last"}', float(self.last_decode_tps))])
            metric("time_to_first_token_seconds", "summary", "Queue wait + prefill + first token.",
                   [("_sum", float(self.ttft_sum)), ("_count", self.ttft_count)])
            metric("time_to_first_token_last_seconds", "gauge", "Time to first token of the last request.",
                   [("", float(self.last_ttft))])
        metric("queue_depth", "gauge", "Requests waiting for the engine (the running one not counted).",
               [("", int(self.queue_depth()))])
        metric("engine_busy", "gauge", "1 while the engine serves a request.", [("", int(bool(self.engine_busy())))])
        metric("batch_streams", "gauge", "Requests being served at once now (prefilling or generating).",
               [("", int(self.batch_streams()))])
        metric("batch_max_streams", "gauge", "Requests the server serves at once at most (--max-batch).",
               [("", int(self.max_batch))])
        with self._lock:
            steps, rows = self.decode_steps, self.decode_step_streams
        metric("batch_decode_steps_total", "counter",
               "Decode steps of the batching scheduler (--max-batch > 1): one per group of streams advanced together.",
               [("", steps)])
        metric("batch_decode_step_streams_total", "counter",
               "Streams those steps advanced (divided by the steps: the mean batch size).", [("", rows)])
        metric("uptime_seconds", "gauge", "Seconds since the server started.",
               [("", float(time.time() - self.started_at))])
        cache = self.cache_stats()
        if cache:
            self._render_cache(metric, cache)
        return "\n".join(lines) + "\n"

    @staticmethod
    def _render_cache(metric, c: dict) -> None:
        metric("kv_cache_lookups_total", "counter",
               "Requests by where their prompt prefix came from: live session, stored state in memory, on disk, or "
               "none (miss).",
               [('{result="hit",source="live"}', c["hit_live"]), ('{result="hit",source="memory"}', c["hit_memory"]),
                ('{result="hit",source="disk"}', c["hit_disk"]), ('{result="miss",source="none"}', c["miss"])])
        metric("kv_cache_bytes", "gauge", "Bytes of stored session states per tier.",
               [(f'{{tier="{t}"}}', c[f"bytes_{t}"]) for t in ("device", "host", "disk")])
        metric("kv_cache_budget_bytes", "gauge", "Budget of each tier.",
               [(f'{{tier="{t}"}}', c[f"budget_{t}"]) for t in ("device", "host", "disk")])
        metric("kv_cache_entries", "gauge", "Stored states held in memory / on disk.",
               [('{tier="memory"}', c["entries_memory"]), ('{tier="disk"}', c["entries_disk"])])
        metric("kv_cache_evictions_total", "counter", "States dropped from memory / deleted from disk (LRU).",
               [('{tier="memory"}', c["evicted_memory"]), ('{tier="disk"}', c["evicted_disk"])])
        metric("kv_cache_checkpoint_tokens", "gauge", "Tokens between checkpoints inside a prompt.",
               [("", c["checkpoint_tokens"])])
        if "disk_written_bytes" in c:
            metric("kv_cache_disk_written_bytes_total", "counter", "Bytes of state files written.",
                   [("", c["disk_written_bytes"])])
            metric("kv_cache_disk_read_bytes_total", "counter", "Bytes of state files read back.",
                   [("", c["disk_read_bytes"])])
            metric("kv_cache_disk_errors_total", "counter",
                   "State files ignored (corrupt, foreign, orphaned) or failed to read / write.",
                   [("", c["disk_errors"] + c["read_errors"])])
