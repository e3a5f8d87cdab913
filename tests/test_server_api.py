"""The OpenAI-compatible server end to end: the real tiny demo model on the NumPy reference backend, a server on a
free 127.0.0.1 port, the `openai` client and raw HTTP. Every network call has a timeout."""
from __future__ import annotations

import http.client
import json
import re
import threading
import time

import pytest

import openai  # the real OpenAI client (test extra: a missing one is an error, not a skip)

import ds4cupy
from ds4cupy.server import BackgroundServer, ServerSettings, create_app
from ds4cupy.server.app import STATE
from ds4cupy.server.protocol import COMPLETIONS_SYSTEM_PROMPT

CTX = 1024
HTTP_TIMEOUT = 60.0
KEEPALIVE_S = 0.2
API_KEY = "sk-test-ds4cupy"
SMALL_BODY = 4096
NOTHINK = {"model": "deepseek-chat"}


def demo_model():
    from ds4cupy.tools.demo import demo_model_path
    return ds4cupy.load(demo_model_path(), backend="reference")


@pytest.fixture(scope="module")
def model():
    m = demo_model()
    yield m
    m.close()


@pytest.fixture(scope="module")
def server(model):
    app = create_app(model.tokenizer, model.new_session(ctx=CTX),
                     ServerSettings(ctx=CTX, keepalive_s=KEEPALIVE_S, demo=True))
    with BackgroundServer(app) as srv:
        yield srv


@pytest.fixture(scope="module")
def guarded_server(model):
    """A second server with an API key and a small body limit."""
    app = create_app(model.tokenizer, model.new_session(ctx=CTX),
                     ServerSettings(ctx=CTX, api_key=API_KEY, max_body_bytes=SMALL_BODY))
    with BackgroundServer(app) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=HTTP_TIMEOUT, max_retries=0)


# ------------------------------------------------------------------------------------------------------ raw HTTP

def raw_request(srv, method, path, body=None, headers=None, raw_body: bytes | None = None):
    """(status, headers, bytes) of one plain request."""
    host, port = srv.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=HTTP_TIMEOUT)
    try:
        data = raw_body if raw_body is not None else (None if body is None else json.dumps(body).encode())
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def post_json(srv, path, body, **kw):
    status, headers, data = raw_request(srv, "POST", path, body, **kw)
    return status, json.loads(data)


def sse_lines(data: bytes) -> list[str]:
    return data.decode("utf-8").split("\n")


def sse_payloads(data: bytes) -> list:
    """The JSON objects of `data:` lines (the [DONE] marker left out)."""
    out = []
    for line in sse_lines(data):
        if line.startswith("data: ") and line != "data: [DONE]":
            out.append(json.loads(line[6:]))
    return out


def assert_openai_error(status, body, expected_status, param=None, code=None):
    assert status == expected_status, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param
    if code is not None:
        assert err["code"] == code


def chat_body(text, **fields):
    return {"messages": [{"role": "user", "content": text}], **fields}


def direct_greedy(model, messages, max_tokens, thinking=False, tools=None):
    """What a greedy request must answer, computed without the server: DeepSeek's chat encoding and the Generator on
    a fresh session (greedy decoding is deterministic, and the reference gives the same bits whatever the prefill
    chunking or prefix reuse). Returns (prompt tokens, content, finish_reason, completion tokens)."""
    from ds4cupy.text.chat import encode_messages
    from ds4cupy.text.generate import Generator
    from ds4cupy.text.sampling import SamplingParams
    ids = model.tokenizer.encode(encode_messages(messages, "thinking" if thinking else "chat", tools=tools))
    session = model.new_session(CTX)
    gen = Generator(model.tokenizer, SamplingParams(temperature=0), max_tokens=max_tokens, thinking=thinking,
                    parse_tools=bool(tools))
    list(gen.stream(session, session.prefill(ids)))
    return len(ids), gen.content, gen.finish_reason, len(gen.completion_tokens)


# ----------------------------------------------------------------------------------------------- openai client

def test_models_and_health(server, client):
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == "deepseek-v4-flash" and "deepseek-chat" in ids
    status, _, data = raw_request(server, "GET", "/health")
    health = json.loads(data)
    assert status == 200 and health["status"] == "ok" and health["demo_model_random_weights"] is True
    status, body = json.loads(raw_request(server, "GET", "/v1/models/deepseek-chat")[2]), None
    assert status["id"] == "deepseek-chat"
    status, _, data = raw_request(server, "GET", "/v1/models/gpt-4")
    assert_openai_error(status, json.loads(data), 404, code="model_not_found")


def test_chat_non_stream(client, model):
    messages = [{"role": "user", "content": "Hello"}]
    r = client.chat.completions.create(model="deepseek-chat", messages=messages, max_tokens=5, temperature=0)
    choice = r.choices[0]
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant"
    n_prompt, content, finish, n_completion = direct_greedy(model, messages, 5)
    assert (choice.message.content, choice.finish_reason) == (content, finish)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (n_prompt, n_completion)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.prompt_tokens_details.cached_tokens <= r.usage.prompt_tokens


def test_chat_stream_with_usage(client):
    kwargs = dict(model="deepseek-chat", messages=[{"role": "user", "content": "Stream please"}], max_tokens=6,
                  temperature=0)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert text == (whole.choices[0].message.content or "")        # greedy: stream == non-stream
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_reasoning_content_in_thinking_mode(client):
    """Thinking is on by default: everything before </think> streams as reasoning_content."""
    for seed in range(1, 8):
        r = client.chat.completions.create(model="deepseek-v4-flash", max_tokens=8, seed=seed,
                                           messages=[{"role": "user", "content": "Think about it"}])
        if r.usage.completion_tokens >= 4:
            break
    reasoning = r.choices[0].message.model_extra.get("reasoning_content")
    assert reasoning, "thinking mode: the text should be reasoning"
    stream = client.chat.completions.create(model="deepseek-v4-flash", max_tokens=8, seed=seed, stream=True,
                                            messages=[{"role": "user", "content": "Think about it"}])
    streamed = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or "" for c in stream
                       if c.choices)
    assert streamed == reasoning
    # the same request with thinking disabled gives content and no reasoning
    r2 = client.chat.completions.create(model="deepseek-v4-flash", max_tokens=8, seed=seed,
                                        messages=[{"role": "user", "content": "Think about it"}],
                                        extra_body={"thinking": {"type": "disabled"}})
    assert not r2.choices[0].message.model_extra.get("reasoning_content")


def test_completions(client, model):
    r = client.completions.create(model="deepseek-v4-flash", prompt="Once upon a time", max_tokens=5, temperature=0)
    assert r.object == "text_completion"
    wrapped = [{"role": "system", "content": COMPLETIONS_SYSTEM_PROMPT}, {"role": "user", "content": "Once upon a time"}]
    n_prompt, content, finish, n_completion = direct_greedy(model, wrapped, 5)
    assert (r.choices[0].text, r.choices[0].finish_reason) == (content, finish)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (n_prompt, n_completion)
    chunks = list(client.completions.create(model="deepseek-v4-flash", prompt="Once upon a time", max_tokens=5,
                                            temperature=0, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [finish]
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_tool_call_round_trip(server, client, model):
    """Assistant tool call -> tool result -> answer: the history renders with the tool result inside the prompt. The
    first request (tools block: several hundred tokens) also shows `: keepalive` comments during its prefill."""
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                               "parameters": {"type": "object",
                                                              "properties": {"city": {"type": "string"}}}}}]
    history = [{"role": "user", "content": "Weather in Rome?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]}]
    with_result = history + [{"role": "tool", "tool_call_id": "call_1", "content": "sunny, 24 C, light breeze"}]
    status, _, data = raw_request(server, "POST", "/v1/chat/completions", {
        "model": "deepseek-chat", "messages": with_result, "tools": tools, "max_tokens": 3, "temperature": 0,
        "stream": True, "stream_options": {"include_usage": True}})
    assert status == 200 and data.decode().endswith("data: [DONE]\n\n")
    assert ": keepalive" in sse_lines(data), "no keepalive during a long prefill"
    payloads = sse_payloads(data)
    n_prompt, content, finish, n_completion = direct_greedy(model, with_result, 3, tools=tools)
    assert payloads[-2]["choices"][0]["finish_reason"] == finish
    assert "".join(p["choices"][0]["delta"].get("content", "") for p in payloads if p["choices"]) == content
    long_prompt = payloads[-1]["usage"]["prompt_tokens"]
    assert (long_prompt, payloads[-1]["usage"]["completion_tokens"]) == (n_prompt, n_completion)

    b = client.chat.completions.create(model="deepseek-chat", messages=history + [
        {"role": "tool", "tool_call_id": "call_1", "content": "rain"}], tools=tools, max_tokens=2, temperature=0)
    assert b.usage.prompt_tokens < long_prompt                   # the tool result is in the prompt
    # the history before the last user turn (tools block, call) comes from the snapshot taken at that turn's start
    assert b.usage.prompt_tokens - b.usage.prompt_tokens_details.cached_tokens < 40
    no_tools = client.chat.completions.create(model="deepseek-chat", messages=with_result, max_tokens=2,
                                              temperature=0, tools=tools, tool_choice="none")
    assert no_tools.usage.prompt_tokens < long_prompt - 50       # tool_choice none: no tools block


# ---------------------------------------------------------------------------------------------------- raw SSE

def test_raw_sse_framing(server, model):
    status, headers, data = raw_request(server, "POST", "/v1/chat/completions", chat_body(
        "frame it", stream=True, max_tokens=4, temperature=0, stream_options={"include_usage": True}, **NOTHINK))
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    text = data.decode()
    assert text.endswith("data: [DONE]\n\n")
    events = [e for e in text.split("\n\n") if e]
    for event in events:
        assert event.startswith("data: ") or event.startswith(":"), event
        assert "\n" not in event
    payloads = sse_payloads(data)
    assert payloads[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert payloads[-1]["choices"] == [] and payloads[-1]["usage"]["completion_tokens"] >= 1
    _, content, finish, n_completion = direct_greedy(model, chat_body("frame it")["messages"], 4)
    assert payloads[-2]["choices"][0]["finish_reason"] == finish
    assert payloads[-1]["usage"]["completion_tokens"] == n_completion
    assert "".join(p["choices"][0]["delta"].get("content", "") for p in payloads if p["choices"]) == content
    assert all(p["object"] == "chat.completion.chunk" for p in payloads)


def test_stop_string(server):
    base = post_json(server, "/v1/chat/completions", chat_body("Say something", max_tokens=12, temperature=0,
                                                               **NOTHINK))[1]
    text = base["choices"][0]["message"]["content"]
    candidates = [(i, c) for i, c in enumerate(text) if i >= 1 and c not in text[:i] and not c.isspace()]
    if not candidates:
        pytest.skip(f"greedy text {text!r} has no usable stop character")
    index, stop = candidates[0]
    for stream in (False, True):
        status, headers, data = raw_request(server, "POST", "/v1/chat/completions", chat_body(
            "Say something", max_tokens=12, temperature=0, stop=[stop], stream=stream, **NOTHINK))
        assert status == 200
        if stream:
            payloads = sse_payloads(data)
            got = "".join(p["choices"][0]["delta"].get("content", "") for p in payloads if p["choices"])
            finish = [p["choices"][0]["finish_reason"] for p in payloads if p["choices"]][-1]
        else:
            body = json.loads(data)
            got, finish = body["choices"][0]["message"]["content"], body["choices"][0]["finish_reason"]
        assert got == text[:index] and finish == "stop"


def test_seed_reproducibility(client):
    def sample(seed):
        r = client.chat.completions.create(model="deepseek-chat", messages=[{"role": "user", "content": "Random"}],
                                           max_tokens=8, temperature=1.0, seed=seed, extra_body={"min_p": 0.0})
        return r.choices[0].message.content, r.usage.completion_tokens

    first = sample(1234)
    assert sample(1234) == first
    assert any(sample(s) != first for s in (1, 2, 3))


# ------------------------------------------------------------------------------------------------ cancellation

def metrics_text(srv) -> str:
    return raw_request(srv, "GET", "/metrics")[2].decode()


def metric_value(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert m, name
    return float(m.group(1))


def test_disconnect_cancels_generation(server):
    before = metric_value(metrics_text(server), "ds4cupy_requests_cancelled_total")
    host, port = server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=HTTP_TIMEOUT)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(chat_body(
        "go on forever", max_tokens=900, temperature=1.0, min_p=0.0, stream=True, **NOTHINK)),
        headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    chunks = 0
    while chunks < 4:                       # role chunk + a few token chunks
        line = resp.fp.readline()
        assert line, "stream ended early"
        chunks += line.startswith(b"data: ")
    conn.sock.shutdown(2)
    conn.close()
    t0 = time.perf_counter()
    status, body = post_json(server, "/v1/chat/completions", chat_body("next", max_tokens=2, temperature=0,
                                                                       **NOTHINK))
    elapsed = time.perf_counter() - t0
    assert status == 200
    assert elapsed < 5.0, f"next request waited {elapsed:.1f} s: the cancelled generation kept the engine"
    after = metrics_text(server)
    assert metric_value(after, "ds4cupy_requests_cancelled_total") == before + 1
    assert metric_value(after, "ds4cupy_queue_depth") == 0


# ------------------------------------------------------------------------------------------------- concurrency

def test_concurrent_requests_fifo(server, model):
    """20 streaming requests sent 20 ms apart: all complete, each with its own stream (the text and finish reason of
    its own greedy answer), served in arrival order."""
    n = 20
    prompts = [f"Request number {i}" for i in range(n)]
    expected = {i: direct_greedy(model, chat_body(prompts[i])["messages"], 3) for i in range(n)}
    first_token_at: dict[int, float] = {}
    results: dict[int, list] = {}
    host, port = server.url.removeprefix("http://").split(":")

    def stream(i: int):
        conn = http.client.HTTPConnection(host, int(port), timeout=HTTP_TIMEOUT)
        try:
            conn.request("POST", "/v1/chat/completions", headers={"Content-Type": "application/json"},
                         body=json.dumps(chat_body(prompts[i], max_tokens=3, temperature=0, stream=True, **NOTHINK)))
            resp = conn.getresponse()
            payloads = []
            while True:
                line = resp.fp.readline()
                if not line or line == b"data: [DONE]\n":
                    break
                if line.startswith(b"data: "):
                    payload = json.loads(line[6:])
                    if payload["choices"] and payload["choices"][0]["delta"].get("role") is None:
                        first_token_at.setdefault(i, time.perf_counter())
                    payloads.append(payload)
            results[i] = payloads
        finally:
            conn.close()

    threads = []
    for i in range(n):
        t = threading.Thread(target=stream, args=(i,), daemon=True)
        t.start()
        threads.append(t)
        time.sleep(0.02)
    for t in threads:
        t.join(HTTP_TIMEOUT)
    assert sorted(results) == list(range(n))
    for i, payloads in results.items():
        assert len({p["id"] for p in payloads}) == 1
        _, content, finish, _ = expected[i]
        assert payloads[-1]["choices"][0]["finish_reason"] == finish, i
        assert "".join(p["choices"][0]["delta"].get("content", "") for p in payloads) == content, i
    order = sorted(first_token_at, key=first_token_at.get)
    assert order == sorted(order), f"served out of arrival order: {order}"


# ------------------------------------------------------------------------------------------------- prefix reuse

def test_prefix_reuse_second_turn(client):
    turn1 = [{"role": "system", "content": "You are terse."},
             {"role": "user", "content": "Tell me about the sea in a few words please."}]
    r1 = client.chat.completions.create(model="deepseek-chat", messages=turn1, max_tokens=6, temperature=0)
    turn2 = turn1 + [{"role": "assistant", "content": r1.choices[0].message.content or ""},
                     {"role": "user", "content": "And the sky?"}]
    r2 = client.chat.completions.create(model="deepseek-chat", messages=turn2, max_tokens=4, temperature=0)
    cached = r2.usage.prompt_tokens_details.cached_tokens
    assert cached >= r1.usage.prompt_tokens - 1          # at least the whole first prompt but its last token
    assert r2.usage.prompt_tokens - cached < r2.usage.prompt_tokens - r1.usage.prompt_tokens + 8

    # thinking mode: the reasoning is dropped from history, still the first prompt (up to <｜Assistant｜>) is reused
    r3 = client.chat.completions.create(model="deepseek-v4-flash", messages=turn1, max_tokens=4, seed=1)
    r4 = client.chat.completions.create(model="deepseek-v4-flash", max_tokens=2, seed=1, messages=turn1 + [
        {"role": "assistant", "content": "Blue and wide."}, {"role": "user", "content": "Sky?"}])
    assert r4.usage.prompt_tokens_details.cached_tokens >= r3.usage.prompt_tokens - 1


# ------------------------------------------------------------------------------------------------------ errors

def test_error_cases(server, model):
    worker = server.app[STATE].worker
    assert worker.wait_idle(10), "the previous test's job never finished"
    jobs_before = worker.jobs_served
    url = "/v1/chat/completions"
    status, _, data = raw_request(server, "POST", url, raw_body=b'{"messages": [')
    assert_openai_error(status, json.loads(data), 400, code="invalid_json")
    assert_openai_error(*post_json(server, url, {"messages": []}), 400, param="messages")
    assert_openai_error(*post_json(server, url, {}), 400, param="messages")
    assert_openai_error(*post_json(server, url, chat_body("x", max_tokens=0)), 400, param="max_tokens")
    assert_openai_error(*post_json(server, url, chat_body("x", max_tokens=-1)), 400, param="max_tokens")
    assert_openai_error(*post_json(server, url, chat_body("x", temperature="warm")), 400, param="temperature")
    assert_openai_error(*post_json(server, url, chat_body("x", stream="yes")), 400, param="stream")
    assert_openai_error(*post_json(server, url, {"messages": "hi"}), 400, param="messages")
    assert_openai_error(*post_json(server, url, chat_body("word " * (2 * CTX))), 400, code="context_length_exceeded")
    assert_openai_error(*post_json(server, "/v1/completions", {"prompt": 5}), 400, param="prompt")
    assert_openai_error(*post_json(server, "/v1/completions", {"prompt": "x", "max_tokens": 0}), 400,
                        param="max_tokens")
    status, _, data = raw_request(server, "GET", "/v1/nothing")
    assert_openai_error(status, json.loads(data), 404)
    status, _, data = raw_request(server, "GET", url)
    assert_openai_error(status, json.loads(data), 405)
    # none of that reached the engine, and the server keeps serving
    assert worker.jobs_served == jobs_before
    text = metrics_text(server)
    assert 'endpoint="/v1/chat/completions",status="400"' in text
    assert post_json(server, url, chat_body("still there?", max_tokens=2, **NOTHINK))[0] == 200


def test_api_key_and_body_limit(guarded_server):
    url = "/v1/chat/completions"
    body = chat_body("hi", max_tokens=2, **NOTHINK)
    assert_openai_error(*post_json(guarded_server, url, body), 401, code="invalid_api_key")
    assert_openai_error(*post_json(guarded_server, url, body, headers={"Authorization": "Bearer wrong"}), 401,
                        code="invalid_api_key")
    status, _, data = raw_request(guarded_server, "GET", "/v1/models")
    assert_openai_error(status, json.loads(data), 401)
    auth = {"Authorization": f"Bearer {API_KEY}"}
    assert post_json(guarded_server, url, body, headers=auth)[0] == 200
    assert_openai_error(*post_json(guarded_server, url, chat_body("x" * (2 * SMALL_BODY)), headers=auth), 413,
                        code="request_too_large")
    assert raw_request(guarded_server, "GET", "/health")[0] == 200      # open without the key
    guarded = openai.OpenAI(base_url=guarded_server.url + "/v1", api_key="nope", timeout=HTTP_TIMEOUT,
                            max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        guarded.models.list()
    good = openai.OpenAI(base_url=guarded_server.url + "/v1", api_key=API_KEY, timeout=HTTP_TIMEOUT, max_retries=0)
    assert good.models.list().data


def test_metrics_exposition(server):
    text = metrics_text(server)
    for name in ("ds4cupy_requests_total", "ds4cupy_prompt_tokens_total", "ds4cupy_completion_tokens_total",
                 "ds4cupy_prefill_tokens_per_second", "ds4cupy_decode_tokens_per_second",
                 "ds4cupy_time_to_first_token_seconds", "ds4cupy_queue_depth"):
        assert f"# TYPE {name}" in text
    assert metric_value(text, "ds4cupy_completion_tokens_total") > 0
