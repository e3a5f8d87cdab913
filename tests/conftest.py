"""Shared fixtures: tiny generated models in the exact ds4 layout (written once per test session)."""
from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> Path:
    """The `tiny` preset with ds4's q2 experts (IQ2_XXS gate/up, Q2_K down) and the demo tokenizer."""
    from ds4cupy.config import ModelConfig
    from ds4cupy.make_model import tokenizer_fields, write_random_model
    n_vocab, _ = tokenizer_fields(None)
    path = tmp_path_factory.mktemp("models") / "tiny-q2.gguf"
    write_random_model(path, ModelConfig.tiny(n_vocab), experts="q2", seed=1234)
    return path


@pytest.fixture(scope="session")
def tiny_q4_model_path(tmp_path_factory) -> Path:
    from ds4cupy.config import ModelConfig
    from ds4cupy.make_model import tokenizer_fields, write_random_model
    n_vocab, _ = tokenizer_fields(None)
    path = tmp_path_factory.mktemp("models") / "tiny-q4.gguf"
    write_random_model(path, ModelConfig.tiny(n_vocab), experts="q4", seed=4321)
    return path
