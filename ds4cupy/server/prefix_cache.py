"""The prefix cache: many session states kept at once; a request continues from the one that shares the longest
prefix with its prompt, token for token.

Entries form a tree. An entry holds what its tokens [since, n) added to the state of its parent (the longest entry
that was a prefix of it when it was stored; none for a complete state), as a `SessionState` from
`session.snapshot(since)` (ds4cupy.engines.state), so the checkpoints of one long conversation cost its rows once.
An entry's state lives in one memory tier, the GPU (CUDA states, up to `device_bytes`) or the host (up to
`host_bytes`), and/or in its file on disk (`DiskStore`, up to `disk_bytes`). Over a budget, the least recently used
entries go: from the GPU to the host, from memory to disk-only when their file exists, and out of the cache when
they have no file and nothing depends on them (a leaf). Using an entry counts as using its ancestors too.

Checkpoints: the worker stores the session every `interval` tokens inside a prompt (absolute positions k * interval,
so conversations sharing a prefix share its checkpoints), at the positions a request names (where its last user
turn starts), at all of the prompt but its last token, and at the end of a request (prompt and generated tokens).
A request that diverges from a cached conversation at token p thus prefills at most (prompt - p + interval) tokens.
The interval follows the measured prefill speed: the power of two nearest below CHECKPOINT_TARGET_S seconds of
prefill, within [MIN_CHECKPOINT_TOKENS, MAX_CHECKPOINT_TOKENS] (fixed when `checkpoint_tokens` is given).

One worker thread plans, restores and checkpoints; the disk writer thread reports finished writes; /metrics reads
`stats()`. A lock guards the tree.
"""
from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..engines.state import SessionState, key_hasher, tokens_bytes
from ..memory.machine import read_meminfo
from .kv_disk import DiskStateError, DiskStore

log = logging.getLogger("ds4cupy.server")

GiB = 1 << 30
CHECKPOINT_TARGET_S = 1.0           # a diverging request re-prefills about this long past its divergence, at most
MIN_CHECKPOINT_TOKENS = 256
MAX_CHECKPOINT_TOKENS = 16384
DEFAULT_CHECKPOINT_TOKENS = 2048    # until a prefill speed has been measured
MIN_RATE_CHUNK = 64                 # shorter prefill calls say little about the speed
HOST_FRACTION = 0.25                # default host budget: this share of the available RAM ...
HOST_CAP = 64 * GiB                 # ... at most


def checkpoint_interval(tokens_per_s: float) -> int:
    """Tokens between checkpoints for a prefill speed: CHECKPOINT_TARGET_S seconds of prefill, as a power of two (so
    intervals chosen at different speeds nest), clamped to [MIN_CHECKPOINT_TOKENS, MAX_CHECKPOINT_TOKENS]."""
    n = min(max(tokens_per_s * CHECKPOINT_TARGET_S, MIN_CHECKPOINT_TOKENS), MAX_CHECKPOINT_TOKENS)
    return 1 << int(math.floor(math.log2(n)))


def default_host_bytes() -> int:
    """HOST_FRACTION of the available RAM, at most HOST_CAP (1 GiB when /proc/meminfo cannot be read)."""
    _, available = read_meminfo()
    return int(min(available * HOST_FRACTION, HOST_CAP)) if available else GiB


class Entry:
    """One stored state: tokens [since, since + len(tokens)) on top of `parent`'s."""
    __slots__ = ("key", "parent", "children", "since", "tokens", "hasher", "data", "tier", "mem_bytes",
                 "disk_bytes", "pending", "removed", "last_used")

    def __init__(self, key: str, parent: "Entry | None", since: int, tokens: np.ndarray, hasher: Any):
        self.key, self.parent, self.since, self.tokens, self.hasher = key, parent, since, tokens, hasher
        self.children: list[Entry] = []
        self.data: SessionState | None = None
        self.tier = ""                   # "device" | "host" while data is held
        self.mem_bytes = 0
        self.disk_bytes = 0              # size of its file; 0: not on disk
        self.pending = False             # a disk write is queued
        self.removed = False
        self.last_used = 0

    @property
    def n_tokens(self) -> int:
        return self.since + len(self.tokens)

    def chain(self) -> list["Entry"]:
        """Root first, self last."""
        out, e = [], self
        while e is not None:
            out.append(e)
            e = e.parent
        return out[::-1]

    def __repr__(self) -> str:
        return f"Entry({self.n_tokens} tokens, since {self.since}, {self.tier or 'no memory'}, disk {self.disk_bytes})"


@dataclass
class ReusePlan:
    """How a request starts: 'live' (continue the session as it is), 'restore' (`entry`'s state) or 'reset';
    `cached` prompt tokens are then in the session. `source`: live | memory | disk | none."""
    action: str
    cached: int
    entry: Entry | None = None
    source: str = "none"


class PrefixCache:
    """Session states by token prefix, in GPU memory, host memory and on disk (see the module docstring)."""

    def __init__(self, identity: str = "", *, host_bytes: int | None = None, device_bytes: int = 0,
                 disk: DiskStore | None = None, disk_bytes: int = 0, checkpoint_tokens: int | None = None):
        if checkpoint_tokens is not None and checkpoint_tokens < 1:
            raise ValueError(f"checkpoint_tokens must be >= 1, got {checkpoint_tokens}")
        self.identity = identity
        self.budget = {"device": max(0, int(device_bytes)),
                       "host": default_host_bytes() if host_bytes is None else max(0, int(host_bytes)),
                       "disk": max(0, int(disk_bytes))}
        self.disk = disk
        self.fixed_interval = checkpoint_tokens
        self._rate: float | None = None
        self._lock = threading.RLock()
        self._roots: list[Entry] = []
        self._entries: set[Entry] = set()
        self._clock = 0
        self.used = {"device": 0, "host": 0, "disk": 0}
        self.counts = {"hit_live": 0, "hit_memory": 0, "hit_disk": 0, "miss": 0, "evicted_memory": 0,
                       "evicted_disk": 0, "demoted": 0, "read_errors": 0}
        if disk is not None:
            if disk.identity != identity:
                raise ValueError("the disk store and the cache were made for different model identities")
            self._load_disk()

    # ----------------------------------------------------------------------------------------------- interval

    @property
    def interval(self) -> int:
        """Tokens between periodic checkpoints, now."""
        if self.fixed_interval is not None:
            return self.fixed_interval
        return checkpoint_interval(self._rate) if self._rate else DEFAULT_CHECKPOINT_TOKENS

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        """A prefill call's size and time (the interval follows the speed; short calls are ignored)."""
        if tokens >= MIN_RATE_CHUNK and seconds > 0:
            rate = tokens / seconds
            self._rate = rate if self._rate is None else 0.7 * self._rate + 0.3 * rate

    def checkpoint_positions(self, start: int, prompt_len: int, extra: Sequence[int] = ()) -> list[int]:
        """Where to store the session while prefilling prompt tokens [start, prompt_len): every interval, the `extra`
        positions, and all of the prompt but its last token."""
        stable = prompt_len - 1
        n = self.interval
        points = set(range((start // n + 1) * n, stable, n)) | {p for p in extra if start < p < stable}
        if stable > start:
            points.add(stable)
        return sorted(points)

    # ---------------------------------------------------------------------------------------------------- lookup

    def _longest(self, tokens: np.ndarray, max_len: int) -> Entry | None:
        """The longest entry whose tokens are a prefix of `tokens` and hold at most max_len of them."""
        best, stack = None, list(self._roots)
        while stack:
            e = stack.pop()
            n = e.n_tokens
            if n > max_len or not np.array_equal(tokens[e.since:n], e.tokens):
                continue
            if best is None or n > best.n_tokens:
                best = e
            stack.extend(e.children)
        return best

    def plan(self, live_tokens: Sequence[int], prompt: Sequence[int]) -> ReusePlan:
        """The longest reusable state for `prompt`: the live session (when its tokens are a prefix) or an entry. At
        least one prompt token is always left to prefill: its logits start the generation."""
        p = np.asarray(prompt, dtype=np.int32)
        with self._lock:
            best = self._longest(p, len(p) - 1)
            n_live = len(live_tokens)
            if 0 < n_live < len(p) and (best is None or n_live >= best.n_tokens) \
                    and np.array_equal(np.asarray(live_tokens, dtype=np.int32), p[:n_live]):
                return ReusePlan("live", n_live, None, "live")
            if best is None:
                return ReusePlan("reset", 0)
            on_disk = any(e.data is None for e in best.chain())
            return ReusePlan("restore", best.n_tokens, best, "disk" if on_disk else "memory")

    def prepare(self, session, prompt: Sequence[int], reuse: bool = True) -> ReusePlan:
        """Bring `session` to the longest cached prefix of `prompt` (continue, restore or reset) and count the hit or
        miss. An entry that cannot be restored (an unreadable file) is dropped and the next best one is tried.
        `reuse=False`: reset, whatever is cached."""
        while True:
            plan = self.plan(list(session.tokens), prompt) if reuse else ReusePlan("reset", 0)
            if plan.action == "reset":
                session.reset()
            elif plan.action == "restore" and not self._restore(session, plan.entry):
                continue
            break
        with self._lock:
            self.counts["miss" if plan.action == "reset" else f"hit_{plan.source}"] += 1
        return plan

    def _restore(self, session, entry: Entry) -> bool:
        with self._lock:
            chain = entry.chain()
            self._touch(entry)
            states = []
            for e in chain:
                if e.data is None:
                    try:
                        data = self.disk.read(e.key) if self.disk is not None else None
                        if data is None or data.since != e.since or data.tokens != e.tokens.tolist():
                            raise DiskStateError(f"{e.key}: the file does not hold the state the cache expects")
                    except DiskStateError as exc:
                        self.counts["read_errors"] += 1
                        log.warning("kv cache: cannot use a stored state, prefilling instead: %s", exc)
                        self._drop_subtree(e)
                        return False
                    self._hold(e, data)
                states.append(e.data)
            try:
                session.restore(states)
            except Exception:
                log.exception("kv cache: restoring a stored state failed; it is dropped")
                self.counts["read_errors"] += 1
                self._drop_subtree(entry)
                session.reset()
                return False
            if self.disk is not None:
                for e in chain:
                    if e.disk_bytes:
                        self.disk.touch(e.key)
            self._enforce_memory()
            return True

    # -------------------------------------------------------------------------------------------------- storing

    def checkpoint(self, session) -> Entry | None:
        """Store the session's state as it is now (nothing when an entry already holds exactly its tokens)."""
        tokens = np.asarray(session.tokens, dtype=np.int32)
        n = len(tokens)
        if n == 0:
            return None
        with self._lock:
            parent = self._longest(tokens, n)
            if parent is not None and parent.n_tokens == n:
                self._touch(parent)
                return parent
            since = parent.n_tokens if parent is not None else 0
            state = session.snapshot(since=since)                     # may raise: nothing is changed then
            host = state.to_host() if self.disk is not None else None
            hasher = (parent.hasher if parent is not None else key_hasher(self.identity)).copy()
            hasher.update(tokens_bytes(tokens[since:]))
            e = Entry(hasher.hexdigest(), parent, since, tokens[since:].copy(), hasher)
            self._attach(e)
            self._hold(e, state)
            self._touch(e)
            if host is not None:
                self._write(e, host)
            self._enforce_memory()
            return e

    def _write(self, e: Entry, state: SessionState) -> None:
        """Queue the file of `e` (`state`: its host copy)."""
        e.pending = True
        parent = e.parent

        def ready() -> bool:
            return parent is None or parent.disk_bytes > 0

        def done(size: int | None) -> None:
            with self._lock:
                e.pending = False
                if size is None:
                    return
                if e.removed:                # dropped while queued: its file is of no use
                    self.disk.delete(e.key)
                    return
                e.disk_bytes = size
                self.used["disk"] += size
                self._enforce_disk()

        self.disk.submit(e.key, parent.key if parent is not None else None, state, ready, done)

    # ------------------------------------------------------------------------------------------------ bookkeeping

    def _attach(self, e: Entry) -> None:
        (e.parent.children if e.parent is not None else self._roots).append(e)
        self._entries.add(e)

    def _hold(self, e: Entry, data: SessionState) -> None:
        self._release(e)
        e.data, e.tier, e.mem_bytes = data, ("device" if data.on_device else "host"), data.nbytes
        self.used[e.tier] += e.mem_bytes

    def _release(self, e: Entry) -> None:
        if e.data is not None:
            self.used[e.tier] -= e.mem_bytes
        e.data, e.tier, e.mem_bytes = None, "", 0

    def _touch(self, e: Entry) -> None:
        self._clock += 1
        for a in e.chain():
            a.last_used = self._clock

    def _remove(self, e: Entry) -> None:
        """Take a leaf out of the tree (its file, if any, is the caller's business)."""
        self._release(e)
        siblings = e.parent.children if e.parent is not None else self._roots
        if e in siblings:
            siblings.remove(e)
        self._entries.discard(e)
        e.removed = True

    def _drop_subtree(self, e: Entry) -> None:
        """Remove e and everything stored on top of it, files included (their states need e's)."""
        stack, order = [e], []
        while stack:
            x = stack.pop()
            order.append(x)
            stack.extend(x.children)
        for x in reversed(order):
            if x.disk_bytes and self.disk is not None:
                self.disk.delete(x.key)
                self.used["disk"] -= x.disk_bytes
                x.disk_bytes = 0
            x.children = []
            self._remove(x)

    @staticmethod
    def _lru(entries) -> list[Entry]:
        """Least recently used first; among equals (one chain touched at once) the deepest first."""
        return sorted(entries, key=lambda e: (e.last_used, -e.n_tokens))

    def _enforce_memory(self) -> None:
        # GPU over budget: the least recently used states move to the host
        if self.used["device"] > self.budget["device"]:
            for e in self._lru(e for e in self._entries if e.tier == "device"):
                if self.used["device"] <= self.budget["device"]:
                    break
                self._hold(e, e.data.to_host())
                self.counts["demoted"] += 1
        # memory over budget: drop states that are on disk, or leaves nothing depends on
        while self.used["host"] > self.budget["host"]:
            progress = False
            for e in self._lru(e for e in self._entries if e.tier == "host"):
                if self.used["host"] <= self.budget["host"]:
                    break
                if e.disk_bytes:
                    self._release(e)
                elif not e.children and not e.pending:
                    self._remove(e)
                else:
                    continue
                self.counts["evicted_memory"] += 1
                progress = True
            if not progress:
                break

    def _enforce_disk(self) -> None:
        while self.used["disk"] > self.budget["disk"]:
            victims = [e for e in self._entries if e.disk_bytes and not any(c.disk_bytes or c.pending for c in
                                                                             e.children)
                       and (e.data is not None or not e.children)]
            if not victims:
                break
            e = self._lru(victims)[0]
            self.disk.delete(e.key)
            self.used["disk"] -= e.disk_bytes
            e.disk_bytes = 0
            self.counts["evicted_disk"] += 1
            if e.data is None:
                self._remove(e)

    def _load_disk(self) -> None:
        """Entries for the files a previous run left (disk-only until used), least recently used by file time."""
        records = self.disk.scan()
        by_key: dict[str, Entry] = {}
        with self._lock:
            for r in sorted(records, key=lambda r: r.n_tokens):
                parent = by_key.get(r.parent) if r.parent is not None else None
                if r.parent is not None and parent is None:
                    continue
                hasher = (parent.hasher if parent is not None else key_hasher(self.identity)).copy()
                hasher.update(tokens_bytes(r.tokens))
                e = Entry(r.key, parent, r.since, r.tokens, hasher)
                e.disk_bytes = r.nbytes
                self.used["disk"] += r.nbytes
                self._attach(e)
                by_key[r.key] = e
            for r in sorted(records, key=lambda r: (r.mtime, r.n_tokens)):
                if r.key in by_key:
                    self._clock += 1
                    by_key[r.key].last_used = self._clock
            self._enforce_disk()
        if records:
            log.info("kv cache: %d stored states (%.1f MiB) found in %s", len(by_key), self.used["disk"] / 2**20,
                     self.disk.dir)

    # ------------------------------------------------------------------------------------------------------ status

    def stats(self) -> dict:
        """Counters and sizes for /metrics."""
        with self._lock:
            out = dict(self.counts)
            out.update({f"bytes_{tier}": n for tier, n in self.used.items()})
            out.update({f"budget_{tier}": n for tier, n in self.budget.items()})
            out["entries_memory"] = sum(1 for e in self._entries if e.data is not None)
            out["entries_disk"] = sum(1 for e in self._entries if e.disk_bytes)
            out["checkpoint_tokens"] = self.interval
            if self.disk is not None:
                out.update(disk_written_bytes=self.disk.written_bytes, disk_read_bytes=self.disk.read_bytes,
                           disk_errors=self.disk.errors)
            return out

    def entries(self) -> list[Entry]:
        with self._lock:
            return list(self._entries)

    def flush(self, timeout: float | None = None) -> None:
        """Wait for the queued disk writes."""
        if self.disk is not None:
            self.disk.flush(timeout)

    def close(self) -> None:
        """Finish the disk writes (the states in memory go with the process)."""
        if self.disk is not None:
            self.disk.close()
