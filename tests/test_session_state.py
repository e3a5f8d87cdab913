"""Session states on the reference backend: delta snapshots hold only the rows their tokens added, chains of them
restore the exact session, bad chains are refused, the prefilled-token counter, the model identity."""
from __future__ import annotations

import numpy as np
import pytest

import ds4cupy
from ds4cupy.engines.state import SessionState, chain_of, prefix_key


@pytest.fixture(scope="module")
def model(tiny_model_path):
    m = ds4cupy.load(tiny_model_path, backend="reference")
    yield m
    m.close()


def ids(model, n, seed):
    return [int(t) for t in np.random.default_rng(seed).integers(0, model.config.n_vocab, n)]


def test_delta_chain_restores_exactly(model):
    """prefill(a); snap; prefill(b); delta; prefill(c) == the same prefills after restoring [snap, delta] into a
    fresh session, bit for bit (the reference is chunk-independent by construction, see reference.py)."""
    c = model.config
    a, b, tail = ids(model, 37, 1), ids(model, 70, 2), ids(model, 21, 3)
    s = model.new_session(512)
    s.prefill(a)
    full = s.snapshot()
    s.prefill(b)
    delta = s.snapshot(since=len(a))
    want = s.prefill(tail)
    want_next = s.decode(7)

    assert full.since == 0 and full.tokens == a and delta.since == len(a) and delta.tokens == b
    n = len(a) + len(b)
    for il in range(c.n_layer):
        r = c.ratio(il)
        if not r:
            assert f"{il}.comp" not in delta.rows
            continue
        start, rows = delta.rows[f"{il}.comp"]
        assert (start, rows.shape[0]) == (len(a) // r, n // r - len(a) // r)    # only the rows b emitted
        if r == 4:
            start, rows = delta.rows[f"{il}.index"]
            assert (start, rows.shape[0]) == (len(a) // 4, n // 4 - len(a) // 4)

    fresh = model.new_session(512)
    fresh.restore([full, delta])
    assert fresh.tokens == a + b and fresh.n_tokens == n
    np.testing.assert_array_equal(fresh.prefill(tail), want)
    np.testing.assert_array_equal(fresh.decode(7), want_next)
    # the host copy (a no-op on the reference) and a restore of the same chain again give the same state
    again = model.new_session(512)
    again.restore([full.to_host(), delta.to_host()])
    np.testing.assert_array_equal(again.prefill(tail), want)


def test_snapshot_size_follows_tokens_not_ctx(model):
    """A snapshot stores the rows of its n_tokens, whatever the session's context: the same bytes at ctx 256 and
    4096, and more tokens mean more bytes."""
    toks = ids(model, 120, 4)
    sizes = []
    for ctx in (256, 4096):
        s = model.new_session(ctx)
        s.prefill(toks)
        sizes.append(s.snapshot().nbytes)
    assert sizes[0] == sizes[1]
    s = model.new_session(4096)
    s.prefill(toks + ids(model, 80, 5))
    assert s.snapshot().nbytes > sizes[0]


def test_bad_chains_are_refused(model):
    s = model.new_session(256)
    s.prefill(ids(model, 40, 6))
    full, mid = s.snapshot(), s.snapshot(since=20)
    s.prefill(ids(model, 10, 7))
    late = s.snapshot(since=40)
    with pytest.raises(ValueError, match="start at token 0"):
        chain_of([mid])
    with pytest.raises(ValueError, match="broken state chain"):
        chain_of([full, mid])                           # mid starts at 20, full ends at 40
    with pytest.raises(ValueError, match="SessionState"):
        chain_of([])
    # rows missing from a chain: the tokens say more rows exist than the pieces hold
    broken = SessionState(40, late.tokens, {}, late.fixed)
    before = list(s.tokens)
    with pytest.raises(ValueError, match="rows"):
        s.restore([full, broken])
    assert s.tokens == before                           # nothing was changed by the refused restore
    with pytest.raises(ValueError, match="since=60"):
        s.snapshot(since=60)


def test_prefilled_token_counter(model):
    s = model.new_session(256)
    assert s.prefilled_tokens == 0
    s.prefill(ids(model, 30, 8))
    s.decode(3)
    s.decode(4)
    s.prefill(ids(model, 5, 9))
    assert s.prefilled_tokens == 35 and s.n_tokens == 37
    with pytest.raises(ValueError):
        s.prefill([])
    assert s.prefilled_tokens == 35                     # refused calls count nothing


def test_model_identity(tiny_model_path, tiny_q4_model_path):
    """Same file: same identity (stable across loads); another file, the other QAT setting: another identity."""
    a = ds4cupy.load(tiny_model_path, backend="reference")
    again = ds4cupy.load(tiny_model_path, backend="reference")
    no_qat = ds4cupy.load(tiny_model_path, backend="reference", qat=False)
    other = ds4cupy.load(tiny_q4_model_path, backend="reference")
    try:
        assert a.state_identity == again.state_identity
        assert len({a.state_identity, no_qat.state_identity, other.state_identity}) == 3
        assert prefix_key(a.state_identity, [1, 2]) != prefix_key(a.state_identity, [1, 2, 3])
        assert prefix_key(a.state_identity, [1, 2]) != prefix_key(other.state_identity, [1, 2])
    finally:
        for m in (a, again, no_qat, other):
            m.close()


def test_identity_sees_weights_beyond_the_header(tmp_path):
    """Two models with the same config and shapes but other random weights (another seed) differ in identity."""
    from ds4cupy.format.config import ModelConfig
    from ds4cupy.tools.make_model import tokenizer_fields, write_random_model
    n_vocab, _ = tokenizer_fields(None)
    paths = [write_random_model(tmp_path / f"m{seed}.gguf", ModelConfig.tiny(n_vocab), experts="q2", seed=seed)
             for seed in (11, 12)]
    models = [ds4cupy.load(p, backend="reference") for p in paths]
    try:
        assert models[0].state_identity != models[1].state_identity
    finally:
        for m in models:
            m.close()
