"""`ds4cupy.load()`: open a model file and pick a backend. The Session contract is engines/contract.py.

Both backends give sessions with the same methods (prefill, decode, snapshot, restore, reset, n_tokens, tokens,
prefilled_tokens), so the CLI, server, bench and verify never know which one runs.
"""
from __future__ import annotations

import os
import sys
from functools import cached_property


from ..format.config import ModelConfig
from ..format.model_file import ModelFile, ModelFileError

BACKENDS = ("auto", "reference", "cuda")


def gpu_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device (never raises)."""
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


class Model:
    """A loaded model: config, tokenizer and a backend that makes sessions."""

    def __init__(self, file: ModelFile, impl, backend: str):
        self.file = file
        self._impl = impl
        self.backend = backend

    @property
    def config(self) -> ModelConfig:
        return self.file.config

    @property
    def path(self):
        return self.file.path

    @property
    def name(self) -> str:
        return str(self.file.metadata.get("general.name") or self.file.path.stem)

    @cached_property
    def tokenizer(self):
        """The tokenizer stored in the file; ModelFileError (naming the key) when it is missing or unusable."""
        from ..text.tokenizer import Tokenizer, TokenizerError
        fields = self.file.tokenizer_fields
        if not fields:
            raise ModelFileError(f"{self.file.path}: the file carries no tokenizer (tokenizer.ggml.* metadata)")
        try:
            return Tokenizer.from_gguf_fields(fields)
        except TokenizerError as e:
            raise ModelFileError(f"{self.file.path}: {e}") from None

    @property
    def reads_file(self) -> bool:
        """True when the weights are read from the mmap'd file while serving (the reference backend); the CUDA
        backend copies every weight to the GPU at load and never touches the file again."""
        return self.backend == "reference"

    def file_problem(self) -> str | None:
        """Why this model can no longer serve from its file (the file changed under the mapping), or None. Always
        None when the weights were copied at load (`reads_file` False)."""
        return self.file.changed() if self.reads_file else None

    @cached_property
    def state_identity(self) -> str:
        """What this model's session states are valid for (the file's content, backend, QAT): stored states carry it
        (ds4cupy.engines.state.model_identity)."""
        from .state import file_identity, model_identity
        data_start = min((t.offset for t in self.file.tensors.values()), default=self.file.file_size)
        return model_identity(file_identity(self.file.path, data_start), self.backend,
                              getattr(self._impl, "qat", True))

    def new_session(self, ctx: int | None = None):
        ctx = int(ctx or min(self.config.n_ctx_train, 65536))
        if ctx <= 0:
            raise ValueError(f"ctx must be positive, got {ctx}")
        return self._impl.new_session(ctx)

    @property
    def max_decode_batch(self) -> int:
        """How many sessions one decode_batch call may advance (1: the backend steps one session at a time)."""
        return int(getattr(self._impl, "max_decode_batch", 1))

    def decode_batch(self, sessions, token_ids, temperatures=None) -> list:
        """One token each for B sessions of this model (engines/contract.py: the batched decode). A backend without a
        batched step (max_decode_batch 1) takes B = 1 through the session's own decode / decode_top."""
        batched = getattr(self._impl, "decode_batch", None)
        if batched is not None:
            return batched(sessions, token_ids, temperatures)
        from .contract import check_decode_batch
        ids = check_decode_batch(self._impl, sessions, token_ids, temperatures, 1, self.config.n_vocab)
        s, t = sessions[0], temperatures[0] if temperatures is not None else None
        return [s.decode(int(ids[0])) if t is None else s.decode_top(int(ids[0]), t)]

    def close(self) -> None:
        close = getattr(self._impl, "close", None)
        if close:
            close()
        self.file.close()


MEMORY_MODES = ("auto", "device", "managed")


def load(path: str | os.PathLike, backend: str = "auto", qat: bool = True, memory: str = "auto",
         progress: bool | None = None, ctx: int | None = None) -> Model:
    """Open a ds4-layout GGUF. backend: auto (cuda when a GPU is present) | reference (NumPy) | cuda.
    qat=False switches off the FP8/FP4 QAT simulation (to compare with transformers). memory: weight placement on the
    GPU (auto | device | managed); `auto` plans for sessions of `ctx` tokens (default: min(training ctx, 65536))."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if memory not in MEMORY_MODES:
        raise ValueError(f"memory must be one of {', '.join(MEMORY_MODES)}, got {memory!r}")
    mf = ModelFile(path)
    if backend == "auto":
        backend = "cuda" if gpu_available() else "reference"
    if progress is None:
        progress = sys.stderr.isatty()
    if backend == "reference":
        from .reference import ReferenceModel
        impl = ReferenceModel(mf, qat=qat)
    else:
        if not gpu_available():
            raise RuntimeError("backend 'cuda' needs an NVIDIA GPU that CuPy can see; use --backend reference")
        from .cuda.session import CudaModel
        impl = CudaModel.from_file(mf, qat=qat, memory=memory, progress=progress, ctx_hint=ctx)
    return Model(mf, impl, backend)
