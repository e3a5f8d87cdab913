"""Engines: `load()` and the Session contract (contract.py); the NumPy reference and the CuPy backend (cuda/).

Sits on `format`, `memory` and `text` (a loaded model builds its tokenizer); never imports tools or server."""
from .loader import BACKENDS, MEMORY_MODES, Model, gpu_available, load

__all__ = ["BACKENDS", "MEMORY_MODES", "Model", "gpu_available", "load"]
