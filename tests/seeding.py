"""Seeds of random test inputs: fixed per test (CRC-32 of its pytest node id), shifted by DS4CUPY_TEST_SEED.

The `seed` / `rng` / `module_seed` fixtures of tests/conftest.py are built on `node_seed`; `current_test_seed()` serves
helpers that are plain functions (it reads the id of the running test from PYTEST_CURRENT_TEST).
"""
from __future__ import annotations

import os
import zlib


def seed_offset() -> int:
    """DS4CUPY_TEST_SEED (default 0): shifts every test's seed, to rerun the suite on other inputs."""
    return int(os.environ.get("DS4CUPY_TEST_SEED", "0"))


def node_seed(nodeid: str, offset: int | None = None) -> int:
    """The seed for the test (or module) with this node id: CRC-32 of the id plus the offset, modulo 2^31."""
    return (zlib.crc32(nodeid.encode()) + (seed_offset() if offset is None else offset)) % 2**31


def current_test_seed() -> int:
    """node_seed of the running test (PYTEST_CURRENT_TEST is 'nodeid (phase)')."""
    current = os.environ.get("PYTEST_CURRENT_TEST")
    if not current:
        raise RuntimeError("current_test_seed() is for code running inside a pytest test")
    return node_seed(current.rsplit(" (", 1)[0])
