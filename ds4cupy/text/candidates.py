"""TopCandidates: the sampler's candidate set of one decode step, the few KB a session hands the host instead of the
whole logits row; `top_candidates` computes it with NumPy (the reference session, and the oracle of the GPU kernels
in ds4cupy/kernels/sample.cu).

What it holds, for a logits row l of n_vocab float32 (NaN read as -inf):
- ids, values: the N_CANDIDATES largest logits (all of them when n_vocab is smaller), sorted by value descending,
  ties by id ascending (`top_order`): deterministic, and the same set Sampler's top_k takes; the values are the row's
  float32 logits exactly;
- total: sum over the WHOLE vocabulary of exp((l_i - max l) / temperature), in float64 (what top_p divides by when
  top_k is 0); only for temperature > 0, else NaN;
- fetch_logits: a callable giving the full row of the same step, for the cases the candidates cannot decide
  (Sampler.needs_logits); a session's callable is valid until its next step.

Sampler.sample_top(candidates) draws the token Sampler.sample(logits) draws for the same seed and parameters.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

N_CANDIDATES = 1024      # == sampling.TOP_K_MAX: every top_k the sampler allows is inside the set


def clean_logits(logits) -> np.ndarray:
    """The row as float32 [n] with NaN replaced by -inf (how the sampler reads logits)."""
    x = np.asarray(logits, dtype=np.float32).reshape(-1)
    return np.where(np.isnan(x), np.float32(-np.inf), x)


def top_order(x: np.ndarray, k: int) -> np.ndarray:
    """Ids of the k largest values of x (float, no NaN), sorted by value descending, ties by id ascending (int64 [k]).
    Ties at the k-th value are broken by id too, so the set is deterministic."""
    n = x.size
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be in [1, {n}]")
    if k < n:
        kth = x[np.argpartition(-x, k - 1)[k - 1]]        # the k-th largest value
        above = np.flatnonzero(x > kth)
        tied = np.flatnonzero(x == kth)[: k - above.size]   # lowest ids first
        ids = np.concatenate((above, tied))
    else:
        ids = np.arange(n)
    return ids[np.lexsort((ids, -x[ids]))].astype(np.int64)


@dataclass(frozen=True)
class TopCandidates:
    """The candidate set of one step (see the module docstring)."""
    ids: np.ndarray                      # int64 [min(N_CANDIDATES, n_vocab)]
    values: np.ndarray                   # float32, same length: the logits of `ids` (NaN as -inf)
    n_vocab: int
    temperature: float                   # the temperature `total` was computed for (<= 0: none)
    total: float                         # float64 sum over the vocabulary (see the module docstring); NaN if none
    fetch_logits: Callable[[], np.ndarray] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        n = self.ids.shape[0] if self.ids.ndim == 1 else -1
        if not 1 <= n <= self.n_vocab or self.values.shape != (n,):
            raise ValueError(f"candidates of a {self.n_vocab}-token vocabulary: ids {self.ids.shape} and values "
                             f"{self.values.shape} must be one row of the same length in [1, {self.n_vocab}]")

    @property
    def complete(self) -> bool:
        """Every token of the vocabulary is a candidate."""
        return self.ids.size == self.n_vocab

    def logits(self) -> np.ndarray:
        """The full float32 logits row of the same step (downloaded on demand)."""
        if self.fetch_logits is None:
            raise RuntimeError("these candidates carry no way to fetch the full logits row")
        return self.fetch_logits()


def top_candidates(logits, temperature: float, n: int = N_CANDIDATES,
                   fetch_logits: Callable[[], np.ndarray] | None = None) -> TopCandidates:
    """The TopCandidates of a logits row, with NumPy (n is N_CANDIDATES except in tests of the arithmetic)."""
    x = clean_logits(logits)
    if x.size == 0:
        raise ValueError("cannot take candidates from empty logits")
    ids = top_order(x, min(n, x.size))
    values = x[ids]
    t = float(temperature)
    total = float("nan")
    if t > 0 and np.isfinite(values[0]):
        total = float(np.exp((x.astype(np.float64) - float(values[0])) / t).sum())   # as Sampler.distribution
    return TopCandidates(ids, values, int(x.size), t, total, fetch_logits)
