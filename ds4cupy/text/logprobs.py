"""Log-probabilities of generated tokens, for the OpenAI `logprobs` / `top_logprobs` fields.

What they are computed from: the logits the Sampler receives, i.e. the model's logits after logit_bias, penalties
and a grammar mask (text.generate applies those first), and before temperature, top_k, top_p and min_p. So they do
not depend on the sampling temperature (as OpenAI's do not), and under a grammar they are the model's distribution
renormalised over the tokens the grammar allows (forbidden tokens have probability 0 and never appear in the top
list). `logprob` = log_softmax(logits)[token] in float64.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

MAX_TOP_LOGPROBS = 20     # OpenAI's limit for chat; vLLM's default cap


@dataclass
class TokenLogprob:
    """The sampled token's log-probability and the `top` most likely tokens [(id, logprob)], most likely first."""
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float64 log-softmax of a 1-D array; -inf entries stay -inf."""
    x = np.asarray(logits, dtype=np.float64).reshape(-1)
    finite = np.isfinite(x)
    if not finite.any():
        raise ValueError("every logit is -inf or NaN; no distribution")
    m = float(x[finite].max())
    lse = m + float(np.log(np.exp(x[finite] - m).sum()))
    return np.where(finite, x - lse, -np.inf)


def token_logprob(logits: np.ndarray, token_id: int, top_n: int = 0) -> TokenLogprob:
    """The log-probability of `token_id` and the `top_n` (0..MAX_TOP_LOGPROBS) most likely ids under `logits`; ties
    in the top list are broken by the lower id."""
    if isinstance(top_n, bool) or not isinstance(top_n, int) or not 0 <= top_n <= MAX_TOP_LOGPROBS:
        raise ValueError(f"top_n={top_n!r}: must be an integer in [0, {MAX_TOP_LOGPROBS}]")
    lp = log_softmax(logits)
    top: list[tuple[int, float]] = []
    if top_n:
        k = min(top_n, int(np.isfinite(lp).sum()))
        kth = -np.partition(-lp, k - 1)[k - 1]
        cand = np.flatnonzero(lp >= kth)                      # the k best and anything tied with the k-th
        order = np.lexsort((cand, -lp[cand]))[:k]
        top = [(int(cand[i]), float(lp[cand[i]])) for i in order]
    return TokenLogprob(int(token_id), float(lp[int(token_id)]), top)
