"""The built-in demo model: the tiny preset with random weights, generated once into the user cache and reused.

It lets `ds4cupy run` / `serve` work with no model file at all. Its file name and general.name say that the weights are
random (the text it produces is noise). The cache is `$DS4CUPY_CACHE`, else `$XDG_CACHE_HOME/ds4cupy`, else
`~/.cache/ds4cupy`. The file name carries a digest of everything that shapes its bytes (generator version, config,
seed, expert type, tokenizer), so a change to any of them makes a new file instead of reusing a stale one.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

DEMO_SEED = 1234
DEMO_EXPERTS = "q2"
DEMO_NAME = "ds4cupy demo model (tiny, RANDOM WEIGHTS: output is noise)"


def cache_dir() -> Path:
    """Where ds4cupy keeps generated files: $DS4CUPY_CACHE, $XDG_CACHE_HOME/ds4cupy or ~/.cache/ds4cupy."""
    if os.environ.get("DS4CUPY_CACHE"):
        return Path(os.environ["DS4CUPY_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "ds4cupy"
    return Path.home() / ".cache" / "ds4cupy"


def _demo_recipe() -> tuple:
    """(config, digest of everything that determines the demo file's bytes)."""
    from ..format.config import ModelConfig
    from .make_model import GENERATOR_VERSION, tokenizer_fields

    n_vocab, tok = tokenizer_fields(None)
    cfg = ModelConfig.tiny(n_vocab)
    h = hashlib.sha256()
    h.update(json.dumps([GENERATOR_VERSION, DEMO_SEED, DEMO_EXPERTS, DEMO_NAME,
                         {k: v for k, v in cfg.metadata().items()}], sort_keys=True, default=str).encode())
    h.update(json.dumps(tok, sort_keys=True, ensure_ascii=False, default=str).encode())
    return cfg, h.hexdigest()[:12]


def demo_model_path() -> Path:
    """Path of the demo GGUF, generating it (about a second) on first use.

    Written under a temporary name in the cache directory and renamed into place, so concurrent first uses and
    interrupted writes never expose a partial file.
    """
    from .make_model import write_random_model

    cfg, digest = _demo_recipe()
    d = cache_dir()
    path = d / f"ds4cupy-demo-tiny-random-weights-{digest}.gguf"
    if path.is_file():
        return path
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"cannot create the ds4cupy cache directory {d} ({e}); set DS4CUPY_CACHE to a writable "
                      f"directory") from None
    write_random_model(path, cfg, experts=DEMO_EXPERTS, seed=DEMO_SEED, tokenizer_json=None, progress=False,
                       name=DEMO_NAME)
    return path
