"""Self-consistency of the reference session: prefill(L+1) == prefill(L) + decode(1) across window and compress
boundaries (QAT on and off), chunked == whole prefill, snapshot/restore, and its input checks.

Tolerance: the reference accumulates every product in float64 and rounds once to float32, so the same row gives
the same bits whatever the batch shape; the measured difference is exactly 0. 1e-6 x max|logit| allows a rare last-bit
tie in a float64 -> float32 rounding, while any state bug (a missing compressed row, a wrong window position, a lost
partial compressor window) moves logits by 1e-2 or more.
"""
from __future__ import annotations

import numpy as np
import pytest

import ds4cupy

REL_TOL = 1e-6


def _close(a, b):
    scale = max(np.abs(a).max(), np.abs(b).max())
    return np.abs(a - b).max() <= REL_TOL * scale, np.abs(a - b).max() / scale


@pytest.mark.parametrize("qat", [True, False])
def test_prefill_plus_decode_equals_longer_prefill(tiny_model_path, qat):
    model = ds4cupy.load(tiny_model_path, backend="reference", qat=qat)
    cfg = model.config
    assert cfg.sliding_window == 32 and 4 in cfg.compress_ratios and 16 in cfg.compress_ratios
    n = 136
    ids = np.random.default_rng(7 + qat).integers(0, cfg.n_vocab, n + 1)
    full = model.new_session(512).prefill(ids, all_logits=True)
    # both sides of the window (32), of CSA (4) and HCA (16) boundaries, and of the second window wrap
    for L in (3, 4, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, n):
        s = model.new_session(512)
        s.prefill(ids[:L])
        ok, rel = _close(s.decode(int(ids[L])), full[L])
        assert ok, f"L={L}: relative difference {rel:.3g}"
        assert s.n_tokens == L + 1 and s.tokens == [int(t) for t in ids[: L + 1]]


def test_qat_changes_the_logits(tiny_model_path):
    """QAT on and off are different computations (FP8 KV, FP4 indexer): the switch is live."""
    ids = np.random.default_rng(3).integers(0, 500, 80)
    on = ds4cupy.load(tiny_model_path, backend="reference", qat=True).new_session(128).prefill(ids)
    off = ds4cupy.load(tiny_model_path, backend="reference", qat=False).new_session(128).prefill(ids)
    assert np.abs(on - off).max() > 1e-4 * np.abs(off).max()


def test_chunked_prefill_equals_whole_prefill(tiny_model_path):
    model = ds4cupy.load(tiny_model_path, backend="reference")
    ids = np.random.default_rng(11).integers(0, model.config.n_vocab, 150)
    whole = model.new_session(256).prefill(ids, all_logits=True)
    model._impl.chunk = 7     # chunks that straddle every window and compress boundary
    chunked = model.new_session(256).prefill(ids, all_logits=True)
    ok, rel = _close(chunked, whole)
    assert ok, rel
    # and several prefill calls continue one sequence
    s = model.new_session(256)
    s.prefill(ids[:50])
    s.prefill(ids[50:97])
    ok, rel = _close(s.prefill(ids[97:]), whole[-1])
    assert ok, rel


def test_snapshot_restore_round_trip(tiny_model_path):
    model = ds4cupy.load(tiny_model_path, backend="reference")
    rng = np.random.default_rng(5)
    prompt = rng.integers(0, model.config.n_vocab, 70)
    s = model.new_session(256)
    s.prefill(prompt)
    snap = s.snapshot()
    for t in rng.integers(0, model.config.n_vocab, 9):
        s.decode(int(t))
    assert s.n_tokens == 79
    s.restore(snap)
    assert s.n_tokens == 70 and s.tokens == [int(t) for t in prompt]
    other = s.decode(12)
    s.restore(snap)
    again = s.decode(12)
    np.testing.assert_array_equal(other, again)
    s.reset()
    assert s.n_tokens == 0
    s.restore(snap)            # a snapshot outlives reset and can be restored many times
    np.testing.assert_array_equal(s.decode(12), again)


def test_session_rejects_bad_input(tiny_model_path):
    model = ds4cupy.load(tiny_model_path, backend="reference")
    s = model.new_session(16)
    with pytest.raises(ValueError, match=str(model.config.n_vocab)):
        s.prefill([1, model.config.n_vocab])
    with pytest.raises(ValueError, match="-3"):
        s.prefill([-3])
    with pytest.raises(ValueError, match="exceed the session context of 16"):
        s.prefill(list(range(17)))
    with pytest.raises(ValueError, match="at least one token"):
        s.prefill([])
    assert s.n_tokens == 0      # nothing was consumed by the refused calls
    with pytest.raises(ValueError, match="backend"):
        ds4cupy.load(tiny_model_path, backend="tpu")
