"""Session states on the reference backend: delta snapshots hold only the rows their tokens added, chains of them
restore the exact session, bad chains are refused, the prefilled-token counter, the model identity."""
from __future__ import annotations

import numpy as np
import pytest

import ds4cupy
from ds4cupy.engines.state import SessionState, chain_of, prefix_key

pytestmark = pytest.mark.usefixtures("one_blas_thread")


@pytest.fixture(scope="module")
def model(tiny_reference_model):
    return tiny_reference_model


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


def test_cuda_session_state_logic_on_host_buffers(monkeypatch):
    """The GPU session's snapshot / restore, run on NumPy stand-ins for its KV buffers (no GPU here): a session
    advanced to 300 tokens, stored as [complete at 130, delta to 300], restored into a fresh session, holds the same
    rows wherever state lives (ring rows of the last positions, compressed / indexer rows of the 300 tokens,
    compressor rings); a snapshot holds no row past its tokens, whatever the context."""
    import contextlib
    import sys
    import types

    from ds4cupy.engines.cuda.session import CudaSession
    from ds4cupy.format.config import ModelConfig
    from ds4cupy.memory.budget import kv_layout

    shim = types.SimpleNamespace(asarray=np.asarray,
                                 cuda=types.SimpleNamespace(Device=lambda device: contextlib.nullcontext()))
    monkeypatch.setitem(sys.modules, "cupy", shim)
    cfg = ModelConfig.tiny(832)
    rng = np.random.default_rng(9)

    def session(ctx):
        s = object.__new__(CudaSession)
        s.model = types.SimpleNamespace(config=cfg, device=0)
        s.ctx, s.tokens, s.d_pos = ctx, [], np.zeros(1, np.int32)
        s.kv = {(b.layer, b.name): np.zeros(b.shape, np.float32) for b in kv_layout(cfg, ctx)}
        return s

    def advance(s, n):
        """What prefill leaves behind, with random values: ring rows of positions, compressed / indexer rows."""
        for p in range(s.n_tokens, n):
            for (il, name), a in s.kv.items():
                if name == "raw":
                    a[p % cfg.sliding_window] = rng.standard_normal(a.shape[1])
                elif name in ("comp", "index") and (p + 1) % s._state_rows(il, name) == 0:
                    a[(p + 1) // s._state_rows(il, name) - 1] = rng.standard_normal(a.shape[1])
                elif name.endswith("_state"):
                    a[p % a.shape[0]] = rng.standard_normal(a.shape[1])
        s.tokens += [int(t) for t in rng.integers(0, 832, n - s.n_tokens)]
        s.d_pos[0] = n

    src = session(1024)
    advance(src, 130)
    full = src.snapshot()
    advance(src, 300)
    delta = src.snapshot(since=130)
    for key, (start, rows) in delta.rows.items():
        r = 4 if key.endswith("index") else cfg.ratio(int(key.split(".")[0]))
        assert (start, rows.shape[0]) == (130 // r, 300 // r - 130 // r)
    dst = session(1024)
    dst.restore([full, delta])
    assert dst.tokens == src.tokens and dst.d_pos[0] == 300
    for (il, name), a in src.kv.items():
        b = dst.kv[(il, name)]
        if name == "raw":
            np.testing.assert_array_equal(b[:cfg.sliding_window], a[:cfg.sliding_window])
        elif name in ("comp", "index"):
            rows = 300 // src._state_rows(il, name)
            np.testing.assert_array_equal(b[:rows], a[:rows])
            assert not b[rows:].any()                 # nothing past the tokens' rows was stored
        else:
            np.testing.assert_array_equal(b, a)
    big = session(8192)
    advance(big, 300)
    assert big.snapshot().nbytes == src.snapshot().nbytes   # rows of the tokens, not of the context
    with pytest.raises(ValueError, match="rows"):
        dst.restore([full, SessionState(130, delta.tokens, {}, delta.fixed)])
