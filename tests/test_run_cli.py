"""`ds4cupy run` on the demo model (reference backend): one-shot streaming, the chat loop, KV reuse across turns."""
from __future__ import annotations

import io
import os

import numpy as np
import pytest

from ds4cupy.text.sampling import SamplingParams


@pytest.fixture(scope="module", autouse=True)
def demo_cache(tmp_path_factory):
    """Generate the demo model into a private cache, not the user's."""
    old = os.environ.get("DS4CUPY_CACHE")
    os.environ["DS4CUPY_CACHE"] = str(tmp_path_factory.mktemp("ds4cupy-cache"))
    yield
    if old is None:
        os.environ.pop("DS4CUPY_CACHE", None)
    else:
        os.environ["DS4CUPY_CACHE"] = old


@pytest.fixture(scope="module")
def model(demo_cache):
    import ds4cupy
    from ds4cupy.tools.demo import demo_model_path
    return ds4cupy.load(demo_model_path(), backend="reference")


def cli(*argv):
    from ds4cupy.cli import main
    return main(["run", "--backend", "reference", *argv])


def test_one_shot_streams_and_labels_the_demo(capsys, seed):
    assert cli("-p", "hello", "-n", "6", "--seed", str(seed)) == 0
    first = capsys.readouterr()
    assert "RANDOM" in first.err and "demo" in first.err.lower()
    if "finish: length" in first.err:        # (a random model may also pick EOS within 6 tokens)
        assert "6 tokens" in first.err
        assert first.out.startswith("<think>\n") and first.out.strip()    # not a tty: reasoning between tags
    else:
        assert "finish: stop" in first.err
    assert cli("-p", "hello", "-n", "6", "--seed", str(seed)) == 0
    assert capsys.readouterr().out == first.out                           # same seed, same text


def test_nothink_has_no_reasoning_block(capsys):
    assert cli("-p", "hi", "-n", "4", "--seed", "5", "--nothink", "--system", "") == 0
    out = capsys.readouterr().out
    assert "<think>" not in out


def test_prompt_from_stdin(capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("from stdin"))
    assert cli("-p", "-", "-n", "3", "--seed", "1", "--temp", "0") == 0
    assert "3 tokens" in capsys.readouterr().err


@pytest.mark.parametrize("argv, rc, needle", [
    (("-m", "/nonexistent/model.gguf", "-p", "x"), 1, "/nonexistent/model.gguf"),
    (("--top-p", "2", "-p", "x"), 2, "top_p=2.0"),
    (("--min-p", "-1", "-p", "x"), 2, "min_p=-1.0"),
    (("-n", "0", "-p", "x"), 2, "got 0"),
])
def test_bad_arguments_are_named(capsys, argv, rc, needle):
    assert cli(*argv) == rc
    assert needle in capsys.readouterr().err


def _answer(state, text, **kw):
    from ds4cupy.tools.run_cli import answer
    out, err = io.StringIO(), io.StringIO()
    params = kw.pop("params", SamplingParams(seed=11))
    gen = answer(state, text, params, kw.pop("max_tokens", 6), kw.pop("stop", None), out, err, False)
    return gen, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("thinking", ["think", "nothink"])
def test_second_turn_reuses_the_kv_cache_and_matches_a_fresh_prefill(model, thinking):
    from ds4cupy.tools.run_cli import ChatState
    state = ChatState(model, 512, "You are a helpful assistant", thinking)
    gen1, _, _ = _answer(state, "hello there")
    in_session = state.session.n_tokens
    assert in_session == state.reused + state.prefilled + len(gen1.completion_tokens) - 1
    ids2 = state.prompt_ids("and again")
    logits = state.sync(ids2)
    assert state.reused == in_session and state.prefilled == len(ids2) - in_session
    fresh = model.new_session(512)
    np.testing.assert_allclose(logits, fresh.prefill(ids2), rtol=1e-3, atol=1e-3)
    # the ids spell exactly the conversation as DeepSeek's template renders it
    from ds4cupy.text.chat import encode_messages
    want = encode_messages(state.messages, "thinking" if thinking == "think" else "chat", drop_thinking=False)
    assert model.tokenizer.decode(ids2) == want


class ScriptedModel:
    """Model stand-in: the demo tokenizer, and sessions whose greedy answer after every prefill is `script`."""

    def __init__(self, script):
        from ds4cupy.text.tokenizer import Tokenizer
        self.tokenizer = Tokenizer.demo()
        self.script = script

    def new_session(self, ctx):
        return ScriptedSession(self, ctx)


class ScriptedSession:
    def __init__(self, model, ctx):
        self.model, self.ctx = model, ctx
        self.tokens, self.step = [], 0

    @property
    def n_tokens(self):
        return len(self.tokens)

    def _logits(self):
        out = np.zeros(self.model.tokenizer.n_vocab, dtype=np.float32)
        out[self.model.script[min(self.step, len(self.model.script) - 1)]] = 5.0
        return out

    def prefill(self, ids):
        self.tokens += list(ids)
        self.step = 0
        return self._logits()

    def decode(self, t):
        self.tokens.append(int(t))
        self.step += 1
        return self._logits()

    def snapshot(self):
        return (list(self.tokens), self.step)

    def restore(self, snap):
        self.tokens, self.step = list(snap[0]), snap[1]

    def reset(self):
        self.tokens, self.step = [], 0


def test_turn_that_cannot_continue_restarts_from_the_snapshot():
    from ds4cupy.tools.run_cli import ChatState
    from ds4cupy.text.tokenizer import Tokenizer
    tok = Tokenizer.demo()
    script = tok.encode("Alpha STOPWORD beta") + [tok.eos_id]
    model = ScriptedModel(script)
    state = ChatState(model, 512, None, "nothink")
    gen, _, _ = _answer(state, "hello", params=SamplingParams(temperature=0), max_tokens=50, stop=["STOPWORD"])
    assert gen.content == "Alpha " and gen.finish_reason == "stop"
    prompt1 = state.prefilled
    live = list(state.session.tokens)
    assert len(live) > prompt1 + 1      # the session holds tokens of the cut-off stop string
    ids2 = state.prompt_ids("next")
    assert ids2[:len(live)] != live
    state.sync(ids2)
    assert state.reused == prompt1      # restored the post-prompt snapshot instead of starting over
    assert state.session.tokens == ids2
    # and a clean EOS turn is continued in place
    state2 = ChatState(ScriptedModel(tok.encode("Fine answer.") + [tok.eos_id]), 512, None, "think")
    _answer(state2, "hello", params=SamplingParams(temperature=0), max_tokens=50)
    held = state2.session.n_tokens
    state2.sync(state2.prompt_ids("next"))
    assert state2.reused == held


def test_repl_commands(model):
    from ds4cupy.tools.run_cli import ChatState, repl
    state = ChatState(model, 512, None, "think")
    lines = iter(["/help", "hi", "/nothink", "/bogus", "/reset", "  ", "/quit", "never read"])
    out, err = io.StringIO(), io.StringIO()
    rc = repl(state, SamplingParams(seed=1), 3, None, out, err, False, input_fn=lambda _: next(lines))
    assert rc == 0 and next(lines) == "never read"
    e = err.getvalue()
    assert "/quit" in e and "thinking mode off" in e and "unknown command '/bogus'" in e and "cleared" in e
    assert state.thinking == "nothink" and state.messages == []

    def raise_eof(_):
        raise EOFError
    assert repl(state, SamplingParams(seed=1), 3, None, out, err, False, input_fn=raise_eof) == 0
