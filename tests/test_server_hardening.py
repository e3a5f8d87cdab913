"""The server under hostile or careless use: request limits before any work, slow senders, non-JSON bodies, CORS,
parser-level errors, the key on /metrics, a model file changed under the mmap, graceful shutdown, and message text
that spells control tokens. Real servers on free 127.0.0.1 ports; every socket has a timeout."""
from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import ds4cupy
from ds4cupy.server import BackgroundServer, ServerSettings, create_app
from ds4cupy.server.app import STATE
from ds4cupy.server.shutdown import drain
from test_server_fake_engine import CharTokenizer, FakeSession, ScriptedGenerator, render

HTTP_TIMEOUT = 30.0
CTX = 1024
API_KEY = "sk-hardening"


# ------------------------------------------------------------------------------------------------------- helpers

def host_port(srv) -> tuple[str, int]:
    host, port = srv.url.removeprefix("http://").split(":")
    return host, int(port)


def request(srv, method, path, body: bytes | None = None, headers=None, timeout=HTTP_TIMEOUT):
    """(status, headers, body bytes, seconds)."""
    conn = http.client.HTTPConnection(*host_port(srv), timeout=timeout)
    t0 = time.perf_counter()
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, dict(resp.getheaders()), data, time.perf_counter() - t0
    finally:
        conn.close()


def post_json(srv, path, payload, headers=None, timeout=HTTP_TIMEOUT):
    return request(srv, "POST", path, json.dumps(payload).encode(),
                   {"Content-Type": "application/json", **(headers or {})}, timeout)


def raw_exchange(srv, data: bytes, timeout=5.0) -> bytes:
    """Send raw bytes, return everything the server sends back until it closes (or the timeout)."""
    with socket.create_connection(host_port(srv), timeout=timeout) as sock:
        sock.sendall(data)
        out = b""
        try:
            while chunk := sock.recv(65536):
                out += chunk
        except (socket.timeout, ConnectionResetError):
            pass
        return out


def openai_error(status, headers, data, expected_status, code=None):
    assert status == expected_status, data[:300]
    assert headers.get("Content-Type", "").startswith("application/json"), headers
    err = json.loads(data)["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code, err
    return err


def sse_events(data: bytes) -> list[str]:
    return [e for e in data.decode().split("\n\n") if e and not e.startswith(":")]


def chat(text, **fields):
    return {"model": "deepseek-chat", "messages": [{"role": "user", "content": text}], **fields}


def fake_app(**settings):
    return create_app(CharTokenizer(), FakeSession(), ServerSettings(ctx=2000, keepalive_s=0.1, **settings),
                      render=render, make_generator=ScriptedGenerator, prefill_chunk=16)


@pytest.fixture(scope="module")
def demo_model():
    from ds4cupy.tools.demo import demo_model_path
    m = ds4cupy.load(demo_model_path(), backend="reference")
    yield m
    m.close()


@pytest.fixture(scope="module")
def demo_server(demo_model):
    app = create_app(demo_model.tokenizer, demo_model.new_session(ctx=CTX), ServerSettings(ctx=CTX, keepalive_s=0.2))
    with BackgroundServer(app) as srv:
        yield srv


@pytest.fixture(scope="module")
def fake_server():
    with BackgroundServer(fake_app(api_key=API_KEY, cors_origins=("http://ok.example",), header_timeout_s=0.5,
                                   body_timeout_s=0.5, max_body_bytes=64 * 1024)) as srv:
        yield srv


AUTH = {"Authorization": f"Bearer {API_KEY}"}


# --------------------------------------------------------------------------------------- limits before any work

def test_oversized_bodies_are_refused_at_once_while_another_request_is_served(demo_server):
    """The issue's attack: a 30 MB body, and a body small enough to read but too long for the context. Both are
    refused in < 0.5 s (nothing is tokenized: the demo tokenizer needs seconds for the second one) while a stream
    that was already running completes normally."""
    stream_result = {}

    def stream():
        stream_result["r"] = post_json(demo_server, "/v1/chat/completions", chat(
            "Tell me a long story", stream=True, max_tokens=40, temperature=1.0, seed=7, min_p=0.0))

    t = threading.Thread(target=stream, daemon=True)
    t.start()
    time.sleep(0.3)
    assert demo_server.app[STATE].worker.busy, "the stream should be running while the big bodies arrive"

    # 30 MB announced: refused from the headers alone (the body is never sent)
    t0 = time.perf_counter()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {30 * 1024 * 1024}\r\n\r\n").encode()
    with socket.create_connection(host_port(demo_server), timeout=5) as sock:
        sock.sendall(head)
        reply = sock.recv(65536)
    assert time.perf_counter() - t0 < 0.5
    assert reply.startswith(b"HTTP/1.1 413") and b'"request_too_large"' in reply, reply[:300]

    # 3.5 MB of text: under --max-body (4 MiB), over ctx x longest token (1024 x 32 bytes); tokenizing it would take
    # the demo tokenizer about 7 s on a laptop core
    text = "All work and no play makes Jack a dull boy. " * 80_000
    status, headers, data, seconds = post_json(demo_server, "/v1/chat/completions", chat(text))
    err = openai_error(status, headers, data, 400, "context_length_exceeded")
    assert "bytes" in err["message"]
    assert seconds < 0.5, f"refused after {seconds:.2f} s"

    t.join(HTTP_TIMEOUT)
    status, _, data, _ = stream_result["r"]
    events = sse_events(data)
    assert status == 200 and events[-1] == "data: [DONE]"
    last = json.loads(events[-2][6:])
    assert last["choices"][0]["finish_reason"] in ("stop", "length")
    # and the server still answers at once
    assert post_json(demo_server, "/v1/chat/completions", chat("hi", max_tokens=1))[0] == 200


def test_tokenizing_does_not_block_the_event_loop(demo_model):
    """A long prompt under the byte bound must be tokenized to be judged; that happens off the event loop with the
    GIL released, so /health keeps answering at once meanwhile."""
    from ds4cupy.text.tokenizer import Tokenizer
    app = create_app(Tokenizer.demo(), FakeSession(), ServerSettings(ctx=65536), make_generator=ScriptedGenerator)
    text = "a, " * 350_000                  # 1 MB, under the 2 MiB bound: seconds of tokenizing, then too long
    with BackgroundServer(app) as srv:
        done = {}
        t = threading.Thread(target=lambda: done.setdefault("r", post_json(srv, "/v1/chat/completions", chat(text))),
                             daemon=True)
        t.start()
        time.sleep(0.05)
        latencies = []
        while t.is_alive():
            status, _, _, seconds = request(srv, "GET", "/health")
            assert status == 200
            latencies.append(seconds)
            time.sleep(0.02)
        t.join()
    err = openai_error(*done["r"][:3], 400, "context_length_exceeded")
    assert "tokens" in err["message"] and done["r"][3] > 0.3           # it was tokenized, not refused by bytes
    assert len(latencies) >= 3 and max(latencies) < 0.5, latencies


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None,
                                          "multipart/form-data; boundary=x"])
def test_non_json_bodies_are_415(fake_server, content_type):
    assert fake_server.app[STATE].worker.wait_idle(10), "the previous test's job never finished"
    jobs_before = fake_server.app[STATE].worker.jobs_served
    headers = dict(AUTH)
    if content_type:
        headers["Content-Type"] = content_type
    status, hdrs, data, _ = request(fake_server, "POST", "/v1/chat/completions", json.dumps(chat("hi")).encode(),
                                    headers)
    openai_error(status, hdrs, data, 415, "unsupported_media_type")
    assert fake_server.app[STATE].worker.jobs_served == jobs_before
    ok = post_json(fake_server, "/v1/chat/completions", chat("hi", max_tokens=1),
                   {**AUTH, "Content-Type": "application/json; charset=utf-8"})
    assert ok[0] == 200


def test_slow_senders_time_out(fake_server):
    # headers never completed: the connection is closed after the header timeout (0.5 s here)
    t0 = time.perf_counter()
    with socket.create_connection(host_port(fake_server), timeout=5) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        assert sock.recv(1024) == b""                  # closed by the server
    assert 0.4 < time.perf_counter() - t0 < 3.0
    # headers complete, body never completed: 408 after the body timeout
    t0 = time.perf_counter()
    reply = raw_exchange(fake_server, (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                                       f"{API_KEY}\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
                                       f'{{"messages": [').encode())
    assert reply.startswith(b"HTTP/1.1 408") and b'"request_timeout"' in reply, reply[:300]
    assert 0.4 < time.perf_counter() - t0 < 3.0


def test_parser_errors_are_openai_errors(fake_server):
    for raw in (b"GARBAGE\r\n\r\n", b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n",
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"):
        reply = raw_exchange(fake_server, raw)
        head, _, body = reply.partition(b"\r\n\r\n")
        assert re.match(rb"HTTP/1\.[01] 400 ", head), reply[:200]
        assert b"Content-Type: application/json" in head
        err = json.loads(body)["error"]
        assert err["type"] == "invalid_request_error" and err["code"] == "bad_http_request"


def test_405_has_allow_and_404_is_json(fake_server):
    status, headers, data, _ = request(fake_server, "GET", "/v1/chat/completions", headers=AUTH)
    openai_error(status, headers, data, 405, "method_not_allowed")
    assert headers["Allow"] == "POST"
    status, headers, data, _ = request(fake_server, "DELETE", "/health")
    openai_error(status, headers, data, 405)
    assert headers["Allow"] == "GET,HEAD"
    openai_error(*request(fake_server, "GET", "/nowhere")[:3], 404)


def test_cors_only_for_listed_origins(fake_server):
    ok, evil = "http://ok.example", "http://evil.example"
    pre = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
    status, headers, _, _ = request(fake_server, "OPTIONS", "/v1/chat/completions", headers={"Origin": ok, **pre})
    assert status == 204 and headers["Access-Control-Allow-Origin"] == ok
    assert "POST" in headers["Access-Control-Allow-Methods"]
    assert headers["Access-Control-Allow-Headers"] == "authorization,content-type"
    status, headers, data, _ = request(fake_server, "OPTIONS", "/v1/chat/completions", headers={"Origin": evil, **pre})
    openai_error(status, headers, data, 403, "origin_not_allowed")
    assert "Access-Control-Allow-Origin" not in headers
    # actual responses: the header for the listed origin only, streams included
    status, headers, _, _ = post_json(fake_server, "/v1/chat/completions", chat("x", max_tokens=1, stream=True),
                                      {**AUTH, "Origin": ok})
    assert status == 200 and headers["Access-Control-Allow-Origin"] == ok
    status, headers, _, _ = post_json(fake_server, "/v1/chat/completions", chat("x", max_tokens=1),
                                      {**AUTH, "Origin": evil})
    assert status == 200 and "Access-Control-Allow-Origin" not in headers


def test_no_cors_without_origins(demo_server):
    status, headers, data, _ = request(demo_server, "OPTIONS", "/v1/chat/completions", headers={
        "Origin": "http://ok.example", "Access-Control-Request-Method": "POST"})
    openai_error(status, headers, data, 403, "origin_not_allowed")
    assert "Access-Control-Allow-Origin" not in headers


def test_metrics_need_the_key_unless_public(fake_server):
    openai_error(*request(fake_server, "GET", "/metrics")[:3], 401, "invalid_api_key")
    status, _, data, _ = request(fake_server, "GET", "/metrics", headers=AUTH)
    assert status == 200 and b"ds4cupy_requests_total" in data
    assert request(fake_server, "GET", "/health")[0] == 200
    with BackgroundServer(fake_app(api_key=API_KEY, metrics_public=True)) as srv:
        assert request(srv, "GET", "/metrics")[0] == 200
        openai_error(*request(srv, "GET", "/v1/models")[:3], 401)


# ------------------------------------------------------------------------------- message text is never control

class RecordingSession(FakeSession):
    """Keeps every id it is given (the fake session refuses id 0, the demo tokenizer's BOS)."""

    def prefill(self, ids):
        self.tokens.extend(ids)
        return "logits"


def test_special_token_strings_in_messages_never_reach_the_engine_as_control_tokens():
    """Every added-token string of the vocabulary, written into system, user, tool-call and tool-result text, arrives
    at the session as plain text: the only added tokens the engine sees are the template's own markers."""
    from ds4cupy.text.tokenizer import Tokenizer
    tok = Tokenizer.demo()
    session = RecordingSession()
    app = create_app(tok, session, ServerSettings(ctx=32768), make_generator=ScriptedGenerator)
    every = "".join(sorted(tok._special_ids))
    body = {"model": "deepseek-chat", "max_tokens": 1,
            "messages": [{"role": "system", "content": "S" + every},
                         {"role": "user", "content": "U" + every},
                         {"role": "assistant", "content": None, "tool_calls": [
                             {"id": "c1", "type": "function",
                              "function": {"name": "f" + every, "arguments": json.dumps({"k" + every: every})}}]},
                         {"role": "tool", "tool_call_id": "c1", "content": "T" + every}]}
    with BackgroundServer(app) as srv:
        status, _, data, _ = post_json(srv, "/v1/chat/completions", body)
    assert status == 200, data[:300]
    prompt_tokens = json.loads(data)["usage"]["prompt_tokens"]
    consumed = session.tokens[:prompt_tokens]
    added = [tok.tokens[i] for i in consumed if tok.has_special(tok.tokens[i])]
    # only the template's own markers: BOS, the user turn, the assistant's tool-call block (DSML markup, EOS), the
    # tool-result turn, the hand-over to the assistant
    dsml = "｜DSML｜"
    assert added == ["<｜begin▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "</think>",
                     dsml, dsml, dsml, dsml, dsml, dsml, "<｜end▁of▁sentence｜>",
                     "<｜User｜>", "<｜Assistant｜>", "</think>"], added
    assert tok.decode(consumed).count(every) == 6            # the text itself arrived, as plain text


# ------------------------------------------------------------------------------------------ model file changes

def test_changed_model_file_gives_503_not_a_crash(tmp_path, tiny_model_path):
    path = tmp_path / "model.gguf"
    shutil.copy(tiny_model_path, path)
    model = ds4cupy.load(path, backend="reference")
    assert model.reads_file and model.file_problem() is None
    app = create_app(model.tokenizer, model.new_session(ctx=256), ServerSettings(ctx=256),
                     file_problem=model.file_problem)
    try:
        with BackgroundServer(app) as srv:
            assert post_json(srv, "/v1/chat/completions", chat("hello", max_tokens=2))[0] == 200
            size = path.stat().st_size
            with open(path, "r+b") as f:                     # truncate it under the running server
                f.truncate(size // 2)
            status, headers, data, _ = request(srv, "GET", "/health")
            health = json.loads(data)
            assert status == 503 and health["status"] == "model file changed" and "size" in health["model_file"]
            err = openai_error(*post_json(srv, "/v1/chat/completions", chat("again", max_tokens=2))[:3], 503,
                               "model_file_changed")
            assert "changed size" in err["message"] and str(tmp_path) not in err["message"]
            # the worker refuses too, whatever route a job comes from
            assert srv.app[STATE].worker.precheck() is not None
    finally:
        model.close()


def test_overwritten_model_file_is_noticed(tmp_path, tiny_model_path):
    path = tmp_path / "model.gguf"
    shutil.copy(tiny_model_path, path)
    model = ds4cupy.load(path, backend="reference")
    try:
        data = path.read_bytes()
        time.sleep(0.01)
        with open(path, "r+b") as f:                         # same size, other bytes
            f.seek(len(data) // 2)
            f.write(bytes(64))
        assert "modified" in model.file_problem()
    finally:
        model.close()


# ---------------------------------------------------------------------------------------- graceful shutdown

def test_drain_fails_queued_requests_and_cuts_off_the_running_one_after_the_grace():
    app = fake_app()
    with BackgroundServer(app) as srv:
        results = {}

        def go(name, payload):
            results[name] = post_json(srv, "/v1/chat/completions", payload)

        running = threading.Thread(target=go, args=("running", chat("SLOW", stream=True, max_tokens=400)))
        running.start()
        while not app[STATE].worker.busy:
            time.sleep(0.01)
        queued = [threading.Thread(target=go, args=("queued", chat("later", max_tokens=2))),
                  threading.Thread(target=go, args=("queued_stream", chat("later", max_tokens=2, stream=True)))]
        for t in queued:
            t.start()
        while app[STATE].worker.queue_depth < 2:
            time.sleep(0.01)
        t0 = time.perf_counter()
        asyncio.run_coroutine_threadsafe(drain(app, grace_s=0.3), srv._loop).result(HTTP_TIMEOUT)
        drained_in = time.perf_counter() - t0
        for t in [running, *queued]:
            t.join(HTTP_TIMEOUT)
        after = post_json(srv, "/v1/chat/completions", chat("too late", max_tokens=1))
    err = openai_error(*results["queued"][:3], 503, "server_shutting_down")
    assert "shutting down" in err["message"]
    for name in ("running", "queued_stream"):
        status, _, data, _ = results[name]
        events = sse_events(data)
        assert status == 200 and events[-1] == "data: [DONE]", events[-3:]
        assert json.loads(events[-2][6:])["error"]["code"] == "server_shutting_down"
    assert len(sse_events(results["running"][2])) > 3          # it had streamed tokens before it was cut off
    assert 0.3 <= drained_in < 3.0
    openai_error(*after[:3], 503, "server_shutting_down")


def test_drain_lets_the_running_request_finish_within_the_grace():
    app = fake_app()
    with BackgroundServer(app) as srv:
        result = {}
        t = threading.Thread(target=lambda: result.setdefault("r", post_json(
            srv, "/v1/chat/completions", chat("SLOW", stream=True, max_tokens=6))))
        t.start()
        while not app[STATE].worker.busy:
            time.sleep(0.01)
        asyncio.run_coroutine_threadsafe(drain(app, grace_s=10.0), srv._loop).result(HTTP_TIMEOUT)
        t.join(HTTP_TIMEOUT)
    events = sse_events(result["r"][2])
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"


def test_sigterm_mid_stream_gives_error_event_and_done_and_queued_get_503():
    """`ds4cupy serve` (demo model) gets SIGTERM while streaming with a request queued behind: the stream ends with
    an error event and [DONE] after the grace period, the queued request gets 503 with an error body, the process
    exits 0 and the port is closed."""
    proc = subprocess.Popen([sys.executable, "-m", "ds4cupy", "serve", "--port", "0", "--backend", "reference",
                             "--ctx", "2048", "--shutdown-grace", "0.5"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    try:
        url = None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and url is None:
            line = proc.stdout.readline()
            if not line:
                break
            m = re.search(r"listening on http://127\.0\.0\.1:(\d+)/v1", line)
            url = m and int(m.group(1))
        assert url, proc.stderr.read() if proc.poll() is not None else "no URL printed"
        port = url
        sock = socket.create_connection(("127.0.0.1", port), timeout=HTTP_TIMEOUT)
        body = json.dumps(chat("Talk", stream=True, max_tokens=1500, temperature=1.0, min_p=0.0, seed=11)).encode()
        sock.sendall(b"POST /v1/chat/completions HTTP/1.0\r\nContent-Type: application/json\r\n"     # 1.0: no chunks
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        got = b""
        while got.count(b"data: {") < 4:                  # role chunk + 3 tokens
            chunk = sock.recv(65536)
            assert chunk, got
            got += chunk
        queued = {}

        def queued_request():
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=HTTP_TIMEOUT)
            c.request("POST", "/v1/chat/completions", headers={"Content-Type": "application/json"},
                      body=json.dumps(chat("wait", max_tokens=2)))
            r = c.getresponse()
            queued["r"] = (r.status, dict(r.getheaders()), r.read())

        qt = threading.Thread(target=queued_request, daemon=True)
        qt.start()
        time.sleep(0.5)                          # it is queued behind the stream
        t0 = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        while chunk := sock.recv(65536):
            got += chunk
        cut_after = time.perf_counter() - t0
        sock.close()
        qt.join(HTTP_TIMEOUT)
        events = sse_events(got.partition(b"\r\n\r\n")[2])
        assert events[-1] == "data: [DONE]", events[-3:]
        assert json.loads(events[-2][6:])["error"]["code"] == "server_shutting_down"
        assert 0.4 < cut_after < 10.0
        openai_error(*queued["r"], 503, "server_shutting_down")
        assert proc.wait(30) == 0
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


# ------------------------------------------------------------------------------------------------ CLI errors

def test_serve_with_a_bad_model_file_prints_one_line(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + bytes(40))
    r = subprocess.run([sys.executable, "-m", "ds4cupy", "serve", "-m", str(bad), "--backend", "reference"],
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert r.returncode == 1
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith("ds4cupy serve: error: ") and str(bad) in lines[0] and "GGUF version" in lines[0]
