"""ds4cupy: DeepSeek-V4-Flash on one NVIDIA GPU, from the GGUF files users already have.

`ds4cupy.load(path)` opens a model; see docs/ARCHITECTURE.md for the Session contract. CuPy is imported only by the
CUDA backend, so everything else works on machines without a GPU.
"""
__version__ = "0.1.0"


def load(path, backend="auto", qat=True, **kwargs):
    """Open a ds4-layout GGUF and return a Model (see ds4cupy.engines.load)."""
    from .engines import load as _load
    return _load(path, backend=backend, qat=qat, **kwargs)


__all__ = ["load", "__version__"]
