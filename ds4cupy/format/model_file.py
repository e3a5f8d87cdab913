"""ModelFile: a ds4-layout GGUF opened through gguf.GGUFReader (mmap), its tensor table, and layout validation.

Validation follows antirez/ds4 (`config_validate_model`, `weights_bind`, `weights_validate_layout`) generalised to any
dimensions: every metadata value is checked by ModelConfig, every tensor the config implies must be present with the
right shape and an accepted block type, routed gate/up experts share one type, rows are whole blocks, tid2eid holds
valid expert ids, and every tensor's bytes lie inside the file. Each failure is a ModelFileError that names the tensor
(or key), what was expected and what was found.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUFReader, GGUFValueType
from gguf import GGMLQuantizationType as T

from .config import ConfigError, ModelConfig
from .layout import TensorSpec, model_specs


class ModelFileError(ValueError):
    """A GGUF file that ds4cupy cannot use; the message names the file and the offending tensor or key."""


# Element dtypes for the types that are not block formats. BF16 is exposed as its raw uint16 bits.
_PLAIN_DTYPES = {T.F32: np.float32, T.F16: np.float16, T.BF16: np.uint16, T.I32: np.int32, T.F64: np.float64,
                 T.I8: np.int8, T.I16: np.int16, T.I64: np.int64}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    qtype: T
    shape: tuple[int, ...]   # NumPy order (reverse of GGUF ne)
    offset: int              # absolute byte offset in the file
    nbytes: int

    @property
    def is_block_type(self) -> bool:
        return self.qtype not in _PLAIN_DTYPES

    @property
    def raw_dtype(self) -> np.dtype:
        return np.dtype(_PLAIN_DTYPES.get(self.qtype, np.uint8))

    @property
    def raw_shape(self) -> tuple[int, ...]:
        """Shape of `ModelFile.raw()`: the NumPy shape, or rows of bytes for block types."""
        if not self.is_block_type:
            return self.shape
        block, size = GGML_QUANT_SIZES[self.qtype]
        return self.shape[:-1] + (self.shape[-1] // block * size,)


def tensor_nbytes(qtype: T, shape: tuple[int, ...]) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape, dtype=np.int64)) // block * size


def _field_value(field):
    """A GGUF metadata field as a plain Python value (str, int, float, bool, or a list of those)."""
    main = field.types[0]
    if main == GGUFValueType.ARRAY:
        return list(field.contents())
    v = field.contents()
    if main == GGUFValueType.BOOL:
        return bool(v)
    return v


class ModelFile:
    """An open ds4-layout GGUF. `raw(name)` is a zero-copy view of the tensor's bytes; nothing is read eagerly."""

    def __init__(self, path: str | os.PathLike, validate: bool = True):
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelFileError(f"{self.path}: no such model file")
        self.file_size = self.path.stat().st_size
        try:
            self._reader = GGUFReader(self.path, "r")
        except Exception as e:  # the reader fails deep inside NumPy on malformed files: say what is wrong instead
            raise ModelFileError(f"{self.path}: {_diagnose(self.path, self.file_size) or f'not a valid GGUF v3 file ({e})'}"
                                 ) from None
        self.metadata: dict[str, object] = {}
        for key, field in self._reader.fields.items():
            if key.startswith("GGUF."):
                continue
            self.metadata[key] = _field_value(field)
        self.tensors: dict[str, TensorInfo] = {}
        for t in self._reader.tensors:
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            self.tensors[t.name] = TensorInfo(t.name, T(t.tensor_type), shape, int(t.data_offset), int(t.n_bytes))
        try:
            self.config = ModelConfig.from_metadata(self.metadata)
        except ConfigError as e:
            raise ModelFileError(f"{self.path}: {e}") from None
        if validate:
            self.validate()

    # ---- access --------------------------------------------------------------------------------------------------
    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise ModelFileError(f"{self.path}: tensor {name!r} is missing") from None

    def has(self, name: str) -> bool:
        return name in self.tensors

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes (zero-copy over the mmap): typed for F32/F16/I32 (BF16 as uint16 bits), else uint8
        [*shape[:-1], row_bytes]."""
        t = self.info(name)
        buf = self._reader.data[t.offset: t.offset + t.nbytes]
        return buf.view(t.raw_dtype).reshape(t.raw_shape)

    def dequantize(self, name: str, index: int | None = None) -> np.ndarray:
        """float32 values of the tensor (or of slice `index` of its first axis, e.g. one expert)."""
        from .quants import dequantize
        t = self.info(name)
        raw = self.raw(name)
        shape = t.shape
        if index is not None:
            raw, shape = raw[index], shape[1:]
        return dequantize(np.asarray(raw), t.qtype, shape)

    @property
    def tokenizer_fields(self) -> dict[str, object]:
        return {k: v for k, v in self.metadata.items() if k.startswith("tokenizer.")}

    def close(self) -> None:
        mm = getattr(self._reader, "data", None)
        if mm is not None and hasattr(mm, "_mmap") and mm._mmap is not None:
            mm._mmap.close()

    def __enter__(self) -> "ModelFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- validation ----------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Check the whole tensor layout against the config (raises ModelFileError naming the tensor)."""
        cfg = self.config
        specs = model_specs(cfg)
        for spec in specs:
            if spec.name not in self.tensors:
                if spec.required:
                    raise ModelFileError(f"{self.path}: tensor {spec.name!r} is missing "
                                         f"(expected shape {list(spec.shape)}, types {_type_names(spec.allowed)})")
                continue
            self._check_tensor(spec, self.tensors[spec.name])
        for il in range(cfg.n_layer):
            gate, up = self.tensors[f"blk.{il}.ffn_gate_exps.weight"], self.tensors[f"blk.{il}.ffn_up_exps.weight"]
            if gate.qtype != up.qtype:
                raise ModelFileError(f"{self.path}: tensors {gate.name!r} and {up.name!r}: routed gate and up experts "
                                     f"must share one type, found {gate.qtype.name} and {up.qtype.name}")
            if cfg.is_hash_layer(il):
                name = f"blk.{il}.ffn_gate_tid2eid.weight"
                ids = self.raw(name)
                if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= cfg.n_expert):
                    raise ModelFileError(f"{self.path}: tensor {name!r} holds expert ids outside [0, {cfg.n_expert}) "
                                         f"(found {int(ids.min())}..{int(ids.max())})")

    def _check_tensor(self, spec: TensorSpec, t: TensorInfo) -> None:
        where = f"{self.path}: tensor {spec.name!r}"
        if t.shape != spec.shape:
            raise ModelFileError(f"{where}: expected shape {list(spec.shape)} (NumPy order; GGUF dims "
                                 f"{list(reversed(spec.shape))}), found {list(t.shape)}")
        if t.qtype not in spec.allowed:
            raise ModelFileError(f"{where}: expected type {_type_names(spec.allowed)}, found {t.qtype.name}")
        block = GGML_QUANT_SIZES[t.qtype][0]
        if t.shape[-1] % block:
            raise ModelFileError(f"{where}: rows of {t.shape[-1]} values are not whole {t.qtype.name} blocks of {block}")
        if t.nbytes != tensor_nbytes(t.qtype, t.shape):
            raise ModelFileError(f"{where}: expected {tensor_nbytes(t.qtype, t.shape)} bytes, found {t.nbytes}")
        if t.offset + t.nbytes > self.file_size:
            raise ModelFileError(f"{where}: data runs to byte {t.offset + t.nbytes} but the file has "
                                 f"{self.file_size} bytes (truncated file?)")


def _type_names(types) -> str:
    return "|".join(sorted(t.name for t in types))


def _diagnose(path: Path, file_size: int) -> str | None:
    """Walk the GGUF header by hand to say precisely why GGUFReader refused the file (None if nothing found)."""
    try:
        with open(path, "rb") as f:
            data = f.read(min(file_size, 64 << 20))
    except OSError as e:
        return f"cannot read the file ({e})"
    if len(data) < 24:
        return f"file too short for a GGUF header ({len(data)} bytes)"
    if data[:4] != b"GGUF":
        return f"not a GGUF file (magic {data[:4]!r}, expected b'GGUF')"
    version = struct.unpack_from("<I", data, 4)[0]
    if version != 3:
        return f"GGUF version {version} is not supported (expected 3)"
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
    pos = 24
    scalar = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}

    def read_str(p: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", data, p)
        if p + 8 + n > len(data):
            raise IndexError
        return data[p + 8: p + 8 + n].decode("utf-8", "replace"), p + 8 + n

    def skip_value(p: int, vt: int) -> int:
        if vt in scalar:
            return p + scalar[vt]
        if vt == 8:
            return read_str(p)[1]
        if vt == 9:
            st, n = struct.unpack_from("<IQ", data, p)
            p += 12
            for _ in range(n):
                p = skip_value(p, st)
            return p
        raise ValueError(f"unknown metadata value type {vt}")

    key = "?"
    try:
        for _ in range(n_kv):
            key, pos = read_str(pos)
            (vt,) = struct.unpack_from("<I", data, pos)
            pos = skip_value(pos + 4, vt)
        alignment = 32
        infos = []
        for _ in range(n_tensors):
            name, pos = read_str(pos)
            (nd,) = struct.unpack_from("<I", data, pos)
            dims = struct.unpack_from(f"<{nd}Q", data, pos + 4)
            qt, off = struct.unpack_from("<IQ", data, pos + 4 + 8 * nd)
            pos += 4 + 8 * nd + 12
            if qt not in T._value2member_map_:
                return f"tensor {name!r} has unknown block type {qt}"
            infos.append((name, dims, T(qt), off))
    except (struct.error, IndexError):
        return f"header truncated or corrupt (while reading metadata key {key!r} or the tensor table)"
    except ValueError as e:
        return f"metadata key {key!r}: {e}"
    start = (pos + alignment - 1) // alignment * alignment
    for name, dims, qt, off in infos:
        end = start + off + tensor_nbytes(qt, tuple(reversed(dims)))
        if end > file_size:
            return f"tensor {name!r}: data runs to byte {end} but the file has {file_size} bytes (truncated file?)"
    return None
