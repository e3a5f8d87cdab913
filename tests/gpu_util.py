"""Shared helpers for GPU tests: `requires_gpu` marks a test (or, as `pytestmark = GPU_MARKS`, a module) as needing
an NVIDIA GPU and skips it cleanly when CuPy cannot see a device (no driver, no GPU, no CuPy)."""
import functools

import pytest


@functools.cache
def gpu_available() -> bool:
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # ImportError, CUDARuntimeError (no driver), ...
        return False


GPU_MARKS = [pytest.mark.gpu, pytest.mark.skipif(not gpu_available(), reason="needs a CUDA GPU visible to CuPy")]


def requires_gpu(test):
    """Decorator: pytest.mark.gpu plus a skip when no GPU is visible."""
    for mark in reversed(GPU_MARKS):
        test = mark(test)
    return test
