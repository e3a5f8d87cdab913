"""Sampling: SamplingParams and Sampler (greedy, temperature, top_k, top_p, min_p, seeded RNG).

The rule is ds4's (`sample_top_p_min_p`): temperature <= 0 is argmax; otherwise the candidates are the top_k
logits (all of them when top_k is 0), p_i = exp((l_i - l_max) / T), and walking the candidates from the most
likely, the first is always kept and the walk stops at the first candidate with p_i < min_p * p_max, or once the
kept candidates' share of the total mass reaches top_p. One is drawn from what is kept, renormalised.
Defaults as ds4 and DeepSeek's model card: temperature 1, top_p 1, min_p 0.05, no top_k.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

TOP_K_MAX = 1024   # ds4 caps top_k here


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen. temperature <= 0 means greedy; seed None means a fresh random seed."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.05
    seed: int | None = None

    def __post_init__(self):
        def bad(name, value, rule):
            raise ValueError(f"sampling {name}={value!r}: {rule}")
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature):
            bad("temperature", self.temperature, "must be a finite number (<= 0 means greedy)")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            bad("top_p", self.top_p, "must be in (0, 1]")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            bad("top_k", self.top_k, "must be an integer >= 0 (0 = no limit)")
        if not isinstance(self.min_p, (int, float)) or not 0.0 <= self.min_p <= 1.0:
            bad("min_p", self.min_p, "must be in [0, 1]")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or self.seed < 0):
            bad("seed", self.seed, "must be None or an integer >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


class Sampler:
    """Draws token ids from logits with a private RNG; the same seed and logits give the same ids."""

    def __init__(self, params: SamplingParams | None = None):
        self.params = params or SamplingParams()
        self.rng = np.random.default_rng(self.params.seed)

    def distribution(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(candidate ids, their probabilities) after temperature, top_k, min_p and top_p; ids most likely first.
        Greedy returns the argmax with probability 1."""
        x = np.asarray(logits, dtype=np.float32).reshape(-1)
        if x.size == 0:
            raise ValueError("cannot sample from empty logits")
        x = np.where(np.isnan(x), -np.inf, x)
        p = self.params
        best = int(np.argmax(x))
        if not np.isfinite(x[best]):
            raise ValueError("every logit is -inf or NaN; nothing can be sampled")
        if p.greedy:
            return np.array([best], dtype=np.int64), np.array([1.0])
        if p.top_k > 0:
            k = min(p.top_k, TOP_K_MAX, x.size)
            cand = np.argpartition(-x, k - 1)[:k] if k < x.size else np.arange(x.size)
        else:
            cand = np.arange(x.size)
        w = np.exp((x[cand].astype(np.float64) - float(x[best])) / p.temperature)   # max weight is 1
        total = float(w.sum())
        # min_p keeps a head of the sorted order, so filter first and sort only what is left
        keep = w >= p.min_p if p.min_p > 0 else w > 0
        cand, w = cand[keep], w[keep]
        order = np.lexsort((cand, -w))              # by weight descending, ties by id: deterministic
        cand, w = cand[order], w[order]
        if p.top_p < 1.0:
            before = np.concatenate(([0.0], np.cumsum(w)[:-1])) / total
            n = max(1, int(np.count_nonzero(before < p.top_p)))
            cand, w = cand[:n], w[:n]
        return cand.astype(np.int64), w / w.sum()

    def sample(self, logits: np.ndarray) -> int:
        """One token id."""
        ids, probs = self.distribution(logits)
        if ids.size == 1:
            return int(ids[0])
        u = self.rng.random()
        k = int(np.searchsorted(np.cumsum(probs), u, side="right"))
        return int(ids[min(k, ids.size - 1)])
