"""The HTTP layer over a scripted fake engine: what the random-weights model cannot be made to do on demand (emit
tool calls, fail, be slow on purpose). Real server, real `openai` client, 127.0.0.1 only, explicit timeouts."""
from __future__ import annotations

import http.client
import json
import re
import threading
import time
from dataclasses import dataclass, field

import pytest

import openai  # the real OpenAI client (test extra: a missing one is an error, not a skip)

from fake_sessions import TokenListSession
from ds4cupy.server import BackgroundServer, ServerSettings, create_app
from ds4cupy.server.app import STATE

HTTP_TIMEOUT = 20.0
KEEPALIVE_S = 0.1


class CharTokenizer:
    """One token per character."""

    def encode(self, text):
        return [ord(c) for c in text]


class FakeSession(TokenListSession):

    def prefill(self, ids):
        if any(chr(i) == "\x00" for i in ids):
            raise RuntimeError("engine exploded")
        self.tokens.extend(ids)
        return "logits"

    def decode(self, token_id):
        self.tokens.append(token_id)
        return "logits"


@dataclass
class Delta:
    token_id: int
    reasoning: str = ""
    content: str = ""
    tool_calls: list = field(default_factory=list)
    finish_reason: str | None = None


class ScriptedGenerator:
    """Behaviour chosen by words in the prompt: TOOLS -> two tool calls; SLOW -> 50 ms a token; FAILDECODE -> raise
    mid-stream; EOS2 -> finish "stop" after two content tokens; else reasoning (thinking mode) then content, one token
    each, finishing with "length"."""

    def __init__(self, job):
        self.job = job
        self.prompt = "".join(chr(i) for i in job.prompt_ids)
        self.completion_tokens = []

    def _deltas(self):
        if "TOOLS" in self.prompt:
            yield Delta(1, content="Let me check.")
            yield Delta(2, tool_calls=[{"index": 0, "id": "call_a", "name": "get_weather",
                                        "arguments": '{"city": "Rome"}'}])
            yield Delta(3, tool_calls=[{"index": 1, "id": "call_b", "name": "get_time", "arguments": "{}"}])
            yield Delta(4, finish_reason="tool_calls")
            return
        if self.job.thinking:
            yield Delta(5, reasoning="hmm ")
            yield Delta(6, reasoning="ok")
        for i in range(self.job.max_tokens):
            if "FAILDECODE" in self.prompt and i == 1:
                raise RuntimeError("decode failed")
            if "SLOW" in self.prompt:
                time.sleep(0.05)
            if "EOS2" in self.prompt and i == 2:
                yield Delta(1, finish_reason="stop")             # the end-of-sentence token: no text
                return
            last = i == self.job.max_tokens - 1
            yield Delta(100 + i, content=f"w{i} ", finish_reason="length" if last else None)

    def stream(self, session, logits):
        for d in self._deltas():
            self.completion_tokens.append(d.token_id)
            yield d
            if d.finish_reason is None:
                session.decode(d.token_id)


def render(messages, tools, thinking):
    parts = [f"{m['role']}:{m['content']}" for m in messages]
    if tools:
        parts.append("TOOLS")
    if any(m["content"] == "UNRENDERABLE" for m in messages):
        raise ValueError("this conversation cannot be encoded")
    return "|".join(parts) + ("<think>" if thinking.enabled else "</think>")


@pytest.fixture(scope="module")
def server():
    # "m": an extra served name (--served-model-name deepseek-v4-flash m)
    settings = ServerSettings(ctx=2000, keepalive_s=KEEPALIVE_S, aliases=("m", "deepseek-chat", "deepseek-reasoner"))
    app = create_app(CharTokenizer(), FakeSession(), settings,
                     render=render, make_generator=ScriptedGenerator, prefill_chunk=16)
    with BackgroundServer(app) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", timeout=HTTP_TIMEOUT, max_retries=0)


def raw_post(srv, path, body, headers_out: dict | None = None):
    host, port = srv.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=HTTP_TIMEOUT)
    try:
        conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        if headers_out is not None:
            headers_out.update(resp.getheaders())
        return resp.status, resp.read()
    finally:
        conn.close()


def metrics(srv) -> str:
    host, port = srv.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=HTTP_TIMEOUT)
    try:
        conn.request("GET", "/metrics")
        return conn.getresponse().read().decode()
    finally:
        conn.close()


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
         {"type": "function", "function": {"name": "get_time"}}]


def test_tool_calls_non_stream(client):
    r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "weather?"}], tools=TOOLS)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls
    assert [(c.id, c.function.name) for c in calls] == [("call_a", "get_weather"), ("call_b", "get_time")]
    assert json.loads(calls[0].function.arguments) == {"city": "Rome"}
    assert choice.message.content == "Let me check."


def test_tool_calls_stream_and_round_trip(client):
    stream = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "weather?"}],
                                            tools=TOOLS, stream=True)
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        delta = chunk.choices[0].delta
        for tc in delta.tool_calls or []:
            entry = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            entry["id"] = tc.id or entry["id"]
            entry["name"] += tc.function.name or ""
            entry["arguments"] += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert calls[0] == {"id": "call_a", "name": "get_weather", "arguments": '{"city": "Rome"}'}
    # the client sends the calls and their results back; the answer comes without tools offered
    follow = client.chat.completions.create(model="deepseek-chat", max_tokens=2, tools=TOOLS, tool_choice="none",
                                            messages=[
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
            for c in calls.values()]},
        {"role": "tool", "tool_call_id": "call_a", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_b", "content": "noon"}])
    assert follow.choices[0].message.content == "w0 w1 " and follow.choices[0].finish_reason == "length"


def test_thinking_split_and_alias(client):
    r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "q"}], max_tokens=1)
    assert r.choices[0].message.model_extra["reasoning_content"] == "hmm ok"
    assert r.choices[0].message.content == "w0 "
    r = client.chat.completions.create(model="deepseek-chat", messages=[{"role": "user", "content": "q"}],
                                       max_tokens=1)
    assert "reasoning_content" not in r.choices[0].message.model_extra


def test_keepalive_and_queue_depth_while_waiting(server):
    """A stream queued behind a slow request gets `: keepalive` comments; /metrics shows the waiting request."""
    results = {}

    def slow():
        results["slow"] = raw_post(server, "/v1/chat/completions", {
            "messages": [{"role": "user", "content": "SLOW"}], "max_tokens": 12})

    t = threading.Thread(target=slow, daemon=True)
    t.start()
    time.sleep(0.1)
    queued_headers: dict = {}
    waiting = threading.Thread(target=lambda: results.setdefault("queued", raw_post(server, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "after"}], "max_tokens": 2, "stream": True}, queued_headers)),
        daemon=True)
    waiting.start()
    deadline = time.monotonic() + 5
    depth_seen = False
    while time.monotonic() < deadline and not depth_seen:
        depth_seen = "ds4cupy_queue_depth 1" in metrics(server)
        time.sleep(0.02)
    worker = server.app[STATE].worker
    assert not worker.wait_idle(0.01), "two requests are in the engine: it is not idle"
    t.join(HTTP_TIMEOUT)
    waiting.join(HTTP_TIMEOUT)
    assert worker.wait_idle(5) and worker.queue_depth == 0 and not worker.busy
    assert depth_seen
    status, data = results["queued"]
    lines = data.decode().split("\n")
    assert status == 200 and ": keepalive" in lines and lines[-3] == "data: [DONE]"
    assert queued_headers["X-Queue-Position"] == "1"
    assert results["slow"][0] == 200


def test_non_stream_disconnect_cancels(server):
    """A non-streaming client that hangs up mid-generation frees the engine within about a token."""
    before = metrics(server)
    host, port = server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=HTTP_TIMEOUT)
    conn.request("POST", "/v1/chat/completions", headers={"Content-Type": "application/json"},
                 body=json.dumps({"messages": [{"role": "user", "content": "SLOW"}], "max_tokens": 400}))
    time.sleep(0.3)
    conn.sock.shutdown(2)
    conn.close()
    t0 = time.perf_counter()
    status, data = raw_post(server, "/v1/chat/completions", {"model": "deepseek-chat", "max_tokens": 1,
                                                             "messages": [{"role": "user", "content": "next"}]})
    assert status == 200 and time.perf_counter() - t0 < 2.0
    def count(text):
        return int(text.split("\nds4cupy_requests_cancelled_total ")[1].split()[0])

    assert count(metrics(server)) == count(before) + 1
    assert json.loads(data)["model"] == "deepseek-chat"        # a known alias is echoed


def test_engine_failure_is_reported_and_survived(server, client, caplog):
    """The client gets a generic message naming the request id; the exception itself goes to the log only."""
    with caplog.at_level("ERROR", logger="ds4cupy.server"):
        status, data = raw_post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "\x00"}]})
    err = json.loads(data)["error"]
    assert status == 500 and err["type"] == "server_error" and err["code"] == "engine_error"
    assert "engine exploded" not in err["message"] and "RuntimeError" not in err["message"]
    rid = re.search(r"request (chatcmpl-\w+)", err["message"]).group(1)
    logged = [r for r in caplog.records if rid in r.getMessage()]
    assert logged and "engine exploded" in "".join(str(r.exc_info[1]) for r in logged if r.exc_info)
    status, data = raw_post(server, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "FAILDECODE"}], "stream": True, "max_tokens": 5})
    events = [e for e in data.decode().split("\n\n") if e]
    assert status == 200 and events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["error"]["code"] == "engine_error"
    with pytest.raises(openai.APIError):
        list(client.chat.completions.create(model="m", messages=[{"role": "user", "content": "FAILDECODE"}],
                                            stream=True, max_tokens=5))
    r = client.chat.completions.create(model="deepseek-chat", messages=[{"role": "user", "content": "fine"}],
                                       max_tokens=2)
    assert r.choices[0].message.content == "w0 w1 "


def test_renderer_refusal_is_400(server):
    status, data = raw_post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "UNRENDERABLE"}]})
    err = json.loads(data)["error"]
    assert status == 400 and err["param"] == "messages" and err["code"] == "invalid_messages"


def test_max_tokens_clamped_to_context(server):
    status, data = raw_post(server, "/v1/chat/completions", {
        "model": "deepseek-chat", "messages": [{"role": "user", "content": "x" * 1980}], "max_tokens": 500})
    body = json.loads(data)
    assert status == 200 and body["usage"]["completion_tokens"] == 2000 - body["usage"]["prompt_tokens"]
    status, data = raw_post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 2000}]})
    assert status == 400 and json.loads(data)["error"]["code"] == "context_length_exceeded"


def test_max_completion_tokens_wins_end_to_end(server):
    for body in ({"max_tokens": 5, "max_completion_tokens": 2}, {"max_completion_tokens": 2, "max_tokens": 5}):
        status, data = raw_post(server, "/v1/chat/completions", {
            "model": "deepseek-chat", "messages": [{"role": "user", "content": "count"}], **body})
        r = json.loads(data)
        assert status == 200 and r["usage"]["completion_tokens"] == 2, r
        assert r["choices"][0]["message"]["content"] == "w0 w1 " and r["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("prompt, text, finish", [("go on", "w0 w1 w2 ", "length"), ("EOS2", "w0 w1 ", "stop")])
def test_streamed_completions_carry_the_finish_reason(client, prompt, text, finish):
    """/v1/completions streams: the text deltas, then one chunk with the finish reason (and usage when asked); the
    same finish reason as the non-streamed answer."""
    whole = client.completions.create(model="m", prompt=prompt, max_tokens=3)
    assert whole.choices[0].text == text and whole.choices[0].finish_reason == finish
    chunks = list(client.completions.create(model="m", prompt=prompt, max_tokens=3, stream=True,
                                            stream_options={"include_usage": True}))
    with_choices = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in with_choices) == text
    assert [c.choices[0].finish_reason for c in with_choices] == [None] * (len(with_choices) - 1) + [finish]
    assert with_choices[-1].choices[0].text == ""
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_health_is_503_once_the_engine_is_dead():
    app = create_app(CharTokenizer(), FakeSession(), ServerSettings(ctx=100), render=render,
                     make_generator=ScriptedGenerator)
    with BackgroundServer(app) as srv:
        def health():
            host, port = srv.url.removeprefix("http://").split(":")
            conn = http.client.HTTPConnection(host, int(port), timeout=HTTP_TIMEOUT)
            try:
                conn.request("GET", "/health")
                resp = conn.getresponse()
                return resp.status, json.loads(resp.read())
            finally:
                conn.close()

        status, body = health()
        assert status == 200 and body["status"] == "ok"
        worker = app[STATE].worker
        worker.stop()
        assert not worker.alive
        status, body = health()
        assert status == 503 and body["status"] == "engine stopped", body
