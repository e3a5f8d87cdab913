"""Session states on disk (`ds4cupy serve --kv-cache-dir DIR --kv-cache-gb N`): one file per stored state, written in
the background, found again after a restart.

A file holds one `SessionState` (ds4cupy.engines.state): the tokens it adds, its append-only rows and fixed arrays,
and the key of the state it continues from (its parent; none for a complete state). Its name is its key,
`prefix_key(model identity, all tokens up to its end)` + ".kv", so the same prefix of the same model always maps to
the same file. Layout, little-endian:

    MAGIC (8 bytes) | header length (u32) | header (JSON) | tokens (int32 x n_new) | arrays, in header order

The header names the identity, key, parent, since, the arrays (name, kind rows|fixed, first row, dtype, shape) and a
CRC-32 of the tokens and of the arrays. `scan()` reads headers and tokens only; `read()` checks the arrays' CRC.
Anything that is not a valid file of this model (another model's identity, a bad magic, a short or corrupt file, a
missing parent, a key that does not match its tokens) is skipped with one log line and never raises: the server
serves on, it just prefills. Writes go to a temporary name and are renamed into place, so a crash never leaves a
partial file under a real name. Eviction (which files, when) is the prefix cache's decision; this module deletes
what it is told to.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import struct
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..engines.state import SessionState, key_hasher, tokens_bytes

log = logging.getLogger("ds4cupy.server")

MAGIC = b"DS4KV\x00\x01\n"
SUFFIX = ".kv"
_HEADER_LEN = struct.Struct("<I")
MAX_HEADER_BYTES = 1 << 24


class DiskStateError(Exception):
    """A state file that cannot be used; the message says which and why."""


@dataclass
class DiskRecord:
    """A valid state file of this model, as found by scan()."""
    key: str
    parent: str | None
    since: int
    tokens: np.ndarray          # int32: the tokens this file adds after its parent's
    nbytes: int
    mtime: float

    @property
    def n_tokens(self) -> int:
        return self.since + len(self.tokens)


def _as_bytes(a: np.ndarray) -> np.ndarray:
    """A flat uint8 view of an array's bytes (C order; empty arrays too)."""
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8)


def _crc(a: np.ndarray | bytes) -> int:
    return zlib.crc32(a if isinstance(a, bytes) else _as_bytes(a)) & 0xFFFFFFFF


class DiskStore:
    """The files of one model identity in one directory, and the thread that writes them."""

    def __init__(self, directory: str | os.PathLike, identity: str):
        self.dir = Path(directory)
        self.identity = identity
        self.dir.mkdir(parents=True, exist_ok=True)
        self.errors = 0                  # files skipped or failed to read / write (also logged)
        self.written_bytes = 0
        self.read_bytes = 0
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None

    def path(self, key: str) -> Path:
        return self.dir / f"{key}{SUFFIX}"

    # ---------------------------------------------------------------------------------------------------- writing

    def write(self, key: str, parent: str | None, state: SessionState) -> int:
        """Write `state` (host arrays) as file `key`; returns the file's size."""
        arrays, blobs = [], []
        for kind, items in (("rows", state.rows.items()), ("fixed", state.fixed.items())):
            for name, value in items:
                start, a = value if kind == "rows" else (0, value)
                a = np.ascontiguousarray(a)
                arrays.append({"name": name, "kind": kind, "start": int(start), "dtype": a.dtype.str,
                               "shape": list(a.shape)})
                blobs.append(a)
        tokens = np.asarray(state.tokens, dtype="<i4")
        crc = 0
        for a in blobs:
            crc = zlib.crc32(_as_bytes(a), crc)
        header = json.dumps({"identity": self.identity, "key": key, "parent": parent, "since": state.since,
                             "n_new": len(tokens), "tokens_crc": _crc(tokens), "arrays": arrays,
                             "arrays_crc": crc & 0xFFFFFFFF}).encode()
        tmp = self.dir / f".{key}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(MAGIC + _HEADER_LEN.pack(len(header)) + header)
                f.write(tokens.tobytes())
                for a in blobs:
                    f.write(_as_bytes(a))
            os.replace(tmp, self.path(key))
        finally:
            if tmp.exists():
                tmp.unlink()
        size = self.path(key).stat().st_size
        self.written_bytes += size
        return size

    def start(self) -> "DiskStore":
        if self._thread is None:
            self._thread = threading.Thread(target=self._writer, name="ds4cupy-kv-writer", daemon=True)
            self._thread.start()
        return self

    def submit(self, key: str, parent: str | None, state: SessionState, ready: Callable[[], bool],
               done: Callable[[int | None], None]) -> None:
        """Write in the background, in submission order. `ready()` is asked just before writing (False: the parent
        never reached the disk, so the file would be useless: skipped); `done(size or None)` is called after."""
        self.start()
        self._queue.put((key, parent, state, ready, done))

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every submitted write is done."""
        if self._thread is None:
            return
        marker = threading.Event()
        self._queue.put(marker)
        marker.wait(timeout)

    def close(self, timeout: float = 60.0) -> None:
        """Finish the queued writes and stop the writer thread."""
        if self._thread is not None:
            self.flush(timeout)
            self._queue.put(None)
            self._thread.join(timeout)
            self._thread = None

    def _writer(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if isinstance(item, threading.Event):
                item.set()
                continue
            key, parent, state, ready, done = item
            size = None
            try:
                if ready():
                    size = self.write(key, parent, state)
            except Exception as exc:      # a full or read-only disk must not stop the server
                self.errors += 1
                log.warning("kv cache: cannot write %s: %s", self.path(key), exc)
            try:
                done(size)
            except Exception:
                log.exception("kv cache: bookkeeping after a write failed")

    # ---------------------------------------------------------------------------------------------------- reading

    def _header(self, f, path: Path) -> tuple[dict, int]:
        magic = f.read(len(MAGIC))
        if magic != MAGIC:
            raise DiskStateError(f"{path.name}: not a ds4cupy state file (bad magic)")
        raw = f.read(_HEADER_LEN.size)
        if len(raw) != _HEADER_LEN.size:
            raise DiskStateError(f"{path.name}: truncated header")
        (n,) = _HEADER_LEN.unpack(raw)
        if n > MAX_HEADER_BYTES:
            raise DiskStateError(f"{path.name}: header of {n} bytes is implausible")
        try:
            header = json.loads(f.read(n))
            for name in ("identity", "key", "since", "n_new", "tokens_crc", "arrays", "arrays_crc"):
                header[name]
        except (ValueError, KeyError, TypeError) as exc:
            raise DiskStateError(f"{path.name}: unreadable header ({type(exc).__name__}: {exc})") from None
        return header, len(MAGIC) + _HEADER_LEN.size + n

    def _tokens(self, f, path: Path, header: dict) -> np.ndarray:
        n = int(header["n_new"])
        data = f.read(4 * n)
        if len(data) != 4 * n:
            raise DiskStateError(f"{path.name}: truncated tokens")
        if _crc(data) != header["tokens_crc"]:
            raise DiskStateError(f"{path.name}: tokens fail their checksum")
        return np.frombuffer(data, dtype="<i4").astype(np.int32)

    def scan(self) -> list[DiskRecord]:
        """Every usable state file of this model, parents before children. Skipped files are logged, never fatal."""
        found: dict[str, tuple[dict, np.ndarray, int, float]] = {}
        for path in sorted(self.dir.glob(f"*{SUFFIX}")):
            try:
                stat = path.stat()
                with open(path, "rb") as f:
                    header, _ = self._header(f, path)
                    if header["identity"] != self.identity:
                        log.info("kv cache: %s belongs to another model or format, ignored", path.name)
                        continue
                    if path.name != f"{header['key']}{SUFFIX}":
                        raise DiskStateError(f"{path.name}: its header names key {header['key']}")
                    tokens = self._tokens(f, path, header)
                found[header["key"]] = (header, tokens, stat.st_size, stat.st_mtime)
            except (OSError, DiskStateError) as exc:
                self.errors += 1
                log.warning("kv cache: ignoring %s: %s", path.name, exc)

        records: dict[str, DiskRecord] = {}
        hashers: dict[str, object] = {}
        for start in list(found):
            path, key = [], start            # walk up to a resolved state, the root, or a gap
            while key is not None and key in found and key not in records and key not in path:
                path.append(key)
                key = found[key][0].get("parent")
            ok = key is None or key in records
            n_before = records[key].n_tokens if key in records else 0
            hasher = hashers[key] if key in records else key_hasher(self.identity)
            for key in reversed(path):
                header, tokens, size, mtime = found.pop(key)
                if not ok:
                    self.errors += 1
                    log.warning("kv cache: ignoring %s%s: the state it continues (%s) is missing or unusable", key,
                                SUFFIX, header.get("parent"))
                    continue
                hasher = hasher.copy()
                hasher.update(tokens_bytes(tokens))
                if header["since"] != n_before or hasher.hexdigest() != key:
                    self.errors += 1
                    log.warning("kv cache: ignoring %s%s: its tokens do not match its name", key, SUFFIX)
                    ok = False
                    continue
                n_before += len(tokens)
                records[key] = DiskRecord(key, header.get("parent"), int(header["since"]), tokens, size, mtime)
                hashers[key] = hasher
        return sorted(records.values(), key=lambda r: r.n_tokens)

    def read(self, key: str) -> SessionState:
        """The state in file `key`, checked against its checksums; DiskStateError when it cannot be used."""
        path = self.path(key)
        try:
            with open(path, "rb") as f:
                header, _ = self._header(f, path)
                if header["identity"] != self.identity or header["key"] != key:
                    raise DiskStateError(f"{path.name}: not this model's state {key}")
                tokens = self._tokens(f, path, header).tolist()
                rows, fixed, crc = {}, {}, 0
                for spec in header["arrays"]:
                    dtype = np.dtype(spec["dtype"])
                    shape = tuple(int(d) for d in spec["shape"])
                    count = int(np.prod(shape, dtype=np.int64))
                    a = np.fromfile(f, dtype=dtype, count=count)
                    if a.size != count:
                        raise DiskStateError(f"{path.name}: truncated array {spec['name']}")
                    crc = zlib.crc32(_as_bytes(a), crc)
                    a = a.reshape(shape)
                    if spec["kind"] == "rows":
                        rows[spec["name"]] = (int(spec["start"]), a)
                    else:
                        fixed[spec["name"]] = a
                if crc & 0xFFFFFFFF != header["arrays_crc"]:
                    raise DiskStateError(f"{path.name}: arrays fail their checksum")
                self.read_bytes += f.tell()
        except OSError as exc:
            raise DiskStateError(f"{path.name}: {exc}") from None
        except (KeyError, TypeError, ValueError) as exc:
            raise DiskStateError(f"{path.name}: malformed ({type(exc).__name__}: {exc})") from None
        return SessionState(int(header["since"]), tokens, rows, fixed)

    def delete(self, key: str) -> None:
        try:
            self.path(key).unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            self.errors += 1
            log.warning("kv cache: cannot delete %s: %s", self.path(key), exc)

    def touch(self, key: str) -> None:
        """Mark a file as just used (its mtime orders eviction after a restart)."""
        try:
            os.utime(self.path(key))
        except OSError:
            pass
