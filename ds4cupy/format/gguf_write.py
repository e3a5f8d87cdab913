"""write_gguf: the one place that writes GGUF v3 files (make-model, convert and the demo model all go through it).

Tensors are streamed: the tensor table (names, shapes, block types, sizes) is written first, then each tensor's bytes
are produced and written one at a time, so a flash-shape file never sits in memory twice. A tensor's data may be
given as an array or as a zero-argument callable returning one (called only when its turn comes).

The file is written under a temporary name next to `path` and renamed into place when complete, so an interrupted
write never leaves a truncated GGUF behind.
"""
from __future__ import annotations

import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence, Union

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, GGUFWriter, LlamaFileType

ARCH = "deepseek4"
ALIGNMENT = 32
QUANTIZATION_VERSION = 2

# metadata kind -> (GGUF value type, array element type or None)
_KINDS: dict[str, tuple[GGUFValueType, GGUFValueType | None]] = {
    "u32": (GGUFValueType.UINT32, None),
    "i32": (GGUFValueType.INT32, None),
    "u64": (GGUFValueType.UINT64, None),
    "f32": (GGUFValueType.FLOAT32, None),
    "bool": (GGUFValueType.BOOL, None),
    "str": (GGUFValueType.STRING, None),
    "u32s": (GGUFValueType.ARRAY, GGUFValueType.UINT32),
    "i32s": (GGUFValueType.ARRAY, GGUFValueType.INT32),
    "f32s": (GGUFValueType.ARRAY, GGUFValueType.FLOAT32),
    "strs": (GGUFValueType.ARRAY, GGUFValueType.STRING),
}

# general.file_type for the block type holding most of a file's bytes (llama.cpp's llama_ftype).
_FILE_TYPE = {
    GGMLQuantizationType.F32: LlamaFileType.ALL_F32,
    GGMLQuantizationType.F16: LlamaFileType.MOSTLY_F16,
    GGMLQuantizationType.BF16: LlamaFileType.MOSTLY_BF16,
    GGMLQuantizationType.Q8_0: LlamaFileType.MOSTLY_Q8_0,
    GGMLQuantizationType.Q2_K: LlamaFileType.MOSTLY_Q2_K,
    GGMLQuantizationType.IQ2_XXS: LlamaFileType.MOSTLY_IQ2_XXS,
    GGMLQuantizationType.Q4_K: LlamaFileType.MOSTLY_Q4_K_M,
    GGMLQuantizationType.MXFP4: LlamaFileType.MOSTLY_MXFP4_MOE,
    GGMLQuantizationType.NVFP4: LlamaFileType.MOSTLY_NVFP4,
}

TensorData = Union[np.ndarray, Callable[[], np.ndarray]]
TensorEntry = tuple  # (name: str, data: TensorData, qtype: GGMLQuantizationType, shape: tuple[int, ...] NumPy order)


class GGUFWriteError(ValueError):
    """A tensor or metadata value that cannot be written; the message names it."""


def tensor_nbytes(qtype: GGMLQuantizationType, shape: Sequence[int]) -> int:
    """Bytes of a tensor of `qtype` with NumPy-order `shape` (rows of shape[-1] elements)."""
    qtype = GGMLQuantizationType(qtype)
    block, type_size = GGML_QUANT_SIZES[qtype]
    if not shape or shape[-1] % block:
        raise GGUFWriteError(f"{qtype.name} rows must be a multiple of {block} elements, found shape {tuple(shape)}")
    n_rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    return n_rows * (shape[-1] // block) * type_size


def file_type_for(entries: Sequence[TensorEntry]) -> int:
    """general.file_type: the llama_ftype of the block type that holds the most bytes."""
    by_type: dict[GGMLQuantizationType, int] = {}
    for _, _, qtype, shape in entries:
        by_type[qtype] = by_type.get(qtype, 0) + tensor_nbytes(qtype, shape)
    main = max((t for t in by_type if t in _FILE_TYPE), key=lambda t: by_type[t], default=GGMLQuantizationType.F32)
    return int(_FILE_TYPE[main])


def _add_metadata(w: GGUFWriter, key: str, kind: str, value: Any) -> None:
    if kind not in _KINDS:
        raise GGUFWriteError(f"metadata {key!r}: unknown kind {kind!r} (expected one of {sorted(_KINDS)})")
    vtype, sub = _KINDS[kind]
    try:
        if kind in ("u32", "i32", "u64"):
            value = int(value)
        elif kind == "f32":
            value = float(value)
        elif kind == "bool":
            value = bool(value)
        elif kind == "str":
            value = str(value)
        elif kind in ("u32s", "i32s"):
            value = [int(v) for v in value]
        elif kind == "f32s":
            value = [float(v) for v in value]
        elif kind == "strs":
            value = [str(v) for v in value]
    except (TypeError, ValueError):
        raise GGUFWriteError(f"metadata {key!r}: value {value!r} is not a valid {kind}") from None
    if sub is not None and len(value) == 0:
        raise GGUFWriteError(f"metadata {key!r}: GGUF arrays cannot be empty")
    w.add_key_value(key, value, vtype, sub_type=sub)


class _Progress:
    """A one-line progress bar on stderr (only used when stderr is a terminal, or when forced)."""

    def __init__(self, total_bytes: int, n_tensors: int, label: str) -> None:
        self.total, self.n, self.label = max(total_bytes, 1), n_tensors, label
        self.done = 0
        self.t0 = time.monotonic()

    def update(self, i: int, nbytes: int) -> None:
        self.done += nbytes
        frac = self.done / self.total
        bar = "#" * int(30 * frac)
        rate = self.done / max(time.monotonic() - self.t0, 1e-6) / 1e6
        sys.stderr.write(f"\r{self.label} [{bar:<30}] {frac:6.1%} {self.done / 1e9:.2f}/{self.total / 1e9:.2f} GB "
                         f"tensor {i + 1}/{self.n} {rate:.0f} MB/s")
        sys.stderr.flush()

    def close(self) -> None:
        sys.stderr.write("\n")
        sys.stderr.flush()


def write_gguf(path: str | os.PathLike, metadata: Mapping[str, tuple[str, Any]], tensors: Iterable[TensorEntry], *,
               name: str, file_type: int | None = None, progress: bool | None = None) -> Path:
    """Write a GGUF v3 file with architecture `deepseek4`, 32-byte alignment, and return its path.

    metadata: {key: (kind, value)}, kinds u32 i32 u64 f32 bool str u32s i32s f32s strs (general.* keys are added
        here: architecture, name, file_type, quantization_version, alignment).
    tensors: (name, data, qtype, shape) in file order. `shape` is NumPy order (outermost first; GGUF `ne` is its
        reverse). `data` is the raw tensor (uint8 [*shape[:-1], row_bytes] for block types, or any array with
        exactly the tensor's bytes, e.g. float32/float16/uint16-for-BF16/int32 [*shape]) or a callable returning it.
    file_type: general.file_type; by default the llama_ftype of the block type holding most of the bytes.
    progress: show a progress bar on stderr; None = only when stderr is a terminal.
    """
    path = Path(path)
    entries = [(str(n), d, GGMLQuantizationType(t), tuple(int(x) for x in s)) for n, d, t, s in tensors]
    seen: set[str] = set()
    for n, _, _, _ in entries:
        if n in seen:
            raise GGUFWriteError(f"tensor {n!r} appears twice")
        seen.add(n)
    sizes = []
    for n, _, t, s in entries:
        try:
            sizes.append(tensor_nbytes(t, s))
        except GGUFWriteError as e:
            raise GGUFWriteError(f"tensor {n!r}: {e}") from None
    if progress is None:
        progress = sys.stderr.isatty()

    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.partial")
    w = GGUFWriter(tmp, ARCH)
    try:
        w.add_name(name)
        w.add_file_type(file_type_for(entries) if file_type is None else int(file_type))
        w.add_quantization_version(QUANTIZATION_VERSION)
        w.add_custom_alignment(ALIGNMENT)
        for key, kv in metadata.items():
            if not (isinstance(kv, tuple) and len(kv) == 2):
                raise GGUFWriteError(f"metadata {key!r}: expected a (kind, value) pair, found {kv!r}")
            _add_metadata(w, key, kv[0], kv[1])
        for (n, _, t, s), nb in zip(entries, sizes):
            # A non-uint8 dtype makes GGUFWriter take `s` as the element shape (it reverses it to GGUF ne order).
            w.add_tensor_info(n, s, np.dtype(np.float32), nb, raw_dtype=t)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        bar = _Progress(sum(sizes), len(entries), f"writing {path.name}") if progress else None
        for i, ((n, data, t, s), nb) in enumerate(zip(entries, sizes)):
            arr = data() if callable(data) else data
            arr = np.ascontiguousarray(arr)
            if arr.nbytes != nb:
                raise GGUFWriteError(f"tensor {n!r}: {t.name} {s} needs {nb} bytes, the data has {arr.nbytes} "
                                     f"({arr.dtype} {arr.shape})")
            w.write_tensor_data(arr)
            del arr
            if bar:
                bar.update(i, nb)
        if bar:
            bar.close()
        w.close()
        os.replace(tmp, path)
    except BaseException:
        try:
            w.close()
        except Exception:
            pass
        tmp.unlink(missing_ok=True)
        raise
    return path
