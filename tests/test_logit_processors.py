"""Penalties, logit_bias and min_tokens (text.logit_processors), logprobs (text.logprobs) and how the Generator applies
them, on fixed and seeded random logits. Expected values are computed here from the definitions, element by element,
independently of the vectorised code under test."""
from __future__ import annotations

import math

import numpy as np
import pytest

from ds4cupy.text.generate import Generator
from ds4cupy.text.logit_processors import LogitAdjustments, LogitProcessor
from ds4cupy.text.logprobs import MAX_TOP_LOGPROBS, log_softmax, token_logprob
from ds4cupy.text.sampling import Sampler, SamplingParams
from ds4cupy.text.tokenizer import Tokenizer

V = 64


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.demo()


def fixed_logits(seed=0, n=V):
    rng = np.random.default_rng(seed)
    return (2.0 * rng.standard_normal(n)).astype(np.float32)


def test_presence_and_frequency_penalties_follow_openai():
    """l[j] - c[j] * frequency - (c[j] > 0) * presence, c counting output tokens only (not the prompt)."""
    logits = fixed_logits(1)
    output = [3, 3, 3, 7, 9, 9]
    adjust = LogitAdjustments(presence_penalty=0.7, frequency_penalty=-0.4)
    proc = LogitProcessor(adjust, prompt_ids=[1, 2, 3, 50])
    for t in output:
        proc.record(t)
    got = proc.apply(logits)
    for j in range(V):
        c = output.count(j)
        want = logits[j] - c * -0.4 - (1.0 if c else 0.0) * 0.7
        assert got[j] == pytest.approx(want, abs=1e-6), j
    assert proc.apply(logits)[50] == logits[50]          # prompt-only token: untouched


def test_repetition_penalty_follows_vllm():
    """Tokens of the prompt or the output: l / r where l > 0, l * r otherwise; the rest untouched."""
    logits = fixed_logits(2)
    r = 1.3
    proc = LogitProcessor(LogitAdjustments(repetition_penalty=r), prompt_ids=[4, 5, 6])
    proc.record(6)
    proc.record(20)
    got = proc.apply(logits)
    seen = {4, 5, 6, 20}
    assert any(logits[j] > 0 for j in seen) and any(logits[j] <= 0 for j in seen)
    for j in range(V):
        want = (logits[j] / r if logits[j] > 0 else logits[j] * r) if j in seen else logits[j]
        assert got[j] == pytest.approx(want, rel=1e-6), j


def test_logit_bias_shifts_the_distribution_as_defined():
    logits = fixed_logits(3)
    bias = {5: 2.5, 9: -100.0, 11: 100.0}
    got = LogitProcessor(LogitAdjustments(logit_bias=bias)).apply(logits)
    for j in range(V):
        assert got[j] == pytest.approx(logits[j] + bias.get(j, 0.0), abs=1e-5)
    # the sampled distribution: softmax of the shifted logits (greedy picks the +100 token)
    ids, probs = Sampler(SamplingParams(min_p=0.0)).distribution(got)
    p = np.exp(got.astype(np.float64) - got.max())
    p /= p.sum()
    np.testing.assert_allclose(probs, p[ids], rtol=1e-6)
    assert Sampler(SamplingParams(temperature=0)).sample(got) == 11
    # -100 makes a token practically impossible even when it was the best one
    best = int(np.argmax(logits))
    ids, probs = Sampler(SamplingParams(min_p=0.0)).distribution(
        LogitProcessor(LogitAdjustments(logit_bias={best: -100.0})).apply(logits))
    assert probs[list(ids).index(best)] < 1e-40


def test_min_tokens_blocks_end_ids_until_reached():
    logits = fixed_logits(4)
    proc = LogitProcessor(LogitAdjustments(min_tokens=2), end_ids=[1, 7])
    for step in range(3):
        got = proc.apply(logits)
        blocked = step < 2
        assert (np.isneginf(got[[1, 7]]).all()) == blocked
        assert np.array_equal(np.delete(got, [1, 7]), np.delete(logits, [1, 7]))
        proc.record(30)


def test_adjustment_validation():
    for kwargs in ({"presence_penalty": 2.5}, {"frequency_penalty": float("nan")}, {"repetition_penalty": 0.0},
                   {"logit_bias": {3: 101.0}}, {"logit_bias": {-1: 1.0}}, {"min_tokens": -1}):
        with pytest.raises(ValueError):
            LogitAdjustments(**kwargs)
    assert not LogitAdjustments().active and LogitAdjustments(min_tokens=1).active
    with pytest.raises(ValueError, match="outside the vocabulary"):
        LogitProcessor(LogitAdjustments(logit_bias={V: 1.0})).apply(fixed_logits())


# ------------------------------------------------------------------------------------------------------- logprobs

def test_token_logprob_is_log_softmax_with_sorted_top():
    logits = fixed_logits(5, 1000)
    logits[[10, 20]] = logits.max() + 1.0         # a tie at the top: the lower id first
    lp = token_logprob(logits, 333, top_n=5)
    x = logits.astype(np.float64)
    lse = math.log(sum(math.exp(v - x.max()) for v in x)) + x.max()
    assert lp.logprob == pytest.approx(x[333] - lse, abs=1e-9)
    values = [v for _, v in lp.top]
    assert values == sorted(values, reverse=True) and [t for t, _ in lp.top[:2]] == [10, 20]
    order = np.argsort(-x, kind="stable")[:5]
    assert [t for t, _ in lp.top] == [int(i) for i in order]
    for t, v in lp.top:
        assert v == pytest.approx(x[t] - lse, abs=1e-9)
    masked = logits.copy()
    masked[::2] = -np.inf
    assert all(t % 2 for t, _ in token_logprob(masked, 1, MAX_TOP_LOGPROBS).top)   # -inf never listed
    assert np.isneginf(log_softmax(masked)[0])
    with pytest.raises(ValueError):
        token_logprob(logits, 0, MAX_TOP_LOGPROBS + 1)


class RandomSession:
    def __init__(self, n_vocab, seed, eos_first=None):
        self.rng = np.random.default_rng(seed)
        self.n_vocab, self.tokens, self.eos_first = n_vocab, [], eos_first

    @property
    def n_tokens(self):
        return len(self.tokens)

    def _logits(self):
        x = (2.0 * self.rng.standard_normal(self.n_vocab)).astype(np.float32)
        if self.eos_first is not None:
            x[self.eos_first] = x.max() + 5.0
        return x

    def prefill(self, ids):
        self.tokens += list(ids)
        return self._logits()

    def decode(self, token_id):
        self.tokens.append(int(token_id))
        return self._logits()


def run_recording(tok, gen, session):
    """Generate, recording the logits the sampler was given at each step."""
    seen = []
    sample = gen.sampler.sample

    def spy(logits):
        seen.append(np.array(logits, dtype=np.float32))
        return sample(logits)

    gen.sampler.sample = spy
    deltas = list(gen.stream(session, session.prefill([5, 6, 7])))
    return deltas, seen


def test_generator_logprobs_come_from_the_logits_the_sampler_saw(tok):
    """Biased and penalised logits: each delta's logprob is log_softmax of exactly what the sampler got, the
    sampled token is the one reported, and the top list is sorted."""
    adjust = LogitAdjustments(presence_penalty=1.0, logit_bias={40: 3.0})
    gen = Generator(tok, SamplingParams(seed=11), max_tokens=12, adjust=adjust, logprobs=4, parse_tools=False)
    deltas, seen = run_recording(tok, gen, RandomSession(tok.n_vocab, 3))
    assert len(deltas) == len(seen) == len(gen.completion_tokens)
    for d, logits in zip(deltas, seen):
        want = log_softmax(logits)
        assert d.logprob.token_id == d.token_id
        assert d.logprob.logprob == pytest.approx(want[d.token_id], abs=1e-9)
        top_ids = [t for t, _ in d.logprob.top]
        assert len(top_ids) == 4 and [v for _, v in d.logprob.top] == sorted(want[top_ids], reverse=True)
        assert set(top_ids) == set(np.argsort(-want)[:4].tolist())


def test_greedy_token_heads_its_top_list_and_temperature_does_not_change_logprobs(tok):
    greedy = Generator(tok, SamplingParams(temperature=0), max_tokens=6, logprobs=3, parse_tools=False)
    for d in run_recording(tok, greedy, RandomSession(tok.n_vocab, 9))[0]:
        assert d.logprob.top[0][0] == d.token_id and d.logprob.top[0][1] == d.logprob.logprob
    firsts = []
    for temperature in (0.3, 1.7):
        gen = Generator(tok, SamplingParams(temperature=temperature, seed=1), max_tokens=1, logprobs=5,
                        parse_tools=False)
        firsts.append(run_recording(tok, gen, RandomSession(tok.n_vocab, 21))[0][0].logprob.top)
    assert firsts[0] == firsts[1]


def test_ignore_eos_and_min_tokens(tok):
    eos = tok.eos_id
    stops = Generator(tok, SamplingParams(temperature=0), max_tokens=8, parse_tools=False)
    assert [d.token_id for d in run_recording(tok, stops, RandomSession(tok.n_vocab, 1, eos_first=eos))[0]] == [eos]
    goes_on = Generator(tok, SamplingParams(temperature=0), max_tokens=8, parse_tools=False, ignore_eos=True)
    deltas = run_recording(tok, goes_on, RandomSession(tok.n_vocab, 1, eos_first=eos))[0]
    assert [d.token_id for d in deltas] == [eos] * 8 and deltas[-1].finish_reason == "length"
    assert goes_on.text == ""                      # EOS releases no text
    at_least = Generator(tok, SamplingParams(temperature=0), max_tokens=8, parse_tools=False,
                         adjust=LogitAdjustments(min_tokens=3))
    ids = [d.token_id for d in run_recording(tok, at_least, RandomSession(tok.n_vocab, 1, eos_first=eos))[0]]
    assert len(ids) == 4 and eos not in ids[:3] and ids[3] == eos
