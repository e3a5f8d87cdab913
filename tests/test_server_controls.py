"""Generation controls through the HTTP server: structured output, tool_choice, logprobs, token ids, logit_bias,
model names, refused fields, cache_prompt, and streaming timing. The tiny random-weights demo model on the NumPy
reference backend with the real `openai` client; a slow fake engine for the timing test."""
from __future__ import annotations

import http.client
import json
import time
from dataclasses import dataclass

import numpy as np
import pytest

import openai  # test extra: missing is an error, not a skip
import jsonschema

import ds4cupy
from ds4cupy.server import BackgroundServer, ServerSettings, create_app
from ds4cupy.server.app import STATE
from ds4cupy.server.controls import GenerationControls
from ds4cupy.server.protocol import SamplingFields
from ds4cupy.server.worker import GenerationJob, real_generator_factory
from ds4cupy.text.logit_processors import LogitAdjustments
from ds4cupy.text.logprobs import log_softmax

CTX = 2048
HTTP_TIMEOUT = 120.0
NOTHINK = "deepseek-chat"
SCHEMA = {
    "type": "object",
    "properties": {
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "inner": {"type": "object", "properties": {"ok": {"type": "boolean"},
                                                   "tag": {"type": "string", "enum": ["a", "b"]}},
                  "required": ["ok", "tag"], "additionalProperties": False},
    },
    "required": ["n", "inner"],
    "additionalProperties": False,
}
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 6},
                                     "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"], "additionalProperties": False}}}
OTHER_TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}


@pytest.fixture(scope="module")
def model():
    from ds4cupy.tools.demo import demo_model_path
    m = ds4cupy.load(demo_model_path(), backend="reference")
    yield m
    m.close()


@pytest.fixture(scope="module")
def server(model):
    settings = ServerSettings(ctx=CTX, keepalive_s=0.2, demo=True,
                              aliases=("tiny-alias", "deepseek-chat", "deepseek-reasoner"))
    with BackgroundServer(create_app(model.tokenizer, model.new_session(ctx=CTX), settings)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", timeout=HTTP_TIMEOUT, max_retries=0)


def post(srv, path, body):
    host, port = srv.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=HTTP_TIMEOUT)
    try:
        conn.request("POST", path, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def stream_payloads(data: bytes) -> list[dict]:
    return [json.loads(line[6:]) for line in data.decode().split("\n")
            if line.startswith("data: ") and line != "data: [DONE]"]


def user(text):
    return [{"role": "user", "content": text}]


# ---------------------------------------------------------------------------------------------- structured output

def test_json_schema_answers_validate(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA, "strict": True}}
    plain = client.chat.completions.create(model=NOTHINK, messages=user("A thing, please."), max_tokens=1)
    for seed in range(1):
        r = client.chat.completions.create(model=NOTHINK, messages=user("A thing, please."), max_tokens=300,
                                           seed=seed, response_format=fmt)
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
        assert r.usage.prompt_tokens > plain.usage.prompt_tokens + 20     # the schema is rendered in the prompt
        text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model=NOTHINK, messages=user("Another one."), max_tokens=300, seed=seed, response_format=fmt,
            stream=True) if c.choices)
        jsonschema.validate(json.loads(text), SCHEMA)
    r = client.chat.completions.create(model=NOTHINK, messages=user("json"), max_tokens=300, seed=5,
                                       response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":            # json_object is unbounded: it may be cut by max_tokens
        assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_tool_choice_named(client):
    """One request (the tools block makes a ~700-token prompt for the reference backend); "required" and many
    seeds are covered on random logits in test_constraints.py."""
    r = client.chat.completions.create(model=NOTHINK, messages=user("Weather in Rome?"), max_tokens=300, seed=0,
                                       tools=[TOOL, OTHER_TOOL], parallel_tool_calls=False,
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}})
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and not msg.content and len(msg.tool_calls) == 1
    assert msg.tool_calls[0].function.name == "get_weather"
    jsonschema.validate(json.loads(msg.tool_calls[0].function.arguments), TOOL["function"]["parameters"])


# ------------------------------------------------------------------------------------------- logprobs, token ids

def test_chat_logprobs_match_the_model_and_the_stream(server, client, model):
    """Greedy, so the sampled token heads each top list; the first token's values are the log-softmax of the
    model's own logits for the prompt (prefilled again on a fresh session); the stream carries the same entries and
    ids as the non-streaming answer."""
    body = {"model": NOTHINK, "messages": user("Count to three."), "max_tokens": 6, "temperature": 0,
            "logprobs": True, "top_logprobs": 4, "return_token_ids": True}
    status, data = post(server, "/v1/chat/completions", body)
    assert status == 200
    r = json.loads(data)
    choice = r["choices"][0]
    entries = choice["logprobs"]["content"]
    assert len(entries) == len(choice["token_ids"]) == r["usage"]["completion_tokens"]
    for entry, token_id in zip(entries, choice["token_ids"]):
        top = entry["top_logprobs"]
        assert len(top) == 4 and [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
        assert top[0]["token"] == entry["token"] and top[0]["logprob"] == entry["logprob"]
        assert bytes(entry["bytes"]) == model.tokenizer.token_bytes(token_id)
    session = model.new_session(ctx=CTX)
    want = log_softmax(session.prefill(r["prompt_token_ids"]))
    assert entries[0]["logprob"] == pytest.approx(want[choice["token_ids"][0]], abs=1e-4)
    for t, tid in zip(entries[0]["top_logprobs"], np.argsort(-want)[:4]):
        assert t["logprob"] == pytest.approx(want[tid], abs=1e-4)

    status, data = post(server, "/v1/chat/completions", {**body, "stream": True})
    chunks = [p for p in stream_payloads(data) if p["choices"]]
    streamed = [e for p in chunks if p["choices"][0].get("logprobs") for e in p["choices"][0]["logprobs"]["content"]]
    ids = [t for p in chunks for t in p["choices"][0].get("token_ids") or []]
    assert ids == choice["token_ids"]
    assert [(e["token"], e["logprob"]) for e in streamed] == [(e["token"], e["logprob"]) for e in entries]
    # every chunk with text carries the ids of the tokens it delivers (llama-benchy counts tokens this way)
    assert all(isinstance(p["choices"][0].get("token_ids"), list) for p in chunks[1:])


def test_completions_logprobs(client):
    r = client.completions.create(model=NOTHINK, prompt="Once upon a time", max_tokens=5, temperature=0,
                                  logprobs=3)
    lp = r.choices[0].logprobs
    n = r.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert lp.text_offset == sorted(lp.text_offset)
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) <= 3 and max(top.values()) == pytest.approx(value) and value <= 0
    chunks = list(client.completions.create(model=NOTHINK, prompt="Once upon a time", max_tokens=5, temperature=0,
                                            logprobs=3, stream=True))
    values = [v for c in chunks if c.choices and c.choices[0].logprobs for v in c.choices[0].logprobs.token_logprobs]
    assert values == pytest.approx(lp.token_logprobs)


def test_logit_bias_forces_and_bans_tokens(server, model):
    forced = model.tokenizer.encode("Z")[0]
    status, data = post(server, "/v1/chat/completions", {
        "model": NOTHINK, "messages": user("anything"), "max_tokens": 5, "temperature": 0,
        "logit_bias": {str(forced): 100}, "return_token_ids": True})
    assert status == 200 and json.loads(data)["choices"][0]["token_ids"] == [forced] * 5
    body = {"model": NOTHINK, "messages": user("anything"), "max_tokens": 1, "temperature": 0,
            "return_token_ids": True}
    first = json.loads(post(server, "/v1/chat/completions", body)[1])["choices"][0]["token_ids"][0]
    banned = json.loads(post(server, "/v1/chat/completions", {**body, "logit_bias": {str(first): -100}})[1])
    assert banned["choices"][0]["token_ids"][0] != first


def test_controls_reach_the_generator(model):
    """Every parsed control is handed to the Generator (penalties, logprobs, ignore_eos, grammar)."""
    adjust = LogitAdjustments(presence_penalty=0.5, frequency_penalty=-0.5, repetition_penalty=1.2,
                              logit_bias={3: 1.0}, min_tokens=2)
    controls = GenerationControls(logprobs=7, adjust=adjust, ignore_eos=True)
    job = GenerationJob("r", [1, 2], 8, SamplingFields(), controls=controls)
    gen = real_generator_factory(model.tokenizer)(job)
    assert gen.adjust == adjust and gen.logprobs == 7 and gen.ignore_eos and gen.constraint is None


def test_cache_prompt_false_prefills_everything(client):
    def cached(**extra):
        r = client.chat.completions.create(model=NOTHINK, messages=user("The same prompt twice."), max_tokens=1,
                                           extra_body=extra)
        return r.usage.prompt_tokens_details.cached_tokens
    cached()
    assert cached() > 0
    assert cached(cache_prompt=False) == 0


# --------------------------------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("fields, status, param, code", [
    ({"model": "gpt-4o"}, 404, "model", "model_not_found"),
    ({"frobnicate": True}, 400, "frobnicate", "unrecognized_request_argument"),
    ({"logprobs": True, "top_logprobs": 21}, 400, "top_logprobs", None),
    ({"top_logprobs": 2}, 400, "top_logprobs", None),
    ({"logit_bias": {"99999999": 1}}, 400, "logit_bias.99999999", None),
    ({"logit_bias": {"5": 150}}, 400, "logit_bias.5", None),
    ({"logit_bias": {"x": 1}}, 400, "logit_bias.x", None),
    ({"presence_penalty": 3}, 400, "presence_penalty", None),
    ({"repetition_penalty": 0}, 400, "repetition_penalty", None),
    ({"response_format": {"type": "xml"}}, 400, "response_format.type", None),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "strict": True, "schema": {
        "type": "object", "dependentRequired": {"a": ["b"]}}}}}, 400, "response_format", "invalid_schema"),
    ({"tools": [TOOL], "tool_choice": "required", "ignore_eos": True}, 400, "ignore_eos", None),
    ({"tools": [{"type": "function", "function": {"name": "f", "strict": True, "parameters": {
        "type": "object", "properties": {}, "minProperties": 1}}}]}, 400, "tools", "invalid_schema"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}],
      "tool_choice": "required"}, 400, "tool_choice", "invalid_schema"),
    ({"chat_template_kwargs": {"add_generation_prompt": False}}, 400, "chat_template_kwargs.add_generation_prompt",
     None),
    ({"n": 2}, 400, "n", None),
])
def test_refusals_never_reach_the_engine(server, fields, status, param, code):
    worker = server.app[STATE].worker
    assert worker.wait_idle(10), "the previous test's job never finished"
    before = worker.jobs_served
    got, data = post(server, "/v1/chat/completions", {"model": NOTHINK, "messages": user("x"), "max_tokens": 1,
                                                      **fields})
    err = json.loads(data)["error"]
    assert got == status and err["param"] == param and err["message"], err
    if code:
        assert err["code"] == code
    assert worker.jobs_served == before


@pytest.mark.parametrize("fields, param", [
    ({"echo": True}, "echo"), ({"best_of": 3}, "best_of"), ({"suffix": "x"}, "suffix"),
    ({"response_format": {"type": "json_object"}}, "response_format"),     # a chat field, not a completions one
    ({"top_logprobs": 2}, "top_logprobs"), ({"guided_json": {}}, "guided_json"),
])
def test_completions_field_table(fields, param):
    from ds4cupy.server import protocol
    with pytest.raises(protocol.ProtocolError) as info:
        protocol.parse_completion_request({"prompt": "x", **fields}, ctx=CTX)
    assert info.value.status == 400 and info.value.param == param
    # bookkeeping fields are accepted (documented as without effect) and defaults of missing features too
    protocol.parse_completion_request({"prompt": "x", "user": "u1", "echo": False, "best_of": 1, "n": 1}, ctx=CTX)
    protocol.parse_chat_request({"messages": user("x"), "user": "u1", "metadata": {"k": "v"}, "store": False,
                                 "service_tier": "auto", "modalities": ["text"]}, ctx=CTX)


def test_model_names(server, client):
    assert [m.id for m in client.models.list().data] == ["deepseek-v4-flash", "tiny-alias", "deepseek-chat",
                                                         "deepseek-reasoner"]
    r = client.chat.completions.create(model="tiny-alias", messages=user("hi"), max_tokens=1)
    assert r.model == "tiny-alias"
    status, data = post(server, "/v1/completions", {"model": "nope", "prompt": "x", "max_tokens": 1})
    assert status == 404 and json.loads(data)["error"]["code"] == "model_not_found"
    # chat_template_kwargs switches thinking (deepseek-reasoner would think)
    status, data = post(server, "/v1/chat/completions", {
        "model": "deepseek-reasoner", "messages": user("hi"), "max_tokens": 3, "return_token_ids": True,
        "chat_template_kwargs": {"thinking": False}})
    prompt = json.loads(data)["prompt_token_ids"]
    assert status == 200 and prompt[-1] == server.app[STATE].tokenizer.special_id("</think>")


# ---------------------------------------------------------------------------------------------- streaming timing

class CharTokenizer:
    def encode(self, text):
        return [ord(c) for c in text]


class SlowPrefillSession:
    """Prefill takes PREFILL_S seconds; decode is instant."""
    PREFILL_S = 0.6

    def __init__(self):
        self.tokens = []

    @property
    def n_tokens(self):
        return len(self.tokens)

    def prefill(self, ids):
        time.sleep(self.PREFILL_S)
        self.tokens.extend(ids)
        return None

    def decode(self, token_id):
        self.tokens.append(token_id)
        return None

    def snapshot(self):
        return list(self.tokens)

    def restore(self, snap):
        self.tokens = list(snap)

    def reset(self):
        self.tokens = []


@dataclass
class Delta:
    token_id: int
    content: str = ""
    reasoning: str = ""
    tool_calls: tuple = ()
    finish_reason: str | None = None
    logprob: object = None


class TwoTokens:
    def __init__(self, job):
        self.completion_tokens = [1, 2]

    def stream(self, session, logits):
        yield Delta(1, content="Hello")
        yield Delta(2, content=" world", finish_reason="stop")


def test_first_chunk_leaves_with_the_first_token():
    """Headers at once, `: keepalive` comments during the prefill, and the role chunk only together with the first
    token's chunk, so that a client's time to first chunk covers the prefill (llama-benchy's pp measurement)."""
    settings = ServerSettings(ctx=4096, keepalive_s=0.1)
    app = create_app(CharTokenizer(), SlowPrefillSession(), settings, render=lambda m, t, th: "prompt",
                     make_generator=TwoTokens, prefill_chunk=1_000_000)
    with BackgroundServer(app) as srv:
        host, port = srv.url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=HTTP_TIMEOUT)
        start = time.perf_counter()
        conn.request("POST", "/v1/chat/completions", body=json.dumps({
            "messages": user("hi"), "stream": True}).encode(), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200
        headers_at = time.perf_counter() - start
        events = []
        while True:
            line = resp.readline()
            if not line:
                break
            if line.strip():
                events.append((time.perf_counter() - start, line.decode().strip()))
        conn.close()
    data = [(t, e) for t, e in events if e.startswith("data: ")]
    keepalives = [t for t, e in events if e == ": keepalive"]
    assert headers_at < SlowPrefillSession.PREFILL_S
    assert len(keepalives) >= 3 and max(keepalives) < data[0][0]
    assert data[0][0] >= SlowPrefillSession.PREFILL_S
    role, first = json.loads(data[0][1][6:]), json.loads(data[1][1][6:])
    assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert first["choices"][0]["delta"] == {"content": "Hello"}
    # the role and the first token leave in one write: nothing (no keepalive) between them
    assert events.index(data[1]) == events.index(data[0]) + 1
