"""Quantized products on the GPU: thin wrappers over kernels/matvec.cu, matmul.cu, matmul_mma.cu and moe.cu.

Weights are the raw GGUF bytes on the device, exactly as ds4cupy.format.quants lays them out: uint8 [rows, row_bytes]
(or [experts, rows, row_bytes]) for block types, float32 / float16 / uint16 (bfloat16 bits) [rows, cols] for plain
types. Activations are float32, C-contiguous. Every call:
- checks shapes and dtypes from metadata only (never reads device memory, never synchronises with the host);
- writes into `out=` when given (no allocation: the decode step is captured in a CUDA graph), else allocates;
- launches on `stream` (a cupy.cuda.Stream) or on CuPy's current stream.
Expert ids (int32) and routing weights (float32) are read from device memory by the kernels.

Q8_0 weights repacked into planes (q8_0r.py) carry the pseudo-qtype Q8_0R(slab_rows) instead of Q8_0; every function
here takes them (same shapes, same values, other kernels: the _q8r launchers below, geometry from
q8r_launch_geometry). With Q8_0R weights, matvec / matvec_xgroup / MatvecGroup.run also take int8 activations
(quantize_q8x -> Q8Activations, dp4a kernels): not exact, each activation carries its rounding |x - xq xd| <= xd / 2
(llama.cpp's q8_1 level); the engine's default path stays float32.
"""
from __future__ import annotations

import contextlib
import functools
from typing import NamedTuple

import numpy as np
from gguf import GGMLQuantizationType as T

from ...format import quants
from . import switches
from .compile import get_kernel
from .compile import sm_count as _sm_count
from .q8_0r import Q8_0R, kernel_constant, repack_q8_0, unpack_q8_0

_SUFFIX = {T.Q8_0: "q8_0", T.Q2_K: "q2_k", T.Q4_K: "q4_k", T.IQ2_XXS: "iq2_xxs", T.MXFP4: "mxfp4", T.NVFP4: "nvfp4",
           T.F32: "f32", T.F16: "f16", T.BF16: "bf16"}
# elements per kernel "block" for the plain types (16 bytes), else the GGUF block
_KERNEL_QK = {T.F32: 4, T.F16: 8, T.BF16: 8}
SUPPORTED_TYPES = frozenset(_SUFFIX)
_THREADS = 256


def _qtype(qtype):
    """The GGMLQuantizationType of `qtype`, or the Q8_0R marker itself."""
    if isinstance(qtype, Q8_0R):
        return qtype
    t = quants.qtype_of(qtype)
    if t not in SUPPORTED_TYPES:
        raise ValueError(f"no GPU kernels for {t.name} (supported: {', '.join(x.name for x in _SUFFIX)})")
    return t


def _check_cols(t, cols: int) -> None:
    qk = 32 if isinstance(t, Q8_0R) else _KERNEL_QK.get(t, quants.BLOCK_SIZES[t][0])
    if cols <= 0 or cols % qk:
        raise ValueError(f"{t.name} GPU kernels need a row length that is a positive multiple of {qk}, got {cols}")


def _weight_geometry(w, t, cols: int, ndim: int, what: str) -> int:
    """Validate a raw weight array of `ndim` dims for rows of `cols` elements; returns its row stride in bytes.
    Q8_0R: also that its slab rows divide the rows of each matrix (slabs stay 16-byte aligned)."""
    import cupy
    if isinstance(t, Q8_0R):
        rb = _weight_geometry(w, T.Q8_0, cols, ndim, what)
        rows = int(w.shape[-2])
        if rows % t.slab_rows or t.slab_rows * (cols // 32) % 8:
            raise ValueError(f"{what}: {t} does not fit {rows} rows of {cols} elements (slab_rows must divide the "
                             f"rows, and slab_rows * cols / 32 be a multiple of 8)")
        return rb
    if not isinstance(w, cupy.ndarray):
        raise TypeError(f"{what} must be a cupy.ndarray, got {type(w).__name__}")
    if w.ndim != ndim:
        raise ValueError(f"{what} must have {ndim} dims, got shape {w.shape}")
    if not w.flags.c_contiguous:
        raise ValueError(f"{what} must be C-contiguous")
    if w.data.ptr % 16:
        raise ValueError(f"{what} must start on a 16-byte boundary (address {w.data.ptr:#x})")
    rb = quants.row_bytes(t, cols)
    row_nbytes = w.shape[-1] * w.itemsize
    if t in quants.PLAIN_DTYPES:
        if w.dtype != quants.PLAIN_DTYPES[t] and not (t == T.F16 and w.dtype == np.uint16):
            raise ValueError(f"{what}: {t.name} weights must be {quants.PLAIN_DTYPES[t]}, got {w.dtype}")
    elif w.dtype != np.uint8:
        raise ValueError(f"{what}: {t.name} weights must be raw uint8 blocks, got dtype {w.dtype}")
    if row_nbytes != rb:
        raise ValueError(f"{what}: a {t.name} row of {cols} elements is {rb} bytes, but the array's rows are "
                         f"{row_nbytes} bytes (shape {w.shape}, dtype {w.dtype})")
    return rb


def _f32(a, what: str, shape=None):
    import cupy
    if not isinstance(a, cupy.ndarray) or a.dtype != np.float32 or not a.flags.c_contiguous:
        desc = f"{type(a).__name__} {getattr(a, 'dtype', '')} {getattr(a, 'shape', '')}"
        raise ValueError(f"{what} must be a C-contiguous cupy float32 array, got {desc}")
    if shape is not None and tuple(a.shape) != tuple(shape):
        raise ValueError(f"{what} must have shape {tuple(shape)}, got {a.shape}")
    return a


def _aligned16(a, what: str):
    """Vector loads need 16-byte aligned activations (fresh CuPy arrays are; an offset view may not be)."""
    if a.data.ptr % 16:
        raise ValueError(f"{what} must start on a 16-byte boundary (address {a.data.ptr:#x}); pass a copy")
    return a


def _out(out, shape, what="out"):
    import cupy
    if out is None:
        return cupy.empty(shape, dtype=np.float32)
    return _f32(out, what, shape)


def _stream(stream):
    return stream if stream is not None else contextlib.nullcontext()


def warps_per_row(rows: int) -> int:
    """Warps that share one row (1, 2, 4 or 8): enough warps in flight to fill every SM even for short outputs."""
    import cupy
    target = _sm_count(cupy.cuda.Device().id) * 32  # ~32 resident warps per SM keeps loads in flight
    wpr = 1
    while wpr < 8 and rows * wpr < target:
        wpr *= 2
    return wpr


def _ptr(a) -> np.uint64:
    return np.uint64(a.data.ptr)


# ---- int8 activations ------------------------------------------------------------------------------------------------
class Q8Activations(NamedTuple):
    """float32 activations quantized per block of 32 (quantize_q8x): x[.., i] ~ xq[.., i] * xd[.., i // 32].
    xq: cupy int8 [..., cols], xd: cupy float32 [..., cols / 32]."""
    xq: object
    xd: object

    @property
    def shape(self) -> tuple:
        return tuple(self.xq.shape)


def quantize_q8x_np(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """NumPy definition of quantize_q8x (kernels/matvec.cu): per block of 32, xd = max|x| / 127 (float32 division),
    xq = rint(x / xd) (half to even; 0 where xd == 0)."""
    x = np.asarray(x, np.float32)
    b = x.reshape(-1, 32)
    xd = (np.abs(b).max(axis=1) / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(xd[:, None] > 0, np.rint(b / xd[:, None]), 0).astype(np.int8)
    return q.reshape(x.shape), xd.reshape(x.shape[:-1] + (x.shape[-1] // 32,))


def quantize_q8x(x, out: Q8Activations | None = None, stream=None) -> Q8Activations:
    """int8 activation blocks of x (float32 [..., cols], cols a multiple of 32), once per step for every Q8_0R matvec
    that reads x. out: a Q8Activations of the same shape to write into (decode graphs)."""
    import cupy
    x = _f32(x, "x")
    if x.ndim < 1 or x.shape[-1] % 32 or x.size == 0:
        raise ValueError(f"x must be [..., cols] with cols a positive multiple of 32, got shape {x.shape}")
    if out is None:
        out = Q8Activations(cupy.empty(x.shape, np.int8), cupy.empty(x.shape[:-1] + (x.shape[-1] // 32,), np.float32))
    _q8x(out, x.shape, "out")
    n_blocks = x.size // 32
    with _stream(stream):
        get_kernel("matvec", "quantize_q8x")((max(1, min((n_blocks + 7) // 8, 4096)),), (_THREADS,),
                                             (x, np.int64(n_blocks), out.xq, out.xd))
    return out


def _q8x(xa: Q8Activations, shape, what: str) -> Q8Activations:
    """Check int8 activations of `shape` (aligned, contiguous, the right dtypes)."""
    import cupy
    xq, xd = xa
    ok = (isinstance(xq, cupy.ndarray) and isinstance(xd, cupy.ndarray) and xq.dtype == np.int8
          and xd.dtype == np.float32 and xq.flags.c_contiguous and xd.flags.c_contiguous
          and tuple(xq.shape) == tuple(shape) and tuple(xd.shape) == tuple(shape[:-1]) + (shape[-1] // 32,))
    if not ok:
        raise ValueError(f"{what} must be Q8Activations(int8 {tuple(shape)}, float32 {tuple(shape[:-1])} + "
                         f"({shape[-1] // 32},)), got {getattr(xq, 'dtype', '?')} {getattr(xq, 'shape', '?')}, "
                         f"{getattr(xd, 'dtype', '?')} {getattr(xd, 'shape', '?')}")
    _aligned16(xq, f"{what}.xq")
    return xa


def _x_args(x, t, what: str = "x"):
    """(kernel name suffix, kernel arguments) of float32 x or int8 Q8Activations (Q8_0R weights only)."""
    if isinstance(x, Q8Activations):
        if not isinstance(t, Q8_0R):
            raise ValueError(f"int8 activations (Q8Activations) need Q8_0R weights, got {t.name}")
        return "_q8x", (x.xq, x.xd)
    return "", (x,)


# ---- matvec ----------------------------------------------------------------------------------------------------------
def row_blocks(rows: int, wpr: int) -> int:
    """CTAs that cover `rows` rows summed by `wpr` warps each (a 256-thread CTA holds 8 / wpr rows)."""
    per_cta = 8 // wpr
    return (rows + per_cta - 1) // per_cta


# Q8_0R decode kernels (matvec.cu, moe.cu): `nr` rows per warp (kernel suffix _r<nr>), summed by groups of `wpr`
# warps; each lane keeps Q8R_INFLIGHT / nr chunks of 16 bytes per row in a pipeline stage (q8_0r.cuh)
# Defaults from the H200 (benchmarks of cd6aef6, BENCHMARKS.md "Q8_0R"): 4 rows per warp and one or two warps per row
# beat 2 rows per warp spread to ~32 warps per SM on attn_output_a / attn_output_b / the head. The kernels hold 16
# warps per SM (<= 128 registers, 2 CTAs); WARPS_PER_SM is the fill the warps-per-row rule aims at.
Q8R_ROWS_PER_WARP = 4
Q8R_WARPS_PER_SM = 8
_Q8R_INFLIGHT = kernel_constant("Q8R_INFLIGHT")


def q8r_launch_geometry(rows: int, cols: int, group_rows: int = 0, nr: int | None = None,
                        wpr: int | None = None, dots_per_row: int = 1, sm_count: int | None = None,
                        max_nr: int = 4) -> tuple[int, int]:
    """(rows per warp, warps per row group) for a Q8_0R decode product of `rows` rows of `cols` elements.

    nr: the largest of Q8R_ROWS_PER_WARP, 2, 1 that is <= max_nr (the kernels at hand: 2 for int8 activations) and
    divides group_rows (rows sharing one input: a warp's rows share x). wpr: the fewest warps per group (1, 2, 4, 8)
    that put Q8R_WARPS_PER_SM warps per SM in flight, but no more than leave every warp a whole pipeline stage
    (32 * Q8R_INFLIGHT / (nr * dots_per_row) chunks of 16 bytes, q8_0r.cuh) of the row. dots_per_row: dot products
    per row (2 for gate/up). Explicit nr / wpr (benchmarks, tests) are checked, kept. sm_count: the current
    device's when None."""
    if nr is None:
        nr = next(n for n in (Q8R_ROWS_PER_WARP, 2, 1) if n <= max_nr and (not group_rows or group_rows % n == 0))
    if nr not in (1, 2, 4) or (group_rows and group_rows % nr):
        raise ValueError(f"rows per warp must be 1, 2 or 4 and divide group_rows={group_rows}, got {nr}")
    if wpr is None:
        if sm_count is None:
            import cupy
            sm_count = _sm_count(cupy.cuda.Device().id)
        target = sm_count * Q8R_WARPS_PER_SM
        stage = max(1, _Q8R_INFLIGHT // (nr * dots_per_row)) * 32   # chunks one warp takes per pipeline stage
        nch = 2 * (cols // 32)                                        # chunks of a row
        units = (rows + nr - 1) // nr
        wpr = 1
        while wpr < 8 and units * wpr < target and 2 * wpr * stage <= nch:
            wpr *= 2
    if wpr not in (1, 2, 4, 8):
        raise ValueError(f"warps per row group must be 1, 2, 4 or 8, got {wpr}")
    return nr, wpr


def _q8r_grid(rows: int, nr: int, wpr: int) -> int:
    per_cta = (8 // wpr) * nr
    return (rows + per_cta - 1) // per_cta


def _launch_matvec(kernel: str, w, t, x, cols: int, out, stream, *extra, geometry=None):
    """Shared body of matvec / matvec_xgroup: validate w, launch `kernel`_<type> over w's rows, return y.
    geometry: (nr, wpr) for Q8_0R (benchmarks, tests); default q8r_launch_geometry."""
    _check_cols(t, cols)
    rb = _weight_geometry(w, t, cols, 2, "w")
    rows = w.shape[0]
    y = _out(out, (rows,))
    if isinstance(t, Q8_0R):
        group_rows = int(extra[0]) if extra else 0
        suffix, xargs = _x_args(x, t)
        nr, wpr = q8r_launch_geometry(rows, cols, group_rows, *(geometry or (None, None)), max_nr=2 if suffix else 4)
        if suffix and nr == 4:
            raise ValueError("the int8-activation kernels take 1 or 2 rows per warp, got 4")
        with _stream(stream):
            get_kernel("matvec", f"{kernel}_q8_0r{suffix}_r{nr}")(
                (_q8r_grid(rows, nr, wpr),), (_THREADS,),
                (w, np.int32(t.slab_rows)) + xargs + (y, np.int32(rows), np.int32(cols), np.int32(wpr)) + extra)
        return y
    _x_args(x, t)
    wpr = warps_per_row(rows)
    with _stream(stream):
        get_kernel("matvec", f"{kernel}_{_SUFFIX[t]}")(
            (row_blocks(rows, wpr),), (_THREADS,),
            (w, np.int64(rb), x, y, np.int32(rows), np.int32(cols), np.int32(wpr)) + extra)
    return y


def matvec(w, qtype, x, out=None, stream=None, geometry=None):
    """y[rows] = dequant(w)[rows, cols] @ x[cols] (float32). w: raw rows [rows, row_bytes] (plain types: [rows, cols]).
    x: float32 [cols], or Q8Activations of it (Q8_0R weights). geometry: (rows per warp, warps per row group) for
    Q8_0R weights (benchmarks, tests); default chosen."""
    if isinstance(x, Q8Activations):
        if len(x.shape) != 1:
            raise ValueError(f"x must be a vector [cols], got shape {x.shape}")
        _q8x(x, x.shape, "x")
        return _launch_matvec("matvec", w, _qtype(qtype), x, x.shape[0], out, stream, geometry=geometry)
    x = _aligned16(_f32(x, "x"), "x")
    if x.ndim != 1:
        raise ValueError(f"x must be a vector [cols], got shape {x.shape}")
    return _launch_matvec("matvec", w, _qtype(qtype), x, x.shape[0], out, stream, geometry=geometry)


def matvec_xgroup(w, qtype, x, out=None, stream=None, geometry=None):
    """Row block g of w times its own input: y[g*R + r] = dequant(w)[g*R + r] @ x[g], x: float32 [G, cols],
    w: raw rows [G*R, row_bytes]. One launch for the grouped attention output projection (model.md §2.4).
    x may be Q8Activations of it (Q8_0R weights)."""
    if isinstance(x, Q8Activations):
        _q8x(x, x.shape, "x")
    else:
        x = _aligned16(_f32(x, "x"), "x")
    if len(x.shape) != 2:
        raise ValueError(f"x must be [groups, cols], got shape {x.shape}")
    groups, cols = x.shape
    if w.shape[0] % groups:
        raise ValueError(f"w has {w.shape[0]} rows, not a multiple of the {groups} input groups")
    return _launch_matvec("matvec_xgroup", w, _qtype(qtype), x, cols, out, stream, np.int32(w.shape[0] // groups),
                          geometry=geometry)


class MatvecGroup:
    """Several matrices of one type and width that multiply the same vector, in one launch (fused projections).

    Build once (it uploads a small pointer table), then call run(x) each step; the output is the concatenation of the
    matrices' outputs, float32 [sum of rows]; `offsets[m]:offsets[m+1]` is matrix m's part. qtype: one type for all,
    or a sequence of per-matrix qtypes (Q8_0R markers may differ in slab rows, e.g. q_a and kv fused).
    """

    def __init__(self, weights, qtype, cols: int, geometry=None):
        import cupy
        if not weights:
            raise ValueError("MatvecGroup needs at least one weight matrix")
        per_matrix = ([_qtype(q) for q in qtype] if isinstance(qtype, (list, tuple))
                      else [_qtype(qtype)] * len(weights))
        if len(per_matrix) != len(weights):
            raise ValueError(f"{len(per_matrix)} qtypes for {len(weights)} weight matrices")
        self.qtype = per_matrix[0]
        if isinstance(self.qtype, Q8_0R):
            if not all(isinstance(q, Q8_0R) for q in per_matrix):
                raise ValueError(f"MatvecGroup: one layout for all matrices, got {[str(q) for q in per_matrix]}")
            if len({q.slab_rows for q in per_matrix}) > 1 and any(q.slab_rows != int(w.shape[0])
                                                                  for q, w in zip(per_matrix, weights)):
                raise ValueError("MatvecGroup: Q8_0R matrices with different slab rows must each be one slab")
        elif any(q != self.qtype for q in per_matrix):
            raise ValueError(f"MatvecGroup: one type for all matrices, got {[q.name for q in per_matrix]}")
        _check_cols(self.qtype, cols)
        self.cols = cols
        self.row_stride = 0
        for i, (w, q) in enumerate(zip(weights, per_matrix)):
            self.row_stride = _weight_geometry(w, q, cols, 2, f"weights[{i}]")
        self.weights = list(weights)  # keep them alive: the table holds raw pointers
        rows = [int(w.shape[0]) for w in weights]
        self.offsets = tuple(int(v) for v in np.concatenate([[0], np.cumsum(rows)]))
        self.total_rows = self.offsets[-1]
        self._ptrs = cupy.asarray(np.array([w.data.ptr for w in weights], dtype=np.uint64))
        self._row_start = cupy.asarray(np.array(self.offsets, dtype=np.int32))
        if isinstance(self.qtype, Q8_0R):
            slabs = {q.slab_rows for q in per_matrix}
            self._slab_rows = slabs.pop() if len(slabs) == 1 else 0     # 0: each matrix is one slab (matvec.cu)
            self._nr, self._wpr = q8r_launch_geometry(self.total_rows, cols, 0, *(geometry or (None, None)))
            self._grid = _q8r_grid(self.total_rows, self._nr, self._wpr)
            self._kernel = get_kernel("matvec", f"matvec_group_q8_0r_r{self._nr}")
            self._geometry = geometry
        else:
            self._wpr = warps_per_row(self.total_rows)
            self._grid = row_blocks(self.total_rows, self._wpr)
            self._kernel = get_kernel("matvec", f"matvec_group_{_SUFFIX[self.qtype]}")

    def run(self, x, out=None, stream=None):
        """y = the matrices' products with x: float32 [cols], or Q8Activations of it (Q8_0R weights)."""
        if isinstance(x, Q8Activations):
            _q8x(x, (self.cols,), "x")
        else:
            x = _aligned16(_f32(x, "x", (self.cols,)), "x")
        suffix, xargs = _x_args(x, self.qtype)
        kernel, grid, wpr = self._kernel, self._grid, self._wpr
        if suffix:      # int8 activations: kernels of 1 or 2 rows per warp
            nr, wpr = q8r_launch_geometry(self.total_rows, self.cols, 0, *(self._geometry or (None, None)), max_nr=2)
            if nr == 4:
                raise ValueError("the int8-activation kernels take 1 or 2 rows per warp, got 4")
            kernel, grid = get_kernel("matvec", f"matvec_group_q8_0r_q8x_r{nr}"), _q8r_grid(self.total_rows, nr, wpr)
        y = _out(out, (self.total_rows,))
        stride = np.int32(self._slab_rows) if isinstance(self.qtype, Q8_0R) else np.int64(self.row_stride)
        with _stream(stream):
            kernel((grid,), (_THREADS,),
                   (self._ptrs, self._row_start, np.int32(len(self.weights)), stride) + xargs
                   + (y, np.int32(self.total_rows), np.int32(self.cols), np.int32(wpr)))
        return y

    def split(self, y):
        """Views of y, one per matrix."""
        return [y[a:b] for a, b in zip(self.offsets[:-1], self.offsets[1:])]


# ---- matmul, dequantize --------------------------------------------------------------------------------------------
# Prefill products have two kernel families: matmul.cu (float32 FMAs on CUDA cores, every type, the precise path) and
# matmul_mma.cu (tensor cores, mma.sync f16 -> f32, Q8_0 / Q8_0R / F16; float32-level results: the kernel header says
# why). use_mma is the one rule that picks between them.
MMA_MIN_TOKENS = 16
MMA_TYPES = frozenset({T.Q8_0, T.F16})   # and every Q8_0R(slab_rows)
MMA_MIN_CAPABILITY = 80                    # mma.sync.m16n8k16 f16 needs sm_80


def use_mma(qtype, n: int, capability: int | None = None) -> bool:
    """Whether matmul / matmul_xgroup run an [n, cols] x [rows, cols]^T product on tensor cores (matmul_mma.cu).

    Rule: qtype is Q8_0, Q8_0R or F16, n >= MMA_MIN_TOKENS (16) and the device is sm_80 or newer (capability: e.g.
    90; the current device's when None). Everything else (other types, fewer tokens, precise=True) takes the float32
    CUDA-core kernels of matmul.cu.
    Why 16: a CTA of the mma kernel covers 128 tokens, so at n tokens it does 128 / n times the useful tensor work;
    with hi + lo fp16 operands the kernel's useful rate on full tiles is ~1/4 of the H200's ~990 TFLOP/s fp16 peak
    (2 mma per product, mma.sync at ~1/2 of peak), ~8x the ~30 TFLOP/s the float32 64 x 64 tiles reach. Below
    ~128 / 8 = 16 tokens the padding eats that advantage; both kernels then read each weight row once, so the product
    is bound by weight bytes either way (the decode-like regime, n = 1 goes to matvec).
    BF16 / F32 weights stay on the float32 kernel: their range and precision do not fit fp16 operands.
    The path is switch PREFILL_MMA (engines/cuda/switches.py: DS4CUPY_PREFILL_MMA=1 / 0; off by default until it
    has run on a GPU): when off, every product takes matmul.cu."""
    if not switches.enabled("PREFILL_MMA"):
        return False
    t = qtype if isinstance(qtype, Q8_0R) else quants.qtype_of(qtype)
    if not (isinstance(t, Q8_0R) or t in MMA_TYPES) or int(n) < MMA_MIN_TOKENS:
        return False
    if capability is None:
        capability = _device_capability()
    return int(capability) >= MMA_MIN_CAPABILITY


def _device_capability() -> int:
    import cupy
    return _capability_of(cupy.cuda.Device().id)


@functools.cache
def _capability_of(device_id: int) -> int:
    import cupy
    return int(cupy.cuda.Device(device_id).compute_capability)


def _launch_mma(w, t, rb: int, x, ldx: int, xgoff: int, y, ldy: int, ygoff: int, n: int, R: int, cols: int,
                groups: int, stream) -> None:
    """One launch of matmul_mma.cu (its header gives the arguments)."""
    q8r = isinstance(t, Q8_0R)
    name = "mma_matmul_q8_0r" if q8r else f"mma_matmul_{_SUFFIX[t]}"
    with _stream(stream):
        get_kernel("matmul_mma", name)(
            ((R + 127) // 128, (n + 127) // 128, groups), (_THREADS,),
            (w, np.int64(t.slab_rows if q8r else rb), x, np.int64(ldx), np.int64(xgoff), y, np.int64(ldy),
             np.int64(ygoff), np.int32(n), np.int32(R), np.int32(cols)))


def matmul(w, qtype, x, out=None, stream=None, precise: bool = False):
    """Y[n, rows] = X[n, cols] @ dequant(w)^T (float32), any n >= 1.

    Kernel: tensor cores (matmul_mma.cu) when use_mma(qtype, n) and not precise, else the float32 CUDA-core kernel
    (matmul.cu). Both are float32-accurate (the mma kernel splits activations into two fp16 terms and keeps Q8_0
    quants exact); they differ in summation order."""
    t = _qtype(qtype)
    x = _f32(x, "x")
    if x.ndim != 2:
        raise ValueError(f"x must be [n, cols], got shape {x.shape}")
    n, cols = x.shape
    _check_cols(t, cols)
    rb = _weight_geometry(w, t, cols, 2, "w")
    rows = w.shape[0]
    y = _out(out, (n, rows))
    if n == 0:
        return y
    if not precise and use_mma(t, n):
        _aligned16(x, "x")
        _launch_mma(w, t, rb, x, cols, 0, y, rows, 0, n, rows, cols, 1, stream)
        return y
    q8r = isinstance(t, Q8_0R)
    k = get_kernel("matmul", "matmul_q8_0r" if q8r else f"matmul_{_SUFFIX[t]}")
    with _stream(stream):
        k(((rows + 63) // 64, (n + 63) // 64), (_THREADS,),
          (w, np.int32(t.slab_rows) if q8r else np.int64(rb), x, y, np.int32(n), np.int32(rows), np.int32(cols)))
    return y


def matmul_xgroup(w, qtype, x, groups: int, out=None, stream=None, precise: bool = False):
    """Grouped product, the prefill form of matvec_xgroup (the attention output projection, model.md §2.4):
    Y[t, g*R + r] = sum_c dequant(w)[g*R + r, c] * X[t, g*cin + c] for groups g < G, R = rows / G, cin = cols / G.

    x: float32 [n, G * cin] (the attention output [n, H, head_dim] reshaped: group g = heads g*H/G ..), w: raw rows
    [G * R, row_bytes of cin], out: float32 [n, G * R]. Q8_0R weights need slab_rows dividing R (one slab per group
    or several). One launch on tensor cores when use_mma(qtype, n) and not precise; otherwise G float32 products on
    per-group copies of x (matmul.cu)."""
    t = _qtype(qtype)
    x = _f32(x, "x")
    if x.ndim != 2:
        raise ValueError(f"x must be [n, groups * cols], got shape {x.shape}")
    groups = int(groups)
    n, width = x.shape
    if groups <= 0 or width % groups:
        raise ValueError(f"x's {width} columns do not split into groups={groups}")
    cols = width // groups
    _check_cols(t, cols)
    rb = _weight_geometry(w, t, cols, 2, "w")
    rows = int(w.shape[0])
    if rows % groups:
        raise ValueError(f"w has {rows} rows, not a multiple of groups={groups}")
    R = rows // groups
    if isinstance(t, Q8_0R) and R % t.slab_rows:
        raise ValueError(f"w: {t} does not divide the {R} rows of one group")
    y = _out(out, (n, rows))
    if n == 0:
        return y
    if not precise and use_mma(t, n):
        _aligned16(x, "x")
        _launch_mma(w, t, rb, x, width, cols, y, rows, R, n, R, cols, groups, stream)
        return y
    import cupy
    with _stream(stream):
        for g in range(groups):
            xg = cupy.ascontiguousarray(x[:, g * cols:(g + 1) * cols])
            yg = matmul(w[g * R:(g + 1) * R], t, xg, precise=True)
            y[:, g * R:(g + 1) * R] = yg
    return y


def dequantize(w, qtype, cols: int, out=None, stream=None):
    """float32 [rows, cols] = the decoded rows of w (bit-exact with ds4cupy.format.quants.dequantize)."""
    t = _qtype(qtype)
    _check_cols(t, cols)
    rb = _weight_geometry(w, t, cols, 2, "w")
    rows = w.shape[0]
    y = _out(out, (rows, cols))
    q8r = isinstance(t, Q8_0R)
    k = get_kernel("matmul", "dequantize_q8_0r" if q8r else f"dequantize_{_SUFFIX[t]}")
    blocks = max(1, min((rows * cols + _THREADS - 1) // _THREADS, 65535))
    with _stream(stream):
        k((blocks,), (_THREADS,), (w, np.int32(t.slab_rows) if q8r else np.int64(rb), y, np.int32(rows),
                                   np.int32(cols)))
    return y


# ---- MoE -------------------------------------------------------------------------------------------------------------
def _experts(w, t, cols: int, what: str):
    """(array, n_expert, rows, row_stride) for an expert stack [E, rows, row_bytes] or a plain 2-D matrix (E = 1)."""
    if getattr(w, "ndim", 0) == 2:
        rb = _weight_geometry(w, t, cols, 2, what)
        return w, 1, int(w.shape[0]), rb
    rb = _weight_geometry(w, t, cols, 3, what)
    return w, int(w.shape[0]), int(w.shape[1]), rb


def _routing(ids, weights, n: int, what_k: int | None):
    """Validate token-major ids [n, k] int32 and weights [n, k] float32; returns k."""
    import cupy
    if ids is None:
        if weights is not None:
            raise ValueError("weights without ids: pass both (routed experts) or neither (shared expert)")
        return 1
    if not isinstance(ids, cupy.ndarray) or ids.dtype != np.int32 or ids.ndim != 2 or ids.shape[0] != n \
            or not ids.flags.c_contiguous:
        raise ValueError(f"ids must be a C-contiguous cupy int32 array [n={n}, k], got "
                         f"{getattr(ids, 'dtype', type(ids).__name__)} {getattr(ids, 'shape', '')}")
    k = int(ids.shape[1])
    if weights is not None:
        _f32(weights, "weights", (n, k))
    if what_k is not None and k != what_k:
        raise ValueError(f"ids has k={k} experts per token, mid has {what_k}")
    return k


# formats with decode-fast MoE kernels (moe.cu, moe_*_fast_<suffix>: warp per unit of rows, persistent grid)
_FAST_GATE_UP = frozenset({T.IQ2_XXS, T.Q4_K})
_FAST_DOWN = frozenset({T.Q2_K, T.Q4_K})
_FAST_ROWS_PER_WARP = 2  # DS4_MOE_RF / DS4_MOE_RD in moe.cu
_I8_ROWS_PER_WARP = 4    # I8_RF in moe.cu
_I8S_ROWS_PER_WARP = 2   # I8S_RF in moe.cu (moe_gate_up_i8s_iq2_xxs: one token, weights staged in shared memory)
_I8S_MAX_COLS = 4096     # I8_STAGE_COLS in moe.cu


def i8s_smem_bytes(row_bytes: int) -> int:
    """Dynamic shared memory of moe_gate_up_i8s_iq2_xxs: 8 warps x 2 buffers x (2 I8S_RF rows + 16 bytes)."""
    return 8 * 2 * (2 * _I8S_ROWS_PER_WARP * row_bytes + 16)


_XS_ROWS_PER_WARP = 4    # XS_RD in moe.cu (moe_down_xs_q2_k: one token, mid staged in shared memory)
_XS_MAX_SMEM = 64 * 1024  # its mid copy: k * ff * 4 bytes of dynamic shared memory (two CTAs an SM on an H200)


def _use_xs(t, n: int, k: int, ff: int) -> bool:
    """moe_down_xs_q2_k takes a Q2_K down for one token whose k x ff mid fits _XS_MAX_SMEM, switch MOE_STAGED on."""
    return t == T.Q2_K and n == 1 and 4 * k * ff <= _XS_MAX_SMEM and switches.enabled("MOE_STAGED")


_XSW_ROWS_PER_WARP = 2   # XSW_RD in moe.cu (moe_down_xsw_q2_k: mid and the unit's weights staged)
_MAX_DYN_SMEM = 227 * 1024


def xsw_smem_bytes(k: int, ff: int, row_bytes: int) -> int:
    """Dynamic shared memory of moe_down_xsw_q2_k: the mid copy (4 k ff) + 8 warps' unit buffers."""
    return 4 * k * ff + 8 * (k * _XSW_ROWS_PER_WARP * row_bytes + 16)


def _use_xsw(t, n: int, k: int, ff: int, rb: int, down) -> bool:
    """moe_down_xsw_q2_k: _use_xs's cases whose rows line up with 16-byte copies (ff % 1024 == 0) and fit, with
    switch MOE_DOWN_STAGED on too."""
    return (_use_xs(t, n, k, ff) and rb % 16 == 0 and down.data.ptr % 16 == 0
            and xsw_smem_bytes(k, ff, rb) <= _MAX_DYN_SMEM and switches.enabled("MOE_DOWN_STAGED"))


def _use_i8s(t, n: int, cols: int, rb: int, gate, up) -> bool:
    """moe_gate_up_i8s_iq2_xxs takes IQ2_XXS gate/up for one token when its 16-byte copies line up (row bytes and
    both stacks' addresses multiples of 16: cols a multiple of 2,048) and the switches MOE_I8 and MOE_STAGED are on."""
    return (t == T.IQ2_XXS and n == 1 and cols <= _I8S_MAX_COLS and rb % 16 == 0 and gate.data.ptr % 16 == 0
            and up.data.ptr % 16 == 0 and switches.enabled("MOE_I8") and switches.enabled("MOE_STAGED"))


_Q8R_MOE_ROWS = 2        # rows per warp of moe_*_q8_0r (gate/up: 2 gate + 2 up dot products); moe.cu has r1, r2


def _persistent_grid(kern, units: int, smem: int = 0) -> int:
    """CTAs of 256 threads (8 warps, one unit each at a time) for `units` warp units: no more than fit at once (with
    `smem` bytes of dynamic shared memory each)."""
    import cupy
    dev = cupy.cuda.Device().id
    per_sm = _resident_ctas(kern, dev, smem)
    return max(1, min((units + 7) // 8, per_sm * _sm_count(dev)))


_RESIDENT: dict = {}


def _resident_ctas(kern, dev: int, smem: int = 0) -> int:
    key = (kern.name, dev, smem)
    if key not in _RESIDENT:
        try:
            from cupy_backends.cuda.api import driver
            n = driver.occupancyMaxActiveBlocksPerMultiprocessor(kern.kernel.ptr, _THREADS, smem)
        except Exception:
            n = 2
        _RESIDENT[key] = max(1, int(n))
    return _RESIDENT[key]


def _q8r_moe_geometry(rows: int, cols: int, geometry, dots_per_row: int) -> tuple[int, int]:
    nr, wpr = q8r_launch_geometry(rows, cols, 0, *(geometry or (_Q8R_MOE_ROWS, None)), dots_per_row=dots_per_row)
    if nr not in (1, 2):
        raise ValueError(f"the Q8_0R MoE kernels take 1 or 2 rows per warp, got {nr}")
    return nr, wpr


def moe_gate_up(gate, up, qtype, x, ids=None, weights=None, clamp: float = 10.0, out=None, stream=None,
                geometry=None):
    """mid[n, k, ff] = silu(min(gate_e . x, c)) * clamp(up_e . x, -c, c) * w for every (token, selected expert).

    gate, up: [E, ff, row_bytes] expert stacks (or [ff, row_bytes] for the shared expert, with ids=weights=None:
    expert 0, weight 1). x: float32 [n, D] (or [D]: n = 1). ids: int32 [n, k], weights: float32 [n, k] on the device.
    clamp: the SwiGLU limit c (model.md §2.8; float('inf') for none). geometry: (rows per warp, warps per row
    group) of the Q8_0R kernels (rows per warp 1 or 2; tests, benchmarks).
    """
    t = _qtype(qtype)
    x = _aligned16(_f32(x, "x"), "x")
    x2 = x.reshape(1, -1) if x.ndim == 1 else x
    if x2.ndim != 2:
        raise ValueError(f"x must be [n, D] or [D], got shape {x.shape}")
    n, cols = x2.shape
    _check_cols(t, cols)
    if gate.shape != up.shape:
        raise ValueError(f"gate and up must have the same shape, got {gate.shape} and {up.shape}")
    if ids is None and gate.ndim != 2:
        raise ValueError("an expert stack [E, ff, row_bytes] needs ids and weights; pass a 2-D weight for the shared "
                         "expert")
    gate, n_expert, ff, rb = _experts(gate, t, cols, "gate")
    _experts(up, t, cols, "up")
    k = _routing(ids, weights, n, None)
    if n * k > 65535:
        raise ValueError(f"{n} tokens x {k} experts = {n * k} pairs exceeds one launch (65535); split the chunk")
    mid = _out(out, (n, k, ff))
    null = np.uint64(0)
    if isinstance(t, Q8_0R):
        nr, wpr = _q8r_moe_geometry(ff * n * k, cols, geometry, 2)
        kern = get_kernel("moe", f"moe_gate_up_q8_0r_r{nr}")
        with _stream(stream):
            kern((_q8r_grid(ff, nr, wpr), n * k), (_THREADS,),
                 (gate, up, np.int64(ff * rb), np.int32(t.slab_rows), ids if ids is not None else null,
                  weights if weights is not None else null, np.int32(k), np.int32(n_expert), x2, np.int32(cols), mid,
                  np.int32(ff), np.float32(clamp), np.int32(wpr)))
        return mid
    if _use_i8s(t, n, cols, rb, gate, up):     # integer dot products, weights staged in shared memory (one token)
        kern = get_kernel("moe", "moe_gate_up_i8s_iq2_xxs")
        smem = i8s_smem_bytes(rb)
        if kern.max_dynamic_shared_size_bytes < smem:
            kern.max_dynamic_shared_size_bytes = smem
        units = k * ((ff + _I8S_ROWS_PER_WARP - 1) // _I8S_ROWS_PER_WARP)
        with _stream(stream):
            kern((_persistent_grid(kern, units, smem),), (_THREADS,),
                 (gate, up, np.int64(ff * rb), np.int64(rb), ids if ids is not None else null,
                  weights if weights is not None else null, np.int32(k), np.int32(n_expert), x2, np.int32(cols), mid,
                  np.int32(ff), np.float32(clamp), np.int32(k)), shared_mem=smem)
        return mid
    if t in _FAST_GATE_UP:
        if t == T.IQ2_XXS and switches.enabled("MOE_I8"):     # integer dot products (moe.cu, moe_gate_up_i8_*)
            kern, rows_per_unit = get_kernel("moe", "moe_gate_up_i8_iq2_xxs"), _I8_ROWS_PER_WARP
        else:
            kern, rows_per_unit = get_kernel("moe", f"moe_gate_up_fast_{_SUFFIX[t]}"), _FAST_ROWS_PER_WARP
        units = n * k * ((ff + rows_per_unit - 1) // rows_per_unit)
        with _stream(stream):
            kern((_persistent_grid(kern, units),), (_THREADS,),
                 (gate, up, np.int64(ff * rb), np.int64(rb), ids if ids is not None else null,
                  weights if weights is not None else null, np.int32(k), np.int32(n_expert), x2, np.int32(cols), mid,
                  np.int32(ff), np.float32(clamp), np.int32(n * k)))
        return mid
    wpr = warps_per_row(ff * n * k)
    kern = get_kernel("moe", f"moe_gate_up_{_SUFFIX[t]}")
    with _stream(stream):
        kern((row_blocks(ff, wpr), n * k), (_THREADS,),
             (gate, up, np.int64(ff * rb), np.int64(rb), ids if ids is not None else null,
              weights if weights is not None else null, np.int32(k), np.int32(n_expert), x2, np.int32(cols), mid,
              np.int32(ff), np.float32(clamp), np.int32(wpr)))
    return mid


def moe_down(down, qtype, mid, ids=None, out=None, accumulate: bool = False, stream=None, geometry=None):
    """y[n, D] (+)= sum_j down[ids[t, j]] . mid[t, j] (routing weights are already in mid).

    down: [E, D, row_bytes] (or [D, row_bytes] for the shared expert, ids=None). mid: float32 [n, k, ff] (or [k, ff]
    / [ff] for one token). accumulate=True adds into `out` (which must then be given), e.g. shared onto routed.
    """
    t = _qtype(qtype)
    mid = _aligned16(_f32(mid, "mid"), "mid")
    mid3 = mid.reshape((1,) * (3 - mid.ndim) + mid.shape) if mid.ndim < 3 else mid
    if mid3.ndim != 3:
        raise ValueError(f"mid must be [n, k, ff], got shape {mid.shape}")
    n, k_mid, ff = mid3.shape
    _check_cols(t, ff)
    if ids is None and down.ndim != 2:
        raise ValueError("an expert stack [E, D, row_bytes] needs ids; pass a 2-D weight for the shared expert")
    down, n_expert, D, rb = _experts(down, t, ff, "down")
    k = _routing(ids, None, n, k_mid)
    if ids is None and k_mid != 1:
        raise ValueError(f"without ids, mid must hold one expert per token, got k={k_mid}")
    if accumulate and out is None:
        raise ValueError("accumulate=True needs out= (the array to add into)")
    if n > 65535:
        raise ValueError(f"{n} tokens exceed one launch (65535); split the chunk")
    y = _out(out, (n, D))
    if isinstance(t, Q8_0R):
        nr, wpr = _q8r_moe_geometry(D * n, ff, geometry, 1)
        kern = get_kernel("moe", f"moe_down_q8_0r_r{nr}")
        with _stream(stream):
            kern((_q8r_grid(D, nr, wpr), n), (_THREADS,),
                 (down, np.int64(D * rb), np.int32(t.slab_rows), ids if ids is not None else np.uint64(0),
                  np.int32(k), np.int32(n_expert), mid3, np.int32(ff), y, np.int32(D),
                  np.int32(1 if accumulate else 0), np.int32(wpr)))
        return y
    xsw = _use_xsw(t, n, k, ff, rb, down)
    if xsw or _use_xs(t, n, k, ff):             # one token: mid (and with xsw the weights) staged in shared memory
        kern = get_kernel("moe", "moe_down_xsw_q2_k" if xsw else "moe_down_xs_q2_k")
        smem = xsw_smem_bytes(k, ff, rb) if xsw else 4 * k * ff
        if kern.max_dynamic_shared_size_bytes < smem:
            kern.max_dynamic_shared_size_bytes = smem
        rd = _XSW_ROWS_PER_WARP if xsw else _XS_ROWS_PER_WARP
        units = (D + rd - 1) // rd
        with _stream(stream):
            kern((_persistent_grid(kern, units, smem),), (_THREADS,),
                 (down, np.int64(D * rb), np.int64(rb), ids if ids is not None else np.uint64(0), np.int32(k),
                  np.int32(n_expert), mid3, np.int32(ff), y, np.int32(D), np.int32(1 if accumulate else 0)),
                 shared_mem=smem)
        return y
    if t in _FAST_DOWN:
        kern = get_kernel("moe", f"moe_down_fast_{_SUFFIX[t]}")
        units = n * ((D + _FAST_ROWS_PER_WARP - 1) // _FAST_ROWS_PER_WARP)
        with _stream(stream):
            kern((_persistent_grid(kern, units),), (_THREADS,),
                 (down, np.int64(D * rb), np.int64(rb), ids if ids is not None else np.uint64(0), np.int32(k),
                  np.int32(n_expert), mid3, np.int32(ff), y, np.int32(D), np.int32(1 if accumulate else 0),
                  np.int32(n)))
        return y
    wpr = warps_per_row(D * n)
    kern = get_kernel("moe", f"moe_down_{_SUFFIX[t]}")
    with _stream(stream):
        kern((row_blocks(D, wpr), n), (_THREADS,),
             (down, np.int64(D * rb), np.int64(rb), ids if ids is not None else np.uint64(0), np.int32(k),
              np.int32(n_expert), mid3, np.int32(ff), y, np.int32(D), np.int32(1 if accumulate else 0),
              np.int32(wpr)))
    return y


__all__ = ["SUPPORTED_TYPES", "Q8_0R", "Q8Activations", "quantize_q8x", "quantize_q8x_np", "matvec", "matvec_xgroup", "MatvecGroup", "matmul", "dequantize",
           "moe_gate_up", "moe_down", "warps_per_row", "q8r_launch_geometry", "repack_q8_0", "unpack_q8_0",
           "matmul_xgroup", "use_mma", "MMA_MIN_TOKENS", "MMA_TYPES", "i8s_smem_bytes", "xsw_smem_bytes"]
