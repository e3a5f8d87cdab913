"""Sampling: SamplingParams and Sampler (greedy, temperature, top_k, top_p, min_p, seeded RNG).

The rule is ds4's (`sample_top_p_min_p`): temperature <= 0 is argmax; otherwise the candidates are the top_k
logits (all of them when top_k is 0), p_i = exp((l_i - l_max) / T), and walking the candidates from the most
likely, the first is always kept and the walk stops at the first candidate with p_i < min_p * p_max, or once the
kept candidates' share of the total mass reaches top_p. One is drawn from what is kept, renormalised. top_k's candidates are the k largest logits, ties at the k-th broken by
the lower id (deterministic). Candidates are ordered by weight descending, then id.

The decode fast path: `sample_top(TopCandidates)` (text.candidates: the step's 1,024 largest logits, sorted, plus the
vocabulary's total mass at the request's temperature) draws the same token as `sample(logits)` of that step. It asks
for the full row only where the set cannot decide: top_k 0 when a token outside the set could pass min_p (always for
min_p 0, unless the set's last weight is 0 or the set is the whole vocabulary).
Defaults as ds4 and DeepSeek's model card: temperature 1, top_p 1, min_p 0.05, no top_k.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .candidates import N_CANDIDATES, TopCandidates, clean_logits, top_order

TOP_K_MAX = 1024   # ds4 caps top_k here
assert TOP_K_MAX <= N_CANDIDATES, "a candidate set must hold every top_k the sampler allows"
_ALL_INF = "every logit is -inf or NaN; nothing can be sampled"


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
        x = clean_logits(logits)
        if x.size == 0:
            raise ValueError("cannot sample from empty logits")
        p = self.params
        best = int(np.argmax(x))
        if not np.isfinite(x[best]):
            raise ValueError(_ALL_INF)
        if p.greedy:
            return np.array([best], dtype=np.int64), np.array([1.0])
        if p.top_k > 0:
            cand = top_order(x, min(p.top_k, TOP_K_MAX, x.size))   # ties at the k-th logit: lowest ids
        else:
            cand = np.arange(x.size)
        return self._truncate(cand, x[cand], float(x[best]), None)

    def _truncate(self, cand: np.ndarray, values: np.ndarray, best: float, total: float | None):
        """min_p and top_p over the candidates `cand` (logits `values`, the largest logit `best`); total: the mass
        top_p divides by (None: the sum over `cand`, summed in the order given)."""
        p = self.params
        w = np.exp((values.astype(np.float64) - best) / p.temperature)   # max weight is 1
        if total is None:
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

    # ---- from a candidate set (text.candidates): the decode fast path ------------------------------------------------
    def needs_logits(self, top: TopCandidates) -> bool:
        """True when `top` cannot decide this sampler's draw and the full logits row is needed: top_k 0 with a
        vocabulary larger than the set, unless the set's last candidate already fails min_p (min_p 0: has weight 0),
        in which case no token outside the set can pass either (weights fall with the logit)."""
        p = self.params
        if p.greedy or top.complete:
            return False
        if p.top_k > 0:
            return top.ids.size < min(p.top_k, TOP_K_MAX, top.n_vocab)
        best = float(top.values[0])
        if not np.isfinite(best):
            return False                 # nothing can be sampled: distribution_top raises as distribution does
        # the weights exactly as _truncate computes them (same expression over the same values)
        last = float(np.exp((top.values.astype(np.float64) - best) / p.temperature)[-1])
        passes = last >= p.min_p if p.min_p > 0 else last > 0
        return bool(passes)

    def distribution_top(self, top: TopCandidates) -> tuple[np.ndarray, np.ndarray]:
        """distribution() of the step's full logits, from its candidate set alone (ValueError when needs_logits)."""
        p = self.params
        best = float(top.values[0])
        if not np.isfinite(best):
            raise ValueError(_ALL_INF)
        if p.greedy:
            return np.array([int(top.ids[0])], dtype=np.int64), np.array([1.0])
        if self.needs_logits(top):
            raise ValueError(f"{top.ids.size} candidates of {top.n_vocab} tokens cannot decide top_k={p.top_k}, "
                             f"min_p={p.min_p}: the full logits are needed")
        ids, values = top.ids.astype(np.int64), top.values.astype(np.float32)
        total = None
        if p.top_k > 0:
            k = min(p.top_k, TOP_K_MAX, top.n_vocab)
            ids, values = ids[:k], values[:k]          # top_order's first k: the set distribution() takes
        elif p.top_p < 1.0:
            if top.temperature != p.temperature:
                raise ValueError(f"the candidates' total mass is for temperature {top.temperature!r}; this sampler's "
                                 f"temperature is {p.temperature!r}")
            total = float(top.total)
        return self._truncate(ids, values, best, total)

    def sample_top(self, top: TopCandidates) -> int:
        """One token id from a step's candidate set: the id sample() draws from that step's full logits for the same
        seed and state. Fetches the full logits (top.logits()) when the set cannot decide (needs_logits)."""
        if self.needs_logits(top):
            return self.sample(top.logits())
        return self._draw(*self.distribution_top(top))

    def sample(self, logits: np.ndarray) -> int:
        """One token id."""
        return self._draw(*self.distribution(logits))

    def _draw(self, ids: np.ndarray, probs: np.ndarray) -> int:
        if ids.size == 1:
            return int(ids[0])
        u = self.rng.random()
        k = int(np.searchsorted(np.cumsum(probs), u, side="right"))
        return int(ids[min(k, ids.size - 1)])
