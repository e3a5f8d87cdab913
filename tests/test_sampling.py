"""Sampler: greedy, temperature, top_k, top_p, min_p (ds4's rule), seeded reproducibility, empirical frequencies."""
from __future__ import annotations

import numpy as np
import pytest

from ds4cupy.text.sampling import Sampler, SamplingParams


def _logits_from_probs(probs, vocab=None, rng=None):
    probs = np.asarray(probs, dtype=np.float64)
    logits = np.log(probs).astype(np.float32)
    if vocab is None:
        return logits
    out = np.full(vocab, -np.inf, dtype=np.float32)
    ids = rng.choice(vocab, size=len(probs), replace=False)
    out[ids] = logits
    return out, ids


def test_defaults_are_ds4s():
    p = SamplingParams()
    assert (p.temperature, p.top_p, p.top_k, p.min_p, p.seed) == (1.0, 1.0, 0, 0.05, None)


def test_greedy_is_argmax_whatever_the_seed(rng):
    logits = rng.standard_normal(5000).astype(np.float32)
    for seed in (None, 1, 2):
        for t in (0.0, -1.0):
            assert Sampler(SamplingParams(temperature=t, seed=seed)).sample(logits) == int(np.argmax(logits))


def test_top_p_keeps_the_smallest_head_reaching_the_mass(rng):
    probs = [0.5, 0.3, 0.12, 0.05, 0.03]
    logits, ids = _logits_from_probs(probs, vocab=1000, rng=rng)
    s = Sampler(SamplingParams(top_p=0.7, min_p=0.0))
    cand, p = s.distribution(logits)
    assert list(cand) == list(ids[:2])
    np.testing.assert_allclose(p, [0.5 / 0.8, 0.3 / 0.8], rtol=1e-5)
    cand, p = Sampler(SamplingParams(top_p=0.85, min_p=0.0)).distribution(logits)
    assert list(cand) == list(ids[:3])
    np.testing.assert_allclose(p, np.array(probs[:3]) / 0.92, rtol=1e-5)
    # the first candidate is always kept
    cand, p = Sampler(SamplingParams(top_p=0.01, min_p=0.0)).distribution(logits)
    assert list(cand) == [ids[0]] and p[0] == pytest.approx(1.0)


def test_min_p_drops_tokens_below_a_fraction_of_the_best(rng):
    probs = [0.4, 0.3, 0.2, 0.07, 0.03]
    logits, ids = _logits_from_probs(probs, vocab=777, rng=rng)
    cand, p = Sampler(SamplingParams(min_p=0.1)).distribution(logits)     # threshold 0.04
    assert list(cand) == list(ids[:4])
    np.testing.assert_allclose(p, np.array(probs[:4]) / 0.97, rtol=1e-5)
    cand, _ = Sampler(SamplingParams(min_p=0.6)).distribution(logits)     # threshold 0.24
    assert list(cand) == list(ids[:2])


def test_min_p_and_top_p_together_and_top_k(rng):
    logits = rng.standard_normal(2000).astype(np.float32) * 3
    order = np.argsort(-logits.astype(np.float64), kind="stable")
    w = np.exp(logits[order].astype(np.float64) - logits[order[0]])
    total = w.sum()
    for top_p, min_p, top_k in [(0.9, 0.05, 0), (0.5, 0.0, 0), (1.0, 0.01, 0), (0.95, 0.0, 40), (1.0, 0.0, 7)]:
        cand, p = Sampler(SamplingParams(top_p=top_p, min_p=min_p, top_k=top_k)).distribution(logits)
        ww, tt = (w[:top_k], w[:top_k].sum()) if top_k else (w, total)
        keep = ww >= min_p
        before = np.concatenate(([0.0], np.cumsum(ww)[:-1])) / tt
        n = max(1, int(np.count_nonzero(keep & (before < top_p))))
        assert list(cand) == list(order[:n]), (top_p, min_p, top_k)
        np.testing.assert_allclose(p, ww[:n] / ww[:n].sum(), rtol=1e-6)
        assert p.sum() == pytest.approx(1.0)
        # top_p mass: the kept head reaches top_p, one fewer would not (unless min_p cut first)
        if top_p < 1 and min_p == 0:
            assert ww[:n].sum() / tt >= top_p - 1e-9 and ww[:n - 1].sum() / tt < top_p


def test_temperature_scales_logits():
    logits = np.array([2.0, 1.0, 0.0, -1.0], dtype=np.float32)
    for t in (0.5, 1.0, 2.0):
        _, p = Sampler(SamplingParams(temperature=t, min_p=0.0)).distribution(logits)
        want = np.exp(logits / t) / np.exp(logits / t).sum()
        np.testing.assert_allclose(p, want, rtol=1e-5)


def test_empirical_frequencies_match_the_distribution(rng):
    logits = (rng.standard_normal(50) * 1.5).astype(np.float32)
    s = Sampler(SamplingParams(temperature=0.8, top_p=0.9, min_p=0.02, seed=int(rng.integers(1 << 31))))
    cand, p = s.distribution(logits)
    n = 20000
    draws = np.array([s.sample(logits) for _ in range(n)])
    assert set(np.unique(draws)) <= set(cand.tolist())
    counts = np.array([(draws == c).sum() for c in cand])
    sigma = np.sqrt(n * p * (1 - p))
    assert np.all(np.abs(counts - n * p) <= 5 * sigma + 1), (counts, n * p)


def test_seed_reproducibility(rng):
    table = rng.standard_normal((10, 300)).astype(np.float32)
    seed = int(rng.integers(1 << 31))
    runs = []
    for _ in range(2):
        s = Sampler(SamplingParams(seed=seed, min_p=0.0))
        runs.append([s.sample(table[i % 10]) for i in range(200)])
    assert runs[0] == runs[1]
    other = Sampler(SamplingParams(seed=seed + 1, min_p=0.0))
    assert [other.sample(table[i % 10]) for i in range(200)] != runs[0]


def test_nan_is_never_sampled_and_all_masked_is_an_error():
    logits = np.array([np.nan, 0.0, np.nan, -1.0], dtype=np.float32)
    cand, _ = Sampler(SamplingParams(min_p=0.0)).distribution(logits)
    assert set(cand.tolist()) == {1, 3}
    with pytest.raises(ValueError, match="-inf or NaN"):
        Sampler().sample(np.full(8, -np.inf, dtype=np.float32))


@pytest.mark.parametrize("kwargs, name", [({"top_p": 0.0}, "top_p=0.0"), ({"top_p": 1.5}, "top_p=1.5"),
                                          ({"min_p": -0.1}, "min_p=-0.1"), ({"top_k": -1}, "top_k=-1"),
                                          ({"temperature": float("nan")}, "temperature=nan"),
                                          ({"seed": -3}, "seed=-3"), ({"top_k": 2.5}, "top_k=2.5")])
def test_bad_params_name_the_value(kwargs, name):
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        SamplingParams(**kwargs)
