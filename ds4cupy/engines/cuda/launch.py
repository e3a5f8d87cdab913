"""Programmatic dependent launch (switch PDL, sm_90+): kernels launched through the driver's cuLaunchKernelEx with
the attribute CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION, so the next kernel's launch and CTA scheduling
overlap the previous kernel's tail (in a captured CUDA graph the attribute becomes a programmatic edge).

Why it is safe: every kernel of ds4cupy/kernels starts with DS4_PDL_ENTRY() (kernels/pdl.cuh; tests/test_pdl.py
checks each one), which waits for the grids it depends on to complete and their writes to be visible before it
touches global memory. Kernels launched otherwise (CuPy's own, plain RawKernel calls) keep full stream order.

Where: only launches into a stream that is being captured (the decode graph) take cuLaunchKernelEx; eager launches go
through the RawKernel as before. Marshalling the arguments here costs ~20-50 us of host time a launch (ctypes), which
a replayed graph never pays but an eager prefill chunk of ~1,700 launches would (+35-90 ms), while an eager launch
gains nothing from PDL (the host, not the GPU, is the gap).

compile.get_kernel returns a PdlKernel instead of the cupy.RawKernel when the switch is on and the device's compute
capability is >= 9.0. PdlKernel is called like the RawKernel, `k(grid, block, args, shared_mem=0, stream=None)`, and
passes every other attribute (max_dynamic_shared_size_bytes, name, kernel.ptr, ...) through to it: both launch the
same CUfunction, so a function attribute set through either holds for both.

The kernel arguments are marshalled as cupy/cuda/function.pyx `_pointer` does (CuPy 14): a cupy.ndarray -> its data
pointer (CuPy passes a CArray struct whose first 8 bytes are that pointer; a pointer parameter reads only those), a
cupy MemoryPointer -> its pointer; a NumPy scalar of a type in '?bhilqBHILQefdFD' -> its bytes; a Python int ->
int64, float -> float64, bool -> int64 (bool is an int, and CuPy tests int first), complex -> complex128. Anything
else, None included (CuPy would pass a NULL parameter pointer), is a TypeError naming the argument's index.
"""
from __future__ import annotations

import ctypes
import functools
import sys

import numpy as np

CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION = 6      # cuda.h, CUlaunchAttributeID
CUDA_ERROR_INVALID_CONTEXT = 201
_SCALAR_TYPES = frozenset(np.dtype(c).type for c in "?bhilqBHILQefdFD")


class CUlaunchAttribute(ctypes.Structure):
    # id, 4 bytes of padding, then the 64-byte value union (8-byte aligned: it holds pointers)
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_uint64 * 8)]


class CUlaunchConfig(ctypes.Structure):
    _fields_ = [("gridDimX", ctypes.c_uint), ("gridDimY", ctypes.c_uint), ("gridDimZ", ctypes.c_uint),
                ("blockDimX", ctypes.c_uint), ("blockDimY", ctypes.c_uint), ("blockDimZ", ctypes.c_uint),
                ("sharedMemBytes", ctypes.c_uint), ("hStream", ctypes.c_void_p),
                ("attrs", ctypes.POINTER(CUlaunchAttribute)), ("numAttrs", ctypes.c_uint)]


def arg_bytes(index: int, x) -> bytes:
    """The bytes of kernel argument number `index` as CuPy would pass them (module docstring)."""
    cupy = sys.modules.get("cupy")            # not imported: x is no CuPy object
    if cupy is not None and isinstance(x, cupy.ndarray):
        return int(x.data.ptr).to_bytes(8, "little")
    if cupy is not None and isinstance(x, cupy.cuda.MemoryPointer):
        return int(x.ptr).to_bytes(8, "little", signed=True)
    if type(x) not in _SCALAR_TYPES:
        if isinstance(x, int):
            x = np.int64(x)
        elif isinstance(x, float):
            x = np.float64(x)
        elif isinstance(x, complex):
            x = np.complex128(x)
        else:
            raise TypeError(f"kernel argument {index}: unsupported type {type(x).__name__} (use a cupy.ndarray, a "
                            f"NumPy scalar, or a Python int / float; a null pointer is np.uint64(0))")
    return x.tobytes()


def kernel_params(args) -> tuple[ctypes.Array, list]:
    """The void** array for cuLaunchKernelEx and the buffers it points into (keep both alive until the launch)."""
    bufs = []
    for i, a in enumerate(args):
        b = arg_bytes(i, a)
        buf = (ctypes.c_uint64 * ((len(b) + 7) // 8))()      # 8-byte aligned, as CuPy's CInt64 / CInt128
        ctypes.memmove(buf, b, len(b))
        bufs.append(buf)
    params = (ctypes.c_void_p * max(1, len(bufs)))(*[ctypes.addressof(b) for b in bufs])
    return params, bufs


@functools.cache
def _libcuda():
    lib = ctypes.CDLL("libcuda.so.1")
    lib.cuLaunchKernelEx.argtypes = [ctypes.POINTER(CUlaunchConfig), ctypes.c_void_p,
                                     ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p]
    lib.cuLaunchKernelEx.restype = ctypes.c_int
    return lib


def _launch_ex(config: CUlaunchConfig, func: int, params) -> int:
    return _libcuda().cuLaunchKernelEx(ctypes.byref(config), ctypes.c_void_p(func), params, None)


class PdlKernel:
    """A cupy.RawKernel launched with programmatic stream serialization (module docstring)."""

    def __init__(self, raw):
        object.__setattr__(self, "raw", raw)
        attr = CUlaunchAttribute(id=CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION)
        attr.value[0] = 1                      # programmaticStreamSerializationAllowed (an int at offset 0)
        object.__setattr__(self, "_attr", attr)

    def __getattr__(self, name):
        return getattr(self.raw, name)

    def __setattr__(self, name, value):
        setattr(self.raw, name, value)         # max_dynamic_shared_size_bytes, preferred_shared_memory_carveout

    def __call__(self, grid, block, args, shared_mem=0, stream=None):
        import cupy
        from cupy_backends.cuda.api.driver import CUDADriverError
        s = cupy.cuda.get_current_stream() if stream is None else stream
        if not s.is_capturing():           # eager: the plain launch (module docstring, "Where")
            if stream is None:             # already the current stream: no stream switch on this path
                return self.raw(grid, block, args, shared_mem=shared_mem)
            with s:
                return self.raw(grid, block, args, shared_mem=shared_mem)
        grid, block = (tuple(grid) + (1, 1))[:3], (tuple(block) + (1, 1))[:3]
        params, _bufs = kernel_params(args)
        config = CUlaunchConfig(*(max(1, int(v)) for v in grid), *(max(1, int(v)) for v in block),
                                int(shared_mem), ctypes.c_void_p(s.ptr), ctypes.pointer(self._attr), 1)
        func = self.raw.kernel.ptr
        status = _launch_ex(config, func, params)
        if status == CUDA_ERROR_INVALID_CONTEXT:       # a thread that has made no runtime call yet: CuPy's
            cupy.cuda.runtime.free(0)                  # _ensure_context does the same (binds the primary context)
            status = _launch_ex(config, func, params)
        if status:
            raise CUDADriverError(status)


@functools.cache
def supported(device_id: int) -> bool:
    """PDL needs compute capability 9.0 or newer."""
    import cupy
    return int(cupy.cuda.Device(device_id).compute_capability) >= 90


__all__ = ["PdlKernel", "arg_bytes", "kernel_params", "supported", "CUlaunchAttribute", "CUlaunchConfig"]
