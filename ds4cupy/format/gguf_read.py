"""read_gguf: a GGUF v3 header reader that checks every count, length and offset against the file before using it.

The header (metadata and tensor table) of a file of S bytes is read in time and memory linear in the header's own
size, whatever the bytes say: each count or length is checked against the bytes left in the file (and a sane maximum)
before anything is allocated or looped over, strings must be UTF-8, value types must be known, and the tensor table
must describe tensors that lie inside the file, start at multiples of `general.alignment`, and do not overlap. Every
refusal is a `GGUFError` whose message names the header field, metadata key or tensor at fault and what was found.

Tensor bytes are not read here: `GGUFContents.data` is a read-only uint8 view over an mmap of the whole file, and
`GGUFContents.stat` is the os.stat of the open file (its size and mtime tell a changed file later).
"""
from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

MAGIC = b"GGUF"
VERSION = 3
HEADER_BYTES = 24                 # magic, version (u32), tensor count (u64), metadata count (u64)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4                      # GGML_MAX_DIMS
MAX_NAME_BYTES = 63               # GGML_MAX_NAME - 1: longer tensor names do not fit ggml's name field
# sane maxima far above any DeepSeek-V4 file (about 1,400 tensors, 60 keys, 129,280-entry token lists)
MAX_TENSORS = 1 << 20
MAX_KV = 1 << 16
MAX_KEY_BYTES = 1 << 16
MAX_STRING_BYTES = 1 << 26
MAX_ARRAY_ITEMS = 1 << 22
MAX_ALIGNMENT = 1 << 20
MAX_TENSOR_ELEMENTS = 1 << 48

# value type id -> (name, struct format); 8 = string, 9 = array
_SCALARS = {0: ("u8", "<B"), 1: ("i8", "<b"), 2: ("u16", "<H"), 3: ("i16", "<h"), 4: ("u32", "<I"), 5: ("i32", "<i"),
            6: ("f32", "<f"), 7: ("bool", "<B"), 10: ("u64", "<Q"), 11: ("i64", "<q"), 12: ("f64", "<d")}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8",
          12: "<f8"}
STRING, ARRAY = 8, 9
INT_TYPES = (0, 1, 2, 3, 4, 5, 10, 11)


class GGUFError(ValueError):
    """A GGUF file whose header cannot be trusted; the message names the field, key or tensor and what was found."""


@dataclass(frozen=True)
class TensorEntry:
    name: str
    qtype: T
    shape: tuple[int, ...]   # NumPy order (GGUF ne reversed)
    offset: int              # absolute byte offset in the file
    nbytes: int


@dataclass
class GGUFContents:
    metadata: dict[str, Any]          # key -> str | int | float | bool | list of those
    value_types: dict[str, int]       # key -> GGUF value type id (9 = array)
    tensors: dict[str, TensorEntry]   # in file-table order
    alignment: int
    data_start: int
    data: np.ndarray                  # uint8 [file size], read-only, over the mmap
    stat: os.stat_result              # of the open file at load time
    fd: int                           # kept open: fstat on it tells whether the mapped file changed
    _mm: mmap.mmap

    def close(self) -> None:
        self.data = np.empty(0, np.uint8)
        try:
            self._mm.close()
        except BufferError:           # views handed out are still alive: the mapping goes when they do
            pass
        try:
            os.close(self.fd)
        except OSError:
            pass


class _Cursor:
    """Reads little-endian fields from the mapped header; every read is bounds-checked first."""

    def __init__(self, mm: mmap.mmap, size: int):
        self.mm, self.size, self.pos = mm, size, HEADER_BYTES

    def left(self) -> int:
        return self.size - self.pos

    def need(self, n: int, what: str) -> None:
        if n > self.left():
            raise GGUFError(f"header truncated or corrupt: {what} needs {n} bytes at offset {self.pos}, the file has "
                            f"{max(self.left(), 0)} left")

    def scalar(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self.need(n, what)
        (v,) = struct.unpack_from(fmt, self.mm, self.pos)
        self.pos += n
        return v

    def string(self, what: str, limit: int) -> str:
        n = self.scalar("<Q", f"the length of {what}")
        if n > limit:
            raise GGUFError(f"{what}: a string of {n} bytes is longer than the {limit} allowed")
        self.need(n, what)
        raw = self.mm[self.pos:self.pos + n]
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise GGUFError(f"{what}: not valid UTF-8 (byte {e.start} of {n})") from None


def _value(cur: _Cursor, vtype: int, key: str) -> Any:
    where = f"metadata key {key!r}"
    if vtype in _SCALARS:
        name, fmt = _SCALARS[vtype]
        v = cur.scalar(fmt, f"the {name} value of {where}")
        if vtype == 7:
            if v not in (0, 1):
                raise GGUFError(f"{where}: a bool must be 0 or 1, found {v}")
            return bool(v)
        return v
    if vtype == STRING:
        return cur.string(where, MAX_STRING_BYTES)
    if vtype == ARRAY:
        etype = cur.scalar("<I", f"the element type of {where}")
        count = cur.scalar("<Q", f"the element count of {where}")
        if etype == ARRAY:
            raise GGUFError(f"{where}: arrays of arrays are not supported")
        if etype != STRING and etype not in _SCALARS:
            raise GGUFError(f"{where}: unknown array element type {etype}")
        if count > MAX_ARRAY_ITEMS:
            raise GGUFError(f"{where}: an array of {count} elements is more than the {MAX_ARRAY_ITEMS} allowed")
        item = 8 if etype == STRING else struct.calcsize(_SCALARS[etype][1])   # a string is at least its length
        cur.need(count * item, f"the {count} array elements of {where}")
        if etype == STRING:
            return [cur.string(f"{where}[{i}]", MAX_STRING_BYTES) for i in range(count)]
        arr = np.frombuffer(cur.mm, dtype=_NUMPY[etype], count=count, offset=cur.pos)
        cur.pos += count * item
        if etype == 7:
            if count and int(arr.max()) > 1:
                raise GGUFError(f"{where}: bool array elements must be 0 or 1, found {int(arr.max())}")
            return [bool(x) for x in arr]
        return arr.tolist()
    raise GGUFError(f"{where}: unknown value type {vtype}")


def _tensor_entry(cur: _Cursor, index: int, previous: str | None) -> tuple[str, T, tuple[int, ...], int, int]:
    after = f" (after tensor {previous!r})" if previous else ""
    name = cur.string(f"the name of tensor-table entry {index}{after}", MAX_NAME_BYTES)
    where = f"tensor {name!r}"
    if not name:
        raise GGUFError(f"tensor-table entry {index}{after}: empty tensor name")
    n_dims = cur.scalar("<I", f"the dimension count of {where}")
    if not 1 <= n_dims <= MAX_DIMS:
        raise GGUFError(f"{where}: {n_dims} dimensions (expected 1 to {MAX_DIMS})")
    ne = [cur.scalar("<Q", f"dimension {d} of {where}") for d in range(n_dims)]
    qt = cur.scalar("<I", f"the block type of {where}")
    offset = cur.scalar("<Q", f"the data offset of {where}")
    if qt not in T._value2member_map_ or T(qt) not in GGML_QUANT_SIZES:
        raise GGUFError(f"{where} has unknown block type {qt}")
    qtype = T(qt)
    for d, n in enumerate(ne):
        if n < 1:
            raise GGUFError(f"{where}: dimension {d} is {n} (expected >= 1)")
    n_elements = math.prod(ne)
    if n_elements > MAX_TENSOR_ELEMENTS:
        raise GGUFError(f"{where}: {n_elements} elements (dims {ne}) is more than the {MAX_TENSOR_ELEMENTS} allowed")
    block, type_size = GGML_QUANT_SIZES[qtype]
    if ne[0] % block:
        raise GGUFError(f"{where}: rows of {ne[0]} values are not whole {qtype.name} blocks of {block}")
    return name, qtype, tuple(reversed(ne)), offset, n_elements // block * type_size


def read_gguf(path: str | os.PathLike) -> GGUFContents:
    """Open, map and check a GGUF v3 file (see the module docstring). Raises GGUFError, or OSError if unreadable."""
    fd = os.open(os.fspath(path), os.O_RDONLY)
    try:
        st = os.fstat(fd)
        size = st.st_size
        if size < HEADER_BYTES:
            raise GGUFError(f"file too short for a GGUF header ({size} bytes, at least {HEADER_BYTES} needed)")
        mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    except BaseException:
        os.close(fd)
        raise
    try:
        contents = _parse(mm, size)
    except BaseException:
        mm.close()
        os.close(fd)
        raise
    metadata, types, tensors, alignment, data_start = contents
    return GGUFContents(metadata, types, tensors, alignment, data_start, np.frombuffer(mm, dtype=np.uint8), st, fd,
                        mm)


def _parse(mm: mmap.mmap, size: int):
    if mm[:4] != MAGIC:
        raise GGUFError(f"not a GGUF file (magic {mm[:4]!r}, expected {MAGIC!r})")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", mm, 4)
    if version != VERSION:
        raise GGUFError(f"GGUF version {version} is not supported (expected {VERSION})")
    # the smallest metadata entry is 8 (key length) + 1 (key) + 4 (type) + 1 (value) bytes, the smallest tensor-table
    # entry 8 + 1 + 4 + 8 + 4 + 8: larger counts cannot fit in the file
    room = size - HEADER_BYTES
    if n_kv > min(MAX_KV, room // 14):
        raise GGUFError(f"GGUF header: metadata count {n_kv} is impossible (at most {min(MAX_KV, room // 14)} fit "
                        f"in this {size}-byte file)")
    if n_tensors > min(MAX_TENSORS, room // 33):
        raise GGUFError(f"GGUF header: tensor count {n_tensors} is impossible (at most "
                        f"{min(MAX_TENSORS, room // 33)} fit in this {size}-byte file)")
    cur = _Cursor(mm, size)
    metadata: dict[str, Any] = {}
    types: dict[str, int] = {}
    previous = None
    for i in range(n_kv):
        after = f" (after key {previous!r})" if previous else ""
        key = cur.string(f"the key of metadata entry {i}{after}", MAX_KEY_BYTES)
        if not key:
            raise GGUFError(f"metadata entry {i}{after}: empty key")
        if key in metadata:
            raise GGUFError(f"metadata key {key!r} appears twice")
        vtype = cur.scalar("<I", f"the value type of metadata key {key!r}")
        metadata[key] = _value(cur, vtype, key)
        types[key] = vtype
        previous = key

    alignment = DEFAULT_ALIGNMENT
    if "general.alignment" in metadata:
        alignment = metadata["general.alignment"]
        if types["general.alignment"] not in INT_TYPES or not 1 <= alignment <= MAX_ALIGNMENT \
                or alignment & (alignment - 1):
            raise GGUFError(f"metadata key 'general.alignment': expected a power of two in [1, {MAX_ALIGNMENT}], "
                            f"found {alignment!r}")

    entries = []
    previous = None
    for i in range(n_tensors):
        entries.append(_tensor_entry(cur, i, previous))
        previous = entries[-1][0]
    data_start = (cur.pos + alignment - 1) // alignment * alignment
    if n_tensors and data_start > size:
        raise GGUFError(f"header truncated: tensor data would start at byte {data_start}, the file has {size} bytes")

    tensors: dict[str, TensorEntry] = {}
    for name, qtype, shape, offset, nbytes in entries:
        where = f"tensor {name!r}"
        if name in tensors:
            raise GGUFError(f"{where} appears twice in the tensor table")
        if offset % alignment:
            raise GGUFError(f"{where}: data offset {offset} is not a multiple of general.alignment ({alignment})")
        end = data_start + offset + nbytes        # Python integers: no wrap-around modulo 2^64
        if end > size:
            raise GGUFError(f"{where}: data runs to byte {end} but the file has {size} bytes (truncated file?)")
        tensors[name] = TensorEntry(name, qtype, shape, data_start + offset, nbytes)
    by_offset = sorted(tensors.values(), key=lambda t: t.offset)
    for a, b in zip(by_offset, by_offset[1:]):
        if b.offset < a.offset + a.nbytes:
            raise GGUFError(f"tensor {b.name!r}: data at bytes [{b.offset}, {b.offset + b.nbytes}) overlaps tensor "
                            f"{a.name!r} at [{a.offset}, {a.offset + a.nbytes})")
    return metadata, types, tensors, alignment, data_start


def file_changed(contents: GGUFContents) -> str | None:
    """Why the mapped file no longer holds what was loaded (size or mtime of the open file changed), or None. The
    message does not name the file (servers pass it to clients)."""
    try:
        now = os.fstat(contents.fd)
    except OSError as e:
        return f"the model file can no longer be read ({e.strerror or e}); restart the server"
    then = contents.stat
    if now.st_size != then.st_size:
        return (f"the model file changed size since it was loaded ({then.st_size} -> {now.st_size} bytes); restart "
                f"the server")
    if now.st_mtime_ns != then.st_mtime_ns:
        return "the model file was modified since it was loaded; restart the server"
    return None
