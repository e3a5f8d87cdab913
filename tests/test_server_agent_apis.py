"""Anthropic Messages and OpenAI Responses end to end with their official SDKs (`anthropic`, `openai`) on
127.0.0.1: the real tokenizer, chat encoding, Generator (sampling, stop strings, DSML tool-call parsing) and server,
over a scripted session whose greedy answer is a text chosen by the test (the random tiny model cannot be made to
write a tool call). The prompts the session receives are checked too: what the client sends back must be rendered
(tool results, tool calls, thinking)."""
from __future__ import annotations

import http.client
import json

import numpy as np
import pytest

import anthropic  # test extra: missing is an error, not a skip
import openai

from fake_sessions import TokenListSession
from ds4cupy.server import BackgroundServer, ServerSettings, create_app
from ds4cupy.server.prefix_cache import PrefixCache
from ds4cupy.text.chat import render_tool_calls
from ds4cupy.text.tokenizer import Tokenizer

CTX = 4096
TIMEOUT = 30.0
API_KEY = "sk-ant-test"
GREEDY = {"temperature": 0}
WEATHER = {"name": "get_weather", "description": "Current weather of a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
WEATHER_FN = {"type": "function", "name": "get_weather", "description": "Current weather of a city",
              "parameters": WEATHER["input_schema"]}
CALL_TEXT = "I'll look." + render_tool_calls([{"name": "get_weather", "arguments": '{"city": "Rome"}'}])


class ScriptedSession(TokenListSession):
    """A session whose greedy continuation after every prefill is `script` (text), then EOS. States are token-only,
    so the prefix cache works on it as on a real session."""

    def __init__(self, tokenizer):
        super().__init__()
        self.tokenizer = tokenizer
        self.prefilled_tokens = 0
        self.prompts: list[str] = []         # the text of each request's prompt (decoded from what was consumed)
        self.script = "Hello there."
        self._ids: list[int] = []
        self._step = 0

    def _logits(self):
        out = np.zeros(self.tokenizer.n_vocab, np.float32)
        out[self._ids[min(self._step, len(self._ids) - 1)]] = 10.0
        return out

    def prefill(self, ids):
        self.tokens += [int(t) for t in ids]
        self.prefilled_tokens += len(ids)
        self._ids = self.tokenizer.encode(self.script) + [self.tokenizer.eos_id]
        self._step = 0
        self.prompts.append(self.tokenizer.decode(self.tokens))
        return self._logits()

    def decode(self, token):
        self.tokens.append(int(token))
        self._step += 1
        return self._logits()


@pytest.fixture(scope="module")
def session():
    return ScriptedSession(Tokenizer.demo())


@pytest.fixture(scope="module")
def server(session):
    app = create_app(session.tokenizer, session, ServerSettings(ctx=CTX, keepalive_s=0.2, api_key=API_KEY),
                     prefix_cache=PrefixCache(checkpoint_tokens=64))
    with BackgroundServer(app) as srv:
        yield srv


@pytest.fixture(scope="module")
def claude(server):
    return anthropic.Anthropic(base_url=server.url, api_key=API_KEY, timeout=TIMEOUT, max_retries=0)


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, timeout=TIMEOUT, max_retries=0)


def raw_sse(server, path, body, headers):
    """[(event name, payload)] of a raw streaming request; comments (keepalives) are dropped."""
    host, port = server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT)
    try:
        conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json", **headers})
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("Content-Type").startswith("text/event-stream")
        text = resp.read().decode()
    finally:
        conn.close()
    events = []
    for block in text.split("\n\n"):
        lines = [ln for ln in block.split("\n") if ln and not ln.startswith(":")]
        if not lines:
            continue
        assert lines[0].startswith("event: ") and lines[1].startswith("data: ") and len(lines) == 2, block
        payload = json.loads(lines[1][6:])
        assert payload["type"] == lines[0][7:]
        events.append((lines[0][7:], payload))
    return events


# ------------------------------------------------------------------------------------------------- Anthropic

def test_messages_non_stream_and_stream(claude, server, session):
    session.script = "Hello there, friend."
    kwargs = dict(model="deepseek-v4-flash", max_tokens=50, system=[{"type": "text", "text": "Be brief."}],
                  messages=[{"role": "user", "content": "Say hello"}], extra_body=GREEDY)
    msg = claude.messages.create(**kwargs)
    assert msg.type == "message" and msg.role == "assistant" and msg.stop_reason == "end_turn"
    assert [b.type for b in msg.content] == ["text"] and msg.content[0].text == "Hello there, friend."
    assert msg.usage.output_tokens == len(session.tokenizer.encode("Hello there, friend.")) + 1     # + EOS
    assert "Be brief.<｜User｜>Say hello<｜Assistant｜></think>" in session.prompts[-1]   # thinking off by default
    first_input = msg.usage.input_tokens + msg.usage.cache_read_input_tokens

    with claude.messages.stream(**kwargs) as stream:
        texts = list(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(texts) == msg.content[0].text and final.content[0].text == msg.content[0].text
    assert final.stop_reason == "end_turn" and final.usage.output_tokens == msg.usage.output_tokens
    # the same prompt again: all but its last token comes from the cache
    assert final.usage.cache_read_input_tokens == first_input - 1 and final.usage.input_tokens == 1

    events = raw_sse(server, "/v1/messages", {**kwargs.pop("extra_body"), **kwargs, "stream": True},
                     {"x-api-key": API_KEY, "anthropic-version": "2023-06-01"})
    names = [n for n, _ in events if n != "ping"]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    assert names[1] == "content_block_start" and names[-3] == "content_block_stop"
    assert set(names[2:-3]) == {"content_block_delta"}
    start = events[[n for n, _ in events].index("message_start")][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None and start["usage"]["output_tokens"] == 0
    delta = [p for n, p in events if n == "message_delta"][0]
    assert delta["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert delta["usage"]["output_tokens"] == msg.usage.output_tokens


def test_messages_tool_use_round_trip(claude, session):
    """The model writes a DSML tool call: it arrives as a tool_use block (input parsed), stop_reason tool_use, in
    both modes; the client's tool_result goes back and is rendered after the call, which is rendered too."""
    session.script = CALL_TEXT
    ask = [{"role": "user", "content": "Weather in Rome?"}]
    msg = claude.messages.create(model="deepseek-v4-flash", max_tokens=200, tools=[WEATHER], messages=ask, extra_body=GREEDY)
    assert msg.stop_reason == "tool_use"
    assert [b.type for b in msg.content] == ["text", "tool_use"] and msg.content[0].text == "I'll look."
    call = msg.content[1]
    assert call.name == "get_weather" and call.input == {"city": "Rome"} and call.id
    with claude.messages.stream(model="deepseek-v4-flash", max_tokens=200, tools=[WEATHER], messages=ask, extra_body=GREEDY) as st:
        streamed = st.get_final_message()
    assert [b.type for b in streamed.content] == ["text", "tool_use"]
    assert streamed.content[1].input == {"city": "Rome"} and streamed.stop_reason == "tool_use"

    session.script = "Sunny in Rome."
    follow = ask + [{"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in msg.content]},
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                                  "content": [{"type": "text", "text": "24 C, clear sky"}]}]}]
    answer = claude.messages.create(model="deepseek-v4-flash", max_tokens=200, tools=[WEATHER], messages=follow, extra_body=GREEDY)
    assert answer.content[0].text == "Sunny in Rome." and answer.stop_reason == "end_turn"
    prompt = session.prompts[-1]
    assert "## Tools" in prompt and '"name": "get_weather"' in prompt
    assert "I'll look." + render_tool_calls([{"name": "get_weather", "arguments": '{"city": "Rome"}'}]) in prompt
    assert "<tool_result>24 C, clear sky</tool_result>" in prompt
    # the history up to the first answer's prompt is cached (the live session holds it)
    assert answer.usage.cache_read_input_tokens >= msg.usage.input_tokens + msg.usage.cache_read_input_tokens - 1


def test_messages_thinking_blocks(claude, session):
    session.script = "Rome is in Italy.</think>Sunny."
    ask = [{"role": "user", "content": "Weather?"}]
    msg = claude.messages.create(model="deepseek-v4-flash", max_tokens=1500, messages=ask, tools=[WEATHER],
                                 thinking={"type": "enabled", "budget_tokens": 1024}, extra_body=GREEDY)
    assert [b.type for b in msg.content] == ["thinking", "text"]
    assert msg.content[0].thinking == "Rome is in Italy." and msg.content[1].text == "Sunny."
    assert session.prompts[-1].endswith("<｜Assistant｜><think>")
    with claude.messages.stream(model="deepseek-v4-flash", max_tokens=1500, messages=ask, tools=[WEATHER],
                                thinking={"type": "enabled", "budget_tokens": 1024}, extra_body=GREEDY) as st:
        kinds = [e.delta.type for e in st if e.type == "content_block_delta"]
        final = st.get_final_message()
    assert kinds[0] == "thinking_delta" and kinds[-1] == "text_delta"
    assert final.content[0].thinking == "Rome is in Italy."
    # the thinking block sent back is rendered (tools present: DeepSeek keeps earlier reasoning)
    session.script = "ok"
    claude.messages.create(model="deepseek-v4-flash", max_tokens=1500, tools=[WEATHER], thinking={"type": "enabled",
                           "budget_tokens": 1024}, extra_body=GREEDY, messages=ask + [
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in msg.content]},
        {"role": "user", "content": "And tomorrow?"}])
    assert "<think>Rome is in Italy.</think>Sunny.<｜end▁of▁sentence｜><｜User｜>And tomorrow?" in session.prompts[-1]


def test_messages_stop_sequences(claude, session):
    session.script = "one two STOP three"
    kwargs = dict(model="deepseek-v4-flash", max_tokens=100, messages=[{"role": "user", "content": "count"}],
                  stop_sequences=["STOP", "never"], extra_body=GREEDY)
    msg = claude.messages.create(**kwargs)
    assert msg.content[0].text == "one two " and msg.stop_reason == "stop_sequence" and msg.stop_sequence == "STOP"
    with claude.messages.stream(**kwargs) as st:
        final = st.get_final_message()
    assert final.content[0].text == "one two " and final.stop_sequence == "STOP"
    session.script = "one two three four five six"
    short = claude.messages.create(model="deepseek-v4-flash", max_tokens=3, messages=[{"role": "user", "content": "count"}],
                                   extra_body=GREEDY)
    assert short.stop_reason == "max_tokens" and short.usage.output_tokens == 3


def test_messages_count_tokens_and_prefill(claude, session):
    n = claude.messages.count_tokens(model="deepseek-v4-flash", messages=[{"role": "user", "content": "Say hello"}],
                                     system="Be brief.").input_tokens
    session.script = "Hi"
    msg = claude.messages.create(model="deepseek-v4-flash", max_tokens=5, system="Be brief.", extra_body=GREEDY,
                                 messages=[{"role": "user", "content": "Say hello"}])
    assert n == msg.usage.input_tokens + msg.usage.cache_read_input_tokens
    # a last assistant message is a prefill: the reply continues it (no end-of-sentence after it)
    session.script = " world"
    cont = claude.messages.create(model="deepseek-v4-flash", max_tokens=5, extra_body=GREEDY, messages=[
        {"role": "user", "content": "Say hello"}, {"role": "assistant", "content": "Hello"}])
    assert cont.content[0].text == " world" and session.prompts[-1].endswith("<｜Assistant｜></think>Hello")


def test_messages_errors(claude, server):
    def refused(**kw):
        with pytest.raises(anthropic.BadRequestError) as info:
            claude.messages.create(**{"model": "deepseek-v4-flash", "max_tokens": 5,
                                      "messages": [{"role": "user", "content": "x"}], **kw})
        body = info.value.body
        assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
        return body["error"]["message"]

    assert "max_tokens" in refused(max_tokens=0)
    assert "role" in refused(messages=[{"role": "system", "content": "x"}])
    assert "image" in refused(messages=[{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]}])
    assert "budget_tokens" in refused(max_tokens=1200, thinking={"type": "enabled", "budget_tokens": 1500})
    assert "budget_tokens" in refused(max_tokens=3000, thinking={"type": "enabled", "budget_tokens": 100})
    assert "server tools" in refused(tools=[{"type": "web_search_20250305", "name": "web_search"}])
    assert "tool_use_id" in refused(messages=[{"role": "user", "content": [{"type": "tool_result", "content": "x"}]}])
    assert "temperature" in refused(extra_body={"temperature": 1.5})
    assert "context length" in refused(messages=[{"role": "user", "content": "word " * CTX}])
    with pytest.raises(anthropic.NotFoundError) as info:                # a model the server does not serve
        claude.messages.create(model="claude-opus-4", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert info.value.body["error"]["type"] == "not_found_error" and "deepseek-v4-flash" in \
        info.value.body["error"]["message"]
    bad = anthropic.Anthropic(base_url=server.url, api_key="wrong", timeout=TIMEOUT, max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as info:
        bad.messages.create(model="deepseek-v4-flash", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert info.value.body == {"type": "error", "error": {"type": "authentication_error",
                                                          "message": "Incorrect API key provided."}}
    host, port = server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT)
    try:                                               # no key at all, and a route that does not exist
        conn.request("POST", "/v1/messages", body=b"{}", headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 401 and json.loads(resp.read())["error"]["type"] == "authentication_error"
        conn.request("GET", "/v1/messages/nothing", headers={"x-api-key": API_KEY})
        resp = conn.getresponse()
        assert resp.status == 404 and json.loads(resp.read())["error"]["type"] == "not_found_error"
    finally:
        conn.close()


# -------------------------------------------------------------------------------------------------- Responses

def test_responses_non_stream_and_stream(oai, session):
    session.script = "Plain answer."
    kwargs = dict(model="deepseek-chat", instructions="Be brief.", input="Say something", max_output_tokens=40,
                  temperature=0)
    r = oai.responses.create(**kwargs)
    assert r.object == "response" and r.status == "completed" and r.output_text == "Plain answer."
    assert [i.type for i in r.output] == ["message"] and r.output[0].content[0].type == "output_text"
    assert "Be brief.<｜User｜>Say something<｜Assistant｜></think>" in session.prompts[-1]
    events = list(oai.responses.create(**kwargs, stream=True))
    types = [e.type for e in events]
    assert types[:2] == ["response.created", "response.in_progress"] and types[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == r.output_text
    done = events[-1].response
    assert done.output_text == r.output_text and done.usage.output_tokens == r.usage.output_tokens
    assert done.usage.input_tokens_details.cached_tokens == r.usage.input_tokens - 1      # cached but the last token
    session.script = "a b c d e f g h"
    cut = oai.responses.create(model="deepseek-chat", input="x", max_output_tokens=3, temperature=0)
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"


def test_responses_function_call_round_trip(oai, session):
    session.script = CALL_TEXT
    r = oai.responses.create(model="deepseek-chat", input="Weather in Rome?", tools=[WEATHER_FN], temperature=0)
    calls = [i for i in r.output if i.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather" and json.loads(calls[0].arguments) == {"city": "Rome"}
    assert r.output[0].type == "message" and r.output[0].content[0].text == "I'll look."
    events = list(oai.responses.create(model="deepseek-chat", input="Weather in Rome?", tools=[WEATHER_FN],
                                       temperature=0, stream=True))
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert len(done) == 1 and json.loads(done[0].arguments) == {"city": "Rome"}
    assert [e.item.type for e in events if e.type == "response.output_item.done"] == ["message", "function_call"]

    # stateless: the whole history as input items
    session.script = "Sunny."
    history = [{"role": "user", "content": "Weather in Rome?"}, *[i.model_dump(exclude_none=True) for i in r.output],
               {"type": "function_call_output", "call_id": calls[0].call_id, "output": "24 C, clear sky"}]
    a = oai.responses.create(model="deepseek-chat", input=history, tools=[WEATHER_FN], temperature=0, store=False)
    stateless_prompt = session.prompts[-1]
    assert a.output_text == "Sunny." and "<tool_result>24 C, clear sky</tool_result>" in stateless_prompt
    assert CALL_TEXT in stateless_prompt
    # stored: previous_response_id + only the new item renders the same prompt
    b = oai.responses.create(model="deepseek-chat", previous_response_id=r.id, tools=[WEATHER_FN], temperature=0,
                             input=[{"type": "function_call_output", "call_id": calls[0].call_id,
                                     "output": "24 C, clear sky"}])
    assert b.output_text == "Sunny." and session.prompts[-1] == stateless_prompt
    assert b.usage.input_tokens_details.cached_tokens == b.usage.input_tokens - 1
    with pytest.raises(openai.BadRequestError):
        oai.responses.create(model="deepseek-chat", previous_response_id=a.id, input="x")   # store=False: not kept


def test_responses_reasoning_items(oai, session):
    session.script = "Think first.</think>Done."
    r = oai.responses.create(model="deepseek-v4-flash", input="Go", tools=[WEATHER_FN],
                             reasoning={"effort": "high"}, temperature=0)
    assert [i.type for i in r.output] == ["reasoning", "message"]
    assert r.output[0].content[0].text == "Think first." and r.output_text == "Done."
    assert r.usage.output_tokens_details.reasoning_tokens >= 1
    events = list(oai.responses.create(model="deepseek-v4-flash", input="Go", tools=[WEATHER_FN],
                                       reasoning={"effort": "high"}, temperature=0, stream=True))
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == "Think first."
    # the reasoning item sent back is rendered before the answer; effort "none" turns thinking off
    session.script = "ok"
    oai.responses.create(model="deepseek-v4-flash", tools=[WEATHER_FN], temperature=0, input=[
        {"role": "user", "content": "Go"}, *[i.model_dump(exclude_none=True) for i in r.output],
        {"role": "user", "content": "Again"}])
    assert "<think>Think first.</think>Done.<｜end▁of▁sentence｜><｜User｜>Again<｜Assistant｜><think>" in \
        session.prompts[-1]
    oai.responses.create(model="deepseek-v4-flash", input="Go", reasoning={"effort": "none"}, temperature=0)
    assert session.prompts[-1].endswith("<｜Assistant｜></think>")


def test_responses_errors(oai):
    for kwargs, param in [(dict(input=[{"type": "input_image", "image_url": "x"}]), "input[0]"),
                          (dict(input="x", tools=[{"type": "web_search"}]), "tools[0]"),
                          (dict(input="x", max_output_tokens=0), "max_output_tokens"),
                          (dict(input="x", previous_response_id="resp_nope"), "previous_response_id"),
                          (dict(input="x", text={"format": {"type": "json_object"}}), "text.format"),
                          (dict(input="x", reasoning={"effort": "extreme"}), "reasoning_effort")]:
        with pytest.raises(openai.BadRequestError) as info:
            oai.responses.create(model="deepseek-v4-flash", **kwargs)
        assert info.value.body["param"] == param, info.value.body


def test_cache_metrics(server, claude, session):
    """/metrics counts prefix-cache hits by source and misses, and the bytes held."""
    def metrics():
        host, port = server.url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT)
        try:
            conn.request("GET", "/metrics", headers={"x-api-key": API_KEY})
            text = conn.getresponse().read().decode()
        finally:
            conn.close()
        out = {}
        for line in text.splitlines():
            if line.startswith("ds4cupy_kv_cache"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    before = metrics()
    session.script = "fine"
    fresh = [{"role": "user", "content": "a question nobody asked before " * 3}]
    first = claude.messages.create(model="deepseek-v4-flash", max_tokens=5, messages=fresh, extra_body=GREEDY).usage
    claude.messages.create(model="deepseek-v4-flash", max_tokens=5, messages=[{"role": "user", "content": "something else"}],
                           extra_body=GREEDY)
    again = claude.messages.create(model="deepseek-v4-flash", max_tokens=5, messages=fresh, extra_body=GREEDY).usage   # restored
    assert again.cache_read_input_tokens == first.input_tokens + first.cache_read_input_tokens - 1
    after = metrics()
    hit_memory = 'ds4cupy_kv_cache_lookups_total{result="hit",source="memory"}'
    assert after[hit_memory] >= before[hit_memory] + 1
    assert after['ds4cupy_kv_cache_bytes{tier="host"}'] > 0 and after['ds4cupy_kv_cache_entries{tier="memory"}'] > 0
    assert after['ds4cupy_kv_cache_checkpoint_tokens'] == 64
    total = lambda m: sum(v for k, v in m.items() if k.startswith("ds4cupy_kv_cache_lookups_total"))  # noqa: E731
    assert total(after) == total(before) + 3
