"""The decode fast path on the CPU: text.candidates (the candidate set, computed with NumPy as the reference session
does), Sampler.sample_top == Sampler.sample on the full logits for the same seed (and when it must fetch the full row),
the Generator's choice of path, and a NumPy emulation of the sort / merge network of kernels/sample.cu."""
from __future__ import annotations

import numpy as np
import pytest

from ds4cupy.engines.cuda.sample_ops import MERGE_RUNS, RUN, launch_plan
from ds4cupy.text.candidates import N_CANDIDATES, TopCandidates, clean_logits, top_candidates, top_order
from ds4cupy.text.sampling import TOP_K_MAX, Sampler, SamplingParams


def _order_by_sort(x):
    """Reference order: every id, value descending then id ascending (a full lexsort)."""
    ids = np.arange(x.size)
    return ids[np.lexsort((ids, -x))]


def _awkward_logits(rng, n, scale=2.0):
    """Float32 logits with many exact ties (rounded to 1/8), a few NaN, -inf, and -0.0 / +0.0 pairs."""
    x = (np.round(rng.standard_normal(n) * scale * 8) / 8).astype(np.float32)
    pick = rng.choice(n, size=min(n, 40), replace=False)
    x[pick[:10]] = np.nan
    x[pick[10:20]] = -np.inf
    x[pick[20:30]] = np.float32(-0.0)
    x[pick[30:]] = np.float32(0.0)
    return x


def test_top_order_is_the_sorted_head_with_ties_by_id(rng):
    for n in (1, 7, 1024, 5000):
        x = clean_logits(_awkward_logits(rng, n))
        full = _order_by_sort(x)
        for k in {1, min(40, n), min(1024, n), n}:
            got = top_order(x, k)
            np.testing.assert_array_equal(got, full[:k])
    with pytest.raises(ValueError, match="k=0"):
        top_order(np.zeros(3, np.float32), 0)


def test_top_candidates_fields(rng):
    for n in (300, 1024, 3001):
        raw = _awkward_logits(rng, n)
        c = top_candidates(raw, 0.8)
        x = clean_logits(raw)
        m = min(N_CANDIDATES, n)
        assert c.ids.shape == (m,) and c.values.dtype == np.float32 and c.complete == (m == n)
        np.testing.assert_array_equal(c.ids, _order_by_sort(x)[:m])
        np.testing.assert_array_equal(c.values, x[c.ids])
        assert c.ids[0] == int(np.argmax(x))                       # argmax: NaN as -inf, ties -> lowest id
        expect = np.exp((x.astype(np.float64) - x.max()) / 0.8).sum()
        assert c.total == expect and c.temperature == 0.8        # the very expression Sampler uses: bitwise
    assert np.isnan(top_candidates(raw, 0.0).total)


# parameter sets of the issue plus the edges of the fallback rule
PARAMS = [
    SamplingParams(temperature=0.0, seed=1),
    SamplingParams(temperature=0.7, top_k=40, seed=2),
    SamplingParams(temperature=1.0, top_p=0.9, min_p=0.05, seed=3),
    SamplingParams(temperature=1.3, min_p=0.01, seed=4),
    SamplingParams(temperature=1.0, top_k=1024, top_p=0.95, min_p=0.0, seed=5),
    SamplingParams(temperature=0.9, top_k=5000, min_p=0.0, seed=6),         # capped at TOP_K_MAX
    SamplingParams(temperature=1.0, top_p=0.8, min_p=0.0, seed=7),          # top_k 0, min_p 0: the full row
]


@pytest.mark.parametrize("params", PARAMS, ids=lambda p: f"T{p.temperature}-k{p.top_k}-p{p.top_p}-m{p.min_p}")
def test_sample_top_equals_sample_on_full_logits(params, rng):
    """Same seed, same step logits: the same ids, draw after draw (the two samplers' RNGs stay in step), whether the
    candidates decide or the full row is fetched; and the fallback happens exactly when a token outside the set could
    pass min_p."""
    V, draws = 6000, 250
    full, top = Sampler(params), Sampler(params)
    fetched = decided = 0
    for d in range(draws):
        scale = (0.3, 1.0, 3.0, 10.0)[d % 4]           # flat to peaked: some steps need the row, some do not
        raw = (rng.standard_normal(V) * scale).astype(np.float32)
        if d % 5 == 0:
            raw = _awkward_logits(rng, V, scale)
        calls = []
        c = top_candidates(raw, params.temperature, fetch_logits=lambda r=raw: calls.append(1) or r)
        needs = top.needs_logits(c)
        a = top.sample_top(c)
        b = full.sample(raw)
        assert a == b, f"draw {d}: candidates give {a}, full logits {b}"
        assert len(calls) == int(needs)
        fetched += needs
        decided += not needs
        # the rule: the set decides iff its last candidate fails the keep test (or nothing needs the tail)
        if not params.greedy and params.top_k == 0:
            x = clean_logits(raw)
            w = np.exp((x.astype(np.float64) - x.max()) / params.temperature)
            outside = np.setdiff1d(np.arange(V), c.ids)
            tail_passes = (w[outside] >= params.min_p).any() if params.min_p > 0 else (w[outside] > 0).any()
            if tail_passes:
                assert needs, f"draw {d}: a token outside the set passes min_p but the set was used"
    if params.greedy or params.top_k > 0:
        assert fetched == 0
    elif params.min_p == 0:
        assert fetched == draws
    else:
        assert fetched > 0 and decided > 0, (fetched, decided)    # both branches exercised


def test_min_p_zero_decides_when_the_tail_weighs_nothing():
    """top_k 0, min_p 0: normally the full row, but when the last candidate's weight underflows to 0 nothing outside
    can be kept, and the set decides (with the vocabulary's total mass for top_p)."""
    V = 3000
    x = np.full(V, -1e4, dtype=np.float32)
    x[:5] = [3.0, 2.0, 1.0, 0.5, 0.0]
    p = SamplingParams(temperature=1.0, top_p=0.9, min_p=0.0, seed=0)
    c = top_candidates(x, 1.0)
    assert not Sampler(p).needs_logits(c)
    x2 = x.copy()
    x2[5:] = -5.0                                       # now the tail has weight > 0
    assert Sampler(p).needs_logits(top_candidates(x2, 1.0))
    s1, s2 = Sampler(p), Sampler(p)
    assert [s1.sample_top(c) for _ in range(50)] == [s2.sample(x) for _ in range(50)]


def test_small_vocab_is_complete_and_never_fetches(rng):
    raw = (rng.standard_normal(700) * 0.2).astype(np.float32)      # flat: min_p keeps everything
    p = SamplingParams(temperature=1.0, top_p=0.97, min_p=0.0, seed=9)
    c = top_candidates(raw, 1.0)                                    # no fetch_logits: a fetch would raise
    assert c.complete
    s1, s2 = Sampler(p), Sampler(p)
    assert [s1.sample_top(c) for _ in range(100)] == [s2.sample(raw) for _ in range(100)]


def test_top_k_ties_at_the_boundary_take_the_lowest_ids():
    x = np.zeros(100, dtype=np.float32)
    x[[50, 60]] = 1.0                                   # 98 tokens tie at 0.0 for the last 3 places of top_k=5
    ids, _ = Sampler(SamplingParams(top_k=5, min_p=0.0)).distribution(x)
    assert sorted(ids.tolist()) == [0, 1, 2, 50, 60]


def test_errors_and_temperature_mismatch(rng):
    dead = np.full(2000, np.nan, dtype=np.float32)
    dead[:10] = -np.inf
    for p in (SamplingParams(temperature=0.0), SamplingParams(top_k=10), SamplingParams(min_p=0.1)):
        with pytest.raises(ValueError, match="every logit is -inf or NaN"):
            Sampler(p).sample_top(top_candidates(dead, p.temperature))
        with pytest.raises(ValueError, match="every logit is -inf or NaN"):
            Sampler(p).sample(dead)
    raw = rng.standard_normal(4000).astype(np.float32) * 8
    with pytest.raises(ValueError, match="temperature 0.5"):
        Sampler(SamplingParams(temperature=1.0, top_p=0.9, min_p=0.05)).sample_top(top_candidates(raw, 0.5))
    with pytest.raises(RuntimeError, match="no way to fetch"):
        Sampler(SamplingParams(min_p=0.0)).sample_top(top_candidates(raw, 1.0))
    with pytest.raises(ValueError, match="same length"):
        TopCandidates(np.arange(3), np.zeros(2, np.float32), 10, 1.0, 1.0)


# ---- the Generator's choice ------------------------------------------------------------------------------------------
class TwoPathSession:
    """A session with decode and decode_top over the same deterministic logits (a function of the last token)."""

    def __init__(self, table, with_top=True, on_device=True):
        self.table, self.tokens, self.ctx = table, [], 10_000
        self.calls = {"decode": 0, "decode_top": 0}
        self.candidates_on_device = on_device
        if not with_top:
            self.decode_top = None

    @property
    def n_tokens(self):
        return len(self.tokens)

    def prefill(self, ids):
        self.tokens += list(ids)
        return self.table[self.tokens[-1]]

    def decode(self, token_id):
        self.calls["decode"] += 1
        self.tokens.append(int(token_id))
        return self.table[token_id]

    def decode_top(self, token_id, temperature):      # noqa: F811 (shadowed by None in the instance when disabled)
        self.calls["decode_top"] += 1
        self.tokens.append(int(token_id))
        row = self.table[token_id]
        return top_candidates(row, temperature, fetch_logits=lambda: row)


class FakeConstraint:
    """Allows every token (the Generator only needs apply / advance)."""

    def apply(self, logits):
        return logits

    def advance(self, token_id):
        pass


def test_generator_uses_the_fast_path_only_when_allowed(rng):
    from ds4cupy.text.generate import Generator
    from ds4cupy.text.logit_processors import LogitAdjustments
    from ds4cupy.text.tokenizer import Tokenizer

    tok = Tokenizer.demo()
    V = tok.n_vocab
    table = (rng.standard_normal((V, V)) * 3).astype(np.float32)
    table[:, tok.eos_id] = -np.inf                     # run to max_tokens
    params = SamplingParams(temperature=1.0, top_p=0.9, min_p=0.02, seed=5)
    prompt = [int(t) for t in rng.integers(0, V, 4)]

    def run(session, **kw):
        g = Generator(tok, params, max_tokens=40, **kw)
        g.generate(session, session.prefill(prompt))
        return g, session

    g, s = run(TwoPathSession(table))
    assert g.fast_path and s.calls == {"decode": 0, "decode_top": 39}
    g_full, s_full = run(TwoPathSession(table, with_top=False))
    assert not g_full.fast_path and s_full.calls["decode"] == 39
    g_host, s_host = run(TwoPathSession(table, on_device=False))   # host-side candidates cost more than the row
    assert not g_host.fast_path and s_host.calls == {"decode": 39, "decode_top": 0}
    assert g.completion_tokens == g_full.completion_tokens         # same seed: the same ids either way
    for kw in ({"logprobs": 0}, {"adjust": LogitAdjustments(presence_penalty=0.5)},
               {"adjust": LogitAdjustments(logit_bias={3: 1.0})}, {"adjust": LogitAdjustments(min_tokens=2)},
               {"constraint": FakeConstraint()}):
        g2, s2 = run(TwoPathSession(table), **kw)
        assert not g2.fast_path and s2.calls == {"decode": 39, "decode_top": 0}, kw
    g3, _ = run(TwoPathSession(table), adjust=LogitAdjustments(repetition_penalty=1.0))   # inactive: fast
    assert g3.fast_path


def test_reference_session_decode_top(tiny_model_path, rng):
    from ds4cupy.engines.reference import ReferenceModel
    from ds4cupy.format.model_file import ModelFile

    model = ReferenceModel(ModelFile(tiny_model_path))
    a, b = model.new_session(64), model.new_session(64)
    ids = rng.integers(0, model.config.n_vocab, 5)
    a.prefill(ids)
    b.prefill(ids)
    c = a.decode_top(int(ids[-1]), 0.7)
    row = b.decode(int(ids[-1]))
    ref = top_candidates(row, 0.7)
    np.testing.assert_array_equal(c.ids, ref.ids)
    np.testing.assert_array_equal(c.values, ref.values)
    assert c.total == ref.total and a.tokens == b.tokens
    np.testing.assert_array_equal(c.logits(), row)


# ---- kernels/sample.cu's network, emulated -----------------------------------------------------------------------------
def _pair(p, j):
    return ((p & ~(j - 1)) << 1) | (p & (j - 1))          # sample_pair


def _cmpx(s, i, j, desc):
    a, c = s[i], s[i + j]
    swap = np.where(desc, a < c, a > c)
    s[i[swap]], s[(i + j)[swap]] = c[swap], a[swap]


def _keys(x):
    """sample_ord / key construction in NumPy (uint64)."""
    b = x.view(np.uint32).copy()
    b[(b & 0x7FFFFFFF) > 0x7F800000] = 0xFF800000
    b[b == 0x80000000] = 0
    o = np.where(b & 0x80000000, ~b, b | 0x80000000).astype(np.uint64)
    return (o << np.uint64(32)) | (np.uint64(0xFFFFFFFF) - np.arange(x.size, dtype=np.uint64))


def _emulate(x):
    """The launches of launch_plan(V) with the kernels' index arithmetic; returns the final 1024 keys."""
    V = x.size
    plan = launch_plan(V)
    keys = np.zeros(plan[0][1] * RUN, np.uint64)
    keys[:V] = _keys(x)
    runs = []
    p = np.arange(RUN // 2)
    for b in range(plan[0][1]):                          # sample_runs: bitonic sort of each 1024
        s = keys[b * RUN:(b + 1) * RUN].copy()
        k = 2
        while k <= RUN:
            j = k >> 1
            while j > 0:
                i = _pair(p, j)
                _cmpx(s, i, j, (i & k) == 0)
                j >>= 1
            k <<= 1
        runs.append(s)
    cur = np.concatenate(runs)
    for _, grid in plan[1:]:                              # sample_merge levels
        nxt = []
        n_keys = cur.size
        for b in range(grid):
            s = np.zeros(MERGE_RUNS * RUN, np.uint64)
            lo = b * MERGE_RUNS * RUN
            s[:max(0, min(n_keys - lo, s.size))] = cur[lo:lo + s.size]
            d = RUN
            while d < MERGE_RUNS * RUN:
                for base in range(0, MERGE_RUNS * RUN, 2 * d):
                    i = np.arange(RUN)
                    s[base + i] = np.maximum(s[base + i], s[base + d + RUN - 1 - i])
                j = RUN // 2
                while j > 0:
                    for base in range(0, MERGE_RUNS * RUN, 2 * d):
                        _cmpx(s[base:], _pair(p, j), j, np.ones(p.size, bool))
                    j >>= 1
                d <<= 1
            nxt.append(s[:RUN])
        cur = np.concatenate(nxt)
    return cur[:RUN]


def test_launch_plan():
    assert launch_plan(129_280) == [("sample_runs", 127), ("sample_merge", 32), ("sample_merge", 8),
                                    ("sample_merge", 2), ("sample_merge", 1)]
    assert launch_plan(1024) == [("sample_runs", 1)] and launch_plan(1) == [("sample_runs", 1)]
    assert launch_plan(1025) == [("sample_runs", 2), ("sample_merge", 1)]
    assert launch_plan(4 * 1024 + 1) == [("sample_runs", 5), ("sample_merge", 2), ("sample_merge", 1)]


@pytest.mark.parametrize("V", [1000, 1024, 5 * 1024 + 3, 17 * 1024 - 1])
def test_kernel_network_emulation_gives_top_candidates(V, rng):
    """The bitonic sort of 1024, the max-merge of two sorted runs + bitonic merge, and the levels of launch_plan give
    exactly top_candidates' ids and values (keys decoded as sample_id / sample_value do)."""
    x = _awkward_logits(rng, V)
    key = _emulate(x)
    real = key != 0
    n = min(RUN, V)
    assert real.sum() == n and real[:n].all()
    ids = (np.uint64(0xFFFFFFFF) - (key[:n] & np.uint64(0xFFFFFFFF))).astype(np.int64)
    o = (key[:n] >> np.uint64(32)).astype(np.uint32)
    vals = np.where(o & 0x80000000, o & 0x7FFFFFFF, ~o).astype(np.uint32).view(np.float32)
    ref = top_candidates(x, 1.0)
    np.testing.assert_array_equal(ids, ref.ids)
    np.testing.assert_array_equal(vals, ref.values)
    assert TOP_K_MAX == N_CANDIDATES == RUN
