"""Shared fixtures: tiny generated models in the exact ds4 layout (written once per test session), and the seeds of
random test inputs.

Every test that draws random inputs takes them from the `rng` fixture (or its `seed`): the seed is fixed per test
(CRC-32 of the test's node id), so a failure repeats on the next run. `DS4CUPY_TEST_SEED=N` shifts every seed by N,
and `DS4CUPY_SEED_SWEEP=N` runs each such test N times with the shifts 0..N-1 (a sweep over fresh inputs):

    DS4CUPY_SEED_SWEEP=1000 python -m pytest -q tests/test_numerics.py -k e4m3
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from seeding import node_seed, seed_offset

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


@pytest.fixture(scope="module")
def one_blas_thread():
    """For modules that run the tiny reference model many times (`pytestmark = pytest.mark.usefixtures(...)`): its
    matrices are small, so one BLAS thread is faster, and several spin against each other on a shared CI machine
    (measured: 3-4x less CPU time for test_prefix_cache)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:             # test extra not installed: run as is
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


@pytest.fixture(scope="module")
def tiny_reference_model(tiny_model_path):
    """The tiny q2 model loaded on the reference backend, once per module."""
    import ds4cupy
    m = ds4cupy.load(tiny_model_path, backend="reference")
    yield m
    m.close()


def pytest_generate_tests(metafunc):
    sweep = int(os.environ.get("DS4CUPY_SEED_SWEEP", "0"))
    if sweep > 0 and "seed" in metafunc.fixturenames:
        metafunc.parametrize("sweep_offset", range(sweep), ids=lambda n: f"seed+{n}")


@pytest.fixture
def sweep_offset() -> int:
    """The shift of this test's seed: DS4CUPY_TEST_SEED, or the sweep's 0..N-1 under DS4CUPY_SEED_SWEEP=N."""
    return seed_offset()


@pytest.fixture
def seed(request, sweep_offset) -> int:
    """This test's seed: CRC-32 of its node id (its own parameters included, the sweep's left out) plus the shift."""
    node = request.node.nodeid
    if os.environ.get("DS4CUPY_SEED_SWEEP"):
        tag = f"seed+{sweep_offset}"
        node = node.replace(f"[{tag}]", "").replace(f"-{tag}", "").replace(f"{tag}-", "")
    return node_seed(node, sweep_offset)


@pytest.fixture
def rng(seed) -> np.random.Generator:
    return np.random.default_rng(seed)


@pytest.fixture(scope="module")
def module_seed(request) -> int:
    """The seed of a module-scoped fixture's random data: node_seed of the module."""
    return node_seed(request.node.nodeid)
