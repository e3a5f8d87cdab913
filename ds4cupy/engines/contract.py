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
