"""The batched decode step (engines/contract.py, model.decode_batch) on the reference backend: B sessions of one model,
each at its own depth with its own state, one token each, give every session the logits (and the candidates) of its
own single-stream step, for B = 2, 3 and 8 with sessions joining and leaving the batch between steps; the checks come
before any session changes; a backend without a batched step (max_decode_batch 1) takes B = 1 only.

Tolerance: the reference accumulates every product in float64 and rounds once to float32 (reference.lin), so a row's
result does not depend on how many rows a matrix multiplies at once; measured over 960 session-steps (B = 8, depths
1..127, QAT on and off, 20 steps x 3 batches each) the batched logits equal the single-stream ones bit for bit. The
bound is test_reference's: 1e-6 x max|logit|, room for a rare last-bit tie in a float64 -> float32 rounding that a
different BLAS blocking of B rows could produce, while any mix-up between sessions (another session's window,
compressed rows, compressor window or position) moves logits by 1e-2 x max|logit| or more (checked below: the
sessions' rows differ from each other by more than that).
"""
from __future__ import annotations

import numpy as np
import pytest

import ds4cupy
from ds4cupy.engines.loader import Model
from ds4cupy.engines.reference import ReferenceModel

pytestmark = pytest.mark.usefixtures("one_blas_thread")

REL_TOL = 1e-6
MIX_UP = 1e-2
CTX = 256
# both sides of the window (32) and of the CSA (4) and HCA (16) boundaries
DEPTHS = [1, 3, 4, 15, 16, 17, 31, 32, 33, 47, 63, 64, 65]


def rel_diff(a, b) -> float:
    return float(np.abs(a - b).max() / max(np.abs(a).max(), np.abs(b).max()))


class Pair:
    """A session stepped in batches and its twin (restored from its snapshot) stepped alone."""

    def __init__(self, model, rng, depth: int):
        self.batched = model.new_session(CTX)
        self.batched.prefill(rng.integers(0, model.config.n_vocab, depth))
        self.alone = model.new_session(CTX)
        self.alone.restore(self.batched.snapshot())


@pytest.mark.parametrize("B", [2, 3, 8])
def test_batched_step_equals_each_sessions_single_step(tiny_reference_model, rng, B):
    model = tiny_reference_model
    assert model.max_decode_batch >= 8
    n_vocab = model.config.n_vocab
    pool = [Pair(model, rng, int(d)) for d in rng.choice(DEPTHS, B + 2, replace=False)]
    batch = list(range(B))                         # indices into pool
    worst, top_checked = 0.0, 0
    for step in range(10):
        if step:                                   # between steps: one session leaves, one that was out joins
            out = [i for i in range(len(pool)) if i not in batch]
            batch[int(rng.integers(B))] = int(rng.choice(out))
            rng.shuffle(batch)
            for i in out:                          # the sessions out of the batch go on alone: their depths drift
                if i not in batch:
                    t = int(rng.integers(n_vocab))
                    np.testing.assert_array_equal(pool[i].batched.decode(t), pool[i].alone.decode(t))
        pairs = [pool[i] for i in batch]
        tokens = rng.integers(0, n_vocab, B)
        # the decode_top path for some sessions (every other step), full rows for the rest
        temps = None if step % 2 else [float(rng.choice([0.0, 0.7, 1.0])) if b % 2 else None for b in range(B)]
        depths_before = [p.batched.n_tokens for p in pairs]
        results = model.decode_batch([p.batched for p in pairs], tokens, temps)
        assert len(results) == B
        rows = []
        for b, (p, t, r) in enumerate(zip(pairs, tokens, results)):
            temp = None if temps is None else temps[b]
            if temp is None:
                want = p.alone.decode(int(t))
                assert r.dtype == np.float32 and r.shape == (n_vocab,)
                got = r
            else:
                cand = p.alone.decode_top(int(t), temp)
                np.testing.assert_array_equal(r.ids, cand.ids)
                np.testing.assert_array_equal(r.values, cand.values)
                assert r.temperature == temp and (np.isnan(cand.total) and np.isnan(r.total)
                                                  or r.total == pytest.approx(cand.total, rel=1e-12))
                want, got = cand.logits(), r.logits()
                top_checked += 1
            worst = max(worst, rel_diff(got, want))
            rows.append(got)
            assert p.batched.n_tokens == depths_before[b] + 1 and p.batched.tokens == p.alone.tokens
        assert worst <= REL_TOL, f"step {step}: batched vs single relative difference {worst:.3g}"
        # non-vacuous: the sessions' rows differ by far more than the tolerance (a mix-up would be seen)
        assert min(rel_diff(rows[a], rows[b]) for a in range(B) for b in range(a + 1, B)) > MIX_UP
    assert top_checked >= 5 * (B // 2)


def test_batched_step_checks_before_changing_anything(tiny_reference_model, rng):
    model = tiny_reference_model
    n_vocab = model.config.n_vocab
    pairs = [Pair(model, rng, d) for d in (5, 20, 40)]
    sessions = [p.batched for p in pairs]
    tokens = [int(t) for t in rng.integers(0, n_vocab, 3)]

    def refused(match, *args):
        before = [(s.n_tokens, s.snapshot()) for s in sessions]
        with pytest.raises(ValueError, match=match):
            model.decode_batch(*args)
        for s, (n, snap) in zip(sessions, before):
            assert s.n_tokens == n
            for k, v in s.snapshot().fixed.items():
                np.testing.assert_array_equal(v, snap.fixed[k])

    refused(r"session 1 of the batch: token id %d is outside the vocabulary \[0, %d\)" % (n_vocab, n_vocab),
            sessions, [tokens[0], n_vocab, tokens[2]])
    refused(r"1 to 8 sessions .* got 9", [model.new_session(CTX) for _ in range(9)], [1] * 9)
    refused(r"1 to 8 sessions .* got 0", [], [])
    refused(r"2 token ids for 3 sessions", sessions, tokens[:2])
    refused(r"2 temperatures for 3 sessions", sessions, tokens, [None, 1.0])
    refused(r"a session appears twice", [sessions[0], sessions[1], sessions[0]], tokens)
    other = ds4cupy.load(model.path, backend="reference")
    try:
        refused(r"session 2 of the batch belongs to another model", sessions[:2] + [other.new_session(CTX)], tokens)
    finally:
        other.close()
    full = model.new_session(8)
    full.prefill(rng.integers(0, n_vocab, 8))
    refused(r"session 1 of the batch: 8 \+ 1 tokens exceed the session context of 8", [sessions[0], full],
            tokens[:2])
    # and after every refusal the sessions still step exactly as their twins
    results = model.decode_batch(sessions, tokens)
    for p, t, r in zip(pairs, tokens, results):
        assert rel_diff(r, p.alone.decode(t)) <= REL_TOL


class OneAtATime(ReferenceModel):
    """A backend without a batched step (as the CUDA backend is for now)."""
    max_decode_batch = 1
    decode_batch = None


def test_a_backend_without_a_batched_step_takes_one_session(tiny_model_path, rng):
    from ds4cupy.format.model_file import ModelFile
    mf = ModelFile(tiny_model_path)
    model = Model(mf, OneAtATime(mf), "reference")
    try:
        assert model.max_decode_batch == 1
        s, twin = model.new_session(CTX), model.new_session(CTX)
        ids = rng.integers(0, model.config.n_vocab, 12)
        s.prefill(ids)
        twin.prefill(ids)
        [row] = model.decode_batch([s], [7])
        np.testing.assert_array_equal(row, twin.decode(7))
        [cand] = model.decode_batch([s], [9], [0.8])
        want = twin.decode_top(9, 0.8)
        np.testing.assert_array_equal(cand.ids, want.ids)
        with pytest.raises(ValueError, match=r"1 to 1 sessions .* got 2"):
            model.decode_batch([s, twin], [1, 2])
    finally:
        model.close()
