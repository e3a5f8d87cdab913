"""ModelFile: a ds4-layout GGUF opened through `gguf_read.read_gguf` (checked header, mmap), its tensor table, and
layout validation.

Validation follows antirez/ds4 (`config_validate_model`, `weights_bind`, `weights_validate_layout`) generalised to any
dimensions: the header is read with every count, length and offset checked against the file (gguf_read), every
metadata value is range-checked by ModelConfig, every tensor the config implies must be present with the right shape
and an accepted block type, routed gate/up experts share one type, rows are whole blocks, tid2eid holds valid expert
ids, the tokenizer fits the vocabulary, and every tensor's bytes lie inside the file. Each failure is a ModelFileError
that names the file and the tensor (or key), what was expected and what was found.

Weights are read through the mmap on demand; `changed()` says when the file under the mapping was modified since load.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from .config import ConfigError, ModelConfig
from .gguf_read import GGUFError, file_changed, read_gguf
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


class ModelFile:
    """An open ds4-layout GGUF. `raw(name)` is a zero-copy view of the tensor's bytes; nothing is read eagerly."""

    def __init__(self, path: str | os.PathLike, validate: bool = True):
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelFileError(f"{self.path}: no such model file")
        try:
            self._gguf = read_gguf(self.path)
        except GGUFError as e:
            raise ModelFileError(f"{self.path}: {e}") from None
        except OSError as e:
            raise ModelFileError(f"{self.path}: cannot read the file ({e.strerror or e})") from None
        self.file_size = self._gguf.stat.st_size
        self.metadata: dict[str, object] = dict(self._gguf.metadata)
        self.tensors: dict[str, TensorInfo] = {
            t.name: TensorInfo(t.name, t.qtype, t.shape, t.offset, t.nbytes) for t in self._gguf.tensors.values()}
        try:
            self.config = ModelConfig.from_metadata(self.metadata)
        except ConfigError as e:
            self.close()
            raise ModelFileError(f"{self.path}: {e}") from None
        if validate:
            try:
                self.validate()
            except ModelFileError:
                self.close()
                raise

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
        buf = self._gguf.data[t.offset: t.offset + t.nbytes]
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

    def changed(self) -> str | None:
        """Why the file under the mapping no longer holds what was loaded (its size or mtime changed), else None.
        The reason does not name the file (it may go to clients)."""
        return file_changed(self._gguf)

    def close(self) -> None:
        self._gguf.close()

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
        self._check_tokenizer_fields()

    def _check_tokenizer_fields(self) -> None:
        """The stored tokenizer (when there is one) must fit the vocabulary: every id it can produce indexes the
        embedding. Its finer structure (merges, token text) is checked when the Tokenizer is built."""
        meta, n_vocab = self.metadata, self.config.n_vocab

        def bad(key: str, expected: str, found) -> ModelFileError:
            return ModelFileError(f"{self.path}: metadata key {key!r}: expected {expected}, found {found}")

        tokens = meta.get("tokenizer.ggml.tokens")
        if tokens is not None:
            if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
                raise bad("tokenizer.ggml.tokens", "an array of strings", type(tokens).__name__)
            if not 0 < len(tokens) <= n_vocab:
                raise bad("tokenizer.ggml.tokens", f"1 to deepseek4.vocab_size ({n_vocab}) entries",
                          f"{len(tokens)} entries")
        types = meta.get("tokenizer.ggml.token_type")
        if types is not None:
            if not isinstance(types, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in types):
                raise bad("tokenizer.ggml.token_type", "an array of integers", type(types).__name__)
            if tokens is not None and len(types) != len(tokens):
                raise bad("tokenizer.ggml.token_type", f"one entry per token ({len(tokens)})", f"{len(types)} entries")
        merges = meta.get("tokenizer.ggml.merges")
        if merges is not None and (not isinstance(merges, list) or not all(isinstance(m, str) for m in merges)):
            raise bad("tokenizer.ggml.merges", "an array of strings", type(merges).__name__)
        for key in ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.padding_token_id"):
            v = meta.get(key)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < n_vocab):
                raise bad(key, f"a token id in [0, {n_vocab})", repr(v))
        for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "general.name", "general.architecture"):
            v = meta.get(key)
            if v is not None and not isinstance(v, str):
                raise bad(key, "a string", repr(v))

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
