"""Shared fixtures: tiny generated models in the exact ds4 layout (written once per test session)."""
from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _tiny_model(tmp_path_factory, experts: str, seed: int) -> Path:
    """The `tiny` preset with the demo tokenizer and the given expert types, written under a session tmp dir."""
    from ds4cupy.format.config import ModelConfig
    from ds4cupy.tools.make_model import tokenizer_fields, write_random_model
    n_vocab, _ = tokenizer_fields(None)
    path = tmp_path_factory.mktemp("models") / f"tiny-{experts}.gguf"
    return write_random_model(path, ModelConfig.tiny(n_vocab), experts=experts, seed=seed)


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> Path:
    """ds4's q2 experts (IQ2_XXS gate/up, Q2_K down)."""
    return _tiny_model(tmp_path_factory, "q2", 1234)


@pytest.fixture(scope="session")
def tiny_q4_model_path(tmp_path_factory) -> Path:
    return _tiny_model(tmp_path_factory, "q4", 4321)
