"""Generator over fake sessions (scripted and random-table logits) and, once available, the real demo model."""
from __future__ import annotations

import numpy as np
import pytest

from ds4cupy.text.generate import GenerationDelta, Generator, StopMatcher
from ds4cupy.text.sampling import SamplingParams
from ds4cupy.text.tokenizer import Tokenizer

D = "｜DSML｜"
GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.demo()


class FakeSession:
    """Session contract (prefill / decode / tokens / n_tokens / ctx) with logits from a function of the tokens."""

    def __init__(self, vocab, logits_fn, ctx=10_000):
        self.vocab, self.logits_fn, self.ctx = vocab, logits_fn, ctx
        self.tokens: list[int] = []
        self.decode_calls = 0

    @property
    def n_tokens(self):
        return len(self.tokens)

    def prefill(self, ids):
        if self.n_tokens + len(ids) > self.ctx:
            raise ValueError("context overflow")
        self.tokens += list(ids)
        return self.logits_fn(self.tokens)

    def decode(self, token_id):
        if self.n_tokens + 1 > self.ctx:
            raise ValueError("context overflow")
        self.decode_calls += 1
        self.tokens.append(int(token_id))
        return self.logits_fn(self.tokens)


def scripted(vocab, prompt_len, script):
    """Logits that make greedy sampling produce `script` (then repeat its last id)."""
    def fn(tokens):
        k = min(len(tokens) - prompt_len, len(script) - 1)
        out = np.zeros(vocab, dtype=np.float32)
        out[script[k]] = 10.0
        return out
    return fn


def random_table(vocab, rng):
    table = (rng.standard_normal((vocab, vocab)) * 2).astype(np.float32)
    return lambda tokens: table[tokens[-1]]


def run(tok, text_ids, gen, prompt=(0, 5, 6)):
    s = FakeSession(tok.n_vocab, scripted(tok.n_vocab, len(prompt), text_ids))
    logits = s.prefill(list(prompt))
    deltas = list(gen.stream(s, logits))
    return s, deltas


def _join(deltas, field):
    return "".join(getattr(d, field) for d in deltas)


def _check_contract(s, deltas, gen, prompt=(0, 5, 6)):
    assert all(isinstance(d, GenerationDelta) for d in deltas)
    assert [d.token_id for d in deltas] == gen.completion_tokens
    assert [d.finish_reason is not None for d in deltas] == [False] * (len(deltas) - 1) + [True]
    # the session holds the prompt and every generated token except the last
    assert s.tokens == list(prompt) + gen.completion_tokens[:-1]
    assert s.decode_calls == len(gen.completion_tokens) - 1


def test_eos_finishes_with_stop_and_is_not_decoded(tok):
    ids = tok.encode("Hello world, how are you?") + [tok.eos_id]
    gen = Generator(tok, GREEDY, max_tokens=100)
    s, deltas = run(tok, ids, gen)
    _check_contract(s, deltas, gen)
    assert gen.completion_tokens == ids and deltas[-1].finish_reason == "stop" == gen.finish_reason
    assert _join(deltas, "content") == "Hello world, how are you?" == gen.content
    assert _join(deltas, "text") == gen.text == gen.content


def test_max_tokens_finishes_with_length(tok):
    ids = tok.encode("one two three four five six seven eight nine ten")
    gen = Generator(tok, GREEDY, max_tokens=4)
    s, deltas = run(tok, ids, gen)
    _check_contract(s, deltas, gen)
    assert len(deltas) == 4 and deltas[-1].finish_reason == "length"
    assert gen.content == tok.decode(ids[:4])


def test_stop_string_across_token_boundaries(tok):
    text = "The answer is 42. ENDOFANSWER and more text"
    ids = tok.encode(text) + [tok.eos_id]
    pieces = [tok.decode([i]) for i in ids]
    assert not any("ENDOFANSWER" in p for p in pieces), "stop string must span several tokens for this test"
    gen = Generator(tok, GREEDY, max_tokens=100, stop=["ENDOFANSWER", "never"])
    s, deltas = run(tok, ids, gen)
    _check_contract(s, deltas, gen)
    assert gen.finish_reason == "stop" and gen.stop_string == "ENDOFANSWER"
    assert gen.content == "The answer is 42. " == _join(deltas, "content")
    # generation stopped at the token that completed the stop string
    assert tok.decode(gen.completion_tokens).startswith(text[:text.index("ENDOFANSWER") + len("ENDOFANSWER")])
    assert "ENDOFANSWER" not in tok.decode(gen.completion_tokens[:-1])


def test_partial_stop_prefix_is_released(tok):
    ids = tok.encode("ENDOF is not the end") + [tok.eos_id]
    gen = Generator(tok, GREEDY, max_tokens=100, stop=["ENDOFANSWER"])
    s, deltas = run(tok, ids, gen)
    assert gen.finish_reason == "stop" and gen.stop_string is None
    assert gen.content == "ENDOF is not the end"
    # it was held back while it could still become the stop string
    first_nonempty = next(i for i, d in enumerate(deltas) if d.content)
    assert first_nonempty > 0


def test_stop_matcher_unit(rng):
    text = "abc STOP def"
    for _ in range(50):
        cuts = sorted(rng.choice(np.arange(1, len(text)), size=rng.integers(1, 6), replace=False).tolist())
        pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        m = StopMatcher(["STOP", "xyz"])
        out = ""
        for p in pieces:
            out += m.feed(p)
            if m.matched:
                break
        assert out == "abc " and m.matched == "STOP"
    with pytest.raises(ValueError, match="''"):
        StopMatcher([""])


def test_utf8_is_never_split(tok):
    text = "emoji 😀🎉 and 龘 done"
    ids = tok.encode(text) + [tok.eos_id]
    assert len(ids) > len(text.split()), "demo vocab splits these characters into byte tokens"
    gen = Generator(tok, GREEDY, max_tokens=100)
    s, deltas = run(tok, ids, gen)
    assert all("\ufffd" not in d.content for d in deltas)
    assert gen.content == text
    assert any(d.content == "" for d in deltas[:-1])


def test_thinking_and_tool_calls(tok):
    text = ("I should call the tool.</think>Let me check."
            f"\n\n<{D}tool_calls>\n<{D}invoke name=\"get_weather\">\n"
            f"<{D}parameter name=\"location\" string=\"true\">Paris</{D}parameter>\n"
            f"<{D}parameter name=\"days\" string=\"false\">2</{D}parameter>\n"
            f"</{D}invoke>\n</{D}tool_calls>")
    ids = tok.encode(text) + [tok.eos_id]
    gen = Generator(tok, GREEDY, max_tokens=500, thinking=True, parse_tools=True)
    s, deltas = run(tok, ids, gen)
    _check_contract(s, deltas, gen)
    assert gen.finish_reason == "tool_calls"
    assert _join(deltas, "reasoning") == "I should call the tool." == gen.reasoning
    assert _join(deltas, "content") == "Let me check." == gen.content
    calls = [c for d in deltas for c in d.tool_calls]
    assert len(calls) == 1 and calls[0]["index"] == 0 and calls[0]["name"] == "get_weather"
    assert calls[0]["arguments"] == '{"location": "Paris", "days": 2}'
    assert calls[0]["id"].startswith("call_") and gen.tool_calls[0]["id"] == calls[0]["id"]
    # without tool parsing the DSML stays content and the finish is a plain stop
    gen2 = Generator(tok, GREEDY, max_tokens=500, thinking=True, parse_tools=False)
    run(tok, ids, gen2)
    assert gen2.finish_reason == "stop" and gen2.tool_calls == [] and f"<{D}invoke" in gen2.content


def test_seeded_sampling_is_reproducible(tok, rng):
    fn = random_table(tok.n_vocab, rng)
    seed = int(rng.integers(1 << 31))
    outs = []
    for _ in range(2):
        gen = Generator(tok, SamplingParams(temperature=1.0, min_p=0.0, seed=seed), max_tokens=30,
                        stop_token_ids=[])
        s = FakeSession(tok.n_vocab, fn)
        deltas = list(gen.stream(s, s.prefill([0, 7])))
        _check_contract(s, deltas, gen, prompt=(0, 7))
        outs.append(gen.completion_tokens)
    assert outs[0] == outs[1]


def test_context_limit_ends_with_length_before_overflow(tok):
    ids = tok.encode("a b c d e f g h i j k l m n o p")
    s = FakeSession(tok.n_vocab, scripted(tok.n_vocab, 3, ids), ctx=6)
    gen = Generator(tok, GREEDY, max_tokens=100)
    deltas = list(gen.stream(s, s.prefill([0, 5, 6])))
    assert gen.finish_reason == "length" and s.n_tokens == 6
    assert len(gen.completion_tokens) == 4 and s.tokens == [0, 5, 6] + gen.completion_tokens[:-1]


def test_bad_arguments(tok):
    with pytest.raises(ValueError, match="max_tokens=0"):
        Generator(tok, GREEDY, max_tokens=0)
    gen = Generator(tok, GREEDY, max_tokens=2)
    s = FakeSession(tok.n_vocab, scripted(tok.n_vocab, 1, [5, 6]))
    list(gen.stream(s, s.prefill([0])))
    with pytest.raises(RuntimeError, match="once"):
        list(gen.stream(s, s.decode(6)))


def _demo_model():
    """The demo model, generated into the test's private cache (DS4CUPY_CACHE set by the caller)."""
    import ds4cupy
    from ds4cupy.tools.demo import demo_model_path
    return ds4cupy.load(demo_model_path(), backend="reference")


def test_generator_on_the_real_demo_model(tmp_path, monkeypatch):
    from ds4cupy.text.chat import encode_messages
    monkeypatch.setenv("DS4CUPY_CACHE", str(tmp_path))
    model = _demo_model()
    tok = model.tokenizer
    prompt = tok.encode(encode_messages([{"role": "user", "content": "Hello!"}], "chat"))
    results = []
    for _ in range(2):
        s = model.new_session(ctx=256)
        gen = Generator(tok, SamplingParams(seed=7), max_tokens=12)
        deltas = list(gen.stream(s, s.prefill(prompt)))
        _check_contract_real(s, deltas, gen, prompt, max_tokens=12)
        results.append((gen.completion_tokens, gen.content))
    assert results[0] == results[1]
    # the session's KV really holds prompt + generated[:-1]: decoding the last token there equals a fresh prefill
    generated = results[0][0]
    fresh = model.new_session(ctx=256)
    want = fresh.prefill(prompt + generated)
    np.testing.assert_allclose(s.decode(generated[-1]), want, rtol=1e-3, atol=1e-3)


def _check_contract_real(s, deltas, gen, prompt, max_tokens):
    assert [d.token_id for d in deltas] == gen.completion_tokens
    # no stop strings and no tools: the run ends at EOS ("stop") or after max_tokens tokens ("length")
    ended_at_eos = gen.completion_tokens[-1] == gen.tokenizer.eos_id
    assert deltas[-1].finish_reason == ("stop" if ended_at_eos else "length")
    assert ended_at_eos or len(gen.completion_tokens) == max_tokens
    assert gen.tokenizer.eos_id not in gen.completion_tokens[:-1]
    assert list(s.tokens) == list(prompt) + gen.completion_tokens[:-1]
    assert s.n_tokens == len(prompt) + len(gen.completion_tokens) - 1
