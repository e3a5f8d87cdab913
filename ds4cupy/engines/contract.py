"""The Session contract both backends keep (docs/ARCHITECTURE.md, "Engine"), and the checks every session makes.

    s = model.new_session(ctx)
    s.prefill(ids, all_logits=False) -> float32 [vocab] (or [len(ids), vocab]); continues from s.n_tokens
    s.decode(token_id) -> float32 [vocab]
    s.decode_top(token_id, temperature) -> text.candidates.TopCandidates   # the same step; the host gets the
        # 1,024 largest logits (sorted) and the vocabulary's float64 mass at `temperature`, not the row;
        # .logits() fetches the row (valid until the session's next step). Sampler.sample_top draws from it.
    s.candidates_on_device (bool)   # decode_top computes the candidates where the logits are (cheaper than decode
        # + a host sampler over the row); the generator and bench take decode_top only then
    s.snapshot(since=0) -> SessionState   # what tokens [since, n_tokens) added (ds4cupy.engines.state)
    s.restore(state_or_chain) ; s.reset()   # a SessionState or [complete, delta, ...]
    s.n_tokens (int) ; s.tokens (list[int], every id the session has consumed)
    s.prefilled_tokens (int: tokens consumed by prefill() since the session was made; decode steps not counted)

Batched decode (a model's sessions, several streams at once):

    model.max_decode_batch (int)   # how many sessions one decode_batch call may advance; 1: the backend steps one
        # session at a time (then the server runs its streams one step each in turn)
    model.decode_batch(sessions, token_ids, temperatures=None) -> list   # one token each for B distinct sessions of
        # this model, each at its own position with its own state; entry b is what sessions[b].decode(token_ids[b])
        # returns (float32 [vocab]), or, where temperatures[b] is not None, what
        # sessions[b].decode_top(token_ids[b], temperatures[b]) returns (TopCandidates). The weights are read once
        # for the B rows; attention, compressors and indexer run per session over its own state. Every check
        # (check_decode_batch) comes before any session changes.

The CLI, server, bench and verify reach a backend only through these names.
"""
from __future__ import annotations

import numpy as np


def check_token_ids(ids, n_vocab: int, n_tokens: int, ctx: int) -> np.ndarray:
    """ids as int64 [n] (n >= 1) after the checks every backend's session makes before consuming anything."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if ids.size == 0:
        raise ValueError("prefill needs at least one token")
    if ids.size and (ids.min() < 0 or ids.max() >= n_vocab):
        bad = int(ids[(ids < 0) | (ids >= n_vocab)][0])
        raise ValueError(f"token id {bad} is outside the vocabulary [0, {n_vocab})")
    if n_tokens + ids.size > ctx:
        raise ValueError(f"{n_tokens} + {ids.size} tokens exceed the session context of {ctx}")
    return ids


def check_decode_batch(model, sessions, token_ids, temperatures, max_batch: int, n_vocab: int) -> np.ndarray:
    """token_ids as int64 [B] after the checks of a batched decode step (model.decode_batch): 1 <= B <= max_batch
    distinct sessions of `model`, one token id each (in the vocabulary, with room in the session's context), and one
    temperature (or None) each when temperatures is given. Raises ValueError naming the bad value."""
    sessions = list(sessions)
    n = len(sessions)
    if not 1 <= n <= max_batch:
        raise ValueError(f"a batched decode step takes 1 to {max_batch} sessions (max_decode_batch), got {n}")
    ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
    if ids.size != n:
        raise ValueError(f"{ids.size} token ids for {n} sessions: a batched decode step takes one id per session")
    if temperatures is not None and len(temperatures) != n:
        raise ValueError(f"{len(temperatures)} temperatures for {n} sessions: give one per session (None: the logits "
                         f"row) or none at all")
    if len({id(s) for s in sessions}) != n:
        raise ValueError("a session appears twice in one batched decode step")
    for b, s in enumerate(sessions):
        if getattr(s, "model", None) is not model:
            raise ValueError(f"session {b} of the batch belongs to another model")
        try:
            check_token_ids(ids[b:b + 1], n_vocab, s.n_tokens, s.ctx)
        except ValueError as e:
            raise ValueError(f"session {b} of the batch: {e}") from None
    return ids
