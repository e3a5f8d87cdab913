"""Structured output: grammars (text.grammars) compiled by llguidance (text.constraints) and applied by the Generator.

The generation tests sample from seeded random logits over DeepSeek-V4's real 129,280-id vocabulary (the worst case
for the mask): whatever a random model prefers, every answer must parse and validate against the schema. The tiny
random-weight model does the same end to end through the server in test_server_controls.py.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

import jsonschema  # test extra: missing is an error, not a skip

from ds4cupy.text.chat import render_tool_calls
from ds4cupy.text.constraints import Constraint, ConstraintError, GrammarError, check_grammar
from ds4cupy.text.generate import Generator
from ds4cupy.text.grammars import json_grammar, tool_calls_grammar
from ds4cupy.text.output_parser import parse_completion
from ds4cupy.text.sampling import SamplingParams
from ds4cupy.text.tokenizer import Tokenizer

from conftest import SHARED_DATA

REAL_TOKENIZER = SHARED_DATA / "tokenizer" / "tokenizer.json"

# nested, and bounded everywhere (integers with ranges, maxLength, maxItems, no extra properties) so that a random
# model always finishes: the test is that what it writes is valid, not that it stops
NESTED_SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 9999},
        "name": {"type": "string", "maxLength": 12},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["red", "green", "blue"]}, "maxItems": 3},
        "owner": {
            "type": "object",
            "properties": {
                "active": {"type": "boolean"},
                "score": {"type": "integer", "minimum": -5, "maximum": 5},
                "kind": {"enum": ["user", "admin", None]},
            },
            "required": ["active", "kind"],
            "additionalProperties": False,
        },
    },
    "required": ["id", "name", "tags", "owner"],
    "additionalProperties": False,
}

WEATHER = {"type": "function", "function": {"name": "get_weather", "strict": True, "parameters": {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 16},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "unit": {"type": "string", "enum": ["C", "F"]},
        "where": {"type": "object", "properties": {"lat": {"type": "integer", "minimum": -90, "maximum": 90}},
                  "required": ["lat"], "additionalProperties": False},
    },
    "required": ["city", "days"],
    "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


@pytest.fixture(scope="module")
def tok():
    if not REAL_TOKENIZER.is_file():
        pytest.skip(f"{REAL_TOKENIZER} is not available")
    return Tokenizer.from_tokenizer_json(REAL_TOKENIZER)


class RandomLogitsSession:
    """The Session slice the Generator uses, with fresh seeded random logits (std 3) at every step."""

    def __init__(self, n_vocab: int, seed: int):
        self.rng = np.random.default_rng(seed)
        self.n_vocab = n_vocab
        self.tokens: list[int] = []

    @property
    def n_tokens(self):
        return len(self.tokens)

    def _logits(self):
        return 3.0 * self.rng.standard_normal(self.n_vocab, dtype=np.float32)

    def prefill(self, ids):
        self.tokens += list(ids)
        return self._logits()

    def decode(self, token_id):
        self.tokens.append(int(token_id))
        return self._logits()


def generate(tok, grammar, seed, *, parse_tools=False, max_tokens=400, thinking=False):
    session = RandomLogitsSession(tok.n_vocab, seed)
    gen = Generator(tok, SamplingParams(seed=seed), max_tokens=max_tokens, parse_tools=parse_tools,
                    thinking=thinking, constraint=Constraint(tok, grammar))
    return gen.generate(session, session.prefill([tok.bos_id]))


def consume(tok, grammar, text, eos=True):
    """Feed `text` (then EOS) through a Constraint: the index of the first refused token, or None if all pass."""
    c = Constraint(tok, grammar)
    ids = tok.encode(text) + ([tok.eos_id] if eos else [])
    for i, token in enumerate(ids):
        if not c.allowed()[token]:
            return i
        c.advance(token)
    return None


# ------------------------------------------------------------------------------------------------------ generation

def test_json_schema_50_random_generations_all_validate(tok):
    grammar = json_grammar(NESTED_SCHEMA, strict=True)
    finishes = set()
    for seed in range(50):
        out = generate(tok, grammar, seed)
        finishes.add(out["finish_reason"])
        value = json.loads(out["content"])
        jsonschema.validate(value, NESTED_SCHEMA)
        assert out["tokens"][-1] == tok.eos_id
    assert finishes == {"stop"}


def test_json_object_is_an_object(tok):
    """json_object: any object; unbounded, so a random model may be cut by max_tokens (then it is a prefix)."""
    grammar = json_grammar(None)
    for seed in range(3):
        out = generate(tok, grammar, seed, max_tokens=150)
        if out["finish_reason"] == "stop":
            assert isinstance(json.loads(out["content"]), dict)
        else:
            assert out["finish_reason"] == "length" and out["content"].lstrip()[0] == "{"
            assert consume(tok, grammar, out["content"], eos=False) is None


def test_named_tool_choice_always_calls_that_tool_with_valid_arguments(tok):
    grammar = tool_calls_grammar([WEATHER, CLOCK], choice="get_weather")
    schema = WEATHER["function"]["parameters"]
    for seed in range(20):
        out = generate(tok, grammar, 1000 + seed, parse_tools=True)
        assert out["finish_reason"] == "tool_calls" and out["content"] == ""
        (call,) = out["tool_calls"]
        assert call["function"]["name"] == "get_weather"
        jsonschema.validate(json.loads(call["function"]["arguments"]), schema)


def test_required_tool_choice_calls_declared_tools(tok):
    grammar = tool_calls_grammar([WEATHER, CLOCK], choice="required")
    names = set()
    for seed in range(10):
        out = generate(tok, grammar, 2000 + seed, parse_tools=True)
        assert out["tool_calls"] and out["content"] == ""
        for call in out["tool_calls"]:
            names.add(call["function"]["name"])
            if call["function"]["name"] == "get_weather":
                jsonschema.validate(json.loads(call["function"]["arguments"]), WEATHER["function"]["parameters"])
            else:
                assert json.loads(call["function"]["arguments"]) == {}
    assert names <= {"get_weather", "get_time"}


def test_mask_forbids_exactly_what_the_grammar_forbids(tok):
    """apply() puts -inf on the refused ids and leaves the others' values untouched; the sampler then never picks
    a refused id even when it has by far the largest logit."""
    c = Constraint(tok, json_grammar(NESTED_SCHEMA, strict=True))
    logits = np.random.default_rng(7).standard_normal(tok.n_vocab).astype(np.float32)
    allowed = c.allowed()
    assert 0 < allowed.sum() < tok.n_vocab and not allowed[tok.eos_id]
    out = c.apply(logits)
    assert np.array_equal(np.isneginf(out), ~allowed)
    assert np.array_equal(out[allowed], logits[allowed])
    logits[~allowed] += 1000.0                 # refused ids dominate the raw logits
    first = int(np.argmax(c.apply(logits)))
    assert allowed[first] and tok.decode([first]).lstrip().startswith("{")
    with pytest.raises(ConstraintError):
        c.advance(int(np.flatnonzero(~allowed)[0]))


# ------------------------------------------------------------------------------------------ grammar vs renderer

def test_tool_grammar_accepts_what_the_chat_encoding_renders(tok):
    """The grammar is the DSML that text.chat writes for an assistant's calls and output_parser reads back."""
    calls = [{"name": "get_weather", "arguments": json.dumps({"city": "São Paulo", "days": 3, "unit": "C",
                                                              "where": {"lat": -23}})},
             {"name": "get_time", "arguments": "{}"}]
    text = render_tool_calls(calls)
    assert consume(tok, tool_calls_grammar([WEATHER, CLOCK], choice="required"), text) is None
    assert consume(tok, tool_calls_grammar([WEATHER, CLOCK], choice="auto"), "Let me look." + text) is None
    assert consume(tok, tool_calls_grammar([WEATHER, CLOCK], choice="auto"), "No tools needed.") is None
    parsed = parse_completion(text)["tool_calls"]
    assert [json.loads(c["function"]["arguments"]) for c in parsed] == [json.loads(c["arguments"]) for c in calls]
    # refused: a second call without parallel calls, plain text under "required", an undeclared tool or parameter,
    # a value outside the schema
    single = render_tool_calls(calls[:1])
    assert consume(tok, tool_calls_grammar([WEATHER, CLOCK], choice="required", parallel=False), text) is not None
    assert consume(tok, tool_calls_grammar([WEATHER, CLOCK], choice="required"), "Sure." + single) is not None
    for bad in ({"city": "Rome", "days": 9}, {"city": "Rome", "days": 2, "sky": "blue"}, {"days": 2},
                {"city": "x" * 17, "days": 1}):
        assert consume(tok, tool_calls_grammar([WEATHER], choice="get_weather"),
                       render_tool_calls([{"name": "get_weather", "arguments": json.dumps(bad)}])) is not None, bad
    assert consume(tok, tool_calls_grammar([WEATHER], choice="required"),
                   render_tool_calls([{"name": "get_time", "arguments": "{}"}])) is not None


def test_thinking_prefix_is_free_until_think_end(tok):
    grammar = json_grammar({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
                            "additionalProperties": False}, thinking=True)
    assert consume(tok, grammar, 'I think {"b": [ not json yet</think>{"a": 12}') is None
    assert consume(tok, grammar, '</think>{"a": 12}') is None
    assert consume(tok, grammar, 'thoughts</think>{"b": 12}') is not None
    assert consume(tok, grammar, 'thoughts</think>plain words') is not None
    assert consume(tok, grammar, 'no end of thinking', eos=True) is not None       # EOS needs the answer


def test_json_with_tools_allows_a_call_instead(tok):
    grammar = json_grammar({"type": "object"}, tools=[CLOCK])
    assert consume(tok, grammar, '{"x": 1}') is None
    assert consume(tok, grammar, render_tool_calls([{"name": "get_time", "arguments": "{}"}])) is None
    assert consume(tok, grammar, 'hello') is not None


def test_json_whitespace_is_bounded(tok):
    grammar = json_grammar({"type": "object", "properties": {"a": {"type": "integer"}}})
    assert consume(tok, grammar, '{"a": 1}') is None
    assert consume(tok, grammar, '{\n  "a": 1\n}') is None
    assert consume(tok, grammar, '{"a":  1}') is not None                 # two spaces
    assert consume(tok, grammar, '{\n\n"a": 1}') is not None              # two newlines


# --------------------------------------------------------------------------------------------------------- errors

def test_schema_errors(tok):
    exotic = {"type": "object", "properties": {"a": {"type": "integer"}}, "dependentRequired": {"a": ["b"]}}
    with pytest.raises(GrammarError, match="dependentRequired"):
        check_grammar(tok, json_grammar(exotic, strict=True))
    check_grammar(tok, json_grammar(exotic, strict=False))      # non-strict: what cannot be enforced is ignored
    with pytest.raises(GrammarError, match="not among the tools"):
        tool_calls_grammar([WEATHER], choice="nope")
    with pytest.raises(GrammarError, match="type"):
        tool_calls_grammar([{"function": {"name": "f", "parameters": {"type": "array"}}}])
    with pytest.raises(GrammarError, match="DSML"):
        tool_calls_grammar([{"function": {"name": 'bad"name'}}])
    strict_exotic = {"function": {"name": "f", "strict": True, "parameters": {**exotic}}}
    with pytest.raises(GrammarError, match="dependentRequired"):
        tool_calls_grammar([strict_exotic])
    with pytest.raises(GrammarError):
        check_grammar(tok, "start: %json {not json}")
