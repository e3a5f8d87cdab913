"""Q8_0 weights repacked into planes ("Q8_0R") for 16-byte coalesced loads: the layout, the in-place repack and its
inverse, the pseudo-qtype that tells quant_ops' kernels which layout an array holds, and the plan of which model
tensors to repack.

Why. A GGUF Q8_0 block is 34 bytes (f16 scale d, 32 int8 q), so its quants are only 2-byte aligned and the GGUF-layout
kernels read them with 2-byte loads. Repacked, a matrix (or each slab of `slab_rows` rows of it) becomes a plane of
quants int8 [S, cols] followed by a plane of scales f16 [S, cols / 32], in the same bytes: the array keeps its
GGUF shape uint8 [..., rows, 34 * cols / 32] and allocation, so memory placement and accounting do not change and no
second copy of the model is ever made. The exact byte positions are in ds4cupy/kernels/q8_0r.cuh and in
`repack_q8_0_np` below (the definition the tests check the GPU against).

Slabs. slab_rows S must divide the rows of every matrix a kernel addresses: a 2-D matrix is one slab by default, an
expert stack [E, rows, row_bytes] one slab per expert, and the grouped attention output projection one slab per
output group (so `w[g * S:(g + 1) * S]`, the prefill's per-group slice, is itself a repacked matrix). Kernels need
every slab to start 16-byte aligned: a 16-byte aligned array and S * cols / 32 % 8 == 0 (`slab_fits`).

The pseudo-qtype `Q8_0R(slab_rows)` stands where a GGMLQuantizationType stands for GGUF arrays (model.qtype[name],
the qtype argument of quant_ops' matvec, matvec_xgroup, MatvecGroup, matmul, dequantize, moe_gate_up, moe_down).
Values are exactly those of the GGUF blocks; products differ from the GGUF-layout kernels only in float32
summation order.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as T

from .compile import KERNEL_DIR, get_kernel

QK, BLOCK_BYTES = 32, 34
STAGING_BYTES = 64 << 20          # device scratch of the in-place repack (bounded, whatever the tensor size)
NOT_REPACKED = ("token_embd.weight",)   # read by embed_hc (ops.py) as GGUF rows, not by quant_ops
_THREADS = 256


@dataclass(frozen=True)
class Q8_0R:
    """Pseudo-qtype of a Q8_0 array repacked with slabs of `slab_rows` rows (see the module docstring)."""
    slab_rows: int

    name = "Q8_0R"    # class attribute, like GGMLQuantizationType.name

    def __post_init__(self):
        if not isinstance(self.slab_rows, (int, np.integer)) or self.slab_rows <= 0:
            raise ValueError(f"Q8_0R slab_rows must be a positive int, got {self.slab_rows!r}")

    def __str__(self) -> str:
        return f"Q8_0R(slab_rows={self.slab_rows})"


def kernel_constant(name: str) -> int:
    """An integer #define of kernels/q8_0r.cuh (read back, so Python and CUDA never hold two copies of a tunable)."""
    text = (KERNEL_DIR / "q8_0r.cuh").read_text()
    m = re.search(rf"^#define {name} (\d+)\s*$", text, re.M)
    if m is None:
        raise LookupError(f"kernels/q8_0r.cuh defines no integer {name}")
    return int(m.group(1))


def slab_fits(slab_rows: int, cols: int) -> bool:
    """Whether slabs of `slab_rows` rows of `cols` elements start 16-byte aligned in a 16-byte aligned array."""
    return cols > 0 and cols % QK == 0 and slab_rows > 0 and slab_rows * (cols // QK) % 8 == 0


def _geometry(shape, cols: int, slab_rows: int | None, what: str) -> tuple[int, int, int]:
    """(total rows, rows of one matrix, slab rows) of a raw Q8_0 shape [..., rows, row_bytes]; raises ValueError."""
    if cols <= 0 or cols % QK:
        raise ValueError(f"{what}: Q8_0 rows need a positive multiple of {QK} elements, got cols={cols}")
    if len(shape) not in (2, 3):
        raise ValueError(f"{what}: expected [rows, row_bytes] or [experts, rows, row_bytes], got shape {shape}")
    rb = cols // QK * BLOCK_BYTES
    if shape[-1] != rb:
        raise ValueError(f"{what}: a Q8_0 row of {cols} elements is {rb} bytes, but the rows are {shape[-1]} bytes "
                         f"(shape {shape})")
    rows = int(shape[-2])
    total = int(np.prod(shape[:-1]))
    s = rows if slab_rows is None else int(slab_rows)
    if s <= 0 or rows % s:
        raise ValueError(f"{what}: slab_rows={s} does not divide the {rows} rows of a matrix (shape {shape})")
    if not slab_fits(s, cols):
        raise ValueError(f"{what}: slabs of {s} rows x {cols // QK} blocks do not start 16-byte aligned "
                         f"(slab_rows * cols / 32 must be a multiple of 8, got {s * (cols // QK)})")
    return total, rows, s


# ---- the layout in NumPy (the definition) -----------------------------------------------------------------------
def repack_q8_0_np(raw: np.ndarray, slab_rows: int | None = None) -> np.ndarray:
    """The Q8_0R bytes of GGUF Q8_0 rows `raw` (uint8 [..., rows, 34 * nblk]), same shape. Slab k of S rows holds
    qs int8 [S, 32 * nblk] then d f16 [S, nblk] (ds4cupy/kernels/q8_0r.cuh)."""
    raw = np.ascontiguousarray(raw)
    nblk = raw.shape[-1] // BLOCK_BYTES
    rows = raw.shape[-2]
    s = rows if slab_rows is None else int(slab_rows)
    if raw.dtype != np.uint8 or raw.shape[-1] % BLOCK_BYTES or rows % s:
        raise ValueError(f"raw must be uint8 [..., rows, 34 * nblk] with slab_rows dividing rows, got {raw.dtype} "
                         f"{raw.shape}, slab_rows={s}")
    blocks = raw.reshape(-1, s, nblk, BLOCK_BYTES)                         # [slabs, S, nblk, 34]
    qs = blocks[..., 2:].reshape(blocks.shape[0], -1)                        # [slabs, S * 32 * nblk]
    d = blocks[..., :2].reshape(blocks.shape[0], -1)                         # [slabs, S * 2 * nblk]
    return np.concatenate([qs, d], axis=1).reshape(raw.shape)


def unpack_q8_0_np(packed: np.ndarray, slab_rows: int | None = None) -> np.ndarray:
    """Inverse of repack_q8_0_np: GGUF Q8_0 rows from Q8_0R bytes."""
    packed = np.ascontiguousarray(packed)
    nblk = packed.shape[-1] // BLOCK_BYTES
    rows = packed.shape[-2]
    s = rows if slab_rows is None else int(slab_rows)
    flat = packed.reshape(-1, s * nblk * BLOCK_BYTES)
    qs = flat[:, : s * nblk * QK].reshape(-1, s, nblk, QK)
    d = flat[:, s * nblk * QK:].reshape(-1, s, nblk, 2)
    return np.concatenate([d, qs], axis=3).reshape(packed.shape)


# ---- on the GPU ---------------------------------------------------------------------------------------------------
def _check_array(w, what: str):
    import cupy
    if not isinstance(w, cupy.ndarray) or w.dtype != np.uint8 or not w.flags.c_contiguous:
        raise ValueError(f"{what} must be a C-contiguous cupy uint8 array, got {type(w).__name__} "
                         f"{getattr(w, 'dtype', '')} {getattr(w, 'shape', '')}")
    if w.data.ptr % 16:
        raise ValueError(f"{what} must start on a 16-byte boundary (address {w.data.ptr:#x})")


def _launch(kernel: str, n_blocks: int, args) -> None:
    grid = max(1, min((n_blocks + _THREADS - 1) // _THREADS, 8192))
    get_kernel("repack", kernel)((grid,), (_THREADS,), args)


def _copy(dst: int, src: int, nbytes: int) -> None:
    import cupy
    cupy.cuda.runtime.memcpyAsync(dst, src, nbytes, cupy.cuda.runtime.memcpyDefault,
                                  cupy.cuda.get_current_stream().ptr)


def repack_q8_0(w, cols: int, slab_rows: int | None = None, stream=None, staging_bytes: int = STAGING_BYTES):
    """Repack GGUF Q8_0 rows in place into the Q8_0R layout; returns `w` (now to be used with Q8_0R(slab_rows)).

    w: cupy uint8 [rows, 34 * cols / 32] or [experts, rows, ...], 16-byte aligned; slab_rows (default: the rows of
    one matrix) must divide them, with slab_rows * cols / 32 % 8 == 0. Device scratch: at most `staging_bytes` plus,
    for a slab larger than that, its scale plane (1/17 of the slab). Runs on `stream` (default: the current one).

    In place, safely: slabs are disjoint, so each is repacked on its own bytes. Slabs that fit the staging buffer go
    in batches: copy the batch to the buffer, write the planes back from the copy. A larger slab: (1) its scales go
    to a scratch; (2) row chunks [a, b) in increasing order are copied to the buffer and their quants written to
    bytes [32 nblk a, 32 nblk b) of the slab, which lie below 34 nblk b, the first byte of any row not yet copied
    (so no unread byte is overwritten); (3) the scales go to the scale plane, after every read of the slab.
    """
    import cupy
    _check_array(w, "w")
    total, _, s = _geometry(w.shape, cols, slab_rows, "w")
    if staging_bytes <= 0:
        raise ValueError(f"staging_bytes must be positive, got {staging_bytes}")
    nblk = cols // QK
    rb = nblk * BLOCK_BYTES
    slab_bytes = s * rb
    n_slabs = total // s
    base0 = int(w.data.ptr)
    with (stream if stream is not None else cupy.cuda.get_current_stream()):
        if slab_bytes <= staging_bytes:
            per = max(1, min(n_slabs, staging_bytes // slab_bytes))
            stage = cupy.empty(per * slab_bytes, np.uint8)
            for s0 in range(0, n_slabs, per):
                n = min(per, n_slabs - s0)
                base = base0 + s0 * slab_bytes
                _copy(stage.data.ptr, base, n * slab_bytes)
                _launch("repack_q8_0", n * s * nblk,
                        (stage, np.int64(n * s), np.int32(nblk), np.int32(s), np.uint64(base),
                         np.uint64(base + 32 * nblk * s)))
        else:
            chunk_rows = max(1, staging_bytes // rb)
            stage = cupy.empty(min(chunk_rows, s) * rb, np.uint8)
            scales = cupy.empty(2 * nblk * s, np.uint8)
            for k in range(n_slabs):
                base = base0 + k * slab_bytes
                _launch("repack_q8_0", s * nblk, (np.uint64(base), np.int64(s), np.int32(nblk), np.int32(s),
                                                  np.uint64(0), scales))
                for a in range(0, s, chunk_rows):
                    b = min(s, a + chunk_rows)
                    _copy(stage.data.ptr, base + a * rb, (b - a) * rb)
                    _launch("repack_q8_0", (b - a) * nblk,
                            (stage, np.int64(b - a), np.int32(nblk), np.int32(b - a), np.uint64(base + 32 * nblk * a),
                             np.uint64(0)))
                _copy(base + 32 * nblk * s, scales.data.ptr, scales.nbytes)
    return w


def unpack_q8_0(w, cols: int, slab_rows: int | None = None, stream=None):
    """A new cupy array holding the GGUF Q8_0 rows of the Q8_0R array `w` (the inverse of repack_q8_0)."""
    import cupy
    _check_array(w, "w")
    total, _, s = _geometry(w.shape, cols, slab_rows, "w")
    nblk = cols // QK
    with (stream if stream is not None else cupy.cuda.get_current_stream()):
        out = cupy.empty_like(w)
        _launch("unpack_q8_0", total * nblk, (w, np.int64(total), np.int32(nblk), np.int32(s), out))
    return out


# ---- which model tensors -------------------------------------------------------------------------------------------
def repack_plan(tensors, o_groups: int = 1) -> dict[str, int]:
    """{name: slab_rows} of the tensors to repack, from (name, qtype, raw shape) triples: every Q8_0 matrix or
    expert stack that quant_ops consumes (not NOT_REPACKED), with slabs of one matrix (an expert, for stacks), or of
    one output group for attn_output_a (rows / o_groups: matvec_xgroup's groups, the prefill's per-group slices);
    a tensor whose slabs would not start 16-byte aligned keeps its GGUF layout (the GGUF kernels serve it)."""
    plan = {}
    for name, qtype, shape in tensors:
        if qtype != T.Q8_0 or name in NOT_REPACKED or len(shape) not in (2, 3):
            continue
        rows, cols = int(shape[-2]), int(shape[-1]) // BLOCK_BYTES * QK
        s = rows
        if name.endswith("attn_output_a.weight") and o_groups > 1:
            if rows % o_groups:
                continue
            s = rows // o_groups
        if slab_fits(s, cols):
            plan[name] = s
    return plan


__all__ = ["Q8_0R", "STAGING_BYTES", "NOT_REPACKED", "kernel_constant", "slab_fits", "repack_q8_0_np",
           "unpack_q8_0_np", "repack_q8_0", "unpack_q8_0", "repack_plan"]
